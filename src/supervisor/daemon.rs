//! The daemon: owns the data dir lock, the runners, the control API and the stop order.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::Flock;
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::api::{self, ApiState};
use super::backoff::RestartPolicy;
use super::builtin::Builtins;
use super::child;
use super::error::SupervisorError;
use super::fleet::{Fleet, SharedFleet};
use super::logs;
use super::runner::Order;
use super::service::{self, ServiceSpec};
use super::status::{Board, ReportSections};
use crate::config::{DataDir, NodeConfig};
use crate::fsutil;
use crate::pki;

/// How long stale children of a killed daemon get to exit before SIGKILL.
const STALE_GRACE: Duration = Duration::from_secs(10);
/// Log rotation: check interval, size limit, rotated files kept.
const LOG_CHECK: Duration = Duration::from_secs(30);
const LOG_MAX_BYTES: u64 = 10 * 1024 * 1024;
const LOG_KEEP: usize = 3;
/// How long a service restarted for new certificates gets to become ready again before
/// the next one is restarted anyway.
const RENEW_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// A daemon that holds its data dir and is ready to run.
pub struct Daemon {
    data: DataDir,
    config: NodeConfig,
    specs: Vec<ServiceSpec>,
    policy: RestartPolicy,
    builtins: Builtins,
    board: Board,
    sections: Option<Arc<dyn ReportSections>>,
    setup: crate::node::NodeSetup,
    // held for the daemon's lifetime: one daemon per data dir
    _lock: Flock<File>,
}

/// Locks `data` for one daemon (or a `kdist stop` cleaning up after a dead one).
fn lock_data_dir(data: &DataDir) -> Result<Flock<File>, SupervisorError> {
    let lock_path = data.run_dir().join("kdist.lock");
    let lock = fsutil::try_lock_exclusive(&lock_path).map_err(|source| SupervisorError::Io {
        path: lock_path.clone(),
        source,
    })?;
    lock.ok_or_else(|| {
        let mut pid = String::new();
        let _ = File::open(data.pidfile("kdist")).and_then(|mut f| f.read_to_string(&mut pid));
        SupervisorError::AlreadyRunning {
            data_dir: data.root().to_path_buf(),
            pid: pid.trim().to_string(),
        }
    })
}

/// Stops what a killed daemon of `data` left: containerd's shims with their containers,
/// then every marked service (SIGTERM, SIGKILL after a grace period). Returns how many
/// services were signalled.
async fn stop_stale(data: &DataDir) -> usize {
    let shim_data = data.clone();
    let _ = tokio::task::spawn_blocking(move || crate::node::kill_leftover_containers(&shim_data))
        .await;
    child::cleanup_stale(data, STALE_GRACE).await
}

/// `kdist stop` when no daemon answers but a killed one left services running: what a
/// new daemon does first and what a daemon does last (the node teardown: leftover
/// containers, pod cgroups, the egress guard), under the data dir's lock so that no
/// daemon starts meanwhile. Returns how many processes were stopped.
pub async fn stop_leftovers(data: &DataDir, config: &NodeConfig) -> Result<usize, SupervisorError> {
    let _lock = lock_data_dir(data)?;
    let stopped = stop_stale(data).await;
    let (d, c) = (data.clone(), config.clone());
    let _ = tokio::task::spawn_blocking(move || crate::node::teardown(&d, &c)).await;
    Ok(stopped)
}

