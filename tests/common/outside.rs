//! A stand-in for "off this machine": a veth pair whose far end sits in a private network
//! namespace, with a raw-table rule there counting the IPv4 packets that reach `target`.
//! Whatever a test sends towards it stays on the host. Removed on drop.

use std::process::Command;

use super::text;

pub struct Outside {
    ns: String,
    near: String,
    pub target: String,
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Outside {
    /// `near_address` (e.g. `10.153.7.1/24`) goes on the host's end, which routes that
    /// subnet into the namespace; `target` is an address of the subnet.
    pub fn new(tag: &str, near_address: &str, target: &str) -> Self {
        let id = std::process::id() % 10_000;
        let ns = format!("kdt-{tag}-{id}");
        let near = format!("kdt{tag}{id}a");
        let far = format!("kdt{tag}{id}b");
        ip(&["netns", "add", &ns]);
        let me = Self {
            ns: ns.clone(),
            near: near.clone(),
            target: target.to_string(),
        };
        ip(&["link", "add", &near, "type", "veth", "peer", "name", &far]);
        ip(&["link", "set", &far, "netns", &ns]);
        ip(&["addr", "add", near_address, "dev", &near]);
        ip(&["link", "set", &near, "up"]);
        ip(&["-n", &ns, "link", "set", &far, "up"]);
        let mac = ip(&["-n", &ns, "-br", "link", "show", &far]);
        let mac = mac.split_whitespace().nth(2).unwrap().to_string();
        ip(&["neigh", "replace", target, "lladdr", &mac, "dev", &near]);
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "iptables",
                "-t",
                "raw",
                "-A",
                "PREROUTING",
            ])
            .args(["-d", target])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        me
    }

    /// IPv4 packets for the target that arrived in the namespace.
    pub fn arrived(&self) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "iptables", "-t", "raw", "-L"])
            .args(["PREROUTING", "-v", "-x", "-n"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains(&self.target))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap()
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.near])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}
