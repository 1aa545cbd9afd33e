//! Inputs for property tests of spright's parsers of outside input (CNI
//! stdin and environment, records, Kubernetes objects, CSI requests,
//! AdmissionReviews): JSON documents shaped like the real ones but with
//! every field free to be missing, of another type, empty, huge or hostile.
//!
//! A random JSON document almost never has a parser's field names, so the
//! strategies draw object keys from a vocabulary the test passes (the
//! format's own field names) mixed with arbitrary keys, and draw strings
//! from values that mean something to the parsers (versions, CIDRs, paths,
//! sizes) mixed with arbitrary text. `PROPTEST_CASES` sets how many cases a
//! run tries (`cargo xtask fuzz` raises it and keeps going for minutes).

use proptest::prelude::*;
use serde_json::Value;

/// Strings a parser of spright's inputs treats specially.
const MEANINGFUL: &[&str] = &[
    "",
    "0",
    "-1",
    "1.0.0",
    "1.1.0",
    "0.4.0",
    "0.3.1",
    "0.2.0",
    "99.0.0",
    "bridge",
    "chained",
    "primary",
    "host-local",
    "spright-cni",
    "eth0",
    "lo",
    "10.244.1.5/24",
    "10.244.0.0/16",
    "fd00::5/64",
    "fd00::/48",
    "10.244.1.1",
    "::1",
    "256.1.1.1/33",
    "/var/lib/spright",
    "/proc/1/ns/net",
    "../../etc",
    "relative/path",
    "64Mi",
    "1Gi",
    "true",
    "false",
    "required",
    "none",
    "demo",
    "Demo_Chain",
    "default",
    "a.b.c",
    "\u{0}",
    "💥",
];

/// A string: meaningful for the parsers, or arbitrary (including control
/// characters and long runs).
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(MEANINGFUL).prop_map(str::to_owned),
        2 => "\\PC{0,24}",
        1 => proptest::collection::vec(any::<char>(), 0..300).prop_map(|c| c.into_iter().collect()),
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::String),
    ]
}

/// A JSON document whose object keys come mostly from `vocabulary` (the
/// format's field names), nested up to four levels.
pub fn json(vocabulary: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        4 => proptest::sample::select(vocabulary).prop_map(str::to_owned),
        1 => text(),
    ];
    leaf().prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((key.clone(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// An object (the shape every spright input has at its top) with keys from
/// `vocabulary`.
pub fn object(vocabulary: &'static [&'static str]) -> impl Strategy<Value = Value> {
    proptest::collection::vec(
        (
            proptest::sample::select(vocabulary).prop_map(str::to_owned),
            json(vocabulary),
        ),
        0..12,
    )
    .prop_map(|kv| Value::Object(kv.into_iter().collect()))
}

/// Bytes that are mostly JSON: a document from `vocabulary` serialised and
/// then cut, or arbitrary bytes.
pub fn bytes(vocabulary: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => object(vocabulary).prop_map(|v| v.to_string().into_bytes()),
        1 => (object(vocabulary), any::<prop::sample::Index>()).prop_map(|(v, cut)| {
            let b = v.to_string().into_bytes();
            let at = cut.index(b.len() + 1);
            b[..at].to_vec()
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..512),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PodInfo, Record, pod::Annotated};

    const RECORD: &[&str] = &[
        "version",
        "containerID",
        "container_id",
        "ifname",
        "netns",
        "network",
        "ips",
        "pod",
        "namespace",
        "name",
        "uid",
        "chain",
        "function",
        "redirect",
        "hostIfname",
        "host_ifname",
        "netnsCookie",
        "netns_cookie",
    ];
    const POD: &[&str] = &[
        "kind",
        "apiVersion",
        "metadata",
        "name",
        "namespace",
        "uid",
        "annotations",
        "spright.dev/chain",
        "spright.dev/function",
        "spright.dev/redirect",
        "deletionTimestamp",
        "spec",
        "nodeName",
        "items",
    ];

    proptest! {
        /// An endpoint record file: read or refused with the file named,
        /// never a panic; what is read writes back to the same record.
        #[test]
        fn records_parse_or_are_refused_by_name(body in bytes(RECORD)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c-eth0.json");
            std::fs::write(&path, &body).unwrap();
            match crate::read(&path) {
                Ok(r) => {
                    let again: Record = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
                    prop_assert_eq!(again, r);
                }
                Err(e) => {
                    let msg = crate::error_chain(&e);
                    prop_assert!(msg.contains("c-eth0.json"), "{}", msg);
                }
            }
        }

        /// A Pod object: parsed (its chain a valid name) or refused with a
        /// message, never a panic; the reduced Pod round-trips.
        #[test]
        fn pods_parse_or_are_refused(v in json(POD)) {
            for r in PodInfo::parse_all(&v) {
                match r {
                    Ok(p) => {
                        if let Some(c) = &p.annotated.chain {
                            prop_assert!(crate::validate_chain(c).is_ok());
                        }
                        let again: PodInfo = serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
                        prop_assert_eq!(again, p);
                    }
                    Err(e) => prop_assert!(!crate::error_chain(&e).is_empty()),
                }
            }
        }

        /// Annotations alone, any keys and values.
        #[test]
        fn annotations_parse_or_name_the_chain(chain in text(), function in text(), redirect in text()) {
            let get = |k: &str| match k {
                crate::ANNOTATION_CHAIN => Some(chain.as_str()),
                crate::ANNOTATION_FUNCTION => Some(function.as_str()),
                crate::ANNOTATION_REDIRECT => Some(redirect.as_str()),
                _ => None,
            };
            match Annotated::from_annotations(get) {
                Ok(a) => prop_assert_eq!(a.redirect, !redirect.eq_ignore_ascii_case("off")),
                // The message names what is wrong and quotes the value.
                Err(e) => prop_assert!(
                    e.to_string().contains("chain name") && e.to_string().contains(&format!("{chain:?}")),
                    "{}", e
                ),
            }
        }
    }
}
