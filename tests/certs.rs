//! kdist's PKI against real peers: openssl checks every certificate, a real etcd runs
//! with client and peer mTLS from kdist's certs and is renewed under a writing client.

// unwrap is fine in tests (clippy.toml allows it only inside #[test] fns)
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Node, describe, free_ports, wait_until};

#[derive(Clone, Copy, PartialEq)]
enum Usage {
    Server,
    Client,
    Both,
}

/// The contract with the node services: leaf, its CA, its usage.
const LEAVES: &[(&str, &str, Usage)] = &[
    ("apiserver", "ca", Usage::Server),
    ("apiserver-kubelet-client", "ca", Usage::Client),
    ("apiserver-etcd-client", "etcd/ca", Usage::Client),
    ("front-proxy-client", "front-proxy-ca", Usage::Client),
    ("etcd/server", "etcd/ca", Usage::Both),
    ("etcd/peer", "etcd/ca", Usage::Both),
    ("etcd/healthcheck-client", "etcd/ca", Usage::Client),
    ("kubelet", "ca", Usage::Server),
    ("kubelet-client", "ca", Usage::Client),
    ("controller-manager", "ca", Usage::Client),
    ("scheduler", "ca", Usage::Client),
    ("kube-proxy", "ca", Usage::Client),
    ("admin", "ca", Usage::Client),
];
const CAS: &[&str] = &["ca", "front-proxy-ca", "etcd/ca"];
const KUBECONFIGS: &[&str] = &[
    "admin.conf",
    "controller-manager.conf",
    "scheduler.conf",
    "kubelet.conf",
    "kube-proxy.conf",
];

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl")
}

fn x509_text(path: &Path) -> String {
    let output = openssl(&["x509", "-noout", "-text", "-in", path.to_str().unwrap()]);
    assert!(output.status.success(), "{}", describe(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn verifies(node: &Node, ca: &str, leaf: &Path) -> bool {
    let ca = node.certs(&format!("{ca}.crt"));
    let output = openssl(&[
        "verify",
        "-CAfile",
        ca.to_str().unwrap(),
        leaf.to_str().unwrap(),
    ]);
    output.status.success()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn check_json(node: &Node) -> (bool, Vec<serde_json::Value>) {
    let output = node.run(&["certs", "check", "-o", "json"]);
    let reports: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("check json: {e}: {}", describe(&output)));
    (output.status.success(), reports)
}

fn status_of<'a>(reports: &'a [serde_json::Value], name: &str) -> &'a str {
    reports
        .iter()
        .find(|r| r["name"] == name)
        .and_then(|r| r["status"].as_str())
        .unwrap_or_else(|| panic!("{name} not in check output"))
}

fn etcd_config(node: &Node, extra: &str) -> u16 {
    let ports = free_ports(2);
    node.write_config(&format!(
        "node_name: testnode\ndatastore: etcd\netcd:\n  client_port: {}\n  peer_port: {}\n{extra}",
        ports[0], ports[1]
    ));
    ports[0]
}

/// `etcdctl` against the node's etcd; `client` names a cert/key pair under certs/.
fn etcdctl(node: &Node, port: u16, client: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new("etcdctl");
    command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=https://127.0.0.1:{port}"))
        .arg(format!("--cacert={}", node.certs("etcd/ca.crt").display()))
        .args(["--dial-timeout=2s", "--command-timeout=3s"]);
    if let Some(name) = client {
        command
            .arg(format!(
                "--cert={}",
                node.certs(&format!("{name}.crt")).display()
            ))
            .arg(format!(
                "--key={}",
                node.certs(&format!("{name}.key")).display()
            ));
    }
    command.args(args).output().expect("run etcdctl")
}

#[test]
fn apiserver_cert_follows_the_service_cidr_and_cluster_domain() {
    let node = Node::new("svcnet");
    node.write_config(
        "network:\n  service_cidr: 10.96.0.0/12\n  cluster_dns: 10.96.0.10\n  \
         cluster_domain: lab.internal\n",
    );
    node.ok(&["certs", "init"]);
    let apiserver = x509_text(&node.certs("apiserver.crt"));
    for san in [
        "IP Address:10.96.0.1",
        "DNS:kubernetes.default.svc.lab.internal",
    ] {
        assert!(
            apiserver.contains(san),
            "apiserver lacks {san}: {apiserver}"
        );
    }
    assert!(!apiserver.contains("10.152.183.1"), "{apiserver}");
    assert!(!apiserver.contains("cluster.local"), "{apiserver}");

    // back to the defaults: the certificate is issued again with their names
    node.write_config("");
    node.ok(&["certs", "init"]);
    let apiserver = x509_text(&node.certs("apiserver.crt"));
    assert!(apiserver.contains("IP Address:10.152.183.1"), "{apiserver}");
    assert!(apiserver.contains("DNS:kubernetes.default.svc.cluster.local"));
}

#[test]
fn a_renamed_node_gets_certificates_in_its_new_name() {
    let node = Node::new("rename");
    node.write_config("node_name: first\n");
    node.ok(&["certs", "init"]);
    let client = x509_text(&node.certs("kubelet-client.crt"));
    assert!(client.contains("CN = system:node:first"), "{client}");

    node.write_config("node_name: second\n");
    let check = node.run(&["certs", "check"]);
    assert!(!check.status.success(), "check passes a stale subject");
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("CN=system:node:first"),
        "{}",
        describe(&check)
    );
    node.ok(&["certs", "init"]);
    let client = x509_text(&node.certs("kubelet-client.crt"));
    assert!(client.contains("CN = system:node:second"), "{client}");
    let kubelet = x509_text(&node.certs("kubelet.crt"));
    assert!(kubelet.contains("CN = second"), "{kubelet}");
    node.ok(&["certs", "check"]);
}

