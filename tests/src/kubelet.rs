//! A test node that runs Pods the way kubelet does, against the real
//! components: containerd's CRI (which calls spright-cni), shm-csi over its
//! socket, and meshd reading the Pod objects.
//!
//! No kubelet, scheduler or API server runs on the test machines, so this
//! stands in for them, following kubelet's documented order in `SyncPod`:
//!
//! 1. the Pod object appears, bound to this node (`spec.nodeName`, as the
//!    scheduler sets it): written to meshd's pods directory, the file twin
//!    of the API watch;
//! 2. volumes first (`WaitForAttachAndMount`): for every CSI inline volume,
//!    `NodePublishVolume` with the `volume_context` kubelet builds for an
//!    ephemeral volume of a driver with `podInfoOnMount: true` (the
//!    volume's attributes plus `csi.storage.k8s.io/pod.name`, `pod.namespace`,
//!    `pod.uid`, `serviceAccount.name` and `ephemeral: "true"`), volume id
//!    `csi-<sha256(pod uid + volume name)>` and target
//!    `<root>/pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount`. A failed
//!    publish is FailedMount: the pod never gets a sandbox;
//! 3. `RunPodSandbox` with the pod's metadata, labels and annotations (so
//!    containerd passes the annotations to spright-cni);
//! 4. `CreateContainer` / `StartContainer` per container, with its volume
//!    mounts pointing at the published targets (and at a `hostPath`
//!    volume's directory, which with `type: Directory` must exist, or the
//!    pod fails to start as kubelet's FailedMount) and its literal `env`
//!    values;
//! 5. on delete: containers stopped, sandbox stopped (CNI DEL) and removed,
//!    then `NodeUnpublishVolume`, then the Pod object goes.
//!
//! A `hostPath` under a prefix given to [`Kubelet::map_host_path`] is taken
//! from the test's directory instead of the machine's (`/var/lib/spright`
//! of the simulated node is the test's state directory).
//!
//! What is not kubelet's: images. No registry is reachable, so every
//! container runs the locally imported busybox image as an HTTP server
//! (`httpd` on the container's first `containerPort`, 8080 when none), in
//! place of the manifest's image and command; user, mounts and everything
//! else come from the manifest.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{self as cri, runtime_service_client::RuntimeServiceClient};
use serde_json::{Value, json};
use shm_csi::client::{Client as CsiClient, Status};
use tonic::transport::Channel;

use crate::{
    cni::Node,
    runtime::{self, Containerd, Podman, RuntimeCgroups, RuntimeNetns},
};

/// The image every container runs (imported locally, no registry).
pub const IMAGE: &str = "localhost/spright-busybox:e2e";
/// The CSI driver whose inline volumes are published.
pub const CSI_DRIVER: &str = "shm.spright.dev";

/// A node with containerd (CRI) whose CNI is spright-cni. Drops in order:
/// containerd (and its shims, mounts), pod network namespaces it left, the
/// runtime's cgroups, the datapath, test cgroup, node namespace and files.
pub struct CriNode {
    pub containerd: Containerd,
    pub pod_netns: RuntimeNetns,
    _runtime_cgroups: RuntimeCgroups,
    /// Node netns, test cgroup, pin dir and temp dir (dropped last).
    pub base: Node,
}

/// The node's CNI configuration, as containerd finds it in its conf dir.
#[derive(Clone, Copy, Debug)]
pub enum Cni<'a> {
    /// spright-cni is the node's network `network` over `subnet`.
    Spright { network: &'a str, subnet: &'a str },
    /// The reference `bridge` (with host-local) is network `network` over
    /// `subnet`, and `spright install-cni --once` chains spright into its
    /// conflist, as the DaemonSet's init container does (the default install).
    ChainedIntoBridge { network: &'a str, subnet: &'a str },
}

