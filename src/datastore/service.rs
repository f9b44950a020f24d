//! The gRPC services of the etcd v3 API over the store: KV, Watch, Lease, Cluster and
//! Maintenance. Validation happens here (etcd's v3rpc checks), reads go to the read
//! pool, writes to the writer thread; every top-level response gets a full header.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::error::ApiError;
use super::mvcc::{self, Applier, MAX_REQUEST_BYTES, MAX_TXN_OPS, check};
use super::proto::etcdserverpb::{
    AlarmRequest, AlarmResponse, CompactionRequest, CompactionResponse, DefragmentRequest,
    DefragmentResponse, DeleteRangeRequest, DeleteRangeResponse, HashKvRequest, HashKvResponse,
    HashRequest, HashResponse, LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest,
    LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest,
    LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, Member,
    MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse, PutRequest, PutResponse, RangeRequest,
    RangeResponse, ResponseHeader, SnapshotRequest, SnapshotResponse, StatusRequest,
    StatusResponse, TxnRequest, TxnResponse, WatchRequest, WatchResponse, cluster_server,
    kv_server, lease_server, maintenance_server, watch_server,
};
use super::store::{self, Store, WriteOp, WriteResult};
use super::watch;

/// The etcd version kdist reports. kube-apiserver enables watch progress requests
/// (consistent reads from its cache) from etcd 3.5.13 on.
pub const ETCD_VERSION: &str = "3.5.16";

/// How this member describes itself and how often it sends watch progress notifications.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Member name in MemberList.
    pub name: String,
    /// Client URLs in MemberList (the addresses kdist serves on).
    pub client_urls: Vec<String>,
    /// Interval of progress notifications to watches that asked for them (etcd: 10 min).
    pub progress_interval: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            name: "kdist".into(),
            client_urls: Vec::new(),
            progress_interval: Duration::from_secs(600),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Api {
    pub store: Arc<Store>,
    pub options: Arc<ServerOptions>,
    pub shutdown: CancellationToken,
}

impl Api {
    fn fill(&self, header: &mut Option<ResponseHeader>) {
        let revision = header.as_ref().map_or(0, |h| h.revision);
        *header = self.store.header(revision);
    }

    fn header_now(&self) -> Option<ResponseHeader> {
        self.store.header(self.store.current_rev())
    }

    async fn write(&self, op: WriteOp) -> Result<WriteResult, Status> {
        Ok(self.store.write(op).await?)
    }
}

fn unexpected() -> Status {
    Status::internal("etcdserver: unexpected result from the store")
}

fn too_large(req: &impl Message) -> Result<(), ApiError> {
    if req.encoded_len() > MAX_REQUEST_BYTES {
        return Err(ApiError::RequestTooLarge);
    }
    Ok(())
}

#[tonic::async_trait]
impl kv_server::Kv for Api {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let req = req.into_inner();
        check::range(&req)?;
        let mut resp = self.store.read(move |view| mvcc::range(view, &req)).await?;
        self.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = req.into_inner();
        check::put(&req)?;
        too_large(&req)?;
        match self.write(WriteOp::Put(req)).await? {
            WriteResult::Put(mut resp) => {
                self.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected()),
        }
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let req = req.into_inner();
        check::delete(&req)?;
        match self.write(WriteOp::Delete(req)).await? {
            WriteResult::Delete(mut resp) => {
                self.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected()),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let req = req.into_inner();
        check::txn(&req, MAX_TXN_OPS)?;
        check::intervals(&req.success)?;
        check::intervals(&req.failure)?;
        too_large(&req)?;
        let read_only = if mvcc::txn_is_read_only(&req) {
            let req = req.clone();
            self.store
                .read(move |view| {
                    let (rev, compact) = (view.rev, view.compact_rev);
                    let mut path = Vec::new();
                    mvcc::txn_path(view.index, &req, &mut path);
                    mvcc::check_txn(view.index, &req, &path, (rev, compact), false, &|_| false)?;
                    let no_leases = HashMap::new();
                    // a read-only txn changes nothing: the applier gets its own (O(1)) copy
                    let mut index = view.index.clone();
                    let mut applier = Applier::new(view.conn, &mut index, rev, compact, &no_leases);
                    let mut resp = applier.txn(&req, &path, &mut 0)?;
                    resp.header = mvcc::rev_header(rev);
                    Ok(Some(resp))
                })
                .await?
        } else {
            None
        };
        let mut resp = match read_only {
            Some(resp) => resp,
            None => match self.write(WriteOp::Txn(req)).await? {
                WriteResult::Txn(resp) => resp,
                _ => return Err(unexpected()),
            },
        };
        self.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let req = req.into_inner();
        let op = WriteOp::Compact {
            revision: req.revision,
            physical: req.physical,
        };
        match self.write(op).await? {
            WriteResult::Rev(_) => Ok(Response::new(CompactionResponse {
                header: self.header_now(),
            })),
            _ => Err(unexpected()),
        }
    }
}

