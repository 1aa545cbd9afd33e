//! The HTTPS server: `POST /mutate` (an `admission.k8s.io/v1`
//! AdmissionReview in, the same out), `/healthz`, `/readyz`, `/metrics`.
//! Each accepted connection does its TLS handshake in its own task, so a
//! slow client never holds up the accept loop.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tokio::net::TcpListener;

use crate::{metrics::Metrics, mutate, review::AdmissionReview};

/// Path the webhook configuration's `clientConfig.service.path` names.
pub const MUTATE_PATH: &str = "/mutate";
/// The largest review accepted: a Pod is at most what etcd stores (1.5 MiB),
/// and a review carries it once.
pub const BODY_LIMIT: usize = 4 << 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handlers share.
#[derive(Clone, Debug)]
pub struct App {
    pub metrics: Arc<Metrics>,
    /// Set once the API server can verify the served certificate (at once
    /// with files; after the first caBundle write with `--self-signed`).
    pub ready: Arc<AtomicBool>,
}

impl App {
    pub fn new(ready: bool) -> Self {
        Self {
            metrics: Arc::new(Metrics::new()),
            ready: Arc::new(AtomicBool::new(ready)),
        }
    }
}

pub fn router(app: App) -> Router {
    Router::new()
        .route(MUTATE_PATH, post(mutate_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app)
}

async fn mutate_handler(State(app): State<App>, body: Bytes) -> Response {
    let input: AdmissionReview = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            app.metrics.bad_request();
            tracing::warn!(error = %e, "body is not an AdmissionReview");
            return (
                StatusCode::BAD_REQUEST,
                format!("the body is not an admission.k8s.io/v1 AdmissionReview: {e}\n"),
            )
                .into_response();
        }
    };
    match mutate::review(&input) {
        Ok((out, outcome)) => {
            app.metrics.review(&outcome);
            log(&input, &out, &outcome);
            Json(out).into_response()
        }
        Err(e) => {
            app.metrics.bad_request();
            tracing::warn!(error = %e, "review refused");
            (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response()
        }
    }
}

fn log(input: &AdmissionReview, out: &AdmissionReview, outcome: &mutate::Outcome) {
    let Some(req) = &input.request else { return };
    let object = req.object.as_ref().map(|o| &o["metadata"]);
    let name = req
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            object
                .and_then(|m| m["generateName"].as_str())
                .map(|g| format!("{g}*"))
        })
        .unwrap_or_default();
    let namespace = req.namespace.as_deref().unwrap_or_default();
    match outcome {
        mutate::Outcome::Refused(reason) => {
            let message = out
                .response
                .as_ref()
                .and_then(|r| r.status.as_ref())
                .map(|s| s.message.as_str())
                .unwrap_or_default();
            tracing::info!(
                pod.namespace = namespace,
                pod.name = name,
                review.uid = req.uid,
                refusal.reason = reason,
                refusal.message = message,
                "refused"
            );
        }
        mutate::Outcome::Patched(ops) => {
            tracing::debug!(
                pod.namespace = namespace,
                pod.name = name,
                review.uid = req.uid,
                patch.operations = ops,
                "patched"
            );
        }
        mutate::Outcome::Ignored | mutate::Outcome::Unchanged => {
            tracing::trace!(
                pod.namespace = namespace,
                pod.name = name,
                review.uid = req.uid,
                ?outcome,
                "allowed"
            );
        }
    }
}

async fn ready(State(app): State<App>) -> impl IntoResponse {
    if app.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the CA is not in the webhook configuration yet\n",
        )
    }
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
}

/// How long reviews in flight may take to finish once the server stops.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `router` over TLS on `listener` until `shutdown` resolves, then
/// stops accepting, lets the requests in flight finish (idle keep-alive
/// connections are closed at once) for at most [`FINISH_TIMEOUT`].
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Request/response traffic: no Nagle delay on the answer.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(peer.addr = %peer, error = %e, "TCP_NODELAY not set");
        }
        let acceptor = acceptor.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(peer.addr = %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer.addr = %peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(router);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(peer.addr = %peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(FINISH_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still busy after {FINISH_TIMEOUT:?}; closing them");
    }
}
