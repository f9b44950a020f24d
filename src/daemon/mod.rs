//! The daemon's composition root: builds the pieces of a node's daemon and adapts them to
//! one another. The supervisor runs the services; the embedded datastore runs inside it
//! as a builtin service; the controllers layer runs once the apiserver is ready, fed by
//! the apiserver's readiness (the local service's on a control plane, the cluster's
//! `/readyz` on a worker); `kdist status` shows the controllers as a section.
//!
//! Nothing else wires subsystems together: they offer `run`/`serve` with a shutdown
//! token and know nothing of who hosts them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{DataDir, NodeConfig, Role};
use crate::controllers::{self, Apiserver, Controller, Controllers};
use crate::supervisor::{
    self, Builtin, BuiltinFuture, Builtins, Daemon, ReportSections, SupervisorError,
};

/// How often a worker asks the cluster's apiserver whether it is ready.
const REMOTE_READY_INTERVAL: Duration = Duration::from_secs(5);

/// The embedded datastore as a builtin service of the supervisor.
struct EmbeddedDatastore(Arc<crate::datastore::Embedded>);

impl Builtin for EmbeddedDatastore {
    fn run(&self, shutdown: CancellationToken) -> BuiltinFuture {
        let datastore = self.0.clone();
        Box::pin(async move { Ok(datastore.serve(shutdown).await?) })
    }
}

/// The controllers' board as the status report's `controllers` section, the addons'
/// states as its `addons` section, the network controller's state as its `network`
/// section and, on a control plane, every node's release as its `nodes` section.
struct ControllerSection {
    board: controllers::Board,
    addons: controllers::AddonBoard,
    network: Option<Arc<controllers::Network>>,
    releases: Option<Arc<controllers::Releases>>,
}

impl ReportSections for ControllerSection {
    fn sections(&self) -> BTreeMap<String, serde_json::Value> {
        let value = serde_json::to_value(self.board.snapshot()).unwrap_or_default();
        let addons = serde_json::to_value(self.addons.snapshot()).unwrap_or_default();
        let mut sections = BTreeMap::from([
            ("controllers".to_string(), value),
            ("addons".to_string(), addons),
        ]);
        if let Some(network) = &self.network {
            let value = serde_json::to_value(network.status()).unwrap_or_default();
            sections.insert("network".to_string(), value);
        }
        if let Some(releases) = &self.releases {
            let nodes = releases.nodes();
            if !nodes.is_empty() {
                let value = serde_json::to_value(nodes).unwrap_or_default();
                sections.insert("nodes".to_string(), value);
            }
        }
        sections
    }
}

/// The controllers this node runs, in start order; `network` is the pod network's and
/// `releases` the one showing each node's EKS-D release (every role runs both),
/// `addons` where the addons controller publishes its addons' states.
pub fn controllers_for(
    config: &NodeConfig,
    network: Arc<controllers::Network>,
    releases: Arc<controllers::Releases>,
    addons: &controllers::AddonBoard,
) -> Vec<Arc<dyn Controller>> {
    let mut list: Vec<Arc<dyn Controller>> = Vec::new();
    if config.role != Role::Worker {
        list.push(Arc::new(controllers::Rbac));
        list.push(Arc::new(controllers::ClusterAgent));
        list.push(Arc::new(controllers::Addons::new(addons.clone())));
    }
    list.push(Arc::new(controllers::Storage));
    list.push(network);
    list.push(releases);
    list
}

