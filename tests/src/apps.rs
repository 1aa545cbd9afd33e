//! `cargo xtask bench apps`: unmodified programs from the distribution
//! between two pods of a simulated node, on the reference `bridge` CNI
//! (`reference`) and on spright with both pods in one chain (`spright-on`,
//! sockets redirected):
//!
//! - `redis-server` loaded by `redis-benchmark` (SET and GET, 8
//!   connections), without pipelining and with `-P 16`;
//! - `nginx` (nginx-light) loaded by `wrk` (8 connections), a 1 KiB file
//!   and a 1 MiB file.
//!
//! The server runs pinned to CPU 0, the client to the last CPU; both in
//! the node's cgroup (spright) or a cgroup of their own (reference), so
//! their CPU is accounted the same way. CPU per operation is the whole
//! machine's busy time (`/proc/stat`) during the case's window over its
//! operations. Modes run in rotated rounds like the chain benchmark; the
//! table gives per case the median (min–max) of each mode and the paired
//! ratios spright / reference.

use std::{
    fmt::Write as _,
    io::Read as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::{
    chain::{self, Mode, PodInfo},
    cni::Node,
    meshd::Meshd,
    plot,
    procgroup::{GroupChild, check_interrupted},
    sandbox::{Cgroup, Peer},
    stats::{self, Spread},
};

const REDIS_PORT: u16 = 6379;
const HTTP_PORT: u16 = 8080;
const SMALL: usize = 1024;
const LARGE: usize = 1 << 20;

/// The two set-ups compared.
pub const MODES: [Mode; 2] = [Mode::Reference, Mode::SprightOn];

/// What to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    /// Client connections (redis-benchmark `-c`, wrk `-c`).
    pub connections: usize,
    /// Requests per redis-benchmark test (`-n`), without pipelining; ×10
    /// with `-P 16`.
    pub redis_requests: u64,
    /// wrk's duration per nginx case.
    pub seconds: u64,
}

impl Spec {
    pub fn validate(&self) -> anyhow::Result<()> {
        ensure!(
            (1..=256).contains(&self.connections),
            "--connections must be 1 to 256"
        );
        ensure!(
            (1000..=10_000_000).contains(&self.redis_requests),
            "--redis-requests must be 1000 to 10000000"
        );
        ensure!(
            (1..=300).contains(&self.seconds),
            "--duration must be 1 to 300 s"
        );
        Ok(())
    }
}

/// One case's figures in one round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaseResult {
    pub case: String,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Whole-machine busy time per operation.
    pub cpu_us_per_op: f64,
    /// Share of the machine used by anything but the benchmark.
    pub other_cpu_share: f64,
    pub errors: u64,
}

/// One mode in one round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    pub mode: Mode,
    pub cases: Vec<CaseResult>,
    /// Bytes redirected socket to socket (spright-on).
    pub redirected_bytes: u64,
}

/// Every round of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub spec: Spec,
    pub modes: Vec<Mode>,
    /// `rounds[i][j]`: round `i`'s outcome of `modes[j]`.
    pub rounds: Vec<Vec<Outcome>>,
}

/// The cases, in order: (name, client).
fn cases(spec: &Spec) -> Vec<(String, Client)> {
    let n = spec.redis_requests;
    vec![
        (
            "redis SET".into(),
            Client::Redis {
                test: "set",
                pipeline: 1,
                n,
            },
        ),
        (
            "redis GET".into(),
            Client::Redis {
                test: "get",
                pipeline: 1,
                n,
            },
        ),
        (
            "redis SET -P 16".into(),
            Client::Redis {
                test: "set",
                pipeline: 16,
                n: n * 10,
            },
        ),
        (
            "redis GET -P 16".into(),
            Client::Redis {
                test: "get",
                pipeline: 16,
                n: n * 10,
            },
        ),
        ("nginx 1 KiB".into(), Client::Wrk { path: "small.bin" }),
        ("nginx 1 MiB".into(), Client::Wrk { path: "large.bin" }),
    ]
}

#[derive(Clone, Copy)]
enum Client {
    Redis {
        test: &'static str,
        pipeline: u32,
        n: u64,
    },
    Wrk {
        path: &'static str,
    },
}

