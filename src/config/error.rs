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
        source: Box<serde_saphyr::Error>,
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
    #[error("{path}: {field} {error}")]
    BadValue {
        path: PathBuf,
        field: String,
        error: ValueError,
    },
}

/// A setting's value that is wrong whatever file or flag it came from; the message
/// names the value and the form expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("`{text}` is not an IPv4 CIDR like 10.1.0.0/16")]
    CidrSyntax { text: String },
    #[error("`{text}` has host bits set; did you mean {network}?")]
    CidrHostBits { text: String, network: String },
    #[error("`{text}` is too small; use a /28 or larger")]
    CidrTooSmall { text: String },
    #[error(
        "`{channel}` is not an EKS-D channel: write the Kubernetes minor as `1-XX`, e.g. `{example}`"
    )]
    Channel {
        channel: String,
        example: &'static str,
    },
    #[error("`{text}`: only http:// and https:// are supported")]
    EndpointScheme { text: String },
    #[error("`{text}` needs a scheme: https://{text} (or http:// for a plain-HTTP mirror)")]
    EndpointNoScheme { text: String },
    #[error("`{text}`: `{host}` is not a host[:port] (no user, query or spaces)")]
    EndpointHost { text: String, host: String },
    #[error("`{text}`: the path `{path}` has no place in a registry URL")]
    EndpointPath { text: String, path: String },
}
