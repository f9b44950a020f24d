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

/// Holds `<data>/cluster/nodes.lock` while the list is read, changed and written: joins
/// are served by parallel threads and `remove-node` runs in another process.
fn locked(data: &DataDir) -> Result<nix::fcntl::Flock<std::fs::File>, ClusterError> {
    let path = data.cluster_dir().join("nodes.lock");
    fsutil::ensure_dir(&data.cluster_dir(), 0o700)
        .and_then(|()| fsutil::lock_exclusive(&path))
        .map_err(|source| ClusterError::Io { path, source })
}

/// Records (or replaces: a node that left may join again) a joined node.
pub fn record(data: &DataDir, name: &str, role: Role, address: IpAddr) -> Result<(), ClusterError> {
    let _lock = locked(data)?;
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
    let _lock = locked(data)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_joins_and_removals_lose_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let address: IpAddr = [127, 0, 0, 1].into();
        record(&data, "gone", Role::Worker, address).unwrap();
        std::thread::scope(|s| {
            for i in 0..16 {
                let data = &data;
                s.spawn(move || {
                    record(data, &format!("w{i:02}"), Role::Worker, address).unwrap();
                });
            }
            s.spawn(|| assert!(forget(&data, "gone").unwrap()));
        });
        let mut names: Vec<String> = list(&data).unwrap().into_iter().map(|n| n.name).collect();
        names.sort();
        let expected: Vec<String> = (0..16).map(|i| format!("w{i:02}")).collect();
        assert_eq!(names, expected);
    }
}
