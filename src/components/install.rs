//! One install, from the manifest to the `current` switch:
//! resolve the manifest, plan the assets for this os/arch, fetch them into
//! `.staging-<release>/downloads` (resumable, verified), build the release tree in
//! `.staging-<release>/tree`, rename it into place, switch `current`, drop the staging.
//! Until the rename nothing outside staging changes, so a failure or a kill leaves the
//! previous release active and the next run picks up the downloads already done.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;

use super::bundle;
use super::error::ComponentsError;
use super::fetch::{self, Digests, Download, RetryPolicy};
use super::manifest::{
    self, CNI_OPTIONAL, CNI_REQUIRED, ETCD_BINARIES, Extract, Planned, Release, ReleaseId, Use,
};
use super::progress::Progress;
use super::store::{AssetRecord, FileRecord, MANIFEST_FILE, RECORD_FILE, Record, Store, sync_dir};
use crate::config::{ComponentsConfig, DataDir, ReleasePin};
use crate::fsutil;

/// Where the manifest and the files come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// EKS-D (or a mirror): the channel's latest or a pinned release.
    Channel {
        channel: String,
        release: ReleasePin,
    },
    /// A manifest given by URL or file; assets from its URIs.
    Manifest(String),
    /// A directory with `manifest.yaml` and the asset files, or a bundle file.
    Local(PathBuf),
    /// A bundle carried inside the kdist binary.
    Embedded(&'static [u8]),
}

#[derive(Debug, Clone)]
pub struct Request {
    pub source: Source,
    /// Mirror of https://distro.eks.amazonaws.com for manifests and asset URIs.
    pub base_url: String,
    /// Make the release active when installed (or when it already was).
    pub activate: bool,
    pub retry: RetryPolicy,
    /// Downloads at once.
    pub parallel: usize,
    /// Fetch and install again even when the same manifest is installed (a repair after
    /// `kdist components verify` found damaged files).
    pub force: bool,
}

impl Request {
    /// The request `config.yaml` describes.
    pub fn from_config(config: &ComponentsConfig) -> Self {
        Self {
            source: Source::Channel {
                channel: config.channel.clone(),
                release: config.release,
            },
            base_url: config.base().to_string(),
            activate: true,
            retry: RetryPolicy::default(),
            parallel: 4,
            force: false,
        }
    }
}

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub id: ReleaseId,
    /// False when the same manifest was installed already (nothing was fetched).
    pub changed: bool,
    pub active: bool,
}

pub async fn install(
    data: &DataDir,
    request: &Request,
    progress: &Progress,
) -> Result<Outcome, ComponentsError> {
    let store = Store::new(data);
    let _lock = store.lock()?;
    store.clean_leftovers();
    let unpack = store.root().join(format!(".unpack-{}", std::process::id()));
    let mut result = install_locked(&store, request, progress, &unpack).await;
    // image archives of a bundle or --from directory go where the node imports them
    if result.is_ok()
        && let Source::Local(path) = &request.source
    {
        let from = if path.is_dir() {
            path.join("images")
        } else {
            unpack.join("images")
        };
        match bundle::stage_images(&from, &data.images_dir()) {
            Ok(staged) => {
                for image in staged {
                    progress.line(&format!("image archive {} staged", image.display()));
                }
            }
            Err(e) => result = Err(e),
        }
    }
    if unpack.exists() {
        let _ = std::fs::remove_dir_all(&unpack);
    }
    result
}

/// Files of a local source: the directory holding manifest.yaml and the asset files
/// (flat or under assets/), and how the source is named in the record.
struct LocalFiles {
    dir: PathBuf,
    label: String,
}

impl LocalFiles {
    fn find(&self, file: &str) -> Option<PathBuf> {
        [self.dir.join("assets").join(file), self.dir.join(file)]
            .into_iter()
            .find(|p| p.is_file())
    }
}

