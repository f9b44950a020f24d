//! Components carried inside the kdist binary (cargo feature `embed-components`, files
//! from `KDIST_EMBED_COMPONENTS_DIR` at build time, packed by `build/embed.rs` as a
//! bundle). At start they are installed when the data dir lacks them or they changed.

use super::error::ComponentsError;
use super::install::{self, Outcome, Request, Source};
use super::manifest::Release;
use super::progress::Progress;
use super::store::{Store, sha256_hex};
use crate::config::{ComponentsConfig, DataDir};

#[cfg(feature = "embed-components")]
static BUNDLE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kdist-components.tar.gz"));

/// The embedded bundle, when kdist was built with one.
pub fn bundle() -> Option<&'static [u8]> {
    #[cfg(feature = "embed-components")]
    {
        Some(BUNDLE)
    }
    #[cfg(not(feature = "embed-components"))]
    {
        None
    }
}

/// Installs `bundle` unless the same manifest is installed already. The embedded release
/// becomes active when it was (re)installed or when nothing is active.
pub async fn sync(
    data: &DataDir,
    bundle: &'static [u8],
    config: &ComponentsConfig,
    progress: &Progress,
) -> Result<Option<Outcome>, ComponentsError> {
    let origin = std::path::Path::new("(embedded components)");
    let text = super::bundle::manifest_of(bundle, origin)?;
    let release = Release::parse(&text, "embedded components")?;
    let id = release.id();
    let store = Store::new(data);
    let same = store
        .record(&id)
        .map(|r| r.manifest_sha256 == sha256_hex(text.as_bytes()))
        .unwrap_or(false);
    if same {
        if store.active().is_none() {
            store.activate(&id)?;
        }
        return Ok(None);
    }
    progress.line(&format!(
        "installing the components embedded in kdist ({})",
        id.eks_name()
    ));
    let mut request = Request::from_config(config);
    request.source = Source::Embedded(bundle);
    install::install(data, &request, progress).await.map(Some)
}
