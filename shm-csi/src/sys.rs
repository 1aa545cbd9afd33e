//! The plugin's only contact with the kernel's mount table: tmpfs/hugetlbfs
//! mounts, bind mounts, unmounts (all via nix, no unsafe) and a reader for
//! `/proc/self/mountinfo`.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::{error::Error, request::Medium};

/// The `source` field of every region mount, to recognise ours in mountinfo.
pub const MOUNT_SOURCE: &str = "shm.spright.dev";

const REGION_FLAGS: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

fn sys_err(op: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Sys { op, path, source }
}

fn fstype(medium: Medium) -> &'static str {
    match medium {
        Medium::Memory => "tmpfs",
        Medium::Hugepages => "hugetlbfs",
    }
}

/// Mounts a fresh size-limited region at `dir` (world-writable with the
/// sticky bit: the functions of a chain run as arbitrary users).
pub fn mount_region(dir: &Path, size: u64, medium: Medium) -> Result<(), Error> {
    let data = format!("size={size},mode=1777");
    mount(
        Some(MOUNT_SOURCE),
        dir,
        Some(fstype(medium)),
        REGION_FLAGS,
        Some(data.as_str()),
    )
    .map_err(sys_err("mount region at", dir))
}

/// Grows a tmpfs region in place (never shrinks: data may live above the new size).
pub fn grow_region(dir: &Path, size: u64) -> Result<(), Error> {
    let data = format!("size={size}");
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_REMOUNT | REGION_FLAGS,
        Some(data.as_str()),
    )
    .map_err(sys_err("resize region at", dir))
}

/// Bind-mounts `region` at `target`, read-only when asked.
pub fn bind(region: &Path, target: &Path, readonly: bool) -> Result<(), Error> {
    mount(
        Some(region),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys_err("bind-mount region at", target))?;
    if readonly {
        let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | REGION_FLAGS;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, ro, None::<&str>) {
            let _ = unmount(target);
            return Err(sys_err("remount read-only", target)(e));
        }
    }
    Ok(())
}

/// Unmounts `path`; a busy mount is detached (freed when its last user goes).
pub fn unmount(path: &Path) -> Result<(), Error> {
    match umount2(path, MntFlags::empty()) {
        Err(nix::Error::EBUSY) => {
            tracing::warn!(path = %path.display(), "mount busy, detaching lazily");
            umount2(path, MntFlags::MNT_DETACH).map_err(sys_err("detach", path))
        }
        r => r.map_err(sys_err("unmount", path)),
    }
}

/// The huge page size, when the node can back a region with huge pages;
/// the error says why not.
pub fn hugepages_available() -> Result<u64, String> {
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs
        .lines()
        .any(|l| l.split_whitespace().last() == Some("hugetlbfs"))
    {
        return Err("the kernel has no hugetlbfs".into());
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    if field("HugePages_Total:") == 0 {
        return Err("no huge pages are reserved (HugePages_Total is 0)".into());
    }
    match field("Hugepagesize:") {
        0 => Err("the huge page size is unknown (no Hugepagesize in /proc/meminfo)".into()),
        kib => Ok(kib * 1024),
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the filesystem: shared by a region and its bind mounts.
    pub dev: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// The mounts visible to this process.
pub fn mounts() -> Result<Vec<MountEntry>, Error> {
    let path = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        op: "read",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_mountinfo(&text))
}

/// Parses mountinfo (proc(5)): `id parent dev root mountpoint opts [optional...] - fstype source superopts`.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let mut r = right.split(' ');
            Some(MountEntry {
                dev: (*l.get(2)?).to_owned(),
                mount_point: PathBuf::from(unescape(l.get(4)?)),
                fstype: r.next()?.to_owned(),
                source: unescape(r.next()?),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let text = "\
36 35 98:0 / /mnt1 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
80 29 0:52 / /tmp/r/regions/default/alpha rw,nosuid,nodev,noexec,relatime - tmpfs shm.spright.dev rw,size=65536k,mode=1777
81 29 0:52 / /tmp/t/pod\\040one rw - tmpfs shm.spright.dev rw,size=65536k
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].dev, "0:52");
        assert_eq!(m[1].source, MOUNT_SOURCE);
        assert_eq!(m[1].fstype, "tmpfs");
        assert_eq!(m[2].mount_point, PathBuf::from("/tmp/t/pod one"));
    }
}
