//! A worker's certificates after its join. The kubelet renews its client certificate
//! itself through the CSR API (`rotateCertificates`), keeping the current one in
//! `<data>/kubelet/pki/kubelet-client-current.pem`, which its kubeconfig points at. The
//! kube-proxy and kubelet serving certificates are renewed by the worker's daemon
//! through the cluster agent ([`renew_worker`]): it proves the node's identity with the
//! kubelet's current client certificate over mutual TLS and gets certificates signed by
//! the cluster CA for new keys.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::KeyPair;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{debug, info};

use super::error::ClusterError;
use super::join::{exchange, key_and_csr};
use super::nodes;
use super::protocol::{ErrorBody, RenewRequest, RenewResponse};
use super::tls::{self, PinnedCaVerifier};
use crate::config::{DataDir, NodeConfig, Role};
use crate::fsutil;

const KUBELET_CLIENT_PREFIX: &str = "kubelet-client";

/// The kubelet's certificate directory (its default `--cert-dir`, `<root-dir>/pki`).
pub fn kubelet_cert_dir(data: &DataDir) -> PathBuf {
    data.kubelet_dir().join("pki")
}

/// The kubelet's current client certificate and key, one PEM file; the kubelet replaces
/// it (a symlink) whenever it renews.
pub fn kubelet_client_current(data: &DataDir) -> PathBuf {
    kubelet_cert_dir(data).join(format!("{KUBELET_CLIENT_PREFIX}-current.pem"))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Puts a client certificate and key where the kubelet keeps its current pair, as the
/// kubelet does: a dated file and the `-current` symlink switched to it atomically.
/// Returns the symlink's path.
pub(super) fn write_kubelet_client(
    data: &DataDir,
    cert_pem: &str,
    key_pem: &str,
) -> Result<PathBuf, ClusterError> {
    let dir = kubelet_cert_dir(data);
    fsutil::ensure_dir(&dir, 0o700).map_err(io_err(&dir))?;
    let stamp = super::token::now_unix();
    let file = dir.join(format!("{KUBELET_CLIENT_PREFIX}-{stamp}.pem"));
    let mut pair = cert_pem.to_string();
    if !pair.ends_with('\n') {
        pair.push('\n');
    }
    pair.push_str(key_pem);
    fsutil::atomic_write(&file, pair.as_bytes(), 0o600).map_err(io_err(&file))?;
    let current = kubelet_client_current(data);
    let staged = dir.join(format!(".{KUBELET_CLIENT_PREFIX}-current.pem.new"));
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink(&file, &staged).map_err(io_err(&staged))?;
    std::fs::rename(&staged, &current).map_err(io_err(&current))?;
    Ok(current)
}

/// The kubelet's `--cert-dir` line of the default args file.
const CERT_DIR_FLAG: &str = "--cert-dir=${KUBELET_DIR}/pki";

/// Adds [`CERT_DIR_FLAG`] to `args/kubelet` when the node wrote that file (at its first
/// start, before it joined) without one: the kubelet would keep the certificates it
/// renews in /var/lib/kubelet/pki, outside the data dir and apart from its kubeconfig.
pub(super) fn ensure_kubelet_cert_dir_flag(data: &DataDir) -> Result<(), ClusterError> {
    let path = data.args_file("kubelet");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(ClusterError::Io { path, source }),
    };
    if text
        .lines()
        .any(|l| l.trim_start().starts_with("--cert-dir"))
    {
        return Ok(());
    }
    let mut text = text;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("# added by `kdist join`: the client certificates the kubelet renews\n");
    text.push_str(CERT_DIR_FLAG);
    text.push('\n');
    fsutil::atomic_write(&path, text.as_bytes(), 0o644).map_err(io_err(&path))
}

/// A kubeconfig whose client certificate and key are read from `pair` (one PEM file
/// holding both), so that it follows the kubelet's renewals.
pub(super) fn render_kubeconfig_with_files(
    server: &str,
    ca_pem: &str,
    user: &str,
    pair: &Path,
) -> String {
    use base64::Engine;
    let context = format!("{user}@kdist");
    let pair = pair.display().to_string();
    let value = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "kdist",
            "cluster": {
                "server": server,
                "certificate-authority-data":
                    base64::engine::general_purpose::STANDARD.encode(ca_pem),
            },
        }],
        "contexts": [{
            "name": context,
            "context": { "cluster": "kdist", "user": user },
        }],
        "current-context": context,
        "users": [{
            "name": user,
            "user": { "client-certificate": pair, "client-key": pair },
        }],
        "preferences": {},
    });
    // a json Value with string keys always serializes
    serde_saphyr::to_string(&value).unwrap_or_default()
}

