//! `kdist datastore migrate`: moves a running node between the embedded datastore and
//! etcd. The daemon stops the writers (the apiserver and what waits on it), starts the
//! target next to the source, has `datastore::migrate` copy and check every key, then
//! switches config.yaml in one atomic write, stops the old datastore, moves its data
//! aside (kept, never deleted) and starts the apiserver and the rest on the new one.
//! Before the switch any failure ends with the target's new data removed, config.yaml
//! untouched and the stopped services started again on the old datastore.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::error::SupervisorError;
use super::fleet::SharedFleet;
use super::service::{self, ServiceSpec};
use crate::config::{DataDir, DatastoreKind, NodeConfig, Role};
use crate::datastore::migrate::{self as copy, Side, Snapshot};

/// How long the target datastore gets to become ready.
const TARGET_READY: Duration = Duration::from_secs(90);
/// How long the restarted services get to become ready before the answer goes back.
const SERVICES_READY: Duration = Duration::from_secs(180);

/// What `kdist datastore migrate` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationReport {
    pub from: String,
    pub to: String,
    /// The source's revision the copy was taken at, and the target's afterwards.
    pub source_revision: i64,
    pub target_revision: i64,
    /// Keys copied and the SHA-256 over the sorted keys, values and leases, equal on
    /// both sides.
    pub keys: usize,
    pub sha256: String,
    /// Keys whose mod revision (resourceVersion) is the same on the target.
    pub mod_revisions_kept: usize,
    pub leases: usize,
    /// Keys not copied because their lease expired meanwhile.
    pub expired_keys: usize,
    /// Services stopped for the copy and started again on the target.
    pub restarted: Vec<String>,
    /// Whether they were all ready again when the answer was sent.
    pub ready: bool,
    /// Where the data of the old datastore is kept.
    pub old_data: String,
    pub seconds: f64,
}

fn refused(reason: impl Into<String>) -> SupervisorError {
    SupervisorError::MigrateRefused {
        reason: reason.into(),
    }
}

/// Services that wait, directly or through others, on `root`, in start order.
fn dependents(specs: &[ServiceSpec], root: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for spec in specs {
        if spec
            .after
            .iter()
            .any(|d| d == root || found.iter().any(|f| f == d))
        {
            found.push(spec.name.clone());
        }
    }
    found
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SupervisorError> + Send + 'static,
) -> Result<T, SupervisorError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| SupervisorError::Task {
            what: "migration".into(),
            source,
        })?
}

/// Waits until every one of `names` is ready on the board.
async fn wait_ready(fleet: &SharedFleet, names: &[String], timeout: Duration) -> bool {
    let mut rx = fleet.lock().await.board.subscribe();
    let all = rx.wait_for(|map| names.iter().all(|n| map.get(n).is_some_and(|s| s.ready)));
    matches!(tokio::time::timeout(timeout, all).await, Ok(Ok(_)))
}

/// Waits for the target datastore to be ready; a target that exits fails at once.
async fn wait_target(fleet: &SharedFleet, name: &str) -> Result<(), String> {
    use super::status::ServiceState;
    let mut rx = fleet.lock().await.board.subscribe();
    let settled = rx.wait_for(|map| {
        map.get(name).is_some_and(|s| {
            s.ready || matches!(s.state, ServiceState::Backoff | ServiceState::Crashloop)
        })
    });
    match tokio::time::timeout(TARGET_READY, settled).await {
        Ok(Ok(map)) => match map.get(name) {
            Some(s) if s.ready => Ok(()),
            Some(s) => Err(format!(
                "{name} exited while starting ({})",
                s.last_exit
                    .as_deref()
                    .or(s.message.as_deref())
                    .unwrap_or("no reason given")
            )),
            None => Err(format!("{name} is not on the board")),
        },
        Ok(Err(_)) => Err("the daemon is stopping".into()),
        Err(_) => Err(format!("{name} was not ready within {TARGET_READY:?}")),
    }
}

