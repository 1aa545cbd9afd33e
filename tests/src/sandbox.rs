//! A simulated node owned by one test: a node network namespace holding a
//! bridge, pod namespaces with a veth into it, a cgroup v2 directory for the
//! pod processes and a bpffs pin directory. Every piece is removed on drop, in
//! reverse order of creation, also when the test panics. The root namespace
//! gets no addresses or routes, and nothing attaches at the cgroup v2 root.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::{Context as _, bail};

/// The pod subnet inside every sandbox (never routed outside its node namespace).
pub const SUBNET: [u8; 3] = [10, 213, 0];
/// The IPv6 pod subnet inside every sandbox (`fd00:213::/64`).
pub const SUBNET6: [u16; 4] = [0xfd00, 0x213, 0, 0];

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, short enough for interface names.
pub fn unique(tag: &str) -> String {
    format!(
        "spr{tag}{}x{}",
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command to completion; the error carries its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`ip netns`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: String) -> anyhow::Result<Self> {
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The bind-mounted namespace file.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a program inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// A cgroup v2 directory created by the test (never the root), removed on drop
/// after killing the processes the test put into it.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let root = spright_ebpf::cgroup2_mount().context("no cgroup v2 mount")?;
        let path = root.join(name);
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Only this test's pod processes live here.
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        for _ in 0..100 {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("cleanup: could not remove cgroup {}", self.path.display());
    }
}

/// A bpffs pin directory; on drop the datapath pinned there is uninstalled
/// (programs detached, pins removed).
#[derive(Debug)]
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let bpffs = Path::new("/sys/fs/bpf");
        spright_ebpf::ensure_bpffs_mounted(bpffs)?;
        let path = bpffs.join(name);
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = spright_ebpf::uninstall(&self.path) {
            eprintln!("cleanup: uninstalling {}: {e:#}", self.path.display());
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A pod: its namespace, its address on the node bridge.
#[derive(Debug)]
pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The veth end on the bridge, in the node namespace.
    pub host_if: String,
}

/// One simulated node. Fields drop in declaration order: pins (detach), then
/// the cgroup, the pods and finally the node namespace.
#[derive(Debug)]
pub struct Sandbox {
    pub pins: PinDir,
    pub cgroup: Cgroup,
    pub pods: Vec<Pod>,
    pub node: Netns,
    pub bridge: String,
    name: String,
}

impl Sandbox {
    /// A node namespace with bridge `br0` at `10.213.0.1/24`, a cgroup and a
    /// pin directory, all named after `tag` and this process.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let name = unique(tag);
        let node = Netns::create(format!("{name}-node"))?;
        let bridge = "br0".to_owned();
        node.ip(&["link", "add", &bridge, "type", "bridge"])?;
        node.ip(&["addr", "add", &format!("{}/24", gateway()), "dev", &bridge])?;
        node.ip(&[
            "addr",
            "add",
            &format!("{}/64", gateway6()),
            "dev",
            &bridge,
            "nodad",
        ])?;
        node.ip(&["link", "set", &bridge, "up"])?;
        let cgroup = Cgroup::create(&name)?;
        let pins = PinDir::create(&name)?;
        Ok(Self {
            pins,
            cgroup,
            pods: Vec::new(),
            node,
            bridge,
            name,
        })
    }

    /// Adds a pod namespace with `eth0` on the bridge; returns its index.
    pub fn add_pod(&mut self) -> anyhow::Result<usize> {
        let i = self.pods.len();
        let host_octet = u8::try_from(10 + i).context("too many pods")?;
        let ip = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], host_octet);
        let ip6 = subnet6_host(u16::from(host_octet));
        let ns = Netns::create(format!("{}-p{i}", self.name))?;
        let host_if = format!("v{}p{i}", &self.name[3..])
            .chars()
            .take(15)
            .collect::<String>();
        self.node.ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        self.node
            .ip(&["link", "set", &host_if, "master", &self.bridge, "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        ns.ip(&["route", "add", "default", "via", &gateway().to_string()])?;
        self.pods.push(Pod {
            ns,
            ip,
            ip6,
            host_if,
        });
        Ok(i)
    }

    /// Where the datapath of this sandbox attaches and pins.
    pub fn placement(&self) -> spright_ebpf::Placement {
        spright_ebpf::Placement {
            cgroup: self.cgroup.path.clone(),
            bpffs: self.pins.path.clone(),
        }
    }

    /// Puts pods into chain `chain` of namespace `default` (or into none)
    /// directly in the endpoint map, both addresses of each, as meshd would
    /// from their records.
    pub fn set_chain(
        &self,
        dp: &mut spright_ebpf::Datapath,
        pods: &[usize],
        chain: Option<&str>,
    ) -> anyhow::Result<()> {
        let value = spright_ebpf::EndpointValue {
            chain_id: chain.map_or(0, |c| spright_ebpf::chain_id("default", c)),
            ..Default::default()
        };
        for &pod in pods {
            for ip in [
                std::net::IpAddr::V4(self.pods[pod].ip),
                std::net::IpAddr::V6(self.pods[pod].ip6),
            ] {
                dp.upsert_endpoint(ip, value)?;
            }
        }
        Ok(())
    }

    /// Records pod `pod` as the CNI plugin would, in `state_dir` (bridge mode,
    /// both addresses, chain `chain` in namespace `default`).
    pub fn record_pod(
        &self,
        state_dir: &Path,
        pod: usize,
        chain: Option<&str>,
    ) -> anyhow::Result<spright_endpoint::Record> {
        let p = &self.pods[pod];
        let record = spright_endpoint::Record {
            version: spright_endpoint::RECORD_VERSION,
            container_id: format!("{}-c{pod}", self.name),
            ifname: "eth0".into(),
            netns: p.ns.path().display().to_string(),
            network: "sandbox".into(),
            ips: vec![p.ip.into(), p.ip6.into()],
            pod: spright_endpoint::PodRef {
                namespace: "default".into(),
                name: format!("pod{pod}"),
                uid: String::new(),
            },
            chain: chain.map(Into::into),
            function: None,
            redirect: true,
            host_ifname: Some(p.host_if.clone()),
            netns_cookie: Some(spright_endpoint::netns_cookie(&p.ns.path())?),
        };
        spright_endpoint::write(state_dir, &record)?;
        Ok(record)
    }

    /// Starts `spright-netpeer ARGS` as a process of pod `pod` (in the sandbox's
    /// cgroup and the pod's network namespace).
    pub fn spawn_peer(&self, pod: usize, args: &[&str]) -> anyhow::Result<Peer> {
        self.spawn_in(pod, &netpeer_bin(), args)
    }

    /// Starts `spright-torture ARGS` as a process of pod `pod`.
    pub fn spawn_torture(&self, pod: usize, args: &[&str]) -> anyhow::Result<Peer> {
        self.spawn_in(pod, &workspace_bin("spright-torture"), args)
    }

    /// Starts the pod-process tool `bin` with `ARGS` in the sandbox's cgroup
    /// and pod `pod`'s network namespace.
    fn spawn_in(&self, pod: usize, bin: &Path, args: &[&str]) -> anyhow::Result<Peer> {
        let mut cmd = Command::new(bin);
        cmd.arg("--cgroup")
            .arg(&self.cgroup.path)
            .arg("--netns")
            .arg(self.pods[pod].ns.path())
            .args(args);
        Peer::spawn_command(cmd)
    }
}

