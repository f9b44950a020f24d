//! Facts about the host that decide how the node services are configured: cgroup
//! version and driver, whether this process may lower oom_score_adj, file limits,
//! kernel sysctls kubelet cares about, IPVS, and the node IP.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::config::NodeConfig;

/// One fact about the host that shaped the node's configuration, or a change kdist made
/// to it (e.g. `restrict_oom_score_adj = true`, `net.ipv4.ip_forward 0 -> 1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFact {
    pub name: String,
    pub value: String,
    /// Why, when it is not obvious.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// CAP_SYS_RESOURCE, the capability needed to lower oom_score_adj.
const CAP_SYS_RESOURCE: u32 = 24;

/// The kernel settings kubelet wants (`protectKernelDefaults` refuses to start when they
/// differ; without it kubelet rewrites them).
pub const KUBELET_SYSCTLS: &[(&str, &str)] = &[
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// What kdist learnt about the host at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub cgroup: CgroupVersion,
    /// systemd is PID 1: use the systemd cgroup driver.
    pub systemd: bool,
    /// This process's oom_score_adj.
    pub oom_score_adj: i32,
    /// Whether a child of this process can lower its oom_score_adj (CAP_SYS_RESOURCE).
    pub can_lower_oom_score_adj: bool,
    /// Hard RLIMIT_NOFILE.
    pub nofile_hard: u64,
    /// IPVS is loaded and `ipset` exists: kube-proxy could use ipvs mode.
    pub ipvs: bool,
    /// `bridge-nf-call-iptables` exists (br_netfilter loaded).
    pub br_netfilter: bool,
    /// Whether every kernel setting in [`KUBELET_SYSCTLS`] already has kubelet's value.
    pub kernel_defaults_match: bool,
    pub node_ip: IpAddr,
}

impl HostFacts {
    /// Probes this host. Spawns one short child (the oom_score_adj test).
    pub fn probe(config: &NodeConfig) -> Self {
        let oom_score_adj = super::proc::oom_score_adj().map_or(0, i32::from);
        Self {
            cgroup: if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
                CgroupVersion::V2
            } else {
                CgroupVersion::V1
            },
            systemd: Path::new("/run/systemd/system").is_dir(),
            oom_score_adj,
            can_lower_oom_score_adj: super::proc::has_capability(CAP_SYS_RESOURCE)
                && child_can_lower_oom(oom_score_adj),
            nofile_hard: nofile_hard(),
            ipvs: Path::new("/proc/net/ip_vs").exists() && super::cmd::which("ipset").is_some(),
            br_netfilter: Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists(),
            kernel_defaults_match: KUBELET_SYSCTLS
                .iter()
                .all(|(key, want)| read_sysctl(key).as_deref() == Some(*want)),
            node_ip: config.network.node_ip.unwrap_or_else(detect_node_ip),
        }
    }

    /// containerd must not try to lower a container's oom_score_adj below ours.
    pub fn restrict_oom_score_adj(&self) -> bool {
        !self.can_lower_oom_score_adj
    }

    pub fn cgroup_driver(&self) -> &'static str {
        if self.systemd { "systemd" } else { "cgroupfs" }
    }

    /// kubelet's own oomScoreAdj: its default -999, or the current value when it may not
    /// lower it (kubelet exits when it cannot apply the setting).
    pub fn kubelet_oom_score_adj(&self) -> i32 {
        if self.can_lower_oom_score_adj {
            -999
        } else {
            self.oom_score_adj.max(-999)
        }
    }

    /// kubelet's maxOpenFiles: its default 1000000 capped by the hard limit.
    pub fn kubelet_max_open_files(&self) -> u64 {
        self.nofile_hard.min(1_000_000)
    }

    /// The facts as `kdist status` shows them.
    pub fn report(&self) -> Vec<HostFact> {
        let fact = |name: &str, value: String, note: Option<&str>| HostFact {
            name: name.to_string(),
            value,
            note: note.map(str::to_string),
        };
        vec![
            fact(
                "cgroup",
                format!(
                    "{} ({} driver)",
                    match self.cgroup {
                        CgroupVersion::V1 => "v1",
                        CgroupVersion::V2 => "v2",
                    },
                    self.cgroup_driver()
                ),
                None,
            ),
            fact(
                "restrict_oom_score_adj",
                self.restrict_oom_score_adj().to_string(),
                self.restrict_oom_score_adj().then_some(
                    "no CAP_SYS_RESOURCE: containerd keeps containers at or above kdist's oom_score_adj",
                ),
            ),
            fact(
                "kubelet oomScoreAdj / maxOpenFiles",
                format!(
                    "{} / {}",
                    self.kubelet_oom_score_adj(),
                    self.kubelet_max_open_files()
                ),
                None,
            ),
            fact(
                "kube-proxy mode",
                "iptables".into(),
                (!self.ipvs).then_some("IPVS or ipset unavailable"),
            ),
            fact("node ip", self.node_ip.to_string(), None),
        ]
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Reads `/proc/sys/<key>` (key with slashes, e.g. `kernel/panic`).
pub fn read_sysctl(key: &str) -> Option<String> {
    read_trimmed(&format!("/proc/sys/{key}"))
}

/// Tries it for real in a child: the kernel also refuses a lower value when an earlier
/// privileged write raised the floor, which the capability set does not show.
fn child_can_lower_oom(current: i32) -> bool {
    let target = (current - 1).max(-1000);
    if target == current {
        return true;
    }
    Command::new("/bin/sh")
        .args(["-c", &format!("echo {target} > /proc/self/oom_score_adj")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn nofile_hard() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard)
        .unwrap_or(1024)
}

/// The address of the interface that holds the default route. Connecting a UDP socket
/// only looks up the route; it sends nothing.
pub fn detect_node_ip() -> IpAddr {
    let routed = UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|()| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified() && !ip.is_loopback());
    if let Some(ip) = routed {
        return ip;
    }
    // no default route: the first non-loopback IPv4 address that is up
    nix::ifaddrs::getifaddrs()
        .ok()
        .and_then(|addrs| {
            addrs
                .filter(|a| a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP))
                .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
                .find(|ip| !ip.is_loopback())
        })
        .map(IpAddr::V4)
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_agrees_with_the_capability_set() {
        let facts = HostFacts::probe(&NodeConfig::default());
        assert_eq!(
            facts.can_lower_oom_score_adj,
            super::super::proc::has_capability(CAP_SYS_RESOURCE),
            "on this kind of host the child test and CapEff agree"
        );
        assert!(facts.nofile_hard >= facts.kubelet_max_open_files());
        assert!(facts.kubelet_oom_score_adj() >= -999);
        if !facts.can_lower_oom_score_adj {
            assert_eq!(facts.kubelet_oom_score_adj(), facts.oom_score_adj.max(-999));
        }
        assert!(!facts.node_ip.is_unspecified());
    }
}
