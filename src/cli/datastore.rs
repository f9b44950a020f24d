use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::Output;
use crate::config::{DataDir, DatastoreKind, ListenAddr, NodeConfig};
use crate::datastore::proto::etcdserverpb::{
    CompactionRequest, DefragmentRequest, StatusRequest, kv_client::KvClient,
    maintenance_client::MaintenanceClient,
};
use crate::datastore::remote::{self, RemoteStatus};
use crate::datastore::tls::{self, TlsFiles};
use crate::datastore::{self, Listeners, Server, ServerOptions, client};
use crate::supervisor::Client;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Serve the embedded datastore in the foreground (the daemon runs it in-process).
    Serve(ServeArgs),
    /// Show backend, size, revision, compacted revision and number of keys.
    Status(StatusArgs),
    /// Write a consistent copy of the datastore to FILE (works while it serves).
    Backup(BackupArgs),
    /// Replace the datastore with a backup (the daemon must be stopped).
    Restore(RestoreArgs),
    /// Drop history older than a revision (default: the current one).
    Compact(CompactArgs),
    /// Rewrite the database file to give free space back.
    Defrag(TargetArgs),
    /// Move the running node to another datastore (etcd or embedded), every key checked.
    Migrate(super::migrate::MigrateArgs),
}

#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// Database file of the embedded datastore [default: <data>/datastore/state.db].
    #[arg(long, value_name = "FILE")]
    pub db: Option<PathBuf>,
    /// Talk to this etcd v3 endpoint instead (unix:///path.sock, http://host:port,
    /// https://host:port); works with kdist's datastore and with a real etcd.
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// CA of an https endpoint [default: <data>/certs/etcd/ca.crt].
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Client certificate for an https endpoint
    /// [default: <data>/certs/etcd/healthcheck-client.crt].
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Its private key [default: <data>/certs/etcd/healthcheck-client.key].
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Database file [default: <data>/datastore/state.db].
    #[arg(long, value_name = "FILE")]
    pub db: Option<PathBuf>,
    /// Where to listen: unix:///path.sock, https://IP:PORT (TLS, client certificate of
    /// the etcd CA required; also a bare IP:PORT) or http://IP:PORT (plain TCP); repeat
    /// for several [default: unix://<data>/run/datastore.sock].
    #[arg(long, value_name = "URL")]
    pub listen: Vec<String>,
    /// Serving certificate for https listeners [default: <data>/certs/etcd/server.crt].
    #[arg(long, value_name = "FILE")]
    pub cert_file: Option<PathBuf>,
    /// Its private key [default: <data>/certs/etcd/server.key].
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// CA that signs client certificates [default: <data>/certs/etcd/ca.crt].
    #[arg(long, value_name = "FILE")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Member name reported by MemberList.
    #[arg(long, default_value = "kdist")]
    pub name: String,
    /// Seconds between watch progress notifications (etcd uses 600).
    #[arg(long, default_value_t = 600)]
    pub progress_interval: u64,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// File to write.
    pub file: PathBuf,
    /// Replace FILE if it exists.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub target: TargetArgs,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// Backup written by `kdist datastore backup` or the Maintenance Snapshot API.
    pub file: PathBuf,
    /// Replace an existing datastore.
    #[arg(long)]
    pub force: bool,
    /// Database file to restore to [default: <data>/datastore/state.db].
    #[arg(long, value_name = "FILE")]
    pub db: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct CompactArgs {
    /// Revision to compact to [default: the current revision].
    #[arg(long)]
    pub revision: Option<i64>,
    #[command(flatten)]
    pub target: TargetArgs,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    match args.command {
        Cmd::Serve(a) => serve(a, data).await,
        Cmd::Status(a) => status(a, data).await,
        Cmd::Backup(a) => backup(a, data).await,
        Cmd::Restore(a) => restore(a, data).await,
        Cmd::Compact(a) => compact(a, data).await,
        Cmd::Defrag(a) => defrag(a, data).await,
        Cmd::Migrate(a) => super::migrate::run(a, data).await,
    }
}

fn db_of(db: &Option<PathBuf>, data: &DataDir) -> PathBuf {
    db.clone().unwrap_or_else(|| datastore::db_path(data))
}

/// A datastore reached through the etcd API.
struct Remote {
    endpoint: String,
    tls: Option<TlsFiles>,
    /// `etcd` for this node's etcd child, `etcd-api` for an endpoint given by hand.
    backend: &'static str,
}

