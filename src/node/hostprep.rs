//! Host preparation: the kernel settings and mount propagation a node needs, each change
//! recorded in `<data>/node/host-state.json` with the value it replaced so that
//! `kdist reset` puts the host back as it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::NodeError;
use super::host::HostFact;
use super::host::{KUBELET_SYSCTLS, read_sysctl};
use crate::config::DataDir;
use crate::fsutil;

/// What kdist changed, and what was there before. Only the first recorded value of a
/// key counts: it is the host's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostState {
    /// sysctl key (slashes, e.g. `net/ipv4/ip_forward`) -> original value.
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    /// Mount point -> its original propagation (`private`).
    #[serde(default)]
    pub mounts: BTreeMap<String, String>,
    /// Host paths that did not exist before kdist first ran; kubelet, containerd and CNI
    /// create them, and `kdist reset` removes them (and only them).
    #[serde(default)]
    pub created: Vec<String>,
}

/// Host paths the node's services write outside the data dir.
pub const HOST_PATHS: &[&str] = &[
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/run/containerd",
    "/var/lib/cni",
];

pub fn state_path(data: &DataDir) -> PathBuf {
    data.node_dir().join("host-state.json")
}

impl HostState {
    pub fn load(data: &DataDir) -> Result<Self, NodeError> {
        let path = state_path(data);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| NodeError::Io {
                path,
                source: std::io::Error::other(e),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(NodeError::Io { path, source }),
        }
    }

    pub fn save(&self, data: &DataDir) -> Result<(), NodeError> {
        let path = state_path(data);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| NodeError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        fsutil::atomic_write(&path, &bytes, 0o644).map_err(NodeError::io(&path))
    }

    /// Remembers `key`'s current value if it was not recorded yet.
    fn remember_sysctl(&mut self, key: &str) {
        if self.sysctls.contains_key(key) {
            return;
        }
        if let Some(value) = read_sysctl(key) {
            self.sysctls.insert(key.to_string(), value);
        }
    }
}

/// What kube-proxy (iptables mode, localhost NodePorts on) sets itself: recorded so that
/// `kdist reset`, which removes the KUBE-* chains guarding it, puts the original back.
const KUBE_PROXY_SYSCTLS: &[&str] = &["net/ipv4/conf/all/route_localnet"];

/// The sysctls kdist sets: key, value, whether the node fails without it.
const NODE_SYSCTLS: &[(&str, &str, bool)] = &[
    ("net/ipv4/ip_forward", "1", true),
    ("net/bridge/bridge-nf-call-iptables", "1", false),
    ("net/bridge/bridge-nf-call-ip6tables", "1", false),
];

fn write_sysctl(key: &str, value: &str) -> Result<(), NodeError> {
    let path = Path::new("/proc/sys").join(key);
    std::fs::write(&path, value).map_err(NodeError::io(&path))
}

/// Propagation of the mount at `target` in this mount namespace: `shared`, `slave`
/// or `private` (the last entry for a mount point is the visible one).
pub fn propagation(target: &str) -> Option<String> {
    super::proc::mounts()
        .into_iter()
        .rev()
        .find(|m| m.point == Path::new(target))
        .map(|m| m.propagation.to_string())
}

fn set_propagation(target: &str, flag: nix::mount::MsFlags) -> Result<(), NodeError> {
    nix::mount::mount(None::<&str>, target, None::<&str>, flag, None::<&str>).map_err(|e| {
        NodeError::Io {
            path: PathBuf::from(target),
            source: std::io::Error::from(e),
        }
    })
}

