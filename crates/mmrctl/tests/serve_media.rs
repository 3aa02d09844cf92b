//! `mmrctl serve` end to end, on a real PostgreSQL: the media endpoints, dedup, limits and errors.
//! Checks named `complement_N_*` follow the Complement-derived checklist (peers-and-style.md D.3).
//! These use the shared secret as the token; `serve_synapse.rs` uses real Synapse tokens.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

mod support;

use std::thread;

use serde_json::Value;
use support::{MediaRepo, SHARED_SECRET, encode, sample};

const HS: &str = "example.test";
const AUTH: &str = "Bearer test-shared-secret";

fn repo() -> MediaRepo {
    MediaRepo::start(
        &[
            (HS, "http://127.0.0.1:9"),
            ("second.test", "http://127.0.0.1:9"),
        ],
        |_| {},
    )
}

fn with_freeze(on: bool) -> MediaRepo {
    MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["repo"]["freezeUnauthenticatedMedia"] = on.into()
    })
}

fn download(repo: &MediaRepo, media_id: &str, suffix: &str) -> testkit::http::Response {
    repo.get(
        &format!("/_matrix/client/v1/media/download/{HS}/{media_id}{suffix}"),
        &[("Host", HS), ("Authorization", AUTH)],
    )
}

#[test]
fn complement_1_upload_then_download_returns_the_bytes_and_the_exact_content_type() {
    let repo = with_freeze(false);
    let body = sample(70_000, 1);
    let id = repo.upload(HS, SHARED_SECRET, "img/png", None, &body);
    for path in [
        format!("/_matrix/media/v3/download/{HS}/{id}"),
        format!("/_matrix/media/r0/download/{HS}/{id}"),
        format!("/_matrix/client/v1/media/download/{HS}/{id}"),
    ] {
        let r = repo.get(&path, &[("Host", HS), ("Authorization", AUTH)]);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.body, body, "{path}");
        assert_eq!(r.header("content-type"), Some("img/png"), "{path}");
        assert_eq!(
            r.header("cross-origin-resource-policy"),
            Some("cross-origin")
        );
        assert!(
            r.header("content-security-policy")
                .unwrap()
                .starts_with("sandbox;")
        );
    }
}

#[test]
fn frozen_media_is_served_only_on_the_authenticated_endpoint() {
    let repo = with_freeze(true);
    let id = repo.upload(HS, SHARED_SECRET, "text/plain", None, &sample(200, 20));
    let r = repo.get(
        &format!("/_matrix/media/v3/download/{HS}/{id}"),
        &[("Host", HS)],
    );
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["errcode"], "M_NOT_FOUND");
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("/_matrix/client/v1/media/download")
    );
    assert_eq!(download(&repo, &id, "").status, 200);
}

#[test]
fn complement_2_tokens_are_required_and_unknown_paths_are_unrecognized() {
    let repo = repo();
    let id = repo.upload(HS, SHARED_SECRET, "image/png", None, &sample(1000, 2));
    let path = format!("/_matrix/client/v1/media/download/{HS}/{id}");
    let r = repo.get(&path, &[("Host", HS)]);
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (401, Some("M_MISSING_TOKEN"))
    );
    // The homeserver cannot be reached to check this token: a clear 502, not a 401.
    let r = repo.get(&path, &[("Host", HS), ("Authorization", "Bearer nope")]);
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("Cannot reach the homeserver example.test")
    );

    for path in [
        "/_matrix/media/unknown",
        "/_matrix/media/v3/unknown",
        "/_matrix/media/v3/download/a/b/c/d",
    ] {
        let r = repo.get(path, &[("Host", HS)]);
        assert_eq!(
            (r.status, r.json()["errcode"].as_str()),
            (404, Some("M_UNRECOGNIZED")),
            "{path}"
        );
    }
    let r = repo.send(
        "PATCH",
        "/_matrix/media/v3/upload",
        &[("Host", HS)],
        None,
        b"",
    );
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (405, Some("M_UNRECOGNIZED"))
    );
    let r = repo.send(
        "POST",
        "/_matrix/media/v9/upload",
        &[("Host", HS), ("Authorization", AUTH)],
        Some("text/plain"),
        b"x",
    );
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (404, Some("M_UNRECOGNIZED")),
        "unknown API version"
    );
    let r = repo.send(
        "POST",
        "/_matrix/media/v3/upload",
        &[("Host", HS)],
        Some("text/plain"),
        b"x",
    );
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (401, Some("M_MISSING_TOKEN"))
    );
}

