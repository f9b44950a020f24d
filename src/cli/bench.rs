//! `kdist bench`: measurements reported as figures and ratios against the real peer
//! measured in the same run, never asserted in tests.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use crate::config::{DataDir, NodeConfig, Role};
use crate::datastore::bench::{self, BenchOptions, BenchResult};
use crate::node::ProcessUsage;
use crate::supervisor::{Client, SupervisorError};

use super::Output;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// Idle RSS and CPU of the running daemon and of each supervised service over a
    /// window (run `kdist start` first).
    Idle {
        /// Length of the measurement window.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// From `kdist start` to the apiserver ready and the node Ready, then the idle
    /// memory of the node's whole process tree (the daemon, every service, their
    /// children, containerd's shims and containers), per service and in total. The
    /// daemon of the data dir must be stopped; each run starts it and stops it again.
    Node(NodeArgs),
    /// Same workload against each etcd v3 endpoint (puts from concurrent clients, ranges
    /// of many keys, watch delivery latency); ratios are against the first endpoint.
    Datastore(DatastoreArgs),
}

#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// A config.yaml to install before a run (as `kdist start --config`); repeat it to
    /// compare configurations, one run each, in order. Without it: one run with the data
    /// dir's own config.yaml.
    #[arg(long = "config", value_name = "FILE")]
    pub configs: Vec<PathBuf>,
    /// Seconds to stay idle after the node is Ready before memory is measured.
    #[arg(long, default_value_t = 120)]
    pub seconds: u64,
    /// Seconds to wait for the node to become Ready.
    #[arg(long, default_value_t = 180)]
    pub timeout: u64,
    /// Leave the daemon of the last run running.
    #[arg(long)]
    pub keep_running: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct DatastoreArgs {
    /// Endpoints as NAME=URL or URL (unix:///path.sock, http://host:port). Every key the
    /// benchmark writes lives under /kdist-bench/ and is deleted afterwards.
    #[arg(long, num_args = 1.., required = true, value_name = "URL")]
    pub endpoints: Vec<String>,
    /// Concurrent writers in the put phase.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Connections the writers share, as etcd's `benchmark --conns` (at most --clients).
    #[arg(long, default_value_t = 16)]
    pub conns: usize,
    /// Seconds of the put phase.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    #[arg(long, default_value_t = 1000)]
    pub range_keys: usize,
    #[arg(long, default_value_t = 200)]
    pub ranges: usize,
    /// Puts whose events are timed (one at a time); p99 of 2,000 is the 20th worst, so a
    /// single stall of the machine moves it less than with fewer.
    #[arg(long, default_value_t = 2000)]
    pub watch_events: usize,
    /// Runs of the whole workload per endpoint, the endpoints taking turns; each figure
    /// reported is its median over the rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    match args.what {
        What::Idle { seconds } => idle(seconds, data).await,
        What::Node(a) => node(a, data).await,
        What::Datastore(a) => datastore(a).await,
    }
}

/// The targets of a single node (issue #6): seconds from `kdist start` to the apiserver
/// ready and to the node Ready, and the idle RSS of the whole tree in bytes (450 MB).
const TARGET_APISERVER_SECS: f64 = 10.0;
const TARGET_NODE_SECS: f64 = 30.0;
const TARGET_RSS_BYTES: u64 = 450_000_000;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, serde::Serialize)]
struct GroupMemory {
    name: String,
    processes: usize,
    rss_mib: f64,
    pss_mib: f64,
    /// The anonymous part of the RSS (Go heap, stacks); the rest is program file pages.
    anon_mib: f64,
    /// CPU over the idle window, % of one core.
    cpu_percent: f64,
}

