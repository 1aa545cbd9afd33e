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
//! The same private datapath then probes the syscall families a kernel may
//! not serve on the redirect path (today `splice`, docs/RELIABILITY.md): a
//! child splices from a redirected socket whose peer sent 1000 bytes and
//! half-closed (what a Go proxy's `io.Copy` meets), once with the splice
//! guard off (what the kernel itself does) and, when the kernel loses the
//! data, once with it on (whether the guard's EINVAL reaches the caller).
//! `same-as-tcp`, `mitigated`, `unsafe` or `inconclusive` per family; the
//! agent turns `unsafe` into "no new redirects" unless the admin accepts it.
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

pub use spright_endpoint::selftest::{Family, Report};
use spright_endpoint::selftest::{INCONCLUSIVE, MITIGATED, SAME_AS_TCP, SPLICE, UNSAFE};

/// Set (to `splice`) in the child's environment to run the splice probe
/// instead of the EAGAIN trials.
pub const PROBE_ENV: &str = "SPRIGHT_SELFTEST_PROBE";
/// Bytes the splice probe's client sends before it half-closes.
const PROBE_BYTES: usize = 1000;
/// [`PROBE_ENV`] value of the memory-bound probe's child.
const STALLED: &str = "stalled";

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
    // The probes measure the redirect path itself: no node-wide switch may
    // keep this private datapath's connections on TCP.
    spright_ebpf::set_config_flag(&pins, spright_ebpf::CONFIG_NO_REDIRECT, false)?;
    let v = run_child(&cgroup, None)?;
    let trials = v["trials"].as_u64().unwrap_or(0);
    let eagain_trials = v["eagain_trials"].as_u64().unwrap_or(0);
    let redirected_msgs = dp.counters(lo)?.redirected_msgs;
    let families = vec![probe_splice(&dp, &pins, &cgroup, lo)];
    let (rmem_charged, rmem_detail) = match probe_rmem(&dp, &cgroup, lo) {
        Ok((charged, detail)) => (charged, Some(detail)),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    drop(dp);
    Ok(if redirected_msgs == 0 {
        Report {
            trials,
            eagain_trials,
            families,
            rmem_charged,
            rmem_detail,
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
            families,
            rmem_charged,
            rmem_detail,
        }
    })
}

/// Whether redirected bytes are charged to a receiver that does not read:
/// a sender writes up to 4 MiB into a socket nobody reads (the private
/// datapath has no memory bound), and the receiver's `sk_rmem_alloc` (what
/// sock_diag calls `SK_MEMINFO_RMEM_ALLOC`) is compared with the bytes the
/// counters saw redirected. Charged, it holds them all; not charged (kernels
/// before 6.13 without the backport of upstream d888b7af7c14), it stays near
/// 0, and neither the kernel bound nor meshd's poll, which both read that
/// counter, can see a receiver fill up.
fn probe_rmem(
    dp: &Datapath,
    cgroup: &Path,
    lo: std::net::IpAddr,
) -> anyhow::Result<(Option<bool>, String)> {
    let before = dp.counters(lo)?.redirected_bytes;
    let v = run_child(cgroup, Some(STALLED))?;
    let redirected = dp.counters(lo)?.redirected_bytes - before;
    let Some(rmem) = v["rmem_alloc"].as_u64() else {
        return Ok((
            None,
            "sock_diag does not know the receiver (inet_diag and tcp_diag not loaded?)".into(),
        ));
    };
    let detail = format!(
        "{redirected} bytes redirected to a socket that never reads, which holds {rmem} bytes of receive memory"
    );
    Ok(if redirected < 1 << 20 {
        (None, format!("{detail} (too little redirected to tell)"))
    } else if rmem >= redirected / 2 {
        (Some(true), detail)
    } else if rmem < redirected / 8 {
        (Some(false), detail)
    } else {
        (None, format!("{detail} (neither all nor none)"))
    })
}

/// The splice family: the kernel alone (guard off), then with the guard
/// when the kernel loses the data.
fn probe_splice(dp: &Datapath, pins: &Path, cgroup: &Path, lo: std::net::IpAddr) -> Family {
    let family = |verdict: &str, detail: String| Family {
        name: SPLICE.into(),
        verdict: verdict.into(),
        detail,
    };
    let run = |guard: bool| -> anyhow::Result<(serde_json::Value, u64)> {
        spright_ebpf::set_config_flag(pins, spright_ebpf::CONFIG_NO_SPLICE_GUARD, !guard)?;
        let before = dp.counters(lo)?.redirected_msgs;
        let v = run_child(cgroup, Some(SPLICE))?;
        Ok((v, dp.counters(lo)?.redirected_msgs - before))
    };
    let raw = match run(false) {
        Ok(r) => r,
        Err(e) => return family(INCONCLUSIVE, format!("{e:#}")),
    };
    let said = |v: &serde_json::Value| {
        format!(
            "splice() gave {} ({} of {PROBE_BYTES} bytes), read() then {}",
            v["first"].as_str().unwrap_or("?"),
            v["spliced"].as_u64().unwrap_or(0),
            v["read_after"].as_u64().unwrap_or(0)
        )
    };
    if raw.1 == 0 {
        return family(INCONCLUSIVE, "the probe's bytes were not redirected".into());
    }
    if raw.0["spliced"].as_u64() == Some(PROBE_BYTES as u64) {
        return family(SAME_AS_TCP, format!("kernel alone: {}", said(&raw.0)));
    }
    let guarded = match run(true) {
        Ok(r) => r,
        Err(e) => return family(INCONCLUSIVE, format!("{e:#}")),
    };
    let armed = spright_ebpf::guard_state(pins).is_ok_and(|g| g.armed);
    if guarded.0["first"] == "EINVAL"
        && guarded.0["read_after"].as_u64() == Some(PROBE_BYTES as u64)
    {
        return family(
            MITIGATED,
            format!(
                "kernel alone: {}; with the guard: {}",
                said(&raw.0),
                said(&guarded.0)
            ),
        );
    }
    family(
        UNSAFE,
        format!(
            "kernel alone: {}; with the guard ({}): {}",
            said(&raw.0),
            if armed {
                "attached, but this kernel never called it: is `bpf` among its active LSMs?"
            } else {
                "not attached: this kernel cannot load BPF LSM programs"
            },
            said(&guarded.0)
        ),
    )
}