#[test]
fn complement_3_content_disposition_round_trips_file_names() {
    let repo = repo();
    let body = sample(500, 3);
    for name in [
        "ascii",
        "name with spaces",
        "name;with;semicolons",
        "\u{2615} unicode \u{00e9}.png",
    ] {
        let id = repo.upload(HS, SHARED_SECRET, "image/png", Some(name), &body);
        let r = download(&repo, &id, "");
        let disposition = r.header("content-disposition").unwrap().to_owned();
        assert!(disposition.starts_with("inline;"), "{disposition}");
        assert_eq!(
            parse_filename(&disposition).as_deref(),
            Some(name),
            "{disposition}"
        );

        let other = "other \u{00fc}ber name.png";
        let r = download(&repo, &id, &format!("/{}", encode(other)));
        assert_eq!(
            parse_filename(r.header("content-disposition").unwrap()).as_deref(),
            Some(other)
        );
    }
    let plain = repo.upload(
        HS,
        SHARED_SECRET,
        "Text/Plain; charset=utf-8",
        Some("a.txt"),
        &body,
    );
    assert!(
        download(&repo, &plain, "")
            .header("content-disposition")
            .unwrap()
            .starts_with("inline")
    );
    let svg = repo.upload(
        HS,
        SHARED_SECRET,
        "image/svg+xml",
        Some("x.svg"),
        &sample(400, 4),
    );
    assert!(
        download(&repo, &svg, "")
            .header("content-disposition")
            .unwrap()
            .starts_with("attachment")
    );
    let none = repo.upload(
        HS,
        SHARED_SECRET,
        "application/octet-stream",
        None,
        &sample(300, 5),
    );
    assert_eq!(
        download(&repo, &none, "").header("content-disposition"),
        Some("attachment")
    );
}

/// The file name of a Content-Disposition value, from `filename="…"` or `filename*=utf-8''…`.
fn parse_filename(value: &str) -> Option<String> {
    for part in value.split(';').map(str::trim) {
        if let Some(v) = part.strip_prefix("filename*=utf-8''") {
            let bytes: Vec<u8> = percent_decode(v);
            return String::from_utf8(bytes).ok();
        }
    }
    let start = value.find("filename=\"")? + "filename=\"".len();
    let end = value[start..].find('"')? + start;
    Some(value[start..end].to_owned())
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() + 1 {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[test]
fn complement_4_async_upload() {
    let repo = repo();
    let create = |token: &str| {
        let r = repo.send(
            "POST",
            "/_matrix/media/v1/create",
            &[("Host", HS), ("Authorization", &format!("Bearer {token}"))],
            Some("application/json"),
            b"{}",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let json = r.json();
        assert!(json["unused_expires_at"].as_i64().unwrap() > 0);
        json["content_uri"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_owned()
    };
    let id = create(SHARED_SECRET);
    let r = repo.get(
        &format!("/_matrix/client/v1/media/download/{HS}/{id}?timeout_ms=100"),
        &[("Host", HS), ("Authorization", AUTH)],
    );
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (504, Some("M_NOT_YET_UPLOADED"))
    );
    assert!(r.json()["error"].is_string());

    // A download waiting on timeout_ms wakes as soon as the content lands.
    let body = sample(4096, 6);
    let waiter = {
        let url = repo.url(&format!(
            "/_matrix/client/v1/media/download/{HS}/{id}?timeout_ms=30000"
        ));
        thread::spawn(move || {
            let started = std::time::Instant::now();
            let r = testkit::http::get(&url, &[("Host", HS), ("Authorization", AUTH)]);
            (r, started.elapsed())
        })
    };
    thread::sleep(std::time::Duration::from_millis(500));
    let put = format!("/_matrix/media/v3/upload/{HS}/{id}");
    let r = repo.send(
        "PUT",
        &put,
        &[("Host", HS), ("Authorization", AUTH)],
        Some("image/png"),
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), Value::Object(Default::default()));
    let (r, waited) = waiter.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, body);
    assert_eq!(r.header("content-type"), Some("image/png"));
    assert!(
        waited < std::time::Duration::from_secs(20),
        "the waiting download was not woken: {waited:?}"
    );

    let r = repo.send(
        "PUT",
        &put,
        &[("Host", HS), ("Authorization", AUTH)],
        Some("image/png"),
        &body,
    );
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (409, Some("M_CANNOT_OVERWRITE_MEDIA"))
    );
    let r = repo.send(
        "PUT",
        &format!("/_matrix/media/v3/upload/{HS}/neverCreated"),
        &[("Host", HS), ("Authorization", AUTH)],
        Some("image/png"),
        &body,
    );
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (404, Some("M_NOT_FOUND"))
    );
}

