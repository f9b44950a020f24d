//! Routes, neighbours and the VXLAN device of the built-in pod network, kept through
//! netlink in the network namespace of the calling process.
//!
//! Every route kdist adds carries its own protocol number ([`ROUTE_PROTOCOL`], shown by
//! `ip route` as `proto 75`), so a sync removes only routes kdist made and a restarted
//! daemon adopts what an earlier one left. Neighbour and FDB entries live on kdist's own
//! VXLAN device and are all kdist's.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{LinkUnspec, LinkVxlan, RouteMessageBuilder};

use super::error::NodeError;

/// kdist's VXLAN device.
pub const VXLAN_DEVICE: &str = "kdist.vxlan";

/// The `rtm_protocol` of kdist's routes.
pub const ROUTE_PROTOCOL: u8 = 75;

/// Bytes VXLAN adds to each packet over IPv4: outer IP 20, UDP 8, VXLAN 8, inner
/// Ethernet 14.
pub const VXLAN_OVERHEAD: u32 = 50;

/// The MTU of a VXLAN device over a link of MTU `underlay`.
pub fn vxlan_mtu(underlay: u32) -> u32 {
    underlay.saturating_sub(VXLAN_OVERHEAD)
}

/// The address of a node's VXLAN device: the network address of its pod CIDR, which
/// host-local never hands to a pod (flannel's choice too).
pub fn vtep_address(pod_cidr: Ipv4Net) -> Ipv4Addr {
    pod_cidr.network()
}

/// Whether `peer` is on a subnet directly attached to this host: inside one of
/// `addresses` (interface index, address with prefix), not counting the interfaces in
/// `ignore` (the pod bridge, the VXLAN device) nor host routes (/32).
pub fn attached(peer: Ipv4Addr, addresses: &[(u32, Ipv4Net)], ignore: &[u32]) -> bool {
    addresses
        .iter()
        .any(|(index, net)| !ignore.contains(index) && net.prefix_len() < 32 && net.contains(&peer))
}

/// A route of kdist's: `dst` via `via`; with `dev`, through that device with the
/// gateway on-link (VXLAN), without it wherever the kernel finds `via` (host-gw).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub dst: Ipv4Net,
    pub via: Ipv4Addr,
    pub dev: Option<u32>,
}

impl Route {
    fn matches(&self, have: &Route) -> bool {
        self.dst == have.dst && self.via == have.via && self.dev.is_none_or(|d| have.dev == Some(d))
    }
}

/// A network interface as kdist needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: Option<[u8; 6]>,
    pub up: bool,
    vxlan: Vec<InfoVxlan>,
}

/// What kdist's VXLAN device must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    /// This node's IP, the outer source address.
    pub local: Ipv4Addr,
    /// The interface holding `local`.
    pub underlay: u32,
    pub mtu: u32,
    /// The device's own address (/32).
    pub vtep: Ipv4Addr,
}

/// What a sync changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub removed: usize,
}

