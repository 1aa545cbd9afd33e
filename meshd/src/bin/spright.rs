//! `spright`: the command-line view of a node.
//!
//! `spright status` asks meshd (`/status`); when meshd is not reachable it
//! builds the same view from the endpoint records and the pinned maps.
//!
//! `spright install-cni` puts spright-cni into the runtime's CNI config
//! (chained into the conflist the runtime uses by default) and keeps it
//! there; see `meshd::install_cni`.
//!
//! `spright uninstall` leaves a node clean (see `meshd::uninstall` for the
//! list and order). The cleanup DaemonSet in manifests/cleanup.yaml runs it
//! on every node.

#![forbid(unsafe_code)]

use std::{io, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use meshd::{config, install_cni, status::Status, uninstall::Uninstall};

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
    /// Would a new connection from FROM to TO be redirected (or, to a Service
    /// address with PORT, translated), and if not, why: the kernel programs'
    /// own decision on the pinned maps they read
    Explain {
        /// The caller: `namespace/pod`, `pod` (namespace default) or an IP
        from: String,
        /// The destination: a pod as above, a pod's IP, or a Service address
        to: String,
        /// The destination port (needed for a Service address)
        port: Option<u16>,
        /// Pin directory of the datapath
        #[arg(long, env = config::env::BPFFS, default_value = spright_ebpf::DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
        /// State directory with the endpoint records (pod names to addresses)
        #[arg(long, env = config::env::STATE_DIR, default_value = spright_endpoint::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Recent connections of chain pods on this node and their fate:
    /// redirected, translated, or left on TCP and why; with bytes each way
    /// once closed (from meshd's flow events)
    Flows {
        /// meshd's local API address
        #[arg(long, env = config::env::API_ADDR, default_value = config::DEFAULT_API_ADDR)]
        addr: String,
        /// Only flows with this pod at either end: `namespace/pod` or `pod`
        /// (namespace default)
        #[arg(long)]
        pod: Option<String>,
        /// Keep printing flows as they open, switch and close (Ctrl-C ends)
        #[arg(long, short)]
        follow: bool,
        /// Print JSON (with --follow: one object per line)
        #[arg(long)]
        json: bool,
    },
    /// Install spright-cni into the runtime's CNI config and keep it there:
    /// chained as the last plugin of the conflist the runtime uses (default)
    /// or as spright's own network (--mode primary). Without --once it keeps
    /// watching the conf dir and re-inserts spright when the primary CNI
    /// rewrites its file.
    InstallCni(install_cni::Args),
    /// Remove spright from this node: CNI config entries, plugin binary, eBPF
    /// programs and pins, endpoint records, IP allocations, the bridge and
    /// masquerade rules, shared-memory regions, the CSI plugin directory and
    /// the pod CIDR file. Idempotent. Run it after
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
        /// The primary-mode bridge to delete (only a link of kind bridge); empty: none
        #[arg(long, default_value = spright_cni::config::DEFAULT_BRIDGE)]
        bridge: String,
        /// Leave iptables alone (by default every MASQUERADE rule whose comment starts with `spright-cni:` is deleted, IPv4 and IPv6)
        #[arg(long)]
        no_iptables: bool,
        /// The host's root filesystem, when uninstall runs in a container that mounts it: the host's own iptables runs there (`chroot DIR iptables`)
        #[arg(long, value_name = "DIR")]
        host_root: Option<PathBuf>,
        /// shm-csi's region root: every shared-memory region mounted below it is unmounted, then the directory removed
        #[arg(long, value_name = "DIR", default_value = "/run/spright/shm")]
        region_root: PathBuf,
        /// The kubelet's root directory (shm-csi's plugin directory and registration socket are below it)
        #[arg(long, value_name = "DIR", default_value = "/var/lib/kubelet")]
        kubelet_dir: PathBuf,
        /// The pod CIDR file of primary mode
        #[arg(long, value_name = "FILE", default_value = install_cni::DEFAULT_POD_CIDR_FILE)]
        pod_cidr_file: PathBuf,
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
        Command::Explain {
            from,
            to,
            port,
            bpffs,
            state_dir,
            json,
        } => match meshd::explain::explain(&state_dir, &bpffs, &from, &to, port) {
            Ok(e) if json => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&e).expect("explanations serialise")
                );
                ExitCode::SUCCESS
            }
            Ok(e) => {
                print!("{}", e.render());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("spright: explain: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Flows {
            addr,
            pod,
            follow,
            json,
        } => match flows(&addr, pod.as_deref(), follow, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("spright: flows: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Uninstall {
            cni_bin_dir,
            cni_conf_dir,
            conflist,
            bpffs,
            state_dir,
            ipam_dir,
            bridge,
            no_iptables,
            host_root,
            region_root,
            kubelet_dir,
            pod_cidr_file,
        } => {
            let steps = Uninstall {
                conf_dir: cni_conf_dir,
                conflist,
                plugin: cni_bin_dir.join("spright-cni"),
                bpffs,
                state_dir,
                ipam_dir,
                bridge: (!bridge.is_empty()).then_some(bridge),
                iptables: !no_iptables,
                host_root,
                region_root,
                kubelet_dir,
                pod_cidr_file,
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

fn flows(addr: &str, pod: Option<&str>, follow: bool, json: bool) -> Result<(), String> {
    let pod = pod.map(|p| {
        if p.contains('/') {
            p.to_owned()
        } else {
            format!("default/{p}")
        }
    });
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .into();
    let mut since = 0;
    let mut header = true;
    loop {
        let mut req = agent
            .get(&format!("http://{addr}/v1/flows"))
            .query("since", since.to_string());
        if let Some(p) = &pod {
            req = req.query("pod", p);
        }
        let reply: meshd::flows::FlowsReply = req
            .call()
            .and_then(|mut r| r.body_mut().read_json())
            .map_err(|e| format!("meshd at {addr} did not answer ({e}); is it running?"))?;
        if json && !follow {
            println!(
                "{}",
                serde_json::to_string_pretty(&reply).expect("flows serialise")
            );
            return Ok(());
        }
        if json {
            for f in &reply.flows {
                println!("{}", serde_json::to_string(f).expect("flows serialise"));
            }
        } else {
            if let Some(why) = reply.unavailable.as_ref().filter(|_| header) {
                eprintln!("spright: no flow events: {why}");
            }
            print!("{}", meshd::flows::render(&reply.flows, header));
            if !follow && reply.counts.lost > 0 {
                eprintln!(
                    "spright: {} flow events were lost (the ring buffer was full)",
                    reply.counts.lost
                );
            }
        }
        header = false;
        if !follow {
            return Ok(());
        }
        since = reply.seq;
        std::thread::sleep(Duration::from_millis(500));
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
