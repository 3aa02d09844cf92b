//! Two real Synapses federating over TLS on loopback, A's media routed by nginx to `mmrctl
//! serve` (its key merged into A's key file): B's users get A's media from mmrctl, and A's users
//! get B's media through mmrctl, which signs as A and which B verifies.

#![allow(clippy::unwrap_used)] // Test helpers panic: that is how a test fails.

mod support;

use base64::Engine as _;
use keys::{KeyFile, KeyFormat, SigningKey};
use serde_json::json;
use support::{MediaRepo, sample};
use testkit::{Federation, HomeserverSetup, TestDb, free_port};

struct Deployment {
    fed: Federation,
    /// mmrctl for A, and for B when B has one too.
    repos: Vec<MediaRepo>,
    _key_dir: tempfile::TempDir,
}

/// A media repo's key: the file mmrctl reads, and the line merged into its homeserver's file.
fn repo_key(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    let key = SigningKey::generate().unwrap();
    let seed = base64::engine::general_purpose::STANDARD_NO_PAD.encode(key.seed());
    let line = format!("ed25519 {} {seed}", key.id().version());
    let path = dir.join(name);
    std::fs::write(
        &path,
        KeyFile::new(KeyFormat::Mmr, vec![key]).to_text(KeyFormat::Mmr),
    )
    .unwrap();
    (path, line)
}

/// A's media served by mmrctl, and B's too when `both`.
fn deploy(both: bool) -> Deployment {
    let key_dir = tempfile::tempdir().unwrap();
    let ports = [free_port(), free_port()];
    let keys = [
        repo_key(key_dir.path(), "a.signing.key"),
        repo_key(key_dir.path(), "b.signing.key"),
    ];
    let setup = |i: usize| {
        HomeserverSetup::default()
            .media_upstream(ports[i])
            .extra_signing_key(&keys[i].1)
    };
    let fed = Federation::builder()
        .a(setup(0))
        .b(if both {
            setup(1)
        } else {
            HomeserverSetup::default()
        })
        .start();
    let ca = fed.ca_path();
    let mut repos = Vec::new();
    for (i, hs) in [fed.a(), fed.b()]
        .into_iter()
        .enumerate()
        .take(if both { 2 } else { 1 })
    {
        let db = TestDb::new();
        let url = db.url().to_owned();
        let repo = MediaRepo::spawn_with_env(
            Some(db),
            &url,
            &[(hs.server_name(), &hs.client_url())],
            &[("SSL_CERT_FILE", ca.to_str().unwrap())],
            |c| {
                c["repo"]["port"] = json!(ports[i]);
                c["homeservers"][0]["signingKeyPath"] = json!(keys[i].0);
                // The harness is all loopback.
                c["federation"] = json!({ "disallowedNetworks": [] });
            },
        );
        repo.wait_healthy();
        repos.push(repo);
    }
    Deployment {
        fed,
        repos,
        _key_dir: key_dir,
    }
}

/// Federation downloads of `media_id` in an nginx access log. nginx writes a line just after it
/// answered, so a count that should have grown is read again for a moment.
fn federation_requests(log: impl Fn() -> Vec<String>, media_id: &str, at_least: usize) -> usize {
    let count = || {
        log()
            .iter()
            .filter(|l| l.contains(&format!("/_matrix/federation/v1/media/download/{media_id}")))
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut n = count();
    while n < at_least && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        n = count();
    }
    n
}

/// Uploads `body` as `name` through `hs`'s front door with `token`; returns the mxc URI.
fn upload(
    tls: &testkit::TestCerts,
    hs: &testkit::Homeserver,
    token: &str,
    name: &str,
    content_type: &str,
    body: &[u8],
) -> String {
    let up = tls.send(
        "POST",
        &format!(
            "{}/_matrix/media/v3/upload?filename={}",
            hs.base_url(),
            support::encode(name)
        ),
        &[("Authorization", &format!("Bearer {token}"))],
        Some(content_type),
        body,
    );
    assert_eq!(up.status, 200, "{}", up.text());
    up.json()["content_uri"].as_str().unwrap().to_owned()
}

