//! The data directory layout and this node's settings (`config.yaml`).
//!
//! Owns where every file of kdist lives and how `config.yaml` is parsed and validated.
//! It must not start processes or touch anything outside the data directory.

pub mod addons;
mod certs;
mod cluster;
mod components;
mod embedded;
mod error;
mod registries;
mod services;
mod storage;

pub use addons::{AddonsConfig, DnsAddon, MetricsAddon, Toggle};
pub use certs::{CertsConfig, KeyAlgorithm, Lifetime, is_valid_san};
pub use cluster::{ClusterConfig, Role};
pub use components::{
    ComponentsConfig, DEFAULT_BASE_URL, DEFAULT_CHANNEL, ReleasePin, check_channel,
};
pub use embedded::{EmbeddedConfig, ListenAddr};
pub use error::{ConfigError, ValueError};
pub use registries::{
    EKS_REGISTRY, Endpoint, HostConfig, Mirror, RegistriesConfig, RegistryAuth, RegistryTls,
    Scheme, is_host,
};
pub use services::{MemoryConfig, Service, ServiceSettings, known_services};
pub use storage::StorageConfig;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;

/// Default data directory, as a snap or package would use it.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/kdist";

/// Environment variable put on every supervised child; its value is the data directory.
/// A process is only ever signalled by kdist when it carries this marker for our data dir.
pub const MARKER_ENV: &str = "KDIST_SUPERVISED";

/// The layout of one node's data directory. Every path kdist uses is derived here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Takes `root` made absolute against the current directory and with its symlinks,
    /// `.` and `..` resolved as far as it exists: children, a detached daemon, the
    /// process marker and the egress chain's id see one spelling of one directory.
    pub fn new(root: impl AsRef<Path>) -> Self {
        let root = root.as_ref();
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|cwd| cwd.join(root))
                .unwrap_or_else(|_| root.to_path_buf())
        };
        Self {
            root: resolved(&root),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn config_file(&self) -> PathBuf {
        self.root.join("config.yaml")
    }
    pub fn args_dir(&self) -> PathBuf {
        self.root.join("args")
    }
    pub fn args_file(&self, service: &str) -> PathBuf {
        self.args_dir().join(service)
    }
    pub fn certs_dir(&self) -> PathBuf {
        self.root.join("certs")
    }
    pub fn kubeconfig_dir(&self) -> PathBuf {
        self.root.join("kubeconfig")
    }
    pub fn datastore_dir(&self) -> PathBuf {
        self.root.join("datastore")
    }
    pub fn components_dir(&self) -> PathBuf {
        self.root.join("components")
    }
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn log_file(&self, service: &str) -> PathBuf {
        self.logs_dir().join(format!("{service}.log"))
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn pidfile(&self, service: &str) -> PathBuf {
        self.run_dir().join(format!("{service}.pid"))
    }
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir().join("kdist.sock")
    }
    pub fn datastore_socket(&self) -> PathBuf {
        self.run_dir().join("datastore.sock")
    }
    pub fn cluster_dir(&self) -> PathBuf {
        self.root.join("cluster")
    }
    /// containerd's root (`root/`), state (`state/`), generated `config.toml`, `conf.d/`.
    pub fn containerd_dir(&self) -> PathBuf {
        self.root.join("containerd")
    }
    /// containerd's gRPC socket, kubelet's container runtime endpoint.
    pub fn containerd_socket(&self) -> PathBuf {
        self.run_dir().join("containerd.sock")
    }
    /// CNI network configuration read by containerd.
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.root.join("cni").join("net.d")
    }
    /// Image archives dropped here are imported into containerd at start (air gap).
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }
    /// Generated node configuration (kubelet, kube-proxy) and the record of host changes.
    pub fn node_dir(&self) -> PathBuf {
        self.root.join("node")
    }
    /// kubelet's `--root-dir`.
    pub fn kubelet_dir(&self) -> PathBuf {
        self.root.join("kubelet")
    }

    /// Creates the directory tree with its modes: private parts 0700, the rest 0755.
    pub fn ensure(&self) -> Result<(), ConfigError> {
        let dirs = [
            (self.root.clone(), 0o755),
            (self.args_dir(), 0o755),
            (self.certs_dir(), 0o700),
            (self.kubeconfig_dir(), 0o700),
            (self.datastore_dir(), 0o700),
            (self.components_dir(), 0o755),
            (self.logs_dir(), 0o755),
            (self.run_dir(), 0o700),
            (self.cluster_dir(), 0o700),
            (self.images_dir(), 0o755),
            (self.node_dir(), 0o755),
        ];
        for (dir, mode) in dirs {
            fsutil::ensure_dir(&dir, mode).map_err(|source| ConfigError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Which datastore backs the apiserver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DatastoreKind {
    /// A real etcd child process.
    Etcd,
    /// kdist's in-process etcd v3 API over SQLite on `<data>/run/datastore.sock`.
    #[default]
    Embedded,
}

impl DatastoreKind {
    /// The name config.yaml and the CLI use (`datastore: etcd|embedded`).
    pub fn as_str(self) -> &'static str {
        match self {
            DatastoreKind::Etcd => "etcd",
            DatastoreKind::Embedded => "embedded",
        }
    }

    /// Parses `as_str`'s names.
    pub fn parse(text: &str) -> Option<DatastoreKind> {
        use clap::ValueEnum;
        Self::value_variants()
            .iter()
            .copied()
            .find(|kind| kind.as_str() == text)
    }

    /// The service that runs a datastore of this kind (`embedded` is served in-process
    /// by the daemon, as a builtin).
    pub fn service(self) -> Service {
        match self {
            DatastoreKind::Etcd => Service::Etcd,
            DatastoreKind::Embedded => Service::Datastore,
        }
    }

    /// The name of [`DatastoreKind::service`].
    pub fn service_name(self) -> &'static str {
        self.service().as_str()
    }
}

/// What forwarded pod and service traffic may leave the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// No restriction (a normal cluster).
    #[default]
    All,
    /// Traffic from the pod and service CIDRs leaves only through the CNI bridge and
    /// `lo`: isolated labs, and tests on machines whose default route leads away.
    None,
}

