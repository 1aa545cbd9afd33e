//! The one step that makes the kernel match `Desired`: each map is read,
//! compared and corrected (insert or update what differs, remove what is
//! not wanted), then the connections of pods leaving their chain move to
//! TCP. Failures are logged per entry, never fatal: the next reconciliation
//! retries.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use spright_ebpf::{Datapath, PathSwitch, ip_of};
use tracing::{info, warn};

use crate::desired::Desired;

/// What one sync changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    pub upserted: usize,
    pub removed: usize,
    /// Service table entries set / removed.
    pub services_set: usize,
    pub services_removed: usize,
    /// Connection directions of leaving pods moved to TCP.
    pub switched: usize,
}

/// Makes the kernel match `want`. Order matters: endpoints first (a leaving
/// pod is flagged before its connections are walked, so none can join the
/// sockhash behind the walk), then callers, then the service table (a new
/// entry never names a caller the kernel cannot identify yet), then the
/// switch of leaving pods' open connections.
pub fn sync(dp: &mut Datapath, bpffs: &Path, want: &Desired) -> Synced {
    let (upserted, removed) = sync_map(
        dp,
        "endpoint map",
        &want.endpoints,
        Datapath::endpoints,
        |dp, ip, v| dp.upsert_endpoint(ip, *v),
        Datapath::remove_endpoint,
    );
    sync_map(
        dp,
        "netns map",
        &want.netns,
        Datapath::netns_entries,
        |dp, cookie, v| dp.upsert_netns(cookie, *v),
        Datapath::remove_netns,
    );
    let (services_set, services_removed) = sync_map(
        dp,
        "service table",
        &want.services,
        Datapath::services,
        Datapath::set_service,
        Datapath::remove_service,
    );
    let switched = if want.leaving.is_empty() {
        0
    } else {
        switch_leaving(bpffs, &want.leaving)
    };
    Synced {
        upserted,
        removed,
        services_set,
        services_removed,
        switched,
    }
}

/// Moves every redirected connection with an end in `leaving` to TCP, both
/// directions, through the memory bound's switch: nothing leaves the
/// sockhash, so no psock is dropped and nothing queued is lost or
/// reordered. Returns how many directions were switched now.
fn switch_leaving(bpffs: &Path, leaving: &std::collections::BTreeSet<IpAddr>) -> usize {
    let mut switch = match PathSwitch::open(bpffs) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %crate::error::chain(&e), "opening the path switch for pods leaving their chain");
            return 0;
        }
    };
    let keys = match switch.accelerated() {
        Ok(k) => k,
        Err(e) => {
            warn!(error = %crate::error::chain(&e), "listing redirected connections");
            return 0;
        }
    };
    let mut switched = 0;
    for key in keys
        .iter()
        .filter(|k| leaving.contains(&ip_of(k.local)) || leaving.contains(&ip_of(k.remote)))
    {
        match switch.is_tcp_only(key) {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                warn!(error = %crate::error::chain(&e), "reading the TCP-only mark");
                continue;
            }
        }
        match switch.force_tcp(key) {
            Ok(()) => {
                switched += 1;
                info!(local.addr = %ip_of(key.local), local.port = key.local_port,
                      remote.addr = %ip_of(key.remote), "a pod left its chain: its connection now takes the TCP path");
            }
            Err(e) => warn!(error = %crate::error::chain(&e), "moving a connection to TCP"),
        }
    }
    switched
}

/// All entries of a map, as `Datapath`'s readers return them.
type MapEntries<K, V> = Result<Vec<(K, V)>, spright_ebpf::Error>;

/// Makes one kernel map equal to `want`; returns (upserted, removed).
fn sync_map<K: Ord + Copy + std::fmt::Debug, V: PartialEq>(
    dp: &mut Datapath,
    what: &str,
    want: &BTreeMap<K, V>,
    read: fn(&Datapath) -> MapEntries<K, V>,
    upsert: fn(&mut Datapath, K, &V) -> Result<(), spright_ebpf::Error>,
    remove: fn(&mut Datapath, K) -> Result<(), spright_ebpf::Error>,
) -> (usize, usize) {
    let have: BTreeMap<K, V> = match read(dp) {
        Ok(v) => v.into_iter().collect(),
        Err(e) => {
            warn!(error = %crate::error::chain(&e), map = what, "reading");
            return (0, 0);
        }
    };
    let mut upserted = 0;
    for (k, v) in want {
        if have.get(k) != Some(v) {
            match upsert(dp, *k, v) {
                Ok(()) => upserted += 1,
                Err(e) => {
                    warn!(key = ?k, error = %crate::error::chain(&e), map = what, "updating");
                }
            }
        }
    }
    let mut removed = 0;
    for k in have.keys().filter(|k| !want.contains_key(k)) {
        match remove(dp, *k) {
            Ok(()) => removed += 1,
            Err(e) => warn!(key = ?k, error = %crate::error::chain(&e), map = what, "removing"),
        }
    }
    (upserted, removed)
}
