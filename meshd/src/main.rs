//! meshd: spright's node agent.

use std::{
    process::ExitCode,
    sync::{Arc, Mutex},
};

use clap::Parser as _;
use meshd::{agent::Agent, config::Config, http, watch};
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
    let addr = config.metrics_addr;
    let watched_dirs = vec![
        spright_endpoint::records_dir(&config.state_dir),
        config.services_dir(),
        config.pods_dir(),
    ];
    let node = config.node_name.clone();
    let every = config.rescan_interval();
    let kube = meshd::kube_source::client(config.kubernetes, config.kubeconfig.as_deref()).await?;
    let agent = tokio::task::spawn_blocking(move || {
        let mut a = Agent::start(config);
        a.reconcile();
        a
    })
    .await?;
    let agent = Arc::new(Mutex::new(agent));
    let _membound = meshd::membound::spawn(agent.clone());
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| meshd::error::Error::Bind { addr, source })?;
    info!(addr = %addr, "serving /metrics /status /healthz /readyz /config");
    let server = axum::serve(listener, http::router(agent.clone()));
    let api_watch = {
        let agent = agent.clone();
        async move {
            match kube {
                Some(client) => {
                    agent.lock().expect("agent lock").api_objects_mut();
                    meshd::kube_source::run(agent, client, node).await;
                }
                None => std::future::pending().await,
            }
        }
    };
    let watcher = watch::run(agent, watched_dirs, every);
    tokio::select! {
        r = server => r.map_err(meshd::error::Error::Serve)?,
        () = watcher => {}
        () = api_watch => {}
        () = shutdown_signal() => info!("shutting down; pinned programs and maps stay, flows keep their acceleration"),
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
