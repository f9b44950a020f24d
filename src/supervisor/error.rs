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
