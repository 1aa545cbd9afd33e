//! Services and EndpointSlices from the Kubernetes API server.
//!
//! Two list-and-watch streams (kube-rs' watcher, all namespaces, with its
//! default backoff) keep a copy of every Service and EndpointSlice. The copy
//! replaces itself atomically on each re-list (`Init` … `InitDone`) and
//! follows single changes in between; every change triggers a
//! reconciliation, which merges these objects with the service files. So a
//! backend whose EndpointSlice marks it not ready or terminating leaves the
//! kernel's table as soon as the API says so, before its pod is gone.

use std::{collections::BTreeMap, path::Path};

use futures_util::{FutureExt as _, StreamExt as _, stream};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::{agent::Shared, services::ApiObject};

/// What meshd knows from the API.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    services: BTreeMap<String, ApiObject>,
    slices: BTreeMap<String, ApiObject>,
    /// Both kinds have been listed at least once.
    pub synced: bool,
    /// The last watch error, cleared by the next successful event.
    pub error: Option<String>,
}

impl Objects {
    /// All objects, Services first.
    pub(crate) fn all(&self) -> impl Iterator<Item = &ApiObject> {
        self.services.values().chain(self.slices.values())
    }

    pub fn status(&self) -> SourceStatus {
        let state = match (&self.error, self.synced) {
            (Some(_), _) => "error",
            (None, true) => "synced",
            (None, false) => "watching",
        };
        SourceStatus {
            state: state.into(),
            services: self.services.len(),
            endpoint_slices: self.slices.len(),
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

enum Kind {
    Service,
    Slice,
}

/// One watcher event of either kind, as JSON keyed by `namespace/name`.
type Change = (
    Kind,
    Result<watcher::Event<(String, Option<ApiObject>)>, watcher::Error>,
);

/// Watches Services and EndpointSlices until the runtime shuts down.
pub async fn run(agent: Shared, client: Client) {
    let services = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| (Kind::Service, e.map(keyed)));
    let slices = watcher(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|e| (Kind::Slice, e.map(keyed)));
    let mut events = std::pin::pin!(stream::select(services, slices));
    let mut listing: [Option<BTreeMap<String, ApiObject>>; 2] = [None, None];
    let mut listed = [false, false];
    info!("watching Services and EndpointSlices of all namespaces");
    while let Some(first) = events.next().await {
        // Apply the whole burst that is ready, then reconcile once.
        let mut changed = apply(&agent, first, &mut listing, &mut listed);
        while let Some(Some(more)) = events.next().now_or_never() {
            changed |= apply(&agent, more, &mut listing, &mut listed);
        }
        if changed {
            let a = agent.clone();
            if let Err(e) =
                tokio::task::spawn_blocking(move || a.lock().expect("agent lock").reconcile()).await
            {
                warn!(error = %e, "reconciliation panicked");
            }
        }
    }
}

/// Applies one event to the agent's copy; says whether the table may change.
fn apply(
    agent: &Shared,
    (kind, event): Change,
    listing: &mut [Option<BTreeMap<String, ApiObject>>; 2],
    listed: &mut [bool; 2],
) -> bool {
    let i = match kind {
        Kind::Service => 0,
        Kind::Slice => 1,
    };
    let mut a = agent.lock().expect("agent lock");
    let objects = a.api_objects_mut();
    let live = match kind {
        Kind::Service => &mut objects.services,
        Kind::Slice => &mut objects.slices,
    };
    let event = match event {
        Ok(e) => e,
        Err(e) => {
            let e = crate::status::error_chain(&e);
            warn!(error = %e, "watching the Kubernetes API (retrying with backoff)");
            objects.error = Some(e);
            return false;
        }
    };
    objects.error = None;
    match event {
        watcher::Event::Init => {
            listing[i] = Some(BTreeMap::new());
            false
        }
        watcher::Event::InitApply((key, o)) => {
            if let Some(o) = o {
                listing[i].get_or_insert_default().insert(key, o);
            }
            false
        }
        watcher::Event::InitDone => {
            *live = listing[i].take().unwrap_or_default();
            listed[i] = true;
            objects.synced = listed[0] && listed[1];
            debug!(
                services = objects.services.len(),
                slices = objects.slices.len(),
                "listed"
            );
            true
        }
        watcher::Event::Apply((key, o)) => {
            match o {
                Some(o) => live.insert(key, o),
                None => live.remove(&key),
            };
            true
        }
        watcher::Event::Delete((key, _)) => {
            live.remove(&key);
            true
        }
    }
}

/// An event with its object as `namespace/name` and parsed into the fields
/// the table uses (once, here; `None` when it cannot be used).
fn keyed<K: kube::Resource + Serialize>(
    e: watcher::Event<K>,
) -> watcher::Event<(String, Option<ApiObject>)> {
    let kv = |o: K| {
        let key = format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any());
        let parsed = serde_json::to_value(&o)
            .map_err(|e| e.to_string())
            .and_then(ApiObject::parse)
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

/// Whether to use the API, from `--kubernetes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Watch the API when running in a cluster (or KUBECONFIG is set).
    Auto,
    /// Always watch the API; fail to start without it.
    On,
    /// Service files only.
    Off,
}

/// The API client `mode` asks for: `Ok(None)` when off (or `auto` outside a
/// cluster), an error (naming the flag) when `on` and no client can be built.
/// `kubeconfig` (`--kubeconfig`) wins over the in-cluster configuration.
pub async fn client(mode: Mode, kubeconfig: Option<&Path>) -> anyhow::Result<Option<Client>> {
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
                warn!(error = %crate::status::error_chain(&e), "no Kubernetes API client; Services from files only");
                Ok(None)
            }
        },
        Mode::On => build().await.map(Some).map_err(|e| {
            anyhow::anyhow!(
                "--kubernetes on: cannot build a Kubernetes API client: {}",
                crate::status::error_chain(&e)
            )
        }),
    }
}
