use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("service definition {path} is invalid")]
    Definition {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}:{line}: {reason}")]
    ArgsLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    // The reason is part of the message, as for ArgsLine: it says what to fix in the line.
    #[error("{path}:{line}: {error}")]
    ArgsExpand {
        path: PathBuf,
        line: usize,
        error: ArgsError,
    },
    #[error("config.yaml: {field}: {error}")]
    SettingExpand { field: String, error: ArgsError },
    #[error("config.yaml: `disable` names unknown service `{name}`; known services: {known}")]
    Disabled { name: String, known: String },
    #[error("config.yaml: {field}: {reason}")]
    Setting { field: String, reason: String },
    #[error("unknown service `{name}`; run `kdist status` to see the services of this node")]
    UnknownService { name: String },
    #[error(transparent)]
    BinaryNotFound(#[from] crate::components::BinaryNotFound),
    #[error("cannot start {service} ({program})")]
    Spawn {
        service: String,
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another kdist daemon already runs for {data_dir} (pid {pid}); use `kdist status` or `kdist stop`"
    )]
    AlreadyRunning { data_dir: PathBuf, pid: String },
    #[error(
        "kdist is not running for {data_dir} (no daemon answers on {socket}); run `kdist start`"
    )]
    NotRunning { data_dir: PathBuf, socket: PathBuf },
    #[error("control API request {what} failed")]
    Api {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    #[error("the daemon refused {what}: {message}")]
    Refused { what: String, message: String },
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Datastore(#[from] crate::datastore::DatastoreError),
    #[error("the {what} task did not finish (it panicked or was cancelled)")]
    Task {
        what: String,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("datastore migration refused: {reason}")]
    MigrateRefused { reason: String },
    #[error("datastore migration failed while {step}; the node is back on its {from} datastore")]
    MigrateFailed {
        step: String,
        from: String,
        #[source]
        source: Box<SupervisorError>,
    },
}

/// A `${VAR}` or `[condition]` of an args line that cannot be evaluated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("unclosed `${{` in `{text}`")]
    Unclosed { text: String },
    #[error("unknown variable ${{{name}}} (known: {known})")]
    UnknownVariable { name: String, known: String },
    #[error("condition `[{condition}]` names an unknown setting")]
    UnknownSetting { condition: String },
    #[error("`[{condition}]` is not a version range like [1.28-1.34] or [1.31+]")]
    BadRange { condition: String },
    #[error("`[{condition}]` needs the Kubernetes version of the binary, which is unknown")]
    UnknownVersion { condition: String },
}

/// Why a readiness probe failed: a short reason for `kdist status`.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot read probe {what} {path}")]
    ReadTls {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("probe {what} {path} is unusable")]
    BadTls {
        what: &'static str,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot build probe client")]
    Client(#[source] reqwest::Error),
    #[error("GET {url}")]
    Get {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: String },
    #[error("connect {address}: timed out")]
    ConnectTimeout { address: String },
    #[error("connect {address}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("probe command is empty")]
    EmptyCommand,
    #[error("{program}: timed out")]
    CommandTimeout { program: String },
    #[error("{program}")]
    Command {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program}: {status}")]
    CommandFailed { program: String, status: String },
}
