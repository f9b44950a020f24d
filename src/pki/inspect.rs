//! Reading certificates back: what they say, whether their CA signed them, and whether
//! a key belongs to them.

use std::collections::BTreeSet;
use std::net::IpAddr;

use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::error::CertParseError;
use super::spec::San;

/// The facts of one certificate that kdist looks at.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub der: Vec<u8>,
    pub subject: String,
    /// The subject's first CN, when it has one.
    pub common_name: Option<String>,
    pub issuer: String,
    pub sans: BTreeSet<San>,
    pub not_before: i64,
    pub not_after: i64,
    pub is_ca: bool,
    /// The raw subject public key (the BIT STRING content).
    pub public_key: Vec<u8>,
}

/// Every certificate of a PEM text (a CA file may hold a bundle during a rotation).
pub fn parse_pem_bundle(pem: &[u8]) -> Result<Vec<CertInfo>, CertParseError> {
    let mut certs = Vec::new();
    for block in Pem::iter_from_buffer(pem) {
        let block = block.map_err(CertParseError::Pem)?;
        if block.label != "CERTIFICATE" {
            continue;
        }
        certs.push(parse_der(&block.contents)?);
    }
    if certs.is_empty() {
        return Err(CertParseError::Empty);
    }
    Ok(certs)
}

pub fn parse_der(der: &[u8]) -> Result<CertInfo, CertParseError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(CertParseError::Der)?;
    let mut sans = BTreeSet::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(dns) => {
                    sans.insert(San::Dns(dns.to_string()));
                }
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        sans.insert(San::Ip(ip));
                    }
                }
                _ => {}
            }
        }
    }
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    Ok(CertInfo {
        der: der.to_vec(),
        subject: cert.subject().to_string(),
        common_name: cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string),
        issuer: cert.issuer().to_string(),
        sans,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca,
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

/// Whether `leaf` carries a valid signature of `ca` and names it as its issuer.
pub fn signed_by(leaf: &CertInfo, ca: &CertInfo) -> bool {
    let (Ok((_, leaf_cert)), Ok((_, ca_cert))) = (
        X509Certificate::from_der(&leaf.der),
        X509Certificate::from_der(&ca.der),
    ) else {
        return false;
    };
    leaf_cert.issuer() == ca_cert.subject()
        && leaf_cert
            .verify_signature(Some(ca_cert.public_key()))
            .is_ok()
}

/// Whether the private key `key` is the one whose public half `cert` carries.
pub fn key_matches(cert: &CertInfo, key: &rcgen::KeyPair) -> bool {
    cert.public_key == key.public_key_raw()
}

/// `2026-11-27T15:54:42Z` for a unix timestamp.
pub fn rfc3339(timestamp: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(timestamp) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => timestamp.to_string(),
    }
}
