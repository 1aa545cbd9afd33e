//! The service table: Kubernetes Services and their EndpointSlices, turned
//! into the kernel's connect-time translation entries.
//!
//! Sources, merged:
//! - the Kubernetes API (Services and EndpointSlices of all namespaces,
//!   watched by `kube_source`), in a cluster;
//! - a directory of JSON files holding exactly what
//!   `kubectl get service,endpointslice -o json` prints (a `Service`, an
//!   `EndpointSlice`, or a `List` of them per file), for clusters without API
//!   access and for tests. Files are re-read on every change (inotify) and on
//!   the periodic rescan.
//!
//! Either way changes apply without restarting anything.
//!
//! What goes into the kernel: for each ClusterIP port (TCP) and each chain
//! with a node-local backend of that Service, the backends that are pods of
//! that chain on this node, ready and not terminating. A caller of chain C
//! dialling the ClusterIP is sent straight to one of them; callers of other
//! chains, pods outside chains and Services without a local backend of the
//! caller's chain are left to kube-proxy. A backend marked not ready or
//! terminating in its EndpointSlice leaves the table at once, before its pod
//! is gone; one whose pod record disappears (CNI DEL) leaves it too.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::Path,
};

use serde::{Deserialize, Serialize};
use spright_ebpf::{Backend, Datapath, IPPROTO_TCP, SvcKey, SvcValue, addr_of, ip_of, limits};
use spright_endpoint::Record;
use tracing::warn;

use crate::sources::MalformedRecord;

/// Label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The Kubernetes objects the table is built from (only the fields used).
pub(crate) mod k8s {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    #[derive(Clone, Debug, Default, Deserialize)]
    pub(crate) struct Meta {
        pub(crate) name: String,
        #[serde(default)]
        pub(crate) namespace: Option<String>,
        #[serde(default)]
        pub(crate) labels: BTreeMap<String, String>,
    }

    #[derive(Clone, Debug, Deserialize)]
    pub(crate) struct Service {
        pub(crate) metadata: Meta,
        pub(crate) spec: ServiceSpec,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub(crate) struct ServiceSpec {
        #[serde(rename = "clusterIP", default)]
        pub(crate) cluster_ip: Option<String>,
        #[serde(rename = "clusterIPs", default)]
        pub(crate) cluster_ips: Vec<String>,
        #[serde(default)]
        pub(crate) ports: Vec<ServicePort>,
        #[serde(default)]
        pub(crate) session_affinity: Option<String>,
    }

    #[derive(Clone, Debug, Deserialize)]
    pub(crate) struct ServicePort {
        #[serde(default)]
        pub(crate) name: Option<String>,
        #[serde(default)]
        pub(crate) protocol: Option<String>,
        pub(crate) port: u16,
    }

    #[derive(Clone, Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub(crate) struct EndpointSlice {
        pub(crate) metadata: Meta,
        pub(crate) address_type: String,
        #[serde(default)]
        pub(crate) endpoints: Option<Vec<Endpoint>>,
        #[serde(default)]
        pub(crate) ports: Option<Vec<EndpointPort>>,
    }

    #[derive(Clone, Debug, Deserialize)]
    pub(crate) struct Endpoint {
        pub(crate) addresses: Vec<String>,
        #[serde(default)]
        pub(crate) conditions: Conditions,
    }

    /// Per the API, an unset `ready` means ready.
    #[derive(Clone, Debug, Default, Deserialize)]
    pub(crate) struct Conditions {
        #[serde(default)]
        pub(crate) ready: Option<bool>,
        #[serde(default)]
        pub(crate) terminating: Option<bool>,
    }

    #[derive(Clone, Debug, Deserialize)]
    pub(crate) struct EndpointPort {
        #[serde(default)]
        pub(crate) name: Option<String>,
        #[serde(default)]
        pub(crate) protocol: Option<String>,
        #[serde(default)]
        pub(crate) port: Option<u16>,
    }
}

/// A Service or an EndpointSlice, parsed once (from a file or the API).
#[derive(Clone, Debug)]
pub(crate) enum ApiObject {
    Service(k8s::Service),
    Slice(k8s::EndpointSlice),
}

