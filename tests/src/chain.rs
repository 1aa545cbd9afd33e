//! The demo's and the chain benchmark's machinery: a simulated node running a
//! chain of unmodified HTTP functions (`spright-fn`) under one of several
//! network set-ups, loaded by `wrk` from a client pod outside the chain.
//!
//! Modes:
//! - `reference`: pods made by the reference CNI `bridge` plugin;
//! - `sidecar`: the same, plus a real L4 proxy (haproxy, TCP mode) in front of
//!   every function, as a sidecar mesh would put one;
//! - `spright-off`: pods made by spright-cni, not annotated into a chain (the
//!   programs are attached and decide "no");
//! - `spright-on`: pods made by spright-cni with `spright.dev/chain` in the pod
//!   annotations (passed as containerd passes them), meshd running;
//! - `spright-sdk`: as `spright-on`, but the functions are the SDK's example
//!   chain (`spright-shm-chain`): the gateway puts each body into the chain's
//!   shared memory, mounted into every function pod by shm-csi
//!   (NodePublishVolume as kubelet calls it), and only 16-byte descriptors
//!   cross the (redirected) sockets.
//!
//! Every function does the same work in every mode ([`spright_shm::work`]:
//! hash the body `--work` times, upper-case it in place, forward it; nothing
//! with `--work 0`, which leaves the pure transport).
//!
//! Functions and sidecars run pinned to CPU 0, the load generator to the last
//! CPU. CPU per request counts the whole node: all busy time of the machine
//! during the measured window (`/proc/stat`: user, nice, system, irq,
//! softirq of every CPU) divided by requests, so meshd, softirq work and the
//! load generator are in it; the load generator's own share (its rusage) and
//! the functions' cgroup (`cpu.stat`) are shown next to it.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    cni::{self, Node, invoke_plugin},
    meshd::Meshd,
    plot,
    sandbox::{Cgroup, Peer, workspace_bin},
    sdk_lang::{self, Lang},
    stats::{self, Spread},
};

const T: Duration = Duration::from_mins(1);
pub(crate) const PORT: u16 = 8080;
const APP_PORT: u16 = 9080;

/// A set-up the chain runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Reference,
    Sidecar,
    SprightOff,
    SprightOn,
    SprightSdk,
    /// Accelerated with meshd's `--flow-events=false`: the cost of the
    /// flow events is `spright-on` over this.
    SprightNoflows,
    /// Accelerated with meshd's `--memory-bound-bytes off`: the cost of
    /// the memory bound is `spright-on` over this.
    SprightNobound,
}

impl Mode {
    pub const ALL: [Self; 7] = [
        Self::Reference,
        Self::Sidecar,
        Self::SprightOff,
        Self::SprightOn,
        Self::SprightSdk,
        Self::SprightNoflows,
        Self::SprightNobound,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Reference => "reference",
            Self::Sidecar => "sidecar",
            Self::SprightOff => "spright-off",
            Self::SprightOn => "spright-on",
            Self::SprightSdk => "spright-sdk",
            Self::SprightNoflows => "spright-noflows",
            Self::SprightNobound => "spright-nobound",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Reference => "reference bridge CNI",
            Self::Sidecar => "bridge CNI + haproxy L4 sidecars",
            Self::SprightOff => "spright, no acceleration",
            Self::SprightOn => "spright, accelerated",
            Self::SprightSdk => "spright + SDK shared memory",
            Self::SprightNoflows => "spright, accelerated, flow events off",
            Self::SprightNobound => "spright, accelerated, memory bound off",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .with_context(|| {
                format!("unknown mode {s:?}; modes: reference, sidecar, spright-off, spright-on, spright-sdk, spright-noflows, spright-nobound")
            })
    }

    fn spright(self) -> bool {
        matches!(
            self,
            Self::SprightOff
                | Self::SprightOn
                | Self::SprightSdk
                | Self::SprightNoflows
                | Self::SprightNobound
        )
    }

    fn in_chain(self) -> bool {
        matches!(
            self,
            Self::SprightOn | Self::SprightSdk | Self::SprightNoflows | Self::SprightNobound
        )
    }
}

/// What to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    /// Functions in the chain, gateway included (1–8).
    pub length: usize,
    /// Request body size in bytes.
    pub payload: usize,
    /// Concurrent keep-alive connections of the load generator.
    pub connections: usize,
    /// Measured load duration.
    pub seconds: u64,
    /// Rounds of the function's work ([`spright_shm::work::apply`]) each
    /// function does on the body; 0 is none at all.
    pub work: u32,
    /// Call every function (the gateway too) through its own ClusterIP,
    /// with kube-proxy's DNAT emulated in the node (iptables), instead of
    /// by pod address.
    pub services: bool,
    /// The `spright-sdk` chain's languages, position by position (missing
    /// positions, and all of them when empty, are Rust; position 0, the
    /// gateway, is always Rust). Other modes ignore it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sdk_langs: Vec<Lang>,
}

impl Spec {
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            (1..=8).contains(&self.length),
            "--length must be 1 to 8, got {}",
            self.length
        );
        ensure!(
            (64..=1 << 20).contains(&self.payload),
            "--payload must be 64 B to 1 MiB, got {}",
            self.payload
        );
        ensure!(
            (1..=256).contains(&self.connections),
            "--connections must be 1 to 256, got {}",
            self.connections
        );
        ensure!(
            (1..=300).contains(&self.seconds),
            "--duration must be 1 to 300 seconds, got {}",
            self.seconds
        );
        ensure!(
            self.work <= 1000,
            "--work must be 0 to 1000 rounds, got {}",
            self.work
        );
        sdk_lang::validate(&self.sdk_langs, self.length)
    }

    /// Whether the SDK chain has a function that is not Rust.
    pub fn mixed_sdk(&self) -> bool {
        self.sdk_langs.iter().any(|&l| l != Lang::Rust)
    }

    /// A mode's name, the SDK chain's with its languages when they are
    /// mixed: `spright-sdk (rust,c,python,rust)`.
    pub fn mode_name(&self, mode: Mode) -> String {
        self.with_langs(mode, mode.name())
    }

    /// [`Mode::describe`], with the SDK chain's languages when mixed.
    pub fn mode_describe(&self, mode: Mode) -> String {
        self.with_langs(mode, mode.describe())
    }

    fn with_langs(&self, mode: Mode, name: &str) -> String {
        if mode == Mode::SprightSdk && self.mixed_sdk() {
            format!(
                "{name} ({})",
                sdk_lang::describe(&self.sdk_langs, self.length)
            )
        } else {
            name.to_owned()
        }
    }
}

/// What one mode measured in one round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub mode: Mode,
    pub requests: u64,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// CPU time of the whole node per request: all busy time of every CPU
    /// during the measured window (`/proc/stat`), load generator included.
    pub cpu_us_per_request: f64,
    /// The kernel's part of `cpu_us_per_request`: system, irq and softirq
    /// time of every CPU (network stack, syscalls, scheduling).
    #[serde(default)]
    pub kernel_cpu_us_per_request: f64,
    /// The load generator's share of `cpu_us_per_request` (wrk's rusage).
    pub loadgen_cpu_us_per_request: f64,
    /// CPU time of the functions (and sidecars) per request, from their cgroup.
    pub functions_cpu_us_per_request: f64,
    /// Bytes the chain's pods sent socket to socket (spright-on only).
    pub redirected_bytes: u64,
    /// The outsider's request went through the chain without being redirected.
    pub outsider_redirected_bytes: Option<u64>,
    /// Share of the machine's CPU time (0–1) used by anything but the
    /// benchmark during the measured window ([`crate::stats::other_cpu_share`]):
    /// node busy time minus the functions' cgroup, wrk, meshd, shm-csi and
    /// this process.
    #[serde(default)]
    pub other_cpu_share: f64,
}

/// Set by Ctrl-C; long waits check it so everything unwinds and cleans up
/// (see [`crate::procgroup::trap_interrupts`]).
pub use crate::procgroup::{check_interrupted, interrupted};

/// One pod: its namespace index in the node, its address, its CNI identity.
pub(crate) struct PodInfo {
    pub(crate) index: usize,
    pub(crate) ip: IpAddr,
    pub(crate) attach: cni::Attach,
}

