//! The soak with churn (`cargo xtask soak`, `privileged_soak`): a chain of
//! unmodified HTTP functions (`spright-fn`) on a simulated node under steady
//! load while, on a schedule, the things a node lives through happen to it:
//!
//! - **join**: a pod joins the chain (CNI ADD with `spright.dev/chain`), its
//!   function starts, the load client sends part of its traffic through it,
//!   and its hop on (through the Service below) must be redirected;
//! - **leave**: the oldest pod that joined leaves: the load client stops
//!   sending to it and waits for its requests in flight (as a Service's
//!   endpoints would be drained), its function is killed, CNI DEL;
//! - **opt-out**: a pod joins the chain with `spright.dev/redirect: "off"`;
//!   traffic goes through it, and none of its bytes may be redirected;
//! - **meshd-restart**: meshd is SIGKILLed by pid and started again on the
//!   same address; it must adopt the pinned datapath;
//! - **upgrade**: this build's programs are swapped in over the pinned maps
//!   (`Datapath::replace_programs`, the DaemonSet's upgrade path); one
//!   sockops program must stay attached;
//! - **service-change**: the EndpointSlice of the Service between the
//!   gateway and the second stage is rewritten, its second backend turning
//!   not-ready or ready again; meshd's table must follow.
//!
//! The chain: the client pod (outside the chain) → `fn0` (gateway) → the
//! ClusterIP of Service `stage1` (backends `fn1`, `fn1b`; kube-proxy's
//! DNAT emulated towards `fn1`, meshd's connect-time translation for chain
//! callers) → `fn2` (last). Joined pods are gateways too: each calls the
//! Service. Every function does [`spright_shm::work::apply`] with one
//! round, so every reply is the request body in upper case; the load
//! client ([`LoadClient`], hyper over tokio, several keep-alive
//! connections, reconnecting on error) compares every reply byte for byte.
//!
//! After every step: the endpoint map's addresses against the live pods'
//! (a leak or a loss is a mismatch that outlasts a bounded wait), the netns
//! map against the live pods, the sockhash's size, meshd's RSS and the
//! memory bound's largest queue. A sampler records the same once a second
//! with the load's counters. At the end every joined pod leaves, the load
//! stops, the functions exit, the sockhash must drain back to its size
//! before the load, and after CNI DEL of every pod no endpoint map or netns
//! map entry and no record may be left.
//!
//! Every churn step is graceful (a leaving pod is drained before it dies),
//! so plain TCP would show no error at all: every error the load client
//! counts is one the mesh caused.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    chain::{
        PORT, PodInfo, add_spright_pod, node_placement, pod_command, spright_conf, wait_listening,
    },
    cni::Node,
    meshd::Meshd,
    plot,
    procgroup::check_interrupted,
    sandbox::{Peer, workspace_bin},
    services::{endpoint_slice, kube_proxy_dnat, service, service_status, write_service_file},
};

/// Bound of every wait of the soak (a function starting, meshd catching
/// up, a drain, the sockhash emptying).
const T: Duration = Duration::from_secs(30);
/// The Service between the gateway and the second stage.
const SERVICE: &str = "stage1";
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Bound of one request of the load client (connect, send, whole reply).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Error messages kept for the report.
const KEEP_ERRORS: usize = 20;

/// What to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    /// Seconds of load (the schedule runs while it lasts).
    pub seconds: u64,
    /// Keep-alive connections of the load client (one worker each).
    pub connections: usize,
    /// Request body size in bytes.
    pub payload: usize,
    /// Requests per second the load client aims at, all workers together
    /// (a steady load, not a saturating one).
    pub rate: u32,
    /// Seconds between two steps of the schedule.
    pub step_secs: u64,
    /// Start the functions in process groups of their own (the binary,
    /// which traps Ctrl-C); tests keep them in the test's group so a
    /// Ctrl-C of `cargo test` reaches them.
    #[serde(default)]
    pub process_groups: bool,
}

impl Spec {
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            (60..=180 * 60).contains(&self.seconds),
            "the soak runs 1 to 180 minutes, got {} s",
            self.seconds
        );
        ensure!(
            (1..=64).contains(&self.connections),
            "--connections must be 1 to 64, got {}",
            self.connections
        );
        ensure!(
            (64..=1 << 20).contains(&self.payload),
            "--payload must be 64 B to 1 MiB, got {}",
            self.payload
        );
        ensure!(
            (1..=5000).contains(&self.rate),
            "--rate must be 1 to 5000 requests/s, got {}",
            self.rate
        );
        ensure!(
            (3..=600).contains(&self.step_secs),
            "--step-secs must be 3 to 600, got {}",
            self.step_secs
        );
        Ok(())
    }
}

/// A kind of step of the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepKind {
    Join,
    Leave,
    OptOut,
    MeshdRestart,
    Upgrade,
    ServiceChange,
    /// The end: every joined pod leaves, the load stops.
    FinalCleanup,
}

impl StepKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Join => "join",
            Self::Leave => "leave",
            Self::OptOut => "opt-out",
            Self::MeshdRestart => "meshd-restart",
            Self::Upgrade => "upgrade",
            Self::ServiceChange => "service-change",
            Self::FinalCleanup => "final-cleanup",
        }
    }
}

/// The schedule, repeated: as many pods leave as join or opt out per
/// round, so the node's population stays bounded.
pub const SCHEDULE: [StepKind; 7] = [
    StepKind::Join,
    StepKind::ServiceChange,
    StepKind::OptOut,
    StepKind::MeshdRestart,
    StepKind::Leave,
    StepKind::Upgrade,
    StepKind::Leave,
];

/// The node's state right after a step (once the maps agreed with the
/// live pods, or the bounded wait for that ran out).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Check {
    /// Addresses in the endpoint map.
    pub map_entries: usize,
    /// Addresses of the live pods (what the endpoint map must hold).
    pub live_pod_ips: usize,
    /// Endpoint map addresses that belong to no live pod.
    pub stale: Vec<IpAddr>,
    /// Live pod addresses missing from the endpoint map.
    pub missing: Vec<IpAddr>,
    /// Entries of the netns map and the live pods (one each).
    pub netns_entries: usize,
    pub live_pods: usize,
    pub sockhash: usize,
    pub meshd_rss_kib: Option<u64>,
    pub largest_queue_bytes: Option<u64>,
}

impl Check {
    pub fn consistent(&self) -> bool {
        self.stale.is_empty() && self.missing.is_empty() && self.netns_entries == self.live_pods
    }
}

/// One step of the schedule as it ran.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Step {
    pub kind: StepKind,
    /// Seconds since the load started.
    pub at_s: f64,
    pub took_s: f64,
    /// What happened (pod, address, requests through it, …).
    pub detail: String,
    /// The step's own check failed (a joined pod not redirected, an
    /// opted-out pod redirected, meshd not adopting the datapath, …).
    pub failure: Option<String>,
    /// Errors of the load client from this step's start to the next's.
    pub errors_during: u64,
    pub check: Check,
}

