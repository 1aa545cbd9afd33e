#![forbid(unsafe_code)]

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, anyhow};
use clap::Parser as _;
use shm_csi::{
    config::Config,
    csi::{identity_server::IdentityServer, node_server::NodeServer},
    membership::Membership,
    regions::Regions,
    service::{Identity, Node, Plugin},
};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&config.log)?)
        .with_writer(std::io::stderr)
        .init();
    let limits = config.limits().map_err(|e| anyhow!(e))?;
    let (regions, found) = Regions::open(&config.region_root)
        .with_context(|| format!("opening region root {}", config.region_root.display()))?;
    tracing::info!(root = %regions.root().display(), volumes = found.volumes, dropped = found.dropped,
        regions = found.regions, freed = found.freed, "rediscovered state");
    let plugin = Arc::new(Plugin::new(
        config.node_id.clone(),
        limits,
        Membership {
            meshd_addr: config.meshd_addr.clone(),
            state_dir: config.state_dir.clone(),
            node: Some(config.node_id.clone()),
            timeout: Duration::from_secs(5),
            wait: config.membership_wait(),
        },
        regions,
    ));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(config, plugin))
}

async fn serve(config: Config, plugin: Arc<Plugin>) -> anyhow::Result<()> {
    let path = &config.endpoint;
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    tracing::info!(socket = %path.display(), node.id = %config.node_id, "serving CSI");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
    };
    let incoming = UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(Identity))
        .add_service(NodeServer::new(Node(plugin)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serving gRPC")?;
    let _ = std::fs::remove_file(path);
    Ok(())
}
