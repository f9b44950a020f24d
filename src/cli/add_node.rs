use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;

use super::Output;
use crate::cluster::{Connection, TokenStore, cluster_ca, host_addresses, parse_ttl};
use crate::config::{DataDir, NodeConfig, Role};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long the token stays valid (e.g. 30m, 1h, 2d); no expiry when unset.
    #[arg(long)]
    pub ttl: Option<String>,
    /// The token only allows worker joins.
    #[arg(long, conflicts_with = "control_plane")]
    pub worker: bool,
    /// The token allows control-plane (and worker) joins (the default).
    #[arg(long)]
    pub control_plane: bool,
    /// How many joins the token allows.
    #[arg(long, default_value_t = 1)]
    pub uses: u32,
    /// List the usable tokens (ids, roles, uses left, expiry; never the tokens).
    #[arg(long, conflicts_with_all = ["revoke", "ttl", "worker", "control_plane"])]
    pub list: bool,
    /// Revoke the token with this id (from `--list`).
    #[arg(long, value_name = "TOKEN-ID")]
    pub revoke: Option<String>,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::load(&data)?;
    if config.role == Role::Worker {
        anyhow::bail!(crate::cluster::ClusterError::NotControlPlane);
    }
    let store = TokenStore::new(&data);
    if args.list {
        let tokens = store.list()?;
        if args.output != Output::Table {
            println!("{}", serde_json::to_string_pretty(&tokens)?);
            return Ok(ExitCode::SUCCESS);
        }
        println!("{:<10} {:<14} {:>9}  EXPIRES", "ID", "ROLE", "USES-LEFT");
        for t in tokens {
            let expires = t
                .expires_at
                .map_or_else(|| "never".into(), |e| crate::pki::rfc3339(e as i64));
            println!(
                "{:<10} {:<14} {:>9}  {expires}",
                t.id,
                t.role.to_string(),
                t.uses_left
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(id) = &args.revoke {
        let record = store.revoke(id)?;
        println!("revoked join token {}", record.id);
        return Ok(ExitCode::SUCCESS);
    }
    let ttl = args.ttl.as_deref().map(parse_ttl).transpose()?;
    let role = if args.worker {
        Role::Worker
    } else {
        Role::ControlPlane
    };
    let (_, fingerprint) = cluster_ca(&data)
        .context("no cluster CA yet: run `kdist start` (or `kdist certs init`) first")?;
    let (token, record) = store.create(role, args.uses, ttl)?;
    let mut addresses = host_addresses(&config.network.bridge);
    if let Some(ip) = config.network.node_ip {
        addresses.retain(|a| *a != ip);
        addresses.insert(0, ip);
    }
    let port = config.cluster.agent_port;
    let flag = if role == Role::Worker {
        " --worker"
    } else {
        ""
    };
    let lines: Vec<String> = addresses
        .iter()
        .map(|ip| {
            format!(
                "kdist join {}{flag}",
                Connection::render(SocketAddr::new(*ip, port), &token, &fingerprint)
            )
        })
        .collect();
    if args.output != Output::Table {
        // scripts run `kdist join` right away: give the daemon its moment to listen
        agent_answers(port).await;
        let value = serde_json::json!({
            "id": record.id,
            "token": token,
            "ca_sha256": fingerprint,
            "port": port,
            "role": role,
            "uses": record.uses_left,
            "expires_at": record.expires_at,
            "commands": lines,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Join token {} ({role}, {} use(s){}). On the new node run one of:",
        record.id,
        record.uses_left,
        ttl.map(|t| format!(", valid for {}s", t.as_secs()))
            .unwrap_or_default()
    );
    for line in &lines {
        println!("  {line}");
    }
    if !agent_answers(port).await {
        println!(
            "warning: the cluster agent does not answer on port {port} yet: is `kdist` running \
             on this node? See {}",
            data.log_file("kdist").display()
        );
    }
    if lines.is_empty() {
        println!(
            "  (no usable address found) kdist join <this-node-ip>:{port}/{token}/{fingerprint}{flag}"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits up to 5 s for the cluster agent (started by the daemon once a token exists).
async fn agent_answers(port: u16) -> bool {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(address).await.is_ok() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}
