//! The Python SDK (shm-csi/sdk/python) in the test tiers and in `bench shm --lang`: a venv with the
//! package built from the source, its pytest suite, and lint of its crate
//! (a workspace of its own, so the workspace's fmt and clippy miss it).

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::cmd;

const PACKAGE: &str = "shm-csi/sdk/python";
const MANIFEST: &str = "shm-csi/sdk/python/Cargo.toml";
/// The venv the tests use; it sees the system's maturin and pytest (which
/// `setup` installs), so building the package needs no download.
const VENV: &str = "target/python-venv";
/// Where maturin's cargo builds (kept between runs, out of the source tree).
const TARGET: &str = "target/python";

/// Builds the package into the venv; returns the venv's python.
pub(crate) fn venv() -> anyhow::Result<String> {
    cmd("python3", &["-m", "venv", "--system-site-packages", VENV])?;
    let python = format!("{VENV}/bin/python");
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-build-isolation",
            "--no-deps",
            "--force-reinstall",
            PACKAGE,
        ])
        .env("CARGO_TARGET_DIR", TARGET)
        .status()
        .with_context(|| format!("running {python} -m pip"))?;
    if !status.success() {
        bail!("building the Python SDK ({PACKAGE}) failed ({status})");
    }
    let root = std::env::current_dir()?;
    Ok(root.join(python).to_string_lossy().into_owned())
}

/// pytest of the Python SDK, with `python` from [`venv`].
pub(crate) fn pytest(python: &str) -> anyhow::Result<()> {
    cmd(python, &["-m", "pytest", "-q", &format!("{PACKAGE}/tests")])
}

/// fmt and clippy of the pyo3 crate.
pub(crate) fn lint() -> anyhow::Result<()> {
    cmd("cargo", &["fmt", "--manifest-path", MANIFEST, "--check"])?;
    let status = Command::new("cargo")
        .args([
            "clippy",
            "--manifest-path",
            MANIFEST,
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .env("CARGO_TARGET_DIR", TARGET)
        .env("PYO3_PYTHON", "python3")
        .status()
        .context("running cargo clippy")?;
    if !status.success() {
        bail!("clippy of {MANIFEST} failed ({status})");
    }
    Ok(())
}

/// `bench shm --lang c,python`: the SDK languages' benchmark
/// (shm-csi/sdk/c/examples/bench.rs), release builds, unprivileged.
pub(crate) fn bench(args: &[String]) -> anyhow::Result<()> {
    cmd(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "spright-shm-c",
            "--lib",
            "--example",
            "bench",
        ],
    )?;
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    let python;
    if all.iter().any(|a| a.contains("python")) {
        python = venv()?;
        all.extend(["--python", &python]);
    }
    crate::step("benchmark shm --lang", || {
        cmd("target/release/examples/bench", &all)
    })
}
