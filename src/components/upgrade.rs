//! An in-place upgrade of one node from the active release to another: which services
//! must restart (their binary changed), in which order, and the rollback when one of
//! them does not come back healthy.
//!
//! The services themselves are reached through [`NodeControl`], which the CLI implements
//! with the daemon's control API: this module never starts or stops anything itself.

use std::future::Future;

use serde::Serialize;

use super::error::{BoxError, ComponentsError, UpgradeFailure};
use super::manifest::ReleaseId;
use super::manifest::{Release, Use, host_arch, host_os};
use super::store::Store;

/// The order services restart in: the control plane from the datastore up, then the
/// node services. Services not named here (the embedded datastore, builtins) run inside
/// the daemon or come from elsewhere and never change with a release.
pub const RESTART_ORDER: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
    "kube-proxy",
];

/// What an upgrade will do.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Plan {
    pub from: String,
    pub to: String,
    pub kubernetes_from: Option<String>,
    pub kubernetes_to: Option<String>,
    /// Services to restart, in order, because their binary changed.
    pub restart: Vec<String>,
    /// Services that run on with the binary they have (the same bytes in both releases).
    pub unchanged: Vec<String>,
}

/// The asset digest behind each service's binary in `release` (the etcd tarball for etcd).
fn binary_digest(release: &Release, service: &str) -> Option<String> {
    let planned = release.plan(host_os(), host_arch()).ok()?;
    planned.into_iter().find_map(|p| match p.use_ {
        Use::Binary(name) if name == service => Some(p.sha256),
        Use::Tarball(super::manifest::Extract::Etcd) if service == "etcd" => Some(p.sha256),
        _ => None,
    })
}

/// Compares the two releases for the services this node runs (`running`, any order).
pub fn plan(from: &Release, to: &Release, running: &[String]) -> Plan {
    let mut restart = Vec::new();
    let mut unchanged = Vec::new();
    for service in RESTART_ORDER {
        if !running.iter().any(|r| r == service) {
            continue;
        }
        let (a, b) = (binary_digest(from, service), binary_digest(to, service));
        // containerd is not part of EKS-D: neither release has it, it stays
        if a == b {
            unchanged.push(service.to_string());
        } else {
            restart.push(service.to_string());
        }
    }
    Plan {
        from: from.id().to_string(),
        to: to.id().to_string(),
        kubernetes_from: from.version_of("kubernetes").map(str::to_string),
        kubernetes_to: to.version_of("kubernetes").map(str::to_string),
        restart,
        unchanged,
    }
}

/// The node's services as an upgrade sees them.
pub trait NodeControl {
    /// Makes the daemon run `release` from now on, and restarts `service` with it.
    fn switch(
        &mut self,
        release: &ReleaseId,
        service: Option<&str>,
    ) -> impl Future<Output = Result<(), BoxError>>;
    /// Waits until `service` is ready, then until it stayed ready (same process, no
    /// restart) for the settle period. `fail_fast`: a crash loop ends the wait at once
    /// (an upgrade); otherwise the wait lasts its whole timeout, as a rollback must end
    /// healthy if the service comes back at all.
    fn wait_healthy(
        &mut self,
        service: &str,
        fail_fast: bool,
    ) -> impl Future<Output = Result<(), BoxError>>;
    /// The last lines of the service's log.
    fn log_tail(&self, service: &str) -> Vec<String>;
}

/// What an upgrade did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Upgraded {
    pub plan: Plan,
    pub restarted: Vec<String>,
}

/// Switches `current` and the daemon to `plan.to` and restarts the changed services one
/// at a time, each healthy before the next. When one fails, `current` goes back to
/// `plan.from`, what was restarted restarts again with the old release, and the error
/// names the failing service with its last log lines. The caller holds the store lock.
pub async fn execute<N: NodeControl>(
    store: &Store,
    plan: &Plan,
    node: &mut N,
) -> Result<Upgraded, ComponentsError> {
    let from = ReleaseId::parse(&plan.from)?;
    let to = ReleaseId::parse(&plan.to)?;
    store.activate(&to)?;
    let mut restarted: Vec<String> = Vec::new();
    let mut failure = None;
    if let Err(e) = node.switch(&to, None).await {
        failure = Some(("kdist daemon".to_string(), e));
    } else {
        for service in &plan.restart {
            tracing::info!(service = %service, release = %to, "restarting with the new release");
            restarted.push(service.clone());
            let step = match node.switch(&to, Some(service)).await {
                Ok(()) => node.wait_healthy(service, true).await,
                Err(e) => Err(e),
            };
            if let Err(e) = step {
                failure = Some((service.clone(), e));
                break;
            }
        }
    }
    let Some((service, cause)) = failure else {
        return Ok(Upgraded {
            plan: plan.clone(),
            restarted,
        });
    };
    let log = node.log_tail(&service);
    tracing::warn!(service = %service, error = %cause, release = %from, "upgrade failed; rolling back");
    let rollback = rollback(store, &from, &restarted, node).await;
    Err(ComponentsError::UpgradeFailed(Box::new(UpgradeFailure {
        service,
        to: to.to_string(),
        from: from.to_string(),
        log,
        rollback: rollback.err().map(|(s, e)| format!("{s}: {e}")),
        source: cause,
    })))
}

