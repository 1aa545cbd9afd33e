//! "Is this pod in chain C?": the question shm-csi asks meshd before it
//! mounts a chain's shared memory, the answer, and the one function that
//! decides it (meshd answers with it; shm-csi uses it on the files when
//! meshd is unreachable).
//!
//! Kubelet publishes a pod's volumes *before* it creates the sandbox (CNI
//! ADD), so the Pod object decides: `volume_context` carries the pod's
//! namespace, name and uid, and the Pod (from the API, or from a file in
//! meshd's pods directory) carries its chain annotation and node. The
//! endpoint records that ADD writes answer only for pods no Pod source
//! knows (runtimes without a kubelet, such as podman).

use serde::{Deserialize, Serialize};

use crate::{Record, pod::PodInfo};

/// Path of meshd's answer: `GET /v1/membership?namespace=&pod=&uid=&chain=`.
pub const PATH: &str = "/v1/membership";

/// The question. Names are DNS labels or subdomains and uids are UUIDs, so
/// none needs escaping in a query string (`query_string` checks).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    pub namespace: String,
    pub pod: String,
    /// May be empty when the caller does not know it.
    #[serde(default)]
    pub uid: String,
    pub chain: String,
}

impl Query {
    /// `namespace=…&pod=…&uid=…&chain=…`, each value percent-encoded
    /// where it holds anything outside `[A-Za-z0-9._-]`.
    pub fn query_string(&self) -> String {
        format!(
            "namespace={}&pod={}&uid={}&chain={}",
            encode(&self.namespace),
            encode(&self.pod),
            encode(&self.uid),
            encode(&self.chain)
        )
    }
}

fn encode(s: &str) -> String {
    use std::fmt::Write as _;
    s.bytes()
        .fold(String::with_capacity(s.len()), |mut out, b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02X}");
            }
            out
        })
}

/// Which source said a pod is a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    /// The Pod object (API or pods directory).
    Pod,
    /// An endpoint record (no Pod object is known for it).
    Record,
}

/// The verdict, with what the refusal is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "camelCase")]
pub enum Verdict {
    Member {
        source: Source,
    },
    /// The pod is known and is in another chain, or in none.
    #[serde(rename_all = "camelCase")]
    NotInChain {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod_chain: Option<String>,
    },
    /// A pod of that name exists with another uid (deleted and recreated).
    #[serde(rename_all = "camelCase")]
    UidMismatch {
        known_uid: String,
    },
    /// The pod is bound to another node.
    OtherNode {
        node: String,
    },
    /// No source knows the pod (yet: the watch may lag behind the API).
    Unknown,
}

impl Verdict {
    pub fn is_member(&self) -> bool {
        matches!(self, Self::Member { .. })
    }

    /// Whether waiting can change the answer: a pod that is not known yet,
    /// or whose older namesake is still all meshd has seen.
    pub fn may_change(&self) -> bool {
        matches!(self, Self::Unknown | Self::UidMismatch { .. })
    }

    /// Why, in words, for logs and gRPC messages.
    pub fn reason(&self, q: &Query) -> String {
        let pod = format!("{}/{}", q.namespace, q.pod);
        match self {
            Self::Member {
                source: Source::Pod,
            } => {
                format!("pod {pod} is annotated into chain {}", q.chain)
            }
            Self::Member {
                source: Source::Record,
            } => format!(
                "pod {pod} was attached to chain {} (endpoint record; no Pod object known)",
                q.chain
            ),
            Self::NotInChain { pod_chain: None } => {
                format!("pod {pod} has no spright.dev/chain annotation")
            }
            Self::NotInChain { pod_chain: Some(c) } => {
                format!("pod {pod} is in chain {c}, not {}", q.chain)
            }
            Self::UidMismatch { known_uid } => format!(
                "pod {pod} has uid {known_uid}, the volume was asked for uid {}",
                q.uid
            ),
            Self::OtherNode { node } => format!("pod {pod} is bound to node {node}"),
            Self::Unknown => format!("pod {pod} is not known on this node"),
        }
    }
}

/// The answer of `GET /v1/membership`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    #[serde(flatten)]
    pub verdict: Verdict,
    /// `Verdict::reason`, for humans.
    pub reason: String,
}

impl Answer {
    pub fn new(q: &Query, verdict: Verdict) -> Self {
        Self {
            reason: verdict.reason(q),
            verdict,
        }
    }
}

