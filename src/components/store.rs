//! The installed releases under `<data>/components/`: one directory per release, the
//! `current` symlink naming the active one, the per-release record of digests, the
//! staging directories of installs in progress and the lock that serialises changes.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::Flock;
use serde::{Deserialize, Serialize};

use super::error::ComponentsError;
use super::fetch;
use super::manifest::{Release, ReleaseId};
use crate::config::DataDir;
use crate::fsutil;

pub const MANIFEST_FILE: &str = "manifest.yaml";
pub const RECORD_FILE: &str = "record.json";
/// Where the published `ReleaseChannel` documents kdist fetched are kept, one
/// `<channel>.yaml` each, as published.
pub const CHANNELS_DIR: &str = "channels";

/// Paths of the components part of the data dir.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// What was installed, from where, with the digests of every file kdist put on disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub release: String,
    pub channel: String,
    pub number: u32,
    pub os: String,
    pub arch: String,
    /// sha256 of manifest.yaml: a reinstall of the same manifest is a no-op.
    pub manifest_sha256: String,
    /// Where the files came from (a URL, `dir:PATH`, `bundle:PATH`, `embedded`).
    pub source: String,
    pub installed_at: u64,
    /// The verified EKS-D assets and where their bytes are kept in the release dir.
    pub assets: Vec<AssetRecord>,
    /// Every file under bin/ and cni/.
    pub files: Vec<FileRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AssetRecord {
    pub component: String,
    pub asset: String,
    pub file: String,
    /// Path inside the release dir holding the asset's bytes.
    pub stored_at: String,
    pub sha256: String,
    pub sha512: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileRecord {
    /// Relative to the release dir, e.g. `bin/etcd`, `cni/bridge`.
    pub path: String,
    pub component: String,
    pub version: String,
    pub size: u64,
    pub sha256: String,
    pub sha512: String,
}

/// Held while a command changes the store; released on drop (and by the kernel when
/// the process dies, so a killed install never blocks the next one).
pub struct StoreLock {
    _lock: Flock<File>,
}

impl Store {
    pub fn new(data: &DataDir) -> Self {
        Self {
            root: data.components_dir(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn release_dir(&self, id: &ReleaseId) -> PathBuf {
        self.root.join(id.to_string())
    }
    pub fn staging_dir(&self, id: &ReleaseId) -> PathBuf {
        self.root.join(format!(".staging-{id}"))
    }
    pub fn current_link(&self) -> PathBuf {
        self.root.join("current")
    }
    /// `<data>/components/current/bin/<name>`: where the supervisor looks first.
    pub fn current_bin(&self, name: &str) -> PathBuf {
        self.current_link().join("bin").join(name)
    }

    /// `<data>/components/channels/<channel>.yaml`: the channel's document as EKS-D
    /// (or the mirror) last published it to this node.
    pub fn channel_file(&self, channel: &str) -> PathBuf {
        self.root.join(CHANNELS_DIR).join(format!("{channel}.yaml"))
    }

    /// Keeps the published document of `channel` (already parsed and checked), written
    /// atomically, for the cluster's `ReleaseChannel` object.
    pub fn save_channel(&self, channel: &str, text: &str) -> Result<(), ComponentsError> {
        let dir = self.root.join(CHANNELS_DIR);
        fsutil::ensure_dir(&dir, 0o755).map_err(ComponentsError::io(&dir))?;
        let path = self.channel_file(channel);
        fsutil::atomic_write(&path, text.as_bytes(), 0o644).map_err(ComponentsError::io(&path))
    }

    /// The saved published document of `channel`, if kdist ever fetched it.
    pub fn saved_channel(&self, channel: &str) -> Option<String> {
        std::fs::read_to_string(self.channel_file(channel)).ok()
    }

    pub fn ensure(&self) -> Result<(), ComponentsError> {
        fsutil::ensure_dir(&self.root, 0o755).map_err(ComponentsError::io(&self.root))
    }

    pub fn lock(&self) -> Result<StoreLock, ComponentsError> {
        self.ensure()?;
        let path = self.root.join(".lock");
        match fsutil::try_lock_exclusive(&path).map_err(ComponentsError::io(&path))? {
            Some(lock) => Ok(StoreLock { _lock: lock }),
            None => Err(ComponentsError::Locked { path }),
        }
    }

    /// The active release, from the `current` symlink.
    pub fn active(&self) -> Option<ReleaseId> {
        let target = std::fs::read_link(self.current_link()).ok()?;
        let name = target.file_name()?.to_str()?;
        let id = ReleaseId::parse(name).ok()?;
        self.record(&id).ok().map(|_| id)
    }

    /// Installed releases (those with a record), oldest channel and number first.
    pub fn installed(&self) -> Vec<ReleaseId> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut ids: Vec<ReleaseId> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|name| !name.starts_with('.') && name != "current")
            .filter_map(|name| ReleaseId::parse(&name).ok())
            .filter(|id| self.release_dir(id).join(RECORD_FILE).is_file())
            .collect();
        ids.sort_by_key(|id| (channel_minor(&id.channel), id.number));
        ids
    }

    /// Releases whose install was interrupted: their staging dir waits to be resumed.
    pub fn interrupted(&self) -> Vec<ReleaseId> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut ids: Vec<ReleaseId> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.strip_prefix(".staging-")
                    .and_then(|id| ReleaseId::parse(id).ok())
            })
            .collect();
        ids.sort();
        ids
    }

    pub fn record(&self, id: &ReleaseId) -> Result<Record, ComponentsError> {
        let path = self.release_dir(id).join(RECORD_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                self.not_installed(id)
            } else {
                ComponentsError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        serde_json::from_str(&text).map_err(|e| ComponentsError::Source {
            path,
            reason: format!("unreadable record ({e}); reinstall the release"),
        })
    }

    pub fn manifest(&self, id: &ReleaseId) -> Result<Release, ComponentsError> {
        let path = self.release_dir(id).join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(ComponentsError::io(&path))?;
        Release::parse(&text, &path.display().to_string())
    }

    pub fn not_installed(&self, id: &ReleaseId) -> ComponentsError {
        ComponentsError::NotInstalled {
            release: id.to_string(),
            installed: self.installed().iter().map(ToString::to_string).collect(),
        }
    }

    /// Points `current` at `id`: a new symlink renamed over the old one, so a reader
    /// sees the old or the new release, never none.
    pub fn activate(&self, id: &ReleaseId) -> Result<(), ComponentsError> {
        if !self.release_dir(id).join(RECORD_FILE).is_file() {
            return Err(self.not_installed(id));
        }
        let link = self.current_link();
        let tmp = self
            .root
            .join(format!(".current.tmp.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(id.to_string(), &tmp).map_err(ComponentsError::io(&tmp))?;
        std::fs::rename(&tmp, &link).map_err(ComponentsError::io(&link))?;
        sync_dir(&self.root)
    }

    /// Deletes an installed release; the active one is refused.
    pub fn remove(&self, id: &ReleaseId) -> Result<(), ComponentsError> {
        if !self.release_dir(id).join(RECORD_FILE).is_file() {
            return Err(self.not_installed(id));
        }
        if self.active().as_ref() == Some(id) {
            return Err(ComponentsError::Active {
                release: id.to_string(),
            });
        }
        // renamed away first, so a crash mid-delete leaves no half release that looks
        // installed
        let trash = self.root.join(format!(".trash-{id}"));
        let _ = std::fs::remove_dir_all(&trash);
        std::fs::rename(self.release_dir(id), &trash)
            .map_err(ComponentsError::io(&self.release_dir(id)))?;
        std::fs::remove_dir_all(&trash).map_err(ComponentsError::io(&trash))
    }

    /// Re-hashes every recorded file of `id`; returns one line per problem.
    pub fn verify(&self, id: &ReleaseId) -> Result<Vec<String>, ComponentsError> {
        let record = self.record(id)?;
        let dir = self.release_dir(id);
        let mut problems = Vec::new();
        let mut check = |rel: &str, sha256: &str, sha512: &str| {
            let path = dir.join(rel);
            match fetch::digest_file(&path) {
                Ok(d) => {
                    if let Err(e) = fetch::check(&path.display().to_string(), &d, sha256, sha512) {
                        problems.push(e.to_string());
                    }
                }
                Err(e) => problems.push(format!("{}: missing or unreadable ({e})", path.display())),
            }
        };
        for file in &record.files {
            check(&file.path, &file.sha256, &file.sha512);
        }
        for asset in &record.assets {
            if !record.files.iter().any(|f| f.path == asset.stored_at) {
                check(&asset.stored_at, &asset.sha256, &asset.sha512);
            }
        }
        let manifest = dir.join(MANIFEST_FILE);
        match std::fs::read(&manifest) {
            Ok(bytes) if sha256_hex(&bytes) == record.manifest_sha256 => {}
            Ok(_) => problems.push(format!("{}: changed since install", manifest.display())),
            Err(e) => problems.push(format!("{}: {e}", manifest.display())),
        }
        Ok(problems)
    }

    /// Tidies what interrupted runs left behind (not staging: that is resumed).
    pub fn clean_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().to_string();
            // a kill between the two renames of a replacement: put the old one back
            if let Some(id) = name.strip_prefix(".old-")
                && !self.root.join(id).exists()
            {
                let _ = std::fs::rename(entry.path(), self.root.join(id));
                continue;
            }
            // called under the lock: no other install owns an unpack dir now
            if name.starts_with(".trash-")
                || name.starts_with(".old-")
                || name.starts_with(".unpack-")
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
            if name.starts_with(".current.tmp.") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

pub fn sync_dir(dir: &Path) -> Result<(), ComponentsError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(ComponentsError::io(dir))
}

fn channel_minor(channel: &str) -> u32 {
    channel
        .split_once('-')
        .and_then(|(_, m)| m.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_release(store: &Store, id: &str) -> ReleaseId {
        let id = ReleaseId::parse(id).unwrap();
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
        id
    }

    #[test]
    fn activate_remove_and_recover_an_interrupted_replacement() {
        let root = std::env::temp_dir().join(format!("kdist-store-{}", std::process::id()));
        let data = DataDir::new(&root);
        let store = Store::new(&data);
        store.ensure().unwrap();
        let one = fake_release(&store, "1-31-1");
        let two = fake_release(&store, "1-31-2");
        assert_eq!(store.active(), None);
        store.activate(&one).unwrap();
        assert_eq!(store.active(), Some(one.clone()));
        store.activate(&two).unwrap();
        assert_eq!(
            std::fs::read_link(store.current_link()).unwrap(),
            Path::new("1-31-2")
        );
        assert_eq!(store.installed(), vec![one.clone(), two.clone()]);
        assert!(matches!(
            store.remove(&two),
            Err(ComponentsError::Active { .. })
        ));

        // killed after moving the active release aside, before the new one was in place
        std::fs::rename(store.release_dir(&two), store.root().join(".old-1-31-2")).unwrap();
        assert_eq!(store.active(), None);
        store.clean_leftovers();
        assert_eq!(store.active(), Some(two.clone()));

        store.remove(&one).unwrap();
        assert_eq!(store.installed(), vec![two]);
        let err = store.remove(&one).unwrap_err().to_string();
        assert!(err.contains("installed: 1-31-2"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
