//! meshd's start-up self-test report, as meshd publishes it in the state
//! directory (`selftest.json`) and spright-cni's STATUS reads it.

use std::{io, path::Path};

use serde::{Deserialize, Serialize};

/// File in the state directory holding the report.
pub const FILE: &str = "selftest.json";

/// What the self-test found: does this kernel's redirect path return
/// EAGAIN from a blocking `recv()`? Fields missing from a published report
/// (an older meshd) read as their defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    /// `affected`, `not-affected`, `inconclusive` or `disabled`.
    pub verdict: String,
    pub trials: u64,
    /// Trials in which a blocking `recv()` returned EAGAIN.
    pub eagain_trials: u64,
    /// Messages the private datapath redirected (proves the test was valid).
    pub redirected_msgs: u64,
    pub detail: Option<String>,
    /// Syscall families probed on the redirect path, each with its verdict
    /// (empty in reports of an older meshd).
    pub families: Vec<Family>,
    /// Whether bytes redirected into a socket that does not read are
    /// charged to its receive memory (`sk_rmem_alloc`), which both memory
    /// bounds read: `Some(false)` means no bound can be enforced on this
    /// kernel; `None` when not probed (no kernel bound to probe with).
    pub rmem_charged: Option<bool>,
    /// What the memory-bound probe saw, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rmem_detail: Option<String>,
}

/// What a syscall family does on this kernel's redirect path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Family {
    /// `splice` (`splice()`/`sendfile()` from a redirected socket).
    pub name: String,
    /// [`SAME_AS_TCP`], [`MITIGATED`], [`UNSAFE`] or [`INCONCLUSIVE`].
    pub verdict: String,
    /// What the probe saw, in words.
    pub detail: String,
}

/// The family behaves as over TCP on the redirect path.
pub const SAME_AS_TCP: &str = "same-as-tcp";
/// The kernel would lose data, and spright makes the call fail in a way
/// callers handle (the splice guard's EINVAL).
pub const MITIGATED: &str = "mitigated";
/// The kernel would lose data and nothing mitigates it here: meshd redirects
/// no new connection unless the admin accepts the family.
pub const UNSAFE: &str = "unsafe";
/// The probe could not tell (its traffic was not redirected, or it failed).
pub const INCONCLUSIVE: &str = "inconclusive";
/// The family `splice`.
pub const SPLICE: &str = "splice";

impl Family {
    /// Whether redirecting on this kernel can lose this family's data.
    pub fn unsafe_here(&self) -> bool {
        self.verdict == UNSAFE
    }
}

impl Report {
    pub fn inconclusive(detail: String) -> Self {
        Self {
            verdict: "inconclusive".into(),
            detail: Some(detail),
            ..Self::default()
        }
    }

    pub fn disabled() -> Self {
        Self {
            verdict: "disabled".into(),
            ..Self::default()
        }
    }

    /// The metrics gauge: 1 affected, 0 not affected, -1 unknown.
    pub fn gauge(&self) -> i64 {
        match self.verdict.as_str() {
            "affected" => 1,
            "not-affected" => 0,
            _ => -1,
        }
    }

    /// One line for STATUS and logs.
    pub fn summary(&self) -> String {
        format!(
            "kernel self-test (blocking recv EAGAIN on the redirect path): {} ({} of {} trials)",
            self.verdict, self.eagain_trials, self.trials
        )
    }
}

/// Publishes `report` in `state_dir`, atomically.
pub fn publish(state_dir: &Path, report: &Report) -> io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let body = serde_json::to_vec_pretty(report).expect("reports serialise");
    crate::write_atomic(&state_dir.join(FILE), &body, 0o644)
}

/// The published report; `None` when meshd has not published one (or it is
/// unreadable).
pub fn read(state_dir: &Path) -> Option<Report> {
    let body = std::fs::read(state_dir.join(FILE)).ok()?;
    serde_json::from_slice(&body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_reports_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        let r = Report {
            verdict: "affected".into(),
            trials: 10,
            eagain_trials: 10,
            redirected_msgs: 40,
            detail: None,
            families: vec![Family {
                name: SPLICE.into(),
                verdict: MITIGATED.into(),
                detail: "EINVAL".into(),
            }],
            rmem_charged: Some(true),
            rmem_detail: None,
        };
        publish(&dir.path().join("state"), &r).unwrap();
        assert_eq!(read(&dir.path().join("state")), Some(r.clone()));
        assert!(r.summary().contains("affected (10 of 10 trials)"));
        assert_eq!(r.gauge(), 1);
        assert_eq!(Report::disabled().gauge(), -1);
        // A report with fewer fields still reads.
        std::fs::write(
            dir.path().join(FILE),
            r#"{"verdict":"affected","trials":2}"#,
        )
        .unwrap();
        assert_eq!(read(dir.path()).unwrap().trials, 2);
    }
}
