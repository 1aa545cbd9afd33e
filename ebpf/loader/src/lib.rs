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

use std::{
    fs::File,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{HashMap, Map, MapData, MapError, PerCpuHashMap, SockHash},
    pin::PinError,
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkMsg, SockOps,
        links::{FdLink, LinkError, PinnedLink, ProgAttachLink},
    },
};
use nix::fcntl::{Flock, FlockArg};
pub use spright_common::{
    Addr, Backend, ChainPair, Counters, ENDPOINT_FLAG_NO_REDIRECT, EndpointValue, IPPROTO_TCP,
    SockKey, SvcCounters, SvcKey, SvcValue, Translation, chain_id, limits, names,
};

mod pathswitch;
pub use pathswitch::PathSwitch;

/// The compiled kernel programs (built from `ebpf/programs` in this build).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/spright-ebpf"));

/// Default pin directory on a node.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/spright";

/// Errors of the datapath loader. Messages name the operation and the object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path} is not on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpffs { path: PathBuf },
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo); set the cgroup explicitly"
    )]
    NoCgroup2,
    #[error(
        "no kubelet pod cgroup found (looked for {}); set the cgroup explicitly \
         (never the cgroup v2 root {root}: the node's own sockets live there)",
        display_paths(looked)
    )]
    NoPodCgroup { root: PathBuf, looked: Vec<PathBuf> },
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to load the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name} missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("failed to {op} program {name}")]
    Program {
        op: &'static str,
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("failed to {op} map {name}")]
    Map {
        op: &'static str,
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("failed to {op} the link of program {name}")]
    Link {
        op: &'static str,
        name: &'static str,
        #[source]
        source: Box<LinkError>,
    },
    #[error("failed to pin {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<PinError>,
    },
    #[error("the datapath is not installed in {path} (no {link} pin)")]
    NotInstalled { path: PathBuf, link: &'static str },
    #[error(
        "map {name} is not pinned: the installed datapath predates Service translation \
         (restart meshd to upgrade it)"
    )]
    Outdated { name: &'static str },
}

impl Error {
    fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { op, path, source }
    }
    fn map(op: &'static str, name: &'static str) -> impl FnOnce(MapError) -> Self {
        move |source| Self::Map {
            op,
            name,
            source: Box::new(source),
        }
    }
    fn link(op: &'static str, name: &'static str) -> impl FnOnce(LinkError) -> Self {
        move |source| Self::Link {
            op,
            name,
            source: Box::new(source),
        }
    }
    fn prog(op: &'static str, name: &'static str) -> impl FnOnce(ProgramError) -> Self {
        move |source| Self::Program {
            op,
            name,
            source: Box::new(source),
        }
    }
}

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

/// Handles on the pinned maps of an installed datapath.
pub struct Datapath {
    endpoints: HashMap<MapData, Addr, EndpointValue>,
    allows: HashMap<MapData, ChainPair, u32>,
    counters: PerCpuHashMap<MapData, Addr, Counters>,
    /// `None` when adopting an install older than Service translation
    /// (until meshd's [`Datapath::ensure_current`] upgrades it).
    services: Option<ServiceMaps>,
}

