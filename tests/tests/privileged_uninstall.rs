//! `spright uninstall` on a node with a live datapath: after one pod's ADD
//! (programs attached at the test's cgroup and pinned, a record, an IP
//! allocation, the bridge, a MASQUERADE rule), an installed conflist and
//! plugin binary, a mounted shared-memory region, shm-csi's kubelet plugin
//! socket and registration socket, and a pod CIDR file, the command leaves
//! none of it — and a second run has nothing to do. It runs as the cleanup
//! DaemonSet does: in the node's network namespace, in the host's mount
//! namespace (`nsenter --net`).
//!
//! Checked after uninstall, by kind: CNI config entry, plugin binary (a
//! foreign plugin stays), pins, attached programs, endpoint records and the
//! state directory, host-local allocations, the bridge, iptables and
//! ip6tables rules with spright-cni's comment, region mounts and the region
//! root, the kubelet plugin directory, the registration socket, the pod CIDR
//! file and its directory.

use std::{path::Path, process::Command};

use spright_tests::{cni::Node, privileged::require, sandbox::workspace_bin};

/// Mount points at or below `dir`.
fn mounts_below(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect()
}

/// Unmounts what the test mounted, even when it fails before uninstall does.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        for m in mounts_below(&self.0).iter().rev() {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
    }
}

#[test]
fn privileged_uninstall_leaves_the_node_clean() {
    if !require("privileged_uninstall_leaves_the_node_clean") {
        return;
    }
    let mut node = Node::new("un").unwrap();
    let pod = node.add_pod().unwrap();
    let conf = node.conf("1.0.0", &["10.213.51.0/24"]);
    let mut at = node.attach(pod, "ctr-un");
    at.args = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p;SPRIGHT_CHAIN=demo".into();
    let r = node.invoke("ADD", &conf, Some(&at)).unwrap();
    assert!(r.ok, "{r:#?}");
    assert!(spright_ebpf::Datapath::open(&node.pins.path).is_ok());
    assert_eq!(node.records().len(), 1);
    assert_eq!(node.allocations("sprnet").len(), 1);

    // What install-cni would have written.
    let host = node.dir.path().join("host");
    let (bin, net_d) = (host.join("opt/cni/bin"), host.join("etc/cni/net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&net_d).unwrap();
    std::fs::copy(spright_tests::cni::plugin_bin(), bin.join("spright-cni")).unwrap();
    std::fs::write(bin.join("host-local"), "not ours").unwrap();
    std::fs::write(
        net_d.join("10-spright.conflist"),
        serde_json::to_vec(&serde_json::json!({ "name": "sprnet", "plugins": [conf] })).unwrap(),
    )
    .unwrap();

    // shm-csi's side: a region (a tmpfs whose source is the driver's name,
    // as shm-csi mounts it), its plugin socket and registration socket.
    let region_root = node.dir.path().join("run-spright/shm");
    let region = region_root.join("default/demo");
    std::fs::create_dir_all(&region).unwrap();
    let _unmount = Unmount(region_root.clone());
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "shm.spright.dev"])
        .arg(&region)
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(region.join("payload"), "bytes").unwrap();
    std::fs::write(region_root.join("state.json"), "{}").unwrap();
    let kubelet = node.dir.path().join("kubelet");
    let plugin_dir = kubelet.join("plugins/shm.spright.dev");
    let registry = kubelet.join("plugins_registry");
    std::fs::create_dir_all(&plugin_dir).unwrap();
    std::fs::create_dir_all(&registry).unwrap();
    let _csi = std::os::unix::net::UnixListener::bind(plugin_dir.join("csi.sock")).unwrap();
    let reg_sock = registry.join("shm.spright.dev-reg.sock");
    let _reg = std::os::unix::net::UnixListener::bind(&reg_sock).unwrap();
    let etc = node.dir.path().join("etc-spright");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("pod-cidr"), "10.213.51.0/24\n").unwrap();
    assert!(cni_links(&node).contains(&node.bridge));
    assert!(!node.masq_rules().unwrap().is_empty());

    let uninstall = || {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", node.node.path().display()))
            .arg(workspace_bin("spright"))
            .arg("uninstall")
            .arg(format!("--bridge={}", node.bridge))
            .arg(format!("--region-root={}", region_root.display()))
            .arg(format!("--kubelet-dir={}", kubelet.display()))
            .arg(format!(
                "--pod-cidr-file={}",
                etc.join("pod-cidr").display()
            ))
            .arg(format!("--cni-bin-dir={}", bin.display()))
            .arg(format!("--cni-conf-dir={}", net_d.display()))
            .arg(format!("--bpffs={}", node.pins.path.display()))
            .arg(format!("--state-dir={}", node.state_dir().display()))
            .arg(format!(
                "--ipam-dir={}",
                node.ipam_dir().join("sprnet").display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let attached = || {
        let out = Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&node.cgroup.path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert!(attached().contains("sock_ops"), "{}", attached());
    let said = uninstall();
    assert!(said.contains("detached"), "{said}");
    assert!(
        matches!(
            spright_ebpf::Datapath::open(&node.pins.path),
            Err(spright_ebpf::Error::NotInstalled { .. })
        ),
        "pins left in {}",
        node.pins.path.display()
    );
    // No program stays attached at the cgroup.
    assert_eq!(attached(), "", "still attached");
    assert!(node.records().is_empty() && !node.state_dir().exists());
    assert!(node.allocations("sprnet").is_empty());
    assert!(!bin.join("spright-cni").exists() && bin.join("host-local").exists());
    assert!(!net_d.join("10-spright.conflist").exists());
    assert!(!cni_links(&node).contains(&node.bridge), "{said}");
    assert_eq!(node.masq_rules().unwrap(), Vec::<String>::new(), "{said}");
    assert_eq!(mounts_below(&region_root), Vec::<String>::new(), "{said}");
    assert!(!region_root.exists(), "{said}");
    assert!(
        !plugin_dir.exists() && !reg_sock.exists() && registry.exists(),
        "{said}"
    );
    assert!(!etc.exists(), "{said}");
    assert_eq!(uninstall().trim(), "", "a second run has nothing to do");

    // The runtime's later DEL of the pod still succeeds (nothing to undo but
    // the veth).
    let r = node.invoke("DEL", &conf, Some(&at)).unwrap();
    assert!(r.ok, "{r:#?}");
}

fn cni_links(node: &Node) -> Vec<String> {
    spright_tests::cni::link_names(&node.node).unwrap()
}
