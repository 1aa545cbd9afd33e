//! Flow events: which chain-pod connections were redirected, translated or
//! left on TCP, and why; with their bytes each way once they close.
//!
//! The kernel programs report each connection once (see
//! `spright_common::flow`) into the `spr_flows_v1` ring buffer; [`run`]
//! drains it into a [`Flows`] table. Two fates the kernel cannot report come
//! from meshd itself: the memory bound's switch to TCP (membound.rs calls
//! [`Flows::switched`]) and connections established before the programs
//! were attached, which sockops never saw ([`scan_before_attach`] finds
//! them with sock_diag). The table keeps every open flow (up to
//! `MAX_OPEN`) and the last `--flow-history` closed ones, and serves them
//! on `/v1/flows`; `spright flows` prints them.
//!
//! A flow that opened while no meshd was reading (a restart) is learnt at
//! its close, with its fate unknown.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::{Deserialize, Serialize};
use spright_ebpf::{FlowEvent, FlowReader, SockKey, Verdict, flow, ip_of};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{snapshot::Snapshot, sock_diag::SockDiag};

/// Open flows tracked at most (the sockhash's capacity).
const MAX_OPEN: usize = spright_ebpf::limits::MAX_SOCKETS as usize;

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub addr: SocketAddr,
    /// `namespace/name` of the recorded pod with this address, when there
    /// is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

impl End {
    /// The pod's name, or the address when it is not a recorded pod.
    pub fn label(&self) -> String {
        self.pod
            .clone()
            .unwrap_or_else(|| self.addr.ip().to_string())
    }
}

/// A move of one direction of a flow to TCP after it was redirected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switch {
    /// `PeerMissing` or `MemoryBound`.
    pub why: String,
    pub reason: String,
    /// The end whose sending moved: "client" or "server".
    pub sender: String,
}

/// Bytes of a closed flow, each way, on either path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bytes {
    pub client_to_server: u64,
    pub server_to_client: u64,
}

/// One connection and its fate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// Order of the last change (a closed flow has a later one than when
    /// it opened): `/v1/flows?since=` returns what changed after it.
    pub seq: u64,
    pub opened_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_unix_ms: Option<u64>,
    /// The end that connected.
    pub client: End,
    /// The end that accepted (after translation: the backend).
    pub server: End,
    /// The Service address the client dialled, when it was translated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<SocketAddr>,
    /// "redirected" (socket to socket), "tcp" or "unknown" (opened while no
    /// meshd read the events).
    pub path: String,
    /// The policy's verdict (`SameChain`, `OtherChain`, …),
    /// `EstablishedBeforeAttach` or `Unknown`.
    pub verdict: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched: Option<Switch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<Bytes>,
    /// "open" or "closed".
    pub state: String,
    /// Whether the reporting socket is the client's (its sent bytes are
    /// client to server).
    #[serde(skip)]
    reporter_is_client: bool,
}

impl Flow {
    fn involves(&self, pod: &str) -> bool {
        self.client.pod.as_deref() == Some(pod) || self.server.pod.as_deref() == Some(pod)
    }
}

/// Counts since meshd started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowCounts {
    pub opened: u64,
    pub closed: u64,
    pub switched: u64,
    pub before_attach: u64,
    /// Events the kernel dropped because the ring buffer was full.
    pub lost: u64,
    /// Open flows not tracked because `MAX_OPEN` were.
    pub untracked: u64,
}

/// What `/v1/flows` answers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FlowsReply {
    /// The latest `seq`: pass it as `since` to get only later changes.
    pub seq: u64,
    pub flows: Vec<Flow>,
    pub counts: FlowCounts,
    /// Closed flows kept.
    pub history: usize,
    /// Why there are no flow events, when there are none to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

/// Canonical key of a connection: its two ends in order.
type Conn = (SocketAddr, SocketAddr);

fn conn(a: SocketAddr, b: SocketAddr) -> Conn {
    if a <= b { (a, b) } else { (b, a) }
}

fn ends(k: &SockKey) -> (SocketAddr, SocketAddr) {
    let port = |p: u32| u16::try_from(p).unwrap_or(0);
    (
        SocketAddr::new(ip_of(k.local), port(k.local_port)),
        SocketAddr::new(ip_of(k.remote), port(k.remote_port)),
    )
}

