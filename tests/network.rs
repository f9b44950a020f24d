//! The built-in pod network across nodes, with real Kubernetes binaries: two nodes in
//! network namespaces of the test's own, on one L2 segment (host-gw) or on two subnets
//! joined by a router namespace (vxlan). Nothing leaves the namespaces: the nodes'
//! only routes lead to each other (and the router has no default route).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::NsNode;
use common::{Node, describe};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", describe(&out));
}

/// Namespaces, veths and bridges the test made; all removed on drop.
struct Lab {
    namespaces: Vec<String>,
    links: Vec<String>,
}

impl Lab {
    fn tag() -> u32 {
        std::process::id() % 100_000
    }

    fn ns(&mut self, name: &str) -> String {
        let ns = format!("kdn{}-{name}", Self::tag());
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        self.namespaces.push(ns.clone());
        ns
    }

    /// Two node namespaces on one L2 segment, a veth between them: 10.205.0.1 and
    /// 10.205.0.2 (/24). No bridge of the host's: the host's iptables (br_netfilter, other
    /// nodes' egress guards) never see the traffic.
    fn one_segment() -> (Lab, Vec<String>, Vec<String>) {
        let mut lab = Lab {
            namespaces: Vec::new(),
            links: Vec::new(),
        };
        let tag = Self::tag();
        let namespaces = vec![lab.ns("1"), lab.ns("2")];
        let ends = [format!("kds{tag}1"), format!("kds{tag}2")];
        ip(&[
            "link",
            "add",
            &ends[0],
            "netns",
            &namespaces[0],
            "type",
            "veth",
            "peer",
            "name",
            &ends[1],
            "netns",
            &namespaces[1],
        ]);
        for i in 0..2 {
            let addr = format!("10.205.0.{}/24", i + 1);
            ip(&["-n", &namespaces[i], "addr", "add", &addr, "dev", &ends[i]]);
            ip(&["-n", &namespaces[i], "link", "set", &ends[i], "up"]);
        }
        let ips = vec!["10.205.0.1".into(), "10.205.0.2".into()];
        (lab, namespaces, ips)
    }

    /// Two node namespaces on two subnets (10.206.1.0/24, 10.206.2.0/24) joined by a
    /// router namespace; each node's default route leads to the router, which has none.
    fn two_subnets() -> (Lab, Vec<String>, Vec<String>) {
        let mut lab = Lab {
            namespaces: Vec::new(),
            links: Vec::new(),
        };
        let tag = Self::tag();
        let router = lab.ns("r");
        ip(&[
            "netns",
            "exec",
            &router,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        let mut namespaces = Vec::new();
        for i in 1..=2 {
            let ns = lab.ns(&i.to_string());
            // node side in the node's namespace, router side moved into the router's
            let (node_end, router_end) = (format!("kdv{tag}{i}"), format!("kdr{tag}{i}"));
            ip(&[
                "link",
                "add",
                &node_end,
                "type",
                "veth",
                "peer",
                "name",
                &router_end,
            ]);
            ip(&["link", "set", &node_end, "netns", &ns]);
            ip(&["link", "set", &router_end, "netns", &router]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.206.{i}.1/24"),
                "dev",
                &node_end,
            ]);
            ip(&["-n", &ns, "link", "set", &node_end, "up"]);
            ip(&[
                "-n",
                &router,
                "addr",
                "add",
                &format!("10.206.{i}.254/24"),
                "dev",
                &router_end,
            ]);
            ip(&["-n", &router, "link", "set", &router_end, "up"]);
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.206.{i}.254"),
            ]);
            namespaces.push(ns);
        }
        let ips = vec!["10.206.1.1".into(), "10.206.2.1".into()];
        (lab, namespaces, ips)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        for link in &self.links {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
    }
}

