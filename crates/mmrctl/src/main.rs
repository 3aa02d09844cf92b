//! `mmrctl`: install, configure and run a Matrix media repository.
// A command-line program: printing is its job.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod cmd;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mmrctl",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("MMRCTL_COMMIT"), ")"),
    about,
    propagate_version = true
)]
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
    /// Operate the running media repo through its admin API: purge, quarantine, usage, tasks,
    /// transfers between datastores.
    Admin(cmd::admin::Args),
    /// GDPR archives in matrix-media-repo's format: export a user's or a server's media, import
    /// an export, list and delete exports.
    Archive(cmd::archive::Args),
    /// Print shell completions (bash, zsh, fish, elvish, powershell) for mmrctl.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (mmrctl.1 and one per subcommand) into a directory.
    Man {
        /// Where to write them (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: std::path::PathBuf,
    },
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

/// `mmrctl.1`, and `mmrctl-<sub>.1` for each subcommand (and theirs), written atomically.
fn man_pages(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fn write(dir: &std::path::Path, name: &str, cmd: clap::Command) -> anyhow::Result<()> {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd.clone().name(name.to_owned()))
            .render(&mut page)
            .with_context(|| format!("cannot render the man page of {name}"))?;
        let path = dir.join(format!("{name}.1"));
        provision::output::write_atomic(&path, &page, 0o644)
            .with_context(|| format!("cannot write {}", path.display()))?;
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            write(dir, &format!("{name}-{}", sub.get_name()), sub.clone())?;
        }
        Ok(())
    }
    let mut cli = Cli::command();
    cli.build();
    write(dir, "mmrctl", cli)?;
    Ok(ExitCode::SUCCESS)
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
        Command::Admin(args) => cmd::admin::run(&args),
        Command::Archive(args) => cmd::archive::run(&args),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "mmrctl", &mut out);
            emit(&String::from_utf8_lossy(&out));
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => man_pages(&dir),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
