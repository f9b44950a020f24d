//! The EKS-D `Release` and `ReleaseChannel` resources (distro.eks.amazonaws.com/v1alpha1)
//! and the choice of the assets this node needs from a release.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::ComponentsError;

pub const API_VERSION: &str = "distro.eks.amazonaws.com/v1alpha1";

/// Kubernetes binaries published one file per asset (component `kubernetes`).
pub const KUBE_BINARIES: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
];
/// Binaries taken from the etcd tarball.
pub const ETCD_BINARIES: &[&str] = &["etcd", "etcdctl"];
/// CNI plugins taken from the cni-plugins tarball: the first four are what kubelet's
/// bridge network needs and must be there; the rest are installed when published.
pub const CNI_REQUIRED: &[&str] = &["bridge", "host-local", "loopback", "portmap"];
pub const CNI_OPTIONAL: &[&str] = &["bandwidth", "firewall", "tuning", "host-device"];

/// Every binary a release provides under `bin/`, in a stable order.
pub fn binaries() -> impl Iterator<Item = &'static str> {
    KUBE_BINARIES.iter().chain(ETCD_BINARIES).copied()
}

/// A `Release` manifest, e.g. `kubernetes-1-31-eks-12.yaml`. Unknown fields are kept
/// out of the structs but tolerated: EKS-D adds fields over time.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Release {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: Metadata,
    pub spec: ReleaseSpec,
    #[serde(default)]
    pub status: ReleaseStatus,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseSpec {
    pub channel: String,
    /// An integer in published manifests; the first CRD typed it as a string, so a
    /// quoted number is read too.
    #[serde(deserialize_with = "number_or_string")]
    pub number: u32,
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u32),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Number(n) => Ok(n),
        Raw::Text(t) => t
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("spec.number `{t}` is not a number"))),
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ReleaseStatus {
    #[serde(default)]
    pub date: Option<String>,
    #[serde(default)]
    pub components: Vec<Component>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Component {
    pub name: String,
    #[serde(default)]
    pub git_tag: String,
    #[serde(default)]
    pub assets: Vec<Asset>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Asset {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub arch: Vec<String>,
    #[serde(default)]
    pub archive: Option<Archive>,
    /// An Image asset's reference (`pause-image`, `coredns-image`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ImageRef {
    pub uri: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Archive {
    /// Absolute URL of the file.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uri: String,
    /// Path under EKS-D's base URL; newer build tooling records it next to (or
    /// instead of) `uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub sha256: String,
    pub sha512: String,
}

impl Archive {
    /// Where to fetch the file: `uri`, else `path` under the official base URL.
    pub fn url(&self) -> Option<String> {
        if !self.uri.is_empty() {
            return Some(self.uri.clone());
        }
        self.path.as_deref().map(|p| {
            format!(
                "{}/{}",
                crate::config::DEFAULT_BASE_URL,
                p.trim_start_matches('/')
            )
        })
    }
}

/// A `ReleaseChannel` (`releasechannels/<channel>.yaml`): only its newest release matters.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseChannel {
    pub api_version: String,
    pub kind: String,
    pub status: ChannelStatus,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelStatus {
    #[serde(default)]
    pub latest_release: u32,
}

/// A release as kdist names it on disk and on the command line: `<channel>-<number>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReleaseId {
    pub channel: String,
    pub number: u32,
}

impl fmt::Display for ReleaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.channel, self.number)
    }
}

impl ReleaseId {
    /// Reads `1-31-12`, `kubernetes-1-31-eks-12` or `v1-31-eks-12`.
    pub fn parse(given: &str) -> Result<Self, ComponentsError> {
        let bad = || ComponentsError::BadReleaseId {
            given: given.to_string(),
        };
        let s = given.trim();
        let s = s.strip_prefix("kubernetes-").unwrap_or(s);
        let s = s.strip_prefix('v').unwrap_or(s);
        let s = s.replace("-eks-", "-");
        let mut parts = s.split('-');
        let (Some(major), Some(minor), Some(number), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let channel = format!("{major}-{minor}");
        crate::config::check_channel(&channel).map_err(|_| bad())?;
        let number: u32 = number.parse().map_err(|_| bad())?;
        if number == 0 {
            return Err(bad());
        }
        Ok(Self { channel, number })
    }

    /// EKS-D's own name: `kubernetes-1-31-eks-12`.
    pub fn eks_name(&self) -> String {
        format!("kubernetes-{}-eks-{}", self.channel, self.number)
    }
}

impl Release {
    /// Parses and checks a manifest; `origin` (URL or path) names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ComponentsError> {
        let release: Self =
            crate::yaml::from_str(text).map_err(|source| ComponentsError::ManifestParse {
                origin: origin.to_string(),
                source,
            })?;
        let invalid = |reason: String| ComponentsError::ManifestInvalid {
            origin: origin.to_string(),
            reason,
        };
        if release.kind != "Release" || release.api_version != API_VERSION {
            return Err(invalid(format!(
                "is {} {}, expected kind Release of {API_VERSION}",
                release.api_version, release.kind
            )));
        }
        crate::config::check_channel(&release.spec.channel)
            .map_err(|error| invalid(format!("spec.channel: {error}")))?;
        if release.spec.number == 0 {
            return Err(invalid("spec.number must be 1 or more".into()));
        }
        Ok(release)
    }

