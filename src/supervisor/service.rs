//! Service definitions (`services/<name>.toml`, embedded) and their editable args files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::error::{ArgsError, SupervisorError};
use crate::components::Origin;
use crate::config::{DataDir, DatastoreKind, NodeConfig, Service};
use crate::fsutil;

/// How readiness is decided.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Probe {
    /// HTTP(S) GET answering 2xx; `ca`, `cert`, `key` are PEM paths for TLS.
    /// `insecure` skips server verification: only for loopback health endpoints whose
    /// component serves a self-signed certificate.
    Http {
        url: String,
        ca: Option<String>,
        cert: Option<String>,
        key: Option<String>,
        #[serde(default)]
        insecure: bool,
    },
    /// A TCP connect to `host:port`.
    Tcp { address: String },
    /// A connect to a unix socket.
    Unix { path: String },
    /// A command that exits 0 when the service is ready.
    Command { argv: Vec<String> },
}

/// The parsed form of `services/<name>.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Definition {
    description: String,
    /// The program to run; absent for a builtin.
    #[serde(default)]
    binary: Option<String>,
    /// Runs inside the daemon (a registered [`super::Builtin`]) instead of as a child.
    #[serde(default)]
    builtin: bool,
    #[serde(default)]
    after: Vec<String>,
    #[serde(default = "default_grace")]
    stop_grace_secs: u64,
    /// Default environment of the child (Go runtime memory settings); config.yaml's
    /// `services.<name>.env` goes over it.
    #[serde(default)]
    env: BTreeMap<String, String>,
    probe: Probe,
}

fn default_grace() -> u64 {
    10
}

/// Everything the supervisor needs to run one service.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    pub description: String,
    /// Program name or path, resolved by [`resolve_binary_for`] at each start; `None` for
    /// a builtin service, which runs inside the daemon.
    pub binary: Option<String>,
    /// The components release (`<data>/components/<id>`) active when the daemon planned
    /// its services: restarts keep running its binaries, whatever `components use` or
    /// `install` switch meanwhile, until the daemon starts again.
    pub release: Option<PathBuf>,
    /// Services that must be ready before this one starts.
    pub after: Vec<String>,
    pub stop_grace: Duration,
    pub probe: Probe,
    /// The args file in the data dir, re-read at every start so edits apply.
    pub args_file: PathBuf,
    /// Variables expanded in the args file and the probe.
    pub vars: BTreeMap<String, String>,
    /// Environment set on the child: the definition's defaults under config.yaml's
    /// `services.<name>.env`.
    pub env: BTreeMap<String, String>,
    /// config.yaml's `services.<name>.args`, appended after the args file's flags.
    pub extra_args: Vec<String>,
    /// When to page out the program's pages after the child is first ready (config.yaml
    /// `memory.page_out_after`); `None`: never.
    pub page_out_after: Option<Duration>,
}

/// What planning needs to know about the host, probed once by the caller so that
/// [`plan`] itself does no I/O.
#[derive(Debug, Clone)]
pub struct HostInputs {
    /// `network.node_ip`, else the address of the default route's interface.
    pub node_ip: std::net::IpAddr,
    /// The Kubernetes binaries found and their versions.
    pub kube: crate::node::kube::Detection,
    /// `--initial-cluster` and its state, left by a control-plane join.
    pub etcd_initial: Option<(String, String)>,
    /// The components release active now (see [`ServiceSpec::release`]).
    pub release: Option<PathBuf>,
    /// The pod sandbox image, the one containerd's config names too.
    pub sandbox_image: String,
}

impl HostInputs {
    /// Probes this host for `config`. Blocking: it runs each Kubernetes binary's
    /// `--version`.
    pub fn probe(data: &DataDir, config: &NodeConfig) -> Result<Self, SupervisorError> {
        Ok(Self {
            node_ip: config
                .network
                .node_ip
                .unwrap_or_else(crate::node::host::detect_node_ip),
            kube: crate::node::kube::detect(data, config.role)?,
            etcd_initial: crate::cluster::etcd_initial_cluster(data),
            release: crate::components::active_release(data),
            sandbox_image: crate::node::containerd::sandbox_image(data, config),
        })
    }
}

