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

/// Where to serve: the unix socket (what kube-apiserver uses) and optionally TCP.
#[derive(Debug, Default)]
pub struct Listeners {
    pub unix: Option<UnixListener>,
    pub tcp: Option<TcpListener>,
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
                tcp: None,
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
        let router = || {
            let limit = MAX_REQUEST_BYTES + GRPC_OVERHEAD_BYTES;
            tonic::transport::Server::builder()
                .add_service(KvServer::new(api.clone()).max_decoding_message_size(limit))
                .add_service(WatchServer::new(api.clone()).max_decoding_message_size(limit))
                .add_service(LeaseServer::new(api.clone()).max_decoding_message_size(limit))
                .add_service(ClusterServer::new(api.clone()).max_decoding_message_size(limit))
                .add_service(MaintenanceServer::new(api.clone()).max_decoding_message_size(limit))
        };
        let unix = async {
            match listeners.unix {
                Some(l) => {
                    router()
                        .serve_with_incoming_shutdown(
                            authority::incoming(authority::AnyListener::Unix(l), shutdown.clone()),
                            shutdown.cancelled(),
                        )
                        .await
                }
                None => Ok(()),
            }
        };
        let tcp = async {
            match listeners.tcp {
                Some(l) => {
                    router()
                        .serve_with_incoming_shutdown(
                            authority::incoming(authority::AnyListener::Tcp(l), shutdown.clone()),
                            shutdown.cancelled(),
                        )
                        .await
                }
                None => Ok(()),
            }
        };
        let (u, t) = tokio::join!(unix, tcp);
        shutdown.cancel();
        let _ = expiry.await;
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.close()).await;
        tracing::info!("datastore stopped");
        u.and(t).map_err(DatastoreError::Serve)
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
