//! The Rust `etcd-client` crate against `kdist datastore serve`, on the paths
//! kube-apiserver uses: Range with prefix + limit + revision (paginated lists), Txn with a
//! mod_revision compare (optimistic updates), Watch with prev_kv, progress requests,
//! leases with keep-alive, and Maintenance Status.

mod common;

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_crate_works_unchanged() {
    let dir = temp_dir("kdist-client");
    let ds = Datastore::start(dir.path());
    let mut c = Client::connect([ds.endpoint()], None)
        .await
        .expect("connect");

    let status = c.status().await.expect("status");
    assert!(status.version().starts_with("3.5."), "{}", status.version());

    for i in 0..5 {
        c.put(format!("/registry/pods/p{i}"), format!("v{i}"), None)
            .await
            .expect("put");
    }
    let rev = c
        .get("/registry/pods/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();

    // Paginated list at a fixed revision, as the apiserver's continue tokens do.
    let page1 = c
        .get(
            "/registry/pods/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_limit(2)
                    .with_revision(rev),
            ),
        )
        .await
        .expect("page 1");
    assert_eq!(page1.kvs().len(), 2);
    assert!(page1.more());
    assert_eq!(page1.count(), 5);
    c.put("/registry/pods/p0", "changed", None)
        .await
        .expect("put");
    let mut next = page1.kvs()[1].key().to_vec();
    next.push(0);
    let page2 = c
        .get(
            next,
            Some(
                GetOptions::new()
                    .with_range("/registry/pods0")
                    .with_limit(2)
                    .with_revision(rev),
            ),
        )
        .await
        .expect("page 2");
    let keys: Vec<_> = page2
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, ["/registry/pods/p2", "/registry/pods/p3"]);

    // Optimistic update: succeeds on the right mod_revision, else returns the object.
    let cur = c.get("/registry/pods/p1", None).await.expect("get").kvs()[0].mod_revision();
    let ok = c
        .txn(
            Txn::new()
                .when([Compare::mod_revision(
                    "/registry/pods/p1",
                    CompareOp::Equal,
                    cur,
                )])
                .and_then([TxnOp::put("/registry/pods/p1", "v1-updated", None)])
                .or_else([TxnOp::get("/registry/pods/p1", None)]),
        )
        .await
        .expect("txn");
    assert!(ok.succeeded());
    let stale = c
        .txn(
            Txn::new()
                .when([Compare::mod_revision(
                    "/registry/pods/p1",
                    CompareOp::Equal,
                    cur,
                )])
                .and_then([TxnOp::put("/registry/pods/p1", "lost", None)])
                .or_else([TxnOp::get("/registry/pods/p1", None)]),
        )
        .await
        .expect("txn");
    assert!(!stale.succeeded());
    match &stale.op_responses()[0] {
        TxnOpResponse::Get(g) => assert_eq!(g.kvs()[0].value(), b"v1-updated"),
        other => panic!("unexpected {other:?}"),
    }

    // Watch with prev_kv and progress notifications, as the watch cache runs it.
    let mut w = c
        .watch(
            "/registry/pods/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_prev_key()
                    .with_progress_notify()
                    .with_start_revision(rev + 1),
            ),
        )
        .await
        .expect("watch");
    let mut events = Vec::new();
    while events.len() < 2 {
        let resp = next_message(&mut w).await;
        events.extend(resp.events().to_vec());
    }
    assert_eq!(events[0].kv().unwrap().value(), b"changed");
    assert_eq!(events[0].prev_kv().unwrap().value(), b"v0");
    assert_eq!(events[1].kv().unwrap().value(), b"v1-updated");
    c.delete("/registry/pods/p4", None).await.expect("delete");
    let resp = next_message(&mut w).await;
    assert_eq!(resp.events()[0].event_type(), EventType::Delete);
    assert_eq!(resp.events()[0].prev_kv().unwrap().value(), b"v4");
    let head = c
        .get("x", None)
        .await
        .expect("get")
        .header()
        .unwrap()
        .revision();
    w.request_progress().await.expect("progress");
    let progress = next_message(&mut w).await;
    assert!(progress.events().is_empty());
    assert_eq!(progress.header().unwrap().revision(), head);

    // Leases: keep-alive renews; expiry deletes the key with a delete event.
    let lease = c.lease_grant(60, None).await.expect("grant");
    let (mut keeper, mut stream) = c.lease_keep_alive(lease.id()).await.expect("keep alive");
    keeper.keep_alive().await.expect("send keep alive");
    let ka = stream.message().await.expect("ka").expect("ka open");
    assert_eq!(ka.ttl(), 60);
    let short = c.lease_grant(2, None).await.expect("grant");
    c.put(
        "/registry/events/e1",
        "event",
        Some(PutOptions::new().with_lease(short.id())),
    )
    .await
    .expect("put with lease");
    let mut ew = c
        .watch("/registry/events/e1", None)
        .await
        .expect("watch events");
    let gone = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let resp = ew.message().await.expect("watch").expect("open");
            if resp
                .events()
                .iter()
                .any(|e| e.event_type() == EventType::Delete)
            {
                return;
            }
        }
    })
    .await;
    assert!(gone.is_ok(), "expired lease did not delete its key");
    assert!(
        c.get("/registry/events/e1", None)
            .await
            .expect("get")
            .kvs()
            .is_empty()
    );
    let ttl = c.lease_time_to_live(short.id(), None).await.expect("ttl");
    assert_eq!(ttl.ttl(), -1);

    let members = c.member_list().await.expect("members");
    assert_eq!(members.members().len(), 1);
    drop(ds);
}

