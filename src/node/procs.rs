//! Finding and killing process trees: containerd's shims outlive containerd (they run in
//! their own process groups) and keep kdist's marker; the containers are their children.

use std::collections::{BTreeMap, BTreeSet};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::config::DataDir;
use crate::supervisor::find_marked;

/// Parent pid of every process.
fn parents() -> BTreeMap<i32, i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return BTreeMap::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // the command name may hold spaces and parentheses: parse after the last ')'
            let rest = &stat[stat.rfind(')')? + 2..];
            let ppid = rest.split(' ').nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// `roots` and all their descendants.
pub fn with_descendants(roots: &[i32]) -> BTreeSet<i32> {
    let parents = parents();
    let mut set: BTreeSet<i32> = roots.iter().copied().collect();
    loop {
        let before = set.len();
        for (pid, ppid) in &parents {
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
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("containerd-shim"))
        })
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
        if all
            .iter()
            .all(|p| kill(Pid::from_raw(*p), None).is_err() || is_zombie(*p))
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    all.len()
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

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
