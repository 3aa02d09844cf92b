//! `mmrctl serve` with S3 datastores, end to end against a real S3-compatible server (moto, from the
//! tools venv): upload, download, ranges and dedup with only S3; file and S3 split by kind; a
//! read-only store; a 300 MiB multipart upload in bounded memory; `publicBaseUrl` redirects; S3
//! going away and coming back, or answering 500, 503 and slowly through a fault proxy; and a
//! config rendered by `mmrctl render` running unchanged.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

mod support;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{
    FILE_ID, MediaRepo, S3_ID, SHARED_SECRET, file_datastore, free_port, s3_datastore, sample,
};
use testkit::{Fault, FaultProxy, S3Server};

const HS: &str = "example.test";
const AUTH: &str = "Bearer test-shared-secret";
const MIB: u64 = 1024 * 1024;

/// A repo whose only datastore is `s3` (with `extra` opts).
fn s3_only(s3: &S3Server, extra: Value) -> MediaRepo {
    MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["datastores"] = json!([s3_datastore(s3, c, json!(["all"]), extra)]);
    })
}

/// `GET path` over a raw connection, to see a redirect as it is (the test client follows them):
/// the status and the lower-cased headers.
fn get_no_follow(
    repo: &MediaRepo,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>) {
    let mut stream = TcpStream::connect(("127.0.0.1", repo.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let response = String::from_utf8_lossy(&response);
    let head = response.split("\r\n\r\n").next().unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {response}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The SHA-256 of a download, from its ETag.
fn etag_hash(r: &testkit::http::Response) -> String {
    r.header("etag").unwrap().trim_matches('"').to_owned()
}

/// `(datastore_id, location)` of every object row (of the database `repo` owns).
fn object_rows(repo: &MediaRepo) -> Vec<(String, String)> {
    let mut client = repo.db.as_ref().unwrap().client();
    client
        .query(
            "SELECT datastore_id, location FROM objects ORDER BY sha256",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn count(repo: &MediaRepo, table: &str) -> i64 {
    let mut client = repo.db.as_ref().unwrap().client();
    client
        .query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
        .unwrap()
        .get(0)
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

#[test]
fn s3_only_upload_download_ranges_and_dedup() {
    let s3 = S3Server::start("media");
    let repo = s3_only(
        &s3,
        json!({ "prefixLength": 2, "storageClass": "STANDARD_IA" }),
    );
    let body = sample(70_000, 1);
    let id = repo.upload(HS, SHARED_SECRET, "image/png", Some("cat.png"), &body);

    let r = repo.download(HS, &id, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, body);
    assert_eq!(r.header("content-type"), Some("image/png"));
    let hash = etag_hash(&r);

    // One object, keyed `<2 chars>/<rest of the hash>`, with the storage class; its row says so.
    let objects = s3.objects();
    assert_eq!(objects.len(), 1, "{objects:?}");
    let key = format!("{}/{}", &hash[..2], &hash[2..]);
    assert_eq!(objects[0].key, key);
    assert_eq!(objects[0].size, body.len() as u64);
    assert_eq!(objects[0].storage_class, "STANDARD_IA");
    assert_eq!(object_rows(&repo), vec![(S3_ID.to_owned(), key.clone())]);
    assert_eq!(s3.get_object(&key).unwrap(), body);
    // Small: a single PutObject, no multipart upload.
    assert!(!s3.log_contains("?uploads"), "{}", s3.log());

    // Ranges go through to S3.
    for (range, start, end) in [
        ("bytes=10-19", 10, 19),
        ("bytes=69990-", 69_990, 69_999),
        ("bytes=-5", 69_995, 69_999),
        ("bytes=0-0", 0, 0),
    ] {
        let r = repo.download(HS, &id, &[("Range", range)]);
        assert_eq!(r.status, 206, "{range}: {}", r.text());
        assert_eq!(r.body, &body[start..=end], "{range}");
        assert_eq!(
            r.header("content-range").unwrap(),
            format!("bytes {start}-{end}/70000")
        );
    }
    assert_eq!(
        repo.download(HS, &id, &[("Range", "bytes=70000-")]).status,
        416
    );

    // The same bytes again, under another name and type: a new media id, the same object.
    let again = repo.upload(HS, SHARED_SECRET, "text/plain", Some("other.txt"), &body);
    assert_ne!(again, id);
    let r = repo.download(HS, &again, &[]);
    assert_eq!((r.status, &r.body), (200, &body));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(s3.keys(), vec![key]);
    assert_eq!(count(&repo, "objects"), 1);
    assert_eq!(count(&repo, "media"), 2);

    // Nothing is left in the temp path.
    assert_eq!(files_in(&repo.dir.path().join("s3-tmp")), 0);
}

#[test]
fn file_and_s3_split_by_kind_put_local_media_on_s3() {
    let s3 = S3Server::start("media");
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["datastores"] = json!([
            file_datastore(c, json!(["thumbnails"])),
            s3_datastore(
                &s3,
                c,
                json!(["local_media", "remote_media", "archives"]),
                json!({})
            ),
        ]);
    });
    let bodies: Vec<Vec<u8>> = (0..3)
        .map(|i| sample(5_000 + i * 1000, 10 + i as u64))
        .collect();
    let ids: Vec<String> = bodies
        .iter()
        .map(|b| repo.upload(HS, SHARED_SECRET, "application/pdf", None, b))
        .collect();
    for (id, body) in ids.iter().zip(&bodies) {
        let r = repo.download(HS, id, &[]);
        assert_eq!((r.status, &r.body), (200, body));
    }
    // Local media went to S3 (keys are the plain hashes without prefixLength); the file store,
    // which takes only thumbnails, got nothing.
    assert_eq!(s3.keys().len(), 3);
    assert!(s3.keys().iter().all(|k| k.len() == 64 && !k.contains('/')));
    assert_eq!(repo.objects(), 0);
    assert!(object_rows(&repo).iter().all(|(ds, _)| ds == S3_ID));
}

#[test]
fn a_read_only_s3_store_keeps_serving_its_media() {
    let s3 = S3Server::start("media");
    let mut first = s3_only(&s3, json!({}));
    let old = sample(30_000, 3);
    let old_id = first.upload(HS, SHARED_SECRET, "image/jpeg", None, &old);
    assert!(first.stop().success());

    // Restart with the S3 store read-only (`forKinds: []`) and a file store for new media.
    let url = first.db.as_ref().unwrap().url().to_owned();
    let s3_entry = first.config["datastores"][0].clone();
    let repo = MediaRepo::spawn(None, &url, &[(HS, "http://127.0.0.1:9")], |c| {
        let mut read_only = s3_entry;
        read_only["forKinds"] = json!([]);
        c["datastores"] = json!([file_datastore(c, json!(["all"])), read_only]);
    });
    repo.wait_healthy();

    let r = repo.download(HS, &old_id, &[]);
    assert_eq!((r.status, &r.body), (200, &old));
    let r = repo.download(HS, &old_id, &[("Range", "bytes=100-199")]);
    assert_eq!((r.status, r.body.as_slice()), (206, &old[100..200]));

    // New content goes to the file store; the bucket is left alone.
    let new = sample(40_000, 4);
    let new_id = repo.upload(HS, SHARED_SECRET, "image/jpeg", None, &new);
    assert_eq!(repo.download(HS, &new_id, &[]).body, new);
    assert_eq!(repo.objects(), 1);
    assert_eq!(s3.keys().len(), 1);
    // Content the read-only store already has is still deduplicated against it.
    let dup_id = repo.upload(HS, SHARED_SECRET, "image/jpeg", None, &old);
    assert_eq!(repo.download(HS, &dup_id, &[]).body, old);
    assert_eq!((repo.objects(), s3.keys().len()), (1, 1));
    let rows = object_rows(&first);
    assert_eq!(rows.iter().filter(|(ds, _)| ds == S3_ID).count(), 1);
    assert_eq!(rows.iter().filter(|(ds, _)| ds == FILE_ID).count(), 1);
}

/// Deterministic, position-addressable bytes: any range can be checked without the whole body.
fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    fn word(seed: u64, index: u64) -> [u8; 8] {
        let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).to_le_bytes()
    }
    let mut out = Vec::with_capacity(len + 16);
    let mut index = offset / 8;
    let skip = (offset % 8) as usize;
    while out.len() < len + skip {
        out.extend_from_slice(&word(seed, index));
        index += 1;
    }
    out.drain(..skip);
    out.truncate(len);
    out
}

/// Uploads `len` bytes of [`pattern`] over a raw connection, a chunk at a time (the test never holds
/// the body); returns the status and the response body.
fn upload_streaming(repo: &MediaRepo, len: u64, seed: u64) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", repo.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(600)))
        .unwrap();
    write!(
        stream,
        "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: {HS}\r\nAuthorization: {AUTH}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    const CHUNK: u64 = 4 * MIB;
    let mut sent = 0;
    while sent < len {
        let n = CHUNK.min(len - sent);
        stream
            .write_all(&pattern(seed, sent, n as usize))
            .unwrap_or_else(|e| panic!("sending the body failed after {sent} bytes: {e}"));
        sent += n;
    }
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {response}"));
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

#[test]
fn a_300_mib_upload_goes_multipart_in_bounded_memory() {
    const SIZE: u64 = 300 * MIB;
    const SEED: u64 = 300;
    let s3 = S3Server::start("media");
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["uploads"] = json!({ "maxBytes": 400 * MIB });
        c["datastores"] = json!([s3_datastore(&s3, c, json!(["all"]), json!({}))]);
    });
    let before = repo.peak_rss_kib();
    let started = Instant::now();
    let (status, body) = upload_streaming(&repo, SIZE, SEED);
    assert_eq!(status, 200, "{body}");
    let upload_s = started.elapsed().as_secs_f64();
    let uri: Value = serde_json::from_str(&body).unwrap();
    let id = uri["content_uri"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let after_upload = repo.peak_rss_kib();

    // It went up as a multipart upload, and arrived whole.
    assert!(s3.log_contains("?uploads"), "no multipart upload started");
    assert!(
        s3.log_contains("partNumber=19"),
        "expected 19 parts of 16 MiB"
    );
    let objects = s3.objects();
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0].size, SIZE);

    // Downloaded whole and byte-identical; a range across a part boundary.
    let started = Instant::now();
    let r = repo.download(HS, &id, &[]);
    let download_s = started.elapsed().as_secs_f64();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len() as u64, SIZE);
    for (i, chunk) in r.body.chunks((16 * MIB) as usize).enumerate() {
        let offset = i as u64 * 16 * MIB;
        assert!(
            chunk == pattern(SEED, offset, chunk.len()).as_slice(),
            "bytes differ in the 16 MiB from {offset}"
        );
    }
    let start = 16 * MIB - 50;
    let r = repo.download(
        HS,
        &id,
        &[("Range", &format!("bytes={start}-{}", start + 99))],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body, pattern(SEED, start, 100));

    // VmHWM is approximate by a few hundred KiB (per-thread RSS counters): keep the largest read.
    let peak = repo.peak_rss_kib().max(after_upload);
    eprintln!(
        "300 MiB through S3: upload {upload_s:.1} s, download {download_s:.1} s; server peak RSS \
         {} KiB before, {} KiB after the upload, {} KiB after the download",
        before, after_upload, peak
    );
    assert!(
        peak < 100 * 1024,
        "the server's peak RSS was {peak} KiB (limit 100 MiB)"
    );
    assert_eq!(files_in(&repo.dir.path().join("s3-tmp")), 0);
}

