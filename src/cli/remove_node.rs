use std::process::ExitCode;

use crate::config::{DataDir, NodeConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The node to remove (its node name).
    pub name: String,
    /// Go on when etcd cannot be asked or the node is unknown (a node that is gone).
    #[arg(long)]
    pub force: bool,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::load(&data)?;
    let name = args.name.clone();
    let removed = tokio::task::spawn_blocking(move || {
        crate::cluster::remove_node(&data, &config, &args.name, args.force)
    })
    .await??;
    println!(
        "removed {name}: etcd member {}, Kubernetes Node {}, record {}",
        if removed.etcd_member {
            "removed"
        } else {
            "none"
        },
        match removed.kubernetes_node {
            Some(true) => "deleted",
            _ => "not deleted",
        },
        if removed.record { "forgotten" } else { "none" },
    );
    for note in removed.notes {
        println!("note: {note}");
    }
    Ok(ExitCode::SUCCESS)
}
