use std::path::PathBuf;

/// Errors of the in-process controllers and of the client they share.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(
        "cannot read the kubeconfig {path}: run `kdist certs check` on a control plane, \
         or join the node again on a worker"
    )]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot build a Kubernetes client from {path}")]
    Client {
        path: PathBuf,
        #[source]
        source: kube::Error,
    },
    #[error("{action} failed")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what} in {origin} is not a Kubernetes object: {reason}")]
    Manifest {
        origin: String,
        what: String,
        reason: String,
    },
    #[error(
        "cannot listen on {address}: another process uses the port; set \
         cluster.agent_port in config.yaml"
    )]
    Listen {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the {addon} addon was turned on or off: starting again in the new state")]
    Toggled { addon: &'static str },
    #[error("{path}: i/o error")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a blocking task of the {controller} controller failed")]
    Task {
        controller: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error(
        "the active release {release} names no {asset} for the {addon} addon: install a \
         release that has one, set addons.{addon}.image in config.yaml, or run \
         `kdist addons disable {addon}`"
    )]
    NoAddonImage {
        addon: String,
        asset: &'static str,
        release: String,
    },
    #[error(
        "no EKS-D release is active (the binaries come from PATH), so the {addon} addon has \
         no image: set addons.{addon}.image in config.yaml, install a release with \
         `kdist components install`, or run `kdist addons disable {addon}`"
    )]
    NoRelease { addon: String },
    #[error("addon {addon}: {file} has an unfilled placeholder {placeholder}")]
    Template {
        addon: String,
        file: String,
        placeholder: String,
    },
    #[error("unknown addon `{name}`; known addons: {known}")]
    UnknownAddon { name: String, known: String },
    #[error(
        "the CustomResourceDefinition {crd} is not established after {secs} s: see \
         `kubectl describe crd {crd}` and `kdist logs kube-apiserver`"
    )]
    NotEstablished { crd: String, secs: u64 },
    #[error("the {what} of the {controller} controller ended before it listed anything")]
    WatchEnded {
        controller: &'static str,
        what: &'static str,
    },
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl ControllerError {
    pub(crate) fn api(action: impl Into<String>, source: kube::Error) -> Self {
        Self::Api {
            action: action.into(),
            source,
        }
    }
}
