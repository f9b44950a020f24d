//! The MVCC model on SQLite: schema, reads at a revision, and the write applier that
//! turns etcd requests into rows and events. Pure functions over a `Connection`; the
//! writer thread and the read pool (store.rs) decide which connection runs them.
//!
//! Tables: `live` holds the newest version of every existing key (fast reads at the
//! current revision); `kv` holds every version and tombstone (version 0) ever written,
//! keyed by revision (main, sub) like etcd's own backend, until compaction removes what
//! no revision >= the compacted one can see; `lease` holds granted leases; `meta` the
//! current and compacted revision.
//!
//! History is keyed by revision so that a write appends to the end of `kv` (the rows of
//! one commit share its last pages) instead of inserting into a page per key. Each row
//! points at the previous row of its key (`prev_rev`, `prev_sub`; 0 for none), and `live`
//! keeps the position of each key's newest row (`mod_rev`, `mod_sub`): a read at an
//! older revision takes the keys `live` shows unchanged since then and, for the keys
//! changed after it, follows the first later row back to the version of that time.

use std::collections::{HashMap, HashSet};

use rusqlite::{Connection, OptionalExtension, params};

use super::error::ApiError;
use super::proto::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse, compare,
    range_request, request_op, response_op,
};
use super::proto::mvccpb::{Event, KeyValue, event};

