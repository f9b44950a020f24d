//! Clustering against the real `kdist` binary: join tokens, the cluster agent, the
//! joiner's CA pinning, and worker joins.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::netns::NsNode;
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
    // a single node opens no join port until it has a token. The agent's task makes its
    // first check as the daemon comes up, before the supervisor starts the services;
    // `start` returned once every service was ready, which is later.
    assert!(node.log("kdist").contains("all services ready"));
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
    let out = worker.kdist(&[
        "join",
        &conn(port, &token, &wrong),
        "--worker",
        "--no-start",
    ]);
    assert!(!out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not the pinned")
            && stderr.contains(&fp)
            && stderr.contains("nothing was sent"),
        "{stderr}"
    );
    assert!(!worker.path("cluster/joined.json").exists());
    assert!(
        !worker
            .path("kubelet/pki/kubelet-client-current.pem")
            .exists()
    );
    // the token was never spent: the right pin joins with it (read from stdin, so the
    // token stays out of the process list)
    let mut child = worker
        .command(&["join", "-", "--worker", "--no-start"])
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
    // the refused attempt was over before this join began, and this join's request is
    // logged: one request in the log means the refused attempt never sent one
    assert_eq!(
        join_requests(&cp),
        1,
        "the agent saw a request from the refused join: {}",
        cp.log("kdist")
    );
}

#[test]
fn worker_join_exchanges_certificates_and_never_a_ca_key() {
    let (cp, port) = agent_node("wj");
    let (token, fp, _) = add_node(&cp, &["--worker", "--ttl", "1h"]);
    let worker = joiner("wjw", "w-one");
    let out = worker.kdist_ok(&["join", &conn(port, &token, &fp), "--worker", "--no-start"]);
    assert!(out.contains("worker") && out.contains("w-one"), "{out}");
    // --no-start writes the configuration only
    assert!(out.contains("Run `kdist start`"), "{out}");
    assert!(!worker.path("run/kdist.sock").exists());
    assert!(!worker.path("run/kdist.pid").exists());
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
    let out = worker.kdist(&["join", &conn(port, &token, &fp), "--worker", "--no-start"]);
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
    joiner("own-ok", "not-the-cp").kdist_ok(&[
        "join",
        &conn(port, &token, &fp),
        "--worker",
        "--no-start",
    ]);
    // expired
    let (token, _, _) = add_node(&cp, &["--worker", "--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    refused("expired", conn(port, &token, &fp), "has expired");
    // reused
    let (token, _, _) = add_node(&cp, &["--worker"]);
    joiner("reuse1", "first").kdist_ok(&[
        "join",
        &conn(port, &token, &fp),
        "--worker",
        "--no-start",
    ]);
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
    joiner("cpw2", "w-after").kdist_ok(&[
        "join",
        &conn(port, &token, &fp),
        "--worker",
        "--no-start",
    ]);
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
            j.command(&["join", &connection, "--worker", "--no-start"])
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

/// A TLS client trusting `node`'s CA that presents the certificate and key of `pem`
/// (one file holding both, or `key` apart).
fn client_config_with_cert(node: &Node, pem: &[u8], key: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&std::fs::read(node.certs("ca.crt")).unwrap()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .map(|c| c.unwrap())
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap(),
    )
}

/// `POST path` over TLS with `config`; an error when the connection fails (a client
/// certificate the agent refuses fails the handshake, or the first read in TLS 1.3).
async fn try_post(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    body: String,
) -> Result<(u16, String), String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into()),
            tcp,
        )
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = hyper::Request::post(path)
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).to_string()))
}

