//! `spright-fn`: an ordinary, unmodified HTTP function of the demo chain.
//!
//! It knows nothing about spright: it serves HTTP/1.1 with keep-alive, does
//! the benchmark's work on each request body (`spright_shm::work`, the same
//! the SDK's stages do: hash it `--work` times, upper-case it in place;
//! nothing with `--work 0`), calls the next function over plain HTTP (a
//! pooled keep-alive client) with the result and returns the next
//! function's answer; the last function returns its result.
//!
//! ```text
//! spright-fn [--cgroup DIR] [--netns PATH] --listen ADDR --name NAME
//!            [--next http://HOST:PORT/] [--work ROUNDS]
//! ```

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use spright_shm::work;
use spright_tests::pod;

struct Fn {
    name: String,
    next: Option<hyper::Uri>,
    work: u32,
    client: Client<HttpConnector, Full<Bytes>>,
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    pod::enter_from_args(&mut args)?;
    let listen: SocketAddr = pod::take_opt(&mut args, "--listen")?
        .context("--listen is required")?
        .parse()
        .context("--listen")?;
    let name = pod::take_opt(&mut args, "--name")?.context("--name is required")?;
    let next = pod::take_opt(&mut args, "--next")?
        .map(|u| u.parse::<hyper::Uri>())
        .transpose()
        .context("--next")?;
    let work = pod::take_opt(&mut args, "--work")?
        .map_or(Ok(1), |w| w.parse())
        .context("--work")?;
    anyhow::ensure!(args.is_empty(), "unexpected arguments: {args:?}");

    let state = Arc::new(Fn {
        name,
        next,
        work,
        client: Client::builder(TokioExecutor::new()).build_http(),
    });
    // One thread per function: a pod of a small serverless function.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let app = Router::new()
            .route("/", post(handle))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        println!("ready");
        axum::serve(listener, app).await.context("serving")
    })
}

async fn handle(State(f): State<Arc<Fn>>, body: Bytes) -> Response {
    // Without a copy when hyper holds the only reference to the body.
    let mut body = Vec::from(body);
    let h = work::apply(&mut body, f.work);
    let body = Bytes::from(body);
    let Some(next) = &f.next else {
        let mut r = body.into_response();
        set(&mut r, "x-chain", &f.name);
        set(&mut r, "x-digest", &format!("{h:016x}"));
        return r;
    };
    let req = match hyper::Request::post(next.clone()).body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    match f.client.request(req).await {
        Ok(resp) => {
            let chain = resp
                .headers()
                .get("x-chain")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let status = resp.status();
            match resp.into_body().collect().await {
                Ok(b) => {
                    let mut r = (status, b.to_bytes()).into_response();
                    set(&mut r, "x-chain", &format!("{}>{chain}", f.name));
                    r
                }
                Err(e) => (
                    StatusCode::BAD_GATEWAY,
                    format!("{}: reading next: {e}", f.name),
                )
                    .into_response(),
            }
        }
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            format!("{}: calling {next}: {e}", f.name),
        )
            .into_response(),
    }
}

fn set(r: &mut Response, k: &'static str, v: &str) {
    if let Ok(v) = HeaderValue::from_str(v) {
        r.headers_mut().insert(k, v);
    }
}
