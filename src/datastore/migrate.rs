//! Moving every key between the embedded datastore and etcd (`kdist datastore migrate`):
//! a consistent read of the source at one revision, the copy, and the checks on both
//! sides. The supervisor decides when (writers stopped, target started); this module
//! owns the bytes and the datastore's files.
//!
//! Revisions. Kubernetes takes resourceVersions from `mod_revision`, so both directions
//! keep them:
//! - into the embedded datastore the rows are written directly: create/mod revision,
//!   version and lease of every key are the source's, the store's revision is the
//!   source's, and older revisions count as compacted (their history is not copied);
//! - into etcd, whose revisions only grow by one per write, keys are written in
//!   mod-revision order (keys of one source transaction in one transaction) and the gaps
//!   between them are filled with writes to a scratch key, deleted at the end, so each
//!   key lands on its source mod revision and the target ends at the source's revision
//!   (or one more). Create revision is then the mod revision and version is 1.
//!
//! Leases are granted again under the same ID with the TTL they had left; keys whose
//! lease expired while the source was read are not copied (the source deletes them too).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use rusqlite::{Connection, params};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use super::error::DatastoreError;
use super::proto::etcdserverpb::{
    DeleteRangeRequest, LeaseGrantRequest, LeaseLeasesRequest, LeaseTimeToLiveRequest,
    MemberListRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
    cluster_client::ClusterClient, kv_client::KvClient, lease_client::LeaseClient, request_op,
};
use super::proto::mvccpb::KeyValue;
use super::remote::rpc;
use super::tls::TlsFiles;
use crate::config::{DataDir, DatastoreKind};

/// Keys read per range request.
const PAGE: i64 = 500;
/// Responses may carry many large values (etcd allows 1.5 MiB each).
const MAX_MESSAGE: usize = 1 << 30;
/// Filler writes that advance an etcd target's revision; deleted at the end.
pub const PAD_KEY: &[u8] = b"/kdist/migrate/revision-pad";
/// Filler writes in flight at once.
const PAD_CONCURRENCY: usize = 64;
/// etcd's limits on one transaction: operations, and (with margin) request bytes.
const TXN_OPS: usize = 128;
const TXN_BYTES: usize = 1024 * 1024;

/// Where a datastore answers the etcd API.
#[derive(Debug, Clone)]
pub enum Side {
    /// The embedded datastore's unix socket.
    Unix(PathBuf),
    /// etcd on a TCP address with mutual TLS.
    Etcd { address: SocketAddr, tls: TlsFiles },
}

impl Side {
    /// Which datastore this is.
    pub fn kind(&self) -> DatastoreKind {
        match self {
            Side::Unix(_) => DatastoreKind::Embedded,
            Side::Etcd { .. } => DatastoreKind::Etcd,
        }
    }

    /// How this node's datastore of `kind` is reached.
    pub fn of(data: &DataDir, kind: DatastoreKind, client_port: u16) -> Self {
        match kind {
            DatastoreKind::Embedded => Side::Unix(data.datastore_socket()),
            DatastoreKind::Etcd => {
                let certs = data.certs_dir();
                Side::Etcd {
                    address: SocketAddr::from(([127, 0, 0, 1], client_port)),
                    tls: TlsFiles {
                        ca: certs.join("etcd/ca.crt"),
                        cert: certs.join("apiserver-etcd-client.crt"),
                        key: certs.join("apiserver-etcd-client.key"),
                    },
                }
            }
        }
    }

    pub fn name(&self) -> String {
        match self {
            Side::Unix(path) => format!("unix://{}", path.display()),
            Side::Etcd { address, .. } => format!("https://{address}"),
        }
    }

    /// Opens a gRPC channel.
    pub async fn connect(&self) -> Result<Channel, DatastoreError> {
        let tls = match self {
            Side::Unix(_) => None,
            Side::Etcd { tls, .. } => Some(tls),
        };
        super::client::connect_with(&self.name(), tls).await
    }
}

