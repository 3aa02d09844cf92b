//! Federation media against a scripted remote (TLS through a real nginx, the test CA trusted by
//! `mmrctl serve` through `SSL_CERT_FILE`): remote media for our users with the spec's fallbacks,
//! faults and backoff, and our media for other servers behind X-Matrix.

#![allow(clippy::unwrap_used)] // Test helpers panic: that is how a test fails.

mod support;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keys::{KeyFile, KeyFormat, SigningKey};
use serde_json::{Value, json};
use support::remote::{Action, FakeRemote};
use support::{MediaRepo, SHARED_SECRET, sample};
use testkit::TestDb;

const HS: &str = "hs.test";

struct Setup {
    remote: FakeRemote,
    repo: MediaRepo,
    key: SigningKey,
    _key_dir: tempfile::TempDir,
}

/// Our repo for `HS` (signing with a key of its own) and one fake remote; loopback allowed for
/// federation, small limits so that faults show quickly.
fn setup(tweak: impl FnOnce(&mut Value, &FakeRemote)) -> Setup {
    setup_with(FakeRemote::start(), tweak)
}

fn setup_with(remote: FakeRemote, tweak: impl FnOnce(&mut Value, &FakeRemote)) -> Setup {
    let key = SigningKey::generate().unwrap();
    let key_dir = tempfile::tempdir().unwrap();
    let key_path = key_dir.path().join("mmr.signing.key");
    std::fs::write(
        &key_path,
        KeyFile::new(KeyFormat::Mmr, vec![key.clone()]).to_text(KeyFormat::Mmr),
    )
    .unwrap();
    let db = TestDb::new();
    let url = db.url().to_owned();
    let ca = remote.certs.ca_path();
    let ca = ca.to_str().unwrap();
    let repo = MediaRepo::spawn_with_env(
        Some(db),
        &url,
        &[(HS, "http://127.0.0.1:9")],
        &[("SSL_CERT_FILE", ca)],
        |c| {
            c["homeservers"][0]["signingKeyPath"] = json!(key_path);
            c["federation"] = json!({ "backoffAt": 3, "disallowedNetworks": [] });
            c["timeouts"] = json!({ "federationTimeoutSeconds": 3 });
            c["downloads"] = json!({ "maxBytes": 1 << 20, "failureCacheMinutes": 0 });
            c["uploads"] = json!({ "minBytes": 0 });
            tweak(c, &remote);
        },
    );
    repo.wait_healthy();
    Setup {
        remote,
        repo,
        key,
        _key_dir: key_dir,
    }
}

impl Setup {
    /// A local client's authenticated download of `mxc://{server}/{id}`.
    fn client_download(&self, server: &str, id: &str) -> testkit::http::Response {
        let auth = format!("Bearer {SHARED_SECRET}");
        self.repo.get(
            &format!("/_matrix/client/v1/media/download/{server}/{id}"),
            &[("Host", HS), ("Authorization", &auth)],
        )
    }

    fn download(&self, id: &str) -> testkit::http::Response {
        self.client_download(&self.remote.name, id)
    }

    /// `GET uri` on the repo as the remote, with `authorization` headers.
    fn inbound(&self, uri: &str, authorization: &[&str]) -> testkit::http::Response {
        let mut headers = vec![("Host", HS)];
        headers.extend(authorization.iter().map(|a| ("Authorization", *a)));
        self.repo.get(uri, &headers)
    }
}

fn errcode(r: &testkit::http::Response) -> String {
    r.json()["errcode"].as_str().unwrap_or("").to_owned()
}

/// The signature a remote sees is ours, over exactly what it received.
fn assert_signed_by(key: &SigningKey, seen: &support::remote::Seen, destination: &str) {
    let header = seen
        .authorization
        .first()
        .unwrap_or_else(|| panic!("{} was not signed", seen.target));
    let x = federation::xmatrix::parse(header).unwrap();
    assert_eq!(
        (x.origin.as_str(), x.destination.as_deref()),
        (HS, Some(destination))
    );
    assert_eq!(x.key, key.id().to_string());
    let mut signed = keys::request_json(HS, destination, "GET", &seen.target, None);
    signed["signatures"] = json!({ HS: { x.key.clone(): x.sig } });
    keys::verify_json(&signed, HS, key.id(), &key.verifying_key()).unwrap();
    assert_eq!(
        seen.host, destination,
        "Host names the server, port included"
    );
}

