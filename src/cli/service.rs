use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::config::{DataDir, NodeConfig};
use crate::service::{self, InitSystem, UnitSpec};
use crate::supervisor::Client;

use super::Output;

/// The sum of the shipped service definitions' stop grace periods: the least the unit
/// allows, as the node's plan lacks services whose binaries are not installed yet.
const DEFAULT_CHILDREN_GRACE: Duration = Duration::from_secs(95);

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Write a systemd unit (or OpenRC script) running this node's daemon, enable it
    /// and start it.
    Install(InstallArgs),
    /// Stop the unit, disable it and remove its file.
    Uninstall(CommonArgs),
    /// Whether the unit is installed, enabled and active.
    Status(StatusArgs),
}

#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// Init system to write for, instead of the one running on this host.
    #[arg(long, value_enum)]
    pub init: Option<InitSystem>,
    /// Root directory of the host's file system (tests write units below a temp dir).
    #[arg(long, hide = true, default_value = "/")]
    pub root: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// A config file the daemon installs as config.yaml at every start.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the unit and the commands instead of writing and running them.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    if std::env::var_os("SNAP").is_some() {
        anyhow::bail!(
            "kdist runs from its snap, which starts the daemon as the snap service kdist.daemon; use `snap start --enable kdist.daemon` instead"
        );
    }
    match args.command {
        Command::Install(a) => install(a, data).await,
        Command::Uninstall(a) => uninstall(a),
        Command::Status(a) => status(a, data).await,
    }
}

fn on_real_root(root: &Path) -> bool {
    root == Path::new("/")
}

fn where_units_go(root: &Path) -> String {
    format!(
        "a systemd unit goes to {}, an OpenRC script to {}",
        InitSystem::Systemd.unit_path(root).display(),
        InitSystem::Openrc.unit_path(root).display()
    )
}

fn shell_lines(commands: &[Vec<&str>]) -> String {
    commands
        .iter()
        .map(|c| format!("  {}", c.join(" ")))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn install(args: InstallArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    let root = &args.common.root;
    let running = InitSystem::detect(root);
    let Some(init) = args.common.init.or(running) else {
        eprintln!(
            "neither systemd nor OpenRC runs on this host ({}); pass --init systemd|openrc to write one anyway",
            where_units_go(root)
        );
        return Ok(ExitCode::from(1));
    };
    let exe = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .context("cannot find the kdist executable")?;
    let config = match &args.config {
        Some(file) => Some(
            file.canonicalize()
                .with_context(|| format!("--config {}: cannot read it", file.display()))?,
        ),
        None => None,
    };
    let children_grace = NodeConfig::load(&data)
        .ok()
        .and_then(|c| {
            let host = crate::supervisor::HostInputs::probe(&data, &c).ok()?;
            crate::supervisor::plan(&data, &c, &host).ok()
        })
        .map(|plan| plan.iter().map(|s| s.stop_grace).sum())
        // the plan lacks the Kubernetes services until their binaries are installed
        .map_or(DEFAULT_CHILDREN_GRACE, |sum: Duration| {
            sum.max(DEFAULT_CHILDREN_GRACE)
        });
    let spec = UnitSpec {
        exe,
        data_dir: data.root().to_path_buf(),
        config,
        children_grace,
    };
    spec.check()?;
    let path = init.unit_path(root);
    let live = on_real_root(root) && running == Some(init);
    // a daemon started by `kdist start` holds the data dir: a second one would fail
    let daemon_up = Client::new(&data).status().await.is_ok();
    let commands = init.enable_commands(!daemon_up);
    if args.dry_run {
        println!("# {init} unit {}", path.display());
        print!("{}", init.render(&spec));
        println!("# then, where {init} runs:\n{}", shell_lines(&commands));
        return Ok(ExitCode::SUCCESS);
    }
    service::write_unit(root, init, &spec)?;
    println!("wrote {init} unit {}", path.display());
    if !live {
        println!(
            "{init} does not run {}; where it does, enable and start kdist with:\n{}",
            if on_real_root(root) {
                "on this host".to_string()
            } else {
                format!("under {}", root.display())
            },
            shell_lines(&init.enable_commands(true))
        );
        return Ok(ExitCode::SUCCESS);
    }
    service::run_commands(&commands)?;
    if daemon_up {
        println!(
            "kdist starts at boot now; it runs outside {init} at the moment: `kdist stop` then `{}` hands it over",
            match init {
                InitSystem::Systemd => "systemctl start kdist",
                InitSystem::Openrc => "rc-service kdist start",
            }
        );
    } else {
        println!("kdist starts at boot and runs now; `kdist status --wait-ready` waits for it");
    }
    Ok(ExitCode::SUCCESS)
}

fn uninstall(args: CommonArgs) -> anyhow::Result<ExitCode> {
    let root = &args.root;
    let running = InitSystem::detect(root);
    let found = service::status(root, args.init, false);
    let (Some(init), true) = (found.init, found.installed) else {
        println!("no kdist unit installed ({})", where_units_go(root));
        return Ok(ExitCode::SUCCESS);
    };
    let live = on_real_root(root) && running == Some(init);
    if live {
        service::run_commands(&init.disable_commands())?;
    }
    service::remove_unit(root, init)?;
    for link in [
        root.join("etc/systemd/system/multi-user.target.wants/kdist.service"),
        root.join("etc/runlevels/default/kdist"),
    ] {
        // left by an enable done while the init system was not running
        if link.symlink_metadata().is_ok() && !link.exists() {
            let _ = std::fs::remove_file(&link);
        }
    }
    if live {
        service::run_commands(&service::after_remove_commands(init))?;
    }
    println!(
        "removed {init} unit {}{}",
        found.unit.as_deref().unwrap_or(Path::new("")).display(),
        if live {
            "; kdist is stopped and no longer starts at boot"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct StatusReport {
    #[serde(flatten)]
    unit: service::Status,
    /// Whether this data dir's daemon answers on its control socket (however started).
    daemon_running: bool,
    daemon_pid: Option<u32>,
}

async fn status(args: StatusArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    let root = &args.common.root;
    let unit = service::status(root, args.common.init, on_real_root(root));
    let daemon = Client::new(&data).status().await.ok();
    let report = StatusReport {
        unit,
        daemon_running: daemon.is_some(),
        daemon_pid: daemon.map(|d| d.daemon.pid),
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(&report)?),
        Output::Table => {
            let yes = |b: bool| if b { "yes" } else { "no" };
            let u = &report.unit;
            match u.init {
                Some(init) => println!(
                    "init system: {init}{}",
                    if u.init_running {
                        " (running)"
                    } else {
                        " (not running here)"
                    }
                ),
                None => println!("init system: neither systemd nor OpenRC runs here"),
            }
            match &u.unit {
                Some(path) => println!(
                    "unit:        {} ({})",
                    path.display(),
                    if u.installed {
                        "installed"
                    } else {
                        "not installed: run `kdist service install`"
                    }
                ),
                None => println!("unit:        not installed ({})", where_units_go(root)),
            }
            println!("enabled:     {}", yes(u.enabled));
            println!(
                "active:      {}",
                match u.active {
                    Some(a) => yes(a).to_string(),
                    None => "unknown (the init system does not run here)".to_string(),
                }
            );
            match report.daemon_pid {
                Some(pid) => println!("daemon:      running (pid {pid})"),
                None => println!("daemon:      not running"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
