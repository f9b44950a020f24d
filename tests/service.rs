//! `kdist service install|uninstall|status`: units written below a temp root (the hidden
//! `--root` flag), checked by systemd's own parser (`systemd-analyze verify`, which works
//! without systemd running) and by sh for the OpenRC script.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::{temp_dir, text};

const KDIST: &str = env!("CARGO_BIN_EXE_kdist");

fn kdist(data: &Path, root: &Path, args: &[&str]) -> Output {
    Command::new(KDIST)
        .arg("--data-dir")
        .arg(data)
        .args(["service"])
        .args(args)
        .arg("--root")
        .arg(root)
        .env_remove("KDIST_DATA_DIR")
        .env_remove("SNAP")
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status(data: &Path, root: &Path, init: &str) -> serde_json::Value {
    let out = ok(kdist(data, root, &["status", "--init", init, "-o", "json"]));
    serde_json::from_str(&out).unwrap()
}

fn exe() -> String {
    std::fs::canonicalize(KDIST).unwrap().display().to_string()
}

#[test]
fn systemd_unit_is_valid_for_systemd_and_runs_this_node() {
    let dir = temp_dir("kdist-svc-systemd");
    let root = dir.path().join("root");
    // a data dir with a space: quoted in ExecStart
    let data = dir.path().join("my data");
    std::fs::create_dir_all(&data).unwrap();
    let config = dir.path().join("seed.yaml");
    std::fs::write(&config, "node_ip: 127.0.0.1\n").unwrap();
    let config_arg = config.display().to_string();

    // nothing runs under the empty root: say so and where the files would go
    let out = kdist(&data, &root, &["install"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("neither systemd nor OpenRC runs"), "{err}");
    assert!(err.contains("etc/systemd/system/kdist.service"), "{err}");
    assert!(err.contains("etc/init.d/kdist"), "{err}");

    // --dry-run prints the unit and writes nothing
    let unit_path = root.join("etc/systemd/system/kdist.service");
    let printed = ok(kdist(
        &data,
        &root,
        &[
            "install",
            "--init",
            "systemd",
            "--config",
            &config_arg,
            "--dry-run",
        ],
    ));
    assert!(printed.contains("Type=notify"), "{printed}");
    assert!(
        printed.contains("systemctl enable --now kdist"),
        "{printed}"
    );
    assert!(!unit_path.exists());

    let out = ok(kdist(
        &data,
        &root,
        &["install", "--init", "systemd", "--config", &config_arg],
    ));
    assert!(out.contains("systemd does not run under"), "{out}");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    assert!(
        printed.contains(&unit),
        "dry run and install agree:\n{printed}\n{unit}"
    );
    let exec = format!(
        "ExecStart={} --data-dir \"{}\" daemon --config {}",
        exe(),
        data.display(),
        config.display()
    );
    assert!(unit.lines().any(|l| l == exec), "{exec}\n{unit}");
    for line in ["Type=notify", "KillMode=mixed", "Delegate=yes"] {
        assert!(unit.lines().any(|l| l == line), "{line}:\n{unit}");
    }
    let stop: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .unwrap()
        .parse()
        .unwrap();
    // above the sum of the shipped services' stop grace periods (95 s)
    assert!(stop > 95, "{stop}");
    assert_eq!(
        std::fs::metadata(&unit_path).unwrap().permissions().mode() & 0o777,
        0o644
    );

    // systemd's own parser: unknown keys, bad values, a missing executable all show here
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_path)
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed: see scripts/test-all");
    assert!(verify.status.success(), "{}", text(&verify));
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        !complaints.contains("kdist.service"),
        "systemd-analyze verify complains:\n{complaints}"
    );

    let s = status(&data, &root, "systemd");
    assert_eq!(s["installed"], true, "{s}");
    assert_eq!(s["enabled"], false, "{s}");
    assert_eq!(s["init_running"], false, "{s}");
    assert_eq!(s["active"], serde_json::Value::Null, "{s}");
    assert_eq!(s["daemon_running"], false, "{s}");
    // what `systemctl enable` leaves (WantedBy=multi-user.target)
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(&unit_path, wants.join("kdist.service")).unwrap();
    assert_eq!(status(&data, &root, "systemd")["enabled"], true);

    let out = ok(kdist(&data, &root, &["uninstall", "--init", "systemd"]));
    assert!(out.contains("removed systemd unit"), "{out}");
    assert!(!unit_path.exists());
    let s = status(&data, &root, "systemd");
    assert_eq!(
        (s["installed"].clone(), s["enabled"].clone()),
        (false.into(), false.into()),
        "{s}"
    );
    let out = ok(kdist(&data, &root, &["uninstall", "--init", "systemd"]));
    assert!(out.contains("no kdist unit installed"), "{out}");
}

#[test]
fn openrc_script_is_chosen_where_openrc_runs_and_parses_in_sh() {
    let dir = temp_dir("kdist-svc-openrc");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("run/openrc")).unwrap();
    let data = dir.path().join("node data");
    std::fs::create_dir_all(&data).unwrap();

    // detected from /run/openrc under the root, no --init needed
    let out = ok(kdist(&data, &root, &["install"]));
    assert!(out.contains("wrote OpenRC unit"), "{out}");
    let script = root.join("etc/init.d/kdist");
    assert_eq!(
        std::fs::metadata(&script).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let check = Command::new("sh").arg("-n").arg(&script).output().unwrap();
    assert!(check.status.success(), "sh -n: {}", text(&check));

    // openrc-run sources the script and runs `$command` with `eval`ed `$command_args`:
    // do the same and compare the argv the daemon would get
    let argv = Command::new("sh")
        .arg("-c")
        .arg(r#". "$1"; eval "set -- $command_args"; printf '%s\n' "$command" "$@" "$supervisor" "$retry""#)
        .arg("sh")
        .arg(&script)
        .output()
        .unwrap();
    assert!(argv.status.success(), "{}", text(&argv));
    let lines: Vec<String> = String::from_utf8_lossy(&argv.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines[0], exe());
    assert_eq!(
        lines[1..4],
        [
            "--data-dir".to_string(),
            data.display().to_string(),
            "daemon".to_string()
        ]
    );
    assert_eq!(lines[4], "supervise-daemon");
    assert!(lines[5].starts_with("TERM/"), "{lines:?}");

    let s = status(&data, &root, "openrc");
    assert_eq!(s["installed"], true, "{s}");
    assert_eq!(s["init_running"], true, "{s}");
    ok(kdist(&data, &root, &["uninstall"]));
    assert!(!script.exists());
}

#[test]
fn paths_an_init_file_cannot_carry_are_refused() {
    let dir = temp_dir("kdist-svc-bad");
    let root = dir.path().join("root");
    let data = dir.path().join("100%");
    std::fs::create_dir_all(&data).unwrap();
    let out = kdist(&data, &root, &["install", "--init", "systemd"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--data-dir"), "{err}");
    assert!(!root.join("etc/systemd/system/kdist.service").exists());
}
