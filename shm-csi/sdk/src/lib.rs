//! spright-shm: zero-copy hops between chained functions.
//!
//! The functions of a chain share one memory region, mounted into each pod by
//! the `shm.spright.dev` CSI driver. [`Pool::open`] maps the pool file in that
//! region (creating it on first use); [`Pool::alloc`] hands out a [`Buf`]; a
//! function fills it and turns it into a 16-byte [`Descriptor`]
//! ([`Buf::into_descriptor`]) that it sends to the next function over an
//! ordinary TCP connection ([`send`], [`recv`]), which spright's datapath
//! redirects socket to socket. The receiver turns the descriptor back into a
//! `Buf` with [`Pool::take`] and works on the bytes in place. A `Buf` that is
//! dropped returns its slot to the pool.
//!
//! [`event`] runs a function the way SPRIGHT does: one thread asleep in
//! `epoll` until descriptors arrive, then the function run to completion
//! on each of them, with everything that is ready handled in one wake-up
//! and sent on in one write. The author writes only what happens to one
//! payload ([`event::stage`]); [`event::gateway`] is the chain's HTTP front.
//! Code with its own threads and blocking sockets uses [`send`] and
//! [`recv`], and answers HTTP with a [`ResponseWriter`] (Nagle off, one
//! write per response). [`work`] is the benchmarks' definition of a
//! function's work.
//!
//! # Layout (all offsets, never pointers: every process maps the file elsewhere)
//!
//! ```text
//! 0        header: magic, version, length, chunk count, next free chunk,
//!                  one free-list head per size class, one class byte per chunk
//! 8 KiB    chunk 0 (4 MiB) | chunk 1 | ...
//! chunk    slot: 64-byte header (generation, state, next) + payload of the class size
//! ```
//!
//! Size classes are 64 B … 1 MiB (×4). A chunk is given to a class when the
//! class runs dry and stays with it. Each class keeps a lock-free free list
//! (a Treiber stack whose head packs a 32-bit ABA tag with the slot's offset
//! in 64-byte units).
//!
//! # Ownership and validation
//!
//! A slot is FREE, OWNED (exactly one `Buf` in one process) or SENT (a
//! descriptor is on its way). Every state change is one compare-and-swap, so
//! two processes can never both own a slot. The generation is bumped on each
//! free: a descriptor of a freed (or freed and reused) slot fails with
//! [`Error::Stale`]; out-of-range, misaligned, over-long and double-taken
//! descriptors fail with their own errors.
//!
//! # What a crash can leak (and what it cannot break)
//!
//! No lock is ever held, so a process that dies at any instruction never
//! blocks the others. It can leak: the slots it owned or had sent to a peer
//! that also died (state OWNED/SENT forever); one slot if it died between
//! popping it and marking it owned; the rest of a chunk if it died while
//! carving it. Leaks last until the region is freed, which the CSI driver does
//! when the chain's last pod on the node leaves. Pids are not comparable
//! across pod pid namespaces, so leaked slots are not reclaimed by owner
//! liveness. The pool file is created under an advisory file lock, released
//! by the kernel if the creator dies; a header the dead creator never wrote
//! is formatted by the next process that opens the pool.

pub mod event;
mod map;
mod pool;
mod respond;
mod wire;
pub mod work;

pub use pool::{Buf, CLASS_SIZES, POOL_FILE, POOL_VERSION, Pool, Stats};
pub use respond::{COPY_LIMIT, ResponseWriter};
pub use wire::{Descriptor, recv, send};

/// Errors of the pool and of descriptor validation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to {op} pool file {path}")]
    Io {
        op: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a spright pool (bad magic or size)")]
    NotAPool { path: std::path::PathBuf },
    /// The pool was formatted by an SDK with another layout version: every
    /// process of a chain must use SDKs of the same pool version.
    #[error(
        "{path} is a spright pool of version {found}, this SDK reads version {expected} (upgrade every function of the chain to one SDK pool version)"
    )]
    Version {
        path: std::path::PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("pool size {size} is too small (at least {min} bytes)")]
    TooSmall { size: u64, min: u64 },
    #[error("allocation of {0} bytes exceeds the largest size class (1 MiB)")]
    TooLarge(usize),
    #[error("pool is out of memory for {0}-byte buffers")]
    OutOfMemory(usize),
    #[error("descriptor offset {offset} is outside the pool's allocated chunks")]
    OutOfRange { offset: u64 },
    #[error("descriptor offset {offset} is not the start of a slot")]
    Misaligned { offset: u64 },
    #[error("descriptor length {len} exceeds its slot's capacity {capacity}")]
    TooLong { len: u32, capacity: u32 },
    #[error(
        "stale descriptor: slot at offset {offset} is at generation {current}, descriptor has {generation} (freed or reused)"
    )]
    Stale {
        offset: u64,
        generation: u32,
        current: u32,
    },
    #[error("descriptor for offset {offset} was already taken (or never sent)")]
    NotSent { offset: u64 },
}
