//! podman (CNI backend) as a runtime for spright-cni, and the node image.
//!
//! podman runs inside a node network namespace the test owns (so the bridge
//! and pod addresses never touch the root namespace), with its own storage,
//! run root and containers.conf in a temporary directory, and places
//! containers below the test's cgroup (`--cgroup-parent`, cgroupfs): runc
//! creates `<v2>/<test cgroup>/libpod-<id>` next to the v1 controllers, so
//! the programs attached at the test's cgroup see the containers' sockets.
//! podman passes no pod annotations; the chain comes from `CNI_ARGS`
//! (`SPRIGHT_CHAIN=...`), which podman forwards to the plugins.
//!
//! Networks: spright as the primary plugin, and the reference `bridge` +
//! `host-local` with spright chained in by `spright install-cni` (the static
//! plugin it copies is the one podman runs).

use std::{net::IpAddr, path::Path, time::Duration};

use spright_tests::{
    cni::Node,
    runtime::{self, Podman, RuntimeCgroups, redirected, retry},
    sandbox::{static_plugin, workspace_bin},
};

const SUBNET: &str = "10.213.21.0/24";
const CHAINED_SUBNET: &str = "10.213.23.0/24";

/// What one podman test owns. Fields drop in order: containers first
/// (CNI DEL), then leftovers of the runtime's cgroups, the datapath, the
/// cgroup, the node namespace, the files.
struct Setup {
    podman: Podman,
    _runtime_cgroups: RuntimeCgroups,
    /// Node netns, test cgroup, pin dir and temp dir (dropped last).
    base: Node,
}

impl Setup {
    fn new(tag: &str) -> Self {
        let base = Node::new(tag).unwrap();
        let (dir, node, name) = (&base.dir, &base.node, &base.name);
        let runtime_cgroups = RuntimeCgroups { name: name.clone() };
        let bin = runtime::cni_bin_dir(dir.path()).unwrap();
        let podman = Podman::new(&dir.path().join("podman"), &node.path(), &bin).unwrap();
        Self {
            podman,
            _runtime_cgroups: runtime_cgroups,
            base,
        }
    }

    fn rootfs(&self) -> String {
        let r = self.base.dir.path().join("rootfs");
        if !r.exists() {
            runtime::busybox_rootfs(&r).unwrap();
        }
        r.display().to_string()
    }

    fn state_dir(&self) -> std::path::PathBuf {
        self.base.dir.path().join("state")
    }
}

/// Starts a busybox httpd container on network `net` (chain via CNI_ARGS).
fn serve(s: &Setup, name: &str, net: &str, chain: Option<&str>) -> IpAddr {
    let args = chain.map(|c| format!("{}={c}", spright_endpoint::CNI_ARG_CHAIN));
    let env: Vec<(&str, &str)> = args.iter().map(|a| ("CNI_ARGS", a.as_str())).collect();
    let parent = format!("/{}", s.base.name);
    let rootfs = s.rootfs();
    s.podman
        .run(
            &env,
            &[
                "run",
                "-d",
                "--name",
                name,
                "--network",
                net,
                "--cgroup-parent",
                &parent,
                "--rootfs",
                &rootfs,
                "/bin/httpd",
                "-f",
                "-p",
                "8080",
                "-h",
                "/www",
            ],
        )
        .unwrap();
    let ip = s
        .podman
        .run(
            &[],
            &[
                "inspect",
                "-f",
                &format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}"),
                name,
            ],
        )
        .unwrap();
    ip.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{name} ip {ip:?}: {e}"))
}

/// `wget` from inside container `from` (a process in its cgroup and netns).
fn fetch(s: &Setup, from: &str, to: IpAddr) -> anyhow::Result<String> {
    retry(Duration::from_secs(5), || {
        s.podman.run(
            &[],
            &[
                // busybox-static 1.35 segfaults on `wget -T`: bound it with timeout.
                "exec",
                from,
                "timeout",
                "5",
                "wget",
                "-q",
                "-O",
                "-",
                &format!("http://{to}:8080/"),
            ],
        )
    })
}