/// Writes kube-proxy's certificate, key and kubeconfig (with the CA of `certs/ca.crt`).
pub(super) fn write_kube_proxy(
    data: &DataDir,
    server: &str,
    cert_pem: &str,
    key: &KeyPair,
) -> Result<(), ClusterError> {
    let certs = data.certs_dir();
    let ca_path = certs.join("ca.crt");
    let ca_pem = std::fs::read_to_string(&ca_path).map_err(io_err(&ca_path))?;
    let key_pem = key.serialize_pem();
    for (name, text, mode) in [
        ("kube-proxy.key", key_pem.as_str(), 0o600),
        ("kube-proxy.crt", cert_pem, 0o644),
    ] {
        let path = certs.join(name);
        fsutil::atomic_write(&path, text.as_bytes(), mode).map_err(io_err(&path))?;
    }
    let text =
        crate::pki::render_kubeconfig(server, &ca_pem, "system:kube-proxy", cert_pem, &key_pem);
    let path = data.kubeconfig_dir().join("kube-proxy.conf");
    fsutil::atomic_write(&path, text.as_bytes(), 0o600).map_err(io_err(&path))
}

/// Whether a certificate valid from `not_before` to `not_after` (unix seconds) is due at
/// `now`: `window` or less is left, or half its lifetime when that is shorter (its
/// control plane may sign for less time than this node's `certs.renewal_window`).
pub fn due(not_before: i64, not_after: i64, now: i64, window: Duration) -> bool {
    let window = i64::try_from(window.as_secs()).unwrap_or(i64::MAX);
    let half_life = (not_after - not_before).max(0) / 2;
    not_after - now <= window.min(half_life)
}

