use std::process::ExitCode;

use crate::config::DataDir;
use crate::supervisor::Client;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The service to restart; its args file is read again.
    pub service: String,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    Client::new(&data).restart(&args.service).await?;
    println!("{} restarted", args.service);
    Ok(ExitCode::SUCCESS)
}