impl CriNode {
    /// A node named after `tag` with `cni`, containerd started and the
    /// busybox image imported.
    pub fn new(tag: &str, cni: Cni<'_>) -> anyhow::Result<Self> {
        let base = Node::new(tag)?;
        let (dir, node, name) = (&base.dir, &base.node, &base.name);
        let runtime_cgroups = RuntimeCgroups { name: name.clone() };
        // containerd takes one CNI bin dir: spright-cni plus the reference
        // loopback (lo in every sandbox), host-local (IPAM) and bridge.
        let bin = runtime::cni_bin_dir(dir.path())?;
        for p in ["loopback", "host-local", "bridge"] {
            std::os::unix::fs::symlink(
                Path::new(crate::cni::REFERENCE_PLUGINS).join(p),
                bin.join(p),
            )?;
        }
        let conf_dir = dir.path().join("net.d");
        std::fs::create_dir_all(&conf_dir)?;
        let bridge = format!("spr{}0", &tag[..tag.len().min(6)]);
        match cni {
            Cni::Spright { network, subnet } => {
                let conflist = runtime::spright_conflist(
                    network,
                    &bridge,
                    subnet,
                    &base.cgroup.path,
                    &base.pins.path,
                    dir.path(),
                );
                std::fs::write(
                    conf_dir.join("10-spright.conflist"),
                    serde_json::to_vec_pretty(&conflist)?,
                )?;
            }
            Cni::ChainedIntoBridge { network, subnet } => {
                let conflist = json!({
                    "cniVersion": "1.0.0",
                    "name": network,
                    "plugins": [{
                        "type": "bridge",
                        "bridge": bridge,
                        "isGateway": true,
                        "ipam": {
                            "type": "host-local",
                            "dataDir": base.ipam_dir(),
                            "ranges": [[{ "subnet": subnet }]],
                            "routes": [{ "dst": "0.0.0.0/0" }],
                        },
                    }],
                });
                std::fs::write(
                    conf_dir.join("10-bridge.conflist"),
                    serde_json::to_vec_pretty(&conflist)?,
                )?;
                // What the DaemonSet's init container does, before the
                // runtime starts (the static plugin replaces the link).
                let out = std::process::Command::new(crate::sandbox::workspace_bin("spright"))
                    .args(["install-cni", "--once", "--conf-dir"])
                    .arg(&conf_dir)
                    .arg("--bin-dir")
                    .arg(&bin)
                    .arg("--plugin")
                    .arg(crate::sandbox::static_plugin())
                    .arg("--cgroup")
                    .arg(&base.cgroup.path)
                    .arg("--bpffs")
                    .arg(&base.pins.path)
                    .arg("--state-dir")
                    .arg(dir.path().join("state"))
                    .output()?;
                runtime::check(&out, "spright install-cni")?;
            }
        }
        let containerd = Containerd::start(
            &dir.path().join("containerd"),
            &node.path(),
            IMAGE,
            &bin,
            &conf_dir,
        )?;
        import_image(dir.path(), &node.path(), &containerd)?;
        Ok(Self {
            containerd,
            pod_netns: RuntimeNetns::default(),
            _runtime_cgroups: runtime_cgroups,
            base,
        })
    }

    /// The state directory the conflist names (records; meshd's default
    /// pods directory is `<state>/pods`).
    pub fn state_dir(&self) -> PathBuf {
        self.base.dir.path().join("state")
    }
}

