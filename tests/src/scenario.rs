//! End-to-end scenarios shared by the privileged tests and the demo binary.

use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, ensure};
use spright_ebpf::{Counters, Datapath, EndpointValue, Installed, chain_id};

use crate::sandbox::{Pod, Sandbox};

const TIMEOUT: Duration = Duration::from_mins(1);
const PORT: u16 = 7000;

/// What one transfer observed.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub bytes: u64,
    pub intact: bool,
    pub micros: u64,
    /// TCP data segments the client's socket sent (`ss -tni data_segs_out`).
    pub client_data_segs_out: u64,
    /// TCP data segments the server's socket sent.
    pub server_data_segs_out: u64,
    pub eagain_retries: u64,
}

/// Result of the smoke scenario.
#[derive(Debug, Clone)]
pub struct SmokeReport {
    pub installed: Installed,
    /// Chain pod A → chain pod B.
    pub chain: Transfer,
    /// Outsider pod C → chain pod B (control: must take the TCP path).
    pub outsider: Transfer,
    pub chain_client_counters: Counters,
    pub chain_server_counters: Counters,
}

/// The smoke path of the foundation: load the programs built in this build,
/// attach sockops to the sandbox's cgroup, record pods A and B as one chain,
/// move `bytes` from A to B and from an outsider C to B, and report what the
/// kernel counted. `progress` receives one line per step.
pub fn smoke(bytes: u64, progress: &mut dyn FnMut(&str)) -> anyhow::Result<SmokeReport> {
    let mut sb = Sandbox::new("s")?;
    progress(&format!(
        "node namespace {} with bridge {}; cgroup {}; pins {}",
        sb.node.name,
        sb.bridge,
        sb.cgroup.path.display(),
        sb.pins.path.display()
    ));
    let (a, b, c) = (sb.add_pod()?, sb.add_pod()?, sb.add_pod()?);
    progress(&format!(
        "pods: A {} and B {} in chain default/smoke, C {} outside any chain",
        sb.pods[a].ip, sb.pods[b].ip, sb.pods[c].ip
    ));

    let (mut dp, installed) =
        Datapath::ensure(&sb.placement()).context("installing the datapath")?;
    progress(&format!(
        "datapath {installed:?}: sockops attached to the cgroup, sk_msg to the sockhash"
    ));
    let chain = EndpointValue {
        chain_id: chain_id("default", "smoke"),
        ..Default::default()
    };
    for pod in [a, b] {
        dp.upsert_endpoint(IpAddr::V4(sb.pods[pod].ip), chain)?;
    }

    let server_addr = format!("{}:{PORT}", sb.pods[b].ip);
    let server = sb.spawn_peer(b, &["serve", "--listen", &server_addr, "--conns", "2"])?;
    ensure!(server.line(TIMEOUT)? == "ready", "server did not start");

    progress(&format!("sending {bytes} bytes A → B"));
    let chain_t = transfer(&sb, a, &sb.pods[b], &server_addr, bytes)?;
    progress(&format!(
        "  intact={} in {} µs; TCP data segments: client {} server {}",
        chain_t.intact, chain_t.micros, chain_t.client_data_segs_out, chain_t.server_data_segs_out
    ));
    progress(&format!(
        "sending {bytes} bytes C → B (control, not in the chain)"
    ));
    let outsider = transfer(&sb, c, &sb.pods[b], &server_addr, bytes)?;
    progress(&format!(
        "  intact={} in {} µs; TCP data segments: client {} server {}",
        outsider.intact,
        outsider.micros,
        outsider.client_data_segs_out,
        outsider.server_data_segs_out
    ));
    server.finish(TIMEOUT)?;

    let report = SmokeReport {
        installed,
        chain_client_counters: dp.counters(IpAddr::V4(sb.pods[a].ip))?,
        chain_server_counters: dp.counters(IpAddr::V4(sb.pods[b].ip))?,
        chain: chain_t,
        outsider,
    };
    progress(&format!(
        "counters A: {} msgs / {} bytes redirected, {} fallback msgs, {} sockets accelerated",
        report.chain_client_counters.redirected_msgs,
        report.chain_client_counters.redirected_bytes,
        report.chain_client_counters.fallback_msgs,
        report.chain_client_counters.accelerated_socks
    ));
    drop(dp);
    drop(sb);
    progress("cleaned up: pins removed, programs detached, cgroup and namespaces deleted");
    Ok(report)
}

