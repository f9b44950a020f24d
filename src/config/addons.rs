//! The `addons:` section of config.yaml: which cluster addons this node seeds as enabled
//! and the settings of the DNS addon.

use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::fsutil;

/// The addons kdist knows, with whether each is on when nothing says otherwise.
/// metrics-server is off by default: a node is usable without it, it costs memory on
/// small edge boxes, and, gating readiness, an image that cannot be pulled would keep
/// `kdist start` from finishing.
pub const KNOWN: &[(&str, bool)] = &[
    ("dns", true),
    ("metrics-server", false),
    ("storage", true),
    ("manifests", true),
];

/// Whether `name` is on by default; None for an unknown addon.
pub fn default_enabled(name: &str) -> Option<bool> {
    KNOWN.iter().find(|(n, _)| *n == name).map(|(_, on)| *on)
}

/// The names kdist knows, for messages.
pub fn known_names() -> String {
    KNOWN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AddonsConfig {
    pub dns: DnsAddon,
    #[serde(rename = "metrics-server")]
    pub metrics_server: MetricsAddon,
    pub storage: Toggle,
    pub manifests: Toggle,
}

/// An addon that is only switched on or off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Toggle {
    /// Unset: the addon's default.
    pub enabled: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsAddon {
    pub enabled: Option<bool>,
    /// Resolvers CoreDNS forwards names outside the cluster to; empty: the host's.
    pub upstream: Vec<IpAddr>,
    /// CoreDNS replicas; unset: 2 once two nodes can run it, else 1.
    pub replicas: Option<u32>,
    /// The CoreDNS image; unset: the active release's `coredns-image`.
    pub image: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsAddon {
    pub enabled: Option<bool>,
    /// The metrics-server image; unset: the active release's `metrics-server-image`.
    pub image: Option<String>,
}

impl AddonsConfig {
    /// What config.yaml says of `name`: Some(on) when it says anything.
    pub fn configured(&self, name: &str) -> Option<bool> {
        match name {
            "dns" => self.dns.enabled,
            "metrics-server" => self.metrics_server.enabled,
            "storage" => self.storage.enabled,
            "manifests" => self.manifests.enabled,
            _ => None,
        }
    }

    /// Whether `name` is enabled by this file (its default when unset); false for an
    /// unknown name.
    pub fn enabled(&self, name: &str) -> bool {
        self.configured(name)
            .or_else(|| default_enabled(name))
            .unwrap_or(false)
    }

    pub(super) fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        if self.dns.replicas == Some(0) {
            return Err(ConfigError::Invalid {
                path: origin.to_path_buf(),
                field: "addons.dns.replicas".into(),
                reason: "must be 1 or more; disable the addon with `kdist addons disable dns`"
                    .into(),
            });
        }
        if let Some(ip) = self.dns.upstream.iter().find(|ip| ip.is_loopback()) {
            return Err(ConfigError::Invalid {
                path: origin.to_path_buf(),
                field: "addons.dns.upstream".into(),
                reason: format!(
                    "{ip} is a loopback address, which inside the CoreDNS pod is CoreDNS \
                     itself; give the resolver's address on the host's network"
                ),
            });
        }
        Ok(())
    }
}

/// Sets `addons.<name>.enabled` in `<data>/config.yaml` in one atomic write, keeping
/// every other setting of the file (comments are not kept). Unknown names are refused.
pub fn set_enabled(
    data: &super::DataDir,
    changes: &[(String, bool)],
) -> Result<super::NodeConfig, ConfigError> {
    let path = data.config_file();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    let invalid = |reason: String| ConfigError::Invalid {
        path: path.clone(),
        field: "addons".into(),
        reason,
    };
    let mut doc: serde_json::Value = if text.trim().is_empty() {
        serde_json::json!({})
    } else {
        serde_saphyr::from_str(&text).map_err(|e| invalid(format!("cannot be edited: {e}")))?
    };
    for (name, on) in changes {
        if default_enabled(name).is_none() {
            return Err(invalid(format!(
                "has no addon `{name}`; known: {}",
                known_names()
            )));
        }
        let root = doc
            .as_object_mut()
            .ok_or_else(|| invalid("the file is not a mapping".into()))?;
        let addons = root
            .entry("addons")
            .or_insert_with(|| serde_json::json!({}));
        if addons.is_null() {
            *addons = serde_json::json!({});
        }
        let entry = addons
            .as_object_mut()
            .ok_or_else(|| invalid("is not a mapping".into()))?
            .entry(name.clone())
            .or_insert_with(|| serde_json::json!({}));
        if entry.is_null() {
            *entry = serde_json::json!({});
        }
        entry
            .as_object_mut()
            .ok_or_else(|| invalid(format!("{name} is not a mapping")))?
            .insert("enabled".into(), serde_json::Value::Bool(*on));
    }
    let new =
        serde_saphyr::to_string(&doc).map_err(|e| invalid(format!("cannot be written: {e}")))?;
    let config = super::NodeConfig::parse(&new, &path)?;
    fsutil::atomic_write(&path, new.as_bytes(), 0o644)
        .map_err(|source| ConfigError::Write { path, source })?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DataDir, NodeConfig};

    #[test]
    fn defaults_and_overrides() {
        let config = NodeConfig::parse(
            "addons:\n  dns:\n    enabled: false\n    upstream: [192.0.2.53]\n  metrics-server:\n    enabled: true\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        assert!(!config.addons.enabled("dns"));
        assert!(config.addons.enabled("metrics-server"));
        assert!(config.addons.enabled("storage"), "default on");
        assert!(!config.addons.enabled("nope"));
        assert_eq!(
            config.addons.dns.upstream,
            vec!["192.0.2.53".parse::<IpAddr>().unwrap()]
        );
        assert!(NodeConfig::default().addons.enabled("dns"));
        assert!(!NodeConfig::default().addons.enabled("metrics-server"));
    }

    #[test]
    fn loopback_upstream_and_unknown_addon_are_refused() {
        let err = NodeConfig::parse(
            "addons:\n  dns:\n    upstream: [127.0.0.53]\n",
            Path::new("c.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("addons.dns.upstream") && err.contains("127.0.0.53"),
            "{err}"
        );
        let err = NodeConfig::parse("addons:\n  helm: {enabled: true}\n", Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("helm"), "{err}");
    }

    #[test]
    fn set_enabled_keeps_the_other_settings() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        std::fs::write(
            data.config_file(),
            "datastore: etcd\naddons:\n  dns:\n    upstream: [192.0.2.53]\n",
        )
        .unwrap();
        let config = set_enabled(
            &data,
            &[("dns".into(), false), ("metrics-server".into(), true)],
        )
        .unwrap();
        assert!(!config.addons.enabled("dns"));
        let again = NodeConfig::load(&data).unwrap();
        assert_eq!(again, config);
        assert_eq!(again.datastore, crate::config::DatastoreKind::Etcd);
        assert_eq!(again.addons.dns.upstream.len(), 1);
        let err = set_enabled(&data, &[("helm".into(), true)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("helm") && err.contains("metrics-server"),
            "{err}"
        );
        assert_eq!(
            NodeConfig::load(&data).unwrap(),
            config,
            "unchanged on error"
        );
    }
}
