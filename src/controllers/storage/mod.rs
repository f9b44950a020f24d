//! The node-local volume provisioner (`kdist.io/local`): StorageClasses `kdist-local`
//! (default, Delete) and `kdist-local-retain` (Retain), both `WaitForFirstConsumer`.
//!
//! Every node's daemon provisions the claims the scheduler placed on it (annotation
//! `volume.kubernetes.io/selected-node`): a directory `<storage dir>/<ns>_<claim>_<pv>`
//! and a `local` PersistentVolume pinned to the node, bound to the claim through its
//! `claimRef`. A released Delete volume loses its directory, then its PV. Control planes
//! also keep the StorageClasses and tell claims placed on a node without kdist why they
//! stay Pending. The conventions are the external provisioners': the
//! `storage-provisioner` annotation, the provisioner's finalizer on PVs, and Events on
//! the claim (`Provisioning`, `ProvisioningSucceeded`, `ProvisioningFailed`).
//!
//! Crash safety: names are derived from the claim's UID, so a run that died between the
//! directory and the PV finds both again; an empty directory whose claim and PV are both
//! gone is removed at start. Only directories under the storage dir, named as kdist names
//! them and not links, are ever removed (see [`volumes`]).

pub mod volumes;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller as Runtime};
use kube::runtime::events::{Event, EventType, Recorder, Reporter as EventReporter};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Context, Controller, ControllerError, FIELD_MANAGER, Reporter, pause};
use crate::config::Role;

/// The provisioner name in StorageClasses and on the objects it makes.
pub const PROVISIONER: &str = "kdist.io/local";
pub const DEFAULT_CLASS: &str = "kdist-local";
pub const RETAIN_CLASS: &str = "kdist-local-retain";
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
const STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
const STORAGE_PROVISIONER_BETA: &str = "volume.beta.kubernetes.io/storage-provisioner";
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
const FINALIZER: &str = "external-provisioner.volume.kubernetes.io/finalizer";
/// On a PV: the node and directory it was provisioned on (the record removal checks).
const VOLUME_NODE: &str = "storage.kdist.io/node";
const VOLUME_PATH: &str = "storage.kdist.io/path";
/// On a Node: this node provisions local volumes, into this directory.
const NODE_STORAGE_DIR: &str = "storage.kdist.io/dir";
/// How often the status line (free space, volumes) is refreshed.
const STATUS_INTERVAL: Duration = Duration::from_secs(30);
/// Test hook: `KDIST_TEST_PAUSE_AT=<point>:<marker file>` makes the provisioner write the
/// marker and stop at that point forever, so a test can kill the daemon exactly there.
const PAUSE_ENV: &str = "KDIST_TEST_PAUSE_AT";

pub struct Storage;

impl Controller for Storage {
    fn name(&self) -> &'static str {
        "storage"
    }

    fn run(
        self: Arc<Self>,
        ctx: Context,
        reporter: Reporter,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), ControllerError>> {
        Box::pin(run(ctx, reporter, shutdown))
    }
}

/// What the reconcilers share.
struct Provisioner {
    client: kube::Client,
    node: String,
    control_plane: bool,
    storage_dir: PathBuf,
    events: Recorder,
    /// Wakes the status line when a volume came or went.
    changed: tokio::sync::Notify,
}