impl ApiObject {
    /// Parses a `Service` or an `EndpointSlice`; `Ok(None)` for other kinds.
    pub(crate) fn parse(v: serde_json::Value) -> Result<Option<Self>, String> {
        match v["kind"].as_str().unwrap_or_default() {
            "Service" => serde_json::from_value(v)
                .map(|s| Some(Self::Service(s)))
                .map_err(|e| format!("Service: {e}")),
            "EndpointSlice" => serde_json::from_value(v)
                .map(|s| Some(Self::Slice(s)))
                .map_err(|e| format!("EndpointSlice: {e}")),
            _ => Ok(None),
        }
    }
}

/// The Services and EndpointSlices read from the service files.
#[derive(Clone, Debug, Default)]
pub struct Table {
    services: Vec<k8s::Service>,
    slices: Vec<k8s::EndpointSlice>,
    /// Files (or objects in them) that could not be used, with why.
    pub problems: Vec<MalformedRecord>,
}

impl Table {
    /// Reads every `*.json` file of `dir` (a missing directory is an empty
    /// table). A bad file is reported in `problems` and skipped, never fatal.
    pub fn load(dir: &Path) -> Self {
        let (objects, problems) = crate::sources::read_json_dir(dir);
        let mut t = Self {
            problems,
            ..Self::default()
        };
        for (path, v) in objects {
            t.add_object(&path, v);
        }
        t
    }

    fn problem(&mut self, origin: &str, error: String) {
        self.problems.push(MalformedRecord {
            path: origin.to_owned(),
            error,
        });
    }

    /// Adds objects from the Kubernetes API (see `kube_source`).
    pub(crate) fn add_api_objects<'a>(&mut self, objects: impl Iterator<Item = &'a ApiObject>) {
        for o in objects {
            self.push(o.clone());
        }
    }

    fn push(&mut self, o: ApiObject) {
        match o {
            ApiObject::Service(s) => self.services.push(s),
            ApiObject::Slice(s) => self.slices.push(s),
        }
    }

    /// `origin` names the file in problem reports.
    fn add_object(&mut self, origin: &str, v: serde_json::Value) {
        let kind = v["kind"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            k if k.ends_with("List") => match v {
                serde_json::Value::Object(mut o) => match o.remove("items") {
                    Some(serde_json::Value::Array(items)) => {
                        for item in items {
                            self.add_object(origin, item);
                        }
                    }
                    _ => self.problem(origin, format!("{k} without items")),
                },
                _ => self.problem(origin, format!("{k} is not an object")),
            },
            "" => self.problem(
                origin,
                "no \"kind\" (expected Service, EndpointSlice or List)".into(),
            ),
            // Other objects in a `kubectl get ... -o json` dump are ignored.
            _ => match ApiObject::parse(v) {
                Ok(Some(o)) => self.push(o),
                Ok(None) => {}
                Err(e) => self.problem(origin, e),
            },
        }
    }

    /// Every ClusterIP port with its ready backends.
    pub fn ports(&self) -> Vec<ServicePort> {
        let mut out = Vec::new();
        for svc in &self.services {
            let namespace = svc.metadata.namespace.as_deref().unwrap_or("default");
            let name = &svc.metadata.name;
            let mut ips: Vec<&str> = svc.spec.cluster_ips.iter().map(String::as_str).collect();
            if ips.is_empty() {
                ips.extend(svc.spec.cluster_ip.as_deref());
            }
            let skipped = if ips.is_empty() || ips == ["None"] {
                Some("headless or no ClusterIP".to_owned())
            } else if svc.spec.session_affinity.as_deref() == Some("ClientIP") {
                Some("sessionAffinity ClientIP is left to kube-proxy".to_owned())
            } else {
                None
            };
            let slices: Vec<&k8s::EndpointSlice> = self
                .slices
                .iter()
                .filter(|s| {
                    s.metadata.namespace.as_deref().unwrap_or("default") == namespace
                        && s.metadata.labels.get(SERVICE_NAME_LABEL) == Some(name)
                })
                .collect();
            for ip in ips {
                let Ok(ip) = ip.parse::<IpAddr>() else {
                    continue;
                };
                for p in &svc.spec.ports {
                    let protocol = p.protocol.as_deref().unwrap_or("TCP");
                    let mut port = ServicePort {
                        namespace: namespace.to_owned(),
                        name: name.clone(),
                        port_name: p.name.clone().unwrap_or_default(),
                        address: SocketAddr::new(ip, p.port),
                        backends: backends_of(&slices, ip, p),
                        skipped: skipped.clone(),
                    };
                    if port.skipped.is_none() && protocol != "TCP" {
                        port.skipped = Some(format!("{protocol} is not accelerated"));
                    }
                    out.push(port);
                }
            }
        }
        out.sort_by(|a, b| {
            (&a.namespace, &a.name, a.address).cmp(&(&b.namespace, &b.name, b.address))
        });
        out
    }
}

