//! The preload shim, node side (docs/RELIABILITY.md, "Preload shim").
//!
//! A chain pod opts in with `spright.dev/preload: "true"`; spright-webhook
//! then mounts this node's copy of `libspright_preload.so` into its
//! containers and sets `LD_PRELOAD`. meshd's part:
//!
//! - [`publish`]: at start, copy the shim from the node image to
//!   `<state-dir>/preload/` (the host directory the webhook's volume names),
//!   atomically, so a container starting meanwhile never maps half a file.
//! - [`unloaded`]: which processes of a pod were asked to preload the shim
//!   (their `LD_PRELOAD` names it) and did not map it, and why. `LD_PRELOAD`
//!   is honoured by the dynamic loader only: a statically linked program
//!   never runs one, musl's loader cannot load a library built against
//!   glibc, and a path missing in the container is skipped with a message
//!   on stderr that nobody reads. The program then runs as if it had not
//!   opted in, and on a kernel whose redirect path returns spurious
//!   `EAGAIN` (the self-test's `affected`) its blocking reads can fail.
//!   events.rs turns each such pod into a Warning event.

use std::{
    collections::HashMap,
    fs,
    io::{self, Read as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use spright_endpoint::{PRELOAD_DIR, PRELOAD_SHIM};

/// Copies `shim` to `<state_dir>/preload/libspright_preload.so` (a temporary
/// file renamed over the old copy). `Ok(None)` when `shim` does not exist.
pub fn publish(shim: &Path, state_dir: &Path) -> io::Result<Option<PathBuf>> {
    if !shim.exists() {
        return Ok(None);
    }
    let dir = state_dir.join(PRELOAD_DIR);
    fs::create_dir_all(&dir)?;
    let dest = dir.join(PRELOAD_SHIM);
    let tmp = dir.join(format!(".{PRELOAD_SHIM}.{}.tmp", std::process::id()));
    let copied = fs::copy(shim, &tmp).and_then(|_| {
        fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        fs::rename(&tmp, &dest)
    });
    if let Err(e) = copied {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(Some(dest))
}

/// Why a process did not load the shim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The program has no ELF interpreter: no loader reads `LD_PRELOAD`.
    Static,
    /// The library named in `LD_PRELOAD` is not in the container.
    Missing(String),
    /// musl's loader (the interpreter named), which cannot load a library
    /// built against glibc.
    Musl(String),
    /// A glibc-style loader that still did not load it (the container's log
    /// has the loader's message; an older glibc than the shim needs, say).
    Refused(String),
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Static => f.write_str(
                "the program is statically linked, so no dynamic loader runs to read LD_PRELOAD",
            ),
            Self::Missing(p) => write!(f, "{p} does not exist in the container"),
            Self::Musl(i) => write!(
                f,
                "its loader is musl's ({i}), which cannot load the shim (built against glibc)"
            ),
            Self::Refused(i) => write!(
                f,
                "its loader ({i}) did not load it; the container's log has the loader's message"
            ),
        }
    }
}

/// One process that was asked to preload the shim and did not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unloaded {
    pub pid: u32,
    /// `/proc/PID/comm`.
    pub comm: String,
    pub cause: Cause,
}

/// For each network namespace of `netns` (paths to nsfs files), the
/// processes in it whose `LD_PRELOAD` names the shim and whose memory maps
/// lack it, found in one pass over `proc_root` (the host's `/proc`).
/// Processes that end during the scan, or that never asked for the shim
/// (the pod's pause process), are not reported; a namespace that is gone is
/// left out of the answer.
pub fn unloaded(proc_root: &Path, netns: &[&Path]) -> io::Result<HashMap<PathBuf, Vec<Unloaded>>> {
    let wanted: HashMap<(u64, u64), &Path> = netns
        .iter()
        .filter_map(|p| fs::metadata(p).ok().map(|m| ((m.dev(), m.ino()), *p)))
        .collect();
    let mut out: HashMap<PathBuf, Vec<Unloaded>> = wanted
        .values()
        .map(|p| (p.to_path_buf(), Vec::new()))
        .collect();
    if wanted.is_empty() {
        return Ok(out);
    }
    for entry in fs::read_dir(proc_root)? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        // Errors below: the process ended, or is not ours to read.
        let Some(ns) = fs::metadata(dir.join("ns/net"))
            .ok()
            .and_then(|m| wanted.get(&(m.dev(), m.ino())))
        else {
            continue;
        };
        if let Some(u) = check(pid, &dir) {
            out.entry(ns.to_path_buf()).or_default().push(u);
        }
    }
    for v in out.values_mut() {
        v.sort_by_key(|u| u.pid);
    }
    Ok(out)
}

/// Process `pid` (its `/proc` directory `dir`), when it asked for the shim
/// and did not load it.
fn check(pid: u32, dir: &Path) -> Option<Unloaded> {
    let environ = fs::read(dir.join("environ")).ok()?;
    let path = asked_for(&environ)?;
    let maps = fs::read_to_string(dir.join("maps")).ok()?;
    if maps
        .lines()
        .any(|l| l.ends_with(&format!("/{PRELOAD_SHIM}")))
    {
        return None;
    }
    let cause = match interpreter(&dir.join("exe")).ok()? {
        None => Cause::Static,
        Some(interp) => {
            if !dir.join("root").join(path.trim_start_matches('/')).exists() {
                Cause::Missing(path)
            } else if interp.contains("musl") {
                Cause::Musl(interp)
            } else {
                Cause::Refused(interp)
            }
        }
    };
    let comm = fs::read_to_string(dir.join("comm")).unwrap_or_default();
    Some(Unloaded {
        pid,
        comm: comm.trim().to_owned(),
        cause,
    })
}