#[test]
fn e2e_podman_chain_over_cni_args() {
    if !runtime::require_tools(
        "e2e_podman_chain_over_cni_args",
        &["podman", "runc", "conmon"],
    ) {
        return;
    }
    let s = Setup::new("pm");
    let conflist = runtime::spright_conflist(
        "spright",
        "sprpm0",
        SUBNET,
        &s.base.cgroup.path,
        &s.base.pins.path,
        s.base.dir.path(),
    );
    s.podman.add_network(&conflist).unwrap();

    chain_pods_are_redirected(&s, "spright");
}

#[test]
fn e2e_podman_chain_through_the_installed_chained_conflist() {
    if !runtime::require_tools(
        "e2e_podman_chain_through_the_installed_chained_conflist",
        &["podman", "runc", "conmon"],
    ) {
        return;
    }
    let s = Setup::new("pc");
    // The node's primary CNI: the reference bridge with host-local.
    s.podman
        .add_network(&serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "refnet",
            "plugins": [{
                "type": "bridge",
                "bridge": "sprpc0",
                "isGateway": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": s.base.ipam_dir(),
                    "ranges": [[{ "subnet": CHAINED_SUBNET }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                },
            }],
        }))
        .unwrap();
    // install-cni chains spright into it and copies the static plugin over
    // the CNI bin dir's spright-cni.
    let out = std::process::Command::new(workspace_bin("spright"))
        .args(["install-cni", "--once", "--conf-dir"])
        .arg(s.podman.dir.join("net.d"))
        .arg("--bin-dir")
        .arg(s.base.dir.path().join("cni-bin"))
        .arg("--plugin")
        .arg(static_plugin())
        .arg("--cgroup")
        .arg(&s.base.cgroup.path)
        .arg("--bpffs")
        .arg(&s.base.pins.path)
        .arg("--state-dir")
        .arg(s.state_dir())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "install-cni: {log}");
    assert!(log.contains("inserted spright-cni"), "{log}");
    assert_eq!(
        std::fs::read(s.base.dir.path().join("cni-bin/spright-cni")).unwrap(),
        std::fs::read(static_plugin()).unwrap(),
        "podman runs the static plugin"
    );
    chain_pods_are_redirected(&s, "refnet");
}

/// Two chain containers and an outsider on `net`: the chain hop is
/// redirected, the others are not, and removing them leaves nothing.
fn chain_pods_are_redirected(s: &Setup, net: &str) {
    let a = serve(s, "fn-a", net, Some("demo"));
    let b = serve(s, "fn-b", net, Some("demo"));
    let outsider = serve(s, "outsider", net, None);
    let records = spright_endpoint::list(&s.state_dir()).unwrap();
    assert_eq!(records.len(), 3, "one record per container");
    let netns_paths: Vec<String> = records
        .iter()
        .filter_map(|l| l.1.as_ref().ok())
        .map(|r| r.netns.clone())
        .collect();
    let chains: Vec<Option<String>> = records
        .iter()
        .filter_map(|l| l.1.as_ref().ok())
        .map(|r| r.chain.clone())
        .collect();
    assert_eq!(
        chains
            .iter()
            .filter(|c| c.as_deref() == Some("demo"))
            .count(),
        2,
        "SPRIGHT_CHAIN from CNI_ARGS reached the records: {chains:?}"
    );

    // The two chain containers reach each other, and their connections go
    // socket to socket.
    assert_eq!(fetch(s, "fn-a", b).unwrap().trim(), "spright-e2e");
    assert_eq!(fetch(s, "fn-b", a).unwrap().trim(), "spright-e2e");
    let (msgs_a, bytes_a) = redirected(&s.base.pins.path, a).unwrap();
    let (msgs_b, bytes_b) = redirected(&s.base.pins.path, b).unwrap();
    assert!(
        msgs_a > 0 && msgs_b > 0 && bytes_a > 0 && bytes_b > 0,
        "chain hops were not redirected: a {msgs_a}/{bytes_a}, b {msgs_b}/{bytes_b}"
    );
    // The outsider reaches them too, over the normal path: no redirect.
    assert_eq!(fetch(s, "outsider", a).unwrap().trim(), "spright-e2e");
    assert_eq!(fetch(s, "fn-a", outsider).unwrap().trim(), "spright-e2e");
    assert_eq!(redirected(&s.base.pins.path, outsider).unwrap(), (0, 0));
    assert_eq!(
        redirected(&s.base.pins.path, a).unwrap().0,
        msgs_a,
        "a connection with the outsider was redirected"
    );

    // Removing the containers removes every trace (CNI DEL).
    s.podman
        .run(
            &[],
            &["rm", "--force", "--time", "0", "fn-a", "fn-b", "outsider"],
        )
        .unwrap();
    assert!(spright_endpoint::list(&s.state_dir()).unwrap().is_empty());
    let links = s.base.node.ip(&["-o", "link", "show"]).unwrap();
    assert_eq!(
        links.lines().count(),
        2,
        "only lo and the bridge remain in the node: {links}"
    );
    let left = s.base.allocations(net);
    assert!(left.is_empty(), "IP allocations left: {left:?}");
    let dp = spright_ebpf::Datapath::open(&s.base.pins.path).unwrap();
    assert!(
        dp.endpoints().unwrap().is_empty(),
        "endpoint map entries left"
    );
    for ns in netns_paths {
        assert!(!Path::new(&ns).exists(), "pod netns {ns} left");
    }
}

