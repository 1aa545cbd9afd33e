//! The memory bound of the redirect path (docs/RELIABILITY.md, limit 2).
//!
//! A message redirected into a socket is queued on the receiver's psock and
//! charged to its `sk_rmem_alloc`, but `SO_RCVBUF` is never checked, so a pod
//! that never reads lets its peer queue memory without limit.
//!
//! **Kernel bound** (chosen at start when the attached sk_msg program can
//! read the receiver's `sk_rmem_alloc`: the loader found what it needs in
//! the kernel's BTF and the verifier accepted the program with it): meshd
//! only writes the limit into `spr_bound_v1`. After each redirect sk_msg
//! reads the receiver's memory and, when this message takes it past the
//! limit, puts the sender into `spr_tcponly_v1`: the same switch as below,
//! at the moment of the send, so the receiver holds at most the limit plus
//! one message. No thread, no poll.
//!
//! **Poll** (older kernels, no BTF): sk_msg never sees the receiver's
//! reads, so the bound lives here:
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
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use spright_ebpf::{KernelBound, PathSwitch, SockKey};
use tracing::{info, warn};

use crate::{
    config::Config,
    snapshot::Snapshot,
    sock_diag::{DiagSocket, SockDiag},
};

/// Who enforces the bound, chosen once at start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `--memory-bound-bytes off`.
    #[default]
    Off,
    /// The sk_msg program, at each send (`spr_bound_v1`).
    Kernel,
    /// meshd's sock_diag poll, every `--memory-bound-interval-ms`.
    Poll,
    /// Asked for, but this kernel does not charge redirected bytes to the
    /// receiver (the self-test's memory-bound probe), which both the kernel
    /// bound and the poll read: nothing bounds a receiver that stops
    /// reading, and nothing is advertised as if it did.
    Unavailable,
}

