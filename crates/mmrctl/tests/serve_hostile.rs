//! `mmrctl serve` against hostile and careless clients: malformed tokens, slow and idle
//! connections, racing uploads, browsers' CORS preflights, bad input, forwarded headers, and
//! start-up errors that must say what is wrong. Each test reproduces a defect found by probing the
//! round-1 server, and fails on that code.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

mod support;

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{MediaRepo, SHARED_SECRET, sample};

const HS: &str = "example.test";
const OTHER: &str = "second.test";
const AUTH: &str = "Bearer test-shared-secret";

/// A "homeserver" that only counts the connections made to it and hangs up on each: whatever
/// reaches it fails the way an unreachable homeserver does, and the count says whether anything
/// reached it at all.
struct CountingHomeserver {
    port: u16,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingHomeserver {
    fn start() -> CountingHomeserver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = connections.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(stream);
            }
        });
        CountingHomeserver { port, connections }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn count(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn status_and_code(r: &testkit::http::Response) -> (u16, String) {
    (
        r.status,
        r.json()["errcode"].as_str().unwrap_or_default().to_owned(),
    )
}

fn wait_for_log(repo: &MediaRepo, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !repo.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "`{needle}` never logged:\n{}",
            repo.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn malformed_tokens_are_the_clients_error_and_never_back_off_the_homeserver() {
    let homeserver = CountingHomeserver::start();
    // backoffAt is 3 in every test config.
    let repo = MediaRepo::start(&[(HS, &homeserver.url())], |_| {});
    let config = |query: &str, auth: Option<&str>| {
        let mut headers = vec![("Host", HS)];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        repo.get(&format!("/_matrix/media/v3/config{query}"), &headers)
    };
    for _ in 0..10 {
        let r = config("?access_token=%0A", None);
        assert_eq!(
            status_and_code(&r),
            (401, "M_UNKNOWN_TOKEN".into()),
            "{}",
            r.text()
        );
        let r = config("?access_token=a%7Fb", None);
        assert_eq!(status_and_code(&r), (401, "M_UNKNOWN_TOKEN".into()));
    }
    let r = config("?access_token=", None);
    assert_eq!(status_and_code(&r), (401, "M_MISSING_TOKEN".into()));
    assert_eq!(
        homeserver.count(),
        0,
        "a malformed token never reaches the homeserver"
    );

    // A token that could be valid is checked: the homeserver hangs up, 502; it was not locked out.
    let r = config("", Some("Bearer plausible"));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(homeserver.count(), 1);

    // Real failures still open the backoff (to its longest window), and nothing is sent meanwhile.
    let mut statuses = Vec::new();
    for i in 0..10 {
        statuses.push(config("", Some(&format!("Bearer other-{i}"))).status);
    }
    assert_eq!(statuses.last(), Some(&503), "{statuses:?}");
    let reached = homeserver.count();
    assert!(
        reached < 11,
        "the backoff did not hold requests back: {reached}"
    );

    // A reload starts the backoff afresh: the next token is checked with the homeserver again.
    // The same file again: nothing about the homeserver changed.
    repo.signal("HUP");
    wait_for_log(&repo, "configuration reloaded");
    let r = config("", Some("Bearer after-reload"));
    assert_eq!(
        r.status,
        502,
        "a stale backoff survived the reload: {}",
        r.text()
    );
    assert_eq!(homeserver.count(), reached + 1);
}

/// The response in `read` has this status.
fn assert_status(read: &[u8], status: &str) {
    let text = String::from_utf8_lossy(read);
    assert!(text.starts_with(&format!("HTTP/1.1 {status}")), "{text}");
}

/// Connects and sends `bytes` (possibly an unfinished request).
fn connect(repo: &MediaRepo, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", repo.port)).unwrap();
    stream.write_all(bytes).unwrap();
    stream
}

/// Reads until the server closes the connection, at most `bound`; returns what was read, or
/// `None` when the connection was still open at the end of `bound`.
fn read_until_closed(stream: &mut TcpStream, bound: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + bound;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return Some(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Some(out),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None;
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// A repo with these connection timeouts (seconds).
fn repo_with_timeouts(header: u32, idle: u32, body: u32, send: u32) -> MediaRepo {
    MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["connections"] = json!({
            "headerReadTimeoutSeconds": header, "idleTimeoutSeconds": idle,
            "bodyTimeoutSeconds": body, "sendTimeoutSeconds": send,
        });
        c["repo"]["freezeUnauthenticatedMedia"] = false.into();
    })
}

/// How long a test waits for a connection to be closed: far beyond the timeout it tests, so that a
/// slow machine cannot fail it, and far below the 60 s of the others, so that only the one tested
/// can have closed it.
const CLOSED_WITHIN: Duration = Duration::from_secs(20);

#[test]
fn stalled_headers_and_bodies_are_cut_off_by_their_own_timeouts() {
    let repo = repo_with_timeouts(1, 60, 2, 60);
    let mut unfinished = connect(
        &repo,
        b"GET /healthz HTTP/1.1\r\nHost: example.test\r\nX-A: ",
    );
    let mut upload = connect(
        &repo,
        format!(
            "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: {HS}\r\nAuthorization: {AUTH}\r\n\
             Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        )
        .as_bytes(),
    );
    upload.write_all(&sample(10_000, 1)).unwrap();
    // Others are served meanwhile.
    assert_eq!(repo.get("/healthz", &[]).status, 200);

    let read = read_until_closed(&mut unfinished, CLOSED_WITHIN);
    assert!(
        read.is_some(),
        "unfinished headers: still open after {CLOSED_WITHIN:?}"
    );

    let read = read_until_closed(&mut upload, CLOSED_WITHIN).expect("a stalled upload stayed open");
    let text = String::from_utf8_lossy(&read);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("no data received for 2 s"), "{text}");
    assert_eq!(repo.objects(), 0);
    assert_eq!(repo.temp_files(), 0, "the stalled upload left a temp file");
    assert_eq!(repo.media_rows(), 0);
}

#[test]
fn idle_connections_are_closed_by_the_idle_timeout() {
    let repo = repo_with_timeouts(60, 1, 60, 60);
    let mut silent = connect(&repo, b"");
    let mut keep_alive = connect(
        &repo,
        b"GET /healthz HTTP/1.1\r\nHost: example.test\r\n\r\n",
    );
    assert!(
        read_until_closed(&mut silent, CLOSED_WITHIN).is_some(),
        "a silent connection stayed open"
    );
    let read = read_until_closed(&mut keep_alive, CLOSED_WITHIN)
        .expect("an idle keep-alive connection stayed open");
    assert_status(&read, "200");
}

#[test]
fn a_client_that_stops_reading_a_download_is_cut_off() {
    let repo = repo_with_timeouts(60, 60, 60, 2);
    let body = sample(48 * 1024 * 1024, 2);
    let id = repo.upload(HS, SHARED_SECRET, "application/octet-stream", None, &body);
    let mut stream = connect(
        &repo,
        format!("GET /_matrix/media/v3/download/{HS}/{id} HTTP/1.1\r\nHost: {HS}\r\n\r\n")
            .as_bytes(),
    );
    // Not reading: the socket buffers fill and the server's writes block. The send timeout is 2 s.
    thread::sleep(Duration::from_secs(8));
    let read = read_until_closed(&mut stream, CLOSED_WITHIN).expect("the connection stayed open");
    assert!(read.starts_with(b"HTTP/1.1 200"));
    assert!(
        read.len() < body.len(),
        "the whole body arrived ({} bytes): the writes never blocked, so nothing was tested",
        read.len()
    );
    assert_eq!(repo.get("/healthz", &[]).status, 200);
}

#[test]
fn oversized_headers_are_refused_and_many_idle_connections_hold_little_memory() {
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |_| {});
    let mut big = connect(
        &repo,
        format!(
            "GET /healthz HTTP/1.1\r\nHost: {HS}\r\nX-Big: {}\r\n\r\n",
            "a".repeat(20_000)
        )
        .as_bytes(),
    );
    let read = read_until_closed(&mut big, CLOSED_WITHIN).expect("stayed open");
    assert_status(&read, "431");

    // 1000 connections each holding nearly the most header bytes allowed (16 KiB by default).
    let before = rss_kib(&repo);
    let header = format!(
        "GET /healthz HTTP/1.1\r\nHost: {HS}\r\nX-Pad: {}",
        "b".repeat(15_000)
    );
    let held: Vec<TcpStream> = (0..1000)
        .map(|_| connect(&repo, header.as_bytes()))
        .collect();
    // Every one of them has reached the server before memory is read.
    assert_eq!(repo.get("/healthz", &[]).status, 200);
    thread::sleep(Duration::from_secs(1));
    let during = rss_kib(&repo);
    eprintln!("RSS before {before} KiB, with 1000 half-sent requests {during} KiB");
    // Round 1 grew by ~340 MiB here; a bounded head buffer is at most 32 KiB a connection.
    assert!(
        during < before + 64 * 1024,
        "1000 idle connections took {} KiB",
        during - before
    );
    drop(held);
}

fn rss_kib(repo: &MediaRepo) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", repo.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn connections_beyond_the_cap_wait_until_one_closes() {
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["connections"] = json!({ "maxConnections": 3 })
    });
    let mut held: Vec<TcpStream> = (0..3).map(|_| connect(&repo, b"")).collect();
    // Make sure the three are accepted (and hold their slots) before the fourth comes.
    thread::sleep(Duration::from_millis(500));
    let mut fourth = connect(
        &repo,
        format!("GET /healthz HTTP/1.1\r\nHost: {HS}\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    fourth
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut buf = [0u8; 64];
    match fourth.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("the fourth connection was served past the cap: {other:?}"),
    }
    drop(held.pop());
    let read = read_until_closed(&mut fourth, CLOSED_WITHIN).expect("never served");
    assert_status(&read, "200");
}