fn openssl_out(args: &[&str], file: &std::path::Path) -> String {
    let out = Command::new("openssl")
        .args(args)
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A joined worker renews its kube-proxy and kubelet serving certificates through the
/// agent it joined, proving who it is with the kubelet's current client certificate;
/// the agent refuses connections without one, with another identity, for another node,
/// or under another CA.
#[test]
fn a_worker_renews_its_certificates_through_the_agent_with_its_node_identity_only() {
    let (cp, port) = agent_node("ren");
    let (token, fp, _) = add_node(&cp, &["--worker"]);
    let worker = joiner("renw", "w-ren");
    worker.kdist_ok(&["join", &conn(port, &token, &fp), "--worker", "--no-start"]);
    // the kubelet keeps its client pair in its certificate directory (it renews it
    // there through the CSR API) and its kubeconfig points at the current one
    let current = worker.path("kubelet/pki/kubelet-client-current.pem");
    assert!(std::fs::symlink_metadata(&current).unwrap().is_symlink());
    let kubelet_conf = std::fs::read_to_string(worker.path("kubeconfig/kubelet.conf")).unwrap();
    assert!(
        kubelet_conf.contains(&format!("client-certificate: {}", current.display()))
            && kubelet_conf.contains(&format!("client-key: {}", current.display())),
        "{kubelet_conf}"
    );
    assert!(!worker.certs("kubelet-client.crt").exists());
    let ca = cp.certs("ca.crt");
    let ca_arg = ca.to_str().unwrap();
    let verified = openssl_out(&["verify", "-CAfile", ca_arg], &current);
    assert!(verified.contains(": OK"), "{verified}");
    let subject = openssl_out(&["x509", "-noout", "-subject", "-in"], &current);
    assert!(
        subject.contains("system:node:w-ren") && subject.contains("system:nodes"),
        "{subject}"
    );

    let data = kdist::config::DataDir::new(&worker.root);
    let config = kdist::config::NodeConfig::load(&data).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let renew = || rt.block_on(kdist::cluster::renew_worker(&data, &config));
    // fresh certificates are not due
    assert!(renew().unwrap().is_empty());
    assert!(!cp.log("kdist").contains("node certificates renewed"));
    // unreadable ones are renewed, both, for new keys
    let old_proxy_key = std::fs::read(worker.certs("kube-proxy.key")).unwrap();
    let old_serving_key = std::fs::read(worker.certs("kubelet.key")).unwrap();
    std::fs::write(worker.certs("kube-proxy.crt"), "garbage").unwrap();
    std::fs::write(worker.certs("kubelet.crt"), "garbage").unwrap();
    let services = renew().unwrap_or_else(|e| panic!("{e}\n{}", cp.log("kdist")));
    assert_eq!(services, ["kubelet", "kube-proxy"]);
    assert_ne!(
        std::fs::read(worker.certs("kube-proxy.key")).unwrap(),
        old_proxy_key
    );
    assert_ne!(
        std::fs::read(worker.certs("kubelet.key")).unwrap(),
        old_serving_key
    );
    for (cert, subject) in [
        ("kube-proxy.crt", "CN = system:kube-proxy"),
        ("kubelet.crt", "CN = w-ren"),
    ] {
        let path = worker.certs(cert);
        let verified = openssl_out(&["verify", "-CAfile", ca_arg], &path);
        assert!(verified.contains(": OK"), "{verified}");
        let text = openssl_out(&["x509", "-noout", "-subject", "-in"], &path);
        assert!(text.contains(subject), "{cert}: {text}");
        assert_eq!(
            openssl_out(&["x509", "-noout", "-pubkey", "-in"], &path),
            openssl_out(&["pkey", "-pubout", "-in"], &path.with_extension("key")),
            "{cert} is not for the worker's new key"
        );
    }
    // the serving certificate names the node and the address it came from
    let sans = openssl_out(
        &["x509", "-noout", "-ext", "subjectAltName", "-in"],
        &worker.certs("kubelet.crt"),
    );
    assert!(
        sans.contains("DNS:w-ren") && sans.contains("IP Address:127.0.0.1"),
        "{sans}"
    );
    // kube-proxy's kubeconfig carries the new certificate
    {
        use base64::Engine;
        let conf = std::fs::read_to_string(worker.path("kubeconfig/kube-proxy.conf")).unwrap();
        let new = std::fs::read(worker.certs("kube-proxy.crt")).unwrap();
        let encoded = base64::engine::general_purpose::STANDARD.encode(new);
        assert!(conf.contains(&encoded), "{conf}");
    }
    assert!(cp.log("kdist").contains("node certificates renewed"));
    assert!(renew().unwrap().is_empty(), "renewed twice");

    let body = |name: &str| {
        serde_json::json!({"node_name": name, "kube_proxy_csr": null, "kubelet_serving_csr": null})
            .to_string()
    };
    // no client certificate
    let (status, text) = rt
        .block_on(try_post(
            port,
            client_config(&cp),
            "/v1/renew",
            body("w-ren"),
        ))
        .unwrap();
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("no client certificate"), "{text}");
    // a valid certificate of the cluster CA that is not a node's (kube-proxy's)
    let proxy = client_config_with_cert(
        &cp,
        &std::fs::read(worker.certs("kube-proxy.crt")).unwrap(),
        &std::fs::read(worker.certs("kube-proxy.key")).unwrap(),
    );
    let (status, text) = rt
        .block_on(try_post(port, proxy, "/v1/renew", body("w-ren")))
        .unwrap();
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("is not system:node:<name>"), "{text}");
    // the node's certificate, for another node
    let pair = std::fs::read(&current).unwrap();
    let node = client_config_with_cert(&cp, &pair, &pair);
    let (status, text) = rt
        .block_on(try_post(port, node.clone(), "/v1/renew", body("w-other")))
        .unwrap();
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("node `w-ren`'s"), "{text}");
    // and for itself: an empty request is answered with nothing to sign
    let (status, text) = rt
        .block_on(try_post(port, node, "/v1/renew", body("w-ren")))
        .unwrap();
    assert_eq!(status, 200, "{text}");
    // a node certificate of another CA does not get through the handshake
    let foreign_ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let foreign_ca = ca_params.self_signed(&foreign_ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, foreign_ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "system:node:w-ren");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let forged = params.signed_by(&key, &issuer).unwrap();
    let _ = foreign_ca;
    let config =
        client_config_with_cert(&cp, forged.pem().as_bytes(), key.serialize_pem().as_bytes());
    let refused = rt.block_on(try_post(port, config, "/v1/renew", body("w-ren")));
    assert!(refused.is_err(), "{refused:?}");
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
    // join starts the node and waits for it, as `kdist start` does
    let out = in_ns_ok(lab.ns(i), node, &["join", &connection, "--timeout", "120"]);
    assert!(out.contains("kdist is ready"), "{out}");
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
    let worker = Node::new("wrw");
    // keep the host untouched: no containerd in this test (the join keeps the setting)
    worker.write_config("node_name: w-run\ndisable: [containerd]\n");
    // the join starts the node and ends with its status, as `kdist start` does
    let out = worker.kdist_ok(&[
        "join",
        &conn(port, &token, &fp),
        "--worker",
        "--timeout",
        "90",
    ]);
    assert!(
        out.contains("Starting this node") && out.contains("kdist is ready"),
        "{out}"
    );
    assert!(worker.path("run/kdist.sock").exists(), "{out}");
    let config = std::fs::read_to_string(worker.path("config.yaml")).unwrap();
    assert!(config.contains("containerd"), "{config}");
    let before = std::fs::read(worker.certs("ca.crt")).unwrap();
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
    let out = cp.kdist(&["join", &conn(port, &token, &fp), "--no-start"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("kdist datastore migrate --to etcd"),
        "{stderr}"
    );
    // the refusal did not spend the token: a worker can still use it
    cp.kdist_ok(&["join", &conn(port, &token, &fp), "--worker", "--no-start"]);
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
    let _host = common::exclusive_host();
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
    let cp = NsNode::new(lab.ns(1), "k8cp", &path, &node_config("cp1", 1));
    let worker = NsNode::new(lab.ns(2), "k8w", &worker_path, &node_config("w1", 2));
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
    let joined = Instant::now();
    let out = worker.ok(&["join", &connection, "--worker", "--timeout", "300"]);
    assert!(out.contains("node w1 is Ready"), "{out}");
    eprintln!(
        "control plane start -> node Ready: {cp_ready:?}; worker join -> node Ready: {:?}",
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

/// (name, is_learner) of every member as the real etcdctl sees them.
fn etcdctl_members(node: &Node, port: u16) -> Vec<(String, String, bool)> {
    let out = node.etcdctl(port, &["member", "list", "-w", "json"]);
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or("").to_string(),
                m["peerURLs"][0].as_str().unwrap_or("").to_string(),
                m["isLearner"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

#[test]
fn etcd_membership_goes_through_the_grpc_client_over_mtls() {
    use kdist::cluster::{EtcdClient, block_on};

    let node = Node::new("etcdgrpc");
    let port = node.config_with_etcd_ports("disable: [containerd]\n");
    node.start();
    let data = node.data();
    let config = kdist::config::NodeConfig::load(&data).unwrap();
    let etcd = EtcdClient::new(&data, &config);

    let members = block_on(etcd.members()).unwrap();
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(members[0].name, config.node_name());
    assert!(!members[0].is_learner);

    // a learner that never starts: etcd takes it, and refuses to promote it
    let peer_url = format!("https://127.0.0.1:{}", free_port());
    let initial = block_on(etcd.add_learner("n2", &peer_url)).unwrap();
    assert!(
        initial.starts_with(&format!("{}=https://", config.node_name()))
            && initial.ends_with(&format!(",n2={peer_url}")),
        "{initial}"
    );
    let seen = etcdctl_members(&node, port);
    assert!(
        seen.iter()
            .any(|(_, url, learner)| *url == peer_url && *learner),
        "{seen:?}"
    );
    assert_eq!(
        block_on(etcd.promote_learners()).unwrap(),
        Vec::<String>::new()
    );
    // the same node joining again replaces its stale member
    block_on(etcd.add_learner("n2", &peer_url)).unwrap();
    let learners: Vec<_> = block_on(etcd.members())
        .unwrap()
        .into_iter()
        .filter(|m| m.is_learner)
        .collect();
    assert_eq!(learners.len(), 1, "{learners:?}");
    block_on(etcd.remove(learners[0].id)).unwrap();
    assert_eq!(etcdctl_members(&node, port).len(), 1);

    let client_url = format!("https://127.0.0.1:{port}");
    let closed = format!("https://127.0.0.1:{}", free_port());
    let (up, down) =
        block_on(async { Ok((etcd.healthy(&client_url).await, etcd.healthy(&closed).await)) })
            .unwrap();
    assert!(up && !down, "healthy: {up}, closed port healthy: {down}");

    // without the client certificate etcd refuses the connection
    std::fs::remove_file(data.certs_dir().join("apiserver-etcd-client.key")).unwrap();
    let err = block_on(etcd.members()).unwrap_err().to_string();
    assert!(err.contains("member list"), "{err}");
}

/// The SHA-256 of the first certificate of a PEM file (empty when unreadable).
fn cert_fingerprint(path: &std::path::Path) -> String {
    use sha2::Digest;
    std::fs::read(path)
        .ok()
        .and_then(|pem| CertificateDer::pem_slice_iter(&pem).next())
        .and_then(Result::ok)
        .map(|der| hex::encode(sha2::Sha256::digest(&der)))
        .unwrap_or_default()
}

/// A worker whose certificates live a few minutes (the control plane signs for
/// `certs.leaf_validity: 4m`, its controller-manager too) renews each of them several
/// times: the kubelet's client certificate through CSRs the controller-manager approves
/// and signs, kube-proxy's and the kubelet's serving certificate through the cluster
/// agent. The node stays Ready throughout and its pod keeps running in the same
/// container, never restarted; the kubelet serves its newest certificate.
#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn worker_certificates_of_minutes_renew_while_its_pod_keeps_running() {
    let _host = common::exclusive_host();
    let bin = std::env::var("KDIST_TEST_K8S_BIN").unwrap();
    let path = format!("{bin}:{}", std::env::var("PATH").unwrap_or_default());
    let lab = Lab::new(2);
    let node_config = |name: &str, i: usize| {
        format!(
            "node_name: {name}\nnetwork:\n  egress: none\n  node_ip: 10.203.0.{i}\n  \
             pod_cidr: 10.{i}.0.0/16\nruntime:\n  sandbox_image: kdist.local/test/pause:1\n  \
             cgroup_root: /kdist-renew-{name}\ncerts:\n  leaf_validity: 4m\n  \
             renewal_window: 90s\n  check_interval: 10s\naddons:\n  dns:\n    enabled: false\n"
        )
    };
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
    let cp = NsNode::new(lab.ns(1), "k8rcp", &path, &node_config("cp1", 1));
    let worker = NsNode::new(lab.ns(2), "k8rw", &worker_path, &node_config("w1", 2));
    cp.ok(&["start", "--timeout", "300"]);
    let v: serde_json::Value =
        serde_json::from_str(&cp.ok(&["add-node", "--worker", "-o", "json"])).unwrap();
    let connection = format!(
        "10.203.0.1:25000/{}/{}",
        v["token"].as_str().unwrap(),
        v["ca_sha256"].as_str().unwrap()
    );
    let out = worker.ok(&["join", &connection, "--worker", "--timeout", "300"]);
    assert!(out.contains("node w1 is Ready"), "{out}");
    // the kubelet says why it would touch a pod (sandbox decisions are at level 2)
    let args = worker.node.path("args/kubelet");
    let mut text = std::fs::read_to_string(&args).unwrap();
    text.push_str("--v=2\n");
    std::fs::write(&args, text).unwrap();
    worker.ok(&["restart", "kubelet"]);

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
        worker.ok(&["images", "import", archive.to_str().unwrap()]);
    }
    let manifest = cp.node.path("on-w1.yaml");
    std::fs::write(&manifest, ON_WORKER).unwrap();
    cp.ok(&["kubectl", "apply", "-f", manifest.to_str().unwrap()]);
    let running = cp.kdist(&[
        "kubectl",
        "wait",
        "--for=jsonpath={.status.phase}=Running",
        "pod/on-w1",
        "--timeout=180s",
    ]);
    assert!(
        running.status.success(),
        "{}\n--- w1 kubelet.log\n{}",
        describe(&running),
        worker.node.log("kubelet")
    );
    // read through the control plane, retried over its own certificate restarts
    let get = |args: &[&str]| -> String {
        common::wait_for(Duration::from_secs(60), || {
            let out = cp.kdist(args);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .unwrap_or_else(|| panic!("kdist {args:?} kept failing"))
    };
    let pod_state = || {
        get(&[
            "kubectl",
            "get",
            "pod",
            "on-w1",
            "-o",
            "jsonpath={.metadata.uid} {.status.containerStatuses[0].containerID} \
             {.status.containerStatuses[0].restartCount} {.status.phase}",
        ])
    };
    let ready_since = || {
        get(&[
            "kubectl",
            "get",
            "node",
            "w1",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} \
             {.status.conditions[?(@.type==\"Ready\")].lastTransitionTime}",
        ])
    };
    let pod_before = pod_state();
    assert!(pod_before.ends_with(" 0 Running"), "{pod_before}");
    let ready_before = ready_since();
    assert!(ready_before.starts_with("True "), "{ready_before}");

    // watch the worker's three certificates change, several times each
    let files = [
        (
            "kubelet client",
            worker.node.path("kubelet/pki/kubelet-client-current.pem"),
        ),
        ("kube-proxy", worker.node.certs("kube-proxy.crt")),
        ("kubelet serving", worker.node.certs("kubelet.crt")),
    ];
    let mut seen: Vec<std::collections::BTreeSet<String>> = files
        .iter()
        .map(|(_, path)| std::iter::once(cert_fingerprint(path)).collect())
        .collect();
    let started = Instant::now();
    let enough = common::wait_until(Duration::from_secs(900), Duration::from_secs(5), || {
        for (i, (_, path)) in files.iter().enumerate() {
            let fp = cert_fingerprint(path);
            if !fp.is_empty() {
                seen[i].insert(fp);
            }
        }
        // three certificates each: two renewals
        seen.iter().all(|s| s.len() >= 3)
    });
    let counts: Vec<(&str, usize)> = files
        .iter()
        .zip(&seen)
        .map(|((what, _), s)| (*what, s.len()))
        .collect();
    assert!(
        enough,
        "certificates seen in {:?}: {counts:?}\n--- w1 kdist.log\n{}\n--- w1 kubelet.log (tail)\n{}",
        started.elapsed(),
        worker.node.log("kdist"),
        worker
            .node
            .log("kubelet")
            .lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "worker certificates seen in {:?}: {counts:?}",
        started.elapsed()
    );

    // every certificate on the worker is the cluster CA's and still valid
    let ca = cp.node.certs("ca.crt");
    for (what, path) in &files {
        let out = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(&ca)
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{what}: {}", describe(&out));
    }
    // the kubelet client certificates came from approved CSRs of the node itself
    let csrs = get(&[
        "kubectl",
        "get",
        "csr",
        "-o",
        "jsonpath={range .items[*]}{.spec.username} {.spec.signerName} \
         {.status.conditions[0].type}{\"\\n\"}{end}",
    ]);
    let approved = csrs
        .lines()
        .filter(|l| *l == "system:node:w1 kubernetes.io/kube-apiserver-client-kubelet Approved")
        .count();
    assert!(approved >= 2, "{csrs}");
    assert!(!csrs.contains("Denied"), "{csrs}");
    // the node never left Ready, the pod is the same container, never restarted
    let ready_after = ready_since();
    if ready_after != ready_before {
        let kubelet_log = worker.node.log("kubelet");
        let lines: Vec<&str> = kubelet_log
            .lines()
            .filter(|l| {
                l.contains("NotReady") || l.contains("not ready") || l.contains("Node became")
            })
            .collect();
        panic!(
            "w1's Ready condition changed: {ready_before} -> {ready_after}\n{}\n--- w1 kubelet.log (readiness lines)\n{}",
            get(&[
                "kubectl",
                "get",
                "node",
                "w1",
                "-o",
                "jsonpath={.status.conditions}"
            ]),
            lines.join("\n")
        );
    }
    let pod_after = pod_state();
    if pod_after != pod_before {
        let kubelet_log = worker.node.log("kubelet");
        let lines: Vec<&str> = kubelet_log
            .lines()
            .filter(|l| {
                (l.contains("on-w1") || l.contains("Killing") || l.contains("andbox"))
                    && !l.contains("volume")
            })
            .collect();
        let containerd_log = worker.node.log("containerd");
        let runtime: Vec<&str> = containerd_log
            .lines()
            .filter(|l| l.contains("PodSandbox") || l.contains("StopContainer"))
            .collect();
        panic!(
            "the pod changed: {pod_before} -> {pod_after}\n{}\n--- w1 kubelet.log (pod lines)\n{}\n--- w1 containerd.log (sandboxes)\n{}\n--- w1 kdist.log\n{}",
            String::from_utf8_lossy(
                &cp.kdist(&["kubectl", "get", "pod", "on-w1", "-o", "yaml"])
                    .stdout
            ),
            lines.join("\n"),
            runtime.join("\n"),
            worker.node.log("kdist")
        );
    }
    // the kubelet serves its newest certificate (it was restarted to load it) and the
    // apiserver still reaches it
    let served = common::wait_for(Duration::from_secs(60), || {
        let out = cp.inside(
            "openssl",
            &["s_client", "-connect", "10.203.0.2:10250", "-showcerts"],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let pem: String = text
            .split_inclusive('\n')
            .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
            .scan(false, |done, l| {
                if *done {
                    return None;
                }
                *done = l.starts_with("-----END CERTIFICATE-----");
                Some(l.to_string())
            })
            .collect();
        let served = CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .map(|der| {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(&der))
            })?;
        (served == cert_fingerprint(&worker.node.certs("kubelet.crt"))).then_some(served)
    });
    assert!(served.is_some(), "the kubelet serves an old certificate");
    // exec goes from the apiserver to the kubelet's renewed serving certificate; logs
    // would too, but both test kubelets share this host's /var/log/pods and each one's
    // garbage collection removes the other's pod log directories within minutes
    let exec = ["kubectl", "exec", "on-w1", "--", "echo", "exec-on-w1"];
    let answered = common::wait_for(Duration::from_secs(60), || {
        let out = cp.kdist(&exec);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("exec-on-w1").then_some(text)
    });
    assert!(answered.is_some(), "{}", describe(&cp.kdist(&exec)));
    let log = worker.node.log("kdist");
    assert!(
        log.contains("kube-proxy certificate renewed")
            && log.contains("kubelet serving certificate renewed")
            && !log.contains("worker certificate renewal failed"),
        "{log}"
    );
    worker.ok(&["stop", "--timeout", "60"]);
}
