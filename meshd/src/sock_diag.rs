//! The receive memory of a pod's TCP sockets, from NETLINK_SOCK_DIAG
//! (`INET_DIAG_SKMEMINFO`, what `ss -m` shows as `skmem r`/`rb`), for the
//! memory bound. The messages are `netlink-packet-sock-diag`'s inet_diag v2
//! types and the socket is `netlink-sys`'s, created inside the pod's network
//! namespace (a netlink socket stays in the namespace it was created in).
//! Two questions are asked: every socket of a family that can still receive
//! (a dump), and exactly one socket by its 4-tuple (no dump).

use std::{io, net::IpAddr, path::Path};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};
use nix::sys::{
    socket::{setsockopt, sockopt},
    time::TimeVal,
};
use spright_ebpf::{SockKey, addr_of};

/// One TCP socket of a pod as sock_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DiagSocket {
    pub(crate) local: IpAddr,
    pub(crate) local_port: u16,
    pub(crate) remote: IpAddr,
    pub(crate) remote_port: u16,
    /// `SK_MEMINFO_RMEM_ALLOC` (`ss -m` `r`): includes the redirect queue.
    pub(crate) rmem_alloc: u32,
    /// `SK_MEMINFO_RCVBUF` (`ss -m` `rb`).
    pub(crate) rcvbuf: u32,
}

impl DiagSocket {
    /// The socket's own sockhash key.
    pub(crate) fn key(&self) -> SockKey {
        SockKey {
            local: addr_of(self.local),
            remote: addr_of(self.remote),
            local_port: u32::from(self.local_port),
            remote_port: u32::from(self.remote_port),
        }
    }
}

/// Sockets that can still receive: ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT.
fn receiving() -> StateFlags {
    StateFlags::ESTABLISHED | StateFlags::FIN_WAIT1 | StateFlags::FIN_WAIT2 | StateFlags::CLOSE_WAIT
}

/// `struct nlmsghdr`: a shorter rest of a datagram holds no message.
const NETLINK_HEADER_LEN: usize = 16;

/// A NETLINK_SOCK_DIAG socket of one network namespace.
#[derive(Debug)]
pub(crate) struct SockDiag {
    socket: Socket,
}

impl SockDiag {
    /// A sock_diag socket created inside `netns`.
    pub(crate) fn in_netns(netns: &Path) -> io::Result<Self> {
        spright_endpoint::netns::run_in(netns, Self::here)
    }

    /// A sock_diag socket of the calling thread's network namespace.
    pub(crate) fn here() -> io::Result<Self> {
        let socket = Socket::new(NETLINK_SOCK_DIAG)?;
        // A question unanswered for a second fails (and the poll goes on).
        setsockopt(&socket, sockopt::ReceiveTimeout, &TimeVal::new(1, 0))?;
        Ok(Self { socket })
    }

