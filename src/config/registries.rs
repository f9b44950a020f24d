//! The `registries:` section of config.yaml: mirrors, per-host credentials and TLS, in
//! the shape of k3s' `registries.yaml` so that its users can paste theirs, plus
//! `eks_mirror`, a shorthand that sends EKS-D's `public.ecr.aws` images to a mirror.
//!
//! Only parsing and validation live here; `node::registries` renders containerd's files.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::error::{ConfigError, ValueError};

/// The registry EKS-D publishes its images to.
pub const EKS_REGISTRY: &str = "public.ecr.aws";

/// `registries:` in config.yaml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RegistriesConfig {
    /// By registry name as images spell it (`docker.io`, `registry.k8s.io:443`), or `*`
    /// for every registry.
    pub mirrors: BTreeMap<String, Mirror>,
    /// By host (`mirror.example:5000`): the credentials and TLS settings used whenever
    /// kdist's containerd talks to that host, as a mirror or as a registry.
    pub configs: BTreeMap<String, HostConfig>,
    /// `[http://]HOST[:PORT][/PREFIX]`: `public.ecr.aws/R:T` is looked up as
    /// `HOST[:PORT]/PREFIX/R:T` first (e.g. `.../eks-distro/kubernetes/pause:3.9`).
    pub eks_mirror: Option<String>,
}

/// One registry's mirrors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mirror {
    /// Tried in order: `https://host[:port]`, `http://...` for a plain-HTTP mirror, and a
    /// path to use as the API root instead of `/v2` (`https://host/v2/prefix`).
    pub endpoint: Vec<String>,
    /// k3s' repository rewrites: containerd has no such setting, so any entry is refused.
    pub rewrite: BTreeMap<String, String>,
    /// After the endpoints, try the registry itself (default). `false` keeps pulls on
    /// the mirrors (air gap): a pull fails when none of them has the image.
    pub fallback: bool,
}

impl Default for Mirror {
    fn default() -> Self {
        Self {
            endpoint: Vec::new(),
            rewrite: BTreeMap::new(),
            fallback: true,
        }
    }
}

/// Settings for talking to one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    pub auth: Option<RegistryAuth>,
    pub tls: Option<RegistryTls>,
}

/// Credentials for one host: `username` + `password`, or `auth` (base64 of
/// `user:password`), or an OAuth `identity_token`. Debug output hides them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryAuth {
    pub username: Option<String>,
    pub password: Option<String>,
    pub auth: Option<String>,
    pub identity_token: Option<String>,
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "[hidden]");
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &hidden(&self.password))
            .field("auth", &hidden(&self.auth))
            .field("identity_token", &hidden(&self.identity_token))
            .finish()
    }
}

impl RegistryAuth {
    /// `user:password` for HTTP basic authentication, from either form; `None` for an
    /// identity token.
    pub fn basic(&self) -> Option<(String, String)> {
        if let (Some(user), Some(password)) = (&self.username, &self.password) {
            return Some((user.clone(), password.clone()));
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(self.auth.as_ref()?.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        Some((user.to_string(), password.to_string()))
    }
}

/// TLS towards one host. Paths are absolute and read by containerd at pull time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryTls {
    /// CA bundle (PEM) that signed the host's certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), both or neither.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
}

/// A parsed mirror endpoint or registry location: `scheme://host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: Scheme,
    /// `host[:port]` as written.
    pub host: String,
    /// Empty, or `/a/b` without a trailing slash.
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme.as_str(), self.host, self.path)
    }
}

