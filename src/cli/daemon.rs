use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config::{DataDir, NodeConfig};
use std::sync::Arc;

use crate::supervisor::{Builtins, Daemon, bind_control_socket};

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
    let mut builtins = Builtins::new();
    builtins.insert(
        "datastore".to_string(),
        Arc::new(crate::datastore::Embedded::new(data.clone())),
    );
    let daemon = Daemon::prepare(data.clone(), &config)
        .await?
        .with_builtins(builtins);
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

/// Runs the cluster agent on `cluster.agent_port` (all interfaces) of a control-plane
/// node once the node is clustered or has join tokens (`kdist add-node`): a single node
/// opens no port for joins. A port in use is retried every 10 s with a warning; nothing
/// else depends on the agent.
async fn start_cluster_agent(data: &DataDir, config: &NodeConfig, shutdown: &CancellationToken) {
    if config.role == crate::config::Role::Worker {
        return;
    }
    let (data, config, shutdown) = (data.clone(), config.clone(), shutdown.clone());
    tokio::spawn(async move {
        let pause = |secs| {
            let shutdown = shutdown.clone();
            async move {
                tokio::select! {
                    _ = shutdown.cancelled() => false,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(secs)) => true,
                }
            }
        };
        while !crate::cluster::agent_wanted(&data) {
            if !pause(1).await {
                return;
            }
        }
        let address = std::net::SocketAddr::from(([0, 0, 0, 0], config.cluster.agent_port));
        let listener = loop {
            match tokio::net::TcpListener::bind(address).await {
                Ok(l) => break l,
                Err(e) => {
                    tracing::warn!(%address, error = %e, "cluster agent cannot listen; set cluster.agent_port in config.yaml (retrying)");
                    if !pause(10).await {
                        return;
                    }
                }
            }
        };
        let (d, c) = (data.clone(), config.clone());
        match tokio::task::spawn_blocking(move || crate::cluster::Agent::new(d, c)).await {
            Ok(Ok(agent)) => agent.run(listener, shutdown).await,
            Ok(Err(e)) => tracing::warn!(error = %e, "cluster agent not started"),
            Err(e) => tracing::warn!(error = %e, "cluster agent not started"),
        }
    });
}
