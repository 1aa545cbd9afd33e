//! A chain across the three SDKs, one process each on loopback, one pool
//! file: a Rust client → a C stage (tests/stage.c, inverts the bytes) → a
//! Python stage (tests/stage.py, inverts them back) → a Rust stage (this
//! process, reverses them). Payloads of 64 B … 1 MiB arrive intact (hashes
//! compared at the last stage and at the client), and a Python stage that
//! raises mid-message leaks nothing once its process is gone.
//!
//! The Python stage runs under `$SPRIGHT_PYTHON`, an interpreter with the
//! `spright` package installed (`cargo xtask test unit` builds one in
//! target/python-venv). Without it the test is skipped, or fails under
//! `CI=true`; so is it without a C compiler.

use std::{
    hash::{DefaultHasher, Hasher},
    io::{BufRead, BufReader},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
};

use spright_shm::{Pool, event};

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

fn hash(b: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(b);
    h.finish()
}

/// Pseudo-random bytes (xorshift), never starting with `!`.
fn payload(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    if v.first() == Some(&b'!') {
        v[0] = b'?';
    }
    v
}

/// Kills the child when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a stage process and reads the first line it prints.
fn start_line(cmd: &mut Command) -> (Reaped, String) {
    let mut child = Reaped(
        cmd.stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}")),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().to_owned())
}

/// Starts a stage process and reads the port it prints.
fn start(cmd: &mut Command) -> (Reaped, String) {
    let (child, line) = start_line(cmd);
    let port: u16 = line
        .parse()
        .unwrap_or_else(|_| panic!("{cmd:?} printed {line:?}, not its port"));
    (child, format!("127.0.0.1:{port}"))
}

/// The python with `spright` installed (`SPRIGHT_PYTHON`) and the C
/// compiler (`CC`, default `cc`); `None` (skip) when either is missing,
/// which fails on CI.
fn tools() -> Option<(std::ffi::OsString, String)> {
    let Some(python) = std::env::var_os("SPRIGHT_PYTHON") else {
        assert!(
            !on_ci(),
            "SPRIGHT_PYTHON is not set on CI (cargo xtask test unit sets it)"
        );
        eprintln!("skipping: SPRIGHT_PYTHON (a python with spright installed) is not set");
        return None;
    };
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    if Command::new(&cc).arg("--version").output().is_err() {
        assert!(!on_ci(), "{cc} is missing on CI");
        eprintln!("skipping: no C compiler ({cc})");
        return None;
    }
    Some((python, cc))
}

/// Compiles the C stage `src` to `exe`, warning-free, statically linked
/// with the library `cargo test` built next to this test.
fn compile(cc: &str, src: &Path, exe: &Path) -> PathBuf {
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let out = Command::new(cc)
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("include"))
        .arg(src)
        .arg(deps.join("libspright_shm.a"))
        .args(["-lpthread", "-ldl", "-lm", "-lgcc_s", "-o"])
        .arg(exe)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe.to_owned()
}

/// Sends `data` into the chain and returns the answer (None: the chain closed).
fn round_trip(pool: &Pool, c: &mut TcpStream, data: &[u8]) -> Option<Vec<u8>> {
    let mut b = pool.alloc(data.len()).unwrap();
    b.copy_from_slice(data);
    spright_shm::send(c, b.into_descriptor()).unwrap();
    let d = spright_shm::recv(c).unwrap()?;
    Some(pool.take(d).unwrap().to_vec())
}

#[test]
fn rust_c_python_rust() {
    let Some((python, cc)) = tools() else {
        return;
    };
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();

    let c_stage = compile(&cc, &here.join("tests/stage.c"), &dir.path().join("stage"));

    let pool_path = dir.path().join(spright_shm::POOL_FILE);
    // 32 chunks of 4 MiB: room for every class the payloads use.
    let pool: &'static Pool = Box::leak(Box::new(
        Pool::open_file(&pool_path, (8 << 10) + (32 << 22)).unwrap(),
    ));

    // The last stage: Rust, in this process; it reports what it saw.
    let (seen_tx, seen) = mpsc::channel();
    let last = TcpListener::bind("127.0.0.1:0").unwrap();
    let last_addr = last.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        event::stage(pool, last, None, move |mut b| {
            seen_tx.send((b.len(), hash(&b))).unwrap();
            b.reverse();
            b
        })
    });
    let (mut py, py_addr) = start(
        Command::new(&python)
            .arg(here.join("tests/stage.py"))
            .arg(&pool_path)
            .arg(&last_addr)
            .stderr(Stdio::piped()),
    );
    let (mut c_child, c_addr) = start(Command::new(&c_stage).arg(&pool_path).arg(&py_addr));

    let mut client = TcpStream::connect(&c_addr).unwrap();
    for (i, n) in [64, 1000, 4096, 64 << 10, 300_000, 1 << 20]
        .into_iter()
        .enumerate()
    {
        let data = payload(n, 0x9e37_79b9_7f4a_7c15 + i as u64);
        let back = round_trip(pool, &mut client, &data).expect("an answer");
        assert_eq!(
            seen.recv().unwrap(),
            (n, hash(&data)),
            "the last stage got the payload intact"
        );
        let mut want = data.clone();
        want.reverse();
        assert_eq!(
            (back.len(), hash(&back)),
            (n, hash(&want)),
            "{n} bytes came back intact"
        );
    }
    let s = pool.stats();
    assert_eq!(s.free, s.carved, "nothing held between messages");

    // The Python stage raises mid-message: its process dies, the C stage
    // closes the connections that waited on it, and the pool is empty.
    let mut poison = payload(5000, 7);
    poison[0] = b'!';
    assert_eq!(round_trip(pool, &mut client, &poison), None);
    let status = py.0.wait().unwrap();
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(py.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("failed mid-message"), "{err}");
    let s = pool.stats();
    assert_eq!(s.free, s.carved, "the failed stage leaked nothing: {s:?}");
    assert!(
        c_child.0.try_wait().unwrap().is_none(),
        "the C stage outlives its next stage"
    );
    drop(client);
    c_child.0.kill().unwrap();
}

