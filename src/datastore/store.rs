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
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, oneshot};

use super::error::{ApiError, DatastoreError};
use super::index::Index;
use super::mvcc::{self, Applier, View};
use super::proto::etcdserverpb::{
    DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, ResponseHeader, TxnRequest,
    TxnResponse,
};
use super::proto::mvccpb::Event;

/// etcd's largest lease TTL, in seconds.
pub(crate) const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// etcd's smallest lease TTL with its default heartbeat and election timeout.
pub(crate) const MIN_LEASE_TTL: i64 = 2;
/// The raft term a single member reports (etcd's first election makes it 2).
const RAFT_TERM: u64 = 2;
/// Jobs the writer takes into one transaction at most.
const MAX_BATCH: usize = 512;
/// Rows one compaction step looks at; small so writes never wait long behind it.
const COMPACT_STEP_ROWS: usize = 2000;
const READ_POOL_IDLE: usize = 8;
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
/// Commits after which the checkpointer copies the WAL even while writes go on; below
/// it, it waits for a pause in writes, so that a checkpoint (which syncs the database
/// file, and so competes with the WAL's fdatasync for the disk) rarely delays a write.
const CHECKPOINT_COMMITS: u64 = 1000;
/// WAL length (in 4 KiB frames, so 32 MiB) past which the checkpointer makes it restart.
const WAL_RESTART_FRAMES: i64 = 8192;

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

/// Copies committed WAL frames into the database file in the background, when writes
/// pause or `CHECKPOINT_COMMITS` have piled up. PASSIVE checkpoints take no lock that
/// writers or readers wait for; once everything is copied and no reader needs the old
/// frames, SQLite starts the WAL over at the next commit.
fn checkpointer(shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    let conn = match Connection::open(&shared.path) {
        Ok(conn) => conn,
        Err(err) => {
            tracing::warn!(error = %err, "datastore: no checkpointer connection");
            return;
        }
    };
    let _ = conn.busy_timeout(Duration::from_secs(1));
    let _ = conn.pragma_update(None, "wal_autocheckpoint", 0);
    // commits the last complete checkpoint covered, and those seen at the last tick
    let (mut covered, mut seen) = (0u64, 0u64);
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(CHECKPOINT_INTERVAL);
        let now = shared.wal_commits.load(Ordering::SeqCst);
        let idle = now == seen;
        seen = now;
        if now == covered || (!idle && now - covered < CHECKPOINT_COMMITS) {
            continue;
        }
        let passive: rusqlite::Result<(i64, i64, i64)> =
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            });
        match passive {
            // Under a constant write load a passive checkpoint never catches up with the
            // end of the WAL, so the WAL never starts over and grows without bound,
            // slowing every page lookup. Past a limit, a RESTART checkpoint waits for the
            // current write (a few ms at most, as the passive one copied nearly all) so
            // the next commit starts the WAL from the beginning.
            Ok((_, log, _)) if log > WAL_RESTART_FRAMES => {
                if let Err(err) = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(())) {
                    tracing::debug!(error = %err, "datastore: restart checkpoint failed");
                }
            }
            Ok((_, log, copied)) if copied >= log => covered = now,
            Ok(_) => {}
            Err(err) => tracing::debug!(error = %err, "datastore: checkpoint failed"),
        }
    }
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

/// Size of the database file and the part of it in use, in bytes.
pub(crate) fn db_size(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    Ok((pages * page_size, (pages - free) * page_size))
}

/// A digest of every version kept up to `rev` (HashKV). Not etcd's hash function: it
/// lets two reads of one kdist store be compared, not kdist against etcd.
pub(crate) fn hash_kv(conn: &Connection, rev: i64) -> rusqlite::Result<u32> {
    let mut hasher = Sha256::new();
    let mut stmt = conn.prepare_cached(
        "SELECT key, rev, version, value, lease FROM kv WHERE rev <= ?1 ORDER BY rev, sub",
    )?;
    let mut rows = stmt.query(params![rev])?;
    while let Some(row) = rows.next()? {
        let key: Vec<u8> = row.get(0)?;
        let rev: i64 = row.get(1)?;
        let version: i64 = row.get(2)?;
        let value: Vec<u8> = row.get(3)?;
        let lease: i64 = row.get(4)?;
        hasher.update((key.len() as u64).to_be_bytes());
        hasher.update(&key);
        hasher.update(rev.to_be_bytes());
        hasher.update(version.to_be_bytes());
        hasher.update((value.len() as u64).to_be_bytes());
        hasher.update(&value);
        hasher.update(lease.to_be_bytes());
    }
    let digest = hasher.finalize();
    Ok(u32::from_be_bytes([
        digest[0], digest[1], digest[2], digest[3],
    ]))
}

