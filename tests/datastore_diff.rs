//! Differential test: the same operation sequences run against a real etcd and against
//! `kdist datastore serve`; every response and every watch event must match, except
//! member/cluster ids and raft term. Sequences that once differed live in
//! tests/corpus/*.json and run first; then seeded random sequences. A random sequence
//! that differs is written to tests/corpus/ so it stays a regression case.

mod common;

use std::time::Duration;

use kdist::datastore::client;
use kdist::datastore::proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest,
    LeaseTimeToLiveRequest, PutRequest, RangeRequest, RequestOp, ResponseHeader, TxnRequest,
    WatchCreateRequest, WatchRequest, WatchResponse, compare, kv_client::KvClient,
    lease_client::LeaseClient, request_op, watch_client::WatchClient, watch_request,
};
use kdist::datastore::proto::mvccpb::{Event, event};
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use common::*;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Op {
    Put {
        key: String,
        #[serde(default)]
        value: String,
        #[serde(default)]
        lease: i64,
        #[serde(default)]
        prev_kv: bool,
        #[serde(default)]
        ignore_value: bool,
        #[serde(default)]
        ignore_lease: bool,
        /// When set, the value is this many bytes of 'x' instead of `value`.
        #[serde(default)]
        value_size: usize,
    },
    Range {
        key: String,
        #[serde(default)]
        end: String,
        #[serde(default)]
        limit: i64,
        #[serde(default)]
        revision: i64,
        #[serde(default)]
        sort_order: i32,
        #[serde(default)]
        sort_target: i32,
        #[serde(default)]
        keys_only: bool,
        #[serde(default)]
        count_only: bool,
        #[serde(default)]
        min_mod: i64,
        #[serde(default)]
        max_mod: i64,
        #[serde(default)]
        min_create: i64,
        #[serde(default)]
        max_create: i64,
    },
    Delete {
        key: String,
        #[serde(default)]
        end: String,
        #[serde(default)]
        prev_kv: bool,
    },
    Txn {
        #[serde(default)]
        compare: Vec<Cmp>,
        #[serde(default)]
        success: Vec<Op>,
        #[serde(default)]
        failure: Vec<Op>,
    },
    /// Compacts to the current revision minus `back`.
    Compact {
        back: i64,
    },
    LeaseGrant {
        id: i64,
        ttl: i64,
    },
    LeaseRevoke {
        id: i64,
    },
    LeaseTtl {
        id: i64,
        keys: bool,
    },
    /// Opens a watch now; its responses are compared at the end of the sequence.
    Watch {
        key: String,
        #[serde(default)]
        end: String,
        /// Start at the current revision minus `back` (0: from now on).
        #[serde(default)]
        back: i64,
        #[serde(default)]
        prev_kv: bool,
        #[serde(default)]
        filters: Vec<i32>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cmp {
    key: String,
    #[serde(default)]
    end: String,
    /// 0 EQUAL, 1 GREATER, 2 LESS, 3 NOT_EQUAL
    result: i32,
    /// 0 VERSION, 1 CREATE, 2 MOD, 3 VALUE, 4 LEASE
    target: i32,
    #[serde(default)]
    number: i64,
    #[serde(default)]
    value: String,
}

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn to_request(op: &Op) -> Option<RequestOp> {
    use request_op::Request as R;
    let request = match op {
        Op::Put {
            key,
            value,
            lease,
            prev_kv,
            ignore_value,
            ignore_lease,
            value_size,
        } => R::RequestPut(PutRequest {
            key: b(key),
            value: if *value_size > 0 {
                vec![b'x'; *value_size]
            } else {
                b(value)
            },
            lease: *lease,
            prev_kv: *prev_kv,
            ignore_value: *ignore_value,
            ignore_lease: *ignore_lease,
        }),
        Op::Range { .. } => R::RequestRange(range_request(op, 0)?),
        Op::Delete { key, end, prev_kv } => R::RequestDeleteRange(DeleteRangeRequest {
            key: b(key),
            range_end: b(end),
            prev_kv: *prev_kv,
        }),
        Op::Txn {
            compare,
            success,
            failure,
        } => R::RequestTxn(txn_request(compare, success, failure)),
        _ => return None,
    };
    Some(RequestOp {
        request: Some(request),
    })
}

fn range_request(op: &Op, _cur: i64) -> Option<RangeRequest> {
    let Op::Range {
        key,
        end,
        limit,
        revision,
        sort_order,
        sort_target,
        keys_only,
        count_only,
        min_mod,
        max_mod,
        min_create,
        max_create,
    } = op
    else {
        return None;
    };
    Some(RangeRequest {
        key: b(key),
        range_end: b(end),
        limit: *limit,
        revision: *revision,
        sort_order: *sort_order,
        sort_target: *sort_target,
        serializable: false,
        keys_only: *keys_only,
        count_only: *count_only,
        min_mod_revision: *min_mod,
        max_mod_revision: *max_mod,
        min_create_revision: *min_create,
        max_create_revision: *max_create,
    })
}

fn txn_request(cmps: &[Cmp], success: &[Op], failure: &[Op]) -> TxnRequest {
    use compare::TargetUnion as U;
    TxnRequest {
        compare: cmps
            .iter()
            .map(|c| Compare {
                result: c.result,
                target: c.target,
                key: b(&c.key),
                range_end: b(&c.end),
                target_union: Some(match c.target {
                    0 => U::Version(c.number),
                    1 => U::CreateRevision(c.number),
                    2 => U::ModRevision(c.number),
                    3 => U::Value(b(&c.value)),
                    _ => U::Lease(c.number),
                }),
            })
            .collect(),
        success: success.iter().filter_map(to_request).collect(),
        failure: failure.iter().filter_map(to_request).collect(),
    }
}

/// One side of the comparison: clients of one endpoint and what its watches saw.
struct Side {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
    watch: WatchClient<Channel>,
    watches: Vec<WatchStream>,
    /// A watch over every key since the side connected: every event the server made.
    all: WatchStream,
    history: Vec<Event>,
    /// The newest revision compacted.
    compacted: i64,
    /// Whether a watch from the past catches up in the background (etcd: a loop every
    /// 100 ms) rather than before its created response (kdist).
    background_sync: bool,
}

/// How long a watch response that is due may take.
const WATCH_TIMEOUT: Duration = Duration::from_secs(20);

struct WatchStream {
    _requests: tokio::sync::mpsc::Sender<WatchRequest>,
    responses: tonic::Streaming<WatchResponse>,
    create: WatchCreateRequest,
    /// Responses read so far, in order.
    read: Vec<WatchResponse>,
    /// The first revision it gets events of (known once created).
    from: i64,
    /// Deletes at or below this revision were compacted before the watch caught up
    /// (etcd drops a tombstone at the compacted revision itself).
    no_tombstones_upto: i64,
    events: usize,
    /// Canceled by the server (refused or compacted).
    ended: bool,
}

fn mod_rev(e: &Event) -> i64 {
    e.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

impl WatchStream {
    /// Reads one response; false when none came in time.
    async fn read_one(&mut self) -> bool {
        let Ok(Ok(Some(resp))) =
            tokio::time::timeout(WATCH_TIMEOUT, self.responses.message()).await
        else {
            return false;
        };
        if resp.created {
            let rev = resp.header.as_ref().map_or(0, |h| h.revision);
            self.from = if self.create.start_revision > 0 {
                self.create.start_revision
            } else {
                rev + 1
            };
        }
        self.ended |= resp.canceled;
        self.events += resp.events.len();
        self.read.push(resp);
        true
    }

    fn wants(&self, e: &Event) -> bool {
        let Some(kv) = e.kv.as_ref() else {
            return false;
        };
        let (key, end) = (self.create.key.as_slice(), self.create.range_end.as_slice());
        let in_range = if end.is_empty() {
            kv.key == key
        } else if end == [0] {
            kv.key.as_slice() >= key
        } else {
            kv.key.as_slice() >= key && kv.key.as_slice() < end
        };
        let put = e.r#type == event::EventType::Put as i32;
        let filter = if put { 0 } else { 1 };
        in_range
            && !self.create.filters.contains(&filter)
            && mod_rev(e) >= self.from
            && (put || mod_rev(e) > self.no_tombstones_upto)
    }

    /// Reads until the server sends it a progress notification, which etcd sends only to
    /// a watcher that caught up, or ends it.
    async fn synced(&mut self) -> Result<(), String> {
        let is_progress = |r: &WatchResponse| !r.created && !r.canceled && r.events.is_empty();
        while !self.ended && !self.read.iter().any(is_progress) {
            if !self.read_one().await {
                return Err(format!(
                    "watch {:?}: no progress notification within {WATCH_TIMEOUT:?}",
                    self.create
                ));
            }
        }
        Ok(())
    }

    /// Reads until it has every event of `history` due to it, or the server ended it.
    async fn catch_up(&mut self, history: &[Event]) -> Result<(), String> {
        loop {
            if self.ended {
                return Ok(());
            }
            // a watch from below the compacted revision ends with a compacted response
            let compacted = self.from > 0 && self.from < self.no_tombstones_upto;
            if self.from > 0
                && !compacted
                && self.events >= history.iter().filter(|e| self.wants(e)).count()
            {
                return Ok(());
            }
            if !self.read_one().await {
                return Err(format!(
                    "watch {:?} from {}: {} events after {WATCH_TIMEOUT:?}, history has more",
                    self.create, self.from, self.events
                ));
            }
        }
    }
}

fn zero_ids(h: &mut Option<ResponseHeader>) {
    if let Some(h) = h {
        h.cluster_id = 0;
        h.member_id = 0;
        h.raft_term = 0;
    }
}

fn status_text(s: tonic::Status) -> String {
    format!("error {:?}: {}", s.code(), s.message())
}

impl Side {
    async fn connect(endpoint: &str, background_sync: bool) -> Side {
        let channel = client::connect(endpoint).await.expect("connect");
        let mut watch = WatchClient::new(channel.clone());
        let all = Self::open_watch_on(
            &mut watch,
            WatchCreateRequest {
                key: vec![0],
                range_end: vec![0],
                ..Default::default()
            },
        )
        .await;
        Side {
            kv: KvClient::new(channel.clone()),
            lease: LeaseClient::new(channel),
            watch,
            watches: Vec::new(),
            all,
            history: Vec::new(),
            compacted: 0,
            background_sync,
        }
    }

    /// Reads the watch over every key until `history` holds every event up to `rev`.
    async fn history_upto(&mut self, rev: i64) -> Result<(), String> {
        while rev >= self.all.from && self.history.last().is_none_or(|e| mod_rev(e) < rev) {
            if !self.all.read_one().await {
                return Err(format!("no event up to {rev} within {WATCH_TIMEOUT:?}"));
            }
            for resp in self.all.read.drain(..) {
                self.history.extend(resp.events);
            }
        }
        Ok(())
    }

    /// Has watch `n` read every event due to it up to now.
    async fn catch_up(&mut self, n: usize) -> Result<(), String> {
        let rev = self.current_rev().await;
        self.history_upto(rev).await?;
        self.watches[n].catch_up(&self.history).await
    }

    async fn current_rev(&mut self) -> i64 {
        self.kv
            .range(RangeRequest {
                key: b("__rev"),
                ..Default::default()
            })
            .await
            .expect("range")
            .into_inner()
            .header
            .map_or(0, |h| h.revision)
    }

    async fn open_watch(&mut self, create: WatchCreateRequest) {
        let mut stream = Self::open_watch_on(&mut self.watch, create).await;
        stream.no_tombstones_upto = self.compacted;
        self.watches.push(stream);
    }

    /// A watch stream with `create`, its created response read.
    async fn open_watch_on(
        watch: &mut WatchClient<Channel>,
        create: WatchCreateRequest,
    ) -> WatchStream {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(create.clone())),
        })
        .await
        .expect("send create");
        let responses = watch
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("watch")
            .into_inner();
        let mut stream = WatchStream {
            _requests: tx,
            responses,
            create,
            read: Vec::new(),
            from: 0,
            no_tombstones_upto: 0,
            events: 0,
            ended: false,
        };
        assert!(stream.read_one().await, "no created response in time");
        stream
    }

    /// Runs one op; the normalized response or error as text.
    async fn run(&mut self, op: &Op) -> String {
        match op {
            Op::Put { .. } | Op::Delete { .. } | Op::Txn { .. } | Op::Range { .. } => {
                // A range's negative revision counts back from the current one, so a
                // sequence reads history wherever the server's revision stands.
                let mut op = op.clone();
                if let Op::Range { revision, .. } = &mut op
                    && *revision < 0
                {
                    *revision = (self.current_rev().await + *revision).max(1);
                }
                let Some(RequestOp {
                    request: Some(request),
                }) = to_request(&op)
                else {
                    return "skip".into();
                };
                match request {
                    request_op::Request::RequestPut(r) => match self.kv.put(r).await {
                        Ok(r) => {
                            let mut r = r.into_inner();
                            zero_ids(&mut r.header);
                            format!("{r:?}")
                        }
                        Err(e) => status_text(e),
                    },
                    request_op::Request::RequestRange(r) => match self.kv.range(r).await {
                        Ok(r) => {
                            let mut r = r.into_inner();
                            zero_ids(&mut r.header);
                            format!("{r:?}")
                        }
                        Err(e) => status_text(e),
                    },
                    request_op::Request::RequestDeleteRange(r) => {
                        match self.kv.delete_range(r).await {
                            Ok(r) => {
                                let mut r = r.into_inner();
                                zero_ids(&mut r.header);
                                format!("{r:?}")
                            }
                            Err(e) => status_text(e),
                        }
                    }
                    request_op::Request::RequestTxn(r) => match self.kv.txn(r).await {
                        Ok(r) => {
                            let mut r = r.into_inner();
                            zero_ids(&mut r.header);
                            format!("{r:?}")
                        }
                        Err(e) => status_text(e),
                    },
                }
            }
            Op::Compact { back } => {
                let revision = self.current_rev().await - back;
                match self
                    .kv
                    .compact(CompactionRequest {
                        revision,
                        physical: true,
                    })
                    .await
                {
                    Ok(r) => {
                        self.compacted = self.compacted.max(revision);
                        let mut r = r.into_inner();
                        zero_ids(&mut r.header);
                        format!("{r:?}")
                    }
                    Err(e) => status_text(e),
                }
            }
            Op::LeaseGrant { id, ttl } => match self
                .lease
                .lease_grant(LeaseGrantRequest { ttl: *ttl, id: *id })
                .await
            {
                Ok(r) => {
                    let mut r = r.into_inner();
                    zero_ids(&mut r.header);
                    format!("{r:?}")
                }
                Err(e) => status_text(e),
            },
            Op::LeaseRevoke { id } => {
                match self
                    .lease
                    .lease_revoke(LeaseRevokeRequest { id: *id })
                    .await
                {
                    Ok(r) => {
                        let mut r = r.into_inner();
                        zero_ids(&mut r.header);
                        format!("{r:?}")
                    }
                    Err(e) => status_text(e),
                }
            }
            Op::LeaseTtl { id, keys } => match self
                .lease
                .lease_time_to_live(LeaseTimeToLiveRequest {
                    id: *id,
                    keys: *keys,
                })
                .await
            {
                Ok(r) => {
                    let mut r = r.into_inner();
                    zero_ids(&mut r.header);
                    // Remaining seconds depend on timing; whether it is alive does not.
                    r.ttl = r.ttl.signum();
                    r.keys.sort();
                    format!("{r:?}")
                }
                Err(e) => status_text(e),
            },
            Op::Watch {
                key,
                end,
                back,
                prev_kv,
                filters,
            } => {
                let start_revision = if *back > 0 {
                    (self.current_rev().await - back).max(1)
                } else {
                    0
                };
                self.open_watch(WatchCreateRequest {
                    key: b(key),
                    range_end: b(end),
                    start_revision,
                    prev_kv: *prev_kv,
                    filters: filters.clone(),
                    // progress notifications are not compared (see `drain_watches`)
                    progress_notify: start_revision > 0,
                    ..Default::default()
                })
                .await;
                if start_revision > 0 {
                    // etcd replays history to a new watcher from a background loop; it
                    // must be done before later ops (a compaction) race with it.
                    let n = self.watches.len() - 1;
                    if let Err(e) = self.catch_up(n).await {
                        return e;
                    }
                    if self.background_sync
                        && let Err(e) = self.watches[n].synced().await
                    {
                        return e;
                    }
                }
                "watch".into()
            }
        }
    }

    /// Everything the watches delivered, flattened to one line per event or notice, once
    /// each has every event due to it.
    async fn drain_watches(&mut self) -> Result<Vec<Vec<String>>, String> {
        let mut all = Vec::new();
        for n in 0..self.watches.len() {
            self.catch_up(n).await?;
            let mut lines = Vec::new();
            for resp in std::mem::take(&mut self.watches[n].read) {
                if resp.created {
                    lines.push(format!("created canceled={}", resp.canceled));
                }
                if resp.compact_revision != 0 || (resp.canceled && !resp.created) {
                    lines.push(format!(
                        "canceled={} compact_revision={}",
                        resp.canceled, resp.compact_revision
                    ));
                }
                for ev in resp.events {
                    lines.push(format!("{ev:?}"));
                }
            }
            all.push(lines);
        }
        Ok(all)
    }
}

