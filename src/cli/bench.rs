//! `kdist bench`: measurements reported as figures and ratios against the real peer
//! measured in the same run, never asserted in tests.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use crate::config::DataDir;
use crate::datastore::bench::{self, BenchOptions, BenchResult};
use crate::supervisor::Client;

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
    /// Same workload against each etcd v3 endpoint (puts from concurrent clients, ranges
    /// of many keys, watch delivery latency); ratios are against the first endpoint.
    Datastore(DatastoreArgs),
}

#[derive(Debug, clap::Args)]
pub struct DatastoreArgs {
    /// Endpoints as NAME=URL or URL (unix:///path.sock, http://host:port). Every key the
    /// benchmark writes lives under /kdist-bench/ and is deleted afterwards.
    #[arg(long, num_args = 1.., required = true, value_name = "URL")]
    pub endpoints: Vec<String>,
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Seconds of the put phase.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    #[arg(long, default_value_t = 1000)]
    pub range_keys: usize,
    #[arg(long, default_value_t = 200)]
    pub ranges: usize,
    #[arg(long, default_value_t = 500)]
    pub watch_events: usize,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    match args.what {
        What::Idle { seconds } => idle(seconds, data).await,
        What::Datastore(a) => datastore(a).await,
    }
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
        put_duration: Duration::from_secs(args.seconds.max(1)),
        value_size: args.value_size,
        range_keys: args.range_keys.max(1),
        ranges: args.ranges.max(1),
        watch_events: args.watch_events.max(1),
    };
    let mut results = Vec::new();
    for e in &args.endpoints {
        let (name, url) = match e.split_once('=') {
            Some((n, u)) if !n.contains("://") => (n.to_string(), u.to_string()),
            _ => (e.clone(), e.clone()),
        };
        eprintln!("benchmarking {name} ({url}) ...");
        let result = bench::run(&url, &opts).await?;
        results.push(Named { name, result });
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&results)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&results)?),
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
