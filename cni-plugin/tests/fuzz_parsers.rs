//! Property tests of everything spright-cni reads from its caller: stdin
//! (the network config with `prevResult` and `runtimeConfig`), the `CNI_*`
//! environment and `CNI_ARGS`. Whatever arrives, the plugin answers in the
//! CNI's terms: a config is accepted or refused with a spec error code and a
//! message, never a panic; what is accepted parses again to the same thing.
//! `PROPTEST_CASES` sets the cases per run (`cargo xtask fuzz` for long runs);
//! a failure found is kept in `proptest-regressions/` and replayed by every
//! later run.

use proptest::prelude::*;
use serde_json::Value;
use spright_cni::{
    config::{self, Command, Config, Env},
    error::Error,
    version::CniResult,
};
use spright_endpoint::fuzzing::{bytes, json, object, text};

/// The names a network config uses (and a few it must not trip over).
const NETCONF: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "bridge",
    "mtu",
    "hairpinMode",
    "ipMasq",
    "nonMasqueradeCIDRs",
    "meshdReadyz",
    "ipam",
    "subnet",
    "ranges",
    "routes",
    "dst",
    "gw",
    "mode",
    "stateDir",
    "cgroup",
    "bpffs",
    "logFile",
    "runtimeConfig",
    "io.kubernetes.cri.pod-annotations",
    "spright.dev/chain",
    "spright.dev/function",
    "spright.dev/redirect",
    "prevResult",
    "cni.dev/valid-attachments",
    "containerID",
    "ifname",
    "capabilities",
    "interfaces",
    "ips",
    "address",
    "gateway",
    "interface",
    "sandbox",
    "mac",
    "dns",
    "nameservers",
];

/// The CNI spec's well-known codes plus spright's own (100+).
fn is_spec_code(code: u32) -> bool {
    matches!(code, 1..=7 | 11 | 50 | 51 | 100..=199)
}

fn refused_in_cni_terms(e: &Error) -> Result<(), TestCaseError> {
    prop_assert!(is_spec_code(e.code()), "code {} for {e}", e.code());
    let cni = serde_json::to_value(e.to_cni("1.1.0")).unwrap();
    prop_assert_eq!(cni["code"].as_u64(), Some(u64::from(e.code())));
    prop_assert!(
        !cni["msg"].as_str().unwrap_or_default().is_empty(),
        "{}",
        cni
    );
    Ok(())
}

/// A config that is mostly right: the required fields present, the rest
/// drawn from the vocabulary, so the validation past decoding is reached.
fn netconf() -> impl Strategy<Value = Value> {
    let version = prop_oneof![
        proptest::sample::select(spright_endpoint::CNI_VERSIONS).prop_map(str::to_owned),
        text(),
    ];
    let ipam = prop_oneof![
        json(NETCONF).prop_map(|extra| serde_json::json!({ "type": "host-local", "extra": extra })),
        json(NETCONF),
    ];
    (object(NETCONF), version, text(), ipam).prop_map(|(mut v, version, name, ipam)| {
        if let Value::Object(m) = &mut v {
            m.entry("cniVersion").or_insert(Value::String(version));
            m.entry("name").or_insert(Value::String(name));
            m.entry("type").or_insert("spright-cni".into());
            m.entry("ipam").or_insert(ipam);
        }
        v
    })
}

/// The generator is worth its cases only if it gets past decoding: a fixed
/// sample of configs must include accepted ones and each kind of refusal.
#[test]
fn configs_reach_acceptance_and_validation() {
    use proptest::strategy::ValueTree as _;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut ok, mut codes) = (0, std::collections::BTreeSet::new());
    for _ in 0..2000 {
        let v = netconf().new_tree(&mut runner).unwrap().current();
        match Config::from_input(v) {
            Ok(_) => ok += 1,
            Err(e) => {
                codes.insert(e.code());
            }
        }
    }
    assert!(
        ok >= 20,
        "only {ok} of 2000 generated configs were accepted"
    );
    for code in [1, 6, 7] {
        assert!(
            codes.contains(&code),
            "no refusal with code {code}: {codes:?}"
        );
    }
}

proptest! {
    #[test]
    fn configs_are_accepted_or_refused_with_a_spec_code(v in prop_oneof![netconf(), json(NETCONF)]) {
        match Config::from_input(v) {
            Ok(c) => {
                let again = Config::from_input(c.input.clone());
                prop_assert!(again.is_ok(), "{:?}", again.err());
                prop_assert_eq!(format!("{:?}", again.unwrap()), format!("{c:?}"));
            }
            Err(e) => refused_in_cni_terms(&e)?,
        }
    }

    #[test]
    fn stdin_bytes_are_accepted_or_refused_with_a_spec_code(b in bytes(NETCONF)) {
        if let Err(e) = Config::parse(&b) {
            refused_in_cni_terms(&e)?;
        }
    }

    /// A prevResult (or IPAM output) of any shape: parsed, or a decode
    /// error; what parses renders and parses back to the same result.
    #[test]
    fn results_round_trip(v in json(NETCONF)) {
        if let Ok(r) = CniResult::parse(&v) {
            let again = CniResult::parse(&r.to_json("1.1.0"));
            prop_assert_eq!(again.ok(), Some(r));
        }
    }

    #[test]
    fn cni_args_parse_or_name_the_variable(s in text(), pairs in proptest::collection::vec((text(), text()), 0..6)) {
        for input in [s, pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";")] {
            match config::parse_args(&input) {
                Ok(map) => {
                    for (k, v) in &map {
                        let pair = format!("{k}={v}");
                        prop_assert!(input.contains(&pair), "{} not in {}", pair, input);
                    }
                }
                Err(e) => {
                    refused_in_cni_terms(&e)?;
                    prop_assert!(e.to_string().contains("CNI_ARGS"), "{}", e);
                }
            }
        }
    }

    #[test]
    fn the_environment_is_read_or_named(
        command in proptest::sample::select(&["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"][..]),
        vars in proptest::collection::vec((proptest::sample::select(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"][..]), text()), 0..6),
    ) {
        let command = Command::parse(command).unwrap();
        let get = |name: &str| vars.iter().rev().find(|(k, _)| *k == name).map(|(_, v)| v.clone());
        match Env::from_vars(command, &get) {
            Ok(env) => {
                if matches!(command, Command::Add | Command::Check) {
                    prop_assert!(!env.container_id.is_empty() && !env.ifname.is_empty());
                }
            }
            Err(e) => {
                refused_in_cni_terms(&e)?;
                prop_assert!(e.to_string().contains("CNI_"), "{}", e);
            }
        }
    }

    #[test]
    fn commands_parse_or_name_the_variable(s in text()) {
        match Command::parse(&s) {
            Ok(c) => prop_assert_eq!(c.name(), s.as_str()),
            Err(e) => refused_in_cni_terms(&e)?,
        }
    }
}
