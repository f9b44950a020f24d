//! Air-gap bundles: one `.tar.gz` holding a release's `manifest.yaml` and its verified
//! asset files under `assets/`, exactly what `install --from` and the build-time
//! embedding read, and optionally container image archives under `images/` (the
//! release's pause, CoreDNS, metrics-server images), which `install --from` puts into
//! `<data>/images/` for import. Installing a bundle re-verifies every file against the
//! manifest.

use std::io::Read;
use std::path::{Component, Path};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

use super::error::ComponentsError;
use super::manifest::ReleaseId;
use super::store::{MANIFEST_FILE, Store};
use crate::fsutil;

/// The image archives (`*.tar`) directly in `dir`, in name order.
pub fn image_archives(dir: &Path) -> Result<Vec<std::path::PathBuf>, ComponentsError> {
    let entries = std::fs::read_dir(dir).map_err(ComponentsError::io(dir))?;
    let mut found: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "tar") && p.is_file())
        .collect();
    found.sort();
    Ok(found)
}

/// Writes release `id` as a bundle to `out` (atomically: a temp file renamed at the end),
/// with the image archives `images`. Blocking.
pub fn create(
    store: &Store,
    id: &ReleaseId,
    out: &Path,
    images: &[std::path::PathBuf],
) -> Result<u64, ComponentsError> {
    let record = store.record(id)?;
    let dir = store.release_dir(id);
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .ok_or_else(|| ComponentsError::Source {
            path: out.to_path_buf(),
            reason: "is not a file name; give --out FILE".into(),
        })?;
    let tmp = parent.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(ComponentsError::io(&tmp))?;
        let mut tar = tar::Builder::new(GzEncoder::new(file, Compression::default()));
        tar.mode(tar::HeaderMode::Deterministic);
        let io = |path: &Path| ComponentsError::io(path);
        let manifest = dir.join(MANIFEST_FILE);
        tar.append_path_with_name(&manifest, MANIFEST_FILE)
            .map_err(io(&manifest))?;
        for asset in &record.assets {
            let path = dir.join(&asset.stored_at);
            tar.append_path_with_name(&path, format!("assets/{}", asset.file))
                .map_err(io(&path))?;
        }
        for image in images {
            let name = image.file_name().unwrap_or_default().to_string_lossy();
            tar.append_path_with_name(image, format!("images/{name}"))
                .map_err(io(image))?;
        }
        let encoder = tar.into_inner().map_err(io(&tmp))?;
        let file = encoder.finish().map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, out).map_err(io(out))?;
        std::fs::metadata(out).map(|m| m.len()).map_err(io(out))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Unpacks a bundle into `dest`: only `manifest.yaml` and `assets/<file>` are accepted,
/// so a crafted bundle cannot write anywhere else. Blocking.
pub fn unpack(reader: impl Read, origin: &Path, dest: &Path) -> Result<(), ComponentsError> {
    let bad = |reason: String| ComponentsError::Source {
        path: origin.to_path_buf(),
        reason,
    };
    let archive_err = |source| ComponentsError::Archive {
        path: origin.to_path_buf(),
        source,
    };
    fsutil::ensure_dir(&dest.join("assets"), 0o755).map_err(ComponentsError::io(dest))?;
    fsutil::ensure_dir(&dest.join("images"), 0o755).map_err(ComponentsError::io(dest))?;
    let mut tar = tar::Archive::new(GzDecoder::new(reader));
    let mut saw_manifest = false;
    for entry in tar.entries().map_err(archive_err)? {
        let mut entry = entry.map_err(archive_err)?;
        let path = entry.path().map_err(archive_err)?.into_owned();
        let parts: Vec<_> = path
            .components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect();
        let target = match parts.as_slice() {
            [Component::Normal(n)] if *n == MANIFEST_FILE => {
                saw_manifest = true;
                dest.join(MANIFEST_FILE)
            }
            [Component::Normal(a), Component::Normal(n)] if *a == "assets" => {
                dest.join("assets").join(n)
            }
            [Component::Normal(a), Component::Normal(n)] if *a == "images" => {
                dest.join("images").join(n)
            }
            [Component::Normal(a)] if *a == "assets" || *a == "images" => continue,
            _ => {
                return Err(bad(format!(
                    "unexpected entry {} in the bundle; a bundle holds only {MANIFEST_FILE}, assets/ and images/",
                    path.display()
                )));
            }
        };
        if !entry.header().entry_type().is_file() {
            return Err(bad(format!("{} is not a regular file", path.display())));
        }
        let mut file = std::fs::File::create(&target).map_err(ComponentsError::io(&target))?;
        std::io::copy(&mut entry, &mut file).map_err(archive_err)?;
    }
    if !saw_manifest {
        return Err(bad(format!(
            "is not a kdist bundle (no {MANIFEST_FILE}); make one with `kdist components bundle --out FILE`"
        )));
    }
    Ok(())
}

