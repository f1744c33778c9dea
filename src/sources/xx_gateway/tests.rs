//! The source against a real PostgreSQL holding the gateway's exact DDL:
//! every window value must equal the reference SQL on the same data.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use smol::LocalExecutor;

use super::*;
use crate::record::{Kind, Record};
use crate::runtime::{Item, record_channel, shutdown_pair};
use crate::sketch::Sketch;
use crate::sources::Context;
use step::{Emission, Inner};
use store::Store;

#[path = "../../../tests/common/pg.rs"]
mod pg;

/// The DDL GORM's AutoMigrate creates on a fresh gateway (the reference, §1.2).
const GATEWAY_DDL: &str = r#"
CREATE TABLE "client_bloom_filters" (
  "id"           bigserial,
  "recipient_id" bigint NOT NULL,
  "epoch"        bigint NOT NULL,
  "first_round"  bigint NOT NULL,
  "round_range"  bigint NOT NULL,
  "filter"       bytea  NOT NULL,
  "uses"         bigint NOT NULL DEFAULT 0,
  PRIMARY KEY ("id"));
CREATE INDEX "idx_client_bloom_filters_recipient_id_epoch" ON "client_bloom_filters" ("recipient_id","epoch");
CREATE INDEX "idx_client_bloom_filters_first_round"        ON "client_bloom_filters" ("first_round");
CREATE TABLE "states" ("key" text, "value" text NOT NULL, PRIMARY KEY ("key"));
"#;

const PERIOD_MS: i64 = 2000;
const WINDOWS: [u32; 3] = [1, 3, 6];

struct Gw {
    server: pg::PgServer,
}

impl Gw {
    fn new(tag: &str) -> Gw {
        let server = pg::PgServer::start(tag);
        let mut su = server.superuser("postgres");
        su.batch_execute(
            "CREATE ROLE cmix LOGIN PASSWORD 'cmix-pass';
             CREATE ROLE reader LOGIN PASSWORD 'reader-pass';
             CREATE ROLE stranger LOGIN PASSWORD 'stranger-pass';",
        )
        .expect("roles");
        su.batch_execute("CREATE DATABASE cmix_gateway OWNER cmix")
            .expect("database");
        let mut owner = server.connect("cmix", "cmix-pass", "cmix_gateway");
        owner.batch_execute(GATEWAY_DDL).expect("gateway DDL");
        owner
            .execute(
                "INSERT INTO states (key, value) VALUES ('Period', $1)",
                &[&(PERIOD_MS * 1_000_000).to_string()],
            )
            .expect("period");
        // The read-only role edgemeter is meant to use: SELECT and nothing else.
        owner
            .batch_execute("GRANT SELECT ON client_bloom_filters, states TO reader;")
            .expect("grant");
        Gw { server }
    }

    fn owner(&self) -> postgres::Client {
        self.server.connect("cmix", "cmix-pass", "cmix_gateway")
    }

    /// Rows as the gateway writes them: one row per (recipient, epoch) per up
    /// to 64 rounds, real filter bytes, several rows for busy recipients.
    fn insert(
        &self,
        client: &mut impl postgres::GenericClient,
        epoch: i64,
        recipients: &[i64],
        rows_each: usize,
    ) {
        for &r in recipients {
            for k in 0..rows_each {
                let first = (epoch as u64) * 1000 + k as u64 * 64;
                let rounds: Vec<u64> = (first..first + 1 + (r.unsigned_abs() % 5)).collect();
                let filter = bloom::Filter::with_rounds(&rounds).encode();
                client
                    .execute(
                        "INSERT INTO client_bloom_filters (recipient_id, epoch, first_round, round_range, filter, uses)
                         VALUES ($1, $2, $3, $4, $5, $6)",
                        &[&r, &epoch, &(first as i64), &((rounds.len() - 1) as i64), &filter, &(rounds.len() as i64)],
                    )
                    .expect("insert row");
            }
        }
    }

    /// A row whose id was taken earlier (it commits after higher ids).
    fn insert_with_id(&self, client: &mut postgres::Client, id: i64, epoch: i64, recipient: i64) {
        let filter = bloom::Filter::with_rounds(&[epoch as u64 * 1000]).encode();
        client
            .execute(
                "INSERT INTO client_bloom_filters (id, recipient_id, epoch, first_round, round_range, filter, uses)
                 VALUES ($1, $2, $3, $4, 0, $5, 1)",
                &[&id, &recipient, &epoch, &(epoch * 1000), &filter],
            )
            .expect("insert with id");
    }

