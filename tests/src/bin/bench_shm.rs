//! `bench-shm`: per-hop latency and CPU per request versus payload size
//! (64 B … 1 MiB) on three paths, measured in one run between two pods of a
//! simulated node:
//!
//! - `tcp`: the payload crosses veth + bridge TCP (spright's programs attached
//!   but the pods in no chain, so they decide "no redirect");
//! - `sockmap`: the same pods in one chain, payload redirected socket to socket;
//! - `shm`: the same chain, the payload goes through a shared-memory pool
//!   (spright-shm): per message the sender allocates a buffer and writes
//!   every byte of the payload into it, and only its 16-byte descriptor
//!   crosses the redirected socket;
//! - `shm-desc` (descriptor only): the same descriptor goes back and forth
//!   and no payload byte is written or read per message: the cost of the
//!   hop alone, which is not a payload moved.
//!
//! A hop is one message and a 16-byte reply. In `tcp`, `sockmap` and `shm`
//! the receiver reads every byte of the payload (a checksum it sends back
//! and the sender verifies); in `shm-desc` it touches the buffer's first and
//! last byte. Both processes are pinned to CPU 0 with
//! `taskset`; latency is the median of the per-hop p50 over three rounds
//! (each round runs every path once, the order rotated round to round); CPU
//! per request is client + server CPU time (scheduler accounting) divided by
//! the requests. Ratios are the median of the paired ratios against `tcp`
//! (each round's over the same round's), with a warning when they spread
//! wider than ±15%. Needs root.
//!
//! Usage: `bench-shm [--quick]`.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use spright_ebpf::Datapath;
use spright_tests::{
    sandbox::{Peer, Sandbox, workspace_bin},
    shm_csi::MountDir,
    stats,
};

const T: Duration = Duration::from_mins(2);
const SIZES: [usize; 6] = [64, 1 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20];
const PATHS: [&str; 4] = ["tcp", "sockmap", "shm", "shm-desc"];

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    spright_tests::privileged::check().map_err(|e| anyhow::anyhow!("bench-shm needs root: {e}"))?;
    // Ctrl-C unwinds: the peers (own process groups) and the sandbox go.
    spright_tests::procgroup::trap_interrupts()?;
    let mut sb = Sandbox::new("bs")?;
    let (a, b) = (sb.add_pod()?, sb.add_pod()?);
    let (mut dp, _) = Datapath::ensure(&sb.placement())?;
    let dir = MountDir::new()?;
    let region = dir.tmpfs("region", "64m")?;

    let mut rows = Vec::new();
    let mut warnings = Vec::new();
    let mut port = 7300u16;
    for &size in &SIZES {
        let mut row = serde_json::json!({ "size": size });
        let runs = if quick { 1 } else { 3 };
        let iters = (100_000_000 / size).clamp(200, if quick { 1_000 } else { 5_000 });
        // Rounds of every path, rotated; each round pairs with its own tcp.
        let rounds = stats::run_rounds(&PATHS, runs, |round, path| {
            spright_tests::procgroup::check_interrupted()?;
            sb.set_chain(&mut dp, &[a, b], (path != "tcp").then_some("bench"))?;
            port += 1;
            let addr = std::net::SocketAddr::new(sb.pods[b].ip.into(), port).to_string();
            let mode = if path == "sockmap" { "tcp" } else { path };
            let region_args = ["--region", region.to_str().context("utf-8 path")?];
            let extra: &[&str] = if path.starts_with("shm") {
                &region_args
            } else {
                &[]
            };
            let mut srv_args = vec!["serve", "--listen", &addr, "--mode", mode];
            srv_args.extend_from_slice(extra);
            let srv = worker(&sb, b, &srv_args)?;
            ensure!(srv.line(T)? == "ready", "server did not start");
            let (size_s, iters_s) = (size.to_string(), iters.to_string());
            let mut cli_args = vec![
                "ping",
                "--connect",
                &addr,
                "--mode",
                mode,
                "--size",
                &size_s,
                "--iters",
                &iters_s,
            ];
            cli_args.extend_from_slice(extra);
            let cli = worker(&sb, a, &cli_args)?;
            let c = cli
                .report(T)
                .with_context(|| format!("{path} at {size} B"))?;
            let s = srv.report(T)?;
            cli.finish(T)?;
            srv.finish(T)?;
            let p50 = c["p50_us"].as_f64().context("p50_us")?;
            let cpu = (c["cpu_ns"].as_f64().unwrap_or(0.0) + s["cpu_ns"].as_f64().unwrap_or(0.0))
                / iters as f64
                / 1000.0;
            eprintln!(
                "  {size:>8} B  round {}  {path:<8} hop p50 {p50:>8.1} µs  cpu/req {cpu:>8.1} µs",
                round + 1
            );
            Ok((p50, cpu))
        })?;
        let column = |k: usize, f: fn(&(f64, f64)) -> f64| -> Vec<f64> {
            rounds.iter().map(|r| f(&r[k])).collect()
        };
        for (k, path) in PATHS.iter().enumerate() {
            let (p50s, cpus) = (column(k, |x| x.0), column(k, |x| x.1));
            // tcp over this path, round by round (how many times better).
            let p50_ratio = stats::Spread::of(&stats::paired_ratios(&column(0, |x| x.0), &p50s));
            let cpu_ratio = stats::Spread::of(&stats::paired_ratios(&column(0, |x| x.1), &cpus));
            if let Some(r) = p50_ratio.filter(|r| r.wider_than(stats::NOISY_SPREAD)) {
                warnings.push(format!(
                    "noisy: {size} B, tcp / {path} hop p50: paired ratios {:.2}–{:.2} around {:.2}, wider than ±{:.0}%",
                    r.min,
                    r.max,
                    r.median,
                    stats::NOISY_SPREAD * 100.0
                ));
            }
            row[*path] = serde_json::json!({
                "p50_us": stats::median(&p50s),
                "cpu_us": stats::median(&cpus),
                "p50_us_rounds": p50s,
                "cpu_us_rounds": cpus,
                "tcp_over_path_p50": p50_ratio.map(|r| [r.median, r.min, r.max]),
                "tcp_over_path_cpu": cpu_ratio.map(|r| [r.median, r.min, r.max]),
            });
        }
        rows.push(row);
    }
    drop(dp);
    drop(sb);
    print_table(&rows, if quick { 1 } else { 3 });
    for w in &warnings {
        println!("warning: {w}");
    }
    let out = std::path::Path::new("target/bench");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("shm.json"), serde_json::to_string_pretty(&rows)?)?;
    println!("\nresults written to target/bench/shm.json");
    Ok(())
}

