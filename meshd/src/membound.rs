//! The memory bound of the redirect path (docs/RELIABILITY.md, limit 2).
//!
//! A message redirected into a socket is queued on the receiver's psock and
//! charged to its `sk_rmem_alloc`, but `SO_RCVBUF` is never checked, so a pod
//! that never reads lets its peer queue memory without limit. sk_msg cannot
//! refuse a message (`SK_DROP` fails the sender's `sendmsg`) and never sees
//! the receiver's reads, so the bound lives here:
//!
//! every `--memory-bound-interval-ms` (once enough bytes were redirected
//! since the last check for a receiver to have reached the limit: `Gate`),
//! meshd asks the receiving pod's network namespace (sock_diag,
//! `INET_DIAG_SKMEMINFO`, what `ss -m` shows as `skmem r`) for the receive
//! memory of every redirected socket. When a socket holds
//! more than `--memory-bound-bytes` and its peer is in the sockhash, the
//! *peer's* key goes into `spr_tcponly_v1`: from its next message on, the
//! sender takes the TCP path and TCP's receive-window backpressure applies
//! (the receiver's queued memory is already above its `SO_RCVBUF`, so its
//! window is closed at once). Only that direction switches, and only from
//! redirect to TCP, which keeps order: `tcp_bpf_recvmsg` reads the psock
//! queue before the TCP receive queue. The switch is one-way for the life of
//! the connection. The bound is therefore `limit + send rate × interval`.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nix::sys::{
    socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, setsockopt, socket,
        sockopt,
    },
    time::TimeVal,
};
use serde::Serialize;
use spright_ebpf::{PathSwitch, SockKey, addr_of};
use tracing::{info, warn};

use crate::{config::Config, snapshot::Snapshot};

/// Counters of the bound, shared by the poller and the status view.
#[derive(Debug, Default)]
pub struct Stats {
    switches: AtomicU64,
    polls: AtomicU64,
    skipped: AtomicU64,
    largest_queue: AtomicU64,
    last_switch_queue: AtomicU64,
    error: Mutex<Option<String>>,
}

/// The bound as shown in `/status` and `spright status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Report {
    /// 0 when the bound is off.
    pub limit_bytes: u64,
    pub interval_ms: u64,
    /// Connection directions moved from the redirect path to TCP.
    pub switches: u64,
    /// Polls that dumped the chain pods' sockets.
    pub polls: u64,
    /// Polls skipped because too few bytes were redirected since the last
    /// dump for any receiver to have reached the limit.
    #[serde(default)]
    pub skipped_polls: u64,
    /// Largest receive memory of a chain pod's socket at the last poll.
    pub largest_queue_bytes: u64,
    /// The receiver's memory when the last switch was made: the limit plus
    /// the overshoot that one polling delay allowed.
    pub last_switch_queue_bytes: u64,
    /// Why the last poll failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Report {
    /// One line for `spright status`.
    pub fn summary(&self) -> String {
        if self.limit_bytes == 0 {
            return "memory bound: off".into();
        }
        format!(
            "memory bound: {} KiB per connection, checked every {} ms; {} sender(s) moved to TCP; largest queue {} KiB{}",
            self.limit_bytes >> 10,
            self.interval_ms,
            self.switches,
            self.largest_queue_bytes >> 10,
            self.error
                .as_ref()
                .map(|e| format!("; last poll failed: {e}"))
                .unwrap_or_default()
        )
    }
}

impl Stats {
    pub fn report(&self, limit_bytes: u64, interval_ms: u64) -> Report {
        Report {
            limit_bytes,
            interval_ms,
            switches: self.switches.load(Ordering::Relaxed),
            polls: self.polls.load(Ordering::Relaxed),
            skipped_polls: self.skipped.load(Ordering::Relaxed),
            largest_queue_bytes: self.largest_queue.load(Ordering::Relaxed),
            last_switch_queue_bytes: self.last_switch_queue.load(Ordering::Relaxed),
            error: self.error.lock().expect("stats lock").clone(),
        }
    }

    fn set_error(&self, e: Option<String>) {
        let mut slot = self.error.lock().expect("stats lock");
        if e.is_some() && *slot != e {
            warn!(
                error = e.as_deref().unwrap_or_default(),
                "memory bound: poll failed"
            );
        }
        *slot = e;
    }
}

