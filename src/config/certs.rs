//! The `certs:` section of `config.yaml`: key algorithm, lifetimes and extra names of
//! the certificates kdist issues.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ConfigError;

/// Key type of every key kdist generates (CAs, leaves, service-account pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum KeyAlgorithm {
    #[default]
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    #[serde(rename = "rsa-2048")]
    Rsa2048,
}

/// A span of time written as a number and a unit: `90s`, `10m`, `12h`, `365d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime(Duration);

impl Lifetime {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }
    pub const fn from_days(days: u64) -> Self {
        Self(Duration::from_secs(days * 86_400))
    }
    pub fn duration(&self) -> Duration {
        self.0
    }
}

impl FromStr for Lifetime {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let bad = || format!("`{text}` is not a duration; write e.g. 90s, 10m, 12h or 365d");
        let number: u64 = number.parse().map_err(|_| bad())?;
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        number
            .checked_mul(unit_secs)
            .map(Self::from_secs)
            .ok_or_else(bad)
    }
}

impl fmt::Display for Lifetime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
            if secs != 0 && secs.is_multiple_of(size) {
                return write!(f, "{}{unit}", secs / size);
            }
        }
        write!(f, "{secs}s")
    }
}

impl Serialize for Lifetime {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lifetime {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Settings of kdist's PKI (`certs:` in config.yaml).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CertsConfig {
    /// `ecdsa-p256` (default) or `rsa-2048`; applies to keys generated from now on.
    pub key_algorithm: KeyAlgorithm,
    /// Lifetime of leaf certificates (CAs live 10 years).
    pub leaf_validity: Lifetime,
    /// Leaves with less than this left are renewed by the daemon and flagged by
    /// `kdist certs check`.
    pub renewal_window: Lifetime,
    /// How often the daemon looks for leaves to renew and host address changes.
    pub check_interval: Lifetime,
    /// Extra names (DNS or IP) for the apiserver serving certificate.
    pub extra_sans: Vec<String>,
    /// Kept for configs written before `network.service_cidr` existed: when given it must
    /// equal that, whose first address is the apiserver certificate's service IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_cidr: Option<String>,
}

impl Default for CertsConfig {
    fn default() -> Self {
        Self {
            key_algorithm: KeyAlgorithm::default(),
            leaf_validity: Lifetime::from_days(365),
            renewal_window: Lifetime::from_days(30),
            check_interval: Lifetime::from_secs(3_600),
            extra_sans: Vec::new(),
            service_cidr: None,
        }
    }
}

impl CertsConfig {
    pub(super) fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            path: origin.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        if self.leaf_validity.duration() < Duration::from_secs(60) {
            return Err(invalid(
                "certs.leaf_validity",
                "must be at least 1m".to_string(),
            ));
        }
        if self.renewal_window.duration() >= self.leaf_validity.duration() {
            return Err(invalid(
                "certs.renewal_window",
                format!(
                    "({}) must be shorter than certs.leaf_validity ({}), or every certificate would always be due",
                    self.renewal_window, self.leaf_validity
                ),
            ));
        }
        if self.check_interval.duration() < Duration::from_secs(1) {
            return Err(invalid(
                "certs.check_interval",
                "must be at least 1s".to_string(),
            ));
        }
        for san in &self.extra_sans {
            if !is_valid_san(san) {
                return Err(invalid(
                    "certs.extra_sans",
                    format!("`{san}` is neither an IP address nor a DNS name"),
                ));
            }
        }
        Ok(())
    }
}

/// Whether `san` can go into a certificate: an IP address or a DNS name.
pub fn is_valid_san(san: &str) -> bool {
    if san.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    is_dns_name_of(san, |c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
}

/// Whether `name` is dot-separated labels of 1 to 63 `allowed` characters, none starting
/// or ending with '-', at most 253 in all.
pub(super) fn is_dns_name_of(name: &str, allowed: impl Fn(char) -> bool) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(&allowed)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_parse_and_print() {
        assert_eq!(
            "10m".parse::<Lifetime>().unwrap().duration(),
            Duration::from_secs(600)
        );
        assert_eq!(
            "365d".parse::<Lifetime>().unwrap(),
            Lifetime::from_days(365)
        );
        assert_eq!(Lifetime::from_secs(7200).to_string(), "2h");
        assert_eq!(Lifetime::from_secs(90).to_string(), "90s");
        let err = "ten days".parse::<Lifetime>().unwrap_err();
        assert!(err.contains("ten days"), "{err}");
        assert!("5w".parse::<Lifetime>().is_err());
    }

    #[test]
    fn window_must_be_shorter_than_validity() {
        let c = CertsConfig {
            leaf_validity: Lifetime::from_secs(600),
            renewal_window: Lifetime::from_secs(600),
            ..Default::default()
        };
        let err = c.validate(Path::new("c.yaml")).unwrap_err().to_string();
        assert!(err.contains("certs.renewal_window"), "{err}");
    }

    #[test]
    fn sans_are_checked() {
        assert!(is_valid_san("10.0.0.1"));
        assert!(is_valid_san("::1"));
        assert!(is_valid_san("api.example.com"));
        assert!(!is_valid_san("bad name"));
        assert!(!is_valid_san("-x.com"));
    }
}
