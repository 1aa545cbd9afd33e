//! The read side of meshd: the latest snapshot, the API's latest objects
//! and the memory bound's counters, turned into `/status`, metrics and
//! membership answers. Nothing here takes the reconciler's state.

use std::sync::{Arc, Mutex, PoisonError};

use spright_ebpf::Datapath;
use spright_endpoint::membership::{self, Query, Verdict};
use tokio::sync::watch;

use crate::{
    config::Config,
    kube_source::{Objects, Published},
    membound,
    snapshot::Snapshot,
    status::{PodsStatus, Status},
};

/// A cheap, clonable handle for readers.
#[derive(Clone, Debug)]
pub struct Reader {
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub api: watch::Receiver<Published>,
    pub config: Arc<Config>,
    pub membound: Arc<membound::Stats>,
    /// Flow events (`/v1/flows`).
    pub flows: Arc<crate::flows::Flows>,
    /// The pinned maps, opened by the first read that needs them and kept
    /// (an upgrade swaps programs but keeps the maps).
    pub maps: Arc<Mutex<Option<Datapath>>>,
}

impl Reader {
    pub fn latest(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Whether the first reconciliation is done.
    pub fn ready(&self) -> bool {
        self.snapshot.borrow().reconciles > 0
    }

    /// The node view of `/status` and the metrics; the counters come from
    /// the pinned maps.
    pub fn status(&self) -> Status {
        let snap = self.latest();
        let mut maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        if snap.acceleration.enabled && maps.is_none() {
            *maps = Datapath::open(&self.config.bpffs).ok();
        }
        let dp = maps.as_ref().filter(|_| snap.acceleration.enabled);
        let api = self.api.borrow().clone();
        let mut s = status_of(&snap, api.as_deref(), dp, &self.config);
        s.memory_bound = Some(self.membound.report(
            self.config.memory_bound_bytes,
            self.config.memory_bound_interval_ms,
        ));
        s.flows = Some(self.flows.counts());
        s
    }

    /// Answers shm-csi's question from the freshest Pods (the API's copy
    /// first, then the snapshot's merged view) and the records.
    pub fn membership(&self, q: &Query) -> Verdict {
        let snap = self.latest();
        let api = self.api.borrow().clone();
        let api_pods = api.iter().flat_map(|o| o.pods());
        membership::decide(
            q,
            self.config.node_name.as_deref(),
            api_pods.chain(snap.pods.iter()),
            &snap.records,
        )
    }
}

/// The node view from a snapshot (pure but for the map reads through `dp`).
pub fn status_of(
    snap: &Snapshot,
    api: Option<&Objects>,
    dp: Option<&Datapath>,
    config: &Config,
) -> Status {
    let mut s = Status::collect(
        "meshd",
        snap.acceleration.clone(),
        &snap.records,
        &snap.malformed,
        dp,
    );
    s.reconciles = snap.reconciles;
    s.selftest.clone_from(&snap.selftest);
    s.add_services(&snap.services, &snap.records, dp);
    s.kubernetes = api.map(Objects::status);
    s.pod_network.clone_from(&snap.pod_network);
    s.pods = Some(PodsStatus {
        known: snap.pods.len(),
        node_name: config.node_name.clone(),
        dir: config.pods_dir().display().to_string(),
        malformed_files: snap.malformed_pods.clone(),
        mismatches: snap.mismatches.clone(),
        leaving: snap.leaving.clone(),
    });
    s
}
