//! Real container runtimes (podman, containerd) for the e2e tier, each
//! confined to what the test owns: temporary roots for storage, state and
//! configuration (never the machine's global config), processes started
//! inside the test's node network namespace (`nsenter --net`), containers
//! placed below the test's cgroup. Guards undo everything on drop.

use std::{
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// Whether an e2e test that needs `tools` can run; like
/// [`crate::privileged::require`], a missing tool skips outside CI and fails
/// under `CI=true`.
#[must_use]
pub fn require_tools(test: &str, tools: &[&str]) -> bool {
    if !crate::privileged::require(test) {
        return false;
    }
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            !["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                .iter()
                .any(|d| Path::new(d).join(t).exists())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{} not installed (cargo xtask setup installs them)",
        missing.join(", ")
    );
    assert!(
        !std::env::var("CI").is_ok_and(|v| v == "true" || v == "1"),
        "e2e test {test} cannot run in CI: {why}"
    );
    eprintln!("SKIPPED e2e test {test}: {why}");
    false
}

/// A busybox root filesystem (static busybox plus applet links) in `dir`.
pub fn busybox_rootfs(dir: &Path) -> anyhow::Result<()> {
    for d in ["bin", "etc", "tmp", "www", "proc", "sys", "dev"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).context("copying /bin/busybox")?;
    for applet in [
        "sh", "httpd", "wget", "cat", "echo", "sleep", "ip", "ls", "nc", "true", "timeout",
    ] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))?;
    }
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    std::fs::write(dir.join("etc/group"), "root:x:0:\n")?;
    std::fs::write(dir.join("www/index.html"), "spright-e2e\n")?;
    Ok(())
}

/// The cgroup v1 directories a runtime creates with cgroupfs for a parent
/// named like the test's cgroup (`/sys/fs/cgroup/<controller>/<name>`), and
/// whatever the runtime left below the test's v2 cgroup: removed bottom-up
/// on drop. Must drop before the [`crate::sandbox::Cgroup`] of the same name.
#[derive(Debug)]
pub struct RuntimeCgroups {
    pub name: String,
}

impl Drop for RuntimeCgroups {
    fn drop(&mut self) {
        let Ok(ctrls) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for c in ctrls.flatten() {
            let top = c.path().join(&self.name);
            if !top.is_dir() {
                continue;
            }
            let unified = spright_ebpf::cgroup2_mount().is_some_and(|m| m == c.path());
            if unified {
                // Containers a failed test left running (only ours live here).
                kill_cgroup_tree(&top);
            }
            // The v2 top itself belongs to the sandbox's Cgroup guard.
            remove_tree(&top, !unified);
        }
    }
}

/// Removes a cgroup tree bottom-up (kills nothing: its processes belong to
/// containers the runtime already removed); `top` too when `remove_top`.
fn remove_tree(dir: &Path, remove_top: bool) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path(), true);
            }
        }
    }
    if remove_top {
        for _ in 0..50 {
            match std::fs::remove_dir(dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("cleanup: could not remove cgroup {}", dir.display());
    }
}

/// A spright conflist for a runtime: the plugin attaches at `cgroup`, pins in
/// `bpffs`, records to `state_dir`; host-local hands out `subnet`.
pub fn spright_conflist(
    name: &str,
    bridge: &str,
    subnet: &str,
    cgroup: &Path,
    bpffs: &Path,
    dir: &Path,
) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [{
            "type": "spright-cni",
            "bridge": bridge,
            "stateDir": dir.join("state"),
            "cgroup": cgroup,
            "bpffs": bpffs,
            "logFile": dir.join("cni.log"),
            "capabilities": { "io.kubernetes.cri.pod-annotations": true },
            "ipam": {
                "type": "host-local",
                "dataDir": dir.join("ipam"),
                "ranges": [[{ "subnet": subnet }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
            },
        }],
    })
}

/// A CNI plugin directory holding the workspace's spright-cni.
pub fn cni_bin_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    let bin = dir.join("cni-bin");
    std::fs::create_dir_all(&bin)?;
    std::os::unix::fs::symlink(crate::cni::plugin_bin(), bin.join("spright-cni"))?;
    Ok(bin)
}

/// podman with its own storage, run root, tmp dir, CNI config dir and
/// containers.conf under `dir`, executed inside the node namespace. On drop
/// every container is removed (which runs CNI DEL).
#[derive(Debug)]
pub struct Podman {
    pub dir: PathBuf,
    pub node_netns: PathBuf,
}