/// The services this node runs, in dependency order, for `config` on a host described
/// by `host`. Pure: `data` only names paths.
///
/// The Kubernetes services are planned as a set, and only when every one of their
/// binaries resolves (components dir, then PATH): without them the node still runs its
/// datastore and containerd, and `kdist status` says what is missing.
pub fn plan(
    data: &DataDir,
    config: &NodeConfig,
    host: &HostInputs,
) -> Result<Vec<ServiceSpec>, SupervisorError> {
    let worker = config.role == crate::config::Role::Worker;
    let datastore_service = (!worker).then(|| config.datastore.service());
    let mut names: Vec<Service> = datastore_service.into_iter().collect();
    names.push(Service::Containerd);
    let kube = &host.kube;
    if kube.complete() {
        // a worker runs only the node services; its control plane is elsewhere
        names.extend(crate::node::kube::services_for(config.role));
    }
    for name in &config.disable {
        if Service::parse(name).is_none() {
            return Err(SupervisorError::Disabled {
                name: name.clone(),
                known: crate::config::known_services().join(", "),
            });
        }
    }
    names.retain(|n| !config.disable.iter().any(|d| n == d));
    let planned: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let vars = variables(data, config, host);
    let release = host.release.clone();
    names
        .iter()
        .map(|name| {
            let mut vars = vars.clone();
            if let Some(minor) = kube.minor(name.as_str()) {
                vars.insert("KUBE_MINOR".into(), minor.to_string());
            }
            let origin = PathBuf::from(format!("services/{name}.toml"));
            let def: Definition = toml::from_str(name.definition()).map_err(|source| {
                SupervisorError::Definition {
                    path: origin.clone(),
                    source,
                }
            })?;
            let probe = expand_probe(&def.probe, &vars, &origin)?;
            if def.builtin == def.binary.is_some() {
                return Err(SupervisorError::ArgsLine {
                    path: origin,
                    line: 0,
                    reason: "a service has either `binary` or `builtin = true`".into(),
                });
            }
            // "datastore" names whichever datastore this node runs
            let after = def
                .after
                .into_iter()
                .filter_map(|dep| match dep.as_str() {
                    "datastore" => datastore_service.map(|s| s.to_string()),
                    _ => Some(dep),
                })
                // a disabled dependency is the operator's choice: do not wait for it
                .filter(|dep| planned.contains(dep))
                .collect();
            let settings = config.services.get(name.as_str());
            let env = effective_env(def.env, settings.map(|s| &s.env));
            Ok(ServiceSpec {
                env,
                extra_args: settings.map(|s| s.args.clone()).unwrap_or_default(),
                page_out_after: Some(config.memory.page_out_after.duration())
                    .filter(|d| !d.is_zero()),
                name: name.to_string(),
                description: def.description,
                binary: def.binary,
                release: release.clone(),
                after,
                stop_grace: Duration::from_secs(def.stop_grace_secs),
                probe,
                args_file: data.args_file(name.as_str()),
                vars: vars.clone(),
            })
        })
        .collect()
}

/// The definition's environment with the user's on top; an empty user value removes
/// the variable.
fn effective_env(
    mut defaults: BTreeMap<String, String>,
    user: Option<&BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    for (key, value) in user.into_iter().flatten() {
        if value.is_empty() {
            defaults.remove(key);
        } else {
            defaults.insert(key.clone(), value.clone());
        }
    }
    defaults
}

fn service(name: &str) -> Result<Service, SupervisorError> {
    Service::parse(name).ok_or_else(|| SupervisorError::UnknownService {
        name: name.to_string(),
    })
}

/// Writes the default args file of each planned service that has none yet. Existing
/// files are the user's and are never overwritten.
pub fn write_default_args(specs: &[ServiceSpec]) -> Result<(), SupervisorError> {
    for spec in specs {
        if spec.binary.is_none() || spec.args_file.exists() {
            continue;
        }
        let text = default_args(service(&spec.name)?);
        fsutil::atomic_write(&spec.args_file, text.as_bytes(), 0o644).map_err(|source| {
            SupervisorError::Io {
                path: spec.args_file.clone(),
                source,
            }
        })?;
    }
    Ok(())
}

/// The default args file of a service: the embedded text, plus the Kubernetes
/// version-conditional lines for the Kubernetes services.
fn default_args(service: Service) -> String {
    if crate::node::kube::SERVICES.contains(&service) {
        crate::node::kube::default_args(service.as_str(), service.default_args())
    } else {
        service.default_args().to_string()
    }
}

