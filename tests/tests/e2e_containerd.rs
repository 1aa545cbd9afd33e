//! containerd 1.6 with its CRI plugin as the runtime, driven through the CRI
//! gRPC API the way the kubelet drives it, with spright-cni as its CNI.
//!
//! containerd runs by hand inside a node network namespace (nsenter) with
//! its own root, state, socket and config under a temporary directory, and
//! is killed by pid on drop. Pods get `cgroup_parent` below the test's
//! cgroup; with cgroupfs, runc creates `<v2>/<test cgroup>/<pod>/<container>`
//! next to the v1 controllers, so the programs attached at the test's cgroup
//! see the pods' sockets. The image (sandbox and containers alike) is a
//! busybox rootfs imported with podman and `ctr images import` — no registry.
//!
//! Two CNI setups: spright as the node's network, and the reference plugins
//! (`bridge` with `host-local`) with spright chained in by `spright
//! install-cni` (the default install), where the chain still comes from the
//! pod annotation.

use std::{collections::HashMap, net::IpAddr, path::Path, time::Duration};

use k8s_cri::v1::{
    self as cri, image_service_client::ImageServiceClient,
    runtime_service_client::RuntimeServiceClient,
};
use spright_tests::{
    kubelet::{self, CriNode, IMAGE, connect},
    runtime::{self, redirected},
};
use tonic::transport::Channel;

const SUBNET: &str = "10.213.41.0/24";
const CHAINED_SUBNET: &str = "10.213.42.0/24";

/// The node's CNI configuration.
#[derive(Clone, Copy)]
enum Cni {
    /// spright's own network (`spright`).
    Spright,
    /// The reference bridge (`refnet`), spright chained in by install-cni.
    ChainedIntoBridge,
}

impl Cni {
    fn network(self) -> &'static str {
        match self {
            Self::Spright => "spright",
            Self::ChainedIntoBridge => "refnet",
        }
    }
}

type Setup = CriNode;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn setup(cni: Cni) -> Setup {
    let (tag, network) = match cni {
        Cni::Spright => (
            "d",
            kubelet::Cni::Spright {
                network: cni.network(),
                subnet: SUBNET,
            },
        ),
        Cni::ChainedIntoBridge => (
            "dc",
            kubelet::Cni::ChainedIntoBridge {
                network: cni.network(),
                subnet: CHAINED_SUBNET,
            },
        ),
    };
    CriNode::new(tag, network).unwrap()
}

struct Pod {
    name: String,
    sandbox: String,
    container: String,
    ip: IpAddr,
    netns: Option<String>,
}

async fn run_pod(
    s: &Setup,
    rs: &mut RuntimeServiceClient<Channel>,
    name: &str,
    chain: Option<&str>,
) -> Pod {
    let mut annotations = HashMap::new();
    if let Some(c) = chain {
        annotations.insert(spright_endpoint::ANNOTATION_CHAIN.to_owned(), c.to_owned());
        annotations.insert(
            spright_endpoint::ANNOTATION_FUNCTION.to_owned(),
            name.to_owned(),
        );
    }
    let logs = s.base.dir.path().join("logs").join(name);
    std::fs::create_dir_all(&logs).unwrap();
    let config = cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            namespace: "default".to_owned(),
            attempt: 0,
        }),
        hostname: name.to_owned(),
        log_directory: logs.display().to_string(),
        annotations,
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: format!("/{}/{name}", s.base.name),
            ..Default::default()
        }),
        ..Default::default()
    };
    let sandbox = rs
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}\n{}", s.containerd.log_text()))
        .into_inner()
        .pod_sandbox_id;
    let container = rs
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "httpd".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: IMAGE.into(),
                    ..Default::default()
                }),
                command: ["/bin/httpd", "-f", "-p", "8080", "-h", "/www"]
                    .map(String::from)
                    .to_vec(),
                log_path: "httpd.log".into(),
                ..Default::default()
            }),
            sandbox_config: Some(config),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}\n{}", s.containerd.log_text()))
        .into_inner()
        .container_id;
    rs.start_container(cri::StartContainerRequest {
        container_id: container.clone(),
    })
    .await
    .unwrap();
    let status = rs
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: sandbox.clone(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let netns = kubelet::sandbox_netns(&status);
    if let Some(ns) = &netns {
        s.pod_netns.0.borrow_mut().push(ns.into());
    }
    Pod {
        name: name.to_owned(),
        sandbox,
        container,
        ip: kubelet::sandbox_ip(&status).unwrap_or_else(|e| panic!("{name}: {e:#}")),
        netns,
    }
}

