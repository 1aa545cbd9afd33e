//! Privileged tier: the Pod object decides chain membership.
//!
//! - shm-csi's NodePublishVolume before any CNI ADD, with the Pods served by
//!   the API stand-in (meshd's real kube-rs watch, field selector
//!   `spec.nodeName`) and by meshd's pods directory: a member is mounted; a
//!   pod outside the chain, a uid that does not match the Pod, a pod of
//!   another node and a pod nobody knows (after the bounded wait) are
//!   refused with PERMISSION_DENIED and nothing is mounted; a pod the watch
//!   learns of during the wait is admitted.
//! - A pod whose annotation is removed while it talks: its open connection
//!   moves to TCP with every byte intact and in order, new connections are
//!   not redirected, and a pod recreated without the annotation is no member.
//! - meshd's Kubernetes Events on the Pods of its node: a Warning for a pod
//!   alone in its chain, a Normal event for one that opted out, each once.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use spright_ebpf::Datapath;
use spright_tests::{
    kubeapi::FakeApi,
    meshd::Meshd,
    privileged,
    sandbox::{Peer, Sandbox},
    scenario::json_u64 as u,
    shm_csi::{Client, Code, MountDir, ShmCsi, ephemeral_publish},
};

const T: Duration = Duration::from_mins(1);

fn pod(name: &str, uid: &str, node: &str, chain: Option<&str>) -> Value {
    let mut annotations = serde_json::Map::new();
    if let Some(c) = chain {
        annotations.insert("spright.dev/chain".into(), json!(c));
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "shop", "uid": uid, "annotations": annotations },
        "spec": { "nodeName": node, "containers": [{ "name": "f", "image": "x" }] },
    })
}

fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    format!("127.0.0.1:{port}")
}

/// meshd of node `node-a` watching the API stand-in (no self-test), with
/// `extra` flags.
fn meshd_of_node_a(sb: &Sandbox, state: &std::path::Path, api: &FakeApi, extra: &[&str]) -> Meshd {
    let kubeconfig = api.kubeconfig(state).expect("kubeconfig");
    let mut flags = vec![
        "--no-selftest",
        "--kubernetes",
        "on",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--node-name",
        "node-a",
    ];
    flags.extend_from_slice(extra);
    Meshd::start_with(&sb.placement(), state, &free_addr(), &flags).expect("meshd")
}

#[test]
fn privileged_membership_publish_before_add_follows_the_pod() {
    if !privileged::require("privileged_membership_publish_before_add_follows_the_pod") {
        return;
    }
    let sb = Sandbox::new("mp").expect("sandbox");
    let state = tempfile::tempdir().expect("state dir");
    let api = FakeApi::start().expect("API stand-in");
    api.apply(pod("member", "u-member", "node-a", Some("checkout")));
    api.apply(pod("plain", "u-plain", "node-a", None));
    api.apply(pod("away", "u-away", "node-b", Some("checkout")));
    // A Pod file (for nodes without an API) bound to another node.
    let pods_dir = state.path().join("pods");
    std::fs::create_dir_all(&pods_dir).unwrap();
    std::fs::write(
        pods_dir.join("elsewhere.json"),
        pod("elsewhere", "u-else", "node-b", Some("checkout")).to_string(),
    )
    .unwrap();
    let kubeconfig = api.kubeconfig(state.path()).expect("kubeconfig");
    let kubeconfig = kubeconfig.to_str().unwrap();
    let addr = free_addr();
    let meshd = Meshd::start_with(
        &sb.placement(),
        state.path(),
        &addr,
        &[
            "--no-selftest",
            "--kubernetes",
            "on",
            "--kubeconfig",
            kubeconfig,
            "--node-name",
            "node-a",
        ],
    )
    .expect("meshd");
    meshd
        .wait_status(T, "the Pods of node-a listed", |s| {
            s["kubernetes"]["state"] == "synced" && s["kubernetes"]["pods"] == 2
        })
        .unwrap();
    let dir = MountDir::new().unwrap();
    let csi = ShmCsi::start(&dir.path().join("csi"), &addr, &[]).unwrap();
    let mut c = csi.client().unwrap();
    let target = |name: &str| dir.path().join("pods").join(name).join("mount");
    let publish = |c: &mut Client, name: &str, uid: &str| {
        let t = target(name);
        std::fs::create_dir_all(t.parent().unwrap()).unwrap();
        let req = ephemeral_publish(
            &format!("csi-{name}"),
            &t,
            "shop",
            name,
            uid,
            &[("chain", "checkout")],
        );
        c.publish(req)
    };
    assert!(
        spright_endpoint::list(state.path()).unwrap().is_empty(),
        "no CNI ADD has run"
    );
    publish(&mut c, "member", "u-member")
        .unwrap_or_else(|e| panic!("member refused: {e}\n{}", csi.log_text()));
    assert_eq!(dir.mounts().len(), 2, "the region and the member's target");
    for (name, uid, why) in [
        ("plain", "u-plain", "no spright.dev/chain annotation"),
        ("member", "u-other", "has uid u-member"),
        ("elsewhere", "u-else", "bound to node node-b"),
        // The field selector keeps node-b's Pods away from node-a's meshd.
        ("away", "u-away", "not known on this node"),
        ("nobody", "u-nobody", "not known on this node"),
    ] {
        let started = Instant::now();
        let e = publish(&mut c, name, uid).expect_err(name);
        assert_eq!(e.code(), Code::PermissionDenied, "{name}: {e:?}");
        assert!(
            e.message().contains(why) && e.message().contains(&format!("shop/{name}")),
            "{name}: {}",
            e.message()
        );
        assert!(!target(name).exists() || dir.mounts().len() == 2, "{name}");
        eprintln!(
            "{name}: refused after {:?}: {}",
            started.elapsed(),
            e.message()
        );
    }
    assert_eq!(dir.mounts().len(), 2, "nothing mounted for a refused pod");
    // A pod the API learns of while its publish waits is admitted.
    let late = pod("late", "u-late", "node-a", Some("checkout"));
    let socket = csi.socket.clone();
    let t = target("late");
    std::fs::create_dir_all(t.parent().unwrap()).unwrap();
    let waiting = std::thread::spawn(move || {
        Client::connect(&socket).unwrap().publish(ephemeral_publish(
            "csi-late",
            &t,
            "shop",
            "late",
            "u-late",
            &[("chain", "checkout")],
        ))
    });
    std::thread::sleep(Duration::from_millis(300));
    api.apply(late);
    waiting
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("a pod known during the wait was refused: {e}"));
    for name in ["member", "late"] {
        c.unpublish(&format!("csi-{name}"), &target(name)).unwrap();
    }
    assert!(dir.mounts().is_empty(), "{:?}", dir.mounts());
    drop(meshd);
}

