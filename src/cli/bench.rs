use std::process::ExitCode;
use std::time::Duration;

use crate::datastore::bench::{self, BenchOptions, BenchResult};

use super::Output;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
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

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Cmd::Datastore(a) => datastore(a).await,
    }
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
