//! Cluster addons: manifests embedded in the binary (`addons/<name>/*.yaml`), templated
//! with the node's settings and the active EKS-D release's images, and the user's
//! `<data>/manifests/*.yaml` (as k3s' auto-deploy folder), server-side applied by the
//! `addons` controller; what a disabled addon or a removed file had applied is deleted,
//! found by label.
//!
//! Which addons are on is the cluster's choice, kept in the ConfigMap
//! `kube-system/kdist-addons` (one key per addon, "true"/"false") so that every control
//! plane applies the same set; the first control plane to run seeds it from its
//! config.yaml, `kdist addons enable|disable` writes both. An addon the ConfigMap does
//! not name follows config.yaml, then its default.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Node, ServiceAccount};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::apply::{ObjectKey, gvk_of};
use super::{Applier, Context, Controller, ControllerError, Reporter, parse_manifests, pause};
use crate::config::addons::{KNOWN, default_enabled, known_names};
use crate::config::{AddonsConfig, DataDir, NodeConfig};
use crate::report::error_chain;

/// Every object kdist applies as an addon carries this label.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "kdist");
/// The addon an object belongs to.
pub const ADDON_LABEL: &str = "addons.kdist.io/name";
/// The file of `<data>/manifests` (its stem) an object comes from.
pub const MANIFEST_LABEL: &str = "addons.kdist.io/manifest";
/// Where the cluster keeps which addons are enabled.
pub const STATE_NAMESPACE: &str = "kube-system";
pub const STATE_NAME: &str = "kdist-addons";
/// The kinds ever applied from the manifests folder, so that a file removed while no
/// daemon ran still has its objects found.
const MANIFEST_KINDS_ANNOTATION: &str = "addons.kdist.io/manifest-kinds";

/// How often the controller looks for changes (config, the enabled set, files, nodes)
/// and checks readiness.
const TICK: Duration = Duration::from_secs(5);
/// How often everything is applied again even when nothing seems changed: a user's edit
/// of a field kdist owns is put back.
const RESYNC: Duration = Duration::from_secs(60);

/// The embedded manifests of each addon that has objects of its own.
const TEMPLATES: &[(&str, &[(&str, &str)])] = &[
    (
        "dns",
        &[
            ("rbac.yaml", include_str!("../../addons/dns/rbac.yaml")),
            (
                "coredns.yaml",
                include_str!("../../addons/dns/coredns.yaml"),
            ),
        ],
    ),
    (
        "metrics-server",
        &[
            (
                "rbac.yaml",
                include_str!("../../addons/metrics-server/rbac.yaml"),
            ),
            (
                "metrics-server.yaml",
                include_str!("../../addons/metrics-server/metrics-server.yaml"),
            ),
        ],
    ),
];

/// The release asset holding each addon's image.
fn image_asset(addon: &str) -> Option<&'static str> {
    match addon {
        "dns" => Some("coredns-image"),
        "metrics-server" => Some("metrics-server-image"),
        _ => None,
    }
}

/// What the addon manifests are rendered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub cluster_dns: IpAddr,
    pub cluster_domain: String,
    /// Resolvers for names outside the cluster; empty: the pod's resolv.conf, which
    /// with `dnsPolicy: Default` is the node's.
    pub upstream: Vec<IpAddr>,
    pub dns_replicas: u32,
    /// Images by addon name.
    pub images: BTreeMap<String, String>,
    /// The active release (`1-31-12`), for messages; None when the binaries come from PATH.
    pub release: Option<String>,
    /// The cluster CA certificate (PEM), which metrics-server verifies kubelets against.
    pub cluster_ca: String,
}

