//! Moving one direction of an accelerated connection to the TCP path, for
//! meshd's memory bound (meshd/src/membound.rs).
//!
//! The switch reuses `spr_tcponly_v1`, the map sk_msg already consults before
//! every redirect: once a socket's key is in it, every later message of that
//! socket is passed to TCP. Nothing is removed from the sockhash, so neither
//! socket loses its psock (dropping a psock purges the data queued in it) and
//! the other direction keeps its redirect.

use std::{collections::HashSet, path::Path};

use aya::maps::{HashMap, MapData, MapError, SockHash};
use spright_common::{SockKey, names};

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
