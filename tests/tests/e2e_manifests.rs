//! The manifests in `manifests/`, checked offline.
//!
//! - `kubernetes-validate --strict` (PyPI, installed by `cargo xtask setup`)
//!   against the schemas it bundles: catches typos and unknown fields that
//!   kubectl would only reject at apply time.
//! - Our own checks, which no schema knows: image names and tags, the
//!   binaries and mounts the containers rely on, meshd's environment names
//!   and values (fed to the real meshd `--print-config`), the conflist's
//!   agreement with meshd, annotation keys equal to `spright-endpoint`'s
//!   constants, and the CSI driver name everywhere.
//!
//! This file lives in the e2e tier because kubernetes-validate is an external
//! tool; it needs no root. When the tool is missing the schema test skips
//! outside CI and fails under `CI=true`, like the privileged gate.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;
use spright_tests::sandbox::workspace_bin;

const SPRIGHT_IMAGE: &str = "ghcr.io/spright-dev/spright";
const CSI_DRIVER: &str = "shm.spright.dev";
/// Name of the webhook's ServiceAccount, Service, Deployment and
/// MutatingWebhookConfiguration.
const WEBHOOK: &str = "spright-webhook";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("manifests"))
        .expect("manifests/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        // kustomize's own file, not an object (`kustomize_overlays_*`).
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "manifests missing: {files:?}");
    files
}

/// Every object of every manifest, as JSON.
fn objects() -> Vec<Value> {
    let mut all = Vec::new();
    for f in manifest_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                all.push(v);
            }
        }
    }
    all
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in manifests/"))
}

fn pod_spec(o: &Value) -> Option<&Value> {
    matches!(o["kind"].as_str(), Some("DaemonSet" | "Deployment" | "Job"))
        .then(|| &o["spec"]["template"]["spec"])
}

fn containers(spec: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers"]
        .into_iter()
        .filter_map(|k| spec[k].as_array())
        .flatten()
}

fn container<'a>(spec: &'a Value, name: &str) -> &'a Value {
    containers(spec)
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// mountPath → hostPath of a container's hostPath mounts.
fn host_mounts(spec: &Value, c: &Value) -> BTreeMap<String, (String, Option<String>)> {
    let volumes: BTreeMap<&str, &Value> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    c["volumeMounts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|m| {
            let v = volumes[m["name"].as_str().unwrap()];
            let host = v["hostPath"]["path"].as_str()?;
            Some((
                m["mountPath"].as_str().unwrap().to_owned(),
                (
                    host.to_owned(),
                    m["mountPropagation"].as_str().map(str::to_owned),
                ),
            ))
        })
        .collect()
}

/// The mount propagation (`None` by default, as in Kubernetes) of the mount
/// of `c` that holds `path` at the same path as on the host, if any.
fn mounted_same(spec: &Value, c: &Value, path: &str) -> Option<String> {
    host_mounts(spec, c)
        .into_iter()
        .find_map(|(at, (host, prop))| {
            (at == host && Path::new(path).starts_with(&at))
                .then(|| prop.unwrap_or_else(|| "None".into()))
        })
}

#[test]
fn kubernetes_validate_strict() {
    if !tool_or_skip(
        "kubernetes-validate",
        &["--version"],
        "kubernetes_validate_strict",
        "cargo xtask setup installs it",
    ) {
        return;
    }
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(manifest_files())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubernetes-validate --strict:\n{text}"
    );
    assert!(!text.contains("ERROR"), "{text}");
}

