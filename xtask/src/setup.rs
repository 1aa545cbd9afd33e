//! `cargo xtask setup`: bring a fresh Debian machine to what the build and the
//! test tiers need. Idempotent; prints one line when nothing is missing.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::cmd;

/// Debian packages, with why each is needed.
const PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "bpf-linker is built against Debian's LLVM 22 (the nightly's LLVM major)",
    ),
    ("libpolly-22-dev", "bpf-linker links LLVM's Polly"),
    (
        "iproute2",
        "namespaces, veths and ss in the privileged tests",
    ),
    ("iptables", "ipMasq and the simulated kube-proxy"),
    ("bpftool", "inspecting programs and maps"),
    (
        "containernetworking-plugins",
        "host-local IPAM and the reference bridge plugin",
    ),
    ("podman", "runtime end-to-end tests"),
    ("catatonit", "podman's init"),
    ("runc", "OCI runtime for podman and containerd"),
    ("busybox-static", "container rootfs for the runtime tests"),
    ("containerd", "CRI end-to-end tests"),
    (
        "protobuf-compiler",
        "k8s-cri's build script compiles the CRI proto (e2e_containerd)",
    ),
    (
        "musl-tools",
        "musl-gcc for the static spright-cni (runs on any host libc, or none)",
    ),
    ("wrk", "HTTP load for the demo and the chain benchmark"),
    (
        "haproxy",
        "the L4 sidecar of the chain benchmark's sidecar baseline",
    ),
    (
        "redis-server",
        "an unmodified server for `bench apps` (nothing starts it: no init system)",
    ),
    ("redis-tools", "redis-benchmark, the client of `bench apps`"),
    ("nginx-light", "an unmodified HTTP server for `bench apps`"),
    (
        "qemu-system-x86",
        "boots Debian's kernels for the kernel matrix (`cargo xtask test kernels`)",
    ),
    ("cpio", "packs the kernel matrix's initramfs"),
    (
        "xz-utils",
        "unpacks the xz-compressed kernel modules the kernel matrix loads (inet_diag, tcp_diag)",
    ),
    (
        "golang-go",
        "builds the zoo's unmodified Go programs (tests/go/zoo: an io.Copy proxy that splices) for privileged_zoo",
    ),
    (
        "fonts-dejavu-core",
        "DejaVu Sans, the font of the benchmark pictures (SVG layout, PNG)",
    ),
    (
        "zlib1g-dev",
        "zlib's crc32 for the C function of `bench shm --lang c` (the one Python's zlib runs)",
    ),
    (
        "clang",
        "the C SDK's header and ABI test build warning-free and run under ASan/UBSan with clang as well as gcc (shm-csi/sdk/c/tests/c.rs)",
    ),
    (
        "pkgconf",
        "pkg-config: the C SDK's install test builds a function with `pkg-config --cflags --libs spright_shm`",
    ),
    (
        "libclang-rt-14-dev",
        "clang's ASan/UBSan runtime for that test (clang only recommends it; setup installs without recommends)",
    ),
];

