//! The xx_gateway source against `active-users.py`'s query pattern, on the
//! same PostgreSQL, same table of about a million rows, same run.
//!
//! Run: `cargo bench --bench xx_gateway` (`-- --quick`: 300,000 rows).
//!
//! - **Database work** is the shared buffers (hit + read) each side's
//!   statements touched, from `pg_stat_statements`, exact per statement.
//! - **Script backfill**: 1,008 epochs × windows [1, 12, 48] = 1,113
//!   `COUNT(DISTINCT recipient_id) ... WHERE epoch BETWEEN` queries, each a
//!   full scan (no index leads with `epoch`). All of them run, unless
//!   `--quick`, where every 12th is run and the total is scaled up (the
//!   queries differ only in their range, and each scans the whole table).
//! - **edgemeter backfill**: the real `edgemeter run` binary with an
//!   `xx_gateway` source, from start until it has written the same 1,113
//!   CSV lines.
//! - **Steady state**: then 1,000 and 10,000 new rows; the buffers of the
//!   agent's next polls, against one script epoch (one full-scan query).
//! - **Per poll**: the buffers per poll (every xx statement, divided by the
//!   polls) while nothing changes, then for 10 s of live inserts (50 rows
//!   per transaction, every fifth transaction held open across a poll, so
//!   ids commit out of order), a third of them late rows for the two
//!   newest emitted epochs. Afterwards every window's last CSV line must
//!   equal the script's SQL.

#[path = "../tests/common/pg.rs"]
mod pg;
#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROWS_PER_EPOCH_FULL: i64 = 1000;
const EPOCHS: i64 = 1008;
const FILTER_HEX: &str = concat!(
    "010000000000000288000000000000000a",
    "00000000000000000000000000000000004000000000000000400000000000000000000800040000",
    "000000000000000000000000000000000000000000000000100000000000000410000080004000001000"
);

/// The agent's statements on the table (the writer's INSERTs excluded).
const AGENT_READS: &str = "SELECT id, recipient_id, epoch FROM client_bloom_filters%";

fn now_epoch() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
        / 1800
}

/// (buffers, calls, ms) of statements matching `like`, since the last reset.
fn stats(c: &mut postgres::Client, like: &str) -> (i64, i64, f64) {
    let r = c
        .query_one(
            "SELECT COALESCE(SUM(shared_blks_hit + shared_blks_read), 0)::bigint, COALESCE(SUM(calls), 0)::bigint,
                    COALESCE(SUM(total_exec_time), 0)::float8
             FROM pg_stat_statements WHERE query LIKE $1",
            &[&like],
        )
        .expect("pg_stat_statements");
    (r.get(0), r.get(1), r.get(2))
}

fn reset(c: &mut postgres::Client) {
    c.batch_execute("SELECT pg_stat_statements_reset()")
        .expect("reset");
}