fn err(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NodeError {
    let action = action.into();
    move |source| NodeError::NetlinkRequest { action, source }
}

/// A netlink connection in this process's network namespace.
pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Opens the connection; its task runs on the current tokio runtime until `self`
    /// is dropped.
    pub fn connect() -> Result<Self, NodeError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(NodeError::io("netlink route socket"))?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    pub async fn links(&self) -> Result<Vec<Link>, NodeError> {
        let messages: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(err("listing links"))?;
        Ok(messages.iter().map(link_of).collect())
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>, NodeError> {
        Ok(self.links().await?.into_iter().find(|l| l.name == name))
    }

    /// The IPv4 addresses of every interface: (interface index, address/prefix).
    pub async fn addresses(&self) -> Result<Vec<(u32, Ipv4Net)>, NodeError> {
        let messages: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(err("listing addresses"))?;
        let mut out = Vec::new();
        for m in messages {
            for attr in &m.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = attr
                    && let Ok(net) = Ipv4Net::new(*ip, m.header.prefix_len)
                {
                    out.push((m.header.index, net));
                }
            }
        }
        Ok(out)
    }

    /// Creates kdist's VXLAN device, or keeps the one there when it has the same VNI,
    /// port, local address and underlay (and so the same MAC, which peers know); sets
    /// its MTU, its one address and brings it up.
    pub async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<Link, NodeError> {
        let want = [
            InfoVxlan::Id(spec.vni),
            InfoVxlan::Port(spec.port),
            InfoVxlan::Local(spec.local),
            InfoVxlan::Link(spec.underlay),
            InfoVxlan::Learning(false),
        ];
        let existing = self.link(&spec.name).await?;
        let keep = existing
            .as_ref()
            .is_some_and(|l| want.iter().all(|w| l.vxlan.contains(w)));
        if let Some(link) = existing.as_ref().filter(|_| !keep) {
            self.delete_link_index(link.index, &spec.name).await?;
        }
        if !keep {
            let message = LinkVxlan::new(&spec.name, spec.vni)
                .dev(spec.underlay)
                .port(spec.port)
                .local(spec.local)
                .learning(false)
                .mtu(spec.mtu)
                .build();
            self.handle
                .link()
                .add(message)
                .execute()
                .await
                .map_err(err(format!("creating VXLAN device {}", spec.name)))?;
        }
        let link = self
            .link(&spec.name)
            .await?
            .ok_or_else(|| NodeError::NetlinkRequest {
                action: format!("finding VXLAN device {} after creating it", spec.name),
                source: rtnetlink::Error::RequestFailed,
            })?;
        if link.mtu != spec.mtu || !link.up {
            let message = rtnetlink::LinkMessageBuilder::<LinkUnspec>::new()
                .index(link.index)
                .mtu(spec.mtu)
                .up()
                .build();
            self.handle
                .link()
                .set(message)
                .execute()
                .await
                .map_err(err(format!("setting up VXLAN device {}", spec.name)))?;
        }
        self.only_address(link.index, &spec.name, spec.vtep).await?;
        Ok(self.link(&spec.name).await?.unwrap_or(link))
    }

    /// Leaves `vtep`/32 as the only IPv4 address of interface `index`.
    async fn only_address(&self, index: u32, name: &str, vtep: Ipv4Addr) -> Result<(), NodeError> {
        let messages: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(err(format!("listing addresses of {name}")))?;
        let mut present = false;
        for m in messages {
            let v4 = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            match v4 {
                Some(ip) if ip == vtep && m.header.prefix_len == 32 => present = true,
                Some(ip) => self
                    .handle
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .map_err(err(format!("removing {ip} from {name}")))?,
                None => {}
            }
        }
        if !present {
            self.handle
                .address()
                .add(index, IpAddr::V4(vtep), 32)
                .execute()
                .await
                .map_err(err(format!("adding {vtep}/32 to {name}")))?;
        }
        Ok(())
    }

    /// Deletes interface `name`; false when there was none.
    pub async fn delete_link(&self, name: &str) -> Result<bool, NodeError> {
        match self.link(name).await? {
            Some(link) => {
                self.delete_link_index(link.index, name).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn delete_link_index(&self, index: u32, name: &str) -> Result<(), NodeError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(err(format!("deleting interface {name}")))
    }

    async fn route_messages(&self) -> Result<Vec<(Route, RouteMessage)>, NodeError> {
        let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let messages: Vec<RouteMessage> = self
            .handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(err("listing routes"))?;
        Ok(messages
            .into_iter()
            .filter(|m| {
                m.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
                    && m.header.table == RouteHeader::RT_TABLE_MAIN
            })
            .filter_map(|m| route_of(&m).map(|r| (r, m)))
            .collect())
    }

    /// kdist's routes in the main table.
    pub async fn routes(&self) -> Result<Vec<Route>, NodeError> {
        Ok(self
            .route_messages()
            .await?
            .into_iter()
            .map(|(r, _)| r)
            .collect())
    }

    /// Makes kdist's routes exactly `want`: removes the others kdist made, adds what
    /// is missing. Routes of other protocols are never touched.
    pub async fn sync_routes(&self, want: &[Route]) -> Result<Changes, NodeError> {
        let have = self.route_messages().await?;
        let mut changes = Changes::default();
        let mut kept: Vec<&Route> = Vec::new();
        for (route, message) in &have {
            let wanted = want.iter().any(|w| w.matches(route));
            if wanted && !kept.contains(&route) {
                kept.push(route);
                continue;
            }
            self.handle
                .route()
                .del(message.clone())
                .execute()
                .await
                .map_err(err(format!(
                    "deleting route {} via {}",
                    route.dst, route.via
                )))?;
            changes.removed += 1;
        }
        for route in want {
            if kept.iter().any(|k| route.matches(k)) {
                continue;
            }
            let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(route.dst.network(), route.dst.prefix_len())
                .gateway(route.via)
                .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
            if let Some(dev) = route.dev {
                builder = builder.output_interface(dev).onlink();
            }
            self.handle
                .route()
                .add(builder.build())
                .execute()
                .await
                .map_err(err(format!(
                    "adding route {} via {} (another route to it may exist: see `ip route`)",
                    route.dst, route.via
                )))?;
            changes.added += 1;
        }
        Ok(changes)
    }

    /// Makes kdist's blackhole routes exactly `cidr`: the cluster's pod CIDR, so that a
    /// pod address no node has (yet) is dropped here instead of following the default
    /// route off the machine; the bridge's and the peers' longer routes win over it.
    pub async fn sync_blackhole(&self, cidr: Option<Ipv4Net>) -> Result<Changes, NodeError> {
        let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let messages: Vec<RouteMessage> = self
            .handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(err("listing routes"))?;
        let mut changes = Changes::default();
        let mut present = false;
        for m in messages.into_iter().filter(|m| {
            m.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
                && m.header.kind == RouteType::BlackHole
        }) {
            let dst = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                    Ipv4Net::new(*ip, m.header.destination_prefix_length).ok()
                }
                _ => None,
            });
            if dst.is_some() && dst == cidr && !present {
                present = true;
                continue;
            }
            self.handle
                .route()
                .del(m)
                .execute()
                .await
                .map_err(err("deleting kdist's blackhole route"))?;
            changes.removed += 1;
        }
        if let (Some(cidr), false) = (cidr, present) {
            let message = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(cidr.network(), cidr.prefix_len())
                .kind(RouteType::BlackHole)
                .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
                .build();
            self.handle
                .route()
                .add(message)
                .execute()
                .await
                .map_err(err(format!("adding blackhole route {cidr}")))?;
            changes.added += 1;
        }
        Ok(changes)
    }

    /// The permanent IPv4 neighbours on interface `index`: (address, MAC).
    pub async fn neighbours(&self, index: u32) -> Result<Vec<(Ipv4Addr, [u8; 6])>, NodeError> {
        Ok(self
            .neighbour_messages(AddressFamily::Inet, index)
            .await?
            .iter()
            .filter_map(|m| Some((neighbour_ip(m)?, neighbour_mac(m)?)))
            .collect())
    }

    /// The FDB entries with a remote on interface `index`: (MAC, remote IP).
    pub async fn fdb(&self, index: u32) -> Result<Vec<([u8; 6], Ipv4Addr)>, NodeError> {
        Ok(self
            .neighbour_messages(AddressFamily::Bridge, index)
            .await?
            .iter()
            .filter_map(|m| Some((neighbour_mac(m)?, neighbour_ip(m)?)))
            .collect())
    }

    async fn neighbour_messages(
        &self,
        family: AddressFamily,
        index: u32,
    ) -> Result<Vec<NeighbourMessage>, NodeError> {
        let messages: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(err("listing neighbours"))?;
        Ok(messages
            .into_iter()
            .filter(|m| m.header.ifindex == index && m.header.family == family)
            .collect())
    }

    /// Makes the permanent neighbours of interface `index` exactly `want`.
    pub async fn sync_neighbours(
        &self,
        index: u32,
        want: &[(Ipv4Addr, [u8; 6])],
    ) -> Result<Changes, NodeError> {
        let mut changes = Changes::default();
        let have = self.neighbour_messages(AddressFamily::Inet, index).await?;
        let mut present = Vec::new();
        for m in have {
            let Some(ip) = neighbour_ip(&m) else { continue };
            let entry = neighbour_mac(&m).map(|mac| (ip, mac));
            if entry.is_some_and(|e| want.contains(&e))
                && m.header.state == NeighbourState::Permanent
            {
                present.extend(entry);
                continue;
            }
            self.handle
                .neighbours()
                .del(m)
                .execute()
                .await
                .map_err(err(format!("deleting neighbour {ip}")))?;
            changes.removed += 1;
        }
        for (ip, mac) in want.iter().filter(|w| !present.contains(w)) {
            self.handle
                .neighbours()
                .add(index, IpAddr::V4(*ip))
                .link_layer_address(mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(err(format!("adding neighbour {ip}")))?;
            changes.added += 1;
        }
        Ok(changes)
    }

    /// Makes the FDB entries with a remote of interface `index` exactly `want`.
    pub async fn sync_fdb(
        &self,
        index: u32,
        want: &[([u8; 6], Ipv4Addr)],
    ) -> Result<Changes, NodeError> {
        let mut changes = Changes::default();
        let have = self
            .neighbour_messages(AddressFamily::Bridge, index)
            .await?;
        let mut present = Vec::new();
        for m in have {
            let (Some(mac), Some(ip)) = (neighbour_mac(&m), neighbour_ip(&m)) else {
                continue;
            };
            if want.contains(&(mac, ip)) {
                present.push((mac, ip));
                continue;
            }
            self.handle
                .neighbours()
                .del(m)
                .execute()
                .await
                .map_err(err(format!(
                    "deleting FDB entry {} -> {ip}",
                    format_mac(&mac)
                )))?;
            changes.removed += 1;
        }
        for (mac, ip) in want.iter().filter(|w| !present.contains(w)) {
            self.handle
                .neighbours()
                .add_bridge(index, mac)
                .destination(IpAddr::V4(*ip))
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(err(format!("adding FDB entry {} -> {ip}", format_mac(mac))))?;
            changes.added += 1;
        }
        Ok(changes)
    }
}