#[test]
fn init_writes_kubeadm_layout_that_openssl_accepts() {
    let node = Node::new("init");
    node.write_config(
        "node_name: testnode\ncerts:\n  extra_sans: [api.example.test, 10.20.30.40]\n",
    );
    node.ok(&["certs", "init"]);

    assert_eq!(mode(&node.path("certs")), 0o700);
    assert_eq!(mode(&node.certs("etcd")), 0o700);
    for ca in CAS {
        let text = x509_text(&node.certs(&format!("{ca}.crt")));
        assert!(text.contains("CA:TRUE"), "{ca}: {text}");
        assert!(text.contains("Certificate Sign"), "{ca}: {text}");
        assert_eq!(mode(&node.certs(&format!("{ca}.key"))), 0o600, "{ca}.key");
    }
    assert_eq!(mode(&node.certs("sa.key")), 0o600);
    assert!(node.certs("sa.pub").exists());
    for (leaf, ca, usage) in LEAVES {
        let cert = node.certs(&format!("{leaf}.crt"));
        assert!(
            verifies(&node, ca, &cert),
            "{leaf} does not verify against {ca}"
        );
        let other = if *ca == "etcd/ca" { "ca" } else { "etcd/ca" };
        assert!(
            !verifies(&node, other, &cert),
            "{leaf} verifies against {other}"
        );
        let text = x509_text(&cert);
        assert!(text.contains("CA:FALSE"), "{leaf}: {text}");
        let server = text.contains("TLS Web Server Authentication");
        let client = text.contains("TLS Web Client Authentication");
        match usage {
            Usage::Server => assert!(server && !client, "{leaf}: {text}"),
            Usage::Client => assert!(client && !server, "{leaf}: {text}"),
            Usage::Both => assert!(server && client, "{leaf}: {text}"),
        }
        assert!(text.contains("ecdsa-with-SHA256"), "{leaf}: {text}");
        assert_eq!(
            mode(&node.certs(&format!("{leaf}.key"))),
            0o600,
            "{leaf}.key"
        );
    }

    let apiserver = x509_text(&node.certs("apiserver.crt"));
    for san in [
        "DNS:kubernetes,",
        "DNS:kubernetes.default,",
        "DNS:kubernetes.default.svc,",
        "DNS:kubernetes.default.svc.cluster.local",
        "DNS:testnode",
        "DNS:api.example.test",
        "IP Address:127.0.0.1",
        "IP Address:10.152.183.1",
        "IP Address:10.20.30.40",
    ] {
        assert!(
            apiserver.contains(san),
            "apiserver lacks {san}: {apiserver}"
        );
    }
    let kubelet_client = x509_text(&node.certs("kubelet-client.crt"));
    assert!(
        kubelet_client.contains("O = system:nodes, CN = system:node:testnode"),
        "{kubelet_client}"
    );
    assert!(x509_text(&node.certs("admin.crt")).contains("O = system:masters"));
    assert!(
        x509_text(&node.certs("controller-manager.crt"))
            .contains("CN = system:kube-controller-manager")
    );

    for file in KUBECONFIGS {
        let path = node.path(&format!("kubeconfig/{file}"));
        assert_eq!(mode(&path), 0o600, "{file}");
        let output = Command::new("kubectl")
            .args(["config", "view", "--raw", "-o"])
            .arg("jsonpath={.clusters[0].cluster.server} {.users[0].user.client-key-data}")
            .arg(format!("--kubeconfig={}", path.display()))
            .output()
            .expect("run kubectl");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            text.starts_with("https://127.0.0.1:6443 ") && text.len() > 60,
            "{file}: {}",
            describe(&output)
        );
    }

    let (ok, reports) = check_json(&node);
    assert!(ok, "{reports:#?}");
    assert_eq!(
        reports.len(),
        CAS.len() + 1 + LEAVES.len() + KUBECONFIGS.len()
    );
    let again = node.ok(&["certs", "init"]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing to do"),
        "{}",
        describe(&again)
    );
}