/// A busybox httpd pod pinned to `node`, answering its node's name, with `big` (50 MB, in memory: the host's disk stays out of it)
/// for the throughput figure.
fn server_pod(name: &str, node: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {name}}}}}
spec:
  nodeSelector: {{kubernetes.io/hostname: {node}}}
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: kdist.local/test/busybox:1
    imagePullPolicy: Never
    volumeMounts: [{{name: www, mountPath: /www}}]
    command: ["/bin/sh", "-c", "mkdir -p /www && echo {node} > /www/index.html && dd if=/dev/zero of=/www/big bs=1048576 count=50 2>/dev/null && exec httpd -f -p 8080 -h /www"]
  volumes: [{{name: www, emptyDir: {{medium: Memory}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  selector: {{app: {name}}}
  ports: [{{port: 8080, targetPort: 8080}}]
"#
    )
}

struct Cluster {
    // nodes first: they stop and reset before the lab goes
    cp: NsNode,
    worker: NsNode,
    _lab: Lab,
    ips: Vec<String>,
}

/// Starts a control plane (node 1) and a worker (node 2) in the lab's namespaces, with
/// the test images imported on both and a server pod on each.
fn cluster(lab: (Lab, Vec<String>, Vec<String>), extra: &str) -> Cluster {
    let bin = std::env::var("KDIST_TEST_K8S_BIN").unwrap();
    let path = format!("{bin}:{}", std::env::var("PATH").unwrap_or_default());
    let (lab, namespaces, ips) = lab;
    let make = |i: usize, name: &str| {
        let node = Node::new(&format!("net{name}"));
        node.write_config(&format!(
            "node_name: {name}\nnetwork:\n  egress: none\n  node_ip: {}\n{extra}runtime:\n  \
             sandbox_image: kdist.local/test/pause:1\n  cgroup_root: /kdist-net-{name}\n\
             addons:\n  dns:\n    enabled: false\n",
            ips[i]
        ));
        NsNode {
            ns: namespaces[i].clone(),
            path: path.clone(),
            node,
        }
    };
    let cp = make(0, "cp1");
    let worker = make(1, "w1");
    let started = Instant::now();
    cp.ok(&["start", "--timeout", "300"]);
    let v: serde_json::Value =
        serde_json::from_str(&cp.ok(&["add-node", "--worker", "-o", "json"])).unwrap();
    let connection = format!(
        "{}:25000/{}/{}",
        ips[0],
        v["token"].as_str().unwrap(),
        v["ca_sha256"].as_str().unwrap()
    );
    worker.ok(&["join", &connection, "--worker"]);
    worker.ok(&["start", "--timeout", "300"]);
    eprintln!("both nodes started: {:?}", started.elapsed());
    for n in [&cp, &worker] {
        for (file, name, cmd) in [
            (
                "pause.tar",
                "kdist.local/test/pause:1",
                &["/bin/sleep", "infinity"][..],
            ),
            (
                "busybox.tar",
                "kdist.local/test/busybox:1",
                &["/bin/sh"][..],
            ),
        ] {
            let archive = n.node.path(file);
            common::oci::build(&archive, name, cmd);
            n.ok(&["images", "import", archive.to_str().unwrap()]);
        }
    }
    let manifest = cp.node.path("pods.yaml");
    std::fs::write(
        &manifest,
        server_pod("web-cp1", "cp1") + "---" + &server_pod("web-w1", "w1"),
    )
    .unwrap();
    cp.ok(&["kubectl", "apply", "-f", manifest.to_str().unwrap()]);
    let c = Cluster {
        cp,
        worker,
        _lab: lab,
        ips,
    };
    for pod in ["web-cp1", "web-w1"] {
        c.wait_running(pod);
    }
    c
}

impl Cluster {
    fn wait_running(&self, pod: &str) {
        let out = self.cp.kdist(&[
            "kubectl",
            "wait",
            "--for=condition=Ready",
            &format!("pod/{pod}"),
            "--timeout=180s",
        ]);
        assert!(
            out.status.success(),
            "{}\n{}\n--- w1 network\n{}\n--- cp1 network\n{}",
            describe(&out),
            String::from_utf8_lossy(&self.cp.kdist(&["kubectl", "describe", "pod", pod]).stdout),
            network_status(&self.worker),
            network_status(&self.cp)
        );
    }

    fn field(&self, kind: &str, name: &str, jsonpath: &str) -> String {
        self.cp.ok(&[
            "kubectl",
            "get",
            kind,
            name,
            "-o",
            &format!("jsonpath={jsonpath}"),
        ])
    }

    /// An HTTP GET of `path` at `ip`:8080 from inside pod `from` (busybox `nc`: the
    /// static busybox's wget crashes): the body, or None.
    fn fetch(&self, from: &str, ip: &str, path: &str) -> Option<String> {
        let out = self.cp.kdist(&[
            "kubectl",
            "exec",
            from,
            "--",
            "sh",
            "-c",
            &http_get(ip, path, "-"),
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let body = text.split_once("\r\n\r\n")?.1.trim().to_string();
        (out.status.success() && text.lines().next()?.contains(" 200 ")).then_some(body)
    }

    fn reaches(&self, from: &str, ip: &str, want: &str) -> bool {
        common::wait_until(Duration::from_secs(60), Duration::from_secs(2), || {
            self.fetch(from, ip, "").as_deref() == Some(want)
        })
    }

    /// Pod to pod both ways, a pod to a Service whose only backend is on the other
    /// node, and pod IPs inside each node's own pod CIDR.
    fn check_traffic(&self) {
        let cidr_cp = self.field("node", "cp1", "{.spec.podCIDR}");
        let cidr_w = self.field("node", "w1", "{.spec.podCIDR}");
        assert!(!cidr_cp.is_empty() && !cidr_w.is_empty() && cidr_cp != cidr_w);
        let ip_cp = self.field("pod", "web-cp1", "{.status.podIP}");
        let ip_w = self.field("pod", "web-w1", "{.status.podIP}");
        assert_ne!(ip_cp, ip_w, "pod IPs are unique across nodes");
        let within = |ip: &str, cidr: &str| {
            let net: ipnet::Ipv4Net = cidr.parse().unwrap();
            net.contains(&ip.parse::<std::net::Ipv4Addr>().unwrap())
        };
        assert!(within(&ip_cp, &cidr_cp), "{ip_cp} not in {cidr_cp}");
        assert!(within(&ip_w, &cidr_w), "{ip_w} not in {cidr_w}");
        let diag = || {
            let dump = |n: &NsNode| {
                format!(
                    "{}\n{}\n{}\n{}",
                    inside(n, "ip", &["-4", "addr"]),
                    inside(n, "ip", &["route"]),
                    inside(n, "iptables-save", &["-c"]),
                    inside(
                        n,
                        "sysctl",
                        &["net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter"]
                    )
                )
            };
            let out = self.cp.kdist(&[
                "kubectl",
                "exec",
                "web-cp1",
                "--",
                "sh",
                "-c",
                &http_get(&ip_w, "", "-"),
            ]);
            format!(
                "last fetch: {}\npods: {}\ncp1 network {}\nw1 network {}\n--- cp1\n{}\n--- w1\n{}",
                describe(&out),
                self.cp.ok(&["kubectl", "get", "pods", "-o", "wide"]),
                network_status(&self.cp),
                network_status(&self.worker),
                dump(&self.cp),
                dump(&self.worker)
            )
        };
        assert!(
            self.reaches("web-cp1", &ip_w, "w1"),
            "cp1 pod -> w1 pod: {}",
            diag()
        );
        assert!(
            self.reaches("web-w1", &ip_cp, "cp1"),
            "w1 pod -> cp1 pod: {}",
            diag()
        );
        let svc = self.field("service", "web-w1", "{.spec.clusterIP}");
        assert!(
            self.reaches("web-cp1", &svc, "w1"),
            "cp1 pod -> Service with its backend on w1: {}",
            diag()
        );
        let svc = self.field("service", "web-cp1", "{.spec.clusterIP}");
        assert!(
            self.reaches("web-w1", &svc, "cp1"),
            "w1 pod -> Service with its backend on cp1: {}",
            diag()
        );
    }

    /// Seconds to fetch the 50 MB file from the other node's pod, timed inside the
    /// pod (/proc/uptime: kubectl exec's own cost stays out), best of three.
    fn transfer_secs(&self) -> f64 {
        let ip_w = self.field("pod", "web-w1", "{.status.podIP}");
        let script = format!(
            "a=$(cat /proc/uptime); {}; b=$(cat /proc/uptime); echo $a $b",
            http_get(&ip_w, "big", "/dev/null")
        );
        let mut best = f64::MAX;
        for _ in 0..3 {
            let out = self
                .cp
                .ok(&["kubectl", "exec", "web-cp1", "--", "sh", "-c", &script]);
            let t: Vec<f64> = out
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect();
            assert_eq!(t.len(), 4, "{out}");
            best = best.min(t[2] - t[0]);
        }
        best.max(0.01)
    }
}

/// A shell command that GETs `path` from `ip`:8080 with busybox `nc` into `out`.
fn http_get(ip: &str, path: &str, out: &str) -> String {
    let out = if out == "-" {
        String::new()
    } else {
        format!(" > {out}")
    };
    format!("printf 'GET /{path} HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 8080{out}")
}

/// The same 50 MB fetch between two plain namespaces on one bridge (the host's busybox
/// httpd and nc), for the ratio.
fn plain_transfer_secs() -> f64 {
    let tag = Lab::tag();
    let mut lab = Lab {
        namespaces: Vec::new(),
        links: Vec::new(),
    };
    // the bridge in a namespace of its own, away from the host's iptables
    let switch = lab.ns("p0");
    ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &switch, "link", "set", "br0", "up"]);
    let mut namespaces = Vec::new();
    for i in 1..=2 {
        let ns = lab.ns(&format!("p{i}"));
        let (inner, port) = (format!("kdq{tag}{i}"), format!("kdp{tag}{i}"));
        ip(&[
            "link", "add", &inner, "netns", &ns, "type", "veth", "peer", "name", &port, "netns",
            &switch,
        ]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.207.0.{i}/24"),
            "dev",
            &inner,
        ]);
        ip(&["-n", &ns, "link", "set", &inner, "up"]);
        ip(&["-n", &switch, "link", "set", &port, "master", "br0"]);
        ip(&["-n", &switch, "link", "set", &port, "up"]);
        namespaces.push(ns);
    }
    let www = tempfile::tempdir_in("/dev/shm").unwrap();
    std::fs::write(www.path().join("big"), vec![0u8; 50 << 20]).unwrap();
    std::fs::write(www.path().join("index.html"), "ok\n").unwrap();
    let mut server = common::Proc::spawn(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &namespaces[1],
                "busybox",
                "httpd",
                "-f",
                "-p",
                "8080",
                "-h",
            ])
            .arg(www.path()),
    );
    let get = |path: &str| {
        Command::new("ip")
            .args(["netns", "exec", &namespaces[0], "busybox", "sh", "-c"])
            .arg(http_get("10.207.0.2", path, "/dev/null").replace("| nc", "| busybox nc"))
            .output()
            .unwrap()
    };
    assert!(common::wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || { get("index.html").status.success() }
    ));
    let mut best = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        assert!(get("big").status.success());
        best = best.min(started.elapsed().as_secs_f64());
    }
    server.terminate();
    best
}