/// Ready, not terminating backends of one Service port, from the slices of
/// the ClusterIP's family (the slice port with the Service port's name).
fn backends_of(
    slices: &[&k8s::EndpointSlice],
    ip: IpAddr,
    p: &k8s::ServicePort,
) -> Vec<SocketAddr> {
    let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    let want_name = p.name.as_deref().unwrap_or_default();
    let mut out = BTreeSet::new();
    for s in slices.iter().filter(|s| s.address_type == family) {
        let Some(port) = s.ports.iter().flatten().find_map(|sp| {
            (sp.name.as_deref().unwrap_or_default() == want_name
                && sp.protocol.as_deref().unwrap_or("TCP")
                    == p.protocol.as_deref().unwrap_or("TCP"))
            .then_some(sp.port)
            .flatten()
        }) else {
            continue;
        };
        for e in s.endpoints.iter().flatten() {
            let usable =
                e.conditions.ready.unwrap_or(true) && !e.conditions.terminating.unwrap_or(false);
            if !usable {
                continue;
            }
            for a in &e.addresses {
                match a.parse::<IpAddr>() {
                    Ok(a) if a.is_ipv4() == ip.is_ipv4() => {
                        out.insert(SocketAddr::new(a, port));
                    }
                    _ => {}
                }
            }
        }
    }
    out.into_iter().collect()
}

/// One port of one ClusterIP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// The Service port's name ("" when unnamed).
    pub port_name: String,
    /// ClusterIP and port.
    pub address: SocketAddr,
    /// Ready, not terminating backends, anywhere in the cluster.
    pub backends: Vec<SocketAddr>,
    /// Why this port is never translated (None when it may be).
    pub skipped: Option<String>,
}

/// Local chain endpoints by address: the pods a translation may target.
fn local_endpoints(records: &[Record]) -> BTreeMap<IpAddr, &Record> {
    records
        .iter()
        .filter(|r| r.chain.is_some() && r.redirect)
        .flat_map(|r| r.ips.iter().map(move |ip| (*ip, r)))
        .collect()
}

/// What the kernel's service table should hold.
pub fn desired(ports: &[ServicePort], records: &[Record]) -> BTreeMap<SvcKey, SvcValue> {
    let local = local_endpoints(records);
    let mut by_key: BTreeMap<SvcKey, Vec<Backend>> = BTreeMap::new();
    for p in ports.iter().filter(|p| p.skipped.is_none()) {
        for b in &p.backends {
            let Some(r) = local.get(&b.ip()) else {
                continue;
            };
            let key = SvcKey {
                addr: addr_of(p.address.ip()),
                port: u32::from(p.address.port()),
                proto: IPPROTO_TCP,
                chain_id: r.endpoint_value().chain_id,
            };
            by_key.entry(key).or_default().push(Backend {
                addr: addr_of(b.ip()),
                port: u32::from(b.port()),
                reserved: 0,
            });
        }
    }
    by_key
        .into_iter()
        .map(|(key, mut backends)| {
            if backends.len() > limits::MAX_BACKENDS {
                warn!(service = %SocketAddr::new(ip_of(key.addr), u16::try_from(key.port).unwrap_or(0)),
                      local_backends = backends.len(), max = limits::MAX_BACKENDS,
                      "more node-local backends than the table holds; using the first");
                backends.truncate(limits::MAX_BACKENDS);
            }
            let mut value = SvcValue {
                count: u32::try_from(backends.len()).expect("at most MAX_BACKENDS"),
                ..SvcValue::default()
            };
            value.backends[..backends.len()].copy_from_slice(&backends);
            (key, value)
        })
        .collect()
}

