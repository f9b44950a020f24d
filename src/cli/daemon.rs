use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config::{DataDir, NodeConfig};
use crate::supervisor::{Daemon, bind_control_socket};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Install this file as the node's config.yaml before starting.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Leave the caller's session (used by `kdist start`).
    #[arg(long, hide = true)]
    pub detach: bool,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    if args.detach {
        // a new session: the daemon outlives the terminal that ran `kdist start`
        nix::unistd::setsid().context("setsid")?;
    }
    data.ensure()?;
    let config = match &args.config {
        Some(file) => NodeConfig::seed(&data, file)?,
        None => NodeConfig::load(&data)?,
    };
    let daemon = Daemon::prepare(data.clone(), &config).await?;
    let listener = bind_control_socket(&data)?;
    let shutdown = CancellationToken::new();
    // signals are handled here and nowhere else: they only ask for a clean stop
    let token = shutdown.clone();
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
            _ = token.cancelled() => return,
        }
        token.cancel();
    });
    tracing::info!(data_dir = %data.root().display(), pid = std::process::id(), "kdist daemon up");
    start_cluster_agent(&data, &config, &shutdown).await;
    daemon.run(listener, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Starts the cluster agent on `cluster.agent_port` (all interfaces) on a control-plane
/// node. A port in use or a missing CA leaves the node running without it, with a
/// warning: joins are then refused by connection, nothing else depends on the agent.
async fn start_cluster_agent(data: &DataDir, config: &NodeConfig, shutdown: &CancellationToken) {
    if config.role == crate::config::Role::Worker {
        return;
    }
    let address = std::net::SocketAddr::from(([0, 0, 0, 0], config.cluster.agent_port));
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(%address, error = %e, "cluster agent not started: cannot bind; set cluster.agent_port in config.yaml");
            return;
        }
    };
    let (d, c) = (data.clone(), config.clone());
    let agent = match tokio::task::spawn_blocking(move || crate::cluster::Agent::new(d, c)).await {
        Ok(Ok(agent)) => agent,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cluster agent not started");
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cluster agent not started");
            return;
        }
    };
    tokio::spawn(agent.run(listener, shutdown.clone()));
}