/// PyPI tools: (command, package, why). Installed with pip when the command
/// does not run.
const PYTHON_TOOLS: &[(&str, &str, &str)] = &[
    (
        "kubernetes-validate",
        "kubernetes-validate",
        "offline schema validation of manifests/ (e2e_manifests)",
    ),
    (
        "maturin",
        "maturin",
        "builds the Python SDK (shm-csi/sdk/python) in the unit tier",
    ),
    (
        "pytest",
        "pytest",
        "runs the Python SDK's tests in the unit tier",
    ),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_MAJOR: &str = "22";
const NIGHTLY: &str = "nightly";
/// The target of the static spright-cni that install-cni copies onto hosts.
pub(crate) const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";

pub(crate) fn run() -> anyhow::Result<()> {
    let t = Instant::now();
    let mut did = Vec::new();
    packages(&mut did)?;
    python_tools(&mut did)?;
    promtool(&mut did)?;
    nightly(&mut did)?;
    static_target(&mut did)?;
    bpf_linker(&mut did)?;
    bpffs(&mut did)?;
    if did.is_empty() {
        println!(
            "setup: everything present ({:.1}s)",
            t.elapsed().as_secs_f64()
        );
    } else {
        println!(
            "setup: {} in {:.0}s",
            did.join("; "),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn is_root() -> bool {
    output("id", &["-u"]).is_ok_and(|o| o.trim() == "0")
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn packages(did: &mut Vec<String>) -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| {
            output("dpkg-query", &["-W", "-f=${Status}", p])
                .map_or(true, |s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        let why: Vec<String> = PACKAGES
            .iter()
            .filter(|(p, _)| missing.contains(p))
            .map(|(p, w)| format!("  {p}: {w}"))
            .collect();
        bail!(
            "missing Debian packages (run as root to install them):\n{}",
            why.join("\n")
        );
    }
    println!("setup: installing {}", missing.join(" "));
    cmd("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    // Non-interactive, so CI never waits on a prompt.
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get install {} failed ({status})", missing.join(" "));
    }
    did.push(format!("installed {}", missing.join(" ")));
    Ok(())
}

/// promtool checks meshd's `/metrics` in the privileged tests. Debian ships it
/// only inside the `prometheus` package, whose maintainer scripts would start
/// a Prometheus server listening on every interface; so setup takes the one
/// binary out of the package instead of installing it.
fn promtool(did: &mut Vec<String>) -> anyhow::Result<()> {
    const AT: &str = "/usr/local/bin/promtool";
    if output("promtool", &["--version"]).is_ok() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "promtool is missing (run as root to extract it to {AT} from Debian's prometheus package)"
        );
    }
    let dir = std::env::temp_dir().join(format!("spright-promtool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = (|| -> anyhow::Result<()> {
        let download = |dir: &std::path::Path| {
            Command::new("apt-get")
                // Downloading as root into a directory _apt cannot write.
                .args([
                    "download",
                    "-qq",
                    "-o",
                    "APT::Sandbox::User=root",
                    "prometheus",
                ])
                .current_dir(dir)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !download(&dir) {
            cmd("apt-get", &["update", "-qq"])?;
            if !download(&dir) {
                bail!("`apt-get download prometheus` failed");
            }
        }
        let deb = std::fs::read_dir(&dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        let deb = deb.to_string_lossy().into_owned();
        let dir_s = dir.to_string_lossy().into_owned();
        cmd(
            "sh",
            &[
                "-c",
                "dpkg-deb --fsys-tarfile \"$1\" | tar -x -C \"$2\" ./usr/bin/promtool",
                "sh",
                &deb,
                &dir_s,
            ],
        )?;
        cmd(
            "install",
            &["-m", "0755", &format!("{dir_s}/usr/bin/promtool"), AT],
        )
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    did.push(format!("extracted promtool to {AT}"));
    Ok(())
}

fn python_tools(did: &mut Vec<String>) -> anyhow::Result<()> {
    let missing: Vec<&str> = PYTHON_TOOLS
        .iter()
        .filter(|(command, _, _)| output(command, &["--version"]).is_err())
        .map(|(_, package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: pip installing {}", missing.join(" "));
    let mut args = vec![
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ];
    args.extend(&missing);
    let status = Command::new("python3")
        .args(&args)
        .status()
        .context("running python3 -m pip (is python3-pip installed?)")?;
    if !status.success() {
        bail!("pip install {} failed ({status})", missing.join(" "));
    }
    did.push(format!("pip installed {}", missing.join(" ")));
    Ok(())
}

fn nightly(did: &mut Vec<String>) -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"]).context("rustup is required")?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        println!("setup: installing the {NIGHTLY} toolchain with rust-src");
        cmd(
            "rustup",
            &[
                "toolchain",
                "install",
                NIGHTLY,
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ],
        )?;
        did.push(format!("installed {NIGHTLY}"));
    }
    let installed = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", NIGHTLY],
    )?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: adding rust-src to {NIGHTLY}");
        cmd(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", NIGHTLY],
        )?;
        did.push("added rust-src".into());
    }
    let vv = output("rustup", &["run", NIGHTLY, "rustc", "-vV"])?;
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .unwrap_or("unknown");
    if llvm.split('.').next() != Some(LLVM_MAJOR) {
        bail!(
            "the {NIGHTLY} toolchain uses LLVM {llvm}, but bpf-linker is built against Debian's LLVM \
             {LLVM_MAJOR}; install a nightly whose LLVM major is {LLVM_MAJOR} (e.g. nightly-2026-05-19)"
        );
    }
    Ok(())
}

/// The musl standard library for the stable toolchain (the static plugin).
fn static_target(did: &mut Vec<String>) -> anyhow::Result<()> {
    let installed = output("rustup", &["target", "list", "--installed"])?;
    if installed.lines().any(|l| l.trim() == STATIC_TARGET) {
        return Ok(());
    }
    println!("setup: adding the {STATIC_TARGET} target (static spright-cni)");
    cmd("rustup", &["--quiet", "target", "add", STATIC_TARGET])?;
    did.push(format!("added {STATIC_TARGET}"));
    Ok(())
}

fn bpf_linker(did: &mut Vec<String>) -> anyhow::Result<()> {
    if output("bpf-linker", &["--version"]).is_ok_and(|v| v.contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about a minute)"
    );
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM_MAJOR}"),
        ])
        .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}"))
        .status()
        .context("running cargo install")?;
    if !status.success() {
        bail!("building bpf-linker failed ({status}); is llvm-{LLVM_MAJOR}-dev installed?");
    }
    did.push(format!("built bpf-linker {BPF_LINKER_VERSION}"));
    Ok(())
}

fn bpffs(did: &mut Vec<String>) -> anyhow::Result<()> {
    if !is_root() {
        return Ok(());
    }
    if output("stat", &["-f", "-c", "%T", "/sys/fs/bpf"]).is_ok_and(|t| t.trim() == "bpf_fs") {
        return Ok(());
    }
    cmd("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
    did.push("mounted bpffs at /sys/fs/bpf".into());
    Ok(())
}
