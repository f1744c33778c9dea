//! Outbox append throughput and size, with baselines from the same run.
//!
//! Run: `cargo bench --bench outbox` (add `-- --quick` for a short run).
//!
//! 1. `outbox.append`: the real outbox code (compiled in from `src/`), fed in
//!    groups the way the agent's writer does with `flush_interval_secs =
//!    0.1`: a group holds what arrives in 100 ms, so at the target rate of
//!    100,000 records/s a group is 10,000 records and each commit must take
//!    well under 100 ms. As in the agent, a commit writes the WAL without
//!    waiting for the disk (`synchronous = NORMAL`; the writer's once-a-second
//!    WAL fsync is not part of `append`).
//! 2. Baselines on the same disk, same run:
//!    - `sqlite floor`: plain INSERTs of the same columns into a bare table in
//!      one transaction per group, 32 rows to a statement as the outbox
//!      inserts them, no outbox bookkeeping: the best the outbox could do;
//!    - `one row per INSERT`: the same with a statement per row, the way the
//!      outbox inserted before (the gain of multi-row statements);
//!    - `commit per record`: one transaction per record, each waiting for the
//!      disk (`synchronous = FULL`), the way a script that "writes each
//!      message" does.
//! 3. End to end: the real `edgemeter run` binary with a synthetic source at
//!    its maximum rate and `flush_interval_secs = 0.1` for a few seconds;
//!    records committed per second, from the outbox afterwards.
//! 4. On-disk bytes per record: the database file after a checkpoint, divided
//!    by the records in it.

#[path = "support/mod.rs"]
mod support;

use edgemeter::{outbox, record};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use record::{Dims, KindSet, Record};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        // Under target/ so the benchmark measures the project's own disk,
        // not a tmpfs.
        let d = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/bench-tmp")
            .join(format!("{tag}-{}", std::process::id()));
        std::fs::remove_dir_all(&d).ok();
        std::fs::create_dir_all(&d).expect("create bench dir");
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// A realistic small record: an active-users style point with two dims.
fn records(n: usize, start: usize) -> Vec<Record> {
    (start..start + n)
        .map(|i| {
            Record::point(
                "active_users",
                Dims::new([
                    ("gateway", format!("gw-{:02}", i % 16)),
                    ("window", "30m".to_owned()),
                ]),
                1_700_000_000_000 + i as i64,
                (i % 5000) as f64,
                "Count",
            )
        })
        .collect()
}

/// Relay events in a read (see [`relay_events`]).
const RELAY_RUN: usize = 11;

/// Relay messages as the relay source hands them over at 20,000 a second
/// from 12 streams: runs of [`RELAY_RUN`] events of one stream (a read's worth: the
/// relay bench's 80,219 messages came in 7,123 reads that returned data,
/// by `EDGEMETER_BENCH_STRACE`), the streams in turn, each a 186-byte
/// logging envelope.
fn relay_events(n: usize, start: usize) -> Vec<Record> {
    let dims: Vec<Dims> = (0..12)
        .map(|s| {
            Dims::new([
                ("source", "lab".to_owned()),
                ("stream", format!("spin{}", 30 + s)),
            ])
        })
        .collect();
    (start..start + n)
        .map(|i| {
            let stream = (i / RELAY_RUN) % 12;
            let payload = format!(
                r#"{{"user":"u{:05}","t":{},"exp":"spinner","hardware":"spin{}","course":"engdes1","type":"analytics","payload":{{"log":"start","data":{{"set":1}}}}}}"#,
                i % 200,
                1_700_000_000 + i,
                30 + stream
            );
            Record {
                kind: record::Kind::Event,
                ts_ms: 1_700_000_000_000 + (i / RELAY_RUN) as i64,
                name: "analytics".into(),
                dims: dims[stream].clone(),
                value: 0.0,
                unit: "None".into(),
                payload: format!("{payload:<186}").into_bytes(),
            }
        })
        .collect()
}

struct Measured {
    records: usize,
    secs: f64,
    worst_commit_ms: f64,
    /// CPU of the thread that appended, per record (NaN: not measured).
    cpu_us: f64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.records as f64 / self.secs
    }
}

/// What a group of `n` records from the `start`th is made of.
type Make = fn(usize, usize) -> Vec<Record>;

