use core::{
    ffi::c_void,
    intrinsics::AtomicOrdering,
    ptr::{addr_of, read_volatile},
};

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, sk_action::SK_PASS,
    },
    macros::{map, sk_msg, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use spright_common::{
    AF_INET, AF_INET6, Addr, CONFIG_NO_FLOW_EVENTS, CONFIG_NO_REDIRECT, ChainPair, Counters,
    EndpointValue, FlowEvent, FlowState, SockKey, Translation, Verdict, bound, flow, limits,
    remote_port_to_host,
};

// Map names must equal `spright_common::names::*` (checked by the loader's tests).
#[map(name = "spr_socks_v1")]
static SOCKS: SockHash<SockKey> = SockHash::pinned(limits::MAX_SOCKETS, 0);

#[map(name = "spr_endpts_v1")]
static ENDPOINTS: HashMap<Addr, EndpointValue> = HashMap::pinned(limits::MAX_ENDPOINTS, 0);

#[map(name = "spr_allow_v1")]
static CHAIN_ALLOW: HashMap<ChainPair, u32> = HashMap::pinned(limits::MAX_CHAIN_ALLOWS, 0);

#[map(name = "spr_counters_v1")]
static COUNTERS: PerCpuHashMap<Addr, Counters> = PerCpuHashMap::pinned(limits::MAX_ENDPOINTS, 0);

/// Sockets whose messages once took the TCP path (their peer was not yet in
/// the sockhash). They never redirect afterwards: the receiver reads its
/// redirect queue before its TCP receive queue, so switching a connection
/// from TCP to redirect mid-stream could deliver newer bytes first.
#[map(name = "spr_tcponly_v1")]
static TCP_ONLY: LruHashMap<SockKey, u32> = LruHashMap::pinned(limits::MAX_SOCKETS, 0);

/// Flow events for meshd (`spright flows`), see `spright_common::flow`.
#[map(name = "spr_flows_v1")]
static FLOWS: RingBuf = RingBuf::pinned(limits::FLOW_RING_BYTES, 0);

/// Per-socket state of chain-pod connections: who reports the connection
/// and the bytes that went socket to socket (which TCP's own counters never
/// see).
#[map(name = "spr_flowst_v1")]
static FLOW_STATE: LruHashMap<SockKey, FlowState> = LruHashMap::pinned(limits::MAX_SOCKETS, 0);

/// Flow events the full ring buffer refused.
#[map(name = "spr_flowlost_v1")]
static FLOWS_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// Node-wide switches (`spright_common::CONFIG_*`), set by meshd.
#[map(name = "spr_config_v1")]
static CONFIG: Array<u32> = Array::pinned(1, 0);

/// The node-wide `CONFIG_*` flags (0 when unset).
#[inline(always)]
pub(crate) fn config_flags() -> u32 {
    CONFIG.get(0).copied().unwrap_or(0)
}

/// Whether flow events are on (the default; meshd can turn them off).
#[inline(always)]
fn flow_events_on() -> bool {
    config_flags() & CONFIG_NO_FLOW_EVENTS == 0
}

/// The kernel memory bound: [`bound::LIMIT`] (written by meshd) and
/// [`bound::LAST_SWITCH_BYTES`].
#[map(name = "spr_bound_v1")]
static BOUND: Array<u64> = Array::pinned(bound::SLOTS, 0);

/// Offset of `sk_backlog.rmem_alloc` (the receiver's queued memory) in the
/// kernel's `struct sock`, set at load time from the running kernel's
/// BTF (`spright_common::names::RMEM_OFFSET_GLOBAL`); 0 = unknown, no
/// kernel bound. A read-only global: the verifier sees its value as a
/// constant, so `tcp_sock + offset` is a fixed-offset BTF access it can
/// check against the kernel's type (aya-ebpf has no CO-RE).
#[unsafe(no_mangle)]
static SPR_RMEM_OFF: u32 = 0;

/// Offset of `sk_redir` (the socket a message is redirected to) in the
/// kernel's `struct sk_msg`, set like `SPR_RMEM_OFF`; 0 = unknown.
#[unsafe(no_mangle)]
static SPR_REDIR_OFF: u32 = 0;

/// `BPF_SOCK_OPS_STATE_CB_FLAG`: call sockops on every TCP state change.
pub(crate) const STATE_CB_FLAG: u32 = 1 << 2;
/// `BPF_TCP_CLOSE` in the state callback's new-state argument.
pub(crate) const TCP_CLOSE: u32 = 7;
/// Old states (`BPF_TCP_*`) a socket closes from.
const TCP_FIN_WAIT2: u32 = 5;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;

/// sock_ops entry point. The return value of the established callbacks is
/// ignored by the kernel; on any internal error the socket simply stays on the
/// TCP path (fail open).
#[sock_ops]
pub(crate) fn spright_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops(&ctx);
    1
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), i32> {
    let op = ctx.op();
    let active = op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB;
    let established = active || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB;
    // Only sockets that asked for state callbacks (accelerated, translated
    // or reported ones, below) get here with STATE_CB.
    let closing = op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == TCP_CLOSE;
    let translation = defined(crate::services::on_sockops(ctx, active, closing));
    if !established && !closing {
        return Ok(());
    }
    let ops = ctx.ops;
    // SAFETY: `ops` is the context pointer the kernel handed this program; see
    // `read_ctx_addrs` for why every field is read unconditionally.
    let (family, lport, rport, l4, r4, l6, r6) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_port)),
            read_volatile(addr_of!((*ops).remote_port)),
            read_volatile(addr_of!((*ops).local_ip4)),
            read_volatile(addr_of!((*ops).remote_ip4)),
            read_ip6(addr_of!((*ops).local_ip6)),
            read_ip6(addr_of!((*ops).remote_ip6)),
        )
    };
    let Some((local, remote)) = endpoints_of(family, l4, r4, l6, r6) else {
        return Ok(());
    };
    let mut key = SockKey {
        local,
        remote,
        local_port: lport,
        remote_port: remote_port_to_host(rport),
    };
    if closing {
        // The kernel drops the socket from the sockhash itself; its
        // TCP-only mark goes here, so the LRU holds live sockets only and
        // never has to evict the mark of a socket still in use (which would
        // let it switch back to the redirect path and reorder bytes).
        let _ = TCP_ONLY.remove(&key);
        flow_closed(ctx, &key);
        return Ok(());
    }
    let (l, r) = (endpoint(&local), endpoint(&remote));
    let mut verdict = policy(l, r);
    // A syscall family this kernel's redirect path would lose data on, and
    // nothing mitigates: no new connection is redirected (fail safe).
    if verdict.redirects() && config_flags() & CONFIG_NO_REDIRECT != 0 {
        verdict = Verdict::NodeUnsafe;
    }
    let in_chain = |e: Option<EndpointValue>| e.is_some_and(|e| e.chain_id != 0);
    if (in_chain(l) || in_chain(r)) && flow_events_on() {
        // The connecting socket reports when its pod is recorded here; the
        // accepting one when its client is not (a host process, another
        // node), so every chain-pod connection is reported exactly once.
        let reporter = if active { l.is_some() } else { r.is_none() };
        flow_opened(ctx, &key, active, reporter, verdict, translation);
    }
    if !verdict.redirects() {
        return Ok(());
    }
    // A new connection reusing the 4-tuple of a closed one starts clean.
    let _ = TCP_ONLY.remove(&key);
    // SAFETY: `ctx.ops` is the context pointer the kernel handed this program.
    SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY))?;
    let _ = ctx.set_cb_flags((ctx.cb_flags() | STATE_CB_FLAG) as i32);
    bump(&local, |c| c.accelerated_socks += 1);
    Ok(())
}

