//! Start-up self-test: does this kernel's redirect path return EAGAIN from a
//! blocking `recv()` (docs/RELIABILITY.md, documented limit 1)?
//!
//! A fixed kernel is recognised by behaviour, not by a version table. meshd
//! installs a private copy of the datapath on a cgroup it creates for the test
//! (`<cgroup2>/spright-selftest-<pid>`, never the cgroup v2 root) with its own
//! pin directory, and re-executes itself as a child (`unshare --net`, so the
//! child has a private network namespace with only loopback) that joins that
//! cgroup before creating any socket. The child runs the reliable trigger —
//! half-close, then a blocking wait for a reply delayed 60 ms — over
//! 127.0.0.1, which the private endpoint map makes a chain member. Everything
//! is removed afterwards, also on failure.
//!
//! Verdicts: `affected` (at least one spurious EAGAIN: the `halfclose-wait`
//! case of the reliability test sees it in 20 of 20 trials at this delay,
//! docs/RELIABILITY.md, `CI=true cargo test -p spright-tests --test
//! privileged_reliability`), `not-affected` (none, and the counters prove the
//! traffic was redirected), `inconclusive` (with the reason), `disabled`.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use spright_ebpf::{Datapath, EndpointValue, Placement, chain_id};

/// Set (to the cgroup directory to join) in the environment of the child.
pub const CHILD_ENV: &str = "SPRIGHT_SELFTEST_CHILD";
const TRIALS: u64 = 10;
const DELAY: Duration = Duration::from_millis(60);
const CHILD_TIMEOUT: Duration = Duration::from_secs(20);

pub use spright_endpoint::selftest::Report;

/// Runs the self-test (about a second). Never fails: problems give an
/// `inconclusive` report.
pub fn run(bpffs: &Path) -> Report {
    match try_run(bpffs) {
        Ok(r) => r,
        Err(e) => Report::inconclusive(format!("{e:#}")),
    }
}

/// A directory removed on drop (after `on_drop`).
struct Guard(PathBuf, fn(&Path));

impl Drop for Guard {
    fn drop(&mut self) {
        (self.1)(&self.0);
    }
}

fn try_run(bpffs: &Path) -> anyhow::Result<Report> {
    let root =
        spright_ebpf::cgroup2_mount().ok_or_else(|| anyhow::anyhow!("no cgroup v2 mount"))?;
    let name = format!("spright-selftest-{}", std::process::id());
    let cgroup = root.join(&name);
    anyhow::ensure!(cgroup != root, "refusing to use the cgroup v2 root");
    std::fs::create_dir(&cgroup)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", cgroup.display()))?;
    let _cg = Guard(cgroup.clone(), |p| {
        for _ in 0..100 {
            if std::fs::remove_dir(p).is_ok() || !p.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let pins = bpffs
        .parent()
        .unwrap_or(Path::new("/sys/fs/bpf"))
        .join(&name);
    std::fs::create_dir_all(&pins)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", pins.display()))?;
    let _pins = Guard(pins.clone(), |p| {
        let _ = spright_ebpf::uninstall(p);
        let _ = std::fs::remove_dir(p);
    });
    let (mut dp, _) = Datapath::ensure(&Placement {
        cgroup: cgroup.clone(),
        bpffs: pins.clone(),
    })?;
    let lo = std::net::IpAddr::from([127, 0, 0, 1]);
    dp.upsert_endpoint(
        lo,
        EndpointValue {
            chain_id: chain_id("spright-selftest", "selftest"),
            ..EndpointValue::default()
        },
    )?;
    let exe = std::env::current_exe()?;
    let mut child = Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(&exe)
        .env(CHILD_ENV, &cgroup)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting `unshare --net {}`: {e}", exe.display()))?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > CHILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the self-test child did not finish within {CHILD_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut out)?;
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err)?;
    }
    anyhow::ensure!(
        status.success(),
        "self-test child failed ({status}): {}",
        err.trim()
    );
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    let trials = v["trials"].as_u64().unwrap_or(0);
    let eagain_trials = v["eagain_trials"].as_u64().unwrap_or(0);
    let redirected_msgs = dp.counters(lo)?.redirected_msgs;
    drop(dp);
    Ok(if redirected_msgs == 0 {
        Report {
            trials,
            eagain_trials,
            ..Report::inconclusive("the self-test traffic was not redirected".into())
        }
    } else {
        Report {
            verdict: if eagain_trials > 0 {
                "affected"
            } else {
                "not-affected"
            }
            .into(),
            trials,
            eagain_trials,
            redirected_msgs,
            detail: None,
        }
    })
}

/// The child's entry point: when [`CHILD_ENV`] is set, runs the trials,
/// prints the JSON result and returns the exit code; otherwise `None`.
pub fn child_main_if_requested() -> Option<std::process::ExitCode> {
    let cgroup = std::env::var_os(CHILD_ENV)?;
    Some(match child(Path::new(&cgroup)) {
        Ok(v) => {
            println!("{v}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshd self-test: {e:#}");
            std::process::ExitCode::FAILURE
        }
    })
}

fn child(cgroup: &Path) -> anyhow::Result<serde_json::Value> {
    // Join the cgroup before creating any socket: a socket's cgroup is fixed
    // at creation. This process is alone in its private network namespace.
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())?;
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()?;
    anyhow::ensure!(up.success(), "`ip link set lo up` failed");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        for _ in 0..TRIALS {
            let (mut s, _) = listener.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut buf = [0u8; 64];
            while s.read(&mut buf)? > 0 {}
            std::thread::sleep(DELAY);
            s.write_all(&[0x5a; 16])?;
        }
        Ok(())
    });
    let mut eagain_trials = 0u64;
    for _ in 0..TRIALS {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&[1; 16])?;
        s.shutdown(Shutdown::Write)?;
        let (mut got, mut spurious) = (0usize, false);
        let start = Instant::now();
        let mut buf = [0u8; 64];
        while start.elapsed() < Duration::from_secs(5) {
            let t = Instant::now();
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                // A timeout would take 5 s; anything quicker is the kernel's
                // spurious EAGAIN on a blocking socket.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if t.elapsed() < Duration::from_secs(4) {
                        spurious = true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::ensure!(got == 16, "reply of {got} bytes instead of 16");
        eagain_trials += u64::from(spurious);
    }
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    Ok(serde_json::json!({"trials": TRIALS, "eagain_trials": eagain_trials}))
}

#[cfg(test)]
mod tests {
    use super::Report;

    #[test]
    fn gauge_maps_verdicts() {
        let r = |v: &str| Report {
            verdict: v.into(),
            ..Report::default()
        };
        assert_eq!(r("affected").gauge(), 1);
        assert_eq!(r("not-affected").gauge(), 0);
        assert_eq!(r("inconclusive").gauge(), -1);
        assert_eq!(Report::disabled().gauge(), -1);
    }
}