/// Runs `ops` on both sides; the first difference, if any.
async fn compare_sequence(etcd: &mut Side, kdist: &mut Side, ops: &[Op]) -> Result<(), String> {
    etcd.watches.clear();
    kdist.watches.clear();
    // A watch over everything, with previous values, for the whole sequence.
    for side in [&mut *etcd, &mut *kdist] {
        side.open_watch(WatchCreateRequest {
            key: vec![0],
            range_end: vec![0],
            prev_kv: true,
            ..Default::default()
        })
        .await;
    }
    for (i, op) in ops.iter().enumerate() {
        let a = etcd.run(op).await;
        let k = kdist.run(op).await;
        if a != k {
            return Err(format!("op #{i} {op:?}\n  etcd:  {a}\n  kdist: {k}"));
        }
    }
    let a = etcd
        .drain_watches()
        .await
        .map_err(|e| format!("etcd: {e}"))?;
    let k = kdist
        .drain_watches()
        .await
        .map_err(|e| format!("kdist: {e}"))?;
    for (n, (wa, wk)) in a.iter().zip(k.iter()).enumerate() {
        if wa != wk {
            return Err(format!(
                "watch #{n} streams differ\n  etcd:  {wa:#?}\n  kdist: {wk:#?}"
            ));
        }
    }
    Ok(())
}