async fn run(
    ctx: Context,
    reporter: Reporter,
    shutdown: CancellationToken,
) -> Result<(), ControllerError> {
    let control_plane = ctx.config.role != Role::Worker;
    let enabled = super::addons::enabled(&ctx, "storage").await?;
    if !enabled {
        if control_plane {
            remove_classes(&ctx.client).await?;
        }
        reporter.ready("off: `kdist addons enable storage` turns it on");
        return watch_toggle(&ctx, false, &shutdown).await;
    }
    let wanted = ctx.config.storage.dir(&ctx.data);
    let storage_dir = blocking(move || volumes::ensure_storage_dir(&wanted)).await?;
    let node = ctx.config.node_name();
    let provisioner = Arc::new(Provisioner {
        events: Recorder::new(
            ctx.client.clone(),
            EventReporter {
                controller: PROVISIONER.into(),
                instance: Some(node.clone()),
            },
        ),
        client: ctx.client.clone(),
        node,
        control_plane,
        storage_dir,
        changed: tokio::sync::Notify::new(),
    });
    reporter.progressing(format!("waiting for node {} to register", provisioner.node));
    provisioner.announce(&shutdown).await?;
    provisioner.collect_orphans().await?;

    // the reconcilers stop at shutdown, or when the storage addon is turned off
    let stop_all = shutdown.child_token();
    let classes = control_plane.then(|| {
        let (client, apiserver, stop) =
            (ctx.client.clone(), ctx.apiserver.clone(), stop_all.clone());
        tokio::spawn(keep_classes(client, apiserver, stop))
    });
    let claims = {
        let p = provisioner.clone();
        let stop = stop_all.clone();
        Runtime::new(
            Api::<PersistentVolumeClaim>::all(ctx.client.clone()),
            watcher::Config::default(),
        )
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile_claim, requeue_after_error, p)
        .for_each(|_| async {})
    };
    let pvs = {
        let p = provisioner.clone();
        let stop = stop_all.clone();
        Runtime::new(
            Api::<PersistentVolume>::all(ctx.client.clone()),
            watcher::Config::default(),
        )
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile_volume, requeue_after_error, p)
        .for_each(|_| async {})
    };
    let status = provisioner.clone().report(reporter, stop_all.clone());
    let toggle = async {
        let result = watch_toggle(&ctx, true, &shutdown).await;
        // turned off: stop the reconcilers, then start again in the new state
        stop_all.cancel();
        result
    };
    let (_, _, _, toggled) = tokio::join!(claims, pvs, status, toggle);
    if let Some(task) = classes {
        match task.await {
            Ok(result) => result?,
            Err(source) => {
                return Err(ControllerError::Task {
                    controller: "storage",
                    source,
                });
            }
        }
    }
    toggled
}

/// How often the storage addon's switch is looked at.
const TOGGLE_CHECK: Duration = Duration::from_secs(15);

/// Returns `Ok(())` at shutdown, and an error (so the host starts the controller again in
/// the new state) once the storage addon is no longer `enabled`.
async fn watch_toggle(
    ctx: &Context,
    enabled: bool,
    shutdown: &CancellationToken,
) -> Result<(), ControllerError> {
    loop {
        if !pause(TOGGLE_CHECK, shutdown).await {
            return Ok(());
        }
        match super::addons::enabled(ctx, "storage").await {
            Ok(now) if now != enabled => {
                return Err(ControllerError::Toggled { addon: "storage" });
            }
            Ok(_) => {}
            Err(e) => warn!(
                "storage: cannot read the addon switch: {}",
                crate::report::error_chain(&e)
            ),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, volumes::VolumeError> + Send + 'static,
) -> Result<T, ControllerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| ControllerError::Task {
            controller: "storage",
            source,
        })?
        .map_err(|e| ControllerError::Other(Box::new(e)))
}

/// The StorageClasses, as applied.
fn classes() -> Vec<StorageClass> {
    [
        (DEFAULT_CLASS, "Delete", true),
        (RETAIN_CLASS, "Retain", false),
    ]
    .into_iter()
    .map(|(name, reclaim, default)| {
        let value = json!({
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": name,
                "labels": {"app.kubernetes.io/managed-by": "kdist"},
                "annotations": {
                    "storageclass.kubernetes.io/is-default-class": default.to_string(),
                },
            },
            "provisioner": PROVISIONER,
            "reclaimPolicy": reclaim,
            "volumeBindingMode": "WaitForFirstConsumer",
            "allowVolumeExpansion": true,
        });
        // the literal above is a valid StorageClass: it cannot fail to convert
        serde_json::from_value(value).unwrap_or_default()
    })
    .collect()
}

