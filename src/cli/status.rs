use std::process::ExitCode;
use std::time::Duration;

use crate::config::DataDir;
use crate::controllers::ControllerStatus;
use crate::supervisor::{Client, StatusReport, SupervisorError};

use super::Output;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Block until every service and controller is ready (exit 0) or the timeout passes
    /// (exit 1).
    #[arg(long)]
    pub wait_ready: bool,
    /// Seconds to wait with --wait-ready.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let client = Client::new(&data);
    let report = match client.status().await {
        Ok(report) => report,
        Err(e @ SupervisorError::NotRunning { .. }) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(3));
        }
        Err(e) => return Err(e.into()),
    };
    let (report, ready) = if args.wait_ready {
        wait_ready(&client, Duration::from_secs(args.timeout)).await?
    } else {
        let ready = not_ready(&report).is_empty();
        (report, ready)
    };
    let cluster = {
        let d = data.clone();
        tokio::task::spawn_blocking(move || {
            let config = crate::config::NodeConfig::load(&d).ok()?;
            crate::cluster::cluster_status(&d, &config)
        })
        .await
        .ok()
        .flatten()
    };
    match args.output {
        Output::Table => {
            print_table(&report);
            if let Some(cluster) = &cluster {
                print_cluster(cluster);
            }
        }
        Output::Json | Output::Yaml => {
            let mut value = serde_json::to_value(&report)?;
            if let (Some(cluster), Some(map)) = (&cluster, value.as_object_mut()) {
                map.insert("cluster".into(), serde_json::to_value(cluster)?);
            }
            if args.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", crate::yaml::to_string(&value)?);
            }
        }
    }
    if args.wait_ready && !ready {
        eprintln!(
            "not ready after {} s: {}",
            args.timeout,
            not_ready(&report).join(", ")
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// The controllers' states in `report` (none when the node runs no Kubernetes
/// components).
pub fn controllers(report: &StatusReport) -> Vec<ControllerStatus> {
    report
        .sections
        .get("controllers")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default()
}

/// The pod network's state in `report` (none when the node runs no Kubernetes
/// components).
pub fn network(report: &StatusReport) -> Option<crate::controllers::NetworkStatus> {
    report
        .sections
        .get("network")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// Every node's release in `report` (control planes only).
pub fn nodes(report: &StatusReport) -> Vec<crate::controllers::NodeRelease> {
    report
        .sections
        .get("nodes")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default()
}

fn print_nodes(nodes: &[crate::controllers::NodeRelease]) {
    println!();
    println!(
        "{:<24} {:<14} {:<6} {:<16} RELEASE",
        "NODE", "ROLE", "READY", "KUBELET"
    );
    for n in nodes {
        println!(
            "{:<24} {:<14} {:<6} {:<16} {}",
            n.name,
            if n.control_plane {
                "control-plane"
            } else {
                "worker"
            },
            if n.ready { "yes" } else { "no" },
            n.kubelet.as_deref().unwrap_or("-"),
            n.release.as_deref().unwrap_or("-"),
        );
    }
}

fn print_network(network: &crate::controllers::NetworkStatus) {
    println!();
    println!("NETWORK");
    println!("  {:<16} {}", "cni", network.cni);
    if let Some(backend) = &network.backend {
        println!("  {:<16} {backend}", "backend");
    }
    if let Some(cidr) = &network.pod_cidr {
        println!("  {:<16} {cidr}", "pod CIDR");
    }
    if let Some(mtu) = network.mtu {
        println!("  {:<16} {mtu}", "pod MTU");
    }
    println!("  {:<16} {}", "NetworkPolicy", network.network_policy);
    for peer in &network.peers {
        println!(
            "  peer {:<11} {:<15} {:<18} {}",
            peer.node,
            peer.node_ip.as_deref().unwrap_or("-"),
            peer.pod_cidr.as_deref().unwrap_or("-"),
            peer.route
        );
    }
}

/// What keeps the node from being ready: services by name, controllers as
/// `controller NAME`.
pub fn not_ready(report: &StatusReport) -> Vec<String> {
    let services = report.not_ready().into_iter().map(|s| s.name.clone());
    let controllers = controllers(report)
        .into_iter()
        .filter(|c| !c.ready)
        .map(|c| format!("controller {}", c.name));
    services.chain(controllers).collect()
}

/// Polls the daemon until every service and controller is ready or `timeout` passes.
pub async fn wait_ready(
    client: &Client,
    timeout: Duration,
) -> Result<(StatusReport, bool), SupervisorError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let report = client.status().await?;
        if not_ready(&report).is_empty() {
            return Ok((report, true));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok((report, false));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn human_bytes(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    format!("{:.1}M", bytes as f64 / MIB)
}

fn human_secs(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

pub fn print_table(report: &StatusReport) {
    let d = &report.daemon;
    println!(
        "kdist {} (pid {}, up {}, cpu {}, rss {}) data dir {}",
        d.version,
        d.pid,
        human_secs(d.uptime_secs),
        d.cpu_percent
            .map(|c| format!("{c:.1}%"))
            .unwrap_or("-".into()),
        d.rss_bytes.map(human_bytes).unwrap_or("-".into()),
        d.data_dir
    );
    println!(
        "{:<24} {:<10} {:>8} {:>8} {:>8} {:>6} {:>8}  LAST EXIT",
        "SERVICE", "STATE", "PID", "UPTIME", "RESTARTS", "CPU", "RSS"
    );
    let dash = || "-".to_string();
    for s in &report.services {
        println!(
            "{:<24} {:<10} {:>8} {:>8} {:>8} {:>6} {:>8}  {}",
            s.name,
            s.state.to_string(),
            s.pid.map(|p| p.to_string()).unwrap_or_else(dash),
            s.uptime_secs.map(human_secs).unwrap_or_else(dash),
            s.restarts,
            s.cpu_percent
                .map(|c| format!("{c:.1}%"))
                .unwrap_or_else(dash),
            s.rss_bytes.map(human_bytes).unwrap_or_else(dash),
            s.last_exit.clone().unwrap_or_else(dash),
        );
        if !s.ready
            && let Some(message) = &s.message
        {
            println!("    {message}");
        }
        for line in &s.log_tail {
            println!("    | {line}");
        }
    }
    let controllers = controllers(report);
    if !controllers.is_empty() {
        println!();
        println!(
            "{:<24} {:<10} {:>6} {:>8}  MESSAGE",
            "CONTROLLER", "STATE", "READY", "RESTARTS"
        );
        for c in &controllers {
            println!(
                "{:<24} {:<10} {:>6} {:>8}  {}",
                c.name,
                c.state.to_string(),
                if c.ready { "yes" } else { "no" },
                c.restarts,
                c.message.as_deref().unwrap_or("-"),
            );
        }
    }
    let nodes = nodes(report);
    if !nodes.is_empty() {
        print_nodes(&nodes);
    }
    if let Some(network) = network(report) {
        print_network(&network);
    }
    let addons = super::addons::addons(report);
    if !addons.is_empty() {
        println!();
        println!("{:<24} {:<8} {:<12} MESSAGE", "ADDON", "ENABLED", "STATE");
        for a in &addons {
            println!(
                "{:<24} {:<8} {:<12} {}",
                a.name,
                if a.enabled { "yes" } else { "no" },
                a.state.to_string(),
                a.message.as_deref().unwrap_or("-"),
            );
        }
    }
    if !report.host.is_empty() {
        println!();
        println!("HOST");
        for fact in &report.host {
            match &fact.note {
                Some(note) => println!("  {:<36} {}  ({note})", fact.name, fact.value),
                None => println!("  {:<36} {}", fact.name, fact.value),
            }
        }
    }
    for note in &report.notes {
        println!("note: {note}");
    }
}

fn print_cluster(cluster: &crate::cluster::ClusterStatus) {
    println!();
    println!("CLUSTER (this node: {})", cluster.role);
    if let Some(joined) = &cluster.joined {
        println!("  joined through {} as {}", joined.agent, joined.node_name);
    }
    if !cluster.nodes.is_empty() {
        println!("  {:<24} {:<14} ADDRESS", "NODE", "ROLE");
        for node in &cluster.nodes {
            println!(
                "  {:<24} {:<14} {}",
                node.name,
                node.role.to_string(),
                node.address
            );
        }
    }
    if !cluster.members.is_empty() {
        println!(
            "  {:<24} {:<17} {:<8} {:<8} PEER",
            "ETCD MEMBER", "ID", "VOTING", "HEALTH"
        );
        for m in &cluster.members {
            println!(
                "  {:<24} {:<17} {:<8} {:<8} {}",
                m.name,
                m.id,
                if m.learner { "learner" } else { "yes" },
                if m.healthy { "ok" } else { "down" },
                m.peer_url
            );
        }
    }
    if let Some(err) = &cluster.members_error {
        println!("  etcd members unknown: {err}");
    }
}
