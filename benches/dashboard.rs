//! The dashboard's cost: server time and page weight, and what `http_listen`
//! costs an idle agent.
//!
//! Run: `cargo bench --bench dashboard` (full: 500 edges × 30 days of
//! 30-minute windows, a point and a sketch of 40 users each, 1.44 M rows);
//! `-- --quick` (the test command): 20 edges × 2 days.
//!
//! 1. The release `edgemeter upstream` on a SQLite store filled directly
//!    (the schema the upstream created, rows written by rusqlite in one
//!    transaction), then started again (counting them into the union
//!    cache, as an upgraded store does once). Measured: wall time of
//!    `GET /?range=30D` (signed in) and `GET /edges`, median of 5 after one
//!    warm-up (the first is shown too: the first view after the fill merges
//!    every window once), and bytes per page.
//!    Targets: ≤ 150 ms, ≤ 300 KB. Baseline in the same run: `GET /health`
//!    (a request that touches the store), and `/v1/series` of the same data
//!    as CSV (the API the page is drawn from).
//! 2. An idle agent (one synthetic source at 1/s, a csv sink) with and
//!    without `http_listen`, 20 s each: resident memory and CPU ticks.
//!    Targets: ≤ 0.5 MiB more, no measurable CPU more.

#[path = "support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{bench_dir, cpu_ticks, release_bin, start_upstream, upstream_config};

const WINDOW_MS: i64 = 30 * 60_000;
const USERS_PER_EDGE: i64 = 40;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One request; (status, head, body, wall time).
fn request(port: u16, raw: &str) -> (u16, String, Vec<u8>, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    s.write_all(raw.as_bytes()).expect("send");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let took = started.elapsed();
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(buf.len());
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let code = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, head, buf[(end + 4).min(buf.len())..].to_vec(), took)
}

fn get(port: u16, path: &str, extra: &str) -> (u16, String, Vec<u8>, Duration) {
    request(
        port,
        &format!("GET {path} HTTP/1.1\r\nhost: b\r\n{extra}connection: close\r\n\r\n"),
    )
}

fn median(v: Vec<Duration>) -> Duration {
    support::median_by(v, Duration::as_secs_f64)
}

