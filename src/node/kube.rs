//! The Kubernetes services of a node: finding their binaries and versions, the table of
//! what differs between Kubernetes minors, and the generated KubeletConfiguration and
//! KubeProxyConfiguration. Everything that turns inputs into text is a pure function.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::{Value, json};

use super::error::NodeError;
use super::host::{CgroupVersion, HostFacts};
use crate::components::resolve_binary;
use crate::config::{DataDir, NodeConfig, Role, Service};
use crate::fsutil;

/// The Kubernetes services, in start order; each runs the binary of the same name.
pub const SERVICES: &[Service] = &[
    Service::KubeApiserver,
    Service::KubeControllerManager,
    Service::KubeScheduler,
    Service::Kubelet,
    Service::KubeProxy,
];

/// The Kubernetes minors kdist knows how to configure.
pub const MIN_MINOR: u32 = 28;
pub const MAX_MINOR: u32 = 36;

/// A version as printed by `--version`: `Kubernetes v1.28.7-eks-1-28-19`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    /// The full version string, e.g. `v1.28.7-eks-1-28-19`.
    pub full: String,
}

impl KubeVersion {
    pub fn parse(output: &str) -> Option<Self> {
        let full = output
            .split_whitespace()
            .find(|w| w.starts_with('v') && w[1..].starts_with(|c: char| c.is_ascii_digit()))?;
        let core = full[1..].split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
        Some(Self {
            major: parts.next()??,
            minor: parts.next()??,
            patch: parts.next().flatten().unwrap_or(0),
            full: full.to_string(),
        })
    }
}

/// One thing that differs between Kubernetes minors: an args line (starting with `-`)
/// or a generated config field, applying from `since` to `until` inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub service: &'static str,
    pub item: &'static str,
    pub since: u32,
    pub until: Option<u32>,
    pub why: &'static str,
}

/// What differs across the supported minors.
pub const RULES: &[Rule] = &[
    Rule {
        service: "kubelet",
        item: "--pod-infra-container-image=${SANDBOX_IMAGE}",
        since: MIN_MINOR,
        until: Some(34),
        why: "keeps image GC off the sandbox image with containerd 1.x; the flag is gone in 1.35",
    },
    Rule {
        service: "kubelet",
        item: "failCgroupV1",
        since: 31,
        until: None,
        why: "on cgroup v1 hosts: the field exists from 1.31; from 1.35 kubelet refuses cgroup v1 without `failCgroupV1: false`",
    },
];

impl Rule {
    pub fn applies(&self, minor: u32) -> bool {
        minor >= self.since && self.until.is_none_or(|u| minor <= u)
    }

    /// The condition prefix of an args line, e.g. `[1.28-1.34]`.
    pub fn condition(&self) -> String {
        match self.until {
            Some(until) => format!("[1.{}-1.{until}]", self.since),
            None => format!("[1.{}+]", self.since),
        }
    }
}

fn rule(service: &str, item: &str) -> Option<&'static Rule> {
    RULES
        .iter()
        .find(|r| r.service == service && r.item == item)
}

/// The default args file of a Kubernetes service: the embedded text, then the
/// version-conditional lines of [`RULES`].
pub fn default_args(service: &str, embedded: &str) -> String {
    let mut text = embedded.to_string();
    let lines: Vec<&Rule> = RULES
        .iter()
        .filter(|r| r.service == service && r.item.starts_with('-'))
        .collect();
    if !lines.is_empty() {
        text.push_str(
            "# Lines starting with [1.A-1.B] or [1.A+] apply only to those Kubernetes minors.\n",
        );
        for r in lines {
            text.push_str(&format!("# {}\n{} {}\n", r.why, r.condition(), r.item));
        }
    }
    text
}

/// The result of looking for the Kubernetes binaries.
#[derive(Debug, Clone, Default)]
pub struct Detection {
    /// service -> (program, version)
    pub found: BTreeMap<String, (PathBuf, KubeVersion)>,
    pub missing: Vec<String>,
}

impl Detection {
    /// The rule kdist applies: the Kubernetes services run as a set, only when every
    /// one of their binaries resolves (components dir, then PATH).
    pub fn complete(&self) -> bool {
        self.missing.is_empty() && !self.found.is_empty()
    }

    pub fn minor(&self, service: &str) -> Option<u32> {
        self.found.get(service).map(|(_, v)| v.minor)
    }
}

type VersionCache = BTreeMap<PathBuf, (Option<SystemTime>, KubeVersion)>;
static VERSIONS: Mutex<VersionCache> = Mutex::new(BTreeMap::new());

