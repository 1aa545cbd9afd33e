//! The endpoint record: one JSON file per pod attachment, written by
//! `spright-cni` on ADD and removed on DEL, read by meshd (the source of truth
//! from which the kernel maps are reconciled after any crash or restart).
//!
//! Layout: `<state dir>/endpoints/<container id>_<ifname>.json`, written
//! atomically (temporary file, fsync, rename, fsync of the directory), so a
//! reader sees either no record or a whole one.

// The one unsafe block (SO_NETNS_COOKIE, which nix does not wrap) is
// allowed where it stands; every other module is safe code.
#![deny(unsafe_code)]

use std::{
    fs, io,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

pub use pod::{Annotated, PodInfo};
use serde::{Deserialize, Serialize};
use spright_common::{ENDPOINT_FLAG_NO_REDIRECT, EndpointValue, chain_id};

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod membership;
pub mod netns;
pub mod pod;
pub mod selftest;

/// Default state directory on a node.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/spright";
/// Sub-directory of the state directory holding Pod files (`kubectl get pod
/// -o json`) for nodes without an API server: meshd's `--pods-dir` default,
/// read by shm-csi too while meshd is unreachable.
pub const PODS_SUBDIR: &str = "pods";
/// Sub-directory of the state directory holding Service and EndpointSlice
/// files (`kubectl get service,endpointslice -o json`): meshd's
/// `--services-dir` default.
pub const SERVICES_SUBDIR: &str = "services";
/// Sub-directory of the state directory holding the records.
pub const ENDPOINTS_SUBDIR: &str = "endpoints";
/// File in the state directory where meshd publishes its start-up
/// self-test (`selftest::Report`), for spright-cni's STATUS.
pub const SELFTEST_FILE: &str = selftest::FILE;
/// spright-cni's lock file in the state directory: concurrent invocations
/// serialise on it; `spright uninstall` removes it.
pub const CNI_LOCK_FILE: &str = "spright-cni.lock";
/// Under the state directory: this node's pod CIDRs (one per line), which
/// meshd publishes from the Node object's `spec.podCIDRs` in primary mode and
/// install-cni writes into spright's conflist.
pub const POD_CIDRS_FILE: &str = "pod-cidrs";
/// Current record format version.
pub const RECORD_VERSION: u32 = 1;

/// Pod annotation that puts a pod into a chain (scoped by the pod's namespace).
pub const ANNOTATION_CHAIN: &str = "spright.dev/chain";
/// Pod annotation naming the function (a label in metrics and status).
pub const ANNOTATION_FUNCTION: &str = "spright.dev/function";
/// Pod annotation to opt out of the redirect (`"off"`).
pub const ANNOTATION_REDIRECT: &str = "spright.dev/redirect";
/// Pod annotation asking spright-webhook for the chain's shared-memory
/// volume: a size (`64Mi`, as shm-csi's `size` attribute) or `"true"` for
/// the node's default size.
pub const ANNOTATION_SHM: &str = "spright.dev/shm";
/// Pod annotation: where spright-webhook mounts the shared-memory volume
/// (an absolute path; [`DEFAULT_SHM_PATH`] when absent).
pub const ANNOTATION_SHM_PATH: &str = "spright.dev/shm-path";
/// Pod annotation: comma-separated init containers that also get the
/// shared-memory mount (every regular container always does).
pub const ANNOTATION_SHM_CONTAINERS: &str = "spright.dev/shm-containers";
/// Pod annotation: how spright-webhook co-locates a chain's pods
/// (`preferred`, the default; `required`; `none`).
pub const ANNOTATION_PLACEMENT: &str = "spright.dev/placement";
/// Pod label spright-webhook sets to the chain (selectors and affinity use it).
pub const LABEL_CHAIN: &str = "spright.dev/chain";
/// Where spright-webhook mounts the shared-memory volume by default.
pub const DEFAULT_SHM_PATH: &str = "/dev/shm/spright";
/// Pod annotation opting a chain pod in to the preload shim (`"true"`):
/// spright-webhook mounts the node's copy of `libspright_preload.so` into
/// every container and sets `LD_PRELOAD`, and meshd checks that the pod's
/// processes loaded it (docs/RELIABILITY.md, "Preload shim").
pub const ANNOTATION_PRELOAD: &str = "spright.dev/preload";
/// The preload shim's file name.
pub const PRELOAD_SHIM: &str = "libspright_preload.so";
/// Where meshd publishes the shim under its state directory (on the host:
/// `/var/lib/spright/preload/`), for spright-webhook's hostPath volume.
pub const PRELOAD_DIR: &str = "preload";
/// Where spright-webhook mounts that directory in a container.
pub const PRELOAD_MOUNT: &str = "/opt/spright/preload";
/// CNI spec versions spright-cni speaks, oldest first. install-cni chains
/// spright only into conflists of one of these versions.
pub const CNI_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest CNI spec version spright-cni speaks (what its own conflist
/// declares, so that runtimes call STATUS and GC).
pub const CNI_VERSION: &str = "1.1.0";
/// The plugin's `type` in a conflist (and its binary's name in the CNI bin dir).
pub const CNI_TYPE: &str = "spright-cni";
/// The capability under which containerd and CRI-O pass pod annotations
/// (in `runtimeConfig`) to plugins that declare it.
pub const CAP_POD_ANNOTATIONS: &str = "io.kubernetes.cri.pod-annotations";
/// CNI_ARGS key carrying the chain for runtimes that pass no annotations.
pub const CNI_ARG_CHAIN: &str = "SPRIGHT_CHAIN";
/// Namespace used when the runtime gives none (e.g. podman).
pub const DEFAULT_POD_NAMESPACE: &str = "default";

/// Errors reading or writing records. Messages name the operation and path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("malformed endpoint record {path}")]
    Malformed {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "endpoint record {path} has unsupported version {version} (this build reads {RECORD_VERSION})"
    )]
    Version { path: PathBuf, version: u32 },
    #[error("unusable Pod object {pod}")]
    Pod {
        pod: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

/// The pod an attachment belongs to (from CNI_ARGS `K8S_POD_*`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

/// One pod attachment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub version: u32,
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    /// Name of the CNI network (conflist `name`).
    #[serde(default)]
    pub network: String,
    pub ips: Vec<IpAddr>,
    pub pod: PodRef,
    /// Chain name, scoped by `pod.namespace`; `None` = not in a chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// `false` when the pod opted out of the redirect.
    #[serde(default = "yes")]
    pub redirect: bool,
    /// Host-side interface (bridge mode), for cleanup and status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ifname: Option<String>,
    /// Cookie of the pod's network namespace (`SO_NETNS_COOKIE`): how the
    /// connect-time Service translation recognises the calling pod. `None`
    /// when the kernel has no netns cookies (before 5.14).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
}

const fn yes() -> bool {
    true
}

impl Record {
    /// File name of the record: `<container id>_<ifname>.json`.
    #[must_use]
    pub fn file_name(container_id: &str, ifname: &str) -> String {
        format!("{container_id}_{ifname}.json")
    }

    /// The value this record puts into the kernel's endpoint map.
    #[must_use]
    pub fn endpoint_value(&self) -> EndpointValue {
        EndpointValue {
            chain_id: self
                .chain
                .as_deref()
                .map_or(0, |c| chain_id(&self.pod.namespace, c)),
            flags: if self.redirect {
                0
            } else {
                ENDPOINT_FLAG_NO_REDIRECT
            },
            reserved: 0,
        }
    }
}

#[expect(
    unsafe_code,
    reason = "getsockopt(SO_NETNS_COOKIE): nix has no wrapper for this option"
)]
/// The cookie of the network namespace at `netns`, as `bpf_get_netns_cookie`
/// reports it in the kernel programs (read from a socket created inside it).
pub fn netns_cookie(netns: &Path) -> io::Result<u64> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    netns::run_in(netns, || {
        // SAFETY: plain syscalls on a descriptor this closure owns.
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let sock = OwnedFd::from_raw_fd(fd);
            let mut cookie = 0u64;
            let mut len = libc::socklen_t::try_from(size_of::<u64>()).expect("8 fits a socklen_t");
            if libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &raw mut len,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(cookie)
        }
    })
}

