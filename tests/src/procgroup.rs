//! Children started in their own process group and killed as a group, so
//! whatever they fork (a shell's child, a server's workers) goes with them:
//! an orphan keeps running after its namespace is gone and skews every
//! later measurement.
//!
//! A child in its own group no longer gets the terminal's Ctrl-C; the
//! programs that start them (the benchmarks) turn SIGINT/SIGTERM into a flag
//! ([`trap_interrupts`]), notice it in every wait ([`check_interrupted`],
//! [`crate::sandbox::Peer::line`]), unwind, and kill the groups on drop.

use std::{
    process::{Child, Command},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

/// Set by SIGINT/SIGTERM once [`trap_interrupts`] ran.
pub fn interrupted() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Turns SIGINT and SIGTERM into the [`interrupted`] flag instead of
/// ending the process, so it unwinds and its drops remove what it made.
pub fn trap_interrupts() -> anyhow::Result<()> {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, interrupted().clone())?;
    }
    Ok(())
}

/// An error once the process was interrupted.
pub fn check_interrupted() -> anyhow::Result<()> {
    anyhow::ensure!(!interrupted().load(Ordering::Relaxed), "interrupted");
    Ok(())
}

/// Makes `cmd` start as the leader of a new process group (pgid = its pid).
pub fn own_group(cmd: &mut Command) -> &mut Command {
    std::os::unix::process::CommandExt::process_group(cmd, 0)
}

/// SIGKILLs the process group `child` leads, then reaps `child`. Call it
/// only on a child started with [`own_group`] that has not been reaped yet
/// (while it is unreaped its pid, and so the group id, cannot be reused).
pub fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A child in its own process group, killed as a group on drop.
pub struct GroupChild(Option<Child>);

impl GroupChild {
    /// Spawns `cmd` in a new process group.
    pub fn spawn(cmd: &mut Command) -> std::io::Result<Self> {
        own_group(cmd).spawn().map(|c| Self(Some(c)))
    }

    pub fn child(&mut self) -> &mut Child {
        self.0
            .as_mut()
            .expect("a GroupChild holds its child until dropped or taken")
    }

    /// Hands the child over (e.g. to `wait_with_output`); the caller now
    /// owns its end. Kill the rest of the group first with
    /// [`Self::kill_rest`] if the leader may have left children behind.
    pub fn take(mut self) -> Child {
        self.0
            .take()
            .expect("a GroupChild holds its child until dropped or taken")
    }

    /// SIGKILLs every other member of the group after the leader has
    /// exited (but before it is reaped).
    pub fn kill_rest(&mut self) {
        if let Some(c) = &self.0
            && let Ok(pid) = i32::try_from(c.id())
        {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            kill_group(&mut c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_group_dies_with_the_leader() {
        // A shell that leaves a grandchild behind and prints its pid.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 300 & echo $!; wait"])
            .stdout(std::process::Stdio::piped());
        let mut g = GroupChild::spawn(&mut cmd).unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(g.child().stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        let leader = i32::try_from(g.child().id()).unwrap();
        assert_eq!(
            nix::unistd::getpgid(Some(Pid::from_raw(grandchild))).unwrap(),
            Pid::from_raw(leader)
        );
        drop(g);
        // SIGKILL is pending once killpg returns; the grandchild (now
        // reparented) goes away, or stays a zombie until init reaps it.
        let state = || {
            std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, r)| r.trim().chars().next())
                })
        };
        for _ in 0..500 {
            if matches!(state(), None | Some('Z' | 'X')) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("grandchild {grandchild} still alive: state {:?}", state());
    }
}