fn variables(data: &DataDir, config: &NodeConfig, host: &HostInputs) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    vars.insert("DATA".into(), data.root().display().to_string());
    vars.insert("CERTS".into(), data.certs_dir().display().to_string());
    vars.insert("NODE_NAME".into(), config.node_name());
    vars.insert(
        "ETCD_CLIENT_PORT".into(),
        config.etcd.client_port.to_string(),
    );
    vars.insert("ETCD_PEER_PORT".into(), config.etcd.peer_port.to_string());
    vars.insert(
        "CONTAINERD_SOCKET".into(),
        data.containerd_socket().display().to_string(),
    );
    let dir = |p: std::path::PathBuf| p.display().to_string();
    vars.insert("CERTS".into(), dir(data.certs_dir()));
    vars.insert("KUBECONFIGS".into(), dir(data.kubeconfig_dir()));
    vars.insert("NODE_DIR".into(), dir(data.node_dir()));
    vars.insert("KUBELET_DIR".into(), dir(data.kubelet_dir()));
    let node_ip = host.node_ip;
    vars.insert("NODE_IP".into(), node_ip.to_string());
    let (client, peer) = (config.etcd.client_port, config.etcd.peer_port);
    let url = |ip: std::net::IpAddr, port: u16| {
        format!("https://{}", std::net::SocketAddr::new(ip, port))
    };
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    let (listen_client, listen_peer) = if node_ip.is_loopback() {
        (url(loopback, client), url(loopback, peer))
    } else {
        (
            format!("{},{}", url(loopback, client), url(node_ip, client)),
            format!("{},{}", url(loopback, peer), url(node_ip, peer)),
        )
    };
    vars.insert("ETCD_LISTEN_CLIENT_URLS".into(), listen_client);
    vars.insert("ETCD_LISTEN_PEER_URLS".into(), listen_peer);
    let (initial, state) = host.etcd_initial.clone().unwrap_or_else(|| {
        (
            format!("{}={}", config.node_name(), url(node_ip, peer)),
            "new".into(),
        )
    });
    vars.insert("ETCD_INITIAL_CLUSTER".into(), initial);
    vars.insert("ETCD_INITIAL_CLUSTER_STATE".into(), state);
    vars.insert("POD_CIDR".into(), config.network.pod_cidr.clone());
    vars.insert(
        "NODE_CIDR_MASK".into(),
        config.network.node_cidr_mask.to_string(),
    );
    vars.insert("SERVICE_CIDR".into(), config.network.service_cidr.clone());
    vars.insert(
        "CLUSTER_DOMAIN".into(),
        config.network.cluster_domain.clone(),
    );
    vars.insert("SANDBOX_IMAGE".into(), host.sandbox_image.clone());
    // a Go duration: what kube-controller-manager signs lives as long as kdist's leaves
    vars.insert(
        "LEAF_VALIDITY".into(),
        format!("{}s", config.certs.leaf_validity.duration().as_secs()),
    );
    let servers = match config.datastore {
        DatastoreKind::Etcd => format!("https://127.0.0.1:{}", config.etcd.client_port),
        DatastoreKind::Embedded => format!("unix://{}", data.datastore_socket().display()),
    };
    vars.insert("DATASTORE".into(), config.datastore.as_str().into());
    vars.insert("ETCD_SERVERS".into(), servers);
    vars
}

/// Parses an args file: one flag per line, `#` comments and blank lines ignored,
/// `${VAR}` expanded. A line may start with a condition in brackets: `[1.28-1.34]`,
/// `[1.31+]` (Kubernetes minor of the binary, `${KUBE_MINOR}`) or `[datastore=etcd]`
/// (`${DATASTORE}`); it applies only when the condition holds. Returns the argv
/// (without the program).
pub fn parse_args(
    text: &str,
    vars: &BTreeMap<String, String>,
    origin: &Path,
) -> Result<Vec<String>, SupervisorError> {
    let mut argv = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let mut line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let (condition, flag) =
                rest.split_once(']')
                    .ok_or_else(|| SupervisorError::ArgsLine {
                        path: origin.to_path_buf(),
                        line: line_no,
                        reason: "unclosed `[` condition".into(),
                    })?;
            let holds =
                condition_holds(condition, vars).map_err(|error| SupervisorError::ArgsExpand {
                    path: origin.to_path_buf(),
                    line: line_no,
                    error,
                })?;
            if !holds {
                continue;
            }
            line = flag.trim();
        }
        if !line.starts_with('-') {
            return Err(SupervisorError::ArgsLine {
                path: origin.to_path_buf(),
                line: line_no,
                reason: format!("`{line}` is not a flag; each line must be one `--flag=value`"),
            });
        }
        let expanded = expand(line, vars).map_err(|error| SupervisorError::ArgsExpand {
            path: origin.to_path_buf(),
            line: line_no,
            error,
        })?;
        argv.push(expanded);
    }
    Ok(argv)
}

