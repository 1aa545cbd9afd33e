//! The plugin's errors and their one mapping onto the CNI error codes.
//!
//! Every failure reaches the runtime as `{"cniVersion","code","msg","details"}`
//! on stdout (SPEC.md "Error"); the code comes from [`Error::code`], an
//! exhaustive match, so a new variant cannot ship without a code.

use std::{io, path::PathBuf};

use serde::Serialize;

/// CNI error codes (SPEC.md, "Error"): 1–99 are reserved for the spec,
/// 100+ are this plugin's own.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// A netlink operation failed.
    pub const NETLINK: u32 = 100;
    /// CNI_IFNAME already exists in the pod's namespace.
    pub const IFNAME_TAKEN: u32 = 101;
    /// The IPAM plugin could not be found or run, or returned nonsense.
    pub const IPAM: u32 = 102;
    /// iptables failed (ipMasq).
    pub const IPTABLES: u32 = 103;
    /// CHECK found the attachment differs from what ADD set up.
    pub const CHECK_FAILED: u32 = 104;
    /// A namespace could not be entered or restored.
    pub const NETNS: u32 = 105;
}

/// Everything that can fail in the plugin.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cniVersion {version:?} is not supported (supported: {supported})")]
    IncompatibleVersion { version: String, supported: String },
    #[error("command {command} needs cniVersion {min} or later, the config says {version}")]
    CommandNeedsVersion {
        command: &'static str,
        min: &'static str,
        version: String,
    },
    #[error("unsupported value {value:?} for {field}")]
    UnsupportedField { field: &'static str, value: String },
    #[error("missing environment variable {name}")]
    MissingEnv { name: &'static str },
    #[error("invalid environment variable {name}={value:?}: {why}")]
    InvalidEnv {
        name: &'static str,
        value: String,
        why: String,
    },
    #[error("network namespace {path} does not exist")]
    NetnsMissing { path: PathBuf },
    #[error("failed to decode the network configuration")]
    Decode(#[source] serde_json::Error),
    #[error("invalid network configuration: {field}: {why}")]
    InvalidConfig { field: &'static str, why: String },
    #[error("invalid chain for the pod")]
    InvalidChain(#[source] spright_endpoint::Error),
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("endpoint record")]
    Record(#[source] spright_endpoint::Error),
    #[error("failed to {op} in network namespace {netns}")]
    Netns {
        op: &'static str,
        netns: String,
        #[source]
        source: nix::Error,
    },
    #[error("failed to {op} {object}: {detail}")]
    Netlink {
        op: &'static str,
        object: String,
        detail: String,
    },
    #[error("interface {ifname} already exists in network namespace {netns}")]
    IfnameTaken { ifname: String, netns: String },
    #[error("IPAM plugin {plugin:?} not found on CNI_PATH {path:?}")]
    IpamNotFound { plugin: String, path: String },
    #[error("IPAM plugin {plugin} failed to {op}: {detail}")]
    IpamExec {
        plugin: String,
        op: &'static str,
        detail: String,
    },
    /// The IPAM plugin returned a CNI error: passed on with its own code.
    #[error("IPAM plugin {plugin}: {msg}")]
    IpamError {
        plugin: String,
        code: u32,
        msg: String,
        details: String,
    },
    #[error("IPAM plugin {plugin} returned no usable address: {why}")]
    IpamResult { plugin: String, why: String },
    #[error("`{command}` failed: {detail}")]
    Iptables { command: String, detail: String },
    #[error("check failed: {what}")]
    CheckFailed { what: String },
    #[error("another invocation holds {path}; try again later")]
    Busy { path: PathBuf },
    #[error("plugin cannot serve ADD: {why}")]
    NotAvailable { why: String },
    #[error("plugin degraded, existing pods may have limited connectivity: {why}")]
    LimitedConnectivity { why: String },
}

impl From<spright_endpoint::netns::Error> for Error {
    fn from(e: spright_endpoint::netns::Error) -> Self {
        use spright_endpoint::netns::Error as Netns;
        match e {
            Netns::Missing(path) => Self::NetnsMissing { path },
            Netns::Open { path, source } => Self::Io {
                op: "open network namespace",
                path,
                source,
            },
            Netns::Enter { path, source } => Self::Netns {
                op: "enter",
                netns: path.display().to_string(),
                source,
            },
        }
    }
}

impl Error {
    /// The CNI error code of this error. Exhaustive on purpose.
    pub fn code(&self) -> u32 {
        match self {
            Self::IncompatibleVersion { .. } | Self::CommandNeedsVersion { .. } => {
                code::INCOMPATIBLE_VERSION
            }
            Self::UnsupportedField { .. } => code::UNSUPPORTED_FIELD,
            Self::NetnsMissing { .. } => code::UNKNOWN_CONTAINER,
            Self::MissingEnv { .. } | Self::InvalidEnv { .. } => code::INVALID_ENV,
            Self::Io { .. } | Self::Record(_) => code::IO,
            Self::Decode(_) => code::DECODE,
            Self::InvalidConfig { .. } | Self::InvalidChain(_) => code::INVALID_CONFIG,
            Self::Busy { .. } => code::TRY_AGAIN_LATER,
            Self::NotAvailable { .. } => code::NOT_AVAILABLE,
            Self::LimitedConnectivity { .. } => code::LIMITED_CONNECTIVITY,
            Self::Netlink { .. } => code::NETLINK,
            Self::IfnameTaken { .. } => code::IFNAME_TAKEN,
            Self::IpamNotFound { .. } | Self::IpamExec { .. } | Self::IpamResult { .. } => {
                code::IPAM
            }
            Self::IpamError { code, .. } => *code,
            Self::Iptables { .. } => code::IPTABLES,
            Self::CheckFailed { .. } => code::CHECK_FAILED,
            Self::Netns { .. } => code::NETNS,
        }
    }

    /// The error as the JSON the runtime reads.
    pub fn to_cni(&self, cni_version: &str) -> CniError {
        let msg = self.to_string();
        let mut details = Vec::new();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            details.push(s.to_string());
            source = s.source();
        }
        if let Self::IpamError { details: d, .. } = self
            && !d.is_empty()
        {
            details.push(d.clone());
        }
        CniError {
            cni_version: cni_version.to_owned(),
            code: self.code(),
            msg,
            details: details.join(": "),
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { op, path, source }
    }

    pub(crate) fn netlink(
        op: &'static str,
        object: impl Into<String>,
    ) -> impl FnOnce(rtnetlink::Error) -> Self {
        let object = object.into();
        move |e| Self::Netlink {
            op,
            object,
            detail: crate::link::describe(&e),
        }
    }
}

/// The CNI error object.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct CniError {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_spec() {
        let cases: Vec<(Error, u32)> = vec![
            (
                Error::IncompatibleVersion {
                    version: "9".into(),
                    supported: String::new(),
                },
                1,
            ),
            (
                Error::UnsupportedField {
                    field: "mode",
                    value: "x".into(),
                },
                2,
            ),
            (Error::NetnsMissing { path: "/x".into() }, 3),
            (
                Error::MissingEnv {
                    name: "CNI_COMMAND",
                },
                4,
            ),
            (Error::io("write", "/x")(io::Error::other("boom")), 5),
            (
                Error::Decode(serde_json::from_str::<u8>("{").unwrap_err()),
                6,
            ),
            (
                Error::InvalidConfig {
                    field: "mtu",
                    why: "too small".into(),
                },
                7,
            ),
            (Error::Busy { path: "/x".into() }, 11),
            (Error::NotAvailable { why: "x".into() }, 50),
            (Error::LimitedConnectivity { why: "x".into() }, 51),
            (
                Error::IfnameTaken {
                    ifname: "eth0".into(),
                    netns: "/x".into(),
                },
                101,
            ),
            (
                Error::IpamNotFound {
                    plugin: "host-local".into(),
                    path: String::new(),
                },
                102,
            ),
            (
                Error::IpamError {
                    plugin: "h".into(),
                    code: 11,
                    msg: "m".into(),
                    details: String::new(),
                },
                11,
            ),
        ];
        for (e, c) in cases {
            assert_eq!(e.code(), c, "{e}");
            assert!(c < 8 || c == 11 || c == 50 || c == 51 || c >= 100);
        }
    }

    #[test]
    fn json_carries_sources_in_details() {
        let e = Error::io("create", "/state")(io::Error::other("read-only file system"));
        let j = serde_json::to_value(e.to_cni("1.0.0")).unwrap();
        assert_eq!(j["code"], 5);
        assert_eq!(j["cniVersion"], "1.0.0");
        assert_eq!(j["msg"], "failed to create /state");
        assert_eq!(j["details"], "read-only file system");
    }
}
