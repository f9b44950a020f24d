//! `Server`: opens the store and serves the etcd API on the listeners it is handed until
//! the shutdown token fires; also runs lease expiry.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use super::authority;
use super::error::DatastoreError;
use super::mvcc::MAX_REQUEST_BYTES;
use super::proto::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use super::service::{Api, ServerOptions};
use super::store::{Store, WriteOp};

/// gRPC overhead etcd allows on top of the request size limit.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;
const LEASE_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Where to serve: the unix socket (what kube-apiserver uses) and optionally TCP,
/// plain or with TLS.
#[derive(Debug, Default)]
pub struct Listeners {
    pub unix: Option<UnixListener>,
    pub tcp: Vec<TcpListener>,
    pub tls: Vec<(TcpListener, Arc<rustls::ServerConfig>)>,
}

/// The embedded datastore: the etcd v3 API over one SQLite file.
pub struct Server {
    store: Arc<Store>,
    options: ServerOptions,
}

impl Server {
    /// Opens (or creates) the datastore at `db`. A file that is not an intact datastore
    /// is refused with [`DatastoreError::Corrupt`] and never modified.
    pub fn open(db: &Path) -> Result<Self, DatastoreError> {
        Ok(Self {
            store: Arc::new(Store::open(db)?),
            options: ServerOptions::default(),
        })
    }

    pub fn with_options(mut self, options: ServerOptions) -> Self {
        self.options = options;
        self
    }

    /// Serves on `listener` until `shutdown` fires, then closes the database cleanly.
    pub async fn run(
        self,
        listener: UnixListener,
        shutdown: CancellationToken,
    ) -> Result<(), DatastoreError> {
        self.serve(
            Listeners {
                unix: Some(listener),
                ..Listeners::default()
            },
            shutdown,
        )
        .await
    }

    /// Serves on every given listener until `shutdown` fires.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: CancellationToken,
    ) -> Result<(), DatastoreError> {
        let api = Api {
            store: self.store.clone(),
            options: Arc::new(self.options),
            shutdown: shutdown.clone(),
        };
        let expiry = tokio::spawn(expire_leases(self.store.clone(), shutdown.clone()));
        let limit = MAX_REQUEST_BYTES + GRPC_OVERHEAD_BYTES;
        let router = tonic::transport::Server::builder()
            .add_service(KvServer::new(api.clone()).max_decoding_message_size(limit))
            .add_service(WatchServer::new(api.clone()).max_decoding_message_size(limit))
            .add_service(LeaseServer::new(api.clone()).max_decoding_message_size(limit))
            .add_service(ClusterServer::new(api.clone()).max_decoding_message_size(limit))
            .add_service(MaintenanceServer::new(api.clone()).max_decoding_message_size(limit));
        // every listener feeds one server: connections differ only in how they arrive
        let mut sources: Vec<authority::AnyListener> = Vec::new();
        sources.extend(listeners.unix.map(authority::AnyListener::Unix));
        sources.extend(listeners.tcp.into_iter().map(authority::AnyListener::Tcp));
        sources.extend(listeners.tls.into_iter().map(|(l, config)| {
            authority::AnyListener::Tls(l, tokio_rustls::TlsAcceptor::from(config))
        }));
        let incoming = futures::stream::select_all(
            sources
                .into_iter()
                .map(|l| authority::incoming(l, shutdown.clone())),
        );
        let served = router
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
            .await;
        shutdown.cancel();
        let _ = expiry.await;
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
        tracing::info!("datastore stopped");
        served.map_err(DatastoreError::Serve)
    }
}

/// Revokes leases whose TTL ran out; their keys go with normal delete events.
async fn expire_leases(store: Arc<Store>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(LEASE_CHECK_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        for id in store.expired_leases() {
            tracing::debug!(lease = id, "datastore: lease expired");
            store.write_detached(WriteOp::LeaseRevoke {
                id,
                only_if_expired: true,
            });
        }
    }
}
