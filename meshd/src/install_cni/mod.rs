//! `spright install-cni`: puts spright-cni where the container runtime looks
//! and keeps it there.
//!
//! - The plugin binary is copied into the CNI bin dir (temporary file, then
//!   rename; only when it differs), before any config names it.
//! - **chained** (default): the runtime uses the first file by name among
//!   `*.conflist`, `*.conf`, `*.json` in its conf dir. spright's entry goes
//!   last into that file's plugin list, written atomically under the same
//!   name; every other value keeps its original text ([`conflist`]). A
//!   single-plugin `.conf`/`.json` becomes a `.conflist` of the same stem
//!   (the runtime reads a list only from `.conflist`), as Istio's CNI agent
//!   does. No config yet (the primary CNI is not installed): wait, and say so.
//! - **primary**: spright's own conflist (`--conflist`, cniVersion 1.1.0)
//!   with the node's pod CIDR from `--pod-cidr` or `--pod-cidr-file`.
//! - Without `--once` it keeps watching the conf dir (inotify, plus a rescan
//!   every `--rescan-secs`) and re-inserts when the primary CNI rewrites its
//!   file or a new file sorts first.
//! - `--uninstall` removes spright's chained entries from every config file,
//!   spright's own conflist, and the binary; nothing else.
//!
//! One line per action on stderr (tracing).

pub mod conflist;

use std::{
    cell::Cell,
    io,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use ipnet::IpNet;
use tracing::{debug, info, warn};

use crate::config;
pub use conflist::Entry;
use conflist::Plan;

/// kubeadm's (and containerd's default) CNI config directory.
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
/// kubeadm's (and containerd's default) CNI plugin directory.
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";
/// The file name of spright's own conflist (primary mode).
pub const DEFAULT_CONFLIST: &str = "10-spright.conflist";
/// Where primary mode reads the node's pod CIDR when `--pod-cidr` is unset.
pub const DEFAULT_POD_CIDR_FILE: &str = "/etc/spright/pod-cidr";

/// Environment twins of the flags (the plugin settings share meshd's).
pub mod env {
    pub const CONF_DIR: &str = "SPRIGHT_CNI_CONF_DIR";
    pub const BIN_DIR: &str = "SPRIGHT_CNI_BIN_DIR";
    pub const MODE: &str = "SPRIGHT_CNI_MODE";
    pub const ONCE: &str = "SPRIGHT_CNI_ONCE";
    pub const UNINSTALL: &str = "SPRIGHT_CNI_UNINSTALL";
    pub const PLUGIN: &str = "SPRIGHT_CNI_PLUGIN";
    pub const CONFLIST: &str = "SPRIGHT_CNI_CONFLIST";
    pub const POD_CIDR: &str = "SPRIGHT_POD_CIDR";
    pub const POD_CIDR_FILE: &str = "SPRIGHT_POD_CIDR_FILE";
    pub const CLUSTER_CIDR: &str = "SPRIGHT_CLUSTER_CIDR";
    pub const RESCAN_SECS: &str = "SPRIGHT_CNI_RESCAN_SECS";
}

/// How spright joins the node's CNI configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Last plugin of the conflist the runtime uses (the primary CNI keeps
    /// addressing and routing)
    Chained,
    /// spright's own conflist: bridge, host-local IPAM on the node's pod CIDR
    Primary,
}

