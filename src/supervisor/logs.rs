//! Size-based rotation of `<data>/logs/*.log` by copy-and-truncate: children write to
//! their log through an O_APPEND descriptor that stays valid across a rotation.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Rotates every `*.log` in `dir` larger than `max_bytes`, keeping `keep` old files
/// (`x.log.1` newest).
pub fn rotate_dir(dir: &Path, max_bytes: u64, keep: usize) -> std::io::Result<Vec<PathBuf>> {
    let mut rotated = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        if fs::metadata(&path)?.len() > max_bytes {
            rotate_one(&path, keep)?;
            rotated.push(path);
        }
    }
    Ok(rotated)
}

fn rotate_one(path: &Path, keep: usize) -> std::io::Result<()> {
    let numbered = |n: usize| PathBuf::from(format!("{}.{n}", path.display()));
    let _ = fs::remove_file(numbered(keep));
    for n in (1..keep).rev() {
        let from = numbered(n);
        if from.exists() {
            fs::rename(&from, numbered(n + 1))?;
        }
    }
    fs::copy(path, numbered(1))?;
    fs::OpenOptions::new().write(true).open(path)?.set_len(0)
}

pub async fn rotate_periodically(
    dir: PathBuf,
    every: Duration,
    max_bytes: u64,
    keep: usize,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let dir = dir.clone();
        let result = tokio::task::spawn_blocking(move || rotate_dir(&dir, max_bytes, keep)).await;
        if let Ok(Err(e)) = result {
            tracing::warn!("log rotation: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn rotates_big_logs_and_keeps_a_few() {
        let dir = std::env::temp_dir().join(format!("kdist-logs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("etcd.log");
        let mut writer = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        for round in 0..5 {
            writer
                .write_all(format!("round {round} ").repeat(100).as_bytes())
                .unwrap();
            rotate_dir(&dir, 10, 3).unwrap();
        }
        // the appending writer keeps working after rotation
        writer.write_all(b"after").unwrap();
        assert_eq!(fs::read_to_string(&log).unwrap(), "after");
        assert!(
            fs::read_to_string(dir.join("etcd.log.1"))
                .unwrap()
                .starts_with("round 4")
        );
        assert!(
            fs::read_to_string(dir.join("etcd.log.3"))
                .unwrap()
                .starts_with("round 2")
        );
        assert!(!dir.join("etcd.log.4").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
