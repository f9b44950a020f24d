//! Packs the components to embed (cargo feature `embed-components`) into
//! `$OUT_DIR/kdist-components.tar.gz`, in the bundle format kdist installs from:
//! `manifest.yaml` plus `assets/<file>`. `KDIST_EMBED_COMPONENTS_DIR` names either a
//! directory (manifest.yaml and the asset files, flat or under assets/) or a bundle
//! made by `kdist components bundle`.

use std::fs;
use std::path::{Path, PathBuf};

const ENV: &str = "KDIST_EMBED_COMPONENTS_DIR";
const OUT: &str = "kdist-components.tar.gz";

pub fn main() {
    println!("cargo:rerun-if-env-changed={ENV}");
    if std::env::var_os("CARGO_FEATURE_EMBED_COMPONENTS").is_none() {
        return;
    }
    let Some(source) = std::env::var_os(ENV).map(PathBuf::from) else {
        fail(&format!(
            "feature embed-components is on but {ENV} is not set; set it to a directory holding manifest.yaml and the asset files, or to a bundle from `kdist components bundle`"
        ));
    };
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join(OUT);
    println!("cargo:rerun-if-changed={}", source.display());
    if source.is_file() {
        if let Err(e) = fs::copy(&source, &out) {
            fail(&format!(
                "cannot copy {} to {}: {e}",
                source.display(),
                out.display()
            ));
        }
        return;
    }
    if let Err(e) = pack(&source, &out) {
        fail(&format!("cannot pack {} ({ENV}): {e}", source.display()));
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

fn pack(dir: &Path, out: &Path) -> std::io::Result<()> {
    let manifest = dir.join("manifest.yaml");
    if !manifest.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is missing; the directory must hold the release manifest",
            manifest.display()
        )));
    }
    let file = fs::File::create(out)?;
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::best());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    println!("cargo:rerun-if-changed={}", manifest.display());
    tar.append_path_with_name(&manifest, "manifest.yaml")?;
    for folder in [dir.to_path_buf(), dir.join("assets")] {
        let Ok(entries) = fs::read_dir(&folder) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "manifest.yaml"))
            .collect();
        paths.sort();
        for path in paths {
            println!("cargo:rerun-if-changed={}", path.display());
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            tar.append_path_with_name(&path, format!("assets/{name}"))?;
        }
    }
    tar.into_inner()?.finish()?;
    Ok(())
}