#[test]
fn concurrent_uploads_cannot_pass_a_quota_together() {
    for (quota, expected) in [
        (json!({ "maxFiles": 3 }), 3),
        (json!({ "maxBytes": 25000 }), 2),
    ] {
        let mut user = json!({ "glob": "@sharedsecret" });
        user.as_object_mut()
            .unwrap()
            .extend(quota.as_object().unwrap().clone());
        let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
            c["uploads"] = json!({ "quotas": { "enabled": true, "users": [user] } })
        });
        let repo = Arc::new(repo);
        let barrier = Arc::new(Barrier::new(10));
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let (repo, barrier) = (repo.clone(), barrier.clone());
                thread::spawn(move || {
                    let body = sample(9000, 100 + i);
                    barrier.wait();
                    repo.upload_response(HS, SHARED_SECRET, "image/png", None, &body)
                })
            })
            .collect();
        let responses: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let ok = responses.iter().filter(|r| r.status == 200).count();
        assert_eq!(
            ok,
            expected,
            "{quota}: {:?}",
            responses.iter().map(|r| r.status).collect::<Vec<_>>()
        );
        for r in responses.iter().filter(|r| r.status != 200) {
            assert_eq!(
                status_and_code(r),
                (403, "M_FORBIDDEN".into()),
                "{}",
                r.text()
            );
            assert!(r.text().contains("quota"), "{}", r.text());
        }
        assert_eq!(repo.media_rows(), expected as i64, "{quota}");
        assert_eq!(repo.objects(), expected, "refused uploads leave no object");
        assert_eq!(repo.temp_files(), 0);
    }
}

