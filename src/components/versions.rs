//! Which binary each component runs from and its version, for `kdist version` and
//! `kdist components list`: the active release's record, or `<bin> --version` for a
//! binary found on PATH (the documented fallback).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::manifest;
use super::store::Store;
use crate::config::DataDir;

/// Shown for binaries on PATH, the same words `kdist status` uses.
pub const ORIGIN_PATH: &str = "PATH (fallback)";

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ComponentVersion {
    pub name: String,
    pub version: Option<String>,
    /// `components <release>`, `PATH (fallback)` or `missing`.
    pub origin: String,
    pub path: Option<PathBuf>,
}

/// Every binary kdist may run, with where it would come from now.
pub fn component_versions(data: &DataDir) -> Vec<ComponentVersion> {
    let store = Store::new(data);
    let active = store.active();
    let record = active.as_ref().and_then(|id| store.record(id).ok());
    let mut out = Vec::new();
    for name in manifest::binaries() {
        let installed = store.current_bin(name);
        if let (Some(id), Some(record), true) = (&active, &record, installed.is_file()) {
            let version = record
                .files
                .iter()
                .find(|f| f.path == format!("bin/{name}"))
                .map(|f| f.version.clone());
            out.push(ComponentVersion {
                name: name.to_string(),
                version,
                origin: format!("components {id}"),
                path: Some(installed),
            });
            continue;
        }
        match find_on_path(name) {
            Some(path) => out.push(ComponentVersion {
                name: name.to_string(),
                version: probe_version(name, &path),
                origin: ORIGIN_PATH.to_string(),
                path: Some(path),
            }),
            None => out.push(ComponentVersion {
                name: name.to_string(),
                version: None,
                origin: "missing".to_string(),
                path: None,
            }),
        }
    }
    if let (Some(id), Some(record)) = (&active, &record) {
        let cni = record.files.iter().find(|f| f.path.starts_with("cni/"));
        out.push(ComponentVersion {
            name: "cni-plugins".into(),
            version: cni.map(|f| f.version.clone()),
            origin: format!("components {id}"),
            path: Some(store.current_link().join("cni")),
        });
    }
    out
}

/// The first executable `name` on PATH.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Asks a binary for its version, giving up after two seconds.
pub fn probe_version(name: &str, path: &Path) -> Option<String> {
    let args: &[&str] = match name {
        "kubectl" => &["version", "--client"],
        "etcdctl" => &["version"],
        _ => &["--version"],
    };
    let mut child = Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take()?, &mut text).ok()?;
    parse_version(&text)
}

/// The first token that looks like a version (`v1.31.2`, `3.4.23`).
pub fn parse_version(text: &str) -> Option<String> {
    text.split(|c: char| c.is_whitespace() || c == ',' || c == '"')
        .map(|t| t.trim_end_matches(':'))
        .find(|t| {
            let digits = t.strip_prefix('v').unwrap_or(t);
            let mut parts = digits.split('.');
            parts
                .next()
                .is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
                && parts
                    .next()
                    .is_some_and(|p| p.chars().next().is_some_and(|c| c.is_ascii_digit()))
        })
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_found_in_tool_output() {
        assert_eq!(
            parse_version("etcd Version: 3.4.23\nGit SHA: Not provided\n").as_deref(),
            Some("3.4.23")
        );
        assert_eq!(
            parse_version("Kubernetes v1.31.2-eks-1-31-12\n").as_deref(),
            Some("v1.31.2-eks-1-31-12")
        );
        assert_eq!(
            parse_version("Client Version: v1.30.1\nKustomize Version: v5.0.4").as_deref(),
            Some("v1.30.1")
        );
        assert_eq!(parse_version("no version here 3"), None);
    }
}
