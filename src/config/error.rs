use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create directory {path}: check that the data dir is writable (run as root?)")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    // serde_saphyr's message names the line and the unknown or mistyped field; it is
    // shown with the file so the user can fix it without reading the cause chain.
    #[error("{path}: {source}; fix the file or remove the entry to use the default")]
    Parse {
        path: PathBuf,
        source: serde_saphyr::Error,
    },
    #[error("cannot write the settings as YAML for {path}")]
    Serialize {
        path: PathBuf,
        #[source]
        source: serde_saphyr::SerializeError,
    },
    #[error("{path}: {field} {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}
