//! Host preparation and the egress guard, on this host, through the real binary:
//! `kdist start` sets ip_forward and shared mount propagation and installs the guard;
//! `kdist stop` removes the guard; `kdist reset` restores what was there before.
//! The "outside" is a veth pair into a private network namespace: nothing leaves.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use common::outside::Outside;
use common::{TempData, poll_until, text};

const SERVICE_CIDR: &str = "10.153.7.0/24";
const TARGET: &str = "10.153.7.99";

fn send(target: &str) {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    // EPERM when the guard drops it locally: that is the point
    let _ = socket.send_to(b"kdist egress test", format!("{target}:9"));
    std::thread::sleep(Duration::from_millis(300));
}

fn sysctl(key: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/{key}"))
        .unwrap()
        .trim()
        .to_string()
}

fn root_propagation() -> String {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap()
        .to_string();
    if line.contains(" shared:") {
        "shared".into()
    } else {
        "not shared".into()
    }
}

fn chain_exists(data: &TempData) -> bool {
    Command::new("iptables")
        .args(["-w", "5", "-t", "mangle", "-S"])
        .arg(common::egress_chain(&data.root))
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn host_preparation_and_egress_guard_are_applied_and_undone() {
    let outside = Outside::new("eg", "10.153.7.1/24", TARGET);
    let forward_before = sysctl("net/ipv4/ip_forward");
    let propagation_before = root_propagation();

    // control: without the guard the packet reaches the namespace
    // a packet that may pass is waited for; one that must not gets send()'s 300 ms
    let arrives = |n: u64| poll_until(Duration::from_secs(5), || outside.arrived() == n);
    let before = outside.arrived();
    send(TARGET);
    assert!(arrives(before + 1), "the test path itself is broken");

    let data = TempData::new("host");
    let config = data.config(&format!(
        "datastore: embedded\nnetwork:\n  egress: none\n  pod_cidr: 10.154.0.0/16\n  \
         service_cidr: {SERVICE_CIDR}\n  cluster_dns: 10.153.7.10\n  bridge: kdtbr0\n"
    ));
    let out = data.kdist(&[
        "start",
        "--config",
        config.to_str().unwrap(),
        "--timeout",
        "60",
    ]);
    assert!(out.status.success(), "{}", text(&out));

    assert_eq!(sysctl("net/ipv4/ip_forward"), "1");
    assert_eq!(root_propagation(), "shared");
    assert!(chain_exists(&data));
    let status = data.status();
    let facts = status["host"].as_array().unwrap();
    assert!(
        facts
            .iter()
            .any(|f| f["name"] == "egress" && f["value"] == "none"),
        "{status:#}"
    );
    assert!(
        facts.iter().any(|f| f["name"] == "net.ipv4.ip_forward"),
        "{status:#}"
    );

    // with the guard: the packet to an unserved service IP never leaves
    let guarded = outside.arrived();
    send(TARGET);
    send(TARGET);
    assert_eq!(outside.arrived(), guarded, "egress guard let a packet out");

    let out = data.kdist(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!chain_exists(&data), "stop leaves the egress chain");
    let after_stop = outside.arrived();
    send(TARGET);
    assert!(arrives(after_stop + 1), "a packet sent after stop was lost");

    // a host containerd started after the node (on tmpfs /run, absent at the node's
    // first start): reset keeps the directory it serves from
    let state = std::fs::read_to_string(data.path("node/host-state.json")).unwrap();
    let recorded = state.contains("\"/run/containerd\"");
    let host_runtime = recorded.then(|| {
        std::fs::create_dir_all("/run/containerd").unwrap();
        std::os::unix::net::UnixListener::bind("/run/containerd/kdist-test-host.sock").unwrap()
    });
    let out = data.kdist(&["reset"]);
    let kept = std::path::Path::new("/run/containerd").exists();
    if host_runtime.is_some() {
        drop(host_runtime);
        let _ = std::fs::remove_dir_all("/run/containerd");
    }
    assert!(out.status.success(), "{}", text(&out));
    if recorded {
        assert!(kept, "reset removed a directory a host runtime serves from");
        assert!(
            text(&out).contains("kept /run/containerd"),
            "{}",
            text(&out)
        );
    } else {
        eprintln!("/run/containerd existed before the node started: not recorded, not checked");
    }
    assert_eq!(sysctl("net/ipv4/ip_forward"), forward_before);
    assert_eq!(root_propagation(), propagation_before);
    assert!(!data.path("node/host-state.json").exists());
    assert!(poll_until(Duration::from_secs(1), || !data
        .path("containerd")
        .exists()));
}

/// Runs `ip` with `args`, asserting success.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", text(&out));
}

#[test]
fn reset_keeps_pod_namespaces_that_another_runtime_still_uses() {
    let id = std::process::id();
    let (used, free) = (format!("cni-kdt-used-{id}"), format!("cni-kdt-free-{id}"));
    ip(&["netns", "add", &used]);
    ip(&["netns", "add", &free]);
    // a "pod" of another runtime: a process inside `used`
    let mut pod = Command::new("ip")
        .args(["netns", "exec", &used, "sleep", "60"])
        .spawn()
        .unwrap();
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    let entered = poll_until(Duration::from_secs(5), || {
        std::fs::read_link(format!("/proc/{}/ns/net", pod.id())).is_ok_and(|ns| ns != ours)
    });

    // a pod namespace mounted in another mount namespace (a node under `ip netns
    // exec`) is a plain file in this one
    let elsewhere = std::path::Path::new("/run/netns").join(format!("cni-kdt-elsewhere-{id}"));
    std::fs::write(&elsewhere, "").unwrap();

    let data = TempData::new("netns");
    let out = data.kdist(&["reset"]);
    let kept = std::path::Path::new("/run/netns").join(&used).exists();
    let removed = !std::path::Path::new("/run/netns").join(&free).exists();
    let kept_elsewhere = elsewhere.exists();
    let _ = std::fs::remove_file(&elsewhere);
    // clean up before asserting: by pid and by name, never by pattern
    let _ = pod.kill();
    let _ = pod.wait();
    let _ = Command::new("ip").args(["netns", "del", &used]).status();
    let _ = Command::new("ip").args(["netns", "del", &free]).status();
    assert!(entered, "the stand-in pod never entered its namespace");
    assert!(out.status.success(), "{}", text(&out));
    assert!(kept, "reset removed a namespace a process is in");
    assert!(removed, "reset left an unused CNI namespace");
    assert!(
        kept_elsewhere,
        "reset removed a namespace file that is not mounted in its mount namespace"
    );
}
