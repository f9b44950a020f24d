//! The built-in pod network across nodes. Watches the Nodes and, on this node:
//! writes the CNI conflist for this node's own pod CIDR (`Node.spec.podCIDR`, allocated
//! by kube-controller-manager) once it is known; keeps a route to every peer's pod CIDR
//! (host-gw: via the peer's node IP, when every peer is on a directly attached subnet;
//! vxlan otherwise or when forced: through kdist's VXLAN device, with a permanent
//! neighbour and FDB entry per peer, this node's VXLAN MAC published on its Node); a
//! blackhole route for the rest of the cluster's pod CIDR so pod addresses never follow
//! the default route; and, under `network.egress: none`, the peers' node IPs in the
//! egress guard.
//!
//! Level-triggered: every pass computes the whole wanted state from the Node list and
//! makes the kernel match it (kdist's routes carry their own protocol number), so a
//! restarted daemon adopts what an earlier one left and a Node that is gone loses its
//! routes. With `network.cni: none` it only removes what an earlier run left.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Context, Controller, ControllerError, Reporter, next_ready};
use crate::config::{Backend, Cni, Egress, NodeConfig};
use crate::node::netlink::{self, Netlink, Route, VxlanSpec};

use crate::node::netlink::VXLAN_DEVICE;
/// This node's VXLAN MAC, on its Node.
pub const MAC_ANNOTATION: &str = "network.kdist.io/vxlan-mac";
/// The address peers send this node's VXLAN packets to.
pub const IP_ANNOTATION: &str = "network.kdist.io/public-ip";
/// What every status says of NetworkPolicy.
pub const POLICY_NOTE: &str = "not enforced (network.cni: none with Calico or Cilium enforces it)";

/// How often the whole state is checked again without a Node event (a route deleted by
/// hand comes back).
const RESYNC: Duration = Duration::from_secs(30);

/// One peer as `kdist status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<String>,
    /// `routed`, or what is missing.
    pub route: String,
}

/// The network section of `kdist status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkStatus {
    pub cni: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    pub network_policy: String,
    pub peers: Vec<PeerStatus>,
}

/// The network controller; [`Network::status`] feeds `kdist status`.
#[derive(Default)]
pub struct Network {
    status: Mutex<NetworkStatus>,
}

impl Network {
    pub fn status(&self) -> NetworkStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn publish(&self, status: NetworkStatus) {
        if let Ok(mut s) = self.status.lock() {
            *s = status;
        }
    }
}

impl Controller for Network {
    fn name(&self) -> &'static str {
        "network"
    }

    fn run(
        self: Arc<Self>,
        ctx: Context,
        reporter: Reporter,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), ControllerError>> {
        Box::pin(async move {
            let nl = Netlink::connect().map_err(node_error)?;
            if ctx.config.network.cni == Cni::None {
                nl.sync_routes(&[]).await.map_err(node_error)?;
                nl.sync_blackhole(None).await.map_err(node_error)?;
                nl.delete_link(VXLAN_DEVICE).await.map_err(node_error)?;
                self.publish(NetworkStatus {
                    cni: "none".into(),
                    pod_cidr: Some(ctx.config.network.pod_cidr.clone()),
                    network_policy: "up to the CNI you install".into(),
                    ..NetworkStatus::default()
                });
                reporter.ready(format!(
                    "cni: none: install a CNI for pod CIDR {} (no kdist routes)",
                    ctx.config.network.pod_cidr
                ));
                shutdown.cancelled().await;
                return Ok(());
            }
            let mut apiserver = ctx.apiserver.clone();
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                epoch = next_ready(&mut apiserver, 0) => if epoch.is_none() { return Ok(()) },
            }
            let api: Api<Node> = Api::all(ctx.client.clone());
            let mut events = watcher(api.clone(), watcher::Config::default())
                .default_backoff()
                .boxed();
            let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
            let mut listing: Option<BTreeMap<String, Node>> = None;
            let mut synced = false;
            let mut pass = Pass::default();
            let mut tick = tokio::time::interval(RESYNC);
            reporter.progressing("listing Nodes");
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tick.tick() => {}
                    event = events.try_next() => match event {
                        Ok(Some(watcher::Event::Init)) => {
                            listing = Some(BTreeMap::new());
                            continue;
                        }
                        Ok(Some(watcher::Event::InitApply(node))) => {
                            if let Some(l) = listing.as_mut() {
                                l.insert(name_of(&node), node);
                            }
                            continue;
                        }
                        Ok(Some(watcher::Event::InitDone)) => {
                            nodes = listing.take().unwrap_or_default();
                            synced = true;
                        }
                        Ok(Some(watcher::Event::Apply(node))) => {
                            nodes.insert(name_of(&node), node);
                        }
                        Ok(Some(watcher::Event::Delete(node))) => {
                            nodes.remove(&name_of(&node));
                        }
                        Ok(None) => return Err(ControllerError::Other(
                            "the Node watch ended".into(),
                        )),
                        Err(e) => {
                            reporter.progressing(format!("watching Nodes: {e}"));
                            continue;
                        }
                    },
                }
                if !synced {
                    continue;
                }
                match reconcile(&ctx, &nl, &api, &nodes, &mut pass).await {
                    Ok(status) => {
                        let summary = summary(&status);
                        if status.pod_cidr.is_some() {
                            reporter.ready(summary);
                        } else {
                            reporter.progressing(summary);
                        }
                        self.publish(status);
                    }
                    Err(e) => {
                        let message = crate::report::error_chain(&e);
                        warn!("network: {message}");
                        reporter.progressing(message);
                    }
                }
            }
        })
    }
}

