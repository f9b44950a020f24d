//! `kdist datastore migrate` on a running node (no Kubernetes services): keys written with
//! etcdctl into the embedded datastore (transactions, overwrites, deletes, binary values,
//! a leased key) move to etcd with mTLS and back, every key, value, lease and
//! mod revision read back with etcdctl; a target that is not empty is refused and the
//! node stays where it was.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Output, Stdio};

use base64::Engine;
use common::*;

/// key -> (value, create_revision, mod_revision, version, lease)
type Kvs = BTreeMap<Vec<u8>, (Vec<u8>, i64, i64, i64, i64)>;

fn b64(v: &serde_json::Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or_default())
        .expect("base64 from etcdctl")
}

/// Every key through `etcdctl get "" --prefix -w json`, and the header revision.
fn read_all(out: Output) -> (i64, Kvs) {
    assert!(out.status.success(), "etcdctl get: {}", describe(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("etcdctl json");
    let revision = json["header"]["revision"].as_i64().expect("revision");
    let kvs = json["kvs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|kv| {
            let n = |f: &str| kv[f].as_i64().unwrap_or(0);
            (
                b64(&kv["key"]),
                (
                    b64(&kv["value"]),
                    n("create_revision"),
                    n("mod_revision"),
                    n("version"),
                    n("lease"),
                ),
            )
        })
        .collect();
    (revision, kvs)
}

/// etcdctl over the embedded datastore's unix socket; `stdin` is fed as raw bytes.
fn unix_etcdctl(node: &Node, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = node
        .etcdctl_unix()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run etcdctl");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(bytes) = stdin {
        input.write_all(bytes).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("etcdctl")
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn state(node: &Node, service: &str) -> Option<String> {
    node.service(service)
        .and_then(|s| s["state"].as_str().map(str::to_string))
}

fn config_datastore(node: &Node) -> String {
    std::fs::read_to_string(node.path("config.yaml"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("datastore:").map(|v| v.trim().to_string()))
        .unwrap_or_else(|| "embedded".into())
}

fn migrated_dirs(node: &Node, kind: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(node.path("datastore"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy()
                    .starts_with(&format!("migrated-{kind}-"))
            })
        })
        .collect()
}

#[test]
fn embedded_to_etcd_and_back_keeps_every_key() {
    let node = Node::new("mig");
    let port = node.config_with_etcd_ports("disable: [containerd]\n");
    // config_with_etcd_ports picks etcd: this node starts on the embedded default
    let text = std::fs::read_to_string(node.path("config.yaml")).unwrap();
    std::fs::write(
        node.path("config.yaml"),
        text.replace(
            "datastore: etcd\n",
            "# the datastore, see README\ndatastore: embedded\n",
        ),
    )
    .unwrap();
    node.start();
    assert_eq!(state(&node, "datastore").as_deref(), Some("ready"));

    // 400 keys in transactions of 100 (keys sharing a revision), 100 single puts
    for t in 0..4 {
        let mut script = String::from("\n");
        for i in 0..100 {
            script.push_str(&format!("put /registry/t{t}/k{i:03} value-{t}-{i}\n"));
        }
        script.push('\n');
        script.push('\n');
        ok(unix_etcdctl(&node, &["txn"], Some(script.as_bytes())));
    }
    for i in 0..100 {
        ok(unix_etcdctl(
            &node,
            &["put", &format!("/registry/single/{i:03}"), &format!("v{i}")],
            None,
        ));
    }
    // overwrites (versions above 1) and deletes (gaps in the revisions)
    for i in 0..10 {
        ok(unix_etcdctl(
            &node,
            &["put", &format!("/registry/single/{i:03}"), "again"],
            None,
        ));
        ok(unix_etcdctl(
            &node,
            &["del", &format!("/registry/t0/k{i:03}")],
            None,
        ));
    }
    // binary values, NUL bytes included, and a binary key
    let binary: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    ok(unix_etcdctl(
        &node,
        &["put", "/registry/binary/all-bytes"],
        Some(&binary),
    ));
    {
        use std::os::unix::ffi::OsStrExt;
        let key = std::ffi::OsStr::from_bytes(b"/registry/binary/\xff\xfe\x01key");
        let out = node
            .etcdctl_unix()
            .arg("put")
            .arg(key)
            .arg(std::ffi::OsStr::from_bytes(b"\x80\x81\xc3"))
            .output()
            .unwrap();
        ok(out);
    }
    let grant = ok(unix_etcdctl(&node, &["lease", "grant", "600"], None));
    let lease = grant
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    ok(unix_etcdctl(
        &node,
        &["put", "--lease", &lease, "/registry/leased", "held"],
        None,
    ));
    let (before_rev, before) = read_all(unix_etcdctl(
        &node,
        &["get", "", "--prefix", "-w", "json"],
        None,
    ));
    assert_eq!(before.len(), 390 + 100 + 2 + 1, "keys written");
    assert!(before.values().any(|v| v.3 > 1), "an overwritten key");

    // embedded -> etcd
    let out = node.kdist_ok(&["datastore", "migrate", "--to", "etcd", "-o", "json"]);
    let report: serde_json::Value = serde_json::from_str(&out).expect("report json");
    assert_eq!(report["keys"], before.len(), "{report}");
    assert_eq!(report["source_revision"], before_rev, "{report}");
    assert_eq!(report["mod_revisions_kept"], before.len(), "{report}");
    assert_eq!(state(&node, "etcd").as_deref(), Some("ready"));
    assert!(
        state(&node, "datastore").is_none(),
        "the embedded datastore no longer runs"
    );
    assert!(!node.data().datastore_socket().exists());
    assert_eq!(config_datastore(&node), "etcd");
    let kept = migrated_dirs(&node, "embedded");
    assert_eq!(kept.len(), 1);
    assert!(kept[0].join("state.db").exists(), "old SQLite data kept");
    assert!(
        report["old_data"]
            .as_str()
            .unwrap()
            .contains("migrated-embedded-")
    );

    let (etcd_rev, on_etcd) = read_all(node.etcdctl(port, &["get", "", "--prefix", "-w", "json"]));
    assert!(
        etcd_rev >= before_rev,
        "revision went back: {etcd_rev} < {before_rev}"
    );
    assert_eq!(on_etcd.len(), before.len());
    for (key, (value, _, modr, _, lease)) in &before {
        let got = on_etcd
            .get(key)
            .unwrap_or_else(|| panic!("{key:?} missing on etcd"));
        assert_eq!(&got.0, value, "value of {key:?}");
        assert_eq!(got.2, *modr, "mod revision of {key:?}");
        assert_eq!(got.4, *lease, "lease of {key:?}");
    }
    let ttl = String::from_utf8_lossy(
        &node
            .etcdctl(port, &["lease", "timetolive", &lease, "--keys"])
            .stdout,
    )
    .into_owned();
    assert!(ttl.contains("/registry/leased"), "{ttl}");
    let remaining: i64 = ttl
        .split("remaining(")
        .nth(1)
        .and_then(|r| r.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{ttl}"));
    assert!(remaining > 0 && remaining <= 600, "{ttl}");
    // the new datastore takes writes
    let put = node.etcdctl(port, &["put", "/registry/after", "x"]);
    assert!(put.status.success(), "{}", describe(&put));

    // etcd -> embedded: every field as etcd has it, revisions included
    let (etcd_rev, on_etcd) = read_all(node.etcdctl(port, &["get", "", "--prefix", "-w", "json"]));
    let out = node.kdist_ok(&["datastore", "migrate", "--to", "embedded", "-o", "json"]);
    let report: serde_json::Value = serde_json::from_str(&out).expect("report json");
    assert_eq!(report["keys"], on_etcd.len(), "{report}");
    assert_eq!(state(&node, "datastore").as_deref(), Some("ready"));
    assert!(state(&node, "etcd").is_none());
    assert_eq!(config_datastore(&node), "embedded");
    let (back_rev, back) = read_all(unix_etcdctl(
        &node,
        &["get", "", "--prefix", "-w", "json"],
        None,
    ));
    assert_eq!(
        back_rev, etcd_rev,
        "the embedded store continues at etcd's revision"
    );
    assert_eq!(back, on_etcd, "keys, values, revisions, versions, leases");
    let etcd_kept = migrated_dirs(&node, "etcd");
    assert_eq!(etcd_kept.len(), 1);
    assert!(
        etcd_kept[0].join("etcd/member").exists(),
        "old etcd data kept"
    );
    let ttl = ok(unix_etcdctl(
        &node,
        &["lease", "timetolive", &lease, "--keys"],
        None,
    ));
    assert!(ttl.contains("/registry/leased"), "{ttl}");
    ok(unix_etcdctl(&node, &["put", "/registry/after2", "y"], None));

    // a target that is not empty is refused; nothing changes
    let copy = Command::new("cp")
        .arg("-a")
        .arg(etcd_kept[0].join("etcd"))
        .arg(node.path("datastore/etcd"))
        .status()
        .unwrap();
    assert!(copy.success());
    let out = node.kdist(&["datastore", "migrate", "--to", "etcd"]);
    assert!(!out.status.success(), "migrated onto a non-empty etcd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not empty") && err.contains("datastore/etcd"),
        "{err}"
    );
    assert_eq!(config_datastore(&node), "embedded");
    assert_eq!(state(&node, "datastore").as_deref(), Some("ready"));
    assert!(
        node.path("datastore/etcd/member").exists(),
        "the refused target is left alone"
    );
    let (_, still) = read_all(unix_etcdctl(
        &node,
        &["get", "", "--prefix", "-w", "json"],
        None,
    ));
    assert_eq!(still.len(), back.len() + 1);
    // and the same node refuses to "migrate" to where it is
    let out = node.kdist(&["datastore", "migrate", "--to", "embedded"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already runs"));
}

#[test]
fn a_failed_migration_leaves_the_node_on_its_datastore() {
    let node = Node::new("migf");
    let port = node.config_with_etcd_ports("disable: [containerd]\n");
    let text = std::fs::read_to_string(node.path("config.yaml")).unwrap();
    std::fs::write(
        node.path("config.yaml"),
        text.replace("datastore: etcd\n", ""),
    )
    .unwrap();
    node.start();
    ok(unix_etcdctl(&node, &["put", "/registry/k", "v"], None));
    let (_, before) = read_all(unix_etcdctl(
        &node,
        &["get", "", "--prefix", "-w", "json"],
        None,
    ));
    // etcd cannot listen: its client port is taken
    let blocker = std::net::TcpListener::bind(("127.0.0.1", port)).expect("hold the etcd port");
    let out = node.kdist(&["datastore", "migrate", "--to", "etcd"]);
    drop(blocker);
    assert!(!out.status.success(), "migrated with etcd unable to listen");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("starting etcd") && err.contains("back on its embedded datastore"),
        "{err}"
    );
    assert_eq!(config_datastore(&node), "embedded");
    assert_eq!(state(&node, "datastore").as_deref(), Some("ready"));
    assert!(state(&node, "etcd").is_none(), "etcd left running");
    assert!(
        !node.path("datastore/etcd").exists(),
        "the failed target's data is removed"
    );
    assert!(
        migrated_dirs(&node, "embedded").is_empty(),
        "nothing moved aside"
    );
    let (_, after) = read_all(unix_etcdctl(
        &node,
        &["get", "", "--prefix", "-w", "json"],
        None,
    ));
    assert_eq!(after, before);
    // with the port free again the same command succeeds
    node.kdist_ok(&["datastore", "migrate", "--to", "etcd"]);
    let get = node.etcdctl(port, &["get", "/registry/k", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "v");
}
