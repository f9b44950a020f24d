//! The store: one SQLite file, one writer thread doing group commit, the in-memory index
//! of current keys (index.rs), a small pool of read connections, the lease table and
//! the commit broadcast that feeds watches.
//!
//! Writes are sent to the writer thread as jobs; it applies them in one SQLite
//! transaction (a savepoint each, so one failing job does not undo the others) for as
//! long as the syncer is still busy with earlier batches, then commits once. The commit
//! does not fsync (WAL + synchronous=NORMAL): the writer hands the batch to the syncer
//! thread and starts the next one, while the syncer fdatasyncs the WAL once for every
//! batch waiting, then publishes their events
//! and revision, with the index as of that revision, and answers (see `syncer` for why
//! this is durable). Reads run via `spawn_blocking` on the published index and their
//! own connections, and see the published revision; WAL never makes them wait for the
//! writer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{broadcast, oneshot};

use super::error::{ApiError, DatastoreError};
use super::index::Index;
use super::mvcc::{self, View};
use super::proto::etcdserverpb::{
    DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, ResponseHeader, TxnRequest,
    TxnResponse,
};
use super::proto::mvccpb::Event;

mod durability;
mod history;
mod writer;

#[cfg(test)]
use durability::CHECKPOINT_INTERVAL;
use durability::{WalFile, checkpointer, syncer};
pub(crate) use history::{copy_into, db_size, events_between, hash_kv};
use writer::Writer;

/// etcd's largest lease TTL, in seconds.
pub(crate) const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// etcd's smallest lease TTL with its default heartbeat and election timeout.
pub(crate) const MIN_LEASE_TTL: i64 = 2;
/// The raft term a single member reports (etcd's first election makes it 2).
const RAFT_TERM: u64 = 2;
const READ_POOL_IDLE: usize = 8;

/// The events of one revision, in the order they happened.
#[derive(Debug)]
pub(crate) struct RevEvents {
    pub rev: i64,
    pub events: Vec<Event>,
}

/// One committed batch: consecutive revisions.
pub(crate) type Commit = Arc<Vec<RevEvents>>;

#[derive(Debug, Clone, Copy)]
pub(crate) struct LeaseEntry {
    pub ttl: i64,
    pub expiry: Instant,
}

pub(crate) enum WriteOp {
    Put(PutRequest),
    Delete(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact {
        revision: i64,
        physical: bool,
    },
    LeaseGrant {
        id: i64,
        ttl: i64,
    },
    LeaseRevoke {
        id: i64,
        only_if_expired: bool,
    },
    Defrag,
    Shutdown,
    /// From the syncer: it has answered every batch handed to it (see `Handoff`).
    Wake,
}

#[derive(Debug)]
pub(crate) enum WriteResult {
    Put(PutResponse),
    Delete(DeleteRangeResponse),
    Txn(TxnResponse),
    /// Operations answered by a header only; the revision after them.
    Rev(i64),
    Grant {
        id: i64,
        ttl: i64,
        rev: i64,
    },
}

type Reply = oneshot::Sender<Result<WriteResult, ApiError>>;

struct Job {
    op: WriteOp,
    reply: Option<Reply>,
}

/// What readers see: the newest durable revision and every key at it.
#[derive(Clone)]
pub(crate) struct Published {
    pub rev: i64,
    pub index: Index,
}

/// State shared by the writer thread and the async side.
pub(crate) struct Shared {
    pub path: PathBuf,
    pub cluster_id: u64,
    pub member_id: u64,
    /// Newest revision whose events have been published.
    pub rev: AtomicI64,
    /// The index at the published revision (`rev` may lag it while the syncer
    /// publishes; never run ahead of it).
    pub published: Mutex<Published>,
    pub compact_rev: AtomicI64,
    pub commits: broadcast::Sender<Commit>,
    pub leases: Mutex<HashMap<i64, LeaseEntry>>,
    /// Set when an fdatasync of the WAL failed: what is on disk is unknown, so every
    /// write from then on fails (an fsync error cannot be retried).
    pub sync_failed: OnceLock<String>,
    /// Write transactions committed since the store opened (the checkpointer's clock).
    pub wal_commits: AtomicU64,
}

pub(crate) struct Store {
    pub shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
    readers: Mutex<Vec<Connection>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    checkpoints: Mutex<Option<std::thread::JoinHandle<()>>>,
    stop_checkpoints: Arc<AtomicBool>,
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> DatastoreError + '_ {
    move |source| DatastoreError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that an existing file is an intact kdist datastore, without writing to it.
pub(crate) fn verify(path: &Path) -> Result<(), DatastoreError> {
    let corrupt = |reason: String| DatastoreError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| corrupt(e.to_string()))?;
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |row| row.get(0))
        .map_err(|e| corrupt(e.to_string()))?;
    if check != "ok" {
        return Err(corrupt(format!("integrity check: {check}")));
    }
    let schema: Option<i64> = conn
        .query_row("SELECT schema FROM meta WHERE id = 0", [], |row| row.get(0))
        .optional()
        .map_err(|e| corrupt(format!("no kdist schema: {e}")))?;
    match schema {
        // older schemas are upgraded when the store opens (see `upgrade`)
        Some(1..=mvcc::SCHEMA_VERSION) => Ok(()),
        Some(other) => Err(corrupt(format!("unknown schema version {other}"))),
        None => Err(corrupt("no kdist schema: empty meta table".into())),
    }
}

