//! Every type that crosses the kernel/user boundary of spright's datapath.
//!
//! Compiled by the kernel programs (`no_std`, bpfel) and by user space (with the
//! `user` feature, which adds `aya::Pod` impls). All structs are `#[repr(C)]`,
//! `Copy`, with explicit padding and no `bool`/enum fields; their sizes and
//! offsets are checked by the host tests below.
//!
//! Pinned layouts only grow: never reorder or reuse a field. A change that cannot
//! be appended gets a new pinned name (`_v2`) and a migration.
#![no_std]

/// Names of the maps and programs in the object and of the pins in the bpffs
/// directory. BPF object names are limited to 15 bytes.
pub mod names {
    /// Sockhash of accelerated sockets, keyed by [`super::SockKey`].
    pub const SOCKHASH: &str = "spr_socks_v1";
    /// Local mesh endpoints: [`super::Addr`] → [`super::EndpointValue`].
    pub const ENDPOINTS: &str = "spr_endpts_v1";
    /// Explicit chain-to-chain allows: [`super::ChainPair`] → `u32` (non-zero = allow).
    pub const CHAIN_ALLOW: &str = "spr_allow_v1";
    /// Per-CPU counters per local endpoint: [`super::Addr`] → [`super::Counters`].
    pub const COUNTERS: &str = "spr_counters_v1";
    /// Sockets that must stay on the TCP path for the rest of their life:
    /// [`super::SockKey`] → `u32`. LRU, so entries of closed sockets age out.
    pub const TCP_ONLY: &str = "spr_tcponly_v1";
    /// The kernel memory bound: `u64` array, see [`super::bound`].
    pub const BOUND: &str = "spr_bound_v1";
    /// Read-only global of the sk_msg program: offset of
    /// `sk_backlog.rmem_alloc` in `struct sock` on the running kernel (from
    /// its BTF), set by the loader; 0 when unknown, which turns the kernel
    /// bound off.
    pub const RMEM_OFFSET_GLOBAL: &str = "SPR_RMEM_OFF";
    /// Read-only global of the sk_msg program: offset of `sk_redir` in the
    /// kernel's `struct sk_msg`, like [`RMEM_OFFSET_GLOBAL`].
    pub const REDIR_OFFSET_GLOBAL: &str = "SPR_REDIR_OFF";
    /// The sockops program (function name in the object).
    pub const SOCKOPS_PROG: &str = "spright_sockops";
    /// The sk_msg program (function name in the object).
    pub const SK_MSG_PROG: &str = "spright_sk_msg";
    /// Pin of the sockops cgroup link. Written last: its presence means the
    /// datapath is fully installed in this pin directory.
    pub const SOCKOPS_LINK_PIN: &str = "spr_sockops_link_v1";
    /// Pin of the sk_msg program (attached to the sockhash, which keeps it alive).
    pub const SK_MSG_PROG_PIN: &str = "spr_sk_msg_v1";
    /// Chain pods by network namespace: netns cookie (`u64`) →
    /// [`super::EndpointValue`]. Identifies the caller at `connect()`, when
    /// its socket has no source address yet.
    pub const NETNS: &str = "spr_netns_v1";
    /// Service table: [`super::SvcKey`] → [`super::SvcValue`] (the node-local
    /// backends a caller of one chain may be sent to).
    pub const SERVICES: &str = "spr_svc_v1";
    /// Translated connections: socket cookie (`u64`) → [`super::Translation`].
    /// LRU; sockops deletes an entry when its socket closes.
    pub const TRANSLATIONS: &str = "spr_xlate_v1";
    /// Per-CPU translation counters: [`super::SvcKey`] → [`super::SvcCounters`].
    pub const SERVICE_COUNTERS: &str = "spr_svcstats_v1";
    /// The connect/getpeername programs (function names in the object), each
    /// with the pin of its cgroup link.
    pub const SOCK_ADDR_PROGS: [(&str, &str); 4] = [
        ("spright_connect4", "spr_connect4_link_v1"),
        ("spright_connect6", "spr_connect6_link_v1"),
        ("spright_getpeername4", "spr_getpeer4_link_v1"),
        ("spright_getpeername6", "spr_getpeer6_link_v1"),
    ];
    /// Flow events ([`super::FlowEvent`]), a ring buffer meshd reads.
    pub const FLOWS: &str = "spr_flows_v1";
    /// Per-socket state of chain-pod connections for their flow events:
    /// [`super::SockKey`] → [`super::FlowState`]. LRU.
    pub const FLOW_STATE: &str = "spr_flowst_v1";
    /// Flow events lost because the ring buffer was full: per-CPU array of
    /// one `u64`.
    pub const FLOWS_LOST: &str = "spr_flowlost_v1";
    /// Node-wide switches of the programs: an array of one `u32` of
    /// `CONFIG_*` flags, written by meshd.
    pub const CONFIG: &str = "spr_config_v1";
    /// The splice guard (cgroup LSM `file_permission`): state and counters,
    /// a `u64` array, see [`super::guard`].
    pub const GUARD: &str = "spr_guard_v1";
    /// The splice guard program (function name in the object).
    pub const GUARD_PROG: &str = "spright_splice_guard";
    /// Pin of the splice guard's cgroup link.
    pub const GUARD_LINK_PIN: &str = "spr_guard_link_v1";
    /// Read-only globals of the splice guard, set by the loader from the
    /// running kernel's BTF and architecture (0: unknown, the guard stays
    /// inert): the offset of the syscall number in `struct pt_regs`, the
    /// syscall numbers of `splice` and `sendfile`, the offset of `sk` in
    /// `struct socket` and of `sk_user_data` in `struct sock`.
    pub const GUARD_SYSNR_OFFSET_GLOBAL: &str = "SPR_GUARD_SYSNR_OFF";
    /// See [`GUARD_SYSNR_OFFSET_GLOBAL`].
    pub const GUARD_NR_SPLICE_GLOBAL: &str = "SPR_GUARD_NR_SPLICE";
    /// See [`GUARD_SYSNR_OFFSET_GLOBAL`].
    pub const GUARD_NR_SENDFILE_GLOBAL: &str = "SPR_GUARD_NR_SENDFILE";
    /// See [`GUARD_SYSNR_OFFSET_GLOBAL`].
    pub const GUARD_SOCK_SK_OFFSET_GLOBAL: &str = "SPR_GUARD_SK_OFF";
    /// See [`GUARD_SYSNR_OFFSET_GLOBAL`].
    pub const GUARD_USER_DATA_OFFSET_GLOBAL: &str = "SPR_GUARD_UDATA_OFF";
    /// Every map that is pinned by name.
    pub const PINNED_MAPS: [&str; 15] = [
        SOCKHASH,
        ENDPOINTS,
        CHAIN_ALLOW,
        COUNTERS,
        TCP_ONLY,
        NETNS,
        SERVICES,
        TRANSLATIONS,
        SERVICE_COUNTERS,
        FLOWS,
        FLOW_STATE,
        FLOWS_LOST,
        CONFIG,
        BOUND,
        GUARD,
    ];
}