async fn install_locked(
    store: &Store,
    request: &Request,
    progress: &Progress,
    unpack: &Path,
) -> Result<Outcome, ComponentsError> {
    let base = request.base_url.trim_end_matches('/').to_string();
    let client = fetch::client()?;
    let ManifestSource {
        text,
        origin,
        local,
    } = read_manifest(store, request, &client, &base, progress, unpack).await?;
    let release = Release::parse(&text, &origin)?;
    let id = release.id();
    let (os, arch) = (manifest::host_os(), manifest::host_arch());
    let planned = release.plan(os, arch)?;
    let manifest_sha256 = super::store::sha256_hex(text.as_bytes());

    if let Some(outcome) = already_installed(store, request, &id, &manifest_sha256)? {
        return Ok(outcome);
    }
    // the active release would change under the node: not what --no-activate asks
    if !request.activate && store.active().as_ref() == Some(&id) {
        return Err(ComponentsError::ActiveNoActivate {
            release: id.to_string(),
        });
    }

    let staging = store.staging_dir(&id);
    let downloads = staging.join("downloads");
    fsutil::ensure_dir(&downloads, 0o755).map_err(ComponentsError::io(&downloads))?;
    progress.line(&format!(
        "installing EKS-D {} ({} assets for {os}/{arch}) from {}",
        id.eks_name(),
        planned.len(),
        local.as_ref().map(|l| l.label.as_str()).unwrap_or(&origin)
    ));
    let fetcher = Fetcher {
        request,
        client: &client,
        base: &base,
        progress,
        local: local.as_ref(),
    };
    if let Err(e) = fetcher.fetch_all(&planned, &downloads).await {
        if e.is_refusal() {
            // nothing to resume: the same manifest would refuse the same bytes again, and
            // `components list` would call the staging an interrupted install
            let _ = std::fs::remove_dir_all(&staging);
            sync_dir(store.root())?;
        }
        return Err(e);
    }

    let tree = staging.join("tree");
    let record = Record {
        release: id.to_string(),
        channel: id.channel.clone(),
        number: id.number,
        os: os.to_string(),
        arch: arch.to_string(),
        manifest_sha256,
        source: local.as_ref().map(|l| l.label.clone()).unwrap_or(origin),
        installed_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        assets: Vec::new(),
        files: Vec::new(),
    };
    {
        let (tree, downloads, planned) = (tree.clone(), downloads.clone(), planned.clone());
        let built = blocking(&staging, move || {
            build_tree(&tree, &downloads, &planned, &text, record)
        })
        .await;
        if let Err(e) = &built
            && e.is_refusal()
        {
            let _ = std::fs::remove_dir_all(&staging);
        }
        built?;
    }

    let target = store.release_dir(&id);
    put_in_place(store, &tree, &target)?;
    if request.activate {
        store.activate(&id)?;
    }
    let _ = std::fs::remove_dir_all(&staging);
    progress.line(&format!(
        "installed EKS-D {} into {}{}",
        id.eks_name(),
        target.display(),
        if request.activate { " (active)" } else { "" }
    ));
    Ok(Outcome {
        active: store.active().as_ref() == Some(&id),
        id,
        changed: true,
    })
}

/// A release manifest's text, where it came from (URL or path, for errors and the
/// record), and the local files that come with it (a directory, bundle or the binary).
struct ManifestSource {
    text: String,
    origin: String,
    local: Option<LocalFiles>,
}

/// Reads the manifest `request` names: from the channel (resolving `latest`), a URL or
/// file, or a local directory or bundle (unpacked into `unpack`), or the embedded one.
async fn read_manifest(
    store: &Store,
    request: &Request,
    client: &reqwest::Client,
    base: &str,
    progress: &Progress,
    unpack: &Path,
) -> Result<ManifestSource, ComponentsError> {
    let (text, origin, local) = match &request.source {
        Source::Channel { channel, release } => {
            let number = match release {
                ReleasePin::Number(n) => *n,
                ReleasePin::Latest => {
                    let url = manifest::channel_url(base, channel);
                    progress.line(&format!(
                        "resolving the latest release of channel {channel} ({url})"
                    ));
                    let text = fetch::get_text(client, &url, request.retry).await?;
                    let number = manifest::parse_channel(&text, &url)?;
                    super::outdated::keep_channel(store, channel, &text);
                    number
                }
            };
            let id = ReleaseId {
                channel: channel.clone(),
                number,
            };
            let url = manifest::manifest_url(base, &id);
            let text = fetch::get_text(client, &url, request.retry).await?;
            let release = Release::parse(&text, &url)?;
            if release.id() != id {
                return Err(ComponentsError::ManifestInvalid {
                    origin: url,
                    reason: format!("describes release {}, expected {id}", release.id()),
                });
            }
            (text, url, None)
        }
        Source::Manifest(given) => {
            if given.starts_with("http://") || given.starts_with("https://") {
                let text = fetch::get_text(client, given, request.retry).await?;
                (text, given.clone(), None)
            } else {
                let path = PathBuf::from(given);
                let text = std::fs::read_to_string(&path).map_err(ComponentsError::io(&path))?;
                (text, path.display().to_string(), None)
            }
        }
        Source::Local(path) => {
            let local = if path.is_dir() {
                LocalFiles {
                    dir: path.clone(),
                    label: format!("dir:{}", path.display()),
                }
            } else {
                let file = std::fs::File::open(path).map_err(ComponentsError::io(path))?;
                let (owned_path, owned_unpack) = (path.clone(), unpack.to_path_buf());
                blocking(path, move || {
                    bundle::unpack(file, &owned_path, &owned_unpack)
                })
                .await?;
                LocalFiles {
                    dir: unpack.to_path_buf(),
                    label: format!("bundle:{}", path.display()),
                }
            };
            let manifest_path = local.dir.join(MANIFEST_FILE);
            let text = std::fs::read_to_string(&manifest_path).map_err(|_| {
                ComponentsError::Source {
                    path: path.clone(),
                    reason: format!(
                        "has no {MANIFEST_FILE}; a --from directory holds the release manifest and its asset files (see `kdist components bundle`)"
                    ),
                }
            })?;
            (text, path.display().to_string(), Some(local))
        }
        Source::Embedded(bytes) => {
            let owned_unpack = unpack.to_path_buf();
            let bytes: &'static [u8] = bytes;
            blocking(unpack, move || {
                bundle::unpack(bytes, Path::new("(embedded components)"), &owned_unpack)
            })
            .await?;
            let text = std::fs::read_to_string(unpack.join(MANIFEST_FILE))
                .map_err(ComponentsError::io(&unpack.join(MANIFEST_FILE)))?;
            let local = LocalFiles {
                dir: unpack.to_path_buf(),
                label: "embedded".into(),
            };
            (text, "embedded components".to_string(), Some(local))
        }
    };
    Ok(ManifestSource {
        text,
        origin,
        local,
    })
}

