//! The xx_gateway source the way an operator runs it: the real binary, a
//! config pointing at the gateway's `gateway.yaml`, a real PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use common::pg::PgServer;
use common::{Agent, TempDir, edgemeter};

const PERIOD_MS: i64 = 2000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

#[test]
fn the_agent_counts_a_gateway_and_writes_the_script_csv() {
    let pg = PgServer::start("xx-bin");
    let mut gw = pg.gateway_db(PERIOD_MS);
    // The reference's real round-1 filter row for every row.
    let filter: Vec<u8> = (0..99)
        .map(|i| {
            let hex = concat!(
                "010000000000000288000000000000000a",
                "00000000000000000000000000000000004000000000000000400000000000000000000800040000",
                "000000000000000000000000000000000000000000000000100000000000000410000080004000001000"
            );
            u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex")
        })
        .collect();
    let now_e = now_ms() / PERIOD_MS;
    for e in now_e - 8..now_e {
        for r in 0..(10 + e % 7) {
            gw.execute(
                "INSERT INTO client_bloom_filters (recipient_id, epoch, first_round, round_range, filter, uses)
                 VALUES ($1, $2, 1, 0, $3, 1)",
                &[&(r * 3 - 9), &e, &filter],
            )
            .expect("row");
        }
    }

    let dir = TempDir::new("xx-bin");
    dir.write(
        "gateway.yaml",
        &format!(
            "# gateway config\ndbName: \"cmix_gateway\"\ndbAddress: \"127.0.0.1:{}\"\ndbUsername: \"ro\"\ndbPassword: \"pw-ro\"\n",
            pg.port
        ),
    );
    dir.write("gateway-IDF.json", r#"{"id":"gw-node-1"}"#);
    let cfg = dir.write(
        "edgemeter.toml",
        &format!(
            r#"[agent]
id = "edge-1"
state_dir = "state"
flush_interval_secs = 0.1

{xx}
[[sink]]
type = "csv"
name = "points"
path = "points.csv"
kinds = ["point"]
"#,
            xx = common::XX_SOURCE
        ),
    );
    let c = cfg.to_str().expect("utf-8 path");
    let (code, out, err) = edgemeter(&["check", "-c", c]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sources: gateway"), "{out}");

    let mut agent = Agent::start_running(&cfg, "info");
    let deadline = Instant::now() + Duration::from_secs(30);
    let want_lines = 6 + 2; // six 1-epoch windows, two 3-epoch ones
    while Instant::now() < deadline {
        let lines = std::fs::read_to_string(dir.path("active-users.csv"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= want_lines {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    agent.stop();
    let log = agent.stderr();
    assert!(
        log.contains("reading the gateway database ro@127.0.0.1"),
        "{log}"
    );
    assert!(
        !log.contains("pw-ro"),
        "the password appeared in the log:\n{log}"
    );

    // Every CSV line equals the reference SQL, in the script's format.
    let csv = std::fs::read_to_string(dir.path("active-users.csv")).expect("csv");
    let mut lines = 0;
    for line in csv.split_terminator("\r\n") {
        let f: Vec<&str> = line.split(',').collect();
        let (e, w): (i64, i64) = (f[0].parse().expect("epoch"), f[1].parse().expect("window"));
        let want: i64 = gw
            .query_one(
                "SELECT COUNT(DISTINCT recipient_id) FROM client_bloom_filters WHERE epoch BETWEEN $1 AND $2",
                &[&(e - w + 1), &e],
            )
            .expect("reference")
            .get(0);
        assert_eq!(f[3], want.to_string(), "line {line:?}");
        assert!(f[2].ends_with("+00:00"), "{line:?}");
        lines += 1;
    }
    assert!(lines >= want_lines, "{csv}");
    // The points reached the sink, labelled with the gateway's node id.
    let points = std::fs::read_to_string(dir.path("points.csv")).expect("points");
    assert!(
        points.contains("active_users,epochs=1;gateway=gw-node-1;window=2s"),
        "{points}"
    );

    let (code, out, err) = edgemeter(&["verify", "-c", c, "--rows", "50"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        "source `gateway`: 50 rows checked: 0 malformed, 0 do not claim their rounds\n"
    );
}

// ---------------------------------------------------------------------
// Issue 16: switching over from active-users.py, visible, cheap per poll.

/// Rows for `epochs`, `base + e % 7` recipients each, ids from the sequence.
fn fill(gw: &mut postgres::Client, epochs: std::ops::Range<i64>, base: i64) {
    for e in epochs {
        gw.execute(
            "INSERT INTO client_bloom_filters (recipient_id, epoch, first_round, round_range, filter, uses)
             SELECT g * 3 - 9, $1::bigint, 1, 0, '\\x00'::bytea, 1 FROM generate_series(1, $2::bigint + $1::bigint % 7) g",
            &[&e, &base],
        )
        .expect("rows");
    }
}

fn reference(gw: &mut postgres::Client, e: i64, w: i64) -> i64 {
    gw.query_one(
        "SELECT COUNT(DISTINCT recipient_id) FROM client_bloom_filters WHERE epoch BETWEEN $1 AND $2",
        &[&(e - w + 1), &e],
    )
    .expect("reference")
    .get(0)
}

/// A gateway's files in `dir` and an agent config around `source` (the
/// `[[source]]` table), with every point also written to `points.csv`.
fn gateway_files(dir: &TempDir, port: u16, password: &str, source: &str) -> std::path::PathBuf {
    dir.write(
        "gateway.yaml",
        &format!(
            "dbName: \"cmix_gateway\"\ndbAddress: \"127.0.0.1:{port}\"\ndbUsername: \"ro\"\ndbPassword: {password}\n"
        ),
    );
    dir.write("gateway-IDF.json", r#"{"id":"gw-node-1"}"#);
    dir.write(
        "edgemeter.toml",
        &format!(
            r#"[agent]
id = "edge-1"
state_dir = "state"
flush_interval_secs = 0.1

{source}
[[sink]]
type = "csv"
name = "points"
path = "points.csv"
kinds = ["point"]
"#
        ),
    )
}

/// `(time, dims, value)` of each point named `name` in the csv sink's file.
fn points(dir: &TempDir, name: &str) -> Vec<(String, String, f64)> {
    let text = std::fs::read_to_string(dir.path("points.csv")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f.len() == 8 && f[4] == name).then(|| {
                (
                    f[2].to_owned(),
                    f[5].to_owned(),
                    f[6].parse().expect("value"),
                )
            })
        })
        .collect()
}

/// `(epoch, window) -> unique` of each line of a script-format CSV, and
/// whether any (epoch, window) appeared twice.
fn csv_windows(path: &std::path::Path) -> (std::collections::BTreeMap<(i64, i64), i64>, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = std::collections::BTreeMap::new();
    let mut twice = 0;
    for line in text.split_terminator("\r\n") {
        let f: Vec<&str> = line.split(',').collect();
        let key = (f[0].parse().expect("epoch"), f[1].parse().expect("window"));
        if out.insert(key, f[3].parse().expect("unique")).is_some() {
            twice += 1;
        }
    }
    (out, twice)
}

fn status(cfg: &std::path::Path) -> String {
    let (code, out, err) = edgemeter(&["status", "-c", cfg.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{err}");
    out
}

/// The tests' source without its `csv_path` (each test sets its own).
fn source() -> String {
    common::XX_SOURCE.replace("csv_path = \"active-users.csv\"\n", "")
}

/// Problem 1: with a `csv_path` that cannot be written, the same windows
/// were emitted again at every poll (4,127 times in 27 s). Now `check`
/// says so, every window reaches the sinks once, the lines wait in the
/// source's store and are appended once the directory exists.
#[test]
fn an_unwritable_csv_path_is_caught_by_check_and_never_re_emits_windows() {
    let pg = PgServer::start("xx-csv");
    let mut gw = pg.gateway_db(PERIOD_MS);
    let now_e = now_ms() / PERIOD_MS;
    fill(&mut gw, now_e - 8..now_e + 1, 10);
    let dir = TempDir::new("xx-csv");
    let cfg = gateway_files(
        &dir,
        pg.port,
        "pw-ro",
        &format!("{}csv_path = \"no/such/dir/au.csv\"\n", source()),
    );
    let c = cfg.to_str().expect("utf-8");
    let (code, _, err) = edgemeter(&["check", "-c", c]);
    assert_eq!(code, 2, "check must refuse: {err}");
    assert!(
        err.contains("source `gateway`: csv_path ") && err.contains("no/such/dir does not exist"),
        "{err}"
    );

    let mut agent = Agent::start_running(&cfg, "info");
    assert!(
        common::wait_until(Duration::from_secs(30), || points(&dir, "active_users")
            .len()
            >= 8),
        "{}",
        agent.stderr()
    );
    std::thread::sleep(Duration::from_secs(3)); // 15 polls
    let shown = status(&cfg);
    assert!(
        shown.contains("/no/such/dir/au.csv: FAILING since") && shown.contains("lines waiting"),
        "{shown}"
    );
    // Now the operator creates the directory: the waiting lines go in.
    std::fs::create_dir_all(dir.path("no/such/dir")).expect("mkdir");
    let au = dir.path("no/such/dir/au.csv");
    assert!(
        common::wait_until(Duration::from_secs(30), || {
            status(&cfg).contains("au.csv: ok") && csv_windows(&au).0.len() >= 8
        }),
        "{}\n{}",
        status(&cfg),
        agent.stderr()
    );
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    let log = agent.stderr();

    let emitted = points(&dir, "active_users");
    let mut keys: Vec<(&str, &str)> = emitted
        .iter()
        .map(|(t, d, _)| (t.as_str(), d.as_str()))
        .collect();
    let total = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(
        keys.len(),
        total,
        "a window was emitted twice:\n{emitted:?}"
    );
    assert_eq!(
        log.matches("cannot open csv_path").count(),
        1,
        "one ERROR line for the failure, not one per poll:\n{log}"
    );
    assert!(log.contains("is written again after"), "{log}");
    let (lines, twice) = csv_windows(&au);
    assert_eq!(twice, 0, "no line twice");
    assert_eq!(lines.len(), total, "one line per window emitted");
    for (&(e, w), &n) in &lines {
        assert_eq!(n, reference(&mut gw, e, w), "line {e},{w}");
    }
    // Problem 4's count: rows read are new rows, each counted once, not
    // a fixed re-read per poll (which reported 10,000 for every poll).
    let read: f64 = points(&dir, "xx_rows_read").iter().map(|p| p.2).sum();
    let rows: i64 = gw
        .query_one("SELECT COUNT(*) FROM client_bloom_filters", &[])
        .expect("count")
        .get(0);
    assert_eq!(read, rows as f64, "xx_rows_read counts each row once");
    let failures: f64 = points(&dir, "xx_csv_failures").iter().map(|p| p.2).sum();
    assert!(
        failures >= 2.0,
        "failed writes are counted as points: {failures}"
    );
}

/// Problem 2: caught up at L, a new recipient at an epoch a few back made
/// the re-emitted windows lower than before, because epochs the widest
/// window needs had been pruned. Now a correction equals the reference
/// SQL, and a row too late to correct anything is counted, not emitted.
#[test]
fn late_rows_near_the_horizon_correct_exactly_or_are_counted_as_expired() {
    const P: i64 = 3000; // long enough to act within one epoch
    let pg = PgServer::start("xx-late");
    let mut gw = pg.gateway_db(P);
    let dir = TempDir::new("xx-late");
    let source = source()
        .replace("windows = [1, 3]", "windows = [1, 3]\nbackfill_epochs = 12")
        .replace("backfill_epochs = 6\n", "");
    let cfg = gateway_files(
        &dir,
        pg.port,
        "pw-ro",
        &format!("{source}csv_path = \"au.csv\"\n"),
    );
    let now_e = now_ms() / P;
    fill(&mut gw, now_e - 14..now_e + 2, 20);
    let mut agent = Agent::start_running(&cfg, "info");
    let au = dir.path("au.csv");
    // Wait for an epoch L, caught up, with L - 4 a multiple of 3: the
    // 3-epoch window at L - 4 starts at L - 6, which the old horizon
    // (L - 5) had pruned. The late rows go in while L is still the newest.
    let mut l = 0;
    for _ in 0..80 {
        let newest = (now_ms() - 200) / P - 1;
        let caught_up = csv_windows(&au).0.contains_key(&(newest, 1));
        if caught_up && (newest - 4) % 3 == 0 && now_ms() % P < P / 2 {
            l = newest;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        l > 0,
        "never caught up at a suitable epoch:\n{}",
        agent.stderr()
    );
    gw.execute(
        "INSERT INTO client_bloom_filters (recipient_id, epoch, first_round, round_range, filter, uses)
         VALUES (424242, $1, 1, 0, '\\x00'::bytea, 1), (525252, $2, 1, 0, '\\x00'::bytea, 1),
                (626262, $3, 1, 0, '\\x00'::bytea, 1)",
        &[&(l - 4), &(l - 6), &(l - 9)],
    )
    .expect("late rows");
    assert_eq!(
        (now_ms() - 200) / P - 1,
        l,
        "the test was too slow for its epoch"
    );
    assert!(
        common::wait_until(Duration::from_secs(10), || {
            points(&dir, "xx_late_rows_expired")
                .iter()
                .map(|p| p.2)
                .sum::<f64>()
                >= 2.0
        }),
        "{}",
        agent.stderr()
    );
    std::thread::sleep(Duration::from_millis(600));
    agent.stop();
    // The last line for each window is what consumers keep.
    let (lines, _) = csv_windows(&au);
    for e in l - 4..=l {
        for w in [1, 3] {
            if e % w == 0 {
                assert_eq!(
                    lines[&(e, w)],
                    reference(&mut gw, e, w),
                    "window {e},{w} after the correction"
                );
            }
        }
    }
    let late: f64 = points(&dir, "xx_late_rows").iter().map(|p| p.2).sum();
    let expired: f64 = points(&dir, "xx_late_rows_expired")
        .iter()
        .map(|p| p.2)
        .sum();
    assert_eq!(
        (late, expired),
        (1.0, 2.0),
        "one row corrected, two too late"
    );
    // The too-late rows changed nothing that was emitted.
    let before_late = reference(&mut gw, l - 9, 1) - 1;
    assert_eq!(
        lines[&(l - 9, 1)],
        before_late,
        "an expired row is not emitted"
    );
}

/// The script's CSV line for a window, as `active-users.py` writes it.
fn script_line(e: i64, w: i64, n: i64) -> String {
    let end = (e + 1) * PERIOD_MS / 1000;
    let (y, m, d) = common::civil(end.div_euclid(86_400));
    let s = end.rem_euclid(86_400);
    format!(
        "{e},{w},{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}+00:00,{n}\r\n",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// Problem 3: a first start on a gateway that runs the script today
/// backfilled 1,008 epochs into the script's CSV and sent them to
/// CloudWatch Logs again. Now it reads (read-only) where the script got
/// to, the further of its `states` key and its CSV's last line (the
/// script appends, then writes the key), and starts after it.
#[test]
fn a_first_start_after_active_users_py_appends_and_sends_no_window_twice() {
    let moto = common::moto::Moto::start();
    let pg = PgServer::start("xx-migrate");
    let mut gw = pg.gateway_db(PERIOD_MS);
    let now_e = now_ms() / PERIOD_MS;
    fill(&mut gw, now_e - 12..now_e + 1, 8);
    // The script completed epoch s; it died after appending s's lines and
    // before writing its key, which still says s - 1.
    let s = (now_ms() - 200) / PERIOD_MS - 1 - 2;
    gw.execute(
        "INSERT INTO states (key, value) VALUES ('ActiveUsersMonitoringScript', $1)",
        &[&(s - 1).to_string()],
    )
    .expect("script state");
    let dir = TempDir::new("xx-migrate");
    let mut script_csv = String::new();
    for e in s - 6..=s {
        for w in [1, 3] {
            if e % w == 0 {
                script_csv += &script_line(e, w, reference(&mut gw, e, w));
            }
        }
    }
    dir.write("active-users.csv", &script_csv);
    let secret = dir.write("aws-secret", "testing");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let cfg = gateway_files(
        &dir,
        pg.port,
        "pw-ro",
        &format!(
            r#"{source}csv_path = "active-users.csv"

[[sink]]
type = "cloudwatch_logs"
name = "logs"
log_group = "xxnetwork-active-users-mainnet"
endpoint = "http://127.0.0.1:{port}"
access_key_id = "testing"
secret_access_key_file = "aws-secret"
region = "us-west-1"
retry_initial_secs = 0.1
retry_max_secs = 0.5
"#,
            source = source(),
            port = moto.port
        ),
    );
    let (code, _, err) = edgemeter(&["check", "-c", cfg.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{err}");
    let mut agent = Agent::start_running(&cfg, "info");
    let au = dir.path("active-users.csv");
    assert!(
        common::wait_until(Duration::from_secs(30), || {
            csv_windows(&au).0.keys().any(|&(e, _)| e >= s + 4)
                && status(&cfg).contains("pending 0 records")
        }),
        "{}\n{}",
        status(&cfg),
        agent.stderr()
    );
    agent.stop();
    let log = agent.stderr();
    assert!(
        log.contains(&format!(
            "after active-users.py: it completed epoch {s} (the last line of {})",
            au.display()
        )),
        "{log}"
    );
    let text = std::fs::read_to_string(&au).expect("csv");
    assert!(
        text.starts_with(&script_csv),
        "the script's lines are kept as they were"
    );
    let (lines, twice) = csv_windows(&au);
    assert_eq!(twice, 0, "a window was appended twice:\n{text}");
    for (&(e, w), &n) in lines.range((s + 1, 0)..) {
        assert_eq!(n, reference(&mut gw, e, w), "line {e},{w}");
    }
    // CloudWatch Logs got the new lines only, each once.
    let events = moto.log_events(
        "xxnetwork-active-users-mainnet",
        "gw-node-1-active-users.csv",
    );
    let mut keys: Vec<(i64, i64)> = events
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].parse().expect("epoch"), f[1].parse().expect("window"))
        })
        .collect();
    assert!(
        keys.iter().all(|&(e, _)| e > s),
        "an event for the script's epochs: {events:?}"
    );
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "an event twice: {events:?}");
    assert_eq!(
        n,
        lines.range((s + 1, 0)..).count(),
        "one event per new line"
    );
}

/// Problems 5 and 6: a source stuck on a wrong password looked "running";
/// a password with YAML escapes was misread; the first start's failure
/// said it was "resuming from the last row read"; `check` read none of
/// the source's files.
#[test]
fn status_shows_a_failing_source_and_yaml_escapes_are_read_as_yaml() {
    let pg = PgServer::start("xx-status");
    let mut gw = pg.gateway_db(PERIOD_MS);
    gw.batch_execute(r#"ALTER ROLE ro PASSWORD 'pa"ss\w0rd'"#)
        .expect("password with a quote and a backslash");
    let now_e = now_ms() / PERIOD_MS;
    fill(&mut gw, now_e - 8..now_e, 5);
    let dir = TempDir::new("xx-status");
    let cfg = gateway_files(&dir, pg.port, "\"bad-pass-123\"", &source());
    let c = cfg.to_str().expect("utf-8");

    // check reads gateway.yaml and the node id file.
    dir.write("gateway-IDF.json", "{not json");
    let (code, _, err) = edgemeter(&["check", "-c", c]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("source `gateway`: node_id_file ") && err.contains("is not JSON"),
        "{err}"
    );
    dir.write("gateway-IDF.json", r#"{"id":"gw-node-1"}"#);
    let yaml = std::fs::read_to_string(dir.path("gateway.yaml")).expect("yaml");
    dir.write("gateway.yaml", &yaml.replace("dbName", "# dbName"));
    let (code, _, err) = edgemeter(&["check", "-c", c]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("gateway.yaml: no dbName"), "{err}");
    dir.write("gateway.yaml", &yaml);

    let mut agent = Agent::start_running(&cfg, "info");
    assert!(
        common::wait_until(Duration::from_secs(15), || status(&cfg)
            .contains("state      FAILING since")),
        "{}",
        status(&cfg)
    );
    let shown = status(&cfg);
    assert!(
        shown.contains("PostgreSQL refused the login ro@127.0.0.1")
            && !shown.contains("bad-pass-123"),
        "{shown}"
    );
    // The operator fixes the password the way the gateway's tools quote it.
    dir.write(
        "gateway.yaml",
        &yaml.replace("\"bad-pass-123\"", r#""pa\"ss\\w0rd""#),
    );
    assert!(
        common::wait_until(Duration::from_secs(20), || status(&cfg)
            .contains("lag        ")),
        "{}\n{}",
        status(&cfg),
        agent.stderr()
    );
    let shown = status(&cfg);
    agent.stop();
    let log = agent.stderr();
    assert!(shown.contains("state      reading ro@127.0.0.1"), "{shown}");
    assert!(
        shown.contains("(password: dbPassword), node gw-node-1"),
        "{shown}"
    );
    assert!(shown.contains("emitted    through epoch "), "{shown}");
    assert!(shown.contains("rows       "), "{shown}");
    assert!(
        !log.contains("resuming from the last row read"),
        "nothing was read yet:\n{log}"
    );
    assert!(
        !log.contains("w0rd"),
        "the password reached the log:\n{log}"
    );
    assert!(
        log.contains("reading the gateway database ro@127.0.0.1"),
        "{log}"
    );
}

/// Problem 6: the PostgreSQL environment (`PGPASSWORD`, `PGHOST`, …) is
/// honoured where the config gives no key, as libpq does.
#[test]
fn the_postgresql_environment_fills_what_the_config_leaves_out() {
    let pg = PgServer::start("xx-env");
    let mut gw = pg.gateway_db(PERIOD_MS);
    let now_e = now_ms() / PERIOD_MS;
    fill(&mut gw, now_e - 8..now_e, 5);
    let dir = TempDir::new("xx-env");
    dir.write("gateway-IDF.json", r#"{"id":"gw-node-1"}"#);
    let source = source().replace("gateway_config = \"gateway.yaml\"\n", "user = \"ro\"\n");
    let cfg = dir.write(
        "edgemeter.toml",
        &format!(
            "[agent]\nid = \"edge-1\"\nstate_dir = \"state\"\n\n{source}csv_path = \"au.csv\"\n"
        ),
    );
    let port = pg.port.to_string();
    let env = [
        ("PGHOST", "127.0.0.1"),
        ("PGPORT", port.as_str()),
        ("PGDATABASE", "cmix_gateway"),
        ("PGPASSWORD", "pw-ro"),
    ];
    let mut agent = Agent::start_with_env(&cfg, "info", &env);
    let au = dir.path("au.csv");
    assert!(
        common::wait_until(Duration::from_secs(20), || csv_windows(&au).0.len() >= 8),
        "{}",
        agent.stderr()
    );
    agent.stop();
    let log = agent.stderr();
    assert!(
        log.contains(&format!(
            "reading the gateway database ro@127.0.0.1:{port}/cmix_gateway (password: PGPASSWORD)"
        )),
        "{log}"
    );
}

/// A status file that cannot be written (a full disk, or something in its
/// way) failed at every poll, five a second here, and each failure was a
/// warning. Now it is said once a spell, and when it is written again; the
/// source goes on counting meanwhile. A disk that is nearly full fails one
/// write and not the next: each flap was two lines; the spell now ends
/// once no write failed for 10 s, so flaps are one spell.
#[test]
fn a_status_file_that_cannot_be_written_is_said_once_a_spell_though_it_comes_and_goes() {
    let pg = PgServer::start("xx-status-blocked");
    let mut gw = pg.gateway_db(PERIOD_MS);
    let now_e = now_ms() / PERIOD_MS;
    fill(&mut gw, now_e - 8..now_e, 5);
    let dir = TempDir::new("xx-status-blocked");
    let cfg = gateway_files(&dir, pg.port, "pw-ro", &source());
    let blocker = dir.path("state/source-gateway.status/in-the-way");
    std::fs::create_dir_all(&blocker).expect("a directory where the status file goes");
    let mut agent = Agent::start_running(&cfg, "info");
    let failing = "source-gateway.status";
    assert!(
        agent.wait_for_line(failing, Duration::from_secs(10)),
        "{}",
        agent.stderr()
    );
    std::thread::sleep(Duration::from_secs(3)); // fifteen polls
    let status_path = dir.path("state/source-gateway.status");
    std::fs::remove_dir_all(&status_path).expect("clear the way");
    // Free for a second, blocked for one, twice.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(1));
        // The agent may write the file between the two steps.
        let block = || {
            std::fs::remove_file(&status_path).ok();
            std::fs::create_dir_all(&blocker).is_ok()
        };
        assert!((0..10).any(|_| block()), "cannot block the status file");
        std::thread::sleep(Duration::from_secs(1));
        std::fs::remove_dir_all(&status_path).expect("clear the way");
    }
    assert!(
        agent.wait_for_line("written again, after", Duration::from_secs(25)),
        "{}",
        agent.stderr()
    );
    assert!(status(&cfg).contains("gw-node-1"), "{}", status(&cfg));
    agent.stop();
    let log = agent.stderr();
    let warned = log
        .lines()
        .filter(|l| l.contains(failing) && l.contains("[WARN]"))
        .count();
    assert_eq!(warned, 1, "said once:\n{log}");
    common::the_settled_end(&log, "written again");
}

/// The agent's state on a full disk while it reads a gateway (a tmpfs the
/// test fills): the source waits for commits that fail, and once there is
/// room every window reaches the script-format CSV once, each equal to
/// the script's SQL, with no epoch missing.
#[test]
fn a_full_disk_delays_windows_and_sends_none_twice_or_wrong() {
    let pg = PgServer::start("xx-full-disk");
    let mut gw = pg.gateway_db(PERIOD_MS);
    let now_e = now_ms() / PERIOD_MS;
    fill(&mut gw, now_e - 8..now_e + 8, 10);
    let dir = TempDir::new("xx-full-disk");
    let cfg = gateway_files(&dir, pg.port, "pw-ro", common::XX_SOURCE);
    let mut agent = Agent::start_on_small_disk(&cfg, "info", &dir.path("state"), 32);
    agent.expect_line("reading the gateway database", Duration::from_secs(15));
    let disk = common::SmallDisk::of(agent.pid(), &dir.path("state"));
    assert!(disk.fill() > 0, "the disk took nothing");
    agent.expect_line("(the disk is full)", Duration::from_secs(15));
    // Epochs end meanwhile (2 s each): their windows wait.
    std::thread::sleep(Duration::from_secs(5));
    disk.free();
    agent.expect_line("outbox writable again", Duration::from_secs(30));
    let csv = dir.path("active-users.csv");
    let last = now_ms() / PERIOD_MS - 1;
    assert!(
        common::wait_until(Duration::from_secs(15), || csv_windows(&csv)
            .0
            .contains_key(&(last, 1))),
        "no window of epoch {last}:\n{}",
        agent.stderr()
    );
    agent.stop();
    let (windows, twice) = csv_windows(&csv);
    assert_eq!(twice, 0, "a window written twice");
    let first = windows.keys().map(|k| k.0).min().expect("windows");
    for e in first..=last {
        assert!(
            windows.contains_key(&(e, 1)),
            "epoch {e} missing: {windows:?}"
        );
    }
    for (&(e, w), &n) in &windows {
        assert_eq!(n, reference(&mut gw, e, w), "epoch {e}, window {w}");
    }
}
