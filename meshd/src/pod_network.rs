//! Primary mode's pod network (`--cni-mode primary`): what flannel's
//! `host-gw` backend and kube-router do, from the Node objects, so no node
//! needs a hand step.
//!
//! - This node's pod CIDRs come from its Node's `spec.podCIDRs` (the
//!   controller manager's allocation; `spec.podCIDR` on old objects) and are
//!   published to `<state-dir>/pod-cidrs`, where install-cni's watcher takes
//!   them into spright's conflist. Until then there is no conflist and the
//!   node stays NotReady, which is what it should be.
//! - Every other Node's pod CIDRs are routed via its `InternalIP` of the same
//!   family (`ip route replace CIDR via IP proto 83`): a node that joins gets
//!   routes on every other node, a node that leaves loses them, and a changed
//!   address replaces the route. Routes carry spright's protocol number so
//!   only spright's routes are ever changed or removed.
//! - Like host-gw, this needs the nodes on one layer-2 segment (the gateway
//!   must be directly reachable); across routers, use chained mode.

use std::{collections::BTreeSet, net::IpAddr, path::Path};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The routing protocol number on spright's routes (`ip route show proto
/// 83`): user-defined values are above the kernel's and iproute2's well-known
/// ones; 83 is ASCII 'S'.
pub const ROUTE_PROTOCOL: u8 = 83;

/// What spright reads of a Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub pod_cidrs: Vec<IpNet>,
    pub internal_ips: Vec<IpAddr>,
}

