//! Validation of NodePublish/NodeUnpublish requests into typed values, before
//! any side effect.

use std::{collections::HashMap, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    csi::{
        NodePublishVolumeRequest, NodeUnpublishVolumeRequest,
        volume_capability::{AccessType, access_mode::Mode},
    },
    error::Error,
    size,
};

/// Volume attribute: the chain whose region to mount (required).
pub const ATTR_CHAIN: &str = "chain";
/// Volume attribute: the region's size (e.g. `64Mi`).
pub const ATTR_SIZE: &str = "size";
/// Volume attribute: `memory` (tmpfs, default) or `hugepages` (hugetlbfs).
pub const ATTR_MEDIUM: &str = "medium";
/// Pod information that kubelet adds when the CSIDriver has `podInfoOnMount`.
pub const CTX_POD_NAME: &str = "csi.storage.k8s.io/pod.name";
pub const CTX_POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
pub const CTX_POD_UID: &str = "csi.storage.k8s.io/pod.uid";
pub const CTX_EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
/// Prefix of every key kubelet adds (others like `serviceAccount.name` are ignored).
const CTX_KUBELET_PREFIX: &str = "csi.storage.k8s.io/";

/// Where the region's memory comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Medium {
    Memory,
    Hugepages,
}

impl Medium {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Hugepages => "hugepages",
        }
    }
}

/// Size limits configured for this node.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub default_size: u64,
    pub max_size: u64,
}

/// A validated publish request: what is stored for idempotency checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    pub volume_id: String,
    pub target_path: PathBuf,
    pub namespace: String,
    pub chain: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub size: u64,
    pub medium: Medium,
    pub readonly: bool,
}

impl Publish {
    /// Which argument differs from `other` (for ALREADY_EXISTS messages).
    pub fn difference(&self, other: &Self) -> Option<&'static str> {
        [
            (self.target_path != other.target_path, "target_path"),
            (self.namespace != other.namespace, "pod namespace"),
            (self.chain != other.chain, "chain"),
            (self.pod_name != other.pod_name, "pod name"),
            (self.pod_uid != other.pod_uid, "pod uid"),
            (self.size != other.size, "size"),
            (self.medium != other.medium, "medium"),
            (self.readonly != other.readonly, "readonly"),
        ]
        .into_iter()
        .find_map(|(differs, what)| differs.then_some(what))
    }
}

fn required<'a>(value: &'a str, field: &'static str) -> Result<&'a str, Error> {
    if value.is_empty() {
        Err(Error::Missing(field))
    } else {
        Ok(value)
    }
}

fn target_path(value: &str) -> Result<PathBuf, Error> {
    let p = PathBuf::from(required(value, "target_path")?);
    if !p.is_absolute() {
        return Err(Error::invalid("target_path", value, "must be absolute"));
    }
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(Error::invalid(
            "target_path",
            value,
            "must not contain '..'",
        ));
    }
    Ok(p)
}

/// Checks NodePublishVolume's arguments; no side effects.
pub fn publish(req: &NodePublishVolumeRequest, limits: Limits) -> Result<Publish, Error> {
    let volume_id = required(&req.volume_id, "volume_id")?.to_owned();
    let target_path = target_path(&req.target_path)?;
    let cap = req
        .volume_capability
        .as_ref()
        .ok_or(Error::Missing("volume_capability"))?;
    match cap.access_type {
        Some(AccessType::Mount(_)) => {}
        Some(AccessType::Block(_)) => {
            return Err(Error::invalid(
                "volume_capability",
                "block",
                "only mount access is supported",
            ));
        }
        None => return Err(Error::Missing("volume_capability.access_type")),
    }
    let mode = cap
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .unwrap_or(Mode::Unknown);
    if mode == Mode::Unknown {
        return Err(Error::Missing("volume_capability.access_mode"));
    }
    let readonly =
        req.readonly || matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly);
    attributes(&req.volume_context, limits).map(|a| Publish {
        volume_id,
        target_path,
        namespace: a.namespace,
        chain: a.chain,
        pod_name: a.pod_name,
        pod_uid: a.pod_uid,
        size: a.size,
        medium: a.medium,
        readonly,
    })
}

