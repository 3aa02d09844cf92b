//! `mmrctl import` when things are wrong: missing, truncated and corrupt files are per-item errors
//! (retried once, listed with their reason, exit status 1) and leave nothing in the store; an
//! unreachable or wrong database is a fatal error (exit status 2); a dry run writes nothing. The
//! homeserver's database is a fixture with Synapse's documented schema.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use sha2::{Digest as _, Sha256};
use support::{MediaRepo, Pg, Run, pg, sample};
use testkit::TestDb;

const HS: &str = "example.test";

/// Synapse's media tables (full_schemas/72 + deltas 86/01, 91/01), in PostgreSQL's types.
const SYNAPSE_SCHEMA: &str = "
    CREATE TABLE local_media_repository (
        media_id TEXT, media_type TEXT, media_length INTEGER, created_ts BIGINT, upload_name TEXT,
        user_id TEXT, quarantined_by TEXT, url_cache TEXT, last_access_ts BIGINT,
        safe_from_quarantine BOOLEAN NOT NULL DEFAULT FALSE,
        authenticated BOOLEAN DEFAULT FALSE NOT NULL, sha256 TEXT, UNIQUE (media_id));
    CREATE TABLE remote_media_cache (
        media_origin TEXT, media_id TEXT, media_type TEXT, created_ts BIGINT, upload_name TEXT,
        media_length INTEGER, filesystem_id TEXT, last_access_ts BIGINT, quarantined_by TEXT,
        authenticated BOOLEAN DEFAULT FALSE NOT NULL, sha256 TEXT, UNIQUE (media_origin, media_id));
";

fn mmrctl(args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mmrctl"));
    cmd.args(args).env_remove("PGPASSWORD").stdin(Stdio::null());
    let out = cmd.output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("--- mmrctl {args:?}\n{log}");
    Run {
        code: out.status.code().unwrap_or(-1),
        log,
    }
}

struct Fixture {
    db: TestDb,
    media: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let db = TestDb::new();
        db.client().batch_execute(SYNAPSE_SCHEMA).unwrap();
        Fixture {
            db,
            media: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, id: &str) -> std::path::PathBuf {
        self.media
            .path()
            .join("local_content")
            .join(&id[..2])
            .join(&id[2..4])
            .join(&id[4..])
    }

    /// A row saying `body`, and `on_disk` as the file (`None`: no file).
    fn add(&self, id: &str, body: &[u8], on_disk: Option<&[u8]>) {
        let sha = hex(&Sha256::digest(body));
        let len = i32::try_from(body.len()).unwrap();
        self.db
            .client()
            .execute(
                "INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts,
                     upload_name, user_id, sha256)
                 VALUES ($1, 'application/octet-stream', $2, 1600000000000, $1, '@u:example.test', $3)",
                &[&id, &len, &sha],
            )
            .unwrap();
        if let Some(bytes) = on_disk {
            let path = self.path(id);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
    }

    fn args<'a>(&'a self, pg: &'a Pg, config: &'a str) -> Vec<&'a str> {
        let mut args = vec!["import", "synapse", "--config", config];
        args.extend(pg.flags());
        args.extend([
            "--db-name",
            self.db.name(),
            "--media-path",
            self.media.path().to_str().unwrap(),
            "--workers",
            "3",
        ]);
        args
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn media_rows(repo: &MediaRepo) -> Vec<String> {
    let url = repo.config["database"]["postgres"].as_str().unwrap();
    let mut client = testkit::postgres::Client::connect(url, testkit::postgres::NoTls).unwrap();
    client
        .query("SELECT media_id FROM media ORDER BY media_id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn failure_line<'a>(log: &'a str, id: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains("msg=\"Not imported\"") && l.contains(&format!("mxc://{HS}/{id} ")))
        .unwrap_or_else(|| panic!("no failure line for {id} in:\n{log}"))
}

