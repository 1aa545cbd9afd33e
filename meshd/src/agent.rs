//! The reconciler: the one owner of meshd's state and of the datapath's
//! write side. It runs on a thread of its own, reconciles whenever a
//! trigger arrives (a directory changed, the API's objects changed, the
//! periodic rescan), and publishes a `Snapshot` after each pass for the
//! readers (`view.rs`).
//!
//! Each reconciliation runs one way: read the sources (endpoint records,
//! removing those of pods whose network namespace is gone; Service and Pod
//! files; the API's copy), compute `desired::desired` from them (pure), then
//! `sync::sync` the kernel to it. It runs at start-up, on every inotify event
//! in the watched directories, on every API change, and on a periodic rescan
//! that catches anything inotify missed.

use std::{path::Path, sync::Arc};

use spright_ebpf::{Datapath, Installed, Placement};
use spright_endpoint::Record;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::{
    config::Config,
    error::chain as error_chain,
    kube_source::{Objects, Published},
    snapshot::{Acceleration, Snapshot},
    sources::{PodView, read_pod_files, read_records},
};

/// What one reconciliation changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// What the sync changed in the kernel.
    pub synced: crate::sync::Synced,
    pub stale_records: usize,
    pub malformed: usize,
}

pub struct Agent {
    config: Arc<Config>,
    dp: Option<Datapath>,
    /// This node's Pods (files and API merged), with the ones that left.
    pods: PodView,
    /// The last reconciliation, as published (also what the next one
    /// compares with, to log each problem once).
    last: Arc<Snapshot>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("acceleration", &self.last.acceleration)
            .field("records", &self.last.records.len())
            .field("reconciles", &self.last.reconciles)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Installs or adopts the datapath. When that is impossible (no privilege,
    /// no bpffs, old kernel) the agent still runs, with acceleration off and
    /// the reason in its status and metrics.
    pub fn start(config: Arc<Config>) -> Self {
        let cgroup = config.cgroup_dir();
        let mut acceleration = Acceleration {
            enabled: false,
            reason: None,
            datapath: None,
            cgroup: cgroup.as_ref().ok().map(|c| c.display().to_string()),
            bpffs: config.bpffs.display().to_string(),
            ..Acceleration::default()
        };
        let dp = match cgroup {
            Err(e) => {
                let reason = format!("--cgroup is not set and {e}");
                warn!(reason = %reason, "acceleration off: pods keep plain networking");
                acceleration.reason = Some(reason);
                None
            }
            Ok(cgroup) => match Datapath::ensure_current(&Placement {
                cgroup,
                bpffs: config.bpffs.clone(),
            }) {
                Ok((dp, how)) => {
                    let how = match how {
                        Installed::Fresh => "fresh",
                        Installed::Adopted => "adopted",
                        Installed::Upgraded => "upgraded",
                    };
                    info!(datapath = how, bpffs = %config.bpffs.display(), "acceleration on");
                    acceleration.enabled = true;
                    acceleration.datapath = Some(how.into());
                    Some(dp)
                }
                Err(e) => {
                    let reason = error_chain(&e);
                    warn!(reason = %reason, "acceleration off: pods keep plain networking");
                    acceleration.reason = Some(reason);
                    None
                }
            },
        };
        let selftest = if config.no_selftest {
            crate::selftest::Report::disabled()
        } else {
            crate::selftest::run(&config.bpffs)
        };
        info!(verdict = %selftest.verdict, trials = selftest.trials, eagain_trials = selftest.eagain_trials,
              detail = ?selftest.detail, "self-test: blocking recv() EAGAIN on the redirect path");
        publish_selftest(&config.state_dir, &selftest);
        acceleration.redirects =
            crate::families::decide(&selftest.families, &config.accept_unsafe_families);
        if dp.is_some() {
            apply_redirect_policy(&config.bpffs, &acceleration.redirects);
            acceleration.splice_guard = splice_guard(&config.bpffs);
        }
        match crate::preload::publish(&config.preload_shim, &config.state_dir) {
            Ok(Some(at)) => {
                info!(at = %at.display(), "published the preload shim for spright.dev/preload pods");
            }
            Ok(None) => info!(shim = %config.preload_shim.display(),
                              "no preload shim to publish (--preload-shim): spright.dev/preload pods find none"),
            Err(e) => {
                warn!(shim = %config.preload_shim.display(), error = %e, "publishing the preload shim");
            }
        }
        Self {
            config,
            dp,
            pods: PodView::default(),
            last: Arc::new(Snapshot {
                acceleration,
                selftest: Some(selftest),
                ..Snapshot::default()
            }),
        }
    }

    /// Reconciles on every trigger until every sender is gone, publishing
    /// a snapshot after each pass. Blocking: run it on its own thread. A
    /// burst of triggers costs one pass (the channel holds one).
    pub fn run(
        mut self,
        mut triggers: mpsc::Receiver<()>,
        api: &watch::Receiver<Published>,
        publish: &watch::Sender<Arc<Snapshot>>,
    ) {
        while triggers.blocking_recv().is_some() {
            let objects = api.borrow().clone();
            self.reconcile(objects.as_deref());
            publish.send_replace(self.snapshot());
        }
    }

    /// What readers see of the last reconciliation.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.last.clone()
    }