    /// One socket of the namespace, by its sockhash key (`None` when it no
    /// longer exists). Asked as AF_INET6: the kernel looks an IPv4-mapped
    /// 4-tuple up among IPv4 sockets, so this finds IPv4 sockets, IPv6 ones
    /// and dual-stack ones alike.
    pub(crate) fn lookup(&self, seq: u32, key: &SockKey) -> io::Result<Option<DiagSocket>> {
        self.socket.send(&request_one(seq, key), 0)?;
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::new();
        // One reply: the socket, or an error. Stale replies (other seq) skipped.
        for _ in 0..16 {
            let n = self.socket.recv(&mut &mut buf[..], 0)?;
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

    /// Every TCP socket (IPv4 and IPv6) of the namespace that can still receive.
    pub(crate) fn dump(&self) -> io::Result<Vec<DiagSocket>> {
        let mut out = Vec::new();
        for (seq, family) in [(1u32, AF_INET), (2, AF_INET6)] {
            self.socket.send(&request(seq, family), 0)?;
            let mut buf = vec![0u8; 64 * 1024];
            // Bounded: a dump of n sockets arrives in about n / 100 datagrams.
            for _ in 0..100_000 {
                let n = self.socket.recv(&mut &mut buf[..], 0)?;
                if parse(&buf[..n], seq, &mut out)? {
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// A dump of the TCP sockets of `family` that can still receive, with their
/// memory.
fn request(seq: u32, family: u8) -> Vec<u8> {
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    serialize(
        seq,
        NLM_F_REQUEST | NLM_F_DUMP,
        InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::SKMEMINFO,
            states: receiving(),
            socket_id,
        },
    )
}

/// A request for exactly one socket (no dump), by its own 4-tuple.
fn request_one(seq: u32, key: &SockKey) -> Vec<u8> {
    let port = |p: u32| u16::try_from(p).unwrap_or(0);
    serialize(
        seq,
        NLM_F_REQUEST,
        InetRequest {
            family: AF_INET6,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::SKMEMINFO,
            // An exact lookup ignores the states; all bits, as `ss` sends.
            states: StateFlags::from_bits_retain(u32::MAX),
            socket_id: SocketId {
                source_port: port(key.local_port),
                destination_port: port(key.remote_port),
                source_address: IpAddr::V6(key.local.octets().into()),
                destination_address: IpAddr::V6(key.remote.octets().into()),
                interface_id: 0,   // any interface
                cookie: [0xff; 8], // INET_DIAG_NOCOOKIE
            },
        },
    )
}

fn serialize(seq: u32, flags: u16, request: InetRequest) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
    message.finalize();
    let mut buf = vec![0u8; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

/// Parses one datagram of replies to request `seq` into `out`; true when
/// the dump is done. Messages of other requests are skipped.
fn parse(buf: &[u8], seq: u32, out: &mut Vec<DiagSocket>) -> io::Result<bool> {
    let bad = |e: netlink_packet_core::DecodeError| {
        io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {e}"))
    };
    let mut at = 0;
    while at + NETLINK_HEADER_LEN <= buf.len() {
        let msg = NetlinkBuffer::new_checked(&buf[at..]).map_err(bad)?;
        let len = msg.length() as usize;
        at += len.next_multiple_of(4);
        if msg.sequence_number() != seq {
            continue;
        }
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&msg.into_inner()[..len])
            .map_err(bad)?;
        match msg.payload {
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) => {
                return match e.code {
                    None => Ok(true),
                    Some(_) => Err(e.to_io()),
                };
            }
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                out.push(diag_socket(&r));
            }
            _ => {}
        }
    }
    Ok(false)
}

fn diag_socket(r: &InetResponse) -> DiagSocket {
    let id = &r.header.socket_id;
    let (rmem_alloc, rcvbuf) = r
        .nlas
        .iter()
        .find_map(|nla| match nla {
            Nla::MemInfo(m) => Some((m.receive_queue, m.receive_queue_max)),
            _ => None,
        })
        .unwrap_or((0, 0));
    DiagSocket {
        local: unmapped(id.source_address),
        local_port: id.source_port,
        remote: unmapped(id.destination_address),
        remote_port: id.destination_port,
        rmem_alloc,
        rcvbuf,
    }
}

/// An IPv4-mapped IPv6 address as IPv4.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use netlink_packet_core::{NLMSG_DONE, NLMSG_ERROR};
    use netlink_packet_sock_diag::{INET_DIAG_SKMEMINFO, SOCK_DIAG_BY_FAMILY};

    use super::*;

    /// `struct inet_diag_msg`.
    const INET_DIAG_MSG_LEN: usize = 72;

    fn u16_ne(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }

    fn u32_ne(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    fn nlmsghdr(len: usize, kind: u16, flags: u16, seq: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&u32::try_from(len).unwrap().to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m
    }

    /// A dump datagram as the kernel builds it: one IPv4-mapped IPv6 socket
    /// with a SKMEMINFO attribute, then DONE.
    #[test]
    fn parses_a_dump_with_meminfo() {
        let body_len = INET_DIAG_MSG_LEN + 4 + 9 * 4;
        let len = NETLINK_HEADER_LEN + body_len;
        let mut m = nlmsghdr(len, SOCK_DIAG_BY_FAMILY, 2, 7);
        let mut body = vec![0u8; INET_DIAG_MSG_LEN];
        body[0] = AF_INET6;
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
        m.extend_from_slice(&nlmsghdr(20, NLMSG_DONE, 2, 7));
        m.extend_from_slice(&0i32.to_ne_bytes());
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

    /// What a lookup of a socket that is gone gets back: NLMSG_ERROR, -ENOENT.
    #[test]
    fn an_error_reply_is_the_errno() {
        let mut m = nlmsghdr(36, NLMSG_ERROR, 0, 3);
        m.extend_from_slice(&(-nix::libc::ENOENT).to_ne_bytes());
        m.extend_from_slice(&nlmsghdr(72, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 3));
        let err = parse(&m, 3, &mut Vec::new()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::ENOENT));
    }

    /// Both questions against the kernel, on a loopback connection of this
    /// process (sock_diag answers unprivileged callers about their own
    /// namespace): the receiver's queued bytes show in `rmem_alloc`.
    #[test]
    fn the_kernel_answers_a_lookup_and_a_dump() {
        use std::{
            io::Write as _,
            net::{TcpListener, TcpStream},
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let receiver = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut sender, _) = listener.accept().unwrap();
        sender.write_all(&[7u8; 4096]).unwrap();
        let (local, remote) = (
            receiver.local_addr().unwrap(),
            receiver.peer_addr().unwrap(),
        );
        let key = SockKey {
            local: addr_of(local.ip()),
            remote: addr_of(remote.ip()),
            local_port: u32::from(local.port()),
            remote_port: u32::from(remote.port()),
        };
        let diag = SockDiag::here().unwrap();
        // Loopback delivers at once, but give the softirq a moment.
        let mut found = None;
        for _ in 0..50 {
            found = diag.lookup(11, &key).unwrap();
            if found.is_some_and(|s| s.rmem_alloc > 0) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let found = found.expect("the receiver by its 4-tuple");
        assert_eq!((found.local, found.local_port), (local.ip(), local.port()));
        assert_eq!(
            (found.remote, found.remote_port),
            (remote.ip(), remote.port())
        );
        assert!(found.rmem_alloc >= 4096, "{found:?}");
        assert!(found.rcvbuf > 0, "{found:?}");
        assert_eq!(found.key(), key);
        let dumped = diag.dump().unwrap();
        assert!(dumped.iter().any(|s| s.key() == key), "{dumped:?}");
        // A 4-tuple nobody holds: gone, not an error.
        let gone = SockKey {
            remote_port: 1,
            ..key
        };
        assert_eq!(diag.lookup(12, &gone).unwrap(), None);
    }

    #[test]
    fn request_is_an_inet_diag_dump_asking_for_meminfo() {
        let r = request(5, AF_INET);
        assert_eq!(r.len(), 72);
        assert_eq!(u32_ne(&r, 0), 72);
        assert_eq!(u16_ne(&r, 4), SOCK_DIAG_BY_FAMILY);
        assert_eq!(u16_ne(&r, 6), 0x301);
        assert_eq!(u32_ne(&r, 8), 5);
        assert_eq!(&r[16..20], &[2, 6, 0x40, 0]);
        assert_eq!(
            u32_ne(&r, 20),
            (1 << 1) | (1 << 4) | (1 << 5) | (1 << 8),
            "ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT"
        );
        assert_eq!(&r[24..72], &[0; 48], "struct inet_diag_sockid: no filter");
        assert_eq!(&request(6, AF_INET6)[16..20], &[10, 6, 0x40, 0]);
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
        assert_eq!(u32_ne(&r, 20), u32::MAX);
        // sockid: sport, dport (network order), then the mapped addresses.
        assert_eq!(&r[24..28], &[0x1f, 0x90, 0x9c, 0x40]);
        assert_eq!(&r[28..44], &key.local.octets());
        assert_eq!(&r[44..60], &key.remote.octets());
        assert_eq!(&r[60..64], &[0; 4]);
        assert_eq!(&r[64..72], &[0xff; 8]);
    }
}
