//! Clustering against the real `kdist` binary: join tokens, the cluster agent, the
//! joiner's CA pinning, and worker joins.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{KDIST, Node, describe, free_port};
use http_body_util::{BodyExt, Full};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// A started control-plane node that runs only the daemon and its cluster agent (no
/// child services: the agent needs none), on a free port.
fn agent_node(tag: &str) -> (Node, u16) {
    let node = Node::new(tag);
    let port = free_port();
    node.write_config(&format!(
        "disable: [etcd, containerd]\ncluster:\n  agent_port: {port}\nnetwork:\n  node_ip: 127.0.0.1\n"
    ));
    node.start();
    // a single node opens no join port until it has a token
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!node.log("kdist").contains("cluster agent listening"));
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    (node, port)
}

/// `kdist add-node -o json <extra>`: (token, ca fingerprint, id).
fn add_node(node: &Node, extra: &[&str]) -> (String, String, String) {
    let mut args = vec!["add-node", "-o", "json"];
    args.extend_from_slice(extra);
    let out = node.kdist_ok(&args);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    (
        v["token"].as_str().unwrap().to_string(),
        v["ca_sha256"].as_str().unwrap().to_string(),
        v["id"].as_str().unwrap().to_string(),
    )
}

fn conn(port: u16, token: &str, fp: &str) -> String {
    format!("127.0.0.1:{port}/{token}/{fp}")
}

/// A fresh node directory that has not run.
fn joiner(tag: &str, name: &str) -> Node {
    let node = Node::new(tag);
    node.write_config(&format!("node_name: {name}\n"));
    node
}

fn join_requests(node: &Node) -> usize {
    node.log("kdist").matches("join request").count()
}

