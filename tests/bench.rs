//! `kdist bench node` against a real supervised node without Kubernetes binaries (etcd
//! and containerd, or the embedded datastore and containerd): it starts the daemon,
//! measures the whole process tree per service and stops it again.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Node, OFFLINE, free_ports};

fn group<'a>(run: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    run["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == name)
}

fn vm_rss_mib(pid: i64) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib / 1024.0
}

#[test]
fn bench_node_measures_each_configuration_and_the_whole_tree() {
    let node = Node::new("bench");
    let ports = free_ports(2);
    let etcd = node.path("etcd.yaml");
    std::fs::write(
        &etcd,
        format!(
            "{OFFLINE}datastore: etcd\netcd:\n  client_port: {}\n  peer_port: {}\n",
            ports[0], ports[1]
        ),
    )
    .unwrap();
    let embedded = node.path("embedded.yaml");
    std::fs::write(&embedded, OFFLINE).unwrap();
    let out = node.ok(&[
        "bench",
        "node",
        "--config",
        etcd.to_str().unwrap(),
        "--config",
        embedded.to_str().unwrap(),
        "--seconds",
        "3",
        "--timeout",
        "60",
        "--keep-running",
        "-o",
        "json",
    ]);
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 2, "{runs:?}");
    for run in runs {
        // no Kubernetes binaries here: no apiserver, no node, every service ready
        assert!(run["apiserver_ready_secs"].is_null(), "{run}");
        assert!(run["node_ready_secs"].is_null(), "{run}");
        assert!(run["all_ready_secs"].as_f64().unwrap() > 0.0, "{run}");
        assert_eq!(run["targets_met"], false);
        let sum: f64 = run["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["rss_mib"].as_f64().unwrap())
            .sum();
        let total = run["total_rss_mib"].as_f64().unwrap();
        assert!((sum - total).abs() < 0.5, "groups add up: {sum} vs {total}");
        for name in ["kdist", "containerd"] {
            let g = group(run, name).unwrap_or_else(|| panic!("no {name} in {run}"));
            assert!(g["rss_mib"].as_f64().unwrap() > 1.0, "{g}");
            assert!(g["processes"].as_u64().unwrap() >= 1, "{g}");
        }
    }
    let etcd_group = group(&runs[0], "etcd").expect("the etcd run measures etcd");
    assert!(
        etcd_group["rss_mib"].as_f64().unwrap() > 5.0,
        "{etcd_group}"
    );
    assert!(group(&runs[1], "etcd").is_none(), "{}", runs[1]);

    // the last run is still up: its containerd figure is the process's real RSS
    let containerd = node.service_pid("containerd").expect("containerd runs");
    let measured = group(&runs[1], "containerd").unwrap()["rss_mib"]
        .as_f64()
        .unwrap();
    let now = vm_rss_mib(containerd);
    assert!(
        (measured - now).abs() < now * 0.5,
        "bench said {measured} MiB, /proc says {now} MiB"
    );
    // and a running daemon is refused: the benchmark measures from start
    let out = node.run(&["bench", "node", "--seconds", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kdist stop") && err.contains("bench idle"),
        "{err}"
    );
    node.ok(&["stop"]);
    assert!(kdist::supervisor::find_marked(&node.data()).is_empty());
}
