//! `spright`: the command-line view of a node.
//!
//! `spright status` asks meshd (`/status`); when meshd is not reachable it
//! builds the same view from the endpoint records and the pinned maps.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use meshd::{config, status::Status};

#[derive(Parser)]
#[command(name = "spright", version, about = "spright node tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Chains, endpoints and acceleration counters of this node
    Status {
        /// meshd's HTTP address
        #[arg(long, env = config::env::METRICS_ADDR, default_value = config::DEFAULT_METRICS_ADDR)]
        addr: String,
        /// Pin directory, read directly when meshd is down
        #[arg(long, env = config::env::BPFFS, default_value = spright_ebpf::DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
        /// State directory, read directly when meshd is down
        #[arg(long, env = config::env::STATE_DIR, default_value = spright_endpoint::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Status {
            addr,
            bpffs,
            state_dir,
            json,
        } => {
            let status = match fetch(&addr) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!(
                        "spright: meshd at {addr} not reachable ({e}); reading the pinned maps directly"
                    );
                    Status::from_node(&state_dir, &bpffs)
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