impl NodeInfo {
    /// From a Node object (kubectl's JSON). A Node without a name is an
    /// error; missing CIDRs or addresses are not (the allocation comes later).
    pub fn parse(v: &serde_json::Value) -> Result<Self, String> {
        let name = v["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or("a Node without metadata.name")?
            .to_owned();
        let mut cidrs: Vec<&str> = v["spec"]["podCIDRs"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
            .unwrap_or_default();
        if cidrs.is_empty() {
            cidrs.extend(v["spec"]["podCIDR"].as_str());
        }
        let pod_cidrs = cidrs
            .iter()
            .map(|c| {
                c.parse::<IpNet>()
                    .map(|n| n.trunc())
                    .map_err(|e| format!("Node {name}: spec.podCIDRs {c:?}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        let internal_ips = v["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["type"] == "InternalIP")
            .filter_map(|a| a["address"].as_str()?.parse().ok())
            .collect();
        Ok(Self {
            name,
            pod_cidrs,
            internal_ips,
        })
    }
}

/// One route to another node's pods.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    pub via: IpAddr,
    pub node: String,
}

/// The pod network this node should have.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// This node's pod CIDRs (empty: not allocated yet, or no Node object).
    pub pod_cidrs: Vec<IpNet>,
    pub routes: Vec<Route>,
    /// Nodes whose pods cannot be routed, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unroutable: Vec<String>,
}

/// The plan for node `me` among `nodes` (pure).
pub fn plan<'a>(me: &str, nodes: impl IntoIterator<Item = &'a NodeInfo>) -> Plan {
    let nodes: Vec<&NodeInfo> = nodes.into_iter().collect();
    let mut p = Plan::default();
    if let Some(n) = nodes.iter().find(|n| n.name == me) {
        p.pod_cidrs.clone_from(&n.pod_cidrs);
    }
    let mut seen: BTreeSet<IpNet> = p.pod_cidrs.iter().copied().collect();
    for n in nodes.iter().filter(|n| n.name != me) {
        for dst in &n.pod_cidrs {
            let via = n
                .internal_ips
                .iter()
                .find(|ip| ip.is_ipv4() == dst.addr().is_ipv4());
            match via {
                Some(via) if seen.insert(*dst) => p.routes.push(Route {
                    dst: *dst,
                    via: *via,
                    node: n.name.clone(),
                }),
                Some(_) => p.unroutable.push(format!(
                    "{}: {dst} is already this or another node's pod CIDR",
                    n.name
                )),
                None => p.unroutable.push(format!(
                    "{}: no InternalIP of {dst}'s family in status.addresses",
                    n.name
                )),
            }
        }
    }
    p.routes.sort();
    p
}

/// The pod network as `/status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodNetworkStatus {
    #[serde(flatten)]
    pub plan: Plan,
    /// The last failure to publish the CIDRs or program a route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Publishes the plan's pod CIDRs for install-cni (only when they changed)
/// and makes spright's routes in this network namespace exactly the plan's.
/// Returns what it changed, for the log.
pub fn apply(state_dir: &Path, plan: &Plan) -> Result<Vec<String>, String> {
    let mut done = Vec::new();
    if !plan.pod_cidrs.is_empty() {
        let file = state_dir.join(spright_endpoint::POD_CIDRS_FILE);
        let mut text: String = plan
            .pod_cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        text.push('\n');
        if std::fs::read_to_string(&file).ok().as_deref() != Some(text.as_str()) {
            spright_endpoint::write_atomic(&file, text.as_bytes(), 0o644)
                .map_err(|e| format!("publishing the pod CIDRs to {}: {e}", file.display()))?;
            done.push(format!(
                "published pod CIDRs {}",
                text.trim().replace('\n', ", ")
            ));
        }
    }
    let nl = spright_cni::link::Netlink::new().map_err(|e| format!("netlink: {e}"))?;
    let have = nl
        .gateway_routes(ROUTE_PROTOCOL)
        .map_err(|e| e.to_string())?;
    for r in &plan.routes {
        if !have.contains(&(r.dst, r.via)) {
            nl.replace_gateway_route(r.dst, r.via, ROUTE_PROTOCOL)
                .map_err(|e| e.to_string())?;
            done.push(format!("route {} via {} (node {})", r.dst, r.via, r.node));
        }
    }
    for (dst, via) in have {
        if !plan.routes.iter().any(|r| r.dst == dst && r.via == via) {
            // A replaced route (same dst, new gateway) is already gone.
            if !plan.routes.iter().any(|r| r.dst == dst) {
                nl.delete_gateway_route(dst, via, ROUTE_PROTOCOL)
                    .map_err(|e| e.to_string())?;
            }
            done.push(format!("removed route {dst} via {via}"));
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidrs: &[&str], ips: &[&str]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            internal_ips: ips.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn parses_nodes_as_the_api_serves_them() {
        let n = NodeInfo::parse(&serde_json::json!({
            "metadata": { "name": "n1" },
            "spec": { "podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"] },
            "status": { "addresses": [
                { "type": "Hostname", "address": "n1" },
                { "type": "InternalIP", "address": "192.168.1.11" },
                { "type": "InternalIP", "address": "fd00::11" },
            ] },
        }))
        .unwrap();
        assert_eq!(
            n,
            node(
                "n1",
                &["10.244.1.0/24", "fd00:10:244:1::/64"],
                &["192.168.1.11", "fd00::11"]
            )
        );
        // Older objects: only the singular field.
        let old = NodeInfo::parse(&serde_json::json!({
            "metadata": { "name": "n2" }, "spec": { "podCIDR": "10.244.2.0/24" },
        }))
        .unwrap();
        assert_eq!(old.pod_cidrs, ["10.244.2.0/24".parse::<IpNet>().unwrap()]);
        let e = NodeInfo::parse(&serde_json::json!({
            "metadata": { "name": "n3" }, "spec": { "podCIDRs": ["banana"] },
        }))
        .unwrap_err();
        assert!(e.contains("n3") && e.contains("banana"), "{e}");
        assert!(NodeInfo::parse(&serde_json::json!({ "spec": {} })).is_err());
    }

    #[test]
    fn routes_every_other_nodes_pods_via_its_address_of_the_same_family() {
        let nodes = [
            node(
                "a",
                &["10.244.1.0/24", "fd00:1::/64"],
                &["192.168.1.1", "fd00::1"],
            ),
            node("b", &["10.244.2.0/24", "fd00:2::/64"], &["192.168.1.2"]),
            node("c", &[], &["192.168.1.3"]),
            node("d", &["10.244.1.0/24"], &["192.168.1.4"]),
        ];
        let p = plan("a", &nodes);
        assert_eq!(
            p.pod_cidrs,
            [
                "10.244.1.0/24".parse::<IpNet>().unwrap(),
                "fd00:1::/64".parse().unwrap()
            ]
        );
        assert_eq!(
            p.routes,
            [Route {
                dst: "10.244.2.0/24".parse().unwrap(),
                via: "192.168.1.2".parse().unwrap(),
                node: "b".into(),
            }]
        );
        // b has no IPv6 address; d claims a's own CIDR, which is never
        // routed away: both reported, neither followed.
        assert_eq!(p.unroutable.len(), 2, "{:?}", p.unroutable);
        assert!(
            p.unroutable[0].starts_with("b: no InternalIP"),
            "{:?}",
            p.unroutable
        );
        assert!(
            p.unroutable[1].starts_with("d: 10.244.1.0/24 is already"),
            "{:?}",
            p.unroutable
        );
        // Seen from b: a's and d's claims to one CIDR: the first wins, the
        // conflict is reported.
        let p = plan("b", &nodes);
        assert_eq!(p.routes.len(), 2, "{:?}", p.routes);
        assert!(
            p.unroutable.iter().any(|u| u.starts_with("d: ")),
            "{:?}",
            p.unroutable
        );
        // A node without a Node object yet has nothing to publish.
        assert!(plan("z", &nodes).pod_cidrs.is_empty());
    }
}
