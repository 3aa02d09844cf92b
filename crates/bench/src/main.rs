//! `mmrctl-bench`: `mmrctl serve` side by side with Synapse's built-in media repo, both on the same
//! PostgreSQL server, with the machine's own limits measured in the same run. `cargo xtask bench`
//! runs it (with the PostgreSQL server and tools venv that `cargo xtask test` provides) and writes
//! the figures to `docs/benchmarks.md`.
//!
//! Progress goes to stderr; the result is one flat JSON object on the last line of stdout.
//!
//! ```text
//! mmrctl-bench [--mmrctl PATH] [--quick] [--federation] [--soak SECONDS]
//! ```
//!
//! `--mmrctl` defaults to the `mmrctl` beside this binary; `--quick` shrinks every size for a smoke
//! run (its figures mean nothing). `--federation` runs the federation bench instead
//! ([`federation`]: remote media fetched by mmrctl and by Synapse from a static remote behind
//! nginx, which it needs: `MMRCTL_NGINX`).
#![allow(clippy::print_stdout, clippy::print_stderr)] // Printing is this binary's job.

/// A progress line on stderr.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("mmrctl-bench: {}", format_args!($($arg)*))
    };
}

mod federation;
mod limits;
mod load;
mod previews;
mod procfs;
mod servers;
mod soak;
mod thumbnails;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures_util::StreamExt as _;
use serde_json::{Map, Value, json};

use crate::load::Bodies;
use crate::procfs::{MIB, PeakRss};
use crate::servers::{MediaRepo, SynapseServer, Target};

/// The homeserver both servers serve media for.
const SERVER_NAME: &str = "bench.test";

/// The targets, as the tracker states them.
const UPLOAD_OF_LIMIT: f64 = 0.8;
const DOWNLOAD_MB_S: f64 = 1000.0;
const VS_SYNAPSE: f64 = 3.0;
const PEAK_RSS_MIB: f64 = 100.0;
const IDLE_RSS_MIB: f64 = 30.0;

/// What one run measures, and how much of it.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    sha256: u64,
    fsync: u64,
    upload: u64,
    /// Uploads of `upload` bytes (distinct content); the best counts.
    upload_runs: u64,
    /// Downloads of the first upload; the best counts.
    download_runs: u64,
    small: u64,
    small_requests: u64,
    small_in_flight: usize,
    clients: u64,
    client_upload: u64,
}

const FULL: Sizes = Sizes {
    sha256: 512 * MIB,
    fsync: 1024 * MIB,
    upload: 100 * MIB,
    upload_runs: 3,
    download_runs: 3,
    small: 64 * 1024,
    small_requests: 2000,
    small_in_flight: 50,
    clients: 20,
    client_upload: 100 * MIB,
};

const QUICK: Sizes = Sizes {
    sha256: 64 * MIB,
    fsync: 64 * MIB,
    upload: 10 * MIB,
    upload_runs: 2,
    download_runs: 2,
    small: 64 * 1024,
    small_requests: 100,
    small_in_flight: 50,
    clients: 4,
    client_upload: 10 * MIB,
};