#[derive(Debug, serde::Serialize)]
struct NodeRun {
    /// The config file of the run, or `config.yaml` of the data dir.
    config: String,
    /// Seconds from `kdist start` until kube-apiserver passed its /readyz probe.
    apiserver_ready_secs: Option<f64>,
    /// Seconds from `kdist start` until the node's Ready condition was True.
    node_ready_secs: Option<f64>,
    /// Seconds from `kdist start` until every service was ready.
    all_ready_secs: Option<f64>,
    idle_secs: u64,
    groups: Vec<GroupMemory>,
    processes: usize,
    total_rss_mib: f64,
    total_pss_mib: f64,
    total_anon_mib: f64,
    total_cpu_percent: f64,
    /// The highest total RSS seen while idle (sampled every 5 s).
    peak_rss_mib: f64,
    targets_met: bool,
}

fn mib(bytes: u64) -> f64 {
    (bytes as f64 / MIB * 10.0).round() / 10.0
}

/// CPU time of `p` spent since `before` was sampled (all of it for a newer process).
fn cpu_since(p: &ProcessUsage, before: &BTreeMap<i32, u64>) -> u64 {
    p.cpu_ms
        .saturating_sub(before.get(&p.pid).copied().unwrap_or(0))
}

/// Sums the tree per group, in the supervisor's service order (kdist first, pods last);
/// CPU is what each used since `before` over `window_ms`.
fn group_memory(
    tree: &[ProcessUsage],
    before: &BTreeMap<i32, u64>,
    window_ms: u64,
    order: &[String],
) -> Vec<GroupMemory> {
    let mut sums: BTreeMap<&str, (usize, u64, u64, u64, u64)> = BTreeMap::new();
    for p in tree {
        let e = sums.entry(p.group.as_str()).or_default();
        e.0 += 1;
        e.1 += p.rss_bytes;
        e.2 += p.pss_bytes.unwrap_or(p.rss_bytes);
        e.3 += cpu_since(p, before);
        e.4 += p.anon_bytes.unwrap_or(p.rss_bytes);
    }
    let rank = |name: &str| {
        if name == crate::node::DAEMON_GROUP {
            0
        } else if name == crate::node::PODS_GROUP {
            usize::MAX
        } else {
            order
                .iter()
                .position(|o| o == name)
                .map_or(usize::MAX - 1, |i| i + 1)
        }
    };
    let mut groups: Vec<GroupMemory> = sums
        .into_iter()
        .map(|(name, (processes, rss, pss, cpu, anon))| GroupMemory {
            name: name.to_string(),
            processes,
            rss_mib: mib(rss),
            pss_mib: mib(pss),
            anon_mib: mib(anon),
            cpu_percent: percent(cpu, window_ms),
        })
        .collect();
    groups.sort_by_key(|g| rank(&g.name));
    groups
}

/// Runs `kdist <args>` on `data` with this executable.
fn kdist_command(data: &DataDir, args: &[&str]) -> anyhow::Result<tokio::process::Command> {
    let exe = std::env::current_exe().context("cannot find the kdist executable")?;
    let mut command = tokio::process::Command::new(exe);
    command.arg("--data-dir").arg(data.root()).args(args);
    Ok(command)
}

async fn node(args: NodeArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    let configs: Vec<Option<PathBuf>> = if args.configs.is_empty() {
        vec![None]
    } else {
        args.configs.iter().cloned().map(Some).collect()
    };
    let mut runs = Vec::new();
    for (i, config) in configs.iter().enumerate() {
        let last = i + 1 == configs.len();
        let run = node_run(&args, &data, config.as_ref(), !(last && args.keep_running)).await?;
        if args.output == Output::Table {
            print_node_run(&run);
        }
        runs.push(run);
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&runs)?),
        Output::Yaml => print!("{}", crate::yaml::to_string(&runs)?),
        Output::Table => {
            if let Some((base, rest)) = runs.split_first() {
                for r in rest {
                    println!(
                        "{} vs {}: total RSS {:+.1} MiB ({:.2}x), node Ready {:+.1} s",
                        r.config,
                        base.config,
                        r.total_rss_mib - base.total_rss_mib,
                        r.total_rss_mib / base.total_rss_mib.max(f64::MIN_POSITIVE),
                        r.node_ready_secs.unwrap_or(f64::NAN)
                            - base.node_ready_secs.unwrap_or(f64::NAN),
                    );
                }
            }
        }
    }
    // figures, not a verdict: `targets_met` in the output says how they compare
    Ok(ExitCode::SUCCESS)
}