/// Checks a chain name: a DNS-1123 label (lowercase alphanumerics and '-',
/// starting and ending alphanumeric, at most 63 characters). This also rules
/// out path traversal wherever the name is used in a path.
pub fn validate_chain(name: &str) -> Result<(), Error> {
    let invalid = |why| {
        Err(Error::Invalid {
            what: "chain name",
            value: name.to_owned(),
            why,
        })
    };
    if name.is_empty() || name.len() > 63 {
        return invalid("must be 1 to 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return invalid("only lowercase letters, digits and '-' are allowed (DNS-1123 label)");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return invalid("must start and end with a letter or digit (DNS-1123 label)");
    }
    Ok(())
}

/// The records directory under a state directory.
#[must_use]
pub fn records_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(ENDPOINTS_SUBDIR)
}

/// Writes `record` atomically; returns its path.
pub fn write(state_dir: &Path, record: &Record) -> Result<PathBuf, Error> {
    let dir = records_dir(state_dir);
    fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
    let path = dir.join(Record::file_name(&record.container_id, &record.ifname));
    let body = serde_json::to_vec_pretty(record).expect("records always serialise");
    write_atomic(&path, &body, 0o644).map_err(io_err("write", &path))?;
    Ok(path)
}

/// Replaces `path` with `body` so that a reader sees the old or the new
/// file, never a part: a temporary file `.<name>.tmp` in the same directory
/// (a name no reader of records, CNI configs or plugins looks at), synced,
/// given `mode`, renamed over `path`; then the directory is synced.
pub fn write_atomic(path: &Path, body: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let written = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    fs::File::open(dir).and_then(|d| d.sync_all())
}

