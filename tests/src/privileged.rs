//! The gate of privileged tests.
//!
//! A privileged test starts with `if !require("name") { return; }`. Outside CI a
//! machine that cannot run it (not root, no cgroup v2, no bpffs) prints why and
//! the test returns; under `CI=true` the same situation fails the test, so a
//! CI run can never go green by skipping.

use std::path::Path;

/// Whether privileged tests can run here; the error says why not.
pub fn check() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not running as root".into());
    }
    if spright_ebpf::cgroup2_mount().is_none() {
        return Err("no cgroup v2 hierarchy is mounted".into());
    }
    spright_ebpf::ensure_bpffs_mounted(Path::new("/sys/fs/bpf"))
        .map_err(|e| format!("cannot mount bpffs at /sys/fs/bpf: {e}"))?;
    for tool in ["ip", "ss"] {
        if !["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists())
        {
            return Err(format!("`{tool}` (iproute2) is not installed"));
        }
    }
    Ok(())
}

/// Returns whether the privileged test `name` may run. Panics under `CI=true`
/// when it cannot.
#[must_use]
pub fn require(name: &str) -> bool {
    match check() {
        Ok(()) => true,
        Err(why) if in_ci() => panic!("privileged test {name} cannot run in CI: {why}"),
        Err(why) => {
            eprintln!("SKIPPED privileged test {name}: {why} (set CI=true to make this a failure)");
            false
        }
    }
}

/// Whether this run is CI (`CI=true`), where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
