//! The Pod object, as spright reads it: the kubectl-shaped JSON of
//! `kubectl get pod -o json` (or the object of a watch event), parsed once
//! into the few fields that decide membership. The same annotation rules
//! apply here and in spright-cni (`Annotated`), so a Pod and the record its
//! ADD wrote can only disagree when the Pod was edited after ADD.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    ANNOTATION_CHAIN, ANNOTATION_FUNCTION, ANNOTATION_PRELOAD, ANNOTATION_REDIRECT, Error,
    validate_chain,
};

/// What a pod's annotations ask of spright.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Annotated {
    /// `spright.dev/chain`, validated (a DNS-1123 label); `None` when absent or empty.
    pub chain: Option<String>,
    /// `spright.dev/function`; `None` when absent or empty.
    pub function: Option<String>,
    /// `false` when `spright.dev/redirect` is `off` (any case).
    pub redirect: bool,
    /// `spright.dev/preload` is `true` (any case): the pod opted in to the
    /// preload shim.
    #[serde(default)]
    pub preload: bool,
}

impl Annotated {
    /// Reads the annotations through `get` (a map lookup). A chain name that
    /// is not a DNS-1123 label is an error naming it.
    pub fn from_annotations<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Self, Error> {
        let present = |k: &str| get(k).filter(|v| !v.is_empty()).map(str::to_owned);
        let chain = present(ANNOTATION_CHAIN);
        if let Some(c) = &chain {
            validate_chain(c)?;
        }
        Ok(Self {
            chain,
            function: present(ANNOTATION_FUNCTION),
            redirect: !get(ANNOTATION_REDIRECT).is_some_and(|v| v.eq_ignore_ascii_case("off")),
            preload: get(ANNOTATION_PRELOAD).is_some_and(|v| v.eq_ignore_ascii_case("true")),
        })
    }
}

/// A Pod, reduced to what spright uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`; empty when the object has none (hand-written files).
    #[serde(default)]
    pub uid: String,
    /// `spec.nodeName`: the node the scheduler bound it to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(flatten)]
    pub annotated: Annotated,
    /// `metadata.deletionTimestamp` is set: the pod is shutting down.
    #[serde(default)]
    pub terminating: bool,
}

impl PodInfo {
    /// `namespace/name`, the key of a pod in the API.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether this object describes the pod with `uid`: the same name with
    /// another uid is another pod (deleted and recreated). An empty uid on
    /// either side matches (it was not known).
    pub fn same_pod(&self, uid: &str) -> bool {
        self.uid.is_empty() || uid.is_empty() || self.uid == uid
    }

    /// A pod in chain `chain` (whatever its redirect choice: opting out of
    /// the redirect does not take a pod out of its chain's shared memory).
    pub fn in_chain(&self, chain: &str) -> bool {
        self.annotated.chain.as_deref() == Some(chain)
    }

    /// Parses one object. `Ok(None)` when it is not a Pod (`kind` is
    /// another), an error naming the pod when it is unusable.
    pub fn parse(v: &serde_json::Value) -> Result<Option<Self>, Error> {
        match v.get("kind").and_then(serde_json::Value::as_str) {
            Some("Pod") | None => {}
            Some(_) => return Ok(None),
        }
        let raw = RawPod::deserialize(v).map_err(|source| Error::Pod {
            pod: describe(v),
            source,
        })?;
        let annotations = raw.metadata.annotations.unwrap_or_default();
        let annotated = Annotated::from_annotations(|k| annotations.get(k).map(String::as_str))?;
        Ok(Some(Self {
            namespace: raw
                .metadata
                .namespace
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| crate::DEFAULT_POD_NAMESPACE.to_owned()),
            name: raw.metadata.name,
            uid: raw.metadata.uid.unwrap_or_default(),
            node_name: raw.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty()),
            annotated,
            terminating: raw.metadata.deletion_timestamp.is_some(),
        }))
    }

    /// Every Pod of a file's content: a Pod, or a `List`/`PodList` of them
    /// (what `kubectl get pods -o json` prints). Objects of other kinds are
    /// skipped; each unusable Pod is one error, the others still count.
    pub fn parse_all(v: &serde_json::Value) -> Vec<Result<Self, Error>> {
        match v.get("items").and_then(serde_json::Value::as_array) {
            Some(items) => items
                .iter()
                .filter_map(|i| Self::parse(i).transpose())
                .collect(),
            None => Self::parse(v).transpose().into_iter().collect(),
        }
    }
}

