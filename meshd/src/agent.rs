//! The agent's state and its reconciliation loop.
//!
//! The endpoint records on disk are the source of truth. Each reconciliation
//! reads them all, removes records of pods whose network namespace is gone,
//! and makes the kernel's endpoint map equal to what the records say (insert,
//! update, delete). It runs at start-up, on every inotify event in the records
//! directory, and on a periodic rescan that catches anything inotify missed.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use spright_ebpf::{Datapath, EndpointValue, Installed, Placement};
use spright_endpoint::Record;
use tracing::{info, warn};

use crate::{
    config::Config,
    status::{Acceleration, MalformedRecord, Status, error_chain, read_records},
};

/// Shared handle on the agent.
pub type Shared = Arc<Mutex<Agent>>;

/// What one reconciliation changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub upserted: usize,
    pub removed: usize,
    /// Service table entries set / removed.
    pub services_set: usize,
    pub services_removed: usize,
    pub stale_records: usize,
    pub malformed: usize,
}

pub struct Agent {
    config: Config,
    dp: Option<Datapath>,
    acceleration: Acceleration,
    records: Vec<Record>,
    malformed: Vec<MalformedRecord>,
    services: crate::services::Table,
    /// Services and EndpointSlices from the API (None when not watching).
    api: Option<crate::kube_source::Objects>,
    reconciles: u64,
    selftest: crate::selftest::Report,
    membound: Arc<crate::membound::Stats>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("acceleration", &self.acceleration)
            .field("records", &self.records.len())
            .field("reconciles", &self.reconciles)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Installs or adopts the datapath. When that is impossible (no privilege,
    /// no bpffs, old kernel) the agent still runs, with acceleration off and
    /// the reason in its status and metrics.
    pub fn start(config: Config) -> Self {
        let cgroup = config.cgroup_dir();
        let mut acceleration = Acceleration {
            enabled: false,
            reason: None,
            datapath: None,
            cgroup: cgroup.as_ref().ok().map(|c| c.display().to_string()),
            bpffs: config.bpffs.display().to_string(),
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
        Self {
            selftest,
            config,
            dp,
            acceleration,
            records: Vec::new(),
            malformed: Vec::new(),
            services: crate::services::Table::default(),
            api: None,
            reconciles: 0,
            membound: Arc::default(),
        }
    }

    /// The memory bound's counters (membound.rs).
    pub fn membound(&self) -> Arc<crate::membound::Stats> {
        self.membound.clone()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The live endpoint records as of the last reconciliation.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The copy of the API's Services and EndpointSlices (starts watching).
    pub fn api_objects_mut(&mut self) -> &mut crate::kube_source::Objects {
        self.api.get_or_insert_default()
    }

    pub fn reconciles(&self) -> u64 {
        self.reconciles
    }

    /// One full reconciliation of records and maps.
    pub fn reconcile(&mut self) -> Changes {
        let mut changes = Changes::default();
        let (records, malformed) = read_records(&self.config.state_dir);
        for m in &malformed {
            if !self.malformed.contains(m) {
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
        if let Some(api) = &self.api {
            services.add_api_objects(api.all());
        }
        for p in &services.problems {
            if !self.services.problems.contains(p) {
                warn!(path = %p.path, error = %p.error, "skipping unusable service file");
            }
        }
        if let Some(dp) = self.dp.as_mut() {
            let (upserted, removed) = sync_maps(dp, &desired(&live));
            changes.upserted = upserted;
            changes.removed = removed;
            // Callers first, then the table: a new entry never names a
            // caller the kernel cannot identify yet.
            crate::services::sync_netns(dp, &live);
            let want = crate::services::desired(&services.ports(), &live);
            let (set, removed) = crate::services::sync(dp, &want);
            changes.services_set = set;
            changes.services_removed = removed;
        }
        self.records = live;
        self.malformed = malformed;
        self.services = services;
        self.reconciles += 1;
        let c = &changes;
        if (c.upserted, c.removed, c.stale_records) != (0, 0, 0)
            || (c.services_set, c.services_removed) != (0, 0)
        {
            info!(
                upserted = changes.upserted,
                removed = changes.removed,
                stale = changes.stale_records,
                services_set = changes.services_set,
                services_removed = changes.services_removed,
                endpoints = self.records.len(),
                "reconciled"
            );
        }
        changes
    }

    /// The node view as served on /status.
    pub fn status(&self) -> Status {
        let mut s = Status::collect(
            "meshd",
            self.acceleration.clone(),
            &self.records,
            &self.malformed,
            self.dp.as_ref(),
        );
        s.reconciles = self.reconciles;
        s.selftest = Some(self.selftest.clone());
        s.add_services(&self.services, &self.records, self.dp.as_ref());
        s.kubernetes = self.api.as_ref().map(crate::kube_source::Objects::status);
        s.memory_bound = Some(self.membound.report(
            self.config.memory_bound_bytes,
            self.config.memory_bound_interval_ms,
        ));
        s
    }
}

/// Writes the self-test report where spright-cni's STATUS reads it
/// (atomically: temporary file, then rename). Best effort.
fn publish_selftest(state_dir: &Path, report: &crate::selftest::Report) {
    let path = state_dir.join(spright_endpoint::SELFTEST_FILE);
    let body = serde_json::to_vec_pretty(report).expect("reports serialise");
    let written = std::fs::create_dir_all(state_dir)
        .and_then(|()| spright_endpoint::write_atomic(&path, &body, 0o644));
    if let Err(e) = written {
        warn!(path = %path.display(), error = %e, "publishing the self-test report");
    }
}

/// What the endpoint map should hold: every IP of every record. When two
/// records claim one IP (a missed DEL followed by reuse), the later file name
/// wins, deterministically.
fn desired(records: &[Record]) -> BTreeMap<IpAddr, EndpointValue> {
    records
        .iter()
        .flat_map(|r| r.ips.iter().map(move |ip| (*ip, r.endpoint_value())))
        .collect()
}

/// Makes the endpoint map equal to `want`; returns (upserted, removed).
fn sync_maps(dp: &mut Datapath, want: &BTreeMap<IpAddr, EndpointValue>) -> (usize, usize) {
    sync_map(
        dp,
        "endpoint map",
        want,
        Datapath::endpoints,
        |dp, ip, v| dp.upsert_endpoint(ip, *v),
        Datapath::remove_endpoint,
    )
}

/// All entries of a map, as `Datapath`'s readers return them.
pub(crate) type MapEntries<K, V> = Result<Vec<(K, V)>, spright_ebpf::Error>;

/// Makes one kernel map equal to `want` (insert or update what differs,
/// remove what `want` lacks); returns (upserted, removed). Failures are
/// logged per entry, never fatal: the next reconciliation retries.
pub(crate) fn sync_map<K: Ord + Copy + std::fmt::Debug, V: PartialEq>(
    dp: &mut Datapath,
    what: &str,
    want: &BTreeMap<K, V>,
    read: fn(&Datapath) -> MapEntries<K, V>,
    upsert: fn(&mut Datapath, K, &V) -> Result<(), spright_ebpf::Error>,
    remove: fn(&mut Datapath, K) -> Result<(), spright_ebpf::Error>,
) -> (usize, usize) {
    let have: BTreeMap<K, V> = match read(dp) {
        Ok(v) => v.into_iter().collect(),
        Err(e) => {
            warn!(error = %error_chain(&e), map = what, "reading");
            return (0, 0);
        }
    };
    let mut upserted = 0;
    for (k, v) in want {
        if have.get(k) != Some(v) {
            match upsert(dp, *k, v) {
                Ok(()) => upserted += 1,
                Err(e) => warn!(key = ?k, error = %error_chain(&e), map = what, "updating"),
            }
        }
    }
    let mut removed = 0;
    for k in have.keys().filter(|k| !want.contains_key(k)) {
        match remove(dp, *k) {
            Ok(()) => removed += 1,
            Err(e) => warn!(key = ?k, error = %error_chain(&e), map = what, "removing"),
        }
    }
    (upserted, removed)
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
    fn desired_covers_every_ip_of_every_record() {
        let d = desired(&[
            rec("a", &["10.0.0.1", "fd00::1"], "/proc/self/ns/net"),
            rec("b", &["10.0.0.2"], "x"),
        ]);
        assert_eq!(d.len(), 3);
        assert!(d.values().all(|v| v.chain_id != 0));
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
        spright_endpoint::write(
            dir.path(),
            &rec("gone", &["10.0.0.2"], "/run/netns/spright-gone-x"),
        )
        .unwrap();
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
        let mut agent = Agent::start(config);
        let changes = agent.reconcile();
        assert_eq!(changes.stale_records, 1);
        assert_eq!(changes.malformed, 1);
        let status = agent.status();
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
