//! `mmrctl archive export|import|list|delete`: GDPR archives (matrix-media-repo's v2 format) on
//! the command line, against the database and datastores of a config.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    config: crate::ConfigArg,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Export a user's (`@user:server`) or a server's media as tar.gz parts into a directory;
    /// the export is also kept in the archives datastore (listed by `archive list`).
    Export {
        entity: String,
        /// Where the parts are written.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Record the public URL of objects on S3 datastores with `publicBaseUrl`.
        #[arg(long)]
        s3_urls: bool,
    },
    /// Import an export (every part of it, in any order; from matrix-media-repo or mmrctl).
    /// Media already here is left as it is. Exits with 1 when some media could not be imported.
    Import {
        #[arg(required = true)]
        parts: Vec<PathBuf>,
    },
    /// The exports kept in the archives datastore.
    List,
    /// Delete an export and its parts.
    Delete { export_id: String },
}

#[allow(clippy::print_stdout)] // The command's output.
pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let loaded = config::Config::load_valid(&args.config.config)?;
    let config = loaded.config;
    crate::runtime()?.block_on(async {
        let store = store::Store::open(&config)
            .await
            .with_context(|| format!("cannot open the store of {}", args.config.config.display()))?;
        match &args.command {
            Command::Export {
                entity,
                out,
                s3_urls,
            } => {
                let export_id = store.create_export(entity).await?;
                let report = media::archives::export(
                    &store,
                    &export_id,
                    entity,
                    config.archiving.target_bytes_per_part.max(1),
                    *s3_urls,
                )
                .await?;
                tokio::fs::create_dir_all(out)
                    .await
                    .with_context(|| format!("cannot create {}", out.display()))?;
                let export = store
                    .export(&export_id)
                    .await?
                    .context("the export vanished while it was written")?;
                for part in &export.parts {
                    let path = out.join(&part.file_name);
                    let mut reader = store.read(&part.object, 0, None).await?;
                    let mut file = tokio::fs::File::create(&path)
                        .await
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    tokio::io::copy(&mut reader, &mut file).await?;
                    file.sync_all().await?;
                }
                println!(
                    "export {export_id}: {} media, {} bytes, {} parts in {}",
                    report.media,
                    report.bytes,
                    report.parts,
                    out.display()
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Import { parts } => {
                let served: Vec<String> = config
                    .homeservers
                    .iter()
                    .map(|h| h.name.to_ascii_lowercase())
                    .collect();
                let report = media::archives::import(&store, parts.clone(), |origin| {
                    served.contains(&origin.to_ascii_lowercase())
                })
                .await?;
                println!(
                    "import of {}: {} imported, {} already here, {} missing from the parts, {} failed",
                    report.entity,
                    report.imported,
                    report.existing,
                    report.missing.len(),
                    report.failed.len()
                );
                for mxc in &report.missing {
                    println!("missing: {mxc}");
                }
                for (mxc, why) in &report.failed {
                    println!("failed: {mxc}: {why}");
                }
                Ok(if report.missing.is_empty() && report.failed.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Command::List => {
                for (id, entity, created, parts, bytes) in store.exports().await? {
                    println!("{id}\t{entity}\t{created}\t{parts} parts\t{bytes} bytes");
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Delete { export_id } => {
                if store.delete_export(export_id).await? {
                    println!("export {export_id} deleted");
                    Ok(ExitCode::SUCCESS)
                } else {
                    anyhow::bail!("no export {export_id}")
                }
            }
        }
    })
}