/// Back to `from`: `current`, the daemon, then each restarted service in the same order.
/// Goes on past a service that fails again, so as much as possible runs the old release;
/// returns the first failure.
async fn rollback<N: NodeControl>(
    store: &Store,
    from: &ReleaseId,
    restarted: &[String],
    node: &mut N,
) -> Result<(), (String, BoxError)> {
    let mut first = None;
    if let Err(e) = store.activate(from) {
        first = Some(("components/current".to_string(), Box::new(e) as BoxError));
    }
    if let Err(e) = node.switch(from, None).await {
        first.get_or_insert(("kdist daemon".to_string(), e));
    }
    for service in restarted {
        let step = match node.switch(from, Some(service)).await {
            Ok(()) => node.wait_healthy(service, false).await,
            Err(e) => Err(e),
        };
        if let Err(e) = step {
            first.get_or_insert((service.clone(), e));
        }
    }
    match first {
        None => Ok(()),
        Some(f) => Err(f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::components::store::{RECORD_FILE, Record};
    use crate::config::DataDir;

    fn release(number: u32, digests: &[(&str, &str)]) -> Release {
        let (os, arch) = (host_os(), host_arch());
        let digest = |name: &str| {
            digests
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, d)| d.to_string())
                .unwrap_or_else(|| "00".into())
        };
        let asset = |name: &str, file: &str, sha: String| {
            format!(
                "    - name: {name}\n      type: Archive\n      os: {os}\n      arch: [{arch}]\n      archive:\n        uri: https://example.invalid/{file}\n        sha256: {sha}\n        sha512: ff\n"
            )
        };
        let mut text = format!(
            "apiVersion: distro.eks.amazonaws.com/v1alpha1\nkind: Release\nspec:\n  channel: 1-31\n  number: {number}\nstatus:\n  components:\n  - name: kubernetes\n    gitTag: v1.31.{number}\n    assets:\n"
        );
        for bin in super::super::manifest::KUBE_BINARIES {
            text += &asset(&format!("bin/{os}/{arch}/{bin}"), bin, digest(bin));
        }
        text += "  - name: etcd\n    gitTag: v3.5.16\n    assets:\n";
        text += &asset("etcd.tar.gz", "etcd.tar.gz", digest("etcd"));
        text += "  - name: cni-plugins\n    gitTag: v1.6.0\n    assets:\n";
        text += &asset("cni.tar.gz", "cni.tar.gz", "11".into());
        Release::parse(&text, "test").unwrap()
    }

    fn running() -> Vec<String> {
        [
            "datastore",
            "containerd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubelet",
            "kube-proxy",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn only_changed_binaries_restart_in_order() {
        let one = release(1, &[]);
        let two = release(
            2,
            &[("kubelet", "aa"), ("kube-apiserver", "bb"), ("etcd", "cc")],
        );
        let p = plan(&one, &two, &running());
        // etcd does not run here (embedded datastore); containerd is not EKS-D's
        assert_eq!(p.restart, vec!["kube-apiserver", "kubelet"]);
        assert_eq!(
            p.unchanged,
            vec![
                "kube-controller-manager",
                "kube-scheduler",
                "containerd",
                "kube-proxy"
            ]
        );
        assert_eq!(p.kubernetes_to.as_deref(), Some("v1.31.2"));
        let same = plan(&one, &release(2, &[]), &running());
        assert!(same.restart.is_empty());
    }

    /// Services that fail when asked to run a given release.
    struct Fake {
        broken: Option<(&'static str, &'static str)>,
        /// (release, service) of every switch, in order.
        calls: Vec<(String, Option<String>)>,
        running: std::collections::BTreeMap<String, String>,
        /// (service, fail_fast) of every wait.
        waits: Vec<(String, bool)>,
    }

    impl NodeControl for Fake {
        async fn switch(
            &mut self,
            release: &ReleaseId,
            service: Option<&str>,
        ) -> Result<(), BoxError> {
            self.calls
                .push((release.to_string(), service.map(str::to_string)));
            if let Some(s) = service {
                self.running.insert(s.to_string(), release.to_string());
            }
            Ok(())
        }
        async fn wait_healthy(&mut self, service: &str, fail_fast: bool) -> Result<(), BoxError> {
            self.waits.push((service.to_string(), fail_fast));
            match self.broken {
                Some((s, r))
                    if s == service && self.running.get(service).map(String::as_str) == Some(r) =>
                {
                    Err("exited at once".into())
                }
                _ => Ok(()),
            }
        }
        fn log_tail(&self, service: &str) -> Vec<String> {
            vec![format!("{service}: last words")]
        }
    }

    fn store_with(releases: &[&str]) -> (std::path::PathBuf, Store) {
        let root = std::env::temp_dir().join(format!(
            "kdist-upgrade-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let store = Store::new(&DataDir::new(&root));
        store.ensure().unwrap();
        for r in releases {
            let id = ReleaseId::parse(r).unwrap();
            let dir = store.release_dir(&id);
            std::fs::create_dir_all(&dir).unwrap();
            let record = Record {
                release: id.to_string(),
                channel: id.channel.clone(),
                number: id.number,
                os: "linux".into(),
                arch: "amd64".into(),
                manifest_sha256: String::new(),
                source: "test".into(),
                installed_at: 0,
                assets: Vec::new(),
                files: Vec::new(),
            };
            std::fs::write(dir.join(RECORD_FILE), serde_json::to_vec(&record).unwrap()).unwrap();
        }
        (root, store)
    }

    fn the_plan() -> Plan {
        Plan {
            from: "1-31-2".into(),
            to: "1-31-3".into(),
            kubernetes_from: None,
            kubernetes_to: None,
            restart: vec!["kube-apiserver".into(), "kubelet".into()],
            unchanged: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_healthy_upgrade_switches_current_and_restarts_in_order() {
        let (root, store) = store_with(&["1-31-2", "1-31-3"]);
        store
            .activate(&ReleaseId::parse("1-31-2").unwrap())
            .unwrap();
        let mut node = Fake {
            broken: None,
            calls: Vec::new(),
            running: Default::default(),
            waits: Vec::new(),
        };
        let done = execute(&store, &the_plan(), &mut node).await.unwrap();
        assert_eq!(done.restarted, vec!["kube-apiserver", "kubelet"]);
        assert_eq!(store.active().unwrap().to_string(), "1-31-3");
        let want: Vec<(String, Option<String>)> = vec![
            ("1-31-3".into(), None),
            ("1-31-3".into(), Some("kube-apiserver".into())),
            ("1-31-3".into(), Some("kubelet".into())),
        ];
        assert_eq!(node.calls, want);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn a_failing_service_rolls_everything_back_and_is_named() {
        let (root, store) = store_with(&["1-31-2", "1-31-3"]);
        store
            .activate(&ReleaseId::parse("1-31-2").unwrap())
            .unwrap();
        let mut node = Fake {
            broken: Some(("kubelet", "1-31-3")),
            calls: Vec::new(),
            running: Default::default(),
            waits: Vec::new(),
        };
        let err = execute(&store, &the_plan(), &mut node).await.unwrap_err();
        assert_eq!(store.active().unwrap().to_string(), "1-31-2");
        // both restarted services run the old release again, in the same order
        assert_eq!(node.running.get("kube-apiserver").unwrap(), "1-31-2");
        assert_eq!(node.running.get("kubelet").unwrap(), "1-31-2");
        assert_eq!(
            node.calls[3..],
            [
                ("1-31-2".to_string(), None),
                ("1-31-2".to_string(), Some("kube-apiserver".to_string())),
                ("1-31-2".to_string(), Some("kubelet".to_string())),
            ]
        );
        // the upgrade gives up on a crash loop; the rollback waits it out
        let waits: Vec<(&str, bool)> = node.waits.iter().map(|(s, f)| (s.as_str(), *f)).collect();
        assert_eq!(
            waits,
            [
                ("kube-apiserver", true),
                ("kubelet", true),
                ("kube-apiserver", false),
                ("kubelet", false)
            ]
        );
        let text = err.to_string();
        assert!(text.contains("kubelet"), "{text}");
        assert!(text.contains("back on release 1-31-2"), "{text}");
        assert!(text.contains("kubelet: last words"), "{text}");
        std::fs::remove_dir_all(root).unwrap();
    }
}
