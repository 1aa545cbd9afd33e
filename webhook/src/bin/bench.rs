//! spright-webhook-bench: admission reviews over HTTPS against the real
//! `spright-webhook` binary (the one next to this executable), from
//! concurrent clients with one keep-alive TLS connection each, as API
//! server replicas hold them.
//!
//! Two workloads in the same run, same pods otherwise:
//! - baseline: Pods without `spright.dev/chain` (allowed, no patch: the
//!   cost of TLS, HTTP and parsing a review);
//! - chain: Pods with `spright.dev/chain`, `spright.dev/shm` and a second
//!   container (label, volume, two mounts, affinity: a 5-operation patch).
//!
//! Every answer is checked (uid, allowed, patch present or not); any failed
//! review fails the run. Prints p50/p99/max latency and throughput.
//! `cargo xtask bench webhook` runs it in release.

#![forbid(unsafe_code)]

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use serde_json::json;
use spright_webhook::{
    client::Client,
    review::{AdmissionRequest, AdmissionReview, GroupVersionKind},
    tls,
};

#[derive(Parser)]
#[command(name = "spright-webhook-bench", about)]
struct Args {
    /// Reviews per workload
    #[arg(long, default_value_t = 2000)]
    reviews: usize,
    /// Concurrent clients (one connection each)
    #[arg(long, default_value_t = 16)]
    clients: usize,
}

fn pod(i: usize, chain: bool) -> serde_json::Value {
    let annotations = if chain {
        json!({ "spright.dev/chain": "bench", "spright.dev/function": "f", "spright.dev/shm": "64Mi" })
    } else {
        json!({ "prometheus.io/scrape": "true" })
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "generateName": "fn-", "namespace": "bench",
                      "labels": { "app": "fn", "pod-template-hash": format!("{i:x}") },
                      "annotations": annotations },
        "spec": {
            "containers": [
                { "name": "main", "image": "registry.k8s.io/e2e-test-images/agnhost:2.53",
                  "args": ["netexec", "--http-port=8080"],
                  "ports": [{ "containerPort": 8080, "name": "http" }],
                  "resources": { "requests": { "cpu": "50m", "memory": "32Mi" } } },
                { "name": "log", "image": "busybox:1.36", "args": ["sleep", "infinity"] },
            ],
            "securityContext": { "runAsNonRoot": true, "runAsUser": 65534 },
        },
    })
}

struct Run {
    latencies: Vec<Duration>,
    failures: Vec<String>,
    wall: Duration,
}

async fn workload(client: &Client, args: &Args, chain: bool) -> anyhow::Result<Run> {
    let per_client = args.reviews.div_ceil(args.clients);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let client = client.clone();
        let n = per_client.min(args.reviews.saturating_sub(c * per_client));
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(n);
            let mut failures = Vec::new();
            let mut conn = match client.connect().await {
                Ok(c) => c,
                Err(e) => return (latencies, vec![format!("client {c}: connect: {e}")]),
            };
            for i in 0..n {
                let uid = format!("00000000-0000-4000-8000-{c:04x}{i:08x}");
                let review = AdmissionReview::of_request(AdmissionRequest {
                    uid: uid.clone(),
                    kind: GroupVersionKind::pod(),
                    namespace: Some("bench".into()),
                    operation: "CREATE".into(),
                    object: Some(pod(i, chain)),
                    ..AdmissionRequest::default()
                });
                let t = Instant::now();
                let out = conn.review(&review).await;
                latencies.push(t.elapsed());
                let ok = match &out {
                    Ok(r) => r
                        .response
                        .as_ref()
                        .is_some_and(|r| r.uid == uid && r.allowed && r.patch.is_some() == chain),
                    Err(_) => false,
                };
                if !ok {
                    failures.push(format!("client {c} review {i}: {out:?}"));
                }
            }
            (latencies, failures)
        }));
    }
    let mut run = Run {
        latencies: Vec::new(),
        failures: Vec::new(),
        wall: Duration::ZERO,
    };
    for t in tasks {
        let (l, f) = t.await.context("client task")?;
        run.latencies.extend(l);
        run.failures.extend(f);
    }
    run.wall = start.elapsed();
    run.latencies.sort_unstable();
    Ok(run)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an index into a non-empty slice"
    )]
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.clients == 0 || args.reviews == 0 {
        bail!("--reviews and --clients must be at least 1");
    }
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("spright-webhook");
    if !bin.exists() {
        bail!(
            "{} not found; build the workspace's binaries",
            bin.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let names = tls::service_names("spright-webhook", "spright-system");
    let pair = tls::self_signed(&names, Duration::from_hours(1))?;
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &pair.serving.cert)?;
    std::fs::write(&key, &pair.serving.key)?;
    let mut child = Command::new(&bin)
        .args(["--addr", "127.0.0.1:0", "--log", "warn", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
    let mut line = String::new();
    let addr: Option<SocketAddr> = loop {
        line.clear();
        if stderr.read_line(&mut line)? == 0 {
            break None;
        }
        if let Some(a) = line.trim().strip_prefix("spright-webhook listening on ") {
            break a.parse().ok();
        }
    };
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let result = (|| {
        let addr = addr.context("spright-webhook did not start")?;
        let client = Client::new(pair.ca_pem.as_bytes(), addr, &names[0])?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        // Warm-up of both workloads: connections, allocator, caches.
        let warm_up = Args {
            reviews: args.clients * 16,
            clients: args.clients,
        };
        for chain in [false, true] {
            rt.block_on(workload(&client, &warm_up, chain))?;
        }
        println!(
            "spright-webhook: {} reviews per workload from {} concurrent HTTPS clients (keep-alive)",
            args.reviews, args.clients
        );
        println!(
            "{:<28} {:>10} {:>10} {:>10} {:>12}",
            "workload", "p50", "p99", "max", "reviews/s"
        );
        let mut failed = 0;
        for (name, chain) in [
            ("baseline (no annotation)", false),
            ("chain pod (5-op patch)", true),
        ] {
            let run = rt.block_on(workload(&client, &args, chain))?;
            println!(
                "{:<28} {:>10} {:>10} {:>10} {:>12.0}",
                name,
                ms(percentile(&run.latencies, 0.50)),
                ms(percentile(&run.latencies, 0.99)),
                ms(*run.latencies.last().unwrap_or(&Duration::ZERO)),
                run.latencies.len() as f64 / run.wall.as_secs_f64()
            );
            for f in run.failures.iter().take(5) {
                eprintln!("FAILED {f}");
            }
            failed += run.failures.len();
        }
        if failed > 0 {
            bail!("{failed} reviews failed");
        }
        println!("failures: 0");
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
