//! The supervisor against a real etcd (Debian etcd-server): start, status, healing,
//! crash loops, stale children of a killed daemon, side-by-side data dirs.

mod common;

use std::time::Duration;

use common::{Node, alive, wait_for};

fn etcd_ready(node: &Node) -> bool {
    node.service("etcd")
        .is_some_and(|s| s["state"] == "ready" && s["ready"] == true)
}

fn etcd_pid(node: &Node) -> i64 {
    node.service("etcd")
        .and_then(|s| s["pid"].as_i64())
        .expect("etcd has a pid")
}

/// SIGKILLs the node's daemon (named by its pidfile) and waits until it is gone,
/// leaving its children behind as a crashed daemon would.
fn sigkill_daemon(node: &Node) {
    let daemon: i32 = std::fs::read_to_string(node.data().pidfile("kdist"))
        .expect("daemon pidfile")
        .trim()
        .parse()
        .expect("pid in the pidfile");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL the daemon");
    let gone = wait_for(Duration::from_secs(5), || {
        (!alive(daemon as i64)).then_some(())
    });
    assert!(gone.is_some(), "daemon {daemon} survived SIGKILL");
}

/// A test node whose etcd listens on free ports; returns it with the client port.
fn etcd_node(tag: &str) -> (Node, u16) {
    let node = Node::new(tag);
    let port = node.config_with_etcd_ports("");
    (node, port)
}