/// What one server achieved.
#[derive(Debug, Default)]
struct Figures {
    upload_mb_s: f64,
    download_mb_s: f64,
    small_req_s: f64,
    small_p50_ms: f64,
    small_p99_ms: f64,
    clients_mb_s: f64,
    peak_rss: u64,
    idle_rss: u64,
    idle_rss_after: u64,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mmrctl-bench: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command line.
struct Options {
    mmrctl: PathBuf,
    sizes: Sizes,
    /// Leave Synapse out (for profiling mmrctl): no comparison, no targets.
    mmrctl_only: bool,
    phases: Phases,
    /// The federation bench instead of the serve one.
    federation: bool,
    /// The thumbnail bench instead of the serve one.
    thumbnails: bool,
    /// The URL preview bench instead of the serve one.
    previews: bool,
    /// The soak (three instances, mixed load) for this many seconds instead of the serve bench.
    soak: Option<u64>,
    quick: bool,
}

/// Which phases run (all of them unless `--phases` says otherwise).
#[derive(Debug, Clone, Copy)]
struct Phases {
    upload: bool,
    download: bool,
    small: bool,
    clients: bool,
}

const USAGE: &str = "usage: mmrctl-bench [--mmrctl PATH] [--quick] [--mmrctl-only] \
                     [--phases upload,download,small,clients] | [--federation] | [--thumbnails] | [--previews] | [--soak SECONDS]";

fn options() -> Result<Options> {
    let mut mmrctl = None;
    let mut sizes = FULL;
    let mut mmrctl_only = false;
    let mut federation = false;
    let mut thumbnails = false;
    let mut previews = false;
    let mut soak = None;
    let mut quick = false;
    let mut phases = Phases {
        upload: true,
        download: true,
        small: true,
        clients: true,
    };
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--mmrctl") => {
                mmrctl = Some(PathBuf::from(args.next().context(USAGE)?));
            }
            Some("--quick") => {
                sizes = QUICK;
                quick = true;
            }
            Some("--federation") => federation = true,
            Some("--thumbnails") => thumbnails = true,
            Some("--previews") => previews = true,
            Some("--soak") => {
                let secs = args.next().context(USAGE)?;
                soak = Some(secs.to_str().and_then(|s| s.parse().ok()).context(USAGE)?);
            }
            Some("--mmrctl-only") => mmrctl_only = true,
            Some("--phases") => {
                let list = args.next().context(USAGE)?;
                let list = list.to_str().context(USAGE)?;
                phases = Phases {
                    upload: false,
                    download: false,
                    small: false,
                    clients: false,
                };
                for phase in list.split(',') {
                    match phase {
                        "upload" => phases.upload = true,
                        "download" => phases.download = true,
                        "small" => phases.small = true,
                        "clients" => phases.clients = true,
                        other => bail!("unknown phase `{other}`; {USAGE}"),
                    }
                }
            }
            _ => bail!("unknown argument {arg:?}; {USAGE}"),
        }
    }
    let mmrctl = match mmrctl {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("mmrctl"),
    };
    if !mmrctl.is_file() {
        bail!(
            "{} does not exist: build it (`cargo build --release -p mmrctl`) or pass --mmrctl",
            mmrctl.display()
        );
    }
    Ok(Options {
        mmrctl,
        sizes,
        mmrctl_only,
        phases,
        federation,
        thumbnails,
        previews,
        soak,
        quick,
    })
}

/// Prints a bench's result line: `out`, each check's `target_<key>` and `pass_<key>`, and the
/// load average at the end.
pub(crate) fn print_result(mut out: Map<String, Value>, checks: &[(&str, bool, f64)]) {
    for (key, pass, target) in checks {
        out.insert(format!("target_{key}"), json!(target));
        out.insert(format!("pass_{key}"), json!(pass));
    }
    out.insert("loadavg_end".into(), json!(loadavg()));
    println!("{}", Value::Object(out));
}

/// The 1-minute load average: what else the machine was doing, for the record.
pub(crate) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(-1.0)
}

/// Waits (up to 10 minutes) until the machine's CPU is at most 10% busy over 2 s, so that the
/// figures are not someone else's build; returns how busy it was when measuring started. First it
/// writes out what other work left in the page cache: that writeback (a build's hundreds of MB)
/// would otherwise share the disk with the measures.
pub(crate) fn wait_until_quiet() -> f64 {
    rustix::fs::sync();
    const QUIET: f64 = 10.0;
    let window = Duration::from_secs(2);
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut said = None::<Instant>;
    loop {
        let busy = procfs::machine_busy(window).unwrap_or(0.0);
        if busy <= QUIET {
            return busy;
        }
        if Instant::now() >= deadline {
            progress!(
                "the machine is still {busy:.0}% busy after 10 minutes: measuring anyway \
                 (the figures will suffer)"
            );
            return busy;
        }
        if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
            progress!(
                "the machine is {busy:.0}% busy (other work): waiting until it is at most \
                 {QUIET:.0}% busy"
            );
            said = Some(Instant::now());
        }
    }
}

