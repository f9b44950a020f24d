//! The current version of every existing key, in memory.
//!
//! History (`kv`) is the only thing a write makes durable; the newest version of each
//! key is derived from it: read from `kv` when the store opens, then kept up to date
//! by the writer. A durable `live` table cost every put a page of its own in the WAL
//! (keys of concurrent writers sit on different pages), more than the history append
//! itself.
//!
//! The map is persistent (`imbl::OrdMap`): a clone is O(1) and shares every node, and a
//! change copies only the nodes on its path. The writer clones its index at every commit
//! and the syncer publishes that clone once the batch is durable, so a reader takes the
//! published index, a snapshot that never changes under it, without holding a lock, and
//! the writer rolls a failed job back by putting its clone from before the job back.

use bytes::Bytes;
use imbl::{HashMap, OrdMap, OrdSet};
use rusqlite::Connection;
use std::collections::HashSet;
use std::ops::Bound;

use super::mvcc::KeyRange;
use super::proto::mvccpb::KeyValue;

/// The newest version of a key, and where its row is in history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Entry {
    pub create_rev: i64,
    pub mod_rev: i64,
    /// With `mod_rev`, the position of the key's newest row in `kv`.
    pub mod_sub: i64,
    pub version: i64,
    pub lease: i64,
    pub value: Bytes,
}

impl Entry {
    pub(crate) fn of(kv: &KeyValue, mod_sub: i64) -> Entry {
        Entry {
            create_rev: kv.create_revision,
            mod_rev: kv.mod_revision,
            mod_sub,
            version: kv.version,
            lease: kv.lease,
            value: Bytes::copy_from_slice(&kv.value),
        }
    }

    pub(crate) fn kv(&self, key: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            create_revision: self.create_rev,
            mod_revision: self.mod_rev,
            version: self.version,
            value: self.value.to_vec(),
            lease: self.lease,
        }
    }
}

/// Every existing key at one revision.
#[derive(Debug, Clone, Default)]
pub(crate) struct Index {
    map: OrdMap<Bytes, Entry>,
    /// The keys attached to each lease (never lease 0), kept with `map` so a lease's
    /// revoke or TimeToLive reads its own keys instead of every key.
    leased: HashMap<i64, OrdSet<Bytes>>,
}

impl Index {
    /// The keys at the newest revision of `conn`'s history (see `each_current`).
    pub(crate) fn load(conn: &Connection) -> rusqlite::Result<Index> {
        let mut index = Index::default();
        each_current(
            conn,
            "rev, sub, create_rev, value, lease",
            |key, version, row| {
                let entry = Entry {
                    mod_rev: row.get(2)?,
                    mod_sub: row.get(3)?,
                    create_rev: row.get(4)?,
                    version,
                    value: Bytes::copy_from_slice(row.get_ref(5)?.as_blob()?),
                    lease: row.get(6)?,
                };
                index.insert_key(key.clone(), entry);
                Ok(())
            },
        )?;
        Ok(index)
    }

    /// How many keys `load` would find, without reading their values.
    pub(crate) fn count_stored(conn: &Connection) -> rusqlite::Result<i64> {
        let mut keys = 0;
        each_current(conn, "", |_, _, _| {
            keys += 1;
            Ok(())
        })?;
        Ok(keys)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.map.get(key)
    }

    pub(crate) fn insert(&mut self, key: &[u8], entry: Entry) {
        self.insert_key(Bytes::copy_from_slice(key), entry);
    }

    fn insert_key(&mut self, key: Bytes, entry: Entry) {
        let lease = entry.lease;
        let old = self
            .map
            .insert(key.clone(), entry)
            .map_or(0, |old| old.lease);
        if old != lease {
            self.detach(old, &key);
            if lease != 0 {
                self.leased.entry(lease).or_default().insert(key);
            }
        }
    }

    pub(crate) fn remove(&mut self, key: &[u8]) {
        if let Some(old) = self.map.remove(key) {
            self.detach(old.lease, key);
        }
    }

    fn detach(&mut self, lease: i64, key: &[u8]) {
        if lease == 0 {
            return;
        }
        if let Some(keys) = self.leased.get_mut(&lease) {
            keys.remove(key);
            if keys.is_empty() {
                self.leased.remove(&lease);
            }
        }
    }

    /// The entries of `range`, in key order.
    pub(crate) fn range<'a>(
        &'a self,
        range: &'a KeyRange,
    ) -> Box<dyn Iterator<Item = (&'a Bytes, &'a Entry)> + 'a> {
        let bounds: (Bound<&[u8]>, Bound<&[u8]>) = match range {
            KeyRange::Single(key) => {
                return Box::new(self.map.get_key_value(key.as_slice()).into_iter());
            }
            KeyRange::From(start) => (Bound::Included(start), Bound::Unbounded),
            // An end at or before the start selects nothing (and would make the map's
            // range panic).
            KeyRange::Between(start, end) if end <= start => {
                return Box::new(std::iter::empty());
            }
            KeyRange::Between(start, end) => (Bound::Included(start), Bound::Excluded(end)),
        };
        Box::new(self.map.range::<_, [u8]>(bounds))
    }

    /// The keys of `range` as etcd returns them, at most `limit` (< 0: all).
    #[cfg(test)]
    pub(crate) fn select(&self, range: &KeyRange, limit: i64) -> Vec<KeyValue> {
        let take = usize::try_from(limit).unwrap_or(usize::MAX);
        self.range(range)
            .take(take)
            .map(|(key, entry)| entry.kv(key))
            .collect()
    }

    pub(crate) fn count(&self, range: &KeyRange) -> i64 {
        self.range(range).count() as i64
    }

    /// The entries attached to `lease`, in key order.
    pub(crate) fn with_lease(&self, lease: i64) -> impl Iterator<Item = (&Bytes, &Entry)> {
        self.leased
            .get(&lease)
            .into_iter()
            .flat_map(|keys| keys.iter())
            .filter_map(|key| self.map.get_key_value(key))
    }
}

