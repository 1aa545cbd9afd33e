//! The node's status: what `/status` serves, what `/metrics` is derived from
//! and what `spright status` prints. Collected from the endpoint records and
//! the pinned maps, so the CLI can build the same view when meshd is down.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, path::Path};

use serde::{Deserialize, Serialize};
use spright_ebpf::{Counters, Datapath};
use spright_endpoint::Record;

use crate::sources::MalformedRecord;

pub use crate::snapshot::Acceleration;

/// Counters of one endpoint or chain, summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterSet {
    pub redirected_messages: u64,
    pub redirected_bytes: u64,
    pub fallback_messages: u64,
    pub fallback_bytes: u64,
    pub accelerated_sockets: u64,
}

impl CounterSet {
    fn add(&mut self, o: &Self) {
        self.redirected_messages += o.redirected_messages;
        self.redirected_bytes += o.redirected_bytes;
        self.fallback_messages += o.fallback_messages;
        self.fallback_bytes += o.fallback_bytes;
        self.accelerated_sockets += o.accelerated_sockets;
    }
}

impl From<Counters> for CounterSet {
    fn from(c: Counters) -> Self {
        Self {
            redirected_messages: c.redirected_msgs,
            redirected_bytes: c.redirected_bytes,
            fallback_messages: c.fallback_msgs,
            fallback_bytes: c.fallback_bytes,
            accelerated_sockets: c.accelerated_socks,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub namespace: String,
    pub pod: String,
    pub container_id: String,
    pub ifname: String,
    pub ips: Vec<IpAddr>,
    pub chain: Option<String>,
    pub function: Option<String>,
    pub redirect: bool,
    /// Whether every IP of this endpoint is in the kernel's endpoint map.
    pub in_datapath: bool,
    pub counters: CounterSet,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainStatus {
    pub namespace: String,
    pub chain: String,
    pub endpoints: usize,
    pub counters: CounterSet,
}

/// The whole node view.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// "meshd" when served by the agent, "pinned-maps" when built by the CLI.
    pub source: String,
    pub acceleration: Acceleration,
    pub chains: Vec<ChainStatus>,
    pub endpoints: Vec<EndpointStatus>,
    pub malformed_records: Vec<MalformedRecord>,
    /// Reconciliations done since meshd started (0 from the CLI).
    pub reconciles: u64,
    /// meshd's start-up self-test of the redirect path (absent from the CLI).
    #[serde(default)]
    pub selftest: Option<crate::selftest::Report>,
    /// Service ports from the service files, with their node-local backends.
    #[serde(default)]
    pub services: Vec<crate::services::ServiceStatus>,
    /// Live connections whose destination was translated at `connect()`.
    #[serde(default)]
    pub translations: Vec<crate::services::TranslationStatus>,
    /// Service files (or objects in them) that were skipped, with why.
    #[serde(default)]
    pub malformed_service_files: Vec<MalformedRecord>,
    /// The Kubernetes API source of Services (absent when not watching).
    #[serde(default)]
    pub kubernetes: Option<crate::kube_source::SourceStatus>,
    /// meshd's memory bound of the redirect path (absent from the CLI).
    #[serde(default)]
    pub memory_bound: Option<crate::membound::Report>,
    /// Flow events counted since meshd started (absent from the CLI; the
    /// flows themselves are on `/v1/flows`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<crate::flows::FlowCounts>,
    /// This node's Pods as meshd knows them (absent from the CLI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodsStatus>,
    /// Primary mode's pod CIDRs and routes (absent in chained mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_network: Option<crate::pod_network::PodNetworkStatus>,
}

impl PodsStatus {
    /// The Pod lines of `spright status`: the count, then every pod whose
    /// Pod and record disagree, and every pod that left its chain.
    fn render(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "pods: {} known on node {} (API watch and {}){}",
            self.known,
            self.node_name
                .as_deref()
                .unwrap_or("? (--node-name unset: no API watch)"),
            self.dir,
            if self.malformed_files.is_empty() {
                String::new()
            } else {
                format!("; {} unusable Pod file(s)", self.malformed_files.len())
            }
        );
        for m in &self.mismatches {
            let _ = writeln!(
                s,
                "  mismatch: {}/{} was attached in chain {} but its Pod now says {} (the datapath keeps the attached chain until the pod is recreated)",
                m.namespace,
                m.pod,
                m.record_chain.as_deref().unwrap_or("<none>"),
                m.pod_chain.as_deref().unwrap_or("<none>"),
            );
        }
        for p in &self.leaving {
            let _ = writeln!(s, "  left its chain: {p} (its connections take TCP)");
        }
    }
}

/// The Pod source: how many Pods meshd knows, and where Pod and record disagree.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodsStatus {
    /// Pods of this node known from the API and the pods directory.
    pub known: usize,
    /// `--node-name`; without it Pods are not watched on the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The pods directory read.
    pub dir: String,
    #[serde(default)]
    pub malformed_files: Vec<MalformedRecord>,
    /// Pods whose object names another chain than their record.
    #[serde(default)]
    pub mismatches: Vec<crate::desired::Mismatch>,
    /// Pods (`namespace/name`) that left their chain while running: their
    /// connections take TCP.
    #[serde(default)]
    pub leaving: Vec<String>,
}

