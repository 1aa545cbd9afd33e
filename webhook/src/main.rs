//! spright-webhook: see the crate docs and README.md.

#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::Parser as _;
use spright_webhook::{
    ca_bundle,
    config::Config,
    server::{self, App},
    tls::{self, CertStore, PemPair},
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log)
                .with_context(|| format!("--log {:?}", config.log))?,
        )
        .with_writer(std::io::stderr)
        .init();
    let provider = tls::provider();
    let app = App::new(!config.self_signed);
    let (store, rotation) = if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        let pair = PemPair::read(cert, key)?;
        let identity = pair.certified_key(&provider).with_context(|| {
            format!(
                "--tls-cert {} / --tls-key {}",
                cert.display(),
                key.display()
            )
        })?;
        let store = CertStore::new(identity);
        let metrics = app.metrics.clone();
        tokio::spawn(tls::watch_files(
            store.clone(),
            cert.clone(),
            key.clone(),
            pair,
            config.reload_secs,
            move || metrics.certificate_changed(),
        ));
        (store, None)
    } else {
        let names = tls::service_names(&config.service, &config.namespace);
        let first = tls::self_signed(&names, config.cert_validity)?;
        let store = CertStore::new(first.serving.certified_key(&provider)?);
        let client = kube::Client::try_default()
            .await
            .context("--self-signed needs the API (in-cluster service account or KUBECONFIG)")?;
        let rotation = ca_bundle::Rotation {
            client,
            config_name: config.webhook_config.clone(),
            names,
            validity: config.cert_validity,
            check_every: config.ca_bundle_check_secs,
            store: store.clone(),
            metrics: app.metrics.clone(),
            ready: app.ready.clone(),
        };
        (store, Some((rotation, first)))
    };
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| format!("binding --addr {}", config.addr))?;
    let local = listener.local_addr()?;
    // Tests and tools read the bound address (with --addr HOST:0) here.
    tracing::info!(listen.addr = %local, self_signed = config.self_signed, "serving");
    eprintln!("spright-webhook listening on {local}");
    let tls_config = tls::server_config(store)?;
    let drain = std::time::Duration::from_secs(config.drain_secs);
    let serving = server::serve(listener, tls_config, server::router(app), shutdown(drain));
    match rotation {
        None => serving.await,
        Some((rotation, first)) => {
            tokio::select! {
                () = serving => {}
                r = rotation.run(first) => r.context("rotating the self-signed certificate")?,
            }
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves `drain` after SIGTERM or SIGINT: the kubelet sends SIGTERM
/// while the Pod's endpoint is still being removed from the Service, so
/// the API server may still call for a few seconds.
async fn shutdown(drain: std::time::Duration) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!(
        drain.secs = drain.as_secs(),
        "stopping: still serving while the endpoint is removed"
    );
    eprintln!("spright-webhook draining");
    tokio::time::sleep(drain).await;
}
