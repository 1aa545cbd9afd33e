//! Privileged tier: the foundation's smoke test. Real programs built from
//! source in this build, a cgroup and namespaces created by the test.

use spright_tests::{privileged, scenario};

#[test]
fn privileged_smoke_chain_traffic_goes_socket_to_socket() {
    if !privileged::require("privileged_smoke_chain_traffic_goes_socket_to_socket") {
        return;
    }
    let bytes = 16 << 20;
    let r = scenario::smoke(bytes, &mut |l| eprintln!("{l}")).expect("smoke scenario");

    // (a) the data arrived intact, on both paths.
    assert!(r.chain.intact, "chain transfer corrupted: {r:#?}");
    assert!(r.outsider.intact, "outsider transfer corrupted: {r:#?}");
    assert_eq!(r.chain.bytes, bytes);

    // (b) chain traffic went socket to socket: no TCP data segment in either
    // direction, and the redirect counters account for every byte (payload +
    // 8-byte length header from A; greeting + 16-byte reply from B).
    assert_eq!(
        r.chain.client_data_segs_out, 0,
        "client sent TCP data segments: {r:#?}"
    );
    assert_eq!(
        r.chain.server_data_segs_out, 0,
        "server sent TCP data segments: {r:#?}"
    );
    assert_eq!(
        r.chain_client_counters.redirected_bytes,
        bytes + 8,
        "{r:#?}"
    );
    assert_eq!(r.chain_client_counters.fallback_msgs, 0, "{r:#?}");
    assert_eq!(r.chain_server_counters.redirected_bytes, 1 + 16, "{r:#?}");
    assert!(r.chain_client_counters.accelerated_socks >= 1, "{r:#?}");

    // Control: the outsider's connection used TCP, so the ss check can fail.
    assert!(
        r.outsider.client_data_segs_out > 0,
        "outsider sent no TCP segments: {r:#?}"
    );
}