/// What one pass remembers for the next: the range and MTU this run wrote the conflist
/// for (pods with an address of an earlier range are replaced once per change), the
/// peers last put into the egress guard.
#[derive(Default)]
struct Pass {
    conflist: Option<(String, u32)>,
    egress_peers: Option<Vec<Ipv4Addr>>,
}

fn node_error(e: crate::node::NodeError) -> ControllerError {
    ControllerError::Other(Box::new(e))
}

fn name_of(node: &Node) -> String {
    node.metadata.name.clone().unwrap_or_default()
}

/// A Node's InternalIP (IPv4).
fn internal_ip(node: &Node) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

fn pod_cidr(node: &Node) -> Option<Ipv4Net> {
    node.spec.as_ref()?.pod_cidr.as_ref()?.parse().ok()
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// A peer: another Node with a pod CIDR and an InternalIP.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Peer {
    name: String,
    ip: Option<Ipv4Addr>,
    cidr: Option<Ipv4Net>,
    mac: Option<[u8; 6]>,
}

fn peers(nodes: &BTreeMap<String, Node>, me: &str) -> Vec<Peer> {
    nodes
        .iter()
        .filter(|(name, _)| name.as_str() != me)
        .map(|(name, node)| Peer {
            name: name.clone(),
            // the address it publishes for VXLAN wins over its InternalIP
            ip: annotation(node, IP_ANNOTATION)
                .and_then(|ip| ip.parse().ok())
                .or_else(|| internal_ip(node)),
            cidr: pod_cidr(node),
            mac: annotation(node, MAC_ANNOTATION).and_then(netlink::parse_mac),
        })
        .collect()
}

/// The backend for `config` given whether every peer is on an attached subnet.
fn backend(config: &NodeConfig, all_attached: bool) -> Backend {
    match config.network.backend {
        Backend::Auto if all_attached => Backend::HostGw,
        Backend::Auto => Backend::Vxlan,
        forced => forced,
    }
}

/// The pods' MTU: with `auto` the VXLAN one whatever the backend now (a peer that joins
/// later may switch it to vxlan, and running pods keep their MTU).
fn pod_mtu(configured: Backend, chosen: Backend, underlay: u32) -> u32 {
    match (configured, chosen) {
        (Backend::HostGw, _) => underlay,
        _ => netlink::vxlan_mtu(underlay),
    }
}

fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::HostGw => "host-gw",
        Backend::Vxlan | Backend::Auto => "vxlan",
    }
}

