//! Kubernetes Events on a Pod, for what its owner must act on: a chain
//! that cannot be accelerated on this node, and a pod that opted out.
//!
//! - `ChainHasNoLocalPeer` (Warning): the pod names a chain in
//!   `spright.dev/chain` and no other pod of that chain runs on this node,
//!   for `--lonely-pod-secs` in a row (the first pod of a chain is alone
//!   until the next one starts, so a short wait is not worth a warning). Its
//!   hops cannot be redirected: a misspelt chain name, or a chain the
//!   scheduler spread over nodes (`spright.dev/placement`).
//! - `RedirectOptedOut` (Normal): the pod is in a chain with
//!   `spright.dev/redirect: off`, so its connections stay on TCP.
//! - `PreloadShimNotLoaded` (Warning): the pod opted in to the preload shim
//!   (`spright.dev/preload: "true"`), but a process whose `LD_PRELOAD`
//!   names it did not load it (a static or musl program, the file missing:
//!   preload.rs), on a node whose self-test found blocking reads on the
//!   redirect path `affected` (`--preload-check always`: on any node).
//!   Checked every 5 s.
//! - `RedirectsOffOnNode` (Warning, on the Node): the self-test found a
//!   syscall family this kernel's redirect path loses data on, nothing
//!   mitigates it, and the admin did not accept it, so no chain connection
//!   on this node is redirected (families.rs). Once per meshd start.
//!
//! Each is published once while its condition holds (again if it clears
//! and comes back), through kube-rs' event recorder (`events.k8s.io/v1`,
//! reporting controller `spright-meshd`). Only Pods of this node are looked
//! at (meshd watches those), and only once the Pod list is synced.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use spright_endpoint::{ANNOTATION_CHAIN, ANNOTATION_PLACEMENT, ANNOTATION_REDIRECT, PodInfo};
use tracing::{info, warn};

use crate::{config::PreloadCheck, kube_source::Published, snapshot::Snapshot};

/// Reason of the event for a pod alone in its chain on this node.
pub const NO_LOCAL_PEER: &str = "ChainHasNoLocalPeer";
/// Reason of the event for a chain pod that opted out of the redirect.
pub const OPTED_OUT: &str = "RedirectOptedOut";
/// Reason of the event for a pod whose processes did not load the preload
/// shim it opted in to.
pub const PRELOAD_NOT_LOADED: &str = "PreloadShimNotLoaded";
/// Reason of the event on the Node whose redirects are off.
pub const REDIRECTS_OFF: &str = "RedirectsOffOnNode";
/// The events' reporting controller.
pub const CONTROLLER: &str = "spright-meshd";

/// One event a pod should carry now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub reason: &'static str,
    pub warning: bool,
    pub note: String,
}

impl Notice {
    /// Which pod and which condition: the uid when known (a recreated pod is
    /// another pod), else the name.
    fn id(&self) -> (String, &'static str) {
        let who = if self.uid.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            self.uid.clone()
        };
        (who, self.reason)
    }
}

/// The events the pods of `node` call for now (before any waiting).
pub fn notices<'a>(pods: impl Iterator<Item = &'a PodInfo>, node: &str) -> Vec<Notice> {
    let here: Vec<&PodInfo> = pods
        .filter(|p| !p.terminating && p.node_name.as_deref() == Some(node))
        .collect();
    let mut out = Vec::new();
    for p in &here {
        let Some(chain) = p.annotated.chain.as_deref() else {
            continue;
        };
        let notice = |reason, warning, note: String| Notice {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            uid: p.uid.clone(),
            reason,
            warning,
            note,
        };
        let peers = here
            .iter()
            .filter(|q| q.annotated.chain.as_deref() == Some(chain) && q.key() != p.key())
            .count();
        if peers == 0 {
            out.push(notice(
                NO_LOCAL_PEER,
                true,
                format!(
                    "no other pod of chain {chain:?} runs on node {node}: this pod's hops to the \
                     chain stay on TCP. Check the {ANNOTATION_CHAIN} annotation of the chain's pods, \
                     or keep the chain on one node with {ANNOTATION_PLACEMENT}: required"
                ),
            ));
        }
        if !p.annotated.redirect {
            out.push(notice(
                OPTED_OUT,
                false,
                format!(
                    "{ANNOTATION_REDIRECT}: off: this pod of chain {chain:?} keeps its connections \
                     on TCP (it still gets the chain's shared memory)"
                ),
            ));
        }
    }
    out
}

