//! The embedded datastore as a supervised service: the daemon runs it in-process
//! (a [`Builtin`]) on `<data>/run/datastore.sock` and on the TCP addresses of
//! `embedded: listen:` in config.yaml (TLS from the etcd CA unless `http://`).

use std::os::unix::fs::PermissionsExt;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::server::{Listeners, Server};
use super::service::ServerOptions;
use super::tls::{self, TlsFiles};
use crate::config::{DataDir, ListenAddr, NodeConfig};
use crate::report::error_chain;
use crate::supervisor::{Builtin, BuiltinFuture};

/// The `datastore` service of a node whose config says `datastore: embedded`.
pub struct Embedded {
    data: DataDir,
}

impl Embedded {
    pub fn new(data: DataDir) -> Self {
        Self { data }
    }
}

impl Builtin for Embedded {
    fn run(&self, shutdown: CancellationToken) -> BuiltinFuture {
        let data = self.data.clone();
        Box::pin(async move {
            let db = super::db_path(&data);
            let socket = data.datastore_socket();
            let config = NodeConfig::load(&data).map_err(|e| error_chain(&e))?;
            // bound before the store opens: a taken port fails the start, visibly
            let (listeners, tcp_urls) = bind_tcp(&data, &config.embedded.listen).await?;
            let mut urls = vec![format!("unix://{}", socket.display())];
            urls.extend(tcp_urls);
            // opening checks the file's integrity: blocking work, off the async workers
            let server = tokio::task::spawn_blocking(move || Server::open(&db))
                .await
                .map_err(|e| format!("opening the datastore: {e}"))?
                .map_err(|e| error_chain(&e))?;
            // the daemon holds the data dir lock: a socket file left here is stale
            match std::fs::remove_file(&socket) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("cannot remove stale {}: {e}", socket.display()));
                }
                _ => {}
            }
            let listener = UnixListener::bind(&socket)
                .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("cannot restrict {}: {e}", socket.display()))?;
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
            result.map_err(|e| error_chain(&e))
        })
    }
}

/// Binds the configured TCP addresses; returns the listeners and their client URLs.
async fn bind_tcp(
    data: &DataDir,
    addresses: &[ListenAddr],
) -> Result<(Listeners, Vec<String>), String> {
    let mut listeners = Listeners::default();
    let mut urls = Vec::new();
    for listen in addresses {
        let listener = tokio::net::TcpListener::bind(listen.addr)
            .await
            .map_err(|e| format!("embedded.listen {listen}: cannot bind: {e}"))?;
        let bound = listener
            .local_addr()
            .map_err(|e| format!("embedded.listen {listen}: {e}"))?;
        urls.push(listen.url(bound));
        if listen.tls {
            let files = TlsFiles::etcd_server(data);
            let config = tls::server_config(&files, listen.addr.ip(), true)
                .map_err(|e| format!("embedded.listen {listen}: {}", error_chain(&e)))?;
            listeners.tls.push((listener, config));
        } else {
            tracing::warn!(%listen, "datastore: serving plain TCP without authentication, as configured");
            listeners.tcp.push(listener);
        }
    }
    Ok((listeners, urls))
}
