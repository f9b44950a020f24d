//! containerd really supervised by kdist: generated config, ready, restarted after
//! kill -9, and the host facts shown by `kdist status`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{TempData, poll_until, text};

#[test]
fn containerd_is_supervised_and_restarted_after_kill() {
    let data = TempData::new("ctrd");
    let config = data.config("datastore: embedded\n");
    let out = data.kdist(&[
        "start",
        "--config",
        config.to_str().unwrap(),
        "--timeout",
        "60",
    ]);
    assert!(out.status.success(), "{}", text(&out));

    let status = data.status();
    let ctrd = TempData::service(&status, "containerd");
    assert_eq!(ctrd["state"], "ready", "{status:#}");
    let pid = ctrd["pid"].as_i64().unwrap() as i32;
    let socket = data.path("run/containerd.sock");
    assert!(socket.exists());

    // the config kdist generated is the one containerd runs with
    let config_toml = std::fs::read_to_string(data.path("containerd/config.toml")).unwrap();
    assert!(config_toml.contains(&socket.display().to_string()));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("containerd/config.toml"),
        "containerd runs without kdist's config"
    );
    // a real containerd answers on the socket
    let version = std::process::Command::new("ctr")
        .arg("--address")
        .arg(&socket)
        .arg("version")
        .output()
        .unwrap();
    assert!(version.status.success(), "{}", text(&version));

    // the oom_score_adj decision is visible, and matches the capability set
    let caps = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = caps
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    let restrict = eff & (1 << 24) == 0;
    let fact = status["host"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "restrict_oom_score_adj")
        .unwrap_or_else(|| panic!("no restrict_oom_score_adj fact: {status:#}"));
    assert_eq!(fact["value"], restrict.to_string());
    assert!(config_toml.contains(&format!("restrict_oom_score_adj = {restrict}")));
    let table = data.kdist(&["status"]);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("restrict_oom_score_adj"),
        "{}",
        text(&table)
    );

    // without Kubernetes binaries the node runs its datastore and containerd only, and
    // says what is missing
    if !common::on_path("kube-apiserver") {
        let names: Vec<_> = status["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["datastore", "containerd"]);
        let notes = status["notes"].to_string();
        assert!(notes.contains("kdist components install"), "{notes}");
        assert!(String::from_utf8_lossy(&table.stdout).contains("kube-apiserver"));
    }

    // kill -9: kdist notices and starts a new containerd that becomes ready again
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let recovered = poll_until(Duration::from_secs(30), || {
        let status = data.status();
        let c = TempData::service(&status, "containerd");
        c["state"] == "ready" && c["pid"].as_i64() != Some(pid as i64) && c["restarts"] == 1
    });
    assert!(recovered, "containerd not restarted: {:#}", data.status());

    let out = data.kdist(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!socket.exists() || std::os::unix::net::UnixStream::connect(&socket).is_err());
}
