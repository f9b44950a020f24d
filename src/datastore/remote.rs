//! `kdist datastore` operations through the etcd API of a live endpoint: a real etcd
//! (the `datastore: etcd` backend) or kdist's own datastore. Status and an online
//! snapshot (the Maintenance Snapshot stream, written atomically).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use super::error::DatastoreError;
use super::proto::etcdserverpb::{
    AlarmRequest, MemberListRequest, RangeRequest, SnapshotRequest, StatusRequest,
    cluster_client::ClusterClient, kv_client::KvClient, maintenance_client::MaintenanceClient,
};

/// One member as MemberList reports it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberInfo {
    /// Hex, as etcdctl prints it.
    pub id: String,
    pub name: String,
    pub client_urls: Vec<String>,
    pub peer_urls: Vec<String>,
    pub learner: bool,
}

/// What `kdist datastore status` shows for a datastore reached through the etcd API.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteStatus {
    pub backend: String,
    pub endpoint: String,
    pub version: String,
    pub size_bytes: i64,
    pub size_in_use_bytes: i64,
    pub revision: i64,
    /// The oldest revision still readable after a compaction; None when nothing was
    /// compacted. Found by reading at revisions (etcd's Status does not report it).
    pub compacted_revision: Option<i64>,
    pub keys: i64,
    /// Member id of the leader, hex.
    pub leader: String,
    pub raft_term: u64,
    pub raft_index: u64,
    pub members: Vec<MemberInfo>,
    /// Active alarms (e.g. NOSPACE) and errors the member reports.
    pub alarms: Vec<String>,
    /// A linearizable read succeeded and no alarm is raised.
    pub healthy: bool,
}

/// Maps a failed call `call` to `endpoint` into the error that names both.
pub(crate) fn rpc<'a>(
    endpoint: &'a str,
    call: &'static str,
) -> impl Fn(tonic::Status) -> DatastoreError + 'a {
    move |source| DatastoreError::Rpc {
        endpoint: endpoint.to_string(),
        call,
        source: Box::new(source),
    }
}

/// Status, key count, members, alarms and the compacted revision of `endpoint`.
pub async fn status(
    channel: Channel,
    endpoint: &str,
    backend: &str,
) -> Result<RemoteStatus, DatastoreError> {
    let mut maintenance = MaintenanceClient::new(channel.clone());
    let s = maintenance
        .status(StatusRequest {})
        .await
        .map_err(rpc(endpoint, "Status"))?
        .into_inner();
    let revision = s.header.as_ref().map_or(0, |h| h.revision);
    let mut kv = KvClient::new(channel.clone());
    // linearizable (serializable: false): this is also the health check etcdctl does
    let keys = kv
        .range(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            count_only: true,
            ..Default::default()
        })
        .await
        .map_err(rpc(endpoint, "Range"))?
        .into_inner()
        .count;
    let members = ClusterClient::new(channel)
        .member_list(MemberListRequest {
            linearizable: false,
        })
        .await
        .map_err(rpc(endpoint, "MemberList"))?
        .into_inner()
        .members
        .into_iter()
        .map(|m| MemberInfo {
            id: format!("{:x}", m.id),
            name: m.name,
            client_urls: m.client_ur_ls,
            peer_urls: m.peer_ur_ls,
            learner: m.is_learner,
        })
        .collect();
    let mut alarms: Vec<String> = maintenance
        .alarm(AlarmRequest::default())
        .await
        .map_err(rpc(endpoint, "Alarm"))?
        .into_inner()
        .alarms
        .into_iter()
        .filter(|a| a.alarm != 0)
        .map(|a| format!("{:?} on member {:x}", a.alarm(), a.member_id))
        .collect();
    alarms.extend(s.errors.iter().cloned());
    let compacted_revision = compacted_revision(&mut kv, endpoint, revision).await?;
    Ok(RemoteStatus {
        backend: backend.to_string(),
        endpoint: endpoint.to_string(),
        version: s.version,
        size_bytes: s.db_size,
        size_in_use_bytes: s.db_size_in_use,
        revision,
        compacted_revision,
        keys,
        leader: format!("{:x}", s.leader),
        raft_term: s.raft_term,
        raft_index: s.raft_index,
        members,
        healthy: alarms.is_empty(),
        alarms,
    })
}

/// The smallest readable revision, when it is above 1: etcd refuses reads below the
/// compaction point with OutOfRange and serves them from it on, so a binary search
/// over `[1, current]` finds it in about 40 reads at most.
async fn compacted_revision(
    kv: &mut KvClient<Channel>,
    endpoint: &str,
    current: i64,
) -> Result<Option<i64>, DatastoreError> {
    let (mut low, mut high) = (1, current.max(1));
    if readable(kv, endpoint, low).await? {
        return Ok(None);
    }
    // invariant: `low` unreadable, `high` readable
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if readable(kv, endpoint, mid).await? {
            high = mid;
        } else {
            low = mid;
        }
    }
    Ok(Some(high))
}

async fn readable(
    kv: &mut KvClient<Channel>,
    endpoint: &str,
    revision: i64,
) -> Result<bool, DatastoreError> {
    let read = kv
        .range(RangeRequest {
            key: vec![0],
            revision,
            count_only: true,
            serializable: true,
            ..Default::default()
        })
        .await;
    match read {
        Ok(_) => Ok(true),
        Err(status) if status.code() == tonic::Code::OutOfRange => Ok(false),
        Err(status) => Err(rpc(endpoint, "Range")(status)),
    }
}

/// Streams a snapshot of `endpoint` into `file` (mode 0600): written beside it, its
/// SHA-256 trailer checked, synced, then renamed over it. Returns its size in bytes.
pub async fn save_snapshot(
    channel: Channel,
    endpoint: &str,
    file: &Path,
) -> Result<u64, DatastoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DatastoreError::Io { path, source }
    };
    let tmp = temp_beside(file);
    let result = async {
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let mut stream = MaintenanceClient::new(channel)
            .snapshot(SnapshotRequest {})
            .await
            .map_err(rpc(endpoint, "Snapshot"))?
            .into_inner();
        // the last 32 bytes are the SHA-256 of everything before them
        let mut hasher = Sha256::new();
        let mut tail: Vec<u8> = Vec::with_capacity(64);
        let mut total = 0u64;
        while let Some(chunk) = stream.message().await.map_err(rpc(endpoint, "Snapshot"))? {
            out.write_all(&chunk.blob).map_err(io(&tmp))?;
            total += chunk.blob.len() as u64;
            tail.extend_from_slice(&chunk.blob);
            if tail.len() > 32 {
                let cut = tail.len() - 32;
                hasher.update(&tail[..cut]);
                tail.drain(..cut);
            }
        }
        if tail.len() != 32 || hasher.finalize().as_slice() != tail.as_slice() {
            return Err(DatastoreError::Corrupt {
                path: file.to_path_buf(),
                reason: format!(
                    "the snapshot from {endpoint} ({total} bytes) does not end with the \
                     SHA-256 of its contents; try again"
                ),
            });
        }
        out.sync_all().map_err(io(&tmp))?;
        drop(out);
        std::fs::rename(&tmp, file).map_err(io(file))?;
        let dir = match file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        Ok(total)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into());
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}
