//! The real `spright-webhook` binary over HTTPS, called as the API server
//! calls it: a TLS connection verified against the CA bundle for the
//! Service's name, `POST /mutate` with an `admission.k8s.io/v1` review.
//!
//! - every case of the mutation as review fixtures, the returned JSON Patch
//!   applied with the `json-patch` crate, the patched Pod reviewed again
//!   (no patch), and every patched Pod through `kubernetes-validate
//!   --strict` (the manifest tier's schema check);
//! - a certificate from files replaced on disk is served without a restart;
//! - `--self-signed` writes its CA into the webhook configuration of an API
//!   stand-in and rotates it.
//!
//! Everything listens on 127.0.0.1; every process started is killed by its
//! handle and every file lives in a temporary directory.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use spright_webhook::{
    client::Client,
    review::{AdmissionRequest, AdmissionReview, GroupVersionKind},
    tls,
};

const SERVICE_NAME: &str = "spright-webhook.spright-system.svc";
/// How long to wait for something the webhook does on its own (a reload, a
/// rotation) before declaring it never happened. Not a latency bound.
const PATIENCE: Duration = Duration::from_mins(2);

/// The webhook process, killed on drop.
struct Webhook {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Webhook {
    fn start(args: &[&str], env: &[(&str, &Path)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_spright-webhook"))
            .args(["--addr", "127.0.0.1:0", "--log", "debug"])
            .args(args)
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning spright-webhook");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("spright-webhook listening on ") {
                    let _ = tx.send(a.parse::<SocketAddr>().unwrap());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = rx.recv_timeout(PATIENCE).unwrap_or_else(|_| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "spright-webhook did not start:\n{}",
                log.lock().unwrap().join("\n")
            )
        });
        Self { child, addr, log }
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn client(&self, ca_pem: &[u8]) -> Client {
        Client::new(ca_pem, self.addr, SERVICE_NAME).unwrap()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Polls `f` until it returns `Some`, for at most [`PATIENCE`].
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(start.elapsed() < PATIENCE, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write_pair(dir: &Path, pair: &tls::PemPair) {
    // As a Secret volume or cert-manager's csi-driver would: the key first,
    // each file replaced by a rename.
    for (name, body) in [("tls.key", &pair.key), ("tls.crt", &pair.cert)] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

/// A CA and serving certificate for the webhook's in-cluster Service names.
fn service_ca() -> tls::SelfSigned {
    tls::self_signed(
        &tls::service_names("spright-webhook", "spright-system"),
        Duration::from_hours(1),
    )
    .unwrap()
}

/// The webhook serving `pair` from files in `dir` (`--tls-cert`,
/// `--tls-key`), with `extra` flags.
fn start_with_files(dir: &Path, pair: &tls::PemPair, extra: &[&str]) -> Webhook {
    write_pair(dir, pair);
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Webhook::start(&args, &[])
}

fn pod(name: &str, annotations: &Value, spec: &Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "shop", "annotations": annotations,
                      "labels": { "app": name } },
        "spec": spec,
    })
}

fn containers() -> Value {
    json!({
        "initContainers": [{ "name": "prepare", "image": "busybox:1.36", "command": ["true"] }],
        "containers": [
            { "name": "main", "image": "busybox:1.36",
              "volumeMounts": [{ "name": "data", "mountPath": "/data" }] },
            { "name": "side", "image": "busybox:1.36" },
        ],
        "volumes": [{ "name": "data", "emptyDir": {} }],
    })
}

fn review_of(uid: &str, object: Value) -> AdmissionReview {
    AdmissionReview::of_request(AdmissionRequest {
        uid: uid.to_owned(),
        kind: GroupVersionKind::pod(),
        namespace: Some("shop".into()),
        operation: "CREATE".into(),
        object: Some(object),
        ..AdmissionRequest::default()
    })
}

/// What a fixture must come to.
enum Want {
    /// Allowed, no patch.
    Untouched,
    /// Allowed with a patch; the patched Pod passes this check.
    Patched(fn(&Value)),
    /// Refused naming this annotation.
    Refused(&'static str),
}

fn fixtures() -> Vec<(&'static str, Value, Want)> {
    let hand_written = json!({
        "containers": [{ "name": "main", "image": "busybox:1.36",
            "volumeMounts": [{ "name": "chain-shm", "mountPath": "/dev/spright" }] }],
        "volumes": [{ "name": "chain-shm", "csi": { "driver": "shm.spright.dev",
            "volumeAttributes": { "chain": "demo", "size": "64Mi" } } }],
    });
    let with_affinity = json!({
        "containers": [{ "name": "main", "image": "busybox:1.36" }],
        "affinity": { "podAntiAffinity": { "preferredDuringSchedulingIgnoredDuringExecution": [
            { "weight": 10, "podAffinityTerm": { "topologyKey": "kubernetes.io/hostname",
              "labelSelector": { "matchLabels": { "app": "required-one" } } } }] } },
    });
    vec![
        (
            "outside",
            pod("outside", &json!({}), &containers()),
            Want::Untouched,
        ),
        (
            "chain-only",
            pod(
                "chain-only",
                &json!({ "spright.dev/chain": "demo" }),
                &containers(),
            ),
            Want::Patched(|p| {
                assert_eq!(p["metadata"]["labels"]["spright.dev/chain"], "demo");
                assert_eq!(p["metadata"]["labels"]["app"], "chain-only");
                let t = &p["spec"]["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
                    [0];
                assert_eq!(t["weight"], 100);
                assert_eq!(
                    t["podAffinityTerm"]["topologyKey"],
                    "kubernetes.io/hostname"
                );
                assert_eq!(p["spec"]["volumes"].as_array().unwrap().len(), 1);
            }),
        ),
        (
            "shm-size",
            pod(
                "shm-size",
                &json!({ "spright.dev/chain": "demo", "spright.dev/shm": "64Mi",
                         "spright.dev/shm-containers": "prepare" }),
                &containers(),
            ),
            Want::Patched(|p| {
                let v = &p["spec"]["volumes"][1];
                assert_eq!(v["name"], "spright-shm");
                assert_eq!(
                    v["csi"],
                    json!({ "driver": "shm.spright.dev",
                    "volumeAttributes": { "chain": "demo", "size": "64Mi" } })
                );
                for c in ["initContainers", "containers"] {
                    for c in p["spec"][c].as_array().unwrap() {
                        let m = c["volumeMounts"].as_array().unwrap();
                        assert!(
                            m.contains(&json!({ "name": "spright-shm",
                            "mountPath": "/dev/shm/spright" })),
                            "{c}"
                        );
                    }
                }
            }),
        ),
        (
            "shm-default-path",
            pod(
                "shm-default-path",
                &json!({ "spright.dev/chain": "demo", "spright.dev/shm": "true",
                         "spright.dev/shm-path": "/run/chain" }),
                &containers(),
            ),
            Want::Patched(|p| {
                assert_eq!(
                    p["spec"]["volumes"][1]["csi"]["volumeAttributes"],
                    json!({ "chain": "demo" })
                );
                assert_eq!(
                    p["spec"]["containers"][1]["volumeMounts"][0]["mountPath"],
                    "/run/chain"
                );
                assert!(
                    p["spec"]["initContainers"][0]["volumeMounts"].is_null(),
                    "init containers opt in"
                );
            }),
        ),
        (
            "required",
            pod(
                "required",
                &json!({ "spright.dev/chain": "demo", "spright.dev/placement": "required" }),
                &with_affinity,
            ),
            Want::Patched(|p| {
                let a = &p["spec"]["affinity"];
                assert_eq!(
                    a["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"],
                    10
                );
                assert_eq!(
                    a["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["labelSelector"],
                    json!({ "matchLabels": { "spright.dev/chain": "demo" } })
                );
            }),
        ),
        (
            "placement-none",
            pod(
                "placement-none",
                &json!({ "spright.dev/chain": "demo", "spright.dev/placement": "none" }),
                &containers(),
            ),
            Want::Patched(|p| {
                assert!(p["spec"]["affinity"].is_null());
                assert_eq!(p["metadata"]["labels"]["spright.dev/chain"], "demo");
            }),
        ),
        (
            "hand-written-volume",
            pod(
                "hand-written-volume",
                &json!({ "spright.dev/chain": "demo", "spright.dev/shm": "64Mi" }),
                &hand_written,
            ),
            Want::Patched(|p| {
                assert_eq!(
                    p["spec"]["volumes"].as_array().unwrap().len(),
                    1,
                    "kept, not doubled"
                );
                assert_eq!(
                    p["spec"]["containers"][0]["volumeMounts"]
                        .as_array()
                        .unwrap()
                        .len(),
                    1
                );
            }),
        ),
        (
            "bad-size",
            pod(
                "bad-size",
                &json!({ "spright.dev/chain": "demo", "spright.dev/shm": "lots" }),
                &containers(),
            ),
            Want::Refused("spright.dev/shm"),
        ),
        (
            "bad-placement",
            pod(
                "bad-placement",
                &json!({ "spright.dev/chain": "demo", "spright.dev/placement": "nearby" }),
                &containers(),
            ),
            Want::Refused("spright.dev/placement"),
        ),
        (
            "bad-path",
            pod(
                "bad-path",
                &json!({ "spright.dev/chain": "demo", "spright.dev/shm": "true", "spright.dev/shm-path": "dev/shm" }),
                &containers(),
            ),
            Want::Refused("spright.dev/shm-path"),
        ),
        (
            "bad-chain",
            pod(
                "bad-chain",
                &json!({ "spright.dev/chain": "Demo_1" }),
                &containers(),
            ),
            Want::Refused("spright.dev/chain"),
        ),
        (
            "bad-init",
            pod(
                "bad-init",
                &json!({ "spright.dev/chain": "demo", "spright.dev/shm": "true", "spright.dev/shm-containers": "setup" }),
                &containers(),
            ),
            Want::Refused("spright.dev/shm-containers"),
        ),
    ]
}

/// `kubernetes-validate --strict` over the patched Pods, as the manifest
/// tier checks the shipped files. Skips when the tool is missing, except
/// under `CI`.
fn kubernetes_validate(pods: &[Value]) {
    let tool = Command::new("kubernetes-validate")
        .arg("--version")
        .output();
    if !tool.is_ok_and(|o| o.status.success()) {
        let why = "kubernetes-validate is not installed (cargo xtask setup installs it)";
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true" || v == "1"),
            "{why}"
        );
        eprintln!("SKIPPED the schema check of patched Pods: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let f = dir.path().join(format!("pod-{i}.yaml"));
        std::fs::write(&f, serde_json::to_vec_pretty(p).unwrap()).unwrap();
        files.push(f);
    }
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("ERROR"),
        "kubernetes-validate --strict:\n{text}"
    );
}

#[test]
fn every_case_through_https_and_patched_pods_settle() {
    let dir = tempfile::tempdir().unwrap();
    let ca = service_ca();
    let hook = start_with_files(dir.path(), &ca.serving, &[]);
    let client = hook.client(ca.ca_pem.as_bytes());
    let rt = runtime();
    let mut conn = rt.block_on(client.connect()).unwrap();
    let mut patched_pods = Vec::new();
    for (i, (name, object, want)) in fixtures().into_iter().enumerate() {
        let uid = format!("00000000-0000-4000-8000-{i:012}");
        let out = rt
            .block_on(conn.review(&review_of(&uid, object.clone())))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", hook.log_text()));
        assert_eq!(out.api_version, "admission.k8s.io/v1", "{name}");
        assert_eq!(out.kind, "AdmissionReview", "{name}");
        let r = out.response.unwrap();
        assert_eq!(r.uid, uid, "{name}: the response carries the request's uid");
        match want {
            Want::Untouched => {
                assert!(
                    r.allowed && r.patch.is_none() && r.patch_type.is_none(),
                    "{name}: {r:?}"
                );
            }
            Want::Refused(annotation) => {
                assert!(!r.allowed && r.patch.is_none(), "{name}: {r:?}");
                let status = r.status.unwrap();
                assert_eq!(status.code, 400, "{name}");
                assert!(
                    status.message.contains(annotation),
                    "{name}: {}",
                    status.message
                );
            }
            Want::Patched(check) => {
                assert!(r.allowed, "{name}: {r:?}");
                assert_eq!(r.patch_type.as_deref(), Some("JSONPatch"), "{name}");
                let patch = r.decoded_patch().unwrap().expect("a patch");
                let mut p = object.clone();
                json_patch::patch(&mut p, &patch).unwrap_or_else(|e| panic!("{name}: {e}"));
                check(&p);
                // Reviewed again (reinvocation): nothing more to do.
                let again = rt
                    .block_on(conn.review(&review_of(&format!("{uid}-again"), p.clone())))
                    .unwrap();
                let again = again.response.unwrap();
                assert!(again.allowed, "{name}");
                assert_eq!(
                    (again.patch, again.patch_type),
                    (None, None),
                    "{name}: not idempotent"
                );
                patched_pods.push(p);
            }
        }
    }
    kubernetes_validate(&patched_pods);

    // Not a Pod, not a CREATE: allowed untouched.
    let mut other = review_of("u-svc", json!({ "kind": "Service" }));
    other.request.as_mut().unwrap().kind.kind = "Service".into();
    let r = rt.block_on(conn.review(&other)).unwrap().response.unwrap();
    assert!(r.allowed && r.patch.is_none());

    // Malformed reviews: a clear 400, and the server keeps serving.
    for (body, says) in [
        (b"{not json".to_vec(), "not an admission.k8s.io/v1 AdmissionReview"),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(), "no request"),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":""}}"#.to_vec(), "no uid"),
        (br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"x"}}"#.to_vec(), "v1beta1"),
    ] {
        let (status, text) = rt.block_on(conn.call("POST", "/mutate", body)).unwrap();
        let text = String::from_utf8_lossy(&text);
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(says), "{text}");
    }