/// Calls `f` with every current key of `conn`'s history: each key's newest row, read
/// newest first, unless it is a tombstone. The row holds `key, version` and then the
/// `extra` columns (from index 2). Compaction keeps each key's newest row at or below
/// the compacted revision unless it is a tombstone, so what it removed never changes
/// the outcome.
fn each_current(
    conn: &Connection,
    extra: &str,
    mut f: impl FnMut(&Bytes, i64, &rusqlite::Row) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    let sep = if extra.is_empty() { "" } else { ", " };
    let mut stmt = conn.prepare(&format!(
        "SELECT key, version{sep}{extra} FROM kv ORDER BY rev DESC, sub DESC"
    ))?;
    // each key is copied once, shared by `seen` and what `f` keeps
    let mut seen: HashSet<Bytes> = HashSet::new();
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let key = row.get_ref(0)?.as_blob()?;
        if seen.contains(key) {
            continue;
        }
        let key = Bytes::copy_from_slice(key);
        seen.insert(key.clone());
        let version: i64 = row.get(1)?;
        if version != 0 {
            f(&key, version, row)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, rev: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            value: format!("v{rev}").into_bytes(),
            lease: 0,
        }
    }

    #[test]
    fn ranges_follow_etcds_key_conventions() {
        let mut index = Index::default();
        for (i, key) in ["a", "ab", "b", "c"].into_iter().enumerate() {
            index.insert(key.as_bytes(), Entry::of(&kv(key, i as i64 + 2), 0));
        }
        let keys = |range: KeyRange, limit| -> Vec<Vec<u8>> {
            index
                .select(&range, limit)
                .into_iter()
                .map(|kv| kv.key)
                .collect()
        };
        assert_eq!(keys(KeyRange::new(b"a", b""), -1), [b"a".to_vec()]);
        assert_eq!(
            keys(KeyRange::new(b"a", b"b"), -1),
            [b"a".to_vec(), b"ab".to_vec()]
        );
        assert_eq!(
            keys(KeyRange::new(b"ab", b"\0"), 2),
            [b"ab".to_vec(), b"b".to_vec()]
        );
        assert!(keys(KeyRange::new(b"c", b"a"), -1).is_empty());
        assert_eq!(index.count(&KeyRange::new(b"\0", b"\0")), 4);
        assert_eq!(index.select(&KeyRange::new(b"b", b""), -1)[0].value, b"v4");
    }

    fn leased(index: &Index, lease: i64) -> Vec<&[u8]> {
        index
            .with_lease(lease)
            .map(|(key, _)| key.as_ref())
            .collect()
    }

    #[test]
    fn each_lease_lists_exactly_its_keys_in_key_order() {
        let mut index = Index::default();
        let attached = |key: &str, rev, lease| {
            Entry::of(
                &KeyValue {
                    lease,
                    ..kv(key, rev)
                },
                0,
            )
        };
        for (key, lease) in [("c", 7), ("a", 7), ("b", 8), ("d", 0)] {
            index.insert(key.as_bytes(), attached(key, 2, lease));
        }
        assert_eq!(leased(&index, 7), [b"a".as_ref(), b"c"]);
        assert_eq!(leased(&index, 8), [b"b".as_ref()]);
        assert!(leased(&index, 0).is_empty());
        let before = index.clone();

        // a put moves its key to the lease it names (or to none), a delete detaches it
        index.insert(b"c", attached("c", 3, 8));
        index.insert(b"b", attached("b", 3, 0));
        index.insert(b"d", attached("d", 3, 7));
        index.remove(b"a");
        assert_eq!(leased(&index, 7), [b"d".as_ref()]);
        assert_eq!(leased(&index, 8), [b"c".as_ref()]);
        index.remove(b"c");
        assert!(leased(&index, 8).is_empty());
        assert!(!index.leased.contains_key(&8), "an empty set is dropped");

        // the clone taken before still has its own lists
        assert_eq!(leased(&before, 7), [b"a".as_ref(), b"c"]);
        assert_eq!(leased(&before, 8), [b"b".as_ref()]);
    }

    #[test]
    fn a_clone_does_not_see_later_changes() {
        let mut index = Index::default();
        index.insert(b"a", Entry::of(&kv("a", 2), 0));
        let before = index.clone();
        index.insert(b"a", Entry::of(&kv("a", 3), 0));
        index.insert(b"b", Entry::of(&kv("b", 3), 1));
        index.remove(b"a");
        assert_eq!(before.len(), 1);
        assert_eq!(before.get(b"a").map(|e| e.mod_rev), Some(2));
        assert_eq!(index.len(), 1);
        assert!(index.get(b"a").is_none());
    }
}