/// Runs the self-test child in a private network namespace, in `cgroup`,
/// and returns the JSON it printed: the EAGAIN trials, or the `probe`.
fn run_child(cgroup: &Path, probe: Option<&str>) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new("unshare");
    cmd.arg("--net").arg("--").arg(&exe).env(CHILD_ENV, cgroup);
    if let Some(p) = probe {
        cmd.env(PROBE_ENV, p);
    }
    let mut child = cmd
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
    Ok(serde_json::from_str(out.trim())?)
}

/// The running kernel's release (`uname -r`), for reports.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
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
    match std::env::var(PROBE_ENV).as_deref() {
        Ok(SPLICE) => return splice_child(),
        Ok(STALLED) => return stalled_child(),
        _ => {}
    }
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

/// The splice probe: the peer sends [`PROBE_BYTES`] and half-closes (its
/// FIN travels over TCP, the bytes over the redirect path when the kernel
/// redirects them), then this end splices from its socket into a pipe,
/// non-blocking, for up to 2 s, and reads what splice left with `read()`.
/// Prints what the first splice that was not EAGAIN gave (`data`, `eof`
/// or the errno's name) and the bytes each way got.
fn splice_child() -> anyhow::Result<serde_json::Value> {
    use std::os::fd::AsFd as _;

    use nix::{errno::Errno, fcntl::SpliceFFlags};

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    client.write_all(&[0x5a; PROBE_BYTES])?;
    client.shutdown(Shutdown::Write)?;
    // Let the FIN land: the case where a splice that sees nothing says EOF.
    std::thread::sleep(Duration::from_millis(50));
    let (pipe_r, pipe_w) = nix::unistd::pipe()?;
    server.set_nonblocking(true)?;
    let (mut spliced, mut first) = (0usize, None::<String>);
    let start = Instant::now();
    while first.is_none() && start.elapsed() < Duration::from_secs(2) {
        match nix::fcntl::splice(
            server.as_fd(),
            None,
            pipe_w.as_fd(),
            None,
            PROBE_BYTES,
            SpliceFFlags::SPLICE_F_NONBLOCK,
        ) {
            Ok(0) => first = Some("eof".into()),
            Ok(n) => {
                spliced += n;
                if spliced >= PROBE_BYTES {
                    first = Some("data".into());
                }
            }
            Err(Errno::EAGAIN | Errno::EINTR) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => first = Some(format!("{e:?}")),
        }
    }
    drop(pipe_r);
    server.set_nonblocking(false)?;
    server.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut read_after = 0usize;
    let mut buf = [0u8; PROBE_BYTES];
    let mut s = &server;
    while read_after + spliced < PROBE_BYTES {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => read_after += n,
        }
    }
    Ok(serde_json::json!({
        "first": first.unwrap_or_else(|| "EAGAIN".into()),
        "spliced": spliced,
        "read_after": read_after,
    }))
}

/// The memory-bound probe: a non-blocking sender writes 64 KiB at a time,
/// up to 4 MiB or for 2 s, to a socket that never reads; prints the bytes
/// the kernel took and the receiver's receive memory (sock_diag).
fn stalled_child() -> anyhow::Result<serde_json::Value> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    client.set_nonblocking(true)?;
    let chunk = vec![0x5a_u8; 64 * 1024];
    let (mut written, start) = (0usize, Instant::now());
    while written < 4 << 20 && start.elapsed() < Duration::from_secs(2) {
        match client.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let key = spright_ebpf::SockKey {
        local: spright_ebpf::addr_of(server.local_addr()?.ip()),
        remote: spright_ebpf::addr_of(server.peer_addr()?.ip()),
        local_port: u32::from(server.local_addr()?.port()),
        remote_port: u32::from(server.peer_addr()?.port()),
    };
    // None: sock_diag does not know the socket (no inet_diag/tcp_diag in
    // this kernel), which says nothing about the charge.
    let rmem = crate::sock_diag::SockDiag::here()?
        .lookup(1, &key)?
        .map(|s| s.rmem_alloc);
    Ok(serde_json::json!({ "written": written, "rmem_alloc": rmem }))
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
