//! `cargo xtask bench`: runs the benchmarks and rewrites their sections of `docs/benchmarks.md`.
//!
//! Each benchmark owns one section of that file, between `<!-- bench:NAME:start -->` and
//! `<!-- bench:NAME:end -->`, and rewrites only that. To add one, write a function that runs it and
//! returns a [`Section`], and list it in [`BENCHES`] under its section's name (what
//! `cargo xtask bench NAME...` selects).

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::util::{self, note};
use crate::{postgres, tools};

#[path = "bench_capacity.rs"]
mod capacity;
#[path = "bench_import.rs"]
mod import;
#[path = "bench_soak.rs"]
mod soak;

/// Every benchmark with its section's name, in the order they run and first appear in the
/// document.
const BENCHES: &[(&str, Bench)] = &[
    ("render", render),
    ("serve", serve),
    ("s3", s3),
    ("import", import::import),
    ("federation", federation),
    ("thumbnails", thumbnails),
    ("previews", previews),
    ("capacity", capacity::capacity),
    ("soak", soak::soak),
];

type Bench = fn(&Run) -> Result<Section>;

const DOC: &str = "docs/benchmarks.md";

const DOC_HEADER: &str = "# Benchmarks

The figures below are produced by `cargo xtask bench` on the CI-sized machine (2 cores). Each
section is rewritten in place by its benchmark: rerun `cargo xtask bench` to refresh it rather than
editing it by hand.
";

/// What every benchmark's report states about the run.
struct Run {
    /// UTC date, `YYYY-MM-DD`.
    date: String,
    /// Cores and processor model.
    machine: String,
    /// How long the soak runs.
    soak_seconds: u64,
}

/// The soak's length unless `cargo xtask soak --seconds N` says otherwise.
pub(crate) const SOAK_SECONDS: u64 = 180;

/// One benchmark's section of the document.
struct Section {
    /// The marker name: `<!-- bench:NAME:start -->`.
    name: &'static str,
    markdown: String,
    /// Targets missed, one line each (empty when all were met).
    missed: Vec<String>,
}

/// Runs the benchmarks named in `only` (all of them when it is empty), in [`BENCHES`]' order.
pub(crate) fn bench(only: &[String]) -> Result<ExitCode> {
    bench_with(only, SOAK_SECONDS)
}

/// [`bench`] with the soak's length.
pub(crate) fn bench_with(only: &[String], soak_seconds: u64) -> Result<ExitCode> {
    if let Some(unknown) = only
        .iter()
        .find(|name| !BENCHES.iter().any(|(known, _)| known == name))
    {
        let names: Vec<&str> = BENCHES.iter().map(|(name, _)| *name).collect();
        bail!("no benchmark `{unknown}`; there are: {}", names.join(", "));
    }
    let run = Run {
        date: today_utc(),
        machine: machine(),
        soak_seconds,
    };
    let path = util::workspace_root().join(DOC);
    let mut missed = Vec::new();
    for (name, bench) in BENCHES {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        let section = bench(&run)?;
        // Written after each benchmark, so a later one failing keeps the earlier results.
        update_doc(&path, section.name, &section.markdown)?;
        note!("bench {}: {DOC} updated", section.name);
        missed.extend(section.missed);
    }
    if missed.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for line in &missed {
        note!("target missed: {line}");
    }
    Ok(ExitCode::FAILURE)
}

/// The provision crate's `render` bench: one JSON line with timing statistics.
fn render(run: &Run) -> Result<Section> {
    /// The p99 render time must stay under this.
    const TARGET_MS: f64 = 20.0;

    let line = cargo_bench_json(&[
        "bench",
        "-p",
        "provision",
        "--bench",
        "render",
        "--",
        "--json",
    ])?;
    let number = |key: &str| {
        json_number(&line, key)
            .with_context(|| format!("no number `{key}` in the bench's JSON line: {line}"))
    };
    let name = json_string(&line, "name").unwrap_or_else(|| "render".to_owned());
    let iterations = number("iterations")?;
    let median = number("median_ms")?;
    let p99 = number("p99_ms")?;
    let max = number("max_ms")?;
    let pass = p99 < TARGET_MS;

    let markdown = format!(
        "## Render\n\n\
         `{name}`, from `cargo bench -p provision --bench render`: wall time of one render, over \
         {iterations} iterations.\n\n\
         | date (UTC) | machine | median | p99 | max | target | result |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n\
         | {} | {} | {median:.2} ms | {p99:.2} ms | {max:.2} ms | p99 < {TARGET_MS} ms | {} |",
        run.date,
        cell(&run.machine),
        if pass { "pass" } else { "fail" },
    );
    note!("bench render: median {median:.2} ms, p99 {p99:.2} ms, max {max:.2} ms");
    let missed = if pass {
        Vec::new()
    } else {
        vec![format!("render p99 {p99:.2} ms, target < {TARGET_MS} ms")]
    };
    Ok(Section {
        name: "render",
        markdown,
        missed,
    })
}

/// The S3 datastore's throughput against moto (`bench_s3`).
fn s3(run: &Run) -> Result<Section> {
    let report = crate::bench_s3::run(&run.date, &run.machine)?;
    Ok(Section {
        name: "s3",
        markdown: report.markdown,
        missed: report.missed,
    })
}

