//! `cargo xtask test kernels`: meshd's self-test on every kernel of the
//! matrix — this machine's natively, and Debian's current kernels
//! (bookworm, trixie, sid) booted under qemu (TCG) with an initramfs that
//! carries busybox and meshd.
//!
//! On each kernel meshd installs its datapath in a cgroup and pin directory
//! of its own, checks that chain traffic is redirected (the programs load,
//! the verifier accepts them, sockops and sk_msg work), runs the blocking
//! `recv()` EAGAIN trials and probes each syscall family (`splice`: the
//! kernel alone, then with the splice guard), and says what it would
//! decide about redirects. The table goes to stdout and to
//! `target/kernels/matrix.md` (docs/KERNELS.md is a copy from a run).
//!
//! Then an unmodified Go program crosses the redirect path there: the zoo's
//! io.Copy proxy (tests/go/zoo) between its client and server on loopback,
//! made chain members by `spright-kmatrix` (tests/src/bin/kmatrix.rs), 20
//! rounds of 1000 B, 64 KiB and 1 MiB, once with the splice guard and once
//! with it standing aside (what the kernel alone does to such a program).
//!
//! The run fails when a kernel breaks the safety rule: redirects on by
//! default while a family is `unsafe`, or off while nothing is; or when the
//! Go proxy loses a byte where the splice family is `mitigated` or
//! `same-as-tcp`. A kernel whose programs do not load is reported, not
//! failed: meshd then keeps pods on plain TCP, which is safe.
//!
//! Kernel packages come from the Debian archive this machine's own apt
//! sources name (the same URIs, other suites, in a list of its own under
//! target/kernels; the machine's sources stay as they are).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// The Debian suites whose `linux-image-amd64` the matrix boots.
const SUITES: [&str; 3] = ["bookworm", "trixie", "sid"];
/// How long one kernel may take from boot to power-off under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_mins(12);
const BEGIN: &str = "SPRIGHT-BEGIN";
const END: &str = "SPRIGHT-END";

pub(crate) fn run(root: &Path) -> anyhow::Result<()> {
    let dir = root.join("target/kernels");
    std::fs::create_dir_all(&dir)?;
    let meshd = root.join("target/debug/meshd");
    let kmatrix = root.join("target/debug/spright-kmatrix");
    for bin in [&meshd, &kmatrix, &root.join(crate::GO_ZOO)] {
        anyhow::ensure!(bin.exists(), "{} is not built", bin.display());
    }
    let zoo = root.join(crate::GO_ZOO);
    let mut rows = vec![native(&meshd, &kmatrix, &zoo, &dir)?];
    let apt = Apt::new(&dir)?;
    let kernels = SUITES
        .iter()
        .map(|suite| apt.kernel(suite))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let initrd = initramfs(&[&meshd, &kmatrix, &zoo], &kernels, &dir)?;
    for (suite, vmlinuz) in SUITES.iter().zip(&kernels) {
        let t = Instant::now();
        println!(
            "kernels: booting {suite}'s {} under qemu (TCG)",
            vmlinuz.display()
        );
        let mut row = boot(vmlinuz, &initrd)?;
        row.label = format!("{suite} (qemu, {:.0} s)", t.elapsed().as_secs_f64());
        rows.push(row);
    }
    let table = markdown(&rows);
    println!("{table}");
    std::fs::write(dir.join("matrix.md"), &table)?;
    std::fs::write(
        dir.join("matrix.json"),
        serde_json::to_vec_pretty(&rows.iter().map(|r| &r.report).collect::<Vec<_>>())?,
    )?;
    let violations: Vec<String> = rows.iter().filter_map(Row::violation).collect();
    if !violations.is_empty() {
        bail!("the safety rule does not hold:\n{}", violations.join("\n"));
    }
    println!(
        "kernels: the safety rule holds on all {} kernels",
        rows.len()
    );
    Ok(())
}

/// One kernel's report.
struct Row {
    label: String,
    /// What `meshd --selftest-only` printed (Null when it did not run).
    report: Value,
    /// What `spright-kmatrix` printed with the guard, then without.
    go: [Value; 2],
    /// Why the report is missing.
    error: Option<String>,
}

/// Rounds the Go proxy got wrong (all of them when the run failed).
fn go_lost(v: &Value) -> Option<u64> {
    v["results"].as_array().map(|r| {
        r.iter()
            .map(|r| r["bad"].as_u64().unwrap_or(u64::MAX))
            .sum()
    })
}