/// The objects of `addon` rendered with `settings`, labelled as kdist's. Pure.
pub fn render(addon: &str, settings: &Settings) -> Result<Vec<DynamicObject>, ControllerError> {
    let templates = TEMPLATES
        .iter()
        .find(|(name, _)| *name == addon)
        .map(|(_, files)| *files)
        .ok_or_else(|| ControllerError::UnknownAddon {
            name: addon.to_string(),
            known: known_names(),
        })?;
    let image = settings.images.get(addon).cloned().ok_or_else(|| {
        let asset = image_asset(addon).unwrap_or("image");
        match &settings.release {
            Some(release) => ControllerError::NoAddonImage {
                addon: addon.to_string(),
                asset,
                release: release.clone(),
            },
            None => ControllerError::NoRelease {
                addon: addon.to_string(),
            },
        }
    })?;
    let upstream = if settings.upstream.is_empty() {
        "/etc/resolv.conf".to_string()
    } else {
        settings
            .upstream
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    // a JSON string is a YAML double-quoted scalar: the PEM keeps its newlines
    let cluster_ca = serde_json::Value::String(settings.cluster_ca.clone()).to_string();
    let vars: [(&str, String); 6] = [
        ("IMAGE", image),
        ("CLUSTER_DNS", settings.cluster_dns.to_string()),
        ("CLUSTER_DOMAIN", settings.cluster_domain.clone()),
        ("UPSTREAM", upstream),
        ("REPLICAS", settings.dns_replicas.to_string()),
        ("CLUSTER_CA", cluster_ca),
    ];
    let mut objects = Vec::new();
    for (file, template) in templates {
        let mut text = template.to_string();
        for (key, value) in &vars {
            text = text.replace(&format!("{{{{{key}}}}}"), value);
        }
        if let Some(at) = text.find("{{") {
            let placeholder: String = text[at..].chars().take_while(|c| *c != '}').collect();
            return Err(ControllerError::Template {
                addon: addon.to_string(),
                file: file.to_string(),
                placeholder: format!("{placeholder}}}}}"),
            });
        }
        for mut object in parse_manifests(&text, &format!("addons/{addon}/{file}"))? {
            label(&mut object, ADDON_LABEL, addon);
            objects.push(object);
        }
    }
    Ok(objects)
}

/// The kinds `addon`'s manifests hold, whatever the settings: what to look through when
/// its objects must go.
fn addon_kinds(addon: &str) -> BTreeSet<(String, String, String)> {
    let settings = Settings {
        cluster_dns: IpAddr::from([10, 0, 0, 10]),
        cluster_domain: "cluster.local".into(),
        upstream: Vec::new(),
        dns_replicas: 1,
        images: BTreeMap::from([(addon.to_string(), "image".to_string())]),
        release: None,
        cluster_ca: String::new(),
    };
    render(addon, &settings)
        .unwrap_or_default()
        .iter()
        .filter_map(gvk_of)
        .map(|g| (g.group, g.version, g.kind))
        .collect()
}

fn label(object: &mut DynamicObject, key: &str, value: &str) {
    let labels = object.metadata.labels.get_or_insert_default();
    labels.insert(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string());
    labels.insert(key.to_string(), value.to_string());
}

/// The nameservers of a resolv.conf text.
pub fn nameservers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(ip)) => ip.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

/// The host's resolvers that a pod can reach: from /etc/resolv.conf, or where that
/// names a local stub (systemd-resolved's 127.0.0.53, which inside a pod would be the
/// pod itself), from the resolver's own list.
pub fn host_upstream() -> Vec<IpAddr> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let mut found = nameservers(&read("/etc/resolv.conf"));
    if found.iter().any(IpAddr::is_loopback) {
        found.extend(nameservers(&read("/run/systemd/resolve/resolv.conf")));
    }
    found.retain(|ip| !ip.is_loopback());
    found.dedup();
    found
}

/// How an addon is doing, as `kdist addons list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddonState {
    Ready,
    Progressing,
    Failed,
    Disabled,
    /// Enabled; another controller does its work (storage) and reports it.
    Enabled,
}

impl std::fmt::Display for AddonState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ready => "ready",
            Self::Progressing => "progressing",
            Self::Failed => "failed",
            Self::Disabled => "disabled",
            Self::Enabled => "enabled",
        })
    }
}

/// One line of `kdist addons list` and of `kdist status`' ADDONS section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddonStatus {
    pub name: String,
    pub enabled: bool,
    pub state: AddonState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// The addons' states as the controller last saw them. Cheap to clone.
#[derive(Clone)]
pub struct AddonBoard {
    tx: Arc<watch::Sender<Vec<AddonStatus>>>,
}

impl Default for AddonBoard {
    fn default() -> Self {
        Self::new()
    }
}

impl AddonBoard {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Vec::new());
        Self { tx: Arc::new(tx) }
    }

    pub fn snapshot(&self) -> Vec<AddonStatus> {
        self.tx.borrow().clone()
    }

    fn set(&self, all: Vec<AddonStatus>) {
        self.tx.send_replace(all);
    }
}

/// The `addons` controller.
pub struct Addons {
    board: AddonBoard,
}

impl Addons {
    pub fn new(board: AddonBoard) -> Self {
        Self { board }
    }
}

impl Controller for Addons {
    fn name(&self) -> &'static str {
        "addons"
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
            let mut applied: Option<(u64, String)> = None;
            let mut last_full = Instant::now();
            loop {
                let Some(epoch) = super::ready_epoch(&mut apiserver, &reporter, &shutdown).await
                else {
                    return Ok(());
                };
                let force = last_full.elapsed() >= RESYNC;
                match self.pass(&ctx, &applier, epoch, &mut applied, force).await {
                    Ok((ready, message)) => {
                        if force {
                            last_full = Instant::now();
                        }
                        if ready {
                            reporter.ready(message);
                        } else {
                            reporter.progressing(message);
                        }
                    }
                    Err(e) => {
                        let message = error_chain(&e);
                        warn!("addons pass failed: {message}");
                        reporter.progressing(message);
                    }
                }
                if !pause(TICK, &shutdown).await {
                    return Ok(());
                }
            }
        })
    }
}

