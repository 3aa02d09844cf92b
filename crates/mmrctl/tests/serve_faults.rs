//! Faults on purpose, each followed by `datastores check` and a download of every upload that was
//! acknowledged: the server killed during uploads, PostgreSQL restarted under them, the
//! datastore's disk full. (S3 failing is in s3_media.rs, killed transfers and purges in
//! serve_admin.rs, a killed instance's jobs in serve_jobs.rs.)

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

mod support;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{FILE_ID, MediaRepo, SHARED_SECRET, check_clean, sample};
use testkit::PgServer;

const HS: &str = "hs1.test";

/// What uploaders saw: acknowledged uploads (media id, length, seed) and every status.
#[derive(Default)]
struct Outcomes {
    acknowledged: Vec<(String, usize, u64)>,
    statuses: Vec<u16>,
    /// Requests that got no response at all.
    cut: usize,
}

/// Uploads from `clients` threads to `repo` until `stop`, sizes from 10 KB to about 2 MB.
fn upload_until(repo: &MediaRepo, clients: u64, stop: &AtomicBool, out: &Mutex<Outcomes>) {
    let url = repo.url("/_matrix/media/v3/upload");
    std::thread::scope(|s| {
        for client in 0..clients {
            let url = &url;
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let seed = client * 1_000_000 + n;
                    let len = 10_000 + (seed.wrapping_mul(2_654_435_761) % 2_000_000) as usize;
                    let body = sample(len, seed);
                    let auth = format!("Bearer {SHARED_SECRET}");
                    let r = testkit::http::try_send(
                        "POST",
                        url,
                        &[("Host", HS), ("Authorization", &auth)],
                        Some("application/octet-stream"),
                        &body,
                    );
                    let mut out = out.lock().unwrap();
                    match r {
                        Ok(r) => {
                            out.statuses.push(r.status);
                            if r.status == 200 {
                                let uri = r.json()["content_uri"].as_str().unwrap().to_owned();
                                let id = uri.rsplit('/').next().unwrap().to_owned();
                                out.acknowledged.push((id, len, seed));
                            }
                        }
                        Err(_) => out.cut += 1,
                    }
                }
            });
        }
    });
}

/// Waits until `done` says so, at most `bound`.
fn wait_until(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {bound:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every acknowledged upload comes back byte for byte, at most `unanswered` more were stored
/// (committed, then the answer was lost), and the datastore and the database agree.
fn nothing_lost(
    repo: &MediaRepo,
    config: &std::path::Path,
    acknowledged: &[(String, usize, u64)],
    unanswered: usize,
) {
    for (id, len, seed) in acknowledged {
        let r = repo.download(HS, id, &[]);
        assert_eq!((r.status, r.body.len()), (200, *len), "{id}");
        assert!(r.body == sample(*len, *seed), "{id}: other bytes");
    }
    // Files placed without their row (the process died, or the database went away before
    // the row was written) are deleted by the job that finishes interrupted deletions (every
    // 2 s here), once the database has seen the placing session go.
    wait_until(
        "the interrupted placements deleted",
        Duration::from_secs(20),
        || {
            repo.count("SELECT (SELECT COUNT(*) FROM pending_deletions) + (SELECT COUNT(*) FROM placements)") == 0
        },
    );
    let rows = repo.media_rows() as usize;
    assert!(
        (acknowledged.len()..=acknowledged.len() + unanswered).contains(&rows),
        "{rows} media rows for {} acknowledged uploads and {unanswered} unanswered",
        acknowledged.len()
    );
    check_clean(config, FILE_ID);
}

/// Any size; the job that finishes interrupted deletions every 2 s.
fn tweak(c: &mut Value) {
    c["uploads"] = json!({ "minBytes": 0, "maxAgeSeconds": 2 });
}

#[test]
fn a_server_killed_during_uploads_loses_nothing_acknowledged() {
    let mut repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], tweak);
    let (stop, out) = (AtomicBool::new(false), Mutex::new(Outcomes::default()));
    std::thread::scope(|s| {
        s.spawn(|| upload_until(&repo, 6, &stop, &out));
        wait_until("10 acknowledged uploads", Duration::from_secs(60), || {
            out.lock().unwrap().acknowledged.len() >= 10
        });
        repo.signal("KILL");
        stop.store(true, Ordering::Relaxed);
    });
    let out = out.into_inner().unwrap();
    assert!(out.cut >= 1, "the kill cut uploads in flight");
    assert!(out.statuses.iter().all(|s| *s == 200), "{:?}", out.statuses);

    let config = repo.config_path();
    let again = MediaRepo::start_with_config_file(&config, repo.port, repo.db.take(), &[]);
    // What it left in the temp directory is not media (the stale-temp-files job's).
    nothing_lost(&again, &config, &out.acknowledged, out.cut);
}

