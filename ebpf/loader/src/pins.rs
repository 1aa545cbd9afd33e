//! The pin directory on bpffs: where it is by default, the exclusive lock
//! that serialises installers on it, pins written under a temporary name and
//! renamed into place, the removal of every pin spright owns, and maps
//! reopened from their pins. Pin names themselves live in
//! `spright_common::names`, next to the programs that use them.

use std::{fs::File, io, path::Path};

use aya::{
    maps::{Map, MapData, MapError},
    pin::PinError,
    programs::links::PinnedLink,
};
use nix::fcntl::{Flock, FlockArg};
use spright_common::names;

use crate::{Error, system::is_bpffs};

/// Default pin directory on a node.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/spright";

/// Creates the pin directory if needed, checks it is on bpffs and takes an
/// exclusive lock on it (released on drop).
pub(crate) fn lock_pin_dir(dir: &Path) -> Result<Flock<File>, Error> {
    std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    if !is_bpffs(dir)? {
        return Err(Error::NotBpffs {
            path: dir.to_path_buf(),
        });
    }
    let f = File::open(dir).map_err(Error::io("open", dir))?;
    Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| Error::io("lock", dir)(e.into()))
}

/// Pins with `pin` under a temporary name, then renames it to `name`
/// (replacing an older pin atomically).
pub(crate) fn pin_via_rename(
    dir: &Path,
    name: &str,
    pin: impl FnOnce(&Path) -> Result<(), PinError>,
) -> Result<(), Error> {
    // bpffs refuses names with dots.
    let tmp = dir.join(format!("{name}_new"));
    remove_stale(&tmp)?;
    pin(&tmp).map_err(|e| Error::Pin {
        path: tmp.clone(),
        source: Box::new(e),
    })?;
    let path = dir.join(name);
    std::fs::rename(&tmp, &path).map_err(Error::io("rename a pin into", &path))
}

/// Every program attached to the cgroup by a pinned link, with its pin:
/// sockops, the connect/getpeername hooks and the splice guard.
pub(crate) fn cgroup_links() -> impl Iterator<Item = (&'static str, &'static str)> {
    std::iter::once((names::SOCKOPS_PROG, names::SOCKOPS_LINK_PIN))
        .chain(names::SOCK_ADDR_PROGS)
        .chain(std::iter::once((names::GUARD_PROG, names::GUARD_LINK_PIN)))
}

/// Detaches the programs and removes every pin spright owns in `dir`.
pub(crate) fn remove_pins(dir: &Path) -> Result<(), Error> {
    for (name, pin) in cgroup_links() {
        let link_pin = dir.join(pin);
        if link_pin.exists() {
            // Unpinning leaves this process the only holder; dropping it detaches.
            let link =
                PinnedLink::from_pin(&link_pin).map_err(Error::link("open the pin of", name))?;
            drop(link.unpin().map_err(Error::io("unpin", &link_pin))?);
        }
    }
    // Removing the sockhash's last reference releases the attached sk_msg
    // program (the kernel drops a sockmap's programs with its last user ref).
    for name in [names::SK_MSG_PROG_PIN]
        .into_iter()
        .chain(names::PINNED_MAPS)
    {
        remove_stale(&dir.join(name))?;
    }
    // Temporary pins of an install or upgrade interrupted before its rename
    // (unlinking a link pin with no other holder detaches it).
    let pins = std::iter::once(names::SK_MSG_PROG_PIN).chain(cgroup_links().map(|(_, pin)| pin));
    for name in pins {
        remove_stale(&dir.join(format!("{name}_new")))?;
    }
    Ok(())
}

fn remove_stale(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// The map pinned as `name` in `dir`, as the typed map `T`.
pub(crate) fn from_pin<T: TryFrom<Map, Error = MapError>>(
    dir: &Path,
    name: &'static str,
) -> Result<T, Error> {
    let data = MapData::from_pin(dir.join(name)).map_err(Error::map("open the pin of", name))?;
    Map::from_map_data(data)
        .and_then(T::try_from)
        .map_err(Error::map("open", name))
}
