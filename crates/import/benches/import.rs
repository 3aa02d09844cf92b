//! `mmrctl import synapse` on a fixture: a database with Synapse's media schema and small files in
//! Synapse's layout, created directly (no Synapse running). Runs the real binary as a child process
//! and samples its peak RSS (`VmHWM`), at 1,000 and at 10,000 items, to show memory stays flat in the
//! number of items; then a rerun (everything already imported: checked, not written).
//!
//! Needs `MMRCTL_TEST_DATABASE_URL` (a server where databases may be created) and the release binary
//! (`MMRCTL_BIN`, else `target/release/mmrctl`): `cargo xtask bench` provides both.
#![allow(clippy::print_stdout, clippy::print_stderr, clippy::unwrap_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use testkit::TestDb;

const SERVER: &str = "bench.test";
/// Items of the measured import (`MMRCTL_BENCH_IMPORT_ITEMS` overrides); the memory comparison runs
/// a tenth of them first.
const ITEMS: usize = 10_000;

const SCHEMA: &str = "
    CREATE TABLE local_media_repository (
        media_id TEXT, media_type TEXT, media_length INTEGER, created_ts BIGINT, upload_name TEXT,
        user_id TEXT, quarantined_by TEXT, url_cache TEXT, last_access_ts BIGINT,
        safe_from_quarantine BOOLEAN NOT NULL DEFAULT FALSE,
        authenticated BOOLEAN DEFAULT FALSE NOT NULL, sha256 TEXT, UNIQUE (media_id));
";

/// A Synapse-shaped source: `n` rows and their files, 1–4 KiB each, all different.
struct Source {
    db: TestDb,
    media: tempfile::TempDir,
    bytes: u64,
}

fn source(n: usize) -> Source {
    let db = TestDb::new();
    let mut client = db.client();
    client.batch_execute(SCHEMA).unwrap();
    let media = tempfile::tempdir().unwrap();
    let mut rows = Vec::with_capacity(n * 120);
    let mut bytes = 0u64;
    for i in 0..n {
        let seed = Sha256::digest(format!("item {i}").as_bytes());
        let id: String = hex(&seed)[..24].to_owned();
        let len = 1024 + (usize::from(seed[0]) * 12);
        let body: Vec<u8> = (0..len)
            .map(|j| seed[j % 32].wrapping_add((j / 32) as u8))
            .collect();
        let sha = hex(&Sha256::digest(&body));
        let path = media
            .path()
            .join("local_content")
            .join(&id[..2])
            .join(&id[2..4]);
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join(&id[4..]), &body).unwrap();
        bytes += len as u64;
        writeln!(
            rows,
            "{id}\timage/png\t{len}\t{}\tfile{i}.png\t@user{}:{SERVER}\t{sha}",
            1_600_000_000_000u64 + i as u64,
            i % 50
        )
        .unwrap();
    }
    let mut copy = client
        .copy_in(
            "COPY local_media_repository (media_id, media_type, media_length, created_ts, upload_name, \
             user_id, sha256) FROM STDIN",
        )
        .unwrap();
    copy.write_all(&rows).unwrap();
    copy.finish().unwrap();
    Source { db, media, bytes }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A media repo config on a fresh database, with a file datastore in `dir`.
fn repo_config(dir: &Path, db: &TestDb) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "repo": { "bindAddress": "127.0.0.1", "port": 8000, "logDirectory": "-" },
        "database": { "postgres": db.url(), "pool": { "maxConnections": 25, "maxIdleConnections": 5 } },
        "homeservers": [{ "name": SERVER, "csApi": "http://127.0.0.1:9" }],
        "datastores": [{ "type": "file", "id": "bench", "forKinds": ["all"],
                         "opts": { "path": dir.join("datastore") } }],
    });
    let path = dir.join("media-repo.yaml");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

struct Measured {
    seconds: f64,
    peak_rss_kib: u64,
    log: String,
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn mmrctl() -> PathBuf {
    std::env::var_os("MMRCTL_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/release/mmrctl"),
        PathBuf::from,
    )
}

/// Runs the import as a child process; its peak RSS is sampled until it exits.
fn import(src: &Source, config: &Path) -> Measured {
    let url = testkit::parse_url(&testkit::database_url());
    let host = url.host.unwrap_or_default();
    let port = url.port.unwrap_or(5432).to_string();
    let user = url.user.unwrap_or_else(|| "postgres".to_owned());
    let log_path = config.with_file_name("import.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let binary = mmrctl();
    assert!(
        binary.is_file(),
        "{} is missing: run `cargo xtask bench` (it builds it), or set MMRCTL_BIN",
        binary.display()
    );
    let start = Instant::now();
    let mut child = Command::new(&binary)
        .args(["import", "synapse", "--config"])
        .arg(config)
        .args(["--db-host", &host, "--db-port", &port, "--db-user", &user])
        .args(["--db-name", src.db.name(), "--media-path"])
        .arg(src.media.path())
        .args(
            std::env::var("MMRCTL_BENCH_IMPORT_WORKERS")
                .map(|w| vec!["--workers".to_owned(), w])
                .unwrap_or_default(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = peak_rss_kib(child.id()) {
            peak = peak.max(kib);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let seconds = start.elapsed().as_secs_f64();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        status.success() && log.contains("msg=\"Import completed\""),
        "the import failed ({status}):\n{log}"
    );
    Measured {
        seconds,
        peak_rss_kib: peak,
        log,
    }
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let items: usize = std::env::var("MMRCTL_BENCH_IMPORT_ITEMS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(ITEMS);
    let small_items = (items / 10).max(1);
    eprintln!("bench import: creating the fixtures ({small_items} and {items} files)");
    let small = source(small_items);
    let big = source(items);

    let dir = tempfile::tempdir().unwrap();
    let small_db = TestDb::new();
    let small_config = repo_config(&dir.path().join("small"), &small_db);
    let small_run = import(&small, &small_config);

    let big_db = TestDb::new();
    let big_config = repo_config(&dir.path().join("big"), &big_db);
    let run = import(&big, &big_config);
    assert!(
        run.log.contains(&format!(" imported={items} ")),
        "not every item was imported:\n{}",
        run.log
    );
    let rerun = import(&big, &big_config);
    assert!(
        rerun.log.contains(&format!("already_imported={items} ")),
        "the rerun did not find everything imported:\n{}",
        rerun.log
    );

    let items_per_s = items as f64 / run.seconds;
    let mib_per_s = big.bytes as f64 / run.seconds / 1_048_576.0;
    let rerun_items_per_s = items as f64 / rerun.seconds;
    if json {
        println!(
            "{{\"name\":\"import_synapse_{items}\",\"items\":{items},\"bytes\":{},\"seconds\":{:.3},\
             \"items_per_s\":{items_per_s:.1},\"mib_per_s\":{mib_per_s:.2},\"peak_rss_kib\":{},\
             \"small_items\":{small_items},\"small_peak_rss_kib\":{},\"rerun_items_per_s\":{rerun_items_per_s:.1}}}",
            big.bytes, run.seconds, run.peak_rss_kib, small_run.peak_rss_kib
        );
    } else {
        println!(
            "import {items} files ({:.1} MiB): {:.2} s, {items_per_s:.0} items/s, {mib_per_s:.1} MiB/s; \
             peak RSS {} KiB ({} KiB at {small_items} items); rerun {rerun_items_per_s:.0} items/s",
            big.bytes as f64 / 1_048_576.0,
            run.seconds,
            run.peak_rss_kib,
            small_run.peak_rss_kib
        );
    }
}
