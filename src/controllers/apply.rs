//! Server-side apply of manifests (field manager `kdist`) and pruning of what kdist
//! applied before and no longer wants, found by label.

use std::collections::{BTreeSet, HashMap};

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiCapabilities, ApiResource, Scope};
use tokio::sync::Mutex;

use super::ControllerError;

/// The field manager of everything kdist applies.
pub const FIELD_MANAGER: &str = "kdist";

/// The objects of a multi-document YAML text; empty documents are skipped. `origin`
/// names the text in errors (a file, an addon).
pub fn parse_manifests(text: &str, origin: &str) -> Result<Vec<DynamicObject>, ControllerError> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| ControllerError::Manifest {
            origin: origin.to_string(),
            what: "the text".into(),
            reason: e.to_string(),
        })?;
    let mut objects = Vec::new();
    for (index, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let bad = |reason: String| ControllerError::Manifest {
            origin: origin.to_string(),
            what: format!("document {}", index + 1),
            reason,
        };
        let object: DynamicObject = serde_json::from_value(doc).map_err(|e| bad(e.to_string()))?;
        if object.types.is_none() {
            return Err(bad("it has no apiVersion and kind".into()));
        }
        if object
            .metadata
            .name
            .as_deref()
            .unwrap_or_default()
            .is_empty()
        {
            return Err(bad("it has no metadata.name".into()));
        }
        objects.push(object);
    }
    Ok(objects)
}

/// The group, version and kind of a parsed object.
pub fn gvk_of(object: &DynamicObject) -> Option<GroupVersionKind> {
    object
        .types
        .as_ref()
        .and_then(|t| GroupVersionKind::try_from(t).ok())
}

/// An object as kdist names it: kind, namespace, name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub group: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        };
        match &self.namespace {
            Some(ns) => write!(f, "{kind} {ns}/{}", self.name),
            None => write!(f, "{kind} {}", self.name),
        }
    }
}

/// Applies objects with server-side apply, resolving each kind once through discovery.
pub struct Applier {
    client: kube::Client,
    kinds: Mutex<HashMap<GroupVersionKind, (ApiResource, ApiCapabilities)>>,
}

