//! `spright-torture`: one socket pattern, one role, one JSON observation.
//!
//! ```text
//! spright-torture [--cgroup DIR] [--netns PATH] server PATTERN --listen ADDR [OPTIONS]
//! spright-torture [--cgroup DIR] [--netns PATH] client PATTERN --connect ADDR [OPTIONS]
//! OPTIONS: --bytes N  --iters N  --trials N  --delay-ms N
//! ```
//!
//! The server prints `ready` once it listens; each role prints one JSON line
//! with what the application observed (byte counts, FNV-1a hashes, return
//! values, errno names, timings, counts). The privileged reliability test runs
//! every pattern over plain TCP and over the redirect path and compares the
//! observations (see docs/RELIABILITY.md for the table).
//!
//! Most patterns use a small framed exchange: the client sends an 8-byte
//! big-endian length and the payload (the deterministic stream of
//! `spright_tests::pattern`), the server replies with the length it received
//! and the FNV-1a hash of the bytes. Blocking reads retry `EAGAIN` and count
//! how often they had to (docs/RELIABILITY.md, documented limit 1), so an observation says
//! both "the data arrived intact" and "the application saw N spurious errors".

use std::{
    io::{self, BufRead as _, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd as _},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout},
        socket::{MsgFlags, recv},
    },
};
use serde_json::{Value, json};
use spright_tests::{fnv1a, pattern, pod::take_opt};

/// Upper bound of every wait in this tool; the test's own timeouts are longer.
const DEADLINE: Duration = Duration::from_secs(30);
const CHUNK: usize = 64 * 1024;

struct Opts {
    bytes: u64,
    iters: u64,
    trials: u64,
    delay: Duration,
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    spright_tests::pod::enter_from_args(&mut args)?;
    let num = |args: &mut Vec<String>, name: &str, default: u64| -> anyhow::Result<u64> {
        take_opt(args, name)?.map_or(Ok(default), |v| {
            v.parse().with_context(|| format!("{name} {v:?}"))
        })
    };
    let opts = Opts {
        bytes: num(&mut args, "--bytes", 1 << 20)?,
        iters: num(&mut args, "--iters", 1000)?,
        trials: num(&mut args, "--trials", 10)?,
        delay: Duration::from_millis(num(&mut args, "--delay-ms", 0)?),
    };
    let listen = take_opt(&mut args, "--listen")?;
    let connect = take_opt(&mut args, "--connect")?;
    let (role, pat) = match args.as_slice() {
        [r, p] => (r.clone(), p.clone()),
        _ => bail!("expected ROLE PATTERN, got {args:?}"),
    };
    let report = match (role.as_str(), listen, connect) {
        ("server", Some(l), None) => {
            let addr: SocketAddr = l.parse().with_context(|| format!("--listen {l:?}"))?;
            let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            println!("ready");
            io::stdout().flush()?;
            server(&pat, &listener, &opts)?
        }
        ("client", None, Some(c)) => {
            let addr: SocketAddr = c.parse().with_context(|| format!("--connect {c:?}"))?;
            client(&pat, addr, &opts)?
        }
        _ => bail!("server needs --listen, client needs --connect"),
    };
    println!("{report}");
    Ok(())
}

fn accept(l: &TcpListener) -> anyhow::Result<TcpStream> {
    Ok(l.accept().context("accepting")?.0)
}

