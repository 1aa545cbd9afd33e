//! The HTTP server: `/metrics` (Prometheus text), `/status` (JSON),
//! `/healthz` (the process serves), `/readyz` (the first reconciliation is
//! done), `/config` (effective configuration).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;

use crate::{agent::Shared, metrics};

#[derive(Clone)]
struct App {
    agent: Shared,
    registry: Arc<Registry>,
}

pub fn router(agent: Shared) -> Router {
    let registry = Arc::new(metrics::registry(agent.clone()));
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/status", get(status))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/config", get(config))
        .with_state(App { agent, registry })
}

async fn metrics_handler(State(app): State<App>) -> impl IntoResponse {
    let body = tokio::task::spawn_blocking(move || metrics::render(&app.registry))
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn status(State(app): State<App>) -> impl IntoResponse {
    let s =
        tokio::task::spawn_blocking(move || app.agent.lock().expect("agent lock").status()).await;
    match s {
        Ok(s) => Json(s).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn ready(State(app): State<App>) -> impl IntoResponse {
    if app.agent.lock().expect("agent lock").reconciles() > 0 {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not yet reconciled\n")
    }
}

async fn config(State(app): State<App>) -> impl IntoResponse {
    Json(
        app.agent
            .lock()
            .expect("agent lock")
            .config()
            .effective_json(),
    )
}
