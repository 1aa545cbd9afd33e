//! Everything the runtime hands the plugin: the `CNI_*` environment and the
//! network configuration on stdin. Every name is a constant here; errors name
//! the variable or key and the bad value. Unknown config keys are ignored
//! (SPEC.md: plugins must ignore fields they do not understand).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;
use spright_endpoint::{CNI_ARG_CHAIN, DEFAULT_POD_NAMESPACE, DEFAULT_STATE_DIR, PodRef};

use crate::{
    error::{Error, Result},
    version::Version,
};

pub const ENV_COMMAND: &str = "CNI_COMMAND";
pub const ENV_CONTAINERID: &str = "CNI_CONTAINERID";
pub const ENV_NETNS: &str = "CNI_NETNS";
pub const ENV_IFNAME: &str = "CNI_IFNAME";
pub const ENV_ARGS: &str = "CNI_ARGS";
pub const ENV_PATH: &str = "CNI_PATH";

pub const ARG_POD_NAMESPACE: &str = "K8S_POD_NAMESPACE";
pub const ARG_POD_NAME: &str = "K8S_POD_NAME";
pub const ARG_POD_UID: &str = "K8S_POD_UID";

/// runtimeConfig key under which containerd passes pod annotations.
pub const CAP_POD_ANNOTATIONS: &str = spright_endpoint::CAP_POD_ANNOTATIONS;
/// GC input: the attachments the runtime still knows.
pub const GC_VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";

pub const DEFAULT_BRIDGE: &str = "spright0";
/// Linux IFNAMSIZ - 1.
pub const MAX_IFNAME_LEN: usize = 15;
/// IPv6 needs 1280; Linux allows 68 for IPv4 only, but pods here may get both.
pub const MIN_MTU: u32 = 576;
pub const MAX_MTU: u32 = 65_535;

/// The CNI command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            other => {
                return Err(Error::InvalidEnv {
                    name: ENV_COMMAND,
                    value: other.to_owned(),
                    why: "expected ADD, DEL, CHECK, VERSION, STATUS or GC".into(),
                });
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Version => "VERSION",
            Self::Status => "STATUS",
            Self::Gc => "GC",
        }
    }
}

/// The `CNI_*` environment of one invocation.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
    pub path: String,
}

impl Env {
    /// Reads the variables `command` needs (SPEC.md "Parameters": ADD/CHECK
    /// need all four; DEL may omit CNI_NETNS; STATUS/GC need none).
    pub fn from_vars(command: Command, get: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let required = |name: &'static str| {
            get(name)
                .filter(|v| !v.is_empty())
                .ok_or(Error::MissingEnv { name })
        };
        let mut env = Self {
            path: get(ENV_PATH).unwrap_or_default(),
            ..Self::default()
        };
        match command {
            Command::Add | Command::Check => {
                env.container_id = required(ENV_CONTAINERID)?;
                env.netns = required(ENV_NETNS)?;
                env.ifname = required(ENV_IFNAME)?;
            }
            Command::Del => {
                env.container_id = required(ENV_CONTAINERID)?;
                env.ifname = required(ENV_IFNAME)?;
                env.netns = get(ENV_NETNS).unwrap_or_default();
            }
            Command::Version | Command::Status | Command::Gc => {}
        }
        if !env.ifname.is_empty() {
            validate_ifname(ENV_IFNAME, &env.ifname).map_err(|why| Error::InvalidEnv {
                name: ENV_IFNAME,
                value: env.ifname.clone(),
                why,
            })?;
        }
        if let Some(args) = get(ENV_ARGS) {
            env.args = parse_args(&args)?;
        }
        Ok(env)
    }
}

/// Parses `CNI_ARGS` (`K=V;K=V`).
pub fn parse_args(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| Error::InvalidEnv {
            name: ENV_ARGS,
            value: s.to_owned(),
            why: format!("{pair:?} is not KEY=VALUE"),
        })?;
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// Interface name rules of Linux (dev_valid_name).
pub fn validate_ifname(_what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_IFNAME_LEN {
        return Err(format!("must be 1 to {MAX_IFNAME_LEN} bytes"));
    }
    if name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        return Err("must not be '.', '..' or contain '/', ':' or whitespace".into());
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Bridge,
    Chained,
}

