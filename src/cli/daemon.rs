use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config::{DataDir, NodeConfig};
use crate::supervisor::bind_control_socket;

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
    crate::daemon::run(data, config, listener, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
