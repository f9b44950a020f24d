//! Finding, measuring and killing process trees: containerd's shims outlive containerd
//! (they run in their own process groups, re-parented away from it) and keep kdist's
//! marker; the containers are their children.

use std::collections::{BTreeMap, BTreeSet};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::proc;
use crate::config::{DataDir, MARKER_ENV};

/// Environment variable naming the service a child of the supervisor runs.
pub const SERVICE_ENV: &str = "KDIST_SERVICE";

/// Every live process (but this one) that carries the marker of `data`.
pub fn find_marked(data: &DataDir) -> Vec<i32> {
    let me = std::process::id() as i32;
    proc::pids()
        .into_iter()
        .filter(|pid| *pid != me)
        .filter(|pid| {
            proc::env_of(*pid, MARKER_ENV).is_some_and(|m| std::path::Path::new(&m) == data.root())
        })
        .collect()
}

/// Memory and CPU time of one process of a node's tree, attributed to the service it
/// belongs to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProcessUsage {
    pub pid: i32,
    /// The service (`KDIST_SERVICE` of the process or of its nearest ancestor that has
    /// one), `kdist` for the daemon and what it runs itself, `pods` for containers.
    pub group: String,
    pub command: String,
    pub rss_bytes: u64,
    /// Proportional set size: shared pages divided among their users, so that the PSS
    /// of a tree adds up to what it really occupies.
    pub pss_bytes: Option<u64>,
    /// The anonymous part of the RSS (heap, stacks): what the kernel cannot drop without
    /// swap, unlike clean pages of the program file.
    pub anon_bytes: Option<u64>,
    /// User and system CPU time used so far, in milliseconds.
    pub cpu_ms: u64,
}

/// Group of the daemon and of unmarked processes it runs itself (probes, kubectl).
pub const DAEMON_GROUP: &str = "kdist";
/// Group of container processes (children of containerd's shims).
pub const PODS_GROUP: &str = "pods";

/// What [`group_of`] needs to know about a process.
#[derive(Debug, Clone, Default)]
pub struct ProcessFacts {
    pub ppid: i32,
    /// `KDIST_SERVICE` in its environment.
    pub service: Option<String>,
    pub command: String,
}

/// The group `pid` is counted in (see [`ProcessUsage::group`]).
pub fn group_of(pid: i32, daemon: i32, facts: &BTreeMap<i32, ProcessFacts>) -> String {
    let mut current = pid;
    // bounded walk: a cycle in a racing /proc snapshot must not hang the caller
    for _ in 0..64 {
        if current == daemon {
            return DAEMON_GROUP.to_string();
        }
        let Some(f) = facts.get(&current) else { break };
        if let Some(service) = &f.service {
            // a shim carries containerd's marker; what it runs is a container
            if current != pid && f.command.starts_with("containerd-shim") {
                return PODS_GROUP.to_string();
            }
            return service.clone();
        }
        current = f.ppid;
    }
    DAEMON_GROUP.to_string()
}

fn service_env(pid: i32) -> Option<String> {
    proc::env_of(pid, SERVICE_ENV)
}

/// Every process of the node whose daemon is `daemon`: the daemon, its descendants,
/// every process carrying the marker of `data` (containerd's shims, re-parented away
/// from containerd) and their descendants (the containers), with their memory.
/// Kernel threads and processes that exit meanwhile are left out.
pub fn tree_usage(data: &DataDir, daemon: i32) -> Vec<ProcessUsage> {
    let mut roots = find_marked(data);
    roots.push(daemon);
    let parents = proc::parents();
    let pids = descendants(&parents, &roots);
    let facts: BTreeMap<i32, ProcessFacts> = pids
        .iter()
        .map(|pid| {
            let command = proc::command(*pid).unwrap_or_default();
            let facts = ProcessFacts {
                ppid: parents.get(pid).copied().unwrap_or(0),
                service: service_env(*pid),
                command,
            };
            (*pid, facts)
        })
        .collect();
    pids.iter()
        .filter_map(|pid| {
            let memory = proc::memory(*pid)?;
            Some(ProcessUsage {
                pid: *pid,
                group: group_of(*pid, daemon, &facts),
                command: facts
                    .get(pid)
                    .map(|f| f.command.clone())
                    .unwrap_or_default(),
                rss_bytes: memory.rss,
                pss_bytes: memory.pss,
                anon_bytes: memory.anon,
                cpu_ms: proc::cpu_ms(*pid).unwrap_or(0),
            })
        })
        .collect()
}

/// `roots` and all their descendants.
pub fn with_descendants(roots: &[i32]) -> BTreeSet<i32> {
    descendants(&proc::parents(), roots)
}