fn server(pat: &str, l: &TcpListener, o: &Opts) -> anyhow::Result<Value> {
    Ok(match pat {
        "pingpong" => {
            let mut s = accept(l)?;
            let mut buf = [0u8; 64];
            let (mut msgs, mut eagain) = (0u64, 0u64);
            loop {
                let (n, e) = read_full(&mut s, &mut buf)?;
                eagain += e;
                if n < buf.len() {
                    break;
                }
                s.write_all(&buf)?;
                msgs += 1;
            }
            json!({"msgs": msgs, "eagain": eagain})
        }
        "basic" | "sendfile" | "splice-send" | "zerocopy" | "bigwrite" | "waitall-slow" => {
            // Serves framed requests until the client closes (several for `basic`).
            let mut s = accept(l)?;
            let mut served = Vec::new();
            while let Some(r) = serve_framed(&mut s, Recv::Read)? {
                served.push(r);
            }
            json!({"requests": served})
        }
        "epoll-lt" | "epoll-et" | "poll" => {
            let mut s = accept(l)?;
            let how = match pat {
                "epoll-lt" => Recv::Epoll { edge: false },
                "epoll-et" => Recv::Epoll { edge: true },
                _ => Recv::Poll,
            };
            serve_framed(&mut s, how)?.context("no request")?
        }
        "splice-recv" => {
            let mut s = accept(l)?;
            serve_framed(&mut s, Recv::Splice)?.context("no request")?
        }
        "waitall" => {
            let mut s = accept(l)?;
            let mut len = [0u8; 8];
            read_full(&mut s, &mut len)?;
            let want = usize::try_from(u64::from_be_bytes(len))?;
            let mut buf = vec![0u8; want];
            let first = recv(s.as_raw_fd(), &mut buf, MsgFlags::MSG_WAITALL);
            let got = *first.as_ref().unwrap_or(&0);
            let (rest, eagain) = read_full(&mut s, &mut buf[got..])?;
            let h = fnv1a::feed(fnv1a::START, &buf[..got + rest]);
            reply(&mut s, (got + rest) as u64, h)?;
            json!({"first_recv": outcome(&first), "bytes": got + rest, "hash": h, "eagain": eagain})
        }
        "duplex" => {
            let s = accept(l)?;
            duplex(&s, o.bytes)?
        }
        "halfclose" => {
            let mut delayed = 0u64;
            for _ in 0..o.trials {
                let mut s = accept(l)?;
                let mut req = Vec::new();
                read_to_eof(&mut s, &mut req)?;
                std::thread::sleep(o.delay);
                s.write_all(&[0x5a; 16])?;
                delayed += 1;
            }
            json!({"replied": delayed})
        }
        "close-after-write" => {
            let mut s = accept(l)?;
            // Let the client write and close before anything is read.
            std::thread::sleep(Duration::from_millis(200));
            let mut all = Vec::new();
            let eagain = read_to_eof(&mut s, &mut all)?;
            json!({"bytes": all.len(), "hash": fnv1a::feed(fnv1a::START, &all), "eof": true, "eagain": eagain})
        }
        "early-close" => {
            let mut s = accept(l)?;
            let mut one = [0u8; 1];
            read_full(&mut s, &mut one)?;
            // Close with unread data in the receive queue.
            drop(s);
            json!({"closed_after": 1})
        }
        "peek" => {
            let s = accept(l)?;
            wait_readable(&s)?;
            let mut peeked = vec![0u8; 4096];
            let start = Instant::now();
            // TCP may deliver 1000 bytes in more than one segment: peek until
            // all of it is there (bounded).
            let mut n = 0;
            while start.elapsed() < Duration::from_secs(2) {
                n = recv(s.as_raw_fd(), &mut peeked, MsgFlags::MSG_PEEK)?;
                if n >= 1000 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut read = vec![0u8; 1000];
            let mut s2 = &s;
            let (got, eagain) = read_full(&mut s2, &mut read)?;
            json!({"peeked": n, "read": got, "same": peeked[..n.min(1000)] == read[..n.min(1000)], "eagain": eagain})
        }
        "queue-ioctls" => {
            // What FIONREAD (= SIOCINQ) says with 1000 bytes queued, then
            // the bytes read with readv into two buffers.
            let s = accept(l)?;
            wait_readable(&s)?;
            std::thread::sleep(Duration::from_millis(50));
            let inq = sys::int_ioctl(&s, nix::libc::FIONREAD);
            let (mut a, mut b) = ([0u8; 300], [0u8; 700]);
            let mut got = 0;
            let start = Instant::now();
            while got < 1000 && start.elapsed() < Duration::from_secs(2) {
                let (x, y) = if got < 300 {
                    (&mut a[got..], &mut b[..])
                } else {
                    (&mut a[300..], &mut b[got - 300..])
                };
                let mut iov = [io::IoSliceMut::new(x), io::IoSliceMut::new(y)];
                match nix::sys::uio::readv(&s, &mut iov) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(Errno::EAGAIN | Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let mut want = vec![0u8; 1000];
            pattern::fill(&mut want, 0);
            let same = a[..] == want[..300] && b[..] == want[300..];
            (&s).write_all(b"g")?;
            json!({"fionread": outcome(&inq), "readv": got, "same": same})
        }
        "rcvtimeo" => {
            let mut s = accept(l)?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            let start = Instant::now();
            let mut b = [0u8; 100];
            let first = recv(s.as_raw_fd(), &mut b, MsgFlags::empty());
            let waited_ms = start.elapsed().as_millis();
            s.write_all(b"g")?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let (n, eagain) = read_full(&mut s, &mut b)?;
            json!({"first_recv": outcome(&first), "waited_ms": waited_ms, "then_read": n, "eagain": eagain})
        }
        "nonblock" => {
            // Reads that must not block on an empty socket: O_NONBLOCK, and
            // MSG_DONTWAIT on a blocking socket. Both return EAGAIN at once.
            let mut s = accept(l)?;
            let mut b = [0u8; 100];
            s.set_nonblocking(true)?;
            let start = Instant::now();
            let nonblocking = recv(s.as_raw_fd(), &mut b, MsgFlags::empty());
            s.set_nonblocking(false)?;
            let dontwait = recv(s.as_raw_fd(), &mut b, MsgFlags::MSG_DONTWAIT);
            let ms = start.elapsed().as_millis();
            s.write_all(b"g")?;
            let (n, eagain) = read_full(&mut s, &mut b)?;
            json!({"nonblocking_recv": outcome(&nonblocking), "dontwait_recv": outcome(&dontwait),
                   "ms": ms, "then_read": n, "eagain": eagain})
        }
        "rcvlowat" => {
            let mut s = accept(l)?;
            sys::set_int_sockopt(&s, nix::libc::SOL_SOCKET, nix::libc::SO_RCVLOWAT, 1000)?;
            s.write_all(b"g")?;
            let start = Instant::now();
            let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(5000u16))?;
            let readable_ms = start.elapsed().as_millis();
            let mut b = [0u8; 2000];
            let first = recv(s.as_raw_fd(), &mut b, MsgFlags::empty());
            let first_ms = start.elapsed().as_millis();
            let got = *first.as_ref().unwrap_or(&0);
            let (rest, _) = read_full(&mut s, &mut b[got..1000])?;
            json!({"readable_ms": readable_ms, "first_recv": outcome(&first), "first_ms": first_ms, "total": got + rest})
        }
        "stalled" => {
            let mut s = accept(l)?;
            // Never read until the test closes our stdin (bounded).
            wait_for_release();
            // Then drain to EOF, hashing every byte, so the test checks that
            // what was queued arrives whole and in order, not only its length.
            let (mut total, mut h) = (0u64, fnv1a::START);
            let mut buf = vec![0u8; CHUNK];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        total += n as u64;
                        h = fnv1a::feed(h, &buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            json!({"drained": total, "hash": h})
        }
        "stalled-stream" => {
            let mut s = accept(l)?;
            wait_for_release();
            // Then read (blocking, retrying EAGAIN) to EOF and hash every byte,
            // so the test can check that what was queued before and after a
            // path switch arrives whole and in order.
            s.set_read_timeout(Some(DEADLINE))?;
            let start = Instant::now();
            let (mut total, mut h) = (0u64, fnv1a::START);
            let mut buf = vec![0u8; CHUNK];
            while start.elapsed() < DEADLINE * 4 {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        total += n as u64;
                        h = fnv1a::feed(h, &buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let drain_ms = start.elapsed().as_millis();
            // A reply in the other direction, which a memory-bound switch of
            // the sender must not have moved off the redirect path.
            s.write_all(&vec![0x5a; STALLED_REPLY])?;
            json!({"drained": total, "hash": h, "drain_ms": drain_ms, "replied": STALLED_REPLY})
        }
        "many" => {
            let mut ok = 0u64;
            let mut eagain = 0u64;
            for _ in 0..o.trials {
                let mut s = accept(l)?;
                let mut b = [0u8; 100];
                let (n, e) = read_full(&mut s, &mut b)?;
                eagain += e;
                if n == b.len() {
                    s.write_all(&b)?;
                    ok += 1;
                }
            }
            json!({"echoed": ok, "eagain": eagain})
        }
        other => bail!("unknown pattern {other:?}"),
    })
}

fn client(pat: &str, addr: SocketAddr, o: &Opts) -> anyhow::Result<Value> {
    let connect = || TcpStream::connect(addr).with_context(|| format!("connecting {addr}"));
    Ok(match pat {
        "pingpong" => {
            let mut s = connect()?;
            s.set_nodelay(true)?;
            let (mut msg, mut back) = ([0u8; 64], [0u8; 64]);
            let (mut h, mut eagain) = (fnv1a::START, 0u64);
            let start = Instant::now();
            for i in 0..o.iters {
                pattern::fill(&mut msg, i * 64);
                s.write_all(&msg)?;
                let (n, e) = read_full(&mut s, &mut back)?;
                ensure!(n == back.len(), "server closed after {i} iterations");
                eagain += e;
                h = fnv1a::feed(h, &back);
            }
            let micros = start.elapsed().as_micros();
            json!({"iters": o.iters, "hash": h, "expected": stream_hash(o.iters * 64), "eagain": eagain,
                   "rtt_us": micros as f64 / o.iters as f64})
        }
        "basic" | "epoll-lt" | "epoll-et" | "poll" | "splice-recv" | "waitall" => {
            let mut s = connect()?;
            framed(&mut s, o.bytes, Send::Write)?
        }
        "preattach" => {
            // Connect, exchange once, then wait for the test to say go (a
            // line on stdin) and exchange again on the same connection.
            let mut s = connect()?;
            let before = framed(&mut s, o.bytes, Send::Write)?;
            println!(
                "{}",
                json!({"local": s.local_addr()?.to_string(), "before": before})
            );
            io::stdout().flush()?;
            let mut line = String::new();
            io::stdin().lock().read_line(&mut line)?;
            framed(&mut s, o.bytes, Send::Write)?
        }
        "sendfile" => {
            let mut s = connect()?;
            framed(&mut s, o.bytes, Send::Sendfile)?
        }
        "splice-send" => {
            let mut s = connect()?;
            framed(&mut s, o.bytes, Send::Splice)?
        }
        "bigwrite" => {
            let mut s = connect()?;
            framed(&mut s, o.bytes, Send::OneWrite)?
        }
        "waitall-slow" => {
            let mut s = connect()?;
            framed(&mut s, o.bytes, Send::Trickle)?
        }
        "zerocopy" => {
            let mut s = connect()?;
            sys::set_int_sockopt(&s, nix::libc::SOL_SOCKET, nix::libc::SO_ZEROCOPY, 1)?;
            let mut r = framed(&mut s, o.bytes, Send::Zerocopy)?;
            let sends = o.bytes.div_ceil(CHUNK as u64);
            r["zerocopy_sends"] = json!(sends);
            r["completions"] = json!(sys::zerocopy_completions(
                &s,
                sends,
                Duration::from_secs(2)
            )?);
            r
        }
        "duplex" => duplex(&connect()?, o.bytes)?,
        "halfclose" => {
            let (mut with_eagain, mut eagain_total, mut intact) = (0u64, 0u64, 0u64);
            for _ in 0..o.trials {
                let mut s = connect()?;
                s.write_all(&[1u8; 16])?;
                s.shutdown(Shutdown::Write)?;
                let mut got = Vec::new();
                let e = read_to_eof(&mut s, &mut got)?;
                eagain_total += e;
                with_eagain += u64::from(e > 0);
                intact += u64::from(got == [0x5a; 16]);
            }
            json!({"trials": o.trials, "trials_with_eagain": with_eagain, "eagain": eagain_total, "intact": intact})
        }
        "close-after-write" => {
            let mut s = connect()?;
            let mut buf = vec![0u8; usize::try_from(o.bytes)?];
            pattern::fill(&mut buf, 0);
            s.write_all(&buf)?;
            drop(s);
            json!({"sent": o.bytes, "hash": stream_hash(o.bytes)})
        }
        "early-close" => {
            let mut s = connect()?;
            let mut buf = vec![0u8; CHUNK];
            pattern::fill(&mut buf, 0);
            let mut sent = 0u64;
            let start = Instant::now();
            let err = loop {
                if sent >= o.bytes || start.elapsed() > DEADLINE {
                    break None;
                }
                match s.write(&buf) {
                    Ok(n) => sent += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Some(e),
                }
                if sent == 64 * 1024 {
                    // Let the server read its byte and close.
                    std::thread::sleep(Duration::from_millis(100));
                }
            };
            json!({"sent_before_error": sent,
                   "error": err.map(|e| format!("{:?}", Errno::from_raw(e.raw_os_error().unwrap_or(0))))})
        }
        "peek" => {
            let mut s = connect()?;
            let mut b = vec![0u8; 1000];
            pattern::fill(&mut b, 0);
            s.write_all(&b)?;
            let mut end = [0u8; 1];
            let _ = s.read(&mut end);
            json!({"sent": 1000})
        }
        "queue-ioctls" => {
            // 1000 bytes written with writev from two buffers; SIOCOUTQ
            // right after and 50 ms later (TCP: unacked, then 0).
            let s = connect()?;
            let mut b = vec![0u8; 1000];
            pattern::fill(&mut b, 0);
            let iov = [io::IoSlice::new(&b[..400]), io::IoSlice::new(&b[400..])];
            let wrote = nix::sys::uio::writev(&s, &iov)?;
            std::thread::sleep(Duration::from_millis(50));
            let outq = sys::int_ioctl(&s, nix::libc::TIOCOUTQ);
            let mut g = [0u8; 1];
            let mut r = &s;
            let (n, _) = read_full(&mut r, &mut g)?;
            json!({"writev": wrote, "siocoutq_50ms": outcome(&outq), "go": n})
        }
        // The `nonblock` server drives the same exchange.
        "rcvtimeo" | "nonblock" => {
            let mut s = connect()?;
            let mut g = [0u8; 1];
            read_full(&mut s, &mut g)?;
            s.write_all(&[7u8; 100])?;
            let _ = s.read(&mut g);
            json!({"sent": 100})
        }
        "rcvlowat" => {
            let mut s = connect()?;
            s.set_nodelay(true)?;
            let mut g = [0u8; 1];
            read_full(&mut s, &mut g)?;
            s.write_all(&[7u8; 500])?;
            std::thread::sleep(Duration::from_millis(300));
            s.write_all(&[7u8; 500])?;
            let _ = s.read(&mut g);
            json!({"sent": 1000})
        }
        "stalled" => {
            // Non-blocking writes into a peer that never reads: how much does
            // the kernel let us queue in ~2 s (bounded by --bytes)? Each write
            // carries its stream offset in its first 8 bytes; the writes are
            // logged and hashed only after the timed window, so the
            // measurement is not limited by this process's hashing speed.
            let s = connect()?;
            s.set_nonblocking(true)?;
            let mut buf = vec![0u8; CHUNK];
            pattern::fill(&mut buf, 0);
            let mut log: Vec<usize> = Vec::new();
            let mut queued = 0u64;
            let start = Instant::now();
            while queued < o.bytes && start.elapsed() < Duration::from_secs(2) {
                buf[..8].copy_from_slice(&queued.to_be_bytes());
                let Some(n) = write_or_wait(&s, &buf)? else {
                    break;
                };
                if n > 0 {
                    queued += n as u64;
                    log.push(n);
                }
            }
            let secs = start.elapsed().as_secs_f64();
            let h = stamped_hash(&mut buf, &log);
            println!(
                "{}",
                json!({"queued": queued, "secs": secs, "hash": h, "capped": queued >= o.bytes})
            );
            io::stdout().flush()?;
            // Hold the connection until the test has looked at the sockets.
            let mut line = String::new();
            io::stdin().lock().read_line(&mut line)?;
            drop(s);
            json!({"closed": true})
        }
        "stalled-stream" => stalled_stream(&connect()?, o)?,
        "many" => {
            let (mut ok, mut eagain, mut h) = (0u64, 0u64, fnv1a::START);
            for i in 0..o.trials {
                let mut s = connect()?;
                let mut b = [0u8; 100];
                pattern::fill(&mut b, i * 100);
                s.write_all(&b)?;
                let (n, e) = read_full(&mut s, &mut b)?;
                eagain += e;
                if n == b.len() {
                    ok += 1;
                    h = fnv1a::feed(h, &b);
                }
            }
            json!({"ok": ok, "eagain": eagain, "hash": h, "expected": stream_hash(o.trials * 100)})
        }
        other => bail!("unknown pattern {other:?}"),
    })
}

/// Blocks until the test closes this process's stdin (at most [`DEADLINE`]).
fn wait_for_release() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = io::stdin().lock().read_line(&mut line);
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(DEADLINE);
}

/// One write on a non-blocking socket; on EAGAIN waits up to 200 ms for
/// room. `Some(n)`: wrote `n` bytes (0: room appeared, write again);
/// `None`: still no room after 200 ms (the peer is not reading).
fn write_or_wait(s: &TcpStream, buf: &[u8]) -> anyhow::Result<Option<usize>> {
    let mut sw = s;
    match sw.write(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLOUT)];
            Ok((poll(&mut fds, PollTimeout::from(200u16))? != 0).then_some(0))
        }
        Err(e) => Err(e.into()),
    }
}

/// The hash of the stream written as `log` (the length of each write) of
/// `buf`, each write with its stream offset stamped into its first 8 bytes.
fn stamped_hash(buf: &mut [u8], log: &[usize]) -> u64 {
    let (mut h, mut off) = (fnv1a::START, 0u64);
    for &n in log {
        buf[..8].copy_from_slice(&off.to_be_bytes());
        h = fnv1a::feed(h, &buf[..n]);
        off += n as u64;
    }
    h
}

/// Like `stalled`, but every byte is part of an order-sensitive stream: each
/// write is the pattern buffer with the stream offset stamped into its first
/// 8 bytes. The writes are logged and hashed only after the timed window, so
/// hashing does not slow the sender down. Prints `{"queued", "secs", "hash"}`,
/// waits for release, then half-closes and reads the server's reply to EOF
/// (the socket stays open until every queued byte was read).
fn stalled_stream(s: &TcpStream, o: &Opts) -> anyhow::Result<Value> {
    s.set_nonblocking(true)?;
    let mut buf = vec![0u8; CHUNK];
    pattern::fill(&mut buf, 0);
    let mut log: Vec<usize> = Vec::new();
    let mut queued = 0u64;
    let start = Instant::now();
    while queued < o.bytes && start.elapsed() < Duration::from_secs(2) {
        buf[..8].copy_from_slice(&queued.to_be_bytes());
        match write_or_wait(s, &buf)? {
            Some(0) => {}
            Some(n) => {
                queued += n as u64;
                log.push(n);
            }
            None => break,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let h = stamped_hash(&mut buf, &log);
    println!(
        "{}",
        json!({"queued": queued, "secs": secs, "hash": h, "capped": queued >= o.bytes})
    );
    io::stdout().flush()?;
    wait_for_release();
    s.set_nonblocking(false)?;
    s.shutdown(Shutdown::Write)?;
    s.set_read_timeout(Some(DEADLINE))?;
    // Retrying EAGAIN: after our half-close a blocking read on the redirect
    // path may return it (docs/RELIABILITY.md, limit 1).
    let mut reply = Vec::new();
    let eagain = read_to_eof(&mut s.try_clone()?, &mut reply)?;
    Ok(json!({"closed": true, "reply": reply.len(), "eagain": eagain}))
}

/// Bytes the `stalled-stream` server sends back after draining.
const STALLED_REPLY: usize = 256 * 1024;

/// Hash of the first `n` bytes of the test stream.
fn stream_hash(n: u64) -> u64 {
    let mut h = fnv1a::START;
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0;
    while off < n {
        let k = usize::try_from((n - off).min(CHUNK as u64)).unwrap_or(CHUNK);
        pattern::fill(&mut buf[..k], off);
        h = fnv1a::feed(h, &buf[..k]);
        off += k as u64;
    }
    h
}

fn outcome(r: &nix::Result<usize>) -> Value {
    match r {
        Ok(n) => json!(n),
        Err(e) => json!(format!("{e:?}")),
    }
}

/// Reads until `buf` is full or EOF; retries EAGAIN (counted) and EINTR.
/// Returns (bytes read, EAGAIN count).
fn read_full(s: &mut impl Read, buf: &mut [u8]) -> anyhow::Result<(usize, u64)> {
    let (mut got, mut eagain) = (0, 0u64);
    let start = Instant::now();
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                eagain += 1;
                ensure!(start.elapsed() < DEADLINE, "no data within {DEADLINE:?}");
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((got, eagain))
}

fn read_to_eof(s: &mut TcpStream, out: &mut Vec<u8>) -> anyhow::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut eagain = 0;
    loop {
        let (n, e) = read_full(s, &mut buf[..])?;
        eagain += e;
        out.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            return Ok(eagain);
        }
    }
}

fn wait_readable(s: &TcpStream) -> anyhow::Result<()> {
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
    ensure!(
        poll(&mut fds, PollTimeout::from(10_000u16))? > 0,
        "nothing to read within 10 s"
    );
    Ok(())
}

fn reply(s: &mut TcpStream, len: u64, h: u64) -> io::Result<()> {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&len.to_be_bytes());
    r[8..].copy_from_slice(&h.to_be_bytes());
    s.write_all(&r)
}