/// The validity of the first certificate of a PEM file, `None` when unreadable.
fn validity(path: &Path) -> Option<(i64, i64)> {
    let pem = std::fs::read(path).ok()?;
    let der = CertificateDer::pem_slice_iter(&pem).next()?.ok()?;
    let (_, cert) = <x509_parser::certificate::X509Certificate as x509_parser::prelude::FromDer<
        '_,
        x509_parser::error::X509Error,
    >>::from_der(&der)
    .ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

fn cert_due(path: &Path, now: i64, window: Duration) -> bool {
    // an unreadable or missing certificate is renewed as well
    validity(path).is_none_or(|(nb, na)| due(nb, na, now, window))
}

/// The kubelet's current client certificate chain and key, from one PEM file.
fn kubelet_identity(
    data: &DataDir,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ClusterError> {
    let path = kubelet_client_current(data);
    let bad = |reason: String| ClusterError::KubeletClient {
        path: path.clone(),
        reason,
    };
    let pem = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if chain.is_empty() {
        return Err(bad("it holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| bad(e.to_string()))?;
    Ok((chain, key))
}

/// On a joined worker: renews the kube-proxy and kubelet serving certificates that are
/// due (see [`due`]) through the cluster agent it joined, and returns the services to
/// restart so they load them. Does nothing on other nodes.
pub async fn renew_worker(
    data: &DataDir,
    config: &NodeConfig,
) -> Result<Vec<String>, ClusterError> {
    let Some(joined) = nodes::joined(data)? else {
        return Ok(Vec::new());
    };
    if joined.role != Role::Worker {
        return Ok(Vec::new());
    }
    let window = config.certs.renewal_window.duration();
    let now = i64::try_from(super::token::now_unix()).unwrap_or(i64::MAX);
    let certs = data.certs_dir();
    let proxy_due = cert_due(&certs.join("kube-proxy.crt"), now, window);
    let serving_due = cert_due(&certs.join("kubelet.crt"), now, window);
    if !proxy_due && !serving_due {
        debug!("worker certificates checked: nothing due");
        return Ok(Vec::new());
    }
    let target: SocketAddr = joined.agent.parse().map_err(|_| ClusterError::Invalid {
        what: format!(
            "agent `{}` in {}",
            joined.agent,
            nodes::joined_file(data).display()
        ),
        reason: "not an <ip>:<port> address; re-join the node".into(),
    })?;
    let blocking_data = data.clone();
    let (proxy, serving, identity, ca_pem) = tokio::task::spawn_blocking(move || {
        let proxy = proxy_due
            .then(|| key_and_csr("kube-proxy key"))
            .transpose()?;
        let serving = serving_due
            .then(|| key_and_csr("kubelet serving key"))
            .transpose()?;
        let identity = kubelet_identity(&blocking_data)?;
        let ca_path = blocking_data.certs_dir().join("ca.crt");
        let ca_pem = std::fs::read_to_string(&ca_path).map_err(io_err(&ca_path))?;
        Ok::<_, ClusterError>((proxy, serving, identity, ca_pem))
    })
    .await
    .map_err(|e| ClusterError::Internal {
        reason: e.to_string(),
    })??;
    let request = RenewRequest {
        node_name: joined.node_name.clone(),
        kube_proxy_csr: proxy.as_ref().map(|(_, csr)| csr.clone()),
        kubelet_serving_csr: serving.as_ref().map(|(_, csr)| csr.clone()),
    };
    let body = serde_json::to_vec(&request).map_err(|e| ClusterError::Internal {
        reason: e.to_string(),
    })?;
    // the agent must present a CA this node trusts (any of ca.crt's)
    let pins = tls::fingerprints(&ca_pem);
    let verifier = Arc::new(PinnedCaVerifier::any_of(&pins));
    let (chain, key) = identity;
    let client = tls::pinned_client_config_with_cert(verifier.clone(), chain, key)?;
    let (status, bytes) = exchange(
        target,
        &pins.join(", "),
        verifier,
        client,
        "/v1/renew",
        body,
    )
    .await?;
    if status != 200 {
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error)
            .unwrap_or_else(|_| format!("HTTP {status}"));
        return Err(ClusterError::RenewRefused {
            address: joined.agent,
            message,
        });
    }
    let answer: RenewResponse =
        serde_json::from_slice(&bytes).map_err(|e| ClusterError::RenewRefused {
            address: joined.agent.clone(),
            message: format!("unreadable answer: {e}"),
        })?;
    let server = joined
        .apiserver_endpoints
        .first()
        .cloned()
        .unwrap_or_else(|| crate::pki::DEFAULT_SERVER.to_string());
    let data = data.clone();
    tokio::task::spawn_blocking(move || {
        let mut services = Vec::new();
        let missing = |what: &str| ClusterError::RenewRefused {
            address: joined.agent.clone(),
            message: format!("the answer holds no {what} certificate"),
        };
        if let Some((key, _)) = &serving {
            let cert = answer
                .kubelet_serving_crt
                .as_deref()
                .ok_or_else(|| missing("kubelet serving"))?;
            let certs = data.certs_dir();
            for (name, text, mode) in [
                ("kubelet.key", key.serialize_pem(), 0o600),
                ("kubelet.crt", cert.to_string(), 0o644),
            ] {
                let path = certs.join(name);
                fsutil::atomic_write(&path, text.as_bytes(), mode).map_err(io_err(&path))?;
            }
            info!("kubelet serving certificate renewed");
            services.push("kubelet".to_string());
        }
        if let Some((key, _)) = &proxy {
            let cert = answer
                .kube_proxy_crt
                .as_deref()
                .ok_or_else(|| missing("kube-proxy"))?;
            write_kube_proxy(&data, &server, cert, key)?;
            info!("kube-proxy certificate renewed");
            services.push("kube-proxy".to_string());
        }
        Ok(services)
    })
    .await
    .map_err(|e| ClusterError::Internal {
        reason: e.to_string(),
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_due_inside_the_window_or_past_half_its_life() {
        let day = 86_400;
        let window = Duration::from_secs(30 * day as u64);
        // a year-long certificate: due in its last 30 days
        assert!(!due(0, 365 * day, 300 * day, window));
        assert!(due(0, 365 * day, 336 * day, window));
        assert!(due(0, 365 * day, 400 * day, window));
        // ten minutes signed by a control plane, a 30-day window here: due after five
        assert!(!due(0, 600, 200, window));
        assert!(due(0, 600, 300, window));
    }

    #[test]
    fn a_kubelet_args_file_written_before_the_join_gets_the_cert_dir_once() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        ensure_kubelet_cert_dir_flag(&data).unwrap();
        assert!(!data.args_file("kubelet").exists());
        std::fs::create_dir_all(data.args_dir()).unwrap();
        std::fs::write(data.args_file("kubelet"), "--root-dir=${KUBELET_DIR}").unwrap();
        ensure_kubelet_cert_dir_flag(&data).unwrap();
        ensure_kubelet_cert_dir_flag(&data).unwrap();
        let text = std::fs::read_to_string(data.args_file("kubelet")).unwrap();
        assert_eq!(text.matches("--cert-dir").count(), 1, "{text}");
        assert!(text.starts_with("--root-dir=${KUBELET_DIR}\n"), "{text}");
        // the shipped default has it already
        assert!(include_str!("../../services/kubelet.args").contains(CERT_DIR_FLAG));
    }

    #[test]
    fn the_kubelet_client_pair_is_switched_atomically_and_the_kubeconfig_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let first = write_kubelet_client(&data, "CERT1", "KEY1\n").unwrap();
        assert_eq!(std::fs::read_to_string(&first).unwrap(), "CERT1\nKEY1\n");
        let target = std::fs::read_link(&first).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&target).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let second = write_kubelet_client(&data, "CERT2\n", "KEY2\n").unwrap();
        assert_eq!(first, second);
        assert_eq!(std::fs::read_to_string(&second).unwrap(), "CERT2\nKEY2\n");
        let text =
            render_kubeconfig_with_files("https://192.0.2.1:6443", "CA", "system:node:w", &first);
        let parsed: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        let user = &parsed["users"][0]["user"];
        assert_eq!(user["client-certificate"], first.display().to_string());
        assert_eq!(user["client-key"], first.display().to_string());
        assert_eq!(
            parsed["clusters"][0]["cluster"]["server"],
            "https://192.0.2.1:6443"
        );
    }
}