fn torture(sb: &Sandbox, pod: usize, args: &[&str]) -> Peer {
    sb.spawn_torture(pod, args)
        .expect("spawning spright-torture")
}

/// A ping-pong of `iters` 64-byte messages from pod 0 to pod 1; `during`
/// runs while it is under way. Returns the client's report (checked intact).
fn pingpong(sb: &Sandbox, port: u16, iters: u64, during: impl FnOnce()) -> Value {
    let addr = format!("{}:{port}", sb.pods[1].ip);
    let server = torture(sb, 1, &["server", "pingpong", "--listen", &addr]);
    assert_eq!(server.line(T).expect("server start"), "ready");
    let client = torture(
        sb,
        0,
        &[
            "client",
            "pingpong",
            "--connect",
            &addr,
            "--iters",
            &iters.to_string(),
        ],
    );
    during();
    let report = client.report(T).expect("client report");
    client.finish(T).expect("client exit");
    server.report(T).expect("server report");
    server.finish(T).expect("server exit");
    assert_eq!(
        report["hash"], report["expected"],
        "the echoes did not come back intact and in order: {report}"
    );
    report
}

#[test]
fn privileged_membership_a_pod_that_leaves_its_chain_moves_to_tcp() {
    if !privileged::require("privileged_membership_a_pod_that_leaves_its_chain_moves_to_tcp") {
        return;
    }
    let mut sb = Sandbox::new("lv").expect("sandbox");
    sb.add_pod().expect("pod 0");
    sb.add_pod().expect("pod 1");
    let state = tempfile::tempdir().expect("state dir");
    let pods_dir = state.path().join("pods");
    std::fs::create_dir_all(&pods_dir).unwrap();
    let write_pod = |i: usize, uid: &str, chain: Option<&str>| {
        let mut p = pod(&format!("pod{i}"), uid, "n", chain);
        p["metadata"]["namespace"] = json!("default");
        std::fs::write(pods_dir.join(format!("pod{i}.json")), p.to_string()).unwrap();
    };
    write_pod(0, "", Some("lv"));
    write_pod(1, "", Some("lv"));
    let meshd = Meshd::start_with(
        &sb.placement(),
        state.path(),
        &free_addr(),
        &[
            "--no-selftest",
            "--memory-bound-bytes",
            "off",
            "--node-name",
            "n",
        ],
    )
    .expect("meshd");
    for i in [0, 1] {
        sb.record_pod(state.path(), i, Some("lv")).expect("record");
    }
    meshd
        .wait_status(T, "both pods in the datapath", |s| {
            s["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == 2 && e.iter().all(|e| e["in_datapath"] == true))
        })
        .unwrap();
    let counters = |i: usize| {
        Datapath::open(&sb.pins.path)
            .unwrap()
            .counters(sb.pods[i].ip.into())
            .unwrap()
    };
    // The annotation is removed while the connection runs.
    let report = pingpong(&sb, 7400, 300_000, || {
        std::thread::sleep(Duration::from_millis(300));
        write_pod(0, "", None);
        meshd
            .wait_status(T, "pod0 leaving", |s| {
                s["pods"]["leaving"] == json!(["default/pod0"])
            })
            .unwrap();
    });
    let (c0, c1) = (counters(0), counters(1));
    eprintln!("client {report}\npod0 {c0:?}\npod1 {c1:?}");
    assert!(
        c0.redirected_msgs > 0 && c0.fallback_msgs > 0,
        "pod0's messages did not cross from the redirect path to TCP: {c0:?}"
    );
    assert!(
        c1.redirected_msgs > 0 && c1.fallback_msgs > 0,
        "pod1's echoes did not cross from the redirect path to TCP: {c1:?}"
    );
    assert!(
        meshd.log_text().contains("now takes the TCP path"),
        "{}",
        meshd.log_text()
    );
    // A new connection of the leaving pod is not redirected.
    let before = counters(0).redirected_msgs;
    pingpong(&sb, 7401, 1_000, || {});
    assert_eq!(
        counters(0).redirected_msgs,
        before,
        "a new connection was redirected"
    );
    // Recreated without the annotation: no member of the chain.
    write_pod(0, "u-new", None);
    let ask = || -> Value {
        let q = "/v1/membership?namespace=default&pod=pod0&uid=u-new&chain=lv";
        serde_json::from_str(&meshd.get(q).unwrap()).unwrap()
    };
    let deadline = Instant::now() + T;
    let mut answer = ask();
    while answer["verdict"] != "notInChain" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        answer = ask();
    }
    assert_eq!(answer["verdict"], "notInChain", "{answer}");
    assert_eq!(u(&report, "iters"), 300_000);
}