impl Status {
    /// Builds the view from records and (when acceleration is on) the maps.
    pub fn collect(
        source: &str,
        acceleration: Acceleration,
        records: &[Record],
        malformed: &[MalformedRecord],
        dp: Option<&Datapath>,
    ) -> Self {
        let in_map: Vec<IpAddr> = dp
            .and_then(|d| d.endpoints().ok())
            .map(|v| v.into_iter().map(|(ip, _)| ip).collect())
            .unwrap_or_default();
        let mut endpoints: Vec<EndpointStatus> = records
            .iter()
            .map(|r| {
                let mut counters = CounterSet::default();
                for ip in &r.ips {
                    if let Some(c) = dp.and_then(|d| d.counters(*ip).ok()) {
                        counters.add(&c.into());
                    }
                }
                EndpointStatus {
                    namespace: r.pod.namespace.clone(),
                    pod: r.pod.name.clone(),
                    container_id: r.container_id.clone(),
                    ifname: r.ifname.clone(),
                    ips: r.ips.clone(),
                    chain: r.chain.clone(),
                    function: r.function.clone(),
                    redirect: r.redirect,
                    in_datapath: !r.ips.is_empty() && r.ips.iter().all(|ip| in_map.contains(ip)),
                    counters,
                }
            })
            .collect();
        endpoints.sort_by(|a, b| {
            (&a.namespace, &a.pod, &a.ifname).cmp(&(&b.namespace, &b.pod, &b.ifname))
        });
        let mut chains: BTreeMap<(String, String), ChainStatus> = BTreeMap::new();
        for e in &endpoints {
            let Some(chain) = &e.chain else { continue };
            let c = chains
                .entry((e.namespace.clone(), chain.clone()))
                .or_insert_with(|| ChainStatus {
                    namespace: e.namespace.clone(),
                    chain: chain.clone(),
                    endpoints: 0,
                    counters: CounterSet::default(),
                });
            c.endpoints += 1;
            c.counters.add(&e.counters);
        }
        Self {
            source: source.to_owned(),
            acceleration,
            chains: chains.into_values().collect(),
            endpoints,
            malformed_records: malformed.to_vec(),
            reconciles: 0,
            selftest: None,
            services: Vec::new(),
            translations: Vec::new(),
            malformed_service_files: Vec::new(),
            kubernetes: None,
            memory_bound: None,
            flows: None,
            pods: None,
            pod_network: None,
        }
    }

