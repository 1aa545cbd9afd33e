//! The HTTP servers: the local API on `--api-addr` serves every path below;
//! the optional `--metrics-addr` listener only /metrics, /healthz and
//! /readyz. Paths: `/metrics` (OpenMetrics or the classic Prometheus text,
//! as the scraper's `Accept` asks), `/status` (JSON),
//! `/healthz` (the process serves), `/readyz` (the first reconciliation is
//! done), `/config` (effective configuration), `/v1/membership?namespace=&pod=&uid=&chain=`
//! (shm-csi's question: is this pod in this chain? see
//! `spright_endpoint::membership`), `/v1/members?namespace=NS&chain=C` (the
//! recorded pods of a chain on this node), `/v1/flows?pod=NS/NAME&since=SEQ`
//! (recent chain-pod connections and their fate, see `flows`).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;

use crate::{metrics, view::Reader};

#[derive(Clone)]
struct App {
    reader: Reader,
    registry: Arc<Registry>,
}

/// The local API (`--api-addr`, loopback only): every path.
pub fn router(reader: Reader) -> Router {
    let app = app(reader);
    probes()
        .route("/status", get(status))
        .route("/config", get(config))
        .route("/v1/members", get(members))
        .route("/v1/flows", get(flows))
        .route(spright_endpoint::membership::PATH, get(membership))
        .with_state(app)
}

/// The metrics listener (`--metrics-addr`, any address): /metrics and the
/// probes, nothing that names members or configuration.
pub fn metrics_router(reader: Reader) -> Router {
    probes().with_state(app(reader))
}

fn app(reader: Reader) -> App {
    App {
        registry: Arc::new(metrics::registry(reader.clone())),
        reader,
    }
}

fn probes() -> Router<App> {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
}

async fn metrics_handler(State(app): State<App>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = metrics::Format::negotiate(accept);
    let body = tokio::task::spawn_blocking(move || metrics::render(&app.registry, format))
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, format.content_type())], body)
}

async fn status(State(app): State<App>) -> impl IntoResponse {
    let s = tokio::task::spawn_blocking(move || app.reader.status()).await;
    match s {
        Ok(s) => Json(s).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn ready(State(app): State<App>) -> impl IntoResponse {
    if app.reader.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not yet reconciled\n")
    }
}

async fn config(State(app): State<App>) -> impl IntoResponse {
    Json(app.reader.config.effective_json())
}

#[derive(serde::Deserialize)]
struct MembersQuery {
    namespace: String,
    chain: String,
}

/// One pod of a chain, as `/v1/members` lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Member {
    pub pod: String,
    #[serde(default)]
    pub uid: String,
    pub ips: Vec<std::net::IpAddr>,
}

/// The answer of `/v1/members`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Members {
    pub namespace: String,
    pub chain: String,
    pub members: Vec<Member>,
}

async fn members(State(app): State<App>, Query(q): Query<MembersQuery>) -> impl IntoResponse {
    let snap = app.reader.latest();
    let members = snap
        .records
        .iter()
        .filter(|r| r.pod.namespace == q.namespace && r.chain.as_deref() == Some(q.chain.as_str()))
        .map(|r| Member {
            pod: r.pod.name.clone(),
            uid: r.pod.uid.clone(),
            ips: r.ips.clone(),
        })
        .collect();
    Json(Members {
        namespace: q.namespace,
        chain: q.chain,
        members,
    })
}

async fn membership(
    State(app): State<App>,
    Query(q): Query<spright_endpoint::membership::Query>,
) -> impl IntoResponse {
    let verdict = app.reader.membership(&q);
    Json(spright_endpoint::membership::Answer::new(&q, verdict))
}

#[derive(serde::Deserialize)]
struct FlowsQuery {
    /// `namespace/name`: only flows with this pod at either end.
    pod: Option<String>,
    /// Only flows changed after this `seq` (what `--follow` asks).
    #[serde(default)]
    since: u64,
}

async fn flows(State(app): State<App>, Query(q): Query<FlowsQuery>) -> impl IntoResponse {
    Json(app.reader.flows.query(q.pod.as_deref(), q.since))
}
