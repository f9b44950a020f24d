use std::path::PathBuf;

/// Errors of opening, serving and operating the embedded datastore.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error(
        "{path} is corrupt or not a kdist datastore ({reason}); it was left untouched: \
         restore a backup with `kdist datastore restore FILE --force` or move it away"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot open datastore {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("datastore {path}: sqlite error")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: i/o error")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the datastore writer thread")]
    Thread(#[source] std::io::Error),
    #[error("datastore server failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("{path} already exists: pass --force to replace it")]
    Exists { path: PathBuf },
    #[error("{path}: operation failed")]
    Operation {
        path: PathBuf,
        #[source]
        source: ApiError,
    },
    #[error("benchmark against {endpoint} failed: {reason}")]
    Bench { endpoint: String, reason: String },
    #[error("bad endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("{call} on {endpoint} failed")]
    Rpc {
        endpoint: String,
        call: &'static str,
        #[source]
        source: Box<tonic::Status>,
    },
    #[error("restoring the etcd snapshot {snapshot} into {data_dir} failed: {reason}")]
    EtcdRestore {
        snapshot: PathBuf,
        data_dir: PathBuf,
        reason: String,
    },
    #[error(
        "the target datastore {target} is not empty ({reason}); migration refused. Move it \
         away (it may be data of an earlier migration) and run the command again"
    )]
    TargetNotEmpty { target: String, reason: String },
    #[error("migration check failed: {reason}; the node stays on its current datastore")]
    Verify { reason: String },
    #[error("TLS material {path}: {reason}")]
    Tls { path: PathBuf, reason: String },
    #[error("embedded.listen {address}: cannot bind; change embedded.listen in config.yaml")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the node's configuration")]
    Config(#[source] Box<crate::config::ConfigError>),
    #[error("a datastore task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("cannot connect to {endpoint}: is the datastore running?")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Errors of the etcd API, each mapped to etcd's gRPC code and message (clients such as
/// kube-apiserver and etcdctl match on the message text).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExist,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: storage error")]
    Storage(#[source] rusqlite::Error),
    #[error("etcdserver: {0}")]
    Internal(String),
    #[error("etcdserver: server stopped")]
    Stopped,
}

impl From<rusqlite::Error> for ApiError {
    fn from(err: rusqlite::Error) -> Self {
        ApiError::Storage(err)
    }
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        use tonic::Code;
        let code = match &err {
            ApiError::EmptyKey
            | ApiError::KeyNotFound
            | ApiError::ValueProvided
            | ApiError::LeaseProvided
            | ApiError::TooManyOps
            | ApiError::DuplicateKey
            | ApiError::InvalidSortOption
            | ApiError::RequestTooLarge => Code::InvalidArgument,
            ApiError::Compacted | ApiError::FutureRev | ApiError::LeaseTtlTooLarge => {
                Code::OutOfRange
            }
            ApiError::LeaseNotFound => Code::NotFound,
            ApiError::LeaseExist => Code::FailedPrecondition,
            ApiError::Storage(err) => {
                tracing::warn!(error = %err, "datastore storage error");
                Code::Internal
            }
            ApiError::Internal(msg) => {
                tracing::warn!(error = %msg, "datastore internal error");
                Code::Internal
            }
            ApiError::Stopped => Code::Unavailable,
        };
        tonic::Status::new(code, err.to_string())
    }
}