#[test]
fn wrong_ca_pin_is_refused_before_the_token_is_sent() {
    let (cp, port) = agent_node("pin");
    let (token, fp, _) = add_node(&cp, &["--worker"]);
    // same length, one digit changed: a CA the attacker could present would differ more
    let mut wrong = fp.clone().into_bytes();
    wrong[10] = if wrong[10] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();
    let worker = joiner("pinw", "w-pin");
    let out = worker.kdist(&["join", &conn(port, &token, &wrong), "--worker"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not the pinned")
            && stderr.contains(&fp)
            && stderr.contains("nothing was sent"),
        "{stderr}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        join_requests(&cp),
        0,
        "the agent saw a request: {}",
        cp.log("kdist")
    );
    assert!(!worker.path("cluster/joined.json").exists());
    assert!(!worker.path("certs/kubelet-client.crt").exists());
    // the token was never spent: the right pin joins with it (read from stdin, so the
    // token stays out of the process list)
    let mut child = worker
        .command(&["join", "-", "--worker"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{}", conn(port, &token, &fp)).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(join_requests(&cp), 1);
}

#[test]
fn worker_join_exchanges_certificates_and_never_a_ca_key() {
    let (cp, port) = agent_node("wj");
    let (token, fp, _) = add_node(&cp, &["--worker", "--ttl", "1h"]);
    let worker = joiner("wjw", "w-one");
    let out = worker.kdist_ok(&["join", &conn(port, &token, &fp), "--worker"]);
    assert!(out.contains("worker") && out.contains("w-one"), "{out}");
    // the CA certificate is the control plane's, byte for byte its first certificate
    let ca = std::fs::read(cp.certs("ca.crt")).unwrap();
    let got = std::fs::read(worker.certs("ca.crt")).unwrap();
    let first = |pem: &[u8]| CertificateDer::pem_slice_iter(pem).next().unwrap().unwrap();
    assert_eq!(first(&ca), first(&got));
    // no CA key anywhere on the worker
    for entry in walk(&worker.root) {
        let name = entry.file_name().unwrap().to_string_lossy().to_string();
        assert!(!name.contains("ca.key"), "worker holds {}", entry.display());
        if name.ends_with(".key") {
            let text = std::fs::read_to_string(&entry).unwrap();
            let cp_ca_key = std::fs::read_to_string(cp.certs("ca.key")).unwrap();
            assert_ne!(text, cp_ca_key);
        }
    }
    // signed by the control plane's CA, with the node identity, for the worker's own keys
    for (cert, subject) in [
        ("kubelet-client.crt", "system:node:w-one"),
        ("kube-proxy.crt", "system:kube-proxy"),
        ("kubelet.crt", "w-one"),
    ] {
        let path = worker.certs(cert);
        let verify = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(cp.certs("ca.crt"))
            .arg(&path)
            .output()
            .unwrap();
        assert!(verify.status.success(), "{cert}: {}", describe(&verify));
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-in"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout).to_string();
        assert!(text.contains(subject), "{cert}: {text}");
        let key = path.with_extension("key");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        let pubkey = |args: &[&str], file: &std::path::Path| {
            let out = Command::new("openssl")
                .args(args)
                .arg(file)
                .output()
                .unwrap();
            out.stdout
        };
        assert_eq!(
            pubkey(&["x509", "-noout", "-pubkey", "-in"], &path),
            pubkey(&["pkey", "-pubout", "-in"], &key),
            "{cert} is not for the worker's key"
        );
    }
    let kubelet_conf = std::fs::read_to_string(worker.path("kubeconfig/kubelet.conf")).unwrap();
    assert!(
        kubelet_conf.contains("https://127.0.0.1:6443"),
        "{kubelet_conf}"
    );
    let config = std::fs::read_to_string(worker.path("config.yaml")).unwrap();
    assert!(config.contains("role: worker"), "{config}");
    // the control plane records the node
    let nodes = std::fs::read_to_string(cp.path("cluster/nodes.json")).unwrap();
    assert!(nodes.contains("w-one"), "{nodes}");
    // its only control plane does not leave it stranded without --force
    let out = cp.kdist(&["leave"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("only control plane") && err.contains("w-one") && err.contains("--force"),
        "{err}"
    );
    assert!(cp.certs("ca.key").exists() && cp.path("cluster/nodes.json").exists());
    // a worker cannot hand out tokens
    let out = worker.kdist(&["add-node"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("worker"),
        "{}",
        describe(&out)
    );
}

#[test]
fn joins_after_a_ca_rotation_pin_the_new_ca() {
    let (cp, port) = agent_node("rot");
    let old_ca = std::fs::read(cp.certs("ca.crt")).unwrap();
    // the agent is up (it opens with the first token) under the old CA
    add_node(&cp, &["--worker"]);
    let up = common::wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "{}", cp.log("kdist"));
    cp.kdist_ok(&["certs", "rotate-ca", "--overlap", "1h"]);
    let (token, fp, _) = add_node(&cp, &["--worker"]);
    let worker = joiner("rotw", "w-rot");
    let out = worker.kdist(&["join", &conn(port, &token, &fp), "--worker"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        describe(&out),
        cp.log("kdist")
    );
    // the worker got the new CA, which is not the old one
    let first = |pem: &[u8]| CertificateDer::pem_slice_iter(pem).next().unwrap().unwrap();
    let ca = std::fs::read(cp.certs("ca.crt")).unwrap();
    assert_eq!(
        first(&std::fs::read(worker.certs("ca.crt")).unwrap()),
        first(&ca)
    );
    assert_ne!(first(&ca), first(&old_ca));
    assert!(
        cp.log("kdist").contains("agent certificate issued again"),
        "{}",
        cp.log("kdist")
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn expired_reused_revoked_malformed_and_random_tokens_are_rejected() {
    let (cp, port) = agent_node("bad");
    let fp = add_node(&cp, &["--worker"]).1;
    let refused_as = |name: &str, connection: String, expect: &str, role: &[&str]| {
        let w = joiner(&format!("b{name}"), name);
        let mut args = vec!["join", connection.as_str()];
        args.extend_from_slice(role);
        let out = w.kdist(&args);
        assert!(!out.status.success(), "{name}: {}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            stderr.contains(expect),
            "{name}: expected `{expect}` in {stderr}"
        );
        assert!(!w.path("cluster/joined.json").exists());
        stderr
    };
    let refused = |name: &str, connection: String, expect: &str| {
        refused_as(name, connection, expect, &["--worker"])
    };
    // the control plane's own name: refused before the token is spent
    // (the agent node sets no node_name: it is the host name)
    let own = nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .to_lowercase();
    let (token, _, _) = add_node(&cp, &["--worker"]);
    refused(
        &own,
        conn(port, &token, &fp),
        "is the name of the control plane",
    );
    joiner("own-ok", "not-the-cp").kdist_ok(&["join", &conn(port, &token, &fp), "--worker"]);
    // expired
    let (token, _, _) = add_node(&cp, &["--worker", "--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    refused("expired", conn(port, &token, &fp), "has expired");
    // reused
    let (token, _, _) = add_node(&cp, &["--worker"]);
    joiner("reuse1", "first").kdist_ok(&["join", &conn(port, &token, &fp), "--worker"]);
    refused("reused", conn(port, &token, &fp), "already been used");
    // revoked
    let (token, _, id) = add_node(&cp, &["--worker", "--uses", "3", "--ttl", "1h"]);
    let listed = cp.kdist_ok(&["add-node", "--list"]);
    assert!(listed.contains(&id) && !listed.contains(&token), "{listed}");
    // its expiry in RFC 3339, UTC
    let line = listed.lines().find(|l| l.starts_with(&id)).unwrap();
    let expires = line.split_whitespace().last().unwrap();
    assert!(
        expires.len() == 20 && expires.starts_with("20") && expires.ends_with('Z'),
        "{line}"
    );
    cp.kdist_ok(&["add-node", "--revoke", &id]);
    assert!(!cp.kdist_ok(&["add-node", "--list"]).contains(&id));
    refused("revoked", conn(port, &token, &fp), "not known");
    // random, well-formed
    let random = "5a".repeat(32);
    refused("random", conn(port, &random, &fp), "not known");
    // malformed: refused by the joiner, and by the agent when sent anyway
    let stderr = refused("malformed", conn(port, "abc", &fp), "malformed");
    assert!(!stderr.contains("abc/"), "the token is echoed: {stderr}");
    let (status, body) = raw_post(
        port,
        None,
        &cp,
        &serde_json::json!({
            "token": "zz", "node_name": "x", "role": "worker",
            "kubelet_client_csr": "", "kube_proxy_csr": "", "kubelet_serving_csr": ""
        })
        .to_string(),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("malformed"), "{body}");
    // a worker token cannot make a control plane; the token stays usable
    let (token, _, _) = add_node(&cp, &["--worker"]);
    refused_as(
        "cpwithworker",
        conn(port, &token, &fp),
        "allows only worker joins",
        &[],
    );
    joiner("cpw2", "w-after").kdist_ok(&["join", &conn(port, &token, &fp), "--worker"]);
    // the token files hold no token
    let stored = std::fs::read_to_string(cp.path("cluster/tokens.json")).unwrap();
    assert!(!stored.contains(&token));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(cp.path("cluster/tokens.json"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn one_single_use_token_raced_by_100_joiners_admits_exactly_one() {
    let (cp, port) = agent_node("race");
    let (token, fp, _) = add_node(&cp, &["--worker"]);
    let joiners: Vec<Node> = (0..100)
        .map(|i| joiner("r", &format!("racer-{i}")))
        .collect();
    let connection = conn(port, &token, &fp);
    let children: Vec<_> = joiners
        .iter()
        .map(|j| {
            j.command(&["join", &connection, "--worker"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let ok = outputs.iter().filter(|o| o.status.success()).count();
    let joined = joiners
        .iter()
        .filter(|j| j.path("cluster/joined.json").exists())
        .count();
    assert_eq!(ok, 1, "successes: {ok}");
    assert_eq!(joined, 1);
    for out in outputs.iter().filter(|o| !o.status.success()) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("already been used") || stderr.contains("too many failed"),
            "{stderr}"
        );
    }
    let nodes = std::fs::read_to_string(cp.path("cluster/nodes.json")).unwrap();
    assert_eq!(nodes.matches("racer-").count(), 1, "{nodes}");
}

/// A TLS client trusting `node`'s CA, optionally from `local` (a loopback address).
fn client_config(node: &Node) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(node.certs("ca.crt")).unwrap();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(port: u16, local: Option<IpAddr>, config: Arc<rustls::ClientConfig>) -> Sender {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(ip) = local {
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    let tcp = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into()),
            tcp,
        )
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn send(sender: &mut Sender, method: &str, path: &str, body: String) -> (u16, String) {
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    sender.ready().await.unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).to_string())
}

fn raw_post(port: u16, local: Option<IpAddr>, node: &Node, body: &str) -> (u16, String) {
    let config = client_config(node);
    let body = body.to_string();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let mut sender = connect(port, local, config).await;
            send(&mut sender, "POST", "/v1/join", body).await
        })
}

fn join_body(token: &str, name: &str) -> String {
    let csr = || {
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    };
    serde_json::json!({
        "token": token, "node_name": name, "role": "worker",
        "kubelet_client_csr": csr(), "kube_proxy_csr": csr(), "kubelet_serving_csr": csr(),
    })
    .to_string()
}

/// A TLS connection to the agent that has written `sent` and nothing more.
async fn stalled(port: u16, config: Arc<rustls::ClientConfig>, sent: &[u8]) -> impl AsyncRead {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into()),
            tcp,
        )
        .await
        .unwrap();
    tls.write_all(sent).await.unwrap();
    tls.flush().await.unwrap();
    tls
}

#[test]
fn connections_that_stall_are_closed_and_joins_still_answer() {
    let (cp, port) = agent_node("stall");
    let (token, _, _) = add_node(&cp, &["--worker"]);
    let config = client_config(&cp);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let started = Instant::now();
            // nothing after the handshake, half a header, headers without their body
            let body = "POST /v1/join HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 100\r\n\r\n";
            let mut held = Vec::new();
            for sent in [
                &b""[..],
                b"POST /v1/join HTTP/1.1\r\nhost: 12",
                body.as_bytes(),
            ] {
                held.push(stalled(port, config.clone(), sent).await);
            }
            // every one is answered or closed by the agent (10 s each), well before 40 s
            for (i, mut conn) in held.into_iter().enumerate() {
                let mut rest = Vec::new();
                let read = tokio::time::timeout(
                    Duration::from_secs(40) - started.elapsed(),
                    conn.read_to_end(&mut rest),
                )
                .await;
                assert!(read.is_ok(), "stalled connection {i} still open after 40 s");
            }
            assert!(
                started.elapsed() >= Duration::from_secs(9),
                "closed too early"
            );
            let mut sender = connect(port, None, config).await;
            let (status, answer) =
                send(&mut sender, "POST", "/v1/join", join_body(&token, "after")).await;
            assert_eq!(status, 200, "{answer}");
        });
}

#[test]
fn ten_thousand_bad_attempts_are_all_refused_and_the_agent_stays_responsive() {
    let (cp, port) = agent_node("flood");
    let (token, _, _) = add_node(&cp, &["--worker"]);
    let config = client_config(&cp);
    let attempts = 10_000;
    let (statuses, health_ms, limited_valid, other_valid) = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
            let mut sender = connect(port, None, config.clone()).await;
            for i in 0..attempts {
                // a new connection now and then, as a real flood would do
                if i % 1000 == 999 {
                    sender = connect(port, None, config.clone()).await;
                }
                let random: [u8; 32] = rand::random();
                let body = serde_json::json!({
                    "token": hex::encode(random), "node_name": "attacker", "role": "worker",
                    "kubelet_client_csr": "", "kube_proxy_csr": "", "kubelet_serving_csr": "",
                })
                .to_string();
                let (status, _) = send(&mut sender, "POST", "/v1/join", body).await;
                *statuses.entry(status).or_default() += 1;
            }
            let started = Instant::now();
            let mut fresh = connect(port, None, config.clone()).await;
            let (health, _) = send(&mut fresh, "GET", "/v1/health", String::new()).await;
            assert_eq!(health, 200);
            let health_ms = started.elapsed().as_millis();
            // the flooding address is refused even with a valid token, without spending it
            let (limited_valid, _) =
                send(&mut fresh, "POST", "/v1/join", join_body(&token, "valid")).await;
            // another address is not affected
            let mut other = connect(port, Some(IpAddr::from([127, 0, 0, 2])), config).await;
            let (other_valid, body) =
                send(&mut other, "POST", "/v1/join", join_body(&token, "valid")).await;
            assert_eq!(other_valid, 200, "{body}");
            (statuses, health_ms, limited_valid, other_valid)
        });
    eprintln!("statuses of {attempts} bad attempts: {statuses:?}; health after: {health_ms} ms");
    assert!(!statuses.contains_key(&200), "{statuses:?}");
    assert_eq!(statuses.values().sum::<usize>(), attempts);
    assert_eq!(
        statuses.get(&401).copied().unwrap_or(0),
        kdist::cluster::MAX_FAILURES as usize,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.get(&429).copied().unwrap_or(0),
        attempts - kdist::cluster::MAX_FAILURES as usize
    );
    assert!(health_ms < 2000, "health took {health_ms} ms");
    assert_eq!(limited_valid, 429);
    assert_eq!(other_valid, 200);
}

#[test]
fn join_errors_name_what_to_do() {
    let worker = joiner("jerr", "w-err");
    let out = worker.kdist(&["join", "nonsense", "--worker"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("kdist add-node"), "{stderr}");
    // nothing listens on this port
    let port = free_port();
    let out = worker.kdist(&[
        "join",
        &conn(port, &"ab".repeat(32), &"cd".repeat(32)),
        "--worker",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("cannot reach"),
        "{stderr}"
    );
    let _ = KDIST;
}

/// Network namespaces on a bridge the test creates, in 10.203.0.0/24 (the host side of
/// the bridge is .254). Everything is removed on drop, even when the test fails.
struct Lab {
    bridge: String,
    namespaces: Vec<String>,
    veths: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", describe(&out));
}

impl Lab {
    fn new(nodes: usize) -> Self {
        let tag = std::process::id() % 100_000;
        let mut lab = Lab {
            bridge: format!("kdbr{tag}"),
            namespaces: Vec::new(),
            veths: Vec::new(),
        };
        ip(&["link", "add", &lab.bridge, "type", "bridge"]);
        ip(&["addr", "add", "10.203.0.254/24", "dev", &lab.bridge]);
        ip(&["link", "set", &lab.bridge, "up"]);
        for i in 1..=nodes {
            let ns = format!("kdns{tag}-{i}");
            let (host, inner) = (format!("kdh{tag}-{i}"), format!("kdn{tag}-{i}"));
            ip(&["netns", "add", &ns]);
            lab.namespaces.push(ns.clone());
            ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner]);
            lab.veths.push(host.clone());
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["link", "set", &host, "master", &lab.bridge]);
            ip(&["link", "set", &host, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.203.0.{i}/24"),
                "dev",
                &inner,
            ]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    fn ns(&self, i: usize) -> &str {
        &self.namespaces[i - 1]
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        for veth in &self.veths {
            let _ = Command::new("ip").args(["link", "del", veth]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// `kdist <args>` for `node`, run inside network namespace `ns`.
fn in_ns(ns: &str, node: &Node, args: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns, KDIST, "--data-dir"])
        .arg(&node.root)
        .args(args)
        .env_remove("KDIST_DATA_DIR")
        .output()
        .unwrap()
}

fn in_ns_ok(ns: &str, node: &Node, args: &[&str]) -> String {
    let out = in_ns(ns, node, args);
    assert!(
        out.status.success(),
        "kdist {args:?} in {ns} failed: {}\n--- kdist.log\n{}\n--- etcd.log\n{}",
        describe(&out),
        node.log("kdist"),
        node.log("etcd")
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// etcdctl from the host against node `i` (10.203.0.i:2379), with `certs_of`'s client cert.
fn etcdctl_at(certs_of: &Node, endpoints: &[usize], args: &[&str]) -> std::process::Output {
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|i| format!("https://10.203.0.{i}:2379"))
        .collect();
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .arg(format!(
            "--cacert={}",
            certs_of.certs("etcd/ca.crt").display()
        ))
        .arg(format!(
            "--cert={}",
            certs_of.certs("apiserver-etcd-client.crt").display()
        ))
        .arg(format!(
            "--key={}",
            certs_of.certs("apiserver-etcd-client.key").display()
        ))
        .arg("--dial-timeout=3s")
        .arg("--command-timeout=10s")
        .args(args)
        .output()
        .unwrap()
}

/// (name, is_learner) of every member, asked through node `via`.
fn members(certs_of: &Node, via: usize) -> Option<Vec<(String, bool)>> {
    let out = etcdctl_at(certs_of, &[via], &["member", "list", "-w", "json"]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        v["members"]
            .as_array()?
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or("").to_string(),
                    m["isLearner"].as_bool().unwrap_or(false),
                )
            })
            .collect(),
    )
}

fn voting(certs_of: &Node, via: usize) -> Vec<String> {
    let mut names: Vec<String> = members(certs_of, via)
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, learner)| !learner && !name.is_empty())
        .map(|(name, _)| name)
        .collect();
    names.sort();
    names
}

fn join_control_plane(lab: &Lab, first: &Node, i: usize, node: &Node) {
    let out = in_ns_ok(lab.ns(1), first, &["add-node", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let connection = format!(
        "10.203.0.1:25000/{}/{}",
        v["token"].as_str().unwrap(),
        v["ca_sha256"].as_str().unwrap()
    );
    in_ns_ok(lab.ns(i), node, &["join", &connection]);
    in_ns_ok(lab.ns(i), node, &["start", "--timeout", "120"]);
    let name = format!("n{i}");
    let promoted = common::wait_until(Duration::from_secs(90), Duration::from_millis(500), || {
        voting(first, 1).contains(&name)
    });
    assert!(
        promoted,
        "{name} not promoted: {:?}\n--- n1 kdist.log\n{}\n--- {name} etcd.log\n{}",
        members(first, 1),
        first.log("kdist"),
        node.log("etcd")
    );
}

fn ha_node(tag: &str, i: usize, datastore: &str) -> Node {
    let node = Node::new(tag);
    node.write_config(&format!(
        "node_name: n{i}\ndatastore: {datastore}\ndisable: [containerd]\nnetwork:\n  node_ip: 10.203.0.{i}\n"
    ));
    node
}

#[test]
fn three_control_planes_form_an_etcd_cluster_that_survives_a_member_and_reforms() {
    // dropped last: the nodes (declared after) stop first
    let lab = Lab::new(3);
    // node 1 starts alone on the embedded default and migrates to etcd before others join
    let n1 = ha_node("ha1", 1, "embedded");
    let n2 = ha_node("ha2", 2, "etcd");
    let n3 = ha_node("ha3", 3, "etcd");
    in_ns_ok(lab.ns(1), &n1, &["start", "--timeout", "120"]);
    let put = n1
        .etcdctl_unix()
        .args(["put", "/kdist-test/before-migrate", "embedded"])
        .output()
        .unwrap();
    assert!(put.status.success(), "{}", describe(&put));
    let out = in_ns_ok(lab.ns(1), &n1, &["datastore", "migrate", "--to", "etcd"]);
    assert!(out.contains("migrated from embedded to etcd"), "{out}");
    assert_eq!(voting(&n1, 1), ["n1"]);
    let get = etcdctl_at(
        &n1,
        &[1],
        &["get", "/kdist-test/before-migrate", "--print-value-only"],
    );
    assert_eq!(
        String::from_utf8_lossy(&get.stdout).trim(),
        "embedded",
        "{}",
        describe(&get)
    );

    join_control_plane(&lab, &n1, 2, &n2);
    join_control_plane(&lab, &n1, 3, &n3);
    assert_eq!(voting(&n1, 1), ["n1", "n2", "n3"]);
    // `kdist status` shows the nodes and the members with their health
    let healthy = common::wait_until(Duration::from_secs(30), Duration::from_millis(500), || {
        let out = in_ns_ok(lab.ns(1), &n1, &["status", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let members = v["cluster"]["members"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        members.len() == 3
            && members
                .iter()
                .all(|m| m["healthy"] == true && m["learner"] == false)
    });
    assert!(healthy, "{}", in_ns_ok(lab.ns(1), &n1, &["status"]));
    let table = in_ns_ok(lab.ns(1), &n1, &["status"]);
    assert!(table.contains("CLUSTER") && table.contains("n3"), "{table}");
    let joined = in_ns_ok(lab.ns(2), &n2, &["status", "-o", "json"]);
    assert!(joined.contains("10.203.0.1:25000"), "{joined}");
    // the joiners hold their own serving certificates from the shared etcd CA, with mTLS
    let health = etcdctl_at(&n3, &[1, 2, 3], &["endpoint", "health", "--cluster"]);
    let text = String::from_utf8_lossy(&health.stdout).to_string()
        + &String::from_utf8_lossy(&health.stderr);
    assert!(health.status.success(), "{text}");
    assert_eq!(text.matches("is healthy").count(), 3, "{text}");
    let no_cert = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints=https://10.203.0.3:2379", "--dial-timeout=3s"])
        .arg(format!("--cacert={}", n1.certs("etcd/ca.crt").display()))
        .args(["get", "x"])
        .output()
        .unwrap();
    assert!(
        !no_cert.status.success(),
        "etcd answered without a client certificate"
    );

    // a write through node 1 is read through node 3
    let put = etcdctl_at(&n1, &[1], &["put", "/kdist-test/a", "one"]);
    assert!(put.status.success(), "{}", describe(&put));
    let get = etcdctl_at(&n1, &[3], &["get", "/kdist-test/a", "--print-value-only"]);
    assert_eq!(
        String::from_utf8_lossy(&get.stdout).trim(),
        "one",
        "{}",
        describe(&get)
    );
    // so is what node 1 held before it migrated
    let get = etcdctl_at(
        &n1,
        &[3],
        &["get", "/kdist-test/before-migrate", "--print-value-only"],
    );
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "embedded");

    // node 2 stops: quorum holds (2 of 3), writes go on
    n2.ok(&["stop", "--timeout", "60"]);
    let put = etcdctl_at(&n1, &[1], &["put", "/kdist-test/b", "while-n2-down"]);
    assert!(put.status.success(), "{}", describe(&put));
    let get = etcdctl_at(&n1, &[3], &["get", "/kdist-test/b", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "while-n2-down");

    // node 2 comes back and catches up: its own (serializable) read sees the write
    in_ns_ok(lab.ns(2), &n2, &["start", "--timeout", "120"]);
    let caught_up = common::wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        let get = etcdctl_at(
            &n1,
            &[2],
            &[
                "get",
                "/kdist-test/b",
                "--print-value-only",
                "--consistency=s",
            ],
        );
        String::from_utf8_lossy(&get.stdout).trim() == "while-n2-down"
    });
    assert!(caught_up, "n2 did not catch up: {}", n2.log("etcd"));

    // remove-node of node 3 leaves a healthy 2-member cluster
    let out = in_ns_ok(lab.ns(1), &n1, &["remove-node", "n3"]);
    assert!(out.contains("etcd member removed"), "{out}");
    assert_eq!(voting(&n1, 1), ["n1", "n2"]);
    let health = etcdctl_at(&n1, &[1, 2], &["endpoint", "health", "--cluster"]);
    let text = String::from_utf8_lossy(&health.stdout).to_string()
        + &String::from_utf8_lossy(&health.stderr);
    assert!(health.status.success(), "{text}");
    assert_eq!(text.matches("is healthy").count(), 2, "{text}");
    let put = etcdctl_at(&n1, &[2], &["put", "/kdist-test/c", "two-members"]);
    assert!(put.status.success(), "{}", describe(&put));

    // node 3 leaves (it is already out of etcd) and re-joins with a new token
    let out = in_ns_ok(lab.ns(3), &n3, &["leave"]);
    assert!(out.contains("fresh single node"), "{out}");
    assert!(!n3.path("cluster/joined.json").exists());
    assert!(!n3.certs("ca.key").exists());
    join_control_plane(&lab, &n1, 3, &n3);
    assert_eq!(voting(&n1, 1), ["n1", "n2", "n3"]);
    let get = etcdctl_at(&n1, &[3], &["get", "/kdist-test/c", "--print-value-only"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "two-members");
}

#[test]
fn a_joined_worker_runs_only_node_services_and_issues_no_certificates() {
    let (cp, port) = agent_node("wr");
    let (token, fp, _) = add_node(&cp, &["--worker"]);
    let worker = joiner("wrw", "w-run");
    worker.kdist_ok(&["join", &conn(port, &token, &fp), "--worker"]);
    let before = std::fs::read(worker.certs("ca.crt")).unwrap();
    // keep the host untouched: no containerd in this test
    let config = std::fs::read_to_string(worker.path("config.yaml")).unwrap();
    let config = config.replace("disable: []", "disable: [containerd]");
    assert!(config.contains("disable: [containerd]"), "{config}");
    std::fs::write(worker.path("config.yaml"), config).unwrap();
    worker.start();
    let status = worker.status();
    let services: Vec<&str> = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(!services.contains(&"etcd"), "{services:?}");
    assert!(!worker.log("kdist").contains("cluster agent listening"));
    // no CA key was made, the received CA stays
    assert!(!worker.certs("ca.key").exists());
    assert_eq!(std::fs::read(worker.certs("ca.crt")).unwrap(), before);
    assert!(!worker.certs("etcd").exists());
    // it shows what it joined
    let status = worker.kdist_ok(&["status"]);
    assert!(status.contains("CLUSTER (this node: worker)"), "{status}");
    worker.ok(&["stop"]);
    let out = worker.kdist_ok(&["leave"]);
    assert!(out.contains("fresh single node"), "{out}");
    assert!(!worker.path("cluster/joined.json").exists());
    let config = std::fs::read_to_string(worker.path("config.yaml")).unwrap();
    assert!(config.contains("role: control-plane"), "{config}");
}

#[test]
fn control_plane_join_on_the_embedded_datastore_says_to_migrate() {
    let node = Node::new("emb");
    let port = free_port();
    node.write_config(&format!(
        "datastore: embedded\ndisable: [containerd]\ncluster:\n  agent_port: {port}\nnetwork:\n  node_ip: 127.0.0.1\n"
    ));
    node.start();
    let (token, fp, _) = add_node(&node, &[]);
    let cp = joiner("embj", "cp-two");
    let out = cp.kdist(&["join", &conn(port, &token, &fp)]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("kdist datastore migrate --to etcd"),
        "{stderr}"
    );
    // the refusal did not spend the token: a worker can still use it
    cp.kdist_ok(&["join", &conn(port, &token, &fp), "--worker"]);
}

/// A node whose every `kdist` command runs inside network namespace `ns`, with the
/// Kubernetes binaries on PATH. Dropping it stops the daemon and resets the node (mounts,
/// iptables, cgroups, host paths), even when the test failed.
struct NsNode {
    ns: String,
    path: String,
    node: Node,
}

impl NsNode {
    fn new(lab: &Lab, i: usize, tag: &str, path: &str, config: &str) -> Self {
        let node = Node::new(tag);
        node.write_config(config);
        Self {
            ns: lab.ns(i).to_string(),
            path: path.to_string(),
            node,
        }
    }

    fn kdist(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, KDIST, "--data-dir"])
            .arg(&self.node.root)
            .args(args)
            .env("PATH", &self.path)
            .env_remove("KDIST_DATA_DIR")
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.kdist(args);
        assert!(
            out.status.success(),
            "kdist {args:?} in {}: {}\n--- kdist.log\n{}",
            self.ns,
            describe(&out),
            self.node.log("kdist")
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A command run inside the namespace (not kdist).
    fn inside(&self, program: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, program])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for NsNode {
    fn drop(&mut self) {
        if self.node.path("run/kdist.sock").exists() {
            let _ = self.kdist(&["stop", "--timeout", "60"]);
        }
        if self.node.path("node/host-state.json").exists() {
            let _ = self.kdist(&["reset"]);
        }
    }
}

const ON_WORKER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: on-w1}
spec:
  nodeSelector: {kubernetes.io/hostname: w1}
  terminationGracePeriodSeconds: 1
  containers:
  - name: hello
    image: kdist.local/test/busybox:1
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "echo hello-from-w1; exec sleep 3600"]
"#;

/// The cgroup directories below `root` in the memory hierarchy (v1) or the unified one.
fn cgroup_dir(root: &str) -> std::path::PathBuf {
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory");
    let base = if v1.is_dir() {
        v1
    } else {
        std::path::Path::new("/sys/fs/cgroup")
    };
    base.join(root.trim_start_matches('/'))
}

/// A worker that joins a control plane with real Kubernetes binaries (each node in its
/// own network namespace, both kubelets on this host's cgroups, each with its own pod
/// cgroup root) registers as a Node, becomes Ready, runs a pod whose logs the control
/// plane reads from the worker's kubelet, and is removed again.
#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn worker_registers_and_becomes_ready() {
    let bin = std::env::var("KDIST_TEST_K8S_BIN").unwrap();
    let path = format!("{bin}:{}", std::env::var("PATH").unwrap_or_default());
    // dropped last: the nodes (declared after) stop and reset first
    let lab = Lab::new(2);
    // each node its own pod range (the bridge CNI is per node) and pod cgroup root
    let node_config = |name: &str, i: usize| {
        format!(
            "node_name: {name}\nnetwork:\n  egress: none\n  node_ip: 10.203.0.{i}\n  \
             pod_cidr: 10.{i}.0.0/16\nruntime:\n  sandbox_image: kdist.local/test/pause:1\n  \
             cgroup_root: /kdist-test-{name}\naddons:\n  dns:\n    enabled: false\n"
        )
    };
    // the worker has only the node binaries (and kubectl, for `kdist start`'s Ready check)
    let worker_bin = common::temp_dir("kdist-worker-bin");
    for name in ["kubelet", "kube-proxy", "kubectl"] {
        std::os::unix::fs::symlink(
            std::path::Path::new(&bin).join(name),
            worker_bin.path().join(name),
        )
        .unwrap();
    }
    let worker_path = format!(
        "{}:{}",
        worker_bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cp = NsNode::new(&lab, 1, "k8cp", &path, &node_config("cp1", 1));
    let worker = NsNode::new(&lab, 2, "k8w", &worker_path, &node_config("w1", 2));
    let started = Instant::now();
    cp.ok(&["start", "--timeout", "300"]);
    let cp_ready = started.elapsed();
    let v: serde_json::Value =
        serde_json::from_str(&cp.ok(&["add-node", "--worker", "-o", "json"])).unwrap();
    let connection = format!(
        "10.203.0.1:25000/{}/{}",
        v["token"].as_str().unwrap(),
        v["ca_sha256"].as_str().unwrap()
    );
    worker.ok(&["join", &connection, "--worker"]);
    let joined = Instant::now();
    worker.ok(&["start", "--timeout", "300"]);
    eprintln!(
        "control plane start -> node Ready: {cp_ready:?}; worker join + start -> node Ready: {:?}",
        joined.elapsed()
    );

    // the worker runs the node services only
    let status: serde_json::Value =
        serde_json::from_str(&worker.ok(&["status", "-o", "json"])).unwrap();
    let services: Vec<&str> = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(services, ["containerd", "kubelet", "kube-proxy"]);
    assert!(
        status["services"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["ready"] == true),
        "{status:#}"
    );
    // each kubelet has its own pod cgroup root on the shared hierarchy
    for root in ["/kdist-test-cp1/kubepods", "/kdist-test-w1/kubepods"] {
        assert!(
            common::wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
                cgroup_dir(root).is_dir()
            }),
            "no {}",
            cgroup_dir(root).display()
        );
    }

    let node_field = |name: &str, jsonpath: &str| {
        let out = cp.kdist(&[
            "kubectl",
            "get",
            "node",
            name,
            "-o",
            &format!("jsonpath={jsonpath}"),
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let ready = "{.status.conditions[?(@.type==\"Ready\")].status}";
    let both = common::wait_until(Duration::from_secs(240), Duration::from_secs(2), || {
        node_field("w1", ready) == "True" && node_field("cp1", ready) == "True"
    });
    assert!(
        both,
        "nodes not Ready: {}\n--- w1 kubelet.log\n{}",
        cp.ok(&["kubectl", "get", "nodes", "-o", "wide"]),
        worker.node.log("kubelet")
    );
    let nodes = cp.ok(&["kubectl", "get", "nodes", "--no-headers"]);
    let lines: Vec<&str> = nodes.lines().collect();
    assert_eq!(lines.len(), 2, "{nodes}");
    assert!(
        lines
            .iter()
            .all(|l| l.split_whitespace().nth(1) == Some("Ready")),
        "{nodes}"
    );
    assert_eq!(
        node_field(
            "w1",
            "{.status.addresses[?(@.type==\"InternalIP\")].address}"
        ),
        "10.203.0.2"
    );

    // `bench node` on the worker measures from its start to its Node Ready (read with
    // the kubelet's credentials: a worker has no apiserver), and leaves it running
    worker.ok(&["stop"]);
    let bench: serde_json::Value = serde_json::from_str(&worker.ok(&[
        "bench",
        "node",
        "--seconds",
        "5",
        "--timeout",
        "240",
        "--keep-running",
        "-o",
        "json",
    ]))
    .unwrap();
    let run = &bench[0];
    assert!(run["apiserver_ready_secs"].is_null(), "{run:#}");
    assert!(
        run["node_ready_secs"].as_f64().is_some_and(|s| s > 0.0),
        "{run:#}"
    );
    assert!(
        common::wait_until(Duration::from_secs(120), Duration::from_secs(2), || {
            node_field("w1", ready) == "True"
        }),
        "w1 not Ready after bench node"
    );

    // the egress guard and kube-proxy's rules live in the worker's own namespace
    let chain = common::egress_chain(&worker.node.root);
    let guard = worker.inside("iptables", &["-w", "5", "-t", "mangle", "-S", &chain]);
    assert!(guard.status.success(), "{}", describe(&guard));
    let proxied = common::wait_until(Duration::from_secs(60), Duration::from_secs(1), || {
        let out = worker.inside("iptables", &["-w", "5", "-t", "nat", "-S", "KUBE-SERVICES"]);
        String::from_utf8_lossy(&out.stdout).contains("default/kubernetes:https")
    });
    assert!(proxied, "{}", worker.node.log("kube-proxy"));

    // a pod on the worker, from images imported there, with logs read through the
    // control plane (apiserver -> the worker's kubelet across the veths)
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
        let archive = worker.node.path(file);
        common::oci::build(&archive, name, cmd);
        let out = worker.ok(&["images", "import", archive.to_str().unwrap()]);
        assert!(out.contains(name), "{out}");
    }
    let manifest = cp.node.path("on-w1.yaml");
    std::fs::write(&manifest, ON_WORKER).unwrap();
    let applied = Instant::now();
    cp.ok(&["kubectl", "apply", "-f", manifest.to_str().unwrap()]);
    let running = cp.kdist(&[
        "kubectl",
        "wait",
        "--for=jsonpath={.status.phase}=Running",
        "pod/on-w1",
        "--timeout=120s",
    ]);
    assert!(
        running.status.success(),
        "{}\n{}\n--- w1 kubelet.log\n{}",
        describe(&running),
        String::from_utf8_lossy(&cp.kdist(&["kubectl", "describe", "pod", "on-w1"]).stdout),
        worker.node.log("kubelet")
    );
    eprintln!("pod applied -> Running on w1: {:?}", applied.elapsed());
    assert_eq!(
        cp.ok(&[
            "kubectl",
            "get",
            "pod",
            "on-w1",
            "-o",
            "jsonpath={.spec.nodeName}"
        ]),
        "w1"
    );
    // in the worker's own pod cgroup root (a BestEffort pod)
    let uid = cp.ok(&[
        "kubectl",
        "get",
        "pod",
        "on-w1",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let pod_cgroup = cgroup_dir(&format!("/kdist-test-w1/kubepods/besteffort/pod{uid}"));
    assert!(pod_cgroup.is_dir(), "no {}", pod_cgroup.display());
    let logs = common::wait_for(Duration::from_secs(30), || {
        let out = cp.kdist(&["kubectl", "logs", "on-w1"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("hello-from-w1").then_some(text)
    });
    assert!(
        logs.is_some(),
        "{}",
        describe(&cp.kdist(&["kubectl", "logs", "on-w1"]))
    );

    // remove-node deletes the Node and forgets the worker
    let out = cp.ok(&["remove-node", "w1"]);
    assert!(
        out.contains("Kubernetes Node deleted") && out.contains("record forgotten"),
        "{out}"
    );
    let gone = cp.kdist(&["kubectl", "get", "node", "w1"]);
    assert!(
        !gone.status.success() && String::from_utf8_lossy(&gone.stderr).contains("NotFound"),
        "{}",
        describe(&gone)
    );
    let recorded = std::fs::read_to_string(cp.node.path("cluster/nodes.json")).unwrap();
    assert!(!recorded.contains("\"w1\""), "{recorded}");

    // stopping the worker removes its pod cgroups; the control plane's stay
    worker.ok(&["stop", "--timeout", "60"]);
    assert!(
        !cgroup_dir("/kdist-test-w1").exists(),
        "{} left behind",
        cgroup_dir("/kdist-test-w1").display()
    );
    assert!(cgroup_dir("/kdist-test-cp1/kubepods").is_dir());
}