/// The outcome when the same manifest is installed already (activated if asked): there
/// is nothing to fetch. None when it must be installed (or `--force` asks to).
fn already_installed(
    store: &Store,
    request: &Request,
    id: &ReleaseId,
    manifest_sha256: &str,
) -> Result<Option<Outcome>, ComponentsError> {
    if request.force {
        return Ok(None);
    }
    match store.record(id) {
        Ok(record) if record.manifest_sha256 == manifest_sha256 => {}
        _ => return Ok(None),
    }
    if request.activate && store.active().as_ref() != Some(id) {
        store.activate(id)?;
    }
    Ok(Some(Outcome {
        active: store.active().as_ref() == Some(id),
        id: id.clone(),
        changed: false,
    }))
}

/// Brings every planned asset into a downloads directory, verified: copied from the
/// local files, or downloaded from the (mirrored) URIs, `request.parallel` at a time.
struct Fetcher<'a> {
    request: &'a Request,
    client: &'a reqwest::Client,
    base: &'a str,
    progress: &'a Progress,
    local: Option<&'a LocalFiles>,
}

impl Fetcher<'_> {
    async fn fetch_all(
        &self,
        planned: &[Planned],
        downloads: &Path,
    ) -> Result<(), ComponentsError> {
        let fetches = planned
            .iter()
            .map(|p| self.fetch(p, downloads.join(&p.file)));
        let results: Vec<Result<Digests, ComponentsError>> = futures::stream::iter(fetches)
            .buffered(self.request.parallel.max(1))
            .collect()
            .await;
        // a refusal first: it decides what happens to the staging
        let mut first = None;
        for result in results {
            if let Err(e) = result {
                if e.is_refusal() {
                    return Err(e);
                }
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    async fn fetch(&self, p: &Planned, dest: PathBuf) -> Result<Digests, ComponentsError> {
        let item = self.progress.item(&p.label());
        let what = format!("{} ({})", p.file, p.component);
        match self.local {
            Some(local) => {
                let from = local.find(&p.file).ok_or_else(|| ComponentsError::Source {
                    path: local.dir.clone(),
                    reason: format!(
                        "lacks {} (asset {} of component {}); put the file there or make a bundle with `kdist components bundle`",
                        p.file, p.asset, p.component
                    ),
                })?;
                fetch::copy_local(&from, &dest, &p.sha256, &p.sha512, &what, &item).await
            }
            None => {
                let url = manifest::rebase(&p.uri, self.base);
                let job = Download {
                    url: &url,
                    dest: &dest,
                    sha256: &p.sha256,
                    sha512: &p.sha512,
                    what: &what,
                };
                fetch::download(self.client, job, self.request.retry, &item).await
            }
        }
    }
}

/// Moves the tree built in staging to `target`, so a reader of the store sees the old
/// release or the new one, never a half.
fn put_in_place(store: &Store, tree: &Path, target: &Path) -> Result<(), ComponentsError> {
    if target.exists() {
        // same release again (re-published, the embedded one changed, or a repair): one
        // atomic exchange, so `current` never points at nothing and a failure leaves the
        // installed release as it was; the old tree ends up in staging
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            tree,
            nix::fcntl::AT_FDCWD,
            target,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(|errno| ComponentsError::Io {
            path: target.to_path_buf(),
            source: std::io::Error::from(errno),
        })?;
    } else {
        std::fs::rename(tree, target).map_err(ComponentsError::io(target))?;
    }
    sync_dir(store.root())
}

async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, ComponentsError> + Send + 'static,
) -> Result<T, ComponentsError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| ComponentsError::Task {
            path: path.to_path_buf(),
            source,
        })?
}