fn peer_route<'a>(network: &'a serde_json::Value, peer: &str) -> &'a str {
    network["peers"]
        .as_array()
        .and_then(|peers| peers.iter().find(|p| p["node"] == peer))
        .and_then(|p| p["route"].as_str())
        .unwrap_or("")
}

/// host-gw: two nodes on one segment; traffic both ways and through Services; a
/// daemon restart rebuilds the one route; remove-node takes the peer's route away.
#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn host_gw_pods_reach_pods_and_services_across_nodes() {
    let _host = common::exclusive_host();
    let c = cluster(Lab::one_segment(), "");
    let net = network_status(&c.cp);
    assert_eq!(net["backend"], "host-gw", "{net:#}");
    assert!(
        net["network_policy"]
            .as_str()
            .unwrap()
            .contains("not enforced")
    );
    c.check_traffic();
    let cidr_w = c.field("node", "w1", "{.spec.podCIDR}");
    let want = format!("{cidr_w} via {}", c.ips[1]);
    let routes = kdist_routes(&c.cp);
    assert!(
        routes.iter().filter(|r| r.starts_with(&want)).count() == 1,
        "{routes:?}"
    );
    assert_eq!(peer_route(&network_status(&c.worker), "cp1"), "routed");
    assert!(inside(&c.cp, "ip", &["link", "show", "kdist.vxlan"]).is_empty());

    let plain = plain_transfer_secs();
    let pods = c.transfer_secs();
    eprintln!(
        "BENCH host-gw: 50 MB pod->pod across nodes {pods:.3}s, plain namespaces {plain:.3}s, \
         throughput ratio {:.2}",
        plain / pods
    );

    // a stopped and started daemon: the same routes, once
    let before = kdist_routes(&c.cp);
    c.cp.ok(&["stop", "--timeout", "60"]);
    c.cp.ok(&["start", "--timeout", "300"]);
    assert!(
        common::wait_until(Duration::from_secs(120), Duration::from_secs(2), || {
            peer_route(&network_status(&c.cp), "w1") == "routed"
        }),
        "{}",
        network_status(&c.cp)
    );
    assert_eq!(kdist_routes(&c.cp), before);

    // a claim of a pod pinned to the worker gets its volume on the worker, provisioned by
    // the worker's own daemon (as its node, with kdist's RBAC for node provisioners)
    let claim = c.cp.node.path("claim.yaml");
    std::fs::write(
        &claim,
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: worker-data}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 8Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: claimer}
spec:
  nodeSelector: {kubernetes.io/hostname: w1}
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: kdist.local/test/busybox:1
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "echo on-w1 > /data/f && exec sleep 3600"]
    volumeMounts: [{name: v, mountPath: /data}]
  volumes: [{name: v, persistentVolumeClaim: {claimName: worker-data}}]
