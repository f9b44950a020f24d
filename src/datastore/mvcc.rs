//! The MVCC model on SQLite: schema, reads at a revision, and the write applier that
//! turns etcd requests into rows and events. Pure functions over a `Connection`; the
//! writer thread and the read pool (store.rs) decide which connection runs them.
//!
//! Tables: `kv` holds every version and tombstone (version 0) ever written, keyed by
//! revision (main, sub) like etcd's own backend, until compaction removes what no
//! revision >= the compacted one can see; `lease` holds granted leases; `meta` the
//! compacted revision (and the current one where compaction removed the newest rows).
//! The newest version of every existing key is not stored: it is the in-memory
//! [`Index`], derived from `kv` (index.rs).
//!
//! History is keyed by revision so that a write appends to the end of `kv`: the rows of
//! one commit share its last pages, and that is all a put writes. Each row points at the
//! previous row of its key (`prev_rev`, `prev_sub`; 0 for none), and the index keeps
//! the position of each key's newest row (`mod_rev`, `mod_sub`): a read at an older
//! revision takes the keys the index shows unchanged since then and, for the keys
//! changed after it, follows the first later row back to the version of that time.

use std::collections::{HashMap, HashSet};

use rusqlite::{Connection, OptionalExtension, params};

use super::error::ApiError;
use super::index::{Entry, Index};
use super::proto::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse, compare,
    range_request, request_op, response_op,
};
use super::proto::mvccpb::{Event, KeyValue, event};
use bytes::Bytes;

pub(crate) const SCHEMA_VERSION: i64 = 3;

/// The history table (`kv` in schema 2) under `$name`.
macro_rules! history_table {
    ($name:literal) => {
        concat!(
            "CREATE TABLE ",
            $name,
            " (
    rev INTEGER NOT NULL,
    sub INTEGER NOT NULL,
    key BLOB NOT NULL,
    create_rev INTEGER NOT NULL,
    version INTEGER NOT NULL,
    value BLOB NOT NULL,
    lease INTEGER NOT NULL,
    prev_rev INTEGER NOT NULL,
    prev_sub INTEGER NOT NULL,
    PRIMARY KEY (rev, sub)
) WITHOUT ROWID;
"
        )
    };
}

pub(crate) const SCHEMA: &str = concat!(
    "
CREATE TABLE meta (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    schema INTEGER NOT NULL,
    cluster_id INTEGER NOT NULL,
    member_id INTEGER NOT NULL,
    rev INTEGER NOT NULL,
    compact_rev INTEGER NOT NULL,
    compact_done INTEGER NOT NULL
);
",
    history_table!("kv"),
    "CREATE TABLE lease (
    id INTEGER PRIMARY KEY,
    ttl INTEGER NOT NULL
);
"
);

/// Turns a schema 1 store (history keyed by key) into schema 2, in the caller's
/// transaction. Rows left by a schema 1 compaction are each key's newest version at the
/// compacted revision and everything after it, so the previous remaining row of a key is
/// its real predecessor (or none, where compaction removed a tombstone). It leaves
/// `live` as schema 1 had it: `UPGRADE_FROM_2` always follows in the same transaction
/// and drops it.
pub(crate) const UPGRADE_FROM_1: &str = concat!(
    history_table!("kv2"),
    "INSERT INTO kv2 (rev, sub, key, create_rev, version, value, lease, prev_rev, prev_sub)
    SELECT rev, sub, key, create_rev, version, value, lease,
        coalesce(lag(rev) OVER w, 0), coalesce(lag(sub) OVER w, 0)
    FROM kv WINDOW w AS (PARTITION BY key ORDER BY rev, sub);
DROP TABLE kv;
ALTER TABLE kv2 RENAME TO kv;
UPDATE meta SET schema = 2 WHERE id = 0;
"
);

/// Turns a schema 2 store into schema 3: the `live` table (the newest version of every
/// key, now kept in memory) goes.
pub(crate) const UPGRADE_FROM_2: &str = "DROP TABLE live;
UPDATE meta SET schema = 3 WHERE id = 0;
";

/// etcd's request size limit (`--max-request-bytes` default).
pub(crate) const MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// etcd's limit of operations in one txn (`--max-txn-ops` default).
pub(crate) const MAX_TXN_OPS: usize = 128;

/// A header carrying only the revision; the service fills the member fields of the
/// top-level one, as etcd does (nested txn responses keep zero ids).
pub(crate) fn rev_header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// The keys a request names: one key, `[start, end)`, or everything from `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyRange {
    Single(Vec<u8>),
    From(Vec<u8>),
    Between(Vec<u8>, Vec<u8>),
}

