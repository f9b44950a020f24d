//! The embedded datastore on TCP with TLS from kdist's PKI: `kdist datastore serve
//! --listen https://...` and the daemon's `embedded: listen:`. Real peers: Debian's
//! etcdctl and the `etcd-client` crate. A client certificate of the etcd CA is required;
//! none, or one of another CA, is refused.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// etcdctl over https with whatever TLS flags are given; short timeouts so refusals
/// show quickly.
fn etcdctl_tls(port: u16, tls: &[String], args: &[&str]) -> Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=https://127.0.0.1:{port}"))
        .args(["--dial-timeout=3s", "--command-timeout=5s"])
        .args(tls)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run etcdctl")
}

fn flags(certs: &Path, client: Option<&str>) -> Vec<String> {
    let mut out = vec![format!("--cacert={}", certs.join("etcd/ca.crt").display())];
    if let Some(name) = client {
        out.push(format!(
            "--cert={}",
            certs.join(format!("{name}.crt")).display()
        ));
        out.push(format!(
            "--key={}",
            certs.join(format!("{name}.key")).display()
        ));
    }
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// etcdctl TLS flags with a client certificate from an openssl-made CA that copies the
/// names of kdist's etcd CA and of the apiserver's etcd client.
fn fake_client(dir: &Path) -> Vec<String> {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", describe(&out));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"],
        &ec[..],
        &["-keyout", "fake-ca.key", "-out", "fake-ca.crt"],
        &["-subj", "/CN=etcd-ca", "-days", "1"],
    ]
    .concat());
    run(&[
        &["req"],
        &ec[..],
        &["-keyout", "fake.key", "-out", "fake.csr"],
        &["-subj", "/CN=kube-apiserver-etcd-client"],
    ]
    .concat());
    std::fs::write(dir.join("fake.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "fake.csr",
        "-CA",
        "fake-ca.crt",
        "-CAkey",
        "fake-ca.key",
        "-CAcreateserial",
        "-out",
        "fake.crt",
        "-days",
        "1",
        "-extfile",
        "fake.ext",
    ]);
    vec![
        format!("--cacert={}", dir.join("certs/etcd/ca.crt").display()),
        format!("--cert={}", dir.join("fake.crt").display()),
        format!("--key={}", dir.join("fake.key").display()),
    ]
}

/// The serial of the certificate the server on `port` presents (openssl s_client).
fn served_serial(port: u16, certs: &Path) -> String {
    let shown = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .arg("-CAfile")
        .arg(certs.join("etcd/ca.crt"))
        .arg("-cert")
        .arg(certs.join("apiserver-etcd-client.crt"))
        .arg("-key")
        .arg(certs.join("apiserver-etcd-client.key"))
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client");
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl x509");
    use std::io::Write;
    x509.stdin
        .take()
        .expect("stdin")
        .write_all(&shown.stdout)
        .expect("write");
    let out = x509.wait_with_output().expect("openssl x509");
    assert!(out.status.success(), "{}", describe(&shown));
    stdout(&out).trim().to_string()
}

fn file_serial(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert)
        .output()
        .expect("openssl x509");
    stdout(&out).trim().to_string()
}

