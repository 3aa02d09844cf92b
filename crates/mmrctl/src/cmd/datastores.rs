//! `mmrctl datastores transfer|check`: move media between datastores, and compare a datastore with
//! the database.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Move every object of one datastore to another (file to S3, S3 to file, ...), one at a time,
    /// while the server keeps running. Resumable: run it again to continue after a stop or a
    /// failure. Exits with 1 when some objects could not be moved.
    Transfer {
        /// The datastore id to empty.
        #[arg(long, value_name = "ID")]
        from: String,
        /// The datastore id to move the objects to.
        #[arg(long, value_name = "ID")]
        to: String,
        #[command(flatten)]
        config: crate::ConfigArg,
    },
    /// List objects of a datastore that no row references, and rows whose object is missing from
    /// it. Exits with 1 when it finds any.
    Check {
        /// The datastore id.
        id: String,
        #[command(flatten)]
        config: crate::ConfigArg,
    },
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let runtime = crate::runtime()?;
    match &args.command {
        Command::Transfer { from, to, config } => {
            runtime.block_on(transfer(&config.config, from, to))
        }
        Command::Check { id, config } => runtime.block_on(check(&config.config, id)),
    }
}

async fn open(path: &Path) -> anyhow::Result<store::Store> {
    let loaded = config::Config::load_valid(path)?;
    store::Store::open(&loaded.config)
        .await
        .with_context(|| format!("cannot open the store of {}", path.display()))
}

async fn transfer(config: &Path, from: &str, to: &str) -> anyhow::Result<ExitCode> {
    let store = open(config).await?;
    let started = Instant::now();
    let mut last = Instant::now();
    let report = store
        .transfer(from, to, |report, _| {
            if last.elapsed() >= Duration::from_secs(2) {
                last = Instant::now();
                eprintln!(
                    "transferred {} of {} objects ({}), {} failed",
                    report.moved,
                    report.total,
                    bytes(report.bytes),
                    report.failed.len()
                );
            }
        })
        .await
        .with_context(|| {
            format!(
                "the transfer from `{from}` to `{to}` stopped; what was moved stays moved: run the \
                 same command again to continue"
            )
        })?;
    for (sha256, why) in &report.failed {
        crate::emit(&format!("not moved: {sha256}: {why}\n"));
    }
    crate::emit(&format!(
        "moved {} object(s) ({}) from `{from}` to `{to}` in {:.1} s; {} could not be moved\n",
        report.moved,
        bytes(report.bytes),
        started.elapsed().as_secs_f64(),
        report.failed.len()
    ));
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn check(config: &Path, id: &str) -> anyhow::Result<ExitCode> {
    let store = open(config).await?;
    let report = store.check_datastore(id).await?;
    let mut out = String::new();
    for location in &report.orphans {
        out.push_str(&format!("orphan: {location} (no row references it)\n"));
    }
    for object in &report.missing {
        out.push_str(&format!(
            "missing: {} (sha256 {}, {} bytes: the row's object is not in the datastore)\n",
            object.location, object.sha256, object.size
        ));
    }
    out.push_str(&format!(
        "datastore `{id}`: {} object(s) listed, {} row(s); {} orphan(s), {} missing\n",
        report.listed,
        report.rows,
        report.orphans.len(),
        report.missing.len()
    ));
    if !report.orphans.is_empty() {
        out.push_str(
            "uploads in progress place their object just before their row is written: check again \
             in a few minutes before deleting orphans\n",
        );
    }
    crate::emit(&out);
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `1.5 GiB`, `300 B`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::bytes(300), "300 B");
        assert_eq!(super::bytes(1536), "1.5 KiB");
        assert_eq!(super::bytes(300 * 1024 * 1024), "300.0 MiB");
    }
}