fn go_cell(v: &Value) -> String {
    match go_lost(v) {
        None => "-".into(),
        Some(lost) => format!(
            "{lost} of 60 lost ({} redirected, {} splices refused)",
            v["redirected_msgs"], v["splice_refused"]
        ),
    }
}

impl Row {
    fn splice(&self) -> (&str, &str) {
        let f = self.report["selftest"]["families"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["name"] == "splice"));
        f.map_or(("-", ""), |f| {
            (
                f["verdict"].as_str().unwrap_or("-"),
                f["detail"].as_str().unwrap_or(""),
            )
        })
    }

    fn redirected(&self) -> u64 {
        self.report["selftest"]["redirected_msgs"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Redirects on by default exactly when no family is unsafe.
    fn violation(&self) -> Option<String> {
        if self.report.is_null() {
            return Some(format!(
                "{}: no report ({})",
                self.label,
                self.error.as_deref().unwrap_or("?")
            ));
        }
        let (splice, _) = self.splice();
        let redirect = self.report["redirects"]["redirect"] == true;
        if redirect == (splice == "unsafe") {
            return Some(format!(
                "{}: splice is {splice} but redirects are {}",
                self.label,
                if redirect { "on" } else { "off" }
            ));
        }
        let guarded = go_lost(&self.go[0]);
        ((splice == "mitigated" || splice == "same-as-tcp") && guarded != Some(0)).then(|| {
            format!(
                "{}: splice is {splice}, yet the Go proxy with the guard: {}",
                self.label, self.go[0]
            )
        })
    }
}

fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| kernel | programs load, chain traffic redirected | blocking recv EAGAIN | splice from a redirected socket | redirects by default | Go io.Copy proxy, guard on | Go io.Copy proxy, kernel alone | memory bound |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let st = &r.report["selftest"];
        let (splice, detail) = r.splice();
        let load = if r.redirected() > 0 {
            format!("yes ({} messages)", r.redirected())
        } else {
            format!(
                "**no**: {}",
                st["detail"]
                    .as_str()
                    .or(r.error.as_deref())
                    .unwrap_or("?")
                    .replace('\n', " ")
            )
        };
        let _ = writeln!(
            s,
            "| {} `{}` | {} | {} ({} of {}) | {}{} | {} | {} | {} | {} |",
            r.label,
            r.report["kernel"].as_str().unwrap_or("?"),
            load,
            st["verdict"].as_str().unwrap_or("-"),
            st["eagain_trials"],
            st["trials"],
            splice,
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            },
            if r.report["redirects"]["redirect"] == true {
                "on"
            } else {
                "**off**"
            },
            go_cell(&r.go[0]),
            go_cell(&r.go[1]),
            match st["rmem_charged"].as_bool() {
                Some(true) => "enforceable",
                Some(false) => "**not available** (redirected bytes not charged)",
                None => "not probed",
            },
        );
    }
    s
}

/// `spright-kmatrix` with the guard on, then off.
fn run_kmatrix(kmatrix: &Path, zoo: &Path) -> [Value; 2] {
    [&[][..], &["--no-guard"][..]].map(|extra| {
        Command::new(kmatrix)
            .arg(zoo)
            .args(extra)
            .stderr(Stdio::inherit())
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or(Value::Null)
    })
}

/// This machine's kernel, meshd run directly (bpffs mounted by setup).
fn native(meshd: &Path, kmatrix: &Path, zoo: &Path, dir: &Path) -> anyhow::Result<Row> {
    let state = dir.join("native-state");
    let pins = format!("/sys/fs/bpf/spright-kernels-{}", std::process::id());
    let out = Command::new(meshd)
        .args(["--selftest-only", "--kubernetes", "off", "--bpffs", &pins])
        .arg("--state-dir")
        .arg(&state)
        .env_remove("SPRIGHT_ACCEPT_UNSAFE_FAMILIES")
        .stderr(Stdio::inherit())
        .output()
        .context("running meshd --selftest-only")?;
    let _ = std::fs::remove_dir(&pins);
    let report: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("meshd --selftest-only printed no JSON ({})", out.status))?;
    Ok(Row {
        label: "this machine (native)".into(),
        report,
        go: run_kmatrix(kmatrix, zoo),
        error: None,
    })
}

