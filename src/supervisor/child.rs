//! Child processes: spawning into their own process group with kdist's marker, stopping
//! a whole group, and finding what an earlier daemon left behind.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::error::SupervisorError;
use crate::config::{DataDir, MARKER_ENV};
use crate::fsutil;

pub use crate::node::{SERVICE_ENV, find_marked};

/// A running child: the tokio handle and its pid (= its process group id).
pub struct Running {
    pub child: Child,
    pub pid: i32,
}

/// Starts `program argv` as `service`: own process group, stdin closed, stdout and
/// stderr appended to `log` directly (so output survives the daemon), `env` and the
/// marker environment set, and a pidfile written.
pub fn spawn(
    data: &DataDir,
    service: &str,
    program: &Path,
    argv: &[String],
    env: &BTreeMap<String, String>,
    log: &Path,
) -> Result<Running, SupervisorError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SupervisorError::Io { path, source }
    };
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io_err(log))?;
    let err = out.try_clone().map_err(io_err(log))?;
    let mut command = Command::new(program);
    command
        .args(argv)
        .envs(env)
        .env(MARKER_ENV, data.root())
        .env(SERVICE_ENV, service)
        // READY=1 to a service manager is the daemon's to send, once all are ready:
        // etcd and containerd would send their own
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        // the supervisor stops children explicitly, in order; never on drop
        .kill_on_drop(false);
    let child = command.spawn().map_err(|source| SupervisorError::Spawn {
        service: service.to_string(),
        program: program.to_path_buf(),
        source,
    })?;
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .ok_or_else(|| SupervisorError::Spawn {
            service: service.to_string(),
            program: program.to_path_buf(),
            source: std::io::Error::other("child exited before its pid was known"),
        })?;
    let pidfile = data.pidfile(service);
    if let Err(source) = fsutil::atomic_write(&pidfile, format!("{pid}\n").as_bytes(), 0o644) {
        // not supervised without its pidfile: it must not outlive this failed start
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        return Err(io_err(&pidfile)(source));
    }
    Ok(Running { child, pid })
}

/// Stops a running child: SIGTERM to its process group, SIGKILL after `grace`. Also
/// kills what is left of the group once the leader is gone.
pub async fn stop(
    running: &mut Running,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    let pgid = Pid::from_raw(running.pid);
    let _ = killpg(pgid, Signal::SIGTERM);
    let status = match tokio::time::timeout(grace, running.child.wait()).await {
        Ok(status) => status?,
        Err(_) => {
            tracing::warn!(
                pid = running.pid,
                "did not stop within {grace:?}; sending SIGKILL"
            );
            let _ = killpg(pgid, Signal::SIGKILL);
            running.child.wait().await?
        }
    };
    let _ = killpg(pgid, Signal::SIGKILL);
    Ok(status)
}

/// Stops whatever an earlier daemon of this data dir left running: only processes that
/// carry our marker, found by scanning /proc (pidfiles can be stale or missing).
/// Returns how many processes were signalled.
pub async fn cleanup_stale(data: &DataDir, grace: Duration) -> usize {
    let pids = find_marked(data);
    if pids.is_empty() {
        return 0;
    }
    tracing::info!(
        count = pids.len(),
        "stopping children left by an earlier daemon"
    );
    for pid in &pids {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        let left = find_marked(data);
        if left.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            for pid in left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // pidfiles of the dead are meaningless now
    if let Ok(entries) = std::fs::read_dir(data.run_dir()) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "pid")
                && path.file_stem().is_some_and(|s| s != "kdist")
            {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    pids.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawn_marks_and_stop_kills_the_group() {
        let root = std::env::temp_dir().join(format!("kdist-child-{}", std::process::id()));
        let data = DataDir::new(&root);
        data.ensure().unwrap();
        // a shell that leaves a grandchild in the same group
        let argv = vec!["-c".to_string(), "sleep 300 & sleep 300".to_string()];
        let mut running = spawn(
            &data,
            "t",
            Path::new("/bin/sh"),
            &argv,
            &BTreeMap::new(),
            &data.log_file("t"),
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let marked = find_marked(&data);
        assert!(marked.contains(&running.pid), "{marked:?}");
        assert!(
            marked.len() >= 2,
            "grandchild carries the marker too: {marked:?}"
        );
        stop(&mut running, Duration::from_secs(5)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(find_marked(&data).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[tokio::test]
    async fn a_child_whose_pidfile_cannot_be_written_is_not_left_running() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        data.ensure().unwrap();
        // a directory that is not empty where the pidfile should go: rename fails
        let pidfile = data.pidfile("t");
        std::fs::create_dir_all(pidfile.join("occupied")).unwrap();
        let argv = vec!["300".to_string()];
        let err = spawn(
            &data,
            "t",
            Path::new("/bin/sleep"),
            &argv,
            &BTreeMap::new(),
            &data.log_file("t"),
        )
        .err()
        .expect("the start fails");
        assert!(err.to_string().contains("t.pid"), "{err}");
        let gone = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            find_marked(&data).is_empty()
        });
        assert!(gone, "left running: {:?}", find_marked(&data));
    }

    #[tokio::test]
    async fn cleanup_leaves_unmarked_processes_alone() {
        let root = std::env::temp_dir().join(format!("kdist-stale-{}", std::process::id()));
        let data = DataDir::new(&root);
        data.ensure().unwrap();
        let mut stranger = tokio::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .unwrap();
        let running = spawn(
            &data,
            "t",
            Path::new("sleep"),
            &["300".into()],
            &BTreeMap::new(),
            &data.log_file("t"),
        )
        .unwrap();
        // forget the handle, as a SIGKILLed daemon would
        let Running { mut child, .. } = running;
        assert_eq!(cleanup_stale(&data, Duration::from_secs(5)).await, 1);
        child.wait().await.unwrap();
        assert!(
            stranger.try_wait().unwrap().is_none(),
            "unmarked process was killed"
        );
        stranger.kill().await.unwrap();
        assert!(!data.pidfile("t").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
