//! Privileged tier: chain hops through Kubernetes Services (issue 9).
//!
//! kube-proxy is emulated with real iptables DNAT rules in the node
//! namespace. Without translation a chain pod calling a ClusterIP takes the
//! TCP path (the client socket's peer is the ClusterIP, the server's is the
//! client pod: the sockhash keys never pair); with meshd's service table the
//! connect hook sends it straight to a local backend of its chain, the hop is
//! redirected, and `getpeername()` still says ClusterIP.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use serde_json::Value;
use spright_tests::{
    meshd::Meshd,
    privileged,
    sandbox::{Peer, Sandbox, workspace_bin},
    scenario::data_segs_out,
    services::{endpoint_slice, kube_proxy_dnat, service, service_status, write_service_file},
};

const T: Duration = Duration::from_mins(1);
const PORT: u16 = 7000;

/// What one call through a Service observed.
struct Call {
    report: Value,
    /// TCP data segments the client socket sent (0 = redirected).
    client_segs: u64,
}

impl Call {
    fn intact(&self) -> bool {
        self.report["intact"] == true
    }
}

/// Pod `from` sends `bytes` to `dial` and holds the connection while `during`
/// runs and the client socket's TCP counters are read.
fn call(
    sb: &Sandbox,
    from: usize,
    dial: SocketAddr,
    bytes: u64,
    during: impl FnOnce(),
) -> anyhow::Result<Call> {
    let mut client = sb.spawn_peer(
        from,
        &[
            "send",
            "--connect",
            &dial.to_string(),
            "--bytes",
            &bytes.to_string(),
            "--hold",
        ],
    )?;
    let report = client.report(T)?;
    let local: SocketAddr = report["local"].as_str().unwrap_or_default().parse()?;
    let sport = format!(":{}", local.port());
    let client_segs = data_segs_out(&sb.pods[from], &["sport", "=", &sport])?;
    during();
    client.release();
    client.finish(T)?;
    Ok(Call {
        report,
        client_segs,
    })
}

fn serve(sb: &Sandbox, pod: usize, conns: u32) -> Peer {
    let srv = sb
        .spawn_peer(
            pod,
            &[
                "serve",
                "--listen",
                &format!("[::]:{PORT}"),
                "--conns",
                &conns.to_string(),
            ],
        )
        .unwrap();
    assert_eq!(srv.line(T).unwrap(), "ready");
    srv
}

/// The peers the server saw, as addresses (IPv4-mapped shown as IPv4).
fn served_peers(srv: Peer) -> Vec<IpAddr> {
    let r = srv.report(T).unwrap();
    srv.finish(T).unwrap();
    r["served"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let a: SocketAddr = s["peer"].as_str().unwrap().parse().unwrap();
            a.ip().to_canonical()
        })
        .collect()
}

fn local_backends(s: &Value, svc: SocketAddr) -> usize {
    service_status(s, svc)
        .and_then(|v| v["local_backends"].as_array())
        .map_or(0, Vec::len)
}

fn translations(s: &Value) -> Vec<Value> {
    s["translations"].as_array().cloned().unwrap_or_default()
}

fn write_stage2(dir: &Path, svc: SocketAddr, backends: &[(IpAddr, bool)]) {
    write_service_file(
        dir,
        "stage2",
        &[
            service("stage2", svc.ip(), svc.port(), PORT),
            endpoint_slice("stage2", PORT, backends),
        ],
    )
    .unwrap();
}