/// Runs a node's daemon on the locked data dir until `shutdown`: services, controllers
/// and the control API on `listener`.
pub async fn run(
    data: DataDir,
    config: NodeConfig,
    listener: UnixListener,
    shutdown: CancellationToken,
) -> Result<(), SupervisorError> {
    let mut builtins = Builtins::new();
    builtins.insert(
        "datastore".to_string(),
        Arc::new(EmbeddedDatastore(Arc::new(
            crate::datastore::Embedded::new(data.clone()),
        ))),
    );
    let daemon = Daemon::prepare(data.clone(), &config)
        .await?
        .with_builtins(builtins);
    // most controllers talk to Kubernetes: a node without its components runs only
    // those that do not
    let runs_kubernetes = daemon
        .board()
        .snapshot()
        .iter()
        .any(|s| s.name == "kube-apiserver" || s.name == "kubelet");
    let network = Arc::new(controllers::Network::default());
    let releases = Arc::new(controllers::Releases::default());
    let addons = controllers::AddonBoard::new();
    let controllers = Controllers::new(
        controllers_for(&config, network.clone(), releases.clone(), &addons)
            .into_iter()
            .filter(|c| runs_kubernetes || !c.needs_apiserver())
            .collect(),
    );
    let daemon = daemon.with_sections(Arc::new(ControllerSection {
        board: controllers.board(),
        addons,
        network: runs_kubernetes.then_some(network),
        releases: (runs_kubernetes && config.role != Role::Worker).then_some(releases),
    }));

    let (apiserver_tx, apiserver_rx) = watch::channel(Apiserver::default());
    let controllers_stop = CancellationToken::new();
    let controllers_task = {
        let (data, config, stop) = (data.clone(), config.clone(), controllers_stop.clone());
        let board = daemon.board();
        tokio::spawn(async move {
            let path = controllers::kubeconfig_path(&data, &config);
            let client = match controllers::client_from_kubeconfig(&path).await {
                Ok(client) => client,
                Err(e) => {
                    warn!(
                        "controllers not started: {}",
                        crate::report::error_chain(&e)
                    );
                    return;
                }
            };
            let feed = if config.role == Role::Worker {
                tokio::spawn(feed_from_cluster(
                    client.clone(),
                    apiserver_tx,
                    stop.clone(),
                ))
            } else {
                tokio::spawn(feed_from_local_service(board, apiserver_tx))
            };
            let ctx = controllers::Context {
                client,
                kubeconfig: path,
                data,
                config,
                apiserver: apiserver_rx,
            };
            controllers.run(ctx, stop).await;
            feed.abort();
        })
    };

    // controllers stop before the services they talk to
    let services_stop = CancellationToken::new();
    let relay = {
        let (shutdown, controllers_stop, services_stop) = (
            shutdown.clone(),
            controllers_stop.clone(),
            services_stop.clone(),
        );
        let controllers_done = controllers_task;
        tokio::spawn(async move {
            shutdown.cancelled().await;
            controllers_stop.cancel();
            if let Err(e) = controllers_done.await {
                warn!("controllers task failed: {e}");
            }
            services_stop.cancel();
        })
    };
    // `POST /v1/shutdown` cancels the token the daemon was handed: relay it too
    let result = daemon
        .run_until(listener, shutdown.clone(), services_stop)
        .await;
    let _ = relay.await;
    result
}

/// The local kube-apiserver's readiness, from the supervisor's board.
async fn feed_from_local_service(board: supervisor::Board, tx: watch::Sender<Apiserver>) {
    let mut rx = board.subscribe();
    loop {
        let ready = rx
            .borrow_and_update()
            .get("kube-apiserver")
            .is_some_and(|s| s.ready);
        tx.send_if_modified(|a| {
            let next = a.observe(ready);
            let changed = next != *a;
            *a = next;
            changed
        });
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// A worker's view: the cluster's apiserver answers `/readyz` through its kubeconfig.
async fn feed_from_cluster(
    client: kube::Client,
    tx: watch::Sender<Apiserver>,
    stop: CancellationToken,
) {
    loop {
        let request = http::Request::get("/readyz").body(Vec::new());
        let ready = match request {
            Ok(request) => client.request_text(request).await.is_ok(),
            Err(_) => false,
        };
        tx.send_if_modified(|a| {
            let next = a.observe(ready);
            let changed = next != *a;
            *a = next;
            changed
        });
        if !controllers::pause(REMOTE_READY_INTERVAL, &stop).await {
            return;
        }
    }
}
