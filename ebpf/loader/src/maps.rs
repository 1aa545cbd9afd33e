//! Typed access to the pinned maps of an installed datapath. [`Datapath`]
//! holds one handle per map (taken from a freshly loaded object or reopened
//! from the pins) and offers what the CNI plugin and meshd do with them:
//! endpoints and their counters, chain allows, network namespaces, the
//! Service table, its counters and live translations. Removals succeed when
//! the entry is already gone, and IP addresses become map keys as
//! IPv4-mapped IPv6 ([`addr_of`], [`ip_of`]).

use std::{net::IpAddr, path::Path};

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuHashMap};
use spright_common::{
    Addr, ChainPair, Counters, EndpointValue, SvcCounters, SvcKey, SvcValue, Translation, names,
};

use crate::{Error, pins::from_pin};

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
    /// Takes the maps out of an object this process loaded (and pinned).
    pub(crate) fn from_loaded(ebpf: &mut aya::Ebpf) -> Result<Self, Error> {
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

    /// Reopens the maps pinned in `dir` (the Service maps only when pinned).
    pub(crate) fn adopt(dir: &Path) -> Result<Self, Error> {
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

    /// Whether chain `from` may talk to chain `to` (the allow map's entry).
    pub fn chain_allowed(&self, pair: ChainPair) -> Result<bool, Error> {
        Ok(lookup(&self.allows, &pair, names::CHAIN_ALLOW)?.is_some())
    }

    /// The endpoint map's entry of `ip`, as the sockops program looks it up.
    pub fn endpoint(&self, ip: IpAddr) -> Result<Option<EndpointValue>, Error> {
        lookup(&self.endpoints, &addr_of(ip), names::ENDPOINTS)
    }

    /// The network namespace map's entry of `cookie`, as the connect
    /// programs look the caller up.
    pub fn netns_entry(&self, cookie: u64) -> Result<Option<EndpointValue>, Error> {
        lookup(&self.service_maps()?.netns, &cookie, names::NETNS)
    }

    /// The service table's entry of `key`.
    pub fn service(&self, key: SvcKey) -> Result<Option<SvcValue>, Error> {
        lookup(&self.service_maps()?.table, &key, names::SERVICES)
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

fn take<T: TryFrom<Map, Error = MapError>>(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
) -> Result<T, Error> {
    ebpf.take_map(name)
        .ok_or(Error::MissingMap { name })?
        .try_into()
        .map_err(Error::map("open", name))
}

fn collect<K, V>(
    iter: impl Iterator<Item = Result<(K, V), MapError>>,
    name: &'static str,
) -> Result<Vec<(K, V)>, Error> {
    iter.collect::<Result<_, _>>()
        .map_err(Error::map("iterate", name))
}

/// One entry of a hash map; `None` when the key is absent.
fn lookup<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    key: &K,
    name: &'static str,
) -> Result<Option<V>, Error> {
    match map.get(key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(Error::map("read", name)(e)),
    }
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
    fn addresses_round_trip_through_map_keys() {
        for ip in ["10.244.0.7", "fd00::7", "::1", "0.0.0.0"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_of(addr_of(ip)), ip, "{ip}");
        }
        assert!(addr_of("10.0.0.1".parse().unwrap()).is_ipv4_mapped());
    }
}
