//! `kdist components` against a test EKS-D mirror on 127.0.0.1: real manifests, real
//! tar.gz archives and real digests made here, served by a small hyper server that can
//! fail, truncate or stall on purpose.

// a test crate: a failed unwrap is a failed test
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Request, Response, StatusCode};
use sha2::{Digest, Sha256, Sha512};
use tokio_util::sync::CancellationToken;

const KDIST: &str = env!("CARGO_BIN_EXE_kdist");
const OFFICIAL: &str = "https://distro.eks.amazonaws.com";
const CHANNEL: &str = "1-31";

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn other_arch() -> &'static str {
    if arch() == "amd64" { "arm64" } else { "amd64" }
}

// ---------------------------------------------------------------------------------
// test mirror

#[derive(Clone, Copy, Debug)]
enum Mode {
    Normal,
    /// Answer this status for the next n requests.
    Status(u16, u32),
    /// Promise the whole file but send half and close, for the next n requests.
    Truncate(u32),
    /// Send the first `bytes` then hang (until the client goes away).
    Stall(usize),
}

struct Served {
    body: Bytes,
    mode: Mode,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Served>,
    /// (path, Range header) of every request.
    log: Vec<(String, Option<String>)>,
}

struct Mirror {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mirror {
    fn start() -> Self {
        let state = Arc::new(Mutex::new(State::default()));
        let stop = CancellationToken::new();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (st, token) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (stream, _) = tokio::select! {
                        _ = token.cancelled() => return,
                        r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    };
                    let st = st.clone();
                    let token = token.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let st = st.clone();
                            async move { Ok::<_, Infallible>(handle(&st, req)) }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                        tokio::select! {
                            _ = conn => {}
                            _ = token.cancelled() => {}
                        }
                    });
                }
            });
        });
        Self {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn put(&self, path: &str, body: impl Into<Bytes>) {
        self.state.lock().unwrap().files.insert(
            path.to_string(),
            Served {
                body: body.into(),
                mode: Mode::Normal,
            },
        );
    }

    fn set_mode(&self, path: &str, mode: Mode) {
        self.state
            .lock()
            .unwrap()
            .files
            .get_mut(path)
            .unwrap_or_else(|| panic!("{path} is not served"))
            .mode = mode;
    }

    fn requests(&self, path: &str) -> Vec<Option<String>> {
        self.state
            .lock()
            .unwrap()
            .log
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, r)| r.clone())
            .collect()
    }

    fn total_requests(&self) -> usize {
        self.state.lock().unwrap().log.len()
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn handle(state: &Mutex<State>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let range = req
        .headers()
        .get(hyper::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut state = state.lock().unwrap();
    state.log.push((path.clone(), range.clone()));
    let Some(served) = state.files.get_mut(&path) else {
        return plain(StatusCode::NOT_FOUND, "not found");
    };
    let body = served.body.clone();
    let mode = served.mode;
    match mode {
        Mode::Status(code, n) => {
            if n > 0 {
                served.mode = Mode::Status(code, n - 1);
                return plain(StatusCode::from_u16(code).unwrap(), "injected failure");
            }
            served.mode = Mode::Normal;
        }
        Mode::Truncate(n) if n > 0 => {
            served.mode = Mode::Truncate(n - 1);
            let half = body.slice(..body.len() / 2);
            let stream = futures::stream::once(async move { Ok(Frame::data(half)) });
            return Response::builder()
                .header("content-length", body.len())
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap();
        }
        Mode::Stall(bytes) => {
            let first = body.slice(..bytes.min(body.len()));
            let stream = futures::stream::once(async move { Ok(Frame::data(first)) })
                .chain(futures::stream::pending());
            return Response::builder()
                .header("content-length", body.len())
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap();
        }
        _ => {}
    }
    if let Some(start) = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok())
    {
        if start >= body.len() {
            return plain(StatusCode::RANGE_NOT_SATISFIABLE, "");
        }
        return Response::builder()
            .status(StatusCode::PARTIAL_CONTENT)
            .header(
                "content-range",
                format!("bytes {start}-{}/{}", body.len() - 1, body.len()),
            )
            .body(Full::new(body.slice(start..)).boxed())
            .unwrap();
    }
    Response::new(Full::new(body).boxed())
}

use futures::StreamExt;

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(text.as_bytes())).boxed())
        .unwrap()
}

// ---------------------------------------------------------------------------------
// a release made here

struct Artifact {
    /// path under the official base, e.g. /kubernetes-1-31/releases/2/artifacts/...
    path: String,
    bytes: Vec<u8>,
    /// digests to write into the manifest (the real ones unless a test lies)
    sha256: String,
    sha512: String,
}

struct Fixture {
    number: u32,
    kube_version: String,
    etcd_version: String,
    cni_version: String,
    /// asset name -> artifact, for the manifest
    kube: Vec<(String, Artifact)>,
    etcd: Artifact,
    cni: Artifact,
    arch: String,
}

fn digests(bytes: &[u8]) -> (String, String) {
    (
        hex::encode(Sha256::digest(bytes)),
        hex::encode(Sha512::digest(bytes)),
    )
}

fn artifact(path: String, bytes: Vec<u8>) -> Artifact {
    let (sha256, sha512) = digests(&bytes);
    Artifact {
        path,
        bytes,
        sha256,
        sha512,
    }
}

fn tar_gz(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, data, mode) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(*mode);
        header.set_cksum();
        tar.append_data(&mut header, name, *data).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

/// A fake binary: a shell script that prints a version, padded to `size` bytes.
fn script(name: &str, version: &str, number: u32, size: usize) -> Vec<u8> {
    let mut s =
        format!("#!/bin/sh\n# {name} of test release {number}\necho \"{name} {version}\"\n")
            .into_bytes();
    let mut filler = 0u8;
    while s.len() < size {
        s.push(b'#');
        s.extend_from_slice(format!("{filler:03}").as_bytes());
        s.push(b'\n');
        filler = filler.wrapping_add(7);
    }
    s
}

