//! Primary mode with no hand step on any node: three simulated nodes (each a
//! network namespace with its own cgroup, pins and state directory) on one
//! layer-2 "fabric" (a bridge in a namespace of its own, where the API
//! stand-in listens, as a control plane would). Node objects in the API say
//! each node's `spec.podCIDRs` and `InternalIP`.
//!
//! On every node, as the DaemonSet runs them: meshd (`--cni-mode primary`,
//! in the node's network namespace, watching the API) publishes the node's
//! pod CIDRs and routes the other nodes' pod CIDRs (host-gw); `spright
//! install-cni --once --mode primary` writes spright's conflist from what
//! meshd published; the runtime's ADD goes through that conflist.
//!
//! Checked: the conflist's range is the Node object's CIDR; routes follow the
//! objects (a third node joining gets routes on both others and to both
//! others; a node deleted from the API loses its routes everywhere); pods on
//! different nodes reach each other with their own source addresses (the
//! cluster CIDR is not masqueraded).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use spright_tests::{
    cni::{Node, plugin_bin, result_ips},
    kubeapi::FakeApi,
    privileged::require,
    sandbox::{Netns, Peer, netpeer_bin, unique, workspace_bin},
};

const TIMEOUT: Duration = Duration::from_secs(30);
/// The fabric: node `i` is 10.213.70.(i+1), the API 10.213.70.254.
const FABRIC: &str = "10.213.70";
const CLUSTER_CIDR: &str = "10.213.64.0/18";

fn pod_cidr(i: usize) -> String {
    format!("10.213.{}.0/24", 71 + i)
}

fn node_ip(i: usize) -> String {
    format!("{FABRIC}.{}", i + 1)
}

fn node_object(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": format!("node-{i}") },
        "spec": { "podCIDR": pod_cidr(i), "podCIDRs": [pod_cidr(i)] },
        "status": { "addresses": [
            { "type": "InternalIP", "address": node_ip(i) },
            { "type": "Hostname", "address": format!("node-{i}") },
        ] },
    })
}

/// meshd in a node's network namespace; killed by pid on drop.
struct Meshd {
    child: Child,
    log: PathBuf,
}

