//! `spright-demo`: a chain of four unmodified HTTP functions on a simulated
//! node, run on the reference bridge CNI, on spright without acceleration and
//! on spright with acceleration, then the SDK's shared-memory chain (plus,
//! with `--bench`, a sidecar-mesh baseline), compared side by side. Needs root. `cargo xtask demo` runs it.
//!
//! ```text
//! spright-demo [--bench] [--modes reference,sidecar,spright-off,spright-on,spright-sdk]
//!              [--length 4] [--payload 1024 | --payloads 64,1024,65536,1048576]
//!              [--connections 8] [--duration 3] [--work 1] [--reps 2] [--services]
//!              [--sdk-langs rust,c,python]
//! ```
//!
//! `--sdk-langs` writes the `spright-sdk` chain's functions in the SDK's
//! languages, position by position (rust, c or python; missing positions
//! are Rust; position 0 is the gateway, which only Rust has): the C stage
//! is shm-csi/sdk/c/examples/chain_stage.c, compiled against the built
//! `libspright_shm.so`, the Python one shm-csi/sdk/python/examples/
//! chain_stage.py under `$SPRIGHT_PYTHON` (`cargo xtask demo` builds both
//! and sets it). Each does the same work as the Rust stages; the table
//! names the row with the languages, `spright + SDK shared memory
//! (rust,c,python,rust)`.
//!
//! `--payloads` runs the whole comparison once per body size and ends with
//! one table of the tiers side by side, size by size: the SDK's
//! requests/s over the transparent tier's, and a warning for every size
//! at which the SDK tier was the slower one.
//!
//! The modes run in `--reps` rounds (default 2 for the demo, 3 with
//! `--bench`, where `--duration` defaults to 10 s), each round every mode
//! once, the order rotated from round to round. The table gives per mode
//! the median and min–max over the rounds, and per comparison with the
//! reference the median and range of the paired ratios (each round's mode
//! over the same round's reference); it warns when other processes used
//! the machine during a measured window or a paired ratio spreads wider
//! than ±15%.
//!
//! `--services` calls every function through its own ClusterIP, with
//! kube-proxy's DNAT emulated by iptables rules in the node namespace (and,
//! for spright, the Services in meshd's service files).
//!
//! Writes `target/demo/results.{json,md}` and `target/demo/chain.{svg,png}`
//! (with `--payloads`, `results-<size>.*` and `chain-<size>.*` per size and
//! `sweep.{json,md}`).
//! Everything it creates is removed at the end, on failure and on Ctrl-C
//! (every process it starts is in a process group of its own, killed as a
//! group).

use std::process::ExitCode;

use anyhow::Context as _;

use spright_tests::{
    chain::{self, Mode, Report, Spec},
    plot,
    pod::{take_num, take_opt},
    sdk_lang::Lang,
    stats,
};

fn main() -> ExitCode {
    if let Err(e) = spright_tests::procgroup::trap_interrupts() {
        eprintln!("spright-demo: {e:#}");
        return ExitCode::FAILURE;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spright-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args.remove(i))
            .is_some()
    };
    let bench = flag("--bench");
    let services = flag("--services");
    let reps = usize::try_from(take_num(&mut args, "--reps", if bench { 3 } else { 2 })?)?;
    anyhow::ensure!(
        (1..=20).contains(&reps),
        "--reps must be 1 to 20, got {reps}"
    );
    let payloads: Vec<usize> = match take_opt(&mut args, "--payloads")? {
        Some(list) => {
            anyhow::ensure!(
                !args.iter().any(|a| a == "--payload"),
                "--payload and --payloads exclude each other"
            );
            list.split(',')
                .map(|v| {
                    v.parse()
                        .with_context(|| format!("--payloads: {v:?} is not a number"))
                })
                .collect::<anyhow::Result<_>>()?
        }
        None => Vec::new(),
    };
    let spec = Spec {
        length: usize::try_from(take_num(&mut args, "--length", 4)?)?,
        payload: usize::try_from(take_num(&mut args, "--payload", 1024)?)?,
        connections: usize::try_from(take_num(&mut args, "--connections", 8)?)?,
        seconds: take_num(&mut args, "--duration", if bench { 10 } else { 3 })?,
        work: u32::try_from(take_num(&mut args, "--work", 1)?)?,
        services,
        sdk_langs: match take_opt(&mut args, "--sdk-langs")? {
            Some(list) => Lang::parse_list(&list)?,
            None => Vec::new(),
        },
    };
    let modes: Vec<Mode> = match take_opt(&mut args, "--modes")? {
        Some(list) => list
            .split(',')
            .map(Mode::parse)
            .collect::<anyhow::Result<_>>()?,
        None if bench => Mode::ALL.to_vec(),
        None => vec![
            Mode::Reference,
            Mode::SprightOff,
            Mode::SprightOn,
            Mode::SprightSdk,
        ],
    };
    anyhow::ensure!(args.is_empty(), "unexpected arguments: {args:?}");
    anyhow::ensure!(
        spec.sdk_langs.is_empty() || modes.contains(&Mode::SprightSdk),
        "--sdk-langs writes the spright-sdk mode's functions, which --modes leaves out"
    );
    spec.validate()?;
    for &payload in &payloads {
        Spec {
            payload,
            ..spec.clone()
        }
        .validate()?;
    }
    spright_tests::privileged::check().map_err(|e| anyhow::anyhow!("the demo needs root: {e}"))?;
    let dir = chain::out_dir();
    std::fs::create_dir_all(&dir)?;
    if payloads.is_empty() {
        let report = measure(spec, &modes, reps)?;
        return write(&report, &dir, "");
    }
    let mut reports = Vec::new();
    for (k, &payload) in payloads.iter().enumerate() {
        println!(
            "\n=== body size {payload} B ({} of {}) ===",
            k + 1,
            payloads.len()
        );
        let report = measure(
            Spec {
                payload,
                ..spec.clone()
            },
            &modes,
            reps,
        )?;
        write(&report, &dir, &format!("-{payload}"))?;
        reports.push(report);
    }
    let table = chain::sweep_markdown(&reports);
    println!("\n{table}");
    std::fs::write(dir.join("sweep.md"), &table)?;
    std::fs::write(
        dir.join("sweep.json"),
        serde_json::to_string_pretty(&reports)?,
    )?;
    println!("wrote {0}/sweep.md and {0}/sweep.json", dir.display());
    Ok(())
}

