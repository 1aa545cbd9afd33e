//! Netlink operations (rtnetlink) on the namespace the calling thread is in.
//!
//! [`Netlink`] owns a single-threaded tokio runtime and one rtnetlink
//! connection; the socket is bound to the namespace of the thread that
//! created it, so create it inside [`spright_endpoint::netns::run_in`] for the pod side.

use std::{
    net::IpAddr,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::{
    LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressFlags},
        link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        route::{RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteScope},
    },
};

use crate::error::{Error, Result};

const ENODEV: i32 = 19;
const EEXIST: i32 = 17;

/// The errno of a netlink error, if it is one.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// A readable description of a netlink error (the errno's text when there is one).
pub fn describe(e: &rtnetlink::Error) -> String {
    match errno(e) {
        Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
        None => e.to_string(),
    }
}

/// What the plugin needs to know about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: String,
    pub kind: Option<String>,
    pub master: Option<u32>,
    pub up: bool,
    pub mtu: Option<u32>,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Self {
        let mut link = Self {
            index: m.header.index,
            name: String::new(),
            mac: String::new(),
            kind: None,
            master: None,
            up: m.header.flags.contains(LinkFlags::Up),
            mtu: None,
        };
        for attr in &m.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name.clone_from(n),
                LinkAttribute::Address(a) => {
                    link.mac = a
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":");
                }
                LinkAttribute::Controller(c) => link.master = Some(*c),
                LinkAttribute::Mtu(m) => link.mtu = Some(*m),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            link.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// One rtnetlink connection on the current thread's namespace.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: rtnetlink::Handle,
}