#[test]
fn concurrent_creates_cannot_pass_max_pending_together() {
    let repo = Arc::new(MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["uploads"] = json!({ "maxPending": 2 })
    }));
    let barrier = Arc::new(Barrier::new(10));
    let handles: Vec<_> = (0..10)
        .map(|_| {
            let (repo, barrier) = (repo.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                repo.create(HS).status
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        8,
        "{statuses:?}"
    );
}

const CORS_HEADERS: [(&str, &str); 3] = [
    ("access-control-allow-origin", "*"),
    (
        "access-control-allow-methods",
        "GET, HEAD, POST, PUT, DELETE, OPTIONS",
    ),
    (
        "access-control-allow-headers",
        "X-Requested-With, Content-Type, Authorization, Date",
    ),
];

fn assert_cors(r: &testkit::http::Response, what: &str) {
    for (name, value) in CORS_HEADERS {
        assert_eq!(
            r.header(name),
            Some(value),
            "{what}: {name} ({:?})",
            r.headers
        );
    }
    let allowed = r
        .header("access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("content-type"));
}

#[test]
fn browsers_preflight_and_every_response_carries_cors_headers() {
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |_| {});
    let id = repo.upload(HS, SHARED_SECRET, "image/png", None, &sample(1000, 3));
    let preflight = [
        ("POST", "/_matrix/media/v3/upload".to_owned()),
        ("PUT", format!("/_matrix/media/v3/upload/{HS}/abc")),
        ("POST", "/_matrix/media/v1/create".to_owned()),
        (
            "GET",
            format!("/_matrix/client/v1/media/download/{HS}/{id}"),
        ),
        (
            "GET",
            format!("/_matrix/client/v1/media/thumbnail/{HS}/{id}?width=32&height=32"),
        ),
        (
            "GET",
            format!("/_matrix/media/v3/thumbnail/{HS}/{id}?width=32&height=32"),
        ),
        ("GET", "/_matrix/client/v1/media/config".to_owned()),
        ("GET", "/_matrix/media/v3/config".to_owned()),
    ];
    for (method, path) in preflight {
        let r = repo.send(
            "OPTIONS",
            &path,
            &[
                ("Host", HS),
                ("Origin", "https://app.element.io"),
                ("Access-Control-Request-Method", method),
                (
                    "Access-Control-Request-Headers",
                    "authorization,content-type",
                ),
            ],
            None,
            b"",
        );
        assert!(
            matches!(r.status, 200 | 204),
            "OPTIONS {path}: {} {}",
            r.status,
            r.text()
        );
        assert_cors(&r, &format!("OPTIONS {path}"));
    }
    // Errors carry them too: a browser can only read an error it is allowed to see.
    let missing_token = repo.get(
        "/_matrix/client/v1/media/config",
        &[("Host", HS), ("Origin", "https://app.element.io")],
    );
    assert_eq!(missing_token.status, 401);
    assert_cors(&missing_token, "401");
    let unknown = repo.get("/_matrix/nothing/here", &[("Host", HS)]);
    assert_eq!(unknown.status, 404);
    assert_cors(&unknown, "404");
    let not_allowed = repo.send(
        "PATCH",
        "/_matrix/media/v3/upload",
        &[("Host", HS)],
        None,
        b"",
    );
    assert_eq!(not_allowed.status, 405);
    assert_cors(&not_allowed, "405");
    let upload = repo.upload_response(HS, SHARED_SECRET, "image/png", None, &sample(10, 4));
    assert_cors(&upload, "upload");
    let download = repo.download(HS, &id, &[]);
    assert_eq!(download.status, 200);
    assert_cors(&download, "download");
}

#[test]
fn bad_input_is_a_400_that_says_what_is_wrong() {
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["accessTokens"] = json!({
            "maxCacheTimeSeconds": 600, "useLocalAppserviceConfig": true,
            "appservices": [{ "id": "bridge", "asToken": "as-secret", "senderUserId": "@bridge:example.test",
                              "userNamespaces": [{ "regex": "@bridge_.*:example.test" }] }]
        })
    });
    let upload = |query: &str, token: &str| {
        repo.send(
            "POST",
            &format!("/_matrix/media/v3/upload{query}"),
            &[("Host", HS), ("Authorization", &format!("Bearer {token}"))],
            Some("text/plain"),
            &sample(200, 5),
        )
    };
    let r = upload("?filename=a%00b", SHARED_SECRET);
    assert_eq!(
        status_and_code(&r),
        (400, "M_INVALID_PARAM".into()),
        "{}",
        r.text()
    );
    assert!(r.text().contains("NUL"), "{}", r.text());
    assert!(r.header("retry-after").is_none());
    let r = upload(&format!("?filename={}", "x".repeat(300)), SHARED_SECRET);
    assert_eq!(
        status_and_code(&r),
        (400, "M_INVALID_PARAM".into()),
        "{}",
        r.text()
    );
    for user in [
        "%40bridge_a%00%3Aexample.test",
        "nobody",
        "%40%3Aexample.test",
    ] {
        let r = upload(&format!("?user_id={user}"), "as-secret");
        assert_eq!(
            status_and_code(&r),
            (400, "M_INVALID_PARAM".into()),
            "{user}: {}",
            r.text()
        );
    }
    assert_eq!(repo.objects(), 0);
    assert_eq!(upload("?filename=fine.txt", SHARED_SECRET).status, 200);
}