async fn reconcile(
    ctx: &Context,
    nl: &Netlink,
    api: &Api<Node>,
    nodes: &BTreeMap<String, Node>,
    pass: &mut Pass,
) -> Result<NetworkStatus, ControllerError> {
    let config = &ctx.config;
    let me = config.node_name();
    let mut status = NetworkStatus {
        cni: "builtin".into(),
        network_policy: POLICY_NOTE.into(),
        ..NetworkStatus::default()
    };
    let Some(node) = nodes.get(&me) else {
        status.backend = Some(format!("waiting for Node {me} to register"));
        return Ok(status);
    };
    let Some(cidr) = pod_cidr(node) else {
        status.backend = Some(format!(
            "Node {me} has no spec.podCIDR yet (kube-controller-manager allocates it with \
             --allocate-node-cidrs=true)"
        ));
        return Ok(status);
    };
    let cluster: Ipv4Net = crate::config::parse_cidr(&config.network.pod_cidr)
        .map_err(|reason| ControllerError::Other(reason.into()))?;
    let node_ip = match config.network.node_ip {
        Some(IpAddr::V4(ip)) => ip,
        _ => internal_ip(node).ok_or_else(|| {
            ControllerError::Other(format!("Node {me} has no IPv4 InternalIP").into())
        })?,
    };
    let addresses = nl.addresses().await.map_err(node_error)?;
    let links = nl.links().await.map_err(node_error)?;
    let underlay = addresses
        .iter()
        .find(|(_, net)| net.addr() == node_ip)
        .and_then(|(index, _)| links.iter().find(|l| l.index == *index))
        .ok_or_else(|| {
            ControllerError::Other(
                format!(
                    "the node IP {node_ip} is on no interface of this host: set \
                     network.node_ip in config.yaml"
                )
                .into(),
            )
        })?;
    let ignore: Vec<u32> = links
        .iter()
        .filter(|l| l.name == VXLAN_DEVICE || l.name == config.network.bridge)
        .map(|l| l.index)
        .collect();
    let peers = peers(nodes, &me);
    let all_attached = peers
        .iter()
        .filter_map(|p| p.ip)
        .all(|ip| netlink::attached(ip, &addresses, &ignore));
    let chosen = backend(config, all_attached);
    let mtu = pod_mtu(config.network.backend, chosen, underlay.mtu);
    status.backend = Some(backend_name(chosen).into());
    status.pod_cidr = Some(cidr.to_string());
    status.mtu = Some(mtu);

    // before any pod has an address: the rest of the pod CIDR stays on this node
    nl.sync_blackhole(Some(cluster)).await.map_err(node_error)?;
    // the CNI config: pods on this node get addresses from its own range (written
    // again when it differs: a file removed by hand comes back)
    let (data, bridge, subnet) = (
        ctx.data.clone(),
        config.network.bridge.clone(),
        cidr.to_string(),
    );
    let changed =
        tokio::task::spawn_blocking(move || crate::node::cni::write(&data, &bridge, &subnet, mtu))
            .await
            .map_err(|source| ControllerError::Task {
                controller: "network",
                source,
            })?
            .map_err(node_error)?;
    if changed {
        info!(pod_cidr = %cidr, mtu, "CNI config written for this node's pod CIDR");
    }
    let conflist = (cidr.to_string(), mtu);
    if pass.conflist.as_ref() != Some(&conflist) {
        replace_pods_of_an_old_range(ctx, &me, cidr).await;
        pass.conflist = Some(conflist);
    }

    // routes, and the VXLAN state
    let mut want = Vec::new();
    let mut waiting: BTreeMap<String, String> = BTreeMap::new();
    match chosen {
        Backend::HostGw => {
            nl.delete_link(VXLAN_DEVICE).await.map_err(node_error)?;
            if annotation(node, MAC_ANNOTATION).is_some() {
                annotate(api, &me, None, None).await?;
            }
            for p in &peers {
                if let (Some(ip), Some(dst)) = (p.ip, p.cidr) {
                    want.push(Route {
                        dst,
                        via: ip,
                        dev: None,
                    });
                }
            }
        }
        Backend::Vxlan | Backend::Auto => {
            let spec = VxlanSpec {
                name: VXLAN_DEVICE.into(),
                vni: config.network.vxlan_vni,
                port: config.network.vxlan_port,
                local: node_ip,
                underlay: underlay.index,
                mtu: netlink::vxlan_mtu(underlay.mtu),
                vtep: netlink::vtep_address(cidr),
            };
            let vx = nl.ensure_vxlan(&spec).await.map_err(node_error)?;
            let mac = vx.mac.map(|m| netlink::format_mac(&m)).unwrap_or_default();
            let ip = node_ip.to_string();
            if annotation(node, MAC_ANNOTATION) != Some(mac.as_str())
                || annotation(node, IP_ANNOTATION) != Some(ip.as_str())
            {
                annotate(api, &me, Some(&mac), Some(&ip)).await?;
                info!(%mac, "VXLAN MAC published on Node {me}");
            }
            let mut neighbours = Vec::new();
            let mut fdb = Vec::new();
            for p in &peers {
                let (Some(ip), Some(dst)) = (p.ip, p.cidr) else {
                    continue;
                };
                let Some(peer_mac) = p.mac else {
                    waiting.insert(p.name.clone(), "waiting for its VXLAN MAC".into());
                    continue;
                };
                let vtep = netlink::vtep_address(dst);
                want.push(Route {
                    dst,
                    via: vtep,
                    dev: Some(vx.index),
                });
                neighbours.push((vtep, peer_mac));
                fdb.push((peer_mac, ip));
            }
            nl.sync_neighbours(vx.index, &neighbours)
                .await
                .map_err(node_error)?;
            nl.sync_fdb(vx.index, &fdb).await.map_err(node_error)?;
        }
    }
    let changes = nl.sync_routes(&want).await.map_err(node_error)?;
    if changes.added + changes.removed > 0 {
        info!(
            added = changes.added,
            removed = changes.removed,
            "routes to peers' pods synced"
        );
    }

    // the egress guard lets pods reach the peers' node IPs
    if config.network.egress == Egress::None {
        let mut ips: Vec<Ipv4Addr> = peers.iter().filter_map(|p| p.ip).collect();
        ips.sort();
        if pass.egress_peers.as_ref() != Some(&ips) {
            let (data, config, allowed) = (ctx.data.clone(), config.clone(), ips.clone());
            tokio::task::spawn_blocking(move || {
                crate::node::egress::apply_with_peers(&data, &config, &allowed)
            })
            .await
            .map_err(|source| ControllerError::Task {
                controller: "network",
                source,
            })?
            .map_err(node_error)?;
            pass.egress_peers = Some(ips);
        }
    }

    let have = nl.routes().await.map_err(node_error)?;
    for p in &peers {
        let route = match (p.ip, p.cidr) {
            (None, _) => "no InternalIP".to_string(),
            (_, None) => "no pod CIDR yet".to_string(),
            (Some(_), Some(dst)) => match waiting.get(&p.name) {
                Some(why) => why.clone(),
                None if have.iter().any(|r| r.dst == dst) => "routed".into(),
                None => "route missing".into(),
            },
        };
        status.peers.push(PeerStatus {
            node: p.name.clone(),
            node_ip: p.ip.map(|ip| ip.to_string()),
            pod_cidr: p.cidr.map(|c| c.to_string()),
            route,
        });
    }
    Ok(status)
}

