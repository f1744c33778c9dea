//! The relay source against the Python clients it replaces, same machine,
//! same run, same loopback server.
//!
//! Run: `cargo bench --bench relay` (add `-- --quick` for a short run;
//! `-- --soak MINUTES` for the agent alone over a long run, see [`soak`]).
//! Needs `target/test-tools/venv` with websocket-client (`scripts/test`
//! makes it).
//!
//! A server here plays the session host: 12 streams (`/ws/spin30..41`),
//! logging envelopes of `analytics` type from 200 users per stream. Each
//! subject runs through three phases:
//! 1. idle: 12 connected streams and no traffic. RSS, CPU and wake-ups
//!    (context switches of all threads).
//! 2. fixed rate: 1,667 messages/s per stream (20,004/s; EDGEMETER_BENCH_RATE
//!    sets another). CPU time per message, peak RSS (VmHWM), and the most
//!    threads seen. Each stream's sender writes what is due every 10 ms
//!    (EDGEMETER_BENCH_TICK_MS): about 17 messages in one write. A session
//!    host writes each message as it comes; `EDGEMETER_BENCH_TICK_MS=1`
//!    comes closer to that, and costs every reader more wake-ups.
//! 3. sustained: the server sends as fast as the client reads (TCP
//!    backpressure). Messages stored per second: for edgemeter, the
//!    messages' events committed to the outbox (not window points); for the
//!    baseline, lines appended to its files.
//!
//! Between 1 and 2, large frames: one 1.9 MB frame on every stream, then
//! quiet. RSS two seconds later against idle RSS, per stream (edgemeter's
//! target: within 1 MiB per stream of where it was); the peak is reset
//! after it.
//!
//! Subjects:
//! - edgemeter: the release binary, one `relay` source for the 12 streams,
//!   events stored, analytics dumped every 60 s, no sinks.
//! - baseline: `benches/relay_client.py` once per stream: websocket-client's
//!   `WebSocketApp.run_forever()`, `json.loads`, and an append per message
//!   (learning-analytics-server's client and `AddUserLog`).
//!
//! - floor: this bench run as `--floor`, the least the same work costs
//!   here (see [`floor`]). Its CPU is the floor; its RSS is not: it keeps
//!   the buffers the large frames grew.
//! - asyncio: `benches/relay_asyncio.py`, one asyncio process for all
//!   streams (`websockets`), `json.loads` and a count per message, storing
//!   nothing.
//!
//! - edgemeter +1% reqs (not with `--quick`; with EDGEMETER_BENCH_REQUESTS=1
//!   in place of the plain edgemeter, quick or not): the same, with
//!   `answer_requests = true` and every 100th message a dashboard's
//!   `all_feedback` request (five answer frames, read and dropped by the
//!   server between its sends).
//!
//! Edgemeter and the floor run in alternating rounds (3 in a full run, 1
//! with `--quick`; EDGEMETER_BENCH_ROUNDS sets another): one run's CPU per
//! message reads 10 to 20 % apart from the next on a shared machine. Their
//! rows show the round of median CPU; the targets take that CPU and, for
//! memory, threads and rates, the worst round.
//!
//! Figures are per subject and as ratios, measured in the same run.

#[path = "support/mod.rs"]
mod support;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::{Drift, USERS_PER_STREAM, bench_dir, cpu_ticks, release_bin};

use tungstenite::Message;

const STREAMS: usize = 12;
/// 20,004 messages/s over the 12 streams (issue 18's load).
const RATE_PER_STREAM: u32 = 1667;

fn rate_per_stream() -> u32 {
    std::env::var("EDGEMETER_BENCH_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(RATE_PER_STREAM)
}

/// How often each stream's sender writes what is due (10 ms;
/// EDGEMETER_BENCH_TICK_MS sets another): the frames of one tick reach the
/// subject together.
fn tick() -> Duration {
    let ms = std::env::var("EDGEMETER_BENCH_TICK_MS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(10);
    Duration::from_millis(ms)
}

const IDLE: u32 = 0;
const BLAST: u32 = u32::MAX;

struct Server {
    port: u16,
    shared: Arc<Shared>,
}

/// What the bench and every connection's sender share.
#[derive(Default)]
struct Shared {
    /// Messages per second per stream; IDLE or BLAST.
    mode: AtomicU32,
    connected: AtomicUsize,
    sent: AtomicU64,
    /// Senders between reading the mode and counting what they sent: a
    /// sender blocked in a write (the subject reading slowly) has sent
    /// messages it has not counted yet.
    busy: AtomicUsize,
    /// Raised by one: every connection sends one large frame.
    large: AtomicU64,
}

const LARGE_FRAME_BYTES: usize = 1_900_000;

impl Server {
    /// Until the subject has connected all its streams (at most 30 s).
    fn wait_connected(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.shared.connected.load(Ordering::SeqCst) < STREAMS {
            assert!(
                Instant::now() < deadline,
                "the subject did not connect its {STREAMS} streams"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start(requests: bool) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            mode: AtomicU32::new(IDLE),
            ..Shared::default()
        });
        let s = Server {
            port,
            shared: shared.clone(),
        };
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let shared = shared.clone();
                std::thread::spawn(move || serve(conn, &shared, requests));
            }
        });
        s
    }
}

