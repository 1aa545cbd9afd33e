//! The zoo: unmodified programs nobody here wrote for spright, built or
//! found on the machine, for the tests that run them in pods.
//!
//! - `spright-zoo` (Go, `tests/go/zoo`): an L4 proxy whose `io.Copy`
//!   between two `*net.TCPConn` moves bytes with `splice(2)`, a server that
//!   answers the SHA-256 of what it read, and a client that checks every
//!   answer. Built with the distribution's Go (`golang-go`, installed by
//!   `cargo xtask setup`), standard library only, so offline.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{Context as _, bail};

use crate::sandbox::{Peer, Sandbox};

/// The built `spright-zoo` (once per test process), or why it could not be
/// built.
pub fn go_zoo() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_go_zoo().map_err(|e| format!("{e:#}")))
        .clone()
}

fn build_go_zoo() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("../target/go");
    let bin = out.join("spright-zoo");
    std::fs::create_dir_all(&out)?;
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(root.join("go/zoo"))
        // Everything Go keeps stays under target/; no module is fetched.
        .env("GOCACHE", out.join("cache"))
        .env("GOPATH", out.join("path"))
        .env("GOFLAGS", "-mod=mod")
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        // Static, so the kernel matrix's initramfs can carry the same build.
        .env("CGO_ENABLED", "0")
        .status()
        .context("running `go build` (is golang-go installed? `cargo xtask setup` installs it)")?;
    if !status.success() {
        bail!("`go build` of tests/go/zoo failed ({status})");
    }
    Ok(bin)
}

/// Starts `program ARGS` as a process of pod `pod`: in the sandbox's cgroup
/// (joined before the program creates a socket) and the pod's network
/// namespace, in a process group of its own.
pub fn spawn_in_pod(
    sb: &Sandbox,
    pod: usize,
    program: &Path,
    args: &[&str],
) -> anyhow::Result<Peer> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec nsenter --net={} \"$0\" \"$@\"",
            sb.cgroup.path.display(),
            sb.pods[pod].ns.path().display()
        ))
        .arg(program)
        .args(args);
    Peer::spawn_group(cmd)
}