/// The bridge's (gateway's) address.
pub fn gateway() -> Ipv4Addr {
    Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], 1)
}

/// The IPv6 address of the bridge.
pub fn gateway6() -> Ipv6Addr {
    subnet6_host(1)
}

/// Host `n` of the IPv6 pod subnet.
fn subnet6_host(n: u16) -> Ipv6Addr {
    let [p0, p1, p2, p3] = SUBNET6;
    Ipv6Addr::new(p0, p1, p2, p3, 0, 0, 0, n)
}

/// The `spright-netpeer` binary.
pub fn netpeer_bin() -> PathBuf {
    workspace_bin("spright-netpeer")
}

/// A binary of the workspace, next to the running executable (cargo puts test
/// binaries in `deps/` and binaries one level up).
///
/// `cargo xtask test` builds every workspace binary before the privileged
/// tiers. A plain `cargo test -p spright-tests` does not rebuild other
/// packages' binaries, so a binary older than any source file it was built
/// from (per cargo's dep-info) fails loudly here instead of testing
/// yesterday's code.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let bin = [dir.join(name), dir.join("..").join(name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "binary {name} not found next to {}; run `cargo build --workspace --bins`",
                exe.display()
            )
        });
    fresh(bin)
}

/// The target of the static spright-cni (what the image ships and
/// install-cni copies onto hosts).
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";

