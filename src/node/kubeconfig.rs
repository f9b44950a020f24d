//! The admin kubeconfig as users get it from `kdist config`: the file the PKI wrote,
//! with the server pointed at this node's address (or left on 127.0.0.1).

use std::net::IpAddr;
use std::path::Path;

use super::error::NodeError;
use crate::config::DataDir;

/// Rewrites every cluster's `server` host to `host`, keeping scheme and port;
/// `origin` names the file in errors.
pub fn with_server_host(text: &str, host: IpAddr, origin: &Path) -> Result<String, NodeError> {
    let not_kubeconfig = |reason: &'static str| NodeError::BadKubeconfig {
        path: origin.to_path_buf(),
        reason,
    };
    let mut doc: serde_json::Value =
        crate::yaml::from_str(text).map_err(|source| NodeError::KubeconfigParse {
            path: origin.to_path_buf(),
            source,
        })?;
    let clusters = doc
        .get_mut("clusters")
        .and_then(|c| c.as_array_mut())
        .ok_or(not_kubeconfig("it has no clusters"))?;
    let host = match host {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    for cluster in clusters {
        let Some(server) = cluster.get_mut("cluster").and_then(|c| c.get_mut("server")) else {
            continue;
        };
        let Some(url) = server.as_str() else { continue };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or(not_kubeconfig("a cluster's server is not a URL"))?;
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        let port = authority
            .rsplit_once(':')
            .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
            .map(|(_, p)| format!(":{p}"))
            .unwrap_or_default();
        *server = serde_json::Value::String(format!("{scheme}://{host}{port}{path}"));
    }
    crate::yaml::to_string(&doc).map_err(|source| NodeError::KubeconfigWrite {
        path: origin.to_path_buf(),
        source,
    })
}

/// The admin kubeconfig, its server on `host` (None: as written, 127.0.0.1).
pub fn admin(data: &DataDir, host: Option<IpAddr>) -> Result<String, NodeError> {
    let path = super::rbac::admin_kubeconfig(data);
    let text = std::fs::read_to_string(&path).map_err(|source| NodeError::Io {
        path: path.clone(),
        source: std::io::Error::new(
            source.kind(),
            format!("{source}; run `kdist start` first to create the node's certificates"),
        ),
    })?;
    match host {
        None => Ok(text),
        Some(host) => with_server_host(&text, host, &path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = "apiVersion: v1\nkind: Config\nclusters:\n- name: kdist\n  cluster:\n    server: https://127.0.0.1:6443\n    certificate-authority-data: Zm9v\nusers: []\n";

    #[test]
    fn server_moves_to_the_host_and_keeps_the_port() {
        let origin = Path::new("/d/admin.conf");
        let out = with_server_host(CONF, "192.0.2.7".parse().unwrap(), origin).unwrap();
        assert!(out.contains("server: https://192.0.2.7:6443"), "{out}");
        assert!(out.contains("certificate-authority-data: Zm9v"));
        let out = with_server_host(CONF, "2001:db8::1".parse().unwrap(), origin).unwrap();
        assert!(out.contains("https://[2001:db8::1]:6443"), "{out}");
        let err = with_server_host("a: b", "192.0.2.7".parse().unwrap(), origin)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/d/admin.conf") && err.contains("no clusters"),
            "{err}"
        );
        let err = with_server_host("a: [", "192.0.2.7".parse().unwrap(), origin).unwrap_err();
        assert!(matches!(err, NodeError::KubeconfigParse { .. }), "{err}");
    }
}
