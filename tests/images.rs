//! `kdist images import` of OCI archives built offline from busybox-static, and archives
//! dropped in <data>/images/ imported at start; all checked with containerd's `ctr`.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{TempData, oci, poll_until, text};

const BUSYBOX_IMAGE: &str = "kdist.local/test/busybox:1";
const PAUSE_IMAGE: &str = "kdist.local/test/pause:1";
const DROPPED_IMAGE: &str = "kdist.local/test/dropped:1";

fn ctr_images(data: &TempData) -> String {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(data.path("run/containerd.sock"))
        .args(["-n", "k8s.io", "images", "ls", "-q"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn images_import_into_k8s_namespace() {
    let data = TempData::new("img");
    // dropped before start: imported once containerd is ready
    std::fs::create_dir_all(data.path("images")).unwrap();
    oci::build(
        &data.path("images/dropped.tar"),
        DROPPED_IMAGE,
        &["/bin/sleep", "3600"],
    );
    let config = data.config(&format!(
        "datastore: embedded\nruntime:\n  sandbox_image: {PAUSE_IMAGE}\n"
    ));
    let out = data.kdist(&[
        "start",
        "--config",
        config.to_str().unwrap(),
        "--timeout",
        "60",
    ]);
    assert!(out.status.success(), "{}", text(&out));

    let busybox = data.path("busybox.tar");
    let pause = data.path("pause.tar");
    oci::build(
        &busybox,
        BUSYBOX_IMAGE,
        &["/bin/sh", "-c", "echo hello; sleep 3600"],
    );
    oci::build(&pause, PAUSE_IMAGE, &["/bin/sleep", "infinity"]);
    for (archive, name) in [(&busybox, BUSYBOX_IMAGE), (&pause, PAUSE_IMAGE)] {
        let out = data.kdist(&["images", "import", archive.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(name),
            "{}",
            text(&out)
        );
    }
    let listed = ctr_images(&data);
    assert!(listed.contains(BUSYBOX_IMAGE), "{listed}");
    assert!(listed.contains(PAUSE_IMAGE), "{listed}");
    assert!(
        poll_until(Duration::from_secs(20), || ctr_images(&data)
            .contains(DROPPED_IMAGE)),
        "dropped archive not imported: {}",
        ctr_images(&data)
    );
    // the image is unpacked and runnable: its busybox answers
    let out = Command::new("ctr")
        .arg("--address")
        .arg(data.path("run/containerd.sock"))
        .args(["-n", "k8s.io", "images", "check"])
        .output()
        .unwrap();
    let check = String::from_utf8_lossy(&out.stdout);
    let line = check.lines().find(|l| l.contains(BUSYBOX_IMAGE)).unwrap();
    assert!(line.contains("complete"), "{check}");

    // bad input names the file and what to do
    let bogus = data.path("bogus.tar");
    std::fs::write(&bogus, b"not an archive at all, just text").unwrap();
    let out = data.kdist(&["images", "import", bogus.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus.tar"), "{err}");
}
