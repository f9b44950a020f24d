//! `kdist config`, `kdist kubectl` and `kdist inspect` on a data dir with certificates
//! and kubeconfigs in the PKI's layout (made here with openssl).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::process::Command;

use common::{TempData, text};

const TOKEN: &str = "tokenMARKER0123456789";

fn seed(data: &TempData) -> String {
    let certs = data.path("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=kdist-inspect-test-ca"])
        .arg("-keyout")
        .arg(certs.join("ca.key"))
        .arg("-out")
        .arg(certs.join("ca.crt"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let key = std::fs::read_to_string(certs.join("ca.key")).unwrap();
    // a line of the key body: it must appear nowhere in the bundle
    let key_line = key.lines().nth(1).unwrap().to_string();
    std::fs::create_dir_all(data.path("kubeconfig")).unwrap();
    std::fs::write(
        data.path("kubeconfig/admin.conf"),
        "apiVersion: v1\nkind: Config\ncurrent-context: admin@kdist\n\
         clusters:\n- name: kdist\n  cluster:\n    server: https://127.0.0.1:6443\n\
         contexts:\n- name: admin@kdist\n  context:\n    cluster: kdist\n    user: admin\n\
         users:\n- name: admin\n  user:\n    client-key-data: S0VZTUFSS0VS\n",
    )
    .unwrap();
    std::fs::create_dir_all(data.path("cluster")).unwrap();
    std::fs::write(data.path("cluster/tokens"), TOKEN).unwrap();
    std::fs::create_dir_all(data.path("args")).unwrap();
    std::fs::write(
        data.path("args/kube-apiserver"),
        format!("--secure-port=6443\n--token-auth-file=/x/{TOKEN}\n"),
    )
    .unwrap();
    std::fs::create_dir_all(data.path("logs")).unwrap();
    std::fs::write(
        data.path("logs/containerd.log"),
        "level=info msg=\"hello from containerd\"\n",
    )
    .unwrap();
    std::fs::write(
        data.path("config.yaml"),
        "network:\n  node_ip: 192.0.2.55\n",
    )
    .unwrap();
    key_line
}

#[test]
fn config_kubectl_and_inspect() {
    let data = TempData::new("cli");
    let key_line = seed(&data);

    let out = data.kdist(&["config"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("server: https://192.0.2.55:6443"));
    let out = data.kdist(&["config", "--local"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("server: https://127.0.0.1:6443"));

    if common::on_path("kubectl") {
        let out = data.kdist(&[
            "kubectl",
            "config",
            "view",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "https://127.0.0.1:6443"
        );
    }

    let bundle = data.path("bundle.tar.gz");
    let out = data.kdist(&["inspect", "-o", bundle.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(&bundle).unwrap(),
    ));
    let mut names = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().display().to_string();
        let mut body = String::new();
        entry.read_to_string(&mut body).unwrap();
        assert!(!body.contains(&key_line), "{name} holds the CA key");
        assert!(!body.contains("PRIVATE KEY"), "{name} holds a private key");
        assert!(
            !body.contains("S0VZTUFSS0VS"),
            "{name} holds kubeconfig key data"
        );
        assert!(!body.contains(TOKEN), "{name} holds a token");
        if name.ends_with("certs.txt") {
            assert!(body.contains("kdist-inspect-test-ca"), "{body}");
        }
        if name.ends_with("logs/containerd.log") {
            assert!(body.contains("hello from containerd"));
        }
        names.push(name);
    }
    for wanted in [
        "status.json",
        "versions.txt",
        "certs-check.txt",
        "args/kube-apiserver",
        "logs/containerd.log",
    ] {
        assert!(
            names.iter().any(|n| n.ends_with(wanted)),
            "{wanted} missing: {names:?}"
        );
    }
    assert!(
        !names
            .iter()
            .any(|n| n.contains("kubeconfig") || n.ends_with(".key"))
    );
}
