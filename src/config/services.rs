//! The `services:` section of config.yaml: per-service environment and extra flags,
//! like k3s' `--kube-apiserver-arg` or MicroK8s' args files, but kept with the node's
//! other settings so that they survive a reset of `<data>/args/`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Lifetime};

/// Declares the services kdist knows: one variant, its name, and its files under
/// `services/` (`<name>.toml`, the definition; `<name>.args`, the default flags),
/// embedded at build time. Adding a service is one line here plus those two files.
macro_rules! services {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// A service kdist can run, by its identity rather than a string.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Service {
            $($variant),*
        }

        impl Service {
            /// Every service, in start order.
            pub const ALL: &'static [Service] = &[$(Service::$variant),*];

            /// The name in `services/`, `args/`, `logs/`, `kdist status` and config.yaml.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Service::$variant => $name),*
                }
            }

            /// `services/<name>.toml`, as shipped.
            pub fn definition(self) -> &'static str {
                match self {
                    $(Service::$variant => include_str!(concat!("../../services/", $name, ".toml"))),*
                }
            }

            /// `services/<name>.args`, as shipped.
            pub fn default_args(self) -> &'static str {
                match self {
                    $(Service::$variant => include_str!(concat!("../../services/", $name, ".args"))),*
                }
            }
        }
    };
}

services! {
    Datastore => "datastore",
    Etcd => "etcd",
    Containerd => "containerd",
    KubeApiserver => "kube-apiserver",
    KubeControllerManager => "kube-controller-manager",
    KubeScheduler => "kube-scheduler",
    Kubelet => "kubelet",
    KubeProxy => "kube-proxy",
}

impl Service {
    /// The service named `name`, if kdist knows it.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|s| s.as_str() == name)
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for Service {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Service {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Service {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

/// Names of every service kdist knows, for error messages and completion.
pub fn known_services() -> Vec<&'static str> {
    Service::ALL.iter().map(|s| s.as_str()).collect()
}

/// The `memory:` section: what the supervisor does about its children's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// This long after a child is first ready, its program's file pages are paged out
    /// (start-up code it will not run again; what it still uses faults back in). `0s`
    /// turns it off.
    pub page_out_after: Lifetime,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            page_out_after: Lifetime::from_secs(60),
        }
    }
}

/// Settings of one supervised service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSettings {
    /// Environment of the service, over the defaults of its definition (e.g. GOMEMLIMIT);
    /// an empty value removes a default variable.
    pub env: BTreeMap<String, String>,
    /// Flags appended after those of `<data>/args/<service>`; a flag given twice takes
    /// its last value in the Kubernetes components, etcd and containerd.
    pub args: Vec<String>,
}

/// Names kdist reserves for its own markers on children.
const RESERVED_PREFIX: &str = "KDIST_";

