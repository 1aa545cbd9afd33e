//! "Is pod P a member of chain C?" — asked of meshd (`/v1/members`), which
//! knows the CNI endpoint records; optionally answered from the records
//! themselves when meshd cannot be reached.

use std::{path::PathBuf, time::Duration};

use crate::error::Error;

/// Where membership answers come from.
#[derive(Clone, Debug)]
pub struct Membership {
    /// meshd's HTTP address (`host:port`).
    pub meshd_addr: String,
    /// The CNI state directory: read its endpoint records when meshd is unreachable.
    pub state_dir: Option<PathBuf>,
    pub timeout: Duration,
}

/// meshd's `/v1/members` answer (the fields this plugin reads).
#[derive(serde::Deserialize)]
struct Members {
    members: Vec<Member>,
}

#[derive(serde::Deserialize)]
struct Member {
    pod: String,
    #[serde(default)]
    uid: String,
}

/// A pod name matches; a uid is compared when both sides know it (a recreated
/// pod with the same name is a different pod).
fn matches(name: &str, uid: &str, pod: &str, pod_uid: &str) -> bool {
    name == pod && (uid.is_empty() || pod_uid.is_empty() || uid == pod_uid)
}

impl Membership {
    /// Blocking: call from a blocking context.
    pub fn check(
        &self,
        namespace: &str,
        chain: &str,
        pod: &str,
        pod_uid: &str,
    ) -> Result<(), Error> {
        let member = match self.ask_meshd(namespace, chain) {
            Ok(members) => members
                .iter()
                .any(|m| matches(&m.pod, &m.uid, pod, pod_uid)),
            Err(MeshdError::Unreachable(why)) if self.state_dir.is_some() => {
                tracing::warn!(meshd.addr = %self.meshd_addr, error = %why, "meshd unreachable, reading endpoint records");
                self.ask_records(namespace, chain, pod, pod_uid)?
            }
            Err(MeshdError::Unreachable(why) | MeshdError::Bad(why)) => {
                return Err(Error::MembershipUnavailable {
                    namespace: namespace.to_owned(),
                    chain: chain.to_owned(),
                    why,
                });
            }
        };
        if member {
            Ok(())
        } else {
            Err(Error::NotMember {
                namespace: namespace.to_owned(),
                chain: chain.to_owned(),
                pod: pod.to_owned(),
            })
        }
    }

    fn ask_meshd(&self, namespace: &str, chain: &str) -> Result<Vec<Member>, MeshdError> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        // Both names are validated DNS-1123 labels: nothing to escape.
        let url = format!(
            "http://{}/v1/members?namespace={namespace}&chain={chain}",
            self.meshd_addr
        );
        let mut resp = agent
            .get(&url)
            .call()
            .map_err(|e| MeshdError::Unreachable(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(MeshdError::Bad(format!("meshd answered {}", resp.status())));
        }
        resp.body_mut()
            .read_json::<Members>()
            .map(|m| m.members)
            .map_err(|e| MeshdError::Bad(format!("malformed answer from meshd: {e}")))
    }

    fn ask_records(
        &self,
        namespace: &str,
        chain: &str,
        pod: &str,
        pod_uid: &str,
    ) -> Result<bool, Error> {
        let dir = self.state_dir.as_deref().expect("checked by caller");
        let records = spright_endpoint::list(dir).map_err(|e| Error::MembershipUnavailable {
            namespace: namespace.to_owned(),
            chain: chain.to_owned(),
            why: format!("meshd unreachable and the records are unreadable: {e}"),
        })?;
        Ok(records
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .any(|r| {
                r.pod.namespace == namespace
                    && r.chain.as_deref() == Some(chain)
                    && matches(&r.pod.name, &r.pod.uid, pod, pod_uid)
            }))
    }
}

enum MeshdError {
    Unreachable(String),
    Bad(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_compared_only_when_known() {
        assert!(matches("a", "", "a", "u1"));
        assert!(matches("a", "u1", "a", ""));
        assert!(matches("a", "u1", "a", "u1"));
        assert!(!matches("a", "u1", "a", "u2"));
        assert!(!matches("b", "u1", "a", "u1"));
    }

    #[test]
    fn falls_back_to_records_only_when_configured() {
        let dir = tempfile::tempdir().unwrap();
        let rec = spright_endpoint::Record {
            version: spright_endpoint::RECORD_VERSION,
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/proc/1/ns/net".into(),
            network: "n".into(),
            ips: vec![],
            pod: spright_endpoint::PodRef {
                namespace: "shop".into(),
                name: "fn-a".into(),
                uid: String::new(),
            },
            chain: Some("checkout".into()),
            function: None,
            redirect: true,
            host_ifname: None,
            netns_cookie: None,
        };
        spright_endpoint::write(dir.path(), &rec).unwrap();
        // Port 1 on loopback: connection refused, i.e. meshd unreachable.
        let mut m = Membership {
            meshd_addr: "127.0.0.1:1".into(),
            state_dir: None,
            timeout: Duration::from_secs(2),
        };
        let e = m.check("shop", "checkout", "fn-a", "").unwrap_err();
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
        m.state_dir = Some(dir.path().to_path_buf());
        m.check("shop", "checkout", "fn-a", "u").unwrap();
        let e = m.check("shop", "checkout", "fn-b", "").unwrap_err();
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::PermissionDenied);
        let e = m.check("other", "checkout", "fn-a", "").unwrap_err();
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::PermissionDenied);
    }
}
