//! Reads over the stored history that are not key ranges: events between revisions
//! (watch catch-up), HashKV, the file's size, and copies of the database (snapshot).

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, params};
use sha2::{Digest, Sha256};

use super::RevEvents;
use crate::datastore::mvcc::{self};
use crate::datastore::proto::mvccpb::Event;

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
    use crate::datastore::proto::mvccpb::{KeyValue, event};
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