/// Counters of the bound, shared by the poller and the status view.
#[derive(Debug, Default)]
pub struct Stats {
    mode: Mutex<Mode>,
    /// With [`Mode::Kernel`]: the bound's map, for its counters.
    kernel: Mutex<Option<KernelBound>>,
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
    /// Who enforces it: `kernel` (sk_msg, at each send), `poll` (meshd,
    /// every `interval_ms`) or `off`.
    #[serde(default)]
    pub mode: Mode,
    pub interval_ms: u64,
    /// Connection directions moved from the redirect path to TCP (by the
    /// kernel bound: since the datapath was installed; by the poll: since
    /// meshd started).
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
    /// one message (kernel) or plus the overshoot that one polling delay
    /// allowed (poll).
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
        if self.mode == Mode::Unavailable {
            return format!(
                "memory bound: NOT AVAILABLE on this kernel ({} KiB asked): redirected bytes are not charged to the receiver (sk_rmem_alloc; Linux 6.13+ or the 6.6.y backport), so a pod that stops reading lets the kernel queue without limit{}",
                self.limit_bytes >> 10,
                self.error
                    .as_ref()
                    .map(|e| format!("; {e}"))
                    .unwrap_or_default()
            );
        }
        if self.mode == Mode::Kernel {
            return format!(
                "memory bound: {} KiB per connection, enforced by sk_msg at each send; {} sender(s) moved to TCP{}",
                self.limit_bytes >> 10,
                self.switches,
                self.error
                    .as_ref()
                    .map(|e| format!("; {e}"))
                    .unwrap_or_default()
            );
        }
        format!(
            "memory bound: {} KiB per connection, checked by meshd every {} ms; {} sender(s) moved to TCP; largest queue {} KiB{}",
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
        let mode = *self.mode.lock().expect("stats lock");
        if mode == Mode::Kernel {
            let kernel = self.kernel.lock().expect("stats lock");
            let read = kernel.as_ref().map(|k| {
                (
                    k.switches(),
                    k.last_switch_bytes(),
                    k.limit().map(|l| l == limit_bytes),
                )
            });
            let mut r = Report {
                limit_bytes,
                mode,
                interval_ms: 0,
                switches: 0,
                polls: 0,
                skipped_polls: 0,
                largest_queue_bytes: 0,
                last_switch_queue_bytes: 0,
                error: None,
            };
            match read {
                Some((Ok(switches), Ok(last), Ok(true))) => {
                    r.switches = switches;
                    r.last_switch_queue_bytes = last;
                }
                Some((Ok(_), Ok(_), Ok(false))) => {
                    r.error = Some(
                        "the limit in spr_bound_v1 is not meshd's (changed by someone else)".into(),
                    );
                }
                Some((a, b, c)) => {
                    let e = a.err().or(b.err()).or(c.err());
                    r.error = e.map(|e| crate::error::chain(&e));
                }
                None => r.error = Some("the bound's map is not open".into()),
            }
            return r;
        }
        Report {
            limit_bytes,
            mode,
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
    flows: Arc<crate::flows::Flows>,
) -> Option<std::thread::JoinHandle<()>> {
    let (limit, interval, bpffs) = (
        config.memory_bound_bytes,
        Duration::from_millis(config.memory_bound_interval_ms),
        config.bpffs.clone(),
    );
    // The kernel bound when the attached sk_msg program can enforce it:
    // its limit is the one of the meshd that started last (0 turns it off).
    let kernel = match KernelBound::open(&bpffs) {
        Ok(Some(mut k)) if config.memory_bound_poll => {
            if let Err(e) = k.set_limit(0) {
                warn!(error = %crate::error::chain(&e), "memory bound: cannot turn the kernel's off");
            }
            None
        }
        Ok(Some(mut k)) => match k.set_limit(limit) {
            Ok(()) => Some(k),
            Err(e) => {
                warn!(error = %crate::error::chain(&e), "memory bound: cannot set the kernel's limit");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            info!(error = %crate::error::chain(&e), "memory bound: no kernel bound in this datapath");
            None
        }
    };
    if limit == 0 {
        info!("memory bound off");
        return None;
    }
    let probe = snapshot
        .borrow()
        .selftest
        .as_ref()
        .map(|t| (t.rmem_charged, t.rmem_detail.clone()));
    if let Some((Some(false), detail)) = probe {
        warn!(limit_bytes = limit, probe = ?detail,
              "memory bound not available: this kernel does not charge redirected bytes to the receiver");
        if let Some(mut k) = kernel {
            let _ = k.set_limit(0);
        }
        *stats.mode.lock().expect("stats lock") = Mode::Unavailable;
        stats.set_error(detail);
        return None;
    }
    if let Some(k) = kernel {
        info!(
            limit_bytes = limit,
            rmem_offset = k.rmem_offset().unwrap_or_default(),
            "memory bound on, enforced by sk_msg at each send"
        );
        *stats.mode.lock().expect("stats lock") = Mode::Kernel;
        *stats.kernel.lock().expect("stats lock") = Some(k);
        return None;
    }
    info!(
        limit_bytes = limit,
        interval_ms = interval.as_millis(),
        "memory bound on, checked by polling"
    );
    *stats.mode.lock().expect("stats lock") = Mode::Poll;
    let spawned = std::thread::Builder::new()
        .name("membound".into())
        .spawn(move || {
            let mut poller = Poller {
                limit,
                bpffs,
                stats,
                flows,
                snapshot: snapshot.clone(),
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
    /// Told of every switch (a flow's fate).
    flows: Arc<crate::flows::Flows>,
    snapshot: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    switch: Option<PathSwitch>,
    /// One sock_diag socket per pod network namespace.
    sockets: HashMap<NsId, SockDiag>,
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
                match self.socket_in(id).and_then(|d| d.lookup(seq, key)) {
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
                match self.socket_in(id).and_then(SockDiag::dump) {
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

    fn socket_in(&mut self, id: &NsId) -> io::Result<&SockDiag> {
        if !self.sockets.contains_key(id) {
            let diag = SockDiag::in_netns(Path::new(&id.0))?;
            self.sockets.insert(id.clone(), diag);
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
        let flows = self.flows.clone();
        let name = crate::flows::namer(&self.snapshot);
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
            flows.switched(sender, &name);
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

/// Above this many redirected sockets a poll dumps each pod's sockets
/// instead of looking each one up.
const LOOKUPS_MAX: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_says_who_enforces_the_bound() {
        let r = Report {
            limit_bytes: 16 << 20,
            mode: Mode::Kernel,
            interval_ms: 0,
            switches: 2,
            polls: 0,
            skipped_polls: 0,
            largest_queue_bytes: 0,
            last_switch_queue_bytes: 0,
            error: None,
        };
        assert_eq!(
            r.summary(),
            "memory bound: 16384 KiB per connection, enforced by sk_msg at each send; 2 sender(s) moved to TCP"
        );
        let polled = Report {
            mode: Mode::Poll,
            interval_ms: 20,
            ..r.clone()
        };
        assert!(polled.summary().contains("checked by meshd every 20 ms"));
        let unavailable = Report {
            mode: Mode::Unavailable,
            switches: 0,
            ..r.clone()
        };
        assert!(
            unavailable
                .summary()
                .starts_with("memory bound: NOT AVAILABLE on this kernel")
                && !unavailable.summary().contains("enforced"),
            "{}",
            unavailable.summary()
        );
        assert_eq!(
            serde_json::to_value(&unavailable).expect("json")["mode"],
            serde_json::json!("unavailable")
        );
        // A /status from a meshd that predates the mode reads as "off"
        // rather than failing.
        let old: Report = serde_json::from_value(serde_json::json!({
            "limit_bytes": 0, "interval_ms": 20, "switches": 0, "polls": 0,
            "largest_queue_bytes": 0, "last_switch_queue_bytes": 0
        }))
        .expect("old report");
        assert_eq!(old.mode, Mode::Off);
        assert_eq!(
            serde_json::to_value(&r).expect("json")["mode"],
            serde_json::json!("kernel")
        );
    }

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
}