/// The preload events the pods of `node` call for now: each chain pod with
/// `spright.dev/preload: "true"` and a record in `snap` (its network
/// namespace) whose processes, found under `host_proc`, did not load the
/// shim. None when `check` says not to look on this node.
pub fn preload_notices<'a>(
    pods: impl Iterator<Item = &'a PodInfo>,
    node: &str,
    snap: &Snapshot,
    check: PreloadCheck,
    host_proc: &Path,
) -> Vec<Notice> {
    let verdict = snap
        .selftest
        .as_ref()
        .map_or("not run", |r| r.verdict.as_str());
    match check {
        PreloadCheck::Off => return Vec::new(),
        PreloadCheck::Auto if verdict != "affected" => return Vec::new(),
        PreloadCheck::Auto | PreloadCheck::Always => {}
    }
    // Each opted-in pod of this node with its recorded network namespace.
    let opted: Vec<(&PodInfo, &Path)> = pods
        .filter(|p| {
            !p.terminating
                && p.node_name.as_deref() == Some(node)
                && p.annotated.chain.is_some()
                && p.annotated.preload
        })
        .filter_map(|p| {
            let r = snap.records.iter().find(|r| {
                r.pod.namespace == p.namespace
                    && r.pod.name == p.name
                    && Path::new(&r.netns).is_absolute()
            })?;
            Some((p, Path::new(r.netns.as_str())))
        })
        .collect();
    if opted.is_empty() {
        return Vec::new();
    }
    let netns: Vec<&Path> = opted.iter().map(|(_, n)| *n).collect();
    let found = match crate::preload::unloaded(host_proc, &netns) {
        Ok(f) => f,
        Err(e) => {
            warn!(host_proc = %host_proc.display(), error = %e, "preload check: cannot read the host's processes");
            return Vec::new();
        }
    };
    opted
        .into_iter()
        .filter_map(|(p, n)| {
            let u = found.get(n).filter(|u| !u.is_empty())?;
            Some(Notice {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                uid: p.uid.clone(),
                reason: PRELOAD_NOT_LOADED,
                warning: true,
                note: crate::preload::note(u, verdict),
            })
        })
        .collect()
}