/// Runs `program --version` (cached by path and mtime) and checks the supported range.
pub fn binary_version(program: &Path) -> Result<KubeVersion, NodeError> {
    let mtime = std::fs::metadata(program).and_then(|m| m.modified()).ok();
    if let Ok(cache) = VERSIONS.lock()
        && let Some((when, version)) = cache.get(program)
        && *when == mtime
    {
        return Ok(version.clone());
    }
    let output = super::cmd::run(program, &["--version"])?;
    let version = KubeVersion::parse(&output).ok_or_else(|| NodeError::Version {
        program: program.to_path_buf(),
        output: output.trim().to_string(),
    })?;
    if version.major != 1 || !(MIN_MINOR..=MAX_MINOR).contains(&version.minor) {
        return Err(NodeError::UnsupportedVersion {
            program: program.to_path_buf(),
            version: version.full,
            min: MIN_MINOR,
            max: MAX_MINOR,
        });
    }
    if let Ok(mut cache) = VERSIONS.lock() {
        cache.insert(program.to_path_buf(), (mtime, version.clone()));
    }
    Ok(version)
}

/// The Kubernetes services a node of `role` runs: a worker's control plane is elsewhere,
/// so it needs only the kubelet and kube-proxy binaries.
pub fn services_for(role: Role) -> &'static [Service] {
    match role {
        Role::Worker => &SERVICES[3..],
        Role::ControlPlane => SERVICES,
    }
}

/// Resolves the Kubernetes binaries a node of `role` runs and reads their versions.
/// Blocking.
pub fn detect(data: &DataDir, role: Role) -> Result<Detection, NodeError> {
    let mut detection = Detection::default();
    for service in services_for(role) {
        match resolve_binary(data, service.as_str()) {
            Ok((program, _)) => {
                let version = binary_version(&program)?;
                detection
                    .found
                    .insert(service.to_string(), (program, version));
            }
            Err(_) => detection.missing.push(service.to_string()),
        }
    }
    Ok(detection)
}

/// What the generated node configuration depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInputs {
    pub certs: PathBuf,
    pub kubeconfigs: PathBuf,
    pub containerd_socket: PathBuf,
    pub node_name: String,
    pub pod_cidr: String,
    pub cluster_dns: String,
    pub cluster_domain: String,
    pub resolv_conf: PathBuf,
    /// kubelet's cgroupRoot; `None` keeps kubelet's default.
    pub cgroup_root: Option<String>,
    pub facts: HostFacts,
}

impl NodeInputs {
    pub fn new(data: &DataDir, config: &NodeConfig, facts: &HostFacts) -> Self {
        // with systemd-resolved, /etc/resolv.conf points at a loopback stub pods cannot use
        let resolved = Path::new("/run/systemd/resolve/resolv.conf");
        Self {
            certs: data.certs_dir(),
            kubeconfigs: data.kubeconfig_dir(),
            containerd_socket: data.containerd_socket(),
            node_name: config.node_name(),
            pod_cidr: config.network.pod_cidr.clone(),
            cluster_dns: config.network.cluster_dns.to_string(),
            cluster_domain: config.network.cluster_domain.clone(),
            resolv_conf: if resolved.exists() {
                resolved.to_path_buf()
            } else {
                PathBuf::from("/etc/resolv.conf")
            },
            cgroup_root: config.runtime.cgroup_root.clone(),
            facts: facts.clone(),
        }
    }
}

fn path(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

fn yaml(header: &str, value: &Value) -> String {
    // a json! value always serializes
    let body = crate::yaml::to_string(value).unwrap_or_default();
    format!("{header}{body}")
}

const HEADER: &str = "# Generated by kdist at every start from config.yaml, the host and the binary's version;\n\
     # edits are lost. Override fields with flags in <data>/args/<service> instead.\n";

/// The KubeletConfiguration for kubelet minor `minor`.
pub fn kubelet_config(inputs: &NodeInputs, minor: u32) -> String {
    let facts = &inputs.facts;
    let mut config = json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "authentication": {
            "anonymous": { "enabled": false },
            "webhook": { "enabled": true, "cacheTTL": "2m0s" },
            "x509": { "clientCAFile": path(&inputs.certs.join("ca.crt")) },
        },
        "authorization": {
            "mode": "Webhook",
            "webhook": { "cacheAuthorizedTTL": "5m0s", "cacheUnauthorizedTTL": "30s" },
        },
        "tlsCertFile": path(&inputs.certs.join("kubelet.crt")),
        "tlsPrivateKeyFile": path(&inputs.certs.join("kubelet.key")),
        "rotateCertificates": false,
        "serverTLSBootstrap": false,
        "cgroupDriver": facts.cgroup_driver(),
        "containerRuntimeEndpoint": format!("unix://{}", inputs.containerd_socket.display()),
        "clusterDNS": [inputs.cluster_dns],
        "clusterDomain": inputs.cluster_domain,
        "resolvConf": path(&inputs.resolv_conf),
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        // kubelet exits when it cannot set its own oom_score_adj or open-files limit
        "oomScoreAdj": facts.kubelet_oom_score_adj(),
        "maxOpenFiles": facts.kubelet_max_open_files(),
        // true is fatal wherever kernel.panic & co differ from kubelet's wishes; kdist
        // lets kubelet set them and records the originals for `kdist reset`
        "protectKernelDefaults": false,
        "failSwapOn": false,
        "serializeImagePulls": false,
        // absolute floors, as MicroK8s sets them: kubelet's percentage defaults (10 % /
        // 15 % free) taint a node on any large, well-filled disk and make kubelet delete
        // images imported for air-gapped use
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1Gi",
            "imagefs.available": "1Gi",
        },
    });
    if let Some(root) = &inputs.cgroup_root
        && let Some(map) = config.as_object_mut()
    {
        map.insert("cgroupRoot".into(), Value::String(root.clone()));
    }
    if facts.cgroup == CgroupVersion::V1
        && rule("kubelet", "failCgroupV1").is_some_and(|r| r.applies(minor))
        && let Some(map) = config.as_object_mut()
    {
        map.insert("failCgroupV1".into(), Value::Bool(false));
    }
    yaml(HEADER, &config)
}

