//! `bench`: one hop per SDK language next to plain TCP and the Rust SDK, in
//! the same run, on loopback (`cargo xtask bench shm --lang c,python`).
//!
//! A hop is one message to the chain's last function and its answer. The
//! function reads every byte of the payload (CRC-32 by zlib's `crc32`, the
//! same C function in every language: Python's `zlib.crc32` runs it, the
//! C stage links it, and the Rust servers call it, so every path does
//! equal work) and answers with the checksum, which the client verifies:
//!
//! - `tcp`: the payload's bytes cross a plain TCP connection to a Rust
//!   server, which answers with 16 bytes;
//! - `rust`, `c`, `python`: the client allocates a buffer in the pool file
//!   (in /dev/shm), writes every byte of the payload into it and sends its
//!   16-byte descriptor to a stage written with that language's SDK on the
//!   event-driven loop (`event::stage`, `spright_stage_run`,
//!   `spright.stage`), which writes the checksum over the payload's first
//!   bytes and sends the descriptor back.
//!
//! Each server is its own process. Rounds run every path at every size, the
//! order rotated round to round; a path's latency is the median over rounds
//! of its per-round p50, and its ratios are the medians of its per-round
//! ratios to the same round's `tcp` and `rust`. The client and every server
//! run pinned (`--cpus CLIENT,SERVER`, default `0,0`: one CPU, as `bench
//! shm` pins its two pods, so a hop is the ping-pong's work and not a
//! cross-CPU wake-up, which costs ~50 µs on a VM; `--cpus none` leaves
//! placement to the scheduler), so each path runs on the same CPUs.
//!
//! ```text
//! bench [--lang c,python] [--python PY] [--rounds N] [--quick] [--cpus C,S|none]
//! bench serve tcp|rust POOL          (a server; prints its port)
//! ```

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use spright_shm::{Pool, event};

const SIZES: [usize; 3] = [64, 64 << 10, 1 << 20];
/// Header and 8 chunks of 4 MiB: every class the sizes use, with room.
const POOL_SIZE: u64 = (8 << 10) + (8 << 22);

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        return serve(&args[1..]);
    }
    let mut langs = Vec::new();
    let mut python = None;
    let mut rounds = 3;
    let mut quick = false;
    let mut cpus = Some((0, 0));
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--lang" => {
                let v = it.next().ok_or("--lang needs c,python")?;
                for l in v.split(',') {
                    if !["c", "python"].contains(&l) {
                        return Err(format!("--lang {l}: c or python").into());
                    }
                    langs.push(l.to_owned());
                }
            }
            "--python" => python = Some(it.next().ok_or("--python needs a path")?.clone()),
            "--rounds" => rounds = it.next().ok_or("--rounds needs N")?.parse()?,
            "--quick" => quick = true,
            "--cpus" => {
                let v = it.next().ok_or("--cpus needs CLIENT,SERVER or none")?;
                cpus = match v.split_once(',') {
                    _ if v == "none" => None,
                    Some((c, s)) => Some((
                        c.parse().map_err(|e| format!("--cpus {v}: {e}"))?,
                        s.parse().map_err(|e| format!("--cpus {v}: {e}"))?,
                    )),
                    None => return Err(format!("--cpus {v}: CLIENT,SERVER or none").into()),
                };
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if quick {
        rounds = 1;
    }

    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::tempdir_in(base)?;
    let pool_path = dir.path().join(spright_shm::POOL_FILE);
    let pool = Pool::open_file(&pool_path, POOL_SIZE)?;
    let pool_s = pool_path.to_str().ok_or("utf-8 path")?;
    let me = std::env::current_exe()?;
    let server_cpu = if let Some((client, server)) = cpus {
        let n = std::thread::available_parallelism()?.get();
        if client >= n || server >= n {
            return Err(
                format!("--cpus {client},{server}: CPUs below {n} (or --cpus none)").into(),
            );
        }
        let mut set = nix::sched::CpuSet::new();
        set.set(client)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
        println!("pinned: the client to CPU {client}, every server to CPU {server}");
        Some(server)
    } else {
        println!("not pinned (--cpus none): compare the ratios, not the absolute numbers");
        None
    };
    // A server's command, under `taskset` when pinned.
    let cmd = |program: &Path| match server_cpu {
        Some(cpu) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpu.to_string()).arg(program);
            c
        }
        None => Command::new(program),
    };

    let mut servers: Vec<(String, Server)> = vec![
        (
            "tcp".into(),
            Server::start(cmd(&me).args(["serve", "tcp", pool_s]))?,
        ),
        (
            "rust".into(),
            Server::start(cmd(&me).args(["serve", "rust", pool_s]))?,
        ),
    ];
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    for lang in &langs {
        let server = if lang == "c" {
            let exe = dir.path().join("bench_stage");
            compile_c_stage(here, &me, &exe)?;
            Server::start(cmd(&exe).arg(pool_s))?
        } else {
            let py = python.clone().unwrap_or_else(|| "python3".into());
            Server::start(
                cmd(Path::new(&py))
                    .arg(here.join("examples/bench_stage.py"))
                    .arg(pool_s),
            )?
        };
        servers.push((lang.clone(), server));
    }

    // p50s[path][size][round] in microseconds.
    let n = servers.len();
    let mut p50s = vec![vec![Vec::new(); SIZES.len()]; n];
    let mut conns: Vec<TcpStream> = servers
        .iter()
        .map(|(_, s)| {
            let c = TcpStream::connect(&s.addr)?;
            c.set_nodelay(true)?;
            Ok(c)
        })
        .collect::<std::io::Result<_>>()?;
    for round in 0..rounds {
        for (si, &size) in SIZES.iter().enumerate() {
            let iters = (if quick { 20_000_000 } else { 100_000_000 } / size).clamp(100, 5_000);
            let payload: Vec<u8> = (0..size)
                .map(|i| (i * 7 + round).to_le_bytes()[0])
                .collect();
            let want = zlib_crc32(&payload);
            for k in 0..n {
                let p = (k + round) % n;
                let lat = if servers[p].0 == "tcp" {
                    hops_tcp(&mut conns[p], &payload, want, iters)?
                } else {
                    hops_sdk(&pool, &mut conns[p], &payload, want, iters)?
                };
                p50s[p][si].push(median(lat));
            }
        }
    }
    drop(conns);
    report(&servers, &p50s, rounds)?;
    let s = pool.stats();
    assert_eq!(s.free, s.carved, "every buffer went back to the pool");
    drop(servers);
    Ok(())
}

