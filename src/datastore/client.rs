//! Connecting to an etcd v3 endpoint — kdist's own datastore or a real etcd — with the
//! generated gRPC stubs. Used by the `kdist datastore` commands and the benchmark.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use super::error::DatastoreError;
use super::tls::TlsFiles;

/// An endpoint as users write it: `unix:///path/to.sock`, `http://host:port`,
/// `https://host:port` or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    Http(String),
    Https(String),
}

impl Target {
    pub fn parse(endpoint: &str) -> Result<Self, DatastoreError> {
        if let Some(path) = endpoint.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(DatastoreError::Endpoint {
                    endpoint: endpoint.into(),
                    reason: "the unix socket path is empty".into(),
                });
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        if endpoint.starts_with("https://") {
            endpoint
                .parse::<Uri>()
                .map_err(|e| DatastoreError::Endpoint {
                    endpoint: endpoint.into(),
                    reason: e.to_string(),
                })?;
            return Ok(Target::Https(endpoint.to_string()));
        }
        let url = if endpoint.starts_with("http://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        url.parse::<Uri>().map_err(|e| DatastoreError::Endpoint {
            endpoint: endpoint.into(),
            reason: e.to_string(),
        })?;
        Ok(Target::Http(url))
    }
}

/// Opens a gRPC channel to `endpoint` (see [`Target::parse`]); not for https.
pub async fn connect(endpoint: &str) -> Result<Channel, DatastoreError> {
    connect_with(endpoint, None).await
}

/// Opens a gRPC channel to `endpoint`, over TLS with `tls` for `https://` endpoints.
pub async fn connect_with(
    endpoint: &str,
    tls: Option<&TlsFiles>,
) -> Result<Channel, DatastoreError> {
    let failed = |e: tonic::transport::Error| DatastoreError::Connect {
        endpoint: endpoint.to_string(),
        source: e,
    };
    match Target::parse(endpoint)? {
        Target::Http(url) => Endpoint::from_shared(url)
            .map_err(failed)?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(failed),
        Target::Https(url) => {
            let Some(files) = tls else {
                return Err(DatastoreError::Endpoint {
                    endpoint: endpoint.into(),
                    reason: "an https endpoint needs a CA and a client certificate".into(),
                });
            };
            Endpoint::from_shared(url)
                .map_err(failed)?
                .tls_config(super::tls::client_config(files)?)
                .map_err(failed)?
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(failed)
        }
        Target::Unix(path) => {
            // The URI is required by the API but unused: the connector dials the socket.
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(failed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_by_scheme() {
        assert_eq!(
            Target::parse("unix:///run/ds.sock").unwrap(),
            Target::Unix("/run/ds.sock".into())
        );
        assert_eq!(
            Target::parse("127.0.0.1:2379").unwrap(),
            Target::Http("http://127.0.0.1:2379".into())
        );
        assert_eq!(
            Target::parse("https://127.0.0.1:2379").unwrap(),
            Target::Https("https://127.0.0.1:2379".into())
        );
        assert!(Target::parse("unix://").is_err());
    }

    #[tokio::test]
    async fn https_without_tls_material_is_refused() {
        let err = connect("https://127.0.0.1:1")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("client certificate"), "{err}");
    }
}