/// Runs the chain under `mode`; `progress` gets human-readable lines.
pub fn run(spec: &Spec, mode: Mode, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Outcome> {
    spec.validate()?;
    let ncpu = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let (fn_cpu, load_cpu) = match std::env::var("SPRIGHT_DEMO_UNPINNED") {
        Ok(_) => (format!("0-{}", ncpu - 1), format!("0-{}", ncpu - 1)),
        Err(_) => ("0".to_owned(), (ncpu - 1).to_string()),
    };
    let mut node = Node::new("d")?;
    // Reference modes keep their processes out of the cgroup the programs
    // watch, but in one of their own so CPU is accounted the same way.
    let ref_cgroup = if mode.spright() {
        None
    } else {
        Some(Cgroup::create(&format!("{}-ref", node.name))?)
    };
    let cgroup_path = ref_cgroup
        .as_ref()
        .map_or(node.cgroup.path.clone(), |c| c.path.clone());

    // Pods: the chain's functions, a client (load generator), an outsider.
    let n = spec.length;
    let mut pods = Vec::new();
    for i in 0..n + 2 {
        let index = node.add_pod()?;
        let name = match i {
            i if i < n => format!("fn-{i}"),
            i if i == n => "client".to_owned(),
            _ => "outsider".to_owned(),
        };
        let in_chain = mode.in_chain() && i < n;
        pods.push(add_pod(&node, mode, index, &name, in_chain)?);
    }
    progress(&format!(
        "{}: {} pods attached by {} ({})",
        mode.name(),
        pods.len(),
        if mode.spright() {
            "spright-cni"
        } else {
            "the reference bridge plugin"
        },
        pods.iter()
            .map(|p| p.ip.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let meshd = if mode.spright() {
        let flags: &[&str] = match mode {
            Mode::SprightNoflows => &["--flow-events", "false"],
            Mode::SprightNobound => &["--memory-bound-bytes", "off"],
            _ => &[],
        };
        Some(Meshd::start_flags(
            &node_placement(&node),
            &node.state_dir(),
            flags,
        )?)
    } else {
        None
    };

    // SDK mode: shm-csi mounts the chain's region into every function pod.
    let shm = match (mode, &meshd) {
        (Mode::SprightSdk, Some(m)) => Some(Shm::publish(&node, m, spec.payload, n)?),
        _ => None,
    };

    // Where each function is called: its pod address, or its ClusterIP.
    let addrs: Vec<SocketAddr> = if spec.services {
        let addrs = expose_as_services(&node, &pods[..n], mode)?;
        progress(&format!(
            "{}: every function behind a ClusterIP with kube-proxy DNAT: {}",
            mode.name(),
            addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        ));
        addrs
    } else {
        pods[..n]
            .iter()
            .map(|p| SocketAddr::new(p.ip, PORT))
            .collect()
    };

    // The SDK chain's program per position, in its language.
    let programs: Vec<Vec<String>> = if shm.is_some() {
        let programs = (0..n)
            .map(|i| sdk_lang::program(sdk_lang::at(&spec.sdk_langs, i), i))
            .collect::<anyhow::Result<_>>()?;
        progress(&format!(
            "{}: functions in {}",
            mode.name(),
            sdk_lang::describe(&spec.sdk_langs, n)
        ));
        programs
    } else {
        Vec::new()
    };

    // Functions, last first so each can name the next.
    let mut procs: Vec<Peer> = Vec::new();
    for i in (0..n).rev() {
        let p = &pods[i];
        let next = (i + 1 < n).then(|| addrs[i + 1].to_string());
        if let Some(shm) = &shm {
            procs.push(sdk_function(
                &node,
                p.index,
                &cgroup_path,
                &fn_cpu,
                &sdk_args(&programs[i], next.as_deref(), &shm.targets[i], spec.work),
            )?);
            continue;
        }
        let next = next.map(|a| format!("http://{a}/"));
        let listen = if mode == Mode::Sidecar {
            format!("127.0.0.1:{APP_PORT}")
        } else {
            sock(p.ip, PORT)
        };
        let mut args = vec![
            "--listen".to_owned(),
            listen,
            "--name".into(),
            format!("fn{i}"),
            "--work".into(),
            spec.work.to_string(),
        ];
        if let Some(next) = next {
            args.extend(["--next".into(), next]);
        }
        procs.push(Peer::spawn_group(pod_command(
            &node,
            p.index,
            &cgroup_path,
            &fn_cpu,
            &workspace_bin("spright-fn"),
            &args,
        ))?);
        if mode == Mode::Sidecar {
            procs.push(sidecar(&node, p.index, &cgroup_path, &fn_cpu)?);
        }
    }
    for p in &procs {
        ensure!(p.line(T)? == "ready", "a function did not start");
    }
    // Every SDK function, whatever its language, says where it listens
    // once its pool is open (they were started last first).
    if shm.is_some() {
        for (k, p) in procs.iter().enumerate() {
            let i = n - 1 - k;
            let lang = sdk_lang::at(&spec.sdk_langs, i);
            let line = p.line(T)?;
            ensure!(
                line.starts_with("listening "),
                "fn-{i} ({lang}) printed {line:?}, not `listening ADDR`"
            );
            progress(&format!("{}: fn-{i} ({lang}) {line}", mode.name()));
        }
    }
    for p in &pods[..n] {
        wait_listening(&node, p.index, PORT)?;
    }
    progress(&format!(
        "{}: chain of {n} functions up: {}",
        mode.name(),
        chain_desc(&pods[..n])
    ));

    if let (true, Some(m)) = (spec.services && mode.in_chain(), &meshd) {
        m.wait_status(T, "every stage's ClusterIP with its local backend", |s| {
            addrs[1..].iter().all(|a| {
                crate::services::service_status(s, *a)
                    .and_then(|v| v["local_backends"].as_array())
                    .is_some_and(|b| b.len() == 1)
            })
        })?;
    }

    // The outsider calls the gateway once: it works, and is never redirected.
    let gateway = format!("http://{}/", addrs[0]);
    let body_file = node.dir.path().join("body");
    std::fs::write(&body_file, vec![b'x'; spec.payload])?;
    let outsider_before = meshd
        .as_ref()
        .map(|_| counters_of(&node, pods[n + 1].ip))
        .transpose()?;
    let reply = curl(&node, pods[n + 1].index, &gateway, &body_file)?;
    // Every mode does the same work, so every mode gives the same answer.
    let want = if spec.work == 0 { b'x' } else { b'X' };
    ensure!(
        reply.len() == spec.payload && reply.iter().all(|&b| b == want),
        "the outsider got {} bytes back, expected {} times {:?}",
        reply.len(),
        spec.payload,
        char::from(want)
    );
    let outsider_redirected_bytes = match outsider_before {
        Some(before) => Some(counters_of(&node, pods[n + 1].ip)? - before),
        None => None,
    };

    // Warm-up, then the measured run.
    let script = node.dir.path().join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = string.rep(\"x\", {})\nwrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n",
            spec.payload
        ),
    )?;
    wrk_async(
        &node,
        pods[n].index,
        &load_cpu,
        spec.connections,
        1,
        &script,
        &gateway,
    )?
    .wait()?;
    check_interrupted()?;
    // Everything of the benchmark that is not in the functions' cgroup
    // and not wrk (reaped, so in this process's children's time).
    let helpers: Vec<u32> = meshd
        .iter()
        .map(Meshd::pid)
        .chain(shm.iter().map(|s| s.csi.pid()))
        .collect();
    let helpers_cpu = || -> anyhow::Result<u64> {
        helpers.iter().try_fold(proc_cpu_us("self")?, |sum, pid| {
            Ok::<_, anyhow::Error>(sum + proc_cpu_us(&pid.to_string())?)
        })
    };
    let cpu_before = cpu_usage_us(&cgroup_path)?;
    let helpers_before = helpers_cpu()?;
    let window = Instant::now();
    let node_before = node_busy()?;
    let loadgen_before = children_cpu_us()?;
    let redirected_before = chain_redirected(meshd.as_ref())?;
    progress(&format!(
        "{}: load: {} connections for {} s, {} B bodies ({} → {} → …)",
        mode.name(),
        spec.connections,
        spec.seconds,
        spec.payload,
        "client",
        "fn0"
    ));
    let mut load = wrk_async(
        &node,
        pods[n].index,
        &load_cpu,
        spec.connections,
        spec.seconds,
        &script,
        &gateway,
    )?;
    let started = Instant::now();
    let out = loop {
        if let Some(out) = load.try_finish()? {
            break out;
        }
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(200));
        if let Some(m) = meshd.as_ref().filter(|_| mode.in_chain())
            && started.elapsed().as_millis() % 2000 < 200
        {
            progress(&live_line(m, started.elapsed()));
        }
        ensure!(
            started.elapsed() < Duration::from_secs(spec.seconds + 60),
            "wrk did not finish"
        );
    };
    // wrk has been reaped: its rusage is now in this process's children's.
    let loadgen = children_cpu_us()? - loadgen_before;
    let busy = node_busy()? - node_before;
    let node_busy = busy.total_us;
    let window_us = u64::try_from(window.elapsed().as_micros()).unwrap_or(u64::MAX);
    let cpu_after = cpu_usage_us(&cgroup_path)?;
    let helpers_used = helpers_cpu()?.saturating_sub(helpers_before);
    let redirected = chain_redirected(meshd.as_ref())? - redirected_before;
    let mut outcome = parse_wrk(&out, mode)?;
    let per_request = |us: u64| us as f64 / outcome.requests.max(1) as f64;
    outcome.cpu_us_per_request = per_request(node_busy);
    outcome.kernel_cpu_us_per_request = per_request(busy.kernel_us);
    outcome.loadgen_cpu_us_per_request = per_request(loadgen);
    outcome.functions_cpu_us_per_request = per_request(cpu_after - cpu_before);
    outcome.redirected_bytes = redirected;
    outcome.outsider_redirected_bytes = outsider_redirected_bytes;
    outcome.other_cpu_share = stats::other_cpu_share(
        node_busy,
        (cpu_after - cpu_before) + loadgen + helpers_used,
        window_us,
        ncpu,
    );
    if let Some(m) = &meshd {
        progress(&format!("{}: `spright status` after the run:", mode.name()));
        for line in status_table(m, &node)?.lines() {
            progress(&format!("    {line}"));
        }
    }

    // Tear down as a runtime would: processes die, volumes are unpublished,
    // then CNI DEL.
    drop(procs);
    if let Some(shm) = shm {
        shm.unpublish()?;
    }
    del_pods(&node, mode, &pods)?;
    drop(meshd);
    drop(ref_cgroup);
    node.pods.clear();
    Ok(outcome)
}

/// CNI DEL of every pod, as a runtime tears them down; a failed DEL is an
/// error naming the container.
pub(crate) fn del_pods(node: &Node, mode: Mode, pods: &[PodInfo]) -> anyhow::Result<()> {
    for p in pods {
        let r = del_pod(node, mode, p)?;
        ensure!(
            r.ok,
            "DEL of {} failed: {}",
            p.attach.container_id,
            r.stdout
        );
    }
    Ok(())
}

/// Puts every function behind a ClusterIP (`10.96.0.10`, `.11`, …, port
/// 80): a kube-proxy DNAT rule in the node namespace and, for spright, the
/// Service and EndpointSlice files meshd reads.
fn expose_as_services(node: &Node, fns: &[PodInfo], mode: Mode) -> anyhow::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::new();
    for (i, p) in fns.iter().enumerate() {
        let cluster = SocketAddr::new(
            IpAddr::V4(std::net::Ipv4Addr::new(10, 96, 0, 10 + u8::try_from(i)?)),
            80,
        );
        crate::services::kube_proxy_dnat(&node.node, cluster, SocketAddr::new(p.ip, PORT))?;
        if mode.spright() {
            let name = format!("fn-{i}");
            crate::services::write_service_file(
                &node.state_dir().join("services"),
                &name,
                &[
                    crate::services::service(&name, cluster.ip(), cluster.port(), PORT),
                    crate::services::endpoint_slice(&name, PORT, &[(p.ip, true)]),
                ],
            )?;
        }
        addrs.push(cluster);
    }
    Ok(addrs)
}

pub(crate) fn node_placement(node: &Node) -> spright_ebpf::Placement {
    spright_ebpf::Placement {
        cgroup: node.cgroup.path.clone(),
        bpffs: node.pins.path.clone(),
    }
}

fn sock(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

fn chain_desc(pods: &[PodInfo]) -> String {
    pods.iter()
        .enumerate()
        .map(|(i, p)| format!("fn{i}@{}", p.ip))
        .collect::<Vec<_>>()
        .join(" → ")
}

fn reference_conf(node: &Node) -> Value {
    json!({
        "cniVersion": "1.0.0", "name": "reference", "type": "bridge", "bridge": "cni0",
        "isGateway": true, "isDefaultGateway": true, "ipam": node.ipam(&["10.213.0.0/24"]),
    })
}

pub(crate) fn spright_conf(node: &Node, annotations: &Value) -> Value {
    let mut c = node.conf("1.0.0", &["10.213.0.0/24"]);
    // Like the reference plugin's config: no masquerade, no hairpin, the
    // default MTU; what differs is spright's own (quickack routes, programs).
    for key in ["ipMasq", "hairpinMode", "mtu"] {
        if let Some(o) = c.as_object_mut() {
            o.remove(key);
        }
    }
    c["runtimeConfig"] = json!({ "io.kubernetes.cri.pod-annotations": annotations });
    c
}

pub(crate) fn add_pod(
    node: &Node,
    mode: Mode,
    index: usize,
    name: &str,
    in_chain: bool,
) -> anyhow::Result<PodInfo> {
    if mode.spright() {
        let mut annotations = json!({ "spright.dev/function": name });
        if in_chain {
            annotations[spright_endpoint::ANNOTATION_CHAIN] = json!("demo");
        }
        return add_spright_pod(node, index, name, &annotations);
    }
    let attach = pod_attach(node, index, name);
    let r = invoke_plugin(
        &Path::new(cni::REFERENCE_PLUGINS).join("bridge"),
        &node.node.path(),
        "ADD",
        &reference_conf(node),
        Some(&attach),
        &cni::plugin_path(),
    )?;
    pod_info(index, name, attach, &r)
}

/// CNI ADD of pod `index` (namespace `demo`, name `name`) by spright-cni
/// with `annotations` passed as containerd passes a pod's annotations.
pub(crate) fn add_spright_pod(
    node: &Node,
    index: usize,
    name: &str,
    annotations: &Value,
) -> anyhow::Result<PodInfo> {
    let attach = pod_attach(node, index, name);
    let r = node.invoke("ADD", &spright_conf(node, annotations), Some(&attach))?;
    pod_info(index, name, attach, &r)
}

/// The attachment of pod `index` with kubelet's `K8S_POD_*` arguments.
fn pod_attach(node: &Node, index: usize, name: &str) -> cni::Attach {
    let mut attach = node.attach(index, &format!("{}-{name}", node.name));
    attach.args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME={name};K8S_POD_UID={}-{name}",
        node.name
    );
    attach
}

fn pod_info(
    index: usize,
    name: &str,
    attach: cni::Attach,
    r: &cni::Outcome,
) -> anyhow::Result<PodInfo> {
    ensure!(r.ok, "ADD of pod {name} failed: {}", r.stdout);
    let ip = cni::result_ips(&r.stdout)?
        .into_iter()
        .next()
        .context("ADD result without an IP")?;
    Ok(PodInfo { index, ip, attach })
}

pub(crate) fn del_pod(node: &Node, mode: Mode, p: &PodInfo) -> anyhow::Result<cni::Outcome> {
    if mode.spright() {
        node.invoke("DEL", &spright_conf(node, &json!({})), Some(&p.attach))
    } else {
        invoke_plugin(
            &Path::new(cni::REFERENCE_PLUGINS).join("bridge"),
            &node.node.path(),
            "DEL",
            &reference_conf(node),
            Some(&p.attach),
            &cni::plugin_path(),
        )
    }
}

/// `bin ARGS` as a process of pod `index` (a program that takes `--cgroup`
/// and `--netns`, see [`crate::pod::enter_from_args`]), pinned to `cpu`.
pub(crate) fn pod_command(
    node: &Node,
    index: usize,
    cgroup: &Path,
    cpu: &str,
    bin: &Path,
    args: &[String],
) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", cpu])
        .arg(bin)
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--netns")
        .arg(node.pods[index].path())
        .args(args);
    cmd
}

