//! Privileged tier: faults during transfers on the redirect path — the
//! datapath detached (uninstall, the DaemonSet's cleanup) and the server pod
//! killed — compared with what plain TCP shows.

use std::time::Duration;

use spright_tests::{
    privileged,
    sandbox::{Peer, Sandbox},
    scenario::{data_segs_out, sockops_ids, transfer},
};

const T: Duration = Duration::from_mins(1);
const BYTES: u64 = 256 << 20;

/// Two pods, the datapath installed, both in chain "alpha" when `chain`.
fn pair(tag: &str, chain: bool) -> (Sandbox, spright_ebpf::Datapath) {
    let mut sb = Sandbox::new(tag).expect("sandbox");
    let (a, b) = (sb.add_pod().expect("pod"), sb.add_pod().expect("pod"));
    let (mut dp, _) = spright_ebpf::Datapath::ensure(&sb.placement()).expect("datapath");
    sb.set_chain(&mut dp, &[a, b], chain.then_some("alpha"))
        .expect("chain");
    (sb, dp)
}

/// A 256 MiB transfer from pod 0 to a server on pod 1 (accepting `conns`
/// connections), still running when this returns.
fn running_transfer(sb: &Sandbox, conns: &str, client_args: &[&str]) -> (Peer, Peer, String) {
    let server = format!("{}:7000", sb.pods[1].ip);
    let srv = sb
        .spawn_peer(1, &["serve", "--listen", &server, "--conns", conns])
        .unwrap();
    assert_eq!(srv.line(T).unwrap(), "ready");
    let bytes = BYTES.to_string();
    let mut args = vec!["send", "--connect", &server, "--bytes", &bytes];
    args.extend_from_slice(client_args);
    let client = sb.spawn_peer(0, &args).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        client.line(Duration::ZERO).is_err(),
        "the transfer ended before the fault"
    );
    (srv, client, server)
}

#[test]
fn privileged_faults_detach_mid_transfer() {
    if !privileged::require("privileged_faults_detach_mid_transfer") {
        return;
    }
    let (sb, dp) = pair("f", true);
    let (srv, mut client, _) = running_transfer(&sb, "1", &["--hold"]);
    let before = dp.counters(sb.pods[0].ip.into()).unwrap().redirected_bytes;
    assert!(
        before > 0,
        "the transfer was not redirected before the detach"
    );
    drop(dp);
    spright_ebpf::uninstall(&sb.pins.path).expect("uninstall");
    let r = client
        .report(T)
        .expect("the transfer neither finished nor failed after the detach");
    assert_eq!(
        r["intact"], true,
        "bytes lost or reordered when the datapath was detached mid-transfer: {r:#}"
    );
    // The connection kept its path to the end: sockets already in the
    // sockhash keep their psock (and its sk_msg program) after the datapath
    // is uninstalled; only new connections are no longer accelerated.
    let local: std::net::SocketAddr = r["local"].as_str().unwrap().parse().unwrap();
    let sport = format!(":{}", local.port());
    let segs = data_segs_out(&sb.pods[0], &["sport", "=", &sport]).unwrap();
    assert_eq!(segs, 0, "the connection switched to TCP after the detach");
    client.release();
    client.finish(T).unwrap();
    srv.finish(T).unwrap();

    // A connection made after the detach takes the TCP path.
    let server = format!("{}:7001", sb.pods[1].ip);
    let srv = sb.spawn_peer(1, &["serve", "--listen", &server]).unwrap();
    assert_eq!(srv.line(T).unwrap(), "ready");
    let t = transfer(&sb, 0, &sb.pods[1], &server, 1 << 20).unwrap();
    assert!(t.intact && t.client_data_segs_out > 0, "{t:?}");
    srv.finish(T).unwrap();
}

/// The server pod's process is killed mid-transfer (the pod is deleted): on
/// both paths the sender fails promptly instead of hanging. (Which errno it
/// sees — EPIPE on the redirect path, ECONNRESET on TCP — is covered by the
/// reliability suite's "receiver closes early" pattern.)
#[test]
fn privileged_faults_server_killed_mid_transfer() {
    if !privileged::require("privileged_faults_server_killed_mid_transfer") {
        return;
    }
    for chain in [false, true] {
        let (sb, dp) = pair(if chain { "kr" } else { "kp" }, chain);
        let (srv, client, _) = running_transfer(&sb, "1", &[]);
        drop(srv); // SIGKILL, as when the pod is deleted
        let err = client
            .finish(T)
            .expect_err("the sender did not notice its peer died");
        assert!(
            err.to_string().contains("exited with"),
            "chain={chain}: the sender hung instead of failing: {err:#}"
        );
        let redirected = dp.counters(sb.pods[0].ip.into()).unwrap().redirected_bytes;
        assert_eq!(
            redirected > 0,
            chain,
            "chain={chain}: redirected {redirected} bytes"
        );
    }
}

/// The DaemonSet's upgrade path: this build's programs are swapped in while a
/// transfer runs. The running connection keeps the programs it started with
/// and loses nothing; new connections are redirected by the new programs; one
/// sockops program stays attached.
#[test]
fn privileged_faults_programs_replaced_mid_transfer() {
    if !privileged::require("privileged_faults_programs_replaced_mid_transfer") {
        return;
    }
    let (sb, dp) = pair("u", true);
    let (srv, client, server) = running_transfer(&sb, "2", &[]);
    let old_ids = sockops_ids(&sb.cgroup.path).unwrap();
    drop(dp);
    let dp =
        spright_ebpf::Datapath::replace_programs(&sb.placement()).expect("replacing the programs");
    let new_ids = sockops_ids(&sb.cgroup.path).unwrap();
    assert_eq!(
        new_ids.len(),
        1,
        "one sockops program attached after the swap: {new_ids:?}"
    );
    assert_ne!(old_ids, new_ids, "the sockops program was not replaced");
    let r = client
        .report(T)
        .expect("the transfer neither finished nor failed after the upgrade");
    assert_eq!(
        r["intact"], true,
        "bytes lost or reordered across the upgrade: {r:#}"
    );
    client.finish(T).unwrap();

    // The maps survived (the endpoints are still there) and a new connection
    // is redirected by the new programs.
    let t = transfer(&sb, 0, &sb.pods[1], &server, 1 << 20).unwrap();
    assert!(
        t.intact && t.client_data_segs_out == 0 && t.server_data_segs_out == 0,
        "{t:?}"
    );
    let c = dp.counters(sb.pods[0].ip.into()).unwrap();
    assert_eq!(c.redirected_bytes, BYTES + 8 + (1 << 20) + 8, "{c:?}");
    srv.finish(T).unwrap();
}
