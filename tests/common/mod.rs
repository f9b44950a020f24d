//! Shared helpers of the integration tests: temp dirs, free ports, waiting, and real
//! peers (kdist's datastore, a real etcd) started as process groups and killed by pid.

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const KDIST: &str = env!("CARGO_BIN_EXE_kdist");

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
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
                .arg(format!("127.0.0.1:{port}"))
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
        let up = wait_until(Duration::from_secs(20), || {
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
}

pub fn etcd_available() -> bool {
    Path::new("/usr/bin/etcd").exists()
}

impl Etcd {
    pub fn start(dir: &Path) -> Etcd {
        let port = free_port();
        let peer = free_port();
        let log = std::fs::File::create(dir.join("etcd.log")).expect("etcd log");
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
                .stdout(log.try_clone().expect("log"))
                .stderr(log),
        );
        let mut etcd = Etcd { proc, port };
        let up = wait_until(Duration::from_secs(30), || {
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
