//! Every failure of the plugin, and its one conversion to the gRPC status the
//! CSI spec requires.

use std::path::PathBuf;

use tonic::{Code, Status};

use crate::size::SizeError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("missing required field {0}")]
    Missing(&'static str),
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        what: String,
        value: String,
        why: String,
    },
    #[error("invalid size attribute")]
    Size(#[from] SizeError),
    #[error("size {requested} exceeds this node's maximum {max}")]
    TooLarge { requested: String, max: String },
    #[error("medium \"hugepages\" is not available on this node: {0}")]
    NoHugepages(String),
    #[error(
        "chain {namespace}/{chain} already has a {existing} region; a volume asked for {requested}"
    )]
    MediumMismatch {
        namespace: String,
        chain: String,
        existing: String,
        requested: String,
    },
    #[error("pod {namespace}/{pod} may not use chain {chain}'s shared memory: {reason}")]
    NotMember {
        namespace: String,
        chain: String,
        pod: String,
        reason: String,
    },
    #[error("cannot check membership of chain {namespace}/{chain}: {why}")]
    MembershipUnavailable {
        namespace: String,
        chain: String,
        why: String,
    },
    #[error("volume {volume_id} is already published with different arguments ({what})")]
    Conflict { volume_id: String, what: String },
    #[error("an operation on volume {0} is already in progress")]
    InFlight(String),
    #[error("{0} is mounted but is not a shm.spright.dev volume")]
    NotOurs(PathBuf),
    #[error("failed to {op} {path}")]
    Sys {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed state file {path}")]
    State {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    pub(crate) fn invalid(what: impl Into<String>, value: &str, why: impl Into<String>) -> Self {
        Self::Invalid {
            what: what.into(),
            value: value.to_owned(),
            why: why.into(),
        }
    }

    /// The gRPC code for this error, per the CSI spec's error tables.
    pub fn code(&self) -> Code {
        match self {
            Self::Missing(_) | Self::Invalid { .. } | Self::Size(_) | Self::TooLarge { .. } => {
                Code::InvalidArgument
            }
            Self::NoHugepages(_) | Self::MediumMismatch { .. } | Self::NotOurs(_) => {
                Code::FailedPrecondition
            }
            Self::NotMember { .. } => Code::PermissionDenied,
            Self::MembershipUnavailable { .. } => Code::Unavailable,
            Self::Conflict { .. } => Code::AlreadyExists,
            Self::InFlight(_) => Code::Aborted,
            Self::Sys { .. } | Self::Io { .. } | Self::State { .. } => Code::Internal,
        }
    }
}

/// The message carries the whole source chain, so the CO's events say why.
impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        Status::new(e.code(), msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_spec_codes() {
        let cases = [
            (Error::Missing("volume_id"), Code::InvalidArgument),
            (Error::invalid("chain", "..", "x"), Code::InvalidArgument),
            (Error::Size(SizeError::Empty), Code::InvalidArgument),
            (
                Error::TooLarge {
                    requested: "2Gi".into(),
                    max: "1Gi".into(),
                },
                Code::InvalidArgument,
            ),
            (Error::NoHugepages("x".into()), Code::FailedPrecondition),
            (
                Error::NotMember {
                    namespace: "a".into(),
                    chain: "b".into(),
                    pod: "c".into(),
                    reason: "r".into(),
                },
                Code::PermissionDenied,
            ),
            (
                Error::Conflict {
                    volume_id: "v".into(),
                    what: "size".into(),
                },
                Code::AlreadyExists,
            ),
            (Error::InFlight("v".into()), Code::Aborted),
            (
                Error::Sys {
                    op: "mount",
                    path: "/x".into(),
                    source: nix::Error::EPERM,
                },
                Code::Internal,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
    }

    #[test]
    fn status_message_includes_sources() {
        let s = Status::from(Error::Size(SizeError::Unit("64MB".into())));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("invalid size attribute"), "{s:?}");
        assert!(s.message().contains("\"64MB\""), "{s:?}");
        let s = Status::from(Error::Sys {
            op: "mount tmpfs at",
            path: "/r".into(),
            source: nix::Error::ENOSPC,
        });
        assert!(
            s.message().starts_with("failed to mount tmpfs at /r: "),
            "{s:?}"
        );
    }
}
