//! What the loader checks and prepares on the host before it touches the
//! kernel: the bpf filesystem (mounted when missing, checked under the pin
//! directory), the cgroup v2 hierarchy (found in /proc/self/mountinfo on
//! hybrid and pure v2 hosts) and the kubelet's pod cgroup below it, which is
//! the default attach point and never the cgroup v2 root.

use std::path::{Path, PathBuf};

use crate::Error;

/// Where kubelet puts its pods below the cgroup v2 root, in the order
/// looked for: the systemd cgroup driver, cgroupfs, and kind's nested slice
/// (kubelet inside a node container started by systemd).
pub const POD_CGROUPS: &[&str] = &[
    "kubepods.slice",
    "kubepods",
    "kubelet.slice/kubelet-kubepods.slice",
];

/// The cgroup v2 directory to attach to when none is configured: the
/// kubelet's pod cgroup below the cgroup v2 mount, so the node's own sockets
/// are never seen. Never the root: when no pod cgroup exists the error names
/// every path looked for.
pub fn default_cgroup() -> Result<PathBuf, Error> {
    pod_cgroup(&cgroup2_mount().ok_or(Error::NoCgroup2)?)
}

/// The first of [`POD_CGROUPS`] that is a directory below `root`.
pub fn pod_cgroup(root: &Path) -> Result<PathBuf, Error> {
    let looked: Vec<PathBuf> = POD_CGROUPS.iter().map(|c| root.join(c)).collect();
    match looked.iter().find(|p| p.is_dir()) {
        Some(found) => Ok(found.clone()),
        None => Err(Error::NoPodCgroup {
            root: root.to_path_buf(),
            looked,
        }),
    }
}

/// Mounts bpffs at `path` unless one is already there.
pub fn ensure_bpffs_mounted(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(Error::io("create", path))?;
    if is_bpffs(path)? {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| Error::io("mount bpffs at", path)(e.into()))
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` on pure v2
/// hosts, `/sys/fs/cgroup/unified` on hybrid ones), from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_mount(&info)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <src> <super opts>"
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

pub(crate) fn is_bpffs(path: &Path) -> Result<bool, Error> {
    Ok(fs_type(path)? == nix::sys::statfs::BPF_FS_MAGIC)
}

/// The filesystem type of `path`. Compared as nix's `FsType` constants:
/// `f_type` is signed on glibc and unsigned on musl, so no integer of one
/// width fits both.
fn fs_type(path: &Path) -> Result<nix::sys::statfs::FsType, Error> {
    nix::sys::statfs::statfs(path)
        .map(|st| st.filesystem_type())
        .map_err(|e| Error::io("statfs", path)(e.into()))
}

pub(crate) fn check_cgroup2(path: &Path) -> Result<(), Error> {
    if fs_type(path)? == nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        Ok(())
    } else {
        Err(Error::NotCgroup2 {
            path: path.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_and_pure_hosts() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw\n\
                      31 25 0:27 / /sys/fs/cgroup/cpu rw shared:10 - cgroup cgroup rw,cpu\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            parse_cgroup2_mount(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            parse_cgroup2_mount("22 1 0:5 / /proc rw - proc proc rw\n"),
            None
        );
    }

    #[test]
    fn pod_cgroup_is_kubelets_and_never_the_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // Nothing of kubelet's: an error naming every path looked for.
        let err = pod_cgroup(r).unwrap_err();
        let text = err.to_string();
        for c in POD_CGROUPS {
            assert!(text.contains(&r.join(c).display().to_string()), "{text}");
        }
        assert!(matches!(err, Error::NoPodCgroup { .. }));
        // kind: kubelet's pods in a nested slice.
        std::fs::create_dir_all(r.join("kubelet.slice/kubelet-kubepods.slice")).unwrap();
        assert_eq!(
            pod_cgroup(r).unwrap(),
            r.join("kubelet.slice/kubelet-kubepods.slice")
        );
        // cgroupfs driver.
        std::fs::create_dir(r.join("kubepods")).unwrap();
        assert_eq!(pod_cgroup(r).unwrap(), r.join("kubepods"));
        // systemd driver.
        std::fs::create_dir(r.join("kubepods.slice")).unwrap();
        assert_eq!(pod_cgroup(r).unwrap(), r.join("kubepods.slice"));
        // A file of that name is no cgroup.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("kubepods"), "").unwrap();
        assert!(pod_cgroup(other.path()).is_err());
    }
}

/// The oldest kernel the datapath is tested on and declared to work on:
/// Debian 12's 6.1 (`cargo xtask test kernels`, docs/KERNELS.md).
pub const MIN_KERNEL: (u32, u32) = (6, 1);

/// What an older kernel lacks, for the error.
const BEFORE_MIN_KERNEL: &str = "cgroup LSM programs for the splice guard (6.0), and a verifier the \
     programs are checked against (the matrix starts at 6.1)";

/// `major.minor` of a kernel release such as `6.1.0-57-amd64`.
#[must_use]
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Refuses a running kernel older than [`MIN_KERNEL`]; a release it cannot
/// read is let through (the self-test still probes what works).
pub fn check_kernel() -> Result<(), Error> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match kernel_version(&release) {
        Some(v) if v < MIN_KERNEL => Err(Error::KernelTooOld {
            release: release.trim().to_owned(),
            minimum: format!("{}.{}", MIN_KERNEL.0, MIN_KERNEL.1),
            missing: BEFORE_MIN_KERNEL,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod kernel_tests {
    use super::*;

    #[test]
    fn releases_read_as_major_minor() {
        assert_eq!(kernel_version("6.1.0-57-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("6.18.44-fc-v1300\n"), Some((6, 18)));
        assert_eq!(kernel_version("7.2.13+deb14-amd64"), Some((7, 2)));
        assert_eq!(kernel_version("5.15.0"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("5.15.0").is_some_and(|v| v < MIN_KERNEL));
        assert!(kernel_version("6.12.118+deb13-amd64").is_some_and(|v| v >= MIN_KERNEL));
    }
}
