//! Watch streams. Each gRPC watch stream is one task that owns its watchers and
//! receives every commit from the writer's broadcast the moment it is committed.
//!
//! A watcher that starts in the past, or a stream that fell behind the broadcast,
//! catches up by reading history from SQLite up to a snapshot revision and then skips
//! broadcast revisions at or below it, so no event is lost or sent twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;
use tonic::{Status, Streaming};

use super::error::ApiError;
use super::mvcc::KeyRange;
use super::proto::etcdserverpb::{
    WatchCreateRequest, WatchRequest, WatchResponse, watch_create_request, watch_request,
};
use super::proto::mvccpb::{Event, event};
use super::store::{self, Commit, RevEvents, Store};

/// Revisions one history read covers at most.
const REPLAY_REVS: i64 = 1000;

struct Watcher {
    id: i64,
    range: KeyRange,
    /// The first revision this watcher has not seen yet.
    next_rev: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    /// Whether events went out since the last progress tick.
    sent: bool,
}

impl Watcher {
    fn select(&self, events: &[Event]) -> Vec<Event> {
        events
            .iter()
            .filter(|ev| {
                let is_put = ev.r#type == event::EventType::Put as i32;
                if (is_put && self.no_put) || (!is_put && self.no_delete) {
                    return false;
                }
                ev.kv
                    .as_ref()
                    .is_some_and(|kv| self.range.contains(&kv.key))
            })
            .map(|ev| {
                let mut ev = ev.clone();
                if !self.prev_kv {
                    ev.prev_kv = None;
                }
                ev
            })
            .collect()
    }
}

type Out = mpsc::Sender<Result<WatchResponse, Status>>;

pub(crate) struct WatchStream {
    store: Arc<Store>,
    out: Out,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
    /// The newest revision taken from the commit queue and delivered to the watchers.
    delivered: i64,
}

/// Serves one watch stream until the client goes away.
pub(crate) async fn serve(
    store: Arc<Store>,
    mut requests: Streaming<WatchRequest>,
    out: Out,
    progress_interval: Duration,
) {
    let mut commits = store.shared.commits.subscribe();
    let mut stream = WatchStream {
        store,
        out,
        watchers: BTreeMap::new(),
        next_id: 0,
        delivered: 0,
    };
    let mut tick = tokio::time::interval(progress_interval);
    tick.tick().await;
    let out_closed = stream.out.clone();
    let result: Result<(), Stop> = async {
        loop {
            let next = tokio::select! {
                request = requests.next() => Next::Request(request),
                commit = commits.recv() => Next::Commit(commit),
                _ = tick.tick() => Next::Tick,
                _ = out_closed.closed() => return Ok(()),
            };
            match next {
                Next::Request(Some(Ok(request))) => stream.handle(request, &mut commits).await?,
                Next::Request(_) => return Ok(()),
                Next::Commit(Ok(commit)) => stream.deliver(&commit).await?,
                Next::Commit(Err(broadcast::error::RecvError::Lagged(_))) => {
                    stream.catch_up_all().await?
                }
                Next::Commit(Err(broadcast::error::RecvError::Closed)) => return Ok(()),
                Next::Tick => stream.progress_tick(&mut commits).await?,
            }
        }
    }
    .await;
    if let Err(Stop::Failed(status)) = result {
        let _ = stream.out.send(Err(status)).await;
    }
}

enum Next {
    Request(Option<Result<WatchRequest, Status>>),
    Commit(Result<Commit, broadcast::error::RecvError>),
    Tick,
}

/// Why a stream ends early.
enum Stop {
    ClientGone,
    Failed(Status),
}

impl From<ApiError> for Stop {
    fn from(err: ApiError) -> Self {
        Stop::Failed(err.into())
    }
}

impl WatchStream {
    async fn send(&self, resp: WatchResponse) -> Result<(), Stop> {
        self.out.send(Ok(resp)).await.map_err(|_| Stop::ClientGone)
    }

    async fn handle(
        &mut self,
        request: WatchRequest,
        commits: &mut broadcast::Receiver<Commit>,
    ) -> Result<(), Stop> {
        match request.request_union {
            Some(watch_request::RequestUnion::CreateRequest(create)) => {
                self.create(create, commits).await
            }
            Some(watch_request::RequestUnion::CancelRequest(cancel)) => {
                if self.watchers.remove(&cancel.watch_id).is_some() {
                    let rev = self.store.current_rev();
                    self.send(WatchResponse {
                        header: self.store.header(rev),
                        watch_id: cancel.watch_id,
                        canceled: true,
                        ..Default::default()
                    })
                    .await?;
                }
                Ok(())
            }
            Some(watch_request::RequestUnion::ProgressRequest(_)) => {
                let rev = self.sync_to_published(commits).await?;
                // Not tied to one watcher: clients hand it to every watcher of the stream.
                self.send(WatchResponse {
                    header: self.store.header(rev),
                    watch_id: -1,
                    ..Default::default()
                })
                .await
            }
            None => Ok(()),
        }
    }

    /// Delivers every commit already published, and returns the revision up to which
    /// this stream has now sent all events.
    async fn sync_to_published(
        &mut self,
        commits: &mut broadcast::Receiver<Commit>,
    ) -> Result<i64, Stop> {
        // The syncer broadcasts a commit before `current_rev` reaches it, so every commit
        // up to `rev` is in the queue now; newer ones may be too, and once delivered
        // they count: a progress revision is never below an event already sent.
        let rev = self.store.current_rev();
        loop {
            match commits.try_recv() {
                Ok(commit) => self.deliver(&commit).await?,
                Err(broadcast::error::TryRecvError::Lagged(_)) => self.catch_up_all().await?,
                Err(_) => break,
            }
        }
        Ok(rev.max(self.delivered))
    }

