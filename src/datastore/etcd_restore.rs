//! Restoring a snapshot into the data dir of the etcd child (`datastore: etcd`) with
//! etcd's own tool: `etcdutl snapshot restore` (etcd 3.5+) or `etcdctl snapshot
//! restore` (3.4), into a directory beside the live one, then swapped in by rename.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::DatastoreError;

/// Everything the restore needs; member name, cluster and peer URLs come from the
/// etcd args file so the restored member is the one the daemon starts.
#[derive(Debug, Clone)]
pub struct EtcdRestore {
    /// `etcdutl` or `etcdctl`.
    pub tool: PathBuf,
    pub snapshot: PathBuf,
    pub data_dir: PathBuf,
    pub name: String,
    pub initial_cluster: String,
    pub initial_advertise_peer_urls: String,
}

impl EtcdRestore {
    fn command(&self, into: &Path) -> Command {
        let mut command = Command::new(&self.tool);
        let is_etcdctl = self
            .tool
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("etcdctl"));
        if is_etcdctl {
            command.env("ETCDCTL_API", "3");
        }
        command
            .args(["snapshot", "restore"])
            .arg(&self.snapshot)
            .arg("--data-dir")
            .arg(into)
            .args(["--name", &self.name])
            .args(["--initial-cluster", &self.initial_cluster])
            .args([
                "--initial-advertise-peer-urls",
                &self.initial_advertise_peer_urls,
            ]);
        command
    }

    fn failed(&self, reason: impl Into<String>) -> DatastoreError {
        DatastoreError::EtcdRestore {
            snapshot: self.snapshot.clone(),
            data_dir: self.data_dir.clone(),
            reason: reason.into(),
        }
    }

    /// Restores into a fresh directory and swaps it in. The caller makes sure etcd is
    /// stopped. An existing data dir is only replaced with `force`; it is kept aside
    /// until the new one is in place, and put back if the swap fails.
    pub fn run(&self, force: bool) -> Result<(), DatastoreError> {
        if !self.snapshot.is_file() {
            return Err(DatastoreError::Io {
                path: self.snapshot.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no snapshot file here"),
            });
        }
        let existing = self.data_dir.exists();
        if existing && !force {
            return Err(DatastoreError::Exists {
                path: self.data_dir.clone(),
            });
        }
        let parent = match self.data_dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DatastoreError::Io { path, source }
        };
        crate::fsutil::ensure_dir(&parent, 0o700).map_err(io(&parent))?;
        let stem = self
            .data_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "etcd".into());
        let pid = std::process::id();
        let fresh = parent.join(format!(".{stem}.restore.{pid}"));
        let aside = parent.join(format!(".{stem}.pre-restore.{pid}"));
        if fresh.exists() {
            std::fs::remove_dir_all(&fresh).map_err(io(&fresh))?;
        }
        let output = self
            .command(&fresh)
            .output()
            .map_err(|e| self.failed(format!("cannot run {}: {e}", self.tool.display())))?;
        if !output.status.success() {
            let _ = std::fs::remove_dir_all(&fresh);
            let stderr = String::from_utf8_lossy(&output.stderr);
            let last = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(self.failed(format!(
                "{} exited with {}: {last}",
                self.tool.display(),
                output.status
            )));
        }
        {
            use std::os::unix::fs::PermissionsExt;
            // etcd refuses a data dir others can read
            std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o700))
                .map_err(io(&fresh))?;
        }
        if existing {
            std::fs::rename(&self.data_dir, &aside).map_err(io(&self.data_dir))?;
        }
        if let Err(err) = std::fs::rename(&fresh, &self.data_dir) {
            if existing {
                let _ = std::fs::rename(&aside, &self.data_dir);
            }
            let _ = std::fs::remove_dir_all(&fresh);
            return Err(io(&self.data_dir)(err));
        }
        std::fs::File::open(&parent)
            .and_then(|d| d.sync_all())
            .map_err(io(&parent))?;
        if existing {
            std::fs::remove_dir_all(&aside).map_err(io(&aside))?;
        }
        Ok(())
    }
}