/// What is due: the notices whose condition has held long enough and that
/// were not published yet. Keeps the bookkeeping of when each began.
#[derive(Debug, Default)]
pub struct Schedule {
    since: HashMap<(String, &'static str), Instant>,
    published: HashSet<(String, &'static str)>,
}

impl Schedule {
    /// The notices of `current` to publish at `now`; a notice no longer in
    /// `current` is forgotten (published again if it comes back).
    pub fn due(
        &mut self,
        current: Vec<Notice>,
        now: Instant,
        lonely_after: Duration,
    ) -> Vec<Notice> {
        let ids: HashSet<_> = current.iter().map(Notice::id).collect();
        self.since.retain(|k, _| ids.contains(k));
        self.published.retain(|k| ids.contains(k));
        current
            .into_iter()
            .filter(|n| {
                let id = n.id();
                if self.published.contains(&id) {
                    return false;
                }
                let since = *self.since.entry(id).or_insert(now);
                let wait = if n.reason == NO_LOCAL_PEER {
                    lonely_after
                } else {
                    Duration::ZERO
                };
                now.duration_since(since) >= wait
            })
            .collect()
    }

    /// Marks a notice as published.
    pub fn published(&mut self, n: &Notice) {
        self.published.insert(n.id());
    }
}

/// Publishes the events of the Pods of `node` as the API source sees them,
/// until the source goes away.
pub async fn run(
    client: Client,
    node: String,
    mut api: tokio::sync::watch::Receiver<Published>,
    snapshot: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    lonely_after: Duration,
    preload: (PreloadCheck, PathBuf),
) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: CONTROLLER.to_owned(),
            instance: Some(format!("{CONTROLLER}-{node}")),
        },
    );
    let mut schedule = Schedule::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The preload check reads /proc: every 5 ticks, kept in between.
    let mut preloads: Vec<Notice> = Vec::new();
    let mut ticks = 0u64;
    let mut node_told = false;
    loop {
        tokio::select! {
            changed = api.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
        let Some(objects) = api.borrow_and_update().clone() else {
            continue;
        };
        if !objects.synced() {
            continue;
        }
        if !node_told {
            let why = snapshot.borrow().acceleration.redirects.reason.clone();
            node_told = match why {
                None => true,
                Some(why) => publish_node_event(&recorder, &node, why).await,
            };
        }
        if ticks.is_multiple_of(5) && preload.0 != PreloadCheck::Off {
            let snap = snapshot.borrow().clone();
            let (objects, node, preload) = (objects.clone(), node.clone(), preload.clone());
            let found = tokio::task::spawn_blocking(move || {
                preload_notices(objects.pods(), &node, &snap, preload.0, &preload.1)
            })
            .await;
            preloads = found.unwrap_or_default();
        }
        ticks += 1;
        let mut current = notices(objects.pods(), &node);
        current.extend(preloads.iter().cloned());
        let due = schedule.due(current, Instant::now(), lonely_after);
        for n in due {
            let event = Event {
                type_: if n.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: n.reason.to_owned(),
                note: Some(n.note.clone()),
                action: "Accelerate".to_owned(),
                secondary: None,
            };
            let pod = ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                namespace: Some(n.namespace.clone()),
                name: Some(n.name.clone()),
                uid: (!n.uid.is_empty()).then(|| n.uid.clone()),
                ..ObjectReference::default()
            };
            let who = format!("{}/{}", n.namespace, n.name);
            if let Err(e) = recorder.publish(&event, &pod).await {
                // Tried again on the next tick.
                warn!(pod = %who, reason = n.reason, error = %e, "could not publish an event");
                continue;
            }
            info!(pod = %who, reason = n.reason, "published an event");
            schedule.published(&n);
        }
    }
}

