use std::process::ExitCode;
use std::time::Duration;

use crate::config::addons::{KNOWN, default_enabled, known_names};
use crate::config::{DataDir, NodeConfig, Role};
use crate::controllers::addons::AddonStatus;
use crate::supervisor::{Client, StatusReport};

use super::Output;

/// How long enable/disable waits for the cluster to take the change.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Sub,
}

#[derive(Debug, clap::Subcommand)]
pub enum Sub {
    /// Show each addon: enabled, state (ready, progressing, failed with the reason), image.
    List {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Turn addons on (dns, metrics-server, storage, manifests).
    Enable {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Turn addons off; their objects are deleted from the cluster.
    Disable {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    match args.command {
        Sub::List { output } => list(data, output).await,
        Sub::Enable { names } => switch(data, names, true).await,
        Sub::Disable { names } => switch(data, names, false).await,
    }
}

/// The addons' states in a status report (empty when the controller has not run yet).
pub fn addons(report: &StatusReport) -> Vec<AddonStatus> {
    report
        .sections
        .get("addons")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default()
}

async fn list(data: DataDir, output: Output) -> anyhow::Result<ExitCode> {
    let from_daemon = match Client::new(&data).status().await {
        Ok(report) => addons(&report),
        Err(_) => Vec::new(),
    };
    let rows: Vec<serde_json::Value> = if from_daemon.is_empty() {
        // no daemon (or no controller yet): what this node's config.yaml says
        let config = {
            let d = data.clone();
            tokio::task::spawn_blocking(move || NodeConfig::load(&d)).await??
        };
        KNOWN
            .iter()
            .map(|(name, _)| {
                serde_json::json!({
                    "name": name,
                    "enabled": config.addons.enabled(name),
                    "state": "unknown",
                    "message": "the addons controller is not running on this node",
                })
            })
            .collect()
    } else {
        from_daemon
            .iter()
            .map(|a| serde_json::to_value(a).unwrap_or_default())
            .collect()
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(&rows)?),
        Output::Table => {
            println!(
                "{:<16} {:<8} {:<12} {:<40} IMAGE",
                "NAME", "ENABLED", "STATE", "MESSAGE"
            );
            for row in &rows {
                let s = |k: &str| row[k].as_str().unwrap_or("-").to_string();
                println!(
                    "{:<16} {:<8} {:<12} {:<40} {}",
                    s("name"),
                    if row["enabled"] == true { "yes" } else { "no" },
                    s("state"),
                    s("message"),
                    s("image"),
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn switch(data: DataDir, names: Vec<String>, on: bool) -> anyhow::Result<ExitCode> {
    if let Some(unknown) = names.iter().find(|n| default_enabled(n).is_none()) {
        anyhow::bail!("unknown addon `{unknown}`; known addons: {}", known_names());
    }
    let changes: Vec<(String, bool)> = names.iter().map(|n| (n.clone(), on)).collect();
    let config = {
        let (d, c) = (data.clone(), changes.clone());
        tokio::task::spawn_blocking(move || crate::config::addons::set_enabled(&d, &c)).await??
    };
    if config.role == Role::Worker {
        println!(
            "config.yaml updated; a worker runs no addons: run the command on a control plane"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let told = tokio::time::timeout(CLUSTER_TIMEOUT, async {
        let path = crate::controllers::kubeconfig_path(&data, &config);
        let client = crate::controllers::client_from_kubeconfig(&path).await?;
        crate::controllers::addons::set_enabled(&client, &changes).await
    })
    .await;
    let verb = if on { "enabled" } else { "disabled" };
    match told {
        Ok(Ok(())) => {
            println!(
                "{verb}: {} (the cluster applies it within seconds)",
                names.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(Err(e)) => {
            eprintln!(
                "{verb} in config.yaml, but the cluster was not told ({}): run the command \
                 again once the node runs (`kdist start`)",
                crate::report::error_chain(&e)
            );
            Ok(ExitCode::from(1))
        }
        Err(_) => {
            eprintln!(
                "{verb} in config.yaml, but the apiserver did not answer within {} s: run the \
                 command again once the node runs (`kdist start`)",
                CLUSTER_TIMEOUT.as_secs()
            );
            Ok(ExitCode::from(1))
        }
    }
}
