//! One task per service: waits for its dependencies, runs the child, probes it, restarts
//! it with backoff, and obeys restart/stop commands from the supervisor.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::backoff::{Backoff, RestartPolicy};
use super::builtin::Builtins;
use super::child::{self, Running};
use super::pageout;
use super::probe::Prober;
use super::service::{self, ServiceSpec};
use super::status::{Board, ServiceState};
use crate::components::Origin;
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
    pub builtins: Builtins,
}

/// One run of a service: a child process, or a builtin's task inside the daemon.
enum Proc {
    Child(Running),
    Task {
        handle: tokio::task::JoinHandle<Result<(), super::builtin::BuiltinError>>,
        token: tokio_util::sync::CancellationToken,
    },
}

impl Proc {
    /// Waits for the run to end on its own; says how it ended.
    async fn wait(&mut self) -> String {
        match self {
            Proc::Child(running) => {
                let how = match running.child.wait().await {
                    Ok(status) => status.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                };
                // whatever the leader left in its group goes with it
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(running.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                how
            }
            Proc::Task { handle, .. } => match handle.await {
                Ok(Ok(())) => "returned".to_string(),
                Ok(Err(e)) => format!("failed: {}", crate::report::error_chain(e.as_ref())),
                Err(e) => format!("panicked: {e}"),
            },
        }
    }

    async fn stop(&mut self, grace: Duration) -> Result<(), String> {
        match self {
            Proc::Child(running) => child::stop(running, grace)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Proc::Task { handle, token } => {
                token.cancel();
                match tokio::time::timeout(grace, &mut *handle).await {
                    Ok(_) => Ok(()),
                    Err(_) => {
                        handle.abort();
                        Err(format!("did not stop within {grace:?}; aborted"))
                    }
                }
            }
        }
    }
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
            // taken before the spawn: a child that fails at once writes before we look
            let log_start = std::fs::metadata(self.data.log_file(&name))
                .map(|m| m.len())
                .unwrap_or(0);
            let end = match self.start() {
                Ok(running) => self.supervise(running, &mut prober, log_start).await,
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

    fn start(&self) -> Result<Proc, String> {
        let spec = &self.spec;
        let Some(binary) = &spec.binary else {
            let builtin = self.builtins.get(&spec.name).ok_or_else(|| {
                format!("no builtin `{}` is registered in this daemon", spec.name)
            })?;
            let token = tokio_util::sync::CancellationToken::new();
            let handle = tokio::spawn(builtin.run(token.clone()));
            info!(service = %spec.name, "started inside the daemon");
            self.board.update(&spec.name, |s| {
                s.state = ServiceState::Starting;
                s.pid = None;
                s.started_at = Some(SystemTime::now());
                s.message = None;
                s.program = Some("(inside the kdist daemon)".into());
                s.origin = Some("builtin".into());
                s.description = Some(spec.description.clone());
            });
            return Ok(Proc::Task { handle, token });
        };
        let argv = service::read_args(spec).map_err(|e| e.to_string())?;
        let (program, origin) =
            service::resolve_binary_for(&self.data, spec, binary).map_err(|e| e.to_string())?;
        let running = child::spawn(
            &self.data,
            &spec.name,
            &program,
            &argv,
            &spec.env,
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
            s.origin = Some(origin.to_string());
            s.description = Some(spec.description.clone());
        });
        Ok(Proc::Child(running))
    }

    async fn supervise(
        &mut self,
        mut running: Proc,
        prober: &mut Prober,
        log_start: u64,
    ) -> RunEnd {
        let name = self.spec.name.clone();
        let started = Instant::now();
        let mut was_ready = false;
        let mut failures = 0u32;
        // aborted with this run: a later run gets its own
        let mut _page_out = None;
        loop {
            let interval = if was_ready {
                PROBE_READY
            } else {
                PROBE_STARTING
            };
            tokio::select! {
                how = running.wait() => {
                    return RunEnd::Exited(how, started.elapsed(), log_start);
                }
                _ = tokio::time::sleep(interval) => {
                    match prober.check().await {
                        Ok(()) => {
                            failures = 0;
                            if !was_ready {
                                info!(service = %name, "ready after {:?}", started.elapsed());
                                if let (Proc::Child(child), Some(after)) =
                                    (&running, self.spec.page_out_after)
                                {
                                    _page_out = Some(self.schedule_page_out(child.pid, after));
                                }
                            }
                            was_ready = true;
                            self.board.update(&name, |s| {
                                s.state = ServiceState::Ready;
                                s.message = None;
                                s.log_tail.clear();
                            });
                        }
                        Err(error) => {
                            let reason = crate::report::error_chain(&error);
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
                    if let Err(e) = running.stop(grace).await {
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

impl Runner {
    /// Pages out the child's program pages `after` from now (see [`pageout`]).
    fn schedule_page_out(
        &self,
        pid: i32,
        after: Duration,
    ) -> tokio_util::task::AbortOnDropHandle<()> {
        let (data, name) = (self.data.clone(), self.spec.name.clone());
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let service = name.clone();
            let result = tokio::task::spawn_blocking(move || {
                pageout::page_out_program(pid, &data, &service)
            })
            .await;
            match result {
                Ok(Ok(bytes)) => {
                    info!(service = %name, pid, "paged out {} MiB of program pages", bytes >> 20)
                }
                Ok(Err(e)) => warn!(service = %name, pid, "cannot page out program pages: {e}"),
                Err(e) => warn!(service = %name, "page-out task failed: {e}"),
            }
        }))
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::Arc;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::supervisor::builtin::{Builtin, BuiltinFuture};
    use crate::supervisor::service::Probe;

    struct Fixture {
        root: PathBuf,
        data: DataDir,
        board: Board,
    }

    impl Fixture {
        fn new(tag: &str, names: &[&str]) -> Self {
            let root =
                std::env::temp_dir().join(format!("kdist-runner-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            let data = DataDir::new(&root);
            data.ensure().unwrap();
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            Self {
                root,
                data,
                board: Board::new(&names),
            }
        }

        fn spec(&self, name: &str, binary: Option<&str>, args: &str, probe: Probe) -> ServiceSpec {
            let args_file = self.data.args_file(name);
            std::fs::write(&args_file, args).unwrap();
            ServiceSpec {
                name: name.into(),
                description: String::new(),
                binary: binary.map(str::to_string),
                release: None,
                after: Vec::new(),
                stop_grace: Duration::from_secs(2),
                probe,
                args_file,
                vars: BTreeMap::new(),
                env: BTreeMap::new(),
                extra_args: Vec::new(),
                page_out_after: None,
            }
        }

        fn runner(&self, spec: ServiceSpec, builtins: Builtins) -> mpsc::Sender<Order> {
            let (tx, rx) = mpsc::channel(4);
            let runner = Runner {
                spec,
                data: self.data.clone(),
                board: self.board.clone(),
                policy: RestartPolicy {
                    initial: Duration::from_millis(50),
                    max: Duration::from_millis(200),
                    stable_after: Duration::from_secs(60),
                    fast_run: Duration::from_secs(5),
                    crashloop_after: 3,
                },
                orders: rx,
                builtins,
            };
            tokio::spawn(runner.run());
            tx
        }

        async fn wait_for(
            &self,
            name: &str,
            what: impl Fn(&crate::supervisor::ServiceStatus) -> bool,
        ) -> crate::supervisor::ServiceStatus {
            let mut rx = self.board.subscribe();
            let found = tokio::time::timeout(Duration::from_secs(10), async {
                rx.wait_for(|m| m.get(name).is_some_and(&what))
                    .await
                    .map(|m| m[name].clone())
            })
            .await;
            match found {
                Ok(Ok(status)) => status,
                _ => panic!("{name}: condition not met: {:?}", self.board.snapshot()),
            }
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    fn command_probe(ok: bool) -> Probe {
        Probe::Command {
            argv: vec![if ok { "true" } else { "false" }.into()],
        }
    }

    async fn stop(tx: &mpsc::Sender<Order>) {
        let (reply, done) = oneshot::channel();
        tx.send(Order::Stop(reply)).await.unwrap();
        done.await.unwrap();
    }

    /// A script that execs `sleep 300`: a long-running child without positional args
    /// in its args file (args files hold flags only).
    fn sleeper(f: &Fixture) -> String {
        let path = f.data.root().join("sleeper.sh");
        if !path.exists() {
            std::fs::write(&path, "#!/bin/sh\nexec sleep 300\n").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        path.display().to_string()
    }

    fn alive(pid: i32) -> bool {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
    }

    #[tokio::test]
    async fn sleep_becomes_ready_and_stops() {
        let f = Fixture::new("sleep", &["s"]);
        let tx = f.runner(
            f.spec("s", Some(&sleeper(&f)), "", command_probe(true)),
            Builtins::new(),
        );
        let s = f.wait_for("s", |s| s.ready).await;
        let pid = s.pid.unwrap();
        assert!(alive(pid));
        assert_eq!(s.state, ServiceState::Ready);
        assert!(f.data.pidfile("s").exists());
        stop(&tx).await;
        let gone = tokio::time::timeout(Duration::from_secs(5), async {
            while alive(pid) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert!(gone.await.is_ok(), "child {pid} survived stop");
        assert!(!f.data.pidfile("s").exists());
        assert_eq!(f.board.snapshot()[0].state, ServiceState::Stopped);
    }

    #[tokio::test]
    async fn false_goes_into_crashloop_and_keeps_retrying() {
        let f = Fixture::new("false", &["f"]);
        let tx = f.runner(
            f.spec("f", Some("false"), "", command_probe(true)),
            Builtins::new(),
        );
        let s = f
            .wait_for("f", |s| s.state == ServiceState::Crashloop)
            .await;
        assert_eq!(s.last_exit.as_deref(), Some("exit status: 1"));
        assert!(!s.ready);
        let later = f.wait_for("f", |s| s.restarts >= 4).await;
        assert!(matches!(
            later.state,
            ServiceState::Crashloop | ServiceState::Starting
        ));
        stop(&tx).await;
        assert_eq!(f.board.snapshot()[0].state, ServiceState::Stopped);
    }

    #[tokio::test]
    async fn dependents_wait_for_readiness() {
        let f = Fixture::new("deps", &["a", "b"]);
        let flag = f.data.root().join("a-ready");
        let probe = Probe::Command {
            argv: vec!["test".into(), "-e".into(), flag.display().to_string()],
        };
        let ta = f.runner(f.spec("a", Some(&sleeper(&f)), "", probe), Builtins::new());
        let mut b = f.spec("b", Some(&sleeper(&f)), "", command_probe(true));
        b.after = vec!["a".into()];
        let tb = f.runner(b, Builtins::new());
        // a runs and its probe has failed; b has seen that and waits
        let a = f
            .wait_for("a", |s| s.pid.is_some() && s.message.is_some())
            .await;
        assert_eq!(a.state, ServiceState::Starting);
        let b = f
            .wait_for("b", |s| s.message.as_deref() == Some("waiting for a"))
            .await;
        assert_eq!(b.pid, None, "b started before a was ready");
        // a can be ready only from here on: b's start must come later
        let flagged = SystemTime::now();
        std::fs::write(&flag, "").unwrap();
        f.wait_for("a", |s| s.ready).await;
        let b = f.wait_for("b", |s| s.ready).await;
        assert!(
            b.started_at.is_some_and(|t| t >= flagged),
            "b started before a could be ready: {b:?}"
        );
        stop(&tb).await;
        stop(&ta).await;
    }

    #[tokio::test]
    async fn restart_order_replaces_the_process() {
        let f = Fixture::new("restart", &["r"]);
        let tx = f.runner(
            f.spec("r", Some(&sleeper(&f)), "", command_probe(true)),
            Builtins::new(),
        );
        let first = f.wait_for("r", |s| s.ready).await.pid.unwrap();
        let (reply, done) = oneshot::channel();
        tx.send(Order::Restart(reply)).await.unwrap();
        done.await.unwrap();
        let second = f
            .wait_for("r", |s| s.ready && s.pid.is_some_and(|p| p != first))
            .await;
        assert!(!alive(first));
        assert_eq!(second.restarts, 0, "a requested restart is not a failure");
        stop(&tx).await;
    }

    #[tokio::test]
    async fn failing_probe_after_ready_is_unhealthy_then_ready_again() {
        let f = Fixture::new("unhealthy", &["u"]);
        let flag = f.data.root().join("healthy");
        std::fs::write(&flag, "").unwrap();
        let probe = Probe::Command {
            argv: vec!["test".into(), "-e".into(), flag.display().to_string()],
        };
        let tx = f.runner(f.spec("u", Some(&sleeper(&f)), "", probe), Builtins::new());
        let ready = f.wait_for("u", |s| s.ready).await;
        std::fs::remove_file(&flag).unwrap();
        let sick = f
            .wait_for("u", |s| s.state == ServiceState::Unhealthy)
            .await;
        assert_eq!(sick.pid, ready.pid, "an unhealthy child is not restarted");
        assert!(!sick.ready);
        std::fs::write(&flag, "").unwrap();
        f.wait_for("u", |s| s.ready).await;
        stop(&tx).await;
    }

    struct SocketService {
        path: PathBuf,
    }

    impl Builtin for SocketService {
        fn run(&self, shutdown: CancellationToken) -> BuiltinFuture {
            let path = self.path.clone();
            Box::pin(async move {
                let _ = std::fs::remove_file(&path);
                let listener = tokio::net::UnixListener::bind(&path)?;
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = listener.accept() => {}
                    }
                }
            })
        }
    }

    #[tokio::test]
    async fn builtin_is_supervised_like_a_child() {
        let f = Fixture::new("builtin", &["b"]);
        let socket = f.data.run_dir().join("b.sock");
        let mut spec = f.spec(
            "b",
            None,
            "",
            Probe::Unix {
                path: socket.display().to_string(),
            },
        );
        spec.binary = None;
        let mut builtins = Builtins::new();
        builtins.insert(
            "b".into(),
            Arc::new(SocketService {
                path: socket.clone(),
            }),
        );
        let tx = f.runner(spec, builtins);
        let s = f.wait_for("b", |s| s.ready).await;
        assert_eq!(s.origin.as_deref(), Some("builtin"));
        assert_eq!(s.pid, None);
        stop(&tx).await;
        assert_eq!(f.board.snapshot()[0].state, ServiceState::Stopped);
    }
}
