//! Two simulated nodes: each a network namespace with its own bridge, pod
//! CIDR, cgroup and datapath (as on two machines), joined by a veth
//! "underlay" with a route to the other node's pod CIDR — the static routing
//! a cluster without an overlay uses (see manifests/README.md).
//!
//! Pods of one chain on different nodes reach each other over the normal
//! path (a node's sockops only pairs sockets whose both ends are local
//! endpoints), and chain hops inside a node are redirected.

use std::{fmt::Write as _, net::IpAddr, process::Command, time::Duration};

use serde_json::Value;
use spright_tests::{
    cni::{self, Node},
    privileged::require,
    sandbox::{Peer, netpeer_bin},
};

const TIMEOUT: Duration = Duration::from_secs(20);
const UNDERLAY: [&str; 2] = ["10.213.255.1", "10.213.255.2"];
const POD_CIDRS: [&str; 2] = ["10.213.31.0/24", "10.213.32.0/24"];

struct Cluster {
    nodes: [Node; 2],
}

impl Cluster {
    fn new() -> Self {
        let nodes = [Node::new("mA").unwrap(), Node::new("mB").unwrap()];
        // The underlay link between the two node namespaces.
        let (a, b) = (&nodes[0].node, &nodes[1].node);
        a.ip(&[
            "link", "add", "under0", "type", "veth", "peer", "name", "under0", "netns", &b.name,
        ])
        .unwrap();
        for (i, n) in [a, b].into_iter().enumerate() {
            n.ip(&[
                "addr",
                "add",
                &format!("{}/30", UNDERLAY[i]),
                "dev",
                "under0",
            ])
            .unwrap();
            n.ip(&["link", "set", "under0", "up"]).unwrap();
            // Static route to the other node's pod CIDR via its underlay address.
            n.ip(&["route", "add", POD_CIDRS[1 - i], "via", UNDERLAY[1 - i]])
                .unwrap();
            n.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]).unwrap();
        }
        Self { nodes }
    }

    /// The node's conflist: its own pod CIDR, no masquerade between pods.
    fn conf(&self, n: usize) -> Value {
        let mut c = self.nodes[n].conf("1.0.0", &[POD_CIDRS[n]]);
        c["ipMasq"] = false.into();
        c
    }

    /// ADD pod `pod` of node `n` (chain via CNI_ARGS); returns its address.
    fn add(&self, n: usize, pod: usize, name: &str, chain: Option<&str>) -> IpAddr {
        let node = &self.nodes[n];
        let mut at = node.attach(pod, &format!("ctr-{name}"));
        at.args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}");
        if let Some(c) = chain {
            write!(at.args, ";SPRIGHT_CHAIN={c}").unwrap();
        }
        let r = node.invoke("ADD", &self.conf(n), Some(&at)).unwrap();
        assert!(r.ok, "ADD {name}: {r:#?}");
        cni::result_ips(&r.stdout).unwrap()[0]
    }

    fn del(&self, n: usize, pod: usize, name: &str) {
        let node = &self.nodes[n];
        let at = node.attach(pod, &format!("ctr-{name}"));
        let r = node.invoke("DEL", &self.conf(n), Some(&at)).unwrap();
        assert!(r.ok, "DEL {name}: {r:#?}");
    }

    /// A pod process of node `n`'s pod `pod` (in that node's cgroup).
    fn peer(&self, n: usize, pod: usize, args: &[&str]) -> Peer {
        let node = &self.nodes[n];
        let mut cmd = Command::new(netpeer_bin());
        cmd.arg("--cgroup")
            .arg(&node.cgroup.path)
            .arg("--netns")
            .arg(node.pods[pod].path())
            .args(args);
        Peer::spawn_command(cmd).unwrap()
    }

    /// One verified transfer from (n, pod) to `to`:port served by (sn, spod).
    fn transfer(&self, from: (usize, usize), server: (usize, usize), to: IpAddr, port: u16) {
        let addr = format!("{to}:{port}");
        let srv = self.peer(server.0, server.1, &["serve", "--listen", &addr]);
        assert_eq!(srv.line(TIMEOUT).unwrap(), "ready");
        let cli = self.peer(
            from.0,
            from.1,
            &["send", "--connect", &addr, "--bytes", "200000"],
        );
        let r = cli.report(TIMEOUT).unwrap();
        assert_eq!(r["intact"], true, "transfer to {addr}: {r}");
        cli.finish(TIMEOUT).unwrap();
        srv.finish(TIMEOUT).unwrap();
    }

    fn redirected(&self, n: usize, ip: IpAddr) -> u64 {
        spright_ebpf::Datapath::open(&self.nodes[n].pins.path)
            .unwrap()
            .counters(ip)
            .unwrap()
            .redirected_bytes
    }
}

#[test]
fn privileged_multinode_cross_node_normal_path_intra_node_redirect() {
    if !require("privileged_multinode_cross_node_normal_path_intra_node_redirect") {
        return;
    }
    let mut c = Cluster::new();
    for n in 0..2 {
        c.nodes[n].add_pod().unwrap();
    }
    c.nodes[0].add_pod().unwrap();
    let a0 = c.add(0, 0, "a0", Some("demo"));
    let a1 = c.add(0, 1, "a1", Some("demo"));
    let b0 = c.add(1, 0, "b0", Some("demo"));
    assert!(a0.to_string().starts_with("10.213.31.") && b0.to_string().starts_with("10.213.32."));

    // Across nodes, both directions: intact over the normal path, never
    // redirected (the peer is not a local endpoint of either node).
    c.transfer((0, 0), (1, 0), b0, 7101);
    c.transfer((1, 0), (0, 1), a1, 7102);
    assert_eq!(
        c.redirected(0, a0),
        0,
        "cross-node hop redirected on node A"
    );
    assert_eq!(
        c.redirected(0, a1),
        0,
        "cross-node hop redirected on node A"
    );
    assert_eq!(
        c.redirected(1, b0),
        0,
        "cross-node hop redirected on node B"
    );

    // Inside node A the same chain's hop goes socket to socket.
    c.transfer((0, 0), (0, 1), a1, 7103);
    assert!(
        c.redirected(0, a0) >= 200_000,
        "intra-node chain hop not redirected: {} bytes",
        c.redirected(0, a0)
    );
    assert_eq!(c.redirected(1, b0), 0);

    for (n, pod, name) in [(0, 0, "a0"), (0, 1, "a1"), (1, 0, "b0")] {
        c.del(n, pod, name);
    }
    for node in &c.nodes {
        let left: Vec<String> = node
            .leftovers("sprnet")
            .unwrap()
            .into_iter()
            .filter(|l| l != "node link under0")
            .collect();
        assert!(left.is_empty(), "left behind: {left:#?}");
    }
}
