//! TLS of the datastore's TCP listeners and of kdist's own etcd clients, from the etcd
//! CA of kdist's PKI: the server presents `certs/etcd/server.{crt,key}` (re-read when the
//! file changes, so a renewal needs no restart) and requires a client certificate
//! signed by `certs/etcd/ca.crt`, as etcd does with `--client-cert-auth`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use super::error::DatastoreError;
use crate::config::DataDir;

/// The files of one TLS identity plus the CA it trusts (etcd's flag names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// What the datastore serves with: the etcd serving certificate.
    pub fn etcd_server(data: &DataDir) -> Self {
        let certs = data.certs_dir();
        Self {
            ca: certs.join("etcd/ca.crt"),
            cert: certs.join("etcd/server.crt"),
            key: certs.join("etcd/server.key"),
        }
    }

    /// What kdist's own commands present to etcd: kubeadm's healthcheck client.
    pub fn etcd_client(data: &DataDir) -> Self {
        let certs = data.certs_dir();
        Self {
            ca: certs.join("etcd/ca.crt"),
            cert: certs.join("etcd/healthcheck-client.crt"),
            key: certs.join("etcd/healthcheck-client.key"),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn tls_err(path: &Path, reason: impl std::fmt::Display) -> DatastoreError {
    DatastoreError::Tls {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, DatastoreError> {
    std::fs::read(path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound {
            "; create kdist's certificates with `kdist certs init`"
        } else {
            ""
        };
        tls_err(path, format!("{e}{hint}"))
    })
}

fn certs_of(path: &Path) -> Result<Vec<CertificateDer<'static>>, DatastoreError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(path, e))?;
    if certs.is_empty() {
        return Err(tls_err(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn certified_key(
    files: &TlsFiles,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, DatastoreError> {
    let chain = certs_of(&files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|e| tls_err(&files.key, format!("not a PEM private key ({e})")))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| tls_err(&files.cert, e))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The serving certificate, re-read when its file changes (the daemon renews it).
#[derive(Debug)]
struct ReloadingCert {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: Mutex<(Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().ok()?;
        let stamp = modified(&self.files.cert);
        if stamp != current.0 {
            match certified_key(&self.files, &self.provider) {
                Ok(key) => *current = (stamp, Arc::new(key)),
                // keep serving the previous certificate while a renewal is half written
                Err(err) => {
                    tracing::warn!(error = %err, "datastore: cannot reload the serving certificate")
                }
            }
        }
        Some(current.1.clone())
    }
}

/// The TLS configuration of a datastore listener on `ip`: the serving certificate of
/// `files` (which must name `ip`, unless it is a wildcard) and, when `client_auth`,
/// a required client certificate signed by `files.ca`.
pub fn server_config(
    files: &TlsFiles,
    ip: IpAddr,
    client_auth: bool,
) -> Result<Arc<rustls::ServerConfig>, DatastoreError> {
    let provider = provider();
    let key = certified_key(files, &provider)?;
    if !ip.is_unspecified() {
        let pem = read(&files.cert)?;
        let named = crate::pki::cert_names_ip(&pem, ip)
            .map_err(|e| tls_err(&files.cert, crate::report::error_chain(&e)))?;
        if !named {
            return Err(tls_err(
                &files.cert,
                format!(
                    "the certificate does not name {ip}: list the address under \
                     `embedded: listen:` in config.yaml and run `kdist certs init` (the \
                     daemon does that at start), or listen on an address it names"
                ),
            ));
        }
    }
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&files.cert, e))?;
    let builder = if client_auth {
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs_of(&files.ca)? {
            roots.add(ca).map_err(|e| tls_err(&files.ca, e))?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| tls_err(&files.ca, e))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_cert_resolver(Arc::new(ReloadingCert {
        current: Mutex::new((modified(&files.cert), Arc::new(key))),
        files: files.clone(),
        provider,
    }));
    // gRPC is HTTP/2; Go clients (etcdctl, kube-apiserver) insist on it being negotiated
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// tonic's client TLS settings for `files`: trust `files.ca`, present `files.cert`.
pub fn client_config(
    files: &TlsFiles,
) -> Result<tonic::transport::ClientTlsConfig, DatastoreError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    // read up front: tonic's errors about unreadable material do not name the file
    let ca = read(&files.ca)?;
    certs_of(&files.ca)?;
    let cert = read(&files.cert)?;
    let key = read(&files.key)?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key)))
}
