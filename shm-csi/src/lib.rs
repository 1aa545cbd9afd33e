//! shm-csi: the CSI node plugin (`shm.spright.dev`) that mounts a chain's
//! shared-memory region into the chain's pods. The binary is a thin main over
//! this library; tests use [`csi`]'s generated client.

#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod error;
pub mod membership;
pub mod regions;
pub mod request;
pub mod service;
pub mod size;
pub mod sys;

/// CSI v1 (spec v1.3.0) messages, services and clients, generated at build
/// time from `proto/csi.proto`.
pub mod csi {
    #![allow(
        clippy::all,
        clippy::pedantic,
        clippy::allow_attributes_without_reason,
        unreachable_pub,
        unused_qualifications,
        reason = "generated code"
    )]
    tonic::include_proto!("csi.v1");
}
