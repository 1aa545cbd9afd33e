//! Chain regions on this node: one size-limited tmpfs (or hugetlbfs) per
//! (pod namespace, chain), mounted once at `<root>/regions/<namespace>/<chain>`
//! and bind-mounted at every publishing pod's target path.
//!
//! Reference counts are never kept in memory: a region's users are the mounts
//! in `/proc/self/mountinfo` that share its device number, so a restarted
//! plugin (or one whose state file was lost) cannot free memory a pod still
//! has mounted. The state file `<root>/state.json` only remembers each
//! volume's arguments, so that a repeated publish can be told apart from a
//! conflicting one after a restart.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use crate::{
    error::Error,
    request::{Medium, Publish},
    sys::{self, MOUNT_SOURCE, MountEntry},
};

const STATE_FILE: &str = "state.json";
const REGIONS_DIR: &str = "regions";

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct State {
    volumes: BTreeMap<String, Publish>,
}

/// What a restart found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rediscovered {
    pub volumes: usize,
    pub dropped: usize,
    pub regions: usize,
    pub freed: usize,
}

/// A region as the mount table shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    pub dir: PathBuf,
    pub fstype: String,
    /// Mounts of the region other than its own (the publishing pods).
    pub users: usize,
}

pub struct Regions {
    root: PathBuf,
    state: Mutex<State>,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
}

fn last_mount_at<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path)
}

