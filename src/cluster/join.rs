//! The joiner's side: connect to the agent, pin its CA, send CSRs with the token, write
//! what comes back in kubeadm's names and switch this node's role.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::info;

use super::error::ClusterError;
use super::etcd::{InitialCluster, write_initial_cluster};
use super::nodes::{self, Joined};
use super::protocol::{
    CONTROL_PLANE_FILES, Connection, ControlPlaneMaterial, ErrorBody, JoinRequest, JoinResponse,
};
use super::renew;
use super::tls::{PinnedCaVerifier, pinned_client_config};
use crate::config::{DataDir, NodeConfig, Role};
use crate::fsutil;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) fn key_and_csr(what: &str) -> Result<(KeyPair, String), ClusterError> {
    let cert_err = |source| ClusterError::Certificate {
        what: what.to_string(),
        source,
    };
    let key = KeyPair::generate().map_err(cert_err)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(cert_err)?;
    Ok((key, csr))
}

/// Sends `body` to the agent at `conn` as `POST path`, after the TLS handshake has
/// verified the agent's chain against `conn.ca_sha256`. Returns status and body.
pub async fn post(
    conn: &Connection,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), ClusterError> {
    let verifier = Arc::new(PinnedCaVerifier::new(&conn.ca_sha256));
    let config = pinned_client_config(verifier.clone())?;
    exchange(conn.address, &conn.ca_sha256, verifier, config, path, body).await
}

/// `POST path` with `body` to the agent at `target` over TLS with `config`, whose
/// server verifier is `verifier` (it pins `pinned`).
pub(super) async fn exchange(
    target: std::net::SocketAddr,
    pinned: &str,
    verifier: Arc<PinnedCaVerifier>,
    config: rustls::ClientConfig,
    path: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), ClusterError> {
    let address = target.to_string();
    let connect_err = |reason: String| ClusterError::Connect {
        address: address.clone(),
        port: target.port(),
        reason,
    };
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
        .await
        .map_err(|_| connect_err("timed out".into()))?
        .map_err(|e| connect_err(e.to_string()))?;
    let server_name = ServerName::IpAddress(target.ip().into());
    let tls = match TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
    {
        Ok(tls) => tls,
        Err(e) => {
            let seen = verifier.mismatch.lock().ok().and_then(|m| m.clone());
            return Err(match seen {
                Some(seen) => ClusterError::CaMismatch {
                    address,
                    pinned: pinned.to_string(),
                    seen: if seen.is_empty() {
                        "no CA".into()
                    } else {
                        seen
                    },
                },
                None => connect_err(format!("TLS handshake failed: {e}")),
            });
        }
    };
    let exchange = async {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| connect_err(e.to_string()))?;
        tokio::spawn(connection);
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, address.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClusterError::Internal {
                reason: e.to_string(),
            })?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| connect_err(e.to_string()))?
            .to_bytes();
        Ok((status, bytes.to_vec()))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| connect_err("no answer in time".into()))?
}

/// Joins the cluster of `conn` as `role` and writes this node's certificates,
/// kubeconfigs and config. Run it on a stopped node.
pub async fn join(data: &DataDir, conn: &Connection, role: Role) -> Result<Joined, ClusterError> {
    let joined_path = nodes::joined_file(data);
    if joined_path.exists() {
        return Err(ClusterError::AlreadyJoined { path: joined_path });
    }
    let config = NodeConfig::load(data).map_err(|e| ClusterError::Invalid {
        what: data.config_file().display().to_string(),
        reason: e.to_string(),
    })?;
    let node_name = config.node_name();
    let peer_port = config.etcd.peer_port;
    let (keys, request) = tokio::task::spawn_blocking(move || {
        let (kubelet_key, kubelet_csr) = key_and_csr("kubelet client key")?;
        let (proxy_key, proxy_csr) = key_and_csr("kube-proxy key")?;
        let (serving_key, serving_csr) = key_and_csr("kubelet serving key")?;
        Ok::<_, ClusterError>((
            [kubelet_key, proxy_key, serving_key],
            (kubelet_csr, proxy_csr, serving_csr),
        ))
    })
    .await
    .map_err(|source| ClusterError::Task {
        what: "generating the join keys",
        source,
    })??;
    let body = JoinRequest {
        token: conn.token.clone(),
        node_name: node_name.clone(),
        role,
        kubelet_client_csr: request.0,
        kube_proxy_csr: request.1,
        kubelet_serving_csr: request.2,
        etcd_peer_port: (role == Role::ControlPlane).then_some(peer_port),
    };
    let body = serde_json::to_vec(&body).map_err(|e| ClusterError::Internal {
        reason: e.to_string(),
    })?;
    let (status, bytes) = post(conn, "/v1/join", body).await?;
    if status != 200 {
        let message = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error)
            .unwrap_or_else(|_| format!("HTTP {status}"));
        return Err(ClusterError::Refused {
            address: conn.address.to_string(),
            message,
        });
    }
    let answer: JoinResponse =
        serde_json::from_slice(&bytes).map_err(|e| ClusterError::Refused {
            address: conn.address.to_string(),
            message: format!("unreadable answer: {e}"),
        })?;
    let joined = Joined {
        agent: conn.address.to_string(),
        role,
        node_name,
        apiserver_endpoints: answer.apiserver_endpoints.clone(),
        joined_at: super::token::now_unix(),
    };
    let data = data.clone();
    let record = joined.clone();
    tokio::task::spawn_blocking(move || match (role, &answer.control_plane) {
        (Role::ControlPlane, Some(material)) => {
            write_control_plane(&data, config, material, &record)
        }
        (Role::ControlPlane, None) => Err(ClusterError::Refused {
            address: record.agent.clone(),
            message: "the answer holds no control-plane material".into(),
        }),
        (Role::Worker, _) => write_worker(&data, config, &answer, &keys, &record),
    })
    .await
    .map_err(|source| ClusterError::Task {
        what: "writing the joined node's files",
        source,
    })??;
    info!(agent = %joined.agent, role = %role, "joined the cluster");
    Ok(joined)
}

