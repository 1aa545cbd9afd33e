//! Kubernetes Services in a simulated node: kube-proxy's DNAT emulated with
//! real iptables rules in the node namespace, and the Service/EndpointSlice
//! files meshd reads (the shape `kubectl get -o json` prints).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::sandbox::Netns;

/// Turns the node namespace into a kube-proxy (iptables mode) node: IP
/// forwarding on, bridged traffic through netfilter (so replies between pods
/// on one bridge are un-DNATed, as `br_netfilter` does on a real node), and
/// one DNAT rule sending `cluster` to `backend`.
pub fn kube_proxy_dnat(
    node: &Netns,
    cluster: SocketAddr,
    backend: SocketAddr,
) -> anyhow::Result<()> {
    let (iptables, forward) = if cluster.is_ipv4() {
        ("iptables", "net.ipv4.ip_forward=1")
    } else {
        ("ip6tables", "net.ipv6.conf.all.forwarding=1")
    };
    node.exec("sysctl", &["-qw", forward])?;
    let nf = if cluster.is_ipv4() {
        "net.bridge.bridge-nf-call-iptables=1"
    } else {
        "net.bridge.bridge-nf-call-ip6tables=1"
    };
    node.exec("sysctl", &["-qw", nf])
        .context("bridge netfilter (br_netfilter) is needed to emulate kube-proxy")?;
    let to = match backend {
        SocketAddr::V4(b) => b.to_string(),
        SocketAddr::V6(b) => format!("[{}]:{}", b.ip(), b.port()),
    };
    node.exec(
        iptables,
        &[
            "-w",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            &cluster.ip().to_string(),
            "-p",
            "tcp",
            "--dport",
            &cluster.port().to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ],
    )?;
    Ok(())
}

/// A ClusterIP Service with one TCP port named `http`.
pub fn service(name: &str, cluster_ip: IpAddr, port: u16, target_port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "type": "ClusterIP", "clusterIP": cluster_ip.to_string(), "clusterIPs": [cluster_ip.to_string()],
            "ports": [{ "name": "http", "port": port, "protocol": "TCP", "targetPort": target_port }],
        }
    })
}

/// The EndpointSlice of Service `name`: each backend with its readiness.
pub fn endpoint_slice(name: &str, port: u16, backends: &[(IpAddr, bool)]) -> Value {
    let v4 = backends.first().is_none_or(|(ip, _)| ip.is_ipv4());
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|(ip, ready)| {
            json!({ "addresses": [ip.to_string()],
                    "conditions": { "ready": ready, "serving": ready, "terminating": !ready } })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": { "name": format!("{name}-x7k2p"), "namespace": "default",
                      "labels": { "kubernetes.io/service-name": name } },
        "addressType": if v4 { "IPv4" } else { "IPv6" },
        "endpoints": endpoints,
        "ports": [{ "name": "http", "port": port, "protocol": "TCP" }],
    })
}

/// Writes `objects` as one `List` file `<dir>/<name>.json`, atomically
/// (meshd may read the directory at any moment).
pub fn write_service_file(dir: &Path, name: &str, objects: &[Value]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let body = json!({ "apiVersion": "v1", "kind": "List", "items": objects });
    let tmp = dir.join(format!(".{name}.json.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&body)?)?;
    std::fs::rename(&tmp, dir.join(format!("{name}.json")))?;
    Ok(())
}

/// The status entry of the Service port at `address`.
pub fn service_status(status: &Value, address: SocketAddr) -> Option<&Value> {
    status["services"]
        .as_array()?
        .iter()
        .find(|s| s["address"] == address.to_string())
}