impl Netlink {
    pub fn new() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(Error::io("start", "netlink runtime"))?;
        let (conn, handle, _) = {
            let _ctx = rt.enter();
            rtnetlink::new_connection().map_err(Error::io("open", "netlink socket"))?
        };
        rt.spawn(conn);
        Ok(Self { rt, handle })
    }

    /// The link called `name`, if there is one.
    pub fn link(&self, name: &str) -> Result<Option<Link>> {
        let req = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match self.rt.block_on(async {
            futures::pin_mut!(req);
            req.try_next().await
        }) {
            Ok(m) => Ok(m.as_ref().map(Link::from_message)),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(Error::netlink("look up link", name)(e)),
        }
    }

    fn require(&self, name: &str) -> Result<Link> {
        self.link(name)?.ok_or_else(|| Error::Netlink {
            op: "find link",
            object: name.to_owned(),
            detail: "it vanished".into(),
        })
    }

    /// Creates the bridge unless it exists (racing creators are fine), sets
    /// it up; fails when `name` exists but is no bridge.
    pub fn ensure_bridge(&self, name: &str, mtu: Option<u32>) -> Result<Link> {
        if self.link(name)?.is_none() {
            let mut msg = LinkBridge::new(name).up();
            if let Some(m) = mtu {
                msg = msg.mtu(m);
            }
            match self
                .rt
                .block_on(self.handle.link().add(msg.build()).execute())
            {
                Ok(()) => {}
                Err(e) if errno(&e) == Some(EEXIST) => {}
                Err(e) => return Err(Error::netlink("create bridge", name)(e)),
            }
        }
        let link = self.require(name)?;
        if link.kind.as_deref() != Some("bridge") {
            return Err(Error::InvalidConfig {
                field: "bridge",
                why: format!(
                    "{name} exists and is a {} link, not a bridge",
                    link.kind.as_deref().unwrap_or("plain")
                ),
            });
        }
        if !link.up {
            self.set_up(link.index, name)?;
        }
        Ok(link)
    }

    pub fn set_up(&self, index: u32, name: &str) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(Error::netlink("set up", name))
    }

    /// Adds an address; an existing identical one is fine. IPv6 addresses
    /// skip DAD (the plugin owns the subnet); `no_prefix_route` leaves the
    /// subnet route to the caller.
    pub fn add_address(
        &self,
        index: u32,
        net: IpNet,
        no_prefix_route: bool,
        object: &str,
    ) -> Result<()> {
        let mut req = self
            .handle
            .address()
            .add(index, net.addr(), net.prefix_len());
        let mut flags = AddressFlags::empty();
        if net.addr().is_ipv6() {
            flags |= AddressFlags::Nodad;
        }
        if no_prefix_route {
            flags |= AddressFlags::Noprefixroute;
        }
        if !flags.is_empty() {
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(flags));
        }
        match self.rt.block_on(req.execute()) {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(Error::netlink("add address", format!("{net} on {object}"))(
                e,
            )),
        }
    }

    /// The addresses on a link.
    pub fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        let req = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let msgs: Vec<_> = self
            .rt
            .block_on(req.try_collect())
            .map_err(Error::netlink("list addresses of link", index.to_string()))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => IpNet::new(*ip, m.header.prefix_len).ok(),
                    _ => None,
                })
            })
            .collect())
    }

    /// Creates a veth pair: `host` here, `peer` directly inside the namespace
    /// `peer_netns` (so the pod end never appears on the node).
    pub fn create_veth(
        &self,
        host: &str,
        peer: &str,
        mtu: Option<u32>,
        peer_netns: BorrowedFd<'_>,
    ) -> Result<()> {
        let mut peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_owned())
            .setns_by_fd(peer_netns.as_raw_fd());
        let mut msg = LinkVeth::new(host, peer);
        if let Some(m) = mtu {
            peer_msg = peer_msg.mtu(m);
            msg = msg.mtu(m);
        }
        let msg = msg
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
            .build();
        self.rt
            .block_on(self.handle.link().add(msg).execute())
            .map_err(Error::netlink(
                "create veth",
                format!("{host} (peer {peer})"),
            ))
    }

    /// Enslaves a link to the bridge, sets hairpin mode and brings it up.
    pub fn attach_to_bridge(
        &self,
        index: u32,
        bridge: u32,
        hairpin: bool,
        name: &str,
    ) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index)
            .controller(bridge)
            .up()
            .build();
        self.rt
            .block_on(self.handle.link().set(msg).execute())
            .map_err(Error::netlink("attach to bridge", name))?;
        if hairpin {
            let msg = LinkBridgePort::new(index).hairpin(true).build();
            self.rt
                .block_on(self.handle.link().set_port(msg).execute())
                .map_err(Error::netlink("set hairpin mode on", name))?;
        }
        Ok(())
    }

    /// Deletes a link by name; a missing link is fine. Returns whether it existed.
    pub fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(link) = self.link(name)? else {
            return Ok(false);
        };
        match self
            .rt
            .block_on(self.handle.link().del(link.index).execute())
        {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(false),
            Err(e) => Err(Error::netlink("delete link", name)(e)),
        }
    }

    /// Adds a route through `index`, with `quickack 1` when asked (see
    /// docs/RELIABILITY.md, the EAGAIN policy: meant to cut the redirect
    /// path's EAGAIN on half-closed sockets). Without a gateway the route is on-link (scope
    /// link, from `src`).
    pub fn add_route(
        &self,
        dst: IpNet,
        gw: Option<IpAddr>,
        src: Option<IpAddr>,
        index: u32,
        quickack: bool,
    ) -> Result<()> {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| Error::Netlink {
                op: "build route",
                object: dst.to_string(),
                detail: e.to_string(),
            })?
            .output_interface(index);
        if let Some(gw) = gw {
            b = b.gateway(gw).map_err(|e| Error::Netlink {
                op: "build route",
                object: dst.to_string(),
                detail: e.to_string(),
            })?;
        } else {
            b = b.scope(RouteScope::Link);
            if let Some(src) = src.filter(IpAddr::is_ipv4) {
                b = b.pref_source(src).map_err(|e| Error::Netlink {
                    op: "build route",
                    object: dst.to_string(),
                    detail: e.to_string(),
                })?;
            }
        }
        let mut msg = b.build();
        if quickack {
            msg.attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::QuickAck(1)]));
        }
        match self.rt.block_on(self.handle.route().add(msg).execute()) {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(Error::netlink("add route", format!("{dst} via {gw:?}"))(e)),
        }
    }

    /// The routes of one family, each with whether it carries `quickack 1`.
    pub fn routes(&self, v6: bool) -> Result<Vec<(IpNet, bool)>> {
        let filter = if v6 {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        };
        let msgs: Vec<_> = self
            .rt
            .block_on(self.handle.route().get(filter).execute().try_collect())
            .map_err(Error::netlink(
                "list routes",
                if v6 { "ipv6" } else { "ipv4" },
            ))?;
        // The main table only: the local table's host, broadcast and
        // multicast routes are the kernel's, never ours.
        Ok(msgs
            .iter()
            .filter(|m| m.header.table == RT_TABLE_MAIN)
            .filter_map(|m| {
                let dst = m
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Destination(d) => route_addr(d),
                        _ => None,
                    })
                    .unwrap_or(if v6 { IpAddr::from([0u16; 8]) } else { IpAddr::from([0u8; 4]) });
                let net = IpNet::new(dst, m.header.destination_prefix_length).ok()?;
                let quickack = m.attributes.iter().any(|a| {
                    matches!(a, RouteAttribute::Metrics(ms) if ms.contains(&RouteMetric::QuickAck(1)))
                });
                Some((net, quickack))
            })
            .collect())
    }
}

