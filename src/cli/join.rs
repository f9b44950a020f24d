use std::process::ExitCode;

use crate::cluster::Connection;
use crate::config::{DataDir, Role};
use crate::supervisor::Client;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The connection string printed by `kdist add-node`: <host>:<port>/<token>/<ca-sha256>;
    /// `-` reads it from stdin (keeps the token out of the process list).
    pub connection: String,
    /// Join as a worker (containerd, kubelet, kube-proxy only).
    #[arg(long)]
    pub worker: bool,
    /// Only write this node's certificates and configuration; start it later with
    /// `kdist start`.
    #[arg(long)]
    pub no_start: bool,
    /// Seconds to wait for every service and the Node to become ready after joining.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let text = if args.connection == "-" {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line.trim().to_string()
    } else {
        args.connection.clone()
    };
    let conn = Connection::parse(&text)?;
    if Client::new(&data).status().await.is_ok() {
        anyhow::bail!(
            "kdist is running on this node ({}); run `kdist stop` first, then join",
            data.root().display()
        );
    }
    data.ensure()?;
    let role = if args.worker {
        Role::Worker
    } else {
        Role::ControlPlane
    };
    let joined = crate::cluster::join(&data, &conn, role).await?;
    let summary = format!(
        "Joined the cluster of {} as {} `{}`; apiserver {}.",
        joined.agent,
        joined.role,
        joined.node_name,
        joined.apiserver_endpoints.join(", ")
    );
    if args.no_start {
        println!("{summary} Run `kdist start` to start this node.");
        return Ok(ExitCode::SUCCESS);
    }
    println!("{summary} Starting this node.");
    super::start::run(
        super::start::Args {
            config: None,
            timeout: args.timeout,
        },
        data,
    )
    .await
}
