//! Privileged tier: the shm-csi plugin as kubelet drives it — gRPC over its
//! unix socket, real tmpfs and bind mounts under a directory the test owns,
//! membership from a real meshd (and from the records when meshd is away).

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use spright_tests::{
    meshd::Meshd,
    privileged,
    sandbox::Sandbox,
    shm_csi::{Client, Code, MountDir, ShmCsi, Status, ephemeral_publish, mounts_under},
};

const T: Duration = Duration::from_mins(1);

fn code(r: Result<(), Status>) -> Code {
    match r {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn target(dir: &MountDir, name: &str) -> PathBuf {
    let parent = dir.path().join("pods").join(name);
    std::fs::create_dir_all(&parent).unwrap();
    parent.join("mount")
}

fn is_mounted(p: &Path) -> bool {
    mounts_under(p).iter().any(|m| m == p)
}

/// Publishes pod `pod` of namespace `ns` into `chain` as volume `vol`.
fn publish(
    c: &mut Client,
    dir: &MountDir,
    vol: &str,
    ns: &str,
    pod: &str,
    attrs: &[(&str, &str)],
) -> (Code, PathBuf) {
    let t = target(dir, vol);
    (
        code(c.publish(ephemeral_publish(vol, &t, ns, pod, "", attrs))),
        t,
    )
}

#[test]
fn privileged_shm_csi_regions() {
    if !privileged::require("privileged_shm_csi_regions") {
        return;
    }
    let mut sb = Sandbox::new("s").unwrap();
    let state = tempfile::tempdir().unwrap();
    for _ in 0..4 {
        sb.add_pod().unwrap();
    }
    sb.record_pod(state.path(), 0, Some("alpha")).unwrap();
    sb.record_pod(state.path(), 1, Some("alpha")).unwrap();
    sb.record_pod(state.path(), 2, Some("beta")).unwrap();
    // pod3 is in a chain also called "alpha", but in namespace "other".
    let mut r3 = sb.record_pod(state.path(), 3, Some("alpha")).unwrap();
    spright_endpoint::remove(state.path(), &r3.container_id, "eth0").unwrap();
    r3.pod.namespace = "other".into();
    spright_endpoint::write(state.path(), &r3).unwrap();
    let meshd = Meshd::start(&sb.placement(), state.path()).unwrap();
    meshd
        .wait_status(T, "four endpoints", |s| {
            s["endpoints"].as_array().is_some_and(|e| e.len() == 4)
        })
        .unwrap();

    let dir = MountDir::new().unwrap();
    let csi = ShmCsi::start(dir.path(), &meshd.addr, &["--max-size", "256Mi"]).unwrap();
    let mut c = csi.client().unwrap();
    assert_eq!(c.plugin_info().unwrap().name, "shm.spright.dev");
    assert_eq!(c.probe().unwrap(), Some(true));
    assert_eq!(c.node_info().unwrap().node_id, "test-node");
    assert_eq!(c.plugin_capabilities().unwrap(), 0);
    assert_eq!(c.node_capabilities().unwrap(), 0);

    // Two pods of one chain share memory.
    let (r, t0) = publish(
        &mut c,
        &dir,
        "v0",
        "default",
        "pod0",
        &[("chain", "alpha"), ("size", "16Mi")],
    );
    assert_eq!(r, Code::Ok, "{}", csi.log_text());
    let (r, t1) = publish(&mut c, &dir, "v1", "default", "pod1", &[("chain", "alpha")]);
    assert_eq!(r, Code::Ok);
    std::fs::write(t0.join("hello"), b"from pod0").unwrap();
    assert_eq!(std::fs::read(t1.join("hello")).unwrap(), b"from pod0");
    // mmap'd writes are seen too (the SDK's path).
    let pool0 = spright_shm::Pool::open(&t0).unwrap();
    let mut b = pool0.alloc(5).unwrap();
    b.copy_from_slice(b"zero!");
    let d = b.into_descriptor();
    let pool1 = spright_shm::Pool::open(&t1).unwrap();
    assert_eq!(&*pool1.take(d).unwrap(), b"zero!");
    drop((pool0, pool1));
    // The region grew to the larger request (default 64Mi > 16Mi).
    let vfs = nix::sys::statvfs::statvfs(&t1).unwrap();
    assert_eq!(vfs.blocks() * vfs.fragment_size(), 64 << 20);

    // Another chain, and the same chain name in another namespace: isolated.
    let (r, t2) = publish(&mut c, &dir, "v2", "default", "pod2", &[("chain", "beta")]);
    assert_eq!(r, Code::Ok);
    let (r, t3) = publish(&mut c, &dir, "v3", "other", "pod3", &[("chain", "alpha")]);
    assert_eq!(r, Code::Ok, "{}", csi.log_text());
    for t in [&t2, &t3] {
        assert!(
            !t.join("hello").exists(),
            "{} sees alpha's memory",
            t.display()
        );
    }
    std::fs::write(t3.join("x"), b"other").unwrap();
    assert!(!t0.join("x").exists());

    // Not a member (unknown pod; a member of another chain): PERMISSION_DENIED, nothing mounted.
    let before = dir.mounts();
    let (r, t) = publish(
        &mut c,
        &dir,
        "v4",
        "default",
        "intruder",
        &[("chain", "alpha")],
    );
    assert_eq!(r, Code::PermissionDenied);
    assert!(!t.exists());
    let (r, _) = publish(&mut c, &dir, "v5", "default", "pod2", &[("chain", "alpha")]);
    assert_eq!(r, Code::PermissionDenied);
    let (r, _) = publish(&mut c, &dir, "v5", "default", "pod3", &[("chain", "alpha")]);
    assert_eq!(
        r,
        Code::PermissionDenied,
        "pod3 is in other/alpha, not default/alpha"
    );

    // Traversal, bad sizes, bad requests: INVALID_ARGUMENT and no mount.
    for attrs in [
        vec![("chain", "../../etc")],
        vec![("chain", "alpha/../beta")],
        vec![("chain", "ALPHA")],
        vec![("chain", "alpha"), ("size", "64MB")],
        vec![("chain", "alpha"), ("size", "1.5Gi")],
        vec![("chain", "alpha"), ("size", "0")],
        vec![("chain", "alpha"), ("size", "512Mi")],
        vec![("chain", "alpha"), ("medium", "disk")],
        vec![("chain", "alpha"), ("colour", "blue")],
        vec![],
    ] {
        let (r, t) = publish(&mut c, &dir, "v6", "default", "pod0", &attrs);
        assert_eq!(r, Code::InvalidArgument, "{attrs:?}");
        assert!(!t.exists(), "{attrs:?}");
    }
    let (r, _) = publish(&mut c, &dir, "v6", "../x", "pod0", &[("chain", "alpha")]);
    assert_eq!(r, Code::InvalidArgument);
    let mut req = ephemeral_publish(
        "v6",
        &target(&dir, "v6"),
        "default",
        "pod0",
        "",
        &[("chain", "alpha")],
    );
    req.volume_capability = None;
    assert_eq!(code(c.publish(req)), Code::InvalidArgument);
    let mut req = ephemeral_publish(
        "",
        &target(&dir, "v6"),
        "default",
        "pod0",
        "",
        &[("chain", "alpha")],
    );
    assert_eq!(code(c.publish(req.clone())), Code::InvalidArgument);
    req.volume_id = "v6".into();
    req.target_path = String::new();
    assert_eq!(code(c.publish(req)), Code::InvalidArgument);
    assert_eq!(code(c.unpublish("", &t0)), Code::InvalidArgument);
    assert_eq!(
        code(c.unpublish("v0", Path::new(""))),
        Code::InvalidArgument
    );
    assert_eq!(
        dir.mounts(),
        before,
        "a rejected request changed the mounts"
    );

    // Hugepages: served where the node has them, a clear error otherwise.
    let huge = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Total:").map(|v| v.trim() != "0"))
        .unwrap_or(false);
    let (r, _) = publish(
        &mut c,
        &dir,
        "v7",
        "default",
        "pod2",
        &[("chain", "gamma"), ("medium", "hugepages")],
    );
    if huge {
        assert_ne!(r, Code::FailedPrecondition);
    } else {
        assert_eq!(r, Code::FailedPrecondition, "no huge pages here");
        assert!(
            csi.log_text().contains("hugepages"),
            "the error names hugepages"
        );
    }

    // Idempotency and conflicts (again after a restart, below).
    let repeat_and_conflict = |c: &mut _, when: &str| {
        let (r, _) = publish(
            c,
            &dir,
            "v0",
            "default",
            "pod0",
            &[("chain", "alpha"), ("size", "16Mi")],
        );
        assert_eq!(r, Code::Ok, "repeat with the same arguments {when}");
        let (r, _) = publish(
            c,
            &dir,
            "v0",
            "default",
            "pod0",
            &[("chain", "alpha"), ("size", "32Mi")],
        );
        assert_eq!(r, Code::AlreadyExists, "same volume, other size {when}");
    };
    repeat_and_conflict(&mut c, "before a restart");
    let mut req = ephemeral_publish("v9", &t0, "default", "pod1", "", &[("chain", "alpha")]);
    req.readonly = false;
    assert_eq!(
        code(c.publish(req)),
        Code::AlreadyExists,
        "target of another volume"
    );

    // Restart: a SIGKILLed plugin rediscovers volumes and users.
    drop(c);
    csi.kill();
    let csi = ShmCsi::start(dir.path(), &meshd.addr, &["--max-size", "256Mi"]).unwrap();
    let mut c = csi.client().unwrap();
    assert!(
        csi.log_text().contains("rediscovered state"),
        "{}",
        csi.log_text()
    );
    repeat_and_conflict(&mut c, "after a restart");

    // Unpublish: the region lives while a user is left, and is freed after the last.
    let region = csi.region_root.join("regions/default/alpha");
    assert!(is_mounted(&region));
    c.unpublish("v0", &t0).unwrap();
    assert!(
        !t0.exists(),
        "the SP deletes what it created at target_path"
    );
    assert!(is_mounted(&region), "pod1 still uses alpha");
    assert_eq!(std::fs::read(t1.join("hello")).unwrap(), b"from pod0");
    c.unpublish("v1", &t1).unwrap();
    assert!(!is_mounted(&region), "alpha freed after its last user");
    assert!(!region.exists());
    c.unpublish("v1", &t1).unwrap();
    c.unpublish("never-published", &dir.path().join("nowhere"))
        .unwrap();
    c.unpublish("v2", &t2).unwrap();
    c.unpublish("v3", &t3).unwrap();
    c.unpublish("v7", &target(&dir, "v7")).unwrap();
    assert_eq!(dir.mounts(), Vec::<PathBuf>::new(), "everything unmounted");
    drop(meshd);
}

/// A meshd stand-in that answers `/v1/membership` (always "member") only
/// when the test says so.
fn slow_meshd(pod: &'static str) -> (String, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (arrived_tx, arrived) = mpsc::channel();
    let (go, go_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        for _ in 0..4 {
            let Ok((mut s, _)) = l.accept() else { return };
            let mut req = [0u8; 2048];
            let _ = s.read(&mut req);
            let _ = arrived_tx.send(());
            if go_rx.recv_timeout(T).is_err() {
                return;
            }
            let body = format!(
                r#"{{"verdict":"member","source":"record","reason":"{pod} is recorded in alpha"}}"#
            );
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (addr, arrived, go)
}

#[test]
fn privileged_shm_csi_aborted_and_fallback() {
    if !privileged::require("privileged_shm_csi_aborted_and_fallback") {
        return;
    }
    let dir = MountDir::new().unwrap();
    let (addr, arrived, go) = slow_meshd("pod0");
    let csi = ShmCsi::start(&dir.path().join("a"), &addr, &[]).unwrap();
    let t = target(&dir, "v0");
    let req = ephemeral_publish("v0", &t, "default", "pod0", "", &[("chain", "alpha")]);
    let socket = csi.socket.clone();
    let first = std::thread::spawn(move || code(Client::connect(&socket).unwrap().publish(req)));
    arrived
        .recv_timeout(T)
        .expect("publish reached the membership check");
    // The first call is in flight: overlapping calls on the volume are ABORTED.
    let mut c = csi.client().unwrap();
    let again = ephemeral_publish("v0", &t, "default", "pod0", "", &[("chain", "alpha")]);
    assert_eq!(code(c.publish(again.clone())), Code::Aborted);
    assert_eq!(code(c.unpublish("v0", &t)), Code::Aborted);
    go.send(()).unwrap();
    assert_eq!(first.join().unwrap(), Code::Ok);
    assert!(is_mounted(&t));
    c.unpublish("v0", &t).unwrap();
    assert_eq!(dir.mounts(), Vec::<PathBuf>::new());
    drop(c);
    drop(csi);

    // meshd unreachable: UNAVAILABLE without a state dir; the records answer with one.
    let state = tempfile::tempdir().unwrap();
    let rec = spright_endpoint::Record {
        version: spright_endpoint::RECORD_VERSION,
        container_id: "c0".into(),
        ifname: "eth0".into(),
        netns: "/proc/self/ns/net".into(),
        network: "test".into(),
        ips: vec![],
        pod: spright_endpoint::PodRef {
            namespace: "default".into(),
            name: "pod0".into(),
            uid: "uid-0".into(),
        },
        chain: Some("alpha".into()),
        function: None,
        redirect: true,
        host_ifname: None,
        netns_cookie: None,
    };
    spright_endpoint::write(state.path(), &rec).unwrap();
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let csi = ShmCsi::start(&dir.path().join("b"), &closed, &[]).unwrap();
    let mut c = csi.client().unwrap();
    let (r, _) = publish(&mut c, &dir, "v1", "default", "pod0", &[("chain", "alpha")]);
    assert_eq!(r, Code::Unavailable);
    drop(c);
    drop(csi);
    let csi = ShmCsi::start(
        &dir.path().join("c"),
        &closed,
        &["--state-dir", state.path().to_str().unwrap()],
    )
    .unwrap();
    let mut c = csi.client().unwrap();
    let t = target(&dir, "v2");
    assert_eq!(
        code(c.publish(ephemeral_publish(
            "v2",
            &t,
            "default",
            "pod0",
            "uid-0",
            &[("chain", "alpha")]
        ))),
        Code::Ok
    );
    let t3 = target(&dir, "v3");
    assert_eq!(
        code(c.publish(ephemeral_publish(
            "v3",
            &t3,
            "default",
            "pod0",
            "uid-other",
            &[("chain", "alpha")]
        ))),
        Code::PermissionDenied,
        "a recreated pod with the same name is another pod"
    );
    c.unpublish("v2", &t).unwrap();
    assert_eq!(dir.mounts(), Vec::<PathBuf>::new());
}

fn record(state: &Path, pod: &str, chain: &str) {
    spright_endpoint::write(
        state,
        &spright_endpoint::Record {
            version: spright_endpoint::RECORD_VERSION,
            container_id: format!("c-{pod}"),
            ifname: "eth0".into(),
            netns: "/proc/self/ns/net".into(),
            network: "test".into(),
            ips: vec![],
            pod: spright_endpoint::PodRef {
                namespace: "default".into(),
                name: pod.into(),
                uid: String::new(),
            },
            chain: Some(chain.into()),
            function: None,
            redirect: true,
            host_ifname: None,
            netns_cookie: None,
        },
    )
    .unwrap();
}

#[test]
fn privileged_shm_csi_restart_without_state_and_readonly() {
    if !privileged::require("privileged_shm_csi_restart_without_state_and_readonly") {
        return;
    }
    let dir = MountDir::new().unwrap();
    let state = tempfile::tempdir().unwrap();
    record(state.path(), "pa", "delta");
    record(state.path(), "pb", "delta");
    let closed = "127.0.0.1:1";
    let flags = ["--state-dir", state.path().to_str().unwrap()];
    let csi_dir = dir.path().join("csi");
    let csi = ShmCsi::start(&csi_dir, closed, &flags).unwrap();
    let mut c = csi.client().unwrap();

    // Read-only publish: the pod can read the region but not write it.
    let (r, ta) = publish(&mut c, &dir, "va", "default", "pa", &[("chain", "delta")]);
    assert_eq!(r, Code::Ok);
    std::fs::write(ta.join("f"), b"rw").unwrap();
    let tb = target(&dir, "vb");
    let mut req = ephemeral_publish("vb", &tb, "default", "pb", "", &[("chain", "delta")]);
    req.readonly = true;
    assert_eq!(code(c.publish(req)), Code::Ok);
    assert_eq!(std::fs::read(tb.join("f")).unwrap(), b"rw");
    let e = std::fs::write(tb.join("g"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(nix::libc::EROFS), "{e}");

    // The plugin dies and its state file is lost: users still come from
    // mountinfo, so the region survives the first unpublish.
    drop(c);
    csi.kill();
    std::fs::remove_file(csi_dir.join("regions/state.json")).unwrap();
    // Meanwhile a region nobody uses was left behind (a crash between the
    // region mount and the bind): the restarted plugin frees it.
    let orphan = csi_dir.join("regions/regions/default/orphan");
    std::fs::create_dir_all(&orphan).unwrap();
    nix::mount::mount(
        Some("shm.spright.dev"),
        &orphan,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    let csi = ShmCsi::start(&csi_dir, closed, &flags).unwrap();
    assert!(!is_mounted(&orphan), "orphan region freed at start");
    assert!(!orphan.exists());
    let mut c = csi.client().unwrap();
    let region = csi.region_root.join("regions/default/delta");
    c.unpublish("va", &ta).unwrap();
    assert!(is_mounted(&region), "pb still maps delta");
    assert_eq!(std::fs::read(tb.join("f")).unwrap(), b"rw");
    c.unpublish("vb", &tb).unwrap();
    assert!(!is_mounted(&region));
    assert_eq!(dir.mounts(), Vec::<PathBuf>::new());
}
