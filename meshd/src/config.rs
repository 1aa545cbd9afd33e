//! meshd's configuration: every flag has an environment twin; clap's errors
//! name the flag and the bad value. `--print-config` dumps the effective
//! configuration as JSON and exits.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use serde::Serialize;

/// Default address of the local HTTP API (everything: /status, /config,
/// /v1/membership, /v1/members, /metrics, /healthz, /readyz).
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:9943";

/// Default of `--memory-bound-bytes`: what one connection may queue on a
/// receiver that does not read before its sender is moved to TCP.
pub const DEFAULT_MEMORY_BOUND: &str = "16MiB";
/// Default of `--memory-bound-interval-ms`.
pub const DEFAULT_MEMORY_BOUND_INTERVAL_MS: u64 = 20;

/// Parses a byte count: a number with an optional binary suffix (`K`/`KiB`,
/// `M`/`MiB`, `G`/`GiB`); `0` or `off` disable the bound (returned as 0).
pub fn parse_limit(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a byte count such as 16MiB, 1048576 or off".to_owned())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => return Err(format!("unknown unit {unit:?} (use K, M or G, binary)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| "byte count too large".to_owned())
}

/// Whether to use the API, from `--kubernetes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Watch the API when running in a cluster (or KUBECONFIG is set).
    Auto,
    /// Always watch the API; fail to start without it.
    On,
    /// Service files only.
    Off,
}

/// When meshd checks that pods opted in to the preload shim loaded it,
/// from `--preload-check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PreloadCheck {
    /// Only when the self-test found this kernel `affected` (where the shim
    /// is needed).
    Auto,
    /// Whatever the self-test said.
    Always,
    /// Never.
    Off,
}

/// Environment twins of the flags.
pub mod env {
    pub const CGROUP: &str = "SPRIGHT_CGROUP";
    pub const BPFFS: &str = "SPRIGHT_BPFFS";
    pub const STATE_DIR: &str = "SPRIGHT_STATE_DIR";
    pub const API_ADDR: &str = "SPRIGHT_API_ADDR";
    pub const METRICS_ADDR: &str = "SPRIGHT_METRICS_ADDR";
    pub const RESCAN_SECS: &str = "SPRIGHT_RESCAN_SECS";
    pub const LONELY_POD_SECS: &str = "SPRIGHT_LONELY_POD_SECS";
    pub const FLOW_HISTORY: &str = "SPRIGHT_FLOW_HISTORY";
    pub const FLOW_EVENTS: &str = "SPRIGHT_FLOW_EVENTS";
    pub const LOG: &str = "SPRIGHT_LOG";
    pub const NO_SELFTEST: &str = "SPRIGHT_NO_SELFTEST";
    pub const ACCEPT_UNSAFE_FAMILIES: &str = "SPRIGHT_ACCEPT_UNSAFE_FAMILIES";
    pub const SERVICES_DIR: &str = "SPRIGHT_SERVICES_DIR";
    pub const PODS_DIR: &str = "SPRIGHT_PODS_DIR";
    pub const NODE_NAME: &str = "NODE_NAME";
    pub const KUBERNETES: &str = "SPRIGHT_KUBERNETES";
    pub const KUBECONFIG: &str = "KUBECONFIG";
    pub const MEMORY_BOUND_BYTES: &str = "SPRIGHT_MEMORY_BOUND_BYTES";
    pub const MEMORY_BOUND_INTERVAL_MS: &str = "SPRIGHT_MEMORY_BOUND_INTERVAL_MS";
    pub const MEMORY_BOUND_POLL: &str = "SPRIGHT_MEMORY_BOUND_POLL";
    pub const PRELOAD_SHIM: &str = "SPRIGHT_PRELOAD_SHIM";
    pub const PRELOAD_CHECK: &str = "SPRIGHT_PRELOAD_CHECK";
    pub const HOST_PROC: &str = "SPRIGHT_HOST_PROC";
}

/// A syscall family the self-test probes (`--accept-unsafe-families`).
fn parse_family(s: &str) -> Result<String, String> {
    let known = [spright_endpoint::selftest::SPLICE];
    let s = s.trim();
    if known.contains(&s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "unknown syscall family {s:?}; the self-test probes: {}",
            known.join(", ")
        ))
    }
}

/// Where the node image carries the preload shim.
pub const DEFAULT_PRELOAD_SHIM: &str = "/usr/local/lib/spright/libspright_preload.so";