/// Runs the migration of this node's datastore to `to`.
pub(crate) async fn migrate(
    fleet: &SharedFleet,
    data: &DataDir,
    to: DatastoreKind,
) -> Result<MigrationReport, SupervisorError> {
    let started = Instant::now();
    let Prepared {
        config,
        new_specs,
        src,
        source_name,
    } = prepare(fleet, data, to).await?;
    let from = config.datastore;
    let (old_name, new_name) = (from.service_name(), to.service_name());
    let (old_specs, restarted) = stop_writers(fleet, old_name, from, to).await;

    let mut target_started = false;
    let outcome = copy_and_check(
        fleet,
        data,
        &src,
        &source_name,
        Side::of(data, to, config.etcd.client_port),
        &new_specs,
        &mut target_started,
    )
    .await;
    // the switch (config.yaml) is the last step that can fail: from there on the node
    // runs on the target
    let switched = match outcome {
        Ok(done) => match NodeConfig::set_datastore(data, to) {
            Ok(_) => Ok(done),
            Err(err) => Err(("writing config.yaml".to_string(), err.into())),
        },
        Err(failed) => Err(failed),
    };
    let (snap, checked) = match switched {
        Ok(done) => done,
        Err((step, err)) => {
            warn!(step = %step, error = %crate::report::error_chain(&err), "datastore migration failed; rolling back");
            rollback(
                fleet,
                data,
                to,
                new_name,
                target_started,
                &old_specs,
                &restarted,
            )
            .await;
            return Err(SupervisorError::MigrateFailed {
                step,
                from: from.as_str().into(),
                source: Box::new(err),
            });
        }
    };
    info!(
        to = to.as_str(),
        "datastore migration: config.yaml switched"
    );
    hand_over(fleet, old_name, &new_specs, &restarted).await;
    let old_data = retire_old(data, from).await;
    let ready = wait_ready(fleet, &restarted, SERVICES_READY).await;
    let report = MigrationReport {
        from: from.as_str().into(),
        to: to.as_str().into(),
        source_revision: snap.revision,
        target_revision: checked.revision,
        keys: checked.keys,
        sha256: checked.sha256,
        mod_revisions_kept: checked.mod_revisions_kept,
        leases: snap.leases.len(),
        expired_keys: snap.expired,
        restarted,
        ready,
        old_data,
        seconds: started.elapsed().as_secs_f64(),
    };
    info!(keys = report.keys, sha256 = %report.sha256, seconds = report.seconds, "datastore migration done");
    Ok(report)
}

/// What a migration that may go ahead starts from.
struct Prepared {
    config: NodeConfig,
    /// The services planned for the target datastore, their args files written.
    new_specs: Vec<ServiceSpec>,
    /// A connection to the source datastore, and its name in errors.
    src: tonic::transport::Channel,
    source_name: String,
}

/// Refuses what cannot be migrated (same kind, a worker, the source not running, a
/// target with data, a multi-member etcd), plans the target's services and connects to
/// the source.
async fn prepare(
    fleet: &SharedFleet,
    data: &DataDir,
    to: DatastoreKind,
) -> Result<Prepared, SupervisorError> {
    let config = NodeConfig::load(data)?;
    let from = config.datastore;
    if from == to {
        return Err(refused(format!(
            "this node already runs the {} datastore ({})",
            to.as_str(),
            data.config_file().display()
        )));
    }
    if config.role == Role::Worker {
        return Err(refused(
            "a worker runs no datastore; migrate on a control-plane node",
        ));
    }
    let old_name = from.service_name();
    let running_old = fleet.lock().await.sender(old_name).is_some();
    if !running_old {
        return Err(refused(format!(
            "the {old_name} service does not run on this node (config.yaml `disable`?)"
        )));
    }
    copy::check_target_free(data, to)?;
    let mut new_config = config.clone();
    new_config.datastore = to;
    let new_specs = {
        let (d, c) = (data.clone(), new_config.clone());
        blocking(move || {
            let host = service::HostInputs::probe(&d, &c)?;
            let specs = service::plan(&d, &c, &host)?;
            service::write_default_args(&specs)?;
            Ok(specs)
        })
        .await?
    };
    let source = Side::of(data, from, config.etcd.client_port);
    let source_name = source.name();
    let src = source.connect().await?;
    if from == DatastoreKind::Etcd {
        let members = copy::member_count(&src, &source_name).await?;
        if members > 1 {
            return Err(refused(format!(
                "this node's etcd has {members} members; remove the other nodes first \
                 (`kdist remove-node`), the embedded datastore serves one node"
            )));
        }
    }
    Ok(Prepared {
        config,
        new_specs,
        src,
        source_name,
    })
}

/// Stops the services that depend on the old datastore, dependents first; returns the
/// specs as they were (for a rollback) and the names of the stopped services.
async fn stop_writers(
    fleet: &SharedFleet,
    old_name: &str,
    from: DatastoreKind,
    to: DatastoreKind,
) -> (Vec<ServiceSpec>, Vec<String>) {
    let (old_specs, restarted) = {
        let fleet = fleet.lock().await;
        (fleet.specs.clone(), dependents(&fleet.specs, old_name))
    };
    info!(from = from.as_str(), to = to.as_str(), stopping = ?restarted, "datastore migration: stopping writers");
    let writers: Vec<String> = restarted.iter().rev().cloned().collect();
    super::fleet::stop(fleet, &writers).await;
    (old_specs, restarted)
}