/// How pods reach pods on other nodes (`network.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// host-gw when every peer is on a directly attached subnet, vxlan otherwise.
    #[default]
    Auto,
    /// A route to each peer's pod CIDR via the peer's node IP (one L2 segment).
    HostGw,
    /// A VXLAN device; each peer's pod CIDR through it (any IP connectivity).
    Vxlan,
}

/// Who provides the pod network (`network.cni`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Cni {
    /// kdist's bridge CNI config and routes between nodes.
    #[default]
    Builtin,
    /// No CNI config and no routes: the user installs Calico, Cilium, flannel, ...
    None,
}

/// Pod and service networking of this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// The address other nodes and the apiserver use for this node; detected when unset.
    pub node_ip: Option<IpAddr>,
    pub pod_cidr: String,
    pub service_cidr: String,
    /// The cluster DNS service IP given to pods; inside `service_cidr`.
    pub cluster_dns: IpAddr,
    pub cluster_domain: String,
    /// The CNI bridge interface.
    pub bridge: String,
    pub egress: Egress,
    /// The prefix length of each node's pod CIDR, cut from `pod_cidr` by
    /// kube-controller-manager (`--node-cidr-mask-size`).
    pub node_cidr_mask: u8,
    pub cni: Cni,
    pub backend: Backend,
    /// VXLAN network identifier of the vxlan backend.
    pub vxlan_vni: u32,
    /// UDP port of the vxlan backend.
    pub vxlan_port: u16,
}

