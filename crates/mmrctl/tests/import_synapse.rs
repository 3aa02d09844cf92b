//! `mmrctl import synapse` against a real Synapse on the real PostgreSQL: media uploaded through
//! Synapse's own media repo (several types, a Unicode filename, a duplicate, a quarantined item) is
//! imported, then served by `mmrctl serve` byte for byte; reruns import nothing; `--verify` passes and
//! then finds exactly the one object removed. The seed's `import_synapse` command line runs through
//! the argv[0] alias, fetching what is missing on disk with an admin's token.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use support::{MediaRepo, Run, encode, pg, run, sample};
use testkit::http;
use testkit::{Database, Synapse, TestDb};

const HS: &str = "hs1.test";

fn import(repo: &MediaRepo, synapse_db: &TestDb, media: &Path, extra: &[&str]) -> Run {
    let pg = pg();
    run(Command::new(env!("CARGO_BIN_EXE_mmrctl"))
        .args(["import", "synapse", "--config"])
        .arg(repo.dir.path().join("media-repo.yaml"))
        .args(pg.flags())
        .args(["--db-name", synapse_db.name(), "--media-path"])
        .arg(media)
        .args(extra))
}

/// Uploads through Synapse's media repo; returns the media id.
fn upload(
    synapse: &Synapse,
    token: &str,
    content_type: &str,
    name: Option<&str>,
    body: &[u8],
) -> String {
    let query = name
        .map(|n| format!("?filename={}", encode(n)))
        .unwrap_or_default();
    let auth = format!("Bearer {token}");
    let r = http::send(
        "POST",
        &format!("{}/_matrix/media/v3/upload{query}", synapse.base_url()),
        &[("Authorization", &auth)],
        Some(content_type),
        body,
    );
    assert_eq!(r.status, 200, "upload to Synapse: {}", r.text());
    let uri = r.json()["content_uri"].as_str().unwrap().to_owned();
    uri.strip_prefix(&format!("mxc://{HS}/"))
        .unwrap()
        .to_owned()
}

struct Uploaded {
    id: String,
    content_type: &'static str,
    name: Option<&'static str>,
    body: Vec<u8>,
}

fn line_with<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle} in:\n{log}"))
}

/// Copies a directory tree (files only).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn synapse_file(media: &Path, id: &str) -> PathBuf {
    media
        .join("local_content")
        .join(&id[..2])
        .join(&id[2..4])
        .join(&id[4..])
}