/// etcd answers a real client write and read (over mTLS) on the node's port.
fn etcdctl_roundtrip(node: &Node, port: u16, key: &str) {
    let put = node.etcdctl(port, &["put", key, "v"]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = node.etcdctl(port, &["get", key, "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "v");
}

#[test]
fn start_status_heal_and_stop() {
    let (node, node_port) = etcd_node("heal");
    let out = node.kdist_ok(&["start", "--timeout", "60"]);
    assert!(out.contains("etcd"), "{out}");
    assert!(etcd_ready(&node));
    etcdctl_roundtrip(&node, node_port, "/heal/before");

    // the table has the documented columns
    let table = node.kdist_ok(&["status"]);
    for column in [
        "SERVICE",
        "STATE",
        "PID",
        "UPTIME",
        "RESTARTS",
        "CPU",
        "RSS",
        "LAST EXIT",
    ] {
        assert!(table.contains(column), "{table}");
    }
    let yaml = node.kdist_ok(&["status", "-o", "yaml"]);
    assert!(yaml.contains("name: etcd"), "{yaml}");

    // kill -9 of etcd: restarted, counted, ready again within 5 s
    let pid = etcd_pid(&node);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let healed = wait_for(Duration::from_secs(5), || {
        let s = node.service("etcd")?;
        (s["ready"] == true && s["pid"].as_i64() != Some(pid)).then_some(s)
    })
    .unwrap_or_else(|| {
        panic!(
            "etcd not ready again within 5 s: {:?}",
            node.service("etcd")
        )
    });
    assert_eq!(healed["restarts"], 1, "{healed}");
    assert!(
        healed["last_exit"]
            .as_str()
            .unwrap_or("")
            .contains("signal: 9"),
        "{healed}"
    );
    etcdctl_roundtrip(&node, node_port, "/heal/after");

    // stop returns only when every child is gone
    let new_pid = etcd_pid(&node);
    node.kdist_ok(&["stop"]);
    assert!(!alive(new_pid), "etcd {new_pid} still alive after stop");
    assert!(kdist::supervisor::find_marked(&node.data()).is_empty());
    assert!(!node.data().control_socket().exists());

    // status with no daemon: says so and fails
    let out = node.kdist(&["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not running") && err.contains("kdist start"),
        "{err}"
    );
}

#[test]
fn killed_daemon_leaves_nothing_behind_on_next_start() {
    let (node, node_port) = etcd_node("stale");
    node.kdist_ok(&["start", "--timeout", "60"]);
    let old_etcd = etcd_pid(&node);
    sigkill_daemon(&node);
    // the orphaned etcd still runs, still holding its ports
    assert!(alive(old_etcd));

    node.kdist_ok(&["start", "--timeout", "60"]);
    assert!(!alive(old_etcd), "stale etcd {old_etcd} was not stopped");
    let new_etcd = etcd_pid(&node);
    assert_ne!(new_etcd, old_etcd);
    assert!(etcd_ready(&node));
    etcdctl_roundtrip(&node, node_port, "/stale/after");
}

#[test]
fn stop_after_a_killed_daemon_stops_what_it_left() {
    let (node, _) = etcd_node("stale-stop");
    node.kdist_ok(&["start", "--timeout", "60"]);
    let old_etcd = etcd_pid(&node);
    sigkill_daemon(&node);
    assert!(alive(old_etcd));

    let out = node.kdist_ok(&["stop"]);
    assert!(out.contains("was not running; stopped"), "{out}");
    assert!(!alive(old_etcd), "etcd {old_etcd} still runs after stop");
    assert!(kdist::supervisor::find_marked(&node.data()).is_empty());
    assert_eq!(node.kdist_ok(&["stop"]).trim(), "kdist is not running");
}

#[test]
fn bad_flag_is_a_crashloop_with_the_error_text() {
    let (node, _) = etcd_node("crashloop");
    node.kdist_ok(&["start", "--timeout", "60"]);
    let args = node.data().args_file("etcd");
    let mut text = std::fs::read_to_string(&args).unwrap();
    text.push_str("--no-such-flag=1\n");
    std::fs::write(&args, text).unwrap();
    node.kdist_ok(&["restart", "etcd"]);

    let status = wait_for(Duration::from_secs(20), || {
        let s = node.service("etcd")?;
        (s["state"] == "crashloop").then_some(s)
    })
    .unwrap_or_else(|| panic!("no crashloop: {:?}", node.service("etcd")));
    let tail = status["log_tail"].to_string();
    assert!(
        tail.contains("no-such-flag"),
        "etcd's own error is shown: {tail}"
    );
    let table = node.kdist_ok(&["status"]);
    assert!(
        table.contains("crashloop") && table.contains("no-such-flag"),
        "{table}"
    );

    // --wait-ready names what is not ready and fails
    let out = node.kdist(&["status", "--wait-ready", "--timeout", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("etcd"));

    // fixing the file and restarting brings it back
    let fixed = std::fs::read_to_string(&args)
        .unwrap()
        .replace("--no-such-flag=1\n", "");
    std::fs::write(&args, fixed).unwrap();
    node.kdist_ok(&["restart", "etcd"]);
    node.kdist_ok(&["status", "--wait-ready", "--timeout", "20"]);
}

#[test]
fn malformed_args_line_is_named() {
    let (node, _) = etcd_node("malformed");
    node.kdist_ok(&["start", "--timeout", "60"]);
    let args = node.data().args_file("etcd");
    let mut text = std::fs::read_to_string(&args).unwrap();
    text.push_str("listen-on-everything\n");
    std::fs::write(&args, &text).unwrap();
    node.kdist_ok(&["restart", "etcd"]);
    let line = text.lines().count();
    let expected = format!("{}:{line}", args.display());
    let status = wait_for(Duration::from_secs(10), || {
        let s = node.service("etcd")?;
        s["message"]
            .as_str()
            .is_some_and(|m| m.contains(&expected))
            .then_some(s)
    });
    assert!(status.is_some(), "{:?}", node.service("etcd"));
}

#[test]
fn two_data_dirs_side_by_side() {
    let (a, a_port) = etcd_node("side-a");
    let (b, b_port) = etcd_node("side-b");
    a.kdist_ok(&["start", "--timeout", "60"]);
    b.kdist_ok(&["start", "--timeout", "60"]);
    etcdctl_roundtrip(&a, a_port, "/a");
    etcdctl_roundtrip(&b, b_port, "/b");
    let b_etcd = etcd_pid(&b);
    a.kdist_ok(&["stop"]);
    assert!(alive(b_etcd), "stopping a touched b");
    assert!(etcd_ready(&b));
    // a second daemon on the same data dir is refused
    let out = b.kdist(&["daemon"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already runs"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn restart_applies_edited_args_and_start_is_idempotent() {
    let (node, _) = etcd_node("edit");
    node.kdist_ok(&["start", "--timeout", "60"]);
    let again = node.kdist_ok(&["start"]);
    assert!(again.contains("already running"), "{again}");

    let args = node.data().args_file("etcd");
    let text = std::fs::read_to_string(&args).unwrap();
    std::fs::write(&args, format!("{text}--max-txn-ops=321\n")).unwrap();
    let before = etcd_pid(&node);
    node.kdist_ok(&["restart", "etcd"]);
    node.kdist_ok(&["status", "--wait-ready", "--timeout", "20"]);
    let after = etcd_pid(&node);
    assert_ne!(before, after);
    let cmdline = std::fs::read(format!("/proc/{after}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("--max-txn-ops=321"));

    let out = node.kdist(&["restart", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown service"));
}

#[test]
fn bad_config_is_refused_naming_the_file() {
    let (node, _) = etcd_node("badconfig");
    let file = node.path("my-config.yaml");
    std::fs::write(&file, "etcd:\n  client_prot: 1\n").unwrap();
    let out = node.kdist(&["start", "--config", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("my-config.yaml") && err.contains("client_prot"),
        "{err}"
    );
    assert!(node.try_status().is_none(), "no daemon was started");
}

#[test]
fn foreground_daemon_notifies_systemd_and_stops_on_sigterm() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixDatagram;

    let (node, port) = etcd_node("notify");
    let notify_path = node.path("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut daemon = node
        .command(&["daemon"])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 within 60 s");
    let message = String::from_utf8_lossy(&buf[..n]);
    assert!(message.contains("READY=1"), "{message}");
    // READY comes only once every service is ready
    assert!(
        etcd_ready(&node),
        "{:?} {}",
        node.try_status(),
        node.log("kdist")
    );
    etcdctl_roundtrip(&node, port, "/notify");
    let mode = std::fs::metadata(node.data().control_socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket is root-only");

    let etcd = etcd_pid(&node);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_for(Duration::from_secs(30), || daemon.try_wait().unwrap())
        .expect("daemon exits after SIGTERM");
    assert!(status.success(), "{status}");
    assert!(!alive(etcd), "etcd survived the daemon's SIGTERM");
    assert!(kdist::supervisor::find_marked(&node.data()).is_empty());
}

#[test]
fn embedded_datastore_is_the_default_and_runs_inside_the_daemon() {
    let node = Node::new("embedded");
    node.kdist_ok(&["start", "--timeout", "60"]);
    let ds = node.service("datastore").expect("a datastore service");
    assert_eq!(ds["ready"], true, "{ds}");
    assert_eq!(ds["origin"], "builtin", "{ds}");
    assert!(ds["pid"].is_null(), "runs inside the daemon: {ds}");
    assert!(node.service("etcd").is_none(), "no etcd child by default");

    let put = node
        .etcdctl_unix()
        .args(["put", "/embedded/k", "v1"])
        .output()
        .expect("etcdctl");
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );

    // a daemon killed with SIGKILL loses no acknowledged write
    sigkill_daemon(&node);
    node.kdist_ok(&["start", "--timeout", "60"]);
    let get = node
        .etcdctl_unix()
        .args(["get", "/embedded/k", "--print-value-only"])
        .output()
        .expect("etcdctl");
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "v1");

    // restart of the builtin service: the socket comes back and serves the same data
    node.kdist_ok(&["restart", "datastore"]);
    node.kdist_ok(&["status", "--wait-ready", "--timeout", "20"]);
    let get = node
        .etcdctl_unix()
        .args(["get", "/embedded/k", "--print-value-only"])
        .output()
        .expect("etcdctl");
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "v1");
    node.kdist_ok(&["stop"]);
    assert!(!node.data().datastore_socket().exists());
}

/// The variables of `/proc/<pid>/environ`.
fn environ(pid: i64) -> std::collections::BTreeMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("read environ");
    raw.split(|b| *b == 0)
        .filter_map(|e| {
            let (k, v) = std::str::from_utf8(e).ok()?.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

#[test]
fn services_env_and_args_from_config_reach_the_children() {
    let node = Node::new("svcenv");
    let port = node.config_with_etcd_ports(
        "services:\n  etcd:\n    env: {GOGC: \"37\", KDT_MARK: on}\n    \
         args: [\"--max-txn-ops=321\", \"--name=${NODE_NAME}\"]\n  containerd:\n    \
         env: {KDT_MARK: ctr, GOGC: \"\"}\n",
    );
    node.kdist_ok(&["start", "--timeout", "60"]);
    etcdctl_roundtrip(&node, port, "/svcenv");
    let etcd = etcd_pid(&node);
    let env = environ(etcd);
    assert_eq!(env.get("GOGC").map(String::as_str), Some("37"), "{env:?}");
    assert_eq!(env.get("KDT_MARK").map(String::as_str), Some("on"));
    assert!(env.contains_key("KDIST_SUPERVISED"), "the marker stays");
    let cmdline = String::from_utf8_lossy(
        &std::fs::read(format!("/proc/{etcd}/cmdline")).expect("read cmdline"),
    )
    .replace('\0', " ");
    let host = nix::unistd::gethostname().expect("host name");
    let name = host.to_string_lossy().to_lowercase();
    assert!(
        cmdline.ends_with(&format!("--max-txn-ops=321 --name={name} ")),
        "appended after the args file, ${{NODE_NAME}} expanded: {cmdline}"
    );

    // containerd keeps its definition's GOMEMLIMIT; the empty GOGC removed the default
    let containerd = node.service_pid("containerd").expect("containerd runs");
    let env = environ(containerd);
    assert_eq!(env.get("KDT_MARK").map(String::as_str), Some("ctr"));
    assert_eq!(
        env.get("GOMEMLIMIT").map(String::as_str),
        Some("64MiB"),
        "{env:?}"
    );
    assert!(!env.contains_key("GOGC"), "{env:?}");

    // a bad setting stops `kdist start` before any daemon runs, naming the key
    node.kdist_ok(&["stop"]);
    node.write_config("services:\n  etcd:\n    env: {\"GO GC\": \"1\"}\n");
    let out = node.kdist(&["start"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("services.etcd.env.GO GC"), "{err}");
    assert!(node.try_status().is_none());
}

/// `RssFile` of a process in KiB: its resident pages of mapped files (the program).
fn rss_file_kib(pid: i64) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("read status")
        .lines()
        .find_map(|l| l.strip_prefix("RssFile:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssFile in status")
}

#[test]
fn program_pages_of_a_ready_child_are_paged_out() {
    let node = Node::new("pageout");
    // MADV_PAGEOUT leaves pages that another process maps too, and tests running beside
    // this one start containerds of their own from /usr/bin/containerd: this node's
    // containerd runs from a private, synced copy among the node's components.
    let bin = node.data().components_dir().join("current/bin");
    std::fs::create_dir_all(&bin).expect("components bin dir");
    let copy = bin.join("containerd");
    std::fs::copy("/usr/bin/containerd", &copy).expect("copy containerd");
    std::fs::File::open(&copy)
        .and_then(|f| f.sync_all())
        .expect("sync the copy");
    node.write_config("memory:\n  page_out_after: 10s\n");
    node.kdist_ok(&["start", "--timeout", "60"]);
    let containerd = node.service_pid("containerd").expect("containerd runs");
    assert_eq!(
        std::fs::read_link(format!("/proc/{containerd}/exe")).expect("containerd's exe"),
        copy
    );
    let before = rss_file_kib(containerd);
    let logged = wait_for(Duration::from_secs(30), || {
        node.log("kdist")
            .lines()
            .any(|l| l.contains("paged out") && l.contains("containerd"))
            .then_some(())
    });
    assert!(
        logged.is_some(),
        "no page-out logged: {}",
        node.log("kdist")
    );
    let after = rss_file_kib(containerd);
    assert!(
        after * 2 < before,
        "containerd's program pages: {before} KiB before, {after} KiB after (not halved)"
    );
    assert_eq!(
        node.service_pid("containerd"),
        Some(containerd),
        "still the same, healthy child"
    );
}
