//! `cargo xtask test` and `cargo xtask ci`.

use std::process::{Command, ExitCode, Stdio};

use anyhow::Result;

use crate::util::{self, note};
use crate::{postgres, tools};

/// Provides what the suite needs (Postgres, the tools venv, systemd-analyze, nginx, Caddy, promtool, nasm for the
/// JPEG decoder's SIMD), then runs it with
/// `extra` passed to the runner. Returns the runner's exit code.
pub(crate) fn test(extra: &[String]) -> Result<ExitCode> {
    let target = util::target_dir();
    // Stopped when this goes out of scope, whatever the tests did.
    let pg = postgres::provide(&target)?;
    let tools_bin = tools::ensure_venv(&target)?;
    tools::ensure_systemd_analyze()?;
    let nginx = tools::ensure_nginx(&target)?;
    let caddy = tools::ensure_caddy(&target)?;
    let promtool = tools::ensure_promtool(&target)?;
    let path = tools::path_with(&[
        &tools::ensure_nasm(&target)?,
        &tools::ensure_ffmpeg(&target)?,
    ]);

    let with_env = |cmd: &mut Command| {
        cmd.env("PATH", &path)
            .env(postgres::URL_VAR, &pg.url)
            .env(tools::TOOLS_BIN_VAR, &tools_bin)
            .env(tools::NGINX_VAR, &nginx)
            .env(tools::CADDY_VAR, &caddy)
            .env(tools::PROMTOOL_VAR, &promtool);
    };

    let nextest = util::cargo()
        .args(["nextest", "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());

    // nextest does not run doctests: run them first, so that the suite's summary closes the
    // output (CI reads the last runner summary, and a crate without doctests ends on
    // "0 passed"). Arguments for nextest are not meant for them, so then they are left out.
    let mut doc_failed = None;
    if nextest {
        if extra.is_empty() {
            let mut doc = util::cargo();
            doc.args(["test", "--workspace", "--doc"]);
            with_env(&mut doc);
            note!("running `{}`", util::display_cargo(&doc));
            let status = util::run_status(&mut doc)?;
            if !status.success() {
                note!("doctests failed (see above); running the rest of the suite anyway");
                doc_failed = Some(status);
            }
        } else {
            note!(
                "not running doctests: arguments were given for nextest (run them with \
                 `cargo test --workspace --doc`)"
            );
        }
    }

    let mut suite = util::cargo();
    if nextest {
        suite.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        note!("cargo-nextest not found (`cargo install cargo-nextest` for it): using cargo test");
        suite.args(["test", "--workspace", "--no-fail-fast"]);
    }
    suite.args(extra);
    with_env(&mut suite);
    note!("running `{}`", util::display_cargo(&suite));
    let status = util::run_status(&mut suite)?;
    match doc_failed {
        Some(doc_status) if status.success() => {
            note!("the doctests failed (see above)");
            Ok(util::exit_code_of(doc_status))
        }
        _ => Ok(util::exit_code_of(status)),
    }
}

/// Formatting, lints, then the whole suite; stops at the first failure.
pub(crate) fn ci() -> Result<ExitCode> {
    let steps: [&[&str]; 2] = [
        &["fmt", "--all", "--", "--check"],
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    ];
    let path = tools::path_with(&[&tools::ensure_nasm(&util::target_dir())?]);
    for args in steps {
        let mut cmd = util::cargo();
        cmd.args(args).env("PATH", &path);
        note!("running `{}`", util::display_cargo(&cmd));
        let status = util::run_status(&mut cmd)?;
        if !status.success() {
            note!(
                "`{}` failed: fix the above first",
                util::display_cargo(&cmd)
            );
            return Ok(util::exit_code_of(status));
        }
    }
    test(&[])
}
