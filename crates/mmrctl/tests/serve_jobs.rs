//! `mmrctl serve`'s recurring jobs on a real PostgreSQL: what they clean up, that one instance at
//! a time runs each across every instance on the database, that another takes over when the
//! holder dies, and that SIGTERM does not wait for a running job.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

mod support;

use std::thread;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use support::MediaRepo;

const HS: &str = "example.test";
const HOLD_VAR: &str = "MMRCTL_TEST_JOB_HOLD_SECONDS";
const JOB: &str = "expire-reservations";

fn pending_rows(repo: &MediaRepo) -> i64 {
    repo.db
        .as_ref()
        .unwrap()
        .client()
        .query_one("SELECT COUNT(*) FROM media WHERE sha256 IS NULL", &[])
        .unwrap()
        .get(0)
}

fn wait_until(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {bound:?}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn expired_reservations_are_deleted_and_free_the_pending_quota() {
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["uploads"] = json!({ "maxPending": 1, "maxAgeSeconds": 1 })
    });
    assert_eq!(repo.create(HS).status, 200);
    assert_eq!(repo.create(HS).status, 429, "one reservation at a time");
    wait_until(
        "the expired reservation deleted",
        Duration::from_secs(20),
        || pending_rows(&repo) == 0,
    );
    assert!(
        repo.log().contains("expired reservations deleted"),
        "{}",
        repo.log()
    );
    assert_eq!(repo.create(HS).status, 200, "the quota is free again");
}

#[test]
fn temp_files_a_crash_left_are_deleted_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("media/.tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 86_400);
    for (name, modified) in [
        ("mmrctl-upload-crashed", two_days_ago),
        ("mmrctl-transfer-crashed", two_days_ago),
        ("mmrctl-upload-in-progress", SystemTime::now()),
        ("not-ours", two_days_ago),
    ] {
        std::fs::File::create(tmp.join(name))
            .unwrap()
            .set_modified(modified)
            .unwrap();
    }
    let media = dir.path().join("media");
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], move |c| {
        c["datastores"][0]["opts"]["path"] = json!(media)
    });
    wait_until("the first run", Duration::from_secs(20), || {
        repo.log().contains("2 stale temp files deleted")
    });
    let mut left: Vec<String> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["mmrctl-upload-in-progress", "not-ours"]);
}

/// `(started, finished)` of each run of `JOB` in a server log, as the log's timestamps (RFC 3339
/// with microseconds, so they compare as strings); `finished` is `None` while it runs.
fn runs(log: &str) -> Vec<(String, Option<String>)> {
    let mut runs: Vec<(String, Option<String>)> = Vec::new();
    for line in log
        .lines()
        .filter(|l| l.contains(&format!("job=\"{JOB}\"")))
    {
        let at = line.split_whitespace().next().unwrap().to_owned();
        if line.contains("job started") {
            runs.push((at, None));
        } else if line.contains("job finished") || line.contains("job failed") {
            runs.last_mut().unwrap().1 = Some(at);
        }
    }
    runs
}

