//! Services, EndpointSlices and this node's Pods from the Kubernetes API
//! server.
//!
//! List-and-watch streams (kube-rs' watcher, with its default backoff) keep
//! a copy of every Service and EndpointSlice of the cluster and of the Pods
//! bound to this node (field selector `spec.nodeName=<--node-name>`, as
//! kubelet itself watches them). Each copy replaces itself atomically on a
//! re-list (`Init` … `InitDone`) and follows single changes in between;
//! every change triggers a reconciliation. So a backend whose EndpointSlice
//! marks it not ready leaves the kernel's table as soon as the API says so,
//! and a Pod is known (and its volumes can be published) before kubelet
//! creates its sandbox.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use futures_util::{FutureExt as _, Stream, StreamExt as _, stream};
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::{Deserialize, Serialize};
use spright_endpoint::PodInfo;
use tracing::{debug, info, warn};

use crate::{config::Mode, services::ApiObject};

/// The API's latest objects as the source publishes them (`None` when the
/// API is not watched).
pub type Published = Option<Arc<Objects>>;

/// The live copy of one watched kind, by `namespace/name`. Objects are
/// shared (`Arc`), so publishing a copy after each burst costs a map of
/// pointers, not a deep copy of the cluster's objects.
#[derive(Clone, Debug)]
pub struct Collection<T> {
    live: BTreeMap<String, Arc<T>>,
    /// The list in progress (between `Init` and `InitDone`).
    listing: Option<BTreeMap<String, Arc<T>>>,
    /// Listed at least once.
    listed: bool,
}

impl<T> Default for Collection<T> {
    fn default() -> Self {
        Self {
            live: BTreeMap::new(),
            listing: None,
            listed: false,
        }
    }
}

impl<T> Collection<T> {
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.live.values().map(AsRef::as_ref)
    }

    /// Applies one watcher event; says whether the live copy changed.
    fn apply(&mut self, event: watcher::Event<(String, Option<T>)>) -> bool {
        match event {
            watcher::Event::Init => {
                self.listing = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply((key, o)) => {
                if let Some(o) = o {
                    self.listing
                        .get_or_insert_default()
                        .insert(key, Arc::new(o));
                }
                false
            }
            watcher::Event::InitDone => {
                self.live = self.listing.take().unwrap_or_default();
                self.listed = true;
                true
            }
            watcher::Event::Apply((key, o)) => {
                match o {
                    Some(o) => self.live.insert(key, Arc::new(o)),
                    None => self.live.remove(&key),
                };
                true
            }
            watcher::Event::Delete((key, _)) => {
                self.live.remove(&key);
                true
            }
        }
    }
}

/// What meshd knows from the API.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    services: Collection<ApiObject>,
    slices: Collection<ApiObject>,
    /// Pods of this node; `None` when not watched (no `--node-name`).
    pods: Option<Collection<PodInfo>>,
    /// Every Node; `None` when not watched (not primary mode).
    nodes: Option<Collection<crate::pod_network::NodeInfo>>,
    /// The last watch error, cleared by the next successful event.
    pub error: Option<String>,
}

impl Objects {
    /// Starts a copy; Pods are watched only when this node's name is known,
    /// Nodes only in primary mode.
    pub fn new(watch_pods: bool, watch_nodes: bool) -> Self {
        Self {
            pods: watch_pods.then(Collection::default),
            nodes: watch_nodes.then(Collection::default),
            ..Self::default()
        }
    }

    /// The cluster's Nodes, once listed (`None` before, or when not watched).
    pub fn nodes(&self) -> Option<impl Iterator<Item = &crate::pod_network::NodeInfo>> {
        self.nodes
            .as_ref()
            .filter(|n| n.listed)
            .map(Collection::values)
    }

    /// All Services and EndpointSlices, Services first.
    pub(crate) fn all(&self) -> impl Iterator<Item = &ApiObject> {
        self.services.values().chain(self.slices.values())
    }

