//! The pure core: what a Pod's spright annotations ask for, and the JSON
//! Patch (RFC 6902) that gives it to the Pod. No I/O: the server, the tests
//! and the benchmark call the same functions.
//!
//! For a Pod annotated `spright.dev/chain: <chain>`:
//! - the label `spright.dev/chain=<chain>`;
//! - with `spright.dev/shm: <size>|true`, an inline CSI volume of driver
//!   `shm.spright.dev` with shm-csi's `chain` (and `size`) attributes, named
//!   [`VOLUME_NAME`], mounted at `/dev/shm/spright` (or
//!   `spright.dev/shm-path`) in every container and in the init containers
//!   `spright.dev/shm-containers` names;
//! - with `spright.dev/preload: "true"`, the node's copy of the preload
//!   shim: a read-only hostPath volume [`PRELOAD_VOLUME`] of meshd's
//!   `/var/lib/spright/preload` mounted at `/opt/spright/preload` in every
//!   container, whose `LD_PRELOAD` gets the shim (added, or appended to the
//!   container's own value);
//! - a pod affinity to the chain's pods in the namespace on one node
//!   (`kubernetes.io/hostname`): preferred (weight 100) by default,
//!   required with `spright.dev/placement: required`, none with `none`.
//!
//! Every addition is skipped when the Pod already has it, so a patched Pod
//! reviewed again gets no patch (the API server re-invokes webhooks with
//! `reinvocationPolicy: IfNeeded`). Existing labels, volumes, mounts and
//! affinity terms are kept; absent lists and maps are added whole.

use std::collections::BTreeMap;

use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation, jsonptr::PointerBuf};
use k8s_openapi::{
    api::core::v1::{
        Affinity, CSIVolumeSource, Container, EnvVar, HostPathVolumeSource, Pod, PodAffinity,
        PodAffinityTerm, PodSpec, Volume, VolumeMount, WeightedPodAffinityTerm,
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use serde::Deserialize;
use serde_json::{Value, json};
use spright_endpoint::{
    ANNOTATION_CHAIN, ANNOTATION_PLACEMENT, ANNOTATION_PRELOAD, ANNOTATION_SHM,
    ANNOTATION_SHM_CONTAINERS, ANNOTATION_SHM_PATH, Annotated, DEFAULT_SHM_PATH, LABEL_CHAIN,
    PRELOAD_MOUNT, PRELOAD_SHIM,
};

use crate::review::{AdmissionRequest, AdmissionResponse, AdmissionReview, GroupVersionKind};

/// Name of the volume the webhook adds.
pub const VOLUME_NAME: &str = "spright-shm";
/// Name of the preload shim's volume.
pub const PRELOAD_VOLUME: &str = "spright-preload";
/// Where meshd publishes the shim on each node (its default state
/// directory's `preload/`).
pub const PRELOAD_HOST_DIR: &str = "/var/lib/spright/preload";
/// The CSI driver of the chain's shared memory (shm-csi's own name).
pub const CSI_DRIVER: &str = shm_csi::service::DRIVER_NAME;
/// Node-level co-location.
pub const TOPOLOGY_KEY: &str = "kubernetes.io/hostname";
/// Weight of the preferred affinity term (the largest the API allows).
pub const PREFERRED_WEIGHT: i32 = 100;

const PREFERRED_FIELD: &str = "preferredDuringSchedulingIgnoredDuringExecution";
const REQUIRED_FIELD: &str = "requiredDuringSchedulingIgnoredDuringExecution";

/// How the chain's pods are kept on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Preferred,
    Required,
    None,
}

/// The shared-memory volume a Pod asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shm {
    /// shm-csi's `size` attribute as written; `None`: the node's default.
    pub size: Option<String>,
    pub path: String,
    /// Init containers that get the mount too.
    pub init_containers: Vec<String>,
}

/// What a Pod's annotations ask of the webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub chain: String,
    pub shm: Option<Shm>,
    pub placement: Placement,
    /// `spright.dev/preload: "true"`.
    pub preload: bool,
}

/// Why a Pod is refused. The message names the annotation (or the part of
/// the Pod) at fault; [`Refusal::reason`] is the metrics label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("annotation {annotation}: {value:?} {why}")]
    Annotation {
        annotation: &'static str,
        value: String,
        why: String,
    },
    #[error("annotation {annotation}: {why}")]
    Conflict {
        annotation: &'static str,
        why: String,
    },
    #[error("the object is not a usable Pod: {0}")]
    Object(String),
}

impl Refusal {
    /// A short label for metrics: the annotation's name, or `object`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Annotation { annotation, .. } | Self::Conflict { annotation, .. } => annotation,
            Self::Object(_) => "object",
        }
    }

    fn bad(annotation: &'static str, value: &str, why: impl Into<String>) -> Self {
        Self::Annotation {
            annotation,
            value: value.to_owned(),
            why: why.into(),
        }
    }
}