/// What the controller reads from the node each pass (off the async workers).
struct Local {
    config: AddonsConfig,
    config_error: Option<String>,
    release: Option<String>,
    release_images: BTreeMap<String, String>,
    release_error: Option<String>,
    cluster_ca: Result<String, String>,
    host_upstream: Vec<IpAddr>,
    files: Vec<ManifestFile>,
}

struct ManifestFile {
    stem: String,
    path: PathBuf,
    parsed: Result<Vec<DynamicObject>, String>,
}

fn gather(data: &DataDir, fallback: &NodeConfig) -> Local {
    let (config, config_error) = match NodeConfig::load(data) {
        Ok(config) => (config.addons, None),
        Err(e) => (fallback.addons.clone(), Some(error_chain(&e))),
    };
    let store = crate::components::Store::new(data);
    let (release, release_images, release_error) = match store.active() {
        None => (None, BTreeMap::new(), None),
        Some(id) => match store.manifest(&id) {
            Ok(manifest) => {
                let images = TEMPLATES
                    .iter()
                    .filter_map(|(addon, _)| {
                        let asset = image_asset(addon)?;
                        Some((addon.to_string(), manifest.image(asset)?.to_string()))
                    })
                    .collect();
                (Some(id.to_string()), images, None)
            }
            Err(e) => (Some(id.to_string()), BTreeMap::new(), Some(error_chain(&e))),
        },
    };
    let ca_path = data.certs_dir().join("ca.crt");
    let cluster_ca = std::fs::read_to_string(&ca_path)
        .map_err(|e| format!("cannot read {}: {e}", ca_path.display()));
    Local {
        config,
        config_error,
        release,
        release_images,
        release_error,
        cluster_ca,
        host_upstream: host_upstream(),
        files: read_manifest_files(&manifests_dir(data)),
    }
}

/// Whether `value` can be a label value (and so name a manifest file's objects).
fn is_label_value(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 63
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The `*.yaml`/`*.yml` files of `dir` in name order, each parsed and labelled; a file
/// that does not parse carries its error, the others are unaffected.
fn read_manifest_files(dir: &Path) -> Vec<ManifestFile> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            !name.starts_with('.')
                && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                && p.is_file()
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            let origin = format!(
                "manifests/{}",
                path.file_name().unwrap_or_default().to_string_lossy()
            );
            let parsed = if !is_label_value(&stem) {
                Err(format!(
                    "{origin}: the name before .yaml must be a label value (a-z, 0-9, '-', \
                     '_', '.', at most 63): rename the file"
                ))
            } else {
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))
                    .and_then(|text| parse_manifests(&text, &origin).map_err(|e| error_chain(&e)))
                    .map(|mut objects| {
                        for object in &mut objects {
                            label(object, MANIFEST_LABEL, &stem);
                        }
                        objects
                    })
            };
            ManifestFile { stem, path, parsed }
        })
        .collect()
}

fn state_api(client: &kube::Client) -> Api<ConfigMap> {
    Api::namespaced(client.clone(), STATE_NAMESPACE)
}

/// The enabled set as the cluster keeps it, seeded from `config` when the cluster has
/// none yet. Returns it with the ConfigMap's annotations.
async fn cluster_choice(
    client: &kube::Client,
    config: &AddonsConfig,
) -> Result<(BTreeMap<String, bool>, BTreeMap<String, String>), ControllerError> {
    let api = state_api(client);
    let found = api
        .get_opt(STATE_NAME)
        .await
        .map_err(|e| ControllerError::api(format!("reading {STATE_NAMESPACE}/{STATE_NAME}"), e))?;
    let map = match found {
        Some(map) => map,
        None => {
            let seed = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(STATE_NAME.into()),
                    namespace: Some(STATE_NAMESPACE.into()),
                    labels: Some(BTreeMap::from([(
                        MANAGED_BY.0.to_string(),
                        MANAGED_BY.1.to_string(),
                    )])),
                    ..Default::default()
                },
                data: Some(
                    KNOWN
                        .iter()
                        .map(|(n, _)| (n.to_string(), config.enabled(n).to_string()))
                        .collect(),
                ),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &seed).await {
                Ok(created) => {
                    info!("addons choice seeded from config.yaml");
                    created
                }
                Err(kube::Error::Api(status)) if status.code == 409 => api
                    .get(STATE_NAME)
                    .await
                    .map_err(|e| ControllerError::api(format!("reading {STATE_NAME}"), e))?,
                Err(e) => return Err(ControllerError::api(format!("creating {STATE_NAME}"), e)),
            }
        }
    };
    let data = map.data.unwrap_or_default();
    let enabled = KNOWN
        .iter()
        .map(|(name, _)| {
            let on = match data.get(*name).map(|v| v.trim()) {
                Some("true") => true,
                Some("false") => false,
                _ => config.enabled(name),
            };
            (name.to_string(), on)
        })
        .collect();
    Ok((enabled, map.metadata.annotations.unwrap_or_default()))
}

