//! The `embedded:` section of config.yaml: extra TCP addresses on which the embedded
//! datastore serves the etcd API (besides `<data>/run/datastore.sock`), for etcdctl and
//! other etcd clients.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One TCP address of the datastore: `https://IP:PORT` (or a bare `IP:PORT`) is TLS
/// with client certificates of the etcd CA required; `http://IP:PORT` is plain TCP,
/// only ever served when written out like that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr {
    pub addr: SocketAddr,
    pub tls: bool,
}

impl ListenAddr {
    /// The client URL of this address (with the port actually bound).
    pub fn url(&self, bound: SocketAddr) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{bound}")
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (tls, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            (false, rest)
        } else {
            (true, text)
        };
        let addr = rest.trim_end_matches('/').parse().map_err(|_| {
            format!("`{text}` is not an address like https://127.0.0.1:2379 (mTLS) or http://127.0.0.1:2379 (plain)")
        })?;
        Ok(Self { addr, tls })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url(self.addr))
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Settings of the embedded datastore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// TCP addresses to serve on, e.g. `[https://127.0.0.1:12379]`. TLS uses
    /// `certs/etcd/server.{crt,key}`, whose names then include each address.
    pub listen: Vec<ListenAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_unless_http_is_written() {
        let a: ListenAddr = "127.0.0.1:2379".parse().unwrap();
        assert!(a.tls);
        let a: ListenAddr = "https://[::1]:2379".parse().unwrap();
        assert!(a.tls && a.addr.is_ipv6());
        let a: ListenAddr = "http://0.0.0.0:2379".parse().unwrap();
        assert!(!a.tls);
        assert_eq!(a.to_string(), "http://0.0.0.0:2379");
        let err = "https://localhost:2379".parse::<ListenAddr>().unwrap_err();
        assert!(err.contains("localhost:2379"), "{err}");
    }
}