#[test]
fn bad_files_fail_per_item_and_leave_nothing_behind() {
    let fx = Fixture::new();
    let good = sample(100_000, 1);
    let truncated = sample(50_000, 2);
    let corrupt = sample(40_000, 3);
    let mut flipped = corrupt.clone();
    flipped[123] ^= 0xff;
    let long = sample(1000, 4);
    let mut longer = long.clone();
    longer.extend_from_slice(b"extra");
    fx.add("aaaaGoodOne00000000000000", &good, Some(&good));
    fx.add("bbbbMissingFile000000000", &sample(10, 5), None);
    fx.add(
        "ccccTruncated00000000000",
        &truncated,
        Some(&truncated[..truncated.len() / 2]),
    );
    fx.add("ddddCorrupt0000000000000", &corrupt, Some(&flipped));
    fx.add("eeeeTooLong0000000000000", &long, Some(&longer));
    fx.add("ffffGoodTwo0000000000000", b"", Some(b""));
    // A pending upload (no content yet) and a URL-preview row: left out, and counted.
    fx.db
        .client()
        .batch_execute(
            "INSERT INTO local_media_repository (media_id, media_type, created_ts, user_id)
             VALUES ('ggggPending0000000000000', 'image/png', 1, '@u:example.test');
             INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts, url_cache)
             VALUES ('2020-01-01_previewcache', 'text/html', 3, 1, 'https://example.org/');",
        )
        .unwrap();

    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |_| {});
    let pg = pg();
    let config = repo.dir.path().join("media-repo.yaml");
    let config = config.to_str().unwrap();

    // A dry run reports and writes nothing (it compares sizes; hashes need a real run).
    let mut args = fx.args(&pg, config);
    args.push("--dry-run");
    let dry = mmrctl(&args);
    assert_eq!(dry.code, 1, "{}", dry.log);
    assert!(dry.log.contains("would_import=3 "), "{}", dry.log);
    assert!(media_rows(&repo).is_empty());
    assert_eq!(repo.objects(), 0);

    // Not on a terminal: progress as periodic log lines (the retry's pause makes the run last long
    // enough for several).
    let mut args = fx.args(&pg, config);
    args.extend(["--log-every", "0.1"]);
    let run = mmrctl(&args);
    assert_eq!(run.code, 1, "{}", run.log);
    assert!(!run.log.contains("Import completed"), "{}", run.log);
    let progress = run
        .log
        .lines()
        .find(|l| l.contains("msg=\"Import progress\""))
        .unwrap_or_else(|| panic!("no progress line in:\n{}", run.log));
    assert!(
        progress.contains(" total_items=6 ") && progress.contains(" eta="),
        "{progress}"
    );
    assert!(
        run.log
            .contains("msg=\"Retrying failed items once\" items=4"),
        "{}",
        run.log
    );
    let summary = format!(
        "{} ",
        run.log
            .lines()
            .find(|l| l.contains("msg=\"Import finished with errors\""))
            .unwrap()
    );
    for field in [
        " imported=2 ",
        " failed=4 ",
        "skipped_pending=1 ",
        "skipped_url_cache=1 ",
    ] {
        assert!(summary.contains(field), "{field} in {summary}");
    }
    assert!(failure_line(&run.log, "bbbbMissingFile000000000").contains("reason=\"file missing: "));
    let line = failure_line(&run.log, "ccccTruncated00000000000");
    assert!(
        line.contains("size mismatch: the database says 50000 bytes")
            && line.contains("has 25000 bytes"),
        "{line}"
    );
    assert!(failure_line(&run.log, "ddddCorrupt0000000000000").contains("SHA-256 mismatch"));
    assert!(failure_line(&run.log, "eeeeTooLong0000000000000").contains("size mismatch"));
    assert_eq!(
        media_rows(&repo),
        ["aaaaGoodOne00000000000000", "ffffGoodTwo0000000000000"],
        "only the good items have rows"
    );
    assert_eq!(repo.objects(), 2, "no object for a failed item");
    assert_eq!(repo.temp_files(), 0, "no temp file left");

    // Fixed on disk, a rerun imports just those and completes.
    std::fs::write(fx.path("ccccTruncated00000000000"), &truncated).unwrap();
    std::fs::write(fx.path("ddddCorrupt0000000000000"), &corrupt).unwrap();
    std::fs::write(fx.path("eeeeTooLong0000000000000"), &long).unwrap();
    let p = fx.path("bbbbMissingFile000000000");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, sample(10, 5)).unwrap();
    let rerun = mmrctl(&fx.args(&pg, config));
    assert_eq!(rerun.code, 0, "{}", rerun.log);
    let done = format!(
        "{} ",
        rerun
            .log
            .lines()
            .find(|l| l.contains("msg=\"Import completed\""))
            .unwrap()
    );
    assert!(
        done.contains(" imported=4 ") && done.contains("already_imported=2 "),
        "{done}"
    );
    assert_eq!(media_rows(&repo).len(), 6);

    // The URL-preview cache comes when asked for (from url_cache/<date>/<rest>).
    let cache = fx.media.path().join("url_cache/2020-01-01/previewcache");
    std::fs::create_dir_all(cache.parent().unwrap()).unwrap();
    std::fs::write(&cache, b"<p>").unwrap();
    let mut args = fx.args(&pg, config);
    args.push("--include-url-cache");
    let with_cache = mmrctl(&args);
    assert_eq!(with_cache.code, 0, "{}", with_cache.log);
    assert!(
        with_cache.log.contains(" imported=1 "),
        "{}",
        with_cache.log
    );

    // An object damaged in the datastore: same size, other bytes. A rerun checks sizes and passes;
    // `--verify` reads it back and names it. Truncated, a rerun finds it too.
    let url = repo.config["database"]["postgres"].as_str().unwrap();
    let mut client = testkit::postgres::Client::connect(url, testkit::postgres::NoTls).unwrap();
    let sha: String = client
        .query_one(
            "SELECT sha256 FROM media WHERE media_id = 'aaaaGoodOne00000000000000'",
            &[],
        )
        .unwrap()
        .get(0);
    let object = repo.object_path(&sha);
    let mut damaged = good.clone();
    damaged[5] ^= 1;
    std::fs::write(&object, &damaged).unwrap();
    let rerun = mmrctl(&fx.args(&pg, config));
    assert_eq!(rerun.code, 0, "{}", rerun.log);
    let mut args = fx.args(&pg, config);
    args.push("--verify");
    let verify = mmrctl(&args);
    assert_eq!(verify.code, 1, "{}", verify.log);
    let problems: Vec<&str> = support::log_lines(&verify.log, "Verify problem");
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0].contains("aaaaGoodOne00000000000000") && problems[0].contains("hashes to"),
        "{}",
        problems[0]
    );
    std::fs::write(&object, &good[..10]).unwrap();
    let rerun = mmrctl(&fx.args(&pg, config));
    assert_eq!(rerun.code, 1, "{}", rerun.log);
    assert!(
        failure_line(&rerun.log, "aaaaGoodOne00000000000000")
            .contains("has 10 bytes instead of 100000"),
        "{}",
        rerun.log
    );
}

