//! Leaf certificates and the service-account key pair: what each leaf must say (names,
//! common name), how the one on disk compares, and issuing it.

use std::collections::BTreeSet;

use rcgen::KeyPair;

use super::error::PkiError;
use super::inspect::{self, CertInfo};
use super::spec::{self, Cn, LeafSpec, San};
use super::{Ca, EXTRA_SANS_FILE, Issued, Pki, SA, issue, read_optional, write};
use crate::report::error_chain;

/// How a leaf on disk compares with what it should be.
pub(super) enum LeafState {
    Ok,
    Missing(String),
    Invalid(String),
    Expired,
    Expiring,
    LacksNames(Vec<San>),
}

impl Pki {
    pub(super) fn added_sans(&self) -> Result<Vec<String>, PkiError> {
        let path = self.certs.join(EXTRA_SANS_FILE);
        Ok(read_optional(&path)?
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect())
    }

    pub(super) fn service_ip(&self) -> Result<std::net::IpAddr, PkiError> {
        self.config
            .network
            .kubernetes_service_ip()
            .map(Into::into)
            .map_err(PkiError::ServiceCidr)
    }

    pub(super) fn expected_sans(&self, leaf: &LeafSpec) -> Result<BTreeSet<San>, PkiError> {
        let mut extra = self.config.certs.extra_sans.clone();
        extra.extend(self.added_sans()?);
        let mut sans = spec::sans_for(
            leaf.sans,
            &self.host,
            (self.service_ip()?, &self.config.network.cluster_domain),
            &extra,
        );
        // the embedded datastore serves TLS on its configured addresses with this cert
        if leaf.name == spec::DATASTORE_SERVING_LEAF {
            for listen in &self.config.embedded.listen {
                let ip = listen.addr.ip();
                if !ip.is_unspecified() {
                    sans.insert(San::Ip(ip));
                }
            }
        }
        Ok(sans)
    }

    pub(super) fn common_name(&self, leaf: &LeafSpec) -> String {
        match leaf.cn {
            Cn::Fixed(name) => name.to_string(),
            Cn::Node => self.host.node_name.clone(),
            Cn::NodeUser => format!("system:node:{}", self.host.node_name),
        }
    }

    pub(super) fn leaf_state(
        &self,
        leaf: &LeafSpec,
        ca_bundle: &[CertInfo],
    ) -> Result<(Option<CertInfo>, LeafState), PkiError> {
        let cert_path = self.cert_path(leaf.name);
        let key_path = self.key_path(leaf.name);
        let Some(cert_pem) = read_optional(&cert_path)? else {
            return Ok((
                None,
                LeafState::Missing(format!("{} is missing", cert_path.display())),
            ));
        };
        let Some(key_pem) = read_optional(&key_path)? else {
            return Ok((
                None,
                LeafState::Missing(format!("{} is missing", key_path.display())),
            ));
        };
        let info = match inspect::parse_pem_bundle(cert_pem.as_bytes()) {
            Ok(mut certs) => certs.remove(0),
            Err(e) => {
                return Ok((
                    None,
                    LeafState::Invalid(format!("{}: {}", cert_path.display(), error_chain(&e))),
                ));
            }
        };
        let expected_cn = self.common_name(leaf);
        let state = match KeyPair::from_pem(&key_pem) {
            Err(e) => LeafState::Invalid(format!(
                "{} is not a PEM private key ({e})",
                key_path.display()
            )),
            Ok(key) if !inspect::key_matches(&info, &key) => LeafState::Invalid(format!(
                "{} does not belong to {}",
                key_path.display(),
                cert_path.display()
            )),
            Ok(_) if !ca_bundle.iter().any(|ca| inspect::signed_by(&info, ca)) => {
                LeafState::Invalid(format!("not signed by {}", spec::ca(leaf.ca).name))
            }
            // the node name is in some subjects: a renamed node needs them issued again
            Ok(_) if info.common_name.as_deref() != Some(expected_cn.as_str()) => {
                LeafState::Invalid(format!(
                    "its subject is CN={}, not CN={expected_cn} (was the node renamed?)",
                    info.common_name.as_deref().unwrap_or("(none)"),
                ))
            }
            Ok(_) => {
                let now = self.now.unix_timestamp();
                let lacking: Vec<San> = self
                    .expected_sans(leaf)?
                    .into_iter()
                    .filter(|s| !info.sans.contains(s))
                    .collect();
                if info.not_after <= now {
                    LeafState::Expired
                } else if info.not_before > now + 300 {
                    LeafState::Invalid("not valid yet (clock skew?)".into())
                } else if !lacking.is_empty() {
                    LeafState::LacksNames(lacking)
                } else if info.not_after - now <= self.window() {
                    LeafState::Expiring
                } else {
                    LeafState::Ok
                }
            }
        };
        Ok((Some(info), state))
    }

    pub(super) fn issue_leaf(&self, leaf: &LeafSpec, ca: &Ca) -> Result<(), PkiError> {
        let key_path = self.key_path(leaf.name);
        let algorithm = match self.config.certs.key_algorithm {
            crate::config::KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            crate::config::KeyAlgorithm::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
        };
        // keep a sound key of the configured type: only the certificate changes, so no
        // reader can ever pair a new certificate with an old key
        let existing = read_optional(&key_path)?
            .and_then(|pem| KeyPair::from_pem(&pem).ok())
            .filter(|k| k.algorithm() == algorithm);
        let key = match existing {
            Some(key) => key,
            None => {
                let key = issue::generate_key(self.config.certs.key_algorithm, leaf.name)?;
                write(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
                key
            }
        };
        let common_name = self.common_name(leaf);
        let request = issue::LeafRequest {
            name: leaf.name,
            common_name: &common_name,
            org: leaf.org,
            server: leaf.server,
            client: leaf.client,
            sans: self.expected_sans(leaf)?.into_iter().collect(),
            validity: self.config.certs.leaf_validity.duration(),
        };
        let pem = issue::sign_leaf(&request, &key, &ca.signing_pem, &ca.key, self.now)?;
        write(&self.cert_path(leaf.name), pem.as_bytes(), 0o644)
    }

    pub(super) fn ensure_sa(&self, issued: &mut Vec<Issued>) -> Result<(), PkiError> {
        let key_path = self.key_path(SA);
        let pub_path = self.certs.join(format!("{SA}.pub"));
        let key = match read_optional(&key_path)? {
            Some(pem) => KeyPair::from_pem(&pem).map_err(|e| PkiError::BadCa {
                path: key_path.clone(),
                what: "service-account key".into(),
                reason: format!("not a PEM private key ({e})"),
                certs_dir: self.certs.clone(),
            })?,
            None if pub_path.exists() => {
                return Err(PkiError::KeyMissing {
                    what: "service-account".into(),
                    key: key_path,
                    dependents: format!("{} and every issued token", pub_path.display()),
                    certs_dir: self.certs.clone(),
                });
            }
            None => {
                let key = issue::generate_key(self.config.certs.key_algorithm, SA)?;
                write(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
                issued.push(Issued {
                    name: SA.into(),
                    reason: "created".into(),
                    services: vec!["kube-apiserver".into(), "kube-controller-manager".into()],
                });
                key
            }
        };
        let public = key.public_key_pem();
        if read_optional(&pub_path)?.as_deref() != Some(public.as_str()) {
            write(&pub_path, public.as_bytes(), 0o644)?;
        }
        Ok(())
    }
}