/// `mmrctl serve` side by side with Synapse's media repo: `crates/bench`'s `mmrctl-bench`, with
/// the PostgreSQL server and tools venv (Synapse) that `cargo xtask test` provides. The bench
/// decides what passes; this renders its figures.
fn serve(run: &Run) -> Result<Section> {
    let line = bench_line(&[], &[])?;

    let figures = Figures::new("serve", &line);
    let n = |key: &str| figures.number(key);
    let pass = |key: &str| figures.passed(key);
    let synapse = json_string(&line, "synapse_version").unwrap_or_else(|| "?".to_owned());
    let (sha, fsync, limit) = (n("sha256_mb_s")?, n("fsync_mb_s")?, n("upload_limit_mb_s")?);
    let upload_mib = n("upload_bytes")? / MIB;
    let (clients, client_mib) = (n("clients")?, n("client_bytes")? / MIB);
    let (small_kib, small_requests, small_in_flight) = (
        n("small_bytes")? / 1024.0,
        n("small_requests")?,
        n("small_in_flight")?,
    );
    let [up, up_s] = [n("mmrctl_upload_mb_s")?, n("synapse_upload_mb_s")?];
    let [down, down_s] = [n("mmrctl_download_mb_s")?, n("synapse_download_mb_s")?];
    let [small, small_s] = [n("mmrctl_small_req_s")?, n("synapse_small_req_s")?];

    let mut missed = Vec::new();
    // One target: (pass key, value, threshold, what the threshold is, how far off when missed).
    let mut check = |key: &str, value: f64, unit: &str, target: &str, shortfall: String| {
        let ok = pass(key)?;
        let threshold = n(&format!("target_{key}"))?;
        if !ok {
            missed.push(format!(
                "serve: {key}: {value:.1} {unit}, target {target} ({threshold:.1} {unit}): {shortfall}"
            ));
        }
        Ok::<_, anyhow::Error>((ok, shortfall))
    };
    let result = |checks: &[(bool, String)]| {
        let failed: Vec<&str> = checks
            .iter()
            .filter(|(ok, _)| !ok)
            .map(|(_, why)| why.as_str())
            .collect();
        if failed.is_empty() {
            "pass".to_owned()
        } else {
            format!("**fail**: {}", failed.join("; "))
        }
    };
    let upload_result = result(&[
        check(
            "upload_limit",
            up,
            "MB/s",
            "≥ 80% of the limit",
            format!("{:.0}% of the limit", 100.0 * up / limit),
        )?,
        check(
            "upload_synapse",
            up,
            "MB/s",
            "≥ 3× Synapse",
            format!("{:.2}× Synapse", up / up_s),
        )?,
    ]);
    let download_result = result(&[
        check(
            "download",
            down,
            "MB/s",
            "≥ 1 GB/s",
            format!("{down:.0} MB/s"),
        )?,
        check(
            "download_synapse",
            down,
            "MB/s",
            "≥ 3× Synapse",
            format!("{:.2}× Synapse", down / down_s),
        )?,
    ]);
    let small_result = result(&[check(
        "small_synapse",
        small,
        "req/s",
        "≥ 3× Synapse",
        format!("{:.2}× Synapse", small / small_s),
    )?]);
    let peak = n("mmrctl_peak_rss_mib")?;
    let peak_result = result(&[check(
        "peak_rss",
        peak,
        "MiB",
        "< 100 MiB",
        format!("{peak:.1} MiB"),
    )?]);
    let idle = n("mmrctl_idle_rss_mib")?;
    let idle_result = result(&[check(
        "idle_rss",
        idle,
        "MiB",
        "< 30 MiB",
        format!("{idle:.1} MiB"),
    )?]);

    let markdown = format!(
        "## Serve\n\n\
         `mmrctl serve` (release build) and Synapse {synapse}'s built-in media repo, side by side \
         in one run of `mmrctl-bench` (`crates/bench`), one after the other (each alone on the \
         machine, the other stopped): each on its own database of the same PostgreSQL server, media on the same disk (a file datastore; `media_store_path`), both \
         logging warnings only. The client runs on the same machine and speaks HTTP/1.1 over \
         loopback; it authenticates to mmrctl with `sharedSecretAuth` and to Synapse with a \
         user's access token. Every body is distinct (no de-duplication).\n\n\
         Run on {} (UTC), {}. The bench starts once the machine is quiet (what other work left \
         in the page cache written out, CPU {:.0}% busy then); load average {:.2} at the start \
         and {:.2} at the end (other work on the machine skews the figures).\n\n\
         Limits of this machine, measured in the same run (best of 3): SHA-256 on one core \
         **{sha:.0} MB/s**; writing 1 GiB in 1 MiB chunks then fsync, in the datastore's \
         directory, **{fsync:.0} MB/s**. An upload is hashed and durable before it is \
         acknowledged, so its limit is the slower of the two: **{limit:.0} MB/s**.\n\n\
         | measure | mmrctl | Synapse | target | result |\n\
         | --- | --- | --- | --- | --- |\n\
         | upload {upload_mib:.0} MiB, one request (best of {:.0}, after one untimed) | {up:.0} MB/s | {up_s:.0} MB/s \
         | ≥ 80% of the limit ({:.0} MB/s) and ≥ 3× Synapse ({:.0} MB/s) | {upload_result} |\n\
         | download {upload_mib:.0} MiB (best of {:.0}) | {down:.0} MB/s | {down_s:.0} MB/s \
         | ≥ 1000 MB/s and ≥ 3× Synapse ({:.0} MB/s) | {download_result} |\n\
         | {small_requests:.0} uploads of {small_kib:.0} KiB, {small_in_flight:.0} in flight \
         | {small:.0} req/s (p50 {:.1} ms, p99 {:.1} ms) | {small_s:.0} req/s (p50 {:.1} ms, \
         p99 {:.1} ms) | ≥ 3× Synapse ({:.0} req/s) | {small_result} |\n\
         | peak RSS, {clients:.0} clients uploading {client_mib:.0} MiB each at once \
         | {peak:.1} MiB ({:.0} MB/s in all) | {:.1} MiB ({:.0} MB/s in all) | < 100 MiB \
         | {peak_result} |\n\
         | idle RSS after start-up | {idle:.1} MiB | {:.1} MiB | < 30 MiB | {idle_result} |\n\
         | idle RSS after the above | {:.1} MiB | {:.1} MiB | | |",
        run.date,
        cell(&run.machine),
        n("busy_start_pct")?,
        n("loadavg_start")?,
        n("loadavg_end")?,
        n("upload_runs")?,
        n("target_upload_limit")?,
        n("target_upload_synapse")?,
        n("download_runs")?,
        n("target_download_synapse")?,
        n("mmrctl_small_p50_ms")?,
        n("mmrctl_small_p99_ms")?,
        n("synapse_small_p50_ms")?,
        n("synapse_small_p99_ms")?,
        n("target_small_synapse")?,
        n("mmrctl_clients_mb_s")?,
        n("synapse_peak_rss_mib")?,
        n("synapse_clients_mb_s")?,
        n("synapse_idle_rss_mib")?,
        n("mmrctl_idle_rss_after_mib")?,
        n("synapse_idle_rss_after_mib")?,
    );
    note!(
        "bench serve: upload {up:.0} MB/s (Synapse {up_s:.0}, limit {limit:.0}), download \
         {down:.0} MB/s (Synapse {down_s:.0}), small {small:.0} req/s (Synapse {small_s:.0}), \
         peak RSS {peak:.1} MiB, idle RSS {idle:.1} MiB"
    );
    Ok(Section {
        name: "serve",
        markdown,
        missed,
    })
}

