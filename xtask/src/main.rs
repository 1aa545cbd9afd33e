//! Developer tasks. `cargo xtask help` lists them.
//!
//! Every task that needs the toolchain runs `setup` first: it installs what a
//! fresh Debian machine lacks (packages, the nightly's rust-src, bpf-linker
//! built against Debian's LLVM 22) and is quiet when everything is present.

#![forbid(unsafe_code)]

mod kernels;
mod pysdk;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

const HELP: &str = "\
usage: cargo xtask <task> [args]

  demo [ARGS]          set up, build (release), and run the demo: a 4-function HTTP chain on a
                       simulated node, on the reference bridge CNI and on spright (needs root;
                       ARGS go to spright-demo, e.g. --duration 10 --payload 65536;
                       --sdk-langs rust,c,python writes the SDK chain's stages in C and
                       Python too, and builds the C library and the Python venv for them)
  bench NAME [ARGS]    release benchmarks, each against a baseline measured in the same run:
                         datapath    pod-to-pod RTT and throughput, 64 B..1 MiB
                         chain       the demo's chain incl. a sidecar baseline (--reps, default 3
                                     interleaved rounds; --length, --payload, --connections,
                                     --duration); medians, ranges, paired ratios, warnings;
                                     pictures in target/demo/chain.{svg,png}
                         services    the chain with every hop through a ClusterIP: reference bridge
                                     + kube-proxy DNAT vs spright with connect-time translation
                         apps        redis-server + redis-benchmark (with and without -P 16) and
                                     nginx + wrk (1 KiB, 1 MiB) between two pods, reference bridge
                                     CNI vs spright, interleaved rounds (--reps, --duration,
                                     --connections, --redis-requests); target/bench/apps.*
                         cni         ADD+DEL latency vs the reference bridge plugin
                         shm         one hop over TCP, sockmap and shared memory, 64 B..1 MiB;
                                     with --lang c,python: one hop to a function written with each
                                     SDK language next to plain TCP and the Rust SDK, on loopback
                                     (no root; --rounds, --quick); target/bench/sdk.json
                         webhook     admission reviews over HTTPS from concurrent clients, chain
                                     pods vs pods without the annotation (--reviews, --clients)
  test [TIER...]       set up, build, and run test tiers (default: all, in this order):
                         lint        cargo fmt --check, clippy -D warnings (also of the Python SDK's crate)
                         unit        host unit tests, no privileges; the C SDK's tests (gcc, clang,
                                     ASan) and the Python SDK's (built into target/python-venv, pytest)
                         privileged  namespaces, cgroups, bpf (tests/tests/privileged_*.rs)
                         e2e         real runtimes: containerd, podman (tests/tests/e2e_*.rs)
                         kernels     meshd's self-test (programs load, redirect, EAGAIN, the splice
                                     family and the redirect decision) on this machine's kernel and on
                                     Debian's bookworm, trixie and sid kernels under qemu (TCG);
                                     target/kernels/matrix.md
  fuzz [--minutes N]   property tests of every parser of outside input (CNI stdin, env and
                       CNI_ARGS, prevResult, records, Kubernetes objects and files, CNI config
                       files, CSI requests), many more cases than the unit tier, in rounds
                       for N minutes (default 5); a failure is kept in proptest-regressions/
  soak [--minutes N]   set up, build, and run the soak with churn (needs root): the demo's chain
                       under steady load whose every reply is checked, while pods join, leave and
                       opt out, meshd is killed and restarted, the programs are upgraded in place
                       and a Service's backends change, for N minutes (default 30, 1 to 180;
                       also --connections, --payload, --rate, --step-secs); a table, a verdict
                       (errors, leaks) and target/soak/soak.{md,json,svg,png}. The 2-minute
                       version runs in the privileged tier (privileged_soak).
  setup                install what this machine lacks (idempotent, quiet when nothing is missing)
  build                set up and build everything (user side + kernel programs, and the static
                       x86_64-unknown-linux-musl spright-cni)
  help                 this text

Under CI=true a privileged or e2e test that cannot run fails instead of skipping.";