/// Whether addon `name` is enabled in the cluster (the storage controller asks for
/// `storage`): the cluster's choice, else this node's config.yaml, else the default.
pub async fn enabled(ctx: &Context, name: &str) -> Result<bool, ControllerError> {
    if default_enabled(name).is_none() {
        return Err(ControllerError::UnknownAddon {
            name: name.to_string(),
            known: known_names(),
        });
    }
    let data = ctx.data.clone();
    let fallback = ctx.config.clone();
    let config = tokio::task::spawn_blocking(move || {
        NodeConfig::load(&data)
            .map(|c| c.addons)
            .unwrap_or(fallback.addons)
    })
    .await
    .map_err(|source| ControllerError::Task {
        controller: "addons",
        source,
    })?;
    let (enabled, _) = cluster_choice(&ctx.client, &config).await?;
    Ok(enabled.get(name).copied().unwrap_or(false))
}

/// Records the cluster's choice for the addons in `changes` (what `kdist addons
/// enable|disable` does besides writing config.yaml); every control plane's controller
/// picks it up within seconds.
pub async fn set_enabled(
    client: &kube::Client,
    changes: &[(String, bool)],
) -> Result<(), ControllerError> {
    for (name, _) in changes {
        if default_enabled(name).is_none() {
            return Err(ControllerError::UnknownAddon {
                name: name.clone(),
                known: known_names(),
            });
        }
    }
    let data: BTreeMap<String, String> = changes
        .iter()
        .map(|(n, on)| (n.clone(), on.to_string()))
        .collect();
    let api = state_api(client);
    let patch = serde_json::json!({ "data": data });
    match api
        .patch(STATE_NAME, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            let map = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(STATE_NAME.into()),
                    namespace: Some(STATE_NAMESPACE.into()),
                    labels: Some(BTreeMap::from([(
                        MANAGED_BY.0.to_string(),
                        MANAGED_BY.1.to_string(),
                    )])),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            api.create(&PostParams::default(), &map)
                .await
                .map(|_| ())
                .map_err(|e| ControllerError::api(format!("creating {STATE_NAME}"), e))
        }
        Err(e) => Err(ControllerError::api(format!("updating {STATE_NAME}"), e)),
    }
}

/// CoreDNS replicas: the configured number, else 2 once two nodes can run it.
async fn dns_replicas(
    client: &kube::Client,
    config: &AddonsConfig,
) -> Result<u32, ControllerError> {
    if let Some(n) = config.dns.replicas {
        return Ok(n);
    }
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| ControllerError::api("listing nodes", e))?;
    let usable = nodes
        .items
        .iter()
        .filter(|n| {
            let spec = n.spec.clone().unwrap_or_default();
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            // CoreDNS tolerates the control-plane taint, nothing else that keeps pods off
            let tainted = spec.taints.unwrap_or_default().iter().any(|t| {
                (t.effect == "NoSchedule" || t.effect == "NoExecute")
                    && t.key != "node-role.kubernetes.io/control-plane"
            });
            ready && !spec.unschedulable.unwrap_or(false) && !tainted
        })
        .count();
    Ok(if usable >= 2 { 2 } else { 1 })
}

/// What one pass wants applied, per addon: its objects, or why it cannot have them.
type Desired = BTreeMap<String, Result<Vec<DynamicObject>, String>>;