/// Builds the release `mmrctl` and `mmrctl-bench` (before anything is measured, so that no build
/// runs meanwhile); returns the directory they are in.
fn build_release() -> Result<std::path::PathBuf> {
    let nasm = tools::ensure_nasm(&util::target_dir())?;
    let mut build = util::cargo();
    build
        .args(["build", "--release", "-p", "mmrctl", "-p", "bench"])
        .env("PATH", tools::path_with(&[&nasm]));
    note!("running `{}`", util::display_cargo(&build));
    let status = util::run_status(&mut build)?;
    if !status.success() {
        bail!("`{}` failed ({status})", util::display_cargo(&build));
    }
    Ok(util::target_dir().join("release"))
}

/// Remote media over federation: `mmrctl-bench --federation` (a static remote behind nginx, the
/// raw TLS transfer, `mmrctl serve` and a stock Synapse fetching from it), with what the serve
/// bench has plus nginx. The bench decides what passes; this renders its figures.
fn federation(run: &Run) -> Result<Section> {
    let nginx = tools::ensure_nginx(&util::target_dir())?;
    let line = bench_line(&["--federation"], &[(tools::NGINX_VAR, nginx)])?;
    federation_section(run, &line)
}

/// The federation section from `mmrctl-bench --federation`'s JSON line.
fn federation_section(run: &Run, line: &str) -> Result<Section> {
    let figures = Figures::new("federation", line);
    let n = |key: &str| figures.number(key);
    let pass = |key: &str| figures.passed(key);
    let synapse = json_string(line, "synapse_version").unwrap_or_else(|| "?".to_owned());
    let runs = n("runs")?;
    let mut missed = Vec::new();
    // A table cell for targets: "pass", or "**fail**: why" for each one missed.
    let mut result = |checks: &[(&str, String)]| -> Result<String> {
        let mut failed = Vec::new();
        for (key, why) in checks {
            if !pass(key)? {
                missed.push(format!("federation: {key}: {why}"));
                failed.push(why.clone());
            }
        }
        Ok(if failed.is_empty() {
            "pass".to_owned()
        } else {
            format!("**fail**: {}", failed.join("; "))
        })
    };

    let mut rows = String::new();
    let mut notes = Vec::new();
    for size in ["small", "large"] {
        let mib = n(&format!("{size}_bytes"))? / MIB;
        let [limit, ours, theirs] = [
            n(&format!("limit_{size}_mb_s"))?,
            n(&format!("mmrctl_{size}_mb_s"))?,
            n(&format!("synapse_{size}_mb_s"))?,
        ];
        let checks = result(&[
            (
                &format!("cold_limit_{size}"),
                format!("{:.0}% of the limit", 100.0 * ours / limit),
            ),
            (
                &format!("cold_synapse_{size}"),
                format!("{:.2}× Synapse", ours / theirs),
            ),
        ])?;
        rows.push_str(&format!(
            "| {mib:.0} MiB, cold (p50 of {runs:.0}) | {limit:.0} MB/s | {ours:.0} MB/s ({:.0}%) \
             | {theirs:.0} MB/s | ≥ 60% of the limit ({:.0} MB/s) and ≥ 2× Synapse ({:.0} MB/s) \
             | {checks} |\n",
            100.0 * ours / limit,
            n(&format!("target_cold_limit_{size}"))?,
            n(&format!("target_cold_synapse_{size}"))?,
        ));
        let bytes = n(&format!("{size}_bytes"))?;
        let ms = |who: &str, key: &str| n(&format!("{who}_{size}_{key}"));
        // MB/s over a span of milliseconds.
        let rate = |span_ms: f64| bytes / 1e3 / span_ms.max(1e-6);
        let (raw, ours_headers, ours_total) = (
            ms("limit", "p50_ms")?,
            ms("mmrctl", "headers_ms")?,
            ms("mmrctl", "p50_ms")?,
        );
        let (theirs_headers, theirs_total) =
            (ms("synapse", "headers_ms")?, ms("synapse", "p50_ms")?);
        notes.push(format!(
            "{mib:.0} MiB: the raw transfer takes {raw:.0} ms (CPU: nginx {:.0} ms, client \
             {:.0} ms). mmrctl streams the file to the client that asked while it stores it: \
             headers after {ours_headers:.0} ms, the last byte after {ours_total:.0} ms; its CPU \
             {:.0} ms per fetch (TLS, the multipart scan, SHA-256, the file write, the copy to \
             the client), nginx's {:.0} ms, the client's {:.0} ms, on 2 cores. Synapse answers \
             after {theirs_headers:.0} ms, once it has the whole file ({:.0} MB/s), and ends \
             after {theirs_total:.0} ms, with {:.0} ms of its CPU",
            ms("limit", "remote_cpu_ms")?,
            ms("limit", "client_cpu_ms")?,
            ms("mmrctl", "server_cpu_ms")?,
            ms("mmrctl", "remote_cpu_ms")?,
            ms("mmrctl", "client_cpu_ms")?,
            rate(theirs_headers),
            ms("synapse", "server_cpu_ms")?,
        ));
    }
    let large_mib = n("large_bytes")? / MIB;
    let small_mib = n("small_bytes")? / MIB;
    let (cached, local) = (n("mmrctl_cached_mb_s")?, n("mmrctl_local_mb_s")?);
    let cached_result = result(&[(
        "cached",
        format!("{:.0}% of a local download", 100.0 * cached / local),
    )])?;
    rows.push_str(&format!(
        "| {large_mib:.0} MiB, cached (p50 of {runs:.0}) | | {cached:.0} MB/s | | ≥ 90% of a local \
         download of the same size in the same run: {:.0} MB/s (local {local:.0} MB/s) \
         | {cached_result} |\n",
        n("target_cached")?,
    ));
    let [hwm_small, hwm_large] = [n("mmrctl_hwm_small_mib")?, n("mmrctl_hwm_large_mib")?];
    let rss_result = result(&[(
        "rss_flat",
        format!(
            "{:.2}× after the {small_mib:.0} MiB fetches",
            hwm_large / hwm_small
        ),
    )])?;
    rows.push_str(&format!(
        "| peak RSS (`VmHWM`) after the {small_mib:.0} MiB fetches → after the {large_mib:.0} MiB \
         ones | | {hwm_small:.1} → {hwm_large:.1} MiB (idle {:.1} MiB) | {:.1} → {:.1} MiB (idle {:.1} MiB) \
         | flat: ≤ 1.5× ({:.1} MiB) | {rss_result} |",
        n("mmrctl_idle_rss_mib")?,
        n("synapse_hwm_small_mib")?,
        n("synapse_hwm_large_mib")?,
        n("synapse_idle_rss_mib")?,
        n("target_rss_flat")?,
    ));

    let markdown = format!(
        "## Federation\n\n\
         Remote media fetched over federation (`GET /_matrix/federation/v1/media/download/<id>`, \
         signed; a `multipart/mixed` answer) for a local user's \
         `/_matrix/client/v1/media/download/<remote>/<id>`, in one run of `mmrctl-bench \
         --federation` (`crates/bench`). The remote is static: nginx over TLS on loopback \
         (server name `localhost:<port>`) serving prebuilt answers laid out as Synapse writes \
         them, from files in the page cache; every file is distinct (pseudo-random) under its \
         own id, so nothing is de-duplicated. The limit is the raw transfer of the same answers \
         over the same TLS by a rustls client (reqwest, as mmrctl's outbound client), bytes \
         discarded, each just before mmrctl's cold fetch of the same answer (so that the two see \
         the same moments of the machine). `mmrctl serve` (release build, a file datastore, \
         PostgreSQL) and then Synapse {synapse} (stock, its own media repo, SQLite; homeserver B \
         of `testkit::Federation`, the other one idle) fetch the same files, one at a time, \
         after one untimed warm-up fetch that checks the bytes; the client asks each on its own \
         plain-HTTP loopback listener and times from the request to the last byte. Cold: \
         nothing cached; cached: the same URLs again (each read once untimed first, as the \
         local upload is: both were written around the page cache), alternating with downloads \
         of a local upload of the same size.\n\n\
         Run on {} (UTC), {}. The bench starts once the machine is quiet (CPU {:.0}% busy \
         then); load average {:.2} at the start and {:.2} at the end.\n\n\
         | measure | limit (raw TLS) | mmrctl | Synapse | target | result |\n\
         | --- | --- | --- | --- | --- | --- |\n\
         {rows}\n\n\
         Where the time goes (p50s per fetch; CPU per fetch from `/proc/<pid>/stat`, in 10 ms \
         ticks; 2 cores give twice the wall time). {}. A cached {large_mib:.0} MiB file goes \
         out at {cached:.0} MB/s.",
        run.date,
        cell(&run.machine),
        n("busy_start_pct")?,
        n("loadavg_start")?,
        n("loadavg_end")?,
        notes.join(". "),
    );
    note!(
        "bench federation: cold {:.0}/{:.0} MB/s (limit {:.0}/{:.0}, Synapse {:.0}/{:.0}), \
         cached {cached:.0} MB/s (local {local:.0}), peak RSS {hwm_small:.1} → {hwm_large:.1} MiB",
        n("mmrctl_small_mb_s")?,
        n("mmrctl_large_mb_s")?,
        n("limit_small_mb_s")?,
        n("limit_large_mb_s")?,
        n("synapse_small_mb_s")?,
        n("synapse_large_mb_s")?,
    );
    Ok(Section {
        name: "federation",
        markdown,
        missed,
    })
}