/// Sends one raw request and returns the status line and body.
fn raw_request(repo: &MediaRepo, request: &str) -> (String, String) {
    let mut stream = connect(repo, request.as_bytes());
    let read = read_until_closed(&mut stream, CLOSED_WITHIN).expect("no answer");
    let text = String::from_utf8_lossy(&read).into_owned();
    let status = text.lines().next().unwrap_or_default().to_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn the_homeserver_of_a_request_is_chosen_strictly() {
    let repo = MediaRepo::start(
        &[(HS, "http://127.0.0.1:9"), (OTHER, "http://127.0.0.1:9")],
        |c| {
            c["accessTokens"] = json!({
                "maxCacheTimeSeconds": 600, "useLocalAppserviceConfig": true,
                "appservices": [{ "id": "bridge", "asToken": "as-secret", "senderUserId": "@bridge:example.test",
                                  "userNamespaces": [] }]
            })
        },
    );
    // A user of example.test cannot create media for second.test by naming it in a header.
    for headers in [
        vec![("Host", OTHER)],
        vec![("Host", HS), ("X-Forwarded-Host", OTHER)],
    ] {
        let mut all = headers.clone();
        all.push(("Authorization", "Bearer as-secret"));
        let r = repo.send(
            "POST",
            "/_matrix/media/v3/upload",
            &all,
            Some("text/plain"),
            &[b'x'; 200],
        );
        assert_eq!(
            status_and_code(&r),
            (403, "M_FORBIDDEN".into()),
            "{headers:?}: {}",
            r.text()
        );
        assert!(r.text().contains("@bridge:example.test"), "{}", r.text());
    }
    let r = repo.send(
        "POST",
        "/_matrix/media/v3/upload",
        &[("Host", HS), ("Authorization", "Bearer as-secret")],
        Some("text/plain"),
        &[b'x'; 200],
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // An unknown host is told so, without the list of the names served.
    let r = repo.get(
        "/_matrix/media/v3/config",
        &[("Host", "elsewhere.test"), ("Authorization", AUTH)],
    );
    assert_eq!(r.status, 404);
    let error = r.json()["error"].as_str().unwrap().to_owned();
    assert!(error.contains("`elsewhere.test`"), "{error}");
    assert!(!error.contains(HS) && !error.contains(OTHER), "{error}");

    // Two Host headers: refused.
    let (status, body) = raw_request(
        &repo,
        &format!(
            "GET /_matrix/media/v3/config HTTP/1.1\r\nHost: {HS}\r\nHost: {OTHER}\r\n\
             Authorization: {AUTH}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(status.starts_with("HTTP/1.1 400"), "{status} {body}");
    assert!(body.contains("Host"), "{body}");

    // An absolute-form target names the homeserver, whatever Host says.
    let (status, body) = raw_request(
        &repo,
        &format!(
            "POST http://{OTHER}/_matrix/media/v3/upload HTTP/1.1\r\nHost: {HS}\r\n\
             Authorization: {AUTH}\r\nContent-Type: text/plain\r\nContent-Length: 200\r\n\
             Connection: close\r\n\r\n{}",
            "y".repeat(200)
        ),
    );
    assert!(status.starts_with("HTTP/1.1 200"), "{status} {body}");
    assert!(body.contains(&format!("mxc://{OTHER}/")), "{body}");
}

#[test]
fn a_database_that_cannot_be_used_stops_the_server_with_postgres_reason() {
    let server = testkit::TestDb::new();
    let pg = support::pg();
    // A role that may connect but not create tables (PostgreSQL 15 and later: not in `public`).
    let role = format!("{}_limited", server.name());
    let mut admin = server.client();
    admin
        .batch_execute(&format!("CREATE ROLE \"{role}\" LOGIN"))
        .unwrap();
    for (url, reason) in [
        (
            format!(
                "postgres://{role}@{}:{}/{}",
                pg.host,
                pg.port,
                server.name()
            ),
            "cannot apply the schema: ERROR: permission denied for schema public",
        ),
        (
            server.url().replace(server.name(), "no_such_database_here"),
            "database \"no_such_database_here\" does not exist",
        ),
        (
            format!(
                "postgres://no_such_role@{}:{}/{}",
                pg.host,
                pg.port,
                server.name()
            ),
            "role \"no_such_role\" does not exist",
        ),
    ] {
        let mut repo = MediaRepo::spawn(None, &url, &[(HS, "http://127.0.0.1:9")], |_| {});
        let status = repo.wait_exit(Duration::from_secs(30));
        assert!(!status.success(), "{status}");
        let log = repo.log();
        assert!(log.contains(reason), "{log}");
        assert!(log.contains(&format!("{}:{}", pg.host, pg.port)), "{log}");
        assert!(
            !log.contains("retrying"),
            "an error retrying cannot fix was retried:\n{log}"
        );
        assert_eq!(
            log.matches(reason).count(),
            1,
            "the reason is said once:\n{log}"
        );
    }
    drop(admin);
    drop(server);
    testkit::TestDb::new()
        .client()
        .batch_execute(&format!("DROP ROLE \"{role}\""))
        .unwrap();
}

#[test]
fn an_unreachable_database_is_named_and_waited_for() {
    let server = testkit::TestDb::new();
    let pg = support::pg();
    // A port where nothing listens yet; a relay to the real server opens there later.
    let port = support::free_port();
    let url = format!("postgres://{}@127.0.0.1:{port}/{}", pg.user, server.name());
    let repo = MediaRepo::spawn(None, &url, &[(HS, "http://127.0.0.1:9")], |_| {});
    wait_for_log(&repo, "the database is unreachable; retrying");
    let log = repo.log();
    assert!(log.contains(&format!("127.0.0.1:{port}")), "{log}");
    assert!(log.contains(server.name()), "{log}");
    assert!(log.contains("Connection refused"), "{log}");

    let relay = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let target = format!("{}:{}", pg.host, pg.port);
    thread::spawn(move || {
        for client in relay.incoming().flatten() {
            let upstream = TcpStream::connect(&target).unwrap();
            let (mut from_client, mut to_upstream) =
                (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            thread::spawn(move || std::io::copy(&mut from_client, &mut to_upstream).ok());
            let (mut from_upstream, mut to_client) = (upstream, client);
            thread::spawn(move || std::io::copy(&mut from_upstream, &mut to_client).ok());
        }
    });
    repo.wait_healthy();
}

#[test]
fn config_errors_are_said_once_and_unknown_keys_with_their_line() {
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["repo"]["colour"] = "blue".into()
    });
    let text = std::fs::read_to_string(repo.config_path()).unwrap();
    let line = text
        .lines()
        .position(|l| l.trim_start().starts_with("colour:"))
        .unwrap()
        + 1;
    let log = repo.log();
    assert!(
        log.contains(&format!("`repo.colour` (line {line})")),
        "{log}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("media-repo.yaml");
    std::fs::write(&path, "repo:\n  port: [not a port\n").unwrap();
    let run = support::run(
        std::process::Command::new(env!("CARGO_BIN_EXE_mmrctl"))
            .args(["serve", "--config"])
            .arg(&path),
    );
    assert_ne!(run.code, 0);
    let error_lines: Vec<&str> = run.log.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(error_lines.len(), 1, "{}", run.log);
    let first = error_lines[0];
    let message = first.trim_start_matches("error: ");
    let path_text = path.display().to_string();
    assert_eq!(first.matches(&path_text).count(), 1, "{first}");
    // The message does not repeat itself (a wrapper printing its source again).
    let half = message.len() / 2;
    assert!(
        !message[half..].contains(&message[..half.min(30)]),
        "{first}"
    );
}