/// 10 s of live inserts (see the module doc); returns the rows inserted.
fn writer(pg: &pg::PgServer, last: i64) -> i64 {
    let (mut a, mut b) = (pg.superuser("cmix_gateway"), pg.superuser("cmix_gateway"));
    let started = Instant::now();
    let (mut rows, mut held, mut i) = (0i64, false, 0i64);
    while started.elapsed() < Duration::from_secs(10) && i < 10_000 {
        i += 1;
        // Epochs: the open one, and the two newest emitted (late rows).
        let epoch = last + 1 - (i % 3);
        let insert = format!(
                "INSERT INTO client_bloom_filters (recipient_id, epoch, first_round, round_range, filter, uses)
                 SELECT 5000 + (g * 7 + {i}) % 4000, {epoch}, 1, 0, decode('{FILTER_HEX}', 'hex'), 1
                 FROM generate_series(1, 50) g"
            );
        if i % 5 == 0 && !held {
            b.batch_execute(&format!("BEGIN; {insert}"))
                .expect("held insert");
            held = true;
        } else {
            a.batch_execute(&insert).expect("insert");
            if held && i % 5 == 3 {
                b.batch_execute("COMMIT").expect("commit held");
                held = false;
            }
        }
        rows += 50;
        std::thread::sleep(Duration::from_millis(40));
    }
    if held {
        b.batch_execute("COMMIT").expect("commit held");
    }
    rows
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let per_epoch = if quick { 300 } else { ROWS_PER_EPOCH_FULL };
    let pg = pg::PgServer::start_with(
        "bench",
        "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all -c shared_buffers=256MB",
    );
    let mut su = pg.superuser("postgres");
    su.batch_execute("CREATE ROLE cmix LOGIN PASSWORD 'pw'; CREATE ROLE ro LOGIN PASSWORD 'ro';")
        .expect("roles");
    su.batch_execute("CREATE DATABASE cmix_gateway OWNER cmix")
        .expect("db");
    let mut db = pg.superuser("cmix_gateway");
    db.batch_execute(
        r#"CREATE EXTENSION pg_stat_statements;
           CREATE TABLE "client_bloom_filters" ("id" bigserial, "recipient_id" bigint NOT NULL,
             "epoch" bigint NOT NULL, "first_round" bigint NOT NULL, "round_range" bigint NOT NULL,
             "filter" bytea NOT NULL, "uses" bigint NOT NULL DEFAULT 0, PRIMARY KEY ("id"));
           CREATE INDEX "idx_client_bloom_filters_recipient_id_epoch" ON "client_bloom_filters" ("recipient_id","epoch");
           CREATE INDEX "idx_client_bloom_filters_first_round" ON "client_bloom_filters" ("first_round");
           CREATE TABLE "states" ("key" text, "value" text NOT NULL, PRIMARY KEY ("key"));
           INSERT INTO states VALUES ('Period', '1800000000000');
           GRANT SELECT ON client_bloom_filters, states TO ro;"#,
    )
    .expect("schema");
    let last = now_epoch() - 1;
    let first = last - EPOCHS + 1;
    let t = Instant::now();
    // Recipients: a pool that drifts over time, as ephemeral ids rotate; a
    // third of them with a second row in the epoch (more than 64 rounds).
    db.execute(
        &format!(
            "INSERT INTO client_bloom_filters (recipient_id, epoch, first_round, round_range, filter, uses)
             SELECT ((g * 7919 + e * 31) % 4000) - 2000 + (e / 48) * 50, e, e * 1000 + (g % 3) * 64, 63,
                    decode('{FILTER_HEX}', 'hex'), 64
             FROM generate_series($1::bigint, $2::bigint) e, generate_series(1, {per_epoch}) g"
        ),
        &[&first, &last],
    )
    .expect("fill");
    db.batch_execute("VACUUM ANALYZE client_bloom_filters")
        .expect("vacuum");
    let rows: i64 = db
        .query_one("SELECT COUNT(*) FROM client_bloom_filters", &[])
        .expect("count")
        .get(0);
    let size: String = db
        .query_one(
            "SELECT pg_size_pretty(pg_total_relation_size('client_bloom_filters'))",
            &[],
        )
        .expect("size")
        .get(0);
    println!(
        "xx_gateway benchmark: {rows} rows ({size}), {EPOCHS} epochs, filled in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The script's backfill: every window, one full-scan query each.
    let mut queries = Vec::new();
    for e in first..=last {
        for w in [1i64, 12, 48] {
            if e % w == 0 {
                queries.push((e - w + 1, e));
            }
        }
    }
    let total = queries.len();
    let step = if quick { 12 } else { 1 };
    reset(&mut db);
    let t = Instant::now();
    let mut ran = 0;
    for (i, (a, b)) in queries.iter().enumerate() {
        if i % step == 0 {
            let _: i64 = db
                .query_one(
                    &format!("SELECT COUNT(DISTINCT recipient_id) FROM client_bloom_filters WHERE epoch BETWEEN {a} AND {b}"),
                    &[],
                )
                .expect("script query")
                .get(0);
            ran += 1;
        }
    }
    let scale = total as f64 / ran as f64;
    let script_secs = t.elapsed().as_secs_f64() * scale;
    let (script_bufs, _, _) = stats(&mut db, "SELECT COUNT(DISTINCT recipient_id)%");
    let script_bufs = script_bufs as f64 * scale;
    let per_scan = script_bufs / total as f64;
    println!(
        "  script backfill:    {total} queries{}, {:.0} buffers, {script_secs:.1} s",
        if quick {
            format!(" ({ran} run, scaled)")
        } else {
            String::new()
        },
        script_bufs
    );

    // edgemeter's backfill, the real binary.
    let dir = std::env::temp_dir().join(format!("edgemeter-xxbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("gateway.yaml"),
        format!(
            "dbName: cmix_gateway\ndbAddress: \"127.0.0.1:{}\"\ndbUsername: ro\ndbPassword: ro\n",
            pg.port
        ),
    )
    .expect("yaml");
    std::fs::write(
        dir.join("edgemeter.toml"),
        "[agent]\nid = \"bench\"\nstate_dir = \"state\"\nlog_level = \"warn\"\nbuffer_max_bytes = 1073741824\n\
         [[source]]\ntype = \"xx_gateway\"\ngateway_config = \"gateway.yaml\"\nbackfill_epochs = 1008\n\
         poll_interval_secs = 1\ngrace_secs = 0\ncsv_path = \"active-users.csv\"\n",
    )
    .expect("config");
    // Build first: a (re)build must not count as backfill time.
    let bin = support::release_bin();
    reset(&mut db);
    let t = Instant::now();
    let mut child = Command::new(bin)
        .args(["run", "-c"])
        .arg(dir.join("edgemeter.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start edgemeter");
    let csv = dir.join("active-users.csv");
    let deadline = Instant::now() + Duration::from_secs(600);
    let lines = |p: &Path| {
        std::fs::read_to_string(p)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    while lines(&csv) < total && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let ours_secs = t.elapsed().as_secs_f64();
    assert!(
        lines(&csv) >= total,
        "edgemeter did not finish the backfill"
    );
    std::thread::sleep(Duration::from_millis(1500)); // let statistics settle
    let (ours_bufs, ours_calls, _) = stats(&mut db, "%client_bloom_filters%");
    println!(
        "  edgemeter backfill: {ours_calls} queries, {ours_bufs} buffers, {ours_secs:.1} s (process start to last CSV line)"
    );
    println!(
        "  => {:.0}x less database work, {:.1}x the speed",
        script_bufs / ours_bufs.max(1) as f64,
        script_secs / ours_secs
    );

    // Steady state: the agent polls every second; add rows, measure a poll.
    for new_rows in [1_000i64, 10_000] {
        std::thread::sleep(Duration::from_millis(1500));
        reset(&mut db);
        db.execute(
            "INSERT INTO client_bloom_filters (recipient_id, epoch, first_round, round_range, filter, uses)
             SELECT g % 3000, $1, 1, 0, decode($2, 'hex'), 1 FROM generate_series(1, $3::bigint) g",
            &[&(last + 1), &FILTER_HEX, &new_rows],
        )
        .expect("new rows");
        std::thread::sleep(Duration::from_millis(2500));
        let (bufs, calls, _) = stats(&mut db, "%FROM client_bloom_filters WHERE id >%");
        println!(
            "  steady state, {new_rows:>6} new rows: {calls} polls, {bufs} buffers ({:.4}x one script epoch's scan of {per_scan:.0})",
            bufs as f64 / per_scan
        );
    }
    // Per poll, with nothing new: the polls are the `id >` statements.
    std::thread::sleep(Duration::from_millis(1500));
    reset(&mut db);
    std::thread::sleep(Duration::from_secs(6));
    let (idle_bufs, _, _) = stats(&mut db, AGENT_READS);
    let (_, idle_polls, _) = stats(&mut db, "%FROM client_bloom_filters WHERE id >%");
    println!(
        "  per poll, nothing new: {idle_polls} polls, {:.1} buffers per poll",
        idle_bufs as f64 / idle_polls.max(1) as f64
    );

    // Per poll under live inserts with out-of-order commits.
    reset(&mut db);
    let live_rows =
        std::thread::scope(|scope| scope.spawn(|| writer(&pg, last)).join().expect("writer"));
    std::thread::sleep(Duration::from_secs(3));
    let (live_bufs, _, _) = stats(&mut db, AGENT_READS);
    let (_, live_polls, _) = stats(&mut db, "%FROM client_bloom_filters WHERE id >%");
    println!(
        "  per poll, live ({live_rows} rows in 10 s, out-of-order commits): {live_polls} polls, {:.1} buffers per poll",
        live_bufs as f64 / live_polls.max(1) as f64
    );
    // Every window's newest line equals the script's SQL.
    let text = std::fs::read_to_string(&csv).expect("csv");
    let mut newest = std::collections::BTreeMap::new();
    for line in text.split_terminator("\r\n") {
        let f: Vec<&str> = line.split(',').collect();
        let key: (i64, i64) = (f[0].parse().expect("epoch"), f[1].parse().expect("window"));
        newest.insert(key, f[3].parse::<i64>().expect("n"));
    }
    let mut checked = 0;
    for (&(e, w), &n) in newest.range((last - 96, 0)..) {
        let want: i64 = db
            .query_one(
                "SELECT COUNT(DISTINCT recipient_id) FROM client_bloom_filters WHERE epoch BETWEEN $1 AND $2",
                &[&(e - w + 1), &e],
            )
            .expect("reference")
            .get(0);
        assert_eq!(n, want, "window {e},{w} differs from the script's SQL");
        checked += 1;
    }
    println!(
        "  after the live phase: {checked} windows of the last 96 epochs equal the script's SQL"
    );

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    assert!(status.success(), "edgemeter exited with {status}");
    std::fs::remove_dir_all(&dir).ok();
}
