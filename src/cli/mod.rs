//! The `kdist` command line: one file per verb, each with its clap `Args` and `run()`.
//!
//! Verbs talk to the daemon through `supervisor::Client`, or work on the data dir
//! directly when they must run without a daemon. Output meant for scripts has `-o json`.

// The CLI is the one part of the library that talks to the user on stdout.
#![allow(clippy::print_stdout)]

mod add_node;
mod addons;
mod bench;
mod certs;
mod completion;
mod components;
mod config;
mod daemon;
mod datastore;
mod images;
mod inspect;
mod join;
mod kubectl;
mod leave;
mod logs;
mod migrate;
mod remove_node;
mod reset;
mod restart;
mod service;
mod start;
mod status;
mod stop;
mod upgrade;
mod version;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{DEFAULT_DATA_DIR, DataDir};

#[derive(Debug, Parser)]
#[command(
    name = "kdist",
    version,
    about = "A local Kubernetes distribution of Amazon EKS Distro"
)]
pub struct Cli {
    /// Data directory of this node.
    #[arg(long, global = true, env = "KDIST_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Log level of kdist itself (error, warn, info, debug, trace).
    #[arg(long, global = true, env = "KDIST_LOG", default_value = "info")]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the supervisor in the foreground (what a service manager runs).
    Daemon(daemon::Args),
    /// Start the daemon in the background and wait until every service is ready.
    Start(start::Args),
    /// Stop the daemon and every service; returns when all are gone.
    Stop(stop::Args),
    /// Show the services, their state, pid, uptime, restarts, CPU and memory.
    Status(status::Args),
    /// Restart one service, re-reading its args file.
    Restart(restart::Args),
    /// Show a service's log (`kdist` for the daemon's own).
    Logs(logs::Args),
    /// Certificates: init, check, renew, rotate-ca, add-san.
    Certs(certs::Args),
    /// Stop the node and remove what kubelet, containerd and CNI left on the host
    /// (containers, mounts, KUBE-*/CNI-* chains, the bridge); restore host settings.
    Reset(reset::Args),
    /// Print the admin kubeconfig (server = this node's IP; --local for 127.0.0.1).
    Config(config::Args),
    /// Run kubectl (the components' one, else PATH's) with the admin kubeconfig.
    Kubectl(kubectl::Args),
    /// Write a tarball for bug reports: status, args, versions, logs, certs check
    /// (never private keys, kubeconfigs or tokens).
    Inspect(inspect::Args),
    /// Manage container images in the node's containerd (`images import FILE`).
    Images(images::Args),
    /// Operate the datastore: serve, status, backup, restore, compact, defrag.
    Datastore(datastore::Args),
    /// Install, list, switch, verify and bundle EKS-D releases.
    Components(components::Args),
    /// Print kdist's version and each component's version and origin.
    Version(version::Args),
    /// Print a shell completion script.
    Completion(completion::Args),
    /// Create a join token and print the `kdist join` command for a new node.
    AddNode(add_node::Args),
    /// Join the cluster of another node (run on the stopped new node).
    Join(join::Args),
    /// Remove a node from this node's cluster (etcd member, Kubernetes Node).
    RemoveNode(remove_node::Args),
    /// Leave the cluster and become a fresh single node.
    Leave(leave::Args),
    /// Move this running node to another EKS-D release, one service at a time, with
    /// rollback when a service does not come back healthy.
    Upgrade(upgrade::Args),
    /// Start the node at boot: install, uninstall or show its systemd unit or OpenRC script.
    Service(service::Args),
    /// Cluster addons: list, enable, disable (dns, metrics-server, storage, manifests).
    Addons(addons::Args),
    /// Measure kdist against its peers (figures, not pass/fail): `idle`, `datastore`.
    Bench(bench::Args),
}

/// Output format of commands meant for people and scripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

impl Cli {
    pub fn data(&self) -> DataDir {
        DataDir::new(&self.data_dir)
    }
}

/// Runs the parsed command. The daemon verb builds its own runtime in `main`.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let data = cli.data();
    match cli.command {
        Command::Daemon(args) => daemon::run(args, data).await,
        Command::Start(args) => start::run(args, data).await,
        Command::Stop(args) => stop::run(args, data).await,
        Command::Status(args) => status::run(args, data).await,
        Command::Restart(args) => restart::run(args, data).await,
        Command::Logs(args) => logs::run(args, data).await,
        Command::Certs(args) => certs::run(args, data).await,
        Command::Components(args) => components::run(args, data).await,
        Command::Reset(args) => reset::run(args, data).await,
        Command::Config(args) => config::run(args, data).await,
        Command::Kubectl(args) => kubectl::run(args, data).await,
        Command::Inspect(args) => inspect::run(args, data).await,
        Command::Images(args) => images::run(args, data).await,
        Command::Datastore(args) => datastore::run(args, data).await,
        Command::Version(args) => version::run(args, data),
        Command::Completion(args) => completion::run(args),
        Command::AddNode(args) => add_node::run(args, data).await,
        Command::Join(args) => join::run(args, data).await,
        Command::RemoveNode(args) => remove_node::run(args, data).await,
        Command::Leave(args) => leave::run(args, data).await,
        Command::Bench(args) => bench::run(args, data).await,
        Command::Service(args) => service::run(args, data).await,
        Command::Upgrade(args) => upgrade::run(args, data).await,
        Command::Addons(args) => addons::run(args, data).await,
    }
}
