//! The egress guard (`network.egress: none`): traffic from the pod or service CIDRs, or
//! to them, leaves the node only through the CNI bridge or `lo`. Everything else is
//! dropped in the node's own chain `KDIST-EGRESS-<id>`, jumped to from mangle
//! POSTROUTING: that hook sees forwarded and locally generated packets before
//! masquerading rewrites their source, and no other component reorders its rules.
//! Each data dir has its own chain, so stopping one node on a host never lifts another
//! node's guard.

use std::path::PathBuf;

use sha2::{Digest, Sha256};

use super::cmd;
use super::error::NodeError;
use crate::config::{DataDir, NodeConfig};

/// Prefix of every node's chain (`kdist reset` output and docs name it).
pub const CHAIN_PREFIX: &str = "KDIST-EGRESS-";

/// The chain of the node in `data`: the prefix and 8 hex digits of the SHA-256 of the
/// data dir's path (21 characters; iptables allows 28).
pub fn chain(data: &DataDir) -> String {
    let digest = Sha256::digest(data.root().as_os_str().as_encoded_bytes());
    format!("{CHAIN_PREFIX}{}", &hex::encode(digest)[..8])
}
const TABLE: &str = "mangle";
const HOOK: &str = "POSTROUTING";

/// The rules of the chain, each as iptables arguments after `-A <chain>`.
pub fn rules(pod_cidr: &str, service_cidr: &str, bridge: &str) -> Vec<Vec<String>> {
    let v = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut rules = vec![
        v(&["-o", "lo", "-j", "RETURN"]),
        v(&["-o", bridge, "-j", "RETURN"]),
    ];
    for cidr in [pod_cidr, service_cidr] {
        for dir in ["-s", "-d"] {
            rules.push(v(&[
                dir,
                cidr,
                "-m",
                "comment",
                "--comment",
                "kdist egress: none",
                "-j",
                "DROP",
            ]));
        }
    }
    rules
}

/// With the built-in pod network, rules that go before [`rules`]' drops: traffic to pod
/// addresses passes (the kernel sends those only to this node's bridge or a peer: the
/// network controller's blackhole route keeps the rest of the pod CIDR on the node), and
/// so does pods' traffic to the peers' node IPs (the apiserver behind the `kubernetes`
/// Service, hostNetwork pods). Nothing else from the pod CIDR leaves.
pub fn peer_rules(pod_cidr: &str, peers: &[std::net::Ipv4Addr]) -> Vec<Vec<String>> {
    let v = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut rules = vec![v(&["-d", pod_cidr, "-j", "RETURN"])];
    for peer in peers {
        rules.push(v(&[
            "-s",
            pod_cidr,
            "-d",
            &format!("{peer}/32"),
            "-j",
            "RETURN",
        ]));
    }
    rules
}

fn iptables() -> Result<PathBuf, NodeError> {
    cmd::which("iptables").ok_or_else(|| NodeError::NotFound {
        program: "iptables".into(),
        searched: PathBuf::from("PATH"),
        hint: "install iptables, or set `network.egress: all`".into(),
    })
}

fn ipt(program: &std::path::Path, args: &[&str]) -> Result<String, NodeError> {
    let mut full = vec!["-w", "5", "-t", TABLE];
    full.extend_from_slice(args);
    cmd::run(program, &full)
}

/// The `iptables-restore --noflush` input that (re)creates `chain` with `rules` and,
/// when `jump` is set, inserts the jump to it first in the hook: one transaction, so a
/// refresh never shows an empty or half-filled chain.
pub fn restore_script(chain: &str, rules: &[Vec<String>], jump: bool) -> String {
    // with --noflush, declaring a chain that exists flushes it within the transaction
    let mut script = format!("*{TABLE}\n:{chain} - [0:0]\n");
    for rule in rules {
        script.push_str(&format!("-A {chain}"));
        for arg in rule {
            script.push(' ');
            script.push_str(&quote(arg));
        }
        script.push('\n');
    }
    if jump {
        script.push_str(&format!("-I {HOOK} 1 -j {chain}\n"));
    }
    script.push_str("COMMIT\n");
    script
}

/// An argument as iptables-restore reads it: double-quoted when it holds a space.
fn quote(arg: &str) -> String {
    if arg.contains(char::is_whitespace) || arg.is_empty() {
        format!("\"{}\"", arg.replace('"', "\\\""))
    } else {
        arg.to_string()
    }
}

/// Installs (or refreshes) the guard of the node in `data` for `config`.
pub fn apply(data: &DataDir, config: &NodeConfig) -> Result<(), NodeError> {
    apply_with_peers(data, config, &[])
}

