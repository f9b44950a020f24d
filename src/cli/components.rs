use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;

use crate::components::{
    self, ComponentsError, Progress, ReleaseId, Request, Source, Store, component_versions,
};
use crate::config::{DataDir, NodeConfig, ReleasePin, check_channel};

use super::Output;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Install an EKS-D release (verified, atomic) and make it active.
    Install(InstallArgs),
    /// Show installed releases, the active one and the version of each binary.
    List(ListArgs),
    /// Make an installed release the active one.
    Use(UseArgs),
    /// Re-check the sha256 and sha512 of every installed file.
    Verify(VerifyArgs),
    /// Delete an installed release (not the active one).
    Remove(RemoveArgs),
    /// Write a release (default: the active one) as one file for `install --from`.
    Bundle(BundleArgs),
    /// Compare the active release with the newest of its channel, component by component.
    Outdated(OutdatedArgs),
}

#[derive(Debug, clap::Args)]
pub struct OutdatedArgs {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Base URL of EKS-D or a mirror; default from config.yaml.
    #[arg(long)]
    pub base_url: Option<String>,
    /// Attempts per request before giving up.
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
}

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// EKS-D channel (Kubernetes minor as 1-XX); default from config.yaml.
    #[arg(long)]
    pub channel: Option<String>,
    /// Release number, or `latest`; default from config.yaml.
    #[arg(long)]
    pub release: Option<ReleasePin>,
    /// A release manifest by URL or file, instead of channel and release.
    #[arg(long, conflicts_with_all = ["from", "channel", "release"])]
    pub manifest: Option<String>,
    /// Install without network from a directory (manifest.yaml + asset files) or a
    /// bundle written by `kdist components bundle`.
    #[arg(long, conflicts_with_all = ["channel", "release"])]
    pub from: Option<PathBuf>,
    /// Base URL of EKS-D or a mirror; default from config.yaml.
    #[arg(long)]
    pub base_url: Option<String>,
    /// Install without making the release active.
    #[arg(long)]
    pub no_activate: bool,
    /// Install again even when the same release is installed (repairs damaged files).
    #[arg(long)]
    pub force: bool,
    /// Attempts per download before giving up.
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// Downloads at once.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct UseArgs {
    /// Release as <channel>-<number> (e.g. 1-31-12) or kubernetes-1-31-eks-12.
    pub release: String,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Release to check; default the active one.
    pub release: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    pub release: String,
}

#[derive(Debug, clap::Args)]
pub struct BundleArgs {
    /// File to write (a .tar.gz).
    #[arg(long)]
    pub out: PathBuf,
    /// Release to bundle; default the active one.
    #[arg(long)]
    pub release: Option<String>,
    /// A directory of image archives (OCI or `docker save` tars: the release's pause,
    /// CoreDNS, metrics-server images) to add; `install --from` imports them.
    #[arg(long)]
    pub images: Option<PathBuf>,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Install(a) => install(a, data).await,
        Command::List(a) => list(a, data),
        Command::Use(a) => use_release(a, data).await,
        Command::Verify(a) => verify(a, data).await,
        Command::Remove(a) => remove(a, data),
        Command::Bundle(a) => bundle(a, data).await,
        Command::Outdated(a) => outdated(a, data).await,
    }
}

