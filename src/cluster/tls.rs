//! TLS of the cluster agent: its serving certificate (signed by the cluster CA, issued
//! at each agent start into `<data>/cluster/agent.{crt,key}`), the CA fingerprint that
//! connection strings pin, and the joiner's verifier that checks that pin before any
//! byte of the request (and so the token) is sent.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::error::ClusterError;
use crate::config::DataDir;
use crate::fsutil;

const AGENT_VALIDITY: Duration = Duration::from_secs(365 * 86_400);

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn tls_err(reason: impl std::fmt::Display) -> ClusterError {
    ClusterError::Tls {
        reason: reason.to_string(),
    }
}

fn read(path: &std::path::Path) -> Result<String, ClusterError> {
    std::fs::read_to_string(path).map_err(|source| ClusterError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The first certificate of a PEM file, as DER.
fn first_cert(pem: &str, what: &str) -> Result<CertificateDer<'static>, ClusterError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| tls_err(format!("{what} holds no certificate")))?
        .map_err(|e| tls_err(format!("{what}: {e}")))
}

/// SHA-256 of the DER of a certificate, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The cluster CA's certificate (PEM of its first certificate) and fingerprint.
pub fn cluster_ca(data: &DataDir) -> Result<(String, String), ClusterError> {
    let path = data.certs_dir().join("ca.crt");
    let pem = read(&path)?;
    let der = first_cert(&pem, &path.display().to_string())?;
    let fp = fingerprint(&der);
    let single = crate::pki::pem_encode(&der);
    Ok((single, fp))
}

/// The cluster CA's issuer (certificate + key) for signing joiners' requests.
pub fn ca_issuer(data: &DataDir) -> Result<Issuer<'static, KeyPair>, ClusterError> {
    let (ca_pem, _) = cluster_ca(data)?;
    let key_path = data.certs_dir().join("ca.key");
    let key = KeyPair::from_pem(&read(&key_path)?).map_err(|source| ClusterError::Certificate {
        what: key_path.display().to_string(),
        source,
    })?;
    Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|source| ClusterError::Certificate {
        what: "cluster CA".into(),
        source,
    })
}

/// Parameters of a leaf signed for someone else (a joiner or the agent itself).
pub fn leaf_params(
    common_name: &str,
    org: Option<&str>,
    server: bool,
    client: bool,
    sans: &[SanType],
    validity: Duration,
) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if let Some(org) = org {
        dn.push(DnType::OrganizationName, org);
    }
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.not_before = now - Duration::from_secs(60);
    params.not_after = now + validity;
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    if server {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    if client {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    params.use_authority_key_identifier_extension = true;
    params.subject_alt_names = sans.to_vec();
    params
}

/// Issues the agent's serving certificate for `addresses` and returns the rustls server
/// configuration presenting it with the CA certificate (the joiner pins the CA).
pub fn agent_server_config(
    data: &DataDir,
    addresses: &[IpAddr],
) -> Result<rustls::ServerConfig, ClusterError> {
    let issuer = ca_issuer(data)?;
    let (ca_pem, _) = cluster_ca(data)?;
    let key = KeyPair::generate().map_err(|source| ClusterError::Certificate {
        what: "cluster agent key".into(),
        source,
    })?;
    let mut sans: Vec<SanType> = addresses.iter().map(|ip| SanType::IpAddress(*ip)).collect();
    if let Ok(dns) = "localhost".to_string().try_into() {
        sans.push(SanType::DnsName(dns));
    }
    let cert = leaf_params(
        "kdist-cluster-agent",
        None,
        true,
        false,
        &sans,
        AGENT_VALIDITY,
    )
    .signed_by(&key, &issuer)
    .map_err(|source| ClusterError::Certificate {
        what: "cluster agent certificate".into(),
        source,
    })?;
    let dir = data.cluster_dir();
    let (crt_path, key_path) = (dir.join("agent.crt"), dir.join("agent.key"));
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| ClusterError::Io { path, source }
    };
    fsutil::atomic_write(&key_path, key.serialize_pem().as_bytes(), 0o600)
        .map_err(io(&key_path))?;
    fsutil::atomic_write(&crt_path, cert.pem().as_bytes(), 0o644).map_err(io(&crt_path))?;
    let chain = vec![cert.der().clone(), first_cert(&ca_pem, "cluster CA")?];
    let key_der = PrivateKeyDer::try_from(key.serialize_der()).map_err(tls_err)?;
    // joiners come without a certificate; a node renewing its certificates presents its
    // kubelet client certificate, checked against every CA of ca.crt (two while the CA
    // rotates)
    let ca_path = data.certs_dir().join("ca.crt");
    let roots = roots(&read(&ca_path)?, &ca_path.display().to_string())?;
    let clients =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(tls_err)?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key_der)
        .map_err(tls_err)
}