fn run() -> Result<()> {
    let Options {
        mmrctl,
        sizes,
        mmrctl_only,
        phases,
        federation,
        thumbnails,
        previews,
        soak,
        quick,
    } = options()?;
    if let Some(seconds) = soak {
        return soak::run(&mmrctl, seconds);
    }
    if previews {
        let sizes = if quick {
            previews::QUICK
        } else {
            previews::FULL
        };
        return previews::run(&mmrctl, sizes);
    }
    if thumbnails {
        let sizes = if quick {
            thumbnails::QUICK
        } else {
            thumbnails::FULL
        };
        return thumbnails::run(&mmrctl, sizes);
    }
    if federation {
        let sizes = if quick {
            federation::QUICK
        } else {
            federation::FULL
        };
        return federation::run(&mmrctl, sizes, mmrctl_only);
    }
    let busy_start = wait_until_quiet();
    let loadavg_start = loadavg();
    let dir = tempfile::Builder::new().prefix("mmrctl-bench-").tempdir()?;
    let datastore = MediaRepo::datastore_dir(dir.path());
    std::fs::create_dir_all(&datastore)?;

    // The limits first, with nothing else of ours running.
    progress!("SHA-256 over {} MiB on one core ...", sizes.sha256 / MIB);
    let sha256 = limits::sha256(sizes.sha256);
    progress!("SHA-256: {sha256:.0} MB/s");
    progress!(
        "writing {} MiB + fsync in {} ...",
        sizes.fsync / MIB,
        datastore.display()
    );
    let fsync = limits::write_fsync(&datastore, sizes.fsync)?;
    progress!("write + fsync: {fsync:.0} MB/s");
    let upload_limit = sha256.min(fsync);

    // Each server is measured alone, the other not running: beside an idle Synapse (still
    // finishing its start-up, then waking for periodic work), mmrctl's uploads measured lower.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let bodies = Bodies::new();
    let client = load::client()?;
    progress!("starting mmrctl serve ({}) ...", mmrctl.display());
    // With shared-secret auth mmrctl never asks the homeserver: nothing listens at this address.
    let repo = MediaRepo::start(&mmrctl, dir, SERVER_NAME, "http://127.0.0.1:9")?;
    // Let it settle (start-up work, first background tasks) before calling it idle.
    std::thread::sleep(Duration::from_secs(2));
    let ours = runtime
        .block_on(measure(
            &client,
            &repo.target(SERVER_NAME),
            &bodies,
            &sizes,
            phases,
            1 << 32,
        ))
        .map_err(|e| e.context(format!("mmrctl serve's log:\n{}", repo.log_tail())))?;
    // Stop it and remove its data.
    drop(repo);

    let synapse = if mmrctl_only {
        None
    } else {
        progress!("starting Synapse (PostgreSQL) ...");
        let synapse = SynapseServer::start(SERVER_NAME)?;
        std::thread::sleep(Duration::from_secs(2));
        Some(synapse)
    };
    let theirs = match &synapse {
        Some(synapse) => Some(runtime.block_on(measure(
            &client,
            &synapse.target(),
            &bodies,
            &sizes,
            phases,
            2 << 32,
        ))?),
        None => None,
    };
    drop(runtime);

    let mut out = Map::new();
    let mut put = |k: &str, v: Value| {
        out.insert(k.to_owned(), v);
    };
    put("name", json!("serve"));
    if let Some(synapse) = &synapse {
        put("synapse_version", json!(synapse.version()));
    }
    put("busy_start_pct", json!(busy_start));
    put("loadavg_start", json!(loadavg_start));
    put("loadavg_end", json!(loadavg()));
    put("upload_bytes", json!(sizes.upload));
    put("upload_runs", json!(sizes.upload_runs));
    put("download_runs", json!(sizes.download_runs));
    put("small_bytes", json!(sizes.small));
    put("small_requests", json!(sizes.small_requests));
    put("small_in_flight", json!(sizes.small_in_flight));
    put("clients", json!(sizes.clients));
    put("client_bytes", json!(sizes.client_upload));
    put("sha256_mb_s", json!(sha256));
    put("fsync_mb_s", json!(fsync));
    put("upload_limit_mb_s", json!(upload_limit));
    for (who, f) in [("mmrctl", Some(&ours)), ("synapse", theirs.as_ref())] {
        let Some(f) = f else { continue };
        put(&format!("{who}_upload_mb_s"), json!(f.upload_mb_s));
        put(&format!("{who}_download_mb_s"), json!(f.download_mb_s));
        put(&format!("{who}_small_req_s"), json!(f.small_req_s));
        put(&format!("{who}_small_p50_ms"), json!(f.small_p50_ms));
        put(&format!("{who}_small_p99_ms"), json!(f.small_p99_ms));
        put(&format!("{who}_clients_mb_s"), json!(f.clients_mb_s));
        put(&format!("{who}_peak_rss_mib"), json!(mib(f.peak_rss)));
        put(&format!("{who}_idle_rss_mib"), json!(mib(f.idle_rss)));
        put(
            &format!("{who}_idle_rss_after_mib"),
            json!(mib(f.idle_rss_after)),
        );
    }

    let mut at_least = vec![
        (
            "upload_limit",
            ours.upload_mb_s,
            UPLOAD_OF_LIMIT * upload_limit,
        ),
        ("download", ours.download_mb_s, DOWNLOAD_MB_S),
    ];
    if let Some(theirs) = &theirs {
        at_least.extend([
            (
                "upload_synapse",
                ours.upload_mb_s,
                VS_SYNAPSE * theirs.upload_mb_s,
            ),
            (
                "download_synapse",
                ours.download_mb_s,
                VS_SYNAPSE * theirs.download_mb_s,
            ),
            (
                "small_synapse",
                ours.small_req_s,
                VS_SYNAPSE * theirs.small_req_s,
            ),
        ]);
    }
    for (name, value, threshold) in at_least {
        put(&format!("target_{name}"), json!(threshold));
        put(&format!("pass_{name}"), json!(value >= threshold));
    }
    for (name, value, under) in [
        ("peak_rss", mib(ours.peak_rss), PEAK_RSS_MIB),
        ("idle_rss", mib(ours.idle_rss), IDLE_RSS_MIB),
    ] {
        put(&format!("target_{name}"), json!(under));
        put(&format!("pass_{name}"), json!(value < under));
    }

    // Stop Synapse and remove its data before reporting.
    drop(synapse);
    println!("{}", Value::Object(out));
    Ok(())
}

