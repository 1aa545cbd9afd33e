//! A minimal stand-in for the Kubernetes API server, for meshd's API source.
//!
//! No kube-apiserver can run on the test machines (no binaries, no network),
//! so this serves the two collections meshd watches with the API's wire
//! behaviour for list-then-watch: `GET` of a collection lists the objects
//! with the collection's `resourceVersion`; `?watch=true&resourceVersion=N`
//! streams, chunked, every later change as `{"type":…,"object":…}` lines
//! until `timeoutSeconds`. Objects carry their own `resourceVersion`. It is
//! the protocol kube-rs' watcher speaks, not a model of the API server's
//! storage (no pagination, no bookmarks, no auth). Of field selectors it
//! knows the one kubelet and meshd use on Pods, `spec.nodeName=<node>`,
//! applied to lists and watches alike. `events.k8s.io/v1` Events that
//! meshd creates (`POST`) or updates (`PATCH`) are kept for the test to read
//! ([`FakeApi::events`]).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// The collections served: (path, kind, apiVersion).
const COLLECTIONS: [(&str, &str, &str); 4] = [
    ("/api/v1/services", "Service", "v1"),
    ("/api/v1/pods", "Pod", "v1"),
    ("/api/v1/nodes", "Node", "v1"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSlice",
        "discovery.k8s.io/v1",
    ),
];

/// Where Events are created (`POST …/events`) and updated (`PATCH
/// …/events/<name>`, kube-rs' recorder adding a series).
const EVENTS_PREFIX: &str = "/apis/events.k8s.io/v1/namespaces/";

#[derive(Default)]
struct State {
    rv: u64,
    /// `events.k8s.io/v1` Events as they were created or patched, oldest first.
    events: Vec<Value>,
    /// (resourceVersion, kind, event type, object), oldest first.
    log: Vec<(u64, String, &'static str, Value)>,
    stopped: bool,
}

impl State {
    /// Live objects of `kind`, by namespace/name.
    fn objects(&self, kind: &str) -> Vec<Value> {
        self.objects_matching(kind, &Selector::default())
    }

    /// Live objects of `kind` that `selector` selects.
    fn objects_matching(&self, kind: &str, selector: &Selector) -> Vec<Value> {
        let mut live = std::collections::BTreeMap::new();
        for (_, k, t, o) in &self.log {
            if k != kind {
                continue;
            }
            let key = key_of(o);
            if *t == "DELETED" {
                live.remove(&key);
            } else {
                live.insert(key, o.clone());
            }
        }
        live.into_values().filter(|o| selector.selects(o)).collect()
    }
}

/// A field selector: `spec.nodeName=<node>` (the only one served).
#[derive(Debug, Default)]
struct Selector {
    node_name: Option<String>,
}

impl Selector {
    /// Parses the `fieldSelector` query value (percent-encoded).
    fn parse(value: Option<&str>) -> Result<Self, String> {
        let Some(v) = value else {
            return Ok(Self::default());
        };
        let v = v.replace("%3D", "=").replace("%3d", "=");
        match v.split_once('=') {
            Some(("spec.nodeName", node)) => Ok(Self {
                node_name: Some(node.to_owned()),
            }),
            _ => Err(format!(
                "field selector {v:?} is not supported by the stand-in"
            )),
        }
    }

    fn selects(&self, o: &Value) -> bool {
        self.node_name
            .as_deref()
            .is_none_or(|n| o["spec"]["nodeName"].as_str() == Some(n))
    }
}

fn key_of(o: &Value) -> String {
    format!(
        "{}/{}",
        o["metadata"]["namespace"].as_str().unwrap_or_default(),
        o["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// The server; stops (ending open watches) on drop.
pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
    /// The network namespace it listens in (`None`: the test's own).
    netns: Option<PathBuf>,
}

impl FakeApi {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_on(TcpListener::bind("127.0.0.1:0")?, None)
    }

    /// Listens on `addr` inside the network namespace `netns`: the API on a
    /// network that several simulated nodes reach, as a control plane is.
    pub fn start_in(netns: &Path, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = spright_endpoint::netns::run_in(netns, || TcpListener::bind(addr))
            .map_err(|e| anyhow::anyhow!("listening on {addr} in {}: {e}", netns.display()))?;
        Self::start_on(listener, Some(netns.to_path_buf()))
    }

    fn start_on(listener: TcpListener, netns: Option<PathBuf>) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if s.0.lock().unwrap().stopped {
                    break;
                }
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &s);
                });
            }
        });
        Ok(Self { addr, state, netns })
    }

    /// Creates or replaces an object (`kind` from the object itself).
    pub fn apply(&self, mut object: Value) {
        let (lock, cv) = &*self.state;
        let mut st = lock.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let existed = st
            .objects(&kind)
            .iter()
            .any(|o| key_of(o) == key_of(&object));
        let t = if existed { "MODIFIED" } else { "ADDED" };
        st.log.push((rv, kind, t, object));
        cv.notify_all();
    }

    /// Deletes an object (matched by kind, namespace and name).
    pub fn delete(&self, object: &Value) {
        let (lock, cv) = &*self.state;
        let mut st = lock.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let mut gone = object.clone();
        gone["metadata"]["resourceVersion"] = json!(rv.to_string());
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        st.log.push((rv, kind, "DELETED", gone));
        cv.notify_all();
    }

    /// A kubeconfig pointing at this server (plain HTTP, no credentials).
    /// The Events posted and patched so far (`events.k8s.io/v1`), oldest
    /// first.
    pub fn events(&self) -> Vec<Value> {
        self.state.0.lock().unwrap().events.clone()
    }

    pub fn kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let server = format!("http://{}", self.addr);
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&json!({
                "apiVersion": "v1", "kind": "Config",
                "clusters": [{ "name": "fake", "cluster": { "server": server } }],
                "users": [{ "name": "fake", "user": {} }],
                "contexts": [{ "name": "fake", "context": { "cluster": "fake", "user": "fake" } }],
                "current-context": "fake",
            }))?,
        )?;
        Ok(path)
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap().stopped = true;
        cv.notify_all();
        // Wake the accept loop (in its namespace) so it sees the flag.
        match &self.netns {
            Some(ns) => {
                let addr = self.addr;
                let _ = spright_endpoint::netns::run_in(ns, || TcpStream::connect(addr));
            }
            None => {
                let _ = TcpStream::connect(self.addr);
            }
        }
    }
}

