//! Making keys and certificates with rcgen. Pure: nothing here touches the disk.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::error::PkiError;
use super::spec::San;
use crate::config::KeyAlgorithm;

/// Lifetime of the CAs.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Leaves are valid from a little before their issue, for hosts with skewed clocks.
const BACKDATE: Duration = Duration::from_secs(60);

pub fn generate_key(algorithm: KeyAlgorithm, name: &str) -> Result<KeyPair, PkiError> {
    let generated = match algorithm {
        KeyAlgorithm::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyAlgorithm::Rsa2048 => {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        }
    };
    generated.map_err(|source| PkiError::Generate {
        name: name.to_string(),
        source,
    })
}

fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // a positive INTEGER of at most 20 octets (RFC 5280)
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn name(common_name: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    if let Some(org) = org {
        dn.push(DnType::OrganizationName, org);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

/// The parameters of a CA certificate; also what signs leaves (its name and key id).
pub fn ca_params(common_name: &str, now: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name, None);
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(serial());
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    params
}

/// A self-signed CA certificate for `key`, as PEM.
pub fn self_signed_ca(
    common_name: &str,
    key: &KeyPair,
    now: OffsetDateTime,
) -> Result<String, PkiError> {
    ca_params(common_name, now)
        .self_signed(key)
        .map(|c| c.pem())
        .map_err(|source| PkiError::Generate {
            name: common_name.to_string(),
            source,
        })
}

/// What a leaf certificate says about its subject.
pub struct LeafRequest<'a> {
    pub name: &'a str,
    pub common_name: &'a str,
    pub org: Option<&'a str>,
    pub server: bool,
    pub client: bool,
    pub sans: Vec<San>,
    pub validity: Duration,
}

/// Signs a leaf for `key` with the CA (`ca_pem` is its certificate, `ca_key` its key).
pub fn sign_leaf(
    request: &LeafRequest<'_>,
    key: &KeyPair,
    ca_pem: &str,
    ca_key: &KeyPair,
    now: OffsetDateTime,
) -> Result<String, PkiError> {
    let generate = |source| PkiError::Generate {
        name: request.name.to_string(),
        source,
    };
    let issuer = Issuer::from_ca_cert_pem(ca_pem, ca_key).map_err(generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(request.common_name, request.org);
    params.not_before = now - BACKDATE;
    params.not_after = now + request.validity;
    params.serial_number = Some(serial());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if key.algorithm() == &rcgen::PKCS_RSA_SHA256 {
        params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    if request.server {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
    }
    if request.client {
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ClientAuth);
    }
    params.use_authority_key_identifier_extension = true;
    for san in &request.sans {
        params.subject_alt_names.push(match san {
            San::Ip(ip) => SanType::IpAddress(*ip),
            San::Dns(dns) => SanType::DnsName(dns.clone().try_into().map_err(generate)?),
        });
    }
    params
        .signed_by(key, &issuer)
        .map(|c| c.pem())
        .map_err(generate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::inspect;

    #[test]
    fn leaf_verifies_against_its_ca_and_not_another() {
        let now = OffsetDateTime::now_utc();
        let ca_key = generate_key(KeyAlgorithm::EcdsaP256, "ca").unwrap();
        let ca_pem = self_signed_ca("test-ca", &ca_key, now).unwrap();
        let other_key = generate_key(KeyAlgorithm::EcdsaP256, "other").unwrap();
        let other_pem = self_signed_ca("test-ca", &other_key, now).unwrap();
        let key = generate_key(KeyAlgorithm::EcdsaP256, "leaf").unwrap();
        let request = LeafRequest {
            name: "leaf",
            common_name: "leaf",
            org: Some("system:masters"),
            server: true,
            client: false,
            sans: vec![San::Dns("example".into()), San::Ip([127, 0, 0, 1].into())],
            validity: Duration::from_secs(600),
        };
        let pem = sign_leaf(&request, &key, &ca_pem, &ca_key, now).unwrap();
        let leaf = &inspect::parse_pem_bundle(pem.as_bytes()).unwrap()[0];
        let ca = &inspect::parse_pem_bundle(ca_pem.as_bytes()).unwrap()[0];
        let other = &inspect::parse_pem_bundle(other_pem.as_bytes()).unwrap()[0];
        assert!(ca.is_ca && !leaf.is_ca);
        assert!(inspect::signed_by(leaf, ca));
        assert!(!inspect::signed_by(leaf, other), "same name, other key");
        assert!(inspect::key_matches(leaf, &key));
        assert!(!inspect::key_matches(leaf, &other_key));
        assert_eq!(leaf.sans.len(), 2);
        assert!(leaf.subject.contains("system:masters"), "{}", leaf.subject);
        assert!((leaf.not_after - now.unix_timestamp() - 600).abs() <= 1);
    }

    #[test]
    fn rsa_keys_can_be_made_and_used() {
        let now = OffsetDateTime::now_utc();
        let ca_key = generate_key(KeyAlgorithm::Rsa2048, "ca").unwrap();
        let ca_pem = self_signed_ca("rsa-ca", &ca_key, now).unwrap();
        let key = generate_key(KeyAlgorithm::Rsa2048, "leaf").unwrap();
        let request = LeafRequest {
            name: "leaf",
            common_name: "leaf",
            org: None,
            server: false,
            client: true,
            sans: Vec::new(),
            validity: Duration::from_secs(600),
        };
        let pem = sign_leaf(&request, &key, &ca_pem, &ca_key, now).unwrap();
        let leaf = &inspect::parse_pem_bundle(pem.as_bytes()).unwrap()[0];
        let ca = &inspect::parse_pem_bundle(ca_pem.as_bytes()).unwrap()[0];
        assert!(inspect::signed_by(leaf, ca));
        let reloaded = KeyPair::from_pem(&key.serialize_pem()).unwrap();
        assert!(inspect::key_matches(leaf, &reloaded));
    }
}
