//! `kdist certs check`: a report per certificate, kubeconfig and the service-account
//! key, read from disk without writing anything.

use std::path::{Path, PathBuf};

use rcgen::KeyPair;

use super::inspect::{self, CertInfo};
use super::spec::{self, CaId, LeafSpec};
use super::{CertReport, CertStatus, LeafState, Pki, SA};
use crate::report::error_chain;

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

impl Pki {
    pub(super) fn check(&self) -> Vec<CertReport> {
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
    pub(super) fn check_kubeconfig(&self, leaf: &LeafSpec, file: &str) -> CertReport {
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

    pub(super) fn check_sa(&self) -> CertReport {
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

    pub(super) fn fill(&self, report: &mut CertReport, info: &CertInfo) {
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

    pub(super) fn window(&self) -> i64 {
        i64::try_from(self.config.certs.renewal_window.duration().as_secs()).unwrap_or(i64::MAX)
    }
}