    async fn create(
        &mut self,
        create: WatchCreateRequest,
        commits: &mut broadcast::Receiver<Commit>,
    ) -> Result<(), Stop> {
        // The published revision, not `current_rev`: a commit is published before it is
        // broadcast, so every newer one reaches this stream's queue (subscribed before
        // any create) and nothing between the two is lost.
        let cur = self.store.published_rev();
        let range = KeyRange::new(&create.key, &create.range_end);
        let failure = if let KeyRange::Between(start, end) = &range
            && start >= end
        {
            Some("mvcc: watcher range is empty")
        } else if create.watch_id != 0 && self.watchers.contains_key(&create.watch_id) {
            Some("mvcc: duplicate watch ID provided on the WatchStream")
        } else {
            None
        };
        if let Some(reason) = failure {
            return self
                .send(WatchResponse {
                    header: self.store.header(cur),
                    watch_id: -1,
                    created: true,
                    canceled: true,
                    cancel_reason: reason.to_string(),
                    ..Default::default()
                })
                .await;
        }
        let id = if create.watch_id != 0 {
            create.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        };
        let has = |f: watch_create_request::FilterType| create.filters.contains(&(f as i32));
        let start = create.start_revision;
        let watcher = Watcher {
            id,
            range,
            next_rev: if start <= 0 { cur + 1 } else { start },
            prev_kv: create.prev_kv,
            no_put: has(watch_create_request::FilterType::Noput),
            no_delete: has(watch_create_request::FilterType::Nodelete),
            progress_notify: create.progress_notify,
            sent: false,
        };
        self.send(WatchResponse {
            header: self.store.header(cur),
            watch_id: id,
            created: true,
            ..Default::default()
        })
        .await?;
        self.watchers.insert(id, watcher);
        if start > 0 && start <= cur {
            self.catch_up(id).await?;
        }
        let _ = commits;
        Ok(())
    }

    async fn deliver(&mut self, commit: &Commit) -> Result<(), Stop> {
        let mut out = Vec::new();
        for rev_events in commit.iter() {
            self.delivered = self.delivered.max(rev_events.rev);
            for w in self.watchers.values_mut() {
                if rev_events.rev < w.next_rev {
                    continue;
                }
                w.next_rev = rev_events.rev + 1;
                let events = w.select(&rev_events.events);
                if !events.is_empty() {
                    w.sent = true;
                    out.push(WatchResponse {
                        header: self.store.header(rev_events.rev),
                        watch_id: w.id,
                        events,
                        ..Default::default()
                    });
                }
            }
        }
        for resp in out {
            self.send(resp).await?;
        }
        Ok(())
    }

    async fn catch_up_all(&mut self) -> Result<(), Stop> {
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            self.catch_up(id).await?;
        }
        Ok(())
    }

    /// Replays history to one watcher from its `next_rev` up to the committed revision.
    async fn catch_up(&mut self, id: i64) -> Result<(), Stop> {
        loop {
            let Some(w) = self.watchers.get(&id) else {
                return Ok(());
            };
            let from = w.next_rev;
            let want_prev = w.prev_kv;
            let replay = self
                .store
                .read(move |view| {
                    // only up to the published revision: later batches are not durable yet
                    let (rev, compact) = (view.rev, view.compact_rev);
                    if from < compact {
                        return Ok(Replay::Compacted(compact));
                    }
                    let to = rev.min(from.saturating_add(REPLAY_REVS - 1));
                    let prev_from = want_prev.then_some(compact);
                    let revs = store::events_between(view.conn, from, to, prev_from)?;
                    Ok(Replay::Events { revs, to, rev })
                })
                .await?;
            match replay {
                Replay::Compacted(compact) => {
                    self.watchers.remove(&id);
                    // etcd sends this response with a zero revision in its header.
                    return self
                        .send(WatchResponse {
                            header: self.store.header(0),
                            watch_id: id,
                            compact_revision: compact,
                            canceled: true,
                            ..Default::default()
                        })
                        .await;
                }
                Replay::Events { revs, to, rev } => {
                    let Some(w) = self.watchers.get_mut(&id) else {
                        return Ok(());
                    };
                    let mut events = Vec::new();
                    for r in &revs {
                        events.extend(w.select(&r.events));
                    }
                    w.next_rev = w.next_rev.max(to + 1);
                    if !events.is_empty() {
                        w.sent = true;
                        self.send(WatchResponse {
                            header: self.store.header(rev),
                            watch_id: id,
                            events,
                            ..Default::default()
                        })
                        .await?;
                    }
                    if to >= rev {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn progress_tick(
        &mut self,
        commits: &mut broadcast::Receiver<Commit>,
    ) -> Result<(), Stop> {
        if !self.watchers.values().any(|w| w.progress_notify) {
            return Ok(());
        }
        let rev = self.sync_to_published(commits).await?;
        let mut due = Vec::new();
        for w in self.watchers.values_mut() {
            if w.progress_notify && !w.sent {
                due.push(w.id);
            }
            w.sent = false;
        }
        for id in due {
            self.send(WatchResponse {
                header: self.store.header(rev),
                watch_id: id,
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }
}

enum Replay {
    Compacted(i64),
    Events {
        revs: Vec<RevEvents>,
        to: i64,
        rev: i64,
    },
}