impl NetworkConfig {
    /// The first address of `service_cidr`: the `kubernetes` Service's IP, which the
    /// apiserver certificate must name.
    pub fn kubernetes_service_ip(&self) -> Result<std::net::Ipv4Addr, ValueError> {
        let net = parse_cidr(&self.service_cidr)?;
        Ok((u32::from(net.network()) + 1).into())
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            node_ip: None,
            pod_cidr: "10.1.0.0/16".into(),
            service_cidr: "10.152.183.0/24".into(),
            cluster_dns: IpAddr::from([10, 152, 183, 10]),
            cluster_domain: "cluster.local".into(),
            bridge: "kdist0".into(),
            egress: Egress::All,
            node_cidr_mask: 24,
            cni: Cni::Builtin,
            backend: Backend::Auto,
            vxlan_vni: 1,
            vxlan_port: 8472,
        }
    }
}

/// The sandbox image when neither config.yaml nor the active release names one.
pub const DEFAULT_SANDBOX_IMAGE: &str = "public.ecr.aws/eks-distro/kubernetes/pause:3.9";

/// Container runtime settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// The pod sandbox ("pause") image; left at the default, the active release's
    /// `pause-image` is used. Import it with `kdist images import` on air-gapped hosts.
    pub sandbox_image: String,
    /// The cgroup under which kubelet puts its pods (kubelet's `cgroupRoot`, e.g.
    /// `/kdist-w1`); unset, kubelet's default `/`. Give each node its own when several
    /// nodes share one host: a kubelet removes pod cgroups under its root that are not
    /// its own pods'. kdist creates it at start and removes it at stop.
    pub cgroup_root: Option<String>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            sandbox_image: DEFAULT_SANDBOX_IMAGE.into(),
            cgroup_root: None,
        }
    }
}

/// Settings of the etcd child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    pub client_port: u16,
    pub peer_port: u16,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            client_port: 2379,
            peer_port: 2380,
        }
    }
}

/// This node's settings, `<data>/config.yaml`. Every field has a default, so an empty
/// file (or none) is a valid single-node configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Node name; defaults to the host name.
    pub node_name: Option<String>,
    /// control-plane (default) or worker; `kdist join --worker` sets it.
    pub role: Role,
    pub datastore: DatastoreKind,
    /// TCP listeners of the embedded datastore (`datastore: embedded`).
    pub embedded: EmbeddedConfig,
    pub etcd: EtcdConfig,
    pub certs: CertsConfig,
    pub components: ComponentsConfig,
    pub network: NetworkConfig,
    pub runtime: RuntimeConfig,
    /// Services this node does not run (as k0s' `--disable-components`), e.g. a
    /// datastore-and-runtime-only box: `disable: [kube-proxy]`.
    pub disable: Vec<String>,
    pub cluster: ClusterConfig,
    /// Per-service environment and extra flags, by service name:
    /// `services: {kube-apiserver: {env: {GOMEMLIMIT: 300MiB}, args: [--v=2]}}`.
    pub services: BTreeMap<String, ServiceSettings>,
    pub memory: MemoryConfig,
    /// Node-local volumes (the `kdist-local` StorageClasses).
    pub storage: StorageConfig,
    /// Registry mirrors, credentials and TLS for containerd (k3s' `registries.yaml`).
    pub registries: RegistriesConfig,
    /// Cluster addons this node seeds as enabled (`kdist addons enable|disable`).
    pub addons: AddonsConfig,
}

