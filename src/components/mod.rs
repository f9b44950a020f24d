//! EKS-D components: installs the binaries of an EKS Distro release (kube-apiserver,
//! kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl, etcd, etcdctl
//! and the CNI plugins) from its `Release` manifest into `<data>/components/<release>/`,
//! verified by sha256 and sha512, and switches `<data>/components/current` atomically.
//! Sources are EKS-D (or a mirror), a local directory or bundle (air gap), or a bundle
//! embedded into kdist at build time.
//!
//! It owns `<data>/components/` and nothing else: it never starts or stops services.
//! [`resolve_binary`] finds a program at `components/current/bin/<name>`, then on PATH,
//! for the supervisor, the node and the cluster commands.

mod bundle;
mod embed;
mod error;
mod fetch;
mod install;
mod manifest;
mod outdated;
mod progress;
mod resolve;
mod store;
mod upgrade;
mod versions;

pub use error::{BoxError, ComponentsError};
pub use fetch::RetryPolicy;
pub use install::{Outcome, Request, Source, install, retry_with};
pub use manifest::{Release, ReleaseId, binaries, host_arch, host_os};
pub use outdated::{Outdated, VersionChange, compare, fetch_release, latest_number, outdated};
pub use progress::Progress;
pub use resolve::{BinaryNotFound, Origin, active_release, resolve_binary, resolve_binary_in};
pub use store::{MANIFEST_FILE, Record, Store};
pub use upgrade::{
    NodeControl, Plan as UpgradePlan, RESTART_ORDER, Upgraded, execute as execute_upgrade,
    plan as upgrade_plan,
};
pub use versions::{ComponentVersion, ORIGIN_PATH, component_versions, find_on_path};

use std::path::Path;

use crate::config::{ComponentsConfig, DataDir};
use crate::report::error_chain;

/// Writes release `id` (or the active one) as an air-gap bundle, with the image
/// archives (`*.tar`) of `images` when given; returns its size.
pub async fn write_bundle(
    data: &DataDir,
    id: Option<ReleaseId>,
    out: &Path,
    images: Option<&Path>,
) -> Result<(ReleaseId, u64), ComponentsError> {
    let images = match images {
        Some(dir) => bundle::image_archives(dir)?,
        None => Vec::new(),
    };
    let store = Store::new(data);
    let id = match id {
        Some(id) => id,
        None => store.active().ok_or_else(|| ComponentsError::NoActive {
            path: store.current_link(),
        })?,
    };
    let out = out.to_path_buf();
    let owned = id.clone();
    let size = tokio::task::spawn_blocking(move || bundle::create(&store, &owned, &out, &images))
        .await
        .map_err(|source| ComponentsError::Task {
            path: data.components_dir(),
            source,
        })??;
    Ok((id, size))
}

/// What `kdist start` found or did about components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartComponents {
    /// A release was active already.
    Active(ReleaseId),
    /// A release was installed now (from EKS-D or from the embedded bundle).
    Installed(ReleaseId),
    /// Auto-install is off and nothing is installed: binaries come from PATH.
    Skipped,
    /// The install failed; every needed binary is on PATH and is used instead.
    PathFallback,
}

/// Called by `kdist start` before the daemon is spawned: installs embedded components
/// when they are new, else the configured release when none is active. When that
/// install fails (no network) and every binary in `needed` is on PATH, it warns and
/// lets the start go on with those (the supervisor shows them as `PATH (fallback)`).
pub async fn prepare_for_start(
    data: &DataDir,
    config: &ComponentsConfig,
    needed: &[String],
) -> Result<StartComponents, ComponentsError> {
    let progress = Progress::detect();
    if let Some(bundle) = embed::bundle()
        && let Some(outcome) = embed::sync(data, bundle, config, &progress).await?
    {
        return Ok(StartComponents::Installed(outcome.id));
    }
    let store = Store::new(data);
    if let Some(id) = store.active() {
        return Ok(StartComponents::Active(id));
    }
    if !config.auto_install {
        return Ok(StartComponents::Skipped);
    }
    let mut request = Request::from_config(config);
    // a node without network should not wait long before falling back
    request.retry = retry_with(3);
    match install(data, &request, &progress).await {
        Ok(outcome) => Ok(StartComponents::Installed(outcome.id)),
        Err(error) => {
            let missing: Vec<String> = needed
                .iter()
                .filter(|name| find_on_path(name).is_none())
                .cloned()
                .collect();
            let what = format!("channel {} release {}", config.channel, config.release);
            if !missing.is_empty() {
                return Err(ComponentsError::NoFallback {
                    what,
                    missing,
                    source: Box::new(error),
                });
            }
            let found: Vec<String> = needed
                .iter()
                .filter_map(|n| find_on_path(n).map(|p| format!("{n}={}", p.display())))
                .collect();
            tracing::debug!(error = %error, "EKS-D components could not be installed");
            progress.line(&format!(
                "warning: cannot install EKS-D {what}: {}\nwarning: using binaries from PATH as a fallback ({}); they are not EKS-D builds. Run `kdist components install` when the network is back, or set components.auto_install: false to silence this",
                error_chain(&error),
                found.join(", ")
            ));
            Ok(StartComponents::PathFallback)
        }
    }
}
