//! Cluster addons on a whole node with real Kubernetes binaries and real addon images
//! (KDIST_TEST_K8S_BIN, KDIST_TEST_COREDNS_IMAGE, KDIST_TEST_METRICS_IMAGE: OCI archives).
//! The node runs an EKS-D-shaped active release whose manifest names the images, with
//! `egress: none`; CoreDNS forwards outside names to a tiny DNS server the test runs on
//! an address of a veth pair it creates (this kernel may lack the dummy module): nothing leaves the machine.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::UdpSocket;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{TempData, oci, poll_until, text};

const BUSYBOX: &str = "kdist.local/test/busybox:1";
const PAUSE: &str = "kdist.local/test/pause:1";
const COREDNS: &str = "public.ecr.aws/eks-distro/coredns/coredns:v1.12.1-eks-test";
const METRICS: &str = "public.ecr.aws/eks-distro/kubernetes-sigs/metrics-server:v0.7.2-eks-test";
/// The upstream resolver the test serves, on an interface of its own.
const UPSTREAM: &str = "198.18.53.53";
const DUMMY: &str = "kdtdns0";
const DUMMY_PEER: &str = "kdtdns1";
/// What the upstream answers for OUTSIDE_NAME.
const OUTSIDE_NAME: &str = "outside.kdist.test";
const OUTSIDE_IP: [u8; 4] = [198, 18, 7, 7];

fn env_path(var: &str) -> PathBuf {
    PathBuf::from(std::env::var_os(var).unwrap_or_else(|| panic!("set {var}")))
}

fn node_name() -> String {
    nix::unistd::gethostname()
        .unwrap()
        .into_string()
        .unwrap()
        .to_lowercase()
}

/// A host-local veth pair with UPSTREAM on one end, and a DNS server on UPSTREAM:53 that answers
/// OUTSIDE_NAME with OUTSIDE_IP and every other name with NXDOMAIN. Removed on drop.
struct Upstream {
    answered: Arc<AtomicU64>,
}

impl Upstream {
    fn start() -> Self {
        let _ = Command::new("ip").args(["link", "del", DUMMY]).output();
        for args in [
            vec![
                "link", "add", DUMMY, "type", "veth", "peer", "name", DUMMY_PEER,
            ],
            vec!["addr", "add", &format!("{UPSTREAM}/32"), "dev", DUMMY],
            vec!["link", "set", DUMMY, "up"],
            vec!["link", "set", DUMMY_PEER, "up"],
        ] {
            let out = Command::new("ip").args(&args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", text(&out));
        }
        let socket = UdpSocket::bind((UPSTREAM, 53)).unwrap();
        let answered = Arc::new(AtomicU64::new(0));
        let count = answered.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                if let Some(reply) = answer(&buf[..n]) {
                    if reply.1 {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = socket.send_to(&reply.0, from);
                }
            }
        });
        Self { answered }
    }

    fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", DUMMY]).output();
    }
}

/// A reply to a DNS query, and whether it answered OUTSIDE_NAME.
fn answer(query: &[u8]) -> Option<(Vec<u8>, bool)> {
    if query.len() < 12 {
        return None;
    }
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = *query.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    let name = labels.join(".");
    let hit = name == OUTSIDE_NAME;
    let mut reply = query[..question_end].to_vec();
    reply[2] = 0x81; // response, recursion desired
    reply[3] = if hit { 0x80 } else { 0x83 }; // recursion available; NXDOMAIN unless hit
    let a = hit && qtype == 1;
    reply[6..8].copy_from_slice(&(a as u16).to_be_bytes());
    reply[8..12].fill(0);
    if a {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
        reply.extend_from_slice(&OUTSIDE_IP);
    }
    Some((reply, a))
}

