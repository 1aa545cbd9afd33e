//! `bench-apps`: unmodified programs from the distribution (redis-server
//! with redis-benchmark, nginx with wrk) between two pods, on the reference
//! bridge CNI and on spright with both pods in one chain, in interleaved
//! rounds (`cargo xtask bench apps`). Needs root; machinery in
//! `src/apps.rs`.
//!
//! ```text
//! bench-apps [--reps 3] [--connections 8] [--redis-requests 100000] [--duration 5]
//! ```
//!
//! Writes `target/bench/apps.{md,json,svg,png}`. Everything it starts runs
//! in a process group of its own, killed on exit, timeout and Ctrl-C.

use spright_tests::{
    apps::{self, Report, Spec},
    plot,
    pod::take_num,
    procgroup, stats,
};

fn main() -> anyhow::Result<()> {
    procgroup::trap_interrupts()?;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let reps = usize::try_from(take_num(&mut args, "--reps", 3)?)?;
    anyhow::ensure!((1..=20).contains(&reps), "--reps must be 1 to 20");
    let spec = Spec {
        connections: usize::try_from(take_num(&mut args, "--connections", 8)?)?,
        redis_requests: take_num(&mut args, "--redis-requests", 100_000)?,
        seconds: take_num(&mut args, "--duration", 5)?,
    };
    anyhow::ensure!(args.is_empty(), "unexpected arguments: {args:?}");
    spec.validate()?;
    spright_tests::privileged::check()
        .map_err(|e| anyhow::anyhow!("bench-apps needs root: {e}"))?;
    for program in ["redis-server", "redis-benchmark", "nginx", "wrk"] {
        anyhow::ensure!(
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {program}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "{program} is missing: `cargo xtask setup` installs redis-server, redis-tools, nginx-light and wrk"
        );
    }
    let modes = apps::MODES.to_vec();
    let rounds = stats::run_rounds(&modes, reps, |round, mode| {
        procgroup::check_interrupted()?;
        println!("\n[round {}/{reps}] {}", round + 1, mode.describe());
        apps::run(&spec, mode, &mut |l| println!("  {l}"))
    })?;
    let report = Report {
        spec,
        modes,
        rounds,
    };
    let table = apps::markdown(&report);
    println!("\n{table}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("apps.md"), &table)?;
    std::fs::write(
        dir.join("apps.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let fig = apps::figure(&report);
    std::fs::write(dir.join("apps.svg"), plot::svg(&fig)?)?;
    if let Err(e) = plot::png(&fig, &dir.join("apps.png")) {
        eprintln!("bench-apps: no PNG: {e:#}");
    }
    println!(
        "wrote {0}/apps.md, apps.json, apps.svg and apps.png",
        dir.display()
    );
    for w in report.warnings() {
        eprintln!("warning: {w}");
    }
    Ok(())
}
