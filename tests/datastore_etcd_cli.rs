//! `kdist datastore status|backup|compact|defrag|restore` on a node whose config says
//! `datastore: etcd`: the daemon supervises a real etcd (Debian etcd-server) with mTLS
//! certificates from kdist's PKI; the answers are checked against etcdctl's.

mod common;

use std::process::Output;

use common::{Node, describe};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(node: &Node, args: &[&str]) -> serde_json::Value {
    let out = node.kdist_ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn etcdctl_ok(node: &Node, port: u16, args: &[&str]) -> String {
    let out = node.etcdctl(port, args);
    assert!(out.status.success(), "etcdctl {args:?}: {}", describe(&out));
    stdout(&out)
}

#[test]
fn status_backup_compact_defrag_restore_on_etcd() {
    let node = Node::new("dsetcd");
    let port = node.config_with_etcd_ports("");

    // not running yet: every command says what to do
    let out = node.kdist(&["datastore", "status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kdist start"), "{err}");

    node.kdist_ok(&["start", "--timeout", "60"]);
    for i in 0..10 {
        etcdctl_ok(&node, port, &["put", &format!("/k/{i}"), "v1"]);
    }
    etcdctl_ok(&node, port, &["put", "/k/0", "v2"]);

    // status agrees with etcdctl endpoint status
    let ours = json(&node, &["datastore", "status", "-o", "json"]);
    let theirs: serde_json::Value = serde_json::from_str(&etcdctl_ok(
        &node,
        port,
        &["endpoint", "status", "-w", "json"],
    ))
    .expect("etcdctl json");
    let theirs = &theirs[0]["Status"];
    assert_eq!(ours["backend"], "etcd", "{ours}");
    assert_eq!(ours["endpoint"], format!("https://127.0.0.1:{port}"));
    assert_eq!(
        ours["revision"], theirs["header"]["revision"],
        "{ours} {theirs}"
    );
    assert_eq!(ours["size_bytes"], theirs["dbSize"], "{ours} {theirs}");
    assert_eq!(ours["version"], theirs["version"], "{ours} {theirs}");
    assert_eq!(ours["raft_term"], theirs["raftTerm"], "{ours} {theirs}");
    assert_eq!(ours["keys"], 10, "{ours}");
    assert!(ours["compacted_revision"].is_null(), "{ours}");
    assert_eq!(ours["healthy"], true, "{ours}");
    let members = ours["members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{ours}");
    let leader = theirs["leader"].as_u64().expect("leader");
    assert_eq!(ours["leader"], format!("{leader:x}"));
    let revision = ours["revision"].as_i64().expect("revision");
    let table = node.kdist_ok(&["datastore", "status"]);
    assert!(
        table.contains(&format!("revision:           {revision}")),
        "{table}"
    );

    // online backup: a snapshot etcd's own tool accepts, with our revision and keys
    let backup = node.path("backup.db");
    let backup_s = backup.to_string_lossy().to_string();
    node.kdist_ok(&["datastore", "backup", &backup_s]);
    let snap: serde_json::Value = serde_json::from_str(&etcdctl_ok(
        &node,
        port,
        &["snapshot", "status", &backup_s, "-w", "json"],
    ))
    .expect("snapshot status json");
    assert_eq!(snap["revision"].as_i64(), Some(revision), "{snap}");
    let out = node.kdist(&["datastore", "backup", &backup_s]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));

    // compact: an old revision becomes unreadable; status reports the point
    let out = node.kdist_ok(&["datastore", "compact"]);
    assert!(
        out.contains(&format!("compacted to revision {revision}")),
        "{out}"
    );
    let old = node.etcdctl(port, &["get", "/k/0", "--rev=2"]);
    assert!(!old.status.success(), "{}", describe(&old));
    assert!(
        String::from_utf8_lossy(&old.stderr).contains("compacted"),
        "{}",
        describe(&old)
    );
    let after = json(&node, &["datastore", "status", "-o", "json"]);
    assert_eq!(after["compacted_revision"], revision, "{after}");
    node.kdist_ok(&["datastore", "defrag"]);

    // changes after the backup, which the restore must undo
    etcdctl_ok(&node, port, &["put", "/k/after-backup", "x"]);
    etcdctl_ok(&node, port, &["del", "/k/1"]);

    let out = node.kdist(&["datastore", "restore", &backup_s, "--force"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kdist stop"));
    node.kdist_ok(&["stop"]);
    let out = node.kdist(&["datastore", "restore", &backup_s]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--force") && err.contains("datastore/etcd"),
        "{err}"
    );
    node.kdist_ok(&["datastore", "restore", &backup_s, "--force"]);
    let leftovers: Vec<_> = std::fs::read_dir(node.path("datastore"))
        .expect("datastore dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        leftovers,
        vec!["etcd".to_string()],
        "nothing left beside it"
    );

    node.kdist_ok(&["start", "--timeout", "60"]);
    assert_eq!(
        etcdctl_ok(&node, port, &["get", "/k/0", "--print-value-only"]).trim(),
        "v2"
    );
    assert_eq!(
        etcdctl_ok(&node, port, &["get", "/k/1", "--print-value-only"]).trim(),
        "v1"
    );
    assert_eq!(etcdctl_ok(&node, port, &["get", "/k/after-backup"]), "");
    let restored = json(&node, &["datastore", "status", "-o", "json"]);
    assert_eq!(restored["keys"], 10, "{restored}");
    node.kdist_ok(&["stop"]);
}