#[derive(Debug, Default)]
struct Table {
    seq: u64,
    open: HashMap<Conn, Flow>,
    closed: VecDeque<Flow>,
    /// Connections reported as established before attach, still alive.
    before_attach: HashSet<Conn>,
    counts: FlowCounts,
    unavailable: Option<String>,
}

/// The flow table, shared by the event reader, the memory bound, the
/// before-attach scan and the API.
#[derive(Debug)]
pub struct Flows {
    table: Mutex<Table>,
    history: usize,
    lost: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn switch_reason(code: u32) -> (&'static str, &'static str) {
    match code {
        flow::SWITCH_PEER_MISSING => (
            "PeerMissing",
            "the peer socket was not in the sockhash when this end sent (the peer had closed, was established before the programs were attached, or the sockhash was full); this direction stays on TCP",
        ),
        flow::SWITCH_MEMORY_BOUND => (
            "MemoryBound",
            "the receiver held more than the memory bound (--memory-bound-bytes) without reading; the sender moved to TCP",
        ),
        _ => ("Unknown", "an unknown switch reason (a newer datapath?)"),
    }
}

impl Flows {
    /// A table keeping the last `history` closed flows.
    pub fn new(history: usize) -> Self {
        Self {
            table: Mutex::default(),
            history,
            lost: AtomicU64::new(0),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one kernel event; `pod` names the recorded pod of an address.
    pub fn apply(&self, e: &FlowEvent, pod: &dyn Fn(IpAddr) -> Option<String>) {
        let (local, remote) = ends(&e.key);
        let key = conn(local, remote);
        let mut t = self.table();
        t.seq += 1;
        let seq = t.seq;
        let end = |addr: SocketAddr| End {
            addr,
            pod: pod(addr.ip()),
        };
        match e.kind {
            flow::OPEN => {
                let active = e.flags & flow::ACTIVE != 0;
                let (client, server) = if active {
                    (local, remote)
                } else {
                    (remote, local)
                };
                let verdict = Verdict::from_code(e.reason);
                let service = (e.flags & flow::TRANSLATED != 0).then(|| {
                    SocketAddr::new(ip_of(e.service), u16::try_from(e.service_port).unwrap_or(0))
                });
                let f = Flow {
                    seq,
                    opened_unix_ms: Some(now_ms()),
                    closed_unix_ms: None,
                    client: end(client),
                    server: end(server),
                    service,
                    path: if e.flags & flow::REDIRECTED != 0 {
                        "redirected"
                    } else {
                        "tcp"
                    }
                    .into(),
                    verdict: verdict.map_or_else(|| "Unknown".into(), |v| format!("{v:?}")),
                    reason: verdict
                        .map_or("an unknown verdict (a newer datapath?)", Verdict::reason)
                        .into(),
                    switched: None,
                    bytes: None,
                    state: "open".into(),
                    reporter_is_client: active,
                };
                t.counts.opened += 1;
                if t.open.len() >= MAX_OPEN && !t.open.contains_key(&key) {
                    t.counts.untracked += 1;
                    return;
                }
                // A 4-tuple reused without a close we saw: the old one ended.
                if let Some(old) = t.open.insert(key, f) {
                    self.retire(&mut t, old, None);
                }
            }
            flow::CLOSE => {
                t.counts.closed += 1;
                let f = t.open.remove(&key).unwrap_or_else(|| Flow {
                    seq,
                    opened_unix_ms: None,
                    closed_unix_ms: None,
                    client: end(local),
                    server: end(remote),
                    service: None,
                    path: "unknown".into(),
                    verdict: "Unknown".into(),
                    reason: "opened while no meshd was reading flow events".into(),
                    switched: None,
                    bytes: None,
                    state: "open".into(),
                    reporter_is_client: true,
                });
                let (client_to_server, server_to_client) = if f.reporter_is_client {
                    (e.bytes_sent, e.bytes_received)
                } else {
                    (e.bytes_received, e.bytes_sent)
                };
                self.retire(
                    &mut t,
                    f,
                    Some(Bytes {
                        client_to_server,
                        server_to_client,
                    }),
                );
            }
            flow::TCP_SWITCH => {
                t.counts.switched += 1;
                let (why, reason) = switch_reason(e.reason);
                if let Some(f) = t.open.get_mut(&key) {
                    f.seq = seq;
                    f.switched = Some(Switch {
                        why: why.into(),
                        reason: reason.into(),
                        sender: if f.client.addr == local {
                            "client"
                        } else {
                            "server"
                        }
                        .into(),
                    });
                }
            }
            other => debug!(kind = other, "flow event of an unknown kind"),
        }
    }

    fn retire(&self, t: &mut Table, mut f: Flow, bytes: Option<Bytes>) {
        t.seq += 1;
        f.seq = t.seq;
        f.state = "closed".into();
        f.closed_unix_ms = Some(now_ms());
        f.bytes = bytes;
        if t.closed.len() >= self.history {
            t.closed.pop_front();
        }
        if self.history > 0 {
            t.closed.push_back(f);
        }
    }

    /// The memory bound moved the sending socket `sender` to TCP.
    pub fn switched(&self, sender: SockKey, pod: &dyn Fn(IpAddr) -> Option<String>) {
        let e = FlowEvent {
            kind: flow::TCP_SWITCH,
            reason: flow::SWITCH_MEMORY_BOUND,
            key: sender,
            ..FlowEvent::default()
        };
        self.apply(&e, pod);
    }

    /// The result of one before-attach scan: the connections (client,
    /// server) now alive that the programs never saw. New ones become open
    /// flows; ones that are gone close (with their bytes unknown).
    pub fn before_attach(
        &self,
        alive: &[(SocketAddr, SocketAddr)],
        pod: &dyn Fn(IpAddr) -> Option<String>,
    ) {
        let mut t = self.table();
        let now: HashSet<Conn> = alive.iter().map(|(c, s)| conn(*c, *s)).collect();
        let gone: Vec<Conn> = t.before_attach.difference(&now).copied().collect();
        for k in gone {
            t.before_attach.remove(&k);
            if let Some(f) = t.open.remove(&k) {
                self.retire(&mut t, f, None);
            }
        }
        for (client, server) in alive {
            let k = conn(*client, *server);
            if t.open.contains_key(&k) || !t.before_attach.insert(k) {
                continue;
            }
            t.seq += 1;
            t.counts.before_attach += 1;
            let f = Flow {
                seq: t.seq,
                opened_unix_ms: None,
                closed_unix_ms: None,
                client: End {
                    addr: *client,
                    pod: pod(client.ip()),
                },
                server: End {
                    addr: *server,
                    pod: pod(server.ip()),
                },
                service: None,
                path: "tcp".into(),
                verdict: "EstablishedBeforeAttach".into(),
                reason: "established before the programs were attached, so sockops never saw it: it stays on TCP until the client reconnects".into(),
                switched: None,
                bytes: None,
                state: "open".into(),
                reporter_is_client: true,
            };
            t.open.insert(k, f);
        }
    }

    /// Flows changed after `since`, involving `pod` when given, oldest
    /// change first.
    pub fn query(&self, pod: Option<&str>, since: u64) -> FlowsReply {
        let t = self.table();
        let mut flows: Vec<Flow> = t
            .closed
            .iter()
            .chain(t.open.values())
            .filter(|f| f.seq > since && pod.is_none_or(|p| f.involves(p)))
            .cloned()
            .collect();
        flows.sort_by_key(|f| f.seq);
        let mut counts = t.counts;
        counts.lost = self.lost.load(Ordering::Relaxed);
        FlowsReply {
            seq: t.seq,
            flows,
            counts,
            history: self.history,
            unavailable: t.unavailable.clone(),
        }
    }

    /// Counts, for the metrics.
    pub fn counts(&self) -> FlowCounts {
        let mut c = self.table().counts;
        c.lost = self.lost.load(Ordering::Relaxed);
        c
    }

    fn set_unavailable(&self, why: Option<String>) {
        self.table().unavailable = why;
    }
}

/// A table of flows: one line each, with a header line when `header`.
pub fn render(flows: &[Flow], header: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if header {
        let _ = writeln!(
            out,
            "{:<7} {:<10} {:<32} {:<32} {:<23} {:>10} {:>10}  WHY",
            "STATE", "PATH", "FROM", "TO", "VERDICT", "SENT", "RECEIVED"
        );
    }
    for f in flows {
        let from = format!("{} :{}", f.client.label(), f.client.addr.port());
        let to = match f.service {
            Some(svc) => format!("{svc} -> {}", f.server.label()),
            None => format!("{} :{}", f.server.label(), f.server.addr.port()),
        };
        let (sent, received) = f.bytes.map_or_else(
            || ("-".to_owned(), "-".to_owned()),
            |b| {
                (
                    b.client_to_server.to_string(),
                    b.server_to_client.to_string(),
                )
            },
        );
        let mut why = f.reason.clone();
        if let Some(s) = &f.switched {
            let _ = write!(why, "; then the {} moved to TCP: {}", s.sender, s.reason);
        }
        let path = if f.service.is_some() {
            format!("{}+xlate", f.path)
        } else {
            f.path.clone()
        };
        let _ = writeln!(
            out,
            "{:<7} {:<10} {:<32} {:<32} {:<23} {:>10} {:>10}  {}",
            f.state, path, from, to, f.verdict, sent, received, why
        );
    }
    out
}

/// Names of the recorded pods by address, from the latest snapshot.
fn pod_names(snapshot: &Snapshot) -> HashMap<IpAddr, String> {
    snapshot
        .records
        .iter()
        .flat_map(|r| {
            r.ips
                .iter()
                .map(move |ip| (*ip, format!("{}/{}", r.pod.namespace, r.pod.name)))
        })
        .collect()
}

/// A lookup of pod names over the latest snapshot.
pub fn namer(
    snapshot: &watch::Receiver<Arc<Snapshot>>,
) -> impl Fn(IpAddr) -> Option<String> + use<> {
    let names = pod_names(&snapshot.borrow());
    move |ip| names.get(&ip).cloned()
}

/// The pin's identity, to notice a reinstall (which pins a new ring).
fn pin_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Drains the flow ring buffer into `flows` for as long as meshd runs, on
/// its own thread, (re)opening it whenever acceleration is on and its pin
/// is new.
pub fn run(
    flows: Arc<Flows>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    bpffs: PathBuf,
    on: bool,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("flows".into())
        .spawn(move || {
            loop {
                if on {
                    read(&flows, &snapshot, &bpffs);
                } else {
                    // Kept off, also across a reinstall.
                    let enabled = snapshot.borrow().acceleration.enabled;
                    if let Err(e) = enabled
                        .then(|| spright_ebpf::set_flow_events(&bpffs, false))
                        .transpose()
                    {
                        debug!(error = %crate::error::chain(&e), "turning flow events off");
                    }
                    flows.set_unavailable(Some("flow events are off (--flow-events=false)".into()));
                    std::thread::sleep(Duration::from_secs(5));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
}

/// One life of the ring buffer: until it is re-pinned or cannot be read.
fn read(flows: &Flows, snapshot: &watch::Receiver<Arc<Snapshot>>, bpffs: &Path) {
    if !snapshot.borrow().acceleration.enabled {
        flows.set_unavailable(Some("acceleration is off".into()));
        return;
    }
    let pin = bpffs.join(spright_ebpf::names::FLOWS);
    if let Err(e) = spright_ebpf::set_flow_events(bpffs, true) {
        flows.set_unavailable(Some(format!(
            "flow events cannot be turned on: {}",
            crate::error::chain(&e)
        )));
        return;
    }
    let mut reader = match FlowReader::open(bpffs) {
        Ok(r) => r,
        Err(e) => {
            flows.set_unavailable(Some(format!(
                "the flow ring buffer cannot be opened: {}",
                crate::error::chain(&e)
            )));
            return;
        }
    };
    let id = pin_id(&pin);
    flows.set_unavailable(None);
    info!(pin = %pin.display(), "reading flow events");
    loop {
        let mut fds = [PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(2000u16)) {
            Ok(0) => {
                // Quiet: check the pin is still the ring we read.
                if pin_id(&pin) != id {
                    info!("flow ring buffer re-pinned (reinstall); reopening");
                    return;
                }
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                warn!(error = %e, "flow events: polling failed; reopening");
                return;
            }
        }
        // Pod names are looked up only when events came (a quiet poll
        // timeout reads none).
        if let Some(first) = reader.next_event() {
            let name = namer(snapshot);
            flows.apply(&first, &name);
            while let Some(e) = reader.next_event() {
                flows.apply(&e, &name);
            }
        }
        if let Ok(lost) = reader.lost() {
            flows.lost.store(lost, Ordering::Relaxed);
        }
    }
}

/// Every `every`, finds the live connections between pods whose policy
/// redirects but which never passed sockops (neither in the sockhash nor
/// marked TCP-only): established before the programs were attached. Runs
/// on its own thread (sock_diag enters each pod's network namespace).
pub fn scan_before_attach(
    flows: Arc<Flows>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    bpffs: PathBuf,
    every: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("flows-scan".into())
        .spawn(move || {
            loop {
                if snapshot.borrow().acceleration.enabled {
                    match scan_once(&snapshot, &bpffs) {
                        Ok(alive) => flows.before_attach(&alive, &namer(&snapshot)),
                        Err(e) => debug!(error = %e, "before-attach scan"),
                    }
                }
                std::thread::sleep(every);
            }
        })
}

fn scan_once(
    snapshot: &watch::Receiver<Arc<Snapshot>>,
    bpffs: &Path,
) -> Result<Vec<(SocketAddr, SocketAddr)>, String> {
    let members = snapshot.borrow().redirecting_members();
    let err = |e: spright_ebpf::Error| crate::error::chain(&e);
    let switch = spright_ebpf::PathSwitch::open(bpffs).map_err(err)?;
    let dp = spright_ebpf::Datapath::open(bpffs).map_err(err)?;
    let accelerated = switch.accelerated().map_err(err)?;
    let mut namespaces: Vec<&String> = members.iter().map(|(_, ns)| ns).collect();
    namespaces.sort();
    namespaces.dedup();
    let mut alive = Vec::new();
    for netns in namespaces {
        let Ok(diag) = SockDiag::in_netns(Path::new(netns)) else {
            continue; // gone since the snapshot
        };
        for s in diag
            .dump()
            .map_err(|e| format!("sock_diag in {netns}: {e}"))?
        {
            let key = s.key();
            if accelerated.contains(&key) || switch.is_tcp_only(&key).unwrap_or(true) {
                continue;
            }
            let (Ok(Some(l)), Ok(Some(r))) = (dp.endpoint(s.local), dp.endpoint(s.remote)) else {
                continue;
            };
            let allowed = |pair| dp.chain_allowed(pair).unwrap_or(false);
            if !spright_ebpf::verdict(Some(l), Some(r), allowed).redirects() {
                continue;
            }
            // Each connection shows from both pods; keep the client's side:
            // the end on an ephemeral port (the other is a listener's).
            let (local, remote) = (
                SocketAddr::new(s.local, s.local_port),
                SocketAddr::new(s.remote, s.remote_port),
            );
            if is_client_side(s.local_port, s.remote_port) {
                alive.push((local, remote));
            }
        }
    }
    Ok(alive)
}

/// Whether the socket with `local` and `remote` ports is the connecting
/// end: sock_diag does not say, so the end on the higher port is taken as
/// the client (ephemeral ports are allocated from the top of the port
/// space; servers listen low). Ties cannot happen between two ends of one
/// connection on distinct addresses with distinct ports.
fn is_client_side(local: u16, remote: u16) -> bool {
    local > remote
}

#[cfg(test)]
mod tests {
    use spright_ebpf::addr_of;

    use super::*;

    fn key(a: &str, b: &str) -> SockKey {
        let (a, b): (SocketAddr, SocketAddr) = (a.parse().unwrap(), b.parse().unwrap());
        SockKey {
            local: addr_of(a.ip()),
            remote: addr_of(b.ip()),
            local_port: u32::from(a.port()),
            remote_port: u32::from(b.port()),
        }
    }

    fn names(ip: IpAddr) -> Option<String> {
        match ip.to_string().as_str() {
            "10.0.0.1" => Some("default/a".into()),
            "10.0.0.2" => Some("default/b".into()),
            _ => None,
        }
    }

    #[test]
    fn a_redirected_flow_opens_switches_and_closes_with_its_bytes() {
        let flows = Flows::new(2);
        let k = key("10.0.0.1:40000", "10.0.0.2:8080");
        flows.apply(
            &FlowEvent {
                kind: flow::OPEN,
                flags: flow::ACTIVE | flow::REDIRECTED,
                reason: Verdict::SameChain as u32,
                key: k,
                ..FlowEvent::default()
            },
            &names,
        );
        let open = flows.query(None, 0);
        assert_eq!(open.flows.len(), 1);
        let f = &open.flows[0];
        assert_eq!(
            (
                f.client.label(),
                f.server.label(),
                f.path.as_str(),
                f.state.as_str()
            ),
            ("default/a".into(), "default/b".into(), "redirected", "open")
        );
        assert_eq!(f.verdict, "SameChain");
        // The server's socket moves to TCP: seen from its own side.
        flows.apply(
            &FlowEvent {
                kind: flow::TCP_SWITCH,
                reason: flow::SWITCH_PEER_MISSING,
                key: k.reversed(),
                ..FlowEvent::default()
            },
            &names,
        );
        let s = flows.query(None, open.seq);
        assert_eq!(s.flows[0].switched.as_ref().unwrap().sender, "server");
        flows.apply(
            &FlowEvent {
                kind: flow::CLOSE,
                key: k,
                bytes_sent: 100,
                bytes_received: 5000,
                ..FlowEvent::default()
            },
            &names,
        );
        let closed = flows.query(Some("default/b"), s.seq);
        assert_eq!(closed.flows.len(), 1);
        assert_eq!(
            closed.flows[0].bytes,
            Some(Bytes {
                client_to_server: 100,
                server_to_client: 5000
            })
        );
        assert_eq!(closed.flows[0].state, "closed");
        assert!(flows.query(Some("default/c"), 0).flows.is_empty());
        assert_eq!(
            (
                closed.counts.opened,
                closed.counts.closed,
                closed.counts.switched
            ),
            (1, 1, 1)
        );
    }

    #[test]
    fn a_passive_reporter_names_the_remote_end_the_client_and_history_is_bounded() {
        let flows = Flows::new(2);
        for port in 0..3u16 {
            let k = key("10.0.0.2:8080", &format!("192.0.2.7:{}", 50000 + port));
            let e = FlowEvent {
                kind: flow::OPEN,
                flags: 0,
                reason: Verdict::RemoteNotEndpoint as u32,
                key: k,
                ..FlowEvent::default()
            };
            flows.apply(&e, &names);
            flows.apply(
                &FlowEvent {
                    kind: flow::CLOSE,
                    key: k,
                    bytes_sent: 7,
                    bytes_received: 3,
                    ..FlowEvent::default()
                },
                &names,
            );
        }
        let r = flows.query(None, 0);
        assert_eq!(r.flows.len(), 2, "only the last two closed flows are kept");
        let f = &r.flows[1];
        assert_eq!(f.client.label(), "192.0.2.7");
        assert_eq!(f.server.pod.as_deref(), Some("default/b"));
        assert_eq!(
            f.bytes,
            Some(Bytes {
                client_to_server: 3,
                server_to_client: 7
            })
        );
        assert_eq!(f.path, "tcp");
    }

    #[test]
    fn before_attach_flows_open_once_and_close_when_gone() {
        let flows = Flows::new(8);
        let c: SocketAddr = "10.0.0.1:45000".parse().unwrap();
        let s: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        flows.before_attach(&[(c, s)], &names);
        flows.before_attach(&[(c, s)], &names);
        let r = flows.query(None, 0);
        assert_eq!(r.flows.len(), 1);
        assert_eq!(r.flows[0].verdict, "EstablishedBeforeAttach");
        assert_eq!(r.counts.before_attach, 1);
        flows.before_attach(&[], &names);
        let r = flows.query(None, 0);
        assert_eq!(r.flows[0].state, "closed");
        assert!(is_client_side(45000, 8080) && !is_client_side(8080, 45000));
    }

    #[test]
    fn a_close_without_its_open_is_kept_with_an_unknown_fate() {
        let flows = Flows::new(8);
        flows.apply(
            &FlowEvent {
                kind: flow::CLOSE,
                key: key("10.0.0.1:40000", "10.0.0.2:8080"),
                bytes_sent: 1,
                ..FlowEvent::default()
            },
            &names,
        );
        let f = &flows.query(None, 0).flows[0];
        assert_eq!(
            (f.path.as_str(), f.verdict.as_str()),
            ("unknown", "Unknown")
        );
    }
}
