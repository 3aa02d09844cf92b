//! `cargo xtask bench capacity`: how far one PostgreSQL carries the queries of the hot paths,
//! measured with pgbench on mmrctl's own schema (applied by `mmrctl`, then filled with 100,000
//! media rows): what every download, upload, rate-limited request and uncached remote fetch asks
//! of the database. Divided by the statements a request makes, it says when the database, not
//! an instance, is the limit (`docs/capacity.md`).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{Run, Section, cell};
use crate::postgres;
use crate::util::{self, note};

/// Media rows the database holds while measuring.
const ROWS: u32 = 100_000;
/// pgbench clients (connections) and seconds per script.
const CLIENTS: u32 = 16;
const SECONDS: u32 = 10;

/// (name, what it stands for, pgbench script).
const SCRIPTS: &[(&str, &str, &str)] = &[
    (
        "download",
        "a download's lookup (media joined with its object)",
        "\\set n random(1, 100000)
SELECT m.origin, m.media_id, m.kind, m.content_type, m.upload_name, m.user_id, m.created_ts,
       m.quarantined, m.requires_auth, m.expires_ts, o.sha256, o.size_bytes, o.datastore_id, o.location
  FROM media m LEFT JOIN objects o ON o.sha256 = m.sha256
 WHERE m.origin = 'hs1.test' AND m.media_id = 'm' || :n;
",
    ),
    (
        "upload",
        "an upload of new content: the placement record, then one transaction (hash lock, quarantine check, object and media rows, the record dropped)",
        "\\set r random(1, 2000000000)
INSERT INTO placements (datastore_id, location, sha256, owner_pid, owner_started)
  SELECT 'ds', 'new/' || :r || '-' || pg_backend_pid(), md5(:r::text), pid, backend_start
  FROM pg_stat_activity WHERE pid = pg_backend_pid() ON CONFLICT DO NOTHING;
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended(md5(:r::text) || pg_backend_pid(), 0));
SELECT EXISTS (SELECT 1 FROM media WHERE sha256 = md5(:r::text) || pg_backend_pid() AND quarantined)
    OR EXISTS (SELECT 1 FROM quarantined_content WHERE sha256 = md5(:r::text) || pg_backend_pid());
INSERT INTO objects (sha256, size_bytes, datastore_id, location, created_ts)
  VALUES (md5(:r::text) || pg_backend_pid(), 65536, 'ds', 'new/' || :r || '-' || pg_backend_pid(), 0)
  ON CONFLICT (sha256) DO NOTHING;
SELECT size_bytes, datastore_id, location FROM objects WHERE sha256 = md5(:r::text) || pg_backend_pid();
INSERT INTO media (origin, media_id, kind, sha256, content_type, upload_name, user_id, created_ts,
                   quarantined, requires_auth)
  VALUES ('hs1.test', 'u' || :r || '-' || pg_backend_pid(), 'local_media', md5(:r::text) || pg_backend_pid(),
          'image/png', NULL, '@u_hs1.test', 0, FALSE, FALSE) ON CONFLICT DO NOTHING;
DELETE FROM placements WHERE datastore_id = 'ds' AND location = 'new/' || :r || '-' || pg_backend_pid();
COMMIT;
",
    ),
    (
        "rate limit",
        "one request's rate-limit charge in the shared bucket (10,000 clients)",
        "\\set c random(1, 10000)
INSERT INTO shared_buckets AS b (key, empty_at)
  VALUES ('rl-requests-10.0.' || :c, extract(epoch from now()) * 1000 + 200)
  ON CONFLICT (key) DO UPDATE SET empty_at = GREATEST(b.empty_at, extract(epoch from now()) * 1000) + 200
  WHERE b.empty_at <= extract(epoch from now()) * 1000
     OR b.empty_at - extract(epoch from now()) * 1000 < 2000
  RETURNING empty_at;
",
    ),
    (
        "remote check",
        "an uncached remote fetch's checks of the shared failures (media, then server)",
        "\\set n random(1, 100000)
SELECT value FROM shared_notes WHERE key = 'remote-failure-remote.test/m' || :n AND until_ts > 0;
SELECT value FROM shared_notes WHERE key = 'remote-backoff-remote.test' AND until_ts > 0;
",
    ),
];

