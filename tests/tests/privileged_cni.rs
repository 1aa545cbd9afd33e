//! Privileged tier: the spright-cni binary driven exactly as a runtime drives
//! it (CNI_* environment, config on stdin, inside a node namespace), with
//! host-local IPAM, real traffic between pods, every bad input of issue 3,
//! and a check after each step that nothing is left behind.

use std::{net::IpAddr, path::Path};

use serde_json::{Value, json};
use spright_tests::{
    cni::{self, Attach, Node, VERSIONS},
    privileged,
};

const V4: &str = "10.213.0.0/24";
const V6: &str = "fd00:213::/64";

fn require(name: &str) -> bool {
    if !privileged::require(name) {
        return false;
    }
    for tool in ["busybox", "iptables", "nsenter", "/usr/lib/cni/host-local"] {
        let found = tool.starts_with('/') && Path::new(tool).exists()
            || ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
                .iter()
                .any(|d| Path::new(d).join(tool).exists());
        if !found {
            let why = format!(
                "{tool} is missing (apt-get install busybox-static iptables containernetworking-plugins)"
            );
            assert!(
                std::env::var("CI").is_err(),
                "privileged test {name} cannot run in CI: {why}"
            );
            eprintln!("SKIPPED {name}: {why}");
            return false;
        }
    }
    true
}

fn assert_clean(node: &Node) {
    let left = node.leftovers("sprnet").expect("listing leftovers");
    assert!(left.is_empty(), "left behind: {left:#?}");
}

