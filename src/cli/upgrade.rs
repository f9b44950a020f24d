use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::core::v1::{Endpoints, Node};

use crate::components::{
    self, BoxError, ComponentsError, NodeControl, Progress, Release, ReleaseId, Request, Source,
    Store, UpgradePlan,
};
use crate::config::{DataDir, NodeConfig, ReleasePin, Role, check_channel};
use crate::supervisor::{Client, ServiceState};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Release number to move to, or `latest` (the channel's newest).
    #[arg(long, default_value = "latest")]
    pub release: ReleasePin,
    /// EKS-D channel (1-XX); default the active release's. One minor at a time.
    #[arg(long)]
    pub channel: Option<String>,
    /// Base URL of EKS-D or a mirror; default from config.yaml.
    #[arg(long)]
    pub base_url: Option<String>,
    /// Print the plan (what restarts, in which order) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Seconds each restarted service must stay ready before the next one restarts.
    #[arg(long, default_value_t = 10)]
    pub settle: u64,
    /// Seconds a restarted service gets to become ready.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Attempts per download before giving up.
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
}

pub async fn run(args: Args, data: DataDir) -> anyhow::Result<ExitCode> {
    let config = NodeConfig::load(&data)?;
    let base = match &args.base_url {
        Some(base) => super::components::base_url_arg(base)?,
        None => config.components.base().to_string(),
    };
    let store = Store::new(&data);
    let client = Client::new(&data);
    let status = client.status().await;
    // a running daemon runs the release it started with (or was switched to), which
    // `components install` or `use` may have moved `current` away from
    let from = status
        .as_ref()
        .ok()
        .and_then(|report| daemon_release(&store, report))
        .or_else(|| store.active())
        .ok_or_else(|| ComponentsError::NoActive {
            path: store.current_link(),
        })?;
    let channel = args.channel.clone().unwrap_or(from.channel.clone());
    check_channel(&channel).map_err(|r| anyhow::anyhow!("--channel: {r}"))?;
    let retry = components::retry_with(args.retries);
    let number = match args.release {
        ReleasePin::Number(n) => n,
        ReleasePin::Latest => components::latest_number(&data, &base, &channel, retry).await?,
    };
    let to = ReleaseId { channel, number };
    if to == from {
        println!(
            "this node runs release {to} ({}) already; nothing to do",
            to.eks_name()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let from_release = store.manifest(&from)?;
    let to_release = match store.manifest(&to) {
        Ok(installed) => installed,
        Err(_) => components::fetch_release(&base, &to, retry).await?,
    };
    let running: Vec<String> = match &status {
        Ok(report) => report.services.iter().map(|s| s.name.clone()).collect(),
        // not running: what a node running every service would do
        Err(_) => components::RESTART_ORDER
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    let plan = components::upgrade_plan(&from_release, &to_release, &running);
    // before anything is installed or switched, and in a dry run too: a refusal names the
    // node to upgrade first. A stopped node cannot ask the cluster; its next start runs
    // what `components install` made current, which is the user's call.
    if status.is_ok() {
        check_skew(&data, &config, &to_release).await?;
    }
    if args.dry_run {
        print_plan(&plan, status.is_ok());
        return Ok(ExitCode::SUCCESS);
    }
    if let Err(e) = status {
        anyhow::bail!(
            "{e}; an upgrade moves a running node. On a stopped node, `kdist components install --channel {} --release {}` makes the next `kdist start` run it",
            to.channel,
            to.number
        );
    }

    if store.record(&to).is_ok() {
        // installed before (`components install --no-activate`, or from a bundle on an
        // air-gapped node): its files are checked again rather than fetched
        let owned = (store.clone(), to.clone());
        let problems = tokio::task::spawn_blocking(move || owned.0.verify(&owned.1))
            .await
            .context("verify task")??;
        if !problems.is_empty() {
            anyhow::bail!(
                "release {to} is installed but damaged ({}); repair it with `kdist components install --channel {} --release {} --force --no-activate`",
                problems.join("; "),
                to.channel,
                to.number
            );
        }
    } else {
        let mut request = Request::from_config(&config.components);
        request.source = Source::Channel {
            channel: to.channel.clone(),
            release: ReleasePin::Number(to.number),
        };
        request.base_url = base;
        request.activate = false;
        request.retry = retry;
        components::install(&data, &request, &Progress::detect()).await?;
    }

    print_plan(&plan, true);
    let _lock = store.lock()?;
    let mut node = DaemonNode {
        client,
        data: data.clone(),
        settle: Duration::from_secs(args.settle),
        timeout: Duration::from_secs(args.timeout),
        before: None,
    };
    let done = components::execute_upgrade(&store, &plan, &mut node).await?;
    println!(
        "this node runs release {} ({}) now{}",
        to,
        to.eks_name(),
        if done.restarted.is_empty() {
            String::new()
        } else {
            format!("; restarted {}", done.restarted.join(", "))
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// The release the daemon's services run, from their programs' paths
/// (`<data>/components/<release>/bin/<name>`).
fn daemon_release(store: &Store, report: &crate::supervisor::StatusReport) -> Option<ReleaseId> {
    let root = store.root().canonicalize().ok()?;
    report
        .services
        .iter()
        .filter(|s| components::RESTART_ORDER.contains(&s.name.as_str()))
        .filter_map(|s| s.program.as_deref())
        .filter_map(|p| {
            let rest = std::path::Path::new(p).strip_prefix(&root).ok()?;
            let first = rest.components().next()?;
            ReleaseId::parse(first.as_os_str().to_str()?).ok()
        })
        .next()
}

fn print_plan(plan: &UpgradePlan, running: bool) {
    let version = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!(
        "upgrade {} -> {} (Kubernetes {} -> {})",
        plan.from,
        plan.to,
        version(&plan.kubernetes_from),
        version(&plan.kubernetes_to)
    );
    if !running {
        println!(
            "kdist is not running here: the plan shows what a running node would do \
             (the version skew with the other nodes is checked when it runs)"
        );
    }
    println!(
        "  1. install release {} verified (or verify it again when installed), not active yet",
        plan.to
    );
    println!(
        "  2. switch components/current and the daemon to {}",
        plan.to
    );
    for (i, service) in plan.restart.iter().enumerate() {
        println!(
            "  {}. restart {service} (its binary changed), wait until it is ready and stays so",
            i + 3
        );
    }
    if !plan.unchanged.is_empty() {
        println!(
            "  not restarted (same binary): {}",
            plan.unchanged.join(", ")
        );
    }
    println!(
        "  running pods are not restarted; on a failure the node goes back to {}",
        plan.from
    );
}

/// The daemon of this node, through its control API.
struct DaemonNode {
    client: Client,
    data: DataDir,
    settle: Duration,
    timeout: Duration,
    /// (pid, restarts) of the service being restarted, before the restart.
    before: Option<(Option<i32>, u32)>,
}

impl DaemonNode {
    async fn service(&self, name: &str) -> Result<crate::supervisor::ServiceStatus, BoxError> {
        let report = self.client.status().await?;
        report
            .services
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| format!("{name} is not among the daemon's services").into())
    }
}

fn why(s: &crate::supervisor::ServiceStatus) -> String {
    [s.message.clone(), s.last_exit.clone()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ")
}

impl NodeControl for DaemonNode {
    async fn switch(&mut self, release: &ReleaseId, service: Option<&str>) -> Result<(), BoxError> {
        self.before = match service {
            Some(name) => self.service(name).await.ok().map(|s| (s.pid, s.restarts)),
            None => None,
        };
        self.client
            .switch_release(&release.to_string(), service)
            .await?;
        Ok(())
    }

    async fn wait_healthy(&mut self, service: &str, fail_fast: bool) -> Result<(), BoxError> {
        let old_pid = self.before.and_then(|b| b.0);
        let deadline = tokio::time::Instant::now() + self.timeout;
        // ready, in a process other than the one before the restart
        let pid = loop {
            let s = self.service(service).await?;
            if s.ready && s.pid.is_some() && s.pid != old_pid {
                break s.pid;
            }
            if fail_fast && s.state == ServiceState::Crashloop {
                return Err(format!("{service} is crash-looping: {}", why(&s)).into());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "{service} not ready {} s after its restart ({}: {})",
                    self.timeout.as_secs(),
                    s.state,
                    why(&s)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        // and stays so: the same process, ready, for the settle period
        let settled = tokio::time::Instant::now() + self.settle;
        loop {
            let s = self.service(service).await?;
            if !s.ready || s.pid != pid {
                return Err(format!(
                    "{service} went down {} s after it was ready ({}: {})",
                    self.settle.as_secs(),
                    s.state,
                    why(&s)
                )
                .into());
            }
            if tokio::time::Instant::now() >= settled {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn log_tail(&self, service: &str) -> Vec<String> {
        crate::supervisor::log_tail(&self.data.log_file(service), 15)
    }
}

/// `v1.28.7-eks-1-28-12` -> (1, 28, 7).
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let t = text.trim().trim_start_matches('v');
    let core = t.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().unwrap_or(Some(0))?,
    ))
}

type Version = (u32, u32, u32);

fn show(v: Version) -> String {
    format!("v{}.{}.{}", v.0, v.1, v.2)
}

/// A node of the cluster as the skew rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClusterNode {
    name: String,
    /// Its kubelet's version; None for an apiserver that is no Node kdist can see.
    kubelet: Option<Version>,
    /// Its kube-apiserver's version, on control planes.
    apiserver: Option<Version>,
}

/// How many minors a kubelet may be older than kube-apiserver: three from Kubernetes
/// 1.28 on, two before.
fn kubelet_lag(apiserver: Version) -> u32 {
    if apiserver >= (1, 28, 0) { 3 } else { 2 }
}

/// The node with the oldest version `of` picks, among the nodes other than `this`.
fn oldest<'a>(
    this: &str,
    nodes: &'a [ClusterNode],
    of: impl Fn(&ClusterNode) -> Option<Version>,
) -> Option<(&'a ClusterNode, Version)> {
    nodes
        .iter()
        .filter(|n| n.name != this)
        .filter_map(|n| Some((n, of(n)?)))
        .min_by_key(|(_, v)| *v)
}

/// Kubernetes' version skew rules for moving `this` node to `target`: a control plane
/// is at most one minor ahead of every other control plane's kube-apiserver and at most
/// three minors (two before 1.28) ahead of every node's kubelet; a worker's kubelet is
/// not newer than any control plane's kube-apiserver. Returns the refusal, naming the
/// node to upgrade first.
fn skew_refusal(this: &str, role: Role, target: Version, nodes: &[ClusterNode]) -> Option<String> {
    match role {
        Role::ControlPlane => {
            if let Some((plane, v)) = oldest(this, nodes, |n| n.apiserver)
                && (target.0 != v.0 || target.1 > v.1 + 1)
            {
                return Some(format!(
                    "Kubernetes {} is more than one minor ahead of control plane {} (kube-apiserver {}); upgrade {} first",
                    show(target),
                    plane.name,
                    show(v),
                    plane.name
                ));
            }
            let lag = kubelet_lag(target);
            let (node, v) = oldest(this, nodes, |n| n.kubelet)?;
            (target.0 != v.0 || target.1 > v.1 + lag).then(|| {
                format!(
                    "Kubernetes {} is more than {lag} minors ahead of the kubelet of node {} ({}); upgrade {} first",
                    show(target),
                    node.name,
                    show(v),
                    node.name
                )
            })
        }
        Role::Worker => {
            let (plane, v) = oldest(this, nodes, |n| n.apiserver)?;
            (target > v).then(|| {
                format!(
                    "kubelet {} would be newer than the kube-apiserver of control plane {} ({}); upgrade {} first",
                    show(target),
                    plane.name,
                    show(v),
                    plane.name
                )
            })
        }
    }
}

/// Refuses an upgrade that would break the version skew with the other nodes, read from
/// the cluster's Node objects. Control planes are the nodes behind the `kubernetes`
/// service, and the node at the address this node reaches the apiserver on (a worker may
/// not read Endpoints); a control plane's kubelet version stands for its apiserver's,
/// except where the apiserver answers itself.
async fn check_skew(data: &DataDir, config: &NodeConfig, to: &Release) -> anyhow::Result<()> {
    let Some(target) = to.version_of("kubernetes").and_then(parse_version) else {
        return Ok(());
    };
    let kubeconfig_path = match config.role {
        Role::ControlPlane => crate::node::rbac::admin_kubeconfig(data),
        Role::Worker => crate::node::rbac::node_kubeconfig(data, config),
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(&kubeconfig_path)
        .with_context(|| format!("reading {}", kubeconfig_path.display()))?;
    let client_config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .with_context(|| format!("loading {}", kubeconfig_path.display()))?;
    let server_host = client_config
        .cluster_url
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
        .unwrap_or_default();
    let client = kube::Client::try_from(client_config).context("building the Kubernetes client")?;
    let hint = "the upgrade checks the other nodes' versions first; make sure the cluster's API answers (`kdist status`)";
    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    let list = nodes
        .list(&Default::default())
        .await
        .with_context(|| format!("listing the cluster's nodes: {hint}"))?;
    let endpoints: kube::Api<Endpoints> = kube::Api::namespaced(client.clone(), "default");
    let apiservers: Vec<String> = endpoints
        .get_opt("kubernetes")
        .await
        .ok()
        .flatten()
        .into_iter()
        .flat_map(|e| e.subsets.unwrap_or_default())
        .flat_map(|s| s.addresses.unwrap_or_default())
        .map(|a| a.ip)
        .collect();
    let answering = match client.apiserver_version().await {
        Ok(info) => parse_version(&info.git_version),
        Err(_) => None,
    };
    let mut seen_answering = false;
    let mut cluster: Vec<ClusterNode> = list
        .items
        .iter()
        .filter_map(|n| {
            let status = n.status.as_ref()?;
            let kubelet = parse_version(&status.node_info.as_ref()?.kubelet_version)?;
            let addresses: Vec<&str> = status
                .addresses
                .iter()
                .flatten()
                .map(|a| a.address.as_str())
                .collect();
            let answers = addresses.contains(&server_host.as_str());
            seen_answering |= answers;
            let apiserver = if answers && answering.is_some() {
                answering
            } else if answers || addresses.iter().any(|a| apiservers.iter().any(|s| s == a)) {
                Some(kubelet)
            } else {
                None
            };
            Some(ClusterNode {
                name: n.metadata.name.clone()?,
                kubelet: Some(kubelet),
                apiserver,
            })
        })
        .collect();
    // a worker reaching the apiserver through an address no Node has (a load balancer)
    // still never gets a kubelet newer than it; a control plane's is its own
    if config.role == Role::Worker && !seen_answering {
        cluster.push(ClusterNode {
            name: format!("the apiserver at {server_host}"),
            kubelet: None,
            apiserver: answering,
        });
    }
    match skew_refusal(&config.node_name(), config.role, target, &cluster) {
        Some(refusal) => anyhow::bail!("{refusal}"),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, minor: u32, control_plane: bool) -> ClusterNode {
        ClusterNode {
            name: name.into(),
            kubelet: Some((1, minor, 3)),
            apiserver: control_plane.then_some((1, minor, 3)),
        }
    }

    #[test]
    fn versions_parse_with_eks_suffixes() {
        assert_eq!(parse_version("v1.28.7-eks-1-28-12"), Some((1, 28, 7)));
        assert_eq!(parse_version("v1.31.0"), Some((1, 31, 0)));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn a_control_plane_moves_one_minor_ahead_at_most() {
        let nodes = [
            node("cp1", 28, true),
            node("cp2", 28, true),
            node("w1", 27, false),
        ];
        assert_eq!(
            skew_refusal("cp1", Role::ControlPlane, (1, 29, 0), &nodes),
            None
        );
        let refusal = skew_refusal("cp1", Role::ControlPlane, (1, 30, 0), &nodes).unwrap();
        assert!(refusal.contains("upgrade cp2 first"), "{refusal}");
        // alone: nothing to be ahead of
        assert_eq!(
            skew_refusal("cp1", Role::ControlPlane, (1, 31, 0), &nodes[..1]),
            None
        );
    }

    #[test]
    fn a_worker_kubelet_is_never_newer_than_a_control_plane() {
        let nodes = [
            node("cp1", 29, true),
            node("cp2", 28, true),
            node("w1", 28, false),
        ];
        assert_eq!(skew_refusal("w1", Role::Worker, (1, 28, 3), &nodes), None);
        let refusal = skew_refusal("w1", Role::Worker, (1, 29, 0), &nodes).unwrap();
        assert!(refusal.contains("control plane cp2"), "{refusal}");
        assert!(refusal.contains("upgrade cp2 first"), "{refusal}");
    }

    #[test]
    fn a_control_plane_stays_within_three_minors_of_every_kubelet() {
        let nodes = [
            node("cp1", 28, true),
            node("cp2", 29, true),
            node("w1", 28, false),
            node("w2", 27, false),
        ];
        // one minor ahead of cp1, two ahead of w2's kubelet: allowed
        assert_eq!(
            skew_refusal("cp2", Role::ControlPlane, (1, 29, 0), &nodes),
            None
        );
        let refusal = skew_refusal("cp1", Role::ControlPlane, (1, 31, 0), &nodes[..1]);
        assert_eq!(refusal, None, "alone");
        // two planes at 1.31 (one already moved), a worker left at 1.28
        let moved = [
            node("cp1", 31, true),
            node("cp2", 30, true),
            node("w1", 28, false),
        ];
        assert_eq!(
            skew_refusal("cp2", Role::ControlPlane, (1, 31, 0), &moved),
            None
        );
        let refusal = skew_refusal("cp2", Role::ControlPlane, (1, 32, 0), &moved).unwrap();
        assert!(
            refusal.contains("kubelet of node w1 (v1.28.3)"),
            "{refusal}"
        );
        assert!(refusal.contains("upgrade w1 first"), "{refusal}");
        // the other planes' rule is checked first: cp1 is further behind than w2 is
        let refusal = skew_refusal("cp2", Role::ControlPlane, (1, 31, 0), &nodes).unwrap();
        assert!(refusal.contains("upgrade cp1 first"), "{refusal}");
        // before 1.28 the kubelet lag was two minors
        let old = [node("w1", 24, false)];
        assert!(skew_refusal("cp1", Role::ControlPlane, (1, 27, 0), &old).is_some());
        assert_eq!(
            skew_refusal("cp1", Role::ControlPlane, (1, 26, 0), &old),
            None
        );
    }

    #[test]
    fn this_nodes_own_kubelet_and_apiserver_never_count() {
        let nodes = [node("cp1", 28, true), node("w1", 28, false)];
        assert_eq!(
            skew_refusal("w1", Role::Worker, (1, 28, 7), &nodes[1..]),
            None
        );
        assert_eq!(
            skew_refusal("cp1", Role::ControlPlane, (1, 29, 0), &nodes),
            None
        );
    }

    #[test]
    fn an_apiserver_behind_an_address_no_node_has_still_bounds_a_worker() {
        let nodes = [
            node("w1", 28, false),
            ClusterNode {
                name: "the apiserver at 192.0.2.10".into(),
                kubelet: None,
                apiserver: Some((1, 28, 7)),
            },
        ];
        let refusal = skew_refusal("w1", Role::Worker, (1, 29, 0), &nodes).unwrap();
        assert!(
            refusal.contains("upgrade the apiserver at 192.0.2.10 first"),
            "{refusal}"
        );
        // and is no kubelet a control plane must stay near
        assert_eq!(
            skew_refusal("cp1", Role::ControlPlane, (1, 29, 0), &nodes[1..]),
            None
        );
    }
}