/// One sample of the time series (once a second).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the load started.
    pub t: f64,
    pub requests: u64,
    pub verified_bytes: u64,
    pub body_errors: u64,
    pub http_errors: u64,
    pub conn_errors: u64,
    pub sockhash: Option<usize>,
    pub meshd_rss_kib: Option<u64>,
    pub largest_queue_bytes: Option<u64>,
    pub map_entries: Option<usize>,
}

/// The load client's totals.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Totals {
    pub requests: u64,
    /// Reply bytes compared with what was sent (transformed) and equal.
    pub verified_bytes: u64,
    /// Replies whose body differed from the expected one.
    pub body_errors: u64,
    /// Replies with a status other than 200 (a function's hop failed).
    pub http_errors: u64,
    /// Connections that failed (connect, send, reset, timeout); the worker
    /// reconnects.
    pub conn_errors: u64,
    /// The first error messages.
    pub first_errors: Vec<String>,
}

impl Totals {
    pub fn errors(&self) -> u64 {
        self.body_errors + self.http_errors + self.conn_errors
    }
}

/// The end of the run, after every pod is gone.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Final {
    /// Sockhash entries before the load and once the functions exited.
    pub sockhash_before: usize,
    pub sockhash_after: usize,
    /// What is left after CNI DEL of every pod.
    pub map_entries_after_del: usize,
    pub netns_entries_after_del: usize,
    pub records_after_del: usize,
    /// How long after the last DEL the maps were empty (or the bounded
    /// wait gave up).
    #[serde(default)]
    pub settled_ms: u64,
    /// Connection directions the memory bound moved to TCP (last meshd).
    pub memory_bound_switches: u64,
    /// Connections meshd's table translated for `stage1` (last meshd).
    pub translated_connections: u64,
}

/// Everything a soak run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub spec: Spec,
    pub steps: Vec<Step>,
    pub samples: Vec<Sample>,
    pub totals: Totals,
    pub end: Final,
}

