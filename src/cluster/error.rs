use std::path::PathBuf;

/// Errors of join tokens, the cluster agent and joining.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read or write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged ({reason}); remove it and create new tokens with `kdist add-node`")]
    Store { path: PathBuf, reason: String },
    #[error("join token is malformed: {reason}")]
    MalformedToken { reason: String },
    #[error("join token is not known to this node; create one with `kdist add-node` on it")]
    UnknownToken,
    #[error("join token {id} has expired; create a new one with `kdist add-node`")]
    ExpiredToken { id: String },
    #[error("join token {id} has already been used; create a new one with `kdist add-node`")]
    UsedToken { id: String },
    #[error(
        "join token {id} allows only worker joins; create a control-plane token with `kdist add-node --control-plane`"
    )]
    WrongRole { id: String },
    #[error("no join token with id `{id}`; see `kdist add-node --list`")]
    NoSuchTokenId { id: String },
    #[error("too many failed join attempts from {peer}; wait a minute and use a valid token")]
    RateLimited { peer: String },
    #[error("bad join request: {reason}")]
    BadRequest { reason: String },
    #[error(
        "connection string `{text}` is malformed: {reason}; expected <host>:<port>/<token>/<ca-sha256> as printed by `kdist add-node`"
    )]
    ConnectionString { text: String, reason: String },
    #[error("{what} is not a valid value: {reason}")]
    Invalid { what: String, reason: String },
    #[error(
        "this node runs the embedded datastore, which serves a single node; run `kdist datastore migrate --to etcd` on it first, then create a new token"
    )]
    EmbeddedDatastore,
    #[error(
        "node name `{name}` is the name of the control plane it joins; set another `node_name:` in the joining node's config.yaml"
    )]
    NameTaken { name: String },
    #[error("this node is a worker; run `kdist add-node` on a control-plane node")]
    NotControlPlane,
    #[error("certificate error ({what})")]
    Certificate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("TLS setup failed: {reason}")]
    Tls { reason: String },
    #[error(
        "cannot reach the cluster agent at {address}: {reason}; check the address and that `kdist` runs there (port {port} must be open)"
    )]
    Connect {
        address: String,
        port: u16,
        reason: String,
    },
    #[error(
        "the cluster agent at {address} presents a CA whose SHA-256 is not the pinned {pinned} (it sent {seen}); nothing was sent to it. Check the connection string, or that {address} is the node where you ran `kdist add-node`"
    )]
    CaMismatch {
        address: String,
        pinned: String,
        seen: String,
    },
    #[error("the cluster agent at {address} refused the join: {message}")]
    Refused { address: String, message: String },
    #[error("this node already belongs to a cluster ({path} exists); run `kdist leave` first")]
    AlreadyJoined { path: PathBuf },
    #[error("etcd refused `{command}`: {message}; check `kdist status` and `kdist logs etcd`")]
    Etcd { command: String, message: String },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{what} did not finish (its task panicked or was cancelled)")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("internal error: {reason}")]
    Internal { reason: String },
}

impl ClusterError {
    /// The HTTP status the join API answers with: the one mapping from errors to HTTP.
    pub fn http_status(&self) -> u16 {
        match self {
            ClusterError::MalformedToken { .. }
            | ClusterError::BadRequest { .. }
            | ClusterError::Invalid { .. } => 400,
            ClusterError::UnknownToken
            | ClusterError::ExpiredToken { .. }
            | ClusterError::UsedToken { .. } => 401,
            ClusterError::WrongRole { .. } | ClusterError::NotControlPlane => 403,
            ClusterError::NoSuchTokenId { .. } => 404,
            ClusterError::EmbeddedDatastore | ClusterError::NameTaken { .. } => 409,
            ClusterError::RateLimited { .. } => 429,
            ClusterError::Etcd { .. } => 503,
            _ => 500,
        }
    }

    /// Whether this error counts as a bad attempt for rate limiting.
    pub fn is_bad_attempt(&self) -> bool {
        matches!(self.http_status(), 400 | 401 | 403)
    }
}