/// Sets (or with `None`, removes) this node's VXLAN annotations.
async fn annotate(
    api: &Api<Node>,
    me: &str,
    mac: Option<&str>,
    ip: Option<&str>,
) -> Result<(), ControllerError> {
    let patch = serde_json::json!({
        "metadata": { "annotations": { MAC_ANNOTATION: mac, IP_ANNOTATION: ip } }
    });
    api.patch(me, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
        .map_err(|e| ControllerError::api(format!("annotating Node {me}"), e))
}

/// Pods on this node with an address outside its pod CIDR got it from the whole-cluster
/// range an earlier kdist used: they cannot be reached from other nodes, so they are
/// deleted once and their controllers create them again with an address of the node's
/// range. Failures are logged, not fatal: the network works for every new pod.
async fn replace_pods_of_an_old_range(ctx: &Context, me: &str, cidr: Ipv4Net) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let params = ListParams::default().fields(&format!("spec.nodeName={me}"));
    let pods = match api.list(&params).await {
        Ok(pods) => pods,
        Err(e) => {
            warn!("listing this node's pods: {e}");
            return;
        }
    };
    for pod in pods.items {
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        let ip: Option<Ipv4Addr> = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|ip| ip.parse().ok());
        let (Some(ip), false) = (ip, host_network) else {
            continue;
        };
        if cidr.contains(&ip) {
            continue;
        }
        let (Some(name), Some(ns)) = (pod.metadata.name.clone(), pod.metadata.namespace.clone())
        else {
            continue;
        };
        info!(pod = %name, namespace = %ns, %ip, "deleting a pod with an address of the old pod range");
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        if let Err(e) = api.delete(&name, &DeleteParams::default()).await {
            warn!("deleting pod {ns}/{name}: {e}");
        }
    }
}