#[test]
fn privileged_cni_every_version_dual_stack_traffic_check_del() {
    if !require("privileged_cni_every_version_dual_stack_traffic_check_del") {
        return;
    }
    let mut node = Node::new("v").unwrap();
    let (a, b) = (node.add_pod().unwrap(), node.add_pod().unwrap());
    for (n, version) in VERSIONS.iter().enumerate() {
        let conf = node.conf(version, &[V4, V6]);
        let mut pa = node.attach(a, &format!("ctr-a-{n}"));
        pa.args =
            "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=a;K8S_POD_UID=ua;SPRIGHT_CHAIN=checkout".into();
        let pb = node.attach(b, &format!("ctr-b-{n}"));
        let ra = node.invoke("ADD", &conf, Some(&pa)).unwrap();
        assert!(ra.ok, "{version}: {ra:#?}");
        let rb = node.invoke("ADD", &conf, Some(&pb)).unwrap();
        assert!(rb.ok, "{version}: {rb:#?}");

        // Result shape of the requested version.
        let res = &ra.stdout;
        assert_eq!(res["cniVersion"], *version);
        let ips = res["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 2, "{res}");
        for ip in ips {
            let has_version = ip.get("version").is_some();
            assert_eq!(has_version, version.starts_with("0."), "{version}: {ip}");
            let idx = usize::try_from(ip["interface"].as_u64().unwrap()).unwrap();
            assert_eq!(res["interfaces"][idx]["name"], "eth0");
            assert_eq!(res["interfaces"][idx]["sandbox"], pa.netns.as_str());
        }
        let a_ips = cni::result_ips(&ra.stdout).unwrap();
        let b_ips = cni::result_ips(&rb.stdout).unwrap();

        // Real traffic, both families, both directions; ping and TCP.
        for (from, to) in [(&node.pods[a], &b_ips), (&node.pods[b], &a_ips)] {
            for ip in to {
                assert!(cni::ping(from, *ip), "{version}: no ping reply from {ip}");
            }
        }
        let port = 7000 + u16::try_from(n).unwrap();
        for ip in &b_ips {
            let got = cni::tcp_exchange(&node.pods[a], &node.pods[b], *ip, port).unwrap();
            assert_eq!(got, format!("hello-{port}"), "{version} TCP to {ip}");
        }

        // Pod b is in no chain: its routes keep TCP's delayed ACKs.
        let routes_b = node.pods[b].ip(&["route", "show"]).unwrap()
            + &node.pods[b].ip(&["-6", "route", "show"]).unwrap();
        assert!(
            routes_b.lines().any(|l| l.starts_with("default")) && !routes_b.contains("quickack"),
            "{routes_b}"
        );

        // Chain pod a's on-link routes carry quickack, its default routes do
        // not; MTU applied; masquerade rules present.
        let routes = node.pods[a].ip(&["route", "show"]).unwrap()
            + &node.pods[a].ip(&["-6", "route", "show"]).unwrap();
        assert!(
            routes.lines().filter(|l| l.starts_with("default")).count() == 2,
            "{routes}"
        );
        for l in routes.lines().filter(|l| !l.starts_with("fe80")) {
            assert_eq!(
                l.contains("quickack 1"),
                !l.starts_with("default"),
                "{routes}"
            );
        }
        assert!(
            node.pods[a]
                .ip(&["link", "show", "eth0"])
                .unwrap()
                .contains("mtu 1400")
        );
        assert_eq!(
            node.masq_rules().unwrap().len(),
            4,
            "two pods, two families"
        );

        // Record and endpoint map.
        let rec = spright_endpoint::find(&node.state_dir(), &pa.container_id, "eth0")
            .unwrap()
            .expect("record");
        assert_eq!(rec.chain.as_deref(), Some("checkout"));
        assert_eq!(rec.pod.namespace, "shop");
        assert_eq!(rec.pod.uid, "ua");
        let mut want: Vec<IpAddr> = a_ips.iter().chain(&b_ips).copied().collect();
        let mut have = node.map_entries().unwrap();
        want.sort();
        have.sort();
        assert_eq!(have, want, "{version}: endpoint map");

        // CHECK (0.4.0 and later) passes on a healthy attachment, fails after
        // the pod's interface is tampered with.
        let mut check_conf = conf.clone();
        check_conf["prevResult"] = ra.stdout.clone();
        let check = node.invoke("CHECK", &check_conf, Some(&pa)).unwrap();
        if version.starts_with("0.3") {
            assert_eq!(check.code(), 1, "{version}: CHECK before 0.4.0");
        } else {
            assert!(check.ok, "{version}: {check:#?}");
        }

        // DEL, twice (idempotent); then nothing is left.
        for at in [&pa, &pb, &pa, &pb] {
            let d = node.invoke("DEL", &conf, Some(at)).unwrap();
            assert!(d.ok, "{version}: {d:#?}");
        }
        assert_clean(&node);
    }
    // A DEL whose netns is gone entirely also succeeds.
    let conf = node.conf("1.0.0", &[V4]);
    let gone = Attach {
        container_id: "ghost".into(),
        netns: "/run/netns/does-not-exist".into(),
        ifname: "eth0".into(),
        args: String::new(),
    };
    assert!(node.invoke("DEL", &conf, Some(&gone)).unwrap().ok);
}

#[test]
fn privileged_cni_check_detects_tampering_and_ipv6_only_works() {
    if !require("privileged_cni_check_detects_tampering_and_ipv6_only_works") {
        return;
    }
    let mut node = Node::new("k").unwrap();
    let (a, b) = (node.add_pod().unwrap(), node.add_pod().unwrap());
    let conf = node.conf("1.1.0", &[V6]);
    let (pa, pb) = (node.attach(a, "k-a"), node.attach(b, "k-b"));
    let ra = node.invoke("ADD", &conf, Some(&pa)).unwrap();
    let rb = node.invoke("ADD", &conf, Some(&pb)).unwrap();
    assert!(ra.ok && rb.ok, "{ra:#?} {rb:#?}");
    let b_ip = cni::result_ips(&rb.stdout).unwrap()[0];
    assert!(b_ip.is_ipv6());
    assert!(cni::ping(&node.pods[a], b_ip));
    let mut check_conf = conf.clone();
    check_conf["prevResult"] = ra.stdout.clone();
    assert!(node.invoke("CHECK", &check_conf, Some(&pa)).unwrap().ok);
    node.pods[a].ip(&["link", "set", "eth0", "down"]).unwrap();
    let c = node.invoke("CHECK", &check_conf, Some(&pa)).unwrap();
    assert_eq!(c.code(), 104, "{c:#?}");
    for at in [&pa, &pb] {
        assert!(node.invoke("DEL", &conf, Some(at)).unwrap().ok);
    }
    assert_clean(&node);
}

#[test]
fn privileged_cni_bad_inputs_fail_with_codes_and_leave_nothing() {
    if !require("privileged_cni_bad_inputs_fail_with_codes_and_leave_nothing") {
        return;
    }
    let mut node = Node::new("b").unwrap();
    let a = node.add_pod().unwrap();
    let good = node.conf("1.0.0", &[V4, V6]);
    let at = node.attach(a, "bad-1");
    let bin = cni::plugin_bin();
    let node_ns = node.node.path();

    // Malformed JSON.
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net={}", node_ns.display()))
        .arg(&bin)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "x")
        .env("CNI_NETNS", &at.netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni::plugin_path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let o = cni::raw_invoke(cmd, b"{\"cniVersion\": \"1.0.0\", ").unwrap();
    assert_eq!(o.code(), 6, "{o:#?}");
    assert!(o.stdout["msg"].as_str().is_some_and(|m| !m.is_empty()));
    assert_clean(&node);

    // Missing environment variables (code 4).
    for missing in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net={}", node_ns.display()))
            .arg(&bin)
            .env("CNI_PATH", cni::plugin_path());
        for (k, v) in [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "m"),
            ("CNI_NETNS", at.netns.as_str()),
            ("CNI_IFNAME", "eth0"),
        ] {
            if k == missing {
                cmd.env_remove(k);
            } else {
                cmd.env(k, v);
            }
        }
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let o = cni::raw_invoke(cmd, &serde_json::to_vec(&good).unwrap()).unwrap();
        assert_eq!(o.code(), 4, "{missing}: {o:#?}");
        assert!(
            o.stdout["msg"].as_str().unwrap().contains(missing),
            "{o:#?}"
        );
        assert_clean(&node);
    }

    // Config and environment errors, each with its code.
    let mut cases: Vec<(&str, Value, Attach, u64)> = Vec::new();
    let missing_ns = Attach {
        netns: "/run/netns/spright-no-such-ns".into(),
        ..at.clone()
    };
    cases.push(("netns does not exist", good.clone(), missing_ns, 3));
    let mut v = good.clone();
    v["cniVersion"] = json!("0.2.0");
    cases.push(("unsupported cniVersion", v, at.clone(), 1));
    let mut v = good.clone();
    v["cniVersion"] = json!("9.9.9");
    cases.push(("unknown cniVersion", v, at.clone(), 1));
    for mtu in [json!(10), json!(100_000), json!(-5)] {
        let mut v = good.clone();
        v["mtu"] = mtu;
        cases.push(("invalid mtu", v, at.clone(), 7));
    }
    let mut v = good.clone();
    v["bridge"] = json!("a-bridge-name-too-long");
    cases.push(("bridge name too long", v, at.clone(), 7));
    let mut v = good.clone();
    v["ipam"]["type"] = json!("no-such-ipam");
    cases.push(("IPAM plugin missing", v, at.clone(), 102));
    let mut v = good.clone();
    v["ipam"]["ranges"] = json!([[{ "subnet": "not-a-subnet" }]]);
    cases.push(("IPAM plugin failing", v, at.clone(), 0));
    let mut v = good.clone();
    let blocker = node.dir.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    v["stateDir"] = json!(blocker.join("state"));
    cases.push(("state dir not writable", v, at.clone(), 5));
    let bad_chain = Attach {
        args: "SPRIGHT_CHAIN=Bad_Chain".into(),
        ..at.clone()
    };
    cases.push(("invalid chain", good.clone(), bad_chain, 7));
    let mut v = good.clone();
    v["mode"] = json!("overlay");
    cases.push(("unsupported mode", v, at.clone(), 2));
    let long_if = Attach {
        ifname: "eth0-much-too-long".into(),
        ..at.clone()
    };
    cases.push(("ifname too long", good.clone(), long_if, 4));

    for (what, conf, at, code) in &cases {
        let o = node.invoke("ADD", conf, Some(at)).unwrap();
        assert!(!o.ok, "{what}: succeeded: {o:#?}");
        if *code == 0 {
            assert!(o.code() > 0, "{what}");
        } else {
            assert_eq!(o.code(), *code, "{what}: {o:#?}");
        }
        assert!(o.stdout["cniVersion"].is_string(), "{what}: {o:#?}");
        assert_clean(&node);
    }

    // Interface name already taken in the pod: the IP allocation is never
    // made (or is rolled back) and the existing link is untouched.
    node.pods[a]
        .ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer",
        ])
        .unwrap();
    let o = node.invoke("ADD", &good, Some(&at)).unwrap();
    assert_eq!(o.code(), 101, "{o:#?}");
    node.pods[a].ip(&["link", "del", "eth0"]).unwrap();
    assert_clean(&node);

    // A failure after IPAM succeeded (a route the pod cannot take) is rolled
    // back: IPAM DEL, veth gone, no record, no map entry, no rule.
    let mut v = good.clone();
    v["ipam"]["routes"] = json!([{ "dst": "192.0.2.0/24", "gw": "10.99.0.1" }]);
    let o = node.invoke("ADD", &v, Some(&at)).unwrap();
    assert_eq!(o.code(), 100, "{o:#?}");
    assert_clean(&node);

    // And after all that, a good ADD still works in the same pod.
    let o = node.invoke("ADD", &good, Some(&at)).unwrap();
    assert!(o.ok, "{o:#?}");
    assert!(node.invoke("DEL", &good, Some(&at)).unwrap().ok);
    assert_clean(&node);
}

