//! Property tests of the webhook's parser of outside input: the
//! AdmissionReview the API server sends (and the Pod inside it).
//!
//! - Any bytes: no panic. What does not parse is the server's HTTP 400
//!   (`serde_json` error), a review the API server could not have sent is a
//!   `BadReview` with a message, every other review gets a response with the
//!   request's uid: allowed (with a patch that decodes and applies to the
//!   object), or denied with code 400 and a message.
//! - Pods shaped like real ones, with every `spright.dev/*` annotation drawn
//!   from meaningful and hostile values: a Pod outside any chain is not
//!   touched, a patched Pod is still a Pod, and reviewing it again changes
//!   nothing (the webhook is idempotent, as the
//!   API server's reinvocation policy needs).

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{Value, json};
use spright_endpoint::fuzzing;
use spright_webhook::{
    mutate::{BadReview, Outcome},
    review::{AdmissionRequest, AdmissionReview, GroupVersionKind},
};

/// Field names of a review and of the Pod inside it.
const VOCABULARY: &[&str] = &[
    "apiVersion",
    "kind",
    "request",
    "response",
    "uid",
    "group",
    "version",
    "subResource",
    "operation",
    "object",
    "metadata",
    "annotations",
    "labels",
    "name",
    "namespace",
    "spec",
    "containers",
    "initContainers",
    "volumes",
    "volumeMounts",
    "mountPath",
    "csi",
    "driver",
    "volumeAttributes",
    "affinity",
    "podAffinity",
    "preferredDuringSchedulingIgnoredDuringExecution",
    "requiredDuringSchedulingIgnoredDuringExecution",
    "image",
];

const ANNOTATIONS: &[&str] = &[
    "spright.dev/chain",
    "spright.dev/placement",
    "spright.dev/shm",
    "spright.dev/shm-path",
    "spright.dev/shm-containers",
    "spright.dev/redirect",
    "spright.dev/function",
];

const VALUES: &[&str] = &[
    "demo",
    "shop",
    "Demo_Chain",
    "",
    "true",
    "false",
    "64Mi",
    "1Gi",
    "0",
    "-5Mi",
    "preferred",
    "required",
    "none",
    "sideways",
    "/dev/shm/spright",
    "/spright",
    "relative",
    "/a/../b",
    "app",
    "app, init",
    "off",
];

fn annotations() -> impl Strategy<Value = BTreeMap<String, String>> {
    let value = prop_oneof![
        4 => proptest::sample::select(VALUES).prop_map(str::to_owned),
        1 => fuzzing::text(),
    ];
    proptest::collection::btree_map(
        proptest::sample::select(ANNOTATIONS).prop_map(str::to_owned),
        value,
        0..6,
    )
}

fn container(name: &'static str) -> impl Strategy<Value = Value> {
    (any::<bool>(), fuzzing::json(VOCABULARY)).prop_map(move |(mounts, extra)| {
        let mut c = json!({ "name": name, "image": "busybox" });
        if mounts {
            c["volumeMounts"] = json!([{ "name": "spright-shm", "mountPath": "/x" }]);
        }
        if let Value::Object(extra) = extra {
            for (k, v) in extra.into_iter().filter(|(k, _)| k == "env" || k == "args") {
                c[k] = v;
            }
        }
        c
    })
}

fn volume() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({ "name": "data", "emptyDir": {} })),
        proptest::sample::select(VALUES).prop_map(|chain| json!({
            "name": "spright-shm",
            "csi": { "driver": "shm.spright.dev", "volumeAttributes": { "chain": chain } }
        })),
        fuzzing::json(VOCABULARY),
    ]
}

/// A Pod as a client would send it: real structure, hostile values.
fn pod() -> impl Strategy<Value = Value> {
    (
        annotations(),
        proptest::option::of(annotations()),
        proptest::collection::vec(container("app"), 1..3),
        proptest::collection::vec(container("init"), 0..2),
        proptest::collection::vec(volume(), 0..3),
        proptest::option::of(fuzzing::json(VOCABULARY)),
    )
        .prop_map(|(annotations, labels, containers, init, volumes, affinity)| {
            let mut p = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": { "name": "fn-a", "namespace": "shop", "annotations": annotations },
                "spec": { "containers": containers, "initContainers": init, "volumes": volumes },
            });
            if let Some(labels) = labels {
                p["metadata"]["labels"] = json!(labels);
            }
            if let Some(a) = affinity {
                p["spec"]["affinity"] = a;
            }
            p
        })
}

