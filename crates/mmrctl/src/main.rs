//! `mmrctl`: install, configure and run a Matrix media repository.
// A command-line program: printing is its job.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mmrctl", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Turn inventory variables (vars.yml) into the media repo's config, proxy routes, systemd unit and
    /// homeserver settings.
    Render(cmd::render::Args),
    /// Run the media server (what the generated systemd unit starts).
    Serve(cmd::serve::Args),
    /// Manage the media repo's signing key: generate, merge into the homeserver's key file, list,
    /// revoke, convert.
    Keys(cmd::keys::Args),
    /// Move media between datastores (file and S3), and check a datastore against the database.
    Datastores(cmd::datastores::Args),
    /// Check a running deployment from the outside in (routing, the homeserver's media repo and
    /// keys, database, datastores, disk space, clocks) and say what to fix. Exits with 1 when a
    /// check fails.
    Doctor(cmd::doctor::Args),
    /// Import the media a Synapse or Dendrite already has into the media repo (as `import_synapse` or
    /// `import_dendrite`, a link to mmrctl, it takes matrix-media-repo's flags).
    Import(cmd::import::Args),
}

/// `--config`: the media repo's config, shared by the commands that work on its store.
#[derive(clap::Args)]
pub(crate) struct ConfigArg {
    /// The media repo's config (matrix-media-repo's `media-repo.yaml` schema).
    #[arg(
        long,
        env = "REPO_CONFIG",
        default_value = "media-repo.yaml",
        value_name = "PATH"
    )]
    pub(crate) config: std::path::PathBuf,
}

/// The async runtime of the commands that need one.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Writes to stdout; a reader that went away (`| head`) is not an error worth a panic.
fn emit(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn main() -> ExitCode {
    // Run as `import_synapse`/`import_dendrite`: matrix-media-repo's command lines.
    let args = match cmd::import::alias_args(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    let result = match cli.command {
        Command::Render(args) => cmd::render::run(&args),
        Command::Serve(args) => cmd::serve::run(&args),
        Command::Keys(args) => cmd::keys::run(&args),
        Command::Import(args) => cmd::import::run(&args),
        Command::Datastores(args) => cmd::datastores::run(&args),
        Command::Doctor(args) => cmd::doctor::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