/// `spright install-cni`'s flags. k3s: `--conf-dir
/// /var/lib/rancher/k3s/agent/etc/cni/net.d --bin-dir
/// /var/lib/rancher/k3s/data/current/bin`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// The runtime's CNI config directory (k3s: /var/lib/rancher/k3s/agent/etc/cni/net.d)
    #[arg(long, env = env::CONF_DIR, value_name = "DIR", default_value = DEFAULT_CONF_DIR)]
    pub conf_dir: PathBuf,
    /// The runtime's CNI plugin directory (k3s: /var/lib/rancher/k3s/data/current/bin)
    #[arg(long, env = env::BIN_DIR, value_name = "DIR", default_value = DEFAULT_BIN_DIR)]
    pub bin_dir: PathBuf,
    /// `chained`: last plugin of the conflist the runtime uses; `primary`: spright's own conflist
    #[arg(long, env = env::MODE, value_enum, default_value = "chained")]
    pub mode: Mode,
    /// Install (waiting for the primary CNI's config if needed) and exit, as an init container
    #[arg(long, env = env::ONCE, conflicts_with = "uninstall")]
    pub once: bool,
    /// Remove spright's entries, spright's own conflist and the plugin binary, and exit
    #[arg(long, env = env::UNINSTALL)]
    pub uninstall: bool,
    /// The spright-cni binary to copy [default: spright-cni next to this executable]
    #[arg(long, env = env::PLUGIN, value_name = "FILE")]
    pub plugin: Option<PathBuf>,
    /// File name of spright's own conflist (primary mode; removed by --uninstall)
    #[arg(long, env = env::CONFLIST, value_name = "NAME", default_value = DEFAULT_CONFLIST,
          value_parser = parse_conflist_name)]
    pub conflist: String,
    /// The node's pod CIDRs, comma-separated, one per family (primary mode)
    /// [default: --pod-cidr-file when it exists, else what meshd publishes
    /// from the Node's spec.podCIDRs in <state-dir>/pod-cidrs]
    #[arg(long, env = env::POD_CIDR, value_name = "CIDR[,CIDR]", value_delimiter = ',')]
    pub pod_cidr: Vec<IpNet>,
    /// A file holding the node's pod CIDRs, one per line: a hand-written
    /// override of the Node object (primary mode, when --pod-cidr is unset)
    #[arg(long, env = env::POD_CIDR_FILE, value_name = "FILE", default_value = DEFAULT_POD_CIDR_FILE)]
    pub pod_cidr_file: PathBuf,
    /// The cluster's pod CIDRs, comma-separated (primary mode): traffic to
    /// them keeps the pod's source address; only traffic leaving them is
    /// masqueraded [default: only the node's own pod CIDR is spared]
    #[arg(long, env = env::CLUSTER_CIDR, value_name = "CIDR[,CIDR]", value_delimiter = ',')]
    pub cluster_cidr: Vec<IpNet>,
    /// Seconds between rescans of the conf dir (safety net for missed inotify events)
    #[arg(long, env = env::RESCAN_SECS, value_name = "SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub rescan_secs: u64,
    /// spright-cni's `stateDir` (must equal meshd's --state-dir)
    #[arg(long, env = config::env::STATE_DIR, value_name = "DIR", default_value = spright_endpoint::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// spright-cni's `bpffs` (must equal meshd's --bpffs)
    #[arg(long, env = config::env::BPFFS, value_name = "DIR", default_value = spright_ebpf::DEFAULT_BPFFS_DIR)]
    pub bpffs: PathBuf,
    /// meshd's local API (its --api-addr): in primary mode spright-cni's
    /// STATUS reports the network not available until its /readyz answers
    #[arg(long, env = config::env::API_ADDR, value_name = "HOST:PORT", default_value = config::DEFAULT_API_ADDR)]
    pub api_addr: std::net::SocketAddr,
    /// spright-cni's `cgroup` [default: none in the entry; the plugin detects kubelet's pod cgroup]
    #[arg(long, env = config::env::CGROUP, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `debug`)
    #[arg(long, env = config::env::LOG, value_name = "FILTER", default_value = "info")]
    pub log: String,
}

fn parse_conflist_name(s: &str) -> Result<String, String> {
    if s.contains('/') || s.starts_with('.') || !s.ends_with(".conflist") {
        return Err(format!(
            "{s:?} must be a plain file name ending in .conflist"
        ));
    }
    Ok(s.to_owned())
}

