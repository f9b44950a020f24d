//! kdist's PKI: the cluster, front-proxy and etcd CAs, the service-account key pair,
//! every leaf certificate of the node's components (kubeadm's file names under
//! `<data>/certs/`) and the kubeconfigs under `<data>/kubeconfig/`.
//!
//! It owns those two directories and nothing else: it never starts or signals a
//! process. It reports which services read what it re-issued ([`Issued::services`]);
//! restarting them is the supervisor's or the CLI's job. Every write is atomic, keys are
//! 0600 and never logged, and a CA key is never silently replaced.

mod error;
mod inspect;
mod issue;
mod kubeconfig;
mod spec;

pub use error::{CertParseError, PkiError};
pub use inspect::rfc3339;
pub use kubeconfig::{DEFAULT_SERVER, render as render_kubeconfig};
pub use spec::RESTART_ORDER;

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use rcgen::KeyPair;
use serde::Serialize;
use time::OffsetDateTime;

use crate::config::{DataDir, NodeConfig, is_valid_san};
use crate::fsutil;
use crate::report::error_chain;
use inspect::CertInfo;
use spec::{CaId, CaSpec, Cn, HostNames, LeafSpec, San};

/// Name of the service-account key pair on the command line and in `check`.
const SA: &str = "sa";
/// SANs added with `kdist certs add-san`, one per line.
const EXTRA_SANS_FILE: &str = "apiserver-extra-sans";
/// While the cluster CA rotates: the unix time until which the old CA stays trusted.
const ROTATION_FILE: &str = "ca-rotation";

/// Something `ensure`, `renew`, `rotate_ca` or `add_san` wrote, and who reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Issued {
    pub name: String,
    pub reason: String,
    /// Services to restart so they load it.
    pub services: Vec<String>,
}

/// The services to restart after `issued`, each once, in [`RESTART_ORDER`].
pub fn affected_services(issued: &[Issued]) -> Vec<String> {
    RESTART_ORDER
        .iter()
        .filter(|s| issued.iter().any(|i| i.services.iter().any(|x| x == *s)))
        .map(|s| s.to_string())
        .collect()
}

/// Whether the first certificate of `pem` names `ip` among its subject alternative names.
pub fn cert_names_ip(pem: &[u8], ip: std::net::IpAddr) -> Result<bool, CertParseError> {
    let certs = inspect::parse_pem_bundle(pem)?;
    let first = certs.first().ok_or(CertParseError::Empty)?;
    Ok(first.sans.contains(&San::Ip(ip)))
}

pub fn leaf_names() -> Vec<&'static str> {
    spec::LEAVES.iter().map(|l| l.name).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertStatus {
    Ok,
    /// Inside the renewal window.
    Expiring,
    Expired,
    /// Unreadable, not signed by its CA, key mismatch, or missing a required name.
    Invalid,
    Missing,
}

impl std::fmt::Display for CertStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ok => "ok",
            Self::Expiring => "expiring",
            Self::Expired => "expired",
            Self::Invalid => "invalid",
            Self::Missing => "missing",
        })
    }
}

/// One line of `kdist certs check`.
#[derive(Debug, Clone, Serialize)]
pub struct CertReport {
    pub name: String,
    /// `ca`, `leaf` or `key-pair`.
    pub kind: &'static str,
    pub path: PathBuf,
    pub subject: Option<String>,
    pub issuer: Option<String>,
    pub sans: Vec<String>,
    pub not_after: Option<String>,
    pub days_left: Option<f64>,
    pub status: CertStatus,
    /// What is wrong and what to do, when the status is not ok.
    pub problem: Option<String>,
}

/// Creates whatever is missing and re-issues every leaf that is unreadable, not signed
/// by its CA, expired, inside the renewal window, or lacking a name it needs (a new
/// host address). Idempotent: a second call with nothing due writes nothing.
/// Refuses when a CA key is gone but certificates signed by it remain.
pub fn ensure(data: &DataDir, config: &NodeConfig) -> Result<Vec<Issued>, PkiError> {
    Pki::open(data, config)?.run(&BTreeSet::new())
}