/// spright's node agent.
#[derive(Clone, Debug, Parser, Serialize)]
#[command(name = "meshd", version, about)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "each bool is one on/off command-line flag"
)]
pub struct Config {
    /// cgroup v2 directory the programs attach to [default: kubelet's pod cgroup, the first of `<cgroup2>/kubepods.slice`, `<cgroup2>/kubepods`, `<cgroup2>/kubelet.slice/kubelet-kubepods.slice`; never the cgroup v2 root]
    #[arg(long, env = env::CGROUP, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory holding the pinned programs and maps
    #[arg(long, env = env::BPFFS, value_name = "DIR", default_value = spright_ebpf::DEFAULT_BPFFS_DIR)]
    pub bpffs: PathBuf,
    /// State directory where spright-cni writes endpoint records
    #[arg(long, env = env::STATE_DIR, value_name = "DIR", default_value = spright_endpoint::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Address of the local HTTP API: /status, /config, /v1/membership and
    /// /v1/members (unauthenticated, so a loopback address only), plus
    /// /metrics, /healthz and /readyz
    #[arg(long, env = env::API_ADDR, value_name = "HOST:PORT", default_value = DEFAULT_API_ADDR,
          value_parser = parse_loopback)]
    pub api_addr: SocketAddr,
    /// Address of a second listener serving only /metrics, /healthz and
    /// /readyz, e.g. `0.0.0.0:9944` for Prometheus to scrape from other
    /// nodes [default: none, the API address serves them]
    #[arg(long, env = env::METRICS_ADDR, value_name = "HOST:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// Seconds between full rescans of the records (safety net for missed inotify events)
    #[arg(long, env = env::RESCAN_SECS, value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub rescan_secs: u64,
    /// Seconds a chain pod must be its chain's only pod on this node before
    /// meshd puts a `ChainHasNoLocalPeer` Warning event on it (with the API
    /// and --node-name; see events.rs)
    #[arg(long, env = env::LONELY_POD_SECS, value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub lonely_pod_secs: u64,
    /// Closed flows `/v1/flows` and `spright flows` keep (open ones are
    /// always kept); 0 keeps none
    #[arg(long, env = env::FLOW_HISTORY, value_name = "FLOWS", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub flow_history: u64,
    /// Flow events from the kernel programs (`/v1/flows`, `spright
    /// flows`); `false` turns them off node-wide (no ring-buffer writes,
    /// no per-socket flow state)
    #[arg(long, env = env::FLOW_EVENTS, value_name = "BOOL", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub flow_events: bool,
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `meshd=debug`)
    #[arg(long, env = env::LOG, value_name = "FILTER", default_value = "info")]
    pub log: String,
    /// Directory of Service/EndpointSlice JSON files (`kubectl get service,endpointslice -o json`) for connect-time Service translation [default: `<state-dir>/services`]
    #[arg(long, env = env::SERVICES_DIR, value_name = "DIR")]
    pub services_dir: Option<PathBuf>,
    /// Directory of Pod JSON files (`kubectl get pod -o json`) that say which pods of this node are in which chain, for nodes without API access and for tests [default: `<state-dir>/pods`]
    #[arg(long, env = env::PODS_DIR, value_name = "DIR")]
    pub pods_dir: Option<PathBuf>,
    /// This node's name (the DaemonSet sets it from `spec.nodeName`): Pods bound to it are watched on the API, and a pod of another node is refused shared memory
    #[arg(long, env = env::NODE_NAME, value_name = "NAME", value_parser = parse_node_name)]
    pub node_name: Option<String>,
    /// Watch Services, EndpointSlices and this node's Pods on the Kubernetes API: `auto` when in a cluster (KUBERNETES_SERVICE_HOST) or KUBECONFIG is set, `on` (fail without it), `off` (files only)
    #[arg(long, env = env::KUBERNETES, value_name = "MODE", value_enum, default_value = "auto")]
    pub kubernetes: Mode,
    /// How spright-cni runs on this node (the DaemonSet gives meshd and
    /// install-cni the same value): `chained` after the cluster's CNI, or
    /// `primary`, where meshd also publishes this Node's spec.podCIDRs for
    /// install-cni and routes every other Node's pod CIDRs via its
    /// InternalIP (host-gw; needs --node-name and the API)
    #[arg(long, env = crate::install_cni::env::MODE, value_name = "MODE", value_enum, default_value = "chained")]
    pub cni_mode: crate::install_cni::Mode,
    /// kubeconfig file for the API (instead of the in-cluster service account)
    #[arg(long, env = env::KUBECONFIG, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Skip the start-up self-test of the kernel's redirect path (see selftest.rs)
    #[arg(long, env = env::NO_SELFTEST)]
    pub no_selftest: bool,
    /// Run the start-up self-test of the kernel's redirect path (in a cgroup
    /// and pin directory of its own, next to --bpffs), print its report and
    /// the redirect decision as JSON, and exit: what `cargo xtask test
    /// kernels` runs on every kernel of the matrix
    #[arg(long, conflicts_with = "no_selftest")]
    #[serde(skip)]
    pub selftest_only: bool,
    /// Syscall families the admin accepts losing data on (comma-separated;
    /// today only `splice`): where the self-test finds that this kernel's
    /// redirect path loses a family's data and nothing mitigates it, meshd
    /// redirects no new connection unless the family is named here
    /// (docs/RELIABILITY.md, "splice")
    #[arg(long, env = env::ACCEPT_UNSAFE_FAMILIES, value_name = "FAMILIES",
          value_delimiter = ',', value_parser = parse_family)]
    pub accept_unsafe_families: Vec<String>,
    /// Receive memory one redirected connection may queue on a pod that does
    /// not read before its sender is moved to TCP (bytes, K/M/G binary
    /// suffixes; `0` or `off` disables; see membound.rs)
    #[arg(long, env = env::MEMORY_BOUND_BYTES, value_name = "BYTES",
          default_value = DEFAULT_MEMORY_BOUND, value_parser = parse_limit)]
    pub memory_bound_bytes: u64,
    /// Enforce the memory bound by polling even where the sk_msg program
    /// could enforce it at each send (for comparison; see membound.rs)
    #[arg(long, env = env::MEMORY_BOUND_POLL)]
    pub memory_bound_poll: bool,
    /// Milliseconds between two checks of the memory bound when meshd
    /// polls; the overshoot past the limit is at most the sender's rate
    /// times this interval
    #[arg(long, env = env::MEMORY_BOUND_INTERVAL_MS, value_name = "MS",
          default_value_t = DEFAULT_MEMORY_BOUND_INTERVAL_MS,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub memory_bound_interval_ms: u64,
    /// The preload shim meshd publishes to `<state-dir>/preload/` at start,
    /// where spright-webhook's volume for `spright.dev/preload` pods finds
    /// it (a missing file is logged; see preload.rs)
    #[arg(long, env = env::PRELOAD_SHIM, value_name = "FILE", default_value = DEFAULT_PRELOAD_SHIM)]
    pub preload_shim: PathBuf,
    /// When to check that the processes of pods with `spright.dev/preload:
    /// "true"` loaded the shim, with a Warning event on each pod whose
    /// program cannot (with the API and --node-name)
    #[arg(long, env = env::PRELOAD_CHECK, value_name = "WHEN", value_enum, default_value = "auto")]
    pub preload_check: PreloadCheck,
    /// The host's /proc (the DaemonSet mounts it at /host/proc): where the
    /// preload check finds the pods' processes
    #[arg(long, env = env::HOST_PROC, value_name = "DIR", default_value = "/proc")]
    pub host_proc: PathBuf,
    /// Print the effective configuration as JSON and exit
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
}

