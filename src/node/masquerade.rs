//! Masquerading of pod traffic that leaves the cluster's pod network (built-in CNI):
//! the bridge plugin's own `ipMasq` would exempt only this node's range and so rewrite
//! pod-to-pod traffic to other nodes. kdist's chain `KDIST-MASQ-<id>` in nat
//! POSTROUTING lets traffic between pod addresses (any node's) keep its source and
//! masquerades the rest from the pod CIDR. Traffic to a Service is DNAT'd to a pod
//! address before POSTROUTING, so it keeps its source too. Each data dir has its own
//! chain, with the id of its egress guard's.

use std::path::PathBuf;

use super::cmd;
use super::egress;
use super::error::NodeError;
use crate::config::DataDir;

/// Prefix of every node's chain.
pub const CHAIN_PREFIX: &str = "KDIST-MASQ-";
const TABLE: &str = "nat";
const HOOK: &str = "POSTROUTING";
const COMMENT: &str = "kdist: pod traffic leaving the pod network";

/// The chain of the node in `data`.
pub fn chain(data: &DataDir) -> String {
    let guard = egress::chain(data);
    format!("{CHAIN_PREFIX}{}", &guard[egress::CHAIN_PREFIX.len()..])
}

/// The rules of the chain, each as iptables arguments after `-A <chain>`.
pub fn rules(pod_cidr: &str) -> Vec<Vec<String>> {
    let v = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        // pod to pod, on this node or another: the receiver sees the sender's address
        v(&["-s", pod_cidr, "-d", pod_cidr, "-j", "RETURN"]),
        v(&["-s", pod_cidr, "-d", "224.0.0.0/4", "-j", "RETURN"]),
        v(&[
            "-s",
            pod_cidr,
            "-m",
            "comment",
            "--comment",
            COMMENT,
            "-j",
            "MASQUERADE",
        ]),
    ]
}

fn iptables() -> Result<PathBuf, NodeError> {
    cmd::which("iptables").ok_or_else(|| NodeError::NotFound {
        program: "iptables".into(),
        searched: PathBuf::from("PATH"),
        hint: "install iptables: pods reach outside the pod network through masquerading".into(),
    })
}

fn ipt(program: &std::path::Path, args: &[&str]) -> Result<String, NodeError> {
    let mut full = vec!["-w", "5", "-t", TABLE];
    full.extend_from_slice(args);
    cmd::run(program, &full)
}

/// Installs (or refreshes) the masquerade chain of the node in `data`. Blocking.
pub fn apply(data: &DataDir, pod_cidr: &str) -> Result<(), NodeError> {
    let program = iptables()?;
    let chain = chain(data);
    if ipt(&program, &["-N", &chain]).is_err() {
        ipt(&program, &["-F", &chain])?;
    }
    for rule in rules(pod_cidr) {
        let mut args = vec!["-A", chain.as_str()];
        args.extend(rule.iter().map(String::as_str));
        ipt(&program, &args)?;
    }
    if ipt(&program, &["-C", HOOK, "-j", &chain]).is_err() {
        ipt(&program, &["-A", HOOK, "-j", &chain])?;
    }
    Ok(())
}

/// Removes the chain of the node in `data`; absent is fine. Blocking.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_shares_the_guards_id_and_fits_iptables() {
        let data = DataDir::new("/var/lib/kdist");
        let masq = chain(&data);
        assert!(masq.starts_with(CHAIN_PREFIX) && masq.len() <= 28, "{masq}");
        assert!(egress::chain(&data).ends_with(&masq[CHAIN_PREFIX.len()..]));
    }

    #[test]
    fn pod_to_pod_keeps_its_source_and_the_rest_is_masqueraded() {
        let rules = rules("10.1.0.0/16");
        assert_eq!(
            rules[0],
            ["-s", "10.1.0.0/16", "-d", "10.1.0.0/16", "-j", "RETURN"]
        );
        assert_eq!(rules[1][3], "224.0.0.0/4");
        let last = rules.last().unwrap();
        assert_eq!(last[..2], ["-s", "10.1.0.0/16"]);
        assert_eq!(last.last().unwrap(), "MASQUERADE");
    }
}