#[test]
fn privileged_cni_fifty_concurrent_adds_and_dels() {
    const PODS: usize = 50;
    if !require("privileged_cni_fifty_concurrent_adds_and_dels") {
        return;
    }
    let mut node = Node::new("c").unwrap();
    for _ in 0..PODS {
        node.add_pod().unwrap();
    }
    let conf = node.conf("1.0.0", &[V4]);
    let attaches: Vec<Attach> = (0..PODS)
        .map(|i| node.attach(i, &format!("conc-{i}")))
        .collect();
    let results: Vec<cni::Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = attaches
            .iter()
            .map(|at| s.spawn(|| node.invoke("ADD", &conf, Some(at)).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips = Vec::new();
    for r in &results {
        assert!(r.ok, "{r:#?}");
        ips.extend(cni::result_ips(&r.stdout).unwrap());
    }
    assert_eq!(ips.len(), PODS);
    assert_eq!(cni::distinct(&ips), PODS, "duplicate IPs: {ips:?}");
    assert_eq!(node.records().len(), PODS);
    assert_eq!(node.map_entries().unwrap().len(), PODS);
    // Every pod is reachable from pod 0, and pod 0 from the last one.
    for ip in &ips[1..] {
        assert!(cni::ping(&node.pods[0], *ip), "{ip} unreachable");
    }
    assert!(cni::ping(&node.pods[PODS - 1], ips[0]));
    let dels: Vec<cni::Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = attaches
            .iter()
            .map(|at| s.spawn(|| node.invoke("DEL", &conf, Some(at)).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for d in &dels {
        assert!(d.ok, "{d:#?}");
    }
    assert_clean(&node);
}

#[test]
fn privileged_cni_chained_mode_records_prev_result() {
    if !require("privileged_cni_chained_mode_records_prev_result") {
        return;
    }
    let mut node = Node::new("h").unwrap();
    let a = node.add_pod().unwrap();
    // The "previous plugin" is the reference bridge plugin.
    let mut bridge_conf = json!({
        "cniVersion": "1.0.0", "name": "sprnet", "type": "bridge", "bridge": "refbr0",
        "isGateway": true, "ipam": node.ipam(&[V4]),
    });
    let at = Attach {
        args: "K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=p;SPRIGHT_CHAIN=flow".into(),
        ..node.attach(a, "chain-1")
    };
    // The reference bridge plugin, first in the chain, for the same attachment.
    let reference = |command: &str, conf: &Value| {
        let at = Attach {
            args: format!("IgnoreUnknown=1;{}", at.args),
            ..at.clone()
        };
        cni::invoke_plugin(
            Path::new("/usr/lib/cni/bridge"),
            &node.node.path(),
            command,
            conf,
            Some(&at),
            &cni::plugin_path(),
        )
        .unwrap()
    };
    let prev = reference("ADD", &bridge_conf);
    assert!(prev.ok, "{prev:#?}");
    let links_before = cni::link_names(&node.pods[a]).unwrap();

    let mut conf = node.conf("1.0.0", &[V4]);
    conf["mode"] = json!("chained");
    conf.as_object_mut().unwrap().remove("ipam");
    conf["prevResult"] = prev.stdout.clone();
    let o = node.invoke("ADD", &conf, Some(&at)).unwrap();
    assert!(o.ok, "{o:#?}");
    assert_eq!(
        o.stdout["ips"], prev.stdout["ips"],
        "prevResult passed through"
    );
    assert_eq!(
        cni::link_names(&node.pods[a]).unwrap(),
        links_before,
        "chained mode creates no interfaces"
    );
    let ip = cni::result_ips(&prev.stdout).unwrap()[0];
    let rec = spright_endpoint::find(&node.state_dir(), "chain-1", "eth0")
        .unwrap()
        .expect("record");
    assert_eq!(rec.ips, vec![ip]);
    assert_eq!(rec.chain.as_deref(), Some("flow"));
    assert_eq!(rec.host_ifname, None);
    assert_eq!(node.map_entries().unwrap(), vec![ip]);
    assert!(node.invoke("CHECK", &conf, Some(&at)).unwrap().ok);

    // A prevResult without an IP for this interface is a config error.
    let mut empty = conf.clone();
    empty["prevResult"] = json!({ "cniVersion": "1.0.0", "ips": [] });
    assert_eq!(
        node.invoke(
            "ADD",
            &empty,
            Some(&Attach {
                container_id: "c2".into(),
                ..at.clone()
            })
        )
        .unwrap()
        .code(),
        7
    );

    assert!(node.invoke("DEL", &conf, Some(&at)).unwrap().ok);
    assert!(node.records().is_empty());
    assert!(node.map_entries().unwrap().is_empty());
    bridge_conf["prevResult"] = prev.stdout.clone();
    let d = reference("DEL", &bridge_conf);
    assert!(d.ok, "{d:#?}");
    let _ = node.node.ip(&["link", "del", "refbr0"]);
    assert_clean(&node);
}

#[test]
fn privileged_cni_status_gc_and_version() {
    if !require("privileged_cni_status_gc_and_version") {
        return;
    }
    let mut node = Node::new("s").unwrap();
    let (a, b) = (node.add_pod().unwrap(), node.add_pod().unwrap());
    let conf = node.conf("1.1.0", &[V4]);

    let v = node
        .invoke("VERSION", &json!({ "cniVersion": "1.1.0" }), None)
        .unwrap();
    assert!(v.ok);
    assert_eq!(v.stdout["supportedVersions"], json!(VERSIONS));

    let s = node.invoke("STATUS", &conf, None).unwrap();
    assert!(s.ok && s.stdout.is_null(), "{s:#?}");
    let mut no_ipam = conf.clone();
    no_ipam["ipam"]["type"] = json!("no-such-ipam");
    let s = node.invoke("STATUS", &no_ipam, None).unwrap();
    assert_eq!(s.code(), 50, "{s:#?}");
    assert!(
        s.stdout["msg"].as_str().unwrap().contains("acceleration"),
        "{s:#?}"
    );
    // meshd's published self-test verdict reaches STATUS's message.
    let msg = |s: &cni::Outcome| s.stdout["msg"].as_str().unwrap_or_default().to_owned();
    assert!(msg(&s).contains("kernel self-test: not run yet"), "{s:#?}");
    std::fs::create_dir_all(node.state_dir()).unwrap();
    std::fs::write(
        node.state_dir().join(spright_endpoint::SELFTEST_FILE),
        r#"{"verdict":"affected","trials":10,"eagain_trials":9}"#,
    )
    .unwrap();
    let s = node.invoke("STATUS", &no_ipam, None).unwrap();
    assert!(
        msg(&s).contains("EAGAIN on the redirect path): affected (9 of 10 trials)"),
        "{s:#?}"
    );
    let mut ro = conf.clone();
    let blocker = node.dir.path().join("blocker");
    std::fs::write(&blocker, b"").unwrap();
    ro["stateDir"] = json!(blocker.join("s"));
    assert_eq!(node.invoke("STATUS", &ro, None).unwrap().code(), 50);

    // Primary mode's gate (`meshdReadyz`, install-cni sets it): the network
    // is not available until meshd answers /readyz, in the node's network.
    let mut gated = conf.clone();
    let readyz = |status: &'static str| {
        let l = spright_endpoint::netns::run_in(&node.node.path(), || {
            std::net::TcpListener::bind("127.0.0.1:0")
        })
        .unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                use std::io::{Read as _, Write as _};
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req);
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        addr
    };
    let closed = spright_endpoint::netns::run_in(&node.node.path(), || {
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr())
    })
    .unwrap();
    gated["meshdReadyz"] = json!(closed.to_string());
    let s = node.invoke("STATUS", &gated, None).unwrap();
    assert_eq!(s.code(), 50, "{s:#?}");
    assert!(
        msg(&s).contains(&format!("meshd at {closed} is not ready")),
        "{s:#?}"
    );
    gated["meshdReadyz"] = json!(readyz("503 Service Unavailable").to_string());
    let s = node.invoke("STATUS", &gated, None).unwrap();
    assert!(s.code() == 50 && msg(&s).contains("answered 503"), "{s:#?}");
    gated["meshdReadyz"] = json!(readyz("200 OK").to_string());
    let s = node.invoke("STATUS", &gated, None).unwrap();
    assert!(s.ok, "{s:#?}");
    gated["meshdReadyz"] = json!("localhost");
    assert_eq!(node.invoke("STATUS", &gated, None).unwrap().code(), 7);

    let (pa, pb) = (node.attach(a, "gc-keep"), node.attach(b, "gc-stale"));
    assert!(node.invoke("ADD", &conf, Some(&pa)).unwrap().ok);
    assert!(node.invoke("ADD", &conf, Some(&pb)).unwrap().ok);
    // The bridge exists now; a downed bridge is "limited connectivity".
    node.node
        .ip(&["link", "set", &node.bridge, "down"])
        .unwrap();
    assert_eq!(node.invoke("STATUS", &conf, None).unwrap().code(), 51);
    node.node.ip(&["link", "set", &node.bridge, "up"]).unwrap();

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{ "containerID": "gc-keep", "ifname": "eth0" }]);
    let g = node.invoke("GC", &gc, None).unwrap();
    assert!(g.ok, "{g:#?}");
    assert_eq!(node.records().len(), 1);
    assert_eq!(node.allocations("sprnet").len(), 1);
    assert_eq!(
        node.node_links().unwrap().len(),
        1,
        "the stale veth is gone"
    );
    assert_eq!(node.map_entries().unwrap().len(), 1);
    // GC without the list is refused rather than deleting everything.
    assert_eq!(node.invoke("GC", &conf, None).unwrap().code(), 7);

    assert!(node.invoke("DEL", &conf, Some(&pa)).unwrap().ok);
    assert_clean(&node);
}