/// Reads the annotations. `Ok(None)`: no `spright.dev/chain`, nothing to do.
pub fn wanted(annotations: &BTreeMap<String, String>) -> Result<Option<Wanted>, Refusal> {
    let get = |k: &str| annotations.get(k).map(String::as_str);
    let annotated = Annotated::from_annotations(get).map_err(|e| {
        let value = get(ANNOTATION_CHAIN).unwrap_or_default();
        Refusal::bad(ANNOTATION_CHAIN, value, format!("is not a chain name: {e}"))
    })?;
    let Some(chain) = annotated.chain else {
        return Ok(None);
    };
    let placement = match get(ANNOTATION_PLACEMENT) {
        None | Some("preferred") => Placement::Preferred,
        Some("required") => Placement::Required,
        Some("none") => Placement::None,
        Some(v) => {
            return Err(Refusal::bad(
                ANNOTATION_PLACEMENT,
                v,
                "is not a placement (preferred, required or none)",
            ));
        }
    };
    let preload = match get(ANNOTATION_PRELOAD) {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(v) => {
            return Err(Refusal::bad(
                ANNOTATION_PRELOAD,
                v,
                "is not \"true\" or \"false\"",
            ));
        }
    };
    let size = match get(ANNOTATION_SHM) {
        None | Some("false") => None,
        Some("true") => Some(None),
        Some(v) => match shm_csi::size::parse(v) {
            Ok(_) => Some(Some(v.to_owned())),
            Err(e) => {
                return Err(Refusal::bad(
                    ANNOTATION_SHM,
                    v,
                    format!("is not \"true\" or a size: {e}"),
                ));
            }
        },
    };
    let path = get(ANNOTATION_SHM_PATH).unwrap_or(DEFAULT_SHM_PATH);
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(Refusal::bad(
            ANNOTATION_SHM_PATH,
            path,
            "must be an absolute path without '..'",
        ));
    }
    let init_containers: Vec<String> = get(ANNOTATION_SHM_CONTAINERS)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(Some(Wanted {
        chain,
        shm: size.map(|size| Shm {
            size,
            path: path.to_owned(),
            init_containers,
        }),
        placement,
        preload,
    }))
}

/// The patch for one Pod object: `Ok(None)` when the Pod is not in a chain
/// (it is not touched), an empty patch when it already has everything.
pub fn mutate_pod(object: &Value) -> Result<Option<Patch>, Refusal> {
    // Only the annotations first: a Pod outside any chain is never parsed
    // further, whatever else it holds.
    #[derive(Deserialize)]
    struct Meta {
        #[serde(default)]
        metadata: MetaAnnotations,
    }
    #[derive(Deserialize, Default)]
    struct MetaAnnotations {
        #[serde(default)]
        annotations: Option<BTreeMap<String, String>>,
    }
    let meta = Meta::deserialize(object)
        .map_err(|e| Refusal::Object(format!("metadata.annotations: {e}")))?;
    let Some(want) = wanted(&meta.metadata.annotations.unwrap_or_default())? else {
        return Ok(None);
    };
    let pod = Pod::deserialize(object).map_err(|e| Refusal::Object(e.to_string()))?;
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| Refusal::Object("it has no spec".to_owned()))?;
    let mut ops = Vec::new();
    label(&pod, &want.chain, &mut ops);
    if let Some(shm) = &want.shm {
        volume(spec, &want.chain, shm, &mut ops)?;
    }
    check_foreign_volumes(spec, &want.chain)?;
    if want.preload {
        preload(spec, &mut ops)?;
    }
    affinity(spec, &want, &mut ops);
    Ok(Some(Patch(ops)))
}

/// The Pod with its patch applied (what the API server stores), for tests
/// and tools; the Pod itself when it is not in a chain.
pub fn patched(object: &Value) -> Result<Value, Refusal> {
    let mut pod = object.clone();
    if let Some(patch) = mutate_pod(object)? {
        json_patch::patch(&mut pod, &patch).map_err(|e| Refusal::Object(e.to_string()))?;
    }
    Ok(pod)
}

/// What a review came to (for logs and metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not a Pod CREATE, or a Pod without `spright.dev/chain`: allowed as is.
    Ignored,
    /// A chain Pod that already has everything: allowed, no patch.
    Unchanged,
    /// Allowed with a patch of this many operations.
    Patched(usize),
    /// Refused: the reason's metrics label.
    Refused(&'static str),
}

/// A review the API server could not have sent: answered with HTTP 400,
/// since no response can carry its uid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadReview {
    #[error("not an {want} review: apiVersion {api_version:?}, kind {kind:?}", want = crate::review::API_VERSION)]
    Version { api_version: String, kind: String },
    #[error("the review has no request")]
    NoRequest,
    #[error("the review's request has no uid")]
    NoUid,
}

/// Answers one review: the response carries the request's uid.
pub fn review(input: &AdmissionReview) -> Result<(AdmissionReview, Outcome), BadReview> {
    if input.api_version != crate::review::API_VERSION || input.kind != crate::review::KIND {
        return Err(BadReview::Version {
            api_version: input.api_version.clone(),
            kind: input.kind.clone(),
        });
    }
    let req = input.request.as_ref().ok_or(BadReview::NoRequest)?;
    if req.uid.is_empty() {
        return Err(BadReview::NoUid);
    }
    let (response, outcome) = respond(req);
    Ok((AdmissionReview::of_response(response), outcome))
}