impl Endpoint {
    /// Parses `https://host[:port][/path]`; with `default_scheme`, the scheme may be left
    /// out (`host:port/prefix`).
    pub fn parse(text: &str, default_scheme: Option<Scheme>) -> Result<Self, ValueError> {
        let (scheme, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else if text.contains("://") {
            return Err(ValueError::EndpointScheme { text: text.into() });
        } else {
            match default_scheme {
                Some(scheme) => (scheme, text),
                None => return Err(ValueError::EndpointNoScheme { text: text.into() }),
            }
        };
        let (host, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, ""),
        };
        if !is_host(host) {
            return Err(ValueError::EndpointHost {
                text: text.into(),
                host: host.into(),
            });
        }
        if path.contains(['?', '#', ' ']) || path.contains("//") {
            return Err(ValueError::EndpointPath {
                text: text.into(),
                path: path.into(),
            });
        }
        Ok(Self {
            scheme,
            host: host.to_string(),
            path: path.trim_end_matches('/').to_string(),
        })
    }
}

/// `host[:port]`: a DNS name, an IPv4 address or a bracketed IPv6 address, lowercase or
/// not, with an optional port.
pub fn is_host(text: &str) -> bool {
    let (name, port) = if let Some(rest) = text.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => (None, None),
            after => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return false,
            },
        }
    } else {
        match text.split_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(text), None),
        }
    };
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    let name_ok = name.is_none_or(|name| {
        !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            })
    });
    port_ok && name_ok
}

impl RegistriesConfig {
    /// Whether any host has credentials (then config.yaml is kept 0600).
    pub fn has_credentials(&self) -> bool {
        self.configs.values().any(|c| c.auth.is_some())
    }

    /// The mode of a config.yaml holding this section: 0600 with credentials.
    pub fn file_mode(&self) -> u32 {
        if self.has_credentials() { 0o600 } else { 0o644 }
    }

    pub fn is_empty(&self) -> bool {
        self.mirrors.is_empty() && self.configs.is_empty() && self.eks_mirror.is_none()
    }

    /// `eks_mirror` as an endpoint whose path is the mirror's API root
    /// (`https://host/v2/PREFIX`), or `None` when unset.
    pub fn eks_endpoint(&self) -> Option<Result<Endpoint, ValueError>> {
        self.eks_mirror.as_deref().map(|text| {
            let mut ep = Endpoint::parse(text, Some(Scheme::Https))?;
            ep.path = format!("/v2{}", ep.path);
            Ok(ep)
        })
    }