impl Regions {
    /// Opens (creating) the region root and reconciles the state file with the
    /// mount table: volumes whose target is no longer mounted are forgotten,
    /// regions nobody mounts any more are freed.
    pub fn open(root: &Path) -> Result<(Self, Rediscovered), Error> {
        let regions = root.join(REGIONS_DIR);
        std::fs::create_dir_all(&regions).map_err(io_err("create", &regions))?;
        let root = std::fs::canonicalize(root).map_err(io_err("resolve", root))?;
        let path = root.join(STATE_FILE);
        let mut state = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<State>(&bytes).map_err(|source| Error::State {
                    path: path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let this = Self {
            root,
            state: Mutex::new(State::default()),
        };
        let mounts = sys::mounts()?;
        let before = state.volumes.len();
        state.volumes.retain(|id, p| {
            let keep = last_mount_at(&mounts, &p.target_path).is_some_and(|m| m.source == MOUNT_SOURCE);
            if !keep {
                tracing::info!(volume.id = %id, target = %p.target_path.display(), "forgetting volume whose target is not mounted");
            }
            keep
        });
        let mut found = Rediscovered {
            volumes: state.volumes.len(),
            dropped: before - state.volumes.len(),
            ..Rediscovered::default()
        };
        found.freed = this.free_unused()?;
        found.regions = this.regions()?.len();
        this.save(&state)?;
        *this.state.lock().unwrap_or_else(PoisonError::into_inner) = state;
        Ok((this, found))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/regions/<namespace>/<chain>`; both names are validated DNS-1123 labels.
    pub fn region_dir(&self, namespace: &str, chain: &str) -> PathBuf {
        self.root.join(REGIONS_DIR).join(namespace).join(chain)
    }

    /// The regions mounted now, with their users.
    pub fn regions(&self) -> Result<Vec<RegionInfo>, Error> {
        let mounts = sys::mounts()?;
        Ok(regions_in(&self.root.join(REGIONS_DIR), &mounts))
    }

    /// Unmounts and removes every region nobody else mounts; returns how many.
    fn free_unused(&self) -> Result<usize, Error> {
        let mut freed = 0;
        for r in self.regions()? {
            if r.users == 0 {
                sys::unmount(&r.dir)?;
                let _ = std::fs::remove_dir(&r.dir);
                if let Some(ns) = r.dir.parent() {
                    let _ = std::fs::remove_dir(ns);
                }
                tracing::info!(region = %r.dir.display(), "freed region (no users left)");
                freed += 1;
            }
        }
        Ok(freed)
    }

    fn save(&self, state: &State) -> Result<(), Error> {
        let path = self.root.join(STATE_FILE);
        let tmp = self.root.join(".state.json.tmp");
        let bytes = serde_json::to_vec_pretty(state).expect("state serialises");
        std::fs::write(&tmp, bytes).map_err(io_err("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("replace", &path))
    }

    /// Mounts the chain's region at `p.target_path`, creating the region when
    /// this is its first user. Idempotent for identical arguments.
    pub fn publish(&self, p: &Publish) -> Result<(), Error> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mounts = sys::mounts()?;
        let dir = self.region_dir(&p.namespace, &p.chain);
        if let Some(existing) = state.volumes.get(&p.volume_id) {
            if let Some(what) = existing.difference(p) {
                return Err(Error::Conflict {
                    volume_id: p.volume_id.clone(),
                    what: what.to_owned(),
                });
            }
        } else if let Some((other, _)) = state
            .volumes
            .iter()
            .find(|(_, o)| o.target_path == p.target_path)
        {
            return Err(Error::Conflict {
                volume_id: p.volume_id.clone(),
                what: format!("target_path is used by volume {other}"),
            });
        }
        let region = last_mount_at(&mounts, &dir).filter(|m| m.source == MOUNT_SOURCE);
        if let Some(t) = last_mount_at(&mounts, &p.target_path) {
            if region.is_some_and(|r| r.dev == t.dev) {
                tracing::debug!(volume.id = %p.volume_id, "already published");
                state.volumes.insert(p.volume_id.clone(), p.clone());
                return self.save(&state);
            }
            if t.source != MOUNT_SOURCE || region.is_some() {
                return Err(Error::NotOurs(p.target_path.clone()));
            }
        }
        let created = if let Some(r) = region {
            let want = sys_fstype(p.medium);
            if r.fstype != want {
                return Err(Error::MediumMismatch {
                    namespace: p.namespace.clone(),
                    chain: p.chain.clone(),
                    existing: r.fstype.clone(),
                    requested: want.to_owned(),
                });
            }
            if region_size(&dir)? < p.size {
                sys::grow_region(&dir, p.size)?;
                tracing::info!(region = %dir.display(), size = p.size, "grew region");
            }
            false
        } else {
            std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
            sys::mount_region(&dir, p.size, p.medium)?;
            tracing::info!(region = %dir.display(), size = p.size, medium = p.medium.as_str(), "created region");
            true
        };
        let bound = std::fs::create_dir_all(&p.target_path)
            .map_err(io_err("create", &p.target_path))
            .and_then(|()| sys::bind(&dir, &p.target_path, p.readonly));
        if let Err(e) = bound {
            if created {
                let _ = self.free_unused();
            }
            return Err(e);
        }
        state.volumes.insert(p.volume_id.clone(), p.clone());
        self.save(&state)
    }

    /// Unmounts `target` (when it is one of ours), removes it, and frees the
    /// region when that was its last user. Unknown or unmounted paths succeed.
    pub fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), Error> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // Stacked mounts (a retried publish that raced a crash) are peeled, boundedly.
        for _ in 0..8 {
            let mounts = sys::mounts()?;
            match last_mount_at(&mounts, target) {
                None => break,
                Some(m) if m.source == MOUNT_SOURCE => sys::unmount(target)?,
                Some(_) => return Err(Error::NotOurs(target.to_path_buf())),
            }
        }
        match std::fs::remove_dir(target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", target)(e)),
        }
        state.volumes.remove(volume_id);
        state.volumes.retain(|_, p| p.target_path != target);
        self.free_unused()?;
        self.save(&state)
    }
}

/// The regions under `base` (`<base>/<namespace>/<chain>`) in a mount table,
/// each with the number of other mounts of the same filesystem.
fn regions_in(base: &Path, mounts: &[MountEntry]) -> Vec<RegionInfo> {
    let mut out: Vec<RegionInfo> = Vec::new();
    for m in mounts {
        let under = m.mount_point.strip_prefix(base).ok();
        if m.source != MOUNT_SOURCE || under.is_none_or(|u| u.components().count() != 2) {
            continue;
        }
        // The top-most mount at the directory is the region.
        if last_mount_at(mounts, &m.mount_point) != Some(m) {
            continue;
        }
        let users = mounts
            .iter()
            .filter(|o| o.dev == m.dev && o.mount_point != m.mount_point)
            .count();
        out.push(RegionInfo {
            dir: m.mount_point.clone(),
            fstype: m.fstype.clone(),
            users,
        });
    }
    out
}

fn sys_fstype(m: Medium) -> &'static str {
    match m {
        Medium::Memory => "tmpfs",
        Medium::Hugepages => "hugetlbfs",
    }
}

fn region_size(dir: &Path) -> Result<u64, Error> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(|source| Error::Sys {
        op: "statvfs",
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(s.blocks() * s.fragment_size())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_mounts_of_the_same_filesystem() {
        let text = "\
80 29 0:52 / /r/regions/default/alpha rw - tmpfs shm.spright.dev rw
81 29 0:52 / /pods/a/mount rw - tmpfs shm.spright.dev rw
82 29 0:52 / /pods/b/mount ro - tmpfs shm.spright.dev rw
83 29 0:53 / /r/regions/other/alpha rw - tmpfs shm.spright.dev rw
84 29 0:54 / /r/regions/default/x rw - tmpfs tmpfs rw
85 29 0:55 / /r/regions/default rw - tmpfs shm.spright.dev rw
86 29 0:56 / /r/elsewhere/default/y rw - tmpfs shm.spright.dev rw
";
        let mounts = sys::parse_mountinfo(text);
        let r = regions_in(Path::new("/r/regions"), &mounts);
        let got: Vec<(&str, usize)> = r
            .iter()
            .map(|r| (r.dir.to_str().unwrap(), r.users))
            .collect();
        // Not ours: a foreign tmpfs, a mount at the wrong depth, outside the base.
        assert_eq!(
            got,
            [
                ("/r/regions/default/alpha", 2),
                ("/r/regions/other/alpha", 0)
            ]
        );
    }
}