async fn install(args: InstallArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    data.ensure()?;
    let config = NodeConfig::load(&data)?.components;
    let mut request = Request::from_config(&config);
    if let Some(channel) = &args.channel {
        check_channel(channel).map_err(|r| anyhow::anyhow!("--channel: {r}"))?;
    }
    request.source = match (&args.manifest, &args.from) {
        (Some(manifest), _) => Source::Manifest(manifest.clone()),
        (None, Some(from)) => Source::Local(from.clone()),
        (None, None) => Source::Channel {
            channel: args.channel.clone().unwrap_or(config.channel.clone()),
            release: args.release.unwrap_or(config.release),
        },
    };
    if let Some(base) = &args.base_url {
        request.base_url = base_url_arg(base)?;
    }
    request.activate = !args.no_activate;
    request.force = args.force;
    request.retry = components::retry_with(args.retries);
    request.parallel = args.parallel;
    let outcome = components::install(&data, &request, &Progress::detect()).await?;
    if !outcome.changed {
        println!(
            "EKS-D {} is already installed{}; nothing to do",
            outcome.id.eks_name(),
            if outcome.active { " and active" } else { "" }
        );
    } else {
        println!(
            "installed EKS-D {} ({}){}",
            outcome.id.eks_name(),
            outcome.id,
            if outcome.active { ", active" } else { "" }
        );
        if outcome.active && crate::supervisor::Client::new(&data).status().await.is_ok() {
            println!(
                "kdist is running the release it started with: `kdist upgrade --channel {} --release {}` moves it service by service (or `kdist stop && kdist start`)",
                outcome.id.channel, outcome.id.number
            );
        }
    }
    // image archives the source carried are in <data>/images/: imported at the next
    // start, or now when containerd runs
    if std::os::unix::net::UnixStream::connect(data.containerd_socket()).is_ok() {
        let d = data.clone();
        let imported =
            tokio::task::spawn_blocking(move || crate::node::images::import_dropped(&d)).await?;
        for (archive, result) in imported {
            match result {
                Ok(names) => println!("imported {} from {}", names.join(", "), archive.display()),
                Err(e) => eprintln!("{}: {}", archive.display(), crate::report::error_chain(&e)),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct ListedRelease {
    release: String,
    name: String,
    active: bool,
    source: String,
    installed_at: u64,
    versions: Vec<(String, String)>,
}

#[derive(Debug, Serialize)]
struct Listing {
    active: Option<String>,
    releases: Vec<ListedRelease>,
    binaries: Vec<components::ComponentVersion>,
}

fn list(args: ListArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    let store = Store::new(&data);
    let active = store.active();
    let mut releases = Vec::new();
    for id in store.installed() {
        let record = store.record(&id)?;
        let manifest = store.manifest(&id).ok();
        let versions = ["kubernetes", "etcd", "cni-plugins"]
            .iter()
            .map(|c| {
                let v = manifest
                    .as_ref()
                    .and_then(|m| m.version_of(c))
                    .unwrap_or("-");
                (c.to_string(), v.to_string())
            })
            .collect();
        releases.push(ListedRelease {
            name: id.eks_name(),
            active: active.as_ref() == Some(&id),
            release: id.to_string(),
            source: record.source,
            installed_at: record.installed_at,
            versions,
        });
    }
    let listing = Listing {
        active: active.map(|a| a.to_string()),
        releases,
        binaries: component_versions(&data),
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&listing)?),
        Output::Yaml => print!("{}", crate::yaml::to_string(&listing)?),
        Output::Table => {
            if listing.releases.is_empty() {
                println!(
                    "no EKS-D release installed in {}; run `kdist components install`",
                    store.root().display()
                );
            } else {
                println!(
                    "{:<3}{:<10} {:<26} {:<12} {:<10} {:<10} SOURCE",
                    "", "RELEASE", "NAME", "KUBERNETES", "ETCD", "CNI"
                );
                for r in &listing.releases {
                    let v = |i: usize| r.versions.get(i).map(|x| x.1.as_str()).unwrap_or("-");
                    println!(
                        "{:<3}{:<10} {:<26} {:<12} {:<10} {:<10} {}",
                        if r.active { "*" } else { "" },
                        r.release,
                        r.name,
                        v(0),
                        v(1),
                        v(2),
                        r.source
                    );
                }
            }
            for id in store.interrupted() {
                println!(
                    "interrupted install of {id} ({}): run `kdist components install --channel {} --release {}` to resume it",
                    store.staging_dir(&id).display(),
                    id.channel,
                    id.number
                );
            }
            println!();
            print_versions(&listing.binaries);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The per-binary table shared with `kdist version`.
pub fn print_versions(versions: &[components::ComponentVersion]) {
    println!("{:<26} {:<24} ORIGIN", "COMPONENT", "VERSION");
    for v in versions {
        println!(
            "{:<26} {:<24} {}",
            v.name,
            v.version.as_deref().unwrap_or("-"),
            v.origin
        );
    }
}

async fn use_release(args: UseArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    let id = ReleaseId::parse(&args.release)?;
    let store = Store::new(&data);
    let _lock = store.lock()?;
    store.activate(&id)?;
    println!("EKS-D {} is now active", id.eks_name());
    if crate::supervisor::Client::new(&data).status().await.is_ok() {
        println!(
            "kdist is running the release it started with: `kdist upgrade --channel {} --release {}` moves it service by service (or `kdist stop && kdist start`)",
            id.channel, id.number
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify(args: VerifyArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    let store = Store::new(&data);
    let id = match &args.release {
        Some(r) => ReleaseId::parse(r)?,
        None => store.active().ok_or(ComponentsError::NoActive {
            path: store.current_link(),
        })?,
    };
    let record = store.record(&id)?;
    let owned = (store.clone(), id.clone());
    let problems = tokio::task::spawn_blocking(move || owned.0.verify(&owned.1))
        .await
        .context("verify task")??;
    if problems.is_empty() {
        println!(
            "EKS-D {}: {} files and {} assets match their sha256 and sha512",
            id.eks_name(),
            record.files.len(),
            record.assets.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    for p in &problems {
        eprintln!("{p}");
    }
    eprintln!(
        "EKS-D {}: {} problem(s); repair with `kdist components install --channel {} --release {} --force`",
        id.eks_name(),
        problems.len(),
        id.channel,
        id.number
    );
    Ok(ExitCode::from(1))
}

fn remove(args: RemoveArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    let id = ReleaseId::parse(&args.release)?;
    let store = Store::new(&data);
    let _lock = store.lock()?;
    store.remove(&id)?;
    println!("removed EKS-D {}", id.eks_name());
    Ok(ExitCode::SUCCESS)
}

async fn bundle(args: BundleArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    let id = args.release.as_deref().map(ReleaseId::parse).transpose()?;
    let (id, size) = components::write_bundle(&data, id, &args.out, args.images.as_deref()).await?;
    println!(
        "wrote EKS-D {} to {} ({:.1} MiB); install it with `kdist components install --from {}`",
        id.eks_name(),
        args.out.display(),
        size as f64 / (1024.0 * 1024.0),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `--base-url` as given, checked, without a trailing slash.
pub(super) fn base_url_arg(base: &str) -> anyhow::Result<String> {
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        anyhow::bail!("--base-url: `{base}` must be an http:// or https:// URL");
    }
    Ok(base.trim_end_matches('/').to_string())
}

async fn outdated(args: OutdatedArgs, data: DataDir) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::load(&data)?.components;
    let base = match &args.base_url {
        Some(base) => base_url_arg(base)?,
        None => config.base().to_string(),
    };
    let report = components::outdated(&data, &base, components::retry_with(args.retries)).await?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(&report)?),
        Output::Table => print_outdated(&report),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_outdated(report: &components::Outdated) {
    let state = if report.up_to_date {
        "up to date".to_string()
    } else {
        format!(
            "{} release{} behind",
            report.behind,
            if report.behind == 1 { "" } else { "s" }
        )
    };
    println!(
        "channel {}: active {}, latest {}: {state}",
        report.channel, report.active, report.latest
    );
    println!("{:<16} {:<16} {:<16}", "COMPONENT", "ACTIVE", "LATEST");
    for c in &report.components {
        println!(
            "{:<16} {:<16} {:<16}{}",
            c.component,
            c.active.as_deref().unwrap_or("-"),
            c.latest.as_deref().unwrap_or("-"),
            if c.changed { " changed" } else { "" }
        );
    }
    if !report.up_to_date {
        println!(
            "run `kdist upgrade --release latest` to move this node to {} (`--dry-run` shows the plan)",
            report.latest
        );
    }
}
