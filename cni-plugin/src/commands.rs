//! The CNI commands. ADD sets up in an order whose every step registers its
//! undo with a [`Rollback`] guard, so any failure (or panic) leaves nothing
//! behind; DEL tolerates anything already gone; CHECK, STATUS and GC inspect
//! the real state.

use std::{collections::BTreeSet, net::IpAddr, os::fd::AsFd as _, path::Path};

use ipnet::IpNet;
use serde_json::Value;
use spright_endpoint::{RECORD_VERSION, Record};

use spright_endpoint::netns;

use crate::{
    config::{self, Config, Env, Mode},
    datapath::{self, Acceleration},
    error::{Error, Result},
    ipam::{self, Ipam},
    iptables,
    link::Netlink,
    state,
    version::{CniResult, Interface, IpConfig, Route, Version},
};

/// Undo steps of a half-done ADD, run in reverse order on drop unless
/// [`Rollback::commit`] was called.
#[derive(Default)]
pub struct Rollback {
    steps: Vec<(&'static str, Undo)>,
}

type Undo = Box<dyn FnOnce() -> Result<()>>;

impl Rollback {
    pub fn push(&mut self, what: &'static str, undo: impl FnOnce() -> Result<()> + 'static) {
        self.steps.push((what, Box::new(undo)));
    }

    /// The ADD succeeded: keep everything.
    pub fn commit(mut self) {
        self.steps.clear();
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        while let Some((what, undo)) = self.steps.pop() {
            match undo() {
                Ok(()) => tracing::debug!(step = what, "rolled back"),
                Err(e) => tracing::error!(
                    step = what,
                    error = &e as &dyn std::error::Error,
                    "rollback step failed"
                ),
            }
        }
    }
}

/// Host-side veth name: stable per attachment, at most 15 bytes.
/// Runs `f` in a pod's network namespace through the one netns seam
/// (`spright_endpoint::netns`), with the plugin's errors.
fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    netns::run_in(path, f)
}

pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("spr{:012x}", h >> 16)
}

/// The gateway of an IPAM address: the one IPAM gave, else the subnet's first host.
pub fn gateway_of(ip: &IpConfig) -> IpAddr {
    ip.gateway.unwrap_or_else(|| {
        let net = ip.address.trunc();
        match net.network() {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) + 1).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) + 1).into()),
        }
    })
}

fn default_route(v6: bool) -> IpNet {
    if v6 {
        "::/0".parse().expect("literal")
    } else {
        "0.0.0.0/0".parse().expect("literal")
    }
}

fn record_for(
    config: &Config,
    env: &Env,
    ips: Vec<IpAddr>,
    host_ifname: Option<String>,
) -> Result<Record> {
    let m = config::membership(config, env)?;
    Ok(Record {
        version: RECORD_VERSION,
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        network: config.name.clone(),
        ips,
        pod: m.pod,
        chain: m.chain,
        function: m.function,
        redirect: m.redirect,
        host_ifname,
        netns_cookie: None,
    })
}