fn configure_writer(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL: commits do not fsync; the syncer thread fdatasyncs the WAL before any
    // write is acknowledged (see `syncer`). Checkpoints still sync the WAL before
    // copying it and the database file before the WAL starts over.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "cache_size", -4000)?;
    // Checkpoints run on their own thread (see `checkpointer`), never in a commit.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // A WAL that grew under load is cut back when it starts over.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Brings a store written by an older kdist to the current schema, in one transaction
/// (nothing changes if it fails), then checkpoints so the new layout is in the database
/// file.
fn upgrade(conn: &Connection) -> rusqlite::Result<()> {
    let schema: i64 = conn.query_row("SELECT schema FROM meta WHERE id = 0", [], |r| r.get(0))?;
    let steps = [mvcc::UPGRADE_FROM_1, mvcc::UPGRADE_FROM_2];
    let Some(todo) = steps.get(usize::try_from(schema - 1).unwrap_or(steps.len())..) else {
        return Ok(());
    };
    if todo.is_empty() {
        return Ok(());
    }
    tracing::info!(
        "datastore: upgrading the database from schema {schema} to {}",
        mvcc::SCHEMA_VERSION
    );
    conn.execute_batch(&format!("BEGIN IMMEDIATE; {} COMMIT;", todo.concat()))
        .inspect_err(|_| {
            let _ = conn.execute_batch("ROLLBACK");
        })?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "cache_size", -16000)?;
    conn.pragma_update(None, "mmap_size", 256 * 1024 * 1024)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// The syncer holds a sender of the job channel (to wake the writer), so the writer
/// never sees the channel close: a store dropped without `close` is closed here.
impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

impl Store {
    /// Opens `path`, creating a new datastore when the file does not exist. An existing
    /// file that is not an intact datastore is refused and left as it is.
    pub(crate) fn open(path: &Path) -> Result<Store, DatastoreError> {
        let exists = std::fs::metadata(path)
            .map(|m| m.len() > 0)
            .unwrap_or(false);
        if exists {
            verify(path)?;
        }
        let conn = Connection::open(path).map_err(|source| DatastoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        configure_writer(&conn).map_err(sqlite(path))?;
        if !exists {
            let cluster_id = rand::random::<u64>() >> 1;
            let member_id = rand::random::<u64>() >> 1;
            conn.execute_batch(&format!("BEGIN; {} COMMIT;", mvcc::SCHEMA))
                .map_err(sqlite(path))?;
            conn.execute(
                "INSERT INTO meta (id, schema, cluster_id, member_id, rev, compact_rev, compact_done) \
                 VALUES (0, ?1, ?2, ?3, 1, -1, -1)",
                params![mvcc::SCHEMA_VERSION, cluster_id as i64, member_id as i64],
            )
            .map_err(sqlite(path))?;
            // Commits do not fsync (see `configure_writer`): a checkpoint syncs the
            // new schema into the database file before anyone uses it.
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(sqlite(path))?;
        }
        upgrade(&conn).map_err(sqlite(path))?;
        let mut writer = Writer::load(conn, path).map_err(sqlite(path))?;
        let shared = writer.shared.clone();
        let (durable, to_sync) = mpsc::channel();
        let (jobs, rx) = mpsc::channel();
        let wal = WalFile::new(path);
        let handoff = writer.handoff.clone();
        let syncer = {
            let (shared, handoff, wake) = (shared.clone(), handoff.clone(), jobs.clone());
            std::thread::Builder::new()
                .name("datastore-sync".into())
                .spawn(move || syncer(wal, shared, to_sync, handoff, wake))
                .map_err(DatastoreError::Thread)?
        };
        writer.syncer = Some((durable, syncer));
        let handle = std::thread::Builder::new()
            .name("datastore-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(DatastoreError::Thread)?;
        let stop_checkpoints = Arc::new(AtomicBool::new(false));
        let stop = stop_checkpoints.clone();
        let checkpoint_shared = shared.clone();
        let checkpoints = std::thread::Builder::new()
            .name("datastore-checkpoint".into())
            .spawn(move || checkpointer(checkpoint_shared, stop))
            .map_err(DatastoreError::Thread)?;
        Ok(Store {
            shared,
            jobs,
            readers: Mutex::new(Vec::new()),
            writer: Mutex::new(Some(handle)),
            checkpoints: Mutex::new(Some(checkpoints)),
            stop_checkpoints,
        })
    }

    /// Sends a write to the writer thread and waits for its answer.
    pub(crate) async fn write(&self, op: WriteOp) -> Result<WriteResult, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job {
                op,
                reply: Some(tx),
            })
            .map_err(|_| ApiError::Stopped)?;
        rx.await.map_err(|_| ApiError::Stopped)?
    }

    /// Queues a write nobody waits for (lease expiry).
    pub(crate) fn write_detached(&self, op: WriteOp) {
        let _ = self.jobs.send(Job { op, reply: None });
    }

    /// Runs `f` on the published revision, off the async workers: its index, and a read
    /// connection inside one read transaction for history.
    pub(crate) async fn read<T, F>(self: &Arc<Self>, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&View<'_>) -> Result<T, ApiError> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.read_blocking(f))
            .await
            .map_err(|_| ApiError::Stopped)?
    }

    pub(crate) fn read_blocking<T>(
        &self,
        f: impl FnOnce(&View<'_>) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        // The published state first: its batches are committed, so the connection's
        // snapshot (taken by the first statement below) holds at least that revision.
        let published = self.published();
        self.read_conn(true, |conn| {
            // The compacted revision comes from the snapshot that history rows are read
            // from, so a compaction never removes rows a read was allowed to need.
            let compact_rev = mvcc::read_compact_rev(conn)?;
            f(&View {
                conn,
                index: &published.index,
                rev: published.rev,
                compact_rev,
            })
        })
    }

    /// The newest durable revision and its index, a snapshot that never changes.
    pub(crate) fn published(&self) -> Published {
        lock_published(&self.shared).clone()
    }

    /// Like `read`, without an enclosing transaction (for statements such as
    /// `VACUUM INTO` that make their own).
    pub(crate) async fn read_plain<T, F>(self: &Arc<Self>, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, ApiError> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.read_conn(false, f))
            .await
            .map_err(|_| ApiError::Stopped)?
    }

    fn read_conn<T>(
        &self,
        txn: bool,
        f: impl FnOnce(&Connection) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let pooled = self.readers.lock().ok().and_then(|mut pool| pool.pop());
        let conn = match pooled {
            Some(conn) => conn,
            None => open_reader(&self.shared.path)?,
        };
        if txn {
            conn.prepare_cached("BEGIN")?.execute([])?;
        }
        let result = f(&conn);
        let ended = if txn {
            conn.prepare_cached("COMMIT")
                .and_then(|mut s| s.execute([]).map(|_| ()))
        } else {
            Ok(())
        };
        if ended.is_ok()
            && let Ok(mut pool) = self.readers.lock()
            && pool.len() < READ_POOL_IDLE
        {
            pool.push(conn);
        }
        result
    }

    /// Stops the writer after the jobs already queued and waits for it.
    pub(crate) fn close(&self) {
        self.stop_checkpoints.store(true, Ordering::SeqCst);
        let handle = self.checkpoints.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        let _ = self.jobs.send(Job {
            op: WriteOp::Shutdown,
            reply: None,
        });
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        if let Ok(mut pool) = self.readers.lock() {
            pool.clear();
        }
    }

    /// A response header: this member, `revision`.
    pub(crate) fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: self.shared.cluster_id,
            member_id: self.shared.member_id,
            revision,
            raft_term: RAFT_TERM,
        })
    }

    pub(crate) fn current_rev(&self) -> i64 {
        self.shared.rev.load(Ordering::SeqCst)
    }

    /// The revision readers see: published before its commit is broadcast to watchers
    /// and before `current_rev` reaches it.
    pub(crate) fn published_rev(&self) -> i64 {
        lock_published(&self.shared).rev
    }

    /// Renews a lease; its TTL, or None when it does not exist or its time is already up
    /// (as etcd, an expired lease is not brought back: its revoke is on the way).
    pub(crate) fn lease_renew(&self, id: i64) -> Option<i64> {
        let mut leases = self.shared.leases.lock().ok()?;
        let entry = leases.get_mut(&id)?;
        let now = Instant::now();
        if entry.expiry <= now {
            return None;
        }
        entry.expiry = now + Duration::from_secs(entry.ttl.max(0) as u64);
        Some(entry.ttl)
    }

    pub(crate) fn lease_get(&self, id: i64) -> Option<LeaseEntry> {
        self.shared.leases.lock().ok()?.get(&id).copied()
    }

    pub(crate) fn lease_ids(&self) -> Vec<i64> {
        self.shared
            .leases
            .lock()
            .map(|l| l.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Leases whose time is up.
    pub(crate) fn expired_leases(&self) -> Vec<i64> {
        let now = Instant::now();
        self.shared
            .leases
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|(_, e)| e.expiry <= now)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The published state; a panic elsewhere while it was held cannot leave it half
/// written (it is replaced whole), so a poisoned lock is used as it is.
fn lock_published(shared: &Shared) -> std::sync::MutexGuard<'_, Published> {
    match shared.published.lock() {
        Ok(published) => published,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn load_leases(conn: &Connection) -> rusqlite::Result<HashMap<i64, i64>> {
    let mut stmt = conn.prepare("SELECT id, ttl FROM lease")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::proto::etcdserverpb::{RangeRequest, RangeResponse};

    /// A new store in a temporary directory (removed when the first value drops).
    fn temp_store() -> (tempfile::TempDir, PathBuf, Store) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = Store::open(&path).unwrap();
        (dir, path, store)
    }

    fn delete(key: impl Into<Vec<u8>>) -> WriteOp {
        WriteOp::Delete(DeleteRangeRequest {
            key: key.into(),
            ..Default::default()
        })
    }

    fn put(key: &str, value: &str) -> WriteOp {
        WriteOp::Put(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
    }

    fn put_leased(key: &str, value: &str, lease: i64) -> WriteOp {
        WriteOp::Put(PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            ..Default::default()
        })
    }

    fn revoke(id: i64) -> WriteOp {
        WriteOp::LeaseRevoke {
            id,
            only_if_expired: false,
        }
    }

    /// A compaction to `revision`; `physical` ones are answered once the rows are gone.
    fn compact(revision: i64, physical: bool) -> WriteOp {
        WriteOp::Compact { revision, physical }
    }

    /// `req` through the read path, as a reader that took `published` (None: the
    /// store's current one) answers it.
    fn range_as(
        store: &Store,
        published: Option<Published>,
        req: RangeRequest,
    ) -> Result<RangeResponse, ApiError> {
        store.read_blocking(move |view| match &published {
            Some(p) => mvcc::range(
                &View {
                    conn: view.conn,
                    index: &p.index,
                    rev: p.rev,
                    compact_rev: view.compact_rev,
                },
                &req,
            ),
            None => mvcc::range(view, &req),
        })
    }

    fn all_keys() -> RangeRequest {
        RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        }
    }

    fn rows(store: &Store) -> Vec<(Vec<u8>, i64)> {
        store
            .read_blocking(|view| {
                let mut stmt = view
                    .conn
                    .prepare("SELECT key, rev FROM kv ORDER BY key, rev")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .unwrap()
    }

    /// A reader holding a published revision while later batches commit (the rows of a
    /// batch not yet synced are in its SQLite snapshot) sees only that revision: neither
    /// a newer value nor a deleted key's absence shows.
    #[tokio::test]
    async fn a_reader_sees_its_published_revision_only() {
        let (_dir, _, store) = temp_store();
        store.write(put("a", "old")).await.unwrap();
        store.write(put("b", "kept")).await.unwrap();
        let visible = store.current_rev();
        let published = store.published();
        assert_eq!(published.rev, visible);
        store.write(put("a", "unsynced")).await.unwrap();
        store.write(delete(b"b".to_vec())).await.unwrap();
        let resp = range_as(&store, Some(published), all_keys()).unwrap();
        let seen: Vec<(&[u8], &[u8])> = resp
            .kvs
            .iter()
            .map(|kv| (kv.key.as_slice(), kv.value.as_slice()))
            .collect();
        assert_eq!(seen, [(&b"a"[..], &b"old"[..]), (&b"b"[..], &b"kept"[..])]);
        assert_eq!(resp.header.unwrap().revision, visible);
        store.close();
    }

    /// A store written by a kdist with schema 1 (history keyed by key): its layout as
    /// that version created it, and a history with a put, an update, a delete.
    fn schema_1_store(path: &Path) {
        let conn = Connection::open(path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (id INTEGER PRIMARY KEY CHECK (id = 0), schema INTEGER NOT NULL,
                cluster_id INTEGER NOT NULL, member_id INTEGER NOT NULL, rev INTEGER NOT NULL,
                compact_rev INTEGER NOT NULL, compact_done INTEGER NOT NULL);
             CREATE TABLE live (key BLOB PRIMARY KEY, create_rev INTEGER NOT NULL,
                mod_rev INTEGER NOT NULL, version INTEGER NOT NULL, value BLOB NOT NULL,
                lease INTEGER NOT NULL) WITHOUT ROWID;
             CREATE INDEX live_lease ON live(lease) WHERE lease != 0;
             CREATE TABLE kv (key BLOB NOT NULL, rev INTEGER NOT NULL, sub INTEGER NOT NULL,
                create_rev INTEGER NOT NULL, version INTEGER NOT NULL, value BLOB NOT NULL,
                lease INTEGER NOT NULL, PRIMARY KEY (key, rev, sub)) WITHOUT ROWID;
             CREATE INDEX kv_rev ON kv(rev, sub);
             CREATE TABLE lease (id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL);
             INSERT INTO meta VALUES (0, 1, 7, 8, 7, -1, -1);
             -- a: put at 2, updated at 3 and at 7 (with c in the same txn); b: put at 4,
             -- deleted at 5; c: put at 6 and 7 (sub 1)
             INSERT INTO kv VALUES ('a', 2, 0, 2, 1, 'a1', 0), ('a', 3, 0, 2, 2, 'a2', 0),
                ('b', 4, 0, 4, 1, 'b1', 0), ('b', 5, 0, 0, 0, '', 0),
                ('c', 6, 0, 6, 1, 'c1', 0), ('a', 7, 0, 2, 3, 'a3', 0),
                ('c', 7, 1, 6, 2, 'c2', 0);
             INSERT INTO live VALUES ('a', 2, 7, 3, 'a3', 0), ('c', 6, 7, 2, 'c2', 0);
             -- kdist binds keys and values as blobs
             UPDATE kv SET key = CAST(key AS BLOB), value = CAST(value AS BLOB);
             UPDATE live SET key = CAST(key AS BLOB), value = CAST(value AS BLOB);",
        )
        .unwrap();
    }

    #[tokio::test]
    async fn a_schema_1_store_is_upgraded_with_its_whole_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        schema_1_store(&path);
        let store = Arc::new(Store::open(&path).unwrap());
        let schema: i64 = store
            .read_blocking(|view| {
                Ok(view
                    .conn
                    .query_row("SELECT schema FROM meta", [], |r| r.get(0))?)
            })
            .unwrap();
        assert_eq!(schema, mvcc::SCHEMA_VERSION);
        let at = |rev: i64| {
            let all = RangeRequest {
                key: vec![0],
                range_end: vec![0],
                revision: rev,
                ..Default::default()
            };
            range_as(&store, None, all)
                .unwrap()
                .kvs
                .into_iter()
                .map(|kv| {
                    (
                        String::from_utf8(kv.key).unwrap(),
                        String::from_utf8(kv.value).unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let pairs = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(at(2), pairs(&[("a", "a1")]));
        assert_eq!(at(4), pairs(&[("a", "a2"), ("b", "b1")]));
        assert_eq!(at(6), pairs(&[("a", "a2"), ("c", "c1")]));
        assert_eq!(at(7), pairs(&[("a", "a3"), ("c", "c2")]));
        let prev = store
            .read_blocking(|view| Ok(mvcc::prev_version(view.conn, b"c", 7)?))
            .unwrap();
        assert_eq!(prev.unwrap().value, b"c1");
        // New writes chain onto the upgraded rows: c's next row points at (7, 1).
        store.write(put("c", "c3")).await.unwrap(); // rev 8
        let prev = store
            .read_blocking(|view| Ok(mvcc::prev_version(view.conn, b"c", 8)?))
            .unwrap();
        assert_eq!(prev.unwrap().value, b"c2");
        store.write(compact(7, true)).await.unwrap();
        assert_eq!(
            rows(&store),
            vec![(b"a".to_vec(), 7), (b"c".to_vec(), 7), (b"c".to_vec(), 8)]
        );
        assert_eq!(at(7), pairs(&[("a", "a3"), ("c", "c2")]));
        store.close();
    }

    /// A store of the previous layout (schema 2, with a durable `live` table) opens as
    /// schema 3: `live` is dropped and the index replayed from history says the same.
    #[tokio::test]
    async fn a_schema_2_store_drops_live_and_replays_the_same_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        schema_1_store(&path);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!("BEGIN; {} COMMIT;", mvcc::UPGRADE_FROM_1))
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let (schema, tables): (i64, i64) = store
            .read_blocking(|view| {
                Ok(view.conn.query_row(
                    "SELECT (SELECT schema FROM meta), \
                     (SELECT count(*) FROM sqlite_master WHERE name LIKE 'live%')",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?)
            })
            .unwrap();
        assert_eq!((schema, tables), (3, 0));
        let keys: Vec<(Vec<u8>, [i64; 3], Vec<u8>)> = range_as(&store, None, all_keys())
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| {
                let at = [kv.create_revision, kv.mod_revision, kv.version];
                (kv.key, at, kv.value)
            })
            .collect();
        assert_eq!(
            keys,
            [
                (b"a".to_vec(), [2, 7, 3], b"a3".to_vec()),
                (b"c".to_vec(), [6, 7, 2], b"c2".to_vec())
            ]
        );
        // c's newest row is (7, 1): the next write of c points back at it.
        store.write(put("c", "c3")).await.unwrap();
        let prev = store
            .read_blocking(|view| Ok(mvcc::prev_version(view.conn, b"c", 8)?))
            .unwrap();
        assert_eq!(prev.unwrap().value, b"c2");
        store.close();
    }

    #[tokio::test]
    async fn a_keep_alive_after_expiry_does_not_bring_the_lease_back() {
        let (_dir, _path, store) = temp_store();
        store
            .write(WriteOp::LeaseGrant { id: 7, ttl: 1 })
            .await
            .unwrap();
        store.write(put_leased("k", "v", 7)).await.unwrap();
        // (granted TTLs have a floor, as etcd's)
        let ttl = store.lease_renew(7).expect("a live lease renews");
        // past its TTL, before the expiry check revokes it
        tokio::time::sleep(Duration::from_secs(ttl as u64) + Duration::from_millis(100)).await;
        assert_eq!(store.lease_renew(7), None);
        assert_eq!(store.expired_leases(), [7]);
        store
            .write(WriteOp::LeaseRevoke {
                id: 7,
                only_if_expired: true,
            })
            .await
            .unwrap();
        assert!(store.lease_get(7).is_none());
        let keys = store
            .published()
            .index
            .select(&mvcc::KeyRange::From(Vec::new()), -1);
        assert!(keys.is_empty(), "{keys:?}");
    }

    /// What the writer kept in memory is what a restart replays from history, after
    /// updates, deletes, a lease revoke and a compaction that removed tombstones.
    #[tokio::test]
    async fn the_index_replayed_at_open_is_the_one_the_writer_kept() {
        let (_dir, path, store) = temp_store();
        store
            .write(WriteOp::LeaseGrant { id: 9, ttl: 600 })
            .await
            .unwrap();
        for i in 0..40 {
            let key = format!("k{:02}", i % 13);
            store.write(put(&key, &format!("v{i}"))).await.unwrap();
            if i % 5 == 0 {
                store
                    .write(delete(format!("k{:02}", i % 7).into_bytes()))
                    .await
                    .unwrap();
            }
        }
        for key in ["l1", "l2"] {
            store.write(put_leased(key, "leased", 9)).await.unwrap();
        }
        store.write(put("m", "kept")).await.unwrap();
        store.write(revoke(9)).await.unwrap();
        let compact_at = store.current_rev() - 3;
        store.write(compact(compact_at, true)).await.unwrap();
        let before = store.published();
        let kept: Vec<_> = before.index.select(&mvcc::KeyRange::From(Vec::new()), -1);
        assert!(kept.iter().all(|kv| !kv.key.starts_with(b"l")));
        assert!(kept.len() > 5, "{kept:?}");
        store.close();
        let store = Store::open(&path).unwrap();
        let after = store.published();
        assert_eq!(after.rev, before.rev);
        assert_eq!(
            after.index.select(&mvcc::KeyRange::From(Vec::new()), -1),
            kept
        );
        for kv in &kept {
            let (a, b) = (before.index.get(&kv.key), after.index.get(&kv.key));
            assert_eq!(a.map(|e| e.mod_sub), b.map(|e| e.mod_sub));
        }
        store.close();
        // `datastore status` counts the same keys without loading them
        let conn = Connection::open(&path).unwrap();
        assert_eq!(Index::count_stored(&conn).unwrap(), kept.len() as i64);
    }

    #[tokio::test]
    async fn a_pause_in_writes_gets_the_wal_copied_into_the_database_file() {
        let (_dir, path, store) = temp_store();
        let store = Arc::new(store);
        store.write(put("k", "in the wal")).await.unwrap();
        // The database file alone, as a reader that ignores the WAL sees it.
        let in_file = || {
            let uri = format!("file:{}?immutable=1", path.display());
            let conn = Connection::open_with_flags(
                uri,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
            )
            .unwrap();
            conn.query_row("SELECT count(*) FROM kv WHERE key = x'6b'", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while in_file() == 0 {
            assert!(
                Instant::now() < deadline,
                "no checkpoint after writes paused"
            );
            tokio::time::sleep(CHECKPOINT_INTERVAL).await;
        }
        store.close();
    }

    #[tokio::test]
    async fn the_revision_survives_a_restart_after_compaction_removed_every_row() {
        let (_dir, path, store) = temp_store();
        let store = Arc::new(store);
        store.write(put("k", "v")).await.unwrap(); // rev 2
        store.write(delete(b"k".to_vec())).await.unwrap(); // rev 3
        store.write(compact(3, true)).await.unwrap();
        assert_eq!(rows(&store), vec![]);
        store.close();
        let store = Arc::new(Store::open(&path).unwrap());
        assert_eq!(store.current_rev(), 3);
        let read = store
            .read_blocking(|view| Ok((mvcc::read_meta(view.conn)?, view.rev)))
            .unwrap();
        assert_eq!(read, ((3, 3), 3));
        match store.write(put("k", "again")).await.unwrap() {
            WriteResult::Put(resp) => assert_eq!(resp.header.unwrap().revision, 4),
            _ => panic!("a put answers with a put response"),
        }
        store.close();
    }

    #[tokio::test]
    async fn compaction_keeps_exactly_what_later_revisions_see() {
        let (_dir, _, store) = temp_store();
        let store = Arc::new(store);
        store.write(put("k", "v1")).await.unwrap(); // rev 2
        store.write(put("k", "v2")).await.unwrap(); // rev 3
        store.write(delete(b"k".to_vec())).await.unwrap(); // rev 4
        store.write(put("j", "x")).await.unwrap(); // rev 5
        store.write(put("j", "y")).await.unwrap(); // rev 6
        store.write(compact(5, true)).await.unwrap();
        // k's versions and its tombstone are gone; j keeps the version rev 5 sees.
        assert_eq!(rows(&store), vec![(b"j".to_vec(), 5), (b"j".to_vec(), 6)]);
        let at = |rev: i64| {
            let j = RangeRequest {
                key: b"j".to_vec(),
                revision: rev,
                ..Default::default()
            };
            range_as(&store, None, j)
        };
        assert_eq!(at(5).unwrap().kvs[0].value, b"x");
        assert!(matches!(at(4), Err(ApiError::Compacted)));
        assert!(matches!(
            store.write(compact(5, false)).await,
            Err(ApiError::Compacted)
        ));
        store.close();
    }

    #[tokio::test]
    async fn leases_survive_restart_and_revoke_deletes_keys() {
        let (_dir, path, store) = temp_store();
        let granted = store
            .write(WriteOp::LeaseGrant { id: 42, ttl: 60 })
            .await
            .unwrap();
        assert!(matches!(
            granted,
            WriteResult::Grant {
                id: 42,
                ttl: 60,
                ..
            }
        ));
        store.write(put_leased("leased", "", 42)).await.unwrap();
        store.close();
        let store = Store::open(&path).unwrap();
        assert_eq!(store.lease_get(42).map(|l| l.ttl), Some(60));
        let mut commits = store.shared.commits.subscribe();
        store.write(revoke(42)).await.unwrap();
        let commit = commits.recv().await.unwrap();
        assert_eq!(commit[0].events[0].kv.as_ref().unwrap().key, b"leased");
        assert!(store.lease_get(42).is_none());
        store.close();
    }

    /// One job through a writer driven by the test, in a batch of its own that fails
    /// when `fail` says why.
    fn job_in_batch(
        writer: &mut Writer,
        op: WriteOp,
        fail: Option<&str>,
    ) -> oneshot::Receiver<Result<WriteResult, ApiError>> {
        let (reply, answer) = oneshot::channel();
        let mut batch = writer.begin().unwrap();
        writer.add(
            &mut batch,
            Job {
                op,
                reply: Some(reply),
            },
        );
        batch.failed = fail.map(str::to_string);
        writer.commit(batch);
        answer
    }

    #[tokio::test]
    async fn a_failed_batch_takes_back_its_compaction() {
        let (_dir, path, store) = temp_store();
        for i in 0..6 {
            store.write(put("k", &i.to_string())).await.unwrap();
        }
        store.close();
        // The writer without its threads: each job is a batch, answered at commit.
        let conn = Connection::open(&path).unwrap();
        configure_writer(&conn).unwrap();
        let mut writer = Writer::load(conn, &path).unwrap();

        // A compaction that commits leaves a task to finish in steps.
        job_in_batch(&mut writer, compact(3, false), None);
        assert_eq!(writer.compact_rev, 3);
        let task = writer.compaction.as_ref().map(|t| (t.rev, t.cursor));
        assert_eq!(task.map(|t| t.0), Some(3));

        // One in a batch that fails is taken back, in memory and in the file, and its
        // caller hears the failure.
        let mut answer = job_in_batch(&mut writer, compact(5, true), Some("disk full"));
        assert_eq!(writer.compact_rev, 3);
        assert_eq!(writer.compaction.as_ref().map(|t| (t.rev, t.cursor)), task);
        assert!(
            writer
                .compaction
                .as_ref()
                .is_some_and(|t| t.waiters.is_empty())
        );
        match answer.try_recv() {
            Ok(Err(ApiError::Internal(reason))) => {
                assert!(reason.contains("disk full"), "{reason}")
            }
            other => panic!("the failed compaction was answered with {other:?}"),
        }
        assert_eq!(mvcc::read_compact_rev(&writer.conn).unwrap(), 3);

        // The revisions it would have removed are still there to compact to later.
        job_in_batch(&mut writer, compact(4, false), None);
        assert_eq!(writer.compact_rev, 4);
        assert_eq!(mvcc::read_compact_rev(&writer.conn).unwrap(), 4);
    }

    #[tokio::test]
    async fn wal_keeps_its_inode_across_checkpoints_and_sync_failure_stops_writes() {
        use std::os::unix::fs::MetadataExt;
        let (_dir, path, store) = temp_store();
        store.write(put("a", "1")).await.unwrap();
        let wal = WalFile::new(&path).path;
        let inode = std::fs::metadata(&wal).unwrap().ino();
        let other = Connection::open(&path).unwrap();
        for mode in ["PASSIVE", "RESTART", "TRUNCATE"] {
            other
                .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()))
                .unwrap();
            store.write(put("a", mode)).await.unwrap();
            assert_eq!(std::fs::metadata(&wal).unwrap().ino(), inode, "{mode}");
        }
        let rev = store.current_rev();
        store.shared.sync_failed.set("disk gone".into()).unwrap();
        let err = store.write(put("b", "2")).await.unwrap_err();
        assert!(err.to_string().contains("disk gone"), "{err}");
        assert_eq!(store.current_rev(), rev);
        store.close();
    }
}