/// apt with a sources list of its own: the machine's Debian URI, the
/// matrix's suites.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        let dir = dir.join("apt");
        std::fs::create_dir_all(dir.join("lists/partial"))?;
        std::fs::create_dir_all(dir.join("cache/archives/partial"))?;
        let sources = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
            .or_else(|_| std::fs::read_to_string("/etc/apt/sources.list"))
            .context("reading this machine's apt sources")?;
        let uris: Vec<&str> = sources
            .lines()
            .filter_map(|l| {
                l.strip_prefix("URIs:").map(str::trim).or_else(|| {
                    l.strip_prefix("deb ")
                        .and_then(|r| r.split_whitespace().next())
                })
            })
            .collect();
        let main = uris
            .iter()
            .find(|u| !u.contains("security"))
            .context("no Debian URI in this machine's apt sources")?;
        // Each suite with its updates and security suites: what a node of
        // that release runs once updated.
        let mut list = format!(
            "Types: deb\nURIs: {main}\nSuites: bookworm bookworm-updates trixie trixie-updates sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        );
        if let Some(security) = uris.iter().find(|u| u.contains("security")) {
            let _ = write!(
                list,
                "\nTypes: deb\nURIs: {security}\nSuites: bookworm-security trixie-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            );
        }
        std::fs::write(dir.join("matrix.sources"), list)?;
        let apt = Self { dir };
        apt.apt("apt-get", &["update", "-qq"], &apt.dir)?;
        Ok(apt)
    }

    fn apt(&self, program: &str, args: &[&str], cwd: &Path) -> anyhow::Result<String> {
        let d = self.dir.display();
        let opts = [
            "-o".to_owned(),
            "Dir::Etc::SourceList=/dev/null".to_owned(),
            "-o".to_owned(),
            format!("Dir::Etc::SourceParts={d}"),
            "-o".to_owned(),
            format!("Dir::State::Lists={d}/lists"),
            "-o".to_owned(),
            format!("Dir::Cache={d}/cache"),
            "-o".to_owned(),
            "APT::Sandbox::User=root".to_owned(),
        ];
        let out = Command::new(program)
            .args(&opts)
            .args(args)
            .current_dir(cwd)
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

    /// The newest version of `package` in `suite` or its `-updates` and
    /// `-security` suites (`apt-cache madison` lists the newest first).
    fn newest(&self, package: &str, suite: &str) -> anyhow::Result<String> {
        let madison = self.apt("apt-cache", &["madison", package], &self.dir)?;
        madison
            .lines()
            .find_map(|l| {
                let mut cols = l.split('|').map(str::trim);
                let (_, version, from) = (cols.next()?, cols.next()?, cols.next()?);
                let archive = from.split_whitespace().nth(1)?;
                let release = archive.split('/').next()?;
                (release == suite || release.starts_with(&format!("{suite}-")))
                    .then(|| version.to_owned())
            })
            .with_context(|| format!("no {package} in {suite}: {madison}"))
    }

    /// Downloads the newest `package` of `suite` (with its updates) into
    /// `dir` and unpacks it there; returns its Depends.
    fn fetch(&self, package: &str, suite: &str, dir: &Path) -> anyhow::Result<String> {
        std::fs::create_dir_all(dir)?;
        let version = self.newest(package, suite)?;
        self.apt(
            "apt-get",
            &["download", "-qq", &format!("{package}={version}")],
            dir,
        )?;
        let deb = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.extension().is_some_and(|e| e == "deb")
                    && p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
            .with_context(|| format!("apt-get download {package}={version} left no .deb"))?;
        crate::cmd(
            "dpkg",
            &[
                "-x",
                &deb.to_string_lossy(),
                &dir.join("root").to_string_lossy(),
            ],
        )?;
        let depends = Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg("Depends")
            .output()?;
        Ok(String::from_utf8_lossy(&depends.stdout).into_owned())
    }

    /// The kernel image of `suite`'s `linux-image-amd64` (cached).
    fn kernel(&self, suite: &str) -> anyhow::Result<PathBuf> {
        let dir = self.dir.parent().expect("under target/kernels").join(suite);
        let cached = dir.join("vmlinuz");
        if cached.exists() {
            return Ok(cached);
        }
        // The meta package names the versioned image package, which holds
        // the image and the modules (sid: its `linux-binary-*` and
        // `linux-modules-*` dependencies do).
        let root = dir.join("debs/root");
        let mut package = "linux-image-amd64".to_owned();
        let mut depends_seen = String::new();
        for _ in 0..3 {
            let depends = self.fetch(&package, suite, &dir.join("debs"))?;
            depends_seen.push_str(&depends);
            depends_seen.push(',');
            if let Some(v) = find_vmlinuz(&root) {
                if find_module(&root, MODULES[0]).is_none() {
                    let modules = depends_seen
                        .split(',')
                        .map(|d| d.split_whitespace().next().unwrap_or_default())
                        .find(|d| d.starts_with("linux-modules-"));
                    if let Some(m) = modules {
                        self.fetch(m, suite, &dir.join("debs"))?;
                    }
                }
                std::fs::copy(&v, &cached)?;
                return Ok(cached);
            }
            package = depends
                .split(',')
                .map(|d| d.split_whitespace().next().unwrap_or_default())
                .find(|d| d.starts_with("linux-image-") || d.starts_with("linux-binary-"))
                .with_context(|| {
                    format!("{package} ({suite}) depends on no kernel image: {depends}")
                })?
                .to_owned();
        }
        bail!("no vmlinuz in {suite}'s linux-image-amd64 and its dependencies")
    }
}

/// `<name>.ko` or `<name>.ko.xz` anywhere under `root`'s
/// `lib/modules` or `usr/lib/modules`.
fn find_module(root: &Path, name: &str) -> Option<PathBuf> {
    fn walk(dir: &Path, want: &[String], depth: u32) -> Option<PathBuf> {
        if depth > 8 {
            return None;
        }
        for entry in std::fs::read_dir(dir).ok()?.filter_map(Result::ok) {
            let path = entry.path();
            if path.is_dir() {
                if let Some(found) = walk(&path, want, depth + 1) {
                    return Some(found);
                }
            } else if path
                .file_name()
                .is_some_and(|n| want.iter().any(|w| *w == n.to_string_lossy()))
            {
                return Some(path);
            }
        }
        None
    }
    let want = [format!("{name}.ko"), format!("{name}.ko.xz")];
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .find_map(|d| walk(&root.join(d), &want, 0))
}

/// `boot/vmlinuz-*` or `usr/lib/modules/*/vmlinuz` under `root`.
fn find_vmlinuz(root: &Path) -> Option<PathBuf> {
    let in_dir = |d: PathBuf, pred: &dyn Fn(&str) -> bool| -> Option<PathBuf> {
        std::fs::read_dir(d)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| pred(&n.to_string_lossy())))
    };
    in_dir(root.join("boot"), &|n| n.starts_with("vmlinuz-")).or_else(|| {
        std::fs::read_dir(root.join("usr/lib/modules"))
            .ok()?
            .filter_map(Result::ok)
            .find_map(|m| in_dir(m.path(), &|n| n == "vmlinuz"))
    })
}

