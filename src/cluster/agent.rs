//! The cluster agent: HTTPS on `cluster.agent_port` inside the daemon. It answers
//! `GET /v1/health` and `POST /v1/join`; a join spends a token and returns what the
//! joiner needs. Failed attempts are counted per source address: past
//! [`MAX_FAILURES`] in [`WINDOW`] that address is refused without looking at its token.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::error::ClusterError;
use super::etcd::{EtcdClient, block_on};
use super::protocol::{
    CONTROL_PLANE_FILES, ControlPlaneMaterial, ErrorBody, JoinRequest, JoinResponse,
};
use super::token::TokenStore;
use super::{nodes, sign};
use crate::config::{DataDir, NodeConfig, Role};

/// Failed attempts per source address allowed in one [`WINDOW`].
pub const MAX_FAILURES: u32 = 20;
pub const WINDOW: Duration = Duration::from_secs(60);
const MAX_BODY: usize = 64 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers, and then its body.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 256;
const PROMOTE_EVERY: Duration = Duration::from_secs(3);

/// Counts failed attempts per source address.
#[derive(Default)]
struct Limiter {
    failures: HashMap<IpAddr, (Instant, u32)>,
}

impl Limiter {
    fn limited(&mut self, ip: IpAddr) -> bool {
        let now = Instant::now();
        match self.failures.get(&ip) {
            Some((start, count)) if now.duration_since(*start) < WINDOW => *count >= MAX_FAILURES,
            _ => false,
        }
    }