    pub fn id(&self) -> ReleaseId {
        ReleaseId {
            channel: self.spec.channel.clone(),
            number: self.spec.number,
        }
    }

    fn component(&self, name: &str) -> Option<&Component> {
        self.status.components.iter().find(|c| c.name == name)
    }

    /// The git tag of `component`, e.g. the Kubernetes version.
    pub fn version_of(&self, component: &str) -> Option<&str> {
        self.component(component)
            .map(|c| c.git_tag.as_str())
            .filter(|t| !t.is_empty())
    }

    /// The image reference of the Image asset `asset` (e.g. `coredns-image`) of any
    /// component.
    pub fn image(&self, asset: &str) -> Option<&str> {
        self.status
            .components
            .iter()
            .flat_map(|c| &c.assets)
            .filter(|a| a.kind == "Image" && a.name == asset)
            .find_map(|a| a.image.as_ref())
            .map(|i| i.uri.as_str())
            .filter(|u| !u.is_empty())
    }

    /// Picks the archive assets this node needs for `os`/`arch`; names everything that is
    /// missing at once so one error says what the release lacks.
    pub fn plan(&self, os: &str, arch: &str) -> Result<Vec<Planned>, ComponentsError> {
        let mut planned = Vec::new();
        let mut missing = Vec::new();
        let fits = |a: &Asset| {
            a.kind == "Archive"
                && a.os == os
                && a.arch.iter().any(|x| x == arch)
                && a.archive.as_ref().and_then(Archive::url).is_some()
        };
        let kube = self.component("kubernetes");
        for bin in KUBE_BINARIES {
            let wanted = format!("bin/{os}/{arch}/{bin}");
            let asset = kube.and_then(|c| c.assets.iter().find(|a| fits(a) && a.name == wanted));
            match (kube, asset) {
                (Some(c), Some(a)) => planned.push(Planned::new(c, a, Use::Binary(bin))),
                _ => missing.push(format!("{bin} (kubernetes asset {wanted})")),
            }
        }
        for (component, use_) in [
            ("etcd", Use::Tarball(Extract::Etcd)),
            ("cni-plugins", Use::Tarball(Extract::Cni)),
        ] {
            let c = self.component(component);
            let asset = c.and_then(|c| {
                c.assets
                    .iter()
                    .find(|a| fits(a) && a.name.ends_with(".tar.gz"))
            });
            match (c, asset) {
                (Some(c), Some(a)) => planned.push(Planned::new(c, a, use_)),
                _ => missing.push(format!("{component} (a .tar.gz archive)")),
            }
        }
        if !missing.is_empty() {
            return Err(ComponentsError::MissingAssets {
                release: self.id().to_string(),
                os: os.to_string(),
                arch: arch.to_string(),
                missing,
            });
        }
        Ok(planned)
    }
}

/// What kdist does with a downloaded asset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// The asset is the binary `bin/<name>`.
    Binary(&'static str),
    /// The asset is a tarball to pick files from.
    Tarball(Extract),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extract {
    /// `etcd` and `etcdctl` into `bin/`.
    Etcd,
    /// The CNI plugins into `cni/`.
    Cni,
}

/// One asset to fetch, verify and install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub component: String,
    pub version: String,
    pub asset: String,
    pub uri: String,
    /// The last segment of the URI: the file name in staging, bundles and `--from` dirs.
    pub file: String,
    pub sha256: String,
    pub sha512: String,
    pub use_: Use,
}

