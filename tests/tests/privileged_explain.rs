//! `spright explain` against what actually happens: for each case of the
//! policy (same chain, other chain, an end opted out, an end in no chain, a
//! destination that is no endpoint, a Service address translated or left to
//! kube-proxy) the command's verdict is read first, then a real connection is
//! made between the pods and the kernel's own counter says whether it was
//! redirected. The two must agree, and each case must give its reason.
//!
//! The node: a sandbox with meshd reconciling the endpoint records and a
//! Service file into the maps, kube-proxy emulated by an iptables DNAT rule.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use spright_tests::{
    meshd::Meshd,
    privileged,
    sandbox::{Sandbox, workspace_bin},
    services::{endpoint_slice, kube_proxy_dnat, service, service_status, write_service_file},
};

const T: Duration = Duration::from_mins(1);
const PORT: u16 = 7000;

/// (what, from, to, port, the pod serving, the address dialled, the verdict).
type Case = (
    &'static str,
    String,
    String,
    Option<u16>,
    usize,
    SocketAddr,
    &'static str,
);

#[test]
fn privileged_explain_agrees_with_the_kernel() {
    if !privileged::require("privileged_explain_agrees_with_the_kernel") {
        return;
    }
    let mut sb = Sandbox::new("exp").unwrap();
    let state = tempfile::tempdir().unwrap();
    // a, b: chain shop; c: chain cart; d: shop, opted out; e: recorded in
    // no chain; f: not recorded at all.
    let pods: Vec<usize> = (0..6).map(|_| sb.add_pod().unwrap()).collect();
    let (a, b, c, d, e, f) = (pods[0], pods[1], pods[2], pods[3], pods[4], pods[5]);
    for (pod, chain) in [
        (a, Some("shop")),
        (b, Some("shop")),
        (c, Some("cart")),
        (d, Some("shop")),
        (e, None),
    ] {
        let mut r = sb.record_pod(state.path(), pod, chain).unwrap();
        if pod == d {
            r.redirect = false;
            spright_endpoint::write(state.path(), &r).unwrap();
        }
    }
    let ip = |p: usize| IpAddr::V4(sb.pods[p].ip);
    let svc: SocketAddr = "10.96.0.10:80".parse().unwrap();
    kube_proxy_dnat(&sb.node, svc, SocketAddr::new(ip(b), PORT)).unwrap();
    write_service_file(
        &state.path().join("services"),
        "web",
        &[
            service("web", svc.ip(), svc.port(), PORT),
            endpoint_slice("web", PORT, &[(ip(b), true)]),
        ],
    )
    .unwrap();
    let meshd = Meshd::start(&sb.placement(), state.path()).unwrap();
    meshd
        .wait_status(T, "the Service with its local backend", |s| {
            service_status(s, svc)
                .and_then(|v| v["local_backends"].as_array())
                .is_some_and(|b| b.len() == 1)
        })
        .unwrap();

    let explain = |from: &str, to: &str, port: Option<u16>| -> Value {
        let mut cmd = Command::new(workspace_bin("spright"));
        cmd.args(["explain", "--json"])
            .arg("--state-dir")
            .arg(state.path())
            .arg("--bpffs")
            .arg(&sb.pins.path)
            .args([from, to]);
        if let Some(p) = port {
            cmd.arg(p.to_string());
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "spright explain {from} {to}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // What the kernel did with one new connection from pod `from` to `dial`
    // (served by pod `server`): its accelerated-sockets counter moves only
    // when sockops put the socket into the sockhash. With the client's
    // address, which names the connection's flow.
    let happened = |from: usize, server: usize, dial: SocketAddr| -> (bool, String) {
        let dp = spright_ebpf::Datapath::open(&sb.pins.path).unwrap();
        let before = dp.counters(ip(from)).unwrap().accelerated_socks;
        let srv = sb
            .spawn_peer(server, &["serve", "--listen", &format!("0.0.0.0:{PORT}")])
            .unwrap();
        assert_eq!(srv.line(T).unwrap(), "ready");
        let cli = sb
            .spawn_peer(
                from,
                &["send", "--connect", &dial.to_string(), "--bytes", "65536"],
            )
            .unwrap();
        let sent = cli.report(T).unwrap();
        assert_eq!(sent["intact"], true, "{sent}");
        cli.finish(T).unwrap();
        srv.finish(T).unwrap();
        (
            dp.counters(ip(from)).unwrap().accelerated_socks > before,
            sent["local"].as_str().unwrap().to_owned(),
        )
    };
    // The flow meshd reports for the connection from `client`, once closed.
    let flow_of = |client: &str| -> Value {
        let deadline = std::time::Instant::now() + T;
        loop {
            let reply: Value = serde_json::from_str(&meshd.get("/v1/flows").unwrap()).unwrap();
            let found = reply["flows"].as_array().and_then(|fs| {
                fs.iter()
                    .find(|f| f["client"]["addr"] == client && f["state"] == "closed")
                    .cloned()
            });
            if let Some(f) = found {
                return f;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no closed flow from {client}: {reply:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let to_pod = |p: usize| SocketAddr::new(ip(p), PORT);
    let name = |p: usize| format!("default/pod{p}");
    let f_ip = ip(f).to_string();
    let cases: Vec<Case> = vec![
        (
            "same chain",
            name(a),
            name(b),
            None,
            b,
            to_pod(b),
            "SameChain",
        ),
        (
            "other chain",
            name(a),
            name(c),
            None,
            c,
            to_pod(c),
            "OtherChain",
        ),
        (
            "destination opted out",
            name(a),
            name(d),
            None,
            d,
            to_pod(d),
            "RemoteOptedOut",
        ),
        (
            "source opted out",
            name(d),
            name(a),
            None,
            a,
            to_pod(a),
            "LocalOptedOut",
        ),
        (
            "destination in no chain",
            name(a),
            name(e),
            None,
            e,
            to_pod(e),
            "NotInChain",
        ),
        (
            "destination not recorded",
            name(a),
            f_ip.clone(),
            None,
            f,
            to_pod(f),
            "RemoteNotEndpoint",
        ),
        (
            "Service, translated",
            name(a),
            svc.ip().to_string(),
            Some(svc.port()),
            b,
            svc,
            "SameChain",
        ),
        (
            "Service, other chain's caller",
            name(c),
            svc.ip().to_string(),
            Some(svc.port()),
            b,
            svc,
            "RemoteNotEndpoint",
        ),
    ];
    let mut seen = Vec::new();
    for (what, from, to, port, server, dial, want) in cases {
        let e = explain(&from, &to, port);
        let from_pod = pods[from
            .strip_prefix("default/pod")
            .unwrap()
            .parse::<usize>()
            .unwrap()];
        let (did, client) = happened(from_pod, server, dial);
        eprintln!(
            "{what}: explain says {} ({}), the kernel {}",
            e["verdict"],
            e["reason"],
            if did { "redirected" } else { "did not" }
        );
        assert_eq!(e["verdict"], want, "{what}: {e:#}");
        assert_eq!(
            e["redirected"], did,
            "{what}: explain and the kernel disagree: {e:#}"
        );
        assert!(
            !e["reason"].as_str().unwrap_or_default().is_empty(),
            "{e:#}"
        );
        // The flow event says the same, from the kernel, with the bytes:
        // the client sent an 8-byte length and 65,536 bytes, the server a
        // 1-byte greeting and a 16-byte reply.
        let f = flow_of(&client);
        eprintln!("{what}: flow {f}");
        assert_eq!(f["verdict"], want, "{what}: {f:#}");
        assert_eq!(
            f["path"],
            if did { "redirected" } else { "tcp" },
            "{what}: {f:#}"
        );
        // A translated connection's server is the backend itself.
        let server_addr = if what.ends_with("translated") {
            to_pod(server)
        } else {
            dial
        };
        assert_eq!(
            f["server"]["addr"],
            server_addr.to_string(),
            "{what}: {f:#}"
        );
        assert_eq!(f["bytes"]["client_to_server"], 8 + 65_536, "{what}: {f:#}");
        assert_eq!(f["bytes"]["server_to_client"], 1 + 16, "{what}: {f:#}");
        assert_eq!(f["client"]["pod"], from.as_str(), "{what}: {f:#}");
        seen.push(did);
        if port.is_some() {
            let translated = what.ends_with("translated");
            assert_eq!(e["translated"], translated, "{what}: {e:#}");
            let backends = e["service"]["backends"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert_eq!(backends.len(), usize::from(translated), "{what}: {e:#}");
            if translated {
                assert_eq!(f["service"], svc.to_string(), "{what}: {f:#}");
            } else {
                assert!(f.get("service").is_none(), "{what}: {f:#}");
            }
        }
    }
    assert!(seen.iter().any(|d| *d) && seen.iter().any(|d| !*d));

    // The text form names the verdict and the reason.
    let out = Command::new(workspace_bin("spright"))
        .args(["explain", "--state-dir"])
        .arg(state.path())
        .arg("--bpffs")
        .arg(&sb.pins.path)
        .args([&name(a), &name(c)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("NOT REDIRECTED") && text.contains("different chains"),
        "{text}"
    );
    // An unknown pod is an error that says so.
    let out = Command::new(workspace_bin("spright"))
        .args(["explain", "--state-dir"])
        .arg(state.path())
        .arg("--bpffs")
        .arg(&sb.pins.path)
        .args(["default/nosuch", &name(a)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no pod default/nosuch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(meshd);
}
