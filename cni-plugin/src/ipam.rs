//! Delegated IPAM (SPEC.md "Delegated plugins"): the plugin named in
//! `ipam.type` is found on CNI_PATH and executed with the same environment
//! and the same config on stdin; its result or error is parsed here.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command as Process, Stdio},
};

use serde_json::Value;

use crate::{
    config::{Config, ENV_ARGS, ENV_COMMAND, ENV_CONTAINERID, ENV_IFNAME, ENV_NETNS},
    error::{Error, Result},
    version::{CniResult, Version},
};

/// A located IPAM plugin and the config it is handed.
#[derive(Debug)]
pub struct Ipam {
    pub plugin: String,
    pub path: PathBuf,
    stdin: Value,
}

impl Ipam {
    /// Locates the configured IPAM plugin on CNI_PATH.
    pub fn locate(config: &Config, cni_path: &str) -> Result<Self> {
        let plugin = config.ipam_type.clone().ok_or(Error::InvalidConfig {
            field: "ipam",
            why: "no IPAM plugin configured".into(),
        })?;
        let path = find_on_path(&plugin, cni_path).ok_or_else(|| Error::IpamNotFound {
            plugin: plugin.clone(),
            path: cni_path.to_owned(),
        })?;
        let mut stdin = config.input.clone();
        // Plugins of containernetworking/plugins up to v1.4 speak at most
        // 1.0.0; ADD/DEL/CHECK results of 1.1.0 are the 1.0.0 shape, so hand
        // them 1.0.0 and render our own result in the config's version.
        if config.version >= Version::V1_1_0 {
            stdin["cniVersion"] = Value::from("1.0.0");
        }
        Ok(Self {
            plugin,
            path,
            stdin,
        })
    }

    pub fn add(&self) -> Result<CniResult> {
        let out = self.exec("ADD", &self.stdin, &[])?;
        let value: Value = serde_json::from_slice(&out).map_err(|e| Error::IpamResult {
            plugin: self.plugin.clone(),
            why: format!("undecodable result: {e}"),
        })?;
        let result = CniResult::parse(&value).map_err(|e| Error::IpamResult {
            plugin: self.plugin.clone(),
            why: format!("undecodable result: {e}"),
        })?;
        if result.ips.is_empty() {
            return Err(Error::IpamResult {
                plugin: self.plugin.clone(),
                why: "no IPs".into(),
            });
        }
        Ok(result)
    }

    pub fn del(&self) -> Result<()> {
        self.exec("DEL", &self.stdin, &[]).map(drop)
    }

    /// DEL of another attachment than this invocation's (GC).
    pub fn del_for(&self, container_id: &str, ifname: &str) -> Result<()> {
        let env = [
            (ENV_CONTAINERID, container_id),
            (ENV_IFNAME, ifname),
            (ENV_NETNS, ""),
        ];
        self.exec("DEL", &self.stdin, &env).map(drop)
    }

    pub fn check(&self, prev: &Value) -> Result<()> {
        let mut stdin = self.stdin.clone();
        stdin["prevResult"] = prev.clone();
        self.exec("CHECK", &stdin, &[]).map(drop)
    }

    /// Delegated GC with the original (1.1.0) config.
    pub fn gc(&self, stdin: &Value) -> Result<()> {
        self.exec("GC", stdin, &[]).map(drop)
    }

    fn exec(&self, command: &str, stdin: &Value, env: &[(&str, &str)]) -> Result<Vec<u8>> {
        let exec_err = |op, detail: String| Error::IpamExec {
            plugin: self.plugin.clone(),
            op,
            detail,
        };
        let mut child = Process::new(&self.path);
        // CNI_ARGS may carry keys the IPAM plugin does not know (SPRIGHT_CHAIN);
        // plugins built on libcni reject those unless told to ignore them.
        if let Ok(args) = std::env::var(ENV_ARGS)
            && !args.split(';').any(|kv| {
                kv.eq_ignore_ascii_case("IgnoreUnknown=1")
                    || kv.eq_ignore_ascii_case("IgnoreUnknown=true")
            })
        {
            let args = if args.is_empty() {
                "IgnoreUnknown=1".to_owned()
            } else {
                format!("IgnoreUnknown=1;{args}")
            };
            child.env(ENV_ARGS, args);
        }
        let mut child = child
            .env(ENV_COMMAND, command)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| exec_err("start", e.to_string()))?;
        let body = serde_json::to_vec(stdin).expect("values always serialise");
        if let Some(mut s) = child.stdin.take() {
            s.write_all(&body)
                .map_err(|e| exec_err("read its config", e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| exec_err("finish", e.to_string()))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        match serde_json::from_slice::<Value>(&out.stdout) {
            Ok(v) if v.get("code").and_then(Value::as_u64).is_some() => Err(Error::IpamError {
                plugin: self.plugin.clone(),
                code: v["code"]
                    .as_u64()
                    .and_then(|c| u32::try_from(c).ok())
                    .unwrap_or(crate::error::code::IPAM),
                msg: v
                    .get("msg")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                details: v
                    .get("details")
                    .and_then(Value::as_str)
                    .map_or(stderr, str::to_owned),
            }),
            _ => Err(exec_err(
                "complete",
                format!(
                    "{} ({}; stderr: {stderr})",
                    String::from_utf8_lossy(&out.stdout).trim(),
                    out.status
                ),
            )),
        }
    }
}

/// Finds an executable `name` in the `:`-separated `cni_path`.
pub fn find_on_path(name: &str, cni_path: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    cni_path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
