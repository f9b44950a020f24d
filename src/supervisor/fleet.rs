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

    /// Stops one service and ends its runner; false when it was not running.
    pub async fn stop(&mut self, name: &str) -> bool {
        let Some(tx) = self.orders.remove(name) else {
            return false;
        };
        let (reply, done) = oneshot::channel();
        if tx.send(Order::Stop(reply)).await.is_ok() {
            let _ = done.await;
        }
        if let Some(task) = self.tasks.remove(name) {
            let _ = task.await;
        }
        true
    }

    /// Stops every service in reverse dependency order.
    pub async fn stop_all(&mut self) {
        self.closed = true;
        let names: Vec<String> = self.specs.iter().rev().map(|s| s.name.clone()).collect();
        for name in names {
            self.stop(&name).await;
        }
        // anything started outside the plan (a migration target being set up)
        for name in self.names() {
            self.stop(&name).await;
        }
    }
}
