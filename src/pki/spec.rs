//! What kdist issues: the three CAs, every leaf with its identity, usages, names and the
//! services that read it (kubeadm's names and identities), and the kubeconfigs.

use std::collections::BTreeSet;
use std::net::IpAddr;

/// One of kdist's certificate authorities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CaId {
    Cluster,
    FrontProxy,
    Etcd,
}

pub struct CaSpec {
    pub id: CaId,
    /// Name on the command line and file stem under `certs/`.
    pub name: &'static str,
    pub common_name: &'static str,
    /// Services that trust this CA (restarted when it changes).
    pub services: &'static [&'static str],
}

pub const CAS: &[CaSpec] = &[
    CaSpec {
        id: CaId::Cluster,
        name: "ca",
        common_name: "kubernetes",
        services: &[
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubelet",
            "kube-proxy",
        ],
    },
    CaSpec {
        id: CaId::FrontProxy,
        name: "front-proxy-ca",
        common_name: "front-proxy-ca",
        services: &["kube-apiserver", "kube-controller-manager"],
    },
    CaSpec {
        id: CaId::Etcd,
        name: "etcd/ca",
        common_name: "etcd-ca",
        services: &["etcd", "kube-apiserver"],
    },
];

pub fn ca(id: CaId) -> &'static CaSpec {
    // CAS lists every CaId exactly once
    CAS.iter().find(|c| c.id == id).unwrap_or(&CAS[0])
}

/// The common name of a leaf; some carry the node name.
#[derive(Debug, Clone, Copy)]
pub enum Cn {
    Fixed(&'static str),
    Node,
    /// `system:node:<node>`
    NodeUser,
}

/// Which subject alternative names a leaf carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sans {
    None,
    Apiserver,
    /// etcd server and peer: localhost, the host's names and addresses.
    Host,
}

pub struct LeafSpec {
    /// Name on the command line and file stem under `certs/`.
    pub name: &'static str,
    pub ca: CaId,
    pub cn: Cn,
    pub org: Option<&'static str>,
    pub server: bool,
    pub client: bool,
    pub sans: Sans,
    /// Services that read it, restarted after it is re-issued.
    pub services: &'static [&'static str],
    /// The kubeconfig embedding it, under `kubeconfig/`.
    pub kubeconfig: Option<&'static str>,
}

pub const LEAVES: &[LeafSpec] = &[
    LeafSpec {
        name: "apiserver",
        ca: CaId::Cluster,
        cn: Cn::Fixed("kube-apiserver"),
        org: None,
        server: true,
        client: false,
        sans: Sans::Apiserver,
        services: &["kube-apiserver"],
        kubeconfig: None,
    },
    LeafSpec {
        name: "apiserver-kubelet-client",
        ca: CaId::Cluster,
        cn: Cn::Fixed("kube-apiserver-kubelet-client"),
        org: Some("system:masters"),
        server: false,
        client: true,
        sans: Sans::None,
        services: &["kube-apiserver"],
        kubeconfig: None,
    },
    LeafSpec {
        name: "apiserver-etcd-client",
        ca: CaId::Etcd,
        cn: Cn::Fixed("kube-apiserver-etcd-client"),
        org: None,
        server: false,
        client: true,
        sans: Sans::None,
        services: &["kube-apiserver"],
        kubeconfig: None,
    },
    LeafSpec {
        name: "front-proxy-client",
        ca: CaId::FrontProxy,
        cn: Cn::Fixed("front-proxy-client"),
        org: None,
        server: false,
        client: true,
        sans: Sans::None,
        services: &["kube-apiserver"],
        kubeconfig: None,
    },
    LeafSpec {
        name: "etcd/server",
        ca: CaId::Etcd,
        cn: Cn::Node,
        org: None,
        server: true,
        client: true,
        sans: Sans::Host,
        services: &["etcd"],
        kubeconfig: None,
    },
    LeafSpec {
        name: "etcd/peer",
        ca: CaId::Etcd,
        cn: Cn::Node,
        org: None,
        server: true,
        client: true,
        sans: Sans::Host,
        services: &["etcd"],
        kubeconfig: None,
    },
    LeafSpec {
        name: "etcd/healthcheck-client",
        ca: CaId::Etcd,
        cn: Cn::Fixed("kube-etcd-healthcheck-client"),
        org: None,
        server: false,
        client: true,
        sans: Sans::None,
        // read by kdist's own probe, which reloads it when a handshake fails
        services: &[],
        kubeconfig: None,
    },
    LeafSpec {
        name: "kubelet",
        ca: CaId::Cluster,
        cn: Cn::Node,
        org: None,
        server: true,
        client: false,
        sans: Sans::Host,
        services: &["kubelet"],
        kubeconfig: None,
    },
    LeafSpec {
        name: "kubelet-client",
        ca: CaId::Cluster,
        cn: Cn::NodeUser,
        org: Some("system:nodes"),
        server: false,
        client: true,
        sans: Sans::None,
        services: &["kubelet"],
        kubeconfig: Some("kubelet.conf"),
    },
    LeafSpec {
        name: "controller-manager",
        ca: CaId::Cluster,
        cn: Cn::Fixed("system:kube-controller-manager"),
        org: None,
        server: false,
        client: true,
        sans: Sans::None,
        services: &["kube-controller-manager"],
        kubeconfig: Some("controller-manager.conf"),
    },
    LeafSpec {
        name: "scheduler",
        ca: CaId::Cluster,
        cn: Cn::Fixed("system:kube-scheduler"),
        org: None,
        server: false,
        client: true,
        sans: Sans::None,
        services: &["kube-scheduler"],
        kubeconfig: Some("scheduler.conf"),
    },
    LeafSpec {
        name: "kube-proxy",
        ca: CaId::Cluster,
        cn: Cn::Fixed("system:kube-proxy"),
        org: None,
        server: false,
        client: true,
        sans: Sans::None,
        services: &["kube-proxy"],
        kubeconfig: Some("kube-proxy.conf"),
    },
    LeafSpec {
        name: "admin",
        ca: CaId::Cluster,
        cn: Cn::Fixed("kubernetes-admin"),
        org: Some("system:masters"),
        server: false,
        client: true,
        sans: Sans::None,
        services: &[],
        kubeconfig: Some("admin.conf"),
    },
];