impl Podman {
    /// Configures podman under `dir` (CNI backend, cgroupfs, runc, vfs, file
    /// locks) with `cni_bin` before the reference plugins.
    pub fn new(dir: &Path, node_netns: &Path, cni_bin: &Path) -> anyhow::Result<Self> {
        for d in ["root", "runroot", "tmp", "net.d"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let conf = format!(
            r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{d}/events.log"
tmp_dir = "{d}/tmp"
lock_type = "file"
[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}", "{reference}"]
network_config_dir = "{d}/net.d"
"#,
            d = dir.display(),
            bin = cni_bin.display(),
            reference = crate::cni::REFERENCE_PLUGINS,
        );
        std::fs::write(dir.join("containers.conf"), conf)?;
        std::fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{d}/root\"\nrunroot = \"{d}/runroot\"\n",
                d = dir.display()
            ),
        )?;
        Ok(Self {
            dir: dir.to_owned(),
            node_netns: node_netns.to_owned(),
        })
    }

    /// Adds a network (a conflist named after it).
    pub fn add_network(&self, conflist: &Value) -> anyhow::Result<()> {
        let name = conflist["name"].as_str().context("conflist name")?;
        std::fs::write(
            self.dir.join("net.d").join(format!("{name}.conflist")),
            serde_json::to_vec_pretty(conflist)?,
        )?;
        Ok(())
    }

    /// A podman command (inside the node namespace) with extra environment.
    pub fn command(&self, env: &[(&str, &str)], args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.node_netns.display()))
            .arg("podman")
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(args)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env_remove("CNI_ARGS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs podman; fails with its stderr.
    pub fn run(&self, env: &[(&str, &str)], args: &[&str]) -> anyhow::Result<String> {
        let out = self.command(env, args).output().context("running podman")?;
        check(&out, &format!("podman {}", args.join(" ")))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if let Err(e) = self.run(&[], &["rm", "--all", "--force", "--time", "0"]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Free space and inodes of the file systems holding `paths` (`df`), for
/// errors from tools that hide why a write failed.
pub fn disk_report(paths: &[&Path]) -> String {
    let out = Command::new("df")
        .args(["-h", "--output=target,size,avail,iavail"])
        .args(paths)
        .output();
    match out {
        Ok(o) => format!(
            "disk at the time: {}",
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .replace('\n', "; ")
        ),
        Err(e) => format!("df failed: {e}"),
    }
}

/// stdout of a finished command, or an error with its stderr.
pub fn check(out: &Output, what: &str) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Retries `f` until it succeeds (at most `timeout`, every 100 ms).
pub fn retry<T>(timeout: Duration, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The redirect counters of `ip` in the datapath pinned at `bpffs`
/// (redirected messages, redirected bytes).
pub fn redirected(bpffs: &Path, ip: IpAddr) -> anyhow::Result<(u64, u64)> {
    let dp = spright_ebpf::Datapath::open(bpffs)?;
    let c = dp.counters(ip)?;
    Ok((c.redirected_msgs, c.redirected_bytes))
}

/// Writes `text` to a new file (for configs built as strings).
pub fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// A containerd (with its CRI plugin) started by the test inside the node
/// namespace, with root, state, sockets and config under `dir`. On drop:
/// the shims it started (found by their `-address` under `dir`) and
/// containerd itself are killed by pid, and mounts left under `dir` are
/// lazily unmounted.
pub struct Containerd {
    child: std::process::Child,
    pub dir: PathBuf,
    pub address: PathBuf,
    pub log: PathBuf,
}

impl Containerd {
    /// Writes a version-2 config (CRI: `sandbox_image`, native snapshotter,
    /// runc v2 with cgroupfs, CNI from `cni_bin`/`cni_conf`) and starts
    /// containerd; waits (≤ 30 s) for its socket.
    pub fn start(
        dir: &Path,
        node_netns: &Path,
        sandbox_image: &str,
        cni_bin: &Path,
        cni_conf: &Path,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let address = dir.join("containerd.sock");
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # CAP_SYS_RESOURCE is missing here: a negative oom_score_adj (the CRI
  # gives sandboxes -998) would make runc's init fail.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
"#,
            sock = address.display(),
            bin = cni_bin.display(),
            conf = cni_conf.display(),
        );
        std::fs::write(dir.join("config.toml"), config)?;
        let log = dir.join("containerd.log");
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", node_netns.display()))
            .arg("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(std::process::Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting containerd")?;
        let c = Self {
            child,
            dir: dir.to_owned(),
            address,
            log,
        };
        retry(Duration::from_secs(30), || {
            anyhow::ensure!(
                std::os::unix::net::UnixStream::connect(&c.address).is_ok(),
                "containerd socket not up; log:\n{}",
                c.log_text()
            );
            Ok(())
        })?;
        Ok(c)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ctr --address ... -n k8s.io ARGS`.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.address)
            .args(["-n", "k8s.io"])
            .args(args)
            .output()?;
        check(&out, &format!("ctr {}", args.join(" ")))
    }

    /// Pids of the shims this containerd started.
    fn shims(&self) -> Vec<i32> {
        let needle = self.address.display().to_string();
        std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .filter(|pid| {
                        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                            let c = String::from_utf8_lossy(&c);
                            c.contains("containerd-shim") && c.contains(&needle)
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for pid in self.shims() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        unmount_below(&self.dir);
        // The shims' socket directory is fixed in containerd 1.6; remove it
        // (and its parent) only when nothing else uses them.
        let _ = std::fs::remove_dir("/run/containerd/s");
        let _ = std::fs::remove_dir("/run/containerd");
    }
}

/// Network namespace files a runtime created for the test's pods
/// (`/run/netns/cni-...`); on drop, those still present (the test failed
/// before removing its sandboxes) are unmounted and removed.
#[derive(Debug, Default)]
pub struct RuntimeNetns(pub std::cell::RefCell<Vec<PathBuf>>);

impl Drop for RuntimeNetns {
    fn drop(&mut self) {
        for p in self.0.borrow().iter().filter(|p| p.exists()) {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
            if let Err(e) = std::fs::remove_file(p) {
                eprintln!("cleanup: removing {}: {e}", p.display());
            }
        }
    }
}

/// Lazily unmounts every mount point below `dir` (deepest first).
pub fn unmount_below(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        if let Err(e) = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("cleanup: unmounting {p}: {e}");
        }
    }
}

/// Kills every process below the test's v2 cgroup `path` (`cgroup.kill`,
/// which covers the whole subtree): only the test's containers live there.
pub fn kill_cgroup_tree(path: &Path) {
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
}
