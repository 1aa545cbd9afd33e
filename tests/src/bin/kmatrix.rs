//! spright-kmatrix: an unmodified Go program on the redirect path, for the
//! kernel matrix (`cargo xtask test kernels`), which runs it inside each
//! booted kernel.
//!
//! ```text
//! spright-kmatrix ZOO [--no-guard]
//! ```
//!
//! Installs the datapath on a cgroup of its own (`<cgroup2>/spright-kmatrix`,
//! never the root) with its pins under `/sys/fs/bpf/spright-kmatrix`, makes
//! 127.0.0.1 a chain member, joins the cgroup, and runs the zoo's Go server,
//! io.Copy proxy and checking client (`ZOO`, tests/go/zoo) on loopback: 20
//! rounds of 1000 B, 64 KiB and 1 MiB through the proxy. With `--no-guard`
//! the splice guard stands aside (what the kernel alone does). Prints one
//! JSON line: the client's per-size results, the messages redirected and the
//! splice calls the guard refused; then removes what it installed.

use std::{
    io::{BufRead as _, BufReader},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, bail};
use spright_ebpf::{Datapath, EndpointValue, Placement, chain_id};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (zoo, guard) = match args.as_slice() {
        [zoo] => (PathBuf::from(zoo), true),
        [zoo, flag] if flag == "--no-guard" => (PathBuf::from(zoo), false),
        _ => bail!("usage: spright-kmatrix ZOO [--no-guard]"),
    };
    let root = spright_ebpf::cgroup2_mount().context("no cgroup v2 mount")?;
    let cgroup = root.join("spright-kmatrix");
    anyhow::ensure!(cgroup != root, "refusing the cgroup v2 root");
    let pins = PathBuf::from("/sys/fs/bpf/spright-kmatrix");
    std::fs::create_dir_all(&cgroup)?;
    let result = run(&zoo, guard, &cgroup, &pins);
    let _ = spright_ebpf::uninstall(&pins);
    // Move back to the root so the test cgroup can go.
    let _ = std::fs::write(root.join("cgroup.procs"), std::process::id().to_string());
    let _ = std::fs::remove_dir(&cgroup);
    println!("{}", result?);
    Ok(())
}

fn run(zoo: &Path, guard: bool, cgroup: &Path, pins: &Path) -> anyhow::Result<serde_json::Value> {
    let (mut dp, _) = Datapath::ensure(&Placement {
        cgroup: cgroup.to_path_buf(),
        bpffs: pins.to_path_buf(),
    })?;
    let lo = IpAddr::from([127, 0, 0, 1]);
    dp.upsert_endpoint(
        lo,
        EndpointValue {
            chain_id: chain_id("kmatrix", "zoo"),
            ..EndpointValue::default()
        },
    )?;
    spright_ebpf::set_config_flag(pins, spright_ebpf::CONFIG_NO_REDIRECT, false)?;
    spright_ebpf::set_config_flag(pins, spright_ebpf::CONFIG_NO_SPLICE_GUARD, !guard)?;
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())?;
    let server = Started::new(zoo, &["server", "-listen", "127.0.0.1:7300"])?;
    let proxy = Started::new(
        zoo,
        &[
            "proxy",
            "-listen",
            "127.0.0.1:7301",
            "-upstream",
            "127.0.0.1:7300",
        ],
    )?;
    let out = Command::new(zoo)
        .args([
            "client",
            "-connect",
            "127.0.0.1:7301",
            "-sizes",
            "1000,65536,1048576",
            "-rounds",
            "20",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running the zoo's client")?;
    drop((proxy, server));
    let results: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("the zoo's client printed no JSON ({})", out.status))?;
    Ok(serde_json::json!({
        "guard": guard,
        "results": results,
        "redirected_msgs": dp.counters(lo)?.redirected_msgs,
        "guard_armed": spright_ebpf::guard_state(pins)?.armed,
        "splice_refused": spright_ebpf::guard_state(pins)?.refused,
    }))
}

/// A zoo process that printed `ready`; killed on drop.
struct Started(Child);

impl Started {
    fn new(zoo: &Path, args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(zoo)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} {}", zoo.display(), args.join(" ")))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            bail!("{} said {line:?}", args[0]);
        }
        Ok(Self(child))
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