impl Remote {
    async fn connect(&self, data: &DataDir) -> anyhow::Result<Channel> {
        match client::connect_with(&self.endpoint, self.tls.as_ref()).await {
            Ok(channel) => Ok(channel),
            Err(err) if self.backend == "etcd" => {
                let hint = if Client::new(data).status().await.is_err() {
                    "the kdist daemon is not running: start it with `kdist start`"
                } else {
                    "etcd does not answer: see `kdist status` and `kdist logs etcd`"
                };
                Err(anyhow::Error::new(err)
                    .context(format!("datastore: etcd at {}: {hint}", self.endpoint)))
            }
            Err(err) => Err(err.into()),
        }
    }
}

/// The etcd API endpoint an operation goes through: `--endpoint`, or this node's etcd
/// when config.yaml says `datastore: etcd`; None for the embedded backend.
fn remote_of(target: &TargetArgs, data: &DataDir) -> anyhow::Result<Option<Remote>> {
    let defaults = TlsFiles::etcd_client(data);
    let tls = TlsFiles {
        ca: target.cacert.clone().unwrap_or(defaults.ca),
        cert: target.cert.clone().unwrap_or(defaults.cert),
        key: target.key.clone().unwrap_or(defaults.key),
    };
    if let Some(endpoint) = &target.endpoint {
        return Ok(Some(Remote {
            endpoint: endpoint.clone(),
            tls: endpoint.starts_with("https://").then_some(tls),
            backend: "etcd-api",
        }));
    }
    if target.db.is_some() {
        return Ok(None);
    }
    let config = NodeConfig::load(data)?;
    Ok((config.datastore == DatastoreKind::Etcd).then(|| Remote {
        endpoint: format!("https://127.0.0.1:{}", config.etcd.client_port),
        tls: Some(tls),
        backend: "etcd",
    }))
}

/// The endpoint to use for an operation: the one given or this node's etcd, else the
/// local socket when a datastore serves on it, else None (work on the file).
async fn live_endpoint(target: &TargetArgs, data: &DataDir) -> anyhow::Result<Option<Remote>> {
    if let Some(remote) = remote_of(target, data)? {
        return Ok(Some(remote));
    }
    if target.db.is_some() {
        return Ok(None);
    }
    let socket = data.datastore_socket();
    Ok(tokio::net::UnixStream::connect(&socket)
        .await
        .ok()
        .map(|_| Remote {
            endpoint: format!("unix://{}", socket.display()),
            tls: None,
            backend: "embedded",
        }))
}

async fn serve(args: ServeArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    let db = db_of(&args.db, &data);
    if let Some(dir) = db.parent()
        && !dir.as_os_str().is_empty()
    {
        crate::fsutil::ensure_dir(dir, 0o700)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let listen = if args.listen.is_empty() {
        vec![format!("unix://{}", data.datastore_socket().display())]
    } else {
        args.listen.clone()
    };
    let defaults = TlsFiles::etcd_server(&data);
    let tls_files = TlsFiles {
        ca: args.trusted_ca_file.clone().unwrap_or(defaults.ca),
        cert: args.cert_file.clone().unwrap_or(defaults.cert),
        key: args.key_file.clone().unwrap_or(defaults.key),
    };
    // The store is ready before anything can connect.
    let server = Server::open(&db)?;
    let mut listeners = Listeners::default();
    let mut urls = Vec::new();
    for url in &listen {
        if let Some(path) = url.strip_prefix("unix://") {
            if listeners.unix.is_some() {
                bail!("--listen {url}: only one unix socket can be served");
            }
            listeners.unix = Some(bind_unix(Path::new(path)).await?);
            urls.push(url.clone());
        } else {
            let listen: ListenAddr = url
                .parse()
                .map_err(|reason| anyhow::anyhow!("--listen {url}: {reason}"))?;
            let l = tokio::net::TcpListener::bind(listen.addr)
                .await
                .with_context(|| format!("--listen {url}: cannot bind"))?;
            urls.push(listen.url(l.local_addr()?));
            if listen.tls {
                let config = tls::server_config(&tls_files, listen.addr.ip(), true)
                    .with_context(|| format!("--listen {url}"))?;
                listeners.tls.push((l, config));
            } else {
                listeners.tcp.push(l);
            }
        }
    }
    let server = server.with_options(ServerOptions {
        name: args.name.clone(),
        client_urls: urls.clone(),
        progress_interval: std::time::Duration::from_secs(args.progress_interval.max(1)),
    });
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        on_signal.cancel();
    });
    tracing::info!(db = %db.display(), listen = ?urls, "datastore serving");
    server.serve(listeners, shutdown).await?;
    if let Some(path) = listen.iter().find_map(|u| u.strip_prefix("unix://")) {
        let _ = std::fs::remove_file(path);
    }
    Ok(ExitCode::SUCCESS)
}

async fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        crate::fsutil::ensure_dir(dir, 0o700)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!(
                "{} is in use by a running datastore; stop it first",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}

async fn status(args: StatusArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    if let Some(remote) = remote_of(&args.target, &data)? {
        let channel = remote.connect(&data).await?;
        let report = remote::status(channel, &remote.endpoint, remote.backend).await?;
        match args.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            Output::Yaml => print!("{}", crate::yaml::to_string(&report)?),
            Output::Table => print_remote_status(&report),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let db = db_of(&args.target.db, &data);
    let report = datastore::local_status(&db)?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Yaml => print!("{}", crate::yaml::to_string(&report)?),
        Output::Table => {
            println!("backend:            {}", report.backend);
            println!("database:           {}", report.db.display());
            println!("size:               {} bytes", report.size_bytes);
            println!("revision:           {}", report.revision);
            match report.compacted_revision {
                Some(r) => println!("compacted revision: {r}"),
                None => println!("compacted revision: none"),
            }
            println!("keys:               {}", report.keys);
            println!("leases:             {}", report.leases);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn backup(args: BackupArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    if let Some(remote) = remote_of(&args.target, &data)? {
        if args.file.exists() && !args.force {
            bail!(
                "{} already exists: pass --force to replace it",
                args.file.display()
            );
        }
        let channel = remote.connect(&data).await?;
        let bytes = remote::save_snapshot(channel, &remote.endpoint, &args.file).await?;
        println!(
            "wrote snapshot of {} ({bytes} bytes) to {}",
            remote.endpoint,
            args.file.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let db = db_of(&args.target.db, &data);
    let (from, to, force) = (db.clone(), args.file.clone(), args.force);
    tokio::task::spawn_blocking(move || datastore::backup_file(&from, &to, force)).await??;
    println!("backed up {} to {}", db.display(), args.file.display());
    Ok(ExitCode::SUCCESS)
}

async fn restore(args: RestoreArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    let db = db_of(&args.db, &data);
    if Client::new(&data).status().await.is_ok() {
        bail!("the kdist daemon is running: stop it with `kdist stop` before a restore");
    }
    if args.db.is_none() {
        let config = NodeConfig::load(&data)?;
        if config.datastore == DatastoreKind::Etcd {
            return restore_etcd(args, data, config).await;
        }
    }
    if tokio::net::UnixStream::connect(data.datastore_socket())
        .await
        .is_ok()
    {
        bail!(
            "a datastore is serving on {}: stop it before a restore",
            data.datastore_socket().display()
        );
    }
    let (from, to, force) = (args.file.clone(), db.clone(), args.force);
    tokio::task::spawn_blocking(move || datastore::restore_file(&from, &to, force)).await??;
    println!("restored {} from {}", db.display(), args.file.display());
    Ok(ExitCode::SUCCESS)
}

async fn compact(args: CompactArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    if let Some(remote) = live_endpoint(&args.target, &data).await? {
        let channel = remote.connect(&data).await?;
        let revision = match args.revision {
            Some(r) => r,
            None => MaintenanceClient::new(channel.clone())
                .status(StatusRequest {})
                .await
                .context("Status failed")?
                .into_inner()
                .header
                .map_or(0, |h| h.revision),
        };
        KvClient::new(channel)
            .compact(CompactionRequest {
                revision,
                physical: true,
            })
            .await
            .with_context(|| format!("Compact to revision {revision} failed"))?;
        println!("compacted to revision {revision}");
        return Ok(ExitCode::SUCCESS);
    }
    let db = db_of(&args.target.db, &data);
    let revision = datastore::compact_file(&db, args.revision).await?;
    println!("compacted to revision {revision}");
    Ok(ExitCode::SUCCESS)
}

async fn defrag(args: TargetArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    if let Some(remote) = live_endpoint(&args, &data).await? {
        let channel = remote.connect(&data).await?;
        MaintenanceClient::new(channel)
            .defragment(DefragmentRequest {})
            .await
            .context("Defragment failed")?;
        println!("defragmented {}", remote.endpoint);
        return Ok(ExitCode::SUCCESS);
    }
    let db = db_of(&args.db, &data);
    datastore::defrag_file(&db).await?;
    println!("defragmented {}", db.display());
    Ok(ExitCode::SUCCESS)
}

fn print_remote_status(report: &RemoteStatus) {
    println!(
        "backend:            {} ({})",
        report.backend, report.endpoint
    );
    println!("version:            {}", report.version);
    println!(
        "size:               {} bytes ({} in use)",
        report.size_bytes, report.size_in_use_bytes
    );
    println!("revision:           {}", report.revision);
    match report.compacted_revision {
        Some(r) => println!("compacted revision: {r}"),
        None => println!("compacted revision: none"),
    }
    println!("keys:               {}", report.keys);
    println!(
        "raft:               leader {}, term {}, index {}",
        report.leader, report.raft_term, report.raft_index
    );
    for m in &report.members {
        let learner = if m.learner { " (learner)" } else { "" };
        println!(
            "member:             {} {}{learner} {}",
            m.id,
            m.name,
            m.client_urls.join(",")
        );
    }
    if report.healthy {
        println!("health:             ok");
    } else {
        println!("health:             {}", report.alarms.join("; "));
    }
}

/// `datastore: etcd`: restores the snapshot into the etcd child's data dir with etcd's
/// own tool, as the member the daemon starts (name, cluster, peer URLs of args/etcd).
async fn restore_etcd(
    args: RestoreArgs,
    data: DataDir,
    config: NodeConfig,
) -> anyhow::Result<ExitCode> {
    let port = config.etcd.client_port;
    if tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
    {
        bail!(
            "something serves on 127.0.0.1:{port}, etcd's client port (an etcd left \
             running?): stop it before a restore"
        );
    }
    let host = crate::supervisor::HostInputs::probe(&data, &config)?;
    let specs = crate::supervisor::plan(&data, &config, &host)?;
    let spec = specs
        .iter()
        .find(|s| s.name == "etcd")
        .context("this node runs no etcd (a worker?): nothing to restore")?;
    // the daemon writes it at its first start; a node restored before that gets it now
    crate::supervisor::write_default_args(std::slice::from_ref(spec))?;
    let argv = crate::supervisor::read_args(spec)?;
    let flag = |name: &str| -> anyhow::Result<String> {
        flag_value(&argv, name).with_context(|| {
            format!(
                "{} has no {name}=...: it is needed to restore the member",
                spec.args_file.display()
            )
        })
    };
    let data_dir = flag_value(&argv, "--data-dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| data.datastore_dir().join("etcd"));
    let (tool, _) = crate::components::resolve_binary(&data, "etcdutl")
        .or_else(|_| crate::components::resolve_binary(&data, "etcdctl"))
        .map_err(|_| {
            anyhow::anyhow!(
                "neither etcdutl nor etcdctl is installed (looked in {} and PATH): \
                 install the etcd component or Debian's etcd-client",
                data.components_dir().join("current/bin").display()
            )
        })?;
    let restore = datastore::EtcdRestore {
        tool: tool.clone(),
        snapshot: args.file.clone(),
        data_dir: data_dir.clone(),
        name: flag("--name")?,
        initial_cluster: flag("--initial-cluster")?,
        initial_advertise_peer_urls: flag("--initial-advertise-peer-urls")?,
    };
    let force = args.force;
    tokio::task::spawn_blocking(move || restore.run(force)).await??;
    println!(
        "restored {} from {} with {}; start the node with `kdist start`",
        data_dir.display(),
        args.file.display(),
        tool.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The value of `--name=value` or `--name value` in an argv.
fn flag_value(argv: &[String], name: &str) -> Option<String> {
    let mut args = argv.iter();
    while let Some(arg) = args.next() {
        if arg == name {
            return args.next().cloned();
        }
        if let Some(value) = arg.strip_prefix(name).and_then(|v| v.strip_prefix('=')) {
            return Some(value.to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_in_both_forms() {
        let argv: Vec<String> = ["--name=n1", "--data-dir", "/d", "--name-other=x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(flag_value(&argv, "--name").as_deref(), Some("n1"));
        assert_eq!(flag_value(&argv, "--data-dir").as_deref(), Some("/d"));
        assert_eq!(flag_value(&argv, "--initial-cluster"), None);
    }
}