/// Writes a consistent copy of the database to `dest` (a new file).
pub(crate) fn copy_into(conn: &Connection, dest: &Path) -> rusqlite::Result<()> {
    conn.execute("VACUUM INTO ?1", params![dest.to_string_lossy()])?;
    Ok(())
}

/// Events with revisions in `[from, to]`, ordered; used to replay history to a watch.
/// With `prev_from`, the events of every revision whose previous one is at or after it
/// (not compacted) carry the key's version before them, as etcd's prev_kv does.
pub(crate) fn events_between(
    conn: &Connection,
    from: i64,
    to: i64,
    prev_from: Option<i64>,
) -> rusqlite::Result<Vec<RevEvents>> {
    use super::proto::mvccpb::{KeyValue, event};
    let mut stmt = conn.prepare_cached(
        "SELECT key, create_rev, rev, version, value, lease, prev_rev, prev_sub FROM kv \
         WHERE rev >= ?1 AND rev <= ?2 ORDER BY rev, sub",
    )?;
    let mut rows = stmt.query(params![from, to])?;
    let mut out: Vec<RevEvents> = Vec::new();
    // where the first row of each key in the current revision points back to: the
    // version before that revision, which every event of the key in it carries
    let mut before: HashMap<Vec<u8>, (i64, i64)> = HashMap::new();
    while let Some(row) = rows.next()? {
        let kv = KeyValue {
            key: row.get(0)?,
            create_revision: row.get(1)?,
            mod_revision: row.get(2)?,
            version: row.get(3)?,
            value: row.get(4)?,
            lease: row.get(5)?,
        };
        let rev = kv.mod_revision;
        if out.last().is_none_or(|last| last.rev != rev) {
            before.clear();
        }
        let prev_at = *before
            .entry(kv.key.clone())
            .or_insert((row.get(6)?, row.get(7)?));
        let prev_kv = match prev_from {
            // a put's first version has nothing before it
            Some(since) if rev > since && kv.version != 1 => {
                mvcc::history_row(conn, prev_at.0, prev_at.1)?
            }
            _ => None,
        };
        let ev = if kv.version == 0 {
            Event {
                r#type: event::EventType::Delete as i32,
                kv: Some(KeyValue {
                    key: kv.key,
                    mod_revision: rev,
                    ..Default::default()
                }),
                prev_kv,
            }
        } else {
            Event {
                r#type: event::EventType::Put as i32,
                kv: Some(kv),
                prev_kv,
            }
        };
        match out.last_mut() {
            Some(last) if last.rev == rev => last.events.push(ev),
            _ => out.push(RevEvents {
                rev,
                events: vec![ev],
            }),
        }
    }
    Ok(out)
}

/// A committed batch waiting for the WAL to reach the disk.
struct Durable {
    /// The revision after the batch and every key at it.
    published: Published,
    commit: Option<Commit>,
    replies: Vec<Done>,
}

/// A handle on `<db>-wal` for fdatasync. SQLite creates the WAL at the first write and
/// keeps the same file (truncating or rewriting it in place, never replacing it) while
/// any connection has the database open in WAL mode; the inode is still checked before
/// each sync so a handle never syncs a file that is no longer the WAL.
struct WalFile {
    path: PathBuf,
    file: Option<(std::fs::File, u64)>,
}