/// Runs the soak; `progress` gets a line per step.
pub fn run(spec: &Spec, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Report> {
    spec.validate()?;
    let mut soak = Soak::set_up(spec, progress)?;
    let started = Instant::now();
    let result = soak.schedule(started, progress);
    let end = soak.tear_down(started, progress);
    let totals = soak.load.totals();
    let mut steps = std::mem::take(&mut soak.steps);
    // Each step's errors: from its start to the next step's (the last's:
    // to the end of the load).
    let starts: Vec<u64> = steps.iter().map(|s| s.errors_during).collect();
    for (i, s) in steps.iter_mut().enumerate() {
        let until = starts.get(i + 1).copied().unwrap_or(totals.errors());
        s.errors_during = until.saturating_sub(starts[i]);
    }
    let samples = soak.sampler.finish();
    result?;
    let end = end?;
    Ok(Report {
        spec: spec.clone(),
        steps,
        samples,
        totals,
        end,
    })
}

/// A pod that joined (or opted out) during the run.
struct Extra {
    pod: PodInfo,
    name: String,
    function: Peer,
}

/// The running soak. Fields drop in declaration order: the load and the
/// sampler stop, the functions die, meshd dies, then the node goes.
struct Soak {
    load: LoadClient,
    sampler: Sampler,
    extras: Vec<Extra>,
    core: Vec<Peer>,
    meshd: Option<Meshd>,
    shared: Arc<Shared>,
    spec: Spec,
    steps: Vec<Step>,
    /// Core pods (client, fn0, fn1, fn1b, fn2), in that order.
    pods: Vec<PodInfo>,
    /// How many joins and opt-outs so far (names `join-N`, `optout-N`).
    joined: usize,
    /// Whether `fn1b` is a ready backend of the Service now.
    second_backend_ready: bool,
    sockhash_before: usize,
    node: Node,
}

/// What the sampler reads besides the load client's counters.
struct Shared {
    meshd_pid: AtomicU32,
    meshd_addr: String,
    bpffs: PathBuf,
}

impl Soak {
    fn set_up(spec: &Spec, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Self> {
        let mut node = Node::new("k")?;
        let mut pods = Vec::new();
        for (name, chain) in [
            ("client", false),
            ("fn0", true),
            ("fn1", true),
            ("fn1b", true),
            ("fn2", true),
        ] {
            let index = node.add_pod()?;
            pods.push(add_spright_pod(
                &node,
                index,
                name,
                &annotations(name, chain, true),
            )?);
        }
        let meshd = Meshd::start(&node_placement(&node), &node.state_dir())?;
        let cluster = SocketAddr::new(IpAddr::V4(CLUSTER_IP), 80);
        kube_proxy_dnat(&node.node, cluster, SocketAddr::new(pods[2].ip, PORT))?;
        write_stage1(&node, &pods, true)?;
        meshd.wait_status(T, "stage1 with two local backends", |s| {
            local_backends(s) == 2
        })?;
        let shared = Arc::new(Shared {
            meshd_pid: AtomicU32::new(meshd.pid()),
            meshd_addr: meshd.addr.clone(),
            bpffs: node.pins.path.clone(),
        });
        let sockhash_before = sockhash(&node.pins.path)?;

        // Functions, last first.
        let mut core = Vec::new();
        let stage2 = format!("http://{}/", SocketAddr::new(pods[4].ip, PORT));
        let via_service = format!("http://{cluster}/");
        for (i, next) in [
            (4, None),
            (3, Some(&stage2)),
            (2, Some(&stage2)),
            (1, Some(&via_service)),
        ] {
            core.push(start_function(
                &node,
                spec,
                &pods[i],
                &pod_name(i),
                next.map(String::as_str),
            )?);
        }
        progress(&format!(
            "chain up: client {} → fn0 {} → {cluster} (stage1: fn1 {}, fn1b {}) → fn2 {}; meshd pid {}",
            pods[0].ip,
            pods[1].ip,
            pods[2].ip,
            pods[3].ip,
            pods[4].ip,
            meshd.pid()
        ));
        let load = LoadClient::start(
            &node.pods[pods[0].index].path(),
            spec,
            Target::new("fn0", SocketAddr::new(pods[1].ip, PORT)),
        )?;
        let sampler = Sampler::start(Arc::clone(&shared), load.counters.clone());
        let soak = Self {
            load,
            sampler,
            extras: Vec::new(),
            core,
            meshd: Some(meshd),
            shared,
            spec: spec.clone(),
            steps: Vec::new(),
            pods,
            joined: 0,
            second_backend_ready: true,
            sockhash_before,
            node,
        };
        // The chain answers before the clock of the schedule starts.
        let deadline = Instant::now() + T;
        while soak.load.totals().requests == 0 {
            soak.load.alive()?;
            ensure!(
                Instant::now() < deadline,
                "no request went through the chain within {T:?}: {:?}",
                soak.load.totals()
            );
            check_interrupted()?;
            std::thread::sleep(Duration::from_millis(50));
        }
        progress(&format!(
            "load: {} connections, {} requests/s, {} B bodies; sockhash before the load: {sockhash_before}",
            spec.connections, spec.rate, spec.payload
        ));
        Ok(soak)
    }

    /// Runs steps every `step_secs` until the load's time is up.
    fn schedule(&mut self, started: Instant, progress: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
        let total = Duration::from_secs(self.spec.seconds);
        let every = Duration::from_secs(self.spec.step_secs);
        let mut k: u32 = 0;
        loop {
            let at = every * (k + 1);
            if at >= total {
                break;
            }
            while started.elapsed() < at {
                check_interrupted()?;
                self.load.alive()?;
                std::thread::sleep(Duration::from_millis(100));
            }
            let kind = SCHEDULE[k as usize % SCHEDULE.len()];
            self.step(kind, started, progress)?;
            k += 1;
        }
        while started.elapsed() < total {
            check_interrupted()?;
            self.load.alive()?;
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Runs one step and its check, and records it.
    fn step(
        &mut self,
        kind: StepKind,
        started: Instant,
        progress: &mut dyn FnMut(&str),
    ) -> anyhow::Result<()> {
        let errors_before = self.load.totals().errors();
        let at = started.elapsed();
        let outcome = match kind {
            StepKind::Join => self.join(false),
            StepKind::OptOut => self.join(true),
            StepKind::Leave => self.leave(),
            StepKind::MeshdRestart => self.restart_meshd(),
            StepKind::Upgrade => self.upgrade(),
            StepKind::ServiceChange => self.change_service(),
            StepKind::FinalCleanup => {
                let mut said = Vec::new();
                while !self.extras.is_empty() {
                    said.push(self.leave()?.0);
                }
                Ok((
                    format!("{} pods left: {}", said.len(), said.join("; ")),
                    None,
                ))
            }
        };
        let (detail, failure) = outcome.with_context(|| format!("step {}", kind.name()))?;
        let took = started.elapsed().saturating_sub(at);
        let check = self.check()?;
        progress(&format!(
            "[+{:>6.1}s] {:<14} {detail}{} | map {}/{} netns {}/{} sockhash {} meshd RSS {} largest queue {}{}",
            at.as_secs_f64(),
            kind.name(),
            failure
                .as_ref()
                .map_or(String::new(), |f| format!(" FAILED: {f}")),
            check.map_entries,
            check.live_pod_ips,
            check.netns_entries,
            check.live_pods,
            check.sockhash,
            check
                .meshd_rss_kib
                .map_or("-".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            check
                .largest_queue_bytes
                .map_or("-".to_owned(), |b| format!("{b} B")),
            if check.consistent() {
                String::new()
            } else {
                format!(
                    " MISMATCH stale {:?} missing {:?}",
                    check.stale, check.missing
                )
            }
        ));
        self.steps.push(Step {
            kind,
            at_s: at.as_secs_f64(),
            took_s: took.as_secs_f64(),
            detail,
            failure,
            // The errors total at the start until `run` has the next
            // step's and makes it the difference.
            errors_during: errors_before,
            check,
        });
        Ok(())
    }

    /// A pod joins the chain (opted out of the redirect when `opt_out`), its
    /// function calls the Service, and the load goes through it.
    fn join(&mut self, opt_out: bool) -> anyhow::Result<(String, Option<String>)> {
        self.joined += 1;
        let name = format!(
            "{}-{}",
            if opt_out { "optout" } else { "join" },
            self.joined
        );
        let index = self.node.add_pod()?;
        let pod = add_spright_pod(
            &self.node,
            index,
            &name,
            &annotations(&name, true, !opt_out),
        )?;
        let via_service = format!("http://{}/", SocketAddr::new(IpAddr::V4(CLUSTER_IP), 80));
        let function = start_function(&self.node, &self.spec, &pod, &name, Some(&via_service))?;
        let target = Target::new(&name, SocketAddr::new(pod.ip, PORT));
        self.load.add(Arc::clone(&target));
        let ip = pod.ip;
        self.extras.push(Extra {
            pod,
            name: name.clone(),
            function,
        });
        // Traffic through it: a few requests answered, then its counters.
        let deadline = Instant::now() + T;
        while target.requests.load(Ordering::Relaxed) < 20 {
            ensure!(
                Instant::now() < deadline,
                "{name}: fewer than 20 requests through it within {T:?}"
            );
            self.load.alive()?;
            std::thread::sleep(Duration::from_millis(50));
        }
        let redirected = spright_ebpf::Datapath::open(&self.node.pins.path)?
            .counters(ip)?
            .redirected_bytes;
        let failure = match (opt_out, redirected) {
            (false, 0) => Some(format!(
                "{name} joined the chain but sent nothing socket to socket"
            )),
            (true, n) if n > 0 => Some(format!("{name} opted out but sent {n} B socket to socket")),
            _ => None,
        };
        Ok((
            format!(
                "{name} {ip}: {} requests through it, {redirected} B redirected",
                target.requests.load(Ordering::Relaxed)
            ),
            failure,
        ))
    }

    /// The oldest joined pod leaves: drained, killed, CNI DEL.
    fn leave(&mut self) -> anyhow::Result<(String, Option<String>)> {
        if self.extras.is_empty() {
            return Ok(("no joined pod to leave".to_owned(), None));
        }
        let extra = self.extras.remove(0);
        let served = self.load.remove_and_drain(&extra.name)?;
        drop(extra.function);
        let r = self.node.invoke(
            "DEL",
            &spright_conf(&self.node, &json!({})),
            Some(&extra.pod.attach),
        )?;
        ensure!(r.ok, "DEL of {} failed: {}", extra.name, r.stdout);
        Ok((
            format!(
                "{} {}: drained after {served} requests, killed, deleted",
                extra.name, extra.pod.ip
            ),
            None,
        ))
    }

    /// SIGKILL meshd by pid, start it again on the same address.
    fn restart_meshd(&mut self) -> anyhow::Result<(String, Option<String>)> {
        let old = self.meshd.take().context("meshd is not running")?;
        let (old_pid, addr) = (old.pid(), old.addr.clone());
        self.shared.meshd_pid.store(0, Ordering::Relaxed);
        old.kill();
        std::thread::sleep(Duration::from_millis(300));
        let meshd = Meshd::start_on(&node_placement(&self.node), &self.node.state_dir(), &addr)?;
        self.shared.meshd_pid.store(meshd.pid(), Ordering::Relaxed);
        let s = meshd.wait_status(T, "the Service table again", |s| {
            local_backends(s) == if self.second_backend_ready { 2 } else { 1 }
        })?;
        let how = s["acceleration"]["datapath"]
            .as_str()
            .unwrap_or("?")
            .to_owned();
        let detail = format!(
            "pid {old_pid} killed, pid {} up, datapath {how}",
            meshd.pid()
        );
        self.meshd = Some(meshd);
        Ok((
            detail,
            (how != "adopted")
                .then(|| format!("the restarted meshd found the datapath {how}, not adopted")),
        ))
    }

    /// This build's programs swapped in over the pinned maps.
    fn upgrade(&mut self) -> anyhow::Result<(String, Option<String>)> {
        let before = crate::scenario::sockops_ids(&self.node.cgroup.path)?;
        drop(spright_ebpf::Datapath::replace_programs(&node_placement(
            &self.node,
        ))?);
        let after = crate::scenario::sockops_ids(&self.node.cgroup.path)?;
        let failure = if after.len() != 1 {
            Some(format!(
                "{} sockops programs attached after the swap: {after:?}",
                after.len()
            ))
        } else if before == after {
            Some(format!("the sockops program was not replaced ({after:?})"))
        } else {
            None
        };
        Ok((
            format!("sockops program {} → {}", before.join(","), after.join(",")),
            failure,
        ))
    }

    /// The Service's second backend turns not-ready, or ready again.
    fn change_service(&mut self) -> anyhow::Result<(String, Option<String>)> {
        self.second_backend_ready = !self.second_backend_ready;
        write_stage1(&self.node, &self.pods, self.second_backend_ready)?;
        let want = if self.second_backend_ready { 2 } else { 1 };
        let meshd = self.meshd.as_ref().context("meshd is not running")?;
        meshd.wait_status(T, "the new stage1 backends", |s| local_backends(s) == want)?;
        Ok((
            format!(
                "EndpointSlice rewritten: fn1b {}, {want} local backend{}",
                if self.second_backend_ready {
                    "ready"
                } else {
                    "not ready"
                },
                if want == 1 { "" } else { "s" }
            ),
            None,
        ))
    }

    /// The node's state now: waits (bounded) for the endpoint and netns
    /// maps to agree with the live pods, then reads everything once.
    fn check(&self) -> anyhow::Result<Check> {
        let live: Vec<&PodInfo> = self
            .pods
            .iter()
            .chain(self.extras.iter().map(|e| &e.pod))
            .collect();
        let want: BTreeSet<IpAddr> = live.iter().map(|p| p.ip).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let dp = spright_ebpf::Datapath::open(&self.node.pins.path)?;
            let have: BTreeSet<IpAddr> = dp.endpoints()?.into_iter().map(|(ip, _)| ip).collect();
            let netns_entries = dp.netns_entries()?.len();
            let check = Check {
                map_entries: have.len(),
                live_pod_ips: want.len(),
                stale: have.difference(&want).copied().collect(),
                missing: want.difference(&have).copied().collect(),
                netns_entries,
                live_pods: live.len(),
                sockhash: sockhash(&self.node.pins.path)?,
                meshd_rss_kib: self.shared.meshd_rss_kib(),
                largest_queue_bytes: self.shared.largest_queue_bytes(),
            };
            if check.consistent() || Instant::now() > deadline {
                return Ok(check);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The end: joined pods leave, the load stops, the functions exit, the
    /// sockhash drains, CNI DEL of every pod; what is left is counted.
    fn tear_down(
        &mut self,
        started: Instant,
        progress: &mut dyn FnMut(&str),
    ) -> anyhow::Result<Final> {
        let cleanup = self.step(StepKind::FinalCleanup, started, progress);
        self.load.stop();
        cleanup?;
        self.sampler.stop();
        let meshd = self.meshd.as_ref().context("meshd is not running")?;
        let status = meshd.status()?;
        let memory_bound_switches = status["memory_bound"]["switches"].as_u64().unwrap_or(0);
        let translated_connections = service_status(&status, stage1())
            .and_then(|s| s["translated_connections"].as_u64())
            .unwrap_or(0);
        self.core.clear();
        let deadline = Instant::now() + T;
        let sockhash_after = loop {
            let n = sockhash(&self.node.pins.path)?;
            if n <= self.sockhash_before || Instant::now() > deadline {
                break n;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        for p in &self.pods {
            let r = self.node.invoke(
                "DEL",
                &spright_conf(&self.node, &json!({})),
                Some(&p.attach),
            )?;
            ensure!(
                r.ok,
                "DEL of {} failed: {}",
                p.attach.container_id,
                r.stdout
            );
        }
        // meshd reconciles while DEL runs: an entry it wrote back from a
        // record read just before the DEL must go at its next
        // reconciliation (bounded wait); one that stays is a leak.
        let deleted = Instant::now();
        let deadline = deleted + Duration::from_secs(10);
        let mut right_after_del = None;
        let (left, netns_left) = loop {
            let dp = spright_ebpf::Datapath::open(&self.node.pins.path)?;
            let left: Vec<IpAddr> = dp.endpoints()?.into_iter().map(|(ip, _)| ip).collect();
            let netns_left = dp.netns_entries()?.len();
            right_after_del.get_or_insert_with(|| (left.clone(), netns_left));
            if (left.is_empty() && netns_left == 0) || Instant::now() > deadline {
                break (left, netns_left);
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let end = Final {
            sockhash_before: self.sockhash_before,
            sockhash_after,
            map_entries_after_del: left.len(),
            netns_entries_after_del: netns_left,
            records_after_del: self.node.records().len(),
            settled_ms: u64::try_from(deleted.elapsed().as_millis()).unwrap_or(u64::MAX),
            memory_bound_switches,
            translated_connections,
        };
        if let Some((ips, netns)) = right_after_del.filter(|(ips, n)| !ips.is_empty() || *n > 0) {
            progress(&format!(
                "right after the last DEL: endpoint map entries {ips:?}, {netns} netns map entries (last pod deleted: {})",
                self.pods.last().map_or(String::new(), |p| p.ip.to_string())
            ));
        }
        if !left.is_empty() {
            progress(&format!("endpoint map entries left after DEL: {left:?}"));
        }
        progress(&format!(
            "end: sockhash {} before the load, {} after the functions exited; after DEL of every pod: {} endpoint map entries, {} netns map entries, {} records ({} ms after the last DEL)",
            end.sockhash_before,
            end.sockhash_after,
            end.map_entries_after_del,
            end.netns_entries_after_del,
            end.records_after_del,
            end.settled_ms
        ));
        Ok(end)
    }
}

fn pod_name(core_index: usize) -> String {
    ["client", "fn0", "fn1", "fn1b", "fn2"][core_index].to_owned()
}

/// A pod's annotations as containerd passes them.
fn annotations(name: &str, chain: bool, redirect: bool) -> Value {
    let mut a = json!({});
    a[spright_endpoint::ANNOTATION_FUNCTION] = json!(name);
    if chain {
        a[spright_endpoint::ANNOTATION_CHAIN] = json!("demo");
    }
    if !redirect {
        a[spright_endpoint::ANNOTATION_REDIRECT] = json!("off");
    }
    a
}

fn stage1() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(CLUSTER_IP), 80)
}

/// The Service `stage1` and its EndpointSlice: `fn1` ready, `fn1b` ready
/// or not.
fn write_stage1(node: &Node, pods: &[PodInfo], second_ready: bool) -> anyhow::Result<()> {
    write_service_file(
        &node.state_dir().join("services"),
        SERVICE,
        &[
            service(SERVICE, IpAddr::V4(CLUSTER_IP), 80, PORT),
            endpoint_slice(
                SERVICE,
                PORT,
                &[(pods[2].ip, true), (pods[3].ip, second_ready)],
            ),
        ],
    )
}

fn local_backends(s: &Value) -> usize {
    service_status(s, stage1())
        .and_then(|v| v["local_backends"].as_array())
        .map_or(0, Vec::len)
}

/// `spright-fn` in pod `pod`, listening on its address, calling `next`.
fn start_function(
    node: &Node,
    spec: &Spec,
    pod: &PodInfo,
    name: &str,
    next: Option<&str>,
) -> anyhow::Result<Peer> {
    let ncpu = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut args = vec![
        "--listen".to_owned(),
        SocketAddr::new(pod.ip, PORT).to_string(),
        "--name".into(),
        name.to_owned(),
        "--work".into(),
        "1".into(),
    ];
    if let Some(next) = next {
        args.extend(["--next".into(), next.to_owned()]);
    }
    let cmd = pod_command(
        node,
        pod.index,
        &node.cgroup.path,
        &format!("0-{}", ncpu - 1),
        &workspace_bin("spright-fn"),
        &args,
    );
    let peer = if spec.process_groups {
        Peer::spawn_group(cmd)?
    } else {
        Peer::spawn_command(cmd)?
    };
    ensure!(peer.line(T)? == "ready", "function {name} did not start");
    wait_listening(node, pod.index, PORT)?;
    Ok(peer)
}

/// Sockets in the sockhash (each holds one psock).
fn sockhash(bpffs: &Path) -> anyhow::Result<usize> {
    Ok(spright_ebpf::PathSwitch::open(bpffs)?.accelerated()?.len())
}

impl Shared {
    fn meshd_rss_kib(&self) -> Option<u64> {
        let pid = self.meshd_pid.load(Ordering::Relaxed);
        if pid == 0 {
            return None;
        }
        rss_kib(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
    }

    /// The memory bound's largest receive queue of a chain socket at its
    /// last poll (meshd's `/status`).
    fn largest_queue_bytes(&self) -> Option<u64> {
        if self.meshd_pid.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let s: Value =
            serde_json::from_str(&crate::meshd::get(&self.meshd_addr, "/status").ok()?).ok()?;
        s["memory_bound"]["largest_queue_bytes"].as_u64()
    }
}

/// `VmRSS` of a `/proc/PID/status` text, in KiB.
fn rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Once a second: the load's counters, the sockhash, meshd's RSS and the
/// memory bound's largest queue, the endpoint map's size.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Sample>>>,
    samples: Vec<Sample>,
}

impl Sampler {
    fn start(shared: Arc<Shared>, counters: Arc<LoadCounters>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut samples = Vec::new();
            let mut next = started;
            while !flag.load(Ordering::Relaxed) {
                let dp = spright_ebpf::Datapath::open(&shared.bpffs).ok();
                let t = counters.totals();
                samples.push(Sample {
                    t: started.elapsed().as_secs_f64(),
                    requests: t.requests,
                    verified_bytes: t.verified_bytes,
                    body_errors: t.body_errors,
                    http_errors: t.http_errors,
                    conn_errors: t.conn_errors,
                    sockhash: sockhash(&shared.bpffs).ok(),
                    meshd_rss_kib: shared.meshd_rss_kib(),
                    largest_queue_bytes: shared.largest_queue_bytes(),
                    map_entries: dp.and_then(|d| d.endpoints().ok()).map(|e| e.len()),
                });
                next += Duration::from_secs(1);
                while Instant::now() < next && !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            samples
        });
        Self {
            stop,
            thread: Some(thread),
            samples: Vec::new(),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            self.samples = t.join().unwrap_or_default();
        }
    }

    fn finish(&mut self) -> Vec<Sample> {
        self.stop();
        std::mem::take(&mut self.samples)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the load client sends requests.
pub struct Target {
    pub name: String,
    pub addr: SocketAddr,
    /// Requests sent to it and not answered yet.
    inflight: AtomicU64,
    /// Requests it answered.
    pub requests: AtomicU64,
}

impl Target {
    pub fn new(name: &str, addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            addr,
            inflight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        })
    }
}

/// The load client's counters, shared with the sampler.
#[derive(Default)]
pub struct LoadCounters {
    requests: AtomicU64,
    verified_bytes: AtomicU64,
    body_errors: AtomicU64,
    http_errors: AtomicU64,
    conn_errors: AtomicU64,
    first_errors: Mutex<Vec<String>>,
}

impl LoadCounters {
    fn totals(&self) -> Totals {
        Totals {
            requests: self.requests.load(Ordering::Relaxed),
            verified_bytes: self.verified_bytes.load(Ordering::Relaxed),
            body_errors: self.body_errors.load(Ordering::Relaxed),
            http_errors: self.http_errors.load(Ordering::Relaxed),
            conn_errors: self.conn_errors.load(Ordering::Relaxed),
            first_errors: self
                .first_errors
                .lock()
                .map(|e| e.clone())
                .unwrap_or_default(),
        }
    }

    fn error(&self, counter: &AtomicU64, what: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.first_errors.lock()
            && e.len() < KEEP_ERRORS
        {
            e.push(what);
        }
    }
}

/// A steady HTTP load that checks every reply: `connections` workers on a
/// tokio runtime in a thread of its own inside the client pod's network
/// namespace, each with keep-alive connections to the targets it sends to
/// (round robin over the current targets), paced to `rate` requests/s in
/// all. Every body is distinct (lower-case letters from the worker and the
/// request number); the reply must be exactly that body in upper case.
pub struct LoadClient {
    counters: Arc<LoadCounters>,
    targets: Arc<RwLock<Vec<Arc<Target>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl LoadClient {
    /// Starts the load inside the network namespace at `netns`.
    pub fn start(netns: &Path, spec: &Spec, first: Arc<Target>) -> anyhow::Result<Self> {
        let counters = Arc::new(LoadCounters::default());
        let targets = Arc::new(RwLock::new(vec![first]));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, t, s) = (
            Arc::clone(&counters),
            Arc::clone(&targets),
            Arc::clone(&stop),
        );
        let (netns, connections, payload) = (netns.to_path_buf(), spec.connections, spec.payload);
        // Each worker's share of the rate.
        let period = Duration::from_secs_f64(connections as f64 / f64::from(spec.rate));
        let thread = std::thread::spawn(move || {
            spright_endpoint::netns::run_in(&netns, || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let mut set = tokio::task::JoinSet::new();
                    for id in 0..connections {
                        let w = Worker {
                            id,
                            payload,
                            period,
                            counters: Arc::clone(&c),
                            targets: Arc::clone(&t),
                            stop: Arc::clone(&s),
                        };
                        set.spawn(w.run());
                    }
                    while set.join_next().await.is_some() {}
                });
                Ok(())
            })
        });
        Ok(Self {
            counters,
            targets,
            stop,
            thread: Some(thread),
        })
    }

    pub fn totals(&self) -> Totals {
        self.counters.totals()
    }

    /// An error when the load's thread has ended before being stopped.
    pub fn alive(&self) -> anyhow::Result<()> {
        ensure!(
            self.thread.as_ref().is_some_and(|t| !t.is_finished()),
            "the load client stopped"
        );
        Ok(())
    }

    pub fn add(&self, t: Arc<Target>) {
        if let Ok(mut v) = self.targets.write() {
            v.push(t);
        }
    }

    /// Stops sending to `name` and waits (bounded) until none of its
    /// requests is in flight; returns how many it answered.
    pub fn remove_and_drain(&self, name: &str) -> anyhow::Result<u64> {
        let removed = {
            let mut v = self
                .targets
                .write()
                .map_err(|_| anyhow::anyhow!("target list poisoned"))?;
            let i = v
                .iter()
                .position(|t| t.name == name)
                .with_context(|| format!("{name} is not a target"))?;
            v.remove(i)
        };
        // Workers count a request in flight while they hold the list, so
        // none can start on `removed` after this point.
        let deadline = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(5);
        while removed.inflight.load(Ordering::Relaxed) > 0 {
            ensure!(
                Instant::now() < deadline,
                "{name}: requests still in flight after {REQUEST_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(removed.requests.load(Ordering::Relaxed))
    }

    /// Stops the workers and waits for them (each finishes its request).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self
                    .counters
                    .error(&self.counters.conn_errors, format!("load client: {e:#}")),
                Err(_) => self.counters.error(
                    &self.counters.conn_errors,
                    "load client panicked".to_owned(),
                ),
            }
        }
    }
}

impl Drop for LoadClient {
    fn drop(&mut self) {
        self.stop();
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

struct Worker {
    id: usize,
    payload: usize,
    period: Duration,
    counters: Arc<LoadCounters>,
    targets: Arc<RwLock<Vec<Arc<Target>>>>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    async fn run(self) {
        let mut conns: HashMap<SocketAddr, Sender> = HashMap::new();
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq: u64 = 0;
        while !self.stop.load(Ordering::Relaxed) {
            tick.tick().await;
            // Pick a target and count the request in flight under the
            // list's lock (see `remove_and_drain`); forget connections to
            // targets that left.
            let target = {
                let Ok(v) = self.targets.read() else { return };
                conns.retain(|a, _| v.iter().any(|t| t.addr == *a));
                if v.is_empty() {
                    continue;
                }
                let t = Arc::clone(&v[(self.id + usize::try_from(seq).unwrap_or(0)) % v.len()]);
                t.inflight.fetch_add(1, Ordering::Relaxed);
                t
            };
            seq += 1;
            let body = body(self.id, seq, self.payload);
            let outcome =
                tokio::time::timeout(REQUEST_TIMEOUT, exchange(&mut conns, target.addr, &body))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Failure::Conn(format!(
                            "no reply within {REQUEST_TIMEOUT:?}"
                        )))
                    });
            target.inflight.fetch_sub(1, Ordering::Relaxed);
            let c = &self.counters;
            match outcome {
                Ok(reply)
                    if reply.len() == body.len()
                        && reply
                            .iter()
                            .zip(&body)
                            .all(|(r, b)| *r == b.to_ascii_uppercase()) =>
                {
                    c.requests.fetch_add(1, Ordering::Relaxed);
                    c.verified_bytes
                        .fetch_add(reply.len() as u64, Ordering::Relaxed);
                    target.requests.fetch_add(1, Ordering::Relaxed);
                }
                Ok(reply) => {
                    c.requests.fetch_add(1, Ordering::Relaxed);
                    c.error(
                        &c.body_errors,
                        format!(
                            "{}: reply of {} B differs from the {} B expected",
                            target.name,
                            reply.len(),
                            body.len()
                        ),
                    );
                }
                Err(Failure::Http(what)) => {
                    c.requests.fetch_add(1, Ordering::Relaxed);
                    c.error(&c.http_errors, format!("{}: {what}", target.name));
                }
                Err(Failure::Conn(what)) => {
                    conns.remove(&target.addr);
                    c.error(&c.conn_errors, format!("{}: {what}", target.name));
                }
            }
        }
    }
}

enum Failure {
    Http(String),
    Conn(String),
}

/// Request `id`/`seq`'s body: lower-case letters, distinct per request.
fn body(id: usize, seq: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    crate::pattern::fill(&mut b, ((id as u64) << 40) | (seq << 8));
    for x in &mut b {
        *x = b'a' + *x % 26;
    }
    b
}

/// One POST on the worker's keep-alive connection to `addr` (made first
/// when there is none or it closed); the reply's body.
async fn exchange(
    conns: &mut HashMap<SocketAddr, Sender>,
    addr: SocketAddr,
    body: &[u8],
) -> Result<Bytes, Failure> {
    let conn = |e: &dyn std::fmt::Display| Failure::Conn(e.to_string());
    if conns.get(&addr).is_none_or(Sender::is_closed) {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| conn(&format!("connecting {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| conn(&e))?;
        tokio::spawn(connection);
        conns.insert(addr, sender);
    }
    let sender = conns.get_mut(&addr).ok_or_else(|| conn(&"no connection"))?;
    sender.ready().await.map_err(|e| conn(&e))?;
    let req = hyper::Request::post("/")
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| conn(&e))?;
    let resp = sender.send_request(req).await.map_err(|e| conn(&e))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| conn(&e))?
        .to_bytes();
    if status != hyper::StatusCode::OK {
        return Err(Failure::Http(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        )));
    }
    Ok(bytes)
}

impl Report {
    /// What makes the run fail: errors of the load client, a step's own
    /// check, a map that disagreed with the live pods after a step, the
    /// sockhash not back at its size before the load, anything left after
    /// every pod was deleted. Empty for a clean run.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let t = &self.totals;
        if t.errors() > 0 {
            p.push(format!(
                "{} errors ({} wrong bodies, {} HTTP errors, {} connection errors); first: {:?}",
                t.errors(),
                t.body_errors,
                t.http_errors,
                t.conn_errors,
                t.first_errors.first()
            ));
        }
        if t.requests == 0 {
            p.push("no request went through the chain".to_owned());
        }
        for s in &self.steps {
            if let Some(f) = &s.failure {
                p.push(format!("{} at +{:.0}s: {f}", s.kind.name(), s.at_s));
            }
            if !s.check.consistent() {
                p.push(format!(
                    "{} at +{:.0}s: maps disagree with the live pods: stale {:?}, missing {:?}, netns {} for {} pods",
                    s.kind.name(),
                    s.at_s,
                    s.check.stale,
                    s.check.missing,
                    s.check.netns_entries,
                    s.check.live_pods
                ));
            }
        }
        let e = &self.end;
        if e.sockhash_after > e.sockhash_before {
            p.push(format!(
                "sockhash leak: {} entries once every function exited, {} before the load",
                e.sockhash_after, e.sockhash_before
            ));
        }
        for (what, n) in [
            ("endpoint map entries", e.map_entries_after_del),
            ("netns map entries", e.netns_entries_after_del),
            ("endpoint records", e.records_after_del),
        ] {
            if n > 0 {
                p.push(format!("{n} {what} left after DEL of every pod"));
            }
        }
        p
    }

    /// The verdict line.
    pub fn verdict(&self) -> String {
        let p = self.problems();
        if p.is_empty() {
            format!(
                "verdict: PASS: no leak (maps matched the live pods after all {} steps, sockhash back to {}, nothing left after DEL), no errors in {} verified requests",
                self.steps.len(),
                self.end.sockhash_before,
                self.totals.requests
            )
        } else {
            format!("verdict: FAIL: {}", p.join("; "))
        }
    }
}

/// `min–max` of some values, or `–`.
fn range<T: PartialOrd + Copy>(v: impl Iterator<Item = T>, show: impl Fn(T) -> String) -> String {
    let mut it = v.peekable();
    let Some(&first) = it.peek() else {
        return "–".to_owned();
    };
    let (lo, hi) = it.fold((first, first), |(lo, hi), x| {
        (if x < lo { x } else { lo }, if x > hi { x } else { hi })
    });
    if lo == hi {
        show(lo)
    } else {
        format!("{}–{}", show(lo), show(hi))
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// The run as Markdown: parameters, totals, a row per step kind, the end,
/// meshd's RSS and the sockhash over time, the verdict.
pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let spec = &r.spec;
    let t = &r.totals;
    let secs = r
        .samples
        .last()
        .map_or(spec.seconds as f64, |x| x.t)
        .max(1.0);
    let _ = writeln!(
        s,
        "soak: {} s of load ({} connections, {} requests/s asked, {} B bodies), a step every {} s: {}\n",
        spec.seconds,
        spec.connections,
        spec.rate,
        spec.payload,
        spec.step_secs,
        SCHEDULE.map(StepKind::name).join(" → ")
    );
    let _ = writeln!(
        s,
        "requests: {} ({:.0}/s), bytes verified end to end: {} ({:.1} MiB); errors: {} wrong bodies, {} HTTP errors, {} connection errors\n",
        t.requests,
        t.requests as f64 / secs,
        t.verified_bytes,
        t.verified_bytes as f64 / f64::from(1 << 20),
        t.body_errors,
        t.http_errors,
        t.conn_errors
    );
    let _ = writeln!(
        s,
        "| step | count | errors during | maps = live pods after | endpoint map entries | sockhash | meshd RSS MiB | largest queue B |"
    );
    let _ = writeln!(s, "|---|---:|---:|---|---:|---:|---:|---:|");
    let mut kinds: BTreeMap<StepKind, Vec<&Step>> = BTreeMap::new();
    for step in &r.steps {
        kinds.entry(step.kind).or_default().push(step);
    }
    for (kind, steps) in &kinds {
        let consistent = steps.iter().filter(|x| x.check.consistent()).count();
        let failed = steps.iter().filter(|x| x.failure.is_some()).count();
        let _ = writeln!(
            s,
            "| {}{} | {} | {} | {} of {} | {} | {} | {} | {} |",
            kind.name(),
            if failed > 0 {
                format!(" ({failed} FAILED)")
            } else {
                String::new()
            },
            steps.len(),
            steps.iter().map(|x| x.errors_during).sum::<u64>(),
            consistent,
            steps.len(),
            range(steps.iter().map(|x| x.check.map_entries), |v| v.to_string()),
            range(steps.iter().map(|x| x.check.sockhash), |v| v.to_string()),
            range(steps.iter().filter_map(|x| x.check.meshd_rss_kib), mib),
            steps
                .iter()
                .filter_map(|x| x.check.largest_queue_bytes)
                .max()
                .map_or("–".to_owned(), |b| b.to_string()),
        );
    }
    let samples = &r.samples;
    let _ = writeln!(
        s,
        "\nover time (a sample a second, {} samples): sockhash {}, meshd RSS {} MiB (first {}, last {}), largest queue max {} B, endpoint map entries {}",
        samples.len(),
        range(samples.iter().filter_map(|x| x.sockhash), |v| v.to_string()),
        range(samples.iter().filter_map(|x| x.meshd_rss_kib), mib),
        samples
            .iter()
            .find_map(|x| x.meshd_rss_kib)
            .map_or("–".to_owned(), mib),
        samples
            .iter()
            .rev()
            .find_map(|x| x.meshd_rss_kib)
            .map_or("–".to_owned(), mib),
        samples
            .iter()
            .filter_map(|x| x.largest_queue_bytes)
            .max()
            .unwrap_or(0),
        range(samples.iter().filter_map(|x| x.map_entries), |v| v
            .to_string()),
    );
    let e = &r.end;
    let _ = writeln!(
        s,
        "\nend: sockhash {} before the load, {} once the functions exited; after CNI DEL of every pod {} endpoint map entries, {} netns map entries, {} records ({} ms after the last DEL); memory bound switches {}; stage1 connections translated {}\n",
        e.sockhash_before,
        e.sockhash_after,
        e.map_entries_after_del,
        e.netns_entries_after_del,
        e.records_after_del,
        e.settled_ms,
        e.memory_bound_switches,
        e.translated_connections
    );
    if !t.first_errors.is_empty() {
        let _ = writeln!(s, "first errors:\n");
        for e in &t.first_errors {
            let _ = writeln!(s, "- {e}");
        }
        s.push('\n');
    }
    let _ = writeln!(s, "{}", r.verdict());
    s
}

/// The time series as a picture: requests/s, errors, the memory bound's
/// largest queue, the sockhash and meshd's RSS, with a mark at every step.
pub fn figure(r: &Report) -> plot::Timeline {
    let samples = &r.samples;
    let series = |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        samples.iter().filter_map(|x| Some((x.t, f(x)?))).collect()
    };
    let rps: Vec<(f64, f64)> = samples
        .windows(2)
        .map(|w| {
            let dt = (w[1].t - w[0].t).max(1e-3);
            (w[1].t, (w[1].requests - w[0].requests) as f64 / dt)
        })
        .collect();
    let line = |name: &str, i: usize, points: Vec<(f64, f64)>| plot::Line {
        name: name.to_owned(),
        color: plot::color(i),
        points,
    };
    let panel = |title: &str, decimals: usize, lines: Vec<plot::Line>| plot::LinePanel {
        title: title.to_owned(),
        decimals,
        lines,
    };
    let kinds: Vec<&str> = SCHEDULE.map(StepKind::name).to_vec();
    plot::Timeline {
        title: "spright soak with churn".to_owned(),
        panels: vec![
            panel(
                "requests/s (verified replies)",
                0,
                vec![line("requests/s", 2, rps)],
            ),
            panel(
                "errors so far",
                0,
                vec![
                    line("wrong bodies", 5, series(&|x| Some(x.body_errors as f64))),
                    line("HTTP errors", 1, series(&|x| Some(x.http_errors as f64))),
                    line(
                        "connection errors",
                        4,
                        series(&|x| Some(x.conn_errors as f64)),
                    ),
                ],
            ),
            panel(
                "memory bound: largest queue of a chain socket, KiB",
                1,
                vec![line(
                    "largest queue",
                    3,
                    series(&|x| x.largest_queue_bytes.map(|b| b as f64 / 1024.0)),
                )],
            ),
            panel(
                "sockhash entries",
                0,
                vec![line(
                    "sockhash",
                    2,
                    series(&|x| x.sockhash.map(|n| n as f64)),
                )],
            ),
            panel(
                "meshd RSS, MiB",
                1,
                vec![line(
                    "meshd RSS",
                    1,
                    series(&|x| x.meshd_rss_kib.map(|k| k as f64 / 1024.0)),
                )],
            ),
        ],
        marks: r.steps.iter().map(|s| s.at_s).collect(),
        caption: vec![
            format!(
                "{} s, {} connections, {} requests/s asked, {} B bodies; vertical lines: steps every {} s ({})",
                r.spec.seconds,
                r.spec.connections,
                r.spec.rate,
                r.spec.payload,
                r.spec.step_secs,
                kinds.join(", ")
            ),
            match r.problems().len() {
                0 => "verdict: PASS: no errors, no leak".to_owned(),
                n => format!("verdict: FAIL: {n} problems (soak.md lists them)"),
            },
        ],
    }
}

/// Where the soak writes its artefacts.
pub fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/soak")
}