    /// One full reconciliation of the sources (with `api`, the API's
    /// latest objects, when watching) into the maps.
    pub fn reconcile(&mut self, api: Option<&Objects>) -> Changes {
        let mut changes = Changes::default();
        let (records, malformed) = read_records(&self.config.state_dir);
        let last = self.last.clone();
        for m in &malformed {
            if !last.malformed.contains(m) {
                warn!(path = %m.path, error = %m.error, "skipping malformed endpoint record");
            }
        }
        changes.malformed = malformed.len();
        let mut live = Vec::with_capacity(records.len());
        for r in records {
            if pod_is_gone(&r) {
                info!(pod.namespace = %r.pod.namespace, pod.name = %r.pod.name, container.id = %r.container_id,
                      netns = %r.netns, "removing the record of a pod whose network namespace is gone");
                if let Err(e) =
                    spright_endpoint::remove(&self.config.state_dir, &r.container_id, &r.ifname)
                {
                    warn!(error = %error_chain(&e), "removing stale record");
                }
                changes.stale_records += 1;
            } else {
                live.push(r);
            }
        }
        let mut services = crate::services::Table::load(&self.config.services_dir());
        if let Some(api) = api {
            services.add_api_objects(api.all());
        }
        for p in &services.problems {
            if !last.services.problems.contains(p) {
                warn!(path = %p.path, error = %p.error, "skipping unusable service file");
            }
        }
        let (file_pods, malformed_pods) = read_pod_files(&self.config.pods_dir());
        for p in &malformed_pods {
            if !last.malformed_pods.contains(p) {
                warn!(path = %p.path, error = %p.error, "skipping unusable Pod file");
            }
        }
        let api_pods = api.into_iter().flat_map(Objects::pods);
        self.pods.update(&file_pods, api_pods, &live);
        let want = crate::desired::desired(&live, &self.pods, &services.ports());
        for (pod, why) in &want.departures {
            if !last.leaving.contains(pod) {
                info!(pod = %pod, reason = why,
                      "pod leaves its chain: new connections stay on TCP, open ones move to TCP");
            }
        }
        for m in &want.mismatches {
            if !last.mismatches.contains(m) {
                warn!(pod.namespace = %m.namespace, pod.name = %m.pod, record.chain = ?m.record_chain, pod.chain = ?m.pod_chain,
                      "the Pod names another chain than it was attached with: the datapath keeps the attached chain until the pod is recreated");
            }
        }
        if let Some(dp) = self.dp.as_mut() {
            changes.synced = crate::sync::sync(dp, &self.config.bpffs, &want);
        }
        let pod_network = self
            .config
            .manages_pod_network()
            .then(|| self.pod_network(api, last.pod_network.as_ref()));
        let mut acceleration = last.acceleration.clone();
        if self.dp.is_some() {
            acceleration.splice_guard = splice_guard(&self.config.bpffs);
        }
        self.last = Arc::new(Snapshot {
            acceleration,
            selftest: last.selftest.clone(),
            leaving: want.departures.into_iter().map(|(pod, _)| pod).collect(),
            records: want.records,
            malformed,
            services,
            pods: self.pods.clone(),
            malformed_pods,
            mismatches: want.mismatches,
            pod_network,
            reconciles: last.reconciles + 1,
        });
        let s = &changes.synced;
        if changes.stale_records != 0 || *s != crate::sync::Synced::default() {
            info!(
                upserted = s.upserted,
                removed = s.removed,
                stale = changes.stale_records,
                services_set = s.services_set,
                services_removed = s.services_removed,
                switched = s.switched,
                endpoints = self.last.records.len(),
                "reconciled"
            );
        }
        changes
    }
}

