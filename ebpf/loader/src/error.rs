//! The loader's one error type. Every variant names the operation and the
//! object it failed on and keeps the underlying error as its source (boxed
//! when large), in the manner of aya's `MapError`/`SyscallError`; the small
//! constructors below build the closures the `map_err` calls of the other
//! modules pass.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    maps::MapError,
    pin::PinError,
    programs::{ProgramError, links::LinkError},
};

/// Errors of the datapath loader. Messages name the operation and the object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path} is not on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs { path: PathBuf },
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo); set the cgroup explicitly"
    )]
    NoCgroup2,
    #[error(
        "no kubelet pod cgroup found (looked for {}); set the cgroup explicitly \
         (never the cgroup v2 root {root}: the node's own sockets live there)",
        display_paths(looked)
    )]
    NoPodCgroup { root: PathBuf, looked: Vec<PathBuf> },
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to load the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error(
        "kernel {release} is older than spright's minimum {minimum}: it lacks {missing}; pods keep plain networking"
    )]
    KernelTooOld {
        release: String,
        minimum: String,
        missing: &'static str,
    },
    #[error("failed to read the running kernel's BTF")]
    Btf(#[source] Box<aya::BtfError>),
    #[error("program {name} missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("failed to {op} program {name}")]
    Program {
        op: &'static str,
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("failed to {op} map {name}")]
    Map {
        op: &'static str,
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("failed to {op} the link of program {name}")]
    Link {
        op: &'static str,
        name: &'static str,
        #[source]
        source: Box<LinkError>,
    },
    #[error("failed to pin {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<PinError>,
    },
    #[error("the datapath is not installed in {path} (no {link} pin)")]
    NotInstalled { path: PathBuf, link: &'static str },
    #[error(
        "map {name} is not pinned: the installed datapath predates Service translation \
         (restart meshd to upgrade it)"
    )]
    Outdated { name: &'static str },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { op, path, source }
    }
    pub(crate) fn map(op: &'static str, name: &'static str) -> impl FnOnce(MapError) -> Self {
        move |source| Self::Map {
            op,
            name,
            source: Box::new(source),
        }
    }
    pub(crate) fn link(op: &'static str, name: &'static str) -> impl FnOnce(LinkError) -> Self {
        move |source| Self::Link {
            op,
            name,
            source: Box::new(source),
        }
    }
    pub(crate) fn prog(op: &'static str, name: &'static str) -> impl FnOnce(ProgramError) -> Self {
        move |source| Self::Program {
            op,
            name,
            source: Box::new(source),
        }
    }
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