/// `spr_config_v1` flag: no flow events (no ring-buffer writes and no
/// per-socket flow state; meshd's `--flow-events=false`).
pub const CONFIG_NO_FLOW_EVENTS: u32 = 1 << 0;
/// `spr_config_v1` flag: the splice guard lets every call through. meshd
/// sets it when its self-test finds that this kernel's redirect path serves
/// `splice()` itself, so refusing it would only cost the fallback.
pub const CONFIG_NO_SPLICE_GUARD: u32 = 1 << 1;
/// `spr_config_v1` flag: sockops redirects no new connection (established
/// ones keep their path). Set when a syscall family would lose data on the
/// redirect path and nothing mitigates it on this kernel (the loader when it
/// cannot attach the splice guard; meshd from its self-test), unless the
/// admin accepted that family.
pub const CONFIG_NO_REDIRECT: u32 = 1 << 2;

/// Slots of the [`names::GUARD`] array.
pub mod guard {
    /// 1 when the loader attached the splice guard with everything it needs
    /// from this kernel (offsets, syscall numbers); 0 when the guard is
    /// missing or inert. Attached is not the same as effective: a kernel
    /// whose active LSMs lack `bpf` never calls it, which only meshd's
    /// self-test can tell.
    pub const ARMED: u32 = 0;
    /// `splice()`/`sendfile()` calls the guard refused with EINVAL (atomic).
    pub const REFUSED: u32 = 1;
    /// Number of slots.
    pub const SLOTS: u32 = 2;
    /// `MAY_READ` in the `file_permission` hook's mask.
    pub const MAY_READ: u32 = 4;
    /// `SK_USER_DATA_PSOCK`: the bit of `sk_user_data` that marks a socket
    /// with a sockmap psock (since Linux 6.0).
    pub const SK_USER_DATA_PSOCK: u64 = 4;
    /// The error a refused call returns: what Go's and HAProxy's splice
    /// code take for "not supported here, copy instead" (no byte consumed).
    pub const EINVAL: i32 = 22;
}

