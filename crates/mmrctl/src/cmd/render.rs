use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use provision::output::{self, Change};
use provision::{Diagnostics, VarsInput};
use serde_json::json;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Inventory vars files (for example inventory/host_vars/matrix.example.com/vars.yml); later files
    /// override earlier ones.
    #[arg(required = true, value_name = "VARS_FILE")]
    vars: Vec<PathBuf>,
    /// Where to write the files [default: the `matrix_media_repo_base_path` variable].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Validate and report what would change; write nothing.
    #[arg(long)]
    check: bool,
    /// Show a unified diff of every file that changes (secrets included, as in Ansible's --diff).
    #[arg(long)]
    diff: bool,
    /// Print the report as JSON (for the Ansible role).
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let inputs: Vec<VarsInput> = args.vars.iter().cloned().map(VarsInput::File).collect();
    let (out_dir, rendered) = match provision::render(&inputs, args.out.as_deref()) {
        Ok(ok) => ok,
        Err(diagnostics) => return Ok(report_failure(args, &diagnostics)),
    };
    let planned = match output::plan(&out_dir, &rendered.files) {
        Ok(p) => p,
        Err(e) => {
            return Ok(report_failure(
                args,
                &Diagnostics {
                    errors: vec![e],
                    warnings: rendered.warnings,
                },
            ));
        }
    };
    if !args.check
        && let Err(e) = output::apply(&planned)
    {
        return Ok(report_failure(
            args,
            &Diagnostics {
                errors: vec![e],
                warnings: rendered.warnings,
            },
        ));
    }
    let changed = planned.iter().any(|p| p.change != Change::Unchanged);

    if args.json {
        let files: Vec<_> = planned
            .iter()
            .map(|p| json!({ "path": p.target, "status": p.change, "mode": format!("{:04o}", p.file.mode()) }))
            .collect();
        let report = json!({
            "ok": true,
            "check": args.check,
            "changed": changed,
            "out_dir": out_dir,
            "files": files,
            "warnings": rendered.warnings,
            "errors": [],
        });
        crate::emit(&format!("{report}\n"));
    } else {
        let mut out = String::new();
        for w in &rendered.warnings {
            eprintln!("warning: {w}");
        }
        for p in &planned {
            if args.diff
                && let Some(diff) = output::diff(p)
            {
                out.push_str(&diff);
            }
            let verb = match (p.change, args.check) {
                (Change::Created, false) => "created",
                (Change::Created, true) => "would create",
                (Change::Changed, false) => "changed",
                (Change::Changed, true) => "would change",
                (Change::Mode, false) => "fixed mode",
                (Change::Mode, true) => "would fix mode",
                (Change::Unchanged, _) => "unchanged",
            };
            let _ = writeln!(out, "{verb:>14}  {}", p.target.display());
        }
        let count = planned
            .iter()
            .filter(|p| p.change != Change::Unchanged)
            .count();
        let _ = match (args.check, count) {
            (_, 0) => writeln!(out, "everything is up to date"),
            (true, n) => writeln!(out, "check passed; {n} file(s) would change"),
            (false, n) => writeln!(out, "{n} file(s) written"),
        };
        crate::emit(&out);
    }
    Ok(ExitCode::SUCCESS)
}

fn report_failure(args: &Args, d: &Diagnostics) -> ExitCode {
    if args.json {
        let errors: Vec<String> = d.errors.iter().map(ToString::to_string).collect();
        crate::emit(&format!(
            "{}\n",
            json!({ "ok": false, "changed": false, "errors": errors, "warnings": d.warnings })
        ));
    } else {
        for w in &d.warnings {
            eprintln!("warning: {w}");
        }
        for e in &d.errors {
            eprintln!("error: {e}");
        }
        eprintln!(
            "render failed with {} error(s); nothing was written",
            d.errors.len()
        );
    }
    ExitCode::FAILURE
}
