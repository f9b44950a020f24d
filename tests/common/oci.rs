//! Builds OCI image archives offline from Debian's static busybox: a one-layer rootfs
//! (busybox plus applet symlinks), its config, manifest, index.json and oci-layout, all
//! addressed by their sha256 digests, in one uncompressed tarball.

use std::io::Write;
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

pub const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "sleep", "echo", "cat", "ls", "nc", "hostname", "httpd", "env", "true", "wget", "dd",
    "mkdir",
];

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn append(builder: &mut tar::Builder<impl Write>, path: &str, bytes: &[u8], mode: u32) {
    let mut header = tar::Header::new_ustar();
    header.set_size(bytes.len() as u64);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    builder.append_data(&mut header, path, bytes).unwrap();
}

fn rootfs_layer() -> Vec<u8> {
    let busybox = std::fs::read(BUSYBOX).expect("busybox-static is needed (/bin/busybox)");
    let mut builder = tar::Builder::new(Vec::new());
    for dir in ["bin", "tmp", "etc", "proc", "sys", "dev"] {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(if dir == "tmp" { 0o1777 } else { 0o755 });
        header.set_size(0);
        header.set_mtime(0);
        header.set_cksum();
        builder
            .append_data(&mut header, format!("{dir}/"), &[][..])
            .unwrap();
    }
    append(&mut builder, "bin/busybox", &busybox, 0o755);
    append(
        &mut builder,
        "etc/passwd",
        b"root:x:0:0:root:/:/bin/sh\n",
        0o644,
    );
    for applet in APPLETS {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        header.set_mode(0o777);
        header.set_mtime(0);
        builder
            .append_link(&mut header, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    builder.into_inner().unwrap()
}

/// Writes an OCI archive of image `name` (full reference) running `cmd` to `out`.
pub fn build(out: &Path, name: &str, cmd: &[&str]) {
    let layer = rootfs_layer();
    let diff_id = sha(&layer);
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(&layer).unwrap();
    let layer_gz = gz.finish().unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", sha(&config)),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{}", sha(&layer_gz)),
            "size": layer_gz.len(),
        }],
    }))
    .unwrap();
    let tag = name.rsplit(':').next().unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha(&manifest)),
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))
    .unwrap();
    let file = std::fs::File::create(out).unwrap();
    let mut archive = tar::Builder::new(file);
    append(
        &mut archive,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    );
    append(&mut archive, "index.json", &index, 0o644);
    for blob in [&layer_gz, &config, &manifest] {
        append(
            &mut archive,
            &format!("blobs/sha256/{}", sha(blob)),
            blob,
            0o644,
        );
    }
    archive.into_inner().unwrap().sync_all().unwrap();
}
