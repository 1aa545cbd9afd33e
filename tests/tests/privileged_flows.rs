//! Flow events for the fates that are not a policy verdict, each produced by
//! its situation (privileged_explain covers every verdict, translation and
//! the close's byte counts; privileged_membound the memory bound's switch):
//!
//! - a connection between two chain pods established before the programs
//!   were attached: sockops never saw it, meshd's sock_diag scan reports it
//!   as `EstablishedBeforeAttach`, and `spright flows` prints it by pod name;
//! - a redirected connection whose receiver closes while the sender still
//!   writes: the sender's next message finds no peer in the sockhash, goes
//!   to TCP, and the kernel reports the switch (`PeerMissing`).

use std::{process::Command, time::Duration};

use serde_json::Value;
use spright_tests::{
    meshd::Meshd,
    privileged,
    sandbox::{Sandbox, workspace_bin},
};

const T: Duration = Duration::from_mins(1);

/// Waits until meshd's `/v1/flows` has a flow that `pick` accepts.
fn wait_flow(meshd: &Meshd, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + T;
    loop {
        let reply: Value = serde_json::from_str(&meshd.get("/v1/flows").unwrap()).unwrap();
        if let Some(f) = reply["flows"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| pick(f)).cloned())
        {
            return f;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no flow {what}: {reply:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn privileged_flows_before_attach_and_peer_missing() {
    if !privileged::require("privileged_flows_before_attach_and_peer_missing") {
        return;
    }
    let mut sb = Sandbox::new("flw").unwrap();
    let state = tempfile::tempdir().unwrap();
    let (a, b) = (sb.add_pod().unwrap(), sb.add_pod().unwrap());
    for pod in [a, b] {
        sb.record_pod(state.path(), pod, Some("flows")).unwrap();
    }
    let b_ip = sb.pods[b].ip;

    // A connection made while no program is attached.
    let addr = format!("{b_ip}:7100");
    let server = sb
        .spawn_torture(
            b,
            &["server", "basic", "--listen", &addr, "--bytes", "65536"],
        )
        .unwrap();
    assert_eq!(server.line(T).unwrap(), "ready");
    let mut client = sb
        .spawn_torture(
            a,
            &[
                "client",
                "preattach",
                "--connect",
                &addr,
                "--bytes",
                "65536",
            ],
        )
        .unwrap();
    let first = client.report(T).unwrap();
    assert_eq!(first["before"]["intact"], true, "{first}");
    let local = first["local"].as_str().unwrap().to_owned();

    let meshd = Meshd::start(&sb.placement(), state.path()).unwrap();
    let f = wait_flow(&meshd, "established before attach", |f| {
        f["client"]["addr"] == local.as_str()
    });
    eprintln!("before attach: {f}");
    assert_eq!(f["verdict"], "EstablishedBeforeAttach", "{f:#}");
    assert_eq!(f["path"], "tcp", "{f:#}");
    assert_eq!(f["server"]["addr"], addr.as_str(), "{f:#}");
    assert_eq!(f["client"]["pod"], "default/pod0", "{f:#}");
    assert_eq!(f["server"]["pod"], "default/pod1", "{f:#}");
    // It really stays on TCP.
    client.release();
    let second = client.report(T).unwrap();
    assert_eq!(second["intact"], true, "{second}");
    client.finish(T).unwrap();
    server.finish(T).unwrap();

    // `spright flows` prints it by pod name, with the reason; --pod filters.
    let flows = |args: &[&str]| -> String {
        let out = Command::new(workspace_bin("spright"))
            .args(["flows", "--addr", &meshd.addr])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "spright flows {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = flows(&["--pod", "pod0"]);
    eprintln!("spright flows --pod pod0:\n{text}");
    assert!(
        text.starts_with("STATE") && text.contains("EstablishedBeforeAttach"),
        "{text}"
    );
    assert!(
        text.contains("default/pod0") && text.contains("default/pod1"),
        "{text}"
    );
    assert!(
        text.contains("established before the programs were attached"),
        "{text}"
    );
    assert_eq!(
        flows(&["--pod", "nosuch"]).lines().count(),
        1,
        "a header only"
    );

    // The receiver reads one byte and closes while the sender writes on.
    let addr = format!("{b_ip}:7101");
    let server = sb
        .spawn_torture(b, &["server", "early-close", "--listen", &addr])
        .unwrap();
    assert_eq!(server.line(T).unwrap(), "ready");
    let client = sb
        .spawn_torture(
            a,
            &[
                "client",
                "early-close",
                "--connect",
                &addr,
                "--bytes",
                "1048576",
            ],
        )
        .unwrap();
    let sent = client.report(T).unwrap();
    eprintln!("early close: {sent}");
    client.finish(T).unwrap();
    server.finish(T).unwrap();
    let f = wait_flow(&meshd, "switched after the receiver closed", |f| {
        f["server"]["addr"] == addr.as_str() && f["state"] == "closed"
    });
    eprintln!("peer missing: {f}");
    assert_eq!(f["path"], "redirected", "{f:#}");
    assert_eq!(f["switched"]["why"], "PeerMissing", "{f:#}");
    assert_eq!(f["switched"]["sender"], "client", "{f:#}");

    // The counts reach the metrics.
    let metrics = meshd.check_metrics().unwrap();
    for event in ["opened", "closed", "switched", "before_attach"] {
        assert!(
            metrics.lines().any(|l| l
                .starts_with(&format!("spright_flow_events_total{{event=\"{event}\"}}"))
                && !l.ends_with(" 0")),
            "{event}: {metrics}"
        );
    }
    drop(meshd);
}
