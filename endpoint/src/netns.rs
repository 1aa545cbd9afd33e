//! The one way into a network namespace, for every spright binary and test.
//!
//! A network namespace is a property of a thread. [`Guard`] moves the
//! current thread into one and back on drop (aborting the process if the way
//! back fails: the thread would otherwise go on in the wrong namespace).
//! [`run_in`] runs a closure on a thread of its own inside the namespace, so
//! the caller's thread never moves; sockets created inside stay in that
//! namespace. [`join`] moves the whole (still single-threaded) process for
//! good, as a pod process does before it creates any socket or thread.

use std::{
    fs::File,
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// Why a namespace could not be entered.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The namespace file does not exist (the pod is gone).
    #[error("network namespace {0} does not exist")]
    Missing(PathBuf),
    #[error("failed to open network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to enter network namespace {path}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        let kind = match &e {
            Error::Missing(_) => io::ErrorKind::NotFound,
            Error::Open { source, .. } => source.kind(),
            Error::Enter { source, .. } => io::Error::from(*source).kind(),
        };
        Self::new(kind, e)
    }
}

/// Opens a namespace file; a missing one is [`Error::Missing`].
pub fn open(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            Error::Missing(path.to_path_buf())
        } else {
            Error::Open {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn enter(target: &File, path: &Path) -> Result<(), Error> {
    setns(target.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| Error::Enter {
        path: path.to_path_buf(),
        source,
    })
}

/// Holds the thread's original namespace while it is in another one.
#[derive(Debug)]
pub struct Guard {
    original: File,
}

impl Guard {
    /// Moves the current thread into the namespace at `path`.
    pub fn enter(path: &Path) -> Result<Self, Error> {
        let here = Path::new("/proc/thread-self/ns/net");
        let original = open(here)?;
        enter(&open(path)?, path)?;
        Ok(Self { original })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = setns(self.original.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!("cannot restore the original network namespace ({e}); aborting");
            std::process::abort();
        }
    }
}

/// Runs `f` on a thread of its own inside the namespace at `path` (a bind
/// mount or `/proc/<pid>/ns/net`); the caller's thread never changes
/// namespace. `f`'s error type takes the entry error too.
pub fn run_in<T: Send, E: From<Error> + Send>(
    path: &Path,
    f: impl FnOnce() -> Result<T, E> + Send,
) -> Result<T, E> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let _guard = Guard::enter(path)?;
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Moves the calling thread into the namespace at `path` for good. Meant
/// for a process that has no other thread and no socket yet (a pod
/// process): threads created afterwards start in the namespace.
pub fn join(path: &Path) -> Result<(), Error> {
    enter(&open(path)?, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_namespace_is_named() {
        let e = run_in(Path::new("/nonexistent/netns"), || Ok::<_, Error>(())).unwrap_err();
        assert!(matches!(e, Error::Missing(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "network namespace /nonexistent/netns does not exist"
        );
        let io: io::Error = Error::Missing("/x".into()).into();
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn the_own_namespace_can_be_entered_and_left() {
        // Entering the namespace one is in needs CAP_SYS_ADMIN; without it
        // the error names the path.
        let own = Path::new("/proc/self/ns/net");
        match run_in(own, || Ok::<_, Error>(7)) {
            Ok(v) => assert_eq!(v, 7),
            Err(Error::Enter { path, .. }) => assert_eq!(path, own),
            Err(e) => panic!("{e:?}"),
        }
    }
}