/// After the switch: the old datastore stops, the fleet takes the new specs and the
/// stopped services start again, on the target.
async fn hand_over(
    fleet: &SharedFleet,
    old_name: &str,
    new_specs: &[ServiceSpec],
    restarted: &[String],
) {
    super::fleet::stop(fleet, &[old_name.to_string()]).await;
    let mut fleet = fleet.lock().await;
    fleet.specs = new_specs.to_vec();
    let names: Vec<String> = new_specs.iter().map(|s| s.name.clone()).collect();
    fleet.board.set_services(&names);
    for spec in new_specs.iter().filter(|s| restarted.contains(&s.name)) {
        fleet.spawn(spec.clone());
    }
}

/// Moves the old datastore's data aside; says where it is (left in place when that
/// failed, with a warning).
async fn retire_old(data: &DataDir, from: DatastoreKind) -> String {
    let d = data.clone();
    match blocking(move || Ok(copy::retire(&d, from)?)).await {
        Ok(path) => path.display().to_string(),
        Err(e) => {
            let kept = copy::location(data, from);
            warn!(error = %crate::report::error_chain(&e), "old datastore data left in place");
            kept.display().to_string()
        }
    }
}

/// What the checks found on the target.
struct Checked {
    revision: i64,
    keys: usize,
    sha256: String,
    mod_revisions_kept: usize,
}

/// Reads the source, starts and fills the target, and compares both. Errors carry the
/// step they happened in.
async fn copy_and_check(
    fleet: &SharedFleet,
    data: &DataDir,
    src: &tonic::transport::Channel,
    source_name: &str,
    target: Side,
    new_specs: &[ServiceSpec],
    target_started: &mut bool,
) -> Result<(Snapshot, Checked), (String, SupervisorError)> {
    let snap = copy::read(src, source_name)
        .await
        .map_err(at("reading the source datastore"))?;
    info!(
        keys = snap.kvs.len(),
        revision = snap.revision,
        "datastore migration: source read"
    );
    start_target(fleet, data, target.kind(), new_specs, &snap, target_started).await?;
    let written = fill_target(&target, &snap).await?;
    let source = (src, source_name);
    let checked = verify_copy(source, &target, &snap, &written).await?;
    Ok((snap, checked))
}

/// Maps a datastore error to the step it happened in.
fn at(
    step: &str,
) -> impl FnOnce(crate::datastore::DatastoreError) -> (String, SupervisorError) + use<> {
    let step = step.to_string();
    move |e| (step, SupervisorError::from(e))
}

/// Starts the target datastore next to the source (the embedded one already holding
/// the snapshot) and waits until it is ready.
async fn start_target(
    fleet: &SharedFleet,
    data: &DataDir,
    to: DatastoreKind,
    new_specs: &[ServiceSpec],
    snap: &Snapshot,
    target_started: &mut bool,
) -> Result<(), (String, SupervisorError)> {
    let new_name = to.service_name();
    let spec = new_specs
        .iter()
        .find(|s| s.name == new_name)
        .cloned()
        .ok_or_else(|| {
            (
                "planning the target".to_string(),
                refused(format!("the {new_name} service is disabled in config.yaml")),
            )
        })?;
    if to == DatastoreKind::Embedded {
        let (path, s) = (crate::datastore::db_path(data), snap.clone());
        blocking(move || Ok(copy::write_embedded(&path, &s)?))
            .await
            .map_err(|e| ("writing the embedded datastore".to_string(), e))?;
    }
    {
        let mut fleet = fleet.lock().await;
        let mut names: Vec<String> = fleet.specs.iter().map(|s| s.name.clone()).collect();
        names.insert(0, new_name.to_string());
        fleet.board.set_services(&names);
        fleet.spawn(spec);
        *target_started = true;
    }
    if let Err(reason) = wait_target(fleet, new_name).await {
        return Err((
            format!("starting {new_name}"),
            refused(format!("{reason}; see `kdist logs {new_name}`")),
        ));
    }
    info!(service = new_name, "datastore migration: target ready");
    Ok(())
}

/// Writes the snapshot into an etcd target (the embedded one got it before it started)
/// and reads the target back.
async fn fill_target(
    target: &Side,
    snap: &Snapshot,
) -> Result<Snapshot, (String, SupervisorError)> {
    let target_name = target.name();
    let dst = target
        .connect()
        .await
        .map_err(at("connecting to the target"))?;
    if target.kind() == DatastoreKind::Etcd {
        let copied = copy::copy_to_etcd(&dst, &target_name, snap)
            .await
            .map_err(at("copying into etcd"))?;
        info!(
            pad_writes = copied.pad_writes,
            revision = copied.revision,
            "datastore migration: keys written"
        );
    }
    copy::read(&dst, &target_name)
        .await
        .map_err(at("reading the target back"))
}

