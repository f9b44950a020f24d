//! Node-local volumes with real Kubernetes binaries (KDIST_TEST_K8S_BIN): the
//! `kdist-local` classes, a StatefulSet's claim provisioned on the node, data that
//! outlives its pod, Delete and Retain, claims the provisioner refuses with an Event, and
//! a daemon killed at each step of provisioning.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{TempData, oci, poll_until, text};

const BUSYBOX: &str = "kdist.local/test/busybox:1";
const PAUSE: &str = "kdist.local/test/pause:1";

fn path_with_k8s() -> String {
    let bin = std::env::var("KDIST_TEST_K8S_BIN").expect("set KDIST_TEST_K8S_BIN");
    format!("{bin}:{}", std::env::var("PATH").unwrap_or_default())
}

/// A started node with `egress: none` and the test images; `env` goes to its daemon.
fn start_node(tag: &str, env: &[(&str, &str)]) -> TempData {
    let data = TempData::new(tag);
    std::fs::create_dir_all(data.path("images")).unwrap();
    oci::build(&data.path("images/busybox.tar"), BUSYBOX, &["/bin/sh"]);
    oci::build(
        &data.path("images/pause.tar"),
        PAUSE,
        &["/bin/sleep", "infinity"],
    );
    let config = data.config(&format!(
        "network:\n  egress: none\nruntime:\n  sandbox_image: {PAUSE}\n\
         addons:\n  dns:\n    enabled: false\n"
    ));
    start(&data, Some(&config), env);
    // pods need the namespace's default ServiceAccount
    wait(
        "default ServiceAccount",
        120,
        || try_kubectl(&data, &["get", "serviceaccount", "default"]).is_some(),
        String::new,
    );
    data
}

fn start(data: &TempData, config: Option<&Path>, env: &[(&str, &str)]) {
    let path = path_with_k8s();
    let mut args = vec!["start", "--timeout", "180"];
    if let Some(config) = config {
        args.extend(["--config", config.to_str().unwrap()]);
    }
    let mut env = env.to_vec();
    env.push(("PATH", &path));
    let out = data.kdist_env(&args, &env);
    assert!(out.status.success(), "start: {}", text(&out));
}