"#,
    )
    .unwrap();
    c.cp.ok(&["kubectl", "apply", "-f", claim.to_str().unwrap()]);
    c.wait_running("claimer");
    let pv = c.field("pvc", "worker-data", "{.spec.volumeName}");
    let volume = std::path::PathBuf::from(c.field("pv", &pv, "{.spec.local.path}"));
    let worker_storage = c.worker.node.path("storage").canonicalize().unwrap();
    assert_eq!(
        volume.parent(),
        Some(worker_storage.as_path()),
        "{volume:?}"
    );
    assert_eq!(
        std::fs::read_to_string(volume.join("f")).unwrap(),
        "on-w1\n"
    );
    assert!(
        !c.cp
            .node
            .path("storage")
            .join(volume.file_name().unwrap())
            .exists(),
        "not on the control plane"
    );

    // remove-node: the worker's route is gone on the control plane
    c.cp.ok(&["remove-node", "w1"]);
    assert!(
        common::wait_until(Duration::from_secs(60), Duration::from_secs(1), || {
            !kdist_routes(&c.cp).iter().any(|r| r.starts_with(&cidr_w))
        }),
        "{:?}",
        kdist_routes(&c.cp)
    );
}

/// vxlan: two nodes on two subnets behind a router; traffic both ways and through
/// Services; kill -9 of a daemon leaves traffic flowing and the next daemon adopts the
/// routes; remove-node takes the peer's route, neighbour and FDB entry away.
#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn vxlan_pods_reach_pods_and_services_across_subnets() {
    let _host = common::exclusive_host();
    let c = cluster(Lab::two_subnets(), "");
    let net = network_status(&c.cp);
    assert_eq!(net["backend"], "vxlan", "{net:#}");
    assert_eq!(net["mtu"], 1450, "{net:#}");
    c.check_traffic();
    let mac_w = c.field(
        "node",
        "w1",
        "{.metadata.annotations.network\\.kdist\\.io/vxlan-mac}",
    );
    assert_eq!(mac_w.len(), 17, "{mac_w}");
    let fdb = inside(&c.cp, "bridge", &["fdb", "show", "dev", "kdist.vxlan"]);
    assert!(
        fdb.lines()
            .any(|l| l.starts_with(&mac_w) && l.contains(&format!("dst {}", c.ips[1]))),
        "{fdb}"
    );
    let cidr_w = c.field("node", "w1", "{.spec.podCIDR}");
    let vtep_w = cidr_w.split('/').next().unwrap().to_string();
    let neigh = inside(&c.cp, "ip", &["neigh", "show", "dev", "kdist.vxlan"]);
    assert!(neigh.contains(&vtep_w) && neigh.contains(&mac_w), "{neigh}");
    let routes = kdist_routes(&c.cp);
    assert_eq!(
        routes
            .iter()
            .filter(|r| r.starts_with(&format!("{cidr_w} via {vtep_w} dev kdist.vxlan")))
            .count(),
        1,
        "{routes:?}"
    );

    let plain = plain_transfer_secs();
    let pods = c.transfer_secs();
    eprintln!(
        "BENCH vxlan: 50 MB pod->pod across nodes {pods:.3}s, plain namespaces {plain:.3}s, \
         throughput ratio {:.2}",
        plain / pods
    );

    // kill -9 of the worker's daemon: routes are kernel state, traffic flows on
    let status: serde_json::Value =
        serde_json::from_str(&c.worker.ok(&["status", "-o", "json"])).unwrap();
    let pid = status["daemon"]["pid"].as_i64().unwrap();
    let before = kdist_routes(&c.worker);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(common::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || { !common::alive(pid) }
    ));
    let ip_cp = c.field("pod", "web-cp1", "{.status.podIP}");
    let ip_w = c.field("pod", "web-w1", "{.status.podIP}");
    assert!(
        c.reaches("web-cp1", &ip_w, "w1"),
        "traffic stopped with the worker's daemon killed"
    );
    // the next daemon adopts the routes: the same ones, none twice
    c.worker.ok(&["start", "--timeout", "300"]);
    assert!(
        common::wait_until(Duration::from_secs(120), Duration::from_secs(2), || {
            peer_route(&network_status(&c.worker), "cp1") == "routed"
        }),
        "{}",
        network_status(&c.worker)
    );
    assert_eq!(kdist_routes(&c.worker), before);
    c.wait_running("web-w1");
    let ip_w = c.field("pod", "web-w1", "{.status.podIP}");
    assert!(c.reaches("web-cp1", &ip_w, "w1"));
    assert!(c.reaches("web-w1", &ip_cp, "cp1"));

    // remove-node: the worker's route, neighbour and FDB entry go on the control plane
    c.cp.ok(&["remove-node", "w1"]);
    assert!(
        common::wait_until(Duration::from_secs(60), Duration::from_secs(1), || {
            !kdist_routes(&c.cp).iter().any(|r| r.starts_with(&cidr_w))
        }),
        "{:?}",
        kdist_routes(&c.cp)
    );
    let fdb = inside(&c.cp, "bridge", &["fdb", "show", "dev", "kdist.vxlan"]);
    assert!(!fdb.contains(&mac_w), "{fdb}");
    let neigh = inside(&c.cp, "ip", &["neigh", "show", "dev", "kdist.vxlan"]);
    assert!(!neigh.contains(&vtep_w), "{neigh}");
}