/// Starts the poller on its own thread (it enters pods' network namespaces,
/// which is per thread); it reads the chain pods from the latest snapshot
/// and counts into `stats`. Returns `None` when the bound is off.
pub fn spawn(
    config: &Config,
    snapshot: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    stats: Arc<Stats>,
) -> Option<std::thread::JoinHandle<()>> {
    let (limit, interval, bpffs) = (
        config.memory_bound_bytes,
        Duration::from_millis(config.memory_bound_interval_ms),
        config.bpffs.clone(),
    );
    if limit == 0 {
        info!("memory bound off");
        return None;
    }
    info!(
        limit_bytes = limit,
        interval_ms = interval.as_millis(),
        "memory bound on"
    );
    let spawned = std::thread::Builder::new()
        .name("membound".into())
        .spawn(move || {
            let mut poller = Poller {
                limit,
                bpffs,
                stats,
                switch: None,
                sockets: HashMap::new(),
                gate: Gate::default(),
            };
            loop {
                let members = snapshot.borrow().redirecting_members();
                let ips: Vec<IpAddr> = members.iter().map(|(ip, _)| *ip).collect();
                let redirected = poller.gate.redirected_total(&poller.bpffs, &ips);
                if poller.gate.may_skip(redirected, limit) {
                    poller.stats.skipped.fetch_add(1, Ordering::Relaxed);
                } else {
                    let r = poller.poll(&members);
                    poller.gate.dumped(
                        redirected,
                        poller.stats.largest_queue.load(Ordering::Relaxed),
                    );
                    poller.stats.set_error(r.err());
                    poller.stats.polls.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(interval);
            }
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            warn!(error = %e, "memory bound: cannot start its thread");
            None
        }
    }
}

/// Skips polls that cannot find a receiver over the limit. A sock_diag dump
/// walks the kernel's whole established-socket hash table (262,144 buckets
/// here, shared by every namespace), once per pod and family: polling every
/// 20 ms cost a 4-function chain 10 % of its requests/s and doubled its p99.
/// Receive queues only grow by redirected bytes, so no receiver can exceed
/// the limit before the node has redirected `limit - largest queue seen at
/// the last dump` bytes since that dump (a redirected message is charged to
/// the receiver byte for byte: 147.3 MiB of `skmem r` for 147.4 MiB queued,
/// measured), and the gate dumps again only then.
#[derive(Debug, Default)]
struct Gate {
    /// Bytes redirected by chain pods (summed counters) before the last dump.
    at_dump: Option<u64>,
    /// The largest receive queue the last dump found.
    largest: u64,
    dp: Option<spright_ebpf::Datapath>,
}

impl Gate {
    /// Bytes redirected so far by `ips`; `None` when the maps cannot be
    /// read, which never lets a poll be skipped (see `may_skip`).
    fn redirected_total(&mut self, bpffs: &Path, ips: &[IpAddr]) -> Option<u64> {
        if self.dp.is_none() {
            self.dp = spright_ebpf::Datapath::open(bpffs).ok();
        }
        let dp = self.dp.as_ref()?;
        ips.iter()
            .map(|ip| dp.counters(*ip).ok().map(|c| c.redirected_bytes))
            .sum()
    }

    fn may_skip(&self, redirected: Option<u64>, limit: u64) -> bool {
        let (Some(now), Some(then)) = (redirected, self.at_dump) else {
            return false;
        };
        // Counters of a removed endpoint vanish (the sum can drop): dump.
        let Some(grown) = now.checked_sub(then) else {
            return false;
        };
        grown < limit.saturating_sub(self.largest)
    }

    fn dumped(&mut self, redirected: Option<u64>, largest: u64) {
        self.at_dump = redirected;
        self.largest = largest;
    }
}

/// Identity of a network namespace file: a path reused by a new pod must not
/// reach the old pod's namespace through a cached socket.
type NsId = (String, u64, u64);

struct Poller {
    limit: u64,
    bpffs: std::path::PathBuf,
    stats: Arc<Stats>,
    switch: Option<PathSwitch>,
    /// One sock_diag socket per pod network namespace.
    sockets: HashMap<NsId, OwnedFd>,
    gate: Gate,
}

impl Poller {
    /// One check of every chain pod's receive queues. With few redirected
    /// sockets each is looked up by its 4-tuple (constant time in the
    /// kernel); with many, each pod's sockets are dumped (a walk of the
    /// whole established hash per pod and family).
    fn poll(&mut self, members: &[(IpAddr, String)]) -> Result<(), String> {
        let keys = self
            .switch()?
            .accelerated()
            .map_err(|e| crate::error::chain(&e))?;
        let mut namespaces: Vec<&String> = members.iter().map(|(_, ns)| ns).collect();
        namespaces.sort();
        namespaces.dedup();
        let mut live = HashSet::new();
        let mut ids: HashMap<&String, NsId> = HashMap::new();
        for path in namespaces {
            // A pod that is gone: reconciliation drops its record.
            if let Ok(meta) = std::fs::metadata(path) {
                let id = (path.clone(), meta.dev(), meta.ino());
                live.insert(id.clone());
                ids.insert(path, id);
            }
        }
        self.sockets.retain(|id, _| live.contains(id));
        let mut found: Vec<(&String, DiagSocket)> = Vec::new();
        let mut first_error = None;
        if keys.len() <= LOOKUPS_MAX {
            let netns_of: HashMap<IpAddr, &String> =
                members.iter().map(|(ip, ns)| (*ip, ns)).collect();
            for (i, key) in keys.iter().enumerate() {
                let Some(path) = netns_of.get(&spright_ebpf::ip_of(key.local)) else {
                    continue;
                };
                let Some(id) = ids.get(path) else { continue };
                let seq = u32::try_from(i).unwrap_or(u32::MAX);
                match self.socket_in(id).and_then(|fd| lookup(fd, seq, key)) {
                    Ok(Some(s)) => found.push((path, s)),
                    Ok(None) => {} // closed since the key walk
                    Err(e) => {
                        self.sockets.remove(id);
                        first_error.get_or_insert(format!("sock_diag in {path}: {e}"));
                    }
                }
            }
        } else {
            for (path, id) in &ids {
                match self.socket_in(id).and_then(dump) {
                    Ok(sockets) => found.extend(sockets.into_iter().map(|s| (*path, s))),
                    Err(e) => {
                        self.sockets.remove(id);
                        first_error.get_or_insert(format!("sock_diag in {path}: {e}"));
                    }
                }
            }
        }
        let largest = found.iter().map(|(_, s)| s.rmem_alloc).max().unwrap_or(0);
        self.stats
            .largest_queue
            .store(u64::from(largest), Ordering::Relaxed);
        found.retain(|(_, s)| u64::from(s.rmem_alloc) > self.limit);
        if !found.is_empty() {
            self.switch_senders(&found, &keys)?;
        }
        first_error.map_or(Ok(()), Err)
    }

    fn switch(&mut self) -> Result<&mut PathSwitch, String> {
        if self.switch.is_none() {
            self.switch = Some(PathSwitch::open(&self.bpffs).map_err(|e| crate::error::chain(&e))?);
        }
        Ok(self.switch.as_mut().expect("opened above"))
    }

    fn socket_in(&mut self, id: &NsId) -> io::Result<&OwnedFd> {
        if !self.sockets.contains_key(id) {
            let fd = diag_socket_in(Path::new(&id.0))?;
            self.sockets.insert(id.clone(), fd);
        }
        Ok(&self.sockets[id])
    }

    /// Moves the sender of each over-limit receiver to TCP, when that sender
    /// is redirected (in the sockhash) and not already on TCP.
    fn switch_senders(
        &mut self,
        candidates: &[(&String, DiagSocket)],
        accelerated: &HashSet<SockKey>,
    ) -> Result<(), String> {
        let stats = self.stats.clone();
        let switch = self.switch()?;
        for (netns, s) in candidates {
            let sender = s.key().reversed();
            if !accelerated.contains(&sender)
                || switch
                    .is_tcp_only(&sender)
                    .map_err(|e| crate::error::chain(&e))?
            {
                continue;
            }
            switch
                .force_tcp(&sender)
                .map_err(|e| crate::error::chain(&e))?;
            stats.switches.fetch_add(1, Ordering::Relaxed);
            stats
                .last_switch_queue
                .store(u64::from(s.rmem_alloc), Ordering::Relaxed);
            info!(netns = %netns, receiver.addr = %format!("{}:{}", s.local, s.local_port),
                  sender.addr = %format!("{}:{}", s.remote, s.remote_port),
                  receiver.queued_bytes = s.rmem_alloc, receiver.rcvbuf = s.rcvbuf,
                  "memory bound: receiver not reading; its sender now takes the TCP path");
        }
        Ok(())
    }
}

/// A NETLINK_SOCK_DIAG socket created inside `netns` (a netlink socket stays
/// in the namespace it was created in).
fn diag_socket_in(netns: &Path) -> io::Result<OwnedFd> {
    spright_endpoint::netns::run_in(netns, || {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(1, 0))?;
        Ok(fd)
    })
}