fn respond(req: &AdmissionRequest) -> (AdmissionResponse, Outcome) {
    let pod = GroupVersionKind::pod();
    if req.kind.group != pod.group
        || req.kind.kind != pod.kind
        || req.sub_resource.is_some()
        || req.operation != "CREATE"
    {
        return (AdmissionResponse::allow(&req.uid), Outcome::Ignored);
    }
    let result = match &req.object {
        Some(object) => mutate_pod(object),
        None => Err(Refusal::Object(
            "a CREATE review without request.object".to_owned(),
        )),
    };
    match result {
        Ok(None) => (AdmissionResponse::allow(&req.uid), Outcome::Ignored),
        Ok(Some(patch)) if patch.0.is_empty() => {
            (AdmissionResponse::allow(&req.uid), Outcome::Unchanged)
        }
        Ok(Some(patch)) => (
            AdmissionResponse::patched(&req.uid, &patch),
            Outcome::Patched(patch.0.len()),
        ),
        Err(refusal) => (
            AdmissionResponse::deny(&req.uid, 400, refusal.to_string()),
            Outcome::Refused(refusal.reason()),
        ),
    }
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

fn add(ops: &mut Vec<PatchOperation>, path: &[&str], value: Value) {
    ops.push(PatchOperation::Add(AddOperation {
        path: pointer(path),
        value,
    }));
}

/// Appends `value` to the list at `path`, or adds the list with it when the
/// object has none yet (`present` false).
fn append(ops: &mut Vec<PatchOperation>, path: &[&str], present: bool, value: Value) {
    if present {
        let mut end = path.to_vec();
        end.push("-");
        add(ops, &end, value);
    } else {
        add(ops, path, json!([value]));
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("Kubernetes types serialize")
}

/// `spright.dev/chain=<chain>`: added, or replaced when it names another
/// chain (the annotation decides).
fn label(pod: &Pod, chain: &str, ops: &mut Vec<PatchOperation>) {
    match &pod.metadata.labels {
        None => add(ops, &["metadata", "labels"], json!({ LABEL_CHAIN: chain })),
        Some(labels) => match labels.get(LABEL_CHAIN) {
            None => add(ops, &["metadata", "labels", LABEL_CHAIN], json!(chain)),
            Some(v) if v == chain => {}
            Some(_) => ops.push(PatchOperation::Replace(ReplaceOperation {
                path: pointer(&["metadata", "labels", LABEL_CHAIN]),
                value: json!(chain),
            })),
        },
    }
}

fn is_shm(v: &Volume) -> bool {
    v.csi.as_ref().is_some_and(|c| c.driver == CSI_DRIVER)
}

/// A shared-memory volume the Pod brought itself must ask for its own
/// chain: shm-csi would refuse the mount anyway.
fn check_foreign_volumes(spec: &PodSpec, chain: &str) -> Result<(), Refusal> {
    for v in spec.volumes.iter().flatten().filter(|v| is_shm(v)) {
        let attrs = v.csi.as_ref().and_then(|c| c.volume_attributes.as_ref());
        let theirs = attrs.and_then(|a| a.get(shm_csi::request::ATTR_CHAIN));
        if theirs.map(String::as_str) != Some(chain) {
            return Err(Refusal::Conflict {
                annotation: ANNOTATION_CHAIN,
                why: format!(
                    "is {chain:?} but volume {:?} of driver {CSI_DRIVER} asks for chain {:?}",
                    v.name,
                    theirs.map_or("", String::as_str)
                ),
            });
        }
    }
    Ok(())
}

/// The chain's volume and its mounts.
fn volume(
    spec: &PodSpec,
    chain: &str,
    shm: &Shm,
    ops: &mut Vec<PatchOperation>,
) -> Result<(), Refusal> {
    let init = spec.init_containers.as_deref().unwrap_or_default();
    for name in &shm.init_containers {
        if !init.iter().any(|c| &c.name == name) {
            return Err(Refusal::Conflict {
                annotation: ANNOTATION_SHM_CONTAINERS,
                why: format!("names {name:?}, which is not an init container of the Pod"),
            });
        }
    }
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    if let Some(v) = volumes.iter().find(|v| v.name == VOLUME_NAME) {
        if !is_shm(v) {
            return Err(Refusal::Conflict {
                annotation: ANNOTATION_SHM,
                why: format!("the Pod already has a volume named {VOLUME_NAME:?} of another kind"),
            });
        }
    } else if volumes.iter().any(is_shm) {
        // The Pod brings its own shared-memory volume and mounts it where
        // it wants: kept as written.
        return Ok(());
    } else {
        let mut attributes =
            BTreeMap::from([(shm_csi::request::ATTR_CHAIN.to_owned(), chain.to_owned())]);
        if let Some(size) = &shm.size {
            attributes.insert(shm_csi::request::ATTR_SIZE.to_owned(), size.clone());
        }
        let v = Volume {
            name: VOLUME_NAME.to_owned(),
            csi: Some(CSIVolumeSource {
                driver: CSI_DRIVER.to_owned(),
                volume_attributes: Some(attributes),
                ..CSIVolumeSource::default()
            }),
            ..Volume::default()
        };
        append(
            ops,
            &["spec", "volumes"],
            spec.volumes.is_some(),
            to_value(&v),
        );
    }
    let mount = VolumeMount {
        name: VOLUME_NAME.to_owned(),
        mount_path: shm.path.clone(),
        ..VolumeMount::default()
    };
    let lists: [(&str, &[Container], bool); 2] = [
        ("initContainers", init, false),
        ("containers", &spec.containers, true),
    ];
    for (field, containers, all) in lists {
        for (i, c) in containers.iter().enumerate() {
            if !all && !shm.init_containers.contains(&c.name) {
                continue;
            }
            let mounts = c.volume_mounts.as_deref().unwrap_or_default();
            if mounts.iter().any(|m| m.name == VOLUME_NAME) {
                continue;
            }
            if let Some(m) = mounts.iter().find(|m| m.mount_path == shm.path) {
                return Err(Refusal::Conflict {
                    annotation: ANNOTATION_SHM_PATH,
                    why: format!(
                        "container {:?} already mounts volume {:?} at {}",
                        c.name, m.name, shm.path
                    ),
                });
            }
            let index = i.to_string();
            append(
                ops,
                &["spec", field, &index, "volumeMounts"],
                c.volume_mounts.is_some(),
                to_value(&mount),
            );
        }
    }
    Ok(())
}

/// The preload shim's volume, its mount and `LD_PRELOAD` in every (regular)
/// container.
fn preload(spec: &PodSpec, ops: &mut Vec<PatchOperation>) -> Result<(), Refusal> {
    let conflict = |why: String| Refusal::Conflict {
        annotation: ANNOTATION_PRELOAD,
        why,
    };
    let volumes = spec.volumes.as_deref().unwrap_or_default();
    match volumes.iter().find(|v| v.name == PRELOAD_VOLUME) {
        Some(v)
            if v.host_path
                .as_ref()
                .is_some_and(|h| h.path == PRELOAD_HOST_DIR) => {}
        Some(_) => {
            return Err(conflict(format!(
                "the Pod already has a volume named {PRELOAD_VOLUME:?} that is not the hostPath {PRELOAD_HOST_DIR}"
            )));
        }
        None => {
            let v = Volume {
                name: PRELOAD_VOLUME.to_owned(),
                host_path: Some(HostPathVolumeSource {
                    path: PRELOAD_HOST_DIR.to_owned(),
                    type_: Some("Directory".to_owned()),
                }),
                ..Volume::default()
            };
            append(
                ops,
                &["spec", "volumes"],
                spec.volumes.is_some(),
                to_value(&v),
            );
        }
    }
    let mount = VolumeMount {
        name: PRELOAD_VOLUME.to_owned(),
        mount_path: PRELOAD_MOUNT.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    let shim = format!("{PRELOAD_MOUNT}/{PRELOAD_SHIM}");
    for (i, c) in spec.containers.iter().enumerate() {
        let index = i.to_string();
        let mounts = c.volume_mounts.as_deref().unwrap_or_default();
        if !mounts.iter().any(|m| m.name == PRELOAD_VOLUME) {
            if let Some(m) = mounts.iter().find(|m| m.mount_path == PRELOAD_MOUNT) {
                return Err(conflict(format!(
                    "container {:?} already mounts volume {:?} at {PRELOAD_MOUNT}",
                    c.name, m.name
                )));
            }
            append(
                ops,
                &["spec", "containers", &index, "volumeMounts"],
                c.volume_mounts.is_some(),
                to_value(&mount),
            );
        }
        let env = c.env.as_deref().unwrap_or_default();
        match env.iter().position(|e| e.name == "LD_PRELOAD") {
            None => {
                let var = EnvVar {
                    name: "LD_PRELOAD".to_owned(),
                    value: Some(shim.clone()),
                    value_from: None,
                };
                append(
                    ops,
                    &["spec", "containers", &index, "env"],
                    c.env.is_some(),
                    to_value(&var),
                );
            }
            Some(k) if env[k].value_from.is_some() => {
                return Err(conflict(format!(
                    "container {:?} takes LD_PRELOAD from valueFrom, which spright cannot add the shim to",
                    c.name
                )));
            }
            Some(k) => {
                let own = env[k].value.as_deref().unwrap_or_default();
                if own.split([' ', ':']).any(|p| p == shim) {
                    continue;
                }
                // The container's own libraries first; the loader reads
                // spaces and colons alike.
                let value = if own.trim().is_empty() {
                    shim.clone()
                } else {
                    format!("{own}:{shim}")
                };
                // `add` on an object member sets it, present or not.
                add(
                    ops,
                    &["spec", "containers", &index, "env", &k.to_string(), "value"],
                    json!(value),
                );
            }
        }
    }
    Ok(())
}

/// The term that selects the chain's pods in the Pod's namespace on the
/// same node.
pub fn chain_term(chain: &str) -> PodAffinityTerm {
    PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(LABEL_CHAIN.to_owned(), chain.to_owned())])),
            match_expressions: None,
        }),
        topology_key: TOPOLOGY_KEY.to_owned(),
        ..PodAffinityTerm::default()
    }
}