/// A file (or an object in one) that could not be used: (path, why).
pub type Problem = (String, String);

/// Every `*.json` file of `dir`, by name, parsed as JSON, as (path, value);
/// a missing directory has none. Files that cannot be read or parsed come
/// back as (path, why), never as an error: the directories spright reads
/// (Pod and Service files) are written by hand or by other tools.
pub fn read_json_dir(dir: &Path) -> (Vec<(String, serde_json::Value)>, Vec<Problem>) {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return (vec![], vec![]),
        Err(e) => {
            let why = format!("cannot read the directory: {e}");
            return (vec![], vec![(dir.display().to_string(), why)]);
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        let shown = path.display().to_string();
        match fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(v) => objects.push((shown, v)),
            Err(e) => problems.push((shown, e)),
        }
    }
    (objects, problems)
}

/// An error with its sources, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    use std::fmt::Write as _;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let _ = write!(s, ": {c}");
        src = c.source();
    }
    s
}

/// Reads one record.
pub fn read(path: &Path) -> Result<Record, Error> {
    let body = fs::read(path).map_err(io_err("read", path))?;
    let record: Record = serde_json::from_slice(&body).map_err(|source| Error::Malformed {
        path: path.to_path_buf(),
        source,
    })?;
    if record.version != RECORD_VERSION {
        return Err(Error::Version {
            path: path.to_path_buf(),
            version: record.version,
        });
    }
    Ok(record)
}

/// Reads the record of one attachment, if there is one.
pub fn find(state_dir: &Path, container_id: &str, ifname: &str) -> Result<Option<Record>, Error> {
    let path = records_dir(state_dir).join(Record::file_name(container_id, ifname));
    match read(&path) {
        Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
        other => other.map(Some),
    }
}

/// Removes the record of one attachment; succeeds when it is already gone.
pub fn remove(state_dir: &Path, container_id: &str, ifname: &str) -> Result<(), Error> {
    let path = records_dir(state_dir).join(Record::file_name(container_id, ifname));
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
        _ => Ok(()),
    }
}