/// Lays out `tree/` from verified downloads: bin/, cni/, assets/, manifest.yaml and the
/// record, all synced. Downloads are hard-linked, so they survive a failure here.
fn build_tree(
    tree: &Path,
    downloads: &Path,
    planned: &[Planned],
    manifest_text: &str,
    mut record: Record,
) -> Result<(), ComponentsError> {
    if tree.exists() {
        std::fs::remove_dir_all(tree).map_err(ComponentsError::io(tree))?;
    }
    for dir in ["bin", "cni", "assets"] {
        let path = tree.join(dir);
        fsutil::ensure_dir(&path, 0o755).map_err(ComponentsError::io(&path))?;
    }
    for p in planned {
        let download = downloads.join(&p.file);
        let stored_at = match p.use_ {
            Use::Binary(name) => {
                let rel = format!("bin/{name}");
                link_or_copy(&download, &tree.join(&rel), 0o755)?;
                record.files.push(FileRecord {
                    path: rel.clone(),
                    component: p.component.clone(),
                    version: p.version.clone(),
                    size: std::fs::metadata(tree.join(&rel))
                        .map(|m| m.len())
                        .unwrap_or(0),
                    sha256: p.sha256.clone(),
                    sha512: p.sha512.clone(),
                });
                rel
            }
            Use::Tarball(extract) => {
                let (dir, required, optional): (&str, &[&str], &[&str]) = match extract {
                    Extract::Etcd => ("bin", ETCD_BINARIES, &[]),
                    Extract::Cni => ("cni", CNI_REQUIRED, CNI_OPTIONAL),
                };
                for (rel, digests) in
                    extract_members(&download, &tree.join(dir), required, optional)?
                {
                    record.files.push(FileRecord {
                        path: format!("{dir}/{rel}"),
                        component: p.component.clone(),
                        version: p.version.clone(),
                        size: digests.size,
                        sha256: digests.sha256,
                        sha512: digests.sha512,
                    });
                }
                let rel = format!("assets/{}", p.file);
                link_or_copy(&download, &tree.join(&rel), 0o644)?;
                rel
            }
        };
        record.assets.push(AssetRecord {
            component: p.component.clone(),
            asset: p.asset.clone(),
            file: p.file.clone(),
            stored_at,
            sha256: p.sha256.clone(),
            sha512: p.sha512.clone(),
        });
    }
    fsutil::atomic_write(&tree.join(MANIFEST_FILE), manifest_text.as_bytes(), 0o644)
        .map_err(ComponentsError::io(&tree.join(MANIFEST_FILE)))?;
    let json = serde_json::to_vec_pretty(&record).map_err(|e| ComponentsError::Io {
        path: tree.join(RECORD_FILE),
        source: std::io::Error::other(e),
    })?;
    // the record is written last: a tree with a record is a complete one
    fsutil::atomic_write(&tree.join(RECORD_FILE), &json, 0o644)
        .map_err(ComponentsError::io(&tree.join(RECORD_FILE)))?;
    for dir in ["bin", "cni", "assets", ""] {
        sync_dir(&tree.join(dir))?;
    }
    Ok(())
}

fn link_or_copy(from: &Path, to: &Path, mode: u32) -> Result<(), ComponentsError> {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).map_err(ComponentsError::io(from))?;
    }
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))
        .map_err(ComponentsError::io(to))?;
    std::fs::File::open(to)
        .and_then(|f| f.sync_all())
        .map_err(ComponentsError::io(to))
}

/// Extracts the regular files whose base name is wanted into `dest` (by base name only:
/// nothing in an archive can write outside `dest`). Returns each file's digests.
fn extract_members(
    archive: &Path,
    dest: &Path,
    required: &[&str],
    optional: &[&str],
) -> Result<Vec<(String, Digests)>, ComponentsError> {
    let file = std::fs::File::open(archive).map_err(ComponentsError::io(archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let bad = |source| ComponentsError::Archive {
        path: archive.to_path_buf(),
        source,
    };
    let mut taken = BTreeSet::new();
    let mut out = Vec::new();
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(bad)?.into_owned();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        let wanted = required.contains(&name.as_str()) || optional.contains(&name.as_str());
        if !wanted || taken.contains(&name) {
            continue;
        }
        let target = dest.join(&name);
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(bad)?;
        fsutil::atomic_write(&target, &bytes, 0o755).map_err(ComponentsError::io(&target))?;
        let digests = fetch::digest_file(&target)?;
        taken.insert(name.clone());
        out.push((name, digests));
    }
    for name in required {
        if !taken.contains(*name) {
            return Err(ComponentsError::MissingMember {
                archive: archive
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default(),
                member: name.to_string(),
            });
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Default retry policy, with the number of attempts from the command line.
pub fn retry_with(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts: attempts.max(1),
        first_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(10),
    }
}
