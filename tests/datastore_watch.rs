//! Watch delivery, checked against `kdist datastore serve` and a real etcd in the same
//! run with the same rules (see docs/watch-delivery.md):
//! - a watch call returns once the watch exists on the server (etcd clients rely on it);
//! - under concurrent writers and compactions, watchers created and cancelled all the
//!   time get exactly the events after their created revision (or from their start
//!   revision), in order, no gap, no duplicate, or a compacted error where etcd gives one;
//!   progress notifications never name a revision whose events are not all sent;
//! - a watch resumed from the last revision it saw (event or progress) after the server
//!   was killed with SIGKILL misses nothing and repeats nothing.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kdist::datastore::client;
use kdist::datastore::proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    StatusRequest, TxnRequest, WatchCancelRequest, WatchCreateRequest, WatchProgressRequest,
    WatchRequest, WatchResponse, compare, kv_client::KvClient,
    maintenance_client::MaintenanceClient, request_op, response_op, watch_client::WatchClient,
    watch_create_request, watch_request,
};
use kdist::datastore::proto::mvccpb::{Event, KeyValue, event::EventType};
use rand::{RngExt, SeedableRng};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use common::*;

/// How long any one expected response may take before it counts as lost.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// The servers under test

/// A server under test that can be killed with SIGKILL and started again on its data.
enum Server {
    Kdist {
        dir: std::path::PathBuf,
        ds: Datastore,
    },
    Etcd {
        dir: std::path::PathBuf,
        etcd: Etcd,
    },
}

/// Progress notifications every second on both (etcd's default is 10 minutes).
const KDIST_PROGRESS: [&str; 2] = ["--progress-interval", "1"];
const ETCD_PROGRESS: [&str; 1] = ["--experimental-watch-progress-notify-interval=1s"];

impl Server {
    fn kdist(dir: &std::path::Path) -> Server {
        Server::Kdist {
            dir: dir.to_path_buf(),
            ds: Datastore::start_with(dir, &KDIST_PROGRESS),
        }
    }

    fn etcd(dir: &std::path::Path) -> Server {
        if !etcd_available() {
            panic!("this test needs /usr/bin/etcd (Debian package etcd-server)");
        }
        Server::Etcd {
            dir: dir.to_path_buf(),
            etcd: Etcd::start_with(dir, &ETCD_PROGRESS),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Server::Kdist { .. } => "kdist",
            Server::Etcd { .. } => "etcd",
        }
    }

    fn endpoint(&self) -> String {
        match self {
            Server::Kdist { ds, .. } => ds.endpoint(),
            Server::Etcd { etcd, .. } => etcd.endpoint(),
        }
    }

    /// kill -9, then the same server on the same data (for etcd, on the same ports).
    fn kill9_and_restart(&mut self) {
        match self {
            Server::Kdist { dir, ds } => {
                ds.proc.kill9();
                *ds = Datastore::start_with(dir, &KDIST_PROGRESS);
            }
            Server::Etcd { dir, etcd } => {
                etcd.proc.kill9();
                *etcd = Etcd::start_at(dir, etcd.port, etcd.peer_port, &ETCD_PROGRESS);
            }
        }
    }
}

async fn connect(endpoint: &str) -> Channel {
    client::connect(endpoint).await.expect("connect")
}

/// Whether the server promises that a progress response to a progress request names a
/// revision up to which every watcher of the stream has been sent all its events:
/// etcd does from 3.5.8 on (kdist reports 3.5.16); etcd 3.4 answers at once with the
/// store's revision read when the request came, which can be below an event it sends
/// just before that answer, or above events of a watcher still catching up.
async fn promises_synced_stream_progress(channel: Channel) -> (String, bool) {
    let version = MaintenanceClient::new(channel)
        .status(StatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .version;
    let parts: Vec<u32> = version.split('.').filter_map(|p| p.parse().ok()).collect();
    let promised = parts.len() == 3 && (parts[0], parts[1], parts[2]) >= (3, 5, 8);
    (version, promised)
}

// ---------------------------------------------------------------------------------------
// The watch call itself

/// etcd (grpc-go) sends a watch stream's response headers with its first message, the
/// created response, so a client call that waits for the headers (tonic's, and so the
/// etcd-client crate's `watch()`) returns only once the watch exists. A put issued after
/// that call must be delivered.
async fn watch_call_returns_once_the_watch_exists(server: &Server) {
    let channel = connect(&server.endpoint()).await;
    let (tx, rx) = mpsc::channel(4);
    let create_sent = Arc::new(AtomicBool::new(false));
    let call = {
        let (channel, create_sent) = (channel.clone(), create_sent.clone());
        tokio::spawn(async move {
            let responses = WatchClient::new(channel)
                .watch(ReceiverStream::new(rx))
                .await
                .expect("watch call");
            (create_sent.load(Ordering::SeqCst), responses.into_inner())
        })
    };
    // Not synchronisation: a call that wrongly returns before the create request exists
    // gets this long to do so; a correct one cannot return before the flag is set.
    tokio::time::sleep(Duration::from_millis(300)).await;
    create_sent.store(true, Ordering::SeqCst);
    tx.send(create(WatchCreateRequest {
        key: b"/call/".to_vec(),
        range_end: b"/call0".to_vec(),
        ..Default::default()
    }))
    .await
    .expect("send create");
    let (returned_after_create, mut responses) = call.await.expect("watch call task");
    assert!(
        returned_after_create,
        "{}: the watch call returned before the watch was created",
        server.name()
    );
    let put = KvClient::new(channel)
        .put(PutRequest {
            key: b"/call/a".to_vec(),
            value: b"1".to_vec(),
            ..Default::default()
        })
        .await
        .expect("put")
        .into_inner();
    let put_rev = put.header.expect("header").revision;
    let created = next_response(&mut responses, "created").await;
    assert!(created.created);
    let created_rev = created.header.expect("header").revision;
    assert!(
        created_rev < put_rev,
        "created at {created_rev}, put at {put_rev}"
    );
    let event = next_response(&mut responses, "the put's event").await;
    assert_eq!(event.events.len(), 1);
    assert_eq!(
        event.events[0].kv.as_ref().expect("kv").mod_revision,
        put_rev
    );
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_call_returns_once_the_watch_exists() {
    on_both("kdist-watch-call", |server| async move {
        watch_call_returns_once_the_watch_exists(&server).await
    })
    .await;
}

/// Runs `check` against kdist, then against etcd, each on its own data dir, and says how
/// each did before failing if either did.
async fn on_both<T, Fut>(tag: &str, check: impl Fn(Server) -> Fut) -> (T, T)
where
    T: Send + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let dir = temp_dir(tag);
    let mut outcomes = Vec::new();
    for name in ["kdist", "etcd"] {
        let data = dir.path().join(name);
        std::fs::create_dir_all(&data).expect("data dir");
        let server = if name == "kdist" {
            Server::kdist(&data)
        } else {
            Server::etcd(&data)
        };
        // its own task, so that a failure on one still lets the other run
        let outcome = tokio::spawn(check(server)).await;
        eprintln!(
            "{tag}: {name} {}",
            if outcome.is_ok() { "PASS" } else { "FAIL" }
        );
        outcomes.push(outcome);
    }
    let etcd = outcomes.pop().expect("etcd outcome");
    let kdist = outcomes.pop().expect("kdist outcome");
    match (kdist, etcd) {
        (Ok(kdist), Ok(etcd)) => (kdist, etcd),
        (kdist, etcd) => panic!(
            "{tag}: kdist {}, etcd {} (the failure is printed above)",
            if kdist.is_ok() { "passed" } else { "failed" },
            if etcd.is_ok() { "passed" } else { "failed" },
        ),
    }
}

fn create(create: WatchCreateRequest) -> WatchRequest {
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(create)),
    }
}