    pub(super) fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |field: String, reason: String| ConfigError::Invalid {
            path: origin.to_path_buf(),
            field,
            reason,
        };
        if let Some(parsed) = self.eks_endpoint() {
            parsed.map_err(|r| {
                invalid(
                    "registries.eks_mirror".into(),
                    format!("{r}; write HOST[:PORT]/PREFIX, e.g. registry.example:5000/eks"),
                )
            })?;
        }
        for (name, mirror) in &self.mirrors {
            let key = |sub: &str| format!("registries.mirrors.\"{name}\".{sub}");
            if name != "*" && !is_host(name) {
                return Err(invalid(
                    format!("registries.mirrors.\"{name}\""),
                    "is not a registry name: write host[:port] as images spell it (docker.io, \
                     registry.example:5000), without scheme or path, or `*`"
                        .into(),
                ));
            }
            if !mirror.rewrite.is_empty() {
                return Err(invalid(
                    key("rewrite"),
                    "is not supported: containerd cannot rewrite repository names (a k3s \
                     extension); remove it, and to look images up under a prefix give the \
                     endpoint that path, e.g. https://mirror.example:5000/v2/PREFIX"
                        .into(),
                ));
            }
            for endpoint in &mirror.endpoint {
                Endpoint::parse(endpoint, None)
                    .map_err(|r| invalid(key("endpoint"), r.to_string()))?;
            }
            let eks = name == EKS_REGISTRY && self.eks_mirror.is_some();
            if mirror.endpoint.is_empty() && !eks {
                return Err(invalid(
                    key("endpoint"),
                    "is empty: list at least one mirror URL, or remove the entry".into(),
                ));
            }
            if name == "*" && !mirror.fallback {
                return Err(invalid(
                    key("fallback"),
                    "cannot be false for `*`: name the registries that must not be contacted"
                        .into(),
                ));
            }
        }
        for (host, config) in &self.configs {
            let key = |sub: &str| format!("registries.configs.\"{host}\".{sub}");
            if !is_host(host) {
                return Err(invalid(
                    format!("registries.configs.\"{host}\""),
                    "is not a host[:port] (write mirror.example:5000, without scheme or path)"
                        .into(),
                ));
            }
            if let Some(auth) = &config.auth {
                let forms = [
                    auth.username.is_some() || auth.password.is_some(),
                    auth.auth.is_some(),
                    auth.identity_token.is_some(),
                ];
                match forms.iter().filter(|f| **f).count() {
                    0 => {
                        return Err(invalid(
                            key("auth"),
                            "is empty: give username and password, auth, or identity_token".into(),
                        ));
                    }
                    1 => {}
                    _ => {
                        return Err(invalid(
                            key("auth"),
                            "mixes forms: give one of username + password, auth, identity_token"
                                .into(),
                        ));
                    }
                }
                if (auth.username.is_some() || auth.password.is_some())
                    && (auth.username.is_none() || auth.password.is_none())
                {
                    return Err(invalid(
                        key("auth"),
                        "needs both username and password".into(),
                    ));
                }
                if auth.auth.is_some() && auth.basic().is_none() {
                    return Err(invalid(
                        key("auth.auth"),
                        "is not base64 of `user:password`".into(),
                    ));
                }
            }
            if let Some(tls) = &config.tls {
                for (sub, file) in [
                    ("tls.ca_file", &tls.ca_file),
                    ("tls.cert_file", &tls.cert_file),
                    ("tls.key_file", &tls.key_file),
                ] {
                    if let Some(file) = file
                        && !file.is_absolute()
                    {
                        return Err(invalid(
                            key(sub),
                            format!("`{}` must be an absolute path", file.display()),
                        ));
                    }
                }
                if tls.cert_file.is_some() != tls.key_file.is_some() {
                    return Err(invalid(
                        key("tls"),
                        "needs both cert_file and key_file for a client certificate".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeConfig;

    fn parse(yaml: &str) -> Result<NodeConfig, String> {
        NodeConfig::parse(yaml, Path::new("/c.yaml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_k3s_registries_file_is_read() {
        let config = parse(
            "registries:\n  mirrors:\n    docker.io:\n      endpoint: [\"https://mirror.example:5000\", \"http://127.0.0.1:5001/v2/dh\"]\n      fallback: false\n  configs:\n    \"mirror.example:5000\":\n      auth: {username: u, password: p}\n      tls: {ca_file: /etc/ssl/ca.pem, insecure_skip_verify: false}\n  eks_mirror: registry.example:5000/eks\n",
        )
        .unwrap();
        let r = &config.registries;
        assert_eq!(r.mirrors["docker.io"].endpoint.len(), 2);
        assert!(!r.mirrors["docker.io"].fallback);
        let auth = r.configs["mirror.example:5000"].auth.as_ref().unwrap();
        assert_eq!(auth.basic(), Some(("u".into(), "p".into())));
        assert_eq!(
            r.eks_endpoint().unwrap().unwrap().to_string(),
            "https://registry.example:5000/v2/eks"
        );
        // fallback defaults to true
        let config =
            parse("registries:\n  mirrors:\n    quay.io:\n      endpoint: [\"https://m\"]\n")
                .unwrap();
        assert!(config.registries.mirrors["quay.io"].fallback);
    }

    #[test]
    fn credentials_are_hidden_from_debug_output() {
        let auth = RegistryAuth {
            username: Some("u".into()),
            password: Some("hunter2".into()),
            ..Default::default()
        };
        let text = format!("{auth:?}");
        assert!(
            !text.contains("hunter2") && text.contains("hidden"),
            "{text}"
        );
        let auth = RegistryAuth {
            auth: Some("dTpodW50ZXIy".into()),
            ..Default::default()
        };
        assert_eq!(auth.basic(), Some(("u".into(), "hunter2".into())));
        assert!(!format!("{auth:?}").contains("dTpodW50ZXIy"));
    }

    #[test]
    fn bad_entries_are_refused_by_key() {
        for (yaml, key) in [
            (
                "registries:\n  mirrors:\n    docker.io:\n      endpoint: [\"https://m\"]\n      rewrite: {\"^library/(.*)\": \"x/$1\"}\n",
                "registries.mirrors.\"docker.io\".rewrite",
            ),
            (
                "registries:\n  mirrors:\n    docker.io:\n      endpoint: [\"mirror:5000\"]\n",
                "registries.mirrors.\"docker.io\".endpoint",
            ),
            (
                "registries:\n  mirrors:\n    docker.io:\n      endpoint: [\"ftp://m\"]\n",
                "registries.mirrors.\"docker.io\".endpoint",
            ),
            (
                "registries:\n  mirrors:\n    docker.io: {}\n",
                "registries.mirrors.\"docker.io\".endpoint",
            ),
            (
                "registries:\n  mirrors:\n    \"https://docker.io\":\n      endpoint: [\"https://m\"]\n",
                "registries.mirrors.\"https://docker.io\"",
            ),
            (
                "registries:\n  mirrors:\n    \"*\":\n      endpoint: [\"https://m\"]\n      fallback: false\n",
                "registries.mirrors.\"*\".fallback",
            ),
            (
                "registries:\n  configs:\n    m:\n      auth: {username: u}\n",
                "registries.configs.\"m\".auth",
            ),
            (
                "registries:\n  configs:\n    m:\n      auth: {auth: \"!!\"}\n",
                "registries.configs.\"m\".auth.auth",
            ),
            (
                "registries:\n  configs:\n    m:\n      auth: {username: u, password: p, identity_token: t}\n",
                "registries.configs.\"m\".auth",
            ),
            (
                "registries:\n  configs:\n    m:\n      tls: {ca_file: ca.pem}\n",
                "registries.configs.\"m\".tls.ca_file",
            ),
            (
                "registries:\n  configs:\n    m:\n      tls: {cert_file: /c.pem}\n",
                "registries.configs.\"m\".tls",
            ),
            (
                "registries:\n  configs:\n    \"m:0\": {}\n",
                "registries.configs.\"m:0\"",
            ),
            (
                "registries:\n  eks_mirror: \"reg istry/eks\"\n",
                "registries.eks_mirror",
            ),
        ] {
            let err = parse(yaml).unwrap_err();
            assert!(
                err.contains("/c.yaml") && err.contains(&format!("{key} ")),
                "{yaml}: {err}"
            );
        }
        // a mistyped key is named too
        let err =
            parse("registries:\n  mirrors:\n    docker.io:\n      endpoints: []\n").unwrap_err();
        assert!(err.contains("endpoints"), "{err}");
    }

    #[test]
    fn endpoints_and_hosts() {
        let ep = Endpoint::parse("http://127.0.0.1:5001/v2/x/", None).unwrap();
        assert_eq!(ep.scheme, Scheme::Http);
        assert_eq!(ep.host, "127.0.0.1:5001");
        assert_eq!(ep.path, "/v2/x");
        assert_eq!(
            Endpoint::parse("reg:5000", Some(Scheme::Https))
                .unwrap()
                .to_string(),
            "https://reg:5000"
        );
        for ok in [
            "docker.io",
            "reg.example:5000",
            "[::1]:5000",
            "127.0.0.1",
            "Quay.IO",
        ] {
            assert!(is_host(ok), "{ok}");
        }
        for bad in [
            "", "a b", "u@h", "h:", "h:99999", "-a.b", "a..b", "[zz]:1", "h/p",
        ] {
            assert!(!is_host(bad), "{bad}");
        }
    }
}
