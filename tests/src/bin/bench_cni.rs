//! ADD+DEL latency per pod: spright-cni against the reference `bridge`
//! plugin (`/usr/lib/cni/bridge`), both with the same host-local IPAM, in one
//! run on one node namespace, alternating so drift hits both equally.
//!
//! `bench-cni [ITERATIONS]` (default 30, at most 500). Needs root; prints a
//! table of medians and the ratio. Not a test: it asserts nothing.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;
use spright_tests::cni::{self, Attach, Node};

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(Ok(30), |s| s.parse())
        .context("ITERATIONS")?
        .clamp(1, 500);
    // Ctrl-C unwinds, so the node and its pods are removed.
    spright_tests::procgroup::trap_interrupts()?;
    let mut node = Node::new("bn")?;
    let pod = node.add_pod()?;
    let spright_conf = node.conf("1.0.0", &["10.213.0.0/24"]);
    let mut reference_conf = json!({
        "cniVersion": "1.0.0", "name": "refnet", "type": "bridge", "bridge": "refbr0",
        "isGateway": true, "ipMasq": true, "hairpinMode": true, "mtu": 1400,
        "ipam": node.ipam(&["10.213.1.0/24"]),
    });
    reference_conf["ipam"]["dataDir"] = json!(node.dir.path().join("ipam-ref"));
    let spright_bin = cni::plugin_bin();
    let reference_bin = std::path::PathBuf::from("/usr/lib/cni/bridge");
    let node_ns = node.node.path();
    let mut results = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
    // One warm-up round each (bridge creation, datapath install).
    let plugins = [
        (&spright_bin, &spright_conf),
        (&reference_bin, &reference_conf),
    ];
    for i in 0..=n {
        spright_tests::procgroup::check_interrupted()?;
        // Which plugin goes first alternates from round to round.
        for k in spright_tests::stats::rotation(plugins.len(), i) {
            let (bin, conf) = plugins[k];
            let at = Attach {
                ..node.attach(pod, &format!("bench-{k}-{i}"))
            };
            let t = Instant::now();
            let add =
                cni::invoke_plugin(bin, &node_ns, "ADD", conf, Some(&at), &cni::plugin_path())?;
            let t_add = t.elapsed();
            if !add.ok {
                bail!("{} ADD failed: {add:?}", bin.display());
            }
            let mut del_conf = conf.clone();
            del_conf["prevResult"] = add.stdout.clone();
            let t = Instant::now();
            let del = cni::invoke_plugin(
                bin,
                &node_ns,
                "DEL",
                &del_conf,
                Some(&at),
                &cni::plugin_path(),
            )?;
            let t_del = t.elapsed();
            if !del.ok {
                bail!("{} DEL failed: {del:?}", bin.display());
            }
            if i > 0 {
                results[k].0.push(t_add);
                results[k].1.push(t_del);
            }
        }
    }
    let _ = node.node.ip(&["link", "del", "refbr0"]);
    // spright / reference ADD+DEL, round by round.
    let total = |k: usize| -> Vec<f64> {
        results[k]
            .0
            .iter()
            .zip(&results[k].1)
            .map(|(a, d)| (*a + *d).as_secs_f64())
            .collect()
    };
    let paired = spright_tests::stats::Spread::of(&spright_tests::stats::paired_ratios(
        &total(0),
        &total(1),
    ));
    let [(mut sa, mut sd), (mut ra, mut rd)] = results;
    let (sa, sd, ra, rd) = (
        median(&mut sa),
        median(&mut sd),
        median(&mut ra),
        median(&mut rd),
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "ADD+DEL latency per pod, {n} iterations, medians (ms), same node, same host-local IPAM"
    );
    println!(
        "{:<22} {:>9} {:>9} {:>9}",
        "plugin", "ADD", "DEL", "ADD+DEL"
    );
    println!(
        "{:<22} {:>9.2} {:>9.2} {:>9.2}",
        "spright-cni",
        ms(sa),
        ms(sd),
        ms(sa + sd)
    );
    println!(
        "{:<22} {:>9.2} {:>9.2} {:>9.2}",
        "reference bridge",
        ms(ra),
        ms(rd),
        ms(ra + rd)
    );
    println!(
        "{:<22} {:>9.2} {:>9.2} {:>9.2}",
        "ratio spright/ref",
        ms(sa) / ms(ra),
        ms(sd) / ms(rd),
        ms(sa + sd) / ms(ra + rd)
    );
    if let Some(p) = paired {
        println!(
            "paired ratios spright/ref ADD+DEL, round by round: median {:.2}, range {:.2}–{:.2}",
            p.median, p.min, p.max
        );
        if p.wider_than(spright_tests::stats::NOISY_SPREAD) {
            println!(
                "warning: noisy: the paired ratios spread wider than ±{:.0}% of their median",
                spright_tests::stats::NOISY_SPREAD * 100.0
            );
        }
    }
    let left = node.leftovers("sprnet")?;
    if !left.is_empty() {
        bail!("benchmark left state behind: {left:?}");
    }
    Ok(())
}