async fn next_response(responses: &mut Streaming<WatchResponse>, what: &str) -> WatchResponse {
    match tokio::time::timeout(RESPONSE_TIMEOUT, responses.message()).await {
        Ok(Ok(Some(resp))) => resp,
        Ok(Ok(None)) => panic!("watch stream ended while waiting for {what}"),
        Ok(Err(status)) => panic!("watch stream failed while waiting for {what}: {status}"),
        Err(_) => panic!("no watch response within {RESPONSE_TIMEOUT:?} while waiting for {what}"),
    }
}

// ---------------------------------------------------------------------------------------
// The history, as the writers were told it

/// One event as a writer learnt of it from its answer (every write asks for prev_kv).
#[derive(Debug, Clone)]
struct Ev {
    put: bool,
    key: Vec<u8>,
    value: Vec<u8>,
    rev: i64,
    create_rev: i64,
    version: i64,
    /// The previous value and its revision.
    prev: Option<(Vec<u8>, i64)>,
}

fn put_ev(key: Vec<u8>, value: Vec<u8>, rev: i64, prev: Option<&KeyValue>) -> Ev {
    Ev {
        put: true,
        key,
        value,
        rev,
        create_rev: prev.map_or(rev, |p| p.create_revision),
        version: prev.map_or(1, |p| p.version + 1),
        prev: prev.map(|p| (p.value.clone(), p.mod_revision)),
    }
}

/// A delete's events, in key order as its deleted keys.
fn delete_evs(rev: i64, deleted: &[KeyValue]) -> Vec<Ev> {
    deleted
        .iter()
        .map(|p| Ev {
            put: false,
            key: p.key.clone(),
            value: Vec::new(),
            rev,
            create_rev: 0,
            version: 0,
            prev: Some((p.value.clone(), p.mod_revision)),
        })
        .collect()
}

/// Every revision the writers were answered with, and its events.
#[derive(Default)]
struct History {
    revs: Mutex<BTreeMap<i64, Vec<Ev>>>,
}

impl History {
    fn record(&self, rev: i64, events: Vec<Ev>) -> Result<(), String> {
        if events.is_empty() {
            return Ok(());
        }
        let mut revs = self.revs.lock().expect("history");
        if revs.insert(rev, events).is_some() {
            return Err(format!("two writes were answered with revision {rev}"));
        }
        Ok(())
    }

    fn latest(&self) -> i64 {
        let revs = self.revs.lock().expect("history");
        revs.keys().next_back().copied().unwrap_or(0)
    }

    /// The newest revision in `(after, upto]` whose events are all puts (a compaction
    /// there keeps all of them: etcd drops a tombstone at the compacted revision itself,
    /// so a watch from exactly there would miss that delete).
    fn puts_only_revision(&self, after: i64, upto: i64) -> Option<i64> {
        if upto <= after {
            return None;
        }
        let revs = self.revs.lock().expect("history");
        revs.range(after + 1..=upto)
            .rev()
            .find(|(_, evs)| evs.iter().all(|e| e.put))
            .map(|(rev, _)| *rev)
    }
}

/// Compactions: the newest revision asked for, and the newest one answered.
#[derive(Default)]
struct Compactions {
    requested: AtomicI64,
    done: AtomicI64,
    count: AtomicUsize,
}

/// Keys the writers touch; `/t/x` is outside the `/s/` prefix.
const KEYS: [&str; 9] = [
    "/s/a", "/s/b", "/s/c", "/s/d", "/s/e/1", "/s/e/2", "/s/e/3", "/s/f", "/t/x",
];

fn rpc_error(what: &str) -> impl Fn(tonic::Status) -> String + '_ {
    move |status| format!("{what}: {status}")
}

fn header_rev(header: Option<&kdist::datastore::proto::etcdserverpb::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision)
}

/// Puts, deletes (single keys and a range) and transactions, each answer recorded.
async fn writer(
    channel: Channel,
    id: usize,
    size: Arc<Size>,
    history: Arc<History>,
    quiet: Arc<tokio::sync::Barrier>,
) -> Result<usize, String> {
    let per_burst = size.writes.div_ceil(size.bursts);
    let writes = size.writes;
    let mut kv = KvClient::new(channel);
    let mut rng = rand::rngs::StdRng::seed_from_u64(id as u64 * 7919 + 1);
    let key =
        |rng: &mut rand::rngs::StdRng| KEYS[rng.random_range(0..KEYS.len())].as_bytes().to_vec();
    let mut done = 0;
    for n in 0..writes {
        if n > 0 && n % per_burst == 0 {
            // A quiet spell of two progress intervals after each burst, so watchers that
            // asked for progress notifications get them.
            quiet.wait().await;
            tokio::time::sleep(Duration::from_millis(2200)).await;
        }
        let value = format!("w{id}-{n}").into_bytes();
        match rng.random_range(0..20) {
            0..=9 => {
                let k = key(&mut rng);
                let resp = kv
                    .put(PutRequest {
                        key: k.clone(),
                        value: value.clone(),
                        prev_kv: true,
                        ..Default::default()
                    })
                    .await
                    .map_err(rpc_error("put"))?
                    .into_inner();
                let rev = header_rev(resp.header.as_ref());
                history.record(rev, vec![put_ev(k, value, rev, resp.prev_kv.as_ref())])?;
            }
            10..=13 => {
                let (k, end) = if rng.random_range(0..4) == 0 {
                    (b"/s/e/".to_vec(), b"/s/e0".to_vec())
                } else {
                    (key(&mut rng), Vec::new())
                };
                let resp = kv
                    .delete_range(DeleteRangeRequest {
                        key: k,
                        range_end: end,
                        prev_kv: true,
                    })
                    .await
                    .map_err(rpc_error("delete"))?
                    .into_inner();
                let rev = header_rev(resp.header.as_ref());
                history.record(rev, delete_evs(rev, &resp.prev_kvs))?;
            }
            _ => {
                let k1 = key(&mut rng);
                let mut k2 = key(&mut rng);
                while k2 == k1 {
                    k2 = key(&mut rng);
                }
                let put = |key: &[u8], value: &[u8]| RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: key.to_vec(),
                        value: value.to_vec(),
                        prev_kv: true,
                        ..Default::default()
                    })),
                };
                let success = vec![
                    put(&k1, &value),
                    RequestOp {
                        request: Some(request_op::Request::RequestDeleteRange(
                            DeleteRangeRequest {
                                key: k2.clone(),
                                range_end: Vec::new(),
                                prev_kv: true,
                            },
                        )),
                    },
                ];
                let failure = vec![put(&k2, &value)];
                let resp = kv
                    .txn(TxnRequest {
                        compare: vec![Compare {
                            result: compare::CompareResult::Greater as i32,
                            target: compare::CompareTarget::Version as i32,
                            key: k1.clone(),
                            range_end: Vec::new(),
                            target_union: Some(compare::TargetUnion::Version(0)),
                        }],
                        success: success.clone(),
                        failure: failure.clone(),
                    })
                    .await
                    .map_err(rpc_error("txn"))?
                    .into_inner();
                let rev = header_rev(resp.header.as_ref());
                let ops = if resp.succeeded { success } else { failure };
                let mut events = Vec::new();
                for (op, answer) in ops.into_iter().zip(resp.responses) {
                    use request_op::Request as Q;
                    use response_op::Response as A;
                    match (op.request, answer.response) {
                        (Some(Q::RequestPut(p)), Some(A::ResponsePut(a))) => {
                            events.push(put_ev(p.key, p.value, rev, a.prev_kv.as_ref()))
                        }
                        (Some(Q::RequestDeleteRange(_)), Some(A::ResponseDeleteRange(a))) => {
                            events.extend(delete_evs(rev, &a.prev_kvs))
                        }
                        other => return Err(format!("txn answered {other:?}")),
                    }
                }
                history.record(rev, events)?;
            }
        }
        done += 1;
    }
    Ok(done)
}

