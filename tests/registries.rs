//! `registries:` against real registries: Debian's `docker-registry` (the CNCF
//! distribution registry) on 127.0.0.1, one with TLS from a test CA and htpasswd auth,
//! one plain HTTP. Images built offline from busybox-static are pushed there with
//! `kdist images push-release` and pulled back by the node's containerd through its CRI
//! plugin (the path kubelet takes), under public-looking names that exist only in the
//! local registries.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Proc, TempData, free_ports, oci, text, wait_until};

/// Just enough of the CRI image service for a pull: kubelet's PullImage call, spelled
/// with prost from the protocol's field numbers.
mod cri {
    use std::path::Path;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageSpec {
        #[prost(string, tag = "1")]
        pub image: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PullImageRequest {
        #[prost(message, optional, tag = "1")]
        pub image: Option<ImageSpec>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PullImageResponse {
        #[prost(string, tag = "1")]
        pub image_ref: String,
    }

    /// Pulls `image` through containerd's CRI plugin on `socket`: its image ref, or the
    /// error message kubelet would show in an ErrImagePull event.
    pub fn pull(socket: &Path, image: &str) -> Result<String, String> {
        let socket = socket.to_path_buf();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let channel = tonic::transport::Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                    let socket = socket.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(socket).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
                .unwrap();
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.unwrap();
            let codec = tonic_prost::ProstCodec::<PullImageRequest, PullImageResponse>::default();
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                "/runtime.v1.ImageService/PullImage",
            );
            let request = PullImageRequest {
                image: Some(ImageSpec {
                    image: image.to_string(),
                }),
            };
            tokio::time::timeout(
                std::time::Duration::from_secs(60),
                grpc.unary(tonic::Request::new(request), path, codec),
            )
            .await
            .map_err(|_| format!("pulling {image} took over a minute"))?
            .map(|r| r.into_inner().image_ref)
            .map_err(|status| status.message().to_string())
        })
    }
}

/// A distribution registry on 127.0.0.1:`port`, killed with its process group on drop.
struct Registry {
    _proc: Proc,
    log: PathBuf,
}

impl Registry {
    /// `tls`: (certificate, key); `htpasswd`: the file of users.
    fn start(
        dir: &Path,
        name: &str,
        port: u16,
        tls: Option<(&Path, &Path)>,
        htpasswd: Option<&Path>,
    ) -> Self {
        Self::start_with_store(dir, name, name, port, tls, htpasswd)
    }

    /// Like `start`, serving the storage of registry `store`.
    fn start_with_store(
        dir: &Path,
        name: &str,
        store: &str,
        port: u16,
        tls: Option<(&Path, &Path)>,
        htpasswd: Option<&Path>,
    ) -> Self {
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join(format!("{store}-store")).display()
        );
        if let Some((cert, key)) = tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        if let Some(file) = htpasswd {
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: kdist-test\n    path: {}\n",
                file.display()
            ));
        }
        let config_file = dir.join(format!("{name}.yml"));
        std::fs::write(&config_file, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let proc = Proc::spawn(
            Command::new("docker-registry")
                .arg("serve")
                .arg(&config_file)
                .stdout(out.try_clone().unwrap())
                .stderr(out),
        );
        assert!(
            wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            }),
            "registry {name} did not listen on {port}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Registry { _proc: proc, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log written since `log().len()` was `mark`: the requests of one step.
    fn log_since(&self, mark: usize) -> String {
        self.log().get(mark..).unwrap_or_default().to_string()
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test CA and a serving certificate for 127.0.0.1 signed by it, made by openssl.
fn test_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let p = |name: &str| dir.join(name).display().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(
        "openssl",
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                &p("ca.key"),
                "-out",
                &p("ca.crt"),
                "-days",
                "1",
                "-subj",
                "/CN=kdist-registry-test-ca",
            ],
        ]
        .concat(),
    );
    run(
        "openssl",
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                &p("server.key"),
                "-out",
                &p("server.csr"),
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p("server.crt"),
            "-days",
            "1",
            "-extfile",
            &p("ext"),
        ],
    );
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

fn ctr(data: &TempData, args: &[&str]) -> String {
    let socket = data.path("run/containerd.sock").display().to_string();
    run(
        "ctr",
        &[&["--address", socket.as_str(), "-n", "k8s.io"][..], args].concat(),
    )
}

