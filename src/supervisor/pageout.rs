//! Paging out a child's program pages once it has settled. The Kubernetes binaries are
//! 50-120 MB of Go each, and their start-up (scheme registration, flag and API setup)
//! touches most of it once: those clean file pages stay mapped, counted in the RSS, until
//! the kernel happens to need the memory. `process_madvise(MADV_PAGEOUT)` drops them now
//! (Linux 5.10+); pages still in use fault back in from the page cache or disk, so what
//! stays is the working set. Anonymous memory (the Go heap) is never touched: without
//! swap the kernel skips it, with swap MADV_PAGEOUT would swap it, so only mappings of
//! the executable file are advised.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::config::{DataDir, MARKER_ENV};

use super::child::SERVICE_ENV;

/// The address ranges of `pid` that map its executable `exe`, from `/proc/<pid>/maps`.
pub fn program_ranges(maps: &str, exe: &Path) -> Vec<(usize, usize)> {
    let exe = exe.as_os_str().to_string_lossy();
    maps.lines()
        .filter_map(|line| {
            // address perms offset dev inode pathname (the pathname may hold spaces)
            let mut fields = line.splitn(6, ' ');
            let range = fields.next()?;
            let path = fields.nth(4)?.trim_start();
            let path = path.strip_suffix(" (deleted)").unwrap_or(path);
            if path != exe {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (end > start).then_some((start, end - start))
        })
        .collect()
}

/// Whether `pid` is the child `service` of `data` (kdist's marker and service name).
fn is_our_child(pid: i32, data: &DataDir, service: &str) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let marker = format!("{MARKER_ENV}={}", data.root().display());
    let name = format!("{SERVICE_ENV}={service}");
    let entries: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
    entries.contains(&marker.as_bytes()) && entries.contains(&name.as_bytes())
}

/// Pages out the executable's pages of the child `service` (pid `pid`) of `data`;
/// returns how many bytes were advised. The process is pinned by a pidfd and checked to
/// carry our marker after that, so a recycled pid is never touched.
pub fn page_out_program(pid: i32, data: &DataDir, service: &str) -> std::io::Result<usize> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no
    // memory of ours is passed.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("pidfd out of range"))?;
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nothing else.
    #[allow(unsafe_code)]
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
    if !is_our_child(pid, data, service) {
        return Err(std::io::Error::other(format!(
            "pid {pid} is not kdist's {service} any more"
        )));
    }
    let exe: PathBuf = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let iov: Vec<libc::iovec> = program_ranges(&maps, &exe)
        .into_iter()
        .map(|(start, len)| libc::iovec {
            iov_base: start as *mut libc::c_void,
            iov_len: len,
        })
        .collect();
    if iov.is_empty() {
        return Ok(0);
    }
    use std::os::fd::AsRawFd;
    // SAFETY: `iov` is a live slice of `iov.len()` iovecs describing address ranges of
    // the *target* process; the kernel only reads the array itself from our memory.
    #[allow(unsafe_code)]
    let advised = unsafe {
        libc::syscall(
            libc::SYS_process_madvise,
            pidfd.as_raw_fd(),
            iov.as_ptr(),
            iov.len(),
            libc::MADV_PAGEOUT,
            0u32,
        )
    };
    if advised < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(advised).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_of_the_executable_only() {
        let maps = "\
00400000-02000000 r-xp 00000000 08:01 123 /opt/k8s/kube-apiserver
02000000-05000000 r--p 01c00000 08:01 123 /opt/k8s/kube-apiserver
05000000-05100000 rw-p 04c00000 08:01 123 /opt/k8s/kube-apiserver (deleted)
05100000-05200000 rw-p 00000000 00:00 0 
c000000000-c004000000 rw-p 00000000 00:00 0 
7f0000000000-7f0000001000 r--p 00000000 08:01 9 /usr/lib/libc.so.6
7f0000002000-7f0000003000 r--p 00000000 08:01 9 /opt/k8s/kube-apiserver two
";
        let ranges = program_ranges(maps, Path::new("/opt/k8s/kube-apiserver"));
        assert_eq!(
            ranges,
            [
                (0x400000, 0x1c00000),
                (0x2000000, 0x3000000),
                (0x5000000, 0x100000)
            ]
        );
    }

    #[test]
    fn pages_out_a_marked_child_and_refuses_others() {
        let root = std::env::temp_dir().join(format!("kdist-pageout-{}", std::process::id()));
        let data = DataDir::new(&root);
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(MARKER_ENV, data.root())
            .env(SERVICE_ENV, "svc")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        std::thread::sleep(std::time::Duration::from_millis(100));
        let advised = page_out_program(pid, &data, "svc").unwrap();
        assert!(advised > 0, "the sleep binary's mappings were advised");
        let err = page_out_program(pid, &data, "other").unwrap_err();
        assert!(err.to_string().contains("not kdist's other"), "{err}");
        let _ = child.kill();
        child.wait().unwrap();
    }
}
