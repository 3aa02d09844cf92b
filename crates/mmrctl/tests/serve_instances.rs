//! Several `mmrctl serve` instances on one database and one datastore: what one instance learns
//! (a logout) holds on the others, and what they do at once (identical uploads) stays one object.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{MediaRepo, SHARED_SECRET, sample};
use testkit::Synapse;

const HS: &str = "hs1.test";

fn config_status(repo: &MediaRepo, token: &str) -> u16 {
    repo.get(
        "/_matrix/client/v1/media/config",
        &[("Host", HS), ("Authorization", &format!("Bearer {token}"))],
    )
    .status
}

fn logout(repo: &MediaRepo, token: &str, all: bool) {
    let path = if all {
        "/_matrix/client/v3/logout/all"
    } else {
        "/_matrix/client/v3/logout"
    };
    let r = repo.send(
        "POST",
        path,
        &[("Host", HS), ("Authorization", &format!("Bearer {token}"))],
        Some("application/json"),
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Waits (at most a second after the logout) until every token is refused by every repo.
fn refused_everywhere_within_a_second(repos: &[&MediaRepo], tokens: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let statuses: Vec<u16> = repos
            .iter()
            .flat_map(|r| tokens.iter().map(|t| config_status(r, t)))
            .collect();
        if statuses.iter().all(|s| *s == 401) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still accepted a second after the logout: {statuses:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_logout_on_one_instance_ends_the_token_on_the_others_within_a_second() {
    let synapse = Synapse::start(HS);
    let (_, alice) = synapse.register_user("alice", false);
    let (_, bob) = synapse.register_user("bob", false);
    let login = synapse.post_json(
        "/_matrix/client/v3/login",
        &json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "bob" },
                 "password": Synapse::password_of("bob") }),
        None,
    );
    let bob_again = login.json()["access_token"].as_str().unwrap().to_owned();
    let repos = MediaRepo::start_many(3, &[(HS, &synapse.base_url())]);
    // Every instance has cached every token (accessTokens.maxCacheTimeSeconds is 600).
    for repo in &repos {
        for token in [&alice, &bob, &bob_again] {
            assert_eq!(config_status(repo, token), 200);
        }
    }
    let (a, b, c) = (&repos[0], &repos[1], &repos[2]);

    logout(a, &alice, false);
    refused_everywhere_within_a_second(&[b, c], &[&alice]);
    // Bob's tokens are untouched, on every instance.
    assert_eq!(config_status(c, &bob), 200);

    // `/logout/all` on another instance ends both of bob's.
    logout(b, &bob, true);
    refused_everywhere_within_a_second(&[a, c], &[&bob, &bob_again]);
}

#[test]
fn identical_uploads_spread_over_three_instances_make_one_object() {
    let repos = MediaRepo::start_many(3, &[(HS, "http://127.0.0.1:9")]);
    let body = sample(1024 * 1024, 9);
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let (repo, body) = (&repos[i % 3], &body);
                s.spawn(move || repo.upload(HS, SHARED_SECRET, "image/png", None, body))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(repos[0].objects(), 1);
    assert_eq!(repos[0].media_rows(), 20);
    for (i, id) in ids.iter().enumerate() {
        let r = repos[(i + 1) % 3].download(HS, id, &[]);
        assert_eq!((r.status, r.body.len()), (200, body.len()));
        assert!(r.body == body);
    }
}