/// Slots of the [`names::BOUND`] array.
pub mod bound {
    /// The limit in bytes of a receiver's queued memory (`sk_rmem_alloc`)
    /// past which sk_msg sends a connection's messages over TCP instead of
    /// redirecting them; 0 = no kernel bound. Written by meshd.
    pub const LIMIT: u32 = 0;
    /// The receiver's queued memory when sk_msg last switched a connection.
    pub const LAST_SWITCH_BYTES: u32 = 1;
    /// The offset the attached sk_msg program was loaded with
    /// ([`super::names::RMEM_OFFSET_GLOBAL`]), written by the loader when it
    /// attaches it: 0 means that program cannot enforce the bound.
    pub const RMEM_OFFSET: u32 = 2;
    /// Connections sk_msg moved to TCP (atomic; all endpoints, including
    /// those whose counters were since removed).
    pub const SWITCHES: u32 = 3;
    /// Number of slots.
    pub const SLOTS: u32 = 4;
    /// The helper id the sk_msg program calls in place of the kfunc
    /// `bpf_cast_to_kern_ctx`; the loader rewrites each such call into a
    /// kfunc call (aya has no kfunc relocations). Never a real helper id.
    pub const KERN_CTX_PLACEHOLDER: u32 = 0x5350_4b31;
}

/// Capacities of the maps.
pub mod limits {
    /// Accelerated sockets per node (two per connection).
    pub const MAX_SOCKETS: u32 = 65_536;
    /// Local endpoints (pod addresses) per node.
    pub const MAX_ENDPOINTS: u32 = 4_096;
    /// Explicit chain-pair allows per node.
    pub const MAX_CHAIN_ALLOWS: u32 = 1_024;
    /// (Service address, port, caller chain) entries per node.
    pub const MAX_SERVICES: u32 = 16_384;
    /// Bytes of the flow-event ring buffer (a power of two and a multiple
    /// of the page size): about 2,700 events.
    pub const FLOW_RING_BYTES: u32 = 256 * 1024;
    /// Node-local backends per service port and caller chain.
    pub const MAX_BACKENDS: usize = 16;
}

/// `IPPROTO_TCP`, the only protocol the service table translates.
pub const IPPROTO_TCP: u32 = 6;

/// Endpoint flag: never redirect this endpoint's connections (opt-out).
pub const ENDPOINT_FLAG_NO_REDIRECT: u32 = 1 << 0;

/// `AF_INET` as the kernel reports it in sock_ops / sk_msg contexts.
pub const AF_INET: u32 = 2;
/// `AF_INET6` as the kernel reports it in sock_ops / sk_msg contexts.
pub const AF_INET6: u32 = 10;

/// An IP address as four 32-bit words in network byte order (exactly the
/// layout of `local_ip6`/`remote_ip6` in the kernel contexts).
///
/// IPv4 addresses are stored IPv4-mapped (`::ffff:a.b.c.d`), so that an IPv4
/// socket and the accepted socket of a dual-stack `[::]` listener build the
/// same keys.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub words: [u32; 4],
}

/// The third word of an IPv4-mapped address (`0000:ffff`) in network order.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr {
    /// From an IPv4 address as the kernel gives it (network order in a `u32`).
    #[inline(always)]
    #[must_use]
    pub const fn from_ipv4_raw(raw: u32) -> Self {
        Self {
            words: [0, 0, V4_MAPPED_WORD, raw],
        }
    }

    /// From an IPv6 address as the kernel gives it (four network-order words).
    #[inline(always)]
    #[must_use]
    pub const fn from_ipv6_raw(words: [u32; 4]) -> Self {
        Self { words }
    }

    /// From the 16 octets of an IPv6 address (IPv4-mapped for IPv4).
    #[must_use]
    pub const fn from_octets(o: [u8; 16]) -> Self {
        Self {
            words: [
                u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
                u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
                u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
                u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
            ],
        }
    }

    /// The 16 octets of the address (IPv4-mapped for IPv4).
    #[must_use]
    pub const fn octets(&self) -> [u8; 16] {
        let [a, b, c, d] = self.words;
        let (a, b, c, d) = (
            a.to_ne_bytes(),
            b.to_ne_bytes(),
            c.to_ne_bytes(),
            d.to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }

    /// Whether this is an IPv4-mapped address.
    #[must_use]
    pub const fn is_ipv4_mapped(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == V4_MAPPED_WORD
    }
}

