use std::process::ExitCode;

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    config: crate::ConfigArg,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    crate::runtime()?.block_on(server::serve(args.config.config.clone()))?;
    Ok(ExitCode::SUCCESS)
}
