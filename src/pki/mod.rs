//! kdist's PKI: the cluster, front-proxy and etcd CAs, the service-account key pair,
//! every leaf certificate of the node's components (kubeadm's file names under
//! `<data>/certs/`) and the kubeconfigs under `<data>/kubeconfig/`.
//!
//! It owns those two directories and nothing else: it never starts or signals a
//! process. It reports which services read what it re-issued ([`Issued::services`]);
//! restarting them is the supervisor's or the CLI's job. Every write is atomic, keys are
//! 0600 and never logged, and a CA key is never silently replaced.
//!
//! This file holds the entry points and the run that brings everything up to date;
//! `spec` says what exists, `ca` loads, creates and rotates the CAs, `leaves` decides
//! and issues leaf certificates and the service-account key pair, `issue` signs,
//! `check` reports, `inspect` reads certificates back, `kubeconfig` renders them.

mod ca;
mod check;
mod error;
mod inspect;
mod issue;
mod kubeconfig;
mod leaves;
mod spec;

pub use ca::pem_encode;
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
use serde::Serialize;
use time::OffsetDateTime;

use crate::config::{DataDir, NodeConfig, is_valid_san};
use crate::fsutil;
use ca::{Ca, keep_matching};
use leaves::LeafState;
use spec::{CaId, HostNames, San};

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