    fn fail(&mut self, ip: IpAddr) {
        let now = Instant::now();
        // keep the table small under a flood from many addresses
        if self.failures.len() > 10_000 {
            self.failures
                .retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let entry = self.failures.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// The join server of one node.
pub struct Agent {
    data: DataDir,
    config: NodeConfig,
    /// The serving configuration and the fingerprint of the CA it was issued under.
    tls: Mutex<(String, Arc<rustls::ServerConfig>)>,
    /// The addresses the agent's certificate names.
    addresses: Vec<IpAddr>,
    limiter: Arc<Mutex<Limiter>>,
    membership: Mutex<()>,
}

impl Agent {
    /// Issues the agent's certificate (blocking: key generation) and builds the agent.
    pub fn new(data: DataDir, config: NodeConfig) -> Result<Self, ClusterError> {
        let mut addresses = super::tls::host_addresses(&config.network.bridge);
        if let Some(ip) = config.network.node_ip
            && !addresses.contains(&ip)
        {
            addresses.insert(0, ip);
        }
        addresses.push(IpAddr::from([127, 0, 0, 1]));
        let (_, fingerprint) = super::tls::cluster_ca(&data)?;
        let tls = super::tls::agent_server_config(&data, &addresses)?;
        Ok(Self {
            data,
            config,
            tls: Mutex::new((fingerprint, Arc::new(tls))),
            addresses,
            limiter: Arc::new(Mutex::new(Limiter::default())),
            membership: Mutex::new(()),
        })
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, listener: TcpListener, shutdown: CancellationToken) {
        // promotes only while the node runs etcd: `kdist datastore migrate` may move it there
        if !self
            .config
            .disable
            .iter()
            .any(|d| crate::config::Service::Etcd == *d)
        {
            tokio::spawn(promote_learners(
                self.data.clone(),
                self.config.clone(),
                shutdown.clone(),
            ));
        }
        let shared = Arc::new(self);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "cluster agent listening");
        }
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        debug!(error = %e, "cluster agent accept failed");
                        continue;
                    }
                },
            };
            let agent = shared.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                // read here, not in the accept loop: it reads ca.crt
                let acceptor = TlsAcceptor::from(agent.clone().server_config().await);
                let tls =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "cluster agent TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                let service = hyper::service::service_fn(move |req| {
                    let agent = agent.clone();
                    async move { Ok::<_, Infallible>(agent.handle(req, peer).await) }
                });
                // a client that stalls in its headers (or sends none) is cut off, so
                // idle connections cannot hold every slot
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(REQUEST_TIMEOUT)
                    .serve_connection(TokioIo::new(tls), service);
                tokio::select! {
                    _ = conn => {}
                    _ = shutdown.cancelled() => {}
                }
            });
        }
    }

    /// The serving configuration for a new connection: issued again under the current
    /// cluster CA when `kdist certs rotate-ca` changed it, since joiners pin the CA that
    /// `kdist add-node` prints now.
    async fn server_config(self: Arc<Self>) -> Arc<rustls::ServerConfig> {
        let (fingerprint, config) = self
            .tls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let current = match super::tls::cluster_ca(&self.data) {
            Ok((_, current)) if current != fingerprint => current,
            _ => return config,
        };
        let agent = self.clone();
        let issued = tokio::task::spawn_blocking(move || {
            super::tls::agent_server_config(&agent.data, &agent.addresses)
        })
        .await;
        match issued {
            Ok(Ok(new)) => {
                info!("cluster CA changed: agent certificate issued again");
                let new = Arc::new(new);
                *self
                    .tls
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = (current, new.clone());
                new
            }
            Ok(Err(e)) => {
                warn!(error = %e, "cannot issue the agent certificate under the new CA");
                config
            }
            Err(e) => {
                warn!(error = %e, "agent certificate task failed");
                config
            }
        }
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/v1/health") => json(StatusCode::OK, &serde_json::json!({"ok": true})),
            (&Method::POST, "/v1/join") => {
                info!(%peer, "join request");
                match self.clone().join(req, peer).await {
                    Ok(answer) => json(StatusCode::OK, &answer),
                    Err(err) => {
                        if err.is_bad_attempt()
                            && let Ok(mut limiter) = self.limiter.lock()
                        {
                            limiter.fail(peer.ip());
                        }
                        if matches!(err, ClusterError::RateLimited { .. }) {
                            // a flood would fill the log: the first refusals said it all
                            debug!(%peer, "join refused: rate limited");
                        } else {
                            warn!(%peer, error = %err, "join refused");
                        }
                        error_response(&err)
                    }
                }
            }
            _ => error_response(&ClusterError::BadRequest {
                reason: format!("no such endpoint {} {}", req.method(), req.uri().path()),
            }),
        }
    }

    async fn join(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<JoinResponse, ClusterError> {
        if self
            .limiter
            .lock()
            .map(|mut l| l.limited(peer.ip()))
            .unwrap_or(false)
        {
            return Err(ClusterError::RateLimited {
                peer: peer.ip().to_string(),
            });
        }
        let body = tokio::time::timeout(
            REQUEST_TIMEOUT,
            Limited::new(req.into_body(), MAX_BODY).collect(),
        )
        .await
        .map_err(|_| ClusterError::BadRequest {
            reason: format!("the body did not arrive within {REQUEST_TIMEOUT:?}"),
        })?
        .map_err(|e| ClusterError::BadRequest {
            reason: format!("cannot read the body: {e}"),
        })?
        .to_bytes();
        let request: JoinRequest =
            serde_json::from_slice(&body).map_err(|e| ClusterError::BadRequest {
                reason: format!("body is not a join request: {e}"),
            })?;
        request.validate()?;
        if self.config.role == Role::Worker {
            return Err(ClusterError::NotControlPlane);
        }
        // a joiner with this node's own name would get credentials as this node
        // (system:node:<name>) and, as a control plane, take its etcd member's place
        if request.node_name == self.config.node_name() {
            return Err(ClusterError::NameTaken {
                name: request.node_name,
            });
        }
        let agent = self.clone();
        tokio::task::spawn_blocking(move || agent.join_blocking(request, peer.ip()))
            .await
            .map_err(|source| ClusterError::Task {
                what: "the join",
                source,
            })?
    }

    fn join_blocking(
        &self,
        request: JoinRequest,
        peer: IpAddr,
    ) -> Result<JoinResponse, ClusterError> {
        let store = TokenStore::new(&self.data);
        // read now: `kdist datastore migrate` switches config.yaml under a running agent
        let datastore = NodeConfig::load(&self.data)
            .map(|c| c.datastore)
            .unwrap_or(self.config.datastore);
        if request.role == Role::ControlPlane && datastore == crate::config::DatastoreKind::Embedded
        {
            // say which token role is wrong before saying the datastore is
            store.check_role(&request.token, Role::ControlPlane)?;
            return Err(ClusterError::EmbeddedDatastore);
        }
        let record = store.consume(&request.token, request.role)?;
        let answer = match request.role {
            Role::Worker => sign::worker(&self.data, &self.config, &request, peer),
            Role::ControlPlane => self.control_plane(&request, peer),
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(err) => {
                // the joiner did nothing wrong: its token stays good for another try
                let _ = store.refund(&record.id);
                return Err(err);
            }
        };
        nodes::record(&self.data, &request.node_name, request.role, peer)?;
        info!(node = %request.node_name, role = %request.role, token = %record.id, "node joined");
        Ok(answer)
    }

    /// Adds the joiner to etcd as a learner and hands it the cluster's CAs and keys.
    fn control_plane(
        &self,
        request: &JoinRequest,
        peer: IpAddr,
    ) -> Result<JoinResponse, ClusterError> {
        // one membership change at a time
        let _guard = self.membership.lock().map_err(|_| ClusterError::Internal {
            reason: "membership lock poisoned".into(),
        })?;
        let mut answer = sign::worker(&self.data, &self.config, request, peer)?;
        let mut files = std::collections::BTreeMap::new();
        for name in CONTROL_PLANE_FILES {
            let path = self.data.certs_dir().join(name);
            let text = std::fs::read_to_string(&path)
                .map_err(|source| ClusterError::Io { path, source })?;
            files.insert(name.to_string(), text);
        }
        let etcd = EtcdClient::new(&self.data, &self.config);
        let node_ip = self
            .config
            .network
            .node_ip
            .unwrap_or_else(crate::node::host::detect_node_ip);
        block_on(etcd.advertise_node_ip(
            &self.config.node_name(),
            node_ip,
            self.config.etcd.peer_port,
        ))?;
        let port = request.etcd_peer_port.unwrap_or(self.config.etcd.peer_port);
        let peer_url = format!("https://{}", SocketAddr::new(peer, port));
        let initial = block_on(etcd.add_learner(&request.node_name, &peer_url))?;
        info!(node = %request.node_name, %peer_url, "added to etcd as a learner");
        answer.control_plane = Some(ControlPlaneMaterial {
            files,
            etcd_initial_cluster: initial,
        });
        Ok(answer)
    }
}

