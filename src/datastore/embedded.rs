//! The embedded datastore as a supervised service: the daemon runs it in-process
//! (a [`Builtin`]) on `<data>/run/datastore.sock`.

use std::os::unix::fs::PermissionsExt;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::server::Server;
use crate::config::DataDir;
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
            let result = server.run(listener, shutdown).await;
            let _ = std::fs::remove_file(&socket);
            result.map_err(|e| error_chain(&e))
        })
    }
}
