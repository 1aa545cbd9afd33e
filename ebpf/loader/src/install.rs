//! Installing the datapath and keeping it current: load the embedded object
//! with its maps pinned by name, attach the programs (sk_msg to the pinned
//! sockhash, sockops and the connect/getpeername hooks to the cgroup) and pin
//! them; adopt what an earlier run pinned; swap this build's programs in over
//! the same maps on an upgrade; and uninstall. Every step runs under the pin
//! directory's lock, so the CNI plugin and meshd can race to call it.

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{Array, MapData, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, LsmCgroup, Program, ProgramError, SkMsg, SockOps,
        links::{FdLink, PinnedLink, ProgAttachLink},
    },
};
use nix::fcntl::Flock;
use spright_common::{SockKey, bound, guard, names};

use crate::{
    Datapath, Error,
    pins::{cgroup_links, from_pin, lock_pin_dir, pin_via_rename, remove_pins},
    system::check_cgroup2,
};

/// The compiled kernel programs (built from `ebpf/programs` in this build).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/spright-ebpf"));

/// Where the programs attach and where their state is pinned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// cgroup v2 directory whose sockets (and descendants') are watched.
    pub cgroup: PathBuf,
    /// bpffs directory holding the pins.
    pub bpffs: PathBuf,
}

/// How [`Datapath::ensure`] found the datapath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Installed {
    /// This call loaded, attached and pinned the programs.
    Fresh,
    /// The programs were already attached and pinned; this call adopted them.
    Adopted,
    /// Other programs were pinned; this call swapped this build's in, keeping
    /// the maps ([`Datapath::ensure_current`]).
    Upgraded,
}

/// Where a swap of the programs starts from ([`Datapath::ensure_for_swap`]).
#[expect(
    clippy::large_enum_variant,
    reason = "returned once and unpacked at once, like the Datapath every constructor returns by value"
)]
enum SwapStart {
    /// This call installed the programs: they are this build's already.
    Fresh(Datapath),
    /// An earlier install was found; the pin directory is locked for the swap.
    Locked(Flock<File>),
}

impl Datapath {
    /// Makes sure the programs are loaded, attached to `placement.cgroup` and
    /// pinned under `placement.bpffs`, then returns handles on the maps.
    ///
    /// Idempotent; concurrent callers (several CNI invocations and meshd) are
    /// serialised by an exclusive lock on the pin directory. The sockops link
    /// pin is written last, so its presence means "fully installed"; an
    /// interrupted install is completed by the next call (pinned maps are
    /// reused by name, a re-attached sk_msg program replaces the old one).
    ///
    /// A kernel older than [`crate::MIN_KERNEL`] is refused with an error
    /// that names the minimum.
    ///
    /// A failed install leaves nothing behind: the cgroup is checked before
    /// anything is created, and pins (and a pin directory this call created)
    /// are removed when a later step fails.
    pub fn ensure(placement: &Placement) -> Result<(Self, Installed), Error> {
        crate::system::check_kernel()?;
        let dir = &placement.bpffs;
        let link_pin = dir.join(names::SOCKOPS_LINK_PIN);
        if !link_pin.exists() {
            check_cgroup2(&placement.cgroup)?;
        }
        let created = !dir.exists();
        let result = lock_pin_dir(dir).and_then(|lock| {
            if link_pin.exists() {
                return Ok((Self::adopt(dir)?, Installed::Adopted));
            }
            let installed = Self::install(placement);
            if installed.is_err() {
                let _ = remove_pins(dir);
            }
            drop(lock);
            Ok((installed?, Installed::Fresh))
        });
        if result.is_err() && created {
            let _ = std::fs::remove_dir(dir);
        }
        result
    }

    /// Adopts an installed datapath without installing anything.
    pub fn open(bpffs: &Path) -> Result<Self, Error> {
        if !bpffs.join(names::SOCKOPS_LINK_PIN).exists() {
            return Err(Error::NotInstalled {
                path: bpffs.to_path_buf(),
                link: names::SOCKOPS_LINK_PIN,
            });
        }
        Self::adopt(bpffs)
    }

    fn install(placement: &Placement) -> Result<Self, Error> {
        let mut loaded = load(&placement.bpffs)?;
        Self::attach_loaded(&mut loaded, placement)
    }

