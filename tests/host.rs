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
}

/// Packets the DROP rules of `chain` (mangle) have dropped so far.
fn dropped(chain: &str) -> u64 {
    let out = Command::new("iptables")
        .args(["-w", "5", "-t", "mangle", "-L", chain, "-v", "-x", "-n"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("DROP"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
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
    // a packet that may pass is waited for; one that must not is counted by the guard's
    // DROP rules before the check that it did not arrive
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
    let chain = common::egress_chain(&data.root);
    let drops = dropped(&chain);
    send(TARGET);
    send(TARGET);
    assert!(
        poll_until(Duration::from_secs(5), || dropped(&chain) >= drops + 2),
        "the guard's DROP rules did not see the packets"
    );
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

/// A host containerd started after the node (on tmpfs /run, absent at the node's first
/// start): the node created /run/containerd and recorded it, and reset keeps it while a
/// host runtime serves from it.
#[test]
#[ignore = "needs a host without /run/containerd (no host containerd, no other node): \
            run with --ignored there"]
fn reset_keeps_run_containerd_that_a_host_runtime_serves_from() {
    let run_containerd = std::path::Path::new("/run/containerd");
    assert!(
        !run_containerd.exists(),
        "/run/containerd exists before the node starts: this test needs a host without it"
    );
    let data = TempData::new("hostrt");
    let config = data.config(
        "datastore: embedded\nnetwork:\n  egress: none\n  pod_cidr: 10.156.0.0/16\n  \
         service_cidr: 10.155.7.0/24\n  cluster_dns: 10.155.7.10\n  bridge: kdtbr1\n",
    );
    let out = data.kdist(&[
        "start",
        "--config",
        config.to_str().unwrap(),
        "--timeout",
        "60",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = data.kdist(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    let state = std::fs::read_to_string(data.path("node/host-state.json")).unwrap();
    assert!(
        state.contains("\"/run/containerd\""),
        "the node did not record the /run/containerd it created: {state}"
    );
    std::fs::create_dir_all(run_containerd).unwrap();
    let host_runtime =
        std::os::unix::net::UnixListener::bind(run_containerd.join("kdist-test-host.sock"))
            .unwrap();
    let out = data.kdist(&["reset"]);
    let kept = run_containerd.exists();
    drop(host_runtime);
    let _ = std::fs::remove_dir_all(run_containerd);
    assert!(out.status.success(), "{}", text(&out));
    assert!(kept, "reset removed a directory a host runtime serves from");
    assert!(
        text(&out).contains("kept /run/containerd"),
        "{}",
        text(&out)
    );
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

/// A network namespace made for one test, deleted on drop (with the links in it).
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        ip(&["netns", "add", &name]);
        Self(name)
    }

    /// Moves the calling thread into it (only that thread: spawn one for this).
    fn enter(&self) {
        let file = std::fs::File::open(format!("/run/netns/{}", self.0)).unwrap();
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn refreshing_the_egress_guard_never_lets_a_packet_out() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    // the "node" and its peer, joined by a veth pair; nothing here touches the host
    let id = std::process::id() % 10_000;
    let node = Arc::new(Netns::new(format!("kdt-gn-{id}")));
    let peer = Arc::new(Netns::new(format!("kdt-gp-{id}")));
    let (near, far) = (format!("kdtg{id}a"), format!("kdtg{id}b"));
    ip(&[
        "link", "add", &near, "netns", &node.0, "type", "veth", "peer", "name", &far, "netns",
        &peer.0,
    ]);
    ip(&["-n", &node.0, "addr", "add", "10.155.0.1/24", "dev", &near]);
    ip(&["-n", &peer.0, "addr", "add", "10.155.0.2/24", "dev", &far]);
    ip(&["-n", &node.0, "link", "set", &near, "up"]);
    ip(&["-n", &peer.0, "link", "set", &far, "up"]);

    // the peer counts what reaches it until it gets "end"
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let listener = {
        let peer = peer.clone();
        std::thread::spawn(move || {
            peer.enter();
            let socket = UdpSocket::bind("10.155.0.2:9999").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            bound_tx.send(()).unwrap();
            let (mut control, mut probes) = (0u64, 0u64);
            let mut buf = [0u8; 64];
            loop {
                let (n, _) = socket
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("listener (no end packet?): {e}"));
                match &buf[..n] {
                    b"control" => control += 1,
                    b"end" => return (control, probes),
                    _ => probes += 1,
                }
            }
        })
    };
    bound_rx.recv().unwrap();

    let data = kdist::config::DataDir::new(format!("/tmp/kdist-guard-refresh-{id}"));
    let mut config = kdist::config::NodeConfig::default();
    // the sender (10.155.0.1) is a pod address, the listener (10.155.0.2) is not: traffic
    // to pod addresses is the cluster's own and passes the guard
    config.network.pod_cidr = "10.155.0.0/31".into();
    config.network.service_cidr = "10.156.0.0/24".into();
    config.network.bridge = "kdtgbr0".into();

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (sent_control_tx, sent_control_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let sender = {
        let (node, stop, sent) = (node.clone(), stop.clone(), sent.clone());
        std::thread::spawn(move || {
            node.enter();
            let socket = UdpSocket::bind("10.155.0.1:0").unwrap();
            // control: without the guard a packet gets through
            socket.send_to(b"control", "10.155.0.2:9999").unwrap();
            sent_control_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            // then, once the guard is on, send as fast as possible until told to stop
            while !stop.load(Ordering::SeqCst) {
                // EPERM while the guard drops it locally: that is the point
                let _ = socket.send_to(b"probe", "10.155.0.2:9999");
                sent.fetch_add(1, Ordering::SeqCst);
            }
            socket
        })
    };
    sent_control_rx.recv().unwrap();

    let guard = {
        let node = node.clone();
        let (sent, stop) = (sent.clone(), stop.clone());
        std::thread::spawn(move || {
            node.enter();
            kdist::node::egress::apply(&data, &config).unwrap();
            go_tx.send(()).unwrap();
            let before = sent.load(Ordering::SeqCst);
            for _ in 0..100 {
                kdist::node::egress::apply(&data, &config).unwrap();
            }
            stop.store(true, Ordering::SeqCst);
            let during = sent.load(Ordering::SeqCst) - before;
            let rules = Command::new("iptables")
                .args(["-w", "5", "-t", "mangle", "-S"])
                .output()
                .unwrap();
            kdist::node::egress::remove(&data).unwrap();
            (during, String::from_utf8_lossy(&rules.stdout).into_owned())
        })
    };
    let (during, rules) = guard.join().unwrap();
    let socket = sender.join().unwrap();
    // packets on one veth arrive in order: once "end" is in, every probe that got out is
    // counted
    socket.send_to(b"end", "10.155.0.2:9999").unwrap();
    let (control, probes) = listener.join().unwrap();

    assert_eq!(control, 1, "the test path itself is broken");
    assert!(
        during > 1000,
        "only {during} packets sent while the guard was refreshed"
    );
    assert_eq!(
        rules.matches("-j DROP").count(),
        4,
        "the guard's rules, once each: {rules}"
    );
    assert_eq!(
        probes, 0,
        "{probes} of {during} packets got out while the guard was refreshed"
    );
}
