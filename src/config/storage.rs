//! Node-local volumes: where the storage provisioner keeps them. Whether it runs is the
//! `storage` addon's switch (`kdist addons enable|disable storage`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::DataDir;

/// `storage:` in config.yaml.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Where volumes live; `<data>/storage` when unset. An absolute path.
    pub dir: Option<PathBuf>,
}

impl StorageConfig {
    /// The directory that holds this node's volumes.
    pub fn dir(&self, data: &DataDir) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| data.root().join("storage"))
    }

    /// Why `storage.dir` is unusable, if it is.
    pub(super) fn problem(&self) -> Option<&'static str> {
        let dir = self.dir.as_deref()?;
        if !dir.is_absolute() {
            return Some("must be an absolute path");
        }
        if dir
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Some("must not contain `..`");
        }
        if dir == Path::new("/") {
            return Some("must not be the root directory");
        }
        None
    }
}