fn bench_outbox(groups: usize, group: usize, make: Make) -> (Measured, f64) {
    let dir = TempDir::new("outbox");
    let (mut o, _) = outbox::Outbox::open(&dir.0, 1 << 40).expect("open");
    o.register_sinks(&[("s".into(), KindSet::ALL)])
        .expect("register");
    let data: Vec<Vec<Record>> = (0..groups).map(|g| make(group, g * group)).collect();
    let mut worst: f64 = 0.0;
    let (t, cpu) = (Instant::now(), support::thread_cpu());
    for g in &data {
        let c = Instant::now();
        o.append(g).expect("append");
        worst = worst.max(c.elapsed().as_secs_f64() * 1000.0);
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu_us = (support::thread_cpu() - cpu).as_secs_f64() * 1e6 / (groups * group) as f64;
    drop(o);
    // Bytes per record: checkpoint the WAL into the main file first.
    let db = rusqlite::Connection::open(dir.0.join("outbox.db")).expect("reopen");
    db.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .expect("checkpoint");
    drop(db);
    let bytes = std::fs::metadata(dir.0.join("outbox.db"))
        .expect("stat")
        .len() as f64;
    (
        Measured {
            records: groups * group,
            secs,
            worst_commit_ms: worst,
            cpu_us,
        },
        bytes / (groups * group) as f64,
    )
}

/// A bare table with the records' columns; `synchronous` as given.
fn floor_connection(dir: &Path, synchronous: &str) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(dir.join("floor.db")).expect("open");
    c.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous};
         CREATE TABLE t (id INTEGER PRIMARY KEY, kind INTEGER, ts INTEGER, name TEXT, dims TEXT,
                         value REAL, unit TEXT, payload BLOB);"
    ))
    .expect("schema");
    c
}

/// `INSERT INTO t (…) VALUES (?, …), …` for `rows` rows.
fn insert_sql(rows: usize) -> String {
    let values = vec!["(?, ?, ?, ?, ?, ?, ?)"; rows].join(", ");
    format!("INSERT INTO t (kind, ts, name, dims, value, unit, payload) VALUES {values}")
}

/// Plain INSERTs of `rows`, all in one statement (`sql`, for their number).
fn insert(c: &rusqlite::Connection, sql: &str, rows: &[Record]) {
    let mut st = c.prepare_cached(sql).expect("prepare");
    for (k, r) in rows.iter().enumerate() {
        let at = |column: usize| k * 7 + column;
        st.raw_bind_parameter(at(1), r.kind as i64).expect("bind");
        st.raw_bind_parameter(at(2), r.ts_ms).expect("bind");
        st.raw_bind_parameter(at(3), &r.name).expect("bind");
        st.raw_bind_parameter(at(4), r.dims.encoded())
            .expect("bind");
        st.raw_bind_parameter(at(5), r.value).expect("bind");
        st.raw_bind_parameter(at(6), &r.unit).expect("bind");
        st.raw_bind_parameter(at(7), &r.payload).expect("bind");
    }
    st.raw_execute().expect("insert");
}

/// Groups in one transaction each, `per_statement` rows to an INSERT, with
/// the outbox's own `synchronous = NORMAL`.
fn bench_floor(groups: usize, group: usize, per_statement: usize, make: Make) -> Measured {
    let dir = TempDir::new("floor");
    let mut c = floor_connection(&dir.0, "NORMAL");
    let data: Vec<Vec<Record>> = (0..groups).map(|g| make(group, g * group)).collect();
    // Built once, as the outbox does: not part of what is measured.
    let (full, tail) = (insert_sql(per_statement), insert_sql(group % per_statement));
    let mut worst: f64 = 0.0;
    let (t, cpu) = (Instant::now(), support::thread_cpu());
    for g in &data {
        let s = Instant::now();
        let tx = c.transaction().expect("begin");
        for rows in g.chunks(per_statement) {
            let sql = if rows.len() == per_statement {
                &full
            } else {
                &tail
            };
            insert(&tx, sql, rows);
        }
        tx.commit().expect("commit");
        worst = worst.max(s.elapsed().as_secs_f64() * 1000.0);
    }
    Measured {
        records: groups * group,
        secs: t.elapsed().as_secs_f64(),
        worst_commit_ms: worst,
        cpu_us: (support::thread_cpu() - cpu).as_secs_f64() * 1e6 / (groups * group) as f64,
    }
}

fn bench_commit_per_record(n: usize) -> Measured {
    let dir = TempDir::new("per-record");
    // A script's database: every commit waits for the disk.
    let c = floor_connection(&dir.0, "FULL");
    let data = records(n, 0);
    let sql = insert_sql(1);
    let mut worst: f64 = 0.0;
    let t = Instant::now();
    for r in &data {
        let s = Instant::now();
        insert(&c, &sql, std::slice::from_ref(r)); // autocommit: one transaction, one fsync, per record
        worst = worst.max(s.elapsed().as_secs_f64() * 1000.0);
    }
    Measured {
        records: n,
        secs: t.elapsed().as_secs_f64(),
        worst_commit_ms: worst,
        cpu_us: f64::NAN,
    }
}