/// The static (musl) spright-cni of the profile these tests were built
/// with, failing like [`workspace_bin`] when it is missing or stale
/// (`cargo xtask build` builds it).
pub fn static_plugin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test exe>
    let profile_dir = exe.parent().and_then(Path::parent).expect("profile dir");
    let profile = profile_dir.file_name().expect("profile name");
    let bin = profile_dir
        .parent()
        .expect("target dir")
        .join(STATIC_TARGET)
        .join(profile)
        .join("spright-cni");
    assert!(
        bin.exists(),
        "{} not found; run `cargo build -p spright-cni --target {STATIC_TARGET}` (cargo xtask build does)",
        bin.display()
    );
    fresh(bin)
}

/// `bin`, when none of the sources it was built from is newer.
fn fresh(bin: PathBuf) -> PathBuf {
    // Cargo's dep-info next to the binary lists every source file it was
    // built from; any of them being newer means the binary is stale.
    let built = mtime(&bin);
    let depinfo = std::fs::read_to_string(bin.with_extension("d")).unwrap_or_default();
    let sources = depinfo.split_once(": ").map_or("", |(_, deps)| deps);
    // Only sources count: build-script outputs under target/ are rewritten by
    // cargo itself without the binary necessarily being relinked.
    let bin = bin.canonicalize().unwrap_or(bin);
    let target = bin
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    for src in sources
        .split_whitespace()
        .map(Path::new)
        .filter(|p| !p.starts_with(&target))
    {
        assert!(
            !src.exists() || mtime(src) <= built,
            "{} is older than {}; run `cargo build --workspace --bins` (cargo xtask test does)",
            bin.display(),
            src.display()
        );
    }
    bin
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or(std::time::UNIX_EPOCH)
}

/// A pod process started by the test; killed (by its pid, or with its
/// whole process group when started by [`Peer::spawn_group`]) on drop.
pub struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    group: bool,
    /// `finish` saw it exit (and reaped it): its pid may be reused.
    reaped: bool,
}

impl Peer {
    /// Starts `cmd` (a netpeer invocation, possibly wrapped, e.g. by `taskset`).
    pub fn spawn_command(cmd: Command) -> anyhow::Result<Self> {
        Self::spawn(cmd, false)
    }

    /// As [`Self::spawn_command`], in a process group of its own that is
    /// killed as a whole on drop (the benchmarks: nothing they start may
    /// outlive them, also on a timeout or Ctrl-C, see [`crate::procgroup`]).
    pub fn spawn_group(cmd: Command) -> anyhow::Result<Self> {
        Self::spawn(cmd, true)
    }

    fn spawn(mut cmd: Command, group: bool) -> anyhow::Result<Self> {
        if group {
            crate::procgroup::own_group(&mut cmd);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            lines,
            group,
            reaped: false,
        })
    }

    /// The next line the peer prints, waiting at most `timeout`; gives up
    /// early when the process is interrupted (`procgroup::trap_interrupts`).
    pub fn line(&self, timeout: Duration) -> anyhow::Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            crate::procgroup::check_interrupted()?;
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(line) => return Ok(line),
                Err(mpsc::RecvTimeoutError::Timeout) if !left.is_zero() => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "peer {} printed nothing within {timeout:?}",
                            self.child.id()
                        )
                    });
                }
            }
        }
    }

    /// The next line, parsed as the peer's JSON report.
    pub fn report(&self, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        let line = self.line(timeout)?;
        serde_json::from_str(&line).with_context(|| format!("peer printed {line:?}"))
    }

    /// Closes the peer's stdin (lets a `--hold` sender finish).
    pub fn release(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.flush();
        }
    }

    /// Waits for the peer to exit successfully, at most `timeout`.
    pub fn finish(mut self, timeout: Duration) -> anyhow::Result<()> {
        self.release();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.reaped = true;
                if status.success() {
                    return Ok(());
                }
                bail!("peer exited with {status}");
            }
            if std::time::Instant::now() > deadline {
                bail!("peer {} still running after {timeout:?}", self.child.id());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if self.group && !self.reaped {
            crate::procgroup::kill_group(&mut self.child);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