#[test]
fn postgres_restarted_during_uploads_gives_503_then_recovers_by_itself() {
    let pg = PgServer::start();
    let repo = MediaRepo::spawn(None, &pg.url(), &[(HS, "http://127.0.0.1:9")], tweak);
    repo.wait_healthy();
    let (stop, out) = (AtomicBool::new(false), Mutex::new(Outcomes::default()));
    let before = std::thread::scope(|s| {
        s.spawn(|| upload_until(&repo, 4, &stop, &out));
        wait_until("5 acknowledged uploads", Duration::from_secs(60), || {
            out.lock().unwrap().acknowledged.len() >= 5
        });
        pg.stop();
        std::thread::sleep(Duration::from_millis(1500));
        pg.start_again();
        let before = out.lock().unwrap().acknowledged.len();
        wait_until(
            "uploads acknowledged again",
            Duration::from_secs(30),
            || out.lock().unwrap().acknowledged.len() >= before + 5,
        );
        stop.store(true, Ordering::Relaxed);
        before
    });
    let out = out.into_inner().unwrap();
    assert_eq!(out.cut, 0, "every request got an answer");
    assert!(
        out.statuses.iter().all(|s| matches!(s, 200 | 503)),
        "{:?}\n{}",
        out.statuses,
        repo.log()
    );
    assert!(out.statuses.contains(&503), "the outage was answered 503");
    assert!(out.acknowledged.len() >= before + 5);
    nothing_lost(&repo, &repo.config_path(), &out.acknowledged, 0);
}

/// A tmpfs of `mib` MiB mounted for the test, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(mib: u32) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        Tmpfs::mount_options(dir.path(), &format!("size={mib}m"));
        Tmpfs(dir)
    }

    fn mount_options(path: &std::path::Path, options: &str) {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} ({options}): {}. This test needs root (CAP_SYS_ADMIN), \
             as `cargo xtask test` has on this machine kind",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Grows it to `mib` MiB, keeping its files.
    fn grow(&self, mib: u32) {
        Tmpfs::mount_options(self.0.path(), &format!("remount,size={mib}m"));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .output();
    }
}

#[test]
fn a_full_disk_refuses_uploads_with_507_and_recovers_when_space_returns() {
    let disk = Tmpfs::mount(8);
    let media = disk.0.path().join("media");
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        tweak(c);
        c["datastores"][0]["opts"]["path"] = json!(media);
    });
    let mut acknowledged = Vec::new();
    let refused = loop {
        let seed = acknowledged.len() as u64;
        let body = sample(1_500_000, seed);
        let r = repo.upload_response(HS, SHARED_SECRET, "application/octet-stream", None, &body);
        if r.status != 200 {
            break r;
        }
        let uri = r.json()["content_uri"].as_str().unwrap().to_owned();
        acknowledged.push((uri.rsplit('/').next().unwrap().to_owned(), body.len(), seed));
        assert!(acknowledged.len() < 10, "8 MiB held 10 uploads of 1.5 MB");
    };
    assert_eq!(refused.status, 507, "{}", refused.text());
    assert!(refused.text().contains("full"), "{}", refused.text());
    // Nothing half-written: no temp file, no row, every earlier upload intact.
    assert_eq!(repo.temp_files(), 0);
    nothing_lost(&repo, &repo.config_path(), &acknowledged, 0);

    disk.grow(32);
    let body = sample(1_500_000, 99);
    let id = repo.upload(HS, SHARED_SECRET, "application/octet-stream", None, &body);
    acknowledged.push((id, body.len(), 99));
    nothing_lost(&repo, &repo.config_path(), &acknowledged, 0);
}
