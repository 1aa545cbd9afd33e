//! `spright-netpeer`: the pod process of the integration tests.
//!
//! It joins a cgroup and a network namespace (in that order, before it creates
//! any socket, because a socket's cgroup is fixed at creation), then serves or
//! sends one framed transfer and prints a JSON report on stdout.
//!
//! ```text
//! spright-netpeer [--cgroup DIR] [--netns PATH] serve --listen ADDR [--conns N]
//! spright-netpeer [--cgroup DIR] [--netns PATH] send --connect ADDR --bytes N [--chunk N]
//!                 [--hold | --parallel N]
//! ```
//!
//! Protocol (chosen so that every payload byte is sent after both sockets are
//! established on both sides): the server greets with one byte as soon as it
//! accepts; the client waits for it, sends an 8-byte big-endian length and the
//! payload, and reads a 16-byte reply (received length, FNV-1a hash). With
//! `--hold` the client keeps the connection open after its report until its
//! stdin closes, so the test can inspect the live socket with `ss`.
//!
//! Benchmark modes (no verification, nothing but the socket work is timed):
//!
//! ```text
//! spright-netpeer ... echo --listen ADDR       echo one connection's bytes back
//! spright-netpeer ... sink --listen ADDR       read one connection to EOF, reply with the count
//! spright-netpeer ... pingpong --connect ADDR --size N --iters K   RTT percentiles
//! spright-netpeer ... bulk --connect ADDR --bytes N --chunk C      throughput
//! ```
//!
//! Reads retry `EAGAIN` on blocking sockets (a known behaviour of the kernel's
//! redirect path, docs/RELIABILITY.md, documented limit 1) and report how often they had to.

use std::{
    io::{self, BufRead as _, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Instant,
};

use anyhow::{Context as _, bail};
use spright_tests::{fnv1a, pattern, pod::take_opt};

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    spright_tests::pod::enter_from_args(&mut args)?;
    let report = match args.first().map(String::as_str) {
        Some("serve") => {
            args.remove(0);
            let listen: SocketAddr = required(&mut args, "--listen")?;
            let conns: u64 = take_opt(&mut args, "--conns")?.map_or(Ok(1), |v| parse(&v))?;
            no_leftovers(&args)?;
            serve(listen, conns)?
        }
        Some("send") => {
            args.remove(0);
            let connect: SocketAddr = required(&mut args, "--connect")?;
            let bytes: u64 = required(&mut args, "--bytes")?;
            let chunk: usize =
                take_opt(&mut args, "--chunk")?.map_or(Ok(64 * 1024), |v| parse(&v))?;
            let hold = take_flag(&mut args, "--hold");
            let parallel: usize =
                take_opt(&mut args, "--parallel")?.map_or(Ok(1), |v| parse(&v))?;
            no_leftovers(&args)?;
            if parallel > 1 {
                send_parallel(connect, bytes, chunk, parallel)?
            } else {
                send(connect, bytes, chunk, hold)?
            }
        }
        Some("echo" | "sink") => {
            let mode = args.remove(0);
            let listen: SocketAddr = required(&mut args, "--listen")?;
            no_leftovers(&args)?;
            perf::serve(listen, mode == "echo")?
        }
        Some("pingpong") => {
            args.remove(0);
            let connect: SocketAddr = required(&mut args, "--connect")?;
            let size: usize = required(&mut args, "--size")?;
            let iters: u64 = required(&mut args, "--iters")?;
            no_leftovers(&args)?;
            perf::pingpong(connect, size, iters)?
        }
        Some("bulk") => {
            args.remove(0);
            let connect: SocketAddr = required(&mut args, "--connect")?;
            let bytes: u64 = required(&mut args, "--bytes")?;
            let chunk: usize = required(&mut args, "--chunk")?;
            no_leftovers(&args)?;
            perf::bulk(connect, bytes, chunk)?
        }
        other => bail!("expected serve, send, echo, sink, pingpong or bulk; got {other:?}"),
    };
    // `send --hold` already printed its report.
    if !report.is_null() {
        println!("{report}");
    }
    Ok(())
}

fn serve(listen: SocketAddr, conns: u64) -> anyhow::Result<serde_json::Value> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    println!("ready");
    io::stdout().flush()?;
    // One thread per connection, so concurrent clients really are concurrent.
    let mut handlers = Vec::new();
    for _ in 0..conns {
        let (s, peer) = listener.accept().context("accepting")?;
        handlers.push(std::thread::spawn(move || serve_one(s, peer)));
    }
    let mut results = Vec::new();
    for h in handlers {
        results.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("handler panicked"))??,
        );
    }
    Ok(serde_json::json!({ "served": results }))
}

