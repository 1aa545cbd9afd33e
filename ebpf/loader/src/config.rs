//! The node-wide switches of the programs (`spr_config_v1`) and the splice
//! guard's state (`spr_guard_v1`).

use std::path::Path;

use aya::maps::{Array, MapData};
use spright_common::{guard, names};

use crate::{Error, pins::from_pin};

/// The `CONFIG_*` flags the programs see now.
pub fn config_flags(bpffs: &Path) -> Result<u32, Error> {
    let config: Array<MapData, u32> = from_pin(bpffs, names::CONFIG)?;
    config.get(&0, 0).map_err(Error::map("read", names::CONFIG))
}

/// Sets (`on`) or clears one `CONFIG_*` flag, leaving the others.
pub fn set_config_flag(bpffs: &Path, flag: u32, on: bool) -> Result<(), Error> {
    let mut config: Array<MapData, u32> = from_pin(bpffs, names::CONFIG)?;
    let flags = config
        .get(&0, 0)
        .map_err(Error::map("read", names::CONFIG))?;
    let want = if on { flags | flag } else { flags & !flag };
    if want != flags {
        config
            .set(0, want, 0)
            .map_err(Error::map("write", names::CONFIG))?;
    }
    Ok(())
}

/// What the splice guard of an installed datapath reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardState {
    /// Attached with everything it needs from this kernel (not proof that
    /// the kernel calls it: meshd's self-test tells).
    pub armed: bool,
    /// `splice()`/`sendfile()` calls it refused with EINVAL.
    pub refused: u64,
}

/// The splice guard's state; an install older than the guard reads as not
/// armed.
pub fn guard_state(bpffs: &Path) -> Result<GuardState, Error> {
    if !bpffs.join(names::GUARD).exists() {
        return Ok(GuardState::default());
    }
    let slots: Array<MapData, u64> = from_pin(bpffs, names::GUARD)?;
    let get = |slot| {
        slots
            .get(&slot, 0)
            .map_err(Error::map("read", names::GUARD))
    };
    Ok(GuardState {
        armed: get(guard::ARMED)? != 0,
        refused: get(guard::REFUSED)?,
    })
}
