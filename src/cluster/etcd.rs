//! This node's etcd cluster, through etcd's gRPC API (the datastore's generated
//! client) with mutual TLS as the apiserver's etcd client: members, learners,
//! promotion, removal, health. The calls are async; [`block_on`] serves sync callers.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use super::error::ClusterError;
use crate::config::{DataDir, NodeConfig};
use crate::datastore::proto::etcdserverpb::{
    MemberAddRequest, MemberListRequest, MemberPromoteRequest, MemberRemoveRequest,
    MemberUpdateRequest, RangeRequest, cluster_client::ClusterClient, kv_client::KvClient,
};
use crate::datastore::tls::TlsFiles;
use crate::fsutil;

/// How long a membership change is retried while etcd says it is not ready for one.
const ADD_RETRY: Duration = Duration::from_secs(45);
/// What etcd says when it refuses a membership change for now: a cluster that just
/// changed must have been healthy for a few seconds, and it takes one learner at a time.
const NOT_NOW: &[&str] = &["unhealthy cluster", "too many learner"];
/// How long connecting to one endpoint may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// One etcd member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    #[serde(rename = "ID")]
    pub id: u64,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "peerURLs", default)]
    pub peer_urls: Vec<String>,
    #[serde(rename = "clientURLs", default)]
    pub client_urls: Vec<String>,
    #[serde(rename = "isLearner", default)]
    pub is_learner: bool,
}

impl Member {
    pub fn hex_id(&self) -> String {
        format!("{:x}", self.id)
    }
}

impl From<crate::datastore::proto::etcdserverpb::Member> for Member {
    fn from(m: crate::datastore::proto::etcdserverpb::Member) -> Self {
        Self {
            id: m.id,
            name: m.name,
            peer_urls: m.peer_ur_ls,
            client_urls: m.client_ur_ls,
            is_learner: m.is_learner,
        }
    }
}

/// What `kdist join` left for this node's first etcd start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitialCluster {
    pub initial_cluster: String,
    pub state: String,
}

fn initial_file(data: &DataDir) -> PathBuf {
    data.cluster_dir().join("etcd-initial.json")
}

/// `--initial-cluster` and `--initial-cluster-state` written by a control-plane join.
pub fn etcd_initial_cluster(data: &DataDir) -> Option<(String, String)> {
    let bytes = std::fs::read(initial_file(data)).ok()?;
    let initial: InitialCluster = serde_json::from_slice(&bytes).ok()?;
    Some((initial.initial_cluster, initial.state))
}

pub fn write_initial_cluster(data: &DataDir, initial: &InitialCluster) -> Result<(), ClusterError> {
    let path = initial_file(data);
    let bytes = serde_json::to_vec_pretty(initial).map_err(|e| ClusterError::Internal {
        reason: e.to_string(),
    })?;
    fsutil::atomic_write(&path, &bytes, 0o644).map_err(|source| ClusterError::Io { path, source })
}

pub fn remove_initial_cluster(data: &DataDir) {
    let _ = std::fs::remove_file(initial_file(data));
}

/// Runs `future` to completion on a current-thread runtime of its own, for sync
/// callers (never call it on an async worker).
pub fn block_on<T>(
    future: impl std::future::Future<Output = Result<T, ClusterError>>,
) -> Result<T, ClusterError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ClusterError::Io {
            path: PathBuf::from("tokio runtime"),
            source,
        })?
        .block_on(future)
}

/// etcd's gRPC API at `endpoints` (this node's client URL unless told otherwise): the
/// first that answers serves each call.
pub struct EtcdClient {
    tls: TlsFiles,
    endpoints: Vec<String>,
}

impl EtcdClient {
    pub fn new(data: &DataDir, config: &NodeConfig) -> Self {
        let certs = data.certs_dir();
        Self {
            tls: TlsFiles {
                ca: certs.join("etcd/ca.crt"),
                cert: certs.join("apiserver-etcd-client.crt"),
                key: certs.join("apiserver-etcd-client.key"),
            },
            endpoints: vec![format!("https://127.0.0.1:{}", config.etcd.client_port)],
        }
    }

    pub fn with_endpoints(mut self, endpoints: Vec<String>) -> Self {
        self.endpoints = endpoints;
        self
    }

    /// A channel to the first endpoint that accepts a connection.
    async fn channel(&self, call: &str) -> Result<Channel, ClusterError> {
        let mut last = String::from("no endpoint given");
        for endpoint in &self.endpoints {
            let dial = crate::datastore::client::connect_with(endpoint, Some(&self.tls));
            match tokio::time::timeout(DIAL_TIMEOUT, dial).await {
                Ok(Ok(channel)) => return Ok(channel),
                Ok(Err(e)) => last = format!("{endpoint}: {}", crate::report::error_chain(&e)),
                Err(_) => last = format!("{endpoint}: no answer within {DIAL_TIMEOUT:?}"),
            }
        }
        Err(ClusterError::Etcd {
            command: call.to_string(),
            message: format!("cannot connect ({last})"),
        })
    }