/// One TCP socket of a pod as sock_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DiagSocket {
    local: IpAddr,
    local_port: u16,
    remote: IpAddr,
    remote_port: u16,
    /// `SK_MEMINFO_RMEM_ALLOC` (`ss -m` `r`): includes the redirect queue.
    rmem_alloc: u32,
    /// `SK_MEMINFO_RCVBUF` (`ss -m` `rb`).
    rcvbuf: u32,
}

impl DiagSocket {
    /// The socket's own sockhash key.
    fn key(&self) -> SockKey {
        SockKey {
            local: addr_of(self.local),
            remote: addr_of(self.remote),
            local_port: u32::from(self.local_port),
            remote_port: u32::from(self.remote_port),
        }
    }
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
const INET_DIAG_REQ_V2_LEN: usize = 56;
const INET_DIAG_MSG_LEN: usize = 72;
const INET_DIAG_SKMEMINFO: u16 = 7;
const IPPROTO_TCP: u8 = 6;
/// Sockets that can still receive: ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT.
const STATES: u32 = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 8);

/// Above this many redirected sockets a poll dumps each pod's sockets
/// instead of looking each one up.
const LOOKUPS_MAX: usize = 1024;

/// One socket of the diag socket's namespace, by its sockhash key (`None`
/// when it no longer exists). Asked as AF_INET6: the kernel looks an
/// IPv4-mapped 4-tuple up among IPv4 sockets, so this finds IPv4 sockets,
/// IPv6 ones and dual-stack ones alike.
fn lookup(fd: &OwnedFd, seq: u32, key: &SockKey) -> io::Result<Option<DiagSocket>> {
    send(fd.as_raw_fd(), &request_one(seq, key), MsgFlags::empty())?;
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::new();
    // One reply: the socket, or an error. Stale replies (other seq) skipped.
    for _ in 0..16 {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        match parse(&buf[..n], seq, &mut out) {
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
            Ok(_) if !out.is_empty() => return Ok(out.pop()),
            Ok(_) => {}
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "sock_diag: no reply",
    ))
}

