//! Command-line flags and their environment twins.

use std::path::PathBuf;

use clap::Parser;

use crate::{request::Limits, size};

/// Environment variable names (each flag's twin).
pub mod env {
    pub const ENDPOINT: &str = "CSI_ENDPOINT";
    pub const NODE_ID: &str = "NODE_ID";
    pub const REGION_ROOT: &str = "SHM_CSI_REGION_ROOT";
    pub const DEFAULT_SIZE: &str = "SHM_CSI_DEFAULT_SIZE";
    pub const MAX_SIZE: &str = "SHM_CSI_MAX_SIZE";
    pub const MESHD_ADDR: &str = "SHM_CSI_MESHD_ADDR";
    pub const STATE_DIR: &str = "SHM_CSI_STATE_DIR";
    pub const MEMBERSHIP_WAIT_SECS: &str = "SHM_CSI_MEMBERSHIP_WAIT_SECS";
    pub const LOG: &str = "SHM_CSI_LOG";
}

pub const DEFAULT_REGION_ROOT: &str = "/var/lib/spright/shm";
pub const DEFAULT_MESHD_ADDR: &str = "127.0.0.1:9943";

#[derive(Debug, Clone, Parser)]
#[command(
    name = "shm-csi",
    version,
    about = "CSI node plugin for per-chain shared memory (shm.spright.dev)"
)]
pub struct Config {
    /// gRPC endpoint: `unix:///path/csi.sock` (or a bare path).
    #[arg(long, env = env::ENDPOINT, value_name = "URL", value_parser = parse_endpoint)]
    pub endpoint: PathBuf,
    /// This node's name (NodeGetInfo).
    #[arg(long, env = env::NODE_ID, value_name = "NAME")]
    pub node_id: String,
    /// Where chain regions are mounted and the state file lives.
    #[arg(long, env = env::REGION_ROOT, value_name = "DIR", default_value = DEFAULT_REGION_ROOT)]
    pub region_root: PathBuf,
    /// Region size when a volume gives no `size` attribute.
    #[arg(long, env = env::DEFAULT_SIZE, value_name = "SIZE", default_value = "64Mi", value_parser = parse_size)]
    pub default_size: u64,
    /// Largest `size` a volume may ask for.
    #[arg(long, env = env::MAX_SIZE, value_name = "SIZE", default_value = "1Gi", value_parser = parse_size)]
    pub max_size: u64,
    /// meshd's HTTP address, asked whether a pod is in a chain.
    #[arg(long, env = env::MESHD_ADDR, value_name = "HOST:PORT", default_value = DEFAULT_MESHD_ADDR)]
    pub meshd_addr: String,
    /// The CNI state directory; when set, membership is read from its
    /// endpoint records while meshd is unreachable.
    #[arg(long, env = env::STATE_DIR, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Seconds a publish waits for meshd to learn of a pod it does not know
    /// yet (its watch may lag the API) before refusing it.
    #[arg(long, env = env::MEMBERSHIP_WAIT_SECS, value_name = "SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=60))]
    pub membership_wait_secs: u64,
    /// tracing filter.
    #[arg(long, env = env::LOG, value_name = "FILTER", default_value = "info")]
    pub log: String,
}

impl Config {
    pub fn membership_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.membership_wait_secs)
    }

    pub fn limits(&self) -> Result<Limits, String> {
        if self.default_size > self.max_size {
            return Err(format!(
                "--default-size {} exceeds --max-size {}",
                size::format(self.default_size),
                size::format(self.max_size)
            ));
        }
        Ok(Limits {
            default_size: self.default_size,
            max_size: self.max_size,
        })
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    size::parse(s).map_err(|e| e.to_string())
}

fn parse_endpoint(s: &str) -> Result<PathBuf, String> {
    let path = s.strip_prefix("unix://").unwrap_or(s);
    if s.contains("://") && !s.starts_with("unix://") {
        return Err(format!("{s:?}: only unix:// endpoints are supported"));
    }
    if !path.starts_with('/') {
        return Err(format!(
            "{s:?}: the socket path must be absolute (unix:///path/csi.sock)"
        ));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::try_parse_from(std::iter::once("shm-csi").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn flags_and_defaults() {
        let c = parse(&["--endpoint", "unix:///csi/csi.sock", "--node-id", "n1"]).unwrap();
        assert_eq!(c.endpoint, PathBuf::from("/csi/csi.sock"));
        assert_eq!(c.default_size, 64 << 20);
        assert_eq!(c.max_size, 1 << 30);
        assert_eq!(c.meshd_addr, DEFAULT_MESHD_ADDR);
        assert!(c.state_dir.is_none());
        assert_eq!(c.membership_wait_secs, 5);
        assert!(c.limits().is_ok());
    }

    #[test]
    fn errors_name_flag_and_value() {
        let e = parse(&["--endpoint", "tcp://1.2.3.4:5", "--node-id", "n"]).unwrap_err();
        assert!(e.contains("--endpoint") && e.contains("tcp://"), "{e}");
        let e = parse(&["--endpoint", "/s", "--node-id", "n", "--max-size", "1GB"]).unwrap_err();
        assert!(e.contains("--max-size") && e.contains("1GB"), "{e}");
        let e = parse(&[
            "--endpoint",
            "/s",
            "--node-id",
            "n",
            "--membership-wait-secs",
            "99",
        ])
        .unwrap_err();
        assert!(
            e.contains("--membership-wait-secs") && e.contains("99"),
            "{e}"
        );
        let c = parse(&["--endpoint", "/s", "--node-id", "n", "--max-size", "1Mi"]).unwrap();
        assert!(c.limits().unwrap_err().contains("exceeds --max-size 1Mi"));
    }
}
