//! User-space side of spright's datapath, shared by `spright-cni` and `meshd`.
//!
//! - [`Datapath::ensure`] loads, attaches and pins the kernel programs, or adopts
//!   what an earlier run pinned. It is idempotent and serialised by a lock on
//!   the pin directory, so the CNI plugin and meshd can race to call it.
//! - [`Datapath::open`] only adopts (for status readers).
//! - Typed access to the endpoint, chain-allow and counter maps.
//! - [`uninstall`] detaches and unpins everything.
//!
//! The object is built from source by this crate's build script and embedded.
//!
//! Modules, along aya's lines: `install` (install, adopt, upgrade,
//! uninstall), `maps` (typed map access), `pins` (the pin directory),
//! `system` (bpffs and cgroup v2 checks), `config` (the node-wide
//! switches and the splice guard's state), `error`, `pathswitch` (the memory
//! bound: meshd's switch and the kernel's), `btf` (the kernel field
//! offsets the kernel bound reads) and `flows` (the flow events' ring
//! buffer).

#![forbid(unsafe_code)]

mod btf;
mod config;
mod error;
mod flows;
mod install;
mod maps;
mod pathswitch;
mod pins;
mod system;

pub use btf::{
    GuardBtf, KernelBoundBtf, KernelBtf, VMLINUX_BTF, kernel_bound_btf, kernel_btf,
    rmem_alloc_offset,
};
pub use config::{GuardState, config_flags, guard_state, set_config_flag};
pub use error::Error;
pub use flows::{FlowReader, set_flow_events};
pub use install::{Installed, OBJECT, Placement, uninstall};
pub use maps::{Datapath, addr_of, ip_of};
pub use pathswitch::{KernelBound, PathSwitch};
pub use pins::DEFAULT_BPFFS_DIR;
pub use spright_common::{
    Addr, Backend, CONFIG_NO_REDIRECT, CONFIG_NO_SPLICE_GUARD, ChainPair, Counters,
    ENDPOINT_FLAG_NO_REDIRECT, EndpointValue, FlowEvent, IPPROTO_TCP, SockKey, SvcCounters, SvcKey,
    SvcValue, Translate, Translation, Verdict, chain_id, flow, limits, names, translation_chain,
    verdict,
};
pub use system::{
    MIN_KERNEL, POD_CGROUPS, cgroup2_mount, check_kernel, default_cgroup, ensure_bpffs_mounted,
    kernel_version, pod_cgroup,
};