/// The real binary, synthetic source flat out, for `secs` seconds.
fn bench_end_to_end(secs: u64) -> Option<Measured> {
    // Not what `cargo bench` leaves at target/release/edgemeter (its own
    // build, with the bench profile): the release binary.
    let bin = support::release_bin();
    let dir = TempDir::new("e2e");
    let cfg = dir.0.join("edgemeter.toml");
    std::fs::write(
        &cfg,
        "[agent]\nid = \"bench\"\nstate_dir = \"state\"\nflush_interval_secs = 0.1\nlog_level = \"warn\"\n\
         buffer_max_bytes = 1099511627776\n\
         [[source]]\ntype = \"synthetic\"\nrate_per_sec = 1000000\nseries = 16\n",
    )
    .expect("write config");
    let mut child = Command::new(&bin)
        .args(["run", "-c"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start edgemeter");
    std::thread::sleep(Duration::from_secs(secs));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    assert!(status.success(), "edgemeter exited with {status}");
    let db = rusqlite::Connection::open(dir.0.join("state/outbox.db")).expect("open");
    let (n, first, last): (i64, i64, i64) = db
        .query_row("SELECT COUNT(*), MIN(at), MAX(at) FROM records", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .expect("count");
    // Rate over the span in which records were committed.
    Some(Measured {
        records: n as usize,
        secs: ((last - first) as f64 / 1000.0).max(0.001),
        worst_commit_ms: f64::NAN,
        cpu_us: f64::NAN,
    })
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (groups, group) = if quick { (10, 10_000) } else { (50, 10_000) };
    println!(
        "outbox append benchmark ({} records in groups of {group}; the agent's group at 100k/s with 0.1 s flushes)",
        groups * group
    );

    let floor = bench_floor(groups, group, 32, records);
    let row_per_statement = bench_floor(groups, group, 1, records);
    let (ours, bytes_per_record) = bench_outbox(groups, group, records);
    let per_record = bench_commit_per_record(if quick { 500 } else { 2000 });
    let row = |name: &str, m: &Measured| {
        println!(
            "  {name:<22} {:>10.0} records/s   worst commit {:>7.1} ms   {:>6.2}x of sqlite floor{}",
            m.rate(),
            m.worst_commit_ms,
            m.rate() / floor.rate(),
            if m.cpu_us.is_nan() {
                String::new()
            } else {
                format!(
                    "   CPU {:.2} µs/record ({:.2}x the floor's)",
                    m.cpu_us,
                    m.cpu_us / floor.cpu_us
                )
            }
        );
    };
    row("sqlite floor", &floor);
    row("one row per INSERT", &row_per_statement);
    row("outbox.append", &ours);
    row("commit per record", &per_record);
    println!(
        "  outbox.append is {:.0}x the commit-per-record baseline",
        ours.rate() / per_record.rate()
    );
    println!("  on disk: {bytes_per_record:.1} bytes per record (after checkpoint)");
    // Relay messages: the outbox stores a run of one stream's as one row.
    let events_floor = bench_floor(groups, group, 32, relay_events);
    let (events, bytes_per_event) = bench_outbox(groups, group, relay_events);
    println!(
        "  relay messages (events of 186 bytes, runs of {RELAY_RUN} from one of 12 streams): sqlite floor CPU {:.2} µs/record, \
         outbox.append {:.2} µs/record ({:.2}x the floor's), {:.0} records/s; on disk {:.1} bytes per record",
        events_floor.cpu_us,
        events.cpu_us,
        events.cpu_us / events_floor.cpu_us,
        events.rate(),
        bytes_per_event
    );
    let target_ok = ours.rate() >= 100_000.0 && ours.worst_commit_ms < 100.0;
    println!(
        "  target (>= 100,000 records/s with commits <= 100 ms apart): {}",
        if target_ok { "met" } else { "NOT met" }
    );
    if let Some(e2e) = bench_end_to_end(if quick { 3 } else { 6 }) {
        println!(
            "  end to end (edgemeter run, synthetic source flat out, flush 0.1 s): {:.0} records/s committed \
             ({:.2}x of sqlite floor)",
            e2e.rate(),
            e2e.rate() / floor.rate()
        );
    }
}
