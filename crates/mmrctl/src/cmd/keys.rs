//! `mmrctl keys`: the media repo's signing key (authenticated media signs outbound federation
//! requests with it, and the homeserver must publish it). See docs/keys.md.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use keys::manage::{self, Report};
use keys::{Homeserver, KeyFile, KeyFormat, KeyId};
use serde_json::json;

use crate::emit;

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(clap::Subcommand)]
enum KeysCommand {
    /// Write a fresh ed25519 key (from the OS random number generator) to a new file, mode 0600.
    Generate(GenerateArgs),
    /// Make the homeserver publish the key the media repo signs with (Synapse: add it to
    /// Synapse's key file; Dendrite: give the media repo Dendrite's own key).
    Merge(MergeArgs),
    /// Show the format, key ids and public keys of key files.
    List(ListArgs),
    /// Remove a key from the homeserver's key file and print the config that keeps its old
    /// signatures verifiable.
    Revoke(RevokeArgs),
    /// Write the keys of a key file in another format.
    Convert(ConvertArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    /// matrix-media-repo's PEM (`MMR PRIVATE KEY`): what `signingKeyPath` reads.
    Mmr,
    /// Synapse's `ed25519 <version> <key>` lines.
    Synapse,
    /// Dendrite's PEM (`MATRIX PRIVATE KEY`).
    Dendrite,
}

impl From<FormatArg> for KeyFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Mmr => Self::Mmr,
            FormatArg::Synapse => Self::Synapse,
            FormatArg::Dendrite => Self::Dendrite,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum HomeserverArg {
    Synapse,
    Dendrite,
}

impl From<HomeserverArg> for Homeserver {
    fn from(h: HomeserverArg) -> Self {
        match h {
            HomeserverArg::Synapse => Self::Synapse,
            HomeserverArg::Dendrite => Self::Dendrite,
        }
    }
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The key file to write.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "mmr")]
    format: FormatArg,
    /// Replace an existing file (its owner, group and mode are kept).
    #[arg(long, conflicts_with = "if_missing")]
    force: bool,
    /// When the file exists, keep it and report its key (for provisioning that runs repeatedly).
    #[arg(long)]
    if_missing: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct MergeArgs {
    #[arg(long, value_enum)]
    homeserver: HomeserverArg,
    /// The homeserver's key file: Synapse's `signing_key_path`, Dendrite's `private_key`.
    #[arg(long, value_name = "PATH")]
    homeserver_key: PathBuf,
    /// The media repo's key file (its `signingKeyPath`).
    #[arg(long, value_name = "PATH")]
    media_repo_key: PathBuf,
    /// Synapse: take this key (an earlier media repo key) out of the homeserver's file while
    /// adding the media repo's.
    #[arg(long, value_name = "KEY_ID")]
    replace_key_id: Option<KeyId>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ListArgs {
    /// Key files of any format.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct RevokeArgs {
    #[arg(long, value_enum)]
    homeserver: HomeserverArg,
    /// The homeserver's key file.
    #[arg(long, value_name = "PATH")]
    homeserver_key: PathBuf,
    /// The key to remove (never the first, the homeserver's own).
    #[arg(long, value_name = "KEY_ID")]
    key_id: KeyId,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// The key file to read (any format).
    #[arg(long = "in", value_name = "PATH")]
    input: PathBuf,
    /// The key file to write.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    #[arg(long, value_enum)]
    format: FormatArg,
    /// Only this key (else every key, in order).
    #[arg(long, value_name = "KEY_ID")]
    key_id: Option<KeyId>,
    /// Replace an existing file that holds something else.
    #[arg(long)]
    force: bool,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    match &args.command {
        KeysCommand::Generate(a) => generate(a),
        KeysCommand::Merge(a) => merge(a),
        KeysCommand::List(a) => list(a),
        KeysCommand::Revoke(a) => revoke(a),
        KeysCommand::Convert(a) => convert(a),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn generate(a: &GenerateArgs) -> anyhow::Result<ExitCode> {
    let format = KeyFormat::from(a.format);
    let made = manage::generate(&manage::Generate {
        out: &a.out,
        format,
        force: a.force,
        if_missing: a.if_missing,
    })?;
    if a.json {
        emit(&format!(
            "{}\n",
            json!({
                "changed": made.created,
                "path": a.out,
                "key_id": made.id.to_string(),
                "public_key": made.public_key,
            })
        ));
    } else if made.created {
        emit(&format!(
            "wrote a new key to {} ({format} format): {} {}\n",
            a.out.display(),
            made.id,
            made.public_key
        ));
    } else {
        emit(&format!(
            "{} exists, kept: {} {}\n",
            a.out.display(),
            made.id,
            made.public_key
        ));
    }
    Ok(ExitCode::SUCCESS)
}

fn merge(a: &MergeArgs) -> anyhow::Result<ExitCode> {
    let homeserver = Homeserver::from(a.homeserver);
    let report = manage::merge(&manage::Merge {
        homeserver,
        homeserver_key: &a.homeserver_key,
        media_repo_key: &a.media_repo_key,
        replace_key_id: a.replace_key_id.as_ref(),
        now_ms: now_ms(),
    })?;
    print_report(homeserver, &report, a.json);
    Ok(ExitCode::SUCCESS)
}

fn revoke(a: &RevokeArgs) -> anyhow::Result<ExitCode> {
    let homeserver = Homeserver::from(a.homeserver);
    let report = manage::revoke(&manage::Revoke {
        homeserver,
        homeserver_key: &a.homeserver_key,
        key_id: &a.key_id,
        now_ms: now_ms(),
    })?;
    print_report(homeserver, &report, a.json);
    Ok(ExitCode::SUCCESS)
}

fn convert(a: &ConvertArgs) -> anyhow::Result<ExitCode> {
    let report = manage::convert(&manage::Convert {
        input: &a.input,
        output: &a.out,
        format: a.format.into(),
        key_id: a.key_id.as_ref(),
        force: a.force,
    })?;
    for note in &report.notes {
        emit(&format!("{note}\n"));
    }
    Ok(ExitCode::SUCCESS)
}

/// Notes, then the old-keys config to add when keys were taken out.
fn print_report(homeserver: Homeserver, report: &Report, as_json: bool) {
    let config = (!report.old_keys.is_empty())
        .then(|| manage::old_keys_config(homeserver, &report.old_keys));
    if as_json {
        let old_keys: Vec<_> = report
            .old_keys
            .iter()
            .map(|k| {
                json!({
                    "key_id": k.id.to_string(),
                    "public_key": k.public_key_base64(),
                    "expired_ts": k.expired_ts,
                })
            })
            .collect();
        emit(&format!(
            "{}\n",
            json!({
                "changed": report.changed,
                "written": report.written,
                "backups": report.backups,
                "notes": report.notes,
                "old_keys": old_keys,
                "old_keys_config": config,
            })
        ));
        return;
    }
    let mut out = String::new();
    for note in &report.notes {
        let _ = writeln!(out, "{note}.");
    }
    if let Some(config) = config {
        let (file, section) = match homeserver {
            Homeserver::Synapse => ("homeserver.yaml", "`old_signing_keys`"),
            Homeserver::Dendrite => ("dendrite.yaml", "`global.old_private_keys`"),
        };
        let _ = write!(
            out,
            "\nAdd this to {homeserver}'s {file} (into its {section} if it has one), then restart \
             {homeserver}, so that other servers still verify what the removed key signed:\n\n\
             {config}"
        );
    }
    emit(&out);
}

fn list(a: &ListArgs) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    let mut files = Vec::new();
    let mut out = String::new();
    for path in &a.paths {
        let file = match manage::read(path) {
            Ok(file) => file,
            Err(e) => {
                eprintln!("error: {e}");
                failed = true;
                continue;
            }
        };
        if a.json {
            files.push(json!({
                "path": path,
                "format": file.format().name(),
                "keys": file.keys().iter().enumerate().map(|(i, k)| json!({
                    "key_id": k.id().to_string(),
                    "public_key": k.public_key_base64(),
                    "use": key_use(&file, i),
                })).collect::<Vec<_>>(),
            }));
            continue;
        }
        let count = file.keys().len();
        let _ = writeln!(
            out,
            "{}: {}, {count} key{}",
            path.display(),
            file.format(),
            if count == 1 { "" } else { "s" }
        );
        let width = file
            .keys()
            .iter()
            .map(|k| k.id().to_string().len())
            .max()
            .unwrap_or(0);
        for (i, key) in file.keys().iter().enumerate() {
            let _ = writeln!(
                out,
                "  {:width$}  {}  {}",
                key.id().to_string(),
                key.public_key_base64(),
                key_use(&file, i)
            );
        }
    }
    if a.json {
        out = format!("{}\n", serde_json::Value::Array(files));
    }
    emit(&out);
    if failed {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// What the `index`th key of a file is used for by the program that reads that format.
fn key_use(file: &KeyFile, index: usize) -> &'static str {
    match (file.format(), index) {
        (KeyFormat::Synapse, 0) => "signs; published",
        (KeyFormat::Synapse, _) => "published",
        (KeyFormat::Dendrite, 0) => "signs; published",
        (KeyFormat::Dendrite, _) => "ignored by Dendrite",
        (KeyFormat::Mmr, 0) => "signs",
        (KeyFormat::Mmr, _) => "ignored by the media repo",
    }
}
