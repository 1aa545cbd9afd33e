//! The runtime's CNI config files, read and changed the way install-cni
//! needs: which file the runtime uses, and spright's entry inserted into or
//! removed from its plugin list with every other value left as written.
//!
//! Values are kept as their original JSON text ([`RawValue`]): the primary
//! CNI's plugins, their key order, number spelling and whitespace survive an
//! insert and a removal byte for byte; only the document's outline (`{`,
//! member names, `plugins` brackets) is written by us.

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{
    Deserialize, Deserializer,
    de::{MapAccess, Visitor},
};
use serde_json::{Value, value::RawValue};
use spright_endpoint::{CAP_POD_ANNOTATIONS, CNI_TYPE, CNI_VERSION, CNI_VERSIONS};

/// File extensions the runtime loads from its conf dir (libcni's
/// `ConfFiles` as containerd and CRI-O call it). `.conflist` holds a plugin
/// list; `.conf` and `.json` hold a single plugin.
pub const EXTENSIONS: &[&str] = &["conflist", "conf", "json"];

/// Whether the runtime would load `name` from its conf dir. Hidden files
/// (our temporary files among them) never count.
pub fn is_config_name(name: &str) -> bool {
    !name.starts_with('.')
        && Path::new(name)
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e))
}

/// The settings spright-cni gets in its entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    pub cgroup: Option<PathBuf>,
    /// meshd's local API, whose readiness STATUS requires in primary mode.
    pub meshd_api: std::net::SocketAddr,
}

impl Entry {
    /// The entry chained after the primary CNI: it only records the pod
    /// (from prevResult) and needs the pod's annotations for its chain.
    pub fn chained(&self) -> Value {
        let mut v = self.common();
        v["mode"] = "chained".into();
        v
    }

    /// The entry of spright's own network (primary mode): bridge, IPAM on
    /// the node's `pod_cidrs` (one range per family), masquerade only for
    /// traffic leaving `cluster_cidrs` (the pod subnet itself is never
    /// masqueraded; without cluster CIDRs, everything else is).
    pub fn primary(&self, pod_cidrs: &[IpNet], cluster_cidrs: &[IpNet]) -> Value {
        let mut v = self.common();
        v["bridge"] = "spright0".into();
        v["hairpinMode"] = true.into();
        v["ipMasq"] = true.into();
        // spright is the node's network: the runtime's STATUS (CNI 1.1.0)
        // reports it not available until meshd is ready.
        v["meshdReadyz"] = self.meshd_api.to_string().into();
        if !cluster_cidrs.is_empty() {
            v["nonMasqueradeCIDRs"] = cluster_cidrs.iter().map(ToString::to_string).collect();
        }
        let ranges: Vec<Value> = pod_cidrs
            .iter()
            .map(|c| serde_json::json!([{ "subnet": c.to_string() }]))
            .collect();
        let mut routes = Vec::new();
        if pod_cidrs.iter().any(|c| c.addr().is_ipv4()) {
            routes.push(serde_json::json!({ "dst": "0.0.0.0/0" }));
        }
        if pod_cidrs.iter().any(|c| c.addr().is_ipv6()) {
            routes.push(serde_json::json!({ "dst": "::/0" }));
        }
        v["ipam"] = serde_json::json!({ "type": "host-local", "ranges": ranges, "routes": routes });
        v
    }

    fn common(&self) -> Value {
        let mut v = serde_json::json!({
            "type": CNI_TYPE,
            "stateDir": self.state_dir,
            "bpffs": self.bpffs,
            "capabilities": { CAP_POD_ANNOTATIONS: true },
        });
        if let Some(c) = &self.cgroup {
            v["cgroup"] = serde_json::json!(c);
        }
        v
    }
}

/// spright's own conflist (primary mode), at the newest CNI version so the
/// runtime calls STATUS and GC.
pub fn primary_conflist(entry: &Entry, pod_cidrs: &[IpNet], cluster_cidrs: &[IpNet]) -> String {
    let list = serde_json::json!({
        "cniVersion": CNI_VERSION,
        "name": "spright",
        "plugins": [entry.primary(pod_cidrs, cluster_cidrs)],
    });
    serde_json::to_string_pretty(&list).expect("JSON values serialise") + "\n"
}