impl WalFile {
    fn new(db: &Path) -> WalFile {
        let mut name = db.as_os_str().to_owned();
        name.push("-wal");
        WalFile {
            path: PathBuf::from(name),
            file: None,
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::metadata(&self.path)?.ino();
        match &self.file {
            Some((file, current)) if *current == inode => file.sync_data(),
            _ => {
                let file = std::fs::File::open(&self.path)?;
                let inode = file.metadata()?.ino();
                let synced = file.sync_data();
                self.file = Some((file, inode));
                synced
            }
        }
    }
}

/// Makes committed batches durable, then publishes and acknowledges them.
///
/// Why an acknowledged write survives power loss although commits do not fsync: the
/// writer queues a batch here only after its COMMIT returned, so its frames are in the
/// WAL file (in the page cache). This thread takes every batch queued, fdatasyncs the
/// WAL, and only then answers them, so each answer follows an fdatasync that started
/// after its commit. Checkpoints never lose such frames: SQLite syncs the WAL before
/// copying frames into the database file and syncs the database file before the WAL
/// starts over and frames get overwritten, so every acknowledged write is in a synced
/// WAL or a synced database file. Watchers and readers (which read at the published
/// revision) see a batch at the same time its writers are answered, so nothing that a
/// crash could take back is ever shown. A failed fdatasync leaves the WAL's state on
/// disk unknown: the waiting writes fail and the store takes no more writes.
fn syncer(
    mut wal: WalFile,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Durable>,
    handoff: Arc<Handoff>,
    wake: mpsc::Sender<Job>,
) {
    while let Ok(first) = rx.recv() {
        let mut pending = vec![first];
        while let Ok(more) = rx.try_recv() {
            pending.push(more);
        }
        let synced = match shared.sync_failed.get() {
            Some(reason) => Err(reason.clone()),
            None => wal.sync().map_err(|err| {
                let reason = format!(
                    "fdatasync of {} failed: {err}; the datastore accepts no more writes, \
                     check the disk and restart it",
                    wal.path.display()
                );
                tracing::error!("datastore: {reason}");
                let _ = shared.sync_failed.set(reason.clone());
                reason
            }),
        };
        if synced.is_ok()
            && let Some(newest) = pending.iter().map(|b| &b.published).max_by_key(|p| p.rev)
        {
            // Readers see the batches before their writers and watchers hear of them,
            // so whoever learns of a revision can read it.
            let mut published = lock_published(&shared);
            if newest.rev >= published.rev {
                *published = newest.clone();
            }
        }
        let answered = pending.len();
        for batch in pending {
            match &synced {
                Ok(()) => {
                    if let Some(commit) = batch.commit {
                        let _ = shared.commits.send(commit);
                    }
                    shared.rev.fetch_max(batch.published.rev, Ordering::SeqCst);
                    for d in batch.replies {
                        if let Some(reply) = d.reply {
                            let _ = reply.send(d.result);
                        }
                    }
                }
                Err(reason) => {
                    for d in batch.replies {
                        if let Some(reply) = d.reply {
                            let _ = reply.send(Err(ApiError::Internal(reason.clone())));
                        }
                    }
                }
            }
        }
        handoff.in_flight.fetch_sub(answered, Ordering::SeqCst);
        if handoff.writer_waiting.swap(false, Ordering::SeqCst) {
            let _ = wake.send(Job {
                op: WriteOp::Wake,
                reply: None,
            });
        }
    }
}

/// How the writer knows when to commit: a batch committed while the syncer is busy
/// would wait for the fdatasync in progress anyway, so the writer keeps its transaction
/// open and takes more jobs into it until the syncer has answered everything handed to
/// it. Fewer, larger commits write each WAL page (the end of `kv`) once instead of once
/// per commit.
#[derive(Default)]
struct Handoff {
    /// Batches handed to the syncer and not yet answered.
    in_flight: AtomicUsize,
    /// Set by a writer about to block with an open batch; the syncer clears it and
    /// sends a `WriteOp::Wake` job once nothing is in flight.
    writer_waiting: AtomicBool,
}

struct Compaction {
    rev: i64,
    /// The history position (rev, sub) after which rows are still to be looked at.
    cursor: (i64, i64),
    waiters: Vec<(Reply, i64)>,
}

struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    /// Every key at `rev`, including batches committed and not yet published.
    index: Index,
    rev: i64,
    compact_rev: i64,
    /// Lease id -> TTL, the writer's authoritative view of which leases exist.
    leases: HashMap<i64, i64>,
    compaction: Option<Compaction>,
    /// When a failed compaction step may be tried again.
    compact_retry: Instant,
    /// The revision the last finished compaction removed everything below; the rows at
    /// or before it need not be looked at again.
    compact_done: i64,
    next_lease: i64,
    handoff: Arc<Handoff>,
    /// Where committed batches go to be made durable and answered (see `syncer`).
    syncer: Option<(mpsc::Sender<Durable>, std::thread::JoinHandle<()>)>,
}