/// Evaluates an args-line condition: `1.A-1.B`, `1.A+`, `-1.B` or `NAME=value`.
fn condition_holds(condition: &str, vars: &BTreeMap<String, String>) -> Result<bool, ArgsError> {
    let condition = condition.trim();
    if let Some((name, value)) = condition.split_once('=') {
        let name = name.trim().to_ascii_uppercase();
        let actual = vars.get(&name).ok_or_else(|| ArgsError::UnknownSetting {
            condition: condition.to_string(),
        })?;
        return Ok(actual == value.trim());
    }
    let minor = |text: &str| -> Result<u32, ArgsError> {
        text.trim()
            .strip_prefix("1.")
            .and_then(|m| m.parse().ok())
            .ok_or_else(|| ArgsError::BadRange {
                condition: condition.to_string(),
            })
    };
    let (low, high) = if let Some(low) = condition.strip_suffix('+') {
        (Some(minor(low)?), None)
    } else if let Some(high) = condition.strip_prefix('-') {
        (None, Some(minor(high)?))
    } else if let Some((low, high)) = condition.split_once('-') {
        (Some(minor(low)?), Some(minor(high)?))
    } else {
        let exact = minor(condition)?;
        (Some(exact), Some(exact))
    };
    let actual: u32 = vars
        .get("KUBE_MINOR")
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| ArgsError::UnknownVersion {
            condition: condition.to_string(),
        })?;
    Ok(low.is_none_or(|l| actual >= l) && high.is_none_or(|h| actual <= h))
}

/// Reads and parses the service's args file from the data dir, then appends config.yaml's
/// `services.<name>.args` (with `${VAR}`s expanded): last given wins for the components.
pub fn read_args(spec: &ServiceSpec) -> Result<Vec<String>, SupervisorError> {
    let text = std::fs::read_to_string(&spec.args_file).map_err(|source| SupervisorError::Io {
        path: spec.args_file.clone(),
        source,
    })?;
    let mut argv = parse_args(&text, &spec.vars, &spec.args_file)?;
    for (i, arg) in spec.extra_args.iter().enumerate() {
        let expanded = expand(arg, &spec.vars).map_err(|error| SupervisorError::SettingExpand {
            field: format!("services.{}.args[{i}]", spec.name),
            error,
        })?;
        argv.push(expanded);
    }
    Ok(argv)
}

/// Expands `${NAME}` references; an unknown name is an error naming it.
fn expand(text: &str, vars: &BTreeMap<String, String>) -> Result<String, ArgsError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| ArgsError::Unclosed {
            text: text.to_string(),
        })?;
        let name = &after[..end];
        let value = vars.get(name).ok_or_else(|| {
            let known: Vec<_> = vars.keys().map(String::as_str).collect();
            ArgsError::UnknownVariable {
                name: name.to_string(),
                known: known.join(", "),
            }
        })?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn expand_probe(
    probe: &Probe,
    vars: &BTreeMap<String, String>,
    origin: &Path,
) -> Result<Probe, SupervisorError> {
    let x = |s: &str| {
        expand(s, vars).map_err(|error| SupervisorError::ArgsExpand {
            path: origin.to_path_buf(),
            line: 0,
            error,
        })
    };
    let xo = |s: &Option<String>| s.as_deref().map(x).transpose();
    Ok(match probe {
        Probe::Http {
            url,
            ca,
            cert,
            key,
            insecure,
        } => Probe::Http {
            url: x(url)?,
            ca: xo(ca)?,
            cert: xo(cert)?,
            key: xo(key)?,
            insecure: *insecure,
        },
        Probe::Tcp { address } => Probe::Tcp {
            address: x(address)?,
        },
        Probe::Unix { path } => Probe::Unix { path: x(path)? },
        Probe::Command { argv } => Probe::Command {
            argv: argv.iter().map(|a| x(a)).collect::<Result<_, _>>()?,
        },
    })
}

