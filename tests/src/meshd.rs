//! A meshd process started by a test (killed by pid on drop), and its HTTP API.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::sandbox::workspace_bin;

pub struct Meshd {
    child: Child,
    /// The local API (`--api-addr`): every path.
    pub addr: String,
    /// The metrics listener (`--metrics-addr`): /metrics and the probes only.
    pub metrics_addr: String,
    pub log: PathBuf,
}

impl Meshd {
    /// meshd's process id (for its CPU time in `/proc/PID/stat`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts meshd on a free loopback port and waits until it is ready.
    pub fn start(placement: &spright_ebpf::Placement, state_dir: &Path) -> anyhow::Result<Self> {
        Self::start_flags(placement, state_dir, &[])
    }

    /// Starts meshd on a free loopback port with extra flags.
    pub fn start_flags(
        placement: &spright_ebpf::Placement,
        state_dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_with(placement, state_dir, &format!("127.0.0.1:{port}"), extra)
    }

    /// Starts meshd on `addr` (e.g. to restart it where it was).
    pub fn start_on(
        placement: &spright_ebpf::Placement,
        state_dir: &Path,
        addr: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with(placement, state_dir, addr, &[])
    }

    /// Starts meshd with its API on `addr` (and its metrics listener on a
    /// free loopback port), with extra flags.
    ///
    /// The harness's meshd accepts the `splice` family
    /// (`SPRIGHT_ACCEPT_UNSAFE_FAMILIES`): on a kernel whose redirect path
    /// loses splice data and cannot load the splice guard (this machine's:
    /// no BPF LSM programs, docs/RELIABILITY.md), meshd's default keeps new
    /// connections off the redirect path, and the tests are about that path.
    /// [`Meshd::start_default_policy`] leaves meshd's default alone.
    pub fn start_with(
        placement: &spright_ebpf::Placement,
        state_dir: &Path,
        addr: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::spawn(placement, state_dir, addr, extra, true)
    }

    /// Starts meshd as a node gets it: no unsafe syscall family accepted.
    pub fn start_default_policy(
        placement: &spright_ebpf::Placement,
        state_dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::spawn(
            placement,
            state_dir,
            &format!("127.0.0.1:{port}"),
            extra,
            false,
        )
    }

    fn spawn(
        placement: &spright_ebpf::Placement,
        state_dir: &Path,
        addr: &str,
        extra: &[&str],
        accept_splice: bool,
    ) -> anyhow::Result<Self> {
        let log = state_dir.join(format!("meshd-{}.log", addr.replace([':', '.'], "_")));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let metrics_addr = format!(
            "127.0.0.1:{}",
            TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()
        );
        let mut meshd = Command::new(workspace_bin("meshd"));
        if accept_splice {
            meshd.env("SPRIGHT_ACCEPT_UNSAFE_FAMILIES", "splice");
        } else {
            meshd.env_remove("SPRIGHT_ACCEPT_UNSAFE_FAMILIES");
        }
        let child = meshd
            .arg("--cgroup")
            .arg(&placement.cgroup)
            .arg("--bpffs")
            .arg(&placement.bpffs)
            .arg("--state-dir")
            .arg(state_dir)
            .args([
                "--api-addr",
                addr,
                "--metrics-addr",
                &metrics_addr,
                "--rescan-secs",
                "2",
                "--log",
                "meshd=debug,info",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting meshd")?;
        let m = Self {
            child,
            addr: addr.to_owned(),
            metrics_addr,
            log,
        };
        m.wait_ready(Duration::from_secs(30))?;
        Ok(m)
    }

    fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.get("/readyz").is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "meshd not ready within {timeout:?}; log:\n{}",
            self.log_text()
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path of meshd's local API.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        get(&self.addr, path)
    }

    /// GET a path of meshd's metrics listener.
    pub fn get_metrics_listener(&self, path: &str) -> anyhow::Result<String> {
        get(&self.metrics_addr, path)
    }

    /// Checks `/metrics` as a Prometheus server and promtool read it: the
    /// classic text format (what curl and promtool get) passes
    /// `promtool check metrics` with no finding at all, and a scraper that
    /// asks for OpenMetrics gets it under its own content type. Returns the
    /// classic body. Without promtool the lint is skipped outside CI and fails
    /// under `CI=true` (`cargo xtask setup` provides it).
    pub fn check_metrics(&self) -> anyhow::Result<String> {
        let agent = agent();
        // The listener Prometheus scrapes.
        let url = format!("http://{}/metrics", self.metrics_addr);
        let mut classic = agent.get(&url).call()?;
        let ct = content_type(&classic);
        if ct != "text/plain; version=0.0.4; charset=utf-8" {
            bail!("/metrics without Accept served {ct:?}, not the classic text format");
        }
        let body = classic.body_mut().read_to_string()?;
        if body.contains("# EOF") {
            bail!("the classic text body carries OpenMetrics' # EOF:\n{body}");
        }
        // Prometheus 2.x's scrape Accept header.
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let mut om = agent.get(&url).header("Accept", prom).call()?;
        let ct = content_type(&om);
        if !ct.starts_with("application/openmetrics-text; version=1.0.0") {
            bail!("a Prometheus scrape got {ct:?}, not OpenMetrics");
        }
        let om = om.body_mut().read_to_string()?;
        if !om.ends_with("# EOF\n") {
            bail!("the OpenMetrics body does not end with # EOF:\n{om}");
        }
        if Command::new("promtool").arg("--version").output().is_err() {
            let why = "promtool is not installed (cargo xtask setup provides it)";
            if crate::privileged::in_ci() {
                bail!("{why}");
            }
            eprintln!("SKIPPED promtool check metrics: {why}");
            return Ok(body);
        }
        promtool_check(&body)?;
        Ok(body)
    }

    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.get("/status")?)?)
    }

    /// Polls /status until `pred` holds (at most `timeout`); returns that status.
    /// Waits until `/status` lists exactly `n` endpoints, all in the
    /// datapath (every recorded pod reconciled).
    pub fn wait_in_datapath(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_status(timeout, "every pod in the datapath", |s| {
            s["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == n && e.iter().all(|e| e["in_datapath"] == true))
        })
        .map(drop)
    }

    pub fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status()?;
            if pred(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "meshd status never showed {what} within {timeout:?}: {s:#}\nlog:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client for meshd's listeners (a 5 s bound on every request).
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into()
}

/// GET `path` from the listener at `addr`.
pub(crate) fn get(addr: &str, path: &str) -> anyhow::Result<String> {
    Ok(agent()
        .get(&format!("http://{addr}{path}"))
        .call()?
        .body_mut()
        .read_to_string()?)
}

fn content_type(r: &ureq::http::Response<ureq::Body>) -> String {
    r.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// `promtool check metrics` over a classic text body: any finding (no help,
/// a counter without `_total`, a bad unit suffix) or a parse error fails.
fn promtool_check(body: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(body.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!(
            "promtool check metrics ({}): {}\nbody:\n{body}",
            out.status,
            said.trim()
        );
    }
    Ok(())
}

/// The endpoint entry of `pod` (by pod name) in a status document.
pub fn endpoint<'a>(status: &'a serde_json::Value, pod: &str) -> Option<&'a serde_json::Value> {
    status["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["pod"] == pod)
}
