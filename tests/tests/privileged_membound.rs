//! Privileged tier: the memory bound of the redirect path (issues 5 and 18,
//! docs/RELIABILITY.md "Memory bound"), enforced by sk_msg at each send
//! where the kernel allows it, else by meshd's poll.
//!
//! A receiver that never reads, a non-blocking sender writing an
//! order-sensitive stream for ~2 s, three times between the same two pods of
//! one simulated node: plain TCP (the pods are not chain members), the
//! redirect path with meshd's bound at its defaults, and the redirect path
//! with the bound off. Each run records what the sender could queue and the
//! receiver's `skmem r`; then the receiver reads everything, and the FNV-1a
//! hash of what it read must equal the hash of what was written — with the
//! bound on, that stream went partly over the redirect path and partly, after
//! meshd's switch, over TCP, so equal hashes prove nothing was lost or
//! reordered across the switch.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use spright_ebpf::{Counters, Datapath};
use spright_tests::{
    meshd::Meshd,
    privileged,
    sandbox::{Peer, Sandbox},
    scenario::{json_u64 as u, skmem_r},
};

const T: Duration = Duration::from_mins(2);
const PORT: u16 = 7300;
const MIB: u64 = 1 << 20;

fn spawn(sb: &Sandbox, pod: usize, args: &[&str]) -> Peer {
    sb.spawn_torture(pod, args)
        .expect("spawning spright-torture")
}

#[derive(Debug)]
struct Run {
    queued: u64,
    secs: f64,
    receiver_r: u64,
    drain_ms: u64,
    switches: u64,
    /// The receiver's memory when meshd switched (from /status).
    at_switch: u64,
    redirected_bytes: u64,
    fallback_bytes: u64,
    /// The receiver's reply to the sender, by path.
    reply_redirected: u64,
    reply_fallback: u64,
}

struct Node {
    sb: Sandbox,
    state: tempfile::TempDir,
}

impl Node {
    fn ip(&self, pod: usize) -> IpAddr {
        IpAddr::V4(self.sb.pods[pod].ip)
    }

    /// Records both pods (in chain `chain`, or in none) and waits until
    /// meshd has put them into (or left them out of) the endpoint map.
    fn record(&self, chain: Option<&str>) {
        for pod in [0, 1] {
            self.sb
                .record_pod(self.state.path(), pod, chain)
                .expect("record pod");
        }
        let dp = Datapath::open(&self.sb.pins.path).expect("open datapath");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let eps = dp.endpoints().expect("endpoints");
            let members = [0, 1].iter().all(|&p| {
                eps.iter()
                    .any(|(ip, v)| *ip == self.ip(p) && v.chain_id != 0)
            });
            if members == chain.is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "meshd never reconciled chain {chain:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn counters(&self, pod: usize) -> Counters {
        Datapath::open(&self.sb.pins.path)
            .expect("open datapath")
            .counters(self.ip(pod))
            .expect("counters")
    }