impl Addons {
    /// One reconcile: read what is wanted, apply it when it changed (or at every
    /// resync, or in a new apiserver epoch), prune what is no longer wanted, and report
    /// every addon's state. Returns the controller's verdict and message.
    async fn pass(
        &self,
        ctx: &Context,
        applier: &Applier,
        epoch: u64,
        applied: &mut Option<(u64, String)>,
        force: bool,
    ) -> Result<(bool, String), ControllerError> {
        let local = {
            let (data, config) = (ctx.data.clone(), ctx.config.clone());
            tokio::task::spawn_blocking(move || gather(&data, &config))
                .await
                .map_err(|source| ControllerError::Task {
                    controller: "addons",
                    source,
                })?
        };
        if let Some(e) = &local.config_error {
            warn!("config.yaml unreadable, using the addons settings the daemon started with: {e}");
        }
        let (enabled, annotations) = cluster_choice(&ctx.client, &local.config).await?;
        let on = |name: &str| enabled.get(name).copied().unwrap_or(false);

        let mut images = local.release_images.clone();
        if let Some(image) = &local.config.dns.image {
            images.insert("dns".into(), image.clone());
        }
        if let Some(image) = &local.config.metrics_server.image {
            images.insert("metrics-server".into(), image.clone());
        }
        let settings = Settings {
            cluster_dns: ctx.config.network.cluster_dns,
            cluster_domain: ctx.config.network.cluster_domain.clone(),
            upstream: if local.config.dns.upstream.is_empty() {
                local.host_upstream.clone()
            } else {
                local.config.dns.upstream.clone()
            },
            dns_replicas: if on("dns") {
                dns_replicas(&ctx.client, &local.config).await?
            } else {
                1
            },
            images,
            release: local.release.clone(),
            cluster_ca: local.cluster_ca.clone().unwrap_or_default(),
        };

        let mut desired: Desired = BTreeMap::new();
        for (addon, _) in TEMPLATES {
            if !on(addon) {
                continue;
            }
            let rendered = match (&local.release_error, settings.images.contains_key(*addon)) {
                (Some(e), false) => Err(e.clone()),
                _ if *addon == "metrics-server" && local.cluster_ca.is_err() => {
                    Err(local.cluster_ca.clone().err().unwrap_or_default())
                }
                _ => render(addon, &settings).map_err(|e| error_chain(&e)),
            };
            desired.insert(addon.to_string(), rendered);
        }

        let fingerprint = serde_json::json!({
            "enabled": enabled,
            "addons": desired.iter().map(|(k, v)| (k.clone(), match v {
                Ok(objects) => serde_json::to_value(objects).unwrap_or_default(),
                Err(e) => serde_json::Value::String(e.clone()),
            })).collect::<BTreeMap<_, _>>(),
            "files": local.files.iter().map(|f| (f.stem.clone(), match &f.parsed {
                Ok(objects) => serde_json::to_value(objects).unwrap_or_default(),
                Err(e) => serde_json::Value::String(e.clone()),
            })).collect::<BTreeMap<_, _>>(),
        })
        .to_string();
        let changed = applied.as_ref() != Some(&(epoch, fingerprint.clone()));

        let mut failures: BTreeMap<String, String> = BTreeMap::new();
        let mut file_failures: BTreeMap<String, String> = BTreeMap::new();
        if changed || force {
            let mut clean = true;
            for (addon, _) in TEMPLATES {
                let kinds = addon_kinds(addon);
                let selector = format!("{ADDON_LABEL}={addon}");
                match desired.get(*addon) {
                    None => {
                        let gone = applier.prune(&kinds, &selector, &BTreeSet::new()).await?;
                        if !gone.is_empty() {
                            info!(addon, objects = gone.len(), "disabled addon removed");
                        }
                    }
                    // not transient: it changes with the release or config, which the
                    // fingerprint covers
                    Some(Err(e)) => {
                        warn!(addon, "addon not applied: {e}");
                        failures.insert(addon.to_string(), e.clone());
                    }
                    Some(Ok(objects)) => match apply_all(applier, objects).await {
                        Ok(keep) => {
                            applier.prune(&kinds, &selector, &keep).await?;
                        }
                        Err(e) => {
                            let e = error_chain(&e);
                            warn!(addon, "addon not applied: {e}");
                            failures.insert(addon.to_string(), e);
                            clean = false;
                        }
                    },
                }
            }
            clean &= self
                .apply_files(
                    ctx,
                    applier,
                    &local.files,
                    on("manifests"),
                    &annotations,
                    &mut file_failures,
                )
                .await?;
            if clean {
                *applied = Some((epoch, fingerprint));
            } else {
                *applied = None;
            }
        } else {
            for file in &local.files {
                if let Err(e) = &file.parsed {
                    file_failures.insert(file.stem.clone(), e.clone());
                }
            }
        }

        // states
        let mut all = Vec::new();
        let mut waiting = Vec::new();
        for (name, _) in KNOWN {
            let enabled = on(name);
            let image = settings
                .images
                .get(*name)
                .cloned()
                .filter(|_| image_asset(name).is_some());
            let (state, message) = if !enabled {
                (AddonState::Disabled, None)
            } else if let Some(e) = failures
                .get(*name)
                .or(desired.get(*name).and_then(|d| d.as_ref().err()))
            {
                (AddonState::Failed, Some(e.clone()))
            } else {
                match *name {
                    "dns" => deployment_state(&ctx.client, "coredns").await?,
                    "metrics-server" => metrics_state(&ctx.client).await?,
                    "manifests" => files_state(&local.files, &file_failures),
                    _ => (
                        AddonState::Enabled,
                        Some("run by its own controller".to_string()),
                    ),
                }
            };
            if enabled && matches!(*name, "dns" | "metrics-server") && state != AddonState::Ready {
                waiting.push(format!("{name} {state}"));
            }
            all.push(AddonStatus {
                name: name.to_string(),
                enabled,
                state,
                message,
                image,
            });
        }
        self.board.set(all);

        let sa = Api::<ServiceAccount>::namespaced(ctx.client.clone(), "default")
            .get_opt("default")
            .await
            .map_err(|e| ControllerError::api("reading serviceaccount default/default", e))?;
        if sa.is_none() {
            waiting.push("no default ServiceAccount yet".into());
        }
        let on_list: Vec<&str> = KNOWN.iter().map(|(n, _)| *n).filter(|n| on(n)).collect();
        Ok(if waiting.is_empty() {
            (true, format!("enabled: {}", on_list.join(", ")))
        } else {
            (false, waiting.join("; "))
        })
    }

