//! Crash test: writers record every acknowledged put while `kdist datastore serve` is
//! killed with SIGKILL mid-load; after each restart every acknowledged key must be
//! there. 20 rounds, then SQLite's integrity check on the file.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kdist::datastore::client;
use kdist::datastore::proto::etcdserverpb::{PutRequest, RangeRequest, kv_client::KvClient};
use rand::RngExt;

use common::*;

const ROUNDS: usize = 20;
const WRITERS: usize = 16;

async fn acked_keys_survive(ds: &Datastore, acked: &HashSet<Vec<u8>>) {
    let mut kv = KvClient::new(client::connect(&ds.endpoint()).await.expect("connect"));
    let resp = kv
        .range(RangeRequest {
            key: b"crash/".to_vec(),
            range_end: b"crash0".to_vec(),
            keys_only: true,
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    let present: HashSet<Vec<u8>> = resp.kvs.into_iter().map(|kv| kv.key).collect();
    let lost: Vec<_> = acked.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged puts lost after kill -9, e.g. {:?}",
        lost.len(),
        lost.first().map(|k| String::from_utf8_lossy(k))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_puts_survive_kill_9() {
    let dir = temp_dir("kdist-crash");
    let started = Instant::now();
    let mut acked_total: HashSet<Vec<u8>> = HashSet::new();
    for round in 0..ROUNDS {
        let mut ds = Datastore::start(dir.path());
        acked_keys_survive(&ds, &acked_total).await;
        let channel = client::connect(&ds.endpoint()).await.expect("connect");
        let acked = Arc::new(Mutex::new(Vec::new()));
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let mut kv = KvClient::new(channel.clone());
            let acked = acked.clone();
            writers.push(tokio::spawn(async move {
                for n in 0.. {
                    let key = format!("crash/{round:02}/{w:02}/{n:06}").into_bytes();
                    let put = kv
                        .put(PutRequest {
                            key: key.clone(),
                            value: vec![b'x'; 256],
                            ..Default::default()
                        })
                        .await;
                    match put {
                        Ok(_) => acked.lock().expect("lock").push(key),
                        Err(_) => return,
                    }
                }
            }));
        }
        // The kill lands at a random point once the load is flowing (a loaded machine
        // can take a while for the first acknowledgement).
        let flowing = Instant::now() + Duration::from_secs(20);
        while acked.lock().expect("lock").is_empty() && Instant::now() < flowing {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let load = rand::rng().random_range(50..300);
        tokio::time::sleep(Duration::from_millis(load)).await;
        ds.proc.kill9();
        for w in writers {
            let _ = w.await;
        }
        let acked = std::mem::take(&mut *acked.lock().expect("lock"));
        assert!(!acked.is_empty(), "round {round}: no put was acknowledged");
        acked_total.extend(acked);
    }
    let ds = Datastore::start(dir.path());
    acked_keys_survive(&ds, &acked_total).await;
    let mut ds = ds;
    assert!(ds.proc.terminate().success(), "clean shutdown failed");
    let conn = rusqlite::Connection::open(&ds.db).expect("open db");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(check, "ok");
    eprintln!(
        "{ROUNDS} kill -9 rounds, {} acknowledged puts all present, {:?}",
        acked_total.len(),
        started.elapsed()
    );
}