#[test]
fn rsa_keys_are_selectable() {
    let node = Node::new("rsa");
    node.write_config("certs:\n  key_algorithm: rsa-2048\n");
    node.ok(&["certs", "init"]);
    for (leaf, ca, _) in LEAVES.iter().take(3) {
        let cert = node.certs(&format!("{leaf}.crt"));
        assert!(verifies(&node, ca, &cert), "{leaf}");
        let text = x509_text(&cert);
        assert!(
            text.contains("rsaEncryption") && text.contains("(2048 bit)"),
            "{text}"
        );
    }
    assert!(x509_text(&node.certs("ca.crt")).contains("sha256WithRSAEncryption"));
}

#[test]
fn etcd_runs_with_client_and_peer_mtls() {
    let node = Node::new("mtls");
    let port = etcd_config(&node, "");
    node.start();

    let put = etcdctl(
        &node,
        port,
        Some("apiserver-etcd-client"),
        &["put", "k", "v"],
    );
    assert!(put.status.success(), "{}", describe(&put));
    let get = etcdctl(
        &node,
        port,
        Some("apiserver-etcd-client"),
        &["get", "k", "--print-value-only"],
    );
    assert_eq!(
        String::from_utf8_lossy(&get.stdout).trim(),
        "v",
        "{}",
        describe(&get)
    );

    let anonymous = etcdctl(&node, port, None, &["get", "k"]);
    assert!(
        !anonymous.status.success(),
        "no client cert must be refused: {}",
        describe(&anonymous)
    );
    // a client of the cluster CA is not a client of the etcd CA
    let wrong_ca = etcdctl(&node, port, Some("admin"), &["get", "k"]);
    assert!(!wrong_ca.status.success(), "{}", describe(&wrong_ca));

    // peers must present a certificate too
    let config = std::fs::read_to_string(node.path("config.yaml")).unwrap();
    let peer_port = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("peer_port: "))
        .unwrap()
        .to_string();
    let ca = node.certs("etcd/ca.crt");
    let peer = |with_cert: bool| {
        let mut command = Command::new("curl");
        command
            .args(["-sS", "--http1.1", "--max-time", "5", "--cacert"])
            .arg(&ca);
        if with_cert {
            command
                .arg("--cert")
                .arg(node.certs("etcd/peer.crt"))
                .arg("--key")
                .arg(node.certs("etcd/peer.key"));
        }
        command
            .arg(format!("https://127.0.0.1:{peer_port}/members"))
            .output()
            .expect("run curl")
    };
    let with = peer(true);
    assert!(
        with.status.success() && String::from_utf8_lossy(&with.stdout).contains("testnode"),
        "{}",
        describe(&with)
    );
    assert!(
        !peer(false).status.success(),
        "peer port must require a certificate"
    );

    // `certs renew` with a daemon running restarts etcd, which comes back on mTLS
    let before = node.service_pid("etcd").expect("etcd pid");
    let renew = node.ok(&["certs", "renew", "etcd/server"]);
    assert!(
        String::from_utf8_lossy(&renew.stdout).contains("etcd restarted and ready"),
        "{}",
        describe(&renew)
    );
    let after = node.service_pid("etcd").expect("etcd pid");
    assert_ne!(before, after, "etcd was not restarted");
    let get = etcdctl(
        &node,
        port,
        Some("apiserver-etcd-client"),
        &["get", "k", "--print-value-only"],
    );
    assert_eq!(
        String::from_utf8_lossy(&get.stdout).trim(),
        "v",
        "{}",
        describe(&get)
    );
}

