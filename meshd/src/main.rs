//! meshd: spright's node agent.

#![forbid(unsafe_code)]

use std::{process::ExitCode, sync::Arc, time::Duration};

use clap::Parser as _;
use meshd::{agent::Agent, config::Config, http, view::Reader, watch as watch_dirs};
use tokio::sync::{mpsc, watch};
use tracing::{error, info};

fn main() -> ExitCode {
    if let Some(code) = meshd::selftest::child_main_if_requested() {
        return code;
    }
    let config = Config::parse();
    if config.print_config {
        println!("{:#}", config.effective_json());
        return ExitCode::SUCCESS;
    }
    if config.selftest_only {
        let report = meshd::selftest::run(&config.bpffs);
        let policy = meshd::families::decide(&report.families, &config.accept_unsafe_families);
        println!(
            "{:#}",
            serde_json::json!({
                "kernel": meshd::selftest::kernel_release(),
                "selftest": report,
                "redirects": policy,
            })
        );
        return ExitCode::SUCCESS;
    }
    let filter = match tracing_subscriber::EnvFilter::try_new(&config.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "meshd: invalid --log / SPRIGHT_LOG value {:?}: {e}",
                config.log
            );
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "starting the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "meshd failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    info!(config = %config.effective_json(), "starting");
    let config = Arc::new(config);
    let watched_dirs = vec![
        spright_endpoint::records_dir(&config.state_dir),
        config.services_dir(),
        config.pods_dir(),
    ];
    let every = config.rescan_interval();
    let kube = meshd::kube_source::client(config.kubernetes, config.kubeconfig.as_deref()).await?;
    // Sources → reconciler (one trigger slot: a burst costs one pass) →
    // snapshot → readers.
    let (trigger, triggers) = mpsc::channel(1);
    let (api_tx, api_rx) = watch::channel(None);
    let agent = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let mut a = Agent::start(config);
            a.reconcile(None);
            a
        })
        .await
        .map_err(meshd::error::Error::Start)?
    };
    let (snapshot_tx, snapshot_rx) = watch::channel(agent.snapshot());
    let reconciler = {
        let api = api_rx.clone();
        std::thread::Builder::new()
            .name("reconciler".into())
            .spawn(move || agent.run(triggers, &api, &snapshot_tx))?
    };
    let membound = Arc::new(meshd::membound::Stats::default());
    let flows = Arc::new(meshd::flows::Flows::new(
        usize::try_from(config.flow_history).unwrap_or(usize::MAX),
    ));
    let _membound = meshd::membound::spawn(
        &config,
        snapshot_rx.clone(),
        membound.clone(),
        flows.clone(),
    );
    let _flows = meshd::flows::run(
        flows.clone(),
        snapshot_rx.clone(),
        config.bpffs.clone(),
        config.flow_events,
    )?;
    let _scan = if config.flow_events {
        Some(meshd::flows::scan_before_attach(
            flows.clone(),
            snapshot_rx.clone(),
            config.bpffs.clone(),
            Duration::from_secs(5),
        )?)
    } else {
        None
    };
    let reader = Reader {
        snapshot: snapshot_rx,
        api: api_rx,
        config: config.clone(),
        membound,
        flows,
        maps: Arc::default(),
    };
    let api = bind("--api-addr", config.api_addr).await?;
    info!(addr = %config.api_addr, "serving the local API: /status /config /v1/membership /v1/members /v1/flows /metrics /healthz /readyz");
    let metrics = match config.metrics_addr {
        Some(addr) => {
            let l = bind("--metrics-addr", addr).await?;
            info!(addr = %addr, "serving /metrics /healthz /readyz");
            Some(l)
        }
        None => None,
    };
    let metrics_server = async {
        match metrics {
            Some(l) => axum::serve(l, http::metrics_router(reader.clone())).await,
            None => std::future::pending().await,
        }
    };
    let server = axum::serve(api, http::router(reader.clone()));
    let api_watch = {
        let trigger = trigger.clone();
        let node = config.node_name.clone();
        let watch_nodes = config.manages_pod_network();
        let lonely_secs = config.lonely_pod_secs;
        let snapshot_events = reader.snapshot.clone();
        let preload = (config.preload_check, config.host_proc.clone());
        async move {
            match kube {
                Some(client) => {
                    // Events on this node's Pods (the API source watches
                    // those only with a node name).
                    if let Some(node) = node.clone() {
                        tokio::spawn(meshd::events::run(
                            client.clone(),
                            node,
                            api_tx.subscribe(),
                            snapshot_events,
                            Duration::from_secs(lonely_secs),
                            preload,
                        ));
                    }
                    meshd::kube_source::run(client, node, watch_nodes, api_tx, trigger).await;
                }
                None => std::future::pending().await,
            }
        }
    };
    let watcher = watch_dirs::run(trigger, watched_dirs, every);
    tokio::select! {
        r = server => r.map_err(meshd::error::Error::Serve)?,
        r = metrics_server => r.map_err(meshd::error::Error::Serve)?,
        () = watcher => {}
        () = api_watch => {}
        () = shutdown_signal() => info!("shutting down; pinned programs and maps stay, flows keep their acceleration"),
    }
    drop(reconciler);
    Ok(())
}

async fn bind(
    flag: &'static str,
    addr: std::net::SocketAddr,
) -> Result<tokio::net::TcpListener, meshd::error::Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| meshd::error::Error::Bind { flag, addr, source })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