/// Decides `q` from the Pod objects this node knows (`pods`), this node's
/// name (`node`, when known) and the endpoint records.
///
/// The Pod object wins when there is one: its uid must match, it must be
/// bound to this node, and its annotation must name the chain. Without a
/// Pod, a record of that pod in that chain (written by ADD) admits it.
pub fn decide<'a>(
    q: &Query,
    node: Option<&str>,
    pods: impl IntoIterator<Item = &'a PodInfo>,
    records: &[Record],
) -> Verdict {
    let named = |ns: &str, name: &str| ns == q.namespace && name == q.pod;
    if let Some(p) = pods.into_iter().find(|p| named(&p.namespace, &p.name)) {
        if !p.same_pod(&q.uid) {
            return Verdict::UidMismatch {
                known_uid: p.uid.clone(),
            };
        }
        if let (Some(ours), Some(theirs)) = (node, p.node_name.as_deref())
            && ours != theirs
        {
            return Verdict::OtherNode {
                node: theirs.to_owned(),
            };
        }
        return if p.in_chain(&q.chain) {
            Verdict::Member {
                source: Source::Pod,
            }
        } else {
            Verdict::NotInChain {
                pod_chain: p.annotated.chain.clone(),
            }
        };
    }
    let same_pod = |r: &&Record| {
        named(&r.pod.namespace, &r.pod.name)
            && (r.pod.uid.is_empty() || q.uid.is_empty() || r.pod.uid == q.uid)
    };
    let mine: Vec<&Record> = records.iter().filter(same_pod).collect();
    if mine
        .iter()
        .any(|r| r.chain.as_deref() == Some(q.chain.as_str()))
    {
        Verdict::Member {
            source: Source::Record,
        }
    } else if let Some(r) = mine.first() {
        Verdict::NotInChain {
            pod_chain: r.chain.clone(),
        }
    } else {
        Verdict::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PodRef, RECORD_VERSION, pod::Annotated};

    fn pod(name: &str, uid: &str, node: &str, chain: Option<&str>) -> PodInfo {
        PodInfo {
            namespace: "shop".into(),
            name: name.into(),
            uid: uid.into(),
            node_name: Some(node.into()),
            annotated: Annotated {
                chain: chain.map(str::to_owned),
                function: None,
                redirect: true,
                preload: false,
            },
            terminating: false,
        }
    }

    fn record(name: &str, uid: &str, chain: Option<&str>) -> Record {
        Record {
            version: RECORD_VERSION,
            container_id: format!("c-{name}"),
            ifname: "eth0".into(),
            netns: "/proc/1/ns/net".into(),
            network: "n".into(),
            ips: vec![],
            pod: PodRef {
                namespace: "shop".into(),
                name: name.into(),
                uid: uid.into(),
            },
            chain: chain.map(str::to_owned),
            function: None,
            redirect: true,
            host_ifname: None,
            netns_cookie: None,
        }
    }

    fn q(pod: &str, uid: &str, chain: &str) -> Query {
        Query {
            namespace: "shop".into(),
            pod: pod.into(),
            uid: uid.into(),
            chain: chain.into(),
        }
    }

    #[test]
    fn the_pod_object_decides_before_any_record_exists() {
        let pods = [
            pod("a", "u-a", "n1", Some("checkout")),
            pod("b", "u-b", "n1", None),
            pod("c", "u-c", "n2", Some("checkout")),
        ];
        let d = |query: &Query| decide(query, Some("n1"), &pods, &[]);
        assert_eq!(
            d(&q("a", "u-a", "checkout")),
            Verdict::Member {
                source: Source::Pod
            }
        );
        assert_eq!(
            d(&q("a", "u-a", "other")),
            Verdict::NotInChain {
                pod_chain: Some("checkout".into())
            }
        );
        assert_eq!(
            d(&q("b", "u-b", "checkout")),
            Verdict::NotInChain { pod_chain: None }
        );
        assert_eq!(
            d(&q("a", "u-new", "checkout")),
            Verdict::UidMismatch {
                known_uid: "u-a".into()
            }
        );
        assert_eq!(
            d(&q("c", "u-c", "checkout")),
            Verdict::OtherNode { node: "n2".into() }
        );
        assert_eq!(d(&q("zz", "u", "checkout")), Verdict::Unknown);
        // Without a node name of its own, meshd cannot tell nodes apart.
        assert!(decide(&q("c", "u-c", "checkout"), None, &pods, &[]).is_member());
    }

    #[test]
    fn records_answer_only_for_pods_without_an_object() {
        let records = [
            record("r", "", Some("checkout")),
            record("a", "u-a", Some("checkout")),
        ];
        // The Pod was edited after ADD: the Pod wins.
        let pods = [pod("a", "u-a", "n1", None)];
        assert_eq!(
            decide(&q("r", "u-r", "checkout"), None, &pods, &records),
            Verdict::Member {
                source: Source::Record
            }
        );
        assert_eq!(
            decide(&q("a", "u-a", "checkout"), None, &pods, &records),
            Verdict::NotInChain { pod_chain: None }
        );
        assert_eq!(
            decide(&q("r", "u-r", "other"), None, &pods, &records),
            Verdict::NotInChain {
                pod_chain: Some("checkout".into())
            }
        );
        let recreated = [record("x", "u-old", Some("checkout"))];
        assert_eq!(
            decide(&q("x", "u-new", "checkout"), None, &pods, &recreated),
            Verdict::Unknown
        );
    }

    #[test]
    fn answers_round_trip_and_say_why() {
        let query = q("a", "u-a", "checkout");
        for v in [
            Verdict::Member {
                source: Source::Record,
            },
            Verdict::NotInChain {
                pod_chain: Some("x".into()),
            },
            Verdict::UidMismatch {
                known_uid: "u".into(),
            },
            Verdict::OtherNode { node: "n".into() },
            Verdict::Unknown,
        ] {
            let a = Answer::new(&query, v);
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(serde_json::from_str::<Answer>(&json).unwrap(), a, "{json}");
            assert!(a.reason.contains("shop/a"), "{}", a.reason);
        }
        assert!(
            Verdict::Unknown.may_change() && !Verdict::OtherNode { node: "n".into() }.may_change()
        );
    }

    #[test]
    fn query_strings_escape_what_needs_it() {
        let mut query = q("a.b-c", "0f6c-11", "checkout");
        assert_eq!(
            query.query_string(),
            "namespace=shop&pod=a.b-c&uid=0f6c-11&chain=checkout"
        );
        query.pod = "a&b=c".into();
        assert!(query.query_string().contains("pod=a%26b%3Dc"));
    }
}
