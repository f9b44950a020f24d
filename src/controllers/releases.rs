//! The EKS-D release each node runs, visible in the cluster.
//!
//! Every node annotates its own Node with `kdist.io/release: <release name>` (a worker
//! through its kubelet's identity: NodeRestriction lets a node patch its own Node). On
//! control planes the controller also applies EKS-D's `Release` and `ReleaseChannel`
//! CRDs (`addons/eks-release/`) and keeps, in namespace `default`, the active release's
//! manifest as published and its channel, so `kubectl get releases` shows what the
//! cluster runs; Release and ReleaseChannel objects no Node names any more are pruned.
//! It labels control-plane Nodes `node-role.kubernetes.io/control-plane` and publishes
//! every node's release for the NODES section of `kdist status`.
//!
//! It reads `<data>/components/` and never changes it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use super::addons::MANAGED_BY;
use super::apply::ObjectKey;
use super::{Applier, Context, Controller, ControllerError, Reporter, pause};
use crate::components::{ReleaseId, Store};
use crate::config::{DataDir, Role};
use crate::report::error_chain;

/// The annotation naming the EKS-D release a node runs, e.g. `kubernetes-1-28-eks-5`.
pub const RELEASE_ANNOTATION: &str = "kdist.io/release";
/// The label kubeadm gives control-plane Nodes (`kubectl get nodes` shows it as ROLES).
pub const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";
/// Where the Release and ReleaseChannel objects live: plain `kubectl get releases`
/// finds them.
pub const NAMESPACE: &str = "default";
const GROUP: &str = "distro.eks.amazonaws.com";
const VERSION: &str = "v1alpha1";
const API_VERSION: &str = "distro.eks.amazonaws.com/v1alpha1";

const CRDS: &[(&str, &str)] = &[
    (
        "releases.distro.eks.amazonaws.com",
        include_str!("../../addons/eks-release/releases.distro.eks.amazonaws.com.yaml"),
    ),
    (
        "releasechannels.distro.eks.amazonaws.com",
        include_str!("../../addons/eks-release/releasechannels.distro.eks.amazonaws.com.yaml"),
    ),
];

/// How often the `current` link and the cluster's Nodes are looked at.
const TICK: Duration = Duration::from_secs(5);
/// How often the objects are applied again though nothing seems changed.
const RESYNC: Duration = Duration::from_secs(60);
/// How long new CRDs may take to be Established and served.
const CRD_TIMEOUT: Duration = Duration::from_secs(60);

/// One line of `kdist status`' NODES section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRelease {
    pub name: String,
    pub control_plane: bool,
    pub ready: bool,
    /// The kubelet's version as the Node reports it.
    #[serde(default)]
    pub kubelet: Option<String>,
    /// The `kdist.io/release` annotation: none on a node whose kdist does not set it
    /// (or that runs binaries from PATH).
    #[serde(default)]
    pub release: Option<String>,
}

/// The `releases` controller; `nodes()` is what it last saw of the cluster's Nodes (on
/// control planes).
#[derive(Default)]
pub struct Releases {
    nodes: watch::Sender<Vec<NodeRelease>>,
}

impl Releases {
    pub fn nodes(&self) -> Vec<NodeRelease> {
        self.nodes.borrow().clone()
    }
}

/// The release this node runs, read from `<data>/components/current`.
#[derive(Debug, Clone, PartialEq)]
struct Active {
    id: ReleaseId,
    /// The manifest's `metadata.name` (EKS-D's `kubernetes-<ch>-eks-<N>`).
    name: String,
    release: DynamicObject,
}

/// What a pass reads from the data dir (off the async workers).
struct Local {
    active: Option<Active>,
    /// The channel object kdist shows for the active release's channel.
    channel: Option<DynamicObject>,
    /// Release objects of installed releases, by name, for releases other nodes run.
    installed: BTreeMap<String, DynamicObject>,
}

/// What `Local` is made of: while none of it changes, the manifests are not read and
/// parsed again (the controller looks every few seconds).
#[derive(Debug, Clone, PartialEq)]
struct LocalKey {
    active: Option<ReleaseId>,
    installed: Vec<ReleaseId>,
    others: BTreeSet<String>,
    channel_saved: Option<std::time::SystemTime>,
}