impl Meshd {
    fn start(node: &Node, i: usize, kubeconfig: &Path) -> Self {
        let log = node.dir.path().join("meshd.log");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", node.node.path().display()))
            .arg(workspace_bin("meshd"))
            .arg("--cgroup")
            .arg(&node.cgroup.path)
            .arg("--bpffs")
            .arg(&node.pins.path)
            .arg("--state-dir")
            .arg(node.state_dir())
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "--kubernetes",
                "on",
                "--cni-mode",
                "primary",
                "--no-selftest",
            ])
            .args(["--node-name", &format!("node-{i}")])
            .args(["--rescan-secs", "1", "--log", "meshd=debug,info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    fabric: Netns,
    nodes: Vec<Node>,
    meshd: Vec<Meshd>,
    api: FakeApi,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Self {
        let fabric = Netns::create(unique("pnf")).unwrap();
        fabric
            .ip(&["link", "add", "br0", "type", "bridge"])
            .unwrap();
        fabric
            .ip(&["addr", "add", &format!("{FABRIC}.254/24"), "dev", "br0"])
            .unwrap();
        fabric.ip(&["link", "set", "br0", "up"]).unwrap();
        let api =
            FakeApi::start_in(&fabric.path(), format!("{FABRIC}.254:0").parse().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = api.kubeconfig(dir.path()).unwrap();
        Self {
            fabric,
            nodes: Vec::new(),
            meshd: Vec::new(),
            api,
            kubeconfig,
            _dir: dir,
        }
    }

    /// A node joins: its link on the fabric, its Node object, its meshd.
    fn join(&mut self) -> usize {
        let i = self.nodes.len();
        let node = Node::new(&format!("pn{i}")).unwrap();
        let port = format!("f{i}");
        self.fabric
            .ip(&[
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &node.node.name,
            ])
            .unwrap();
        self.fabric
            .ip(&["link", "set", &port, "master", "br0", "up"])
            .unwrap();
        node.node
            .ip(&["addr", "add", &format!("{}/24", node_ip(i)), "dev", "eth0"])
            .unwrap();
        node.node.ip(&["link", "set", "eth0", "up"]).unwrap();
        node.node
            .exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
            .unwrap();
        std::fs::create_dir_all(node.state_dir()).unwrap();
        self.api.apply(node_object(i));
        self.meshd.push(Meshd::start(&node, i, &self.kubeconfig));
        self.nodes.push(node);
        i
    }

    /// spright's routes on node `i` (`proto 83`), as "dst via gw".
    fn routes(&self, i: usize) -> Vec<String> {
        let out = self.nodes[i]
            .node
            .ip(&["route", "show", "proto", "83"])
            .unwrap();
        let mut r: Vec<String> = out
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                Some(format!("{} via {}", w.first()?, w.get(2)?))
            })
            .collect();
        r.sort();
        r
    }

    fn wait_routes(&self, i: usize, others: &[usize]) {
        let mut want: Vec<String> = others
            .iter()
            .map(|&o| format!("{} via {}", pod_cidr(o), node_ip(o)))
            .collect();
        want.sort();
        let deadline = Instant::now() + TIMEOUT;
        while self.routes(i) != want {
            assert!(
                Instant::now() < deadline,
                "node {i}: routes {:?}, want {want:?}; meshd log:\n{}",
                self.routes(i),
                self.meshd[i].log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// install-cni's init container on node `i`, once meshd published the
    /// pod CIDR; returns the network config the runtime would run.
    fn install_cni(&self, i: usize) -> Value {
        let n = &self.nodes[i];
        let published = n.state_dir().join(spright_endpoint::POD_CIDRS_FILE);
        let deadline = Instant::now() + TIMEOUT;
        while std::fs::read_to_string(&published).ok().as_deref()
            != Some(format!("{}\n", pod_cidr(i)).as_str())
        {
            assert!(
                Instant::now() < deadline,
                "node {i}: no pod CIDR published in {}; meshd log:\n{}",
                published.display(),
                self.meshd[i].log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let net_d = n.dir.path().join("net.d");
        let out = Command::new(workspace_bin("spright"))
            .args(["install-cni", "--once", "--mode", "primary"])
            .arg("--conf-dir")
            .arg(&net_d)
            .arg("--bin-dir")
            .arg(n.dir.path().join("bin"))
            .arg("--plugin")
            .arg(plugin_bin())
            .arg("--state-dir")
            .arg(n.state_dir())
            .arg("--bpffs")
            .arg(&n.pins.path)
            .arg("--cgroup")
            .arg(&n.cgroup.path)
            // Never the host's /etc/spright.
            .arg("--pod-cidr-file")
            .arg(n.dir.path().join("no-override"))
            .args(["--cluster-cidr", CLUSTER_CIDR])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install-cni on node {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list: Value =
            serde_json::from_slice(&std::fs::read(net_d.join("10-spright.conflist")).unwrap())
                .unwrap();
        let mut conf = list["plugins"][0].clone();
        assert_eq!(conf["ipam"]["ranges"][0][0]["subnet"], pod_cidr(i));
        assert_eq!(conf["nonMasqueradeCIDRs"], json!([CLUSTER_CIDR]));
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        // host-local's allocations in the test's directory, not the host's.
        conf["ipam"]["dataDir"] = json!(n.ipam_dir());
        conf
    }

    /// A pod on node `i` through the installed conflist; returns its index
    /// and address.
    fn add_pod(&mut self, i: usize, conf: &Value) -> (usize, IpAddr) {
        let n = &mut self.nodes[i];
        let pod = n.add_pod().unwrap();
        let r = n
            .invoke("ADD", conf, Some(&n.attach(pod, &format!("ctr-pn{i}"))))
            .unwrap();
        assert!(r.ok, "ADD on node {i}: {r:#?}");
        let ip = result_ips(&r.stdout).unwrap()[0];
        let prefix = pod_cidr(i).trim_end_matches("0/24").to_owned();
        assert!(
            ip.to_string().starts_with(&prefix),
            "{ip} is not in node {i}'s {}",
            pod_cidr(i)
        );
        (pod, ip)
    }

    /// A TCP transfer from a pod to a pod on another node; returns the
    /// source address the server saw.
    fn source_seen(&self, from: (usize, usize), to: (usize, usize), to_ip: IpAddr) -> IpAddr {
        let addr = std::net::SocketAddr::new(to_ip, 7070).to_string();
        let peer = |ns: &Netns, args: &[&str]| {
            let mut cmd = Command::new(netpeer_bin());
            cmd.arg("--netns").arg(ns.path()).args(args);
            Peer::spawn_command(cmd).unwrap()
        };
        let srv = peer(&self.nodes[to.0].pods[to.1], &["serve", "--listen", &addr]);
        assert_eq!(srv.line(TIMEOUT).unwrap(), "ready");
        let cli = peer(
            &self.nodes[from.0].pods[from.1],
            &["send", "--connect", &addr, "--bytes", "65536"],
        );
        let sent = cli.report(TIMEOUT).unwrap();
        assert_eq!(sent["intact"], true, "{sent}");
        cli.finish(TIMEOUT).unwrap();
        let served = srv.report(TIMEOUT).unwrap();
        srv.finish(TIMEOUT).unwrap();
        let peer_addr: std::net::SocketAddr = served["served"][0]["peer"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        peer_addr.ip()
    }
}

#[test]
fn privileged_pod_network_primary_mode_from_node_objects() {
    if !require("privileged_pod_network_primary_mode_from_node_objects") {
        return;
    }
    let mut c = Cluster::new();
    let (a, b) = (c.join(), c.join());
    c.wait_routes(a, &[b]);
    c.wait_routes(b, &[a]);
    let conf_a = c.install_cni(a);
    let conf_b = c.install_cni(b);
    let (pod_a, ip_a) = c.add_pod(a, &conf_a);
    let (pod_b, ip_b) = c.add_pod(b, &conf_b);
    assert_eq!(c.source_seen((a, pod_a), (b, pod_b), ip_b), ip_a);

    // A third node joins: only its Node object and its DaemonSet pod.
    let z = c.join();
    c.wait_routes(a, &[b, z]);
    c.wait_routes(b, &[a, z]);
    c.wait_routes(z, &[a, b]);
    let conf_z = c.install_cni(z);
    let (pod_z, ip_z) = c.add_pod(z, &conf_z);
    assert_eq!(c.source_seen((z, pod_z), (a, pod_a), ip_a), ip_z);
    assert_eq!(c.source_seen((b, pod_b), (z, pod_z), ip_z), ip_b);

    // A node leaves the cluster: its routes go everywhere else.
    c.api.delete(&node_object(b));
    c.wait_routes(a, &[z]);
    c.wait_routes(z, &[a]);
    drop(c);
}