/// Thumbnails: `mmrctl-bench --thumbnails` (mmrctl and Synapse making thumbnails of the same
/// photos, with libjpeg-turbo's `djpeg` as the limit). The bench decides what passes.
fn thumbnails(run: &Run) -> Result<Section> {
    let djpeg = tools::ensure_djpeg(&util::target_dir())?;
    let line = bench_line(&["--thumbnails"], &[("MMRCTL_DJPEG", djpeg)])?;
    thumbnails_section(run, &line)
}

fn thumbnails_section(run: &Run, line: &str) -> Result<Section> {
    let figures = Figures::new("thumbnails", line);
    let n = |key: &str| figures.number(key);
    let result = |key: &str, why: String| figures.verdict(key, why);
    let synapse = json_string(line, "synapse_version").unwrap_or_else(|| "?".to_owned());
    let photo = json_string(line, "photo_px").unwrap_or_default();
    let (limit, cold, synapse_cold) = (n("limit_ms")?, n("mmrctl_cold_ms")?, n("synapse_cold_ms")?);
    let (five, synapse_five) = (n("mmrctl_five_ms")?, n("synapse_five_ms")?);
    let (rss, anim_ms, anim_rss) = (
        n("mmrctl_concurrent_rss_mib")?,
        n("mmrctl_animated_ms")?,
        n("mmrctl_animated_rss_mib")?,
    );
    let mut rows = String::new();
    rows.push_str(&format!(
        "| one cold 320x240 `scale` (p50 of {:.0}) | {limit:.1} ms | {cold:.1} ms ({:.2}× the \
         limit) | {synapse_cold:.1} ms | ≤ 1.3× the limit and ≥ 4× faster than Synapse | {}; {} |\n",
        n("runs")?,
        cold / limit,
        result("cold_limit", format!("{:.2}× the limit", cold / limit))?,
        result("cold_synapse", format!("{:.1}× faster than Synapse", synapse_cold / cold))?,
    ));
    rows.push_str(&format!(
        "| the five spec sizes of one upload | | {five:.1} ms (five requests at once: \
         requests a running decode covers join it) | {synapse_five:.0} ms (pre-generation at upload: {:.0} ms upload with the sizes, \
         {:.0} ms without) | ≥ 10× faster than Synapse | {} |\n",
        n("synapse_upload_pregen_ms")?,
        n("synapse_upload_plain_ms")?,
        result(
            "five_synapse",
            format!("{:.1}× faster", synapse_five / five)
        )?,
    ));
    rows.push_str(&format!(
        "| 20 cold thumbnails of distinct photos at once | | peak RSS {rss:.1} MiB ({:.0} ms \
         for all) | | < 150 MiB | {} |\n",
        n("mmrctl_concurrent_ms")?,
        result("concurrent_rss", format!("{rss:.1} MiB"))?,
    ));
    rows.push_str(&format!(
        "| 100-frame 640x480 GIF, animated 320x240 | | {anim_ms:.0} ms, {:.0} frames, peak RSS \
         {anim_rss:.1} MiB | {:.0} ms, {:.0} frames | ≤ {:.0} ms and ≤ {:.0} MiB | {}; {} |",
        n("mmrctl_animated_frames")?,
        n("synapse_animated_ms")?,
        n("synapse_animated_frames")?,
        n("target_animated_ms")?,
        n("target_animated_rss")?,
        result("animated_ms", format!("{anim_ms:.0} ms"))?,
        result("animated_rss", format!("{anim_rss:.1} MiB"))?,
    ));
    let markdown = format!(
        "## Thumbnails\n\n\
         Cold thumbnails (`GET /_matrix/client/v1/media/thumbnail/...`, each of a fresh upload, \
         timed from the request to the last byte) of a {photo} photo-like JPEG of {:.2} MB made \
         with Pillow, in one run of `mmrctl-bench --thumbnails` (`crates/bench`). The limit is \
         libjpeg-turbo's `djpeg -scale 1/8` on the same file, whole process: the entropy \
         decoding of every byte, which no scaling skips. `mmrctl serve` (release build, a file \
         datastore, PostgreSQL, default `numWorkers`: one per core) and then Synapse {synapse} \
         (stock, `dynamic_thumbnails: true` with no pre-generated sizes for the cold requests; \
         its defaults for the pre-generation) run alone.\n\n\
         Run on {} (UTC), {}. CPU {:.0}% busy at the start; load average {:.2} at the start and \
         {:.2} at the end.\n\n\
         | measure | limit | mmrctl | Synapse | target | result |\n\
         | --- | --- | --- | --- | --- | --- |\n\
         {rows}\n\n\
         Where the time goes: mmrctl decodes at the smallest DCT scale that covers the box \
         (1/8 here: libjpeg-turbo through mozjpeg, the same library as the limit), so nearly all \
         of a cold thumbnail is the entropy decoding the limit measures; the resize \
         (Lanczos3, `fast_image_resize`) and the JPEG encode of 320x240 take under a millisecond \
         each, and the rest is the request, two row lookups and the source read (the thumbnail \
         is stored after it is answered). Synapse decodes the whole photo and resizes it with \
         Pillow's LANCZOS. The animated thumbnail is GIF decoding and compositing, the resize \
         of each frame, and GIF encoding with one palette learnt from the first frame (a \
         table lookup per pixel); Synapse writes animated WebP.",
        n("photo_bytes")? / 1e6,
        run.date,
        cell(&run.machine),
        n("busy_start_pct")?,
        n("loadavg_start")?,
        n("loadavg_end")?,
    );
    note!(
        "bench thumbnails: cold {cold:.1} ms (limit {limit:.1}, Synapse {synapse_cold:.1}), five \
         {five:.1} ms (Synapse {synapse_five:.0}), RSS {rss:.1} MiB, animated {anim_ms:.0} ms"
    );
    Ok(Section {
        name: "thumbnails",
        markdown,
        missed: figures.missed(),
    })
}