    /// Like [`Datapath::ensure`], and when the pinned programs are not this
    /// build's (a DaemonSet upgrade), swaps this build's in place: the maps
    /// are kept (reused by their pins), the new sk_msg program replaces the
    /// old one on the sockhash, the new sockops link is attached before the
    /// old one's pin is renamed over (so no new connection is missed), and
    /// connections already in the sockhash keep the programs they started
    /// with to their end. meshd calls this at start-up; spright-cni only
    /// needs [`Datapath::ensure`].
    pub fn ensure_current(placement: &Placement) -> Result<(Self, Installed), Error> {
        let _lock = match Self::ensure_for_swap(placement)? {
            SwapStart::Fresh(dp) => return Ok((dp, Installed::Fresh)),
            SwapStart::Locked(lock) => lock,
        };
        let mut loaded = load(&placement.bpffs)?;
        if pinned_programs_match(&mut loaded.ebpf, &placement.bpffs)? {
            return Ok((Self::adopt(&placement.bpffs)?, Installed::Adopted));
        }
        check_cgroup2(&placement.cgroup)?;
        Ok((
            Self::attach_loaded(&mut loaded, placement)?,
            Installed::Upgraded,
        ))
    }

    /// Swaps this build's programs in unconditionally (what
    /// [`Datapath::ensure_current`] does when the pinned ones differ).
    pub fn replace_programs(placement: &Placement) -> Result<Self, Error> {
        let _lock = match Self::ensure_for_swap(placement)? {
            SwapStart::Fresh(dp) => return Ok(dp),
            SwapStart::Locked(lock) => lock,
        };
        check_cgroup2(&placement.cgroup)?;
        let mut loaded = load(&placement.bpffs)?;
        Self::attach_loaded(&mut loaded, placement)
    }

    /// The common start of [`Datapath::ensure_current`] and
    /// [`Datapath::replace_programs`]: [`Datapath::ensure`], and unless that
    /// installed this build's programs just now, the handles it adopted
    /// dropped and the pin directory locked for the swap.
    fn ensure_for_swap(placement: &Placement) -> Result<SwapStart, Error> {
        let (dp, how) = Self::ensure(placement)?;
        if how == Installed::Fresh {
            return Ok(SwapStart::Fresh(dp));
        }
        drop(dp);
        Ok(SwapStart::Locked(lock_pin_dir(&placement.bpffs)?))
    }

    /// Attaches and pins the programs of a loaded object, records which
    /// memory bound its sk_msg program can enforce, then takes its maps.
    fn attach_loaded(loaded: &mut Loaded, placement: &Placement) -> Result<Self, Error> {
        let guard_attached = attach_and_pin(&mut loaded.ebpf, placement)?;
        record_guard(&mut loaded.ebpf, guard_attached && loaded.guard_btf)?;
        let mut bound: Array<&mut MapData, u64> = loaded
            .ebpf
            .map_mut(names::BOUND)
            .ok_or(Error::MissingMap { name: names::BOUND })?
            .try_into()
            .map_err(Error::map("open", names::BOUND))?;
        bound
            .set(bound::RMEM_OFFSET, u64::from(loaded.rmem_offset), 0)
            .map_err(Error::map("write", names::BOUND))?;
        Self::from_loaded(&mut loaded.ebpf)
    }
}

/// Records in `spr_guard_v1` whether the splice guard is armed. What an
/// unarmed guard means for redirects is meshd's decision: its self-test
/// probes what the kernel and the guard really do (`CONFIG_NO_REDIRECT`).
fn record_guard(ebpf: &mut aya::Ebpf, armed: bool) -> Result<(), Error> {
    let mut slots: Array<&mut MapData, u64> = ebpf
        .map_mut(names::GUARD)
        .ok_or(Error::MissingMap { name: names::GUARD })?
        .try_into()
        .map_err(Error::map("open", names::GUARD))?;
    slots
        .set(guard::ARMED, u64::from(armed), 0)
        .map_err(Error::map("write", names::GUARD))?;
    Ok(())
}

/// Detaches the programs and removes every pin under `bpffs` (and the directory
/// when it is empty). Succeeds when nothing is installed.
pub fn uninstall(bpffs: &Path) -> Result<(), Error> {
    if !bpffs.exists() {
        return Ok(());
    }
    let lock = lock_pin_dir(bpffs)?;
    remove_pins(bpffs)?;
    drop(lock);
    match std::fs::remove_dir(bpffs) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // Someone else's pins live here too: leave the directory.
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTEMPTY) => Ok(()),
        Err(e) => Err(Error::io("remove", bpffs)(e)),
    }
}

