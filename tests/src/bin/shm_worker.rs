//! `spright-shm-worker`: processes that use the SDK, driven by the SDK tests
//! and `bench-shm`. It joins a cgroup and a network namespace first (before
//! any socket exists), then runs one mode and prints a JSON report.
//!
//! ```text
//! spright-shm-worker [--cgroup DIR] [--netns PATH] churn   --region DIR --iters N --seed S
//! spright-shm-worker [--cgroup DIR] [--netns PATH] serve   --listen ADDR --mode MODE [--region DIR]
//! spright-shm-worker [--cgroup DIR] [--netns PATH] ping    --connect ADDR --mode MODE --size N --iters N [--region DIR]
//! ```
//!
//! `serve`/`ping` measure one hop, a message and a 16-byte reply, in one of
//! three modes (`MODE`):
//! - `tcp`: the payload crosses the socket; the server reads all of it and
//!   checksums every byte;
//! - `shm`: per message, the client allocates a buffer in the pool and
//!   writes every byte of the payload into it, a 16-byte descriptor crosses
//!   the socket, the server takes the buffer, checksums every byte in place
//!   and frees it;
//! - `shm-desc`: only the descriptor moves: the buffer is filled once before
//!   timing, the same descriptor goes back and forth and the server touches
//!   its first and last byte. This is the cost of the hop alone, not of
//!   moving a payload.
//!
//! In `tcp` and `shm` the reply carries the server's checksum and the client
//! checks it against the payload's.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use spright_shm::{Descriptor, Pool, recv, send};

fn take(args: &mut Vec<String>, flag: &str) -> Option<String> {
    let i = args.iter().position(|a| a == flag)?;
    args.remove(i);
    (i < args.len()).then(|| args.remove(i))
}

fn need(args: &mut Vec<String>, flag: &str) -> anyhow::Result<String> {
    take(args, flag).with_context(|| format!("{flag} is required"))
}

/// CPU time of this (single-threaded) process in ns, from the scheduler's
/// own accounting (`/proc/self/schedstat`, nanosecond resolution).
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(cg) = take(&mut args, "--cgroup") {
        std::fs::write(
            PathBuf::from(&cg).join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .with_context(|| format!("joining cgroup {cg}"))?;
    }
    if let Some(ns) = take(&mut args, "--netns") {
        spright_endpoint::netns::join(std::path::Path::new(&ns))?;
    }
    let mode = args.first().cloned().context("mode is required")?;
    args.remove(0);
    match mode.as_str() {
        "churn" => churn(&mut args),
        "serve" => serve(&mut args),
        "ping" => ping(&mut args),
        m => bail!("unknown mode {m}"),
    }
}

/// Allocates, fills, hands over to itself through a descriptor, checks and
/// frees, `iters` times, with sizes across all classes; holds up to 8
/// buffers at once so frees interleave with other processes' allocations.
fn churn(args: &mut Vec<String>) -> anyhow::Result<()> {
    let pool = Pool::open(&PathBuf::from(need(args, "--region")?))?;
    let iters: u64 = need(args, "--iters")?.parse()?;
    let mut x: u64 = need(args, "--seed")?.parse::<u64>()? | 1;
    let mut held = std::collections::VecDeque::new();
    let (mut allocs, mut oom) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_mins(2);
    for i in 0..iters {
        if Instant::now() > deadline {
            bail!("churn exceeded its time bound at iteration {i}");
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let size = usize::try_from(1 + x % (256 << 10)).unwrap_or(1);
        let tag = u8::try_from(x >> 56).unwrap_or(0);
        match pool.alloc(size) {
            Ok(mut b) => {
                b.fill(tag);
                held.push_back((b.into_descriptor(), tag));
                allocs += 1;
            }
            Err(spright_shm::Error::OutOfMemory(_)) => oom += 1,
            Err(e) => return Err(e.into()),
        }
        if held.len() > 8 || (x & 1 == 0 && !held.is_empty()) {
            let (d, tag): (Descriptor, u8) = held.pop_front().expect("non-empty");
            let b = pool.take(d)?;
            if !b.iter().all(|&v| v == tag) {
                bail!("buffer {d:?} was overwritten by another process");
            }
        }
    }
    for (d, tag) in held {
        let b = pool.take(d)?;
        if !b.iter().all(|&v| v == tag) {
            bail!("buffer {d:?} was overwritten by another process");
        }
    }
    println!("{}", serde_json::json!({ "allocs": allocs, "oom": oom }));
    Ok(())
}

/// Reads every byte of `b` (a wrapping sum of its 8-byte words and the
/// tail), fast enough not to hide the cost of the hop itself.
fn checksum(b: &[u8]) -> u64 {
    let mut words = b.chunks_exact(8);
    let mut sum = words.by_ref().fold(0u64, |s, w| {
        s.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")))
    });
    for &t in words.remainder() {
        sum = sum.wrapping_add(u64::from(t));
    }
    sum
}

/// The 16-byte reply that carries a checksum.
fn reply_of(sum: u64) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&sum.to_le_bytes());
    r
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Tcp,
    Shm,
    ShmDesc,
}