/// ADD.
pub fn add(config: &Config, env: &Env) -> Result<Value> {
    // Validate everything that needs no side effect first.
    let probe = record_for(config, env, Vec::new(), None)?;
    let netns_path = Path::new(&env.netns);
    let netns_file = netns::open(netns_path)?;
    state::prepare(config)?;

    let mut rollback = Rollback::default();
    // The pod's addresses with their prefixes, for the masquerade rules.
    let mut masq_nets: Vec<IpNet> = Vec::new();
    let (output, mut record) = match config.mode {
        Mode::Chained => {
            let prev = config.prev_result.clone().ok_or(Error::InvalidConfig {
                field: "prevResult",
                why: "chained mode runs after another plugin and needs its result".into(),
            })?;
            let parsed = CniResult::parse(&prev).map_err(Error::Decode)?;
            let ips = parsed.pod_ips(&env.ifname);
            if ips.is_empty() {
                return Err(Error::InvalidConfig {
                    field: "prevResult",
                    why: format!("no IP for interface {} in the previous result", env.ifname),
                });
            }
            let mut out = prev;
            out["cniVersion"] = Value::from(config.cni_version());
            (out, Record { ips, ..probe })
        }
        Mode::Bridge => {
            let ipam = Ipam::locate(config, &env.path)?;
            let taken = in_netns(netns_path, || {
                Ok(Netlink::new()?.link(&env.ifname)?.is_some())
            })?;
            if taken {
                return Err(Error::IfnameTaken {
                    ifname: env.ifname.clone(),
                    netns: env.netns.clone(),
                });
            }
            let result = ipam.add()?;
            rollback.push("release the IPAM allocation", move || ipam.del());
            let quickack = wants_quickack(&probe);
            let (result, host) = plumb(config, env, &netns_file, result, quickack, &mut rollback)?;
            let ips = result.ips.iter().map(|ip| ip.address.addr()).collect();
            masq_nets = result.ips.iter().map(|ip| ip.address).collect();
            (
                result.to_json(config.cni_version()),
                Record {
                    ips,
                    host_ifname: Some(host),
                    ..probe
                },
            )
        }
    };

    if config.ip_masq && config.mode == Mode::Bridge {
        let comment = iptables::comment(&config.name, &env.container_id);
        let c = comment.clone();
        rollback.push("remove masquerade rules", move || iptables::remove(&c));
        for net in &masq_nets {
            iptables::add(net, &config.non_masquerade_cidrs, &comment)?;
        }
    }

    // Only Service translation needs the cookie; a kernel without netns
    // cookies (before 5.14) still gets networking and pod-to-pod redirects.
    record.netns_cookie = spright_endpoint::netns_cookie(netns_path)
        .inspect_err(|e| {
            tracing::warn!(error = e as &dyn std::error::Error, netns = %env.netns,
                "cannot read the network namespace cookie; Service translation is off for this pod");
        })
        .ok();
    spright_endpoint::write(config.state_dir(), &record).map_err(Error::Record)?;
    let (dir, cid, ifname) = (
        config.state_dir.clone(),
        env.container_id.clone(),
        env.ifname.clone(),
    );
    rollback.push("remove the endpoint record", move || {
        spright_endpoint::remove(&dir, &cid, &ifname).map_err(Error::Record)
    });

    let accel = datapath::accelerate(config, &record.ips, record.endpoint_value());
    tracing::info!(
        container.id = %env.container_id, pod.ifname = %env.ifname, pod.ips = ?record.ips,
        chain = record.chain.as_deref().unwrap_or("-"), accelerated = accel == Acceleration::On, "ADD done"
    );
    rollback.commit();
    Ok(output)
}

/// Whether the pod's on-link (pod subnet) routes get `quickack 1`: only pods
/// whose connections can be redirected (chain members that did not opt out).
/// It trades delayed ACKs for fewer spurious EAGAINs on the redirect path
/// (docs/RELIABILITY.md, documented limit 1 and the EAGAIN policy), which only carries node-local hops, so routes
/// off the node (default, IPAM's) never get it. Immediate ACKs change plain
/// TCP's performance both ways: `cargo xtask bench datapath` measured, on the
/// same vCPU, 1.38x the RTT and 0.35x the throughput of 64-byte messages, but
/// 2.06x the throughput of 64 KiB writes.
fn wants_quickack(record: &Record) -> bool {
    record.chain.is_some() && record.redirect
}

/// `fe80::/64`, which the kernel routes by itself.
fn is_link_local(net: &IpNet) -> bool {
    matches!(net.addr(), IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80)
}