type StreamOf<T> = ReceiverStream<Result<T, Status>>;

/// A watch stream's responses: the first one, already taken, then the rest.
type WatchResponses =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl watch_server::Watch for Api {
    type WatchStream = WatchResponses;

    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(256);
        let store = self.store.clone();
        let interval = self.options.progress_interval;
        let shutdown = self.shutdown.clone();
        let requests = req.into_inner();
        tokio::spawn(async move {
            tokio::select! {
                _ = watch::serve(store, requests, tx, interval) => {}
                _ = shutdown.cancelled() => {}
            }
        });
        // As etcd (grpc-go sends a stream's headers with its first message), the response
        // starts with the first message, normally the created response: clients whose
        // watch call waits for the headers (tonic, the etcd-client crate) then return only
        // once the watch exists, and a write they make next is delivered to it.
        let mut rx = ReceiverStream::new(rx);
        let first = rx.next().await;
        Ok(Response::new(Box::pin(tokio_stream::iter(first).chain(rx))))
    }
}

#[tonic::async_trait]
impl lease_server::Lease for Api {
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let req = req.into_inner();
        let op = WriteOp::LeaseGrant {
            id: req.id,
            ttl: req.ttl,
        };
        match self.write(op).await? {
            WriteResult::Grant { id, ttl, rev } => Ok(Response::new(LeaseGrantResponse {
                header: self.store.header(rev),
                id,
                ttl,
                error: String::new(),
            })),
            _ => Err(unexpected()),
        }
    }

    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let op = WriteOp::LeaseRevoke {
            id: req.into_inner().id,
            only_if_expired: false,
        };
        match self.write(op).await? {
            WriteResult::Rev(rev) => Ok(Response::new(LeaseRevokeResponse {
                header: self.store.header(rev),
            })),
            _ => Err(unexpected()),
        }
    }

    type LeaseKeepAliveStream = StreamOf<LeaseKeepAliveResponse>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        let mut requests = req.into_inner();
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = requests.next() => next,
                    _ = api.shutdown.cancelled() => return,
                };
                let Some(Ok(req)) = next else { return };
                // A lease that does not exist is answered with TTL 0, as etcd does.
                let ttl = api.store.lease_renew(req.id).unwrap_or(0);
                let resp = LeaseKeepAliveResponse {
                    header: api.header_now(),
                    id: req.id,
                    ttl,
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let req = req.into_inner();
        let Some(entry) = self.store.lease_get(req.id) else {
            return Ok(Response::new(LeaseTimeToLiveResponse {
                header: self.header_now(),
                id: req.id,
                ttl: -1,
                ..Default::default()
            }));
        };
        let remaining = entry.expiry.saturating_duration_since(Instant::now());
        let keys = if req.keys {
            let id = req.id;
            let published = self.store.published();
            let keys = published.index.with_lease(id);
            keys.map(|(key, _)| key.to_vec()).collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(LeaseTimeToLiveResponse {
            header: self.header_now(),
            id: req.id,
            ttl: remaining.as_secs() as i64,
            granted_ttl: entry.ttl,
            keys,
        }))
    }

    async fn lease_leases(
        &self,
        _req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let mut ids = self.store.lease_ids();
        ids.sort_unstable();
        Ok(Response::new(LeaseLeasesResponse {
            header: self.header_now(),
            leases: ids.into_iter().map(|id| LeaseStatus { id }).collect(),
        }))
    }
}

#[tonic::async_trait]
impl cluster_server::Cluster for Api {
    async fn member_list(
        &self,
        _req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        Ok(Response::new(MemberListResponse {
            header: self.header_now(),
            members: vec![Member {
                id: self.store.shared.member_id,
                name: self.options.name.clone(),
                peer_ur_ls: Vec::new(),
                client_ur_ls: self.options.client_urls.clone(),
                is_learner: false,
            }],
        }))
    }

    // one member that cannot change: what etcd answers for an API it does not serve
    async fn member_add(
        &self,
        _req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(single_member())
    }