/// The endpoint recorded at `addr`, copied out of the map.
#[inline(always)]
fn endpoint(addr: &Addr) -> Option<EndpointValue> {
    // SAFETY: the value is copied out at once; a concurrent update can at
    // worst give a stale decision for this one connection.
    defined(unsafe { ENDPOINTS.get(addr) }.copied())
}

/// `v`, with its payload defined on every path.
///
/// Verifier workaround (kernel 6.1, LLVM 22): LLVM treats the payload of a
/// `None` as don't-care, and 6.1's verifier follows paths that cannot be
/// taken when it loses track of a value (an OR of flags it cannot bound), so
/// it refused the program where such a path reads a payload that was never
/// written: `R1 !read_ok` at `same_chain_as` after LLVM folded `verdict`'s
/// early returns into one OR (6.1.192), `invalid read from stack` at the
/// flow event's Service address (6.1.176). The payload therefore always
/// lives in a stack slot, zeroed for `None`, and is read back volatile,
/// which LLVM can neither drop nor sink into the `Some` branch. 6.12 and
/// later verify the program either way.
#[inline(always)]
fn defined<T: Copy + Default>(v: Option<T>) -> Option<T> {
    let mut slot = T::default();
    let some = match v {
        Some(x) => {
            slot = x;
            true
        }
        None => false,
    };
    // SAFETY: a local, initialised on both paths.
    let slot = unsafe { read_volatile(&raw const slot) };
    some.then_some(slot)
}