/// Errors of install-cni. Messages name the flag, file or directory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{file}: {value:?} is not a CIDR")]
    BadPodCidr { file: PathBuf, value: String },
    #[error("cannot chain spright into the runtime's config")]
    Conf(#[from] conflist::ConfError),
    #[error("watching {path}")]
    Watch {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
}

/// Where one pass left the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// spright is in the file the runtime uses.
    Installed(PathBuf),
    /// No config in the conf dir yet (chained mode): the primary CNI has not
    /// written one.
    Waiting,
    /// spright's own conflist is written (primary mode), but another file
    /// sorts first, so the runtime uses that one.
    Shadowed { ours: PathBuf, by: PathBuf },
    /// Primary mode without a pod CIDR yet: meshd has not published the
    /// Node's `spec.podCIDRs` (and neither flag nor override file gives
    /// one). No conflist is written, so the node stays NotReady.
    NoPodCidr,
}

/// The installer: settings resolved once.
#[derive(Clone, Debug)]
pub struct Installer {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub mode: Mode,
    pub plugin: PathBuf,
    pub conflist: String,
    pub pod_cidr: Vec<IpNet>,
    pub pod_cidr_file: PathBuf,
    pub cluster_cidr: Vec<IpNet>,
    pub entry: Entry,
    /// The installed binary as last checked equal to the plugin, so that a
    /// rescan compares metadata, not megabytes.
    checked: Cell<Option<Fingerprint>>,
}

/// What identifies one version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl Fingerprint {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }
}