/// Applies the StorageClasses every time the apiserver becomes ready. Their fields are
/// immutable but for the annotations: a class somebody made with another
/// provisioner under the same name is refused by the apiserver, and that error shows
/// in `kdist status`.
async fn keep_classes(
    client: kube::Client,
    apiserver: tokio::sync::watch::Receiver<super::Apiserver>,
    shutdown: CancellationToken,
) -> Result<(), ControllerError> {
    let api = Api::<StorageClass>::all(client);
    super::on_every_ready(apiserver, &shutdown, || async {
        for class in classes() {
            let name = class.name_any();
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&class),
            )
            .await
            .map_err(|e| ControllerError::api(format!("applying StorageClass {name}"), e))?;
        }
        Ok(())
    })
    .await
}

/// Deletes kdist's StorageClasses (storage turned off).
async fn remove_classes(client: &kube::Client) -> Result<(), ControllerError> {
    let api = Api::<StorageClass>::all(client.clone());
    for name in [DEFAULT_CLASS, RETAIN_CLASS] {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => info!(class = name, "StorageClass removed: storage is off"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                return Err(ControllerError::api(
                    format!("deleting StorageClass {name}"),
                    e,
                ));
            }
        }
    }
    Ok(())
}

fn requeue_after_error(
    _object: Arc<impl Resource>,
    error: &ControllerError,
    _p: Arc<Provisioner>,
) -> Action {
    warn!("storage: {}", crate::report::error_chain(error));
    Action::requeue(Duration::from_secs(10))
}

/// Bytes in a Kubernetes quantity such as `1Gi`, `500M` or `1073741824`.
pub fn quantity_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let factor: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        _ => return None,
    };
    let value: f64 = number.parse().ok()?;
    let bytes = (value * factor).ceil();
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Why this provisioner cannot serve `claim`, if it cannot.
fn unsupported(claim: &PersistentVolumeClaim) -> Option<String> {
    let spec = claim.spec.as_ref()?;
    if spec.volume_mode.as_deref() == Some("Block") {
        return Some(
            "block volumes are not supported by kdist.io/local: use volumeMode: Filesystem".into(),
        );
    }
    let modes = spec.access_modes.clone().unwrap_or_default();
    if modes.iter().any(|m| m == "ReadWriteMany") {
        return Some(
            "ReadWriteMany is not supported: a node-local volume is on one node; use ReadWriteOnce"
                .into(),
        );
    }
    if spec.selector.is_some() {
        return Some("claims with a selector cannot be provisioned dynamically".into());
    }
    if spec.data_source.is_some() || spec.data_source_ref.is_some() {
        return Some("volume cloning and snapshots (dataSource) are not supported".into());
    }
    None
}

fn requested(claim: &PersistentVolumeClaim) -> Option<(String, u64)> {
    let quantity = claim
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")?
        .0
        .clone();
    let bytes = quantity_bytes(&quantity)?;
    Some((quantity, bytes))
}

