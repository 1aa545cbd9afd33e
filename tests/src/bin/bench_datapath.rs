//! `bench-datapath`: RTT and throughput between two pods on one node, for
//! message sizes 64 B … 1 MiB, on four set-ups measured in the same run:
//!
//! - `bridge`: pods made by the reference CNI `bridge` plugin with `host-local`
//!   IPAM (`/usr/lib/cni`), processes outside any spright cgroup;
//! - `spright-off`: veth + bridge pods in spright's cgroup with the programs
//!   attached, recorded without a chain (the programs run and decide "no");
//! - `quickack`: the spright-off pods with `quickack 1` on their routes (what
//!   spright-cni sets for chain members), to show that mitigation's cost on
//!   the TCP path;
//! - `spright-on`: the same pods recorded in one chain (socket to socket).
//!
//! Client and server are pinned with `taskset`, both on CPU 0 ("same vCPU")
//! and on CPUs 0 and 1 ("cross vCPU"). Each figure is the median of three
//! rounds (each round runs every set-up once, the order rotated round to
//! round); spright-on's ratios are the median of its paired ratios against
//! `bridge` (each round's over the same round's), with a warning when they
//! spread wider than ±15%. Needs root. Results
//! also go to `target/bench/datapath.json`.
//!
//! Usage: `bench-datapath [--quick]` (`cargo xtask bench datapath`).

use std::{net::IpAddr, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, bail, ensure};
use spright_ebpf::Datapath;
use spright_tests::{
    cni,
    sandbox::{Netns, Peer, Sandbox, netpeer_bin},
    stats,
};

const T: Duration = Duration::from_mins(2);
const SIZES: [usize; 5] = [64, 1 << 10, 16 << 10, 64 << 10, 1 << 20];
/// The set-ups, in table order; `bridge` is the baseline.
const MODES: [&str; 4] = ["bridge", "spright-off", "quickack", "spright-on"];

/// Two pods and how to start processes in them.
struct Pair {
    name: &'static str,
    server_ns: String,
    client_ns: String,
    server_ip: IpAddr,
    cgroup: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    spright_tests::privileged::check()
        .map_err(|e| anyhow::anyhow!("bench-datapath needs root: {e}"))?;
    // Ctrl-C unwinds: the peers (own process groups) and the sandbox go.
    spright_tests::procgroup::trap_interrupts()?;
    let ncpu = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);

    // spright pods (also used, re-labelled, for spright-off).
    let mut sb = Sandbox::new("b")?;
    let (a, b) = (sb.add_pod()?, sb.add_pod()?);
    let (mut dp, _) = Datapath::ensure(&sb.placement())?;
    // The reference plugin's node and pods.
    let reference = RefNode::new()?;

    let spright = |name| Pair {
        name,
        server_ns: sb.pods[b].ns.path().display().to_string(),
        client_ns: sb.pods[a].ns.path().display().to_string(),
        server_ip: sb.pods[b].ip.into(),
        cgroup: Some(sb.cgroup.path.display().to_string()),
    };
    let bridge = Pair {
        name: "bridge",
        server_ns: reference.pods[1].0.path().display().to_string(),
        client_ns: reference.pods[0].0.path().display().to_string(),
        server_ip: reference.pods[1].1,
        cgroup: None,
    };

    let placements: Vec<(&str, [&str; 2])> = if ncpu > 1 {
        vec![("same vCPU", ["0", "0"]), ("cross vCPU", ["0", "1"])]
    } else {
        vec![("same vCPU", ["0", "0"])]
    };
    let sizes: &[usize] = if quick { &SIZES[..2] } else { &SIZES };
    let mut results = Vec::new();
    let mut warnings = Vec::new();
    let runs = if quick { 1 } else { 3 };
    for (pin_name, cpus) in &placements {
        for &size in sizes {
            let mut row = serde_json::json!({ "cpus": pin_name, "size": size });
            // Rounds of every mode, the order rotated each round; each
            // round's figures pair with the same round's bridge figures.
            let rounds = stats::run_rounds(&MODES, runs, |round, mode| {
                // `quickack`: the spright-off pods with `quickack 1` on their
                // routes, as spright-cni sets it for chain members: the cost
                // of that mitigation on the TCP path.
                set_quickack(&sb, &[a, b], mode == "quickack")?;
                let pair = match mode {
                    "bridge" => &bridge,
                    "quickack" => {
                        sb.set_chain(&mut dp, &[a, b], None)?;
                        &spright("quickack")
                    }
                    m => {
                        sb.set_chain(&mut dp, &[a, b], (m == "spright-on").then_some("bench"))?;
                        &spright(if m == "spright-on" {
                            "spright-on"
                        } else {
                            "spright-off"
                        })
                    }
                };
                let port = 7100 + u16::try_from(round)?;
                let (rtt, tput) = measure(pair, cpus, size, quick, port)
                    .with_context(|| format!("{} at {size} B, {pin_name}", pair.name))?;
                eprintln!(
                    "  {pin_name:<10} {size:>8} B  round {}  {mode:<12} RTT p50 {rtt:>8.1} µs  {tput:>9.0} MiB/s",
                    round + 1
                );
                Ok((rtt, tput))
            })?;
            let column = |m: usize, f: fn(&(f64, f64)) -> f64| -> Vec<f64> {
                rounds.iter().map(|r| f(&r[m])).collect()
            };
            for (m, mode) in MODES.iter().enumerate() {
                let (rtts, tputs) = (column(m, |x| x.0), column(m, |x| x.1));
                row[*mode] = serde_json::json!({
                    "rtt_p50_us": stats::median(&rtts),
                    "mib_per_s": stats::median(&tputs),
                    "rtt_p50_us_rounds": rtts,
                    "mib_per_s_rounds": tputs,
                });
            }
            // spright-on against bridge, paired round by round: RTT speed-up
            // (bridge / spright-on) and throughput ratio (spright-on / bridge).
            let on = MODES.iter().position(|m| *m == "spright-on").unwrap_or(3);
            let speedup = stats::Spread::of(&stats::paired_ratios(
                &column(0, |x| x.0),
                &column(on, |x| x.0),
            ));
            let tput = stats::Spread::of(&stats::paired_ratios(
                &column(on, |x| x.1),
                &column(0, |x| x.1),
            ));
            for (what, s) in [("RTT speed-up", speedup), ("throughput ratio", tput)] {
                if let Some(s) = s.filter(|s| s.wider_than(stats::NOISY_SPREAD)) {
                    warnings.push(format!(
                        "noisy: {pin_name}, {size} B, spright-on vs bridge {what}: paired ratios {:.2}–{:.2} \
                         around {:.2}, wider than ±{:.0}%",
                        s.min,
                        s.max,
                        s.median,
                        stats::NOISY_SPREAD * 100.0
                    ));
                }
            }
            row["paired"] = serde_json::json!({
                "rtt_speedup": speedup.map(|s| [s.median, s.min, s.max]),
                "mib_per_s_ratio": tput.map(|s| [s.median, s.min, s.max]),
            });
            results.push(row);
        }
    }
    drop(dp);
    drop(reference);
    drop(sb);

    print_table(&results, runs);
    print_quickack(&results);
    for w in &warnings {
        println!("warning: {w}");
    }
    let out = Path::new("target/bench");
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join("datapath.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    println!("\nresults written to target/bench/datapath.json");
    Ok(())
}