/// Re-issues the named leaves (all when `names` is empty) from the existing CAs, plus
/// whatever [`ensure`] would do.
pub fn renew(
    data: &DataDir,
    config: &NodeConfig,
    names: &[String],
) -> Result<Vec<Issued>, PkiError> {
    let mut force = BTreeSet::new();
    for name in names {
        let name = name.trim_end_matches(".crt");
        match spec::leaf(name) {
            Some(leaf) => {
                force.insert(leaf.name);
            }
            None if spec::CAS.iter().any(|c| c.name == name) || name == SA => {
                return Err(PkiError::UnknownName {
                    name: name.to_string(),
                    known: format!(
                        "{} (CAs are replaced with `kdist certs rotate-ca`)",
                        leaf_names().join(", ")
                    ),
                });
            }
            None => {
                return Err(PkiError::UnknownName {
                    name: name.to_string(),
                    known: leaf_names().join(", "),
                });
            }
        }
    }
    if names.is_empty() {
        force.extend(leaf_names());
    }
    Pki::open(data, config)?.run(&force)
}

/// Adds `san` (IP or DNS name) to the apiserver serving certificate, re-issuing it.
pub fn add_san(data: &DataDir, config: &NodeConfig, san: &str) -> Result<Vec<Issued>, PkiError> {
    if !is_valid_san(san) {
        return Err(PkiError::BadSan {
            value: san.to_string(),
        });
    }
    let pki = Pki::open(data, config)?;
    let mut extra = pki.added_sans()?;
    if !extra.iter().any(|s| s == san) {
        extra.push(san.to_string());
        let path = pki.certs.join(EXTRA_SANS_FILE);
        let mut text = extra.join("\n");
        text.push('\n');
        write(&path, text.as_bytes(), 0o644)?;
    }
    pki.run(&BTreeSet::new())
}