#[derive(Clone, Copy)]
enum Send {
    Write,
    Sendfile,
    Splice,
    OneWrite,
    Trickle,
    Zerocopy,
}

#[derive(Clone, Copy)]
enum Recv {
    Read,
    Epoll { edge: bool },
    Poll,
    Splice,
}

/// Client side of one framed request: length, payload sent `how`, reply.
fn framed(s: &mut TcpStream, bytes: u64, how: Send) -> anyhow::Result<Value> {
    s.write_all(&bytes.to_be_bytes())?;
    let mut payload = vec![0u8; usize::try_from(bytes)?];
    pattern::fill(&mut payload, 0);
    let mut extra = json!({});
    match how {
        Send::Write => s.write_all(&payload)?,
        Send::OneWrite => {
            let n = s.write(&payload)?;
            extra["first_write"] = json!(n);
            s.write_all(&payload[n..])?;
        }
        Send::Trickle => {
            for (i, c) in payload.chunks(4096).enumerate() {
                s.write_all(c)?;
                if i % 16 == 15 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        Send::Sendfile => {
            let mut f = tempfile::tempfile()?;
            f.write_all(&payload)?;
            let mut off: nix::libc::off_t = 0;
            let mut calls = 0u64;
            while off.cast_unsigned() < bytes {
                let left = usize::try_from(bytes - off.cast_unsigned())?;
                let n = nix::sys::sendfile::sendfile(s.as_fd(), f.as_fd(), Some(&mut off), left)?;
                ensure!(n > 0, "sendfile returned 0 at offset {off}");
                calls += 1;
            }
            extra["sendfile_calls"] = json!(calls);
        }
        Send::Splice => {
            let (r, w) = nix::unistd::pipe()?;
            let mut wf = std::fs::File::from(w);
            let mut spliced = 0u64;
            for c in payload.chunks(CHUNK) {
                wf.write_all(c)?;
                let mut left = c.len();
                while left > 0 {
                    let n = nix::fcntl::splice(
                        r.as_fd(),
                        None,
                        s.as_fd(),
                        None,
                        left,
                        nix::fcntl::SpliceFFlags::empty(),
                    )?;
                    ensure!(n > 0, "splice returned 0");
                    left -= n;
                    spliced += n as u64;
                }
            }
            extra["spliced"] = json!(spliced);
        }
        Send::Zerocopy => {
            let mut zc_err = None;
            for c in payload.chunks(CHUNK) {
                let mut off = 0;
                while off < c.len() {
                    match nix::sys::socket::send(
                        s.as_raw_fd(),
                        &c[off..],
                        MsgFlags::from_bits_retain(nix::libc::MSG_ZEROCOPY),
                    ) {
                        Ok(n) => off += n,
                        Err(Errno::EINTR) => {}
                        Err(e) => {
                            zc_err = Some(format!("{e:?}"));
                            break;
                        }
                    }
                }
            }
            extra["send_error"] = json!(zc_err);
        }
    }
    let mut r = [0u8; 16];
    let (n, eagain) = read_full(s, &mut r)?;
    ensure!(n == 16, "short reply ({n} bytes)");
    let len = u64::from_be_bytes(r[..8].try_into()?);
    let h = u64::from_be_bytes(r[8..].try_into()?);
    extra["sent"] = json!(bytes);
    extra["reply_len"] = json!(len);
    extra["intact"] = json!(len == bytes && h == stream_hash(bytes));
    extra["reply_eagain"] = json!(eagain);
    Ok(extra)
}

/// Server side of one framed request, received `how`; `None` at EOF before a
/// request.
fn serve_framed(s: &mut TcpStream, how: Recv) -> anyhow::Result<Option<Value>> {
    let mut len = [0u8; 8];
    let (n, mut eagain) = read_full(s, &mut len)?;
    if n == 0 {
        return Ok(None);
    }
    ensure!(n == 8, "short length ({n} bytes)");
    let want = u64::from_be_bytes(len);
    let mut h = fnv1a::START;
    let mut got = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let mut extra = json!({});
    let start = Instant::now();
    match how {
        Recv::Read => {
            while got < want {
                let k = usize::try_from((want - got).min(CHUNK as u64))?;
                let (n, e) = read_full(s, &mut buf[..k])?;
                ensure!(n == k, "EOF after {got} bytes");
                eagain += e;
                h = fnv1a::feed(h, &buf[..n]);
                got += n as u64;
            }
        }
        Recv::Epoll { edge } => {
            s.set_nonblocking(true)?;
            let ep = Epoll::new(EpollCreateFlags::empty())?;
            let mut flags = EpollFlags::EPOLLIN;
            if edge {
                flags |= EpollFlags::EPOLLET;
            }
            ep.add(&*s, EpollEvent::new(flags, 1))?;
            let (mut wakeups, mut would_block) = (0u64, 0u64);
            let mut events = [EpollEvent::empty(); 4];
            while got < want {
                ensure!(
                    start.elapsed() < DEADLINE,
                    "epoll: stuck at {got} of {want}"
                );
                if ep.wait(&mut events, EpollTimeout::from(1000u16))? == 0 {
                    continue;
                }
                wakeups += 1;
                // Edge-triggered: drain until EAGAIN; level: one read per wake-up.
                loop {
                    let k = usize::try_from((want - got).min(CHUNK as u64))?;
                    if k == 0 {
                        break;
                    }
                    match s.read(&mut buf[..k]) {
                        Ok(0) => bail!("EOF after {got} bytes"),
                        Ok(n) => {
                            h = fnv1a::feed(h, &buf[..n]);
                            got += n as u64;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            would_block += 1;
                            break;
                        }
                        Err(e) => return Err(e.into()),
                    }
                    if !edge {
                        break;
                    }
                }
            }
            s.set_nonblocking(false)?;
            extra["wakeups"] = json!(wakeups);
            extra["would_block"] = json!(would_block);
        }
        Recv::Poll => {
            s.set_nonblocking(true)?;
            let (mut wakeups, mut would_block) = (0u64, 0u64);
            while got < want {
                ensure!(start.elapsed() < DEADLINE, "poll: stuck at {got} of {want}");
                let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
                if poll(&mut fds, PollTimeout::from(1000u16))? == 0 {
                    continue;
                }
                wakeups += 1;
                let k = usize::try_from((want - got).min(CHUNK as u64))?;
                match s.read(&mut buf[..k]) {
                    Ok(0) => bail!("EOF after {got} bytes"),
                    Ok(n) => {
                        h = fnv1a::feed(h, &buf[..n]);
                        got += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => would_block += 1,
                    Err(e) => return Err(e.into()),
                }
            }
            s.set_nonblocking(false)?;
            extra["wakeups"] = json!(wakeups);
            extra["would_block"] = json!(would_block);
        }
        Recv::Splice => {
            // splice(socket → pipe) for up to 2 s, then plain reads for the rest.
            let (r, w) = nix::unistd::pipe()?;
            let mut rf = std::fs::File::from(r);
            let (mut spliced, mut zero, mut again) = (0u64, 0u64, 0u64);
            let mut first_error = None;
            // Non-blocking socket: a blocking one makes tcp_splice_read wait
            // for the whole length.
            s.set_nonblocking(true)?;
            while got < want && start.elapsed() < Duration::from_secs(2) {
                let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
                if poll(&mut fds, PollTimeout::from(100u16))? == 0 {
                    again += 1;
                    continue;
                }
                let k = usize::try_from((want - got).min(CHUNK as u64))?;
                match nix::fcntl::splice(
                    s.as_fd(),
                    None,
                    w.as_fd(),
                    None,
                    k,
                    nix::fcntl::SpliceFFlags::SPLICE_F_NONBLOCK,
                ) {
                    Ok(0) => {
                        zero += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Ok(n) => {
                        rf.read_exact(&mut buf[..n])?;
                        h = fnv1a::feed(h, &buf[..n]);
                        got += n as u64;
                        spliced += n as u64;
                    }
                    Err(Errno::EAGAIN) => {
                        again += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => {
                        first_error.get_or_insert(format!("{e:?}"));
                        break;
                    }
                }
            }
            s.set_nonblocking(false)?;
            let mut read_after = 0u64;
            while got < want {
                let k = usize::try_from((want - got).min(CHUNK as u64))?;
                let (n, e) = read_full(s, &mut buf[..k])?;
                ensure!(n == k, "EOF after {got} bytes");
                eagain += e;
                h = fnv1a::feed(h, &buf[..n]);
                got += n as u64;
                read_after += n as u64;
            }
            extra["spliced"] = json!(spliced);
            extra["splice_zero"] = json!(zero);
            extra["splice_again"] = json!(again);
            extra["splice_error"] = json!(first_error);
            extra["read_after_splice"] = json!(read_after);
        }
    }
    reply(s, got, h)?;
    extra["bytes"] = json!(got);
    extra["hash"] = json!(h);
    extra["eagain"] = json!(eagain);
    Ok(Some(extra))
}

/// One thread writes `bytes` while this one reads `bytes`, same socket.
fn duplex(s: &TcpStream, bytes: u64) -> anyhow::Result<Value> {
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK];
        let mut off = 0u64;
        while off < bytes {
            let k = usize::try_from((bytes - off).min(CHUNK as u64)).unwrap_or(CHUNK);
            pattern::fill(&mut buf[..k], off);
            w.write_all(&buf[..k])?;
            off += k as u64;
        }
        Ok(())
    });
    let mut r = s;
    let mut buf = vec![0u8; CHUNK];
    let (mut got, mut h, mut eagain) = (0u64, fnv1a::START, 0u64);
    while got < bytes {
        let k = usize::try_from((bytes - got).min(CHUNK as u64))?;
        let (n, e) = read_full(&mut r, &mut buf[..k])?;
        ensure!(n == k, "EOF after {got} bytes");
        eagain += e;
        h = fnv1a::feed(h, &buf[..n]);
        got += n as u64;
    }
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    Ok(json!({"received": got, "intact": h == stream_hash(bytes), "eagain": eagain}))
}

/// The only unsafe code of this tool: socket options nix does not wrap and
/// the `MSG_ZEROCOPY` error queue.
mod sys {
    use std::{net::TcpStream, os::fd::AsRawFd as _, time::Duration};

    use nix::{
        errno::Errno,
        libc,
        poll::{PollFd, PollFlags, PollTimeout, poll},
    };

    /// `SO_EE_ORIGIN_ZEROCOPY` of linux/errqueue.h (not in the libc crate).
    const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;

    /// `ioctl(fd, request, &int)` for the socket queue ioctls (`FIONREAD`
    /// = `SIOCINQ`, `TIOCOUTQ` = `SIOCOUTQ`).
    pub(super) fn int_ioctl(s: &TcpStream, request: libc::c_ulong) -> nix::Result<usize> {
        let mut value: libc::c_int = 0;
        // SAFETY: the fd is open for the lifetime of `s`; these requests
        // write one `int` to the pointer.
        let r = unsafe { libc::ioctl(s.as_raw_fd(), request, &raw mut value) };
        Errno::result(r)?;
        Ok(usize::try_from(value).unwrap_or(0))
    }

    /// `setsockopt(level, name, &value)` for an `int` option.
    pub(super) fn set_int_sockopt(
        s: &TcpStream,
        level: i32,
        name: i32,
        value: i32,
    ) -> nix::Result<()> {
        // SAFETY: the fd is open for the lifetime of `s`; the option value is a
        // valid `int` whose size is passed alongside.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                name,
                (&raw const value).cast(),
                libc::socklen_t::try_from(size_of::<i32>()).unwrap_or(4),
            )
        };
        Errno::result(r).map(drop)
    }

    /// Collects `MSG_ZEROCOPY` completion notifications from the error queue
    /// until `sends` sends are covered or `wait` passes; returns how many sends
    /// were reported complete.
    pub(super) fn zerocopy_completions(
        s: &TcpStream,
        sends: u64,
        wait: Duration,
    ) -> nix::Result<u64> {
        let start = std::time::Instant::now();
        let mut covered = 0u64;
        while covered < sends && start.elapsed() < wait {
            let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(s), PollFlags::empty())];
            // POLLERR is always reported; nothing else is asked for.
            if poll(&mut fds, PollTimeout::from(100u16))? == 0 {
                continue;
            }
            let mut control = [0u64; 16];
            let mut hdr: libc::msghdr =
                // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
                unsafe { std::mem::zeroed() };
            hdr.msg_control = control.as_mut_ptr().cast();
            hdr.msg_controllen = size_of_val(&control);
            // SAFETY: `hdr` points at `control`, which outlives the call; no
            // data iovec is needed for the error queue.
            let r = unsafe { libc::recvmsg(s.as_raw_fd(), &raw mut hdr, libc::MSG_ERRQUEUE) };
            match Errno::result(r) {
                Ok(_) => {}
                Err(Errno::EAGAIN) => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                Err(e) => return Err(e),
            }
            // SAFETY: the kernel filled `control` with `msg_controllen` bytes
            // of well-formed cmsgs; CMSG_* walk them within that length.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&raw const hdr);
                while !c.is_null() {
                    let ee = libc::CMSG_DATA(c)
                        .cast::<libc::sock_extended_err>()
                        .read_unaligned();
                    if ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY {
                        covered += u64::from(ee.ee_data.wrapping_sub(ee.ee_info)) + 1;
                    }
                    c = libc::CMSG_NXTHDR(&raw const hdr, c);
                }
            }
        }
        Ok(covered)
    }
}
