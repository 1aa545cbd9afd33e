//! What a pod process does first: join its cgroup (so the datapath sees its
//! sockets: a socket's cgroup is fixed at creation) and its network namespace.

use anyhow::Context as _;

/// Takes `--cgroup DIR` and `--netns PATH` out of `args` (wherever they are)
/// and enters both, in that order. Must run before any socket or thread is
/// created.
pub fn enter_from_args(args: &mut Vec<String>) -> anyhow::Result<()> {
    if let Some(dir) = take_opt(args, "--cgroup")? {
        std::fs::write(
            format!("{dir}/cgroup.procs"),
            std::process::id().to_string(),
        )
        .with_context(|| format!("joining cgroup {dir}"))?;
    }
    if let Some(path) = take_opt(args, "--netns")? {
        spright_endpoint::netns::join(std::path::Path::new(&path))?;
    }
    Ok(())
}

/// Removes `name VALUE` from `args` and returns the value.
pub fn take_opt(args: &mut Vec<String>, name: &str) -> anyhow::Result<Option<String>> {
    let Some(i) = args.iter().position(|a| a == name) else {
        return Ok(None);
    };
    anyhow::ensure!(i + 1 < args.len(), "{name} needs a value");
    let v = args.remove(i + 1);
    args.remove(i);
    Ok(Some(v))
}

/// Removes `name N` from `args` and returns N as a number, `default` when
/// absent.
pub fn take_num(args: &mut Vec<String>, name: &str, default: u64) -> anyhow::Result<u64> {
    take_opt(args, name)?.map_or(Ok(default), |v| {
        v.parse()
            .with_context(|| format!("{name}: {v:?} is not a number"))
    })
}