/// Key of the sockhash: one socket, seen from its own side. Only sockets whose
/// both ends are recorded local endpoints are inserted, and pod addresses are
/// unique on a node, so the key is node-unique (unlike a bare 4-tuple, which
/// repeats across network namespaces, e.g. 127.0.0.1 in every pod).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub local: Addr,
    pub remote: Addr,
    /// Host byte order.
    pub local_port: u32,
    /// Host byte order.
    pub remote_port: u32,
}

impl SockKey {
    /// The key under which the peer socket of this connection is stored.
    #[inline(always)]
    #[must_use]
    pub const fn reversed(&self) -> Self {
        Self {
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Converts a context's `remote_port` (network order in the upper 16 bits of
/// the `u32`, kernel ≥ 5.x) into a host-order port.
#[inline(always)]
#[must_use]
pub const fn remote_port_to_host(raw: u32) -> u32 {
    u16::from_be((raw >> 16) as u16) as u32
}

/// Value of the endpoint map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointValue {
    /// [`chain_id`] of the endpoint's chain; 0 = not in any chain.
    pub chain_id: u64,
    /// `ENDPOINT_FLAG_*` bits.
    pub flags: u32,
    pub reserved: u32,
}

impl EndpointValue {
    /// Whether a connection between `self` and `peer` is redirected by chain
    /// membership alone (same non-zero chain, neither side opted out). Explicit
    /// allows between different chains are looked up by the caller.
    #[inline(always)]
    #[must_use]
    pub const fn same_chain_as(&self, peer: &Self) -> bool {
        self.chain_id != 0 && self.chain_id == peer.chain_id
    }

    /// Whether this endpoint opted out of redirection.
    #[inline(always)]
    #[must_use]
    pub const fn opted_out(&self) -> bool {
        self.flags & ENDPOINT_FLAG_NO_REDIRECT != 0
    }
}

/// The sockops policy's verdict on a new connection between a `local` and a
/// `remote` address, with the reason. The kernel program redirects exactly
/// when [`Verdict::redirects`]; `spright explain` calls the same function on
/// the same map entries, so its answer is the program's, not a copy of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Verdict {
    /// Both ends are endpoints of the same chain.
    SameChain = 0,
    /// Different chains that are explicitly allowed to talk.
    AllowedChains = 1,
    /// This end's address is not a recorded endpoint of this node.
    LocalNotEndpoint = 2,
    /// The peer's address is not a recorded endpoint of this node (another
    /// node, the host, a Service address that was not translated).
    RemoteNotEndpoint = 3,
    /// This end opted out (`spright.dev/redirect: off`, or it left its chain).
    LocalOptedOut = 4,
    /// The peer opted out.
    RemoteOptedOut = 5,
    /// An end is a recorded pod in no chain.
    NotInChain = 6,
    /// The ends are in different chains that are not allowed to talk.
    OtherChain = 7,
    /// Policy would redirect, but redirects are off on this node
    /// ([`CONFIG_NO_REDIRECT`]): a syscall family would lose data on this
    /// kernel's redirect path and nothing mitigates it.
    NodeUnsafe = 8,
}

impl Verdict {
    /// Whether the connection is redirected socket to socket.
    #[inline(always)]
    #[must_use]
    pub const fn redirects(self) -> bool {
        matches!(self, Self::SameChain | Self::AllowedChains)
    }

    /// The verdict of a code (`Verdict as u32`), as flow events carry it.
    #[must_use]
    pub const fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => Self::SameChain,
            1 => Self::AllowedChains,
            2 => Self::LocalNotEndpoint,
            3 => Self::RemoteNotEndpoint,
            4 => Self::LocalOptedOut,
            5 => Self::RemoteOptedOut,
            6 => Self::NotInChain,
            7 => Self::OtherChain,
            8 => Self::NodeUnsafe,
            _ => return None,
        })
    }

    /// The reason in words.
    #[must_use]
    pub const fn reason(self) -> &'static str {
        match self {
            Self::SameChain => "both ends are in the same chain",
            Self::AllowedChains => "the two chains are allowed to talk",
            Self::LocalNotEndpoint => "the source is not a chain pod recorded on this node",
            Self::RemoteNotEndpoint => {
                "the destination is not a pod recorded on this node (another node, the host, or an untranslated Service address)"
            }
            Self::LocalOptedOut => {
                "the source opted out (spright.dev/redirect: off) or left its chain"
            }
            Self::RemoteOptedOut => {
                "the destination opted out (spright.dev/redirect: off) or left its chain"
            }
            Self::NotInChain => "one end is in no chain (no spright.dev/chain annotation)",
            Self::OtherChain => "the ends are in different chains that are not allowed to talk",
            Self::NodeUnsafe => {
                "redirects are off on this node: a syscall family would lose data on this kernel's redirect path and nothing mitigates it (spright status, kernel self-test)"
            }
        }
    }
}