/// One held transfer from pod `from` to the server (listening on
/// `server_addr` in pod `server`), with the TCP data-segment counts of both
/// sockets read while the connection is still open.
pub fn transfer(
    sb: &Sandbox,
    from: usize,
    server: &Pod,
    server_addr: &str,
    bytes: u64,
) -> anyhow::Result<Transfer> {
    let mut client = sb.spawn_peer(
        from,
        &[
            "send",
            "--connect",
            server_addr,
            "--bytes",
            &bytes.to_string(),
            "--hold",
        ],
    )?;
    let r = client.report(TIMEOUT)?;
    let local: std::net::SocketAddr = r["local"]
        .as_str()
        .context("report without local address")?
        .parse()?;
    let server_port = server_addr
        .rsplit(':')
        .next()
        .context("server address without port")?;
    let (sport, dport) = (format!(":{}", local.port()), format!(":{server_port}"));
    let client_segs = data_segs_out(
        &sb.pods[from],
        &["sport", "=", &sport, "and", "dport", "=", &dport],
    )?;
    let server_segs = data_segs_out(server, &["sport", "=", &dport, "and", "dport", "=", &sport])?;
    client.release();
    client.finish(TIMEOUT)?;
    Ok(Transfer {
        bytes: r["sent"].as_u64().unwrap_or(0),
        intact: r["intact"].as_bool().unwrap_or(false),
        micros: r["micros"].as_u64().unwrap_or(0),
        client_data_segs_out: client_segs,
        server_data_segs_out: server_segs,
        eagain_retries: r["eagain_retries"].as_u64().unwrap_or(0),
    })
}

/// `data_segs_out` of the one established socket matching `filter`, from
/// `ss -tni` inside the pod (absent means zero).
pub fn data_segs_out(pod: &Pod, filter: &[&str]) -> anyhow::Result<u64> {
    let mut args = vec!["-tniH", "state", "established"];
    args.extend_from_slice(filter);
    let out = pod.ns.exec("ss", &args)?;
    ensure!(
        !out.trim().is_empty(),
        "ss found no established socket for `{}` in {}",
        filter.join(" "),
        pod.ns.name
    );
    Ok(parse_ss_field(&out, "data_segs_out").unwrap_or(0))
}

/// The value of `name:N` in `ss -i` output.
pub fn parse_ss_field(out: &str, name: &str) -> Option<u64> {
    out.split_whitespace()
        .find_map(|tok| tok.strip_prefix(name)?.strip_prefix(':')?.parse().ok())
}

/// `r<N>` of the largest `skmem:(...)` in `ss -m` output: the receive
/// memory the kernel charges to the socket (on the redirect path this
/// includes the queue of redirected messages).
pub fn skmem_r(ss: &str) -> u64 {
    ss.split("skmem:(")
        .skip(1)
        .filter_map(|rest| rest.strip_prefix('r')?.split(',').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// The number `v[k]` of a peer's JSON report; panics naming the key.
pub fn json_u64(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing or not a number in {v}"))
}

/// Ids of the sock_ops programs attached at `cgroup` (`bpftool cgroup show`).
pub fn sockops_ids(cgroup: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let out = std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .context("running bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool cgroup show {} failed: {}",
        cgroup.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("sock_ops"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::{parse_ss_field, skmem_r};

    #[test]
    fn reads_the_largest_receive_memory() {
        let out = "x skmem:(r0,rb131072,t0) y skmem:(r4096,rb131072,t0)";
        assert_eq!(skmem_r(out), 4096);
        assert_eq!(skmem_r("no memory here"), 0);
    }

    #[test]
    fn reads_ss_fields() {
        let out = "0 0 10.213.0.10:41000 10.213.0.11:7000\n\t cubic wscale:7,7 rto:204 \
                   bytes_sent:4 bytes_acked:5 segs_out:6 segs_in:4 data_segs_out:2 data_segs_in:1 send 1Gbps";
        assert_eq!(parse_ss_field(out, "data_segs_out"), Some(2));
        assert_eq!(parse_ss_field(out, "data_segs_in"), Some(1));
        assert_eq!(parse_ss_field(out, "segs_out"), Some(6));
        assert_eq!(parse_ss_field("segs_out:3", "data_segs_out"), None);
    }
}