impl Planned {
    fn new(component: &Component, asset: &Asset, use_: Use) -> Self {
        // plan() only keeps assets with an archive that has a URL
        let archive = asset.archive.clone().unwrap_or(Archive {
            uri: String::new(),
            path: None,
            sha256: String::new(),
            sha512: String::new(),
        });
        let uri = archive.url().unwrap_or_default();
        let file = uri.rsplit('/').next().unwrap_or(&asset.name).to_string();
        Self {
            component: component.name.clone(),
            version: component.git_tag.clone(),
            asset: asset.name.clone(),
            file,
            uri,
            sha256: archive.sha256.to_lowercase(),
            sha512: archive.sha512.to_lowercase(),
            use_,
        }
    }

    /// What the user calls this asset in messages.
    pub fn label(&self) -> String {
        match self.use_ {
            Use::Binary(bin) => bin.to_string(),
            Use::Tarball(_) => self.file.clone(),
        }
    }
}

/// EKS-D's name for this machine's architecture.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

pub fn host_os() -> &'static str {
    std::env::consts::OS
}

/// Rewrites an asset URI onto a mirror: a URI under EKS-D's official base is moved to
/// `base`; other URIs are left alone.
pub fn rebase(uri: &str, base: &str) -> String {
    let official = crate::config::DEFAULT_BASE_URL;
    match uri.strip_prefix(official) {
        Some(rest) if base != official => format!("{base}{rest}"),
        _ => uri.to_string(),
    }
}

pub fn manifest_url(base: &str, id: &ReleaseId) -> String {
    format!("{base}/kubernetes-{}/{}.yaml", id.channel, id.eks_name())
}

pub fn channel_url(base: &str, channel: &str) -> String {
    format!("{base}/releasechannels/{channel}.yaml")
}

