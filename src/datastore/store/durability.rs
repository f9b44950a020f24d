//! Durability: the syncer makes committed batches durable before anyone hears of them,
//! and the checkpointer copies the WAL into the database file so it stays short.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::Connection;

use super::writer::Done;
use super::{Commit, Job, Published, Shared, WriteOp, lock_published};
use crate::datastore::error::ApiError;

pub(super) const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
/// Commits after which the checkpointer copies the WAL even while writes go on; below
/// it, it waits for a pause in writes, so that a checkpoint (which syncs the database
/// file, and so competes with the WAL's fdatasync for the disk) rarely delays a write.
const CHECKPOINT_COMMITS: u64 = 1000;
/// WAL length (in 4 KiB frames, so 32 MiB) past which the checkpointer makes it restart.
const WAL_RESTART_FRAMES: i64 = 8192;

/// Copies committed WAL frames into the database file in the background, when writes
/// pause or `CHECKPOINT_COMMITS` have piled up. PASSIVE checkpoints take no lock that
/// writers or readers wait for; once everything is copied and no reader needs the old
/// frames, SQLite starts the WAL over at the next commit.
pub(super) fn checkpointer(shared: Arc<Shared>, stop: Arc<AtomicBool>) {
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

/// A committed batch waiting for the WAL to reach the disk.
pub(super) struct Durable {
    /// The revision after the batch and every key at it.
    pub(super) published: Published,
    pub(super) commit: Option<Commit>,
    pub(super) replies: Vec<Done>,
}

/// A handle on `<db>-wal` for fdatasync. SQLite creates the WAL at the first write and
/// keeps the same file (truncating or rewriting it in place, never replacing it) while
/// any connection has the database open in WAL mode; the inode is still checked before
/// each sync so a handle never syncs a file that is no longer the WAL.
pub(super) struct WalFile {
    pub(super) path: PathBuf,
    pub(super) file: Option<(std::fs::File, u64)>,
}

impl WalFile {
    pub(super) fn new(db: &Path) -> WalFile {
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
pub(super) fn syncer(
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
pub(super) struct Handoff {
    /// Batches handed to the syncer and not yet answered.
    pub(super) in_flight: AtomicUsize,
    /// Set by a writer about to block with an open batch; the syncer clears it and
    /// sends a `WriteOp::Wake` job once nothing is in flight.
    pub(super) writer_waiting: AtomicBool,
}