#[test]
fn two_synapses_exchange_media_through_mmrctl() {
    let d = deploy(false);
    let (a, b, tls) = (d.fed.a(), d.fed.b(), d.fed.certs());
    let (_, alice) = a.register_user("alice", false);
    let (_, bob) = b.register_user("bob", false);
    let bearer = |t: &str| format!("Bearer {t}");

    // alice@A uploads through A's front door: it lands in mmrctl.
    let file = sample(180_000, 7);
    let name = "日本 ☕.png";
    let mxc = upload(tls, a, &alice, name, "img/png", &file);
    let id = mxc.rsplit('/').next().unwrap().to_owned();
    assert_eq!(mxc, format!("mxc://{}/{id}", a.server_name()));
    assert_eq!(d.repos[0].media_rows(), 1);

    // bob@B downloads it: B's Synapse fetches it over federation from mmrctl (through A's nginx).
    let path = format!("/_matrix/client/v1/media/download/{}/{id}", a.server_name());
    let got = tls.get(
        &format!("{}{path}", b.base_url()),
        &[("Authorization", &bearer(&bob))],
    );
    assert_eq!(
        got.status,
        200,
        "{}\nB's log:\n{}\nrepo:\n{}",
        got.text(),
        b.synapse().log(),
        d.repos[0].log()
    );
    assert_eq!(got.body, file);
    assert_eq!(got.header("content-type"), Some("img/png"));
    let disposition = got
        .header("content-disposition")
        .unwrap_or_default()
        .to_owned();
    assert!(
        disposition.contains("%E6%97%A5%E6%9C%AC%20%E2%98%95.png"),
        "the Unicode name round-trips: {disposition}"
    );
    assert_eq!(
        federation_requests(|| a.access_log(), &id, 1),
        1,
        "{:#?}",
        a.access_log()
    );

    // bob@B uploads to B's own media repo; alice@A downloads it through mmrctl, which signs as A
    // with the merged key, and B verifies that against A's published keys.
    let bob_file = sample(90_000, 8);
    let bob_mxc = upload(tls, b, &bob, "bob.bin", "application/x-bob", &bob_file);
    let bob_id = bob_mxc.rsplit('/').next().unwrap().to_owned();
    let path = format!(
        "/_matrix/client/v1/media/download/{}/{bob_id}",
        b.server_name()
    );
    let url = format!("{}{path}", a.base_url());
    let got = tls.get(&url, &[("Authorization", &bearer(&alice))]);
    assert_eq!(
        got.status,
        200,
        "{}\nrepo:\n{}\nB:\n{}",
        got.text(),
        d.repos[0].log(),
        b.synapse().log()
    );
    assert_eq!(got.body, bob_file);
    assert_eq!(got.header("content-type"), Some("application/x-bob"));
    assert!(
        got.header("content-disposition")
            .unwrap_or_default()
            .contains("bob.bin")
    );
    assert_eq!(
        federation_requests(|| b.access_log(), &bob_id, 1),
        1,
        "{:#?}",
        b.access_log()
    );

    // Cached: no second federation request.
    let again = tls.get(&url, &[("Authorization", &bearer(&alice))]);
    assert_eq!((again.status, again.body == bob_file), (200, true));
    assert_eq!(federation_requests(|| b.access_log(), &bob_id, 1), 1);

    // alice@A's thumbnail of bob@B's photo: mmrctl downloads the original over federation (as
    // Synapse does, never B's thumbnail endpoint) and makes the thumbnail itself.
    let photo = {
        let image = image::RgbImage::from_fn(1024, 768, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 40])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    };
    let photo_mxc = upload(tls, b, &bob, "photo.jpg", "image/jpeg", &photo);
    let photo_id = photo_mxc.rsplit('/').next().unwrap().to_owned();
    let thumb_url = format!(
        "{}/_matrix/client/v1/media/thumbnail/{}/{photo_id}?width=96&height=96&method=crop",
        a.base_url(),
        b.server_name()
    );
    let thumb = tls.get(&thumb_url, &[("Authorization", &bearer(&alice))]);
    assert_eq!(
        thumb.status,
        200,
        "{}\nrepo:\n{}",
        thumb.text(),
        d.repos[0].log()
    );
    assert_eq!(thumb.header("content-type"), Some("image/jpeg"));
    let decoded = image::load_from_memory(&thumb.body).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (96, 96));
    assert_eq!(federation_requests(|| b.access_log(), &photo_id, 1), 1);
    assert!(
        !b.access_log()
            .iter()
            .any(|l| l.contains("/_matrix/federation/v1/media/thumbnail/")),
        "B's thumbnail endpoint is never asked"
    );

    // An id B does not have.
    let missing = format!(
        "{}/_matrix/client/v1/media/download/{}/doesnotexist",
        a.base_url(),
        b.server_name()
    );
    let r = tls.get(&missing, &[("Authorization", &bearer(&alice))]);
    assert_eq!(r.status, 404, "{}", r.text());
}

#[test]
fn two_mmrctl_instances_federate_with_each_other() {
    let d = deploy(true);
    let (a, b, tls) = (d.fed.a(), d.fed.b(), d.fed.certs());
    let (_, alice) = a.register_user("alice", false);
    let (_, bob) = b.register_user("bob", false);
    let bearer = |t: &str| format!("Bearer {t}");
    let file = sample(250_000, 9);
    let mxc = upload(tls, a, &alice, "a.txt", "text/plain", &file);
    let id = mxc.rsplit('/').next().unwrap().to_owned();
    // bob@B asks B's mmrctl, which signs as B with B's merged key; A's mmrctl verifies it
    // against B's published keys and answers multipart, which B's mmrctl reads.
    let url = format!(
        "{}/_matrix/client/v1/media/download/{}/{id}",
        b.base_url(),
        a.server_name()
    );
    let got = tls.get(&url, &[("Authorization", &bearer(&bob))]);
    assert_eq!(
        got.status,
        200,
        "{}\nA:\n{}\nB:\n{}",
        got.text(),
        d.repos[0].log(),
        d.repos[1].log()
    );
    assert_eq!(got.body, file);
    assert!(
        got.header("content-disposition")
            .unwrap_or_default()
            .contains("a.txt")
    );
    assert_eq!(federation_requests(|| a.access_log(), &id, 1), 1);
    // The client got the bytes as they arrived; the row follows once they are stored.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while d.repos[1].media_rows() == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(d.repos[1].media_rows(), 1, "cached on B");
    let again = tls.get(&url, &[("Authorization", &bearer(&bob))]);
    assert_eq!((again.status, again.body == file), (200, true));
    assert_eq!(federation_requests(|| a.access_log(), &id, 1), 1);
}