/// `taskset -c 0 spright-shm-worker --cgroup CG --netns POD ARGS` (a process of pod `pod`).
fn worker(sb: &Sandbox, pod: usize, args: &[&str]) -> anyhow::Result<Peer> {
    let mut cmd = std::process::Command::new("taskset");
    cmd.args(["-c", "0"])
        .arg(workspace_bin("spright-shm-worker"))
        .arg("--cgroup")
        .arg(&sb.cgroup.path)
        .arg("--netns")
        .arg(sb.pods[pod].ns.path())
        .args(args);
    Peer::spawn_group(cmd)
}

fn print_table(rows: &[serde_json::Value], rounds: usize) {
    println!(
        "\nOne hop (message + 16-byte reply), both ends on CPU 0; medians of {rounds} interleaved round(s); \
         ratios: median of the paired ratios tcp / path (round by round).\n\
         tcp, sockmap, shm: the payload is written by the sender and every byte read by the \
         receiver, per message.\nshm-desc: descriptor only, no payload byte moved (the hop alone)."
    );
    for (what, key, ratio, unit) in [
        ("hop p50", "p50_us", "tcp_over_path_p50", "µs"),
        ("CPU per hop", "cpu_us", "tcp_over_path_cpu", "µs"),
    ] {
        println!("\n{what} ({unit}, and tcp / path)");
        print!("{:>8}", "bytes");
        for p in PATHS {
            print!(" | {p:>9} {:>7}", "ratio");
        }
        println!();
        for r in rows {
            let g = |p: &str| r[p][key].as_f64().unwrap_or(f64::NAN);
            print!("{:>8}", r["size"].as_u64().unwrap_or(0));
            for p in PATHS {
                let paired = r[p][ratio][0].as_f64().unwrap_or(f64::NAN);
                print!(" | {:>9.1} {:>6.2}x", g(p), paired);
            }
            println!();
        }
    }
}
