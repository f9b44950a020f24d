//! What the supervisor reports: per-service state, shared through a watch channel.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    /// Waiting for dependencies, or spawned and not yet passing its probe.
    Starting,
    Ready,
    /// Was ready; its probe fails now.
    Unhealthy,
    /// Exited; waiting before the next start.
    Backoff,
    /// Failed fast several times in a row; still retried, slowly.
    Crashloop,
    Stopped,
}

impl std::fmt::Display for ServiceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Unhealthy => "unhealthy",
            Self::Backoff => "backoff",
            Self::Crashloop => "crashloop",
            Self::Stopped => "stopped",
        };
        f.write_str(s)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub state: ServiceState,
    pub ready: bool,
    pub pid: Option<i32>,
    pub restarts: u32,
    /// Seconds since the current process started.
    pub uptime_secs: Option<u64>,
    pub cpu_percent: Option<f32>,
    pub rss_bytes: Option<u64>,
    /// How the previous process ended, e.g. "exit status: 1".
    pub last_exit: Option<String>,
    /// Why it is not ready: a probe failure or a start error.
    pub message: Option<String>,
    /// The last lines of its log, when it is crash-looping.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_tail: Vec<String>,
    /// The program run and where it came from (components, PATH).
    pub program: Option<String>,
    pub origin: Option<String>,
    pub description: Option<String>,
    #[serde(skip)]
    pub started_at: Option<SystemTime>,
}

impl ServiceStatus {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            state: ServiceState::Starting,
            ready: false,
            pid: None,
            restarts: 0,
            uptime_secs: None,
            cpu_percent: None,
            rss_bytes: None,
            last_exit: None,
            message: None,
            log_tail: Vec::new(),
            program: None,
            origin: None,
            description: None,
            started_at: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    pub data_dir: String,
    pub uptime_secs: u64,
    pub cpu_percent: Option<f32>,
    pub rss_bytes: Option<u64>,
}

pub use crate::node::HostFact;

/// The answer of `GET /v1/status`, printed by `kdist status -o json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub daemon: DaemonStatus,
    pub services: Vec<ServiceStatus>,
    /// Host facts and host preparation, fixed when the daemon started.
    #[serde(default)]
    pub host: Vec<HostFact>,
    /// Things the user should know, e.g. Kubernetes components that are not installed.
    #[serde(default)]
    pub notes: Vec<String>,
    /// Sections other parts of the daemon publish (the controllers layer): the
    /// supervisor serves them without knowing their shape.
    #[serde(flatten)]
    pub sections: BTreeMap<String, serde_json::Value>,
}

/// Publishes extra sections of the status report, read at every `GET /v1/status`.
pub trait ReportSections: Send + Sync + 'static {
    fn sections(&self) -> BTreeMap<String, serde_json::Value>;
}

impl StatusReport {
    pub fn all_ready(&self) -> bool {
        self.services.iter().all(|s| s.ready)
    }
    pub fn not_ready(&self) -> Vec<&ServiceStatus> {
        self.services.iter().filter(|s| !s.ready).collect()
    }
}

/// The shared board of service states. Runners write their own entry; everyone else reads.
#[derive(Clone)]
pub struct Board {
    tx: watch::Sender<BTreeMap<String, ServiceStatus>>,
    // shared by every clone: a datastore migration changes the set of services
    order: std::sync::Arc<std::sync::RwLock<Vec<String>>>,
}

impl Board {
    pub fn new(names: &[String]) -> Self {
        let map = names
            .iter()
            .map(|n| (n.clone(), ServiceStatus::new(n)))
            .collect();
        let (tx, _) = watch::channel(map);
        Self {
            tx,
            order: std::sync::Arc::new(std::sync::RwLock::new(names.to_vec())),
        }
    }

    /// Makes `names` the services shown, in this order: entries of names not shown
    /// before start fresh, entries of names no longer shown are dropped.
    pub fn set_services(&self, names: &[String]) {
        self.tx.send_modify(|map| {
            map.retain(|name, _| names.contains(name));
            for name in names {
                map.entry(name.clone())
                    .or_insert_with(|| ServiceStatus::new(name));
            }
        });
        if let Ok(mut order) = self.order.write() {
            *order = names.to_vec();
        }
    }

    pub fn update(&self, name: &str, f: impl FnOnce(&mut ServiceStatus)) {
        self.tx.send_modify(|map| {
            if let Some(status) = map.get_mut(name) {
                f(status);
                status.ready = status.state == ServiceState::Ready;
            }
        });
    }

    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<String, ServiceStatus>> {
        self.tx.subscribe()
    }

    /// Services in start order, with uptimes computed now.
    pub fn snapshot(&self) -> Vec<ServiceStatus> {
        let map = self.tx.borrow();
        let now = SystemTime::now();
        let order = self.order.read().map(|o| o.clone()).unwrap_or_default();
        order
            .iter()
            .filter_map(|n| map.get(n).cloned())
            .map(|mut s| {
                s.uptime_secs = s
                    .started_at
                    .map(|t| now.duration_since(t).unwrap_or(Duration::ZERO).as_secs());
                s
            })
            .collect()
    }
}