/// The shim's path in an `environ` block (NUL-separated `KEY=value`), when
/// `LD_PRELOAD` names it (entries separated by spaces or colons, as the
/// loader reads them).
fn asked_for(environ: &[u8]) -> Option<String> {
    environ
        .split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(b"LD_PRELOAD="))
        .flat_map(|v| v.split(|b| *b == b' ' || *b == b':'))
        .map(String::from_utf8_lossy)
        .find(|p| Path::new(p.as_ref()).file_name() == Some(PRELOAD_SHIM.as_ref()))
        .map(std::borrow::Cow::into_owned)
}

/// The ELF interpreter (`PT_INTERP`) of the program at `exe`, `None` for a
/// statically linked one. Reads the headers only (the first 64 KiB).
pub fn interpreter(exe: &Path) -> io::Result<Option<String>> {
    use object::read::elf::{FileHeader as _, ProgramHeader as _};
    let mut head = Vec::with_capacity(64 * 1024);
    fs::File::open(exe)?
        .take(64 * 1024)
        .read_to_end(&mut head)?;
    let bad = |e: object::read::Error| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    let data = head.as_slice();
    let header = object::elf::FileHeader64::<object::Endianness>::parse(data).map_err(bad)?;
    let endian = header.endian().map_err(bad)?;
    for ph in header.program_headers(endian, data).map_err(bad)? {
        if let Some(interp) = ph.interpreter(endian, data).map_err(bad)? {
            let interp = interp.strip_suffix(b"\0").unwrap_or(interp);
            return Ok(Some(String::from_utf8_lossy(interp).into_owned()));
        }
    }
    Ok(None)
}

/// The Warning event's note for a pod whose processes did not load the shim.
pub fn note(unloaded: &[Unloaded], verdict: &str) -> String {
    let each: Vec<String> = unloaded
        .iter()
        .map(|u| format!("{} (pid {}): {}", u.comm, u.pid, u.cause))
        .collect();
    format!(
        "{} is \"true\" but {} did not load {PRELOAD_SHIM}: {}. This node's self-test of blocking \
         reads on the redirect path says {verdict:?}, so such reads may fail with EAGAIN. Run a \
         dynamically linked glibc build of the program, or set spright.dev/redirect: off",
        spright_endpoint::ANNOTATION_PRELOAD,
        if unloaded.len() == 1 {
            "1 process"
        } else {
            "these processes"
        },
        each.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ld_preload_is_read_as_the_loader_splits_it() {
        let env = b"PATH=/bin\0LD_PRELOAD=/a/liba.so /opt/spright/preload/libspright_preload.so:/b.so\0X=1\0";
        assert_eq!(
            asked_for(env).as_deref(),
            Some("/opt/spright/preload/libspright_preload.so")
        );
        assert_eq!(asked_for(b"LD_PRELOAD=/a/liba.so\0"), None);
        assert_eq!(
            asked_for(b"NOT_LD_PRELOAD=/x/libspright_preload.so\0"),
            None
        );
        assert_eq!(asked_for(b""), None);
    }

    #[test]
    fn interpreters_of_real_programs() {
        // This machine's busybox is static and its sleep is glibc's.
        if let Ok(Some(i)) = interpreter(Path::new("/bin/sleep")) {
            assert!(i.contains("ld-linux"), "{i}");
        }
        if Path::new("/bin/busybox").exists() {
            let i = interpreter(Path::new("/bin/busybox")).unwrap();
            assert!(
                i.is_none() || i.as_deref().is_some_and(|i| i.contains("ld")),
                "{i:?}"
            );
        }
        assert!(interpreter(Path::new("/etc/hostname")).is_err());
    }

    #[test]
    fn publish_copies_atomically_and_skips_a_missing_shim() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src.so");
        assert_eq!(publish(&src, d.path()).unwrap(), None);
        fs::write(&src, b"\x7fELF one").unwrap();
        let dest = publish(&src, d.path()).unwrap().unwrap();
        assert_eq!(dest, d.path().join("preload").join(PRELOAD_SHIM));
        fs::write(&src, b"\x7fELF two").unwrap();
        publish(&src, d.path()).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"\x7fELF two");
        let left: Vec<_> = fs::read_dir(d.path().join("preload"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(PRELOAD_SHIM)]);
    }

    #[test]
    fn the_note_names_each_process_and_the_way_out() {
        let n = note(
            &[Unloaded {
                pid: 7,
                comm: "sleep".into(),
                cause: Cause::Static,
            }],
            "affected",
        );
        assert!(
            n.contains("sleep (pid 7): the program is statically linked"),
            "{n}"
        );
        assert!(
            n.contains("spright.dev/preload") && n.contains("\"affected\""),
            "{n}"
        );
    }
}