fn compile_c_stage(here: &Path, me: &Path, exe: &Path) -> Result<()> {
    // target/<profile>/examples/bench -> target/<profile>/libspright_shm.a
    let lib = me
        .parent()
        .and_then(Path::parent)
        .ok_or("no target dir")?
        .join("libspright_shm.a");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(here.join("include"))
        .arg(here.join("examples/bench_stage.c"))
        .arg(&lib)
        .args([
            "-lz",
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-o",
        ])
        .arg(exe)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "{cc} examples/bench_stage.c: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd.stdout(Stdio::piped()).spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
        let port: u16 = line
            .trim()
            .parse()
            .map_err(|_| format!("{cmd:?} printed {line:?}, not its port"))?;
        Ok(Self {
            child,
            addr: format!("127.0.0.1:{port}"),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hops_sdk(
    pool: &Pool,
    c: &mut TcpStream,
    payload: &[u8],
    want: u32,
    iters: usize,
) -> Result<Vec<f64>> {
    let mut lat = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let mut b = pool.alloc(payload.len())?;
        b.copy_from_slice(payload);
        spright_shm::send(c, b.into_descriptor())?;
        let d = spright_shm::recv(c)?.ok_or("the stage closed")?;
        let b = pool.take(d)?;
        let got = u32::from_le_bytes(b[..4].try_into()?);
        drop(b);
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        if got != want {
            return Err(format!("checksum {got:#x}, want {want:#x}").into());
        }
    }
    Ok(lat)
}

fn hops_tcp(c: &mut TcpStream, payload: &[u8], want: u32, iters: usize) -> Result<Vec<f64>> {
    let mut lat = Vec::with_capacity(iters);
    let len = u32::try_from(payload.len())?.to_le_bytes();
    let mut answer = [0u8; 16];
    for _ in 0..iters {
        let t = Instant::now();
        c.write_all(&len)?;
        c.write_all(payload)?;
        c.read_exact(&mut answer)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        let got = u32::from_le_bytes(answer[..4].try_into()?);
        if got != want {
            return Err(format!("checksum {got:#x}, want {want:#x}").into());
        }
    }
    Ok(lat)
}

fn serve(args: &[String]) -> Result<()> {
    let [kind, pool_path] = args else {
        return Err("usage: bench serve tcp|rust POOL".into());
    };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    if kind == "rust" {
        let pool = Pool::open_file(Path::new(pool_path), 0)?;
        event::stage(&pool, listener, None, |mut b| {
            let c = zlib_crc32(&b);
            b[..4].copy_from_slice(&c.to_le_bytes());
            b
        })?;
        return Ok(());
    }
    // Plain TCP: a length, the payload; the answer is 16 bytes.
    let mut buf = vec![0u8; 1 << 20];
    for conn in listener.incoming() {
        let mut c = conn?;
        c.set_nodelay(true)?;
        let mut len = [0u8; 4];
        while c.read_exact(&mut len).is_ok() {
            let n = u32::from_le_bytes(len) as usize;
            c.read_exact(&mut buf[..n])?;
            let mut answer = [0u8; 16];
            answer[..4].copy_from_slice(&zlib_crc32(&buf[..n]).to_le_bytes());
            c.write_all(&answer)?;
        }
    }
    Ok(())
}

#[link(name = "z")]
unsafe extern "C" {
    /// zlib's `crc32(crc, buf, len)`.
    #[link_name = "crc32"]
    fn zlib_crc32_update(
        crc: std::ffi::c_ulong,
        buf: *const u8,
        len: std::ffi::c_uint,
    ) -> std::ffi::c_ulong;
}

/// CRC-32 of `b` by zlib, the function the C and Python stages run.
fn zlib_crc32(b: &[u8]) -> u32 {
    let mut crc: std::ffi::c_ulong = 0;
    for chunk in b.chunks(1 << 30) {
        let len = std::ffi::c_uint::try_from(chunk.len()).expect("chunks are under 4 GiB");
        // SAFETY: `chunk` is `len` readable bytes; zlib only reads them.
        crc = unsafe { zlib_crc32_update(crc, chunk.as_ptr(), len) };
    }
    u32::try_from(crc).expect("a CRC-32 fits 32 bits")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        f64::midpoint(v[m - 1], v[m])
    }
}

/// Median and range of the per-round ratios `path / base`.
fn ratios(path: &[f64], base: &[f64]) -> (f64, f64, f64) {
    let r: Vec<f64> = path.iter().zip(base).map(|(p, b)| p / b).collect();
    let min = r.iter().copied().fold(f64::INFINITY, f64::min);
    let max = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(r), min, max)
}