/// Sets or clears `quickack 1` on every route of the pods' `eth0`.
fn set_quickack(sb: &Sandbox, pods: &[usize], on: bool) -> anyhow::Result<()> {
    let q = if on { "1" } else { "0" };
    for &pod in pods {
        let ns = &sb.pods[pod].ns;
        ns.ip(&[
            "route",
            "change",
            "10.213.0.0/24",
            "dev",
            "eth0",
            "proto",
            "kernel",
            "scope",
            "link",
            "src",
            &sb.pods[pod].ip.to_string(),
            "quickack",
            q,
        ])?;
        ns.ip(&[
            "route",
            "change",
            "default",
            "via",
            &spright_tests::sandbox::gateway().to_string(),
            "dev",
            "eth0",
            "quickack",
            q,
        ])?;
    }
    Ok(())
}

fn print_quickack(results: &[serde_json::Value]) {
    println!(
        "\nquickack on the TCP path (pods not redirected): with vs without, same pods, same run"
    );
    println!(
        "{:<10} {:>8} | {:>10} {:>10} {:>7} | {:>10} {:>10} {:>7}",
        "cpus", "size", "RTT off", "RTT qa", "ratio", "MiB/s off", "MiB/s qa", "ratio"
    );
    for r in results {
        let g = |m: &str, k: &str| r[m][k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<10} {:>8} | {:>10.1} {:>10.1} {:>6.2}x | {:>10.0} {:>10.0} {:>6.2}x",
            r["cpus"].as_str().unwrap_or(""),
            r["size"].as_u64().unwrap_or(0),
            g("spright-off", "rtt_p50_us"),
            g("quickack", "rtt_p50_us"),
            g("quickack", "rtt_p50_us") / g("spright-off", "rtt_p50_us"),
            g("spright-off", "mib_per_s"),
            g("quickack", "mib_per_s"),
            g("quickack", "mib_per_s") / g("spright-off", "mib_per_s"),
        );
    }
}

