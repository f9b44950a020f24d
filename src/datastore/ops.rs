//! Operations on a datastore file for `kdist datastore`: status, backup, restore,
//! compact and defrag without a running server (status and backup also work while one
//! runs: they only read, and WAL readers see a consistent snapshot).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

use super::error::{ApiError, DatastoreError};
use super::mvcc;
use super::store::{self, Store, WriteOp, WriteResult};

/// What `kdist datastore status` shows for the embedded backend.
#[derive(Debug, Clone, Serialize)]
pub struct LocalStatus {
    pub backend: String,
    pub db: PathBuf,
    /// Database file plus WAL, in bytes.
    pub size_bytes: u64,
    pub revision: i64,
    /// None until the first compaction.
    pub compacted_revision: Option<i64>,
    pub keys: i64,
    pub leases: i64,
}

fn sqlite_err(path: &Path) -> impl Fn(rusqlite::Error) -> DatastoreError + '_ {
    move |source| DatastoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

fn missing(path: &Path) -> DatastoreError {
    DatastoreError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no datastore here (it is created at the first start of the daemon)",
        ),
    }
}

fn open_read_only(path: &Path) -> Result<Connection, DatastoreError> {
    if !path.exists() {
        return Err(missing(path));
    }
    store::verify(path)?;
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|source| {
        DatastoreError::Open {
            path: path.to_path_buf(),
            source,
        }
    })
}

pub fn local_status(path: &Path) -> Result<LocalStatus, DatastoreError> {
    let conn = open_read_only(path)?;
    let err = sqlite_err(path);
    let (rev, compact) = mvcc::read_meta(&conn).map_err(&err)?;
    let keys = super::index::Index::count_stored(&conn).map_err(&err)?;
    let leases: i64 = conn
        .query_row("SELECT count(*) FROM lease", [], |r| r.get(0))
        .map_err(&err)?;
    let file_len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    Ok(LocalStatus {
        backend: "embedded".into(),
        db: path.to_path_buf(),
        size_bytes: file_len(path) + file_len(&wal),
        revision: rev,
        compacted_revision: (compact >= 0).then_some(compact),
        keys,
        leases,
    })
}

/// Writes a consistent copy of the datastore at `path` to `dest`, atomically.
pub fn backup_file(path: &Path, dest: &Path, force: bool) -> Result<(), DatastoreError> {
    if dest.exists() && !force {
        return Err(DatastoreError::Exists {
            path: dest.to_path_buf(),
        });
    }
    let conn = open_read_only(path)?;
    let tmp = temp_beside(dest);
    let _ = std::fs::remove_file(&tmp);
    let result = store::copy_into(&conn, &tmp)
        .map_err(sqlite_err(path))
        .and_then(|()| sync_and_rename(&tmp, dest));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Installs the backup `from` as the datastore at `target`. The caller makes sure no
/// server uses `target`. Refuses to replace an existing datastore unless `force`.
pub fn restore_file(from: &Path, target: &Path, force: bool) -> Result<(), DatastoreError> {
    if !from.exists() {
        return Err(missing(from));
    }
    if target.exists() && !force {
        return Err(DatastoreError::Exists {
            path: target.to_path_buf(),
        });
    }
    if let Some(dir) = target.parent() {
        crate::fsutil::ensure_dir(dir, 0o700).map_err(|source| DatastoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let tmp = temp_beside(target);
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| DatastoreError::Io { path: p, source }
    };
    let result = (|| {
        copy_snapshot(from, &tmp)?;
        store::verify(&tmp).map_err(|err| match err {
            DatastoreError::Corrupt { reason, .. } => DatastoreError::Corrupt {
                path: from.to_path_buf(),
                reason,
            },
            other => other,
        })?;
        // A WAL left by the old database would be replayed into the restored one.
        for suffix in ["-wal", "-shm"] {
            let side = PathBuf::from(format!("{}{suffix}", target.display()));
            match std::fs::remove_file(&side) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&side)(e)),
            }
        }
        sync_and_rename(&tmp, target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Copies a backup, checking and dropping the SHA-256 trailer a Maintenance Snapshot
/// stream (`etcdctl snapshot save`) ends with. SQLite files are whole pages long, so a
/// length of 32 past a multiple of 512 marks the trailer, as etcd's tools recognise it.
fn copy_snapshot(from: &Path, to: &Path) -> Result<(), DatastoreError> {
    use sha2::{Digest, Sha256};
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| DatastoreError::Io { path: p, source }
    };
    let len = std::fs::metadata(from).map_err(io(from))?.len();
    if len % 512 != 32 {
        std::fs::copy(from, to).map_err(io(to))?;
        return Ok(());
    }
    let bytes = std::fs::read(from).map_err(io(from))?;
    let (db, trailer) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(db).as_slice() != trailer {
        return Err(DatastoreError::Corrupt {
            path: from.to_path_buf(),
            reason: "snapshot SHA-256 trailer does not match its contents".into(),
        });
    }
    std::fs::write(to, db).map_err(io(to))
}

pub(crate) fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "datastore".into());
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

pub(crate) fn sync_and_rename(tmp: &Path, dest: &Path) -> Result<(), DatastoreError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| DatastoreError::Io { path: p, source }
    };
    std::fs::File::open(tmp)
        .and_then(|f| {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.sync_all()
        })
        .map_err(io(tmp))?;
    std::fs::rename(tmp, dest).map_err(io(dest))?;
    if let Some(dir) = dest.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

fn api_err(path: &Path) -> impl Fn(ApiError) -> DatastoreError + '_ {
    move |err| DatastoreError::Operation {
        path: path.to_path_buf(),
        source: err,
    }
}

/// Compacts the (not served) datastore at `path` up to `revision` (default: current),
/// waiting until the old versions are gone. Returns the revision compacted to.
pub async fn compact_file(path: &Path, revision: Option<i64>) -> Result<i64, DatastoreError> {
    if !path.exists() {
        return Err(missing(path));
    }
    let store = Arc::new(Store::open(path)?);
    let rev = revision.unwrap_or_else(|| store.current_rev());
    let result = store
        .write(WriteOp::Compact {
            revision: rev,
            physical: true,
        })
        .await
        .map_err(api_err(path));
    let closing = store.clone();
    let _ = tokio::task::spawn_blocking(move || closing.close()).await;
    result.map(|_| rev)
}

/// Rewrites the (not served) datastore at `path` to reclaim free space.
pub async fn defrag_file(path: &Path) -> Result<(), DatastoreError> {
    if !path.exists() {
        return Err(missing(path));
    }
    let store = Arc::new(Store::open(path)?);
    let result = store.write(WriteOp::Defrag).await.map_err(api_err(path));
    let closing = store.clone();
    let _ = tokio::task::spawn_blocking(move || closing.close()).await;
    result.map(|r| {
        let _: WriteResult = r;
    })
}
