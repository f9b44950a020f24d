use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ComponentsError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the work on {path} did not finish (its task panicked or was cancelled)")]
    Task {
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error(
        "cannot reach {url}; check the network or use `--from DIR|BUNDLE` on a machine without one"
    )]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("transfer of {url} broke off; the next attempt resumes it")]
    Transfer {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} refused to resume a partial download ({have} bytes); starting over")]
    ResumeRefused { url: String, have: u64 },
    #[error("{url} answered {status}{hint}")]
    HttpStatus {
        url: String,
        status: u16,
        hint: &'static str,
    },
    #[error("download of {url} failed after {attempts} attempts")]
    DownloadFailed {
        url: String,
        attempts: u32,
        #[source]
        source: Box<ComponentsError>,
    },
    #[error("{url} ended after {got} of {expected} bytes")]
    Truncated {
        url: String,
        got: u64,
        expected: u64,
    },
    #[error(
        "{what}: {algorithm} is {actual}, the manifest says {expected}; the file is corrupt or was tampered with and was not installed (the active release is unchanged): check the manifest and mirror before retrying"
    )]
    Digest {
        what: String,
        algorithm: &'static str,
        expected: String,
        actual: String,
    },
    #[error("{origin}: not a valid EKS-D manifest")]
    ManifestParse {
        origin: String,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    #[error("{origin}: {reason}")]
    ManifestInvalid { origin: String, reason: String },
    #[error(
        "EKS-D release {release} has no {os}/{arch} asset for: {}; pick a release that publishes {os}/{arch} builds",
        missing.join(", ")
    )]
    MissingAssets {
        release: String,
        os: String,
        arch: String,
        missing: Vec<String>,
    },
    #[error("{archive} does not contain {member}; the release is not usable on this node")]
    MissingMember { archive: String, member: String },
    #[error("{path}: cannot read the archive")]
    Archive {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("release `{release}` is not installed (installed: {}); run `kdist components list`", if installed.is_empty() { "none".to_string() } else { installed.join(", ") })]
    NotInstalled {
        release: String,
        installed: Vec<String>,
    },
    #[error("`{given}` is not a release; write it as <channel>-<number>, e.g. 1-31-12")]
    BadReleaseId { given: String },
    #[error("release {release} is active; `kdist components use` another release first")]
    Active { release: String },
    #[error(
        "release {release} is active: installing it again replaces the binaries this node runs, which --no-activate does not do; run the install without --no-activate"
    )]
    ActiveNoActivate { release: String },
    #[error("no release is active in {path}; run `kdist components install`")]
    NoActive { path: PathBuf },
    #[error("another `kdist components` command is changing {path}; wait for it to finish")]
    Locked { path: PathBuf },
    #[error("{path}: {reason}")]
    Source { path: PathBuf, reason: String },
    #[error(
        "cannot install EKS-D {what}, and these binaries are not on PATH either: {}; install with `kdist components install --from DIR|BUNDLE` (air gap) or put them on PATH",
        missing.join(", ")
    )]
    NoFallback {
        what: String,
        missing: Vec<String>,
        #[source]
        source: Box<ComponentsError>,
    },
}

impl ComponentsError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self + use<> {
        let path = path.to_path_buf();
        move |source| Self::Io { path, source }
    }
}