impl LocalKey {
    fn read(data: &DataDir, others: &BTreeSet<String>) -> Self {
        let store = Store::new(data);
        let active = store.active();
        let channel_saved = active.as_ref().and_then(|id| {
            std::fs::metadata(store.channel_file(&id.channel))
                .and_then(|m| m.modified())
                .ok()
        });
        Self {
            active,
            installed: store.installed(),
            others: others.clone(),
            channel_saved,
        }
    }
}

/// `Local` for `others`, from `cached` when what it was made of is unchanged.
fn read_local_cached(
    data: &DataDir,
    others: &BTreeSet<String>,
    cached: Option<(LocalKey, Arc<Local>)>,
) -> Result<(LocalKey, Arc<Local>), ControllerError> {
    let key = LocalKey::read(data, others);
    match cached {
        Some((was, local)) if was == key => Ok((was, local)),
        _ => Ok((key, Arc::new(read_local(data, others)?))),
    }
}

fn read_local(data: &DataDir, others: &BTreeSet<String>) -> Result<Local, ControllerError> {
    let store = Store::new(data);
    let read = |id: &ReleaseId| -> Result<(String, DynamicObject), ControllerError> {
        let path = store.release_dir(id).join(crate::components::MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ControllerError::Io {
            path: path.clone(),
            source,
        })?;
        let object = release_object(&text, &path.display().to_string())?;
        let name = object
            .metadata
            .name
            .clone()
            .unwrap_or_else(|| id.eks_name());
        Ok((name, object))
    };
    let active = match store.active() {
        Some(id) => {
            let (name, release) = read(&id)?;
            Some(Active { id, name, release })
        }
        None => None,
    };
    let channel = match &active {
        Some(active) => {
            let channel = &active.id.channel;
            let known = store
                .installed()
                .iter()
                .filter(|id| &id.channel == channel)
                .map(|id| id.number)
                .max()
                .unwrap_or(active.id.number);
            let origin = store.channel_file(channel);
            Some(channel_object(
                channel,
                store.saved_channel(channel).as_deref(),
                &origin.display().to_string(),
                known,
            )?)
        }
        None => None,
    };
    let mut installed = BTreeMap::new();
    for name in others {
        let Ok(id) = ReleaseId::parse(name) else {
            continue;
        };
        if store.record(&id).is_ok()
            && let Ok((found, object)) = read(&id)
            && &found == name
        {
            installed.insert(found, object);
        }
    }
    Ok(Local {
        active,
        channel,
        installed,
    })
}

/// The labels and namespace every object kdist shows here carries, and no
/// `creationTimestamp: null` (as EKS-D's tooling writes it), which apply refuses.
fn own(object: &mut Value) {
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        if metadata
            .get("creationTimestamp")
            .is_some_and(Value::is_null)
        {
            metadata.remove("creationTimestamp");
        }
        metadata.insert("namespace".into(), Value::String(NAMESPACE.into()));
        let labels = metadata
            .entry("labels")
            .or_insert_with(|| Value::Object(Default::default()));
        if !labels.is_object() {
            *labels = Value::Object(Default::default());
        }
        if let Some(labels) = labels.as_object_mut() {
            labels.insert(MANAGED_BY.0.into(), Value::String(MANAGED_BY.1.into()));
        }
    }
}

fn parse_document(text: &str, origin: &str, kind: &str) -> Result<Value, ControllerError> {
    let bad = |reason: String| ControllerError::Manifest {
        origin: origin.to_string(),
        what: format!("the {kind}"),
        reason,
    };
    let value: Value = crate::yaml::from_str(text).map_err(|e| bad(e.to_string()))?;
    if value.get("kind").and_then(Value::as_str) != Some(kind)
        || value.get("apiVersion").and_then(Value::as_str) != Some(API_VERSION)
    {
        return Err(bad(format!("it is not a {kind} of {API_VERSION}")));
    }
    if !value.get("metadata").is_none_or(Value::is_object) {
        return Err(bad("its metadata is not a map".into()));
    }
    Ok(value)
}