impl Netlink {
    /// The main table's routes of both families tagged with `protocol`, as
    /// (destination, gateway). A routing agent marks its routes with its own
    /// protocol number so it can find, replace and remove exactly those.
    pub fn gateway_routes(&self, protocol: u8) -> Result<Vec<(IpNet, IpAddr)>> {
        let mut out = Vec::new();
        for filter in [
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        ] {
            let msgs: Vec<RouteMessage> = self
                .rt
                .block_on(self.handle.route().get(filter).execute().try_collect())
                .map_err(Error::netlink("list routes", "of both families"))?;
            out.extend(
                msgs.iter()
                    .filter(|m| {
                        m.header.table == RT_TABLE_MAIN
                            && m.header.protocol == RouteProtocol::from(protocol)
                    })
                    .filter_map(|m| {
                        let dst = m.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Destination(d) => route_addr(d),
                            _ => None,
                        })?;
                        let via = m.attributes.iter().find_map(|a| match a {
                            RouteAttribute::Gateway(g) => route_addr(g),
                            _ => None,
                        })?;
                        Some((
                            IpNet::new(dst, m.header.destination_prefix_length).ok()?,
                            via,
                        ))
                    }),
            );
        }
        Ok(out)
    }

    fn gateway_route(dst: IpNet, via: IpAddr, protocol: u8) -> Result<RouteMessage> {
        let bad = |detail: String| Error::Netlink {
            op: "build route",
            object: format!("{dst} via {via}"),
            detail,
        };
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| bad(e.to_string()))?
            .gateway(via)
            .map_err(|e| bad(e.to_string()))?
            .protocol(RouteProtocol::from(protocol))
            .build())
    }

    /// Adds `dst via gateway`, or replaces the route to `dst` (another
    /// gateway: the node's address changed), tagged with `protocol`.
    pub fn replace_gateway_route(&self, dst: IpNet, via: IpAddr, protocol: u8) -> Result<()> {
        let msg = Self::gateway_route(dst, via, protocol)?;
        self.rt
            .block_on(self.handle.route().add(msg).replace().execute())
            .map_err(Error::netlink("replace route", format!("{dst} via {via}")))
    }

    /// Deletes `dst via gateway` of `protocol`; a route already gone is fine.
    pub fn delete_gateway_route(&self, dst: IpNet, via: IpAddr, protocol: u8) -> Result<()> {
        const ESRCH: i32 = 3;
        let msg = Self::gateway_route(dst, via, protocol)?;
        match self.rt.block_on(self.handle.route().del(msg).execute()) {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(ESRCH) => Ok(()),
            Err(e) => Err(Error::netlink("delete route", format!("{dst} via {via}"))(
                e,
            )),
        }
    }
}

/// The kernel's main routing table.
const RT_TABLE_MAIN: u8 = 254;

fn route_addr(a: &rtnetlink::packet_route::route::RouteAddress) -> Option<IpAddr> {
    use rtnetlink::packet_route::route::RouteAddress;
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}