#[test]
fn async_uploads_are_limited_by_max_pending() {
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["uploads"] = serde_json::json!({ "maxPending": 2 })
    });
    let create = || repo.create(HS);
    assert_eq!(create().status, 200);
    assert_eq!(create().status, 200);
    let r = create();
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (429, Some("M_LIMIT_EXCEEDED"))
    );
}

#[test]
fn complement_7_media_config_reports_the_upload_size() {
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["uploads"] = serde_json::json!({ "maxBytes": 1234567 })
    });
    for path in [
        "/_matrix/media/v3/config",
        "/_matrix/media/r0/config",
        "/_matrix/client/v1/media/config",
    ] {
        let r = repo.get(path, &[("Host", HS), ("Authorization", AUTH)]);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.json()["m.upload.size"], 1234567, "{path}");
    }
    let reported = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["uploads"] = serde_json::json!({ "maxBytes": 1000, "reportedMaxBytes": -1 })
    });
    let r = reported.get(
        "/_matrix/media/v3/config",
        &[("Host", HS), ("Authorization", AUTH)],
    );
    assert!(
        r.json().get("m.upload.size").is_none(),
        "-1 reports no limit: {}",
        r.text()
    );
}

#[test]
fn identical_content_is_stored_once_across_domains() {
    let repo = repo();
    let body = sample(5 * 1024 * 1024, 7);
    let a = repo.upload(
        HS,
        SHARED_SECRET,
        "application/octet-stream",
        Some("a.bin"),
        &body,
    );
    let b = repo.upload(
        "second.test",
        SHARED_SECRET,
        "video/mp4",
        Some("b.mp4"),
        &body,
    );
    assert_ne!(a, b);
    assert_eq!(repo.objects(), 1);
    let r = repo.get(
        &format!("/_matrix/client/v1/media/download/second.test/{b}"),
        &[("Host", "second.test"), ("Authorization", AUTH)],
    );
    assert_eq!(r.body, body);
    assert_eq!(r.header("content-type"), Some("video/mp4"));
    assert!(
        repo.metrics().contains("mmrctl_dedup_hits_total 1"),
        "{}",
        repo.metrics()
    );
}

#[test]
fn twenty_concurrent_identical_uploads_all_succeed_and_leave_one_object() {
    let repo = repo();
    let body = std::sync::Arc::new(sample(256 * 1024, 8));
    let ids: Vec<String> = thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let body = body.clone();
                let repo = &repo;
                s.spawn(move || repo.upload(HS, SHARED_SECRET, "image/png", None, &body))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 20);
    assert_eq!(repo.objects(), 1);
    assert_eq!(repo.temp_files(), 0);
    for id in ids.iter().take(3) {
        assert_eq!(download(&repo, id, "").body, *body);
    }
}