/// Compares the target with the source's snapshot (keys whose lease ran out aside), and
/// the source with itself: nothing may have written to it meanwhile.
async fn verify_copy(
    (src, source_name): (&tonic::transport::Channel, &str),
    target: &Side,
    snap: &Snapshot,
    written: &Snapshot,
) -> Result<Checked, (String, SupervisorError)> {
    let target_name = target.name();
    let verify = |step: &str, reason: String| {
        (
            step.to_string(),
            SupervisorError::Datastore(crate::datastore::DatastoreError::Verify { reason }),
        )
    };
    // a lease may have run out meanwhile, on either side: compare what both still hold
    let alive = |kv: &crate::datastore::proto::mvccpb::KeyValue| {
        kv.lease == 0 || written.leases.contains_key(&kv.lease)
    };
    let mut expected = snap.clone();
    expected.kvs.retain(alive);
    // the embedded target keeps create revision and version too
    let exact = target.kind() == DatastoreKind::Embedded;
    let (want, got) = (expected.checksum(exact), written.checksum(exact));
    if want != got {
        return Err(verify(
            "checking the copy",
            format!(
                "source {source_name} has {} keys with SHA-256 {}, target {target_name} \
                 has {} keys with SHA-256 {}",
                want.keys, want.sha256, got.keys, got.sha256
            ),
        ));
    }
    if written.revision < snap.revision {
        return Err(verify(
            "checking the copy",
            format!(
                "target revision {} is below the source's {}",
                written.revision, snap.revision
            ),
        ));
    }
    // nobody else may have written to the source meanwhile
    let after = copy::read(src, source_name)
        .await
        .map_err(at("reading the source again"))?;
    let mut still = snap.clone();
    still
        .kvs
        .retain(|kv| kv.lease == 0 || after.leases.contains_key(&kv.lease));
    if still.checksum(true) != after.checksum(true) {
        return Err(verify(
            "checking the source did not change",
            format!(
                "{source_name} changed during the migration (revision {} then {}): \
                 something other than the stopped services writes to it",
                snap.revision, after.revision
            ),
        ));
    }
    let by_key: std::collections::HashMap<&[u8], i64> = expected
        .kvs
        .iter()
        .map(|kv| (kv.key.as_slice(), kv.mod_revision))
        .collect();
    let mod_revisions_kept = written
        .kvs
        .iter()
        .filter(|kv| by_key.get(kv.key.as_slice()) == Some(&kv.mod_revision))
        .count();
    Ok(Checked {
        revision: written.revision,
        keys: got.keys,
        sha256: got.sha256,
        mod_revisions_kept,
    })
}

/// Undoes a migration that did not switch: the target stops and its new data goes, the
/// stopped services start again on the old datastore (which kept running).
async fn rollback(
    fleet: &SharedFleet,
    data: &DataDir,
    to: DatastoreKind,
    new_name: &str,
    target_started: bool,
    old_specs: &[ServiceSpec],
    restarted: &[String],
) {
    if target_started {
        super::fleet::stop(fleet, &[new_name.to_string()]).await;
    }
    copy::discard_target(data, to);
    let mut fleet = fleet.lock().await;
    let names: Vec<String> = old_specs.iter().map(|s| s.name.clone()).collect();
    fleet.board.set_services(&names);
    fleet.specs = old_specs.to_vec();
    for spec in old_specs.iter().filter(|s| restarted.contains(&s.name)) {
        fleet.spawn(spec.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependents_follow_the_chain_from_the_datastore() {
        let spec = |name: &str, after: &[&str]| ServiceSpec {
            name: name.into(),
            description: String::new(),
            binary: None,
            release: None,
            after: after.iter().map(|s| s.to_string()).collect(),
            stop_grace: Duration::ZERO,
            probe: service::Probe::Unix { path: "x".into() },
            args_file: "x".into(),
            vars: Default::default(),
            env: Default::default(),
            extra_args: Vec::new(),
            page_out_after: None,
        };
        let specs = [
            spec("datastore", &[]),
            spec("containerd", &[]),
            spec("kube-apiserver", &["datastore"]),
            spec("kube-scheduler", &["kube-apiserver"]),
            spec("kubelet", &["containerd"]),
        ];
        assert_eq!(
            dependents(&specs, "datastore"),
            ["kube-apiserver", "kube-scheduler"]
        );
        assert!(dependents(&specs, "etcd").is_empty());
    }
}