/// Like [`apply`], letting pod traffic reach the node IPs `peers` (the network
/// controller refreshes it when the peers change).
pub fn apply_with_peers(
    data: &DataDir,
    config: &NodeConfig,
    peers: &[std::net::Ipv4Addr],
) -> Result<(), NodeError> {
    let program = iptables()?;
    let restore = program.with_file_name("iptables-restore");
    let restore = if restore.exists() {
        restore
    } else {
        cmd::which("iptables-restore").ok_or_else(|| NodeError::NotFound {
            program: "iptables-restore".into(),
            searched: PathBuf::from("PATH"),
            hint: "install iptables, or set `network.egress: all`".into(),
        })?
    };
    let chain = chain(data);
    let jump = ipt(&program, &["-C", HOOK, "-j", &chain]).is_err();
    let net = &config.network;
    let mut all = rules(&net.pod_cidr, &net.service_cidr, &net.bridge);
    if net.cni == crate::config::Cni::Builtin {
        // after the lo and bridge RETURNs, before the drops
        let drops = all.split_off(2);
        all.extend(peer_rules(&net.pod_cidr, peers));
        all.extend(drops);
    }
    let script = restore_script(&chain, &all, jump);
    cmd::run_with_input(&restore, &["-w", "5", "--noflush"], Some(script.as_bytes()))?;
    tracing::info!(%chain, "egress guard on: pod and service traffic stays on this node");
    Ok(())
}

/// Removes the guard of the node in `data`; absent is fine. Other nodes' guards stay.
pub fn remove(data: &DataDir) -> Result<(), NodeError> {
    let Ok(program) = iptables() else {
        return Ok(());
    };
    let chain = chain(data);
    while ipt(&program, &["-D", HOOK, "-j", &chain]).is_ok() {}
    if ipt(&program, &["-F", &chain]).is_ok() {
        ipt(&program, &["-X", &chain])?;
    }
    Ok(())
}

/// Whether the guard's chain of the node in `data` exists.
pub fn installed(data: &DataDir) -> bool {
    iptables().is_ok_and(|p| ipt(&p, &["-S", &chain(data)]).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_data_dir_has_its_own_short_chain() {
        let a = chain(&DataDir::new("/var/lib/kdist"));
        let b = chain(&DataDir::new("/tmp/other-node"));
        assert_ne!(a, b);
        assert_eq!(a, chain(&DataDir::new("/var/lib/kdist")));
        assert!(a.starts_with(CHAIN_PREFIX) && a.len() <= 28, "{a}");
    }

    #[test]
    fn only_bridge_and_lo_pass_then_both_cidrs_drop_both_ways() {
        let rules = rules("10.1.0.0/16", "10.152.183.0/24", "kdist0");
        assert_eq!(rules[0], ["-o", "lo", "-j", "RETURN"]);
        assert_eq!(rules[1], ["-o", "kdist0", "-j", "RETURN"]);
        let drops: Vec<String> = rules[2..]
            .iter()
            .map(|r| {
                assert_eq!(r.last().map(String::as_str), Some("DROP"));
                format!("{} {}", r[0], r[1])
            })
            .collect();
        assert_eq!(
            drops,
            [
                "-s 10.1.0.0/16",
                "-d 10.1.0.0/16",
                "-s 10.152.183.0/24",
                "-d 10.152.183.0/24"
            ]
        );
    }

    #[test]
    fn pod_addresses_and_peers_node_ips_pass_and_nothing_else_of_the_pods() {
        let rules = peer_rules("10.1.0.0/16", &["10.203.0.2".parse().unwrap()]);
        assert_eq!(rules[0], ["-d", "10.1.0.0/16", "-j", "RETURN"]);
        assert_eq!(
            rules[1],
            ["-s", "10.1.0.0/16", "-d", "10.203.0.2/32", "-j", "RETURN"]
        );
        assert_eq!(rules.len(), 2);
    }

    #[test]
    fn the_refresh_is_one_transaction_that_redeclares_the_chain() {
        let rules = rules("10.1.0.0/16", "10.152.183.0/24", "kdist0");
        let script = restore_script("KDIST-EGRESS-0a1b2c3d", &rules, false);
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines[0], "*mangle");
        assert_eq!(lines[1], ":KDIST-EGRESS-0a1b2c3d - [0:0]");
        assert_eq!(lines[2], "-A KDIST-EGRESS-0a1b2c3d -o lo -j RETURN");
        assert_eq!(
            lines[4],
            "-A KDIST-EGRESS-0a1b2c3d -s 10.1.0.0/16 -m comment --comment \"kdist egress: none\" -j DROP"
        );
        assert_eq!(lines.last(), Some(&"COMMIT"));
        assert!(!script.contains("-I POSTROUTING"));
        let first = restore_script("KDIST-EGRESS-0a1b2c3d", &rules, true);
        assert!(first.contains("\n-I POSTROUTING 1 -j KDIST-EGRESS-0a1b2c3d\nCOMMIT\n"));
    }
}