/// Dumps the TCP sockets (IPv4 and IPv6) of the socket's namespace.
fn dump(fd: &OwnedFd) -> io::Result<Vec<DiagSocket>> {
    let mut out = Vec::new();
    for (seq, family) in [(1u32, libc_family::AF_INET), (2, libc_family::AF_INET6)] {
        send(fd.as_raw_fd(), &request(seq, family), MsgFlags::empty())?;
        let mut buf = vec![0u8; 64 * 1024];
        // Bounded: a dump of n sockets arrives in about n / 100 datagrams.
        for _ in 0..100_000 {
            let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            if parse(&buf[..n], seq, &mut out)? {
                break;
            }
        }
    }
    Ok(out)
}

mod libc_family {
    pub(super) const AF_INET: u8 = 2;
    pub(super) const AF_INET6: u8 = 10;
}

fn request(seq: u32, family: u8) -> Vec<u8> {
    let len = NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN;
    let mut r = Vec::with_capacity(len);
    r.extend_from_slice(&u32::try_from(len).expect("small").to_ne_bytes());
    r.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    r.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    r.extend_from_slice(&seq.to_ne_bytes());
    r.extend_from_slice(&0u32.to_ne_bytes());
    // struct inet_diag_req_v2
    r.extend_from_slice(&[family, IPPROTO_TCP, 1 << (INET_DIAG_SKMEMINFO - 1), 0]);
    r.extend_from_slice(&STATES.to_ne_bytes());
    r.extend_from_slice(&[0u8; 48]); // struct inet_diag_sockid: no filter
    r
}

