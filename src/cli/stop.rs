use std::process::ExitCode;
use std::time::Duration;

use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::config::{DataDir, NodeConfig};
use crate::supervisor::{Client, SupervisorError, find_marked, stop_leftovers};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds to wait for the daemon and its services to exit.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let client = Client::new(&data);
    let pid = match client.status().await {
        Ok(report) => report.daemon.pid,
        Err(SupervisorError::NotRunning { .. }) => {
            if find_marked(&data).is_empty() {
                println!("kdist is not running");
                return Ok(ExitCode::SUCCESS);
            }
            // a daemon that was killed left its services running: stop them now
            let config = NodeConfig::load(&data)?;
            let stopped = stop_leftovers(&data, &config).await?;
            let left = find_marked(&data);
            if !left.is_empty() {
                anyhow::bail!(
                    "kdist was not running and {} process(es) it left did not stop: {left:?}",
                    left.len()
                );
            }
            println!("kdist was not running; stopped {stopped} service process(es) it left");
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e.into()),
    };
    client.shutdown().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let daemon = Pid::from_raw(pid as i32);
    while kill(daemon, None).is_ok() || !find_marked(&data).is_empty() {
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "kdist (pid {pid}) did not stop within {} s; see {}",
                args.timeout,
                data.log_file("kdist").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("kdist stopped");
    Ok(ExitCode::SUCCESS)
}
