//! The zoo: unmodified programs nobody here wrote for spright, built or
//! found on the machine, for the tests that run them in pods.
//!
//! - `spright-zoo` (Go, `tests/go/zoo`): an L4 proxy whose `io.Copy`
//!   between two `*net.TCPConn` moves bytes with `splice(2)`, a server that
//!   answers the SHA-256 of what it read, a client that checks every
//!   answer, and a `net/http` server and client. `cargo xtask build` builds
//!   it with the distribution's Go (`golang-go`, installed by `cargo xtask
//!   setup`), standard library only, so offline.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::sandbox::{Peer, Sandbox};

/// The `spright-zoo` that `cargo xtask build` leaves in target/go, or why
/// it cannot be used (missing, or older than its source).
pub fn go_zoo() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = root.join("../target/go/spright-zoo");
    let source = root.join("go/zoo/main.go");
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (mtime(&bin), mtime(&source)) {
        (Some(built), Some(src)) if built >= src => Ok(bin),
        (Some(_), _) => Err(format!(
            "{} is older than {}; run `cargo xtask build`",
            bin.display(),
            source.display()
        )),
        (None, _) => Err(format!(
            "{} is not built; run `cargo xtask build` (it needs golang-go)",
            bin.display()
        )),
    }
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
