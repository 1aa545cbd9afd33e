//! What the kernel should hold, computed from the sources alone: a pure
//! function, unit-tested on the host (no privileges, no maps).
//!
//! The record supplies what only ADD knows (IPs, netns cookie) and the chain
//! a pod was attached with; the Pod object decides whether it still belongs.
//! A recorded chain pod *leaves* when its Pod object has dropped the chain
//! annotation or opted out of the redirect, was replaced by a pod of the
//! same name (another uid), or was deleted while its sandbox still runs.
//! A leaving pod's endpoint is flagged no-redirect (no new connection is
//! redirected, it is no Service backend or caller) and its open connections
//! move to TCP (`sync`). A Pod in *another* chain than its record is a
//! mismatch: the record wins for the datapath until the pod is recreated,
//! the Pod wins for shared memory, and status shows it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};
use spright_ebpf::{EndpointValue, SvcKey, SvcValue};
use spright_endpoint::Record;

use crate::{services::ServicePort, sources::PodView};

/// The kernel state meshd makes true.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// The records as the datapath should treat them (leaving pods with
    /// `redirect` off).
    pub records: Vec<Record>,
    /// Endpoint map: every IP of every record.
    pub endpoints: BTreeMap<IpAddr, EndpointValue>,
    /// Netns map: callers of the connect-time translation.
    pub netns: BTreeMap<u64, EndpointValue>,
    /// Service table.
    pub services: BTreeMap<SvcKey, SvcValue>,
    /// IPs of pods leaving their chain: their connections move to TCP.
    pub leaving: BTreeSet<IpAddr>,
    /// The pods leaving their chain (`namespace/name`), with why.
    pub departures: Vec<(String, &'static str)>,
    /// Pods whose Pod object names another chain than their record.
    pub mismatches: Vec<Mismatch>,
}

/// A pod whose annotation changed after ADD.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    pub namespace: String,
    pub pod: String,
    /// The chain the pod was attached with (its record; the datapath's).
    pub record_chain: Option<String>,
    /// The chain its Pod object names now (shared memory's).
    pub pod_chain: Option<String>,
}

/// Why a recorded chain pod leaves, if it does.
fn leaves(r: &Record, pods: &PodView) -> Option<&'static str> {
    r.chain.as_ref()?;
    if !r.redirect {
        return None;
    }
    match pods.get(&r.pod.namespace, &r.pod.name) {
        Some(p) if !p.same_pod(&r.pod.uid) => Some("replaced by a new pod of the same name"),
        Some(p) if p.annotated.chain.is_none() => Some("its Pod no longer names a chain"),
        Some(p) if !p.annotated.redirect => Some("its Pod opted out of the redirect"),
        None if pods.is_gone(&r.pod.namespace, &r.pod.name, &r.pod.uid) => {
            Some("its Pod was deleted")
        }
        // A member, or no Pod source knows it (the record decides).
        Some(_) | None => None,
    }
}