/// meshd's Kubernetes Events, from the Pods of its node as the API
/// stand-in serves them: a Warning on a pod alone in its chain on this node
/// (after `--lonely-pod-secs`), a Normal event on a chain pod that opted
/// out, each once, nothing for pods of other nodes or of a chain with a
/// local peer; a pod that gets a peer gets no warning.
#[test]
fn privileged_membership_events_name_what_the_owner_must_fix() {
    if !privileged::require("privileged_membership_events_name_what_the_owner_must_fix") {
        return;
    }
    let sb = Sandbox::new("me").expect("sandbox");
    let state = tempfile::tempdir().expect("state dir");
    let api = FakeApi::start().expect("API stand-in");
    api.apply(pod("typo", "u-typo", "node-a", Some("chekout")));
    api.apply(pod("a", "u-a", "node-a", Some("checkout")));
    api.apply(pod("b", "u-b", "node-a", Some("checkout")));
    let mut out = pod("out", "u-out", "node-a", Some("checkout"));
    out["metadata"]["annotations"]["spright.dev/redirect"] = json!("off");
    api.apply(out);
    // Alone on node-a, but node-a's meshd does not speak for node-b.
    api.apply(pod("far", "u-far", "node-b", Some("far")));
    let meshd = meshd_of_node_a(&sb, state.path(), &api, &["--lonely-pod-secs", "3"]);
    // The first pod of a new chain: gets a peer before its wait is over.
    api.apply(pod("first", "u-first", "node-a", Some("late")));
    std::thread::sleep(Duration::from_secs(1));
    api.apply(pod("second", "u-second", "node-a", Some("late")));
    let about = |e: &Value| {
        (
            e["regarding"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            e["reason"].as_str().unwrap_or_default().to_owned(),
            e["type"].as_str().unwrap_or_default().to_owned(),
        )
    };
    let deadline = Instant::now() + T;
    while !api.events().iter().any(|e| about(e).0 == "typo") {
        assert!(
            Instant::now() < deadline,
            "no event for the lonely pod; events {:?}\n{}",
            api.events(),
            meshd.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A few more ticks: nothing is published twice.
    std::thread::sleep(Duration::from_secs(3));
    let events = api.events();
    let mut got: Vec<_> = events.iter().map(about).collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("out".into(), "RedirectOptedOut".into(), "Normal".into()),
            (
                "typo".into(),
                "ChainHasNoLocalPeer".into(),
                "Warning".into()
            ),
        ],
        "{events:#?}\n{}",
        meshd.log_text()
    );
    let typo = events.iter().find(|e| about(e).0 == "typo").unwrap();
    assert_eq!(typo["regarding"]["uid"], "u-typo");
    assert_eq!(typo["regarding"]["namespace"], "shop");
    assert_eq!(typo["reportingController"], "spright-meshd");
    let note = typo["note"].as_str().unwrap();
    assert!(
        note.contains("\"chekout\"") && note.contains("node node-a"),
        "{note}"
    );
}

/// Processes started in pod `ns` (by path), killed by pid when dropped.
struct PodProcs(Vec<std::process::Child>);

impl PodProcs {
    fn spawn(&mut self, netns: &str, ld_preload: &str, program: &[&str]) {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", netns, "env"])
            .arg(format!("LD_PRELOAD={ld_preload}"))
            .args(program)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("pod process");
        self.0.push(child);
    }
}

impl Drop for PodProcs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The preload shim's Warning event, from real processes in pod network
/// namespaces: a statically linked program (busybox) and a program whose
/// `LD_PRELOAD` names a shim missing from its file system each put a
/// `PreloadShimNotLoaded` event on their pod, naming the process and why;
/// a glibc program that loaded the shim gets none, and nothing is published
/// twice. meshd also publishes the shim for spright-webhook's volume.
#[test]
fn privileged_preload_event_names_the_program_that_cannot_load_the_shim() {
    if !privileged::require("privileged_preload_event_names_the_program_that_cannot_load_the_shim")
    {
        return;
    }
    let mut sb = Sandbox::new("pl").expect("sandbox");
    let state = tempfile::tempdir().expect("state dir");
    let api = FakeApi::start().expect("API stand-in");
    for i in 0..3 {
        sb.add_pod().expect("pod");
        sb.record_pod(state.path(), i, Some("c")).expect("record");
        api.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": format!("pod{i}"), "namespace": "default", "uid": format!("u{i}"),
                          "annotations": { "spright.dev/chain": "c", "spright.dev/preload": "true" } },
            "spec": { "nodeName": "node-a", "containers": [{ "name": "f", "image": "x" }] },
        }));
    }
    let shim = spright_tests::sandbox::workspace_bin("libspright_preload.so");
    assert!(
        shim.exists(),
        "{} not built (cargo build --workspace)",
        shim.display()
    );
    let shim_s = shim.to_str().unwrap();
    let mut procs = PodProcs(Vec::new());
    let ns = |i: usize| sb.pods[i].ns.name.clone();
    procs.spawn(&ns(0), shim_s, &["/bin/busybox", "sleep", "600"]);
    procs.spawn(&ns(1), shim_s, &["sleep", "600"]);
    procs.spawn(
        &ns(2),
        "/nonexistent/libspright_preload.so",
        &["sleep", "600"],
    );
    let meshd = meshd_of_node_a(
        &sb,
        state.path(),
        &api,
        &["--preload-check", "always", "--preload-shim", shim_s],
    );
    let published = state.path().join("preload/libspright_preload.so");
    assert_eq!(
        std::fs::read(&published).expect("meshd published the shim"),
        std::fs::read(&shim).unwrap()
    );
    let preload_events = || -> Vec<Value> {
        api.events()
            .into_iter()
            .filter(|e| e["reason"] == "PreloadShimNotLoaded")
            .collect()
    };
    let deadline = Instant::now() + T;
    while preload_events().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "events {:#?}\n{}",
            api.events(),
            meshd.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Another round of the check (every 5 s): nothing new.
    std::thread::sleep(Duration::from_secs(6));
    let events = preload_events();
    let mut pods: Vec<&str> = events
        .iter()
        .map(|e| e["regarding"]["name"].as_str().unwrap())
        .collect();
    pods.sort_unstable();
    assert_eq!(pods, ["pod0", "pod2"], "{events:#?}\n{}", meshd.log_text());
    let note = |pod: &str| {
        let e = events
            .iter()
            .find(|e| e["regarding"]["name"] == pod)
            .unwrap();
        assert_eq!(e["type"], "Warning");
        assert_eq!(e["regarding"]["namespace"], "default");
        e["note"].as_str().unwrap().to_owned()
    };
    let busybox = procs.0[0].id();
    let n0 = note("pod0");
    assert!(
        n0.contains(&format!(
            "(pid {busybox}): the program is statically linked"
        )),
        "{n0}"
    );
    let n2 = note("pod2");
    assert!(
        n2.contains("/nonexistent/libspright_preload.so does not exist in the container"),
        "{n2}"
    );
    drop(procs);
}
