//! The shipped example chain, unchanged, on one node run in kubelet's order
//! (src/kubelet.rs): the Pod object first, as the API server stores it after
//! spright-webhook's mutation (the manifest carries only annotations; the
//! webhook's JSON Patch adds the chain's volume, mounts, label and
//! affinity), its CSI volumes published by shm-csi before any sandbox
//! exists, then containerd's RunPodSandbox (which runs spright-cni), then
//! the containers with their mounts. meshd learns the Pods from its pods
//! directory (the file twin of its API watch).

use std::path::Path;

use serde_json::json;
use spright_tests::{
    kubeapi::FakeApi,
    kubelet::{Cni, CriNode, Kubelet, PodError, RunningPod, pods_from_manifest},
    meshd::Meshd,
    runtime::{self, redirected},
    shm_csi::{Code, MountDir, ShmCsi, mounts_under},
};

const NODE: &str = "test-node";
const NETWORK: &str = "spright";
const SUBNET: &str = "10.213.43.0/24";
const CHAINED_SUBNET: &str = "10.213.44.0/24";
const PRELOAD_SUBNET: &str = "10.213.45.0/24";
const EXAMPLE: &str = include_str!("../../manifests/example-chain.yaml");

/// A pod outside the chain, and one that asks for the chain's volume
/// without being annotated into the chain.
fn outsiders() -> (serde_json::Value, serde_json::Value) {
    let pod = |name: &str, volumes: serde_json::Value, mounts: serde_json::Value| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": "spright-demo", "uid": spright_tests::kubelet::new_uid(),
                          "labels": { "app": name } },
            "spec": { "nodeName": NODE, "volumes": volumes, "containers": [{
                "name": "main", "image": "registry.k8s.io/e2e-test-images/agnhost:2.53",
                "ports": [{ "containerPort": 8080 }], "volumeMounts": mounts }] },
        })
    };
    (
        pod("outsider", json!([]), json!([])),
        pod(
            "intruder",
            json!([{ "name": "chain-shm", "csi": { "driver": "shm.spright.dev",
                     "volumeAttributes": { "chain": "demo", "size": "64Mi" } } }]),
            json!([{ "name": "chain-shm", "mountPath": "/dev/spright" }]),
        ),
    )
}

/// What the API server stores for `pod`: the object after
/// spright-webhook's mutation (the JSON Patch its review answers with).
/// For the example chain, whose manifest has no volume, that is exactly one
/// shm.spright.dev volume of the pod's chain, mounted in every container.
fn admitted(pod: &serde_json::Value) -> serde_json::Value {
    let out = spright_webhook::patched(pod).unwrap_or_else(|e| panic!("refused: {e}"));
    if pod["metadata"]["annotations"]["spright.dev/chain"] == "demo" {
        assert!(
            pod["spec"]["volumes"].is_null(),
            "the example chain carries annotations only"
        );
        assert_eq!(
            out["spec"]["volumes"],
            json!([{ "name": "spright-shm", "csi": { "driver": spright_tests::kubelet::CSI_DRIVER,
                     "volumeAttributes": { "chain": "demo", "size": "64Mi" } } }])
        );
        for c in out["spec"]["containers"].as_array().unwrap() {
            assert_eq!(
                c["volumeMounts"],
                json!([{ "name": "spright-shm", "mountPath": "/dev/shm/spright" }])
            );
        }
        assert_eq!(out["metadata"]["labels"]["spright.dev/chain"], "demo");
    }
    out
}

fn function_of(p: &RunningPod) -> &str {
    p.object["metadata"]["annotations"]["spright.dev/function"]
        .as_str()
        .unwrap_or_default()
}

const TOOLS: &[&str] = spright_tests::kubelet::CRI_TOOLS;

/// spright as the node's network.
#[test]
fn e2e_kubelet_runs_the_example_chain_in_kubelets_order() {
    if !runtime::require_tools(
        "e2e_kubelet_runs_the_example_chain_in_kubelets_order",
        TOOLS,
    ) {
        return;
    }
    example_chain(
        "k",
        Cni::Spright {
            network: NETWORK,
            subnet: SUBNET,
        },
    );
}