/// Compacts every 40 revisions or so, to a revision 10 behind the newest, alternately
/// physical, until the writers are done.
async fn compactor(
    channel: Channel,
    history: Arc<History>,
    compactions: Arc<Compactions>,
    writers_done: Arc<AtomicBool>,
) -> Result<(), String> {
    let mut kv = KvClient::new(channel);
    let mut last = 0;
    let mut physical = false;
    while !writers_done.load(Ordering::SeqCst) {
        let latest = history.latest();
        let Some(rev) = history
            .puts_only_revision(last, latest - 10)
            .filter(|&rev| rev >= last + 30)
        else {
            // polling the writers' progress, not waiting for the server
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        compactions.requested.fetch_max(rev, Ordering::SeqCst);
        kv.compact(CompactionRequest {
            revision: rev,
            physical,
        })
        .await
        .map_err(rpc_error("compact"))?;
        compactions.done.fetch_max(rev, Ordering::SeqCst);
        compactions.count.fetch_add(1, Ordering::SeqCst);
        last = rev;
        physical = !physical;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Watch streams: watchers created and cancelled all the time, every response logged

/// What a watcher asked for.
#[derive(Debug, Clone)]
struct Spec {
    key: String,
    end: String,
    /// 0: from now on.
    start: i64,
    prev_kv: bool,
    progress_notify: bool,
    no_put: bool,
    no_delete: bool,
}

impl Spec {
    fn random(rng: &mut rand::rngs::StdRng, latest: i64) -> Spec {
        let (key, end) = match rng.random_range(0..5) {
            0 => (KEYS[rng.random_range(0..KEYS.len())].into(), String::new()),
            1 => ("/s/".into(), "/s0".into()),
            2 => ("/s/e/".into(), "/s/e0".into()),
            3 => ("/s/b".into(), "/s/e/2".into()),
            _ => ("\0".into(), "\0".into()),
        };
        let start = match rng.random_range(0..5) {
            0..=2 => 0,
            3 => (latest - rng.random_range(0..80)).max(1),
            _ => latest + rng.random_range(1..6),
        };
        let filter = rng.random_range(0..10);
        Spec {
            key,
            end,
            start,
            prev_kv: rng.random_range(0..2) == 0,
            progress_notify: rng.random_range(0..2) == 0,
            no_put: filter == 0,
            no_delete: filter == 1,
        }
    }

    fn request(&self) -> WatchCreateRequest {
        let mut filters = Vec::new();
        if self.no_put {
            filters.push(watch_create_request::FilterType::Noput as i32);
        }
        if self.no_delete {
            filters.push(watch_create_request::FilterType::Nodelete as i32);
        }
        WatchCreateRequest {
            key: self.key.clone().into_bytes(),
            range_end: self.end.clone().into_bytes(),
            start_revision: self.start,
            progress_notify: self.progress_notify,
            filters,
            prev_kv: self.prev_kv,
            ..Default::default()
        }
    }

    fn contains(&self, key: &[u8]) -> bool {
        let (start, end) = (self.key.as_bytes(), self.end.as_bytes());
        if end.is_empty() {
            key == start
        } else if end == [0] {
            key >= start
        } else {
            key >= start && key < end
        }
    }

    /// The first revision the watcher should get events of.
    fn from(&self, created_rev: i64) -> i64 {
        if self.start > 0 {
            self.start
        } else {
            created_rev + 1
        }
    }

    /// The events the watcher should get, in order, from `from` on.
    fn expected<'h>(&self, history: &'h BTreeMap<i64, Vec<Ev>>, from: i64) -> Vec<&'h Ev> {
        history
            .range(from..)
            .flat_map(|(_, evs)| evs)
            .filter(|e| self.contains(&e.key) && if e.put { !self.no_put } else { !self.no_delete })
            .collect()
    }
}

/// One response (or one event of it) as a stream received it, in order.
#[derive(Debug)]
enum Entry {
    Created {
        id: i64,
        spec: Spec,
        rev: i64,
        /// The newest compaction answered before the create was sent.
        compacted_before: i64,
    },
    Event {
        id: i64,
        event: Event,
    },
    /// A progress notification to one watcher.
    Progress {
        id: i64,
        rev: i64,
    },
    /// The answer to a progress request.
    StreamProgress {
        rev: i64,
    },
    Compacted {
        id: i64,
        compact_rev: i64,
    },
    Canceled {
        id: i64,
        /// Cancelled at the end, once it had all its events.
        at_end: bool,
    },
}

struct WatchLog {
    tx: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
    log: Vec<Entry>,
    /// Live watchers: spec, first revision, events received.
    live: BTreeMap<i64, (Spec, i64, usize)>,
    pending_create: Option<(Spec, i64)>,
    at_end: bool,
}

/// What one response was, for whoever waits for it.
#[derive(PartialEq)]
enum Got {
    Created(i64),
    Canceled(i64),
    StreamProgress,
    Other,
}

impl WatchLog {
    async fn open(
        channel: Channel,
        spec: Spec,
        compactions: &Compactions,
    ) -> Result<WatchLog, String> {
        let (tx, rx) = mpsc::channel(16);
        let compacted_before = compactions.done.load(Ordering::SeqCst);
        tx.send(create(spec.request()))
            .await
            .map_err(|_| "watch request channel closed".to_string())?;
        let responses = WatchClient::new(channel)
            .watch(ReceiverStream::new(rx))
            .await
            .map_err(rpc_error("watch"))?
            .into_inner();
        let mut stream = WatchLog {
            tx,
            responses,
            log: Vec::new(),
            live: BTreeMap::new(),
            pending_create: Some((spec, compacted_before)),
            at_end: false,
        };
        stream
            .wait_for(|got| matches!(got, Got::Created(_)), "created")
            .await?;
        Ok(stream)
    }

    async fn send(&mut self, request: watch_request::RequestUnion) -> Result<(), String> {
        self.tx
            .send(WatchRequest {
                request_union: Some(request),
            })
            .await
            .map_err(|_| "watch request channel closed".to_string())
    }

    async fn recv(&mut self, timeout: Duration) -> Result<Option<WatchResponse>, String> {
        match tokio::time::timeout(timeout, self.responses.message()).await {
            Ok(Ok(Some(resp))) => Ok(Some(resp)),
            Ok(Ok(None)) => Err("watch stream ended".into()),
            Ok(Err(status)) => Err(format!("watch stream failed: {status}")),
            Err(_) => Ok(None),
        }
    }

    /// Logs one response.
    fn note(&mut self, resp: WatchResponse) -> Result<Got, String> {
        let id = resp.watch_id;
        let rev = header_rev(resp.header.as_ref());
        if resp.created {
            if resp.canceled {
                return Err(format!("watch refused: {}", resp.cancel_reason));
            }
            let (spec, compacted_before) = self
                .pending_create
                .take()
                .ok_or_else(|| format!("created response {id} nobody asked for"))?;
            self.live.insert(id, (spec.clone(), spec.from(rev), 0));
            self.log.push(Entry::Created {
                id,
                spec,
                rev,
                compacted_before,
            });
            return Ok(Got::Created(id));
        }
        if resp.canceled {
            self.live.remove(&id);
            if resp.compact_revision != 0 {
                self.log.push(Entry::Compacted {
                    id,
                    compact_rev: resp.compact_revision,
                });
            } else {
                self.log.push(Entry::Canceled {
                    id,
                    at_end: self.at_end,
                });
            }
            return Ok(Got::Canceled(id));
        }
        if resp.events.is_empty() {
            if id == -1 {
                self.log.push(Entry::StreamProgress { rev });
                return Ok(Got::StreamProgress);
            }
            self.log.push(Entry::Progress { id, rev });
            return Ok(Got::Other);
        }
        if let Some(w) = self.live.get_mut(&id) {
            w.2 += resp.events.len();
        }
        for event in resp.events {
            self.log.push(Entry::Event { id, event });
        }
        Ok(Got::Other)
    }

    async fn wait_for(&mut self, want: impl Fn(&Got) -> bool, what: &str) -> Result<Got, String> {
        loop {
            let resp = self
                .recv(RESPONSE_TIMEOUT)
                .await?
                .ok_or_else(|| format!("no {what} response within {RESPONSE_TIMEOUT:?}"))?;
            let got = self.note(resp)?;
            if want(&got) {
                return Ok(got);
            }
        }
    }

    /// Creates a watcher; its id.
    async fn create(&mut self, spec: Spec, compactions: &Compactions) -> Result<i64, String> {
        self.pending_create = Some((spec.clone(), compactions.done.load(Ordering::SeqCst)));
        self.send(watch_request::RequestUnion::CreateRequest(spec.request()))
            .await?;
        match self
            .wait_for(|got| matches!(got, Got::Created(_)), "created")
            .await?
        {
            Got::Created(id) => Ok(id),
            _ => Err("created response expected".into()),
        }
    }

    /// Logs what arrives until `enough` holds or `wait` passes.
    async fn pump_until(
        &mut self,
        enough: impl Fn(&WatchLog) -> bool,
        wait: Duration,
    ) -> Result<(), String> {
        let until = Instant::now() + wait;
        while !enough(self) {
            let Some(left) = until.checked_duration_since(Instant::now()) else {
                break;
            };
            if let Some(resp) = self.recv(left).await? {
                self.note(resp)?;
            }
        }
        Ok(())
    }

    async fn cancel(&mut self, id: i64) -> Result<(), String> {
        if !self.live.contains_key(&id) {
            return Ok(());
        }
        self.send(watch_request::RequestUnion::CancelRequest(
            WatchCancelRequest { watch_id: id },
        ))
        .await?;
        // a compacted response may come first and end the watcher as well
        self.wait_for(|got| *got == Got::Canceled(id), "canceled")
            .await
            .map(drop)
    }

    async fn request_progress(&mut self) -> Result<(), String> {
        self.send(watch_request::RequestUnion::ProgressRequest(
            WatchProgressRequest {},
        ))
        .await?;
        self.wait_for(|got| *got == Got::StreamProgress, "progress")
            .await
            .map(drop)
    }

    /// Logs what arrives for `wait`.
    async fn pump(&mut self, wait: Duration) -> Result<(), String> {
        let until = Instant::now() + wait;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.recv(left).await? {
                Some(resp) => {
                    self.note(resp)?;
                }
                None => break,
            }
        }
        Ok(())
    }

    /// Once the writers are done: every live watcher gets all its events (or its
    /// compacted response), then each is cancelled.
    async fn finish(&mut self, history: &History) -> Result<(), String> {
        self.at_end = true;
        let deadline = Instant::now() + RESPONSE_TIMEOUT;
        loop {
            let short: Vec<String> = {
                let revs = history.revs.lock().expect("history");
                self.live
                    .iter()
                    .filter_map(|(id, (spec, from, got))| {
                        let want = spec.expected(&revs, *from).len();
                        (*got < want)
                            .then(|| format!("watcher {id} ({spec:?}) has {got} of {want} events"))
                    })
                    .collect()
            };
            if short.is_empty() {
                break;
            }
            // what is missing is told by the checks, from the log
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            if let Some(resp) = self.recv(left).await? {
                self.note(resp)?;
            }
        }
        let ids: Vec<i64> = self.live.keys().copied().collect();
        for id in ids {
            self.cancel(id).await?;
        }
        Ok(())
    }
}