#[test]
fn public_base_url_redirects_when_the_request_allows_it() {
    let s3 = S3Server::start("media");
    let base = format!("http://{}/{}/", s3.endpoint(), s3.bucket());
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["repo"]["freezeUnauthenticatedMedia"] = false.into();
        c["datastores"] = json!([s3_datastore(
            &s3,
            c,
            json!(["all"]),
            json!({ "publicBaseUrl": base, "redirectWhenCached": false, "prefixLength": 3 })
        )]);
    });
    let body = sample(10_000, 5);
    let id = repo.upload(HS, SHARED_SECRET, "image/webp", None, &body);
    let key = s3.keys().pop().unwrap();
    assert_eq!(key.find('/'), Some(3));

    // The authenticated endpoint always redirects: to publicBaseUrl + the key, where the bytes are.
    let authenticated = format!("/_matrix/client/v1/media/download/{HS}/{id}");
    let auth = [("Host", HS), ("Authorization", AUTH)];
    let (status, headers) = get_no_follow(&repo, &authenticated, &auth);
    assert_eq!(status, 307, "{headers:?}");
    assert_eq!(
        header(&headers, "location").unwrap(),
        format!("{base}{key}")
    );
    assert_eq!(header(&headers, "access-control-allow-origin"), Some("*"));
    assert_eq!(header(&headers, "content-length"), Some("0"));
    assert_eq!(s3.get_object(&key).unwrap(), body);
    // The named variant too.
    let (status, _) = get_no_follow(&repo, &format!("{authenticated}/name.webp"), &auth);
    assert_eq!(status, 307);

    // Legacy endpoints only when asked with allow_redirect=true; otherwise the bytes, proxied.
    let legacy = format!("/_matrix/media/v3/download/{HS}/{id}");
    let r = repo.get(&legacy, &[("Host", HS)]);
    assert_eq!((r.status, &r.body), (200, &body));
    let (status, _) = get_no_follow(
        &repo,
        &format!("{legacy}?allow_redirect=false"),
        &[("Host", HS)],
    );
    assert_eq!(status, 200);
    let (status, headers) = get_no_follow(
        &repo,
        &format!("{legacy}?allow_redirect=true"),
        &[("Host", HS)],
    );
    assert_eq!(status, 307);
    assert_eq!(
        header(&headers, "location").unwrap(),
        format!("{base}{key}")
    );

    // A client that has the content already still gets a 304, not a redirect.
    let etag = format!("\"{}\"", key.replace('/', ""));
    let (status, _) = get_no_follow(
        &repo,
        &authenticated,
        &[auth[0], auth[1], ("If-None-Match", &etag)],
    );
    assert_eq!(status, 304);
}

