//! Service definitions (`services/<name>.toml`, embedded) and their editable args files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::error::SupervisorError;
use crate::config::{DataDir, DatastoreKind, NodeConfig};
use crate::fsutil;

/// A service as shipped in `services/`: the definition and the default args file.
struct Embedded {
    name: &'static str,
    definition: &'static str,
    args: &'static str,
}

const EMBEDDED: &[Embedded] = &[
    Embedded {
        name: "etcd",
        definition: include_str!("../../services/etcd.toml"),
        args: include_str!("../../services/etcd.args"),
    },
    Embedded {
        name: "containerd",
        definition: include_str!("../../services/containerd.toml"),
        args: include_str!("../../services/containerd.args"),
    },
];

/// How readiness is decided.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Probe {
    /// HTTP(S) GET answering 2xx; `ca`, `cert`, `key` are PEM paths for TLS.
    Http {
        url: String,
        ca: Option<String>,
        cert: Option<String>,
        key: Option<String>,
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
    binary: String,
    #[serde(default)]
    after: Vec<String>,
    #[serde(default = "default_grace")]
    stop_grace_secs: u64,
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
    /// Program name or path; resolved by [`resolve_binary`] at each start.
    pub binary: String,
    /// Services that must be ready before this one starts.
    pub after: Vec<String>,
    pub stop_grace: Duration,
    pub probe: Probe,
    /// The args file in the data dir, re-read at every start so edits apply.
    pub args_file: PathBuf,
    /// Variables expanded in the args file and the probe.
    pub vars: BTreeMap<String, String>,
}

/// The services this node runs, in dependency order, for `config`.
pub fn plan(data: &DataDir, config: &NodeConfig) -> Result<Vec<ServiceSpec>, SupervisorError> {
    let mut names: Vec<&str> = match config.datastore {
        DatastoreKind::Etcd => vec!["etcd"],
        // served in-process by the daemon, not a child
        DatastoreKind::Embedded => vec![],
    };
    names.push("containerd");
    let vars = variables(data, config);
    names
        .iter()
        .map(|name| {
            let embedded = embedded(name)?;
            let origin = PathBuf::from(format!("services/{name}.toml"));
            let def: Definition = toml::from_str(embedded.definition).map_err(|source| {
                SupervisorError::Definition {
                    path: origin.clone(),
                    source,
                }
            })?;
            let probe = expand_probe(&def.probe, &vars, &origin)?;
            Ok(ServiceSpec {
                name: name.to_string(),
                description: def.description,
                binary: def.binary,
                after: def.after,
                stop_grace: Duration::from_secs(def.stop_grace_secs),
                probe,
                args_file: data.args_file(name),
                vars: vars.clone(),
            })
        })
        .collect()
}

fn embedded(name: &str) -> Result<&'static Embedded, SupervisorError> {
    EMBEDDED
        .iter()
        .find(|e| e.name == name)
        .ok_or_else(|| SupervisorError::UnknownService {
            name: name.to_string(),
        })
}

/// Names of every service kdist knows, for error messages and completion.
pub fn known_services() -> Vec<&'static str> {
    EMBEDDED.iter().map(|e| e.name).collect()
}

/// Writes the default args file of each planned service that has none yet. Existing
/// files are the user's and are never overwritten.
pub fn write_default_args(specs: &[ServiceSpec]) -> Result<(), SupervisorError> {
    for spec in specs {
        if spec.args_file.exists() {
            continue;
        }
        let embedded = embedded(&spec.name)?;
        fsutil::atomic_write(&spec.args_file, embedded.args.as_bytes(), 0o644).map_err(
            |source| SupervisorError::Io {
                path: spec.args_file.clone(),
                source,
            },
        )?;
    }
    Ok(())
}

fn variables(data: &DataDir, config: &NodeConfig) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    vars.insert("DATA".into(), data.root().display().to_string());
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
    vars
}

/// Parses an args file: one flag per line, `#` comments and blank lines ignored,
/// `${VAR}` expanded. Returns the argv (without the program).
pub fn parse_args(
    text: &str,
    vars: &BTreeMap<String, String>,
    origin: &Path,
) -> Result<Vec<String>, SupervisorError> {
    let mut argv = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !line.starts_with('-') {
            return Err(SupervisorError::ArgsLine {
                path: origin.to_path_buf(),
                line: line_no,
                reason: format!("`{line}` is not a flag; each line must be one `--flag=value`"),
            });
        }
        let expanded = expand(line, vars).map_err(|reason| SupervisorError::ArgsLine {
            path: origin.to_path_buf(),
            line: line_no,
            reason,
        })?;
        argv.push(expanded);
    }
    Ok(argv)
}

/// Reads and parses the service's args file from the data dir.
pub fn read_args(spec: &ServiceSpec) -> Result<Vec<String>, SupervisorError> {
    let text = std::fs::read_to_string(&spec.args_file).map_err(|source| SupervisorError::Io {
        path: spec.args_file.clone(),
        source,
    })?;
    parse_args(&text, &spec.vars, &spec.args_file)
}

/// Expands `${NAME}` references; an unknown name is an error naming it.
pub fn expand(text: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in `{text}`"))?;
        let name = &after[..end];
        let value = vars.get(name).ok_or_else(|| {
            let known: Vec<_> = vars.keys().map(String::as_str).collect();
            format!("unknown variable ${{{name}}} (known: {})", known.join(", "))
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
        expand(s, vars).map_err(|reason| SupervisorError::ArgsLine {
            path: origin.to_path_buf(),
            line: 0,
            reason,
        })
    };
    let xo = |s: &Option<String>| s.as_deref().map(x).transpose();
    Ok(match probe {
        Probe::Http { url, ca, cert, key } => Probe::Http {
            url: x(url)?,
            ca: xo(ca)?,
            cert: xo(cert)?,
            key: xo(key)?,
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

/// Where a binary comes from, shown by `kdist status` and `kdist version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `<data>/components/current/bin`, installed from an EKS-D release.
    Components,
    /// Found on PATH: a documented fallback (e.g. Debian's etcd).
    Path,
    /// An absolute path from the service definition.
    Explicit,
}

/// Finds the program for `binary`: the active components first, then PATH.
pub fn resolve_binary(data: &DataDir, binary: &str) -> Result<(PathBuf, Origin), SupervisorError> {
    if binary.contains('/') {
        return Ok((PathBuf::from(binary), Origin::Explicit));
    }
    let installed = data
        .components_dir()
        .join("current")
        .join("bin")
        .join(binary);
    if installed.is_file() {
        return Ok((installed, Origin::Components));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(binary);
            if is_executable(&candidate) {
                return Ok((candidate, Origin::Path));
            }
        }
    }
    Err(SupervisorError::BinaryNotFound {
        binary: binary.to_string(),
        searched: installed,
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn embedded_definitions_parse() {
        let data = DataDir::new("/tmp/kdist-plan-test");
        let specs = plan(&data, &NodeConfig::default()).unwrap();
        assert_eq!(specs[0].name, "etcd");
        assert_eq!(
            specs[0].probe,
            Probe::Http {
                url: "http://127.0.0.1:2379/health".into(),
                ca: None,
                cert: None,
                key: None
            }
        );
        for spec in &specs {
            let embedded = embedded(&spec.name).unwrap();
            parse_args(embedded.args, &spec.vars, Path::new("embedded")).unwrap();
        }
    }
}