/// One watch stream's life: creates, cancels and progress requests while the writers
/// run, then `finish`.
async fn watch_client(
    endpoint: String,
    seed: u64,
    actions: usize,
    history: Arc<History>,
    compactions: Arc<Compactions>,
    mut writers_done: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<Entry>, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let channel = client::connect(&endpoint)
        .await
        .map_err(|e| e.to_string())?;
    let spec = Spec::random(&mut rng, history.latest());
    let mut stream = WatchLog::open(channel, spec, &compactions).await?;
    let mut done = 0;
    while !*writers_done.borrow() {
        if done >= actions {
            tokio::select! {
                _ = writers_done.changed() => {}
                pumped = stream.pump(Duration::from_millis(200)) => pumped?,
            }
            continue;
        }
        done += 1;
        match rng.random_range(0..10) {
            0..=3 if stream.live.len() < 4 => {
                let spec = Spec::random(&mut rng, history.latest());
                stream.create(spec, &compactions).await?;
            }
            0..=5 if !stream.live.is_empty() => {
                let ids: Vec<i64> = stream.live.keys().copied().collect();
                stream.cancel(ids[rng.random_range(0..ids.len())]).await?;
            }
            6 | 7 => stream.request_progress().await?,
            _ => {}
        }
        // spread the actions over the writers' bursts and quiet spells
        stream
            .pump(Duration::from_millis(rng.random_range(10..150)))
            .await?;
    }
    stream.finish(&history).await?;
    Ok(stream.log)
}

