//! What an agent says about itself, from outside: `edgemeter status
//! --json` and, with `[agent] http_listen`, `/metrics` (checked by the real
//! Prometheus parser, `promtool`), `/health`, `/status.json` and the status
//! page, from the real binary with real sources: a relay on the session-host
//! emulator, an xx source on a real PostgreSQL, and one whose database is
//! gone.

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::pg::PgServer;
use common::relay::Hub;
use common::{Agent, TempDir, edgemeter, gateway_files, wait_until};
use serde_json::Value;

const PERIOD_MS: i64 = 2000;

fn http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    common::http_exchange(addr, request)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
    )
}

/// Where the agent says it serves (it was given port 0).
fn served_at(agent: &Agent) -> SocketAddr {
    assert!(
        agent.wait_for_line("and a status page on http://", Duration::from_secs(15)),
        "no http_listen line:\n{}",
        agent.stderr()
    );
    let log = agent.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("and a status page on http://"))
        .unwrap();
    let addr = line.rsplit("http://").next().unwrap().trim_end_matches('/');
    addr.parse().expect("an address")
}

fn status_json(cfg: &std::path::Path) -> Value {
    let (code, out, err) = edgemeter(&["status", "--json", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{out}"))
}

type Series = BTreeMap<(String, Vec<(String, String)>), f64>;

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    v.sort();
    v
}

/// The series `/metrics` must show for a `status --json` document, as the
/// README's table maps them; written here independently of the agent's code.
/// Ages (which depend on when each was taken) are left out and checked apart.
fn expected(j: &Value) -> Series {
    let mut out = Series::new();
    let mut put = |name: &str, l: &[(&str, &str)], v: f64| {
        out.insert((format!("edgemeter_{name}"), labels(l)), v);
    };
    let num = |v: &Value| v.as_f64().expect("a number");
    let agent = j["agent"]["id"].as_str().unwrap();
    put(
        "info",
        &[
            ("agent", agent),
            ("version", j["agent"]["version"].as_str().unwrap()),
        ],
        1.0,
    );
    let o = &j["outbox"];
    put("outbox_records", &[], num(&o["records"]));
    put("outbox_bytes", &[], num(&o["bytes"]));
    put("outbox_max_bytes", &[], num(&o["max_bytes"]));
    put(
        "outbox_dead_letter_bytes",
        &[],
        num(&o["dead_letter_bytes"]),
    );
    for d in j["drops"].as_array().unwrap() {
        let l = [
            ("reason", d["reason"].as_str().unwrap()),
            ("sink", d["sink"].as_str().unwrap()),
        ];
        put("dropped_records_total", &l, num(&d["records"]));
    }
    for k in j["sinks"].as_array().unwrap() {
        let l = [("sink", k["name"].as_str().unwrap())];
        put("sink_pending_records", &l, num(&k["pending"]));
        put(
            "sink_delivered_records_total",
            &l,
            num(&k["delivered_records"]),
        );
        put(
            "sink_delivered_batches_total",
            &l,
            num(&k["delivered_batches"]),
        );
        put("sink_failures_total", &l, num(&k["failures"]));
        put("sink_dead_letters", &l, num(&k["dead_letters"]));
        if !k["last_delivery_ms"].is_null() {
            put(
                "sink_last_delivery_seconds",
                &l,
                num(&k["last_delivery_ms"]) / 1000.0,
            );
        }
        if !k["last_failure_ms"].is_null() {
            put(
                "sink_last_failure_seconds",
                &l,
                num(&k["last_failure_ms"]) / 1000.0,
            );
        }
        for (event, v) in k["counters"].as_object().unwrap() {
            put(
                "sink_events_total",
                &[("event", event), ("sink", l[0].1)],
                num(v),
            );
        }
    }
    for s in j["sources"].as_array().unwrap() {
        let source = s["name"].as_str().unwrap();
        for sample in s["samples"].as_array().unwrap() {
            let mut l: Vec<(&str, &str)> = vec![("source", source)];
            if let Some(map) = sample["labels"].as_object() {
                l.extend(map.iter().map(|(k, v)| (k.as_str(), v.as_str().unwrap())));
            }
            put(sample["name"].as_str().unwrap(), &l, num(&sample["value"]));
        }
    }
    out
}

fn unescape(v: &str) -> String {
    let mut out = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some(o) => out.push(o),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The samples of a Prometheus text body (the label syntax we write: no
/// `}` or `",` inside values).
fn parse_metrics(body: &str) -> Series {
    let mut out = Series::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("name and value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        let (name, l) = match series.split_once('{') {
            None => (series.to_owned(), Vec::new()),
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').expect("closing brace");
                let mut l: Vec<(String, String)> = inner
                    .split("\",")
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").expect("k=\"v\"");
                        (k.to_owned(), unescape(v.trim_end_matches('"')))
                    })
                    .collect();
                l.sort();
                (name.to_owned(), l)
            }
        };
        assert!(
            out.insert((name, l), value).is_none(),
            "a series twice: {line}"
        );
    }
    out
}

