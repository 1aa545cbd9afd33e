//! Builds the kernel programs from source (nightly, bpfel-unknown-none) and
//! leaves the object in OUT_DIR, where `src/lib.rs` embeds it.
//!
//! `cargo xtask setup` installs what this needs (nightly rust-src, bpf-linker).
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let programs_dir = std::path::Path::new(&manifest_dir).join("../programs");
    let programs_dir = programs_dir
        .to_str()
        .context("workspace path is not UTF-8")?;
    println!("cargo:rerun-if-changed=../common/src");
    // The nested cargo's progress lines would otherwise surface as one
    // `warning:` each in every build of the workspace; errors still show.
    // SAFETY: build scripts are single-threaded here; nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "spright-ebpf-programs",
            root_dir: programs_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF programs (run `cargo xtask setup` if the nightly toolchain, rust-src or bpf-linker is missing)")
}