// The handshake callback's error type is tungstenite's, not ours to shrink.
#[allow(clippy::result_large_err)]
fn serve(conn: TcpStream, shared: &Shared, requests: bool) {
    let Shared {
        mode,
        connected,
        sent,
        busy,
        large,
    } = shared;
    let mut path = String::new();
    let Ok(mut ws) = tungstenite::accept_hdr(
        conn,
        |req: &tungstenite::handshake::server::Request, resp| {
            path = req.uri().path().to_owned();
            Ok(resp)
        },
    ) else {
        return;
    };
    let stream = path.trim_start_matches("/ws/").to_owned();
    let msgs: Vec<Message> = support::relay_messages(&stream, requests)
        .into_iter()
        .map(Message::text)
        .collect();

    connected.fetch_add(1, Ordering::SeqCst);
    let mut i = 0usize;
    let mut tick_start = Instant::now();
    let mut due = 0.0f64;
    let mut large_sent = large.load(Ordering::SeqCst);
    let tick = tick();
    loop {
        if large.load(Ordering::SeqCst) > large_sent {
            large_sent = large.load(Ordering::SeqCst);
            let pad = "x".repeat(LARGE_FRAME_BYTES);
            if ws
                .send(Message::text(format!("{{\"pad\":\"{pad}\"}}")))
                .is_err()
            {
                connected.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        }
        let counted = Busy::enter(busy);
        let m = mode.load(Ordering::SeqCst);
        let n = match m {
            IDLE => {
                drop(counted);
                std::thread::sleep(Duration::from_millis(20));
                tick_start = Instant::now();
                due = 0.0;
                continue;
            }
            BLAST => 64,
            rate => {
                std::thread::sleep(tick);
                let now = Instant::now();
                due += f64::from(rate) * (now - tick_start).as_secs_f64();
                tick_start = now;
                let n = due.floor();
                due -= n;
                n as usize
            }
        };
        for _ in 0..n {
            if ws.write(msgs[i % msgs.len()].clone()).is_err() {
                connected.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            i += 1;
        }
        if ws.flush().is_err() {
            connected.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        sent.fetch_add(n as u64, Ordering::Relaxed);
        // Answers are read (and dropped) between sends, never waited for.
        if requests && !drain(&mut ws) {
            connected.fetch_sub(1, Ordering::SeqCst);
            return;
        }
    }
}

/// A sender counted in [`Shared::busy`] until dropped (on every way out).
struct Busy<'a>(&'a AtomicUsize);

impl<'a> Busy<'a> {
    fn enter(n: &'a AtomicUsize) -> Busy<'a> {
        n.fetch_add(1, Ordering::SeqCst);
        Busy(n)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Read and drop what the subject sent (its answers) without waiting;
/// false if the connection is gone.
fn drain(ws: &mut tungstenite::WebSocket<TcpStream>) -> bool {
    ws.get_mut().set_nonblocking(true).unwrap();
    let alive = loop {
        match ws.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                break true;
            }
            Err(_) => break false,
        }
    };
    ws.get_mut().set_nonblocking(false).unwrap();
    alive
}

fn status_count(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or(0)
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(key)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Context switches of all live threads: each is a wake-up.
fn switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .map(|t| {
            std::fs::read_to_string(t.path().join("status"))
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    l.starts_with("voluntary_ctxt_switches")
                        || l.starts_with("nonvoluntary_ctxt_switches")
                })
                .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

fn ticks_per_sec() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on every Linux we run on.
    100.0
}

trait Subject {
    fn pids(&self) -> Vec<u32>;
    /// Messages stored so far.
    fn stored(&self) -> u64;
    fn stop(&mut self);
}

struct Edgemeter {
    child: Child,
    dir: PathBuf,
    /// Messages' events counted so far, and the last record id counted:
    /// each call reads only the records committed since.
    counted: std::cell::Cell<(u64, i64)>,
}

impl Subject for Edgemeter {
    fn pids(&self) -> Vec<u32> {
        vec![self.child.id()]
    }
    /// Events of messages only: a window that ends during a phase adds its
    /// points and sketches (122 records for 12 streams), and a large frame
    /// its `relay_malformed` event, which are not messages stored.
    fn stored(&self) -> u64 {
        let (count, last) = self.counted.get();
        let Ok(db) = rusqlite::Connection::open_with_flags(
            self.dir.join("state/outbox.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        ) else {
            return count;
        };
        // A row holds `n` records (schema 3; a build before it has no `n`).
        let query = |records: &str| {
            db.query_row(
                &format!(
                    "SELECT coalesce({records} FILTER (WHERE kind = 3 AND name != 'relay_malformed'), 0),
                            max(id)
                     FROM records WHERE id > ?1"
                ),
                [last],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?)),
            )
        };
        let new = query("sum(n)").or_else(|_| query("count(*)"));
        if let Ok((n, Some(max))) = new {
            self.counted.set((count + n as u64, max));
        }
        self.counted.get().0
    }
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

struct Python {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Subject for Python {
    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
    fn stored(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        std::fs::read(e.path())
                            .map_or(0, |b| b.iter().filter(|c| **c == b'\n').count() as u64)
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    fn stop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One asyncio process for every stream, counting.
struct Asyncio {
    child: Child,
    count: PathBuf,
}

impl Subject for Asyncio {
    fn pids(&self) -> Vec<u32> {
        vec![self.child.id()]
    }
    fn stored(&self) -> u64 {
        std::fs::read_to_string(&self.count)
            .ok()
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(0)
    }
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Figures {
    idle_rss_kib: u64,
    /// Of which heap and other private memory (the rest is mapped files:
    /// the binary, libraries, SQLite's shared WAL index).
    idle_anon_kib: u64,
    threads_idle: u64,
    /// The most seen in the fixed-rate phase.
    threads_streaming: u64,
    idle_cpu_ms: f64,
    idle_wakeups_per_sec: f64,
    rate_us_per_msg: f64,
    /// `rate_us_per_msg` by thread name, for a single-process subject:
    /// where the CPU goes (edgemeter's main thread against its outbox).
    by_thread: Vec<(String, f64)>,
    rate_stored: u64,
    rate_sent: u64,
    peak_rss_kib: u64,
    /// The most anonymous memory seen in the fixed-rate phase (sampled
    /// every 50 ms): the peak's heap part; the rest is mapped files, mostly
    /// the binary's code.
    peak_anon_kib: u64,
    sustained_per_sec: f64,
    /// RSS after one large frame per stream minus before, per stream.
    large_kib_per_stream: f64,
}

/// CPU ticks by thread name (`/proc/PID/task/TID/comm`), for one
/// process; threads of one name are summed. Empty for several processes.
fn thread_ticks(pids: &[u32]) -> std::collections::BTreeMap<String, u64> {
    let mut by_name = std::collections::BTreeMap::new();
    let [pid] = pids else { return by_name };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        *by_name.entry(name.trim().to_owned()).or_default() += support::stat_ticks(&stat);
    }
    by_name
}

fn measure(server: &Server, subject: &mut dyn Subject, idle: Duration, phase: Duration) -> Figures {
    server.wait_connected();
    let pids = subject.pids();
    let sum = |f: &dyn Fn(u32) -> u64| pids.iter().map(|p| f(*p)).sum::<u64>();
    // Settle after start-up, then idle.
    std::thread::sleep(Duration::from_secs(2));
    let (c0, w0) = (sum(&cpu_ticks), sum(&switches));
    std::thread::sleep(idle);
    let (c1, w1) = (sum(&cpu_ticks), sum(&switches));
    let idle_rss_kib = sum(&|p| status_kib(p, "VmRSS:"));
    let idle_anon_kib = sum(&|p| status_kib(p, "RssAnon:"));
    let threads = || sum(&|p| status_count(p, "Threads:"));
    let threads_idle = threads();

    // Large frames before any traffic: later phases leave free heap that
    // would hide what a large frame keeps. Then the peak is reset
    // (clear_refs 5), so the fixed-rate phase's peak is its own.
    server.shared.large.fetch_add(1, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(2));
    let rss_after_large = sum(&|p| status_kib(p, "VmRSS:"));
    for p in &pids {
        std::fs::write(format!("/proc/{p}/clear_refs"), "5").expect("reset VmHWM");
    }

    // Both counters are read while the server is idle, so they agree.
    let (s0, sent0, c0r) = (
        subject.stored(),
        server.shared.sent.load(Ordering::SeqCst),
        sum(&cpu_ticks),
    );
    let threads0 = thread_ticks(&pids);
    server
        .shared
        .mode
        .store(rate_per_stream(), Ordering::SeqCst);
    // EDGEMETER_BENCH_PERF=FILE: profile the first subject's fixed-rate phase.
    static PROFILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let perf = std::env::var("EDGEMETER_BENCH_PERF")
        .ok()
        .filter(|_| pids.len() == 1 && !PROFILED.swap(true, Ordering::SeqCst))
        .map(|out| {
            // EDGEMETER_BENCH_PERF_HZ=N: sample N times a second with no
            // call stacks instead (flat, but enough samples of a thread that
            // is busy a few per cent of the time).
            let flat = std::env::var("EDGEMETER_BENCH_PERF_HZ").ok();
            let sampling = match &flat {
                Some(hz) => vec!["-F", hz.as_str()],
                None => vec!["-F", "999", "--call-graph", "dwarf,16384"],
            };
            Command::new("perf")
                .arg("record")
                .args(sampling)
                .args([
                    "-o", &out,
                    // Every CPU: `-p` misses threads started later (the
                    // outbox's worker); read it with `perf report --pid`.
                    "-a", "--", "sleep",
                ])
                .arg(phase.as_secs().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("perf")
        });
    // EDGEMETER_BENCH_STRACE=FILE: count the first subject's system calls
    // in that phase (each later one would overwrite the file).
    static TRACED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let strace = std::env::var("EDGEMETER_BENCH_STRACE")
        .ok()
        .filter(|_| pids.len() == 1 && !TRACED.swap(true, Ordering::SeqCst))
        .map(|out| {
            Command::new("timeout")
                .args([
                    &phase.as_secs().to_string(),
                    "strace",
                    "-c",
                    "-f",
                    "-o",
                    &out,
                    "-p",
                    &pids[0].to_string(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("strace")
        });
    // The most threads seen while streaming, sampled every 50 ms.
    let (mut threads_streaming, mut peak_anon_kib) = (0, 0);
    let end = Instant::now() + phase;
    while Instant::now() < end {
        threads_streaming = threads_streaming.max(threads());
        peak_anon_kib = peak_anon_kib.max(sum(&|p| status_kib(p, "RssAnon:")));
        std::thread::sleep(Duration::from_millis(50));
    }
    server.shared.mode.store(IDLE, Ordering::SeqCst);
    if let Some(mut p) = strace {
        let _ = p.wait();
    }
    if let Some(mut p) = perf {
        let _ = p.wait();
    }
    // Every sender notices within one tick, unless it is blocked writing
    // to a subject that reads slowly: wait until none is between reading
    // the mode and counting what it sent (at most 10 s).
    let quiet = Instant::now();
    while server.shared.busy.load(Ordering::SeqCst) > 0 && quiet.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = server.shared.sent.load(Ordering::SeqCst) - sent0;
    // Let the subject finish what was sent.
    let settle = Instant::now();
    while subject.stored() - s0 < sent && settle.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let c1r = sum(&cpu_ticks);
    let threads1 = thread_ticks(&pids);
    let stored = subject.stored() - s0;
    let per_msg = |ticks: u64| ticks as f64 / ticks_per_sec() * 1e6 / sent.max(1) as f64;
    // A thread that ended in the phase took its ticks with it; one that
    // started counts from zero.
    let by_thread = threads1
        .iter()
        .map(|(name, t1)| {
            let t0 = threads0.get(name).copied().unwrap_or(0);
            (name.clone(), per_msg(t1.saturating_sub(t0)))
        })
        .filter(|(_, us)| *us > 0.0)
        .collect();
    let peak_rss_kib = sum(&|p| status_kib(p, "VmHWM:"));

    server.shared.mode.store(BLAST, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(500));
    let (b0, t0) = (subject.stored(), Instant::now());
    std::thread::sleep(phase);
    let (b1, t1) = (subject.stored(), Instant::now());
    server.shared.mode.store(IDLE, Ordering::SeqCst);
    Figures {
        large_kib_per_stream: (rss_after_large as f64 - idle_rss_kib as f64) / STREAMS as f64,
        idle_rss_kib,
        idle_anon_kib,
        threads_idle,
        threads_streaming,
        idle_cpu_ms: (c1 - c0) as f64 * 1000.0 / ticks_per_sec(),
        idle_wakeups_per_sec: (w1 - w0) as f64 / idle.as_secs_f64(),
        // Per message received: with `events = false` nothing is stored.
        rate_us_per_msg: per_msg(c1r - c0r),
        by_thread,
        rate_stored: stored,
        rate_sent: sent,
        peak_rss_kib,
        peak_anon_kib,
        sustained_per_sec: (b1 - b0) as f64 / (t1 - t0).as_secs_f64(),
    }
}

/// The binary to run, under EDGEMETER_BENCH_WRAP if set: the Pi builds
/// run under qemu-user, e.g. `EDGEMETER_BENCH_WRAP=qemu-arm-static
/// EDGEMETER_BENCH_BIN=target/armv7-unknown-linux-gnueabihf/release/edgemeter`
/// (with `QEMU_LD_PREFIX=/usr/arm-linux-gnueabihf` when the armhf loader
/// is not installed). Its CPU is then the emulator's.
fn edgemeter_command(bin: &Path) -> Command {
    match std::env::var_os("EDGEMETER_BENCH_WRAP") {
        Some(wrap) => {
            let mut c = Command::new(wrap);
            c.arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

/// Measure the release binary with one relay source on a fresh server;
/// with `requests`, 1 % of the messages are dashboard requests it answers.
fn run_edgemeter(
    bin: &Path,
    streams: &[String],
    requests: bool,
    idle: Duration,
    phase: Duration,
) -> Figures {
    let server = Server::start(requests);
    let dir = bench_dir(if requests {
        "relay-edgemeter-requests"
    } else {
        "relay-edgemeter"
    });
    let list: Vec<String> = streams.iter().map(|s| format!("\"{s}\"")).collect();
    let answering = if requests {
        format!(
            "answer_requests = true\ncomparison_dir = \"{}\"\n",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/relay/answers/comparison_graphs")
                .display()
        )
    } else {
        String::new()
    };
    std::fs::write(
        dir.join("edgemeter.toml"),
        format!(
            "[agent]\nid = \"bench\"\nstate_dir = \"state\"\nflush_interval_secs = 0.1\nbuffer_max_bytes = 4294967296\nlog_level = \"warn\"\n\n\
             [[source]]\ntype = \"relay\"\nname = \"lab\"\nsession_host = \"http://127.0.0.1:{}\"\nstreams = [{}]\nfiles_dir = \"analytics\"\n{answering}{}\n",
            server.port,
            list.join(", "),
            // For experiments: more source keys, e.g. `events = false`.
            std::env::var("EDGEMETER_BENCH_SOURCE_KEYS").unwrap_or_default()
        ),
    )
    .unwrap();
    let child = edgemeter_command(bin)
        .args(["run", "-c"])
        .arg(dir.join("edgemeter.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start edgemeter");
    let mut em = Edgemeter {
        child,
        dir: dir.clone(),
        counted: Default::default(),
    };
    let f = measure(&server, &mut em, idle, phase);
    if requests {
        // Show that the requests were answered (and how many the bounds
        // refused at the sustained rate).
        let out = edgemeter_command(bin)
            .args(["status", "-c"])
            .arg(dir.join("edgemeter.toml"))
            .output()
            .expect("edgemeter status");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("dashboard requests:"))
            .expect("status shows the dashboard requests");
        println!("  +1% reqs: {line}");
    }
    em.stop();
    std::fs::remove_dir_all(&dir).ok();
    f
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--floor") {
        floor(&args[at + 1..]);
        return;
    }
    let streams: Vec<String> = (30..30 + STREAMS).map(|n| format!("spin{n}")).collect();
    if let Some(at) = args.iter().position(|a| a == "--soak") {
        let minutes = args
            .get(at + 1)
            .and_then(|m| m.parse().ok())
            .expect("--soak MINUTES");
        soak(&release_bin(), &streams, minutes);
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let (idle, phase) = if quick {
        (Duration::from_secs(3), Duration::from_secs(4))
    } else {
        (Duration::from_secs(10), Duration::from_secs(10))
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/test-tools/venv/bin/python");
    let has_client = Command::new(&python)
        .args(["-c", "import websocket, websockets"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_client {
        eprintln!(
            "relay bench: the baseline needs Python with websocket-client in target/test-tools/venv; \
             run scripts/test once, or: python3 -m venv target/test-tools/venv && \
             target/test-tools/venv/bin/pip install websocket-client==1.8.0 websockets==13.1"
        );
        std::process::exit(1);
    }
    let bin = release_bin();
    println!(
        "relay: {STREAMS} streams on loopback, {} users each, messages of {} bytes; idle {:?}, phases {:?}",
        USERS_PER_STREAM,
        support::relay_messages("spin30", false)[0].len(),
        idle,
        phase
    );

    // EDGEMETER_BENCH_REQUESTS=1: the first subject is the one with 1 %
    // requests (so a quick run, perf and strace measure answering).
    let requests_first = std::env::var("EDGEMETER_BENCH_REQUESTS").is_ok_and(|v| v == "1");
    // Edgemeter and the floor in alternating rounds: one run of each reads
    // 10 to 20 % apart from the next on this shared machine, more than
    // most changes move them.
    let rounds = rounds(quick);
    let (mut es, mut fs) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        es.push(run_edgemeter(&bin, &streams, requests_first, idle, phase));
        fs.push(run_floor(&streams, idle, phase));
    }
    // The requests case only in the full run: it adds a subject's minute.
    let r = (!quick && !requests_first).then(|| run_edgemeter(&bin, &streams, true, idle, phase));
    let cpus = |all: &[Figures]| -> Vec<String> {
        all.iter()
            .map(|f| format!("{:.1}", f.rate_us_per_msg))
            .collect()
    };
    let (e_cpus, f_cpus) = (cpus(&es), cpus(&fs));
    let worst = Worst::of(&es);
    let median_round = |all| support::median_by(all, |f: &Figures| f.rate_us_per_msg);
    let (e, f) = (median_round(es), median_round(fs));

    let server = Server::start(false);
    let dir = bench_dir("relay-python");
    let children = streams
        .iter()
        .map(|s| {
            Command::new(&python)
                .arg(root.join("benches/relay_client.py"))
                .arg(format!("ws://127.0.0.1:{}/ws/{s}", server.port))
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start python")
        })
        .collect();
    let mut py = Python {
        children,
        dir: dir.clone(),
    };
    let p = measure(&server, &mut py, idle, phase);
    py.stop();
    std::fs::remove_dir_all(&dir).ok();

    let server = Server::start(false);
    let dir = bench_dir("relay-asyncio");
    let child = Command::new(&python)
        .arg(root.join("benches/relay_asyncio.py"))
        .arg(format!("ws://127.0.0.1:{}", server.port))
        .arg(&dir)
        .args(&streams)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start python");
    let mut aio = Asyncio {
        child,
        count: dir.join("count"),
    };
    let a = measure(&server, &mut aio, idle, phase);
    aio.stop();
    std::fs::remove_dir_all(&dir).ok();

    let mib = |k: u64| k as f64 / 1024.0;
    let row = |name: &str, f: &Figures| {
        println!(
            "  {name:<10} idle: RSS {:6.1} MiB ({:.1} anon), {} threads, CPU {:5.0} ms, {:6.1} wake-ups/s | {} msg/s: {:5.1} µs CPU/msg ({} of {} stored), peak RSS {:6.1} MiB ({:.1} anon), {} threads | sustained: {:7.0} msg/s stored | after a large frame per stream: {:+6.0} KiB RSS per stream",
            mib(f.idle_rss_kib),
            mib(f.idle_anon_kib),
            f.threads_idle,
            f.idle_cpu_ms,
            f.idle_wakeups_per_sec,
            rate_per_stream() as usize * STREAMS,
            f.rate_us_per_msg,
            f.rate_stored,
            f.rate_sent,
            mib(f.peak_rss_kib),
            mib(f.peak_anon_kib),
            f.threads_streaming,
            f.sustained_per_sec,
            f.large_kib_per_stream
        )
    };
    if rounds > 1 {
        println!(
            "  {rounds} alternating rounds, CPU per message, µs: edgemeter [{}], floor [{}]; each row below is its median round, the targets' memory, threads and rate the worst round's",
            e_cpus.join(" "),
            f_cpus.join(" ")
        );
    }
    row("edgemeter", &e);
    let split: Vec<String> = e
        .by_thread
        .iter()
        .map(|(name, us)| format!("{name} {us:.1}"))
        .collect();
    println!(
        "  edgemeter's CPU per message by thread, µs: {}",
        split.join(", ")
    );
    if let Some(r) = &r {
        row("+1% reqs", r);
    }
    if std::env::var("EDGEMETER_BENCH_FLOOR").is_ok_and(|v| v == "read") {
        println!(
            "  (EDGEMETER_BENCH_FLOOR=read: the floor reads each message and parses and keeps none of it)"
        );
    }
    row("floor", &f);
    row("python x12", &p);
    row("asyncio", &a);
    if let Some(r) = &r {
        println!(
            "  1% of messages all_feedback requests (answer_requests = true, five frames each), against none: CPU per message {:.2}x, sustained rate {:.2}x, peak RSS {:+.1} MiB",
            r.rate_us_per_msg / e.rate_us_per_msg,
            r.sustained_per_sec / e.sustained_per_sec,
            mib(r.peak_rss_kib) - mib(e.peak_rss_kib)
        );
    }
    println!(
        "  against the floor (edgemeter / floor): CPU per message {:.1}x, peak RSS {:.1}x, idle RSS {:.1}x; sustained rate (floor / edgemeter) {:.1}x",
        e.rate_us_per_msg / f.rate_us_per_msg,
        e.peak_rss_kib as f64 / f.peak_rss_kib as f64,
        e.idle_rss_kib as f64 / f.idle_rss_kib as f64,
        f.sustained_per_sec / e.sustained_per_sec
    );
    println!(
        "  ratios (python / edgemeter): CPU per message {:.1}x, peak RSS {:.1}x, idle RSS {:.1}x; sustained rate (edgemeter / python) {:.1}x",
        p.rate_us_per_msg / e.rate_us_per_msg,
        p.peak_rss_kib as f64 / e.peak_rss_kib as f64,
        p.idle_rss_kib as f64 / e.idle_rss_kib as f64,
        e.sustained_per_sec / p.sustained_per_sec
    );
    println!(
        "  ratios (asyncio, storing nothing / edgemeter): CPU per message {:.1}x, peak RSS {:.1}x, idle RSS {:.1}x; sustained rate (edgemeter stored / asyncio counted) {:.1}x",
        a.rate_us_per_msg / e.rate_us_per_msg,
        a.peak_rss_kib as f64 / e.peak_rss_kib as f64,
        a.idle_rss_kib as f64 / e.idle_rss_kib as f64,
        e.sustained_per_sec / a.sustained_per_sec
    );
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "  targets: sustained >= 50,000 msg/s {}; <= 2.5 µs CPU/msg with events stored {}; peak RSS <= 16 MiB {}; idle RSS <= 8 MiB {}; threads <= 3 streaming {}, <= 2 idle {}; RSS back within 1 MiB per stream after large frames {}",
        verdict(worst.sustained_per_sec >= 50_000.0),
        verdict(e.rate_us_per_msg <= 2.5),
        verdict(mib(worst.peak_rss_kib) <= 16.0),
        verdict(mib(worst.idle_rss_kib) <= 8.0),
        verdict(worst.threads_streaming <= 3),
        verdict(worst.threads_idle <= 2),
        verdict(worst.large_kib_per_stream <= 1024.0),
    );
    std::io::stdout().flush().ok();
    // EDGEMETER_BENCH_SOURCE_KEYS='events = false' measures the relay
    // without storing events: then nothing is.
    let events_off = std::env::var("EDGEMETER_BENCH_SOURCE_KEYS")
        .is_ok_and(|k| k.replace(' ', "").contains("events=false"));
    if !events_off {
        assert!(
            worst.all_stored,
            "edgemeter must store every message sent at the fixed rate"
        );
    }
}

/// `--soak MINUTES`: edgemeter alone at the fixed rate for MINUTES, with
/// the default buffer (`buffer_max_bytes`, 256 MiB) and no sink, so that
/// once the buffer is full (after a minute or two at 20,000 messages a
/// second) the oldest records are dropped as new ones are committed: a
/// sink down for a long time, the agent's heaviest steady state. The same
/// 200 users a stream throughout, so the analytics hold what they will
/// hold. Its RSS is sampled every 5 s and read as the upstream's soak reads
/// it: growth after the first minute on the least-squares line (target
/// <= 1 %), its slope, over the second half alone, and through each half
/// minute's lowest sample; and the same line through its private memory
/// and its mapped files' pages.
fn soak(bin: &Path, streams: &[String], minutes: u64) {
    let server = Server::start(false);
    let dir = bench_dir("relay-soak");
    let list: Vec<String> = streams.iter().map(|s| format!("\"{s}\"")).collect();
    let config = dir.join("edgemeter.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nid = \"soak\"\nstate_dir = \"state\"\nlog_level = \"warn\"\n\n\
             [[source]]\ntype = \"relay\"\nname = \"lab\"\nsession_host = \"http://127.0.0.1:{}\"\nstreams = [{}]\nfiles_dir = \"analytics\"\n",
            server.port,
            list.join(", "),
        ),
    )
    .expect("soak config");
    let mut child = edgemeter_command(bin)
        .args(["run", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start edgemeter");
    let pid = child.id();
    server.wait_connected();
    std::thread::sleep(Duration::from_secs(2));
    let rate = rate_per_stream();
    println!(
        "relay soak: edgemeter, {STREAMS} streams at {} messages/s in all for {minutes} minutes, \
         the default buffer and no sink (full after a minute or two, then the oldest dropped)",
        rate as usize * STREAMS
    );
    let idle_kib = status_kib(pid, "VmRSS:");
    server.shared.mode.store(rate, Ordering::SeqCst);
    let started = Instant::now();
    // (minute, RSS, private, mapped files), every 5 s.
    let mut samples: Vec<(f64, u64, u64, u64)> = Vec::new();
    let end = Duration::from_secs(minutes * 60);
    while started.elapsed() < end {
        std::thread::sleep(Duration::from_secs(5).min(end.saturating_sub(started.elapsed())));
        if let Ok(Some(exit)) = child.try_wait() {
            panic!("edgemeter exited during the soak: {exit}");
        }
        samples.push((
            started.elapsed().as_secs_f64() / 60.0,
            status_kib(pid, "VmRSS:"),
            status_kib(pid, "RssAnon:"),
            status_kib(pid, "RssFile:"),
        ));
    }
    server.shared.mode.store(IDLE, Ordering::SeqCst);
    let sent = server.shared.sent.load(Ordering::SeqCst);
    let status = edgemeter_command(bin)
        .args(["status", "-c"])
        .arg(&config)
        .output()
        .expect("edgemeter status");
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).ok();
    // EDGEMETER_BENCH_SAMPLES=FILE: every sample, to plot the curve.
    if let Ok(out) = std::env::var("EDGEMETER_BENCH_SAMPLES") {
        let text: String = samples
            .iter()
            .map(|(m, rss, anon, file)| format!("relay soak\t{m:.3}\t{rss}\t{anon}\t{file}\n"))
            .collect();
        std::fs::write(&out, text).expect("EDGEMETER_BENCH_SAMPLES");
    }
    assert!(minutes >= 2, "--soak needs 2 minutes or more");
    let part = |k: usize| -> Drift {
        let points: Vec<(f64, u64)> = samples.iter().map(|s| (s.0, [s.1, s.2, s.3][k])).collect();
        Drift::of(&points, minutes as f64)
    };
    let (rss, anon, file) = (part(0), part(1), part(2));
    let (growth, floor_growth) = (rss.growth(), rss.floor_growth());
    println!(
        "  {:.1} M messages sent; {} samples; idle before {idle_kib} KiB",
        sent as f64 / 1e6,
        samples.len()
    );
    println!(
        "  RSS: {growth:+.2} % after the first minute (fitted line {:.0} → {:.0} KiB), slope {:+.1} KiB a minute \
         ({:+.1} over the second half); band {}..{} KiB; the floor (each half minute's lowest) {floor_growth:+.2} %",
        rss.from, rss.to, rss.slope, rss.late_slope, rss.band.0, rss.band.1
    );
    println!(
        "  of it: private (heap, stacks) {:.0} → {:.0} KiB ({:+.0}), mapped files {:.0} → {:.0} KiB ({:+.0})",
        anon.from,
        anon.to,
        anon.to - anon.from,
        file.from,
        file.to,
        file.to - file.from
    );
    let text = String::from_utf8_lossy(&status.stdout);
    for line in text
        .lines()
        .filter(|l| l.contains("buffered") || l.contains("dropped"))
    {
        println!("  status: {}", line.trim());
    }
    println!(
        "  target: <= 1 % growth after the first minute: {}",
        if growth <= 1.0 { "met" } else { "NOT met" }
    );
}

/// How many alternating rounds of edgemeter and the floor: 3 in a full
/// run, 1 with `--quick`; EDGEMETER_BENCH_ROUNDS sets another.
fn rounds(quick: bool) -> usize {
    std::env::var("EDGEMETER_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(if quick { 1 } else { 3 })
}

/// The worst of edgemeter's rounds for each target but CPU: a round's
/// memory, threads and rate move little from run to run, so one bad round
/// is a finding, not noise.
struct Worst {
    sustained_per_sec: f64,
    peak_rss_kib: u64,
    idle_rss_kib: u64,
    threads_streaming: u64,
    threads_idle: u64,
    large_kib_per_stream: f64,
    all_stored: bool,
}

impl Worst {
    fn of(rounds: &[Figures]) -> Worst {
        let most = |f: fn(&Figures) -> u64| rounds.iter().map(f).max().unwrap_or(0);
        Worst {
            sustained_per_sec: rounds
                .iter()
                .map(|f| f.sustained_per_sec)
                .fold(f64::INFINITY, f64::min),
            peak_rss_kib: most(|f| f.peak_rss_kib),
            idle_rss_kib: most(|f| f.idle_rss_kib),
            threads_streaming: most(|f| f.threads_streaming),
            threads_idle: most(|f| f.threads_idle),
            large_kib_per_stream: rounds
                .iter()
                .map(|f| f.large_kib_per_stream)
                .fold(f64::NEG_INFINITY, f64::max),
            all_stored: rounds.iter().all(|f| f.rate_stored == f.rate_sent),
        }
    }
}

// ------------------------------------------------------------------ floor

/// The floor: what receiving and storing these messages costs at the least
/// on this machine, in this run. One process, one thread, the same crates
/// (smol, async-tungstenite, serde_json, rusqlite): each frame read, its
/// envelope's `user` and `type` parsed, the messages appended to SQLite
/// [`FLOOR_ROWS_PER_INSERT`] to a prepared insert, committed every 100 ms in
/// WAL mode with `synchronous = NORMAL`; reads in 4 KiB chunks, resting a
/// drained stream until the next 20 ms tick, as edgemeter does (through
/// its own `rest::Resting`). No analytics, no sketches, no status, no sinks: the work
/// edgemeter adds is its ratio to this.
struct Floor {
    child: Child,
    db: PathBuf,
}

impl Subject for Floor {
    fn pids(&self) -> Vec<u32> {
        vec![self.child.id()]
    }
    fn stored(&self) -> u64 {
        rusqlite::Connection::open_with_flags(&self.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|db| {
                db.query_row("SELECT COALESCE(MAX(rowid), 0) FROM m", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .unwrap_or(0) as u64
    }
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_floor(streams: &[String], idle: Duration, phase: Duration) -> Figures {
    let server = Server::start(false);
    let dir = bench_dir("relay-floor");
    let db = dir.join("floor.db");
    let child = Command::new(std::env::current_exe().expect("this bench"))
        .arg("--floor")
        .arg(server.port.to_string())
        .arg(&db)
        .args(streams)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the floor");
    let mut floor = Floor { child, db };
    let f = measure(&server, &mut floor, idle, phase);
    floor.stop();
    std::fs::remove_dir_all(&dir).ok();
    f
}

/// Rows to one INSERT in the floor: the outbox's own number
/// (`outbox::append`), so that the floor is not slower than the code it
/// bounds (one row per statement cost 1.65x the CPU per row in
/// `benches/outbox.rs`).
const FLOOR_ROWS_PER_INSERT: usize = 32;

/// The floor process: `--floor PORT DB STREAM…`.
fn floor(args: &[String]) {
    use smol::stream::StreamExt;
    use std::cell::RefCell;
    use std::rc::Rc;
    let (port, db, streams) = (&args[0], &args[1], &args[2..]);
    let db = rusqlite::Connection::open(db).expect("floor db");
    db.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE TABLE m (ts INTEGER, user TEXT, type TEXT, payload BLOB);",
    )
    .expect("floor schema");
    let pending: Rc<RefCell<Vec<support::FloorRow>>> = Rc::default();
    // EDGEMETER_BENCH_FLOOR=read: the websocket layer's own share, each
    // message read and counted by an empty row, neither parsed nor kept.
    let read_only = std::env::var("EDGEMETER_BENCH_FLOOR").is_ok_and(|v| v == "read");
    let ex = smol::LocalExecutor::new();
    for s in streams {
        let url = format!("ws://127.0.0.1:{port}/ws/{s}");
        let pending = pending.clone();
        ex.spawn(async move {
            let tcp = smol::Async::<TcpStream>::connect(([127, 0, 0, 1], port.parse().unwrap()))
                .await
                .expect("connect");
            // Read in 4 KiB chunks, as edgemeter does: tungstenite's default
            // 128 KiB chunk is zero-filled before each read (memset was 8.6 %
            // of this process's CPU in `perf` with it).
            let config = async_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .read_buffer_size(4096);
            // Read as edgemeter reads: a drained stream rests until the
            // next shared tick (`rest`), so one wake-up reads many
            // messages. Without it this floor woke for every few messages
            // and cost 10 to 20 % more than it had to (2 alternating runs
            // of 2 rounds: 3.0 to 3.6 µs against 2.5 to 3.1 with it).
            use edgemeter::sources::relay::rest;
            let tcp = rest::Resting::new(tcp, rest::READ_REST);
            let (mut ws, _) = async_tungstenite::client_async_with_config(url, tcp, Some(config))
                .await
                .expect("handshake");
            let mut n = 0u32;
            while let Some(Ok(m)) = ws.next().await {
                // A socket that always has data never makes `next` wait:
                // let the other streams and the commits run.
                n += 1;
                if n.is_multiple_of(64) {
                    smol::future::yield_now().await;
                }
                let async_tungstenite::tungstenite::Message::Text(t) = m else {
                    continue;
                };
                if read_only {
                    // The row of a message not parsed: its arrival alone.
                    let row = (support::now_ms(), String::new(), String::new(), Vec::new());
                    pending.borrow_mut().push(row);
                } else if let Some(row) = support::floor_row(&t, support::now_ms()) {
                    pending.borrow_mut().push(row);
                }
            }
        })
        .detach();
    }
    // Built once: `FLOOR_ROWS_PER_INSERT` rows to a statement, as the
    // outbox inserts, and the remainder one at a time.
    let insert = |rows: usize| {
        let values = vec!["(?, ?, ?, ?)"; rows].join(", ");
        format!("INSERT INTO m (ts, user, type, payload) VALUES {values}")
    };
    let (full, one) = (insert(FLOOR_ROWS_PER_INSERT), insert(1));
    smol::block_on(ex.run(async {
        loop {
            smol::Timer::after(Duration::from_millis(100)).await;
            let rows = std::mem::take(&mut *pending.borrow_mut());
            if rows.is_empty() {
                continue;
            }
            let tx = db.unchecked_transaction().expect("begin");
            let full_chunks = rows.chunks_exact(FLOOR_ROWS_PER_INSERT);
            let rest = full_chunks.remainder().chunks(1);
            for chunk in full_chunks.chain(rest) {
                let sql = if chunk.len() == 1 { &one } else { &full };
                let mut st = tx.prepare_cached(sql).expect("prepare");
                for (k, (ts, user, kind, payload)) in chunk.iter().enumerate() {
                    let at = |column: usize| k * 4 + column;
                    st.raw_bind_parameter(at(1), ts).expect("bind");
                    st.raw_bind_parameter(at(2), user).expect("bind");
                    st.raw_bind_parameter(at(3), kind).expect("bind");
                    st.raw_bind_parameter(at(4), payload).expect("bind");
                }
                st.raw_execute().expect("insert");
            }
            tx.commit().expect("commit");
        }
    }));
}
