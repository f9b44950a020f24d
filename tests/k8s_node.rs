//! A whole node with real Kubernetes binaries (KDIST_TEST_K8S_BIN=<dir with
//! kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy and
//! optionally kubectl>): apiserver ready, API objects, a Deployment scheduled, the node
//! Ready, a pod from an image imported offline with readable logs, a ClusterIP answering
//! from the host through kube-proxy, recovery from kill -9 of every component, and a
//! clean stop. Every run has `egress: none`: no pod or service traffic leaves the host.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::outside::Outside;
use common::{TempData, free_port, oci, poll_until, text};

const BUSYBOX: &str = "kdist.local/test/busybox:1";
const PAUSE: &str = "kdist.local/test/pause:1";

fn k8s_bin() -> PathBuf {
    PathBuf::from(std::env::var_os("KDIST_TEST_K8S_BIN").expect(
        "set KDIST_TEST_K8S_BIN to a directory with kube-apiserver, kube-controller-manager, \
         kube-scheduler, kubelet and kube-proxy",
    ))
}

fn node_name() -> String {
    nix::unistd::gethostname()
        .unwrap()
        .into_string()
        .unwrap()
        .to_lowercase()
}

/// The offline images the node's pods run.
fn prepare(data: &TempData) {
    std::fs::create_dir_all(data.path("images")).unwrap();
    oci::build(&data.path("images/busybox.tar"), BUSYBOX, &["/bin/sh"]);
    oci::build(
        &data.path("images/pause.tar"),
        PAUSE,
        &["/bin/sleep", "infinity"],
    );
}

fn kubectl(data: &TempData, args: &[&str]) -> String {
    let out = data.kdist_env(&[&["kubectl"], args].concat(), &[]);
    assert!(out.status.success(), "kubectl {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits for a pod to be Ready; on timeout the panic says why: the pod's events and the
/// node's conditions and taints (a disk-pressure taint from the kubelet's default hard
/// eviction thresholds, nodefs.available<10% / imagefs.available<15% of the host file
/// system, keeps every pod Pending and lets the kubelet delete the imported images).
fn wait_ready(data: &TempData, pod: &str) {
    let target = format!("pod/{pod}");
    let out = data.kdist(&[
        "kubectl",
        "wait",
        "--for=condition=Ready",
        &target,
        "--timeout=120s",
    ]);
    if out.status.success() {
        return;
    }
    let describe = data.kdist(&["kubectl", "describe", &target]);
    let node = data.kdist(&[
        "kubectl",
        "get",
        "node",
        &node_name(),
        "-o",
        "jsonpath={range .status.conditions[*]}{.type}={.status} {end}taints={.spec.taints}",
    ]);
    panic!(
        "{target} not Ready: {}\n{}\nnode: {}",
        text(&out),
        text(&describe),
        text(&node)
    );
}

fn http_get(address: &str) -> Option<String> {
    let mut stream =
        TcpStream::connect_timeout(&address.parse().ok()?, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}

const WORKLOAD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: hello}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: hello
    image: kdist.local/test/busybox:1
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "echo hello-from-kdist; exec sleep 3600"]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: kdist.local/test/busybox:1
        imagePullPolicy: Never
        command: ["/bin/sh", "-c", "mkdir -p /www && echo kdist-web-ok > /www/index.html && exec httpd -f -p 8080 -h /www"]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"#;

const PROBER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: prober}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: prober
    image: kdist.local/test/busybox:1
    imagePullPolicy: Never
    # busybox-static's wget crashes (glibc static resolver); nc opens TCP as well
    command: ["/bin/sh", "-c", "while true; do nc -w 1 10.153.7.99 80 </dev/null; sleep 0.5; done"]
"#;