impl Applier {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            kinds: Mutex::new(HashMap::new()),
        }
    }

    async fn resource(
        &self,
        gvk: &GroupVersionKind,
    ) -> Result<(ApiResource, ApiCapabilities), ControllerError> {
        if let Some(found) = self.kinds.lock().await.get(gvk) {
            return Ok(found.clone());
        }
        let found = kube::discovery::pinned_kind(&self.client, gvk)
            .await
            .map_err(|e| {
                ControllerError::api(
                    format!("looking up {}/{} {}", gvk.group, gvk.version, gvk.kind),
                    e,
                )
            })?;
        self.kinds.lock().await.insert(gvk.clone(), found.clone());
        Ok(found)
    }

    fn api(
        &self,
        resource: &ApiResource,
        caps: &ApiCapabilities,
        namespace: Option<&str>,
    ) -> Api<DynamicObject> {
        match caps.scope {
            Scope::Namespaced => Api::namespaced_with(
                self.client.clone(),
                namespace.unwrap_or("default"),
                resource,
            ),
            Scope::Cluster => Api::all_with(self.client.clone(), resource),
        }
    }

    /// The key of `object` as it is (or will be) stored: namespaced kinds get `default`
    /// when the manifest names no namespace.
    pub async fn key_of(&self, object: &DynamicObject) -> Result<ObjectKey, ControllerError> {
        let gvk = gvk_of(object).ok_or_else(|| ControllerError::Manifest {
            origin: "an object".into(),
            what: object.metadata.name.clone().unwrap_or_default(),
            reason: "it has no apiVersion and kind".into(),
        })?;
        let (_, caps) = self.resource(&gvk).await?;
        Ok(ObjectKey {
            group: gvk.group.clone(),
            kind: gvk.kind.clone(),
            namespace: match caps.scope {
                Scope::Namespaced => Some(
                    object
                        .metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                ),
                Scope::Cluster => None,
            },
            name: object.metadata.name.clone().unwrap_or_default(),
        })
    }

    /// Server-side applies `object`, taking over fields another manager changed (a
    /// user's edit of a field kdist owns is put back). Returns the object as stored.
    pub async fn apply(&self, object: &DynamicObject) -> Result<DynamicObject, ControllerError> {
        let key = self.key_of(object).await?;
        let gvk = gvk_of(object).ok_or_else(|| ControllerError::Manifest {
            origin: key.to_string(),
            what: key.name.clone(),
            reason: "it has no apiVersion and kind".into(),
        })?;
        let (resource, caps) = self.resource(&gvk).await?;
        let api = self.api(&resource, &caps, key.namespace.as_deref());
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch(&key.name, &params, &Patch::Apply(object))
            .await
            .map_err(|e| ControllerError::api(format!("applying {key}"), e))
    }

    /// Deletes every object of the kinds `kinds` that carries the labels `selector` and
    /// is not in `keep`. Kinds the apiserver does not serve are skipped. Returns what
    /// was deleted.
    pub async fn prune(
        &self,
        kinds: &BTreeSet<(String, String, String)>,
        selector: &str,
        keep: &BTreeSet<ObjectKey>,
    ) -> Result<Vec<ObjectKey>, ControllerError> {
        let mut deleted = Vec::new();
        for (group, version, kind) in kinds {
            let gvk = GroupVersionKind::gvk(group, version, kind);
            let (resource, caps) = match self.resource(&gvk).await {
                Ok(found) => found,
                Err(ControllerError::Api {
                    source: kube::Error::Discovery(_),
                    ..
                }) => continue,
                Err(e) => return Err(e),
            };
            let all: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
            let list = all
                .list(&ListParams::default().labels(selector))
                .await
                .map_err(|e| ControllerError::api(format!("listing {kind} ({selector})"), e))?;
            for object in list {
                let key = ObjectKey {
                    group: group.clone(),
                    kind: kind.clone(),
                    namespace: match caps.scope {
                        Scope::Namespaced => object.metadata.namespace.clone(),
                        Scope::Cluster => None,
                    },
                    name: object.metadata.name.clone().unwrap_or_default(),
                };
                if keep.contains(&key) {
                    continue;
                }
                let api = self.api(&resource, &caps, key.namespace.as_deref());
                match api.delete(&key.name, &DeleteParams::background()).await {
                    Ok(_) => deleted.push(key),
                    Err(kube::Error::Api(status)) if status.code == 404 => {}
                    Err(e) => return Err(ControllerError::api(format!("deleting {key}"), e)),
                }
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_parse_and_empty_ones_are_skipped() {
        let text = "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: b\n  namespace: kube-system\n";
        let objects = parse_manifests(text, "test").unwrap();
        assert_eq!(objects.len(), 2);
        let gvk = gvk_of(&objects[1]).unwrap();
        assert_eq!(
            (gvk.group.as_str(), gvk.kind.as_str()),
            ("apps", "Deployment")
        );
        assert_eq!(
            objects[1].metadata.namespace.as_deref(),
            Some("kube-system")
        );
    }

    #[test]
    fn an_object_without_a_name_or_kind_is_refused_with_its_origin() {
        let err = parse_manifests("apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n", "f.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("f.yaml") && err.contains("metadata.name"),
            "{err}"
        );
        let err = parse_manifests("metadata: {name: x}\n", "g.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("g.yaml"), "{err}");
    }

    #[test]
    fn a_yaml_error_names_the_origin_and_line() {
        let err = parse_manifests("a: b\n  c: : d\n", "bad.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.yaml"), "{err}");
        assert!(err.contains('2'), "names the line: {err}");
    }
}