#[test]
fn privileged_services_clusterip_hops_are_translated_and_redirected() {
    if !privileged::require("privileged_services_clusterip_hops_are_translated_and_redirected") {
        return;
    }
    let mut sb = Sandbox::new("svc").unwrap();
    let state = tempfile::tempdir().unwrap();
    let services = state.path().join("services");
    // a: caller (chain shop); b, e: backends (chain shop); c: outside any
    // chain; d: backend in chain "other".
    let (a, b, c, d, e) = (
        sb.add_pod().unwrap(),
        sb.add_pod().unwrap(),
        sb.add_pod().unwrap(),
        sb.add_pod().unwrap(),
        sb.add_pod().unwrap(),
    );
    for (pod, chain) in [
        (a, Some("shop")),
        (b, Some("shop")),
        (c, None),
        (d, Some("other")),
        (e, Some("shop")),
    ] {
        let r = sb.record_pod(state.path(), pod, chain).unwrap();
        assert!(r.netns_cookie.is_some_and(|c| c != 0), "{r:?}");
    }
    let ip = |p: usize| IpAddr::V4(sb.pods[p].ip);
    let stage2: SocketAddr = "10.96.0.10:80".parse().unwrap();
    let stage2_v6: SocketAddr = "[fd00:96::10]:80".parse().unwrap();
    let far: SocketAddr = "10.96.0.20:80".parse().unwrap();
    kube_proxy_dnat(&sb.node, stage2, SocketAddr::new(ip(b), PORT)).unwrap();
    kube_proxy_dnat(&sb.node, far, SocketAddr::new(ip(d), PORT)).unwrap();
    let meshd = Meshd::start(&sb.placement(), state.path()).unwrap();

    // 1. Baseline, no service table: kube-proxy's DNAT carries the call,
    //    intact, and the hop is NOT redirected.
    let srv = serve(&sb, b, 1);
    let base = call(&sb, a, stage2, 1 << 20, || {}).unwrap();
    assert!(base.intact(), "{}", base.report);
    assert!(
        base.client_segs > 0,
        "without translation the hop must take TCP: {}",
        base.report
    );
    assert_eq!(base.report["peer_addr"], stage2.to_string());
    assert_eq!(served_peers(srv), vec![ip(a)]);

    // 2. With the Service in the table: translated at connect(), redirected,
    //    intact; getpeername() still says ClusterIP; the server sees pod a.
    //    A backend on another node (10.9.0.7) is never chosen.
    write_stage2(
        &services,
        stage2,
        &[(ip(b), true), ("10.9.0.7".parse().unwrap(), true)],
    );
    write_service_file(
        &services,
        "stage2-v6",
        &[
            service("stage2-v6", stage2_v6.ip(), stage2_v6.port(), PORT),
            endpoint_slice("stage2-v6", PORT, &[(IpAddr::V6(sb.pods[b].ip6), true)]),
        ],
    )
    .unwrap();
    meshd
        .wait_status(T, "stage2 with its local backend", |s| {
            local_backends(s, stage2) == 1 && local_backends(s, stage2_v6) == 1
        })
        .unwrap();
    let srv = serve(&sb, b, 3);
    let hop = call(&sb, a, stage2, 1 << 20, || {
        let s = meshd.status().unwrap();
        let t = translations(&s);
        assert!(
            t.iter().any(|t| t["service"] == stage2.to_string()
                && t["backend"] == SocketAddr::new(ip(b), PORT).to_string()
                && t["pod"] == "default/pod0"),
            "the live connection is listed as translated: {s:#}"
        );
    })
    .unwrap();
    assert!(hop.intact(), "{}", hop.report);
    assert_eq!(
        hop.client_segs, 0,
        "translated hop must be redirected: {}",
        hop.report
    );
    assert_eq!(hop.report["peer_addr"], stage2.to_string(), "getpeername");
    // An outsider calling the same ClusterIP is left to kube-proxy.
    let out = call(&sb, c, stage2, 1 << 20, || {}).unwrap();
    assert!(out.intact() && out.client_segs > 0, "{}", out.report);
    // IPv6 ClusterIP (connect6/getpeername6).
    let hop6 = call(&sb, a, stage2_v6, 1 << 20, || {}).unwrap();
    assert!(hop6.intact(), "{}", hop6.report);
    assert_eq!(hop6.client_segs, 0, "{}", hop6.report);
    assert_eq!(hop6.report["peer_addr"], stage2_v6.to_string());
    let peers = served_peers(srv);
    assert!(
        peers.contains(&ip(a)) && peers.contains(&ip(c)),
        "{peers:?}"
    );

    // 3. A Service whose only local backend is in another chain: plain path.
    write_service_file(
        &services,
        "far",
        &[
            service("far", far.ip(), far.port(), PORT),
            endpoint_slice("far", PORT, &[(ip(d), true)]),
        ],
    )
    .unwrap();
    meshd
        .wait_status(T, "far listed", |s| local_backends(s, far) == 1)
        .unwrap();
    let srv = serve(&sb, d, 1);
    let other = call(&sb, a, far, 1 << 20, || {}).unwrap();
    assert!(other.intact() && other.client_segs > 0, "{}", other.report);
    assert_eq!(other.report["peer_addr"], far.to_string());
    served_peers(srv);

    // 4. The table changes while a translated transfer runs: a second
    //    backend is added, then the first is marked terminating. The running
    //    connection finishes intact; the next one goes to the remaining
    //    backend.
    let srv_b = serve(&sb, b, 1);
    let running = sb
        .spawn_peer(
            a,
            &[
                "send",
                "--connect",
                &stage2.to_string(),
                "--bytes",
                &(64u64 << 20).to_string(),
                "--chunk",
                "64",
            ],
        )
        .unwrap();
    write_stage2(&services, stage2, &[(ip(b), true), (ip(e), true)]);
    meshd
        .wait_status(T, "two local backends", |s| local_backends(s, stage2) == 2)
        .unwrap();
    write_stage2(&services, stage2, &[(ip(b), false), (ip(e), true)]);
    let s = meshd
        .wait_status(T, "b out of selection", |s| local_backends(s, stage2) == 1)
        .unwrap();
    assert_eq!(
        service_status(&s, stage2).unwrap()["local_backends"][0]["address"],
        SocketAddr::new(ip(e), PORT).to_string()
    );
    assert!(
        running.line(Duration::from_millis(1)).is_err(),
        "the transfer must still be running while the table changes"
    );
    let r = running.report(T).unwrap();
    running.finish(T).unwrap();
    assert_eq!(r["intact"], true, "{r}");
    assert_eq!(served_peers(srv_b), vec![ip(a)]);
    let srv_e = serve(&sb, e, 1);
    let next = call(&sb, a, stage2, 1 << 20, || {}).unwrap();
    assert!(next.intact() && next.client_segs == 0, "{}", next.report);
    assert_eq!(served_peers(srv_e), vec![ip(a)]);

    // Counters and the CLI view.
    let s = meshd.status().unwrap();
    let n = service_status(&s, stage2).unwrap()["translated_connections"]
        .as_u64()
        .unwrap();
    assert_eq!(n, 3, "three translated stage2 connections: {s:#}");
    assert!(
        translations(&s).is_empty(),
        "closed connections leave the translation map: {s:#}"
    );
    let metrics = meshd.check_metrics().unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("spright_service_translations_total{")
                && l.contains("address=\"10.96.0.10:80\"")
                && l.ends_with(" 3")),
        "{metrics}"
    );

    // `spright status` without meshd reads the pinned maps and the files.
    drop(meshd);
    let out = std::process::Command::new(workspace_bin("spright"))
        .args(["status", "--addr", "127.0.0.1:1", "--bpffs"])
        .arg(&sb.pins.path)
        .arg("--state-dir")
        .arg(state.path())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let row = table
        .lines()
        .find(|l| l.contains("stage2 ") && l.contains("10.96.0.10:80"))
        .unwrap_or_else(|| panic!("no stage2 row: {table}"));
    assert!(
        row.contains("default/pod4@shop") && row.trim_end().ends_with(" 3"),
        "{row}"
    );
}

