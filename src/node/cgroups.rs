//! The cgroup file systems the node's services need: mounting them again where a private
//! mount namespace hides them (`ip netns exec` remounts /sys), and the node's own cgroup
//! root (`runtime.cgroup_root`) that keeps its pods apart from other kubelets' on the
//! same host.

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use super::error::NodeError;

const CGROUP_FS: &str = "/sys/fs/cgroup";

/// Mount points of the cgroup file systems among `mounts` (v1 hierarchies and the v2
/// one).
pub fn mount_points(mounts: &[super::proc::Mount]) -> Vec<PathBuf> {
    mounts
        .iter()
        .filter(|m| matches!(m.fs_type.as_str(), "cgroup" | "cgroup2"))
        .map(|m| m.point.clone())
        .collect()
}

fn visible_mounts() -> Vec<PathBuf> {
    mount_points(&super::proc::mounts())
}

/// One cgroup file system to mount: where, its type and its mount options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    pub target: PathBuf,
    pub fstype: &'static str,
    pub options: Option<String>,
    /// Other names for a hierarchy of several controllers (`cpu` for `cpu,cpuacct`).
    pub aliases: Vec<String>,
}

/// What to mount under `/sys/fs/cgroup` for the hierarchies this process belongs to
/// (`/proc/self/cgroup` text), laid out as systemd does: one directory per v1 hierarchy
/// named by its controllers, `unified` for v2 beside them, or v2 alone at the top.
pub fn mounts_for(proc_cgroup: &str) -> Vec<CgroupMount> {
    let root = Path::new(CGROUP_FS);
    let lines: Vec<(&str, &str)> = proc_cgroup
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            Some((parts.next()?, parts.next()?))
        })
        .collect();
    let v1: Vec<&str> = lines
        .iter()
        .filter(|(id, controllers)| *id != "0" && !controllers.is_empty())
        .map(|(_, controllers)| *controllers)
        .collect();
    let has_v2 = lines.iter().any(|(id, _)| *id == "0");
    let mut mounts = Vec::new();
    if v1.is_empty() {
        if has_v2 {
            mounts.push(CgroupMount {
                target: root.to_path_buf(),
                fstype: "cgroup2",
                options: None,
                aliases: Vec::new(),
            });
        }
        return mounts;
    }
    for controllers in v1 {
        let names: Vec<&str> = controllers.split(',').collect();
        let dir = names
            .iter()
            .map(|n| n.strip_prefix("name=").unwrap_or(n))
            .collect::<Vec<_>>()
            .join(",");
        // a named hierarchy without controllers needs `none`, or it would take them all
        let options = if names.iter().all(|n| n.starts_with("name=")) {
            format!("none,{controllers}")
        } else {
            controllers.to_string()
        };
        let aliases = if names.len() > 1 {
            names
                .iter()
                .filter(|n| !n.starts_with("name="))
                .map(|n| n.to_string())
                .collect()
        } else {
            Vec::new()
        };
        mounts.push(CgroupMount {
            target: root.join(dir),
            fstype: "cgroup",
            options: Some(options),
            aliases,
        });
    }
    if has_v2 {
        mounts.push(CgroupMount {
            target: root.join("unified"),
            fstype: "cgroup2",
            options: None,
            aliases: Vec::new(),
        });
    }
    mounts
}

fn same_mount_namespace_as_init() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/mnt"),
        std::fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(own), Ok(init)) => own == init,
        // root may read init's namespace link from init's own mount namespace; where it
        // may not (seen under `ip netns exec` in sandboxed VMs) this is not that one
        (Ok(_), Err(_)) => false,
        _ => true,
    }
}

fn mount_err(target: &Path) -> impl FnOnce(nix::Error) -> NodeError + '_ {
    move |e| NodeError::Mount {
        target: target.to_path_buf(),
        source: std::io::Error::from(e),
    }
}

/// Mounts the cgroup file systems again when none is visible and this process runs in a
/// mount namespace of its own: `ip netns exec` mounts a fresh sysfs on /sys there, which
/// hides them, and kubelet and runc cannot run without them. The mounts stay in that
/// namespace; the host's mount table is not touched. Returns what was done, if anything.
pub fn ensure_mounted() -> Result<Option<String>, NodeError> {
    if !visible_mounts().is_empty() || same_mount_namespace_as_init() {
        return Ok(None);
    }
    let path = Path::new("/proc/self/cgroup");
    let text = std::fs::read_to_string(path).map_err(NodeError::io(path))?;
    let mounts = mounts_for(&text);
    if mounts.is_empty() {
        return Ok(None);
    }
    let root = Path::new(CGROUP_FS);
    if mounts.iter().any(|m| m.target != root) {
        nix::mount::mount(
            Some("tmpfs"),
            root,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some("mode=755"),
        )
        .map_err(mount_err(root))?;
    }
    for m in &mounts {
        std::fs::create_dir_all(&m.target).map_err(NodeError::io(&m.target))?;
        nix::mount::mount(
            Some("cgroup"),
            &m.target,
            Some(m.fstype),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            m.options.as_deref(),
        )
        .map_err(mount_err(&m.target))?;
        for alias in &m.aliases {
            let link = root.join(alias);
            if let Some(dir) = m.target.file_name() {
                std::os::unix::fs::symlink(dir, &link).map_err(NodeError::io(&link))?;
            }
        }
    }
    tracing::info!(
        count = mounts.len(),
        "mounted the cgroup file systems in this mount namespace (hidden by a remounted /sys)"
    );
    Ok(Some(format!(
        "{} cgroup file system(s) mounted again in kdist's own mount namespace",
        mounts.len()
    )))
}

