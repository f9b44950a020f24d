//! The join API's messages and the connection string `<host>:<port>/<token>/<ca-sha256>`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::error::ClusterError;
use super::token;
use crate::config::Role;

/// `POST /v1/join`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub token: String,
    pub node_name: String,
    pub role: Role,
    /// PEM CSRs of keys the joiner generated; only their public keys are used.
    pub kubelet_client_csr: String,
    pub kube_proxy_csr: String,
    pub kubelet_serving_csr: String,
    /// The joiner's etcd peer port (control-plane joins).
    #[serde(default)]
    pub etcd_peer_port: Option<u16>,
}

impl JoinRequest {
    pub fn validate(&self) -> Result<(), ClusterError> {
        token::check_format(&self.token)?;
        check_node_name(&self.node_name)
    }
}

/// A node name must be a lowercase DNS name: it becomes `system:node:<name>` and a SAN.
pub fn check_node_name(name: &str) -> Result<(), ClusterError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if !ok {
        return Err(ClusterError::BadRequest {
            reason: format!(
                "node name `{}` is not a lowercase DNS name (a-z, 0-9, '-', '.')",
                name.chars().take(80).collect::<String>()
            ),
        });
    }
    Ok(())
}

/// What a worker receives: certificates signed for its keys, never a CA key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinResponse {
    pub role: Role,
    pub ca_crt: String,
    pub kubelet_client_crt: String,
    pub kube_proxy_crt: String,
    pub kubelet_serving_crt: String,
    /// `https://<ip>:6443` of the control plane(s).
    pub apiserver_endpoints: Vec<String>,
    pub cluster_domain: String,
    pub cluster_dns: String,
    pub pod_cidr: String,
    pub service_cidr: String,
    /// What a control plane needs beyond a worker; absent for workers.
    #[serde(default)]
    pub control_plane: Option<ControlPlaneMaterial>,
}

/// `POST /v1/renew`, sent over mutual TLS with the node's current kubelet client
/// certificate (`system:node:<name>`, signed by the cluster CA): new certificates for
/// the node's kube-proxy and kubelet serving keys, for the CSRs it sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub node_name: String,
    #[serde(default)]
    pub kube_proxy_csr: Option<String>,
    #[serde(default)]
    pub kubelet_serving_csr: Option<String>,
}

/// The certificates signed for a [`RenewRequest`], for the CSRs it held.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewResponse {
    #[serde(default)]
    pub kube_proxy_crt: Option<String>,
    #[serde(default)]
    pub kubelet_serving_crt: Option<String>,
}

/// The cluster's CAs (certificate and key), the service-account key pair and how to
/// join etcd. The joiner issues its own serving and client certificates from them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlPlaneMaterial {
    /// Path under `certs/` -> PEM (`ca.crt`, `ca.key`, `etcd/ca.key`, `sa.pub`, ...).
    pub files: std::collections::BTreeMap<String, String>,
    /// `--initial-cluster` for the joiner's first etcd start (state `existing`).
    pub etcd_initial_cluster: String,
}

/// The files under `certs/` a control-plane joiner receives.
pub const CONTROL_PLANE_FILES: &[&str] = &[
    "ca.crt",
    "ca.key",
    "front-proxy-ca.crt",
    "front-proxy-ca.key",
    "etcd/ca.crt",
    "etcd/ca.key",
    "sa.key",
    "sa.pub",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// A parsed connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub address: SocketAddr,
    pub token: String,
    pub ca_sha256: String,
}

impl Connection {
    pub fn parse(text: &str) -> Result<Self, ClusterError> {
        let bad = |reason: &str| ClusterError::ConnectionString {
            // never echo the token back into logs or terminals in full
            text: redact(text),
            reason: reason.to_string(),
        };
        let mut parts = text.trim().split('/');
        let (Some(host), Some(token), Some(fp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("it needs three parts separated by `/`"));
        };
        let address: SocketAddr = host
            .parse()
            .map_err(|_| bad(&format!("`{host}` is not an <ip>:<port> address")))?;
        token::check_format(token).map_err(|e| bad(&e.to_string()))?;
        if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(
                "the CA fingerprint must be 64 hex digits (the full SHA-256)",
            ));
        }
        Ok(Self {
            address,
            token: token.to_string(),
            ca_sha256: fp.to_ascii_lowercase(),
        })
    }

    pub fn render(address: SocketAddr, token: &str, ca_sha256: &str) -> String {
        format!("{address}/{token}/{ca_sha256}")
    }
}

fn redact(text: &str) -> String {
    let parts: Vec<&str> = text.split('/').collect();
    match parts.as_slice() {
        [host, _token, rest @ ..] => {
            let mut out = format!("{host}/<token>");
            for p in rest {
                out.push('/');
                out.push_str(p);
            }
            out
        }
        _ => text.chars().take(40).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_round_trip_and_bad_ones_are_explained() {
        let token = "ab".repeat(32);
        let fp = "cd".repeat(32);
        let text = Connection::render("10.0.0.1:25000".parse().unwrap(), &token, &fp);
        let conn = Connection::parse(&text).unwrap();
        assert_eq!(conn.token, token);
        assert_eq!(conn.ca_sha256, fp);
        let err = Connection::parse(&format!("10.0.0.1:25000/{token}/abc"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("64 hex") && !err.contains(&token), "{err}");
        let err = Connection::parse("host/x").unwrap_err().to_string();
        assert!(err.contains("three parts"), "{err}");
    }
}
