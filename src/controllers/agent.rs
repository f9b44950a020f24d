//! The cluster agent (joins, certificate signing for joiners) as a resident of the
//! controllers layer: it listens on `cluster.agent_port` of a control plane once the node
//! is clustered or has join tokens (`kdist add-node`); a single node opens no port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{Context, Controller, ControllerError, Reporter, pause};

pub struct ClusterAgent;

impl Controller for ClusterAgent {
    fn name(&self) -> &'static str {
        "cluster-agent"
    }

    fn needs_apiserver(&self) -> bool {
        false
    }

    fn run(
        self: Arc<Self>,
        ctx: Context,
        reporter: Reporter,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), ControllerError>> {
        Box::pin(async move {
            reporter.ready("idle: no join tokens (run `kdist add-node`)");
            while !crate::cluster::agent_wanted(&ctx.data) {
                if !pause(Duration::from_secs(1), &shutdown).await {
                    return Ok(());
                }
            }
            let address = SocketAddr::from(([0, 0, 0, 0], ctx.config.cluster.agent_port));
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| ControllerError::Listen { address, source })?;
            let (data, config) = (ctx.data.clone(), ctx.config.clone());
            let agent =
                tokio::task::spawn_blocking(move || crate::cluster::Agent::new(data, config))
                    .await
                    .map_err(|source| ControllerError::Task {
                        controller: "cluster-agent",
                        source,
                    })?
                    .map_err(|e| ControllerError::Other(Box::new(e)))?;
            reporter.ready(format!("serving joins on {address}"));
            agent.run(listener, shutdown).await;
            Ok(())
        })
    }
}
