//! meshd, spright's node agent (see ARCHITECTURE.md), and the pieces the
//! `spright` CLI shares with it.

#![forbid(unsafe_code)]

pub mod agent;
pub mod config;
pub mod desired;
pub mod error;
pub mod events;
pub mod explain;
pub mod families;
pub mod flows;
#[cfg(test)]
mod fuzz;
pub mod http;
pub mod install_cni;
pub mod kube_source;
pub mod membound;
pub mod metrics;
pub mod pod_network;
pub mod preload;
pub mod selftest;
pub mod services;
pub mod snapshot;
mod sock_diag;
pub mod sources;
pub mod status;
pub mod sync;
pub mod uninstall;
pub mod view;
pub mod watch;