fn release_manifest(path: &Path, images: &[&str]) {
    let mut text = String::from(
        "apiVersion: distro.eks.amazonaws.com/v1alpha1\nkind: Release\nmetadata:\n  name: kubernetes-1-31-eks-99\nspec:\n  channel: 1-31\n  number: 99\nstatus:\n  components:\n  - name: test\n    assets:\n",
    );
    for (i, image) in images.iter().enumerate() {
        text.push_str(&format!(
            "    - name: image-{i}\n      type: Image\n      os: linux\n      arch: [amd64, arm64]\n      image:\n        uri: {image}\n"
        ));
    }
    std::fs::write(path, text).unwrap();
}

/// Every file under `dir` that holds `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                found.push(path);
            }
        }
    }
    found
}

const APP: &str = "docker.io/library/kdist-regtest:1";
const PAUSE: &str = "public.ecr.aws/eks-distro/kubernetes/pause:3.9";

#[test]
fn mirrors_credentials_fallback_and_eks_mirror_through_the_nodes_containerd() {
    for tool in ["docker-registry", "htpasswd", "ctr", "openssl"] {
        assert!(
            common::on_path(tool),
            "{tool} is needed (scripts/test-all installs it)"
        );
    }
    let data = TempData::new("reg");
    let dir = data.path("registries");
    std::fs::create_dir_all(&dir).unwrap();
    let password = format!("s3cret-PW-{}", std::process::id());
    let wrong = format!("wrong-PW-{}", std::process::id());

    let (ca, cert, key) = test_ca(&dir);
    let htpasswd = dir.join("htpasswd");
    std::fs::write(&htpasswd, run("htpasswd", &["-Bbn", "alice", &password])).unwrap();
    let ports = free_ports(3);
    let (tls_port, plain_port, down_port) = (ports[0], ports[1], ports[2]);
    let secure = Registry::start(
        &dir,
        "secure",
        tls_port,
        Some((&cert, &key)),
        Some(&htpasswd),
    );
    let plain = Registry::start(&dir, "plain", plain_port, None, None);

    let config_for = |password: &str| {
        format!(
            "datastore: embedded
registries:
  eks_mirror: http://127.0.0.1:{plain_port}/eks
  mirrors:
    public.ecr.aws:
      fallback: false
    docker.io:
      endpoint: [\"https://127.0.0.1:{tls_port}/v2/mirrored\"]
      fallback: false
    \"127.0.0.1:{plain_port}\":
      endpoint: [\"http://127.0.0.1:{down_port}\"]
      fallback: false
    \"localhost:{plain_port}\":
      endpoint: [\"http://127.0.0.1:{down_port}\"]
    \"*\":
      endpoint: [\"http://127.0.0.1:{plain_port}/v2/eks\"]
  configs:
    \"127.0.0.1:{tls_port}\":
      auth: {{username: alice, password: {password}}}
      tls: {{ca_file: {ca}}}
",
            ca = ca.display()
        )
    };
    let seed = data.config(&config_for(&password));
    let out = data.kdist(&[
        "start",
        "--config",
        seed.to_str().unwrap(),
        "--timeout",
        "60",
    ]);
    assert!(out.status.success(), "{}", text(&out));

    // what was rendered: credentials only in the root-only config.toml
    let config_toml = data.path("containerd/config.toml");
    let mode = std::fs::metadata(&config_toml)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "config.toml holds credentials");
    let mode_of = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode_of(&data.path("config.yaml")),
        0o600,
        "config.yaml holds credentials"
    );
    let hosts = data.path("containerd/certs.d");
    for registry in [
        "docker.io",
        "public.ecr.aws",
        &format!("127.0.0.1:{tls_port}"),
    ] {
        let file = hosts.join(registry).join("hosts.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(!text.contains(&password), "{}", file.display());
    }
    // kdist status lists the mirrors, and no credential
    let status = data.status();
    let facts = status["host"].to_string();
    assert!(
        facts.contains(&format!(
            "https://127.0.0.1:{tls_port}/v2/mirrored, no fallback"
        )),
        "{facts}"
    );
    assert!(
        facts.contains(&format!("http://127.0.0.1:{plain_port}/v2/eks")),
        "{facts}"
    );
    assert!(!facts.contains(&password), "{facts}");
    let table = data.kdist(&["status"]);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("registry docker.io"),
        "{}",
        text(&table)
    );

    // seed the registries from this node, as a connected box would
    let app_tar = dir.join("app.tar");
    let pause_tar = dir.join("pause.tar");
    oci::build(&app_tar, APP, &["/bin/sh", "-c", "echo hello; sleep 3600"]);
    oci::build(&pause_tar, PAUSE, &["/bin/sleep", "infinity"]);
    for archive in [&app_tar, &pause_tar] {
        let out = data.kdist(&["images", "import", archive.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let eks = dir.join("eks.yaml");
    release_manifest(
        &eks,
        &[
            PAUSE,
            "public.ecr.aws/eks-distro/coredns/coredns:v1.11.3-eks-1-31-99",
        ],
    );
    let out = data.kdist(&[
        "images",
        "push-release",
        "--manifest",
        eks.to_str().unwrap(),
        "--to",
        &format!("http://127.0.0.1:{plain_port}/eks"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!(
            "pushed {PAUSE} as 127.0.0.1:{plain_port}/eks/eks-distro/kubernetes/pause:3.9"
        )),
        "{said}"
    );
    assert!(
        said.contains("skipped public.ecr.aws/eks-distro/coredns/coredns"),
        "{said}"
    );
    // the private registry: TLS from the test CA, basic credentials from config.yaml
    let apps = dir.join("apps.yaml");
    release_manifest(&apps, &[APP]);
    let out = data.kdist(&[
        "images",
        "push-release",
        "--manifest",
        apps.to_str().unwrap(),
        "--to",
        &format!("127.0.0.1:{tls_port}/mirrored"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!(
            "as 127.0.0.1:{tls_port}/mirrored/library/kdist-regtest:1"
        )),
        "{}",
        text(&out)
    );
    // the push tags are gone again, and so are the originals: pulls must go to a registry
    ctr(&data, &["images", "rm", APP, PAUSE]);
    let listed = ctr(&data, &["images", "ls", "-q"]);
    assert!(
        !listed.contains("kdist-regtest") && !listed.contains("pause"),
        "{listed}"
    );

    // what the registries are asked from here on is the pulls' doing, not the pushes'
    let (secure_mark, plain_mark) = (secure.log().len(), plain.log().len());
    let socket = data.path("run/containerd.sock");
    // a public name that exists only in the private mirror
    cri::pull(&socket, APP).unwrap_or_else(|e| panic!("pull {APP}: {e}"));
    assert!(ctr(&data, &["images", "ls", "-q"]).contains(APP));
    assert!(
        secure
            .log_since(secure_mark)
            .contains("/v2/mirrored/library/kdist-regtest/manifests/1"),
        "{}",
        secure.log_since(secure_mark)
    );
    // eks_mirror: the release's pause image comes from the plain-HTTP local registry
    cri::pull(&socket, PAUSE).unwrap_or_else(|e| panic!("pull {PAUSE}: {e}"));
    assert!(
        plain
            .log_since(plain_mark)
            .contains("/v2/eks/eks-distro/kubernetes/pause/manifests/3.9"),
        "{}",
        plain.log_since(plain_mark)
    );
    // the only mirror is down: without fallback the pull fails naming it, although the
    // registry itself has the image; with fallback (localhost:) it comes from there
    let direct = format!("127.0.0.1:{plain_port}/eks/eks-distro/kubernetes/pause:3.9");
    let err = cri::pull(&socket, &direct).unwrap_err();
    assert!(
        err.contains(&format!("127.0.0.1:{down_port}")) && err.contains("connection refused"),
        "{err}"
    );
    let via_fallback = format!("localhost:{plain_port}/eks/eks-distro/kubernetes/pause:3.9");
    cri::pull(&socket, &via_fallback).unwrap_or_else(|e| panic!("pull {via_fallback}: {e}"));
    // `*`: a registry without its own entry (nothing listens on 127.0.0.2:1) is served
    // by the catch-all mirror
    let anywhere = "127.0.0.2:1/eks-distro/kubernetes/pause:3.9";
    cri::pull(&socket, anywhere).unwrap_or_else(|e| panic!("pull {anywhere}: {e}"));

    // a changed section takes effect at the next start: wrong credentials now
    let out = data.kdist(&["stop", "--timeout", "60"]);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(
        data.path("config.yaml"),
        config_for(&wrong) + common::OFFLINE,
    )
    .unwrap();
    // edited by hand into a world-readable file: the start makes it private, and says so
    std::fs::set_permissions(
        data.path("config.yaml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = data.kdist(&["start", "--timeout", "60"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mode_of(&data.path("config.yaml")), 0o600);
    let notes = data.status()["notes"].to_string();
    assert!(notes.contains("holds registry credentials"), "{notes}");
    ctr(&data, &["images", "rm", APP]);
    let err = cri::pull(&socket, APP).unwrap_err();
    assert!(
        err.contains("401 Unauthorized") && err.contains(&format!("127.0.0.1:{tls_port}")),
        "{err}"
    );
    assert!(!err.contains(&wrong), "{err}");

    // no password in any log of the node, nor in `kdist inspect`
    for secret in [&password, &wrong] {
        let found = files_containing(&data.path("logs"), secret);
        assert!(found.is_empty(), "password in {found:?}");
    }
    let bundle = dir.join("inspect.tar.gz");
    let out = data.kdist(&["inspect", "-o", bundle.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let unpacked = dir.join("inspect");
    std::fs::create_dir_all(&unpacked).unwrap();
    tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(&bundle).unwrap(),
    ))
    .unpack(&unpacked)
    .unwrap();
    // the bundle does carry the files that hold the credentials, redacted
    let containerd = files_containing(&unpacked, "registry.configs");
    assert!(
        containerd
            .iter()
            .any(|p| p.ends_with("node/containerd-config.toml")),
        "{containerd:?}"
    );
    let body = std::fs::read_to_string(&containerd[0]).unwrap();
    assert!(body.contains("password = [redacted]"), "{body}");
    let found = files_containing(&unpacked, &wrong);
    assert!(
        found.is_empty(),
        "password in the inspect bundle: {found:?}"
    );
    let out = data.kdist(&["stop", "--timeout", "60"]);
    assert!(out.status.success(), "{}", text(&out));
}

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: NAME}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: IMAGE
    imagePullPolicy: Always
    command: ["/bin/sh", "-c", "echo hello-via-mirror; exec sleep 3600"]
"#;

/// Pods on a whole node: the sandbox (pause) image comes through `eks_mirror`, the app
/// through a TLS mirror with credentials, and a mirror with wrong credentials gives an
/// image pull error event naming the host, with no password in any log.
#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn pods_start_through_the_mirrors_and_bad_credentials_are_an_event() {
    let _host = common::exclusive_host();
    let bin = PathBuf::from(std::env::var("KDIST_TEST_K8S_BIN").unwrap());
    let data = TempData::new("regpod");
    let dir = data.path("registries");
    std::fs::create_dir_all(&dir).unwrap();
    let password = format!("s3cret-PW-{}", std::process::id());
    let wrong = format!("wrong-PW-{}", std::process::id());
    let (ca, cert, key) = test_ca(&dir);
    let htpasswd = dir.join("htpasswd");
    std::fs::write(&htpasswd, run("htpasswd", &["-Bbn", "alice", &password])).unwrap();
    let ports = free_ports(3);
    let (tls_port, other_port, plain_port) = (ports[0], ports[1], ports[2]);
    let secure = Registry::start(
        &dir,
        "secure",
        tls_port,
        Some((&cert, &key)),
        Some(&htpasswd),
    );
    // a second server over the same storage, reached with wrong credentials
    let other = Registry::start_with_store(
        &dir,
        "other",
        "secure",
        other_port,
        Some((&cert, &key)),
        Some(&htpasswd),
    );
    let plain = Registry::start(&dir, "plain", plain_port, None, None);
    let config = data.config(&format!(
        "datastore: embedded
network:
  egress: none
addons:
  dns:
    enabled: false
registries:
  eks_mirror: http://127.0.0.1:{plain_port}/eks
  mirrors:
    public.ecr.aws:
      fallback: false
    docker.io:
      endpoint: [\"https://127.0.0.1:{tls_port}/v2/mirrored\"]
      fallback: false
    quay.io:
      endpoint: [\"https://127.0.0.1:{other_port}/v2/mirrored\"]
      fallback: false
  configs:
    \"127.0.0.1:{tls_port}\":
      auth: {{username: alice, password: {password}}}
      tls: {{ca_file: {ca}}}
    \"127.0.0.1:{other_port}\":
      auth: {{username: alice, password: {wrong}}}
      tls: {{ca_file: {ca}}}
",
        ca = ca.display()
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

    let app_tar = dir.join("app.tar");
    let pause_tar = dir.join("pause.tar");
    oci::build(&app_tar, APP, &["/bin/sh"]);
    oci::build(&pause_tar, PAUSE, &["/bin/sleep", "infinity"]);
    for archive in [&app_tar, &pause_tar] {
        let out = data.kdist(&["images", "import", archive.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let manifest = dir.join("release.yaml");
    release_manifest(&manifest, &[PAUSE]);
    for to in [
        format!("http://127.0.0.1:{plain_port}/eks"),
        format!("127.0.0.1:{tls_port}/eks"),
    ] {
        let out = data.kdist(&[
            "images",
            "push-release",
            "--manifest",
            manifest.to_str().unwrap(),
            "--to",
            &to,
        ]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let apps = dir.join("apps.yaml");
    release_manifest(&apps, &[APP]);
    let out = data.kdist(&[
        "images",
        "push-release",
        "--manifest",
        apps.to_str().unwrap(),
        "--to",
        &format!("127.0.0.1:{tls_port}/mirrored"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    ctr(&data, &["images", "rm", APP, PAUSE]);

    let kubectl = |args: &[&str]| {
        let out = data.kdist_env(&[&["kubectl"], args].concat(), &[]);
        assert!(out.status.success(), "kubectl {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let apply = |name: &str, image: &str| {
        let file = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, POD.replace("NAME", name).replace("IMAGE", image)).unwrap();
        kubectl(&["apply", "-f", file.to_str().unwrap()]);
    };
    // pods need the default ServiceAccount, which the controller-manager creates
    assert!(
        wait_until(Duration::from_secs(120), Duration::from_secs(1), || {
            data.kdist(&["kubectl", "get", "serviceaccount", "default"])
                .status
                .success()
        }),
        "no default ServiceAccount"
    );
    let (secure_mark, plain_mark) = (secure.log().len(), plain.log().len());
    apply("good", APP);
    let out = data.kdist(&[
        "kubectl",
        "wait",
        "--for=condition=Ready",
        "pod/good",
        "--timeout=180s",
    ]);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        text(&data.kdist(&["kubectl", "describe", "pod", "good"]))
    );
    assert!(kubectl(&["logs", "good"]).contains("hello-via-mirror"));
    assert!(
        secure
            .log_since(secure_mark)
            .contains("/v2/mirrored/library/kdist-regtest/manifests/1")
    );
    // the sandbox image was removed too: kubelet had it pulled through eks_mirror
    assert!(
        plain
            .log_since(plain_mark)
            .contains("/v2/eks/eks-distro/kubernetes/pause/manifests/3.9"),
        "{}",
        plain.log_since(plain_mark)
    );

    apply("bad", "quay.io/library/kdist-regtest:1");
    let events = || {
        kubectl(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=bad",
            "-o",
            "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
        ])
    };
    assert!(
        wait_until(Duration::from_secs(120), Duration::from_secs(1), || events(
        )
        .contains("401 Unauthorized")),
        "no pull error event: {}",
        events()
    );
    let said = events();
    eprintln!("events of the pod with wrong credentials:\n{said}");
    assert!(said.contains(&format!("127.0.0.1:{other_port}")), "{said}");
    assert!(
        other
            .log()
            .contains("/v2/mirrored/library/kdist-regtest/manifests/1")
    );
    for secret in [&password, &wrong] {
        let found = files_containing(&data.path("logs"), secret);
        assert!(found.is_empty(), "password in {found:?}");
        assert!(!said.contains(secret.as_str()));
    }
    let out = data.kdist(&["stop", "--timeout", "60"]);
    assert!(out.status.success(), "{}", text(&out));
}