/// The init the VM runs: mounts what meshd needs (cgroup2, bpffs,
/// securityfs), runs its self-test, prints the JSON between markers and
/// powers off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /sys/fs/cgroup /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t securityfs securityfs /sys/kernel/security
ip link set lo up
for m in inet_diag tcp_diag; do insmod /lib/modules/$(uname -r)/$m.ko 2>/dev/null; done
echo "active LSMs: $(cat /sys/kernel/security/lsm)"
timeout 180 /bin/meshd --selftest-only --kubernetes off --bpffs /sys/fs/bpf/spright --state-dir /tmp/state >/tmp/report.json 2>/tmp/meshd.log
echo "meshd exit $?"; tail -5 /tmp/meshd.log
echo SPRIGHT-BEGIN; base64 /tmp/report.json; echo SPRIGHT-END
timeout 240 /bin/spright-kmatrix /bin/spright-zoo >/tmp/guard.json
echo SPRIGHT-GO-GUARD; base64 /tmp/guard.json; echo SPRIGHT-GO-END
timeout 240 /bin/spright-kmatrix /bin/spright-zoo --no-guard >/tmp/alone.json
echo SPRIGHT-GO-ALONE; base64 /tmp/alone.json; echo SPRIGHT-GO-END
poweroff -f
"#;

/// The sock_diag modules (Debian builds them as modules) meshd's
/// memory-bound probe and poll need, loaded by [`INIT`] for the running
/// kernel.
const MODULES: [&str; 2] = ["inet_diag", "tcp_diag"];