impl Provisioner {
    async fn event(
        &self,
        claim: &PersistentVolumeClaim,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Provision".into(),
            secondary: None,
        };
        if let Err(e) = self.events.publish(&event, &claim.object_ref(&())).await {
            warn!(claim = %claim.name_any(), "cannot record event {reason}: {e}");
        }
    }

    /// Marks this node's Node as one that provisions local volumes (control planes tell
    /// claims placed on other nodes why they stay Pending). Waits for kubelet to register it.
    async fn announce(&self, shutdown: &CancellationToken) -> Result<(), ControllerError> {
        let nodes = Api::<Node>::all(self.client.clone());
        let patch = json!({"metadata": {"annotations": {
            NODE_STORAGE_DIR: self.storage_dir.display().to_string(),
        }}});
        loop {
            match nodes
                .patch(&self.node, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    if !pause(Duration::from_secs(2), shutdown).await {
                        return Ok(());
                    }
                }
                Err(e) => {
                    return Err(ControllerError::api(
                        format!("annotating node {}", self.node),
                        e,
                    ));
                }
            }
        }
    }

    /// Removes empty volume directories whose PV and claim are both gone: what a run
    /// that died between the directory and the PV leaves when the claim went away
    /// meanwhile. A directory with data (a Retain volume whose PV was deleted) stays.
    async fn collect_orphans(&self) -> Result<(), ControllerError> {
        let dir = self.storage_dir.clone();
        let found = blocking(move || volumes::list(&dir)).await?;
        let pvs = Api::<PersistentVolume>::all(self.client.clone());
        for (name, path) in found {
            let Some((ns, claim, pv)) = volumes::volume_of(&name) else {
                continue;
            };
            if pvs
                .get_opt(pv)
                .await
                .map_err(|e| ControllerError::api(format!("reading PV {pv}"), e))?
                .is_some()
            {
                continue;
            }
            let claims = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), ns);
            let pending = claims
                .get_opt(claim)
                .await
                .map_err(|e| ControllerError::api(format!("reading claim {ns}/{claim}"), e))?
                .is_some_and(|c| volume_name(&c) == pv);
            if pending {
                continue;
            }
            let empty = std::fs::read_dir(&path).is_ok_and(|mut d| d.next().is_none());
            if !empty {
                continue;
            }
            let (storage, target) = (self.storage_dir.clone(), path.clone());
            if blocking(move || volumes::remove(&storage, &target)).await? {
                info!(path = %path.display(), "removed an orphan volume directory");
            }
        }
        Ok(())
    }

    /// Refreshes the status line: storage dir, free space, volumes.
    async fn report(self: Arc<Self>, reporter: Reporter, shutdown: CancellationToken) {
        loop {
            let dir = self.storage_dir.clone();
            let line = blocking(move || {
                let free = volumes::free_bytes(&dir)?;
                let count = volumes::list(&dir)?.len();
                Ok((free, count))
            })
            .await;
            match line {
                Ok((free, count)) => reporter.ready(format!(
                    "{}: {:.1} GiB free, {count} volume(s)",
                    self.storage_dir.display(),
                    free as f64 / (1u64 << 30) as f64
                )),
                Err(e) => reporter.progressing(crate::report::error_chain(&e)),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(STATUS_INTERVAL) => {}
                _ = self.changed.notified() => {}
            }
        }
    }

    fn path_of(
        &self,
        namespace: &str,
        claim: &str,
        pv: &str,
    ) -> Result<PathBuf, volumes::VolumeError> {
        Ok(self
            .storage_dir
            .join(volumes::dir_name(namespace, claim, pv)?))
    }
}

/// The PV name a claim's volume gets: derived from its UID, so a retry finds it again.
fn volume_name(claim: &PersistentVolumeClaim) -> String {
    format!("pvc-{}", claim.metadata.uid.as_deref().unwrap_or_default())
}

fn ours(annotations: &BTreeMap<String, String>) -> bool {
    annotations
        .get(STORAGE_PROVISIONER)
        .or_else(|| annotations.get(STORAGE_PROVISIONER_BETA))
        .is_some_and(|p| p == PROVISIONER)
}

/// Test hook, see [`PAUSE_ENV`].
async fn pause_point(point: &str) {
    let Ok(spec) = std::env::var(PAUSE_ENV) else {
        return;
    };
    let Some((at, marker)) = spec.split_once(':') else {
        return;
    };
    if at == point {
        let _ = std::fs::write(marker, point);
        warn!("{PAUSE_ENV}: stopped at {point}");
        std::future::pending::<()>().await;
    }
}

async fn reconcile_claim(
    claim: Arc<PersistentVolumeClaim>,
    p: Arc<Provisioner>,
) -> Result<Action, ControllerError> {
    if !ours(claim.annotations()) || claim.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let bound_to = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|v| !v.is_empty());
    if let Some(pv) = bound_to {
        return p.expand(&claim, &pv).await;
    }
    let Some(node) = claim.annotations().get(SELECTED_NODE).cloned() else {
        return Ok(Action::await_change());
    };
    if node != p.node {
        if p.control_plane {
            return p.check_placement(&claim, &node).await;
        }
        return Ok(Action::await_change());
    }
    if let Some(reason) = unsupported(&claim) {
        p.event(&claim, EventType::Warning, "ProvisioningFailed", reason)
            .await;
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    p.provision(&claim).await
}