/// Runs `reps` rounds of every mode on `spec`.
fn measure(spec: Spec, modes: &[Mode], reps: usize) -> anyhow::Result<Report> {
    println!(
        "spright demo: a chain of {} unmodified HTTP functions (gateway + {} stages), {} B bodies, {} connections, \
         {reps} round{} of {} s per mode, modes interleaved",
        spec.length,
        spec.length - 1,
        spec.payload,
        spec.connections,
        if reps == 1 { "" } else { "s" },
        spec.seconds
    );
    let total = reps * modes.len();
    let mut done = 0;
    let rounds = stats::run_rounds(modes, reps, |round, mode| {
        chain::check_interrupted()?;
        done += 1;
        println!(
            "\n[round {}/{reps}, run {done}/{total}] {}",
            round + 1,
            spec.mode_describe(mode)
        );
        let o = chain::run(&spec, mode, &mut |l| println!("  {l}"))?;
        println!(
            "  → {:.0} requests/s, p50 {:.2} ms, p99 {:.2} ms, {:.0} µs node CPU per request ({:.0} of it wrk's), {} errors, \
             other processes {:.0}% of the CPU",
            o.requests_per_s,
            o.p50_ms,
            o.p99_ms,
            o.cpu_us_per_request,
            o.loadgen_cpu_us_per_request,
            o.errors,
            o.other_cpu_share * 100.0
        );
        if mode == Mode::SprightOn {
            println!(
                "  → {} MiB went socket to socket inside the chain; the outsider pod's call redirected {} bytes",
                o.redirected_bytes >> 20,
                o.outsider_redirected_bytes.unwrap_or(0)
            );
        }
        Ok(o)
    })?;
    Ok(Report {
        spec,
        modes: modes.to_vec(),
        rounds,
    })
}

/// Prints the table and writes `results<suffix>.{md,json}` and
/// `chain<suffix>.{svg,png}` into `dir`.
fn write(report: &Report, dir: &std::path::Path, suffix: &str) -> anyhow::Result<()> {
    let table = chain::markdown(report);
    println!("\n{table}");
    std::fs::write(dir.join(format!("results{suffix}.md")), &table)?;
    std::fs::write(
        dir.join(format!("results{suffix}.json")),
        serde_json::to_string_pretty(report)?,
    )?;
    let title = if report.spec.services {
        "spright: a chain of HTTP functions behind ClusterIPs"
    } else {
        "spright: a chain of HTTP functions"
    };
    let fig = chain::figure(report, title);
    std::fs::write(dir.join(format!("chain{suffix}.svg")), plot::svg(&fig)?)?;
    // The PNG is a convenience; the SVG is the picture.
    let png = match plot::png(&fig, &dir.join(format!("chain{suffix}.png"))) {
        Ok(()) => format!(" and chain{suffix}.png"),
        Err(e) => {
            eprintln!("spright-demo: no PNG: {e:#}");
            String::new()
        }
    };
    println!(
        "wrote {0}/results{suffix}.md, {0}/results{suffix}.json, {0}/chain{suffix}.svg{png}",
        dir.display()
    );
    for w in report.warnings() {
        eprintln!("warning: {w}");
    }
    Ok(())
}