    fn reference(&self, first: i64, last: i64) -> u64 {
        let mut c = self.owner();
        let n: i64 = c
            .query_one(
                "SELECT COUNT(DISTINCT recipient_id) FROM client_bloom_filters WHERE epoch BETWEEN $1 AND $2",
                &[&first, &last],
            )
            .expect("reference query")
            .get(0);
        n as u64
    }

    fn yaml(&self, dir: &Path, user: &str, password: &str) -> std::path::PathBuf {
        let path = dir.join("gateway.yaml");
        std::fs::write(
            &path,
            format!(
                "dbName: \"cmix_gateway\"\ndbAddress: \"127.0.0.1:{}\"\ndbUsername: \"{user}\"\ndbPassword: \"{password}\"\n",
                self.server.port
            ),
        )
        .expect("write gateway.yaml");
        path
    }
}

fn config(yaml: &Path, dir: &Path, backfill: u32) -> Config {
    Config {
        db: config::DbSource::GatewayYaml(yaml.to_owned()),
        node_id_file: Some(dir.join("gateway-IDF.json")),
        windows: WINDOWS.to_vec(),
        backfill_epochs: backfill,
        grace: Duration::from_millis(300),
        poll_interval: Duration::from_millis(100),
        csv_path: Some(dir.join("active-users.csv")),
        fetch_rows: 500,
        id_overlap: 200,
        gap_timeout: Duration::from_secs(30),
        late_epochs: 12,
        after_script: None,
        script_csv: None,
        connect_timeout: Duration::from_secs(2),
    }
}

fn now_epoch() -> i64 {
    now_ms() / PERIOD_MS
}

/// What the source emitted, newest value per (end, window), and its logs.
#[derive(Default)]
struct Seen {
    windows: BTreeMap<(i64, u32), f64>,
    sketches: BTreeMap<(i64, u32), Sketch>,
    counters: BTreeMap<String, f64>,
    lines: usize,
}

impl Seen {
    fn take(&mut self, r: Record) {
        let key = |r: &Record| {
            let epochs: u32 = r
                .dims
                .pairs()
                .iter()
                .find(|(k, _)| k == "epochs")
                .expect("epochs dim")
                .1
                .parse()
                .expect("n");
            (r.ts_ms / PERIOD_MS - 1, epochs)
        };
        match (r.kind, r.name.as_ref()) {
            (Kind::Point, METRIC) => {
                assert_eq!(
                    r.dims.pairs()[1],
                    ("gateway".to_owned(), "node-7".to_owned())
                );
                self.windows.insert(key(&r), r.value);
            }
            (Kind::Sketch, METRIC) => {
                self.sketches
                    .insert(key(&r), Sketch::decode(&r.payload).expect("sketch decodes"));
            }
            (Kind::Line, CSV_STREAM) => self.lines += 1,
            (Kind::Point, name) => *self.counters.entry(name.to_owned()).or_default() += r.value,
            other => panic!("unexpected record {other:?}"),
        }
    }
}

/// Run the source until `until` says stop (bounded by `limit`), with
/// `between` called every 100 ms to change the database meanwhile.
fn run_source(
    config: Config,
    state: &Path,
    limit: Duration,
    mut between: impl FnMut(&Seen) -> bool,
) -> Seen {
    let (emitter, rx) = record_channel();
    let (mut trigger, shutdown) = shutdown_pair();
    let ex = std::rc::Rc::new(LocalExecutor::new());
    let ctx = Context {
        name: "gw".into(),
        agent_id: "agent".into(),
        emit: emitter,
        shutdown,
        spawner: crate::runtime::Spawner::new(&ex),
        io: std::rc::Rc::new(crate::runtime::Worker::new("io")),
        grace: Duration::from_secs(5),
    };
    let mut seen = Seen::default();
    smol::block_on(ex.run(async {
        let task = ex.spawn(Box::new(XxGateway::new(config, state.to_owned())).run(ctx));
        let started = Instant::now();
        loop {
            // Drain what arrived; answer barriers as a writer would.
            while let Ok(item) = rx.try_recv() {
                match item {
                    Item::Record(r) => seen.take(r),
                    Item::Records(rs) => rs.into_iter().for_each(|r| seen.take(r)),
                    Item::Barrier(done) => {
                        let _ = done.try_send(());
                    }
                }
            }
            if !between(&seen) || started.elapsed() > limit {
                break;
            }
            smol::Timer::after(Duration::from_millis(100)).await;
        }
        trigger.fire();
        while let Ok(item) = rx.try_recv() {
            match item {
                Item::Record(r) => seen.take(r),
                Item::Records(rs) => rs.into_iter().for_each(|r| seen.take(r)),
                Item::Barrier(_) => {}
            }
        }
        task.await;
    }));
    seen
}