/// Builds the busybox image with a temporary podman and imports it.
fn import_image(dir: &Path, node_netns: &Path, containerd: &Containerd) -> anyhow::Result<()> {
    let rootfs = dir.join("rootfs");
    runtime::busybox_rootfs(&rootfs)?;
    let tar = dir.join("rootfs.tar");
    let out = std::process::Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .output()?;
    runtime::check(&out, "tar")?;
    let bin = dir.join("podman-cni-bin");
    std::fs::create_dir_all(&bin)?;
    let podman = Podman::new(&dir.join("podman"), node_netns, &bin)?;
    podman.run(
        &[],
        &[
            "import",
            "--change",
            r#"CMD ["/bin/sleep", "2147483647"]"#,
            &tar.display().to_string(),
            IMAGE,
        ],
    )?;
    let archive = dir.join("image.tar");
    podman.run(
        &[],
        &[
            "save",
            "--format",
            "docker-archive",
            "-o",
            &archive.display().to_string(),
            IMAGE,
        ],
    )?;
    containerd.ctr(&[
        "images",
        "import",
        "--snapshotter",
        "native",
        &archive.display().to_string(),
    ])?;
    Ok(())
}

/// A CRI client over containerd's socket.
pub async fn connect(sock: &Path) -> anyhow::Result<Channel> {
    let sock = sock.to_owned();
    Ok(tonic::transport::Endpoint::try_from("http://[::1]:50051")?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(sock).await?))
            }
        }))
        .await?)
}

/// The Pods the controllers and the scheduler would create from a manifest
/// (YAML documents, as `kubectl apply -f` reads them): each Pod as is, each
/// Deployment's template `replicas` times (names `<deployment>-<hash>-<n>`),
/// every one with a fresh uid and bound to `node`. Other kinds are skipped.
pub fn pods_from_manifest(yaml: &str, node: &str) -> anyhow::Result<Vec<Value>> {
    use serde::Deserialize as _;
    let mut pods = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v = Value::deserialize(doc).context("parsing the manifest")?;
        let kind = v["kind"].as_str().unwrap_or_default();
        let namespace = v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        match kind {
            "Pod" => pods.push(bind(v.clone(), &namespace, node)),
            "Deployment" => {
                let name = v["metadata"]["name"]
                    .as_str()
                    .context("Deployment without a name")?;
                let replicas = v["spec"]["replicas"].as_u64().unwrap_or(1);
                let template = &v["spec"]["template"];
                let hash = short_hash(&template.to_string());
                for i in 0..replicas {
                    let mut pod = json!({
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": template["metadata"].clone(),
                        "spec": template["spec"].clone(),
                    });
                    pod["metadata"]["name"] = json!(format!("{name}-{hash}-{i}"));
                    pods.push(bind(pod, &namespace, node));
                }
            }
            _ => {}
        }
    }
    Ok(pods)
}

fn short_hash(s: &str) -> String {
    use sha2::Digest as _;
    hex(&sha2::Sha256::digest(s.as_bytes())[..5])
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The Pod as the API server and scheduler leave it: namespace, a fresh
/// uid, `spec.nodeName`.
fn bind(mut pod: Value, namespace: &str, node: &str) -> Value {
    pod["metadata"]["namespace"] = json!(namespace);
    pod["metadata"]["uid"] = json!(new_uid());
    pod["spec"]["nodeName"] = json!(node);
    pod
}

/// A UUID-shaped uid, unique in this process.
pub fn new_uid() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!(
        "00000000-0000-4000-8000-{:06x}{:06x}",
        std::process::id() & 0xff_ffff,
        n
    )
}

/// A Pod this node runs.
#[derive(Debug, Clone)]
pub struct RunningPod {
    pub object: Value,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub sandbox: String,
    /// Container ids, in manifest order.
    pub containers: Vec<String>,
    /// Published CSI volumes: (volume id, target path).
    pub volumes: Vec<(String, PathBuf)>,
    pub ip: IpAddr,
    pub netns: Option<String>,
}

/// Why a pod did not start, in kubelet's terms.
#[derive(Debug)]
pub enum PodError {
    /// `NodePublishVolume` failed: kubelet reports FailedMount and never
    /// creates the sandbox.
    FailedMount { volume: String, status: Status },
    /// Anything else (the CRI refused, the manifest is unusable).
    Other(anyhow::Error),
}

