//! spright-webhook: the mutating admission webhook that turns the
//! `spright.dev/chain` annotation into everything a chain Pod needs (its
//! label, its shared-memory volume, co-location with its chain).
//!
//! [`mutate`] is the pure core (no I/O); [`server`] serves it over TLS with
//! the certificate [`tls`] keeps current (files reloaded on change, or a
//! self-signed CA that [`ca_bundle`] publishes and rotates).

#![forbid(unsafe_code)]

pub mod ca_bundle;
pub mod client;
pub mod config;
pub mod metrics;
pub mod mutate;
pub mod review;
pub mod server;
pub mod tls;

pub use mutate::{mutate_pod, patched, review};