/// Every live key of a datastore at one revision, with the leases still alive.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub revision: i64,
    /// In key order.
    pub kvs: Vec<KeyValue>,
    /// Lease ID to the TTL it had left when read.
    pub leases: BTreeMap<i64, i64>,
    /// Keys left out because their lease had expired.
    pub expired: usize,
}

/// Key count and SHA-256 over the sorted keys with their values and leases, and with
/// `revisions` also create/mod revision and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checksum {
    pub keys: usize,
    pub sha256: String,
}

impl Snapshot {
    pub fn checksum(&self, revisions: bool) -> Checksum {
        let mut hash = Sha256::new();
        let mut sorted: Vec<&KeyValue> = self.kvs.iter().collect();
        sorted.sort_by(|a, b| a.key.cmp(&b.key));
        for kv in &sorted {
            hash.update((kv.key.len() as u64).to_be_bytes());
            hash.update(&kv.key);
            hash.update((kv.value.len() as u64).to_be_bytes());
            hash.update(&kv.value);
            hash.update(kv.lease.to_be_bytes());
            if revisions {
                hash.update(kv.create_revision.to_be_bytes());
                hash.update(kv.mod_revision.to_be_bytes());
                hash.update(kv.version.to_be_bytes());
            }
        }
        Checksum {
            keys: sorted.len(),
            sha256: hex::encode(hash.finalize()),
        }
    }
}

/// Number of members of the cluster behind `channel`.
pub async fn member_count(channel: &Channel, endpoint: &str) -> Result<usize, DatastoreError> {
    let members = ClusterClient::new(channel.clone())
        .member_list(MemberListRequest {
            linearizable: false,
        })
        .await
        .map_err(rpc(endpoint, "member list"))?
        .into_inner()
        .members;
    Ok(members.len())
}

/// Reads every key at the current revision (one consistent revision across pages) and
/// the remaining TTL of every lease.
pub async fn read(channel: &Channel, endpoint: &str) -> Result<Snapshot, DatastoreError> {
    let mut kv = KvClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE);
    let mut snap = Snapshot::default();
    let mut start = vec![0u8];
    loop {
        let response = kv
            .range(RangeRequest {
                key: start.clone(),
                range_end: vec![0],
                limit: PAGE,
                revision: snap.revision,
                ..Default::default()
            })
            .await
            .map_err(rpc(endpoint, "range"))?
            .into_inner();
        if snap.revision == 0 {
            snap.revision = response.header.map(|h| h.revision).unwrap_or_default();
        }
        let more = response.more;
        let Some(last) = response.kvs.last() else {
            break;
        };
        start = last.key.clone();
        start.push(0);
        snap.kvs.extend(response.kvs);
        if !more {
            break;
        }
    }
    let mut lease = LeaseClient::new(channel.clone());
    let ids = lease
        .lease_leases(LeaseLeasesRequest {})
        .await
        .map_err(rpc(endpoint, "lease list"))?
        .into_inner()
        .leases;
    for status in ids {
        let ttl = lease
            .lease_time_to_live(LeaseTimeToLiveRequest {
                id: status.id,
                keys: false,
            })
            .await
            .map_err(rpc(endpoint, "lease time-to-live"))?
            .into_inner()
            .ttl;
        if ttl > 0 {
            snap.leases.insert(status.id, ttl);
        }
    }
    let before = snap.kvs.len();
    let leases = snap.leases.clone();
    snap.kvs
        .retain(|kv| kv.lease == 0 || leases.contains_key(&kv.lease));
    snap.expired = before - snap.kvs.len();
    Ok(snap)
}

/// What a copy into etcd did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EtcdCopy {
    /// The target's revision afterwards.
    pub revision: i64,
    /// Filler writes that advanced the revision.
    pub pad_writes: i64,
}

