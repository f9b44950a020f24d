//! Shared helpers of the integration tests: a temporary data dir whose daemon is stopped
//! on drop, running the real `kdist` binary, and waiting for conditions.
#![allow(dead_code, clippy::unwrap_used)]

pub mod oci;
pub mod outside;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const KDIST: &str = env!("CARGO_BIN_EXE_kdist");

/// A data directory under /tmp (short: unix socket paths are limited to 108 bytes).
pub struct TempData {
    pub root: PathBuf,
}

impl TempData {
    pub fn new(tag: &str) -> Self {
        let root = PathBuf::from(format!("/tmp/kdt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        Self { root }
    }

    /// Writes `config.yaml` text into the data dir and returns its path.
    pub fn config(&self, text: &str) -> PathBuf {
        let path = self.root.join("seed-config.yaml");
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
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
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