/// Parses a `ReleaseChannel` and returns its newest release number.
pub fn parse_channel(text: &str, origin: &str) -> Result<u32, ComponentsError> {
    let channel: ReleaseChannel =
        crate::yaml::from_str(text).map_err(|source| ComponentsError::ManifestParse {
            origin: origin.to_string(),
            source,
        })?;
    if channel.kind != "ReleaseChannel" || channel.api_version != API_VERSION {
        return Err(ComponentsError::ManifestInvalid {
            origin: origin.to_string(),
            reason: format!(
                "is {} {}, expected kind ReleaseChannel of {API_VERSION}",
                channel.api_version, channel.kind
            ),
        });
    }
    if channel.status.latest_release == 0 {
        return Err(ComponentsError::ManifestInvalid {
            origin: origin.to_string(),
            reason: "status.latestRelease is missing".into(),
        });
    }
    Ok(channel.status.latest_release)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_ids_parse_in_every_spelling() {
        for s in ["1-31-12", "kubernetes-1-31-eks-12", "v1-31-eks-12"] {
            let id = ReleaseId::parse(s).unwrap();
            assert_eq!(id.to_string(), "1-31-12", "{s}");
        }
        assert_eq!(
            ReleaseId::parse("1-31-12").unwrap().eks_name(),
            "kubernetes-1-31-eks-12"
        );
        for bad in ["1-31", "1.31.12", "1-31-x", "1-31-0", "1-31-2-3"] {
            let err = ReleaseId::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn mirror_rewrites_official_uris_only() {
        let uri = "https://distro.eks.amazonaws.com/kubernetes-1-31/releases/12/artifacts/x";
        assert_eq!(
            rebase(uri, "http://127.0.0.1:8080"),
            "http://127.0.0.1:8080/kubernetes-1-31/releases/12/artifacts/x"
        );
        assert_eq!(rebase(uri, crate::config::DEFAULT_BASE_URL), uri);
        assert_eq!(rebase("https://other/x", "http://m"), "https://other/x");
    }

    #[test]
    fn wrong_kind_is_refused() {
        let text = "apiVersion: distro.eks.amazonaws.com/v1alpha1\nkind: ReleaseChannel\nspec: {channel: 1-31, number: 1}\n";
        let err = Release::parse(text, "m.yaml").unwrap_err().to_string();
        assert!(
            err.contains("m.yaml") && err.contains("kind Release"),
            "{err}"
        );
    }

    const FIXTURE: &str = include_str!("../../tests/fixtures/kubernetes-1-31-eks-12.yaml");

    #[test]
    fn published_manifest_shape_parses_and_plans() {
        let release = Release::parse(FIXTURE, "fixture").unwrap();
        assert_eq!(release.id().to_string(), "1-31-12");
        assert_eq!(release.metadata.name, "kubernetes-1-31-eks-12");
        assert_eq!(release.version_of("kubernetes"), Some("v1.31.4"));
        assert_eq!(release.version_of("etcd"), Some("v3.5.16"));
        assert_eq!(release.status.date.as_deref(), Some("2025-01-09T18:22:41Z"));
        for arch in ["amd64", "arm64"] {
            let plan = release.plan("linux", arch).unwrap();
            assert_eq!(plan.len(), KUBE_BINARIES.len() + 2, "{arch}");
            let apiserver = plan
                .iter()
                .find(|p| p.use_ == Use::Binary("kube-apiserver"))
                .unwrap();
            assert_eq!(
                apiserver.uri,
                format!(
                    "https://distro.eks.amazonaws.com/kubernetes-1-31/releases/12/artifacts/kubernetes/v1.31.4/bin/linux/{arch}/kube-apiserver"
                )
            );
            assert_eq!(apiserver.file, "kube-apiserver");
            assert_eq!(apiserver.sha256.len(), 64);
            assert_eq!(apiserver.sha512.len(), 128);
            let etcd = plan
                .iter()
                .find(|p| p.use_ == Use::Tarball(Extract::Etcd))
                .unwrap();
            assert_eq!(etcd.file, format!("etcd-linux-{arch}-v3.5.16.tar.gz"));
            let cni = plan
                .iter()
                .find(|p| p.use_ == Use::Tarball(Extract::Cni))
                .unwrap();
            assert_eq!(cni.version, "v1.6.0");
            // the node tarball also holds a kubelet, but the per-file asset is the one used
            assert!(plan.iter().all(|p| !p.file.starts_with("kubernetes-")));
        }
        // images and other OSes are never picked
        let err = release.plan("linux", "riscv64").unwrap_err().to_string();
        assert!(err.contains("linux/riscv64"), "{err}");
        assert!(
            err.contains("kube-apiserver") && err.contains("etcd") && err.contains("cni-plugins"),
            "{err}"
        );
        let darwin = release.plan("darwin", "amd64").unwrap_err().to_string();
        assert!(
            darwin.contains("kubelet") && !darwin.contains("kubectl ("),
            "{darwin}"
        );
    }

    #[test]
    fn quoted_numbers_and_path_only_archives_are_read() {
        let text = "apiVersion: distro.eks.amazonaws.com/v1alpha1\nkind: Release\nspec:\n  channel: 1-31\n  number: \"7\"\nstatus:\n  components:\n  - name: etcd\n    gitTag: v3.5.16\n    assets:\n    - name: etcd-linux-amd64-v3.5.16.tar.gz\n      type: Archive\n      os: linux\n      arch: [amd64]\n      archive:\n        path: kubernetes-1-31/releases/7/artifacts/etcd/v3.5.16/etcd-linux-amd64-v3.5.16.tar.gz\n        sha256: aa\n        sha512: bb\n";
        let release = Release::parse(text, "m").unwrap();
        assert_eq!(release.id().to_string(), "1-31-7");
        let err = release.plan("linux", "amd64").unwrap_err().to_string();
        // etcd is found (through its path); the others are missing
        assert!(!err.contains("etcd (a .tar.gz"), "{err}");
        assert!(err.contains("kubelet"), "{err}");
        let etcd = &release.status.components[0].assets[0];
        assert_eq!(
            etcd.archive.as_ref().unwrap().url().unwrap(),
            "https://distro.eks.amazonaws.com/kubernetes-1-31/releases/7/artifacts/etcd/v3.5.16/etcd-linux-amd64-v3.5.16.tar.gz"
        );
        let bad = text.replace("\"7\"", "seven");
        let err = Release::parse(&bad, "m.yaml").unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(
            chain.contains("m.yaml") && chain.contains("seven"),
            "{chain}"
        );
    }

    #[test]
    fn channel_latest_is_read() {
        let text = "apiVersion: distro.eks.amazonaws.com/v1alpha1\nkind: ReleaseChannel\nmetadata: {name: 1-31}\nspec: {snsTopicARN: x}\nstatus: {active: true, latestRelease: 39}\n";
        assert_eq!(parse_channel(text, "c").unwrap(), 39);
    }
}
