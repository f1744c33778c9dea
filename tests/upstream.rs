//! `edgemeter upstream` with real `edgemeter run` agents posting to it, on
//! SQLite and on one real PostgreSQL shared by two replicas: network-wide
//! distinct users, exactly-once ingest through lost acknowledgements, bad
//! tokens, bad input, queries, reports and rollups.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::http::{AckDropper, http, parse_response};
use common::pg::{PgServer, free_port};
use common::{Agent, TempDir, edgemeter, now_ms, rss_kib, wait_until};

const ADMIN: &str = "admin-secret-token";
/// Each agent: its id, its users (overlapping), its small exact users.
const AGENTS: [(&str, &str, &str); 3] = [
    ("a1", "0..3000", "0..10"),
    ("a2", "2000..5000", "5..15"),
    ("a3", "4000..7000", "10..20"),
];
const POINTS_PER_AGENT: usize = 300;

fn token_of(agent: &str) -> String {
    format!("token-of-{agent}-0123456789")
}

/// An upstream's config; `sinks` are appended (its forwarding).
fn upstream_config(
    dir: &TempDir,
    name: &str,
    port: u16,
    store: &str,
    extra: &str,
    sinks: &str,
) -> PathBuf {
    let tokens = dir.path("agents");
    std::fs::create_dir_all(&tokens).expect("tokens dir");
    for (a, _, _) in AGENTS {
        std::fs::write(tokens.join(format!("{a}.token")), token_of(a)).expect("token");
    }
    std::fs::write(tokens.join("a4.token"), token_of("a4")).expect("token");
    dir.write("admin.token", ADMIN);
    dir.write(
        &format!("{name}.toml"),
        &format!(
            r#"
[agent]
id = "{name}"
state_dir = "{state}"
flush_interval_secs = 0.05

[upstream]
listen = "127.0.0.1:{port}"
store = "{store}"
tokens_dir = "agents"
admin_token_file = "admin.token"
forward_interval_secs = 0.3
settle_secs = 3
{extra}
{sinks}
"#,
            state = dir.path(&format!("{name}-state")).display()
        ),
    )
}

/// An edge agent posting to `port` with `token`.
fn agent_config(
    dir: &TempDir,
    id: &str,
    port: u16,
    token: &str,
    users: &str,
    small: &str,
) -> PathBuf {
    dir.write(&format!("{id}.token"), token);
    dir.write(
        &format!("{id}.toml"),
        &format!(
            r#"
[agent]
id = "{id}"
state_dir = "{state}"
flush_interval_secs = 0.05

[[source]]
type = "synthetic"
name = "load"
metric = "synthetic"
rate_per_sec = 300
series = 3
limit = {POINTS_PER_AGENT}
users = "{users}"
users_window_secs = 1

[[source]]
type = "synthetic"
name = "small"
metric = "small"
rate_per_sec = 1
limit = 1
users = "{small}"
users_window_secs = 1

[[sink]]
type = "upstream"
endpoint = "http://127.0.0.1:{port}"
token_file = "{id}.token"
batch_max_records = 40
retry_initial_secs = 0.05
retry_max_secs = 0.5
"#,
            state = dir.path(&format!("{id}-state")).display()
        ),
    )
}

/// Agent `id` of [`agent_config`], its load source without a limit, so
/// that batches keep coming.
fn endless_agent_config(dir: &TempDir, id: &str, port: u16) -> PathBuf {
    let cfg = agent_config(dir, id, port, &token_of(id), "0..10", "0..1");
    let endless = std::fs::read_to_string(&cfg)
        .expect("the agent's config")
        .replace(&format!("limit = {POINTS_PER_AGENT}\n"), "");
    std::fs::write(&cfg, endless).expect("write the config");
    cfg
}

fn get_json(port: u16, path: &str) -> serde_json::Value {
    let (status, body) = http(port, "GET", path, Some(ADMIN), "", b"");
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

fn post_batch(port: u16, token: &str, json: &str) -> (u16, String) {
    http(
        port,
        "POST",
        "/v1/batches",
        Some(token),
        "content-encoding: gzip\r\ncontent-type: application/json\r\n",
        &gzip(json.as_bytes()),
    )
}

/// `n` points of `metric` from gateway `agent`, a second apart from `t0`,
/// each `value`: the `points` of a batch's JSON.
fn points_json(metric: &str, agent: &str, t0: i64, n: i64, value: i64) -> String {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"metric":"{metric}","dims":{{"gateway":"{agent}","window":"1s"}},"ts":{},"value":{value},"unit":"Count"}}"#,
                t0 + i * 1000
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Post batch `seq` of `agent`'s outbox `outbox` holding `points`; it must
/// be taken. The upstream's answer.
fn post_points(port: u16, agent: &str, outbox: &str, seq: i64, points: &str) -> serde_json::Value {
    let json = format!(
        r#"{{"v":1,"agent_id":"{agent}","outbox_id":"{outbox}","seq":{seq},"points":[{points}]}}"#
    );
    let (status, body) = post_batch(port, &token_of(agent), &json);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("a JSON answer")
}

/// The points of `metric` a csv sink wrote to `path` so far.
fn forwarded_points(path: &std::path::Path, metric: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!(",point,{metric},")))
        .count()
}

