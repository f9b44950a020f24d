use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{what} `{path}` holds a character an init file cannot carry safely (quote, backslash, `$`, `%`, backquote or a control character); use a path without it"
    )]
    UnsafePath { what: &'static str, path: PathBuf },
    #[error("`{command}` failed ({status}); see `journalctl -u kdist` or the init system's log")]
    Command { command: String, status: String },
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

impl ServiceError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + use<> {
        let path = path.to_path_buf();
        move |source| Self::Io { path, source }
    }
}