impl Daemon {
    /// Takes the data dir: creates it, locks it against a second daemon, stops what a
    /// killed daemon left behind, makes sure every certificate is in place and valid,
    /// and writes default args files.
    pub async fn prepare(data: DataDir, config: &NodeConfig) -> Result<Self, SupervisorError> {
        data.ensure().map_err(|e| SupervisorError::Io {
            path: data.root().to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let io = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| SupervisorError::Io { path, source }
        };
        let lock = lock_data_dir(&data)?;
        let pidfile = data.pidfile("kdist");
        fsutil::atomic_write(
            &pidfile,
            format!("{}\n", std::process::id()).as_bytes(),
            0o644,
        )
        .map_err(io(&pidfile))?;
        stop_stale(&data).await;
        // a worker holds certificates signed by its control plane and no CA key
        if config.role != crate::config::Role::Worker {
            let (d, c) = (data.clone(), config.clone());
            tokio::task::spawn_blocking(move || pki::ensure(&d, &c))
                .await
                .map_err(|e| SupervisorError::Io {
                    path: data.certs_dir(),
                    source: std::io::Error::other(e.to_string()),
                })??;
        }
        let setup = {
            let (node_data, config) = (data.clone(), config.clone());
            tokio::task::spawn_blocking(move || crate::node::prepare(&node_data, &config))
                .await
                .map_err(|e| SupervisorError::Io {
                    path: data.root().to_path_buf(),
                    source: std::io::Error::other(e.to_string()),
                })??
        };
        let specs = {
            let (plan_data, config) = (data.clone(), config.clone());
            tokio::task::spawn_blocking(move || {
                let host = service::HostInputs::probe(&plan_data, &config)?;
                service::plan(&plan_data, &config, &host)
            })
            .await
            .map_err(|e| SupervisorError::Io {
                path: data.root().to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })??
        };
        service::write_default_args(&specs)?;
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        Ok(Self {
            data,
            config: config.clone(),
            board: Board::new(&names),
            specs,
            policy: RestartPolicy::default(),
            builtins: Builtins::new(),
            sections: None,
            setup,
            _lock: lock,
        })
    }

    /// Registers the services that run inside the daemon, by service name.
    pub fn with_builtins(mut self, builtins: Builtins) -> Self {
        self.builtins = builtins;
        self
    }

    /// Adds sections to the status report (the controllers' states).
    pub fn with_sections(mut self, sections: Arc<dyn ReportSections>) -> Self {
        self.sections = Some(sections);
        self
    }

    /// The services' states, as `kdist status` shows them: the composition root
    /// watches it (the apiserver's readiness gates the controllers).
    pub fn board(&self) -> Board {
        self.board.clone()
    }

    /// Overrides the restart policy (tests use short delays).
    pub fn with_policy(mut self, policy: RestartPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Runs every service and serves the control API on `listener` until `shutdown`
    /// is cancelled (by a signal or `POST /v1/shutdown`), then stops the services in
    /// reverse dependency order.
    pub async fn run(
        self,
        listener: UnixListener,
        shutdown: CancellationToken,
    ) -> Result<(), SupervisorError> {
        self.run_until(listener, shutdown.clone(), shutdown).await
    }

    /// As [`Daemon::run`], but the services' stop sequence waits for `stop_services`
    /// once `shutdown` asked for a stop: the composition root stops what talks to the
    /// services (the controllers) first.
    pub async fn run_until(
        self,
        listener: UnixListener,
        shutdown: CancellationToken,
        stop_services: CancellationToken,
    ) -> Result<(), SupervisorError> {
        let board = self.board.clone();
        let fleet: SharedFleet = Arc::new(tokio::sync::Mutex::new(Fleet::start(
            self.specs.clone(),
            board.clone(),
            self.data.clone(),
            self.policy,
            self.builtins.clone(),
        )));

        let api_stop = CancellationToken::new();
        let state = Arc::new(ApiState {
            board: board.clone(),
            fleet: fleet.clone(),
            migration: tokio::sync::Mutex::new(()),
            shutdown: shutdown.clone(),
            started: Instant::now(),
            data: self.data.clone(),
            host: self.setup.report.clone(),
            notes: self.setup.notes.clone(),
            sections: self.sections.clone(),
        });
        let api_task = tokio::spawn(api::serve(listener, state, api_stop.clone()));
        let notify_task = tokio::spawn(notify_when_ready(board.clone()));
        let hooks_task = tokio::spawn(after_ready_hooks(board.clone(), self.data.clone()));
        let logs_task = tokio::spawn(logs::rotate_periodically(
            self.data.logs_dir(),
            LOG_CHECK,
            LOG_MAX_BYTES,
            LOG_KEEP,
            api_stop.clone(),
        ));

        let renew_task = tokio::spawn(renew_periodically(
            self.data.clone(),
            self.config.clone(),
            fleet.clone(),
            board.clone(),
        ));

        stop_services.cancelled().await;
        // a renewal must not restart a service the stop sequence is stopping
        renew_task.abort();
        let _ = renew_task.await;
        info!("stopping services");
        super::fleet::stop_all(&fleet).await;
        let (data, config) = (self.data.clone(), self.config.clone());
        let _ = tokio::task::spawn_blocking(move || crate::node::teardown(&data, &config)).await;
        notify_task.abort();
        hooks_task.abort();
        api_stop.cancel();
        let _ = api_task.await;
        let _ = logs_task.await;
        let _ = std::fs::remove_file(self.data.control_socket());
        let _ = std::fs::remove_file(self.data.pidfile("kdist"));
        info!("all services stopped");
        Ok(())
    }
}

/// Every `certs.check_interval`: renews what is due (or lacks a new host address) and
/// restarts the services that read it, one at a time, each back to ready before the next.
async fn renew_periodically(data: DataDir, config: NodeConfig, fleet: SharedFleet, board: Board) {
    // a worker cannot renew without the CA key; it re-joins for new certificates
    if config.role == crate::config::Role::Worker {
        return;
    }
    let interval = config.certs.check_interval.duration();
    // services that still have to load renewed certificates: a restart that could not be
    // ordered (its runner stopped, as during a datastore migration) is tried again at the
    // next check, since the certificates on disk are no longer due then
    let mut pending = BTreeSet::new();
    loop {
        tokio::time::sleep(interval).await;
        let (d, c) = (data.clone(), config.clone());
        match tokio::task::spawn_blocking(move || pki::ensure(&d, &c)).await {
            Ok(Ok(issued)) => pending.extend(pki::affected_services(&issued)),
            Ok(Err(e)) => warn!("certificate check failed: {e}"),
            Err(e) => warn!("certificate check panicked: {e}"),
        }
        if pending.is_empty() {
            tracing::debug!("certificates checked: nothing due");
            continue;
        }
        for service in pki::RESTART_ORDER
            .iter()
            .map(|s| s.to_string())
            .filter(|s| pending.contains(s))
            .collect::<Vec<_>>()
        {
            let Some(tx) = fleet.lock().await.sender(&service) else {
                // not run on this node (disabled, or no binary)
                pending.remove(&service);
                continue;
            };
            let old_pid = board
                .snapshot()
                .into_iter()
                .find(|s| s.name == service)
                .and_then(|s| s.pid);
            info!(service = %service, "restarting to load renewed certificates");
            let (reply, done) = oneshot::channel();
            if tx.send(Order::Restart(reply)).await.is_err() || done.await.is_err() {
                warn!(service = %service, "cannot restart it now for renewed certificates; trying again at the next check");
                continue;
            }
            pending.remove(&service);
            let mut rx = board.subscribe();
            let back = rx.wait_for(|map| {
                map.get(&service)
                    .is_some_and(|s| s.ready && s.pid.is_some() && s.pid != old_pid)
            });
            match tokio::time::timeout(RENEW_READY_TIMEOUT, back).await {
                Ok(Ok(_)) => info!(service = %service, "ready with renewed certificates"),
                Ok(Err(_)) => return,
                Err(_) => warn!(
                    service = %service,
                    "not ready {RENEW_READY_TIMEOUT:?} after a restart for renewed certificates"
                ),
            }
        }
    }
}

/// Image archives dropped in `<data>/images/` go into containerd once it is ready.
async fn after_ready_hooks(board: Board, data: DataDir) {
    let mut rx = board.subscribe();
    let ready = |map: &BTreeMap<String, super::status::ServiceStatus>, name: &str| {
        map.get(name).is_some_and(|s| s.ready)
    };
    if rx.wait_for(|map| ready(map, "containerd")).await.is_err() {
        return;
    }
    if let Ok(results) =
        tokio::task::spawn_blocking(move || crate::node::images::import_dropped(&data)).await
    {
        for (file, result) in results {
            match result {
                Ok(names) => info!(file = %file.display(), "imported {}", names.join(", ")),
                Err(e) => tracing::warn!(file = %file.display(), "image import failed: {e}"),
            }
        }
    }
}

/// Tells systemd (when NOTIFY_SOCKET is set) once every service is ready.
async fn notify_when_ready(board: Board) {
    let mut rx = board.subscribe();
    if rx
        .wait_for(|map| map.values().all(|s| s.ready))
        .await
        .is_ok()
    {
        info!("all services ready");
        if std::env::var_os("NOTIFY_SOCKET").is_some()
            && let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready])
        {
            tracing::warn!("sd_notify: {e}");
        }
    }
}

/// Binds the control socket: removes a stale socket file (we hold the data dir lock, so
/// no live daemon owns it) and restricts it to root.
pub fn bind_control_socket(data: &DataDir) -> Result<UnixListener, SupervisorError> {
    use std::os::unix::fs::PermissionsExt;
    let path = data.control_socket();
    let io = |source| SupervisorError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}