/// Policy, decided once per connection by `spright_common::verdict` (the
/// function `spright explain` runs on the same map entries): both ends are
/// recorded local endpoints, neither opted out, and they are in the same
/// chain or in chains explicitly allowed to talk.
#[inline(always)]
fn policy(l: Option<EndpointValue>, r: Option<EndpointValue>) -> Verdict {
    spright_common::verdict(l, r, |pair: ChainPair| CHAIN_ALLOW.get_ptr(pair).is_some())
}

/// Establishment of a chain-pod connection: the socket's flow state (for
/// the reporter, and for every redirected socket, whose bytes only sk_msg
/// sees) and, from the reporter, the `OPEN` event. The reporter asks for
/// state callbacks to report the close.
#[inline(always)]
fn flow_opened(
    ctx: &SockOpsContext,
    key: &SockKey,
    active: bool,
    reporter: bool,
    verdict: Verdict,
    translation: Option<Translation>,
) {
    let redirected = verdict.redirects();
    if !reporter && !redirected {
        return;
    }
    let state = FlowState {
        sent_redirected: 0,
        reporter: u32::from(reporter),
        reserved: 0,
    };
    let _ = FLOW_STATE.insert(key, &state, u64::from(BPF_ANY));
    if !reporter {
        return;
    }
    let mut flags = 0;
    if active {
        flags |= flow::ACTIVE;
    }
    if redirected {
        flags |= flow::REDIRECTED;
    }
    let (service, service_port) = match translation {
        Some(t) => {
            flags |= flow::TRANSLATED;
            (t.service, t.service_port)
        }
        None => (Addr::default(), 0),
    };
    emit(&FlowEvent {
        kind: flow::OPEN,
        flags,
        reason: verdict as u32,
        reserved: 0,
        key: *key,
        service,
        service_port,
        reserved2: 0,
        bytes_sent: 0,
        bytes_received: 0,
    });
    let _ = ctx.set_cb_flags((ctx.cb_flags() | STATE_CB_FLAG) as i32);
}

/// The reporter's close: bytes each way are what went socket to socket
/// (this socket's and its peer's sk_msg counts) plus what TCP carried (its
/// own acked and received counters).
#[inline(always)]
fn flow_closed(ctx: &SockOpsContext, key: &SockKey) {
    // SAFETY: copied out at once.
    let Some(state) = (unsafe { FLOW_STATE.get(key) }).copied() else {
        return;
    };
    if state.reporter == 0 {
        // The reporter reads this socket's count when it closes (both
        // ends have sent their FIN by then).
        return;
    }
    let peer = key.reversed();
    // SAFETY: copied out at once.
    let peer_sent = (unsafe { FLOW_STATE.get(&peer) }).map_or(0, |p| p.sent_redirected);
    let ops = ctx.ops;
    // SAFETY: `ops` is the context pointer the kernel handed this program;
    // both fields read as 0 on a socket that is not a full socket.
    let (acked, received) = unsafe {
        (
            read_volatile(addr_of!((*ops).bytes_acked)),
            read_volatile(addr_of!((*ops).bytes_received)),
        )
    };
    // TCP's counters include the control flags' sequence numbers: the
    // SYN in `bytes_acked`, and each FIN once acked or received. Which
    // FINs there were follows from the state the socket closes from.
    let old = ctx.arg(0);
    let (fin_acked, fin_received) = match old {
        TCP_FIN_WAIT2 | TCP_CLOSING | TCP_LAST_ACK => (1, 1),
        TCP_CLOSE_WAIT => (0, 1),
        _ => (0, 0), // reset or aborted
    };
    emit(&FlowEvent {
        kind: flow::CLOSE,
        flags: 0,
        reason: old,
        reserved: 0,
        key: *key,
        service: Addr::default(),
        service_port: 0,
        reserved2: 0,
        bytes_sent: state.sent_redirected + acked.saturating_sub(1 + fin_acked),
        bytes_received: peer_sent + received.saturating_sub(fin_received),
    });
    let _ = FLOW_STATE.remove(key);
    let _ = FLOW_STATE.remove(&peer);
}