/// Parses the object with its maps pinned by name in `dir` (existing pins
/// are reused, so maps and their entries survive reloads) and loads its
/// programs into the kernel.
///
/// The sk_msg program gets what its memory bound needs from this kernel's
/// BTF (`crate::btf`: two field offsets, the kfunc id). Should the verifier
/// refuse the program with them (a kernel without `bpf_cast_to_kern_ctx`
/// for sk_msg or BTF-typed loads), the object is loaded again without: the
/// bound is then left to meshd's poll, never the datapath.
///
/// The splice guard gets its offsets and syscall numbers the same way
/// (`crate::btf::GuardBtf`); when it cannot be loaded on this kernel the
/// rest of the datapath still is, and [`attach_and_pin`] reports it unarmed.
fn load(dir: &Path) -> Result<Loaded, Error> {
    let kernel = crate::btf::kernel_btf(Path::new(crate::btf::VMLINUX_BTF));
    let guard = kernel.guard.map_or([0; 5], |g| {
        [
            g.sysnr_offset,
            g.nr_splice,
            g.nr_sendfile,
            g.sock_sk_offset,
            g.user_data_offset,
        ]
    });
    let with = |btf: Option<crate::btf::KernelBoundBtf>| -> Result<Loaded, Error> {
        let (object, rmem, redir) = match btf {
            Some(k) => (with_kfunc(k.kern_ctx_kfunc), k.rmem_offset, k.redir_offset),
            None => (OBJECT.to_vec(), 0, 0),
        };
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(dir)
            .override_global(names::RMEM_OFFSET_GLOBAL, &rmem, true)
            .override_global(names::REDIR_OFFSET_GLOBAL, &redir, true);
        let globals = [
            names::GUARD_SYSNR_OFFSET_GLOBAL,
            names::GUARD_NR_SPLICE_GLOBAL,
            names::GUARD_NR_SENDFILE_GLOBAL,
            names::GUARD_SOCK_SK_OFFSET_GLOBAL,
            names::GUARD_USER_DATA_OFFSET_GLOBAL,
        ];
        for (name, value) in globals.iter().zip(&guard) {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader.load(&object).map_err(|e| Error::Load(Box::new(e)))?;
        load_programs(&mut ebpf)?;
        // Once, best effort: a kernel without BPF LSM (or whose verifier
        // refuses the guard) still gets the datapath; the guard then stays
        // unloaded, `attach_and_pin` reports it unattached.
        let _ = load_guard(&mut ebpf);
        Ok(Loaded {
            ebpf,
            rmem_offset: rmem,
            guard_btf: kernel.guard.is_some(),
        })
    };
    match with(kernel.bound) {
        Err(_) if kernel.bound.is_some() => with(None),
        r => r,
    }
}

/// The object with every call of the placeholder helper
/// (`bound::KERN_CTX_PLACEHOLDER`) turned into a call of the kfunc with BTF
/// id `kfunc`: `BPF_JMP|BPF_CALL` (0x85) with source register
/// `BPF_PSEUDO_KFUNC_CALL` (2) and the id as immediate.
fn with_kfunc(kfunc: u32) -> Vec<u8> {
    let mut object = OBJECT.to_vec();
    let mut from = [0x85, 0, 0, 0, 0, 0, 0, 0];
    from[4..].copy_from_slice(&bound::KERN_CTX_PLACEHOLDER.to_le_bytes());
    let mut to = [0x85, 0x20, 0, 0, 0, 0, 0, 0];
    to[4..].copy_from_slice(&kfunc.to_le_bytes());
    let mut i = 0;
    while i + 8 <= object.len() {
        if object[i..i + 8] == from {
            object[i..i + 8].copy_from_slice(&to);
            i += 8;
        } else {
            i += 1;
        }
    }
    object
}

/// A parsed object with its programs loaded.
struct Loaded {
    ebpf: aya::Ebpf,
    /// The offset its sk_msg program got (0: no kernel memory bound).
    rmem_offset: u32,
    /// Whether its splice guard got everything it needs from this kernel.
    guard_btf: bool,
}

/// The program `name` of the loaded object, as its type `T`.
fn program_of<'a, T>(ebpf: &'a mut aya::Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram { name })?
        .try_into()
        .map_err(Error::prog("look up", name))
}