/// A pod cgroup root is a plain cgroup directory, which only kubelet's cgroupfs driver
/// takes; with systemd, kubelet's driver wants a `.slice` kdist does not make.
pub fn check_root_driver(root: &str, systemd: bool) -> Result<(), NodeError> {
    if systemd {
        return Err(NodeError::CgroupRootWithSystemd {
            root: root.to_string(),
        });
    }
    Ok(())
}

/// Creates the cgroup `root` in every cgroup hierarchy (kubelet refuses a cgroupRoot
/// that does not exist). A new v1 cpuset cgroup starts with no CPUs and memory nodes:
/// it gets its parent's.
pub fn create_root(root: &str) -> Result<(), NodeError> {
    let relative = root.trim_start_matches('/');
    for hierarchy in visible_mounts() {
        let mut dir = hierarchy.clone();
        for part in relative.split('/') {
            let parent = dir.clone();
            dir.push(part);
            if dir.is_dir() {
                continue;
            }
            std::fs::create_dir(&dir).map_err(NodeError::io(&dir))?;
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let own = dir.join(file);
                if own.exists() && std::fs::read_to_string(&own).is_ok_and(|s| s.trim().is_empty())
                {
                    let value = std::fs::read_to_string(parent.join(file))
                        .map_err(NodeError::io(parent.join(file)))?;
                    std::fs::write(&own, value.trim()).map_err(NodeError::io(&own))?;
                }
            }
        }
    }
    Ok(())
}

/// Removes the cgroup `root` and everything below it from every hierarchy, deepest
/// first; cgroups that still hold processes stay. Returns how many were removed.
pub fn remove_root(root: &str) -> usize {
    let relative = root.trim_start_matches('/');
    let mut removed = 0;
    for hierarchy in visible_mounts() {
        let top = hierarchy.join(relative);
        if top.is_dir() {
            removed += remove_tree(&top);
        }
    }
    removed
}

/// Removes the cgroup directory `top` and every one below it, deepest first; those that
/// still hold processes (or are not empty) stay. Returns how many were removed.
pub(super) fn remove_tree(top: &Path) -> usize {
    let mut dirs = Vec::new();
    collect_dirs(top, &mut dirs);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    dirs.iter()
        .filter(|d| std::fs::remove_dir(d).is_ok())
        .count()
}

/// Whether the cgroup `root` exists in any hierarchy.
pub fn root_exists(root: &str) -> bool {
    let relative = root.trim_start_matches('/');
    visible_mounts().iter().any(|h| h.join(relative).is_dir())
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_cgroup_root_is_refused_with_the_systemd_driver() {
        assert!(check_root_driver("/kdist-w1", false).is_ok());
        let err = check_root_driver("/kdist-w1", true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("runtime.cgroup_root")
                && err.contains("/kdist-w1")
                && err.contains("systemd"),
            "{err}"
        );
    }

    #[test]
    fn v1_hierarchies_get_systemd_names_and_named_ones_no_controllers() {
        let text = "12:pids:/x\n11:cpu,cpuacct:/x\n1:name=systemd:/x\n0::/x\n";
        let mounts = mounts_for(text);
        let got: Vec<(String, &str, Option<String>, Vec<String>)> = mounts
            .into_iter()
            .map(|m| {
                (
                    m.target.display().to_string(),
                    m.fstype,
                    m.options,
                    m.aliases,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "/sys/fs/cgroup/pids".to_string(),
                    "cgroup",
                    Some("pids".to_string()),
                    vec![]
                ),
                (
                    "/sys/fs/cgroup/cpu,cpuacct".to_string(),
                    "cgroup",
                    Some("cpu,cpuacct".to_string()),
                    vec!["cpu".to_string(), "cpuacct".to_string()]
                ),
                (
                    "/sys/fs/cgroup/systemd".to_string(),
                    "cgroup",
                    Some("none,name=systemd".to_string()),
                    vec![]
                ),
                (
                    "/sys/fs/cgroup/unified".to_string(),
                    "cgroup2",
                    None,
                    vec![]
                ),
            ]
        );
    }

    #[test]
    fn pure_v2_mounts_at_the_top() {
        let mounts = mounts_for("0::/user.slice\n");
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].target, Path::new("/sys/fs/cgroup"));
        assert_eq!(mounts[0].fstype, "cgroup2");
    }

    #[test]
    fn mountinfo_cgroup_entries_are_found() {
        let mount = |point: &str, fs_type: &str| super::super::proc::Mount {
            point: point.into(),
            fs_type: fs_type.into(),
            propagation: "private",
        };
        let mounts = [
            mount("/sys/fs/cgroup", "tmpfs"),
            mount("/sys/fs/cgroup/cpu", "cgroup"),
            mount("/sys/fs/cgroup/unified", "cgroup2"),
        ];
        assert_eq!(
            mount_points(&mounts),
            [
                PathBuf::from("/sys/fs/cgroup/cpu"),
                PathBuf::from("/sys/fs/cgroup/unified")
            ]
        );
    }
}