fn report(servers: &[(String, Server)], p50s: &[Vec<Vec<f64>>], rounds: usize) -> Result<()> {
    println!(
        "one hop (message + answer, the function reads every byte), loopback, pool in /dev/shm;\n\
         p50 in µs: median over {rounds} round(s); ratios: median of the per-round ratios to the same round's tcp and rust\n"
    );
    print!("{:>8}", "size");
    for (name, _) in servers {
        print!(" | {name:>8} µs  ×tcp  ×rust");
    }
    println!();
    let mut rows = Vec::new();
    for (si, size) in SIZES.iter().enumerate() {
        print!("{size:>8}");
        let mut row = serde_json::json!({ "size": size });
        for (p, (name, _)) in servers.iter().enumerate() {
            let p50 = median(p50s[p][si].clone());
            let tcp = ratios(&p50s[p][si], &p50s[0][si]);
            let rust = ratios(&p50s[p][si], &p50s[1][si]);
            print!(" | {p50:>11.1} {:>5.2} {:>5.2}", tcp.0, rust.0);
            row[name] = serde_json::json!({
                "p50_us": p50,
                "p50_us_rounds": p50s[p][si],
                "over_tcp": [tcp.0, tcp.1, tcp.2],
                "over_rust": [rust.0, rust.1, rust.2],
            });
        }
        println!();
        rows.push(row);
    }
    let out = Path::new("target/bench");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("sdk.json"), serde_json::to_string_pretty(&rows)?)?;
    println!("\nresults written to target/bench/sdk.json");
    Ok(())
}
