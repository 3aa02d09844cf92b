//! `mmrctl serve` in front of a real Synapse: real access tokens checked with `/whoami`, logout through
//! the media repo invalidating its token cache, `/versions`, and Synapse going away and coming back.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

mod support;

use std::time::{Duration, Instant};

use support::{MediaRepo, sample};
use testkit::Synapse;

const HS: &str = "hs1.test";
const OTHER: &str = "hs2.test";

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn synapse_tokens_upload_download_logout_and_outage() {
    let mut synapse = Synapse::start(HS);
    let (alice, alice_token) = synapse.register_user("alice", false);
    let (_bob, bob_token) = synapse.register_user("bob", false);
    // A second domain served by the same repo (its users happen to live on the same Synapse).
    let repo = MediaRepo::start(
        &[(HS, &synapse.base_url()), (OTHER, &synapse.base_url())],
        |_| {},
    );

    // Tokens that cannot be valid are the client's error, however many: they never lock the
    // homeserver's users out (backoffAt is 3 here).
    for _ in 0..10 {
        let r = repo.get(
            "/_matrix/client/v1/media/config?access_token=%0A",
            &[("Host", HS)],
        );
        assert_eq!(
            (r.status, r.json()["errcode"].as_str()),
            (401, Some("M_UNKNOWN_TOKEN"))
        );
    }

    // Upload with a Synapse token; download on the authenticated endpoint family (legacy needs
    // freeze off for new media: checked in serve_media.rs).
    let body = sample(5 * 1024 * 1024, 42);
    let a = repo.upload(HS, &alice_token, "image/png", Some("cat.png"), &body);
    let b = repo.upload(HS, &bob_token, "image/png", Some("same-cat.png"), &body);
    assert_eq!(
        repo.objects(),
        1,
        "the same 5 MiB from two users is one object"
    );
    for (id, token) in [(&a, &bob_token), (&b, &alice_token)] {
        let r = repo.get(
            &format!("/_matrix/client/v1/media/download/{HS}/{id}"),
            &[("Host", HS), ("Authorization", &bearer(token))],
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body, body);
    }
    // A user of hs1.test cannot act for the other domain this repo serves, whether the proxy's
    // Host or an X-Forwarded-Host names it.
    for headers in [
        [("Host", OTHER), ("X-Forwarded-Host", OTHER)],
        [("Host", HS), ("X-Forwarded-Host", OTHER)],
    ] {
        let auth = bearer(&bob_token);
        let mut all = headers.to_vec();
        all.push(("Authorization", &auth));
        let r = repo.send(
            "POST",
            "/_matrix/media/v3/upload",
            &all,
            Some("image/png"),
            &body[..1000],
        );
        assert_eq!(
            (r.status, r.json()["errcode"].as_str()),
            (403, Some("M_FORBIDDEN")),
            "{}",
            r.text()
        );
    }
    let rows: Vec<(String, String)> = repo
        .db
        .as_ref()
        .unwrap()
        .client()
        .query("SELECT origin, user_id FROM media ORDER BY user_id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        [
            (HS.to_owned(), alice.clone()),
            (HS.to_owned(), "@bob:hs1.test".to_owned())
        ]
    );

    // An invalid token is rejected with Synapse's verdict.
    let r = repo.get(
        "/_matrix/client/v1/media/config",
        &[("Host", HS), ("Authorization", "Bearer not-a-token")],
    );
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (401, Some("M_UNKNOWN_TOKEN")),
        "{}",
        r.text()
    );

    // /versions comes from Synapse, with authenticated media announced.
    let r = repo.get("/_matrix/client/versions", &[("Host", HS)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.json()["versions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "v1.11")
    );

    // Logout through the media repo: Synapse forgets the token, and so does the media repo's cache.
    let config = |token: &str| {
        repo.get(
            "/_matrix/media/v3/config",
            &[("Host", HS), ("Authorization", &bearer(token))],
        )
        .status
    };
    assert_eq!(config(&bob_token), 200, "cached now");
    let r = repo.send(
        "POST",
        "/_matrix/client/v3/logout",
        &[("Host", HS), ("Authorization", &bearer(&bob_token))],
        Some("application/json"),
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        config(&bob_token),
        401,
        "a logged-out token must not live on in the cache"
    );
    assert!(
        repo.metrics()
            .contains(r#"mmrctl_token_cache_lookups_total{result="hit"}"#)
    );

    // Synapse goes away: a new token cannot be checked (502, then 503 once the backoff opens), while
    // tokens already checked keep working from the cache.
    let (_carol, carol_token) = synapse.register_user("carol", false);
    synapse.stop();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(config(&carol_token));
    }
    assert_eq!(statuses[0], 502, "{statuses:?}");
    assert!(
        statuses.contains(&503),
        "the backoff never opened: {statuses:?}"
    );
    let r = repo.get(
        "/_matrix/media/v3/config",
        &[("Host", HS), ("Authorization", &bearer(&carol_token))],
    );
    assert!(
        r.json()["error"].as_str().unwrap().contains(HS),
        "{}",
        r.text()
    );
    assert_eq!(config(&alice_token), 200, "cached tokens keep working");

    // Synapse returns: the media repo recovers by itself.
    synapse.restart();
    let deadline = Instant::now() + Duration::from_secs(90);
    while config(&carol_token) != 200 {
        assert!(
            Instant::now() < deadline,
            "the media repo did not recover:\n{}",
            repo.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn logout_all_forgets_every_token_of_the_user() {
    let synapse = Synapse::start(HS);
    let (_dave, first) = synapse.register_user("dave", false);
    let login = synapse.post_json(
        "/_matrix/client/v3/login",
        &serde_json::json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "dave"},
                            "password": "testkit-password-dave"}),
        None,
    );
    assert_eq!(login.status, 200, "{}", login.text());
    let second = login.json()["access_token"].as_str().unwrap().to_owned();
    let repo = MediaRepo::start(&[(HS, &synapse.base_url())], |_| {});
    let config = |token: &str| {
        repo.get(
            "/_matrix/client/v1/media/config",
            &[("Host", HS), ("Authorization", &bearer(token))],
        )
        .status
    };
    assert_eq!((config(&first), config(&second)), (200, 200));
    let r = repo.send(
        "POST",
        "/_matrix/client/r0/logout/all",
        &[("Host", HS), ("Authorization", &bearer(&first))],
        Some("application/json"),
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!((config(&first), config(&second)), (401, 401));
}