/// The Node's `RedirectsOffOnNode` warning; whether it went out.
async fn publish_node_event(recorder: &Recorder, node: &str, why: String) -> bool {
    let event = Event {
        type_: EventType::Warning,
        reason: REDIRECTS_OFF.to_owned(),
        note: Some(why),
        action: "Accelerate".to_owned(),
        secondary: None,
    };
    let reference = ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("Node".to_owned()),
        name: Some(node.to_owned()),
        ..ObjectReference::default()
    };
    match recorder.publish(&event, &reference).await {
        Ok(()) => {
            info!(node, reason = REDIRECTS_OFF, "published an event");
            true
        }
        Err(e) => {
            warn!(node, reason = REDIRECTS_OFF, error = %e, "could not publish an event");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use spright_endpoint::pod::Annotated;

    use super::*;

    fn pod(name: &str, node: &str, chain: Option<&str>, redirect: bool) -> PodInfo {
        PodInfo {
            namespace: "shop".into(),
            name: name.into(),
            uid: format!("u-{name}"),
            node_name: Some(node.into()),
            annotated: Annotated {
                chain: chain.map(str::to_owned),
                function: None,
                redirect,
                preload: false,
            },
            terminating: false,
        }
    }

    fn reasons(n: &[Notice]) -> Vec<(String, &'static str)> {
        n.iter().map(|n| (n.name.clone(), n.reason)).collect()
    }

    #[test]
    fn lonely_and_opted_out_pods_of_this_node_only() {
        let mut gone = pod("gone", "n1", Some("pair"), true);
        gone.terminating = true;
        let pods = [
            pod("solo", "n1", Some("solo"), true),
            pod("a", "n1", Some("pair"), true),
            pod("b", "n1", Some("pair"), false),
            pod("plain", "n1", None, false),
            pod("far", "n2", Some("far"), true),
            // Its peer is on another node: alone here.
            pod("split", "n1", Some("far"), true),
            gone,
        ];
        let n = notices(pods.iter(), "n1");
        assert_eq!(
            reasons(&n),
            vec![
                ("solo".into(), NO_LOCAL_PEER),
                ("b".into(), OPTED_OUT),
                ("split".into(), NO_LOCAL_PEER),
            ]
        );
        assert!(n[0].warning && !n[1].warning);
        assert!(
            n[0].note.contains("\"solo\"") && n[0].note.contains("node n1"),
            "{}",
            n[0].note
        );
    }

    #[test]
    fn the_preload_check_runs_where_the_self_test_asks_for_it() {
        let mut p = pod("p", "n1", Some("c"), true);
        p.annotated.preload = true;
        let verdict = |v: &str| Snapshot {
            selftest: Some(crate::selftest::Report {
                verdict: v.into(),
                ..crate::selftest::Report::default()
            }),
            ..Snapshot::default()
        };
        let proc_root = Path::new("/nonexistent-proc");
        // Not affected: auto does not look (an unreadable /proc would show).
        for check in [PreloadCheck::Auto, PreloadCheck::Off] {
            let n = preload_notices(
                [&p].into_iter(),
                "n1",
                &verdict("not-affected"),
                check,
                proc_root,
            );
            assert!(n.is_empty());
        }
        // Affected, but the pod has no record on this node yet: nothing.
        let n = preload_notices(
            [&p].into_iter(),
            "n1",
            &verdict("affected"),
            PreloadCheck::Auto,
            proc_root,
        );
        assert!(n.is_empty());
    }

    #[test]
    fn a_lonely_pod_waits_and_each_event_goes_out_once() {
        let t0 = Instant::now();
        let wait = Duration::from_secs(30);
        let mut s = Schedule::default();
        let solo = [pod("solo", "n1", Some("solo"), false)];
        let now = |secs| t0 + Duration::from_secs(secs);
        // Opted out at once; alone only after the wait.
        let due = s.due(notices(solo.iter(), "n1"), now(0), wait);
        assert_eq!(reasons(&due), vec![("solo".into(), OPTED_OUT)]);
        s.published(&due[0]);
        assert!(s.due(notices(solo.iter(), "n1"), now(29), wait).is_empty());
        let due = s.due(notices(solo.iter(), "n1"), now(30), wait);
        assert_eq!(reasons(&due), vec![("solo".into(), NO_LOCAL_PEER)]);
        // Not published (API down): due again on the next pass.
        assert_eq!(s.due(notices(solo.iter(), "n1"), now(31), wait).len(), 1);
        s.published(&due[0]);
        assert!(s.due(notices(solo.iter(), "n1"), now(40), wait).is_empty());
        // A peer comes: nothing due; it leaves: the wait starts again.
        let two = [solo[0].clone(), pod("peer", "n1", Some("solo"), true)];
        assert!(
            s.due(notices(two.iter(), "n1"), now(41), wait)
                .iter()
                .all(|n| n.reason == OPTED_OUT)
        );
        assert!(s.due(notices(solo.iter(), "n1"), now(42), wait).is_empty());
        assert_eq!(s.due(notices(solo.iter(), "n1"), now(72), wait).len(), 1);
    }
}