/// One entry of [`list`]: a record's path and what reading it gave.
pub type Listed = (PathBuf, Result<Record, Error>);

/// Every record in the state directory, each with its path; a malformed record
/// is returned as an error entry (callers log and skip it), never fatal.
pub fn list(state_dir: &Path) -> Result<Vec<Listed>, Error> {
    let dir = records_dir(state_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", &dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list", &dir))?;
        let path = entry.path();
        let is_record = path.extension().is_some_and(|e| e == "json")
            && !entry.file_name().to_string_lossy().starts_with('.');
        if is_record {
            let r = read(&path);
            out.push((path, r));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { op, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, chain: Option<&str>) -> Record {
        Record {
            version: RECORD_VERSION,
            container_id: id.into(),
            ifname: "eth0".into(),
            netns: "/var/run/netns/x".into(),
            network: "spright".into(),
            ips: vec!["10.244.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            pod: PodRef {
                namespace: "shop".into(),
                name: "gw".into(),
                uid: "u1".into(),
            },
            chain: chain.map(Into::into),
            function: None,
            redirect: true,
            host_ifname: Some("veth1234".into()),
            netns_cookie: Some(4097),
        }
    }

    #[test]
    fn netns_cookie_of_a_missing_namespace_is_not_found() {
        let e = netns_cookie(Path::new("/var/run/netns/spright-no-such-ns")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn write_read_list_remove_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let r = record("abc", Some("checkout"));
        let path = write(dir.path(), &r).unwrap();
        assert!(path.ends_with("endpoints/abc_eth0.json"));
        assert_eq!(read(&path).unwrap(), r);
        assert_eq!(find(dir.path(), "abc", "eth0").unwrap(), Some(r.clone()));
        assert_eq!(find(dir.path(), "abc", "eth1").unwrap(), None);
        write(dir.path(), &record("def", None)).unwrap();
        let all = list(dir.path()).unwrap();
        assert_eq!(all.len(), 2);
        remove(dir.path(), "abc", "eth0").unwrap();
        remove(dir.path(), "abc", "eth0").unwrap(); // idempotent
        assert_eq!(list(dir.path()).unwrap().len(), 1);
    }

    #[test]
    fn malformed_records_are_listed_as_errors_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &record("good", None)).unwrap();
        fs::write(records_dir(dir.path()).join("bad_eth0.json"), b"{not json").unwrap();
        fs::write(records_dir(dir.path()).join(".partial.json.tmp"), b"{").unwrap();
        let all = list(dir.path()).unwrap();
        assert_eq!(all.len(), 2);
        let bad = all
            .iter()
            .find(|(p, _)| p.ends_with("bad_eth0.json"))
            .unwrap();
        assert!(matches!(bad.1, Err(Error::Malformed { .. })));
        let msg = bad.1.as_ref().unwrap_err().to_string();
        assert!(msg.contains("bad_eth0.json"), "{msg}");
    }

    #[test]
    fn chains_are_scoped_by_namespace_and_opt_out_sets_the_flag() {
        let a = record("a", Some("checkout"));
        let mut b = record("b", Some("checkout"));
        assert_eq!(a.endpoint_value().chain_id, b.endpoint_value().chain_id);
        b.pod.namespace = "other".into();
        assert_ne!(a.endpoint_value().chain_id, b.endpoint_value().chain_id);
        assert_eq!(record("c", None).endpoint_value().chain_id, 0);
        let mut off = record("d", Some("checkout"));
        off.redirect = false;
        assert!(off.endpoint_value().opted_out());
    }

    #[test]
    fn chain_names_are_dns_labels() {
        for ok in ["a", "checkout", "chain-1", &"x".repeat(63)] {
            validate_chain(ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "../etc",
            "a/b",
            "a.b",
            &"x".repeat(64),
        ] {
            assert!(validate_chain(bad).is_err(), "{bad:?} accepted");
        }
    }
}