/// Computes the kernel's state from the live records, the merged Pods and
/// the Service ports.
pub fn desired(records: &[Record], pods: &PodView, ports: &[ServicePort]) -> Desired {
    let mut d = Desired::default();
    for r in records {
        let mut r = r.clone();
        if let Some(p) = pods
            .get(&r.pod.namespace, &r.pod.name)
            .filter(|p| p.same_pod(&r.pod.uid))
            && p.annotated.chain.is_some()
            && p.annotated.chain != r.chain
        {
            d.mismatches.push(Mismatch {
                namespace: r.pod.namespace.clone(),
                pod: r.pod.name.clone(),
                record_chain: r.chain.clone(),
                pod_chain: p.annotated.chain.clone(),
            });
        }
        if let Some(why) = leaves(&r, pods) {
            r.redirect = false;
            d.leaving.extend(r.ips.iter().copied());
            d.departures
                .push((format!("{}/{}", r.pod.namespace, r.pod.name), why));
        }
        d.records.push(r);
    }
    // When two records claim one IP (a missed DEL followed by reuse), the
    // later file name wins, deterministically.
    d.endpoints = d
        .records
        .iter()
        .flat_map(|r| r.ips.iter().map(move |ip| (*ip, r.endpoint_value())))
        .collect();
    d.netns = d
        .records
        .iter()
        .filter_map(|r| Some((r.netns_cookie?, r.endpoint_value())))
        .collect();
    d.services = crate::services::desired(ports, &d.records);
    d
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use spright_endpoint::{PodInfo, PodRef, RECORD_VERSION};

    use super::*;

    fn rec(name: &str, uid: &str, ips: &[&str], chain: Option<&str>) -> Record {
        Record {
            version: RECORD_VERSION,
            container_id: format!("c-{name}"),
            ifname: "eth0".into(),
            netns: "/proc/self/ns/net".into(),
            network: "n".into(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            pod: PodRef {
                namespace: "ns".into(),
                name: name.into(),
                uid: uid.into(),
            },
            chain: chain.map(str::to_owned),
            function: None,
            redirect: true,
            host_ifname: None,
            netns_cookie: Some(7),
        }
    }

    fn pod(name: &str, uid: &str, annotations: &serde_json::Value) -> PodInfo {
        PodInfo::parse(&json!({ "kind": "Pod", "metadata": {
            "name": name, "namespace": "ns", "uid": uid, "annotations": annotations } }))
        .unwrap()
        .unwrap()
    }

    fn view(pods: &[PodInfo], records: &[Record]) -> PodView {
        let mut v = PodView::default();
        v.update(pods, [], records);
        v
    }

    #[test]
    fn endpoints_cover_every_ip_of_every_record() {
        let records = [
            rec("a", "", &["10.0.0.1", "fd00::1"], Some("c")),
            rec("b", "", &["10.0.0.2"], None),
        ];
        let d = desired(&records, &PodView::default(), &[]);
        assert_eq!(d.endpoints.len(), 3);
        assert_ne!(d.endpoints[&"fd00::1".parse().unwrap()].chain_id, 0);
        assert_eq!(d.endpoints[&"10.0.0.2".parse().unwrap()].chain_id, 0);
        assert_eq!(d.netns.len(), 1, "one cookie shared by both records");
        assert!(d.leaving.is_empty() && d.mismatches.is_empty());
    }

    #[test]
    fn records_without_pod_objects_keep_their_chain() {
        // No Pod source at all (podman, the simulated node): records decide.
        let records = [rec("a", "u", &["10.0.0.1"], Some("c"))];
        let d = desired(&records, &PodView::default(), &[]);
        assert!(d.records[0].redirect && d.leaving.is_empty());
    }

    #[test]
    fn a_pod_that_drops_its_chain_or_opts_out_leaves() {
        let records = [
            rec("dropped", "u1", &["10.0.0.1"], Some("c")),
            rec("optout", "u2", &["10.0.0.2"], Some("c")),
            rec("stays", "u3", &["10.0.0.3"], Some("c")),
            rec("replaced", "u-old", &["10.0.0.4"], Some("c")),
        ];
        let pods = [
            pod("dropped", "u1", &json!({})),
            pod(
                "optout",
                "u2",
                &json!({"spright.dev/chain": "c", "spright.dev/redirect": "off"}),
            ),
            pod("stays", "u3", &json!({"spright.dev/chain": "c"})),
            pod("replaced", "u-new", &json!({"spright.dev/chain": "c"})),
        ];
        let d = desired(&records, &view(&pods, &records), &[]);
        let leaving: Vec<String> = d.leaving.iter().map(ToString::to_string).collect();
        assert_eq!(leaving, ["10.0.0.1", "10.0.0.2", "10.0.0.4"]);
        let flagged: Vec<bool> = d.endpoints.values().map(EndpointValue::opted_out).collect();
        assert_eq!(flagged, [true, true, false, true]);
        // The chain identity stays the record's.
        assert!(d.endpoints.values().all(|v| v.chain_id != 0));
        assert_eq!(d.departures.len(), 3);
        assert_eq!(
            d.departures[2],
            (
                "ns/replaced".to_owned(),
                "replaced by a new pod of the same name"
            )
        );
    }

    #[test]
    fn a_deleted_pod_leaves_while_its_sandbox_lingers() {
        let records = [rec("a", "u1", &["10.0.0.1"], Some("c"))];
        let mut v = view(
            &[pod("a", "u1", &json!({"spright.dev/chain": "c"}))],
            &records,
        );
        assert!(desired(&records, &v, &[]).leaving.is_empty());
        v.update([], [], &records);
        assert_eq!(desired(&records, &v, &[]).leaving.len(), 1);
    }

    #[test]
    fn another_chain_on_the_pod_is_a_mismatch_not_a_departure() {
        let records = [rec("a", "u1", &["10.0.0.1"], Some("c"))];
        let pods = [pod("a", "u1", &json!({"spright.dev/chain": "d"}))];
        let d = desired(&records, &view(&pods, &records), &[]);
        assert!(d.leaving.is_empty());
        assert_eq!(
            d.mismatches,
            [Mismatch {
                namespace: "ns".into(),
                pod: "a".into(),
                record_chain: Some("c".into()),
                pod_chain: Some("d".into()),
            }]
        );
        assert_eq!(
            d.endpoints[&"10.0.0.1".parse().unwrap()].chain_id,
            records[0].endpoint_value().chain_id
        );
    }

    #[test]
    fn leaving_pods_are_neither_service_backends_nor_callers() {
        let records = [
            rec("client", "u1", &["10.0.0.1"], Some("c")),
            rec("server", "u2", &["10.0.0.2"], Some("c")),
        ];
        let ports = [ServicePort {
            namespace: "ns".into(),
            name: "svc".into(),
            port_name: String::new(),
            address: "10.96.0.10:80".parse().unwrap(),
            backends: vec!["10.0.0.2:8080".parse().unwrap()],
            skipped: None,
        }];
        let d = desired(&records, &PodView::default(), &ports);
        assert_eq!(d.services.len(), 1);
        let pods = [
            pod("client", "u1", &json!({"spright.dev/chain": "c"})),
            pod("server", "u2", &json!({})),
        ];
        let d = desired(&records, &view(&pods, &records), &ports);
        assert!(d.services.is_empty(), "{:?}", d.services);
    }
}
