//! Scoped, thread-bound network namespace entry.
//!
//! A network namespace is a per-thread property: [`NetnsGuard`] switches the
//! current thread into a namespace and switches it back on drop (aborting
//! the process if that fails, since the thread would otherwise keep running
//! in the wrong namespace). [`run_in`] runs a closure on a dedicated thread
//! inside the namespace, so the caller's thread never moves. Sockets created
//! inside (netlink) stay bound to that namespace.

use std::{fs::File, os::fd::AsFd as _, path::Path};

use nix::sched::{CloneFlags, setns};

use crate::error::{Error, Result};

/// Holds the thread's original namespace while it is in another one.
pub struct NetnsGuard {
    original: File,
}

impl NetnsGuard {
    /// Moves the current thread into the namespace at `path`.
    pub fn enter(path: &Path) -> Result<Self> {
        let original = File::open("/proc/thread-self/ns/net")
            .map_err(Error::io("open", "/proc/thread-self/ns/net"))?;
        let target = open(path)?;
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| Error::Netns {
            op: "enter",
            netns: path.display().to_string(),
            source,
        })?;
        Ok(Self { original })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(self.original.as_fd(), CloneFlags::CLONE_NEWNET) {
            tracing::error!(error = %e, "cannot restore the original network namespace; aborting");
            std::process::abort();
        }
    }
}

/// Opens a namespace file; a missing one is [`Error::NetnsMissing`].
pub fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NetnsMissing {
                path: path.to_path_buf(),
            }
        } else {
            Error::Io {
                op: "open network namespace",
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Runs `f` on a dedicated thread inside the namespace at `path`.
pub fn run_in<T: Send>(path: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let _guard = NetnsGuard::enter(path)?;
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