    /// This node's Pods (empty when not watched).
    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.iter().flat_map(Collection::values)
    }

    /// Every watched kind has been listed at least once.
    pub fn synced(&self) -> bool {
        self.services.listed
            && self.slices.listed
            && self.pods.as_ref().is_none_or(|p| p.listed)
            && self.nodes.as_ref().is_none_or(|n| n.listed)
    }

    pub fn status(&self) -> SourceStatus {
        let state = match (&self.error, self.synced()) {
            (Some(_), _) => "error",
            (None, true) => "synced",
            (None, false) => "watching",
        };
        SourceStatus {
            state: state.into(),
            services: self.services.len(),
            endpoint_slices: self.slices.len(),
            pods: self.pods.as_ref().map(Collection::len),
            nodes: self.nodes.as_ref().map(Collection::len),
            error: self.error.clone(),
        }
    }
}

/// The API source as `/status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// "watching" (listing), "synced", or "error".
    pub state: String,
    pub services: usize,
    pub endpoint_slices: usize,
    /// Pods of this node (absent when Pods are not watched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<usize>,
    /// Nodes of the cluster (primary mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One watcher event of one kind, its object keyed by `namespace/name` and
/// parsed (`None` when unusable).
enum Change {
    Service(WatchEvent<ApiObject>),
    Slice(WatchEvent<ApiObject>),
    Pod(WatchEvent<PodInfo>),
    Node(WatchEvent<crate::pod_network::NodeInfo>),
}

type WatchEvent<T> = Result<watcher::Event<(String, Option<T>)>, watcher::Error>;

/// A watch of every object of kind `K` matching `config`, parsed by `parse`.
fn watch<K, T>(
    api: Api<K>,
    config: watcher::Config,
    parse: fn(serde_json::Value) -> Result<Option<T>, String>,
) -> impl Stream<Item = WatchEvent<T>>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + Serialize
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    watcher(api, config)
        .default_backoff()
        .map(move |e| e.map(|e| keyed(e, parse)))
}

/// Watches until the runtime shuts down: Services and EndpointSlices of all
/// namespaces, the Pods bound to `node` when it is known, and every Node
/// when `watch_nodes` (primary mode). Every burst of
/// changes publishes the whole copy (`publish`) and asks for a
/// reconciliation (`trigger`).
pub async fn run(
    client: Client,
    node: Option<String>,
    watch_nodes: bool,
    publish: tokio::sync::watch::Sender<Published>,
    trigger: tokio::sync::mpsc::Sender<()>,
) {
    let mut objects = Objects::new(node.is_some(), watch_nodes);
    publish.send_replace(Some(Arc::new(objects.clone())));
    let services = watch(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        ApiObject::parse,
    )
    .map(Change::Service);
    let slices = watch(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        ApiObject::parse,
    )
    .map(Change::Slice);
    let nodes = if watch_nodes {
        watch(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            parse_node,
        )
        .map(Change::Node)
        .left_stream()
    } else {
        stream::empty().right_stream()
    };
    let pods = match &node {
        Some(node) => watch(
            Api::<Pod>::all(client),
            watcher::Config::default().fields(&format!("spec.nodeName={node}")),
            parse_pod,
        )
        .map(Change::Pod)
        .left_stream(),
        None => stream::empty().right_stream(),
    };
    let mut events = std::pin::pin!(stream::select(
        stream::select(services, slices),
        stream::select(pods, nodes)
    ));
    if let Some(node) = &node {
        info!(node = %node, "watching Services and EndpointSlices of all namespaces, and the Pods of this node");
    } else {
        warn!(
            "watching Services and EndpointSlices; not Pods, because --node-name (NODE_NAME) is unset: membership then comes from the pods directory and the endpoint records"
        );
    }
    while let Some(first) = events.next().await {
        // Apply the whole burst that is ready, then reconcile once.
        let error_before = objects.error.clone();
        let mut changed = apply(&mut objects, first);
        while let Some(Some(more)) = events.next().now_or_never() {
            changed |= apply(&mut objects, more);
        }
        if changed || objects.error != error_before {
            publish.send_replace(Some(Arc::new(objects.clone())));
        }
        if changed {
            // A full channel means a reconciliation is already due.
            if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) = trigger.try_send(()) {
                return;
            }
        }
    }
}