/// Finds the program of `spec`: in the release it was planned with (see
/// [`ServiceSpec::release`]), else the active components, else PATH.
pub fn resolve_binary_for(
    data: &DataDir,
    spec: &ServiceSpec,
    binary: &str,
) -> Result<(PathBuf, Origin), SupervisorError> {
    Ok(crate::components::resolve_binary_in(
        data,
        spec.release.as_deref(),
        binary,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host with no Kubernetes binaries, not joined, at `network.node_ip` or a
    /// documentation address: planning reads nothing else.
    fn host(config: &NodeConfig) -> HostInputs {
        HostInputs {
            node_ip: config
                .network
                .node_ip
                .unwrap_or_else(|| "192.0.2.1".parse().unwrap()),
            kube: Default::default(),
            etcd_initial: None,
            release: None,
            sandbox_image: config.runtime.sandbox_image.clone(),
        }
    }

    fn vars() -> BTreeMap<String, String> {
        let mut v = BTreeMap::new();
        v.insert("DATA".into(), "/d".into());
        v.insert("PORT".into(), "2379".into());
        v
    }

    #[test]
    fn args_skip_comments_and_expand() {
        let text = "# comment\n\n--data-dir=${DATA}/x\n  --port=${PORT}  \n";
        let argv = parse_args(text, &vars(), Path::new("args/etcd")).unwrap();
        assert_eq!(argv, vec!["--data-dir=/d/x", "--port=2379"]);
    }

    #[test]
    fn non_flag_line_names_file_and_line() {
        let err = parse_args("--a=1\nbogus\n", &vars(), Path::new("/d/args/etcd"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/d/args/etcd:2"), "{err}");
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn unknown_variable_is_named() {
        let err = parse_args("--a=${NOPE}\n", &vars(), Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("${NOPE}"), "{err}");
        assert!(err.contains("f:1"), "{err}");
    }

    #[test]
    fn conditions_select_lines() {
        let mut v = vars();
        v.insert("KUBE_MINOR".into(), "34".into());
        v.insert("DATASTORE".into(), "embedded".into());
        let text = "[1.28-1.34] --old\n[1.35+] --new\n[-1.30] --older\n[datastore=etcd] --etcd\n\
                    [datastore=embedded] --embedded\n[1.34] --exact\n";
        let argv = parse_args(text, &v, Path::new("f")).unwrap();
        assert_eq!(argv, ["--old", "--embedded", "--exact"]);
        v.insert("KUBE_MINOR".into(), "35".into());
        let argv = parse_args(text, &v, Path::new("f")).unwrap();
        assert_eq!(argv, ["--new", "--embedded"]);
        let err = parse_args("[1.x] --a\n", &v, Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("f:1") && err.contains("version range"),
            "{err}"
        );
        let err = parse_args("[1.30+] --a\n", &vars(), Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown"), "{err}");
    }

    #[test]
    fn config_env_goes_over_the_definition_and_args_are_appended() {
        let root = std::env::temp_dir().join(format!("kdist-svc-env-{}", std::process::id()));
        let data = DataDir::new(&root);
        data.ensure().unwrap();
        let config = NodeConfig::parse(
            "datastore: etcd\nservices:\n  etcd:\n    env: {GOGC: \"25\", X_Y: z}\n    \
             args: [\"--log-level=debug\", \"--data-dir=${DATA}/other\"]\n  \
             containerd:\n    env: {GOMEMLIMIT: \"\"}\n",
            Path::new("c.yaml"),
        )
        .unwrap();
        let specs = plan(&data, &config, &host(&config)).unwrap();
        let etcd = specs.iter().find(|s| s.name == "etcd").unwrap();
        let defaults: Definition = toml::from_str(Service::Etcd.definition()).unwrap();
        assert!(
            defaults.env.contains_key("GOGC"),
            "etcd ships a default GOGC: {:?}",
            defaults.env
        );
        assert_eq!(etcd.env.get("GOGC").map(String::as_str), Some("25"));
        assert_eq!(etcd.env.get("X_Y").map(String::as_str), Some("z"));
        write_default_args(&specs).unwrap();
        let argv = read_args(etcd).unwrap();
        let n = argv.len();
        assert_eq!(
            argv[n - 2..],
            [
                "--log-level=debug".to_string(),
                format!("--data-dir={}/other", root.display())
            ]
        );
        assert!(argv[..n - 2].iter().any(|a| a.starts_with("--data-dir=")));
        // an unknown ${VAR} names the setting
        let mut bad = etcd.clone();
        bad.extra_args = vec!["--x=${NOPE}".into()];
        let err = read_args(&bad).unwrap_err().to_string();
        assert!(
            err.contains("services.etcd.args[0]") && err.contains("NOPE"),
            "{err}"
        );
        // containerd keeps its default GOGC; an empty value removed its GOMEMLIMIT
        let containerd = specs.iter().find(|s| s.name == "containerd").unwrap();
        assert_eq!(containerd.env.get("GOGC").map(String::as_str), Some("50"));
        assert!(
            !containerd.env.contains_key("GOMEMLIMIT"),
            "{:?}",
            containerd.env
        );
        assert!(containerd.extra_args.is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Names of the services `plan` gives, in order.
    fn planned(data: &DataDir, config: &NodeConfig) -> Vec<String> {
        plan(data, config, &host(config))
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect()
    }

    #[test]
    fn disable_removes_services_and_refuses_unknown_names() {
        let data = DataDir::new("/tmp/kdist-plan-disable");
        let config = NodeConfig {
            disable: vec!["containerd".into()],
            ..NodeConfig::default()
        };
        let names = planned(&data, &config);
        assert!(!names.contains(&"containerd".to_string()), "{names:?}");
        assert!(names.contains(&"datastore".to_string()), "{names:?}");
        let config = NodeConfig {
            disable: vec!["kube-proxi".into()],
            ..NodeConfig::default()
        };
        let err = plan(&data, &config, &host(&config))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("kube-proxi") && err.contains("kube-proxy"),
            "{err}"
        );
    }

    #[test]
    fn kubelet_keeps_the_sandbox_image_containerd_runs() {
        let data = DataDir::new("/var/lib/kdist");
        let config = NodeConfig::default();
        let mut host = host(&config);
        host.sandbox_image =
            "public.ecr.aws/eks-distro/kubernetes/pause:v1.28.7-eks-1-28-12".into();
        let mut vars = variables(&data, &config, &host);
        vars.insert("KUBE_MINOR".into(), "28".into());
        let text = default_args(Service::Kubelet);
        let argv = parse_args(&text, &vars, Path::new("kubelet")).unwrap();
        assert!(
            argv.contains(
                &"--pod-infra-container-image=public.ecr.aws/eks-distro/kubernetes/pause:v1.28.7-eks-1-28-12"
                    .to_string()
            ),
            "{argv:?}"
        );
    }

    #[test]
    fn a_worker_plans_no_datastore() {
        let data = DataDir::new("/tmp/kdist-plan-worker");
        let config = NodeConfig {
            role: crate::config::Role::Worker,
            ..NodeConfig::default()
        };
        let names = planned(&data, &config);
        assert!(!names.contains(&"etcd".to_string()), "{names:?}");
        assert!(names.contains(&"containerd".to_string()), "{names:?}");
    }

    #[test]
    fn etcd_serves_loopback_and_the_node_ip_and_starts_alone_unless_joined() {
        let data = DataDir::new("/tmp/kdist-plan-etcd-urls");
        let mut config = NodeConfig {
            node_name: Some("n1".into()),
            ..NodeConfig::default()
        };
        config.network.node_ip = Some("192.0.2.10".parse().unwrap());
        let vars = variables(&data, &config, &host(&config));
        assert_eq!(
            vars["ETCD_LISTEN_PEER_URLS"],
            "https://127.0.0.1:2380,https://192.0.2.10:2380"
        );
        assert_eq!(
            vars["ETCD_LISTEN_CLIENT_URLS"],
            "https://127.0.0.1:2379,https://192.0.2.10:2379"
        );
        assert_eq!(vars["ETCD_INITIAL_CLUSTER"], "n1=https://192.0.2.10:2380");
        assert_eq!(vars["ETCD_INITIAL_CLUSTER_STATE"], "new");
        // a joined member starts with what the join left
        let mut joined = host(&config);
        joined.etcd_initial = Some((
            "n0=https://192.0.2.9:2380,n1=https://192.0.2.10:2380".into(),
            "existing".into(),
        ));
        let vars = variables(&data, &config, &joined);
        assert_eq!(vars["ETCD_INITIAL_CLUSTER_STATE"], "existing");
        assert!(vars["ETCD_INITIAL_CLUSTER"].starts_with("n0="));
        config.network.node_ip = Some("127.0.0.1".parse().unwrap());
        let vars = variables(&data, &config, &host(&config));
        assert_eq!(vars["ETCD_LISTEN_PEER_URLS"], "https://127.0.0.1:2380");
    }

    #[test]
    fn embedded_definitions_parse() {
        let data = DataDir::new("/tmp/kdist-plan-test");
        let default_plan =
            plan(&data, &NodeConfig::default(), &host(&NodeConfig::default())).unwrap();
        assert_eq!(default_plan[0].name, "datastore", "embedded is the default");
        assert_eq!(default_plan[0].binary, None);
        let config = NodeConfig {
            datastore: DatastoreKind::Etcd,
            ..NodeConfig::default()
        };
        let specs = plan(&data, &config, &host(&config)).unwrap();
        assert_eq!(specs[0].name, "etcd");
        assert_eq!(
            specs[0].probe,
            Probe::Http {
                url: "https://127.0.0.1:2379/health".into(),
                ca: Some("/tmp/kdist-plan-test/certs/etcd/ca.crt".into()),
                cert: Some("/tmp/kdist-plan-test/certs/etcd/healthcheck-client.crt".into()),
                key: Some("/tmp/kdist-plan-test/certs/etcd/healthcheck-client.key".into()),
                insecure: false,
            }
        );
        for spec in &specs {
            let service = service(&spec.name).unwrap();
            parse_args(service.default_args(), &spec.vars, Path::new("embedded")).unwrap();
        }
    }

    /// Effective command lines and generated configs per Kubernetes minor, compared with
    /// tests/golden/1.<minor>/. `KDIST_UPDATE_GOLDEN=1 cargo test golden` rewrites them.
    #[test]
    fn golden_args_and_configs_per_minor() {
        use crate::config::{DatastoreKind, NodeConfig};
        use crate::node::host::{CgroupVersion, HostFacts};
        use crate::node::kube;

        let data = DataDir::new("/var/lib/kdist");
        let mut config = NodeConfig {
            node_name: Some("node1".into()),
            ..NodeConfig::default()
        };
        config.network.node_ip = Some("192.0.2.10".parse().unwrap());
        let facts = HostFacts {
            cgroup: CgroupVersion::V1,
            systemd: false,
            oom_score_adj: 0,
            can_lower_oom_score_adj: false,
            nofile_hard: 20000,
            ipvs: false,
            br_netfilter: true,
            kernel_defaults_match: false,
            node_ip: "192.0.2.10".parse().unwrap(),
        };
        let mut inputs = kube::NodeInputs::new(&data, &config, &facts);
        inputs.resolv_conf = "/etc/resolv.conf".into();
        let update = std::env::var_os("KDIST_UPDATE_GOLDEN").is_some();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
        let mut mismatches = Vec::new();
        for minor in kube::MIN_MINOR..=kube::MAX_MINOR {
            let mut files: Vec<(String, String)> = Vec::new();
            for (datastore, suffix) in [
                (DatastoreKind::Embedded, ""),
                (DatastoreKind::Etcd, ".etcd"),
            ] {
                config.datastore = datastore;
                let mut vars = variables(&data, &config, &host(&config));
                vars.insert("KUBE_MINOR".into(), minor.to_string());
                for service in kube::SERVICES {
                    if !suffix.is_empty() && *service != Service::KubeApiserver {
                        continue;
                    }
                    let text = default_args(*service);
                    let argv = parse_args(&text, &vars, Path::new(service.as_str())).unwrap();
                    files.push((format!("{service}{suffix}.args"), argv.join("\n") + "\n"));
                }
            }
            files.push(("kubelet.yaml".into(), kube::kubelet_config(&inputs, minor)));
            files.push((
                "kube-proxy.yaml".into(),
                kube::kube_proxy_config(&inputs, minor),
            ));
            let dir = root.join(format!("1.{minor}"));
            for (name, text) in files {
                let path = dir.join(&name);
                if update {
                    std::fs::create_dir_all(&dir).unwrap();
                    std::fs::write(&path, &text).unwrap();
                } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                    mismatches.push(path.display().to_string());
                }
            }
        }
        assert!(
            mismatches.is_empty(),
            "generated output differs from golden files (review, then rerun with \
             KDIST_UPDATE_GOLDEN=1): {mismatches:#?}"
        );
    }
}