/// The `Release` object of a manifest: the manifest as published, in namespace
/// `default`, labelled as kdist's, named as EKS-D names it.
fn release_object(text: &str, origin: &str) -> Result<DynamicObject, ControllerError> {
    let release =
        crate::components::Release::parse(text, origin).map_err(|e| ControllerError::Manifest {
            origin: origin.to_string(),
            what: "the Release".into(),
            reason: error_chain(&e),
        })?;
    let mut value = parse_document(text, origin, "Release")?;
    if value.get("metadata").is_none() {
        value["metadata"] = json!({});
    }
    if value["metadata"]
        .get("name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        value["metadata"]["name"] = Value::String(release.id().eks_name());
    }
    own(&mut value);
    to_object(value, origin)
}

/// The `ReleaseChannel` object of `channel`: the published document kdist saved when
/// it fetched one, else one whose latest release is the newest kdist knows of.
fn channel_object(
    channel: &str,
    published: Option<&str>,
    origin: &str,
    known_latest: u32,
) -> Result<DynamicObject, ControllerError> {
    let mut value = match published {
        Some(text) => parse_document(text, origin, "ReleaseChannel")?,
        None => json!({
            "apiVersion": API_VERSION,
            "kind": "ReleaseChannel",
            "spec": {},
            "status": {"active": true, "latestRelease": known_latest},
        }),
    };
    if value.get("metadata").is_none() {
        value["metadata"] = json!({});
    }
    value["metadata"]["name"] = Value::String(channel.to_string());
    own(&mut value);
    to_object(value, origin)
}

fn to_object(value: Value, origin: &str) -> Result<DynamicObject, ControllerError> {
    serde_json::from_value(value).map_err(|e| ControllerError::Manifest {
        origin: origin.to_string(),
        what: "the object".into(),
        reason: e.to_string(),
    })
}

fn key(kind: &str, name: &str) -> ObjectKey {
    ObjectKey {
        group: GROUP.into(),
        kind: kind.into(),
        namespace: Some(NAMESPACE.into()),
        name: name.into(),
    }
}

/// The Release and ReleaseChannel objects to keep: those of every release a Node names
/// and of this node's own (which its Node may not show yet).
fn keep(named: &BTreeSet<String>, own: Option<&str>) -> BTreeSet<ObjectKey> {
    named
        .iter()
        .map(String::as_str)
        .chain(own)
        .flat_map(|name| {
            let mut keys = vec![key("Release", name)];
            if let Ok(id) = ReleaseId::parse(name) {
                keys.push(key("ReleaseChannel", &id.channel));
            }
            keys
        })
        .collect()
}

/// A Node as the NODES section shows it.
fn node_release(node: &Node) -> NodeRelease {
    let status = node.status.as_ref();
    NodeRelease {
        name: node.metadata.name.clone().unwrap_or_default(),
        control_plane: node
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(CONTROL_PLANE_LABEL)),
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        kubelet: status
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.kubelet_version.clone()),
        release: node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(RELEASE_ANNOTATION))
            .cloned(),
    }
}

/// The merge patch that makes `node` carry `release` (and, on a control plane, the
/// control-plane label), or none when it does already.
fn node_patch(node: &Node, release: Option<&str>, control_plane: bool) -> Option<Value> {
    let now = node_release(node);
    let mut patch = json!({"metadata": {}});
    if now.release.as_deref() != release {
        patch["metadata"]["annotations"] = json!({ RELEASE_ANNOTATION: release });
    }
    if control_plane && !now.control_plane {
        patch["metadata"]["labels"] = json!({ CONTROL_PLANE_LABEL: "" });
    }
    (patch["metadata"].as_object().is_some_and(|m| !m.is_empty())).then_some(patch)
}

/// What the last applying pass did, to tell when to do it again.
#[derive(Default)]
struct Applied {
    /// The data dir as last read.
    local: Option<(LocalKey, Arc<Local>)>,
    epoch: u64,
    active: Option<String>,
    named: BTreeSet<String>,
    at: Option<Instant>,
    crds: bool,
}

