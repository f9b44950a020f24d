//! The built-in CNI network (`network.cni: builtin`): one conflist with a bridge
//! (host-local IPAM over this node's own pod CIDR, `Node.spec.podCIDR`, the gateway on
//! the bridge) and portmap for hostPorts. containerd's CRI brings up each pod's `lo`
//! itself with the `loopback` plugin from the same bin dir.
//!
//! The conflist is written by the network controller once kube-controller-manager has
//! given the node its CIDR; until then there is none and kubelet reports the network
//! not ready, as with any CNI. The bridge does not masquerade: pod traffic to other
//! nodes' pods keeps its source address, and what leaves the pod CIDR is masqueraded by
//! kdist's own rule ([`super::masquerade`]).

use std::path::{Path, PathBuf};

use serde_json::json;

use super::error::NodeError;
use crate::config::DataDir;
use crate::fsutil;

/// The network name, and the conflist file name containerd picks (first in sort order).
pub const NETWORK: &str = "kdist";
const FILE: &str = "10-kdist.conflist";

/// Plugins the node needs in the CNI bin dir.
pub const REQUIRED_PLUGINS: &[&str] = &["bridge", "host-local", "portmap", "loopback"];

/// Renders the conflist for this node's pod CIDR `subnet`, with the pods' interface MTU
/// `mtu`. `ipam_dir` keeps host-local's leases under the data dir.
pub fn render(bridge: &str, subnet: &str, mtu: u32, ipam_dir: &Path) -> String {
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                // masquerading here would rewrite pod-to-pod traffic across nodes
                "ipMasq": false,
                // a node that had another range moves its gateway address to the new one
                "forceAddress": true,
                "hairpinMode": true,
                "mtu": mtu,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": subnet }]],
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

/// The plugins missing from `bin_dir` (pods cannot start without them, containerd
/// itself can).
pub fn missing_plugins(bin_dir: &Path) -> Vec<String> {
    REQUIRED_PLUGINS
        .iter()
        .filter(|p| !bin_dir.join(p).is_file())
        .map(|p| p.to_string())
        .collect()
}

/// Removes kdist's conflist, at every start: the network controller writes it again
/// with the node's own pod CIDR (a node that ran with the whole cluster's range moves
/// to its own), and with `network.cni: none` the user's CNI owns the directory.
pub fn remove(data: &DataDir) -> Result<(), NodeError> {
    let dir = data.cni_conf_dir();
    fsutil::ensure_dir(&dir, 0o755).map_err(NodeError::io(&dir))?;
    let path = conflist_path(data);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NodeError::io(&path)(e)),
    }
}

/// Writes the conflist for this node's pod CIDR; true when it changed. Blocking.
pub fn write(data: &DataDir, bridge: &str, subnet: &str, mtu: u32) -> Result<bool, NodeError> {
    let dir = data.cni_conf_dir();
    fsutil::ensure_dir(&dir, 0o755).map_err(NodeError::io(&dir))?;
    let path = conflist_path(data);
    let text = render(bridge, subnet, mtu, &ipam_dir(data));
    if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    fsutil::atomic_write(&path, text.as_bytes(), 0o644).map_err(NodeError::io(&path))?;
    Ok(true)
}

/// The kube-controller-manager args file as kdist shipped it before nodes had their own
/// pod CIDRs, updated to allocate them; `None` when the file does not hold those lines
/// unedited (the user's file is then theirs to change).
pub fn migrate_controller_manager_args(text: &str) -> Option<String> {
    const OLD: &str = "--cluster-cidr=${POD_CIDR}\n\
        # host-local hands out the whole pod CIDR on this single node\n\
        --allocate-node-cidrs=false\n";
    const NEW: &str = "# each node gets its own pod CIDR (Node.spec.podCIDR), cut from \
        network.pod_cidr\n--allocate-node-cidrs=true\n--cluster-cidr=${POD_CIDR}\n\
        --node-cidr-mask-size=${NODE_CIDR_MASK}\n";
    text.contains(OLD).then(|| text.replace(OLD, NEW))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_has_bridge_ipam_and_portmap() {
        let text = render("kdist0", "10.1.3.0/24", 1450, Path::new("/d/cni/networks"));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["name"], "kdist");
        let plugins = v["plugins"].as_array().unwrap();
        assert_eq!(plugins[0]["type"], "bridge");
        assert_eq!(plugins[0]["bridge"], "kdist0");
        assert_eq!(plugins[0]["ipam"]["type"], "host-local");
        assert_eq!(plugins[0]["ipam"]["ranges"][0][0]["subnet"], "10.1.3.0/24");
        assert_eq!(plugins[0]["mtu"], 1450);
        assert_eq!(plugins[0]["ipMasq"], false);
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

    #[test]
    fn shipped_controller_manager_args_move_to_per_node_cidrs() {
        let old = "--service-cluster-ip-range=${SERVICE_CIDR}\n--cluster-cidr=${POD_CIDR}\n\
            # host-local hands out the whole pod CIDR on this single node\n\
            --allocate-node-cidrs=false\n--leader-elect=false\n";
        let new = migrate_controller_manager_args(old).unwrap();
        let shipped = include_str!("../../services/kube-controller-manager.args");
        for line in [
            "--allocate-node-cidrs=true",
            "--node-cidr-mask-size=${NODE_CIDR_MASK}",
            "--cluster-cidr=${POD_CIDR}",
            "--leader-elect=false",
        ] {
            assert!(new.lines().any(|l| l == line), "{line} missing: {new}");
            assert!(
                shipped.lines().any(|l| l == line) || line == "--leader-elect=false",
                "{line} not shipped"
            );
        }
        assert!(!new.contains("allocate-node-cidrs=false"));
        assert!(migrate_controller_manager_args(&new).is_none());
        assert!(migrate_controller_manager_args(shipped).is_none());
        // a user's own edit is theirs
        let edited = old.replace(
            "# host-local hands out the whole pod CIDR on this single node\n",
            "",
        );
        assert!(migrate_controller_manager_args(&edited).is_none());
    }
}
