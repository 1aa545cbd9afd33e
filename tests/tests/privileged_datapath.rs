//! Privileged tier: the kernel datapath driven the way a node runs it — pods
//! recorded in the state directory (as spright-cni does), meshd reconciling the
//! pinned maps from those records, real programs, real namespaces.

use std::time::Duration;

use spright_endpoint::Record;
use spright_tests::{
    meshd::{Meshd, endpoint},
    privileged,
    sandbox::{Peer, Sandbox},
    scenario::{Transfer, transfer},
};

const T: Duration = Duration::from_mins(1);

/// A sandbox with `pods` pods, the given chain per pod, meshd running and
/// every recorded pod in the datapath.
fn node(tag: &str, chains: &[Option<&str>]) -> (Sandbox, tempfile::TempDir, Meshd) {
    let (sb, state, meshd, _) = node_with_records(tag, chains);
    (sb, state, meshd)
}

fn node_with_records(
    tag: &str,
    chains: &[Option<&str>],
) -> (Sandbox, tempfile::TempDir, Meshd, Vec<Record>) {
    let mut sb = Sandbox::new(tag).expect("sandbox");
    let state = tempfile::tempdir().expect("state dir");
    let mut records = Vec::new();
    for (i, chain) in chains.iter().enumerate() {
        sb.add_pod().expect("pod");
        records.push(sb.record_pod(state.path(), i, *chain).expect("record"));
    }
    let meshd = Meshd::start(&sb.placement(), state.path()).expect("meshd");
    let n = chains.len();
    meshd.wait_in_datapath(n, T).expect("reconciled");
    (sb, state, meshd, records)
}

fn serve(sb: &Sandbox, pod: usize, addr: &str, conns: usize) -> Peer {
    let p = sb
        .spawn_peer(
            pod,
            &["serve", "--listen", addr, "--conns", &conns.to_string()],
        )
        .expect("server");
    assert_eq!(p.line(T).expect("server start"), "ready");
    p
}

fn assert_redirected(t: &Transfer, what: &str) {
    assert!(t.intact, "{what}: data not intact: {t:?}");
    assert_eq!(
        (t.client_data_segs_out, t.server_data_segs_out),
        (0, 0),
        "{what}: TCP data segments seen, so not redirected: {t:?}"
    );
}

fn assert_tcp_path(t: &Transfer, what: &str) {
    assert!(t.intact, "{what}: data not intact: {t:?}");
    assert!(
        t.client_data_segs_out > 0,
        "{what}: no TCP data segments, so it was redirected: {t:?}"
    );
}

#[test]
fn privileged_datapath_policy_sizes_and_concurrency() {
    if !privileged::require("privileged_datapath_policy_sizes_and_concurrency") {
        return;
    }
    // 0 and 1: chain "alpha"; 2: chain "beta"; 3: no chain.
    let (sb, _state, meshd) = node("d", &[Some("alpha"), Some("alpha"), Some("beta"), None]);
    let server = format!("{}:7000", sb.pods[1].ip);

    // Sizes 64 B … 16 MiB: intact and socket to socket.
    let sizes = [64u64, 4 << 10, 64 << 10, 1 << 20, 16 << 20];
    let srv = serve(&sb, 1, &server, sizes.len() + 2);
    for bytes in sizes {
        let t = transfer(&sb, 0, &sb.pods[1], &server, bytes).expect("transfer");
        assert_redirected(&t, &format!("chain pod, {bytes} bytes"));
    }
    // Another chain, and no chain: TCP path, still working.
    let other = transfer(&sb, 2, &sb.pods[1], &server, 1 << 20).expect("other chain");
    assert_tcp_path(&other, "pod of another chain");
    let outsider = transfer(&sb, 3, &sb.pods[1], &server, 1 << 20).expect("outsider");
    assert_tcp_path(&outsider, "pod outside any chain");
    srv.finish(T).expect("server");

    // 120 concurrent connections.
    let before =
        endpoint(&meshd.status().unwrap(), "pod0").unwrap()["counters"]["accelerated_sockets"]
            .as_u64()
            .unwrap();
    let server = format!("{}:7001", sb.pods[1].ip);
    let srv = serve(&sb, 1, &server, 120);
    let client = sb
        .spawn_peer(
            0,
            &[
                "send",
                "--connect",
                &server,
                "--bytes",
                "65536",
                "--parallel",
                "120",
            ],
        )
        .expect("client");
    let r = client.report(T).expect("report");
    assert_eq!(r["connections"], 120);
    assert_eq!(r["intact"], true, "{r:#}");
    client.finish(T).expect("client");
    srv.finish(T).expect("server");
    let s = meshd.status().unwrap();
    let after = endpoint(&s, "pod0").unwrap()["counters"]["accelerated_sockets"]
        .as_u64()
        .unwrap();
    assert_eq!(
        after - before,
        120,
        "every concurrent connection accelerated: {s:#}"
    );
    let fallbacks = endpoint(&s, "pod0").unwrap()["counters"]["fallback_messages"]
        .as_u64()
        .unwrap();
    assert_eq!(fallbacks, 0, "{s:#}");
    // The outsider and the other chain never show up in the counters.
    for pod in ["pod2", "pod3"] {
        assert_eq!(
            endpoint(&s, pod).unwrap()["counters"]["redirected_bytes"],
            0,
            "{pod}: {s:#}"
        );
    }
}

