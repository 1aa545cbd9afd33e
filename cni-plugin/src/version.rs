//! CNI spec versions and the result shapes of each.
//!
//! Internally a result is the 1.0 shape ([`CniResult`]); [`CniResult::to_json`]
//! renders it in the version the config asks for: 0.3.x and 0.4.0 carry a
//! `version` ("4"/"6") on every IP config, 1.0.0 and 1.1.0 do not. Parsing
//! accepts every shape the IPAM plugin or a previous plugin may emit.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// Versions this plugin speaks, oldest first.
pub const SUPPORTED: &[&str] = spright_endpoint::CNI_VERSIONS;
/// The newest version.
pub const CURRENT: &str = spright_endpoint::CNI_VERSION;

/// A spec version as (major, minor, patch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u8, pub u8, pub u8);

impl Version {
    pub const V0_4_0: Self = Self(0, 4, 0);
    pub const V1_0_0: Self = Self(1, 0, 0);
    pub const V1_1_0: Self = Self(1, 1, 0);

    /// Parses a version this plugin supports.
    pub fn supported(s: &str) -> Result<Self> {
        let bad = || Error::IncompatibleVersion {
            version: s.to_owned(),
            supported: SUPPORTED.join(", "),
        };
        if !SUPPORTED.contains(&s) {
            return Err(bad());
        }
        let mut parts = s.split('.').map(str::parse::<u8>);
        match (parts.next(), parts.next(), parts.next()) {
            (Some(Ok(a)), Some(Ok(b)), Some(Ok(c))) => Ok(Self(a, b, c)),
            _ => Err(bad()),
        }
    }

    /// Whether IP configs carry the `version` field (before 1.0.0).
    pub fn ips_have_version(self) -> bool {
        self < Self::V1_0_0
    }
}

/// The `VERSION` command's answer.
pub fn version_info() -> Value {
    json!({ "cniVersion": CURRENT, "supportedVersions": SUPPORTED })
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// A result (ADD output, IPAM output, prevResult), version independent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

impl CniResult {
    /// Parses a result of any supported version (unknown fields, such as the
    /// pre-1.0 `version` of each IP config, are ignored).
    pub fn parse(value: &Value) -> serde_json::Result<Self> {
        Self::deserialize(value)
    }

    /// Renders the result in `version`.
    pub fn to_json(&self, version: &str) -> Value {
        let mut v = serde_json::to_value(self).expect("results always serialise");
        v["cniVersion"] = json!(version);
        let has_version = Version::supported(version).is_ok_and(Version::ips_have_version);
        if has_version && let Some(ips) = v["ips"].as_array_mut() {
            for (ip, cfg) in ips.iter_mut().zip(&self.ips) {
                ip["version"] = json!(if cfg.address.addr().is_ipv4() {
                    "4"
                } else {
                    "6"
                });
            }
        }
        v
    }

    /// The pod's addresses: those on `ifname` in a sandbox, or every address
    /// when the result does not say which interface carries it.
    pub fn pod_ips(&self, ifname: &str) -> Vec<IpAddr> {
        self.ips
            .iter()
            .filter(
                |ip| match ip.interface.and_then(|i| self.interfaces.get(i)) {
                    Some(iface) => iface.name == ifname && !iface.sandbox.is_empty(),
                    None => true,
                },
            )
            .map(|ip| ip.address.addr())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                sandbox: "/run/netns/p".into(),
                ..Default::default()
            }],
            ips: vec![
                IpConfig {
                    address: "10.213.0.5/24".parse().unwrap(),
                    gateway: Some("10.213.0.1".parse().unwrap()),
                    interface: Some(0),
                },
                IpConfig {
                    address: "fd00:213::5/64".parse().unwrap(),
                    gateway: None,
                    interface: Some(0),
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None,
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn only_listed_versions_are_supported() {
        for v in SUPPORTED {
            Version::supported(v).unwrap();
        }
        for v in ["0.2.0", "0.1.0", "1.2.0", "", "1.0", "x"] {
            assert_eq!(Version::supported(v).unwrap_err().code(), 1, "{v}");
        }
        assert!(Version::supported("0.3.1").unwrap() < Version::V0_4_0);
    }

    #[test]
    fn pre_1_0_results_carry_ip_versions() {
        for v in ["0.3.0", "0.3.1", "0.4.0"] {
            let j = sample().to_json(v);
            assert_eq!(j["cniVersion"], v);
            assert_eq!(j["ips"][0]["version"], "4");
            assert_eq!(j["ips"][1]["version"], "6");
            assert_eq!(j["ips"][0]["address"], "10.213.0.5/24");
            assert_eq!(j["ips"][0]["interface"], 0);
        }
        for v in ["1.0.0", "1.1.0"] {
            let j = sample().to_json(v);
            assert!(j["ips"][0].get("version").is_none(), "{j}");
            assert!(j.get("dns").is_none(), "{j}");
        }
    }

    #[test]
    fn parses_every_version_and_round_trips() {
        for v in SUPPORTED {
            let j = sample().to_json(v);
            assert_eq!(CniResult::parse(&j).unwrap(), sample(), "{v}");
        }
        let host_local = json!({"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.0.2/16","gateway":"10.1.0.1"}],"dns":{}});
        let r = CniResult::parse(&host_local).unwrap();
        assert_eq!(r.ips[0].gateway, Some("10.1.0.1".parse().unwrap()));
        assert_eq!(
            r.pod_ips("eth0"),
            vec!["10.1.0.2".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn pod_ips_skip_host_side_interfaces() {
        let mut r = sample();
        r.interfaces.insert(
            0,
            Interface {
                name: "veth0".into(),
                ..Default::default()
            },
        );
        r.ips.push(IpConfig {
            address: "10.9.9.9/32".parse().unwrap(),
            gateway: None,
            interface: Some(0),
        });
        r.ips[0].interface = Some(1);
        r.ips[1].interface = Some(1);
        assert_eq!(r.pod_ips("eth0").len(), 2);
        assert!(r.pod_ips("eth1").is_empty());
    }
}