/// Every certificate of a PEM file as trust anchors.
fn roots(pem: &str, what: &str) -> Result<RootCertStore, ClusterError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| tls_err(format!("{what}: {e}")))?)
            .map_err(|e| tls_err(format!("{what}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(tls_err(format!("{what} holds no certificate")));
    }
    Ok(roots)
}

/// The SHA-256 fingerprints of every certificate of a PEM file.
pub fn fingerprints(pem: &str) -> Vec<String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .flatten()
        .map(|c| fingerprint(&c))
        .collect()
}

/// The node a client certificate names: `<name>` of CN `system:node:<name>` with O
/// `system:nodes`, the identity the apiserver gives a kubelet. The chain has been
/// verified against the cluster CA by then.
pub(super) fn node_of_client_cert(der: &[u8]) -> Result<String, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .ok_or("its subject has no common name")?;
    let name = cn
        .strip_prefix("system:node:")
        .ok_or_else(|| format!("its common name `{cn}` is not system:node:<name>"))?;
    let in_nodes = subject
        .iter_organization()
        .any(|o| o.as_str().ok() == Some("system:nodes"));
    if !in_nodes {
        return Err(format!("`{cn}` is not in organization system:nodes"));
    }
    Ok(name.to_string())
}

/// Verifies the agent's chain against a CA pinned by fingerprint. The CA is taken from
/// the chain the server sends; a chain without a certificate of that fingerprint is
/// refused, so a wrong pin fails the handshake before the request is written.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pins: Vec<String>,
    provider: Arc<CryptoProvider>,
    /// Set when the handshake failed because no presented CA matched the pin.
    pub mismatch: Arc<Mutex<Option<String>>>,
}

impl PinnedCaVerifier {
    pub fn new(pin: &str) -> Self {
        Self::any_of(&[pin.to_string()])
    }

    /// Trusts a CA with any of these fingerprints.
    pub fn any_of(pins: &[String]) -> Self {
        Self {
            pins: pins.iter().map(|p| p.to_ascii_lowercase()).collect(),
            provider: provider(),
            mismatch: Arc::new(Mutex::new(None)),
        }
    }

    fn note_mismatch(&self, seen: String) {
        if let Ok(mut slot) = self.mismatch.lock() {
            *slot = Some(seen);
        }
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| self.pins.contains(&fingerprint(c)))
        else {
            let seen: Vec<String> = intermediates.iter().map(|c| fingerprint(c)).collect();
            self.note_mismatch(seen.join(", "));
            return Err(rustls::Error::General(
                "the server's CA does not match the pinned fingerprint".into(),
            ));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        match inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now) {
            Ok(verified) => Ok(verified),
            // the pinned CA is the trust anchor; the agent may be reached through an
            // address its certificate does not list (NAT, a new interface)
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration that trusts only the CA with fingerprint `pin`.
pub fn pinned_client_config(
    verifier: Arc<PinnedCaVerifier>,
) -> Result<rustls::ClientConfig, ClusterError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// A client configuration that trusts only the CAs of `verifier` and presents `chain`.
pub fn pinned_client_config_with_cert(
    verifier: Arc<PinnedCaVerifier>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ClientConfig, ClusterError> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(tls_err)
}

/// This host's IPv4 addresses other nodes may reach: not loopback, not link-local, not
/// the CNI bridge or pod veths.
pub fn host_addresses(bridge: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for ifaddr in addrs {
        let name = ifaddr.interface_name.as_str();
        if name == bridge || name.starts_with("veth") || name.starts_with("cni") {
            continue;
        }
        let Some(v4) = ifaddr.address.as_ref().and_then(|a| a.as_sockaddr_in()) else {
            continue;
        };
        let ip = v4.ip();
        if ip.is_loopback() || ip.is_link_local() || ip.is_unspecified() {
            continue;
        }
        let ip = IpAddr::V4(ip);
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}
