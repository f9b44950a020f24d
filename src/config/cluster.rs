//! The `cluster:` section of config.yaml and the node's role.

use serde::{Deserialize, Serialize};

/// What a node runs: a control plane (datastore, apiserver, ...) or a worker
/// (containerd, kubelet, kube-proxy only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    #[default]
    ControlPlane,
    Worker,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::ControlPlane => "control-plane",
            Role::Worker => "worker",
        })
    }
}

/// Settings of the cluster agent (joins).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// TCP port of the cluster agent (HTTPS, all interfaces).
    pub agent_port: u16,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self { agent_port: 25000 }
    }
}