#[test]
fn a_job_runs_on_one_instance_at_a_time_and_another_takes_over_when_it_dies() {
    // Owned here: it outlives every instance, whichever is killed.
    let db = testkit::TestDb::new();
    let url = db.url().to_owned();
    let media = tempfile::tempdir().unwrap();
    let media_path = media.path().to_path_buf();
    // Each run holds its lock 2 s; every instance tries every second.
    let repos: Vec<MediaRepo> = (0..3)
        .map(|_| {
            let media_path = media_path.clone();
            MediaRepo::spawn_with_env(
                None,
                &url,
                &[(HS, "http://127.0.0.1:9")],
                &[(HOLD_VAR, "2")],
                move |c| {
                    c["uploads"] = json!({ "maxAgeSeconds": 1 });
                    c["datastores"][0]["opts"]["path"] = json!(media_path);
                },
            )
        })
        .collect();
    for repo in &repos {
        repo.wait_healthy();
    }

    // Whoever holds the lock: wait for a run in progress, then kill its instance.
    let mut holder = None;
    wait_until("a run in progress", Duration::from_secs(30), || {
        holder = repos
            .iter()
            .position(|r| runs(&r.log()).last().is_some_and(|(_, end)| end.is_none()));
        holder.is_some()
    });
    let holder = holder.unwrap();
    let before: Vec<usize> = repos.iter().map(|r| runs(&r.log()).len()).collect();
    repos[holder].signal("KILL");
    let others: Vec<usize> = (0..3).filter(|i| *i != holder).collect();
    wait_until(
        "another instance takes over",
        Duration::from_secs(30),
        || {
            others
                .iter()
                .any(|i| runs(&repos[*i].log()).len() > before[*i])
        },
    );
    // A few more runs among the two left (waited for, not timed: a loaded machine is slower).
    let total = |repos: &[MediaRepo]| repos.iter().map(|r| runs(&r.log()).len()).sum::<usize>();
    let wanted = before.iter().sum::<usize>() + 3;
    wait_until("two more runs", Duration::from_secs(60), || {
        total(&repos) >= wanted
    });

    // No two runs overlapped, on any instance, before or after the kill. A run without an end is
    // still going (then nothing may start after it) or was killed (its lock went with its
    // connection, so the next run starts after it ended).
    let mut all: Vec<(String, String, usize)> = Vec::new();
    for (i, repo) in repos.iter().enumerate() {
        for (start, end) in runs(&repo.log()) {
            all.push((start, end.unwrap_or_else(|| "running".to_owned()), i));
        }
    }
    all.sort();
    assert!(all.len() >= 4, "too few runs to tell: {all:?}");
    let killed = all.iter().rposition(|(_, _, i)| *i == holder).unwrap();
    for (n, pair) in all.windows(2).enumerate() {
        let ((_, end, a), (start, _, b)) = (&pair[0], &pair[1]);
        assert!(
            n == killed || end <= start,
            "runs overlap: instance {a} until {end}, instance {b} from {start}: {all:?}"
        );
    }
    let ran_on: std::collections::BTreeSet<usize> = all.iter().map(|r| r.2).collect();
    assert!(ran_on.len() >= 2, "the job never moved: {all:?}");
    drop(db);
}

#[test]
fn sigterm_cancels_a_running_job_at_once_while_requests_drain() {
    let db = testkit::TestDb::new();
    let url = db.url().to_owned();
    let mut repo = MediaRepo::spawn_with_env(
        Some(db),
        &url,
        &[(HS, "http://127.0.0.1:9")],
        &[(HOLD_VAR, "600")],
        // Every job holds its worker for 10 minutes here: enough workers for all of them.
        |c| c["tasks"] = serde_json::json!({ "numWorkers": 10 }),
    );
    repo.wait_healthy();
    wait_until("a run in progress", Duration::from_secs(20), || {
        runs(&repo.log())
            .last()
            .is_some_and(|(_, end)| end.is_none())
    });
    // A request in flight for 8 s: a download waiting for content that never comes.
    let created = repo.create(HS).json();
    let uri = created["content_uri"].as_str().unwrap();
    let id = uri.rsplit('/').next().unwrap().to_owned();
    let port = repo.port;
    let waiting = thread::spawn(move || {
        testkit::http::get(
            &format!(
                "http://127.0.0.1:{port}/_matrix/client/v1/media/download/{HS}/{id}?timeout_ms=8000"
            ),
            &[("Host", HS), ("Authorization", "Bearer test-shared-secret")],
        )
        .status
    });
    thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    repo.signal("TERM");
    wait_until("the jobs stopped", Duration::from_secs(20), || {
        repo.log().contains("background tasks stopped")
    });
    // The run would hold its lock for 10 minutes; the request is still waiting.
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "stopping waited: {:?}",
        asked.elapsed()
    );
    assert!(!waiting.is_finished(), "the request was cut, not drained");
    assert_eq!(
        waiting.join().unwrap(),
        504,
        "the drained request got its answer"
    );
    let status = repo.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}: {}", repo.log());
    assert!(repo.log().contains("stopped"), "{}", repo.log());
}
