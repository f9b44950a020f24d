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

    let out = data.kdist(&["reset"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(sysctl("net/ipv4/ip_forward"), forward_before);
    assert_eq!(root_propagation(), propagation_before);
    assert!(!data.path("node/host-state.json").exists());
    assert!(poll_until(Duration::from_secs(1), || !data
        .path("containerd")
        .exists()));
}