    /// Adds the Service view (table, local backends, live translations).
    pub fn add_services(
        &mut self,
        table: &crate::services::Table,
        records: &[Record],
        dp: Option<&Datapath>,
    ) {
        let (services, translations) = crate::services::status(table.ports(), records, dp);
        self.services = services;
        self.translations = translations;
        self.malformed_service_files.clone_from(&table.problems);
    }

    /// Builds the view without meshd: records from the state directory, counters
    /// from the pinned maps (acceleration shows as off when they cannot be opened).
    pub fn from_node(state_dir: &Path, bpffs: &Path, services_dir: &Path) -> Self {
        let (records, malformed) = crate::sources::read_records(state_dir);
        let (dp, acceleration) = match Datapath::open(bpffs) {
            Ok(dp) => (
                Some(dp),
                Acceleration {
                    enabled: true,
                    datapath: Some("pinned".into()),
                    ..Acceleration::default()
                },
            ),
            Err(e) => (
                None,
                Acceleration {
                    enabled: false,
                    reason: Some(crate::error::chain(&e)),
                    ..Acceleration::default()
                },
            ),
        };
        let acceleration = Acceleration {
            bpffs: bpffs.display().to_string(),
            ..acceleration
        };
        let mut s = Self::collect(
            "pinned-maps",
            acceleration,
            &records,
            &malformed,
            dp.as_ref(),
        );
        let table = crate::services::Table::load(services_dir);
        s.add_services(&table, &records, dp.as_ref());
        s
    }