/// Watch streams opened one after the other, as fast as they can while the writers run,
/// each with one watcher from now on (what etcd-client's `watch()` does), each cancelled
/// once it got two events: a write committed while a stream and its watcher are set up
/// must reach the watcher exactly when it is after its created revision.
async fn churn_client(
    endpoint: String,
    seed: u64,
    history: Arc<History>,
    compactions: Arc<Compactions>,
    writers_done: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<Vec<Entry>>, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut now = move || {
        let (key, end) = if rng.random_range(0..2) == 0 {
            ("/s/", "/s0")
        } else {
            ("\0", "\0")
        };
        Spec {
            key: key.into(),
            end: end.into(),
            start: 0,
            prev_kv: rng.random_range(0..2) == 0,
            progress_notify: false,
            no_put: false,
            no_delete: false,
        }
    };
    let channel = client::connect(&endpoint)
        .await
        .map_err(|e| e.to_string())?;
    let mut logs = Vec::new();
    loop {
        let mut stream = WatchLog::open(channel.clone(), now(), &compactions).await?;
        if *writers_done.borrow() {
            stream.finish(&history).await?;
            logs.push(stream.log);
            return Ok(logs);
        }
        let id = *stream.live.keys().next().ok_or("no watcher")?;
        stream
            .pump_until(
                |s| s.live.get(&id).is_none_or(|w| w.2 >= 2) || *writers_done.borrow(),
                Duration::from_secs(1),
            )
            .await?;
        stream.cancel(id).await?;
        logs.push(stream.log);
    }
}

// ---------------------------------------------------------------------------------------
// The checks

/// Why `got` is not the event `want` a watcher should get next.
fn differs(got: &Event, want: &Ev, spec: &Spec, compact_max: i64) -> Option<String> {
    let kv = got.kv.as_ref()?;
    let put = got.r#type == EventType::Put as i32;
    let mut why = Vec::new();
    if put != want.put || kv.key != want.key || kv.mod_revision != want.rev {
        why.push("another event");
    } else if put
        && (kv.value != want.value
            || kv.create_revision != want.create_rev
            || kv.version != want.version)
    {
        why.push("another value, create revision or version");
    }
    let prev = got
        .prev_kv
        .as_ref()
        .map(|p| (p.value.clone(), p.mod_revision));
    match (spec.prev_kv, &prev, &want.prev) {
        (false, None, _) => {}
        (false, Some(_), _) => why.push("a previous value nobody asked for"),
        (true, got, want) if got == want => {}
        // etcd reads the previous value when it sends the event and leaves it out when
        // that read fails; it promises it only while no compaction reached the previous
        // version (etcd-io/etcd#10681; its robustness tests allow the same)
        (true, None, Some((_, prev_rev))) if *prev_rev <= compact_max => {}
        (true, _, _) => why.push("another previous value"),
    }
    (!why.is_empty()).then(|| {
        format!(
            "{}: got {} {:?}@{} prev {:?}, wanted {} {:?}@{} prev {:?}",
            why.join(", "),
            if put { "PUT" } else { "DELETE" },
            String::from_utf8_lossy(&kv.key),
            kv.mod_revision,
            prev.map(|p| p.1),
            if want.put { "PUT" } else { "DELETE" },
            String::from_utf8_lossy(&want.key),
            want.rev,
            want.prev.as_ref().map(|p| p.1),
        )
    })
}

struct Checked {
    watchers: usize,
    events: usize,
    compacted: usize,
    progress: usize,
    stream_progress: usize,
    /// Progress responses naming a revision below an event already sent, or one whose
    /// events some watcher had not got yet: a failure where the server promises
    /// otherwise (etcd 3.4 does not, see `promises_synced_stream_progress`).
    early_stream_progress: usize,
    /// Events sent without the previous value asked for, where compaction allows it.
    prev_missing: usize,
}

