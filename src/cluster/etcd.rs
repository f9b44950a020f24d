//! This node's etcd cluster, through `etcdctl` with the apiserver's etcd client
//! certificate: members, learners, promotion, removal. Blocking.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::error::ClusterError;
use crate::config::{DataDir, NodeConfig};
use crate::fsutil;

/// How long a membership change is retried while etcd says it is not ready for one.
const ADD_RETRY: std::time::Duration = std::time::Duration::from_secs(45);

/// One member as `etcdctl member list -w json` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "peerURLs", default)]
    pub peer_urls: Vec<String>,
    #[serde(rename = "clientURLs", default)]
    pub client_urls: Vec<String>,
    #[serde(rename = "isLearner", default)]
    pub is_learner: bool,
}

impl Member {
    pub fn hex_id(&self) -> String {
        format!("{:x}", self.id)
    }
}

#[derive(Debug, Deserialize)]
struct MemberList {
    #[serde(default)]
    members: Vec<Member>,
}

/// What `kdist join` left for this node's first etcd start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitialCluster {
    pub initial_cluster: String,
    pub state: String,
}

fn initial_file(data: &DataDir) -> PathBuf {
    data.cluster_dir().join("etcd-initial.json")
}

/// `--initial-cluster` and `--initial-cluster-state` written by a control-plane join.
pub fn etcd_initial_cluster(data: &DataDir) -> Option<(String, String)> {
    let bytes = std::fs::read(initial_file(data)).ok()?;
    let initial: InitialCluster = serde_json::from_slice(&bytes).ok()?;
    Some((initial.initial_cluster, initial.state))
}

pub fn write_initial_cluster(data: &DataDir, initial: &InitialCluster) -> Result<(), ClusterError> {
    let path = initial_file(data);
    let bytes = serde_json::to_vec_pretty(initial).map_err(|e| ClusterError::Internal {
        reason: e.to_string(),
    })?;
    fsutil::atomic_write(&path, &bytes, 0o644).map_err(|source| ClusterError::Io { path, source })
}

pub fn remove_initial_cluster(data: &DataDir) {
    let _ = std::fs::remove_file(initial_file(data));
}

/// etcdctl against `endpoints` (this node's client URL when empty).
pub struct Etcdctl {
    binary: PathBuf,
    certs: PathBuf,
    endpoints: Vec<String>,
}

impl Etcdctl {
    pub fn new(data: &DataDir, config: &NodeConfig) -> Self {
        let binary = crate::supervisor::resolve_binary(data, "etcdctl")
            .map(|(p, _)| p)
            .unwrap_or_else(|_| PathBuf::from("etcdctl"));
        Self {
            binary,
            certs: data.certs_dir(),
            endpoints: vec![format!("https://127.0.0.1:{}", config.etcd.client_port)],
        }
    }

    pub fn with_endpoints(mut self, endpoints: Vec<String>) -> Self {
        self.endpoints = endpoints;
        self
    }

    pub fn run(&self, args: &[&str]) -> Result<String, ClusterError> {
        let out = Command::new(&self.binary)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints.join(",")))
            .arg(format!(
                "--cacert={}",
                self.certs.join("etcd/ca.crt").display()
            ))
            .arg(format!(
                "--cert={}",
                self.certs.join("apiserver-etcd-client.crt").display()
            ))
            .arg(format!(
                "--key={}",
                self.certs.join("apiserver-etcd-client.key").display()
            ))
            .arg("--dial-timeout=5s")
            .arg("--command-timeout=15s")
            .args(args)
            .output()
            .map_err(|source| ClusterError::Io {
                path: self.binary.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(ClusterError::Etcd {
                command: args.join(" "),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A membership change, retried while etcd refuses it for now: a cluster that just
    /// changed must have been healthy for a few seconds, and it takes one learner at a
    /// time.
    pub fn change(&self, args: &[&str]) -> Result<String, ClusterError> {
        let deadline = std::time::Instant::now() + ADD_RETRY;
        loop {
            match self.run(args) {
                Err(ClusterError::Etcd { message, .. })
                    if (message.contains("unhealthy cluster")
                        || message.contains("too many learner"))
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    pub fn members(&self) -> Result<Vec<Member>, ClusterError> {
        let text = self.run(&["member", "list", "-w", "json"])?;
        let list: MemberList = serde_json::from_str(&text).map_err(|e| ClusterError::Etcd {
            command: "member list".into(),
            message: format!("unreadable answer: {e}"),
        })?;
        Ok(list.members)
    }

    /// Adds `name` at `peer_url` as a learner; returns the `--initial-cluster` value the
    /// new member starts with.
    pub fn add_learner(&self, name: &str, peer_url: &str) -> Result<String, ClusterError> {
        let members = self.members()?;
        if let Some(stale) = members
            .iter()
            .find(|m| m.name == name || m.peer_urls.iter().any(|u| u == peer_url))
        {
            // a node that left uncleanly (or was reset) joins again under its name
            self.change(&["member", "remove", &stale.hex_id()])?;
        }
        let peer_flag = format!("--peer-urls={peer_url}");
        self.change(&["member", "add", name, &peer_flag, "--learner"])?;
        let mut parts: Vec<String> = self
            .members()?
            .into_iter()
            .filter(|m| m.name != name)
            .filter_map(|m| m.peer_urls.first().map(|u| format!("{}={u}", m.name)))
            .filter(|p| !p.starts_with('='))
            .collect();
        parts.push(format!("{name}={peer_url}"));
        Ok(parts.join(","))
    }

    /// Promotes every learner that has caught up; returns the names promoted.
    pub fn promote_learners(&self) -> Result<Vec<String>, ClusterError> {
        let mut promoted = Vec::new();
        for member in self.members()?.into_iter().filter(|m| m.is_learner) {
            // refused until the learner's log is close to the leader's: tried again later
            if self.run(&["member", "promote", &member.hex_id()]).is_ok() {
                promoted.push(member.name);
            }
        }
        Ok(promoted)
    }

    /// Makes this node's member advertise `node_ip` when it still advertises loopback
    /// (a single node created before it was clustered).
    pub fn advertise_node_ip(
        &self,
        own_name: &str,
        node_ip: IpAddr,
        peer_port: u16,
    ) -> Result<(), ClusterError> {
        if node_ip.is_loopback() {
            return Ok(());
        }
        for member in self.members()? {
            let loopback = member
                .peer_urls
                .iter()
                .all(|u| u.contains("127.0.0.1") || u.contains("localhost"));
            if member.name == own_name && loopback {
                let url = format!("https://{}", std::net::SocketAddr::new(node_ip, peer_port));
                self.run(&[
                    "member",
                    "update",
                    &member.hex_id(),
                    &format!("--peer-urls={url}"),
                ])?;
            }
        }
        Ok(())
    }
}
