//! `kdist upgrade`: the plan (`--dry-run`) from releases installed out of local
//! directories, and, with real Kubernetes binaries (KDIST_TEST_K8S_BIN), an upgrade of a
//! running node from release 1 to 2 that keeps its pods, then a release 3 whose
//! kube-apiserver exits at once: the upgrade fails, names kube-apiserver and leaves the
//! node healthy on release 2. On a control plane and a worker in network namespaces, the
//! version-skew refusals: each names the node to upgrade first and changes nothing.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::netns::{self, NsNode};
use common::release::{binary_version, fake_bins, k8s_bin, real_bins, release_dir, script};
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
    let _host = common::exclusive_host();
    let bin = k8s_bin();
    let data = TempData::new("upgrade");
    let work = data.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let real = real_bins(&bin);
    let version = binary_version(&bin);
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
        "network:\n  egress: none\nruntime:\n  sandbox_image: {PAUSE}\n\
         addons:\n  dns:\n    enabled: false\n"
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

/// What an upgrade must leave alone when it is refused: `components list`, the active
/// release and the programs the daemon runs.
fn untouched(node: &NsNode) -> (String, String, Vec<String>) {
    let list = node.ok(&["components", "list"]);
    let v: serde_json::Value = serde_json::from_str(&node.ok(&["version", "-o", "json"])).unwrap();
    let status: serde_json::Value =
        serde_json::from_str(&node.ok(&["status", "-o", "json"])).unwrap();
    let programs = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{} {} {}", s["name"], s["program"], s["pid"]))
        .collect();
    (list, v["release"].to_string(), programs)
}

/// The error of a refused `kdist upgrade args` on `node`.
fn refused(node: &NsNode, args: &[&str]) -> String {
    let out = node.kdist(&[&["upgrade"], args].concat());
    assert!(
        !out.status.success(),
        "upgrade {args:?} on {}: {}",
        node.ns,
        text(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A control plane (cp1) and a worker (w1) on release 1 (the real binaries), in network
/// namespaces. Further releases claim other Kubernetes versions (the binaries stay the
/// same: a refusal comes before anything runs). The worker may not move its kubelet ahead
/// of cp1's apiserver; the control plane may not move more than three minors ahead of
/// w1's kubelet; each refusal names the node to upgrade first, in a dry run too, and
/// leaves the node as it was. A move the rules allow is planned.
#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn skew_refusals_name_the_node_to_upgrade_first() {
    let _host = common::exclusive_host();
    let bin = k8s_bin();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let work = common::temp_dir("kdskew");
    let real = real_bins(&bin);
    let version = binary_version(&bin);
    let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
    let channel = format!("1-{minor}");
    let (next, far) = (format!("1-{}", minor + 1), format!("1-{}", minor + 4));
    let dir = |c: &str| {
        let d = work.path().join(c);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let r1 = release_dir(&dir(&channel), &channel, &version, 1, &real);
    let r2 = release_dir(&dir(&channel), &channel, &version, 2, &real);
    let r_next = release_dir(&dir(&next), &next, &format!("v1.{}.0", minor + 1), 1, &real);
    let r_far = release_dir(&dir(&far), &far, &format!("v1.{}.0", minor + 4), 1, &real);

    let (lab, namespaces, ips) = netns::Lab::pair("kdu", "10.207.0");
    let make = |i: usize, name: &str| {
        let node = common::Node::new(&format!("skew{name}"));
        node.write_config(&format!(
            "node_name: {name}\nnetwork:\n  egress: none\n  node_ip: {}\nruntime:\n  \
             sandbox_image: {PAUSE}\n  cgroup_root: /kdist-skew-{name}\n\
             addons:\n  dns:\n    enabled: false\n",
            ips[i]
        ));
        NsNode {
            ns: namespaces[i].clone(),
            path: path.clone(),
            node,
        }
    };
    let cp = make(0, "cp1");
    let worker = make(1, "w1");
    for n in [&cp, &worker] {
        n.ok(&["components", "install", "--from", r1.to_str().unwrap()]);
    }
    let started = std::time::Instant::now();
    cp.ok(&["start", "--timeout", "300"]);
    let v: serde_json::Value =
        serde_json::from_str(&cp.ok(&["add-node", "--worker", "-o", "json"])).unwrap();
    let connection = format!(
        "{}:25000/{}/{}",
        ips[0],
        v["token"].as_str().unwrap(),
        v["ca_sha256"].as_str().unwrap()
    );
    worker.ok(&["join", &connection, "--worker", "--timeout", "300"]);
    eprintln!("both nodes started: {:?}", started.elapsed());
    // the worker's Node with its kubelet version, as the control plane sees it
    assert!(
        poll_until(Duration::from_secs(120), || {
            cp.kdist(&[
                "kubectl",
                "get",
                "node",
                "w1",
                "-o",
                "jsonpath={.status.nodeInfo.kubeletVersion}",
            ])
            .stdout
            .starts_with(version.as_bytes())
        }),
        "w1 never registered"
    );
    for n in [&cp, &worker] {
        for r in [&r2, &r_next, &r_far] {
            n.ok(&[
                "components",
                "install",
                "--no-activate",
                "--from",
                r.to_str().unwrap(),
            ]);
        }
    }
    let before = [untouched(&cp), untouched(&worker)];

    // the worker's kubelet may not get ahead of cp1's apiserver
    for dry in [&["--dry-run"][..], &[]] {
        let err = refused(
            &worker,
            &[&["--channel", &next, "--release", "1"], dry].concat(),
        );
        assert!(
            err.contains(&format!(
                "kubelet v1.{}.0 would be newer than the kube-apiserver of control plane cp1 ({version})",
                minor + 1
            )),
            "{err}"
        );
        assert!(err.contains("upgrade cp1 first"), "{err}");
    }
    // the control plane may not get more than three minors ahead of w1's kubelet
    for dry in [&["--dry-run"][..], &[]] {
        let err = refused(&cp, &[&["--channel", &far, "--release", "1"], dry].concat());
        assert!(
            err.contains(&format!("the kubelet of node w1 ({version})")),
            "{err}"
        );
        assert!(err.contains("upgrade w1 first"), "{err}");
    }
    assert_eq!(
        untouched(&cp),
        before[0],
        "cp1 changed by a refused upgrade"
    );
    assert_eq!(
        untouched(&worker),
        before[1],
        "w1 changed by a refused upgrade"
    );
    assert_eq!(
        std::fs::read_link(cp.path("components/current")).unwrap(),
        Path::new(&format!("{channel}-1"))
    );

    // what the rules allow: the same version under another number on either node, and
    // the control plane one minor ahead of w1's kubelet
    for n in [&cp, &worker] {
        let plan = n.ok(&["upgrade", "--release", "2", "--dry-run"]);
        assert!(
            plan.contains(&format!("upgrade {channel}-1 -> {channel}-2")),
            "{plan}"
        );
    }
    let plan = cp.ok(&["upgrade", "--channel", &next, "--release", "1", "--dry-run"]);
    assert!(
        plan.contains(&format!("Kubernetes {version} -> v1.{}.0", minor + 1)),
        "{plan}"
    );
    assert_eq!(untouched(&cp), before[0]);
    assert_eq!(untouched(&worker), before[1]);
    drop(worker);
    drop(cp);
    drop(lab);
}