impl Provisioner {
    /// Tells a claim placed on a node that does not run kdist why it stays Pending.
    async fn check_placement(
        &self,
        claim: &PersistentVolumeClaim,
        node: &str,
    ) -> Result<Action, ControllerError> {
        let nodes = Api::<Node>::all(self.client.clone());
        let runs_kdist = nodes
            .get_opt(node)
            .await
            .map_err(|e| ControllerError::api(format!("reading node {node}"), e))?
            .is_some_and(|n| n.annotations().contains_key(NODE_STORAGE_DIR));
        if !runs_kdist {
            self.event(
                claim,
                EventType::Warning,
                "ProvisioningFailed",
                format!(
                    "node {node} does not run kdist's local volume provisioner: run the pod on a \
                     kdist node, or use another StorageClass"
                ),
            )
            .await;
        }
        Ok(Action::requeue(Duration::from_secs(60)))
    }

    async fn provision(&self, claim: &PersistentVolumeClaim) -> Result<Action, ControllerError> {
        let namespace = claim.namespace().unwrap_or_default();
        let name = claim.name_any();
        let pv = volume_name(claim);
        let Some((quantity, bytes)) = requested(claim) else {
            self.event(
                claim,
                EventType::Warning,
                "ProvisioningFailed",
                "the claim requests no storage size (spec.resources.requests.storage)".into(),
            )
            .await;
            return Ok(Action::requeue(Duration::from_secs(300)));
        };
        let path = match self.path_of(&namespace, &name, &pv) {
            Ok(path) => path,
            Err(e) => {
                self.event(
                    claim,
                    EventType::Warning,
                    "ProvisioningFailed",
                    e.to_string(),
                )
                .await;
                return Ok(Action::requeue(Duration::from_secs(300)));
            }
        };
        let class_name = claim
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .unwrap_or_else(|| DEFAULT_CLASS.into());
        let class = Api::<StorageClass>::all(self.client.clone())
            .get(&class_name)
            .await
            .map_err(|e| ControllerError::api(format!("reading StorageClass {class_name}"), e))?;
        let reclaim = class.reclaim_policy.unwrap_or_else(|| "Delete".into());
        self.event(
            claim,
            EventType::Normal,
            "Provisioning",
            format!("External provisioner is provisioning volume for claim \"{namespace}/{name}\""),
        )
        .await;

        let storage = self.storage_dir.clone();
        let dir_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let created =
            tokio::task::spawn_blocking(move || volumes::create_for(&storage, &dir_name, bytes))
                .await
                .map_err(|source| ControllerError::Task {
                    controller: "storage",
                    source,
                })?;
        if let Err(e) = created {
            let reason = crate::report::error_chain(&e);
            self.event(claim, EventType::Warning, "ProvisioningFailed", reason)
                .await;
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
        pause_point("storage-after-dir").await;

        let volume = self.volume(claim, &pv, &path, &quantity, &class_name, &reclaim);
        let pvs = Api::<PersistentVolume>::all(self.client.clone());
        match pvs.create(&PostParams::default(), &volume).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let existing = pvs
                    .get(&pv)
                    .await
                    .map_err(|e| ControllerError::api(format!("reading PV {pv}"), e))?;
                let claim_uid = existing
                    .spec
                    .as_ref()
                    .and_then(|s| s.claim_ref.as_ref())
                    .and_then(|r| r.uid.clone());
                if claim_uid != claim.metadata.uid {
                    self.event(
                        claim,
                        EventType::Warning,
                        "ProvisioningFailed",
                        format!("a PersistentVolume {pv} exists and belongs to another claim"),
                    )
                    .await;
                    return Ok(Action::requeue(Duration::from_secs(300)));
                }
            }
            Err(e) => return Err(ControllerError::api(format!("creating PV {pv}"), e)),
        }
        self.changed.notify_one();
        pause_point("storage-after-pv").await;
        info!(claim = %format!("{namespace}/{name}"), volume = %pv, path = %path.display(), "volume provisioned");
        self.event(
            claim,
            EventType::Normal,
            "ProvisioningSucceeded",
            format!(
                "Successfully provisioned volume {pv} on node {} at {}",
                self.node,
                path.display()
            ),
        )
        .await;
        Ok(Action::await_change())
    }

    fn volume(
        &self,
        claim: &PersistentVolumeClaim,
        pv: &str,
        path: &Path,
        quantity: &str,
        class: &str,
        reclaim: &str,
    ) -> PersistentVolume {
        let modes = claim
            .spec
            .as_ref()
            .and_then(|s| s.access_modes.clone())
            .unwrap_or_else(|| vec!["ReadWriteOnce".into()]);
        let value = json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": pv,
                "labels": {"app.kubernetes.io/managed-by": "kdist"},
                "annotations": {
                    PROVISIONED_BY: PROVISIONER,
                    VOLUME_NODE: self.node,
                    VOLUME_PATH: path.display().to_string(),
                },
                "finalizers": [FINALIZER],
            },
            "spec": {
                "capacity": {"storage": quantity},
                "accessModes": modes,
                "volumeMode": "Filesystem",
                "persistentVolumeReclaimPolicy": reclaim,
                "storageClassName": class,
                "local": {"path": path.display().to_string()},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": claim.namespace(),
                    "name": claim.name_any(),
                    "uid": claim.metadata.uid,
                    "resourceVersion": claim.metadata.resource_version,
                },
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{
                    "matchExpressions": [{
                        "key": "kubernetes.io/hostname",
                        "operator": "In",
                        "values": [self.node],
                    }],
                }]}},
            },
        });
        // built from strings and the claim's own fields: a valid PersistentVolume
        serde_json::from_value(value).unwrap_or_default()
    }

    /// A bound claim that asks for more than its volume has: a directory has no quota,
    /// so the volume grows at once (PV capacity, then the claim's status).
    async fn expand(
        &self,
        claim: &PersistentVolumeClaim,
        pv: &str,
    ) -> Result<Action, ControllerError> {
        let Some((quantity, bytes)) = requested(claim) else {
            return Ok(Action::await_change());
        };
        let pvs = Api::<PersistentVolume>::all(self.client.clone());
        let Some(volume) = pvs
            .get_opt(pv)
            .await
            .map_err(|e| ControllerError::api(format!("reading PV {pv}"), e))?
        else {
            return Ok(Action::await_change());
        };
        if volume.annotations().get(VOLUME_NODE) != Some(&self.node) {
            return Ok(Action::await_change());
        }
        let has = volume
            .spec
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get("storage"))
            .and_then(|q| quantity_bytes(&q.0))
            .unwrap_or(0);
        let status_has = claim
            .status
            .as_ref()
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get("storage"))
            .and_then(|q| quantity_bytes(&q.0))
            .unwrap_or(0);
        if has >= bytes && status_has >= bytes {
            return Ok(Action::await_change());
        }
        let capacity = json!({"spec": {"capacity": {"storage": quantity}}});
        pvs.patch(pv, &PatchParams::default(), &Patch::Merge(&capacity))
            .await
            .map_err(|e| ControllerError::api(format!("resizing PV {pv}"), e))?;
        let namespace = claim.namespace().unwrap_or_default();
        let claims = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &namespace);
        let status = json!({"status": {"capacity": {"storage": quantity}}});
        claims
            .patch_status(
                &claim.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
            .map_err(|e| {
                ControllerError::api(
                    format!("resizing claim {namespace}/{}", claim.name_any()),
                    e,
                )
            })?;
        info!(volume = pv, size = %quantity, "volume expanded");
        Ok(Action::await_change())
    }
}