/// The bridge-mode plumbing: bridge, veth, addresses and routes.
fn plumb(
    config: &Config,
    env: &Env,
    netns_file: &std::fs::File,
    mut result: CniResult,
    quickack: bool,
    rollback: &mut Rollback,
) -> Result<(CniResult, String)> {
    let node = Netlink::new()?;
    let bridge = {
        let _lock = state::lock(config)?;
        let bridge = node.ensure_bridge(&config.bridge, config.mtu)?;
        for ip in &result.ips {
            let gw = IpNet::new(gateway_of(ip), ip.address.prefix_len())
                .expect("prefix from a valid net");
            node.add_address(bridge.index, gw, false, &config.bridge)?;
        }
        bridge
    };

    let host_name = host_ifname(&env.container_id, &env.ifname);
    node.create_veth(&host_name, &env.ifname, config.mtu, netns_file.as_fd())?;
    let h = host_name.clone();
    rollback.push("delete the veth pair", move || {
        Netlink::new()?.delete_link(&h).map(drop)
    });
    let host = node.link(&host_name)?.ok_or_else(|| Error::Netlink {
        op: "find link",
        object: host_name.clone(),
        detail: "it vanished".into(),
    })?;
    node.attach_to_bridge(host.index, bridge.index, config.hairpin_mode, &host_name)?;

    // Routes: the subnet on-link, a default route per family via the
    // gateway (unless IPAM routes already cover it), IPAM's own routes.
    // Only the on-link routes of pods that can be redirected get quickack.
    let mut routes: Vec<Route> = Vec::new();
    for v6 in [false, true] {
        let Some(ip) = result
            .ips
            .iter()
            .find(|ip| ip.address.addr().is_ipv6() == v6)
        else {
            continue;
        };
        let gw = gateway_of(ip);
        let has_default = result.routes.iter().any(|r| r.dst == default_route(v6));
        if !has_default {
            routes.push(Route {
                dst: default_route(v6),
                gw: Some(gw),
            });
        }
    }
    for r in &result.routes {
        let gw = r.gw.or_else(|| {
            result
                .ips
                .iter()
                .find(|ip| ip.address.addr().is_ipv6() == r.dst.addr().is_ipv6())
                .map(gateway_of)
        });
        routes.push(Route { dst: r.dst, gw });
    }
    let ips = result.ips.clone();
    let ifname = env.ifname.clone();
    let pod = in_netns(Path::new(&env.netns), || {
        let nl = Netlink::new()?;
        let pod = nl.link(&ifname)?.ok_or_else(|| Error::Netlink {
            op: "find link",
            object: ifname.clone(),
            detail: "the pod end of the veth is missing".into(),
        })?;
        for ip in &ips {
            nl.add_address(pod.index, ip.address, true, &ifname)?;
        }
        nl.set_up(pod.index, &ifname)?;
        for ip in &ips {
            nl.add_route(
                ip.address.trunc(),
                None,
                Some(ip.address.addr()),
                pod.index,
                quickack,
            )?;
        }
        for r in &routes {
            nl.add_route(r.dst, r.gw, None, pod.index, false)?;
        }
        Ok(pod)
    })?;

    result.interfaces = vec![
        Interface {
            name: config.bridge.clone(),
            mac: bridge.mac,
            ..Interface::default()
        },
        Interface {
            name: host_name.clone(),
            mac: host.mac,
            ..Interface::default()
        },
        Interface {
            name: env.ifname.clone(),
            mac: pod.mac,
            sandbox: env.netns.clone(),
            ..Interface::default()
        },
    ];
    for ip in &mut result.ips {
        ip.interface = Some(2);
        ip.gateway = Some(gateway_of(ip));
    }
    if result.routes.is_empty() {
        result.routes = result
            .ips
            .iter()
            .map(|ip| Route {
                dst: default_route(ip.address.addr().is_ipv6()),
                gw: ip.gateway,
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
    }
    Ok((result, host_name))
}

/// DEL: idempotent; a missing netns, link, record or allocation is success.
pub fn del(config: &Config, env: &Env) -> Result<()> {
    let record = match spright_endpoint::find(config.state_dir(), &env.container_id, &env.ifname) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "unreadable endpoint record; cleaning up without it"
            );
            None
        }
    };
    if let Some(r) = &record {
        datapath::forget(config, &r.ips);
    }
    if config.mode == Mode::Bridge {
        teardown(config, &env.container_id, &env.ifname, &env.netns)?;
        Ipam::locate(config, &env.path)?.del()?;
    }
    spright_endpoint::remove(config.state_dir(), &env.container_id, &env.ifname)
        .map_err(Error::Record)?;
    tracing::info!(container.id = %env.container_id, pod.ifname = %env.ifname, "DEL done");
    Ok(())
}