    for (path, want) in [("/healthz", "ok"), ("/readyz", "ready")] {
        let (status, body) = rt.block_on(conn.call("GET", path, Vec::new())).unwrap();
        assert_eq!((status, String::from_utf8_lossy(&body).trim()), (200, want));
    }
    let (status, body) = rt
        .block_on(conn.call("GET", "/metrics", Vec::new()))
        .unwrap();
    let metrics = String::from_utf8(body).unwrap();
    assert_eq!(status, 200);
    for line in [
        "spright_webhook_reviews_total{result=\"patched\"} 6",
        "spright_webhook_reviews_total{result=\"unchanged\"} 6",
        "spright_webhook_reviews_total{result=\"ignored\"} 2",
        "spright_webhook_reviews_total{result=\"refused\"} 5",
        "spright_webhook_reviews_total{result=\"bad_request\"} 4",
        "spright_webhook_patches_total 6",
        "spright_webhook_refusals_total{reason=\"spright.dev/shm\"} 1",
        "spright_webhook_refusals_total{reason=\"spright.dev/placement\"} 1",
        "spright_webhook_refusals_total{reason=\"spright.dev/chain\"} 1",
    ] {
        assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
    }

    // A client that does not trust the CA, or dials another name, fails.
    let stranger = tls::self_signed(&["x".to_owned()], Duration::from_mins(1)).unwrap();
    assert!(
        rt.block_on(hook.client(stranger.ca_pem.as_bytes()).connect())
            .is_err()
    );
    let wrong_name = Client::new(ca.ca_pem.as_bytes(), hook.addr, "other.svc").unwrap();
    assert!(rt.block_on(wrong_name.connect()).is_err());
}

#[test]
fn certificate_files_are_reloaded_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let names = tls::service_names("spright-webhook", "spright-system");
    let first = tls::self_signed(&names, Duration::from_hours(1)).unwrap();
    let second = tls::self_signed(&names, Duration::from_hours(1)).unwrap();
    let hook = start_with_files(dir.path(), &first.serving, &["--reload-secs", "1"]);
    let pid = hook.child.id();
    let rt = runtime();
    let both = format!("{}{}", first.ca_pem, second.ca_pem);
    let client = hook.client(both.as_bytes());
    let leaf = |pem: &[u8]| {
        use rustls::pki_types::{CertificateDer, pem::PemObject as _};
        CertificateDer::pem_slice_iter(pem).next().unwrap().unwrap()
    };
    let served = |client: &Client| rt.block_on(client.connect()).map(|c| c.peer);
    assert_eq!(served(&client).unwrap(), leaf(&first.serving.cert));
    // An open connection keeps working across the swap.
    let mut open = rt.block_on(client.connect()).unwrap();