pub(super) fn capacity(run: &Run) -> Result<Section> {
    let target = util::target_dir();
    let pg = postgres::provide(&target)?;
    let pgbench = find_pgbench()?;
    let url = with_database(&pg.url, "mmrctl_capacity");
    let psql = |sql: &str, on: &str| -> Result<()> {
        util::run_captured(
            Command::new(pgbench.with_file_name("psql")).args([
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                on,
                "-c",
                sql,
            ]),
            "psql failed (PostgreSQL's client programs sit beside pgbench)",
        )
        .map(drop)
    };
    psql("DROP DATABASE IF EXISTS mmrctl_capacity", &pg.url)?;
    psql("CREATE DATABASE mmrctl_capacity", &pg.url)?;

    // mmrctl applies its schema: any command that opens the store does.
    let mut build = util::cargo();
    build.args(["build", "-p", "mmrctl"]);
    if !util::run_status(&mut build)?.success() {
        bail!("`cargo build -p mmrctl` failed");
    }
    let dir = target.join("bench-capacity");
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("media-repo.yaml");
    std::fs::write(
        &config,
        format!(
            "database:\n  postgres: \"{url}\"\nhomeservers:\n  - name: hs1.test\n    csApi: http://127.0.0.1:9\n\
             datastores:\n  - type: file\n    id: ds\n    forKinds: [all]\n    opts:\n      path: {}\n",
            dir.join("media").display()
        ),
    )?;
    util::run_captured(
        Command::new(target.join("debug/mmrctl"))
            .args(["archive", "--config"])
            .arg(&config)
            .arg("list"),
        "mmrctl could not open the store (and apply its schema)",
    )?;
    psql(
        &format!(
            "INSERT INTO objects (sha256, size_bytes, datastore_id, location, created_ts)
               SELECT md5(i::text) || md5((-i)::text), 65536, 'ds', 'x/' || i, 0
               FROM generate_series(1, {ROWS}) i;
             INSERT INTO media (origin, media_id, kind, sha256, content_type, user_id, created_ts,
                                quarantined, requires_auth)
               SELECT 'hs1.test', 'm' || i, 'local_media', md5(i::text) || md5((-i)::text),
                      'image/png', '@u:hs1.test', 0, FALSE, FALSE
               FROM generate_series(1, {ROWS}) i;"
        ),
        &url,
    )?;
    psql("VACUUM ANALYZE", &url)?;

    let mut rows = Vec::new();
    for (name, what, script) in SCRIPTS {
        let file = dir.join(format!("{}.sql", name.replace(' ', "_")));
        std::fs::write(&file, script)?;
        let out = util::run_captured(
            Command::new(&pgbench)
                .args([
                    "-n",
                    "-M",
                    "prepared",
                    "-c",
                    &CLIENTS.to_string(),
                    "-j",
                    "2",
                ])
                .args(["-T", &SECONDS.to_string(), "-f"])
                .arg(&file)
                .arg(&url),
            "pgbench failed",
        )?;
        let tps = figure(&out, "tps = ")?;
        let latency = figure(&out, "latency average = ")?;
        note!("bench capacity: {name}: {tps:.0} per second, {latency:.2} ms on average");
        rows.push(format!("| {name} | {what} | {tps:.0} | {latency:.2} ms |"));
    }
    psql("DROP DATABASE IF EXISTS mmrctl_capacity", &pg.url)?;

    let markdown = format!(
        "## Capacity (the database)\n\n\
         pgbench on mmrctl's schema with {ROWS} media rows, {CLIENTS} connections, {SECONDS} s per \
         line, `-M prepared` (as mmrctl's cached statements; keys and user ids without their colons, which pgbench would read as variables), on the same machine as everything else \
         (PostgreSQL and pgbench share its 2 cores). Each line is what one request of that kind asks \
         of the database; what that means for several instances is in `docs/capacity.md`.\n\n\
         | date (UTC) | machine |\n| --- | --- |\n| {} | {} |\n\n\
         | hot path | what is measured | per second | mean latency |\n| --- | --- | --- | --- |\n{}",
        run.date,
        cell(&run.machine),
        rows.join("\n")
    );
    Ok(Section {
        name: "capacity",
        markdown,
        missed: Vec::new(),
    })
}

/// The number after `label` in pgbench's report.
fn figure(out: &str, label: &str) -> Result<f64> {
    out.lines()
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no `{label}` in pgbench's report:\n{out}"))
}

/// pgbench beside the server programs xtask finds (PATH, else the newest Debian version).
fn find_pgbench() -> Result<PathBuf> {
    postgres::find_bin_dir()
        .map(|dir| dir.join("pgbench"))
        .filter(|p| util::is_executable(p))
        .context("pgbench not found: install Debian's postgresql-contrib (or postgresql) package")
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, _) = url.rsplit_once('/').unwrap_or((url, ""));
    format!("{base}/{name}")
}
