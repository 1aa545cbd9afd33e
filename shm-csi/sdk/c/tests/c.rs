//! The C side of the ABI: the committed header is the generated one, it
//! compiles warning-free under gcc and clang, and tests/abi.c (every call,
//! every error) passes under AddressSanitizer and UBSan with both.
//!
//! A missing compiler skips its checks locally and fails them under
//! `CI=true` (`cargo xtask setup` installs gcc and clang).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

const COMPILERS: [&str; 2] = ["gcc", "clang"];
const WARNINGS: [&str; 5] = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"];

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>/deps, where this test runs from and where `cargo test`
/// builds the library (it copies it up to target/<profile> only on `cargo
/// build`).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().to_path_buf()
}

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

/// Whether `cc` runs; a missing one fails on CI.
fn have(cc: &str) -> bool {
    let ok = Command::new(cc)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || !on_ci(),
        "{cc} is missing on CI (cargo xtask setup installs it)"
    );
    if !ok {
        eprintln!("skipping {cc}: not installed (`cargo xtask setup` installs it)");
    }
    ok
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_committed_header_is_the_generated_one() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/spright_shm.h"));
    let committed = std::fs::read_to_string(crate_dir().join("include/spright_shm.h")).unwrap();
    assert!(
        committed == generated,
        "include/spright_shm.h is stale: build the crate outside CI (cargo build -p spright-shm-c) and commit it"
    );
}

#[test]
fn the_header_compiles_without_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("h.c");
    std::fs::write(
        &src,
        "#include \"spright_shm.h\"\nint main(void) { return spright_pool_version() == SPRIGHT_POOL_VERSION ? 0 : 1; }\n",
    )
    .unwrap();
    for cc in COMPILERS.into_iter().filter(|cc| have(cc)) {
        // The header alone, the README's example function and the demo
        // chain's C stage.
        for file in [
            src.clone(),
            crate_dir().join("examples/shout.c"),
            crate_dir().join("examples/chain_stage.c"),
        ] {
            run(Command::new(cc)
                .args(WARNINGS)
                .arg("-fsyntax-only")
                .arg("-I")
                .arg(crate_dir().join("include"))
                .arg(&file));
        }
    }
}

#[test]
fn every_call_and_every_error_under_sanitizers() {
    let lib = lib_dir().join("libspright_shm.a");
    assert!(lib.exists(), "{} not built", lib.display());
    for cc in COMPILERS.into_iter().filter(|cc| have(cc)) {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("abi");
        run(Command::new(cc)
            .args(WARNINGS)
            .args([
                "-g",
                "-fsanitize=address,undefined",
                "-fno-sanitize-recover=all",
            ])
            .arg("-I")
            .arg(crate_dir().join("include"))
            .arg(crate_dir().join("tests/abi.c"))
            .arg(&lib)
            .args(["-lpthread", "-ldl", "-lm", "-lgcc_s", "-lrt", "-lutil"])
            .arg("-o")
            .arg(&exe));
        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        run(Command::new(&exe)
            .arg(&scratch)
            .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
            .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1"));
    }
}

/// install.sh as a user runs it: into a prefix, then a function (the
/// example) built with nothing but `pkg-config --cflags --libs spright_shm`
/// and run against the installed library. Bad options are refused with
/// the usage, and nothing is installed without the built library.
#[test]
fn install_sh_gives_a_prefix_that_pkg_config_builds_against() {
    if !have("pkg-config") || !have("gcc") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("usr");
    let script = crate_dir().join("install.sh");
    let from = lib_dir();
    let install = |args: &[&std::ffi::OsStr]| Command::new(&script).args(args).output().unwrap();
    let out = install(&[
        "--prefix".as_ref(),
        prefix.as_os_str(),
        "--from".as_ref(),
        from.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    for f in [
        "include/spright_shm.h",
        "lib/libspright_shm.so",
        "lib/libspright_shm.a",
        "lib/pkgconfig/spright_shm.pc",
    ] {
        assert!(prefix.join(f).is_file(), "{f} not installed");
        assert!(
            listed.contains(&prefix.join(f).display().to_string()),
            "{listed}"
        );
    }
    let pc = Command::new("pkg-config")
        .args(["--cflags", "--libs", "spright_shm"])
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .output()
        .unwrap();
    assert!(
        pc.status.success(),
        "{}",
        String::from_utf8_lossy(&pc.stderr)
    );
    let flags = String::from_utf8_lossy(&pc.stdout).into_owned();
    assert!(
        flags.contains(&format!("-I{}", prefix.join("include").display())),
        "{flags}"
    );
    let exe = tmp.path().join("shout");
    run(Command::new("gcc")
        .args(WARNINGS)
        .arg(crate_dir().join("examples/shout.c"))
        .args(flags.split_whitespace())
        .arg("-o")
        .arg(&exe));
    // It runs on the installed library: no chain region here, so it says
    // why and stops.
    let ran = Command::new(&exe)
        .env("LD_LIBRARY_PATH", prefix.join("lib"))
        .output()
        .unwrap();
    assert_eq!(ran.status.code(), Some(1), "{ran:?}");
    assert!(!ran.stderr.is_empty(), "{ran:?}");

    // Refusals: a bad option, a relative prefix, no built library.
    let bad = install(&["--prefx".as_ref(), "/x".as_ref()]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown option --prefx"));
    let relative = install(&["--prefix".as_ref(), "usr".as_ref()]);
    assert_eq!(relative.status.code(), Some(2));
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let unbuilt = install(&[
        "--prefix".as_ref(),
        tmp.path().join("other").as_os_str(),
        "--from".as_ref(),
        empty.as_os_str(),
    ]);
    assert_eq!(unbuilt.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&unbuilt.stderr).contains("cargo build --release -p spright-shm-c")
    );
    assert!(
        !tmp.path().join("other").exists(),
        "nothing installed without the library"
    );
}
