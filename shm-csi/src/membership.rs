//! "Is pod P (uid U) a member of chain C?" — asked of meshd
//! (`spright_endpoint::membership`), which knows this node's Pod objects and
//! the CNI endpoint records; answered from the same files by the same rule
//! when meshd cannot be reached and `--state-dir` is set.
//!
//! Kubelet publishes a pod's volumes before its sandbox exists, so a pod is
//! often asked about moments after it was scheduled: while the answer is
//! "unknown" (meshd's watch has not seen the Pod yet) or names an older pod
//! of the same name, the question is asked again for up to `wait`, then
//! refused with the reason.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use spright_endpoint::membership::{self, Answer, Query, Verdict};

use crate::error::Error;

/// How often an unsettled answer is asked again within `wait`.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// Where membership answers come from.
#[derive(Clone, Debug)]
pub struct Membership {
    /// meshd's HTTP address (`host:port`).
    pub meshd_addr: String,
    /// The CNI state directory: while meshd is unreachable, decide from its
    /// endpoint records and its `pods/` files.
    pub state_dir: Option<PathBuf>,
    /// This node's name (a pod bound to another node is refused).
    pub node: Option<String>,
    /// Timeout of one question to meshd.
    pub timeout: Duration,
    /// How long an unknown pod may take to become known.
    pub wait: Duration,
}

impl Membership {
    /// Blocking: call from a blocking context.
    pub fn check(&self, q: &Query) -> Result<(), Error> {
        let deadline = Instant::now() + self.wait;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let mut warned = false;
        loop {
            let answer = self.ask(&agent, q, &mut warned)?;
            if answer.verdict.is_member() {
                tracing::debug!(reason = %answer.reason, "member");
                return Ok(());
            }
            if !answer.verdict.may_change() || Instant::now() >= deadline {
                return Err(Error::NotMember {
                    namespace: q.namespace.clone(),
                    chain: q.chain.clone(),
                    pod: q.pod.clone(),
                    reason: answer.reason,
                });
            }
            std::thread::sleep(RETRY_EVERY.min(deadline.saturating_duration_since(Instant::now())));
        }
    }

    /// One answer: meshd's, or the files' when meshd is unreachable (said
    /// once per check, in `warned`).
    fn ask(&self, agent: &ureq::Agent, q: &Query, warned: &mut bool) -> Result<Answer, Error> {
        match self.ask_meshd(agent, q) {
            Ok(a) => Ok(a),
            Err(MeshdError::Unreachable(why)) if self.state_dir.is_some() => {
                if !std::mem::replace(warned, true) {
                    tracing::warn!(meshd.addr = %self.meshd_addr, error = %why, "meshd unreachable, deciding from the records and Pod files");
                }
                Ok(Answer::new(q, self.ask_files(q)?))
            }
            Err(MeshdError::Unreachable(why) | MeshdError::Bad(why)) => {
                Err(Error::MembershipUnavailable {
                    namespace: q.namespace.clone(),
                    chain: q.chain.clone(),
                    why,
                })
            }
        }
    }

    fn ask_meshd(&self, agent: &ureq::Agent, q: &Query) -> Result<Answer, MeshdError> {
        let url = format!(
            "http://{}{}?{}",
            self.meshd_addr,
            membership::PATH,
            q.query_string()
        );
        let mut resp = agent
            .get(&url)
            .call()
            .map_err(|e| MeshdError::Unreachable(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(MeshdError::Bad(format!("meshd answered {}", resp.status())));
        }
        resp.body_mut()
            .read_json::<Answer>()
            .map_err(|e| MeshdError::Bad(format!("malformed answer from meshd: {e}")))
    }

    /// The same decision as meshd's, from the state directory's files.
    fn ask_files(&self, q: &Query) -> Result<Verdict, Error> {
        let dir = self.state_dir.as_deref().expect("checked by caller");
        let unavailable = |why: String| Error::MembershipUnavailable {
            namespace: q.namespace.clone(),
            chain: q.chain.clone(),
            why,
        };
        let records: Vec<_> = spright_endpoint::list(dir)
            .map_err(|e| {
                unavailable(format!(
                    "meshd unreachable and the records are unreadable: {e}"
                ))
            })?
            .into_iter()
            .filter_map(|(_, r)| r.ok())
            .collect();
        let (pods, _) = spright_endpoint::pod::read_dir(&dir.join(spright_endpoint::PODS_SUBDIR));
        Ok(membership::decide(q, self.node.as_deref(), &pods, &records))
    }
}

enum MeshdError {
    Unreachable(String),
    Bad(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(ns: &str, pod: &str, uid: &str) -> Query {
        Query {
            namespace: ns.into(),
            pod: pod.into(),
            uid: uid.into(),
            chain: "checkout".into(),
        }
    }

    #[test]
    fn falls_back_to_the_files_only_when_configured() {
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
        let pods = dir.path().join("pods");
        std::fs::create_dir(&pods).unwrap();
        std::fs::write(
            pods.join("fn-b.json"),
            r#"{"kind":"Pod","metadata":{"name":"fn-b","namespace":"shop","uid":"u-b",
               "annotations":{"spright.dev/chain":"checkout"}},"spec":{"nodeName":"n1"}}"#,
        )
        .unwrap();
        // Port 1 on loopback: connection refused, i.e. meshd unreachable.
        let mut m = Membership {
            meshd_addr: "127.0.0.1:1".into(),
            state_dir: None,
            node: Some("n1".into()),
            timeout: Duration::from_secs(2),
            wait: Duration::ZERO,
        };
        let e = m.check(&q("shop", "fn-a", "")).unwrap_err();
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unavailable);
        m.state_dir = Some(dir.path().to_path_buf());
        m.check(&q("shop", "fn-a", "u")).unwrap();
        // A Pod file admits a pod before any record exists.
        m.check(&q("shop", "fn-b", "u-b")).unwrap();
        let e = tonic::Status::from(m.check(&q("shop", "fn-b", "u-other")).unwrap_err());
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("uid u-b"), "{}", e.message());
        let e = m.check(&q("shop", "fn-c", "")).unwrap_err();
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::PermissionDenied);
        let e = m.check(&q("other", "fn-a", "")).unwrap_err();
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn an_unknown_pod_is_asked_about_again_until_the_wait_ends() {
        let dir = tempfile::tempdir().unwrap();
        let m = Membership {
            meshd_addr: "127.0.0.1:1".into(),
            state_dir: Some(dir.path().to_path_buf()),
            node: None,
            timeout: Duration::from_secs(1),
            wait: Duration::from_millis(600),
        };
        let pods = dir.path().join("pods");
        std::fs::create_dir(&pods).unwrap();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(250));
            std::fs::write(
                pods.join("late.json"),
                r#"{"kind":"Pod","metadata":{"name":"late","namespace":"shop",
                   "annotations":{"spright.dev/chain":"checkout"}}}"#,
            )
            .unwrap();
        });
        m.check(&q("shop", "late", "")).unwrap();
        late.join().unwrap();
        let e = tonic::Status::from(m.check(&q("shop", "never", "")).unwrap_err());
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("not known"), "{}", e.message());
    }
}