impl NodeConfig {
    /// Parses YAML text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let config: Self = crate::yaml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_path_buf(),
            source,
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Reads `<data>/config.yaml`, or the defaults when it does not exist.
    pub fn load(data: &DataDir) -> Result<Self, ConfigError> {
        let path = data.config_file();
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// Writes these settings as `<data>/config.yaml` (comments in the file are lost).
    pub fn save(&self, data: &DataDir) -> Result<(), ConfigError> {
        let path = data.config_file();
        let yaml = match crate::yaml::to_string(self) {
            Ok(yaml) => yaml,
            Err(source) => return Err(ConfigError::Serialize { path, source }),
        };
        fsutil::atomic_write(&path, yaml.as_bytes(), 0o644)
            .map_err(|source| ConfigError::Write { path, source })
    }

    /// Validates a user-supplied file and installs it as `<data>/config.yaml`.
    pub fn seed(data: &DataDir, from: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(from).map_err(|source| ConfigError::Read {
            path: from.to_path_buf(),
            source,
        })?;
        let config = Self::parse(&text, from)?;
        let path = data.config_file();
        fsutil::atomic_write(&path, text.as_bytes(), config.registries.file_mode())
            .map_err(|source| ConfigError::Write { path, source })?;
        Ok(config)
    }

    /// Switches `<data>/config.yaml` to `kind` in one atomic write, keeping the rest of
    /// the file (comments included) as it is.
    pub fn set_datastore(data: &DataDir, kind: DatastoreKind) -> Result<Self, ConfigError> {
        let path = data.config_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let line = format!("datastore: {}", kind.as_str());
        let mut replaced = false;
        let mut lines: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with("datastore:") {
                    replaced = true;
                    line.clone()
                } else {
                    l.to_string()
                }
            })
            .collect();
        if !replaced {
            lines.push(line);
        }
        let new = lines.join("\n") + "\n";
        let config = Self::parse(&new, &path)?;
        if config.datastore != kind {
            return Err(ConfigError::Invalid {
                path,
                field: "datastore".into(),
                reason: "could not be switched: edit the file by hand".into(),
            });
        }
        fsutil::atomic_write(&path, new.as_bytes(), config.registries.file_mode())
            .map_err(|source| ConfigError::Write { path, source })?;
        Ok(config)
    }

    fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: &str| ConfigError::Invalid {
            path: origin.to_path_buf(),
            field: field.to_string(),
            reason: reason.to_string(),
        };
        if let Some(reason) = self.storage.problem() {
            return Err(invalid("storage.dir", reason));
        }
        if self.etcd.client_port == 0 {
            return Err(invalid(
                "etcd.client_port",
                "must be a port number from 1 to 65535",
            ));
        }
        if self.etcd.peer_port == 0 {
            return Err(invalid(
                "etcd.peer_port",
                "must be a port number from 1 to 65535",
            ));
        }
        if self.etcd.client_port == self.etcd.peer_port {
            return Err(invalid(
                "etcd.peer_port",
                "must differ from etcd.client_port",
            ));
        }
        for listen in &self.embedded.listen {
            if listen.addr.port() == 0 {
                return Err(invalid(
                    "embedded.listen",
                    &format!("{listen}: give a port number from 1 to 65535"),
                ));
            }
        }
        if self.cluster.agent_port == 0 {
            return Err(invalid(
                "cluster.agent_port",
                "must be a port number from 1 to 65535",
            ));
        }
        self.components.validate(origin)?;
        self.validate_network(origin)?;
        if let Some(name) = &self.node_name {
            let ok = !name.is_empty()
                && name.len() <= 63
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
            if !ok {
                return Err(invalid(
                    "node_name",
                    "must be a lowercase DNS name (a-z, 0-9, '-', '.'), at most 63 characters",
                ));
            }
        }
        self.certs.validate(origin)?;
        self.registries.validate(origin)?;
        self.addons.validate(origin)?;
        services::validate(&self.services, &services::known_services(), origin)?;
        Ok(())
    }

    fn validate_network(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            path: origin.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        let bad_value = |field: &str| {
            let path = origin.to_path_buf();
            let field = field.to_string();
            move |error| ConfigError::BadValue { path, field, error }
        };
        let net = &self.network;
        let pods = parse_cidr(&net.pod_cidr).map_err(bad_value("network.pod_cidr"))?;
        let services = parse_cidr(&net.service_cidr).map_err(bad_value("network.service_cidr"))?;
        let mask = net.node_cidr_mask;
        if mask < pods.prefix_len() || mask > 28 || mask - pods.prefix_len() > 16 {
            return Err(invalid(
                "network.node_cidr_mask",
                format!(
                    "{mask} must be from {} (the prefix of network.pod_cidr {pods}) to 28, \
                     and at most 16 more than it",
                    pods.prefix_len()
                ),
            ));
        }
        if net.vxlan_vni == 0 || net.vxlan_vni > 0xff_ffff {
            return Err(invalid(
                "network.vxlan_vni",
                format!("{} must be from 1 to 16777215", net.vxlan_vni),
            ));
        }
        if net.vxlan_port == 0 {
            return Err(invalid(
                "network.vxlan_port",
                "must be a port number from 1 to 65535".into(),
            ));
        }
        if pods.contains(&services.network()) || services.contains(&pods.network()) {
            return Err(invalid(
                "network.service_cidr",
                format!("{services} overlaps network.pod_cidr {pods}; pick disjoint ranges"),
            ));
        }
        if let Some(legacy) = &self.certs.service_cidr
            && legacy != &net.service_cidr
        {
            return Err(invalid(
                "certs.service_cidr",
                format!(
                    "`{legacy}` differs from network.service_cidr `{}`, whose first address \
                     the apiserver certificate names; remove certs.service_cidr",
                    net.service_cidr
                ),
            ));
        }
        if !is_dns_name(&net.cluster_domain) {
            return Err(invalid(
                "network.cluster_domain",
                format!(
                    "`{}` is not a lowercase DNS name like cluster.local",
                    net.cluster_domain
                ),
            ));
        }
        match net.cluster_dns {
            IpAddr::V4(ip) if services.contains(&ip) => {}
            other => {
                return Err(invalid(
                    "network.cluster_dns",
                    format!("{other} is not inside network.service_cidr {services}"),
                ));
            }
        }
        let bridge_ok = !net.bridge.is_empty()
            && net.bridge.len() <= 15
            && net
                .bridge
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !bridge_ok {
            return Err(invalid(
                "network.bridge",
                "must be an interface name: 1 to 15 of a-z, A-Z, 0-9, '-', '_'".into(),
            ));
        }
        if self.runtime.sandbox_image.trim().is_empty() {
            return Err(invalid(
                "runtime.sandbox_image",
                "must name an image, e.g. registry.k8s.io/pause:3.9".into(),
            ));
        }
        if let Some(root) = &self.runtime.cgroup_root
            && !is_valid_cgroup_root(root)
        {
            return Err(invalid(
                "runtime.cgroup_root",
                format!(
                    "`{root}` is not an absolute cgroup path of a-z, A-Z, 0-9, '-', '_', '.' \
                     parts, e.g. /kdist-w1"
                ),
            ));
        }
        Ok(())
    }

    /// The node name: configured, or the host name in lowercase.
    pub fn node_name(&self) -> String {
        if let Some(name) = &self.node_name {
            return name.clone();
        }
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .map(|h| h.to_lowercase())
            .unwrap_or_else(|| "kdist".to_string())
    }
}