/// haproxy in TCP mode on the pod's :8080 in front of the function on
/// 127.0.0.1:9080, in the pod's cgroup and netns (entered by a shell that
/// joins the cgroup first, then `ip netns exec`).
fn sidecar(node: &Node, index: usize, cgroup: &Path, cpu: &str) -> anyhow::Result<Peer> {
    let cfg = node.dir.path().join(format!("haproxy-{index}.cfg"));
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 4096\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend in\n  bind :{PORT}\n  default_backend app\nbackend app\n  server app 127.0.0.1:{APP_PORT}\n"
        ),
    )?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && echo ready && exec taskset -c {cpu} ip netns exec {} haproxy -db -f {}",
            cgroup.display(),
            node.pods[index].name,
            cfg.display()
        ));
    Peer::spawn_group(cmd)
}

/// shm-csi serving this node, with the chain's volume published into every
/// function pod; unmounted (also on failure) through the mount guard.
struct Shm {
    targets: Vec<PathBuf>,
    volumes: Vec<String>,
    csi: crate::shm_csi::ShmCsi,
    _mounts: crate::shm_csi::MountDir,
}

impl Shm {
    fn publish(
        node: &Node,
        meshd: &Meshd,
        payload: usize,
        functions: usize,
    ) -> anyhow::Result<Self> {
        let mounts = crate::shm_csi::MountDir::new()?;
        let csi = crate::shm_csi::ShmCsi::start(&mounts.path().join("csi"), &meshd.addr, &[])?;
        let mut client = csi.client()?;
        // Room for every in-flight body of every connection, with headroom.
        let size = format!("{}Mi", ((payload * 64) >> 20).clamp(64, 512));
        let (mut targets, mut volumes) = (Vec::new(), Vec::new());
        for i in 0..functions {
            let name = format!("fn-{i}");
            let target = mounts.path().join("pods").join(&name).join("shm");
            std::fs::create_dir_all(target.parent().context("target parent")?)?;
            let volume = format!("csi-{}-{name}", node.name);
            let uid = format!("{}-{name}", node.name);
            client
                .publish(crate::shm_csi::ephemeral_publish(
                    &volume,
                    &target,
                    "demo",
                    &name,
                    &uid,
                    &[("chain", "demo"), ("size", &size)],
                ))
                .map_err(|e| {
                    anyhow::anyhow!(
                        "publishing the chain volume into {name}: {e}\n{}",
                        csi.log_text()
                    )
                })?;
            targets.push(target);
            volumes.push(volume);
        }
        Ok(Self {
            targets,
            volumes,
            csi,
            _mounts: mounts,
        })
    }