const TIERS: [&str; 5] = ["lint", "unit", "privileged", "e2e", "kernels"];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("setup") => setup::run(),
        Some("build") => {
            setup::run()?;
            build()
        }
        Some("test") => {
            setup::run()?;
            test(&args[1..])
        }
        Some("demo") => {
            setup::run()?;
            demo(&args[1..])
        }
        Some("bench") => {
            setup::run()?;
            bench(&args[1..])
        }
        Some("fuzz") => fuzz(&args[1..]),
        Some("soak") => {
            setup::run()?;
            soak(&args[1..])
        }
        None | Some("help" | "-h" | "--help") => {
            println!("{HELP}");
            Ok(())
        }
        Some(other) => bail!("unknown task {other:?}\n\n{HELP}"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root, echoing it; fails on non-zero exit.
pub(crate) fn cmd(program: &str, args: &[&str]) -> anyhow::Result<()> {
    println!("+ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn step<T>(name: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    println!("==> {name}");
    let t = Instant::now();
    let r = f().with_context(|| format!("step `{name}` failed"));
    println!(
        "<== {name}: {} in {:.1}s",
        if r.is_ok() { "ok" } else { "FAILED" },
        t.elapsed().as_secs_f64()
    );
    r
}

fn build() -> anyhow::Result<()> {
    step("build (user side + kernel programs)", || {
        // --lib: the preload shim is a cdylib the privileged tests load.
        cmd(
            "cargo",
            &["build", "--workspace", "--lib", "--bins", "--tests"],
        )?;
        build_static(&[])?;
        build_go_zoo()
    })
}

/// Where `build` leaves the zoo's Go programs (tests/go/zoo), which
/// privileged_zoo runs in pods and the kernel matrix in each kernel.
pub(crate) const GO_ZOO: &str = "target/go/spright-zoo";

/// Builds the zoo with the distribution's Go (golang-go, from setup):
/// standard library only, offline, static (so the kernel matrix's
/// initramfs can carry it), with Go's caches under target/.
fn build_go_zoo() -> anyhow::Result<()> {
    let out = workspace_root().join(GO_ZOO);
    let go = out.parent().expect("target/go");
    println!("+ (tests/go/zoo) go build -o {GO_ZOO} .");
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(workspace_root().join("tests/go/zoo"))
        .env("GOCACHE", go.join("cache"))
        .env("GOPATH", go.join("path"))
        .env("GOFLAGS", "-mod=mod")
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("CGO_ENABLED", "0")
        .status()
        .context("running `go build` (golang-go; `cargo xtask setup` installs it)")?;
    if !status.success() {
        bail!("`go build` of tests/go/zoo failed ({status})");
    }
    Ok(())
}

/// The static (musl) spright-cni: what the node image ships and
/// install-cni copies onto hosts of any libc.
fn build_static(profile: &[&str]) -> anyhow::Result<()> {
    let mut args = vec![
        "build",
        "-p",
        "spright-cni",
        "--bin",
        "spright-cni",
        "--target",
        setup::STATIC_TARGET,
    ];
    args.extend(profile);
    cmd("cargo", &args)
}

fn test(tiers: &[String]) -> anyhow::Result<()> {
    let chosen: Vec<&str> = if tiers.is_empty() {
        TIERS.to_vec()
    } else {
        for t in tiers {
            if !TIERS.contains(&t.as_str()) {
                bail!("unknown test tier {t:?}; tiers are {}", TIERS.join(", "));
            }
        }
        TIERS
            .iter()
            .copied()
            .filter(|t| tiers.iter().any(|c| c == t))
            .collect()
    };
    let started = Instant::now();
    build()?;
    for tier in chosen {
        match tier {
            "lint" => step("lint", || {
                cmd("cargo", &["fmt", "--all", "--check"])?;
                cmd(
                    "cargo",
                    &[
                        "clippy",
                        "--workspace",
                        "--all-targets",
                        "--",
                        "-D",
                        "warnings",
                    ],
                )?;
                pysdk::lint()
            })?,
            "unit" => step("unit tests (no privileges)", || {
                // The Python SDK first: the cross-language test of the C
                // SDK runs its stages under this venv's python.
                let python = pysdk::venv()?;
                println!(
                    "+ SPRIGHT_PYTHON={python} cargo test --workspace --exclude spright-tests"
                );
                let status = Command::new("cargo")
                    .args(["test", "--workspace", "--exclude", "spright-tests"])
                    .env("SPRIGHT_PYTHON", &python)
                    .status()
                    .context("running cargo test")?;
                if !status.success() {
                    bail!("cargo test --workspace failed ({status})");
                }
                cmd("cargo", &["test", "-p", "spright-tests", "--lib", "--bins"])?;
                pysdk::pytest(&python)
            })?,
            "privileged" | "e2e" => {
                let prefix = if tier == "privileged" {
                    "privileged_"
                } else {
                    "e2e_"
                };
                let targets = test_targets(prefix)?;
                if targets.is_empty() {
                    println!("==> {tier}: no test files tests/tests/{prefix}*.rs yet");
                    continue;
                }
                // The SDK's mixed-language chain (privileged_sdk) runs its
                // Python stage under this venv's python.
                let python = if tier == "privileged" {
                    pysdk::venv()?
                } else {
                    String::new()
                };
                step(&format!("{tier} tests ({})", targets.join(", ")), || {
                    let mut args = vec!["test", "-p", "spright-tests"];
                    for t in &targets {
                        args.extend(["--test", t.as_str()]);
                    }
                    let mut test = Command::new("cargo");
                    test.args(&args);
                    if python.is_empty() {
                        println!("+ cargo {}", args.join(" "));
                    } else {
                        println!("+ SPRIGHT_PYTHON={python} cargo {}", args.join(" "));
                        test.env("SPRIGHT_PYTHON", &python);
                    }
                    let status = test.status().context("running cargo test")?;
                    if !status.success() {
                        bail!("cargo {} failed ({status})", args.join(" "));
                    }
                    Ok(())
                })?;
            }
            "kernels" => step("kernel matrix (qemu)", || kernels::run(&workspace_root()))?,
            _ => unreachable!("tiers are validated above"),
        }
    }
    println!(
        "all requested tiers passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Integration test targets of the tests crate whose file name starts with `prefix`.
fn test_targets(prefix: &str) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = std::fs::read_dir("tests/tests")
        .context("listing tests/tests")?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".rs")?;
            stem.starts_with(prefix).then(|| stem.to_owned())
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The property tests of parsers of outside input: (package, cargo test
/// target arguments).
const FUZZ_TARGETS: [(&str, &[&str]); 5] = [
    ("spright-endpoint", &["--lib", "fuzzing::"]),
    ("spright-cni", &["--test", "fuzz_parsers"]),
    ("meshd", &["--lib", "fuzz::"]),
    ("shm-csi", &["--test", "fuzz_requests"]),
    ("spright-webhook", &["--test", "fuzz_reviews"]),
];

/// Cases per property per round of `cargo xtask fuzz`.
const FUZZ_CASES: u32 = 20_000;

fn fuzz(args: &[String]) -> anyhow::Result<()> {
    let minutes: f64 = match args {
        [] => 5.0,
        [flag, n] if flag == "--minutes" => n
            .parse()
            .ok()
            .filter(|m: &f64| *m > 0.0)
            .with_context(|| format!("--minutes {n:?}: expected a positive number"))?,
        _ => bail!("usage: cargo xtask fuzz [--minutes N]"),
    };
    let budget = std::time::Duration::from_secs_f64(minutes * 60.0);
    step("build the property tests (release)", || {
        for (package, target) in FUZZ_TARGETS {
            let mut a = vec!["test", "--release", "--no-run", "-p", package];
            a.extend_from_slice(target);
            cmd("cargo", &a)?;
        }
        Ok(())
    })?;
    let cases = FUZZ_CASES.to_string();
    let (mut rounds, mut properties) = (0u32, 0u32);
    // The minutes are fuzzing time: the clock starts after the build, and
    // at least one round runs.
    let started = Instant::now();
    while rounds == 0 || started.elapsed() < budget {
        rounds += 1;
        properties = 0;
        for (package, target) in FUZZ_TARGETS {
            let mut a = vec!["test", "--release", "-q", "-p", package];
            a.extend_from_slice(target);
            let out = Command::new("cargo")
                .args(&a)
                .env("PROPTEST_CASES", &cases)
                .output()
                .context("running cargo test")?;
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                bail!(
                    "fuzz round {rounds}: {package} found a failing input (kept in {package}'s proptest-regressions/, replayed by every later run):\n{text}{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            properties += text
                .lines()
                .filter_map(|l| l.strip_prefix("test result: ok. "))
                .filter_map(|l| l.split(' ').next()?.parse::<u32>().ok())
                .sum::<u32>();
        }
        println!(
            "fuzz round {rounds}: {properties} tests (property tests at {cases} cases each), no failure ({:.0}s so far)",
            started.elapsed().as_secs_f64()
        );
    }
    println!(
        "fuzz: {rounds} rounds of {properties} tests, property tests at {cases} cases each, in {:.0}s: no failure",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn build_release() -> anyhow::Result<()> {
    step("build (release)", || {
        cmd("cargo", &["build", "--release", "--workspace", "--bins"])?;
        build_static(&["--release"])
    })
}

fn demo(args: &[String]) -> anyhow::Result<()> {
    build_release()?;
    // `--sdk-langs rust,c,python`: the SDK chain's C stage links the C
    // SDK's library, its Python stage runs in the venv with the package.
    let langs = args
        .iter()
        .position(|a| a == "--sdk-langs")
        .and_then(|i| args.get(i + 1))
        .map_or("", String::as_str);
    let names = |l: &str| langs.split(',').any(|x| x.trim() == l);
    if names("c") {
        step("build (release): the C SDK's library", || {
            cmd(
                "cargo",
                &["build", "--release", "-p", "spright-shm-c", "--lib"],
            )
        })?;
    }
    let python = if names("python") {
        Some(step("the Python SDK in target/python-venv", pysdk::venv)?)
    } else {
        None
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    step(
        "demo: a chain of unmodified HTTP functions on a simulated node",
        || match &python {
            Some(python) => {
                println!(
                    "+ SPRIGHT_PYTHON={python} target/release/spright-demo {}",
                    args.join(" ")
                );
                let status = Command::new("target/release/spright-demo")
                    .args(&args)
                    .env("SPRIGHT_PYTHON", python)
                    .status()
                    .context("running target/release/spright-demo")?;
                if !status.success() {
                    bail!("spright-demo failed ({status})");
                }
                Ok(())
            }
            None => cmd("target/release/spright-demo", &args),
        },
    )
}

fn bench(args: &[String]) -> anyhow::Result<()> {
    if args.first().map(String::as_str) == Some("shm") && args.iter().any(|a| a == "--lang") {
        return pysdk::bench(&args[1..]);
    }
    let (bin, fixed): (&str, &[&str]) = match args.first().map(String::as_str) {
        Some("datapath") => ("target/release/bench-datapath", &[]),
        Some("chain") => ("target/release/spright-demo", &["--bench"]),
        Some("services") => (
            "target/release/spright-demo",
            &[
                "--bench",
                "--services",
                "--modes",
                "reference,spright-off,spright-on",
            ],
        ),
        Some("cni") => ("target/release/bench-cni", &[]),
        Some("apps") => ("target/release/bench-apps", &[]),
        Some("shm") => ("target/release/bench-shm", &[]),
        Some("webhook") => ("target/release/spright-webhook-bench", &[]),
        Some(other) => {
            bail!(
                "unknown benchmark {other:?}; benchmarks: datapath, chain, services, apps, cni, shm, webhook"
            )
        }
        None => bail!("name a benchmark: datapath, chain, services, apps, cni, shm, webhook"),
    };
    build_release()?;
    let mut all: Vec<&str> = fixed.to_vec();
    all.extend(args[1..].iter().map(String::as_str));
    step(&format!("benchmark {}", args[0]), || cmd(bin, &all))
}

/// The soak runs the debug build, the one the privileged tier tests: it
/// looks for errors and leaks, not speed, and keeps overflow checks and
/// debug assertions on for hours.
fn soak(args: &[String]) -> anyhow::Result<()> {
    build()?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    step("soak: the chain under load with churn", || {
        cmd("target/debug/spright-soak", &args)
    })
}