/// Starts a chain stage (`chain_stage.c` / `chain_stage.py`), which prints
/// `listening ADDR` as `spright-shm-chain` does.
fn start_chain_stage(cmd: &mut Command) -> (Reaped, String) {
    let (child, line) = start_line(cmd);
    let addr = line
        .strip_prefix("listening ")
        .unwrap_or_else(|| panic!("{cmd:?} printed {line:?}, not `listening ADDR`"))
        .to_owned();
    (child, addr)
}

/// The demo's C and Python chain stages (examples/chain_stage.c,
/// ../python/examples/chain_stage.py) do exactly the Rust stages' work on
/// the payload in place: `spright_shm::work::apply` (FNV-1a rounds, then
/// ASCII upper case; nothing with `--work 0`), as the last stage of a chain
/// (answering the sender), with bytes of every value and sizes up to the
/// largest class. Their usage errors are clear.
#[test]
fn chain_stages_do_the_rust_work() {
    let Some((python, cc)) = tools() else {
        return;
    };
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let c_stage = compile(
        &cc,
        &here.join("examples/chain_stage.c"),
        &dir.path().join("chain_stage"),
    );
    let py_stage = here.join("../python/examples/chain_stage.py");

    let pool_path = dir.path().join(spright_shm::POOL_FILE);
    let pool = Pool::open_file(&pool_path, (8 << 10) + (8 << 22)).unwrap();
    for work in [0_u32, 3] {
        let w = work.to_string();
        let common = [
            "--listen",
            "127.0.0.1:0",
            "--region",
            pool_path.to_str().unwrap(),
            "--work",
            &w,
        ];
        let c = start_chain_stage(Command::new(&c_stage).args(common));
        let py = start_chain_stage(Command::new(&python).arg(&py_stage).args(common));
        for (lang, (_child, addr)) in [("c", &c), ("python", &py)] {
            let mut conn = TcpStream::connect(addr).unwrap();
            for (i, n) in [64, 4096, 1 << 20].into_iter().enumerate() {
                // Every byte value, the lower-case letters among them.
                let mut data = payload(n, 0x51ed + i as u64);
                data[..26].copy_from_slice(b"the quick brown fox jumps ");
                let back = round_trip(&pool, &mut conn, &data).expect("an answer");
                let mut want = data.clone();
                spright_shm::work::apply(&mut want, work);
                assert!(
                    back == want,
                    "{lang} stage, --work {work}, {n} B: not spright_shm::work::apply's result"
                );
            }
        }
    }
    let s = pool.stats();
    assert_eq!(s.free, s.carved, "nothing held: {s:?}");

    // Usage errors name what is wrong, with the usage, and exit 2.
    for (args, want) in [
        (&["--listen", "127.0.0.1:0"][..], "--region is required"),
        (
            &["--region", "x", "--bogus", "1"][..],
            "unknown flag --bogus",
        ),
        (
            &["--listen", "127.0.0.1:0", "--region", "x", "--work", "-1"][..],
            "--work",
        ),
        (&["--listen"][..], "--listen"),
    ] {
        for (lang, cmd) in [
            ("c", Command::new(&c_stage).args(args).output()),
            (
                "python",
                Command::new(&python).arg(&py_stage).args(args).output(),
            ),
        ] {
            let out = cmd.unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{lang} {args:?}: {err}");
            assert!(
                err.contains(want) && err.contains("usage"),
                "{lang} {args:?}: {err}"
            );
        }
    }
}
