//! Privileged tier: meshd as a process — reconciliation from records,
//! restart safety (SIGKILL mid-transfer), degraded mode, metrics and the
//! `spright status` CLI.

use std::{process::Command, time::Duration};

use spright_tests::{
    meshd::{Meshd, endpoint},
    privileged,
    sandbox::{Sandbox, workspace_bin},
};

const T: Duration = Duration::from_mins(1);

fn all_in_datapath(s: &serde_json::Value, n: usize) -> bool {
    s["endpoints"]
        .as_array()
        .is_some_and(|e| e.len() == n && e.iter().all(|e| e["in_datapath"] == true))
}

#[test]
fn privileged_meshd_follows_records() {
    if !privileged::require("privileged_meshd_follows_records") {
        return;
    }
    let mut sb = Sandbox::new("r").unwrap();
    let state = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        sb.add_pod().unwrap();
    }
    sb.record_pod(state.path(), 0, Some("alpha")).unwrap();
    let meshd = Meshd::start(&sb.placement(), state.path()).unwrap();
    let s = meshd
        .wait_status(T, "pod0 reconciled at start", |s| all_in_datapath(s, 1))
        .unwrap();
    assert_eq!(s["acceleration"]["enabled"], true, "{s:#}");
    assert_eq!(s["acceleration"]["datapath"], "fresh", "{s:#}");
    // The self-test verdict is published for spright-cni's STATUS.
    let published: serde_json::Value = serde_json::from_slice(
        &std::fs::read(state.path().join(spright_endpoint::SELFTEST_FILE)).expect("selftest.json"),
    )
    .unwrap();
    assert_eq!(
        published["verdict"], s["selftest"]["verdict"],
        "{published:#} vs {s:#}"
    );

    // New records are picked up (inotify), malformed ones are skipped by path.
    sb.record_pod(state.path(), 1, Some("alpha")).unwrap();
    let bad = spright_endpoint::records_dir(state.path()).join("broken_eth0.json");
    std::fs::write(&bad, "{ not json").unwrap();
    let s = meshd
        .wait_status(T, "pod1 added and the malformed record reported", |s| {
            all_in_datapath(s, 2)
                && s["malformed_records"]
                    .as_array()
                    .is_some_and(|m| m.len() == 1)
        })
        .unwrap();
    assert!(
        s["malformed_records"][0]["path"]
            .as_str()
            .unwrap()
            .ends_with("broken_eth0.json"),
        "{s:#}"
    );
    assert!(
        meshd.log_text().contains("broken_eth0.json"),
        "malformed record not logged with its path"
    );

    // A record whose pod's namespace is gone is garbage-collected with its entries.
    let r2 = sb.record_pod(state.path(), 2, Some("beta")).unwrap();
    meshd
        .wait_status(T, "pod2 added", |s| all_in_datapath(s, 3))
        .unwrap();
    let gone = sb.pods.remove(2);
    drop(gone);
    meshd
        .wait_status(T, "pod2 collected", |s| endpoint(s, "pod2").is_none())
        .unwrap();
    assert!(
        spright_endpoint::find(state.path(), &r2.container_id, "eth0")
            .unwrap()
            .is_none()
    );
    let in_map = spright_ebpf::Datapath::open(&sb.pins.path)
        .unwrap()
        .endpoints()
        .unwrap();
    assert_eq!(in_map.len(), 4, "two pods × (IPv4 + IPv6): {in_map:?}");

    // Metrics: chain gauges and acceleration state.
    let m = meshd.check_metrics().unwrap();
    // The metrics listener names no member and no configuration.
    for path in [
        "/status",
        "/config",
        "/v1/members?namespace=default&chain=alpha",
    ] {
        let e = meshd.get_metrics_listener(path).unwrap_err().to_string();
        assert!(e.contains("404"), "{path} on the metrics listener: {e}");
    }
    assert_eq!(meshd.get_metrics_listener("/readyz").unwrap(), "ready\n");
    dashboard_queries_what_meshd_serves(&m);
    assert!(m.contains("spright_acceleration_enabled 1"), "{m}");
    assert!(
        m.contains(r#"spright_chain_endpoints{namespace="default",chain="alpha"} 2"#),
        "{m}"
    );
    assert!(
        m.contains("# TYPE spright_redirected_bytes_total counter"),
        "{m}"
    );
    assert_eq!(meshd.get("/healthz").unwrap(), "ok\n");
    let members: serde_json::Value = serde_json::from_str(
        &meshd
            .get("/v1/members?namespace=default&chain=alpha")
            .unwrap(),
    )
    .unwrap();
    let names: Vec<&str> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["pod"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pod0", "pod1"], "{members:#}");
    let none: serde_json::Value = serde_json::from_str(
        &meshd
            .get("/v1/members?namespace=other&chain=alpha")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        none["members"],
        serde_json::json!([]),
        "chains are scoped by namespace"
    );

    // `spright status` through meshd, then from the pinned maps with meshd down.
    let status = |addr: &str| {
        let out = Command::new(workspace_bin("spright"))
            .args(["status", "--addr", addr, "--bpffs"])
            .arg(&sb.pins.path)
            .arg("--state-dir")
            .arg(state.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (table, _) = status(&meshd.addr);
    assert!(
        table.contains("acceleration: ON") && table.contains("source: meshd"),
        "{table}"
    );
    assert!(table.contains("alpha") && table.contains("pod1"), "{table}");
    let addr = meshd.addr.clone();
    meshd.kill();
    let (table, err) = status(&addr);
    assert!(err.contains("not reachable"), "{err}");
    assert!(
        table.contains("source: pinned-maps") && table.contains("acceleration: ON"),
        "{table}"
    );
    assert!(table.contains("pod0") && table.contains("yes"), "{table}");
}

#[test]
fn privileged_meshd_sigkill_mid_transfer_loses_nothing() {
    if !privileged::require("privileged_meshd_sigkill_mid_transfer_loses_nothing") {
        return;
    }
    let mut sb = Sandbox::new("k").unwrap();
    let state = tempfile::tempdir().unwrap();
    for i in 0..2 {
        sb.add_pod().unwrap();
        sb.record_pod(state.path(), i, Some("alpha")).unwrap();
    }
    let meshd = Meshd::start(&sb.placement(), state.path()).unwrap();
    meshd
        .wait_status(T, "both pods reconciled", |s| all_in_datapath(s, 2))
        .unwrap();
    let addr = meshd.addr.clone();

    let server = format!("{}:7000", sb.pods[1].ip);
    let srv = sb.spawn_peer(1, &["serve", "--listen", &server]).unwrap();
    assert_eq!(srv.line(T).unwrap(), "ready");
    let bytes: u64 = 256 << 20;
    let client = sb
        .spawn_peer(
            0,
            &["send", "--connect", &server, "--bytes", &bytes.to_string()],
        )
        .unwrap();
    // Kill meshd while the transfer runs, restart it, and let the transfer end.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        client.line(Duration::ZERO).is_err(),
        "the transfer ended before meshd was killed"
    );
    meshd.kill();
    std::thread::sleep(Duration::from_millis(300));
    let meshd = Meshd::start_on(&sb.placement(), state.path(), &addr).unwrap();
    let r = client.report(T).unwrap();
    assert_eq!(
        r["intact"], true,
        "bytes lost or corrupted across the meshd crash: {r:#}"
    );
    assert_eq!(r["received_by_peer"].as_u64(), Some(bytes), "{r:#}");
    client.finish(T).unwrap();
    srv.finish(T).unwrap();

    let s = meshd
        .wait_status(T, "pods still in the datapath", |s| all_in_datapath(s, 2))
        .unwrap();
    assert_eq!(
        s["acceleration"]["datapath"], "adopted",
        "the restarted meshd must adopt the pinned state: {s:#}"
    );
    let redirected = endpoint(&s, "pod0").unwrap()["counters"]["redirected_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(
        redirected,
        bytes + 8,
        "the whole transfer went socket to socket: {s:#}"
    );
}

#[test]
fn privileged_meshd_degrades_when_bpf_is_unavailable() {
    if !privileged::require("privileged_meshd_degrades_when_bpf_is_unavailable") {
        return;
    }
    let mut sb = Sandbox::new("g").unwrap();
    let state = tempfile::tempdir().unwrap();
    sb.add_pod().unwrap();
    sb.record_pod(state.path(), 0, Some("alpha")).unwrap();
    // A pin directory that is not on bpffs: the datapath cannot be installed.
    let placement = spright_ebpf::Placement {
        cgroup: sb.cgroup.path.clone(),
        bpffs: state.path().join("pins"),
    };
    let meshd = Meshd::start(&placement, state.path()).unwrap();
    let s = meshd
        .wait_status(T, "the record listed", |s| endpoint(s, "pod0").is_some())
        .unwrap();
    assert_eq!(s["acceleration"]["enabled"], false, "{s:#}");
    let reason = s["acceleration"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("not on a bpf filesystem"), "{reason}");
    assert_eq!(endpoint(&s, "pod0").unwrap()["in_datapath"], false);
    assert!(
        meshd
            .get("/metrics")
            .unwrap()
            .contains("spright_acceleration_enabled 0")
    );
    assert_eq!(meshd.get("/readyz").unwrap(), "ready\n");
    assert!(
        meshd.log_text().contains("acceleration off"),
        "{}",
        meshd.log_text()
    );
}

/// manifests/grafana-dashboard.json, checked as far as it can be offline:
/// the shape Grafana's dashboard schema requires of it (unique panel ids,
/// grid positions inside 24 columns that do not overlap, a query per
/// target), every `spright_*` series it queries is one this meshd serves,
/// and every query parses as PromQL (`promtool check rules` over the
/// queries as recording rules, with the dashboard's variables filled in).
fn dashboard_queries_what_meshd_serves(metrics: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/grafana-dashboard.json");
    let d: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(
        d["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40)
    );
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let panels = d["panels"].as_array().unwrap();
    let mut ids = std::collections::BTreeSet::new();
    let mut cells = std::collections::BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate panel id: {p}"
        );
        assert!(
            ["timeseries", "stat"].contains(&p["type"].as_str().unwrap()),
            "{p}"
        );
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(w > 0 && h > 0 && x + w <= 24, "{p}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "panel {} overlaps another", p["id"]);
            }
        }
        for t in p["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    let served: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("spright_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                served.contains(name.as_str()),
                "the dashboard queries {name}, which meshd does not serve:\n{e}"
            );
            rest = &rest[i + name.len()..];
        }
    }
    if Command::new("promtool").arg("--version").output().is_err() {
        assert!(
            !privileged::in_ci(),
            "promtool is not installed (cargo xtask setup provides it)"
        );
        eprintln!("SKIPPED the dashboard's PromQL check: promtool is not installed");
        return;
    }
    let rules: Vec<serde_json::Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let e = e
                .replace("$__rate_interval", "5m")
                .replace("$namespace", ".*")
                .replace("$chain", ".*");
            serde_json::json!({ "record": format!("dashboard:query{i}"), "expr": e })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.json");
    // JSON is YAML: promtool reads it as a rule file.
    std::fs::write(
        &file,
        serde_json::to_vec(
            &serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] }),
        )
        .unwrap(),
    )
    .unwrap();
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the dashboard's queries are not valid PromQL: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