struct Attributes {
    namespace: String,
    chain: String,
    pod_name: String,
    pod_uid: String,
    size: u64,
    medium: Medium,
}

fn attributes(ctx: &HashMap<String, String>, limits: Limits) -> Result<Attributes, Error> {
    for key in ctx.keys() {
        let known = [ATTR_CHAIN, ATTR_SIZE, ATTR_MEDIUM].contains(&key.as_str())
            || key.starts_with(CTX_KUBELET_PREFIX);
        if !known {
            return Err(Error::invalid(
                "volume attribute",
                key,
                "unknown (known: chain, size, medium)",
            ));
        }
    }
    if ctx.get(CTX_EPHEMERAL).is_some_and(|v| v != "true") {
        return Err(Error::invalid(
            CTX_EPHEMERAL,
            &ctx[CTX_EPHEMERAL],
            "only CSI ephemeral inline volumes are supported",
        ));
    }
    let get = |k: &'static str| ctx.get(k).map(String::as_str).unwrap_or_default();
    let chain = required(get(ATTR_CHAIN), "volume attribute chain")?;
    spright_endpoint::validate_chain(chain)
        .map_err(|e| Error::invalid("chain", chain, strip_value(&e.to_string())))?;
    let namespace = required(
        get(CTX_POD_NAMESPACE),
        "volume context csi.storage.k8s.io/pod.namespace (set podInfoOnMount)",
    )?;
    // Kubernetes namespaces are DNS-1123 labels too; the name becomes a path component.
    spright_endpoint::validate_chain(namespace)
        .map_err(|e| Error::invalid("pod namespace", namespace, strip_value(&e.to_string())))?;
    let pod_name = required(
        get(CTX_POD_NAME),
        "volume context csi.storage.k8s.io/pod.name (set podInfoOnMount)",
    )?;
    let size = match ctx.get(ATTR_SIZE) {
        None => limits.default_size,
        Some(s) => size::parse(s)?,
    };
    if size > limits.max_size {
        return Err(Error::TooLarge {
            requested: size::format(size),
            max: size::format(limits.max_size),
        });
    }
    let medium = match ctx.get(ATTR_MEDIUM).map(String::as_str) {
        None | Some("memory") => Medium::Memory,
        Some("hugepages") => Medium::Hugepages,
        Some(other) => {
            return Err(Error::invalid(
                "medium",
                other,
                "must be \"memory\" or \"hugepages\"",
            ));
        }
    };
    Ok(Attributes {
        namespace: namespace.to_owned(),
        chain: chain.to_owned(),
        pod_name: pod_name.to_owned(),
        pod_uid: get(CTX_POD_UID).to_owned(),
        size,
        medium,
    })
}

/// `validate_chain`'s message starts with `invalid chain name "x": `; keep the reason.
fn strip_value(msg: &str) -> String {
    msg.split_once(": ").map_or(msg, |(_, why)| why).to_owned()
}

