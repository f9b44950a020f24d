//! The record of nodes that joined through this node: `<data>/cluster/nodes.json`, and
//! on a joiner, `<data>/cluster/joined.json` (what it joined).

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::ClusterError;
use super::token::now_unix;
use crate::config::{DataDir, Role};
use crate::fsutil;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub role: Role,
    pub address: IpAddr,
    pub joined_at: u64,
}

/// What a joiner keeps about the cluster it joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    pub agent: String,
    pub role: Role,
    pub node_name: String,
    pub apiserver_endpoints: Vec<String>,
    pub joined_at: u64,
}

fn nodes_file(data: &DataDir) -> PathBuf {
    data.cluster_dir().join("nodes.json")
}

pub fn joined_file(data: &DataDir) -> PathBuf {
    data.cluster_dir().join("joined.json")
}

fn read_json<T: for<'de> Deserialize<'de> + Default>(
    path: &std::path::Path,
) -> Result<T, ClusterError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ClusterError::Store {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(ClusterError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write_json(path: &std::path::Path, value: &impl Serialize) -> Result<(), ClusterError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| ClusterError::Internal {
        reason: e.to_string(),
    })?;
    fsutil::atomic_write(path, &bytes, 0o600).map_err(|source| ClusterError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Nodes that joined through this node.
pub fn list(data: &DataDir) -> Result<Vec<NodeRecord>, ClusterError> {
    read_json(&nodes_file(data))
}

/// Records (or replaces: a node that left may join again) a joined node.
pub fn record(data: &DataDir, name: &str, role: Role, address: IpAddr) -> Result<(), ClusterError> {
    let mut nodes = list(data)?;
    nodes.retain(|n| n.name != name);
    nodes.push(NodeRecord {
        name: name.to_string(),
        role,
        address,
        joined_at: now_unix(),
    });
    write_json(&nodes_file(data), &nodes)
}

/// Forgets a node; false when it was not recorded.
pub fn forget(data: &DataDir, name: &str) -> Result<bool, ClusterError> {
    let mut nodes = list(data)?;
    let before = nodes.len();
    nodes.retain(|n| n.name != name);
    write_json(&nodes_file(data), &nodes)?;
    Ok(nodes.len() != before)
}

/// What this node joined, if it did.
pub fn joined(data: &DataDir) -> Result<Option<Joined>, ClusterError> {
    let path = joined_file(data);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ClusterError::Store {
                path,
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ClusterError::Io { path, source }),
    }
}

pub fn write_joined(data: &DataDir, joined: &Joined) -> Result<(), ClusterError> {
    write_json(&joined_file(data), joined)
}
