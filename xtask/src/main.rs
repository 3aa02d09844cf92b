//! Project tasks: `cargo xtask <command>` (see [`HELP`]).
#![allow(clippy::print_stdout, clippy::print_stderr)] // Printing is what xtask is for.

mod bench;
mod bench_s3;
mod fuzz;
mod postgres;
mod test;
mod tools;
mod util;

use std::process::ExitCode;

const HELP: &str = "\
Usage: cargo xtask <command>

Commands:
  test [-- ARGS]  Run the whole test suite (cargo nextest, else cargo test; plus doctests) with
                  what it needs: PostgreSQL (MMRCTL_TEST_DATABASE_URL, else 127.0.0.1:5432, else a
                  throwaway cluster), the Python tools venv (<target>/tools-venv, pinned in
                  xtask/requirements-tools.txt), systemd-analyze, nginx, Caddy and promtool
                  (from PATH, else Debian's packages unpacked under <target>/, not installed;
                  MMRCTL_NGINX, MMRCTL_CADDY, MMRCTL_PROMTOOL).
                  ARGS go to the test runner.
  ci              cargo fmt --check, cargo clippy -D warnings, then `test` (what .ci/run runs).
  bench [NAME...] Run the benchmarks (or only those named: render, serve, s3, import,
                  federation, thumbnails, previews, capacity) and rewrite their sections of
                  docs/benchmarks.md (the server benches use PostgreSQL and the tools venv as
                  `test` does, nginx too for federation, and a release build).
  soak [--seconds N]
                  Three instances on one database under a mixed load for N seconds (default
                  180): latencies, wrong answers and each instance's RSS into
                  docs/benchmarks.md (as `bench soak`).
  fuzz [--seconds N] [TARGET...]
                  Run every fuzz target of fuzz/ (or those named) for N seconds each (default
                  60), AddressSanitizer on, the corpus kept in fuzz/corpus/ (cargo-fuzz from
                  PATH, else installed under <target>/cargo-fuzz; needs a nightly toolchain).
  help            Show this message.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((command, rest)) => (command.as_str(), rest),
        None => ("help", &[][..]),
    };
    let result = match command {
        "test" => {
            // `cargo xtask test -- ARGS` and `cargo xtask test ARGS` both pass ARGS on.
            let extra = rest.strip_prefix(&["--".to_owned()]).unwrap_or(rest);
            test::test(extra)
        }
        "ci" if !rest.is_empty() => {
            eprintln!("xtask: `{command}` takes no arguments (got {rest:?})\n\n{HELP}");
            return ExitCode::from(2);
        }
        "ci" => test::ci(),
        "bench" => bench::bench(rest),
        "fuzz" => fuzz::fuzz(rest),
        "soak" => match rest {
            [] => bench::bench_with(&["soak".to_owned()], bench::SOAK_SECONDS),
            [flag, n] if flag == "--seconds" => match n.parse() {
                Ok(n) => bench::bench_with(&["soak".to_owned()], n),
                Err(_) => {
                    eprintln!("xtask: --seconds takes a number\n\n{HELP}");
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("xtask: soak takes only --seconds N\n\n{HELP}");
                return ExitCode::from(2);
            }
        },
        "help" | "-h" | "--help" => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("xtask: unknown command `{other}`\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