fn review_of(object: Value, operation: &str) -> AdmissionReview {
    AdmissionReview::of_request(AdmissionRequest {
        uid: "705ab4f5-6393-11e8-b7cc-42010a800002".to_owned(),
        kind: GroupVersionKind::pod(),
        operation: operation.to_owned(),
        object: Some(object),
        ..AdmissionRequest::default()
    })
}

/// Every answer to a parsed review is well formed.
fn check_answer(input: &AdmissionReview) -> Result<(), TestCaseError> {
    match spright_webhook::review(input) {
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            let valid_header =
                input.api_version == "admission.k8s.io/v1" && input.kind == "AdmissionReview";
            match e {
                BadReview::Version { .. } => prop_assert!(!valid_header),
                BadReview::NoRequest => prop_assert!(input.request.is_none()),
                BadReview::NoUid => {
                    prop_assert!(input.request.as_ref().is_some_and(|r| r.uid.is_empty()));
                }
            }
        }
        Ok((out, outcome)) => {
            let req = input.request.as_ref().expect("answered, so it had one");
            let resp = out.response.as_ref().expect("a response");
            prop_assert_eq!(&resp.uid, &req.uid);
            prop_assert!(out.request.is_none());
            if resp.allowed {
                let patch = resp.decoded_patch().map_err(TestCaseError::fail)?;
                prop_assert_eq!(patch.is_some(), matches!(outcome, Outcome::Patched(_)));
                if let Some(patch) = patch {
                    let mut object = req.object.clone().expect("patched, so it had one");
                    json_patch::patch(&mut object, &patch)
                        .map_err(|e| TestCaseError::fail(format!("patch does not apply: {e}")))?;
                }
            } else {
                let status = resp.status.as_ref().expect("a refusal has a status");
                prop_assert_eq!(status.code, 400);
                prop_assert!(!status.message.is_empty());
                prop_assert!(matches!(outcome, Outcome::Refused(_)));
            }
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn any_bytes_get_a_well_formed_answer(bytes in fuzzing::bytes(VOCABULARY)) {
        if let Ok(review) = serde_json::from_slice::<AdmissionReview>(&bytes) {
            check_answer(&review)?;
        }
    }

    #[test]
    fn pod_reviews_get_a_well_formed_answer(
        pod in pod(),
        operation in proptest::sample::select(&["CREATE", "UPDATE", "DELETE", "create", ""][..]),
    ) {
        check_answer(&review_of(pod, operation))?;
    }

    #[test]
    fn a_patched_pod_is_a_pod_and_needs_no_second_patch(pod in pod()) {
        let Ok(patched) = spright_webhook::patched(&pod) else {
            return Ok(());
        };
        if patched == pod {
            // Outside any chain (never parsed further) or already complete.
            prop_assert!(!matches!(spright_webhook::mutate_pod(&pod), Ok(Some(p)) if !p.0.is_empty()));
            return Ok(());
        }
        // A chain Pod was parsed as a Pod, so its patched form must be one.
        serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(patched.clone())
            .map_err(|e| TestCaseError::fail(format!("patched Pod does not parse: {e}")))?;
        match spright_webhook::mutate_pod(&patched) {
            Ok(None) => prop_assert!(false, "the patch took the Pod out of its chain"),
            Ok(Some(again)) => prop_assert!(again.0.is_empty(), "second patch: {:?}", again),
            Err(e) => prop_assert!(false, "accepted once, refused after its own patch: {}", e),
        }
    }
}

/// The generators reach every kind of answer (so the properties above are
/// not passing on refusals alone).
#[test]
fn generated_pods_reach_every_outcome() {
    use proptest::strategy::ValueTree as _;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut seen = BTreeMap::new();
    for _ in 0..2000 {
        let pod = pod().new_tree(&mut runner).unwrap().current();
        let (_, outcome) = spright_webhook::review(&review_of(pod, "CREATE")).unwrap();
        let kind = match outcome {
            Outcome::Ignored => "ignored",
            Outcome::Unchanged => "unchanged",
            Outcome::Patched(_) => "patched",
            Outcome::Refused(_) => "refused",
        };
        *seen.entry(kind).or_insert(0) += 1;
    }
    for kind in ["ignored", "patched", "refused"] {
        assert!(seen.contains_key(kind), "never {kind}: {seen:?}");
    }
}