/// Removes the veth (both ends) and masquerade rules of one attachment.
fn teardown(config: &Config, container_id: &str, ifname: &str, netns: &str) -> Result<()> {
    if !netns.is_empty() {
        match in_netns(Path::new(netns), || Netlink::new()?.delete_link(ifname)) {
            Ok(_) | Err(Error::NetnsMissing { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Netlink::new()?.delete_link(&host_ifname(container_id, ifname))?;
    if config.ip_masq {
        iptables::remove(&iptables::comment(&config.name, container_id))?;
    }
    Ok(())
}

/// CHECK: the attachment still looks the way ADD left it.
pub fn check(config: &Config, env: &Env) -> Result<()> {
    if config.version < Version::V0_4_0 {
        return Err(Error::CommandNeedsVersion {
            command: "CHECK",
            min: "0.4.0",
            version: config.cni_version().into(),
        });
    }
    let prev = config.prev_result.clone().ok_or(Error::InvalidConfig {
        field: "prevResult",
        why: "CHECK needs the result of ADD".into(),
    })?;
    let prev_parsed = CniResult::parse(&prev).map_err(Error::Decode)?;
    let failed = |what: String| Error::CheckFailed { what };
    let record = spright_endpoint::find(config.state_dir(), &env.container_id, &env.ifname)
        .map_err(Error::Record)?
        .ok_or_else(|| {
            failed(format!(
                "no endpoint record for {} {}",
                env.container_id, env.ifname
            ))
        })?;
    let want: BTreeSet<IpAddr> = prev_parsed.pod_ips(&env.ifname).into_iter().collect();
    let recorded: BTreeSet<IpAddr> = record.ips.iter().copied().collect();
    if want != recorded {
        return Err(failed(format!(
            "recorded IPs {recorded:?} differ from prevResult {want:?}"
        )));
    }
    let netns_path = Path::new(&env.netns);
    netns::open(netns_path)?;
    if config.mode == Mode::Chained {
        return Ok(());
    }
    let ifname = env.ifname.clone();
    let (pod_addrs, routes_ok) = in_netns(netns_path, || {
        let nl = Netlink::new()?;
        let pod = nl
            .link(&ifname)?
            .ok_or_else(|| failed(format!("interface {ifname} is missing in the pod")))?;
        if !pod.up {
            return Err(failed(format!("interface {ifname} is down")));
        }
        let quickack = [false, true].into_iter().try_fold(true, |ok, v6| {
            Ok::<_, Error>(
                ok && nl
                    .routes(v6)?
                    .iter()
                    .filter(|(d, _)| d.prefix_len() != 0 && !is_link_local(d))
                    .all(|(_, q)| *q),
            )
        })?;
        Ok((nl.addresses(pod.index)?, quickack))
    })?;
    for ip in &prev_parsed.ips {
        if want.contains(&ip.address.addr()) && !pod_addrs.contains(&ip.address) {
            return Err(failed(format!(
                "address {} is missing on {}",
                ip.address, env.ifname
            )));
        }
    }
    if wants_quickack(&record) && !routes_ok {
        return Err(failed("an on-link pod route lacks quickack".into()));
    }
    let node = Netlink::new()?;
    let bridge = node
        .link(&config.bridge)?
        .ok_or_else(|| failed(format!("bridge {} is missing", config.bridge)))?;
    let host_name = host_ifname(&env.container_id, &env.ifname);
    let host = node
        .link(&host_name)?
        .ok_or_else(|| failed(format!("host interface {host_name} is missing")))?;
    if host.master != Some(bridge.index) || !host.up {
        return Err(failed(format!(
            "host interface {host_name} is not up on bridge {}",
            config.bridge
        )));
    }
    Ipam::locate(config, &env.path)?.check(&prev)?;
    Ok(())
}

/// meshd's start-up self-test as published in the state directory: whether
/// this kernel's redirect path has the blocking-recv EAGAIN behaviour.
fn selftest_summary(state_dir: &Path) -> String {
    spright_endpoint::selftest::read(state_dir).map_or_else(
        || "kernel self-test: not run yet (meshd publishes it at start-up)".into(),
        |r| r.summary(),
    )
}

/// STATUS: can this plugin serve an ADD right now?
pub fn status(config: &Config, env: &Env) -> Result<()> {
    let accel = format!(
        "{}; {}",
        if datapath::installed(config) {
            "acceleration on"
        } else {
            "acceleration off (datapath not installed yet)"
        },
        selftest_summary(config.state_dir())
    );
    if config.mode == Mode::Bridge {
        let plugin = config.ipam_type.clone().unwrap_or_default();
        if ipam::find_on_path(&plugin, &env.path).is_none() {
            return Err(Error::NotAvailable {
                why: format!(
                    "IPAM plugin {plugin:?} not found on CNI_PATH {:?}; {accel}",
                    env.path
                ),
            });
        }
        if let Some(link) = Netlink::new()?.link(&config.bridge)? {
            if link.kind.as_deref() != Some("bridge") {
                return Err(Error::NotAvailable {
                    why: format!("{} exists and is not a bridge; {accel}", config.bridge),
                });
            }
            if !link.up {
                return Err(Error::LimitedConnectivity {
                    why: format!("bridge {} is down; {accel}", config.bridge),
                });
            }
        }
    }
    if let Err(e) = state::prepare(config) {
        return Err(Error::NotAvailable {
            why: format!("state directory is not writable ({e}); {accel}"),
        });
    }
    if let Some(addr) = config.meshd_readyz {
        meshd_ready(addr).map_err(|why| Error::NotAvailable {
            why: format!("meshd at {addr} is not ready ({why}); {accel}"),
        })?;
    }
    tracing::info!(accel = %accel, "STATUS ok");
    Ok(())
}

/// Whether meshd's `/readyz` at `addr` answers 200 within a second: it has
/// reconciled once, so the programs are attached or known to be unavailable.
fn meshd_ready(addr: std::net::SocketAddr) -> std::result::Result<(), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(1)))
        .http_status_as_error(false)
        .build()
        .into();
    let resp = agent
        .get(&format!("http://{addr}/readyz"))
        .call()
        .map_err(|e| e.to_string())?;
    match resp.status().as_u16() {
        200 => Ok(()),
        s => Err(format!("/readyz answered {s}")),
    }
}

/// GC: forget every attachment of this network that the runtime no longer knows.
pub fn gc(config: &Config, env: &Env) -> Result<()> {
    let valid: BTreeSet<(String, String)> = config
        .valid_attachments
        .as_ref()
        .ok_or(Error::InvalidConfig {
            field: config::GC_VALID_ATTACHMENTS,
            why: "GC needs the list of valid attachments".into(),
        })?
        .iter()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let _lock = state::lock(config)?;
    let records = spright_endpoint::list(config.state_dir()).map_err(Error::Record)?;
    let ipam = match config.mode {
        Mode::Bridge => Some(Ipam::locate(config, &env.path)?),
        Mode::Chained => None,
    };
    let mut removed = 0usize;
    for (path, r) in records {
        let Ok(r) = r else {
            tracing::warn!(path = %path.display(), "skipping unreadable endpoint record");
            continue;
        };
        if r.network != config.name || valid.contains(&(r.container_id.clone(), r.ifname.clone())) {
            continue;
        }
        datapath::forget(config, &r.ips);
        if let Some(ipam) = &ipam {
            teardown(config, &r.container_id, &r.ifname, &r.netns)?;
            ipam.del_for(&r.container_id, &r.ifname)?;
        }
        spright_endpoint::remove(config.state_dir(), &r.container_id, &r.ifname)
            .map_err(Error::Record)?;
        removed += 1;
    }
    // Delegate GC to IPAM too (spec); plugins older than 1.1 do not know it,
    // and the per-attachment DELs above already released what we recorded.
    if let Some(Err(e)) = ipam.as_ref().map(|i| i.gc(&config.input)) {
        tracing::debug!(
            error = &e as &dyn std::error::Error,
            "IPAM plugin does not support GC"
        );
    }
    tracing::info!(removed, "GC done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, rc::Rc};

    use super::*;

    #[test]
    fn host_names_fit_and_differ() {
        let a = host_ifname("0123456789abcdef0123456789abcdef", "eth0");
        assert_eq!(a.len(), 15);
        assert_ne!(a, host_ifname("0123456789abcdef0123456789abcdef", "eth1"));
        assert_eq!(a, host_ifname("0123456789abcdef0123456789abcdef", "eth0"));
    }

    #[test]
    fn gateway_defaults_to_first_host() {
        let ip = IpConfig {
            address: "10.213.7.9/24".parse().unwrap(),
            gateway: None,
            interface: None,
        };
        assert_eq!(gateway_of(&ip), "10.213.7.1".parse::<IpAddr>().unwrap());
        let ip6 = IpConfig {
            address: "fd00:213::9/64".parse().unwrap(),
            gateway: None,
            interface: None,
        };
        assert_eq!(gateway_of(&ip6), "fd00:213::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn rollback_runs_in_reverse_unless_committed() {
        let log = Rc::new(RefCell::new(Vec::new()));
        {
            let mut rb = Rollback::default();
            for i in 0..3 {
                let l = log.clone();
                rb.push("step", move || {
                    l.borrow_mut().push(i);
                    Ok(())
                });
            }
        }
        assert_eq!(*log.borrow(), vec![2, 1, 0]);
        let mut rb = Rollback::default();
        let l = log.clone();
        rb.push("step", move || {
            l.borrow_mut().push(9);
            Ok(())
        });
        rb.commit();
        assert_eq!(log.borrow().len(), 3);
    }
}
