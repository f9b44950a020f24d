//! What `kdist status` shows about the cluster: this node's role, the nodes that joined
//! through it, and the etcd members with their health. Blocking (asks etcd over gRPC).

use serde::Serialize;

use super::etcd::{EtcdClient, block_on};
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
    let etcd = EtcdClient::new(data, config);
    let members = block_on(async {
        let mut members = Vec::new();
        for m in etcd.members().await? {
            let mut healthy = false;
            for url in &m.client_urls {
                healthy = healthy || etcd.healthy(url).await;
            }
            members.push(MemberStatus {
                healthy,
                id: m.hex_id(),
                peer_url: m.peer_urls.first().cloned().unwrap_or_default(),
                learner: m.is_learner,
                name: m.name,
            });
        }
        Ok(members)
    });
    match members {
        Ok(members) => status.members = members,
        Err(e) => status.members_error = Some(e.to_string()),
    }
    Some(status)
}
