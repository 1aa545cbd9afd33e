//! Service translation at `connect()` (cgroup sock_addr programs).
//!
//! With kube-proxy a connection to a ClusterIP is DNATed per packet after
//! `connect()`: the client socket keeps the ClusterIP as its peer while the
//! server socket sees the client's pod address, so the two sockets' sockhash
//! keys never pair and the hop is never redirected. Here a chain pod's
//! `connect()` to a Service with a node-local backend of its chain goes
//! straight to that backend instead (no DNAT happens, the connection is an
//! ordinary pod-to-pod one and sockops pairs it), and `getpeername()` is
//! rewritten back so the application still sees the address it dialled.
//!
//! Everything else — callers outside chains or opted out, UDP, addresses that
//! are not in the service table — is left alone for kube-proxy.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_NOEXIST, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap, PerCpuHashMap},
    programs::{SockAddrContext, SockOpsContext},
};
use spright_common::{
    Addr, EndpointValue, IPPROTO_TCP, SvcCounters, SvcKey, SvcValue, Translation, limits,
};

// Map names must equal `spright_common::names::*` (checked by the loader's tests).
#[map(name = "spr_netns_v1")]
static NETNS: HashMap<u64, EndpointValue> = HashMap::pinned(limits::MAX_ENDPOINTS, 0);

#[map(name = "spr_svc_v1")]
static SERVICES: HashMap<SvcKey, SvcValue> = HashMap::pinned(limits::MAX_SERVICES, 0);

#[map(name = "spr_xlate_v1")]
static TRANSLATIONS: LruHashMap<u64, Translation> = LruHashMap::pinned(limits::MAX_SOCKETS, 0);

#[map(name = "spr_svcstats_v1")]
static SERVICE_COUNTERS: PerCpuHashMap<SvcKey, SvcCounters> =
    PerCpuHashMap::pinned(limits::MAX_SERVICES, 0);

/// The verdict of every program here: let the call proceed (rewritten or not).
const PROCEED: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub(crate) fn spright_connect4(ctx: SockAddrContext) -> i32 {
    translate::<false>(&ctx);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub(crate) fn spright_connect6(ctx: SockAddrContext) -> i32 {
    translate::<true>(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub(crate) fn spright_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer::<false>(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub(crate) fn spright_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer::<true>(&ctx);
    PROCEED
}

/// The destination of a `connect()`/`getpeername()` context. Each program
/// reads only its own family's field (the verifier refuses `user_ip6` in the
/// IPv4 hooks and the other way round); `V6` is a constant, so each program's
/// code holds one of the two loads.
#[inline(always)]
fn user_addr<const V6: bool>(sa: *mut bpf_sock_addr) -> (Addr, u32) {
    // SAFETY: `sa` is the context pointer the kernel handed the program; every
    // field is read with its own 4-byte load.
    unsafe {
        let port = u32::from(u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16));
        let addr = if V6 {
            let p = addr_of!((*sa).user_ip6).cast::<u32>();
            Addr::from_ipv6_raw([
                read_volatile(p),
                read_volatile(p.add(1)),
                read_volatile(p.add(2)),
                read_volatile(p.add(3)),
            ])
        } else {
            Addr::from_ipv4_raw(read_volatile(addr_of!((*sa).user_ip4)))
        };
        (addr, port)
    }
}

/// Rewrites the context's destination (see [`user_addr`] on the families).
#[inline(always)]
fn set_user_addr<const V6: bool>(sa: *mut bpf_sock_addr, addr: &Addr, port: u32) {
    // SAFETY: as in `user_addr`; these fields are writable in connect and
    // getpeername hooks.
    unsafe {
        if V6 {
            let p = addr_of_mut!((*sa).user_ip6).cast::<u32>();
            write_volatile(p, addr.words[0]);
            write_volatile(p.add(1), addr.words[1]);
            write_volatile(p.add(2), addr.words[2]);
            write_volatile(p.add(3), addr.words[3]);
        } else {
            write_volatile(addr_of_mut!((*sa).user_ip4), addr.words[3]);
        }
        write_volatile(
            addr_of_mut!((*sa).user_port),
            u32::from((port as u16).to_be()),
        );
    }
}

fn translate<const V6: bool>(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context pointer the kernel handed the program.
    let protocol = unsafe { read_volatile(addr_of!((*sa).protocol)) };
    if protocol != IPPROTO_TCP {
        return;
    }
    // SAFETY: the helper only reads the context's socket.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let caller = unsafe { NETNS.get(&netns) }.copied();
    // The same decision `spright explain` shows.
    let Ok(chain_id) = spright_common::translation_chain(caller) else {
        return;
    };
    let (addr, port) = user_addr::<V6>(sa);
    let key = SvcKey {
        addr,
        port,
        proto: IPPROTO_TCP,
        chain_id,
    };
    let Some(svc) = SERVICES.get_ptr(&key) else {
        return;
    };
    // SAFETY: a pointer into the map's value; read field by field.
    let count = unsafe { read_volatile(addr_of!((*svc).count)) };
    if count == 0 {
        return;
    }
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Consecutive connections get consecutive cookies: round robin.
    let i = (cookie % u64::from(count)) as usize;
    if i >= limits::MAX_BACKENDS {
        return;
    }
    // SAFETY: `i` is bounds-checked against the array just above.
    let backend = unsafe {
        read_volatile(
            addr_of!((*svc).backends)
                .cast::<spright_common::Backend>()
                .add(i),
        )
    };
    // An IPv4 socket can only be sent to an IPv4 backend.
    if !V6 && !backend.addr.is_ipv4_mapped() {
        return;
    }
    let t = Translation {
        service: addr,
        backend: backend.addr,
        service_port: port,
        backend_port: backend.port,
        netns_cookie: netns,
    };
    // Without the record getpeername could not be restored: leave it alone.
    if TRANSLATIONS
        .insert(&cookie, &t, u64::from(BPF_ANY))
        .is_err()
    {
        return;
    }
    set_user_addr::<V6>(sa, &backend.addr, backend.port);
    bump(&key);
}

fn restore_peer<const V6: bool>(ctx: &SockAddrContext) {
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(t) = (unsafe { TRANSLATIONS.get(&cookie) }).copied() else {
        return;
    };
    set_user_addr::<V6>(ctx.sock_addr, &t.service, t.service_port);
}

/// sockops' part: ask for state callbacks on translated connections once
/// they are established, and forget the translation when the socket closes
/// (the LRU is only the safety net for connections that never establish).
/// Returns the connection's translation when it is being established.
#[inline(always)]
pub(crate) fn on_sockops(
    ctx: &SockOpsContext,
    active_established: bool,
    closing: bool,
) -> Option<Translation> {
    if !active_established && !closing {
        return None;
    }
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let t = (unsafe { TRANSLATIONS.get(&cookie) }).copied()?;
    if closing {
        let _ = TRANSLATIONS.remove(&cookie);
        None
    } else {
        let flags = ctx.cb_flags() | crate::programs::STATE_CB_FLAG;
        let _ = ctx.set_cb_flags(flags as i32);
        Some(t)
    }
}

#[inline(always)]
fn bump(key: &SvcKey) {
    let ptr = match SERVICE_COUNTERS.get_ptr_mut(key) {
        Some(p) => p,
        None => {
            let _ = SERVICE_COUNTERS.insert(key, SvcCounters::default(), u64::from(BPF_NOEXIST));
            match SERVICE_COUNTERS.get_ptr_mut(key) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: per-CPU value of this CPU; no other program touches it concurrently.
    unsafe { (*ptr).translated += 1 };
}
