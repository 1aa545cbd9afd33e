//! The eBPF datapath from the plugin's side: make sure it is installed and
//! put the pod's addresses into the endpoint map (ADD), take them out (DEL).
//! Acceleration is best effort: a node without BPF still gets networking.

use std::net::IpAddr;

use spright_ebpf::{Datapath, EndpointValue, Placement};

use crate::config::Config;

/// Whether the datapath took the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acceleration {
    On,
    Off,
}

/// Installs (or adopts) the datapath and records `ips`. On any failure the
/// entries written so far are removed and acceleration is off.
pub fn accelerate(config: &Config, ips: &[IpAddr], value: EndpointValue) -> Acceleration {
    let cgroup = match config
        .cgroup
        .clone()
        .map_or_else(spright_ebpf::default_cgroup, Ok)
    {
        Ok(cgroup) => cgroup,
        Err(e) => {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "no \"cgroup\" in the config and none detected; pod networking works without acceleration"
            );
            return Acceleration::Off;
        }
    };
    let placement = Placement {
        cgroup,
        bpffs: config.bpffs.clone(),
    };
    let mut dp = match Datapath::ensure(&placement) {
        Ok((dp, installed)) => {
            tracing::debug!(?installed, bpffs = %placement.bpffs.display(), "datapath ready");
            dp
        }
        Err(e) => {
            tracing::warn!(error = &e as &dyn std::error::Error, bpffs = %placement.bpffs.display(),
                "eBPF datapath unavailable; pod networking works without acceleration");
            return Acceleration::Off;
        }
    };
    for (i, ip) in ips.iter().enumerate() {
        if let Err(e) = dp.upsert_endpoint(*ip, value) {
            tracing::warn!(error = &e as &dyn std::error::Error, pod.ip = %ip, "cannot record endpoint; acceleration off");
            for done in &ips[..i] {
                let _ = dp.remove_endpoint(*done);
            }
            return Acceleration::Off;
        }
    }
    Acceleration::On
}

/// Removes `ips` from the endpoint map; an absent datapath is fine.
pub fn forget(config: &Config, ips: &[IpAddr]) {
    if ips.is_empty() {
        return;
    }
    match Datapath::open(&config.bpffs) {
        Ok(mut dp) => {
            for ip in ips {
                if let Err(e) = dp.remove_endpoint(*ip) {
                    tracing::warn!(error = &e as &dyn std::error::Error, pod.ip = %ip, "cannot remove endpoint");
                }
            }
        }
        Err(spright_ebpf::Error::NotInstalled { .. }) => {}
        Err(e) => tracing::warn!(
            error = &e as &dyn std::error::Error,
            "cannot open the datapath to remove endpoints"
        ),
    }
}

/// Whether a datapath is installed under the configured pin directory.
pub fn installed(config: &Config) -> bool {
    Datapath::open(&config.bpffs).is_ok()
}