impl Agent {
    /// Primary mode: publishes this node's pod CIDRs and keeps the routes to
    /// other nodes' pods, from the API's Nodes (see `pod_network`). Before
    /// the Nodes are listed nothing changes: an empty list must not remove
    /// every route.
    fn pod_network(
        &self,
        api: Option<&Objects>,
        last: Option<&crate::pod_network::PodNetworkStatus>,
    ) -> crate::pod_network::PodNetworkStatus {
        let Some(me) = self.config.node_name.as_deref() else {
            return crate::pod_network::PodNetworkStatus {
                error: Some("--cni-mode primary needs --node-name (NODE_NAME)".into()),
                ..Default::default()
            };
        };
        let Some(nodes) = api.and_then(Objects::nodes) else {
            return crate::pod_network::PodNetworkStatus {
                error: Some("the Nodes are not listed from the API yet".into()),
                ..last.cloned().unwrap_or_default()
            };
        };
        let plan = crate::pod_network::plan(me, nodes);
        if last.is_none_or(|l| l.plan.unroutable != plan.unroutable) {
            for u in &plan.unroutable {
                warn!(node = %u, "pods of a node cannot be routed");
            }
        }
        let error = match crate::pod_network::apply(&self.config.state_dir, &plan) {
            Ok(done) => {
                for d in done {
                    info!("pod network: {d}");
                }
                None
            }
            Err(e) => {
                if last.is_none_or(|l| l.error.as_deref() != Some(e.as_str())) {
                    warn!(error = %e, "pod network");
                }
                Some(e)
            }
        };
        crate::pod_network::PodNetworkStatus { plan, error }
    }
}

/// Writes the redirect decision into the programs' switches and says it.
fn apply_redirect_policy(bpffs: &Path, policy: &crate::families::Policy) {
    let flags = [
        (spright_ebpf::CONFIG_NO_REDIRECT, !policy.redirect),
        (spright_ebpf::CONFIG_NO_SPLICE_GUARD, !policy.splice_guard),
    ];
    for (flag, on) in flags {
        if let Err(e) = spright_ebpf::set_config_flag(bpffs, flag, on) {
            warn!(error = %error_chain(&e), flag, on, "writing the programs' switches");
        }
    }
    match &policy.reason {
        Some(reason) => warn!(reason = %reason, "redirects off for new connections"),
        None if !policy.accepted_unsafe.is_empty() => warn!(
            families = ?policy.accepted_unsafe,
            "redirects on although this kernel loses these families' data (accepted by --accept-unsafe-families)"
        ),
        None => info!(splice_guard = policy.splice_guard, "redirects on"),
    }
}

/// The splice guard's state (not armed when it cannot be read).
pub(crate) fn splice_guard(bpffs: &Path) -> crate::snapshot::SpliceGuard {
    spright_ebpf::guard_state(bpffs).map_or_else(
        |_| crate::snapshot::SpliceGuard::default(),
        |g| crate::snapshot::SpliceGuard {
            armed: g.armed,
            refused: g.refused,
        },
    )
}

