use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::config::{DataDir, Lifetime, NodeConfig};
use crate::pki::{self, CertReport, Issued};
use crate::supervisor::{Client, SupervisorError};

use super::Output;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Verb,
}

#[derive(Debug, clap::Subcommand)]
pub enum Verb {
    /// Create every missing CA, key, certificate and kubeconfig (the daemon does this
    /// at start too).
    Init {
        /// An extra IP address or DNS name for the apiserver certificate (repeatable);
        /// kept like `add-san`.
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Show every certificate with its expiry and state; exit 1 when any is expired,
    /// invalid, missing or inside the renewal window.
    Check {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Re-issue leaf certificates from the existing CAs and restart the services
    /// that use them, one at a time.
    Renew {
        /// Certificates to renew, e.g. `apiserver etcd/server`.
        #[arg(required_unless_present = "all", value_parser = clap::builder::PossibleValuesParser::new(pki::leaf_names()))]
        names: Vec<String>,
        /// Renew every leaf certificate.
        #[arg(long, conflicts_with = "names")]
        all: bool,
    },
    /// Replace the cluster CA; old and new are both trusted during the overlap, every
    /// leaf and kubeconfig is re-issued at once.
    RotateCa {
        /// How long the old CA stays trusted (e.g. 24h, 7d).
        #[arg(long, default_value = "24h")]
        overlap: Lifetime,
        /// End a rotation in progress now: only the new CA stays trusted.
        #[arg(long, conflicts_with = "overlap")]
        finish: bool,
    },
    /// Add an IP address or DNS name to the apiserver certificate and re-issue it.
    AddSan {
        /// An IP address or DNS name.
        san: String,
    },
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::load(&data)?;
    let issued = match args.command {
        Verb::Check { output } => return check(&data, &config, output).await,
        Verb::Init { sans } => {
            data.ensure()?;
            blocking(&data, &config, move |d, c| {
                let mut issued = Vec::new();
                for san in &sans {
                    issued.extend(pki::add_san(d, c, san)?);
                }
                issued.extend(pki::ensure(d, c)?);
                Ok(issued)
            })
            .await?
        }
        Verb::Renew { names, all } => {
            let names = if all { Vec::new() } else { names };
            blocking(&data, &config, move |d, c| pki::renew(d, c, &names)).await?
        }
        Verb::RotateCa { overlap, finish } => {
            let overlap = if finish {
                Duration::ZERO
            } else {
                overlap.duration()
            };
            blocking(&data, &config, move |d, c| pki::rotate_ca(d, c, overlap)).await?
        }
        Verb::AddSan { san } => {
            blocking(&data, &config, move |d, c| pki::add_san(d, c, &san)).await?
        }
    };
    if issued.is_empty() {
        println!("nothing to do: every certificate is in place and valid");
        return Ok(ExitCode::SUCCESS);
    }
    for item in &issued {
        println!("{:<28} {}", item.name, item.reason);
    }
    restart_affected(&data, &issued).await
}

async fn blocking<F>(data: &DataDir, config: &NodeConfig, f: F) -> anyhow::Result<Vec<Issued>>
where
    F: FnOnce(&DataDir, &NodeConfig) -> Result<Vec<Issued>, pki::PkiError> + Send + 'static,
{
    let (data, config) = (data.clone(), config.clone());
    Ok(tokio::task::spawn_blocking(move || f(&data, &config))
        .await
        .context("certificate task panicked")??)
}

/// Asks a running daemon to restart, one at a time and each back to ready before the
/// next, the services that read what was re-issued.
async fn restart_affected(data: &DataDir, issued: &[Issued]) -> anyhow::Result<ExitCode> {
    let wanted = pki::affected_services(issued);
    if wanted.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let client = Client::new(data);
    let report = match client.status().await {
        Ok(report) => report,
        Err(SupervisorError::NotRunning { .. }) => {
            println!(
                "kdist is not running; {} will load the new files at the next `kdist start`",
                wanted.join(", ")
            );
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e.into()),
    };
    for service in wanted {
        let Some(before) = report.services.iter().find(|s| s.name == service) else {
            continue;
        };
        let old_pid = before.pid;
        client.restart(&service).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let now = client.status().await?;
            // a new process, ready: the old one's state may linger right after the order
            if now
                .services
                .iter()
                .any(|s| s.name == service && s.ready && s.pid.is_some() && s.pid != old_pid)
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "{service} was restarted with its new certificates but is not ready after 120 s; \
                     see `kdist status` and `kdist logs {service}`"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        println!("{service} restarted and ready");
    }
    Ok(ExitCode::SUCCESS)
}

async fn check(data: &DataDir, config: &NodeConfig, output: Output) -> anyhow::Result<ExitCode> {
    let (d, c) = (data.clone(), config.clone());
    let reports = tokio::task::spawn_blocking(move || pki::check(&d, &c))
        .await
        .context("certificate check panicked")?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&reports)?),
        Output::Yaml => print!("{}", crate::yaml::to_string(&reports)?),
        Output::Table => print_table(&reports),
    }
    Ok(if pki::has_problems(&reports) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_table(reports: &[CertReport]) {
    println!(
        "{:<26} {:<9} {:>9}  {:<20}  {:<40} ISSUER",
        "NAME", "STATUS", "DAYS LEFT", "NOT AFTER", "SUBJECT"
    );
    for r in reports {
        let days = r
            .days_left
            .map(|d| format!("{d:.2}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<26} {:<9} {:>9}  {:<20}  {:<40} {}",
            r.name,
            r.status.to_string(),
            days,
            r.not_after.as_deref().unwrap_or("-"),
            r.subject.as_deref().unwrap_or("-"),
            r.issuer.as_deref().unwrap_or("-"),
        );
        if !r.sans.is_empty() {
            println!("    sans: {}", r.sans.join(", "));
        }
        if let Some(problem) = &r.problem {
            println!("    {problem}");
        }
    }
}
