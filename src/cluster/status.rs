//! What `kdist status` shows about the cluster: this node's role, the nodes that joined
//! through it, and the etcd members with their health. Blocking (runs etcdctl).

use serde::Serialize;

use super::etcd::Etcdctl;
use super::nodes::{self, Joined, NodeRecord};
use crate::config::{DataDir, DatastoreKind, NodeConfig, Role};

#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    pub name: String,
    pub id: String,
    pub peer_url: String,
    pub learner: bool,
    pub healthy: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub role: Role,
    pub joined: Option<Joined>,
    pub nodes: Vec<NodeRecord>,
    pub members: Vec<MemberStatus>,
    /// Why members could not be listed, when they could not.
    pub members_error: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct Health {
    endpoint: String,
    health: bool,
}

/// The cluster view of this node, or `None` for a node that never clustered.
pub fn cluster_status(data: &DataDir, config: &NodeConfig) -> Option<ClusterStatus> {
    let joined = nodes::joined(data).ok().flatten();
    let recorded = nodes::list(data).unwrap_or_default();
    if joined.is_none() && recorded.is_empty() {
        return None;
    }
    let mut status = ClusterStatus {
        role: config.role,
        joined,
        nodes: recorded,
        members: Vec::new(),
        members_error: None,
    };
    if config.role == Role::Worker || config.datastore != DatastoreKind::Etcd {
        return Some(status);
    }
    let etcd = Etcdctl::new(data, config);
    match etcd.members() {
        Ok(members) => {
            let health: Vec<Health> = etcd
                .run(&["endpoint", "health", "--cluster", "-w", "json"])
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or_default();
            status.members = members
                .into_iter()
                .map(|m| MemberStatus {
                    healthy: m
                        .client_urls
                        .iter()
                        .any(|u| health.iter().any(|h| &h.endpoint == u && h.health)),
                    id: m.hex_id(),
                    peer_url: m.peer_urls.first().cloned().unwrap_or_default(),
                    learner: m.is_learner,
                    name: m.name,
                })
                .collect();
        }
        Err(e) => status.members_error = Some(e.to_string()),
    }
    Some(status)
}