    /// A readable table for `spright status`.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let a = &self.acceleration;
        let _ = writeln!(
            s,
            "acceleration: {}{}   (source: {}, bpffs {}{})",
            if a.enabled { "ON" } else { "OFF" },
            a.reason
                .as_ref()
                .map(|r| format!(" — {r}"))
                .unwrap_or_default(),
            self.source,
            a.bpffs,
            a.cgroup
                .as_ref()
                .map(|c| format!(", cgroup {c}"))
                .unwrap_or_default(),
        );
        if let Some(t) = &self.selftest {
            let _ = writeln!(
                s,
                "self-test (blocking recv EAGAIN after half-close): {} ({} of {} trials{})",
                t.verdict,
                t.eagain_trials,
                t.trials,
                t.detail
                    .as_ref()
                    .map(|d| format!("; {d}"))
                    .unwrap_or_default(),
            );
        }
        if let Some(t) = &self.selftest {
            for f in &t.families {
                let _ = writeln!(
                    s,
                    "syscall family {} on the redirect path: {} ({})",
                    f.name, f.verdict, f.detail
                );
            }
        }
        if a.enabled {
            let r = &a.redirects;
            let _ = writeln!(
                s,
                "redirects: {}   (splice guard: {}, {} calls refused)",
                match (&r.reason, r.accepted_unsafe.is_empty()) {
                    (Some(reason), _) => format!("OFF for new connections — {reason}"),
                    (None, false) => format!(
                        "ON, accepting data loss in: {} (--accept-unsafe-families)",
                        r.accepted_unsafe.join(", ")
                    ),
                    (None, true) => "ON".to_owned(),
                },
                match (a.splice_guard.armed, r.splice_guard) {
                    (_, false) => "not needed on this kernel",
                    (true, true) => "attached",
                    (false, true) => "not attached",
                },
                a.splice_guard.refused
            );
        }
        if let Some(m) = &self.memory_bound {
            let _ = writeln!(s, "{}", m.summary());
        }
        if let Some(p) = &self.pods {
            p.render(&mut s);
        }
        let _ = writeln!(s, "\nCHAINS");
        let _ = writeln!(
            s,
            "{:<16} {:<20} {:>9} {:>12} {:>14} {:>10} {:>8}",
            "NAMESPACE", "CHAIN", "ENDPOINTS", "REDIR MSGS", "REDIR BYTES", "FALLBACKS", "SOCKETS"
        );
        for c in &self.chains {
            let k = &c.counters;
            let _ = writeln!(
                s,
                "{:<16} {:<20} {:>9} {:>12} {:>14} {:>10} {:>8}",
                c.namespace,
                c.chain,
                c.endpoints,
                k.redirected_messages,
                k.redirected_bytes,
                k.fallback_messages,
                k.accelerated_sockets
            );
        }
        let _ = writeln!(s, "\nENDPOINTS");
        let _ = writeln!(
            s,
            "{:<16} {:<24} {:<18} {:<16} {:<6} {:>12} {:>14} {:>10}",
            "NAMESPACE", "POD", "IP", "CHAIN", "ACCEL", "REDIR MSGS", "REDIR BYTES", "FALLBACKS"
        );
        for e in &self.endpoints {
            let ips: Vec<String> = e.ips.iter().map(ToString::to_string).collect();
            let accel = match (e.chain.is_some(), e.redirect, e.in_datapath) {
                (false, _, _) => "-",
                (true, false, _) => "opt-out",
                (true, true, true) => "yes",
                (true, true, false) => "no",
            };
            let _ = writeln!(
                s,
                "{:<16} {:<24} {:<18} {:<16} {:<6} {:>12} {:>14} {:>10}",
                e.namespace,
                e.pod,
                ips.join(","),
                e.chain.as_deref().unwrap_or("-"),
                accel,
                e.counters.redirected_messages,
                e.counters.redirected_bytes,
                e.counters.fallback_messages
            );
        }
        self.render_services(&mut s);
        for m in &self.malformed_records {
            let _ = writeln!(s, "\nmalformed record skipped: {}: {}", m.path, m.error);
        }
        for m in &self.malformed_service_files {
            let _ = writeln!(s, "\nservice file skipped: {}: {}", m.path, m.error);
        }
        s
    }

    fn render_services(&self, s: &mut String) {
        /// Rows of the connection table (the JSON view has them all).
        const MAX_ROWS: usize = 20;
        if let Some(p) = &self.pod_network {
            let cidrs: Vec<String> = p.plan.pod_cidrs.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                s,
                "\npod network (primary, host-gw): pod CIDRs {}; {} routes to other nodes{}",
                if cidrs.is_empty() {
                    "not allocated yet".to_owned()
                } else {
                    cidrs.join(", ")
                },
                p.plan.routes.len(),
                p.error
                    .as_ref()
                    .map(|e| format!(" — {e}"))
                    .unwrap_or_default()
            );
            for r in &p.plan.routes {
                let _ = writeln!(s, "  {} via {} ({})", r.dst, r.via, r.node);
            }
            for u in &p.plan.unroutable {
                let _ = writeln!(s, "  not routed: {u}");
            }
        }
        if let Some(k) = &self.kubernetes {
            let _ = writeln!(
                s,
                "\nkubernetes API: {} ({} services, {} endpoint slices){}",
                k.state,
                k.services,
                k.endpoint_slices,
                k.error
                    .as_ref()
                    .map(|e| format!(" — {e}"))
                    .unwrap_or_default()
            );
        }
        if self.services.is_empty() && self.translations.is_empty() {
            return;
        }
        let _ = writeln!(s, "\nSERVICES");
        let _ = writeln!(
            s,
            "{:<16} {:<20} {:<24} {:>8} {:<40} {:>10}",
            "NAMESPACE", "SERVICE", "ADDRESS", "BACKENDS", "LOCAL CHAIN BACKENDS", "TRANSLATED"
        );
        for v in &self.services {
            let local = match &v.port.skipped {
                Some(why) => format!("(not translated: {why})"),
                None if v.local_backends.is_empty() => "- (kube-proxy)".to_owned(),
                None => v
                    .local_backends
                    .iter()
                    .map(|b| format!("{} {}@{}", b.address, b.pod, b.chain))
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            let _ = writeln!(
                s,
                "{:<16} {:<20} {:<24} {:>8} {:<40} {:>10}",
                v.port.namespace,
                v.port.name,
                v.port.address.to_string(),
                v.port.backends.len(),
                local,
                v.translated_connections
            );
        }
        let _ = writeln!(
            s,
            "\nTRANSLATED CONNECTIONS ({} open)",
            self.translations.len()
        );
        let _ = writeln!(
            s,
            "{:<20} {:<32} {:<24} {:<24}",
            "SOCKET COOKIE", "POD", "DIALLED", "BACKEND"
        );
        for t in self.translations.iter().take(MAX_ROWS) {
            let _ = writeln!(
                s,
                "{:<20} {:<32} {:<24} {:<24}",
                t.socket_cookie,
                t.pod.as_deref().unwrap_or("?"),
                t.service.to_string(),
                t.backend.to_string()
            );
        }
        if self.translations.len() > MAX_ROWS {
            let _ = writeln!(
                s,
                "… and {} more (`spright status --json` lists all)",
                self.translations.len() - MAX_ROWS
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spright_endpoint::{PodRef, RECORD_VERSION};

    fn rec(pod: &str, ip: &str, chain: Option<&str>) -> Record {
        Record {
            version: RECORD_VERSION,
            container_id: format!("c-{pod}"),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            network: "spright".into(),
            ips: vec![ip.parse().unwrap()],
            pod: PodRef {
                namespace: "shop".into(),
                name: pod.into(),
                uid: String::new(),
            },
            chain: chain.map(Into::into),
            function: None,
            redirect: true,
            host_ifname: None,
            netns_cookie: None,
        }
    }

    #[test]
    fn chains_group_endpoints_by_namespace_and_name() {
        let records = [
            rec("a", "10.0.0.1", Some("c1")),
            rec("b", "10.0.0.2", Some("c1")),
            rec("z", "10.0.0.3", None),
        ];
        let s = Status::collect("meshd", Acceleration::default(), &records, &[], None);
        assert_eq!(s.chains.len(), 1);
        assert_eq!(s.chains[0].endpoints, 2);
        assert_eq!(s.endpoints.len(), 3);
        assert!(s.endpoints.iter().all(|e| !e.in_datapath));
        let table = s.render();
        assert!(table.contains("acceleration: OFF"), "{table}");
        assert!(
            table.contains("c1") && table.contains("10.0.0.3"),
            "{table}"
        );
    }

    #[test]
    fn mismatches_and_departures_are_shown() {
        let st = Status {
            pods: Some(PodsStatus {
                known: 2,
                node_name: Some("n1".into()),
                dir: "/var/lib/spright/pods".into(),
                malformed_files: vec![],
                mismatches: vec![crate::desired::Mismatch {
                    namespace: "shop".into(),
                    pod: "fn-a".into(),
                    record_chain: Some("checkout".into()),
                    pod_chain: Some("billing".into()),
                }],
                leaving: vec!["shop/fn-b".into()],
            }),
            ..Status::default()
        };
        let text = st.render();
        assert!(text.contains("pods: 2 known on node n1"), "{text}");
        assert!(
            text.contains(
                "mismatch: shop/fn-a was attached in chain checkout but its Pod now says billing"
            ),
            "{text}"
        );
        assert!(text.contains("left its chain: shop/fn-b"), "{text}");
    }

    #[test]
    fn status_round_trips_through_json() {
        let s = Status::collect(
            "meshd",
            Acceleration {
                enabled: false,
                reason: Some("no bpffs".into()),
                ..Acceleration::default()
            },
            &[rec("a", "fd00::1", Some("c"))],
            &[MalformedRecord {
                path: "/x.json".into(),
                error: "bad".into(),
            }],
            None,
        );
        let back: Status = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert!(
            s.render()
                .contains("malformed record skipped: /x.json: bad")
        );
    }
}