fn random_ops(seed: u64, n: usize, lease_base: i64) -> Vec<Op> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let keys = ["a", "b", "c", "d", "e/1", "e/2", "e/3", "f"];
    let key = |rng: &mut rand::rngs::StdRng| keys[rng.random_range(0..keys.len())].to_string();
    let end = |rng: &mut rand::rngs::StdRng| match rng.random_range(0..4) {
        0 => "\0".to_string(),
        1 => "e0".to_string(),
        2 => keys[rng.random_range(0..keys.len())].to_string(),
        _ => String::new(),
    };
    fn leaf(
        rng: &mut rand::rngs::StdRng,
        key: &dyn Fn(&mut rand::rngs::StdRng) -> String,
        end: &dyn Fn(&mut rand::rngs::StdRng) -> String,
        lease_base: i64,
    ) -> Op {
        match rng.random_range(0..10) {
            0..=3 => Op::Put {
                key: key(rng),
                value: format!("v{}", rng.random_range(0..5)),
                lease: if rng.random_range(0..5) == 0 {
                    lease_base + rng.random_range(1..4)
                } else {
                    0
                },
                prev_kv: rng.random_range(0..2) == 0,
                ignore_value: rng.random_range(0..12) == 0,
                ignore_lease: false,
                value_size: 0,
            },
            4..=5 => Op::Delete {
                key: key(rng),
                end: end(rng),
                prev_kv: rng.random_range(0..2) == 0,
            },
            _ => Op::Range {
                key: key(rng),
                end: end(rng),
                limit: rng.random_range(0..4),
                // negative: that many revisions before the current one (see `run`)
                revision: if rng.random_range(0..3) == 0 {
                    -rng.random_range(1..6)
                } else {
                    0
                },
                sort_order: rng.random_range(0..3),
                sort_target: rng.random_range(0..5),
                keys_only: rng.random_range(0..4) == 0,
                count_only: rng.random_range(0..6) == 0,
                min_mod: 0,
                max_mod: 0,
                min_create: 0,
                max_create: 0,
            },
        }
    }
    let cmp = |rng: &mut rand::rngs::StdRng| Cmp {
        key: key(rng),
        end: if rng.random_range(0..4) == 0 {
            end(rng)
        } else {
            String::new()
        },
        result: rng.random_range(0..4),
        target: rng.random_range(0..5),
        number: rng.random_range(0..6),
        value: format!("v{}", rng.random_range(0..5)),
    };
    let mut ops = Vec::new();
    if rng.random_range(0..2) == 0 {
        ops.push(Op::Watch {
            key: key(&mut rng),
            end: end(&mut rng),
            back: 0,
            prev_kv: rng.random_range(0..2) == 0,
            filters: if rng.random_range(0..3) == 0 {
                vec![rng.random_range(0..2)]
            } else {
                vec![]
            },
        });
    }
    for _ in 0..n {
        let op = match rng.random_range(0..20) {
            0..=9 => leaf(&mut rng, &key, &end, lease_base),
            10..=13 => {
                let branch = |rng: &mut rand::rngs::StdRng| {
                    (0..rng.random_range(0..3))
                        .map(|_| leaf(rng, &key, &end, lease_base))
                        .collect::<Vec<_>>()
                };
                let mut success = branch(&mut rng);
                if rng.random_range(0..4) == 0 {
                    success.push(Op::Txn {
                        compare: vec![cmp(&mut rng)],
                        success: branch(&mut rng),
                        failure: branch(&mut rng),
                    });
                }
                Op::Txn {
                    compare: (0..rng.random_range(0..3)).map(|_| cmp(&mut rng)).collect(),
                    success,
                    failure: branch(&mut rng),
                }
            }
            14 => Op::Range {
                key: "\0".into(),
                end: "\0".into(),
                limit: 0,
                revision: 0,
                sort_order: 0,
                sort_target: 0,
                keys_only: false,
                count_only: false,
                min_mod: rng.random_range(0..3),
                max_mod: 0,
                min_create: 0,
                max_create: 0,
            },
            15 => Op::LeaseGrant {
                id: lease_base + rng.random_range(1..4),
                ttl: 300,
            },
            16 => Op::LeaseRevoke {
                id: lease_base + rng.random_range(1..4),
            },
            17 => Op::LeaseTtl {
                id: lease_base + rng.random_range(1..4),
                keys: true,
            },
            18 => Op::Compact {
                back: rng.random_range(0..4),
            },
            _ => Op::Watch {
                key: key(&mut rng),
                end: end(&mut rng),
                back: rng.random_range(0..6),
                prev_kv: rng.random_range(0..2) == 0,
                filters: vec![],
            },
        };
        ops.push(op);
    }
    ops
}

