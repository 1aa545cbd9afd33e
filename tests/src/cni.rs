//! A node for CNI tests: a node network namespace *without* a bridge (the
//! plugin creates it), pod namespaces, a cgroup and a pin directory for the
//! datapath, and a temporary directory for the plugin's state, host-local's
//! allocations and logs. The plugin is executed exactly as a runtime does:
//! `CNI_*` environment, config on stdin, inside the node namespace
//! (`nsenter --net=...`). Everything is removed on drop, also on panic.
//!
//! Which binary: `SPRIGHT_CNI_BIN` when set (e.g. a release build), else the
//! workspace's `spright-cni` (see [`crate::sandbox::workspace_bin`]).

use std::{
    collections::BTreeSet,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::sandbox::{Cgroup, Netns, PinDir, workspace_bin};

/// Every version the plugin supports.
pub const VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Where Debian's reference plugins live.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// A short name unique to this process and call.
pub fn unique(tag: &str) -> String {
    crate::sandbox::unique(&format!("c{tag}"))
}

/// The plugin binary under test.
pub fn plugin_bin() -> PathBuf {
    std::env::var_os("SPRIGHT_CNI_BIN").map_or_else(|| workspace_bin("spright-cni"), PathBuf::from)
}

/// What one invocation printed and how it exited.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub ok: bool,
    pub stdout: Value,
    pub stderr: String,
}

impl Outcome {
    /// The CNI error code (panics when the call succeeded).
    pub fn code(&self) -> u64 {
        assert!(!self.ok, "expected a failure, got {}", self.stdout);
        self.stdout["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("no code in {}", self.stdout))
    }
}

/// One attachment's identity.
#[derive(Debug, Clone)]
pub struct Attach {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
}

/// A node owned by one test. Fields drop in declaration order.
#[derive(Debug)]
pub struct Node {
    pub pins: PinDir,
    pub cgroup: Cgroup,
    pub pods: Vec<Netns>,
    pub node: Netns,
    pub dir: tempfile::TempDir,
    pub name: String,
    pub bridge: String,
}

impl Node {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let name = unique(tag);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()?;
        let node = Netns::create(format!("{name}-node"))?;
        let cgroup = Cgroup::create(&name)?;
        let pins = PinDir::create(&name)?;
        Ok(Self {
            pins,
            cgroup,
            pods: Vec::new(),
            node,
            dir,
            bridge: "sprbr0".into(),
            name,
        })
    }

