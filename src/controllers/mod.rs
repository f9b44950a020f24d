//! The controllers layer: cluster-side work that runs inside the daemon once
//! kube-apiserver is ready, against one shared kube-rs client built from the node's
//! kubeconfig (the admin's on a control plane, the kubelet's on a worker).
//!
//! Each controller is named, runs in its own task, is restarted with capped backoff when
//! it fails, reports its state on a [`Board`] that `kdist status` shows, and is stopped in
//! reverse start order. Controllers are level-triggered: after any restart they rebuild
//! what they need from the API, never from memory. The [`Apiserver`] signal tells them
//! each time the apiserver becomes ready again (after a restart, a datastore migration or
//! an upgrade), so work that must be put back (RBAC, addons) is applied again.
//!
//! This module owns the shared client, the host and the generic server-side apply. It
//! must not touch child processes (that is the supervisor's) nor host networking beyond
//! what a resident controller owns; the composition root (`crate::daemon`) decides which
//! controllers run and feeds the apiserver signal.

pub mod addons;
mod agent;
mod apply;
mod error;
mod host;
mod network;
mod rbac;
mod releases;
pub mod storage;

use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use addons::{AddonBoard, Addons};
pub use agent::ClusterAgent;
pub use apply::{Applier, FIELD_MANAGER, parse_manifests};
pub use error::ControllerError;
pub use host::{Board, ControllerState, ControllerStatus, Controllers, Reporter};
pub use network::{Network, NetworkStatus, PeerStatus};
pub use rbac::Rbac;
pub use releases::{CONTROL_PLANE_LABEL, NodeRelease, RELEASE_ANNOTATION, Releases};
pub use storage::Storage;

use crate::config::{DataDir, NodeConfig};

/// The apiserver as the controllers see it: whether it is ready now, and how many times
/// it became ready since the daemon started (0: not yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Apiserver {
    pub ready: bool,
    pub epoch: u64,
}

impl Apiserver {
    /// The next state after a readiness observation.
    pub fn observe(self, ready: bool) -> Self {
        Self {
            ready,
            epoch: if ready && !self.ready {
                self.epoch + 1
            } else {
                self.epoch
            },
        }
    }
}

/// Waits until the apiserver is ready in an epoch after `seen`; returns that epoch, or
/// None when the signal's sender is gone (the daemon is stopping).
pub async fn next_ready(rx: &mut watch::Receiver<Apiserver>, seen: u64) -> Option<u64> {
    rx.wait_for(|a| a.ready && a.epoch > seen)
        .await
        .ok()
        .map(|a| a.epoch)
}

/// The epoch of the ready apiserver: at once when it is ready, else after saying so on
/// `reporter` and waiting; None when `shutdown` comes first or the signal ends.
pub async fn ready_epoch(
    rx: &mut watch::Receiver<Apiserver>,
    reporter: &Reporter,
    shutdown: &CancellationToken,
) -> Option<u64> {
    let now = *rx.borrow_and_update();
    if now.ready {
        return Some(now.epoch);
    }
    reporter.progressing("waiting for kube-apiserver");
    tokio::select! {
        _ = shutdown.cancelled() => None,
        ready = rx.wait_for(|a| a.ready) => ready.ok().map(|a| a.epoch),
    }
}

/// Runs `work` every time the apiserver becomes ready in a new epoch, until `shutdown`
/// (or the signal's end); an error of `work` ends it.
pub async fn on_every_ready<F, Fut>(
    mut apiserver: watch::Receiver<Apiserver>,
    shutdown: &CancellationToken,
    mut work: F,
) -> Result<(), ControllerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), ControllerError>>,
{
    let mut seen = 0;
    loop {
        let epoch = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            epoch = next_ready(&mut apiserver, seen) => match epoch {
                Some(epoch) => epoch,
                None => return Ok(()),
            },
        };
        work().await?;
        seen = epoch;
    }
}

/// What every controller is handed.
#[derive(Clone)]
pub struct Context {
    pub client: kube::Client,
    /// Where `client` came from: each (re)start of a controller builds its client anew
    /// from it, and a change of its credentials restarts the controllers.
    pub kubeconfig: std::path::PathBuf,
    pub data: DataDir,
    pub config: NodeConfig,
    pub apiserver: watch::Receiver<Apiserver>,
}

/// A controller: `run` works until `shutdown` is cancelled and returns `Ok(())` then; an
/// error (or an early return) makes the host run it again after a backoff.
pub trait Controller: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Whether it starts only once the apiserver has been ready (most do); one that does
    /// not (the cluster agent: joins need the datastore and the CAs, not the API) starts
    /// with the daemon, also on a node that runs no Kubernetes components yet.
    fn needs_apiserver(&self) -> bool {
        true
    }
    fn run(
        self: Arc<Self>,
        ctx: Context,
        reporter: Reporter,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), ControllerError>>;
}

/// The kubeconfig the daemon's controllers use: the admin's on a control plane; on a
/// worker, which holds no admin credentials, its kubelet's.
pub fn kubeconfig_path(data: &DataDir, config: &NodeConfig) -> std::path::PathBuf {
    crate::node::rbac::node_kubeconfig(data, config)
}

/// A client for the apiserver named in the kubeconfig at `path`.
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, ControllerError> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
        ControllerError::Kubeconfig {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let options = kube::config::KubeConfigOptions::default();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(|source| ControllerError::Kubeconfig {
            path: path.to_path_buf(),
            source,
        })?;
    kube::Client::try_from(config).map_err(|source| ControllerError::Client {
        path: path.to_path_buf(),
        source,
    })
}

/// Sleeps for `delay` unless `shutdown` comes first; false when it did.
pub async fn pause(delay: std::time::Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_counts_transitions_to_ready() {
        let a = Apiserver::default();
        let a = a.observe(false);
        assert_eq!(a.epoch, 0);
        let a = a.observe(true);
        assert_eq!((a.ready, a.epoch), (true, 1));
        let a = a.observe(true);
        assert_eq!(a.epoch, 1, "staying ready is the same epoch");
        let a = a.observe(false).observe(true);
        assert_eq!((a.ready, a.epoch), (true, 2));
    }
}
