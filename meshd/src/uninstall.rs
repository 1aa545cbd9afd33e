//! `spright uninstall`: removes everything spright created on a node, in the
//! order that stops new work first:
//!
//! 1. the CNI config (spright's chained entries in every file, its own
//!    conflist in primary mode), so the runtime stops calling the plugin;
//! 2. the plugin binary;
//! 3. the eBPF programs (detached) and their pins;
//! 4. the endpoint records, the plugin's lock and the state directory;
//! 5. the host-local allocations of the spright network;
//! 6. the primary-mode bridge (`spright0` by default; only a link of kind
//!    bridge) and every MASQUERADE rule spright-cni added (comment
//!    `spright-cni:...`), in both families;
//! 7. shm-csi's regions (every `shm.spright.dev` mount below the region root,
//!    then the root), its kubelet plugin directory and registration socket;
//! 8. the primary-mode pod CIDR file and `/etc/spright` when empty.
//!
//! Idempotent: a second run reports nothing. Stops at the first error; a
//! rerun continues where it stopped. Every step says what it removed.

use std::{
    io,
    path::{Path, PathBuf},
};

use crate::install_cni;

/// What `spright uninstall` removes, by path and name.
#[derive(Clone, Debug)]
pub struct Uninstall {
    pub conf_dir: PathBuf,
    pub conflist: String,
    pub plugin: PathBuf,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    pub ipam_dir: PathBuf,
    /// The primary-mode bridge; `None` leaves links alone.
    pub bridge: Option<String>,
    /// Remove spright-cni's iptables rules.
    pub iptables: bool,
    /// Run the host's iptables under this root (a container mounting `/`).
    pub host_root: Option<PathBuf>,
    pub region_root: PathBuf,
    pub kubelet_dir: PathBuf,
    pub pod_cidr_file: PathBuf,
}

/// shm-csi's driver name: its kubelet plugin directory and registration
/// socket are named after it.
const CSI_DRIVER: &str = shm_csi::sys::MOUNT_SOURCE;

impl Uninstall {
    /// Removes everything; returns what it did.
    pub fn run(&self) -> Result<Vec<String>, String> {
        let mut done = Vec::new();
        done.extend(
            install_cni::remove_from_conf_dir(&self.conf_dir, &self.conflist)
                .map_err(|e| crate::error::chain(&e))?,
        );
        remove_file(&self.plugin, &mut done)?;
        if self.bpffs.exists() {
            spright_ebpf::uninstall(&self.bpffs)
                .map_err(|e| format!("detaching the datapath in {}: {e}", self.bpffs.display()))?;
            done.push(format!(
                "detached the programs and removed the pins in {}",
                self.bpffs.display()
            ));
        }
        remove_dir_files(&spright_endpoint::records_dir(&self.state_dir), &mut done)?;
        remove_file(
            &self.state_dir.join(spright_endpoint::CNI_LOCK_FILE),
            &mut done,
        )?;
        remove_empty_dir(&self.state_dir, &mut done)?;
        remove_dir_files(&self.ipam_dir, &mut done)?;
        if let Some(bridge) = &self.bridge {
            remove_bridge(bridge, &mut done)?;
        }
        if self.iptables {
            let n = spright_cni::iptables::remove_all(self.host_root.as_deref())
                .map_err(|e| format!("removing spright-cni's masquerade rules: {e}"))?;
            if n > 0 {
                done.push(format!("removed {n} masquerade rules of spright-cni"));
            }
        }
        remove_regions(&self.region_root, &mut done)?;
        let plugin_dir = self.kubelet_dir.join("plugins").join(CSI_DRIVER);
        remove_dir_files(&plugin_dir, &mut done)?;
        remove_file(
            &self
                .kubelet_dir
                .join("plugins_registry")
                .join(format!("{CSI_DRIVER}-reg.sock")),
            &mut done,
        )?;
        remove_file(&self.pod_cidr_file, &mut done)?;
        if let Some(etc) = self.pod_cidr_file.parent() {
            remove_empty_dir(etc, &mut done)?;
        }
        Ok(done)
    }
}