#[test]
fn ranges_and_head() {
    let repo = repo();
    let body = sample(100_000, 9);
    let id = repo.upload(HS, SHARED_SECRET, "video/mp4", None, &body);
    let path = format!("/_matrix/client/v1/media/download/{HS}/{id}");
    let range = |value: &str| {
        repo.get(
            &path,
            &[("Host", HS), ("Authorization", AUTH), ("Range", value)],
        )
    };
    let r = range("bytes=10-19");
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &body[10..20]);
    assert_eq!(r.header("content-range"), Some("bytes 10-19/100000"));
    let r = range("bytes=-5");
    assert_eq!((r.status, r.body.as_slice()), (206, &body[99_995..]));
    let r = range("bytes=99990-");
    assert_eq!(r.body, &body[99_990..]);
    let r = range("bytes=100000-");
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */100000"));

    let r = repo.send(
        "HEAD",
        &format!("/_matrix/media/v3/download/{HS}/{id}"),
        &[("Host", HS)],
        None,
        b"",
    );
    // Frozen on the legacy endpoint; the authenticated one answers HEAD with the headers only.
    assert_eq!(r.status, 404);
    let r = repo.send(
        "HEAD",
        &path,
        &[("Host", HS), ("Authorization", AUTH)],
        None,
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("100000"));
    assert!(r.body.is_empty());
}

#[test]
fn size_limits_and_quotas() {
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["uploads"] = serde_json::json!({
            "maxBytes": 10000, "minBytes": 10,
            "quotas": { "enabled": true, "users": [ { "glob": "@sharedsecret", "maxBytes": 25000, "maxFiles": 3 } ] }
        })
    });
    let r = repo.upload_response(HS, SHARED_SECRET, "image/png", None, &sample(10_001, 10));
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (413, Some("M_TOO_LARGE"))
    );
    let r = repo.upload_response(HS, SHARED_SECRET, "image/png", None, b"tiny");
    assert_eq!(r.status, 400);
    assert_eq!(repo.objects(), 0);
    assert_eq!(repo.temp_files(), 0, "a refused upload leaves no temp file");

    repo.upload(HS, SHARED_SECRET, "image/png", None, &sample(9000, 11));
    repo.upload(HS, SHARED_SECRET, "image/png", None, &sample(9000, 12));
    let r = repo.upload_response(HS, SHARED_SECRET, "image/png", None, &sample(9000, 13));
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{}",
        r.text()
    );
    assert!(r.json()["error"].as_str().unwrap().contains("quota"));
    assert_eq!(repo.objects(), 2);
}

#[test]
fn a_too_large_body_without_content_length_is_cut_off_and_leaves_nothing() {
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["uploads"] = serde_json::json!({ "maxBytes": 100000 })
    });
    // Chunked: the limit can only be enforced as bytes arrive.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", repo.port)).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    use std::io::{Read as _, Write as _};
    write!(stream, "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: {HS}\r\nAuthorization: {AUTH}\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
    let chunk = sample(50_000, 14);
    for _ in 0..3 {
        let _ = write!(stream, "{:x}\r\n", chunk.len());
        let _ = stream.write_all(&chunk);
        let _ = write!(stream, "\r\n");
    }
    let _ = write!(stream, "0\r\n\r\n");
    let mut response = vec![0u8; 4096];
    let n = stream.read(&mut response).unwrap_or(0);
    let response = String::from_utf8_lossy(&response[..n]).into_owned();
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert_eq!(repo.objects(), 0);
    assert_eq!(repo.temp_files(), 0);
    assert_eq!(repo.media_rows(), 0);
}

#[test]
fn unknown_hosts_and_bad_media_ids() {
    let repo = repo();
    let r = repo.get(
        "/_matrix/media/v3/config",
        &[("Host", "elsewhere.test:8448"), ("Authorization", AUTH)],
    );
    assert_eq!(r.status, 404);
    let error = r.json()["error"].as_str().unwrap().to_owned();
    assert!(error.contains("`elsewhere.test:8448`"), "{error}");
    // X-Forwarded-Host names the homeserver when the proxy sets it.
    let r = repo.get(
        "/_matrix/media/v3/config",
        &[
            ("Host", "10.0.0.1:8000"),
            ("X-Forwarded-Host", HS),
            ("Authorization", AUTH),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());

    let long = "a".repeat(300);
    for id in ["..%2F..%2Fetc%2Fpasswd", "a%2Fb", long.as_str(), "bad%00id"] {
        let r = repo.get(
            &format!("/_matrix/client/v1/media/download/{HS}/{id}"),
            &[("Host", HS), ("Authorization", AUTH)],
        );
        assert_eq!(
            (r.status, r.json()["errcode"].as_str()),
            (404, Some("M_NOT_FOUND")),
            "{id}"
        );
    }
    let r = repo.get(
        &format!("/_matrix/client/v1/media/download/{HS}/doesNotExist"),
        &[("Host", HS), ("Authorization", AUTH)],
    );
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (404, Some("M_NOT_FOUND"))
    );
}

