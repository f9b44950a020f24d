//! The channel's newest release against the active one: what `kdist components
//! outdated` shows and what `kdist upgrade --release latest` resolves.

use serde::Serialize;

use super::error::ComponentsError;
use super::fetch::{self, RetryPolicy};
use super::manifest::{self, Release, ReleaseId};
use super::store::Store;
use crate::config::DataDir;

/// The active release and the channel's latest, with each component's version in both.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Outdated {
    pub channel: String,
    pub active: String,
    pub latest: String,
    /// Releases between the active one and the latest (0 when up to date; the active
    /// one can be newer than what the channel names, then this is 0 too).
    pub behind: u32,
    pub up_to_date: bool,
    pub components: Vec<VersionChange>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VersionChange {
    pub component: String,
    /// `None` when the release does not have the component.
    pub active: Option<String>,
    pub latest: Option<String>,
    pub changed: bool,
}

/// The newest release number of `channel` from the release channel manifest, which is
/// kept under `<data>/components/channels/` for the cluster's `ReleaseChannel` object.
pub async fn latest_number(
    data: &DataDir,
    base_url: &str,
    channel: &str,
    retry: RetryPolicy,
) -> Result<u32, ComponentsError> {
    let client = fetch::client()?;
    let url = manifest::channel_url(base_url.trim_end_matches('/'), channel);
    let text = fetch::get_text(&client, &url, retry).await?;
    let number = manifest::parse_channel(&text, &url)?;
    keep_channel(&Store::new(data), channel, &text);
    Ok(number)
}

/// Saves a fetched channel document; a failure only costs the cluster the published
/// form of the channel (kdist then writes its own), so it is logged, not returned.
pub(crate) fn keep_channel(store: &Store, channel: &str, text: &str) {
    if let Err(e) = store.save_channel(channel, text) {
        tracing::warn!(
            "cannot keep the published channel {channel}: {}",
            crate::report::error_chain(&e)
        );
    }
}

/// Fetches the `Release` manifest of `id` from `base_url` (EKS-D or a mirror).
pub async fn fetch_release(
    base_url: &str,
    id: &ReleaseId,
    retry: RetryPolicy,
) -> Result<Release, ComponentsError> {
    let client = fetch::client()?;
    let url = manifest::manifest_url(base_url.trim_end_matches('/'), id);
    let text = fetch::get_text(&client, &url, retry).await?;
    let release = Release::parse(&text, &url)?;
    if release.id() != *id {
        return Err(ComponentsError::ManifestInvalid {
            origin: url,
            reason: format!("describes release {}, expected {id}", release.id()),
        });
    }
    Ok(release)
}

/// Compares the active release with the newest of its channel at `base_url`.
pub async fn outdated(
    data: &DataDir,
    base_url: &str,
    retry: RetryPolicy,
) -> Result<Outdated, ComponentsError> {
    let store = Store::new(data);
    let active = store.active().ok_or_else(|| ComponentsError::NoActive {
        path: store.current_link(),
    })?;
    let installed = store.manifest(&active)?;
    let number = latest_number(data, base_url, &active.channel, retry).await?;
    let latest_id = ReleaseId {
        channel: active.channel.clone(),
        number,
    };
    let latest = if latest_id == active {
        installed.clone()
    } else {
        fetch_release(base_url, &latest_id, retry).await?
    };
    Ok(compare(&installed, &latest))
}

/// The version change of every component named by either release, in the order the
/// active release lists them, then the ones only the latest has.
pub fn compare(active: &Release, latest: &Release) -> Outdated {
    let mut names: Vec<&str> = active
        .status
        .components
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    for c in &latest.status.components {
        if !names.contains(&c.name.as_str()) {
            names.push(&c.name);
        }
    }
    let components = names
        .into_iter()
        .map(|name| {
            let (a, l) = (active.version_of(name), latest.version_of(name));
            VersionChange {
                component: name.to_string(),
                active: a.map(str::to_string),
                latest: l.map(str::to_string),
                changed: a != l,
            }
        })
        .collect();
    let (a, l) = (active.id(), latest.id());
    let behind = l.number.saturating_sub(a.number);
    Outdated {
        channel: a.channel.clone(),
        active: a.to_string(),
        latest: l.to_string(),
        behind,
        up_to_date: behind == 0,
        components,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(number: u32, kube: &str, etcd: &str, extra: Option<&str>) -> Release {
        let mut text = format!(
            "apiVersion: distro.eks.amazonaws.com/v1alpha1\nkind: Release\nspec:\n  channel: 1-31\n  number: {number}\nstatus:\n  components:\n  - name: kubernetes\n    gitTag: {kube}\n  - name: etcd\n    gitTag: {etcd}\n"
        );
        if let Some(name) = extra {
            text += &format!("  - name: {name}\n    gitTag: v1.0.0\n");
        }
        Release::parse(&text, "test").unwrap()
    }

    #[test]
    fn one_behind_names_each_version_change() {
        let a = release(3, "v1.31.4", "v3.5.16", None);
        let l = release(4, "v1.31.5", "v3.5.16", Some("coredns"));
        let o = compare(&a, &l);
        assert_eq!((o.behind, o.up_to_date), (1, false));
        assert_eq!((o.active.as_str(), o.latest.as_str()), ("1-31-3", "1-31-4"));
        let by = |n: &str| o.components.iter().find(|c| c.component == n).unwrap();
        assert!(by("kubernetes").changed);
        assert_eq!(by("kubernetes").latest.as_deref(), Some("v1.31.5"));
        assert!(!by("etcd").changed);
        assert_eq!(by("coredns").active, None);
        assert!(by("coredns").changed);
    }

    #[test]
    fn the_same_release_is_up_to_date() {
        let a = release(4, "v1.31.5", "v3.5.16", None);
        let o = compare(&a, &a);
        assert!(o.up_to_date);
        assert!(o.components.iter().all(|c| !c.changed));
    }
}
