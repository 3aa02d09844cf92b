//! Two real Synapses federating over TLS on loopback, A's media routed by nginx to `mmrctl
//! serve` (its key merged into A's key file): B's users get A's media from mmrctl, and A's users
//! get B's media through mmrctl, which signs as A and which B verifies.

mod support;

use base64::Engine as _;
use keys::{KeyFile, KeyFormat, SigningKey};
use serde_json::json;
use support::{MediaRepo, sample};
use testkit::{Federation, HomeserverSetup, TestDb, free_port};

struct Deployment {
    fed: Federation,
    repo: MediaRepo,
    _key_dir: tempfile::TempDir,
}

fn deploy() -> Deployment {
    let key = SigningKey::generate().unwrap();
    let seed = base64::engine::general_purpose::STANDARD_NO_PAD.encode(key.seed());
    let line = format!("ed25519 {} {seed}", key.id().version());
    let media_port = free_port();
    let fed = Federation::builder()
        .a(HomeserverSetup::default()
            .media_upstream(media_port)
            .extra_signing_key(&line))
        .start();
    let key_dir = tempfile::tempdir().unwrap();
    let key_path = key_dir.path().join("mmr.signing.key");
    std::fs::write(
        &key_path,
        KeyFile::new(KeyFormat::Mmr, vec![key]).to_text(KeyFormat::Mmr),
    )
    .unwrap();
    let db = TestDb::new();
    let url = db.url().to_owned();
    let a = fed.a();
    let ca = fed.ca_path();
    let repo = MediaRepo::spawn_with_env(
        Some(db),
        &url,
        &[(a.server_name(), &a.client_url())],
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
        |c| {
            c["repo"]["port"] = json!(media_port);
            c["homeservers"][0]["signingKeyPath"] = json!(key_path);
            // The harness is all loopback.
            c["federation"] = json!({ "disallowedNetworks": [] });
        },
    );
    repo.wait_healthy();
    Deployment {
        fed,
        repo,
        _key_dir: key_dir,
    }
}

fn federation_requests(log: &[String], media_id: &str) -> usize {
    log.iter()
        .filter(|l| l.contains(&format!("/_matrix/federation/v1/media/download/{media_id}")))
        .count()
}

#[test]
fn two_synapses_exchange_media_through_mmrctl() {
    let d = deploy();
    let (a, b, tls) = (d.fed.a(), d.fed.b(), d.fed.certs());
    let (_, alice) = a.register_user("alice", false);
    let (_, bob) = b.register_user("bob", false);
    let bearer = |t: &str| format!("Bearer {t}");

    // alice@A uploads through A's front door: it lands in mmrctl.
    let file = sample(180_000, 7);
    let name = "日本 ☕.png";
    let up = tls.send(
        "POST",
        &format!("{}/_matrix/media/v3/upload?filename={}", a.base_url(), support::encode(name)),
        &[("Authorization", &bearer(&alice))],
        Some("img/png"),
        &file,
    );
    assert_eq!(up.status, 200, "{}\n{}", up.text(), d.repo.log());
    let mxc = up.json()["content_uri"].as_str().unwrap().to_owned();
    let id = mxc.rsplit('/').next().unwrap().to_owned();
    assert_eq!(mxc, format!("mxc://{}/{id}", a.server_name()));
    assert_eq!(d.repo.media_rows(), 1);

    // bob@B downloads it: B's Synapse fetches it over federation from mmrctl (through A's nginx).
    let path = format!("/_matrix/client/v1/media/download/{}/{id}", a.server_name());
    let got = tls.get(&format!("{}{path}", b.base_url()), &[("Authorization", &bearer(&bob))]);
    assert_eq!(got.status, 200, "{}\nB's log:\n{}\nrepo:\n{}", got.text(), b.synapse().log(), d.repo.log());
    assert_eq!(got.body, file);
    assert_eq!(got.header("content-type"), Some("img/png"));
    let disposition = got.header("content-disposition").unwrap_or_default().to_owned();
    assert!(
        disposition.contains("%E6%97%A5%E6%9C%AC%20%E2%98%95.png"),
        "the Unicode name round-trips: {disposition}"
    );
    assert_eq!(federation_requests(&a.access_log(), &id), 1, "{:#?}", a.access_log());

    // bob@B uploads to B's own media repo; alice@A downloads it through mmrctl, which signs as A
    // with the merged key, and B verifies that against A's published keys.
    let bob_file = sample(90_000, 8);
    let up = tls.send(
        "POST",
        &format!("{}/_matrix/media/v3/upload?filename=bob.bin", b.base_url()),
        &[("Authorization", &bearer(&bob))],
        Some("application/x-bob"),
        &bob_file,
    );
    assert_eq!(up.status, 200, "{}", up.text());
    let bob_id = up.json()["content_uri"].as_str().unwrap().rsplit('/').next().unwrap().to_owned();
    let path = format!("/_matrix/client/v1/media/download/{}/{bob_id}", b.server_name());
    let url = format!("{}{path}", a.base_url());
    let got = tls.get(&url, &[("Authorization", &bearer(&alice))]);
    assert_eq!(got.status, 200, "{}\nrepo:\n{}\nB:\n{}", got.text(), d.repo.log(), b.synapse().log());
    assert_eq!(got.body, bob_file);
    assert_eq!(got.header("content-type"), Some("application/x-bob"));
    assert!(got.header("content-disposition").unwrap_or_default().contains("bob.bin"));
    assert_eq!(federation_requests(&b.access_log(), &bob_id), 1, "{:#?}", b.access_log());

    // Cached: no second federation request.
    let again = tls.get(&url, &[("Authorization", &bearer(&alice))]);
    assert_eq!((again.status, again.body == bob_file), (200, true));
    assert_eq!(federation_requests(&b.access_log(), &bob_id), 1);

    // An id B does not have.
    let missing = format!(
        "{}/_matrix/client/v1/media/download/{}/doesnotexist",
        a.base_url(),
        b.server_name()
    );
    let r = tls.get(&missing, &[("Authorization", &bearer(&alice))]);
    assert_eq!(r.status, 404, "{}", r.text());
}