/// What a config file needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: the file is as it should be.
    Keep,
    /// Write `text` to `path` atomically, then remove `replaces` (a
    /// single-plugin `.conf` turned into a `.conflist`).
    Write {
        path: PathBuf,
        text: String,
        replaces: Option<PathBuf>,
    },
}

/// Why a file cannot take spright's entry. The text is for the log; the
/// file is left alone.
#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("{path} is not a JSON object")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {why}")]
    Shape { path: PathBuf, why: String },
}

/// Inserts `entry` as the last plugin of the network in `path` (whose text
/// is `text`). A chained spright entry elsewhere in the list is moved to the
/// end; a list whose first plugin is spright-cni in its own mode (not
/// `"chained"`) is spright's own network (primary mode) and kept. A `.conf`/`.json` single plugin becomes a `.conflist` of the
/// same stem: the network's `cniVersion` and `name`, then the plugin's
/// original text, then spright.
pub fn insert(path: &Path, text: &str, entry: &Value) -> Result<Plan, ConfError> {
    let doc = Object::parse(path, text)?;
    let is_list = path.extension().is_some_and(|e| e == "conflist");
    let version = doc.string(path, "cniVersion")?;
    let version = version.as_deref().unwrap_or("");
    if !CNI_VERSIONS.contains(&version) {
        return Err(ConfError::Shape {
            path: path.into(),
            why: format!(
                "cniVersion {version:?} is not one spright-cni speaks ({}); not chaining spright into it",
                CNI_VERSIONS.join(", ")
            ),
        });
    }
    let entry_text = indent(
        &serde_json::to_string_pretty(entry).expect("JSON values serialise"),
        "    ",
    );
    if !is_list {
        if doc.string(path, "type")?.is_none_or(|t| t.is_empty()) {
            return Err(shape(path, "a single-plugin config without a \"type\""));
        }
        if doc.string(path, "type")?.as_deref() == Some(CNI_TYPE) {
            return Ok(Plan::Keep);
        }
        let mut list = Object::default();
        for key in ["cniVersion", "name"] {
            if let Some(v) = doc.get(key) {
                list.0.push((key.to_owned(), v.get().to_owned()));
            }
        }
        list.0.push((
            "plugins".to_owned(),
            plugins_text(&[text.trim(), &entry_text]),
        ));
        return Ok(Plan::Write {
            path: path.with_extension("conflist"),
            text: list.render(),
            replaces: Some(path.to_path_buf()),
        });
    }
    let plugins = doc.plugins(path)?;
    if plugins.first().is_some_and(Plugin::is_spright_network) {
        return Ok(Plan::Keep);
    }
    let already = plugins.last().is_some_and(Plugin::is_chained_spright)
        && plugins.iter().filter(|p| p.is_chained_spright()).count() == 1
        && serde_json::from_str::<Value>(plugins.last().expect("non-empty").raw.get()).ok()
            == Some(entry.clone());
    if already {
        return Ok(Plan::Keep);
    }
    let mut kept: Vec<&str> = plugins
        .iter()
        .filter(|p| !p.is_chained_spright())
        .map(|p| p.raw.get())
        .collect();
    kept.push(&entry_text);
    Ok(write_plugins(path, doc, &kept))
}

/// Removes spright's chained entries from the list in `path`; keeps
/// spright's own network entry and any file that is not a `.conflist`.
pub fn remove(path: &Path, text: &str) -> Result<Plan, ConfError> {
    if path.extension().is_none_or(|e| e != "conflist") {
        return Ok(Plan::Keep);
    }
    let doc = Object::parse(path, text)?;
    let plugins = doc.plugins(path)?;
    if !plugins.iter().any(Plugin::is_chained_spright) {
        return Ok(Plan::Keep);
    }
    let kept: Vec<&str> = plugins
        .iter()
        .filter(|p| !p.is_chained_spright())
        .map(|p| p.raw.get())
        .collect();
    Ok(write_plugins(path, doc, &kept))
}

/// Whether the list in `text` is spright's own network (its first plugin is
/// spright-cni, not chained): what primary mode wrote.
pub fn is_spright_network(path: &Path, text: &str) -> bool {
    Object::parse(path, text)
        .and_then(|doc| doc.plugins(path))
        .is_ok_and(|p| p.first().is_some_and(Plugin::is_spright_network))
}

