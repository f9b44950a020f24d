//! Image archives into containerd's `k8s.io` namespace (the one kubelet's CRI uses):
//! `kdist images import FILE`, and archives dropped in `<data>/images/`, imported when
//! containerd becomes ready (air-gapped hosts). OCI layouts and `docker save` tarballs
//! both work: containerd's own importer reads them, through `ctr`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::cmd;
use super::error::NodeError;
use crate::components::resolve_binary;
use crate::config::DataDir;
use crate::fsutil;

pub const NAMESPACE: &str = "k8s.io";
/// Which dropped archives were imported already: file name -> "size:mtime".
const RECORD: &str = ".imported.json";

pub(super) fn ctr(data: &DataDir) -> Result<PathBuf, NodeError> {
    resolve_binary(data, "ctr")
        .map(|(path, _)| path)
        .map_err(|_| NodeError::NotFound {
            program: "ctr".into(),
            searched: data.components_dir().join("current").join("bin"),
            hint: "install containerd's `ctr` client (Debian: containerd)".into(),
        })
}

/// Checks that `path` is a tar file before containerd gets it, for a clear error.
fn check_archive(path: &Path) -> Result<(), NodeError> {
    let mut header = [0u8; 512];
    let mut file = std::fs::File::open(path).map_err(NodeError::io(path))?;
    file.read_exact(&mut header).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => NodeError::BadArchive {
            path: path.to_path_buf(),
            reason: "shorter than one tar header".into(),
        },
        _ => NodeError::io(path)(e),
    })?;
    if &header[257..262] != b"ustar" {
        let reason = if header.starts_with(&[0x1f, 0x8b]) {
            "it is gzip-compressed; decompress it first (`gunzip`)"
        } else {
            "not a tar archive (expected `docker save` output or an OCI layout tarball)"
        };
        return Err(NodeError::BadArchive {
            path: path.to_path_buf(),
            reason: reason.into(),
        });
    }
    Ok(())
}

/// Imports one archive; returns the image names containerd reported.
pub fn import(data: &DataDir, archive: &Path) -> Result<Vec<String>, NodeError> {
    check_archive(archive)?;
    let ctr = ctr(data)?;
    let socket = data.containerd_socket();
    let output = cmd::run(
        &ctr,
        &[
            "--address",
            &socket.display().to_string(),
            "--namespace",
            NAMESPACE,
            "images",
            "import",
            &archive.display().to_string(),
        ],
    )?;
    Ok(imported_names(&output))
}

/// The images containerd holds for Kubernetes (namespace k8s.io): name, size as ctr
/// shows it. Blocking.
pub fn list(data: &DataDir) -> Result<Vec<(String, String)>, NodeError> {
    let socket = data.containerd_socket();
    let ctr = ctr(data)?;
    let output = cmd::run(
        &ctr,
        &[
            "--address",
            &socket.display().to_string(),
            "--namespace",
            NAMESPACE,
            "images",
            "list",
        ],
    )?;
    Ok(listed(&output))
}

/// (name, size) from `ctr images list`: REF TYPE DIGEST SIZE(two words) PLATFORMS LABELS;
/// digests-only references (`name@sha256:...`, `sha256:...`) are left out.
fn listed(output: &str) -> Vec<(String, String)> {
    output
        .lines()
        .skip(1)
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let name = *words.first()?;
            if name.starts_with("sha256:") || name.contains('@') {
                return None;
            }
            let size = match (words.get(3), words.get(4)) {
                (Some(n), Some(unit)) => format!("{n} {unit}"),
                _ => "-".into(),
            };
            Some((name.to_string(), size))
        })
        .collect()
}

/// Image names from ctr's "unpacking NAME (sha256:...)...done" lines.
fn imported_names(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("unpacking "))
        .filter_map(|l| l.split(" (").next())
        .map(str::to_string)
        .collect()
}

fn stamp(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(format!("{}:{}", meta.len(), mtime.as_nanos()))
}

/// Imports every `*.tar` in `<data>/images/` not imported before (or changed since).
/// Returns (file, names or error) per archive tried.
pub fn import_dropped(data: &DataDir) -> Vec<(PathBuf, Result<Vec<String>, NodeError>)> {
    let dir = data.images_dir();
    let record_path = dir.join(RECORD);
    let mut record: BTreeMap<String, String> = std::fs::read(&record_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut archives: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    archives.sort();
    let mut results = Vec::new();
    for archive in archives {
        let name = archive
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(now) = stamp(&archive) else { continue };
        if record.get(&name) == Some(&now) {
            continue;
        }
        let result = import(data, &archive);
        if result.is_ok() {
            record.insert(name, now);
            if let Ok(bytes) = serde_json::to_vec_pretty(&record)
                && let Err(e) = fsutil::atomic_write(&record_path, &bytes, 0o644)
            {
                tracing::warn!(
                    "cannot record imported images in {}: {e}",
                    record_path.display()
                );
            }
        }
        results.push((archive, result));
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_unpacking_lines() {
        let out = "unpacking docker.io/library/busybox:1 (sha256:ab)...done\n\
                   unpacking kdist.local/pause:t (sha256:cd)...done\n";
        assert_eq!(
            imported_names(out),
            ["docker.io/library/busybox:1", "kdist.local/pause:t"]
        );
    }

    #[test]
    fn listed_images_leave_out_digest_references() {
        let out = "REF TYPE DIGEST SIZE PLATFORMS LABELS\n\
                   kdist.local/p:1 application/vnd.oci.image.index.v1+json sha256:ab 1.2 MiB linux/amd64 io.cri-containerd.image=managed\n\
                   kdist.local/p@sha256:ab application/vnd.oci.image.index.v1+json sha256:ab 1.2 MiB linux/amd64 -\n\
                   sha256:cd application/vnd.oci.image.index.v1+json sha256:cd 1.2 MiB linux/amd64 -\n";
        assert_eq!(
            listed(out),
            [("kdist.local/p:1".to_string(), "1.2 MiB".to_string())]
        );
    }

    #[test]
    fn non_tar_files_are_refused_with_a_reason() {
        let dir = std::env::temp_dir().join(format!("kdist-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let gz = dir.join("x.tar.gz");
        let mut bytes = vec![0x1f, 0x8b];
        bytes.resize(1024, 0);
        std::fs::write(&gz, &bytes).unwrap();
        let err = check_archive(&gz).unwrap_err().to_string();
        assert!(err.contains("x.tar.gz") && err.contains("gunzip"), "{err}");
        let short = dir.join("short");
        std::fs::write(&short, b"hi").unwrap();
        let err = check_archive(&short).unwrap_err().to_string();
        assert!(err.contains("shorter than one tar header"), "{err}");
        // a read error is said as such, not as a short file
        let err = check_archive(&dir).unwrap_err();
        let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(
            text.contains("kdist-img-") && text.contains("directory"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