async fn reconcile_volume(
    volume: Arc<PersistentVolume>,
    p: Arc<Provisioner>,
) -> Result<Action, ControllerError> {
    let annotations = volume.annotations();
    if annotations.get(PROVISIONED_BY).map(String::as_str) != Some(PROVISIONER)
        || annotations.get(VOLUME_NODE) != Some(&p.node)
    {
        return Ok(Action::await_change());
    }
    let spec = volume.spec.clone().unwrap_or_default();
    let reclaim = spec.persistent_volume_reclaim_policy.unwrap_or_default();
    let released = volume
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Released" || phase == "Failed");
    let deleting = volume.metadata.deletion_timestamp.is_some();
    if !(deleting || (released && reclaim == "Delete")) {
        return Ok(Action::await_change());
    }
    let name = volume.name_any();
    let pvs = Api::<PersistentVolume>::all(p.client.clone());
    if reclaim == "Delete" {
        // the record must name the directory kdist made for this claim and volume
        let claim = spec.claim_ref.unwrap_or_default();
        let expected = p.path_of(
            claim.namespace.as_deref().unwrap_or_default(),
            claim.name.as_deref().unwrap_or_default(),
            &name,
        );
        let recorded = annotations.get(VOLUME_PATH).map(PathBuf::from);
        let local = spec.local.map(|l| PathBuf::from(l.path));
        match expected {
            Ok(path) if recorded.as_ref() == Some(&path) && local.as_ref() == Some(&path) => {
                let storage = p.storage_dir.clone();
                let target = path.clone();
                if blocking(move || volumes::remove(&storage, &target)).await? {
                    info!(volume = %name, path = %path.display(), "volume directory removed");
                    p.changed.notify_one();
                }
            }
            _ => {
                warn!(volume = %name, "its record does not match the directory kdist would have made: the directory is kept");
                return Ok(Action::requeue(Duration::from_secs(300)));
            }
        }
    }
    let finalizers: Vec<String> = volume
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if finalizers.len() != volume.finalizers().len() {
        let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": volume.resource_version()}});
        pvs.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| ControllerError::api(format!("removing the finalizer of PV {name}"), e))?;
    }
    if !deleting {
        match pvs.delete(&name, &DeleteParams::default()).await {
            Ok(_) => info!(volume = %name, "released volume deleted"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(ControllerError::api(format!("deleting PV {name}"), e)),
        }
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_in_bytes() {
        assert_eq!(quantity_bytes("1Gi"), Some(1 << 30));
        assert_eq!(quantity_bytes("500M"), Some(500_000_000));
        assert_eq!(quantity_bytes("1.5Ki"), Some(1536));
        assert_eq!(quantity_bytes("42"), Some(42));
        assert_eq!(quantity_bytes("1Qi"), None);
        assert_eq!(quantity_bytes("Gi"), None);
    }

    #[test]
    fn classes_are_the_default_delete_one_and_a_retain_one() {
        let classes = classes();
        assert_eq!(classes.len(), 2);
        assert_eq!(classes[0].name_any(), DEFAULT_CLASS);
        assert_eq!(classes[0].reclaim_policy.as_deref(), Some("Delete"));
        assert_eq!(
            classes[0].annotations()["storageclass.kubernetes.io/is-default-class"],
            "true"
        );
        assert_eq!(classes[1].reclaim_policy.as_deref(), Some("Retain"));
        assert_eq!(
            classes[1].volume_binding_mode.as_deref(),
            Some("WaitForFirstConsumer")
        );
        assert_eq!(classes[1].allow_volume_expansion, Some(true));
    }

    #[test]
    fn unsupported_claims_say_why() {
        let claim = |modes: &[&str], mode: Option<&str>| {
            serde_json::from_value::<PersistentVolumeClaim>(json!({
                "metadata": {"name": "c"},
                "spec": {"accessModes": modes, "volumeMode": mode},
            }))
            .unwrap()
        };
        assert!(unsupported(&claim(&["ReadWriteOnce"], None)).is_none());
        assert!(
            unsupported(&claim(&["ReadWriteMany"], None))
                .unwrap()
                .contains("ReadWriteMany")
        );
        assert!(
            unsupported(&claim(&["ReadWriteOnce"], Some("Block")))
                .unwrap()
                .contains("block")
        );
    }
}