impl Fixture {
    fn new(number: u32, arch: &str) -> Self {
        let kube_version = format!("v1.31.{}", number + 1);
        let etcd_version = "v3.5.16".to_string();
        let cni_version = "v1.6.0".to_string();
        let base = format!("/kubernetes-{CHANNEL}/releases/{number}/artifacts");
        let kube = [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubelet",
            "kube-proxy",
            "kubectl",
        ]
        .iter()
        .map(|bin| {
            // kube-apiserver is big enough for a download to be caught half way
            let size = if *bin == "kube-apiserver" {
                4 << 20
            } else {
                2000
            };
            (
                format!("bin/linux/{arch}/{bin}"),
                artifact(
                    format!("{base}/kubernetes/{kube_version}/bin/linux/{arch}/{bin}"),
                    script(bin, &kube_version, number, size),
                ),
            )
        })
        .collect();
        // etcd runs the host's real etcd, so `kdist start` can be tested with it
        let etcd_script =
            format!("#!/bin/sh\n# etcd of test release {number}\nexec /usr/bin/etcd \"$@\"\n");
        let dir = format!("etcd-{etcd_version}-linux-{arch}");
        let etcd = tar_gz(&[
            (&format!("{dir}/etcd"), etcd_script.as_bytes(), 0o755),
            (
                &format!("{dir}/etcdctl"),
                &script("etcdctl", &etcd_version, number, 500),
                0o755,
            ),
            (&format!("{dir}/README.md"), b"etcd readme\n", 0o644),
        ]);
        let cni_files: Vec<(String, Vec<u8>)> = [
            "bridge",
            "host-local",
            "loopback",
            "portmap",
            "bandwidth",
            "vlan",
        ]
        .iter()
        .map(|n| (format!("./{n}"), script(n, &cni_version, number, 300)))
        .collect();
        let mut cni_entries: Vec<(&str, &[u8], u32)> = cni_files
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice(), 0o755))
            .collect();
        cni_entries.push(("./LICENSE", b"license\n", 0o644));
        let cni = tar_gz(&cni_entries);
        Self {
            number,
            etcd: artifact(
                format!("{base}/etcd/{etcd_version}/etcd-linux-{arch}-{etcd_version}.tar.gz"),
                etcd,
            ),
            cni: artifact(
                format!(
                    "{base}/plugins/{cni_version}/cni-plugins-linux-{arch}-{cni_version}.tar.gz"
                ),
                cni,
            ),
            kube,
            kube_version,
            etcd_version,
            cni_version,
            arch: arch.to_string(),
        }
    }

    fn kube_path(&self, bin: &str) -> String {
        self.kube
            .iter()
            .find(|(name, _)| name.ends_with(&format!("/{bin}")))
            .map(|(_, a)| a.path.clone())
            .unwrap()
    }

    fn kube_bytes(&self, bin: &str) -> &[u8] {
        &self
            .kube
            .iter()
            .find(|(name, _)| name.ends_with(&format!("/{bin}")))
            .unwrap()
            .1
            .bytes
    }

    fn lie(&mut self, bin: &str, sha256: Option<String>, sha512: Option<String>) {
        let a = &mut self
            .kube
            .iter_mut()
            .find(|(name, _)| name.ends_with(&format!("/{bin}")))
            .unwrap()
            .1;
        if let Some(s) = sha256 {
            a.sha256 = s;
        }
        if let Some(s) = sha512 {
            a.sha512 = s;
        }
    }

    fn manifest(&self) -> String {
        let asset = |name: &str, a: &Artifact| {
            format!(
                "    - arch:\n      - {arch}\n      archive:\n        sha256: {}\n        sha512: {}\n        uri: {OFFICIAL}{}\n      description: {name} for linux/{arch}\n      name: {name}\n      os: linux\n      type: Archive\n",
                a.sha256,
                a.sha512,
                a.path,
                arch = self.arch
            )
        };
        let image = |name: &str| {
            format!(
                "    - arch:\n      - amd64\n      - arm64\n      description: {name} container image\n      image:\n        uri: public.ecr.aws/eks-distro/test/{name}:x\n      name: {name}-image\n      os: linux\n      type: Image\n"
            )
        };
        let mut m = format!(
            "apiVersion: distro.eks.amazonaws.com/v1alpha1\nkind: Release\nmetadata:\n  name: kubernetes-{CHANNEL}-eks-{n}\nspec:\n  channel: {CHANNEL}\n  number: {n}\nstatus:\n  date: \"2025-01-01T00:00:00Z\"\n  components:\n",
            n = self.number
        );
        m += "  - assets:\n";
        m += &asset(self.etcd.path.rsplit('/').next().unwrap(), &self.etcd);
        m += &image("etcd");
        m += &format!("    gitTag: {}\n    name: etcd\n", self.etcd_version);
        m += "  - assets:\n";
        m += &asset(self.cni.path.rsplit('/').next().unwrap(), &self.cni);
        m += &format!("    gitTag: {}\n    name: cni-plugins\n", self.cni_version);
        m += "  - assets:\n";
        for (name, a) in &self.kube {
            m += &asset(name, a);
        }
        m += &image("kube-apiserver");
        m += &format!("    gitTag: {}\n    name: kubernetes\n", self.kube_version);
        m
    }

    fn manifest_path(&self) -> String {
        format!(
            "/kubernetes-{CHANNEL}/kubernetes-{CHANNEL}-eks-{}.yaml",
            self.number
        )
    }

    fn serve(&self, mirror: &Mirror) {
        mirror.put(&self.manifest_path(), self.manifest());
        for (_, a) in &self.kube {
            mirror.put(&a.path, a.bytes.clone());
        }
        mirror.put(&self.etcd.path, self.etcd.bytes.clone());
        mirror.put(&self.cni.path, self.cni.bytes.clone());
    }
}

