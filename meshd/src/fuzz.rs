//! Property tests of what meshd and install-cni read from outside: Service,
//! EndpointSlice and Pod files (and the same objects from the API), Node
//! objects, the runtime's CNI config files install-cni chains into, a
//! scraper's `Accept` header and byte-count settings. Whatever arrives is
//! used or set aside with its file and reason, never a panic.
//! `PROPTEST_CASES` sets the cases per run (`cargo xtask fuzz` for long runs).

use std::path::Path;

use proptest::prelude::*;
use serde_json::Value;
use spright_endpoint::fuzzing::{bytes, json, text};

use crate::{
    install_cni::conflist::{self, Plan},
    pod_network::{NodeInfo, plan},
};

const K8S: &[&str] = &[
    "kind",
    "Service",
    "EndpointSlice",
    "Pod",
    "List",
    "Node",
    "apiVersion",
    "v1",
    "discovery.k8s.io/v1",
    "metadata",
    "name",
    "namespace",
    "uid",
    "labels",
    "kubernetes.io/service-name",
    "annotations",
    "spright.dev/chain",
    "spec",
    "clusterIP",
    "clusterIPs",
    "ports",
    "port",
    "targetPort",
    "protocol",
    "TCP",
    "UDP",
    "type",
    "ClusterIP",
    "endpoints",
    "addresses",
    "conditions",
    "ready",
    "serving",
    "terminating",
    "addressType",
    "IPv4",
    "IPv6",
    "nodeName",
    "items",
    "podCIDR",
    "podCIDRs",
    "status",
    "InternalIP",
    "address",
    "deletionTimestamp",
    "selector",
];

const CONFLIST: &[&str] = &[
    "cniVersion",
    "name",
    "plugins",
    "type",
    "bridge",
    "ipam",
    "mode",
    "capabilities",
    "spright-cni",
    "chained",
    "disableCheck",
    "runtimeConfig",
    "stateDir",
    "bpffs",
];

/// A Kubernetes object of one of the kinds meshd reads, otherwise free.
fn object() -> impl Strategy<Value = Value> {
    (
        json(K8S),
        proptest::sample::select(&["Service", "EndpointSlice", "Pod", "Node", "List", "Other"][..]),
    )
        .prop_map(|(v, kind)| match v {
            Value::Object(mut m) => {
                m.insert("kind".into(), kind.into());
                Value::Object(m)
            }
            other => other,
        })
}

/// Up to five JSON files: objects of the kinds meshd reads, or any bytes.
fn files() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(
        prop_oneof![
            object().prop_map(|v| v.to_string().into_bytes()),
            bytes(K8S)
        ],
        0..5,
    )
}

/// A directory holding `files` as `f0.json`, `f1.json`, …
fn dir_of(files: &[Vec<u8>]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (i, f) in files.iter().enumerate() {
        std::fs::write(dir.path().join(format!("f{i}.json")), f).unwrap();
    }
    dir
}

proptest! {
    /// Service and EndpointSlice files: every file is used or reported by
    /// path; the table answers its ports.
    #[test]
    fn service_files_are_used_or_reported(files in files()) {
        let dir = dir_of(&files);
        let table = crate::services::Table::load(dir.path());
        let _ = table.ports();
        for p in &table.problems {
            prop_assert!(p.path.contains(".json") && !p.error.is_empty(), "{:?}", p);
        }
    }

    /// Pod files: each Pod is used or its file reported.
    #[test]
    fn pod_files_are_used_or_reported(files in files()) {
        let dir = dir_of(&files);
        let (pods, problems) = crate::sources::read_pod_files(dir.path());
        for p in &pods {
            if let Some(c) = &p.annotated.chain {
                prop_assert!(spright_endpoint::validate_chain(c).is_ok());
            }
        }
        for p in &problems {
            prop_assert!(p.path.contains(".json") && !p.error.is_empty(), "{:?}", p);
        }
    }

    /// Node objects: parsed or refused naming the node; a plan over any set
    /// routes each CIDR once, via an address of its own family.
    #[test]
    fn nodes_parse_and_plan(objects in proptest::collection::vec(object(), 0..6), me in text()) {
        let nodes: Vec<NodeInfo> = objects.iter().filter_map(|o| NodeInfo::parse(o).ok()).collect();
        for n in &nodes {
            prop_assert!(!n.name.is_empty());
        }
        let p = plan(&me, &nodes);
        let mut seen = std::collections::BTreeSet::new();
        for r in &p.routes {
            prop_assert!(seen.insert(r.dst), "{} routed twice", r.dst);
            prop_assert_eq!(r.dst.addr().is_ipv4(), r.via.is_ipv4());
            prop_assert!(!p.pod_cidrs.contains(&r.dst));
        }
    }

    /// The runtime's CNI config, of any shape: install-cni chains spright in
    /// or refuses naming the file; what it writes is chained once, and
    /// removing spright again leaves no spright entry.
    #[test]
    fn conflists_are_chained_into_or_refused(
        doc in prop_oneof![json(CONFLIST), json(CONFLIST).prop_map(|p| serde_json::json!({
            "cniVersion": "1.0.0", "name": "k8s", "plugins": [p] }))],
        ext in proptest::sample::select(&["conflist", "conf", "json"][..]),
        raw in any::<bool>(),
    ) {
        let path = Path::new("/n").join(format!("10-net.{ext}"));
        let text = if raw { doc.to_string() } else { serde_json::to_string_pretty(&doc).unwrap() };
        let entry = serde_json::json!({ "type": "spright-cni", "mode": "chained" });
        match conflist::insert(&path, &text, &entry) {
            Ok(Plan::Write { path: out, text: written, .. }) => {
                prop_assert_eq!(conflist::insert(&out, &written, &entry).ok(), Some(Plan::Keep));
                match conflist::remove(&out, &written) {
                    Ok(Plan::Write { text: back, .. }) => {
                        // The other plugins come back as they were.
                        // (Compared as the file's text parses: serde_json's
                        // float parsing is not exact, on either side.)
                        let back: Value = serde_json::from_str(&back).unwrap();
                        let original: Value = serde_json::from_str(&text).unwrap();
                        if ext == "conflist" {
                            prop_assert_eq!(&back["plugins"], &original["plugins"]);
                        } else {
                            prop_assert_eq!(&back["plugins"][0], &original);
                        }
                    }
                    other => prop_assert!(false, "remove after insert: {:?}", other),
                }
            }
            Ok(_) => {}
            Err(e) => prop_assert!(crate::error::chain(&e).contains("10-net"), "{}", crate::error::chain(&e)),
        }
    }

    #[test]
    fn accept_headers_never_fail(accept in text()) {
        let _ = crate::metrics::Format::negotiate(Some(&accept));
    }

    #[test]
    fn byte_counts_parse_or_explain(s in text(), n in any::<u32>()) {
        if let Err(e) = crate::config::parse_limit(&s) {
            prop_assert!(!e.is_empty());
        }
        prop_assert_eq!(crate::config::parse_limit(&n.to_string()), Ok(u64::from(n)));
    }
}