/// The default install: the reference bridge is the node's network and
/// `spright install-cni` chained spright into its conflist.
#[test]
fn e2e_kubelet_runs_the_example_chain_chained_after_the_bridge() {
    if !runtime::require_tools(
        "e2e_kubelet_runs_the_example_chain_chained_after_the_bridge",
        TOOLS,
    ) {
        return;
    }
    example_chain(
        "kc",
        Cni::ChainedIntoBridge {
            network: NETWORK,
            subnet: CHAINED_SUBNET,
        },
    );
}

/// The node's mount guard, state directory, pods directory (meshd's file
/// twin of the API's Pods) and where the datapath attaches.
fn node_dirs(
    node: &CriNode,
) -> (
    MountDir,
    std::path::PathBuf,
    std::path::PathBuf,
    spright_ebpf::Placement,
) {
    let mounts = MountDir::new().unwrap();
    let state = node.state_dir();
    let pods_dir = state.join("pods");
    std::fs::create_dir_all(&pods_dir).unwrap();
    let placement = spright_ebpf::Placement {
        cgroup: node.base.cgroup.path.clone(),
        bpffs: node.base.pins.path.clone(),
    };
    (mounts, state, pods_dir, placement)
}

/// A free loopback address for meshd's API.
fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

fn example_chain(tag: &str, cni: Cni<'_>) {
    let node = CriNode::new(tag, cni).unwrap();
    let (mounts, state, pods_dir, placement) = node_dirs(&node);
    let addr = free_addr();
    let meshd_flags = ["--node-name", NODE];
    let mut meshd = Meshd::start_with(&placement, &state, &addr, &meshd_flags).unwrap();
    let csi = ShmCsi::start(&mounts.path().join("csi"), &addr, &[]).unwrap();
    let mut kubelet = Kubelet::new(
        &node,
        &mounts.path().join("kubelet"),
        &csi.socket,
        &pods_dir,
    )
    .unwrap();

    let written = pods_from_manifest(EXAMPLE, NODE).unwrap();
    assert_eq!(written.len(), 6, "three Deployments of two replicas");
    let chain: Vec<serde_json::Value> = written.iter().map(admitted).collect();
    let mut running = Vec::new();
    // The first pod: its volume is published, then meshd restarts before
    // the sandbox is created; the pod still starts.
    let volumes = kubelet
        .publish_volumes(&{
            kubelet.create_object(&chain[0]).unwrap();
            chain[0].clone()
        })
        .unwrap_or_else(|e| panic!("publish before ADD: {e}\n{}", csi.log_text()));
    assert!(
        spright_endpoint::list(&state)
            .unwrap_or_default()
            .is_empty(),
        "the volume was published before any CNI ADD"
    );
    meshd.kill();
    meshd = Meshd::start_with(&placement, &state, &addr, &meshd_flags).unwrap();
    running.push(
        kubelet
            .start_sandbox(&chain[0], volumes)
            .unwrap_or_else(|e| panic!("{e}\n{}", node.containerd.log_text())),
    );
    for pod in &chain[1..] {
        running.push(kubelet.run_pod(pod).unwrap_or_else(|e| {
            panic!(
                "{}: {e}\nshm-csi:\n{}\nmeshd:\n{}",
                pod["metadata"]["name"],
                csi.log_text(),
                meshd.log_text()
            )
        }));
    }
    let (outsider, intruder) = outsiders();
    // The webhook leaves Pods outside any chain as they are.
    assert_eq!(admitted(&outsider), outsider);
    assert_eq!(admitted(&intruder), intruder);
    let outsider = kubelet.run_pod(&outsider).unwrap();
    // Leftover pod namespaces are removed on drop if the test fails.
    for p in running.iter().chain([&outsider]) {
        if let Some(ns) = &p.netns {
            node.pod_netns.0.borrow_mut().push(ns.into());
        }
    }
    // The intruder asks for the chain's volume without being in the chain:
    // FailedMount, no sandbox, nothing mounted.
    let sandboxes = kubelet.sandboxes().unwrap();
    match kubelet.run_pod(&intruder) {
        Err(PodError::FailedMount { status, .. }) => {
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
            assert!(
                status.message().contains("no spright.dev/chain annotation"),
                "{}",
                status.message()
            );
        }
        other => panic!("the intruder got {other:?}"),
    }
    assert_eq!(kubelet.sandboxes().unwrap(), sandboxes);
    let intruder_uid = intruder["metadata"]["uid"].as_str().unwrap();
    assert!(mounts_under(&kubelet.root.join("pods").join(intruder_uid)).is_empty());

    // Every chain pod was attached in the chain (containerd passed the
    // annotation), the outsider in none.
    let records = spright_endpoint::list(&state).unwrap();
    assert_eq!(records.len(), 7, "{records:?}");
    for (_, r) in &records {
        let r = r.as_ref().unwrap();
        let want = (r.pod.name != "outsider").then_some("demo");
        assert_eq!(r.chain.as_deref(), want, "{r:?}");
    }

    // Chain hops over HTTP: gateway → transform → store, redirected.
    let by_fn = |f: &str| {
        running
            .iter()
            .find(|p| function_of(p) == f)
            .unwrap()
            .clone()
    };
    let (gateway, transform, store) = (by_fn("gateway"), by_fn("transform"), by_fn("store"));
    assert_eq!(
        kubelet.fetch(&gateway, &transform, 8080).unwrap(),
        "spright-e2e"
    );
    assert_eq!(
        kubelet.fetch(&transform, &store, 8080).unwrap(),
        "spright-e2e"
    );
    let pins = &node.base.pins.path;
    let dp = spright_ebpf::Datapath::open(pins).unwrap();
    for p in [&gateway, &transform, &store] {
        let c = dp.counters(p.ip).unwrap();
        assert!(
            c.redirected_msgs > 0 && c.redirected_bytes > 0,
            "{}: chain hop not redirected: {c:?}",
            p.name
        );
        // Every message of the chain's connections went socket to socket:
        // no data segment of a chain hop crossed the TCP/IP stack.
        assert_eq!(c.fallback_msgs, 0, "{}: {c:?}", p.name);
    }
    let before = redirected(pins, gateway.ip).unwrap();
    assert_eq!(
        kubelet.fetch(&outsider, &gateway, 8080).unwrap(),
        "spright-e2e"
    );
    assert_eq!(redirected(pins, outsider.ip).unwrap(), (0, 0));
    assert_eq!(
        redirected(pins, gateway.ip).unwrap(),
        before,
        "outsider hop redirected"
    );

    // One shared-memory region for the whole chain: a byte written by one
    // function is read by another; the outsider has no volume.
    let (code, _) = kubelet
        .exec(
            &gateway,
            &["sh", "-c", "echo hello-chain > /dev/shm/spright/probe"],
        )
        .unwrap();
    assert_eq!(code, 0, "writing the chain's region as uid 65534");
    let last = running.last().unwrap().clone();
    assert_eq!(
        kubelet
            .exec(&last, &["cat", "/dev/shm/spright/probe"])
            .unwrap(),
        (0, "hello-chain\n".to_owned())
    );
    assert_ne!(
        kubelet
            .exec(&outsider, &["ls", "/dev/shm/spright"])
            .unwrap()
            .0,
        0
    );
    let status = meshd.status().unwrap();
    assert_eq!(status["pods"]["mismatches"], json!([]), "{status:#}");
    assert_eq!(status["pods"]["leaving"], json!([]), "{status:#}");

    // Delete everything as kubelet does; the node is clean.
    for p in running.iter().chain([&outsider]) {
        kubelet.delete_pod(p).unwrap();
    }
    kubelet.delete_object("spright-demo", "intruder").unwrap();
    assert_eq!(kubelet.sandboxes().unwrap(), 0);
    assert!(
        spright_endpoint::list(&state).unwrap().is_empty(),
        "records left"
    );
    assert_eq!(
        mounts_under(mounts.path().join("kubelet").as_path()),
        Vec::<std::path::PathBuf>::new(),
        "volume mounts left"
    );
    assert!(
        mounts_under(&csi.region_root).is_empty(),
        "chain regions left mounted"
    );
    let allocations = node.base.allocations(NETWORK);
    assert!(
        allocations.is_empty(),
        "IP allocations left: {allocations:?}"
    );
    let links = node.base.node.ip(&["-o", "link", "show"]).unwrap();
    assert_eq!(links.lines().count(), 2, "only lo and the bridge: {links}");
    meshd
        .wait_status(std::time::Duration::from_secs(10), "no endpoints", |s| {
            s["endpoints"].as_array().is_some_and(Vec::is_empty)
        })
        .unwrap();
    assert!(
        dp.endpoints().unwrap().is_empty(),
        "endpoint map entries left"
    );
    assert!(
        std::fs::read_dir(&pods_dir).unwrap().next().is_none(),
        "Pod objects left"
    );
    for p in running.iter().chain([&outsider]) {
        if let Some(ns) = &p.netns {
            assert!(!Path::new(ns).exists(), "netns {ns} of {} left", p.name);
        }
    }
}