/// The sockops policy: both ends are recorded local endpoints, neither opted
/// out, and they are in the same chain or in chains `allowed` to talk.
#[inline(always)]
pub fn verdict(
    local: Option<EndpointValue>,
    remote: Option<EndpointValue>,
    allowed: impl FnOnce(ChainPair) -> bool,
) -> Verdict {
    let Some(l) = local else {
        return Verdict::LocalNotEndpoint;
    };
    let Some(r) = remote else {
        return Verdict::RemoteNotEndpoint;
    };
    if l.opted_out() {
        return Verdict::LocalOptedOut;
    }
    if r.opted_out() {
        return Verdict::RemoteOptedOut;
    }
    if l.same_chain_as(&r) {
        return Verdict::SameChain;
    }
    if l.chain_id == 0 || r.chain_id == 0 {
        return Verdict::NotInChain;
    }
    if allowed(ChainPair {
        from: l.chain_id,
        to: r.chain_id,
    }) {
        Verdict::AllowedChains
    } else {
        Verdict::OtherChain
    }
}

/// Why a `connect()` is or is not translated from a Service address to a
/// node-local backend (the connect programs' decision, shared like
/// [`Verdict`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Translate {
    /// Sent to a node-local backend of the caller's chain.
    Translated = 0,
    /// The caller's network namespace is not a recorded pod of this node.
    CallerNotEndpoint = 1,
    /// The caller is in no chain.
    CallerNotInChain = 2,
    /// The caller opted out or left its chain.
    CallerOptedOut = 3,
    /// The address and port are not a Service port with a node-local
    /// backend of the caller's chain (kube-proxy handles it).
    NoLocalBackend = 4,
}

impl Translate {
    /// The reason in words.
    #[must_use]
    pub const fn reason(self) -> &'static str {
        match self {
            Self::Translated => "a Service port with a node-local backend of the caller's chain",
            Self::CallerNotEndpoint => "the caller is not a pod recorded on this node",
            Self::CallerNotInChain => "the caller is in no chain",
            Self::CallerOptedOut => "the caller opted out or left its chain",
            Self::NoLocalBackend => {
                "not a Service port with a node-local backend of the caller's chain (kube-proxy handles it)"
            }
        }
    }
}

/// The caller's part of the translation decision: the chain whose service
/// table a `connect()` from `caller` (the network namespace's entry) looks
/// in, or why it is not translated at all.
#[inline(always)]
pub fn translation_chain(caller: Option<EndpointValue>) -> Result<u64, Translate> {
    match caller {
        None => Err(Translate::CallerNotEndpoint),
        Some(c) if c.chain_id == 0 => Err(Translate::CallerNotInChain),
        Some(c) if c.opted_out() => Err(Translate::CallerOptedOut),
        Some(c) => Ok(c.chain_id),
    }
}

/// Key of the chain-allow map: an ordered pair of chain ids. User space inserts
/// both orders.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChainPair {
    pub from: u64,
    pub to: u64,
}

/// Key of the service table: one port of one Service address, as seen by
/// callers of one chain.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    /// The Service (cluster) address; IPv4 stored IPv4-mapped.
    pub addr: Addr,
    /// Host byte order.
    pub port: u32,
    /// [`IPPROTO_TCP`].
    pub proto: u32,
    /// [`chain_id`] of the calling pod's chain.
    pub chain_id: u64,
}

/// One backend of a Service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Pod address, same family as the Service address.
    pub addr: Addr,
    /// Host byte order.
    pub port: u32,
    pub reserved: u32,
}

/// Value of the service table: the backends a connection may be sent to,
/// all node-local endpoints the caller's chain may reach.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcValue {
    /// Valid entries at the front of `backends` (1..=[`limits::MAX_BACKENDS`]).
    pub count: u32,
    pub reserved: u32,
    pub backends: [Backend; limits::MAX_BACKENDS],
}

/// A connection whose destination was translated at `connect()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    /// What the application dialled (and sees from `getpeername`).
    pub service: Addr,
    /// Where the connection really goes.
    pub backend: Addr,
    /// Host byte order.
    pub service_port: u32,
    /// Host byte order.
    pub backend_port: u32,
    /// Network namespace cookie of the caller.
    pub netns_cookie: u64,
}

/// Per-CPU counters of one service table entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcCounters {
    /// Connections whose destination was translated.
    pub translated: u64,
    pub reserved: [u64; 3],
}