/// Deletes the link `name` when it is a bridge (a link of that name of
/// another kind is not ours).
fn remove_bridge(name: &str, done: &mut Vec<String>) -> Result<(), String> {
    let nl = spright_cni::link::Netlink::new().map_err(|e| format!("netlink: {e}"))?;
    let Some(link) = nl.link(name).map_err(|e| e.to_string())? else {
        return Ok(());
    };
    if link.kind.as_deref() != Some("bridge") {
        done.push(format!(
            "left link {name}: it is a {}, not spright's bridge",
            link.kind.as_deref().unwrap_or("link of unknown kind")
        ));
        return Ok(());
    }
    if nl.delete_link(name).map_err(|e| e.to_string())? {
        done.push(format!("deleted bridge {name}"));
    }
    Ok(())
}

/// Unmounts every region (a mount whose source is shm-csi's) at or below
/// `root`, deepest first, then removes `root` once nothing is mounted below
/// it. A mount of anything else below `root` stops the removal: its files
/// are not spright's to delete.
fn remove_regions(root: &Path, done: &mut Vec<String>) -> Result<(), String> {
    if !root.exists() {
        return Ok(());
    }
    let mounted_below = || -> Result<Vec<shm_csi::sys::MountEntry>, String> {
        let mut m: Vec<_> = shm_csi::sys::mounts()
            .map_err(|e| e.to_string())?
            .into_iter()
            // The root itself may be a container's volume mount: only what
            // is mounted inside it counts.
            .filter(|m| m.mount_point.starts_with(root) && m.mount_point != root)
            .collect();
        // Deepest (and, at one path, the latest) first.
        m.reverse();
        m.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
        Ok(m)
    };
    let mut n = 0;
    // Bounded: every pass unmounts at least one mount or stops.
    for _ in 0..1024 {
        let Some(region) = mounted_below()?
            .into_iter()
            .find(|m| m.source == CSI_DRIVER)
        else {
            break;
        };
        shm_csi::sys::unmount(&region.mount_point).map_err(|e| e.to_string())?;
        n += 1;
    }
    if n > 0 {
        done.push(format!(
            "unmounted {n} shared-memory regions below {}",
            root.display()
        ));
    }
    if let Some(other) = mounted_below()?.first() {
        return Err(format!(
            "{} is still mounted ({} from {}), not a region of shm-csi: unmount it, then run uninstall again",
            other.mount_point.display(),
            other.fstype,
            other.source
        ));
    }
    for entry in std::fs::read_dir(root).map_err(|e| format!("listing {}: {e}", root.display()))? {
        let path = entry
            .map_err(|e| format!("listing {}: {e}", root.display()))?
            .path();
        let r = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        r.map_err(|e| format!("removing {}: {e}", path.display()))?;
        done.push(format!("removed {}", path.display()));
    }
    match std::fs::remove_dir(root) {
        Ok(()) => done.push(format!("removed {}", root.display())),
        // A volume mount in the cleanup container: emptied, the host keeps
        // the directory.
        Err(e) if e.kind() == io::ErrorKind::ResourceBusy => {}
        Err(e) => return Err(format!("removing {}: {e}", root.display())),
    }
    Ok(())
}

fn remove_file(path: &Path, done: &mut Vec<String>) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            done.push(format!("removed {}", path.display()));
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", path.display())),
    }
}

/// Removes the entries of `dir` that are not directories (files, sockets),
/// then `dir` when it is empty.
fn remove_dir_files(dir: &Path, done: &mut Vec<String>) -> Result<(), String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("listing {}: {e}", dir.display())),
    };
    let mut n = 0;
    for entry in entries {
        let entry = entry.map_err(|e| format!("listing {}: {e}", dir.display()))?;
        if entry.file_type().is_ok_and(|t| !t.is_dir()) {
            std::fs::remove_file(entry.path())
                .map_err(|e| format!("removing {}: {e}", entry.path().display()))?;
            n += 1;
        }
    }
    if n > 0 {
        done.push(format!("removed {n} files in {}", dir.display()));
    }
    remove_empty_dir(dir, done)
}

