//! `ipMasq`: one MASQUERADE rule per pod address for traffic leaving the pod
//! subnet, in the namespace the plugin runs in (the node's). Rules carry a
//! comment naming the network and container, which is how DEL and GC find
//! them again without any other state.

use std::{path::Path, process::Command as Process};

use ipnet::IpNet;

use crate::error::{Error, Result};

fn tool(net: &IpNet) -> &'static str {
    if net.addr().is_ipv4() {
        "iptables"
    } else {
        "ip6tables"
    }
}

/// What every comment of spright-cni's rules starts with.
pub const COMMENT_PREFIX: &str = "spright-cni:";

/// The comment marking rules of one attachment.
pub fn comment(network: &str, container_id: &str) -> String {
    let mut c = format!("{COMMENT_PREFIX}{network}:{container_id}");
    c.retain(|ch| ch.is_ascii_graphic() && ch != '"');
    c.truncate(255);
    c
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    run_in(None, program, args)
}

/// Runs `program` from the host whose root is `root` (`chroot ROOT program`,
/// for a container that mounts the host's root), or from `PATH`.
fn run_in(root: Option<&Path>, program: &str, args: &[&str]) -> Result<String> {
    let mut cmd = match root {
        Some(root) => {
            let mut c = Process::new("chroot");
            c.arg(root).arg(program);
            c
        }
        None => Process::new(program),
    };
    let out = cmd.args(args).output().map_err(|e| Error::Iptables {
        command: format!("{program} {}", args.join(" ")),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(Error::Iptables {
            command: format!("{program} {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Masquerades traffic from `pod` (an address with its subnet) to anything
/// outside the subnet and outside `except` (the cluster's pod CIDRs, so a pod
/// on another node sees the real source): one RETURN rule per exception of
/// the pod's family, then the MASQUERADE rule, all with `comment`.
pub fn add(pod: &IpNet, except: &[IpNet], comment: &str) -> Result<()> {
    for rule in rules_for(pod, except, comment) {
        let args: Vec<&str> = rule.iter().map(String::as_str).collect();
        run(tool(pod), &args)?;
    }
    Ok(())
}

/// The argument lists of [`add`], in order.
fn rules_for(pod: &IpNet, except: &[IpNet], comment: &str) -> Vec<Vec<String>> {
    let src = IpNet::new(pod.addr(), pod.max_prefix_len())
        .expect("host prefix")
        .to_string();
    let subnet = pod.trunc();
    let rule = |dst: &[&str], target: &str| {
        let mut r: Vec<String> = ["-w", "-t", "nat", "-A", "POSTROUTING", "-s", &src]
            .into_iter()
            .map(str::to_owned)
            .collect();
        r.extend(dst.iter().map(|s| (*s).to_owned()));
        r.extend(
            ["-m", "comment", "--comment", comment, "-j", target]
                .into_iter()
                .map(str::to_owned),
        );
        r
    };
    let mut rules: Vec<Vec<String>> = except
        .iter()
        .map(IpNet::trunc)
        .filter(|e| e.addr().is_ipv4() == pod.addr().is_ipv4() && !subnet.contains(e))
        .map(|e| rule(&["-d", &e.to_string()], "RETURN"))
        .collect();
    rules.push(rule(&["!", "-d", &subnet.to_string()], "MASQUERADE"));
    rules
}

/// Removes every rule carrying `comment`, in both families. Idempotent; a
/// missing iptables binary means there is nothing to remove.
pub fn remove(comment: &str) -> Result<()> {
    remove_where(None, |c| c == comment).map(drop)
}

/// Removes every rule spright-cni made on this host, of every attachment, in
/// both families, running the host's iptables under `host_root` when given
/// (see [`run_in`]). Returns how many rules it removed. A family whose
/// iptables is missing has no rules of ours.
pub fn remove_all(host_root: Option<&Path>) -> Result<usize> {
    remove_where(host_root, |c| c.starts_with(COMMENT_PREFIX))
}

fn remove_where(host_root: Option<&Path>, keep: impl Fn(&str) -> bool) -> Result<usize> {
    let mut n = 0;
    for program in ["iptables", "ip6tables"] {
        let listing = match run_in(
            host_root,
            program,
            &["-w", "-t", "nat", "-S", "POSTROUTING"],
        ) {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list {program} rules; nothing to remove");
                continue;
            }
        };
        for rule in rules_where(&listing, &keep) {
            let mut args = vec!["-w".to_owned(), "-t".to_owned(), "nat".to_owned()];
            args.extend(rule);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_in(host_root, program, &args)?;
            n += 1;
        }
    }
    Ok(n)
}

/// The `-D ...` argument lists of the rules in an `iptables -S` listing whose
/// comment satisfies `wanted`.
fn rules_where(listing: &str, wanted: impl Fn(&str) -> bool) -> Vec<Vec<String>> {
    listing
        .lines()
        .filter_map(|line| {
            let words: Vec<String> = line
                .split_whitespace()
                .map(|w| w.trim_matches('"').to_owned())
                .collect();
            let tagged = words
                .windows(2)
                .any(|w| w[0] == "--comment" && wanted(&w[1]));
            (tagged && words.first().is_some_and(|w| w == "-A")).then(|| {
                let mut rule = words;
                "-D".clone_into(&mut rule[0]);
                rule
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_this_attachments_rules() {
        let c = comment("net", "abc");
        let listing = format!(
            "-P POSTROUTING ACCEPT\n\
             -A POSTROUTING -s 10.213.0.2/32 ! -d 10.213.0.0/24 -m comment --comment \"{c}\" -j MASQUERADE\n\
             -A POSTROUTING -s 10.213.0.3/32 ! -d 10.213.0.0/24 -m comment --comment \"{c}x\" -j MASQUERADE\n"
        );
        let rules = rules_where(&listing, |comment| comment == c);
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0][0], "-D");
        assert!(rules[0].contains(&"10.213.0.2/32".to_owned()));
        assert!(rules[0].contains(&c));
    }

    #[test]
    fn the_cluster_cidr_keeps_its_source() {
        let pod: IpNet = "10.244.1.5/24".parse().unwrap();
        let except: Vec<IpNet> = ["10.244.0.0/16", "fd00::/48", "10.244.1.0/25"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        let rules: Vec<String> = rules_for(&pod, &except, "c")
            .iter()
            .map(|r| r.join(" "))
            .collect();
        assert_eq!(
            rules,
            [
                "-w -t nat -A POSTROUTING -s 10.244.1.5/32 -d 10.244.0.0/16 -m comment --comment c -j RETURN",
                // fd00::/48 is the other family; 10.244.1.0/25 lies inside
                // the pod's own subnet, which the last rule already spares.
                "-w -t nat -A POSTROUTING -s 10.244.1.5/32 ! -d 10.244.1.0/24 -m comment --comment c -j MASQUERADE",
            ]
        );
    }

    #[test]
    fn comments_are_safe_words() {
        assert_eq!(comment("my net", "a\"b"), "spright-cni:mynet:ab");
    }
}
