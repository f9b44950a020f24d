//! `kdist bench`: measurements reported as figures and ratios, never asserted in tests.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

use crate::config::DataDir;
use crate::supervisor::Client;

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

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let What::Idle { seconds } = args.what;
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
