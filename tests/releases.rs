//! The running EKS-D release in the cluster, with real Kubernetes binaries
//! (KDIST_TEST_K8S_BIN): a node started on release 1 of a local EKS-D-shaped release
//! shows it as a `Release` object (the manifest as published) with its `ReleaseChannel`,
//! its Node carries `kdist.io/release` (which the node's own identity may set, as a
//! worker does), and `kdist status` lists the node with it; a Release deleted by hand
//! and a wrong annotation come back; after `components use 2` the cluster shows
//! release 2, the published channel document kdist kept, and release 1 is pruned.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::netns::{self, NsNode};
use common::release::{binary_version, k8s_bin, real_bins, release_dir};
use common::{TempData, poll_until, text};

const RELEASES: &str = "releases.distro.eks.amazonaws.com";
const CHANNELS: &str = "releasechannels.distro.eks.amazonaws.com";

fn ok(data: &TempData, args: &[&str]) -> String {
    let out = data.kdist(args);
    assert!(out.status.success(), "kdist {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl get ... -o json` as JSON, or None while it fails.
fn get_json(data: &TempData, args: &[&str]) -> Option<serde_json::Value> {
    let out = data.kdist(&[&["kubectl", "get"], args, &["-o", "json"]].concat());
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// The names of the objects of `resource` in namespace default.
fn names(data: &TempData, resource: &str) -> Vec<String> {
    get_json(data, &[resource, "-n", "default"])
        .and_then(|list| {
            list["items"].as_array().map(|items| {
                items
                    .iter()
                    .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// The node's `kdist.io/release` annotation.
fn annotation(data: &TempData) -> Option<String> {
    let nodes = get_json(data, &["nodes"])?;
    nodes["items"][0]["metadata"]["annotations"]["kdist.io/release"]
        .as_str()
        .map(str::to_string)
}

/// The NODES rows of `kdist status -o json`.
fn status_nodes(data: &TempData) -> Vec<serde_json::Value> {
    data.status()["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn the_cluster_shows_the_release_each_node_runs() {
    let _host = common::exclusive_host();
    let bin = k8s_bin();
    let data = TempData::new("releases");
    let work = data.path("work");
    std::fs::create_dir_all(&work).unwrap();
    let real = real_bins(&bin);
    let kubectl_bin = real
        .iter()
        .find(|(b, _)| *b == "kubectl")
        .unwrap()
        .1
        .clone();
    let version = binary_version(&bin);
    let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
    let channel = format!("1-{minor}");
    let r1 = release_dir(&work, &channel, &version, 1, &real);
    let r2 = release_dir(&work, &channel, &version, 2, &real);
    let name1 = format!("kubernetes-{channel}-eks-1");
    let name2 = format!("kubernetes-{channel}-eks-2");

    ok(
        &data,
        &["components", "install", "--from", r1.to_str().unwrap()],
    );
    // no CoreDNS image is given: the DNS addon stays off
    let config = data.config("network:\n  egress: none\naddons:\n  dns:\n    enabled: false\n");
    ok(
        &data,
        &[
            "start",
            "--config",
            config.to_str().unwrap(),
            "--timeout",
            "180",
        ],
    );

    // release 1 as a Release object: the manifest as published, in namespace default
    assert!(
        poll_until(Duration::from_secs(90), || names(&data, RELEASES)
            == vec![name1.clone()]),
        "no Release {name1}: {:?}\n{}",
        names(&data, RELEASES),
        ok(&data, &["status"])
    );
    let table = ok(&data, &["kubectl", "get", RELEASES]);
    let row = table
        .lines()
        .find(|l| l.starts_with(&name1))
        .unwrap_or_else(|| panic!("{table}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(columns[1..3], [channel.as_str(), "1"], "{table}");
    let object = get_json(&data, &[RELEASES, &name1, "-n", "default"]).unwrap();
    let published: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(r1.join("manifest.yaml")).unwrap())
            .unwrap();
    assert_eq!(object["spec"], published["spec"]);
    assert_eq!(object["status"], published["status"]);
    assert_eq!(
        object["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "kdist"
    );

    // its channel: the air gap's (installed from a directory), latest = newest known
    let channel_object = get_json(&data, &[CHANNELS, &channel, "-n", "default"]).unwrap();
    assert_eq!(channel_object["status"]["latestRelease"], 1);
    assert_eq!(channel_object["status"]["active"], true);
    let table = ok(&data, &["kubectl", "get", "releasechannels"]);
    assert!(
        table.lines().any(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            c.first() == Some(&channel.as_str()) && c.get(1..3) == Some(&["true", "1"][..])
        }),
        "{table}"
    );

    // the Node says which release it runs, and that it is a control plane
    assert_eq!(annotation(&data).as_deref(), Some(name1.as_str()));
    let nodes = ok(&data, &["kubectl", "get", "nodes"]);
    assert!(nodes.contains("control-plane"), "{nodes}");
    // kdist status lists it
    assert!(
        poll_until(Duration::from_secs(30), || status_nodes(&data)
            .first()
            .is_some_and(|n| n["release"] == name1.as_str())),
        "{:#}",
        data.status()
    );
    let row = &status_nodes(&data)[0];
    assert_eq!(row["control_plane"], true, "{row}");
    assert_eq!(row["ready"], true, "{row}");
    assert_eq!(row["kubelet"], version.as_str(), "{row}");
    let human = ok(&data, &["status"]);
    let line = human
        .lines()
        .skip_while(|l| !l.starts_with("NODE "))
        .nth(1)
        .unwrap_or_else(|| panic!("no NODES section: {human}"));
    assert!(
        line.contains("control-plane") && line.contains(&version) && line.ends_with(&name1),
        "{human}"
    );

    // the node's own identity (system:node:NAME, what a worker's controller uses) may
    // patch its own Node's annotation: a wrong value set that way is put back
    let me = get_json(&data, &["nodes"]).unwrap()["items"][0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let kubelet_conf = data.path("kubeconfig/kubelet.conf");
    let out = Command::new(&kubectl_bin)
        .arg("--kubeconfig")
        .arg(&kubelet_conf)
        .args([
            "annotate",
            "node",
            &me,
            &format!("kdist.io/release=kubernetes-{channel}-eks-7"),
            "--overwrite",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "as system:node:{me}: {}", text(&out));
    assert!(
        poll_until(Duration::from_secs(30), || annotation(&data).as_deref()
            == Some(name1.as_str())),
        "the annotation was not put back: {:?}",
        annotation(&data)
    );

    // a user's deletion is put back
    ok(
        &data,
        &["kubectl", "delete", RELEASES, &name1, "-n", "default"],
    );
    assert!(
        poll_until(Duration::from_secs(30), || names(&data, RELEASES)
            == vec![name1.clone()]),
        "the deleted Release did not come back: {:?}",
        names(&data, RELEASES)
    );

    // release 2, with the channel document kdist keeps when it fetched one
    ok(
        &data,
        &[
            "components",
            "install",
            "--no-activate",
            "--from",
            r2.to_str().unwrap(),
        ],
    );
    std::fs::create_dir_all(data.path("components/channels")).unwrap();
    std::fs::write(
        data.path(&format!("components/channels/{channel}.yaml")),
        format!(
            "apiVersion: distro.eks.amazonaws.com/v1alpha1\nkind: ReleaseChannel\nmetadata:\n  creationTimestamp: null\n  name: {channel}\nspec:\n  snsTopicARN: arn:aws:sns:us-east-1:000000000000:test\nstatus:\n  active: true\n  latestRelease: 9\n"
        ),
    )
    .unwrap();
    ok(&data, &["components", "use", &format!("{channel}-2")]);
    assert!(
        poll_until(Duration::from_secs(60), || names(&data, RELEASES)
            == vec![name2.clone()]),
        "release 2 not shown or release 1 not pruned: {:?}",
        names(&data, RELEASES)
    );
    assert_eq!(annotation(&data).as_deref(), Some(name2.as_str()));
    let channel_object = get_json(&data, &[CHANNELS, &channel, "-n", "default"]).unwrap();
    assert_eq!(channel_object["status"]["latestRelease"], 9);
    assert_eq!(
        channel_object["spec"]["snsTopicARN"],
        "arn:aws:sns:us-east-1:000000000000:test"
    );
    assert_eq!(names(&data, CHANNELS), vec![channel.clone()]);
    assert!(
        poll_until(Duration::from_secs(30), || status_nodes(&data)
            .first()
            .is_some_and(|n| n["release"] == name2.as_str())),
        "{:#}",
        data.status()
    );
}

/// (name, control plane, release) of each row of NODES in `kdist status -o json`.
fn nodes(node: &NsNode) -> Vec<(String, bool, Option<String>)> {
    let status: serde_json::Value =
        serde_json::from_str(&node.ok(&["status", "-o", "json"])).unwrap();
    status["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or_default().to_string(),
                n["control_plane"] == true,
                n["release"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// The names of the Release objects, through `node`'s kubectl.
fn releases(node: &NsNode) -> Vec<String> {
    let out = node.ok(&["kubectl", "get", RELEASES, "-n", "default", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// A rolling upgrade on a control plane and a worker (each in its own network
/// namespace): the worker annotates its own Node through its kubelet's identity, the
/// control plane lists both nodes with their releases, shows both releases while the
/// worker is behind and prunes the old one once the worker has moved too.
#[test]
#[ignore = "needs Kubernetes server binaries: set KDIST_TEST_K8S_BIN"]
fn a_rolling_upgrade_shows_both_releases_until_every_node_moved() {
    let _host = common::exclusive_host();
    let bin = k8s_bin();
    let work = common::temp_dir("kdist-releases-work");
    let real = real_bins(&bin);
    let version = binary_version(&bin);
    let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
    let channel = format!("1-{minor}");
    let r1 = release_dir(work.path(), &channel, &version, 1, &real);
    let r2 = release_dir(work.path(), &channel, &version, 2, &real);
    let (name1, name2) = (
        format!("kubernetes-{channel}-eks-1"),
        format!("kubernetes-{channel}-eks-2"),
    );

    // dropped last: the nodes (declared after) stop and reset first
    let (_lab, namespaces, _) = netns::Lab::pair("krns", "10.204.0");
    let config = |name: &str, i: usize| {
        format!(
            "node_name: {name}\nnetwork:\n  egress: none\n  node_ip: 10.204.0.{i}\n  \
             pod_cidr: 10.{i}.0.0/16\nruntime:\n  cgroup_root: /kdist-rel-{name}\n\
             addons:\n  dns:\n    enabled: false\n"
        )
    };
    let make = |i: usize, tag: &str, name: &str| {
        let node = common::Node::new(tag);
        node.write_config(&config(name, i + 1));
        NsNode {
            ns: namespaces[i].clone(),
            path: std::env::var("PATH").unwrap_or_default(),
            node,
        }
    };
    let cp = make(0, "rlcp", "cp1");
    let worker = make(1, "rlw", "w1");
    for node in [&cp, &worker] {
        node.ok(&["components", "install", "--from", r1.to_str().unwrap()]);
    }
    cp.ok(&["start", "--timeout", "300"]);
    let v: serde_json::Value =
        serde_json::from_str(&cp.ok(&["add-node", "--worker", "-o", "json"])).unwrap();
    let connection = format!(
        "10.204.0.1:25000/{}/{}",
        v["token"].as_str().unwrap(),
        v["ca_sha256"].as_str().unwrap()
    );
    let out = worker.ok(&["join", &connection, "--worker", "--timeout", "300"]);
    assert!(out.contains("node w1 is Ready"), "{out}");

    let both_on = |release: &str| {
        vec![
            ("cp1".to_string(), true, Some(release.to_string())),
            ("w1".to_string(), false, Some(release.to_string())),
        ]
    };
    assert!(
        poll_until(Duration::from_secs(60), || nodes(&cp) == both_on(&name1)),
        "{:?}",
        nodes(&cp)
    );
    assert_eq!(releases(&cp), vec![name1.clone()]);
    let table = cp.ok(&["status"]);
    let w1 = table
        .lines()
        .find(|l| l.starts_with("w1 "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(w1.contains("worker") && w1.ends_with(&name1), "{table}");

    // the control plane moves first: both releases are shown
    cp.ok(&[
        "components",
        "install",
        "--no-activate",
        "--from",
        r2.to_str().unwrap(),
    ]);
    cp.ok(&["components", "use", &format!("{channel}-2")]);
    let rolling = vec![
        ("cp1".to_string(), true, Some(name2.clone())),
        ("w1".to_string(), false, Some(name1.clone())),
    ];
    assert!(
        poll_until(Duration::from_secs(60), || nodes(&cp) == rolling
            && releases(&cp) == vec![name1.clone(), name2.clone()]),
        "{:?} {:?}",
        nodes(&cp),
        releases(&cp)
    );

    // then the worker: its own identity annotates its Node, release 1 goes
    worker.ok(&[
        "components",
        "install",
        "--no-activate",
        "--from",
        r2.to_str().unwrap(),
    ]);
    worker.ok(&["components", "use", &format!("{channel}-2")]);
    assert!(
        poll_until(Duration::from_secs(60), || nodes(&cp) == both_on(&name2)
            && releases(&cp) == vec![name2.clone()]),
        "{:?} {:?}",
        nodes(&cp),
        releases(&cp)
    );
    let status: serde_json::Value =
        serde_json::from_str(&worker.ok(&["status", "-o", "json"])).unwrap();
    assert!(status.get("nodes").is_none(), "a worker lists no nodes");
    let controller = status["controllers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "releases")
        .cloned()
        .unwrap();
    assert_eq!(controller["ready"], true, "{controller}");
    assert!(
        controller["message"].as_str().unwrap().contains(&name2),
        "{controller}"
    );
}
