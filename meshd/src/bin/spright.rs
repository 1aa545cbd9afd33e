//! `spright`: the command-line view of a node.
//!
//! `spright status` asks meshd (`/status`); when meshd is not reachable it
//! builds the same view from the endpoint records and the pinned maps.
//!
//! `spright install-cni` puts spright-cni into the runtime's CNI config
//! (chained into the conflist the runtime uses by default) and keeps it
//! there; see `meshd::install_cni`.
//!
//! `spright uninstall` leaves a node clean: spright's entries and own
//! conflist and the plugin binary are removed from the CNI directories, the eBPF programs are detached and
//! their pins removed, and the endpoint records, the plugin's lock and the
//! host-local allocations of the spright network are deleted. The cleanup
//! DaemonSet in manifests/cleanup.yaml runs it on every node.

#![forbid(unsafe_code)]

use std::{
    io,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};
use meshd::{config, error::chain as error_chain, install_cni, status::Status};

#[derive(Parser)]
#[command(name = "spright", version, about = "spright node tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Chains, endpoints, acceleration counters, Services and translated connections of this node
    Status {
        /// meshd's local API address
        #[arg(long, env = config::env::API_ADDR, default_value = config::DEFAULT_API_ADDR)]
        addr: String,
        /// Pin directory, read directly when meshd is down
        #[arg(long, env = config::env::BPFFS, default_value = spright_ebpf::DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
        /// State directory, read directly when meshd is down
        #[arg(long, env = config::env::STATE_DIR, default_value = spright_endpoint::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Service files directory, read directly when meshd is down [default: `<state-dir>/services`]
        #[arg(long, env = config::env::SERVICES_DIR)]
        services_dir: Option<PathBuf>,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Install spright-cni into the runtime's CNI config and keep it there:
    /// chained as the last plugin of the conflist the runtime uses (default)
    /// or as spright's own network (--mode primary). Without --once it keeps
    /// watching the conf dir and re-inserts spright when the primary CNI
    /// rewrites its file.
    InstallCni(install_cni::Args),
    /// Remove spright from this node: conflist, plugin binary, eBPF programs
    /// and pins, endpoint records and IP allocations. Idempotent. Run it after
    /// the spright DaemonSet is gone (otherwise install-cni and meshd put
    /// everything back).
    Uninstall {
        /// The runtime's CNI binary directory
        #[arg(long, default_value = install_cni::DEFAULT_BIN_DIR)]
        cni_bin_dir: PathBuf,
        /// The runtime's CNI config directory
        #[arg(long, default_value = install_cni::DEFAULT_CONF_DIR)]
        cni_conf_dir: PathBuf,
        /// The file name of spright's own conflist (primary mode; removed only when its first plugin is spright-cni). spright's chained entries are removed from every config file.
        #[arg(long, default_value = install_cni::DEFAULT_CONFLIST)]
        conflist: String,
        /// Pin directory of the datapath
        #[arg(long, env = config::env::BPFFS, default_value = spright_ebpf::DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
        /// State directory with the endpoint records
        #[arg(long, env = config::env::STATE_DIR, default_value = spright_endpoint::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// host-local's data directory of the spright network (its IP allocations)
        #[arg(long, default_value = "/var/lib/cni/networks/spright")]
        ipam_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::InstallCni(args) => {
            let filter = match tracing_subscriber::EnvFilter::try_new(&args.log) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!(
                        "spright: invalid --log / {} value {:?}: {e}",
                        config::env::LOG,
                        args.log
                    );
                    return ExitCode::from(2);
                }
            };
            // Plain text in a container's log; colours on a terminal.
            tracing_subscriber::fmt()
                .with_writer(io::stderr)
                .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
                .with_env_filter(filter)
                .init();
            match install_cni::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = &e as &dyn std::error::Error, "install-cni failed");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status {
            addr,
            bpffs,
            state_dir,
            services_dir,
            json,
        } => {
            let status = match fetch(&addr) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!(
                        "spright: meshd at {addr} not reachable ({e}); reading the pinned maps directly"
                    );
                    let services_dir =
                        config::services_dir_or_default(services_dir.as_deref(), &state_dir);
                    Status::from_node(&state_dir, &bpffs, &services_dir)
                }
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("status serialises")
                );
            } else {
                print!("{}", status.render());
            }
            ExitCode::SUCCESS
        }
        Command::Uninstall {
            cni_bin_dir,
            cni_conf_dir,
            conflist,
            bpffs,
            state_dir,
            ipam_dir,
        } => {
            let steps = Uninstall {
                conf_dir: cni_conf_dir,
                conflist,
                plugin: cni_bin_dir.join("spright-cni"),
                bpffs,
                state_dir,
                ipam_dir,
            };
            match steps.run() {
                Ok(done) => {
                    for d in done {
                        println!("spright: {d}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("spright: uninstall: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// What `spright uninstall` removes.
struct Uninstall {
    conf_dir: PathBuf,
    conflist: String,
    plugin: PathBuf,
    bpffs: PathBuf,
    state_dir: PathBuf,
    ipam_dir: PathBuf,
}

impl Uninstall {
    /// Removes everything; returns what it did. Stops at the first error (a
    /// rerun continues where it stopped).
    fn run(&self) -> Result<Vec<String>, String> {
        let mut done = Vec::new();
        // First the config, so the runtime stops calling the plugin.
        done.extend(
            install_cni::remove_from_conf_dir(&self.conf_dir, &self.conflist)
                .map_err(|e| error_chain(&e))?,
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
        Ok(done)
    }
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

/// Removes the plain files of `dir`, then `dir` when it is empty.
fn remove_dir_files(dir: &Path, done: &mut Vec<String>) -> Result<(), String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("listing {}: {e}", dir.display())),
    };
    let mut n = 0;
    for entry in entries {
        let entry = entry.map_err(|e| format!("listing {}: {e}", dir.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_file()) {
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

fn fetch(addr: &str) -> Result<Status, ureq::Error> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .into();
    agent
        .get(&format!("http://{addr}/status"))
        .call()?
        .body_mut()
        .read_json()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(root: &Path) -> Uninstall {
        Uninstall {
            conf_dir: root.join("net.d"),
            conflist: "10-spright.conflist".into(),
            plugin: root.join("bin/spright-cni"),
            bpffs: root.join("no-bpffs"),
            state_dir: root.join("state"),
            ipam_dir: root.join("ipam/spright"),
        }
    }

    #[test]
    fn uninstall_removes_what_spright_wrote_and_is_idempotent() {
        let root = tempfile::tempdir().unwrap();
        let s = steps(root.path());
        for d in ["net.d", "bin", "state/endpoints", "ipam/spright"] {
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
        let done = s.run().unwrap();
        assert!(!conflist.exists() && !s.plugin.exists(), "{done:?}");
        assert!(!s.state_dir.exists() && !s.ipam_dir.exists(), "{done:?}");
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