/// The plugin's network configuration (one entry of a conflist, with the
/// runtime's `name`, `cniVersion`, `runtimeConfig` and `prevResult` added),
/// as deserialised; only [`Config`] is used outside this module.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    bridge: Option<String>,
    #[serde(default)]
    mtu: Option<i64>,
    #[serde(default)]
    hairpin_mode: bool,
    #[serde(default)]
    ip_masq: bool,
    /// Destinations `ipMasq` leaves alone besides the pod's own subnet: the
    /// cluster's pod CIDRs, so pods on other nodes see the real source (the
    /// name ip-masq-agent uses).
    #[serde(default, rename = "nonMasqueradeCIDRs")]
    non_masquerade_cidrs: Vec<String>,
    /// meshd's local API (`HOST:PORT`): when set, STATUS reports the network
    /// not available until meshd's `/readyz` answers (primary mode, where
    /// spright is the node's network; install-cni sets it there only).
    #[serde(default)]
    meshd_readyz: Option<String>,
    #[serde(default)]
    ipam: Option<Value>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    cgroup: Option<PathBuf>,
    #[serde(default)]
    bpffs: Option<PathBuf>,
    #[serde(default)]
    log_file: Option<PathBuf>,
    #[serde(default)]
    runtime_config: Option<Value>,
    #[serde(default)]
    prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments", default)]
    valid_attachments: Option<Vec<Attachment>>,
}

/// One entry of `cni.dev/valid-attachments`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration, parsed once and validated: the typed fields
/// the plugin reads, and the document itself (`input`) only to pass on to
/// the IPAM plugin it delegates to.
#[derive(Clone, Debug)]
pub struct Config {
    /// The configuration as the runtime sent it.
    pub input: Value,
    pub cni_version: String,
    /// The network's name (conflist `name`).
    pub name: String,
    pub hairpin_mode: bool,
    pub ip_masq: bool,
    /// Destinations not masqueraded (besides the pod's subnet).
    pub non_masquerade_cidrs: Vec<IpNet>,
    /// meshd's API whose readiness STATUS requires (`meshdReadyz`).
    pub meshd_readyz: Option<std::net::SocketAddr>,
    /// The previous plugin's result (chained mode, CHECK, DEL).
    pub prev_result: Option<Value>,
    /// Pod annotations the runtime passed (`runtimeConfig`), by key.
    pub annotations: BTreeMap<String, String>,
    pub log_file: Option<PathBuf>,
    /// GC: the attachments the runtime still knows.
    pub valid_attachments: Option<Vec<Attachment>>,
    pub version: Version,
    pub mode: Mode,
    pub bridge: String,
    pub mtu: Option<u32>,
    pub ipam_type: Option<String>,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    pub cgroup: Option<PathBuf>,
}

impl Config {
    /// Parses and validates the stdin config (bytes). Everything is
    /// validated before any side effect.
    pub fn parse(stdin: &[u8]) -> Result<Self> {
        Self::from_input(serde_json::from_slice(stdin).map_err(Error::Decode)?)
    }