/// Checks a `runtime.cgroup_root` value: an absolute cgroup path such as `/kdist-w1`.
pub fn is_valid_cgroup_root(root: &str) -> bool {
    root.starts_with('/')
        && root.len() > 1
        && root[1..].split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// `path` (absolute) with each existing prefix resolved as the kernel would (symlinks,
/// then `..`), and what does not exist yet appended as written, `.` and `..` applied.
fn resolved(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => out.push(component.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => {
                out.push(name);
                if let Ok(real) = std::fs::canonicalize(&out) {
                    out = real;
                }
            }
        }
    }
    out
}

/// A lowercase DNS name: dot-separated labels of a-z, 0-9 and inner '-'.
fn is_dns_name(name: &str) -> bool {
    certs::is_dns_name_of(name, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
    })
}

/// Parses an IPv4 CIDR such as `10.1.0.0/16`; the error names the expected form.
pub fn parse_cidr(text: &str) -> Result<ipnet::Ipv4Net, ValueError> {
    let net: ipnet::Ipv4Net = text.parse().map_err(|_| ValueError::CidrSyntax {
        text: text.to_string(),
    })?;
    if net.trunc() != net {
        return Err(ValueError::CidrHostBits {
            text: text.to_string(),
            network: net.trunc().to_string(),
        });
    }
    if net.prefix_len() > 28 {
        return Err(ValueError::CidrTooSmall {
            text: text.to_string(),
        });
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_roots_must_be_plain_absolute_paths() {
        for ok in ["/kdist-w1", "/kdist/w1", "/a.b_c"] {
            assert!(is_valid_cgroup_root(ok), "{ok}");
        }
        for bad in ["", "/", "kdist", "/a//b", "/a/../b", "/a b", "/a/"] {
            assert!(!is_valid_cgroup_root(bad), "{bad}");
        }
    }

    #[test]
    fn a_data_dir_has_one_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(real.join("node")).unwrap();
        std::os::unix::fs::symlink(real.join("node"), real.join("link")).unwrap();
        let want = DataDir::new(real.join("node"));
        for spelling in [
            real.join("link"),
            real.join("node/./sub/.."),
            real.join("other/../link/"),
        ] {
            assert_eq!(DataDir::new(&spelling), want, "{}", spelling.display());
        }
        // not there yet: taken as written, below the resolved part
        assert_eq!(
            DataDir::new(real.join("link/new/./x/..")).root(),
            real.join("node/new")
        );
    }

    #[test]
    fn empty_config_is_default() {
        let config = NodeConfig::parse("", Path::new("c.yaml")).unwrap();
        assert_eq!(config, NodeConfig::default());
        assert_eq!(config.etcd.client_port, 2379);
    }

    #[test]
    fn ports_are_read() {
        let config = NodeConfig::parse(
            "etcd:\n  client_port: 3379\n  peer_port: 3380\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(config.etcd.client_port, 3379);
        assert_eq!(config.etcd.peer_port, 3380);
    }

    #[test]
    fn unknown_field_names_the_file() {
        let err = NodeConfig::parse("etcd:\n  client_prot: 1\n", Path::new("/x/c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/x/c.yaml"), "{err}");
        assert!(err.contains("client_prot"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn saved_settings_read_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let mut config = NodeConfig::parse(
            "node_name: n1\ndatastore: etcd\netcd:\n  client_port: 2399\n\
             certs:\n  leaf_validity: 10m\n  renewal_window: 5m\nservices:\n  kubelet:\n    args: [--v=2]\n",
            Path::new("c"),
        )
        .unwrap();
        config.role = Role::ControlPlane;
        config.save(&data).unwrap();
        let text = std::fs::read_to_string(data.config_file()).unwrap();
        let back = NodeConfig::load(&data).unwrap();
        assert_eq!(crate::yaml::to_string(&back).unwrap(), text);
        assert_eq!(back.etcd.client_port, 2399);
        assert_eq!(back.certs.leaf_validity, Lifetime::from_secs(600));
        assert_eq!(back.services["kubelet"].args, ["--v=2"]);
        assert_eq!(back.node_name(), "n1");
    }

    #[test]
    fn certs_section_is_read() {
        let config = NodeConfig::parse(
            "certs:\n  key_algorithm: rsa-2048\n  leaf_validity: 10m\n  renewal_window: 5m\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(config.certs.key_algorithm, KeyAlgorithm::Rsa2048);
        assert_eq!(config.certs.leaf_validity, Lifetime::from_secs(600));
        let err = NodeConfig::parse("certs:\n  leaf_validity: 1y\n", Path::new("/c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/c.yaml") && err.contains("1y"), "{err}");
    }

    #[test]
    fn set_datastore_switches_the_line_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        // no file: the line is the whole file
        let config = NodeConfig::set_datastore(&data, DatastoreKind::Etcd).unwrap();
        assert_eq!(config.datastore, DatastoreKind::Etcd);
        let text =
            "# my node\nnode_name: n1 # named\ndatastore: etcd\netcd:\n  client_port: 2399\n";
        std::fs::write(data.config_file(), text).unwrap();
        NodeConfig::set_datastore(&data, DatastoreKind::Embedded).unwrap();
        let after = std::fs::read_to_string(data.config_file()).unwrap();
        assert_eq!(
            after,
            text.replace("datastore: etcd", "datastore: embedded")
        );
        let config = NodeConfig::load(&data).unwrap();
        assert_eq!(config.etcd.client_port, 2399);
        assert_eq!(config.datastore, DatastoreKind::Embedded);
    }

    #[test]
    fn embedded_listen_is_read() {
        let config = NodeConfig::parse(
            "embedded:\n  listen: [\"https://127.0.0.1:12379\", \"http://127.0.0.1:12380\"]\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(config.embedded.listen.len(), 2);
        assert!(config.embedded.listen[0].tls && !config.embedded.listen[1].tls);
        let err = NodeConfig::parse("embedded:\n  listen: [\"nowhere\"]\n", Path::new("/c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/c.yaml") && err.contains("nowhere"), "{err}");
    }

    #[test]
    fn clashing_ports_are_refused() {
        let err = NodeConfig::parse("etcd:\n  client_port: 5\n  peer_port: 5\n", Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("etcd.peer_port"), "{err}");
    }

    #[test]
    fn network_defaults_and_checks() {
        let config = NodeConfig::parse("network:\n  egress: none\n", Path::new("c")).unwrap();
        assert_eq!(config.network.egress, Egress::None);
        assert_eq!(config.network.pod_cidr, "10.1.0.0/16");
        let err = NodeConfig::parse("network:\n  pod_cidr: 10.152.0.0/16\n", Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("overlaps"), "{err}");
        let err = NodeConfig::parse("network:\n  cluster_dns: 10.9.9.9\n", Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("network.cluster_dns"), "{err}");
        assert_eq!(config.network.node_cidr_mask, 24);
        assert_eq!(config.network.backend, Backend::Auto);
        assert_eq!(config.network.cni, Cni::Builtin);
        let config = NodeConfig::parse(
            "network:\n  backend: host-gw\n  cni: none\n  node_cidr_mask: 20\n",
            Path::new("c"),
        )
        .unwrap();
        assert_eq!(config.network.backend, Backend::HostGw);
        assert_eq!(config.network.cni, Cni::None);
        for bad in [
            "node_cidr_mask: 15",
            "node_cidr_mask: 29",
            "pod_cidr: 10.0.0.0/8\n  node_cidr_mask: 25",
            "vxlan_vni: 0",
            "vxlan_port: 0",
        ] {
            let err = NodeConfig::parse(&format!("network:\n  {bad}\n"), Path::new("c"))
                .unwrap_err()
                .to_string();
            let key = bad.split(':').next().unwrap();
            let key = if key.starts_with("pod_cidr") {
                "node_cidr_mask"
            } else {
                key
            };
            assert!(err.contains(&format!("network.{key}")), "{bad}: {err}");
        }
        let err = NodeConfig::parse("network:\n  pod_cidr: 10.1.0.1/16\n", Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("10.1.0.0/16"), "{err}");
    }

    #[test]
    fn the_service_cidr_and_domain_are_one_setting_for_the_certificate_too() {
        let parse = |yaml: &str| NodeConfig::parse(yaml, Path::new("c.yaml"));
        let net = "network:\n  service_cidr: 10.96.0.0/12\n  cluster_dns: 10.96.0.10\n";
        let config = parse(net).unwrap();
        assert_eq!(
            config.network.kubernetes_service_ip().unwrap(),
            std::net::Ipv4Addr::new(10, 96, 0, 1)
        );
        assert_eq!(
            NodeConfig::default()
                .network
                .kubernetes_service_ip()
                .unwrap(),
            std::net::Ipv4Addr::new(10, 152, 183, 1)
        );
        // the old certs.service_cidr is taken when it agrees, refused when it does not
        assert!(parse(&format!("{net}certs:\n  service_cidr: 10.96.0.0/12\n")).is_ok());
        let err = parse("certs:\n  service_cidr: 10.96.0.0/12\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c.yaml")
                && err.contains("certs.service_cidr")
                && err.contains("10.152.183.0/24"),
            "{err}"
        );
        for bad in ["Cluster.Local", "cluster local", "-x.local", "a..b", ""] {
            let err = parse(&format!("network:\n  cluster_domain: \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("network.cluster_domain"), "{bad}: {err}");
        }
        assert!(parse("network:\n  cluster_domain: lab.internal\n").is_ok());
    }
}