/// A Service port as `/status` and `spright status` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    #[serde(flatten)]
    pub port: ServicePort,
    /// Backends that are chain pods on this node, with their chain.
    pub local_backends: Vec<LocalBackend>,
    /// Connections translated so far (all chains).
    pub translated_connections: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalBackend {
    pub address: SocketAddr,
    pub pod: String,
    pub chain: String,
}

/// A live translated connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranslationStatus {
    /// The socket's cookie (`ss -e` shows it as `sk:`).
    pub socket_cookie: u64,
    /// `namespace/name` of the calling pod, when its record is known.
    pub pod: Option<String>,
    pub service: SocketAddr,
    pub backend: SocketAddr,
}

/// Service and translation status from the table, the records and the maps.
pub fn status(
    ports: Vec<ServicePort>,
    records: &[Record],
    dp: Option<&Datapath>,
) -> (Vec<ServiceStatus>, Vec<TranslationStatus>) {
    let local = local_endpoints(records);
    // Translations per Service address (summed over the callers' chains).
    let mut translated: BTreeMap<SocketAddr, u64> = BTreeMap::new();
    if let Some(dp) = dp {
        for (k, _) in dp.services().unwrap_or_default() {
            let addr = SocketAddr::new(ip_of(k.addr), u16::try_from(k.port).unwrap_or(0));
            let n = dp.service_counters(k).map_or(0, |c| c.translated);
            *translated.entry(addr).or_default() += n;
        }
    }
    let services = ports
        .into_iter()
        .map(|port| {
            let local_backends = port
                .backends
                .iter()
                .filter_map(|b| {
                    let r = local.get(&b.ip())?;
                    Some(LocalBackend {
                        address: *b,
                        pod: format!("{}/{}", r.pod.namespace, r.pod.name),
                        chain: r.chain.clone().unwrap_or_default(),
                    })
                })
                .collect();
            ServiceStatus {
                translated_connections: translated.get(&port.address).copied().unwrap_or(0),
                port,
                local_backends,
            }
        })
        .collect();
    let pods: BTreeMap<u64, String> = records
        .iter()
        .filter_map(|r| {
            Some((
                r.netns_cookie?,
                format!("{}/{}", r.pod.namespace, r.pod.name),
            ))
        })
        .collect();
    let mut translations: Vec<TranslationStatus> = dp
        .and_then(|d| d.translations().ok())
        .unwrap_or_default()
        .into_iter()
        .map(|(cookie, t)| TranslationStatus {
            socket_cookie: cookie,
            pod: pods.get(&t.netns_cookie).cloned(),
            service: SocketAddr::new(ip_of(t.service), u16::try_from(t.service_port).unwrap_or(0)),
            backend: SocketAddr::new(ip_of(t.backend), u16::try_from(t.backend_port).unwrap_or(0)),
        })
        .collect();
    translations.sort_by_key(|t| t.socket_cookie);
    (services, translations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use spright_endpoint::{PodRef, RECORD_VERSION};

    fn rec(pod: &str, ip: &str, chain: Option<&str>) -> Record {
        Record {
            version: RECORD_VERSION,
            container_id: pod.into(),
            ifname: "eth0".into(),
            netns: format!("/run/netns/{pod}"),
            network: "n".into(),
            ips: vec![ip.parse().unwrap()],
            pod: PodRef {
                namespace: "default".into(),
                name: pod.into(),
                uid: String::new(),
            },
            chain: chain.map(Into::into),
            function: None,
            redirect: true,
            host_ifname: None,
            netns_cookie: Some(7),
        }
    }

    fn write(dir: &Path, name: &str, v: &serde_json::Value) {
        std::fs::write(dir.join(name), serde_json::to_vec(v).unwrap()).unwrap();
    }

    fn service(name: &str, ip: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": name, "namespace": "default" },
            "spec": { "clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP",
                      "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080 },
                                { "name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53 }] }
        })
    }

    fn slice(svc: &str, endpoints: &serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": { "name": format!("{svc}-abcde"), "namespace": "default",
                          "labels": { SERVICE_NAME_LABEL: svc } },
            "addressType": "IPv4",
            "endpoints": endpoints.clone(),
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" },
                      { "name": "dns", "port": 53, "protocol": "UDP" }]
        })
    }

    #[test]
    fn kubectl_output_becomes_ports_with_ready_backends() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.json",
            &serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": [
                service("stage2", "10.96.0.10"),
                slice("stage2", &serde_json::json!([
                    { "addresses": ["10.0.0.5"], "conditions": { "ready": true } },
                    { "addresses": ["10.0.0.6"] },
                    { "addresses": ["10.0.0.7"], "conditions": { "ready": false } },
                    { "addresses": ["10.0.0.8"], "conditions": { "ready": true, "terminating": true } },
                ])),
            ]}),
        );
        write(dir.path(), "bad.json", &serde_json::json!({ "items": 3 }));
        std::fs::write(dir.path().join("broken.json"), b"{").unwrap();
        std::fs::write(dir.path().join("README"), b"not json").unwrap();
        let t = Table::load(dir.path());
        assert_eq!(t.problems.len(), 2, "{:?}", t.problems);
        let ports = t.ports();
        assert_eq!(ports.len(), 2);
        let http = ports.iter().find(|p| p.port_name == "http").unwrap();
        assert_eq!(http.address, "10.96.0.10:80".parse().unwrap());
        assert_eq!(
            http.backends,
            vec![
                "10.0.0.5:8080".parse().unwrap(),
                "10.0.0.6:8080".parse().unwrap()
            ]
        );
        assert_eq!(http.skipped, None);
        let dns = ports.iter().find(|p| p.port_name == "dns").unwrap();
        assert!(dns.skipped.as_deref().unwrap().contains("UDP"));
    }

    #[test]
    fn only_local_backends_of_the_callers_chain_are_chosen() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "s.json", &service("stage2", "10.96.0.10"));
        write(
            dir.path(),
            "e.json",
            &slice(
                "stage2",
                &serde_json::json!([
                    { "addresses": ["10.0.0.5"] },   // local, chain shop
                    { "addresses": ["10.0.0.6"] },   // local, chain other
                    { "addresses": ["10.0.0.7"] },   // local, no chain
                    { "addresses": ["10.9.0.1"] },   // another node
                ]),
            ),
        );
        let records = [
            rec("a", "10.0.0.5", Some("shop")),
            rec("b", "10.0.0.6", Some("other")),
            rec("c", "10.0.0.7", None),
        ];
        let want = desired(&Table::load(dir.path()).ports(), &records);
        assert_eq!(want.len(), 2, "one entry per chain with a local backend");
        let shop = SvcKey {
            addr: addr_of("10.96.0.10".parse().unwrap()),
            port: 80,
            proto: IPPROTO_TCP,
            chain_id: spright_ebpf::chain_id("default", "shop"),
        };
        let v = want[&shop];
        assert_eq!(v.count, 1);
        assert_eq!(
            ip_of(v.backends[0].addr),
            "10.0.0.5".parse::<IpAddr>().unwrap()
        );
        assert_eq!(v.backends[0].port, 8080);
    }

    #[test]
    fn session_affinity_and_headless_services_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = service("sticky", "10.96.0.11");
        s["spec"]["sessionAffinity"] = "ClientIP".into();
        write(dir.path(), "s.json", &s);
        write(dir.path(), "h.json", &service("headless", "None"));
        let ports = Table::load(dir.path()).ports();
        assert!(ports.iter().all(|p| p.skipped.is_some()), "{ports:?}");
        assert!(desired(&ports, &[rec("a", "10.0.0.5", Some("shop"))]).is_empty());
    }
}
