//! One task per service: waits for its dependencies, runs the child, probes it, restarts
//! it with backoff, and obeys restart/stop commands from the supervisor.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::backoff::{Backoff, RestartPolicy};
use super::child::{self, Running};
use super::probe::Prober;
use super::service::{self, Origin, ServiceSpec};
use super::status::{Board, ServiceState};
use crate::config::DataDir;

/// Orders the supervisor gives a runner; the reply comes once it is carried out.
pub enum Order {
    Restart(oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
}

/// How often readiness is checked before and after the first success.
const PROBE_STARTING: Duration = Duration::from_millis(250);
const PROBE_READY: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive probe failures that turn a ready service unhealthy.
const UNHEALTHY_AFTER: u32 = 3;
/// Lines of a crashed run's output shown in status: its start (where usage errors are)
/// and its end (where crashes are).
const RUN_HEAD_LINES: usize = 5;
const RUN_TAIL_LINES: usize = 10;

pub struct Runner {
    pub spec: ServiceSpec,
    pub data: DataDir,
    pub board: Board,
    pub policy: RestartPolicy,
    pub orders: mpsc::Receiver<Order>,
}

/// What ended one run of the child.
enum RunEnd {
    /// How it ended, how long it ran, where its output starts in the log.
    Exited(String, Duration, u64),
    Restart(oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
}

impl Runner {
    pub async fn run(mut self) {
        let name = self.spec.name.clone();
        let mut backoff = Backoff::new(self.policy);
        let mut prober = Prober::new(self.spec.probe.clone(), PROBE_TIMEOUT);
        loop {
            if let Some(reply) = self.wait_for_dependencies().await {
                self.stopped(reply);
                return;
            }
            let end = match self.start() {
                Ok(running) => self.supervise(running, &mut prober).await,
                Err(message) => {
                    warn!(service = %name, "cannot start: {message}");
                    self.board.update(&name, |s| s.message = Some(message));
                    RunEnd::Exited("failed to start".into(), Duration::ZERO, u64::MAX)
                }
            };
            let _ = std::fs::remove_file(self.data.pidfile(&name));
            match end {
                RunEnd::Stop(reply) => {
                    self.stopped(reply);
                    return;
                }
                RunEnd::Restart(reply) => {
                    info!(service = %name, "restarting on request");
                    let _ = reply.send(());
                    backoff = Backoff::new(self.policy);
                }
                RunEnd::Exited(how, ran_for, log_start) => {
                    let decision = backoff.on_exit(ran_for);
                    let state = if decision.crashloop {
                        ServiceState::Crashloop
                    } else {
                        ServiceState::Backoff
                    };
                    warn!(service = %name, "exited ({how}) after {ran_for:?}; restarting in {:?}", decision.delay);
                    let tail = if decision.crashloop {
                        run_output(&self.data.log_file(&name), log_start)
                    } else {
                        Vec::new()
                    };
                    self.board.update(&name, |s| {
                        s.state = state;
                        s.pid = None;
                        s.started_at = None;
                        s.last_exit = Some(how);
                        s.log_tail = tail;
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(decision.delay) => {}
                        order = self.orders.recv() => match order {
                            Some(Order::Restart(reply)) => { let _ = reply.send(()); }
                            Some(Order::Stop(reply)) => { self.stopped(Some(reply)); return; }
                            None => { self.stopped(None); return; }
                        }
                    }
                    self.board.update(&name, |s| s.restarts += 1);
                }
            }
        }
    }

    fn stopped(&self, reply: impl Into<Option<oneshot::Sender<()>>>) {
        self.board.update(&self.spec.name, |s| {
            s.state = ServiceState::Stopped;
            s.pid = None;
            s.started_at = None;
        });
        info!(service = %self.spec.name, "stopped");
        if let Some(reply) = reply.into() {
            let _ = reply.send(());
        }
    }

    /// Blocks until every dependency is ready. Returns `Some` when told to stop meanwhile.
    async fn wait_for_dependencies(&mut self) -> Option<Option<oneshot::Sender<()>>> {
        if self.spec.after.is_empty() {
            return None;
        }
        let mut rx = self.board.subscribe();
        let after = self.spec.after.clone();
        self.board.update(&self.spec.name, |s| {
            s.state = ServiceState::Starting;
            s.message = Some(format!("waiting for {}", after.join(", ")));
        });
        loop {
            let ready = {
                let map = rx.borrow_and_update();
                after.iter().all(|d| map.get(d).is_some_and(|s| s.ready))
            };
            if ready {
                return None;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return Some(None) },
                order = self.orders.recv() => match order {
                    Some(Order::Restart(reply)) => { let _ = reply.send(()); }
                    Some(Order::Stop(reply)) => return Some(Some(reply)),
                    None => return Some(None),
                }
            }
        }
    }