fn serve_one(mut s: TcpStream, peer: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let mut retries = 0;
    s.write_all(b"!").context("greeting")?;
    let mut len = [0u8; 8];
    read_exact_retrying(&mut s, &mut len, &mut retries)?;
    let len = u64::from_be_bytes(len);
    let mut hash = fnv1a::START;
    let mut got = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    while got < len {
        let want = usize::try_from((len - got).min(buf.len() as u64))?;
        let n = read_retrying(&mut s, &mut buf[..want], &mut retries)?;
        if n == 0 {
            break;
        }
        hash = fnv1a::feed(hash, &buf[..n]);
        got += n as u64;
    }
    let mut reply = [0u8; 16];
    reply[..8].copy_from_slice(&got.to_be_bytes());
    reply[8..].copy_from_slice(&hash.to_be_bytes());
    s.write_all(&reply).context("replying")?;
    // Wait for the client to close so our reply is never cut short.
    let mut rest = [0u8; 1];
    let _ = read_retrying(&mut s, &mut rest, &mut retries);
    Ok(serde_json::json!({
        "peer": peer.to_string(), "bytes": got, "hash": format!("{hash:016x}"), "eagain_retries": retries,
    }))
}

/// `--parallel N`: N concurrent connections, one report with all of them.
fn send_parallel(
    connect: SocketAddr,
    bytes: u64,
    chunk: usize,
    n: usize,
) -> anyhow::Result<serde_json::Value> {
    let handles: Vec<_> = (0..n)
        .map(|_| std::thread::spawn(move || send(connect, bytes, chunk, false)))
        .collect();
    let mut reports = Vec::new();
    for h in handles {
        reports.push(h.join().map_err(|_| anyhow::anyhow!("sender panicked"))??);
    }
    let intact = reports.iter().all(|r| r["intact"] == true);
    Ok(serde_json::json!({ "connections": reports.len(), "intact": intact, "reports": reports }))
}

fn send(
    connect: SocketAddr,
    bytes: u64,
    chunk: usize,
    hold: bool,
) -> anyhow::Result<serde_json::Value> {
    let mut s = TcpStream::connect(connect).with_context(|| format!("connecting to {connect}"))?;
    let local = s.local_addr()?;
    // What getpeername() says (a translated Service connection must still
    // show the address that was dialled).
    let peer_addr = s.peer_addr()?;
    let mut retries = 0;
    let mut greeting = [0u8; 1];
    read_exact_retrying(&mut s, &mut greeting, &mut retries)?;
    let started = Instant::now();
    s.write_all(&bytes.to_be_bytes())?;
    let mut hash = fnv1a::START;
    let mut buf = vec![0u8; chunk.max(1)];
    let mut sent = 0u64;
    while sent < bytes {
        let n = usize::try_from((bytes - sent).min(buf.len() as u64))?;
        pattern::fill(&mut buf[..n], sent);
        hash = fnv1a::feed(hash, &buf[..n]);
        s.write_all(&buf[..n]).context("sending payload")?;
        sent += n as u64;
    }
    let mut reply = [0u8; 16];
    read_exact_retrying(&mut s, &mut reply, &mut retries)?;
    let elapsed = started.elapsed();
    let got = u64::from_be_bytes(reply[..8].try_into()?);
    let their_hash = u64::from_be_bytes(reply[8..].try_into()?);
    let report = serde_json::json!({
        "local": local.to_string(), "peer": connect.to_string(), "peer_addr": peer_addr.to_string(),
        "sent": sent, "sent_hash": format!("{hash:016x}"),
        "received_by_peer": got, "peer_hash": format!("{their_hash:016x}"),
        "intact": got == sent && their_hash == hash,
        "micros": elapsed.as_micros(), "eagain_retries": retries,
    });
    if hold {
        println!("{report}");
        io::stdout().flush()?;
        // Keep the socket open until the test closes our stdin.
        let mut line = String::new();
        while io::stdin().lock().read_line(&mut line)? > 0 {
            line.clear();
        }
        return Ok(serde_json::Value::Null);
    }
    Ok(report)
}