/// URL previews: `mmrctl-bench --previews` (mmrctl and Synapse previewing the same local page).
/// The bench decides what passes.
fn previews(run: &Run) -> Result<Section> {
    let line = bench_line(&["--previews"], &[])?;
    previews_section(run, &line)
}

fn previews_section(run: &Run, line: &str) -> Result<Section> {
    let figures = Figures::new("previews", line);
    let n = |key: &str| figures.number(key);
    let result = |key: &str, why: String| figures.verdict(key, why);
    let synapse = json_string(line, "synapse_version").unwrap_or_else(|| "?".to_owned());
    let (cold, cold99, s_cold, s_cold99) = (
        n("mmrctl_cold_p50_ms")?,
        n("mmrctl_cold_p99_ms")?,
        n("synapse_cold_p50_ms")?,
        n("synapse_cold_p99_ms")?,
    );
    let (cached, cached99, s_cached) = (
        n("mmrctl_cached_p50_ms")?,
        n("mmrctl_cached_p99_ms")?,
        n("synapse_cached_p50_ms")?,
    );
    let (seq_rss, rss) = (
        n("mmrctl_sequential_rss_mib")?,
        n("mmrctl_concurrent_rss_mib")?,
    );
    let mut rows = String::new();
    rows.push_str(&format!(
        "| cold preview (p50 / p99 of {:.0}) | {cold:.2} / {cold99:.2} ms | {s_cold:.1} / \
         {s_cold99:.1} ms | ≥ 3× faster than Synapse | {} |\n",
        n("cold_runs")?,
        result("cold_synapse", format!("{:.1}× faster", s_cold / cold))?,
    ));
    rows.push_str(&format!(
        "| cached preview (p50 / p99 of {:.0}) | {cached:.3} / {cached99:.3} ms | {s_cached:.2} ms | \
         ≥ 20× faster than a cold one | {} |\n",
        n("cached_runs")?,
        result("cached_cold", format!("{:.0}× faster than cold", cold / cached))?,
    ));
    rows.push_str(&format!(
        "| {:.0} distinct cold previews at once | peak RSS {rss:.1} MiB ({:.0} ms for all; one at \
         a time: {seq_rss:.1} MiB) | | flat: within {:.0} MiB of one at a time | {} |",
        n("concurrent")?,
        n("mmrctl_concurrent_ms")?,
        n("target_concurrent_rss")? - seq_rss,
        result("concurrent_rss", format!("{:.1} MiB over", rss - seq_rss))?,
    ));
    let markdown = format!(
        "## URL previews\n\n\
         `GET /_matrix/client/v1/media/preview_url` of a local {:.0} KiB article-like page \
         (OpenGraph and Twitter tags in its head, scripts, styles, a long body; its `og:image` a \
         PNG under a URL of its own per page), served on loopback by the bench, timed from the \
         request to the last byte, in one run of `mmrctl-bench --previews` (`crates/bench`). A \
         cold preview asks for a URL not seen before, so the page and its image are fetched, the \
         page parsed and the image stored; a cached one asks for the same URL again. \
         `mmrctl serve` (release build, a file datastore, PostgreSQL, default `numWorkers`) and \
         then Synapse {synapse} (`url_preview_enabled`, 127.0.0.1 whitelisted) run alone.\n\n\
         Run on {} (UTC), {}. CPU {:.0}% busy at the start; load average {:.2} at the start and \
         {:.2} at the end.\n\n\
         | measure | mmrctl | Synapse | target | result |\n\
         | --- | --- | --- | --- | --- |\n\
         {rows}\n\n\
         Where the time goes: mmrctl tokenizes the page as it streams (lol_html; no tree is \
         built) and stops reading once the head has said all a preview uses, fetches the image \
         and streams it into the store (de-duplicated; its header read for the dimensions), and \
         writes one row. A cached preview is a lookup in memory (else one indexed row read). \
         Synapse reads the whole page, parses it into a tree, downloads the image into its URL \
         cache and thumbnails it.",
        n("page_bytes")? / 1024.0,
        run.date,
        cell(&run.machine),
        n("busy_start_pct")?,
        n("loadavg_start")?,
        n("loadavg_end")?,
    );
    note!(
        "bench previews: cold {cold:.2} ms (Synapse {s_cold:.1}), cached {cached:.3} ms, RSS \
         {rss:.1} MiB (one at a time {seq_rss:.1})"
    );
    Ok(Section {
        name: "previews",
        markdown,
        missed: figures.missed(),
    })
}