#[test]
fn s3_going_away_gives_503_writes_nothing_and_recovers() {
    let mut s3 = S3Server::start("media");
    let repo = s3_only(&s3, json!({}));
    let stored = sample(20_000, 6);
    let stored_id = repo.upload(HS, SHARED_SECRET, "image/png", None, &stored);
    let (objects, media) = (count(&repo, "objects"), count(&repo, "media"));

    s3.stop();
    let r = repo.upload_response(HS, SHARED_SECRET, "image/png", None, &sample(25_000, 7));
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.json()["errcode"], "M_UNKNOWN");
    let r = repo.download(HS, &stored_id, &[]);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    // Nothing half-written: no row, no temp file; the server itself stays healthy.
    assert_eq!(
        (count(&repo, "objects"), count(&repo, "media")),
        (objects, media)
    );
    assert_eq!(files_in(&repo.dir.path().join("s3-tmp")), 0);
    assert_eq!(repo.get("/healthz", &[]).status, 200);
    // The log says which store failed, doing what.
    let log = repo.log();
    assert!(
        log.contains(&format!(
            "datastore `{S3_ID}`: HeadObject failed: dispatch failure"
        )),
        "{log}"
    );
    assert!(log.contains(&format!(
        "datastore `{S3_ID}`: GetObject failed: dispatch failure"
    )));

    // S3 is back (moto restarts empty, the bucket created again): new uploads work at once,
    // without restarting the media repo.
    s3.restart();
    let body = sample(25_000, 7);
    let id = repo.upload(HS, SHARED_SECRET, "image/png", None, &body);
    let r = repo.download(HS, &id, &[]);
    assert_eq!((r.status, &r.body), (200, &body));
    let r = repo.download(HS, &id, &[("Range", "bytes=5-9")]);
    assert_eq!((r.status, r.body.as_slice()), (206, &body[5..10]));
    assert_eq!(s3.keys().len(), 1);
}