/// Chain membership from pod annotations, as containerd passes them
/// (`runtimeConfig["io.kubernetes.cri.pod-annotations"]`), and the opt-out
/// annotation end to end: the opted-out pod is recorded and mapped with the
/// flag, gets no quickack, and its connections stay on TCP while the same
/// chain's other pods are redirected.
#[test]
fn privileged_cni_annotations_and_redirect_opt_out() {
    if !require("privileged_cni_annotations_and_redirect_opt_out") {
        return;
    }
    let mut node = Node::new("o").unwrap();
    let (a, b, c) = (
        node.add_pod().unwrap(),
        node.add_pod().unwrap(),
        node.add_pod().unwrap(),
    );
    let add = |pod: usize, name: &str, annotations: Value| {
        let mut conf = node.conf("1.0.0", &[V4]);
        conf["runtimeConfig"] = json!({ "io.kubernetes.cri.pod-annotations": annotations });
        let mut at = node.attach(pod, &format!("ctr-{name}"));
        at.args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name};K8S_POD_UID=u-{name}"
        );
        let r = node.invoke("ADD", &conf, Some(&at)).unwrap();
        assert!(r.ok, "{name}: {r:#?}");
        cni::result_ips(&r.stdout).unwrap()[0]
    };
    let ip_a = add(
        a,
        "gw",
        json!({ "spright.dev/chain": "checkout", "spright.dev/function": "gateway" }),
    );
    let ip_b = add(b, "stage", json!({ "spright.dev/chain": "checkout" }));
    let ip_c = add(
        c,
        "legacy",
        json!({ "spright.dev/chain": "checkout", "spright.dev/redirect": "off" }),
    );

    let rec = |id: &str| {
        spright_endpoint::find(&node.state_dir(), id, "eth0")
            .unwrap()
            .unwrap()
    };
    let (ra, rc) = (rec("ctr-gw"), rec("ctr-legacy"));
    assert_eq!(
        (ra.chain.as_deref(), ra.function.as_deref(), ra.redirect),
        (Some("checkout"), Some("gateway"), true)
    );
    assert_eq!(
        (rc.chain.as_deref(), rc.redirect),
        (Some("checkout"), false)
    );
    let dp = spright_ebpf::Datapath::open(&node.pins.path).unwrap();
    let flags: std::collections::BTreeMap<IpAddr, u32> = dp
        .endpoints()
        .unwrap()
        .into_iter()
        .map(|(ip, v)| (ip, v.flags))
        .collect();
    assert_eq!(flags[&ip_a], 0);
    assert_eq!(flags[&ip_c], spright_ebpf::ENDPOINT_FLAG_NO_REDIRECT);
    let routes_c = node.pods[c].ip(&["route", "show"]).unwrap();
    assert!(
        !routes_c.contains("quickack"),
        "the opted-out pod got quickack: {routes_c}"
    );

    // Traffic from processes in the datapath's cgroup: a → b redirected,
    // c → b on TCP.
    let send = |from: usize| {
        let peer = |pod: usize, args: &[&str]| {
            let mut cmd = std::process::Command::new(spright_tests::sandbox::netpeer_bin());
            cmd.arg("--cgroup")
                .arg(&node.cgroup.path)
                .arg("--netns")
                .arg(node.pods[pod].path())
                .args(args);
            spright_tests::sandbox::Peer::spawn_command(cmd).unwrap()
        };
        let t = std::time::Duration::from_secs(30);
        let addr = std::net::SocketAddr::new(ip_b, 7100 + u16::try_from(from).unwrap()).to_string();
        let srv = peer(b, &["serve", "--listen", &addr]);
        assert_eq!(srv.line(t).unwrap(), "ready");
        let cli = peer(from, &["send", "--connect", &addr, "--bytes", "65536"]);
        assert_eq!(cli.report(t).unwrap()["intact"], true);
        cli.finish(t).unwrap();
        srv.finish(t).unwrap();
    };
    send(a);
    send(c);
    assert!(
        dp.counters(ip_a).unwrap().redirected_bytes >= 65536,
        "chain member not redirected"
    );
    let cc = dp.counters(ip_c).unwrap();
    assert_eq!(
        (cc.redirected_bytes, cc.accelerated_socks),
        (0, 0),
        "opted-out pod redirected: {cc:?}"
    );
}