fn serve(conn: TcpStream, state: &(Mutex<State>, Condvar)) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
        if let Some((k, v)) = header.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let method = request.split_whitespace().next().unwrap_or_default();
    let target = request.split_whitespace().nth(1).unwrap_or_default();
    if target.starts_with(EVENTS_PREFIX) {
        let mut body = vec![0; length.min(1 << 20)];
        std::io::Read::read_exact(&mut reader, &mut body)?;
        return event(conn, state, method, target, &body);
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    let mut out = conn;
    let Some(&(_, kind, api_version)) = COLLECTIONS.iter().find(|(p, _, _)| *p == path) else {
        let body = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "NotFound", "code": 404, "message": format!("{path} not served") })
        .to_string();
        return write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    let selector = match Selector::parse(param("fieldSelector")) {
        Ok(s) => s,
        Err(message) => {
            let body = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "reason": "BadRequest", "code": 400, "message": message })
            .to_string();
            return write!(
                out,
                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    };
    if matches!(param("watch"), Some("true" | "1")) {
        let since: u64 = param("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = param("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_mins(1), Duration::from_secs);
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )?;
        out.flush()?;
        watch(
            &mut out,
            state,
            (kind, &selector),
            since,
            Instant::now() + timeout,
        )?;
        write!(out, "0\r\n\r\n")?;
        return out.flush();
    }
    let (items, rv) = {
        let st = state.0.lock().unwrap();
        (st.objects_matching(kind, &selector), st.rv)
    };
    let body = json!({
        "kind": format!("{kind}List"), "apiVersion": api_version,
        "metadata": { "resourceVersion": rv.to_string() }, "items": items,
    })
    .to_string();
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

/// Takes a created or patched Event: stored as sent, echoed back (201 for
/// a create, 200 for a patch), as the API server answers.
fn event(
    mut out: TcpStream,
    state: &(Mutex<State>, Condvar),
    method: &str,
    target: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let parsed: Result<Value, _> = serde_json::from_slice(body);
    let (status, reply) = match (method, parsed) {
        ("POST" | "PATCH", Ok(v)) if target.contains("/events") => {
            state.0.lock().unwrap().events.push(v.clone());
            (
                if method == "POST" {
                    "201 Created"
                } else {
                    "200 OK"
                },
                v,
            )
        }
        (_, parsed) => (
            "400 Bad Request",
            json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "BadRequest",
                    "code": 400, "message": format!("{method} {target}: {parsed:?}") }),
        ),
    };
    let body = reply.to_string();
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

/// Streams events of `kind` (that `selector` selects) newer than `since`
/// until `deadline` or stop.
fn watch(
    out: &mut TcpStream,
    (lock, cv): &(Mutex<State>, Condvar),
    (kind, selector): (&str, &Selector),
    mut since: u64,
    deadline: Instant,
) -> std::io::Result<()> {
    let mut st = lock.lock().unwrap();
    loop {
        let events: Vec<(u64, String)> = st
            .log
            .iter()
            .filter(|(rv, k, _, o)| *rv > since && k == kind && selector.selects(o))
            .map(|(rv, _, t, o)| (*rv, json!({ "type": t, "object": o }).to_string() + "\n"))
            .collect();
        since = st.rv;
        drop(st);
        for (_, line) in events {
            write!(out, "{:x}\r\n{line}\r\n", line.len())?;
        }
        out.flush()?;
        st = lock.lock().unwrap();
        let now = Instant::now();
        if st.stopped || now >= deadline {
            return Ok(());
        }
        if st.rv == since {
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
        if st.stopped {
            return Ok(());
        }
    }
}