/// Loads every program of the object into the kernel (those not loaded yet).
fn load_programs(ebpf: &mut aya::Ebpf) -> Result<(), Error> {
    let sk_msg = program_of::<SkMsg>(ebpf, names::SK_MSG_PROG)?;
    if sk_msg.fd().is_err() {
        sk_msg
            .load()
            .map_err(Error::prog("load", names::SK_MSG_PROG))?;
    }
    let sockops = program_of::<SockOps>(ebpf, names::SOCKOPS_PROG)?;
    if sockops.fd().is_err() {
        sockops
            .load()
            .map_err(Error::prog("load", names::SOCKOPS_PROG))?;
    }
    for (name, _) in names::SOCK_ADDR_PROGS {
        let prog = program_of::<CgroupSockAddr>(ebpf, name)?;
        if prog.fd().is_err() {
            prog.load().map_err(Error::prog("load", name))?;
        }
    }
    Ok(())
}

/// Loads the splice guard (a cgroup LSM program on `file_permission`).
fn load_guard(ebpf: &mut aya::Ebpf) -> Result<(), Error> {
    let guard = program_of::<LsmCgroup>(ebpf, names::GUARD_PROG)?;
    let btf = aya::Btf::from_sys_fs().map_err(|e| Error::Btf(Box::new(e)))?;
    guard
        .load("file_permission", &btf)
        .map_err(Error::prog("load", names::GUARD_PROG))
}

/// Whether the splice guard of this object is loaded (it is left out on
/// kernels that refuse it).
fn guard_loaded(ebpf: &aya::Ebpf) -> bool {
    ebpf.program(names::GUARD_PROG)
        .is_some_and(|p| p.fd().is_ok())
}

