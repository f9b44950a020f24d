//! A small benchmark of an etcd v3 endpoint — kdist's datastore or a real etcd — through
//! one client (the generated stubs), so the two can be compared on the same workload:
//! concurrent puts, ranges of many keys, and watch delivery latency.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Mutex;

use super::client;
use super::error::DatastoreError;
use super::proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, WatchCreateRequest, WatchRequest,
    kv_client::KvClient, watch_client::WatchClient, watch_request,
};
use super::remote::rpc;

/// The workload.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Concurrent writers.
    pub clients: usize,
    /// Connections the writers share, writer `i` on connection `i % conns` (etcd's
    /// `benchmark --clients --conns`); at most `clients`.
    pub conns: usize,
    /// How long the put phase runs.
    pub put_duration: Duration,
    pub value_size: usize,
    /// Keys each range returns.
    pub range_keys: usize,
    pub ranges: usize,
    pub watch_events: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            clients: 16,
            conns: 16,
            put_duration: Duration::from_secs(5),
            value_size: 256,
            range_keys: 1000,
            ranges: 200,
            watch_events: 2000,
        }
    }
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p99_us: u64,
}

impl Latency {
    fn of(mut samples: Vec<Duration>) -> Latency {
        samples.sort();
        let at = |q: f64| {
            if samples.is_empty() {
                return 0;
            }
            let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
            samples[i.min(samples.len() - 1)].as_micros() as u64
        };
        Latency {
            p50_us: at(0.50),
            p99_us: at(0.99),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub endpoint: String,
    pub puts: u64,
    pub puts_per_sec: f64,
    pub put_latency: Latency,
    pub range_latency: Latency,
    pub watch_latency: Latency,
}

/// A failure of the benchmark itself (not of an RPC) against `endpoint`.
fn failed(endpoint: &str, reason: impl ToString) -> DatastoreError {
    DatastoreError::Bench {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    }
}

/// Runs the whole workload against `endpoint`. Keys live under `/kdist-bench/`, which
/// is deleted before and after.
pub async fn run(endpoint: &str, opts: &BenchOptions) -> Result<BenchResult, DatastoreError> {
    let channel = client::connect(endpoint).await?;
    let mut kv = KvClient::new(channel.clone());
    let prefix = b"/kdist-bench/".to_vec();
    let prefix_end = b"/kdist-bench0".to_vec();
    kv.delete_range(DeleteRangeRequest {
        key: prefix.clone(),
        range_end: prefix_end.clone(),
        prev_kv: false,
    })
    .await
    .map_err(rpc(endpoint, "DeleteRange"))?;
    let value = vec![b'v'; opts.value_size];

    // Puts: `clients` writers on `conns` connections, each writing as fast as its puts
    // are acknowledged.
    let mut conns = Vec::new();
    for _ in 0..opts.conns.clamp(1, opts.clients.max(1)) {
        conns.push(client::connect(endpoint).await?);
    }
    let mut writers = Vec::new();
    let deadline = Instant::now() + opts.put_duration;
    let started = Instant::now();
    for c in 0..opts.clients {
        let mut kv = KvClient::new(conns[c % conns.len()].clone());
        let value = value.clone();
        writers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let put = kv
                    .put(PutRequest {
                        key: format!("/kdist-bench/put/{c:02}/{n:08}").into_bytes(),
                        value: value.clone(),
                        ..Default::default()
                    })
                    .await;
                put?;
                lat.push(t.elapsed());
                n += 1;
            }
            Ok(lat)
        }));
    }
    let mut put_lat = Vec::new();
    for w in writers {
        match w.await {
            Ok(Ok(lat)) => put_lat.extend(lat),
            Ok(Err(status)) => return Err(rpc(endpoint, "Put")(status)),
            Err(e) => return Err(failed(endpoint, e)),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let puts = put_lat.len() as u64;

    // Ranges: one prefix holding `range_keys` keys, read whole.
    for i in 0..opts.range_keys {
        kv.put(PutRequest {
            key: format!("/kdist-bench/range/{i:06}").into_bytes(),
            value: value.clone(),
            ..Default::default()
        })
        .await
        .map_err(rpc(endpoint, "Put"))?;
    }
    let mut range_lat = Vec::new();
    for _ in 0..opts.ranges {
        let t = Instant::now();
        let resp = kv
            .range(RangeRequest {
                key: b"/kdist-bench/range/".to_vec(),
                range_end: b"/kdist-bench/range0".to_vec(),
                ..Default::default()
            })
            .await
            .map_err(rpc(endpoint, "Range"))?
            .into_inner();
        range_lat.push(t.elapsed());
        if resp.kvs.len() != opts.range_keys {
            return Err(failed(
                endpoint,
                format!("range returned {} keys", resp.kvs.len()),
            ));
        }
    }

    // Watch: time from issuing a put to its event arriving on another connection.
    let watch_lat = watch_latency(endpoint, &mut kv, &value, opts.watch_events).await?;

    kv.delete_range(DeleteRangeRequest {
        key: prefix,
        range_end: prefix_end,
        prev_kv: false,
    })
    .await
    .map_err(rpc(endpoint, "DeleteRange"))?;
    Ok(BenchResult {
        endpoint: endpoint.to_string(),
        puts,
        puts_per_sec: puts as f64 / elapsed,
        put_latency: Latency::of(put_lat),
        range_latency: Latency::of(range_lat),
        watch_latency: watch_lat,
    })
}

async fn watch_latency(
    endpoint: &str,
    kv: &mut KvClient<tonic::transport::Channel>,
    value: &[u8],
    events: usize,
) -> Result<Latency, DatastoreError> {
    let mut watch = WatchClient::new(client::connect(endpoint).await?);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: b"/kdist-bench/watch/".to_vec(),
                range_end: b"/kdist-bench/watch0".to_vec(),
                ..Default::default()
            },
        )),
    })
    .await
    .map_err(|e| failed(endpoint, e))?;
    let mut stream = watch
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(rpc(endpoint, "Watch"))?
        .into_inner();
    // The created response.
    stream.message().await.map_err(rpc(endpoint, "Watch"))?;
    let sent: Arc<Mutex<HashMap<Vec<u8>, Instant>>> = Arc::default();
    let seen = sent.clone();
    let receiver = tokio::spawn(async move {
        let mut lat = Vec::new();
        while lat.len() < events {
            match stream.message().await {
                Ok(Some(resp)) => {
                    let now = Instant::now();
                    let sent = seen.lock().await;
                    for ev in resp.events {
                        if let Some(t) = ev.kv.and_then(|kv| sent.get(&kv.key).copied()) {
                            lat.push(now.duration_since(t));
                        }
                    }
                }
                _ => break,
            }
        }
        lat
    });
    for i in 0..events {
        let key = format!("/kdist-bench/watch/{i:06}").into_bytes();
        sent.lock().await.insert(key.clone(), Instant::now());
        kv.put(PutRequest {
            key,
            value: value.to_vec(),
            ..Default::default()
        })
        .await
        .map_err(rpc(endpoint, "Put"))?;
    }
    let lat = tokio::time::timeout(Duration::from_secs(30), receiver)
        .await
        .map_err(|_| failed(endpoint, "watch events did not all arrive within 30s"))?
        .map_err(|e| failed(endpoint, e))?;
    drop(tx);
    Ok(Latency::of(lat))
}