/// NodeUnpublishVolume's arguments: (volume_id, target_path).
pub fn unpublish(req: &NodeUnpublishVolumeRequest) -> Result<(String, PathBuf), Error> {
    let volume_id = required(&req.volume_id, "volume_id")?.to_owned();
    Ok((volume_id, target_path(&req.target_path)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::{
        VolumeCapability,
        volume_capability::{AccessMode, MountVolume},
    };

    const LIMITS: Limits = Limits {
        default_size: 64 << 20,
        max_size: 1 << 30,
    };

    fn req(ctx: &[(&str, &str)]) -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: "csi-abc".into(),
            target_path: "/var/lib/kubelet/pods/u/volumes/x/mount".into(),
            volume_capability: Some(VolumeCapability {
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
                access_type: Some(AccessType::Mount(MountVolume::default())),
            }),
            volume_context: ctx
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }
    }

    const POD: [(&str, &str); 4] = [
        (CTX_POD_NAME, "fn-a"),
        (CTX_POD_NAMESPACE, "shop"),
        (CTX_POD_UID, "u-1"),
        (CTX_EPHEMERAL, "true"),
    ];

    fn with(extra: &[(&'static str, &'static str)]) -> NodePublishVolumeRequest {
        let mut all = POD.to_vec();
        all.extend_from_slice(extra);
        req(&all)
    }

    fn err(r: &NodePublishVolumeRequest) -> String {
        publish(r, LIMITS).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let p = publish(&with(&[("chain", "checkout")]), LIMITS).unwrap();
        assert_eq!(p.chain, "checkout");
        assert_eq!(p.namespace, "shop");
        assert_eq!(p.pod_uid, "u-1");
        assert_eq!(p.size, 64 << 20);
        assert_eq!(p.medium, Medium::Memory);
        assert!(!p.readonly);
        let p = publish(
            &with(&[("chain", "c"), ("size", "1Gi"), ("medium", "hugepages")]),
            LIMITS,
        )
        .unwrap();
        assert_eq!((p.size, p.medium), (1 << 30, Medium::Hugepages));
    }

    #[test]
    fn required_fields_first() {
        let mut r = with(&[("chain", "c")]);
        r.volume_id.clear();
        assert_eq!(err(&r), "missing required field volume_id");
        let mut r = with(&[("chain", "c")]);
        r.target_path.clear();
        assert_eq!(err(&r), "missing required field target_path");
        let mut r = with(&[("chain", "c")]);
        r.volume_capability = None;
        assert_eq!(err(&r), "missing required field volume_capability");
        assert!(err(&with(&[])).contains("volume attribute chain"));
        assert!(err(&req(&[("chain", "c")])).contains("pod.namespace"));
    }

    #[test]
    fn rejects_traversal_and_bad_names() {
        for bad in ["../x", "a/b", "..", "UPPER", "-a", "a_b", ""] {
            let e = publish(&with(&[("chain", bad)]), LIMITS).unwrap_err();
            assert_eq!(
                tonic::Status::from(e).code(),
                tonic::Code::InvalidArgument,
                "{bad}"
            );
        }
        assert!(err(&with(&[("chain", "../etc")])).contains("DNS-1123"));
        let mut r = with(&[("chain", "c")]);
        r.target_path = "relative/path".into();
        assert!(err(&r).contains("must be absolute"));
        r.target_path = "/a/../../etc".into();
        assert!(err(&r).contains("'..'"));
        let mut r = req(&[
            ("chain", "c"),
            (CTX_POD_NAME, "p"),
            (CTX_POD_NAMESPACE, "../.."),
        ]);
        r.volume_id = "v".into();
        assert!(err(&r).contains("pod namespace"));
    }

    #[test]
    fn rejects_bad_sizes_media_and_attributes() {
        assert!(err(&with(&[("chain", "c"), ("size", "64MB")])).contains("invalid size"));
        assert_eq!(
            err(&with(&[("chain", "c"), ("size", "2Gi")])),
            "size 2Gi exceeds this node's maximum 1Gi"
        );
        assert!(err(&with(&[("chain", "c"), ("size", "0")])).contains("invalid size"));
        assert!(err(&with(&[("chain", "c"), ("medium", "disk")])).contains("\"memory\""));
        assert!(err(&with(&[("chain", "c"), ("sise", "1Mi")])).contains("unknown"));
        assert!(err(&with(&[("chain", "c"), (CTX_EPHEMERAL, "false")])).contains("ephemeral"));
    }

    #[test]
    fn capability_checks() {
        let mut r = with(&[("chain", "c")]);
        r.volume_capability.as_mut().unwrap().access_type = Some(AccessType::Block(
            crate::csi::volume_capability::BlockVolume {},
        ));
        assert!(err(&r).contains("only mount access"));
        let mut r = with(&[("chain", "c")]);
        r.volume_capability.as_mut().unwrap().access_mode = None;
        assert!(err(&r).contains("access_mode"));
        let mut r = with(&[("chain", "c")]);
        r.volume_capability.as_mut().unwrap().access_mode = Some(AccessMode {
            mode: Mode::SingleNodeReaderOnly as i32,
        });
        assert!(publish(&r, LIMITS).unwrap().readonly);
    }

    #[test]
    fn difference_names_the_field() {
        let a = publish(&with(&[("chain", "c")]), LIMITS).unwrap();
        let mut b = a.clone();
        assert_eq!(a.difference(&b), None);
        b.size *= 2;
        assert_eq!(a.difference(&b), Some("size"));
    }
}