/// An uncompressed newc initramfs: busybox (static), the programs
/// (stripped, in /bin) and the shared libraries they link, [`INIT`], and
/// each kernel's [`MODULES`] (decompressed) under
/// `/lib/modules/<release>/`.
fn initramfs(programs: &[&Path], kernels: &[PathBuf], dir: &Path) -> anyhow::Result<PathBuf> {
    let stage = dir.join("initramfs");
    let _ = std::fs::remove_dir_all(&stage);
    for d in ["bin", "proc", "sys", "tmp", "dev"] {
        std::fs::create_dir_all(stage.join(d))?;
    }
    std::fs::copy("/bin/busybox", stage.join("bin/busybox"))
        .context("copying /bin/busybox (busybox-static)")?;
    for program in programs {
        let name = program.file_name().context("a program has a name")?;
        crate::cmd(
            "strip",
            &[
                "-o",
                &stage.join("bin").join(name).to_string_lossy(),
                &program.to_string_lossy(),
            ],
        )?;
        // A static program has no libraries (ldd says so and fails).
        let ldd = Command::new("ldd").arg(program).output()?;
        for lib in String::from_utf8_lossy(&ldd.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        {
            let to = stage.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(to.parent().expect("a library path has a parent"))?;
            std::fs::copy(lib, &to).with_context(|| format!("copying {lib}"))?;
        }
    }
    for vmlinuz in kernels {
        let root = vmlinuz.with_file_name("debs").join("root");
        for module in MODULES {
            let Some(found) = find_module(&root, module) else {
                continue;
            };
            let release = found
                .iter()
                .skip_while(|c| *c != "modules")
                .nth(1)
                .context("a module lies under lib/modules/<release>")?;
            let to = stage
                .join("lib/modules")
                .join(release)
                .join(format!("{module}.ko"));
            std::fs::create_dir_all(to.parent().expect("has a parent"))?;
            let unpacked = if found.extension().is_some_and(|e| e == "xz") {
                Command::new("xz").arg("-dc").arg(&found).output()?.stdout
            } else {
                std::fs::read(&found)?
            };
            std::fs::write(&to, unpacked)?;
        }
    }
    std::fs::write(stage.join("init"), INIT)?;
    crate::cmd("chmod", &["755", &stage.join("init").to_string_lossy()])?;
    let initrd = dir.join("initramfs.cpio");
    let status = Command::new("sh")
        .args(["-c", "find . | cpio -o -H newc --quiet > \"$1\"", "sh"])
        .arg(&initrd)
        .current_dir(&stage)
        .status()?;
    anyhow::ensure!(status.success(), "cpio failed ({status})");
    Ok(initrd)
}

/// The text between the lines `begin` and `end` of the console.
fn between(console: &str, begin: &str, end: &str) -> Option<String> {
    let (_, rest) = console.split_once(&format!("{begin}\n"))?;
    let (text, _) = rest.split_once(&format!("\n{end}"))?;
    Some(text.to_owned())
}

/// What busybox's `base64` wrote, decoded by the host's (empty when it is
/// not base64: the caller then reports unreadable JSON).
fn decode(b64: &str) -> String {
    let clean: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
    let Ok(mut child) = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    else {
        return String::new();
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = std::io::Write::write_all(&mut stdin, clean.as_bytes());
    }
    child
        .wait_with_output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Boots `vmlinuz` with the initramfs and reads meshd's report.
fn boot(vmlinuz: &Path, initrd: &Path) -> anyhow::Result<Row> {
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "2048",
            // One vCPU: under TCG with two, the live patching of the LSM
            // hook's trampoline raced a write() on the other vCPU once (an
            // int3 oops at bpf_lsm_file_permission, sid's 7.2): cross-CPU
            // code modification in the emulator, not seen with one.
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (qemu-system-x86)")?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if start.elapsed() > BOOT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        std::io::Read::read_to_string(&mut o, &mut out)?;
    }
    let console = out.replace('\r', "");
    let json = between(&console, BEGIN, END).map(|b64| decode(&b64));
    let (report, error) = match json.as_deref().map(serde_json::from_str::<Value>) {
        Some(Ok(v)) => (v, None),
        Some(Err(e)) => (Value::Null, Some(format!("unreadable report: {e}"))),
        None => (
            Value::Null,
            Some(match status {
                None => format!("no report within {BOOT_TIMEOUT:?}"),
                Some(s) => format!("no report (qemu {s})"),
            }),
        ),
    };
    let go = |marker: &str| {
        between(&console, marker, "SPRIGHT-GO-END")
            .and_then(|b64| serde_json::from_str(&decode(&b64)).ok())
            .unwrap_or(Value::Null)
    };
    let go = [go("SPRIGHT-GO-GUARD"), go("SPRIGHT-GO-ALONE")];
    if error.is_some() || go.iter().any(Value::is_null) {
        eprintln!("--- console of {} ---\n{console}", vmlinuz.display());
    }
    Ok(Row {
        label: String::new(),
        report,
        go,
        error,
    })
}