    async fn member_remove(
        &self,
        _req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(single_member())
    }

    async fn member_update(
        &self,
        _req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(single_member())
    }

    async fn member_promote(
        &self,
        _req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(single_member())
    }
}

fn single_member() -> Status {
    Status::unimplemented(
        "kdist's embedded datastore is a single member; move to etcd with \
         `kdist datastore migrate --to etcd` to cluster",
    )
}

static SNAPSHOT_SEQ: AtomicU64 = AtomicU64::new(0);

#[tonic::async_trait]
impl maintenance_server::Maintenance for Api {
    async fn alarm(&self, _req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        Ok(Response::new(AlarmResponse {
            header: self.header_now(),
            alarms: Vec::new(),
        }))
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let (rev, size, in_use) = self
            .store
            .read(|view| {
                let rev = view.rev;
                let (size, in_use) = store::db_size(view.conn)?;
                Ok((rev, size, in_use))
            })
            .await?;
        Ok(Response::new(StatusResponse {
            header: self.store.header(rev),
            version: ETCD_VERSION.into(),
            db_size: size,
            leader: self.store.shared.member_id,
            raft_index: rev as u64,
            raft_term: 2,
            raft_applied_index: rev as u64,
            errors: Vec::new(),
            db_size_in_use: in_use,
            is_learner: false,
        }))
    }

    async fn defragment(
        &self,
        _req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        match self.write(WriteOp::Defrag).await? {
            WriteResult::Rev(rev) => Ok(Response::new(DefragmentResponse {
                header: self.store.header(rev),
            })),
            _ => Err(unexpected()),
        }
    }

    async fn hash(&self, _req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let (rev, hash) = self
            .store
            .read(|view| Ok((view.rev, store::hash_kv(view.conn, view.rev)?)))
            .await?;
        Ok(Response::new(HashResponse {
            header: self.store.header(rev),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let want = req.into_inner().revision;
        let (rev, compact, at, hash) = self
            .store
            .read(move |view| {
                let (rev, compact) = (view.rev, view.compact_rev);
                if want > rev {
                    return Err(ApiError::FutureRev);
                }
                let at = if want <= 0 { rev } else { want };
                if at < compact {
                    return Err(ApiError::Compacted);
                }
                Ok((rev, compact, at, store::hash_kv(view.conn, at)?))
            })
            .await?;
        Ok(Response::new(HashKvResponse {
            header: self.store.header(rev),
            hash,
            compact_revision: compact,
            hash_revision: at,
        }))
    }

    type SnapshotStream = StreamOf<SnapshotResponse>;

    async fn snapshot(
        &self,
        _req: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let db = self.store.shared.path.clone();
        let seq = SNAPSHOT_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = PathBuf::from(format!(
            "{}.snapshot-{}-{seq}.tmp",
            db.display(),
            std::process::id()
        ));
        let dest = tmp.clone();
        let file = self
            .store
            .read_plain(move |conn| {
                let _ = std::fs::remove_file(&dest);
                store::copy_into(conn, &dest)?;
                let file = std::fs::File::open(&dest);
                // The open handle keeps the data; the name must not outlive the stream.
                let _ = std::fs::remove_file(&dest);
                file.map_err(|e| ApiError::Internal(format!("snapshot: {e}")))
            })
            .await;
        let file = match file {
            Ok(file) => file,
            Err(err) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(err.into());
            }
        };
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || stream_file(file, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Streams the snapshot file followed by its SHA-256, as etcd does; `etcdctl snapshot
/// save` refuses a stream without that trailer.
fn stream_file(mut file: std::fs::File, tx: mpsc::Sender<Result<SnapshotResponse, Status>>) {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let total = size + 32;
    let mut hasher = Sha256::new();
    let mut sent = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = tx.blocking_send(Err(Status::internal(format!(
                    "etcdserver: snapshot read failed: {e}"
                ))));
                return;
            }
        };
        hasher.update(&buf[..n]);
        sent += n as u64;
        let resp = SnapshotResponse {
            header: None,
            remaining_bytes: total.saturating_sub(sent),
            blob: buf[..n].to_vec(),
            version: String::new(),
        };
        if tx.blocking_send(Ok(resp)).is_err() {
            return;
        }
    }
    let _ = tx.blocking_send(Ok(SnapshotResponse {
        header: None,
        remaining_bytes: 0,
        blob: hasher.finalize().to_vec(),
        version: String::new(),
    }));
}
