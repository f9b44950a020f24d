use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::config::{DataDir, NodeConfig};
use crate::supervisor::{Client, SupervisorError};

use super::status::{print_table, wait_ready};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Install this file as the node's config.yaml (validated first).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Seconds to wait for every service to become ready.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let client = Client::new(&data);
    match client.status().await {
        Ok(report) => {
            println!("kdist is already running (pid {})", report.daemon.pid);
            print_table(&report);
            return Ok(if super::status::not_ready(&report).is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        Err(SupervisorError::NotRunning { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    data.ensure()?;
    let config = if let Some(file) = &args.config {
        NodeConfig::seed(&data, file)?
    } else {
        // fail here, with the file named, rather than in the detached daemon's log
        NodeConfig::load(&data)?
    };
    // EKS-D binaries first (installed with progress when none are), PATH as fallback
    let host = crate::supervisor::HostInputs::probe(&data, &config)?;
    let needed: Vec<String> = crate::supervisor::plan(&data, &config, &host)?
        .into_iter()
        .filter_map(|spec| spec.binary)
        .filter(|binary| !binary.contains('/'))
        .collect();
    crate::components::prepare_for_start(&data, &config.components, &needed).await?;
    let log_path = data.log_file("kdist");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the kdist executable")?;
    let mut child = std::process::Command::new(exe)
        .arg("--data-dir")
        .arg(data.root())
        .args(["daemon", "--detach"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("cannot start the kdist daemon")?;
    println!(
        "kdist daemon started (pid {}), log: {}",
        child.id(),
        log_path.display()
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    // wait for the control socket, noticing a daemon that dies at once (bad config, lock)
    loop {
        if let Some(status) = child.try_wait()? {
            let tail = crate::supervisor::log_tail(&log_path, 10).join("\n");
            anyhow::bail!("the kdist daemon exited ({status}); its log ends with:\n{tail}");
        }
        match client.status().await {
            Ok(_) => break,
            Err(SupervisorError::NotRunning { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let (report, ready) = wait_ready(&client, remaining).await?;
    print_table(&report);
    if ready && report.services.iter().any(|s| s.name == "kubelet") {
        let config = NodeConfig::load(&data)?;
        if config.network.cni == crate::config::Cni::None {
            // kubelet reports NotReady until the user's CNI is installed
            println!(
                "kdist is ready; network.cni is none: the node becomes Ready once you install \
                 a CNI for pod CIDR {} (see README, Networking)",
                config.network.pod_cidr
            );
            return Ok(ExitCode::SUCCESS);
        }
        let node = config.node_name();
        let worker = config.role == crate::config::Role::Worker;
        let kubeconfig = crate::node::rbac::node_kubeconfig(&data, &config);
        let node_data = data.clone();
        let node_name = node.clone();
        let node_ready = tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
            while std::time::Instant::now() < deadline.into_std() {
                if crate::node::rbac::node_ready(&node_data, &kubeconfig, &node_name)? {
                    return Ok(true);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Ok(false)
        })
        .await??;
        if !node_ready {
            let logs = if worker {
                "on a control-plane node and `kdist logs kubelet` here"
            } else {
                "and `kdist logs kubelet`"
            };
            eprintln!(
                "node {node} is not Ready after {} s; see `kdist kubectl describe node {node}` \
                 {logs}",
                args.timeout
            );
            return Ok(ExitCode::from(1));
        }
        println!("kdist is ready: node {node} is Ready.");
        if worker {
            println!("  kdist kubectl get nodes                 # on a control-plane node");
            return Ok(ExitCode::SUCCESS);
        }
        println!("  kdist kubectl get nodes                 # kubectl with the admin kubeconfig");
        println!("  kdist config > ~/.kube/config           # or use your own kubectl");
        Ok(ExitCode::SUCCESS)
    } else if ready {
        println!("kdist is ready.");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "not ready after {} s: {}; see `kdist status` and `kdist logs <service>`",
            args.timeout,
            super::status::not_ready(&report).join(", ")
        );
        Ok(ExitCode::from(1))
    }
}