/// A bench's JSON line as a section reads it: its numbers, and a verdict per target that
/// remembers what missed.
struct Figures<'a> {
    bench: &'static str,
    line: &'a str,
    missed: std::cell::RefCell<Vec<String>>,
}

impl<'a> Figures<'a> {
    fn new(bench: &'static str, line: &'a str) -> Figures<'a> {
        Figures {
            bench,
            line,
            missed: std::cell::RefCell::default(),
        }
    }

    fn number(&self, key: &str) -> Result<f64> {
        json_number(self.line, key)
            .with_context(|| format!("no number `{key}` in the bench's JSON line: {}", self.line))
    }

    /// Whether the bench says the target `key` was met (`pass_<key>`).
    fn passed(&self, key: &str) -> Result<bool> {
        json_bool(self.line, &format!("pass_{key}")).with_context(|| {
            format!(
                "no boolean `pass_{key}` in the bench's JSON line: {}",
                self.line
            )
        })
    }

    /// `pass`, or a failure saying `why` (and remembered), as the bench's `pass_<key>` says.
    fn verdict(&self, key: &str, why: String) -> Result<String> {
        Ok(if self.passed(key)? {
            "pass".to_owned()
        } else {
            self.missed
                .borrow_mut()
                .push(format!("{}: {key}: {why}", self.bench));
            format!("**fail**: {why}")
        })
    }

    fn missed(self) -> Vec<String> {
        self.missed.into_inner()
    }
}