    /// One stalled-reader run: server (never reading until released) in
    /// pod 1, sender in pod 0. Asserts the stream arrived intact.
    fn run(&self, meshd: &Meshd, port: u16, what: &str) -> Run {
        let switches = |m: &Meshd| u(&m.status().expect("status")["memory_bound"], "switches");
        let before = (self.counters(0), switches(meshd), self.counters(1));
        let addr = format!("{}:{port}", self.sb.pods[1].ip);
        let mut server = spawn(
            &self.sb,
            1,
            &["server", "stalled-stream", "--listen", &addr],
        );
        assert_eq!(server.line(T).expect("server start"), "ready");
        let mut client = spawn(
            &self.sb,
            0,
            &[
                "client",
                "stalled-stream",
                "--connect",
                &addr,
                "--bytes",
                "1073741824",
            ],
        );
        let written = client.report(T).expect("client report");
        // Both sockets open, nothing read yet: the receiver's memory now.
        let ss = self.sb.pods[1]
            .ns
            .exec("ss", &["-tmniH", "state", "established"])
            .expect("ss");
        let receiver_r = skmem_r(&ss);
        let status = meshd.status().expect("status");
        let after_switches = u(&status["memory_bound"], "switches");
        let at_switch = u(&status["memory_bound"], "last_switch_queue_bytes");
        server.release();
        client.release();
        let read = server.report(T).expect("server report");
        let closed = client.report(T).expect("client's last report");
        server.finish(T).expect("server exit");
        client.finish(T).expect("client exit");
        let after = self.counters(0);
        let replier = self.counters(1);
        assert_eq!(
            u(&closed, "reply"),
            u(&read, "replied"),
            "{what}: the reply"
        );
        assert_eq!(
            (u(&read, "drained"), u(&read, "hash")),
            (u(&written, "queued"), u(&written, "hash")),
            "{what}: the receiver did not read exactly the bytes written, in order \
             (written {written}, read {read})"
        );
        Run {
            queued: u(&written, "queued"),
            secs: written["secs"].as_f64().unwrap_or_default(),
            receiver_r,
            drain_ms: u(&read, "drain_ms"),
            switches: after_switches - before.1,
            at_switch,
            redirected_bytes: after.redirected_bytes - before.0.redirected_bytes,
            fallback_bytes: after.fallback_bytes - before.0.fallback_bytes,
            reply_redirected: replier.redirected_bytes - before.2.redirected_bytes,
            reply_fallback: replier.fallback_bytes - before.2.fallback_bytes,
        }
    }
}

impl Node {
    /// A connection whose reader keeps up: 64 MiB each way at once (four
    /// times the default limit). Returns (switches, bytes that took TCP,
    /// bytes redirected) over both directions.
    fn reading(&self, meshd: &Meshd, port: u16) -> (u64, u64, u64) {
        let switches = |m: &Meshd| u(&m.status().expect("status")["memory_bound"], "switches");
        let before = (switches(meshd), self.counters(0), self.counters(1));
        let addr = format!("{}:{port}", self.sb.pods[1].ip);
        let bytes = (64 * MIB).to_string();
        let server = spawn(
            &self.sb,
            1,
            &["server", "duplex", "--listen", &addr, "--bytes", &bytes],
        );
        assert_eq!(server.line(T).expect("server start"), "ready");
        let client = spawn(
            &self.sb,
            0,
            &["client", "duplex", "--connect", &addr, "--bytes", &bytes],
        );
        let (c, s) = (
            client.report(T).expect("client report"),
            server.report(T).expect("server report"),
        );
        assert_eq!((&c["intact"], &s["intact"]), (&true.into(), &true.into()));
        client.finish(T).expect("client exit");
        server.finish(T).expect("server exit");
        let (a, b) = (self.counters(0), self.counters(1));
        (
            switches(meshd) - before.0,
            a.fallback_bytes - before.1.fallback_bytes + b.fallback_bytes - before.2.fallback_bytes,
            a.redirected_bytes - before.1.redirected_bytes + b.redirected_bytes
                - before.2.redirected_bytes,
        )
    }
}

fn start_meshd(node: &Node, extra: &[&str]) -> Meshd {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut args = vec!["--no-selftest"];
    args.extend_from_slice(extra);
    Meshd::start_with(
        &node.sb.placement(),
        node.state.path(),
        &format!("127.0.0.1:{port}"),
        &args,
    )
    .expect("meshd")
}

fn show(what: &str, r: &Run) {
    eprintln!(
        "{what:<22} queued {:>10.1} MiB in {:.2} s   receiver skmem r {:>10.1} MiB   \
         switches {} (at {:.1} MiB)   redirected {:.1} MiB, then TCP {:.1} MiB   drained in {} ms",
        r.queued as f64 / MIB as f64,
        r.secs,
        r.receiver_r as f64 / MIB as f64,
        r.switches,
        r.at_switch as f64 / MIB as f64,
        r.redirected_bytes as f64 / MIB as f64,
        r.fallback_bytes as f64 / MIB as f64,
        r.drain_ms,
    );
}