/// Loads the programs into the kernel (if not yet) and says whether they
/// are the ones pinned in `dir` (same instruction tags; a missing pin never
/// matches, so an install that predates a program gets it on upgrade).
fn pinned_programs_match(ebpf: &mut aya::Ebpf, dir: &Path) -> Result<bool, Error> {
    load_programs(ebpf)?;
    let tag = |ebpf: &aya::Ebpf, name: &'static str| -> Result<u64, Error> {
        Ok(ebpf
            .program(name)
            .ok_or(Error::MissingProgram { name })?
            .info()
            .map_err(Error::prog("inspect", name))?
            .tag())
    };
    let pinned_sk_msg = aya::programs::ProgramInfo::from_pin(dir.join(names::SK_MSG_PROG_PIN))
        .map_err(Error::prog("inspect the pin of", names::SK_MSG_PROG))?
        .tag();
    if pinned_sk_msg != tag(ebpf, names::SK_MSG_PROG)? {
        return Ok(false);
    }
    let with_guard = guard_loaded(ebpf);
    for (name, pin) in cgroup_links() {
        if name == names::GUARD_PROG && !with_guard {
            // This build cannot load its guard here: nothing to compare.
            continue;
        }
        if linked_program_tag(dir, pin, name)? != Some(tag(ebpf, name)?) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The tag of the program behind the link pinned as `pin`, if pinned.
fn linked_program_tag(
    dir: &Path,
    pin: &'static str,
    name: &'static str,
) -> Result<Option<u64>, Error> {
    let path = dir.join(pin);
    if !path.exists() {
        return Ok(None);
    }
    let link = PinnedLink::from_pin(&path).map_err(Error::link("open the pin of", name))?;
    let prog_id = FdLink::from(link)
        .info()
        .map_err(Error::link("inspect", name))?
        .program_id();
    Ok(aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .map(|p| p.tag()))
}

/// Attaches the loaded object's programs and pins them, each pin written
/// under a temporary name and renamed into place: on an upgrade the rename
/// drops the old pin (and with it the old sockops link) only after the new
/// program is attached.
///
/// Returns whether the splice guard is attached (its failure is not the
/// datapath's: the caller records it and stops new redirects).
fn attach_and_pin(ebpf: &mut aya::Ebpf, placement: &Placement) -> Result<bool, Error> {
    let dir = &placement.bpffs;
    // sk_msg first: once sockops runs, sockets land in the map.
    let socks: SockHash<MapData, SockKey> = from_pin(dir, names::SOCKHASH)?;
    load_programs(ebpf)?;
    let sk_msg = program_of::<SkMsg>(ebpf, names::SK_MSG_PROG)?;
    let link = sk_msg
        .attach(socks.fd())
        .map_err(Error::prog("attach", names::SK_MSG_PROG))?;
    let link = sk_msg
        .take_link(link)
        .map_err(Error::prog("take the link of", names::SK_MSG_PROG))?;
    pin_via_rename(dir, names::SK_MSG_PROG_PIN, |tmp| sk_msg.pin(tmp))?;
    // The attachment lives in the (pinned) sockhash, not in this process.
    // Turning the link into its base type disarms the wrapper's
    // detach-on-drop; dropping the base only closes this process's
    // descriptors, so nothing but the pins keeps the map alive and
    // `uninstall` really frees it (a leaked descriptor used to keep the
    // sockets redirected until the installing process exited).
    drop(ProgAttachLink::from(link));

    let cgroup = File::open(&placement.cgroup).map_err(Error::io("open", &placement.cgroup))?;
    load_programs(ebpf)?;
    // The connect/getpeername hooks before sockops, whose pin means
    // "installed". During an upgrade old and new hooks run side by side for
    // a moment, which is harmless: the first connect hook rewrites the
    // destination to a pod address that the second one does not translate,
    // and both getpeername hooks restore the same address.
    for (name, pin) in names::SOCK_ADDR_PROGS {
        let prog = program_of::<CgroupSockAddr>(ebpf, name)?;
        let link = prog
            .attach(&cgroup, CgroupAttachMode::Single)
            .map_err(Error::prog("attach", name))?;
        let link: FdLink = prog
            .take_link(link)
            .map_err(Error::prog("take the link of", name))?
            .try_into()
            .map_err(Error::link("convert", name))?;
        pin_via_rename(dir, pin, |tmp| link.pin(tmp).map(drop))?;
    }
    // The guard before sockops: no socket is redirected before splice from
    // it is refused.
    let guard = attach_guard(ebpf, dir, &cgroup);
    let sockops = program_of::<SockOps>(ebpf, names::SOCKOPS_PROG)?;
    // A bpf_link on a cgroup always coexists with other programs there
    // (the kernel attaches links in multi mode); link_create rejects the
    // explicit BPF_F_ALLOW_MULTI flag, so `Single` (flags 0) is correct.
    let link = sockops
        .attach(&cgroup, CgroupAttachMode::Single)
        .map_err(Error::prog("attach", names::SOCKOPS_PROG))?;
    let link: FdLink = sockops
        .take_link(link)
        .map_err(Error::prog("take the link of", names::SOCKOPS_PROG))?
        .try_into()
        .map_err(Error::link("convert", names::SOCKOPS_PROG))?;
    pin_via_rename(dir, names::SOCKOPS_LINK_PIN, |tmp| link.pin(tmp).map(drop))?;
    Ok(guard.is_ok())
}

/// Attaches the splice guard to the cgroup and pins its link (renamed over
/// an older one, like the other links).
fn attach_guard(ebpf: &mut aya::Ebpf, dir: &Path, cgroup: &File) -> Result<(), Error> {
    // Not loaded (see `load`): attaching fails, the guard is reported unarmed.
    let guard = program_of::<LsmCgroup>(ebpf, names::GUARD_PROG)?;
    let link = guard
        .attach(cgroup)
        .map_err(Error::prog("attach", names::GUARD_PROG))?;
    let link: FdLink = guard
        .take_link(link)
        .map_err(Error::prog("take the link of", names::GUARD_PROG))?
        .into();
    pin_via_rename(dir, names::GUARD_LINK_PIN, |tmp| link.pin(tmp).map(drop))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_object_has_every_program_and_pinned_map() {
        let obj = aya_obj_names(OBJECT);
        let progs = [names::SOCKOPS_PROG, names::SK_MSG_PROG]
            .into_iter()
            .chain(names::SOCK_ADDR_PROGS.map(|(prog, _)| prog));
        for name in names::PINNED_MAPS.into_iter().chain(progs) {
            assert!(
                obj.iter().any(|n| n == name),
                "{name} not in the object: {obj:?}"
            );
        }
    }

    /// Symbol names in the ELF object, without loading it (no privileges needed).
    fn aya_obj_names(obj: &[u8]) -> Vec<String> {
        // Map and program names appear as NUL-terminated strings in the symbol
        // string table; a plain scan is enough for a presence check.
        obj.split(|b| *b == 0)
            .filter_map(|s| std::str::from_utf8(s).ok())
            .map(str::to_owned)
            .collect()
    }
}