/// Bytes in a MiB, for the sizes the bench reports in bytes.
const MIB: f64 = 1_048_576.0;

/// Runs `cargo <args>` and returns the JSON object line it printed on stdout (the bench's report;
/// anything else on stdout is ignored, stderr is shown as it comes).
fn cargo_bench_json(args: &[&str]) -> Result<String> {
    let mut cmd = util::cargo();
    cmd.args(args);
    let shown = util::display_cargo(&cmd);
    json_line(&mut cmd, &shown)
}

/// Runs `cmd` (shown as `shown`) and returns the last JSON object line of its stdout.
/// Runs `mmrctl-bench` (with `flag`: which bench) against the release `mmrctl`, with the
/// PostgreSQL and tools venv the tests use and `env` besides; returns its JSON line.
fn bench_line(flags: &[&str], env: &[(&str, std::path::PathBuf)]) -> Result<String> {
    let target = util::target_dir();
    // Stopped when this goes out of scope, whatever the bench did.
    let pg = postgres::provide(&target)?;
    let tools_bin = tools::ensure_venv(&target)?;
    let release = build_release()?;
    let mut cmd = Command::new(release.join("mmrctl-bench"));
    cmd.args(flags)
        .arg("--mmrctl")
        .arg(release.join("mmrctl"))
        .env(postgres::URL_VAR, &pg.url)
        .env(tools::TOOLS_BIN_VAR, &tools_bin)
        .envs(env.iter().map(|(name, path)| (name, path)));
    let shown = util::display_command(&cmd);
    json_line(&mut cmd, &shown)
}

fn json_line(cmd: &mut Command, shown: &str) -> Result<String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    note!("running `{shown}`");
    let output = run_output(cmd)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "`{shown}` failed ({}); its stdout:\n{stdout}",
            output.status
        );
    }
    match stdout
        .lines()
        .map(str::trim)
        .rfind(|l| l.starts_with('{') && l.ends_with('}'))
    {
        Some(line) => Ok(line.to_owned()),
        None => bail!(
            "`{shown}` printed no JSON line on stdout (the bench must print one line like \
             {{\"name\":…,\"median_ms\":…}}); its stdout:\n{stdout}"
        ),
    }
}

fn run_output(cmd: &mut Command) -> Result<std::process::Output> {
    cmd.output()
        .with_context(|| format!("cannot start `{}`", util::display_cargo(cmd)))
}

/// Rewrites section `name` of the Markdown file at `path`, creating the file if it is missing.
fn update_doc(path: &Path, name: &str, markdown: &str) -> Result<()> {
    let doc = match std::fs::read_to_string(path) {
        Ok(doc) => doc,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => DOC_HEADER.to_owned(),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    let updated = update_section(&doc, name, markdown);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, updated).with_context(|| format!("cannot write {}", path.display()))
}

/// Replaces what lies between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->` with
/// `markdown`; appends the markers and `markdown` at the end when the section is not there yet.
pub(crate) fn update_section(doc: &str, name: &str, markdown: &str) -> String {
    let start = format!("<!-- bench:{name}:start -->");
    let end = format!("<!-- bench:{name}:end -->");
    let body = markdown.trim_matches('\n');
    if let Some(s) = doc.find(&start)
        && let Some(e) = doc[s..].find(&end)
    {
        let after_start = s + start.len();
        return format!("{}\n{body}\n{}", &doc[..after_start], &doc[s + e..]);
    }
    let mut out = doc.trim_end().to_owned();
    if !out.is_empty() {
        out.push_str("\n\n");
    }
    out.push_str(&format!("{start}\n{body}\n{end}\n"));
    out
}

/// The number after `"key":` in a flat JSON object.
fn json_number(json: &str, key: &str) -> Option<f64> {
    let rest = json_value(json, key)?;
    let len = rest
        .find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c)))
        .unwrap_or(rest.len());
    rest[..len].parse().ok()
}

/// The boolean after `"key":` in a flat JSON object.
fn json_bool(json: &str, key: &str) -> Option<bool> {
    let rest = json_value(json, key)?;
    if rest.starts_with("true") {
        Some(true)
    } else if rest.starts_with("false") {
        Some(false)
    } else {
        None
    }
}

/// The string after `"key":` in a flat JSON object (escapes other than `\"` and `\\` kept as
/// they are: names are plain).
fn json_string(json: &str, key: &str) -> Option<String> {
    let rest = json_value(json, key)?.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => out.push(chars.next()?),
            c => out.push(c),
        }
    }
    None
}

/// The text right after `"key":` (and any spaces).
fn json_value<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let quoted = format!("\"{key}\"");
    let at = json.find(&quoted)? + quoted.len();
    let rest = json[at..].trim_start().strip_prefix(':')?;
    Some(rest.trim_start())
}

/// A Markdown table cell: no pipes or line breaks.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// `N cores, <model name>`, as `nproc` and /proc/cpuinfo tell.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "unknown processor".to_owned());
    format!("{cores} cores, {model}")
}

