//! `kdist datastore` commands on the embedded backend: status, backup while serving,
//! restore (refusals and --force), compact, defrag, and a corrupt database refused at
//! start without being touched.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn json(args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = kdist(args);
    assert!(ok, "kdist {args:?}: {err}");
    serde_json::from_str(&out).expect("json output")
}

#[test]
fn status_backup_restore_compact_defrag() {
    let dir = temp_dir("kdist-dscli");
    let d = dir.path();
    let data = d.join("data");
    let data_s = data.to_string_lossy().to_string();
    let mut ds = Datastore::start(d);
    let db = ds.db.to_string_lossy().to_string();
    for i in 0..20 {
        let (ok, _, err) = etcdctl(&ds.endpoint(), &["put", &format!("k{i:02}"), "value"]);
        assert!(ok, "{err}");
    }
    etcdctl(&ds.endpoint(), &["put", "k00", "again"]);

    // Read-only commands work while it serves.
    let status = json(&[
        "datastore",
        "status",
        "--db",
        &db,
        "-o",
        "json",
        "--data-dir",
        &data_s,
    ]);
    assert_eq!(status["backend"], "embedded");
    assert_eq!(status["keys"], 20);
    assert_eq!(status["revision"], 22);
    assert!(status["compacted_revision"].is_null());
    let remote = json(&[
        "datastore",
        "status",
        "--endpoint",
        &ds.endpoint(),
        "-o",
        "json",
        "--data-dir",
        &data_s,
    ]);
    assert_eq!(remote["keys"], 20);
    let backup = d.join("backup.db");
    let backup_s = backup.to_string_lossy().to_string();
    let (ok, _, err) = kdist(&[
        "datastore",
        "backup",
        &backup_s,
        "--db",
        &db,
        "--data-dir",
        &data_s,
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = kdist(&[
        "datastore",
        "backup",
        &backup_s,
        "--db",
        &db,
        "--data-dir",
        &data_s,
    ]);
    assert!(!ok && err.contains("already exists"), "{err}");

    // Compact and defrag through the API of the running server.
    let (ok, out, err) = kdist(&[
        "datastore",
        "compact",
        "--endpoint",
        &ds.endpoint(),
        "--data-dir",
        &data_s,
    ]);
    assert!(
        ok && out.contains("compacted to revision 22"),
        "{out} {err}"
    );
    let (ok, _, err) = kdist(&[
        "datastore",
        "defrag",
        "--endpoint",
        &ds.endpoint(),
        "--data-dir",
        &data_s,
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = etcdctl(&ds.endpoint(), &["get", "k00", "--rev=5"]);
    assert!(!ok && err.contains("compacted"), "{err}");
    assert!(ds.proc.terminate().success());

    // Offline: restore refuses to overwrite without --force, then restores the backup.
    let (ok, _, err) = kdist(&[
        "datastore",
        "restore",
        &backup_s,
        "--db",
        &db,
        "--data-dir",
        &data_s,
    ]);
    assert!(!ok && err.contains("--force"), "{err}");
    let (ok, _, err) = kdist(&[
        "datastore",
        "restore",
        &backup_s,
        "--db",
        &db,
        "--force",
        "--data-dir",
        &data_s,
    ]);
    assert!(ok, "{err}");
    let status = json(&[
        "datastore",
        "status",
        "--db",
        &db,
        "-o",
        "json",
        "--data-dir",
        &data_s,
    ]);
    assert_eq!(status["revision"], 22);
    assert!(
        status["compacted_revision"].is_null(),
        "the backup predates the compaction"
    );
    let (ok, out, err) = kdist(&[
        "datastore",
        "compact",
        "--revision",
        "10",
        "--db",
        &db,
        "--data-dir",
        &data_s,
    ]);
    assert!(ok, "{out} {err}");
    let (ok, _, err) = kdist(&["datastore", "defrag", "--db", &db, "--data-dir", &data_s]);
    assert!(ok, "{err}");
    let status = json(&[
        "datastore",
        "status",
        "--db",
        &db,
        "-o",
        "json",
        "--data-dir",
        &data_s,
    ]);
    assert_eq!(status["compacted_revision"], 10);
    assert_eq!(status["keys"], 20);

    // The history after the compaction point is still readable after restart.
    let ds = Datastore::start(d);
    let (ok, out, err) = etcdctl(&ds.endpoint(), &["get", "k00", "--rev=21"]);
    assert!(ok, "{err}");
    assert_eq!(out, "k00\nvalue\n");
    drop(ds);
}

#[test]
fn restore_refuses_while_a_datastore_serves_the_data_dir() {
    let dir = temp_dir("kdist-dsrestore");
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("run")).expect("run dir");
    let socket = data.join("run/datastore.sock");
    let db = dir.path().join("live.db");
    let mut proc = Proc::spawn(
        Command::new(KDIST)
            .args(["datastore", "serve", "--db"])
            .arg(&db)
            .arg("--listen")
            .arg(format!("unix://{}", socket.display())),
    );
    assert!(poll_until(Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    }));
    let backup = dir.path().join("b.db");
    let (ok, _, err) = kdist(&[
        "datastore",
        "backup",
        &backup.to_string_lossy(),
        "--db",
        &db.to_string_lossy(),
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = kdist(&[
        "datastore",
        "restore",
        &backup.to_string_lossy(),
        "--force",
        "--data-dir",
        &data.to_string_lossy(),
    ]);
    assert!(!ok && err.contains("stop it before a restore"), "{err}");
    assert!(proc.terminate().success());
}

#[test]
fn corrupt_database_is_refused_and_left_alone() {
    let dir = temp_dir("kdist-dscorrupt");
    let db = dir.path().join("state.db");
    let garbage = b"this is not a database, it must stay exactly like this".repeat(100);
    std::fs::write(&db, &garbage).expect("write");
    let out = Command::new(KDIST)
        .args(["datastore", "serve", "--db"])
        .arg(&db)
        .arg("--listen")
        .arg(format!("unix://{}", dir.path().join("s.sock").display()))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is corrupt or not a kdist datastore"), "{err}");
    assert!(err.contains("kdist datastore restore"), "{err}");
    assert_eq!(std::fs::read(&db).expect("read"), garbage);
    assert!(!dir.path().join("state.db-wal").exists());

    // A valid SQLite file of something else is refused too.
    let other = dir.path().join("other.db");
    let conn = rusqlite::Connection::open(&other).expect("sqlite");
    conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .expect("sql");
    drop(conn);
    let (ok, _, err) = kdist(&["datastore", "status", "--db", &other.to_string_lossy()]);
    assert!(!ok && err.contains("no kdist schema"), "{err}");
}