    // A half-written pair (the key of another certificate) is not served.
    let broken = tls::PemPair {
        cert: second.serving.cert.clone(),
        key: first.serving.key.clone(),
    };
    write_pair(dir.path(), &broken);
    eventually("the refusal of a mismatched pair to be logged", || {
        hook.log_text().contains("do not load").then_some(())
    });
    assert_eq!(served(&client).unwrap(), leaf(&first.serving.cert));

    write_pair(dir.path(), &second.serving);
    eventually("the new certificate to be served", || {
        (served(&client).ok()? == leaf(&second.serving.cert)).then_some(())
    });
    // Only the new CA is needed now; same process, no restart.
    assert!(served(&hook.client(second.ca_pem.as_bytes())).is_ok());
    assert_eq!(hook.child.id(), pid);
    let (status, _) = rt
        .block_on(open.call("GET", "/healthz", Vec::new()))
        .unwrap();
    assert_eq!(status, 200);
    let (_, metrics) = rt
        .block_on(open.call("GET", "/metrics", Vec::new()))
        .unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("spright_webhook_certificate_changes_total 1"),
        "{metrics}"
    );
}

/// SIGTERM (what the kubelet sends): the webhook keeps answering for
/// `--drain-secs` (the API server may still call while the endpoint is
/// being removed), then exits cleanly.
#[test]
fn sigterm_keeps_serving_through_the_drain_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let ca = service_ca();
    let mut hook = start_with_files(dir.path(), &ca.serving, &["--drain-secs", "5"]);
    let rt = runtime();
    let client = hook.client(ca.ca_pem.as_bytes());
    let mut open = rt.block_on(client.connect()).unwrap();
    let review = review_of(
        "u-drain",
        pod("p", &json!({ "spright.dev/chain": "demo" }), &containers()),
    );
    let status = Command::new("kill")
        .args(["-TERM", &hook.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    eventually("the drain to start", || {
        hook.log_text().contains("draining").then_some(())
    });
    // Both an open connection and a new one are still served.
    let r = rt.block_on(open.review(&review)).unwrap();
    assert!(r.response.unwrap().patch.is_some());
    let r = rt
        .block_on(async { client.connect().await?.review(&review).await })
        .unwrap_or_else(|e| panic!("a new connection during the drain: {e}"));
    assert!(r.response.unwrap().allowed);
    let exit = eventually("the webhook to exit", || hook.child.try_wait().unwrap());
    assert!(exit.success(), "{exit:?}\n{}", hook.log_text());
    assert!(
        rt.block_on(client.connect()).is_err(),
        "nothing listens any more"
    );
}

/// A stand-in for the API server's admissionregistration.k8s.io/v1
/// MutatingWebhookConfiguration resource: GET and JSON PATCH of one object,
/// every caBundle written recorded in order.
struct FakeApi {
    addr: SocketAddr,
    bundles: Arc<Mutex<Vec<Vec<String>>>>,
    object: Arc<Mutex<Value>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const CONFIG_PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/spright-webhook";

type Shared = (Arc<Mutex<Value>>, Arc<Mutex<Vec<Vec<String>>>>);

/// GET: the stored configuration.
async fn fake_read(
    axum::extract::State((obj, _)): axum::extract::State<Shared>,
) -> axum::Json<Value> {
    axum::Json(obj.lock().unwrap().clone())
}

/// PATCH (JSON Patch only, as kube-rs sends it): applied like the API
/// server applies it (a failed `test` fails the whole patch); the bundle
/// every webhook ends up with is recorded.
async fn fake_patch(
    axum::extract::State((obj, bundles)): axum::extract::State<Shared>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<axum::Json<Value>, (axum::http::StatusCode, String)> {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if ct != "application/json-patch+json" {
        return Err((
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ct.to_owned(),
        ));
    }
    let p: json_patch::Patch = serde_json::from_slice(&body)
        .map_err(|e| (axum::http::StatusCode::BAD_REQUEST, e.to_string()))?;
    let mut o = obj.lock().unwrap();
    let mut next = o.clone();
    json_patch::patch(&mut next, &p)
        .map_err(|e| (axum::http::StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let decoded: Vec<String> = next["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            use base64::Engine as _;
            let b = w["clientConfig"]["caBundle"].as_str().unwrap_or_default();
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap()).unwrap()
        })
        .collect();
    assert!(
        decoded.iter().all(|b| b == &decoded[0]),
        "every webhook gets the same bundle"
    );
    bundles.lock().unwrap().push(
        decoded[0]
            .split_inclusive("-----END CERTIFICATE-----\n")
            .map(str::to_owned)
            .collect(),
    );
    *o = next;
    Ok(axum::Json(o.clone()))
}

impl FakeApi {
    fn start() -> Self {
        use axum::{Router, routing::get};
        let webhooks: Vec<Value> = ["pods.spright.dev", "pods-again.spright.dev"]
            .iter()
            .map(|name| {
                json!({
                    "name": name,
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "clientConfig": { "service": { "name": "spright-webhook",
                        "namespace": "spright-system", "path": "/mutate", "port": 443 } },
                })
            })
            .collect();
        let object = json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": { "name": "spright-webhook", "resourceVersion": "1" },
            "webhooks": webhooks,
        });
        let bundles = Arc::new(Mutex::new(Vec::new()));
        let object = Arc::new(Mutex::new(object));
        let state: Shared = (object.clone(), bundles.clone());
        let app = Router::new()
            .route(CONFIG_PATH, get(fake_read).patch(fake_patch))
            .with_state(state);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            runtime().block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Self {
            addr,
            bundles,
            object,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// Removes every webhook's caBundle, as re-creating the configuration
    /// from its manifest would.
    fn clear_ca_bundles(&self) {
        for w in self.object.lock().unwrap()["webhooks"]
            .as_array_mut()
            .unwrap()
        {
            w["clientConfig"]
                .as_object_mut()
                .unwrap()
                .remove("caBundle");
        }
    }

    fn bundles(&self) -> Vec<Vec<String>> {
        self.bundles.lock().unwrap().clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        // Dropping the sender stops the server; wait for its thread.
        drop(self.shutdown.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn self_signed_writes_the_ca_bundle_and_rotates_it() {
    let api = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"http://{}\"}}}}]\n\
             users: [{{name: hook, user: {{token: not-checked}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: hook}}}}]\n",
            api.addr
        ),
    )
    .unwrap();
    // Rotation at 2/3 (8 s) and 5/6 (10 s) of a 12 s lifetime.
    let hook = Webhook::start(
        &[
            "--self-signed",
            "--webhook-config",
            "spright-webhook",
            "--service",
            "spright-webhook",
            "--namespace",
            "spright-system",
            "--cert-validity",
            "12s",
            "--ca-bundle-check-secs",
            "1",
        ],
        &[("KUBECONFIG", &kubeconfig)],
    );
    let rt = runtime();
    let first = eventually("the first caBundle", || api.bundles().first().cloned());
    assert_eq!(first.len(), 1, "{first:?}");
    let client = hook.client(first[0].as_bytes());
    let mut conn = rt
        .block_on(client.connect())
        .unwrap_or_else(|e| panic!("{e}\n{}", hook.log_text()));
    let (status, _) = rt
        .block_on(conn.call("GET", "/readyz", Vec::new()))
        .unwrap();
    assert_eq!(status, 200, "ready once the CA is published");
    let r = rt
        .block_on(conn.review(&review_of(
            "u-1",
            pod("p", &json!({ "spright.dev/chain": "demo" }), &containers()),
        )))
        .unwrap();
    assert!(r.response.unwrap().patch.is_some());

    // Someone re-creates the configuration without the bundle: the next
    // check writes it again.
    api.clear_ca_bundles();
    eventually("the caBundle written again", || {
        api.bundles()
            .iter()
            .skip(1)
            .any(|b| *b == first)
            .then_some(())
    });

    // Rotation: old and new CA together, then the new certificate, then the
    // new CA alone. At every step the served certificate is one the latest
    // bundle trusts.
    let both = eventually("the caBundle with both CAs", || {
        api.bundles().into_iter().find(|b| b.len() == 2)
    });
    assert_eq!(both[0], first[0]);
    let only_new = hook.client(both[1].as_bytes());
    eventually("the rotated certificate to be served", || {
        rt.block_on(only_new.connect()).ok()
    });
    let last = eventually("the caBundle with the new CA only", || {
        api.bundles()
            .last()
            .filter(|b| **b == [both[1].clone()])
            .cloned()
    });
    assert_eq!(last, vec![both[1].clone()]);
    // Checks write nothing while the bundle is current: the first bundle,
    // its re-write, both CAs, the new CA.
    assert_eq!(api.bundles().len(), 4, "{:#?}", api.bundles());
    assert!(
        rt.block_on(client.connect()).is_err(),
        "the old CA no longer verifies the server"
    );
    assert!(
        hook.log_text().contains("caBundle written"),
        "{}",
        hook.log_text()
    );
}