/// Copies the image archives of `from` (a bundle's or a --from directory's `images/`)
/// into `images_dir`, where the node imports them; returns the copies. Each copy is
/// written under a temporary name and renamed, so a node never imports half a file.
/// Blocking.
pub fn stage_images(
    from: &Path,
    images_dir: &Path,
) -> Result<Vec<std::path::PathBuf>, ComponentsError> {
    if !from.is_dir() {
        return Ok(Vec::new());
    }
    let archives = image_archives(from)?;
    if archives.is_empty() {
        return Ok(Vec::new());
    }
    fsutil::ensure_dir(images_dir, 0o755).map_err(ComponentsError::io(images_dir))?;
    let mut staged = Vec::new();
    for archive in archives {
        let name = archive
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let target = images_dir.join(&name);
        let tmp = images_dir.join(format!(".{name}.tmp.{}", std::process::id()));
        std::fs::copy(&archive, &tmp).map_err(ComponentsError::io(&tmp))?;
        std::fs::rename(&tmp, &target).map_err(ComponentsError::io(&target))?;
        staged.push(target);
    }
    Ok(staged)
}

/// Reads only the manifest text of a bundle. Blocking.
pub fn manifest_of(reader: impl Read, origin: &Path) -> Result<String, ComponentsError> {
    let archive_err = |source| ComponentsError::Archive {
        path: origin.to_path_buf(),
        source,
    };
    let mut tar = tar::Archive::new(GzDecoder::new(reader));
    for entry in tar.entries().map_err(archive_err)? {
        let mut entry = entry.map_err(archive_err)?;
        let is_manifest = entry
            .path()
            .map(|p| {
                p.components()
                    .filter(|c| !matches!(c, Component::CurDir))
                    .count()
                    == 1
                    && p.ends_with(MANIFEST_FILE)
            })
            .unwrap_or(false);
        if is_manifest {
            let mut text = String::new();
            entry.read_to_string(&mut text).map_err(archive_err)?;
            return Ok(text);
        }
    }
    Err(ComponentsError::Source {
        path: origin.to_path_buf(),
        reason: format!("is not a kdist bundle (no {MANIFEST_FILE})"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        for (name, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, name, *data).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn only_the_manifest_and_assets_are_unpacked() {
        let dest = std::env::temp_dir().join(format!("kdist-unpack-{}", std::process::id()));
        let good = tar_gz(&[("manifest.yaml", b"m"), ("./assets/kubelet", b"k")]);
        unpack(good.as_slice(), Path::new("b.tar.gz"), &dest).unwrap();
        assert_eq!(std::fs::read(dest.join("assets/kubelet")).unwrap(), b"k");
        let with_image = tar_gz(&[("manifest.yaml", b"m"), ("images/coredns.tar", b"i")]);
        unpack(with_image.as_slice(), Path::new("b.tar.gz"), &dest).unwrap();
        let node_images = dest.join("node-images");
        let staged = stage_images(&dest.join("images"), &node_images).unwrap();
        assert_eq!(staged, [node_images.join("coredns.tar")]);
        assert_eq!(std::fs::read(&staged[0]).unwrap(), b"i");
        for bad in [
            "etc/passwd",
            "assets/sub/x",
            "bin/kubelet",
            "images/sub/x.tar",
        ] {
            let archive = tar_gz(&[("manifest.yaml", b"m"), (bad, b"x")]);
            let err = unpack(archive.as_slice(), Path::new("b.tar.gz"), &dest)
                .unwrap_err()
                .to_string();
            assert!(err.contains("b.tar.gz") && err.contains(bad), "{err}");
        }
        let none = tar_gz(&[("assets/kubelet", b"k")]);
        let err = unpack(none.as_slice(), Path::new("b.tar.gz"), &dest)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a kdist bundle"), "{err}");
        assert_eq!(manifest_of(good.as_slice(), Path::new("b")).unwrap(), "m");
        std::fs::remove_dir_all(&dest).unwrap();
    }
}