#[test]
fn daemon_renews_etcd_certs_under_a_writing_client() {
    let node = Node::new("renew");
    // renewal is due one minute after issue; the daemon looks every 5 s
    let port = etcd_config(
        &node,
        "certs:\n  leaf_validity: 4m\n  renewal_window: 3m\n  check_interval: 5s\n",
    );
    node.start();
    let serial = |name: &str| {
        let output = openssl(&[
            "x509",
            "-noout",
            "-serial",
            "-in",
            node.certs(name).to_str().unwrap(),
        ]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let first_serial = serial("etcd/server.crt");
    let first_pid = node.service_pid("etcd").expect("etcd pid");

    let started = Instant::now();
    let mut last_ok = Instant::now();
    let mut longest_outage = Duration::ZERO;
    let mut failures = 0;
    let mut writes = 0;
    let mut renewed_at: Option<Instant> = None;
    while started.elapsed() < Duration::from_secs(150) {
        let put = etcdctl(
            &node,
            port,
            Some("apiserver-etcd-client"),
            &["put", "counter", &writes.to_string()],
        );
        writes += 1;
        if put.status.success() {
            last_ok = Instant::now();
        } else {
            failures += 1;
            longest_outage = longest_outage.max(last_ok.elapsed());
        }
        if renewed_at.is_none() && serial("etcd/server.crt") != first_serial {
            renewed_at = Some(Instant::now());
        }
        // keep writing for a while after the restart
        if let Some(at) = renewed_at
            && at.elapsed() > Duration::from_secs(10)
            && node.service_pid("etcd") != Some(first_pid)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let renewed_at = renewed_at.expect("the daemon did not renew etcd/server within 150 s");
    let renewed_after = renewed_at.duration_since(started);
    assert!(
        renewed_after > Duration::from_secs(30),
        "renewed after {renewed_after:?}, before the window opened"
    );
    assert_ne!(
        node.service_pid("etcd"),
        Some(first_pid),
        "etcd was not restarted"
    );
    assert!(
        longest_outage < Duration::from_secs(10),
        "writes failed for {longest_outage:?} ({failures} of {writes} failed)"
    );
    let last = etcdctl(
        &node,
        port,
        Some("apiserver-etcd-client"),
        &["get", "counter"],
    );
    assert!(last.status.success(), "{}", describe(&last));

    let (ok, reports) = check_json(&node);
    assert!(ok, "certs check not clean after renewal: {reports:#?}");
    let log = std::fs::read_to_string(node.path("logs/kdist.log")).unwrap();
    assert!(
        log.contains("restarting to load renewed certificates"),
        "{log}"
    );
    eprintln!(
        "renewed after {renewed_after:?}; {writes} writes, {failures} failed, longest outage {longest_outage:?}"
    );
}

#[test]
fn broken_leaves_are_named_and_renew_fixes_them() {
    let node = Node::new("broken");
    node.ok(&["certs", "init"]);
    std::fs::write(node.certs("etcd/peer.crt"), "not a certificate\n").unwrap();
    std::fs::remove_file(node.certs("front-proxy-client.key")).unwrap();
    // a leaf signed by the wrong CA: the admin cert put in place of the etcd client
    std::fs::copy(
        node.certs("admin.crt"),
        node.certs("apiserver-etcd-client.crt"),
    )
    .unwrap();
    std::fs::copy(
        node.certs("admin.key"),
        node.certs("apiserver-etcd-client.key"),
    )
    .unwrap();

    let table = node.run(&["certs", "check"]);
    assert!(
        !table.status.success(),
        "check must fail: {}",
        describe(&table)
    );
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("certs renew etcd/peer"), "{text}");
    assert!(text.contains("front-proxy-client.key is missing"), "{text}");
    assert!(text.contains("not signed by etcd/ca"), "{text}");

    // a kubeconfig that no longer matches its certificate
    std::fs::copy(
        node.path("kubeconfig/scheduler.conf"),
        node.path("kubeconfig/admin.conf"),
    )
    .unwrap();

    let (ok, reports) = check_json(&node);
    assert!(!ok);
    assert_eq!(status_of(&reports, "kubeconfig/admin.conf"), "invalid");
    assert_eq!(status_of(&reports, "kubeconfig/scheduler.conf"), "ok");
    assert_eq!(status_of(&reports, "etcd/peer"), "invalid");
    assert_eq!(status_of(&reports, "front-proxy-client"), "missing");
    assert_eq!(status_of(&reports, "apiserver-etcd-client"), "invalid");
    assert_eq!(status_of(&reports, "etcd/server"), "ok");

    node.ok(&[
        "certs",
        "renew",
        "etcd/peer",
        "front-proxy-client",
        "apiserver-etcd-client",
    ]);
    let (ok, reports) = check_json(&node);
    assert!(ok, "{reports:#?}");
    assert!(verifies(&node, "etcd/ca", &node.certs("etcd/peer.crt")));
    assert!(verifies(
        &node,
        "etcd/ca",
        &node.certs("apiserver-etcd-client.crt")
    ));
    assert_eq!(mode(&node.certs("front-proxy-client.key")), 0o600);

    let bad = node.run(&["certs", "renew", "no-such-cert"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no-such-cert"));
}

#[test]
fn missing_ca_key_with_leaves_is_refused() {
    let node = Node::new("nokey");
    let _ = etcd_config(&node, "");
    node.ok(&["certs", "init"]);
    let ca_before = std::fs::read(node.certs("ca.crt")).unwrap();
    std::fs::remove_file(node.certs("ca.key")).unwrap();

    for args in [&["certs", "init"][..], &["certs", "renew", "--all"][..]] {
        let output = node.run(args);
        assert!(!output.status.success(), "{args:?} must refuse");
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(err.contains("ca.key is missing"), "{err}");
        assert!(err.contains("apiserver.crt"), "{err}");
        assert!(err.contains("restore"), "{err}");
    }
    // a leaf of another CA can still be repaired; one of the keyless CA cannot
    std::fs::write(node.certs("etcd/peer.crt"), "garbage").unwrap();
    node.ok(&["certs", "renew", "etcd/peer"]);
    assert!(verifies(&node, "etcd/ca", &node.certs("etcd/peer.crt")));
    let admin = node.run(&["certs", "renew", "admin"]);
    assert!(!admin.status.success(), "{}", describe(&admin));
    assert!(String::from_utf8_lossy(&admin.stderr).contains("ca.key is missing"));

    let start = node.run(&["start", "--timeout", "20"]);
    assert!(
        !start.status.success(),
        "the daemon must refuse: {}",
        describe(&start)
    );
    assert!(
        String::from_utf8_lossy(&start.stderr).contains("ca.key is missing"),
        "{}",
        describe(&start)
    );
    assert_eq!(
        std::fs::read(node.certs("ca.crt")).unwrap(),
        ca_before,
        "a new CA was minted"
    );
    assert!(!node.certs("ca.key").exists(), "a new CA key was minted");
    let (ok, reports) = check_json(&node);
    assert!(!ok);
    assert_eq!(status_of(&reports, "ca"), "invalid");
}

#[test]
fn add_san_reissues_the_apiserver_cert() {
    let node = Node::new("san");
    node.ok(&["certs", "init", "--san", "init.example.test"]);
    assert!(x509_text(&node.certs("apiserver.crt")).contains("DNS:init.example.test"));
    let out = node.ok(&["certs", "add-san", "10.99.0.7"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("apiserver"),
        "{}",
        describe(&out)
    );
    node.ok(&["certs", "add-san", "kube.example.test"]);
    let text = x509_text(&node.certs("apiserver.crt"));
    assert!(text.contains("IP Address:10.99.0.7"), "{text}");
    assert!(text.contains("DNS:kube.example.test"), "{text}");
    assert!(text.contains("DNS:init.example.test"), "{text}");
    assert!(verifies(&node, "ca", &node.certs("apiserver.crt")));
    let bad = node.run(&["certs", "add-san", "not a name"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a name"));
}

#[test]
fn rotate_ca_keeps_old_clients_trusted_during_the_overlap() {
    let node = Node::new("rotate");
    node.ok(&["certs", "init"]);
    let old_admin = node.path("old-admin.crt");
    std::fs::copy(node.certs("admin.crt"), &old_admin).unwrap();
    let old_ca = node.path("old-ca.crt");
    std::fs::copy(node.certs("ca.crt"), &old_ca).unwrap();
    let old_kubeconfig = std::fs::read_to_string(node.path("kubeconfig/admin.conf")).unwrap();

    node.ok(&["certs", "rotate-ca", "--overlap", "1h"]);
    assert!(
        verifies(&node, "ca", &old_admin),
        "old client no longer trusted during overlap"
    );
    assert!(verifies(&node, "ca", &node.certs("admin.crt")));
    let new_admin_against_old = openssl(&[
        "verify",
        "-CAfile",
        old_ca.to_str().unwrap(),
        node.certs("admin.crt").to_str().unwrap(),
    ]);
    assert!(
        !new_admin_against_old.status.success(),
        "admin was not re-issued by the new CA"
    );
    assert_ne!(
        std::fs::read_to_string(node.path("kubeconfig/admin.conf")).unwrap(),
        old_kubeconfig
    );
    let (ok, reports) = check_json(&node);
    assert!(ok, "{reports:#?}");

    node.ok(&["certs", "rotate-ca", "--finish"]);
    assert!(
        !verifies(&node, "ca", &old_admin),
        "old CA still trusted after the overlap"
    );
    assert!(verifies(&node, "ca", &node.certs("admin.crt")));
    let (ok, reports) = check_json(&node);
    assert!(ok, "{reports:#?}");
}

#[test]
fn check_flags_certs_inside_the_renewal_window_and_start_renews_them() {
    let node = Node::new("window");
    let port = etcd_config(
        &node,
        "certs:\n  leaf_validity: 2m\n  renewal_window: 90s\n",
    );
    node.ok(&["certs", "init"]);
    let first = std::fs::read(node.certs("etcd/server.crt")).unwrap();
    let (ok, _) = check_json(&node);
    assert!(ok);
    // 30 s later every leaf is inside the window: check says so, and fails
    assert!(wait_until(
        Duration::from_secs(60),
        Duration::from_secs(2),
        || {
            let (ok, reports) = check_json(&node);
            !ok && status_of(&reports, "apiserver") == "expiring"
                && status_of(&reports, "kubeconfig/admin.conf") == "expiring"
        }
    ));
    // the daemon renews what is due before it starts the services
    node.start();
    assert_ne!(std::fs::read(node.certs("etcd/server.crt")).unwrap(), first);
    let (ok, reports) = check_json(&node);
    assert!(ok, "{reports:#?}");
    let put = etcdctl(
        &node,
        port,
        Some("apiserver-etcd-client"),
        &["put", "k", "v"],
    );
    assert!(put.status.success(), "{}", describe(&put));
}
