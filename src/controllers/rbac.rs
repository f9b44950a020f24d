//! The RBAC the components need beyond Kubernetes' bootstrap policy
//! ([`crate::node::rbac::MANIFEST`]), applied every time the apiserver becomes ready: a
//! binding deleted by hand, or lost with a restored datastore, comes back.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{
    Applier, Context, Controller, ControllerError, Reporter, on_every_ready, parse_manifests,
};

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
            on_every_ready(ctx.apiserver.clone(), &shutdown, || async {
                reporter.progressing("applying");
                for object in &objects {
                    applier.apply(object).await?;
                }
                info!(objects = objects.len(), "RBAC for the components applied");
                reporter.ready(format!("{} objects applied", objects.len()));
                Ok(())
            })
            .await
        })
    }
}