#[test]
fn remote_media_is_fetched_signed_once_and_cached() {
    let s = setup(|_, _| {});
    let file = sample(300_000, 1);
    s.remote.route(
        &FakeRemote::federation_path("good"),
        Action::multipart(
            "img/png",
            Some("inline; filename*=utf-8''%E6%97%A5%E6%9C%AC%20%E2%98%95.png"),
            &file,
        ),
    );
    s.remote.route(
        &FakeRemote::federation_path("live"),
        Action::multipart("text/plain", None, &file),
    );
    let (head, complete) = raw_download(&s, "live");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert!(complete, "{head}");
    let r = s.download("good");
    assert_eq!(r.status, 200, "{}\n{}", r.text(), s.repo.log());
    assert_eq!(r.body, file);
    assert_eq!(r.header("content-type"), Some("img/png"));
    let disposition = r.header("content-disposition").unwrap();
    assert!(
        disposition.contains("%E6%97%A5%E6%9C%AC%20%E2%98%95.png"),
        "{disposition}"
    );
    let fetches: Vec<_> = s
        .remote
        .seen()
        .into_iter()
        .filter(|r| r.path() == FakeRemote::federation_path("good"))
        .collect();
    assert_eq!(fetches.len(), 1);
    assert!(
        fetches[0].target.contains("timeout_ms="),
        "{}",
        fetches[0].target
    );
    assert_signed_by(&s.key, &fetches[0], &s.remote.name);

    // Cached: served again with no request to the remote.
    let again = s.download("good");
    assert_eq!((again.status, again.body == file), (200, true));
    assert_eq!(s.remote.count(&FakeRemote::federation_path("good")), 1);
    // Frozen unauthenticated media: the legacy endpoint neither serves it nor fetches.
    let legacy = s.repo.get(
        &format!("/_matrix/media/v3/download/{}/good", s.remote.name),
        &[("Host", HS)],
    );
    assert_eq!(legacy.status, 404);
    s.remote.route(
        &FakeRemote::federation_path("uncached"),
        Action::multipart("text/plain", None, b"x"),
    );
    let legacy = s.repo.get(
        &format!("/_matrix/media/v3/download/{}/uncached", s.remote.name),
        &[("Host", HS)],
    );
    assert_eq!(legacy.status, 404);
    assert_eq!(s.remote.count(&FakeRemote::federation_path("uncached")), 0);
    // Remote content equal to local content is one object (`live` and `good` are the same
    // bytes, and so is this upload).
    s.repo.upload(HS, SHARED_SECRET, "image/png", None, &file);
    assert_eq!(s.repo.objects(), 1);
    assert_eq!(s.repo.media_rows(), 3);

    // An id the remote does not have.
    s.remote.route(
        &FakeRemote::federation_path("gone"),
        Action::json(404, json!({"errcode": "M_NOT_FOUND", "error": "nope"})),
    );
    let gone = s.download("gone");
    assert_eq!((gone.status, errcode(&gone)), (404, "M_NOT_FOUND".into()));
    assert_eq!(
        s.remote.count(&s.remote.legacy_path("gone")),
        0,
        "no fallback on M_NOT_FOUND"
    );
}

#[test]
fn legacy_fallback_only_for_an_unknown_endpoint() {
    let s = setup(|_, _| {});
    // Unknown endpoint (the remote's default answer is 404 M_UNRECOGNIZED): the legacy download.
    s.remote.route(
        &s.remote.legacy_path("old"),
        Action::file(
            "text/plain",
            Some("attachment; filename=\"old.txt\""),
            b"legacy bytes",
        ),
    );
    let r = s.download("old");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, b"legacy bytes");
    assert!(r.header("content-disposition").unwrap().contains("old.txt"));
    let legacy: Vec<_> = s
        .remote
        .seen()
        .into_iter()
        .filter(|r| r.path() == s.remote.legacy_path("old"))
        .collect();
    assert_eq!(legacy.len(), 1);
    assert!(
        legacy[0].target.contains("allow_remote=false"),
        "{}",
        legacy[0].target
    );
    assert_signed_by(&s.key, &legacy[0], &s.remote.name);

    // A 404 that is not JSON means the same (an old server's router).
    s.remote.route(
        &FakeRemote::federation_path("html"),
        Action::Respond {
            status: 404,
            headers: vec![("Content-Type".into(), "text/html".into())],
            body: b"<html>Not Found</html>".to_vec(),
        },
    );
    s.remote.route(
        &s.remote.legacy_path("html"),
        Action::file("text/plain", None, b"via legacy"),
    );
    assert_eq!(s.download("html").body, b"via legacy");

    // 404 M_NOT_FOUND and other errors: no fallback.
    for (id, status, body) in [
        ("nf", 404, json!({"errcode": "M_NOT_FOUND"})),
        ("denied", 403, json!({"errcode": "M_FORBIDDEN"})),
        ("broken", 500, json!({"errcode": "M_UNKNOWN"})),
    ] {
        s.remote
            .route(&FakeRemote::federation_path(id), Action::json(status, body));
        s.remote.route(
            &s.remote.legacy_path(id),
            Action::file("text/plain", None, b"wrong"),
        );
        let r = s.download(id);
        assert_eq!(
            r.status,
            if status == 404 { 404 } else { 502 },
            "{id}: {}",
            r.text()
        );
        assert_eq!(s.remote.count(&s.remote.legacy_path(id)), 0, "{id}");
    }
}

