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
    Netlink {
        action: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("the Kubernetes API did not answer: {0}")]
    Api(String),
    #[error(
        "runtime.cgroup_root `{root}` needs the cgroupfs driver, and this host runs systemd \
         (kubelet's systemd driver looks for a `.slice` of that name instead); leave \
         runtime.cgroup_root unset on this host"
    )]
    CgroupRootWithSystemd { root: String },
}

impl NodeError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}