/// Runs every case under `mode` on a fresh node.
pub fn run(spec: &Spec, mode: Mode, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Outcome> {
    spec.validate()?;
    ensure!(
        MODES.contains(&mode),
        "bench apps runs reference and spright-on"
    );
    let ncpu = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let (server_cpu, client_cpu) = ("0".to_owned(), (ncpu - 1).to_string());
    let mut node = Node::new("ap")?;
    let spright = mode == Mode::SprightOn;
    let ref_cgroup = if spright {
        None
    } else {
        Some(Cgroup::create(&format!("{}-ref", node.name))?)
    };
    let cgroup = ref_cgroup
        .as_ref()
        .map_or(node.cgroup.path.clone(), |c| c.path.clone());
    let mut pods: Vec<PodInfo> = Vec::new();
    for name in ["server", "client"] {
        let index = node.add_pod()?;
        pods.push(chain::add_pod(&node, mode, index, name, spright)?);
    }
    let meshd = if spright {
        Some(Meshd::start(
            &chain::node_placement(&node),
            &node.state_dir(),
        )?)
    } else {
        None
    };
    let (server, client) = (&pods[0], &pods[1]);
    progress(&format!(
        "{}: server pod {}, client pod {}",
        mode.name(),
        server.ip,
        client.ip
    ));

    // The servers, unmodified, in the server pod.
    let dir = node.dir.path().to_owned();
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("small.bin"), vec![b'x'; SMALL])?;
    std::fs::write(www.join("large.bin"), vec![b'x'; LARGE])?;
    let nginx_conf = dir.join("nginx.conf");
    std::fs::write(&nginx_conf, nginx_config(&dir, server.ip, &www))?;
    let mut servers = vec![
        in_pod(
            &node,
            server.index,
            &cgroup,
            &server_cpu,
            &format!(
                "redis-server --bind {} --port {REDIS_PORT} --save '' --appendonly no --protected-mode no \
                 --daemonize no --dir {}",
                server.ip,
                dir.display()
            ),
        )?,
        in_pod(
            &node,
            server.index,
            &cgroup,
            &server_cpu,
            &format!(
                "nginx -c {} -p {} -e {}/nginx-error.log",
                nginx_conf.display(),
                dir.display(),
                dir.display()
            ),
        )?,
    ];
    for s in &servers {
        ensure!(s.line(chain_t())? == "ready", "a server did not start");
    }
    chain::wait_listening(&node, server.index, REDIS_PORT)?;
    chain::wait_listening(&node, server.index, HTTP_PORT)?;

    let redirected_before = chain::chain_redirected(meshd.as_ref())?;
    let helpers: Vec<u32> = meshd.iter().map(Meshd::pid).collect();
    let own_helpers = || -> anyhow::Result<u64> {
        helpers
            .iter()
            .try_fold(chain::proc_cpu_us("self")?, |sum, pid| {
                Ok::<_, anyhow::Error>(sum + chain::proc_cpu_us(&pid.to_string())?)
            })
    };
    let mut results = Vec::new();
    for (name, c) in cases(spec) {
        check_interrupted()?;
        let (script, timeout) = match c {
            Client::Redis { test, pipeline, n } => (
                format!(
                    "redis-benchmark -h {} -p {REDIS_PORT} -c {} -n {n} -P {pipeline} -t {test} --csv",
                    server.ip, spec.connections
                ),
                Duration::from_mins(2),
            ),
            Client::Wrk { path } => (
                format!(
                    "wrk -t1 -c{} -d{}s --latency http://{}:{HTTP_PORT}/{path}",
                    spec.connections, spec.seconds, server.ip
                ),
                Duration::from_secs(spec.seconds + 60),
            ),
        };
        let cg_before = chain::cpu_usage_us(&cgroup)?;
        let helpers_before = own_helpers()?;
        let window = Instant::now();
        let node_before = chain::node_busy_us()?;
        let out = run_in_pod(&node, client.index, &cgroup, &client_cpu, &script, timeout)
            .with_context(|| format!("{name} ({})", mode.name()))?;
        let node_busy = chain::node_busy_us()? - node_before;
        let window_us = u64::try_from(window.elapsed().as_micros()).unwrap_or(u64::MAX);
        let own = (chain::cpu_usage_us(&cgroup)? - cg_before)
            + own_helpers()?.saturating_sub(helpers_before);
        let (ops, mut r) = match c {
            Client::Redis { test, n, .. } => (n, parse_redis_csv(&out, test)?),
            Client::Wrk { .. } => {
                let o = chain::parse_wrk(&out, mode)?;
                (
                    o.requests,
                    CaseResult {
                        case: String::new(),
                        ops_per_s: o.requests_per_s,
                        p50_ms: o.p50_ms,
                        p99_ms: o.p99_ms,
                        cpu_us_per_op: 0.0,
                        other_cpu_share: 0.0,
                        errors: o.errors,
                    },
                )
            }
        };
        r.case = name;
        r.cpu_us_per_op = node_busy as f64 / ops.max(1) as f64;
        r.other_cpu_share = stats::other_cpu_share(node_busy, own, window_us, ncpu);
        progress(&format!(
            "{}: {:<16} {:>9.0} ops/s  p50 {:.3} ms  p99 {:.3} ms  {:.1} µs CPU/op  other processes {:.0}%",
            mode.name(),
            r.case,
            r.ops_per_s,
            r.p50_ms,
            r.p99_ms,
            r.cpu_us_per_op,
            r.other_cpu_share * 100.0
        ));
        results.push(r);
    }
    let redirected_bytes = chain::chain_redirected(meshd.as_ref())? - redirected_before;
    if spright {
        ensure!(
            redirected_bytes > 0,
            "spright-on redirected nothing: the pods' sockets were not accelerated"
        );
    }

    servers.clear();
    chain::del_pods(&node, mode, &pods)?;
    drop(meshd);
    drop(ref_cgroup);
    node.pods.clear();
    Ok(Outcome {
        mode,
        cases: results,
        redirected_bytes,
    })
}