/// meshd's Kubernetes API source (kube-rs watches), against the API fake of
/// `spright_tests::kubeapi` since no API server runs here: the table follows
/// the API's Services and EndpointSlices, including a backend turning
/// not-ready and a Service being deleted.
#[test]
fn privileged_services_follow_the_kubernetes_api() {
    if !privileged::require("privileged_services_follow_the_kubernetes_api") {
        return;
    }
    let mut sb = Sandbox::new("kapi").unwrap();
    let state = tempfile::tempdir().unwrap();
    let (a, b, e) = (
        sb.add_pod().unwrap(),
        sb.add_pod().unwrap(),
        sb.add_pod().unwrap(),
    );
    for pod in [a, b, e] {
        sb.record_pod(state.path(), pod, Some("shop")).unwrap();
    }
    let ip = |p: usize| IpAddr::V4(sb.pods[p].ip);
    let stage2: SocketAddr = "10.96.0.30:80".parse().unwrap();
    let api = spright_tests::kubeapi::FakeApi::start().unwrap();
    let svc = service("stage2", stage2.ip(), stage2.port(), PORT);
    api.apply(svc.clone());
    api.apply(endpoint_slice("stage2", PORT, &[(ip(b), true)]));
    let kubeconfig = api.kubeconfig(state.path()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let meshd = Meshd::start_with(
        &sb.placement(),
        state.path(),
        &format!("127.0.0.1:{port}"),
        &[
            "--kubernetes",
            "on",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ],
    )
    .unwrap();
    let s = meshd
        .wait_status(T, "the API's Service with its local backend", |s| {
            s["kubernetes"]["state"] == "synced" && local_backends(s, stage2) == 1
        })
        .unwrap();
    assert_eq!(s["kubernetes"]["services"], 1, "{s:#}");

    let srv = serve(&sb, b, 1);
    let hop = call(&sb, a, stage2, 1 << 20, || {}).unwrap();
    assert!(hop.intact() && hop.client_segs == 0, "{}", hop.report);
    assert_eq!(hop.report["peer_addr"], stage2.to_string());
    assert_eq!(served_peers(srv), vec![ip(a)]);

    // The EndpointSlice marks b terminating and adds e: b leaves selection.
    api.apply(endpoint_slice(
        "stage2",
        PORT,
        &[(ip(b), false), (ip(e), true)],
    ));
    meshd
        .wait_status(T, "e the only local backend", |s| {
            service_status(s, stage2).is_some_and(|v| {
                v["local_backends"].as_array().is_some_and(|b| {
                    b.len() == 1 && b[0]["address"] == SocketAddr::new(ip(e), PORT).to_string()
                })
            })
        })
        .unwrap();
    let srv = serve(&sb, e, 1);
    let hop = call(&sb, a, stage2, 1 << 20, || {}).unwrap();
    assert!(hop.intact() && hop.client_segs == 0, "{}", hop.report);
    assert_eq!(served_peers(srv), vec![ip(a)]);

    // The Service is deleted: its entries leave the kernel's table.
    api.delete(&svc);
    meshd
        .wait_status(T, "stage2 gone", |s| service_status(s, stage2).is_none())
        .unwrap();
    let dp = spright_ebpf::Datapath::open(&sb.pins.path).unwrap();
    assert!(dp.services().unwrap().is_empty());
}

/// A node installed before Service translation existed (no connect and
/// getpeername links, no service maps) is upgraded in place by meshd's
/// start-up (`Datapath::ensure_current`), and translation then works.
#[test]
fn privileged_services_upgrade_an_install_that_predates_them() {
    if !privileged::require("privileged_services_upgrade_an_install_that_predates_them") {
        return;
    }
    let mut sb = Sandbox::new("supg").unwrap();
    let state = tempfile::tempdir().unwrap();
    let (a, b) = (sb.add_pod().unwrap(), sb.add_pod().unwrap());
    for pod in [a, b] {
        sb.record_pod(state.path(), pod, Some("shop")).unwrap();
    }
    // Install, then take away everything the older datapath did not have.
    drop(spright_ebpf::Datapath::ensure(&sb.placement()).unwrap());
    let names = spright_ebpf::names::SOCK_ADDR_PROGS
        .iter()
        .map(|(_, pin)| *pin)
        .chain([
            spright_ebpf::names::NETNS,
            spright_ebpf::names::SERVICES,
            spright_ebpf::names::TRANSLATIONS,
            spright_ebpf::names::SERVICE_COUNTERS,
        ]);
    for name in names {
        std::fs::remove_file(sb.pins.path.join(name)).unwrap();
    }
    let old = spright_ebpf::Datapath::open(&sb.pins.path).unwrap();
    let e = old.services().unwrap_err().to_string();
    assert!(e.contains("restart meshd"), "{e}");
    drop(old);

    let stage2: SocketAddr = "10.96.0.40:80".parse().unwrap();
    write_stage2(
        &state.path().join("services"),
        stage2,
        &[(IpAddr::V4(sb.pods[b].ip), true)],
    );
    let meshd = Meshd::start(&sb.placement(), state.path()).unwrap();
    let s = meshd
        .wait_status(T, "stage2 in the upgraded table", |s| {
            local_backends(s, stage2) == 1
        })
        .unwrap();
    assert_eq!(s["acceleration"]["datapath"], "upgraded", "{s:#}");
    for (_, pin) in spright_ebpf::names::SOCK_ADDR_PROGS {
        assert!(sb.pins.path.join(pin).exists(), "{pin} not pinned");
    }
    let srv = serve(&sb, b, 1);
    let hop = call(&sb, a, stage2, 1 << 20, || {}).unwrap();
    assert!(hop.intact() && hop.client_segs == 0, "{}", hop.report);
    assert_eq!(hop.report["peer_addr"], stage2.to_string());
    assert_eq!(served_peers(srv), vec![IpAddr::V4(sb.pods[a].ip)]);
}