impl Config {
    /// Primary mode's pod network is managed here (`--cni-mode primary`).
    pub fn manages_pod_network(&self) -> bool {
        self.cni_mode == crate::install_cni::Mode::Primary
    }

    /// The cgroup to attach to: the flag, or kubelet's pod cgroup (an error
    /// naming every path looked for when there is none).
    pub fn cgroup_dir(&self) -> Result<PathBuf, spright_ebpf::Error> {
        self.cgroup
            .clone()
            .map_or_else(spright_ebpf::default_cgroup, Ok)
    }

    /// The service files directory: the flag, or `<state-dir>/services`.
    pub fn services_dir(&self) -> PathBuf {
        services_dir_or_default(self.services_dir.as_deref(), &self.state_dir)
    }

    /// The Pod files directory: the flag, or `<state-dir>/pods`.
    pub fn pods_dir(&self) -> PathBuf {
        self.pods_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join(crate::sources::PODS_SUBDIR))
    }

    pub fn rescan_interval(&self) -> Duration {
        Duration::from_secs(self.rescan_secs)
    }

    /// The effective configuration (defaults resolved) as JSON.
    pub fn effective_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        match self.cgroup_dir() {
            Ok(c) => v["cgroup"] = serde_json::json!(c),
            Err(e) => v["cgroup_error"] = serde_json::json!(e.to_string()),
        }
        v["services_dir"] = serde_json::json!(self.services_dir());
        v["pods_dir"] = serde_json::json!(self.pods_dir());
        v
    }
}

/// The API listener's address: it answers who is in which chain and shows the
/// node's configuration to anyone who can connect, so it stays on loopback.
fn parse_loopback(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|e| format!("expected HOST:PORT with a loopback IP (127.0.0.1:9943): {e}"))?;
    if addr.ip().is_loopback() {
        Ok(addr)
    } else {
        Err(format!(
            "{} is not a loopback address: the API serves /status, /config and /v1/* without \
             authentication; expose only /metrics with --metrics-addr",
            addr.ip()
        ))
    }
}

