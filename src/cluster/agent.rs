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
use super::protocol::{ErrorBody, JoinRequest, JoinResponse};
use super::token::TokenStore;
use super::{nodes, sign};
use crate::config::{DataDir, NodeConfig, Role};

/// Failed attempts per source address allowed in one [`WINDOW`].
pub const MAX_FAILURES: u32 = 20;
pub const WINDOW: Duration = Duration::from_secs(60);
const MAX_BODY: usize = 64 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 256;

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
    tls: Arc<rustls::ServerConfig>,
    limiter: Arc<Mutex<Limiter>>,
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
        let tls = super::tls::agent_server_config(&data, &addresses)?;
        Ok(Self {
            data,
            config,
            tls: Arc::new(tls),
            limiter: Arc::new(Mutex::new(Limiter::default())),
        })
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(self, listener: TcpListener, shutdown: CancellationToken) {
        let acceptor = TlsAcceptor::from(self.tls.clone());
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
            let acceptor = acceptor.clone();
            let agent = shared.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
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
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service);
                tokio::select! {
                    _ = conn => {}
                    _ = shutdown.cancelled() => {}
                }
            });
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
                        warn!(%peer, error = %err, "join refused");
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
        let body = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
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
        let agent = self.clone();
        tokio::task::spawn_blocking(move || agent.join_blocking(request, peer.ip()))
            .await
            .map_err(|e| ClusterError::Internal {
                reason: e.to_string(),
            })?
    }

    fn join_blocking(
        &self,
        request: JoinRequest,
        peer: IpAddr,
    ) -> Result<JoinResponse, ClusterError> {
        if request.role == Role::ControlPlane {
            if self.config.datastore == crate::config::DatastoreKind::Embedded {
                return Err(ClusterError::EmbeddedDatastore);
            }
            // check the token's role before refusing for a missing feature, so a
            // worker token still reads "worker only"
            let store = TokenStore::new(&self.data);
            store.check_role(&request.token, Role::ControlPlane)?;
            return Err(ClusterError::ControlPlaneUnsupported);
        }
        let store = TokenStore::new(&self.data);
        let record = store.consume(&request.token, request.role)?;
        let answer = sign::worker(&self.data, &self.config, &request, peer)?;
        nodes::record(&self.data, &request.node_name, request.role, peer)?;
        info!(node = %request.node_name, role = %request.role, token = %record.id, "node joined");
        Ok(answer)
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