#[test]
fn s3_answering_500_503_or_slowly_gives_503_or_slow_success_and_nothing_half_written() {
    let s3 = S3Server::start("media");
    let proxy = FaultProxy::start(&s3.endpoint());
    let repo = s3_only(&s3, json!({ "endpoint": proxy.addr() }));
    let stored = sample(20_000, 8);
    let stored_id = repo.upload(HS, SHARED_SECRET, "image/png", None, &stored);
    let (objects, media) = (count(&repo, "objects"), count(&repo, "media"));

    for status in [500, 503] {
        proxy.set(Fault::Status(status));
        let before = proxy.faulted();
        let r = repo.upload_response(HS, SHARED_SECRET, "image/png", None, &sample(30_000, 9));
        assert_eq!(r.status, 503, "S3 answering {status}: {}", r.text());
        assert!(r.header("retry-after").is_some());
        let r = repo.download(HS, &stored_id, &[]);
        assert_eq!(r.status, 503, "S3 answering {status}: {}", r.text());
        assert!(
            proxy.faulted() > before,
            "the requests went to S3 and were refused"
        );
        assert_eq!(
            (count(&repo, "objects"), count(&repo, "media")),
            (objects, media)
        );
        assert_eq!(files_in(&repo.dir.path().join("s3-tmp")), 0);
    }

    // Slow (every piece the server sends waits 50 ms): slower, and whole.
    proxy.set(Fault::Delay(Duration::from_millis(50)));
    let body = sample(3 * MIB as usize, 10);
    let slow_id = repo.upload(HS, SHARED_SECRET, "image/png", None, &body);
    let r = repo.download(HS, &slow_id, &[]);
    assert!(r.status == 200 && r.body == body, "{}", r.status);

    // Good again: what failed goes through, without a restart.
    proxy.set(Fault::None);
    let body = sample(30_000, 9);
    let id = repo.upload(HS, SHARED_SECRET, "image/png", None, &body);
    assert_eq!(repo.download(HS, &id, &[]).body, body);
    assert_eq!(repo.download(HS, &stored_id, &[]).body, stored);
    assert_eq!(s3.keys().len(), 3);
    support::check_clean(&repo.config_path(), S3_ID);
}