/// Checks one stream's log against the history; every problem found, with the count of
/// what was checked.
fn check_stream(
    n: usize,
    log: &[Entry],
    history: &BTreeMap<i64, Vec<Ev>>,
    compactions: &Compactions,
    strong_stream_progress: bool,
    problems: &mut Vec<String>,
) -> Checked {
    struct W<'h> {
        spec: Spec,
        from: i64,
        want: Vec<&'h Ev>,
        got: usize,
        last: i64,
        ended: bool,
        at_end: bool,
        compacted: Option<i64>,
        compacted_before: i64,
        broken: bool,
    }
    let compact_max = compactions.requested.load(Ordering::SeqCst);
    let mut ws: HashMap<i64, W> = HashMap::new();
    let mut sent_max = 0;
    let mut c = Checked {
        watchers: 0,
        events: 0,
        compacted: 0,
        progress: 0,
        stream_progress: 0,
        early_stream_progress: 0,
        prev_missing: 0,
    };
    let mut problem = |w: Option<(i64, &mut W)>, text: String| {
        if let Some((id, w)) = w {
            if w.broken {
                return;
            }
            w.broken = true;
            problems.push(format!(
                "stream {n} watcher {id} {:?} from {}: {text}",
                w.spec, w.from
            ));
        } else {
            problems.push(format!("stream {n}: {text}"));
        }
    };
    for entry in log {
        match entry {
            Entry::Created {
                id,
                spec,
                rev,
                compacted_before,
            } => {
                c.watchers += 1;
                let from = spec.from(*rev);
                if ws.get(id).is_some_and(|w| !w.ended) {
                    problem(None, format!("watch id {id} given twice"));
                }
                ws.insert(
                    *id,
                    W {
                        spec: spec.clone(),
                        from,
                        want: spec.expected(history, from),
                        got: 0,
                        last: 0,
                        ended: false,
                        at_end: false,
                        compacted: None,
                        compacted_before: *compacted_before,
                        broken: false,
                    },
                );
            }
            Entry::Event { id, event } => {
                c.events += 1;
                let Some(w) = ws.get_mut(id).filter(|w| !w.ended) else {
                    problem(
                        None,
                        format!("event for watcher {id}, which is not live: {event:?}"),
                    );
                    continue;
                };
                let rev = event.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                sent_max = sent_max.max(rev);
                let why = match w.want.get(w.got) {
                    None => Some(format!(
                        "an event after the last one it should get: {event:?}"
                    )),
                    Some(want) => {
                        if w.spec.prev_kv && event.prev_kv.is_none() && want.prev.is_some() {
                            c.prev_missing += 1;
                        }
                        differs(event, want, &w.spec, compact_max)
                            .map(|d| format!("event #{} {d}", w.got))
                    }
                };
                w.got += 1;
                w.last = rev;
                if let Some(why) = why {
                    problem(Some((*id, w)), why);
                }
            }
            Entry::Progress { id, rev } => {
                c.progress += 1;
                let Some(w) = ws.get_mut(id).filter(|w| !w.ended) else {
                    problem(
                        None,
                        format!("progress for watcher {id}, which is not live"),
                    );
                    continue;
                };
                let due = w.want.iter().filter(|e| e.rev <= *rev).count();
                let why = if !w.spec.progress_notify {
                    Some(format!("progress at {rev} it did not ask for"))
                } else if w.last > *rev {
                    Some(format!("progress at {rev} after an event at {}", w.last))
                } else if w.got < due {
                    Some(format!(
                        "progress at {rev} with {} of the {due} events up to it sent",
                        w.got
                    ))
                } else {
                    None
                };
                if let Some(why) = why {
                    problem(Some((*id, w)), why);
                }
            }
            Entry::StreamProgress { rev } => {
                c.stream_progress += 1;
                let behind: Vec<i64> = ws
                    .iter()
                    .filter(|(_, w)| {
                        !w.ended && w.got < w.want.iter().filter(|e| e.rev <= *rev).count()
                    })
                    .map(|(id, _)| *id)
                    .collect();
                let why = if *rev < sent_max {
                    Some(format!("progress at {rev} after an event at {sent_max}"))
                } else if !behind.is_empty() {
                    Some(format!(
                        "progress at {rev} before watchers {behind:?} got every event up to it"
                    ))
                } else {
                    None
                };
                if let Some(why) = why {
                    c.early_stream_progress += 1;
                    if strong_stream_progress {
                        problem(None, why);
                    }
                }
            }
            Entry::Compacted { id, compact_rev } => {
                c.compacted += 1;
                let Some(w) = ws.get_mut(id).filter(|w| !w.ended) else {
                    problem(
                        None,
                        format!("compacted response for watcher {id}, which is not live"),
                    );
                    continue;
                };
                w.ended = true;
                w.compacted = Some(*compact_rev);
                if w.from >= *compact_rev || *compact_rev > compact_max {
                    problem(
                        Some((*id, w)),
                        format!(
                            "compacted at {compact_rev} (compactions went up to {compact_max})"
                        ),
                    );
                }
            }
            Entry::Canceled { id, at_end } => {
                if let Some(w) = ws.get_mut(id) {
                    // (etcd may also answer a cancel after a compacted response)
                    if !w.ended {
                        w.ended = true;
                        w.at_end = *at_end;
                    }
                } else {
                    problem(None, format!("canceled response for unknown watcher {id}"));
                }
            }
        }
    }
    for (id, w) in &mut ws {
        let why = if !w.ended {
            Some("never ended".to_string())
        } else if w.at_end && w.got != w.want.len() {
            Some(format!(
                "ended with {} of its {} events",
                w.got,
                w.want.len()
            ))
        } else if w.at_end && w.from < w.compacted_before {
            Some(format!(
                "got no compacted response although it started below the compacted revision {}",
                w.compacted_before
            ))
        } else {
            None
        };
        if let Some(why) = why {
            problem(Some((*id, w)), why);
        }
    }
    c
}

/// Size of the stress run; `KDIST_WATCH_STRESS_SCALE` multiplies the CI size.
struct Size {
    writers: usize,
    /// Writes per writer, in `bursts` bursts.
    writes: usize,
    bursts: usize,
    streams: usize,
    actions: usize,
}

