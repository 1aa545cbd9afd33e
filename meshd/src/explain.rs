//! `spright explain FROM TO [PORT]`: would a new connection from one pod to
//! another (or to a Service address) be redirected or translated, and if
//! not, exactly why.
//!
//! The answer comes from the pinned maps the kernel programs read (the
//! endpoint, chain-allow, network-namespace and service maps) run through
//! the programs' own decision functions (`spright_common::verdict` and
//! `translation_chain`), so it cannot drift from what the kernel does. The
//! endpoint records only turn pod names into addresses and network
//! namespace cookies.

use std::{fmt::Write as _, net::IpAddr, path::Path};

use serde::Serialize;
use spright_ebpf::{
    ChainPair, Datapath, EndpointValue, IPPROTO_TCP, SvcKey, Translate, addr_of, ip_of,
};
use spright_endpoint::Record;

/// One end as given on the command line, resolved.
#[derive(Clone, Debug, Serialize)]
pub struct End {
    /// What the user typed.
    pub arg: String,
    /// `namespace/name` of the recorded pod at this address, if any.
    pub pod: Option<String>,
    pub ip: IpAddr,
    /// The chain the pod was recorded with.
    pub chain: Option<String>,
    /// Its entry in the endpoint map (`None`: not an endpoint there).
    pub endpoint: Option<EndpointEntry>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct EndpointEntry {
    pub chain_id: u64,
    pub opted_out: bool,
}

impl From<EndpointValue> for EndpointEntry {
    fn from(v: EndpointValue) -> Self {
        Self {
            chain_id: v.chain_id,
            opted_out: v.opted_out(),
        }
    }
}

/// The connect-time step for a Service address.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceHop {
    pub address: String,
    /// The connect programs' decision (`Translated` or why not).
    pub decision: String,
    pub reason: String,
    /// The backends a translated connection goes to (round robin).
    pub backends: Vec<String>,
}

/// The answer.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub from: End,
    pub to: End,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceHop>,
    /// The sockops policy's verdict (`SameChain`, `OtherChain`, …) for the
    /// connection as it is made (to the backend when translated).
    pub verdict: String,
    pub reason: String,
    pub redirected: bool,
    pub translated: bool,
}

/// Resolves `arg` (`namespace/pod`, `pod` in `default`, or an IP) against the
/// records; a pod's first address of `family` (IPv4 first when `None`).
fn resolve<'r>(
    arg: &str,
    records: &'r [Record],
    family_v6: Option<bool>,
) -> Result<(IpAddr, Option<&'r Record>), String> {
    if let Ok(ip) = arg.parse::<IpAddr>() {
        let rec = records.iter().find(|r| r.ips.contains(&ip));
        return Ok((ip, rec));
    }
    let (ns, name) = arg.split_once('/').unwrap_or(("default", arg));
    let rec = records
        .iter()
        .find(|r| r.pod.namespace == ns && r.pod.name == name)
        .ok_or_else(|| {
            format!(
                "no pod {ns}/{name} is recorded on this node (and {arg:?} is not an IP address)"
            )
        })?;
    let ip = rec
        .ips
        .iter()
        .copied()
        .find(|ip| family_v6.is_none_or(|v6| ip.is_ipv6() == v6))
        .or_else(|| rec.ips.first().copied())
        .ok_or_else(|| format!("pod {ns}/{name} has no address"))?;
    Ok((ip, Some(rec)))
}

fn end(arg: &str, ip: IpAddr, rec: Option<&Record>, dp: &Datapath) -> Result<End, String> {
    Ok(End {
        arg: arg.to_owned(),
        pod: rec.map(|r| format!("{}/{}", r.pod.namespace, r.pod.name)),
        ip,
        chain: rec.and_then(|r| r.chain.clone()),
        endpoint: dp.endpoint(ip).map_err(|e| e.to_string())?.map(Into::into),
    })
}