    /// Applies the manifests folder's files that parse, then deletes what removed (or,
    /// with the addon disabled, all) files had applied. A file that fails keeps what it
    /// applied before. Returns false when the API refused a file (tried again next
    /// tick); a file that does not parse waits until it changes.
    async fn apply_files(
        &self,
        ctx: &Context,
        applier: &Applier,
        files: &[ManifestFile],
        enabled: bool,
        annotations: &BTreeMap<String, String>,
        failures: &mut BTreeMap<String, String>,
    ) -> Result<bool, ControllerError> {
        let mut kinds: BTreeSet<(String, String, String)> = annotations
            .get(MANIFEST_KINDS_ANNOTATION)
            .map(|v| {
                v.split(',')
                    .filter_map(|k| {
                        let mut parts = k.rsplitn(3, '/');
                        let kind = parts.next()?.to_string();
                        let version = parts.next()?.to_string();
                        let group = parts.next().unwrap_or_default().to_string();
                        Some((group, version, kind))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let known_before = kinds.clone();
        let mut keep = BTreeSet::new();
        let mut excluded = Vec::new();
        let mut refused = false;
        if enabled {
            for file in files {
                match &file.parsed {
                    Err(e) => {
                        warn!(file = %file.path.display(), "manifest not applied: {e}");
                        failures.insert(file.stem.clone(), e.clone());
                        excluded.push(file.stem.clone());
                    }
                    Ok(objects) => {
                        kinds.extend(
                            objects
                                .iter()
                                .filter_map(gvk_of)
                                .map(|g| (g.group, g.version, g.kind)),
                        );
                        match apply_all(applier, objects).await {
                            Ok(applied) => keep.extend(applied),
                            Err(e) => {
                                let e = format!("{}: {}", file.path.display(), error_chain(&e));
                                warn!("manifest not applied: {e}");
                                failures.insert(file.stem.clone(), e);
                                excluded.push(file.stem.clone());
                                refused = true;
                            }
                        }
                    }
                }
            }
        }
        if kinds != known_before {
            let value = kinds
                .iter()
                .map(|(g, v, k)| {
                    if g.is_empty() {
                        format!("{v}/{k}")
                    } else {
                        format!("{g}/{v}/{k}")
                    }
                })
                .collect::<Vec<_>>()
                .join(",");
            let patch = serde_json::json!({"metadata": {"annotations": {MANIFEST_KINDS_ANNOTATION: value}}});
            state_api(&ctx.client)
                .patch(STATE_NAME, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| ControllerError::api(format!("recording kinds in {STATE_NAME}"), e))?;
        }
        let selector = if excluded.is_empty() {
            MANIFEST_LABEL.to_string()
        } else {
            format!(
                "{MANIFEST_LABEL},{MANIFEST_LABEL} notin ({})",
                excluded.join(",")
            )
        };
        let gone = applier.prune(&kinds, &selector, &keep).await?;
        for key in &gone {
            info!(object = %key, "object of a removed manifest deleted");
        }
        Ok(!refused)
    }
}

/// Applies `objects` in order; returns their keys.
async fn apply_all(
    applier: &Applier,
    objects: &[DynamicObject],
) -> Result<BTreeSet<ObjectKey>, ControllerError> {
    let mut keys = BTreeSet::new();
    for object in objects {
        applier.apply(object).await?;
        keys.insert(applier.key_of(object).await?);
    }
    Ok(keys)
}

async fn deployment_state(
    client: &kube::Client,
    name: &str,
) -> Result<(AddonState, Option<String>), ControllerError> {
    let found = Api::<Deployment>::namespaced(client.clone(), STATE_NAMESPACE)
        .get_opt(name)
        .await
        .map_err(|e| ControllerError::api(format!("reading deployment {name}"), e))?;
    let Some(deployment) = found else {
        return Ok((
            AddonState::Progressing,
            Some(format!("no deployment {name} yet")),
        ));
    };
    let want = deployment.spec.and_then(|s| s.replicas).unwrap_or(1);
    let available = deployment
        .status
        .and_then(|s| s.available_replicas)
        .unwrap_or(0);
    let message = format!("{available}/{want} available");
    Ok(if available >= 1 {
        (AddonState::Ready, Some(message))
    } else {
        (AddonState::Progressing, Some(message))
    })
}

async fn metrics_state(
    client: &kube::Client,
) -> Result<(AddonState, Option<String>), ControllerError> {
    let (state, message) = deployment_state(client, "metrics-server").await?;
    if state != AddonState::Ready {
        return Ok((state, message));
    }
    let gvk = GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService");
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk));
    let service = api
        .get_opt("v1beta1.metrics.k8s.io")
        .await
        .map_err(|e| ControllerError::api("reading apiservice v1beta1.metrics.k8s.io", e))?;
    let available = service
        .as_ref()
        .and_then(|s| s.data.pointer("/status/conditions"))
        .and_then(|c| c.as_array())
        .and_then(|c| c.iter().find(|c| c["type"] == "Available"))
        .map(|c| {
            (
                c["status"] == "True",
                c["message"].as_str().unwrap_or_default().to_string(),
            )
        });
    Ok(match available {
        Some((true, _)) => (AddonState::Ready, message),
        Some((false, why)) => (
            AddonState::Progressing,
            Some(format!("metrics API not available: {why}")),
        ),
        None => (
            AddonState::Progressing,
            Some("metrics API not registered yet".into()),
        ),
    })
}

fn files_state(
    files: &[ManifestFile],
    failures: &BTreeMap<String, String>,
) -> (AddonState, Option<String>) {
    if failures.is_empty() {
        (
            AddonState::Ready,
            Some(format!("{} files applied", files.len())),
        )
    } else {
        let list: Vec<String> = failures.values().cloned().collect();
        (AddonState::Failed, Some(list.join("; ")))
    }
}

/// The user's manifests folder, applied as the `manifests` addon.
pub fn manifests_dir(data: &DataDir) -> PathBuf {
    data.root().join("manifests")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(minor: u32) -> Settings {
        Settings {
            cluster_dns: "10.152.183.10".parse().unwrap(),
            cluster_domain: "cluster.local".into(),
            upstream: vec!["192.0.2.53".parse().unwrap(), "192.0.2.54".parse().unwrap()],
            dns_replicas: 2,
            images: BTreeMap::from([
                (
                    "dns".to_string(),
                    format!("public.ecr.aws/eks-distro/coredns/coredns:v1.11.1-eks-1-{minor}-1"),
                ),
                (
                    "metrics-server".to_string(),
                    format!(
                        "public.ecr.aws/eks-distro/kubernetes-sigs/metrics-server:v0.7.0-eks-1-{minor}-1"
                    ),
                ),
            ]),
            release: Some(format!("1-{minor}-1")),
            cluster_ca: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        }
    }

    fn find<'a>(objects: &'a [DynamicObject], kind: &str, name: &str) -> &'a DynamicObject {
        objects
            .iter()
            .find(|o| {
                o.types.as_ref().is_some_and(|t| t.kind == kind)
                    && o.metadata.name.as_deref() == Some(name)
            })
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    #[test]
    fn dns_renders_the_node_settings_and_labels() {
        let objects = render("dns", &settings(31)).unwrap();
        let corefile = find(&objects, "ConfigMap", "coredns").data["data"]["Corefile"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            corefile.contains("kubernetes cluster.local in-addr.arpa ip6.arpa"),
            "{corefile}"
        );
        assert!(
            corefile.contains("forward . 192.0.2.53 192.0.2.54"),
            "{corefile}"
        );
        for plugin in ["cache", "loop", "health", "ready", "reload", "errors"] {
            assert!(
                corefile.lines().any(|l| l.trim_start().starts_with(plugin)),
                "{plugin}"
            );
        }
        let service = find(&objects, "Service", "kube-dns");
        assert_eq!(service.data["spec"]["clusterIP"], "10.152.183.10");
        let deployment = find(&objects, "Deployment", "coredns");
        assert_eq!(deployment.data["spec"]["replicas"], 2);
        let container = &deployment.data["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            container["image"],
            "public.ecr.aws/eks-distro/coredns/coredns:v1.11.1-eks-1-31-1"
        );
        assert_eq!(
            container["securityContext"]["capabilities"]["add"][0],
            "NET_BIND_SERVICE"
        );
        find(&objects, "PodDisruptionBudget", "coredns");
        for object in &objects {
            let labels = object.metadata.labels.as_ref().unwrap();
            assert_eq!(labels.get(ADDON_LABEL).map(String::as_str), Some("dns"));
            assert_eq!(labels.get(MANAGED_BY.0).map(String::as_str), Some("kdist"));
        }
    }

    #[test]
    fn without_upstream_coredns_forwards_to_the_pod_resolv_conf() {
        let mut s = settings(31);
        s.upstream.clear();
        let objects = render("dns", &s).unwrap();
        let corefile = find(&objects, "ConfigMap", "coredns").data["data"]["Corefile"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            corefile.contains("forward . /etc/resolv.conf"),
            "{corefile}"
        );
    }

    #[test]
    fn metrics_server_verifies_kubelets_against_the_cluster_ca() {
        let objects = render("metrics-server", &settings(31)).unwrap();
        let ca = find(&objects, "ConfigMap", "metrics-server-kubelet-ca");
        assert_eq!(ca.data["data"]["ca.crt"], settings(31).cluster_ca.as_str());
        let deployment = find(&objects, "Deployment", "metrics-server");
        let args: Vec<String> = serde_json::from_value(
            deployment.data["spec"]["template"]["spec"]["containers"][0]["args"].clone(),
        )
        .unwrap();
        assert!(args.contains(&"--kubelet-certificate-authority=/etc/kubelet-ca/ca.crt".into()));
        assert!(args.contains(&"--kubelet-preferred-address-types=InternalIP".into()));
        assert!(!args.iter().any(|a| a.contains("insecure")), "{args:?}");
        find(&objects, "APIService", "v1beta1.metrics.k8s.io");
    }

    #[test]
    fn a_missing_image_names_the_release_or_says_there_is_none() {
        let mut s = settings(31);
        s.images.clear();
        let err = render("metrics-server", &s).unwrap_err().to_string();
        assert!(
            err.contains("1-31-1") && err.contains("metrics-server-image"),
            "{err}"
        );
        s.release = None;
        let err = render("dns", &s).unwrap_err().to_string();
        assert!(err.contains("addons.dns.image"), "{err}");
        let err = render("helm", &s).unwrap_err().to_string();
        assert!(err.contains("dns") && err.contains("manifests"), "{err}");
    }

    #[test]
    fn kinds_of_an_addon_are_known_without_settings() {
        let kinds = addon_kinds("dns");
        assert!(kinds.contains(&("apps".into(), "v1".into(), "Deployment".into())));
        assert!(kinds.contains(&("".into(), "v1".into(), "Service".into())));
        assert!(
            addon_kinds("metrics-server")
                .iter()
                .any(|k| k.2 == "APIService")
        );
    }

    #[test]
    fn nameservers_and_label_values() {
        let text = "# c\nnameserver 127.0.0.53\nnameserver 192.0.2.1\nsearch x\nnameserver bad\n";
        assert_eq!(
            nameservers(text),
            vec![
                "127.0.0.53".parse::<IpAddr>().unwrap(),
                "192.0.2.1".parse().unwrap()
            ]
        );
        assert!(is_label_value("my-app_1.v2"));
        assert!(!is_label_value("my app"));
        assert!(!is_label_value("-x"));
    }

    #[test]
    fn manifest_files_parse_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("good.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("bad.yaml"), "a: b\n  c: : d\n").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        let files = read_manifest_files(dir.path());
        assert_eq!(files.len(), 2);
        let bad = files.iter().find(|f| f.stem == "bad").unwrap();
        let err = bad.parsed.as_ref().unwrap_err();
        assert!(
            err.contains("manifests/bad.yaml") && err.contains('2'),
            "{err}"
        );
        let good = files.iter().find(|f| f.stem == "good").unwrap();
        let objects = good.parsed.as_ref().unwrap();
        assert_eq!(
            objects[0]
                .metadata
                .labels
                .as_ref()
                .unwrap()
                .get(MANIFEST_LABEL)
                .map(String::as_str),
            Some("good")
        );
    }

    /// Rendered addon manifests per Kubernetes minor, compared with
    /// tests/golden/1.<minor>/addons/. `KDIST_UPDATE_GOLDEN=1 cargo test golden` rewrites
    /// them.
    #[test]
    fn golden_addon_manifests_per_minor() {
        use crate::node::kube;
        let update = std::env::var_os("KDIST_UPDATE_GOLDEN").is_some();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
        let mut mismatches = Vec::new();
        for minor in kube::MIN_MINOR..=kube::MAX_MINOR {
            let dir = root.join(format!("1.{minor}/addons"));
            for (addon, _) in TEMPLATES {
                let objects = render(addon, &settings(minor)).unwrap();
                let text: String = objects
                    .iter()
                    .map(|o| format!("---\n{}", serde_saphyr::to_string(o).unwrap()))
                    .collect();
                let path = dir.join(format!("{addon}.yaml"));
                if update {
                    std::fs::create_dir_all(&dir).unwrap();
                    std::fs::write(&path, &text).unwrap();
                } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                    mismatches.push(path.display().to_string());
                }
            }
        }
        assert!(
            mismatches.is_empty(),
            "rendered addons differ from golden files (review, then rerun with \
             KDIST_UPDATE_GOLDEN=1): {mismatches:#?}"
        );
    }
}