async fn node_run(
    args: &NodeArgs,
    data: &DataDir,
    config: Option<&PathBuf>,
    stop_after: bool,
) -> anyhow::Result<NodeRun> {
    let client = Client::new(data);
    refuse_running_daemon(&client, data).await?;
    let label = config.map_or_else(
        || data.config_file().display().to_string(),
        |c| c.display().to_string(),
    );
    eprintln!(
        "starting kdist on {} with {label} ...",
        data.root().display()
    );
    // the node's name and role come from the config this run installs, when it has one
    let node_config = match config {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            NodeConfig::parse(&text, file)?
        }
        None => NodeConfig::load(data)?,
    };
    // A worker has no apiserver of its own: its kubelet's credentials read its Node from
    // the control plane's.
    let worker = node_config.role == Role::Worker;
    let startup = start_and_time(args, data, config, &client, &node_config).await?;
    eprintln!("idle for {} s ...", args.seconds);
    let pid = i32::try_from(startup.daemon_pid).context("daemon pid out of range")?;
    let idle = sample_idle(data, pid, args.seconds).await?;
    let tree = &idle.tree;
    let order: Vec<String> = client
        .status()
        .await
        .map(|r| r.services.into_iter().map(|s| s.name).collect())
        .unwrap_or_default();
    let total_rss: u64 = tree.iter().map(|p| p.rss_bytes).sum();
    let total_anon: u64 = tree
        .iter()
        .map(|p| p.anon_bytes.unwrap_or(p.rss_bytes))
        .sum();
    let total_pss: u64 = tree
        .iter()
        .map(|p| p.pss_bytes.unwrap_or(p.rss_bytes))
        .sum();
    let total_cpu: u64 = tree.iter().map(|p| cpu_since(p, &idle.before)).sum();
    if stop_after {
        stop_node(data).await?;
    }
    let Startup {
        apiserver,
        node_ready,
        all_ready,
        ..
    } = startup;
    // a worker runs no apiserver, so only its node and memory targets apply
    let targets_met = (worker || apiserver.is_some_and(|s| s <= TARGET_APISERVER_SECS))
        && node_ready.is_some_and(|s| s <= TARGET_NODE_SECS)
        && total_rss <= TARGET_RSS_BYTES;
    Ok(NodeRun {
        config: label,
        apiserver_ready_secs: apiserver.map(round1),
        node_ready_secs: node_ready.map(round1),
        all_ready_secs: all_ready.map(round1),
        idle_secs: args.seconds,
        groups: group_memory(tree, &idle.before, idle.window_ms, &order),
        processes: tree.len(),
        total_rss_mib: mib(total_rss),
        total_pss_mib: mib(total_pss),
        total_anon_mib: mib(total_anon),
        total_cpu_percent: percent(total_cpu, idle.window_ms),
        peak_rss_mib: mib(idle.peak),
        targets_met,
    })
}

/// `kdist bench node` measures from start: a daemon already running is an error.
async fn refuse_running_daemon(client: &Client, data: &DataDir) -> anyhow::Result<()> {
    match client.status().await {
        Err(SupervisorError::NotRunning { .. }) => Ok(()),
        Ok(report) => anyhow::bail!(
            "a kdist daemon (pid {}) runs on {}: `kdist bench node` measures from start; \
             run `kdist stop` first, or measure the running node with `kdist bench idle`",
            report.daemon.pid,
            data.root().display()
        ),
        Err(e) => Err(e.into()),
    }
}

/// When the start's milestones were reached, in seconds since `kdist start` ran.
struct Startup {
    daemon_pid: u32,
    apiserver: Option<f64>,
    all_ready: Option<f64>,
    node_ready: Option<f64>,
}