/// The first epoch a source with `cfg` emits if it starts at `before_ms`:
/// the source's own rule (`newest final epoch - backfill_epochs + 1`), not
/// `now_epoch() - backfill_epochs`, which is one too late within the grace
/// after an epoch begins (the newest final epoch is then the one before).
fn first_emitted_at(cfg: &Config, before_ms: i64) -> i64 {
    let newest = epochs::newest_final(before_ms, PERIOD_MS, cfg.grace.as_millis() as i64);
    newest - i64::from(cfg.backfill_epochs) + 1
}

/// The first epoch the source emitted, from its own state. It is fixed at the
/// source's first step; on a loaded machine that can be an epoch or two
/// after `expected` ([`first_emitted_at`] a moment before it started).
#[track_caller]
fn emitted_from(dir: &Path, expected: i64) -> i64 {
    let store = Store::open(&dir.join("xx_gateway-gw.db")).expect("the source's store");
    let from = store
        .get("emitted_from")
        .expect("read")
        .expect("set at the first step");
    assert!(
        (expected..=expected + 3).contains(&from),
        "emitted from {from}, expected about {expected}"
    );
    from
}

#[track_caller]
fn check_all_windows_exact(gw: &Gw, seen: &Seen, first: i64, last: i64) {
    // Regression: a fresh start once "corrected" windows before the first
    // emitted epoch (never emitted) and counted their rows as late.
    let earliest = seen
        .windows
        .keys()
        .map(|k| k.0)
        .min()
        .expect("some windows");
    assert!(
        earliest >= first,
        "window at epoch {earliest}, before the first emitted epoch {first}"
    );
    let mut checked = 0;
    for e in first..=last {
        for w in epochs::due(e, &WINDOWS) {
            let got = seen
                .windows
                .get(&(e, w))
                .unwrap_or_else(|| panic!("window ({e}, {w}) was never emitted"));
            let want = gw.reference(epochs::window_start(e, w), e);
            assert_eq!(*got, want as f64, "window of {w} epochs at epoch {e}");
            let sketch = &seen.sketches[&(e, w)];
            assert_eq!(
                sketch.estimate(),
                want as f64,
                "the sketch is exact at this size"
            );
            checked += 1;
        }
    }
    assert!(checked > 10, "too few windows checked: {checked}");
}

fn setup_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("edgemeter-xx-{tag}-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&d).expect("dir");
    std::fs::write(
        d.join("gateway-IDF.json"),
        r#"{"id":"node-7","type":"gateway"}"#,
    )
    .expect("idf");
    d
}

#[test]
fn backfill_and_live_polling_match_the_reference_sql_under_a_read_only_role() {
    let gw = Gw::new("live");
    let dir = setup_dir("live");
    let before_ms = now_ms();
    let start = now_epoch();
    let mut owner = gw.owner();
    // History: 20 epochs before now, overlapping recipients, several rows each.
    for e in start - 20..start {
        let recips: Vec<i64> = (0..40).map(|i| (e * 7 + i * 13) % 97 - 48).collect();
        gw.insert(&mut owner, e, &recips, 1 + (e % 3) as usize);
    }
    let yaml = gw.yaml(&dir, "reader", "reader-pass");
    let cfg = config(&yaml, &dir, 18);
    let expected_first = first_emitted_at(&cfg, before_ms);
    // Live: keep writing into the current epoch. Now and then an id is
    // taken (as an INSERT does) and its row committed only polls later, after
    // higher ids: the out-of-order commit the id overlap exists for.
    let mut reserved: Option<(i64, i64)> = None;
    let mut late_commits = 0;
    let mut tick = 0;
    let stop_after = start + 5;
    let seen = run_source(cfg, &dir, Duration::from_secs(40), |seen| {
        tick += 1;
        let e = now_epoch();
        if e < stop_after {
            let recips: Vec<i64> = (0..5).map(|i| (tick * 5 + i) % 300).collect();
            gw.insert(&mut owner, e, &recips, 2);
            if tick % 7 == 3 && reserved.is_none() {
                let id: i64 = owner
                    .query_one("SELECT nextval('client_bloom_filters_id_seq')", &[])
                    .expect("nextval")
                    .get(0);
                reserved = Some((id, e));
            }
        }
        if tick % 7 == 5
            && let Some((id, epoch)) = reserved.take()
        {
            gw.insert_with_id(&mut owner, id, epoch, 100_000 + tick);
            late_commits += 1;
        }
        let newest = epochs::newest_final(now_ms(), PERIOD_MS, 300);
        !(newest > stop_after && seen.windows.contains_key(&(stop_after + 1, 1)))
    });
    assert!(
        late_commits >= 2,
        "the out-of-order case must have happened"
    );
    let first_emitted = emitted_from(&dir, expected_first);
    check_all_windows_exact(&gw, &seen, first_emitted, stop_after + 1);
    let late = seen.counters.get("xx_late_rows").copied().unwrap_or(0.0);
    assert!(
        late <= late_commits as f64,
        "{late} late rows, but only {late_commits} rows were committed late"
    );
    let csv = std::fs::read_to_string(dir.join("active-users.csv")).expect("csv written");
    assert!(
        csv.lines().count() >= seen.windows.len(),
        "one CSV line per emitted window"
    );
    assert!(csv.ends_with("\r\n"), "rows end like Python's csv.writer");
    assert!(seen.counters.get("xx_rows_read").copied().unwrap_or(0.0) > 0.0);
    std::fs::remove_dir_all(&dir).ok();
}