fn write_plugins(path: &Path, mut doc: Object, plugins: &[&str]) -> Plan {
    let text = plugins_text(plugins);
    match doc.0.iter_mut().find(|(k, _)| k == "plugins") {
        Some(member) => member.1 = text,
        None => doc.0.push(("plugins".into(), text)),
    }
    Plan::Write {
        path: path.to_path_buf(),
        text: doc.render(),
        replaces: None,
    }
}

/// A `plugins` array of raw texts, one per line at the list's indentation.
fn plugins_text(plugins: &[&str]) -> String {
    format!("[\n    {}\n  ]", plugins.join(",\n    "))
}

/// Indents every line after the first (our own pretty JSON; a newline never
/// occurs inside a JSON string, so this changes only whitespace).
fn indent(text: &str, by: &str) -> String {
    text.replace('\n', &format!("\n{by}"))
}

fn shape(path: &Path, why: &str) -> ConfError {
    ConfError::Shape {
        path: path.into(),
        why: why.into(),
    }
}

/// One plugin of a list: its original text and its `type`.
struct Plugin {
    raw: Box<RawValue>,
    kind: Option<String>,
    mode: Option<String>,
}

impl Plugin {
    /// spright's entry after another CNI (what chained mode inserts).
    fn is_chained_spright(&self) -> bool {
        self.kind.as_deref() == Some(CNI_TYPE) && self.mode.as_deref() == Some("chained")
    }

    /// spright-cni doing the pod's networking itself (primary mode).
    fn is_spright_network(&self) -> bool {
        self.kind.as_deref() == Some(CNI_TYPE) && !self.is_chained_spright()
    }
}

/// A JSON object with its members in file order, each value as its text.
#[derive(Default)]
struct Object(Vec<(String, String)>);

impl Object {
    fn parse(path: &Path, text: &str) -> Result<Self, ConfError> {
        let members: Members = serde_json::from_str(text).map_err(|source| ConfError::Json {
            path: path.into(),
            source,
        })?;
        Ok(Self(
            members
                .0
                .into_iter()
                .map(|(k, v)| (k, v.get().to_owned()))
                .collect(),
        ))
    }

    fn get(&self, key: &str) -> Option<Box<RawValue>> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| RawValue::from_string(v.clone()).expect("kept from valid JSON"))
    }

    /// A string member; an error when present with another type.
    fn string(&self, path: &Path, key: &str) -> Result<Option<String>, ConfError> {
        self.get(key)
            .map(|v| {
                serde_json::from_str::<String>(v.get())
                    .map_err(|_| shape(path, &format!("\"{key}\" is not a string")))
            })
            .transpose()
    }

    fn plugins(&self, path: &Path) -> Result<Vec<Plugin>, ConfError> {
        let raw = self
            .get("plugins")
            .ok_or_else(|| shape(path, "a .conflist without \"plugins\""))?;
        let list: Vec<Box<RawValue>> = serde_json::from_str(raw.get())
            .map_err(|_| shape(path, "\"plugins\" is not a list"))?;
        if list.is_empty() {
            return Err(shape(path, "\"plugins\" is empty"));
        }
        list.into_iter()
            .map(|raw| {
                #[derive(Deserialize)]
                struct Typed {
                    #[serde(rename = "type")]
                    kind: Option<String>,
                    mode: Option<Value>,
                }
                let t: Typed = serde_json::from_str(raw.get())
                    .map_err(|_| shape(path, "a plugin is not an object with a string \"type\""))?;
                Ok(Plugin {
                    raw,
                    kind: t.kind,
                    mode: t.mode.and_then(|m| m.as_str().map(str::to_owned)),
                })
            })
            .collect()
    }

    /// The outline written by us, members in their original order.
    fn render(&self) -> String {
        let members: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| {
                format!(
                    "  {}: {v}",
                    serde_json::to_string(k).expect("strings serialise")
                )
            })
            .collect();
        format!("{{\n{}\n}}\n", members.join(",\n"))
    }
}

