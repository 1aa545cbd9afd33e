//! An shm-csi process started by a test (killed by pid on drop), a gRPC
//! client to it, and a guard that leaves no mount behind under the test's
//! directory, also when the test panics.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
pub use shm_csi::client::{Client, Code, Status, ephemeral_publish};

use crate::sandbox::workspace_bin;

/// A temporary directory for sockets, regions and targets. On drop, every
/// mount under it is unmounted (deepest first, lazily) before it is removed.
pub struct MountDir {
    dir: tempfile::TempDir,
}

impl MountDir {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            dir: tempfile::Builder::new().prefix("spright-shm-").tempdir()?,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Mount points under this directory, in mount order.
    pub fn mounts(&self) -> Vec<PathBuf> {
        mounts_under(self.path())
    }

    /// Mounts a size-limited tmpfs at `sub` (for tests that need a region
    /// without the plugin).
    pub fn tmpfs(&self, sub: &str, size: &str) -> anyhow::Result<PathBuf> {
        let p = self.path().join(sub);
        std::fs::create_dir_all(&p)?;
        nix::mount::mount(
            Some("spright-test"),
            &p,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .with_context(|| format!("mounting tmpfs at {}", p.display()))?;
        Ok(p)
    }
}

impl Drop for MountDir {
    fn drop(&mut self) {
        for _ in 0..64 {
            let Some(m) = self.mounts().pop() else {
                break;
            };
            if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("cleanup: unmounting {}: {e}", m.display());
                break;
            }
        }
    }
}

/// Mount points under `dir` according to /proc/self/mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    shm_csi::sys::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// A running shm-csi.
pub struct ShmCsi {
    child: Child,
    pub socket: PathBuf,
    pub region_root: PathBuf,
    pub log: PathBuf,
}

impl ShmCsi {
    /// shm-csi's process id (for its CPU time in `/proc/PID/stat`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts shm-csi with its socket, region root and log under `dir`, plus
    /// `extra` flags; waits until it answers Probe.
    pub fn start(dir: &Path, meshd_addr: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let socket = dir.join("csi/csi.sock");
        let region_root = dir.join("regions");
        std::fs::create_dir_all(dir)?;
        let log = dir.join("shm-csi.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(workspace_bin("shm-csi"))
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--node-id", "test-node", "--meshd-addr", meshd_addr])
            .arg("--region-root")
            .arg(&region_root)
            .args(["--log", "shm_csi=debug,info"])
            // An unknown pod is refused after this wait (default 5 s).
            .args(["--membership-wait-secs", "1"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting shm-csi")?;
        let mut s = Self {
            child,
            socket,
            region_root,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = s.client()
                && c.probe().is_ok()
            {
                return Ok(s);
            }
            if let Some(status) = s.child.try_wait()? {
                bail!("shm-csi exited with {status}; log:\n{}", s.log_text());
            }
            if Instant::now() > deadline {
                bail!("shm-csi not serving within 20 s; log:\n{}", s.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn client(&self) -> anyhow::Result<Client> {
        Client::connect(&self.socket).context("connecting to shm-csi")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ShmCsi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