/// `wget` inside `from`'s container (ExecSync: a process in its cgroup and
/// network namespace).
async fn fetch(rs: &mut RuntimeServiceClient<Channel>, from: &Pod, to: &Pod) -> String {
    let url = format!("http://{}:8080/", to.ip);
    for _ in 0..50 {
        let r = rs
            .exec_sync(cri::ExecSyncRequest {
                container_id: from.container.clone(),
                // busybox-static 1.35 segfaults on `wget -T`: bound it with timeout.
                cmd: ["timeout", "5", "wget", "-q", "-O", "-", &url]
                    .map(String::from)
                    .to_vec(),
                timeout: 10,
            })
            .await
            .unwrap()
            .into_inner();
        if r.exit_code == 0 {
            return String::from_utf8_lossy(&r.stdout).trim().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} could not fetch from {}", from.name, to.name);
}

const TOOLS: &[&str] = kubelet::CRI_TOOLS;

#[test]
fn e2e_containerd_cri_chain_from_annotations() {
    if !runtime::require_tools("e2e_containerd_cri_chain_from_annotations", TOOLS) {
        return;
    }
    chain_over_cri(Cni::Spright);
}

#[test]
fn e2e_containerd_cri_chained_after_the_bridge_by_install_cni() {
    if !runtime::require_tools(
        "e2e_containerd_cri_chained_after_the_bridge_by_install_cni",
        TOOLS,
    ) {
        return;
    }
    chain_over_cri(Cni::ChainedIntoBridge);
}

/// Three chain pods and an outsider through the CRI: the annotation reaches
/// the plugin, chain hops are redirected, the outsider's are not, and
/// removing the pods as the kubelet does leaves the node clean.
fn chain_over_cri(cni: Cni) {
    let s = setup(cni);
    rt().block_on(async {
        let channel = connect(&s.containerd.address).await.unwrap();
        let mut rs = RuntimeServiceClient::new(channel.clone());
        let mut is = ImageServiceClient::new(channel);
        let images = is
            .list_images(cri::ListImagesRequest { filter: None })
            .await
            .unwrap()
            .into_inner();
        assert!(
            images
                .images
                .iter()
                .any(|i| i.repo_tags.iter().any(|t| t == IMAGE)),
            "CRI does not see {IMAGE}"
        );

        let mut pods = Vec::new();
        for (name, chain) in [
            ("gateway", Some("demo")),
            ("transform", Some("demo")),
            ("store", Some("demo")),
            ("outsider", None),
        ] {
            pods.push(Box::pin(run_pod(&s, &mut rs, name, chain)).await);
        }
        // The annotation reached the plugin (containerd passes it because
        // the conflist declares the capability).
        let records = spright_endpoint::list(&s.base.dir.path().join("state")).unwrap();
        let chains: HashMap<String, Option<String>> = records
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .map(|r| (r.pod.name.clone(), r.chain.clone()))
            .collect();
        assert_eq!(chains.len(), 4, "{chains:?}");
        for p in &pods[..3] {
            assert_eq!(chains[&p.name].as_deref(), Some("demo"), "{chains:?}");
        }
        assert_eq!(chains["outsider"], None);

        // Chain hops over HTTP: gateway → transform → store.
        assert_eq!(fetch(&mut rs, &pods[0], &pods[1]).await, "spright-e2e");
        assert_eq!(fetch(&mut rs, &pods[1], &pods[2]).await, "spright-e2e");
        let before: Vec<(u64, u64)> = pods
            .iter()
            .map(|p| redirected(&s.base.pins.path, p.ip).unwrap())
            .collect();
        for (p, (msgs, bytes)) in pods.iter().zip(&before).take(3) {
            assert!(
                *msgs > 0 && *bytes > 0,
                "{}: chain connections not redirected",
                p.name
            );
        }
        assert_eq!(before[3], (0, 0));
        // The outsider talks to a chain pod both ways: normal path.
        assert_eq!(fetch(&mut rs, &pods[3], &pods[0]).await, "spright-e2e");
        assert_eq!(fetch(&mut rs, &pods[0], &pods[3]).await, "spright-e2e");
        assert_eq!(redirected(&s.base.pins.path, pods[3].ip).unwrap(), (0, 0));
        assert_eq!(
            redirected(&s.base.pins.path, pods[0].ip).unwrap(),
            before[0],
            "a connection with the outsider was redirected"
        );

        // Stop and remove everything, as the kubelet does.
        for p in &pods {
            rs.stop_container(cri::StopContainerRequest {
                container_id: p.container.clone(),
                timeout: 0,
            })
            .await
            .unwrap();
            rs.remove_container(cri::RemoveContainerRequest {
                container_id: p.container.clone(),
            })
            .await
            .unwrap();
            rs.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: p.sandbox.clone(),
            })
            .await
            .unwrap();
            rs.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: p.sandbox.clone(),
            })
            .await
            .unwrap();
        }
        let left = rs
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner();
        assert!(left.items.is_empty());
        for p in &pods {
            let ns = p
                .netns
                .as_ref()
                .expect("the CRI reports each sandbox's netns");
            assert!(!Path::new(ns).exists(), "netns {ns} of {} left", p.name);
        }
    });

    // The node is clean: no record, no allocation, no veth, no map entry.
    assert!(
        spright_endpoint::list(&s.base.dir.path().join("state"))
            .unwrap()
            .is_empty()
    );
    let links = s.base.node.ip(&["-o", "link", "show"]).unwrap();
    assert_eq!(links.lines().count(), 2, "only lo and the bridge: {links}");
    let allocations = s.base.allocations(cni.network());
    assert!(
        allocations.is_empty(),
        "IP allocations left: {allocations:?}"
    );
    let dp = spright_ebpf::Datapath::open(&s.base.pins.path).unwrap();
    assert!(
        dp.endpoints().unwrap().is_empty(),
        "endpoint map entries left"
    );
}
