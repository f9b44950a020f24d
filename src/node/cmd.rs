//! Running the host tools kdist drives (iptables, ctr, kubectl, mount) with errors that
//! say which command failed and what it printed.

use std::path::Path;
use std::process::{Command, Stdio};

use super::error::NodeError;

/// Runs `program args`, returning stdout; a non-zero exit is an error carrying stderr.
pub fn run(program: &Path, args: &[&str]) -> Result<String, NodeError> {
    run_with_input(program, args, None)
}

/// Like [`run`], feeding `input` on stdin.
pub fn run_with_input(
    program: &Path,
    args: &[&str],
    input: Option<&[u8]>,
) -> Result<String, NodeError> {
    use std::io::Write;
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| NodeError::Spawn {
        program: program.to_path_buf(),
        source,
    })?;
    if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(bytes).map_err(|source| NodeError::Spawn {
            program: program.to_path_buf(),
            source,
        })?;
    }
    let output = child
        .wait_with_output()
        .map_err(|source| NodeError::Spawn {
            program: program.to_path_buf(),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(NodeError::Command {
            command: format!("{} {}", program.display(), args.join(" ")),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// Finds `name` on PATH.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(candidate)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}
