//! `cargo xtask bench`: runs the benchmarks and rewrites their sections of `docs/benchmarks.md`.
//!
//! Each benchmark owns one section of that file, between `<!-- bench:NAME:start -->` and
//! `<!-- bench:NAME:end -->`, and rewrites only that. To add one, write a function that runs it and
//! returns a [`Section`], and list it in [`BENCHES`].

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::util::{self, note};

/// Every benchmark, in the order they run and first appear in the document.
const BENCHES: &[Bench] = &[render];

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
}

/// One benchmark's section of the document.
struct Section {
    /// The marker name: `<!-- bench:NAME:start -->`.
    name: &'static str,
    markdown: String,
    /// Targets missed, one line each (empty when all were met).
    missed: Vec<String>,
}

pub(crate) fn bench() -> Result<ExitCode> {
    let run = Run {
        date: today_utc(),
        machine: machine(),
    };
    let path = util::workspace_root().join(DOC);
    let mut missed = Vec::new();
    for bench in BENCHES {
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

/// Runs `cargo <args>` and returns the JSON object line it printed on stdout (the bench's report;
/// anything else on stdout is ignored, stderr is shown as it comes).
fn cargo_bench_json(args: &[&str]) -> Result<String> {
    let mut cmd = util::cargo();
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    note!("running `{}`", util::display_cargo(&cmd));
    let output = run_output(&mut cmd)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "`{}` failed ({}); its stdout:\n{stdout}",
            util::display_cargo(&cmd),
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
            "`{}` printed no JSON line on stdout (the bench must print one line like \
             {{\"name\":…,\"median_ms\":…}} when given --json); its stdout:\n{stdout}",
            util::display_cargo(&cmd)
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
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_453), (2025, 12, 31));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
