use std::process::ExitCode;

use crate::config::DataDir;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args, _data: DataDir) -> anyhow::Result<ExitCode> {
    println!("kdist {}", env!("CARGO_PKG_VERSION"));
    Ok(ExitCode::SUCCESS)
}