/// Writes the self-test report where spright-cni's STATUS reads it. Best
/// effort.
fn publish_selftest(state_dir: &Path, report: &crate::selftest::Report) {
    if let Err(e) = spright_endpoint::selftest::publish(state_dir, report) {
        warn!(state_dir = %state_dir.display(), error = %e, "publishing the self-test report");
    }
}

/// A record whose network namespace file no longer exists belongs to a pod
/// that is gone (its DEL was missed). Records without an absolute netns path,
/// or whose namespace directory this process cannot see, are never judged
/// stale.
fn pod_is_gone(r: &Record) -> bool {
    let p = Path::new(&r.netns);
    // Only when the namespace's directory is visible: a meshd that cannot
    // see the runtime's netns directory (not mounted into its container, or
    // a `/proc/<pid>/ns/net` path of another PID namespace) must not judge
    // every pod gone.
    p.is_absolute() && !p.exists() && p.parent().is_some_and(Path::is_dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use spright_endpoint::{PodRef, RECORD_VERSION};

    fn rec(id: &str, ips: &[&str], netns: &str) -> Record {
        Record {
            version: RECORD_VERSION,
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: netns.into(),
            network: "n".into(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            pod: PodRef {
                namespace: "ns".into(),
                name: id.into(),
                uid: String::new(),
            },
            chain: Some("c".into()),
            function: None,
            redirect: true,
            host_ifname: None,
            netns_cookie: None,
        }
    }

    #[test]
    fn only_records_with_a_visibly_missing_netns_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        let netns = |name: &str| dir.path().join(name).display().to_string();
        assert!(!pod_is_gone(&rec("a", &[], "/proc/self/ns/net")));
        assert!(pod_is_gone(&rec("a", &[], &netns("cni-gone"))));
        // The runtime's directory is not visible here: never judged.
        assert!(!pod_is_gone(&rec("a", &[], &netns("unmounted/cni-1"))));
        assert!(!pod_is_gone(&rec("a", &[], "/proc/999999999/ns/net")));
        assert!(!pod_is_gone(&rec("a", &[], "relative")));
    }

    #[test]
    fn agent_without_datapath_still_tracks_records() {
        let dir = tempfile::tempdir().unwrap();
        spright_endpoint::write(dir.path(), &rec("live", &["10.0.0.1"], "/proc/self/ns/net"))
            .unwrap();
        // A runtime's netns directory that exists, without the pod's file
        // (/run/netns itself may not exist on a fresh machine).
        let netns_dir = dir.path().join("netns");
        std::fs::create_dir(&netns_dir).unwrap();
        let gone = netns_dir.join("cni-gone").display().to_string();
        spright_endpoint::write(dir.path(), &rec("gone", &["10.0.0.2"], &gone)).unwrap();
        std::fs::write(
            spright_endpoint::records_dir(dir.path()).join("bad_eth0.json"),
            "{",
        )
        .unwrap();
        let config = <Config as clap::Parser>::try_parse_from([
            "meshd",
            "--bpffs",
            dir.path().join("not-bpffs").to_str().unwrap(),
            "--state-dir",
            dir.path().to_str().unwrap(),
            "--cgroup",
            dir.path().to_str().unwrap(),
        ])
        .unwrap();
        let config = Arc::new(config);
        let mut agent = Agent::start(config.clone());
        let changes = agent.reconcile(None);
        assert_eq!(changes.stale_records, 1);
        assert_eq!(changes.malformed, 1);
        let status = crate::view::status_of(&agent.snapshot(), None, None, &config);
        assert!(!status.acceleration.enabled);
        assert!(
            status
                .acceleration
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("not a cgroup v2 directory"),
            "{status:?}"
        );
        assert_eq!(status.endpoints.len(), 1);
        assert_eq!(status.malformed_records.len(), 1);
        assert!(
            spright_endpoint::find(dir.path(), "gone", "eth0")
                .unwrap()
                .is_none()
        );
    }
}