fn serve_channel(mirror: &Mirror, latest: u32) {
    mirror.put(
        &format!("/releasechannels/{CHANNEL}.yaml"),
        format!(
            "apiVersion: distro.eks.amazonaws.com/v1alpha1\nkind: ReleaseChannel\nmetadata:\n  name: {CHANNEL}\nspec:\n  snsTopicARN: arn:aws:sns:us-east-1:000000000000:test\nstatus:\n  active: true\n  latestRelease: {latest}\n"
        ),
    );
}

// ---------------------------------------------------------------------------------
// helpers

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "kdist-components-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn kdist(data: &Path, args: &[&str]) -> Output {
    Command::new(KDIST)
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("KDIST_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn install(data: &Path, mirror: &Mirror, extra: &[&str]) -> Output {
    let base = mirror.base();
    let mut args = vec![
        "components",
        "install",
        "--base-url",
        &base,
        "--channel",
        CHANNEL,
        "--retries",
        "3",
    ];
    args.extend_from_slice(extra);
    kdist(data, &args)
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "{}", text(&out));
    out
}

fn failed(out: Output) -> String {
    assert!(!out.status.success(), "expected a failure: {}", text(&out));
    text(&out)
}

fn active(data: &Path) -> Option<String> {
    std::fs::read_link(data.join("components/current"))
        .ok()
        .map(|p| p.display().to_string())
}