#[test]
fn privileged_datapath_ipv6_and_dual_stack_listener() {
    if !privileged::require("privileged_datapath_ipv6_and_dual_stack_listener") {
        return;
    }
    let (sb, _state, _meshd) = node("6", &[Some("alpha"), Some("alpha")]);

    let v6 = format!("[{}]:7000", sb.pods[1].ip6);
    let srv = serve(&sb, 1, &v6, 1);
    let t = transfer(&sb, 0, &sb.pods[1], &v6, 1 << 20).expect("v6 transfer");
    assert_redirected(&t, "IPv6");
    srv.finish(T).expect("server");

    // A server on [::] accepting an IPv4 client: its socket carries the
    // IPv4-mapped addresses, the client's plain IPv4; the keys must pair.
    let srv = serve(&sb, 1, "[::]:7001", 1);
    let v4 = format!("{}:7001", sb.pods[1].ip);
    let t = transfer(&sb, 0, &sb.pods[1], &v4, 1 << 20).expect("dual-stack transfer");
    assert_redirected(&t, "IPv4 client to a dual-stack [::] listener");
    srv.finish(T).expect("server");
}

#[test]
fn privileged_datapath_pod_deleted_while_connected() {
    if !privileged::require("privileged_datapath_pod_deleted_while_connected") {
        return;
    }
    let (mut sb, state, meshd, records) = node_with_records("x", &[Some("alpha"), Some("alpha")]);
    let server = format!("{}:7000", sb.pods[1].ip);
    let srv = serve(&sb, 1, &server, 1);
    let mut client = sb
        .spawn_peer(
            0,
            &["send", "--connect", &server, "--bytes", "4096", "--hold"],
        )
        .expect("client");
    assert_eq!(client.report(T).expect("report")["intact"], true);

    // Delete pod 1 the way the runtime does: its processes die, CNI DEL removes
    // the record, the namespace (and its veth) goes away.
    drop(srv);
    spright_endpoint::remove(state.path(), &records[1].container_id, "eth0")
        .expect("remove record");
    drop(sb.pods.remove(1));

    let s = meshd
        .wait_status(T, "pod1 gone from the datapath", |s| {
            endpoint(s, "pod1").is_none()
        })
        .expect("reconciled");
    assert_eq!(s["endpoints"].as_array().unwrap().len(), 1);
    let in_map: Vec<_> = spright_ebpf::Datapath::open(&sb.pins.path)
        .expect("pinned datapath")
        .endpoints()
        .expect("endpoint map")
        .into_iter()
        .map(|(ip, _)| ip)
        .collect();
    for ip in &records[1].ips {
        assert!(
            !in_map.contains(ip),
            "{ip} of the deleted pod is still in the map: {in_map:?}"
        );
    }
    assert!(
        records[0].ips.iter().all(|ip| in_map.contains(ip)),
        "{in_map:?}"
    );
    // The peer sees the connection end and exits; nothing hangs.
    client.release();
    client
        .finish(T)
        .expect("client exits after its peer is gone");
}
