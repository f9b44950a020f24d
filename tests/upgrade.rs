//! `kdist upgrade`: the plan (`--dry-run`) from releases installed out of local
//! directories, and, with real Kubernetes binaries (KDIST_TEST_K8S_BIN), an upgrade of a
//! running node from release 1 to 2 that keeps its pods, then a release 3 whose
//! kube-apiserver exits at once: the upgrade fails, names kube-apiserver and leaves the
//! node healthy on release 2.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::release::{KUBE, fake_bins, release_dir, script};
use common::{TempData, oci, poll_until, text};

const BUSYBOX: &str = "kdist.local/test/busybox:1";
const PAUSE: &str = "kdist.local/test/pause:1";

fn ok(data: &TempData, args: &[&str]) -> String {
    let out = data.kdist(args);
    assert!(out.status.success(), "kdist {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dry_run_plans_restarts_of_changed_binaries_only() {
    let data = TempData::new("upgrade-plan");
    let work = data.path("work");
    let one = fake_bins(&work.join("bins-1"), "one");
    // release 2: a new kube-apiserver and kubelet, the rest the same bytes
    let mut two = one.clone();
    let new = fake_bins(&work.join("bins-2"), "two");
    for (bin, path) in &mut two {
        if *bin == "kube-apiserver" || *bin == "kubelet" {
            *path = new.iter().find(|(b, _)| b == bin).unwrap().1.clone();
        }
    }
    let r1 = release_dir(&work, "1-31", "v1.31.0", 1, &one);
    let r2 = release_dir(&work, "1-31", "v1.31.1", 2, &two);
    ok(
        &data,
        &["components", "install", "--from", r1.to_str().unwrap()],
    );
    ok(
        &data,
        &[
            "components",
            "install",
            "--no-activate",
            "--from",
            r2.to_str().unwrap(),
        ],
    );

    let plan = ok(&data, &["upgrade", "--release", "2", "--dry-run"]);
    assert!(
        plan.contains("upgrade 1-31-1 -> 1-31-2 (Kubernetes v1.31.0 -> v1.31.1)"),
        "{plan}"
    );
    assert!(plan.contains("kdist is not running here"), "{plan}");
    // no daemon runs: the plan covers every service a node may run, in order
    let at = |s: &str| plan.find(&format!("restart {s} ")).unwrap_or(usize::MAX);
    assert!(
        at("kube-apiserver") < at("kubelet") && at("kubelet") < usize::MAX,
        "{plan}"
    );
    assert!(!plan.contains("restart kube-scheduler "), "{plan}");
    assert!(plan.contains("not restarted (same binary)"), "{plan}");
    // nothing changed
    assert_eq!(
        std::fs::read_link(data.path("components/current")).unwrap(),
        Path::new("1-31-1")
    );

    // an upgrade needs the running node
    let out = data.kdist(&["upgrade", "--release", "2"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kdist components install --channel 1-31 --release 2"),
        "{err}"
    );

    // the same release: nothing to do
    let same = ok(&data, &["upgrade", "--release", "1"]);
    assert!(same.contains("already"), "{same}");
}

fn k8s_bin() -> PathBuf {
    PathBuf::from(std::env::var_os("KDIST_TEST_K8S_BIN").expect(
        "set KDIST_TEST_K8S_BIN to a directory with kube-apiserver, kube-controller-manager, \
         kube-scheduler, kubelet and kube-proxy",
    ))
}

fn kubectl(data: &TempData, args: &[&str]) -> String {
    ok(data, &[&["kubectl"], args].concat())
}

/// (uid, restart count) of the test pod.
fn pod(data: &TempData) -> (String, String) {
    let out = kubectl(
        data,
        &[
            "get",
            "pod",
            "sleeper",
            "-o",
            "jsonpath={.metadata.uid} {.status.containerStatuses[0].restartCount} {.status.containerStatuses[0].containerID}",
        ],
    );
    let mut parts = out.split_whitespace();
    let uid = parts.next().unwrap_or_default().to_string();
    let restarts = parts.next().unwrap_or_default().to_string();
    let container = parts.next().unwrap_or_default().to_string();
    (uid, format!("{restarts} {container}"))
}

fn all_ready(data: &TempData) -> bool {
    data.kdist(&["status", "-o", "json"])
        .status
        .success()
        .then(|| data.status())
        .and_then(|s| {
            s["services"]
                .as_array()
                .map(|a| a.iter().all(|x| x["ready"] == true))
        })
        .unwrap_or(false)
}

fn version_release(data: &TempData) -> String {
    let out = ok(data, &["version", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["release"].as_str().unwrap_or_default().to_string()
}

#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn upgrade_keeps_pods_and_a_broken_release_rolls_back() {
    let bin = k8s_bin();
    let data = TempData::new("upgrade");
    let work = data.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let kubectl_bin = common::on_path("kubectl")
        .then(|| PathBuf::from("/usr/bin/kubectl"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| bin.join("kubectl"));
    let real: Vec<(&str, PathBuf)> = KUBE
        .iter()
        .map(|b| {
            let path = if *b == "kubectl" {
                kubectl_bin.clone()
            } else {
                bin.join(b)
            };
            (*b, path)
        })
        .collect();
    let version = {
        let out = Command::new(bin.join("kube-apiserver"))
            .arg("--version")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
    let channel = format!("1-{minor}");
    // release 2: the same programs, kube-apiserver and kubelet behind wrappers (other
    // bytes), so the upgrade restarts them while the pods run
    let wrappers = work.join("wrappers-2");
    std::fs::create_dir_all(&wrappers).unwrap();
    let mut two = real.clone();
    for (b, path) in &mut two {
        if *b == "kube-apiserver" || *b == "kubelet" {
            let w = wrappers.join(*b);
            script(&w, &format!("exec {} \"$@\"", path.display()));
            *path = w;
        }
    }
    // release 3: a kube-apiserver that exits at once
    let broken_dir = work.join("wrappers-3");
    std::fs::create_dir_all(&broken_dir).unwrap();
    let mut three = two.clone();
    let broken = broken_dir.join("kube-apiserver");
    script(
        &broken,
        "echo 'kube-apiserver of release 3: broken on purpose' >&2\nexit 3",
    );
    three[0].1 = broken;
    let r1 = release_dir(&work, &channel, &version, 1, &real);
    let r2 = release_dir(&work, &channel, &version, 2, &two);
    let r3 = release_dir(&work, &channel, &version, 3, &three);

    std::fs::create_dir_all(data.path("images")).unwrap();
    oci::build(&data.path("images/busybox.tar"), BUSYBOX, &["/bin/sh"]);
    oci::build(
        &data.path("images/pause.tar"),
        PAUSE,
        &["/bin/sleep", "infinity"],
    );
    ok(
        &data,
        &["components", "install", "--from", r1.to_str().unwrap()],
    );
    let config = data.config(&format!(
        "network:\n  egress: none\nruntime:\n  sandbox_image: {PAUSE}\naddons:\n  dns:\n    enabled: false\n"
    ));
    ok(
        &data,
        &[
            "start",
            "--config",
            config.to_str().unwrap(),
            "--timeout",
            "180",
        ],
    );
    let release1 = format!("{channel}-1");
    assert_eq!(version_release(&data), release1);

    let manifest = work.join("pod.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: sleeper}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: sleeper\n    image: {BUSYBOX}\n    imagePullPolicy: Never\n    command: [\"/bin/sh\", \"-c\", \"exec sleep 3600\"]\n"
        ),
    )
    .unwrap();
    assert!(
        poll_until(Duration::from_secs(60), || data
            .kdist(&["kubectl", "get", "serviceaccount", "default"])
            .status
            .success()),
        "no default service account"
    );
    kubectl(&data, &["apply", "-f", manifest.to_str().unwrap()]);
    kubectl(
        &data,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/sleeper",
            "--timeout=120s",
        ],
    );
    let before = pod(&data);
    let pids = |d: &TempData| {
        let s = d.status();
        ["kube-apiserver", "kubelet", "kube-scheduler"]
            .iter()
            .map(|n| TempData::service(&s, n)["pid"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    let pids1 = pids(&data);

    // 1 -> 2
    ok(
        &data,
        &[
            "components",
            "install",
            "--no-activate",
            "--from",
            r2.to_str().unwrap(),
        ],
    );
    let out = ok(
        &data,
        &[
            "upgrade",
            "--release",
            "2",
            "--settle",
            "3",
            "--timeout",
            "120",
        ],
    );
    assert!(out.contains("restart kube-apiserver"), "{out}");
    let release2 = format!("{channel}-2");
    assert_eq!(version_release(&data), release2);
    assert!(all_ready(&data), "{}", data.status());
    let pids2 = pids(&data);
    assert_ne!(pids2[0], pids1[0], "kube-apiserver restarted");
    assert_ne!(pids2[1], pids1[1], "kubelet restarted");
    assert_eq!(
        pids2[2], pids1[2],
        "kube-scheduler (same binary) kept running"
    );
    let apiserver = TempData::service(&data.status(), "kube-apiserver").clone();
    assert!(
        apiserver["program"].as_str().unwrap().contains(&release2),
        "{apiserver}"
    );
    kubectl(
        &data,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/sleeper",
            "--timeout=60s",
        ],
    );
    assert_eq!(pod(&data), before, "the pod and its container are the same");

    // 2 -> 3: kube-apiserver exits at once
    ok(
        &data,
        &[
            "components",
            "install",
            "--no-activate",
            "--from",
            r3.to_str().unwrap(),
        ],
    );
    let out = data.kdist(&[
        "upgrade",
        "--release",
        "3",
        "--settle",
        "3",
        "--timeout",
        "60",
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("failed at kube-apiserver"), "{err}");
    let log = data.kdist(&["logs", "kube-apiserver"]);
    let log = String::from_utf8_lossy(&log.stdout);
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    assert!(
        err.contains(&format!("back on release {release2}")),
        "{err}\n--- kube-apiserver log, last lines first:\n{}\n--- status: {}",
        tail.join("\n"),
        data.status()
    );
    assert!(err.contains("broken on purpose"), "the log lines: {err}");
    assert_eq!(version_release(&data), release2);
    assert!(
        poll_until(Duration::from_secs(60), || all_ready(&data)),
        "{}",
        data.status()
    );
    let apiserver = TempData::service(&data.status(), "kube-apiserver").clone();
    assert!(
        apiserver["program"].as_str().unwrap().contains(&release2),
        "{apiserver}"
    );
    kubectl(&data, &["get", "--raw", "/readyz"]);
    assert_eq!(pod(&data), before, "the pod and its container are the same");
}