fn fill(db: &std::path::Path, edges: usize, days: i64, now: i64) -> usize {
    let mut conn = rusqlite::Connection::open(db).expect("open the store");
    let tx = conn.transaction().expect("transaction");
    let start = now - days * 86_400_000;
    let first = start - start.rem_euclid(WINDOW_MS) + WINDOW_MS;
    let mut rows = 0;
    {
        let mut series = tx
            .prepare("INSERT INTO series (id, metric, net, agent, dims, unit) VALUES (?1, 'active_users', ?2, ?3, ?4, 'Count') ON CONFLICT DO NOTHING")
            .unwrap();
        let mut point = tx
            .prepare("INSERT INTO points (series, metric, ts, value) VALUES (?1, 'active_users', ?2, ?3)")
            .unwrap();
        let mut sketch = tx
            .prepare("INSERT INTO sketches (metric, net, ts, agent, dims, unit, estimate, sketch) VALUES ('active_users', ?1, ?2, ?3, ?4, 'Count', ?5, ?6)")
            .unwrap();
        let net = r#"{"epochs":"1","window":"30m"}"#;
        let mut ts = first;
        while ts < now {
            for e in 0..edges {
                let agent = format!("gw{e:03}");
                let dims = format!(r#"{{"epochs":"1","gateway":"{agent}","window":"30m"}}"#);
                // Neighbours share half their users, as gossip makes them.
                let mut sk = edgemeter::sketch::Sketch::default();
                let base = e as i64 * USERS_PER_EDGE / 2 + (ts / WINDOW_MS) % 7;
                for u in base..base + USERS_PER_EDGE {
                    let (h, _) = edgemeter::hash::murmur3_x64_128(&u.to_le_bytes(), 0);
                    sk.insert(h);
                }
                let v = sk.estimate();
                let id = e as i64 + 1;
                series
                    .execute(rusqlite::params![id, net, agent, dims])
                    .unwrap();
                point.execute(rusqlite::params![id, ts, v]).unwrap();
                sketch
                    .execute(rusqlite::params![net, ts, agent, dims, v, sk.encode()])
                    .unwrap();
                rows += 2;
            }
            ts += WINDOW_MS;
        }
        let mut batch = tx
            .prepare("INSERT INTO batches (agent, outbox, seq, received, records) VALUES (?1, 'o', ?2, ?3, 96)")
            .unwrap();
        for e in 0..edges {
            for seq in 0..days {
                batch
                    .execute(rusqlite::params![
                        format!("gw{e:03}"),
                        seq,
                        now - (days - seq) * 86_400_000
                    ])
                    .unwrap();
            }
        }
    }
    tx.commit().expect("commit");
    rows
}

fn dashboard(bin: &std::path::Path, edges: usize, days: i64) {
    let dir = bench_dir("dashboard");
    let port = free_port();
    let agents: Vec<String> = (0..edges).map(|e| format!("gw{e:03}")).collect();
    let cfg = upstream_config(&dir, port, &agents, "", "");
    // Once to create the store, then filled while it is stopped.
    let mut up = start_upstream(bin, &cfg, port);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status();
    let _ = up.wait();
    let now = support::now_ms();
    let filled = Instant::now();
    let rows = fill(&dir.join("state").join("upstream.db"), edges, days, now);
    println!(
        "  store: {edges} edges × {days} days of 30-minute windows: {rows} rows in {:.1} s",
        filled.elapsed().as_secs_f64()
    );
    // The first start after the fill counts the sketches into the union
    // cache (what an upgraded store does once).
    let started = Instant::now();
    let mut up = start_upstream(bin, &cfg, port);
    println!(
        "  start, counting the store into the union cache: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let (code, head, _, _) = request(
        port,
        "POST /sign-in HTTP/1.1\r\nhost: b\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 11\r\nconnection: close\r\n\r\ntoken=admin",
    );
    assert_eq!(code, 303, "sign-in failed: {head}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("a cookie")
        .to_owned();
    let with = format!("cookie: {cookie}\r\n");
    let range = format!("{days}D");
    let pages = [
        ("health (baseline)", "/health".to_owned(), String::new()),
        (
            "/v1/series csv (baseline)",
            format!("/v1/series?metric=active_users&dim.window=30m&range={range}&format=csv"),
            with.clone(),
        ),
        (
            "active users",
            format!("/?metric=active_users&dim.window=30m&dim.epochs=1&range={range}"),
            with.clone(),
        ),
        ("edges", "/edges".to_owned(), with.clone()),
    ];
    for (label, path, auth) in pages {
        let (code, _, body, first) = get(port, &path, &auth);
        assert_eq!(code, 200, "{label}: {}", String::from_utf8_lossy(&body));
        let times: Vec<Duration> = (0..5).map(|_| get(port, &path, &auth).3).collect();
        let m = median(times);
        let kb = body.len() as f64 / 1000.0;
        let verdict = match label {
            "active users" | "edges" => format!(
                "; targets ≤ 150 ms and ≤ 300 KB: {}",
                if m <= Duration::from_millis(150) && kb <= 300.0 {
                    "met"
                } else {
                    "NOT met"
                }
            ),
            _ => String::new(),
        };
        println!(
            "  {label:<26}: {:>8.1} ms median of 5 (first {:>8.1} ms), {kb:>8.1} KB{verdict}",
            m.as_secs_f64() * 1000.0,
            first.as_secs_f64() * 1000.0
        );
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status();
    let _ = up.wait();
    std::fs::remove_dir_all(&dir).ok();
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// An idle agent for `secs`: (RSS KiB at the end, CPU ticks over the run).
fn idle_agent(bin: &std::path::Path, listen: bool, secs: u64) -> (u64, u64) {
    let dir = bench_dir(if listen { "idle-http" } else { "idle" });
    let extra = if listen {
        format!("http_listen = \"127.0.0.1:{}\"\n", free_port())
    } else {
        String::new()
    };
    let cfg = dir.join("a.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nid = \"idle\"\nstate_dir = \"state\"\n{extra}\n[[source]]\ntype = \"synthetic\"\nrate_per_sec = 1\n\n\
             [[sink]]\ntype = \"csv\"\nname = \"local\"\npath = \"out.csv\"\n"
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(bin)
        .args(["run", "-c"])
        .arg(&cfg)
        .env("EDGEMETER_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the agent");
    std::thread::sleep(Duration::from_secs(2));
    let before = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_secs(secs));
    let out = (rss_kib(child.id()), cpu_ticks(child.id()) - before);
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).ok();
    out
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let bin = release_bin();
    let (edges, days) = if quick { (20, 2) } else { (500, 30) };
    println!("dashboard: {edges} edges, {days} days (release binary, SQLite store)");
    dashboard(&bin, edges, days);
    let secs = if quick { 5 } else { 20 };
    let (rss_off, cpu_off) = idle_agent(&bin, false, secs);
    let (rss_on, cpu_on) = idle_agent(&bin, true, secs);
    let more = rss_on as f64 - rss_off as f64;
    println!(
        "idle agent over {secs} s: without http_listen {rss_off} KiB, {cpu_off} CPU ticks; with it {rss_on} KiB, {cpu_on} ticks: \
         {more:+.0} KiB (target ≤ 512: {})",
        if more <= 512.0 { "met" } else { "NOT met" }
    );
}