/// Per-endpoint counters (per-CPU; user space sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Messages sent by this endpoint that went socket to socket.
    pub redirected_msgs: u64,
    pub redirected_bytes: u64,
    /// Messages of accelerated sockets that took the TCP path (peer not in the map).
    pub fallback_msgs: u64,
    pub fallback_bytes: u64,
    /// Sockets of this endpoint inserted into the sockhash.
    pub accelerated_socks: u64,
    /// Connections of this endpoint that sk_msg moved to the TCP path
    /// because the receiver already held more than the memory bound
    /// ([`names::BOUND`]). Took the place of `reserved[0]`: same layout.
    pub bound_switches: u64,
    pub reserved: [u64; 2],
}

impl Counters {
    /// Field-wise sum, for folding per-CPU values.
    #[must_use]
    pub const fn plus(&self, o: &Self) -> Self {
        Self {
            redirected_msgs: self.redirected_msgs + o.redirected_msgs,
            redirected_bytes: self.redirected_bytes + o.redirected_bytes,
            fallback_msgs: self.fallback_msgs + o.fallback_msgs,
            fallback_bytes: self.fallback_bytes + o.fallback_bytes,
            accelerated_socks: self.accelerated_socks + o.accelerated_socks,
            bound_switches: self.bound_switches + o.bound_switches,
            reserved: [0; 2],
        }
    }
}

/// Flow events: what the kernel programs did with one chain-pod connection.
///
/// A connection is reported once, by one of its two sockets (the
/// *reporter*): the connecting socket when its pod is a recorded endpoint,
/// otherwise the accepting one when its client is not. `OPEN` comes at
/// establishment with the policy's [`Verdict`], `TCP_SWITCH` when a
/// redirected connection moved to TCP, `CLOSE` with the bytes each way.
pub mod flow {
    /// Established: `reason` is the [`super::Verdict`] code.
    pub const OPEN: u32 = 1;
    /// Closed: `bytes_sent` and `bytes_received` are final payload bytes
    /// (without the SYN and FIN sequence numbers); `reason` is the TCP
    /// state the socket closed from (`BPF_TCP_*`).
    pub const CLOSE: u32 = 2;
    /// A redirected connection's socket moved to the TCP path: `reason` is
    /// one of the `SWITCH_*` codes below. Sent by the socket that moved,
    /// which need not be the reporter.
    pub const TCP_SWITCH: u32 = 3;
    /// `flags`: the reporting socket called `connect()`.
    pub const ACTIVE: u32 = 1 << 0;
    /// `flags`: the connection went into the sockhash (socket to socket).
    pub const REDIRECTED: u32 = 1 << 1;
    /// `flags`: the destination was a Service address, translated to a
    /// node-local backend (`service`, `service_port`).
    pub const TRANSLATED: u32 = 1 << 2;
    /// Switch reason: the peer socket was not in the sockhash when this
    /// socket sent (the peer had closed, or was never inserted).
    pub const SWITCH_PEER_MISSING: u32 = 1;
    /// Switch reason: the memory bound moved the socket (sk_msg reports
    /// it; with meshd's poll instead, meshd does).
    pub const SWITCH_MEMORY_BOUND: u32 = 2;
    /// Not a kernel event: meshd found an established connection between
    /// two pods the policy would redirect that never passed sockops (it was
    /// established before the programs were attached).
    pub const BEFORE_ATTACH: u32 = 100;
}

