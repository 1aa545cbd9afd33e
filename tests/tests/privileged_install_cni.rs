//! `spright install-cni` against conf dirs shaped like real clusters', run
//! as the DaemonSet runs it: the real `spright` binary with its flags, the
//! files on disk, and (for the watcher) a long-running process that the
//! test changes files under.
//!
//! - chained into the Debian reference `bridge` + `host-local` conflist, one
//!   shaped like Calico's (`10-calico.conflist`) and one like Cilium's
//!   (`05-cilium.conflist`): the first file by name gets spright last, the
//!   other plugins and files keep their meaning; a second run writes nothing;
//!   `--uninstall` restores the original plugin list;
//! - the watcher: waits while the conf dir is empty, re-inserts after the
//!   primary CNI rewrites its file, follows a new file that sorts first;
//! - the static (musl) plugin that install-cni copies answers VERSION in an
//!   otherwise empty root filesystem (chroot).
//!
//! Root is needed for the chroot; the rest only writes temporary
//! directories, never the machine's /etc/cni/net.d or /opt/cni/bin.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use spright_tests::{
    privileged::require,
    sandbox::{Peer, static_plugin, workspace_bin},
};

// The primary CNIs' conflists, shared with install-cni's unit tests.

/// The Debian reference plugins as a kubeadm guide sets them up.
const BRIDGE: &str = include_str!("../../meshd/src/install_cni/testdata/10-bridge.conflist");

/// calico-node's conflist with its placeholders filled for one node.
const CALICO: &str = include_str!("../../meshd/src/install_cni/testdata/10-calico.conflist");

/// cilium-agent's 05-cilium.conflist.
const CILIUM: &str = include_str!("../../meshd/src/install_cni/testdata/05-cilium.conflist");

/// A file that sorts after the primary's: never touched.
const LATER: &str = r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#;

/// A node's CNI directories in a temporary directory.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Self {
        let h = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(h.conf_dir()).unwrap();
        std::fs::create_dir_all(h.bin_dir()).unwrap();
        h
    }

    fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("etc/cni/net.d")
    }

    fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("opt/cni/bin")
    }

    fn conf(&self, name: &str) -> PathBuf {
        self.conf_dir().join(name)
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.conf(name), text).unwrap();
    }

    /// `spright install-cni` with this host's directories and `extra` flags.
    fn command(&self, extra: &[&str]) -> Command {
        self.command_into(&self.bin_dir(), extra)
    }

    /// The same, copying the plugin into `bin_dir`.
    fn command_into(&self, bin_dir: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(workspace_bin("spright"));
        cmd.arg("install-cni")
            .arg("--conf-dir")
            .arg(self.conf_dir())
            .arg("--bin-dir")
            .arg(bin_dir)
            .arg("--plugin")
            .arg(static_plugin())
            .args(["--state-dir", "/var/lib/spright"])
            .args(["--bpffs", "/sys/fs/bpf/spright"])
            .args(extra)
            .env_remove("SPRIGHT_CGROUP")
            .env("SPRIGHT_LOG", "info");
        cmd
    }

    /// Runs install-cni to completion; returns its log.
    fn run(&self, extra: &[&str]) -> String {
        let out = self.command(extra).output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "install-cni {extra:?} failed:\n{log}");
        log
    }

    /// The long-running watcher, its log lines on the peer's stdout.
    fn watcher(&self) -> Peer {
        let cmd = self.command(&["--rescan-secs", "3600"]);
        // Only inotify can make it react within the test's wait: the rescan
        // is an hour away.
        let program = cmd.get_program().to_owned();
        let args: Vec<_> = cmd.get_args().map(ToOwned::to_owned).collect();
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg("exec \"$@\" 2>&1")
            .arg("sh")
            .arg(program)
            .args(args)
            .env_remove("SPRIGHT_CGROUP")
            .env("SPRIGHT_LOG", "info")
            .stdout(Stdio::piped());
        Peer::spawn_command(sh).unwrap()
    }
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn plugins(v: &Value) -> Vec<Value> {
    v["plugins"].as_array().unwrap().clone()
}

fn is_spright_last(v: &Value) -> bool {
    let p = plugins(v);
    p.last().is_some_and(|l| {
        l["type"] == "spright-cni"
            && l["mode"] == "chained"
            && l["capabilities"]["io.kubernetes.cri.pod-annotations"] == true
    }) && p.iter().filter(|x| x["type"] == "spright-cni").count() == 1
}