/// Copies `snap` into an empty etcd behind `channel` (see the module comment).
pub async fn copy_to_etcd(
    channel: &Channel,
    endpoint: &str,
    snap: &Snapshot,
) -> Result<EtcdCopy, DatastoreError> {
    let kv = KvClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE);
    let existing = kv
        .clone()
        .range(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            count_only: true,
            ..Default::default()
        })
        .await
        .map_err(rpc(endpoint, "range"))?
        .into_inner();
    if existing.count > 0 {
        return Err(DatastoreError::TargetNotEmpty {
            target: endpoint.to_string(),
            reason: format!("it holds {} keys", existing.count),
        });
    }
    let mut current = existing.header.map(|h| h.revision).unwrap_or(1);
    let mut lease = LeaseClient::new(channel.clone());
    for (&id, &ttl) in &snap.leases {
        lease
            .lease_grant(LeaseGrantRequest { ttl, id })
            .await
            .map_err(rpc(endpoint, "lease grant"))?;
    }
    let mut order: Vec<&KeyValue> = snap.kvs.iter().collect();
    order.sort_by(|a, b| (a.mod_revision, &a.key).cmp(&(b.mod_revision, &b.key)));
    let mut copy = EtcdCopy::default();
    for group in order.chunk_by(|a, b| a.mod_revision == b.mod_revision) {
        let gap = group[0].mod_revision - current - 1;
        if gap > 0 {
            current = current.max(pad(&kv, endpoint, gap).await?);
            copy.pad_writes += gap;
        }
        for batch in batches(group) {
            let success = batch
                .iter()
                .map(|kv| RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: kv.key.clone(),
                        value: kv.value.clone(),
                        lease: kv.lease,
                        ..Default::default()
                    })),
                })
                .collect();
            let response = kv
                .clone()
                .txn(TxnRequest {
                    success,
                    ..Default::default()
                })
                .await
                .map_err(rpc(endpoint, "txn"))?
                .into_inner();
            current = current.max(response.header.map(|h| h.revision).unwrap_or(current));
        }
    }
    if current < snap.revision {
        let gap = snap.revision - current;
        current = current.max(pad(&kv, endpoint, gap).await?);
        copy.pad_writes += gap;
    }
    if copy.pad_writes > 0 {
        let response = kv
            .clone()
            .delete_range(DeleteRangeRequest {
                key: PAD_KEY.to_vec(),
                ..Default::default()
            })
            .await
            .map_err(rpc(endpoint, "delete"))?
            .into_inner();
        current = current.max(response.header.map(|h| h.revision).unwrap_or(current));
    }
    copy.revision = current;
    Ok(copy)
}

/// Puts of one source revision, split only where etcd's transaction limits demand.
fn batches<'a>(group: &[&'a KeyValue]) -> Vec<Vec<&'a KeyValue>> {
    let mut out: Vec<Vec<&KeyValue>> = Vec::new();
    let mut bytes = 0;
    for kv in group {
        let size = kv.key.len() + kv.value.len();
        match out.last_mut() {
            Some(last) if last.len() < TXN_OPS && bytes + size <= TXN_BYTES => {
                last.push(kv);
                bytes += size;
            }
            _ => {
                out.push(vec![kv]);
                bytes = size;
            }
        }
    }
    out
}

