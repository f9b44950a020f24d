//! Debian's etcdctl (API v3) against `kdist datastore serve`, over the unix socket
//! (what kube-apiserver uses) and over TCP.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

/// Spawns a long-running etcdctl and hands its stdout lines over a channel.
fn etcdctl_stream(endpoint: &str, args: &[&str]) -> (Proc, mpsc::Receiver<String>) {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut proc = Proc::spawn(&mut cmd);
    let stdout = proc.child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (proc, rx)
}

fn next_lines(rx: &mpsc::Receiver<String>, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("etcdctl output line")
        })
        .collect()
}

/// The store's current revision, from the header of a read.
fn header_rev(endpoint: &str) -> i64 {
    let out = ok(endpoint, &["get", "/", "-w", "json"]);
    out.split("\"revision\":")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no header revision in {out}"))
}

fn ok(endpoint: &str, args: &[&str]) -> String {
    let (success, out, err) = etcdctl(endpoint, args);
    assert!(success, "etcdctl {args:?} failed: {err}");
    out
}

fn exercise(endpoint: &str, dir: &std::path::Path) {
    // put, get --prefix, del
    assert_eq!(ok(endpoint, &["put", "/app/a", "1"]).trim(), "OK");
    assert_eq!(ok(endpoint, &["put", "/app/b", "2"]).trim(), "OK");
    assert_eq!(ok(endpoint, &["put", "/other", "x"]).trim(), "OK");
    assert_eq!(
        ok(endpoint, &["get", "--prefix", "/app/"]),
        "/app/a\n1\n/app/b\n2\n"
    );
    assert_eq!(
        ok(endpoint, &["get", "--prefix", "/app/", "--keys-only"])
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["/app/a", "/app/b"]
    );
    let fields = ok(
        endpoint,
        &["get", "/app/", "--prefix", "--limit=1", "-w", "fields"],
    );
    assert!(fields.contains("\"Count\" : 2"), "{fields}");
    assert!(fields.contains("\"More\" : true"), "{fields}");
    assert_eq!(ok(endpoint, &["del", "/app/a"]).trim(), "1");
    assert_eq!(ok(endpoint, &["get", "/app/a"]), "");
    assert_eq!(ok(endpoint, &["del", "--prefix", "/nothing"]).trim(), "0");

    // txn: compare on value, both branches
    let (success, out, err) = etcdctl_stdin(
        endpoint,
        &["txn"],
        Some("value(\"/app/b\") = \"2\"\n\nput /app/c 3\nget /app/b\n\nput /app/never x\n\n"),
    );
    assert!(success, "txn failed: {err}");
    assert_eq!(out, "SUCCESS\n\nOK\n\n/app/b\n2\n");
    let (success, out, _) = etcdctl_stdin(
        endpoint,
        &["txn"],
        Some("mod(\"/app/b\") > \"1000\"\n\nput /app/never x\n\nget /app/c\n\n"),
    );
    assert!(success);
    assert_eq!(out, "FAILURE\n\n/app/c\n3\n");
    assert_eq!(ok(endpoint, &["get", "/app/never"]), "");

    // watch sees puts and deletes as they happen
    // from the next revision on: the events are there however late the watch starts
    let from = format!("--rev={}", header_rev(endpoint) + 1);
    let (mut watch, lines) = etcdctl_stream(endpoint, &["watch", "--prefix", "/w/", &from]);
    ok(endpoint, &["put", "/w/1", "one"]);
    ok(endpoint, &["del", "/w/1"]);
    assert_eq!(next_lines(&lines, 3), ["PUT", "/w/1", "one"]);
    assert_eq!(next_lines(&lines, 2), ["DELETE", "/w/1"]);
    watch.kill9();

    // leases: grant, attach, keep-alive, timetolive, revoke deletes the key
    let grant = ok(endpoint, &["lease", "grant", "60"]);
    let id = grant
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    assert!(grant.contains("granted with TTL(60s)"), "{grant}");
    ok(endpoint, &["put", "/leased", "v", &format!("--lease={id}")]);
    let ttl = ok(endpoint, &["lease", "timetolive", &id, "--keys"]);
    assert!(ttl.contains("attached keys([/leased])"), "{ttl}");
    let (mut keepalive, ka) = etcdctl_stream(endpoint, &["lease", "keep-alive", &id]);
    let first = next_lines(&ka, 1).remove(0);
    assert_eq!(first, format!("lease {id} keepalived with TTL(60)"));
    keepalive.kill9();
    let list = ok(endpoint, &["lease", "list"]);
    assert!(list.contains(&id), "{list}");
    assert!(ok(endpoint, &["lease", "revoke", &id]).contains("revoked"));
    assert_eq!(ok(endpoint, &["get", "/leased"]), "");
    let (success, _, err) = etcdctl(endpoint, &["lease", "revoke", &id]);
    assert!(!success);
    assert!(
        err.contains("etcdserver: requested lease not found"),
        "{err}"
    );

    // status, member list
    let status = ok(endpoint, &["endpoint", "status", "-w", "json"]);
    assert!(status.contains("\"version\":\"3.5."), "{status}");
    let members = ok(endpoint, &["member", "list"]);
    assert!(members.contains(", started, kdist, "), "{members}");

    // compaction: history before it is gone, with etcd's error
    let rev = header_rev(endpoint);
    assert!(ok(endpoint, &["compaction", &rev.to_string(), "--physical"]).contains("compacted"));
    let (success, _, err) = etcdctl(endpoint, &["get", "/app/b", "--rev=2"]);
    assert!(!success);
    assert!(
        err.contains("required revision has been compacted"),
        "{err}"
    );

    assert!(ok(endpoint, &["defrag"]).contains("Finished defragmenting"));

    // snapshot save: a stream etcdctl verifies; kdist can restore it
    let snap = dir.join(format!("snap-{}.db", rev));
    let (success, out, err) = etcdctl(endpoint, &["snapshot", "save", &snap.to_string_lossy()]);
    assert!(success, "snapshot save: {out} {err}");
    let restored = dir.join(format!("restored-{rev}.db"));
    let (success, _, err) = kdist(&[
        "datastore",
        "restore",
        &snap.to_string_lossy(),
        "--db",
        &restored.to_string_lossy(),
        "--data-dir",
        &dir.join("nodata").to_string_lossy(),
    ]);
    assert!(success, "restore: {err}");
    let (success, out, err) = kdist(&[
        "datastore",
        "status",
        "--db",
        &restored.to_string_lossy(),
        "-o",
        "json",
    ]);
    assert!(success, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status json");
    assert_eq!(status["revision"], rev);
    assert_eq!(status["keys"], 3);
}

#[test]
fn etcdctl_works_over_unix_socket_and_tcp() {
    let dir = temp_dir("kdist-etcdctl");
    let ds = Datastore::start(dir.path());
    exercise(&ds.unix_endpoint(), dir.path());
    // A fresh store for the TCP run, so revisions and keys start over.
    let dir2 = temp_dir("kdist-etcdctl-tcp");
    let ds2 = Datastore::start(dir2.path());
    exercise(&ds2.endpoint(), dir2.path());
    drop(ds);
    drop(ds2);
}
