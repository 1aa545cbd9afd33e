//! The reading end of the flow events (`spr_flows_v1`, a BPF ring buffer)
//! and the count of events the kernel lost to a full ring.

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    path::Path,
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use spright_common::{CONFIG_NO_FLOW_EVENTS, FlowEvent, names};

use crate::{Error, pins::from_pin};

/// Consumer of the flow ring buffer. Readiness: the descriptor polls
/// readable when events are waiting (for `epoll`/tokio's `AsyncFd`).
pub struct FlowReader {
    ring: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for FlowReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowReader").finish_non_exhaustive()
    }
}

impl FlowReader {
    /// Opens the pinned ring buffer of an installed datapath (one consumer
    /// at a time: each event is delivered once).
    pub fn open(bpffs: &Path) -> Result<Self, Error> {
        Ok(Self {
            ring: from_pin(bpffs, names::FLOWS)?,
            lost: from_pin(bpffs, names::FLOWS_LOST)?,
        })
    }

    /// The next waiting event, if any. Entries that are not a whole event
    /// (an older or newer layout) are skipped.
    pub fn next_event(&mut self) -> Option<FlowEvent> {
        loop {
            let item = self.ring.next()?;
            if let Some(e) = FlowEvent::from_bytes(&item) {
                return Some(e);
            }
        }
    }

    /// Events the kernel could not write because the ring was full, summed
    /// over the CPUs.
    pub fn lost(&self) -> Result<u64, Error> {
        let per_cpu = self
            .lost
            .get(&0, 0)
            .map_err(Error::map("read", names::FLOWS_LOST))?;
        Ok(per_cpu.iter().sum())
    }
}

impl AsFd for FlowReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for FlowReader {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// Turns the programs' flow events on or off (`spr_config_v1`). Off, the
/// programs write no events and keep no per-socket flow state.
pub fn set_flow_events(bpffs: &Path, on: bool) -> Result<(), Error> {
    crate::config::set_config_flag(bpffs, CONFIG_NO_FLOW_EVENTS, !on)
}
