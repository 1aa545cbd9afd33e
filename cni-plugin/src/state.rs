//! The plugin's on-disk state: the state directory, the lock that serialises
//! invocations where they share state (bridge set-up, GC), and the endpoint
//! records (format owned by `spright-endpoint`, read by meshd).

use std::{fs::File, time::Duration};

use nix::fcntl::{Flock, FlockArg};

use crate::{
    config::Config,
    error::{Error, Result},
};

/// How long an invocation waits for the lock before answering "try again later".
const LOCK_WAIT: Duration = Duration::from_secs(30);
const LOCK_POLL: Duration = Duration::from_millis(5);

/// Makes sure the state directory exists and is writable (by creating the
/// lock file in it), before any side effect of an ADD.
pub fn prepare(config: &Config) -> Result<File> {
    let dir = config.state_dir();
    std::fs::create_dir_all(dir).map_err(Error::io("create state directory", dir))?;
    let path = config.lock_path();
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(Error::io("open lock file", &path))
}

/// An exclusive lock on the state directory, held until dropped.
pub fn lock(config: &Config) -> Result<Flock<File>> {
    let path = config.lock_path();
    let mut file = prepare(config)?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::Error::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                file = f;
                std::thread::sleep(LOCK_POLL);
            }
            Err((_, nix::Error::EWOULDBLOCK)) => return Err(Error::Busy { path }),
            Err((_, e)) => return Err(Error::io("lock", &path)(e.into())),
        }
    }
}