/// One run: RTT p50 (µs) and throughput (MiB/s), on `port` and `port + 50`.
fn measure(
    pair: &Pair,
    cpus: &[&str; 2],
    size: usize,
    quick: bool,
    port: u16,
) -> anyhow::Result<(f64, f64)> {
    let iters = (200_000_000 / size).clamp(200, if quick { 2_000 } else { 20_000 });
    let bytes = (size as u64 * 50_000).clamp(8 << 20, if quick { 64 << 20 } else { 512 << 20 });
    spright_tests::procgroup::check_interrupted()?;
    let addr = sock_addr(pair.server_ip, port);
    let srv = spawn(pair, &pair.server_ns, cpus[1], &["echo", "--listen", &addr])?;
    ensure!(srv.line(T)? == "ready", "echo server did not start");
    let cli = spawn(
        pair,
        &pair.client_ns,
        cpus[0],
        &[
            "pingpong",
            "--connect",
            &addr,
            "--size",
            &size.to_string(),
            "--iters",
            &iters.to_string(),
        ],
    )?;
    let rtt = cli.report(T)?["p50_us"].as_f64().context("p50_us")?;
    cli.finish(T)?;
    srv.finish(T)?;

    let addr = sock_addr(pair.server_ip, port + 50);
    let srv = spawn(pair, &pair.server_ns, cpus[1], &["sink", "--listen", &addr])?;
    ensure!(srv.line(T)? == "ready", "sink did not start");
    let cli = spawn(
        pair,
        &pair.client_ns,
        cpus[0],
        &[
            "bulk",
            "--connect",
            &addr,
            "--bytes",
            &bytes.to_string(),
            "--chunk",
            &size.to_string(),
        ],
    )?;
    let tput = cli.report(T)?["mib_per_s"].as_f64().context("mib_per_s")?;
    cli.finish(T)?;
    srv.finish(T)?;
    Ok((rtt, tput))
}

fn sock_addr(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

fn spawn(pair: &Pair, netns: &str, cpu: &str, args: &[&str]) -> anyhow::Result<Peer> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpu]).arg(netpeer_bin());
    if let Some(cg) = &pair.cgroup {
        cmd.args(["--cgroup", cg]);
    }
    cmd.args(["--netns", netns]).args(args);
    Peer::spawn_group(cmd)
}

fn print_table(results: &[serde_json::Value], rounds: usize) {
    println!(
        "\nRTT p50 (µs, lower is better) and throughput (MiB/s), medians of {rounds} interleaved round(s); \
         ratios: median of the paired ratios vs bridge (round by round)"
    );
    println!(
        "{:<10} {:>8} | {:>9} {:>11} {:>10} {:>7} | {:>9} {:>11} {:>10} {:>7}",
        "cpus",
        "size",
        "RTT brdg",
        "RTT spr-off",
        "RTT spr-on",
        "speedup",
        "MiB/s brdg",
        "spr-off",
        "spr-on",
        "ratio"
    );
    for r in results {
        let g = |m: &str, k: &str| r[m][k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<10} {:>8} | {:>9.1} {:>11.1} {:>10.1} {:>6.2}x | {:>10.0} {:>11.0} {:>10.0} {:>6.2}x",
            r["cpus"].as_str().unwrap_or(""),
            r["size"].as_u64().unwrap_or(0),
            g("bridge", "rtt_p50_us"),
            g("spright-off", "rtt_p50_us"),
            g("spright-on", "rtt_p50_us"),
            r["paired"]["rtt_speedup"][0].as_f64().unwrap_or(f64::NAN),
            g("bridge", "mib_per_s"),
            g("spright-off", "mib_per_s"),
            g("spright-on", "mib_per_s"),
            r["paired"]["mib_per_s_ratio"][0]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
    }
}

/// A node namespace whose two pods were made by the reference `bridge` plugin.
struct RefNode {
    pods: Vec<(Netns, IpAddr)>,
    _node: Netns,
    _ipam: tempfile::TempDir,
}

impl RefNode {
    fn new() -> anyhow::Result<Self> {
        let plugin_dir = Path::new(cni::REFERENCE_PLUGINS);
        if !plugin_dir.join("bridge").exists() {
            bail!("the reference plugins are missing: apt-get install containernetworking-plugins");
        }
        let tag = format!("sprref{}", std::process::id() % 100_000);
        let node = Netns::create(format!("{tag}-node"))?;
        let ipam = tempfile::tempdir()?;
        let conf = serde_json::json!({
            "cniVersion": "1.0.0", "name": "reference", "type": "bridge", "bridge": "cni0",
            "isGateway": true,
            "ipam": { "type": "host-local", "subnet": "10.213.1.0/24", "dataDir": ipam.path() },
        })
        .to_string();
        let conf: serde_json::Value = serde_json::from_str(&conf)?;
        let mut pods = Vec::new();
        for i in 0..2 {
            let ns = Netns::create(format!("{tag}-p{i}"))?;
            let attach = cni::Attach {
                container_id: format!("{tag}-{i}"),
                netns: ns.path().display().to_string(),
                ifname: "eth0".into(),
                args: String::new(),
            };
            let r = cni::invoke_plugin(
                &plugin_dir.join("bridge"),
                &node.path(),
                "ADD",
                &conf,
                Some(&attach),
                &cni::plugin_path(),
            )?;
            ensure!(r.ok, "bridge ADD failed: {}", r.stdout);
            let ip = cni::result_ips(&r.stdout)?
                .into_iter()
                .next()
                .context("no IP in the bridge plugin's result")?;
            pods.push((ns, ip));
        }
        Ok(Self {
            pods,
            _node: node,
            _ipam: ipam,
        })
    }
}