/// Deserialises an object's members in order, values unparsed.
struct Members(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    // A repeated member: the last one wins, as in Go's decoder.
                    out.retain(|(seen, _): &(String, Box<RawValue>)| *seen != k);
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            state_dir: "/var/lib/spright".into(),
            bpffs: "/sys/fs/bpf/spright".into(),
            cgroup: None,
            meshd_api: "127.0.0.1:9943".parse().unwrap(),
        }
    }

    /// Calico's conflist as calico-node writes it (placeholders filled);
    /// the privileged tests use the same files.
    const CALICO: &str = include_str!("testdata/10-calico.conflist");

    fn write_text(plan: Plan) -> (PathBuf, String, Option<PathBuf>) {
        match plan {
            Plan::Write {
                path,
                text,
                replaces,
            } => (path, text, replaces),
            Plan::Keep => panic!("expected a write"),
        }
    }

    fn plugin_texts(text: &str) -> Vec<String> {
        let doc = Object::parse(Path::new("x.conflist"), text).unwrap();
        doc.plugins(Path::new("x.conflist"))
            .unwrap()
            .into_iter()
            .map(|p| p.raw.get().to_owned())
            .collect()
    }

    #[test]
    fn inserts_last_keeping_every_other_value_as_written() {
        let path = Path::new("/n/10-calico.conflist");
        let e = entry().chained();
        let (at, text, replaces) = write_text(insert(path, CALICO, &e).unwrap());
        assert_eq!((at.as_path(), replaces), (path, None));
        let before = plugin_texts(CALICO);
        let after = plugin_texts(&text);
        assert_eq!(after.len(), 4);
        assert_eq!(
            after[..3],
            before[..],
            "the primary's plugins byte for byte"
        );
        let last: Value = serde_json::from_str(&after[3]).unwrap();
        assert_eq!(last, e);
        assert_eq!(last["capabilities"][CAP_POD_ANNOTATIONS], true);
        // The network keeps its name, version and member order.
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["name"], "k8s-pod-network");
        assert!(text.find("\"name\"").unwrap() < text.find("\"cniVersion\"").unwrap());
        // The same file, unchanged in layout: the primary's lines are all there.
        for line in CALICO.lines().filter(|l| !l.trim().is_empty()) {
            assert!(text.contains(line.trim_end()), "{line:?} lost:\n{text}");
        }
        // Idempotent.
        assert_eq!(insert(path, &text, &e).unwrap(), Plan::Keep);
        // Removal restores the original exactly (this file's layout is ours).
        let (_, restored, _) = write_text(remove(path, &text).unwrap());
        assert_eq!(restored, CALICO);
        assert_eq!(remove(path, &restored).unwrap(), Plan::Keep);
    }

    #[test]
    fn a_changed_or_misplaced_entry_is_rewritten_once() {
        let path = Path::new("/n/05-cilium.conflist");
        let cilium = r#"{"cniVersion":"0.3.1","name":"cilium","plugins":[{"type":"spright-cni","mode":"chained","bpffs":"/old"},{"type":"cilium-cni","enable-debug":false,"log-file":"/var/run/cilium/cilium-cni.log"}]}"#;
        let e = entry().chained();
        let (_, text, _) = write_text(insert(path, cilium, &e).unwrap());
        let after = plugin_texts(&text);
        assert_eq!(after.len(), 2);
        assert_eq!(
            after[0],
            r#"{"type":"cilium-cni","enable-debug":false,"log-file":"/var/run/cilium/cilium-cni.log"}"#
        );
        assert_eq!(serde_json::from_str::<Value>(&after[1]).unwrap(), e);
        assert_eq!(insert(path, &text, &e).unwrap(), Plan::Keep);
        // Other settings (a cgroup) rewrite the entry.
        let mut other = entry();
        other.cgroup = Some("/sys/fs/cgroup/kubepods.slice".into());
        let (_, text2, _) = write_text(insert(path, &text, &other.chained()).unwrap());
        assert_eq!(plugin_texts(&text2).len(), 2);
        assert!(text2.contains("kubepods.slice"));
    }

    #[test]
    fn numbers_and_key_order_survive() {
        let path = Path::new("/n/10-x.conflist");
        let odd = r#"{"plugins":[{"type":"x","z":1e3,"a":1.50,"big":123456789012345678901234567890}],"cniVersion":"1.0.0","name":"x"}"#;
        let (_, text, _) = write_text(insert(path, odd, &entry().chained()).unwrap());
        assert_eq!(
            plugin_texts(&text)[0],
            r#"{"type":"x","z":1e3,"a":1.50,"big":123456789012345678901234567890}"#
        );
        assert!(text.find("\"plugins\"").unwrap() < text.find("\"cniVersion\"").unwrap());
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist_of_the_same_stem() {
        let path = Path::new("/n/10-bridge.conf");
        let conf = r#"{
  "cniVersion": "1.0.0",
  "name": "bridge-net",
  "type": "bridge",
  "bridge": "cni0",
  "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}
}"#;
        let e = entry().chained();
        let (at, text, replaces) = write_text(insert(path, conf, &e).unwrap());
        assert_eq!(at, Path::new("/n/10-bridge.conflist"));
        assert_eq!(replaces.as_deref(), Some(path));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["name"], "bridge-net");
        assert_eq!(plugin_texts(&text)[0], conf);
        assert_eq!(v["plugins"][1], e);
        assert_eq!(insert(&at, &text, &e).unwrap(), Plan::Keep);
    }

    #[test]
    fn spright_as_the_primary_is_left_alone() {
        let path = Path::new("/n/10-spright.conflist");
        let cidrs = |s: &[&str]| -> Vec<IpNet> { s.iter().map(|c| c.parse().unwrap()).collect() };
        let own = primary_conflist(&entry(), &cidrs(&["10.244.1.0/24"]), &[]);
        assert!(is_spright_network(path, &own));
        assert_eq!(insert(path, &own, &entry().chained()).unwrap(), Plan::Keep);
        assert_eq!(remove(path, &own).unwrap(), Plan::Keep);
        let v: Value = serde_json::from_str(&own).unwrap();
        assert_eq!(v["cniVersion"], CNI_VERSION);
        assert_eq!(
            v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.1.0/24"
        );
        assert_eq!(v["plugins"][0]["capabilities"][CAP_POD_ANNOTATIONS], true);
        assert!(v["plugins"][0].get("nonMasqueradeCIDRs").is_none());
        assert_eq!(v["plugins"][0]["meshdReadyz"], "127.0.0.1:9943");
        assert!(entry().chained().get("meshdReadyz").is_none());
        let v6: Value = serde_json::from_str(&primary_conflist(
            &entry(),
            &cidrs(&["fd00:10:244:1::/64"]),
            &[],
        ))
        .unwrap();
        assert_eq!(v6["plugins"][0]["ipam"]["routes"][0]["dst"], "::/0");
        // Dual-stack: a range and a default route per family; the cluster's
        // CIDRs keep their source addresses.
        let dual: Value = serde_json::from_str(&primary_conflist(
            &entry(),
            &cidrs(&["10.244.1.0/24", "fd00:10:244:1::/64"]),
            &cidrs(&["10.244.0.0/16", "fd00:10:244::/56"]),
        ))
        .unwrap();
        let p = &dual["plugins"][0];
        assert_eq!(p["ipam"]["ranges"][1][0]["subnet"], "fd00:10:244:1::/64");
        assert_eq!(
            p["ipam"]["routes"],
            serde_json::json!([{ "dst": "0.0.0.0/0" }, { "dst": "::/0" }])
        );
        assert_eq!(
            p["nonMasqueradeCIDRs"],
            serde_json::json!(["10.244.0.0/16", "fd00:10:244::/56"])
        );
    }

    #[test]
    fn files_it_cannot_chain_into_are_errors_that_name_them() {
        let e = entry().chained();
        let cases = [
            ("/n/a.conflist", "{not json", "not a JSON object"),
            (
                "/n/a.conflist",
                r#"{"cniVersion":"1.0.0"}"#,
                "without \"plugins\"",
            ),
            (
                "/n/a.conflist",
                r#"{"cniVersion":"1.0.0","plugins":[]}"#,
                "empty",
            ),
            (
                "/n/a.conflist",
                r#"{"cniVersion":"0.2.0","plugins":[{"type":"x"}]}"#,
                "\"0.2.0\"",
            ),
            (
                "/n/a.conf",
                r#"{"cniVersion":"1.0.0"}"#,
                "without a \"type\"",
            ),
        ];
        for (path, text, why) in cases {
            let err = insert(Path::new(path), text, &e).unwrap_err().to_string();
            assert!(err.contains(path) && err.contains(why), "{err}");
        }
    }

    #[test]
    fn config_names_follow_libcni() {
        for ok in [
            "10-calico.conflist",
            "05-cilium.conflist",
            "87-podman.conf",
            "x.json",
        ] {
            assert!(is_config_name(ok), "{ok}");
        }
        for no in [
            ".10-calico.conflist.tmp",
            ".hidden.conflist",
            "calico-kubeconfig",
            "x.conflist.cilium_bak",
        ] {
            assert!(!is_config_name(no), "{no}");
        }
    }
}