fn release_dirs(data: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(data.join("components"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                // `channels/` keeps fetched channel documents, not a release
                .filter(|n| !n.starts_with('.') && n != "current" && n != "channels")
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every file under `dir` (relative path -> bytes).
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

// ---------------------------------------------------------------------------------
// tests

#[test]
fn happy_path_installs_latest_verified_and_lists_it() {
    let mirror = Mirror::start();
    let release = Fixture::new(2, arch());
    release.serve(&mirror);
    serve_channel(&mirror, 2);
    let data = TempDir::new("happy");

    let out = ok(install(data.path(), &mirror, &["--release", "latest"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("installed EKS-D kubernetes-1-31-eks-2"),
        "{}",
        text(&out)
    );
    // not a terminal: plain progress lines, one per file at least
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("kube-apiserver: downloading"), "{stderr}");
    assert!(stderr.contains("verified sha256+sha512"), "{stderr}");

    assert_eq!(active(data.path()).as_deref(), Some("1-31-2"));
    // the channel's document is kept as published, for the cluster's ReleaseChannel
    let kept = std::fs::read_to_string(
        data.path()
            .join(format!("components/channels/{CHANNEL}.yaml")),
    )
    .unwrap();
    assert!(
        kept.contains("latestRelease: 2") && kept.contains("snsTopicARN"),
        "{kept}"
    );
    let current = data.path().join("components/current");
    for bin in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kube-proxy",
        "kubectl",
    ] {
        let path = current.join("bin").join(bin);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            release.kube_bytes(bin),
            "{bin}"
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o755, "{bin}");
    }
    let etcd = std::fs::read_to_string(current.join("bin/etcd")).unwrap();
    assert!(etcd.contains("exec /usr/bin/etcd"), "{etcd}");
    assert!(current.join("bin/etcdctl").is_file());
    assert!(
        !current.join("bin/README.md").exists(),
        "only the wanted files are extracted"
    );
    for plugin in ["bridge", "host-local", "loopback", "portmap", "bandwidth"] {
        assert!(current.join("cni").join(plugin).is_file(), "{plugin}");
    }
    assert!(
        !current.join("cni/vlan").exists(),
        "unneeded plugins are left out"
    );
    assert!(!current.join("cni/LICENSE").exists());
    assert!(current.join("manifest.yaml").is_file());
    assert!(
        !data.path().join("components/.staging-1-31-2").exists(),
        "staging is removed after install"
    );

    // an installed binary runs (it is the test's script)
    let run = Command::new(current.join("bin/kubelet")).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        "kubelet v1.31.3"
    );

    let list = ok(kdist(data.path(), &["components", "list", "-o", "json"]));
    let json: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(json["active"], "1-31-2");
    assert_eq!(json["releases"][0]["name"], "kubernetes-1-31-eks-2");
    assert_eq!(json["releases"][0]["active"], true);
    let apiserver = json["binaries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "kube-apiserver")
        .unwrap();
    assert_eq!(apiserver["version"], "v1.31.3");
    assert_eq!(apiserver["origin"], "components 1-31-2");

    let table = ok(kdist(data.path(), &["components", "list"]));
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("*  1-31-2"), "{table}");
    assert!(table.contains("v3.5.16"), "{table}");

    let version = ok(kdist(data.path(), &["version", "-o", "json"]));
    let json: serde_json::Value = serde_json::from_slice(&version.stdout).unwrap();
    assert_eq!(json["kdist"], env!("CARGO_PKG_VERSION"));
    let etcd = json["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "etcd")
        .unwrap();
    assert_eq!(etcd["version"], "v3.5.16");
    assert_eq!(etcd["origin"], "components 1-31-2");

    ok(kdist(data.path(), &["components", "verify"]));
    // a changed byte on disk is found by verify
    let victim = data.path().join("components/1-31-2/cni/bridge");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&victim)
        .unwrap();
    f.write_all(b"x").unwrap();
    let err = failed(kdist(data.path(), &["components", "verify"]));
    assert!(
        err.contains("cni/bridge") && err.contains("sha256"),
        "{err}"
    );
}

#[test]
fn reinstall_is_a_no_op() {
    let mirror = Mirror::start();
    let release = Fixture::new(2, arch());
    release.serve(&mirror);
    let data = TempDir::new("noop");
    ok(install(data.path(), &mirror, &["--release", "2"]));
    let asset = release.kube_path("kube-apiserver");
    assert_eq!(mirror.requests(&asset).len(), 1);
    let bin = data.path().join("components/1-31-2/bin/kube-apiserver");
    let before = std::fs::metadata(&bin).unwrap().modified().unwrap();

    let out = ok(install(data.path(), &mirror, &["--release", "2"]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already installed and active"),
        "{}",
        text(&out)
    );
    assert_eq!(
        mirror.requests(&asset).len(),
        1,
        "no asset is fetched again"
    );
    assert_eq!(std::fs::metadata(&bin).unwrap().modified().unwrap(), before);
    assert_eq!(active(data.path()).as_deref(), Some("1-31-2"));

    // a damaged file of the active release: verify names it and the repair; a plain
    // install leaves it, --force installs the release again in one exchange
    std::fs::write(&bin, b"truncated").unwrap();
    let out = kdist(data.path(), &["components", "verify"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kube-apiserver") && err.contains("--release 2 --force"),
        "{err}"
    );
    ok(install(data.path(), &mirror, &["--release", "2"]));
    assert_eq!(std::fs::read(&bin).unwrap(), b"truncated");
    // replacing the active release's files is an activation: --no-activate refuses it
    let err = failed(install(
        data.path(),
        &mirror,
        &["--release", "2", "--force", "--no-activate"],
    ));
    assert!(
        err.contains("1-31-2 is active") && err.contains("--no-activate"),
        "{err}"
    );
    assert_eq!(std::fs::read(&bin).unwrap(), b"truncated");
    ok(install(
        data.path(),
        &mirror,
        &["--release", "2", "--force"],
    ));
    assert_eq!(mirror.requests(&asset).len(), 2);
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        release.kube_bytes("kube-apiserver")
    );
    ok(kdist(data.path(), &["components", "verify"]));
    assert_eq!(active(data.path()).as_deref(), Some("1-31-2"));
    assert_eq!(release_dirs(data.path()), vec!["1-31-2"]);
    let leftovers: Vec<_> = std::fs::read_dir(data.path().join("components"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".staging") || n.starts_with(".old"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn use_switches_and_remove_refuses_the_active_release() {
    let mirror = Mirror::start();
    let one = Fixture::new(1, arch());
    let two = Fixture::new(2, arch());
    one.serve(&mirror);
    two.serve(&mirror);
    let data = TempDir::new("use");
    ok(install(data.path(), &mirror, &["--release", "1"]));
    ok(install(data.path(), &mirror, &["--release", "2"]));
    assert_eq!(active(data.path()).as_deref(), Some("1-31-2"));
    assert_eq!(release_dirs(data.path()), vec!["1-31-1", "1-31-2"]);
    let kubelet = data.path().join("components/current/bin/kubelet");
    assert_eq!(std::fs::read(&kubelet).unwrap(), two.kube_bytes("kubelet"));

    ok(kdist(
        data.path(),
        &["components", "use", "kubernetes-1-31-eks-1"],
    ));
    assert_eq!(active(data.path()).as_deref(), Some("1-31-1"));
    assert_eq!(std::fs::read(&kubelet).unwrap(), one.kube_bytes("kubelet"));

    let err = failed(kdist(data.path(), &["components", "remove", "1-31-1"]));
    assert!(err.contains("1-31-1 is active"), "{err}");
    ok(kdist(data.path(), &["components", "remove", "1-31-2"]));
    assert_eq!(release_dirs(data.path()), vec!["1-31-1"]);
    let err = failed(kdist(data.path(), &["components", "use", "1-31-2"]));
    assert!(
        err.contains("1-31-2") && err.contains("installed: 1-31-1"),
        "{err}"
    );
    let err = failed(kdist(data.path(), &["components", "use", "1.31.2"]));
    assert!(err.contains("`1.31.2` is not a release"), "{err}");
    assert_eq!(active(data.path()).as_deref(), Some("1-31-1"));
}

fn tampered(algorithm: &str) {
    let mirror = Mirror::start();
    let one = Fixture::new(1, arch());
    one.serve(&mirror);
    let data = TempDir::new(&format!("tamper-{algorithm}"));
    ok(install(data.path(), &mirror, &["--release", "1"]));

    let mut two = Fixture::new(2, arch());
    // the manifest keeps one true digest and one for other bytes
    let (forged256, forged512) = digests(b"the bytes the publisher built");
    match algorithm {
        "sha512" => two.lie("kube-scheduler", None, Some(forged512)),
        _ => two.lie("kube-scheduler", Some(forged256), None),
    }
    two.serve(&mirror);
    let err = failed(install(data.path(), &mirror, &["--release", "2"]));
    assert!(err.contains("kube-scheduler"), "{err}");
    assert!(err.contains(&format!("{algorithm} is")), "{err}");
    assert!(err.contains("tampered"), "{err}");
    assert_eq!(
        release_dirs(data.path()),
        vec!["1-31-1"],
        "nothing of release 2 is installed"
    );
    assert_eq!(active(data.path()).as_deref(), Some("1-31-1"));
    let scheduler = data.path().join("components/current/bin/kube-scheduler");
    assert_eq!(
        std::fs::read(scheduler).unwrap(),
        one.kube_bytes("kube-scheduler")
    );
    let staged = data
        .path()
        .join("components/.staging-1-31-2/downloads/kube-scheduler");
    assert!(!staged.exists(), "the rejected file is not kept");
    assert!(!staged.with_extension("part").exists());
    ok(kdist(data.path(), &["components", "verify"]));

    // a refusal leaves nothing that looks like an install to resume
    assert!(
        !data.path().join("components/.staging-1-31-2").exists(),
        "the staging of the refused release is removed"
    );
    let list = ok(kdist(data.path(), &["components", "list"]));
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(!listed.contains("interrupted"), "{}", text(&list));
    assert!(!listed.contains("1-31-2"), "{}", text(&list));

    // the publisher fixes the manifest: the next install starts clean and succeeds
    let fixed = Fixture::new(2, arch());
    fixed.serve(&mirror);
    ok(install(data.path(), &mirror, &["--release", "2"]));
    assert_eq!(active(data.path()).as_deref(), Some("1-31-2"));
    assert_eq!(
        std::fs::read(data.path().join("components/current/bin/kube-scheduler")).unwrap(),
        fixed.kube_bytes("kube-scheduler")
    );
}

#[test]
fn tampered_file_with_only_sha512_wrong_is_rejected() {
    tampered("sha512");
}

#[test]
fn tampered_file_with_only_sha256_wrong_is_rejected() {
    tampered("sha256");
}

#[test]
fn truncated_downloads_are_resumed_then_fail_clearly() {
    let mirror = Mirror::start();
    let release = Fixture::new(2, arch());
    release.serve(&mirror);
    let asset = release.kube_path("kube-apiserver");

    // two cut transfers, then the rest is fetched with a Range request
    mirror.set_mode(&asset, Mode::Truncate(2));
    let data = TempDir::new("truncate");
    ok(install(data.path(), &mirror, &["--release", "2"]));
    let requests = mirror.requests(&asset);
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert_eq!(requests[0], None);
    let half = release.kube_bytes("kube-apiserver").len() / 2;
    assert_eq!(
        requests[1].as_deref(),
        Some(format!("bytes={half}-").as_str())
    );
    assert_eq!(
        std::fs::read(data.path().join("components/current/bin/kube-apiserver")).unwrap(),
        release.kube_bytes("kube-apiserver")
    );

    // cut every time: three attempts, then an error naming the URL
    let data = TempDir::new("truncate-always");
    mirror.set_mode(&asset, Mode::Truncate(u32::MAX));
    let before = mirror.requests(&asset).len();
    let err = failed(install(data.path(), &mirror, &["--release", "2"]));
    assert_eq!(mirror.requests(&asset).len() - before, 3);
    assert!(err.contains("failed after 3 attempts"), "{err}");
    assert!(err.contains(&asset), "{err}");
    assert_eq!(release_dirs(data.path()), Vec::<String>::new());
    assert_eq!(active(data.path()), None);
}

#[test]
fn server_errors_are_retried_then_fail_clearly() {
    let mirror = Mirror::start();
    let release = Fixture::new(2, arch());
    release.serve(&mirror);
    let asset = release.etcd.path.clone();
    mirror.set_mode(&asset, Mode::Status(503, 2));
    let data = TempDir::new("errors");
    ok(install(data.path(), &mirror, &["--release", "2"]));
    assert_eq!(mirror.requests(&asset).len(), 3);

    let data = TempDir::new("errors-always");
    mirror.set_mode(&asset, Mode::Status(500, u32::MAX));
    let err = failed(install(data.path(), &mirror, &["--release", "2"]));
    assert!(err.contains("failed after 3 attempts"), "{err}");
    assert!(err.contains("answered 500"), "{err}");
    assert_eq!(release_dirs(data.path()), Vec::<String>::new());

    // a missing release is not retried and says what to check
    let before = mirror.total_requests();
    let err = failed(install(data.path(), &mirror, &["--release", "9"]));
    assert!(
        err.contains("answered 404") && err.contains("--release"),
        "{err}"
    );
    assert_eq!(mirror.total_requests() - before, 1);
}

#[test]
fn release_without_this_arch_names_what_is_missing() {
    let mirror = Mirror::start();
    let release = Fixture::new(2, other_arch());
    release.serve(&mirror);
    let data = TempDir::new("arch");
    let err = failed(install(data.path(), &mirror, &["--release", "2"]));
    assert!(err.contains(&format!("no linux/{} asset", arch())), "{err}");
    for item in [
        "kube-apiserver",
        "kubelet",
        "kubectl",
        "etcd",
        "cni-plugins",
    ] {
        assert!(err.contains(item), "{item}: {err}");
    }
    assert_eq!(active(data.path()), None);
}

#[test]
fn bundle_installs_identically_without_network() {
    let mirror = Mirror::start();
    let release = Fixture::new(2, arch());
    release.serve(&mirror);
    let first = TempDir::new("bundle-a");
    ok(install(first.path(), &mirror, &["--release", "2"]));
    let work = TempDir::new("bundle-out");
    let bundle = work.path().join("eks-d.tar.gz");
    let out = ok(kdist(
        first.path(),
        &["components", "bundle", "--out", bundle.to_str().unwrap()],
    ));
    assert!(String::from_utf8_lossy(&out.stdout).contains("kubernetes-1-31-eks-2"));
    drop(mirror); // no server from here on

    let second = TempDir::new("bundle-b");
    let out = ok(kdist(
        second.path(),
        &[
            "components",
            "install",
            "--base-url",
            "http://127.0.0.1:9",
            "--from",
            bundle.to_str().unwrap(),
        ],
    ));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("installed EKS-D"),
        "{}",
        text(&out)
    );
    let a = tree(&first.path().join("components/1-31-2"));
    let b = tree(&second.path().join("components/1-31-2"));
    let files = |t: &[(String, Vec<u8>)]| {
        t.iter()
            .filter(|(p, _)| p != "record.json")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(a.len() > 10);
    assert_eq!(files(&a), files(&b), "same files, same bytes");
    assert_eq!(active(second.path()).as_deref(), Some("1-31-2"));
    ok(kdist(second.path(), &["components", "verify"]));

    // a plain directory of downloaded files works the same way
    let dir = work.path().join("dir");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("manifest.yaml"), release.manifest()).unwrap();
    for (_, a) in &release.kube {
        std::fs::write(dir.join(a.path.rsplit('/').next().unwrap()), &a.bytes).unwrap();
    }
    for a in [&release.etcd, &release.cni] {
        std::fs::write(dir.join(a.path.rsplit('/').next().unwrap()), &a.bytes).unwrap();
    }
    let third = TempDir::new("bundle-c");
    ok(kdist(
        third.path(),
        &["components", "install", "--from", dir.to_str().unwrap()],
    ));
    assert_eq!(
        files(&a),
        files(&tree(&third.path().join("components/1-31-2")))
    );

    // a file changed in the directory is refused and nothing of it is installed
    std::fs::write(dir.join("kube-proxy"), b"not what the manifest hashed").unwrap();
    let tampered = TempDir::new("bundle-t");
    let err = failed(kdist(
        tampered.path(),
        &["components", "install", "--from", dir.to_str().unwrap()],
    ));
    assert!(
        err.contains("kube-proxy") && err.contains("tampered"),
        "{err}"
    );
    assert!(release_dirs(tampered.path()).is_empty());
    assert!(
        !tampered
            .path()
            .join("components/.staging-1-31-2/downloads/kube-proxy.part")
            .exists(),
        "the rejected copy is not kept"
    );

    // a missing file is named (the tampered one put right first: a digest refusal is
    // reported before other errors)
    let good = walk_find(&third.path().join("components/1-31-2"), "kube-proxy")
        .expect("installed kube-proxy");
    std::fs::copy(good, dir.join("kube-proxy")).unwrap();
    std::fs::remove_file(dir.join("kubelet")).unwrap();
    let fourth = TempDir::new("bundle-d");
    let err = failed(kdist(
        fourth.path(),
        &["components", "install", "--from", dir.to_str().unwrap()],
    ));
    assert!(err.contains("lacks kubelet"), "{err}");
}

#[test]
fn kill_9_mid_download_then_next_run_resumes() {
    let mirror = Mirror::start();
    let one = Fixture::new(1, arch());
    let two = Fixture::new(2, arch());
    one.serve(&mirror);
    two.serve(&mirror);
    let data = TempDir::new("kill");
    ok(install(data.path(), &mirror, &["--release", "1"]));

    let asset = two.kube_path("kube-apiserver");
    let sent = 1 << 20;
    mirror.set_mode(&asset, Mode::Stall(sent));
    let base = mirror.base();
    let mut child = Command::new(KDIST)
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "components",
            "install",
            "--base-url",
            &base,
            "--channel",
            CHANNEL,
            "--release",
            "2",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let part = data
        .path()
        .join("components/.staging-1-31-2/downloads/kube-apiserver.part");
    // the stalled transfer has reached the disk (writes are buffered by 256 KiB)
    let caught = wait_until(Duration::from_secs(30), || {
        std::fs::metadata(&part)
            .map(|m| m.len() >= 512 << 10)
            .unwrap_or(false)
    });
    // a second install waits for nobody: it says another one is at work
    let busy = kdist(data.path(), &["components", "use", "1-31-1"]);
    let busy = failed(busy);
    assert!(
        busy.contains("another `kdist components` command"),
        "{busy}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    assert!(
        caught,
        "the download never reached the disk: {:?}",
        std::fs::read_dir(part.parent().unwrap()).map(|d| d
            .filter_map(|e| e.ok())
            .map(|e| (e.file_name(), e.metadata().map(|m| m.len()).unwrap_or(0)))
            .collect::<Vec<_>>())
    );
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept > 0 && kept <= sent as u64, "{kept}");

    // killed half way: release 1 still active and untouched, no release 2
    assert_eq!(active(data.path()).as_deref(), Some("1-31-1"));
    assert_eq!(release_dirs(data.path()), vec!["1-31-1"]);
    ok(kdist(data.path(), &["components", "verify"]));
    let list = ok(kdist(data.path(), &["components", "list"]));
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("interrupted install of 1-31-2"),
        "{}",
        text(&list)
    );

    mirror.set_mode(&asset, Mode::Normal);
    ok(install(data.path(), &mirror, &["--release", "2"]));
    let requests = mirror.requests(&asset);
    assert_eq!(
        requests.last().unwrap().as_deref(),
        Some(format!("bytes={kept}-").as_str()),
        "the second run resumes where the first stopped: {requests:?}"
    );
    assert_eq!(active(data.path()).as_deref(), Some("1-31-2"));
    assert_eq!(
        std::fs::read(data.path().join("components/current/bin/kube-apiserver")).unwrap(),
        two.kube_bytes("kube-apiserver")
    );
    assert!(!data.path().join("components/.staging-1-31-2").exists());
}

#[test]
fn embedded_bundle_is_installed_once_and_again_when_changed() {
    let mirror = Mirror::start();
    let release = Fixture::new(2, arch());
    release.serve(&mirror);
    let source = TempDir::new("embed-src");
    ok(install(source.path(), &mirror, &["--release", "2"]));
    let out = source.path().join("bundle.tar.gz");
    ok(kdist(
        source.path(),
        &["components", "bundle", "--out", out.to_str().unwrap()],
    ));
    let bytes: &'static [u8] = Box::leak(std::fs::read(&out).unwrap().into_boxed_slice());

    let data = TempDir::new("embed");
    let dir = kdist::config::DataDir::new(data.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut request =
        kdist::components::Request::from_config(&kdist::config::ComponentsConfig::default());
    request.source = kdist::components::Source::Embedded(bytes);
    let quiet = kdist::components::Progress::quiet();
    let first = rt
        .block_on(kdist::components::install(&dir, &request, &quiet))
        .unwrap();
    assert!(first.changed && first.active);
    let again = rt
        .block_on(kdist::components::install(&dir, &request, &quiet))
        .unwrap();
    assert!(!again.changed, "same embedded manifest: nothing extracted");
    assert_eq!(
        std::fs::read(data.path().join("components/current/bin/kubectl")).unwrap(),
        release.kube_bytes("kubectl")
    );

    // a kdist built with other files for the same release replaces them
    let mut changed = Fixture::new(2, arch());
    let new_kubectl = script("kubectl", "v1.31.3-rebuilt", 2, 900);
    let (sha256, sha512) = digests(&new_kubectl);
    changed.lie("kubectl", Some(sha256), Some(sha512));
    let mut entries: Vec<(String, Vec<u8>)> =
        vec![("manifest.yaml".into(), changed.manifest().into_bytes())];
    for (_, a) in &changed.kube {
        let name = a.path.rsplit('/').next().unwrap().to_string();
        let bytes = if name == "kubectl" {
            new_kubectl.clone()
        } else {
            a.bytes.clone()
        };
        entries.push((format!("assets/{name}"), bytes));
    }
    for a in [&changed.etcd, &changed.cni] {
        entries.push((
            format!("assets/{}", a.path.rsplit('/').next().unwrap()),
            a.bytes.clone(),
        ));
    }
    let refs: Vec<(&str, &[u8], u32)> = entries
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice(), 0o644))
        .collect();
    let rebuilt: &'static [u8] = Box::leak(tar_gz(&refs).into_boxed_slice());
    request.source = kdist::components::Source::Embedded(rebuilt);
    let third = rt
        .block_on(kdist::components::install(&dir, &request, &quiet))
        .unwrap();
    assert!(third.changed && third.active);
    assert_eq!(
        std::fs::read(data.path().join("components/current/bin/kubectl")).unwrap(),
        new_kubectl
    );
    assert_eq!(release_dirs(data.path()), vec!["1-31-2"]);
    let leftovers: Vec<_> = std::fs::read_dir(data.path().join("components"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".old") || n.starts_with(".unpack") || n.starts_with(".staging"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

// ---------------------------------------------------------------------------------
// `kdist start` and components

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A node whose etcd listens on free ports; stopped (by `kdist stop`) on drop.
struct Node {
    dir: TempDir,
}

/// The fixture's Kubernetes binaries are stand-ins that only print a version: these
/// tests are about where binaries come from, so the node runs etcd and containerd.
const DISABLE_KUBE: &str =
    "disable: [kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy]\n";

impl Node {
    fn new(name: &str, components: &str) -> Self {
        let dir = TempDir::new(name);
        let config = format!(
            "datastore: etcd\netcd:\n  client_port: {}\n  peer_port: {}\n{DISABLE_KUBE}components:\n{components}",
            free_port(),
            free_port()
        );
        std::fs::write(dir.path().join("config.yaml"), config).unwrap();
        Self { dir }
    }
    fn data(&self) -> &Path {
        self.dir.path()
    }
    fn start(&self, path_env: Option<&str>) -> Output {
        let mut cmd = Command::new(KDIST);
        cmd.arg("--data-dir")
            .arg(self.data())
            .args(["start", "--timeout", "60"])
            .env_remove("KDIST_DATA_DIR")
            .stdin(Stdio::null());
        if let Some(path) = path_env {
            cmd.env("PATH", path);
        }
        cmd.output().unwrap()
    }
    /// How `kdist status` names `binary` of an installed release.
    fn program_of(&self, release: &str, binary: &str) -> String {
        std::fs::canonicalize(self.data().join("components").join(release))
            .unwrap()
            .join("bin")
            .join(binary)
            .display()
            .to_string()
    }
    fn etcd_status(&self) -> serde_json::Value {
        let out = ok(kdist(self.data(), &["status", "-o", "json"]));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "etcd")
            .cloned()
            .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = kdist(self.data(), &["stop", "--timeout", "30"]);
    }
}

#[test]
fn start_installs_the_latest_release_first_and_runs_it() {
    let mirror = Mirror::start();
    let release = Fixture::new(3, arch());
    release.serve(&mirror);
    serve_channel(&mirror, 3);
    let node = Node::new(
        "start-install",
        &format!("  channel: \"{CHANNEL}\"\n  base_url: {}\n", mirror.base()),
    );
    let out = node.start(None);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("installing EKS-D kubernetes-1-31-eks-3"),
        "{stderr}"
    );
    assert_eq!(active(node.data()).as_deref(), Some("1-31-3"));
    let etcd = node.etcd_status();
    assert_eq!(etcd["origin"], "components", "{etcd}");
    assert_eq!(etcd["program"], node.program_of("1-31-3", "etcd"), "{etcd}");
    assert_eq!(etcd["ready"], true);

    // release 4 becomes current while the node runs: a restarted service keeps the
    // release the daemon started with; the next daemon runs release 4
    let four = Fixture::new(4, arch());
    four.serve(&mirror);
    ok(install(node.data(), &mirror, &["--release", "4"]));
    assert_eq!(active(node.data()).as_deref(), Some("1-31-4"));
    let old_pid = etcd["pid"].as_i64().unwrap();
    ok(kdist(node.data(), &["restart", "etcd"]));
    ok(kdist(
        node.data(),
        &["status", "--wait-ready", "--timeout", "30"],
    ));
    let etcd = node.etcd_status();
    assert_ne!(etcd["pid"].as_i64().unwrap(), old_pid, "{etcd}");
    assert_eq!(etcd["program"], node.program_of("1-31-3", "etcd"), "{etcd}");
    ok(kdist(node.data(), &["stop"]));
    let out = node.start(None);
    assert!(out.status.success(), "{}", text(&out));
    let etcd = node.etcd_status();
    assert_eq!(etcd["program"], node.program_of("1-31-4", "etcd"), "{etcd}");
}

#[test]
fn start_offline_falls_back_to_path_binaries_with_a_warning() {
    // nothing listens on the mirror's port
    let port = free_port();
    let node = Node::new(
        "start-offline",
        &format!("  base_url: http://127.0.0.1:{port}\n"),
    );
    let out = node.start(None);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warning: cannot install EKS-D"), "{stderr}");
    assert!(stderr.contains("etcd=/usr/bin/etcd"), "{stderr}");
    assert_eq!(active(node.data()), None);
    let etcd = node.etcd_status();
    assert_eq!(etcd["origin"], "PATH (fallback)", "{etcd}");
    assert_eq!(etcd["ready"], true);
}

#[test]
fn start_offline_without_the_binaries_on_path_fails_clearly() {
    let port = free_port();
    let node = Node::new(
        "start-nothing",
        &format!("  base_url: http://127.0.0.1:{port}\n"),
    );
    let empty = TempDir::new("empty-path");
    let out = node.start(Some(empty.path().to_str().unwrap()));
    let err = failed(out);
    assert!(err.contains("not on PATH either: etcd"), "{err}");
    assert!(err.contains("--from"), "{err}");
    assert!(
        !node.data().join("run/kdist.sock").exists(),
        "no daemon was started"
    );
}

#[test]
fn start_with_auto_install_off_does_not_touch_the_network() {
    let mirror = Mirror::start();
    serve_channel(&mirror, 3);
    let node = Node::new(
        "start-noauto",
        &format!("  auto_install: false\n  base_url: {}\n", mirror.base()),
    );
    let out = node.start(None);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mirror.total_requests(), 0);
    assert_eq!(node.etcd_status()["origin"], "PATH (fallback)");
}

#[test]
fn manifest_file_installs_and_bad_manifests_are_named() {
    let mirror = Mirror::start();
    let release = Fixture::new(4, arch());
    release.serve(&mirror);
    let work = TempDir::new("manifest-file");
    let file = work.path().join("kubernetes-1-31-eks-4.yaml");
    std::fs::write(&file, release.manifest()).unwrap();
    let data = TempDir::new("manifest-data");
    let base = mirror.base();
    ok(kdist(
        data.path(),
        &[
            "components",
            "install",
            "--base-url",
            &base,
            "--manifest",
            file.to_str().unwrap(),
        ],
    ));
    assert_eq!(active(data.path()).as_deref(), Some("1-31-4"));

    let bad = work.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: ConfigMap\nspec: {channel: 1-31, number: 1}\n",
    )
    .unwrap();
    let err = failed(kdist(
        data.path(),
        &["components", "install", "--manifest", bad.to_str().unwrap()],
    ));
    assert!(
        err.contains("bad.yaml") && err.contains("expected kind Release"),
        "{err}"
    );
    std::fs::write(&bad, "kind: [").unwrap();
    let err = failed(kdist(
        data.path(),
        &["components", "install", "--manifest", bad.to_str().unwrap()],
    ));
    assert!(
        err.contains("bad.yaml: not a valid EKS-D manifest"),
        "{err}"
    );
    assert_eq!(active(data.path()).as_deref(), Some("1-31-4"));
}