fn same_term(t: &PodAffinityTerm, want: &PodAffinityTerm) -> bool {
    t.topology_key == want.topology_key
        && t.label_selector == want.label_selector
        && t.namespaces.as_ref().is_none_or(Vec::is_empty)
        && t.namespace_selector.is_none()
}

fn affinity(spec: &PodSpec, want: &Wanted, ops: &mut Vec<PatchOperation>) {
    let (field, value) = match want.placement {
        Placement::None => return,
        Placement::Preferred => (
            PREFERRED_FIELD,
            to_value(&WeightedPodAffinityTerm {
                pod_affinity_term: chain_term(&want.chain),
                weight: PREFERRED_WEIGHT,
            }),
        ),
        Placement::Required => (REQUIRED_FIELD, to_value(&chain_term(&want.chain))),
    };
    let term = chain_term(&want.chain);
    let pa = spec.affinity.as_ref().and_then(|a| a.pod_affinity.as_ref());
    let required = pa
        .and_then(|p| {
            p.required_during_scheduling_ignored_during_execution
                .as_deref()
        })
        .unwrap_or_default();
    let preferred = pa
        .and_then(|p| {
            p.preferred_during_scheduling_ignored_during_execution
                .as_deref()
        })
        .unwrap_or_default();
    // A required term also satisfies a preferred placement.
    let present = required.iter().any(|t| same_term(t, &term))
        || (want.placement == Placement::Preferred
            && preferred
                .iter()
                .any(|t| same_term(&t.pod_affinity_term, &term)));
    if present {
        return;
    }
    let list_present = match want.placement {
        Placement::Required => pa.is_some_and(|p| {
            p.required_during_scheduling_ignored_during_execution
                .is_some()
        }),
        _ => pa.is_some_and(|p| {
            p.preferred_during_scheduling_ignored_during_execution
                .is_some()
        }),
    };
    match (&spec.affinity, pa) {
        (None, _) => add(
            ops,
            &["spec", "affinity"],
            to_value(&Affinity {
                pod_affinity: Some(pod_affinity(field, &value)),
                ..Affinity::default()
            }),
        ),
        (Some(_), None) => add(
            ops,
            &["spec", "affinity", "podAffinity"],
            to_value(&pod_affinity(field, &value)),
        ),
        (Some(_), Some(_)) if !list_present => add(
            ops,
            &["spec", "affinity", "podAffinity", field],
            json!([value]),
        ),
        (Some(_), Some(_)) => add(ops, &["spec", "affinity", "podAffinity", field, "-"], value),
    }
}

