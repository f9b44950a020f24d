//! The RBAC the components need beyond Kubernetes' bootstrap policy
//! ([`crate::node::rbac::MANIFEST`]), applied every time the apiserver becomes ready: a
//! binding deleted by hand, or lost with a restored datastore, comes back.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{Applier, Context, Controller, ControllerError, Reporter, next_ready, parse_manifests};

pub struct Rbac;

impl Controller for Rbac {
    fn name(&self) -> &'static str {
        "rbac"
    }

    fn run(
        self: Arc<Self>,
        ctx: Context,
        reporter: Reporter,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), ControllerError>> {
        Box::pin(async move {
            let objects = parse_manifests(crate::node::rbac::MANIFEST, "kdist's RBAC")?;
            let applier = Applier::new(ctx.client.clone());
            let mut apiserver = ctx.apiserver.clone();
            let mut applied = 0;
            loop {
                let epoch = tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    epoch = next_ready(&mut apiserver, applied) => match epoch {
                        Some(epoch) => epoch,
                        None => return Ok(()),
                    },
                };
                reporter.progressing("applying");
                for object in &objects {
                    applier.apply(object).await?;
                }
                applied = epoch;
                info!(objects = objects.len(), "RBAC for the components applied");
                reporter.ready(format!("{} objects applied", objects.len()));
            }
        })
    }
}