/// New watch streams and progress requests while writes land: a watch from "now" gets
/// every event after its created revision (none lost between a commit and its
/// publication), and a progress notification never names a revision below an event the
/// stream already sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_racing_writes_lose_nothing_and_progress_never_goes_back() {
    let dir = temp_dir("kdist-watch-race");
    let ds = Datastore::start(dir.path());
    let c = Client::connect([ds.endpoint()], None)
        .await
        .expect("connect");
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (mut c, writing) = (c.clone(), writing.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while writing.load(std::sync::atomic::Ordering::SeqCst) {
                c.put(format!("/race/k{n}"), "v", None).await.expect("put");
                n += 1;
            }
        })
    };

    // progress on one long-lived stream
    let progress = {
        let mut c = c.clone();
        tokio::spawn(async move {
            let opts = WatchOptions::new().with_prefix();
            let mut w = c.watch("/race/", Some(opts)).await.expect("watch");
            let (mut seen, mut checked) = (0i64, 0);
            while checked < 200 {
                w.request_progress().await.expect("progress");
                loop {
                    let resp = next_message(&mut w).await;
                    if resp.created() {
                        continue;
                    }
                    if resp.events().is_empty() {
                        let rev = resp.header().unwrap().revision();
                        assert!(rev >= seen, "progress at {rev} after an event at {seen}");
                        checked += 1;
                        break;
                    }
                    for e in resp.events() {
                        seen = seen.max(e.kv().unwrap().mod_revision());
                    }
                }
            }
        })
    };

    // new streams watching from now
    let mut c2 = c.clone();
    for _ in 0..150 {
        let opts = WatchOptions::new().with_prefix();
        let mut w = c2.watch("/race/", Some(opts)).await.expect("watch");
        let mut created = None;
        loop {
            let resp = next_message(&mut w).await;
            if resp.created() {
                created = Some(resp.header().unwrap().revision());
            }
            if let Some(first) = resp.events().first() {
                let created = created.expect("created before events");
                assert_eq!(
                    first.kv().unwrap().mod_revision(),
                    created + 1,
                    "the first event after a watch created at {created}"
                );
                break;
            }
        }
    }
    progress.await.expect("progress checks");
    writing.store(false, std::sync::atomic::Ordering::SeqCst);
    writer.await.expect("writer");
}

/// The next message of a watch stream, within 5 s.
async fn next_message(w: &mut etcd_client::WatchStream) -> etcd_client::WatchResponse {
    tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .expect("watch timeout")
        .expect("watch")
        .expect("open")
}
