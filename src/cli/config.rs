use std::process::ExitCode;

use crate::config::{DataDir, NodeConfig};
use crate::node;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Keep the server at 127.0.0.1 (for use on this machine only).
    #[arg(long)]
    pub local: bool,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::load(&data)?;
    let host = if args.local {
        None
    } else {
        Some(
            config
                .network
                .node_ip
                .unwrap_or_else(node::host::detect_node_ip),
        )
    };
    print!("{}", node::kubeconfig::admin(&data, host)?);
    Ok(ExitCode::SUCCESS)
}