/// Removes every route kdist made and its VXLAN device (with its neighbour and FDB
/// entries), in this process's network namespace: `kdist reset`. Blocking; true when
/// there was something to remove.
pub fn remove_all_blocking() -> Result<bool, NodeError> {
    let work = async {
        let nl = Netlink::connect()?;
        let routes = nl.sync_routes(&[]).await?;
        let blackhole = nl.sync_blackhole(None).await?;
        let device = nl.delete_link(VXLAN_DEVICE).await?;
        Ok(routes.removed + blackhole.removed > 0 || device)
    };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.block_on(work),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NodeError::io("netlink runtime"))?
            .block_on(work),
    }
}

fn link_of(m: &LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        mtu: 0,
        mac: None,
        up: m.header.flags.contains(LinkFlags::Up),
        vxlan: Vec::new(),
    };
    for attr in &m.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Address(mac) => link.mac = <[u8; 6]>::try_from(mac.as_slice()).ok(),
            LinkAttribute::LinkInfo(infos) => {
                let is_vxlan = infos.contains(&LinkInfo::Kind(InfoKind::Vxlan));
                for info in infos {
                    if let (true, LinkInfo::Data(InfoData::Vxlan(data))) = (is_vxlan, info) {
                        link.vxlan = data.clone();
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn route_of(m: &RouteMessage) -> Option<Route> {
    let mut dst = None;
    let mut via = None;
    let mut dev = None;
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => via = Some(*ip),
            RouteAttribute::Oif(index) => dev = Some(*index),
            _ => {}
        }
    }
    Some(Route {
        dst: Ipv4Net::new(dst?, m.header.destination_prefix_length).ok()?,
        via: via?,
        dev,
    })
}

fn neighbour_ip(m: &NeighbourMessage) -> Option<Ipv4Addr> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        // an FDB entry's remote comes undecoded (its family is AF_BRIDGE)
        NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
            <[u8; 4]>::try_from(bytes.as_slice())
                .ok()
                .map(Ipv4Addr::from)
        }
        _ => None,
    })
}