impl std::fmt::Display for PodError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::FailedMount { volume, status } => write!(
                f,
                "FailedMount: volume {volume}: {:?}: {}",
                status.code(),
                status.message()
            ),
            Self::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<anyhow::Error> for PodError {
    fn from(e: anyhow::Error) -> Self {
        Self::Other(e)
    }
}

/// The kubelet stand-in of one node.
pub struct Kubelet {
    rt: tokio::runtime::Runtime,
    cri: RuntimeServiceClient<Channel>,
    csi_socket: PathBuf,
    /// Where Pod objects appear for meshd (its `--pods-dir`).
    pub pods_dir: PathBuf,
    /// kubelet's root directory (`/var/lib/kubelet` on a node).
    pub root: PathBuf,
    /// Pods go below `/<cgroup_root>/<pod uid>` (the test's cgroup).
    cgroup_root: String,
    log_root: PathBuf,
    /// hostPath prefixes of the simulated node: (node path, test path).
    host_paths: Vec<(PathBuf, PathBuf)>,
}

impl Kubelet {
    /// A kubelet of `node` with its root directory at `root` (put it where
    /// a mount guard cleans up), publishing through `csi_socket` and
    /// writing Pod objects to `pods_dir`.
    pub fn new(
        node: &CriNode,
        root: &Path,
        csi_socket: &Path,
        pods_dir: &Path,
    ) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let channel = rt.block_on(connect(&node.containerd.address))?;
        let root = root.to_owned();
        std::fs::create_dir_all(root.join("pods"))?;
        std::fs::create_dir_all(pods_dir)?;
        Ok(Self {
            rt,
            cri: RuntimeServiceClient::new(channel),
            csi_socket: csi_socket.to_owned(),
            pods_dir: pods_dir.to_owned(),
            root: root.clone(),
            cgroup_root: node.base.name.clone(),
            log_root: root.join("logs"),
            host_paths: Vec::new(),
        })
    }

    /// hostPath volumes under `node_path` on the simulated node are at
    /// `test_path` (the same relative path below it).
    pub fn map_host_path(&mut self, node_path: &Path, test_path: &Path) {
        self.host_paths
            .push((node_path.to_owned(), test_path.to_owned()));
    }

    /// Where a `hostPath` volume's `path` is on this machine.
    fn host_path(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        for (node, test) in &self.host_paths {
            if let Ok(rest) = path.strip_prefix(node) {
                return test.join(rest);
            }
        }
        path.to_owned()
    }

    /// The Pod object appears (the API stand-in: meshd's pods directory).
    pub fn create_object(&self, pod: &Value) -> anyhow::Result<()> {
        let (ns, name, _) = identity(pod)?;
        let path = self.pods_dir.join(format!("{ns}_{name}.json"));
        let tmp = self.pods_dir.join(format!(".{ns}_{name}.json.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(pod)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// The Pod object goes (or is replaced by `update_object`).
    pub fn delete_object(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        match std::fs::remove_file(self.pods_dir.join(format!("{namespace}_{name}.json"))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Runs `pod` in kubelet's order: object, volumes, sandbox, containers.
    pub fn run_pod(&mut self, pod: &Value) -> Result<RunningPod, PodError> {
        self.create_object(pod)?;
        let volumes = self.publish_volumes(pod)?;
        self.start_sandbox(pod, volumes)
    }

    /// Step 2: every CSI inline volume of `pod`, published as kubelet does.
    /// The first failure is FailedMount (volumes published before it stay,
    /// as with kubelet, until the pod is deleted: `unpublish_volumes`).
    pub fn publish_volumes(&self, pod: &Value) -> Result<Vec<(String, PathBuf)>, PodError> {
        let (ns, name, uid) = identity(pod)?;
        let sa = pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default");
        let mut published = Vec::new();
        for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
            let csi = &v["csi"];
            if csi["driver"].as_str() != Some(CSI_DRIVER) {
                continue;
            }
            let vol_name = v["name"].as_str().context("volume without a name")?;
            let volume_id = ephemeral_volume_id(&uid, vol_name);
            let target = self.volume_target(&uid, vol_name);
            let attrs: Vec<(String, String)> = csi["volumeAttributes"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let mut attrs: Vec<(&str, &str)> = attrs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            attrs.push(("csi.storage.k8s.io/serviceAccount.name", sa));
            let mut req =
                shm_csi::client::ephemeral_publish(&volume_id, &target, &ns, &name, &uid, &attrs);
            req.readonly = csi["readOnly"].as_bool().unwrap_or(false);
            // kubelet creates the parent; the plugin creates the target.
            std::fs::create_dir_all(target.parent().expect("target has a parent"))
                .map_err(anyhow::Error::from)?;
            let mut client = CsiClient::connect(&self.csi_socket).map_err(anyhow::Error::from)?;
            client
                .publish(req)
                .map_err(|status| PodError::FailedMount {
                    volume: vol_name.to_owned(),
                    status,
                })?;
            published.push((volume_id, target));
        }
        Ok(published)
    }

    /// `<root>/pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount`.
    pub fn volume_target(&self, uid: &str, volume: &str) -> PathBuf {
        self.root
            .join("pods")
            .join(uid)
            .join("volumes/kubernetes.io~csi")
            .join(volume)
            .join("mount")
    }

    /// Steps 3 and 4: the sandbox, then the containers with their mounts.
    pub fn start_sandbox(
        &mut self,
        pod: &Value,
        volumes: Vec<(String, PathBuf)>,
    ) -> Result<RunningPod, PodError> {
        let (ns, name, uid) = identity(pod)?;
        // hostPath volumes: their directory, checked as kubelet checks
        // `type: Directory` before the sandbox.
        let mut host_dirs: HashMap<String, PathBuf> = HashMap::new();
        for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
            let (Some(vol), Some(path)) = (v["name"].as_str(), v["hostPath"]["path"].as_str())
            else {
                continue;
            };
            let dir = self.host_path(path);
            let kind = v["hostPath"]["type"].as_str().unwrap_or_default();
            if kind == "Directory" && !dir.is_dir() {
                return Err(anyhow::anyhow!(
                    "FailedMount: volume {vol}: hostPath type check failed: {path} is not a directory"
                )
                .into());
            }
            host_dirs.insert(vol.to_owned(), dir);
        }
        let strings = |v: &Value| -> HashMap<String, String> {
            v.as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        };
        let logs = self.log_root.join(format!("{ns}_{name}_{uid}"));
        std::fs::create_dir_all(&logs).map_err(anyhow::Error::from)?;
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.clone(),
                uid: uid.clone(),
                namespace: ns.clone(),
                attempt: 0,
            }),
            hostname: name.clone(),
            log_directory: logs.display().to_string(),
            labels: strings(&pod["metadata"]["labels"]),
            annotations: strings(&pod["metadata"]["annotations"]),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: format!("/{}/{uid}", self.cgroup_root),
                ..Default::default()
            }),
            ..Default::default()
        };
        let cri = &mut self.cri;
        let sandbox = self
            .rt
            .block_on(cri.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }))
            .map_err(|e| anyhow::anyhow!("RunPodSandbox {ns}/{name}: {e}"))?
            .into_inner()
            .pod_sandbox_id;
        let mounts_of = |c: &Value| -> Vec<cri::Mount> {
            c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| {
                    let vol = m["name"].as_str()?;
                    let id = ephemeral_volume_id(&uid, vol);
                    let host = match volumes.iter().find(|(v, _)| *v == id) {
                        Some((_, target)) => target.clone(),
                        None => host_dirs.get(vol)?.clone(),
                    };
                    Some(cri::Mount {
                        container_path: m["mountPath"].as_str()?.to_owned(),
                        host_path: host.display().to_string(),
                        readonly: m["readOnly"].as_bool().unwrap_or(false),
                        ..Default::default()
                    })
                })
                .collect()
        };
        // Literal values only (no valueFrom: there is no API to resolve it).
        let envs_of = |c: &Value| -> Vec<cri::KeyValue> {
            c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    Some(cri::KeyValue {
                        key: e["name"].as_str()?.to_owned(),
                        value: e["value"].as_str()?.to_owned(),
                    })
                })
                .collect()
        };
        let mut containers = Vec::new();
        for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
            let cname = c["name"].as_str().unwrap_or("main").to_owned();
            let port = c["ports"][0]["containerPort"].as_u64().unwrap_or(8080);
            let run_as_user = c["securityContext"]["runAsUser"]
                .as_i64()
                .or_else(|| pod["spec"]["securityContext"]["runAsUser"].as_i64());
            let request = cri::CreateContainerRequest {
                pod_sandbox_id: sandbox.clone(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: cname.clone(),
                        attempt: 0,
                    }),
                    image: Some(cri::ImageSpec {
                        image: IMAGE.into(),
                        ..Default::default()
                    }),
                    command: ["/bin/httpd", "-f", "-p", &port.to_string(), "-h", "/www"]
                        .map(String::from)
                        .to_vec(),
                    log_path: format!("{cname}/0.log"),
                    mounts: mounts_of(c),
                    envs: envs_of(c),
                    labels: strings(&pod["metadata"]["labels"]),
                    linux: Some(cri::LinuxContainerConfig {
                        security_context: Some(cri::LinuxContainerSecurityContext {
                            run_as_user: run_as_user.map(|value| cri::Int64Value { value }),
                            no_new_privs: c["securityContext"]["allowPrivilegeEscalation"]
                                == json!(false),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                sandbox_config: Some(config.clone()),
            };
            let id = self
                .rt
                .block_on(cri.create_container(request))
                .map_err(|e| anyhow::anyhow!("CreateContainer {ns}/{name}/{cname}: {e}"))?
                .into_inner()
                .container_id;
            self.rt
                .block_on(cri.start_container(cri::StartContainerRequest {
                    container_id: id.clone(),
                }))
                .map_err(|e| anyhow::anyhow!("StartContainer {ns}/{name}/{cname}: {e}"))?;
            containers.push(id);
        }
        let status = self
            .rt
            .block_on(cri.pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: sandbox.clone(),
                verbose: true,
            }))
            .map_err(|e| anyhow::anyhow!("PodSandboxStatus {ns}/{name}: {e}"))?
            .into_inner();
        let netns = sandbox_netns(&status);
        Ok(RunningPod {
            object: pod.clone(),
            ip: sandbox_ip(&status).with_context(|| format!("{ns}/{name}: pod IP"))?,
            namespace: ns,
            name,
            uid,
            sandbox,
            containers,
            volumes,
            netns,
        })
    }

    /// Runs `cmd` in the pod's first container (CRI ExecSync); returns
    /// (exit code, stdout).
    pub fn exec(&mut self, pod: &RunningPod, cmd: &[&str]) -> anyhow::Result<(i32, String)> {
        let cri = &mut self.cri;
        let r = self
            .rt
            .block_on(cri.exec_sync(cri::ExecSyncRequest {
                container_id: pod.containers[0].clone(),
                cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
                timeout: 10,
            }))?
            .into_inner();
        Ok((r.exit_code, String::from_utf8_lossy(&r.stdout).into_owned()))
    }

    /// `wget` of `to`'s HTTP server from inside `from` (retried while the
    /// server starts); returns the body.
    pub fn fetch(
        &mut self,
        from: &RunningPod,
        to: &RunningPod,
        port: u16,
    ) -> anyhow::Result<String> {
        let url = format!("http://{}:{port}/", to.ip);
        for _ in 0..50 {
            // busybox-static 1.35 segfaults on `wget -T`: bound it with timeout.
            let (code, out) = self.exec(from, &["timeout", "5", "wget", "-q", "-O", "-", &url])?;
            if code == 0 {
                return Ok(out.trim().to_owned());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("{} could not fetch from {}", from.name, to.name)
    }

    /// Deletes a pod as kubelet does: containers, sandbox (CNI DEL), then
    /// the volumes, then the object.
    pub fn delete_pod(&mut self, pod: &RunningPod) -> anyhow::Result<()> {
        let cri = &mut self.cri;
        for c in &pod.containers {
            self.rt
                .block_on(cri.stop_container(cri::StopContainerRequest {
                    container_id: c.clone(),
                    timeout: 0,
                }))?;
        }
        self.rt
            .block_on(cri.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.sandbox.clone(),
            }))?;
        for c in &pod.containers {
            self.rt
                .block_on(cri.remove_container(cri::RemoveContainerRequest {
                    container_id: c.clone(),
                }))?;
        }
        self.rt
            .block_on(cri.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.sandbox.clone(),
            }))?;
        self.unpublish_volumes(&pod.volumes)?;
        self.delete_object(&pod.namespace, &pod.name)
    }

    /// `NodeUnpublishVolume` for each volume; kubelet then removes the
    /// pod's volume directories.
    pub fn unpublish_volumes(&self, volumes: &[(String, PathBuf)]) -> anyhow::Result<()> {
        if volumes.is_empty() {
            return Ok(());
        }
        let mut client = CsiClient::connect(&self.csi_socket)?;
        for (id, target) in volumes {
            client
                .unpublish(id, target)
                .map_err(|s| anyhow::anyhow!("NodeUnpublishVolume {id}: {s}"))?;
            if let Some(vol_dir) = target.parent() {
                let _ = std::fs::remove_dir(vol_dir);
            }
        }
        Ok(())
    }

    /// Sandboxes containerd still has.
    pub fn sandboxes(&mut self) -> anyhow::Result<usize> {
        let cri = &mut self.cri;
        Ok(self
            .rt
            .block_on(cri.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }))?
            .into_inner()
            .items
            .len())
    }
}

