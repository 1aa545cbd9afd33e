//! What meshd reads: the endpoint records spright-cni writes, directories
//! of kubectl-shaped JSON (Service/EndpointSlice files, Pod files), and the
//! merged view of this node's Pods. Each object is parsed once, here or in
//! `kube_source`; `desired` computes the kernel's state from these.

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};
use spright_endpoint::{PodInfo, Record};

/// Sub-directory of the state directory read when `--pods-dir` is unset.
pub use spright_endpoint::PODS_SUBDIR;

/// A file (or an object in one) that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MalformedRecord {
    pub path: String,
    pub error: String,
}

/// Reads every record; malformed ones are returned separately (with their path).
pub fn read_records(state_dir: &Path) -> (Vec<Record>, Vec<MalformedRecord>) {
    let mut records = Vec::new();
    let mut malformed = Vec::new();
    match spright_endpoint::list(state_dir) {
        Ok(list) => {
            for (path, r) in list {
                match r {
                    Ok(r) => records.push(r),
                    Err(e) => malformed.push(MalformedRecord {
                        path: path.display().to_string(),
                        error: crate::error::chain(&e),
                    }),
                }
            }
        }
        Err(e) => malformed.push(MalformedRecord {
            path: spright_endpoint::records_dir(state_dir)
                .display()
                .to_string(),
            error: crate::error::chain(&e),
        }),
    }
    (records, malformed)
}

fn malformed((path, error): spright_endpoint::Problem) -> MalformedRecord {
    MalformedRecord { path, error }
}

/// Every `*.json` file of `dir`, by name, parsed as JSON (a missing
/// directory is empty). Unreadable or unparsable files are problems, never
/// fatal.
pub fn read_json_dir(dir: &Path) -> (Vec<(String, serde_json::Value)>, Vec<MalformedRecord>) {
    let (objects, problems) = spright_endpoint::read_json_dir(dir);
    (objects, problems.into_iter().map(malformed).collect())
}

/// The Pods of the pods directory (`kubectl get pod -o json` output: a
/// Pod or a List per file).
pub fn read_pod_files(dir: &Path) -> (Vec<PodInfo>, Vec<MalformedRecord>) {
    let (pods, problems) = spright_endpoint::pod::read_dir(dir);
    (pods, problems.into_iter().map(malformed).collect())
}

/// This node's Pods, merged from the files and the API (the API wins for a
/// pod both name), and the pods that disappeared from both while a record
/// of theirs still exists (deleted Pods whose sandbox is not torn down yet).
#[derive(Clone, Debug, Default)]
pub struct PodView {
    pods: BTreeMap<String, PodInfo>,
    /// `namespace/name` → uid of a Pod that was known and is gone.
    gone: BTreeMap<String, String>,
}

impl PodView {
    /// Replaces the view with `files` ∪ `api`, remembering which pods left.
    /// What left is forgotten once no record names it.
    pub fn update<'a>(
        &mut self,
        files: impl IntoIterator<Item = &'a PodInfo>,
        api: impl IntoIterator<Item = &'a PodInfo>,
        records: &[Record],
    ) {
        let mut pods = BTreeMap::new();
        for p in files.into_iter().chain(api) {
            pods.insert(p.key(), p.clone());
        }
        for (key, old) in &self.pods {
            if !pods.contains_key(key) {
                self.gone.insert(key.clone(), old.uid.clone());
            }
        }
        // Forget what came back, and what no record names any more.
        let recorded: std::collections::BTreeSet<String> = records
            .iter()
            .map(|r| format!("{}/{}", r.pod.namespace, r.pod.name))
            .collect();
        self.gone
            .retain(|key, _| !pods.contains_key(key) && recorded.contains(key));
        self.pods = pods;
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods.get(&format!("{namespace}/{name}"))
    }

    pub fn iter(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.values()
    }

    pub fn len(&self) -> usize {
        self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Whether the pod `namespace/name` with `uid` was known and is gone.
    pub fn is_gone(&self, namespace: &str, name: &str, uid: &str) -> bool {
        self.gone
            .get(&format!("{namespace}/{name}"))
            .is_some_and(|old| old.is_empty() || uid.is_empty() || old == uid)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, uid: &str, chain: Option<&str>) -> PodInfo {
        let mut annotations = serde_json::Map::new();
        if let Some(c) = chain {
            annotations.insert("spright.dev/chain".into(), json!(c));
        }
        PodInfo::parse(&json!({ "kind": "Pod", "metadata": {
            "name": name, "namespace": "ns", "uid": uid, "annotations": annotations } }))
        .unwrap()
        .unwrap()
    }

    fn record(name: &str) -> Record {
        let mut r: Record = serde_json::from_value(json!({
            "version": spright_endpoint::RECORD_VERSION, "containerId": format!("c-{name}"),
            "ifname": "eth0", "netns": "/proc/1/ns/net", "ips": [],
            "pod": { "namespace": "ns", "name": name },
        }))
        .unwrap();
        r.chain = Some("c".into());
        r
    }

    #[test]
    fn the_api_wins_and_departures_are_remembered_while_a_record_exists() {
        let mut v = PodView::default();
        let (a_file, a_api) = (pod("a", "u1", None), pod("a", "u1", Some("c")));
        let b = pod("b", "u2", Some("c"));
        v.update([&a_file, &b], [&a_api], &[record("a"), record("b")]);
        assert_eq!(v.len(), 2);
        assert!(v.get("ns", "a").unwrap().in_chain("c"), "API wins");
        // b is deleted; its record is still there.
        v.update([&a_file], [&a_api], &[record("a"), record("b")]);
        assert!(v.get("ns", "b").is_none());
        assert!(v.is_gone("ns", "b", "u2") && v.is_gone("ns", "b", ""));
        assert!(!v.is_gone("ns", "b", "u3"), "another pod of that name");
        assert!(!v.is_gone("ns", "a", "u1"));
        // The record goes (CNI DEL): forgotten.
        v.update([&a_file], [&a_api], &[record("a")]);
        assert!(!v.is_gone("ns", "b", "u2"));
        // Coming back clears it too.
        v.update([&a_file, &b], [], &[record("a"), record("b")]);
        v.update([&a_file], [], &[record("a"), record("b")]);
        v.update([&a_file, &b], [], &[record("a"), record("b")]);
        assert!(!v.is_gone("ns", "b", "u2"));
    }

    #[test]
    fn pod_files_with_problems_still_yield_the_good_pods() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.json"),
            json!({ "kind": "List", "items": [
                { "kind": "Pod", "metadata": { "name": "ok", "namespace": "ns" } },
                { "kind": "Pod", "metadata": { "name": "bad", "namespace": "ns",
                    "annotations": { "spright.dev/chain": "Not_A_Label" } } },
            ]})
            .to_string(),
        )
        .unwrap();
        std::fs::write(dir.path().join("b.json"), "{").unwrap();
        std::fs::write(dir.path().join("ignored.txt"), "{").unwrap();
        let (pods, problems) = read_pod_files(dir.path());
        assert_eq!(pods.len(), 1);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems.iter().any(|p| p.error.contains("Not_A_Label")),
            "{problems:?}"
        );
        let (none, no_problems) = read_pod_files(&dir.path().join("missing"));
        assert!(none.is_empty() && no_problems.is_empty());
    }
}
