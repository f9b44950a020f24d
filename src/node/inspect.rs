//! `kdist inspect`: one tarball with what a bug report needs (status, args, generated
//! configs, versions, recent logs, certificate expiry, host network state) and nothing
//! secret: no private keys, no kubeconfigs, no join tokens, no datastore.

use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;

use super::cmd;
use super::error::NodeError;
use crate::components::resolve_binary;
use crate::config::DataDir;

/// At most this much of each log goes in.
const LOG_BYTES: u64 = 512 * 1024;

/// Replaces PEM private key blocks and the values of secret-looking flags/fields.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_key = false;
    for line in text.lines() {
        if line.contains("-----BEGIN") && line.contains("PRIVATE KEY-----") {
            in_key = true;
            out.push_str("[private key removed by kdist inspect]\n");
            continue;
        }
        if in_key {
            if line.contains("-----END") {
                in_key = false;
            }
            continue;
        }
        let lower = line.to_ascii_lowercase();
        let secret = ["token", "password", "secret", "client-key-data"]
            .iter()
            .any(|w| lower.contains(w))
            || is_auth_key(&lower);
        match (secret, line.find(['=', ':'])) {
            (true, Some(at)) => {
                out.push_str(&line[..=at]);
                out.push_str(" [redacted]\n");
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// A registry credential's `auth` key (base64 of user:password) in config.yaml
/// (`auth: ...`) or containerd's config.toml (`auth = ...`), not `auth:` opening a
/// section nor words such as `authorization`.
fn is_auth_key(lower: &str) -> bool {
    let trimmed = lower.trim_start().trim_start_matches(['-', ' ', '{']);
    let Some(rest) = trimmed
        .strip_prefix("auth")
        .or_else(|| trimmed.strip_prefix("\"auth\""))
    else {
        return false;
    };
    let rest = rest.trim_start();
    let value = rest
        .strip_prefix(':')
        .or_else(|| rest.strip_prefix('='))
        .map(str::trim);
    value.is_some_and(|v| !v.is_empty() && !v.starts_with('#'))
}

struct Bundle<W: Write> {
    tar: tar::Builder<W>,
    prefix: String,
}

impl<W: Write> Bundle<W> {
    fn add(&mut self, name: &str, text: &str) -> Result<(), NodeError> {
        let bytes = redact(text).into_bytes();
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        );
        header.set_cksum();
        let path = format!("{}/{name}", self.prefix);
        self.tar
            .append_data(&mut header, &path, bytes.as_slice())
            .map_err(NodeError::io(path))
    }

    fn add_file(&mut self, name: &str, path: &Path) -> Result<(), NodeError> {
        if let Ok(text) = std::fs::read_to_string(path) {
            self.add(name, &text)?;
        }
        Ok(())
    }
}

fn tail(path: &Path, max: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max))).ok()?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// One line per certificate under `certs/`: file, subject, not-after. Never reads keys.
fn certs_summary(data: &DataDir) -> String {
    let mut out = String::new();
    let mut stack = vec![data.certs_dir()];
    let mut files = Vec::new();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "crt") {
                files.push(path);
            }
        }
    }
    files.sort();
    for path in files {
        let name = path
            .strip_prefix(data.certs_dir())
            .unwrap_or(&path)
            .display()
            .to_string();
        let line = std::fs::read(&path)
            .ok()
            .and_then(|pem| {
                let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
                let cert = pem.parse_x509().ok()?;
                Some(format!(
                    "{name}: subject={} not_after={}",
                    cert.subject(),
                    cert.validity().not_after
                ))
            })
            .unwrap_or_else(|| format!("{name}: unreadable"));
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn versions(data: &DataDir) -> String {
    let mut out = format!("kdist {}\n", env!("CARGO_PKG_VERSION"));
    let programs = [
        "containerd",
        "runc",
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kube-proxy",
        "kubectl",
    ];
    for program in programs {
        let line = match resolve_binary(data, program) {
            Ok((path, _)) => {
                let args: &[&str] = if program == "kubectl" {
                    &["version", "--client"]
                } else {
                    &["--version"]
                };
                let version = cmd::run(&path, args)
                    .map(|v| v.lines().next().unwrap_or_default().to_string())
                    .unwrap_or_else(|e| e.to_string());
                format!("{program} ({}): {version}", path.display())
            }
            Err(_) => format!("{program}: not found"),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Writes the bundle to `out` (a `.tar.gz`). `status` is the daemon's report as JSON,
/// or why there is none; `certs_check` is the output of `kdist certs check`.
pub fn write(
    data: &DataDir,
    out: &Path,
    status: &str,
    certs_check: &str,
) -> Result<PathBuf, NodeError> {
    let file = std::fs::File::create(out).map_err(NodeError::io(out))?;
    let prefix = out
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".tar.gz").to_string())
        .unwrap_or_else(|| "kdist-inspect".into());
    let mut bundle = Bundle {
        tar: tar::Builder::new(GzEncoder::new(file, Compression::default())),
        prefix,
    };
    bundle.add("status.json", status)?;
    bundle.add("versions.txt", &versions(data))?;
    bundle.add("certs-check.txt", certs_check)?;
    bundle.add("certs.txt", &certs_summary(data))?;
    bundle.add_file("config.yaml", &data.config_file())?;
    bundle.add_file(
        "node/containerd-config.toml",
        &super::containerd::config_path(data),
    )?;
    bundle.add_file("node/cni.conflist", &super::cni::conflist_path(data))?;
    if let Ok(entries) = std::fs::read_dir(super::registries::hosts_dir(data)) {
        let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        dirs.sort();
        for dir in dirs {
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            bundle.add_file(
                &format!("node/certs.d/{name}/hosts.toml"),
                &dir.join("hosts.toml"),
            )?;
        }
    }
    bundle.add_file("node/kubelet.yaml", &super::kube::kubelet_config_path(data))?;
    bundle.add_file(
        "node/kube-proxy.yaml",
        &super::kube::kube_proxy_config_path(data),
    )?;
    bundle.add_file("node/host-state.json", &super::hostprep::state_path(data))?;
    for (dir, prefix, only_logs) in [
        (data.args_dir(), "args", false),
        (data.logs_dir(), "logs", true),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for path in paths.iter().filter(|p| p.is_file()) {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if only_logs && !name.ends_with(".log") {
                continue;
            }
            if let Some(text) = tail(path, LOG_BYTES) {
                bundle.add(&format!("{prefix}/{name}"), &text)?;
            }
        }
    }
    for (name, program, args) in [
        ("host/iptables.txt", "iptables-save", vec![]),
        ("host/ip6tables.txt", "ip6tables-save", vec![]),
        ("host/ip-addr.txt", "ip", vec!["addr"]),
        ("host/ip-route.txt", "ip", vec!["route"]),
        ("host/mounts.txt", "findmnt", vec!["-l"]),
    ] {
        if let Some(path) = cmd::which(program) {
            let text = cmd::run(&path, &args).unwrap_or_else(|e| e.to_string());
            bundle.add(name, &text)?;
        }
    }
    let encoder = bundle.tar.into_inner().map_err(NodeError::io(out))?;
    encoder.finish().map_err(NodeError::io(out))?;
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_secret_values_are_removed() {
        let text = "a\n-----BEGIN EC PRIVATE KEY-----\nSECRETBYTES\n-----END EC PRIVATE KEY-----\n\
                    --token-auth-file=/x\nclient-key-data: QUJD\nb\n";
        let out = redact(text);
        assert!(!out.contains("SECRETBYTES"), "{out}");
        assert!(!out.contains("QUJD"), "{out}");
        assert!(!out.contains("/x"), "{out}");
        assert!(out.starts_with("a\n") && out.ends_with("b\n"));
    }

    #[test]
    fn registry_credentials_are_removed_in_every_spelling() {
        let yaml = "registries:\n  configs:\n    m:\n      auth: {username: u, password: PW1}\n    \
                    n:\n      auth:\n        username: u\n        password: PW2\n    \
                    o:\n      auth: {auth: QUJDREVG}\n    p:\n      auth:\n        auth: R0hJSktM\n    \
                    q:\n      auth: {identity_token: TOK1}\n";
        let toml = "[plugins.\"io.containerd.grpc.v1.cri\".registry.configs.\"m\".auth]\n  \
                    username = \"u\"\n  password = \"PW3\"\n  auth = \"TU5PUFFS\"\n  \
                    identitytoken = \"TOK2\"\n";
        for text in [yaml, toml] {
            let out = redact(text);
            for secret in [
                "PW1", "PW2", "PW3", "QUJDREVG", "R0hJSktM", "TU5PUFFS", "TOK1", "TOK2",
            ] {
                assert!(!out.contains(secret), "{secret} in {out}");
            }
        }
        // what is not a credential stays readable
        let plain = "auth:\n  authorization-mode: Node\n--authorization-mode=Node,RBAC\n";
        assert_eq!(redact(plain), plain);
    }
}