fn suite(datastore: &str) {
    let bin = k8s_bin();
    let data = TempData::new(&format!("k8s-{datastore}"));
    prepare(&data);
    let mut config = format!(
        "datastore: {datastore}\nnetwork:\n  egress: none\nruntime:\n  sandbox_image: {PAUSE}\naddons:\n  dns:\n    enabled: false\n"
    );
    if datastore == "etcd" {
        config.push_str(&format!(
            "etcd:\n  client_port: {}\n  peer_port: {}\n",
            free_port(),
            free_port()
        ));
    }
    let config = data.config(&config);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // kube-proxy turns route_localnet on; reset puts back what it was (the kernel's
    // default here, whatever an earlier run left)
    let route_localnet = "/proc/sys/net/ipv4/conf/all/route_localnet";
    std::fs::write(route_localnet, "0").unwrap();
    let localnet_before = std::fs::read_to_string(route_localnet).unwrap();
    let started = Instant::now();
    let out = data.kdist_env(
        &[
            "start",
            "--config",
            config.to_str().unwrap(),
            "--timeout",
            "180",
        ],
        &[("PATH", &path)],
    );
    assert!(out.status.success(), "{}", text(&out));
    let ready_after = started.elapsed();

    // 1 + 4: apiserver ready, node Ready
    let node = node_name();
    assert!(
        poll_until(Duration::from_secs(60), || {
            let out = data.kdist(&[
                "kubectl",
                "get",
                "node",
                &node,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            String::from_utf8_lossy(&out.stdout) == "True"
        }),
        "node not Ready: {}",
        kubectl(&data, &["describe", "node", &node])
    );
    eprintln!(
        "kdist start -> all services ready: {ready_after:?}; -> node Ready: {:?}",
        started.elapsed()
    );

    // 2: API objects, and a watch that delivers an object created after it started.
    // `--watch-only` prints no initial listing, so whatever it prints came as a watch
    // event. Until the watch is established a creation may precede it and go unseen,
    // so configmaps are created one after another until one arrives through it.
    kubectl(&data, &["create", "namespace", "kdt"]);
    let mut watch = Command::new(common::KDIST)
        .arg("--data-dir")
        .arg(&data.root)
        .args([
            "kubectl",
            "-n",
            "kdt",
            "get",
            "configmaps",
            "--watch-only",
            "-o",
            "name",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let watch_out = std::io::BufReader::new(watch.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(watch_out).map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let mut delivered = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    for n in 1.. {
        if Instant::now() > deadline {
            break;
        }
        let name = format!("cm{n}");
        kubectl(
            &data,
            &[
                "-n",
                "kdt",
                "create",
                "configmap",
                &name,
                "--from-literal=a=b",
            ],
        );
        let want = format!("configmap/{name}");
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            match lines.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    let hit = line.trim() == want;
                    seen.push(line);
                    if hit {
                        delivered = Some(n);
                        break;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("`kubectl get --watch-only` ended; it printed {seen:?}")
                }
            }
        }
        if delivered.is_some() {
            break;
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let delivered = delivered.unwrap_or_else(|| {
        panic!("the watch delivered none of the new configmaps; it printed {seen:?}")
    });
    eprintln!("watch delivered configmap/cm{delivered} (created after the watch started)");
    kubectl(
        &data,
        &[
            "-n",
            "kdt",
            "create",
            "secret",
            "generic",
            "s1",
            "--from-literal=k=v",
        ],
    );
    assert_eq!(
        kubectl(
            &data,
            &[
                "-n",
                "kdt",
                "get",
                "configmap",
                "cm1",
                "-o",
                "jsonpath={.data.a}"
            ]
        ),
        "b"
    );
    assert!(kubectl(&data, &["-n", "kdt", "get", "secret", "s1", "-o", "name"]).contains("s1"));
    kubectl(&data, &["delete", "namespace", "kdt", "--wait=false"]);

    // 3 + 5 + 6: workload from the imported image, logs, ClusterIP from the host
    let manifest = data.path("workload.yaml");
    std::fs::write(&manifest, WORKLOAD).unwrap();
    kubectl(&data, &["apply", "-f", manifest.to_str().unwrap()]);
    wait_ready(&data, "hello");
    kubectl(
        &data,
        &["rollout", "status", "deployment/web", "--timeout=120s"],
    );
    assert!(kubectl(&data, &["logs", "hello"]).contains("hello-from-kdist"));
    let ip = kubectl(
        &data,
        &["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"],
    );
    let service = format!("{ip}:80");
    assert!(
        poll_until(Duration::from_secs(30), || http_get(&service)
            .is_some_and(|b| b.contains("kdist-web-ok"))),
        "ClusterIP {service} does not answer"
    );

    // egress: none really holds pod traffic: a pod keeps trying to reach an "outside"
    // address (a veth into a private namespace, so nothing leaves the host even if the
    // guard fails); nothing arrives, until the guard's jump is lifted for a moment
    let outside = Outside::new("po", "10.153.7.1/24", "10.153.7.99");
    let prober = data.path("prober.yaml");
    std::fs::write(&prober, PROBER).unwrap();
    kubectl(&data, &["apply", "-f", prober.to_str().unwrap()]);
    wait_ready(&data, "prober");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        outside.arrived(),
        0,
        "a pod's packet got past the egress guard"
    );
    let guard = |op: &str| {
        let out = Command::new("iptables")
            .args(["-w", "5", "-t", "mangle", op, "POSTROUTING"])
            .args(if op == "-I" { &["1"][..] } else { &[][..] })
            .arg("-j")
            .arg(common::egress_chain(&data.root))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    };
    guard("-D");
    let reached = poll_until(Duration::from_secs(15), || outside.arrived() > 0);
    guard("-I");
    assert!(
        reached,
        "control failed: the pod cannot reach the stand-in even unguarded"
    );
    kubectl(&data, &["delete", "pod", "prober", "--wait=false"]);
    drop(outside);

    // 7: kill -9 of each component; the node recovers
    for service in [
        "containerd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kube-proxy",
    ] {
        let status = data.status();
        let pid = TempData::service(&status, service)["pid"].as_i64().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        assert!(
            poll_until(Duration::from_secs(90), || {
                let status = data.status();
                let s = TempData::service(&status, service);
                s["ready"] == true && s["pid"].as_i64() != Some(pid)
            }),
            "{service} did not recover: {:#}",
            data.status()
        );
    }
    let out = data.kdist(&["status", "--wait-ready", "--timeout", "120"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        poll_until(Duration::from_secs(60), || http_get(&service)
            .is_some_and(|b| b.contains("kdist-web-ok"))),
        "ClusterIP {service} does not answer after the kills"
    );
    assert!(kubectl(&data, &["logs", "hello"]).contains("hello-from-kdist"));

    let stop = Instant::now();
    let out = data.kdist(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    eprintln!("kdist stop: {:?}", stop.elapsed());
    // the pods went with the node (the web pods' httpd was running until now)
    let leftover = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| String::from_utf8_lossy(&c).contains("httpd\0-f\0-p\08080"));
    assert!(!leftover, "pod processes outlived kdist stop");
    let out = data.kdist(&["reset"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(route_localnet).unwrap(),
        localnet_before,
        "reset did not restore route_localnet"
    );
}

#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn node_on_embedded_datastore() {
    let _host = common::exclusive_host();
    suite("embedded");
}

#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN (and the PKI's etcd TLS)"]
fn node_on_etcd() {
    let _host = common::exclusive_host();
    suite("etcd");
}

const MIGRATE_WORKLOAD: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: mig}
spec:
  replicas: 2
  selector: {matchLabels: {app: mig}}
  template:
    metadata: {labels: {app: mig}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: mig
        image: kdist.local/test/busybox:1
        imagePullPolicy: Never
        command: ["/bin/sh", "-c", "exec sleep 3600"]
"#;

/// Pod name -> (uid, phase, restart count) of the `mig` Deployment's pods.
fn mig_pods(data: &TempData) -> Vec<(String, String, String, String)> {
    kubectl(
        data,
        &[
            "get",
            "pods",
            "-l",
            "app=mig",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.metadata.uid} {.status.phase} {.status.containerStatuses[0].restartCount}{\"\\n\"}{end}",
        ],
    )
    .lines()
    .filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() == 4).then(|| (f[0].into(), f[1].into(), f[2].into(), f[3].into()))
    })
    .collect()
}

/// A node on the embedded datastore with a configmap and a running Deployment moves to
/// etcd with `kdist datastore migrate --to etcd`: the apiserver is ready again on etcd,
/// the configmap is there with the same resourceVersion, the pods kept running, and
/// the cluster takes new objects and schedules new pods.
#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn node_migrates_from_embedded_to_etcd() {
    let _host = common::exclusive_host();
    let bin = k8s_bin();
    let data = TempData::new("k8s-mig");
    prepare(&data);
    let config = data.config(&format!(
        "datastore: embedded\nnetwork:\n  egress: none\nruntime:\n  sandbox_image: {PAUSE}\naddons:\n  dns:\n    enabled: false\n\
         etcd:\n  client_port: {}\n  peer_port: {}\n",
        free_port(),
        free_port()
    ));
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = data.kdist_env(
        &[
            "start",
            "--config",
            config.to_str().unwrap(),
            "--timeout",
            "180",
        ],
        &[("PATH", &path)],
    );
    assert!(out.status.success(), "{}", text(&out));
    kubectl(
        &data,
        &[
            "create",
            "configmap",
            "before",
            "--from-literal=where=embedded",
        ],
    );
    let manifest = data.path("mig.yaml");
    std::fs::write(&manifest, MIGRATE_WORKLOAD).unwrap();
    kubectl(&data, &["apply", "-f", manifest.to_str().unwrap()]);
    kubectl(
        &data,
        &["rollout", "status", "deployment/mig", "--timeout=120s"],
    );
    let rv = kubectl(
        &data,
        &[
            "get",
            "configmap",
            "before",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ],
    );
    let pods = mig_pods(&data);
    assert_eq!(pods.len(), 2, "{pods:?}");
    assert!(pods.iter().all(|p| p.2 == "Running"), "{pods:?}");

    let started = Instant::now();
    let out = data.kdist(&["datastore", "migrate", "--to", "etcd"]);
    assert!(
        out.status.success(),
        "{}\n--- kdist.log\n{}",
        text(&out),
        std::fs::read_to_string(data.path("logs/kdist.log")).unwrap_or_default()
    );
    eprintln!("migrate --to etcd: {:?}\n{}", started.elapsed(), text(&out));
    let status = data.status();
    for service in [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ] {
        assert_eq!(
            TempData::service(&status, service)["ready"],
            true,
            "{service}: {status:#}"
        );
    }
    assert!(
        status["services"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["name"] != "datastore"),
        "{status:#}"
    );
    let args = std::fs::read_to_string(data.path("config.yaml")).unwrap();
    assert!(args.contains("datastore: etcd"), "{args}");

    // the data came along, resourceVersion included
    assert_eq!(
        kubectl(
            &data,
            &["get", "configmap", "before", "-o", "jsonpath={.data.where}"]
        ),
        "embedded"
    );
    assert_eq!(
        kubectl(
            &data,
            &[
                "get",
                "configmap",
                "before",
                "-o",
                "jsonpath={.metadata.resourceVersion}"
            ]
        ),
        rv
    );
    // the pods kept running through it: same pods, no restarts
    let after = mig_pods(&data);
    assert_eq!(after, pods, "pods changed across the migration");
    // the cluster works on etcd: new objects, new pods scheduled and started
    kubectl(
        &data,
        &["create", "configmap", "after", "--from-literal=where=etcd"],
    );
    kubectl(&data, &["scale", "deployment/mig", "--replicas=3"]);
    kubectl(
        &data,
        &["rollout", "status", "deployment/mig", "--timeout=120s"],
    );
    assert_eq!(mig_pods(&data).len(), 3);
    let out = data.kdist(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = data.kdist(&["reset"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// `kdist bench node` with the real binaries: both timings, every service of the tree
/// measured, program pages paged out after ready (here after 5 s) and the node stopped.
#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn bench_node_with_real_binaries() {
    let _host = common::exclusive_host();
    let bin = k8s_bin();
    let data = TempData::new("k8s-bench");
    prepare(&data);
    let config = data.config(&format!(
        "network:\n  egress: none\nruntime:\n  sandbox_image: {PAUSE}\naddons:\n  dns:\n    enabled: false\nmemory:\n  page_out_after: 5s\n"
    ));
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = data.kdist_env(
        &[
            "bench",
            "node",
            "--config",
            config.to_str().unwrap(),
            "--seconds",
            "20",
            "--timeout",
            "180",
            "-o",
            "json",
        ],
        &[("PATH", &path)],
    );
    assert!(out.status.success(), "{}", text(&out));
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run = &runs[0];
    eprintln!("{run:#}");
    let apiserver = run["apiserver_ready_secs"]
        .as_f64()
        .expect("apiserver ready");
    let node = run["node_ready_secs"].as_f64().expect("node Ready");
    assert!(apiserver > 0.0 && node >= apiserver, "{run}");
    let group = |name: &str| -> serde_json::Value {
        run["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == name)
            .unwrap_or_else(|| panic!("{name} not measured: {run}"))
            .clone()
    };
    for name in [
        "kdist",
        "containerd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kube-proxy",
    ] {
        assert!(
            group(name)["rss_mib"].as_f64().unwrap() > 5.0,
            "{name}: {run}"
        );
    }
    // kube-proxy maps about 40 MiB of its program at start; paged out, it keeps far less
    let proxy = group("kube-proxy");
    let file = proxy["rss_mib"].as_f64().unwrap() - proxy["anon_mib"].as_f64().unwrap();
    assert!(
        file < 25.0,
        "kube-proxy program pages not paged out: {proxy}"
    );
    let log = std::fs::read_to_string(data.path("logs/kdist.log")).unwrap();
    assert!(log.contains("paged out"), "{log}");
    assert!(
        !data.kdist(&["status"]).status.success(),
        "the bench stopped the node"
    );
}