/// Moves what this node made for itself as a single node out of the way (into
/// `cluster/before-join/`): its certificates, kubeconfigs, etcd member and etcd args.
fn set_aside(data: &DataDir) -> Result<(), ClusterError> {
    let aside = data.cluster_dir().join("before-join");
    let _ = std::fs::remove_dir_all(&aside);
    fsutil::ensure_dir(&aside, 0o700).map_err(|source| ClusterError::Io {
        path: aside.clone(),
        source,
    })?;
    for (path, name) in [
        (data.certs_dir(), "certs"),
        (data.kubeconfig_dir(), "kubeconfig"),
        (data.datastore_dir().join("etcd"), "etcd"),
        (data.args_file("etcd"), "etcd.args"),
    ] {
        if path.exists() {
            std::fs::rename(&path, aside.join(name))
                .map_err(|source| ClusterError::Io { path, source })?;
        }
    }
    Ok(())
}

fn write_control_plane(
    data: &DataDir,
    mut config: NodeConfig,
    material: &ControlPlaneMaterial,
    joined: &Joined,
) -> Result<(), ClusterError> {
    set_aside(data)?;
    let certs = data.certs_dir();
    for dir in [certs.clone(), certs.join("etcd")] {
        fsutil::ensure_dir(&dir, 0o700).map_err(|source| ClusterError::Io {
            path: dir.clone(),
            source,
        })?;
    }
    for name in CONTROL_PLANE_FILES {
        let text = material
            .files
            .get(*name)
            .ok_or_else(|| ClusterError::Refused {
                address: joined.agent.clone(),
                message: format!("the answer lacks certs/{name}"),
            })?;
        let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
        let path = certs.join(name);
        fsutil::atomic_write(&path, text.as_bytes(), mode)
            .map_err(|source| ClusterError::Io { path, source })?;
    }
    write_initial_cluster(
        data,
        &InitialCluster {
            initial_cluster: material.etcd_initial_cluster.clone(),
            state: "existing".into(),
        },
    )?;
    config.role = Role::ControlPlane;
    config.datastore = crate::config::DatastoreKind::Etcd;
    config.save(data)?;
    nodes::write_joined(data, joined)
}

fn write_worker(
    data: &DataDir,
    mut config: NodeConfig,
    answer: &JoinResponse,
    keys: &[KeyPair; 3],
    joined: &Joined,
) -> Result<(), ClusterError> {
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| ClusterError::Io { path, source }
    };
    let certs = data.certs_dir();
    // a worker holds no CA key: whatever this node issued for itself is set aside
    set_aside(data)?;
    fsutil::ensure_dir(&certs, 0o700).map_err(io(&certs))?;
    let write = |name: &str, text: &str, mode: u32| {
        let path = certs.join(name);
        fsutil::atomic_write(&path, text.as_bytes(), mode).map_err(io(&path))
    };
    write("ca.crt", &answer.ca_crt, 0o644)?;
    let [kubelet_key, proxy_key, serving_key] = keys;
    write("kubelet.crt", &answer.kubelet_serving_crt, 0o644)?;
    write("kubelet.key", &serving_key.serialize_pem(), 0o600)?;
    let server = answer
        .apiserver_endpoints
        .first()
        .cloned()
        .unwrap_or_else(|| crate::pki::DEFAULT_SERVER.to_string());
    let kubeconfigs = data.kubeconfig_dir();
    fsutil::ensure_dir(&kubeconfigs, 0o700).map_err(io(&kubeconfigs))?;
    // the kubelet renews its client certificate itself (CSR API) in its certificate
    // directory; its kubeconfig points at the file it keeps current there
    let current = renew::write_kubelet_client(
        data,
        &answer.kubelet_client_crt,
        &kubelet_key.serialize_pem(),
    )?;
    let kubelet_conf = renew::render_kubeconfig_with_files(
        &server,
        &answer.ca_crt,
        &format!("system:node:{}", joined.node_name),
        &current,
    );
    let path = kubeconfigs.join("kubelet.conf");
    fsutil::atomic_write(&path, kubelet_conf.as_bytes(), 0o600).map_err(io(&path))?;
    renew::write_kube_proxy(data, &server, &answer.kube_proxy_crt, proxy_key)?;
    renew::ensure_kubelet_cert_dir_flag(data)?;
    config.role = Role::Worker;
    // pods must find the cluster's DNS and services where the control plane put them
    if let Ok(dns) = answer.cluster_dns.parse() {
        config.network.cluster_dns = dns;
    }
    config.network.cluster_domain = answer.cluster_domain.clone();
    config.network.service_cidr = answer.service_cidr.clone();
    // the egress guard and kube-proxy tell pod traffic by the cluster's pod CIDR
    config.network.pod_cidr = answer.pod_cidr.clone();
    config.save(data)?;
    nodes::write_joined(data, joined)
}
