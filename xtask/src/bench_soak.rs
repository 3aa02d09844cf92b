//! `cargo xtask soak` (or `bench soak`): `mmrctl-bench --soak SECONDS`, three instances on one
//! database and datastore under a mixed load from many clients. It passes with no wrong answer
//! and every instance's RSS at the end within [`FLAT_RATIO`] of its RSS once warm.

use anyhow::Result;

use super::{Figures, Run, Section, bench_line, cell};

/// RSS at the end may be at most this many times the RSS once warm ("flat").
const FLAT_RATIO: f64 = 1.25;

pub(super) fn soak(run: &Run) -> Result<Section> {
    let seconds = run.soak_seconds.to_string();
    let line = bench_line(&["--soak", &seconds], &[])?;
    soak_section(run, &line)
}

fn soak_section(run: &Run, line: &str) -> Result<Section> {
    let figures = Figures::new("soak", line);
    let n = |key: &str| figures.number(key);
    let mut rows = String::new();
    for op in ["upload", "download", "thumbnail", "preview"] {
        rows.push_str(&format!(
            "| {op} | {:.0} | {:.1} ms | {:.1} ms |\n",
            n(&format!("{op}_requests"))?,
            n(&format!("{op}_p50_ms"))?,
            n(&format!("{op}_p99_ms"))?,
        ));
    }
    let errors = n("errors")?;
    let mut missed = Vec::new();
    if errors > 0.0 {
        missed.push(format!(
            "soak: {errors:.0} wrong answers (see the bench's output)"
        ));
    }
    let mut rss = String::new();
    for i in 0..3 {
        let (warm, end) = (
            n(&format!("instance{i}_rss_warm_mib"))?,
            n(&format!("instance{i}_rss_end_mib"))?,
        );
        let flat = end <= warm * FLAT_RATIO;
        if !flat {
            missed.push(format!(
                "soak: instance {i}'s RSS grew from {warm:.1} to {end:.1} MiB (more than {FLAT_RATIO}×)"
            ));
        }
        rss.push_str(&format!(
            "| {i} | {warm:.1} MiB | {end:.1} MiB | {} |\n",
            if flat { "pass" } else { "**fail**" }
        ));
    }
    let markdown = format!(
        "## Soak (three instances)\n\n\
         `cargo xtask soak` (`mmrctl-bench --soak`): three `mmrctl serve` instances (release build) \
         on one PostgreSQL database and one file datastore, {:.0} clients for {:.0} s, each request \
         to any instance: 30% uploads of 16–512 KiB, 45% downloads of what was uploaded (length \
         checked), 15% thumbnails of 4 photos in 5 sizes (made once among the instances, then \
         stored), 10% previews of 300 local pages (each cold once, then cached). Rate limits off \
         (every client is 127.0.0.1); remote fetches are measured by the federation bench. Run on \
         {} (UTC), {}.\n\n\
         | request | count | p50 | p99 |\n| --- | --- | --- | --- |\n{rows}\n\
         Wrong answers: {errors:.0} (target 0: {}).\n\n\
         | instance | RSS after {:.0} s | RSS at the end | flat (≤ {FLAT_RATIO}×) |\n| --- | --- | --- | --- |\n{rss}",
        n("clients")?,
        n("seconds")?,
        run.date,
        cell(&run.machine),
        if errors == 0.0 { "pass" } else { "**fail**" },
        n("warm_at_s")?,
    );
    Ok(Section {
        name: "soak",
        markdown,
        missed,
    })
}