#[test]
fn location_parts_relative_and_absolute() {
    let s = setup(|_, _| {});
    s.remote.route(
        &FakeRemote::federation_path("rel"),
        Action::location("/cdn/rel.txt"),
    );
    s.remote.route(
        "/cdn/rel.txt",
        Action::file(
            "text/x-cdn",
            Some("inline; filename=\"cdn.txt\""),
            b"from the cdn",
        ),
    );
    let abs = format!("https://{}/cdn/abs.bin", s.remote.name);
    s.remote
        .route(&FakeRemote::federation_path("abs"), Action::location(&abs));
    s.remote.route(
        "/cdn/abs.bin",
        Action::file("application/x-abs", None, b"absolute"),
    );
    let rel = s.download("rel");
    assert_eq!(
        (rel.status, rel.body.as_slice()),
        (200, &b"from the cdn"[..]),
        "{}",
        rel.text()
    );
    assert_eq!(rel.header("content-type"), Some("text/x-cdn"));
    assert!(
        rel.header("content-disposition")
            .unwrap()
            .contains("cdn.txt")
    );
    let abs = s.download("abs");
    assert_eq!(
        (abs.status, abs.body.as_slice()),
        (200, &b"absolute"[..]),
        "{}",
        abs.text()
    );
    // The CDN URL is fetched without our signature.
    let cdn: Vec<_> = s
        .remote
        .seen()
        .into_iter()
        .filter(|r| r.path().starts_with("/cdn/"))
        .collect();
    assert_eq!(cdn.len(), 2);
    assert!(cdn.iter().all(|r| r.authorization.is_empty()));
}

/// A client download read off the socket: the response head, and whether the chunked body
/// ended with its terminating chunk.
fn raw_download(s: &Setup, id: &str) -> (String, bool) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", s.repo.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET /_matrix/client/v1/media/download/{}/{id} HTTP/1.1\r\nHost: {HS}\r\n\
         Authorization: Bearer {SHARED_SECRET}\r\nConnection: close\r\n\r\n",
        s.remote.name
    )
    .unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    let head = text.split("\r\n\r\n").next().unwrap_or("").to_owned();
    (head, got.ends_with(b"\r\n0\r\n\r\n"))
}

#[test]
fn broken_remotes_fail_and_leave_nothing() {
    let s = setup(|_, _| {});
    let file = sample(200_000, 2);
    let (content_type, body) = support::remote::multipart_body("text/plain", None, &file);
    let mut stalled = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    stalled.extend_from_slice(&body[..body.len() / 2]);
    s.remote
        .route(&FakeRemote::federation_path("half"), Action::Stall(stalled));
    s.remote.route(
        &FakeRemote::federation_path("huge"),
        Action::multipart("text/plain", None, &sample((1 << 20) + 1, 3)),
    );
    s.remote
        .route(&FakeRemote::federation_path("hang"), Action::Hang);
    // The part's bytes end without the delimiter that closes it: a truncated transfer.
    let mut cut = body.clone();
    cut.truncate(body.len() - 40);
    s.remote.route(
        &FakeRemote::federation_path("cut"),
        Action::Respond {
            status: 200,
            headers: vec![("Content-Type".into(), content_type.clone())],
            body: cut,
        },
    );
    // The client that starts a fetch gets the bytes as they arrive; its body fails when the
    // remote's does (it never looks complete).
    let (head, complete) = raw_download(&s, "half");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!complete, "a cut transfer must not end like a complete one");
    // A request that waits for the stored file (here: with a range) gets the error.
    for (id, code) in [
        ("half", "M_UNKNOWN"),
        ("huge", "M_TOO_LARGE"),
        ("hang", "M_UNKNOWN"),
        ("cut", "M_UNKNOWN"),
    ] {
        let auth = format!("Bearer {SHARED_SECRET}");
        let r = s.repo.get(
            &format!("/_matrix/client/v1/media/download/{}/{id}", s.remote.name),
            &[
                ("Host", HS),
                ("Authorization", &auth),
                ("Range", "bytes=0-"),
            ],
        );
        assert_eq!(
            (r.status, errcode(&r)),
            (502, code.to_owned()),
            "{id}: {}",
            r.text()
        );
    }
    assert_eq!(s.repo.media_rows(), 0);
    assert_eq!(s.repo.objects(), 0);
    assert_eq!(s.repo.temp_files(), 0);
}