impl Controller for Releases {
    fn name(&self) -> &'static str {
        "releases"
    }

    fn run(
        self: Arc<Self>,
        ctx: Context,
        reporter: Reporter,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), ControllerError>> {
        Box::pin(async move {
            let applier = Applier::new(ctx.client.clone());
            let mut apiserver = ctx.apiserver.clone();
            let mut applied = Applied::default();
            // the Nodes as one watch keeps them (a worker watches only its own)
            let config = match ctx.config.role {
                Role::Worker => watcher::Config::default()
                    .fields(&format!("metadata.name={}", ctx.config.node_name())),
                Role::ControlPlane => watcher::Config::default(),
            };
            let (nodes, writer) = reflector::store();
            let feed = reflector(
                writer,
                watcher(Api::<Node>::all(ctx.client.clone()), config),
            )
            .default_backoff()
            .for_each(|event| {
                if let Err(e) = event {
                    debug!("Node watch: {e}");
                }
                futures::future::ready(())
            });
            let _feed = AbortOnDropHandle::new(tokio::spawn(feed));
            reporter.progressing("listing Nodes");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                listed = nodes.wait_until_ready() => if listed.is_err() {
                    return Err(ControllerError::WatchEnded { controller: "releases", what: "Node watch" });
                },
            }
            loop {
                let Some(epoch) = super::ready_epoch(&mut apiserver, &reporter, &shutdown).await
                else {
                    return Ok(());
                };
                match self
                    .pass(
                        &ctx,
                        &applier,
                        &nodes.state(),
                        epoch,
                        &mut applied,
                        &shutdown,
                    )
                    .await
                {
                    Ok((true, message)) => reporter.ready(message),
                    Ok((false, message)) => reporter.progressing(message),
                    Err(e) => {
                        let message = error_chain(&e);
                        warn!("releases pass failed: {message}");
                        reporter.progressing(message);
                        // everything is applied again once the cause is gone
                        applied.at = None;
                    }
                }
                if !pause(TICK, &shutdown).await {
                    return Ok(());
                }
            }
        })
    }
}

