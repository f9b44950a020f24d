//! Runs the controllers: each in its own task, restarted with capped backoff when it
//! returns an error (or returns at all before shutdown), its state on a shared board.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::{Context, Controller};
use crate::report::error_chain;
use crate::supervisor::{Backoff, RestartPolicy};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControllerState {
    /// Not started yet: the apiserver has not been ready since the daemon started.
    Waiting,
    Running,
    /// Failed; waiting before the next run.
    Backoff,
    Stopped,
}

impl std::fmt::Display for ControllerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::Backoff => "backoff",
            Self::Stopped => "stopped",
        })
    }
}

/// One line of `kdist status`' CONTROLLERS section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControllerStatus {
    pub name: String,
    pub state: ControllerState,
    /// The controller's own verdict: its work is done and holds (RBAC applied, every
    /// enabled addon ready).
    pub ready: bool,
    pub restarts: u32,
    /// What it did last, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ControllerStatus {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            state: ControllerState::Waiting,
            ready: false,
            restarts: 0,
            message: None,
        }
    }
}

/// The controllers' states, in start order. Cheap to clone.
#[derive(Clone)]
pub struct Board {
    tx: Arc<watch::Sender<Vec<ControllerStatus>>>,
}

impl Board {
    fn new(names: &[&str]) -> Self {
        let (tx, _) = watch::channel(names.iter().map(|n| ControllerStatus::new(n)).collect());
        Self { tx: Arc::new(tx) }
    }

    pub fn snapshot(&self) -> Vec<ControllerStatus> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Vec<ControllerStatus>> {
        self.tx.subscribe()
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut ControllerStatus)) {
        self.tx.send_modify(|all| {
            if let Some(status) = all.iter_mut().find(|s| s.name == name) {
                f(status);
            }
        });
    }
}

/// What a running controller reports about itself.
#[derive(Clone)]
pub struct Reporter {
    name: &'static str,
    board: Board,
}

impl Reporter {
    /// Its work is done and holds.
    pub fn ready(&self, message: impl Into<String>) {
        let message = message.into();
        self.board.update(self.name, |s| {
            s.ready = true;
            s.message = Some(message);
        });
    }

    /// It is working towards ready (or has fallen back from it).
    pub fn progressing(&self, message: impl Into<String>) {
        let message = message.into();
        self.board.update(self.name, |s| {
            s.ready = false;
            s.message = Some(message);
        });
    }
}

/// The controllers of one daemon, run once the apiserver has been ready.
pub struct Controllers {
    list: Vec<Arc<dyn Controller>>,
    board: Board,
    policy: RestartPolicy,
}

impl Controllers {
    pub fn new(list: Vec<Arc<dyn Controller>>) -> Self {
        let names: Vec<&str> = list.iter().map(|c| c.name()).collect();
        Self {
            board: Board::new(&names),
            list,
            policy: RestartPolicy::default(),
        }
    }

    /// Overrides the restart policy (tests use short delays).
    pub fn with_policy(mut self, policy: RestartPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn board(&self) -> Board {
        self.board.clone()
    }

    /// Runs every controller until `shutdown`, those that need the apiserver once it
    /// has been ready; stops them in reverse start order.
    pub async fn run(self, ctx: Context, shutdown: CancellationToken) {
        let (now, later): (Vec<_>, Vec<_>) =
            self.list.into_iter().partition(|c| !c.needs_apiserver());
        let mut running = Vec::new();
        let spawn = |controller: Arc<dyn Controller>, running: &mut Vec<_>| {
            let stop = CancellationToken::new();
            let task = tokio::spawn(supervise(
                controller.clone(),
                ctx.clone(),
                self.board.clone(),
                self.policy,
                stop.clone(),
            ));
            running.push((controller.name(), stop, task));
        };
        for controller in now {
            spawn(controller, &mut running);
        }
        let mut apiserver = ctx.apiserver.clone();
        let started = tokio::select! {
            _ = shutdown.cancelled() => false,
            seen = apiserver.wait_for(|a| a.epoch > 0), if !later.is_empty() => seen.is_ok(),
        };
        if started {
            for controller in later {
                spawn(controller, &mut running);
            }
        }
        shutdown.cancelled().await;
        for (name, stop, task) in running.into_iter().rev() {
            stop.cancel();
            if let Err(e) = task.await {
                warn!(controller = name, "controller task failed: {e}");
            }
        }
    }
}

/// Runs one controller until `stop`, again after each failure once its backoff passed.
async fn supervise(
    controller: Arc<dyn Controller>,
    ctx: Context,
    board: Board,
    policy: RestartPolicy,
    stop: CancellationToken,
) {
    let name = controller.name();
    let reporter = Reporter {
        name,
        board: board.clone(),
    };
    let mut backoff = Backoff::new(policy);
    loop {
        board.update(name, |s| s.state = ControllerState::Running);
        info!(controller = name, "controller started");
        let started = Instant::now();
        let run = controller
            .clone()
            .run(ctx.clone(), reporter.clone(), stop.clone())
            .instrument(info_span!("controller", name));
        let result = run.await;
        if stop.is_cancelled() {
            board.update(name, |s| s.state = ControllerState::Stopped);
            info!(controller = name, "controller stopped");
            return;
        }
        let message = match result {
            Ok(()) => "returned before shutdown".to_string(),
            Err(e) => error_chain(&e),
        };
        let decision = backoff.on_exit(started.elapsed());
        warn!(controller = name, delay = ?decision.delay, "controller failed: {message}");
        board.update(name, |s| {
            s.state = ControllerState::Backoff;
            s.ready = false;
            s.restarts += 1;
            s.message = Some(message);
        });
        tokio::select! {
            _ = stop.cancelled() => {
                board.update(name, |s| s.state = ControllerState::Stopped);
                return;
            }
            _ = tokio::time::sleep(decision.delay) => {}
        }
    }
}