    /// Runs `call` (named `name`) against the first endpoint that answers, within
    /// [`CALL_TIMEOUT`].
    async fn call<T, F>(
        &self,
        name: &str,
        call: impl FnOnce(ClusterClient<Channel>) -> F,
    ) -> Result<T, ClusterError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let channel = self.channel(name).await?;
        match tokio::time::timeout(CALL_TIMEOUT, call(ClusterClient::new(channel))).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(ClusterError::Etcd {
                command: name.to_string(),
                message: status.message().to_string(),
            }),
            Err(_) => Err(ClusterError::Etcd {
                command: name.to_string(),
                message: format!("no answer within {CALL_TIMEOUT:?}"),
            }),
        }
    }

    pub async fn members(&self) -> Result<Vec<Member>, ClusterError> {
        let list = self
            .call("member list", |mut c| async move {
                c.member_list(MemberListRequest {
                    linearizable: false,
                })
                .await
            })
            .await?;
        Ok(list.members.into_iter().map(Member::from).collect())
    }

    /// Removes member `id`, retried while etcd refuses for now.
    pub async fn remove(&self, id: u64) -> Result<(), ClusterError> {
        self.retrying(NOT_NOW, || async move {
            self.call("member remove", |mut c| async move {
                c.member_remove(MemberRemoveRequest { id }).await
            })
            .await
            .map(drop)
        })
        .await
    }

    /// A membership change, retried for up to [`ADD_RETRY`] while etcd's refusal names
    /// one of `retryable` (see [`NOT_NOW`]).
    async fn retrying<F, Fut>(&self, retryable: &[&str], change: F) -> Result<(), ClusterError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), ClusterError>>,
    {
        let deadline = tokio::time::Instant::now() + ADD_RETRY;
        loop {
            match change().await {
                Err(ClusterError::Etcd { message, .. })
                    if retryable.iter().any(|r| message.contains(r))
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                other => return other,
            }
        }
    }

    /// Adds `name` at `peer_url` as a learner; returns the `--initial-cluster` value the
    /// new member starts with.
    pub async fn add_learner(&self, name: &str, peer_url: &str) -> Result<String, ClusterError> {
        let members = self.members().await?;
        if let Some(stale) = members
            .iter()
            .find(|m| m.name == name || m.peer_urls.iter().any(|u| u == peer_url))
        {
            // a node that left uncleanly (or was reset) joins again under its name
            self.remove(stale.id).await?;
        }
        // etcd answers "member not found" to an add right after a removal, and adds
        // nothing: tried again, unless the member is there after all
        let retryable = [NOT_NOW, &["member not found"]].concat();
        self.retrying(&retryable, || async move {
            let present = self
                .members()
                .await?
                .iter()
                .any(|m| m.is_learner && m.peer_urls.iter().any(|u| u == peer_url));
            if present {
                return Ok(());
            }
            self.call("member add", |mut c| async move {
                c.member_add(MemberAddRequest {
                    peer_ur_ls: vec![peer_url.to_string()],
                    is_learner: true,
                })
                .await
            })
            .await
            .map(drop)
        })
        .await?;
        let mut parts: Vec<String> = self
            .members()
            .await?
            .into_iter()
            .filter(|m| m.name != name)
            .filter_map(|m| m.peer_urls.first().map(|u| format!("{}={u}", m.name)))
            .filter(|p| !p.starts_with('='))
            .collect();
        parts.push(format!("{name}={peer_url}"));
        Ok(parts.join(","))
    }

    /// Promotes every learner that has caught up; returns the names promoted.
    pub async fn promote_learners(&self) -> Result<Vec<String>, ClusterError> {
        let mut promoted = Vec::new();
        for member in self.members().await?.into_iter().filter(|m| m.is_learner) {
            let id = member.id;
            // refused until the learner's log is close to the leader's: tried again later
            let result = self
                .call("member promote", |mut c| async move {
                    c.member_promote(MemberPromoteRequest { id }).await
                })
                .await;
            if result.is_ok() {
                promoted.push(member.name);
            }
        }
        Ok(promoted)
    }

    /// Makes this node's member advertise `node_ip` when it still advertises loopback
    /// (a single node created before it was clustered).
    pub async fn advertise_node_ip(
        &self,
        own_name: &str,
        node_ip: IpAddr,
        peer_port: u16,
    ) -> Result<(), ClusterError> {
        if node_ip.is_loopback() {
            return Ok(());
        }
        for member in self.members().await? {
            let loopback = member
                .peer_urls
                .iter()
                .all(|u| u.contains("127.0.0.1") || u.contains("localhost"));
            if member.name == own_name && loopback {
                let url = format!("https://{}", std::net::SocketAddr::new(node_ip, peer_port));
                let id = member.id;
                self.call("member update", |mut c| async move {
                    c.member_update(MemberUpdateRequest {
                        id,
                        peer_ur_ls: vec![url],
                    })
                    .await
                })
                .await?;
            }
        }
        Ok(())
    }

    /// Whether the member serving `client_url` answers a linearizable read (what
    /// `etcdctl endpoint health` checks).
    pub async fn healthy(&self, client_url: &str) -> bool {
        let probe = async {
            let channel = crate::datastore::client::connect_with(client_url, Some(&self.tls))
                .await
                .ok()?;
            KvClient::new(channel)
                .range(RangeRequest {
                    key: b"health".to_vec(),
                    count_only: true,
                    ..Default::default()
                })
                .await
                .ok()
        };
        matches!(
            tokio::time::timeout(DIAL_TIMEOUT + DIAL_TIMEOUT, probe).await,
            Ok(Some(_))
        )
    }
}
