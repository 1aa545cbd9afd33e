//! `spright-smoke`: runs the foundation's smoke scenario with progress output
//! (what `cargo xtask demo` shows until the chain demo lands). Needs root.

use std::process::ExitCode;

fn main() -> ExitCode {
    let bytes = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(64 << 20);
    if let Err(why) = spright_tests::privileged::check() {
        eprintln!("spright-smoke: cannot run here: {why}");
        return ExitCode::FAILURE;
    }
    let mut step = |line: &str| println!("  {line}");
    match spright_tests::scenario::smoke(bytes, &mut step) {
        Ok(r) => {
            let ok = r.chain.intact
                && r.chain.client_data_segs_out == 0
                && r.chain_client_counters.redirected_bytes >= bytes;
            println!();
            println!(
                "  {:<28} {:>12} {:>10} {:>14}",
                "path", "MiB/s", "intact", "TCP data segs"
            );
            for (name, t) in [
                ("chain A → B (redirected)", &r.chain),
                ("outsider C → B (TCP)", &r.outsider),
            ] {
                let mibps = t.bytes as f64 / 1_048_576.0 / (t.micros.max(1) as f64 / 1e6);
                println!(
                    "  {name:<28} {mibps:>12.0} {:>10} {:>14}",
                    t.intact,
                    t.client_data_segs_out + t.server_data_segs_out
                );
            }
            println!();
            if ok {
                println!("spright-smoke: OK: chain traffic went socket to socket");
                ExitCode::SUCCESS
            } else {
                println!("spright-smoke: FAILED: {r:#?}");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("spright-smoke: {e:#}");
            ExitCode::FAILURE
        }
    }
}
