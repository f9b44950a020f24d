use std::process::ExitCode;

use crate::config::{DataDir, NodeConfig, Role};
use crate::supervisor::Client;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Reset even when the cluster cannot be told (its etcd is unreachable).
    #[arg(long)]
    pub force: bool,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::load(&data)?;
    if !args.force {
        refuse_orphaning_workers(&data, &config)?;
    }
    let running = Client::new(&data).status().await.is_ok();
    if running {
        let (d, c, force) = (data.clone(), config.clone(), args.force);
        let notes = tokio::task::spawn_blocking(move || crate::cluster::leave_etcd(&d, &c, force))
            .await??;
        for note in notes {
            println!("{note}");
        }
        super::stop::run(super::stop::Args { timeout: 120 }, data.clone()).await?;
    } else if !args.force
        && config.role == Role::ControlPlane
        && crate::cluster::joined(&data)?.is_some()
    {
        anyhow::bail!(
            "kdist is not running on this node, so it cannot remove itself from the cluster's \
             etcd; run `kdist start` then `kdist leave`, or `kdist leave --force` and \
             `kdist remove-node {}` on a remaining node",
            config.node_name()
        );
    }
    if config.role == Role::Worker {
        println!(
            "On a control plane, run `kdist remove-node {}` to delete its Node object and record.",
            config.node_name()
        );
    }
    let d = data.clone();
    tokio::task::spawn_blocking(move || crate::cluster::reset_to_single(&d)).await??;
    println!(
        "Left the cluster; this node is a fresh single node now. Run `kdist start`, or join \
         again with a new token from `kdist add-node`."
    );
    Ok(ExitCode::SUCCESS)
}

/// A control plane that did not join another one and through which only workers joined
/// is their whole control plane: leaving would reset it and strand them.
fn refuse_orphaning_workers(data: &DataDir, config: &NodeConfig) -> anyhow::Result<()> {
    if config.role != Role::ControlPlane || crate::cluster::joined(data)?.is_some() {
        return Ok(());
    }
    let nodes = crate::cluster::list_nodes(data)?;
    if nodes.is_empty() || nodes.iter().any(|n| n.role == Role::ControlPlane) {
        return Ok(());
    }
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    anyhow::bail!(
        "this node is the only control plane of {} worker(s) that joined it ({}): leaving \
         resets its CA and datastore and leaves them without a cluster; run \
         `kdist remove-node NAME` for each first, or `kdist leave --force` to reset anyway",
        names.len(),
        names.join(", ")
    )
}
