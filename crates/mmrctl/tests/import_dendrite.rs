//! `mmrctl import dendrite`: a fixture database with Dendrite's documented `mediaapi` schema and files
//! in Dendrite's hash layout (`<base>/h/a/sh…/file`) are imported and served byte for byte; a rerun
//! imports nothing; `--verify` passes, then finds exactly the one object removed; cached remote media
//! comes only with `--include-remote`.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

mod support;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use sha2::{Digest as _, Sha256};
use support::{MediaRepo, Run, SHARED_SECRET, pg, sample};
use testkit::TestDb;

const HS: &str = "dendrite.test";

/// `mediaapi/storage/postgres/media_repository_table.go` and `thumbnail_table.go`.
const DENDRITE_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS mediaapi_media_repository (
        media_id TEXT NOT NULL, media_origin TEXT NOT NULL, content_type TEXT NOT NULL,
        file_size_bytes BIGINT NOT NULL, creation_ts BIGINT NOT NULL, upload_name TEXT NOT NULL,
        base64hash TEXT NOT NULL, user_id TEXT NOT NULL);
    CREATE UNIQUE INDEX IF NOT EXISTS mediaapi_media_repository_index
        ON mediaapi_media_repository (media_id, media_origin);
    CREATE TABLE IF NOT EXISTS mediaapi_thumbnail (
        media_id TEXT NOT NULL, media_origin TEXT NOT NULL, content_type TEXT NOT NULL,
        file_size_bytes BIGINT NOT NULL, creation_ts BIGINT NOT NULL, width INTEGER NOT NULL,
        height INTEGER NOT NULL, resize_method TEXT NOT NULL);
    CREATE UNIQUE INDEX IF NOT EXISTS mediaapi_thumbnail_index
        ON mediaapi_thumbnail (media_id, media_origin, width, height, resize_method);
";

