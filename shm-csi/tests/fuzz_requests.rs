//! Property tests of what shm-csi reads from the kubelet: NodePublishVolume
//! and NodeUnpublishVolume requests (from their protobuf bytes up), with the
//! volume attributes a user writes (`chain`, `size`, `medium`) and the pod
//! information kubelet adds. Whatever arrives is a validated request or a
//! gRPC status in the CSI spec's terms (INVALID_ARGUMENT or
//! FAILED_PRECONDITION, with a message), never a panic.

use proptest::prelude::*;
use prost::Message as _;
use shm_csi::{
    csi::{
        NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability,
        volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume},
    },
    request::{self, Limits},
    size,
};
use spright_endpoint::fuzzing::text;
use tonic::{Code, Status};

const LIMITS: Limits = Limits {
    default_size: 64 << 20,
    max_size: 1 << 30,
};

const CONTEXT_KEYS: &[&str] = &[
    "chain",
    "size",
    "medium",
    "csi.storage.k8s.io/pod.name",
    "csi.storage.k8s.io/pod.namespace",
    "csi.storage.k8s.io/pod.uid",
    "csi.storage.k8s.io/ephemeral",
    "csi.storage.k8s.io/serviceAccount.name",
    "other",
];

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/shm/mount".to_owned()),
        text().prop_map(|t| format!("/var/lib/kubelet/pods/{t}/mount")),
        text(),
    ]
}

fn capability() -> impl Strategy<Value = Option<VolumeCapability>> {
    proptest::option::of(
        (
            proptest::option::of(any::<i32>().prop_map(|mode| AccessMode { mode })),
            proptest::option::of(prop_oneof![
                Just(AccessType::Mount(MountVolume::default())),
                Just(AccessType::Block(BlockVolume::default())),
            ]),
        )
            .prop_map(|(access_mode, access_type)| VolumeCapability {
                access_mode,
                access_type,
            }),
    )
}

/// A request as kubelet sends it for an inline volume, with up to three
/// fields replaced by anything: reaches every check past the first.
fn mostly_valid_request() -> impl Strategy<Value = NodePublishVolumeRequest> {
    let overrides = proptest::collection::vec(
        (
            proptest::sample::select(CONTEXT_KEYS).prop_map(str::to_owned),
            text(),
        ),
        0..3,
    );
    (overrides, 0i32..8, any::<bool>(), path()).prop_map(|(overrides, mode, readonly, target)| {
        let mut ctx: std::collections::HashMap<String, String> = [
            ("chain", "demo"),
            ("csi.storage.k8s.io/pod.name", "fn-a"),
            ("csi.storage.k8s.io/pod.namespace", "shop"),
            ("csi.storage.k8s.io/pod.uid", "u-1"),
            ("csi.storage.k8s.io/ephemeral", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        ctx.extend(overrides);
        NodePublishVolumeRequest {
            volume_id: "csi-abc".into(),
            target_path: target,
            volume_capability: Some(VolumeCapability {
                access_mode: Some(AccessMode { mode }),
                access_type: Some(AccessType::Mount(MountVolume::default())),
            }),
            volume_context: ctx,
            readonly,
            ..Default::default()
        }
    })
}

fn publish_request() -> impl Strategy<Value = NodePublishVolumeRequest> {
    prop_oneof![mostly_valid_request(), any_request()]
}

fn any_request() -> impl Strategy<Value = NodePublishVolumeRequest> {
    (
        text(),
        path(),
        capability(),
        proptest::collection::hash_map(
            proptest::sample::select(CONTEXT_KEYS).prop_map(str::to_owned),
            text(),
            0..8,
        ),
        any::<bool>(),
    )
        .prop_map(
            |(volume_id, target_path, volume_capability, volume_context, readonly)| {
                NodePublishVolumeRequest {
                    volume_id,
                    target_path,
                    volume_capability,
                    volume_context,
                    readonly,
                    ..Default::default()
                }
            },
        )
}

fn refused_in_csi_terms(s: &Status) -> Result<(), TestCaseError> {
    prop_assert!(
        matches!(s.code(), Code::InvalidArgument | Code::FailedPrecondition),
        "{:?}: {}",
        s.code(),
        s.message()
    );
    prop_assert!(!s.message().is_empty());
    Ok(())
}

/// The generator reaches past the first check: a fixed sample holds
/// accepted requests and refusals of several kinds.
#[test]
fn requests_reach_acceptance() {
    use proptest::strategy::ValueTree as _;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut ok, mut refusals) = (0, std::collections::BTreeSet::new());
    for _ in 0..3000 {
        let req = publish_request().new_tree(&mut runner).unwrap().current();
        match request::publish(&req, LIMITS) {
            Ok(_) => ok += 1,
            Err(e) => {
                refusals.insert(
                    e.to_string()
                        .split(':')
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
        }
    }
    assert!(ok >= 10, "only {ok} of 3000 requests were accepted");
    assert!(refusals.len() >= 5, "{refusals:?}");
}

proptest! {
    #[test]
    fn publish_requests_are_validated_or_refused(req in publish_request()) {
        match request::publish(&req, LIMITS) {
            Ok(p) => {
                prop_assert!(p.size > 0 && p.size <= LIMITS.max_size, "size {}", p.size);
                prop_assert!(spright_endpoint::validate_chain(&p.chain).is_ok(), "{}", p.chain);
                prop_assert!(p.target_path.is_absolute());
                // Validation is a function of the request: the same request
                // again is the same publish (what idempotency compares).
                prop_assert_eq!(request::publish(&req, LIMITS).ok(), Some(p));
            }
            Err(e) => refused_in_csi_terms(&Status::from(e))?,
        }
    }

    #[test]
    fn publish_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512), req in publish_request()) {
        // Arbitrary bytes, and a real request's bytes with one flipped.
        let mut real = req.encode_to_vec();
        if let Some(b) = real.first_mut() {
            *b ^= 0x5a;
        }
        for b in [bytes, real] {
            if let Ok(r) = NodePublishVolumeRequest::decode(b.as_slice())
                && let Err(e) = request::publish(&r, LIMITS)
            {
                refused_in_csi_terms(&Status::from(e))?;
            }
        }
    }

    #[test]
    fn unpublish_requests_are_validated_or_refused(volume_id in text(), target_path in path()) {
        let req = NodeUnpublishVolumeRequest { volume_id, target_path };
        if let Err(e) = request::unpublish(&req) {
            refused_in_csi_terms(&Status::from(e))?;
        }
    }

    /// Sizes as users write them: parsed (and a parsed size prints back to
    /// itself in bytes) or refused with a message.
    #[test]
    fn sizes_parse_or_explain(s in text(), n in 1u64..(1 << 40)) {
        match size::parse(&s) {
            Ok(v) => prop_assert_eq!(size::parse(&v.to_string()).ok(), Some(v)),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        prop_assert_eq!(size::parse(&n.to_string()).ok(), Some(n));
    }
}
