//! The node: containerd, CNI, the Kubernetes node and control-plane services' generated
//! configuration, host preparation (sysctls, mount propagation, the egress guard) and
//! the node commands (images import, kubeconfig, kubectl, inspect, reset).
//!
//! It owns `<data>/containerd`, `<data>/cni`, `<data>/node`, `<data>/kubelet`,
//! `<data>/images` and the host changes recorded in `<data>/node/host-state.json`. It
//! reads certificates and kubeconfigs by their kubeadm names but never creates them, and
//! it never spawns long-running processes: the supervisor runs the services. It reads
//! `/proc` only through [`proc`] (procfs) and changes links only through [`netlink`].

pub mod cgroups;
mod cmd;
pub mod cni;
pub mod containerd;
pub mod egress;
mod error;
pub mod host;
pub mod hostprep;
pub mod images;
pub mod inspect;
pub mod kube;
pub mod kubeconfig;
pub mod masquerade;
pub mod netlink;
pub mod proc;
mod procs;
pub mod rbac;
pub mod registries;
pub mod reset;

pub use error::NodeError;
pub use host::{HostFact, HostFacts};
pub use procs::{DAEMON_GROUP, PODS_GROUP, ProcessUsage, SERVICE_ENV, find_marked, tree_usage};

use crate::config::{Cni, DataDir, Egress, NodeConfig};
use crate::fsutil;

/// What preparing the node found and did, for `kdist status`.
#[derive(Debug, Clone)]
pub struct NodeSetup {
    pub facts: HostFacts,
    pub report: Vec<HostFact>,
    pub notes: Vec<String>,
}

/// Prepares the host and writes the generated configuration, before any service starts.
/// Blocking (it runs a few short commands): call it off the async workers.
pub fn prepare(data: &DataDir, config: &NodeConfig) -> Result<NodeSetup, NodeError> {
    let remounted = cgroups::ensure_mounted()?;
    let facts = HostFacts::probe(config);
    let settings = containerd::ContainerdSettings::new(data, config, &facts);
    registries::write(data, &config.registries)?;
    containerd::write(data, &settings)?;
    let mut notes = Vec::new();
    notes.extend(registries::protect_config(data, &config.registries)?);
    // the network controller writes it again with this node's pod CIDR
    cni::remove(data)?;
    migrate_controller_manager_args(data)?;
    let missing = match config.network.cni {
        Cni::Builtin => cni::missing_plugins(&settings.cni_bin_dir),
        Cni::None => Vec::new(),
    };
    if !missing.is_empty() {
        notes.push(format!(
            "CNI plugins missing from {}: {}; pods cannot get a network until they are \
             installed (`kdist components install`)",
            settings.cni_bin_dir.display(),
            missing.join(", ")
        ));
    }
    let mut report = facts.report();
    report.extend(
        registries::summary(&config.registries)
            .into_iter()
            .map(|(name, how)| HostFact {
                name: format!("registry {name}"),
                value: how,
                note: None,
            }),
    );
    if let Some(note) = remounted {
        report.push(HostFact {
            name: "cgroup mounts".into(),
            value: "remounted".into(),
            note: Some(note),
        });
    }
    if let Some(root) = &config.runtime.cgroup_root {
        cgroups::check_root_driver(root, facts.systemd)?;
        cgroups::create_root(root)?;
        report.push(HostFact {
            name: "pod cgroup root".into(),
            value: root.clone(),
            note: Some("kubelet's cgroupRoot; removed at stop".into()),
        });
    }
    let kube = kube::detect(data, config.role)?;
    if kube.complete() {
        let inputs = kube::NodeInputs::new(data, config, &facts);
        kube::write_configs(data, &inputs, &kube)?;
        let versions: Vec<String> = kube
            .found
            .iter()
            .map(|(service, (_, version))| format!("{service} {}", version.full))
            .collect();
        report.push(HostFact {
            name: "kubernetes".into(),
            value: versions.join(", "),
            note: None,
        });
        report.push(HostFact {
            name: "kubelet protectKernelDefaults".into(),
            value: "false".into(),
            note: (!facts.kernel_defaults_match).then(|| {
                "kernel.panic & co differ from kubelet's values: kubelet sets them, \
                 `kdist reset` restores the recorded originals"
                    .to_string()
            }),
        });
    } else {
        notes.push(format!(
            "Kubernetes components are not installed (missing: {}): this node runs none \
             of the Kubernetes services; run `kdist components install`",
            kube.missing.join(", ")
        ));
    }
    report.extend(hostprep::prepare(data, kube.complete())?);
    match config.network.cni {
        Cni::Builtin => masquerade::apply(data, &config.network.pod_cidr)?,
        Cni::None => masquerade::remove(data)?,
    }
    match config.network.egress {
        Egress::None => {
            egress::apply(data, config)?;
            report.push(HostFact {
                name: "egress".into(),
                value: "none".into(),
                note: Some(format!(
                    "traffic of {} and {} only via {} and lo (iptables mangle chain {})",
                    config.network.pod_cidr,
                    config.network.service_cidr,
                    config.network.bridge,
                    egress::chain(data)
                )),
            });
        }
        Egress::All => egress::remove(data)?,
    }
    Ok(NodeSetup {
        facts,
        report,
        notes,
    })
}

/// Kills the containers a killed daemon left behind (their shims carry kdist's marker,
/// the containers do not). Call before the supervisor's own stale-process cleanup.
pub fn kill_leftover_containers(data: &DataDir) {
    let killed = procs::kill_leftover_shims(data);
    if killed > 0 {
        tracing::info!(
            count = killed,
            "killed containers left by an earlier daemon"
        );
    }
}

/// Undoes what only makes sense while the node runs, after every service has stopped:
/// kills what containerd's shims and their containers left (they carry kdist's marker
/// or descend from a process that does), removes the pod cgroup root kdist made and the
/// egress guard.
pub fn teardown(data: &DataDir, config: &NodeConfig) {
    let killed = procs::kill_marked_trees(data);
    if killed > 0 {
        tracing::info!(count = killed, "killed leftover container processes");
    }
    if let Some(root) = &config.runtime.cgroup_root {
        // killed containers leave their cgroups a moment later
        for _ in 0..20 {
            cgroups::remove_root(root);
            if !cgroups::root_exists(root) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if cgroups::root_exists(root) {
            tracing::warn!(root = %root, "pod cgroups still in use; `kdist reset` removes them");
        }
    }
    if let Err(e) = egress::remove(data) {
        tracing::warn!("removing the egress guard: {e}");
    }
    if let Err(e) = masquerade::remove(data) {
        tracing::warn!("removing the pod masquerade chain: {e}");
    }
}

/// Moves an args file of kube-controller-manager written by an earlier kdist (one pod
/// CIDR for the whole node) to per-node pod CIDRs; a file the user edited stays theirs.
fn migrate_controller_manager_args(data: &DataDir) -> Result<(), NodeError> {
    let path = data.args_file("kube-controller-manager");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    if let Some(new) = cni::migrate_controller_manager_args(&text) {
        fsutil::atomic_write(&path, new.as_bytes(), 0o644).map_err(NodeError::io(&path))?;
        tracing::info!(path = %path.display(), "kube-controller-manager now allocates a pod CIDR per node");
    }
    Ok(())
}
