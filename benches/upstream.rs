//! The upstream's ingest rate and sketch merging, with baselines from the
//! same run.
//!
//! Run: `cargo bench --bench upstream` (add `-- --quick` for a short run).
//!
//! 1. Ingest: the release `edgemeter upstream` (SQLite store, fsync on every
//!    commit) takes gzip batches of 100 points each from 8 keep-alive
//!    clients posting as fast as it answers, for a fixed time. Reported:
//!    batches/s acknowledged (each only after its commit), and batches per
//!    CPU-second of the upstream process (its event loop plus its store
//!    thread: "on one core"). The batches are encoded before the clock
//!    starts, so the clients cost little.
//!    Baseline, same disk, same run: the same points INSERTed by a bare
//!    program into the store's `points` layout with their series' ids
//!    known, one transaction per batch (what a straightforward ingest does
//!    per request, without HTTP, gzip, JSON, tokens, the duplicate check or
//!    looking its series up).
//!    Where a batch's CPU goes: the same batches gunzipped and decoded
//!    (`wire::gunzip`, `wire::decode`), then stored in groups of 4
//!    (`Store::ingest`, SQLite, same disk) in this process; what the
//!    upstream spent beyond the two is its HTTP server, the sockets and
//!    the hand-offs between its threads.
//! 2. Merge: 1,000 agents' dense p = 14 sketches for one window.
//!    - in process: check and merge the 1,000 envelopes as a query does per
//!      window (`Sketch::merge_encoded`), against a baseline of a bare
//!      byte-wise max over the same 1,000 register arrays;
//!    - end to end: 1,000 agents post one sketch each for the same window,
//!      then `GET /v1/series` for it (read, decode, merge, answer).

#[path = "support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::{bench_dir, cpu_ticks, gzip, now_ms, read_response, release_bin};

use edgemeter::sketch::{Sketch, hash_i64};
use edgemeter::upstream::{db, store::Store};
use edgemeter::wire;

const POINTS: usize = 100;
const CLIENTS: usize = 8;
const AGENTS: usize = 1000;

fn points_json(agent: &str, seq: u64, ts: i64) -> String {
    let points: Vec<String> = (0..POINTS)
        .map(|i| {
            format!(
                r#"{{"metric":"bench_counter","dims":{{"gateway":"gw-{}","window":"30m","series":"{}"}},"ts":{ts},"value":{i},"unit":"Count"}}"#,
                seq % 50,
                i % 10
            )
        })
        .collect();
    format!(
        r#"{{"v":1,"agent_id":"{agent}","outbox_id":"bench","seq":{seq},"points":[{}]}}"#,
        points.join(",")
    )
}

