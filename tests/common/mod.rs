//! Helpers shared by the integration tests: a temp node (data dir + free ports), running
//! the real `kdist` binary, waiting, and cleanup that stops only what the test started.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kdist::config::DataDir;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A free TCP port on 127.0.0.1 (released again; fine for tests that bind right away).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
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

/// One kdist node of a test: its own data dir under /tmp and its own etcd ports.
/// Dropping it stops its daemon and every process carrying its marker, then removes
/// the data dir.
pub struct Node {
    pub dir: PathBuf,
    pub etcd_client_port: u16,
    pub etcd_peer_port: u16,
}

impl Node {
    pub fn new(name: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("kdist-test-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test data dir");
        let mut node = Self {
            dir,
            etcd_client_port: free_port(),
            etcd_peer_port: free_port(),
        };
        while node.etcd_peer_port == node.etcd_client_port {
            node.etcd_peer_port = free_port();
        }
        node.write_config("");
        node
    }

    /// Writes config.yaml with this node's ports plus `extra` YAML lines.
    pub fn write_config(&self, extra: &str) {
        let text = format!(
            "etcd:\n  client_port: {}\n  peer_port: {}\n{extra}",
            self.etcd_client_port, self.etcd_peer_port
        );
        std::fs::write(self.dir.join("config.yaml"), text).expect("write config.yaml");
    }

    pub fn data(&self) -> DataDir {
        DataDir::new(&self.dir)
    }

    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kdist"));
        command.arg("--data-dir").arg(&self.dir);
        command
    }

    /// Runs `kdist <args>` against this node and returns its output.
    pub fn kdist(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run kdist")
    }

    /// Runs `kdist <args>` and panics with its output unless it succeeds.
    pub fn kdist_ok(&self, args: &[&str]) -> String {
        let out = self.kdist(args);
        assert!(
            out.status.success(),
            "kdist {args:?} failed ({}):\n{}\n{}\nlog:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log("kdist")
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn log(&self, service: &str) -> String {
        std::fs::read_to_string(self.data().log_file(service)).unwrap_or_default()
    }

    /// `kdist status -o json`, or None when no daemon answers.
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = self.kdist(&["status", "-o", "json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The status entry of `service`.
    pub fn service(&self, service: &str) -> Option<serde_json::Value> {
        let status = self.status()?;
        status["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == service)
            .cloned()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.command().args(["stop", "--timeout", "30"]).output();
        kill_daemon(&self.data());
        kill_marked(&self.data());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SIGKILLs every process that carries the marker of `data` (and only those).
pub fn kill_marked(data: &DataDir) {
    for pid in kdist::supervisor::find_marked(data) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// SIGKILLs the daemon of `data` named by its pidfile, if that process really is a
/// kdist daemon of this data dir (its command line names the dir).
pub fn kill_daemon(data: &DataDir) {
    let Some(pid) = std::fs::read_to_string(data.pidfile("kdist"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    if cmdline.contains("daemon") && cmdline.contains(&data.root().display().to_string()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// True while a process with this pid exists (zombies count as gone).
pub fn alive(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub fn exists(path: &Path) -> bool {
    path.exists()
}