impl Installer {
    pub fn new(args: &Args) -> Self {
        let plugin = args.plugin.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join(spright_endpoint::CNI_TYPE)))
                .unwrap_or_else(|| PathBuf::from("/usr/local/bin/spright-cni"))
        });
        Self {
            conf_dir: args.conf_dir.clone(),
            bin_dir: args.bin_dir.clone(),
            mode: args.mode,
            plugin,
            conflist: args.conflist.clone(),
            pod_cidr: args.pod_cidr.clone(),
            pod_cidr_file: args.pod_cidr_file.clone(),
            cluster_cidr: args.cluster_cidr.clone(),
            entry: Entry {
                state_dir: args.state_dir.clone(),
                bpffs: args.bpffs.clone(),
                cgroup: args.cgroup.clone(),
                meshd_api: args.api_addr,
            },
            checked: Cell::new(None),
        }
    }

    /// One pass: the binary, then the config.
    pub fn reconcile(&self) -> Result<State, Error> {
        self.install_binary()?;
        match self.mode {
            Mode::Chained => self.chain(),
            Mode::Primary => self.primary(),
        }
    }

    /// Copies the plugin into the bin dir when the copy there differs.
    pub fn install_binary(&self) -> Result<(), Error> {
        let dst = self.bin_dir.join(spright_endpoint::CNI_TYPE);
        let seen = Fingerprint::of(&dst);
        if seen.is_some() && seen == self.checked.get() {
            return Ok(());
        }
        let want = std::fs::read(&self.plugin)
            .map_err(io_err("read the plugin binary (--plugin)", &self.plugin))?;
        if std::fs::read(&dst).is_ok_and(|have| have == want) {
            debug!(path = %dst.display(), "plugin binary up to date");
        } else {
            std::fs::create_dir_all(&self.bin_dir).map_err(io_err("create", &self.bin_dir))?;
            spright_endpoint::write_atomic(&dst, &want, 0o755).map_err(io_err("write", &dst))?;
            info!("copied {} to {}", self.plugin.display(), dst.display());
        }
        self.checked.set(Fingerprint::of(&dst));
        Ok(())
    }

    /// The config files of the conf dir, sorted by name as the runtime
    /// sorts them.
    pub fn config_files(&self) -> Result<Vec<PathBuf>, Error> {
        config_files(&self.conf_dir)
    }

    fn chain(&self) -> Result<State, Error> {
        let Some(first) = self.config_files()?.into_iter().next() else {
            return Ok(State::Waiting);
        };
        // The primary CNI may rewrite its file while we read it: writing our
        // version of the old text would undo its change. Write only when the
        // file is still the one read (a few tries; the watcher sees the
        // primary's write and comes back anyway).
        let mut tries = 0;
        let plan = loop {
            let before = Fingerprint::of(&first);
            let text = std::fs::read_to_string(&first).map_err(io_err("read", &first))?;
            let plan = conflist::insert(&first, &text, &self.entry.chained())?;
            if plan == Plan::Keep || Fingerprint::of(&first) == before {
                break plan;
            }
            tries += 1;
            if tries == 3 {
                return Err(conflist::ConfError::Shape {
                    path: first,
                    why: "it kept changing while being read; trying again later".into(),
                }
                .into());
            }
        };
        if let Plan::Write {
            path,
            replaces: Some(_),
            ..
        } = &plan
            && path.exists()
        {
            return Err(conflist::ConfError::Shape {
                path: first,
                why: format!(
                    "turning it into a conflist would overwrite {}",
                    path.display()
                ),
            }
            .into());
        }
        match plan {
            Plan::Keep => {
                debug!(path = %first.display(), "spright-cni already chained");
                Ok(State::Installed(first))
            }
            Plan::Write {
                path,
                text,
                replaces,
            } => {
                write_config(&path, &text)?;
                if let Some(old) = replaces {
                    remove_file(&old)?;
                    info!(
                        "converted {} into {} with spright-cni as its last plugin",
                        old.display(),
                        path.display()
                    );
                } else {
                    info!(
                        "inserted spright-cni as the last plugin of {}",
                        path.display()
                    );
                }
                Ok(State::Installed(path))
            }
        }
    }

    fn primary(&self) -> Result<State, Error> {
        let Some(cidrs) = self.pod_cidrs()? else {
            return Ok(State::NoPodCidr);
        };
        let path = self.conf_dir.join(&self.conflist);
        let text = conflist::primary_conflist(&self.entry, &cidrs, &self.cluster_cidr);
        if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
            debug!(path = %path.display(), "spright's conflist up to date");
        } else {
            write_config(&path, &text)?;
            let cidrs: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
            info!("wrote {} (pod CIDRs {})", path.display(), cidrs.join(", "));
        }
        match self.config_files()?.into_iter().next() {
            Some(first) if first != path => Ok(State::Shadowed {
                ours: path,
                by: first,
            }),
            _ => Ok(State::Installed(path)),
        }
    }

    /// The node's pod CIDRs: `--pod-cidr`, else the override file when it
    /// exists, else meshd's published copy of the Node's `spec.podCIDRs`;
    /// `None` when there is none yet.
    fn pod_cidrs(&self) -> Result<Option<Vec<IpNet>>, Error> {
        if !self.pod_cidr.is_empty() {
            return Ok(Some(self.pod_cidr.clone()));
        }
        let published = self.entry.state_dir.join(spright_endpoint::POD_CIDRS_FILE);
        for file in [&self.pod_cidr_file, &published] {
            let text = match std::fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("read", file)(e)),
            };
            let cidrs = text
                .split_whitespace()
                .map(|v| {
                    v.parse().map_err(|_| Error::BadPodCidr {
                        file: file.clone(),
                        value: v.to_owned(),
                    })
                })
                .collect::<Result<Vec<IpNet>, Error>>()?;
            if !cidrs.is_empty() {
                return Ok(Some(cidrs));
            }
        }
        Ok(None)
    }

    /// Removes spright's chained entries from every config file, spright's
    /// own conflist (`--conflist`, only when its first plugin is
    /// spright-cni) and the plugin binary. Returns what it did.
    pub fn uninstall(&self) -> Result<Vec<String>, Error> {
        let mut done = remove_from_conf_dir(&self.conf_dir, &self.conflist)?;
        let bin = self.bin_dir.join(spright_endpoint::CNI_TYPE);
        if remove_file(&bin)? {
            done.push(format!("removed {}", bin.display()));
        }
        Ok(done)
    }
}