/// Writes `soak.md`, `soak.json`, `soak.svg` and `soak.png` into `dir`;
/// the pictures last (they need a font, see [`plot`]).
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("soak.md"), markdown(report))?;
    std::fs::write(dir.join("soak.json"), serde_json::to_string_pretty(report)?)?;
    let fig = figure(report);
    std::fs::write(dir.join("soak.svg"), plot::svg(&fig)?)?;
    plot::png(&fig, &dir.join("soak.png"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_distinct_letters() {
        let a = body(0, 1, 256);
        assert!(a.iter().all(u8::is_ascii_lowercase));
        assert_ne!(a, body(0, 2, 256));
        assert_ne!(a, body(1, 1, 256));
    }

    #[test]
    fn rss_is_read_from_proc_status() {
        assert_eq!(rss_kib("Name:\tmeshd\nVmRSS:\t   12345 kB\n"), Some(12345));
        assert_eq!(rss_kib("Name:\tmeshd\n"), None);
    }

    #[test]
    fn specs_are_bounded() {
        let ok = Spec {
            seconds: 120,
            connections: 4,
            payload: 1024,
            rate: 400,
            step_secs: 10,
            process_groups: false,
        };
        ok.validate().unwrap();
        for bad in [
            Spec {
                seconds: 59,
                ..ok.clone()
            },
            Spec {
                seconds: 181 * 60,
                ..ok.clone()
            },
            Spec {
                connections: 0,
                ..ok.clone()
            },
            Spec {
                step_secs: 1,
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err());
        }
    }

    fn report() -> Report {
        let check = Check {
            map_entries: 6,
            live_pod_ips: 6,
            netns_entries: 6,
            live_pods: 6,
            sockhash: 8,
            meshd_rss_kib: Some(20480),
            largest_queue_bytes: Some(0),
            ..Check::default()
        };
        let step = |kind, at_s| Step {
            kind,
            at_s,
            took_s: 1.0,
            detail: String::new(),
            failure: None,
            errors_during: 0,
            check: check.clone(),
        };
        Report {
            spec: Spec {
                seconds: 60,
                connections: 2,
                payload: 1024,
                rate: 100,
                step_secs: 10,
                process_groups: false,
            },
            steps: vec![step(StepKind::Join, 10.0), step(StepKind::Leave, 20.0)],
            samples: (0..60u32)
                .map(|i| Sample {
                    t: f64::from(i),
                    requests: u64::from(i) * 100,
                    sockhash: Some(8),
                    meshd_rss_kib: Some(20480),
                    largest_queue_bytes: Some(0),
                    map_entries: Some(6),
                    ..Sample::default()
                })
                .collect(),
            totals: Totals {
                requests: 6000,
                verified_bytes: 6000 * 1024,
                ..Totals::default()
            },
            end: Final::default(),
        }
    }

    #[test]
    fn a_clean_run_passes_and_a_leak_fails() {
        let mut r = report();
        assert!(r.problems().is_empty(), "{:?}", r.problems());
        assert!(markdown(&r).contains("verdict: PASS"), "{}", markdown(&r));
        assert!(markdown(&r).contains("| join | 1 | 0 | 1 of 1 | 6 | 8 | 20.0 | 0 |"));
        r.steps[1].check.stale = vec!["10.213.0.9".parse().unwrap()];
        r.end.sockhash_after = 2;
        r.totals.body_errors = 1;
        let p = r.problems();
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(r.verdict().starts_with("verdict: FAIL"));
        let back: Report = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.problems(), p);
    }

    #[test]
    fn plots_a_run() {
        let svg = plot::svg(&figure(&report())).unwrap();
        roxmltree::Document::parse(&svg).unwrap();
        assert!(svg.contains("requests/s (verified replies)"));
    }
}