pub(crate) const SCHEMA_VERSION: i64 = 2;

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
CREATE TABLE live (
    key BLOB PRIMARY KEY,
    create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL,
    version INTEGER NOT NULL,
    value BLOB NOT NULL,
    lease INTEGER NOT NULL,
    mod_sub INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX live_lease ON live(lease) WHERE lease != 0;
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
/// its real predecessor (or none, where compaction removed a tombstone).
pub(crate) const UPGRADE_FROM_1: &str = concat!(
    history_table!("kv2"),
    "INSERT INTO kv2 (rev, sub, key, create_rev, version, value, lease, prev_rev, prev_sub)
    SELECT rev, sub, key, create_rev, version, value, lease,
        coalesce(lag(rev) OVER w, 0), coalesce(lag(sub) OVER w, 0)
    FROM kv WINDOW w AS (PARTITION BY key ORDER BY rev, sub);
ALTER TABLE live ADD COLUMN mod_sub INTEGER NOT NULL DEFAULT 0;
UPDATE live SET mod_sub = coalesce(
    (SELECT max(sub) FROM kv WHERE kv.key = live.key AND kv.rev = live.mod_rev), 0);
DROP TABLE kv;
ALTER TABLE kv2 RENAME TO kv;
UPDATE meta SET schema = 2 WHERE id = 0;
"
);

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

    /// Which of three SQL texts fits this shape. Each shape gets its own statement:
    /// one text for all of them (with `?2 IS NULL` for the unused bound) made SQLite
    /// re-plan the statement at every execution.
    fn pick(&self, sql: &[&'static str; 3]) -> &'static str {
        match self {
            KeyRange::Single(_) => sql[0],
            KeyRange::From(_) => sql[1],
            KeyRange::Between(..) => sql[2],
        }
    }

    /// Binds ?1 (and ?2 when the shape has an end) of a statement `pick` chose.
    fn bind(&self, stmt: &mut rusqlite::Statement<'_>) -> rusqlite::Result<()> {
        match self {
            KeyRange::Single(k) | KeyRange::From(k) => stmt.raw_bind_parameter(1, k),
            KeyRange::Between(s, e) => {
                stmt.raw_bind_parameter(1, s)?;
                stmt.raw_bind_parameter(2, e)
            }
        }
    }
}

/// The three shapes of a key condition, with `$tail` (which may use ?3) appended.
macro_rules! by_shape {
    ($head:literal, $tail:literal) => {
        [
            concat!($head, " key = ?1 ", $tail),
            concat!($head, " key >= ?1 ", $tail),
            concat!($head, " key >= ?1 AND key < ?2 ", $tail),
        ]
    };
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

/// Live keys of a range at the current revision, in key order; `limit` < 0 is no limit.
pub(crate) fn select_live(
    conn: &Connection,
    range: &KeyRange,
    limit: i64,
) -> rusqlite::Result<Vec<KeyValue>> {
    // No `LIMIT ?`: SQLite (3.54, bundled) plans with the bound limit's value and so
    // re-prepares such a statement at every execution. Rows come one step at a time,
    // so stopping early costs the same.
    const SQL: [&str; 3] = by_shape!(
        "SELECT key, create_rev, mod_rev, version, value, lease FROM live WHERE",
        "ORDER BY key"
    );
    let mut stmt = conn.prepare_cached(range.pick(&SQL))?;
    range.bind(&mut stmt)?;
    let mut rows = stmt.raw_query();
    let mut out = Vec::new();
    while limit < 0 || (out.len() as i64) < limit {
        match rows.next()? {
            Some(row) => out.push(row_kv(row)?),
            None => break,
        }
    }
    Ok(out)
}

fn count_live(conn: &Connection, range: &KeyRange) -> rusqlite::Result<i64> {
    const SQL: [&str; 3] = by_shape!("SELECT count(*) FROM live WHERE", "");
    let mut stmt = conn.prepare_cached(range.pick(&SQL))?;
    range.bind(&mut stmt)?;
    let mut rows = stmt.raw_query();
    match rows.next()? {
        Some(row) => row.get(0),
        None => Err(rusqlite::Error::QueryReturnedNoRows),
    }
}

/// Keys of a range as they were at `rev` (newest version <= rev that is not a tombstone),
/// in key order: the keys `live` shows unchanged since `rev`, and for each key changed
/// after it, the row its first later change points back to. The cost grows with the
/// changes since `rev`, not with the history kept.
fn select_at(conn: &Connection, range: &KeyRange, rev: i64) -> rusqlite::Result<Vec<KeyValue>> {
    let mut out: Vec<KeyValue> = select_live(conn, range, -1)?
        .into_iter()
        .filter(|kv| kv.mod_revision <= rev)
        .collect();
    let mut seen: HashSet<Vec<u8>> = HashSet::new();
    let mut changes = conn.prepare_cached(
        "SELECT key, prev_rev, prev_sub FROM kv WHERE rev > ?1 ORDER BY rev, sub",
    )?;
    let mut rows = changes.query(params![rev])?;
    while let Some(row) = rows.next()? {
        let key = row.get_ref(0)?.as_blob()?;
        if !range.contains(key) || seen.contains(key) {
            continue;
        }
        seen.insert(key.to_vec());
        let (prev_rev, prev_sub): (i64, i64) = (row.get(1)?, row.get(2)?);
        if let Some(kv) = history_row(conn, prev_rev, prev_sub)? {
            out.push(kv);
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// The version stored at (`rev`, `sub`), if that row exists and is not a tombstone.
fn history_row(conn: &Connection, rev: i64, sub: i64) -> rusqlite::Result<Option<KeyValue>> {
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
/// The header carries `cur_rev`, the store's revision, whatever revision was read.
/// `cur_rev` may be behind `snapshot_rev`, the revision the caller's snapshot holds (a
/// batch committed but not yet synced, see store.rs `syncer`): then `live` is ahead and
/// history answers.
pub(crate) fn range(
    conn: &Connection,
    cur_rev: i64,
    snapshot_rev: i64,
    compact_rev: i64,
    req: &RangeRequest,
) -> Result<RangeResponse, ApiError> {
    if req.revision > cur_rev {
        return Err(ApiError::FutureRev);
    }
    let rev = if req.revision <= 0 {
        cur_rev
    } else {
        req.revision
    };
    if rev < compact_rev {
        return Err(ApiError::Compacted);
    }
    let range = KeyRange::new(&req.key, &req.range_end);
    let latest = rev == cur_rev && snapshot_rev == cur_rev;
    let sort_order = range_request::SortOrder::try_from(req.sort_order)
        .map_err(|_| ApiError::InvalidSortOption)?;
    let sort_target = range_request::SortTarget::try_from(req.sort_target)
        .map_err(|_| ApiError::InvalidSortOption)?;
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    let needs_all = sort_order != range_request::SortOrder::None || filtered;

    if req.count_only {
        let count = if latest {
            count_live(conn, &range)?
        } else {
            select_at(conn, &range, rev)?.len() as i64
        };
        return Ok(RangeResponse {
            header: rev_header(cur_rev),
            kvs: Vec::new(),
            more: false,
            count,
        });
    }

    let (mut kvs, count) = if latest {
        let fetch = if !needs_all && req.limit > 0 {
            req.limit.saturating_add(1)
        } else {
            -1
        };
        let kvs = select_live(conn, &range, fetch)?;
        let count = if fetch > 0 && kvs.len() as i64 == fetch {
            count_live(conn, &range)?
        } else {
            kvs.len() as i64
        };
        (kvs, count)
    } else {
        let mut kvs = select_at(conn, &range, rev)?;
        let count = kvs.len() as i64;
        // as at the current revision: without an explicit order or filters, etcd sorts
        // (by a non-key target) only the first `limit` keys
        if !needs_all && req.limit > 0 {
            kvs.truncate(req.limit.saturating_add(1) as usize);
        }
        (kvs, count)
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

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
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
            kv.value.as_slice().cmp(want)
        }
        T::Create => kv.create_revision.cmp(&int(|u| match u {
            U::CreateRevision(v) => Some(*v),
            _ => None,
        })),
        T::Mod => kv.mod_revision.cmp(&int(|u| match u {
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

fn compare_holds(conn: &Connection, c: &Compare) -> rusqlite::Result<bool> {
    let kvs = select_live(conn, &KeyRange::new(&c.key, &c.range_end), -1)?;
    if kvs.is_empty() {
        // A missing key has no value to compare: etcd fails every value compare on it.
        if c.target == compare::CompareTarget::Value as i32 {
            return Ok(false);
        }
        return Ok(compare_kv(c, &KeyValue::default()));
    }
    Ok(kvs.iter().all(|kv| compare_kv(c, kv)))
}

/// Evaluates the compares of a txn and of every nested txn on the chosen branches, all
/// against the state before the txn runs (etcd's `compareToPath`).
pub(crate) fn txn_path(
    conn: &Connection,
    txn: &TxnRequest,
    path: &mut Vec<bool>,
) -> rusqlite::Result<()> {
    let mut ok = true;
    for c in &txn.compare {
        if !compare_holds(conn, c)? {
            ok = false;
            break;
        }
    }
    path.push(ok);
    let ops = if ok { &txn.success } else { &txn.failure };
    for op in ops {
        if let Some(request_op::Request::RequestTxn(inner)) = &op.request {
            txn_path(conn, inner, path)?;
        }
    }
    Ok(())
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
    conn: &Connection,
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
                if (put.ignore_value || put.ignore_lease)
                    && select_live(conn, &KeyRange::Single(put.key.clone()), 1)?.is_empty()
                {
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
                check_path(conn, inner, path, idx, pass, revs, lease_exists)?
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks the ops on the chosen path before anything is applied, so a txn either
/// applies whole or fails with etcd's error and changes nothing.
pub(crate) fn check_txn(
    conn: &Connection,
    txn: &TxnRequest,
    path: &[bool],
    revs: (i64, i64),
    write: bool,
    lease_exists: &dyn Fn(i64) -> bool,
) -> Result<(), ApiError> {
    if write {
        check_path(conn, txn, path, &mut 0, CheckPass::Puts, revs, lease_exists)?;
    }
    check_path(
        conn,
        txn,
        path,
        &mut 0,
        CheckPass::Ranges,
        revs,
        lease_exists,
    )
}

/// Applies writes at revision `base_rev + 1` on one connection inside the caller's
/// transaction, collecting the events they produce.
pub(crate) struct Applier<'a> {
    pub conn: &'a Connection,
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
        base_rev: i64,
        compact_rev: i64,
        leases: &'a HashMap<i64, i64>,
    ) -> Self {
        Self {
            conn,
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
    fn live(&self, key: &[u8]) -> rusqlite::Result<Option<(KeyValue, i64)>> {
        self.conn
            .prepare_cached(
                "SELECT key, create_rev, mod_rev, version, value, lease, mod_sub FROM live \
                 WHERE key = ?1",
            )?
            .query_row(params![key], |row| Ok((row_kv(row)?, row.get(6)?)))
            .optional()
    }

    /// Live keys `sql` (which selects `live`'s columns and then `mod_sub`) picks, with
    /// the sub of each one's newest row.
    fn victims(
        &self,
        sql: &str,
        bind: impl FnOnce(&mut rusqlite::Statement<'_>) -> rusqlite::Result<()>,
    ) -> rusqlite::Result<Vec<(KeyValue, i64)>> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        bind(&mut stmt)?;
        let mut rows = stmt.raw_query();
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push((row_kv(row)?, row.get(6)?));
        }
        Ok(out)
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
        let (prev, prev_at) = match self.live(&req.key)? {
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
        self.conn
            .prepare_cached(
                // An upsert updates the row in place; INSERT OR REPLACE deletes and
                // inserts it again.
                "INSERT INTO live (key, create_rev, mod_rev, version, value, lease, mod_sub) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (key) DO UPDATE SET \
                 create_rev = excluded.create_rev, mod_rev = excluded.mod_rev, \
                 version = excluded.version, value = excluded.value, lease = excluded.lease, \
                 mod_sub = excluded.mod_sub",
            )?
            .execute(params![
                kv.key,
                kv.create_revision,
                kv.mod_revision,
                kv.version,
                kv.value,
                kv.lease,
                sub
            ])?;
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
        const SQL: [&str; 3] = by_shape!(
            "SELECT key, create_rev, mod_rev, version, value, lease, mod_sub FROM live WHERE",
            "ORDER BY key"
        );
        let range = KeyRange::new(&req.key, &req.range_end);
        let victims = self.victims(range.pick(&SQL), |stmt| range.bind(stmt))?;
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
        self.conn
            .prepare_cached("DELETE FROM live WHERE key = ?1")?
            .execute(params![prev.key])?;
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
        let victims = self.victims(
            "SELECT key, create_rev, mod_rev, version, value, lease, mod_sub FROM live \
             WHERE lease = ?1 ORDER BY key",
            |stmt| stmt.raw_bind_parameter(1, lease),
        )?;
        let rev = self.base_rev + 1;
        for (prev, sub) in victims {
            self.delete_key(prev, sub, rev)?;
        }
        Ok(())
    }

    pub(crate) fn range(&self, req: &RangeRequest) -> Result<RangeResponse, ApiError> {
        // the writer's transaction (or a read-only txn's snapshot) holds `cur_rev`
        range(
            self.conn,
            self.cur_rev(),
            self.cur_rev(),
            self.compact_rev,
            req,
        )
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
        let mut rev = 1;
        for value in ["v1", "v2"] {
            let mut a = Applier::new(&conn, rev, -1, &leases);
            a.put(&put("k", value)).unwrap();
            rev += 1;
        }
        let mut a = Applier::new(&conn, rev, -1, &leases);
        a.delete_range(&DeleteRangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        })
        .unwrap();
        rev += 1;
        let at = |r: i64| {
            range(
                &conn,
                rev,
                rev,
                -1,
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
