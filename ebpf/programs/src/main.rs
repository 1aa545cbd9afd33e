//! spright's kernel programs.
//!
//! - `spright_sockops` (cgroup sock_ops): when a TCP connection is established
//!   and both ends are local mesh endpoints that policy lets talk, insert the
//!   socket into the sockhash under its node-unique key.
//! - `spright_sk_msg` (sk_msg verdict on the sockhash): redirect every message
//!   to the peer socket's ingress queue; when the peer is not (yet) in the map,
//!   pass it to TCP. A message that takes the receiver past the memory bound
//!   (`spr_bound_v1`) is the connection's last redirected one.
//! - `spright_connect4/6` and `spright_getpeername4/6` (cgroup sock_addr):
//!   connect-time Service translation for chain pods (see `services.rs`).
//! - `spright_splice_guard` (cgroup LSM `file_permission`): `splice()` and
//!   `sendfile()` from a redirected socket fail with EINVAL, which callers
//!   take as "copy instead", where they would otherwise read end of stream
//!   and lose the data (see `guard.rs`).
//!
//! On the host this crate builds to an empty binary so that workspace-wide
//! commands work; the real object is built by `ebpf/loader`'s build script.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// `atomic_xadd` for the memory bound's switch counter (programs.rs).
#![cfg_attr(
    target_arch = "bpf",
    feature(core_intrinsics),
    allow(internal_features)
)]

#[cfg(target_arch = "bpf")]
mod guard;
#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod services;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
