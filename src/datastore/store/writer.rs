//! The writer thread: group commit of write jobs into one SQLite transaction, the
//! writer's in-memory state (index, revision, leases), and compaction in steps.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};
use tokio::sync::broadcast;

use super::durability::{Durable, Handoff};
use super::{
    Commit, Job, LeaseEntry, MAX_LEASE_TTL, MIN_LEASE_TTL, Published, Reply, RevEvents, Shared,
    WriteOp, WriteResult, load_leases,
};
use crate::datastore::error::ApiError;
use crate::datastore::index::Index;
use crate::datastore::mvcc::{self, Applier};
use crate::datastore::proto::etcdserverpb::TxnRequest;
use crate::datastore::proto::mvccpb::Event;

/// Jobs the writer takes into one transaction at most.
const MAX_BATCH: usize = 512;
/// Rows one compaction step looks at; small so writes never wait long behind it.
const COMPACT_STEP_ROWS: usize = 2000;

pub(super) struct Compaction {
    pub(super) rev: i64,
    /// The history position (rev, sub) after which rows are still to be looked at.
    pub(super) cursor: (i64, i64),
    pub(super) waiters: Vec<(Reply, i64)>,
}

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) shared: Arc<Shared>,
    /// Every key at `rev`, including batches committed and not yet published.
    pub(super) index: Index,
    pub(super) rev: i64,
    pub(super) compact_rev: i64,
    /// Lease id -> TTL, the writer's authoritative view of which leases exist.
    pub(super) leases: HashMap<i64, i64>,
    pub(super) compaction: Option<Compaction>,
    /// When a failed compaction step may be tried again.
    pub(super) compact_retry: Instant,
    /// The revision the last finished compaction removed everything below; the rows at
    /// or before it need not be looked at again.
    pub(super) compact_done: i64,
    pub(super) next_lease: i64,
    pub(super) handoff: Arc<Handoff>,
    /// Where committed batches go to be made durable and answered (see `syncer`).
    pub(super) syncer: Option<(mpsc::Sender<Durable>, std::thread::JoinHandle<()>)>,
}

pub(super) struct Done {
    pub(super) reply: Option<Reply>,
    pub(super) result: Result<WriteResult, ApiError>,
}

/// An open write transaction and what to undo if its commit fails.
pub(super) struct Batch {
    pub(super) start_rev: i64,
    pub(super) start_compact: i64,
    /// The compaction task when the batch began (revision and cursor) and how many
    /// waiters it had: a failed batch puts it back (see `restore_compaction`).
    pub(super) start_compaction: Option<(i64, (i64, i64))>,
    pub(super) start_waiters: usize,
    pub(super) start_leases: HashMap<i64, i64>,
    pub(super) start_index: Index,
    pub(super) done: Vec<Done>,
    pub(super) published: Vec<RevEvents>,
    /// Set when a storage error hit a put: the whole batch is rolled back.
    pub(super) failed: Option<String>,
}

impl Writer {
    /// The writer's state for the store at `path`, read from `conn` (schema current):
    /// the revision, the leases and every current key, with `Shared` for the other
    /// threads. It has no syncer yet (see `Store::open`).
    pub(super) fn load(conn: Connection, path: &Path) -> rusqlite::Result<Writer> {
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

    pub(super) fn run(&mut self, rx: mpsc::Receiver<Job>) {
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
    pub(super) fn begin(&mut self) -> Result<Batch, String> {
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
    pub(super) fn add(&mut self, batch: &mut Batch, job: Job) {
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
    pub(super) fn commit(&mut self, batch: Batch) {
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

pub(super) enum LeaseChange {
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
pub(super) fn compact_rows(
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
