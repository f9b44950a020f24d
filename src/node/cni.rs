//! The single-node CNI network: one conflist with a bridge (host-local IPAM over the pod
//! CIDR, gateway and masquerade on the bridge) and portmap for hostPorts. containerd's
//! CRI brings up each pod's `lo` itself with the `loopback` plugin from the same bin dir.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::error::NodeError;
use crate::config::{DataDir, NodeConfig};
use crate::fsutil;

/// The network name, and the conflist file name containerd picks (first in sort order).
pub const NETWORK: &str = "kdist";
const FILE: &str = "10-kdist.conflist";

/// Plugins the node needs in the CNI bin dir.
pub const REQUIRED_PLUGINS: &[&str] = &["bridge", "host-local", "portmap", "loopback"];

/// Renders the conflist. `ipam_dir` keeps host-local's leases under the data dir.
pub fn render(bridge: &str, pod_cidr: &str, ipam_dir: &Path) -> String {
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": pod_cidr }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": ipam_dir.display().to_string(),
                }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    });
    // serde_json cannot fail on a json! value
    serde_json::to_string_pretty(&conf).unwrap_or_default() + "\n"
}

pub fn conflist_path(data: &DataDir) -> PathBuf {
    data.cni_conf_dir().join(FILE)
}

/// host-local's lease directory.
pub fn ipam_dir(data: &DataDir) -> PathBuf {
    data.root().join("cni").join("networks")
}

/// Writes the conflist; returns the plugins missing from `bin_dir` (pods cannot start
/// without them, containerd itself can).
pub fn write(
    data: &DataDir,
    config: &NodeConfig,
    bin_dir: &Path,
) -> Result<Vec<String>, NodeError> {
    let dir = data.cni_conf_dir();
    fsutil::ensure_dir(&dir, 0o755).map_err(NodeError::io(&dir))?;
    let path = conflist_path(data);
    let text = render(
        &config.network.bridge,
        &config.network.pod_cidr,
        &ipam_dir(data),
    );
    fsutil::atomic_write(&path, text.as_bytes(), 0o644).map_err(NodeError::io(&path))?;
    Ok(REQUIRED_PLUGINS
        .iter()
        .filter(|p| !bin_dir.join(p).is_file())
        .map(|p| p.to_string())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_has_bridge_ipam_and_portmap() {
        let text = render("kdist0", "10.1.0.0/16", Path::new("/d/cni/networks"));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["name"], "kdist");
        let plugins = v["plugins"].as_array().unwrap();
        assert_eq!(plugins[0]["type"], "bridge");
        assert_eq!(plugins[0]["bridge"], "kdist0");
        assert_eq!(plugins[0]["ipam"]["type"], "host-local");
        assert_eq!(plugins[0]["ipam"]["ranges"][0][0]["subnet"], "10.1.0.0/16");
        assert_eq!(plugins[0]["ipam"]["dataDir"], "/d/cni/networks");
        assert_eq!(plugins[1]["type"], "portmap");
        assert_eq!(plugins[1]["capabilities"]["portMappings"], true);
    }

    #[test]
    fn this_hosts_plugins_validate_the_conflist() {
        // the Debian plugins accept what we render (CNI_COMMAND=VERSION checks the binary)
        let bin = Path::new("/usr/lib/cni");
        if !bin.join("bridge").is_file() {
            return;
        }
        for plugin in REQUIRED_PLUGINS {
            let out = std::process::Command::new(bin.join(plugin))
                .env("CNI_COMMAND", "VERSION")
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let supported = v["supportedVersions"].as_array().unwrap();
            assert!(
                supported.iter().any(|s| s == "1.0.0"),
                "{plugin} does not speak CNI 1.0.0"
            );
        }
    }
}