/// Runs `kdist start` and watches the daemon's status until every service and the
/// Node are ready (or `args.timeout` passes), noting when each milestone came.
async fn start_and_time(
    args: &NodeArgs,
    data: &DataDir,
    config: Option<&PathBuf>,
    client: &Client,
    node_config: &NodeConfig,
) -> anyhow::Result<Startup> {
    let timeout = args.timeout.to_string();
    let mut start_args = vec!["start", "--timeout", &timeout];
    let config_text;
    if let Some(c) = config {
        config_text = c.display().to_string();
        start_args.extend(["--config", &config_text]);
    }
    let node_name = node_config.node_name();
    let worker = node_config.role == Role::Worker;
    let kubeconfig = crate::node::rbac::node_kubeconfig(data, node_config);
    let started = Instant::now();
    let start = kdist_command(data, &start_args)?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `kdist start`")?;
    let output = tokio::spawn(start.wait_with_output());
    let deadline = started + Duration::from_secs(args.timeout);
    let (mut apiserver, mut all_ready, mut node_ready) = (None, None, None);
    let mut daemon_pid = None;
    while Instant::now() < deadline {
        if let Ok(report) = client.status().await {
            daemon_pid = Some(report.daemon.pid);
            let at = started.elapsed().as_secs_f64();
            let ready = |name: &str| report.services.iter().any(|s| s.name == name && s.ready);
            if apiserver.is_none() && ready("kube-apiserver") {
                apiserver = Some(at);
            }
            if all_ready.is_none() && report.all_ready() {
                all_ready = Some(at);
            }
            let has_kubelet = report.services.iter().any(|s| s.name == "kubelet");
            if (apiserver.is_some() || worker) && has_kubelet && node_ready.is_none() {
                let (d, n, k) = (data.clone(), node_name.clone(), kubeconfig.clone());
                let ready = tokio::task::spawn_blocking(move || {
                    crate::node::rbac::node_ready(&d, &k, &n).unwrap_or(false)
                })
                .await?;
                if ready {
                    node_ready = Some(started.elapsed().as_secs_f64());
                }
            }
            if all_ready.is_some() && (!has_kubelet || node_ready.is_some()) {
                break;
            }
        } else if output.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = output.await?.context("cannot wait for `kdist start`")?;
    let (status, out, err) = (start.status, start.stdout, start.stderr);
    let Some(daemon_pid) = daemon_pid else {
        anyhow::bail!(
            "`kdist start` ({status}) brought no daemon up:\n{}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        );
    };
    if all_ready.is_none() {
        eprintln!(
            "warning: not every service was ready within {} s; `kdist start` said:\n{}{}",
            args.timeout,
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        );
    }
    Ok(Startup {
        daemon_pid,
        apiserver,
        all_ready,
        node_ready,
    })
}

/// The daemon's process tree sampled over an idle window.
struct Idle {
    /// The last sample.
    tree: Vec<crate::node::ProcessUsage>,
    /// CPU time per pid at the first sample.
    before: BTreeMap<i32, u64>,
    /// The highest total RSS seen.
    peak: u64,
    window_ms: u64,
}

/// Samples the tree under `pid` every 5 s for `seconds`.
async fn sample_idle(data: &DataDir, pid: i32, seconds: u64) -> anyhow::Result<Idle> {
    let idle_from = Instant::now();
    let mut peak = 0u64;
    let mut before: Option<BTreeMap<i32, u64>> = None;
    let tree = loop {
        let (d, p) = (data.clone(), pid);
        let tree = tokio::task::spawn_blocking(move || crate::node::tree_usage(&d, p)).await?;
        peak = peak.max(tree.iter().map(|p| p.rss_bytes).sum());
        before.get_or_insert_with(|| tree.iter().map(|p| (p.pid, p.cpu_ms)).collect());
        let left = Duration::from_secs(seconds).saturating_sub(idle_from.elapsed());
        if left.is_zero() {
            break tree;
        }
        tokio::time::sleep(left.min(Duration::from_secs(5))).await;
    };
    Ok(Idle {
        tree,
        before: before.unwrap_or_default(),
        peak,
        window_ms: u64::try_from(idle_from.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

async fn stop_node(data: &DataDir) -> anyhow::Result<()> {
    let out = kdist_command(data, &["stop"])?
        .output()
        .await
        .context("cannot run `kdist stop`")?;
    if !out.status.success() {
        anyhow::bail!(
            "`kdist stop` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn percent(cpu_ms: u64, window_ms: u64) -> f64 {
    (cpu_ms as f64 * 100.0 / window_ms.max(1) as f64 * 100.0).round() / 100.0
}

fn round1(secs: f64) -> f64 {
    (secs * 10.0).round() / 10.0
}

fn print_node_run(run: &NodeRun) {
    let secs = |s: Option<f64>| s.map_or("-".to_string(), |s| format!("{s:.1} s"));
    println!("run: {}", run.config);
    println!(
        "  apiserver ready   {:>8}   (target <= {TARGET_APISERVER_SECS} s)",
        secs(run.apiserver_ready_secs)
    );
    println!(
        "  node Ready        {:>8}   (target <= {TARGET_NODE_SECS} s)",
        secs(run.node_ready_secs)
    );
    println!("  all services      {:>8}", secs(run.all_ready_secs));
    println!("  memory after {} s idle:", run.idle_secs);
    println!(
        "  {:<26} {:>6} {:>10} {:>10} {:>10} {:>8}",
        "GROUP", "PROCS", "RSS MiB", "ANON MiB", "PSS MiB", "CPU %"
    );
    for g in &run.groups {
        println!(
            "  {:<26} {:>6} {:>10.1} {:>10.1} {:>10.1} {:>8.2}",
            g.name, g.processes, g.rss_mib, g.anon_mib, g.pss_mib, g.cpu_percent
        );
    }
    println!(
        "  {:<26} {:>6} {:>10.1} {:>10.1} {:>10.1} {:>8.2}   (target <= {} MB = {:.0} MiB RSS; peak {:.1} MiB)",
        "total",
        run.processes,
        run.total_rss_mib,
        run.total_anon_mib,
        run.total_pss_mib,
        run.total_cpu_percent,
        TARGET_RSS_BYTES / 1_000_000,
        TARGET_RSS_BYTES as f64 / MIB,
        run.peak_rss_mib
    );
    println!(
        "  targets {}",
        if run.targets_met { "met" } else { "NOT met" }
    );
}

struct Sample {
    cpu_ms: u64,
    rss: u64,
}

fn sample(system: &mut System, pids: &[Pid]) -> Vec<Option<Sample>> {
    let kind = ProcessRefreshKind::nothing().with_cpu().with_memory();
    system.refresh_processes_specifics(ProcessesToUpdate::Some(pids), true, kind);
    pids.iter()
        .map(|pid| {
            system.process(*pid).map(|p| Sample {
                cpu_ms: p.accumulated_cpu_time(),
                rss: p.memory(),
            })
        })
        .collect()
}

async fn idle(seconds: u64, data: DataDir) -> anyhow::Result<ExitCode> {
    let report = Client::new(&data).status().await?;
    let mut names = vec!["kdist daemon".to_string()];
    let mut pids = vec![Pid::from_u32(report.daemon.pid)];
    for service in &report.services {
        if let Some(pid) = service.pid.and_then(|p| u32::try_from(p).ok()) {
            names.push(service.name.clone());
            pids.push(Pid::from_u32(pid));
        }
    }
    let mut system = System::new()?;
    let before = sample(&mut system, &pids);
    let started = Instant::now();
    println!("measuring {} process(es) for {seconds} s ...", pids.len());
    let mut peak = vec![0u64; pids.len()];
    let mut after = sample(&mut system, &pids);
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        after = sample(&mut system, &pids);
        for (peak, s) in peak.iter_mut().zip(&after) {
            if let Some(s) = s {
                *peak = (*peak).max(s.rss);
            }
        }
    }
    let wall_ms = started.elapsed().as_millis().max(1) as f64;
    const MIB: f64 = 1024.0 * 1024.0;
    println!(
        "{:<24} {:>10} {:>10} {:>8}",
        "PROCESS", "RSS MiB", "PEAK MiB", "CPU %"
    );
    let mut figures = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let (Some(b), Some(a)) = (&before[i], &after[i]) else {
            println!("{name:<24} exited during the measurement");
            continue;
        };
        let cpu = a.cpu_ms.saturating_sub(b.cpu_ms) as f64 * 100.0 / wall_ms;
        println!(
            "{name:<24} {:>10.1} {:>10.1} {:>8.3}",
            a.rss as f64 / MIB,
            peak[i] as f64 / MIB,
            cpu
        );
        figures.push((name.clone(), a.rss as f64 / MIB, cpu));
    }
    if let (Some(daemon), Some(peer)) = (figures.first(), figures.get(1)) {
        println!(
            "daemon / {}: RSS x{:.2}, CPU x{:.2}",
            peer.0,
            daemon.1 / peer.1.max(f64::MIN_POSITIVE),
            daemon.2 / peer.2.max(1e-9)
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(serde::Serialize)]
struct Named {
    name: String,
    #[serde(flatten)]
    result: BenchResult,
}

async fn datastore(args: DatastoreArgs) -> anyhow::Result<ExitCode> {
    let opts = BenchOptions {
        clients: args.clients.max(1),
        conns: args.conns.max(1),
        put_duration: Duration::from_secs(args.seconds.max(1)),
        value_size: args.value_size,
        range_keys: args.range_keys.max(1),
        ranges: args.ranges.max(1),
        watch_events: args.watch_events.max(1),
    };
    let endpoints: Vec<(String, String)> = args
        .endpoints
        .iter()
        .map(|e| match e.split_once('=') {
            Some((n, u)) if !n.contains("://") => (n.to_string(), u.to_string()),
            _ => (e.clone(), e.clone()),
        })
        .collect();
    let rounds = args.rounds.max(1);
    let mut runs: Vec<Vec<BenchResult>> = vec![Vec::new(); endpoints.len()];
    for round in 1..=rounds {
        for (i, (name, url)) in endpoints.iter().enumerate() {
            eprintln!("round {round}/{rounds}: benchmarking {name} ({url}) ...");
            runs[i].push(bench::run(url, &opts).await?);
        }
    }
    let results: Vec<Named> = endpoints
        .into_iter()
        .zip(runs)
        .filter_map(|((name, _), runs)| bench::median(&runs).map(|result| Named { name, result }))
        .collect();
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&results)?),
        Output::Yaml => print!("{}", crate::yaml::to_string(&results)?),
        Output::Table => {
            println!(
                "{:<12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
                "ENDPOINT",
                "PUTS/S",
                "PUT p50",
                "PUT p99",
                "RANGE p50",
                "RANGE p99",
                "WATCH p50",
                "WATCH p99"
            );
            for r in &results {
                let x = &r.result;
                println!(
                    "{:<12} {:>10.0} {:>8}us {:>8}us {:>8}us {:>8}us {:>8}us {:>8}us",
                    r.name,
                    x.puts_per_sec,
                    x.put_latency.p50_us,
                    x.put_latency.p99_us,
                    x.range_latency.p50_us,
                    x.range_latency.p99_us,
                    x.watch_latency.p50_us,
                    x.watch_latency.p99_us
                );
            }
            if let Some((base, rest)) = results.split_first() {
                let b = &base.result;
                for r in rest {
                    let x = &r.result;
                    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
                    println!(
                        "{} vs {}: writes {:.2}x, range p50 {:.2}x, watch p99 {:.2}x",
                        r.name,
                        base.name,
                        ratio(x.puts_per_sec, b.puts_per_sec),
                        ratio(x.range_latency.p50_us as f64, b.range_latency.p50_us as f64),
                        ratio(x.watch_latency.p99_us as f64, b.watch_latency.p99_us as f64),
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
