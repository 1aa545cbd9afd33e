//! Moving one direction of an accelerated connection to the TCP path, for
//! the memory bound (meshd/src/membound.rs): by meshd's poll
//! ([`PathSwitch`]) or by the sk_msg program itself ([`KernelBound`]).
//!
//! The switch reuses `spr_tcponly_v1`, the map sk_msg already consults before
//! every redirect: once a socket's key is in it, every later message of that
//! socket is passed to TCP. Nothing is removed from the sockhash, so neither
//! socket loses its psock (dropping a psock purges the data queued in it) and
//! the other direction keeps its redirect.

use std::{collections::HashSet, path::Path};

use aya::maps::{Array, HashMap, MapData, MapError, SockHash};
use spright_common::{SockKey, bound, names};

use crate::{Error, pins::from_pin};

/// Handles on the sockhash (read only) and the TCP-only map.
pub struct PathSwitch {
    socks: SockHash<MapData, SockKey>,
    tcp_only: HashMap<MapData, SockKey, u32>,
}

impl std::fmt::Debug for PathSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PathSwitch").finish_non_exhaustive()
    }
}

impl PathSwitch {
    /// Opens the pinned maps of an installed datapath.
    pub fn open(bpffs: &Path) -> Result<Self, Error> {
        Ok(Self {
            socks: from_pin(bpffs, names::SOCKHASH)?,
            tcp_only: from_pin(bpffs, names::TCP_ONLY)?,
        })
    }

    /// Keys of every socket in the sockhash. (A sockhash with 4-byte values
    /// answers every user-space lookup with ENOSPC, present or not, so
    /// membership can only be read by walking the keys.)
    pub fn accelerated(&self) -> Result<HashSet<SockKey>, Error> {
        self.socks
            .keys()
            .collect::<Result<_, _>>()
            .map_err(Error::map("iterate", names::SOCKHASH))
    }

    /// Whether messages of the socket `key` already take the TCP path.
    pub fn is_tcp_only(&self, key: &SockKey) -> Result<bool, Error> {
        match self.tcp_only.get(key, 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(Error::map("read", names::TCP_ONLY)(e)),
        }
    }

    /// Every socket currently marked TCP-only (sockops removes a socket's
    /// mark when it closes).
    pub fn tcp_only(&self) -> Result<Vec<SockKey>, Error> {
        self.tcp_only
            .keys()
            .collect::<Result<_, _>>()
            .map_err(Error::map("iterate", names::TCP_ONLY))
    }

    /// From now on, every message the socket `key` sends takes the TCP path.
    /// Irreversible for the life of the connection: the peer reads its
    /// redirect queue before its TCP queue, so going back could reorder.
    pub fn force_tcp(&mut self, key: &SockKey) -> Result<(), Error> {
        self.tcp_only
            .insert(key, 1, 0)
            .map_err(Error::map("insert into", names::TCP_ONLY))
    }
}

/// The memory bound enforced by the sk_msg program itself: after each
/// redirect it reads the receiver's queued memory (`sk_rmem_alloc` of the
/// kernel message's `sk_redir`, BTF-typed) and, when this message takes it
/// past the limit, puts the sender into `spr_tcponly_v1`: the same switch
/// as meshd's, at the moment of the send, so the receiver holds at most the
/// limit plus one message.
pub struct KernelBound {
    bound: Array<MapData, u64>,
}

impl std::fmt::Debug for KernelBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelBound").finish_non_exhaustive()
    }
}

impl KernelBound {
    /// Opens the bound of an installed datapath; `Ok(None)` when its sk_msg
    /// program cannot enforce it (loaded without the field offsets: no BTF,
    /// or a kernel whose verifier refused the program with them).
    pub fn open(bpffs: &Path) -> Result<Option<Self>, Error> {
        let this = Self {
            bound: from_pin(bpffs, names::BOUND)?,
        };
        Ok((this.rmem_offset()? != 0).then_some(this))
    }

    fn slot(&self, slot: u32) -> Result<u64, Error> {
        self.bound
            .get(&slot, 0)
            .map_err(Error::map("read", names::BOUND))
    }

    /// Offset of `sk_rmem_alloc` in `struct sock` the attached sk_msg
    /// program reads (0: it cannot enforce the bound).
    pub fn rmem_offset(&self) -> Result<u64, Error> {
        self.slot(bound::RMEM_OFFSET)
    }

    /// The limit in bytes (0: off).
    pub fn limit(&self) -> Result<u64, Error> {
        self.slot(bound::LIMIT)
    }

    /// Sets the limit in bytes; 0 turns the kernel bound off.
    pub fn set_limit(&mut self, bytes: u64) -> Result<(), Error> {
        self.bound
            .set(bound::LIMIT, bytes, 0)
            .map_err(Error::map("write", names::BOUND))
    }

    /// Connections sk_msg moved to TCP since the datapath was installed.
    pub fn switches(&self) -> Result<u64, Error> {
        self.slot(bound::SWITCHES)
    }

    /// The receiver's queued memory when sk_msg last switched a connection.
    pub fn last_switch_bytes(&self) -> Result<u64, Error> {
        self.slot(bound::LAST_SWITCH_BYTES)
    }
}