/// `network.cni: none`: kdist writes no CNI config and keeps no routes, the node still
/// gets its pod CIDR for the user's CNI, `kdist start` returns saying what to install,
/// and status says who owns the network.
#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn cni_none_leaves_the_network_to_the_user() {
    let _host = common::exclusive_host();
    let bin = std::env::var("KDIST_TEST_K8S_BIN").unwrap();
    let path = format!("{bin}:{}", std::env::var("PATH").unwrap_or_default());
    let mut lab = Lab {
        namespaces: Vec::new(),
        links: Vec::new(),
    };
    let ns = lab.ns("n");
    let tag = Lab::tag();
    let (a, b) = (format!("kdz{tag}a"), format!("kdz{tag}b"));
    ip(&[
        "link", "add", &a, "netns", &ns, "type", "veth", "peer", "name", &b, "netns", &ns,
    ]);
    ip(&["-n", &ns, "addr", "add", "10.205.9.1/24", "dev", &a]);
    ip(&["-n", &ns, "link", "set", &a, "up"]);
    let node = Node::new("netnone");
    node.write_config(
        "node_name: solo\nnetwork:\n  cni: none\n  egress: none\n  node_ip: 10.205.9.1\n\
         runtime:\n  sandbox_image: kdist.local/test/pause:1\n  cgroup_root: /kdist-net-solo\n\
         addons:\n  dns:\n    enabled: false\n",
    );
    let n = NsNode { ns, path, node };
    let out = n.ok(&["start", "--timeout", "300"]);
    assert!(
        out.contains("install") && out.contains("10.1.0.0/16"),
        "{out}"
    );
    let net = network_status(&n);
    assert_eq!(net["cni"], "none", "{net:#}");
    assert!(
        common::wait_until(Duration::from_secs(60), Duration::from_secs(1), || {
            !n.ok(&[
                "kubectl",
                "get",
                "node",
                "solo",
                "-o",
                "jsonpath={.spec.podCIDR}",
            ])
            .is_empty()
        }),
        "no pod CIDR allocated"
    );
    assert!(
        std::fs::read_dir(n.node.path("cni/net.d"))
            .unwrap()
            .next()
            .is_none(),
        "a CNI config was written"
    );
    assert!(kdist_routes(&n).is_empty(), "{:?}", kdist_routes(&n));
    assert!(inside(&n, "ip", &["link", "show", "kdist.vxlan"]).is_empty());
    let ready = n.ok(&[
        "kubectl",
        "get",
        "node",
        "solo",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ]);
    assert_eq!(ready, "False", "NotReady until a CNI is installed");
    drop(n);
    drop(lab);
}

/// stdout of `program` run inside `n`'s namespace.
fn inside(n: &NsNode, program: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&n.inside(program, args).stdout).into_owned()
}

/// kdist's routes (proto 75) in `n`'s namespace, one per line.
fn kdist_routes(n: &NsNode) -> Vec<String> {
    inside(n, "ip", &["route", "show", "proto", "75"])
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The NETWORK section of `n`'s `kdist status -o json`.
fn network_status(n: &NsNode) -> serde_json::Value {
    let status: serde_json::Value = serde_json::from_str(&n.ok(&["status", "-o", "json"])).unwrap();
    status["network"].clone()
}