    /// Adds an empty pod namespace; returns its index.
    pub fn add_pod(&mut self) -> anyhow::Result<usize> {
        let i = self.pods.len();
        self.pods
            .push(Netns::create(format!("{}-p{i}", self.name))?);
        Ok(i)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    /// host-local IPAM over `ranges` (each a list of subnets, one per family).
    pub fn ipam(&self, subnets: &[&str]) -> Value {
        let ranges: Vec<Value> = subnets.iter().map(|s| json!([{ "subnet": s }])).collect();
        json!({ "type": "host-local", "dataDir": self.ipam_dir(), "ranges": ranges })
    }

    /// A spright-cni config for this node.
    pub fn conf(&self, version: &str, subnets: &[&str]) -> Value {
        json!({
            "cniVersion": version,
            "name": "sprnet",
            "type": "spright-cni",
            "bridge": self.bridge,
            "ipMasq": true,
            "hairpinMode": true,
            "mtu": 1400,
            "stateDir": self.state_dir(),
            "cgroup": self.cgroup.path,
            "bpffs": self.pins.path,
            "logFile": self.dir.path().join("cni.log"),
            "capabilities": { "io.kubernetes.cri.pod-annotations": true },
            "ipam": self.ipam(subnets),
        })
    }

    /// An attachment of pod `i` as `eth0`.
    pub fn attach(&self, i: usize, container_id: &str) -> Attach {
        Attach {
            container_id: container_id.to_owned(),
            netns: self.pods[i].path().display().to_string(),
            ifname: "eth0".into(),
            args: String::new(),
        }
    }

    /// Runs the plugin inside the node namespace as a runtime would.
    pub fn invoke(
        &self,
        command: &str,
        conf: &Value,
        at: Option<&Attach>,
    ) -> anyhow::Result<Outcome> {
        invoke_plugin(
            &plugin_bin(),
            &self.node.path(),
            command,
            conf,
            at,
            &plugin_path(),
        )
    }

    /// Links in the node namespace other than `lo` and the bridge.
    pub fn node_links(&self) -> anyhow::Result<Vec<String>> {
        Ok(link_names(&self.node)?
            .into_iter()
            .filter(|l| l != "lo" && *l != self.bridge)
            .collect())
    }

    /// IP allocations host-local holds for network `net`.
    pub fn allocations(&self, net: &str) -> Vec<String> {
        std::fs::read_dir(self.ipam_dir().join(net))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Endpoint records in the state directory.
    pub fn records(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.state_dir().join("endpoints"))
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// Addresses in the datapath's endpoint map (empty when not installed).
    pub fn map_entries(&self) -> anyhow::Result<Vec<IpAddr>> {
        match spright_ebpf::Datapath::open(&self.pins.path) {
            Ok(dp) => Ok(dp.endpoints()?.into_iter().map(|(ip, _)| ip).collect()),
            Err(spright_ebpf::Error::NotInstalled { .. }) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// Masquerade rules the plugin left in the node namespace.
    pub fn masq_rules(&self) -> anyhow::Result<Vec<String>> {
        let mut rules = Vec::new();
        for tool in ["iptables", "ip6tables"] {
            let out = self
                .node
                .exec(tool, &["-w", "-t", "nat", "-S", "POSTROUTING"])?;
            rules.extend(
                out.lines()
                    .filter(|l| l.contains("spright-cni:"))
                    .map(str::to_owned),
            );
        }
        Ok(rules)
    }

    /// Everything an attachment can leave behind; empty means clean.
    pub fn leftovers(&self, net: &str) -> anyhow::Result<Vec<String>> {
        let mut left = Vec::new();
        left.extend(
            self.node_links()?
                .into_iter()
                .map(|l| format!("node link {l}")),
        );
        left.extend(
            self.allocations(net)
                .into_iter()
                .map(|a| format!("ip allocation {a}")),
        );
        left.extend(
            self.records()
                .into_iter()
                .map(|r| format!("record {}", r.display())),
        );
        left.extend(
            self.map_entries()?
                .into_iter()
                .map(|ip| format!("endpoint map entry {ip}")),
        );
        left.extend(
            self.masq_rules()?
                .into_iter()
                .map(|r| format!("iptables rule {r}")),
        );
        for pod in &self.pods {
            let links: Vec<String> = link_names(pod)?.into_iter().filter(|l| l != "lo").collect();
            left.extend(
                links
                    .into_iter()
                    .map(|l| format!("link {l} in {}", pod.name)),
            );
        }
        Ok(left)
    }
}

/// CNI_PATH: the reference plugins (host-local).
pub fn plugin_path() -> String {
    REFERENCE_PLUGINS.to_owned()
}

/// Runs a CNI plugin binary inside `node_netns`.
pub fn invoke_plugin(
    bin: &Path,
    node_netns: &Path,
    command: &str,
    conf: &Value,
    at: Option<&Attach>,
    cni_path: &str,
) -> anyhow::Result<Outcome> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", node_netns.display()))
        .arg(bin)
        .env_remove("CNI_CONTAINERID")
        .env_remove("CNI_NETNS")
        .env_remove("CNI_IFNAME")
        .env_remove("CNI_ARGS")
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(a) = at {
        cmd.env("CNI_CONTAINERID", &a.container_id)
            .env("CNI_NETNS", &a.netns)
            .env("CNI_IFNAME", &a.ifname);
        if !a.args.is_empty() {
            cmd.env("CNI_ARGS", &a.args);
        }
    }
    raw_invoke(cmd, &serde_json::to_vec(conf)?)
}

/// Runs a prepared plugin command with `stdin`; parses stdout as JSON.
pub fn raw_invoke(mut cmd: Command, stdin: &[u8]) -> anyhow::Result<Outcome> {
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    child.stdin.take().context("stdin")?.write_all(stdin)?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let stdout = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).with_context(|| format!("plugin printed {text:?}"))?
    };
    Ok(Outcome {
        ok: out.status.success(),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Link names in a namespace.
pub fn link_names(ns: &Netns) -> anyhow::Result<Vec<String>> {
    let out = ns.ip(&["-o", "link", "show"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect())
}

/// The pod addresses of an ADD result.
pub fn result_ips(result: &Value) -> anyhow::Result<Vec<IpAddr>> {
    let ips = result["ips"].as_array().context("result has no ips")?;
    ips.iter()
        .map(|ip| {
            let a = ip["address"].as_str().context("ip without address")?;
            let host = a.split('/').next().unwrap_or(a);
            host.parse().with_context(|| format!("bad address {a}"))
        })
        .collect()
}

/// `ping` (busybox) from a namespace; true when a reply came back.
pub fn ping(from: &Netns, to: IpAddr) -> bool {
    from.exec("busybox", &["ping", "-c", "1", "-W", "2", &to.to_string()])
        .is_ok()
}

/// A TCP exchange between two pods with `spright-netpeer` (a framed,
/// hashed transfer; the sender retries a blocking read's EAGAIN): returns
/// `hello-<port>` when the bytes arrived intact, else the sender's report.
pub fn tcp_exchange(
    client: &Netns,
    server: &Netns,
    to: IpAddr,
    port: u16,
) -> anyhow::Result<String> {
    let t = std::time::Duration::from_secs(30);
    let addr = std::net::SocketAddr::new(to, port).to_string();
    let peer = |ns: &Netns, args: &[&str]| {
        let mut cmd = Command::new(crate::sandbox::netpeer_bin());
        cmd.arg("--netns").arg(ns.path()).args(args);
        crate::sandbox::Peer::spawn_command(cmd)
    };
    let srv = peer(server, &["serve", "--listen", &addr])?;
    anyhow::ensure!(srv.line(t)? == "ready", "server did not start");
    let cli = peer(client, &["send", "--connect", &addr, "--bytes", "4096"])?;
    let report = cli.report(t)?;
    cli.finish(t)?;
    srv.finish(t)?;
    Ok(if report["intact"] == true {
        format!("hello-{port}")
    } else {
        report.to_string()
    })
}

/// Distinct values of a list (for "50 distinct IPs").
pub fn distinct<T: Ord + Clone>(v: &[T]) -> usize {
    v.iter().cloned().collect::<BTreeSet<_>>().len()
}
