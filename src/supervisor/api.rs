//! The control API: HTTP/1.1 over the unix socket `<data>/run/kdist.sock` (mode 0600).
//! The daemon serves it; the CLI is its client. JSON bodies; errors as `{"error": ...}`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::error::SupervisorError;
use super::fleet::SharedFleet;
use super::runner::Order;
use super::status::{Board, DaemonStatus, HostFact, ReportSections, StatusReport};
use crate::config::DataDir;

/// What request handlers reach: the board, the runners' order channels, shutdown.
pub struct ApiState {
    pub board: Board,
    pub(crate) fleet: SharedFleet,
    /// One datastore migration at a time.
    pub migration: tokio::sync::Mutex<()>,
    pub shutdown: CancellationToken,
    pub started: Instant,
    pub data: DataDir,
    pub host: Vec<HostFact>,
    pub notes: Vec<String>,
    pub sections: Option<Arc<dyn ReportSections>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ErrorBody {
    error: String,
}

/// Serves the control API on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: UnixListener, state: Arc<ApiState>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("control socket accept: {e}");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, state.clone()));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("control connection: {e}");
            }
        });
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorBody {
            error: message.into(),
        },
    )
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<ApiState>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let response = match (req.method(), segments.as_slice()) {
        (&Method::GET, ["v1", "status"]) => json(StatusCode::OK, &report(&state).await),
        (&Method::POST, ["v1", "services", name, "restart"]) => {
            let (tx, known) = {
                let fleet = state.fleet.lock().await;
                (fleet.sender(name), fleet.names())
            };
            match tx {
                None => error(
                    StatusCode::NOT_FOUND,
                    format!(
                        "unknown service `{name}`; this node runs: {}",
                        known.join(", ")
                    ),
                ),
                Some(tx) => {
                    let (reply, done) = oneshot::channel();
                    if tx.send(Order::Restart(reply)).await.is_err() || done.await.is_err() {
                        error(StatusCode::CONFLICT, format!("{name} is stopping"))
                    } else {
                        json(StatusCode::OK, &serde_json::json!({ "restarted": name }))
                    }
                }
            }
        }
        (&Method::POST, ["v1", "datastore", "migrate"]) => {
            let to = req.uri().query().unwrap_or_default().strip_prefix("to=");
            match to.and_then(crate::config::DatastoreKind::parse) {
                None => error(
                    StatusCode::BAD_REQUEST,
                    "say where to: ?to=etcd or ?to=embedded",
                ),
                Some(to) => {
                    let _one = state.migration.lock().await;
                    match super::migrate::migrate(&state.fleet, &state.data, to).await {
                        Ok(report) => json(StatusCode::OK, &report),
                        Err(e) => error(StatusCode::CONFLICT, crate::report::error_chain(&e)),
                    }
                }
            }
        }
        (&Method::POST, ["v1", "release"]) => {
            switch_release(&state, req.uri().query().unwrap_or_default()).await
        }
        (&Method::POST, ["v1", "shutdown"]) => {
            state.shutdown.cancel();
            json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "stopping": true }),
            )
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint {path}")),
    };
    Ok(response)
}

/// `POST /v1/release?to=<release>[&restart=<service>]`: the services run the installed
/// components release `to` from their next start on, and `restart` starts again now
/// with it (`kdist upgrade` moves a running node this way, one service at a time).
async fn switch_release(state: &ApiState, query: &str) -> Response<Full<Bytes>> {
    let (mut to, mut restart) = (None, None);
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("to", v)) => to = Some(v),
            Some(("restart", v)) => restart = Some(v),
            _ => {}
        }
    }
    let Some(to) = to else {
        return error(
            StatusCode::BAD_REQUEST,
            "say which release: ?to=<channel>-<number>[&restart=<service>]",
        );
    };
    let store = crate::components::Store::new(&state.data);
    let id = match crate::components::ReleaseId::parse(to) {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Err(e) = store.record(&id) {
        return error(StatusCode::NOT_FOUND, e.to_string());
    }
    let dir = store.release_dir(&id);
    let dir = dir.canonicalize().unwrap_or(dir);
    let (spec, taken) = {
        let mut fleet = state.fleet.lock().await;
        let spec = match restart {
            None => None,
            Some(name) => match fleet.specs.iter().find(|s| s.name == name) {
                Some(spec) if fleet.sender(name).is_some() => Some(spec.clone()),
                _ => {
                    return error(
                        StatusCode::NOT_FOUND,
                        format!(
                            "`{name}` does not run here; this node runs: {}",
                            fleet.names().join(", ")
                        ),
                    );
                }
            },
        };
        for planned in &mut fleet.specs {
            planned.release = Some(dir.clone());
        }
        let taken = spec.as_ref().and_then(|s| fleet.take(&s.name));
        (spec, taken)
    };
    if let Some(mut spec) = spec {
        // a runner keeps the spec it was started with: a new one runs the new release;
        // the old one stops without the fleet's lock held (it waits up to its grace)
        if let Some(runner) = taken {
            runner.stop().await;
        }
        spec.release = Some(dir);
        state.fleet.lock().await.spawn(spec);
    }
    tracing::info!(release = %id, restarted = ?restart, "components release switched");
    json(
        StatusCode::OK,
        &serde_json::json!({ "release": id.to_string(), "restarted": restart }),
    )
}

