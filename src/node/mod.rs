//! The node: containerd, CNI, the Kubernetes node and control-plane services' generated
//! configuration, host preparation (sysctls, mount propagation, the egress guard) and
//! the node commands (images import, kubeconfig, kubectl, inspect, reset).
//!
//! It owns `<data>/containerd`, `<data>/cni`, `<data>/node`, `<data>/kubelet`,
//! `<data>/images` and the host changes recorded in `<data>/node/host-state.json`. It
//! reads certificates and kubeconfigs by their kubeadm names but never creates them, and
//! it never spawns long-running processes: the supervisor runs the services.

mod cmd;
pub mod containerd;
mod error;
pub mod host;

pub use error::NodeError;
pub use host::HostFacts;

use crate::config::{DataDir, NodeConfig};
use crate::supervisor::HostFact;

/// What preparing the node found and did, for `kdist status`.
#[derive(Debug, Clone)]
pub struct NodeSetup {
    pub facts: HostFacts,
    pub report: Vec<HostFact>,
    pub notes: Vec<String>,
}

/// Prepares the host and writes the generated configuration, before any service starts.
/// Blocking (it runs a few short commands): call it off the async workers.
pub fn prepare(data: &DataDir, config: &NodeConfig) -> Result<NodeSetup, NodeError> {
    let facts = HostFacts::probe(config);
    let settings = containerd::ContainerdSettings::new(data, config, &facts);
    containerd::write(data, &settings)?;
    let report = facts.report();
    Ok(NodeSetup {
        facts,
        report,
        notes: Vec::new(),
    })
}