/// Removes `dir` when empty; says so when something unknown keeps it.
fn remove_empty_dir(dir: &Path, done: &mut Vec<String>) -> Result<(), String> {
    match std::fs::remove_dir(dir) {
        Ok(()) => {
            done.push(format!("removed {}", dir.display()));
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
            done.push(format!(
                "left {}: it holds files spright did not write",
                dir.display()
            ));
            Ok(())
        }
        Err(e) => Err(format!("removing {}: {e}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(root: &Path) -> Uninstall {
        Uninstall {
            conf_dir: root.join("net.d"),
            conflist: "10-spright.conflist".into(),
            plugin: root.join("bin/spright-cni"),
            bpffs: root.join("bpffs-absent"),
            state_dir: root.join("state"),
            ipam_dir: root.join("ipam/spright"),
            bridge: None,
            iptables: false,
            host_root: None,
            region_root: root.join("shm"),
            kubelet_dir: root.join("kubelet"),
            pod_cidr_file: root.join("etc-spright/pod-cidr"),
        }
    }

    #[test]
    fn uninstall_removes_what_spright_wrote_and_is_idempotent() {
        let root = tempfile::tempdir().unwrap();
        let s = steps(root.path());
        for d in [
            "net.d",
            "bin",
            "state/endpoints",
            "ipam/spright",
            "shm/default/demo",
            "kubelet/plugins/shm.spright.dev",
            "kubelet/plugins_registry",
            "etc-spright",
        ] {
            std::fs::create_dir_all(root.path().join(d)).unwrap();
        }
        let conflist = s.conf_dir.join(&s.conflist);
        std::fs::write(&conflist, r#"{"plugins":[{"type":"spright-cni"}]}"#).unwrap();
        std::fs::write(&s.plugin, "binary").unwrap();
        std::fs::write(root.path().join("bin/host-local"), "other plugin").unwrap();
        std::fs::write(s.state_dir.join("endpoints/c1-eth0.json"), "{}").unwrap();
        std::fs::write(s.state_dir.join(spright_endpoint::CNI_LOCK_FILE), "").unwrap();
        std::fs::write(s.ipam_dir.join("10.244.1.2"), "c1").unwrap();
        std::fs::write(s.ipam_dir.join("lock"), "").unwrap();
        std::fs::write(s.region_root.join("state.json"), "{}").unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(
            s.kubelet_dir.join("plugins/shm.spright.dev/csi.sock"),
        )
        .unwrap();
        let reg = s
            .kubelet_dir
            .join("plugins_registry/shm.spright.dev-reg.sock");
        std::fs::write(&reg, "").unwrap();
        std::fs::write(&s.pod_cidr_file, "10.244.1.0/24\n").unwrap();
        let done = s.run().unwrap();
        assert!(!conflist.exists() && !s.plugin.exists(), "{done:?}");
        assert!(!s.state_dir.exists() && !s.ipam_dir.exists(), "{done:?}");
        assert!(!s.region_root.exists(), "{done:?}");
        assert!(
            !s.kubelet_dir.join("plugins/shm.spright.dev").exists() && !reg.exists(),
            "{done:?}"
        );
        assert!(!s.pod_cidr_file.parent().unwrap().exists(), "{done:?}");
        assert!(root.path().join("bin/host-local").exists());
        assert!(
            s.run().unwrap().is_empty(),
            "a second run has nothing to do"
        );
    }

    #[test]
    fn uninstall_leaves_a_foreign_conflist_alone() {
        let root = tempfile::tempdir().unwrap();
        let s = steps(root.path());
        std::fs::create_dir_all(root.path().join("net.d")).unwrap();
        let conflist = s.conf_dir.join(&s.conflist);
        std::fs::write(&conflist, r#"{"plugins":[{"type":"bridge"}]}"#).unwrap();
        s.run().unwrap();
        assert_eq!(
            std::fs::read_to_string(&conflist).unwrap(),
            r#"{"plugins":[{"type":"bridge"}]}"#
        );
    }
}