/// Builds the status report, sampling CPU and memory of the daemon and its children.
async fn report(state: &ApiState) -> StatusReport {
    let mut services = state.board.snapshot();
    let me = std::process::id();
    let mut pids: Vec<u32> = services
        .iter()
        .filter_map(|s| s.pid.and_then(|p| u32::try_from(p).ok()))
        .collect();
    pids.push(me);
    let usage = tokio::task::spawn_blocking(move || sample(&pids))
        .await
        .unwrap_or_default();
    for service in &mut services {
        if let Some(pid) = service.pid.and_then(|p| u32::try_from(p).ok())
            && let Some((cpu, rss)) = usage.get(&pid)
        {
            service.cpu_percent = Some(*cpu);
            service.rss_bytes = Some(*rss);
        }
    }
    let own = usage.get(&me);
    StatusReport {
        daemon: DaemonStatus {
            pid: me,
            version: env!("CARGO_PKG_VERSION").to_string(),
            data_dir: state.data.root().display().to_string(),
            uptime_secs: state.started.elapsed().as_secs(),
            cpu_percent: own.map(|u| u.0),
            rss_bytes: own.map(|u| u.1),
        },
        services,
        host: state.host.clone(),
        notes: state.notes.clone(),
        sections: state
            .sections
            .as_ref()
            .map(|s| s.sections())
            .unwrap_or_default(),
    }
}

/// CPU % (over a short window) and RSS bytes of `pids`.
fn sample(pids: &[u32]) -> BTreeMap<u32, (f32, u64)> {
    use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};
    let pids: Vec<Pid> = pids.iter().map(|p| Pid::from_u32(*p)).collect();
    let kind = ProcessRefreshKind::nothing().with_cpu().with_memory();
    let Ok(mut system) = System::new() else {
        return BTreeMap::new();
    };
    system.refresh_processes_specifics(ProcessesToUpdate::Some(&pids), true, kind);
    std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
    system.refresh_processes_specifics(ProcessesToUpdate::Some(&pids), true, kind);
    pids.iter()
        .filter_map(|pid| {
            let p = system.process(*pid)?;
            Some((pid.as_u32(), (p.cpu_usage(), p.memory())))
        })
        .collect()
}

/// The CLI's side of the control API.
pub struct Client {
    socket: PathBuf,
    data_dir: PathBuf,
}

impl Client {
    pub fn new(data: &DataDir) -> Self {
        Self {
            socket: data.control_socket(),
            data_dir: data.root().to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
    ) -> Result<(StatusCode, Bytes), SupervisorError> {
        let what = format!("{method} {path}");
        let api = |source: Box<dyn std::error::Error + Send + Sync>| SupervisorError::Api {
            what: what.clone(),
            source,
        };
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    SupervisorError::NotRunning {
                        data_dir: self.data_dir.clone(),
                        socket: self.socket.clone(),
                    }
                }
                _ => api(Box::new(e)),
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| api(Box::new(e)))?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "kdist")
            .body(Full::new(Bytes::new()))
            .map_err(|e| api(Box::new(e)))?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| api(Box::new(e)))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| api(Box::new(e)))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(SupervisorError::Refused { what, message });
        }
        Ok((status, body))
    }

    pub async fn status(&self) -> Result<StatusReport, SupervisorError> {
        let (_, body) = self.request(Method::GET, "/v1/status").await?;
        serde_json::from_slice(&body).map_err(|e| SupervisorError::Api {
            what: "GET /v1/status".into(),
            source: Box::new(e),
        })
    }

    pub async fn restart(&self, service: &str) -> Result<(), SupervisorError> {
        self.request(Method::POST, &format!("/v1/services/{service}/restart"))
            .await
            .map(drop)
    }

    /// Moves the node's datastore (see `supervisor::migrate`); answers when done.
    pub async fn migrate(
        &self,
        to: crate::config::DatastoreKind,
    ) -> Result<super::migrate::MigrationReport, SupervisorError> {
        let to = to.as_str();
        let path = format!("/v1/datastore/migrate?to={to}");
        let (_, body) = self.request(Method::POST, &path).await?;
        serde_json::from_slice(&body).map_err(|e| SupervisorError::Api {
            what: format!("POST {path}"),
            source: Box::new(e),
        })
    }

    /// Makes the daemon run components release `release` and restarts `service` with it.
    pub async fn switch_release(
        &self,
        release: &str,
        service: Option<&str>,
    ) -> Result<(), SupervisorError> {
        let mut path = format!("/v1/release?to={release}");
        if let Some(service) = service {
            path.push_str(&format!("&restart={service}"));
        }
        self.request(Method::POST, &path).await.map(drop)
    }

    pub async fn shutdown(&self) -> Result<(), SupervisorError> {
        self.request(Method::POST, "/v1/shutdown").await.map(drop)
    }
}
