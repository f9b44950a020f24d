//! The CAs: loaded with their key or created, never replaced behind their dependents'
//! back, and the end of a cluster CA rotation.

use std::path::Path;

use rcgen::KeyPair;

use super::error::PkiError;
use super::inspect::{self, CertInfo};
use super::spec::{self, CaId, CaSpec};
use super::{Issued, Pki, ROTATION_FILE, io_err, issue, read_optional, write};
use crate::report::error_chain;

/// A CA ready to sign: all certificates of its file and its key.
pub(super) struct Ca {
    pub(super) bundle: Vec<CertInfo>,
    /// The PEM of the certificate matching the key.
    pub(super) signing_pem: String,
    /// The whole file (several certificates during a rotation).
    pub(super) file_pem: String,
    pub(super) key: KeyPair,
}

/// The PEM blocks of `bundle` whose public key is `key`'s (all certificates when
/// `key` is `None`).
pub(super) fn keep_matching(bundle: &str, key: Option<&KeyPair>) -> String {
    let mut out = String::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(bundle.as_bytes()).flatten() {
        if block.label != "CERTIFICATE" {
            continue;
        }
        let keep = match (key, inspect::parse_der(&block.contents)) {
            (None, Ok(_)) => true,
            (Some(key), Ok(info)) => inspect::key_matches(&info, key),
            (_, Err(_)) => false,
        };
        if keep {
            let pem = pem_encode(&block.contents);
            out.push_str(&pem);
        }
    }
    out
}

/// One certificate in DER as a PEM block (64-column base64, LF line ends).
pub fn pem_encode(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

impl Pki {
    /// The leaves (and for the cluster CA, kubeconfigs) on disk that a CA has signed.
    pub(super) fn dependents_of(&self, ca: &CaSpec) -> Vec<String> {
        let mut found: Vec<String> = spec::LEAVES
            .iter()
            .filter(|l| l.ca == ca.id && self.cert_path(l.name).exists())
            .map(|l| format!("{}.crt", l.name))
            .collect();
        if self.cert_path(ca.name).exists() {
            found.insert(0, format!("{}.crt", ca.name));
        }
        found
    }

    /// Loads a CA; creates it when nothing of it exists yet.
    pub(super) fn load_or_create_ca(
        &self,
        spec: &CaSpec,
        issued: &mut Vec<Issued>,
    ) -> Result<Ca, PkiError> {
        let cert_path = self.cert_path(spec.name);
        let key_path = self.key_path(spec.name);
        let bad = |path: &Path, what: &str, reason: String| PkiError::BadCa {
            path: path.to_path_buf(),
            what: what.to_string(),
            reason,
            certs_dir: self.certs.clone(),
        };
        let Some(key_pem) = read_optional(&key_path)? else {
            let dependents = self.dependents_of(spec);
            if !dependents.is_empty() {
                let title = match spec.id {
                    CaId::Cluster => "cluster CA",
                    CaId::FrontProxy => "front-proxy CA",
                    CaId::Etcd => "etcd CA",
                };
                return Err(PkiError::KeyMissing {
                    what: title.to_string(),
                    key: key_path,
                    dependents: dependents.join(", "),
                    certs_dir: self.certs.clone(),
                });
            }
            let key = issue::generate_key(self.config.certs.key_algorithm, spec.name)?;
            let pem = issue::self_signed_ca(spec.common_name, &key, self.now)?;
            write(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write(&cert_path, pem.as_bytes(), 0o644)?;
            tracing::info!(ca = spec.name, "CA created");
            issued.push(Issued {
                name: spec.name.to_string(),
                reason: "created".into(),
                services: spec.services.iter().map(|s| s.to_string()).collect(),
            });
            return self.load_or_create_ca(spec, &mut Vec::new());
        };
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| bad(&key_path, "CA key", format!("not a PEM private key ({e})")))?;
        let file_pem = match read_optional(&cert_path)? {
            Some(pem) => pem,
            None => {
                // the key is what matters: the same key and name re-make an equivalent
                // CA certificate under which every existing leaf still verifies
                let pem = issue::self_signed_ca(spec.common_name, &key, self.now)?;
                write(&cert_path, pem.as_bytes(), 0o644)?;
                tracing::warn!(
                    ca = spec.name,
                    "CA certificate was missing; re-made from its key"
                );
                issued.push(Issued {
                    name: spec.name.to_string(),
                    reason: "certificate re-made from the existing key".into(),
                    services: spec.services.iter().map(|s| s.to_string()).collect(),
                });
                pem
            }
        };
        let bundle = inspect::parse_pem_bundle(file_pem.as_bytes())
            .map_err(|e| bad(&cert_path, "CA certificate", error_chain(&e)))?;
        let signing_pem = keep_matching(&file_pem, Some(&key));
        if signing_pem.is_empty() {
            return Err(bad(
                &cert_path,
                "CA certificate",
                format!("no certificate in it matches {}", key_path.display()),
            ));
        }
        Ok(Ca {
            bundle,
            signing_pem,
            file_pem,
            key,
        })
    }

    /// Ends a cluster CA rotation whose overlap is over: only the new CA stays.
    pub(super) fn finish_rotation(
        &self,
        ca: &mut Ca,
        issued: &mut Vec<Issued>,
    ) -> Result<(), PkiError> {
        let path = self.certs.join(ROTATION_FILE);
        let Some(text) = read_optional(&path)? else {
            return Ok(());
        };
        let until: i64 = text.trim().parse().unwrap_or(0);
        if until > self.now.unix_timestamp() {
            return Ok(());
        }
        let spec = spec::ca(CaId::Cluster);
        write(&self.cert_path(spec.name), ca.signing_pem.as_bytes(), 0o644)?;
        std::fs::remove_file(&path).map_err(io_err(&path))?;
        ca.file_pem = ca.signing_pem.clone();
        ca.bundle =
            inspect::parse_pem_bundle(ca.file_pem.as_bytes()).map_err(|e| PkiError::BadCa {
                path: self.cert_path(spec.name),
                what: "CA certificate".into(),
                reason: error_chain(&e),
                certs_dir: self.certs.clone(),
            })?;
        tracing::info!("cluster CA rotation finished; the old CA is no longer trusted");
        issued.push(Issued {
            name: spec.name.to_string(),
            reason: "rotation finished; old CA no longer trusted".into(),
            services: spec.services.iter().map(|s| s.to_string()).collect(),
        });
        Ok(())
    }
}