/// Applies the node's host settings, recording originals first. `record_kubelet`
/// also records the settings kubelet rewrites (`protectKernelDefaults: false`).
pub fn prepare(data: &DataDir, record_kubelet: bool) -> Result<Vec<HostFact>, NodeError> {
    let mut state = HostState::load(data)?;
    let mut facts = Vec::new();
    for (key, want, required) in NODE_SYSCTLS {
        let Some(current) = read_sysctl(key) else {
            if *required {
                return Err(NodeError::Io {
                    path: Path::new("/proc/sys").join(key),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            }
            continue;
        };
        if current != *want {
            state.remember_sysctl(key);
            state.save(data)?;
            write_sysctl(key, want)?;
        }
        facts.push(HostFact {
            name: key.replace('/', "."),
            value: want.to_string(),
            note: state
                .sysctls
                .get(*key)
                .filter(|orig| orig.as_str() != *want)
                .map(|orig| format!("was {orig}; `kdist reset` restores it")),
        });
    }
    if record_kubelet {
        let kubelet = KUBELET_SYSCTLS.iter().map(|(key, _)| *key);
        for key in kubelet.chain(KUBE_PROXY_SYSCTLS.iter().copied()) {
            state.remember_sysctl(key);
        }
    }
    for path in HOST_PATHS {
        if !Path::new(path).exists() && !state.created.iter().any(|p| p == path) {
            state.created.push(path.to_string());
        }
    }
    if let Some(kind) = propagation("/")
        && kind == "private"
    {
        state.mounts.entry("/".into()).or_insert(kind);
        state.save(data)?;
        set_propagation("/", nix::mount::MsFlags::MS_SHARED)?;
    }
    if let Some(orig) = state.mounts.get("/") {
        facts.push(HostFact {
            name: "mount propagation of /".into(),
            value: "shared".into(),
            note: Some(format!("was {orig}; `kdist reset` restores it")),
        });
    }
    state.save(data)?;
    Ok(facts)
}

/// Who uses something below `dir`, if anyone: a listening unix socket there (a
/// containerd's or kubelet's API), or a process whose working directory or open file is
/// there. kdist's own services are stopped before this is asked.
fn in_use_below(dir: &Path) -> Option<String> {
    super::proc::user_below(dir)
}

/// Puts back every recorded setting, removes the host paths the node created, and
/// forgets the record. Returns what was done. Mounts below those paths must be gone.
pub fn restore(data: &DataDir) -> Result<Vec<String>, NodeError> {
    let state = HostState::load(data)?;
    let mut done = Vec::new();
    for (key, value) in &state.sysctls {
        if read_sysctl(key).as_deref() != Some(value) {
            write_sysctl(key, value)?;
            done.push(format!("{} = {value}", key.replace('/', ".")));
        }
    }
    for (target, kind) in &state.mounts {
        if kind == "private" && propagation(target).as_deref() != Some("private") {
            set_propagation(target, nix::mount::MsFlags::MS_PRIVATE)?;
            done.push(format!("mount {target} private"));
        }
    }
    for created in &state.created {
        let path = Path::new(created);
        if !path.exists() {
            continue;
        }
        // absent when the node first started is not proof it is ours now: /run is
        // emptied at boot, and a host containerd or kubelet may have started since
        if let Some(user) = in_use_below(path) {
            done.push(format!("kept {created}: {user} uses it"));
            continue;
        }
        std::fs::remove_dir_all(path).map_err(NodeError::io(path))?;
        done.push(format!("removed {created}"));
    }
    let path = state_path(data);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(NodeError::Io { path, source }),
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_a_propagation() {
        let kind = propagation("/").unwrap();
        assert!(["shared", "slave", "private"].contains(&kind.as_str()));
        assert_eq!(propagation("/no/such/mount"), None);
    }

    #[test]
    fn first_recorded_value_wins() {
        let mut state = HostState::default();
        state
            .sysctls
            .insert("net/ipv4/ip_forward".into(), "orig".into());
        state.remember_sysctl("net/ipv4/ip_forward");
        assert_eq!(state.sysctls["net/ipv4/ip_forward"], "orig");
        state.remember_sysctl("kernel/panic");
        assert!(state.sysctls.contains_key("kernel/panic"));
    }
}