#[test]
fn sighup_reloads_limits_and_sigterm_stops_cleanly() {
    let mut repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["uploads"] = serde_json::json!({ "maxBytes": 100000 })
    });
    assert_eq!(
        repo.upload_response(HS, SHARED_SECRET, "image/png", None, &sample(50_000, 15))
            .status,
        200
    );
    repo.rewrite_config(|c| c["uploads"]["maxBytes"] = 1000.into());
    repo.signal("HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = repo.upload_response(HS, SHARED_SECRET, "image/png", None, &sample(50_000, 16));
        if r.status == 413 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new limit never applied: {}",
            repo.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(repo.log().contains("configuration reloaded"));
    assert!(repo.stop().success(), "{}", repo.log());
    assert!(repo.log().contains("stopped"));
}

#[test]
fn metrics_count_requests_by_route() {
    let repo = repo();
    repo.upload(HS, SHARED_SECRET, "image/png", None, &sample(2000, 17));
    let text = repo.metrics();
    assert!(
        text.contains(r#"mmrctl_http_requests_total{route="/_matrix/media/{version}/upload",method="POST",status="200"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("mmrctl_media_bytes_received_total 2000"),
        "{text}"
    );
    assert!(text.contains("mmrctl_db_pool_max 10"), "{text}");
}

#[test]
fn unknown_config_keys_are_reported_at_start() {
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["repo"]["colour"] = "blue".into()
    });
    let log = repo.log();
    assert!(
        log.contains("unknown keys are ignored") && log.contains("repo.colour"),
        "{log}"
    );
}

#[test]
fn appservice_tokens_from_the_config_masquerade_within_their_namespaces() {
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["accessTokens"] = serde_json::json!({
            "maxCacheTimeSeconds": 600, "useLocalAppserviceConfig": true,
            "appservices": [{ "id": "bridge", "asToken": "as-secret", "senderUserId": "@bridge:example.test",
                              "userNamespaces": [{ "regex": "@bridge_.*:example.test" }] }]
        })
    });
    let upload = |query: &str| {
        repo.send(
            "POST",
            &format!("/_matrix/media/v3/upload{query}"),
            &[("Host", HS), ("Authorization", "Bearer as-secret")],
            Some("image/png"),
            &sample(500, 30),
        )
    };
    assert_eq!(upload("").status, 200);
    assert_eq!(
        upload("?user_id=%40bridge_alice%3Aexample.test").status,
        200
    );
    let r = upload("?user_id=%40alice%3Aexample.test");
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (403, Some("M_FORBIDDEN"))
    );
    let users: Vec<String> = repo
        .db
        .as_ref()
        .unwrap()
        .client()
        .query("SELECT user_id FROM media ORDER BY user_id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        users,
        ["@bridge:example.test", "@bridge_alice:example.test"]
    );
}

#[test]
fn instances_starting_together_migrate_once() {
    let repos = MediaRepo::start_many(3, &[(HS, "http://127.0.0.1:9")]);
    let db = repos[0].db.as_ref().unwrap();
    // Each migration once (versions are 1..=latest).
    let row = db
        .client()
        .query_one(
            "SELECT COUNT(*), MAX(version)::BIGINT FROM mmrctl_migrations",
            &[],
        )
        .unwrap();
    let (applied, latest): (i64, i64) = (row.get(0), row.get(1));
    assert!(latest >= 2, "{latest}");
    assert_eq!(applied, latest);
    // Media uploaded through one instance is served by the others.
    let id = repos[1].upload(HS, SHARED_SECRET, "image/png", None, &sample(300, 31));
    assert_eq!(download(&repos[2], &id, "").status, 200);
}