impl KeyRange {
    /// etcd's convention: empty `range_end` is one key, `"\0"` means every key >= `key`.
    pub(crate) fn new(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => KeyRange::Single(key.to_vec()),
            [0] => KeyRange::From(key.to_vec()),
            end => KeyRange::Between(key.to_vec(), end.to_vec()),
        }
    }

    pub(crate) fn contains(&self, key: &[u8]) -> bool {
        match self {
            KeyRange::Single(k) => key == k.as_slice(),
            KeyRange::From(start) => key >= start.as_slice(),
            KeyRange::Between(start, end) => key >= start.as_slice() && key < end.as_slice(),
        }
    }
}

fn row_kv(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: row.get(0)?,
        create_revision: row.get(1)?,
        mod_revision: row.get(2)?,
        version: row.get(3)?,
        value: row.get(4)?,
        lease: row.get(5)?,
    })
}

/// The committed revision, as SQL over `meta` (one row). Commits do not write `meta`
/// (one page less per commit): every new revision has its rows at the end of `kv`, so
/// the revision is the newest there, or `meta.rev` where compaction removed the newest
/// rows (tombstones) and so records the revision itself.
macro_rules! rev_sql {
    () => {
        "max(rev, coalesce((SELECT max(rev) FROM kv), 0))"
    };
}
pub(crate) use rev_sql;

/// The compacted revision as committed (read inside the caller's transaction).
pub(crate) fn read_compact_rev(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT compact_rev FROM meta WHERE id = 0")?
        .query_row([], |row| row.get(0))
}

/// Current and compacted revision as committed (read inside the caller's transaction).
pub(crate) fn read_meta(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    const SQL: &str = concat!(
        "SELECT ",
        rev_sql!(),
        ", compact_rev FROM meta WHERE id = 0"
    );
    conn.prepare_cached(SQL)?
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))
}

/// What a read sees: the store at revision `rev`, whose keys `index` holds. `conn`'s
/// snapshot may hold later history rows (a batch committed and not yet synced, see
/// store.rs `syncer`); reads ignore those.
pub(crate) struct View<'a> {
    pub conn: &'a Connection,
    pub index: &'a Index,
    pub rev: i64,
    pub compact_rev: i64,
}

