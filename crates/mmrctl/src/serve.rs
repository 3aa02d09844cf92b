use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// The media repo's config (matrix-media-repo's `media-repo.yaml` schema).
    #[arg(
        long,
        env = "REPO_CONFIG",
        default_value = "media-repo.yaml",
        value_name = "PATH"
    )]
    config: PathBuf,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(server::serve(args.config.clone()))?;
    Ok(ExitCode::SUCCESS)
}
