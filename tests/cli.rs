//! The CLI as a shell pipeline uses it.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};

/// `kdist completion bash | head -1`: the reader goes away after one line; kdist ends
/// with the broken-pipe status and says nothing on stderr (no panic message).
#[test]
fn a_closed_stdout_ends_quietly() {
    let mut child = Command::new(common::KDIST)
        .args(["completion", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    let mut stdout = child.stdout.take().unwrap();
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}