#[test]
fn a_failing_server_is_paused_and_a_signed_request_from_it_resumes_it() {
    let s = setup(|c, _| c["federation"]["backoffAt"] = json!(2));
    for id in ["e1", "e2"] {
        s.remote.route(
            &FakeRemote::federation_path(id),
            Action::json(502, json!({})),
        );
        assert_eq!(s.download(id).status, 502);
    }
    s.remote.route(
        &FakeRemote::federation_path("ok"),
        Action::multipart("text/plain", None, b"fine now"),
    );
    let paused = s.download("ok");
    assert_eq!(paused.status, 502);
    assert!(
        paused.text().contains("not asked again"),
        "{}",
        paused.text()
    );
    assert_eq!(s.remote.count(&FakeRemote::federation_path("ok")), 0);

    // The remote asks us for something, signed: it is up again.
    let id = s
        .repo
        .upload(HS, SHARED_SECRET, "text/plain", None, b"ours");
    let uri = format!("/_matrix/federation/v1/media/download/{id}");
    let r = s.inbound(&uri, &[&s.remote.sign(HS, &uri)]);
    assert_eq!(r.status, 200, "{}", r.text());
    let ok = s.download("ok");
    assert_eq!((ok.status, ok.body.as_slice()), (200, &b"fine now"[..]));
}

#[test]
fn ignored_hosts_are_neither_asked_nor_answered() {
    let s = setup(|c, remote| c["federation"]["ignoredHosts"] = json!([remote.name]));
    s.remote.route(
        &FakeRemote::federation_path("x"),
        Action::multipart("text/plain", None, b"x"),
    );
    assert_eq!(s.download("x").status, 404);
    assert_eq!(s.remote.seen().len(), 0);
    let id = s
        .repo
        .upload(HS, SHARED_SECRET, "text/plain", None, b"ours");
    let uri = format!("/_matrix/federation/v1/media/download/{id}");
    let r = s.inbound(&uri, &[&s.remote.sign(HS, &uri)]);
    assert_eq!((r.status, errcode(&r)), (403, "M_FORBIDDEN".into()));
    assert_eq!(
        s.remote.count("/_matrix/key"),
        0,
        "not even its keys are fetched"
    );
}

/// Counts connections to `addr`; never answers.
fn counting_listener(addr: &str) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind(addr).unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for _ in listener.incoming() {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    });
    (port, count)
}

#[test]
fn refused_addresses_are_never_contacted() {
    // Loopback allowed except 127.0.0.5.
    let s = setup(|c, _| c["federation"]["disallowedNetworks"] = json!(["127.0.0.5/32"]));
    let (port, connections) = counting_listener("127.0.0.5:0");
    let r = s.client_download(&format!("127.0.0.5:{port}"), "abc");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(connections.load(Ordering::SeqCst), 0);

    // The default lists refuse loopback altogether: the remote is not reached.
    let d = setup(|c, _| {
        c["federation"] = json!({});
    });
    d.remote.route(
        &FakeRemote::federation_path("x"),
        Action::multipart("text/plain", None, b"x"),
    );
    let r = d.download("x");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(d.remote.seen().len(), 0);
}