/// Dendrite's hash: unpadded URL-safe base64 of the SHA-256.
fn base64hash(body: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let digest = Sha256::digest(body);
    let mut out = String::new();
    for chunk in digest.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// Percent-escapes as Go's `url.PathEscape` does (what Dendrite stores as `upload_name`).
fn path_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~$&+=:@".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

struct Item {
    id: &'static str,
    origin: &'static str,
    content_type: &'static str,
    name: &'static str,
    body: Vec<u8>,
}

#[test]
fn dendrite_media_moves_over_and_is_served_identically() {
    let db = TestDb::new();
    db.client().batch_execute(DENDRITE_SCHEMA).unwrap();
    let base = tempfile::tempdir().unwrap();
    let photo = sample(200_000, 7);
    let items = [
        Item {
            id: "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9",
            origin: HS,
            content_type: "image/jpeg",
            name: "photo.jpg",
            body: photo.clone(),
        },
        Item {
            id: "1111111111111111111111111111111111111111111111111111111111111111",
            origin: HS,
            content_type: "text/plain",
            name: "Grüße aus Köln.txt",
            body: b"hallo\n".to_vec(),
        },
        // The same bytes uploaded again: Dendrite keeps one file for both rows.
        Item {
            id: "2222222222222222222222222222222222222222222222222222222222222222",
            origin: HS,
            content_type: "image/jpeg",
            name: "photo (copy).jpg",
            body: photo,
        },
        Item {
            id: "3333333333333333333333333333333333333333333333333333333333333333",
            origin: HS,
            content_type: "video/mp4",
            name: "clip.mp4",
            body: sample(1_500_000, 8),
        },
        // Cached from another server.
        Item {
            id: "RemoteMediaId0000000001",
            origin: "remote.test",
            content_type: "image/png",
            name: "remote.png",
            body: sample(5_000, 9),
        },
    ];
    let mut client = db.client();
    for (n, item) in items.iter().enumerate() {
        let hash = base64hash(&item.body);
        let user = if item.origin == HS {
            "@dora:dendrite.test"
        } else {
            ""
        };
        client
            .execute(
                "INSERT INTO mediaapi_media_repository VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &item.id,
                    &item.origin,
                    &item.content_type,
                    &(item.body.len() as i64),
                    &(1_650_000_000_000i64 + n as i64),
                    &path_escape(item.name),
                    &hash,
                    &user,
                ],
            )
            .unwrap();
        let file: PathBuf = base
            .path()
            .join(&hash[..1])
            .join(&hash[1..2])
            .join(&hash[2..])
            .join("file");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, &item.body).unwrap();
    }

    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |_| {});
    let pg = pg();
    let config = repo.dir.path().join("media-repo.yaml");
    let import = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mmrctl"))
            .args(["import", "dendrite", "--config"])
            .arg(&config)
            .args(pg.flags())
            .args(["--db-name", db.name(), "--media-path"])
            .arg(base.path())
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("--- import dendrite {extra:?}\n{log}");
        Run {
            code: out.status.code().unwrap_or(-1),
            log,
        }
    };
    let summary = |log: &str, msg: &str| -> String {
        log.lines()
            .find(|l| l.contains(&format!("msg=\"{msg}\"")))
            .unwrap_or_else(|| panic!("no {msg} in:\n{log}"))
            .to_owned()
    };

    let first = import(&[]);
    assert_eq!(first.code, 0, "{}", first.log);
    let done = summary(&first.log, "Import completed") + " ";
    for field in [" imported=4 ", "skipped_remote=1 ", " failed=0 "] {
        assert!(done.contains(field), "{field} in {done}");
    }
    assert_eq!(repo.objects(), 3, "the duplicate is stored once");

    let auth = format!("Bearer {SHARED_SECRET}");
    for item in items.iter().filter(|i| i.origin == HS) {
        // Dendrite media was never frozen: both endpoint families serve it.
        for path in [
            format!("/_matrix/client/v1/media/download/{HS}/{}", item.id),
            format!("/_matrix/media/v3/download/{HS}/{}", item.id),
        ] {
            let r = repo.get(&path, &[("Host", HS), ("Authorization", &auth)]);
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            assert!(r.body == item.body, "{path}: the bytes differ");
            assert_eq!(r.header("content-type"), Some(item.content_type));
            let disposition = r.header("content-disposition").unwrap();
            if item.name.is_ascii() {
                assert!(
                    disposition.contains(&format!("filename=\"{}\"", item.name)),
                    "{disposition}"
                );
            } else {
                assert!(
                    disposition.contains("filename*=utf-8''Gr%C3%BC%C3%9Fe%20aus%20K%C3%B6ln.txt"),
                    "{disposition}"
                );
            }
        }
    }
    let url = repo.config["database"]["postgres"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut repo_db = testkit::postgres::Client::connect(&url, testkit::postgres::NoTls).unwrap();
    let row = repo_db
        .query_one(
            "SELECT user_id, created_ts, upload_name, requires_auth, quarantined FROM media WHERE media_id = $1",
            &[&items[1].id],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "@dora:dendrite.test");
    assert_eq!(row.get::<_, i64>(1), 1_650_000_000_001);
    assert_eq!(row.get::<_, String>(2), "Grüße aus Köln.txt");
    assert!(!row.get::<_, bool>(3) && !row.get::<_, bool>(4));

    let again = import(&[]);
    assert_eq!(again.code, 0, "{}", again.log);
    let done = summary(&again.log, "Import completed") + " ";
    assert!(
        done.contains(" imported=0 ") && done.contains("already_imported=4 "),
        "{done}"
    );

    let verify = import(&["--verify"]);
    assert_eq!(verify.code, 0, "{}", verify.log);
    assert!(summary(&verify.log, "Verify passed").contains("verified=4"));

    // The clip's object removed: exactly that item is reported.
    let clip = &items[3];
    let sha = format!("{:x}", Sha256::digest(&clip.body));
    std::fs::remove_file(repo.object_path(&sha)).unwrap();
    let verify = import(&["--verify"]);
    assert_eq!(verify.code, 1, "{}", verify.log);
    let problems: Vec<&str> = support::log_lines(&verify.log, "Verify problem");
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].contains(&format!("mxc://{HS}/{}", clip.id)),
        "{}",
        problems[0]
    );

    // Cached remote media, when asked for, as remote_media.
    let remote = import(&["--include-remote", "--verify"]);
    assert_eq!(remote.code, 1, "{}", remote.log);
    assert!(
        remote
            .log
            .contains("mxc://remote.test/RemoteMediaId0000000001 reason=\"not in the media repo\""),
        "{}",
        remote.log
    );
    let with_remote = import(&["--include-remote"]);
    assert_eq!(
        with_remote.code, 1,
        "the clip's object is still missing: {}",
        with_remote.log
    );
    assert!(
        (summary(&with_remote.log, "Import finished with errors") + " ").contains(" imported=1 ")
    );
    let kind: String = repo_db
        .query_one("SELECT kind FROM media WHERE origin = 'remote.test'", &[])
        .unwrap()
        .get(0);
    assert_eq!(kind, "remote_media");
}
