use std::process::ExitCode;

use crate::config::{DataDir, NodeConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds to wait for a running node to stop first.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let code = super::stop::run(
        super::stop::Args {
            timeout: args.timeout,
        },
        data.clone(),
    )
    .await?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    let config = NodeConfig::load(&data)?;
    let done =
        tokio::task::spawn_blocking(move || crate::node::reset::reset(&data, &config)).await??;
    for line in &done {
        println!("{line}");
    }
    println!("node reset: workloads, container state, CNI and host changes are gone");
    Ok(ExitCode::SUCCESS)
}