fn corpus_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_answers_as_etcd() {
    if !etcd_available() {
        panic!("this test needs /usr/bin/etcd (Debian package etcd-server)");
    }
    let dir = temp_dir("kdist-diff");
    // progress notifications tell when etcd caught a watch up (see `WatchStream::synced`)
    let etcd_proc = Etcd::start_with(
        dir.path(),
        &["--experimental-watch-progress-notify-interval=100ms"],
    );
    let ds = Datastore::start(dir.path());
    let mut etcd = Side::connect(&etcd_proc.endpoint(), true).await;
    let mut kdist = Side::connect(&ds.endpoint(), false).await;

    let mut entries: Vec<_> = std::fs::read_dir(corpus_dir())
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    let mut ran = 0;
    for path in entries
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
    {
        let text = std::fs::read_to_string(path).expect("read corpus file");
        let ops: Vec<Op> =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if let Err(diff) = compare_sequence(&mut etcd, &mut kdist, &ops).await {
            panic!("corpus case {} differs: {diff}", path.display());
        }
        ran += 1;
    }
    let seeds: u64 = std::env::var("KDIST_DIFF_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    for seed in 0..seeds {
        // Lease ids are global to a server: each sequence gets its own range.
        let ops = random_ops(seed, 30, 1000 * (seed as i64 + 1) + 100_000);
        if let Err(diff) = compare_sequence(&mut etcd, &mut kdist, &ops).await {
            let file = corpus_dir().join(format!("random-seed-{seed}.json"));
            let _ = std::fs::create_dir_all(corpus_dir());
            let _ = std::fs::write(
                &file,
                serde_json::to_string_pretty(&ops).expect("serialize ops"),
            );
            panic!(
                "random sequence (seed {seed}) differs, saved to {}: {diff}",
                file.display()
            );
        }
        ran += 1;
    }
    assert!(ran > 0);
    drop(ds);
    drop(etcd_proc);
}