/// A sandbox's IP, from its status.
pub fn sandbox_ip(status: &cri::PodSandboxStatusResponse) -> anyhow::Result<IpAddr> {
    let ip = status
        .status
        .as_ref()
        .and_then(|st| st.network.as_ref())
        .map(|n| n.ip.as_str())
        .unwrap_or_default();
    ip.parse()
        .with_context(|| format!("the sandbox reports IP {ip:?}"))
}

/// The network namespace path of a sandbox, from its verbose status
/// (containerd's `info`: the runtime spec's network namespace).
pub fn sandbox_netns(status: &cri::PodSandboxStatusResponse) -> Option<String> {
    let v: Value = serde_json::from_str(status.info.get("info")?).ok()?;
    v["runtimeSpec"]["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")?["path"]
        .as_str()
        .map(str::to_owned)
}

/// The tools the CRI tests need on the machine.
pub const CRI_TOOLS: &[&str] = &[
    "containerd",
    "ctr",
    "containerd-shim-runc-v2",
    "runc",
    "podman",
];

/// kubelet's id of an ephemeral inline volume: `csi-` and the hex SHA-256
/// of the pod uid followed by the volume's name.
pub fn ephemeral_volume_id(pod_uid: &str, volume: &str) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(format!("{pod_uid}{volume}").as_bytes());
    format!("csi-{}", hex(&d))
}

/// (namespace, name, uid) of a Pod object.
fn identity(pod: &Value) -> anyhow::Result<(String, String, String)> {
    let m = &pod["metadata"];
    Ok((
        m["namespace"].as_str().unwrap_or("default").to_owned(),
        m["name"]
            .as_str()
            .context("Pod without metadata.name")?
            .to_owned(),
        m["uid"]
            .as_str()
            .context("Pod without metadata.uid")?
            .to_owned(),
    ))
}
