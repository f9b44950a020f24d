//! Clustering: join tokens (`kdist add-node`), the cluster agent that serves joins over
//! HTTPS inside the daemon, and the joiner (`kdist join`).
//!
//! It owns `<data>/cluster/` (hashed tokens, node records, the agent's certificate).
//! It signs joiners' CSRs with the cluster CA but never writes this node's own
//! certificates (that is `pki`), and never starts processes (that is the supervisor).

mod agent;
mod error;
mod etcd;
mod join;
mod membership;
mod nodes;
mod protocol;
mod sign;
mod status;
mod tls;
mod token;

pub use agent::{Agent, MAX_FAILURES, WINDOW};

/// Whether this node's daemon should run the cluster agent: it has join tokens, nodes
/// joined through it, or it joined a cluster itself.
pub fn agent_wanted(data: &crate::config::DataDir) -> bool {
    let dir = data.cluster_dir();
    ["tokens.json", "nodes.json", "joined.json"]
        .iter()
        .any(|f| dir.join(f).exists())
}
pub use error::ClusterError;
pub use etcd::{EtcdClient, Member, block_on, etcd_initial_cluster};
pub use join::{join, post};
pub use membership::{Removed, leave_etcd, remove_node, reset_to_single};
pub use nodes::{Joined, NodeRecord, forget, joined, list as list_nodes};
pub use protocol::{Connection, JoinRequest, JoinResponse};
pub use status::{ClusterStatus, MemberStatus, cluster_status};
pub use tls::{cluster_ca, host_addresses};
pub use token::{TokenRecord, TokenStore, parse_ttl};
