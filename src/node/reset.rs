//! `kdist reset`: removes what kubelet, containerd and CNI left on the host once the
//! node has stopped, and restores the host settings kdist changed. Certificates,
//! kubeconfigs, config.yaml, args, components and the datastore stay.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::cmd;
use super::error::NodeError;
use super::{cgroups, cni, egress, hostprep, procs};
use crate::config::{DataDir, NodeConfig};

/// Chains created by kube-proxy, kubelet and the CNI plugins.
const CHAIN_PREFIXES: &[&str] = &["KUBE-", "CNI-"];
const TABLES: &[&str] = &["filter", "nat", "mangle", "raw"];

/// Builds the `iptables-restore --noflush` input that removes every chain whose name
/// starts with one of `CHAIN_PREFIXES` (and `extra`) from an `iptables-save` dump:
/// first the rules that jump to them from other chains, then the chains themselves.
pub fn removal_script(save: &str, extra: &[&str]) -> String {
    let ours =
        |chain: &str| CHAIN_PREFIXES.iter().any(|p| chain.starts_with(p)) || extra.contains(&chain);
    let mut out = String::new();
    let mut table: Option<&str> = None;
    let mut chains: Vec<&str> = Vec::new();
    let mut deletes: Vec<String> = Vec::new();
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = Some(name);
            chains.clear();
            deletes.clear();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split(' ').next().unwrap_or_default();
            if ours(chain) {
                chains.push(chain);
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split(' ').next().unwrap_or_default();
            let jumps_to_ours = rule
                .split(' ')
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && ours(w[1]));
            if !ours(chain) && jumps_to_ours {
                deletes.push(format!("-D {rule}"));
            }
        } else if line == "COMMIT" {
            if let Some(name) = table
                && (!chains.is_empty() || !deletes.is_empty())
            {
                out.push_str(&format!("*{name}\n"));
                for d in &deletes {
                    out.push_str(d);
                    out.push('\n');
                }
                for c in &chains {
                    out.push_str(&format!("-F {c}\n"));
                }
                for c in &chains {
                    out.push_str(&format!("-X {c}\n"));
                }
                out.push_str("COMMIT\n");
            }
            table = None;
        }
    }
    out
}

fn flush_chains(family: &str, own: &str) -> Result<usize, NodeError> {
    let (save, restore) = (format!("{family}-save"), format!("{family}-restore"));
    let (Some(save), Some(restore)) = (cmd::which(&save), cmd::which(&restore)) else {
        return Ok(0);
    };
    let mut removed = 0;
    for table in TABLES {
        let Ok(dump) = cmd::run(&save, &["-t", table]) else {
            continue;
        };
        let script = removal_script(&dump, &[own]);
        if script.is_empty() {
            continue;
        }
        removed += script.lines().filter(|l| l.starts_with("-X ")).count();
        cmd::run_with_input(&restore, &["-w", "5", "--noflush"], Some(script.as_bytes()))?;
    }
    Ok(removed)
}

/// Mount points at or below any of `roots`, deepest first.
fn mounts_below(roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = super::proc::mounts()
        .into_iter()
        .map(|m| m.point)
        .filter(|m| roots.iter().any(|r| m.starts_with(r)))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found.dedup();
    found
}

fn unmount_all(roots: &[PathBuf]) -> usize {
    let mut count = 0;
    // a mount point may be stacked several times: repeat while something is left
    for _ in 0..5 {
        let left = mounts_below(roots);
        if left.is_empty() {
            break;
        }
        for m in left {
            if nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).is_ok() {
                count += 1;
            }
        }
    }
    count
}

/// Removes the `kubepods` cgroups kubelet leaves (v1: under every controller).
fn remove_kubepods_cgroups() -> usize {
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup/kubepods")];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in entries.flatten() {
            roots.push(e.path().join("kubepods"));
            roots.push(e.path().join("kubepods.slice"));
        }
    }
    roots
        .iter()
        .filter(|r| r.is_dir())
        .map(|r| cgroups::remove_tree(r))
        .sum()
}