fn inner(config: Config, state: &Path) -> Inner {
    Inner::new(config, "gw".into(), "agent".into(), state)
}

#[test]
fn missing_rights_and_bad_passwords_are_explained_without_secrets() {
    let gw = Gw::new("rights");
    let dir = setup_dir("rights");
    let yaml = gw.yaml(&dir, "stranger", "stranger-pass");
    let err = inner(config(&yaml, &dir, 5), &dir)
        .step(now_ms())
        .err()
        .expect("no rights");
    assert_eq!(
        err,
        XxError::Gateway(
            "role `stranger` may not read `states` (permission denied). edgemeter needs only SELECT \
             (as the tables' owner: GRANT SELECT ON client_bloom_filters, states TO \"stranger\")"
                .into()
        )
    );
    let yaml = gw.yaml(&dir, "reader", "not-the-password");
    let err = inner(config(&yaml, &dir, 5), &dir)
        .step(now_ms())
        .err()
        .expect("bad password");
    assert!(matches!(err, XxError::Gateway(_)), "{err:?}");
    let err = err.to_string();
    assert!(err.contains("wrong user or password"), "{err}");
    assert!(
        !err.contains("not-the-password"),
        "the password leaked into: {err}"
    );
    let mut cfg = config(&yaml, &dir, 5);
    cfg.db = config::DbSource::Explicit {
        host: Some("127.0.0.1".into()),
        port: Some(gw.server.port),
        dbname: Some("nope".into()),
        user: Some("reader".into()),
        password_file: None,
    };
    let err = inner(cfg, &dir)
        .step(now_ms())
        .err()
        .expect("no password, no db")
        .to_string();
    assert!(err.contains("reader@127.0.0.1"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn survives_a_database_restart_and_corrects_windows_for_late_rows() {
    let gw = Gw::new("restart");
    let dir = setup_dir("restart");
    let before_ms = now_ms();
    let start = now_epoch();
    let mut owner = gw.owner();
    for e in start - 12..start {
        let recips: Vec<i64> = (0..30).map(|i| (e * 11 + i * 7) % 120).collect();
        gw.insert(&mut owner, e, &recips, 2);
    }
    drop(owner);
    let yaml = gw.yaml(&dir, "reader", "reader-pass");
    let cfg = config(&yaml, &dir, 10);
    let expected_first = first_emitted_at(&cfg, before_ms);
    let mut phase = 0;
    let mut phase_at = Instant::now();
    let mut late_epoch = 0;
    let seen = run_source(cfg, &dir, Duration::from_secs(45), |seen| {
        match phase {
            // Backfill emitted: stop the database under the source.
            0 if seen.windows.contains_key(&(start - 1, 1)) => {
                gw.server.stop();
                phase = 1;
                phase_at = Instant::now();
            }
            // Down for 3 s (an epoch and a half of polls fail), then back.
            1 if phase_at.elapsed() > Duration::from_secs(3) => {
                gw.server.start_again();
                // Late rows for an epoch whose windows were all emitted,
                // new ids and known ones, plus rows for the current epoch.
                late_epoch = start - 3;
                let mut c = gw.owner();
                gw.insert(&mut c, late_epoch, &[5000, 5001, 5002, 0], 1);
                gw.insert(&mut c, now_epoch(), &[1, 2, 3], 1);
                phase = 2;
                phase_at = Instant::now();
            }
            2 => {
                let fixed = seen.windows.get(&(late_epoch, 1)).copied().unwrap_or(0.0);
                let newest = epochs::newest_final(now_ms(), PERIOD_MS, 300);
                if fixed == gw.reference(late_epoch, late_epoch) as f64
                    && seen.windows.contains_key(&(newest, 1))
                {
                    return false;
                }
            }
            _ => {}
        }
        true
    });
    assert_eq!(phase, 2, "the restart happened");
    let newest = seen.windows.keys().map(|k| k.0).max().expect("windows");
    let first_emitted = emitted_from(&dir, expected_first);
    check_all_windows_exact(&gw, &seen, first_emitted, newest);
    assert!(
        seen.counters["xx_late_rows"] >= 3.0,
        "the late ids were counted: {:?}",
        seen.counters
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Steps until caught up, each step's records taken as committed.
fn catch_up(i: &mut Inner) -> Vec<Emission> {
    let mut all = Vec::new();
    for _ in 0..50 {
        let step = i.step(now_ms()).expect("step");
        i.finish(now_ms(), step.done()).expect("finish");
        all.extend(step.emissions);
        if !step.more {
            return all;
        }
    }
    panic!("not caught up after 50 steps");
}

/// Issue 16, problem 7: a late row's id reached the source's store before
/// its correction reached the outbox; a crash in between lost the
/// correction, because the next start saw no new id. The mark now commits
/// with the id and is cleared only after the outbox has the records.
#[test]
fn a_crash_before_the_correction_is_committed_does_not_lose_it() {
    let gw = Gw::new("crash-late");
    let dir = setup_dir("crash-late");
    let start = now_epoch();
    let mut owner = gw.owner();
    for e in start - 10..start {
        gw.insert(&mut owner, e, &[1, 2, 3, e], 1);
    }
    let yaml = gw.yaml(&dir, "reader", "reader-pass");
    let mut a = inner(config(&yaml, &dir, 8), &dir);
    catch_up(&mut a);
    let late_epoch = start - 3;
    let before = gw.reference(late_epoch, late_epoch);
    gw.insert(&mut owner, late_epoch, &[777], 1);
    let step = a.step(now_ms()).expect("step with the late row");
    let fixed = |emissions: &[Emission]| {
        emissions
            .iter()
            .find(|em| em.epoch == late_epoch && em.window == 1)
            .map(|em| em.unique)
    };
    assert_eq!(fixed(&step.emissions), Some(before + 1), "the correction");
    // The agent dies here: the records never reach the outbox.
    drop(a);
    let mut b = inner(config(&yaml, &dir, 8), &dir);
    let step = b.step(now_ms()).expect("the step after the restart");
    assert_eq!(
        fixed(&step.emissions),
        Some(before + 1),
        "the correction is emitted again after the restart"
    );
    b.finish(now_ms(), step.done()).expect("committed");
    let step = b.step(now_ms()).expect("a later step");
    assert_eq!(
        fixed(&step.emissions),
        None,
        "and only until it is committed"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn verify_decodes_real_rows_and_flags_bad_ones() {
    let gw = Gw::new("verify");
    let dir = setup_dir("verify");
    let mut owner = gw.owner();
    gw.insert(&mut owner, 100, &[1, 2, 3], 2);
    let yaml = gw.yaml(&dir, "reader", "reader-pass");
    let cfg = config(&yaml, &dir, 5);
    let v = verify(&cfg, 100).expect("verify");
    assert_eq!((v.rows, v.malformed.len(), v.unclaimed.len()), (6, 0, 0));
    // A truncated filter, and a filter that does not hold its first round.
    let empty = bloom::Filter::with_rounds(&[]).encode();
    owner
        .execute(
            "INSERT INTO client_bloom_filters (recipient_id, epoch, first_round, round_range, filter) VALUES
             (9, 100, 5, 0, '\\x0100'::bytea), (9, 100, 77, 0, $1)",
            &[&empty],
        )
        .expect("bad rows");
    let v = verify(&cfg, 100).expect("verify");
    assert_eq!(v.rows, 8);
    assert_eq!(v.malformed.len(), 1);
    assert_eq!(v.malformed[0].1, "a filter row is 99 bytes, this one 2");
    assert_eq!(v.unclaimed.len(), 1);
    std::fs::remove_dir_all(&dir).ok();
}