fn size(default_scale: usize) -> Size {
    let scale: usize = std::env::var("KDIST_WATCH_STRESS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_scale)
        .max(1);
    Size {
        writers: 3,
        writes: 150 * scale,
        bursts: 3 * scale,
        streams: 4,
        actions: 50 * scale,
    }
}

/// One stress run against `server`; panics with every problem found, else the events
/// delivered per second.
async fn stress(server: &Server, size: &Arc<Size>) -> f64 {
    let endpoint = server.endpoint();
    let (version, strong) = promises_synced_stream_progress(connect(&endpoint).await).await;
    let history = Arc::new(History::default());
    let compactions = Arc::new(Compactions::default());
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut streams = Vec::new();
    for s in 0..size.streams {
        streams.push(tokio::spawn(watch_client(
            endpoint.clone(),
            s as u64 + 1,
            size.actions,
            history.clone(),
            compactions.clone(),
            done_rx.clone(),
        )));
    }
    let churn = tokio::spawn(churn_client(
        endpoint.clone(),
        99,
        history.clone(),
        compactions.clone(),
        done_rx.clone(),
    ));
    let mut writers = Vec::new();
    let quiet = Arc::new(tokio::sync::Barrier::new(size.writers));
    for w in 0..size.writers {
        let channel = connect(&endpoint).await;
        writers.push(tokio::spawn(writer(
            channel,
            w,
            size.clone(),
            history.clone(),
            quiet.clone(),
        )));
    }
    let writers_done = Arc::new(AtomicBool::new(false));
    let compacting = tokio::spawn(compactor(
        connect(&endpoint).await,
        history.clone(),
        compactions.clone(),
        writers_done.clone(),
    ));
    let mut writes = 0;
    for (w, writer) in writers.into_iter().enumerate() {
        match writer.await.expect("writer task") {
            Ok(n) => writes += n,
            Err(e) => panic!("{}: writer {w}: {e}", server.name()),
        }
    }
    writers_done.store(true, Ordering::SeqCst);
    if let Err(e) = compacting.await.expect("compactor task") {
        panic!("{}: compactor: {e}", server.name());
    }
    let _ = done_tx.send(true);
    let mut logs = Vec::new();
    for (s, stream) in streams.into_iter().enumerate() {
        match stream.await.expect("watch task") {
            Ok(log) => logs.push(log),
            Err(e) => panic!("{}: watch stream {s}: {e}", server.name()),
        }
    }
    match churn.await.expect("churn task") {
        Ok(churned) => logs.extend(churned),
        Err(e) => panic!("{}: churned watch streams: {e}", server.name()),
    }
    let elapsed = started.elapsed();
    let revs = history.revs.lock().expect("history");
    let mut problems = Vec::new();
    // the writers' answers must cover every revision once
    let (first, last) = (
        revs.keys().next().copied().unwrap_or(0),
        revs.keys().next_back().copied().unwrap_or(0),
    );
    if revs.len() as i64 != last - first + 1 {
        problems.push(format!(
            "the writers were answered {} revisions between {first} and {last}",
            revs.len()
        ));
    }
    let mut total = Checked {
        watchers: 0,
        events: 0,
        compacted: 0,
        progress: 0,
        stream_progress: 0,
        early_stream_progress: 0,
        prev_missing: 0,
    };
    for (n, log) in logs.iter().enumerate() {
        let c = check_stream(n, log, &revs, &compactions, strong, &mut problems);
        total.watchers += c.watchers;
        total.events += c.events;
        total.compacted += c.compacted;
        total.progress += c.progress;
        total.stream_progress += c.stream_progress;
        total.early_stream_progress += c.early_stream_progress;
        total.prev_missing += c.prev_missing;
    }
    eprintln!(
        "{} {version}: {writes} writes, {} revisions, {} compactions, {} watchers ({} compacted), \
         {} events delivered ({:.0}/s), {} progress notifications, {} progress responses \
         ({} early), {} events without the previous value asked for, {:?}, {} problems",
        server.name(),
        revs.len(),
        compactions.count.load(Ordering::SeqCst),
        total.watchers,
        total.compacted,
        total.events,
        total.events as f64 / elapsed.as_secs_f64(),
        total.progress,
        total.stream_progress,
        total.early_stream_progress,
        total.prev_missing,
        elapsed,
        problems.len(),
    );
    assert!(
        problems.is_empty(),
        "{}: {} problems:\n{}",
        server.name(),
        problems.len(),
        problems.join("\n")
    );
    assert!(total.events > 0 && total.watchers > size.streams && writes > 0);
    assert!(
        total.progress > 0,
        "{}: no progress notification to check",
        server.name()
    );
    total.events as f64 / elapsed.as_secs_f64()
}

/// Runs the stress on kdist, then on etcd, each on its own data.
async fn stress_both(default_scale: usize) {
    let size = Arc::new(size(default_scale));
    let (kdist, etcd) = on_both("kdist-watch-stress", move |server| {
        let size = size.clone();
        async move { stress(&server, &size).await }
    })
    .await;
    eprintln!(
        "events delivered per second, kdist/etcd: {:.2}",
        kdist / etcd
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_under_load_get_every_event_once_in_order() {
    stress_both(1).await;
}

/// Ten times the CI size (or `KDIST_WATCH_STRESS_SCALE` times); a few minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "larger run of watchers_under_load_get_every_event_once_in_order, a few minutes"]
async fn watchers_under_load_larger_run() {
    stress_both(10).await;
}

// ---------------------------------------------------------------------------------------
// A watch resumed after the server was killed

/// Acknowledged writes: revision, key, and whether it was a put.
type Acked = Arc<Mutex<Vec<(i64, Vec<u8>, bool)>>>;

/// What the resuming watcher saw, in order, across its reconnects.
#[derive(Debug)]
enum Seen {
    Event(Event),
    Progress(i64),
    /// A new watch from this revision, after the stream broke.
    Resumed(i64),
}

#[derive(Default)]
struct Resuming {
    seen: Vec<Seen>,
    /// The newest revision seen, in an event or a progress notification.
    last: i64,
    progress: usize,
    resumed: usize,
}

const RESUME_PREFIX: (&[u8], &[u8]) = (b"/r/", b"/r0");

/// A watcher as kube-apiserver's watch cache runs one: prev_kv and progress
/// notifications; when the stream breaks it watches again from the newest revision it
/// saw, in an event or a progress notification, plus one.
async fn resuming_watcher(
    endpoint: Arc<Mutex<String>>,
    start: i64,
    state: Arc<Mutex<Resuming>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let mut first = true;
    while !*stop.borrow() {
        if !first {
            // reconnect backoff while the server restarts
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        first = false;
        let target = endpoint.lock().expect("endpoint").clone();
        let Ok(channel) = client::connect(&target).await else {
            continue;
        };
        let from = {
            let s = state.lock().expect("state");
            if s.last == 0 { start } else { s.last + 1 }
        };
        let (tx, rx) = mpsc::channel(4);
        tx.send(create(WatchCreateRequest {
            key: RESUME_PREFIX.0.to_vec(),
            range_end: RESUME_PREFIX.1.to_vec(),
            start_revision: from,
            prev_kv: true,
            progress_notify: true,
            ..Default::default()
        }))
        .await
        .map_err(|_| "watch request channel closed".to_string())?;
        let Ok(responses) = WatchClient::new(channel)
            .watch(ReceiverStream::new(rx))
            .await
        else {
            continue;
        };
        let mut responses = responses.into_inner();
        {
            let mut s = state.lock().expect("state");
            s.seen.push(Seen::Resumed(from));
            s.resumed += 1;
        }
        loop {
            let resp = tokio::select! {
                _ = stop.changed() => return Ok(()),
                resp = responses.message() => match resp {
                    Ok(Some(resp)) => resp,
                    // the server went away: watch again
                    _ => break,
                },
            };
            if resp.canceled {
                return Err(format!(
                    "watch from {from} canceled: compact revision {}, {}",
                    resp.compact_revision, resp.cancel_reason
                ));
            }
            if resp.created {
                continue;
            }
            let mut s = state.lock().expect("state");
            if resp.events.is_empty() {
                let rev = header_rev(resp.header.as_ref());
                s.last = s.last.max(rev);
                s.progress += 1;
                s.seen.push(Seen::Progress(rev));
            }
            for event in resp.events {
                let rev = event.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                s.last = s.last.max(rev);
                s.seen.push(Seen::Event(event));
            }
        }
    }
    Ok(())
}

/// Puts and deletes under the watched prefix and puts outside it (only those while
/// `outside_only` is set), reconnecting after the server died; every acknowledged
/// revision under the prefix with its key and whether it was a put.
async fn steady_writer(
    endpoint: Arc<Mutex<String>>,
    acked: Acked,
    outside_only: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let target = endpoint.lock().expect("endpoint").clone();
        let Ok(channel) = client::connect(&target).await else {
            // reconnect backoff while the server restarts
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut kv = KvClient::new(channel);
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            if outside_only.load(Ordering::SeqCst) || n.is_multiple_of(3) {
                let put = kv
                    .put(PutRequest {
                        key: format!("/q/{}", n % 5).into_bytes(),
                        value: format!("v{n}").into_bytes(),
                        ..Default::default()
                    })
                    .await;
                if put.is_err() {
                    break;
                }
                continue;
            }
            let key = format!("/r/{}", n % 5).into_bytes();
            let written = if n.is_multiple_of(5) {
                kv.delete_range(DeleteRangeRequest {
                    key: key.clone(),
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (r.deleted > 0).then(|| header_rev(r.header.as_ref()))
                })
            } else {
                kv.put(PutRequest {
                    key: key.clone(),
                    value: format!("v{n}").into_bytes(),
                    ..Default::default()
                })
                .await
                .map(|r| Some(header_rev(r.into_inner().header.as_ref())))
            };
            match written {
                Ok(Some(rev)) => {
                    acked
                        .lock()
                        .expect("acked")
                        .push((rev, key, !n.is_multiple_of(5)))
                }
                Ok(None) => {}
                Err(_) => break,
            }
        }
    }
}

async fn current_rev(endpoint: &str) -> i64 {
    let resp = KvClient::new(connect(endpoint).await)
        .range(RangeRequest {
            key: b"/r/".to_vec(),
            range_end: b"/r0".to_vec(),
            count_only: true,
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    header_rev(resp.header.as_ref())
}

/// Every event under the prefix from `from` up to `to`, read back by a watch from `from`
/// until a progress notification at `to` or later (nothing is written any more).
async fn history_between(endpoint: &str, from: i64, to: i64) -> Vec<Event> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(create(WatchCreateRequest {
        key: RESUME_PREFIX.0.to_vec(),
        range_end: RESUME_PREFIX.1.to_vec(),
        start_revision: from,
        prev_kv: true,
        progress_notify: true,
        ..Default::default()
    }))
    .await
    .expect("send create");
    let mut responses = WatchClient::new(connect(endpoint).await)
        .watch(ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    loop {
        let resp = next_response(&mut responses, "history").await;
        assert!(!resp.canceled, "history watch canceled: {resp:?}");
        if !resp.created && resp.events.is_empty() && header_rev(resp.header.as_ref()) >= to {
            return events;
        }
        events.extend(resp.events);
    }
}

/// (revision, key, put, value, previous revision) of an event.
fn event_id(e: &Event) -> (i64, Vec<u8>, bool, Vec<u8>, i64) {
    let kv = e.kv.clone().unwrap_or_default();
    (
        kv.mod_revision,
        kv.key,
        e.r#type == EventType::Put as i32,
        kv.value,
        e.prev_kv.as_ref().map_or(0, |p| p.mod_revision),
    )
}

const KILLS: usize = 3;

async fn resumed_watch_after_kill9(server: &mut Server) {
    let name = server.name();
    let endpoint = Arc::new(Mutex::new(server.endpoint()));
    let base = current_rev(&server.endpoint()).await;
    let state = Arc::new(Mutex::new(Resuming::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(resuming_watcher(
        endpoint.clone(),
        base + 1,
        state.clone(),
        stop_rx,
    ));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop_writing = Arc::new(AtomicBool::new(false));
    let outside_only = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn(steady_writer(
        endpoint.clone(),
        acked.clone(),
        outside_only.clone(),
        stop_writing.clone(),
    ));
    let acked_len = |acked: &Acked| acked.lock().expect("acked").len();
    for kill in 0..KILLS {
        let before = acked_len(&acked);
        let resumed = state.lock().expect("state").resumed;
        if kill % 2 == 0 {
            // kill -9 while writes under the prefix flow and the watcher receives them
            let flowing = wait_until_async(RESPONSE_TIMEOUT, Duration::from_millis(10), || {
                acked_len(&acked) >= before + 30 + kill * 17
            })
            .await;
            assert!(flowing, "{name}: writes stalled before kill {kill}");
        } else {
            // kill -9 while only writes outside the prefix flow, once a progress
            // notification moved the watcher past its newest event: it resumes from there
            outside_only.store(true, Ordering::SeqCst);
            let progressed = wait_until_async(RESPONSE_TIMEOUT, Duration::from_millis(20), || {
                let s = state.lock().expect("state");
                let newest_event = s
                    .seen
                    .iter()
                    .rev()
                    .find_map(|seen| match seen {
                        Seen::Event(e) => Some(event_id(e).0),
                        _ => None,
                    })
                    .unwrap_or(0);
                matches!(s.seen.last(), Some(Seen::Progress(rev)) if *rev > newest_event)
            })
            .await;
            assert!(
                progressed,
                "{name}: no progress past the newest event before kill {kill}"
            );
        }
        server.kill9_and_restart();
        *endpoint.lock().expect("endpoint") = server.endpoint();
        let back = wait_until_async(RESPONSE_TIMEOUT, Duration::from_millis(20), || {
            state.lock().expect("state").resumed > resumed
        })
        .await;
        assert!(
            back,
            "{name}: the watcher did not watch again after kill {kill}"
        );
        outside_only.store(false, Ordering::SeqCst);
    }
    // A quiet spell at the end: the watcher must reach the last revision and get a
    // progress notification at or above it.
    stop_writing.store(true, Ordering::SeqCst);
    writing.await.expect("writer task");
    let last = current_rev(&server.endpoint()).await;
    let progressed = wait_until_async(RESPONSE_TIMEOUT, Duration::from_millis(20), || {
        let s = state.lock().expect("state");
        s.seen
            .iter()
            .any(|seen| matches!(seen, Seen::Progress(rev) if *rev >= last))
    })
    .await;
    let _ = stop_tx.send(true);
    if let Err(e) = watcher.await.expect("watcher task") {
        panic!("{name}: {e}");
    }
    assert!(
        progressed,
        "{name}: no progress notification at {last} after the last write"
    );

    let history = history_between(&server.endpoint(), base + 1, last).await;
    let history_ids: Vec<_> = history.iter().map(event_id).collect();
    // every revision once, and every acknowledged write in it
    let revs: Vec<i64> = history_ids.iter().map(|h| h.0).collect();
    assert!(
        revs.windows(2).all(|w| w[0] < w[1]) && revs.first().is_some_and(|&r| r > base),
        "{name}: history revisions {revs:?}"
    );
    for (rev, key, put) in acked.lock().expect("acked").iter() {
        let found = history_ids
            .iter()
            .any(|h| h.0 == *rev && h.1 == *key && h.2 == *put);
        assert!(
            found,
            "{name}: acknowledged write at {rev} missing from history"
        );
    }
    let state = state.lock().expect("state");
    let got: Vec<_> = state
        .seen
        .iter()
        .filter_map(|s| match s {
            Seen::Event(e) => Some(event_id(e)),
            _ => None,
        })
        .collect();
    if got != history_ids {
        let first = got
            .iter()
            .zip(&history_ids)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(history_ids.len()));
        panic!(
            "{name}: the resumed watcher got {} events, history has {}; first difference at \
             #{first}: got {:?}, history {:?}\nseen: {:?}",
            got.len(),
            history_ids.len(),
            got.get(first),
            history_ids.get(first),
            state
                .seen
                .iter()
                .filter(|s| !matches!(s, Seen::Event(_)))
                .collect::<Vec<_>>(),
        );
    }
    // a progress notification at R: every event up to R came before it, none after
    let (mut sent, mut newest, mut from_progress) = (0, 0, 0);
    for seen in &state.seen {
        match seen {
            Seen::Event(e) => {
                sent += 1;
                newest = event_id(e).0;
            }
            Seen::Progress(rev) => {
                let due = history_ids.iter().filter(|h| h.0 <= *rev).count();
                assert_eq!(
                    sent, due,
                    "{name}: progress at {rev} after {sent} of {due} events"
                );
            }
            Seen::Resumed(from) => {
                if *from > newest + 1 && newest > 0 {
                    from_progress += 1;
                }
                assert!(
                    *from > newest,
                    "{name}: watched again from {from} after an event at {newest}"
                );
            }
        }
    }
    assert!(state.resumed > KILLS, "{name}: {} watches", state.resumed);
    assert!(
        from_progress > 0,
        "{name}: no watch resumed from a progress revision"
    );
    eprintln!(
        "{name}: {KILLS} kill -9, {} acknowledged writes, {} events across {} watches, \
         {} progress notifications ({from_progress} resumed from one), none missed or repeated",
        acked_len(&acked),
        got.len(),
        state.resumed,
        state.progress
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumed_after_kill_9_misses_and_repeats_nothing() {
    on_both("kdist-watch-resume", |mut server| async move {
        resumed_watch_after_kill9(&mut server).await
    })
    .await;
}