/// The Pods of a directory of JSON files (`kubectl get pod -o json` output:
/// a Pod or a List per file; a missing directory has none), with every
/// file or object that could not be used as (path, why).
pub fn read_dir(dir: &std::path::Path) -> (Vec<PodInfo>, Vec<crate::Problem>) {
    let (objects, mut problems) = crate::read_json_dir(dir);
    let mut pods = Vec::new();
    for (path, v) in objects {
        for p in PodInfo::parse_all(&v) {
            match p {
                Ok(p) => pods.push(p),
                Err(e) => problems.push((path.clone(), crate::error_chain(&e))),
            }
        }
    }
    (pods, problems)
}

/// `namespace/name` of an object, for error messages.
fn describe(v: &serde_json::Value) -> String {
    let m = &v["metadata"];
    format!(
        "{}/{}",
        m["namespace"].as_str().unwrap_or_default(),
        m["name"].as_str().unwrap_or("<no name>")
    )
}

#[derive(Deserialize)]
struct RawPod {
    metadata: RawMeta,
    #[serde(default)]
    spec: Option<RawSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMeta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    deletion_timestamp: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    #[serde(default)]
    node_name: Option<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(annotations: &serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "fn-a", "namespace": "shop", "uid": "u-1",
                          "annotations": annotations },
            "spec": { "nodeName": "node-a", "containers": [] },
        })
    }

    #[test]
    fn a_pod_object_becomes_its_membership() {
        let p = PodInfo::parse(&pod(&json!({
            "spright.dev/chain": "checkout", "spright.dev/function": "tax",
        })))
        .unwrap()
        .unwrap();
        assert_eq!(p.key(), "shop/fn-a");
        assert_eq!(p.uid, "u-1");
        assert_eq!(p.node_name.as_deref(), Some("node-a"));
        assert!(p.in_chain("checkout") && !p.in_chain("other"));
        assert_eq!(p.annotated.function.as_deref(), Some("tax"));
        assert!(p.annotated.redirect && !p.terminating);
    }

    #[test]
    fn opt_out_empty_values_and_bad_chains() {
        let p = PodInfo::parse(&pod(&json!({
            "spright.dev/chain": "", "spright.dev/redirect": "OFF",
        })))
        .unwrap()
        .unwrap();
        assert_eq!(p.annotated.chain, None);
        assert!(!p.annotated.redirect);
        let e = PodInfo::parse(&pod(&json!({ "spright.dev/chain": "../etc" })))
            .unwrap_err()
            .to_string();
        assert!(e.contains("chain name") && e.contains("../etc"), "{e}");
    }

    #[test]
    fn lists_other_kinds_and_broken_objects() {
        let list = json!({ "apiVersion": "v1", "kind": "List", "items": [
            pod(&json!({ "spright.dev/chain": "c" })),
            { "apiVersion": "v1", "kind": "Service", "metadata": { "name": "s" } },
            { "apiVersion": "v1", "kind": "Pod", "metadata": { "namespace": "x" } },
        ]});
        let all = PodInfo::parse_all(&list);
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(all[0].as_ref().unwrap().in_chain("c"));
        let e = all[1].as_ref().unwrap_err().to_string();
        assert!(e.contains("x/<no name>"), "{e}");
        // No namespace: the API's default.
        let p = PodInfo::parse(&json!({ "kind": "Pod", "metadata": { "name": "p" } }))
            .unwrap()
            .unwrap();
        assert_eq!(p.key(), "default/p");
        assert_eq!(p.node_name, None);
    }

    #[test]
    fn uids_tell_recreated_pods_apart() {
        let p = PodInfo::parse(&pod(&json!({}))).unwrap().unwrap();
        assert!(p.same_pod("u-1") && p.same_pod(""));
        assert!(!p.same_pod("u-2"));
    }

    #[test]
    fn terminating_pods_are_marked() {
        let mut v = pod(&json!({}));
        v["metadata"]["deletionTimestamp"] = json!("2026-11-30T00:00:00Z");
        assert!(PodInfo::parse(&v).unwrap().unwrap().terminating);
    }
}
