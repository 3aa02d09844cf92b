//! `cargo xtask fuzz [--seconds N] [TARGET...]`: every fuzz target of `fuzz/` (or those named)
//! for a fixed time each, one after the other (the machine has 2 cores: libFuzzer's one job each,
//! while the next target builds nothing), with AddressSanitizer. The corpus is kept in
//! `fuzz/corpus/<target>/` (git-ignored) and grows from run to run; `fuzz/seeds/<target>/` is read
//! too. Fails when any target finds a crash, a timeout or an out-of-memory (the input is under
//! `fuzz/artifacts/<target>/`). cargo-fuzz is installed under `<target>/cargo-fuzz` when it is
//! not on PATH, and needs a nightly toolchain.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

use crate::util;

/// libFuzzer options beyond the time, per target (the default input size is 4096 bytes).
fn options(target: &str) -> &'static [&'static str] {
    match target {
        // Reaches the 64 KiB limit before part 2.
        "multipart_read" => &["-max_len=70000"],
        "thumbnail_inspect" | "thumbnail_render" => &["-rss_limit_mb=2048"],
        _ => &[],
    }
}

pub(crate) fn fuzz(args: &[String]) -> Result<ExitCode> {
    let mut seconds = 60u64;
    let mut wanted = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .context("--seconds takes a number of seconds per target")?;
            }
            target => wanted.push(target.to_owned()),
        }
    }
    let root = util::workspace_root();
    let fuzz_dir = root.join("fuzz");
    let all = targets(&fuzz_dir)?;
    for t in &wanted {
        if !all.contains(t) {
            bail!(
                "no fuzz target `{t}` in fuzz/fuzz_targets (there are: {})",
                all.join(", ")
            );
        }
    }
    let targets = if wanted.is_empty() { all } else { wanted };
    let cargo_fuzz = ensure_cargo_fuzz(&util::target_dir())?;
    let path = crate::tools::path_with(&[&cargo_fuzz]);

    // Every target at once (cargo fuzz builds one or all).
    let mut build = nightly_fuzz(&root, &path);
    build.arg("build");
    if !util::run_status(&mut build)?.success() {
        bail!(
            "the fuzz targets did not build (above); cargo fuzz needs a nightly toolchain \
             (rustup toolchain install nightly)"
        );
    }

    let mut results = Vec::new();
    for target in &targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        let before = count_files(&corpus);
        let seeds = fuzz_dir.join("seeds").join(target);
        let mut run = nightly_fuzz(&root, &path);
        run.args(["run", target]).arg(&corpus);
        if seeds.is_dir() {
            run.arg(&seeds);
        }
        run.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args(options(target));
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let status = util::run_status(&mut run)?;
        results.push((
            target.clone(),
            status.success(),
            before,
            count_files(&corpus),
        ));
    }

    println!("\n| target | result | corpus before → after |\n|---|---|---|");
    for (target, ok, before, after) in &results {
        let result = if *ok {
            "no finding"
        } else {
            "FINDING (see fuzz/artifacts)"
        };
        println!("| `{target}` | {result} | {before} → {after} |");
    }
    Ok(if results.iter().all(|r| r.1) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `cargo fuzz` on the nightly toolchain (through rustup: `$CARGO` is a toolchain's own cargo,
/// which cannot switch toolchains).
fn nightly_fuzz(root: &Path, path: &std::ffi::OsStr) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(root)
        .env("PATH", path);
    cmd
}

/// The targets of `fuzz/fuzz_targets/*.rs`, sorted.
fn targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let dir = fuzz_dir.join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// `cargo-fuzz` from PATH, else installed from crates.io under `<target>/cargo-fuzz`.
fn ensure_cargo_fuzz(target: &Path) -> Result<PathBuf> {
    if let Some(found) = util::find_on_path("cargo-fuzz") {
        return Ok(found);
    }
    let root = target.join("cargo-fuzz");
    let bin = root.join("bin").join("cargo-fuzz");
    if util::is_executable(&bin) {
        return Ok(bin);
    }
    eprintln!("xtask: installing cargo-fuzz under {}", root.display());
    let mut install = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    install
        .args(["install", "cargo-fuzz", "--locked", "--root"])
        .arg(&root);
    if !util::run_status(&mut install)?.success() || !util::is_executable(&bin) {
        bail!("could not install cargo-fuzz from crates.io (cargo install cargo-fuzz)");
    }
    Ok(bin)
}
