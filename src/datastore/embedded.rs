//! The embedded datastore as a supervised service: the daemon runs it in-process
//! on `<data>/run/datastore.sock` and on the TCP addresses of
//! `embedded: listen:` in config.yaml (TLS from the etcd CA unless `http://`).

use std::os::unix::fs::PermissionsExt;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::error::DatastoreError;
use super::server::{Listeners, Server};
use super::service::ServerOptions;
use super::tls::{self, TlsFiles};
use crate::config::{DataDir, ListenAddr, NodeConfig};

/// The `datastore` service of a node whose config says `datastore: embedded`.
pub struct Embedded {
    data: DataDir,
}

impl Embedded {
    pub fn new(data: DataDir) -> Self {
        Self { data }
    }
}

impl Embedded {
    /// Serves the datastore until `shutdown` is cancelled.
    pub async fn serve(&self, shutdown: CancellationToken) -> Result<(), DatastoreError> {
        let data = &self.data;
        let db = super::db_path(data);
        let socket = data.datastore_socket();
        let config = NodeConfig::load(data).map_err(|e| DatastoreError::Config(Box::new(e)))?;
        // bound before the store opens: a taken port fails the start, visibly
        let (listeners, tcp_urls) = bind_tcp(data, &config.embedded.listen).await?;
        let mut urls = vec![format!("unix://{}", socket.display())];
        urls.extend(tcp_urls);
        // opening checks the file's integrity: blocking work, off the async workers
        let server = tokio::task::spawn_blocking(move || Server::open(&db))
            .await
            .map_err(DatastoreError::Task)??;
        let io = |source| DatastoreError::Io {
            path: socket.clone(),
            source,
        };
        // the daemon holds the data dir lock: a socket file left here is stale
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let listener = UnixListener::bind(&socket).map_err(io)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        if urls.len() > 1 {
            tracing::info!(listen = ?urls, "datastore serving on TCP too");
        }
        let server = server.with_options(ServerOptions {
            name: config.node_name(),
            client_urls: urls,
            ..ServerOptions::default()
        });
        let listeners = Listeners {
            unix: Some(listener),
            ..listeners
        };
        let result = server.serve(listeners, shutdown).await;
        let _ = std::fs::remove_file(&socket);
        result
    }
}

/// Binds the configured TCP addresses; returns the listeners and their client URLs.
async fn bind_tcp(
    data: &DataDir,
    addresses: &[ListenAddr],
) -> Result<(Listeners, Vec<String>), DatastoreError> {
    let mut listeners = Listeners::default();
    let mut urls = Vec::new();
    for listen in addresses {
        let bind_error = |source| DatastoreError::Listen {
            address: listen.to_string(),
            source,
        };
        let listener = tokio::net::TcpListener::bind(listen.addr)
            .await
            .map_err(bind_error)?;
        let bound = listener.local_addr().map_err(bind_error)?;
        urls.push(listen.url(bound));
        if listen.tls {
            let files = TlsFiles::etcd_server(data);
            let config = tls::server_config(&files, listen.addr.ip(), true)?;
            listeners.tls.push((listener, config));
        } else {
            tracing::warn!(%listen, "datastore: serving plain TCP without authentication, as configured");
            listeners.tcp.push(listener);
        }
    }
    Ok((listeners, urls))
}
