//! `cargo xtask test` and `cargo xtask ci`.

use std::process::{Command, ExitCode, Stdio};

use anyhow::Result;

use crate::util::{self, note};
use crate::{postgres, tools};

/// Provides what the suite needs (Postgres, the tools venv, systemd-analyze), then runs it with
/// `extra` passed to the runner. Returns the runner's exit code.
pub(crate) fn test(extra: &[String]) -> Result<ExitCode> {
    let target = util::target_dir();
    // Stopped when this goes out of scope, whatever the tests did.
    let pg = postgres::provide(&target)?;
    let tools_bin = tools::ensure_venv(&target)?;
    tools::ensure_systemd_analyze()?;

    let with_env = |cmd: &mut Command| {
        cmd.env(postgres::URL_VAR, &pg.url)
            .env(tools::TOOLS_BIN_VAR, &tools_bin);
    };

    let nextest = util::cargo()
        .args(["nextest", "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());

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
    if !nextest {
        return Ok(util::exit_code_of(status));
    }

    // nextest does not run doctests.
    if !extra.is_empty() {
        note!(
            "not running doctests: arguments were given for nextest (run them with \
             `cargo test --workspace --doc`)"
        );
        return Ok(util::exit_code_of(status));
    }
    let mut doc = util::cargo();
    doc.args(["test", "--workspace", "--doc"]);
    with_env(&mut doc);
    note!("running `{}`", util::display_cargo(&doc));
    let doc_status = util::run_status(&mut doc)?;
    if !status.success() {
        note!("the test suite failed (see above)");
        return Ok(util::exit_code_of(status));
    }
    Ok(util::exit_code_of(doc_status))
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
    for args in steps {
        let mut cmd = util::cargo();
        cmd.args(args);
        note!("running `{}`", util::display_cargo(&cmd));
        let status = util::run_status(&mut cmd)?;
        if !status.success() {
            note!("`{}` failed: fix the above first", util::display_cargo(&cmd));
            return Ok(util::exit_code_of(status));
        }
    }
    test(&[])
}