/// A request for exactly one socket (no dump), by its own 4-tuple.
fn request_one(seq: u32, key: &SockKey) -> Vec<u8> {
    let len = NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN;
    let mut r = Vec::with_capacity(len);
    r.extend_from_slice(&u32::try_from(len).expect("small").to_ne_bytes());
    r.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    r.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    r.extend_from_slice(&seq.to_ne_bytes());
    r.extend_from_slice(&0u32.to_ne_bytes());
    // struct inet_diag_req_v2
    r.extend_from_slice(&[
        libc_family::AF_INET6,
        IPPROTO_TCP,
        1 << (INET_DIAG_SKMEMINFO - 1),
        0,
    ]);
    r.extend_from_slice(&u32::MAX.to_ne_bytes());
    // struct inet_diag_sockid: ports and addresses in network order.
    let port = |p: u32| u16::try_from(p).unwrap_or(0).to_be_bytes();
    r.extend_from_slice(&port(key.local_port));
    r.extend_from_slice(&port(key.remote_port));
    r.extend_from_slice(&key.local.octets());
    r.extend_from_slice(&key.remote.octets());
    r.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    r.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    r
}

fn u16_ne(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_ne(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn addr(family: u8, b: &[u8]) -> IpAddr {
    if family == libc_family::AF_INET {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        let o: [u8; 16] = b[..16].try_into().expect("16 bytes");
        let v6 = std::net::Ipv6Addr::from(o);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    }
}

/// Parses one datagram of a dump into `out`; true when the dump is done.
fn parse(buf: &[u8], seq: u32, out: &mut Vec<DiagSocket>) -> io::Result<bool> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"));
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let len = u32_ne(buf, at) as usize;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            return Err(bad("truncated message"));
        }
        let msg = &buf[at..at + len];
        at += len.next_multiple_of(4);
        if u32_ne(msg, 8) != seq {
            continue;
        }
        match u16_ne(msg, 4) {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code =
                    i32::from_ne_bytes(msg[16..20].try_into().map_err(|_| bad("short error"))?);
                return if code == 0 {
                    Ok(true)
                } else {
                    Err(io::Error::from_raw_os_error(-code))
                };
            }
            SOCK_DIAG_BY_FAMILY => {}
            _ => continue,
        }
        let body = &msg[NLMSG_HDRLEN..];
        if body.len() < INET_DIAG_MSG_LEN {
            return Err(bad("short inet_diag_msg"));
        }
        let family = body[0];
        let mut s = DiagSocket {
            local_port: u16::from_be_bytes([body[4], body[5]]),
            remote_port: u16::from_be_bytes([body[6], body[7]]),
            local: addr(family, &body[8..24]),
            remote: addr(family, &body[24..40]),
            rmem_alloc: 0,
            rcvbuf: 0,
        };
        let mut a = INET_DIAG_MSG_LEN;
        while a + 4 <= body.len() {
            let alen = usize::from(u16_ne(body, a));
            if alen < 4 || a + alen > body.len() {
                break;
            }
            if u16_ne(body, a + 2) == INET_DIAG_SKMEMINFO && alen >= 4 + 8 {
                s.rmem_alloc = u32_ne(body, a + 4);
                s.rcvbuf = u32_ne(body, a + 8);
            }
            a += alen.next_multiple_of(4);
        }
        out.push(s);
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_skips_only_while_no_receiver_can_have_reached_the_limit() {
        const MIB: u64 = 1 << 20;
        let mut g = Gate::default();
        assert!(!g.may_skip(Some(0), 16 * MIB), "never before a first dump");
        g.dumped(Some(100 * MIB), MIB);
        assert!(g.may_skip(Some(100 * MIB), 16 * MIB));
        assert!(g.may_skip(Some(114 * MIB), 16 * MIB), "14 MiB < 16 - 1");
        assert!(!g.may_skip(Some(115 * MIB), 16 * MIB));
        assert!(!g.may_skip(Some(90 * MIB), 16 * MIB), "counters went away");
        assert!(!g.may_skip(None, 16 * MIB), "maps unreadable");
        g.dumped(Some(100 * MIB), 20 * MIB);
        assert!(!g.may_skip(Some(100 * MIB), 16 * MIB), "a receiver is over");
    }

    /// A dump datagram as the kernel builds it: one IPv4-mapped IPv6 socket
    /// with a SKMEMINFO attribute, then DONE.
    #[test]
    fn parses_a_dump_with_meminfo() {
        let mut m = Vec::new();
        let body_len = INET_DIAG_MSG_LEN + 4 + 9 * 4;
        let len = NLMSG_HDRLEN + body_len;
        m.extend_from_slice(&u32::try_from(len).unwrap().to_ne_bytes());
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes());
        m.extend_from_slice(&7u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        let mut body = vec![0u8; INET_DIAG_MSG_LEN];
        body[0] = libc_family::AF_INET6;
        body[1] = 1;
        body[4..6].copy_from_slice(&7100u16.to_be_bytes());
        body[6..8].copy_from_slice(&40000u16.to_be_bytes());
        let local = Ipv4Addr::new(10, 213, 0, 11).to_ipv6_mapped();
        let remote = Ipv4Addr::new(10, 213, 0, 10).to_ipv6_mapped();
        body[8..24].copy_from_slice(&local.octets());
        body[24..40].copy_from_slice(&remote.octets());
        m.extend_from_slice(&body);
        m.extend_from_slice(&u16::try_from(4 + 9 * 4).unwrap().to_ne_bytes());
        m.extend_from_slice(&INET_DIAG_SKMEMINFO.to_ne_bytes());
        for v in [700_000_000u32, 131_072, 0, 0, 0, 0, 0, 0, 0] {
            m.extend_from_slice(&v.to_ne_bytes());
        }
        let mut done = Vec::new();
        done.extend_from_slice(&20u32.to_ne_bytes());
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&2u16.to_ne_bytes());
        done.extend_from_slice(&7u32.to_ne_bytes());
        done.extend_from_slice(&0u32.to_ne_bytes());
        done.extend_from_slice(&0i32.to_ne_bytes());
        m.extend_from_slice(&done);
        let mut out = Vec::new();
        assert!(parse(&m, 7, &mut out).unwrap());
        assert_eq!(
            out,
            vec![DiagSocket {
                local: "10.213.0.11".parse().unwrap(),
                local_port: 7100,
                remote: "10.213.0.10".parse().unwrap(),
                remote_port: 40000,
                rmem_alloc: 700_000_000,
                rcvbuf: 131_072,
            }]
        );
        // The sender's key is the receiver's, reversed; IPv4 is stored mapped,
        // so a dual-stack receiver and an IPv4 sender build matching keys.
        let sender = out[0].key().reversed();
        assert_eq!(sender.local, addr_of("10.213.0.10".parse().unwrap()));
        assert_eq!(sender.local_port, 40000);
        assert_eq!(sender.remote_port, 7100);
        // Another sequence number's messages are not ours.
        let mut other = Vec::new();
        assert!(!parse(&m[..len], 8, &mut other).unwrap());
        assert!(other.is_empty());
    }

    #[test]
    fn request_is_an_inet_diag_dump_asking_for_meminfo() {
        let r = request(5, libc_family::AF_INET);
        assert_eq!(r.len(), 72);
        assert_eq!(u32_ne(&r, 0), 72);
        assert_eq!(u16_ne(&r, 4), SOCK_DIAG_BY_FAMILY);
        assert_eq!(u16_ne(&r, 6), 0x301);
        assert_eq!(u32_ne(&r, 8), 5);
        assert_eq!(&r[16..20], &[2, 6, 0x40, 0]);
        assert_eq!(u32_ne(&r, 20), STATES);
    }

    #[test]
    fn one_socket_request_names_the_4_tuple_without_dumping() {
        let key = SockKey {
            local: addr_of("10.0.0.5".parse().unwrap()),
            remote: addr_of("10.0.0.6".parse().unwrap()),
            local_port: 8080,
            remote_port: 40000,
        };
        let r = request_one(9, &key);
        assert_eq!(r.len(), 72);
        assert_eq!(u32_ne(&r, 0), 72);
        assert_eq!(u16_ne(&r, 6), NLM_F_REQUEST, "no NLM_F_DUMP");
        assert_eq!(u32_ne(&r, 8), 9);
        assert_eq!(&r[16..20], &[10, 6, 0x40, 0], "AF_INET6, TCP, meminfo");
        // sockid: sport, dport (network order), then the mapped addresses.
        assert_eq!(&r[24..28], &[0x1f, 0x90, 0x9c, 0x40]);
        assert_eq!(&r[28..44], &key.local.octets());
        assert_eq!(&r[44..60], &key.remote.octets());
        assert_eq!(&r[60..64], &[0; 4]);
        assert_eq!(&r[64..72], &[0xff; 8]);
    }
}