/// Keys of a range as they were at `at` <= `view.rev` (newest version <= at that is not
/// a tombstone), in key order, the first `fetch` of them read whole, and how many there
/// are: the keys the index shows unchanged since `at` and, for each key changed after
/// it, the row its first later change points back to. The cost grows with the changes
/// since `at`, not with the history kept; values are read only for the keys returned, so
/// a page of a paginated list at an old revision copies a page, not the rest of the range.
fn select_at(
    view: &View<'_>,
    range: &KeyRange,
    at: i64,
    fetch: usize,
) -> rusqlite::Result<(Vec<KeyValue>, i64)> {
    /// Where a key's version at `at` is: the index, or a history row.
    enum At<'a> {
        Index(&'a crate::datastore::index::Entry),
        Row(i64, i64),
    }
    let mut found: Vec<(Vec<u8>, At<'_>)> = Vec::new();
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    {
        let mut changes = view.conn.prepare_cached(
            "SELECT key, prev_rev, prev_sub FROM kv WHERE rev > ?1 AND rev <= ?2 ORDER BY rev, sub",
        )?;
        let mut live = view
            .conn
            .prepare_cached("SELECT version FROM kv WHERE rev = ?1 AND sub = ?2")?;
        let mut rows = changes.query(params![at, view.rev])?;
        while let Some(row) = rows.next()? {
            let key = row.get_ref(0)?.as_blob()?;
            if !range.contains(key) || seen.contains(key) {
                continue;
            }
            seen.insert(key.to_vec());
            let (prev_rev, prev_sub): (i64, i64) = (row.get(1)?, row.get(2)?);
            // the key existed at `at` when the row it points back to is not a tombstone
            let existed = prev_rev != 0
                && live
                    .query_row(params![prev_rev, prev_sub], |r| r.get::<_, i64>(0))
                    .optional()?
                    .is_some_and(|version| version > 0);
            if existed {
                found.push((key.to_vec(), At::Row(prev_rev, prev_sub)));
            }
        }
    }
    found.extend(
        view.index
            .range(range)
            .filter(|(_, entry)| entry.mod_rev <= at)
            .map(|(key, entry)| (key.to_vec(), At::Index(entry))),
    );
    found.sort_by(|a, b| a.0.cmp(&b.0));
    let count = found.len() as i64;
    let mut out = Vec::with_capacity(fetch.min(found.len()));
    for (key, at) in found.into_iter().take(fetch) {
        match at {
            At::Index(entry) => out.push(entry.kv(&key)),
            At::Row(rev, sub) => {
                if let Some(kv) = history_row(view.conn, rev, sub)? {
                    out.push(kv);
                }
            }
        }
    }
    Ok((out, count))
}

/// The version stored at (`rev`, `sub`), if that row exists and is not a tombstone.
pub(crate) fn history_row(
    conn: &Connection,
    rev: i64,
    sub: i64,
) -> rusqlite::Result<Option<KeyValue>> {
    if rev == 0 {
        return Ok(None);
    }
    let kv = conn
        .prepare_cached(
            "SELECT key, create_rev, rev, version, value, lease FROM kv \
             WHERE rev = ?1 AND sub = ?2",
        )?
        .query_row(params![rev, sub], row_kv)
        .optional()?;
    Ok(kv.filter(|kv| kv.version > 0))
}

/// The newest version of `key` strictly before `rev` (at which the key changed), if it
/// existed then: where the key's first change at `rev` points back to.
#[cfg(test)]
pub(crate) fn prev_version(
    conn: &Connection,
    key: &[u8],
    rev: i64,
) -> rusqlite::Result<Option<KeyValue>> {
    let prev: Option<(i64, i64)> = conn
        .prepare_cached(
            "SELECT prev_rev, prev_sub FROM kv WHERE rev = ?1 AND key = ?2 ORDER BY sub LIMIT 1",
        )?
        .query_row(params![rev, key], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    match prev {
        Some((prev_rev, prev_sub)) => history_row(conn, prev_rev, prev_sub),
        None => Ok(None),
    }
}

/// Range as etcd serves it: revision checks, limit/count/more, min/max filters, sort.
/// The header carries the view's revision, whatever revision was read.
pub(crate) fn range(view: &View<'_>, req: &RangeRequest) -> Result<RangeResponse, ApiError> {
    let (cur_rev, compact_rev) = (view.rev, view.compact_rev);
    if req.revision > cur_rev {
        return Err(ApiError::FutureRev);
    }
    let rev = if req.revision <= 0 {
        cur_rev
    } else {
        req.revision
    };
    let latest = rev == cur_rev;
    // The index holds the latest revision whole, whatever the snapshot's compaction
    // (which may already count a batch not yet published) has removed below it.
    if !latest && rev < compact_rev {
        return Err(ApiError::Compacted);
    }
    let range = KeyRange::new(&req.key, &req.range_end);
    let sort_order = range_request::SortOrder::try_from(req.sort_order)
        .map_err(|_| ApiError::InvalidSortOption)?;
    let sort_target = range_request::SortTarget::try_from(req.sort_target)
        .map_err(|_| ApiError::InvalidSortOption)?;
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    let needs_all = sort_order != range_request::SortOrder::None || filtered;
    // without an explicit order or filters only the first `limit` keys (and whether
    // there are more) matter, as etcd sorts by a non-key target only those
    let fetch = if !needs_all && req.limit > 0 {
        usize::try_from(req.limit.saturating_add(1)).unwrap_or(usize::MAX)
    } else {
        usize::MAX
    };

    if req.count_only {
        let count = if latest {
            view.index.count(&range)
        } else {
            select_at(view, &range, rev, 0)?.1
        };
        return Ok(RangeResponse {
            header: rev_header(cur_rev),
            kvs: Vec::new(),
            more: false,
            count,
        });
    }

    let (mut kvs, count) = if latest {
        let mut entries = view.index.range(&range);
        let kvs: Vec<KeyValue> = entries
            .by_ref()
            .take(fetch)
            .map(|(key, entry)| entry.kv(key))
            .collect();
        let count = (kvs.len() + entries.count()) as i64;
        (kvs, count)
    } else {
        select_at(view, &range, rev, fetch)?
    };

    if req.max_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision <= req.max_mod_revision);
    }
    if req.min_mod_revision != 0 {
        kvs.retain(|kv| kv.mod_revision >= req.min_mod_revision);
    }
    if req.max_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision <= req.max_create_revision);
    }
    if req.min_create_revision != 0 {
        kvs.retain(|kv| kv.create_revision >= req.min_create_revision);
    }

    let mut order = sort_order;
    if sort_target != range_request::SortTarget::Key && order == range_request::SortOrder::None {
        order = range_request::SortOrder::Ascend;
    }
    if order != range_request::SortOrder::None {
        use range_request::SortTarget as T;
        let cmp = |a: &KeyValue, b: &KeyValue| match sort_target {
            T::Key => a.key.cmp(&b.key),
            T::Version => a.version.cmp(&b.version),
            T::Create => a.create_revision.cmp(&b.create_revision),
            T::Mod => a.mod_revision.cmp(&b.mod_revision),
            T::Value => a.value.cmp(&b.value),
        };
        // Stable sorts keep equal elements in key order, as etcd's sort does for the
        // small result sets where the order of ties is observable.
        if order == range_request::SortOrder::Descend {
            kvs.sort_by(|a, b| cmp(b, a));
        } else {
            kvs.sort_by(cmp);
        }
    }

    let mut more = false;
    if req.limit > 0 && kvs.len() as i64 > req.limit {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse {
        header: rev_header(cur_rev),
        kvs,
        more,
        count,
    })
}

