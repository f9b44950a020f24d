//! The embedded datastore: kdist's own server of the etcd v3 gRPC API (KV, Watch,
//! Lease, Cluster, Maintenance) backed by one SQLite file, so kube-apiserver runs
//! against `unix://<data>/run/datastore.sock` with no etcd process.
//!
//! It owns `<data>/datastore/state.db` (and its `-wal`/`-shm`), the datastore socket and
//! its TCP listeners (TLS from the etcd CA, `tls`). `remote` and `EtcdRestore` operate a
//! datastore through the etcd API or etcd's tools (`kdist datastore` on `datastore: etcd`).
//! Durability: every acknowledged write follows an fdatasync of the WAL; throughput:
//! group commit on one writer thread, with only history stored (the newest version of
//! each key is an in-memory index); reads on a snapshot of that index and a pool of
//! read connections; watch events pushed on commit; MVCC history kept until compaction. It must not touch other subsystems' files; the
//! supervisor runs it as an in-process service through [`Server::run`].

mod authority;
pub mod bench;
pub mod client;
mod error;
mod etcd_restore;
mod index;
pub mod migrate;
mod mvcc;
mod ops;
pub mod proto;
pub mod remote;
mod server;
mod service;
mod store;
pub mod tls;
mod watch;

use std::path::{Path, PathBuf};

mod embedded;

pub use embedded::Embedded;
pub use error::{ApiError, DatastoreError};
pub use etcd_restore::EtcdRestore;
pub use ops::{LocalStatus, backup_file, compact_file, defrag_file, local_status, restore_file};
pub use server::{Listeners, Server};
pub use service::{ETCD_VERSION, ServerOptions};

use crate::config::DataDir;

/// The embedded datastore's database file in a data dir.
pub fn db_path(data: &DataDir) -> PathBuf {
    data.datastore_dir().join("state.db")
}

/// Checks that `path` is an intact kdist datastore without changing it.
pub fn verify(path: &Path) -> Result<(), DatastoreError> {
    store::verify(path)
}
