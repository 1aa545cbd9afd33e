//! What the self-test's syscall families mean for redirects on this node.
//!
//! A family the kernel's redirect path would lose data on, with nothing to
//! mitigate it (`unsafe`), turns redirects off for new connections unless
//! the admin accepted that family (`--accept-unsafe-families`): safety over
//! speed. A family the kernel serves itself (`same-as-tcp`) makes its
//! mitigation unnecessary, so the splice guard stands aside. A pure
//! function of the report and the flag; the agent writes the result into
//! the programs' `spr_config_v1`.

use serde::{Deserialize, Serialize};
use spright_endpoint::selftest::{Family, SAME_AS_TCP, SPLICE};

/// The node-wide decision.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    /// New connections are redirected.
    pub redirect: bool,
    /// Why they are not, in words (None when they are).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unsafe families the admin accepted (redirects stay on despite them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub accepted_unsafe: Vec<String>,
    /// The splice guard is needed (false when the kernel serves splice on
    /// the redirect path itself).
    pub splice_guard: bool,
}

/// The decision for `families` (the self-test's) and the families the
/// admin `accepted`.
pub fn decide(families: &[Family], accepted: &[String]) -> Policy {
    let (accepted_unsafe, refused): (Vec<&Family>, Vec<&Family>) = families
        .iter()
        .filter(|f| f.unsafe_here())
        .partition(|f| accepted.contains(&f.name));
    let splice_guard = !families
        .iter()
        .any(|f| f.name == SPLICE && f.verdict == SAME_AS_TCP);
    Policy {
        redirect: refused.is_empty(),
        reason: (!refused.is_empty()).then(|| {
            let names: Vec<&str> = refused.iter().map(|f| f.name.as_str()).collect();
            format!(
                "this kernel's redirect path loses {} data and nothing mitigates it here ({}); \
                 accept the risk with --accept-unsafe-families {} (ConfigMap key \
                 accept-unsafe-families)",
                names.join(", "),
                refused
                    .iter()
                    .map(|f| f.detail.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
                names.join(",")
            )
        }),
        accepted_unsafe: accepted_unsafe.iter().map(|f| f.name.clone()).collect(),
        splice_guard,
    }
}

#[cfg(test)]
mod tests {
    use spright_endpoint::selftest::{INCONCLUSIVE, MITIGATED, UNSAFE};

    use super::*;

    fn splice(verdict: &str) -> Vec<Family> {
        vec![Family {
            name: SPLICE.into(),
            verdict: verdict.into(),
            detail: "what the probe saw".into(),
        }]
    }

    #[test]
    fn an_unsafe_family_stops_redirects_unless_accepted() {
        let p = decide(&splice(UNSAFE), &[]);
        assert!(!p.redirect && p.splice_guard, "{p:?}");
        let why = p.reason.expect("a reason");
        assert!(
            why.contains("splice") && why.contains("--accept-unsafe-families splice"),
            "{why}"
        );
        let p = decide(&splice(UNSAFE), &["splice".into()]);
        assert!(p.redirect && p.reason.is_none(), "{p:?}");
        assert_eq!(p.accepted_unsafe, ["splice"]);
    }

    #[test]
    fn mitigated_or_unknown_families_keep_redirects() {
        for v in [MITIGATED, INCONCLUSIVE] {
            let p = decide(&splice(v), &[]);
            assert!(
                p.redirect && p.splice_guard && p.accepted_unsafe.is_empty(),
                "{v}: {p:?}"
            );
        }
        assert!(
            decide(&[], &[]).redirect,
            "a disabled self-test decides nothing"
        );
    }

    #[test]
    fn a_kernel_that_serves_splice_needs_no_guard() {
        let p = decide(&splice(SAME_AS_TCP), &[]);
        assert!(p.redirect && !p.splice_guard, "{p:?}");
    }
}