/// Polls `f` every 50 ms for at most 20 s (no assertion of speed: the bound
/// only keeps a broken watcher from hanging the suite).
fn eventually(what: &str, watcher: &Peer, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        let mut log = String::new();
        while let Ok(l) = watcher.line(Duration::from_millis(1)) {
            log += &l;
            log.push('\n');
        }
        assert!(
            Instant::now() < deadline,
            "{what} never happened; watcher log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn privileged_install_cni_chains_into_the_primarys_conflist() {
    if !require("privileged_install_cni_chains_into_the_primarys_conflist") {
        return;
    }
    for (name, primary) in [
        ("10-bridge.conflist", BRIDGE),
        ("10-calico.conflist", CALICO),
        ("05-cilium.conflist", CILIUM),
    ] {
        let host = Host::new();
        host.write(name, primary);
        host.write("99-loopback.conf", LATER);
        std::fs::write(
            host.conf("calico-kubeconfig"),
            "kubeconfig, not a CNI config",
        )
        .unwrap();
        let log = host.run(&["--once"]);
        assert!(log.contains("inserted spright-cni"), "{name}: {log}");

        let before = serde_json::from_str::<Value>(primary).unwrap();
        let after = json(&host.conf(name));
        assert!(is_spright_last(&after), "{name}: {after:#}");
        assert_eq!(
            plugins(&after)[..plugins(&before).len()],
            plugins(&before)[..],
            "{name}: the primary's plugins changed"
        );
        for key in ["cniVersion", "name"] {
            assert_eq!(after[key], before[key], "{name}: {key}");
        }
        // The plugin entry carries the settings it was given.
        let entry = plugins(&after).pop().unwrap();
        assert_eq!(entry["stateDir"], "/var/lib/spright");
        assert_eq!(entry["bpffs"], "/sys/fs/bpf/spright");
        assert!(entry.get("cgroup").is_none(), "{entry}");
        // Other files are untouched, byte for byte.
        assert_eq!(
            std::fs::read_to_string(host.conf("99-loopback.conf")).unwrap(),
            LATER
        );
        // The plugin was copied: the static build, executable.
        let copied = host.bin_dir().join("spright-cni");
        assert_eq!(
            std::fs::read(&copied).unwrap(),
            std::fs::read(static_plugin()).unwrap()
        );
        assert_eq!(std::fs::metadata(&copied).unwrap().mode() & 0o777, 0o755);

        // A second install changes nothing: same bytes, same inode (no rewrite).
        let text = std::fs::read(host.conf(name)).unwrap();
        let ino = std::fs::metadata(host.conf(name)).unwrap().ino();
        let bin_ino = std::fs::metadata(&copied).unwrap().ino();
        host.run(&["--once"]);
        assert_eq!(std::fs::read(host.conf(name)).unwrap(), text, "{name}");
        assert_eq!(
            std::fs::metadata(host.conf(name)).unwrap().ino(),
            ino,
            "{name}: rewritten"
        );
        assert_eq!(
            std::fs::metadata(&copied).unwrap().ino(),
            bin_ino,
            "binary recopied"
        );

        // Uninstall restores the original plugin list exactly, and removes
        // the binary and nothing else.
        let log = host.run(&["--uninstall"]);
        assert!(log.contains("removed spright-cni from"), "{log}");
        assert_eq!(json(&host.conf(name)), before, "{name}");
        assert!(!copied.exists());
        assert_eq!(
            std::fs::read_to_string(host.conf("99-loopback.conf")).unwrap(),
            LATER
        );
        assert!(host.conf("calico-kubeconfig").exists());
        let mut names: Vec<String> = std::fs::read_dir(host.conf_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut expected = vec![
            name.to_owned(),
            "99-loopback.conf".into(),
            "calico-kubeconfig".into(),
        ];
        expected.sort();
        assert_eq!(names, expected, "no temporary files left");
    }
}

#[test]
fn privileged_install_cni_single_plugin_conf_becomes_a_conflist() {
    if !require("privileged_install_cni_single_plugin_conf_becomes_a_conflist") {
        return;
    }
    let host = Host::new();
    let conf = r#"{"cniVersion":"0.4.0","name":"podman","type":"bridge","bridge":"cni-podman0","ipam":{"type":"host-local","subnet":"10.88.0.0/16"}}"#;
    host.write("87-podman.conf", conf);
    let log = host.run(&["--once"]);
    assert!(log.contains("converted"), "{log}");
    assert!(!host.conf("87-podman.conf").exists());
    let list = json(&host.conf("87-podman.conflist"));
    assert_eq!(list["cniVersion"], "0.4.0");
    assert_eq!(list["name"], "podman");
    assert_eq!(
        plugins(&list)[0],
        serde_json::from_str::<Value>(conf).unwrap()
    );
    assert!(is_spright_last(&list));
    host.run(&["--uninstall"]);
    assert_eq!(
        plugins(&json(&host.conf("87-podman.conflist"))),
        [serde_json::from_str::<Value>(conf).unwrap()],
        "the plugin list is the original one"
    );
}

#[test]
fn privileged_install_cni_watcher_reasserts_spright() {
    if !require("privileged_install_cni_watcher_reasserts_spright") {
        return;
    }
    let host = Host::new();
    // No primary CNI yet: the watcher waits and says so.
    let watcher = host.watcher();
    let line = watcher.line(Duration::from_secs(20)).unwrap();
    let mut log = line.clone();
    while !log.contains("waiting for the primary CNI") {
        log += &watcher.line(Duration::from_secs(20)).expect(&log);
    }

    // The primary CNI installs itself (atomically, as calico-node does).
    let calico = host.conf("10-calico.conflist");
    let tmp = host.conf_dir().join(".calico.tmp");
    std::fs::write(&tmp, CALICO).unwrap();
    std::fs::rename(&tmp, &calico).unwrap();
    eventually("spright inserted into Calico's conflist", &watcher, || {
        serde_json::from_slice(&std::fs::read(&calico).unwrap()).is_ok_and(|v| is_spright_last(&v))
    });

    // The primary rewrites its file in place (a restart, a config change).
    std::fs::write(&calico, CALICO.replace("node-1", "node-1b")).unwrap();
    eventually(
        "spright re-inserted after an in-place rewrite",
        &watcher,
        || {
            let text = std::fs::read_to_string(&calico).unwrap();
            text.contains("node-1b")
                && serde_json::from_str(&text).is_ok_and(|v: Value| is_spright_last(&v))
        },
    );

    // A new primary's file sorts first (Cilium next to Calico): the runtime
    // uses it now, so spright follows it there.
    let cilium = host.conf("05-cilium.conflist");
    std::fs::write(&cilium, CILIUM).unwrap();
    eventually(
        "spright inserted into the file that sorts first",
        &watcher,
        || {
            serde_json::from_slice(&std::fs::read(&cilium).unwrap())
                .is_ok_and(|v| is_spright_last(&v))
        },
    );
    drop(watcher);

    // Uninstall removes spright's entries from both, and only them.
    host.run(&["--uninstall"]);
    assert_eq!(
        json(&cilium),
        serde_json::from_str::<Value>(CILIUM).unwrap()
    );
    assert_eq!(
        json(&calico),
        serde_json::from_str::<Value>(&CALICO.replace("node-1", "node-1b")).unwrap()
    );
    assert!(!host.bin_dir().join("spright-cni").exists());
}

#[test]
fn privileged_install_cni_static_plugin_runs_in_an_empty_root() {
    if !require("privileged_install_cni_static_plugin_runs_in_an_empty_root") {
        return;
    }
    // install-cni copies the plugin into an otherwise empty directory, which
    // then serves as the whole root filesystem: no libc, no loader, no /proc.
    let host = Host::new();
    let root = tempfile::tempdir().unwrap();
    host.write("10-bridge.conflist", BRIDGE);
    let out = host
        .command_into(root.path(), &["--once"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["spright-cni"], "the root holds the plugin only");
    for version in ["1.0.0", "1.1.0"] {
        // No environment but the CNI variable (env_clear also drops PATH,
        // so chroot is named by its path).
        let out = Command::new("/usr/sbin/chroot")
            .arg(root.path())
            .arg("/spright-cni")
            .env_clear()
            .env("CNI_COMMAND", "VERSION")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                let conf =
                    format!(r#"{{"cniVersion":"{version}","name":"x","type":"spright-cni"}}"#);
                c.stdin.take().unwrap().write_all(conf.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        assert!(
            out.status.success(),
            "VERSION in an empty root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        // Like the reference plugins' skel: the newest version it speaks,
        // whatever the config asked.
        assert_eq!(v["cniVersion"], spright_endpoint::CNI_VERSION, "{v}");
        let supported: Vec<&str> = v["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert_eq!(supported, spright_endpoint::CNI_VERSIONS);
    }
}
