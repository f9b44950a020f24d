//! Where a program comes from: the active release (`<data>/components/current/bin`),
//! then PATH. Serves the supervisor (each start), the node (ctr, kubectl, the
//! Kubernetes binaries' versions) and the cluster commands.

use std::path::{Path, PathBuf};

use crate::config::DataDir;

/// Where a binary comes from, shown by `kdist status` and `kdist version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `<data>/components/current/bin`, installed from an EKS-D release.
    Components,
    /// Found on PATH: a documented fallback (e.g. Debian's etcd).
    Path,
    /// An absolute path from the service definition.
    Explicit,
}

/// A program found neither in a release nor on PATH.
#[derive(Debug, thiserror::Error)]
#[error(
    "program `{binary}` not found in {searched} nor on PATH; run `kdist components install` or install it"
)]
pub struct BinaryNotFound {
    pub binary: String,
    pub searched: PathBuf,
}

/// The release directory `<data>/components/current` points to now, if any.
pub fn active_release(data: &DataDir) -> Option<PathBuf> {
    std::fs::canonicalize(data.components_dir().join("current")).ok()
}

/// Finds the program for `binary`: the active components first, then PATH.
pub fn resolve_binary(data: &DataDir, binary: &str) -> Result<(PathBuf, Origin), BinaryNotFound> {
    resolve_in(data.components_dir().join("current"), binary)
}

/// Finds `binary` in `release` (a release directory pinned earlier) when it holds it,
/// else as [`resolve_binary`] does.
pub fn resolve_binary_in(
    data: &DataDir,
    release: Option<&Path>,
    binary: &str,
) -> Result<(PathBuf, Origin), BinaryNotFound> {
    match release {
        Some(release) if release.join("bin").join(binary).is_file() => {
            resolve_in(release.to_path_buf(), binary)
        }
        _ => resolve_binary(data, binary),
    }
}

/// `binary` under `<release>/bin`, else on PATH; a path is taken as it is.
fn resolve_in(release: PathBuf, binary: &str) -> Result<(PathBuf, Origin), BinaryNotFound> {
    if binary.contains('/') {
        return Ok((PathBuf::from(binary), Origin::Explicit));
    }
    let installed = release.join("bin").join(binary);
    if installed.is_file() {
        return Ok((installed, Origin::Components));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(binary);
            if is_executable(&candidate) {
                return Ok((candidate, Origin::Path));
            }
        }
    }
    Err(BinaryNotFound {
        binary: binary.to_string(),
        searched: installed,
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