    fn start(&self) -> Result<Running, String> {
        let spec = &self.spec;
        let argv = service::read_args(spec).map_err(|e| e.to_string())?;
        let (program, origin) =
            service::resolve_binary(&self.data, &spec.binary).map_err(|e| e.to_string())?;
        let running = child::spawn(
            &self.data,
            &spec.name,
            &program,
            &argv,
            &self.data.log_file(&spec.name),
        )
        .map_err(|e| format!("{e}: {}", e.source_text()))?;
        info!(service = %spec.name, pid = running.pid, program = %program.display(), "started");
        let origin = match origin {
            Origin::Components => "components",
            Origin::Path => "PATH (fallback)",
            Origin::Explicit => "explicit path",
        };
        self.board.update(&spec.name, |s| {
            s.state = ServiceState::Starting;
            s.pid = Some(running.pid);
            s.started_at = Some(SystemTime::now());
            s.message = None;
            s.program = Some(program.display().to_string());
            s.description = Some(spec.description.clone());
            s.origin = Some(origin.to_string());
        });
        Ok(running)
    }

    async fn supervise(&mut self, mut running: Running, prober: &mut Prober) -> RunEnd {
        let name = self.spec.name.clone();
        let started = Instant::now();
        let log_start = std::fs::metadata(self.data.log_file(&name))
            .map(|m| m.len())
            .unwrap_or(0);
        let mut was_ready = false;
        let mut failures = 0u32;
        loop {
            let interval = if was_ready {
                PROBE_READY
            } else {
                PROBE_STARTING
            };
            tokio::select! {
                status = running.child.wait() => {
                    let how = match status {
                        Ok(status) => status.to_string(),
                        Err(e) => format!("wait failed: {e}"),
                    };
                    // whatever the leader left in its group goes with it
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(running.pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    return RunEnd::Exited(how, started.elapsed(), log_start);
                }
                _ = tokio::time::sleep(interval) => {
                    match prober.check().await {
                        Ok(()) => {
                            failures = 0;
                            if !was_ready {
                                info!(service = %name, "ready after {:?}", started.elapsed());
                            }
                            was_ready = true;
                            self.board.update(&name, |s| {
                                s.state = ServiceState::Ready;
                                s.message = None;
                                s.log_tail.clear();
                            });
                        }
                        Err(reason) => {
                            failures += 1;
                            let unhealthy = was_ready && failures >= UNHEALTHY_AFTER;
                            if unhealthy {
                                warn!(service = %name, "unhealthy: {reason}");
                            }
                            self.board.update(&name, |s| {
                                if unhealthy {
                                    s.state = ServiceState::Unhealthy;
                                }
                                s.message = Some(reason);
                            });
                        }
                    }
                }
                order = self.orders.recv() => {
                    let grace = self.spec.stop_grace;
                    if let Err(e) = child::stop(&mut running, grace).await {
                        warn!(service = %name, "stopping: {e}");
                    }
                    return match order {
                        Some(Order::Restart(reply)) => RunEnd::Restart(reply),
                        Some(Order::Stop(reply)) => RunEnd::Stop(reply),
                        None => {
                            let (reply, _) = oneshot::channel();
                            RunEnd::Stop(reply)
                        }
                    };
                }
            }
        }
    }
}

trait SourceText {
    fn source_text(&self) -> String;
}

impl<E: std::error::Error> SourceText for E {
    fn source_text(&self) -> String {
        self.source().map(|s| s.to_string()).unwrap_or_default()
    }
}

/// What one run of a child wrote to its log from `start` on: the first and last lines,
/// joined by "..." when there is more in between.
fn run_output(path: &Path, start: u64) -> Vec<String> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    // rotated meanwhile, or nothing ran: fall back to the end of the file
    let start = if start > len {
        len.saturating_sub(16 * 1024)
    } else {
        start
    };
    let start = start.max(len.saturating_sub(256 * 1024));
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= RUN_HEAD_LINES + RUN_TAIL_LINES {
        return lines.iter().map(|l| l.to_string()).collect();
    }
    let mut out: Vec<String> = lines[..RUN_HEAD_LINES]
        .iter()
        .map(|l| l.to_string())
        .collect();
    out.push("...".into());
    out.extend(
        lines[lines.len() - RUN_TAIL_LINES..]
            .iter()
            .map(|l| l.to_string()),
    );
    out
}

/// The last `lines` lines of a log file, reading at most its last 16 KiB.
pub fn log_tail(path: &Path, lines: usize) -> Vec<String> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(16 * 1024);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if file.read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let skip = all.len().saturating_sub(lines);
    all[skip..].iter().map(|l| l.to_string()).collect()
}