#[test]
fn synapse_media_moves_over_and_is_served_identically() {
    let synapse_db = TestDb::new();
    let synapse = Synapse::builder(HS)
        .database(Database::Postgres(synapse_db.url().to_owned()))
        .start();
    let (alice, alice_token) = synapse.register_user("alice", false);
    let (_admin, admin_token) = synapse.register_user("admin", true);

    let cat = sample(300 * 1024, 1);
    let mut items = vec![
        ("image/png", Some("cat.png"), cat.clone()),
        (
            "text/plain; charset=utf-8",
            Some("notes.txt"),
            b"plain notes\n".to_vec(),
        ),
        (
            "application/pdf",
            Some("Résumé ☕ 文件 \"final\".pdf"),
            sample(70_000, 2),
        ),
        ("image/png", Some("cat again.png"), cat.clone()),
        (
            "application/octet-stream",
            None,
            sample(3 * 1024 * 1024 + 17, 3),
        ),
        ("image/jpeg", Some("secret.jpg"), sample(20_000, 4)),
    ];
    let uploaded: Vec<Uploaded> = items
        .drain(..)
        .map(|(content_type, name, body)| Uploaded {
            id: upload(&synapse, &alice_token, content_type, name, &body),
            content_type,
            name,
            body,
        })
        .collect();
    let secret = &uploaded[5];
    let r = synapse.post_json(
        &format!("/_synapse/admin/v1/media/quarantine/{HS}/{}", secret.id),
        &json!({}),
        Some(&admin_token),
    );
    assert_eq!(r.status, 200, "quarantine: {}", r.text());

    let repo = MediaRepo::start(&[(HS, &synapse.base_url())], |_| {});
    let media = synapse.media_store_path();

    // The import.
    let first = import(&repo, &synapse_db, &media, &[]);
    assert_eq!(first.code, 0, "{}", first.log);
    let done = format!("{} ", line_with(&first.log, "msg=\"Import completed\""));
    for field in [" imported=6 ", "already_imported=0 ", " failed=0 "] {
        assert!(done.contains(field), "{field} in {done}");
    }
    assert!(first.log.contains("No machine id needed"), "{}", first.log);
    assert_eq!(repo.objects(), 5, "the duplicate is stored once");
    assert_eq!(repo.temp_files(), 0);

    // Every item through `mmrctl serve`: same bytes, type and filename; the quarantined one blocked.
    let auth = format!("Bearer {alice_token}");
    for item in &uploaded {
        let path = format!("/_matrix/client/v1/media/download/{HS}/{}", item.id);
        let r = repo.get(&path, &[("Host", HS), ("Authorization", &auth)]);
        if item.id == secret.id {
            assert_eq!(r.status, 404, "quarantined: {}", r.text());
            assert!(r.text().contains("quarantined"), "{}", r.text());
            continue;
        }
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert!(r.body == item.body, "{path}: the bytes differ");
        assert_eq!(r.header("content-type"), Some(item.content_type), "{path}");
        let disposition = r
            .header("content-disposition")
            .unwrap_or_default()
            .to_owned();
        match item.name {
            Some(name) if name.is_ascii() => {
                assert!(
                    disposition.contains(&format!("filename=\"{name}\"")),
                    "{disposition}"
                )
            }
            Some(name) => {
                let encoded: String = name
                    .bytes()
                    .map(|b| {
                        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
                            (b as char).to_string()
                        } else {
                            format!("%{b:02X}")
                        }
                    })
                    .collect();
                assert!(
                    disposition.contains(&format!("filename*=utf-8''{encoded}")),
                    "{disposition} for {name}"
                );
            }
            None => assert!(!disposition.contains("filename"), "{disposition}"),
        }
        // Synapse stored it with authenticated media on: it stays off the legacy endpoints.
        let legacy = repo.get(
            &format!("/_matrix/media/v3/download/{HS}/{}", item.id),
            &[("Host", HS)],
        );
        assert_eq!(legacy.status, 404, "legacy download of authenticated media");
    }

    // Rows keep the uploader and creation time.
    let mut synapse_client = synapse_db.client();
    let created: HashMap<String, (i64, String)> = synapse_client
        .query(
            "SELECT media_id, created_ts, user_id FROM local_media_repository",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let repo_url = repo.config["database"]["postgres"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut repo_client =
        testkit::postgres::Client::connect(&repo_url, testkit::postgres::NoTls).unwrap();
    let rows = repo_client
        .query(
            "SELECT media_id, created_ts, user_id, quarantined, requires_auth, kind FROM media",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 6);
    for row in rows {
        let id: String = row.get(0);
        let (ts, user) = &created[&id];
        assert_eq!(
            (row.get::<_, i64>(1), row.get::<_, String>(2)),
            (*ts, user.clone())
        );
        assert_eq!(user, &alice);
        assert_eq!(row.get::<_, bool>(3), id == secret.id, "{id} quarantine");
        assert!(row.get::<_, bool>(4), "{id} requires_auth");
        assert_eq!(row.get::<_, String>(5), "local_media");
    }

    // A rerun imports nothing and checks everything.
    let again = import(&repo, &synapse_db, &media, &[]);
    assert_eq!(again.code, 0, "{}", again.log);
    let done = format!("{} ", line_with(&again.log, "msg=\"Import completed\""));
    assert!(
        done.contains(" imported=0 ") && done.contains("already_imported=6 "),
        "{done}"
    );

    let verify = import(&repo, &synapse_db, &media, &["--verify"]);
    assert_eq!(verify.code, 0, "{}", verify.log);
    assert!(line_with(&verify.log, "msg=\"Verify passed\"").contains("verified=6"));

    // One object (used by one item only) removed: `--verify` reports exactly that item.
    let notes = &uploaded[1];
    let sha: String = repo_client
        .query_one("SELECT sha256 FROM media WHERE media_id = $1", &[&notes.id])
        .unwrap()
        .get(0);
    let object = repo.object_path(&sha);
    std::fs::remove_file(&object).unwrap();
    let verify = import(&repo, &synapse_db, &media, &["--verify"]);
    assert_eq!(verify.code, 1, "{}", verify.log);
    let problems: Vec<&str> = support::log_lines(&verify.log, "Verify problem");
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].contains(&format!("mxc://{HS}/{}", notes.id)),
        "{}",
        problems[0]
    );
    assert!(
        problems[0].contains("missing from datastore"),
        "{}",
        problems[0]
    );
    assert!(line_with(&verify.log, "msg=\"Verify failed\"").contains("problems=1"));

    // The seed's command line, through the argv[0] alias, into a second media repo. Files missing on
    // disk (one plain, the quarantined one) are fetched with an admin's token (given in the
    // environment, so the command line stays the seed's).
    let repo2 = MediaRepo::start(&[(HS, &synapse.base_url())], |_| {});
    let work = tempfile::tempdir().unwrap();
    copy_tree(&media, &work.path().join("media_store"));
    let fetched = [&uploaded[2], secret];
    for item in fetched {
        std::fs::remove_file(synapse_file(&work.path().join("media_store"), &item.id)).unwrap();
    }
    let alias = work.path().join("import_synapse");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_mmrctl"), &alias).unwrap();
    let pg = pg();
    let seed = run(Command::new(&alias)
        .current_dir(work.path())
        .env("REPO_CONFIG", repo2.dir.path().join("media-repo.yaml"))
        .env("MMRCTL_ACCESS_TOKEN", &admin_token)
        .env_remove("PGPASSWORD")
        .args([
            "-dbName",
            synapse_db.name(),
            "-dbHost",
            &pg.host,
            "-dbPort",
            &pg.port,
        ])
        .args([
            "-dbUsername",
            &pg.user,
            "-dbPassword",
            "postgres_connection_password",
        ]));
    assert_eq!(seed.code, 0, "{}", seed.log);
    let done = format!("{} ", line_with(&seed.log, "msg=\"Import completed\""));
    assert!(
        done.contains(" imported=6 ") && done.contains(" fetched=2 "),
        "{done}"
    );
    for item in &uploaded {
        if item.id == secret.id {
            continue;
        }
        let path = format!("/_matrix/client/v1/media/download/{HS}/{}", item.id);
        let r = repo2.get(&path, &[("Host", HS), ("Authorization", &auth)]);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert!(r.body == item.body, "{path}: the bytes differ");
    }
    let r = repo2.get(
        &format!("/_matrix/client/v1/media/download/{HS}/{}", secret.id),
        &[("Host", HS), ("Authorization", &auth)],
    );
    assert_eq!(r.status, 404, "the fetched quarantined item stays blocked");

    // MMR's flags are checked: a misspelt one is refused with the list of accepted ones.
    let bad = run(Command::new(&alias).args(["-dbname", "synapse"]));
    assert_eq!(bad.code, 2, "{}", bad.log);
    assert!(
        bad.log.contains("unknown flag -dbname") && bad.log.contains("-dbUsername"),
        "{}",
        bad.log
    );
}
