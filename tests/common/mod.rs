//! Helpers shared by the integration tests: a temporary data dir with the real `kdist`
//! binary pointed at it, free ports, polling, and a guard that stops everything the
//! test started (by `kdist stop`, then by pid for marked leftovers) and removes the dir.

#![allow(dead_code, clippy::unwrap_used)]

pub mod netns;
pub mod oci;
pub mod outside;
pub mod release;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kdist::config::DataDir;

pub const KDIST: &str = env!("CARGO_BIN_EXE_kdist");

/// `n` distinct free TCP ports on 127.0.0.1 (held together while chosen, so distinct).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// Polls `check` every `every` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, every: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// `wait_until` for async tests: polls `check` every `every` without blocking a runtime
/// worker.
pub async fn wait_until_async(
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// True while a process with this pid exists (a zombie counts as gone).
pub fn alive(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Stdout and stderr of a finished command, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The config that keeps `kdist start` from downloading EKS-D releases.
pub const OFFLINE: &str = "components:\n  auto_install: false\n";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The egress guard's iptables chain of the node whose data dir is `root`.
pub fn egress_chain(root: &Path) -> String {
    kdist::node::egress::chain(&DataDir::new(root))
}

/// One node's data dir in a fresh temp directory. Dropping it stops the daemon and
/// every process marked for this data dir, then removes the directory.
pub struct Node {
    pub root: PathBuf,
}

impl Node {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        // short: the control socket path must fit in sun_path (108 bytes)
        let root = std::env::temp_dir().join(format!("kd-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("create temp data dir");
        std::fs::write(root.join("config.yaml"), OFFLINE).expect("write config.yaml");
        Self { root }
    }

    pub fn data(&self) -> DataDir {
        DataDir::new(&self.root)
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.root.join(relative)
    }

    pub fn certs(&self, relative: &str) -> PathBuf {
        self.root.join("certs").join(relative)
    }

    /// Writes `config.yaml`.
    /// Writes `config.yaml`. Unless `yaml` has a `components:` section, component
    /// auto-install is turned off: tests never reach for the network.
    pub fn write_config(&self, yaml: &str) {
        let mut text = yaml.to_string();
        if !text.lines().any(|l| l.starts_with("components:")) {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(OFFLINE);
        }
        std::fs::write(self.root.join("config.yaml"), text).expect("write config.yaml");
    }

    /// A `kdist` command with `--data-dir` set to this node.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(KDIST);
        command
            .arg("--data-dir")
            .arg(&self.root)
            .args(args)
            .env_remove("KDIST_DATA_DIR");
        command
    }

    /// Runs `kdist <args>` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run kdist")
    }

    /// Runs `kdist <args>` and panics with its output unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> Output {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "kdist {args:?} failed: {}",
            describe(&output)
        );
        output
    }

    /// `kdist start`, panicking with the daemon log when it does not become ready.
    pub fn start(&self) {
        let output = self.run(&["start", "--timeout", "90"]);
        if !output.status.success() {
            let log = std::fs::read_to_string(self.root.join("logs/kdist.log")).unwrap_or_default();
            panic!(
                "kdist start failed: {}\n--- kdist.log\n{log}",
                describe(&output)
            );
        }
    }

    /// The daemon's status report.
    pub fn status(&self) -> serde_json::Value {
        let output = self.ok(&["status", "-o", "json"]);
        serde_json::from_slice(&output.stdout).expect("status json")
    }

    /// The pid of a service, when it runs.
    pub fn service_pid(&self, service: &str) -> Option<i64> {
        let status = self.status();
        status["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == service)?["pid"]
            .as_i64()
    }

    /// Runs `kdist <args>` and returns its output, whatever the exit status.
    pub fn kdist(&self, args: &[&str]) -> Output {
        self.run(args)
    }

    /// Runs `kdist <args>`, panicking (with the daemon log) unless it succeeds; stdout.
    pub fn kdist_ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "kdist {args:?} failed: {}\n--- kdist.log\n{}",
            describe(&output),
            self.log("kdist")
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The status report, or None when no daemon answers.
    pub fn try_status(&self) -> Option<serde_json::Value> {
        let output = self.run(&["status", "-o", "json"]);
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    /// The status entry of `service`, or None when no daemon answers.
    pub fn service(&self, service: &str) -> Option<serde_json::Value> {
        self.try_status()?["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == service)
            .cloned()
    }

    /// A service's log file as it is now.
    pub fn log(&self, service: &str) -> String {
        std::fs::read_to_string(self.data().log_file(service)).unwrap_or_default()
    }

    /// Writes a config.yaml that runs the etcd datastore (a child) on two free ports (plus `extra` YAML) and
    /// returns the client port.
    pub fn config_with_etcd_ports(&self, extra: &str) -> u16 {
        let ports = free_ports(2);
        self.write_config(&format!(
            "datastore: etcd\netcd:\n  client_port: {}\n  peer_port: {}\n{extra}",
            ports[0], ports[1]
        ));
        ports[0]
    }

    /// An `etcdctl` (API v3) command against this node's embedded datastore socket; the
    /// caller adds the arguments.
    pub fn etcdctl_unix(&self) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3").arg(format!(
            "--endpoints=unix://{}",
            self.data().datastore_socket().display()
        ));
        cmd
    }

    /// `etcdctl` against this node's etcd on `port` over mTLS, as the apiserver's etcd
    /// client.
    pub fn etcdctl(&self, port: u16, args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=https://127.0.0.1:{port}"))
            .arg(format!("--cacert={}", self.certs("etcd/ca.crt").display()))
            .arg(format!(
                "--cert={}",
                self.certs("apiserver-etcd-client.crt").display()
            ))
            .arg(format!(
                "--key={}",
                self.certs("apiserver-etcd-client.key").display()
            ))
            .args(args)
            .output()
            .expect("run etcdctl")
    }

    fn kill_leftovers(&self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        for pid in kdist::supervisor::find_marked(&self.data()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // the daemon itself carries no marker: its pidfile names it
        if let Ok(text) = std::fs::read_to_string(self.root.join("run/kdist.pid"))
            && let Ok(pid) = text.trim().parse::<i32>()
            && is_our_daemon(pid, &self.root)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Whether `pid` is a kdist daemon for `root` (its command line names the data dir).
fn is_our_daemon(pid: i32, root: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let root = root.as_os_str().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == root)
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.root.join("run/kdist.sock").exists() {
            let _ = self.command(&["stop", "--timeout", "30"]).output();
        }
        self.kill_leftovers();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A data directory under /tmp (short: unix socket paths are limited to 108 bytes).
pub struct TempData {
    pub root: PathBuf,
}

impl TempData {
    pub fn new(tag: &str) -> Self {
        let root = PathBuf::from(format!("/tmp/kdt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("config.yaml"), OFFLINE).unwrap();
        Self { root }
    }

    /// Writes `config.yaml` text into the data dir and returns its path.
    pub fn config(&self, text: &str) -> PathBuf {
        let path = self.root.join("seed-config.yaml");
        let mut text = text.to_string();
        if !text.lines().any(|l| l.starts_with("components:")) {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(OFFLINE);
        }
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Runs `kdist --data-dir <root> args...`.
    pub fn kdist(&self, args: &[&str]) -> Output {
        self.kdist_env(args, &[])
    }

    pub fn kdist_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = Command::new(KDIST);
        command.arg("--data-dir").arg(&self.root).args(args);
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().unwrap()
    }

    /// `kdist status -o json` as a JSON value.
    pub fn status(&self) -> serde_json::Value {
        let out = self.kdist(&["status", "-o", "json"]);
        assert!(out.status.success(), "status: {}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn service<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
        status["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no service {name} in {status:#}"))
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

impl Drop for TempData {
    fn drop(&mut self) {
        let _ = Command::new(KDIST)
            .arg("--data-dir")
            .arg(&self.root)
            .args(["stop", "--timeout", "60"])
            .output();
        // only a node that ran has host changes to undo
        if self.root.join("node/host-state.json").exists() {
            let _ = Command::new(KDIST)
                .arg("--data-dir")
                .arg(&self.root)
                .args(["reset"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// stdout and stderr of a finished command, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `check` every 100 ms until it returns true or `timeout` passes.
pub fn poll_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}

/// Whether a program exists on PATH.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

pub fn exists(path: &Path) -> bool {
    path.exists()
}

pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}

/// A child in its own process group, SIGKILLed (group-wide) when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        cmd.process_group(0).stdin(Stdio::null());
        let child = cmd.spawn().expect("spawn child");
        Proc { child }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// kill -9 of the whole group, then reap.
    pub fn kill9(&mut self) {
        let pid = self.pid();
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.child.wait().expect("wait")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

fn tcp_up(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// `kdist datastore serve` on a unix socket and a TCP port of a temp dir.
pub struct Datastore {
    pub proc: Proc,
    pub db: PathBuf,
    pub socket: PathBuf,
    pub port: u16,
}

impl Datastore {
    pub fn start(dir: &Path) -> Datastore {
        Self::start_with(dir, &[])
    }

    pub fn start_with(dir: &Path, extra: &[&str]) -> Datastore {
        let db = dir.join("state.db");
        let socket = dir.join("ds.sock");
        let port = free_port();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("datastore.log"))
            .expect("log file");
        let proc = Proc::spawn(
            Command::new(KDIST)
                .args(["datastore", "serve", "--db"])
                .arg(&db)
                .arg("--listen")
                .arg(format!("unix://{}", socket.display()))
                .arg("--listen")
                .arg(format!("http://127.0.0.1:{port}"))
                .args(extra)
                .env("KDIST_DATA_DIR", dir.join("data"))
                .stdout(log.try_clone().expect("log"))
                .stderr(log),
        );
        let mut ds = Datastore {
            proc,
            db,
            socket,
            port,
        };
        let up = poll_until(Duration::from_secs(20), || {
            tcp_up(port) && std::os::unix::net::UnixStream::connect(&ds.socket).is_ok()
        });
        if !up {
            let log = std::fs::read_to_string(dir.join("datastore.log")).unwrap_or_default();
            ds.proc.kill9();
            panic!("kdist datastore did not come up:\n{log}");
        }
        ds
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn unix_endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

/// A real etcd (Debian's /usr/bin/etcd) on free 127.0.0.1 ports.
pub struct Etcd {
    pub proc: Proc,
    pub port: u16,
    pub peer_port: u16,
}

pub fn etcd_available() -> bool {
    Path::new("/usr/bin/etcd").exists()
}

impl Etcd {
    pub fn start(dir: &Path) -> Etcd {
        Self::start_with(dir, &[])
    }

    /// etcd with extra flags, on free ports.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Etcd {
        Self::start_at(dir, free_port(), free_port(), extra)
    }

    /// etcd on the given client and peer ports (the same ones again to restart a member
    /// on its data dir), logging to `<dir>/etcd.log` (appended).
    pub fn start_at(dir: &Path, port: u16, peer: u16, extra: &[&str]) -> Etcd {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("etcd.log"))
            .expect("etcd log");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let client_url = format!("http://127.0.0.1:{port}");
        let proc = Proc::spawn(
            Command::new("/usr/bin/etcd")
                .arg("--name=default")
                .arg(format!("--data-dir={}", dir.join("etcd").display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=default={peer_url}"))
                .args(extra)
                .stdout(log.try_clone().expect("log"))
                .stderr(log),
        );
        let mut etcd = Etcd {
            proc,
            port,
            peer_port: peer,
        };
        let up = poll_until(Duration::from_secs(30), || {
            tcp_up(port)
                && Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .arg(format!("--endpoints={client_url}"))
                    .args(["endpoint", "health"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
        });
        if !up {
            etcd.proc.kill9();
            panic!("etcd did not come up");
        }
        etcd
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Runs `etcdctl` (API v3) against `endpoint`; returns (success, stdout, stderr).
pub fn etcdctl(endpoint: &str, args: &[&str]) -> (bool, String, String) {
    etcdctl_stdin(endpoint, args, None)
}

pub fn etcdctl_stdin(endpoint: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run etcdctl");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("etcdctl output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the kdist binary; returns (success, stdout, stderr).
pub fn kdist(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(KDIST).args(args).output().expect("run kdist");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The lock every test that runs a whole node with real Kubernetes binaries holds: such
/// nodes share host resources no namespace separates (port 6443 on the host's loopback
/// for single nodes, /var/log/pods, the egress guards' view of bridged pod traffic,
/// cgroup roots), so they run one at a time on a host, across test threads and
/// processes alike (`cargo test -- --ignored` with any thread count).
pub fn exclusive_host() -> nix::fcntl::Flock<std::fs::File> {
    let path = std::env::temp_dir().join("kdist-real-node-tests.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap();
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap_or_else(|e| panic!("locking {}: {e}", path.display()))
}