/// One flow event, as the kernel writes it into the `spr_flows_v1` ring
/// buffer. `key` is the sending socket's view (local = its own address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// [`flow::OPEN`], [`flow::CLOSE`] or [`flow::TCP_SWITCH`].
    pub kind: u32,
    /// `flow::ACTIVE | REDIRECTED | TRANSLATED`.
    pub flags: u32,
    /// The [`Verdict`] code (`OPEN`) or the `SWITCH_*` code.
    pub reason: u32,
    pub reserved: u32,
    pub key: SockKey,
    /// The Service address and port the caller dialled, when `TRANSLATED`.
    pub service: Addr,
    pub service_port: u32,
    pub reserved2: u32,
    /// `CLOSE`: bytes the reporting socket sent and received, on either path.
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl FlowEvent {
    /// Size of an event in the ring buffer.
    pub const SIZE: usize = size_of::<Self>();

    /// Parses an event from the ring buffer's bytes (native endian, the
    /// layout above); `None` if `b` is too short.
    #[must_use]
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        let u32_at = |o: usize| {
            let mut a = [0; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_ne_bytes(a)
        };
        let u64_at = |o: usize| {
            let mut a = [0; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_ne_bytes(a)
        };
        let addr_at = |o: usize| Addr {
            words: [u32_at(o), u32_at(o + 4), u32_at(o + 8), u32_at(o + 12)],
        };
        Some(Self {
            kind: u32_at(0),
            flags: u32_at(4),
            reason: u32_at(8),
            reserved: 0,
            key: SockKey {
                local: addr_at(16),
                remote: addr_at(32),
                local_port: u32_at(48),
                remote_port: u32_at(52),
            },
            service: addr_at(56),
            service_port: u32_at(72),
            reserved2: 0,
            bytes_sent: u64_at(80),
            bytes_received: u64_at(88),
        })
    }
}

/// Per-socket flow state (`spr_flowst_v1`), written at establishment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// Bytes this socket's messages carried socket to socket (sk_msg);
    /// the TCP path's bytes are the socket's own `bytes_acked`.
    pub sent_redirected: u64,
    /// Non-zero on the socket that reports the connection.
    pub reporter: u32,
    pub reserved: u32,
}

