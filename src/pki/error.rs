use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the {what} private key {key} is missing, but {dependents} depend on it; kdist will \
         not mint a new one behind their back: restore {key} from a backup, or remove \
         {certs_dir} to start a new PKI (every client then needs new credentials)"
    )]
    KeyMissing {
        what: String,
        key: PathBuf,
        dependents: String,
        certs_dir: PathBuf,
    },
    #[error(
        "{path} is not a usable {what}: {reason}; restore it from a backup, or remove \
         {certs_dir} to start a new PKI"
    )]
    BadCa {
        path: PathBuf,
        what: String,
        reason: String,
        certs_dir: PathBuf,
    },
    #[error("cannot generate or sign {name}")]
    Generate {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("unknown certificate `{name}`; known: {known}")]
    UnknownName { name: String, known: String },
    #[error(
        "`{value}` is neither an IP address nor a DNS name; give e.g. 10.0.0.5 or api.example.com"
    )]
    BadSan { value: String },
    #[error("config.yaml network.service_cidr: {0}")]
    ServiceCidr(crate::config::ValueError),
    #[error("config.yaml certs.{field}: {reason}")]
    Config { field: String, reason: String },
}

/// Why certificate text could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum CertParseError {
    #[error("not PEM")]
    Pem(#[source] x509_parser::error::PEMError),
    #[error("not an X.509 certificate")]
    Der(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("no PEM certificate in the file")]
    Empty,
}