/// `spright.dev/preload: "true"` end to end: the webhook's patch (a hostPath
/// volume of the node's shim directory, `LD_PRELOAD` in the container), the
/// kubelet stand-in mounting it, containerd running the container with that
/// environment, meshd having published the shim there, then finding that
/// the container's program (busybox's httpd, statically linked) did not
/// load it: a `PreloadShimNotLoaded` Warning on the Pod through the API
/// stand-in, naming the process. The simulated node's `/var/lib/spright`
/// is the test's state directory (`Kubelet::map_host_path`).
#[test]
fn e2e_kubelet_preload_pod_whose_program_cannot_load_the_shim_gets_an_event() {
    if !runtime::require_tools(
        "e2e_kubelet_preload_pod_whose_program_cannot_load_the_shim_gets_an_event",
        TOOLS,
    ) {
        return;
    }
    let node = CriNode::new(
        "kp",
        Cni::Spright {
            network: NETWORK,
            subnet: PRELOAD_SUBNET,
        },
    )
    .unwrap();
    let (mounts, state, pods_dir, placement) = node_dirs(&node);
    let api = FakeApi::start().unwrap();
    let kubeconfig = api.kubeconfig(node.base.dir.path()).unwrap();
    let shim = spright_tests::sandbox::workspace_bin("libspright_preload.so");
    let meshd = Meshd::start_with(
        &placement,
        &state,
        &free_addr(),
        &[
            "--node-name",
            NODE,
            "--kubernetes",
            "on",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--preload-check",
            "always",
            "--preload-shim",
            shim.to_str().unwrap(),
        ],
    )
    .unwrap();
    let mut kubelet = Kubelet::new(
        &node,
        &mounts.path().join("kubelet"),
        &mounts.path().join("no-csi.sock"),
        &pods_dir,
    )
    .unwrap();
    kubelet.map_host_path(Path::new("/var/lib/spright"), &state);

    let written = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "fn-static", "namespace": "spright-demo",
                      "uid": spright_tests::kubelet::new_uid(),
                      "annotations": { "spright.dev/chain": "pl", "spright.dev/preload": "true" } },
        "spec": { "nodeName": NODE, "containers": [{
            "name": "main", "image": "registry.k8s.io/e2e-test-images/agnhost:2.53",
            "ports": [{ "containerPort": 8080 }] }] },
    });
    let pod = spright_webhook::patched(&written).unwrap();
    assert_eq!(
        pod["spec"]["containers"][0]["env"],
        json!([{ "name": "LD_PRELOAD", "value": "/opt/spright/preload/libspright_preload.so" }])
    );
    api.apply(pod.clone());
    let running = kubelet.run_pod(&pod).unwrap_or_else(|e| {
        panic!(
            "{e}
{}",
            meshd.log_text()
        )
    });
    if let Some(ns) = &running.netns {
        node.pod_netns.0.borrow_mut().push(ns.into());
    }
    // The shim meshd published is in the container, where LD_PRELOAD points.
    let (code, _) = kubelet
        .exec(
            &running,
            &[
                "sh",
                "-c",
                "test -s /opt/spright/preload/libspright_preload.so",
            ],
        )
        .unwrap();
    assert_eq!(code, 0, "the shim is not mounted in the container");

    let deadline = std::time::Instant::now() + std::time::Duration::from_mins(1);
    let event = loop {
        if let Some(e) = api
            .events()
            .into_iter()
            .find(|e| e["reason"] == "PreloadShimNotLoaded")
        {
            break e;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no PreloadShimNotLoaded event: {:#?}\n{}",
            api.events(),
            meshd.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["name"], "fn-static");
    assert_eq!(event["regarding"]["uid"], pod["metadata"]["uid"]);
    let why = event["note"].as_str().unwrap();
    assert!(
        why.contains("httpd (pid ") && why.contains("statically linked"),
        "{why}"
    );
    kubelet.delete_pod(&running).unwrap();
}
