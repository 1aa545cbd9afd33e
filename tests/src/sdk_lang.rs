//! The languages of the SDK chain's functions (`spright-demo --sdk-langs`):
//! which program runs each position of the `spright-sdk` mode's chain.
//!
//! - `rust`: `spright-shm-chain gateway|stage` (shm-csi/sdk/src/bin/chain.rs);
//! - `c`: shm-csi/sdk/c/examples/chain_stage.c, compiled once per process
//!   with `$CC` (default `cc`) against the committed header and the built
//!   `libspright_shm.so` next to this process's binaries (rpath to it);
//! - `python`: shm-csi/sdk/python/examples/chain_stage.py under
//!   `$SPRIGHT_PYTHON`, a python with the `spright` package installed
//!   (`cargo xtask demo` and the test tiers set it to target/python-venv's).
//!
//! Every one of them does the same work ([`spright_shm::work::apply`]) with
//! the same command line as `spright-shm-chain stage` minus `--op`. The
//! gateway (position 0) exists only in Rust.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::sandbox::workspace_bin;

/// The language of one function of the SDK chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    #[default]
    Rust,
    C,
    Python,
}

impl Lang {
    pub const ALL: [Self; 3] = [Self::Rust, Self::C, Self::Python];

    pub fn name(self) -> &'static str {
        match self {
            Self::Rust => "rust",
            Self::C => "c",
            Self::Python => "python",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .with_context(|| format!("unknown SDK language {s:?}; languages: rust, c, python"))
    }

    /// A comma list (`rust,c,python`), position by position.
    pub fn parse_list(list: &str) -> anyhow::Result<Vec<Self>> {
        list.split(',').map(|l| Self::parse(l.trim())).collect()
    }
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Checks `langs` for a chain of `length` functions: at most one per
/// function, and Rust at position 0 (the gateway).
pub fn validate(langs: &[Lang], length: usize) -> anyhow::Result<()> {
    ensure!(
        langs.len() <= length,
        "--sdk-langs names {} functions, the chain has {length} (--length)",
        langs.len()
    );
    if let Some(&first) = langs.first() {
        ensure!(
            first == Lang::Rust,
            "--sdk-langs: position 0 is the gateway, which only the Rust SDK has (got {first}); \
             start the list with rust"
        );
    }
    Ok(())
}

/// The language of position `i` of `langs` (missing positions are Rust).
pub fn at(langs: &[Lang], i: usize) -> Lang {
    langs.get(i).copied().unwrap_or_default()
}

/// Every position's language, `rust,c,python,rust`.
pub fn describe(langs: &[Lang], length: usize) -> String {
    (0..length)
        .map(|i| at(langs, i).name())
        .collect::<Vec<_>>()
        .join(",")
}

/// The source tree (this crate is `<repo>/tests`).
fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The program and leading arguments of a function in `lang` at
/// `position`; the common flags (`--listen`, `--next`, `--region`,
/// `--work`) follow them.
pub fn program(lang: Lang, position: usize) -> anyhow::Result<Vec<String>> {
    let gateway = position == 0;
    ensure!(
        !gateway || lang == Lang::Rust,
        "the gateway (position 0) is Rust only, not {lang}"
    );
    Ok(match lang {
        Lang::Rust => {
            let bin = workspace_bin("spright-shm-chain").display().to_string();
            if gateway {
                vec![bin, "gateway".into()]
            } else {
                // The same work as `spright-fn` does, and no other transform.
                vec![bin, "stage".into(), "--op".into(), "none".into()]
            }
        }
        Lang::C => vec![c_stage()?.display().to_string()],
        Lang::Python => {
            let python = std::env::var("SPRIGHT_PYTHON").map_err(|_| {
                anyhow::anyhow!(
                    "a Python function needs SPRIGHT_PYTHON, a python with the spright package \
                     installed (cargo xtask demo sets it to target/python-venv/bin/python)"
                )
            })?;
            let script = repo().join("shm-csi/sdk/python/examples/chain_stage.py");
            ensure!(script.exists(), "{} is missing", script.display());
            vec![python, script.display().to_string()]
        }
    })
}

/// The C chain stage, compiled on first use in this process.
fn c_stage() -> anyhow::Result<PathBuf> {
    static EXE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    EXE.get_or_init(|| compile_c_stage().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn compile_c_stage() -> anyhow::Result<PathBuf> {
    // The binaries' directory, target/<profile>: the library is built there
    // (cargo build -p spright-shm-c --lib), and the stage goes next to it.
    let chain = workspace_bin("spright-shm-chain");
    let dir = chain
        .parent()
        .context("the binaries' directory")?
        .canonicalize()?;
    let lib = dir.join("libspright_shm.so");
    ensure!(
        lib.exists(),
        "{} is missing: build the C SDK with `cargo build{} -p spright-shm-c --lib` \
         (cargo xtask demo does when --sdk-langs names c)",
        lib.display(),
        if dir.ends_with("release") {
            " --release"
        } else {
            ""
        }
    );
    let src = repo().join("shm-csi/sdk/c/examples/chain_stage.c");
    let exe = dir.join("spright-chain-stage-c");
    // Compiled to a name of this process, then renamed over: a concurrent
    // run never executes a half-written file.
    let tmp = dir.join(format!(".spright-chain-stage-c.{}", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(repo().join("shm-csi/sdk/c/include"))
        .arg(&src)
        .arg("-L")
        .arg(&dir)
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .args(["-lspright_shm", "-o"])
        .arg(&tmp)
        .output()
        .with_context(|| format!("running {cc}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "{cc} {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::rename(&tmp, &exe)?;
    Ok(exe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_validate() {
        let l = Lang::parse_list("rust,c,python").unwrap();
        assert_eq!(l, [Lang::Rust, Lang::C, Lang::Python]);
        validate(&l, 4).unwrap();
        assert_eq!(describe(&l, 4), "rust,c,python,rust");
        assert_eq!(describe(&[], 2), "rust,rust");
        assert!(validate(&l, 2).is_err(), "more languages than functions");
        let e = validate(&[Lang::C], 4).unwrap_err().to_string();
        assert!(e.contains("gateway"), "{e}");
        assert!(Lang::parse_list("rust,go").is_err());
        assert!(program(Lang::Python, 0).is_err());
    }
}