/// Chain identifier of chain `chain` in pod namespace `namespace` (chains are
/// namespaced): 64-bit FNV-1a of `namespace/chain`, never 0.
#[must_use]
pub const fn chain_id(namespace: &str, chain: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    const fn feed(mut h: u64, bytes: &[u8]) -> u64 {
        let mut i = 0;
        while i < bytes.len() {
            h ^= bytes[i] as u64;
            h = h.wrapping_mul(PRIME);
            i += 1;
        }
        h
    }
    let h = feed(
        feed(feed(OFFSET, namespace.as_bytes()), b"/"),
        chain.as_bytes(),
    );
    if h == 0 { 1 } else { h }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, made of integers only, with no
    // implicit padding (checked by the layout tests), so any bit pattern is valid.
    unsafe impl aya::Pod for super::Addr {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::EndpointValue {}
    unsafe impl aya::Pod for super::ChainPair {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::SvcKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::SvcValue {}
    unsafe impl aya::Pod for super::Translation {}
    unsafe impl aya::Pod for super::SvcCounters {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::FlowState {}
}

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn layouts_are_stable_and_unpadded() {
        assert_eq!(size_of::<Addr>(), 16);
        assert_eq!(size_of::<SockKey>(), 40);
        assert_eq!(offset_of!(SockKey, remote), 16);
        assert_eq!(offset_of!(SockKey, local_port), 32);
        assert_eq!(offset_of!(SockKey, remote_port), 36);
        assert_eq!(size_of::<EndpointValue>(), 16);
        assert_eq!(offset_of!(EndpointValue, flags), 8);
        assert_eq!(size_of::<ChainPair>(), 16);
        assert_eq!(size_of::<Counters>(), 64);
        assert_eq!(offset_of!(Counters, accelerated_socks), 32);
        assert_eq!(size_of::<SvcKey>(), 32);
        assert_eq!(offset_of!(SvcKey, chain_id), 24);
        assert_eq!(size_of::<Backend>(), 24);
        assert_eq!(size_of::<SvcValue>(), 8 + 24 * limits::MAX_BACKENDS);
        assert_eq!(size_of::<Translation>(), 48);
        assert_eq!(offset_of!(Translation, netns_cookie), 40);
        assert_eq!(size_of::<SvcCounters>(), 32);
        assert_eq!(size_of::<FlowEvent>(), 96);
        assert_eq!(offset_of!(FlowEvent, key), 16);
        assert_eq!(offset_of!(FlowEvent, service), 56);
        assert_eq!(offset_of!(FlowEvent, service_port), 72);
        assert_eq!(offset_of!(FlowEvent, bytes_sent), 80);
        assert_eq!(size_of::<FlowState>(), 16);
    }

    #[test]
    fn flow_events_parse_from_their_bytes() {
        let e = FlowEvent {
            kind: flow::CLOSE,
            flags: flow::ACTIVE | flow::TRANSLATED,
            reason: Verdict::SameChain as u32,
            reserved: 0,
            key: SockKey {
                local: Addr::from_ipv4_raw(u32::from_ne_bytes([10, 0, 0, 1])),
                remote: Addr::from_ipv4_raw(u32::from_ne_bytes([10, 0, 0, 2])),
                local_port: 40_000,
                remote_port: 8080,
            },
            service: Addr::from_ipv4_raw(u32::from_ne_bytes([10, 96, 0, 10])),
            service_port: 80,
            reserved2: 0,
            bytes_sent: (1 << 40) + 3,
            bytes_received: 65_536,
        };
        // SAFETY: FlowEvent is repr(C), made of integers, with no padding.
        let bytes: [u8; FlowEvent::SIZE] = unsafe { core::mem::transmute(e) };
        assert_eq!(FlowEvent::from_bytes(&bytes), Some(e));
        assert_eq!(FlowEvent::from_bytes(&bytes[..95]), None);
    }

    #[test]
    fn ipv4_and_mapped_ipv6_give_the_same_addr() {
        let v4 = Addr::from_ipv4_raw(u32::from_ne_bytes([10, 1, 2, 3]));
        let mapped = Addr::from_octets([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]);
        assert_eq!(v4, mapped);
        assert!(v4.is_ipv4_mapped());
        assert_eq!(Addr::from_octets(v4.octets()), v4);
        let v6 = Addr::from_octets([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(!v6.is_ipv4_mapped());
    }

    #[test]
    fn reversed_key_swaps_both_ends() {
        let k = SockKey {
            local: Addr::from_ipv4_raw(1),
            remote: Addr::from_ipv4_raw(2),
            local_port: 40000,
            remote_port: 8080,
        };
        let r = k.reversed();
        assert_eq!(
            (r.local, r.remote, r.local_port, r.remote_port),
            (k.remote, k.local, 8080, 40000)
        );
        assert_eq!(r.reversed(), k);
    }

    #[test]
    fn remote_port_is_network_order_in_upper_half() {
        // Port 8080 = 0x1f90, network order bytes 1f 90; on a little-endian host
        // the kernel's u32 holds 0x901f_0000.
        let raw = u32::from(8080u16.to_be()) << 16;
        assert_eq!(remote_port_to_host(raw), 8080);
    }

    #[test]
    fn policy_needs_same_nonzero_chain() {
        let a = EndpointValue {
            chain_id: chain_id("default", "shop"),
            ..Default::default()
        };
        let b = EndpointValue {
            chain_id: chain_id("default", "shop"),
            ..Default::default()
        };
        let other_ns = EndpointValue {
            chain_id: chain_id("prod", "shop"),
            ..Default::default()
        };
        let none = EndpointValue::default();
        assert!(a.same_chain_as(&b));
        assert!(!a.same_chain_as(&other_ns));
        assert!(!none.same_chain_as(&none));
        let off = EndpointValue {
            flags: ENDPOINT_FLAG_NO_REDIRECT,
            ..a
        };
        assert!(off.opted_out() && !a.opted_out());
    }

    #[test]
    fn verdicts_name_the_first_reason() {
        let shop = EndpointValue {
            chain_id: chain_id("default", "shop"),
            ..Default::default()
        };
        let cart = EndpointValue {
            chain_id: chain_id("default", "cart"),
            ..Default::default()
        };
        let off = EndpointValue {
            flags: ENDPOINT_FLAG_NO_REDIRECT,
            ..shop
        };
        let none = EndpointValue::default();
        let no = |_| false;
        assert_eq!(verdict(Some(shop), Some(shop), no), Verdict::SameChain);
        assert_eq!(verdict(None, Some(shop), no), Verdict::LocalNotEndpoint);
        assert_eq!(verdict(Some(shop), None, no), Verdict::RemoteNotEndpoint);
        assert_eq!(verdict(Some(off), Some(shop), no), Verdict::LocalOptedOut);
        assert_eq!(verdict(Some(shop), Some(off), no), Verdict::RemoteOptedOut);
        assert_eq!(verdict(Some(none), Some(none), no), Verdict::NotInChain);
        assert_eq!(verdict(Some(shop), Some(cart), no), Verdict::OtherChain);
        assert_eq!(
            verdict(Some(shop), Some(cart), |p: ChainPair| p.from
                == shop.chain_id),
            Verdict::AllowedChains
        );
        for v in [Verdict::SameChain, Verdict::AllowedChains] {
            assert!(v.redirects());
        }
        for code in 0..9 {
            assert_eq!(Verdict::from_code(code).map(|v| v as u32), Some(code));
        }
        assert_eq!(Verdict::from_code(9), None);
        assert!(!Verdict::OtherChain.redirects());
        assert!(!Verdict::NodeUnsafe.redirects());
    }

    #[test]
    fn chain_ids_are_namespaced_and_nonzero() {
        assert_ne!(chain_id("a", "bc"), chain_id("ab", "c"));
        assert_ne!(chain_id("default", "x"), 0);
        assert_eq!(chain_id("default", "x"), chain_id("default", "x"));
    }
}