fn read_retrying(s: &mut TcpStream, buf: &mut [u8], retries: &mut u64) -> anyhow::Result<usize> {
    // Bounded: a real stall shows as an error instead of a hang.
    for _ in 0..1_000_000 {
        match s.read(buf) {
            Ok(n) => return Ok(n),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                *retries += 1;
            }
            Err(e) => return Err(e).context("reading"),
        }
    }
    bail!("read kept returning EAGAIN")
}

fn read_exact_retrying(
    s: &mut TcpStream,
    mut buf: &mut [u8],
    retries: &mut u64,
) -> anyhow::Result<()> {
    while !buf.is_empty() {
        let n = read_retrying(s, buf, retries)?;
        if n == 0 {
            bail!("connection closed early");
        }
        buf = &mut buf[n..];
    }
    Ok(())
}

fn take_flag(args: &mut Vec<String>, name: &str) -> bool {
    args.iter()
        .position(|a| a == name)
        .map(|i| args.remove(i))
        .is_some()
}

fn parse<T: std::str::FromStr>(v: &str) -> anyhow::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    v.parse().with_context(|| format!("invalid value {v:?}"))
}

/// The value of a required option, parsed.
fn required<T: std::str::FromStr>(args: &mut Vec<String>, name: &str) -> anyhow::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    parse(&take_opt(args, name)?.with_context(|| format!("{name} is required"))?)
}

fn no_leftovers(args: &[String]) -> anyhow::Result<()> {
    if args.is_empty() {
        Ok(())
    } else {
        bail!("unexpected arguments: {args:?}")
    }
}

/// Benchmark modes.
mod perf {
    use std::{
        io::{Read as _, Write as _},
        net::{Shutdown, SocketAddr, TcpListener, TcpStream},
        time::Instant,
    };

    use anyhow::{Context as _, ensure};

    use super::{read_exact_retrying, read_retrying};

    pub(super) fn serve(listen: SocketAddr, echo: bool) -> anyhow::Result<serde_json::Value> {
        let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
        println!("ready");
        std::io::stdout().flush()?;
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        let mut retries = 0;
        loop {
            let n = read_retrying(&mut s, &mut buf, &mut retries)?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if echo {
                s.write_all(&buf[..n])?;
            }
        }
        if !echo {
            s.write_all(&total.to_be_bytes())?;
        }
        Ok(serde_json::json!({ "bytes": total, "eagain_retries": retries }))
    }

    pub(super) fn pingpong(
        connect: SocketAddr,
        size: usize,
        iters: u64,
    ) -> anyhow::Result<serde_json::Value> {
        let mut s = TcpStream::connect(connect)?;
        s.set_nodelay(true)?;
        let out = vec![0x5au8; size];
        let mut back = vec![0u8; size];
        let mut retries = 0;
        let warmup = (iters / 10).max(1);
        let mut rtts = Vec::with_capacity(usize::try_from(iters)?);
        for i in 0..warmup + iters {
            let t = Instant::now();
            s.write_all(&out)?;
            read_exact_retrying(&mut s, &mut back, &mut retries)?;
            if i >= warmup {
                rtts.push(t.elapsed().as_nanos());
            }
        }
        s.shutdown(Shutdown::Write)?;
        let _ = s.read(&mut back);
        rtts.sort_unstable();
        let pct = |p: usize| rtts[(rtts.len() - 1) * p / 100] as f64 / 1000.0;
        Ok(serde_json::json!({
            "size": size, "iters": iters, "p50_us": pct(50), "p99_us": pct(99), "eagain_retries": retries,
        }))
    }

    pub(super) fn bulk(
        connect: SocketAddr,
        bytes: u64,
        chunk: usize,
    ) -> anyhow::Result<serde_json::Value> {
        let mut s = TcpStream::connect(connect)?;
        let buf = vec![0xa5u8; chunk];
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < bytes {
            let n = usize::try_from((bytes - sent).min(chunk as u64))?;
            s.write_all(&buf[..n])?;
            sent += n as u64;
        }
        s.shutdown(Shutdown::Write)?;
        let mut count = [0u8; 8];
        let mut retries = 0;
        read_exact_retrying(&mut s, &mut count, &mut retries)?;
        let secs = t.elapsed().as_secs_f64();
        ensure!(
            u64::from_be_bytes(count) == sent,
            "sink counted {} of {sent} bytes",
            u64::from_be_bytes(count)
        );
        Ok(serde_json::json!({
            "bytes": sent, "chunk": chunk, "seconds": secs,
            "mib_per_s": sent as f64 / 1_048_576.0 / secs, "eagain_retries": retries,
        }))
    }
}