/// The KubeProxyConfiguration (iptables mode: IPVS needs modules and `ipset` that
/// many hosts lack, and a single node gains nothing from it).
pub fn kube_proxy_config(inputs: &NodeInputs, _minor: u32) -> String {
    let config = json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {
            "kubeconfig": path(&inputs.kubeconfigs.join("kube-proxy.conf")),
        },
        "hostnameOverride": inputs.node_name,
        "mode": "iptables",
        "clusterCIDR": inputs.pod_cidr,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        // 0 leaves the host's conntrack sysctls as they are
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    });
    yaml(HEADER, &config)
}

pub fn kubelet_config_path(data: &DataDir) -> PathBuf {
    data.node_dir().join("kubelet.yaml")
}

pub fn kube_proxy_config_path(data: &DataDir) -> PathBuf {
    data.node_dir().join("kube-proxy.yaml")
}

/// Writes the generated kubelet and kube-proxy configs for the detected versions.
pub fn write_configs(
    data: &DataDir,
    inputs: &NodeInputs,
    detection: &Detection,
) -> Result<(), NodeError> {
    let dir = data.kubelet_dir();
    fsutil::ensure_dir(&dir, 0o700).map_err(NodeError::io(&dir))?;
    if let Some(minor) = detection.minor("kubelet") {
        let path = kubelet_config_path(data);
        fsutil::atomic_write(&path, kubelet_config(inputs, minor).as_bytes(), 0o644)
            .map_err(NodeError::io(&path))?;
    }
    if let Some(minor) = detection.minor("kube-proxy") {
        let path = kube_proxy_config_path(data);
        fsutil::atomic_write(&path, kube_proxy_config(inputs, minor).as_bytes(), 0o644)
            .map_err(NodeError::io(&path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_upstream_and_eks_forms() {
        let v = KubeVersion::parse("Kubernetes v1.28.7\n").unwrap();
        assert_eq!((v.major, v.minor, v.patch), (1, 28, 7));
        let v = KubeVersion::parse("Kubernetes v1.31.2-eks-1-31-9").unwrap();
        assert_eq!((v.minor, v.patch), (31, 2));
        assert_eq!(v.full, "v1.31.2-eks-1-31-9");
        assert!(KubeVersion::parse("etcd Version: 3.4.23").is_none());
    }

    #[test]
    fn table_ranges() {
        let infra = rule("kubelet", "--pod-infra-container-image=${SANDBOX_IMAGE}").unwrap();
        assert!(infra.applies(28) && infra.applies(34));
        assert!(!infra.applies(35) && !infra.applies(36));
        assert_eq!(infra.condition(), "[1.28-1.34]");
        let cg = rule("kubelet", "failCgroupV1").unwrap();
        assert!(!cg.applies(30) && cg.applies(31) && cg.applies(36));
        assert_eq!(cg.condition(), "[1.31+]");
        for r in RULES {
            assert!(r.since >= MIN_MINOR && r.until.is_none_or(|u| u <= MAX_MINOR));
            assert!(SERVICES.iter().any(|s| *s == r.service));
        }
    }

    #[test]
    fn a_worker_needs_only_the_node_binaries() {
        assert_eq!(
            services_for(Role::Worker),
            [Service::Kubelet, Service::KubeProxy]
        );
        assert_eq!(services_for(Role::ControlPlane), SERVICES);
    }

    #[test]
    fn cgroup_root_is_set_only_when_configured() {
        let data = DataDir::new("/tmp/kdist-kube-cgroup-root");
        let mut config = NodeConfig::default();
        config.network.node_ip = Some("192.0.2.10".parse().unwrap());
        let facts = HostFacts::probe(&config);
        let parse = |config: &NodeConfig| -> Value {
            let inputs = NodeInputs::new(&data, config, &facts);
            serde_saphyr::from_str(&kubelet_config(&inputs, 28)).unwrap()
        };
        assert!(parse(&config).get("cgroupRoot").is_none());
        config.runtime.cgroup_root = Some("/kdist-w1".into());
        assert_eq!(parse(&config)["cgroupRoot"], "/kdist-w1");
    }

    #[test]
    fn unsupported_or_garbage_versions_are_refused() {
        let dir = std::env::temp_dir().join(format!("kdist-ver-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, out, want) in [
            ("old", "Kubernetes v1.25.3", "outside the range"),
            ("junk", "hello", "cannot tell"),
        ] {
            let script = dir.join(name);
            std::fs::write(&script, format!("#!/bin/sh\necho '{out}'\n")).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
            let err = binary_version(&script).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