#[test]
fn concurrent_first_requests_make_one_fetch() {
    let s = setup(|_, _| {});
    let file = sample(512 * 1024, 4);
    s.remote.route(
        &FakeRemote::federation_path("c"),
        Action::After(
            Duration::from_millis(500),
            Box::new(Action::multipart("application/octet-stream", None, &file)),
        ),
    );
    let s = Arc::new(s);
    let bodies: Vec<_> = (0..20)
        .map(|_| {
            let s = s.clone();
            std::thread::spawn(move || {
                let r = s.download("c");
                (r.status, r.body)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for (status, body) in &bodies {
        assert_eq!(*status, 200);
        assert!(body == &file);
    }
    assert_eq!(s.remote.count(&FakeRemote::federation_path("c")), 1);
    assert_eq!(s.repo.media_rows(), 1);
    assert_eq!(s.repo.objects(), 1);
}

/// `n` more instances on the config, database and datastore of `s`, on ports of their own.
fn more_instances(s: &Setup, n: usize) -> Vec<MediaRepo> {
    let ca = s.remote.certs.ca_path();
    (0..n)
        .map(|i| {
            let mut config = s.repo.config.clone();
            let port = support::free_port();
            config["repo"]["port"] = json!(port);
            config["metrics"]["port"] = json!(support::free_port());
            let path = s.repo.dir.path().join(format!("instance-{i}.yaml"));
            std::fs::write(&path, serde_norway::to_string(&config).unwrap()).unwrap();
            MediaRepo::start_with_config_file(
                &path,
                port,
                None,
                &[("SSL_CERT_FILE", ca.to_str().unwrap())],
            )
        })
        .collect()
}

#[test]
fn failures_and_pauses_are_shared_by_the_instances() {
    let s = setup(|c, _| {
        c["downloads"]["failureCacheMinutes"] = json!(10);
        c["federation"]["backoffAt"] = json!(1);
    });
    let others = more_instances(&s, 2);
    let (a, b, c) = (&s.repo, &others[0], &others[1]);
    let not_found = json!({ "errcode": "M_NOT_FOUND", "error": "no such media" });
    s.remote.route(
        &FakeRemote::federation_path("gone"),
        Action::json(404, not_found),
    );
    s.remote.route(
        &FakeRemote::federation_path("broken"),
        Action::json(500, json!({ "errcode": "M_UNKNOWN", "error": "boom" })),
    );
    s.remote.route(
        &FakeRemote::federation_path("fine"),
        Action::multipart("text/plain", None, b"fine"),
    );
    let name = s.remote.name.clone();
    let get = |repo: &MediaRepo, id: &str| {
        repo.get(
            &format!("/_matrix/client/v1/media/download/{name}/{id}"),
            &[
                ("Host", HS),
                ("Authorization", &format!("Bearer {SHARED_SECRET}")),
            ],
        )
        .status
    };
    // A media the remote does not have: asked once, whichever instance is asked after.
    assert_eq!(get(a, "gone"), 404);
    assert_eq!((get(b, "gone"), get(c, "gone")), (404, 404));
    assert_eq!(s.remote.count(&FakeRemote::federation_path("gone")), 1);
    // A failing server (backoffAt 1) is paused for every instance.
    assert_ne!(get(a, "broken"), 200);
    assert_ne!(get(b, "fine"), 200);
    assert_ne!(get(c, "fine"), 200);
    assert_eq!(s.remote.count(&FakeRemote::federation_path("fine")), 0);
    assert_eq!(s.remote.count(&FakeRemote::federation_path("broken")), 1);
}

#[test]
fn concurrent_first_requests_over_three_instances_make_one_fetch() {
    let s = setup(|_, _| {});
    let others = more_instances(&s, 2);
    let file = sample(512 * 1024, 5);
    s.remote.route(
        &FakeRemote::federation_path("m"),
        Action::After(
            Duration::from_millis(500),
            Box::new(Action::multipart("application/octet-stream", None, &file)),
        ),
    );
    let name = s.remote.name.clone();
    let repos: Vec<&MediaRepo> = std::iter::once(&s.repo).chain(&others).collect();
    let answers: Vec<(u16, Vec<u8>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let (repo, name) = (repos[i % 3], &name);
                scope.spawn(move || {
                    let r = repo.get(
                        &format!("/_matrix/client/v1/media/download/{name}/m"),
                        &[
                            ("Host", HS),
                            ("Authorization", &format!("Bearer {SHARED_SECRET}")),
                        ],
                    );
                    (r.status, r.body)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (status, body) in &answers {
        assert_eq!(*status, 200);
        assert!(body == &file);
    }
    assert_eq!(
        s.remote.count(&FakeRemote::federation_path("m")),
        1,
        "one fetch for all three instances"
    );
    assert_eq!(s.repo.media_rows(), 1);
    assert_eq!(s.repo.objects(), 1);
}

/// `(boundary, part-2 headers, file)` of our multipart answer, checked byte for byte against
/// the layout Synapse's parser needs.
fn parse_ours(r: &testkit::http::Response) -> (String, String, Vec<u8>) {
    let content_type = r.header("content-type").unwrap();
    let boundary = content_type
        .strip_prefix("multipart/mixed; boundary=")
        .unwrap_or_else(|| panic!("{content_type}"))
        .to_owned();
    assert!(boundary.len() == 32 && boundary.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        r.header("content-length").unwrap(),
        r.body.len().to_string()
    );
    let part1 = format!(
        "\r\n--{boundary}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{boundary}\r\n"
    );
    assert!(r.body.starts_with(part1.as_bytes()), "{}", r.text());
    let rest = &r.body[part1.len()..];
    let end = rest.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let headers = String::from_utf8(rest[..end].to_vec()).unwrap();
    let tail = format!("\r\n--{boundary}--\r\n");
    assert!(r.body.ends_with(tail.as_bytes()));
    let file = rest[end + 4..rest.len() - tail.len()].to_vec();
    (boundary, headers, file)
}

#[test]
fn our_media_for_servers_that_sign() {
    let s = setup(|_, _| {});
    let file = sample(70_000, 5);
    let id = s
        .repo
        .upload(HS, SHARED_SECRET, "text/plain", Some("notes ☕.txt"), &file);
    let uri = format!("/_matrix/federation/v1/media/download/{id}");
    let r = s.inbound(&uri, &[&s.remote.sign(HS, &uri)]);
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, headers, body) = parse_ours(&r);
    assert_eq!(body, file);
    assert_eq!(
        headers,
        "Content-Type: text/plain\r\nContent-Disposition: inline; filename*=utf-8''notes%20%E2%98%95.txt"
    );
    // A 0-byte file.
    let empty = s.repo.upload(HS, SHARED_SECRET, "text/plain", None, b"");
    let uri0 = format!("/_matrix/federation/v1/media/download/{empty}");
    let r = s.inbound(&uri0, &[&s.remote.sign(HS, &uri0)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(parse_ours(&r).2, b"");

    // Synapse's own header form, and liberal variants of it.
    let x = federation::xmatrix::parse(&s.remote.sign(HS, &uri)).unwrap();
    let variants = [
        format!(
            "X-Matrix origin=\"{}\",key=\"{}\",sig=\"{}\",destination=\"{HS}\"",
            x.origin, x.key, x.sig
        ),
        format!(
            "x-matrix  SIG=\"{}\" , Key={},\tdestination={HS}, Origin={}",
            x.sig, x.key, x.origin
        ),
        format!("X-Matrix origin={},key={},sig={}", x.origin, x.key, x.sig),
    ];
    for v in &variants {
        let r = s.inbound(&uri, &[v]);
        assert_eq!(r.status, 200, "{v}: {}", r.text());
    }

    let unauthorized = |r: testkit::http::Response, why: &str| {
        assert_eq!(
            (r.status, errcode(&r)),
            (401, "M_UNAUTHORIZED".to_owned()),
            "{why}: {}",
            r.text()
        );
    };
    unauthorized(s.inbound(&uri, &[]), "no header");
    unauthorized(
        s.inbound(&uri, &[&format!("Bearer {SHARED_SECRET}")]),
        "a client token",
    );
    unauthorized(
        s.inbound(&uri, &[&s.remote.sign("other.test", &uri)]),
        "wrong destination",
    );
    unauthorized(
        s.inbound(&uri, &[&s.remote.sign(HS, &uri0)]),
        "signature over another URI",
    );
    unauthorized(
        s.inbound(&format!("{uri}?timeout_ms=1"), &[&s.remote.sign(HS, &uri)]),
        "query not signed",
    );
    let stranger = SigningKey::generate().unwrap();
    let unknown = keys::sign_request(&stranger, &s.remote.name, HS, "GET", &uri, None).unwrap();
    unauthorized(s.inbound(&uri, &[&unknown]), "unknown key");
    let forged = s
        .remote
        .sign(HS, &uri)
        .replace(&x.sig, &x.sig.chars().rev().collect::<String>());
    unauthorized(s.inbound(&uri, &[&forged]), "bad signature");
    for malformed in [
        "X-Matrix",
        "X-Matrix origin=",
        "X-Matrix origin=\"a,key=b",
        "X-Matrix key=\"ed25519:a\",sig=\"x\"",
    ] {
        unauthorized(s.inbound(&uri, &[malformed]), malformed);
    }
    // Unknown media.
    let missing = "/_matrix/federation/v1/media/download/nonexistent";
    let r = s.inbound(missing, &[&s.remote.sign(HS, missing)]);
    assert_eq!((r.status, errcode(&r)), (404, "M_NOT_FOUND".into()));
}

/// The remote's key answer: `keys` listed, valid for `valid_for_ms` from now (negative: expired),
/// self-signed by the first.
fn key_answer(remote: &FakeRemote, keys: &[&SigningKey], valid_for_ms: i64) -> Action {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let listed: serde_json::Map<String, Value> = keys
        .iter()
        .map(|k| (k.id().to_string(), json!({ "key": k.public_key_base64() })))
        .collect();
    let mut answer = json!({
        "server_name": remote.name,
        "verify_keys": listed,
        "old_verify_keys": {},
        "valid_until_ts": now + valid_for_ms,
    });
    keys::sign_json(&mut answer, &remote.name, keys[0]).unwrap();
    Action::json(200, answer)
}

#[test]
fn a_key_past_its_validity_never_authenticates() {
    let s = setup(|_, _| {});
    s.remote.route(
        "/_matrix/key/v2/server",
        key_answer(&s.remote, &[&s.remote.key], -60_000),
    );
    let id = s
        .repo
        .upload(HS, SHARED_SECRET, "text/plain", None, b"ours");
    let uri = format!("/_matrix/federation/v1/media/download/{id}");
    let r = s.inbound(&uri, &[&s.remote.sign(HS, &uri)]);
    assert_eq!(
        (r.status, errcode(&r)),
        (401, "M_UNAUTHORIZED".into()),
        "{}",
        r.text()
    );
}

#[test]
fn keys_are_refetched_for_a_new_key_id_but_not_for_every_forged_one() {
    let s = setup(|_, _| {});
    let id = s
        .repo
        .upload(HS, SHARED_SECRET, "text/plain", None, b"ours");
    let uri = format!("/_matrix/federation/v1/media/download/{id}");
    let signed_with =
        |k: &SigningKey| keys::sign_request(k, &s.remote.name, HS, "GET", &uri, None).unwrap();
    let key_fetches = || s.remote.count("/_matrix/key/v2/server");
    let old = s.remote.key.clone();
    assert_eq!(s.inbound(&uri, &[&signed_with(&old)]).status, 200);
    assert_eq!(key_fetches(), 1);
    // Cached: no fetch for a known key.
    assert_eq!(s.inbound(&uri, &[&signed_with(&old)]).status, 200);
    assert_eq!(key_fetches(), 1);

    // The remote publishes a new key: its first use fetches the keys again.
    let new = SigningKey::generate().unwrap();
    s.remote.route(
        "/_matrix/key/v2/server",
        key_answer(&s.remote, &[&old, &new], 3_600_000),
    );
    let r = s.inbound(&uri, &[&signed_with(&new)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(key_fetches(), 2);

    // A key id nobody published, right after: refused with no new fetch.
    let forged = SigningKey::generate().unwrap();
    assert_eq!(s.inbound(&uri, &[&signed_with(&forged)]).status, 401);
    assert_eq!(key_fetches(), 2);

    // Later, with the key server failing: the refetch fails, the cached keys stay good.
    s.remote
        .route("/_matrix/key/v2/server", Action::json(500, json!({})));
    std::thread::sleep(Duration::from_millis(5_500));
    assert_eq!(s.inbound(&uri, &[&signed_with(&forged)]).status, 401);
    assert_eq!(key_fetches(), 3);
    assert_eq!(s.inbound(&uri, &[&signed_with(&old)]).status, 200);
    assert_eq!(s.inbound(&uri, &[&signed_with(&new)]).status, 200);
    assert_eq!(key_fetches(), 3);
}

#[test]
fn one_origin_and_destination_per_request() {
    let s = setup(|_, _| {});
    let id = s
        .repo
        .upload(HS, SHARED_SECRET, "text/plain", None, b"ours");
    let uri = format!("/_matrix/federation/v1/media/download/{id}");
    let good = s.remote.sign(HS, &uri);
    let other = keys::sign_request(&s.remote.key, "other.test", HS, "GET", &uri, None).unwrap();
    let r = s.inbound(&uri, &[&good, &other]);
    assert_eq!(r.status, 401, "mixed origins: {}", r.text());
    // A bad signature beside a good one of the same origin: the good one counts.
    let bad = good.replace("sig=\"", "sig=\"AAAA");
    assert_eq!(s.inbound(&uri, &[&bad, &good]).status, 200);
    let many: Vec<&str> = std::iter::repeat_n(good.as_str(), 5).collect();
    assert_eq!(s.inbound(&uri, &many).status, 401, "too many headers");
    assert_eq!(s.remote.count("/_matrix/key/v2/server"), 1);
}

#[test]
fn a_server_waits_for_a_pending_upload() {
    let s = setup(|_, _| {});
    let created = s.repo.create(HS);
    assert_eq!(created.status, 200, "{}", created.text());
    let mxc = created.json()["content_uri"].as_str().unwrap().to_owned();
    let id = mxc.rsplit('/').next().unwrap().to_owned();
    let s = Arc::new(s);
    let waiter = {
        let s = s.clone();
        let uri = format!("/_matrix/federation/v1/media/download/{id}?timeout_ms=20000");
        std::thread::spawn(move || s.inbound(&uri, &[&s.remote.sign(HS, &uri)]))
    };
    std::thread::sleep(Duration::from_millis(300));
    let auth = format!("Bearer {SHARED_SECRET}");
    let put = s.repo.send(
        "PUT",
        &format!("/_matrix/media/v3/upload/{HS}/{id}"),
        &[("Host", HS), ("Authorization", &auth)],
        Some("text/plain"),
        b"arrived later",
    );
    assert_eq!(put.status, 200, "{}", put.text());
    let r = waiter.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(parse_ours(&r).2, b"arrived later");
}

#[test]
fn servers_are_found_through_well_known_and_srv() {
    // wk.test delegates to deleg.test (well-known on 127.0.0.21:443), whose SRV record points at
    // the remote's nginx; DNS is a server the test runs, and nothing here leaves loopback.
    let dns = testkit::DnsServer::start();
    let remote = FakeRemote::start_with_names(&["wk.test", "deleg.test"]);
    dns.add_a("wk.test", std::net::Ipv4Addr::new(127, 0, 0, 21));
    dns.add_srv(
        "_matrix-fed._tcp.deleg.test",
        10,
        5,
        remote.port,
        "fed.test.",
    );
    dns.add_a("fed.test", std::net::Ipv4Addr::LOCALHOST);
    let well_known = testkit::Nginx::start(
        &format!(
            r#"server {{
  listen 127.0.0.21:443 ssl;
  ssl_certificate "{cert}";
  ssl_certificate_key "{key}";
  location = /.well-known/matrix/server {{
    default_type application/json;
    add_header Cache-Control "max-age=3600";
    return 200 '{{"m.server": "deleg.test"}}';
  }}
}}"#,
            cert = remote.certs.cert_path().display(),
            key = remote.certs.key_path().display(),
        ),
        &[],
    );
    // Nginx::start waits on 127.0.0.1 ports only.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect("127.0.0.21:443").is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            well_known.error_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = setup_with(remote, |c, _| {
        c["federation"]["nameservers"] = json!([dns.addr().to_string()]);
    });
    for id in ["one", "two"] {
        s.remote.route(
            &FakeRemote::federation_path(id),
            Action::multipart("text/plain", None, id.as_bytes()),
        );
        let r = s.client_download("wk.test", id);
        assert_eq!(
            (r.status, r.text()),
            (200, id.to_owned()),
            "{}",
            s.repo.log()
        );
    }
    let fetched: Vec<_> = s
        .remote
        .seen()
        .into_iter()
        .filter(|r| r.path().starts_with("/_matrix/federation/"))
        .collect();
    assert_eq!(fetched.len(), 2);
    for seen in &fetched {
        // Host and certificate are the delegated name; the signature names the server.
        assert_eq!(seen.host, "deleg.test");
        let x = federation::xmatrix::parse(&seen.authorization[0]).unwrap();
        assert_eq!(x.destination.as_deref(), Some("wk.test"));
    }
    // Cached: one well-known fetch, one SRV lookup for both downloads.
    let wk_requests = well_known
        .access_log()
        .iter()
        .filter(|l| l.contains("/.well-known/matrix/server"))
        .count();
    assert_eq!(wk_requests, 1, "{:#?}", well_known.access_log());
    assert_eq!(dns.queries_of("_matrix-fed._tcp.deleg.test", "SRV"), 1);
}

#[test]
fn the_legacy_download_for_older_servers() {
    // Media from before the freeze (here: no freeze) is what older servers may fetch this way.
    let s = setup(|c, _| c["repo"]["freezeUnauthenticatedMedia"] = json!(false));
    let id = s
        .repo
        .upload(HS, SHARED_SECRET, "text/plain", None, b"old style");
    // Signed, as Synapse signs its fallback: the header is not mistaken for a client's token.
    let uri = format!("/_matrix/media/v3/download/{HS}/{id}?allow_remote=false");
    let r = s.inbound(&uri, &[&s.remote.sign(HS, &uri)]);
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"old style"[..]),
        "{}",
        r.text()
    );
    // `allow_remote=false`: remote media not cached here is not fetched.
    s.remote.route(
        &FakeRemote::federation_path("r"),
        Action::multipart("text/plain", None, b"remote"),
    );
    let remote_uri = format!(
        "/_matrix/media/v3/download/{}/r?allow_remote=false",
        s.remote.name
    );
    let r = s.repo.get(&remote_uri, &[("Host", HS)]);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(s.remote.seen().len(), 0);
    // Without it, the legacy endpoint fetches (nothing is frozen).
    let r = s.repo.get(
        &remote_uri.replace("?allow_remote=false", ""),
        &[("Host", HS)],
    );
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"remote"[..]),
        "{}",
        r.text()
    );
}

/// Complement's `TestFederationThumbnail`: a server signing with its own key gets our thumbnail,
/// byte for byte the client endpoint's of the same size; unsigned, nothing.
#[test]
fn our_thumbnails_for_servers_that_sign() {
    let s = setup(|_, _| {});
    let photo = {
        let image = image::RgbImage::from_fn(1200, 900, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    };
    let id = s
        .repo
        .upload(HS, SHARED_SECRET, "image/jpeg", Some("photo.jpg"), &photo);
    let query = "width=320&height=240&method=scale";
    let uri = format!("/_matrix/federation/v1/media/thumbnail/{id}?{query}");
    // The first request makes it (served from memory), the second reads it back: both equal.
    for _ in 0..2 {
        let r = s.inbound(&uri, &[&s.remote.sign(HS, &uri)]);
        assert_eq!(r.status, 200, "{}", r.text());
        let (_, headers, body) = parse_ours(&r);
        assert!(
            headers.starts_with("Content-Type: image/jpeg\r\n"),
            "{headers}"
        );
        let client = s.repo.get_as(
            HS,
            &format!("/_matrix/client/v1/media/thumbnail/{HS}/{id}?{query}"),
        );
        assert_eq!(client.status, 200);
        assert_eq!(body, client.body);
        let thumb = image::load_from_memory(&body).unwrap();
        assert_eq!((thumb.width(), thumb.height()), (320, 240));
    }
    assert_eq!(s.inbound(&uri, &[]).status, 401);
    // The query is signed too: a different size under the same signature is refused.
    let other = format!("/_matrix/federation/v1/media/thumbnail/{id}?width=96&height=96");
    assert_eq!(s.inbound(&other, &[&s.remote.sign(HS, &uri)]).status, 401);
    // Missing size: 400, after authentication.
    let bad = format!("/_matrix/federation/v1/media/thumbnail/{id}");
    let r = s.inbound(&bad, &[&s.remote.sign(HS, &bad)]);
    assert_eq!((r.status, errcode(&r).as_str()), (400, "M_MISSING_PARAM"));
}