fn neighbour_mac(m: &NeighbourMessage) -> Option<[u8; 6]> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
        _ => None,
    })
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|p| {
            (p.len() == 2)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

// Single-link helpers for sync callers (reset): one request on a runtime of their own.
/// errno of a link that does not exist.
const ENODEV: i32 = nix::libc::ENODEV;

fn failed(link: &str) -> impl Fn(rtnetlink::Error) -> NodeError + '_ {
    move |source| NodeError::Netlink {
        link: link.to_string(),
        source,
    }
}

/// Deletes link `name` in this thread's network namespace; false when there is none.
pub async fn delete_link(name: &str) -> Result<bool, NodeError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|source| NodeError::NetlinkSocket { source })?;
    let task = tokio::spawn(connection);
    let result = async {
        let found = handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await;
        let link = match found {
            Ok(Some(link)) => link,
            Ok(None) => return Ok(false),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == ENODEV => {
                return Ok(false);
            }
            Err(e) => return Err(failed(name)(e)),
        };
        handle
            .link()
            .del(link.header.index)
            .execute()
            .await
            .map_err(failed(name))?;
        Ok(true)
    }
    .await;
    task.abort();
    result
}

/// [`delete_link`] for sync callers (not on an async worker).
pub fn delete_link_blocking(name: &str) -> Result<bool, NodeError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| NodeError::NetlinkSocket { source })?;
    runtime.block_on(delete_link(name))
}