fn chain_t() -> Duration {
    Duration::from_secs(30)
}

/// nginx in the foreground, one worker, no master, everything under `dir`.
fn nginx_config(dir: &Path, ip: std::net::IpAddr, www: &Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 100000000;\n\
           client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n\
           fastcgi_temp_path {d}/nginx-fastcgi;\n  uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n\
           server {{ listen {ip}:{HTTP_PORT}; root {}; }}\n}}\n",
        www.display()
    )
}

/// `script` (a shell command) as a process of pod `index`: joins `cgroup`,
/// prints `ready`, then execs pinned to `cpu` in the pod's netns. Its own
/// process group, killed as a whole on drop.
fn in_pod(
    node: &Node,
    index: usize,
    cgroup: &Path,
    cpu: &str,
    script: &str,
) -> anyhow::Result<Peer> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "echo $$ > {}/cgroup.procs && echo ready && exec taskset -c {cpu} ip netns exec {} {script}",
        cgroup.display(),
        node.pods[index].name
    ));
    Peer::spawn_group(cmd)
}

/// Runs a client to completion in pod `index` (in `cgroup`, pinned to
/// `cpu`); its stdout. Killed with its group on timeout or Ctrl-C.
fn run_in_pod(
    node: &Node,
    index: usize,
    cgroup: &Path,
    cpu: &str,
    script: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec taskset -c {cpu} ip netns exec {} {script}",
            cgroup.display(),
            node.pods[index].name
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut g = GroupChild::spawn(&mut cmd).context("starting the client")?;
    let mut stdout = g.child().stdout.take().context("client stdout")?;
    let mut stderr = g.child().stderr.take().context("client stderr")?;
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        // try_wait reaps, so kill the rest of the group before asking.
        if let Some(status) = g.child().try_wait()? {
            let (out, err) = (
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default(),
            );
            ensure!(status.success(), "`{script}` failed ({status}): {err}");
            // Reaped: the group id may be reused, so never killpg it now.
            drop(g.take());
            return Ok(out);
        }
        if Instant::now() > deadline {
            bail!("`{script}` did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// redis-benchmark's `--csv`: a header row naming the columns, then one row
/// per test (a progress line ending in `\r` may precede a row).
fn parse_redis_csv(out: &str, test: &str) -> anyhow::Result<CaseResult> {
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter_map(|l| l.rsplit('\r').next())
        .filter(|l| l.starts_with('"'))
        .map(|l| l.split(',').map(|f| f.trim().trim_matches('"')).collect())
        .collect();
    let header = rows
        .iter()
        .find(|r| r.first() == Some(&"test"))
        .context("no header in redis-benchmark's CSV")?;
    let row = rows
        .iter()
        .find(|r| r.first().is_some_and(|t| t.eq_ignore_ascii_case(test)))
        .with_context(|| format!("no {test} row in redis-benchmark's CSV: {out:?}"))?;
    let col = |name: &str| -> anyhow::Result<f64> {
        let i = header
            .iter()
            .position(|h| *h == name)
            .with_context(|| format!("no {name} column in redis-benchmark's CSV"))?;
        row.get(i)
            .context("short row")?
            .parse()
            .with_context(|| format!("{name} in redis-benchmark's CSV"))
    };
    Ok(CaseResult {
        case: String::new(),
        ops_per_s: col("rps")?,
        p50_ms: col("p50_latency_ms")?,
        p99_ms: col("p99_latency_ms")?,
        cpu_us_per_op: 0.0,
        other_cpu_share: 0.0,
        errors: 0,
    })
}

impl Report {
    fn baseline(&self) -> usize {
        self.modes
            .iter()
            .position(|m| *m == Mode::Reference)
            .unwrap_or(0)
    }

    fn case_names(&self) -> Vec<String> {
        self.rounds
            .first()
            .and_then(|r| r.first())
            .map(|o| o.cases.iter().map(|c| c.case.clone()).collect())
            .unwrap_or_default()
    }

    /// Mode `j`'s values of `metric` for case `k`, round by round.
    fn values(&self, j: usize, k: usize, metric: fn(&CaseResult) -> f64) -> Vec<f64> {
        self.rounds
            .iter()
            .filter_map(|r| r.get(j)?.cases.get(k))
            .map(metric)
            .collect()
    }

    fn paired(&self, j: usize, k: usize, metric: fn(&CaseResult) -> f64) -> Option<Spread> {
        Spread::of(&stats::paired_ratios(
            &self.values(j, k, metric),
            &self.values(self.baseline(), k, metric),
        ))
    }

    /// Busy windows and noisy comparisons, as in the chain benchmark.
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
            for (k, case) in self.case_names().iter().enumerate() {
                let name = format!(
                    "{case}: {} / {} ops/s",
                    mode.name(),
                    self.modes[base].name()
                );
                out.extend(
                    self.paired(j, k, |c| c.ops_per_s)
                        .and_then(|p| stats::noisy_warning(&name, &p)),
                );
            }
        }
        out
    }

    /// "K of N measured windows (up to X%: round R, MODE, CASE)" when some
    /// window's other-process CPU passed [`stats::BUSY_SHARE`].
    fn busy(&self) -> Option<String> {
        let windows: Vec<((usize, Mode, &CaseResult), f64)> = self
            .rounds
            .iter()
            .enumerate()
            .flat_map(|(i, r)| {
                r.iter().flat_map(move |o| {
                    o.cases
                        .iter()
                        .map(move |c| ((i, o.mode, c), c.other_cpu_share))
                })
            })
            .collect();
        stats::busy_windows(&windows, |(round, mode, c)| {
            format!("round {}, {}, {}", round + 1, mode.name(), c.case)
        })
    }

    fn parameters(&self) -> String {
        format!(
            "two pods on one node, server on CPU 0, client on the last CPU; {} connections; \
             redis-benchmark -n {} (-P 16: ×10); wrk {} s",
            self.spec.connections, self.spec.redis_requests, self.spec.seconds,
        )
    }

    fn rounds_line(&self) -> String {
        format!(
            "{} round{}, modes interleaved and rotated; bars: median of the paired ratios spright / reference \
             (round by round), whiskers: min–max",
            self.rounds.len(),
            if self.rounds.len() == 1 { "" } else { "s" }
        )
    }
}

/// The table: per case and mode the median (min–max) over the rounds, and
/// spright / reference as paired ratios.
pub fn markdown(report: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}; {}\n", report.parameters(), report.rounds_line());
    let _ = writeln!(
        s,
        "cells: median (min–max) over the rounds; `×`: median (min–max) of the paired ratios spright / \
         reference, each round's over the same round's; CPU: the whole machine's busy time per operation\n"
    );
    let _ = writeln!(
        s,
        "| case | mode | ops/s | × | p50 ms | p99 ms | CPU µs/op | × | errors |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let base = report.baseline();
    for (k, case) in report.case_names().iter().enumerate() {
        for (j, mode) in report.modes.iter().enumerate() {
            let spread =
                |m: fn(&CaseResult) -> f64, d| chain::cell(Spread::of(&report.values(j, k, m)), d);
            let ratio = |m: fn(&CaseResult) -> f64| {
                if j == base {
                    "–".to_owned()
                } else {
                    chain::cell(report.paired(j, k, m), 2)
                }
            };
            let errors: f64 = report.values(j, k, |c| c.errors as f64).iter().sum();
            let _ = writeln!(
                s,
                "| {case} | {} | {} | {} | {} | {} | {} | {} | {errors:.0} |",
                mode.describe(),
                spread(|c| c.ops_per_s, 0),
                ratio(|c| c.ops_per_s),
                spread(|c| c.p50_ms, 3),
                spread(|c| c.p99_ms, 3),
                spread(|c| c.cpu_us_per_op, 1),
                ratio(|c| c.cpu_us_per_op),
            );
        }
    }
    for w in report.warnings() {
        let _ = writeln!(s, "\n**warning**: {w}");
    }
    s
}

/// The paired ratios spright / reference per case: operations per second
/// and CPU per operation (one scale for every case, unlike raw ops/s).
pub fn figure(report: &Report) -> plot::Figure {
    let base = report.baseline();
    let j = usize::from(base == 0);
    let panel = |title: &str, metric: fn(&CaseResult) -> f64| plot::Panel {
        title: title.to_owned(),
        decimals: 2,
        groups: report
            .case_names()
            .iter()
            .enumerate()
            .filter_map(|(k, case)| {
                Some(plot::Group {
                    name: case.clone(),
                    color: plot::color(k),
                    bars: vec![plot::Bar {
                        label: None,
                        spread: report.paired(j, k, metric)?,
                    }],
                })
            })
            .collect(),
    };
    plot::Figure {
        title: "unmodified programs between two pods: spright / reference bridge CNI".to_owned(),
        panels: vec![
            panel(
                "operations/s, spright ÷ reference (higher is better)",
                |c| c.ops_per_s,
            ),
            panel(
                "CPU per operation, spright ÷ reference (lower is better)",
                |c| c.cpu_us_per_op,
            ),
        ],
        caption: [report.parameters(), report.rounds_line()]
            .into_iter()
            .chain(report.busy().map(|b| {
                format!(
                    "warning: busy machine, other processes above {:.0}% of the CPU in {b}",
                    stats::BUSY_SHARE * 100.0
                )
            }))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"
\"SET\",\"84033.61\",\"0.061\",\"0.024\",\"0.055\",\"0.095\",\"0.143\",\"0.807\"
\"GET\",\"90909.09\",\"0.055\",\"0.020\",\"0.051\",\"0.087\",\"0.127\",\"0.511\"
";

    #[test]
    fn parses_redis_benchmark_csv() {
        let get = parse_redis_csv(CSV, "get").unwrap();
        assert!((get.ops_per_s - 90909.09).abs() < 1e-6);
        assert!((get.p50_ms - 0.051).abs() < 1e-9);
        assert!((get.p99_ms - 0.127).abs() < 1e-9);
        assert!(parse_redis_csv(CSV, "lpush").is_err());
        assert!(parse_redis_csv("nonsense", "get").is_err());
    }

    #[test]
    fn nginx_config_keeps_everything_in_the_run_directory() {
        let c = nginx_config(
            Path::new("/tmp/x"),
            "10.213.0.2".parse().unwrap(),
            Path::new("/tmp/x/www"),
        );
        assert!(c.contains("daemon off;"));
        assert!(c.contains("listen 10.213.0.2:8080;"));
        assert!(c.contains("pid /tmp/x/nginx.pid;"));
        assert!(!c.contains("/var/"));
    }

    fn case(name: &str, ops: f64) -> CaseResult {
        CaseResult {
            case: name.to_owned(),
            ops_per_s: ops,
            p50_ms: 0.1,
            p99_ms: 0.2,
            cpu_us_per_op: 10.0,
            other_cpu_share: 0.01,
            errors: 0,
        }
    }

    #[test]
    fn table_and_picture_pair_rounds() {
        let spec = Spec {
            connections: 8,
            redis_requests: 100_000,
            seconds: 5,
        };
        let rounds = [(100.0, 150.0), (200.0, 260.0), (150.0, 210.0)]
            .into_iter()
            .map(|(a, b)| {
                vec![
                    Outcome {
                        mode: Mode::Reference,
                        cases: vec![case("redis GET", a)],
                        redirected_bytes: 0,
                    },
                    Outcome {
                        mode: Mode::SprightOn,
                        cases: vec![case("redis GET", b)],
                        redirected_bytes: 1,
                    },
                ]
            })
            .collect();
        let r = Report {
            spec,
            modes: MODES.to_vec(),
            rounds,
        };
        let md = markdown(&r);
        // Paired ratios 1.5, 1.3, 1.4.
        assert!(
            md.contains("| redis GET | spright, accelerated | 210 (150–260) | 1.40 (1.30–1.50) |"),
            "{md}"
        );
        let mut busy = r.clone();
        busy.rounds[2][1].cases[0].other_cpu_share = 0.77;
        for report in [&r, &busy] {
            let fig = figure(report);
            let svg = plot::svg(&fig).unwrap();
            let boxes = plot::svg_check::text_boxes(&svg).unwrap();
            plot::svg_check::assert_readable(&fig, &boxes);
            assert!(boxes.iter().any(|b| b.text == "1.40"));
        }
        let fig = figure(&busy);
        assert!(
            fig.caption.iter().any(|l| l.starts_with(
                "warning: busy machine, other processes above 10% of the CPU in 1 of 6"
            )),
            "{:?}",
            fig.caption
        );
    }
}