/// `n` filler writes, several in flight; returns the highest revision they reached.
async fn pad(kv: &KvClient<Channel>, endpoint: &str, n: i64) -> Result<i64, DatastoreError> {
    futures::stream::iter(0..n)
        .map(|_| {
            let mut kv = kv.clone();
            async move {
                kv.put(PutRequest {
                    key: PAD_KEY.to_vec(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().header.map(|h| h.revision).unwrap_or(0))
                .map_err(rpc(endpoint, "put"))
            }
        })
        .buffer_unordered(PAD_CONCURRENCY)
        .try_fold(0, |max, rev| async move { Ok(max.max(rev)) })
        .await
}

/// Writes `snap` as a new embedded datastore at `path`, keeping every key's revisions,
/// version and lease; the store's revision is the snapshot's and older revisions count
/// as compacted. Blocking. Refuses an existing non-empty file.
pub fn write_embedded(path: &Path, snap: &Snapshot) -> Result<(), DatastoreError> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
        return Err(DatastoreError::TargetNotEmpty {
            target: path.display().to_string(),
            reason: "the database file exists".into(),
        });
    }
    if let Some(dir) = path.parent() {
        crate::fsutil::ensure_dir(dir, 0o700).map_err(|source| DatastoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let tmp = super::ops::temp_beside(path);
    let _ = std::fs::remove_file(&tmp);
    let sqlite = |source| DatastoreError::Sqlite {
        path: tmp.clone(),
        source,
    };
    let result = (|| {
        let mut conn = Connection::open(&tmp).map_err(sqlite)?;
        let tx = conn.transaction().map_err(sqlite)?;
        tx.execute_batch(super::mvcc::SCHEMA).map_err(sqlite)?;
        tx.execute(
            "INSERT INTO meta (id, schema, cluster_id, member_id, rev, compact_rev, compact_done) \
             VALUES (0, ?1, ?2, ?3, ?4, ?4, ?4)",
            params![
                super::mvcc::SCHEMA_VERSION,
                (rand::random::<u64>() >> 1) as i64,
                (rand::random::<u64>() >> 1) as i64,
                snap.revision.max(1),
            ],
        )
        .map_err(sqlite)?;
        {
            let mut history = tx
                .prepare(
                    "INSERT INTO kv (key, rev, sub, create_rev, version, value, lease, \
                     prev_rev, prev_sub) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, 0)",
                )
                .map_err(sqlite)?;
            let mut lease = tx
                .prepare("INSERT INTO lease (id, ttl) VALUES (?1, ?2)")
                .map_err(sqlite)?;
            // keys written by one source transaction share a revision: number them
            let mut subs: BTreeMap<i64, i64> = BTreeMap::new();
            for kv in &snap.kvs {
                let sub = subs.entry(kv.mod_revision).or_insert(0);
                history
                    .execute(params![
                        kv.key,
                        kv.mod_revision,
                        *sub,
                        kv.create_revision,
                        kv.version,
                        kv.value,
                        kv.lease
                    ])
                    .map_err(sqlite)?;
                *sub += 1;
            }
            for (id, ttl) in &snap.leases {
                lease.execute(params![id, ttl]).map_err(sqlite)?;
            }
        }
        tx.commit().map_err(sqlite)?;
        drop(conn);
        super::ops::sync_and_rename(&tmp, path)?;
        super::store::verify(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Where a datastore of `kind` keeps its data in `data`.
pub fn location(data: &DataDir, kind: DatastoreKind) -> PathBuf {
    match kind {
        DatastoreKind::Embedded => super::db_path(data),
        DatastoreKind::Etcd => data.datastore_dir().join("etcd"),
    }
}

/// Refuses a target whose data location already holds something: a migration only
/// writes into a new, empty datastore.
pub fn check_target_free(data: &DataDir, kind: DatastoreKind) -> Result<(), DatastoreError> {
    let path = location(data, kind);
    let used = match kind {
        DatastoreKind::Embedded => std::fs::metadata(&path).is_ok_and(|m| m.len() > 0),
        DatastoreKind::Etcd => std::fs::read_dir(&path).is_ok_and(|mut d| d.next().is_some()),
    };
    if used {
        return Err(DatastoreError::TargetNotEmpty {
            target: path.display().to_string(),
            reason: "it already exists".into(),
        });
    }
    Ok(())
}

/// Removes what a failed migration created at the target's location (it was free before).
pub fn discard_target(data: &DataDir, kind: DatastoreKind) {
    let path = location(data, kind);
    match kind {
        DatastoreKind::Embedded => {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
        DatastoreKind::Etcd => {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Moves the data of the datastore the node left to
/// `<data>/datastore/migrated-<kind>-<unix time>/`, where it stays (nothing is deleted),
/// so that a later migration back finds its target empty. Returns the new place.
pub fn retire(data: &DataDir, kind: DatastoreKind) -> Result<PathBuf, DatastoreError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let name = kind.as_str();
    let dest = data
        .datastore_dir()
        .join(format!("migrated-{name}-{stamp}"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DatastoreError::Io { path, source }
    };
    crate::fsutil::ensure_dir(&dest, 0o700).map_err(io(&dest))?;
    let source = location(data, kind);
    match kind {
        DatastoreKind::Embedded => {
            for suffix in ["", "-wal", "-shm"] {
                let from = PathBuf::from(format!("{}{suffix}", source.display()));
                if from.exists() {
                    let to = dest.join(format!("state.db{suffix}"));
                    std::fs::rename(&from, &to).map_err(io(&from))?;
                }
            }
        }
        DatastoreKind::Etcd => {
            if source.exists() {
                std::fs::rename(&source, dest.join("etcd")).map_err(io(&source))?;
            }
        }
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &[u8], create: i64, modr: i64, version: i64, lease: i64) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            create_revision: create,
            mod_revision: modr,
            version,
            value: value.to_vec(),
            lease,
        }
    }

    #[test]
    fn checksum_sees_values_and_optionally_revisions() {
        let a = Snapshot {
            revision: 9,
            kvs: vec![kv("a", b"1", 2, 5, 3, 0), kv("b", b"\0\xff", 4, 4, 1, 7)],
            ..Default::default()
        };
        let mut b = a.clone();
        b.kvs.reverse();
        assert_eq!(a.checksum(true), b.checksum(true), "order does not matter");
        b.kvs[0].mod_revision = 8;
        assert_eq!(a.checksum(false), b.checksum(false));
        assert_ne!(a.checksum(true), b.checksum(true));
        b.kvs[0].value = b"\0\xfe".to_vec();
        assert_ne!(a.checksum(false), b.checksum(false));
        assert_eq!(a.checksum(false).keys, 2);
    }

    #[test]
    fn embedded_target_keeps_revisions_and_refuses_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut leases = BTreeMap::new();
        leases.insert(7, 30);
        let snap = Snapshot {
            revision: 12,
            kvs: vec![
                kv("a", b"1", 2, 5, 3, 0),
                kv("b", b"x", 5, 5, 1, 7),
                kv("c", b"y", 9, 10, 2, 0),
            ],
            leases,
            expired: 0,
        };
        write_embedded(&path, &snap).unwrap();
        let store = super::super::store::Store::open(&path).unwrap();
        assert_eq!(store.current_rev(), 12);
        assert_eq!(store.lease_get(7).map(|l| l.ttl), Some(30));
        let b = store.published().index.get(b"b").cloned().unwrap();
        assert_eq!((b.create_rev, b.mod_rev, b.version, b.lease), (5, 5, 1, 7));
        assert_eq!(&b.value[..], b"x");
        store.close();
        let err = write_embedded(&path, &snap).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
    }

    #[test]
    fn one_source_revision_is_split_only_at_etcd_limits() {
        let big = vec![0u8; 400 * 1024];
        let kvs: Vec<KeyValue> = (0..200)
            .map(|i| kv(&format!("k{i}"), b"v", 3, 3, 1, 0))
            .collect();
        let refs: Vec<&KeyValue> = kvs.iter().collect();
        let sizes: Vec<usize> = batches(&refs).iter().map(Vec::len).collect();
        assert_eq!(sizes, [128, 72]);
        let large: Vec<KeyValue> = (0..3)
            .map(|i| kv(&format!("b{i}"), &big, 3, 3, 1, 0))
            .collect();
        let refs: Vec<&KeyValue> = large.iter().collect();
        assert_eq!(batches(&refs).len(), 2);
    }
}