/// Checks `services:`: names of services that run as processes (`known`), POSIX
/// environment variable names, and one flag per entry.
pub fn validate(
    services: &BTreeMap<String, ServiceSettings>,
    known: &[&str],
    origin: &Path,
) -> Result<(), ConfigError> {
    let invalid = |field: String, reason: String| ConfigError::Invalid {
        path: origin.to_path_buf(),
        field,
        reason,
    };
    for (name, settings) in services {
        if Service::parse(name) == Some(Service::Datastore) {
            return Err(invalid(
                format!("services.{name}"),
                "runs inside the kdist daemon, which takes no per-service env or args; \
                 use `datastore: etcd` and `services.etcd` for a separate process"
                    .into(),
            ));
        }
        if !known.contains(&name.as_str()) {
            return Err(invalid(
                format!("services.{name}"),
                format!("is not a service kdist runs; known: {}", known.join(", ")),
            ));
        }
        for (key, value) in &settings.env {
            let field = format!("services.{name}.env.{key}");
            let mut chars = key.chars();
            let ok = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(invalid(
                    field,
                    "is not an environment variable name (A-Z, a-z, 0-9, '_', not starting \
                     with a digit)"
                        .into(),
                ));
            }
            if key.starts_with(RESERVED_PREFIX) {
                return Err(invalid(
                    field,
                    format!(
                        "uses the prefix {RESERVED_PREFIX}, which kdist reserves for its markers"
                    ),
                ));
            }
            if value.contains('\0') {
                return Err(invalid(field, "must not contain a NUL byte".into()));
            }
        }
        for (i, arg) in settings.args.iter().enumerate() {
            let field = format!("services.{name}.args[{i}]");
            if !arg.starts_with('-') {
                return Err(invalid(
                    field,
                    format!("`{arg}` is not a flag; write one `--flag=value` per entry"),
                ));
            }
            if arg.contains(['\n', '\0']) {
                return Err(invalid(field, "must be a single line".into()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_parses_back_from_its_name_and_has_its_files() {
        for service in Service::ALL {
            assert_eq!(Service::parse(service.as_str()), Some(*service));
            assert!(service.definition().contains("description"), "{service}");
        }
        assert_eq!(
            Service::parse("kube-apiserver"),
            Some(Service::KubeApiserver)
        );
        assert_eq!(Service::parse("kube-api"), None);
        assert_eq!(known_services().len(), Service::ALL.len());
    }
    use crate::config::NodeConfig;

    fn parse(text: &str) -> Result<NodeConfig, String> {
        NodeConfig::parse(text, Path::new("/etc/kdist.yaml")).map_err(|e| e.to_string())
    }

    #[test]
    fn env_and_args_are_read() {
        let config = parse(
            "services:\n  kube-apiserver:\n    env: {GOMEMLIMIT: 200MiB, GOGC: \"\"}\n    \
             args: [\"--watch-cache=false\", \"--v=2\"]\n  kubelet:\n    args: [--v=1]\n",
        )
        .unwrap();
        let api = &config.services["kube-apiserver"];
        assert_eq!(api.env["GOMEMLIMIT"], "200MiB");
        assert_eq!(api.env["GOGC"], "");
        assert_eq!(api.args, ["--watch-cache=false", "--v=2"]);
        assert_eq!(config.services["kubelet"].args, ["--v=1"]);
        assert!(config.services["kubelet"].env.is_empty());
    }

    #[test]
    fn page_out_delay_is_read_and_zero_turns_it_off() {
        assert_eq!(
            parse("").unwrap().memory.page_out_after,
            Lifetime::from_secs(60)
        );
        let config = parse("memory:\n  page_out_after: 0s\n").unwrap();
        assert_eq!(config.memory.page_out_after, Lifetime::from_secs(0));
        let err = parse("memory:\n  page_out_after: soon\n").unwrap_err();
        assert!(
            err.contains("soon") && err.contains("/etc/kdist.yaml"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "services:\n  kube-apiservr: {}\n",
                "services.kube-apiservr",
                "known: ",
            ),
            (
                "services:\n  datastore: {env: {A: b}}\n",
                "services.datastore",
                "inside",
            ),
            (
                "services:\n  kubelet:\n    env: {\"1X\": a}\n",
                "services.kubelet.env.1X",
                "environment variable name",
            ),
            (
                "services:\n  kubelet:\n    env: {\"A-B\": a}\n",
                "services.kubelet.env.A-B",
                "environment variable name",
            ),
            (
                "services:\n  etcd:\n    env: {KDIST_SERVICE: x}\n",
                "services.etcd.env.KDIST_SERVICE",
                "reserves",
            ),
            (
                "services:\n  kube-proxy:\n    args: [--v=2, v=3]\n",
                "services.kube-proxy.args[1]",
                "`v=3` is not a flag",
            ),
        ];
        for (text, field, reason) in cases {
            let err = parse(text).unwrap_err();
            assert!(err.contains("/etc/kdist.yaml"), "{err}");
            assert!(err.contains(field), "{text}: {err}");
            assert!(err.contains(reason), "{text}: {err}");
        }
        // an unknown key inside a service is serde's error, with the file
        let err = parse("services:\n  kubelet:\n    flags: [--v=1]\n").unwrap_err();
        assert!(
            err.contains("flags") && err.contains("/etc/kdist.yaml"),
            "{err}"
        );
    }
}
