//! The set of runners of a daemon: one task per planned service, reachable by name.
//! Fixed for the daemon's life except where a datastore migration stops services and
//! starts others.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::backoff::RestartPolicy;
use super::builtin::Builtins;
use super::runner::{Order, Runner};
use super::service::ServiceSpec;
use super::status::Board;
use crate::config::DataDir;

pub(crate) type SharedFleet = Arc<Mutex<Fleet>>;

pub(crate) struct Fleet {
    /// The plan, in dependency order: what runs, and the stop order (reversed).
    pub specs: Vec<ServiceSpec>,
    pub board: Board,
    pub data: DataDir,
    policy: RestartPolicy,
    builtins: Builtins,
    orders: BTreeMap<String, mpsc::Sender<Order>>,
    tasks: BTreeMap<String, JoinHandle<()>>,
    /// Set by `stop_all`: the daemon is stopping, nothing starts any more (a migration
    /// that ends meanwhile must not leave children behind).
    closed: bool,
}

impl Fleet {
    /// Starts a runner for each of `specs`.
    pub fn start(
        specs: Vec<ServiceSpec>,
        board: Board,
        data: DataDir,
        policy: RestartPolicy,
        builtins: Builtins,
    ) -> Self {
        let mut fleet = Self {
            specs: specs.clone(),
            board,
            data,
            policy,
            builtins,
            orders: BTreeMap::new(),
            tasks: BTreeMap::new(),
            closed: false,
        };
        for spec in specs {
            fleet.spawn(spec);
        }
        fleet
    }

    /// Starts a runner for `spec`; its board entry must exist.
    pub fn spawn(&mut self, spec: ServiceSpec) {
        if self.closed {
            return;
        }
        let (tx, rx) = mpsc::channel(4);
        let name = spec.name.clone();
        let runner = Runner {
            spec,
            data: self.data.clone(),
            board: self.board.clone(),
            policy: self.policy,
            orders: rx,
            builtins: self.builtins.clone(),
        };
        self.orders.insert(name.clone(), tx);
        self.tasks.insert(name, tokio::spawn(runner.run()));
    }

    /// The order channel of a running service.
    pub fn sender(&self, name: &str) -> Option<mpsc::Sender<Order>> {
        self.orders.get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.orders.keys().cloned().collect()
    }

    /// Takes the runner of `name` out of the fleet, to be stopped once the lock is
    /// released (a stop waits up to the service's grace period); None when it was not
    /// running.
    pub fn take(&mut self, name: &str) -> Option<Stopping> {
        let orders = self.orders.remove(name)?;
        Some(Stopping {
            orders,
            task: self.tasks.remove(name),
        })
    }

    /// Closes the fleet (nothing starts any more) and takes every runner out, in stop
    /// order: reverse dependency order, then anything started outside the plan (a
    /// migration target being set up).
    fn close(&mut self) -> Vec<Stopping> {
        self.closed = true;
        let mut names: Vec<String> = self.specs.iter().rev().map(|s| s.name.clone()).collect();
        names.extend(self.names());
        names.iter().filter_map(|name| self.take(name)).collect()
    }
}

/// A runner taken out of the fleet, still running until [`Stopping::stop`].
pub(crate) struct Stopping {
    orders: mpsc::Sender<Order>,
    task: Option<JoinHandle<()>>,
}

impl Stopping {
    /// Stops the service and waits for its runner to end.
    pub async fn stop(self) {
        let (reply, done) = oneshot::channel();
        if self.orders.send(Order::Stop(reply)).await.is_ok() {
            let _ = done.await;
        }
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}

/// Stops `names` one after the other, in that order, without holding the fleet's lock
/// while they stop: restarts and status requests go on meanwhile. Returns whether each
/// was running.
pub(crate) async fn stop(fleet: &SharedFleet, names: &[String]) -> Vec<bool> {
    let taken: Vec<Option<Stopping>> = {
        let mut fleet = fleet.lock().await;
        names.iter().map(|name| fleet.take(name)).collect()
    };
    let mut stopped = Vec::with_capacity(taken.len());
    for runner in taken {
        stopped.push(runner.is_some());
        if let Some(runner) = runner {
            runner.stop().await;
        }
    }
    stopped
}

/// Stops every service in reverse dependency order; nothing starts afterwards.
pub(crate) async fn stop_all(fleet: &SharedFleet) {
    let taken = fleet.lock().await.close();
    for runner in taken {
        runner.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::supervisor::service::Probe;
    use crate::supervisor::status::ServiceState;

    fn spec(data: &DataDir, name: &str, script: &str, grace: Duration) -> ServiceSpec {
        let binary = data.root().join(format!("{name}.sh"));
        std::fs::write(&binary, format!("#!/bin/sh\n{script}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let args_file = data.args_file(name);
        std::fs::write(&args_file, "").unwrap();
        ServiceSpec {
            name: name.into(),
            description: String::new(),
            binary: Some(binary.display().to_string()),
            release: None,
            after: Vec::new(),
            stop_grace: grace,
            probe: Probe::Command {
                argv: vec!["true".into()],
            },
            args_file,
            vars: BTreeMap::new(),
            env: BTreeMap::new(),
            extra_args: Vec::new(),
            page_out_after: None,
        }
    }

    #[tokio::test]
    async fn a_restart_completes_while_another_service_is_stopping_slowly() {
        let root = tempfile::tempdir().unwrap();
        let data = DataDir::new(root.path());
        data.ensure().unwrap();
        // "slow" ignores SIGTERM: its stop lasts the whole grace period
        let grace = Duration::from_secs(8);
        let specs = vec![
            spec(&data, "slow", "trap '' TERM\nexec sleep 300", grace),
            spec(&data, "quick", "exec sleep 300", Duration::from_secs(2)),
        ];
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let board = Board::new(&names);
        let policy = RestartPolicy {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
            stable_after: Duration::from_secs(60),
            fast_run: Duration::from_secs(5),
            crashloop_after: 3,
        };
        let fleet: SharedFleet = Arc::new(Mutex::new(Fleet::start(
            specs,
            board.clone(),
            data.clone(),
            policy,
            Builtins::new(),
        )));
        let mut rx = board.subscribe();
        let ready = tokio::time::timeout(
            Duration::from_secs(20),
            rx.wait_for(|m| m.values().all(|s| s.state == ServiceState::Ready)),
        )
        .await;
        assert!(ready.is_ok_and(|r| r.is_ok()), "{:?}", board.snapshot());

        let stopping = {
            let fleet = fleet.clone();
            tokio::spawn(async move { stop(&fleet, &["slow".to_string()]).await })
        };
        // the slow one is out of the fleet: its stop has begun
        let taken = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if fleet.lock().await.sender("slow").is_none() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(taken.is_ok(), "the stop never began");

        // what the control API does for `kdist restart quick`
        let restarted = tokio::time::timeout(Duration::from_secs(10), async {
            let tx = fleet.lock().await.sender("quick").unwrap();
            let (reply, done) = oneshot::channel();
            tx.send(Order::Restart(reply)).await.unwrap();
            done.await.unwrap();
        })
        .await;
        assert!(
            restarted.is_ok(),
            "the restart waited for another service's stop"
        );
        assert!(
            !stopping.is_finished(),
            "the restart finished only after the slow stop (lock held across it)"
        );

        stop_all(&fleet).await;
        assert_eq!(stopping.await.unwrap(), [true]);
        assert!(crate::node::find_marked(&data).is_empty());
    }
}