/// The leaf the embedded datastore's TLS listeners present (etcd's serving cert).
pub const DATASTORE_SERVING_LEAF: &str = "etcd/server";

pub fn leaf(name: &str) -> Option<&'static LeafSpec> {
    LEAVES.iter().find(|l| l.name == name)
}

/// The order in which services are restarted after a renewal: dependencies first, so
/// each comes back against peers that already hold their new certificates.
pub const RESTART_ORDER: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
];

/// Names and addresses of this host, as they go into serving certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNames {
    pub node_name: String,
    pub hostname: String,
    /// Every non-loopback, non-link-local address of the host.
    pub addresses: Vec<IpAddr>,
}

impl HostNames {
    pub fn discover(node_name: String) -> Self {
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .map(|h| h.to_lowercase())
            .unwrap_or_else(|| node_name.clone());
        Self {
            node_name,
            hostname,
            addresses: host_addresses(),
        }
    }
}

fn host_addresses() -> Vec<IpAddr> {
    let mut found = BTreeSet::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    for ifaddr in addrs {
        let Some(address) = ifaddr.address else {
            continue;
        };
        let ip = if let Some(v4) = address.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if usable(&ip) {
            found.insert(ip);
        }
    }
    found.into_iter().collect()
}

/// Loopback is added explicitly; link-local addresses are meaningless off their link.
fn usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified() && !v4.is_link_local(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

/// A subject alternative name, ordered for stable comparison.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum San {
    Dns(String),
    Ip(IpAddr),
}

impl std::fmt::Display for San {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            San::Dns(name) => write!(f, "DNS:{name}"),
            San::Ip(ip) => write!(f, "IP:{ip}"),
        }
    }
}

impl San {
    pub fn parse(text: &str) -> Self {
        match text.parse::<IpAddr>() {
            Ok(ip) => San::Ip(ip),
            Err(_) => San::Dns(text.to_lowercase()),
        }
    }
}

/// The SANs a leaf must carry.
pub fn sans_for(
    kind: Sans,
    host: &HostNames,
    (service_ip, cluster_domain): (IpAddr, &str),
    extra: &[String],
) -> BTreeSet<San> {
    let mut sans = BTreeSet::new();
    let loopback: IpAddr = [127, 0, 0, 1].into();
    match kind {
        Sans::None => return sans,
        Sans::Apiserver => {
            for name in ["kubernetes", "kubernetes.default", "kubernetes.default.svc"] {
                sans.insert(San::Dns(name.to_string()));
            }
            sans.insert(San::Dns(format!("kubernetes.default.svc.{cluster_domain}")));
            sans.insert(San::Ip(service_ip));
            for name in extra {
                sans.insert(San::parse(name));
            }
        }
        Sans::Host => {
            sans.insert(San::Dns("localhost".to_string()));
            sans.insert(San::Ip(std::net::Ipv6Addr::LOCALHOST.into()));
        }
    }
    sans.insert(San::Dns(host.hostname.clone()));
    sans.insert(San::Dns(host.node_name.clone()));
    sans.insert(San::Ip(loopback));
    for ip in &host.addresses {
        sans.insert(San::Ip(*ip));
    }
    sans
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostNames {
        HostNames {
            node_name: "node-1".into(),
            hostname: "box".into(),
            addresses: vec!["192.168.1.10".parse().unwrap()],
        }
    }

    #[test]
    fn apiserver_sans_follow_the_issue() {
        let sans = sans_for(
            Sans::Apiserver,
            &host(),
            ("10.152.183.1".parse().unwrap(), "lab.internal"),
            &["api.example.com".into(), "10.9.9.9".into()],
        );
        let text: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        for want in [
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.lab.internal",
            "DNS:box",
            "DNS:node-1",
            "DNS:api.example.com",
            "IP:127.0.0.1",
            "IP:192.168.1.10",
            "IP:10.152.183.1",
            "IP:10.9.9.9",
        ] {
            assert!(text.iter().any(|t| t == want), "{want} missing in {text:?}");
        }
        assert!(
            !text.iter().any(|t| t.ends_with(".cluster.local")),
            "{text:?}"
        );
    }

    #[test]
    fn client_certs_have_no_sans() {
        let service = ([10, 0, 0, 1].into(), "cluster.local");
        assert!(sans_for(Sans::None, &host(), service, &[]).is_empty());
    }

    #[test]
    fn link_local_and_loopback_are_skipped() {
        assert!(!usable(&"127.0.0.1".parse().unwrap()));
        assert!(!usable(&"fe80::1".parse().unwrap()));
        assert!(!usable(&"169.254.1.1".parse().unwrap()));
        assert!(usable(&"10.1.2.3".parse().unwrap()));
        assert!(usable(&"2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn every_service_of_a_leaf_has_a_restart_slot() {
        for leaf in LEAVES {
            for service in leaf.services {
                assert!(RESTART_ORDER.contains(service), "{service}");
            }
        }
        for ca in CAS {
            for service in ca.services {
                assert!(RESTART_ORDER.contains(service), "{service}");
            }
        }
    }
}
