//! Privileged tier: a 2-minute soak with churn (`spright_tests::soak`; the
//! long run is `cargo xtask soak --minutes N`). The chain stays under
//! steady, verified load while pods join, leave and opt out, meshd is
//! SIGKILLed and restarted, the programs are swapped in place and the
//! Service's backends change. Every step is graceful, so plain TCP would
//! show no error: the run must show none either, the maps must match the
//! live pods after every step, the sockhash must drain back to its size
//! before the load, and nothing may be left after every pod is deleted.
//! No assertion is about speed.

use spright_tests::{privileged, soak};

#[test]
fn privileged_soak_with_churn() {
    if !privileged::require("privileged_soak_with_churn") {
        return;
    }
    let spec = soak::Spec {
        seconds: 120,
        connections: 4,
        payload: 1024,
        rate: 200,
        step_secs: 9,
        process_groups: false,
    };
    let report = soak::run(&spec, &mut |l| eprintln!("{l}")).expect("the soak ran to its end");
    let table = soak::markdown(&report);
    eprintln!("{table}");
    // Every kind of step ran at least once.
    for kind in soak::SCHEDULE {
        assert!(
            report.steps.iter().any(|s| s.kind == kind),
            "no {} step in the run:\n{table}",
            kind.name()
        );
    }
    assert!(report.totals.requests > 0, "{table}");
    let problems = report.problems();
    assert!(problems.is_empty(), "{}\n{table}", report.verdict());
}