impl Releases {
    /// One look: this node's annotation, then on a control plane the CRDs, the
    /// objects, the prune and the NODES section. Returns (ready, message).
    async fn pass(
        &self,
        ctx: &Context,
        applier: &Applier,
        watched: &[Arc<Node>],
        epoch: u64,
        applied: &mut Applied,
        shutdown: &CancellationToken,
    ) -> Result<(bool, String), ControllerError> {
        let control_plane = ctx.config.role != Role::Worker;
        let me = ctx.config.node_name();
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        let (mut listed, named) = if control_plane {
            let listed: Vec<Node> = watched.iter().map(|n| Node::clone(n)).collect();
            let named: BTreeSet<String> = listed
                .iter()
                .filter(|n| n.metadata.name.as_deref() != Some(me.as_str()))
                .filter_map(|n| node_release(n).release)
                .collect();
            (Some(listed), named)
        } else {
            (None, BTreeSet::new())
        };
        let local = {
            let (data, others) = (ctx.data.clone(), named.clone());
            let cached = applied.local.take();
            let (key, local) =
                tokio::task::spawn_blocking(move || read_local_cached(&data, &others, cached))
                    .await
                    .map_err(|source| ControllerError::Task {
                        controller: "releases",
                        source,
                    })??;
            applied.local = Some((key, local.clone()));
            local
        };
        let active_name = local.active.as_ref().map(|a| a.name.clone());

        // this node's own Node
        let own = watched
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(me.as_str()))
            .map(|n| Node::clone(n));
        let Some(own) = own else {
            return Ok((false, format!("waiting for Node {me} to register")));
        };
        if let Some(patch) = node_patch(&own, active_name.as_deref(), control_plane) {
            let patched = nodes
                .patch(&me, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| ControllerError::api(format!("annotating Node {me}"), e))?;
            info!(node = %me, release = ?active_name, "Node annotated with its release");
            if let Some(listed) = &mut listed
                && let Some(entry) = listed
                    .iter_mut()
                    .find(|n| n.metadata.name.as_deref() == Some(me.as_str()))
            {
                *entry = patched;
            }
        }
        let Some(listed) = listed else {
            return Ok((
                true,
                match &active_name {
                    Some(name) => format!("Node {me} runs {name}"),
                    None => format!("no EKS-D release active on Node {me} (binaries from PATH)"),
                },
            ));
        };
        let mut rows: Vec<NodeRelease> = listed.iter().map(node_release).collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name));
        self.nodes.send_replace(rows);

        // the cluster's Release and ReleaseChannel objects
        let mut wanted: Vec<DynamicObject> = local.installed.values().cloned().collect();
        if let Some(active) = &local.active {
            wanted.push(active.release.clone());
        }
        wanted.extend(local.channel.clone());
        let missing = match &local.active {
            Some(active) if applied.crds => self.missing(&active.name, &ctx.client).await?,
            _ => false,
        };
        let due = !applied.crds
            || missing
            || applied.epoch != epoch
            || applied.active != active_name
            || applied.named != named
            || applied.at.is_none_or(|at| at.elapsed() >= RESYNC);
        if due {
            self.ensure_crds(ctx, applier, shutdown).await?;
            applied.crds = true;
            for object in &wanted {
                applier.apply(object).await?;
            }
            let kinds = BTreeSet::from([
                (
                    GROUP.to_string(),
                    VERSION.to_string(),
                    "Release".to_string(),
                ),
                (
                    GROUP.to_string(),
                    VERSION.to_string(),
                    "ReleaseChannel".to_string(),
                ),
            ]);
            let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
            let pruned = applier
                .prune(&kinds, &selector, &keep(&named, active_name.as_deref()))
                .await?;
            for key in &pruned {
                info!("{key} pruned: no node runs it any more");
            }
            debug!(objects = wanted.len(), "releases applied");
            *applied = Applied {
                local: applied.local.take(),
                epoch,
                active: active_name.clone(),
                named: named.clone(),
                at: Some(Instant::now()),
                crds: true,
            };
        }
        let nodes_line = format!(
            "{} node{}",
            listed.len(),
            if listed.len() == 1 { "" } else { "s" }
        );
        Ok((
            true,
            match (&local.active, &local.channel) {
                (Some(active), Some(channel)) => format!(
                    "Release {} shown (channel {}, latest {}); {nodes_line}",
                    active.name,
                    active.id.channel,
                    channel
                        .data
                        .pointer("/status/latestRelease")
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "unknown".into())
                ),
                _ => format!("no EKS-D release active (binaries from PATH); {nodes_line}"),
            },
        ))
    }

    /// Whether this node's Release object is gone (a user deleted it, or its CRD).
    async fn missing(&self, name: &str, client: &kube::Client) -> Result<bool, ControllerError> {
        let resource = kube::discovery::ApiResource {
            group: GROUP.into(),
            version: VERSION.into(),
            api_version: API_VERSION.into(),
            kind: "Release".into(),
            plural: "releases".into(),
        };
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), NAMESPACE, &resource);
        match api.get_opt(name).await {
            Ok(found) => Ok(found.is_none()),
            // the resource itself is gone with its CRD
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(true),
            Err(e) => Err(ControllerError::api(format!("reading Release {name}"), e)),
        }
    }

    /// Applies the CRDs and waits until they are Established and discovery serves them.
    async fn ensure_crds(
        &self,
        ctx: &Context,
        applier: &Applier,
        shutdown: &CancellationToken,
    ) -> Result<(), ControllerError> {
        for (name, text) in CRDS {
            for object in super::parse_manifests(text, name)? {
                applier.apply(&object).await?;
            }
        }
        let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
        let deadline = Instant::now() + CRD_TIMEOUT;
        for (name, _) in CRDS {
            loop {
                let crd = crds
                    .get_opt(name)
                    .await
                    .map_err(|e| ControllerError::api(format!("reading {name}"), e))?;
                let established = crd
                    .and_then(|c| c.status)
                    .and_then(|s| s.conditions)
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                if established {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(ControllerError::NotEstablished {
                        crd: name.to_string(),
                        secs: CRD_TIMEOUT.as_secs(),
                    });
                }
                if !pause(Duration::from_millis(500), shutdown).await {
                    return Ok(());
                }
            }
        }
        // discovery lags behind Established: resolve both kinds before any object
        for kind in ["Release", "ReleaseChannel"] {
            let probe = to_object(
                json!({"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": "probe"}}),
                "the CRD probe",
            )?;
            loop {
                match applier.key_of(&probe).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() >= deadline => return Err(e),
                    Err(_) => {
                        if !pause(Duration::from_millis(500), shutdown).await {
                            return Ok(());
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = "apiVersion: distro.eks.amazonaws.com/v1alpha1
kind: Release
metadata:
  creationTimestamp: null
  name: kubernetes-1-28-eks-5
spec:
  channel: 1-28
  number: 5
status:
  date: \"2024-01-02T03:04:05Z\"
  components:
  - name: kubernetes
    gitTag: v1.28.7
    assets:
    - name: pause-image
      type: Image
      image:
        uri: public.ecr.aws/eks-distro/kubernetes/pause:v1.28.7-eks-1-28-5
";

    #[test]
    fn a_release_object_is_the_manifest_as_published_in_default() {
        let object = release_object(MANIFEST, "m.yaml").unwrap();
        assert_eq!(
            object.metadata.name.as_deref(),
            Some("kubernetes-1-28-eks-5")
        );
        assert_eq!(object.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(object.metadata.creation_timestamp, None);
        let labels = object.metadata.labels.clone().unwrap();
        assert_eq!(labels[MANAGED_BY.0], "kdist");
        let published: Value = crate::yaml::from_str(MANIFEST).unwrap();
        assert_eq!(object.data["spec"], published["spec"]);
        assert_eq!(object.data["status"], published["status"]);
        assert_eq!(object.data["spec"]["number"], json!(5), "stays a number");
        let text = serde_json::to_string(&object).unwrap();
        assert!(!text.contains("creationTimestamp"), "{text}");
    }

    #[test]
    fn a_published_eks_d_manifest_becomes_its_release_object() {
        let text = include_str!("../../tests/fixtures/kubernetes-1-31-eks-12.yaml");
        let object = release_object(text, "fixture").unwrap();
        assert_eq!(
            object.metadata.name.as_deref(),
            Some("kubernetes-1-31-eks-12")
        );
        let published: Value = crate::yaml::from_str(text).unwrap();
        assert_eq!(object.data["spec"], published["spec"]);
        assert_eq!(object.data["status"], published["status"]);
        assert!(object.metadata.creation_timestamp.is_none());
    }

    #[test]
    fn a_release_without_a_name_gets_eks_ds_and_a_bad_one_is_refused() {
        let unnamed = MANIFEST.replace("  name: kubernetes-1-28-eks-5\n", "");
        let object = release_object(&unnamed, "m.yaml").unwrap();
        assert_eq!(
            object.metadata.name.as_deref(),
            Some("kubernetes-1-28-eks-5")
        );
        let err = release_object(
            &MANIFEST.replace("kind: Release", "kind: ReleaseChannel"),
            "x.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("x.yaml"), "{err}");
    }

    #[test]
    fn a_published_channel_is_applied_as_published() {
        let published = "apiVersion: distro.eks.amazonaws.com/v1alpha1
kind: ReleaseChannel
metadata:
  creationTimestamp: null
  name: 1-28
spec:
  snsTopicARN: arn:aws:sns:us-east-1:379412251201:eks-distro-updates
status:
  active: false
  latestRelease: 44
";
        let object = channel_object("1-28", Some(published), "c.yaml", 5).unwrap();
        assert_eq!(object.metadata.name.as_deref(), Some("1-28"));
        assert_eq!(object.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(object.data["status"]["latestRelease"], json!(44));
        assert_eq!(object.data["status"]["active"], json!(false));
        assert_eq!(
            object.data["spec"]["snsTopicARN"],
            json!("arn:aws:sns:us-east-1:379412251201:eks-distro-updates")
        );
        let err = channel_object("1-28", Some(MANIFEST), "c.yaml", 5)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c.yaml") && err.contains("ReleaseChannel"),
            "{err}"
        );
    }

    #[test]
    fn without_a_published_channel_the_newest_known_release_is_latest() {
        let object = channel_object("1-28", None, "c.yaml", 7).unwrap();
        assert_eq!(object.metadata.name.as_deref(), Some("1-28"));
        assert_eq!(
            object.data["status"],
            json!({"active": true, "latestRelease": 7})
        );
        assert_eq!(
            object.types.unwrap().api_version,
            "distro.eks.amazonaws.com/v1alpha1"
        );
        assert_eq!(object.metadata.labels.unwrap()[MANAGED_BY.0], MANAGED_BY.1);
    }

    #[test]
    fn the_releases_nodes_name_and_our_own_are_kept_with_their_channels() {
        let named = BTreeSet::from([
            "kubernetes-1-28-eks-5".to_string(),
            "kubernetes-1-29-eks-1".to_string(),
            "not a release".to_string(),
        ]);
        let kept = keep(&named, Some("kubernetes-1-28-eks-6"));
        for (kind, name) in [
            ("Release", "kubernetes-1-28-eks-5"),
            ("Release", "kubernetes-1-28-eks-6"),
            ("Release", "kubernetes-1-29-eks-1"),
            ("ReleaseChannel", "1-28"),
            ("ReleaseChannel", "1-29"),
        ] {
            assert!(kept.contains(&key(kind, name)), "{kind} {name}: {kept:?}");
        }
        assert!(!kept.contains(&key("Release", "kubernetes-1-28-eks-4")));
        assert!(!kept.contains(&key("ReleaseChannel", "1-27")));
        // nothing named, nothing active: everything labelled kdist's goes
        assert!(keep(&BTreeSet::new(), None).is_empty());
    }

    fn node(annotation: Option<&str>, control_plane: bool) -> Node {
        let mut node = Node::default();
        node.metadata.name = Some("n1".into());
        if let Some(a) = annotation {
            node.metadata.annotations =
                Some(BTreeMap::from([(RELEASE_ANNOTATION.into(), a.into())]));
        }
        if control_plane {
            node.metadata.labels = Some(BTreeMap::from([(CONTROL_PLANE_LABEL.into(), "".into())]));
        }
        node
    }

    #[test]
    fn the_data_dir_is_read_again_only_when_what_it_shows_changed() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let none = BTreeSet::new();
        let first = read_local_cached(&data, &none, None).unwrap();
        let again = read_local_cached(&data, &none, Some(first.clone())).unwrap();
        assert!(
            Arc::ptr_eq(&first.1, &again.1),
            "nothing changed: not read again"
        );
        let others = BTreeSet::from(["kubernetes-1-28-eks-3".to_string()]);
        let other = read_local_cached(&data, &others, Some(again.clone())).unwrap();
        assert!(
            !Arc::ptr_eq(&again.1, &other.1),
            "another node's release: read again"
        );
        assert_eq!(other.0.others, others);
    }

    #[test]
    fn a_node_is_patched_only_when_its_release_or_role_differs() {
        let r = "kubernetes-1-28-eks-5";
        assert_eq!(node_patch(&node(Some(r), true), Some(r), true), None);
        assert_eq!(node_patch(&node(Some(r), false), Some(r), false), None);
        assert_eq!(
            node_patch(&node(Some("kubernetes-1-28-eks-4"), false), Some(r), false),
            Some(json!({"metadata": {"annotations": {RELEASE_ANNOTATION: r}}}))
        );
        assert_eq!(
            node_patch(&node(None, false), Some(r), true),
            Some(json!({"metadata": {
                "annotations": {RELEASE_ANNOTATION: r},
                "labels": {CONTROL_PLANE_LABEL: ""},
            }}))
        );
        // no release active any more: the annotation goes
        assert_eq!(
            node_patch(&node(Some(r), false), None, false),
            Some(json!({"metadata": {"annotations": {RELEASE_ANNOTATION: null}}}))
        );
        let row = node_release(&node(Some(r), true));
        assert_eq!((row.release.as_deref(), row.control_plane), (Some(r), true));
    }
}