/// Applies one event to the copy; says whether any object changed.
fn apply(objects: &mut Objects, change: Change) -> bool {
    let applied = match change {
        Change::Service(e) => e.map(|e| objects.services.apply(e)),
        Change::Slice(e) => e.map(|e| objects.slices.apply(e)),
        Change::Pod(e) => e.map(|e| objects.pods.get_or_insert_default().apply(e)),
        Change::Node(e) => e.map(|e| objects.nodes.get_or_insert_default().apply(e)),
    };
    match applied {
        Ok(changed) => {
            objects.error = None;
            if changed {
                debug!(
                    services = objects.services.len(),
                    slices = objects.slices.len(),
                    pods = objects.pods.as_ref().map(Collection::len),
                    "API objects changed"
                );
            }
            changed
        }
        Err(e) => {
            let e = crate::error::chain(&e);
            warn!(error = %e, "watching the Kubernetes API (retrying with backoff)");
            objects.error = Some(e);
            false
        }
    }
}

#[expect(
    clippy::needless_pass_by_value,
    reason = "the parser shape `watch` takes, shared with ApiObject::parse"
)]
fn parse_pod(v: serde_json::Value) -> Result<Option<PodInfo>, String> {
    PodInfo::parse(&v).map_err(|e| crate::error::chain(&e))
}

#[expect(
    clippy::needless_pass_by_value,
    reason = "the parser shape `watch` takes, shared with ApiObject::parse"
)]
fn parse_node(v: serde_json::Value) -> Result<Option<crate::pod_network::NodeInfo>, String> {
    crate::pod_network::NodeInfo::parse(&v).map(Some)
}

/// An event with its object as `namespace/name` and parsed into the fields
/// spright uses (once, here; `None` when it cannot be used).
fn keyed<K: kube::Resource + Serialize, T>(
    e: watcher::Event<K>,
    parse: fn(serde_json::Value) -> Result<Option<T>, String>,
) -> watcher::Event<(String, Option<T>)> {
    let kv = |o: K| {
        let key = format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any());
        let parsed = serde_json::to_value(&o)
            .map_err(|e| e.to_string())
            .and_then(parse)
            .inspect_err(|e| warn!(object = %key, error = %e, "skipping an unusable API object"))
            .ok()
            .flatten();
        (key, parsed)
    };
    match e {
        watcher::Event::Apply(o) => watcher::Event::Apply(kv(o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(kv(o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(o) => watcher::Event::InitApply(kv(o)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// The API client `mode` asks for: `Ok(None)` when off (or `auto` outside a
/// cluster), an error (naming the flag) when `on` and no client can be built.
/// `kubeconfig` (`--kubeconfig`) wins over the in-cluster configuration.
pub async fn client(
    mode: Mode,
    kubeconfig: Option<&Path>,
) -> Result<Option<Client>, crate::error::Error> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() || kubeconfig.is_some();
    let build = async || -> Result<Client, kube::Error> {
        match kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)?;
                let config = kube::Config::from_custom_kubeconfig(
                    kc,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await?;
                Client::try_from(config)
            }
            None => Client::try_default().await,
        }
    };
    match mode {
        Mode::Off => Ok(None),
        Mode::Auto if !in_cluster => {
            info!(
                "no Kubernetes API in sight (KUBERNETES_SERVICE_HOST and --kubeconfig unset); Services from files only"
            );
            Ok(None)
        }
        Mode::Auto => match build().await {
            Ok(c) => Ok(Some(c)),
            Err(e) => {
                warn!(error = %crate::error::chain(&e), "no Kubernetes API client; Services from files only");
                Ok(None)
            }
        },
        Mode::On => build()
            .await
            .map(Some)
            .map_err(crate::error::Error::KubeClient),
    }
}
