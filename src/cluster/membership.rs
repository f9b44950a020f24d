//! Removing nodes: `kdist remove-node` (from a remaining control plane) and
//! `kdist leave` (on the node itself). Blocking.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::error::ClusterError;
use super::etcd::{EtcdClient, block_on, remove_initial_cluster};
use super::nodes;
use crate::config::{DataDir, DatastoreKind, NodeConfig, Role};

/// What a removal did, for the CLI to print.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removed {
    pub etcd_member: bool,
    pub kubernetes_node: Option<bool>,
    pub record: bool,
    pub notes: Vec<String>,
}

fn apiserver_up() -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], 6443)),
        Duration::from_secs(1),
    )
    .is_ok()
}

/// Deletes the Kubernetes Node `name` when this node's apiserver answers.
fn delete_kube_node(data: &DataDir, name: &str, removed: &mut Removed) {
    if !apiserver_up() {
        removed
            .notes
            .push("no apiserver on this node: Kubernetes Node object left alone".into());
        return;
    }
    let kubeconfig = data.kubeconfig_dir().join("admin.conf");
    let deleted = std::thread::scope(|scope| {
        // a runtime of its own: callers may be on a blocking thread of another runtime
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(delete_node_object(&kubeconfig, name))
            })
            .join()
            .unwrap_or_else(|_| Err("the deleting thread panicked".into()))
    });
    match deleted {
        Ok(()) => removed.kubernetes_node = Some(true),
        Err(reason) => removed
            .notes
            .push(format!("deleting Kubernetes Node {name} failed: {reason}")),
    }
}

/// Deletes Node `name` through the apiserver named in `kubeconfig`; a Node that is
/// already gone is fine. The reason, on failure, is for a note to the user.
async fn delete_node_object(kubeconfig: &std::path::Path, name: &str) -> Result<(), String> {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| format!("{}: {e}", kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| format!("{}: {e}", kubeconfig.display()))?;
    let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    let params = kube::api::DeleteParams::default();
    let request = nodes.delete(name, &params);
    match tokio::time::timeout(Duration::from_secs(20), request).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(kube::Error::Api(status))) if status.code == 404 => Ok(()),
        Ok(Err(e)) => Err(crate::report::error_chain(&e)),
        Err(_) => Err("the apiserver did not answer within 20 s".into()),
    }
}

/// Removes `name` from this node's cluster: its etcd member, its Kubernetes Node and
/// its record. Without `force` an etcd error stops it; `force` goes on (a node that is
/// gone for good).
pub fn remove_node(
    data: &DataDir,
    config: &NodeConfig,
    name: &str,
    force: bool,
) -> Result<Removed, ClusterError> {
    if config.role == Role::Worker {
        return Err(ClusterError::NotControlPlane);
    }
    if name == config.node_name() {
        return Err(ClusterError::Invalid {
            what: format!("remove-node {name}"),
            reason: "that is this node; run `kdist leave` on it instead".into(),
        });
    }
    let mut removed = Removed::default();
    if config.datastore == DatastoreKind::Etcd {
        let etcd = EtcdClient::new(data, config);
        match block_on(etcd.members()) {
            Ok(members) => match members.iter().find(|m| m.name == name) {
                Some(member) => {
                    block_on(etcd.remove(member.id))?;
                    removed.etcd_member = true;
                }
                None => removed.notes.push(format!("{name} is not an etcd member")),
            },
            Err(e) if force => removed.notes.push(format!("etcd not reachable: {e}")),
            Err(e) => return Err(e),
        }
    }
    delete_kube_node(data, name, &mut removed);
    removed.record = nodes::forget(data, name)?;
    if !removed.etcd_member && !removed.record && removed.kubernetes_node.is_none() && !force {
        return Err(ClusterError::Invalid {
            what: format!("remove-node {name}"),
            reason: "no such node: not an etcd member, not recorded, no apiserver to ask; \
                     check the name with `kdist status`, or use --force"
                .into(),
        });
    }
    Ok(removed)
}

/// Takes this node out of its cluster: removes its own etcd member through the other
/// members (while its etcd still runs). The caller stops the daemon, then calls
/// [`reset_to_single`].
pub fn leave_etcd(
    data: &DataDir,
    config: &NodeConfig,
    force: bool,
) -> Result<Vec<String>, ClusterError> {
    let mut notes = Vec::new();
    if config.role == Role::Worker || config.datastore != DatastoreKind::Etcd {
        return Ok(notes);
    }
    let own = config.node_name();
    // this node's etcd may already have stopped (a remove-node from another node):
    // ask the node it joined through as well
    let mut endpoints = vec![format!("https://127.0.0.1:{}", config.etcd.client_port)];
    if let Some(joined) = nodes::joined(data)?
        && let Ok(agent) = joined.agent.parse::<SocketAddr>()
    {
        endpoints.push(format!(
            "https://{}",
            SocketAddr::new(agent.ip(), config.etcd.client_port)
        ));
    }
    let local = EtcdClient::new(data, config).with_endpoints(endpoints);
    let members = match block_on(local.members()) {
        Ok(m) => m,
        Err(e) if force => {
            notes.push(format!("etcd not reachable, member not removed: {e}"));
            return Ok(notes);
        }
        Err(e) => return Err(e),
    };
    let others: Vec<String> = members
        .iter()
        .filter(|m| m.name != own && !m.is_learner)
        .filter_map(|m| m.client_urls.first().cloned())
        .collect();
    let Some(me) = members.iter().find(|m| m.name == own) else {
        notes.push("this node is no longer an etcd member".into());
        return Ok(notes);
    };
    if others.is_empty() {
        notes.push("this node is the only etcd member: nothing to leave".into());
        return Ok(notes);
    }
    block_on(
        EtcdClient::new(data, config)
            .with_endpoints(others)
            .remove(me.id),
    )?;
    notes.push(format!("removed etcd member {own}"));
    Ok(notes)
}

/// Resets a stopped node to a fresh single node: its certificates, kubeconfigs, etcd
/// member, etcd args and cluster records go; the next `kdist start` makes new ones.
pub fn reset_to_single(data: &DataDir) -> Result<(), ClusterError> {
    let remove = |path: std::path::PathBuf| -> Result<(), ClusterError> {
        let result = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ClusterError::Io { path, source }),
        }
    };
    remove(data.certs_dir())?;
    remove(data.kubeconfig_dir())?;
    remove(data.datastore_dir().join("etcd"))?;
    remove(data.args_file("etcd"))?;
    remove(nodes::joined_file(data))?;
    remove(data.cluster_dir().join("nodes.json"))?;
    remove(data.cluster_dir().join("tokens.json"))?;
    remove(data.cluster_dir().join("before-join"))?;
    remove_initial_cluster(data);
    let mut config = NodeConfig::load(data)?;
    config.role = Role::ControlPlane;
    Ok(config.save(data)?)
}