/// The config files of `dir` (libcni's extensions, not hidden), sorted by
/// name. A missing directory has none.
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        if name.to_str().is_some_and(conflist::is_config_name)
            && entry.file_type().is_ok_and(|t| !t.is_dir())
        {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Removes spright from the config files of `conf_dir`: its chained entries
/// wherever they are, and the file `own` when it is spright's own network.
/// Files that are not valid JSON are left alone (and said so).
pub fn remove_from_conf_dir(conf_dir: &Path, own: &str) -> Result<Vec<String>, Error> {
    let mut done = Vec::new();
    for path in config_files(conf_dir)? {
        let text = std::fs::read_to_string(&path).map_err(io_err("read", &path))?;
        if path.file_name().is_some_and(|n| n == own) && conflist::is_spright_network(&path, &text)
        {
            remove_file(&path)?;
            done.push(format!("removed {}", path.display()));
            continue;
        }
        match conflist::remove(&path, &text) {
            Ok(Plan::Keep) => {}
            Ok(Plan::Write { path, text, .. }) => {
                write_config(&path, &text)?;
                done.push(format!("removed spright-cni from {}", path.display()));
            }
            Err(e) => done.push(format!("left {} alone: {e}", path.display())),
        }
    }
    Ok(done)
}

fn write_config(path: &Path, text: &str) -> Result<(), Error> {
    spright_endpoint::write_atomic(path, text.as_bytes(), 0o644).map_err(io_err("write", path))
}

/// Removes `path`; `false` when it was not there.
fn remove_file(path: &Path) -> Result<bool, Error> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

/// `spright install-cni`: uninstall, install once, or install and watch.
pub fn run(args: &Args) -> Result<(), Error> {
    let installer = Installer::new(args);
    if args.uninstall {
        for d in installer.uninstall()? {
            info!("{d}");
        }
        return Ok(());
    }
    std::fs::create_dir_all(&installer.conf_dir).map_err(io_err("create", &installer.conf_dir))?;
    // Watch before the first pass, so a file written in between is seen.
    let changes = Changes::watch(&installer.conf_dir)?;
    let rescan = Duration::from_secs(args.rescan_secs);
    let mut last = None;
    loop {
        match installer.reconcile() {
            Ok(state) => {
                if last.as_ref() != Some(&state) {
                    match &state {
                        State::Installed(path) => {
                            info!(mode = ?installer.mode, "spright-cni is in {}", path.display());
                        }
                        State::Waiting => info!(
                            "waiting for the primary CNI to write its config into {} (no *.conflist, *.conf or *.json yet)",
                            installer.conf_dir.display()
                        ),
                        State::Shadowed { ours, by } => warn!(
                            "{} sorts before {}: the runtime uses it, not spright's network",
                            by.display(),
                            ours.display()
                        ),
                        State::NoPodCidr => info!(
                            "no pod CIDR yet: meshd publishes this Node's spec.podCIDRs to {} (or set --pod-cidr, or write {}); spright's conflist follows, and until then the node stays NotReady",
                            installer
                                .entry
                                .state_dir
                                .join(spright_endpoint::POD_CIDRS_FILE)
                                .display(),
                            installer.pod_cidr_file.display()
                        ),
                    }
                }
                // The init container runs before meshd, which publishes the
                // pod CIDR: waiting here would deadlock the pod, so without
                // one it leaves the conflist to the watcher container.
                if args.once && state != State::Waiting {
                    return Ok(());
                }
                last = Some(state);
            }
            // An init container fails loudly (the kubelet retries it); the
            // watcher logs and tries again on the next change or rescan (a
            // primary CNI may be half-way through writing its file).
            Err(e) if args.once && !matches!(e, Error::Conf(_)) => return Err(e),
            Err(e) => {
                warn!(
                    error = &e as &dyn std::error::Error,
                    "install-cni pass failed; retrying on the next change"
                );
                last = None;
            }
        }
        changes.wait(rescan);
    }
}

/// Changes to the config files of a directory (inotify, read on a thread).
struct Changes {
    rx: mpsc::Receiver<()>,
}

impl Changes {
    fn watch(dir: &Path) -> Result<Self, Error> {
        use inotify::{Inotify, WatchMask};
        let watch_err = |source| Error::Watch {
            path: dir.to_path_buf(),
            source,
        };
        let mut inotify = Inotify::init().map_err(watch_err)?;
        inotify
            .watches()
            .add(
                dir,
                WatchMask::CREATE
                    | WatchMask::CLOSE_WRITE
                    | WatchMask::MODIFY
                    | WatchMask::MOVED_TO
                    | WatchMask::MOVED_FROM
                    | WatchMask::DELETE
                    | WatchMask::DELETE_SELF
                    | WatchMask::MOVE_SELF,
            )
            .map_err(watch_err)?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("install-cni-watch".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    let relevant = match inotify.read_events_blocking(&mut buf) {
                        Ok(events) => events.into_iter().any(|e| {
                            e.name
                                .is_none_or(|n| n.to_str().is_some_and(conflist::is_config_name))
                        }),
                        Err(e) => {
                            warn!(error = %e, "inotify failed; relying on rescans");
                            return;
                        }
                    };
                    if relevant && tx.send(()).is_err() {
                        return;
                    }
                }
            })
            .map_err(watch_err)?;
        Ok(Self { rx })
    }

    /// Waits for a change or `rescan`, whichever comes first. A burst of
    /// events (a primary CNI writing several files) counts once.
    fn wait(&self, rescan: Duration) {
        match self.rx.recv_timeout(rescan) {
            Ok(()) => {
                std::thread::sleep(Duration::from_millis(100));
                while self.rx.try_recv().is_ok() {}
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(rescan),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Cli::try_parse_from(std::iter::once("install-cni").chain(args.iter().copied()))
            .map(|c| c.args)
    }

    fn installer(root: &Path, mode: &str) -> Installer {
        let plugin = root.join("spright-cni.src");
        std::fs::write(&plugin, b"\x7fELF plugin v1").unwrap();
        let args = parse(&[
            "--conf-dir",
            root.join("net.d").to_str().unwrap(),
            "--bin-dir",
            root.join("bin").to_str().unwrap(),
            "--plugin",
            plugin.to_str().unwrap(),
            "--mode",
            mode,
            "--pod-cidr-file",
            root.join("pod-cidr").to_str().unwrap(),
            "--state-dir",
            root.join("state").to_str().unwrap(),
        ])
        .unwrap();
        std::fs::create_dir_all(root.join("net.d")).unwrap();
        Installer::new(&args)
    }

    #[test]
    fn defaults_are_kubeadms_and_errors_name_the_flag() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.conf_dir, Path::new(DEFAULT_CONF_DIR));
        assert_eq!(a.bin_dir, Path::new(DEFAULT_BIN_DIR));
        assert_eq!(a.mode, Mode::Chained);
        assert!(!a.once && !a.uninstall);
        for (args, flag, value) in [
            (&["--mode", "sideways"][..], "--mode", "sideways"),
            (&["--pod-cidr", "10.0.0.0/33"], "--pod-cidr", "10.0.0.0/33"),
            (
                &["--conflist", "../x.conflist"],
                "--conflist",
                "../x.conflist",
            ),
            (&["--rescan-secs", "0"], "--rescan-secs", "0"),
        ] {
            let e = parse(args).err().unwrap().to_string();
            assert!(e.contains(flag) && e.contains(value), "{e}");
        }
        assert!(parse(&["--once", "--uninstall"]).is_err());
    }

    #[test]
    fn chained_waits_then_installs_once_and_uninstalls_exactly() {
        let root = tempfile::tempdir().unwrap();
        let i = installer(root.path(), "chained");
        assert_eq!(i.reconcile().unwrap(), State::Waiting);
        // The binary is copied even while waiting, and only when it differs.
        let bin = root.path().join("bin/spright-cni");
        assert_eq!(std::fs::read(&bin).unwrap(), b"\x7fELF plugin v1");
        let before = std::fs::metadata(&bin).unwrap().modified().unwrap();
        i.install_binary().unwrap();
        assert_eq!(std::fs::metadata(&bin).unwrap().modified().unwrap(), before);
        // Someone else's binary under our name is replaced on the next pass.
        std::fs::write(&bin, b"something else").unwrap();
        i.install_binary().unwrap();
        assert_eq!(std::fs::read(&bin).unwrap(), b"\x7fELF plugin v1");

        let net = root.path().join("net.d");
        let bridge = r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"bridge","ipam":{"type":"host-local"}}]}"#;
        std::fs::write(net.join("20-bridge.conflist"), bridge).unwrap();
        std::fs::write(
            net.join("10-other.conf"),
            "{\"cniVersion\":\"0.4.0\",\"name\":\"o\",\"type\":\"ptp\"}",
        )
        .unwrap();
        std::fs::write(net.join("calico-kubeconfig"), "not a config").unwrap();
        let state = i.reconcile().unwrap();
        assert_eq!(state, State::Installed(net.join("10-other.conflist")));
        assert!(!net.join("10-other.conf").exists());
        assert_eq!(
            std::fs::read_to_string(net.join("20-bridge.conflist")).unwrap(),
            bridge
        );
        let once = std::fs::read(net.join("10-other.conflist")).unwrap();
        assert_eq!(i.reconcile().unwrap(), state);
        assert_eq!(
            std::fs::read(net.join("10-other.conflist")).unwrap(),
            once,
            "idempotent"
        );

        let done = i.uninstall().unwrap();
        assert_eq!(done.len(), 2, "{done:?}");
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(net.join("10-other.conflist")).unwrap()).unwrap();
        assert_eq!(
            v["plugins"],
            serde_json::json!([{"cniVersion":"0.4.0","name":"o","type":"ptp"}])
        );
        assert!(!bin.exists());
        assert!(net.join("calico-kubeconfig").exists());
        assert!(i.uninstall().unwrap().is_empty(), "nothing left to do");
    }

    #[test]
    fn a_conf_is_not_converted_over_an_existing_conflist() {
        let root = tempfile::tempdir().unwrap();
        let i = installer(root.path(), "chained");
        let net = root.path().join("net.d");
        let conf = r#"{"cniVersion":"1.0.0","name":"a","type":"ptp"}"#;
        let list = r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"bridge"}]}"#;
        std::fs::write(net.join("10-a.conf"), conf).unwrap();
        std::fs::write(net.join("10-a.conflist"), list).unwrap();
        let e = i.reconcile().unwrap_err();
        assert!(
            format!("{e}: {}", std::error::Error::source(&e).unwrap()).contains("overwrite"),
            "{e:?}"
        );
        assert_eq!(
            std::fs::read_to_string(net.join("10-a.conf")).unwrap(),
            conf
        );
        assert_eq!(
            std::fs::read_to_string(net.join("10-a.conflist")).unwrap(),
            list
        );
    }

    #[test]
    fn primary_needs_a_pod_cidr_and_writes_its_own_conflist() {
        let root = tempfile::tempdir().unwrap();
        let i = installer(root.path(), "primary");
        let path = root.path().join("net.d/10-spright.conflist");
        assert_eq!(i.reconcile().unwrap(), State::NoPodCidr);
        assert!(!path.exists(), "no conflist without a pod CIDR");
        // meshd's published copy of the Node's spec.podCIDRs.
        std::fs::create_dir_all(&i.entry.state_dir).unwrap();
        let published = i.entry.state_dir.join(spright_endpoint::POD_CIDRS_FILE);
        std::fs::write(&published, "10.244.2.0/24\nfd00:10:244:2::/64\n").unwrap();
        assert_eq!(i.reconcile().unwrap(), State::Installed(path.clone()));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            v["plugins"][0]["ipam"]["ranges"][1][0]["subnet"],
            "fd00:10:244:2::/64"
        );
        // The hand-written override wins over the Node object.
        std::fs::write(root.path().join("pod-cidr"), "banana\n").unwrap();
        let e = i.reconcile().unwrap_err().to_string();
        assert!(e.contains("banana") && e.contains("pod-cidr"), "{e}");
        std::fs::write(root.path().join("pod-cidr"), "10.244.3.0/24\n").unwrap();
        assert_eq!(i.reconcile().unwrap(), State::Installed(path.clone()));
        // Another network that sorts first wins at the runtime: said, not hidden.
        std::fs::write(root.path().join("net.d/05-other.conflist"), "{}").unwrap();
        assert_eq!(
            i.reconcile().unwrap(),
            State::Shadowed {
                ours: path.clone(),
                by: root.path().join("net.d/05-other.conflist"),
            }
        );
        std::fs::remove_file(root.path().join("net.d/05-other.conflist")).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(
            v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.3.0/24"
        );
        let done = i.uninstall().unwrap();
        assert!(!path.exists(), "{done:?}");
    }
}