struct Served {
    proc: Proc,
    port: u16,
    certs: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// `kdist certs init` in a fresh data dir, then `kdist datastore serve` on an https port.
fn serve_https() -> Served {
    let dir = temp_dir("kdist-dstls");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("data dir");
    std::fs::write(data.join("config.yaml"), OFFLINE).expect("config");
    let (ok, _, err) = kdist(&["--data-dir", &data.to_string_lossy(), "certs", "init"]);
    assert!(ok, "certs init: {err}");
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("serve.log")).expect("log");
    let proc = Proc::spawn(
        Command::new(KDIST)
            .arg("--data-dir")
            .arg(&data)
            .args(["datastore", "serve", "--db"])
            .arg(dir.path().join("state.db"))
            .arg("--listen")
            .arg(format!("unix://{}", dir.path().join("ds.sock").display()))
            .arg("--listen")
            .arg(format!("https://127.0.0.1:{port}"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log),
    );
    let up = poll_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(
        up,
        "serve did not come up: {}",
        std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default()
    );
    Served {
        proc,
        port,
        certs: data.join("certs"),
        _dir: dir,
    }
}

#[test]
fn etcdctl_needs_a_client_cert_of_the_etcd_ca() {
    let mut s = serve_https();
    let good = flags(&s.certs, Some("apiserver-etcd-client"));
    let put = etcdctl_tls(s.port, &good, &["put", "/tls/k", "v1"]);
    assert!(put.status.success(), "{}", describe(&put));
    let get = etcdctl_tls(s.port, &good, &["get", "/tls/k", "--print-value-only"]);
    assert_eq!(stdout(&get).trim(), "v1", "{}", describe(&get));
    // the healthcheck client is of the same CA
    let hc = flags(&s.certs, Some("etcd/healthcheck-client"));
    let get = etcdctl_tls(s.port, &hc, &["get", "/tls/k", "--print-value-only"]);
    assert_eq!(stdout(&get).trim(), "v1", "{}", describe(&get));

    // no client certificate
    let none = etcdctl_tls(s.port, &flags(&s.certs, None), &["get", "/tls/k"]);
    assert!(!none.status.success(), "{}", describe(&none));
    assert!(!stdout(&none).contains("v1"));
    // a client certificate of another CA (the cluster CA's admin)
    let other = etcdctl_tls(s.port, &flags(&s.certs, Some("admin")), &["get", "/tls/k"]);
    assert!(!other.status.success(), "{}", describe(&other));
    assert!(!stdout(&other).contains("v1"));
    // a look-alike: same CA name and client CN, made with openssl, not kdist's key
    let fake = fake_client(s.certs.parent().expect("data dir"));
    let out = etcdctl_tls(s.port, &fake, &["get", "/tls/k"]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(!stdout(&out).contains("v1"));
    // plaintext on the TLS port
    let (ok, out, _) = etcdctl_stdin(
        &format!("http://127.0.0.1:{}", s.port),
        &["--dial-timeout=3s", "--command-timeout=5s", "get", "/tls/k"],
        None,
    );
    assert!(!ok && !out.contains("v1"));

    // the server still serves good clients after the refusals
    let get = etcdctl_tls(s.port, &good, &["get", "/tls/k", "--print-value-only"]);
    assert_eq!(stdout(&get).trim(), "v1");

    // kdist's own client: the data dir's etcd CA and healthcheck client by default
    let data = s
        .certs
        .parent()
        .expect("data dir")
        .to_string_lossy()
        .to_string();
    let endpoint = format!("https://127.0.0.1:{}", s.port);
    let (ok, out, err) = kdist(&[
        "--data-dir",
        &data,
        "datastore",
        "status",
        "--endpoint",
        &endpoint,
        "-o",
        "json",
    ]);
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(status["keys"], 1, "{status}");
    assert_eq!(status["revision"], 2, "{status}");
    let admin = s.certs.join("admin");
    let (ok, _, err) = kdist(&[
        "--data-dir",
        &data,
        "datastore",
        "status",
        "--endpoint",
        &endpoint,
        "--cert",
        &format!("{}.crt", admin.display()),
        "--key",
        &format!("{}.key", admin.display()),
    ]);
    assert!(!ok, "a client certificate of another CA was accepted");
    assert!(err.contains(&endpoint), "{err}");

    // a renewed serving certificate is presented without a restart
    let before = served_serial(s.port, &s.certs);
    assert_eq!(before, file_serial(&s.certs.join("etcd/server.crt")));
    let (ok, _, err) = kdist(&["--data-dir", &data, "certs", "renew", "etcd/server"]);
    assert!(ok, "{err}");
    let renewed = file_serial(&s.certs.join("etcd/server.crt"));
    assert_ne!(renewed, before);
    assert_eq!(served_serial(s.port, &s.certs), renewed);
    let get = etcdctl_tls(s.port, &good, &["get", "/tls/k", "--print-value-only"]);
    assert_eq!(stdout(&get).trim(), "v1");
    assert!(s.proc.terminate().success());
}

#[test]
fn etcd_client_crate_over_tls() {
    use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions, WatchOptions};
    let mut s = serve_https();
    let read = |name: &str| std::fs::read(s.certs.join(name)).expect("read cert");
    let endpoint = format!("https://127.0.0.1:{}", s.port);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read("etcd/ca.crt")))
            .identity(Identity::from_pem(
                read("apiserver-etcd-client.crt"),
                read("apiserver-etcd-client.key"),
            ));
        let mut client = Client::connect(
            [endpoint.as_str()],
            Some(ConnectOptions::new().with_tls(tls)),
        )
        .await
        .expect("connect over TLS");
        let mut events = client
            .watch("/crate/", Some(WatchOptions::new().with_prefix()))
            .await
            .expect("watch");
        // The watch exists on the server once its created response is here: a put before
        // that may land before the watch and rightly never be delivered to it.
        let created = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("created response in time")
            .expect("watch stream")
            .expect("created response");
        assert!(created.created());
        client.put("/crate/a", "1", None).await.expect("put");
        let got = client.get("/crate/a", None).await.expect("get");
        assert_eq!(got.kvs()[0].value(), b"1");
        let event = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let resp = events
                    .message()
                    .await
                    .expect("watch stream")
                    .expect("event");
                if let Some(e) = resp.events().first() {
                    return e.kv().expect("kv").key().to_vec();
                }
            }
        })
        .await
        .expect("watch event in time");
        assert_eq!(event, b"/crate/a");

        // without a client certificate the connection or the first call fails
        let tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read("etcd/ca.crt")));
        let options = ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(3));
        let refused = match Client::connect([endpoint.as_str()], Some(options)).await {
            Err(_) => true,
            Ok(mut c) => c.get("/crate/a", None).await.is_err(),
        };
        assert!(refused, "a client without a certificate was served");
    });
    assert!(s.proc.terminate().success());
}