fn kubectl(data: &TempData, args: &[&str]) -> String {
    let out = data.kdist(&[&["kubectl"], args].concat());
    assert!(out.status.success(), "kubectl {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl_ok(data: &TempData, args: &[&str]) -> Option<String> {
    let out = data.kdist(&[&["kubectl"], args].concat());
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn apply(data: &TempData, manifest: &str) {
    let path = data.path("kdt-apply.yaml");
    std::fs::write(&path, manifest).unwrap();
    kubectl(data, &["apply", "-f", path.to_str().unwrap()]);
}

/// `nslookup name` in the client pod (busybox's, which sends its own queries and applies
/// no search domains): its output when it succeeded.
fn lookup(data: &TempData, name: &str) -> Option<String> {
    kubectl_ok(
        data,
        &[
            "exec",
            "client",
            "--",
            "/bin/busybox",
            "nslookup",
            "-type=a",
            name,
        ],
    )
}

fn addons(data: &TempData) -> Vec<serde_json::Value> {
    let out = data.kdist(&["addons", "list", "-o", "json"]);
    assert!(out.status.success(), "addons list: {}", text(&out));
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

fn addon(data: &TempData, name: &str) -> serde_json::Value {
    addons(data)
        .into_iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("no addon {name}"))
}

fn jsonpath(data: &TempData, args: &[&str], path: &str) -> Option<String> {
    kubectl_ok(data, &[args, &["-o", &format!("jsonpath={path}")]].concat())
}

/// An active release named like EKS-D's whose manifest names the images; its binaries
/// come from PATH (KDIST_TEST_K8S_BIN).
fn release(data: &TempData) {
    let dir = data.path("components/1-28-7");
    std::fs::create_dir_all(&dir).unwrap();
    let image = |component: &str, asset: &str, uri: &str| {
        format!(
            "  - name: {component}\n    gitTag: v0\n    assets:\n    - name: {asset}\n      type: Image\n      os: linux\n      arch: [amd64, arm64]\n      image:\n        uri: {uri}\n"
        )
    };
    let manifest = format!(
        "apiVersion: distro.eks.amazonaws.com/v1alpha1\nkind: Release\nmetadata:\n  name: kubernetes-1-28-eks-7\nspec:\n  channel: 1-28\n  number: 7\nstatus:\n  components:\n{}{}{}",
        image("kubernetes", "pause-image", PAUSE),
        image("coredns", "coredns-image", COREDNS),
        image("metrics-server", "metrics-server-image", METRICS),
    );
    std::fs::write(dir.join("manifest.yaml"), manifest).unwrap();
    let record = serde_json::json!({
        "release": "1-28-7", "channel": "1-28", "number": 7, "os": "linux", "arch": "amd64",
        "manifest_sha256": "", "source": "test", "installed_at": 0, "assets": [], "files": [],
    });
    std::fs::write(dir.join("record.json"), record.to_string()).unwrap();
    std::os::unix::fs::symlink("1-28-7", data.path("components/current")).unwrap();
}

const CLIENT: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: kdist.local/test/busybox:1
    imagePullPolicy: Never
    command: ["/bin/sleep", "3600"]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"#;

#[test]
#[ignore = "needs Kubernetes server binaries and addon images: set KDIST_TEST_K8S_BIN, KDIST_TEST_COREDNS_IMAGE, KDIST_TEST_METRICS_IMAGE"]
fn addons_on_a_node_with_real_binaries() {
    let _host = common::exclusive_host();
    let bin = env_path("KDIST_TEST_K8S_BIN");
    let coredns = env_path("KDIST_TEST_COREDNS_IMAGE");
    let metrics = env_path("KDIST_TEST_METRICS_IMAGE");
    let upstream = Upstream::start();
    let data = TempData::new("addons");
    std::fs::create_dir_all(data.path("images")).unwrap();
    oci::build(&data.path("images/busybox.tar"), BUSYBOX, &["/bin/sh"]);
    oci::build(
        &data.path("images/pause.tar"),
        PAUSE,
        &["/bin/sleep", "infinity"],
    );
    std::fs::copy(&coredns, data.path("images/coredns.tar")).unwrap();
    std::fs::copy(&metrics, data.path("images/metrics-server.tar")).unwrap();
    release(&data);
    let config = data.config(&format!(
        "network:\n  egress: none\nruntime:\n  sandbox_image: {PAUSE}\naddons:\n  dns:\n    upstream: [{UPSTREAM}]\n  metrics-server:\n    enabled: true\n"
    ));
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let started = Instant::now();
    let out = data.kdist_env(
        &[
            "start",
            "--config",
            config.to_str().unwrap(),
            "--timeout",
            "300",
        ],
        &[("PATH", &path)],
    );
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        text(&out),
        text(&data.kdist(&["kubectl", "get", "pods", "-A", "-o", "wide"])),
        text(&data.kdist(&["kubectl", "-n", "kube-system", "describe", "pods"])),
    );
    eprintln!("kdist start -> ready with addons: {:?}", started.elapsed());

    // ready means usable: the default ServiceAccount exists and the addons are ready
    kubectl(&data, &["get", "serviceaccount", "default"]);
    let dns = addon(&data, "dns");
    assert_eq!(dns["state"], "ready", "{dns:#}");
    assert_eq!(dns["image"], COREDNS, "the release's coredns-image");
    assert_eq!(addon(&data, "metrics-server")["state"], "ready");
    let images = text(&data.kdist(&["images", "list"]));
    assert!(
        images.contains(COREDNS) && images.contains(METRICS) && images.contains(PAUSE),
        "{images}"
    );
    let status = text(&data.kdist(&["status"]));
    assert!(status.contains("ADDON"), "{status}");

    // a pod resolves a Service name, kubernetes.default and an outside name
    apply(&data, CLIENT);
    kubectl(
        &data,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/client",
            "--timeout=120s",
        ],
    );
    let web_ip = jsonpath(&data, &["get", "service", "web"], "{.spec.clusterIP}").unwrap();
    let found = common::wait_for(Duration::from_secs(60), || {
        lookup(&data, "web.default.svc.cluster.local")
    });
    assert!(
        found.as_deref().is_some_and(|o| o.contains(&web_ip)),
        "{found:?}: {}\n{}\n{}",
        text(&data.kdist(&[
            "kubectl",
            "exec",
            "client",
            "--",
            "/bin/busybox",
            "nslookup",
            "web.default.svc.cluster.local"
        ])),
        text(&data.kdist(&["kubectl", "exec", "client", "--", "cat", "/etc/resolv.conf"])),
        text(&data.kdist(&["kubectl", "-n", "kube-system", "logs", "deployment/coredns"])),
    );
    let found = common::wait_for(Duration::from_secs(30), || {
        lookup(&data, "kubernetes.default.svc.cluster.local")
    });
    assert!(
        found.as_deref().is_some_and(|o| o.contains("10.152.183.1")),
        "{found:?}"
    );
    let before = upstream.answered();
    let found = common::wait_for(Duration::from_secs(30), || lookup(&data, OUTSIDE_NAME));
    assert!(
        found.as_deref().is_some_and(|o| o.contains("198.18.7.7")),
        "{found:?}"
    );
    assert!(
        upstream.answered() > before,
        "answered by the test's upstream"
    );

    // kubectl top node and pod once metrics-server is ready
    let node = node_name();
    let top = common::wait_for(Duration::from_secs(120), || {
        kubectl_ok(&data, &["top", "node"]).filter(|o| o.contains(&node))
    });
    assert!(top.is_some(), "kubectl top node never answered");
    let top = common::wait_for(Duration::from_secs(120), || {
        kubectl_ok(&data, &["top", "pod", "-n", "kube-system"]).filter(|o| o.contains("coredns"))
    });
    assert!(top.is_some(), "kubectl top pod never answered");

    // manifests folder: add, a broken file next to a good one, change, remove
    let dir = data.path("manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let cm = |value: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: from-folder\n  namespace: default\ndata:\n  key: {value}\n"
        )
    };
    std::fs::write(dir.join("app.yaml"), cm("one")).unwrap();
    std::fs::write(
        dir.join("broken.yaml"),
        "kind: ConfigMap\n  metadata: : x\n",
    )
    .unwrap();
    let value = || jsonpath(&data, &["get", "configmap", "from-folder"], "{.data.key}");
    assert!(
        poll_until(Duration::from_secs(60), || value().as_deref()
            == Some("one")),
        "the good file was not applied: {:#?}",
        addons(&data)
    );
    let label = jsonpath(
        &data,
        &["get", "configmap", "from-folder"],
        "{.metadata.labels.addons\\.kdist\\.io/manifest}",
    );
    assert_eq!(label.as_deref(), Some("app"));
    assert!(
        poll_until(Duration::from_secs(30), || {
            let m = addon(&data, "manifests");
            m["state"] == "failed"
                && m["message"]
                    .as_str()
                    .is_some_and(|s| s.contains("broken.yaml") && s.contains("line"))
        }),
        "{:#}",
        addon(&data, "manifests")
    );
    std::fs::write(dir.join("app.yaml"), cm("two")).unwrap();
    assert!(
        poll_until(Duration::from_secs(60), || value().as_deref()
            == Some("two")),
        "a changed file was not applied again"
    );
    std::fs::remove_file(dir.join("app.yaml")).unwrap();
    assert!(
        poll_until(Duration::from_secs(60), || {
            kubectl_ok(&data, &["get", "configmap", "from-folder"]).is_none()
        }),
        "a removed file's objects were not deleted"
    );
    std::fs::remove_file(dir.join("broken.yaml")).unwrap();

    // an edited CoreDNS Deployment is put back; idempotent applies change nothing
    let rv = |kind: &str, name: &str| {
        jsonpath(
            &data,
            &["-n", "kube-system", "get", kind, name],
            "{.metadata.resourceVersion}",
        )
        .unwrap()
    };
    let (cm_rv, svc_rv) = (rv("configmap", "coredns"), rv("service", "kube-dns"));
    kubectl(
        &data,
        &[
            "-n",
            "kube-system",
            "patch",
            "deployment",
            "coredns",
            "-p",
            "{\"spec\":{\"replicas\":3}}",
        ],
    );
    let replicas = || {
        jsonpath(
            &data,
            &["-n", "kube-system", "get", "deployment", "coredns"],
            "{.spec.replicas}",
        )
    };
    assert!(
        poll_until(Duration::from_secs(90), || replicas().as_deref()
            == Some("1")),
        "the edited Deployment was not restored: {:?}",
        replicas()
    );
    kubectl(
        &data,
        &[
            "-n",
            "kube-system",
            "delete",
            "poddisruptionbudget",
            "coredns",
        ],
    );

    // kill -9 of kube-apiserver: the addons are reconciled once it is back
    let status = data.status();
    let pid = TempData::service(&status, "kube-apiserver")["pid"]
        .as_i64()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        poll_until(Duration::from_secs(120), || {
            kubectl_ok(
                &data,
                &["-n", "kube-system", "get", "poddisruptionbudget", "coredns"],
            )
            .is_some()
        }),
        "the PodDisruptionBudget was not put back after the apiserver restart"
    );
    assert_eq!(
        (rv("configmap", "coredns"), rv("service", "kube-dns")),
        (cm_rv, svc_rv),
        "applying again changed unchanged objects"
    );

    // disable dns: its objects are gone and resolution fails; enable: back
    let out = data.kdist(&["addons", "disable", "dns"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        poll_until(Duration::from_secs(60), || {
            kubectl_ok(
                &data,
                &["-n", "kube-system", "get", "deployment", "coredns"],
            )
            .is_none()
                && kubectl_ok(&data, &["-n", "kube-system", "get", "service", "kube-dns"]).is_none()
        }),
        "dns objects still there"
    );
    assert_eq!(addon(&data, "dns")["enabled"], false);
    assert!(
        poll_until(Duration::from_secs(60), || lookup(
            &data,
            "web.default.svc.cluster.local"
        )
        .is_none()),
        "resolution still works with dns disabled"
    );
    let config = std::fs::read_to_string(data.path("config.yaml")).unwrap();
    assert!(config.contains("enabled: false"), "{config}");
    let out = data.kdist(&["addons", "enable", "dns"]);
    assert!(out.status.success(), "{}", text(&out));
    let found = common::wait_for(Duration::from_secs(180), || {
        lookup(&data, "web.default.svc.cluster.local")
    });
    assert!(
        found.as_deref().is_some_and(|o| o.contains(&web_ip)),
        "{found:?} after enable: {:#?}\n{}\n{}\n{}",
        addons(&data),
        text(&data.kdist(&["kubectl", "get", "pods,svc,endpoints", "-A", "-o", "wide"])),
        text(&data.kdist(&[
            "kubectl",
            "exec",
            "client",
            "--",
            "/bin/busybox",
            "nslookup",
            "web.default.svc.cluster.local"
        ])),
        text(&data.kdist(&["kubectl", "-n", "kube-system", "logs", "deployment/coredns"])),
    );
    let out = data.kdist(&["addons", "enable", "helm"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("metrics-server"),
        "lists the known addons: {}",
        text(&out)
    );
    let out = data.kdist(&["status", "--wait-ready", "--timeout", "120"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn the_test_upstream_answers_only_its_name() {
    // a query for outside.kdist.test, type A
    let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in OUTSIDE_NAME.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let (reply, hit) = answer(&q).unwrap();
    assert!(hit);
    assert_eq!(&reply[..2], &[0x12, 0x34]);
    assert_eq!(&reply[reply.len() - 4..], &OUTSIDE_IP);
    let mut other = q.clone();
    other[13] = b'X';
    let (reply, hit) = answer(&other).unwrap();
    assert!(!hit);
    assert_eq!(reply[3] & 0x0f, 3, "NXDOMAIN");
}