/// Resets the node; the daemon must be stopped. Returns a line per thing done.
pub fn reset(data: &DataDir, config: &NodeConfig) -> Result<Vec<String>, NodeError> {
    let mut done = Vec::new();
    let killed = procs::kill_marked_trees(data);
    if killed > 0 {
        done.push(format!("killed {killed} leftover container process(es)"));
    }
    // what containerd, kubelet and CNI mounted: pod volumes, rootfs, netns, shm. This
    // node's kubelet (--root-dir) and containerd (root, state) keep theirs under the data
    // dir; mounts below the host's /var/lib/kubelet or /run/containerd are another
    // kubelet's or runtime's, and stay
    let mut roots = vec![data.kubelet_dir(), data.containerd_dir()];
    // CNI's pod namespaces: this node's pods are dead now, so one still entered by a
    // process belongs to a pod of another node or runtime on this host and stays. Only
    // those mounted in this mount namespace are looked at: an entry that is a plain file
    // here may be a live pod's namespace mounted in another one (a node started under
    // `ip netns exec`), and removing it would take the pod's network from its runtime
    let in_use = super::proc::netns_in_use();
    let mounted_here = mounts_below(&[PathBuf::from("/run/netns")]);
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        roots.extend(entries.flatten().map(|e| e.path()).filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("cni-"))
                && mounted_here.contains(p)
                && !std::fs::metadata(p).is_ok_and(|m| in_use.contains(&(m.dev(), m.ino())))
        }));
    }
    let unmounted = unmount_all(&roots);
    if unmounted > 0 {
        done.push(format!("unmounted {unmounted} mount(s)"));
    }
    for path in roots.iter().filter(|p| p.starts_with("/run/netns")) {
        let _ = std::fs::remove_file(path);
    }
    let own = egress::chain(data);
    for family in ["iptables", "ip6tables"] {
        let removed = flush_chains(family, &own)?;
        if removed > 0 {
            done.push(format!(
                "{family}: removed {removed} KUBE-*/CNI-*/{own} chain(s)"
            ));
        }
    }
    if let Some(nft) = cmd::which("nft") {
        for family in ["ip", "ip6"] {
            if cmd::run(&nft, &["delete", "table", family, "kube-proxy"]).is_ok() {
                done.push(format!("nft: removed table {family} kube-proxy"));
            }
        }
    }
    super::masquerade::remove(data)?;
    match super::netlink::remove_all_blocking() {
        Ok(true) => done.push("removed kdist's pod routes and VXLAN device".into()),
        Ok(false) => {}
        Err(e) => tracing::warn!("pod routes left: {e}"),
    }
    if super::netlink::delete_link_blocking(&config.network.bridge)? {
        done.push(format!("removed bridge {}", config.network.bridge));
    }
    // under `ip netns exec` the cgroup file systems are hidden until mounted again
    if let Err(e) = super::cgroups::ensure_mounted() {
        tracing::warn!("cgroups left alone: {e}");
    }
    let mut cgroups = remove_kubepods_cgroups();
    if let Some(root) = &config.runtime.cgroup_root {
        cgroups += super::cgroups::remove_root(root);
    }
    if cgroups > 0 {
        done.push(format!("removed {cgroups} kubepods cgroup(s)"));
    }
    for dir in [
        data.containerd_dir(),
        data.kubelet_dir(),
        cni::ipam_dir(data),
    ] {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(NodeError::io(&dir))?;
            done.push(format!("removed {}", dir.display()));
        }
    }
    done.extend(hostprep::restore(data)?);
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "\
# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-X - [0:0]
:CNI-abc - [0:0]
:OTHER - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -s 10.1.0.5/32 -m comment --comment \"name: kdist id: 1\" -j CNI-abc
-A POSTROUTING -j OTHER
-A KUBE-SERVICES -j KUBE-SVC-X
-A CNI-abc -d 10.1.0.0/16 -j ACCEPT
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j ACCEPT
COMMIT
*mangle
:POSTROUTING ACCEPT [0:0]
:KDIST-EGRESS-0a1b2c3d - [0:0]
:KDIST-EGRESS-ffffffff - [0:0]
-A POSTROUTING -j KDIST-EGRESS-ffffffff
-A POSTROUTING -j KDIST-EGRESS-0a1b2c3d
-A KDIST-EGRESS-ffffffff -o lo -j RETURN
-A KDIST-EGRESS-0a1b2c3d -o lo -j RETURN
COMMIT
";

    #[test]
    fn script_removes_jumps_then_chains_and_nothing_else_not_other_nodes_guards() {
        let script = removal_script(SAVE, &["KDIST-EGRESS-0a1b2c3d"]);
        let expected = "\
*nat
-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-D POSTROUTING -s 10.1.0.5/32 -m comment --comment \"name: kdist id: 1\" -j CNI-abc
-F KUBE-SERVICES
-F KUBE-SVC-X
-F CNI-abc
-X KUBE-SERVICES
-X KUBE-SVC-X
-X CNI-abc
COMMIT
*mangle
-D POSTROUTING -j KDIST-EGRESS-0a1b2c3d
-F KDIST-EGRESS-0a1b2c3d
-X KDIST-EGRESS-0a1b2c3d
COMMIT
";
        assert_eq!(script, expected);
    }

    #[test]
    fn clean_tables_give_an_empty_script() {
        assert_eq!(
            removal_script("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n", &[]),
            ""
        );
    }

    /// Unmounts what it mounted even when an assertion fails first.
    struct Mounted(PathBuf);

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn a_mount_point_with_a_space_is_found_and_unmounted() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("pod volume");
        std::fs::create_dir(&target).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &target,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap();
        let mounted = Mounted(target.clone());
        let roots = [root.path().to_path_buf()];
        assert_eq!(mounts_below(&roots), [target]);
        assert_eq!(unmount_all(&roots), 1);
        assert!(mounts_below(&roots).is_empty());
        assert!(
            !super::super::proc::mounts()
                .iter()
                .any(|m| m.point == mounted.0),
            "still mounted"
        );
    }
}