/// The maps of Service translation.
struct ServiceMaps {
    netns: HashMap<MapData, u64, EndpointValue>,
    table: HashMap<MapData, SvcKey, SvcValue>,
    translations: HashMap<MapData, u64, Translation>,
    counters: PerCpuHashMap<MapData, SvcKey, SvcCounters>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath").finish_non_exhaustive()
    }
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
    /// A failed install leaves nothing behind: the cgroup is checked before
    /// anything is created, and pins (and a pin directory this call created)
    /// are removed when a later step fails.
    pub fn ensure(placement: &Placement) -> Result<(Self, Installed), Error> {
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
        let mut ebpf = load(&placement.bpffs)?;
        attach_and_pin(&mut ebpf, placement)?;
        Self::from_loaded(&mut ebpf)
    }

    fn from_loaded(ebpf: &mut aya::Ebpf) -> Result<Self, Error> {
        Ok(Self {
            endpoints: take(ebpf, names::ENDPOINTS)?,
            allows: take(ebpf, names::CHAIN_ALLOW)?,
            counters: take(ebpf, names::COUNTERS)?,
            services: Some(ServiceMaps {
                netns: take(ebpf, names::NETNS)?,
                table: take(ebpf, names::SERVICES)?,
                translations: take(ebpf, names::TRANSLATIONS)?,
                counters: take(ebpf, names::SERVICE_COUNTERS)?,
            }),
        })
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
        let (dp, how) = Self::ensure(placement)?;
        if how == Installed::Fresh {
            return Ok((dp, how));
        }
        drop(dp);
        let _lock = lock_pin_dir(&placement.bpffs)?;
        let mut ebpf = load(&placement.bpffs)?;
        if pinned_programs_match(&mut ebpf, &placement.bpffs)? {
            return Ok((Self::adopt(&placement.bpffs)?, Installed::Adopted));
        }
        check_cgroup2(&placement.cgroup)?;
        attach_and_pin(&mut ebpf, placement)?;
        Ok((Self::from_loaded(&mut ebpf)?, Installed::Upgraded))
    }

    /// Swaps this build's programs in unconditionally (what
    /// [`Datapath::ensure_current`] does when the pinned ones differ).
    pub fn replace_programs(placement: &Placement) -> Result<Self, Error> {
        let (dp, how) = Self::ensure(placement)?;
        if how == Installed::Fresh {
            return Ok(dp);
        }
        drop(dp);
        let _lock = lock_pin_dir(&placement.bpffs)?;
        check_cgroup2(&placement.cgroup)?;
        let mut ebpf = load(&placement.bpffs)?;
        attach_and_pin(&mut ebpf, placement)?;
        Self::from_loaded(&mut ebpf)
    }

    fn adopt(dir: &Path) -> Result<Self, Error> {
        let services = if dir.join(names::SERVICES).exists() {
            Some(ServiceMaps {
                netns: from_pin(dir, names::NETNS)?,
                table: from_pin(dir, names::SERVICES)?,
                translations: from_pin(dir, names::TRANSLATIONS)?,
                counters: from_pin(dir, names::SERVICE_COUNTERS)?,
            })
        } else {
            None
        };
        Ok(Self {
            endpoints: from_pin(dir, names::ENDPOINTS)?,
            allows: from_pin(dir, names::CHAIN_ALLOW)?,
            counters: from_pin(dir, names::COUNTERS)?,
            services,
        })
    }

    fn service_maps(&self) -> Result<&ServiceMaps, Error> {
        self.services.as_ref().ok_or(Error::Outdated {
            name: names::SERVICES,
        })
    }

    fn service_maps_mut(&mut self) -> Result<&mut ServiceMaps, Error> {
        self.services.as_mut().ok_or(Error::Outdated {
            name: names::SERVICES,
        })
    }

    /// Records the network namespace (by cookie) of a local endpoint, which
    /// is how the connect hooks know the caller's chain.
    pub fn upsert_netns(&mut self, cookie: u64, value: EndpointValue) -> Result<(), Error> {
        self.service_maps_mut()?
            .netns
            .insert(cookie, value, 0)
            .map_err(Error::map("insert into", names::NETNS))
    }

    /// Forgets a network namespace. Succeeds when already gone.
    pub fn remove_netns(&mut self, cookie: u64) -> Result<(), Error> {
        ignore_missing(self.service_maps_mut()?.netns.remove(&cookie))
            .map_err(Error::map("remove from", names::NETNS))
    }

    /// All recorded network namespaces.
    pub fn netns_entries(&self) -> Result<Vec<(u64, EndpointValue)>, Error> {
        collect(self.service_maps()?.netns.iter(), names::NETNS)
    }

    /// Sets the backends of one service table entry.
    pub fn set_service(&mut self, key: SvcKey, value: &SvcValue) -> Result<(), Error> {
        self.service_maps_mut()?
            .table
            .insert(key, value, 0)
            .map_err(Error::map("insert into", names::SERVICES))
    }

    /// Removes a service table entry and its counters. Succeeds when gone.
    pub fn remove_service(&mut self, key: SvcKey) -> Result<(), Error> {
        let maps = self.service_maps_mut()?;
        ignore_missing(maps.table.remove(&key))
            .map_err(Error::map("remove from", names::SERVICES))?;
        ignore_missing(maps.counters.remove(&key))
            .map_err(Error::map("remove from", names::SERVICE_COUNTERS))
    }

    /// The service table.
    pub fn services(&self) -> Result<Vec<(SvcKey, SvcValue)>, Error> {
        collect(self.service_maps()?.table.iter(), names::SERVICES)
    }

    /// Live translated connections, by socket cookie.
    pub fn translations(&self) -> Result<Vec<(u64, Translation)>, Error> {
        collect(
            self.service_maps()?.translations.iter(),
            names::TRANSLATIONS,
        )
    }

    /// Translation counters of one service table entry, summed over CPUs.
    pub fn service_counters(&self, key: SvcKey) -> Result<SvcCounters, Error> {
        match self.service_maps()?.counters.get(&key, 0) {
            Ok(per_cpu) => Ok(per_cpu
                .iter()
                .fold(SvcCounters::default(), |acc, c| SvcCounters {
                    translated: acc.translated + c.translated,
                    ..acc
                })),
            Err(MapError::KeyNotFound) => Ok(SvcCounters::default()),
            Err(e) => Err(Error::map("read", names::SERVICE_COUNTERS)(e)),
        }
    }

    /// Records (or updates) a local endpoint.
    pub fn upsert_endpoint(&mut self, ip: IpAddr, value: EndpointValue) -> Result<(), Error> {
        self.endpoints
            .insert(addr_of(ip), value, 0)
            .map_err(Error::map("insert into", names::ENDPOINTS))
    }

    /// Forgets a local endpoint and its counters. Succeeds when already gone.
    pub fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), Error> {
        let key = addr_of(ip);
        ignore_missing(self.endpoints.remove(&key))
            .map_err(Error::map("remove from", names::ENDPOINTS))?;
        ignore_missing(self.counters.remove(&key))
            .map_err(Error::map("remove from", names::COUNTERS))
    }

    /// All recorded endpoints.
    pub fn endpoints(&self) -> Result<Vec<(IpAddr, EndpointValue)>, Error> {
        Ok(collect(self.endpoints.iter(), names::ENDPOINTS)?
            .into_iter()
            .map(|(k, v)| (ip_of(k), v))
            .collect())
    }

    /// Allows connections from chain `from` to chain `to` and back.
    pub fn allow_chains(&mut self, a: u64, b: u64) -> Result<(), Error> {
        for (from, to) in [(a, b), (b, a)] {
            self.allows
                .insert(ChainPair { from, to }, 1, 0)
                .map_err(Error::map("insert into", names::CHAIN_ALLOW))?;
        }
        Ok(())
    }

    /// Counters of one endpoint, summed over CPUs (zero when it has none yet).
    pub fn counters(&self, ip: IpAddr) -> Result<Counters, Error> {
        match self.counters.get(&addr_of(ip), 0) {
            Ok(per_cpu) => Ok(per_cpu
                .iter()
                .fold(Counters::default(), |acc, c| acc.plus(c))),
            Err(MapError::KeyNotFound) => Ok(Counters::default()),
            Err(e) => Err(Error::map("read", names::COUNTERS)(e)),
        }
    }
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
/// are reused, so maps and their entries survive reloads).
fn load(dir: &Path) -> Result<aya::Ebpf, Error> {
    EbpfLoader::new()
        .default_map_pin_directory(dir)
        .load(OBJECT)
        .map_err(|e| Error::Load(Box::new(e)))
}