/// Writes one flow event; a full ring buffer counts it as lost.
#[inline(always)]
fn emit(event: &FlowEvent) {
    if FLOWS.output::<FlowEvent>(event, 0).is_err() {
        if let Some(lost) = FLOWS_LOST.get_ptr_mut(0) {
            // SAFETY: this CPU's value; no other program touches it concurrently.
            unsafe { *lost += 1 };
        }
    }
}

#[inline(always)]
fn bump(addr: &Addr, f: impl FnOnce(&mut Counters)) {
    let ptr = match COUNTERS.get_ptr_mut(addr) {
        Some(p) => p,
        None => {
            let _ = COUNTERS.insert(addr, Counters::default(), u64::from(BPF_NOEXIST));
            match COUNTERS.get_ptr_mut(addr) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: per-CPU value of this CPU; no other program touches it concurrently.
    f(unsafe { &mut *ptr });
}

/// sk_msg entry point. Verdict is always SK_PASS: after a successful redirect
/// that is what the kernel expects, and when the peer is missing it sends the
/// message down the TCP path (any other verdict would drop data).
#[sk_msg]
pub(crate) fn spright_sk_msg(ctx: SkMsgContext) -> u32 {
    try_sk_msg(&ctx);
    SK_PASS
}

fn try_sk_msg(ctx: &SkMsgContext) {
    let md = ctx.msg;
    // The context only allows 4-byte loads of these fields: read each one on its
    // own (volatile) so LLVM cannot merge them into wider loads the verifier rejects.
    // SAFETY: `md` is the context pointer the kernel handed this program.
    let (family, size, lport, rport) = unsafe {
        (
            read_volatile(addr_of!((*md).family)),
            read_volatile(addr_of!((*md).size)),
            read_volatile(addr_of!((*md).local_port)),
            read_volatile(addr_of!((*md).remote_port)),
        )
    };
    // SAFETY: as above.
    let (l4, r4, l6, r6) = unsafe {
        (
            read_volatile(addr_of!((*md).local_ip4)),
            read_volatile(addr_of!((*md).remote_ip4)),
            read_ip6(addr_of!((*md).local_ip6)),
            read_ip6(addr_of!((*md).remote_ip6)),
        )
    };
    let Some((local, remote)) = endpoints_of(family, l4, r4, l6, r6) else {
        return;
    };
    let own = SockKey {
        local,
        remote,
        local_port: lport,
        remote_port: remote_port_to_host(rport),
    };
    let bytes = u64::from(size);
    // The path is decided per connection, never per message: once a message
    // of this socket went the TCP way, all later ones do too.
    if TCP_ONLY.get_ptr(own).is_none() {
        let mut peer = own.reversed();
        if SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) != i64::from(SK_PASS) {
            let _ = TCP_ONLY.insert(own, 1, u64::from(BPF_ANY));
            bump(&local, |c| {
                c.fallback_msgs += 1;
                c.fallback_bytes += bytes;
            });
            if flow_events_on() {
                emit(&FlowEvent {
                    kind: flow::TCP_SWITCH,
                    reason: flow::SWITCH_PEER_MISSING,
                    key: own,
                    ..FlowEvent::default()
                });
            }
            return;
        }
        bump(&local, |c| {
            c.redirected_msgs += 1;
            c.redirected_bytes += bytes;
        });
        let flows = flow_events_on();
        if flows {
            if let Some(state) = FLOW_STATE.get_ptr_mut(&own) {
                // SAFETY: sk_msg runs under the socket's lock, so no other
                // program updates this socket's entry concurrently.
                unsafe { (*state).sent_redirected += bytes };
            }
        }
        if let Some(queued) = redirected_over_bound(ctx, bytes) {
            // The kernel bound: this message takes the receiver past the
            // limit, so it is the connection's last redirected one. The
            // same switch as meshd's poll: every later message takes the
            // TCP path, after everything already redirected.
            let _ = TCP_ONLY.insert(own, 1, u64::from(BPF_ANY));
            if let Some(slot) = BOUND.get_ptr_mut(bound::LAST_SWITCH_BYTES) {
                // SAFETY: an array slot; a racing store only loses a statistic.
                unsafe { *slot = queued };
            }
            if let Some(slot) = BOUND.get_ptr_mut(bound::SWITCHES) {
                // An atomic add (BPF_ATOMIC): core's AtomicU64 offers no
                // fetch_add on bpf, but LLVM lowers the intrinsic to one
                // instruction the verifier accepts on map values.
                // SAFETY: an aligned array slot, only ever updated atomically.
                unsafe {
                    core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(slot, 1);
                }
            }
            bump(&local, |c| c.bound_switches += 1);
            if flows {
                emit(&FlowEvent {
                    kind: flow::TCP_SWITCH,
                    reason: flow::SWITCH_MEMORY_BOUND,
                    key: own,
                    ..FlowEvent::default()
                });
            }
        }
        return;
    }
    bump(&local, |c| {
        c.fallback_msgs += 1;
        c.fallback_bytes += bytes;
    });
}

/// Whether the receiver this message was just redirected to will hold more
/// than the bound once the message is queued: its `sk_rmem_alloc` (which
/// every redirected message is charged to until read) plus `size`. Returns
/// that memory when over.
///
/// The receiver is `sk_redir` of the kernel's `struct sk_msg`, set by the
/// redirect helper. The program reaches it through `bpf_cast_to_kern_ctx`
/// (a kfunc: the call below is a placeholder helper id the loader rewrites,
/// aya has no kfunc relocations) and reads both fields at offsets the loader
/// took from the kernel's BTF. (A sockhash lookup would give the peer
/// before the redirect, but it returns a referenced socket and sk_msg may
/// not call `bpf_sk_release` on kernel 6.18: see docs/RELIABILITY.md.)
#[inline(always)]
fn redirected_over_bound(ctx: &SkMsgContext, size: u64) -> Option<u64> {
    // SAFETY: read-only globals (see `SPR_RMEM_OFF`).
    let (rmem_off, redir_off) = unsafe {
        (
            read_volatile(addr_of!(SPR_RMEM_OFF)),
            read_volatile(addr_of!(SPR_REDIR_OFF)),
        )
    };
    if rmem_off == 0 || redir_off == 0 {
        return None;
    }
    let limit = BOUND.get(bound::LIMIT).copied().unwrap_or(0);
    if limit == 0 {
        return None;
    }
    // SAFETY: the kfunc takes the context pointer as the kernel handed it
    // and returns the kernel's view of it; the loads are BTF-typed (the
    // verifier checks them against the kernel's types, a NULL `sk_redir`
    // reads 0).
    let queued = unsafe {
        let cast: unsafe extern "C" fn(*mut c_void) -> *mut u8 =
            core::mem::transmute(bound::KERN_CTX_PLACEHOLDER as usize);
        let kmsg = cast(ctx.msg.cast());
        let peer = read_volatile(kmsg.add(redir_off as usize).cast::<*const u8>());
        if peer.is_null() {
            return None;
        }
        u64::from(read_volatile(peer.add(rmem_off as usize).cast::<u32>()))
    };
    // A receiver with nothing queued takes any one message (so a single
    // message larger than the limit does not switch a reader that keeps up).
    (queued > 0 && queued + size > limit).then_some(queued + size)
}

/// Both ends of a socket as map keys, from the context's address fields.
///
/// Callers read all four address fields unconditionally (volatile, one 4-byte
/// load each) before choosing by family: loading them inside the match let LLVM
/// 22 fold the arms into one load at a variable context offset, which the
/// verifier of kernel 6.18 rejects ("dereference of modified ctx ptr").
#[inline(always)]
fn endpoints_of(family: u32, l4: u32, r4: u32, l6: Addr, r6: Addr) -> Option<(Addr, Addr)> {
    match family {
        AF_INET => Some((Addr::from_ipv4_raw(l4), Addr::from_ipv4_raw(r4))),
        AF_INET6 => Some((l6, r6)),
        _ => None,
    }
}

/// # Safety
/// `p` points at a context's `*_ip6` field.
#[inline(always)]
unsafe fn read_ip6(p: *const [u32; 4]) -> Addr {
    let p = p.cast::<u32>();
    // SAFETY: the caller guarantees four readable u32 words.
    unsafe {
        Addr::from_ipv6_raw([
            read_volatile(p),
            read_volatile(p.add(1)),
            read_volatile(p.add(2)),
            read_volatile(p.add(3)),
        ])
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