fn compare_entry(c: &Compare, kv: &Entry) -> bool {
    use compare::CompareTarget as T;
    use compare::TargetUnion as U;
    use std::cmp::Ordering;
    let target = T::try_from(c.target).unwrap_or(T::Version);
    let int = |pick: fn(&U) -> Option<i64>| c.target_union.as_ref().and_then(pick).unwrap_or(0);
    let ord: Ordering = match target {
        T::Value => {
            let want: &[u8] = match &c.target_union {
                Some(U::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_ref().cmp(want)
        }
        T::Create => kv.create_rev.cmp(&int(|u| match u {
            U::CreateRevision(v) => Some(*v),
            _ => None,
        })),
        T::Mod => kv.mod_rev.cmp(&int(|u| match u {
            U::ModRevision(v) => Some(*v),
            _ => None,
        })),
        T::Version => kv.version.cmp(&int(|u| match u {
            U::Version(v) => Some(*v),
            _ => None,
        })),
        T::Lease => kv.lease.cmp(&int(|u| match u {
            U::Lease(v) => Some(*v),
            _ => None,
        })),
    };
    match compare::CompareResult::try_from(c.result) {
        Ok(compare::CompareResult::Equal) => ord == Ordering::Equal,
        Ok(compare::CompareResult::NotEqual) => ord != Ordering::Equal,
        Ok(compare::CompareResult::Greater) => ord == Ordering::Greater,
        Ok(compare::CompareResult::Less) => ord == Ordering::Less,
        Err(_) => true,
    }
}

fn compare_holds(index: &Index, c: &Compare) -> bool {
    let range = KeyRange::new(&c.key, &c.range_end);
    let mut entries = index.range(&range).peekable();
    if entries.peek().is_none() {
        // A missing key has no value to compare: etcd fails every value compare on it.
        if c.target == compare::CompareTarget::Value as i32 {
            return false;
        }
        return compare_entry(c, &Entry::default());
    }
    entries.all(|(_, entry)| compare_entry(c, entry))
}

/// Evaluates the compares of a txn and of every nested txn on the chosen branches, all
/// against the state before the txn runs (etcd's `compareToPath`).
pub(crate) fn txn_path(index: &Index, txn: &TxnRequest, path: &mut Vec<bool>) {
    let ok = txn.compare.iter().all(|c| compare_holds(index, c));
    path.push(ok);
    let ops = if ok { &txn.success } else { &txn.failure };
    for op in ops {
        if let Some(request_op::Request::RequestTxn(inner)) = &op.request {
            txn_path(index, inner, path);
        }
    }
}

pub(crate) fn txn_is_read_only(txn: &TxnRequest) -> bool {
    txn.success
        .iter()
        .chain(txn.failure.iter())
        .all(|op| match &op.request {
            Some(request_op::Request::RequestPut(_))
            | Some(request_op::Request::RequestDeleteRange(_)) => false,
            Some(request_op::Request::RequestTxn(inner)) => txn_is_read_only(inner),
            _ => true,
        })
}

/// What a check pass looks at (etcd checks puts on the whole path first, then ranges).
#[derive(Clone, Copy, PartialEq, Eq)]
enum CheckPass {
    Puts,
    Ranges,
}

fn check_path(
    index: &Index,
    txn: &TxnRequest,
    path: &[bool],
    idx: &mut usize,
    pass: CheckPass,
    revs: (i64, i64),
    lease_exists: &dyn Fn(i64) -> bool,
) -> Result<(), ApiError> {
    let ok = path.get(*idx).copied().unwrap_or(false);
    *idx += 1;
    let ops = if ok { &txn.success } else { &txn.failure };
    for op in ops {
        match &op.request {
            Some(request_op::Request::RequestPut(put)) if pass == CheckPass::Puts => {
                if (put.ignore_value || put.ignore_lease) && index.get(&put.key).is_none() {
                    return Err(ApiError::KeyNotFound);
                }
                if put.lease != 0 && !lease_exists(put.lease) {
                    return Err(ApiError::LeaseNotFound);
                }
            }
            Some(request_op::Request::RequestRange(r)) if pass == CheckPass::Ranges => {
                let (cur, compacted) = revs;
                if r.revision > cur {
                    return Err(ApiError::FutureRev);
                }
                // etcd checks every nonzero revision against the first one it keeps
                // (-1 before any compaction), negative ones too.
                if r.revision != 0 && r.revision < compacted {
                    return Err(ApiError::Compacted);
                }
            }
            Some(request_op::Request::RequestTxn(inner)) => {
                check_path(index, inner, path, idx, pass, revs, lease_exists)?
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks the ops on the chosen path before anything is applied, so a txn either
/// applies whole or fails with etcd's error and changes nothing.
pub(crate) fn check_txn(
    index: &Index,
    txn: &TxnRequest,
    path: &[bool],
    revs: (i64, i64),
    write: bool,
    lease_exists: &dyn Fn(i64) -> bool,
) -> Result<(), ApiError> {
    if write {
        check_path(
            index,
            txn,
            path,
            &mut 0,
            CheckPass::Puts,
            revs,
            lease_exists,
        )?;
    }
    check_path(
        index,
        txn,
        path,
        &mut 0,
        CheckPass::Ranges,
        revs,
        lease_exists,
    )
}

/// Applies writes at revision `base_rev + 1`: history rows on one connection inside the
/// caller's transaction, the newest versions to `index`; collects the events they
/// produce.
pub(crate) struct Applier<'a> {
    pub conn: &'a Connection,
    pub index: &'a mut Index,
    pub base_rev: i64,
    pub compact_rev: i64,
    pub sub: i64,
    pub events: Vec<Event>,
    pub leases: &'a HashMap<i64, i64>,
    /// State before this revision of each key it changed: watch events carry that as
    /// their previous value, as etcd reads it at `revision - 1`.
    before: HashMap<Vec<u8>, Option<KeyValue>>,
}

impl<'a> Applier<'a> {
    pub(crate) fn new(
        conn: &'a Connection,
        index: &'a mut Index,
        base_rev: i64,
        compact_rev: i64,
        leases: &'a HashMap<i64, i64>,
    ) -> Self {
        Self {
            conn,
            index,
            base_rev,
            compact_rev,
            sub: 0,
            events: Vec::new(),
            leases,
            before: HashMap::new(),
        }
    }

    fn state_before(&mut self, key: &[u8], current: &Option<KeyValue>) -> Option<KeyValue> {
        self.before
            .entry(key.to_vec())
            .or_insert_with(|| current.clone())
            .clone()
    }

    pub(crate) fn changed(&self) -> bool {
        !self.events.is_empty()
    }

    /// The revision a read inside this write sees: the new one once something changed.
    pub(crate) fn cur_rev(&self) -> i64 {
        self.base_rev + i64::from(self.changed())
    }

    /// The key's newest version with the `sub` of its row in `kv` (the position a new
    /// row of the key points back to).
    fn live(&self, key: &[u8]) -> Option<(KeyValue, i64)> {
        self.index
            .get(key)
            .map(|entry| (entry.kv(key), entry.mod_sub))
    }

    /// Existing keys, in key order, with the sub of each one's newest row.
    fn victims<'e>(entries: impl Iterator<Item = (&'e Bytes, &'e Entry)>) -> Vec<(KeyValue, i64)> {
        entries
            .map(|(key, entry)| (entry.kv(key), entry.mod_sub))
            .collect()
    }

    /// Appends a row to the history; `prev` is where the key's previous row is
    /// ((0, 0) for none). Returns the new row's sub.
    fn record(
        &mut self,
        kv: &KeyValue,
        tombstone: bool,
        prev: (i64, i64),
    ) -> rusqlite::Result<i64> {
        let sub = self.sub;
        self.sub += 1;
        self.conn
            .prepare_cached(
                "INSERT INTO kv (rev, sub, key, create_rev, version, value, lease, prev_rev, \
                 prev_sub) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                kv.mod_revision,
                sub,
                kv.key,
                if tombstone { 0 } else { kv.create_revision },
                if tombstone { 0 } else { kv.version },
                if tombstone { &[][..] } else { &kv.value[..] },
                if tombstone { 0 } else { kv.lease },
                prev.0,
                prev.1,
            ])?;
        Ok(sub)
    }

    pub(crate) fn put(&mut self, req: &PutRequest) -> Result<PutResponse, ApiError> {
        let (prev, prev_at) = match self.live(&req.key) {
            Some((kv, sub)) => {
                let at = (kv.mod_revision, sub);
                (Some(kv), at)
            }
            None => (None, (0, 0)),
        };
        if (req.ignore_value || req.ignore_lease) && prev.is_none() {
            return Err(ApiError::KeyNotFound);
        }
        let value = match (&prev, req.ignore_value) {
            (Some(p), true) => p.value.clone(),
            _ => req.value.clone(),
        };
        let lease = match (&prev, req.ignore_lease) {
            (Some(p), true) => p.lease,
            _ => req.lease,
        };
        if lease != 0 && !self.leases.contains_key(&lease) {
            return Err(ApiError::LeaseNotFound);
        }
        let rev = self.base_rev + 1;
        let kv = KeyValue {
            key: req.key.clone(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            value,
            lease,
        };
        let sub = self.record(&kv, false, prev_at)?;
        self.index.insert(&kv.key, Entry::of(&kv, sub));
        let before = self.state_before(&req.key, &prev);
        self.events.push(Event {
            r#type: event::EventType::Put as i32,
            prev_kv: if kv.version == 1 { None } else { before },
            kv: Some(kv),
        });
        Ok(PutResponse {
            header: rev_header(rev),
            prev_kv: if req.prev_kv { prev } else { None },
        })
    }

    pub(crate) fn delete_range(
        &mut self,
        req: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, ApiError> {
        let range = KeyRange::new(&req.key, &req.range_end);
        let victims = Self::victims(self.index.range(&range));
        let rev = self.base_rev + 1;
        let deleted = victims.len() as i64;
        let mut prev_kvs = Vec::new();
        for (prev, sub) in victims {
            if req.prev_kv {
                prev_kvs.push(prev.clone());
            }
            self.delete_key(prev, sub, rev)?;
        }
        Ok(DeleteRangeResponse {
            header: rev_header(self.cur_rev()),
            deleted,
            prev_kvs,
        })
    }

    fn delete_key(&mut self, prev: KeyValue, prev_sub: i64, rev: i64) -> rusqlite::Result<()> {
        self.index.remove(&prev.key);
        let tomb = KeyValue {
            key: prev.key.clone(),
            mod_revision: rev,
            ..Default::default()
        };
        self.record(&tomb, true, (prev.mod_revision, prev_sub))?;
        let before = self.state_before(&prev.key, &Some(prev.clone()));
        self.events.push(Event {
            r#type: event::EventType::Delete as i32,
            kv: Some(tomb),
            prev_kv: before,
        });
        Ok(())
    }

    /// Deletes every key attached to `lease`, in key order (as etcd's revoke does).
    pub(crate) fn delete_lease_keys(&mut self, lease: i64) -> rusqlite::Result<()> {
        let victims = Self::victims(self.index.with_lease(lease));
        let rev = self.base_rev + 1;
        for (prev, sub) in victims {
            self.delete_key(prev, sub, rev)?;
        }
        Ok(())
    }

    pub(crate) fn range(&self, req: &RangeRequest) -> Result<RangeResponse, ApiError> {
        // the writer's transaction (or a read-only txn's snapshot) holds `cur_rev`
        let view = View {
            conn: self.conn,
            index: self.index,
            rev: self.cur_rev(),
            compact_rev: self.compact_rev,
        };
        range(&view, req)
    }

    /// Runs the ops of the branches `path` chose (see `txn_path`).
    pub(crate) fn txn(
        &mut self,
        txn: &TxnRequest,
        path: &[bool],
        idx: &mut usize,
    ) -> Result<TxnResponse, ApiError> {
        let ok = path.get(*idx).copied().unwrap_or(false);
        *idx += 1;
        let ops: &[RequestOp] = if ok { &txn.success } else { &txn.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            let response = match &op.request {
                Some(request_op::Request::RequestRange(r)) => {
                    Some(response_op::Response::ResponseRange(self.range(r)?))
                }
                Some(request_op::Request::RequestPut(p)) => {
                    Some(response_op::Response::ResponsePut(self.put(p)?))
                }
                Some(request_op::Request::RequestDeleteRange(d)) => Some(
                    response_op::Response::ResponseDeleteRange(self.delete_range(d)?),
                ),
                Some(request_op::Request::RequestTxn(inner)) => Some(
                    response_op::Response::ResponseTxn(self.txn(inner, path, idx)?),
                ),
                None => None,
            };
            responses.push(ResponseOp { response });
        }
        Ok(TxnResponse {
            header: Some(ResponseHeader::default()),
            succeeded: ok,
            responses,
        })
    }
}

/// The request checks etcd does before a request reaches the store (v3rpc/key.go).
pub(crate) mod check {
    use super::*;

    pub(crate) fn range(r: &RangeRequest) -> Result<(), ApiError> {
        if r.key.is_empty() {
            return Err(ApiError::EmptyKey);
        }
        if range_request::SortOrder::try_from(r.sort_order).is_err()
            || range_request::SortTarget::try_from(r.sort_target).is_err()
        {
            return Err(ApiError::InvalidSortOption);
        }
        Ok(())
    }

    pub(crate) fn put(r: &PutRequest) -> Result<(), ApiError> {
        if r.key.is_empty() {
            return Err(ApiError::EmptyKey);
        }
        if r.ignore_value && !r.value.is_empty() {
            return Err(ApiError::ValueProvided);
        }
        if r.ignore_lease && r.lease != 0 {
            return Err(ApiError::LeaseProvided);
        }
        Ok(())
    }

    pub(crate) fn delete(r: &DeleteRangeRequest) -> Result<(), ApiError> {
        if r.key.is_empty() {
            return Err(ApiError::EmptyKey);
        }
        Ok(())
    }

    pub(crate) fn txn(r: &TxnRequest, max_ops: usize) -> Result<(), ApiError> {
        let opc = r.compare.len().max(r.success.len()).max(r.failure.len());
        if opc > max_ops {
            return Err(ApiError::TooManyOps);
        }
        if r.compare.iter().any(|c| c.key.is_empty()) {
            return Err(ApiError::EmptyKey);
        }
        for op in r.success.iter().chain(r.failure.iter()) {
            match &op.request {
                Some(request_op::Request::RequestRange(x)) => range(x)?,
                Some(request_op::Request::RequestPut(x)) => put(x)?,
                Some(request_op::Request::RequestDeleteRange(x)) => delete(x)?,
                Some(request_op::Request::RequestTxn(x)) => txn(x, max_ops - opc)?,
                None => {}
            }
        }
        Ok(())
    }

    /// A delete interval as etcd's interval tree sees it: a point or `[key, end)`.
    #[derive(Clone)]
    pub(crate) struct Span(Vec<u8>, Option<Vec<u8>>);

    impl Span {
        fn hits(&self, key: &[u8]) -> bool {
            match &self.1 {
                None => key == self.0.as_slice(),
                Some(end) => key >= self.0.as_slice() && key < end.as_slice(),
            }
        }
    }

    /// Rejects txns that put one key twice, or put a key a delete in the same txn covers
    /// (etcd's `checkIntervals`); puts in the two branches of a nested txn may repeat.
    pub(crate) fn intervals(
        reqs: &[RequestOp],
    ) -> Result<(std::collections::HashSet<Vec<u8>>, Vec<Span>), ApiError> {
        let mut dels: Vec<Span> = Vec::new();
        for op in reqs {
            if let Some(request_op::Request::RequestDeleteRange(d)) = &op.request {
                let end = (!d.range_end.is_empty()).then(|| d.range_end.clone());
                dels.push(Span(d.key.clone(), end));
            }
        }
        let mut puts = std::collections::HashSet::new();
        for op in reqs {
            let Some(request_op::Request::RequestTxn(t)) = &op.request else {
                continue;
            };
            let (puts_then, dels_then) = intervals(&t.success)?;
            let (puts_else, dels_else) = intervals(&t.failure)?;
            for k in &puts_then {
                if puts.contains(k) || dels.iter().any(|d| d.hits(k)) {
                    return Err(ApiError::DuplicateKey);
                }
                puts.insert(k.clone());
            }
            for k in &puts_else {
                if puts.contains(k) && !puts_then.contains(k) {
                    return Err(ApiError::DuplicateKey);
                }
                if dels.iter().any(|d| d.hits(k)) {
                    return Err(ApiError::DuplicateKey);
                }
                puts.insert(k.clone());
            }
            dels.extend(dels_then);
            dels.extend(dels_else);
        }
        for op in reqs {
            if let Some(request_op::Request::RequestPut(p)) = &op.request {
                if puts.contains(&p.key) || dels.iter().any(|d| d.hits(&p.key)) {
                    return Err(ApiError::DuplicateKey);
                }
                puts.insert(p.key.clone());
            }
        }
        Ok((puts, dels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn
    }

    fn put(key: &str, value: &str) -> PutRequest {
        PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }
    }

    #[test]
    fn key_range_conventions() {
        assert!(KeyRange::new(b"a", b"").contains(b"a"));
        assert!(!KeyRange::new(b"a", b"").contains(b"ab"));
        assert!(KeyRange::new(b"a", b"\0").contains(b"zzz"));
        assert!(KeyRange::new(b"a", b"b").contains(b"azz"));
        assert!(!KeyRange::new(b"a", b"b").contains(b"b"));
    }

    #[test]
    fn history_is_readable_at_every_revision() {
        let conn = db();
        let leases = HashMap::new();
        let mut index = Index::default();
        let mut rev = 1;
        for value in ["v1", "v2"] {
            let mut a = Applier::new(&conn, &mut index, rev, -1, &leases);
            a.put(&put("k", value)).unwrap();
            rev += 1;
        }
        let mut a = Applier::new(&conn, &mut index, rev, -1, &leases);
        a.delete_range(&DeleteRangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        })
        .unwrap();
        rev += 1;
        let view = View {
            conn: &conn,
            index: &index,
            rev,
            compact_rev: -1,
        };
        let at = |r: i64| {
            range(
                &view,
                &RangeRequest {
                    key: b"k".to_vec(),
                    revision: r,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        assert_eq!(at(2).kvs[0].value, b"v1");
        assert_eq!(at(3).kvs[0].value, b"v2");
        assert_eq!(at(3).kvs[0].version, 2);
        assert_eq!(at(3).kvs[0].create_revision, 2);
        assert!(at(4).kvs.is_empty());
        assert_eq!(at(4).header.unwrap().revision, 4);
    }

    #[test]
    fn a_page_at_an_old_revision_is_the_head_of_the_whole_range() {
        let conn = db();
        let leases = HashMap::new();
        let mut index = Index::default();
        let mut rev = 1;
        let apply = |index: &mut Index, rev: &mut i64, f: &dyn Fn(&mut Applier<'_>)| {
            let mut a = Applier::new(&conn, index, *rev, -1, &leases);
            f(&mut a);
            *rev += 1;
        };
        for i in 0..30 {
            apply(&mut index, &mut rev, &|a| {
                a.put(&put(&format!("k{i:02}"), &format!("old{i}")))
                    .unwrap();
            });
        }
        let at = rev;
        // after `at`: updates, deletes and new keys, inside and before the page
        for i in [0, 3, 4, 17] {
            apply(&mut index, &mut rev, &|a| {
                a.put(&put(&format!("k{i:02}"), "new")).unwrap();
            });
        }
        for i in [1, 20] {
            apply(&mut index, &mut rev, &|a| {
                a.delete_range(&DeleteRangeRequest {
                    key: format!("k{i:02}").into_bytes(),
                    ..Default::default()
                })
                .unwrap();
            });
        }
        apply(&mut index, &mut rev, &|a| {
            a.put(&put("k015", "born later")).unwrap();
        });
        let view = View {
            conn: &conn,
            index: &index,
            rev,
            compact_rev: -1,
        };
        let page = |limit: i64| {
            range(
                &view,
                &RangeRequest {
                    key: b"k".to_vec(),
                    range_end: b"l".to_vec(),
                    revision: at,
                    limit,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let all = page(0);
        assert_eq!(all.count, 30);
        assert!(all.kvs.iter().all(|kv| kv.value.starts_with(b"old")));
        for limit in [1, 5, 29] {
            let head = page(limit);
            assert_eq!(head.count, 30);
            assert!(head.more);
            assert_eq!(head.kvs, all.kvs[..limit as usize]);
        }
        let count = range(
            &view,
            &RangeRequest {
                key: b"k".to_vec(),
                range_end: b"l".to_vec(),
                revision: at,
                count_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(count.count, 30);
    }

    #[test]
    fn latest_reads_ignore_a_compaction_past_the_published_revision() {
        let conn = db();
        let mut index = Index::default();
        Applier::new(&conn, &mut index, 1, -1, &HashMap::new())
            .put(&put("k", "v"))
            .unwrap();
        // the read snapshot already counts a compaction to 5 that a batch not yet
        // published committed; the published revision is 2
        let view = View {
            conn: &conn,
            index: &index,
            rev: 2,
            compact_rev: 5,
        };
        let at = |revision: i64| {
            range(
                &view,
                &RangeRequest {
                    key: b"k".to_vec(),
                    revision,
                    ..Default::default()
                },
            )
        };
        for latest in [0, 2] {
            assert_eq!(at(latest).unwrap().kvs[0].value, b"v", "at {latest}");
        }
        assert!(matches!(at(1), Err(ApiError::Compacted)));
    }

    #[test]
    fn duplicate_puts_in_a_txn_are_rejected() {
        let op = |p: PutRequest| RequestOp {
            request: Some(request_op::Request::RequestPut(p)),
        };
        assert!(check::intervals(&[op(put("a", "1")), op(put("a", "2"))]).is_err());
        assert!(check::intervals(&[op(put("a", "1")), op(put("b", "2"))]).is_ok());
        let del = RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: b"a".to_vec(),
                    range_end: b"c".to_vec(),
                    ..Default::default()
                },
            )),
        };
        assert!(check::intervals(&[del, op(put("b", "1"))]).is_err());
    }
}