#[test]
fn serve_refuses_an_address_the_certificate_does_not_name() {
    let s = serve_https();
    let data = s.certs.parent().expect("data dir").to_path_buf();
    let port = free_port();
    let out = Command::new(KDIST)
        .arg("--data-dir")
        .arg(&data)
        .args(["datastore", "serve", "--db"])
        .arg(data.join("other.db"))
        .arg("--listen")
        .arg(format!("https://127.0.0.2:{port}"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not name 127.0.0.2") && err.contains("embedded: listen:"),
        "{err}"
    );
}

#[test]
fn daemon_serves_embedded_listen_with_mtls() {
    let node = Node::new("dstls");
    let (port, other) = (free_port(), free_port());
    // 127.0.0.9 is in no default certificate: the daemon adds it to etcd/server
    node.write_config(&format!(
        "embedded:\n  listen: [\"https://127.0.0.1:{port}\", \"https://127.0.0.9:{other}\"]\n"
    ));
    node.kdist_ok(&["start", "--timeout", "60"]);
    let put = node.etcdctl(port, &["put", "/daemon/k", "v"]);
    assert!(put.status.success(), "{}", describe(&put));
    let get = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=https://127.0.0.9:{other}"))
        .args(flags(&node.path("certs"), Some("apiserver-etcd-client")))
        .args(["get", "/daemon/k", "--print-value-only"])
        .output()
        .expect("etcdctl");
    assert_eq!(stdout(&get).trim(), "v", "{}", describe(&get));
    // the same data as on the unix socket kube-apiserver uses
    let unix = node
        .etcdctl_unix()
        .args(["get", "/daemon/k", "--print-value-only"])
        .output()
        .expect("etcdctl");
    assert_eq!(stdout(&unix).trim(), "v");
    let members = node.etcdctl(port, &["member", "list"]);
    assert!(
        stdout(&members).contains(&format!("https://127.0.0.1:{port}")),
        "{}",
        describe(&members)
    );
    let none = etcdctl_tls(
        port,
        &flags(&node.path("certs"), None),
        &["get", "/daemon/k"],
    );
    assert!(!none.status.success(), "{}", describe(&none));
    node.kdist_ok(&["stop"]);
}