fn sample(j: &Value, source: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let s = j["sources"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == source)?;
    s["samples"].as_array()?.iter().find_map(|x| {
        let l = &x["labels"];
        (x["name"] == name && want.iter().all(|(k, v)| l[*k] == *v)).then(|| x["value"].as_f64())?
    })
}

/// Everything in a document but what moves with the clock.
fn num_of(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn without_clock(j: &Value) -> Value {
    let mut j = j.clone();
    j["at_ms"] = Value::Null;
    // The disk's free bytes move with whatever else writes to it.
    j["outbox"]["disk_free_bytes"] = Value::Null;
    for s in j["sources"].as_array_mut().unwrap() {
        s["written_ms"] = Value::Null;
        s["text"] = Value::Null;
    }
    j
}

#[test]
fn metrics_pass_promtool_and_equal_status_json() {
    common::promtool();
    let pg = PgServer::start("status-http");
    let _gw = pg.gateway_with_recent_rows(PERIOD_MS);
    let hub = Hub::start();
    let dir = TempDir::new("status-http");
    gateway_files(&dir, pg.port, "NODE1");
    // A second gateway whose database is not there: failing, with its error.
    let gone = common::pg::free_port();
    dir.write(
        "gone.yaml",
        &format!("dbName: cmix_gateway\ndbAddress: \"127.0.0.1:{gone}\"\ndbUsername: ro\ndbPassword: pw-ro\n"),
    );
    let cfg = dir.write(
        "edgemeter.toml",
        &format!(
            r#"[agent]
id = "edge-7"
state_dir = "state"
http_listen = "127.0.0.1:0"

[[source]]
type = "relay"
name = "lab"
session_host = "{}"
streams = ["rig-a", "rig-b"]
reconnect_initial_secs = 0.2
reconnect_max_secs = 1
files_dir = "analytics"
dump_interval_secs = 1
raw_files = true

[[source]]
type = "xx_gateway"
name = "gateway"
gateway_config = "gateway.yaml"
node_id_file = "gateway-IDF.json"
windows = [1, 3]
backfill_epochs = 6
grace_secs = 0.2
poll_interval_secs = 3

[[source]]
type = "xx_gateway"
name = "gone"
gateway_config = "gone.yaml"
node_id_file = "gateway-IDF.json"
poll_interval_secs = 3

[[sink]]
type = "csv"
name = "local"
path = "out.csv"
"#,
            hub.url()
        ),
    );
    let agent = Agent::start(&cfg, "info");
    let addr = served_at(&agent);
    assert!(addr.ip().is_loopback());
    assert!(
        wait_until(Duration::from_secs(15), || hub.subscribers("rig-a") == 1
            && hub.subscribers("rig-b") == 1),
        "the relay did not connect:\n{}",
        agent.stderr()
    );
    for i in 0..25 {
        let m = serde_json::json!({"user": format!("u{}", i % 5), "t": i, "exp": "spinner",
            "hardware": "rig-a", "course": "c1", "type": "log",
            "payload": {"log": "start", "data": {}}});
        assert_eq!(hub.send_text("rig-a", &m.to_string()), 1);
    }
    // u0's commands: voltage, position, position (two transitions).
    for (i, log) in ["voltage", "position", "position"].iter().enumerate() {
        let m = serde_json::json!({"user": "u0", "t": 100 + i, "exp": "spinner",
            "hardware": "rig-a", "course": "c1", "type": "analytics",
            "payload": {"log": log, "data": {"set": 1}}});
        assert_eq!(hub.send_text("rig-a", &m.to_string()), 1);
    }
    for _ in 0..3 {
        hub.send_text("rig-b", "not json {");
    }
    let ready = |j: &Value| {
        sample(j, "lab", "relay_messages_total", &[("stream", "rig-a")]) == Some(28.0)
            && sample(
                j,
                "lab",
                "relay_unused_total",
                &[("stream", "rig-b"), ("kind", "garbage")],
            ) == Some(3.0)
            && sample(j, "gateway", "xx_lag_epochs", &[]).is_some()
            && sample(j, "gone", "xx_failing", &[]) == Some(1.0)
            && j["sinks"][0]["pending"] == 0
            // The raw files as a dump found them: every message of rig-a,
            // a line each.
            && sample(j, "lab", "relay_raw_files_bytes", &[])
                == sample(j, "lab", "relay_bytes_total", &[("stream", "rig-a")]).map(|b| b + 28.0)
    };
    assert!(
        wait_until(Duration::from_secs(30), || ready(&status_json(&cfg))),
        "the sources did not report:\n{}\n{}",
        serde_json::to_string_pretty(&status_json(&cfg)).unwrap(),
        agent.stderr()
    );

    // The same moment from both sides: a scrape between two equal documents.
    let mut compared = false;
    for _ in 0..20 {
        let before = status_json(&cfg);
        let (code, head, body) = get(addr, "/metrics");
        let after = status_json(&cfg);
        assert_eq!(code, 200, "{head}\n{body}");
        assert!(
            head.contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        if without_clock(&before) != without_clock(&after) {
            std::thread::sleep(Duration::from_millis(300));
            continue;
        }
        let mut got = parse_metrics(&body);
        // Ages move with the clock: between the two documents' views.
        let age =
            |j: &Value, t: &Value| (j["at_ms"].as_f64().unwrap() - t.as_f64().unwrap()) / 1000.0;
        let mut ranges = vec![(
            ("edgemeter_outbox_oldest_age_seconds".to_owned(), Vec::new()),
            if before["outbox"]["oldest_ms"].is_null() {
                (0.0, 0.0)
            } else {
                (
                    age(&before, &before["outbox"]["oldest_ms"]),
                    age(&after, &after["outbox"]["oldest_ms"]),
                )
            },
        )];
        for s in before["sources"].as_array().unwrap() {
            if !s["written_ms"].is_null() {
                let key = (
                    "edgemeter_source_status_age_seconds".to_owned(),
                    labels(&[("source", s["name"].as_str().unwrap())]),
                );
                // A rewrite between the scrape and `after` makes the age smaller: 0 is the floor.
                ranges.push((key, (0.0, age(&after, &s["written_ms"]))));
            }
        }
        // Free bytes: what the two reads saw, give or take what the
        // machine's other work wrote or freed meanwhile (256 MiB).
        let free = [&before, &after].map(|j| num_of(&j["outbox"]["disk_free_bytes"]));
        ranges.push((
            ("edgemeter_state_dir_free_bytes".to_owned(), Vec::new()),
            (
                free[0].min(free[1]) - 256.0 * 1048576.0,
                free[0].max(free[1]) + 256.0 * 1048576.0,
            ),
        ));
        for (key, (lo, hi)) in ranges {
            let v = got
                .remove(&key)
                .unwrap_or_else(|| panic!("/metrics lacks {key:?}"));
            assert!(
                v >= lo - 0.001 && v <= hi + 0.001,
                "{key:?} = {v}, not within {lo}..{hi}"
            );
        }
        let want = expected(&before);
        assert_eq!(got, want, "/metrics and status --json disagree\n{body}");
        compared = true;
        break;
    }
    assert!(
        compared,
        "status --json never held still for two reads in a row"
    );

    // The figures say what happened.
    let j = status_json(&cfg);
    assert_eq!(j["schema"], 1);
    assert_eq!(j["agent"]["running"], true);
    assert_eq!(j["agent"]["pid"], agent.pid());
    assert_eq!(
        sample(&j, "lab", "relay_stream_up", &[("stream", "rig-a")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&j, "lab", "relay_raw_files_max_bytes", &[]),
        Some(1073741824.0),
        "raw_files_max_bytes unless set: 1 GiB"
    );
    assert_eq!(
        sample(&j, "lab", "relay_raw_files_cut_total", &[]),
        Some(0.0)
    );
    let error = j["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "gone")
        .and_then(|s| {
            s["samples"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["name"] == "xx_error_info")
        })
        .map(|x| x["labels"]["error"].as_str().unwrap().to_owned())
        .expect("the gone gateway's error");
    assert!(
        error.contains(&gone.to_string()),
        "the error names the address: {error}"
    );
    assert!(
        j["sources"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| !s["text"].as_str().unwrap().is_empty())
    );

    // promtool's parser and its lint accept the body.
    let (_, _, body) = get(addr, "/metrics");
    common::promtool_check(&body);

    // The gateway's password is in gateway.yaml, and nowhere here.
    let (_, _, page) = get(addr, "/");
    for (what, text) in [
        ("/metrics", &body),
        ("status --json", &j.to_string()),
        ("the page", &page),
    ] {
        assert!(
            !text.contains("pw-ro"),
            "{what} shows the database password"
        );
    }

    // The status page in a real browser: clean console, the verdict names
    // the broken gateway, the text is status's; a laptop and a phone.
    let mut browser = common::browser::Browser::start();
    for (name, w, h) in [
        ("agent-status", 1100, 900),
        ("agent-status-phone", 390, 844),
    ] {
        let page = browser.open(&format!("http://{addr}/"), w, h);
        assert!(
            page.problems.is_empty(),
            "the page logged: {:?}",
            page.problems
        );
        assert!(
            page.dom
                .contains("class=\"state bad\">source gone failing: cannot connect to PostgreSQL"),
            "{}",
            page.dom
        );
        assert!(page.dom.contains("sink local"), "{}", page.dom);
        assert!(page.dom.contains("rig-a"), "{}", page.dom);
        browser.screenshot(name);
    }
    // The relay's command graphs: listed, and u0's drawn with one arrow or
    // loop per transition (the state is saved every 2 s).
    assert!(
        wait_until(Duration::from_secs(10), || get(addr, "/graphs")
            .2
            .contains("user=u0&amp;exp=spinner&amp;course=c1")),
        "{}",
        get(addr, "/graphs").2
    );
    let page = browser.open(
        &format!("http://{addr}/graphs?source=lab&user=u0&exp=spinner&course=c1"),
        900,
        900,
    );
    assert!(
        page.problems.is_empty(),
        "the page logged: {:?}",
        page.problems
    );
    let edges: Vec<String> =
        serde_json::from_value(browser.eval(
            "[...document.querySelectorAll('svg.graph g.edge title')].map(t => t.textContent)",
        ))
        .unwrap();
    assert_eq!(
        edges,
        [
            "position_step → position_step: 1",
            "voltage_step → position_step: 1"
        ]
    );
    browser.screenshot("agent-graphs");
    assert_eq!(get(addr, "/graphs?bogus=1").0, 400);
    drop(browser);

    // /status.json is the same document as `status --json`.
    let (code, _, served) = get(addr, "/status.json");
    assert_eq!(code, 200);
    let served: Value = serde_json::from_str(&served).expect("JSON");
    assert_eq!(served["schema"], 1);
    assert_eq!(served["agent"], j["agent"]);
    assert_eq!(served["sources"].as_array().unwrap().len(), 3);
    drop(agent);
}

#[test]
fn http_listen_is_read_only_bounded_and_says_when_its_port_is_taken() {
    let dir = TempDir::new("status-http-bounds");
    let cfg = dir.write(
        "edgemeter.toml",
        "[agent]\nid = \"edge-8\"\nstate_dir = \"state\"\nhttp_listen = \"127.0.0.1:0\"\n\n\
         [[source]]\ntype = \"synthetic\"\nname = \"load\"\nrate_per_sec = 20\nseries = 2\n\n\
         [[sink]]\ntype = \"csv\"\nname = \"local\"\npath = \"out.csv\"\n",
    );
    let mut agent = Agent::start(&cfg, "info");
    let addr = served_at(&agent);
    let delivered = |j: &Value| j["sinks"][0]["delivered_records"].as_i64().unwrap_or(0);
    assert!(wait_until(Duration::from_secs(10), || delivered(
        &status_json(&cfg)
    ) > 0));

    let (code, _, body) = get(addr, "/health");
    assert_eq!(
        (code, body.starts_with("ok: agent edge-8")),
        (200, true),
        "{body}"
    );
    let (code, head, _) = http(
        addr,
        "POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc",
    );
    assert_eq!(code, 405, "{head}");
    assert!(head.contains("allow: GET"), "{head}");
    let (code, _, body) = get(addr, "/v1/batches");
    assert_eq!(code, 404, "{body}");
    // A GET with a body is not served: nothing here reads one.
    let (code, _, _) = http(
        addr,
        "GET /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello",
    );
    assert_eq!(code, 413);
    let (code, head, page) = get(addr, "/");
    assert_eq!(code, 200);
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert!(
        page.contains("edgemeter agent <code>edge-8</code>") && page.contains("sink local"),
        "{page}"
    );

    // Past the connection bound: a quick 503, and the agent still answers after.
    let idle: Vec<TcpStream> = (0..16)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    assert!(wait_until(Duration::from_secs(5), || {
        let (code, _, _) = get(addr, "/health");
        code == 503
    }));
    drop(idle);
    assert!(wait_until(Duration::from_secs(5), || get(addr, "/health")
        .0
        == 200));

    // The port taken: the second agent (own state) says so and exits 1.
    let other = TempDir::new("status-http-taken");
    let taken = other.write(
        "edgemeter.toml",
        &format!("[agent]\nstate_dir = \"state\"\nhttp_listen = \"{addr}\"\n"),
    );
    let mut second = Agent::start(&taken, "info");
    let status = second
        .wait_exit(Duration::from_secs(10))
        .expect("the second agent exits");
    assert_eq!(status.code(), Some(1), "{}", second.stderr());
    assert!(
        second.stderr().contains(&format!(
            "cannot listen on {addr} ([agent] http_listen): Address already in use"
        )),
        "{}",
        second.stderr()
    );
    agent.stop();

    // With no agent, status --json still answers, and says so.
    let j = status_json(&cfg);
    assert_eq!(
        (j["agent"]["running"].clone(), j["agent"]["pid"].clone()),
        (Value::Bool(false), Value::Null)
    );
    assert!(delivered(&j) > 0);
}

/// An agent out of file descriptors fails every accept on `http_listen`
/// until one is freed: said once (each failure was a line, ten a second),
/// and said when it serves again.
#[test]
fn http_listen_out_of_file_descriptors_says_so_once_and_serves_again() {
    let dir = TempDir::new("status-http-nofile");
    let cfg = dir.write(
        "edgemeter.toml",
        "[agent]\nid = \"edge-9\"\nstate_dir = \"state\"\nhttp_listen = \"127.0.0.1:0\"\n\n\
         [[source]]\ntype = \"synthetic\"\nname = \"load\"\nrate_per_sec = 20\n",
    );
    let mut agent = Agent::start(&cfg, "info");
    let addr = served_at(&agent);
    assert_eq!(get(addr, "/health").0, 200);
    common::starve_and_recover(
        &agent,
        addr.port(),
        &format!("http_listen on {addr}"),
        || get(addr, "/health").0 == 200,
    );
    agent.stop();
    let log = agent.stderr();
    assert_eq!(
        log.matches("accepting a connection failed").count(),
        1,
        "said once:\n{log}"
    );
    // The outbox syncs its WAL every second through a descriptor it holds:
    // out of descriptors, records still reach the disk.
    assert!(!log.contains("syncing the WAL failed"), "{log}");
}
