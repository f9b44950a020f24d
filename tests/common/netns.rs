//! Two nodes in network namespaces of the test's own, joined by a veth pair (one L2
//! segment; no bridge, route or iptables rule of the host's), each with a `kdist` run
//! inside its namespace. Nothing leaves the namespaces: they have no default route.

use std::process::{Command, Output};

use super::{KDIST, Node, describe};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", describe(&out));
}

/// The namespaces the test made (the veth pair goes with them); removed on drop.
pub struct Lab {
    namespaces: Vec<String>,
}

impl Lab {
    /// Namespaces `<prefix><pid>-1` and `-2`, addresses `<net>.1` and `<net>.2` (/24) on
    /// the two ends of a veth pair. Returns the lab, the namespaces and the addresses.
    pub fn pair(prefix: &str, net: &str) -> (Lab, Vec<String>, Vec<String>) {
        let tag = std::process::id() % 100_000;
        let mut lab = Lab {
            namespaces: Vec::new(),
        };
        for i in 1..=2 {
            let ns = format!("{prefix}{tag}-{i}");
            ip(&["netns", "add", &ns]);
            lab.namespaces.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        let ends = [format!("{prefix}{tag}a"), format!("{prefix}{tag}b")];
        ip(&[
            "link",
            "add",
            &ends[0],
            "netns",
            &lab.namespaces[0],
            "type",
            "veth",
            "peer",
            "name",
            &ends[1],
            "netns",
            &lab.namespaces[1],
        ]);
        let mut ips = Vec::new();
        for (i, end) in ends.iter().enumerate() {
            let ns = &lab.namespaces[i];
            let addr = format!("{net}.{}", i + 1);
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", end]);
            ip(&["-n", ns, "link", "set", end, "up"]);
            ips.push(addr);
        }
        let namespaces = lab.namespaces.clone();
        (lab, namespaces, ips)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A node whose `kdist` runs inside namespace `ns` with `PATH` = `path`; dropping it
/// stops and resets it (before its data dir goes: iptables, cgroups, host paths), even
/// when the test failed.
pub struct NsNode {
    pub ns: String,
    pub path: String,
    pub node: Node,
}

impl NsNode {
    /// A node of data dir tag `tag` with `config`, run in namespace `ns` with `path`.
    pub fn new(ns: &str, tag: &str, path: &str, config: &str) -> Self {
        let node = Node::new(tag);
        node.write_config(config);
        Self {
            ns: ns.to_string(),
            path: path.to_string(),
            node,
        }
    }

    pub fn kdist(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, KDIST, "--data-dir"])
            .arg(&self.node.root)
            .args(args)
            .env("PATH", &self.path)
            .env_remove("KDIST_DATA_DIR")
            .output()
            .unwrap()
    }

    /// `kdist <args>`, panicking with its output and the daemon's log unless it
    /// succeeds; stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kdist(args);
        assert!(
            out.status.success(),
            "kdist {args:?} in {}: {}\n--- kdist.log\n{}",
            self.ns,
            describe(&out),
            self.node.log("kdist")
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A command run inside the namespace (not kdist).
    pub fn inside(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, program])
            .args(args)
            .output()
            .unwrap()
    }

    pub fn path(&self, relative: &str) -> std::path::PathBuf {
        self.node.path(relative)
    }
}

impl Drop for NsNode {
    fn drop(&mut self) {
        if self.node.path("run/kdist.sock").exists() {
            let _ = self.kdist(&["stop", "--timeout", "60"]);
        }
        if self.node.path("node/host-state.json").exists() {
            let _ = self.kdist(&["reset"]);
        }
    }
}