/// Promotes etcd learners once they have caught up, every few seconds.
async fn promote_learners(data: DataDir, config: NodeConfig, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PROMOTE_EVERY) => {}
        }
        let on_etcd = NodeConfig::load(&data)
            .map(|c| c.datastore == crate::config::DatastoreKind::Etcd)
            .unwrap_or(false);
        if !on_etcd {
            continue;
        }
        if let Ok(promoted) = EtcdClient::new(&data, &config).promote_learners().await {
            for name in promoted {
                info!(node = %name, "etcd learner promoted to voting member");
            }
        }
    }
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(err: &ClusterError) -> Response<Full<Bytes>> {
    let status =
        StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(
        status,
        &ErrorBody {
            error: err.to_string(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_refuses_an_address_after_max_failures_only() {
        let mut limiter = Limiter::default();
        let (bad, good) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        for _ in 0..MAX_FAILURES {
            assert!(!limiter.limited(bad));
            limiter.fail(bad);
        }
        assert!(limiter.limited(bad));
        assert!(!limiter.limited(good));
    }

    #[test]
    fn every_error_maps_to_one_http_status() {
        assert_eq!(ClusterError::UnknownToken.http_status(), 401);
        assert_eq!(
            ClusterError::RateLimited { peer: "x".into() }.http_status(),
            429
        );
        assert_eq!(ClusterError::EmbeddedDatastore.http_status(), 409);
        assert!(!ClusterError::EmbeddedDatastore.is_bad_attempt());
        assert!(ClusterError::UnknownToken.is_bad_attempt());
    }
}