#[test]
fn e2e_image_runs_meshd_and_installs_the_cni() {
    if !runtime::require_tools(
        "e2e_image_runs_meshd_and_installs_the_cni",
        &["podman", "runc", "conmon", "strip"],
    ) {
        return;
    }
    let s = Setup::new("im");
    // The image packages these (build.sh); never yesterday's binaries.
    let bin_dir = workspace_bin("meshd")
        .canonicalize()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    workspace_bin("spright");
    static_plugin();
    let image = format!("ghcr.io/spright-dev/spright:{}", env!("CARGO_PKG_VERSION"));
    let podman_cmd = format!(
        "podman --root {d}/root --runroot {d}/runroot",
        d = s.podman.dir.display()
    );
    let build_image = || {
        let out = std::process::Command::new(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/image/build.sh"),
        )
        .env("PROFILE", bin_dir.file_name().unwrap())
        .env("TARGET", bin_dir.parent().unwrap())
        .env("PODMAN", &podman_cmd)
        .env("CONTAINERS_CONF", s.podman.dir.join("containers.conf"))
        .env("CONTAINERS_STORAGE_CONF", s.podman.dir.join("storage.conf"))
        .env("TMPDIR", s.base.dir.path())
        .output()
        .unwrap();
        runtime::check(&out, "manifests/image/build.sh")
    };
    // podman's commit streams each layer through a pipe into a file and
    // reports any failure of that copy (a full disk included) only as
    // "read/write on closed pipe". One CI run saw it once; so the build is
    // tried a second time, and a second failure says how much disk there was.
    let built = build_image()
        .or_else(|e| {
            let disk = runtime::disk_report(&[s.base.dir.path(), &s.podman.dir]);
            if !format!("{e:#}").contains("closed pipe") {
                return Err(e.context(disk));
            }
            eprintln!("image build failed once, trying again ({disk}): {e:#}");
            build_image()
                .map_err(|e| e.context(runtime::disk_report(&[s.base.dir.path(), &s.podman.dir])))
        })
        .unwrap();
    assert_eq!(built.trim(), image);

    // `spright install-cni --once` from the image, as the DaemonSet's init
    // container runs it (read-only root, host dirs under /host), against a
    // fake host whose primary CNI is the reference bridge.
    let host = s.base.dir.path().join("host");
    for d in ["opt/cni/bin", "etc/cni/net.d", "etc/spright"] {
        std::fs::create_dir_all(host.join(d)).unwrap();
    }
    let primary = r#"{"cniVersion":"1.0.0","name":"bridge-net","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.213.22.0/24"}}]}"#;
    std::fs::write(host.join("etc/cni/net.d/10-bridge.conflist"), primary).unwrap();
    let vol = |h: &str, c: &str| format!("{}:{c}", host.join(h).display());
    s.podman
        .run(
            &[],
            &[
                "run",
                "--rm",
                "--network",
                "none",
                "--read-only",
                "-v",
                &vol("opt/cni/bin", "/host/opt/cni/bin"),
                "-v",
                &vol("etc/cni/net.d", "/host/etc/cni/net.d"),
                "-v",
                &vol("etc/spright", "/host/etc/spright:ro"),
                "--env",
                "SPRIGHT_CNI_CONF_DIR=/host/etc/cni/net.d",
                "--env",
                "SPRIGHT_CNI_BIN_DIR=/host/opt/cni/bin",
                "--env",
                "SPRIGHT_CNI_MODE=chained",
                "--env",
                "SPRIGHT_POD_CIDR_FILE=/host/etc/spright/pod-cidr",
                &image,
                "/usr/local/bin/spright",
                "install-cni",
                "--once",
            ],
        )
        .unwrap();
    let conf: serde_json::Value = serde_json::from_slice(
        &std::fs::read(host.join("etc/cni/net.d/10-bridge.conflist")).unwrap(),
    )
    .unwrap();
    assert_eq!(conf["plugins"][0]["type"], "bridge");
    assert_eq!(conf["plugins"][1]["type"], "spright-cni", "{conf:#}");
    assert_eq!(conf["plugins"][1]["mode"], "chained");
    // The image ships the static plugin, and that is what lands on the host.
    let installed = host.join("opt/cni/bin/spright-cni");
    let static_size = std::fs::metadata(static_plugin()).unwrap().len();
    assert!(
        std::fs::metadata(&installed).unwrap().len() <= static_size,
        "the installed plugin is the (stripped) static build"
    );
    let ldd = std::process::Command::new("ldd")
        .arg(&installed)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&ldd.stdout).contains("=>"),
        "the installed plugin links shared libraries: {}",
        String::from_utf8_lossy(&ldd.stdout)
    );
    let version = std::process::Command::new(&installed)
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout).contains("1.1.0"),
        "the installed plugin answers VERSION"
    );

    // meshd from the image, on the node's network, with the host's bpffs,
    // cgroup tree and a state dir, as the DaemonSet runs it.
    let state = s.base.dir.path().join("meshd-state");
    std::fs::create_dir_all(spright_endpoint::records_dir(&state)).unwrap();
    let env_args = [
        format!("SPRIGHT_CGROUP={}", s.base.cgroup.path.display()),
        format!("SPRIGHT_BPFFS={}", s.base.pins.path.display()),
        "SPRIGHT_STATE_DIR=/var/lib/spright".to_owned(),
        "SPRIGHT_API_ADDR=127.0.0.1:9943".to_owned(),
        "SPRIGHT_RESCAN_SECS=1".to_owned(),
    ];
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--name",
        "meshd",
        "--network",
        "host",
        "--privileged",
        "--cgroup-parent",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    args.push(format!("/{}", s.base.name));
    for e in &env_args {
        args.extend(["--env".to_owned(), e.clone()]);
    }
    args.extend([
        "-v".to_owned(),
        "/sys/fs/bpf:/sys/fs/bpf:rshared".to_owned(),
        "-v".to_owned(),
        "/sys/fs/cgroup:/sys/fs/cgroup".to_owned(),
        "-v".to_owned(),
        format!("{}:/var/lib/spright", state.display()),
        image.clone(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    s.podman.run(&[], &args).unwrap();
    // meshd's HTTP API, from the node namespace it shares.
    let get = |path: &str| {
        let url = format!("http://127.0.0.1:9943{path}");
        s.base
            .node
            .exec("timeout", &["3", "busybox", "wget", "-q", "-O", "-", &url])
    };
    let status = retry(Duration::from_secs(30), || {
        anyhow::ensure!(!get("/readyz")?.is_empty(), "not ready");
        get("/status")
    })
    .unwrap_or_else(|e| {
        let logs = s.podman.run(&[], &["logs", "meshd"]).unwrap_or_default();
        panic!("meshd in the image never became ready: {e:#}\n{logs}")
    });
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["acceleration"]["enabled"], true, "{status:#}");
    assert_eq!(
        status["acceleration"]["cgroup"],
        s.base.cgroup.path.display().to_string(),
        "{status:#}"
    );
    // The programs are pinned on the host: they outlive the container.
    s.podman
        .run(&[], &["rm", "--force", "--time", "5", "meshd"])
        .unwrap();
    assert!(spright_ebpf::Datapath::open(&s.base.pins.path).is_ok());
}