/// A node name is a DNS-1123 subdomain (lowercase alphanumerics, '-' and
/// '.', at most 253 characters).
fn parse_node_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(s.to_owned())
    } else {
        Err(
            "expected a node name (DNS-1123 subdomain: lowercase letters, digits, '-' and '.')"
                .into(),
        )
    }
}

/// `dir`, or the default services directory under `state_dir`.
pub fn services_dir_or_default(
    dir: Option<&std::path::Path>,
    state_dir: &std::path::Path,
) -> PathBuf {
    dir.map_or_else(
        || state_dir.join(spright_endpoint::SERVICES_SUBDIR),
        std::path::Path::to_path_buf,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("meshd").chain(args.iter().copied()))
    }

    #[test]
    fn limits_parse_with_binary_units_and_off() {
        assert_eq!(parse_limit("16MiB"), Ok(16 << 20));
        assert_eq!(parse_limit("16M"), Ok(16 << 20));
        assert_eq!(parse_limit("512k"), Ok(512 << 10));
        assert_eq!(parse_limit("1G"), Ok(1 << 30));
        assert_eq!(parse_limit("1048576"), Ok(1 << 20));
        assert_eq!(parse_limit("0"), Ok(0));
        assert_eq!(parse_limit("off"), Ok(0));
        assert!(parse_limit("lots").is_err());
        assert!(parse_limit("5T").is_err());
        assert!(parse_limit("").is_err());
        assert!(parse_limit("99999999999G").is_err());
    }

    #[test]
    fn defaults_suit_a_node() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.bpffs, PathBuf::from("/sys/fs/bpf/spright"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/spright"));
        assert_eq!(c.api_addr.to_string(), DEFAULT_API_ADDR);
        assert_eq!(c.metrics_addr, None);
        assert_eq!(c.rescan_secs, 30);
        assert_eq!(c.lonely_pod_secs, 30);
        assert_eq!(c.flow_history, 4096);
        assert!(c.flow_events);
        assert_eq!(c.memory_bound_bytes, 16 << 20);
        assert_eq!(c.memory_bound_interval_ms, 20);
    }

    #[test]
    fn memory_bound_flags_parse_and_name_themselves_on_error() {
        let c = parse(&["--memory-bound-bytes", "off"]).unwrap();
        assert_eq!(c.memory_bound_bytes, 0);
        assert!(!c.memory_bound_poll);
        assert!(parse(&["--memory-bound-poll"]).unwrap().memory_bound_poll);
        let c = parse(&[
            "--memory-bound-bytes",
            "4M",
            "--memory-bound-interval-ms",
            "5",
        ])
        .unwrap();
        assert_eq!(
            (c.memory_bound_bytes, c.memory_bound_interval_ms),
            (4 << 20, 5)
        );
        let e = parse(&["--memory-bound-bytes", "lots"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--memory-bound-bytes") && e.contains("lots"),
            "{e}"
        );
        let e = parse(&["--memory-bound-interval-ms", "0"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--memory-bound-interval-ms") && e.contains('0'),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_the_flag_and_the_value() {
        let e = parse(&["--metrics-addr", "nonsense"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--metrics-addr") && e.contains("nonsense"),
            "{e}"
        );
        let e = parse(&["--api-addr", "0.0.0.0:9943"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--api-addr") && e.contains("not a loopback address"),
            "{e}"
        );
        let c = parse(&["--api-addr", "[::1]:9943", "--metrics-addr", "0.0.0.0:9944"]).unwrap();
        assert_eq!(c.metrics_addr, Some("0.0.0.0:9944".parse().unwrap()));
        let e = parse(&["--node-name", "Node_1"]).unwrap_err().to_string();
        assert!(e.contains("--node-name") && e.contains("Node_1"), "{e}");
        assert_eq!(
            parse(&["--node-name", "node-1.example"])
                .unwrap()
                .node_name
                .as_deref(),
            Some("node-1.example")
        );
        let e = parse(&["--rescan-secs", "0"]).unwrap_err().to_string();
        assert!(e.contains("--rescan-secs") && e.contains('0'), "{e}");
    }

    #[test]
    fn effective_config_resolves_defaults() {
        let c = parse(&[
            "--cgroup",
            "/sys/fs/cgroup/unified/x",
            "--bpffs",
            "/sys/fs/bpf/t",
        ])
        .unwrap();
        let j = c.effective_json();
        assert_eq!(j["cgroup"], "/sys/fs/cgroup/unified/x");
        assert_eq!(j["bpffs"], "/sys/fs/bpf/t");
        assert_eq!(j["services_dir"], "/var/lib/spright/services");
        assert_eq!(j["pods_dir"], "/var/lib/spright/pods");
        assert!(j["node_name"].is_null());
        assert!(j.get("print_config").is_none());
    }
}