/// The one-line status message.
fn summary(status: &NetworkStatus) -> String {
    let Some(cidr) = &status.pod_cidr else {
        return status.backend.clone().unwrap_or_else(|| "starting".into());
    };
    let routed = status.peers.iter().filter(|p| p.route == "routed").count();
    format!(
        "{}, pod CIDR {cidr}, {routed}/{} peers routed; NetworkPolicy not enforced",
        status.backend.as_deref().unwrap_or("?"),
        status.peers.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: &str, cidr: Option<&str>, mac: Option<&str>) -> Node {
        let mut annotations = BTreeMap::new();
        if let Some(mac) = mac {
            annotations.insert(MAC_ANNOTATION.to_string(), mac.to_string());
        }
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "annotations": annotations },
            "spec": { "podCIDR": cidr },
            "status": { "addresses": [
                { "type": "Hostname", "address": name },
                { "type": "InternalIP", "address": ip }
            ] }
        }))
        .unwrap()
    }

    #[test]
    fn peers_are_the_other_nodes_with_what_they_published() {
        let nodes: BTreeMap<String, Node> = [
            node("a", "10.0.0.1", Some("10.1.0.0/24"), None),
            node(
                "b",
                "10.0.1.2",
                Some("10.1.1.0/24"),
                Some("0a:00:00:00:00:02"),
            ),
            node("c", "10.0.0.3", None, None),
        ]
        .into_iter()
        .map(|n| (name_of(&n), n))
        .collect();
        let p = peers(&nodes, "a");
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "b");
        assert_eq!(p[0].ip, Some(Ipv4Addr::new(10, 0, 1, 2)));
        assert_eq!(p[0].cidr, Some("10.1.1.0/24".parse().unwrap()));
        assert_eq!(p[0].mac, Some([0x0a, 0, 0, 0, 0, 2]));
        assert_eq!((p[1].cidr, p[1].mac), (None, None));
    }

    #[test]
    fn the_backend_follows_the_peers_unless_forced() {
        let mut config = NodeConfig::default();
        assert_eq!(backend(&config, true), Backend::HostGw);
        assert_eq!(backend(&config, false), Backend::Vxlan);
        config.network.backend = Backend::Vxlan;
        assert_eq!(backend(&config, true), Backend::Vxlan);
        config.network.backend = Backend::HostGw;
        assert_eq!(backend(&config, false), Backend::HostGw);
    }

    #[test]
    fn pods_get_the_vxlan_mtu_unless_host_gw_is_forced() {
        assert_eq!(pod_mtu(Backend::Auto, Backend::HostGw, 1500), 1450);
        assert_eq!(pod_mtu(Backend::Auto, Backend::Vxlan, 1500), 1450);
        assert_eq!(pod_mtu(Backend::Vxlan, Backend::Vxlan, 9000), 8950);
        assert_eq!(pod_mtu(Backend::HostGw, Backend::HostGw, 1500), 1500);
    }

    #[test]
    fn the_summary_counts_routed_peers_and_says_policy_is_not_enforced() {
        let status = NetworkStatus {
            cni: "builtin".into(),
            backend: Some("host-gw".into()),
            pod_cidr: Some("10.1.0.0/24".into()),
            mtu: Some(1450),
            network_policy: "not enforced".into(),
            peers: vec![
                PeerStatus {
                    node: "b".into(),
                    node_ip: None,
                    pod_cidr: None,
                    route: "routed".into(),
                },
                PeerStatus {
                    node: "c".into(),
                    node_ip: None,
                    pod_cidr: None,
                    route: "no pod CIDR yet".into(),
                },
            ],
        };
        let s = summary(&status);
        assert!(
            s.starts_with("host-gw, pod CIDR 10.1.0.0/24, 1/2 peers routed"),
            "{s}"
        );
        assert!(s.contains("NetworkPolicy not enforced"), "{s}");
    }
}