    fn unpublish(self) -> anyhow::Result<()> {
        let mut client = self.csi.client()?;
        for (v, t) in self.volumes.iter().zip(&self.targets) {
            client
                .unpublish(v, t)
                .map_err(|e| anyhow::anyhow!("unpublishing {v}: {e}"))?;
        }
        Ok(())
    }
}

/// The command line of the SDK example chain's function at `position`
/// (gateway first, then stages): its language's program
/// ([`sdk_lang::program`]), then the flags every language takes.
fn sdk_args(program: &[String], next: Option<&str>, region: &Path, work: u32) -> Vec<String> {
    let mut args = program.to_vec();
    args.extend(["--listen".into(), format!("0.0.0.0:{PORT}")]);
    args.extend(["--work".into(), work.to_string()]);
    if let Some(next) = next {
        args.extend(["--next".into(), next.to_owned()]);
    }
    args.extend(["--region".into(), region.display().to_string()]);
    args
}

/// One function of the SDK's example chain (its command line from
/// [`sdk_args`]), in the pod's cgroup and netns, pinned to `cpu`.
fn sdk_function(
    node: &Node,
    index: usize,
    cgroup: &Path,
    cpu: &str,
    args: &[String],
) -> anyhow::Result<Peer> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "echo $$ > {}/cgroup.procs && echo ready && exec taskset -c {cpu} ip netns exec {} {}",
        cgroup.display(),
        node.pods[index].name,
        args.join(" ")
    ));
    Peer::spawn_group(cmd)
}

/// Waits until something listens on `port` in pod `index`.
pub(crate) fn wait_listening(node: &Node, index: usize, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        let out = Command::new("ip")
            .args(["netns", "exec", &node.pods[index].name, "ss", "-Hltn"])
            .arg(format!("sport = :{port}"))
            .output()?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "nothing listens on port {port} in {}",
        node.pods[index].name
    )
}

fn curl(node: &Node, index: usize, url: &str, body: &Path) -> anyhow::Result<Vec<u8>> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.pods[index].name,
            "wget",
            "-q",
            "-O",
            "-",
            "--post-file",
        ])
        .arg(body)
        .arg(url)
        .output()
        .context("running wget")?;
    ensure!(
        out.status.success(),
        "wget {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn wrk_cmd(
    node: &Node,
    index: usize,
    cpu: &str,
    conns: usize,
    secs: u64,
    script: &Path,
    url: &str,
) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &node.pods[index].name,
        "taskset",
        "-c",
        cpu,
        "wrk",
        "-t1",
    ])
    .arg(format!("-c{conns}"))
    .arg(format!("-d{secs}s"))
    .arg("--latency")
    .arg("-s")
    .arg(script)
    .arg(url);
    cmd
}

/// A running wrk in its own process group, killed with it if dropped early
/// (a timeout, an error, Ctrl-C).
struct Load(Option<crate::procgroup::GroupChild>);

impl Load {
    /// wrk's report once it has exited (None while it runs).
    fn try_finish(&mut self) -> anyhow::Result<Option<String>> {
        let child = self.0.as_mut().context("wrk already collected")?;
        if child.child().try_wait()?.is_none() {
            return Ok(None);
        }
        self.wait().map(Some)
    }

    /// Waits for wrk and returns its report.
    fn wait(&mut self) -> anyhow::Result<String> {
        let mut group = self.0.take().context("wrk already collected")?;
        // Read the pipes to the end (wrk has exited or will), then leave
        // nothing of its group behind before reaping it.
        let child = group.child();
        let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
        let err_reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(e) = stderr.as_mut() {
                let _ = std::io::Read::read_to_end(e, &mut buf);
            }
            buf
        });
        let mut out = Vec::new();
        if let Some(o) = stdout.as_mut() {
            std::io::Read::read_to_end(o, &mut out).context("reading wrk's output")?;
        }
        let err = err_reader.join().unwrap_or_default();
        // wrk has closed its output, so it has exited; its pid is held
        // until it is reaped, so the group id still names only its group.
        group.kill_rest();
        let status = group.take().wait()?;
        ensure!(
            status.success(),
            "wrk failed: {}",
            String::from_utf8_lossy(&err)
        );
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