/// Explains a new TCP connection from `from` to `to` (port `port`, needed
/// for a Service address) on the node whose records are in `state_dir` and
/// whose maps are pinned in `bpffs`.
pub fn explain(
    state_dir: &Path,
    bpffs: &Path,
    from: &str,
    to: &str,
    port: Option<u16>,
) -> Result<Explanation, String> {
    let dp = Datapath::open(bpffs)
        .map_err(|e| format!("reading the datapath's maps in {}: {e}", bpffs.display()))?;
    let (records, _) = crate::sources::read_records(state_dir);
    let (to_ip, to_rec) = resolve(to, &records, None)?;
    let (from_ip, from_rec) = resolve(from, &records, Some(to_ip.is_ipv6()))?;
    let from_end = end(from, from_ip, from_rec, &dp)?;
    let to_end = end(to, to_ip, to_rec, &dp)?;

    // connect(): a Service address of the caller's chain goes to a backend.
    let mut service = None;
    let mut dest = to_ip;
    if let Some(port) = port {
        let caller = match from_rec.and_then(|r| r.netns_cookie) {
            Some(cookie) => dp.netns_entry(cookie).map_err(|e| e.to_string())?,
            None => None,
        };
        let decision = match spright_ebpf::translation_chain(caller) {
            Ok(chain_id) => dp
                .service(SvcKey {
                    addr: addr_of(to_ip),
                    port: u32::from(port),
                    proto: IPPROTO_TCP,
                    chain_id,
                })
                .map_err(|e| e.to_string())?
                .filter(|v| v.count > 0)
                .ok_or(Translate::NoLocalBackend),
            Err(why) => Err(why),
        };
        let (verdict, backends) = match decision {
            Ok(v) => {
                let n = usize::try_from(v.count).unwrap_or(0).min(v.backends.len());
                let backends: Vec<(IpAddr, u32)> = v.backends[..n]
                    .iter()
                    .map(|b| (ip_of(b.addr), b.port))
                    .filter(|(ip, _)| ip.is_ipv6() == to_ip.is_ipv6())
                    .collect();
                (Translate::Translated, backends)
            }
            Err(why) => (why, Vec::new()),
        };
        if let Some((ip, _)) = backends.first() {
            dest = *ip;
        }
        // Only a Service address (or a caller that could translate) is a
        // hop worth showing; a pod address with a port is just a pod.
        if verdict == Translate::Translated || to_rec.is_none() {
            service = Some(ServiceHop {
                address: std::net::SocketAddr::new(to_ip, port).to_string(),
                decision: format!("{verdict:?}"),
                reason: verdict.reason().to_owned(),
                backends: backends
                    .iter()
                    .map(|(ip, p)| {
                        std::net::SocketAddr::new(*ip, u16::try_from(*p).unwrap_or(0)).to_string()
                    })
                    .collect(),
            });
        }
    }
    let translated = service.as_ref().is_some_and(|s| !s.backends.is_empty());

    // sockops: the policy on the connection as made.
    let local = dp.endpoint(from_ip).map_err(|e| e.to_string())?;
    let remote = dp.endpoint(dest).map_err(|e| e.to_string())?;
    // The allow map's entry for the pair (read up front: the policy asks
    // for it only for two endpoints of different chains).
    let allowed = match (local, remote) {
        (Some(l), Some(r)) => dp
            .chain_allowed(ChainPair {
                from: l.chain_id,
                to: r.chain_id,
            })
            .map_err(|e| e.to_string())?,
        _ => false,
    };
    let mut verdict = spright_ebpf::verdict(local, remote, |_| allowed);
    // The node-wide switch sockops applies after the policy (an unsafe
    // syscall family on this kernel: meshd's self-test, families.rs).
    let flags = spright_ebpf::config_flags(bpffs).unwrap_or(0);
    if verdict.redirects() && flags & spright_ebpf::CONFIG_NO_REDIRECT != 0 {
        verdict = spright_ebpf::Verdict::NodeUnsafe;
    }
    Ok(Explanation {
        from: from_end,
        to: to_end,
        service,
        verdict: format!("{verdict:?}"),
        reason: verdict.reason().to_owned(),
        redirected: verdict.redirects(),
        translated,
    })
}

impl Explanation {
    /// The answer as `spright explain` prints it.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (label, e) in [("from", &self.from), ("to", &self.to)] {
            let _ = writeln!(
                s,
                "{label:<5} {} ({}{}){}",
                e.pod.as_deref().unwrap_or(&e.arg),
                e.ip,
                e.chain
                    .as_deref()
                    .map(|c| format!(", chain {c}"))
                    .unwrap_or_default(),
                match e.endpoint {
                    None => " — not in the endpoint map".to_owned(),
                    Some(v) if v.opted_out => " — endpoint, opted out".to_owned(),
                    Some(v) if v.chain_id == 0 => " — endpoint in no chain".to_owned(),
                    Some(v) => format!(" — endpoint, chain id {:#x}", v.chain_id),
                }
            );
        }
        if let Some(h) = &self.service {
            if h.backends.is_empty() {
                let _ = writeln!(s, "connect {}: not translated: {}", h.address, h.reason);
            } else {
                let _ = writeln!(
                    s,
                    "connect {}: translated to {} ({})",
                    h.address,
                    h.backends.join(", "),
                    h.reason
                );
            }
        }
        let _ = writeln!(
            s,
            "{}: {} ({})",
            if self.redirected {
                "REDIRECTED"
            } else {
                "NOT REDIRECTED, TCP path"
            },
            self.reason,
            self.verdict
        );
        s
    }
}