    /// Validates the stdin config, already parsed as JSON once.
    pub fn from_input(input: Value) -> Result<Self> {
        let raw = NetConf::deserialize(&input).map_err(Error::Decode)?;
        let version = Version::supported(&raw.cni_version)?;
        // Without an explicit mode, a prevResult and no `ipam` means "after
        // another plugin". A prevResult alone does not: runtimes also pass
        // one to the first plugin of a list on CHECK and DEL.
        let mode = match raw.mode.as_deref() {
            Some("chained") => Mode::Chained,
            None if raw.prev_result.is_some() && raw.ipam.is_none() => Mode::Chained,
            None | Some("bridge") => Mode::Bridge,
            Some(other) => {
                return Err(Error::UnsupportedField {
                    field: "mode",
                    value: other.to_owned(),
                });
            }
        };
        let bridge = raw
            .bridge
            .clone()
            .unwrap_or_else(|| DEFAULT_BRIDGE.to_owned());
        validate_ifname("bridge", &bridge).map_err(|why| Error::InvalidConfig {
            field: "bridge",
            why: format!("{bridge:?} {why}"),
        })?;
        let mtu = match raw.mtu {
            None | Some(0) => None,
            Some(m) if (i64::from(MIN_MTU)..=i64::from(MAX_MTU)).contains(&m) => {
                Some(u32::try_from(m).expect("in range"))
            }
            Some(m) => {
                return Err(Error::InvalidConfig {
                    field: "mtu",
                    why: format!("{m} is outside {MIN_MTU}..={MAX_MTU}"),
                });
            }
        };
        let ipam_type = match &raw.ipam {
            None => None,
            Some(ipam) => match ipam.get("type").and_then(Value::as_str) {
                Some(t) if !t.is_empty() && !t.contains('/') => Some(t.to_owned()),
                _ => {
                    return Err(Error::InvalidConfig {
                        field: "ipam.type",
                        why: "must name a plugin on CNI_PATH".into(),
                    });
                }
            },
        };
        let non_masquerade_cidrs = raw
            .non_masquerade_cidrs
            .iter()
            .map(|c| {
                c.parse::<IpNet>().map_err(|e| Error::InvalidConfig {
                    field: "nonMasqueradeCIDRs",
                    why: format!("{c:?} is not a CIDR: {e}"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let meshd_readyz = raw
            .meshd_readyz
            .as_deref()
            .map(|a| {
                a.parse().map_err(|e| Error::InvalidConfig {
                    field: "meshdReadyz",
                    why: format!("{a:?} is not HOST:PORT: {e}"),
                })
            })
            .transpose()?;
        if mode == Mode::Bridge && ipam_type.is_none() {
            return Err(Error::InvalidConfig {
                field: "ipam",
                why: "bridge mode needs an IPAM plugin".into(),
            });
        }
        Ok(Self {
            version,
            mode,
            bridge,
            mtu,
            ipam_type,
            state_dir: raw
                .state_dir
                .clone()
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            bpffs: raw
                .bpffs
                .clone()
                .unwrap_or_else(|| spright_ebpf::DEFAULT_BPFFS_DIR.into()),
            cgroup: raw.cgroup.clone(),
            annotations: raw
                .runtime_config
                .as_ref()
                .and_then(|r| r.get(CAP_POD_ANNOTATIONS))
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect(),
            cni_version: raw.cni_version,
            name: raw.name,
            hairpin_mode: raw.hairpin_mode,
            ip_masq: raw.ip_masq,
            non_masquerade_cidrs,
            meshd_readyz,
            prev_result: raw.prev_result,
            log_file: raw.log_file,
            valid_attachments: raw.valid_attachments,
            input,
        })
    }

    pub fn cni_version(&self) -> &str {
        &self.cni_version
    }

    /// A pod annotation passed by the runtime (containerd with the
    /// capability declared), if any.
    fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }

    /// Where the lock file sits.
    pub fn lock_path(&self) -> PathBuf {
        self.state_dir.join(spright_endpoint::CNI_LOCK_FILE)
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }
}

/// Who the pod is and what it joins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub pod: PodRef,
    pub chain: Option<String>,
    pub function: Option<String>,
    pub redirect: bool,
}

/// Resolves the pod identity and chain: the `spright.dev/chain` annotation
/// wins, CNI_ARGS `SPRIGHT_CHAIN` is the fallback; the name is validated.
pub fn membership(config: &Config, env: &Env) -> Result<Membership> {
    let arg = |k: &str| env.args.get(k).filter(|v| !v.is_empty()).cloned();
    let pod = PodRef {
        namespace: arg(ARG_POD_NAMESPACE).unwrap_or_else(|| DEFAULT_POD_NAMESPACE.to_owned()),
        name: arg(ARG_POD_NAME).unwrap_or_else(|| env.container_id.clone()),
        uid: arg(ARG_POD_UID).unwrap_or_default(),
    };
    let annotated = spright_endpoint::Annotated::from_annotations(|k| config.annotation(k))
        .map_err(Error::InvalidChain)?;
    // The annotation wins; CNI_ARGS is the fallback for runtimes without one.
    let chain = annotated.chain.or_else(|| arg(CNI_ARG_CHAIN));
    if let Some(c) = &chain {
        spright_endpoint::validate_chain(c).map_err(Error::InvalidChain)?;
    }
    let (function, redirect) = (annotated.function, annotated.redirect);
    Ok(Membership {
        pod,
        chain,
        function,
        redirect,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Result<Config> {
        let s = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","type":"spright-cni","ipam":{{"type":"host-local"}}{extra}}}"#
        );
        Config::parse(s.as_bytes())
    }

    #[test]
    fn defaults_suit_a_node() {
        let c = conf(r#","unknownKey":{"x":1}"#).unwrap();
        assert_eq!(c.bridge, "spright0");
        assert_eq!(c.mode, Mode::Bridge);
        assert_eq!(c.mtu, None);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/spright"));
        assert_eq!(c.bpffs, PathBuf::from("/sys/fs/bpf/spright"));
        assert_eq!(c.ipam_type.as_deref(), Some("host-local"));
    }

    #[test]
    fn bad_configs_get_spec_codes() {
        assert_eq!(Config::parse(b"{nope").unwrap_err().code(), 6);
        assert_eq!(
            Config::parse(br#"{"cniVersion":"0.2.0","ipam":{"type":"x"}}"#)
                .unwrap_err()
                .code(),
            1
        );
        assert_eq!(conf(r#","mtu":10"#).unwrap_err().code(), 7);
        assert_eq!(conf(r#","mtu":70000"#).unwrap_err().code(), 7);
        assert_eq!(conf(r#","mtu":-1"#).unwrap_err().code(), 7);
        assert_eq!(
            conf(r#","bridge":"abcdefghijklmnop""#).unwrap_err().code(),
            7
        );
        assert_eq!(conf(r#","bridge":"a/b""#).unwrap_err().code(), 7);
        assert_eq!(conf(r#","mode":"overlay""#).unwrap_err().code(), 2);
        assert_eq!(
            Config::parse(br#"{"cniVersion":"1.0.0"}"#)
                .unwrap_err()
                .code(),
            7
        );
        assert_eq!(conf(r#","mtu":1400"#).unwrap().mtu, Some(1400));
    }

    #[test]
    fn prev_result_means_chained() {
        let c = Config::parse(br#"{"cniVersion":"1.0.0","prevResult":{"ips":[]}}"#).unwrap();
        assert_eq!(c.mode, Mode::Chained);
        let c = Config::parse(br#"{"cniVersion":"1.0.0","mode":"chained"}"#).unwrap();
        assert_eq!(c.mode, Mode::Chained);
        // CHECK/DEL of a bridge-mode attachment carry prevResult too.
        let c = Config::parse(
            br#"{"cniVersion":"1.0.0","prevResult":{"ips":[]},"ipam":{"type":"host-local"}}"#,
        )
        .unwrap();
        assert_eq!(c.mode, Mode::Bridge);
    }

    #[test]
    fn env_requirements_per_command() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let full = vars(&[
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/n"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "A=1;B=2"),
        ]);
        let e = Env::from_vars(Command::Add, &full).unwrap();
        assert_eq!(e.args.get("B").map(String::as_str), Some("2"));
        let no_netns = vars(&[("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0")]);
        assert!(matches!(
            Env::from_vars(Command::Add, &no_netns),
            Err(Error::MissingEnv { name: "CNI_NETNS" })
        ));
        Env::from_vars(Command::Del, &no_netns).unwrap();
        let no_id = vars(&[("CNI_NETNS", "/n"), ("CNI_IFNAME", "eth0")]);
        assert!(matches!(
            Env::from_vars(Command::Del, &no_id),
            Err(Error::MissingEnv {
                name: "CNI_CONTAINERID"
            })
        ));
        Env::from_vars(Command::Status, &vars(&[])).unwrap();
        let long = vars(&[
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/n"),
            ("CNI_IFNAME", "abcdefghijklmnopq"),
        ]);
        assert_eq!(Env::from_vars(Command::Add, &long).unwrap_err().code(), 4);
        let bad_args = vars(&[
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/n"),
            ("CNI_IFNAME", "e"),
            ("CNI_ARGS", "novalue"),
        ]);
        assert_eq!(
            Env::from_vars(Command::Add, &bad_args).unwrap_err().code(),
            4
        );
        assert_eq!(Command::parse("FOO").unwrap_err().code(), 4);
    }

    fn env_with(args: &str) -> Env {
        Env {
            container_id: "cid".into(),
            args: parse_args(args).unwrap(),
            ..Env::default()
        }
    }

    #[test]
    fn chain_comes_from_annotation_then_cni_args() {
        let c = conf(
            r#","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"spright.dev/chain":"checkout","spright.dev/function":"gw","spright.dev/redirect":"off"}}"#,
        )
        .unwrap();
        let m = membership(
            &c,
            &env_with("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=gw-1;K8S_POD_UID=u;SPRIGHT_CHAIN=other"),
        )
        .unwrap();
        assert_eq!(m.chain.as_deref(), Some("checkout"));
        assert_eq!(m.function.as_deref(), Some("gw"));
        assert!(!m.redirect);
        assert_eq!(
            m.pod,
            PodRef {
                namespace: "shop".into(),
                name: "gw-1".into(),
                uid: "u".into()
            }
        );

        let plain = conf("").unwrap();
        let m = membership(&plain, &env_with("SPRIGHT_CHAIN=fallback")).unwrap();
        assert_eq!(m.chain.as_deref(), Some("fallback"));
        assert!(m.redirect);
        assert_eq!(m.pod.namespace, "default");
        assert_eq!(m.pod.name, "cid");
        assert_eq!(membership(&plain, &env_with("")).unwrap().chain, None);

        let err = membership(&plain, &env_with("SPRIGHT_CHAIN=../etc")).unwrap_err();
        assert_eq!(err.code(), 7);
    }
}
