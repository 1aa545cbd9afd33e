//! What the reconciler publishes after every reconciliation. Readers (HTTP,
//! metrics, status, the memory bound) read the latest one and never share
//! the reconciler's state or wait for it.

use serde::{Deserialize, Serialize};
use spright_endpoint::Record;

use crate::{
    desired::Mismatch,
    selftest,
    services::Table,
    sources::{MalformedRecord, PodView},
};

/// Whether acceleration is on, and why not when it is off.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acceleration {
    pub enabled: bool,
    /// Why acceleration is off (None when on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// "fresh" (this meshd installed the programs), "adopted" (pinned state
    /// reused) or "upgraded" (maps reused, this build's programs swapped in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datapath: Option<String>,
    pub cgroup: Option<String>,
    pub bpffs: String,
    /// Whether new connections are redirected, from the self-test's
    /// syscall families (`families.rs`).
    #[serde(default)]
    pub redirects: crate::families::Policy,
    /// The splice guard: attached with what it needs from this kernel, and
    /// the calls it refused.
    #[serde(default)]
    pub splice_guard: SpliceGuard,
}

/// The splice guard as `/status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpliceGuard {
    pub armed: bool,
    pub refused: u64,
}

/// The node as of one reconciliation.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub acceleration: Acceleration,
    pub selftest: Option<selftest::Report>,
    /// Live endpoint records as the datapath treats them (a pod that left
    /// its chain has `redirect` off).
    pub records: Vec<Record>,
    pub malformed: Vec<MalformedRecord>,
    /// Service files merged with the API's Services and EndpointSlices.
    pub services: Table,
    /// This node's Pods (files and API merged).
    pub pods: PodView,
    pub malformed_pods: Vec<MalformedRecord>,
    pub mismatches: Vec<Mismatch>,
    /// Pods (`namespace/name`) that left their chain while running.
    pub leaving: Vec<String>,
    /// Primary mode's pod network (absent in chained mode).
    pub pod_network: Option<crate::pod_network::PodNetworkStatus>,
    /// Reconciliations done; 0 until the first one (not ready).
    pub reconciles: u64,
}

impl Snapshot {
    /// Addresses and network namespaces of the pods whose sockets can be
    /// redirected (chain members that did not opt out or leave).
    pub fn redirecting_members(&self) -> Vec<(std::net::IpAddr, String)> {
        self.records
            .iter()
            .filter(|r| {
                r.chain.is_some() && r.redirect && std::path::Path::new(&r.netns).is_absolute()
            })
            .flat_map(|r| r.ips.iter().map(|ip| (*ip, r.netns.clone())))
            .collect()
    }
}