/// Every phase against one server, in order: big uploads, downloads, small concurrent uploads, then
/// many clients uploading big files at once (with the server's peak RSS).
async fn measure(
    client: &reqwest::Client,
    target: &Target,
    bodies: &Bodies,
    sizes: &Sizes,
    phases: Phases,
    seed: u64,
) -> Result<Figures> {
    let label = target.label;
    let mut f = Figures {
        idle_rss: procfs::rss(target.pid).context("no RSS for the server")?,
        ..Figures::default()
    };
    progress!("{label}: idle RSS {:.1} MiB", mib(f.idle_rss));
    if phases.upload || phases.download {
        // Downloads need something to download: the warm-up upload when uploads are not measured.
        let runs = if phases.upload { sizes.upload_runs } else { 0 };
        let (best, id) = big_uploads(client, target, bodies, sizes, runs, seed).await?;
        if phases.upload {
            f.upload_mb_s = best;
        }
        if phases.download {
            f.download_mb_s = downloads(client, target, sizes, &id).await?;
        }
    }
    if phases.small {
        (f.small_req_s, f.small_p50_ms, f.small_p99_ms) =
            small_uploads(client, target, bodies, sizes, seed + 1_000_000).await?;
    }
    if phases.clients {
        (f.clients_mb_s, f.peak_rss) =
            many_clients(client, target, bodies, sizes, seed + 2_000_000).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    f.idle_rss_after = procfs::rss(target.pid).unwrap_or(0);
    progress!(
        "{label}: idle RSS after the load {:.1} MiB",
        mib(f.idle_rss_after)
    );
    Ok(f)
}

/// `runs` big uploads, one at a time, after an untimed one that sets up the connection and lets
/// both ends grow their buffers (a server runs warm): the best MB/s and the first one's media id.
async fn big_uploads(
    client: &reqwest::Client,
    target: &Target,
    bodies: &Bodies,
    sizes: &Sizes,
    runs: u64,
    seed: u64,
) -> Result<(f64, String)> {
    let label = target.label;
    let mut cpu = None;
    let mut best = 0.0;
    let mut first_id = None;
    for run in 0..=runs {
        let warm_up = run == 0;
        if !warm_up {
            cpu.get_or_insert_with(|| Cpu::start(target.pid));
        }
        let start = Instant::now();
        let id = load::upload(
            client,
            target,
            bodies.body(seed + run, sizes.upload),
            sizes.upload,
            Duration::from_secs(300),
        )
        .await?;
        let rate = mb_per_s(sizes.upload, start.elapsed());
        let what = if warm_up { "warm-up upload" } else { "upload" };
        progress!("{label}: {what} {} MiB: {rate:.0} MB/s", sizes.upload / MIB);
        if !warm_up {
            best = f64::max(best, rate);
        }
        first_id.get_or_insert(id);
    }
    if let Some(cpu) = cpu {
        cpu.report(label, "uploads");
    }
    Ok((best, first_id.context("no upload ran")?))
}

/// Downloads of `id`, one at a time: the best MB/s.
async fn downloads(
    client: &reqwest::Client,
    target: &Target,
    sizes: &Sizes,
    id: &str,
) -> Result<f64> {
    let label = target.label;
    let cpu = Cpu::start(target.pid);
    let mut best = 0.0;
    for _ in 0..sizes.download_runs {
        let took =
            load::download(client, target, id, sizes.upload, Duration::from_secs(300)).await?;
        let rate = mb_per_s(sizes.upload, took);
        progress!(
            "{label}: download {} MiB: {rate:.0} MB/s",
            sizes.upload / MIB
        );
        best = f64::max(best, rate);
    }
    cpu.report(label, "downloads");
    Ok(best)
}

/// A fixed number of small uploads with a fixed number in flight: requests/s, p50 and p99 in ms.
async fn small_uploads(
    client: &reqwest::Client,
    target: &Target,
    bodies: &Bodies,
    sizes: &Sizes,
    seed: u64,
) -> Result<(f64, f64, f64)> {
    let label = target.label;
    let cpu = Cpu::start(target.pid);
    let start = Instant::now();
    let small = sizes.small;
    let mut latencies: Vec<Duration> = tokio::time::timeout(
        Duration::from_secs(600),
        futures_util::stream::iter(0..sizes.small_requests)
            .map(|i| async move {
                let started = Instant::now();
                load::upload(
                    client,
                    target,
                    bodies.small(seed + i, small as usize),
                    small,
                    Duration::from_secs(60),
                )
                .await?;
                Ok::<_, anyhow::Error>(started.elapsed())
            })
            .buffer_unordered(sizes.small_in_flight)
            .collect::<Vec<_>>(),
    )
    .await
    .with_context(|| format!("{label}: the small uploads took over 600 s"))?
    .into_iter()
    .collect::<Result<_>>()?;
    let elapsed = start.elapsed();
    latencies.sort();
    let rate = sizes.small_requests as f64 / elapsed.as_secs_f64();
    let (p50, p99) = (
        percentile_ms(&latencies, 0.50),
        percentile_ms(&latencies, 0.99),
    );
    progress!(
        "{label}: {} × {} KiB uploads, {} in flight: {rate:.0} req/s (p50 {p50:.1} ms, p99 \
         {p99:.1} ms)",
        sizes.small_requests,
        small / 1024,
        sizes.small_in_flight,
    );
    cpu.report(label, "small uploads");
    Ok((rate, p50, p99))
}

/// Many clients uploading big files at once: MB/s in all and the server's peak RSS in bytes.
async fn many_clients(
    client: &reqwest::Client,
    target: &Target,
    bodies: &Bodies,
    sizes: &Sizes,
    seed: u64,
) -> Result<(f64, u64)> {
    let label = target.label;
    let cpu = Cpu::start(target.pid);
    let peak = PeakRss::start(target.pid);
    let start = Instant::now();
    let uploads = futures_util::future::join_all((0..sizes.clients).map(|c| {
        load::upload(
            client,
            target,
            bodies.body(seed + c, sizes.client_upload),
            sizes.client_upload,
            Duration::from_secs(900),
        )
    }));
    let results = tokio::time::timeout(Duration::from_secs(1200), uploads)
        .await
        .with_context(|| format!("{label}: the concurrent uploads took over 1200 s"))?;
    let elapsed = start.elapsed();
    let peak = peak.stop();
    for result in results {
        result?;
    }
    let rate = mb_per_s(sizes.clients * sizes.client_upload, elapsed);
    progress!(
        "{label}: {} clients × {} MiB: {rate:.0} MB/s in all, peak RSS {:.1} MiB",
        sizes.clients,
        sizes.client_upload / MIB,
        mib(peak)
    );
    cpu.report(label, "concurrent uploads");
    Ok((rate, peak))
}

/// A server's CPU time over a phase, reported on stderr (to tell what limits it).
struct Cpu {
    pid: u32,
    cpu: Option<f64>,
    start: Instant,
}

impl Cpu {
    fn start(pid: u32) -> Cpu {
        Cpu {
            pid,
            cpu: procfs::cpu_seconds(pid),
            start: Instant::now(),
        }
    }

    fn report(self, label: &str, phase: &str) {
        if let (Some(before), Some(after)) = (self.cpu, procfs::cpu_seconds(self.pid)) {
            let wall = self.start.elapsed().as_secs_f64();
            progress!(
                "{label}: {phase}: {:.2} s CPU in {wall:.2} s ({:.0}% of a core)",
                after - before,
                100.0 * (after - before) / wall
            );
        }
    }
}

pub(crate) fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

/// Throughput in MB/s (10^6 bytes per second).
pub(crate) fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// `len` pseudo-random bytes (xorshift64 from `seed`).
pub(crate) fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&d, 0.5), 50.0);
        assert_eq!(percentile_ms(&d, 0.99), 99.0);
        assert_eq!(percentile_ms(&d[..1], 0.99), 1.0);
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
    }

    #[test]
    fn patterns_differ_by_seed() {
        assert_eq!(pattern(100, 1).len(), 100);
        assert_ne!(pattern(64, 1), pattern(64, 2));
        assert_eq!(pattern(64, 1), pattern(64, 1));
    }
}