fn request(token: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST /v1/batches HTTP/1.1\r\nhost: b\r\nauthorization: Bearer {token}\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

struct Upstream {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Upstream {
    fn start(bin: &Path, tag: &str, agents: &[String]) -> Upstream {
        let dir = bench_dir(tag);
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let config = support::upstream_config(&dir, port, agents, "max_connections = 2048", "");
        let child = support::start_upstream(bin, &config, port);
        Upstream { child, port, dir }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// Batches/s and batches per CPU-second of the upstream.
fn ingest(bin: &Path, run: Duration) -> (f64, f64, u64) {
    let up = Upstream::start(bin, "upstream-ingest", &["bench".to_owned()]);
    // Enough batches for the run at well above the target rate.
    let per_client = (run.as_secs_f64() * 1500.0) as usize;
    let ts = now_ms() - 60_000;
    println!("  encoding {} batches...", per_client * CLIENTS);
    let requests: Vec<Vec<Vec<u8>>> = (0..CLIENTS)
        .map(|c| {
            (0..per_client)
                .map(|i| {
                    let seq = (c * 10_000_000 + i + 1) as u64;
                    request("t-bench", &gzip(points_json("bench", seq, ts).as_bytes()))
                })
                .collect()
        })
        .collect();
    let ok = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let pid = up.child.id();
    let (t0, cpu0) = (Instant::now(), cpu_ticks(pid));
    let threads: Vec<_> = requests
        .into_iter()
        .map(|reqs| {
            let (ok, stop, port) = (ok.clone(), stop.clone(), up.port);
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                s.set_nodelay(true).expect("nodelay");
                s.set_read_timeout(Some(Duration::from_secs(30)))
                    .expect("timeout");
                let mut buf = Vec::new();
                for r in reqs {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    s.write_all(&r).expect("write");
                    match read_response(&mut s, &mut buf) {
                        Some(200) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("the upstream answered {other:?}"),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    let (elapsed, cpu) = (t0.elapsed(), cpu_ticks(pid) - cpu0);
    let done = ok.load(Ordering::Relaxed);
    for t in threads {
        t.join().expect("client");
    }
    let rate = done as f64 / elapsed.as_secs_f64();
    let per_cpu = done as f64 / (cpu as f64 / 100.0).max(0.01);
    (rate, per_cpu, done)
}

/// CPU µs per batch of `wire::gunzip` + `wire::decode`, and of
/// `Store::ingest` in groups of 4, in this process (nothing else runs in it
/// meanwhile).
fn split(batches: usize) -> (f64, f64) {
    let ts = now_ms() - 60_000;
    let bodies: Vec<Vec<u8>> = (0..batches)
        .map(|i| gzip(points_json("bench", i as u64 + 1, ts).as_bytes()))
        .collect();
    let dir = bench_dir("upstream-split");
    let sqlite = db::Sqlite::open(&dir.join("split.db"), false).expect("open");
    let edge_dims = edgemeter::upstream::config::DEFAULT_EDGE_DIMS
        .iter()
        .map(|d| d.to_string())
        .collect();
    let mut store = Store::new(Box::new(sqlite), edge_dims, 30_000);
    let me = std::process::id();
    let cpu0 = cpu_ticks(me);
    let decoded: Vec<wire::Batch> = bodies
        .iter()
        .map(|b| {
            let json = wire::gunzip(b, 8 << 20).expect("gunzip");
            wire::decode(&json, now_ms()).expect("decode")
        })
        .collect();
    let cpu1 = cpu_ticks(me);
    for group in decoded.chunks(4) {
        let refs: Vec<&wire::Batch> = group.iter().collect();
        store.ingest(&refs, now_ms()).expect("ingest");
    }
    let cpu2 = cpu_ticks(me);
    drop(store);
    std::fs::remove_dir_all(&dir).ok();
    let per_batch = |ticks: u64| ticks as f64 * 1e4 / batches as f64;
    (per_batch(cpu1 - cpu0), per_batch(cpu2 - cpu1))
}

/// The same points in the store's layout, bare INSERTs with their series'
/// ids known, one transaction per batch (FULL fsync, WAL): batches per
/// second, and per CPU-second of this process (nothing else runs in it
/// meanwhile).
fn sqlite_floor(batches: usize) -> (f64, f64) {
    let dir = bench_dir("upstream-floor");
    let conn = rusqlite::Connection::open(dir.join("floor.db")).expect("open");
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
         CREATE TABLE points (series INTEGER NOT NULL, metric TEXT NOT NULL,
             ts INTEGER NOT NULL, value REAL NOT NULL);
         CREATE INDEX points_by_time ON points (metric, ts);",
    )
    .expect("schema");
    let ts = now_ms();
    let (t0, cpu0) = (Instant::now(), cpu_ticks(std::process::id()));
    for b in 0..batches {
        conn.execute_batch("BEGIN").expect("begin");
        {
            let mut st = conn
                .prepare_cached("INSERT INTO points VALUES (?1, ?2, ?3, ?4)")
                .expect("prepare");
            for i in 0..POINTS {
                // gateway gw-{b % 50}, series {i % 10}: as `points_json`.
                let series = (b % 50 * 10 + i % 10) as i64;
                st.execute(rusqlite::params![series, "bench_counter", ts, i as f64])
                    .expect("insert");
            }
        }
        conn.execute_batch("COMMIT").expect("commit");
    }
    let rate = batches as f64 / t0.elapsed().as_secs_f64();
    let cpu = cpu_ticks(std::process::id()) - cpu0;
    let per_cpu = batches as f64 / (cpu as f64 / 100.0).max(0.01);
    std::fs::remove_dir_all(&dir).ok();
    (rate, per_cpu)
}

fn dense_sketches(n: usize) -> Vec<Sketch> {
    (0..n)
        .map(|a| {
            let mut s = Sketch::default();
            // 3,000 ids each, overlapping their neighbours: dense (> 2,048).
            for id in (a as i64 * 1000)..(a as i64 * 1000 + 3000) {
                s.insert(hash_i64(id));
            }
            assert!(!s.is_exact());
            s
        })
        .collect()
}

fn median(v: Vec<Duration>) -> Duration {
    support::median_by(v, Duration::as_secs_f64)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let run = if quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(10)
    };
    let bin = release_bin();

    println!("upstream ingest: {CLIENTS} keep-alive clients, batches of {POINTS} points, {run:?}");
    let (rate, per_cpu, done) = ingest(&bin, run);
    let (floor, floor_per_cpu) = sqlite_floor(if quick { 1000 } else { 3000 });
    println!(
        "  edgemeter upstream: {rate:>9.0} batches/s acknowledged ({done} in all), {per_cpu:>6.0} per CPU-second of the upstream"
    );
    println!(
        "  sqlite floor      : {floor:>9.0} batches/s (bare INSERTs of the points, series known, one transaction per batch), {floor_per_cpu:>6.0} per CPU-second"
    );
    println!(
        "  ratio             : {:.2}x the floor's batches/s, {:.2}x its batches per CPU-second; target 2,000 per CPU-second: {}",
        rate / floor,
        per_cpu / floor_per_cpu,
        if per_cpu >= 2000.0 { "met" } else { "NOT met" }
    );
    let (decode_us, store_us) = split(if quick { 2000 } else { 6000 });
    let total_us = 1e6 / per_cpu;
    println!(
        "  where it goes     : {total_us:.0} µs of CPU per batch in the upstream; in process: gunzip + decode {decode_us:.0} µs, store {store_us:.0} µs (groups of 4); the HTTP server, sockets and thread hand-offs the other {:.0} µs",
        total_us - decode_us - store_us
    );

    println!("sketch merge: {AGENTS} agents' dense p=14 sketches for one window");
    let sketches = dense_sketches(AGENTS);
    let envelopes: Vec<Vec<u8>> = sketches.iter().map(Sketch::encode).collect();
    let rounds = if quick { 3 } else { 7 };
    let merged_estimate;
    let ours = {
        let mut times = Vec::new();
        let mut est = 0.0;
        for _ in 0..rounds {
            let t = Instant::now();
            let mut m = Sketch::default();
            for e in &envelopes {
                m.merge_encoded(e).expect("ours");
            }
            est = m.estimate();
            times.push(t.elapsed());
        }
        merged_estimate = est;
        median(times)
    };
    let floor = {
        let regs: Vec<&[u8]> = envelopes.iter().map(|e| &e[16..]).collect();
        let mut times = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            let mut acc = vec![0u8; regs[0].len()];
            for r in &regs {
                for (a, b) in acc.iter_mut().zip(r.iter()) {
                    *a = (*a).max(*b);
                }
            }
            std::hint::black_box(&acc);
            times.push(t.elapsed());
        }
        median(times)
    };
    let truth = (AGENTS * 1000 + 2000) as f64;
    println!(
        "  check + merge     : {:>8.2} ms (estimate {merged_estimate:.0}, true {truth:.0}, error {:+.2} %)",
        ours.as_secs_f64() * 1e3,
        (merged_estimate - truth) / truth * 100.0
    );
    println!(
        "  bare byte-wise max: {:>8.2} ms",
        floor.as_secs_f64() * 1e3
    );
    println!(
        "  ratio             : {:.2}x the floor",
        ours.as_secs_f64() / floor.as_secs_f64()
    );

    // End to end: 1,000 agents post one sketch each; one query merges them.
    let agents: Vec<String> = (0..AGENTS).map(|a| format!("agent-{a}")).collect();
    let up = Upstream::start(&bin, "upstream-merge", &agents);
    let ts = now_ms() - 60_000;
    use base64::Engine;
    for (a, env) in agents.iter().zip(&envelopes) {
        let b64 = base64::engine::general_purpose::STANDARD.encode(env);
        let json = format!(
            r#"{{"v":1,"agent_id":"{a}","outbox_id":"m","seq":1,"sketches":[{{"metric":"bench_users","dims":{{"agent":"{a}","window":"30m"}},"ts":{ts},"unit":"Count","sketch":"{b64}"}}]}}"#
        );
        let mut s = TcpStream::connect(("127.0.0.1", up.port)).expect("connect");
        s.write_all(&request(&format!("t-{a}"), &gzip(json.as_bytes())))
            .expect("write");
        let mut buf = Vec::new();
        assert_eq!(read_response(&mut s, &mut buf), Some(200));
    }
    let mut times = Vec::new();
    let mut body = String::new();
    for _ in 0..rounds {
        let mut s = TcpStream::connect(("127.0.0.1", up.port)).expect("connect");
        let t = Instant::now();
        s.write_all(b"GET /v1/series?metric=bench_users&range=1D HTTP/1.1\r\nauthorization: Bearer admin\r\nconnection: close\r\n\r\n")
            .expect("write");
        body.clear();
        s.read_to_string(&mut body).expect("read");
        times.push(t.elapsed());
    }
    assert!(
        body.starts_with("HTTP/1.1 200") && body.contains("\"agents\":1000"),
        "{body}"
    );
    println!(
        "  GET /v1/series    : {:>8.2} ms for the window (read {AGENTS} sketches from SQLite, merge, answer)",
        median(times).as_secs_f64() * 1e3
    );
}