fn sk_msg_of(ebpf: &mut aya::Ebpf) -> Result<&mut SkMsg, Error> {
    ebpf.program_mut(names::SK_MSG_PROG)
        .ok_or(Error::MissingProgram {
            name: names::SK_MSG_PROG,
        })?
        .try_into()
        .map_err(Error::prog("look up", names::SK_MSG_PROG))
}

fn sockops_of(ebpf: &mut aya::Ebpf) -> Result<&mut SockOps, Error> {
    ebpf.program_mut(names::SOCKOPS_PROG)
        .ok_or(Error::MissingProgram {
            name: names::SOCKOPS_PROG,
        })?
        .try_into()
        .map_err(Error::prog("look up", names::SOCKOPS_PROG))
}

fn sock_addr_of<'a>(
    ebpf: &'a mut aya::Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, Error> {
    ebpf.program_mut(name)
        .ok_or(Error::MissingProgram { name })?
        .try_into()
        .map_err(Error::prog("look up", name))
}

/// Loads every program of the object into the kernel (those not loaded yet).
fn load_programs(ebpf: &mut aya::Ebpf) -> Result<(), Error> {
    let sk_msg = sk_msg_of(ebpf)?;
    if sk_msg.fd().is_err() {
        sk_msg
            .load()
            .map_err(Error::prog("load", names::SK_MSG_PROG))?;
    }
    let sockops = sockops_of(ebpf)?;
    if sockops.fd().is_err() {
        sockops
            .load()
            .map_err(Error::prog("load", names::SOCKOPS_PROG))?;
    }
    for (name, _) in names::SOCK_ADDR_PROGS {
        let prog = sock_addr_of(ebpf, name)?;
        if prog.fd().is_err() {
            prog.load().map_err(Error::prog("load", name))?;
        }
    }
    Ok(())
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
    let links = std::iter::once((names::SOCKOPS_PROG, names::SOCKOPS_LINK_PIN))
        .chain(names::SOCK_ADDR_PROGS);
    for (name, pin) in links {
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
fn attach_and_pin(ebpf: &mut aya::Ebpf, placement: &Placement) -> Result<(), Error> {
    let dir = &placement.bpffs;
    // sk_msg first: once sockops runs, sockets land in the map.
    let socks: SockHash<MapData, SockKey> = from_pin(dir, names::SOCKHASH)?;
    load_programs(ebpf)?;
    let sk_msg = sk_msg_of(ebpf)?;
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
        let prog = sock_addr_of(ebpf, name)?;
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
    let sockops = sockops_of(ebpf)?;
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
    pin_via_rename(dir, names::SOCKOPS_LINK_PIN, |tmp| link.pin(tmp).map(drop))
}

/// Pins with `pin` under a temporary name, then renames it to `name`
/// (replacing an older pin atomically).
fn pin_via_rename(
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

/// Detaches the programs and removes every pin spright owns in `dir`.
fn remove_pins(dir: &Path) -> Result<(), Error> {
    let links = std::iter::once((names::SOCKOPS_PROG, names::SOCKOPS_LINK_PIN))
        .chain(names::SOCK_ADDR_PROGS);
    for (name, pin) in links {
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
    let pins = [names::SK_MSG_PROG_PIN, names::SOCKOPS_LINK_PIN]
        .into_iter()
        .chain(names::SOCK_ADDR_PROGS.map(|(_, pin)| pin));
    for name in pins {
        remove_stale(&dir.join(format!("{name}_new")))?;
    }
    Ok(())
}

/// Where kubelet puts its pods below the cgroup v2 root, in the order
/// looked for: the systemd cgroup driver, cgroupfs, and kind's nested slice
/// (kubelet inside a node container started by systemd).
pub const POD_CGROUPS: &[&str] = &[
    "kubepods.slice",
    "kubepods",
    "kubelet.slice/kubelet-kubepods.slice",
];

/// The cgroup v2 directory to attach to when none is configured: the
/// kubelet's pod cgroup below the cgroup v2 mount, so the node's own sockets
/// are never seen. Never the root: when no pod cgroup exists the error names
/// every path looked for.
pub fn default_cgroup() -> Result<PathBuf, Error> {
    pod_cgroup(&cgroup2_mount().ok_or(Error::NoCgroup2)?)
}

/// The first of [`POD_CGROUPS`] that is a directory below `root`.
pub fn pod_cgroup(root: &Path) -> Result<PathBuf, Error> {
    let looked: Vec<PathBuf> = POD_CGROUPS.iter().map(|c| root.join(c)).collect();
    match looked.iter().find(|p| p.is_dir()) {
        Some(found) => Ok(found.clone()),
        None => Err(Error::NoPodCgroup {
            root: root.to_path_buf(),
            looked,
        }),
    }
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Mounts bpffs at `path` unless one is already there.
pub fn ensure_bpffs_mounted(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(Error::io("create", path))?;
    if is_bpffs(path)? {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::io("mount bpffs at", path)(e.into()))
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` on pure v2
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones), from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_mount(&info)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <src> <super opts>"
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

fn is_bpffs(path: &Path) -> Result<bool, Error> {
    Ok(fs_type(path)? == nix::sys::statfs::BPF_FS_MAGIC)
}

/// The filesystem type of `path`. Compared as nix's `FsType` constants:
/// `f_type` is signed on glibc and unsigned on musl, so no integer of one
/// width fits both.
fn fs_type(path: &Path) -> Result<nix::sys::statfs::FsType, Error> {
    nix::sys::statfs::statfs(path)
        .map(|st| st.filesystem_type())
        .map_err(|e| Error::io("statfs", path)(e.into()))
}

fn check_cgroup2(path: &Path) -> Result<(), Error> {
    if fs_type(path)? == nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        Ok(())
    } else {
        Err(Error::NotCgroup2 {
            path: path.to_path_buf(),
        })
    }
}

/// Creates the pin directory if needed, checks it is on bpffs and takes an
/// exclusive lock on it (released on drop).
fn lock_pin_dir(dir: &Path) -> Result<Flock<File>, Error> {
    std::fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
    if !is_bpffs(dir)? {
        return Err(Error::NotBpffs {
            path: dir.to_path_buf(),
        });
    }
    let f = File::open(dir).map_err(Error::io("open", dir))?;
    Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| Error::io("lock", dir)(e.into()))
}

fn remove_stale(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io("remove", path)(e)),
        _ => Ok(()),
    }
}

fn take<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
) -> Result<T, Error> {
    ebpf.take_map(name)
        .ok_or(Error::MissingMap { name })?
        .try_into()
        .map_err(Error::map("open", name))
}

fn from_pin<T: TryFrom<Map, Error = MapError>>(dir: &Path, name: &'static str) -> Result<T, Error> {
    let data = MapData::from_pin(dir.join(name)).map_err(Error::map("open the pin of", name))?;
    Map::from_map_data(data)
        .and_then(T::try_from)
        .map_err(Error::map("open", name))
}

fn collect<K, V>(
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
    name: &'static str,
) -> Result<Vec<(K, V)>, Error> {
    iter.collect::<Result<_, _>>()
        .map_err(Error::map("iterate", name))
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(ref e))
            if e.io_error.raw_os_error() == Some(nix::libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The map key of an address (IPv4 as IPv4-mapped IPv6).
pub fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_octets(v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => Addr::from_octets(v6.octets()),
    }
}

/// The address of a map key (IPv4-mapped shown as IPv4).
pub fn ip_of(addr: Addr) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr.octets());
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_pure_hosts() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw\n\
                      31 25 0:27 / /sys/fs/cgroup/cpu rw shared:10 - cgroup cgroup rw,cpu\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_cgroup2_mount("22 1 0:5 / /proc rw - proc proc rw\n"),
            None
        );
    }

    #[test]
    fn pod_cgroup_is_kubelets_and_never_the_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // Nothing of kubelet's: an error naming every path looked for.
        let err = pod_cgroup(r).unwrap_err();
        let text = err.to_string();
        for c in POD_CGROUPS {
            assert!(text.contains(&r.join(c).display().to_string()), "{text}");
        }
        assert!(matches!(err, Error::NoPodCgroup { .. }));
        // kind: kubelet's pods in a nested slice.
        std::fs::create_dir_all(r.join("kubelet.slice/kubelet-kubepods.slice")).unwrap();
        assert_eq!(
            pod_cgroup(r).unwrap(),
            r.join("kubelet.slice/kubelet-kubepods.slice")
        );
        // cgroupfs driver.
        std::fs::create_dir(r.join("kubepods")).unwrap();
        assert_eq!(pod_cgroup(r).unwrap(), r.join("kubepods"));
        // systemd driver.
        std::fs::create_dir(r.join("kubepods.slice")).unwrap();
        assert_eq!(pod_cgroup(r).unwrap(), r.join("kubepods.slice"));
        // A file of that name is no cgroup.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("kubepods"), "").unwrap();
        assert!(pod_cgroup(other.path()).is_err());
    }

    #[test]
    fn addresses_round_trip_through_map_keys() {
        for ip in ["10.244.0.7", "fd00::7", "::1", "0.0.0.0"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_of(addr_of(ip)), ip, "{ip}");
        }
        assert!(addr_of("10.0.0.1".parse().unwrap()).is_ipv4_mapped());
    }

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
