//! `kdist bench datastore` against a real etcd (Debian etcd-server) and kdist's datastore
//! in one run: both are measured on the same workload, the table compares them, and the
//! benchmark's keys are gone from both afterwards while other keys stay.

mod common;

use common::{Datastore, Etcd, etcd_available, etcdctl, kdist, temp_dir};

const SHORT: [&str; 10] = [
    "--seconds",
    "1",
    "--rounds",
    "1",
    "--range-keys",
    "50",
    "--ranges",
    "5",
    "--watch-events",
    "20",
];

fn count(endpoint: &str, prefix: &str) -> u64 {
    let (ok, out, err) = etcdctl(
        endpoint,
        &["get", prefix, "--prefix", "--keys-only", "-w", "json"],
    );
    assert!(ok, "etcdctl get {prefix} on {endpoint}: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    // etcd leaves `count` out when it is 0
    v["count"].as_u64().unwrap_or(0)
}

#[test]
fn bench_datastore_measures_etcd_and_kdist_and_leaves_their_keys_alone() {
    if !etcd_available() {
        panic!("this test needs /usr/bin/etcd (Debian package etcd-server)");
    }
    let dir = temp_dir("kdist-dsbench");
    let etcd = Etcd::start(dir.path());
    let ds = Datastore::start(dir.path());
    for endpoint in [etcd.endpoint(), ds.endpoint()] {
        let (ok, _, err) = etcdctl(&endpoint, &["put", "/keep/me", "1"]);
        assert!(ok, "{err}");
    }

    let etcd_arg = format!("etcd={}", etcd.endpoint());
    let kdist_arg = format!("kdist={}", ds.unix_endpoint());
    let mut args = vec!["bench", "datastore", "--endpoints", &etcd_arg, &kdist_arg];
    args.extend(SHORT);
    args.extend(["--clients", "8", "--conns", "3", "-o", "json"]);
    let (ok, out, err) = kdist(&args);
    assert!(ok, "kdist bench datastore failed: {err}");
    let results: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let results = results.as_array().expect("a list of endpoints");
    let names: Vec<&str> = results.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["etcd", "kdist"], "{out}");
    for r in results {
        assert!(r["puts"].as_u64().unwrap_or(0) > 0, "no puts: {r}");
        assert!(r["puts_per_sec"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
        for phase in ["put_latency", "range_latency", "watch_latency"] {
            let (p50, p99) = (&r[phase]["p50_us"], &r[phase]["p99_us"]);
            let (p50, p99) = (p50.as_u64().unwrap_or(0), p99.as_u64().unwrap_or(0));
            assert!(p50 > 0 && p99 >= p50, "{phase} of {}: {r}", r["name"]);
        }
    }

    // The table names both endpoints and gives kdist's ratios against the first.
    let mut args = vec!["bench", "datastore", "--endpoints", &etcd_arg, &kdist_arg];
    args.extend(SHORT);
    let (ok, out, err) = kdist(&args);
    assert!(ok, "kdist bench datastore failed: {err}");
    assert!(out.contains("kdist vs etcd: writes "), "{out}");
    assert!(out.lines().any(|l| l.starts_with("etcd ")), "{out}");

    // Everything it wrote is deleted; what was there before is not.
    for endpoint in [etcd.endpoint(), ds.endpoint()] {
        assert_eq!(count(&endpoint, "/kdist-bench/"), 0, "{endpoint}");
        assert_eq!(count(&endpoint, "/keep/"), 1, "{endpoint}");
    }

    // An endpoint nobody serves fails with its name in the message.
    let missing = format!("unix://{}/none.sock", dir.path().display());
    let (ok, _, err) = kdist(&["bench", "datastore", "--endpoints", &missing]);
    assert!(!ok);
    assert!(err.contains("none.sock"), "{err}");
}
