//! Releases in the shape EKS-D publishes, built in the test from given binaries: a
//! `--from` directory per release (manifest.yaml plus the asset files with their real
//! digests), etcd and the CNI plugins as scripts that run the host's.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::text;

pub const OFFICIAL: &str = "https://distro.eks.amazonaws.com";
pub const KUBE: &[&str] = &[
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
];

pub fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

pub fn digest(tool: &str, path: &Path) -> String {
    let out = Command::new(tool).arg(path).output().unwrap();
    assert!(out.status.success(), "{tool}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

pub fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn tar_gz(out: &Path, files: &[(&str, &Path)]) {
    let file = std::fs::File::create(out).unwrap();
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    for (name, path) in files {
        tar.append_path_with_name(path, name).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}

/// A `--from` directory of release `number` of channel `channel` (Kubernetes `version`):
/// `bins` gives each Kubernetes binary's file; etcd and the CNI plugins are scripts that
/// run the host's.
pub fn release_dir(
    root: &Path,
    channel: &str,
    version: &str,
    number: u32,
    bins: &[(&str, PathBuf)],
) -> PathBuf {
    let dir = root.join(format!("release-{number}"));
    std::fs::create_dir_all(&dir).unwrap();
    let arch = arch();
    let base = format!("{OFFICIAL}/kubernetes-{channel}/releases/{number}/artifacts");
    let asset = |name: &str, file: &Path, uri: String| {
        format!(
            "    - arch:\n      - {arch}\n      archive:\n        sha256: {}\n        sha512: {}\n        uri: {uri}\n      name: {name}\n      os: linux\n      type: Archive\n",
            digest("sha256sum", file),
            digest("sha512sum", file)
        )
    };
    let mut kube = String::new();
    for bin in KUBE {
        let source = bins.iter().find(|(n, _)| n == bin).unwrap().1.clone();
        let file = dir.join(bin);
        let _ = std::fs::remove_file(&file);
        std::os::unix::fs::symlink(&source, &file).unwrap();
        kube += &asset(
            &format!("bin/linux/{arch}/{bin}"),
            &file,
            format!("{base}/kubernetes/{version}/bin/linux/{arch}/{bin}"),
        );
    }
    let wrappers = dir.join("wrappers");
    std::fs::create_dir_all(&wrappers).unwrap();
    for tool in ["etcd", "etcdctl"] {
        script(
            &wrappers.join(tool),
            &format!("exec /usr/bin/{tool} \"$@\""),
        );
    }
    let etcd = dir.join(format!("etcd-linux-{arch}-v3.5.0.tar.gz"));
    tar_gz(
        &etcd,
        &[
            ("etcd/etcd", &wrappers.join("etcd")),
            ("etcd/etcdctl", &wrappers.join("etcdctl")),
        ],
    );
    let plugins = ["bridge", "host-local", "loopback", "portmap"];
    for p in plugins {
        script(&wrappers.join(p), &format!("exec /usr/lib/cni/{p} \"$@\""));
    }
    let cni = dir.join(format!("cni-plugins-linux-{arch}-v1.0.0.tar.gz"));
    let members: Vec<(String, PathBuf)> = plugins
        .iter()
        .map(|p| (format!("./{p}"), wrappers.join(p)))
        .collect();
    let members: Vec<(&str, &Path)> = members
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_path()))
        .collect();
    tar_gz(&cni, &members);
    let file_name = |p: &Path| p.file_name().unwrap().to_string_lossy().to_string();
    let manifest = format!(
        "apiVersion: distro.eks.amazonaws.com/v1alpha1\nkind: Release\nmetadata:\n  name: kubernetes-{channel}-eks-{number}\nspec:\n  channel: {channel}\n  number: {number}\nstatus:\n  components:\n  - assets:\n{}    gitTag: v3.5.0\n    name: etcd\n  - assets:\n{}    gitTag: v1.0.0\n    name: cni-plugins\n  - assets:\n{kube}    gitTag: {version}\n    name: kubernetes\n",
        asset(
            &file_name(&etcd),
            &etcd,
            format!("{base}/etcd/v3.5.0/{}", file_name(&etcd))
        ),
        asset(
            &file_name(&cni),
            &cni,
            format!("{base}/plugins/v1.0.0/{}", file_name(&cni))
        ),
    );
    std::fs::write(dir.join("manifest.yaml"), manifest).unwrap();
    dir
}

pub fn fake_bins(dir: &Path, tag: &str) -> Vec<(&'static str, PathBuf)> {
    std::fs::create_dir_all(dir).unwrap();
    KUBE.iter()
        .map(|bin| {
            let path = dir.join(bin);
            script(&path, &format!("# {tag}\necho \"{bin} v1.31.0\""));
            (*bin, path)
        })
        .collect()
}

/// KDIST_TEST_K8S_BIN: the directory of the real Kubernetes server binaries.
pub fn k8s_bin() -> PathBuf {
    PathBuf::from(std::env::var_os("KDIST_TEST_K8S_BIN").expect(
        "set KDIST_TEST_K8S_BIN to a directory with kube-apiserver, kube-controller-manager, \
         kube-scheduler, kubelet and kube-proxy",
    ))
}

/// The Kubernetes binaries of `bin` (kubectl from PATH when there is one).
pub fn real_bins(bin: &Path) -> Vec<(&'static str, PathBuf)> {
    let kubectl_bin = super::on_path("kubectl")
        .then(|| PathBuf::from("/usr/bin/kubectl"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| bin.join("kubectl"));
    KUBE.iter()
        .map(|b| {
            let path = if *b == "kubectl" {
                kubectl_bin.clone()
            } else {
                bin.join(b)
            };
            (*b, path)
        })
        .collect()
}

/// `v1.28.7`: what `kube-apiserver --version` of `bin` says.
pub fn binary_version(bin: &Path) -> String {
    let out = Command::new(bin.join("kube-apiserver"))
        .arg("--version")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}
