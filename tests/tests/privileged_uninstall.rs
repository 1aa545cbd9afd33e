//! `spright uninstall` on a node with a live datapath: after one pod's ADD
//! (programs attached at the test's cgroup and pinned, a record, an IP
//! allocation) and an installed conflist and plugin binary, the command
//! leaves none of it — and a second run has nothing to do.

use std::process::Command;

use spright_tests::{cni::Node, privileged::require, sandbox::workspace_bin};

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

    let uninstall = || {
        let out = Command::new(workspace_bin("spright"))
            .arg("uninstall")
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
    assert_eq!(uninstall().trim(), "", "a second run has nothing to do");

    // The runtime's later DEL of the pod still succeeds (nothing to undo but
    // the veth).
    let r = node.invoke("DEL", &conf, Some(&at)).unwrap();
    assert!(r.ok, "{r:#?}");
}