#[test]
fn outdated_compares_the_active_release_with_the_channel() {
    let mirror = Mirror::start();
    let one = Fixture::new(1, arch());
    let two = Fixture::new(2, arch());
    one.serve(&mirror);
    two.serve(&mirror);
    serve_channel(&mirror, 1);
    let data = TempDir::new("outdated");
    let base = mirror.base();
    let outdated = |output: &str| {
        kdist(
            data.path(),
            &["components", "outdated", "--base-url", &base, "-o", output],
        )
    };
    // nothing active: says what to do
    let err = failed(outdated("table"));
    assert!(err.contains("kdist components install"), "{err}");

    ok(install(data.path(), &mirror, &["--release", "1"]));
    let out = ok(outdated("table"));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("active 1-31-1, latest 1-31-1: up to date"),
        "{table}"
    );
    assert!(!table.contains("changed"), "{table}");
    assert!(!table.contains("kdist upgrade"), "{table}");

    // the channel moves on: one behind, with the Kubernetes version change
    serve_channel(&mirror, 2);
    let out = ok(outdated("json"));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["active"], "1-31-1", "{report}");
    assert_eq!(report["latest"], "1-31-2", "{report}");
    assert_eq!(report["behind"], 1, "{report}");
    assert_eq!(report["up_to_date"], false, "{report}");
    let component = |name: &str| {
        report["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["component"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {report}"))
            .clone()
    };
    let kube = component("kubernetes");
    assert_eq!(kube["active"], one.kube_version.as_str());
    assert_eq!(kube["latest"], two.kube_version.as_str());
    assert_eq!(kube["changed"], true);
    assert_eq!(component("etcd")["changed"], false);
    let out = ok(outdated("table"));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("1 release behind"), "{table}");
    assert!(table.contains("kdist upgrade --release latest"), "{table}");
    // nothing was installed by looking; the channel's document was kept as it is now
    assert_eq!(release_dirs(data.path()), vec!["1-31-1"]);
    let kept = std::fs::read_to_string(
        data.path()
            .join(format!("components/channels/{CHANNEL}.yaml")),
    )
    .unwrap();
    assert!(kept.contains("latestRelease: 2"), "{kept}");
}

/// The first file named `name` under `dir`.
fn walk_find(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() && !path.is_symlink() {
            if let Some(found) = walk_find(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}
