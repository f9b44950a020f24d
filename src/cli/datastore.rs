use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use super::Output;
use crate::config::{DataDir, ListenAddr};
use crate::datastore::proto::etcdserverpb::{
    CompactionRequest, DefragmentRequest, RangeRequest, SnapshotRequest, StatusRequest,
    kv_client::KvClient, maintenance_client::MaintenanceClient,
};
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
}

#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// Database file of the embedded datastore [default: <data>/datastore/state.db].
    #[arg(long, value_name = "FILE")]
    pub db: Option<PathBuf>,
    /// Talk to this etcd v3 endpoint instead (unix:///path.sock, http://host:port);
    /// works with kdist's datastore and with a real etcd.
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
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
    }
}

fn db_of(db: &Option<PathBuf>, data: &DataDir) -> PathBuf {
    db.clone().unwrap_or_else(|| datastore::db_path(data))
}

/// The endpoint to use for an operation: the one given, else the local socket when a
/// datastore serves on it, else None (work on the file).
async fn live_endpoint(target: &TargetArgs, data: &DataDir) -> Option<String> {
    if let Some(e) = &target.endpoint {
        return Some(e.clone());
    }
    if target.db.is_some() {
        return None;
    }
    let socket = data.datastore_socket();
    tokio::net::UnixStream::connect(&socket)
        .await
        .ok()
        .map(|_| format!("unix://{}", socket.display()))
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

#[derive(Debug, serde::Serialize)]
struct RemoteStatus {
    backend: String,
    endpoint: String,
    version: String,
    size_bytes: i64,
    revision: i64,
    keys: i64,
}

async fn status(args: StatusArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    if let Some(endpoint) = &args.target.endpoint {
        let channel = client::connect(endpoint).await?;
        let s = MaintenanceClient::new(channel.clone())
            .status(StatusRequest {})
            .await
            .context("Status failed")?
            .into_inner();
        let count = KvClient::new(channel)
            .range(RangeRequest {
                key: vec![0],
                range_end: vec![0],
                count_only: true,
                ..Default::default()
            })
            .await
            .context("Range failed")?
            .into_inner();
        let report = RemoteStatus {
            backend: "etcd-api".into(),
            endpoint: endpoint.clone(),
            version: s.version,
            size_bytes: s.db_size,
            revision: s.header.map_or(0, |h| h.revision),
            keys: count.count,
        };
        match args.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            Output::Yaml => print!("{}", serde_yaml::to_string(&report)?),
            Output::Table => {
                println!("backend:   {} ({})", report.backend, report.endpoint);
                println!("version:   {}", report.version);
                println!("size:      {} bytes", report.size_bytes);
                println!("revision:  {}", report.revision);
                println!("keys:      {}", report.keys);
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let db = db_of(&args.target.db, &data);
    let report = datastore::local_status(&db)?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&report)?),
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
    if let Some(endpoint) = &args.target.endpoint {
        if args.file.exists() && !args.force {
            bail!(
                "{} already exists: pass --force to replace it",
                args.file.display()
            );
        }
        let channel = client::connect(endpoint).await?;
        let mut stream = MaintenanceClient::new(channel)
            .snapshot(SnapshotRequest {})
            .await
            .context("Snapshot failed")?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await.context("Snapshot stream failed")? {
            bytes.extend_from_slice(&chunk.blob);
        }
        crate::fsutil::atomic_write(&args.file, &bytes, 0o600)
            .with_context(|| format!("cannot write {}", args.file.display()))?;
        println!("wrote snapshot of {endpoint} to {}", args.file.display());
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
    if let Some(endpoint) = live_endpoint(&args.target, &data).await {
        let channel = client::connect(&endpoint).await?;
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
    if let Some(endpoint) = live_endpoint(&args, &data).await {
        let channel = client::connect(&endpoint).await?;
        MaintenanceClient::new(channel)
            .defragment(DefragmentRequest {})
            .await
            .context("Defragment failed")?;
        println!("defragmented");
        return Ok(ExitCode::SUCCESS);
    }
    let db = db_of(&args.db, &data);
    datastore::defrag_file(&db).await?;
    println!("defragmented {}", db.display());
    Ok(ExitCode::SUCCESS)
}