/// Replaces the cluster CA: the new CA is trusted next to the old one for `overlap`,
/// every leaf of the cluster CA is re-issued by the new one and the kubeconfigs carry
/// both, so clients holding either keep working. When the overlap ends, [`ensure`]
/// drops the old CA. An `overlap` of zero ends a rotation in progress at once.
pub fn rotate_ca(
    data: &DataDir,
    config: &NodeConfig,
    overlap: Duration,
) -> Result<Vec<Issued>, PkiError> {
    let pki = Pki::open(data, config)?;
    let rotation = pki.certs.join(ROTATION_FILE);
    if overlap.is_zero() {
        if rotation.exists() {
            write(&rotation, b"0\n", 0o644)?;
        }
        return pki.run(&BTreeSet::new());
    }
    // the CA must be sound (and exist) before it is replaced
    pki.run(&BTreeSet::new())?;
    let ca_spec = spec::ca(CaId::Cluster);
    let old = read_text(&pki.cert_path(ca_spec.name))?;
    let key = issue::generate_key(pki.config.certs.key_algorithm, ca_spec.name)?;
    let common_name = format!("{}-{}", ca_spec.common_name, pki.now.unix_timestamp());
    let new = issue::self_signed_ca(&common_name, &key, pki.now)?;
    // the signing cert is the first one matching ca.key: trust both, then switch keys
    let old_only: String = keep_matching(&old, None);
    write(
        &pki.cert_path(ca_spec.name),
        format!("{new}{old_only}").as_bytes(),
        0o644,
    )?;
    write(
        &pki.key_path(ca_spec.name),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    let until = pki.now.unix_timestamp() + i64::try_from(overlap.as_secs()).unwrap_or(i64::MAX);
    write(&rotation, format!("{until}\n").as_bytes(), 0o644)?;
    tracing::info!(
        until = %inspect::rfc3339(until),
        "cluster CA rotated; the old CA stays trusted until then"
    );
    let force: BTreeSet<&str> = spec::LEAVES
        .iter()
        .filter(|l| l.ca == CaId::Cluster)
        .map(|l| l.name)
        .collect();
    let mut issued = vec![Issued {
        name: ca_spec.name.to_string(),
        reason: "rotated; old and new CA trusted".to_string(),
        services: ca_spec.services.iter().map(|s| s.to_string()).collect(),
    }];
    issued.extend(pki.run(&force)?);
    Ok(issued)
}

/// Every CA, the service-account pair and every leaf with its state. Never writes.
pub fn check(data: &DataDir, config: &NodeConfig) -> Vec<CertReport> {
    let pki = Pki {
        certs: data.certs_dir(),
        kubeconfigs: data.kubeconfig_dir(),
        config: config.clone(),
        now: OffsetDateTime::now_utc(),
        host: HostNames::discover(config.node_name()),
        _lock: None,
    };
    pki.check()
}

/// Whether any report asks for attention (the exit status of `certs check`).
pub fn has_problems(reports: &[CertReport]) -> bool {
    reports.iter().any(|r| r.status != CertStatus::Ok)
}

/// A CA ready to sign: all certificates of its file and its key.
struct Ca {
    bundle: Vec<CertInfo>,
    /// The PEM of the certificate matching the key.
    signing_pem: String,
    /// The whole file (several certificates during a rotation).
    file_pem: String,
    key: KeyPair,
}

struct Pki {
    certs: PathBuf,
    kubeconfigs: PathBuf,
    config: NodeConfig,
    now: OffsetDateTime,
    host: HostNames,
    // serializes writers (the daemon's renewal and the CLI) on this data dir
    _lock: Option<Flock<File>>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    fsutil::atomic_write(path, contents, mode).map_err(io_err(path))
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

/// Reads a file, `None` when it does not exist.
fn read_optional(path: &Path) -> Result<Option<String>, PkiError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// The PEM blocks of `bundle` whose public key is `key`'s (all certificates when
/// `key` is `None`).
fn keep_matching(bundle: &str, key: Option<&KeyPair>) -> String {
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

/// How a leaf on disk compares with what it should be.
enum LeafState {
    Ok,
    Missing(String),
    Invalid(String),
    Expired,
    Expiring,
    LacksNames(Vec<San>),
}

impl Pki {
    fn open(data: &DataDir, config: &NodeConfig) -> Result<Self, PkiError> {
        let certs = data.certs_dir();
        let kubeconfigs = data.kubeconfig_dir();
        for dir in [certs.clone(), certs.join("etcd"), kubeconfigs.clone()] {
            fsutil::ensure_dir(&dir, 0o700).map_err(io_err(&dir))?;
        }
        let lock_path = certs.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_err(&lock_path)(io::Error::from(errno)))?;
        Ok(Self {
            certs,
            kubeconfigs,
            config: config.clone(),
            now: OffsetDateTime::now_utc(),
            host: HostNames::discover(config.node_name()),
            _lock: Some(lock),
        })
    }

    fn cert_path(&self, name: &str) -> PathBuf {
        self.certs.join(format!("{name}.crt"))
    }
    fn key_path(&self, name: &str) -> PathBuf {
        self.certs.join(format!("{name}.key"))
    }

    fn added_sans(&self) -> Result<Vec<String>, PkiError> {
        let path = self.certs.join(EXTRA_SANS_FILE);
        Ok(read_optional(&path)?
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect())
    }

    fn service_ip(&self) -> Result<std::net::IpAddr, PkiError> {
        self.config
            .network
            .kubernetes_service_ip()
            .map(Into::into)
            .map_err(PkiError::ServiceCidr)
    }

    fn expected_sans(&self, leaf: &LeafSpec) -> Result<BTreeSet<San>, PkiError> {
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

    fn common_name(&self, leaf: &LeafSpec) -> String {
        match leaf.cn {
            Cn::Fixed(name) => name.to_string(),
            Cn::Node => self.host.node_name.clone(),
            Cn::NodeUser => format!("system:node:{}", self.host.node_name),
        }
    }

    fn window(&self) -> i64 {
        i64::try_from(self.config.certs.renewal_window.duration().as_secs()).unwrap_or(i64::MAX)
    }

    /// The leaves (and for the cluster CA, kubeconfigs) on disk that a CA has signed.
    fn dependents_of(&self, ca: &CaSpec) -> Vec<String> {
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
    fn load_or_create_ca(&self, spec: &CaSpec, issued: &mut Vec<Issued>) -> Result<Ca, PkiError> {
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
    fn finish_rotation(&self, ca: &mut Ca, issued: &mut Vec<Issued>) -> Result<(), PkiError> {
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

    fn leaf_state(
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

    fn issue_leaf(&self, leaf: &LeafSpec, ca: &Ca) -> Result<(), PkiError> {
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

    fn ensure_sa(&self, issued: &mut Vec<Issued>) -> Result<(), PkiError> {
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

    /// One pass: CAs, SA pair, leaves (those in `force` re-issued regardless), kubeconfigs.
    ///
    /// Without `force` (ensure) every CA must be sound. With `force` (renew) only the
    /// CAs of the forced leaves must be: one leaf can be repaired while an unrelated CA
    /// waits for its key to be restored, and leaves of that CA are left alone.
    fn run(&self, force: &BTreeSet<&str>) -> Result<Vec<Issued>, PkiError> {
        let strict = force.is_empty();
        let mut issued = Vec::new();
        let mut cas = Vec::new();
        for spec in spec::CAS {
            let loaded = self
                .load_or_create_ca(spec, &mut issued)
                .and_then(|mut ca| {
                    if spec.id == CaId::Cluster {
                        self.finish_rotation(&mut ca, &mut issued)?;
                    }
                    Ok(ca)
                });
            match loaded {
                Ok(ca) => cas.push((spec.id, ca)),
                Err(e) => {
                    let needed = strict
                        || spec::LEAVES
                            .iter()
                            .any(|l| l.ca == spec.id && force.contains(l.name));
                    if needed {
                        return Err(e);
                    }
                    tracing::warn!(ca = spec.name, "leaving its certificates alone: {e}");
                }
            }
        }
        let ca_of = |id: CaId| cas.iter().find(|(i, _)| *i == id).map(|(_, ca)| ca);
        if let Err(e) = self.ensure_sa(&mut issued) {
            if strict {
                return Err(e);
            }
            tracing::warn!("leaving the service-account key pair alone: {e}");
        }
        let mut reissued = BTreeSet::new();
        for leaf in spec::LEAVES {
            let Some(ca) = ca_of(leaf.ca) else {
                continue;
            };
            let (_, state) = self.leaf_state(leaf, &ca.bundle)?;
            let reason = match state {
                _ if force.contains(leaf.name) => "renewal requested".to_string(),
                LeafState::Ok => continue,
                LeafState::Missing(why) | LeafState::Invalid(why) => why,
                LeafState::Expired => "expired".to_string(),
                LeafState::Expiring => "inside the renewal window".to_string(),
                LeafState::LacksNames(names) => {
                    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
                    format!("lacked {}", names.join(", "))
                }
            };
            self.issue_leaf(leaf, ca)?;
            tracing::info!(cert = leaf.name, %reason, "certificate issued");
            reissued.insert(leaf.name);
            issued.push(Issued {
                name: leaf.name.to_string(),
                reason,
                services: leaf.services.iter().map(|s| s.to_string()).collect(),
            });
        }
        let Some(cluster) = ca_of(CaId::Cluster) else {
            return Ok(issued);
        };
        for leaf in spec::LEAVES {
            let Some(file) = leaf.kubeconfig else {
                continue;
            };
            let path = self.kubeconfigs.join(file);
            let text = kubeconfig::render(
                DEFAULT_SERVER,
                &cluster.file_pem,
                &self.common_name(leaf),
                &read_text(&self.cert_path(leaf.name))?,
                &read_text(&self.key_path(leaf.name))?,
            );
            if read_optional(&path)?.as_deref() == Some(text.as_str()) {
                continue;
            }
            write(&path, text.as_bytes(), 0o600)?;
            if !reissued.contains(leaf.name) {
                issued.push(Issued {
                    name: format!("kubeconfig/{file}"),
                    reason: "rewritten".into(),
                    services: leaf.services.iter().map(|s| s.to_string()).collect(),
                });
            }
        }
        Ok(issued)
    }

    fn check(&self) -> Vec<CertReport> {
        let mut reports = Vec::new();
        let mut bundles: Vec<(CaId, Vec<CertInfo>)> = Vec::new();
        for spec in spec::CAS {
            let path = self.cert_path(spec.name);
            let key_path = self.key_path(spec.name);
            let mut report = blank(spec.name, "ca", &path);
            match std::fs::read(&path) {
                Err(e) => {
                    report.status = CertStatus::Missing;
                    report.problem = Some(format!("{}: {e}", path.display()));
                }
                Ok(pem) => match inspect::parse_pem_bundle(&pem) {
                    Err(e) => {
                        report.status = CertStatus::Invalid;
                        report.problem = Some(error_chain(&e));
                    }
                    Ok(bundle) => {
                        let key = std::fs::read_to_string(&key_path)
                            .ok()
                            .and_then(|k| KeyPair::from_pem(&k).ok());
                        let signing = key.as_ref().and_then(|k| {
                            bundle.iter().find(|c| inspect::key_matches(c, k)).cloned()
                        });
                        let shown = signing.clone().unwrap_or_else(|| bundle[0].clone());
                        self.fill(&mut report, &shown);
                        if key.is_none() {
                            report.status = CertStatus::Invalid;
                            report.problem = Some(format!(
                                "its key {} is missing or unreadable; restore it from a backup",
                                key_path.display()
                            ));
                        } else if !shown.is_ca {
                            report.status = CertStatus::Invalid;
                            report.problem = Some("not a CA certificate".into());
                        } else if signing.is_none() {
                            report.status = CertStatus::Invalid;
                            report.problem =
                                Some(format!("{} does not match it", key_path.display()));
                        } else if report.status != CertStatus::Ok {
                            report.problem = Some("run `kdist certs rotate-ca`".into());
                        } else if bundle.len() > 1 {
                            report.problem = Some(format!(
                                "rotation in progress: {} CAs trusted",
                                bundle.len()
                            ));
                        }
                        bundles.push((spec.id, bundle));
                    }
                },
            }
            reports.push(report);
        }
        reports.push(self.check_sa());
        for leaf in spec::LEAVES {
            let path = self.cert_path(leaf.name);
            let mut report = blank(leaf.name, "leaf", &path);
            let bundle = bundles
                .iter()
                .find(|(id, _)| *id == leaf.ca)
                .map(|(_, b)| b.as_slice())
                .unwrap_or(&[]);
            let renew = format!("run `kdist certs renew {}`", leaf.name);
            match self.leaf_state(leaf, bundle) {
                Err(e) => {
                    report.status = CertStatus::Invalid;
                    report.problem = Some(e.to_string());
                }
                Ok((info, state)) => {
                    if let Some(info) = &info {
                        self.fill(&mut report, info);
                    }
                    let (status, problem) = match state {
                        LeafState::Ok => (CertStatus::Ok, None),
                        LeafState::Missing(why) => (CertStatus::Missing, Some(why)),
                        LeafState::Invalid(why) => (CertStatus::Invalid, Some(why)),
                        LeafState::Expired => (CertStatus::Expired, Some("expired".into())),
                        LeafState::Expiring => (
                            CertStatus::Expiring,
                            Some("inside the renewal window".into()),
                        ),
                        LeafState::LacksNames(names) => {
                            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
                            (
                                CertStatus::Invalid,
                                Some(format!("lacks {}", names.join(", "))),
                            )
                        }
                    };
                    report.status = status;
                    report.problem = problem.map(|p| format!("{p}; {renew}"));
                }
            }
            reports.push(report);
        }
        for leaf in spec::LEAVES {
            if let Some(file) = leaf.kubeconfig {
                reports.push(self.check_kubeconfig(leaf, file));
            }
        }
        reports
    }

    /// A kubeconfig must embed the current CA file and the current client certificate.
    fn check_kubeconfig(&self, leaf: &LeafSpec, file: &str) -> CertReport {
        let path = self.kubeconfigs.join(file);
        let mut report = blank(&format!("kubeconfig/{file}"), "kubeconfig", &path);
        let fix = "run `kdist certs init`";
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) => {
                report.status = CertStatus::Missing;
                report.problem = Some(format!("{}: {e}; {fix}", path.display()));
                return report;
            }
        };
        let decoded = |value: &serde_json::Value| -> Option<String> {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(value.as_str()?)
                .ok()?;
            String::from_utf8(bytes).ok()
        };
        let parsed: Option<serde_json::Value> = serde_saphyr::from_str(&text).ok();
        let embedded = parsed.as_ref().and_then(|v| {
            Some((
                decoded(&v["clusters"][0]["cluster"]["certificate-authority-data"])?,
                decoded(&v["users"][0]["user"]["client-certificate-data"])?,
            ))
        });
        let Some((ca_pem, cert_pem)) = embedded else {
            report.status = CertStatus::Invalid;
            report.problem = Some(format!(
                "not a kubeconfig with embedded certificates; {fix}"
            ));
            return report;
        };
        if let Ok(mut certs) = inspect::parse_pem_bundle(cert_pem.as_bytes()) {
            self.fill(&mut report, &certs.remove(0));
        }
        let current = |path: PathBuf| std::fs::read_to_string(path).unwrap_or_default();
        if cert_pem != current(self.cert_path(leaf.name)) {
            report.status = CertStatus::Invalid;
            report.problem = Some(format!(
                "does not embed the current {}.crt; {fix}",
                leaf.name
            ));
        } else if ca_pem != current(self.cert_path(spec::ca(leaf.ca).name)) {
            report.status = CertStatus::Invalid;
            report.problem = Some(format!("does not embed the current CA; {fix}"));
        } else if report.status != CertStatus::Ok {
            report.problem = Some(format!("run `kdist certs renew {}`", leaf.name));
        }
        report
    }

    fn check_sa(&self) -> CertReport {
        let key_path = self.key_path(SA);
        let pub_path = self.certs.join(format!("{SA}.pub"));
        let mut report = blank(SA, "key-pair", &key_path);
        let key = match std::fs::read_to_string(&key_path) {
            Err(e) => {
                report.status = CertStatus::Missing;
                report.problem = Some(format!("{}: {e}", key_path.display()));
                return report;
            }
            Ok(pem) => match KeyPair::from_pem(&pem) {
                Ok(key) => key,
                Err(e) => {
                    report.status = CertStatus::Invalid;
                    report.problem = Some(format!("not a PEM private key ({e})"));
                    return report;
                }
            },
        };
        if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(key.public_key_pem().as_str())
        {
            report.status = CertStatus::Invalid;
            report.problem = Some(format!(
                "{} is missing or does not match {}; run `kdist certs init`",
                pub_path.display(),
                key_path.display()
            ));
        }
        report
    }

    fn fill(&self, report: &mut CertReport, info: &CertInfo) {
        let now = self.now.unix_timestamp();
        let left = info.not_after - now;
        report.subject = Some(info.subject.clone());
        report.issuer = Some(info.issuer.clone());
        report.sans = info.sans.iter().map(|s| s.to_string()).collect();
        report.not_after = Some(inspect::rfc3339(info.not_after));
        report.days_left = Some((left as f64 / 86_400.0 * 100.0).round() / 100.0);
        report.status = if left <= 0 {
            CertStatus::Expired
        } else if left <= self.window() {
            CertStatus::Expiring
        } else {
            CertStatus::Ok
        };
    }
}

fn blank(name: &str, kind: &'static str, path: &Path) -> CertReport {
    CertReport {
        name: name.to_string(),
        kind,
        path: path.to_path_buf(),
        subject: None,
        issuer: None,
        sans: Vec::new(),
        not_after: None,
        days_left: None,
        status: CertStatus::Ok,
        problem: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_data(tag: &str) -> DataDir {
        let root = std::env::temp_dir().join(format!("kdist-pki-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        DataDir::new(root)
    }

    #[test]
    fn ensure_creates_everything_once() {
        let data = temp_data("ensure");
        let config = NodeConfig::default();
        let first = ensure(&data, &config).unwrap();
        assert!(first.iter().any(|i| i.name == "etcd/server"), "{first:?}");
        assert!(first.iter().any(|i| i.name == "ca"), "{first:?}");
        let second = ensure(&data, &config).unwrap();
        assert!(second.is_empty(), "nothing should be due: {second:?}");
        let reports = check(&data, &config);
        assert!(!has_problems(&reports), "{reports:#?}");
        for file in ["admin.conf", "kubelet.conf", "kube-proxy.conf"] {
            assert!(data.kubeconfig_dir().join(file).exists(), "{file}");
        }
        std::fs::remove_dir_all(data.root()).unwrap();
    }

    #[test]
    fn missing_ca_key_with_leaves_is_refused() {
        let data = temp_data("nokey");
        let config = NodeConfig::default();
        ensure(&data, &config).unwrap();
        std::fs::remove_file(data.certs_dir().join("etcd/ca.key")).unwrap();
        let err = ensure(&data, &config).unwrap_err().to_string();
        assert!(err.contains("etcd/ca.key"), "{err}");
        assert!(err.contains("etcd/server.crt"), "{err}");
        let ca = std::fs::read(data.certs_dir().join("etcd/ca.crt")).unwrap();
        ensure(&data, &config).unwrap_err();
        assert_eq!(
            std::fs::read(data.certs_dir().join("etcd/ca.crt")).unwrap(),
            ca,
            "the old CA must stay"
        );
        std::fs::remove_dir_all(data.root()).unwrap();
    }

    #[test]
    fn a_new_host_address_reissues_the_serving_certs() {
        let data = temp_data("newip");
        let config = NodeConfig::default();
        ensure(&data, &config).unwrap();
        let new_ip: std::net::IpAddr = "198.51.100.77".parse().unwrap();
        let issued = {
            let mut pki = Pki::open(&data, &config).unwrap();
            pki.host.addresses.push(new_ip);
            pki.run(&BTreeSet::new()).unwrap()
        };
        let names: Vec<&str> = issued.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["apiserver", "etcd/server", "etcd/peer", "kubelet"]);
        assert!(issued[0].reason.contains("IP:198.51.100.77"), "{issued:?}");
        assert_eq!(
            affected_services(&issued),
            ["etcd", "kube-apiserver", "kubelet"]
        );
        let pem = std::fs::read(data.certs_dir().join("apiserver.crt")).unwrap();
        let cert = &inspect::parse_pem_bundle(&pem).unwrap()[0];
        assert!(cert.sans.contains(&San::Ip(new_ip)));
        std::fs::remove_dir_all(data.root()).unwrap();
    }

    #[test]
    fn embedded_listen_addresses_go_into_the_etcd_serving_cert() {
        let data = temp_data("dslisten");
        ensure(&data, &NodeConfig::default()).unwrap();
        let ip: std::net::IpAddr = "127.0.0.9".parse().unwrap();
        let pem = std::fs::read(data.certs_dir().join("etcd/server.crt")).unwrap();
        assert!(!cert_names_ip(&pem, ip).unwrap());
        let config = NodeConfig::parse(
            "embedded:\n  listen: [\"https://127.0.0.9:12379\", \"0.0.0.0:12380\"]\n",
            Path::new("c"),
        )
        .unwrap();
        let issued = ensure(&data, &config).unwrap();
        let names: Vec<&str> = issued.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["etcd/server"]);
        let pem = std::fs::read(data.certs_dir().join("etcd/server.crt")).unwrap();
        assert!(cert_names_ip(&pem, ip).unwrap());
        std::fs::remove_dir_all(data.root()).unwrap();
    }

    #[test]
    fn renew_affects_the_services_reading_it() {
        let data = temp_data("renew");
        let config = NodeConfig::default();
        ensure(&data, &config).unwrap();
        let issued = renew(&data, &config, &["etcd/server".into(), "admin".into()]).unwrap();
        assert_eq!(affected_services(&issued), vec!["etcd".to_string()]);
        let err = renew(&data, &config, &["ca".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("rotate-ca"), "{err}");
        std::fs::remove_dir_all(data.root()).unwrap();
    }

    #[test]
    fn rotation_keeps_old_clients_trusted_until_the_overlap_ends() {
        let data = temp_data("rotate");
        let config = NodeConfig::default();
        ensure(&data, &config).unwrap();
        let ca_path = data.certs_dir().join("ca.crt");
        let old = inspect::parse_pem_bundle(&std::fs::read(&ca_path).unwrap()).unwrap();
        rotate_ca(&data, &config, Duration::from_secs(3600)).unwrap();
        let both = inspect::parse_pem_bundle(&std::fs::read(&ca_path).unwrap()).unwrap();
        assert_eq!(both.len(), 2);
        assert!(both.iter().any(|c| c.der == old[0].der));
        assert!(!has_problems(&check(&data, &config)));
        rotate_ca(&data, &config, Duration::ZERO).unwrap();
        let new = inspect::parse_pem_bundle(&std::fs::read(&ca_path).unwrap()).unwrap();
        assert_eq!(new.len(), 1);
        assert_ne!(new[0].der, old[0].der);
        let reports = check(&data, &config);
        assert!(!has_problems(&reports), "{reports:#?}");
        std::fs::remove_dir_all(data.root()).unwrap();
    }
}