struct Done {
    reply: Option<Reply>,
    result: Result<WriteResult, ApiError>,
}

/// An open write transaction and what to undo if its commit fails.
struct Batch {
    start_rev: i64,
    start_compact: i64,
    /// The compaction task when the batch began (revision and cursor) and how many
    /// waiters it had: a failed batch puts it back (see `restore_compaction`).
    start_compaction: Option<(i64, (i64, i64))>,
    start_waiters: usize,
    start_leases: HashMap<i64, i64>,
    start_index: Index,
    done: Vec<Done>,
    published: Vec<RevEvents>,
    /// Set when a storage error hit a put: the whole batch is rolled back.
    failed: Option<String>,
}

impl Writer {
    /// The writer's state for the store at `path`, read from `conn` (schema current):
    /// the revision, the leases and every current key, with `Shared` for the other
    /// threads. It has no syncer yet (see `Store::open`).
    fn load(conn: Connection, path: &Path) -> rusqlite::Result<Writer> {
        let (cluster_id, member_id, rev, compact_rev, compact_done): (i64, i64, i64, i64, i64) =
            conn.query_row(
                concat!(
                    "SELECT cluster_id, member_id, ",
                    mvcc::rev_sql!(),
                    ", compact_rev, compact_done FROM meta"
                ),
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )?;
        let leases = load_leases(&conn)?;
        let index = Index::load(&conn)?;
        // Like etcd after a restart, every lease gets its full TTL again.
        let now = Instant::now();
        let lessor: HashMap<i64, LeaseEntry> = leases
            .iter()
            .map(|(&id, &ttl)| {
                let expiry = now + Duration::from_secs(ttl.max(0) as u64);
                (id, LeaseEntry { ttl, expiry })
            })
            .collect();
        let (commits, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            cluster_id: cluster_id as u64,
            member_id: member_id as u64,
            rev: AtomicI64::new(rev),
            published: Mutex::new(Published {
                rev,
                index: index.clone(),
            }),
            compact_rev: AtomicI64::new(compact_rev),
            commits,
            leases: Mutex::new(lessor),
            sync_failed: OnceLock::new(),
            wal_commits: AtomicU64::new(0),
        });
        Ok(Writer {
            conn,
            shared,
            index,
            rev,
            compact_rev,
            leases,
            compaction: (compact_done < compact_rev).then(|| Compaction {
                rev: compact_rev,
                cursor: (compact_done, i64::MAX),
                waiters: Vec::new(),
            }),
            compact_retry: Instant::now(),
            compact_done,
            next_lease: 0,
            handoff: Arc::new(Handoff::default()),
            syncer: None,
        })
    }

    fn run(&mut self, rx: mpsc::Receiver<Job>) {
        let mut open: Option<Batch> = None;
        loop {
            let job = match open.take() {
                Some(batch) if batch.done.len() >= MAX_BATCH || !self.syncer_busy() => {
                    self.commit(batch);
                    // One bounded step per batch keeps compaction moving under load.
                    if self.compaction.is_some() && Instant::now() >= self.compact_retry {
                        self.compact_step();
                    }
                    continue;
                }
                Some(batch) => {
                    open = Some(batch);
                    // Take more jobs until the syncer is done (see `Handoff`).
                    self.handoff.writer_waiting.store(true, Ordering::SeqCst);
                    if !self.syncer_busy() {
                        self.handoff.writer_waiting.store(false, Ordering::SeqCst);
                        continue;
                    }
                    match rx.recv() {
                        Ok(job) => job,
                        Err(_) => break,
                    }
                }
                None if self.compaction.is_some() => {
                    let wait = self.compact_retry.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(wait) {
                        Ok(job) => job,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            self.compact_step();
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                None => match rx.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            match job.op {
                WriteOp::Wake => {}
                WriteOp::Shutdown => break,
                WriteOp::Defrag => {
                    if let Some(batch) = open.take() {
                        self.commit(batch);
                    }
                    let result = self.defrag();
                    self.after_sync(
                        None,
                        vec![Done {
                            reply: job.reply,
                            result,
                        }],
                    );
                }
                _ => {
                    if open.is_none() {
                        match self.begin() {
                            Ok(batch) => open = Some(batch),
                            Err(reason) => {
                                if let Some(reply) = job.reply {
                                    let _ = reply.send(Err(ApiError::Internal(reason)));
                                }
                                continue;
                            }
                        }
                    }
                    if let Some(batch) = open.as_mut() {
                        self.add(batch, job);
                    }
                }
            }
        }
        if let Some(batch) = open.take() {
            self.commit(batch);
        }
        // Everything committed is answered before the store reports itself closed.
        if let Some((durable, handle)) = self.syncer.take() {
            drop(durable);
            let _ = handle.join();
        }
        // Clean close: checkpoint so the WAL does not have to be replayed at next open.
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    }

    fn syncer_busy(&self) -> bool {
        self.handoff.in_flight.load(Ordering::SeqCst) > 0
    }

    fn exec_cached(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.prepare_cached(sql)?.execute([])?;
        Ok(())
    }

    /// Queues answers (and a batch's events) to be sent once the WAL is synced.
    fn after_sync(&self, commit: Option<Commit>, replies: Vec<Done>) {
        if let Some((durable, _)) = &self.syncer {
            self.handoff.in_flight.fetch_add(1, Ordering::SeqCst);
            let _ = durable.send(Durable {
                published: Published {
                    rev: self.rev,
                    index: self.index.clone(),
                },
                commit,
                replies,
            });
        }
    }

    /// Opens the write transaction of a new batch.
    fn begin(&mut self) -> Result<Batch, String> {
        if let Some(reason) = self.shared.sync_failed.get() {
            return Err(reason.clone());
        }
        self.exec_cached("BEGIN IMMEDIATE").map_err(|err| {
            tracing::warn!(error = %err, "datastore: cannot begin a write transaction");
            err.to_string()
        })?;
        Ok(Batch {
            start_rev: self.rev,
            start_compact: self.compact_rev,
            start_compaction: self.compaction.as_ref().map(|task| (task.rev, task.cursor)),
            start_waiters: self
                .compaction
                .as_ref()
                .map_or(0, |task| task.waiters.len()),
            start_leases: self.leases.clone(),
            start_index: self.index.clone(),
            done: Vec::new(),
            published: Vec::new(),
            failed: None,
        })
    }

    /// Applies one job inside the batch's transaction.
    fn add(&mut self, batch: &mut Batch, job: Job) {
        if let Some(reason) = &batch.failed {
            if let Some(reply) = job.reply {
                let _ = reply.send(Err(ApiError::Internal(reason.clone())));
            }
            return;
        }
        // A put checks everything before it writes, so only a storage error can leave it
        // half done, and that undoes the whole batch (see `commit`). Other jobs may fail
        // after writing and get a savepoint to roll back to.
        let guarded = !matches!(job.op, WriteOp::Put(_));
        let job_index = guarded.then(|| self.index.clone());
        if guarded {
            let _ = self.exec_cached("SAVEPOINT job");
        }
        let mut events = Vec::new();
        let mut lease_change = None;
        let result = self.apply(job.op, &mut events, &mut lease_change);
        match &result {
            Err(ApiError::Storage(err)) if !guarded => {
                batch.failed = Some(err.to_string());
            }
            Ok(_) => {
                if guarded {
                    let _ = self.exec_cached("RELEASE job");
                }
                if !events.is_empty() {
                    self.rev += 1;
                    batch.published.push(RevEvents {
                        rev: self.rev,
                        events,
                    });
                }
                match lease_change {
                    Some(LeaseChange::Granted(id, ttl)) => {
                        self.leases.insert(id, ttl);
                    }
                    Some(LeaseChange::Revoked(id)) => {
                        self.leases.remove(&id);
                    }
                    None => {}
                }
            }
            Err(_) => {
                if guarded {
                    let _ = self.exec_cached("ROLLBACK TO job");
                    let _ = self.exec_cached("RELEASE job");
                }
                if let Some(index) = job_index {
                    self.index = index;
                }
            }
        }
        let mut reply = job.reply;
        if matches!(result, Ok(WriteResult::Rev(-1)))
            && let Some(task) = self.compaction.as_mut()
            && let Some(waiter) = reply.take()
        {
            // A physical compaction answers once the last step committed.
            task.waiters.push((waiter, 0));
        }
        batch.done.push(Done { reply, result });
    }

    /// Commits the batch and hands it to the syncer, or rolls all of it back.
    fn commit(&mut self, batch: Batch) {
        let commit = match batch.failed {
            Some(reason) => Err(reason),
            // `meta` is written only when the compacted revision moved (the revision is
            // read off `kv`, see mvcc::rev_sql).
            None => (if self.compact_rev != batch.start_compact {
                self.conn
                    .prepare_cached("UPDATE meta SET rev = ?1, compact_rev = ?2 WHERE id = 0")
                    .and_then(|mut stmt| stmt.execute(params![self.rev, self.compact_rev]))
                    .map(|_| ())
            } else {
                Ok(())
            })
            .and_then(|_| self.exec_cached("COMMIT"))
            .inspect(|_| {
                self.shared.wal_commits.fetch_add(1, Ordering::SeqCst);
            })
            .map_err(|err| err.to_string()),
        };
        if let Err(err) = commit {
            tracing::error!(error = %err, "datastore: commit failed, batch rolled back");
            let _ = self.conn.execute_batch("ROLLBACK");
            self.rev = batch.start_rev;
            self.leases = batch.start_leases;
            self.index = batch.start_index;
            self.compact_rev = batch.start_compact;
            self.restore_compaction(batch.start_compaction, batch.start_waiters, &err);
            for d in batch.done {
                if let Some(reply) = d.reply {
                    let _ = reply.send(Err(ApiError::Internal(err.to_string())));
                }
            }
            return;
        }
        // Lease table changes are published at commit (the lessor only decides expiry);
        // events, the revision and the answers once the WAL is synced.
        if let Ok(mut lessor) = self.shared.leases.lock() {
            lessor.retain(|id, _| self.leases.contains_key(id));
            let now = Instant::now();
            for (&id, &ttl) in &self.leases {
                lessor.entry(id).or_insert(LeaseEntry {
                    ttl,
                    expiry: now + Duration::from_secs(ttl.max(0) as u64),
                });
            }
        }
        self.shared
            .compact_rev
            .store(self.compact_rev, Ordering::SeqCst);
        let commit = (!batch.published.is_empty()).then(|| Arc::new(batch.published));
        self.after_sync(commit, batch.done);
    }

    /// Puts the compaction task back as it was when a failed batch began. Physical
    /// compactions asked for in the batch wait in the task: they are answered with `err`.
    fn restore_compaction(&mut self, start: Option<(i64, (i64, i64))>, kept: usize, err: &str) {
        let mut waiters = self
            .compaction
            .take()
            .map(|task| task.waiters)
            .unwrap_or_default();
        let kept = kept.min(waiters.len());
        for (reply, _) in waiters.drain(kept..) {
            let _ = reply.send(Err(ApiError::Internal(err.to_string())));
        }
        self.compaction = start.map(|(rev, cursor)| Compaction {
            rev,
            cursor,
            waiters,
        });
    }

    /// An applier of one operation on top of the writer's current state.
    fn applier(&mut self) -> Applier<'_> {
        Applier::new(
            &self.conn,
            &mut self.index,
            self.rev,
            self.compact_rev,
            &self.leases,
        )
    }

    /// Applies one operation to the open transaction and the writer's state: its answer,
    /// with the events it made and the lease it granted or revoked.
    fn apply(
        &mut self,
        op: WriteOp,
        events: &mut Vec<Event>,
        lease_change: &mut Option<LeaseChange>,
    ) -> Result<WriteResult, ApiError> {
        match op {
            WriteOp::Put(req) => {
                let mut a = self.applier();
                let resp = a.put(&req)?;
                *events = a.events;
                Ok(WriteResult::Put(resp))
            }
            WriteOp::Delete(req) => {
                let mut a = self.applier();
                let resp = a.delete_range(&req)?;
                *events = a.events;
                Ok(WriteResult::Delete(resp))
            }
            WriteOp::Txn(req) => self.apply_txn(&req, events),
            WriteOp::Compact { revision, physical } => self.start_compaction(revision, physical),
            WriteOp::LeaseGrant { id, ttl } => self.grant_lease(id, ttl, lease_change),
            WriteOp::LeaseRevoke {
                id,
                only_if_expired,
            } => self.revoke_lease(id, only_if_expired, events, lease_change),
            WriteOp::Defrag | WriteOp::Shutdown | WriteOp::Wake => Ok(WriteResult::Rev(self.rev)),
        }
    }

    /// A transaction: its compares and every branch checked against the current state
    /// first (etcd refuses a whole transaction up front), then the branch taken applied.
    fn apply_txn(
        &mut self,
        req: &TxnRequest,
        events: &mut Vec<Event>,
    ) -> Result<WriteResult, ApiError> {
        let mut path = Vec::new();
        mvcc::txn_path(&self.index, req, &mut path);
        let write = !mvcc::txn_is_read_only(req);
        mvcc::check_txn(
            &self.index,
            req,
            &path,
            (self.rev, self.compact_rev),
            write,
            &|id| self.leases.contains_key(&id),
        )?;
        let mut a = self.applier();
        let mut resp = a.txn(req, &path, &mut 0)?;
        resp.header = mvcc::rev_header(a.cur_rev());
        *events = a.events;
        Ok(WriteResult::Txn(resp))
    }

    /// Moves the compacted revision now; the rows go in later steps (`compact_step`).
    /// A physical compaction is answered once its last step committed.
    fn start_compaction(&mut self, revision: i64, physical: bool) -> Result<WriteResult, ApiError> {
        if revision <= self.compact_rev {
            return Err(ApiError::Compacted);
        }
        if revision > self.rev {
            return Err(ApiError::FutureRev);
        }
        self.compact_rev = revision;
        let waiters = self
            .compaction
            .take()
            .map(|c| c.waiters)
            .unwrap_or_default();
        self.compaction = Some(Compaction {
            rev: revision,
            cursor: (self.compact_done, i64::MAX),
            waiters,
        });
        if physical {
            // Answered when the last compaction step commits.
            return Ok(WriteResult::Rev(-1));
        }
        Ok(WriteResult::Rev(self.rev))
    }

    fn grant_lease(
        &mut self,
        id: i64,
        ttl: i64,
        lease_change: &mut Option<LeaseChange>,
    ) -> Result<WriteResult, ApiError> {
        if ttl > MAX_LEASE_TTL {
            return Err(ApiError::LeaseTtlTooLarge);
        }
        let id = if id == 0 { self.new_lease_id() } else { id };
        if self.leases.contains_key(&id) {
            return Err(ApiError::LeaseExist);
        }
        let ttl = ttl.max(MIN_LEASE_TTL);
        self.conn
            .prepare_cached("INSERT INTO lease (id, ttl) VALUES (?1, ?2)")?
            .execute(params![id, ttl])?;
        *lease_change = Some(LeaseChange::Granted(id, ttl));
        Ok(WriteResult::Grant {
            id,
            ttl,
            rev: self.rev,
        })
    }

    /// Revokes a lease and deletes its keys; with `only_if_expired` (the expiry check),
    /// a lease renewed since it was found expired is kept.
    fn revoke_lease(
        &mut self,
        id: i64,
        only_if_expired: bool,
        events: &mut Vec<Event>,
        lease_change: &mut Option<LeaseChange>,
    ) -> Result<WriteResult, ApiError> {
        if !self.leases.contains_key(&id) {
            return Err(ApiError::LeaseNotFound);
        }
        if only_if_expired {
            let renewed = self
                .shared
                .leases
                .lock()
                .ok()
                .and_then(|l| l.get(&id).map(|e| e.expiry > Instant::now()))
                .unwrap_or(false);
            if renewed {
                return Ok(WriteResult::Rev(self.rev));
            }
        }
        let mut a = self.applier();
        a.delete_lease_keys(id)?;
        let changed = a.changed();
        *events = a.events;
        self.conn
            .prepare_cached("DELETE FROM lease WHERE id = ?1")?
            .execute(params![id])?;
        *lease_change = Some(LeaseChange::Revoked(id));
        Ok(WriteResult::Rev(self.rev + i64::from(changed)))
    }

    fn new_lease_id(&mut self) -> i64 {
        // Like etcd's generator: member id in the high bits, a time-seeded counter below.
        if self.next_lease == 0 {
            let millis = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(1);
            let member = (self.shared.member_id & 0x7fff) as i64;
            self.next_lease = (member << 48) | ((millis & 0xff_ffff_ffff) << 8);
        }
        loop {
            self.next_lease = self.next_lease.wrapping_add(1) & i64::MAX;
            if self.next_lease != 0 && !self.leases.contains_key(&self.next_lease) {
                return self.next_lease;
            }
        }
    }

    fn defrag(&mut self) -> Result<WriteResult, ApiError> {
        self.conn.execute_batch("VACUUM")?;
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(WriteResult::Rev(self.rev))
    }

    /// Removes a bounded number of versions no revision >= the compacted one can see.
    fn compact_step(&mut self) {
        let Some(task) = self.compaction.as_mut() else {
            return;
        };
        let result = compact_rows(&self.conn, task.rev, task.cursor);
        if result.is_ok() {
            self.shared.wal_commits.fetch_add(1, Ordering::SeqCst);
        }
        match result {
            Ok(Some(next)) => task.cursor = next,
            Ok(None) => {
                if let Some(task) = self.compaction.take() {
                    tracing::debug!(revision = task.rev, "datastore: compaction finished");
                    self.compact_done = task.rev;
                    let replies = task
                        .waiters
                        .into_iter()
                        .map(|(reply, _)| Done {
                            reply: Some(reply),
                            result: Ok(WriteResult::Rev(self.rev)),
                        })
                        .collect();
                    self.after_sync(None, replies);
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "datastore: compaction step failed, retrying in 5s");
                self.compact_retry = Instant::now() + Duration::from_secs(5);
                for (reply, _) in task.waiters.drain(..) {
                    let _ = reply.send(Err(ApiError::Internal(format!("compaction: {err}"))));
                }
            }
        }
    }
}

enum LeaseChange {
    Granted(i64, i64),
    Revoked(i64),
}

/// One compaction step: looks at up to `COMPACT_STEP_ROWS` history rows after `cursor`
/// and at or below `rev`, and removes what no read at `rev` or later can see: the row
/// each of them replaced (its `prev`), and tombstones themselves. Returns the next
/// cursor, or None when every row up to `rev` has been looked at (and `compact_done`
/// recorded). A step is idempotent, so a restart may repeat one. It removes rows at or
/// below `rev` only, and the batch that set the compacted revision recorded the current
/// one in `meta`, so the store's revision (mvcc::rev_sql) never goes back.
fn compact_rows(
    conn: &Connection,
    rev: i64,
    cursor: (i64, i64),
) -> rusqlite::Result<Option<(i64, i64)>> {
    let mut doomed: Vec<(i64, i64)> = Vec::new();
    let mut last = cursor;
    let mut scanned = 0usize;
    {
        let mut stmt = conn.prepare_cached(
            "SELECT rev, sub, version, prev_rev, prev_sub FROM kv \
             WHERE (rev, sub) > (?1, ?2) AND rev <= ?3 ORDER BY rev, sub",
        )?;
        let mut rows = stmt.query(params![cursor.0, cursor.1, rev])?;
        while scanned < COMPACT_STEP_ROWS {
            let Some(row) = rows.next()? else { break };
            let at: (i64, i64) = (row.get(0)?, row.get(1)?);
            let version: i64 = row.get(2)?;
            let prev: (i64, i64) = (row.get(3)?, row.get(4)?);
            if prev.0 != 0 {
                doomed.push(prev);
            }
            if version == 0 {
                doomed.push(at);
            }
            last = at;
            scanned += 1;
        }
    }
    let next = (scanned == COMPACT_STEP_ROWS).then_some(last);
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let work = (|| {
        let mut del = conn.prepare_cached("DELETE FROM kv WHERE rev = ?1 AND sub = ?2")?;
        for (r, sub) in &doomed {
            del.execute(params![r, sub])?;
        }
        if next.is_none() {
            conn.execute(
                "UPDATE meta SET compact_done = ?1 WHERE id = 0",
                params![rev],
            )?;
        }
        Ok::<_, rusqlite::Error>(())
    })();
    match work {
        Ok(()) => conn.execute_batch("COMMIT")?,
        Err(err) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(err);
        }
    }
    Ok(next)
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
