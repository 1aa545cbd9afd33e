//! `spright-soak`: the soak with churn (`cargo xtask soak`): the demo's
//! chain under steady, verified load while pods join and leave, a pod opts
//! out, meshd is killed and restarted, the programs are upgraded in place
//! and a Service's backends change. Needs root; machinery in `src/soak.rs`.
//!
//! ```text
//! spright-soak [--minutes 30] [--connections 4] [--payload 1024] [--rate 400] [--step-secs 10]
//! ```
//!
//! Writes `target/soak/soak.{md,json,svg,png}` and exits non-zero when the
//! verdict is not PASS. Everything it starts runs in a process group of its
//! own, killed on exit, timeout and Ctrl-C.

use spright_tests::{
    pod::take_num,
    procgroup,
    soak::{self, Spec},
};

fn main() -> anyhow::Result<()> {
    procgroup::trap_interrupts()?;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let minutes = take_num(&mut args, "--minutes", 30)?;
    anyhow::ensure!(
        (1..=180).contains(&minutes),
        "--minutes must be 1 to 180, got {minutes}"
    );
    let spec = Spec {
        seconds: minutes * 60,
        connections: usize::try_from(take_num(&mut args, "--connections", 4)?)?,
        payload: usize::try_from(take_num(&mut args, "--payload", 1024)?)?,
        rate: u32::try_from(take_num(&mut args, "--rate", 400)?)?,
        step_secs: take_num(&mut args, "--step-secs", 10)?,
        process_groups: true,
    };
    anyhow::ensure!(args.is_empty(), "unexpected arguments: {args:?}");
    spec.validate()?;
    spright_tests::privileged::check()
        .map_err(|e| anyhow::anyhow!("spright-soak needs root: {e}"))?;
    println!("soak: {minutes} min; a line per step, the table at the end");
    let report = soak::run(&spec, &mut |l| println!("  {l}"))?;
    let table = soak::markdown(&report);
    println!("\n{table}");
    let dir = soak::out_dir();
    match soak::write(&report, &dir) {
        Ok(()) => println!(
            "wrote {0}/soak.md, soak.json, soak.svg and soak.png",
            dir.display()
        ),
        Err(e) => eprintln!("spright-soak: {e:#} (the table above is complete)"),
    }
    let problems = report.problems();
    anyhow::ensure!(problems.is_empty(), "{}", report.verdict());
    Ok(())
}