/// One result per metric, each the median over `rounds` (runs of the same endpoint);
/// on a busy machine single runs move by a third, medians of interleaved rounds much less.
pub fn median(rounds: &[BenchResult]) -> Option<BenchResult> {
    fn mid<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v[v.len() / 2]
    }
    let first = rounds.first()?;
    let pick = |f: fn(&BenchResult) -> u64| mid(rounds.iter().map(f).collect());
    Some(BenchResult {
        endpoint: first.endpoint.clone(),
        puts: pick(|r| r.puts),
        puts_per_sec: mid(rounds.iter().map(|r| r.puts_per_sec).collect()),
        put_latency: Latency {
            p50_us: pick(|r| r.put_latency.p50_us),
            p99_us: pick(|r| r.put_latency.p99_us),
        },
        range_latency: Latency {
            p50_us: pick(|r| r.range_latency.p50_us),
            p99_us: pick(|r| r.range_latency.p99_us),
        },
        watch_latency: Latency {
            p50_us: pick(|r| r.watch_latency.p50_us),
            p99_us: pick(|r| r.watch_latency.p99_us),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(puts_per_sec: f64, range_p50: u64, watch_p99: u64) -> BenchResult {
        BenchResult {
            endpoint: "e".into(),
            puts: puts_per_sec as u64 * 5,
            puts_per_sec,
            put_latency: Latency {
                p50_us: 1,
                p99_us: 2,
            },
            range_latency: Latency {
                p50_us: range_p50,
                p99_us: range_p50 * 2,
            },
            watch_latency: Latency {
                p50_us: 1,
                p99_us: watch_p99,
            },
        }
    }

    #[test]
    fn median_takes_each_metric_from_the_middle_round() {
        let rounds = [
            result(5000.0, 900, 3000),
            result(9000.0, 2000, 1000),
            result(7000.0, 1500, 2000),
        ];
        let m = median(&rounds).unwrap();
        assert_eq!(m.puts_per_sec, 7000.0);
        assert_eq!(m.puts, 35000);
        assert_eq!(m.range_latency.p50_us, 1500);
        assert_eq!(m.range_latency.p99_us, 3000);
        assert_eq!(m.watch_latency.p99_us, 2000);
        assert!(median(&[]).is_none());
    }

    #[test]
    fn latency_percentiles_come_from_the_sorted_samples() {
        let samples = (1..=100).rev().map(Duration::from_micros).collect();
        let l = Latency::of(samples);
        assert_eq!((l.p50_us, l.p99_us), (51, 99));
    }
}