fn wrk_async(
    node: &Node,
    index: usize,
    cpu: &str,
    conns: usize,
    secs: u64,
    script: &Path,
    url: &str,
) -> anyhow::Result<Load> {
    let child = crate::procgroup::GroupChild::spawn(
        wrk_cmd(node, index, cpu, conns, secs, script, url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .context("starting wrk")?;
    Ok(Load(Some(child)))
}

/// Parses wrk's `--latency` report.
pub fn parse_wrk(out: &str, mode: Mode) -> anyhow::Result<Outcome> {
    let field = |prefix: &str| -> Option<&str> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    let rps: f64 = field("Requests/sec:")
        .context("no Requests/sec in wrk output")?
        .parse()?;
    let requests: u64 = out
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .map(|(n, _)| n.trim().parse().ok())
        })
        .flatten()
        .context("no request count in wrk output")?;
    let pct = |p: &str| -> anyhow::Result<f64> {
        parse_duration_ms(field(p).with_context(|| format!("no {p} latency"))?)
    };
    let mut errors = field("Non-2xx or 3xx responses:").map_or(Ok(0), str::parse)?;
    if let Some(sock) = field("Socket errors:") {
        // "connect 0, read 0, write 0, timeout 0"
        errors += sock
            .split(',')
            .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(Outcome {
        mode,
        requests,
        requests_per_s: rps,
        p50_ms: pct("50%")?,
        p99_ms: pct("99%")?,
        errors,
        cpu_us_per_request: 0.0,
        kernel_cpu_us_per_request: 0.0,
        loadgen_cpu_us_per_request: 0.0,
        functions_cpu_us_per_request: 0.0,
        redirected_bytes: 0,
        outsider_redirected_bytes: None,
        other_cpu_share: 0.0,
    })
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.00s`.
fn parse_duration_ms(s: &str) -> anyhow::Result<f64> {
    let (num, unit) = s.split_at(
        s.find(|c: char| c.is_ascii_alphabetic())
            .with_context(|| format!("duration {s:?} without unit"))?,
    );
    let v: f64 = num.parse().with_context(|| format!("duration {s:?}"))?;
    Ok(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => bail!("duration {s:?} has unknown unit"),
    })
}

/// `/proc/stat` and `/proc/PID/stat` count in USER_HZ, which is 100 on
/// every architecture Linux exposes to user space this way.
const USER_HZ_US: u64 = 10_000;

/// Busy time of the whole machine so far: user, nice, system, irq and
/// softirq of the `cpu` line of `/proc/stat` (guest time is inside user;
/// idle, iowait and steal are not busy).
pub(crate) fn node_busy_us() -> anyhow::Result<u64> {
    node_busy().map(|b| b.total_us)
}

/// The machine's busy time so far, and the kernel's part of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct NodeBusy {
    pub(crate) total_us: u64,
    /// system, irq and softirq: the network stack, syscalls, scheduling.
    pub(crate) kernel_us: u64,
}

impl std::ops::Sub for NodeBusy {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self {
            total_us: self.total_us.saturating_sub(o.total_us),
            kernel_us: self.kernel_us.saturating_sub(o.kernel_us),
        }
    }
}

pub(crate) fn node_busy() -> anyhow::Result<NodeBusy> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let t = node_busy_ticks(&stat)?;
    Ok(NodeBusy {
        total_us: t.total_us * USER_HZ_US,
        kernel_us: t.kernel_us * USER_HZ_US,
    })
}

/// [`NodeBusy`] in clock ticks.
fn node_busy_ticks(stat: &str) -> anyhow::Result<NodeBusy> {
    let line = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("parsing the cpu line of /proc/stat")?;
    ensure!(f.len() >= 7, "short cpu line in /proc/stat: {line:?}");
    // user nice system idle iowait irq softirq ...
    Ok(NodeBusy {
        total_us: f[0] + f[1] + f[2] + f[5] + f[6],
        kernel_us: f[2] + f[5] + f[6],
    })
}

/// CPU time of this process's reaped children (`cutime + cstime`).
fn children_cpu_us() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    let after = stat
        .rsplit_once(')')
        .context("no comm in /proc/self/stat")?
        .1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // cutime and cstime are fields 16 and 17 (1-based, counting pid and comm).
    let tick = |i: usize| -> anyhow::Result<u64> {
        f.get(i)
            .context("short /proc/self/stat")?
            .parse::<u64>()
            .context("parsing /proc/self/stat")
    };
    Ok((tick(13)? + tick(14)?) * USER_HZ_US)
}

/// CPU time (`utime + stime`, every thread) of a live process: `pid` is a
/// number or `self`.
pub(crate) fn proc_cpu_us(pid: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let after = stat
        .rsplit_once(')')
        .with_context(|| format!("no comm in {path}"))?
        .1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based, counting pid and comm).
    let tick = |i: usize| -> anyhow::Result<u64> {
        f.get(i)
            .with_context(|| format!("short {path}"))?
            .parse::<u64>()
            .with_context(|| format!("parsing {path}"))
    };
    Ok((tick(11)? + tick(12)?) * USER_HZ_US)
}

/// `usage_usec` from a cgroup v2 directory's `cpu.stat`.
pub(crate) fn cpu_usage_us(cgroup: &Path) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(cgroup.join("cpu.stat")).context("reading cpu.stat")?;
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
        .context("no usage_usec in cpu.stat")
}

fn counters_of(node: &Node, ip: IpAddr) -> anyhow::Result<u64> {
    Ok(spright_ebpf::Datapath::open(&node.pins.path)?
        .counters(ip)?
        .redirected_bytes)
}

pub(crate) fn chain_redirected(meshd: Option<&Meshd>) -> anyhow::Result<u64> {
    let Some(m) = meshd else { return Ok(0) };
    let s = m.status()?;
    Ok(s["chains"].as_array().map_or(0, |c| {
        c.iter()
            .filter_map(|c| c["counters"]["redirected_bytes"].as_u64())
            .sum()
    }))
}

fn live_line(m: &Meshd, elapsed: Duration) -> String {
    let s = m.status().unwrap_or_default();
    let c = &s["chains"][0]["counters"];
    format!(
        "  t+{:>2}s  chain demo/demo: {} msgs / {} MiB redirected, {} sockets accelerated, {} fallbacks",
        elapsed.as_secs(),
        c["redirected_messages"],
        c["redirected_bytes"].as_u64().unwrap_or(0) >> 20,
        c["accelerated_sockets"],
        c["fallback_messages"],
    )
}

pub(crate) fn status_table(m: &Meshd, node: &Node) -> anyhow::Result<String> {
    let out = Command::new(workspace_bin("spright"))
        .args(["status", "--addr", &m.addr, "--bpffs"])
        .arg(&node.pins.path)
        .arg("--state-dir")
        .arg(node.state_dir())
        .output()?;
    ensure!(out.status.success(), "spright status failed");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every round of a benchmark run: what ran and what each round measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub spec: Spec,
    /// The modes, in the order of the table (rounds ran them rotated).
    pub modes: Vec<Mode>,
    /// `rounds[i][j]`: round `i`'s outcome of `modes[j]`.
    pub rounds: Vec<Vec<Outcome>>,
}

/// A measured quantity of an outcome.
pub type Metric = fn(&Outcome) -> f64;

impl Report {
    /// The mode every other is compared with: `reference` when it ran,
    /// else the first.
    pub fn baseline(&self) -> usize {
        self.modes
            .iter()
            .position(|m| *m == Mode::Reference)
            .unwrap_or(0)
    }

    /// Mode `j`'s values of `metric`, round by round.
    pub fn values(&self, j: usize, metric: Metric) -> Vec<f64> {
        self.rounds
            .iter()
            .filter_map(|r| r.get(j))
            .map(metric)
            .collect()
    }

    /// Median and range of mode `j`'s `metric` over the rounds.
    pub fn spread(&self, j: usize, metric: Metric) -> Option<Spread> {
        Spread::of(&self.values(j, metric))
    }

    /// Median and range of mode `j`'s `metric` over the baseline's, paired
    /// round by round.
    pub fn paired(&self, j: usize, metric: Metric) -> Option<Spread> {
        Spread::of(&stats::paired_ratios(
            &self.values(j, metric),
            &self.values(self.baseline(), metric),
        ))
    }

    /// The cost of a feature the `off` mode turns off: the accelerated
    /// tier's requests/s and p99 with it on over off, paired round by
    /// round, when both ran.
    pub fn feature_cost(&self, off: Mode) -> Option<(Spread, Spread)> {
        let at = |m: Mode| self.modes.iter().position(|x| *x == m);
        let (on, off) = (at(Mode::SprightOn)?, at(off)?);
        let ratio = |metric: Metric| {
            Spread::of(&stats::paired_ratios(
                &self.values(on, metric),
                &self.values(off, metric),
            ))
        };
        Some((ratio(|o| o.requests_per_s)?, ratio(|o| o.p99_ms)?))
    }

    /// Median and range of the SDK tier's requests/s over the transparent
    /// (accelerated) tier's, paired round by round, when both ran.
    pub fn sdk_over_transparent(&self) -> Option<Spread> {
        let at = |m: Mode| self.modes.iter().position(|x| *x == m);
        let (sdk, on) = (at(Mode::SprightSdk)?, at(Mode::SprightOn)?);
        Spread::of(&stats::paired_ratios(
            &self.values(sdk, |o| o.requests_per_s),
            &self.values(on, |o| o.requests_per_s),
        ))
    }

    /// The most the transparent tier could gain in requests/s on a
    /// CPU-bound node: the reference's node CPU per request over what is
    /// left when the kernel time (system, irq, softirq) of the chain's own
    /// TCP hops is gone. Of the chain's `length` connections (load
    /// generator → gateway, then one per stage) the `length - 1` inside
    /// the chain are redirected, so that share of the kernel time is
    /// counted as removable. An upper bound: redirected hops still make
    /// syscalls and wake-ups. `None` without a reference run.
    pub fn transparent_ceiling(&self) -> Option<f64> {
        let base = self.baseline();
        if self.modes[base] != Mode::Reference || self.spec.length < 2 {
            return None;
        }
        let cpu = self.spread(base, |o| o.cpu_us_per_request)?.median;
        let kernel = self.spread(base, |o| o.kernel_cpu_us_per_request)?.median;
        let hops = self.spec.length as f64;
        let removable = kernel * (hops - 1.0) / hops;
        (cpu > removable && kernel > 0.0).then(|| cpu / (cpu - removable))
    }

    /// The lines that say a result is not to be trusted: windows in which
    /// the machine was busy with something else, and comparisons whose
    /// paired ratios spread wider than ±15% of their median.
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .busy()
            .map(|b| stats::busy_warning(&b))
            .into_iter()
            .collect();
        let base = self.baseline();
        for (j, mode) in self.modes.iter().enumerate() {
            if j == base {
                continue;
            }
            for (what, metric) in [
                ("requests/s", (|o| o.requests_per_s) as Metric),
                ("node CPU per request", |o| o.cpu_us_per_request),
            ] {
                let name = format!("{} / {} {what}", mode.name(), self.modes[base].name());
                out.extend(
                    self.paired(j, metric)
                        .and_then(|p| stats::noisy_warning(&name, &p)),
                );
            }
        }
        if let Some(r) = self.sdk_over_transparent().filter(|r| r.median < 1.0) {
            out.push(format!(
                "the SDK tier was slower than the transparent tier: {} of its requests/s (paired median)",
                cell(Some(r), 2)
            ));
        }
        out
    }

    /// "K of N measured windows (up to X%: round R, MODE)" when some
    /// window's other-process CPU passed [`stats::BUSY_SHARE`].
    fn busy(&self) -> Option<String> {
        let windows: Vec<((usize, &Outcome), f64)> = self
            .rounds
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.iter().map(move |o| ((i, o), o.other_cpu_share)))
            .collect();
        stats::busy_windows(&windows, |(round, o)| {
            format!("round {}, {}", round + 1, o.mode.name())
        })
    }

    /// One line of the run's parameters (the pictures' caption, the
    /// table's header).
    pub fn parameters(&self) -> String {
        let spec = &self.spec;
        format!(
            "chain of {} functions, {} B bodies, {} connections, work {}, {} round{} of {} s per mode (interleaved, rotated){}",
            spec.length,
            spec.payload,
            spec.connections,
            spec.work,
            self.rounds.len(),
            if self.rounds.len() == 1 { "" } else { "s" },
            spec.seconds,
            if spec.services {
                ", every hop through a ClusterIP"
            } else {
                ""
            }
        )
    }
}

/// `median (min–max)` with `decimals` decimals; the median alone for a
/// single round.
pub(crate) fn cell(s: Option<Spread>, decimals: usize) -> String {
    match s {
        None => "–".to_owned(),
        Some(s) if s.n == 1 => format!("{:.decimals$}", s.median),
        Some(s) => format!(
            "{:.decimals$} ({:.decimals$}–{:.decimals$})",
            s.median, s.min, s.max
        ),
    }
}

/// A Markdown table of a run: per mode the median and (min–max) over the
/// rounds, per comparison with the baseline the median and range of the
/// paired ratios, then the warnings.
pub fn markdown(report: &Report) -> String {
    let spec = &report.spec;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}{}\n",
        report.parameters(),
        if spec.services {
            " (kube-proxy DNAT emulated)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "work: {}\n",
        if spec.work == 0 {
            "none (`--work 0`): pure transport".to_owned()
        } else {
            format!(
                "{} (`--work {}`)",
                spright_shm::work::DESCRIPTION,
                spec.work
            )
        }
    );
    let _ = writeln!(
        s,
        "cells: median (min–max) over the rounds; `× ref`: median (min–max) of the paired ratios, each \
         round's value over the same round's {}\n",
        report.modes[report.baseline()].describe()
    );
    let _ = writeln!(
        s,
        "node CPU: all busy time of the machine (every CPU, `/proc/stat`) during the measured \
         window per request, load generator, meshd and softirq included; `of it kernel` is its \
         system, irq and softirq time, `of it wrk` the load generator's share, `fn cgroup` the functions' own cgroup; `other CPU` the share of \
         the machine used by anything else (highest round)\n"
    );
    let _ = writeln!(
        s,
        "| mode | requests/s | × ref | p50 ms | p99 ms | node CPU µs/req | × ref | of it kernel | of it wrk | fn cgroup | errors | other CPU |"
    );
    let _ = writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let base = report.baseline();
    for (j, mode) in report.modes.iter().enumerate() {
        let ratio = |m: Metric| {
            if j == base {
                "–".to_owned()
            } else {
                cell(report.paired(j, m), 2)
            }
        };
        let errors: u64 = report
            .rounds
            .iter()
            .filter_map(|r| r.get(j))
            .map(|o| o.errors)
            .sum();
        let other = report
            .values(j, |o| o.other_cpu_share)
            .into_iter()
            .fold(0.0_f64, f64::max);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0}% |",
            spec.mode_describe(*mode),
            cell(report.spread(j, |o| o.requests_per_s), 0),
            ratio(|o| o.requests_per_s),
            cell(report.spread(j, |o| o.p50_ms), 2),
            cell(report.spread(j, |o| o.p99_ms), 2),
            cell(report.spread(j, |o| o.cpu_us_per_request), 0),
            ratio(|o| o.cpu_us_per_request),
            cell(report.spread(j, |o| o.kernel_cpu_us_per_request), 0),
            cell(report.spread(j, |o| o.loadgen_cpu_us_per_request), 0),
            cell(report.spread(j, |o| o.functions_cpu_us_per_request), 0),
            errors,
            other * 100.0
        );
    }
    for (off, feature) in [
        (Mode::SprightNoflows, "flow events"),
        (Mode::SprightNobound, "memory bound"),
    ] {
        if let Some((rps, p99)) = report.feature_cost(off) {
            let _ = writeln!(
                s,
                "\n{feature} on ÷ off (accelerated tier, paired): {}× the requests/s, {}× the p99",
                cell(Some(rps), 3),
                cell(Some(p99), 3)
            );
        }
    }
    if let Some(r) = report.sdk_over_transparent() {
        let _ = writeln!(
            s,
            "\nSDK ÷ transparent: {}× the accelerated tier's requests/s (paired)",
            cell(Some(r), 2)
        );
    }
    if let (Some(ceiling), Some(on)) = (
        report.transparent_ceiling(),
        report
            .modes
            .iter()
            .position(|m| *m == Mode::SprightOn)
            .and_then(|j| report.paired(j, |o| o.requests_per_s)),
    ) {
        let _ = writeln!(
            s,
            "\ntransparent tier: {}× the reference's requests/s, of a ceiling of at most {ceiling:.2}× \
             (the reference's node CPU per request without the kernel time of the {} hops inside \
             the chain: {} of its {} connections' share of system, irq and softirq time)",
            cell(Some(on), 2),
            report.spec.length - 1,
            report.spec.length - 1,
            report.spec.length
        );
    }
    let warnings = report.warnings();
    if !warnings.is_empty() {
        s.push('\n');
        for w in warnings {
            let _ = writeln!(s, "**warning**: {w}\n");
        }
    }
    s
}

/// One table for a run per body size (`--payloads`): per size the
/// transparent and SDK tiers against the reference and the SDK against the
/// transparent tier (paired medians and ranges), then a line per size at
/// which the SDK tier was the slower one.
pub fn sweep_markdown(reports: &[Report]) -> String {
    let mut s = String::new();
    if let Some(r) = reports.first() {
        let _ = writeln!(
            s,
            "chain of {} functions, {} connections, work {}, {} round{} of {} s per mode and size\n",
            r.spec.length,
            r.spec.connections,
            r.spec.work,
            r.rounds.len(),
            if r.rounds.len() == 1 { "" } else { "s" },
            r.spec.seconds
        );
        if r.spec.mixed_sdk() {
            let _ = writeln!(
                s,
                "SDK chain's functions: {}\n",
                sdk_lang::describe(&r.spec.sdk_langs, r.spec.length)
            );
        }
    }
    let _ = writeln!(
        s,
        "| body | reference requests/s | accelerated × ref | SDK × ref | SDK ÷ accelerated | SDK node CPU × ref |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|");
    let mut slower = Vec::new();
    for r in reports {
        let at = |m: Mode| r.modes.iter().position(|x| *x == m);
        let paired = |m: Mode, metric: Metric| at(m).and_then(|j| r.paired(j, metric));
        let tiers = r.sdk_over_transparent();
        if let Some(t) = tiers.filter(|t| t.median < 1.0) {
            slower.push(format!("{} B ({})", r.spec.payload, cell(Some(t), 2)));
        }
        let _ = writeln!(
            s,
            "| {} B | {} | {} | {} | {} | {} |",
            r.spec.payload,
            cell(r.spread(r.baseline(), |o| o.requests_per_s), 0),
            cell(paired(Mode::SprightOn, |o| o.requests_per_s), 2),
            cell(paired(Mode::SprightSdk, |o| o.requests_per_s), 2),
            cell(tiers, 2),
            cell(paired(Mode::SprightSdk, |o| o.cpu_us_per_request), 2),
        );
    }
    if slower.is_empty() {
        let _ = writeln!(
            s,
            "\nThe SDK tier was at least as fast as the transparent tier at every size measured."
        );
    } else {
        let _ = writeln!(
            s,
            "\n**warning**: the SDK tier was slower than the transparent tier at {}",
            slower.join(", ")
        );
    }
    s
}

/// The run as a picture: requests/s, node CPU per request and p50/p99
/// latency, each a panel of bars (median) with min–max whiskers.
pub fn figure(report: &Report, title: &str) -> plot::Figure {
    let group = |j: usize, bars: Vec<plot::Bar>| plot::Group {
        name: report.modes[j].name().to_owned(),
        color: plot::color(
            Mode::ALL
                .iter()
                .position(|m| *m == report.modes[j])
                .unwrap_or(j),
        ),
        bars,
    };
    let single = |metric: Metric| -> Vec<plot::Group> {
        (0..report.modes.len())
            .filter_map(|j| {
                let spread = report.spread(j, metric)?;
                Some(group(
                    j,
                    vec![plot::Bar {
                        label: None,
                        spread,
                    }],
                ))
            })
            .collect()
    };
    let latency: Vec<plot::Group> = (0..report.modes.len())
        .filter_map(|j| {
            let bar = |label: &str, metric: Metric| {
                Some(plot::Bar {
                    label: Some(label.to_owned()),
                    spread: report.spread(j, metric)?,
                })
            };
            Some(group(
                j,
                vec![bar("p50", |o| o.p50_ms)?, bar("p99", |o| o.p99_ms)?],
            ))
        })
        .collect();
    plot::Figure {
        title: title.to_owned(),
        panels: vec![
            plot::Panel {
                title: "requests/s (higher is better)".to_owned(),
                decimals: 0,
                groups: single(|o| o.requests_per_s),
            },
            plot::Panel {
                title: "node CPU µs per request, whole machine (lower is better)".to_owned(),
                decimals: 0,
                groups: single(|o| o.cpu_us_per_request),
            },
            plot::Panel {
                title: "latency ms, p50 and p99 (lower is better)".to_owned(),
                decimals: 2,
                groups: latency,
            },
        ],
        caption: vec![
            report.parameters(),
            format!(
                "bars: median over the rounds, whiskers: min–max; ratios in the table are paired per round; baseline: {}",
                report.modes[report.baseline()].describe()
            ),
        ]
        .into_iter()
        // The bars' labels stay short: a mixed SDK chain's languages go
        // here.
        .chain(
            (report.modes.contains(&Mode::SprightSdk) && report.spec.mixed_sdk()).then(|| {
                format!(
                    "spright-sdk: the SDK chain's functions in {}",
                    sdk_lang::describe(&report.spec.sdk_langs, report.spec.length)
                )
            }),
        )
        .chain(report.busy().map(|b| {
            format!(
                "warning: busy machine, other processes above {:.0}% of the CPU in {b}",
                stats::BUSY_SHARE * 100.0
            )
        }))
        .collect(),
    }
}

/// Where the demo writes its artefacts.
pub fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/demo")
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 8s test @ http://10.213.0.2:8080/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.31us  100.00us   5.00ms   90.00%
  Latency Distribution
     50%  790.00us
     75%  850.00us
     90%    1.01ms
     99%    1.52ms
  78901 requests in 8.00s, 90.12MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   9862.61
Transfer/sec:     11.26MB
";

    #[test]
    fn parses_wrk_reports() {
        let o = parse_wrk(WRK, Mode::SprightOn).unwrap();
        assert_eq!(o.requests, 78901);
        assert!((o.requests_per_s - 9862.61).abs() < 1e-6);
        assert!((o.p50_ms - 0.79).abs() < 1e-9);
        assert!((o.p99_ms - 1.52).abs() < 1e-9);
        assert_eq!(o.errors, 7);
        assert!(parse_wrk("garbage", Mode::Reference).is_err());
        assert!((parse_duration_ms("2.00s").unwrap() - 2000.0).abs() < 1e-9);
    }

    #[test]
    fn node_busy_time_leaves_out_idle_iowait_and_steal() {
        let stat = "cpu  100 2 30 9000 50 4 6 70 0 0\ncpu0 50 1 15 4500 25 2 3 35 0 0\n";
        assert_eq!(
            node_busy_ticks(stat).unwrap(),
            NodeBusy {
                total_us: 100 + 2 + 30 + 4 + 6,
                kernel_us: 30 + 4 + 6
            }
        );
        assert!(node_busy_ticks("cpu0 1 2 3\n").is_err());
    }

    #[test]
    fn specs_are_bounded() {
        let ok = Spec {
            length: 4,
            payload: 1024,
            connections: 8,
            seconds: 5,
            work: 1,
            services: false,
            sdk_langs: Vec::new(),
        };
        ok.validate().unwrap();
        for bad in [
            Spec {
                length: 9,
                ..ok.clone()
            },
            Spec {
                payload: 2 << 20,
                ..ok.clone()
            },
            Spec {
                connections: 0,
                ..ok.clone()
            },
            Spec {
                work: 1001,
                ..ok.clone()
            },
            Spec {
                sdk_langs: vec![Lang::Python, Lang::Rust],
                ..ok.clone()
            },
            Spec {
                sdk_langs: vec![Lang::Rust; 5],
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err());
        }
        assert_eq!(Mode::parse("spright-on").unwrap(), Mode::SprightOn);
        assert!(Mode::parse("nope").is_err());
    }

    /// A made-up run of every mode, three rounds (not measured numbers).
    const FIXTURE: &str = include_str!("../fixtures/chain-report.json");

    fn fixture() -> Report {
        serde_json::from_str(FIXTURE).unwrap()
    }

    #[test]
    fn table_shows_medians_ranges_and_paired_ratios() {
        let mut r = fixture();
        // Two modes, three rounds, numbers chosen by hand.
        r.modes = vec![Mode::Reference, Mode::SprightOn];
        let mut rounds = Vec::new();
        for (a, b) in [(1000.0, 1100.0), (2000.0, 2400.0), (1500.0, 1500.0)] {
            let mut x = r.rounds[0][0].clone();
            x.requests_per_s = a;
            x.cpu_us_per_request = 100.0;
            let mut y = x.clone();
            y.mode = Mode::SprightOn;
            y.requests_per_s = b;
            y.cpu_us_per_request = 50.0;
            rounds.push(vec![x, y]);
        }
        r.rounds = rounds;
        let md = markdown(&r);
        // Medians of the rounds; paired ratios 1.1, 1.2, 1.0 (not the
        // medians' ratio 1500/1500 = 1.0).
        assert!(
            md.contains("| spright, accelerated | 1500 (1100–2400) | 1.10 (1.00–1.20) |"),
            "{md}"
        );
        assert!(md.contains("| 50 (50–50) | 0.50 (0.50–0.50) |"), "{md}");
        assert!(
            md.contains("| reference bridge CNI | 1500 (1000–2000) | – |"),
            "{md}"
        );
        // ±15% around 1.10 is 0.935–1.265: the range fits, no warning.
        assert!(!md.contains("noisy"), "{md}");
        r.rounds[1][1].requests_per_s = 3000.0;
        r.rounds[2][0].other_cpu_share = 0.3;
        let w = r.warnings();
        assert!(
            w.iter()
                .any(|l| l.starts_with("noisy: spright-on / reference requests/s")),
            "{w:?}"
        );
        assert!(
            w.iter().any(|l| l.starts_with(
                "busy machine: in 1 of 6 measured windows (up to 30%: round 3, reference)"
            )),
            "{w:?}"
        );
        assert!(markdown(&r).contains("**warning**: busy machine"));
    }

    #[test]
    fn tiers_ceiling_and_sweep_say_which_tier_won() {
        let mut r = fixture();
        r.modes = vec![Mode::Reference, Mode::SprightOn, Mode::SprightSdk];
        r.spec.length = 4;
        let mut round = Vec::new();
        for (mode, rps) in [
            (Mode::Reference, 1000.0),
            (Mode::SprightOn, 1100.0),
            (Mode::SprightSdk, 3300.0),
        ] {
            let mut o = r.rounds[0][0].clone();
            o.mode = mode;
            o.requests_per_s = rps;
            o.cpu_us_per_request = 100.0;
            o.kernel_cpu_us_per_request = 40.0;
            round.push(o);
        }
        r.rounds = vec![round];
        assert!((r.sdk_over_transparent().unwrap().median - 3.0).abs() < 1e-9);
        // 3 of 4 connections' kernel time: 30 of 100 µs removable.
        let c = r.transparent_ceiling().unwrap();
        assert!((c - 100.0 / 70.0).abs() < 1e-9, "{c}");
        let md = markdown(&r);
        assert!(md.contains("SDK ÷ transparent: 3.00×"), "{md}");
        assert!(
            md.contains("1.10× the reference's requests/s, of a ceiling of at most 1.43×"),
            "{md}"
        );
        assert!(!r.warnings().iter().any(|w| w.contains("slower")));
        let fast = r.clone();
        r.spec.payload = 1 << 20;
        r.rounds[0][2].requests_per_s = 990.0;
        assert!(
            r.warnings()
                .iter()
                .any(|w| w.starts_with("the SDK tier was slower than the transparent tier: 0.90")),
            "{:?}",
            r.warnings()
        );
        let sweep = sweep_markdown(std::slice::from_ref(&fast));
        assert!(
            sweep.contains("at least as fast as the transparent tier at every size"),
            "{sweep}"
        );
        let sweep = sweep_markdown(&[fast, r]);
        assert!(
            sweep.contains("slower than the transparent tier at 1048576 B (0.90)"),
            "{sweep}"
        );
    }

    #[test]
    fn fixture_table_has_every_mode() {
        let r = fixture();
        assert_eq!(r.baseline(), 0);
        let md = markdown(&r);
        for m in Mode::ALL {
            assert!(md.contains(&format!("| {} |", m.describe())), "{md}");
        }
        assert!(md.contains("3 rounds of 10 s per mode"), "{md}");
    }

    /// A mixed-language SDK chain is named with its languages in the
    /// table, the picture and the JSON; an all-Rust one as before, and the
    /// JSON without the field (older reports read as all Rust).
    #[test]
    fn mixed_sdk_chain_is_named_with_its_languages() {
        let mut r = fixture();
        assert!(r.spec.sdk_langs.is_empty());
        assert!(!serde_json::to_string(&r).unwrap().contains("sdk_langs"));
        r.spec.sdk_langs = vec![Lang::Rust, Lang::C, Lang::Python];
        let md = markdown(&r);
        assert!(
            md.contains("| spright + SDK shared memory (rust,c,python,rust) |"),
            "{md}"
        );
        assert!(md.contains("| spright, accelerated |"), "{md}");
        assert_eq!(
            r.spec.mode_name(Mode::SprightSdk),
            "spright-sdk (rust,c,python,rust)"
        );
        assert_eq!(r.spec.mode_name(Mode::SprightOn), "spright-on");
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.contains(r#""sdk_langs":["rust","c","python"]"#),
            "{json}"
        );
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back.spec.sdk_langs, r.spec.sdk_langs);
        let fig = figure(&r, "spright chain benchmark");
        let boxes = plot::svg_check::text_boxes(&plot::svg(&fig).unwrap()).unwrap();
        assert!(
            boxes
                .iter()
                .any(|b| b.text == "spright-sdk: the SDK chain's functions in rust,c,python,rust"),
            "{boxes:?}"
        );
        plot::svg_check::assert_readable(&fig, &boxes);
    }

    /// The picture of the fixture: well-formed XML, every text inside the
    /// canvas, no two texts overlapping (boxes estimated as documented in
    /// [`plot::svg_check::TextBox::of`]), no ".0" on requests/s, a PNG too.
    #[test]
    fn plots_fixture_readably() {
        let r = fixture();
        let fig = figure(&r, "spright chain benchmark");
        let svg = plot::svg(&fig).unwrap();
        roxmltree::Document::parse(&svg).unwrap();
        let boxes = plot::svg_check::text_boxes(&svg).unwrap();
        let texts: Vec<&str> = boxes.iter().map(|b| b.text.as_str()).collect();
        let sdk_p99 = format!("p99 {:.2}", r.spread(4, |o| o.p99_ms).unwrap().median);
        for want in [
            "spright chain benchmark",
            "requests/s (higher is better)",
            "spright-sdk",
            &sdk_p99,
        ] {
            assert!(texts.contains(&want), "{want:?} missing from {texts:?}");
        }
        assert!(
            texts.iter().any(|t| t.starts_with("chain of 4 functions")),
            "no caption in {texts:?}"
        );
        // requests/s values and axis labels are whole numbers.
        let rps = format!("{:.0}", r.spread(0, |o| o.requests_per_s).unwrap().median);
        assert!(
            texts.contains(&rps.as_str()),
            "{rps} missing from {texts:?}"
        );
        assert!(
            !texts.iter().any(|t| t.ends_with(".0")),
            "a value ends in .0: {texts:?}"
        );
        plot::svg_check::assert_readable(&fig, &boxes);
        // A busy window adds a warning line to the caption.
        let mut busy = r.clone();
        busy.rounds[1][1].other_cpu_share = 0.63;
        let fig2 = figure(&busy, "spright chain benchmark");
        let boxes2 = plot::svg_check::text_boxes(&plot::svg(&fig2).unwrap()).unwrap();
        assert!(
            boxes2.iter().any(|b| b.text.starts_with(
                "warning: busy machine, other processes above 10% of the CPU in 1 of 21 measured windows"
            )),
            "{boxes2:?}"
        );
        plot::svg_check::assert_readable(&fig2, &boxes2);
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("chain.png");
        plot::png(&fig, &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    }

    #[test]
    fn the_overlap_estimate_catches_neighbours() {
        let svg = r#"<svg xmlns="http://www.w3.org/2000/svg" width="200" height="100">
<text x="50" y="20" dy="0.76em" text-anchor="middle" font-size="10">reference p50</text>
<text x="80" y="20" dy="0.76em" text-anchor="middle" font-size="10">p99</text>
<text x="150" y="20" dy="0.76em" text-anchor="start" font-size="10">far</text>
<text x="50" y="60" dy="-0.5ex" text-anchor="end" font-size="10">below</text>
</svg>"#;
        let boxes = plot::svg_check::text_boxes(svg).unwrap();
        assert_eq!(boxes.len(), 4);
        // "reference p50": 13 chars × 6.2 px = 80.6 px centred on 50.
        assert!((boxes[0].x0 - (50.0 - 40.3)).abs() < 1e-9);
        assert!((boxes[0].y0 - 20.0).abs() < 1e-9);
        assert_eq!(
            plot::svg_check::overlapping(&boxes),
            vec![("reference p50".to_owned(), "p99".to_owned())]
        );
    }
}
