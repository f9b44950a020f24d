//! The one reader of `/proc`, through the `procfs` crate: the processes (parents, CPU
//! time, memory, environment, namespaces, open files) and this process's mount table.
//! A process that exits while it is being read is simply left out.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use procfs::process::{FDTarget, MountOptFields, Process};

/// One entry of this process's mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Decoded: `\040` in mountinfo is a space here.
    pub point: PathBuf,
    pub fs_type: String,
    /// `shared`, `slave` or `private`.
    pub propagation: &'static str,
}

/// This process's mount table (`/proc/self/mountinfo`), in the kernel's order (a mount
/// point stacked several times appears several times, the visible one last).
pub fn mounts() -> Vec<Mount> {
    let Ok(infos) = Process::myself().and_then(|p| p.mountinfo()) else {
        return Vec::new();
    };
    infos
        .into_iter()
        .map(|m| Mount {
            point: decode_octal(&m.mount_point),
            fs_type: m.fs_type,
            propagation: propagation_of(&m.opt_fields),
        })
        .collect()
}

fn propagation_of(fields: &[MountOptFields]) -> &'static str {
    if fields
        .iter()
        .any(|f| matches!(f, MountOptFields::Shared(_)))
    {
        "shared"
    } else if fields
        .iter()
        .any(|f| matches!(f, MountOptFields::Master(_)))
    {
        "slave"
    } else {
        "private"
    }
}

/// Undoes the kernel's escaping of paths in mountinfo (space, tab, newline and
/// backslash as `\ooo`); procfs hands mount points over still escaped.
fn decode_octal(raw: &Path) -> PathBuf {
    let bytes = raw.as_os_str().as_encoded_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let digits = bytes.get(i + 1..i + 4);
        if bytes[i] == b'\\'
            && let Some(d) = digits
            && d.iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let value = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Every live process.
fn processes() -> impl Iterator<Item = Process> {
    procfs::process::all_processes()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
}

/// The pid of every live process.
pub fn pids() -> Vec<i32> {
    processes().map(|p| p.pid()).collect()
}

/// Parent pid of every process.
pub fn parents() -> BTreeMap<i32, i32> {
    processes()
        .filter_map(|p| Some((p.pid(), p.stat().ok()?.ppid)))
        .collect()
}

/// User + system CPU time of `pid` in milliseconds.
pub fn cpu_ms(pid: i32) -> Option<u64> {
    let stat = Process::new(pid).ok()?.stat().ok()?;
    let hz = procfs::ticks_per_second().max(1);
    Some((stat.utime + stat.stime) * 1000 / hz)
}

/// Whether `pid` is gone or a zombie (dead, not yet reaped).
pub fn is_gone_or_zombie(pid: i32) -> bool {
    Process::new(pid)
        .and_then(|p| p.stat())
        .map(|s| s.state == 'Z')
        .unwrap_or(true)
}

/// The command name of `pid` (`comm`, at most 15 bytes).
pub fn command(pid: i32) -> Option<String> {
    Some(Process::new(pid).ok()?.stat().ok()?.comm)
}

/// The value of environment variable `name` in process `pid`, if it has one.
pub fn env_of(pid: i32, name: &str) -> Option<String> {
    let env = Process::new(pid).ok()?.environ().ok()?;
    env.get(std::ffi::OsStr::new(name))
        .map(|v| v.to_string_lossy().into_owned())
}

/// Memory of one process, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub rss: u64,
    /// None where the kernel has no `smaps_rollup` (before 4.14).
    pub pss: Option<u64>,
    pub anon: Option<u64>,
}

/// RSS, PSS and anonymous RSS of `pid`.
pub fn memory(pid: i32) -> Option<Memory> {
    let process = Process::new(pid).ok()?;
    let status = process.status().ok()?;
    let rollup = process.smaps_rollup().ok();
    let field = |name: &str| {
        rollup
            .as_ref()?
            .memory_map_rollup
            .0
            .first()?
            .extension
            .map
            .get(name)
            .copied()
    };
    let rss = field("Rss").or(status.vmrss.map(|kib| kib * 1024))?;
    Some(Memory {
        rss,
        pss: field("Pss"),
        anon: status.rssanon.map(|kib| kib * 1024),
    })
}

/// Whether this process has capability `cap` in its effective set.
pub fn has_capability(cap: u32) -> bool {
    Process::myself()
        .and_then(|p| p.status())
        .is_ok_and(|s| s.capeff & (1u64 << cap) != 0)
}

/// This process's `oom_score_adj`.
pub fn oom_score_adj() -> Option<i16> {
    Process::myself().ok()?.oom_score_adj().ok()
}

/// The network namespaces some live process is in, as (device, inode) of nsfs.
pub fn netns_in_use() -> HashSet<(u64, u64)> {
    processes()
        .filter_map(|p| {
            let ns = p.namespaces().ok()?;
            let net = ns.0.get(std::ffi::OsStr::new("net"))?;
            Some((net.device_id, net.identifier))
        })
        .collect()
}

/// Who uses something below `dir`, if anyone: a listening unix socket there, or a
/// process whose working directory or open file is there.
pub fn user_below(dir: &Path) -> Option<String> {
    let below = |p: &Path| p.starts_with(dir);
    if let Some(socket) = procfs::net::unix()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.path)
        .find(|p| below(p))
    {
        return Some(format!("a process listening on {}", socket.display()));
    }
    processes().find_map(|p| {
        let cwd = p.cwd().ok();
        let files = p
            .fd()
            .into_iter()
            .flatten()
            .filter_map(|fd| match fd.ok()?.target {
                FDTarget::Path(path) => Some(path),
                _ => None,
            });
        cwd.into_iter()
            .chain(files)
            .any(|f| below(&f))
            .then(|| format!("process {}", p.pid()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_mount_points_are_decoded() {
        assert_eq!(
            decode_octal(Path::new(r"/tmp/pod\040vol/a\011b\134c")),
            Path::new("/tmp/pod vol/a\tb\\c")
        );
        assert_eq!(decode_octal(Path::new(r"/plain")), Path::new("/plain"));
        // not an escape: left as it is
        assert_eq!(decode_octal(Path::new(r"/a\9x\04")), Path::new(r"/a\9x\04"));
    }

    #[test]
    fn this_process_is_read() {
        let me = std::process::id() as i32;
        assert!(pids().contains(&me));
        assert_eq!(
            parents().get(&me),
            Some(&(std::os::unix::process::parent_id() as i32))
        );
        assert!(memory(me).is_some_and(|m| m.rss > 0));
        assert!(!is_gone_or_zombie(me));
        assert!(mounts().iter().any(|m| m.point == Path::new("/")));
    }
}
