use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot mount the cgroup file system at {target}; run kdist where /sys/fs/cgroup is \
         mounted (`nsenter --net=/run/netns/NAME` keeps it, `ip netns exec` hides it)"
    )]
    Mount {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "netlink request on link {link} failed; run `kdist inspect` and check the link with `ip link`"
    )]
    Netlink {
        link: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot open a netlink socket (kdist needs CAP_NET_ADMIN to change links)")]
    NetlinkSocket {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error(
        "cannot tell the Kubernetes version of {program} from `--version` (it printed `{output}`); \
         reinstall it with `kdist components install`"
    )]
    Version { program: PathBuf, output: String },
    #[error(
        "Kubernetes {version} ({program}) is outside the range kdist supports (1.{min}..1.{max}); \
         run `kdist components use` with a supported release"
    )]
    UnsupportedVersion {
        program: PathBuf,
        version: String,
        min: u32,
        max: u32,
    },
    #[error("`{program}` not found in {searched} nor on PATH; {hint}")]
    NotFound {
        program: String,
        searched: PathBuf,
        hint: String,
    },
    #[error("{path} is not an image archive: {reason}")]
    BadArchive { path: PathBuf, reason: String },
    #[error("netlink: {action} failed; kdist needs CAP_NET_ADMIN in the node's network namespace")]
    NetlinkRequest {
        action: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{path} is not a kubeconfig: {reason}; run `kdist certs init` to write it again")]
    BadKubeconfig { path: PathBuf, reason: &'static str },
    #[error("{path} is not a kubeconfig; run `kdist certs init` to write it again")]
    KubeconfigParse {
        path: PathBuf,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    #[error("cannot write the kubeconfig read from {path} back as YAML")]
    KubeconfigWrite {
        path: PathBuf,
        #[source]
        source: serde_saphyr::SerializeError,
    },
    #[error("the Kubernetes API did not answer: {0}")]
    Api(String),
    #[error(
        "runtime.cgroup_root `{root}` needs the cgroupfs driver, and this host runs systemd \
         (kubelet's systemd driver looks for a `.slice` of that name instead); leave \
         runtime.cgroup_root unset on this host"
    )]
    CgroupRootWithSystemd { root: String },
    #[error(
        "{key} names {path}, which is not a file; fix the path in config.yaml or copy the \
         file there, then start again"
    )]
    RegistryFile { key: String, path: PathBuf },
    #[error("{path} is not a release manifest kdist can read images from: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error(
        "pushing to {host} needs a username and password (or `auth`) in \
         registries.configs.\"{host}\".auth; an identity_token only serves pulls"
    )]
    PushAuth { host: String },
}

impl NodeError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}
