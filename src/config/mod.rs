//! The data directory layout and this node's settings (`config.yaml`).
//!
//! Owns where every file of kdist lives and how `config.yaml` is parsed and validated.
//! It must not start processes or touch anything outside the data directory.

mod certs;
mod components;
mod error;

pub use certs::{CertsConfig, KeyAlgorithm, Lifetime, is_valid_san};
pub use components::{
    ComponentsConfig, DEFAULT_BASE_URL, DEFAULT_CHANNEL, ReleasePin, check_channel,
};
pub use error::ConfigError;

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
    /// Takes `root` as given, made absolute against the current directory so that
    /// children and a detached daemon see the same paths.
    pub fn new(root: impl AsRef<Path>) -> Self {
        let root = root.as_ref();
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|cwd| cwd.join(root))
                .unwrap_or_else(|_| root.to_path_buf())
        };
        Self { root }
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DatastoreKind {
    /// A real etcd child process.
    #[default]
    Etcd,
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
    pub datastore: DatastoreKind,
    pub etcd: EtcdConfig,
    pub certs: CertsConfig,
    pub components: ComponentsConfig,
}

impl NodeConfig {
    /// Parses YAML text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let config: Self = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
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

    /// Validates a user-supplied file and installs it as `<data>/config.yaml`.
    pub fn seed(data: &DataDir, from: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(from).map_err(|source| ConfigError::Read {
            path: from.to_path_buf(),
            source,
        })?;
        let config = Self::parse(&text, from)?;
        let path = data.config_file();
        fsutil::atomic_write(&path, text.as_bytes(), 0o644)
            .map_err(|source| ConfigError::Write { path, source })?;
        Ok(config)
    }

    fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: &str| ConfigError::Invalid {
            path: origin.to_path_buf(),
            field: field.to_string(),
            reason: reason.to_string(),
        };
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
        self.components.validate(origin)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn clashing_ports_are_refused() {
        let err = NodeConfig::parse("etcd:\n  client_port: 5\n  peer_port: 5\n", Path::new("c"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("etcd.peer_port"), "{err}");
    }
}
