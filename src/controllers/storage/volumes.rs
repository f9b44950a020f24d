//! The volume directories under the storage dir: their names, their creation, and the
//! rules that keep removal inside what kdist created. Blocking; the controller calls
//! these from `spawn_blocking`.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A volume directory's mode: the owner and group may write. Kubelet gives the group to
/// a pod's `fsGroup` (and sets the setgid bit) when it mounts a local volume, so non-root
/// pods with an `fsGroup` can write; other users cannot.
pub const VOLUME_MODE: u32 = 0o770;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{what} {value:?} cannot name a volume directory: {reason}")]
    BadName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{path} is not a volume directory kdist created under {storage_dir}: {reason}")]
    Refused {
        path: PathBuf,
        storage_dir: PathBuf,
        reason: &'static str,
    },
    #[error(
        "not enough space in {storage_dir}: {free} bytes free, the claim requests {requested}; \
         free some space or set storage.dir to a larger disk"
    )]
    NoSpace {
        storage_dir: PathBuf,
        free: u64,
        requested: u64,
    },
    #[error("{path}: i/o error")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> VolumeError + '_ {
    move |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Namespaces, claim and volume names are DNS names: lowercase letters, digits, `-` and
/// `.`, never `_` (the separator), `/`, or a leading dot (`.`, `..`).
fn check_name(what: &'static str, value: &str) -> Result<(), VolumeError> {
    let bad = |reason| VolumeError::BadName {
        what,
        value: value.to_string(),
        reason,
    };
    if value.is_empty() || value.len() > 253 {
        return Err(bad("it must have 1 to 253 characters"));
    }
    if value.starts_with('.') {
        return Err(bad("it must not start with a dot"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return Err(bad("it may hold only a-z, 0-9, `-` and `.`"));
    }
    Ok(())
}

/// The directory name of claim `namespace/claim`'s volume `pv`.
pub fn dir_name(namespace: &str, claim: &str, pv: &str) -> Result<String, VolumeError> {
    check_name("namespace", namespace)?;
    check_name("claim", claim)?;
    check_name("volume", pv)?;
    Ok(format!("{namespace}_{claim}_{pv}"))
}

/// The volume a directory name belongs to, if the name is one kdist gives.
pub fn volume_of(name: &str) -> Option<(&str, &str, &str)> {
    let mut parts = name.splitn(3, '_');
    let (ns, claim, pv) = (parts.next()?, parts.next()?, parts.next()?);
    dir_name(ns, claim, pv).ok().map(|_| (ns, claim, pv))
}

/// Creates the storage dir (and its parents) when missing; returns its real path.
pub fn ensure_storage_dir(storage_dir: &Path) -> Result<PathBuf, VolumeError> {
    std::fs::create_dir_all(storage_dir).map_err(io_error(storage_dir))?;
    std::fs::canonicalize(storage_dir).map_err(io_error(storage_dir))
}

/// Creates volume directory `name` under `storage_dir` (the canonical path), or finds
/// the one a previous run created. Returns its path.
pub fn create(storage_dir: &Path, name: &str) -> Result<PathBuf, VolumeError> {
    let path = storage_dir.join(name);
    match std::fs::create_dir(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // a crash after the mkdir: the same claim's directory, unless it is a link
            check_removable(storage_dir, &path)?;
        }
        Err(e) => return Err(io_error(&path)(e)),
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(VOLUME_MODE))
        .map_err(io_error(&path))?;
    Ok(path)
}

/// Creates volume directory `name` for a claim of `requested` bytes: refused when the
/// storage dir's file system has less free, unless a previous run made it already.
pub fn create_for(storage_dir: &Path, name: &str, requested: u64) -> Result<PathBuf, VolumeError> {
    if !storage_dir.join(name).exists() {
        let free = free_bytes(storage_dir)?;
        if free < requested {
            return Err(VolumeError::NoSpace {
                storage_dir: storage_dir.to_path_buf(),
                free,
                requested,
            });
        }
    }
    create(storage_dir, name)
}

/// Checks that `path` is a directory kdist created: directly under `storage_dir` (the
/// canonical path), named as [`dir_name`] names them, a directory and not a link.
pub fn check_removable(storage_dir: &Path, path: &Path) -> Result<(), VolumeError> {
    let refused = |reason| VolumeError::Refused {
        path: path.to_path_buf(),
        storage_dir: storage_dir.to_path_buf(),
        reason,
    };
    if path.parent() != Some(storage_dir) {
        return Err(refused("it is not directly under the storage dir"));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| refused("it has no file name"))?;
    if volume_of(name).is_none() {
        return Err(refused("its name is not <namespace>_<claim>_<volume>"));
    }
    let meta = std::fs::symlink_metadata(path).map_err(io_error(path))?;
    if meta.file_type().is_symlink() {
        return Err(refused("it is a symbolic link"));
    }
    if !meta.is_dir() {
        return Err(refused("it is not a directory"));
    }
    Ok(())
}

/// Removes the volume directory at `path` with its data, after [`check_removable`].
/// A directory that is already gone is not an error.
pub fn remove(storage_dir: &Path, path: &Path) -> Result<bool, VolumeError> {
    match check_removable(storage_dir, path) {
        Err(VolumeError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(false);
        }
        other => other?,
    }
    std::fs::remove_dir_all(path).map_err(io_error(path))?;
    Ok(true)
}

/// The volume directories under `storage_dir`: (directory name, path).
pub fn list(storage_dir: &Path) -> Result<Vec<(String, PathBuf)>, VolumeError> {
    let entries = match std::fs::read_dir(storage_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(storage_dir)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error(storage_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if volume_of(&name).is_some() && entry.file_type().is_ok_and(|t| t.is_dir()) {
            found.push((name, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// Bytes free for unprivileged writers on the file system of `path`.
pub fn free_bytes(path: &Path) -> Result<u64, VolumeError> {
    let stat = nix::sys::statvfs::statvfs(path).map_err(|e| VolumeError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    Ok(stat.blocks_available() * stat.fragment_size())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_join_and_split() {
        let name = dir_name("default", "data-web-0", "pvc-1a2b").unwrap();
        assert_eq!(name, "default_data-web-0_pvc-1a2b");
        assert_eq!(
            volume_of(&name),
            Some(("default", "data-web-0", "pvc-1a2b"))
        );
        assert_eq!(volume_of("lost+found"), None);
        assert_eq!(volume_of("a_b"), None);
    }

    #[test]
    fn names_that_could_escape_are_refused() {
        for (ns, claim) in [
            ("..", "x"),
            ("a/b", "x"),
            ("default", "../etc"),
            ("default", ""),
            ("a_b", "c"),
            ("Default", "x"),
            ("default", ".hidden"),
        ] {
            assert!(dir_name(ns, claim, "pvc-1").is_err(), "{ns} {claim}");
        }
    }

    #[test]
    fn removal_stays_inside_the_storage_dir() {
        let root = tempfile::tempdir().unwrap();
        let storage = ensure_storage_dir(&root.path().join("storage")).unwrap();
        let outside = root.path().join("default_keep_pvc-2");
        std::fs::create_dir(&outside).unwrap();
        let err = remove(&storage, &outside).unwrap_err().to_string();
        assert!(err.contains("not directly under"), "{err}");
        assert!(outside.exists());

        // `..` in the path: not directly under the storage dir as written
        let dotted = storage.join("..").join("default_keep_pvc-2");
        assert!(remove(&storage, &dotted).is_err());
        assert!(outside.exists());

        // a link named like a volume, pointing outside
        let link = storage.join("default_link_pvc-3");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let err = remove(&storage, &link).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(outside.exists() && link.exists());
        // and creating over it is refused too
        assert!(create(&storage, "default_link_pvc-3").is_err());

        // a directory not named by kdist
        let other = storage.join("lost+found");
        std::fs::create_dir(&other).unwrap();
        assert!(remove(&storage, &other).is_err());
        assert!(other.exists());
    }

    #[test]
    fn a_volume_is_created_once_and_removed_with_its_data() {
        let root = tempfile::tempdir().unwrap();
        let storage = ensure_storage_dir(root.path()).unwrap();
        let path = create(&storage, "default_db_pvc-9").unwrap();
        std::fs::write(path.join("data"), b"x").unwrap();
        // a second create (a crash after the first) finds the same directory and data
        assert_eq!(create(&storage, "default_db_pvc-9").unwrap(), path);
        assert!(path.join("data").exists());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, VOLUME_MODE);
        assert_eq!(list(&storage).unwrap().len(), 1);
        assert!(remove(&storage, &path).unwrap());
        assert!(!path.exists());
        assert!(!remove(&storage, &path).unwrap(), "already gone is fine");
        assert!(free_bytes(&storage).unwrap() > 0);
        let err = create_for(&storage, "default_big_pvc-8", u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not enough space"), "{err}");
        assert!(!storage.join("default_big_pvc-8").exists());
    }
}