#[test]
fn server_names_with_a_port_are_served_by_that_name() {
    const PORTED: &str = "localhost:20448";
    let repo = MediaRepo::start(&[(PORTED, "http://127.0.0.1:9")], |_| {});
    // The media repo sees the name as the proxy passes it, port included.
    let id = repo.upload(PORTED, SHARED_SECRET, "text/plain", None, &sample(300, 40));
    let r = repo.get(
        &format!("/_matrix/client/v1/media/download/{PORTED}/{id}"),
        &[("Host", PORTED), ("Authorization", AUTH)],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Without its port it is another name, not served here.
    let r = repo.get(
        "/_matrix/client/v1/media/config",
        &[("Host", "localhost"), ("Authorization", AUTH)],
    );
    assert_eq!(r.status, 404, "{}", r.text());
}

/// Under systemd (stderr is the journal's stream, as `JOURNAL_STREAM` says) each line carries its
/// syslog priority and no timestamp of its own; elsewhere lines are timestamped.
#[test]
fn logs_carry_syslog_priorities_when_stderr_is_the_journal() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("media-repo.yaml");
    let yaml = serde_norway::to_string(&serde_json::json!({
        "repo": { "bindAddress": "127.0.0.1", "port": support::free_port(), "logDirectory": "-" },
        // Nothing listens there: the server logs an error and retries.
        "database": { "postgres": "postgres://postgres@127.0.0.1:1/none?sslmode=disable" },
        "homeservers": [{ "name": "example.test", "csApi": "http://127.0.0.1:9" }],
        "datastores": [{ "type": "file", "id": "f", "forKinds": ["all"],
                         "opts": { "path": dir.path().join("media") } }],
    }))
    .unwrap();
    std::fs::write(&config, yaml).unwrap();
    let run = |journal: bool| {
        let log_path = dir.path().join(format!("journal-{journal}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let meta = log.metadata().unwrap();
        let stream = if journal {
            format!("{}:{}", meta.dev(), meta.ino())
        } else {
            // Inherited from a parent, but stderr is somewhere else.
            format!("{}:{}", meta.dev(), meta.ino() + 1)
        };
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mmrctl"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("JOURNAL_STREAM", stream)
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let text = loop {
            let text = std::fs::read_to_string(&log_path).unwrap();
            if text.contains("the database is unreachable") {
                break text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no database error logged:\n{text}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let _ = child.kill();
        let _ = child.wait();
        text
    };
    let journal = run(true);
    let error = journal
        .lines()
        .find(|l| l.contains("the database is unreachable"))
        .unwrap();
    assert!(error.starts_with("<3>"), "{journal}");
    assert!(
        journal
            .lines()
            .filter(|l| !l.is_empty())
            .all(|l| l.starts_with('<')),
        "{journal}"
    );
    let plain = run(false);
    assert!(
        plain.lines().next().is_some_and(|l| l.starts_with("20")),
        "a timestamp first when stderr is not the journal:\n{plain}"
    );
}

/// Content quarantined (here as an import carries a homeserver's quarantine over) cannot be
/// uploaded again under a new id: 403, and nothing new is stored.
#[test]
fn quarantined_content_cannot_be_uploaded_again() {
    let repo = repo();
    let body = sample(20_000, 31);
    let id = repo.upload(HS, SHARED_SECRET, "image/png", None, &body);
    repo.execute(&format!(
        "UPDATE media SET quarantined = TRUE WHERE media_id = '{id}'"
    ));
    assert_eq!(download(&repo, &id, "").status, 404);
    let rows = repo.media_rows();
    let r = repo.upload_response(HS, SHARED_SECRET, "image/png", Some("again.png"), &body);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["errcode"], "M_FORBIDDEN");
    assert_eq!(repo.media_rows(), rows);
    // Other content still uploads.
    let other = repo.upload(HS, SHARED_SECRET, "image/png", None, &sample(20_000, 32));
    assert_eq!(download(&repo, &other, "").status, 200);
}