fn mode_of(args: &mut Vec<String>) -> anyhow::Result<Mode> {
    Ok(match need(args, "--mode")?.as_str() {
        "tcp" => Mode::Tcp,
        "shm" => Mode::Shm,
        "shm-desc" => Mode::ShmDesc,
        m => bail!("unknown --mode {m} (tcp, shm, shm-desc)"),
    })
}

fn serve(args: &mut Vec<String>) -> anyhow::Result<()> {
    let listen = need(args, "--listen")?;
    let mode = mode_of(args)?;
    let pool = take(args, "--region")
        .map(|r| Pool::open(&PathBuf::from(r)))
        .transpose()?;
    let l = TcpListener::bind(&listen)?;
    println!("ready");
    std::io::stdout().flush()?;
    let (mut c, _) = l.accept()?;
    c.set_nodelay(true)?;
    let cpu0 = cpu_ns();
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    if mode == Mode::Shm {
        let pool = pool.context("--region is required in shm mode")?;
        while let Some(d) = recv(&mut c)? {
            let b = pool.take(d)?;
            let sum = checksum(&b);
            drop(b);
            c.write_all(&reply_of(sum))?;
            n += 1;
        }
    } else if mode == Mode::ShmDesc {
        let pool = pool.context("--region is required in shm-desc mode")?;
        while let Some(d) = recv(&mut c)? {
            let b = pool.take(d)?;
            let touched = b.first().copied().unwrap_or(0) ^ b.last().copied().unwrap_or(0);
            std::hint::black_box(touched);
            send(&mut c, b.into_descriptor())?;
            n += 1;
        }
    } else {
        let mut hdr = [0u8; 8];
        while read_full(&mut c, &mut hdr)? {
            let len = usize::try_from(u64::from_le_bytes(hdr))?;
            let body = &mut buf[..len];
            if !read_full(&mut c, body)? {
                bail!("peer closed mid-message");
            }
            c.write_all(&reply_of(checksum(body)))?;
            n += 1;
        }
    }
    println!(
        "{}",
        serde_json::json!({ "served": n, "cpu_ns": cpu_ns() - cpu0 })
    );
    Ok(())
}

/// Reads exactly `buf.len()` bytes; `false` on a clean end of stream. EAGAIN
/// from a redirected socket is retried (it blocks again).
fn read_full(c: &mut TcpStream, buf: &mut [u8]) -> anyhow::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match c.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => bail!("unexpected end of stream"),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

fn ping(args: &mut Vec<String>) -> anyhow::Result<()> {
    let addr = need(args, "--connect")?;
    let mode = mode_of(args)?;
    let size: usize = need(args, "--size")?.parse()?;
    let iters: usize = need(args, "--iters")?.parse()?;
    let pool = take(args, "--region")
        .map(|r| Pool::open(&PathBuf::from(r)))
        .transpose()?;
    let mut c = TcpStream::connect(&addr).with_context(|| format!("connecting {addr}"))?;
    c.set_nodelay(true)?;
    let mut lat = Vec::with_capacity(iters);
    // The payload the function has produced (made before timing); moving it
    // to the next function is the hop.
    let mut payload = vec![0u8; size];
    spright_tests::pattern::fill(&mut payload, 0);
    let want = reply_of(checksum(&payload));
    let mut reply = [0u8; 16];
    let cpu0 = cpu_ns();
    let start = Instant::now();
    match mode {
        Mode::Shm => {
            let pool = pool.as_ref().context("--region is required in shm mode")?;
            for i in 0..iters {
                let t = Instant::now();
                let mut b = pool.alloc(size)?;
                b.copy_from_slice(&payload);
                send(&mut c, b.into_descriptor())?;
                if !read_full(&mut c, &mut reply)? {
                    bail!("server closed");
                }
                lat.push(t.elapsed());
                ensure!(reply == want, "message {i}: the server's checksum differs");
            }
        }
        Mode::ShmDesc => {
            // Set-up (allocating and filling the buffer) is not part of a hop.
            let pool = pool
                .as_ref()
                .context("--region is required in shm-desc mode")?;
            let mut b = pool.alloc(size)?;
            b.copy_from_slice(&payload);
            let mut d = b.into_descriptor();
            for _ in 0..iters {
                let t = Instant::now();
                send(&mut c, d)?;
                d = recv(&mut c)?.context("server closed")?;
                lat.push(t.elapsed());
            }
            drop(pool.take(d)?);
        }
        Mode::Tcp => {
            let mut msg = Vec::with_capacity(8 + size);
            msg.extend_from_slice(&(size as u64).to_le_bytes());
            msg.extend_from_slice(&payload);
            for i in 0..iters {
                let t = Instant::now();
                c.write_all(&msg)?;
                if !read_full(&mut c, &mut reply)? {
                    bail!("server closed");
                }
                lat.push(t.elapsed());
                ensure!(reply == want, "message {i}: the server's checksum differs");
            }
        }
    }
    let wall = start.elapsed();
    let cpu = cpu_ns() - cpu0;
    drop(c);
    lat.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{}",
        serde_json::json!({
            "p50_us": us(lat[lat.len() / 2]),
            "p99_us": us(lat[lat.len() * 99 / 100]),
            "wall_us": us(wall),
            "cpu_ns": cpu,
            "iters": iters,
        })
    );
    Ok(())
}