#[test]
fn a_rendered_s3_config_runs_unchanged() {
    let s3 = S3Server::start("rendered-media");
    let db = testkit::TestDb::new();
    let out = tempfile::tempdir().unwrap();
    let port = free_port();
    let vars = format!(
        r#"
matrix_domain: {HS}
matrix_homeserver_generic_secret_key: "HgiKXSjjarvO0oeFGPRMbw60yPcKiRvgq1GZbyb5"
matrix_media_repo_enabled: true
matrix_media_repo_base_path: "{base}"
matrix_media_repo_generate_signing_key: false
matrix_media_repo_bind_address: 127.0.0.1
matrix_media_repo_port: {port}
matrix_media_repo_database_postgres: "{db_url}"
matrix_media_repo_shared_secret_auth_enabled: true
matrix_media_repo_shared_secret_auth_token: "{SHARED_SECRET}"
matrix_media_repo_datastore_file_id: "uNckOmw1W2IsivGfH6dBBy4mn96qvlShGk0wCrPw76qNteuCVG5BsLdX4OcJO86d"
matrix_media_repo_datastore_file_for_kinds: [thumbnails]
matrix_media_repo_datastore_s3_id: "k912QBrTVzLvmcw24LoNx1iyXBNZvHYBrRuNkU2TOvKLHhrG1wVUUvAAMjZrZOEN"
matrix_media_repo_datastore_s3_for_kinds: ["local_media", "remote_media", "archives"]
matrix_media_repo_datastore_s3_opts_temp_path: "{base}/data/s3-temp"
matrix_media_repo_datastore_s3_opts_endpoint: "{endpoint}"
matrix_media_repo_datastore_s3_opts_access_key_id: {key_id}
matrix_media_repo_datastore_s3_opts_access_secret: {secret}
matrix_media_repo_datastore_s3_opts_ssl: false
matrix_media_repo_datastore_s3_opts_bucket_name: {bucket}
matrix_media_repo_datastore_s3_opts_region: eu-central-1
matrix_media_repo_datastore_s3_opts_storage_class: STANDARD_IA
matrix_media_repo_datastore_s3_opts_prefix_length: 2
"#,
        base = out.path().display(),
        db_url = db.url(),
        endpoint = s3.endpoint(),
        key_id = testkit::ACCESS_KEY_ID,
        secret = testkit::ACCESS_SECRET,
        bucket = s3.bucket(),
    );
    support::render(&vars, out.path());
    let config_path = out.path().join("config/media-repo.yaml");
    let rendered = std::fs::read_to_string(&config_path).unwrap();
    assert!(rendered.contains("type: s3"), "{rendered}");

    let repo = MediaRepo::start_with_config_file(&config_path, port, Some(db), &[]);
    let body = sample(3_000, 8);
    let id = repo.upload(HS, SHARED_SECRET, "image/gif", None, &body);
    let r = repo.download(HS, &id, &[]);
    assert_eq!((r.status, &r.body), (200, &body));
    let hash = etag_hash(&r);
    let objects = s3.objects();
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0].key, format!("{}/{}", &hash[..2], &hash[2..]));
    assert_eq!(objects[0].storage_class, "STANDARD_IA");
    // The rendered file was used as it is.
    assert_eq!(std::fs::read_to_string(&config_path).unwrap(), rendered);
}