fn metric(port: u16, name: &str) -> f64 {
    let (status, text) = http(port, "GET", "/metrics", None, "", b"");
    assert_eq!(status, 200);
    text.lines()
        .filter(|l| l.starts_with(&format!("edgemeter_upstream_{name}")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Per-agent points of `synthetic`: agent → sorted values.
fn per_agent_values(port: u16) -> BTreeMap<String, Vec<i64>> {
    let doc = get_json(port, "/v1/series?metric=synthetic&agent=*&range=1D");
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in doc["rows"].as_array().expect("rows") {
        out.entry(r["agent"].as_str().expect("agent").to_owned())
            .or_default()
            .push(r["value"].as_f64().expect("value") as i64);
    }
    out.values_mut().for_each(|v| v.sort());
    out
}

/// Network-wide rows of `metric` where all three agents reported.
fn full_windows(port: u16, metric: &str) -> Vec<serde_json::Value> {
    let doc = get_json(port, &format!("/v1/series?metric={metric}&range=1D"));
    doc["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["agents"] == 3)
        .cloned()
        .collect()
}

/// What every store must answer after the three agents ran: checked the
/// same way for SQLite and for the PostgreSQL replicas.
fn check_network_answers(port: u16) {
    // Exactly once: each agent's points, values 0..N each once.
    let values = per_agent_values(port);
    let want: Vec<i64> = (0..POINTS_PER_AGENT as i64).collect();
    for (a, _, _) in AGENTS {
        assert_eq!(
            values.get(a),
            Some(&want),
            "agent {a}'s points, each exactly once"
        );
    }
    assert!(
        !values.contains_key("a4"),
        "the agent with a bad token stored nothing"
    );

    // Small sets: exact union.
    let small = full_windows(port, "small_active_users");
    assert!(!small.is_empty(), "no window with all three agents");
    for r in &small {
        assert_eq!(r["value"], 20.0, "ids 0..20, each once: {r}");
        assert_eq!(r["how"], "union");
        assert_eq!(r["dims"], serde_json::json!({"window": "1s"}));
    }
    // Large sets: HyperLogLog within 2 %, while the sum is 28.6 % off.
    let big = full_windows(port, "synthetic_active_users");
    assert!(!big.is_empty());
    for r in &big {
        let v = r["value"].as_f64().expect("value");
        assert!(
            (v - 7000.0).abs() / 7000.0 < 0.02,
            "union {v} is not within 2 % of 7000"
        );
    }
    let ts = big[0]["ts"].as_i64().expect("ts");
    let per_agent = get_json(
        port,
        "/v1/series?metric=synthetic_active_users&agent=*&range=1D",
    );
    let sum: f64 = per_agent["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["ts"] == ts)
        .map(|r| r["value"].as_f64().expect("value"))
        .sum();
    assert!(
        (sum - 9000.0).abs() < 9000.0 * 0.02,
        "the per-agent sum is about 9000, got {sum}"
    );
}

fn start_agents(dir: &TempDir, ports: [u16; 3], bad_port: u16) -> Vec<Agent> {
    let mut agents = Vec::new();
    for ((id, users, small), port) in AGENTS.iter().zip(ports) {
        let c = agent_config(dir, id, port, &token_of(id), users, small);
        agents.push(Agent::start_running(&c, "info"));
    }
    let bad = agent_config(dir, "a4", bad_port, "not-the-right-token", "0..10", "0..1");
    agents.push(Agent::start_running(&bad, "info"));
    agents
}

fn wait_for_all_points(port: u16) {
    assert!(
        wait_until(Duration::from_secs(60), || {
            let v = per_agent_values(port);
            AGENTS
                .iter()
                .all(|(a, _, _)| v.get(*a).is_some_and(|x| x.len() >= POINTS_PER_AGENT))
                && full_windows(port, "small_active_users").len() >= 2
        }),
        "the agents' points did not all arrive: {:?}",
        per_agent_values(port)
            .iter()
            .map(|(a, v)| (a.clone(), v.len()))
            .collect::<Vec<_>>()
    );
}

#[test]
fn agents_with_overlapping_users_are_counted_once_and_resends_stored_once() {
    let dir = TempDir::new("upstream-sqlite");
    let port = free_port();
    let forwarded = dir.path("forwarded.csv");
    let up_cfg = upstream_config(
        &dir,
        "up",
        port,
        "sqlite",
        "",
        &format!(
            "[[sink]]\ntype = \"csv\"\npath = \"{}\"\n",
            forwarded.display()
        ),
    );
    let mut up = Agent::start_upstream(&up_cfg, "info", &[]);
    // a1's first three acknowledgements are lost on the way back.
    let dropper = AckDropper::start(port, 3);
    let mut agents = start_agents(&dir, [dropper.port, port, port], port);
    wait_for_all_points(port);
    check_network_answers(port);
    assert_eq!(*dropper.dropped.lock().expect("dropped"), 3);
    assert!(
        metric(port, "batches_duplicate_total") >= 3.0,
        "the resends after lost acknowledgements were recognised"
    );

    // The bad token: refused, counted, logged without the token, and the
    // agent keeps its records and says why.
    assert!(metric(port, "auth_failures_total") >= 1.0);
    up.expect_line("missing or wrong token", Duration::from_secs(5));
    assert!(!up.stderr().contains("not-the-right-token"));
    let (_, status, _) = edgemeter(&["status", "-c", dir.path("a4.toml").to_str().expect("utf8")]);
    assert!(status.contains("refused our token"), "{status}");

    // The aggregate went through the upstream's own sink: no agent dim.
    assert!(wait_until(Duration::from_secs(20), || {
        // A window forwarded after all three agents were up (earlier
        // windows rightly have fewer users).
        std::fs::read_to_string(&forwarded)
            .is_ok_and(|t| t.contains(",point,small_active_users,window=1s,20,"))
    }));
    let csv = std::fs::read_to_string(&forwarded).expect("forwarded");
    // Each forwarded value is the network value the store holds for that
    // window (a window before every agent was up has fewer users, rightly).
    let by_time = values_by_time(port, "/v1/series?metric=small_active_users&range=1D");
    let small: Vec<&str> = csv
        .lines()
        .filter(|l| l.contains(",point,small_active_users,"))
        .collect();
    assert!(small.iter().any(|l| l.contains(",window=1s,20,")), "{csv}");
    for line in &small {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(
            cells[5], "window=1s",
            "no edge dims in the aggregate: {line}"
        );
        assert_eq!(
            Some(&cells[6].parse::<f64>().expect("value")),
            by_time.get(cells[2]),
            "{line}"
        );
    }

    // Events: a hand-made batch with two of alice's, found and deleted.
    let ev = |t: i64| {
        format!(
            r#"{{"type":"analytics","dims":{{"stream":"spin30"}},"ts":{t},"payload":{{"user":"alice","t":{t}}}}}"#
        )
    };
    let now = common::now_ms();
    let events = format!(
        r#"{{"v":1,"agent_id":"a1","outbox_id":"manual","seq":1,"events":[{},{}]}}"#,
        ev(now - 2),
        ev(now - 1)
    );
    assert_eq!(post_batch(port, &token_of("a1"), &events).0, 200);
    let found = get_json(port, "/v1/events?user=alice&range=1D");
    assert_eq!(
        found["events"].as_array().expect("events").len(),
        2,
        "{found}"
    );
    let (status, body) = http(port, "DELETE", "/v1/users/alice", Some(ADMIN), "", b"");
    assert_eq!(
        (status, body.trim()),
        (200, r#"{"deleted_events":2,"user":"alice"}"#)
    );
    let after = get_json(port, "/v1/events?user=alice&range=1D");
    assert!(after["events"].as_array().expect("events").is_empty());
    assert_eq!(
        http(port, "GET", "/v1/series?metric=x", None, "", b"").0,
        401,
        "queries need the admin token"
    );

    for a in &mut agents {
        a.stop();
    }
    // `report` from the local store gives what the API gives.
    let cfg = up_cfg.to_str().expect("utf8");
    let (code, local, err) = edgemeter(&[
        "report",
        "-c",
        cfg,
        "--metric",
        "small_active_users",
        "--range",
        "1D",
        "--format",
        "csv",
    ]);
    assert_eq!(code, 0, "{err}");
    let (_, remote) = http(
        port,
        "GET",
        "/v1/series?metric=small_active_users&range=1D&format=csv",
        Some(ADMIN),
        "",
        b"",
    );
    assert_eq!(local, remote);
    assert!(
        local.starts_with("time,agent,window,value,unit,agents,how\n"),
        "{local}"
    );
    let url = format!("http://127.0.0.1:{port}");
    let admin_file = dir.path("admin.token");
    let (code, via_url, err) = edgemeter(&[
        "report",
        "--url",
        &url,
        "--token-file",
        admin_file.to_str().expect("utf8"),
        "--metric",
        "small_active_users",
        "--range",
        "1D",
        "--format",
        "csv",
    ]);
    assert_eq!((code, via_url.as_str()), (0, local.as_str()), "{err}");

    // Rollups: today's totals, twice, the same.
    let today = common::today();
    let (code, first, err) = edgemeter(&["upstream", "rollup", "-c", cfg, "--date", &today]);
    assert_eq!(code, 0, "{err}");
    let (_, second, _) = edgemeter(&["upstream", "rollup", "-c", cfg, "--date", &today]);
    assert_eq!(first, second, "a rollup run twice gives the same totals");
    let small_line = first
        .lines()
        .find(|l| l.contains(",small_active_users,"))
        .unwrap_or_else(|| panic!("{first}"));
    assert!(
        small_line.ends_with(",1s,union,20,") || small_line.contains(",union,20,"),
        "{small_line}"
    );
    // The points: one total per series (dims series=0..2), summing to every
    // value each agent sent, once.
    let total: f64 = first
        .lines()
        .filter(|l| l.contains(",synthetic,"))
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            let how = cells.iter().position(|c| *c == "sum").expect("a sum");
            cells[how + 1].parse::<f64>().expect("value")
        })
        .sum();
    let want: f64 = (0..POINTS_PER_AGENT).map(|v| v as f64).sum::<f64>() * 3.0;
    assert_eq!(total, want, "{first}");
    up.stop();
}

/// The rows of a `/v1/series` answer as time → value.
fn values_by_time(port: u16, query: &str) -> BTreeMap<String, f64> {
    get_json(port, query)["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["time"].as_str().expect("time").to_owned(),
                r["value"].as_f64().expect("value"),
            )
        })
        .collect()
}

/// The config line that names the password `ups_store` wrote.
const UPS_PASSWORD_FILE: &str = "store_password_file = \"db.password\"";

/// A database `ups` owned by a login role `ups` on `pg`, its password in
/// `dir`'s `db.password`: returns the store URL an upstream is given.
fn ups_store(pg: &PgServer, dir: &TempDir) -> String {
    let mut su = pg.superuser("postgres");
    su.batch_execute("CREATE ROLE ups LOGIN PASSWORD 'pw-ups'")
        .expect("create role");
    su.batch_execute("CREATE DATABASE ups OWNER ups")
        .expect("create database");
    dir.write("db.password", "pw-ups\n");
    format!("postgres://ups@127.0.0.1:{}/ups", pg.port)
}

#[test]
fn two_replicas_on_one_postgresql_store_each_batch_once() {
    let pg = PgServer::start("upstream-replicas");
    let dir = TempDir::new("upstream-pg");
    let store = ups_store(&pg, &dir);
    let extra = UPS_PASSWORD_FILE;
    let (p1, p2) = (free_port(), free_port());
    // Each replica forwards through its own csv sink: a window goes out
    // through exactly one of them.
    let sink = |name: &str| {
        let path = dir.path(&format!("forwarded-{name}.csv"));
        let toml = format!("[[sink]]\ntype = \"csv\"\npath = \"{}\"\n", path.display());
        (path, toml)
    };
    let ((f1, s1), (f2, s2)) = (sink("r1"), sink("r2"));
    let c1 = upstream_config(&dir, "r1", p1, &store, extra, &s1);
    let c2 = upstream_config(&dir, "r2", p2, &store, extra, &s2);
    let mut r1 = Agent::start_upstream(&c1, "info", &[]);
    let mut r2 = Agent::start_upstream(&c2, "info", &[]);
    // a1 through a dropper in front of r1; a2 to r2; a3 to r1.
    let dropper = AckDropper::start(p1, 2);
    let mut agents = start_agents(&dir, [dropper.port, p2, p1], p2);

    // One batch posted to both replicas at once, ten times each.
    let now = common::now_ms();
    let json = format!(
        r#"{{"v":1,"agent_id":"a2","outbox_id":"race","seq":1,"points":[{{"metric":"race","dims":{{}},"ts":{now},"value":1,"unit":"Count"}}]}}"#
    );
    let racers: Vec<_> = (0..20)
        .map(|i| {
            let json = json.clone();
            let port = if i % 2 == 0 { p1 } else { p2 };
            std::thread::spawn(move || post_batch(port, &token_of("a2"), &json))
        })
        .collect();
    for r in racers {
        let (status, body) = r.join().expect("racer");
        assert_eq!(status, 200, "{body}");
    }
    let race = get_json(p1, "/v1/series?metric=race&range=1D");
    assert_eq!(
        race["rows"][0]["value"], 1.0,
        "stored once across both replicas: {race}"
    );

    wait_for_all_points(p1);
    check_network_answers(p1);
    check_network_answers(p2);
    // Both replicas answer alike.
    let q = "/v1/series?metric=small_active_users&range=1D";
    let (a, b) = (get_json(p1, q), get_json(p2, q));
    assert_eq!(a["rows"], b["rows"], "the replicas share one store");
    let dup = metric(p1, "batches_duplicate_total") + metric(p2, "batches_duplicate_total");
    assert!(
        dup >= 19.0 + 2.0,
        "19 racing copies and 2 resends were duplicates, got {dup}"
    );

    // Forwarded on PostgreSQL: the union of the agents' sketches, each
    // window by one replica only, at the value the store holds.
    let forwarded = || {
        let mut by_time: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for f in [&f1, &f2] {
            for line in std::fs::read_to_string(f).unwrap_or_default().lines() {
                let cells: Vec<&str> = line.split(',').collect();
                if cells.get(4) == Some(&"small_active_users") && cells[3] == "point" {
                    by_time
                        .entry(cells[2].to_owned())
                        .or_default()
                        .push(cells[6].parse().expect("value"));
                }
            }
        }
        by_time
    };
    assert!(
        wait_until(Duration::from_secs(30), || forwarded()
            .values()
            .any(|v| v == &[20.0])),
        "a window with all three agents forwarded: {:?}",
        forwarded()
    );
    let stored = values_by_time(p1, q);
    for (time, values) in forwarded() {
        assert_eq!(values.len(), 1, "{time} forwarded once, not {values:?}");
        assert_eq!(Some(&values[0]), stored.get(&time), "{time}");
    }
    for a in &mut agents {
        a.stop();
    }
    r1.stop();
    r2.stop();
}

#[test]
fn bad_input_gets_a_clear_4xx_stores_nothing_and_others_are_served() {
    let dir = TempDir::new("upstream-bad");
    let port = free_port();
    let cfg = upstream_config(
        &dir,
        "up",
        port,
        "sqlite",
        "header_timeout_secs = 1\nmax_body_bytes = 1048576\nmax_connections = 6",
        "",
    );
    let mut up = Agent::start_upstream(&cfg, "info", &[]);
    let token = token_of("a1");
    let ok = |rest: &str| format!(r#"{{"v":1,"agent_id":"a1","outbox_id":"o","seq":1{rest}}}"#);
    let gz = gzip(ok(r#","points":[{"metric":"m","ts":1,"value":1,"unit":"Count"}]"#).as_bytes());
    let check = |label: &str, (status, body): (u16, String), want_status: u16, want: &str| {
        assert_eq!(status, want_status, "{label}: {body}");
        assert!(body.contains(want), "{label}: {body} lacks {want}");
        let (h, health) = http(port, "GET", "/health", None, "", b"");
        assert_eq!(h, 200, "after {label} the server still serves: {health}");
        assert!(
            health.contains(r#""batches":0"#),
            "after {label} nothing is stored: {health}"
        );
    };
    let post =
        |headers: &str, body: &[u8]| http(port, "POST", "/v1/batches", Some(&token), headers, body);
    let gzh = "content-encoding: gzip\r\n";
    check(
        "truncated gzip",
        post(gzh, &gz[..gz.len() - 12]),
        400,
        "not valid gzip",
    );
    check("not gzip", post(gzh, b"{\"v\":1}"), 400, "not valid gzip");
    check(
        "wrong shape",
        post(gzh, &gzip(b"{\"v\":1,\"agent_id\":\"a1\",\"seq\":\"x\"}")),
        400,
        "not an upstream batch",
    );
    check(
        "not JSON",
        post(gzh, &gzip(b"hello")),
        400,
        "not an upstream batch",
    );
    check(
        "a future version",
        post(gzh, &gzip(br#"{"v":7}"#)),
        400,
        "batch version 7 is not supported",
    );
    let mut env = vec![b'E', b'M', b'S', b'K', 9, 1];
    env.extend_from_slice(&[0; 10]);
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&env);
    check(
        "unknown sketch version",
        post(
            gzh,
            &gzip(
                ok(&format!(
                    r#","sketches":[{{"metric":"m","ts":1,"unit":"Count","sketch":"{b64}"}}]"#
                ))
                .as_bytes(),
            ),
        ),
        422,
        "unsupported sketch: version 9",
    );
    check(
        "another agent's id",
        post_batch(port, &token_of("a2"), &ok("")),
        403,
        "belongs to agent `a2`",
    );
    check(
        "no token",
        http(port, "POST", "/v1/batches", None, gzh, &gz),
        401,
        "bearer token",
    );
    check(
        "a wrong token",
        http(port, "POST", "/v1/batches", Some("guess"), gzh, &gz),
        401,
        "bearer token",
    );
    // (This helper always sends a content-length: with transfer-encoding
    // that is the request-smuggling pattern, a 400; chunked alone is a 411.)
    check(
        "chunked beside a length",
        post("transfer-encoding: chunked\r\n", b""),
        400,
        "together",
    );
    check(
        "chunked",
        raw_request(
            port,
            format!("POST /v1/batches HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n").as_bytes(),
        ),
        411,
        "content-length",
    );
    check(
        "a zip bomb",
        post(gzh, &gzip(&vec![b' '; 80 << 20])),
        413,
        "unpacks to more than",
    );

    // A giant body is refused from its header, before it is sent.
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(format!("POST /v1/batches HTTP/1.1\r\nauthorization: Bearer {token}\r\ncontent-length: 104857600\r\n\r\n").as_bytes())
        .expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    check("giant body", parse_response(&out), 413, "max_body_bytes");

    // Slow loris: a header dribbled a byte at a time is cut at 1 s, and the
    // server answers others meanwhile.
    let mut loris = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    loris
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let started = Instant::now();
    let mut answer = Vec::new();
    for b in b"POST /v1/batches HTTP/1.1\r\nhost: a-very-slow-peer.example\r\n"
        .iter()
        .take(40)
    {
        if loris.write_all(&[*b]).is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        if let Ok(n) = loris.read(&mut buf) {
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || !answer.is_empty() {
                break;
            }
        }
        if started.elapsed() > Duration::from_millis(300)
            && started.elapsed() < Duration::from_millis(400)
        {
            let (h, _) = http(port, "GET", "/health", None, "", b"");
            assert_eq!(h, 200, "others are served while the loris dribbles");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut rest = Vec::new();
    loris
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = loris.read_to_end(&mut rest);
    answer.extend(rest);
    let elapsed = started.elapsed();
    check("slow loris", parse_response(&answer), 408, "took too long");
    assert!(elapsed < Duration::from_secs(4), "cut after {elapsed:?}");

    // Connections past max_connections get a 503 and are closed.
    let idle: Vec<TcpStream> = (0..6)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut out = Vec::new();
    let _ = extra.read_to_end(&mut out);
    assert_eq!(parse_response(&out).0, 503);
    drop(idle);
    assert!(wait_until(Duration::from_secs(5), || health_ok(port)));
    assert!(metric(port, "connections_refused_total") >= 1.0);
    assert!(metric(port, r#"connections_closed_total{how="header_timeout"}"#) >= 1.0);

    // The 401s made one log line, not one per request, and no token (the
    // test's reader thread may still be behind the process: wait for it).
    up.expect_line("missing or wrong token", Duration::from_secs(5));
    let log = up.stderr();
    assert_eq!(log.matches("missing or wrong token").count(), 1, "{log}");
    assert!(!log.contains("guess"), "{log}");
    // `run` on an aggregator's config says what to run instead.
    let (code, _, err) = edgemeter(&["run", "-c", cfg.to_str().expect("utf8")]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("start the aggregator with `edgemeter upstream`"),
        "{err}"
    );
    // And after all that, a good batch is taken.
    assert_eq!(post_batch(port, &token, &ok("")).0, 200);
    up.stop();
}

#[test]
fn tls_upstream_takes_batches_from_an_agent_that_trusts_its_certificate() {
    let dir = TempDir::new("upstream-tls");
    let port = free_port();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    dir.write("cert.pem", &ck.cert.pem());
    dir.write("key.pem", &ck.signing_key.serialize_pem());
    let cfg = upstream_config(
        &dir,
        "up",
        port,
        "sqlite",
        "tls_cert_file = \"cert.pem\"\ntls_key_file = \"key.pem\"",
        "",
    );
    let mut up = Agent::start_upstream(&cfg, "info", &[]);
    assert!(
        up.stderr().contains(&format!("https://127.0.0.1:{port}")),
        "{}",
        up.stderr()
    );
    // The agent trusts the certificate through ca_file.
    let a1 = agent_config(&dir, "a1", port, &token_of("a1"), "0..10", "0..3");
    let text = std::fs::read_to_string(&a1)
        .expect("config")
        .replace(
            &format!("http://127.0.0.1:{port}"),
            &format!("https://localhost:{port}"),
        )
        .replace(
            "token_file = \"a1.token\"",
            "token_file = \"a1.token\"\nca_file = \"cert.pem\"",
        );
    std::fs::write(&a1, text).expect("config");
    // a2 does not, and must not get through.
    let a2 = agent_config(&dir, "a2", port, &token_of("a2"), "0..10", "0..3");
    let text = std::fs::read_to_string(&a2).expect("config").replace(
        &format!("http://127.0.0.1:{port}"),
        &format!("https://localhost:{port}"),
    );
    std::fs::write(&a2, text).expect("config");
    let mut agents = [
        Agent::start_running(&a1, "info"),
        Agent::start_running(&a2, "info"),
    ];

    // Plain HTTP to the TLS port gets nowhere and stores nothing.
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.write_all(b"GET /health HTTP/1.1\r\nconnection: close\r\n\r\n");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(
        !out.starts_with(b"HTTP/1.1 200"),
        "plain HTTP was served on the TLS port"
    );

    let admin = dir.path("admin.token");
    let cfg_s = cfg.to_str().expect("utf8");
    let count = || {
        let (code, out, _) = edgemeter(&[
            "report",
            "-c",
            cfg_s,
            "--metric",
            "synthetic",
            "--agent",
            "*",
            "--format",
            "csv",
        ]);
        assert_eq!(code, 0);
        out.lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap_or("").to_owned())
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(30), || count()
            .iter()
            .filter(|a| *a == "a1")
            .count()
            == POINTS_PER_AGENT),
        "a1's points did not arrive over TLS"
    );
    assert!(
        !count().iter().any(|a| a == "a2"),
        "a2 does not trust the certificate"
    );
    let (_, status, _) = edgemeter(&["status", "-c", a2.to_str().expect("utf8")]);
    assert!(
        status.to_lowercase().contains("certificate"),
        "a2 says why: {status}"
    );
    let _ = admin;
    for a in &mut agents {
        a.stop();
    }
    up.stop();
}

/// A tree: two upstreams, each with its own edges, forward to a third. The
/// top counts each user once across both subtrees, because the middle ones
/// forward their merged sketches, not just their counts.
#[test]
fn upstreams_form_a_tree_and_the_top_unions_the_subtrees() {
    let dir = TempDir::new("upstream-tree");
    let (top, m1, m2) = (free_port(), free_port(), free_port());
    let top_cfg = upstream_config(&dir, "top", top, "sqlite", "", "");
    // The middle upstreams post as agents `m1` and `m2`.
    for m in ["m1", "m2"] {
        std::fs::write(dir.path("agents").join(format!("{m}.token")), token_of(m)).expect("token");
        dir.write(&format!("{m}-up.token"), &token_of(m));
    }
    let sink = |m: &str| {
        format!(
            "[[sink]]\ntype = \"upstream\"\nendpoint = \"http://127.0.0.1:{top}\"\ntoken_file = \"{m}-up.token\"\nretry_initial_secs = 0.05\nretry_max_secs = 0.5\n"
        )
    };
    let c1 = upstream_config(&dir, "m1", m1, "sqlite", "", &sink("m1"));
    let c2 = upstream_config(&dir, "m2", m2, "sqlite", "", &sink("m2"));
    let mut ups = [
        Agent::start_upstream(&top_cfg, "info", &[]),
        Agent::start_upstream(&c1, "info", &[]),
        Agent::start_upstream(&c2, "info", &[]),
    ];
    // a1 (ids 0..10) under m1; a2 (5..15) and a3 (10..20) under m2.
    let mut agents = Vec::new();
    for ((id, users, small), port) in AGENTS.iter().zip([m1, m2, m2]) {
        let c = agent_config(&dir, id, port, &token_of(id), users, small);
        agents.push(Agent::start_running(&c, "info"));
    }
    // Windows the top has from both middles: the union of all three agents.
    let both = || -> Vec<serde_json::Value> {
        get_json(top, "/v1/series?metric=small_active_users&range=1D")["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .filter(|r| r["agents"] == 2)
            .cloned()
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(60), || both()
            .iter()
            .any(|r| r["value"] == 20.0)),
        "the top never had a window from both subtrees: {}",
        get_json(top, "/v1/series?metric=small_active_users&range=1D")
    );
    let m2_rows = get_json(m2, "/v1/series?metric=small_active_users&range=1D");
    for r in both() {
        let ts = r["ts"].as_i64().expect("ts");
        // Only windows every agent had reached their middle before it settled.
        let m2_value = m2_rows["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .find(|x| x["ts"] == ts)
            .map(|x| x["value"].as_f64().expect("value"));
        if m2_value == Some(15.0) {
            assert_eq!(r["value"], 20.0, "0..10 ∪ 5..20 = 0..20, each once: {r}");
            assert_eq!(r["how"], "union");
        }
    }
    assert!(
        both().iter().any(|r| r["value"] == 20.0),
        "no window where the top saw all 20 users: {:?}",
        both()
    );
    for a in &mut agents {
        a.stop();
    }
    for u in &mut ups {
        u.stop();
    }
}

/// Send `raw` on a fresh connection and read the answer; (status, body).
/// SIGTERM with an agent's kept-alive connection idle and another agent's
/// batch half sent. The upstream waits for the batch: the rest of its body
/// comes 300 ms after the signal, and it is answered and stored. It does
/// not wait for the idle connection: with only that one open, every stop
/// took the whole second the wait allows (1,009 ms in the demo).
#[test]
fn sigterm_waits_for_a_batch_in_flight_and_not_for_idle_connections() {
    let dir = TempDir::new("upstream-sigterm");
    let port = free_port();
    let cfg = upstream_config(&dir, "ups", port, "sqlite", "", "");
    let stopped_in = |log: &str| -> u64 {
        let line = log
            .lines()
            .find(|l| l.contains("stopped cleanly in "))
            .unwrap_or_else(|| panic!("no clean stop:\n{log}"));
        let ms = line.split("stopped cleanly in ").nth(1).unwrap();
        ms.trim_end_matches(" ms").parse().unwrap()
    };
    let idle = || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
        let mut got = [0u8; 4096];
        let n = s.read(&mut got).unwrap();
        assert!(
            got[..n].starts_with(b"HTTP/1.1 200"),
            "kept alive after /health"
        );
        s
    };

    // Only an idle connection open: no wait for it.
    let mut ups = Agent::start_upstream(&cfg, "info", &[]);
    let kept = idle();
    ups.stop();
    let ms = stopped_in(&ups.stderr());
    assert!(ms < 800, "the stop waited for an idle connection: {ms} ms");
    drop(kept);

    // A batch half sent when the signal comes is waited for and stored.
    let mut ups = Agent::start_upstream(&cfg, "info", &[]);
    let kept = idle();
    let json = format!(
        r#"{{"v":1,"agent_id":"a1","outbox_id":"o1","seq":1,"points":[{}]}}"#,
        points_json("m", "a1", now_ms() - 60_000, 5, 1)
    );
    let body = gzip(json.as_bytes());
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /v1/batches HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-encoding: gzip\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        token_of("a1"),
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let half = body.len() / 2;
    s.write_all(&body[..half]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    ups.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(&body[half..]).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let (status, answer) = parse_response(&out);
    assert_eq!(
        (status, answer.contains(r#""stored":5"#)),
        (200, true),
        "{answer}"
    );
    let status = ups.wait_exit(Duration::from_secs(5)).expect("exits");
    assert!(status.success(), "{}", ups.stderr());
    drop(kept);
    // Stored: the next start has it.
    let _ups = Agent::start_upstream(&cfg, "info", &[]);
    let stored = get_json(port, "/v1/series?metric=m&range=1D")["rows"]
        .as_array()
        .expect("rows")
        .len();
    assert_eq!(stored, 5);
}

fn raw_request(port: u16, raw: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(raw).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_response(&out)
}

/// The upstream's resident set, and its peak, in KiB.
/// Regressions of issue 13, each as the attacker or the long-running site
/// met it, through the real binary while a good agent delivers:
/// 1. 150 peers without a token each announcing a 7 MiB body took the
///    upstream from 8 to 1,064 MiB: the body was read before the token was
///    checked (and `100 Continue` promised before it).
/// 2. Two `Content-Length`s that differ, `+5`, and `Transfer-Encoding` with
///    `Content-Length` were accepted: the request-smuggling pattern.
/// 3. Connections that send nothing held every slot for the idle timeout.
/// 4. An event payload 100,000 levels deep was stored, and came back from
///    `/v1/events` as a string.
/// 5. Bodies across connections had no common bound.
#[test]
fn hostile_peers_cost_no_memory_before_their_token_is_checked() {
    let dir = TempDir::new("upstream-hostile");
    let port = free_port();
    let cfg = upstream_config(
        &dir,
        "up",
        port,
        "sqlite",
        "header_timeout_secs = 1\nidle_timeout_secs = 60\nmax_connections = 24\n\
         max_body_bytes = 8388608\nmax_buffered_bytes = 16777216",
        "",
    );
    let mut up = Agent::start_upstream(&cfg, "info", &[]);
    let pid = up.pid();
    let (rss_before, _) = rss_kib(pid);

    // A good agent posts throughout (60 points/s for 5 s).
    let a1 = agent_config(&dir, "a1", port, &token_of("a1"), "0..50", "0..5");
    let text = std::fs::read_to_string(&a1)
        .expect("config")
        .replace("rate_per_sec = 300", "rate_per_sec = 60");
    std::fs::write(&a1, text).expect("config");
    let mut agent = Agent::start_running(&a1, "info");

    // 1. No token, 7 MiB announced: 401 from the head, before any body.
    let attack_started = Instant::now();
    let attackers: Vec<_> = (0..6)
        .map(|t| {
            std::thread::spawn(move || {
                let mut answered = 0;
                for i in 0..25 {
                    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                        continue;
                    };
                    s.set_read_timeout(Some(Duration::from_secs(5)))
                        .expect("timeout");
                    let token = if (t + i) % 2 == 0 {
                        String::new()
                    } else {
                        "authorization: Bearer a-guess\r\n".to_owned()
                    };
                    let head = format!(
                        "POST /v1/batches HTTP/1.1\r\nhost: x\r\n{token}content-length: 7340032\r\n\r\n"
                    );
                    if s.write_all(head.as_bytes()).is_err() {
                        continue;
                    }
                    // The answer comes before a byte of the body was sent.
                    let mut first = [0u8; 12];
                    if s.read_exact(&mut first).is_ok() && &first[9..12] == b"401" {
                        answered += 1;
                    }
                    // Then the body anyway, as an attacker would.
                    let chunk = vec![b'x'; 1 << 20];
                    for _ in 0..7 {
                        if s.write_all(&chunk).is_err() {
                            break;
                        }
                    }
                }
                answered
            })
        })
        .collect();
    let answered: usize = attackers
        .into_iter()
        .map(|t| t.join().expect("attacker"))
        .sum();
    assert_eq!(
        answered, 150,
        "every tokenless request got 401 from its head"
    );
    assert!(attack_started.elapsed() < Duration::from_secs(60));
    let (rss_after, peak) = rss_kib(pid);
    // Without the fix the peak was over 1 GiB; the bound leaves room for
    // the good agent's batches and SQLite's cache in a debug build.
    assert!(
        peak < rss_before + 32 * 1024,
        "peak RSS {peak} KiB after 150 x 7 MiB unauthenticated bodies (before: {rss_before} KiB, now {rss_after} KiB)"
    );

    // `Expect: 100-continue` without a token: 401, never `100 Continue`.
    let (status, body) = raw_request(
        port,
        b"POST /v1/batches HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 5000000\r\n\r\n",
    );
    assert_eq!(status, 401, "{body}");

    // 2. Strict framing.
    let token = token_of("a1");
    let ok = r#"{"v":1,"agent_id":"a1","outbox_id":"manual","seq":1,"points":[{"metric":"m","ts":1,"value":1,"unit":"Count"}]}"#;
    let with_head = |lengths: &str, body: &[u8]| {
        let mut req = format!(
            "POST /v1/batches HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n{lengths}connection: close\r\n\r\n"
        )
        .into_bytes();
        req.extend_from_slice(body);
        raw_request(port, &req)
    };
    let n = ok.len();
    for (label, lengths, want) in [
        (
            "two content-lengths that differ",
            format!("content-length: {n}\r\ncontent-length: {}\r\n", n + 1),
            "differ",
        ),
        (
            "a signed length",
            format!("content-length: +{n}\r\n"),
            "not a number",
        ),
        (
            "transfer-encoding beside content-length",
            format!("transfer-encoding: chunked\r\ncontent-length: {n}\r\n"),
            "together",
        ),
    ] {
        let (status, body) = with_head(&lengths, ok.as_bytes());
        assert_eq!(status, 400, "{label}: {body}");
        assert!(body.contains(want), "{label}: {body}");
    }
    let (status, body) = http(
        port,
        "GET",
        "/v1/series?metric=m&agent=a1&range=30D",
        Some(ADMIN),
        "",
        b"",
    );
    assert_eq!(status, 200);
    assert!(body.contains(r#""rows":[]"#), "nothing stored: {body}");
    // Two identical lengths are one.
    let (status, body) = with_head(
        &format!("content-length: {n}\r\ncontent-length: {n}\r\n"),
        ok.as_bytes(),
    );
    assert_eq!(status, 200, "identical lengths: {body}");

    // 4. Event payloads nested too deep are refused; the deepest allowed
    // comes back from /v1/events as JSON.
    let event = |seq: i64, depth: usize| {
        let payload = "[".repeat(depth) + &"]".repeat(depth);
        format!(
            r#"{{"v":1,"agent_id":"a1","outbox_id":"manual","seq":{seq},"events":[{{"type":"deep","ts":{now},"payload":{payload}}}]}}"#,
            now = common::now_ms()
        )
    };
    let (status, body) = post_batch(port, &token, &event(2, 100_000));
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("deeper than 64"), "{body}");
    let (status, body) = post_batch(port, &token, &event(3, 64));
    assert_eq!(status, 200, "{body}");
    let events = get_json(port, "/v1/events?range=1D");
    let deep: Vec<_> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == "deep")
        .collect();
    assert_eq!(deep.len(), 1, "{events}");
    assert!(
        deep[0]["payload"].is_array(),
        "payload is JSON: {}",
        deep[0]
    );

    // The good agent delivered everything, and never met a 503.
    assert!(
        wait_until(Duration::from_secs(30), || {
            per_agent_values(port)
                .get("a1")
                .is_some_and(|v| v.len() >= POINTS_PER_AGENT)
        }),
        "the good agent's points did not all arrive"
    );
    assert_eq!(
        per_agent_values(port)["a1"],
        (0..POINTS_PER_AGENT as i64).collect::<Vec<_>>()
    );
    assert_eq!(
        metric(port, r#"requests_total{route="/v1/batches",status="503"}"#),
        0.0
    );
    agent.stop();

    // 3. 24 connections that send nothing are closed after the header
    // timeout (1 s), not the idle timeout (60 s): the server is free again.
    let silent: Vec<TcpStream> = (0..24)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || health_ok(port)),
        "silent connections still hold every slot"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(silent);

    // 5. One budget for bodies: two stalled 7 MiB bodies (authenticated)
    // hold 14 of the 16 MiB; a third is answered 503 at once, unread.
    let stalled: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.write_all(
                format!(
                    "POST /v1/batches HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-length: 7340032\r\n\r\nxx"
                )
                .as_bytes(),
            )
            .expect("write");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = raw_request(
        port,
        format!(
            "POST /v1/batches HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-length: 7340032\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("max_buffered_bytes"), "{body}");
    assert!(metric(port, "buffered_bytes ") >= 14_680_064.0);
    drop(stalled);
    assert!(wait_until(Duration::from_secs(5), || metric(
        port,
        "buffered_bytes "
    ) == 0.0));
    let (status, body) = post_batch(port, &token, &ok.replace(r#""seq":1"#, r#""seq":9"#));
    assert_eq!(status, 200, "served again once the budget is free: {body}");
    up.stop();
}

/// Whether a new connection is served `/health` within 2 s.
fn health_ok(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port))
        .and_then(|mut s| {
            s.write_all(b"GET /health HTTP/1.1\r\nconnection: close\r\n\r\n")?;
            let mut o = Vec::new();
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let _ = s.read_to_end(&mut o);
            Ok(o.starts_with(b"HTTP/1.1 200"))
        })
        .unwrap_or(false)
}

/// Issue 18: points are stored per series. A PostgreSQL store written by
/// an upstream before that (every point carrying its series' columns) is
/// moved by the first upstream that connects, in the schema's transaction,
/// and every answer is as before; the next start moves nothing.
#[test]
fn a_postgresql_store_from_before_series_is_moved_and_answers_the_same() {
    let pg = PgServer::start("upstream-move");
    let dir = TempDir::new("upstream-move");
    let store = ups_store(&pg, &dir);
    let mut old = pg.connect("ups", "pw-ups", "ups");
    old.batch_execute(
        "CREATE TABLE points (metric TEXT NOT NULL, net TEXT NOT NULL, ts BIGINT NOT NULL,
             agent TEXT NOT NULL, dims TEXT NOT NULL, value DOUBLE PRECISION NOT NULL,
             unit TEXT NOT NULL);
         CREATE INDEX points_by_time ON points (metric, ts);",
    )
    .expect("the layout before series");
    let now = common::now_ms();
    let (t1, t2) = (now - 120_000, now - 60_000);
    let rows: [(&str, i64, f64); 4] = [
        ("a1", t1, 3.0),
        ("a2", t1, 4.0),
        ("a1", t2, 5.0),
        ("a1", t2, 6.0),
    ];
    for (agent, ts, v) in rows {
        let dims = format!(r#"{{"gateway":"{agent}","window":"30m"}}"#);
        old.execute(
            "INSERT INTO points VALUES ('moved', '{\"window\":\"30m\"}', $1, $2, $3, $4, 'Count')",
            &[&ts, &agent, &dims, &v],
        )
        .expect("old row");
    }
    drop(old);

    let port = free_port();
    let cfg = upstream_config(&dir, "r1", port, &store, UPS_PASSWORD_FILE, "");
    let answers = |port: u16| {
        let net = get_json(port, "/v1/series?metric=moved&range=1D");
        let own = get_json(port, "/v1/series?metric=moved&range=1D&agent=*");
        (net["rows"].clone(), own["rows"].clone())
    };
    let mut up = Agent::start_upstream(&cfg, "info", &[]);
    assert!(
        wait_until(Duration::from_secs(20), || health_ok(port)),
        "the upstream came up: {}",
        up.stderr()
    );
    let (net, own) = answers(port);
    let sums: Vec<(i64, f64, i64)> = net
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["ts"].as_i64().unwrap_or_default(),
                r["value"].as_f64().unwrap_or_default(),
                r["agents"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(sums, [(t1, 7.0, 2), (t2, 11.0, 1)], "{net}");
    let mut values: Vec<(String, f64)> = own
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["agent"].as_str().unwrap_or("").to_owned(),
                r["value"].as_f64().unwrap_or(-1.0),
            )
        })
        .collect();
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(
        values,
        [
            ("a1".into(), 3.0),
            ("a1".into(), 5.0),
            ("a1".into(), 6.0),
            ("a2".into(), 4.0)
        ],
        "{own}"
    );
    assert!(
        up.stderr()
            .contains("moving points to per-series rows (once)"),
        "{}",
        up.stderr()
    );
    up.stop();

    let mut again = Agent::start_upstream(&cfg, "info", &[]);
    assert!(
        wait_until(Duration::from_secs(20), || health_ok(port)),
        "restarted"
    );
    assert_eq!(
        answers(port),
        (net, own),
        "the same answers after a restart"
    );
    assert!(
        !again.stderr().contains("moving points"),
        "moved once: {}",
        again.stderr()
    );
    again.stop();
    let mut c = pg.connect("ups", "pw-ups", "ups");
    let series: i64 = c
        .query_one("SELECT COUNT(*) FROM series", &[])
        .expect("count")
        .get(0);
    assert_eq!(series, 2, "a1's and a2's series, each once");
}

/// With PostgreSQL and a sink: a batch of old points queues its windows
/// (checked and queued in a few statements, not two per window), the
/// windows are forwarded once, and a later batch for the same windows is
/// stored, counted late and not forwarded again.
#[test]
fn late_batches_on_postgresql_are_stored_counted_late_and_forwarded_once() {
    let pg = PgServer::start("upstream-late");
    let dir = TempDir::new("upstream-late");
    let store = ups_store(&pg, &dir);
    let port = free_port();
    let forwarded = dir.path("forwarded.csv");
    let cfg = upstream_config(
        &dir,
        "r1",
        port,
        &store,
        UPS_PASSWORD_FILE,
        &format!(
            "[[sink]]\ntype = \"csv\"\npath = \"{}\"\n",
            forwarded.display()
        ),
    );
    let mut up = Agent::start_upstream(&cfg, "info", &[]);
    assert!(
        wait_until(Duration::from_secs(20), || health_ok(port)),
        "the upstream came up: {}",
        up.stderr()
    );
    // 300 windows, ten minutes old (settled): more than one statement's worth.
    let t0 = (common::now_ms() - 600_000) / 1000 * 1000;
    let post = |agent: &str, value: i64| {
        let points = points_json("late", agent, t0, 300, value);
        post_points(port, agent, "late", 1, &points);
    };
    post("a1", 2);
    let lines = || forwarded_points(&forwarded, "late");
    assert!(
        wait_until(Duration::from_secs(30), || lines() == 300),
        "every window forwarded once: {} lines; {}",
        lines(),
        up.stderr()
    );
    assert_eq!(metric(port, "records_late_total"), 0.0);
    post("a2", 3);
    assert_eq!(
        metric(port, "records_late_total"),
        300.0,
        "a2's points are late"
    );
    std::thread::sleep(Duration::from_secs(2)); // two forwarding rounds
    assert_eq!(lines(), 300, "nothing forwarded twice");
    let sums = get_json(port, "/v1/series?metric=late&range=1D");
    let rows = sums["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 300);
    assert!(
        rows.iter().all(|r| r["value"] == 5.0),
        "late points are in queries: {sums}"
    );
    up.stop();
}

/// Retention as an operator turns it on: an upstream that kept everything
/// is restarted with `retention_days`. At start it rolls up and deletes the
/// days older than that (their daily totals stay), and records for those
/// days that arrive afterwards are dropped and counted, never stored or
/// forwarded a second time.
#[test]
fn retention_deletes_old_days_at_start_keeps_their_totals_and_forwards_nothing_twice() {
    const DAY: i64 = 86_400_000;
    let dir = TempDir::new("upstream-retention");
    let port = free_port();
    let forwarded = dir.path("forwarded.csv");
    let sink = format!(
        "[[sink]]\ntype = \"csv\"\npath = \"{}\"\n",
        forwarded.display()
    );
    let now = common::now_ms();
    let old = (now - 10 * DAY) / DAY * DAY + 3_600_000;
    let recent = (now - 600_000) / 1000 * 1000;
    let points = |t0: i64| points_json("kept", "a1", t0, 5, 2);
    let post = |seq: i64, points: String| post_points(port, "a1", "keep", seq, &points);
    let lines = || forwarded_points(&forwarded, "kept");
    let start = |extra: &str| {
        let cfg = upstream_config(&dir, "r1", port, "sqlite", extra, &sink);
        let up = Agent::start_upstream(&cfg, "info", &[]);
        assert!(
            wait_until(Duration::from_secs(20), || health_ok(port)),
            "the upstream came up: {}",
            up.stderr()
        );
        (up, cfg)
    };

    // Kept forever: ten days ago and ten minutes ago, both forwarded.
    let (mut up, _) = start("");
    assert!(get_json(port, "/health")["raw_data_from"].is_null());
    post(1, format!("{},{}", points(old), points(recent)));
    assert!(
        wait_until(Duration::from_secs(30), || lines() == 10),
        "every window forwarded: {} lines; {}",
        lines(),
        up.stderr()
    );
    up.stop();

    let (mut up, cfg) = start("retention_days = 3");
    assert!(
        wait_until(Duration::from_secs(20), || metric(
            port,
            "records_pruned_total"
        ) == 5.0),
        "the old day's five points deleted at start: {}",
        up.stderr()
    );
    let old_day = get_json(port, "/v1/rollups?range=30D&format=json")["rollups"]
        .as_array()
        .expect("rollups")
        .iter()
        .filter(|r| r["metric"] == "kept")
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(old_day.len(), 1, "the old day's total: {old_day:?}");
    assert_eq!(old_day[0]["value"], 10.0);
    // Rolling that day up again by hand keeps the total (there is no data
    // left to recompute it from) and says so.
    let day = old_day[0]["day"].as_str().expect("day").to_owned();
    let cfg = cfg.to_str().expect("a UTF-8 path");
    let (code, out, err) = edgemeter(&["upstream", "rollup", "-c", cfg, "--date", &day]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(",kept,") && out.contains(",10,"), "{out}");
    assert!(err.contains("older than retention_days"), "{err}");
    let again = get_json(port, "/v1/rollups?range=30D&format=json");
    let kept = again["rollups"].as_array().expect("rollups");
    assert!(
        kept.iter()
            .any(|r| r["metric"] == "kept" && r["value"] == 10.0),
        "{again}"
    );
    let series = get_json(port, "/v1/series?metric=kept&range=30D&format=json");
    let times: Vec<i64> = series["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["ts"].as_i64().expect("ts"))
        .collect();
    assert_eq!(times, (0..5).map(|i| recent + i * 1000).collect::<Vec<_>>());

    let line = (now - 3 * DAY) / DAY * DAY;
    assert_eq!(
        get_json(port, "/health")["raw_data_from"].as_str(),
        Some(day_name(line).as_str()),
        "/health says where the kept raw data starts"
    );

    // The dashboard says why a range reaching back past the line has no
    // windows there.
    let page = signed_in(port);
    let note = "are deleted (<code>retention_days</code>)";
    for path in ["/?metric=kept&range=30D", "/relay?range=30D"] {
        assert!(page(path).contains(note), "{path}");
    }
    assert!(
        !page("/relay?range=1D").contains(note),
        "1D is within the retention"
    );

    // The old day again, as a new batch: dropped and counted.
    let answer = post(2, points(old));
    assert_eq!(
        (answer["stored"].as_i64(), answer["expired"].as_i64()),
        (Some(0), Some(5))
    );
    assert_eq!(metric(port, "records_expired_total"), 5.0);
    std::thread::sleep(Duration::from_secs(2)); // several forwarding rounds
    assert_eq!(lines(), 10, "nothing forwarded twice");
    let log = up.stderr();
    assert!(
        log.contains("(retention_days = 3): 5 points, 0 sketches, 0 events")
            && log.contains("dropped 5 record(s) older than retention_days"),
        "{log}"
    );
    up.stop();
}

/// A `Store` of its own on the PostgreSQL database [`ups_store`] made, as
/// a replica opens one (no sink configured: forwarding is driven by hand).
/// Signs in to the upstream's dashboard with the admin token; the pages,
/// each asserted to answer 200.
fn signed_in(port: u16) -> impl Fn(&str) -> String {
    let addr = ([127, 0, 0, 1], port).into();
    let form = format!("token={ADMIN}&next=%2F");
    let (code, head, _) = common::http_exchange(
        addr,
        &format!(
            "POST /sign-in HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{form}",
            form.len()
        ),
    );
    assert_eq!(code, 303, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie:")
                .then(|| l[11..].trim())
        })
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_owned();
    move |path: &str| {
        let (code, _, body) = common::http_exchange(
            addr,
            &format!(
                "GET {path} HTTP/1.1\r\nhost: x\r\ncookie: {cookie}\r\nconnection: close\r\n\r\n"
            ),
        );
        assert_eq!(code, 200, "{path}: {body}");
        body
    }
}

fn pg_store(url: &str) -> edgemeter::upstream::store::Store {
    use edgemeter::upstream::{config::DEFAULT_EDGE_DIMS, db, store::Store};
    let db = db::Postgres::new(url, Some("pw-ups".to_owned())).expect("a URL");
    let edge = DEFAULT_EDGE_DIMS.iter().map(|s| s.to_string()).collect();
    Store::new(Box::new(db), edge, 0)
}

/// Batch `seq` of agent `a1`: `n` points of `metric` for one series, a
/// second apart from `t0`, so `n` windows; as the upstream decodes it.
fn one_series_batch(metric: &str, seq: i64, t0: i64, n: i64, now: i64) -> edgemeter::wire::Batch {
    use edgemeter::record::{Dims, Record};
    let records: Vec<Record> = (0..n)
        .map(|k| {
            Record::point(
                metric.to_owned(),
                Dims::new([("series", "s")]),
                t0 + k * 1000,
                1.0,
                "Count",
            )
        })
        .collect();
    let key = edgemeter::wire::Key {
        agent_id: "a1",
        outbox_id: metric,
        seq,
    };
    edgemeter::wire::decode(edgemeter::wire::encode(&key, &records).as_bytes(), now)
        .expect("decodes")
}

/// Two replicas claim the same windows at the same moment on one PostgreSQL
/// store, round after round: each window is won by exactly one of them.
/// (A claim is `INSERT … ON CONFLICT DO NOTHING RETURNING` in a transaction;
/// the replica that loses a row waits for the winner's commit and gets
/// nothing back for it.) The end-to-end replica test rarely races for one
/// window, because a claim also empties `pending`; here both claim from the
/// same list, 300 groups a round, more than one statement's worth.
#[test]
fn replicas_claiming_the_same_windows_at_once_on_postgresql_win_each_once() {
    use std::collections::BTreeSet;

    let pg = PgServer::start("upstream-claims");
    let dir = TempDir::new("upstream-claims");
    let url = ups_store(&pg, &dir);
    let (mut a, mut b) = (pg_store(&url), pg_store(&url));
    let now = common::now_ms();
    let (rounds, per_round) = (4, 300);
    let batch = one_series_batch("race", 1, now - 3_600_000, (rounds * per_round) as i64, now);
    a.ingest(&[&batch], now).expect("ingest");
    let all = a.settled(now, 10_000).expect("settled");
    assert_eq!(all.len(), rounds * per_round);

    let (mut won_a, mut won_b) = (BTreeSet::new(), BTreeSet::new());
    let mut contested = 0;
    for round in all.chunks(per_round) {
        let start = std::sync::Arc::new(std::sync::Barrier::new(2));
        let (groups, go) = (round.to_vec(), start.clone());
        let other = std::thread::spawn(move || {
            go.wait();
            let won = b.claim(groups, "up-b", now).expect("claim b");
            (b, won)
        });
        start.wait();
        let mine = a.claim(round.to_vec(), "up-a", now).expect("claim a");
        let (back, theirs) = other.join().expect("replica b");
        b = back;
        let (mine, theirs): (BTreeSet<_>, BTreeSet<_>) =
            (mine.into_iter().collect(), theirs.into_iter().collect());
        assert!(mine.is_disjoint(&theirs), "a window won twice");
        assert_eq!(
            mine.union(&theirs).count(),
            round.len(),
            "every window won once"
        );
        contested += usize::from(!mine.is_empty() && !theirs.is_empty());
        won_a.extend(mine);
        won_b.extend(theirs);
    }
    // What each replica still owes its sinks is exactly what it won.
    assert_eq!(
        a.unsent("up-a")
            .expect("unsent")
            .into_iter()
            .collect::<BTreeSet<_>>(),
        won_a
    );
    assert_eq!(
        b.unsent("up-b")
            .expect("unsent")
            .into_iter()
            .collect::<BTreeSet<_>>(),
        won_b
    );
    eprintln!(
        "claims: a won {}, b won {}; {contested} of {rounds} rounds split between them",
        won_a.len(),
        won_b.len()
    );
}

/// Regression (the PostgreSQL soak with a sink, 2026-12-03: `DELETE FROM
/// pending` took 30 to 380 ms for 256 windows). `pending` is a queue: its
/// rows are deleted as fast as they come, so ANALYZE can find its pages
/// with no live row in them, and PostgreSQL then takes the table for one
/// row whatever it holds. To unqueue the windows a claim won, it compared
/// every queued row with every claimed window (a nested-loop semi join:
/// 479,104 comparisons for 2,000 queued rows). Each claimed window must be
/// looked up by its key whatever the statistics say. The server's
/// `auto_explain` logs each statement's real plan; the test reads it.
#[test]
fn unqueueing_claimed_windows_on_postgresql_looks_each_up_whatever_the_statistics_say() {
    let pg = PgServer::start_with(
        "upstream-unqueue",
        "-c session_preload_libraries=auto_explain -c auto_explain.log_min_duration=0 \
         -c auto_explain.log_analyze=on",
    );
    let dir = TempDir::new("upstream-unqueue");
    let url = ups_store(&pg, &dir);
    let mut store = pg_store(&url);
    let now = common::now_ms();
    let queued = 20_000;
    let batch_of = |seq, t0| one_series_batch("unqueue", seq, t0, queued, now);
    // A queue that was full and then emptied, analyzed in that moment: its
    // pages are there, no row is live.
    store
        .ingest(&[&batch_of(1, now - 2 * queued * 1000)], now)
        .expect("ingest");
    let mut su = pg.superuser("ups");
    su.batch_execute(
        "ALTER TABLE pending SET (autovacuum_enabled = false); \
         DELETE FROM pending; ANALYZE pending;",
    )
    .expect("an emptied queue, analyzed");
    let (tuples, pages): (f32, i32) = su
        .query_one(
            "SELECT reltuples, relpages FROM pg_class WHERE relname = 'pending'",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .expect("pg_class");
    assert!(
        tuples == 0.0 && pages > 40,
        "{tuples} rows on {pages} pages"
    );
    // Full again; the statistics still say empty.
    store
        .ingest(&[&batch_of(2, now - queued * 1000 - 60_000)], now)
        .expect("ingest");
    let first = store.settled(now, 256).expect("settled");
    assert_eq!(first.len(), 256);
    let won = store.claim(first.clone(), "up", now).expect("claim");
    assert_eq!(won, first, "one replica wins every window");

    // The plan of the statement that unqueued them, as it ran: the log
    // entry after its query text, up to the next entry's timestamp.
    let log = std::fs::read_to_string(pg.dir.join("log")).expect("the server's log");
    const UNQUEUE: &str = "Query Text: DELETE FROM pending";
    let at = log.find(UNQUEUE).expect("the unqueue's plan logged");
    assert!(!log[at + 1..].contains(UNQUEUE), "one unqueue statement");
    let plan = log[at..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with(|c: char| c.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("the unqueue's plan, as it ran:\n{plan}");
    let compared: u64 = plan
        .lines()
        .filter_map(|l| l.split_once("Rows Removed by ").map(|(_, rest)| rest))
        .filter_map(|rest| rest.rsplit(": ").next()?.trim().parse::<u64>().ok())
        .sum();
    assert!(
        compared <= 2 * 256,
        "unqueueing 256 of {queued} queued windows passed over {compared} rows"
    );
    // And the windows left the queue; the others are still in it.
    let left: i64 = su
        .query_one("SELECT COUNT(*) FROM pending", &[])
        .expect("count")
        .get(0);
    assert_eq!(left, queued - 256);
}

/// Retention on one PostgreSQL store shared by replicas: two prune the same
/// old days at the same moment. Each day's data is deleted once and its
/// total computed from all of it: the second replica waits on the advisory
/// lock, finds the day empty and leaves the total alone (were it replaced
/// by a total of nothing, the day would read 0).
#[test]
fn replicas_pruning_one_postgresql_store_at_once_keep_each_days_total() {
    const DAY: i64 = 86_400_000;
    let pg = PgServer::start("upstream-retention");
    let dir = TempDir::new("upstream-retention-pg");
    let url = ups_store(&pg, &dir);
    let (mut a, mut b) = (pg_store(&url), pg_store(&url));
    let now = common::now_ms();
    let days: Vec<i64> = [10, 9, 8]
        .into_iter()
        .map(|d| (now - d * DAY) / DAY * DAY)
        .collect();
    for (seq, &day) in days.iter().enumerate() {
        let batch = one_series_batch("aged", seq as i64 + 1, day + 3_600_000, 50, now);
        a.ingest(&[&batch], now).expect("ingest");
    }
    let recent = one_series_batch("aged", 9, now - 600_000, 5, now);
    a.ingest(&[&recent], now).expect("ingest");
    a.set_retention(Some(3));
    b.set_retention(Some(3));

    // Both replicas find the oldest day, then wait for its lock, which the
    // test holds until both wait: the second to get it finds the day empty.
    let mut holder = pg.superuser("ups");
    let mut held = holder.transaction().expect("begin");
    held.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&edgemeter::upstream::store::PRUNE_LOCK],
    )
    .expect("the pruning lock");
    let replica_b = std::thread::spawn(move || b.prune(now, usize::MAX).expect("prune b"));
    let replica_a = std::thread::spawn(move || {
        let p = a.prune(now, usize::MAX).expect("prune a");
        (a, p)
    });
    let waiting = || {
        pg.superuser("ups")
            .query_one(
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                &[],
            )
            .expect("pg_locks")
            .get::<_, i64>(0)
    };
    assert!(
        wait_until(Duration::from_secs(20), || waiting() == 2),
        "both replicas wait for the lock"
    );
    held.commit().expect("release the lock");
    let (mut a, mine) = replica_a.join().expect("replica a");
    let theirs = replica_b.join().expect("replica b");
    eprintln!("replica a pruned {mine:?}; replica b {theirs:?}");
    assert_eq!(
        mine.points + theirs.points,
        150,
        "each old point deleted once"
    );
    let mut pruned: Vec<String> = mine.days.iter().chain(&theirs.days).cloned().collect();
    pruned.sort();
    let names: Vec<String> = days.iter().map(|&d| day_name(d)).collect();
    assert_eq!(pruned, names, "each day deleted by one replica");
    let totals = a.rollups(&names[0], &names[2]).expect("rollups");
    let aged: Vec<(String, f64)> = totals
        .into_iter()
        .filter(|r| r.metric == "aged")
        .map(|r| (r.day, r.value))
        .collect();
    assert_eq!(
        aged,
        names.iter().map(|n| (n.clone(), 50.0)).collect::<Vec<_>>(),
        "each day's total, from all of its points"
    );
    assert_eq!(
        a.sizes().expect("sizes")["points"],
        5,
        "the recent points stay"
    );
    // A late batch for a deleted day is dropped.
    let late = one_series_batch("aged", 10, days[0] + 7_200_000, 3, now);
    let done = a.ingest(&[&late], now).expect("ingest");
    assert_eq!((done[0].records, done[0].expired), (0, 3));
}

/// `YYYY-MM-DD` of a time in ms (UTC).
fn day_name(ms: i64) -> String {
    edgemeter::clock::day(ms)
}

/// PostgreSQL's half of `pruning_and_rollup_statements_reach_their_rows_by_an_index`
/// (`src/upstream/tests.rs`, SQLite's plans): pruning and rollups run these
/// per day or per metric, so on a store of a year a statement without an
/// index path would read the year each time. The planner here has
/// sequential scans turned off and plans each statement generically (the
/// values unknown): it takes a `Seq Scan` only where no index can serve.
#[test]
fn pruning_and_rollup_statements_have_an_index_path_on_postgresql() {
    use edgemeter::upstream::{db::dollar_params, store::indexed_statements};
    let pg = PgServer::start("upstream-prune-plans");
    let dir = TempDir::new("upstream-prune-plans");
    let url = ups_store(&pg, &dir);
    let mut store = pg_store(&url);
    // The schema is made on first use.
    store.sizes().expect("the store's tables");
    let mut su = pg.superuser("ups");
    su.batch_execute("SET enable_seqscan = off; SET plan_cache_mode = force_generic_plan")
        .expect("planner settings");
    let statements = indexed_statements();
    assert!(statements.len() >= 10, "{statements:?}");
    for (i, sql) in statements.iter().enumerate() {
        let sql = dollar_params(sql);
        su.batch_execute(&format!("PREPARE s{i} AS {sql}"))
            .unwrap_or_else(|e| panic!("{e}\n{sql}"));
        let params = (1..=9)
            .take_while(|k| sql.contains(&format!("${k}")))
            .count();
        let args = match params {
            0 => String::new(),
            n => format!("({})", vec!["NULL"; n].join(", ")),
        };
        let plan: Vec<String> = su
            .query(&format!("EXPLAIN EXECUTE s{i}{args}"), &[])
            .expect("explain")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(
            !plan.iter().any(|step| step.contains("Seq Scan")),
            "{sql}\n{}",
            plan.join("\n")
        );
    }
    pg.stop();
}

/// The upstream's PostgreSQL goes away while agents post: every batch is
/// answered 503 and sent again once it is back, so nothing is lost or
/// stored twice. Each refused batch was an error line of its own (one per
/// agent's retry, several a second for as long as the database was down:
/// 34 in 3 s here), and so were each failed round of forwarding and each
/// dashboard query; the log now says each when it begins, every ten
/// minutes while it lasts, and when it works again.
#[test]
fn a_postgresql_store_that_goes_away_loses_nothing_and_is_said_once() {
    let pg = PgServer::start("upstream-pg-away");
    let dir = TempDir::new("upstream-pg-away");
    let store = ups_store(&pg, &dir);
    let port = free_port();
    let forwarded = dir.path("forwarded.csv");
    let sink = format!(
        "[[sink]]\ntype = \"csv\"\npath = \"{}\"\n",
        forwarded.display()
    );
    let cfg = upstream_config(&dir, "up", port, &store, UPS_PASSWORD_FILE, &sink);
    let mut up = Agent::start_upstream(&cfg, "info", &[]);
    // The database goes away before the agents post anything.
    pg.stop();
    let mut agents = start_agents(&dir, [port, port, port], port);
    let refused = || metric(port, "store_errors_total");
    assert!(
        wait_until(Duration::from_secs(20), || refused() >= 10.0),
        "batches refused while the database is away: {}\n{}",
        refused(),
        up.stderr()
    );
    // A dashboard's queries meanwhile: 503, said once.
    for _ in 0..3 {
        let path = "/v1/series?metric=synthetic&agent=*&range=1D";
        let (status, body) = http(port, "GET", path, Some(ADMIN), "", b"");
        assert_eq!(status, 503, "{body}");
    }
    std::thread::sleep(Duration::from_secs(2));
    pg.start_again();
    wait_for_all_points(port);
    check_network_answers(port);
    // Forwarding's spell ends once no round failed for 10 s.
    for back in [
        "the store takes batches again",
        "forwarding aggregates works again",
    ] {
        assert!(
            up.wait_for_line(back, Duration::from_secs(25)),
            "{back}:\n{}",
            up.stderr()
        );
    }
    for a in &mut agents {
        a.stop();
    }
    up.stop();
    let log = up.stderr();
    assert_eq!(
        log.matches("could not store a batch").count(),
        1,
        "said once, not for each of {} batches:\n{log}",
        refused()
    );
    let again = log
        .lines()
        .find(|l| l.contains("the store takes batches again"))
        .expect("said when it is back");
    assert!(again.contains(" were refused over "), "{again}");
    assert_eq!(log.matches("a query failed").count(), 1, "{log}");
    assert!(
        log.contains("queries are answered again, after 3 failed over "),
        "{log}"
    );
    // Forwarding (every 0.3 s) failed through the outage, said once too.
    assert_eq!(log.matches("forwarding aggregates: ").count(), 1, "{log}");
    assert_eq!(
        log.matches("forwarding aggregates works again, after ")
            .count(),
        1,
        "{log}"
    );
}

/// An upstream out of file descriptors (a peer holding many connections,
/// or a low `LimitNOFILE`) fails every accept until one is freed, tried
/// every 0.1 s: each failure was an error line, ten a second. Now it is
/// said once, with a reminder every ten minutes, and when connections are
/// accepted again; and it serves again as soon as descriptors are free.
#[test]
fn an_upstream_out_of_file_descriptors_says_so_once_and_serves_again() {
    let dir = TempDir::new("upstream-nofile");
    let port = free_port();
    let cfg = upstream_config(&dir, "up", port, "sqlite", "", "");
    let mut up = Agent::start_upstream(&cfg, "info", &[]);
    assert!(health_ok(port));
    let listening = format!("the upstream on 127.0.0.1:{port}");
    common::starve_and_recover(&up, port, &listening, || health_ok(port));
    up.stop();
    let log = up.stderr();
    assert_eq!(
        log.matches("accepting a connection failed").count(),
        1,
        "said once:\n{log}"
    );
    assert!(log.contains("Too many open files"), "{log}");
}

/// The upstream's SQLite store on a full disk (a tmpfs the test fills):
/// every batch is answered 503, nothing of it stored, so its agent sends
/// it again; the log says so once, and once when the store takes batches
/// again. Sent again after space returns, each batch is stored once. A
/// disk that fills again soon after (a nearly full one takes one batch and
/// not the next) was a spell of its own, two more lines each time: the
/// spell now ends once no batch failed for 10 s, or at a stop after one
/// that was stored.
#[test]
fn an_upstream_on_a_full_disk_answers_503_and_stores_each_batch_once_when_space_returns() {
    let dir = TempDir::new("upstream-full-disk");
    let port = free_port();
    let cfg = upstream_config(&dir, "up", port, "sqlite", "", "");
    let state = dir.path("up-state");
    let mut up = Agent::on_small_disk(common::EXEC, "upstream", &cfg, "info", &state, 32);
    up.expect_line("upstream listening on", Duration::from_secs(15));
    let t0 = (now_ms() / 1000 - 600) * 1000;
    let batch = |seq: i64| {
        let points = points_json("m", "a1", t0 + seq * 100_000, 100, 1);
        format!(r#"{{"v":1,"agent_id":"a1","outbox_id":"o","seq":{seq},"points":[{points}]}}"#)
    };
    assert_eq!(
        post_points(port, "a1", "o", 1, &points_json("m", "a1", t0, 100, 1))["stored"],
        100
    );
    let disk = common::SmallDisk::of(up.pid(), &state);
    assert!(disk.fill() > 0, "the disk took nothing");
    for seq in 2..12 {
        let (status, body) = post_batch(port, &token_of("a1"), &batch(seq));
        assert_eq!(status, 503, "seq {seq}: {body}");
        assert!(body.contains("was not stored"), "{body}");
    }
    // The store still reads: /health said 200 ok.
    let (status, body) = http(port, "GET", "/health", None, "", b"");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("store refuses batches") && body.contains("full"),
        "{body}"
    );
    disk.free();
    for seq in 2..12 {
        let (status, body) = post_batch(port, &token_of("a1"), &batch(seq));
        assert_eq!(status, 200, "seq {seq}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(
            (answer["stored"].as_i64(), answer["duplicate"].as_bool()),
            (Some(100), Some(false)),
            "{body}"
        );
    }
    assert_eq!(http(port, "GET", "/health", None, "", b"").0, 200);
    // Sent a third time (an acknowledgement lost), a batch is a duplicate.
    let (status, body) = post_batch(port, &token_of("a1"), &batch(2));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""duplicate":true"#), "{body}");
    // Full again a moment later: the same spell.
    assert!(disk.fill() > 0, "the disk took nothing");
    for seq in 12..14 {
        assert_eq!(post_batch(port, &token_of("a1"), &batch(seq)).0, 503);
    }
    disk.free();
    for seq in 12..14 {
        assert_eq!(post_batch(port, &token_of("a1"), &batch(seq)).0, 200);
    }
    up.stop();
    let log = up.stderr();
    assert_eq!(log.matches("could not store a batch").count(), 1, "{log}");
    let back: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("the store takes batches again"))
        .collect();
    assert_eq!(back.len(), 1, "one spell:\n{log}");
    assert!(back[0].contains(": 12 were refused over "), "{log}");
}

/// A Raspberry Pi without network time keeps the clock it booted with,
/// days off, and everything its agent records is stamped with it. Nothing
/// said so. The agent now reads the clock in its upstream's answers (their
/// `Date`): it says once that its clock is off, by how much and what to do;
/// `status` shows it; and once the clock is set right, it says that once.
/// The agent runs with a clock three days behind (libfaketime), then set
/// right while it runs.
#[test]
fn an_agent_whose_clock_is_off_says_so_once_and_when_it_agrees_again() {
    let dir = TempDir::new("upstream-clock");
    let port = free_port();
    let ucfg = upstream_config(&dir, "up", port, "sqlite", "", "");
    let mut up = Agent::start_upstream(&ucfg, "info", &[]);
    let cfg = endless_agent_config(&dir, "a1", port);
    let clock = common::FakeClock::new(&dir, "-3d");
    let env = clock.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let status = |json: bool| {
        let mut c = std::process::Command::new(common::BIN);
        c.args(["status", "-c"]).arg(&cfg).envs(env.iter().copied());
        if json {
            c.arg("--json");
        }
        let out = c.output().expect("run edgemeter status");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let offset = || -> Option<i64> {
        let s: serde_json::Value = serde_json::from_str(&status(true)).expect("status --json");
        s["sinks"][0]["peer_clock_offset_ms"].as_i64()
    };
    let mut agent = Agent::start_with_env(&cfg, "info", &env);
    agent.expect_line(
        "sink `upstream`: this machine's clock is 3d 0h behind the receiver's",
        Duration::from_secs(15),
    );
    // Many more deliveries while it is off: said once.
    assert!(
        wait_until(Duration::from_secs(20), || metric(
            port,
            "batches_stored_total"
        ) >= 20.0),
        "batches stored: {}",
        metric(port, "batches_stored_total")
    );
    let three_days = 3 * 86_400_000;
    let off = offset().expect("a reading in status --json");
    assert!((off - three_days).abs() < 3_000, "offset {off}");
    // The upstream reads the agent's clock from its batches' Date: its log,
    // /metrics and the edges page say so.
    up.expect_line(
        "agent `a1`: its clock is 3d 0h behind this upstream's",
        Duration::from_secs(5),
    );
    let seen = metric(port, "agent_clock_offset_seconds");
    assert!((seen - 259_200.0).abs() < 3.0, "{seen}");
    // Prometheus's own parser takes the upstream's metrics, the new gauge
    // among them.
    let (_, body) = http(port, "GET", "/metrics", None, "", b"");
    common::promtool_check(&body);
    let page = signed_in(port);
    let edges = page("/edges");
    assert!(edges.contains("<b>1 with a wrong clock</b>"), "{edges}");
    assert!(
        edges.contains("<td><b>3d 0h behind</b></td></tr>"),
        "{edges}"
    );
    let text = status(false);
    assert!(
        text.contains("  CLOCK OFF: this machine's clock is 3d 0h behind the receiver's (read "),
        "{text}"
    );
    // A second agent just as far off: every agent disagrees alike with the
    // upstream, which now suspects its own clock.
    let cfg2 = endless_agent_config(&dir, "a2", port);
    let mut agent2 = Agent::start_with_env(&cfg2, "info", &env);
    up.expect_line(
        "all 2 agents that posted since this upstream started read its clock as 3d 0h ahead of theirs: this upstream's own clock is more likely the wrong one",
        Duration::from_secs(15),
    );
    let edges = page("/edges");
    assert!(
        edges.contains("<b>All 2 edges read this upstream's clock as 3d 0h ahead of theirs"),
        "{edges}"
    );
    clock.set("+0");
    agent.expect_line(
        "sink `upstream`: this machine's clock agrees with the receiver's again (it was 3d 0h behind it)",
        Duration::from_secs(15),
    );
    assert!(
        wait_until(Duration::from_secs(10), || offset()
            .is_some_and(|o| o.abs() < 3_000)),
        "offset {:?}",
        offset()
    );
    assert!(!status(false).contains("CLOCK"), "{}", status(false));
    for a in ["a1", "a2"] {
        up.expect_line(
            &format!(
                "agent `{a}`: its clock agrees with this upstream's again (it was 3d 0h behind it)"
            ),
            Duration::from_secs(10),
        );
    }
    up.expect_line(
        "the agents' clocks no longer all disagree alike with this upstream's",
        Duration::from_secs(5),
    );
    let edges = page("/edges");
    assert!(
        edges.contains("<td>ok</td></tr>") && !edges.contains("wrong clock"),
        "{edges}"
    );
    agent.stop();
    agent2.stop();
    up.stop();
    let ulog = up.stderr();
    for a in ["a1", "a2"] {
        assert_eq!(
            ulog.matches(&format!("agent `{a}`: its clock is")).count(),
            1,
            "{ulog}"
        );
    }
    assert_eq!(
        ulog.matches("this upstream's own clock is more likely")
            .count(),
        1,
        "{ulog}"
    );
    assert!(
        ulog.contains("stamped 3d 0h earlier than it happened"),
        "{ulog}"
    );
    let log = agent.stderr();
    assert_eq!(log.matches("this machine's clock is").count(), 1, "{log}");
    assert!(
        log.contains("stamped 3d 0h earlier than it happened"),
        "{log}"
    );
    assert_eq!(
        log.matches("agrees with the receiver's again").count(),
        1,
        "{log}"
    );
}

/// On a campus network the way out is a proxy: the agent's batches go
/// through the CONNECT proxy the environment names (as ureq reads it), with
/// the proxy's credentials; the log says which proxy and never the
/// password; and when the proxy is down, the error names the proxy, not
/// the upstream, as what refused.
#[test]
fn an_agent_behind_a_proxy_sends_through_it_and_says_so_without_its_password() {
    let dir = TempDir::new("upstream-proxy");
    let port = free_port();
    let ucfg = upstream_config(&dir, "up", port, "sqlite", "", "");
    let mut up = Agent::start_upstream(&ucfg, "info", &[]);
    let proxy = common::http::ConnectProxy::start("edge:pr0xy-s3cret");
    let via = format!("http://edge:pr0xy-s3cret@127.0.0.1:{}", proxy.port);
    let cfg = endless_agent_config(&dir, "a1", port);
    // ureq takes ALL_PROXY before HTTPS_PROXY: both, and no NO_PROXY from
    // the machine, whatever its environment holds.
    let env = [
        ("HTTPS_PROXY", via.as_str()),
        ("ALL_PROXY", via.as_str()),
        ("NO_PROXY", ""),
    ];
    let through = format!("through the HTTP proxy 127.0.0.1:{}", proxy.port);
    // `check` (the unit's ExecStartPre) says it first.
    let check = std::process::Command::new(common::BIN)
        .args(["check", "-c"])
        .arg(&cfg)
        .envs(env)
        .output()
        .expect("run edgemeter check");
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        said.contains(&format!("sinks: upstream ({through})")),
        "{said}"
    );
    assert!(!said.contains("pr0xy-s3cret"), "{said}");
    let mut agent = Agent::start_with_env(&cfg, "info", &env);
    agent.expect_line(
        &format!("sink `upstream`: sending to http://127.0.0.1:{port}/v1/batches {through}"),
        Duration::from_secs(10),
    );
    assert!(
        wait_until(Duration::from_secs(20), || metric(
            port,
            "batches_stored_total"
        ) >= 5.0),
        "batches stored: {}\n{}",
        metric(port, "batches_stored_total"),
        agent.stderr()
    );
    let tunnels = proxy.tunnels.lock().expect("tunnels").clone();
    assert!(
        !tunnels.is_empty() && tunnels.iter().all(|t| *t == format!("127.0.0.1:{port}")),
        "{tunnels:?}"
    );
    assert_eq!(
        *proxy.refused.lock().expect("refused"),
        0,
        "its credentials were sent"
    );
    proxy.stop();
    agent.expect_line(
        &format!("POST http://127.0.0.1:{port}/v1/batches {through}: "),
        Duration::from_secs(20),
    );
    agent.stop();
    up.stop();
    let log = agent.stderr();
    assert!(
        !log.contains("pr0xy-s3cret"),
        "the proxy's password is never logged:\n{log}"
    );
}
