//! The `components` section of `config.yaml`: which EKS-D release this node runs and
//! where it comes from. Installing is `crate::components`' job; this only parses.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{ConfigError, ValueError};

/// EKS-D channel installed when none is configured. 1-35 is the newest minor of the
/// supported range (1-30 .. 1-36) that has already had a run of patch releases; a
/// fresh channel is better chosen explicitly.
pub const DEFAULT_CHANNEL: &str = "1-35";

/// Where EKS-D publishes release channels, manifests and artifacts. A mirror that keeps
/// the same paths can stand in for it (`components.base_url`).
pub const DEFAULT_BASE_URL: &str = "https://distro.eks.amazonaws.com";

/// Which release of the channel to install: a pinned number or the newest one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReleasePin {
    #[default]
    Latest,
    Number(u32),
}

impl fmt::Display for ReleasePin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Latest => f.write_str("latest"),
            Self::Number(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for ReleasePin {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "latest" {
            return Ok(Self::Latest);
        }
        match s.parse::<u32>() {
            Ok(n) if n > 0 => Ok(Self::Number(n)),
            _ => Err(format!(
                "`{s}` is not a release: give a release number (1, 2, ...) or `latest`"
            )),
        }
    }
}

impl Serialize for ReleasePin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Latest => s.serialize_str("latest"),
            Self::Number(n) => s.serialize_u32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for ReleasePin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => format!("{n}").parse().map_err(serde::de::Error::custom),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `components:` in `config.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComponentsConfig {
    /// EKS-D channel, the Kubernetes minor written `1-XX`.
    pub channel: String,
    /// Release number within the channel, or `latest`.
    pub release: ReleasePin,
    /// Base URL of EKS-D (or a mirror with the same paths).
    pub base_url: String,
    /// Install the release on `kdist start` when no components are installed.
    pub auto_install: bool,
}

impl Default for ComponentsConfig {
    fn default() -> Self {
        Self {
            channel: DEFAULT_CHANNEL.to_string(),
            release: ReleasePin::Latest,
            base_url: DEFAULT_BASE_URL.to_string(),
            auto_install: true,
        }
    }
}

/// Checks the `1-XX` shape of a channel; the error says what is expected.
pub fn check_channel(channel: &str) -> Result<(), ValueError> {
    let ok = channel.split_once('-').is_some_and(|(major, minor)| {
        major == "1" && !minor.is_empty() && minor.chars().all(|c| c.is_ascii_digit())
    });
    if ok {
        Ok(())
    } else {
        Err(ValueError::Channel {
            channel: channel.to_string(),
            example: DEFAULT_CHANNEL,
        })
    }
}

impl ComponentsConfig {
    pub(super) fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            path: origin.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        check_channel(&self.channel).map_err(|error| ConfigError::BadValue {
            path: origin.to_path_buf(),
            field: "components.channel".into(),
            error,
        })?;
        if !(self.base_url.starts_with("https://") || self.base_url.starts_with("http://")) {
            return Err(invalid(
                "components.base_url",
                format!(
                    "`{}` must be an http:// or https:// URL (default {DEFAULT_BASE_URL})",
                    self.base_url
                ),
            ));
        }
        Ok(())
    }

    /// The base URL without a trailing slash.
    pub fn base(&self) -> &str {
        self.base_url.trim_end_matches('/')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_pin_reads_numbers_and_latest() {
        let c: ComponentsConfig = serde_saphyr::from_str("release: 12\n").unwrap();
        assert_eq!(c.release, ReleasePin::Number(12));
        let c: ComponentsConfig = serde_saphyr::from_str("release: latest\n").unwrap();
        assert_eq!(c.release, ReleasePin::Latest);
        let err = serde_saphyr::from_str::<ComponentsConfig>("release: newest\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("newest"), "{err}");
        assert!(serde_saphyr::from_str::<ComponentsConfig>("release: 0\n").is_err());
    }

    #[test]
    fn channel_shape_is_checked() {
        assert!(check_channel("1-31").is_ok());
        assert!(check_channel("1.31").is_err());
        assert!(check_channel("1-").is_err());
        assert!(check_channel("2-1x").is_err());
        let c = ComponentsConfig {
            channel: "131".into(),
            ..Default::default()
        };
        let err = c.validate(Path::new("/c.yaml")).unwrap_err().to_string();
        assert!(err.contains("components.channel"), "{err}");
    }
}
