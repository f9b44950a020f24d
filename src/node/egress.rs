//! The egress guard (`network.egress: none`): traffic from the pod or service CIDRs, or
//! to them, leaves the node only through the CNI bridge or `lo`. Everything else is
//! dropped in kdist's own chain `KDIST-EGRESS`, jumped to from mangle POSTROUTING: that
//! hook sees forwarded and locally generated packets before masquerading rewrites their
//! source, and no other component reorders its rules.

use std::path::PathBuf;

use super::cmd;
use super::error::NodeError;
use crate::config::NodeConfig;

pub const CHAIN: &str = "KDIST-EGRESS";
const TABLE: &str = "mangle";
const HOOK: &str = "POSTROUTING";

/// The rules of the chain, each as iptables arguments after `-A KDIST-EGRESS`.
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

/// Installs (or refreshes) the guard for `config`.
pub fn apply(config: &NodeConfig) -> Result<(), NodeError> {
    let program = iptables()?;
    if ipt(&program, &["-N", CHAIN]).is_err() {
        // it exists already: refresh its rules
        ipt(&program, &["-F", CHAIN])?;
    }
    let net = &config.network;
    for rule in rules(&net.pod_cidr, &net.service_cidr, &net.bridge) {
        let mut args = vec!["-A", CHAIN];
        args.extend(rule.iter().map(String::as_str));
        ipt(&program, &args)?;
    }
    if ipt(&program, &["-C", HOOK, "-j", CHAIN]).is_err() {
        ipt(&program, &["-I", HOOK, "1", "-j", CHAIN])?;
    }
    tracing::info!("egress guard on: pod and service traffic stays on this node");
    Ok(())
}

/// Removes the guard; absent is fine.
pub fn remove() -> Result<(), NodeError> {
    let Ok(program) = iptables() else {
        return Ok(());
    };
    while ipt(&program, &["-D", HOOK, "-j", CHAIN]).is_ok() {}
    if ipt(&program, &["-F", CHAIN]).is_ok() {
        ipt(&program, &["-X", CHAIN])?;
    }
    Ok(())
}

/// Whether the guard's chain exists.
pub fn installed() -> bool {
    iptables().is_ok_and(|p| ipt(&p, &["-S", CHAIN]).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
