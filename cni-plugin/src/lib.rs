//! spright's CNI plugin as a library: the `spright-cni` binary is
//! [`cli::main`]; the modules are public so the integration tests and the
//! benchmark can reuse names and helpers (e.g. [`commands::host_ifname`]).

#![forbid(unsafe_code)]

pub mod cli;
pub mod commands;
pub mod config;
pub mod datapath;
pub mod error;
pub mod ipam;
pub mod iptables;
pub mod link;
pub mod state;
pub mod version;