fn pod_affinity(field: &str, value: &Value) -> PodAffinity {
    serde_json::from_value(json!({ field: [value] })).expect("a PodAffinity")
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::review::{AdmissionRequest, AdmissionReview};

    fn pod(annotations: &Value, spec: &Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "fn-a", "namespace": "shop", "annotations": annotations },
            "spec": spec,
        })
    }

    fn one_container() -> Value {
        json!({ "containers": [{ "name": "main", "image": "busybox:1.36" }] })
    }

    /// Patches `p`, checks that the result needs no further patch, returns it.
    fn settled(p: &Value) -> Value {
        let out = patched(p).unwrap();
        let again = mutate_pod(&out).unwrap().unwrap();
        assert!(again.0.is_empty(), "not idempotent: {again:?}\n{out:#}");
        out
    }

    fn paths(patch: &Patch) -> Vec<String> {
        patch.0.iter().map(|o| o.path().to_string()).collect()
    }

    #[test]
    fn pods_outside_chains_are_not_touched() {
        for ann in [json!(null), json!({}), json!({ "spright.dev/chain": "" })] {
            assert_eq!(mutate_pod(&pod(&ann, &one_container())).unwrap(), None);
        }
        // Not even parsed further: a spec spright does not understand stays
        // somebody else's business.
        let odd = pod(&json!({ "other": "x" }), &json!({ "containers": "weird" }));
        assert_eq!(mutate_pod(&odd).unwrap(), None);
    }

    #[test]
    fn preload_mounts_the_nodes_shim_and_sets_ld_preload_in_every_container() {
        let ann = json!({ "spright.dev/chain": "demo", "spright.dev/preload": "true" });
        let spec = json!({
            "initContainers": [{ "name": "setup", "image": "busybox:1.36" }],
            "containers": [
                { "name": "plain", "image": "app:1" },
                { "name": "own", "image": "app:1",
                  "env": [{ "name": "A", "value": "1" }, { "name": "LD_PRELOAD", "value": "/lib/libjemalloc.so" }],
                  "volumeMounts": [{ "name": "data", "mountPath": "/data" }] },
            ],
            "volumes": [{ "name": "data", "emptyDir": {} }],
        });
        let out = settled(&pod(&ann, &spec));
        let shim = "/opt/spright/preload/libspright_preload.so";
        assert_eq!(
            out["spec"]["volumes"][1],
            json!({ "name": "spright-preload",
                    "hostPath": { "path": "/var/lib/spright/preload", "type": "Directory" } })
        );
        let mount = json!({ "name": "spright-preload", "mountPath": "/opt/spright/preload", "readOnly": true });
        let plain = &out["spec"]["containers"][0];
        assert_eq!(plain["volumeMounts"], json!([mount]));
        assert_eq!(
            plain["env"],
            json!([{ "name": "LD_PRELOAD", "value": shim }])
        );
        let own = &out["spec"]["containers"][1];
        assert_eq!(own["volumeMounts"][1], mount);
        assert_eq!(
            own["env"][1],
            json!({ "name": "LD_PRELOAD", "value": format!("/lib/libjemalloc.so:{shim}") })
        );
        assert!(
            out["spec"]["initContainers"][0]["env"].is_null(),
            "init containers serve no traffic: {out:#}"
        );
        // "false", or no annotation: nothing of the shim.
        for off in [
            json!({ "spright.dev/chain": "demo", "spright.dev/preload": "False" }),
            json!({ "spright.dev/chain": "demo" }),
        ] {
            let out = settled(&pod(&off, &one_container()));
            assert!(out["spec"]["containers"][0]["env"].is_null(), "{out:#}");
        }
    }

    #[test]
    fn preload_conflicts_are_refused_naming_the_annotation() {
        let ann = json!({ "spright.dev/chain": "demo", "spright.dev/preload": "true" });
        let cases = [
            (
                json!({ "containers": [{ "name": "m", "image": "a",
                    "env": [{ "name": "LD_PRELOAD", "valueFrom": { "configMapKeyRef": { "name": "c", "key": "k" } } }] }] }),
                "valueFrom",
            ),
            (
                json!({ "containers": [{ "name": "m", "image": "a" }],
                        "volumes": [{ "name": "spright-preload", "emptyDir": {} }] }),
                "not the hostPath",
            ),
            (
                json!({ "containers": [{ "name": "m", "image": "a",
                    "volumeMounts": [{ "name": "x", "mountPath": "/opt/spright/preload" }] }],
                        "volumes": [{ "name": "x", "emptyDir": {} }] }),
                "already mounts",
            ),
        ];
        for (spec, why) in cases {
            let e = mutate_pod(&pod(&ann, &spec)).unwrap_err().to_string();
            assert!(e.contains("spright.dev/preload") && e.contains(why), "{e}");
        }
        let e = mutate_pod(&pod(
            &json!({ "spright.dev/chain": "demo", "spright.dev/preload": "yes" }),
            &one_container(),
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("spright.dev/preload") && e.contains("\"yes\""),
            "{e}"
        );
    }

    #[test]
    fn chain_alone_gets_label_and_preferred_affinity_added_whole() {
        let p = pod(&json!({ "spright.dev/chain": "demo" }), &one_container());
        let patch = mutate_pod(&p).unwrap().unwrap();
        assert_eq!(paths(&patch), ["/metadata/labels", "/spec/affinity"]);
        let out = settled(&p);
        assert_eq!(
            out["metadata"]["labels"],
            json!({ "spright.dev/chain": "demo" })
        );
        assert_eq!(
            out["spec"]["affinity"],
            json!({ "podAffinity": { "preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 100,
                "podAffinityTerm": {
                    "labelSelector": { "matchLabels": { "spright.dev/chain": "demo" } },
                    "topologyKey": "kubernetes.io/hostname",
                },
            }]}})
        );
        assert!(
            out["spec"]["volumes"].is_null(),
            "no volume without spright.dev/shm"
        );
    }

    #[test]
    fn shm_volume_and_mounts_join_existing_lists() {
        let p = pod(
            &json!({
                "spright.dev/chain": "demo",
                "spright.dev/shm": "64Mi",
                "spright.dev/shm-containers": "prepare, ",
            }),
            &json!({
                "initContainers": [
                    { "name": "prepare", "image": "busybox:1.36" },
                    { "name": "other", "image": "busybox:1.36" },
                ],
                "containers": [
                    { "name": "main", "image": "busybox:1.36",
                      "volumeMounts": [{ "name": "data", "mountPath": "/data" }] },
                    { "name": "side", "image": "busybox:1.36" },
                ],
                "volumes": [{ "name": "data", "emptyDir": {} }],
            }),
        );
        let mut p = p;
        p["metadata"]["labels"] = json!({ "app": "a" });
        let patch = mutate_pod(&p).unwrap().unwrap();
        assert_eq!(
            paths(&patch),
            [
                "/metadata/labels/spright.dev~1chain",
                "/spec/volumes/-",
                "/spec/initContainers/0/volumeMounts",
                "/spec/containers/0/volumeMounts/-",
                "/spec/containers/1/volumeMounts",
                "/spec/affinity",
            ]
        );
        let out = settled(&p);
        assert_eq!(
            out["metadata"]["labels"],
            json!({ "app": "a", "spright.dev/chain": "demo" })
        );
        assert_eq!(
            out["spec"]["volumes"],
            json!([
                { "name": "data", "emptyDir": {} },
                { "name": "spright-shm", "csi": { "driver": "shm.spright.dev",
                  "volumeAttributes": { "chain": "demo", "size": "64Mi" } } },
            ])
        );
        let mount = json!({ "name": "spright-shm", "mountPath": "/dev/shm/spright" });
        assert_eq!(
            out["spec"]["initContainers"][0]["volumeMounts"],
            json!([mount])
        );
        assert!(out["spec"]["initContainers"][1]["volumeMounts"].is_null());
        assert_eq!(out["spec"]["containers"][0]["volumeMounts"][1], mount);
        assert_eq!(out["spec"]["containers"][1]["volumeMounts"], json!([mount]));
    }

    #[test]
    fn shm_true_is_the_nodes_default_size_and_the_path_can_move() {
        let p = pod(
            &json!({ "spright.dev/chain": "demo", "spright.dev/shm": "true",
                     "spright.dev/shm-path": "/dev/spright" }),
            &one_container(),
        );
        let out = settled(&p);
        assert_eq!(
            out["spec"]["volumes"][0]["csi"]["volumeAttributes"],
            json!({ "chain": "demo" }),
            "no size: shm-csi uses its --default-size"
        );
        assert_eq!(
            out["spec"]["containers"][0]["volumeMounts"][0]["mountPath"],
            "/dev/spright"
        );
        // "false" asks for nothing.
        let p = pod(
            &json!({ "spright.dev/chain": "demo", "spright.dev/shm": "false" }),
            &one_container(),
        );
        assert!(settled(&p)["spec"]["volumes"].is_null());
    }

    #[test]
    fn placement_required_none_and_existing_terms() {
        let spec = json!({
            "containers": [{ "name": "main", "image": "busybox:1.36" }],
            "affinity": {
                "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{ "matchExpressions": [
                        { "key": "disk", "operator": "In", "values": ["ssd"] }] }] } },
                "podAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": [
                    { "labelSelector": { "matchLabels": { "app": "db" } }, "topologyKey": "zone" }] },
            },
        });
        let p = pod(
            &json!({ "spright.dev/chain": "demo", "spright.dev/placement": "required" }),
            &spec,
        );
        let out = settled(&p);
        let required = &out["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
        assert_eq!(required.as_array().unwrap().len(), 2, "{out:#}");
        assert_eq!(
            required[0]["topologyKey"], "zone",
            "existing term kept first"
        );
        assert_eq!(required[1], to_value(&chain_term("demo")));
        assert_eq!(
            out["spec"]["affinity"]["nodeAffinity"],
            spec["affinity"]["nodeAffinity"]
        );
        assert!(out["spec"]["affinity"]["podAffinity"][PREFERRED_FIELD].is_null());

        // Preferred next to an existing podAffinity without a preferred list.
        let p = pod(&json!({ "spright.dev/chain": "demo" }), &spec);
        let patch = mutate_pod(&p).unwrap().unwrap();
        assert_eq!(
            paths(&patch)[1],
            "/spec/affinity/podAffinity/preferredDuringSchedulingIgnoredDuringExecution"
        );
        settled(&p);
        // A required term already there satisfies "preferred".
        let done = settled(&pod(
            &json!({ "spright.dev/chain": "demo", "spright.dev/placement": "required" }),
            &spec,
        ));
        let mut ann = done.clone();
        ann["metadata"]["annotations"]["spright.dev/placement"] = json!("preferred");
        assert!(mutate_pod(&ann).unwrap().unwrap().0.is_empty());

        // Affinity without podAffinity.
        let mut only_node = spec.clone();
        only_node["affinity"]
            .as_object_mut()
            .unwrap()
            .remove("podAffinity");
        let p = pod(&json!({ "spright.dev/chain": "demo" }), &only_node);
        assert_eq!(
            paths(&mutate_pod(&p).unwrap().unwrap())[1],
            "/spec/affinity/podAffinity"
        );
        settled(&p);

        // none: the label only.
        let p = pod(
            &json!({ "spright.dev/chain": "demo", "spright.dev/placement": "none" }),
            &one_container(),
        );
        assert_eq!(
            paths(&mutate_pod(&p).unwrap().unwrap()),
            ["/metadata/labels"]
        );
    }

    #[test]
    fn reinvocation_mounts_the_volume_in_a_container_added_since() {
        let p = pod(
            &json!({ "spright.dev/chain": "demo", "spright.dev/shm": "true" }),
            &one_container(),
        );
        let mut out = settled(&p);
        // Another webhook added a container after the first review.
        out["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({ "name": "proxy", "image": "busybox:1.36" }));
        let patch = mutate_pod(&out).unwrap().unwrap();
        assert_eq!(paths(&patch), ["/spec/containers/1/volumeMounts"]);
        let out = settled(&out);
        assert_eq!(
            out["spec"]["volumes"].as_array().unwrap().len(),
            1,
            "one volume"
        );
    }

    #[test]
    fn a_label_naming_another_chain_is_replaced() {
        let mut p = pod(
            &json!({ "spright.dev/chain": "demo", "spright.dev/placement": "none" }),
            &one_container(),
        );
        p["metadata"]["labels"] = json!({ "spright.dev/chain": "old" });
        let patch = mutate_pod(&p).unwrap().unwrap();
        assert!(
            matches!(&patch.0[..], [PatchOperation::Replace(_)]),
            "{patch:?}"
        );
        assert_eq!(
            settled(&p)["metadata"]["labels"]["spright.dev/chain"],
            "demo"
        );
    }

    #[test]
    fn a_hand_written_volume_is_kept_and_must_name_the_chain() {
        let spec = |chain: &str| {
            json!({
                "containers": [{ "name": "main", "image": "busybox:1.36",
                    "volumeMounts": [{ "name": "chain-shm", "mountPath": "/dev/spright" }] }],
                "volumes": [{ "name": "chain-shm", "csi": { "driver": "shm.spright.dev",
                    "volumeAttributes": { "chain": chain, "size": "64Mi" } } }],
            })
        };
        let ann = json!({ "spright.dev/chain": "demo", "spright.dev/shm": "64Mi" });
        let out = settled(&pod(&ann, &spec("demo")));
        assert_eq!(out["spec"]["volumes"], spec("demo")["volumes"]);
        assert_eq!(out["spec"]["containers"], spec("demo")["containers"]);
        let e = mutate_pod(&pod(&ann, &spec("other"))).unwrap_err();
        assert_eq!(e.reason(), "spright.dev/chain");
        assert!(
            e.to_string().contains("\"chain-shm\"") && e.to_string().contains("\"other\""),
            "{e}"
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_annotation() {
        let cases = [
            (
                json!({ "spright.dev/chain": "../etc" }),
                "spright.dev/chain",
                "../etc",
            ),
            (
                json!({ "spright.dev/chain": "demo", "spright.dev/shm": "64MB" }),
                "spright.dev/shm",
                "unknown unit",
            ),
            (
                json!({ "spright.dev/chain": "demo", "spright.dev/shm": "0" }),
                "spright.dev/shm",
                "greater than zero",
            ),
            (
                json!({ "spright.dev/chain": "demo", "spright.dev/placement": "always" }),
                "spright.dev/placement",
                "always",
            ),
            (
                json!({ "spright.dev/chain": "demo", "spright.dev/shm": "true", "spright.dev/shm-path": "shm" }),
                "spright.dev/shm-path",
                "absolute",
            ),
            (
                json!({ "spright.dev/chain": "demo", "spright.dev/shm": "true", "spright.dev/shm-path": "/a/../b" }),
                "spright.dev/shm-path",
                "..",
            ),
            (
                json!({ "spright.dev/chain": "demo", "spright.dev/shm": "true", "spright.dev/shm-containers": "nope" }),
                "spright.dev/shm-containers",
                "nope",
            ),
        ];
        for (ann, annotation, detail) in cases {
            let e = mutate_pod(&pod(&ann, &one_container())).unwrap_err();
            let msg = e.to_string();
            assert_eq!(e.reason(), annotation, "{msg}");
            assert!(msg.contains(annotation) && msg.contains(detail), "{msg}");
        }
        // A mount point already taken.
        let spec = json!({ "containers": [{ "name": "main", "image": "busybox:1.36",
            "volumeMounts": [{ "name": "x", "mountPath": "/dev/shm/spright" }] }],
            "volumes": [{ "name": "x", "emptyDir": {} }] });
        let e = mutate_pod(&pod(
            &json!({ "spright.dev/chain": "demo", "spright.dev/shm": "true" }),
            &spec,
        ))
        .unwrap_err();
        assert_eq!(e.reason(), "spright.dev/shm-path", "{e}");
        // Not a Pod at all.
        let e = mutate_pod(&pod(
            &json!({ "spright.dev/chain": "demo" }),
            &json!({ "containers": "weird" }),
        ))
        .unwrap_err();
        assert_eq!(e.reason(), "object", "{e}");
    }

    fn request(operation: &str, object: Option<Value>) -> AdmissionReview {
        AdmissionReview::of_request(AdmissionRequest {
            uid: "705ab4f5-6393-11e8-b7cc-42010a800002".into(),
            kind: GroupVersionKind::pod(),
            namespace: Some("shop".into()),
            operation: operation.into(),
            object,
            ..AdmissionRequest::default()
        })
    }

    #[test]
    fn reviews_answer_with_the_uid_and_a_base64_json_patch() {
        let p = pod(&json!({ "spright.dev/chain": "demo" }), &one_container());
        let (out, outcome) = review(&request("CREATE", Some(p.clone()))).unwrap();
        assert_eq!(outcome, Outcome::Patched(2));
        assert_eq!(
            (out.api_version.as_str(), out.kind.as_str()),
            (crate::review::API_VERSION, crate::review::KIND)
        );
        let r = out.response.unwrap();
        assert_eq!(r.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert!(r.allowed && r.status.is_none());
        assert_eq!(r.patch_type.as_deref(), Some("JSONPatch"));
        let patch = r.decoded_patch().unwrap().unwrap();
        assert_eq!(patch, mutate_pod(&p).unwrap().unwrap());

        // Patched pods, other operations, other kinds: allowed, no patch.
        let done = patched(&p).unwrap();
        let (out, outcome) = review(&request("CREATE", Some(done))).unwrap();
        assert_eq!(outcome, Outcome::Unchanged);
        let json = serde_json::to_value(&out).unwrap();
        assert_eq!(
            json["response"],
            json!({ "uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": true })
        );
        let (_, outcome) = review(&request("UPDATE", Some(p.clone()))).unwrap();
        assert_eq!(outcome, Outcome::Ignored);
        let mut svc = request("CREATE", Some(p.clone()));
        svc.request.as_mut().unwrap().kind.kind = "Service".into();
        assert_eq!(review(&svc).unwrap().1, Outcome::Ignored);

        // Refusals carry a 400 Status.
        let bad = pod(
            &json!({ "spright.dev/chain": "demo", "spright.dev/placement": "x" }),
            &one_container(),
        );
        let (out, outcome) = review(&request("CREATE", Some(bad))).unwrap();
        assert_eq!(outcome, Outcome::Refused("spright.dev/placement"));
        let r = out.response.unwrap();
        assert!(!r.allowed && r.patch.is_none());
        let status = r.status.unwrap();
        assert_eq!((status.code, status.status.as_str()), (400, "Failure"));
        assert!(
            status.message.contains("spright.dev/placement"),
            "{}",
            status.message
        );
        let (out, _) = review(&request("CREATE", None)).unwrap();
        assert!(!out.response.unwrap().allowed);
    }

    #[test]
    fn reviews_without_uid_request_or_version_are_bad() {
        let mut r = request("CREATE", None);
        r.request.as_mut().unwrap().uid.clear();
        assert_eq!(review(&r).unwrap_err(), BadReview::NoUid);
        r.request = None;
        assert_eq!(review(&r).unwrap_err(), BadReview::NoRequest);
        r.api_version = "admission.k8s.io/v1beta1".into();
        assert!(review(&r).unwrap_err().to_string().contains("v1beta1"));
    }
}
