//! Small filesystem helpers shared by every subsystem: atomic writes with explicit modes.
//! Nothing here knows about kdist's layout; that is `config::DataDir`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// Writes `contents` to `path` atomically: a temp file of a unique name in the same
/// directory, fsync, rename over the target, fsync of the directory. Readers see the old
/// or the new file, never a torn one; a crash loses nothing that was there before; two
/// writers (threads or processes) never share a temp file, the last rename wins.
pub fn atomic_write(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    // created 0600 (O_EXCL); removed on any error before the rename
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    // the mode given to open() would be filtered by the umask; keys must be exactly 0600
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

/// Takes an exclusive `flock` on `path` (created if missing, never truncated), waiting
/// for whoever holds it; released when the returned guard is dropped. For
/// read-modify-write of a file shared by the daemon's threads and CLI processes.
pub fn lock_exclusive(path: &Path) -> io::Result<Flock<File>> {
    Flock::lock(lock_file(path)?, FlockArg::LockExclusive)
        .map_err(|(_, errno)| io::Error::from(errno))
}

/// Like [`lock_exclusive`] without waiting: `None` while another holder has it (one
/// daemon per data dir, one `kdist components` command at a time).
pub fn try_lock_exclusive(path: &Path) -> io::Result<Option<Flock<File>>> {
    match Flock::lock(lock_file(path)?, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(io::Error::from(errno)),
    }
}

fn lock_file(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// Creates `path` (and parents) and sets its mode, also when it already existed.
pub fn ensure_dir(path: &Path, mode: u32) -> io::Result<()> {
    fs::create_dir_all(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let dir = std::env::temp_dir().join(format!("kdist-fsutil-{}", std::process::id()));
        ensure_dir(&dir, 0o700).unwrap();
        let file = dir.join("key.pem");
        atomic_write(&file, b"one", 0o644).unwrap();
        atomic_write(&file, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"two");
        let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temp files must not be left behind");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_writers_in_one_process_never_mix_their_files() {
        let dir = std::env::temp_dir().join(format!("kdist-fsutil-mt-{}", std::process::id()));
        ensure_dir(&dir, 0o700).unwrap();
        let file = dir.join("nodes.json");
        let contents: Vec<Vec<u8>> = (0..8u8).map(|i| vec![b'a' + i; 64 << 10]).collect();
        std::thread::scope(|s| {
            for c in &contents {
                let file = &file;
                s.spawn(move || {
                    for _ in 0..20 {
                        atomic_write(file, c, 0o600).unwrap();
                    }
                });
            }
        });
        let last = fs::read(&file).unwrap();
        assert!(contents.contains(&last), "a torn or mixed file");
        let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temp files must not be left behind");
        fs::remove_dir_all(&dir).unwrap();
    }
}