/// Today's date in UTC, `YYYY-MM-DD`.
fn today_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day) (Howard Hinnant's
/// algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March first
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_a_missing_section_then_replaces_it() {
        let doc = update_section(DOC_HEADER, "render", "| a |\n");
        assert!(doc.starts_with(DOC_HEADER));
        assert!(
            doc.ends_with("\n\n<!-- bench:render:start -->\n| a |\n<!-- bench:render:end -->\n")
        );

        let doc = update_section(&doc, "server", "| s |");
        let doc = update_section(&doc, "render", "| b |");
        assert!(doc.contains("<!-- bench:render:start -->\n| b |\n<!-- bench:render:end -->"));
        assert!(!doc.contains("| a |"));
        assert!(doc.contains("<!-- bench:server:start -->\n| s |\n<!-- bench:server:end -->\n"));
        // Idempotent: the same content twice gives the same document.
        assert_eq!(update_section(&doc, "render", "| b |"), doc);
    }

    #[test]
    fn keeps_text_around_the_section() {
        let doc = "# T\n\nbefore\n<!-- bench:x:start -->\nold\n<!-- bench:x:end -->\nafter\n";
        assert_eq!(
            update_section(doc, "x", "new"),
            "# T\n\nbefore\n<!-- bench:x:start -->\nnew\n<!-- bench:x:end -->\nafter\n"
        );
    }

    #[test]
    fn reads_the_bench_line() {
        let line = r#"{"name":"render_quickstart","iterations":200,"median_ms":1.23,"p99_ms": 2.5,"max_ms":3.1e0}"#;
        assert_eq!(
            json_string(line, "name").as_deref(),
            Some("render_quickstart")
        );
        assert_eq!(json_number(line, "iterations"), Some(200.0));
        assert_eq!(json_number(line, "median_ms"), Some(1.23));
        assert_eq!(json_number(line, "p99_ms"), Some(2.5));
        assert_eq!(json_number(line, "max_ms"), Some(3.1));
        assert_eq!(json_number(line, "min_ms"), None);
        let line = r#"{"pass_a":true,"pass_b": false,"n":1}"#;
        assert_eq!(json_bool(line, "pass_a"), Some(true));
        assert_eq!(json_bool(line, "pass_b"), Some(false));
        assert_eq!(json_bool(line, "n"), None);
    }

    #[test]
    fn renders_the_federation_section() {
        let line = r#"{"name":"federation","synapse_version":"1.163.2","busy_start_pct":0.5,"loadavg_start":1.55,"loadavg_end":1.4,"small_bytes":10485760.0,"large_bytes":104857600.0,"runs":5.0,"mmrctl_cached_mb_s":2379.439304040508,"mmrctl_local_mb_s":2372.5567236970464,"mmrctl_idle_rss_mib":17.33984375,"mmrctl_hwm_small_mib":30.8359375,"mmrctl_hwm_large_mib":31.36328125,"synapse_idle_rss_mib":121.515625,"synapse_hwm_small_mib":128.65234375,"synapse_hwm_large_mib":138.80859375,"limit_small_mb_s":865.4218022715039,"limit_small_p50_ms":12.116554,"limit_small_headers_ms":0.38353200000000004,"limit_small_server_cpu_ms":0.0,"limit_small_remote_cpu_ms":12.0,"limit_small_client_cpu_ms":10.000000000000009,"mmrctl_small_mb_s":307.7266483143598,"mmrctl_small_p50_ms":34.074917000000006,"mmrctl_small_headers_ms":25.674833,"mmrctl_small_server_cpu_ms":32.0,"mmrctl_small_remote_cpu_ms":10.000000000000009,"mmrctl_small_client_cpu_ms":2.000000000000046,"synapse_small_mb_s":96.90949776589198,"synapse_small_p50_ms":108.201572,"synapse_small_headers_ms":56.838225,"synapse_small_server_cpu_ms":121.99999999999997,"synapse_small_remote_cpu_ms":8.0,"synapse_small_client_cpu_ms":8.000000000000007,"limit_large_mb_s":880.5669224855035,"limit_large_p50_ms":119.079842,"limit_large_headers_ms":0.43433700000000003,"limit_large_server_cpu_ms":0.0,"limit_large_remote_cpu_ms":133.99999999999997,"limit_large_client_cpu_ms":98.0,"mmrctl_large_mb_s":316.29161593749035,"mmrctl_large_p50_ms":331.521908,"mmrctl_large_headers_ms":203.64927699999998,"mmrctl_large_server_cpu_ms":406.0,"mmrctl_large_remote_cpu_ms":98.0,"mmrctl_large_client_cpu_ms":20.000000000000018,"synapse_large_mb_s":113.75295381232115,"synapse_large_p50_ms":921.801118,"synapse_large_headers_ms":441.13732799999997,"synapse_large_server_cpu_ms":1044.0,"synapse_large_remote_cpu_ms":96.0,"synapse_large_client_cpu_ms":70.00000000000001,"target_cold_limit_small":519.2530813629023,"pass_cold_limit_small":false,"target_cold_synapse_small":193.81899553178397,"pass_cold_synapse_small":true,"target_cold_limit_large":528.3401534913021,"pass_cold_limit_large":false,"target_cold_synapse_large":227.5059076246423,"pass_cold_synapse_large":true,"target_cached":2135.301051327342,"pass_cached":true,"target_rss_flat":46.25390625,"pass_rss_flat":true}"#;
        let run = Run {
            date: "2026-12-01".to_owned(),
            machine: "2 cores, X".to_owned(),
            soak_seconds: SOAK_SECONDS,
        };
        let section = federation_section(&run, line).unwrap();
        assert_eq!(section.name, "federation");
        assert!(
            section
                .markdown
                .contains("| 100 MiB, cold (p50 of 5) | 881 MB/s | 316 MB/s (36%) |")
        );
        assert_eq!(section.missed.len(), 2, "{:?}", section.missed);
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_453), (2025, 12, 31));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