#[cfg(test)]
mod link_tests {
    use super::*;

    /// Runs `f` on a thread of its own in a fresh network namespace, gone when the
    /// thread ends: nothing the test does reaches the host's links.
    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn ip(args: &[&str]) -> std::process::Output {
        // the child inherits the calling thread's network namespace
        std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap()
    }

    #[test]
    fn a_bridge_and_a_veth_pair_are_deleted_and_absent_is_fine() {
        in_new_netns(|| {
            // a bridge, as `kdist reset` deletes the CNI bridge
            assert!(
                ip(&["link", "add", "kdist-t0", "type", "bridge"])
                    .status
                    .success()
            );
            assert!(
                ip(&[
                    "link", "add", "kdist-va", "type", "veth", "peer", "name", "kdist-vb"
                ])
                .status
                .success()
            );
            assert!(ip(&["link", "show", "kdist-t0"]).status.success());
            assert!(delete_link_blocking("kdist-t0").unwrap());
            assert!(!ip(&["link", "show", "kdist-t0"]).status.success());
            assert!(!delete_link_blocking("kdist-t0").unwrap(), "already gone");
            // deleting one end of a veth pair removes both
            assert!(delete_link_blocking("kdist-va").unwrap());
            assert!(!ip(&["link", "show", "kdist-vb"]).status.success());
            assert!(!delete_link_blocking("no-such-link").unwrap());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vxlan_takes_fifty_bytes_and_its_address_is_the_ranges_first() {
        assert_eq!(vxlan_mtu(1500), 1450);
        assert_eq!(vxlan_mtu(9001), 8951);
        assert_eq!(vxlan_mtu(20), 0);
        let cidr: Ipv4Net = "10.1.7.0/24".parse().unwrap();
        assert_eq!(vtep_address(cidr), Ipv4Addr::new(10, 1, 7, 0));
    }

    #[test]
    fn a_peer_is_attached_only_through_a_real_subnet() {
        let addrs = [
            (2, "10.203.0.1/24".parse().unwrap()),
            (5, "10.1.3.1/24".parse().unwrap()),
            (6, "10.1.3.0/32".parse().unwrap()),
            (7, "192.0.2.9/32".parse().unwrap()),
        ];
        assert!(attached(Ipv4Addr::new(10, 203, 0, 2), &addrs, &[]));
        assert!(!attached(Ipv4Addr::new(10, 204, 0, 2), &addrs, &[]));
        // the pod bridge is not a way to another node
        assert!(attached(Ipv4Addr::new(10, 1, 3, 9), &addrs, &[]));
        assert!(!attached(Ipv4Addr::new(10, 1, 3, 9), &addrs, &[5]));
        assert!(!attached(Ipv4Addr::new(192, 0, 2, 9), &addrs, &[]));
    }

    #[test]
    fn macs_round_trip() {
        let mac = [0x0a, 0xbc, 0, 1, 0xff, 0x10];
        assert_eq!(format_mac(&mac), "0a:bc:00:01:ff:10");
        assert_eq!(parse_mac("0a:bc:00:01:ff:10"), Some(mac));
        for bad in [
            "",
            "0a:bc:00:01:ff",
            "0a:bc:00:01:ff:10:11",
            "0a:bc:00:01:ff:1",
            "zz:bc:00:01:ff:10",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_host_gw_route_matches_whatever_device_the_kernel_chose() {
        let want = Route {
            dst: "10.1.2.0/24".parse().unwrap(),
            via: Ipv4Addr::new(10, 203, 0, 2),
            dev: None,
        };
        let have = Route {
            dev: Some(4),
            ..want.clone()
        };
        assert!(want.matches(&have));
        let vx = Route {
            dev: Some(9),
            ..want.clone()
        };
        assert!(!vx.matches(&have));
        let other = Route {
            via: Ipv4Addr::new(10, 203, 0, 3),
            ..want.clone()
        };
        assert!(!other.matches(&have));
    }
}

/// Against real links in a network namespace of the test's own (a thread that
/// unshares its network namespace; the namespace goes with the thread).
#[cfg(test)]
mod netns_tests {
    use super::*;

    fn in_new_netns<F, Fut>(f: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let result = std::thread::spawn(move || {
            if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
                eprintln!("skipped: cannot create a network namespace (needs root)");
                return;
            }
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f());
        })
        .join();
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    /// A veth "uplink" with 10.99.0.1/24, both ends up; returns its index.
    async fn uplink(nl: &Netlink) -> u32 {
        let message = rtnetlink::LinkVeth::new("uplink0", "uplink1").build();
        nl.handle.link().add(message).execute().await.unwrap();
        for name in ["uplink0", "uplink1"] {
            let index = nl.link(name).await.unwrap().unwrap().index;
            let up = rtnetlink::LinkMessageBuilder::<LinkUnspec>::new()
                .index(index)
                .up()
                .build();
            nl.handle.link().set(up).execute().await.unwrap();
        }
        let link = nl.link("uplink0").await.unwrap().unwrap();
        nl.handle
            .address()
            .add(link.index, IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1)), 24)
            .execute()
            .await
            .unwrap();
        link.index
    }

    #[test]
    fn host_gw_routes_sync_without_duplicates_and_leave_foreign_routes() {
        in_new_netns(|| async {
            let nl = Netlink::connect().unwrap();
            uplink(&nl).await;
            let route = |dst: &str, via: [u8; 4]| Route {
                dst: dst.parse().unwrap(),
                via: via.into(),
                dev: None,
            };
            let want = vec![
                route("10.1.2.0/24", [10, 99, 0, 2]),
                route("10.1.3.0/24", [10, 99, 0, 3]),
            ];
            let c = nl.sync_routes(&want).await.unwrap();
            assert_eq!((c.added, c.removed), (2, 0));
            let c = nl.sync_routes(&want).await.unwrap();
            assert_eq!(
                (c.added, c.removed),
                (0, 0),
                "a second sync changes nothing"
            );
            assert_eq!(nl.routes().await.unwrap().len(), 2);
            // someone else's route (proto static) stays whatever kdist wants
            let foreign = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::new(10, 1, 9, 0), 24)
                .gateway(Ipv4Addr::new(10, 99, 0, 9))
                .build();
            nl.handle.route().add(foreign).execute().await.unwrap();
            // a peer left, another moved to a new address
            let want = vec![route("10.1.3.0/24", [10, 99, 0, 4])];
            let c = nl.sync_routes(&want).await.unwrap();
            assert_eq!((c.added, c.removed), (1, 2));
            let ours = nl.routes().await.unwrap();
            assert_eq!(ours.len(), 1);
            assert_eq!(ours[0].via, Ipv4Addr::new(10, 99, 0, 4));
            assert!(ours[0].dev.is_some(), "the kernel names the device");
            // the blackhole for the cluster range is one route, not a gateway route
            let cluster: Ipv4Net = "10.1.0.0/16".parse().unwrap();
            assert_eq!(nl.sync_blackhole(Some(cluster)).await.unwrap().added, 1);
            assert_eq!(
                nl.sync_blackhole(Some(cluster)).await.unwrap(),
                Changes::default()
            );
            assert_eq!(nl.routes().await.unwrap().len(), 1);
            nl.sync_routes(&[]).await.unwrap();
            assert!(nl.routes().await.unwrap().is_empty());
            assert_eq!(nl.sync_blackhole(None).await.unwrap().removed, 1);
            let all: Vec<RouteMessage> = nl
                .handle
                .route()
                .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
                .execute()
                .try_collect()
                .await
                .unwrap();
            assert!(
                all.iter()
                    .any(|m| route_of(m).is_some_and(|r| r.dst.to_string() == "10.1.9.0/24")),
                "the foreign route is gone"
            );
        });
    }

    #[test]
    fn the_vxlan_device_is_kept_with_its_mac_and_its_entries_sync() {
        in_new_netns(|| async {
            let nl = Netlink::connect().unwrap();
            let underlay = uplink(&nl).await;
            let spec = VxlanSpec {
                name: "kdist.vxlan".into(),
                vni: 1,
                port: 8472,
                local: Ipv4Addr::new(10, 99, 0, 1),
                underlay,
                mtu: vxlan_mtu(1500),
                vtep: Ipv4Addr::new(10, 1, 1, 0),
            };
            let vx = nl.ensure_vxlan(&spec).await.unwrap();
            assert_eq!(vx.mtu, 1450);
            assert!(vx.up && vx.mac.is_some());
            let again = nl.ensure_vxlan(&spec).await.unwrap();
            assert_eq!(
                (again.index, again.mac),
                (vx.index, vx.mac),
                "kept, same MAC"
            );
            let addrs = nl.addresses().await.unwrap();
            assert!(addrs.contains(&(vx.index, "10.1.1.0/32".parse().unwrap())));
            // another VNI is another device
            let other = nl
                .ensure_vxlan(&VxlanSpec {
                    vni: 7,
                    ..spec.clone()
                })
                .await
                .unwrap();
            assert_ne!(other.index, vx.index);
            let vx = other;

            let peer_mac = [0x0a, 0, 0, 0, 0, 2];
            let peer_vtep = Ipv4Addr::new(10, 1, 2, 0);
            let peer_ip = Ipv4Addr::new(10, 99, 0, 2);
            let c = nl
                .sync_neighbours(vx.index, &[(peer_vtep, peer_mac)])
                .await
                .unwrap();
            assert_eq!(c.added, 1);
            let c = nl.sync_fdb(vx.index, &[(peer_mac, peer_ip)]).await.unwrap();
            assert_eq!(c.added, 1);
            let routes = [Route {
                dst: "10.1.2.0/24".parse().unwrap(),
                via: peer_vtep,
                dev: Some(vx.index),
            }];
            assert_eq!(nl.sync_routes(&routes).await.unwrap().added, 1);
            assert_eq!(
                nl.neighbours(vx.index).await.unwrap(),
                [(peer_vtep, peer_mac)]
            );
            assert_eq!(nl.fdb(vx.index).await.unwrap(), [(peer_mac, peer_ip)]);
            // again: nothing changes
            assert_eq!(
                nl.sync_neighbours(vx.index, &[(peer_vtep, peer_mac)])
                    .await
                    .unwrap(),
                Changes::default()
            );
            assert_eq!(
                nl.sync_fdb(vx.index, &[(peer_mac, peer_ip)]).await.unwrap(),
                Changes::default()
            );
            assert_eq!(nl.sync_routes(&routes).await.unwrap(), Changes::default());
            // the peer leaves
            assert_eq!(nl.sync_neighbours(vx.index, &[]).await.unwrap().removed, 1);
            assert_eq!(nl.sync_fdb(vx.index, &[]).await.unwrap().removed, 1);
            assert_eq!(nl.sync_routes(&[]).await.unwrap().removed, 1);
            assert!(nl.neighbours(vx.index).await.unwrap().is_empty());
            assert!(nl.fdb(vx.index).await.unwrap().is_empty());
            assert!(nl.delete_link("kdist.vxlan").await.unwrap());
            assert!(!nl.delete_link("kdist.vxlan").await.unwrap());
        });
    }
}