/// `roots` and all their descendants in `parents` (pid -> parent pid).
fn descendants(parents: &BTreeMap<i32, i32>, roots: &[i32]) -> BTreeSet<i32> {
    let mut set: BTreeSet<i32> = roots.iter().copied().collect();
    loop {
        let before = set.len();
        for (pid, ppid) in parents {
            if set.contains(ppid) {
                set.insert(*pid);
            }
        }
        if set.len() == before {
            return set;
        }
    }
}

/// SIGKILLs every marked process of `data` with its descendants; returns how many.
pub fn kill_marked_trees(data: &DataDir) -> usize {
    kill_trees(find_marked(data))
}

/// SIGKILLs the containerd shims of `data` left by a daemon that died, with their
/// containers (which do not carry the marker and would outlive a plain cleanup).
pub fn kill_leftover_shims(data: &DataDir) -> usize {
    let shims = find_marked(data)
        .into_iter()
        .filter(|pid| proc::command(*pid).is_some_and(|c| c.starts_with("containerd-shim")))
        .collect();
    kill_trees(shims)
}

fn kill_trees(roots: Vec<i32>) -> usize {
    if roots.is_empty() {
        return 0;
    }
    let all = with_descendants(&roots);
    for pid in &all {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    // reaped by their parents or init; wait until they are gone
    for _ in 0..50 {
        if all.iter().all(|p| proc::is_gone_or_zombie(*p)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    all.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_the_marker_and_containers_are_pods() {
        let f = |ppid: i32, service: Option<&str>, command: &str| ProcessFacts {
            ppid,
            service: service.map(str::to_string),
            command: command.into(),
        };
        let facts: BTreeMap<i32, ProcessFacts> = [
            (10, f(1, None, "kdist")),
            (11, f(10, Some("containerd"), "containerd")),
            (12, f(1, Some("containerd"), "containerd-shim-runc-v2")),
            (13, f(12, None, "pause")),
            (14, f(13, None, "sh")),
            (15, f(10, Some("kubelet"), "kubelet")),
            (16, f(15, None, "iptables")),
            (17, f(10, None, "kubectl")),
        ]
        .into_iter()
        .collect();
        let group = |pid| group_of(pid, 10, &facts);
        assert_eq!(group(10), DAEMON_GROUP);
        assert_eq!(group(11), "containerd");
        assert_eq!(group(12), "containerd", "the shim is containerd's");
        assert_eq!(group(13), PODS_GROUP);
        assert_eq!(group(14), PODS_GROUP);
        assert_eq!(group(16), "kubelet", "a child of kubelet is kubelet's");
        assert_eq!(group(17), DAEMON_GROUP);
    }

    #[test]
    fn tree_usage_sees_a_marked_process_outside_the_tree() {
        // the "daemon" is this test process; a marked child stands for a shim
        let root = std::env::temp_dir().join(format!("kdist-procs-{}", std::process::id()));
        let data = DataDir::new(&root);
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30 & wait"])
            .env(crate::config::MARKER_ENV, data.root())
            .env(SERVICE_ENV, "svc")
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let me = std::process::id() as i32;
        let tree = tree_usage(&data, me);
        let mine = tree.iter().find(|p| p.pid == me).unwrap();
        assert_eq!(mine.group, DAEMON_GROUP);
        assert!(mine.rss_bytes > 1024 * 1024, "{mine:?}");
        let svc: Vec<_> = tree.iter().filter(|p| p.group == "svc").collect();
        assert!(svc.len() >= 2, "sh and sleep: {tree:?}");
        assert!(svc.iter().all(|p| p.rss_bytes > 0 && p.pss_bytes.is_some()));
        // spin until /proc says 200 ms more CPU were used (the host may be busy)
        let cpu = |tree: &[ProcessUsage]| tree.iter().find(|p| p.pid == me).unwrap().cpu_ms;
        let start = cpu(&tree);
        let spin = std::time::Instant::now();
        let mut used = 0;
        while used < 200 && spin.elapsed() < std::time::Duration::from_secs(20) {
            for _ in 0..1_000_000 {
                std::hint::black_box(spin.elapsed());
            }
            used = cpu(&tree_usage(&data, me)) - start;
        }
        assert!(used >= 200, "spinning is counted as CPU time: {used} ms");
        for p in &svc {
            let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
        }
        child.wait().unwrap();
    }

    #[test]
    fn descendants_include_grandchildren() {
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let root = child.id() as i32;
        std::thread::sleep(std::time::Duration::from_millis(200));
        let tree = with_descendants(&[root]);
        assert!(tree.len() >= 2, "{tree:?}");
        for pid in &tree {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        child.wait().unwrap();
    }
}