fn kubectl(data: &TempData, args: &[&str]) -> String {
    let out = data.kdist(&[&["kubectl"], args].concat());
    assert!(out.status.success(), "kubectl {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn try_kubectl(data: &TempData, args: &[&str]) -> Option<String> {
    let out = data.kdist(&[&["kubectl"], args].concat());
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn apply(data: &TempData, yaml: &str) {
    let file = data.path(&format!("apply-{}.yaml", yaml.len()));
    std::fs::write(&file, yaml).unwrap();
    kubectl(data, &["apply", "-f", file.to_str().unwrap()]);
}

fn jsonpath(data: &TempData, what: &[&str], path: &str) -> String {
    let arg = format!("jsonpath={path}");
    try_kubectl(data, &[what, &["-o", &arg]].concat()).unwrap_or_default()
}

/// Waits until `check` holds; the panic shows `context()` when it does not.
fn wait(what: &str, secs: u64, mut check: impl FnMut() -> bool, context: impl Fn() -> String) {
    assert!(
        poll_until(Duration::from_secs(secs), &mut check),
        "{what}: {}",
        context()
    );
}

fn volume_dirs(data: &TempData) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(data.path("storage"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs
}

fn pvs(data: &TempData) -> Vec<String> {
    jsonpath(data, &["get", "pv"], "{.items[*].metadata.name}")
        .split_whitespace()
        .map(String::from)
        .collect()
}

fn events_of(data: &TempData, claim: &str) -> String {
    let selector = format!("involvedObject.name={claim}");
    kubectl(
        data,
        &[
            "get",
            "events",
            "--field-selector",
            &selector,
            "-o",
            "custom-columns=REASON:.reason,MESSAGE:.message",
        ],
    )
}

fn pod_running(data: &TempData, pod: &str) -> bool {
    jsonpath(data, &["get", "pod", pod], "{.status.phase}") == "Running"
}

const STATEFULSET: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  replicas: 1
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      terminationGracePeriodSeconds: 1
      securityContext: {runAsUser: 1000, fsGroup: 2000}
      containers:
      - name: db
        image: kdist.local/test/busybox:1
        command: ["/bin/sh", "-c", "date >> /data/starts && exec sleep 3600"]
        volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {requests: {storage: 64Mi}}
"#;

#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn claims_get_node_local_volumes_that_follow_their_reclaim_policy() {
    let _host = common::exclusive_host();
    let data = start_node("storage", &[]);
    let classes = kubectl(&data, &["get", "storageclass"]);
    assert!(
        classes.contains("kdist-local (default)") && classes.contains("kdist-local-retain"),
        "{classes}"
    );

    // the benchmark's reference: the same pod on an emptyDir
    let applied = Instant::now();
    apply(
        &data,
        r#"
apiVersion: v1
kind: Pod
metadata: {name: scratch}
spec:
  terminationGracePeriodSeconds: 1
  securityContext: {runAsUser: 1000, fsGroup: 2000}
  containers:
  - name: db
    image: kdist.local/test/busybox:1
    command: ["/bin/sh", "-c", "date >> /data/starts && exec sleep 3600"]
    volumeMounts: [{name: data, mountPath: /data}]
  volumes: [{name: data, emptyDir: {}}]
"#,
    );
    wait(
        "scratch running",
        180,
        || pod_running(&data, "scratch"),
        || kubectl(&data, &["describe", "pod", "scratch"]),
    );
    let empty_dir = applied.elapsed();
    kubectl(&data, &["delete", "pod", "scratch", "--wait=false"]);

    // a StatefulSet's claim, without a class: the default one, provisioned on this node
    let applied = Instant::now();
    apply(&data, STATEFULSET);
    wait(
        "db-0 running",
        180,
        || pod_running(&data, "db-0"),
        || {
            kubectl(&data, &["describe", "pod", "db-0"])
                + &kubectl(&data, &["describe", "pvc", "data-db-0"])
        },
    );
    let with_claim = applied.elapsed();
    eprintln!(
        "bench: pod Running after apply: emptyDir {empty_dir:?}, new kdist-local claim \
         {with_claim:?}, ratio {:.2}",
        with_claim.as_secs_f64() / empty_dir.as_secs_f64()
    );
    let pv = jsonpath(&data, &["get", "pvc", "data-db-0"], "{.spec.volumeName}");
    let path = jsonpath(&data, &["get", "pv", &pv], "{.spec.local.path}");
    let dir = data.path("storage").canonicalize().unwrap();
    assert_eq!(
        PathBuf::from(&path),
        dir.join(format!("default_data-db-0_{pv}")),
        "volume directory"
    );
    let events = events_of(&data, "data-db-0");
    assert!(
        events.contains("Provisioning") && events.contains("ProvisioningSucceeded"),
        "{events}"
    );
    // a non-root pod with an fsGroup wrote into it
    assert_eq!(
        std::fs::read_to_string(Path::new(&path).join("starts"))
            .unwrap()
            .lines()
            .count(),
        1
    );
    let storage = || {
        data.status()["controllers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "storage")
            .unwrap()
            .clone()
    };
    wait(
        "storage status counts the volume",
        30,
        || {
            let s = storage();
            s["ready"] == true && s["message"].as_str().unwrap().contains(" 1 volume")
        },
        || storage().to_string(),
    );

    // data outlives the pod
    kubectl(&data, &["delete", "pod", "db-0", "--wait=true"]);
    wait(
        "db-0 back",
        120,
        || {
            std::fs::read_to_string(Path::new(&path).join("starts"))
                .is_ok_and(|s| s.lines().count() == 2)
        },
        || kubectl(&data, &["describe", "pod", "db-0"]),
    );

    // Delete: the claim goes, then the directory and the PV
    kubectl(&data, &["delete", "statefulset", "db", "--wait=true"]);
    kubectl(&data, &["delete", "pvc", "data-db-0", "--wait=true"]);
    wait(
        "PV and directory removed",
        120,
        || !pvs(&data).contains(&pv) && !Path::new(&path).exists(),
        || format!("pvs {:?}, dirs {:?}", pvs(&data), volume_dirs(&data)),
    );

    // Retain: PV and data stay after the claim goes
    apply(
        &data,
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: keep}
spec:
  storageClassName: kdist-local-retain
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 16Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: keeper}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: kdist.local/test/busybox:1
    command: ["/bin/sh", "-c", "echo kept > /data/file && exec sleep 3600"]
    volumeMounts: [{name: v, mountPath: /data}]
  volumes: [{name: v, persistentVolumeClaim: {claimName: keep}}]
"#,
    );
    wait(
        "keeper running",
        120,
        || pod_running(&data, "keeper"),
        || kubectl(&data, &["describe", "pvc", "keep"]),
    );
    let kept = jsonpath(&data, &["get", "pvc", "keep"], "{.spec.volumeName}");
    let kept_path = jsonpath(&data, &["get", "pv", &kept], "{.spec.local.path}");
    kubectl(&data, &["delete", "pod", "keeper", "--wait=true"]);
    kubectl(&data, &["delete", "pvc", "keep", "--wait=true"]);
    wait(
        "retained PV released",
        60,
        || jsonpath(&data, &["get", "pv", &kept], "{.status.phase}") == "Released",
        || kubectl(&data, &["get", "pv", "-o", "wide"]),
    );
    assert_eq!(
        std::fs::read_to_string(Path::new(&kept_path).join("file")).unwrap(),
        "kept\n"
    );
    // deleting the retained PV keeps its data too
    kubectl(&data, &["delete", "pv", &kept, "--wait=true"]);
    assert!(Path::new(&kept_path).join("file").exists());

    // claims it cannot serve get an Event saying why
    apply(
        &data,
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: shared}
spec:
  accessModes: [ReadWriteMany]
  resources: {requests: {storage: 16Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: sharer}
spec:
  containers:
  - name: c
    image: kdist.local/test/busybox:1
    command: ["/bin/sleep", "3600"]
    volumeMounts: [{name: v, mountPath: /data}]
  volumes: [{name: v, persistentVolumeClaim: {claimName: shared}}]
"#,
    );
    wait(
        "ReadWriteMany refused with an event",
        90,
        || events_of(&data, "shared").contains("ReadWriteMany is not supported"),
        || events_of(&data, "shared"),
    );
    assert_eq!(
        jsonpath(&data, &["get", "pvc", "shared"], "{.status.phase}"),
        "Pending"
    );
    kubectl(&data, &["delete", "pod", "sharer", "--wait=false"]);

    // reset keeps volume data unless --volumes
    let out = data.kdist(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = data.kdist(&["reset"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("kept 1 node-local volume"),
        "{}",
        text(&out)
    );
    assert!(Path::new(&kept_path).join("file").exists());
    let out = data.kdist(&["reset", "--volumes"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!Path::new(&kept_path).exists());
}

const CLAIM_AND_POD: &str = r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: crash}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 16Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: crash}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: kdist.local/test/busybox:1
    command: ["/bin/sleep", "3600"]
    volumeMounts: [{name: v, mountPath: /data}]
  volumes: [{name: v, persistentVolumeClaim: {claimName: crash}}]
"#;

fn kill_daemon(data: &TempData) {
    let pid: i32 = std::fs::read_to_string(data.path("run/kdist.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait(
        "daemon gone",
        30,
        || !Path::new(&format!("/proc/{pid}")).exists(),
        String::new,
    );
}

#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn a_daemon_killed_while_provisioning_leaves_one_volume_per_claim() {
    let _host = common::exclusive_host();
    for point in ["storage-after-dir", "storage-after-pv"] {
        let marker = format!("/tmp/kdt-storage-pause-{}-{point}", std::process::id());
        let _ = std::fs::remove_file(&marker);
        let pause = format!("{point}:{marker}");
        let data = start_node(
            &format!("crash-{point}"),
            &[("KDIST_TEST_PAUSE_AT", &pause)],
        );
        apply(&data, CLAIM_AND_POD);
        wait(
            &format!("provisioner stopped at {point}"),
            120,
            || Path::new(&marker).exists(),
            || kubectl(&data, &["describe", "pvc", "crash"]),
        );
        kill_daemon(&data);
        let _ = std::fs::remove_file(&marker);
        start(&data, None, &[]);
        wait(
            "pod running after the restart",
            180,
            || pod_running(&data, "crash"),
            || kubectl(&data, &["describe", "pvc", "crash"]),
        );
        let claim_pv = jsonpath(&data, &["get", "pvc", "crash"], "{.spec.volumeName}");
        assert_eq!(
            pvs(&data),
            vec![claim_pv.clone()],
            "exactly one PV ({point})"
        );
        let dirs = volume_dirs(&data);
        assert_eq!(dirs.len(), 1, "exactly one directory ({point}): {dirs:?}");
        assert!(
            dirs[0].to_string_lossy().ends_with(&claim_pv),
            "{dirs:?} {claim_pv}"
        );
    }
}

#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn an_orphan_directory_of_a_claim_that_went_away_is_removed_at_start() {
    let _host = common::exclusive_host();
    let marker = format!("/tmp/kdt-storage-orphan-{}", std::process::id());
    let _ = std::fs::remove_file(&marker);
    let pause = format!("storage-after-dir:{marker}");
    let data = start_node("orphan", &[("KDIST_TEST_PAUSE_AT", &pause)]);
    apply(&data, CLAIM_AND_POD);
    wait(
        "provisioner stopped after the directory",
        120,
        || Path::new(&marker).exists(),
        || kubectl(&data, &["describe", "pvc", "crash"]),
    );
    // the claim goes while its provisioning is stuck after the directory: an orphan
    kubectl(&data, &["delete", "pod", "crash", "--wait=true"]);
    kubectl(&data, &["delete", "pvc", "crash", "--wait=true"]);
    kill_daemon(&data);
    let _ = std::fs::remove_file(&marker);
    assert_eq!(volume_dirs(&data).len(), 1);
    start(&data, None, &[]);
    wait(
        "orphan directory removed",
        60,
        || volume_dirs(&data).is_empty(),
        || format!("{:?}", volume_dirs(&data)),
    );
    assert!(pvs(&data).is_empty());
}
