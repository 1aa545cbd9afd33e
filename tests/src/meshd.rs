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
    pub addr: String,
    pub log: PathBuf,
}

impl Meshd {
    /// meshd's process id (for its CPU time in `/proc/PID/stat`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts meshd on a free loopback port and waits until it is ready.
    pub fn start(placement: &spright_ebpf::Placement, state_dir: &Path) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_on(placement, state_dir, &format!("127.0.0.1:{port}"))
    }

    /// Starts meshd on `addr` (e.g. to restart it where it was).
    pub fn start_on(
        placement: &spright_ebpf::Placement,
        state_dir: &Path,
        addr: &str,
    ) -> anyhow::Result<Self> {
        Self::start_with(placement, state_dir, addr, &[])
    }

    /// Starts meshd on `addr` with extra flags.
    pub fn start_with(
        placement: &spright_ebpf::Placement,
        state_dir: &Path,
        addr: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let log = state_dir.join(format!("meshd-{}.log", addr.replace([':', '.'], "_")));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(workspace_bin("meshd"))
            .arg("--cgroup")
            .arg(&placement.cgroup)
            .arg("--bpffs")
            .arg(&placement.bpffs)
            .arg("--state-dir")
            .arg(state_dir)
            .args([
                "--metrics-addr",
                addr,
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

    /// GET a path of meshd's HTTP API.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        Ok(agent
            .get(&format!("http://{}{path}", self.addr))
            .call()?
            .body_mut()
            .read_to_string()?)
    }

    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.get("/status")?)?)
    }

    /// Polls /status until `pred` holds (at most `timeout`); returns that status.
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

/// The endpoint entry of `pod` (by pod name) in a status document.
pub fn endpoint<'a>(status: &'a serde_json::Value, pod: &str) -> Option<&'a serde_json::Value> {
    status["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["pod"] == pod)
}
