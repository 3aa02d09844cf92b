//! `cargo xtask bench`'s import section: `crates/import`'s `import` bench runs the release `mmrctl
//! import synapse` on a fixture of 10,000 small files (and 1,000 first, to compare peak memory).

use anyhow::{Context, Result, bail};

use super::{Run, Section, cell, json_line, json_number};
use crate::postgres;
use crate::util::{self, note};

/// Items per second the import must reach.
const TARGET_ITEMS_PER_S: f64 = 1000.0;
/// Peak RSS at 10× the items may be at most this many times that at 1× ("flat").
const FLAT_RATIO: f64 = 1.5;

pub(super) fn import(run: &Run) -> Result<Section> {
    let target = util::target_dir();
    // Stopped when this goes out of scope, whatever the bench did.
    let pg = postgres::provide(&target)?;

    // Built before anything is measured, so that no build runs meanwhile.
    for args in [
        &["build", "--release", "-p", "mmrctl"][..],
        &["bench", "--no-run", "-p", "import", "--bench", "import"][..],
    ] {
        let mut build = util::cargo();
        build.args(args);
        note!("running `{}`", util::display_cargo(&build));
        let status = util::run_status(&mut build)?;
        if !status.success() {
            bail!("`{}` failed ({status})", util::display_cargo(&build));
        }
    }
    let mut cmd = util::cargo();
    cmd.args(["bench", "-p", "import", "--bench", "import", "--", "--json"])
        .env(postgres::URL_VAR, &pg.url)
        .env("MMRCTL_BIN", target.join("release/mmrctl"));
    let shown = util::display_cargo(&cmd);
    let line = json_line(&mut cmd, &shown)?;
    import_section(run, &line)
}

fn import_section(run: &Run, line: &str) -> Result<Section> {
    let n = |key: &str| {
        json_number(line, key)
            .with_context(|| format!("no number `{key}` in the bench's JSON line: {line}"))
    };
    let (items, small_items) = (n("items")?, n("small_items")?);
    let (rate, mib_s, seconds) = (n("items_per_s")?, n("mib_per_s")?, n("seconds")?);
    let (rss, small_rss) = (
        n("peak_rss_kib")? / 1024.0,
        n("small_peak_rss_kib")? / 1024.0,
    );
    let rerun = n("rerun_items_per_s")?;
    let mib = n("bytes")? / 1_048_576.0;
    let ratio = rss / small_rss.max(1.0);
    let fast = rate >= TARGET_ITEMS_PER_S;
    let flat = ratio <= FLAT_RATIO;
    let verdict = |ok: bool| if ok { "pass" } else { "fail" };

    let markdown = format!(
        "## Import\n\n\
         `mmrctl import synapse` (release build, default workers) from `cargo bench -p import --bench \
         import`: a database with Synapse's media schema and {items:.0} files of 1–4 KiB ({mib:.1} MiB) \
         in Synapse's layout, into a file datastore on the same PostgreSQL. Peak RSS is the importer's \
         `VmHWM`, sampled every 20 ms; \"at {small_items:.0}\" is the same import of a tenth of the \
         items, for the memory comparison. The rerun finds everything imported and checks it.\n\n\
         | date (UTC) | machine | items/s | MiB/s | time | peak RSS | at {small_items:.0} items | \
         rerun items/s | targets | result |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n\
         | {} | {} | {rate:.0} | {mib_s:.1} | {seconds:.1} s | {rss:.1} MiB | {small_rss:.1} MiB | \
         {rerun:.0} | ≥ {TARGET_ITEMS_PER_S:.0} items/s: {}; RSS at 10× items ≤ {FLAT_RATIO}×: {} | {} |",
        run.date,
        cell(&run.machine),
        verdict(fast),
        verdict(flat),
        verdict(fast && flat),
    );
    note!(
        "bench import: {rate:.0} items/s, {mib_s:.1} MiB/s, peak RSS {rss:.1} MiB \
         ({small_rss:.1} MiB at {small_items:.0} items), rerun {rerun:.0} items/s"
    );
    let mut missed = Vec::new();
    if !fast {
        missed.push(format!(
            "import {rate:.0} items/s, target ≥ {TARGET_ITEMS_PER_S:.0}"
        ));
    }
    if !flat {
        missed.push(format!(
            "import peak RSS {rss:.1} MiB at {items:.0} items is {ratio:.2}× that at \
             {small_items:.0} (target ≤ {FLAT_RATIO}×)"
        ));
    }
    Ok(Section {
        name: "import",
        markdown,
        missed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_bench_line() {
        let run = Run {
            date: "2025-01-01".to_owned(),
            machine: "2 cores, x".to_owned(),
            soak_seconds: crate::bench::SOAK_SECONDS,
        };
        let line = r#"{"name":"import_synapse_10000","items":10000,"bytes":25574680,"seconds":5.0,"items_per_s":2000.0,"mib_per_s":4.9,"peak_rss_kib":20480,"small_items":1000,"small_peak_rss_kib":16384,"rerun_items_per_s":5000.0}"#;
        let section = import_section(&run, line).unwrap_or_else(|e| panic!("{e}"));
        assert!(section.missed.is_empty(), "{:?}", section.missed);
        assert!(
            section
                .markdown
                .contains("| 2000 | 4.9 | 5.0 s | 20.0 MiB | 16.0 MiB | 5000 |")
        );
        let slow = line.replace("\"items_per_s\":2000.0", "\"items_per_s\":900.0");
        let section = import_section(&run, &slow).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(section.missed.len(), 1);
    }
}