/// Whether `name` runs (`name probe...` succeeds); outside CI a missing tool
/// skips the test, under `CI=true` it fails it.
fn tool_or_skip(name: &str, probe: &[&str], test: &str, why: &str) -> bool {
    let ok = Command::new(name)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true" || v == "1"),
            "{name} is not installed: {why}"
        );
        eprintln!("SKIPPED {test}: {name} is not installed ({why})");
    }
    ok
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// `kubectl apply -k` of the base and of every overlay in `kustomize/`:
/// each renders offline, passes the schema tier, holds exactly the base's
/// objects, runs the image the base kustomization names (the one place to
/// set registry and tag), and puts the CNI directories where its
/// distribution's runtime reads them.
#[test]
fn kustomize_overlays_render_valid_installs_for_their_distribution() {
    if !tool_or_skip(
        "kubectl",
        &["version", "--client"],
        "kustomize_overlays_render_valid_installs_for_their_distribution",
        "`kubectl kustomize` renders the overlays offline",
    ) {
        return;
    }
    let base: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("manifests/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let image = &base["images"][0];
    assert_eq!(image["name"], SPRIGHT_IMAGE);
    let ours = format!(
        "{}:{}",
        image["newName"].as_str().unwrap(),
        image["newTag"].as_str().unwrap()
    );
    assert_eq!(
        image["newTag"],
        env!("CARGO_PKG_VERSION"),
        "the kustomization installs this release"
    );
    let mut listed: Vec<String> = base["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    let mut wanted: Vec<(String, String)> = Vec::new();
    for r in &listed {
        let text = std::fs::read_to_string(repo().join("manifests").join(r)).unwrap();
        for o in yaml_docs(&text) {
            wanted.push((
                o["kind"].as_str().unwrap().into(),
                o["metadata"]["name"].as_str().unwrap().into(),
            ));
        }
    }
    wanted.sort();
    let expect = [
        ("manifests", "/opt/cni/bin", "/etc/cni/net.d"),
        ("kustomize/kubeadm", "/opt/cni/bin", "/etc/cni/net.d"),
        (
            "kustomize/k3s",
            "/var/lib/rancher/k3s/data/current/bin",
            "/var/lib/rancher/k3s/agent/etc/cni/net.d",
        ),
    ];
    let overlays: Vec<String> = std::fs::read_dir(repo().join("kustomize"))
        .unwrap()
        .map(|e| format!("kustomize/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    for o in &overlays {
        assert!(
            expect.iter().any(|(dir, _, _)| dir == o),
            "overlay {o} is not checked here"
        );
    }
    let validate = tool_or_skip(
        "kubernetes-validate",
        &["--version"],
        "kustomize_overlays_render_valid_installs_for_their_distribution",
        "cargo xtask setup installs it",
    );
    let tmp = tempfile::tempdir().unwrap();
    for (dir, bin_dir, conf_dir) in expect {
        let out = Command::new("kubectl")
            .args(["kustomize"])
            .arg(repo().join(dir))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl kustomize {dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let objs = yaml_docs(&text);
        let mut got: Vec<(String, String)> = objs
            .iter()
            .map(|o| {
                (
                    o["kind"].as_str().unwrap().into(),
                    o["metadata"]["name"].as_str().unwrap().into(),
                )
            })
            .collect();
        got.sort();
        assert_eq!(got, wanted, "{dir} installs the base's objects");
        let ds = find(&objs, "DaemonSet", "spright-node");
        let spec = pod_spec(ds).unwrap();
        for c in containers(spec) {
            let image = c["image"].as_str().unwrap();
            if image.starts_with(SPRIGHT_IMAGE) {
                assert_eq!(image, ours, "{dir}: container {}", c["name"]);
            }
        }
        let host_path = |volume: &str| {
            spec["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == volume)
                .unwrap()["hostPath"]["path"]
                .clone()
        };
        assert_eq!(host_path("cni-bin-dir"), bin_dir, "{dir}");
        assert_eq!(host_path("cni-conf-dir"), conf_dir, "{dir}");
        if validate {
            let file = tmp.path().join(format!("{}.yaml", dir.replace('/', "-")));
            std::fs::write(&file, &text).unwrap();
            let out = Command::new("kubernetes-validate")
                .arg("--strict")
                .arg(&file)
                .output()
                .unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success() && !said.contains("ERROR"),
                "{dir}: {said}"
            );
        }
    }
}

#[test]
fn images_are_ours_at_the_workspace_version_or_pinned() {
    let ours = format!("{SPRIGHT_IMAGE}:{}", env!("CARGO_PKG_VERSION"));
    let mut seen = 0;
    for o in objects() {
        let Some(spec) = pod_spec(&o) else { continue };
        for c in containers(spec) {
            let image = c["image"].as_str().unwrap();
            if image.starts_with(SPRIGHT_IMAGE) {
                assert_eq!(image, ours, "container {}", c["name"]);
                seen += 1;
                // Our image holds these binaries (see manifests/image/build.sh).
                let cmd = c["command"][0].as_str().unwrap();
                let bin = cmd.rsplit('/').next().unwrap();
                assert!(
                    [
                        "meshd",
                        "spright",
                        "spright-cni",
                        "shm-csi",
                        "spright-webhook",
                        "sh"
                    ]
                    .contains(&bin),
                    "{cmd}"
                );
                assert!(
                    cmd.starts_with("/usr/local/bin/") || cmd == "/bin/sh",
                    "{cmd}"
                );
                let script =
                    std::fs::read_to_string(repo().join("manifests/image/build.sh")).unwrap();
                assert!(script.contains(bin), "build.sh does not package {bin}");
            } else {
                // Third-party images carry an explicit version tag.
                let tag = image.rsplit_once(':').map_or("", |(_, t)| t);
                assert!(
                    !tag.is_empty() && tag != "latest" && !tag.contains('/'),
                    "image {image} is not pinned"
                );
            }
        }
    }
    assert!(
        seen >= 5,
        "expected spright images in the node and cleanup DaemonSets"
    );
}

#[test]
fn meshd_env_and_mounts_match_what_meshd_reads() {
    let objs = objects();
    let cm = &find(&objs, "ConfigMap", "spright-config")["data"];
    let ds = find(&objs, "DaemonSet", "spright-node");
    let spec = pod_spec(ds).unwrap();
    let meshd = container(spec, "meshd");
    // Resolve the environment as the kubelet would, and hand it to the real
    // meshd: it must accept every name and value. Every setting comes from
    // spright-config.
    for e in meshd["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        if name == "NODE_NAME" {
            // The downward API: the node the pod runs on.
            assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
            continue;
        }
        assert!(name.starts_with("SPRIGHT_"), "{name} is not one of meshd's");
        assert!(e["valueFrom"]["configMapKeyRef"].is_object(), "{name}");
    }
    let env = resolved_env(meshd, cm);
    let help = Command::new(workspace_bin("meshd"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for e in meshd["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        assert!(
            help.contains(&format!("[env: {name}=")),
            "meshd has no environment variable {name}:\n{help}"
        );
    }
    let out = Command::new(workspace_bin("meshd"))
        .arg("--print-config")
        .env_clear()
        .envs(&env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "meshd rejects the ConfigMap's settings: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effective: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(effective["bpffs"], cm["bpffs"]);
    assert_eq!(effective["state_dir"], cm["state-dir"]);
    assert_eq!(effective["api_addr"], cm["api-addr"]);
    assert_eq!(effective["metrics_addr"], cm["metrics-addr"]);
    assert_eq!(
        effective["node_name"], "node-1",
        "meshd watches its node's Pods"
    );

    // Mounts: the pin directory, the state directory and the cgroup tree at
    // the host's paths; bpffs propagates (meshd may mount it on the host).
    let bpffs = cm["bpffs"].as_str().unwrap();
    assert_eq!(
        mounted_same(spec, meshd, bpffs),
        Some("Bidirectional".into()),
        "meshd must see the host's bpffs at {bpffs}"
    );
    assert!(mounted_same(spec, meshd, cm["state-dir"].as_str().unwrap()).is_some());
    assert!(mounted_same(spec, meshd, "/sys/fs/cgroup").is_some());
    // spright-webhook's hostPath for spright.dev/preload pods is where this
    // meshd publishes the shim.
    assert_eq!(
        spright_webhook::mutate::PRELOAD_HOST_DIR,
        format!(
            "{}/{}",
            cm["state-dir"].as_str().unwrap(),
            spright_endpoint::PRELOAD_DIR
        )
    );
    // The preload check reads the host's processes where meshd looks.
    let host_proc = cm["host-proc"].as_str().unwrap();
    assert_eq!(effective["host_proc"], host_proc);
    assert_eq!(
        host_mounts(spec, meshd)
            .get(host_proc)
            .map(|m| m.0.as_str()),
        Some("/proc"),
        "meshd must see the host's /proc at {host_proc}"
    );
    assert_eq!(meshd["securityContext"]["privileged"], true);

    // Prometheus finds the metrics-only listener: the named port and the
    // scrape annotations agree with metrics-addr; the local API is loopback.
    let metrics: std::net::SocketAddr = cm["metrics-addr"].as_str().unwrap().parse().unwrap();
    let port = meshd["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("meshd has a port named metrics");
    assert_eq!(port["containerPort"], metrics.port());
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(
        annotations["prometheus.io/port"],
        metrics.port().to_string()
    );
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let shm_csi = container(spec, "shm-csi");
    assert_eq!(
        resolved_env(shm_csi, cm)["SHM_CSI_MESHD_ADDR"],
        cm["api-addr"].as_str().unwrap(),
        "shm-csi asks meshd's local API"
    );

    // Probes reach meshd's local API on the host network.
    let addr: std::net::SocketAddr = cm["api-addr"].as_str().unwrap().parse().unwrap();
    assert!(addr.ip().is_loopback());
    assert_eq!(spec["hostNetwork"], true);
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let p = &meshd[probe]["httpGet"];
        assert_eq!(p["path"], path);
        assert_eq!(p["port"], addr.port());
        assert_eq!(p["host"], addr.ip().to_string());
    }
    // Rolling updates never run two meshd on a node.
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 0);
}

/// A container's environment resolved as the kubelet would (values and
/// ConfigMap keys; an optional missing key leaves the variable unset).
fn resolved_env(c: &Value, cm: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_owned();
        if let Some(v) = e["value"].as_str() {
            env.insert(name, v.to_owned());
            continue;
        }
        if e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
            // The downward API: the node the pod runs on.
            env.insert(name, "node-1".to_owned());
            continue;
        }
        let r = &e["valueFrom"]["configMapKeyRef"];
        assert_eq!(r["name"], "spright-config", "{name}");
        match cm.get(r["key"].as_str().unwrap()) {
            Some(v) => {
                env.insert(name, v.as_str().unwrap().to_owned());
            }
            None => assert_eq!(r["optional"], true, "{name} refers to a missing key"),
        }
    }
    env
}

/// Where a container path lies on the host, through the container's
/// hostPath mounts.
fn on_host(spec: &Value, c: &Value, at: &str) -> PathBuf {
    let mounts = host_mounts(spec, c);
    let (mount, (host_root, _)) = mounts
        .iter()
        .filter(|(m, _)| Path::new(at).starts_with(m))
        .max_by_key(|(m, _)| m.len())
        .unwrap_or_else(|| panic!("{at} is not on a host mount of {}", c["name"]));
    Path::new(host_root).join(Path::new(at).strip_prefix(mount).unwrap())
}

#[test]
fn install_cni_chains_by_default_and_agrees_with_meshd() {
    let objs = objects();
    let cm = &find(&objs, "ConfigMap", "spright-config")["data"];
    assert_eq!(cm["cni-mode"], "chained", "chained mode is the default");
    let ds = find(&objs, "DaemonSet", "spright-node");
    let spec = pod_spec(ds).unwrap();

    // The init container installs once; a long-running container watches.
    let init = container(spec, "install-cni");
    let watch = container(spec, "install-cni-watch");
    assert!(
        spec["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "install-cni")
    );
    for (c, args) in [
        (init, serde_json::json!(["install-cni", "--once"])),
        (watch, serde_json::json!(["install-cni"])),
    ] {
        assert_eq!(c["command"], serde_json::json!(["/usr/local/bin/spright"]));
        assert_eq!(c["args"], args, "{}", c["name"]);
    }
    assert_eq!(init["env"], watch["env"]);
    assert_eq!(init["volumeMounts"], watch["volumeMounts"]);
    assert_ne!(init["securityContext"]["privileged"], true);

    // Every variable is one of install-cni's, and the plugin settings are
    // meshd's.
    let env = resolved_env(init, cm);
    let help = Command::new(workspace_bin("spright"))
        .args(["install-cni", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for name in init["env"].as_array().unwrap().iter().map(|e| &e["name"]) {
        let name = name.as_str().unwrap();
        assert!(
            help.contains(&format!("[env: {name}=")),
            "spright install-cni has no environment variable {name}:\n{help}"
        );
    }
    let meshd_env = resolved_env(container(spec, "meshd"), cm);
    for name in [
        "SPRIGHT_STATE_DIR",
        "SPRIGHT_BPFFS",
        "SPRIGHT_CGROUP",
        "SPRIGHT_CNI_MODE",
    ] {
        assert_eq!(env.get(name), meshd_env.get(name), "{name}");
    }

    // It writes into the directories the runtime reads (kubeadm's).
    for (var, host) in [
        ("SPRIGHT_CNI_CONF_DIR", "/etc/cni/net.d"),
        ("SPRIGHT_CNI_BIN_DIR", "/opt/cni/bin"),
        ("SPRIGHT_POD_CIDR_FILE", "/etc/spright/pod-cidr"),
    ] {
        assert_eq!(on_host(spec, init, &env[var]), Path::new(host), "{var}");
    }
    // Primary mode: the pod CIDRs meshd publishes under its state dir are
    // where install-cni reads them.
    let state = cm["state-dir"].as_str().unwrap();
    assert_eq!(
        on_host(spec, init, &env["SPRIGHT_STATE_DIR"]),
        Path::new(state)
    );

    // The real installer with this environment, on stand-in host dirs: the
    // runtime's conflist gets spright last with meshd's settings.
    let host = tempfile::tempdir().unwrap();
    let (conf_dir, bin_dir) = (host.path().join("net.d"), host.path().join("bin"));
    std::fs::create_dir_all(&conf_dir).unwrap();
    let primary = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"bridge","ipam":{"type":"host-local"}}]}"#;
    std::fs::write(conf_dir.join("10-net.conflist"), primary).unwrap();
    let run = |extra: &[(&str, &str)]| {
        let out = Command::new(workspace_bin("spright"))
            .args(["install-cni", "--once"])
            .env_clear()
            .envs(&env)
            .env("SPRIGHT_CNI_CONF_DIR", &conf_dir)
            .env("SPRIGHT_CNI_BIN_DIR", &bin_dir)
            .env("SPRIGHT_CNI_PLUGIN", workspace_bin("spright-cni"))
            .envs(extra.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install-cni with the DaemonSet's environment: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[]);
    let conf: Value =
        serde_json::from_slice(&std::fs::read(conf_dir.join("10-net.conflist")).unwrap()).unwrap();
    assert_eq!(
        conf["cniVersion"], "1.0.0",
        "chained keeps the primary's version"
    );
    let plugins = conf["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 2);
    let plugin = &plugins[1];
    assert_eq!(plugin["type"], "spright-cni");
    assert_eq!(plugin["mode"], "chained");
    assert_eq!(
        plugin["capabilities"]["io.kubernetes.cri.pod-annotations"],
        true
    );
    assert_eq!(plugin["stateDir"], cm["state-dir"]);
    assert_eq!(plugin["bpffs"], cm["bpffs"]);
    assert!(bin_dir.join("spright-cni").exists());

    // Primary mode (opt-in): spright's own conflist at CNI 1.1.0, so the
    // runtime calls STATUS and GC; a version the plugin speaks.
    run(&[
        ("SPRIGHT_CNI_MODE", "primary"),
        ("SPRIGHT_POD_CIDR", "10.244.7.0/24"),
    ]);
    let own: Value =
        serde_json::from_slice(&std::fs::read(conf_dir.join("10-spright.conflist")).unwrap())
            .unwrap();
    assert_eq!(own["cniVersion"], "1.1.0");
    assert!(spright_tests::cni::VERSIONS.contains(&own["cniVersion"].as_str().unwrap()));
    assert_eq!(own["plugins"][0]["ipam"]["type"], "host-local");
    assert_eq!(
        own["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
        "10.244.7.0/24"
    );
    assert_eq!(own["plugins"][0]["stateDir"], cm["state-dir"]);
}

#[test]
fn annotations_are_the_ones_the_plugin_reads() {
    let known = [
        spright_endpoint::ANNOTATION_CHAIN,
        spright_endpoint::ANNOTATION_FUNCTION,
        spright_endpoint::ANNOTATION_REDIRECT,
        spright_endpoint::ANNOTATION_SHM,
        spright_endpoint::ANNOTATION_SHM_PATH,
        spright_endpoint::ANNOTATION_SHM_CONTAINERS,
        spright_endpoint::ANNOTATION_PLACEMENT,
    ];
    let mut chained = 0;
    for o in objects() {
        let Some(spec) = pod_spec(&o) else { continue };
        let ann = &o["spec"]["template"]["metadata"]["annotations"];
        let Some(ann) = ann.as_object() else { continue };
        for k in ann.keys().filter(|k| k.starts_with("spright.dev/")) {
            assert!(known.contains(&k.as_str()), "unknown annotation {k}");
        }
        let Some(chain) = ann.get(spright_endpoint::ANNOTATION_CHAIN) else {
            continue;
        };
        let chain = chain.as_str().unwrap();
        spright_endpoint::validate_chain(chain).unwrap();
        chained += 1;
        // The Pod as spright-webhook admits it: the shared-memory volume
        // asks for the pod's own chain, every container mounts it.
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": o["spec"]["template"]["metadata"], "spec": spec,
        });
        let admitted = spright_webhook::patched(&pod).unwrap_or_else(|e| {
            panic!("{}: spright-webhook refuses it: {e}", o["metadata"]["name"])
        });
        let shm: Vec<&Value> = admitted["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["csi"]["driver"] == CSI_DRIVER)
            .collect();
        if ann.contains_key(spright_endpoint::ANNOTATION_SHM) {
            assert_eq!(shm.len(), 1, "{admitted:#}");
        }
        for v in shm {
            assert_eq!(v["csi"]["volumeAttributes"]["chain"], chain);
            for c in containers(&admitted["spec"]) {
                assert!(
                    c["volumeMounts"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|m| m["name"] == v["name"]),
                    "{} does not mount the chain's volume",
                    c["name"]
                );
            }
        }
        assert_eq!(
            admitted["metadata"]["labels"][spright_endpoint::LABEL_CHAIN],
            chain
        );
    }
    assert!(chained >= 3, "the example chain has three functions");
}

#[test]
fn csi_driver_name_and_sockets_agree() {
    let objs = objects();
    let driver = find(&objs, "CSIDriver", CSI_DRIVER);
    assert_eq!(driver["spec"]["attachRequired"], false);
    assert_eq!(driver["spec"]["podInfoOnMount"], true);
    assert_eq!(
        driver["spec"]["volumeLifecycleModes"],
        serde_json::json!(["Ephemeral"])
    );

    let spec = pod_spec(find(&objs, "DaemonSet", "spright-node")).unwrap();
    let csi = container(spec, "shm-csi");
    let reg = container(spec, "node-driver-registrar");
    let endpoint = csi["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "CSI_ENDPOINT")
        .and_then(|e| e["value"].as_str())
        .expect("CSI_ENDPOINT");
    let sock = endpoint.strip_prefix("unix://").expect("unix endpoint");
    let args: Vec<&str> = reg["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&format!("--csi-address={sock}").as_str()),
        "{args:?}"
    );
    // The socket directory is the same host directory in both containers,
    // and the kubelet finds it where the registrar says.
    let dir = Path::new(sock).parent().unwrap().to_str().unwrap();
    let host_dir = &host_mounts(spec, csi)[dir].0;
    assert_eq!(&host_mounts(spec, reg)[dir].0, host_dir);
    assert_eq!(host_dir, &format!("/var/lib/kubelet/plugins/{CSI_DRIVER}"));
    assert!(args.contains(&format!("--kubelet-registration-path={host_dir}/csi.sock").as_str()));
    assert_eq!(
        host_mounts(spec, reg)["/registration"].0,
        "/var/lib/kubelet/plugins_registry"
    );
    assert_eq!(
        mounted_same(spec, csi, "/var/lib/kubelet/pods"),
        Some("Bidirectional".into())
    );
    let node_id = csi["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NODE_ID")
        .expect("NODE_ID");
    assert_eq!(
        node_id["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );

    // The driver's own name and flags, once shm-csi is part of the workspace.
    let members = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    if !members.contains("\"shm-csi\"") {
        eprintln!(
            "NOTE: shm-csi is not a workspace member yet; its name and flags are not checked"
        );
        return;
    }
    let src = source_text(&repo().join("shm-csi/src"));
    assert!(
        src.contains(&format!("\"{CSI_DRIVER}\"")),
        "shm-csi's sources do not name the driver {CSI_DRIVER}"
    );
    let help = Command::new(shm_csi_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in ["--endpoint", "--node-id"] {
        assert!(help.contains(flag), "shm-csi --help lacks {flag}:\n{help}");
    }
    for e in csi["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        assert!(
            help.contains(&format!("[env: {name}=")),
            "shm-csi has no environment variable {name}:\n{help}"
        );
    }
    let root = csi["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "SHM_CSI_REGION_ROOT")
        .and_then(|e| e["value"].as_str())
        .expect("SHM_CSI_REGION_ROOT");
    assert_eq!(
        mounted_same(spec, csi, root),
        Some("Bidirectional".into()),
        "the regions live on the host"
    );
}

#[test]
fn node_components_only_read_nodes_pods_services_and_endpointslices_and_write_events() {
    let objs = objects();
    let bindings: Vec<&Value> = objs
        .iter()
        .filter(|o| {
            matches!(
                o["kind"].as_str(),
                Some("ClusterRoleBinding" | "RoleBinding")
            ) && o["subjects"][0]["name"] != WEBHOOK
        })
        .collect();
    assert_eq!(bindings.len(), 1, "one binding, for meshd");
    let binding = bindings[0];
    assert_eq!(binding["subjects"][0]["name"], "spright-node");
    let role = find(
        &objs,
        "ClusterRole",
        binding["roleRef"]["name"].as_str().unwrap(),
    );
    let mut granted = Vec::new();
    for rule in role["rules"].as_array().unwrap() {
        let verbs: Vec<&str> = rule["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let group = rule["apiGroups"][0].as_str().unwrap();
        if group == "events.k8s.io" {
            // Writes only Events (meshd/src/events.rs), nothing else.
            assert_eq!(verbs, ["create", "patch"], "{rule}");
            assert_eq!(rule["resources"], serde_json::json!(["events"]), "{rule}");
        } else {
            assert_eq!(verbs, ["get", "list", "watch"], "read-only: {rule}");
        }
        for r in rule["resources"].as_array().unwrap() {
            granted.push(format!(
                "{}/{}",
                rule["apiGroups"][0].as_str().unwrap(),
                r.as_str().unwrap()
            ));
        }
    }
    granted.sort();
    assert_eq!(
        granted,
        [
            "/nodes",
            "/pods",
            "/services",
            "discovery.k8s.io/endpointslices",
            "events.k8s.io/events"
        ]
    );
    let sa = find(&objs, "ServiceAccount", "spright-node");
    assert_eq!(sa["automountServiceAccountToken"], false);
    let node = pod_spec(find(&objs, "DaemonSet", "spright-node")).unwrap();
    assert_eq!(node["serviceAccountName"], "spright-node");
    // The token reaches meshd only: no automount for the pod, a projected
    // token volume mounted by meshd and by no other container.
    assert_eq!(node["automountServiceAccountToken"], false);
    let token_volumes: Vec<&str> = node["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| {
            v["projected"]["sources"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s.get("serviceAccountToken").is_some()))
        })
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(token_volumes.len(), 1, "{token_volumes:?}");
    for c in containers(node) {
        let mounts: Vec<&Value> = c["volumeMounts"]
            .as_array()
            .map(|m| m.iter().filter(|m| m["name"] == token_volumes[0]).collect())
            .unwrap_or_default();
        if c["name"] == "meshd" {
            assert_eq!(mounts.len(), 1);
            assert_eq!(
                mounts[0]["mountPath"], "/var/run/secrets/kubernetes.io/serviceaccount",
                "where kube-rs looks for the in-cluster token"
            );
            assert_eq!(mounts[0]["readOnly"], true);
        } else {
            assert!(mounts.is_empty(), "{} mounts the token", c["name"]);
        }
    }
    let cleanup = pod_spec(find(&objs, "DaemonSet", "spright-cleanup")).unwrap();
    assert_eq!(cleanup["serviceAccountName"], "spright-node");
    assert_eq!(cleanup["automountServiceAccountToken"], false);
}

/// `webhook.yaml`: the webhook configuration reaches the Deployment's
/// server (Service, ports, path), the real binary accepts the Deployment's
/// environment, the token is mounted in the webhook only, and its RBAC is
/// get and patch of its own configuration, nothing else.
#[test]
fn webhook_reaches_the_binary_and_may_only_write_its_ca_bundle() {
    let objs = objects();
    let config = find(&objs, "MutatingWebhookConfiguration", WEBHOOK);
    let service = find(&objs, "Service", WEBHOOK);
    let deployment = find(&objs, "Deployment", WEBHOOK);
    let spec = pod_spec(deployment).unwrap();
    let c = container(spec, "webhook");
    assert_eq!(
        c["command"],
        serde_json::json!(["/usr/local/bin/spright-webhook"])
    );

    // The binary accepts every variable and value the Deployment sets.
    let help = Command::new(workspace_bin(WEBHOOK))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let mut env = BTreeMap::new();
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        assert!(
            help.contains(&format!("[env: {name}=")),
            "spright-webhook has no environment variable {name}:\n{help}"
        );
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.namespace") => deployment["metadata"]["namespace"].as_str().unwrap(),
            Some(other) => panic!("{name} from {other}"),
            None => e["value"].as_str().unwrap(),
        };
        env.insert(name.to_owned(), value.to_owned());
    }
    assert_eq!(env["SPRIGHT_WEBHOOK_SELF_SIGNED"], "true");
    let addr: std::net::SocketAddr = env["SPRIGHT_WEBHOOK_ADDR"].parse().unwrap();
    let ports = c["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["containerPort"], addr.port());
    assert_eq!(
        env["SPRIGHT_WEBHOOK_CONFIG"],
        config["metadata"]["name"].as_str().unwrap()
    );
    assert_eq!(
        env["SPRIGHT_WEBHOOK_SERVICE"],
        service["metadata"]["name"].as_str().unwrap()
    );
    assert_eq!(
        env["SPRIGHT_WEBHOOK_NAMESPACE"],
        service["metadata"]["namespace"].as_str().unwrap()
    );
    // A flag the binary rejects fails before anything else; this environment
    // parses (the run then stops at the API, which is not here).
    let bad = Command::new(workspace_bin(WEBHOOK))
        .env_clear()
        .envs(&env)
        .env("SPRIGHT_WEBHOOK_CERT_VALIDITY", "3w")
        .output()
        .unwrap();
    let bad = String::from_utf8_lossy(&bad.stderr);
    assert!(bad.contains("--cert-validity"), "{bad}");
    let run = Command::new(workspace_bin(WEBHOOK))
        .env_clear()
        .envs(&env)
        .env("SPRIGHT_WEBHOOK_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    let run = String::from_utf8_lossy(&run.stderr);
    assert!(run.contains("--self-signed needs the API"), "{run}");

    // Probes over HTTPS at the server's port.
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let g = &c[probe]["httpGet"];
        assert_eq!(
            (g["path"].as_str(), g["scheme"].as_str()),
            (Some(path), Some("HTTPS"))
        );
        assert_eq!(g["port"], ports[0]["name"]);
    }
    // The API server's call: the Service, its port, the path.
    let hook = &config["webhooks"].as_array().unwrap()[0];
    let target = &hook["clientConfig"]["service"];
    assert_eq!(target["name"], service["metadata"]["name"]);
    assert_eq!(target["namespace"], service["metadata"]["namespace"]);
    assert_eq!(target["path"], "/mutate");
    let sp = &service["spec"]["ports"][0];
    assert_eq!(target["port"], sp["port"]);
    assert_eq!(sp["targetPort"], ports[0]["name"]);
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["template"]["metadata"]["labels"]
            .as_object()
            .map(|l| serde_json::json!({ "app.kubernetes.io/name": l["app.kubernetes.io/name"] }))
            .unwrap()
    );
    // Never in the way: v1 reviews, no side effects, Ignore on failure,
    // CREATE of Pods only, kube-system and spright's namespace skipped.
    assert_eq!(hook["admissionReviewVersions"], serde_json::json!(["v1"]));
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(hook["reinvocationPolicy"], "IfNeeded");
    assert_eq!(hook["timeoutSeconds"], 5);
    assert_eq!(
        hook["rules"],
        serde_json::json!([{ "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                             "resources": ["pods"], "scope": "Namespaced" }])
    );
    let skip = &hook["namespaceSelector"]["matchExpressions"][0];
    assert_eq!(skip["key"], "kubernetes.io/metadata.name");
    assert_eq!(skip["operator"], "NotIn");
    for ns in [
        "kube-system",
        service["metadata"]["namespace"].as_str().unwrap(),
    ] {
        assert!(
            skip["values"].as_array().unwrap().iter().any(|v| v == ns),
            "{ns}"
        );
    }
    let condition = hook["matchConditions"][0]["expression"].as_str().unwrap();
    assert!(
        condition.contains(&format!("'{}'", spright_endpoint::ANNOTATION_CHAIN)),
        "{condition}"
    );

    // Hardened: non-root, read-only root, no privilege escalation.
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        c["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );

    // The token: no automount, one projected token mounted by the webhook.
    let sa = find(&objs, "ServiceAccount", WEBHOOK);
    assert_eq!(sa["automountServiceAccountToken"], false);
    assert_eq!(spec["serviceAccountName"], WEBHOOK);
    assert_eq!(spec["automountServiceAccountToken"], false);
    let token: Vec<&Value> = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| {
            v["projected"]["sources"][0]
                .get("serviceAccountToken")
                .is_some()
        })
        .collect();
    assert_eq!(token.len(), 1);
    let mounts: Vec<&Value> = containers(spec)
        .flat_map(|c| c["volumeMounts"].as_array().into_iter().flatten())
        .filter(|m| m["name"] == token[0]["name"])
        .collect();
    assert_eq!(mounts.len(), 1);
    assert_eq!(
        mounts[0]["mountPath"],
        "/var/run/secrets/kubernetes.io/serviceaccount"
    );
    assert_eq!(mounts[0]["readOnly"], true);

    // RBAC: get and patch of its own configuration, by name.
    let binding = objs
        .iter()
        .find(|o| o["kind"] == "ClusterRoleBinding" && o["subjects"][0]["name"] == WEBHOOK)
        .expect("a binding for the webhook");
    assert_eq!(binding["subjects"].as_array().unwrap().len(), 1);
    assert_eq!(
        binding["subjects"][0]["namespace"],
        service["metadata"]["namespace"]
    );
    let role = find(
        &objs,
        "ClusterRole",
        binding["roleRef"]["name"].as_str().unwrap(),
    );
    assert_eq!(
        role["rules"],
        serde_json::json!([{
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": [config["metadata"]["name"]],
            "verbs": ["get", "patch"],
        }])
    );
}

#[test]
fn cleanup_removes_what_install_wrote() {
    let objs = objects();
    let cm = &find(&objs, "ConfigMap", "spright-config")["data"];
    let spec = pod_spec(find(&objs, "DaemonSet", "spright-cleanup")).unwrap();
    let c = container(spec, "uninstall");
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(c["command"][0], "/usr/local/bin/spright");
    assert_eq!(args[0], "uninstall");
    let mounts = host_mounts(spec, c);
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .unwrap_or_else(|| panic!("cleanup passes no --{name}"))
    };
    // Each flag points into a mount of the host directory install/meshd use.
    for (name, host) in [
        ("cni-bin-dir", "/opt/cni/bin"),
        ("cni-conf-dir", "/etc/cni/net.d"),
        ("bpffs", cm["bpffs"].as_str().unwrap()),
        ("state-dir", cm["state-dir"].as_str().unwrap()),
        ("ipam-dir", "/var/lib/cni/networks/spright"),
        ("host-root", "/"),
        ("region-root", "/run/spright/shm"),
        ("pod-cidr-file", "/etc/spright/pod-cidr"),
        // What uninstall removes below the kubelet's directory.
        (
            "kubelet-dir/plugins/shm.spright.dev",
            "/var/lib/kubelet/plugins/shm.spright.dev",
        ),
        (
            "kubelet-dir/plugins_registry",
            "/var/lib/kubelet/plugins_registry",
        ),
    ] {
        let (name, below) = name.split_once('/').unwrap_or((name, ""));
        let at = Path::new(flag(name)).join(below);
        let at = at.to_str().unwrap().trim_end_matches('/');
        let (mount, (host_root, _)) = mounts
            .iter()
            .find(|(m, _)| Path::new(at).starts_with(m))
            .unwrap_or_else(|| panic!("--{name}={at} is not on a host mount"));
        let on_host = Path::new(host_root).join(Path::new(at).strip_prefix(mount).unwrap());
        assert_eq!(on_host, Path::new(host), "--{name}");
    }
    // Regions are unmounted on the host, not only in the container.
    let regions = mounts
        .iter()
        .find(|(m, _)| Path::new(flag("region-root")).starts_with(m))
        .unwrap();
    assert_eq!(regions.1.1.as_deref(), Some("Bidirectional"));
    let node = pod_spec(find(&objs, "DaemonSet", "spright-node")).unwrap();
    let region_root = resolved_env(container(node, "shm-csi"), cm)["SHM_CSI_REGION_ROOT"].clone();
    assert_eq!(
        region_root, "/run/spright/shm",
        "shm-csi's regions are where uninstall looks"
    );
    // The real CLI accepts exactly these arguments.
    let out = Command::new(workspace_bin("spright"))
        .args(["uninstall", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for a in &args[1..] {
        let f = a.split('=').next().unwrap();
        assert!(help.contains(f), "spright uninstall has no {f}:\n{help}");
    }
}

/// The workspace's shm-csi binary. (`workspace_bin` maps binary names to
/// packages and does not know shm-csi yet, so it would compare it with the
/// tests' sources.)
fn shm_csi_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().join("../shm-csi");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} not built; run cargo build --workspace --bins",
                bin.display()
            )
        });
    let newest = newest(&repo().join("shm-csi/src"));
    assert!(
        newest <= built,
        "{} is older than shm-csi/src; run cargo build --workspace --bins",
        bin.display()
    );
    bin
}

fn newest(dir: &Path) -> std::time::SystemTime {
    let mut best = std::time::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let t = if p.is_dir() {
            newest(&p)
        } else {
            e.metadata().and_then(|m| m.modified()).unwrap_or(best)
        };
        best = best.max(t);
    }
    best
}

fn source_text(dir: &Path) -> String {
    let mut s = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            s += &source_text(&p);
        } else if p.extension().is_some_and(|x| x == "rs") {
            s += &std::fs::read_to_string(&p).unwrap_or_default();
        }
    }
    s
}