fn new_node() -> Node {
    let mut sb = Sandbox::new("mb").expect("sandbox");
    sb.add_pod().expect("pod a");
    sb.add_pod().expect("pod b");
    Node {
        sb,
        state: tempfile::tempdir().expect("state dir"),
    }
}

/// Who enforces the bound on this kernel: sk_msg when the loader finds what
/// it needs in the kernel's BTF (that the verifier accepts the program with
/// it is what the test then proves), meshd's poll otherwise.
fn expected_mode() -> &'static str {
    if spright_ebpf::rmem_alloc_offset(std::path::Path::new(spright_ebpf::VMLINUX_BTF)).is_some() {
        "kernel"
    } else {
        "poll"
    }
}

/// The bound at its default (16 MiB) and at 1 MiB against plain TCP and
/// the bound off, in one run. With the kernel bound, the message that takes
/// the receiver past the limit is the connection's last redirected one: the
/// receiver holds at most the limit plus one message, and TCP's closed
/// window holds it there.
#[test]
fn privileged_membound_stalled_reader_on_off_tcp() {
    if !privileged::require("privileged_membound_stalled_reader_on_off_tcp") {
        return;
    }
    let node = new_node();
    let mode = expected_mode();
    // The bound at its defaults.
    let meshd = start_meshd(&node, &[]);
    let status = meshd.status().expect("status");
    assert_eq!(
        status["memory_bound"]["limit_bytes"],
        16 * MIB,
        "{status:#}"
    );
    assert_eq!(status["memory_bound"]["mode"], mode, "{status:#}");
    node.record(None);
    let tcp = node.run(&meshd, PORT, "plain TCP");
    show("plain TCP", &tcp);
    node.record(Some("mb"));
    let on = node.run(&meshd, PORT + 1, "redirect, bound on");
    show("redirect, bound on", &on);
    // The switched sender's TCP-only mark went with its socket.
    let marks = spright_ebpf::PathSwitch::open(&node.sb.pins.path)
        .expect("open the maps")
        .tcp_only()
        .expect("read the TCP-only map");
    assert!(
        marks.is_empty(),
        "marks of closed sockets remain: {marks:?}"
    );
    // The switch is the flow's fate in `/v1/flows`: redirected, then the
    // sender (the client) moved to TCP by the bound.
    let flows: serde_json::Value =
        serde_json::from_str(&meshd.get("/v1/flows").expect("flows")).expect("flows JSON");
    let bound_flows: Vec<&serde_json::Value> = flows["flows"]
        .as_array()
        .expect("flows")
        .iter()
        .filter(|f| f["switched"]["why"] == "MemoryBound")
        .collect();
    assert_eq!(bound_flows.len(), 1, "{flows:#}");
    assert_eq!(bound_flows[0]["path"], "redirected", "{flows:#}");
    assert_eq!(bound_flows[0]["switched"]["sender"], "client", "{flows:#}");
    let metrics = meshd.check_metrics().expect("metrics");
    // A reader that keeps up is never switched, however much it receives.
    let (switches, tcp_bytes, redirected) = node.reading(&meshd, PORT + 4);
    assert_eq!(
        (switches, tcp_bytes),
        (0, 0),
        "a reading receiver was switched"
    );
    assert!(redirected >= 128 * MIB, "{redirected}");
    let status_line = meshd.status().expect("status")["memory_bound"].clone();
    eprintln!("status: {status_line}");
    for line in meshd
        .log_text()
        .lines()
        .filter(|l| l.contains("memory bound"))
    {
        eprintln!("meshd: {line}");
    }
    drop(meshd);
    let meshd = start_meshd(&node, &["--memory-bound-bytes", "1MiB"]);
    let small = node.run(&meshd, PORT + 3, "redirect, bound 1 MiB");
    show("redirect, bound 1 MiB", &small);
    drop(meshd);
    let meshd = start_meshd(&node, &["--memory-bound-bytes", "off"]);
    assert_eq!(
        meshd.status().expect("status")["memory_bound"]["limit_bytes"],
        0
    );
    let off = node.run(&meshd, PORT + 2, "redirect, bound off");
    show("redirect, bound off", &off);
    drop(meshd);

    // Plain TCP: the receive window bounds it, nothing to switch.
    assert!(tcp.queued < 64 * MIB, "{tcp:?}");
    assert_eq!((tcp.switches, tcp.redirected_bytes), (0, 0), "{tcp:?}");
    // Bound off: documented limit 2, the redirect path queues far past it.
    assert_eq!(off.switches, 0, "{off:?}");
    assert!(
        off.receiver_r > 64 * MIB && off.fallback_bytes == 0,
        "{off:?}"
    );
    for (limit, on) in [(16 * MIB, &on), (MIB, &small)] {
        // One switch; the stream went over the redirect path, then over
        // TCP (both counted), and arrived whole and in order (checked in
        // `run`).
        assert_eq!(on.switches, 1, "{on:?}");
        // Only the over-limit direction moved: the receiver's reply to the
        // sender still went socket to socket.
        assert!(
            on.reply_redirected >= 256 * 1024 && on.reply_fallback == 0,
            "the other direction left the redirect path: {on:?}"
        );
        assert!(
            on.redirected_bytes >= limit && on.fallback_bytes > 0,
            "the stream did not cross the switch: {on:?}"
        );
        assert!(on.at_switch > limit, "{on:?}");
        assert!(
            on.queued < off.queued / 2,
            "the bound did not hold: {on:?} (bound off: {off:?})"
        );
        if mode == "kernel" {
            // Exact: the limit plus one message when the switch was made
            // (the sender writes 64 KiB at a time), and no more afterwards.
            assert!(on.at_switch <= limit + MIB, "{on:?}");
            assert!(
                on.receiver_r <= limit + MIB,
                "the receiver holds more than limit + 1 MiB: {on:?}"
            );
        } else {
            // The poll: the overshoot is the sender's rate times the
            // interval (docs/RELIABILITY.md); what still arrives after meshd
            // read the receiver's memory: messages redirected while it
            // walked the sockhash and wrote the map.
            assert!(
                on.receiver_r < on.at_switch + 32 * MIB,
                "the receiver's memory kept growing after the switch: {on:?}"
            );
        }
    }
    assert!(
        metrics.contains("spright_memory_bound_switches_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("spright_memory_bound_limit_bytes 16777216"),
        "{metrics}"
    );
}

/// meshd's poll where the kernel could enforce the bound
/// (`--memory-bound-poll`): what older kernels get. Switches later (rate ×
/// interval) but as safely: nothing lost or reordered.
#[test]
fn privileged_membound_poll_fallback() {
    if !privileged::require("privileged_membound_poll_fallback") {
        return;
    }
    let node = new_node();
    let meshd = start_meshd(&node, &["--memory-bound-poll"]);
    let status = meshd.status().expect("status");
    assert_eq!(status["memory_bound"]["mode"], "poll", "{status:#}");
    node.record(Some("mb"));
    let on = node.run(&meshd, PORT + 10, "redirect, bound polled");
    show("redirect, bound polled", &on);
    drop(meshd);
    assert_eq!(on.switches, 1, "{on:?}");
    assert!(on.at_switch > 16 * MIB && on.fallback_bytes > 0, "{on:?}");
    // The poll's bound is the limit plus what the sender queues between a
    // poll's reading and the switch (rate × interval: 78–138 MiB measured
    // at 16 MiB), so only "it stops" is asserted: far below what the same
    // stalled reader queues with the bound off (the test's 1 GiB cap).
    assert!(
        on.receiver_r < 384 * MIB,
        "the receiver's memory kept growing after the switch: {on:?}"
    );
}