#[test]
fn unreachable_or_wrong_databases_are_fatal() {
    let fx = Fixture::new();
    fx.add("aaaaGoodOne00000000000000", b"x", Some(b"x"));
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |_| {});
    let pg = pg();
    let config = repo.dir.path().join("media-repo.yaml");
    let config = config.to_str().unwrap();
    let closed = support::free_port().to_string();

    // Nothing listens on the port.
    let mut args = fx.args(&pg, config);
    let at = args.iter().position(|a| *a == "--db-port").unwrap();
    args[at + 1] = &closed;
    let run = mmrctl(&args);
    assert_eq!(run.code, 2, "{}", run.log);
    let line = run
        .log
        .lines()
        .find(|l| l.contains("msg=\"Import failed\""))
        .unwrap();
    assert!(
        line.contains("cannot connect to the Synapse database") && line.contains(&closed),
        "{line}"
    );

    // A database without Synapse's tables.
    let other = TestDb::new();
    let mut args = fx.args(&pg, config);
    let at = args.iter().position(|a| *a == "--db-name").unwrap();
    args[at + 1] = other.name();
    let run = mmrctl(&args);
    assert_eq!(run.code, 2, "{}", run.log);
    assert!(
        run.log
            .contains("has no table local_media_repository: is it Synapse's database?"),
        "{}",
        run.log
    );

    // A server name that is not the homeserver's.
    let other_repo = MediaRepo::start(&[("other.test", "http://127.0.0.1:9")], |_| {});
    let other_config = other_repo.dir.path().join("media-repo.yaml");
    let run = mmrctl(&fx.args(&pg, other_config.to_str().unwrap()));
    assert_eq!(run.code, 2, "{}", run.log);
    assert!(run.log.contains("belongs to `example.test`"), "{}", run.log);

    // A media directory that does not exist.
    let mut args = fx.args(&pg, config);
    let at = args.iter().position(|a| *a == "--media-path").unwrap();
    args[at + 1] = "/nonexistent/media_store";
    let run = mmrctl(&args);
    assert_eq!(run.code, 2, "{}", run.log);
    assert!(
        run.log.contains("media directory /nonexistent/media_store"),
        "{}",
        run.log
    );

    assert!(media_rows(&repo).is_empty(), "nothing was written");
    assert_eq!(repo.objects(), 0);
    assert!(Path::new(config).exists());
}

#[test]
fn an_import_killed_midway_finishes_when_run_again() {
    let fx = Fixture::new();
    let bodies: Vec<(String, Vec<u8>)> = (0..150u64)
        .map(|i| {
            (
                format!("kill{i:04}Media00000000000"),
                sample(200_000, 100 + i),
            )
        })
        .collect();
    for (id, body) in &bodies {
        fx.add(id, body, Some(body));
    }
    // The job that deletes what a dead process placed without its row runs every 2 s.
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["uploads"] = serde_json::json!({ "maxAgeSeconds": 2 });
    });
    let pg = pg();
    let config = repo.dir.path().join("media-repo.yaml");
    let config = config.to_str().unwrap();

    let mut import = Command::new(env!("CARGO_BIN_EXE_mmrctl"))
        .args(fx.args(&pg, config))
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while media_rows(&repo).len() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the import made no progress"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    import.kill().unwrap();
    import.wait().unwrap();
    let done = media_rows(&repo).len();
    assert!(
        done < bodies.len(),
        "killed before the end ({done} imported)"
    );

    let run = mmrctl(&fx.args(&pg, config));
    assert_eq!(run.code, 0, "{}", run.log);
    assert_eq!(media_rows(&repo).len(), bodies.len());
    for (id, body) in &bodies {
        let r = repo.download(HS, id, &[]);
        assert!(r.status == 200 && r.body == *body, "{id}: {}", r.status);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while repo.count("SELECT COUNT(*) FROM placements") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "placements of the killed import left"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    support::check_clean(&repo.dir.path().join("media-repo.yaml"), support::FILE_ID);
}
