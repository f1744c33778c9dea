//! The `relay` source in the real binary against a real websocket server
//! that behaves like practable's session host (tests/common/relay.rs).
//! Ground truth is what the test sent; every count must match it exactly.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::relay::{Hub, Student};
use common::{Agent, TempDir, edgemeter, wait_until};
use tungstenite::Message;

fn config(dir: &TempDir, hub: &Hub, streams: &[&str], extra: &str) -> std::path::PathBuf {
    let list: Vec<String> = streams.iter().map(|s| format!("\"{s}\"")).collect();
    dir.write(
        "edgemeter.toml",
        &format!(
            r#"[agent]
id = "lab-host"
state_dir = "state"
flush_interval_secs = 0.05

[[source]]
type = "relay"
name = "lab"
session_host = "{}"
streams = [{}]
reconnect_initial_secs = 0.2
reconnect_max_secs = 1
files_dir = "analytics"
dump_interval_secs = 1
{extra}
"#,
            hub.url(),
            list.join(", ")
        ),
    )
}

/// Records ever appended to the outbox (its AUTOINCREMENT counter).
fn appended(dir: &TempDir) -> i64 {
    let Ok(db) = rusqlite::Connection::open_with_flags(
        dir.path("state/outbox.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return 0;
    };
    db.query_row(
        "SELECT seq FROM sqlite_sequence WHERE name = 'records'",
        [],
        |r| r.get(0),
    )
    .unwrap_or(0)
}

fn wait_subscribed(hub: &Hub, streams: &[&str]) {
    assert!(
        wait_until(Duration::from_secs(20), || streams
            .iter()
            .all(|s| hub.subscribers(s) == 1)),
        "edgemeter did not subscribe to every stream: {:?}",
        streams
            .iter()
            .map(|s| (*s, hub.subscribers(s)))
            .collect::<Vec<_>>()
    );
}

/// The per-stream table of `edgemeter status`: stream → (state, messages,
/// malformed, reconnects).
fn status(cfg: &Path) -> BTreeMap<String, (String, u64, u64, u64)> {
    let (code, out, err) = edgemeter(&["status", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let mut rows = BTreeMap::new();
    let mut in_table = false;
    for line in out.lines() {
        let t = line.trim();
        if t.starts_with("stream ") {
            in_table = true;
            continue;
        }
        if !in_table {
            continue;
        }
        let f: Vec<&str> = t.split_whitespace().collect();
        if f.len() < 7 || t.starts_with("binary frames") {
            in_table = false;
            continue;
        }
        // "backing off" is two words.
        let (state, rest) = if f[1] == "backing" {
            ("backing off", &f[3..])
        } else {
            (f[1], &f[2..])
        };
        rows.insert(
            f[0].to_owned(),
            (
                state.to_owned(),
                num(rest[1], line),
                num(rest[2], line),
                num(rest[3], line),
            ),
        );
    }
    rows
}

fn num(s: &str, line: &str) -> u64 {
    s.parse()
        .unwrap_or_else(|_| panic!("not a number: `{s}` in status line `{line}`"))
}

fn envelope(user: &str, stream: &str, kind: &str, log: &str) -> String {
    serde_json::json!({"user": user, "t": 1, "exp": "spinner", "hardware": stream,
        "course": "engdes1", "type": kind, "payload": {"log": log, "data": {"set": 1}}})
    .to_string()
}

fn read(dir: &TempDir, name: &str) -> String {
    std::fs::read_to_string(dir.path(&format!("analytics/{name}"))).unwrap_or_default()
}

/// The fixture session, sent by real student clients through the hub; the
/// dumped files must equal the hand-computed ones.
#[test]
fn a_scripted_session_through_the_hub_gives_the_expected_files() {
    let dir = TempDir::new("relay-session");
    let hub = Hub::start();
    let streams = ["spin30", "spin31", "pend00"];
    let cfg = config(&dir, &hub, &streams, "raw_files = true");
    let mut agent = Agent::start_running(&cfg, "agent.log");
    wait_subscribed(&hub, &streams);
    let mut students: BTreeMap<&str, Student> = streams
        .iter()
        .map(|s| (*s, Student::connect(&hub, s)))
        .collect();
    let session = include_str!("fixtures/relay/session.txt");
    let before = appended(&dir);
    let mut sent = 0;
    for line in session.lines().filter(|l| !l.starts_with('#')) {
        let (stream, msg) = line.split_once('\t').unwrap();
        students.get_mut(stream).unwrap().send(msg);
        sent += 1;
        // One at a time, so the order across streams is the order sent
        // (what the hand-computed transitions assume).
        assert!(
            wait_until(Duration::from_secs(10), || appended(&dir) >= before + sent),
            "message {sent} was not stored"
        );
    }
    let expected = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/relay/expected");
    for entry in std::fs::read_dir(&expected).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let want = std::fs::read_to_string(expected.join(&name)).unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || read(&dir, &name) == want),
            "analytics/{name} is\n{}\nexpected\n{want}",
            read(&dir, &name)
        );
    }
    // The raw files the old client wrote, one message per line.
    let u1 = "53a6788c-0000-4000-8000-000000000001";
    let raw = read(&dir, &format!("{u1}-spin30-spinner-engdes1.json"));
    assert_eq!(raw.lines().count(), 5, "{raw}");
    let table = status(&cfg);
    assert_eq!(table["spin30"].1, 8);
    assert_eq!(table["spin31"].1, 2);
    assert_eq!(table["pend00"].1, 4);
    assert!(
        table.values().all(|r| r.0 == "live" && r.2 == 0),
        "{table:?}"
    );
    agent.stop();
    assert!(!agent.stderr().contains("ERROR"), "{}", agent.stderr());
}

/// Concatenated objects, garbage, a zero-width space, binary, and frames
/// over the limit: counted, kept as samples, and the stream carries on.
#[test]
fn garbage_frames_are_counted_kept_and_survived() {
    let dir = TempDir::new("relay-garbage");
    let hub = Hub::start();
    // By name, so the lookup path (off the loop, every address tried) runs too.
    let cfg = config(&dir, &hub, &["spin30"], "max_frame_bytes = 4096");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("127.0.0.1", "localhost");
    std::fs::write(&cfg, text).unwrap();
    let mut agent = Agent::start_running(&cfg, "agent.log");
    wait_subscribed(&hub, &["spin30"]);
    let e = |u: &str| envelope(u, "spin30", "log", "x");
    let frames = [
        format!("{}{}", e("a"), e("b")),                  // 2 messages
        format!("\u{200B}{}", e("c")),                    // 1 message
        r#"{"info","pid"}"#.to_owned(),                   // malformed
        format!("{} and then garbage", e("d")),           // 1 message + malformed
        format!("{{\"user\":\"{}\"}}", "x".repeat(5000)), // oversized, readable: malformed
    ];
    for f in &frames {
        assert_eq!(hub.send_text("spin30", f), 1);
    }
    assert_eq!(hub.send("spin30", Message::binary(vec![0x47u8; 100])), 1); // malformed
    let messages = 4;
    assert!(
        wait_until(Duration::from_secs(10), || {
            status(&cfg)
                .get("spin30")
                .is_some_and(|r| r.1 == messages && r.2 == 4)
        }),
        "{:?}",
        status(&cfg)
    );
    // Twice the limit cannot even be read: counted, then a reconnect.
    hub.send_text("spin30", &"y".repeat(10_000));
    assert!(
        wait_until(Duration::from_secs(10), || {
            status(&cfg)
                .get("spin30")
                .is_some_and(|r| r.2 == 5 && r.3 == 1 && r.0 == "live")
        }),
        "{:?}",
        status(&cfg)
    );
    wait_subscribed(&hub, &["spin30"]);
    hub.send_text("spin30", &e("after"));
    assert!(wait_until(Duration::from_secs(10), || {
        status(&cfg)
            .get("spin30")
            .is_some_and(|r| r.1 == messages + 1)
    }));
    let (_, out, _) = edgemeter(&["status", "-c", cfg.to_str().unwrap()]);
    assert!(out.contains("latest malformed:"), "{out}");
    assert!(
        out.contains("{\\\"info\\\",\\\"pid\\\"}"),
        "the sample is kept: {out}"
    );
    assert!(out.contains("binary frames 1; oversized 2"), "{out}");
    agent.stop();
}

/// 13 streams, one of which never comes up, the session host restarted
/// mid-stream: every message sent while a stream was subscribed is counted
/// exactly, per stream and per user.
#[test]
fn many_streams_survive_a_restart_and_counts_match_what_was_sent() {
    let dir = TempDir::new("relay-many");
    let mut hub = Hub::start();
    let streams: Vec<String> = (30..=41).map(|n| format!("spin{n}")).collect();
    let live: Vec<&str> = streams.iter().map(String::as_str).collect();
    hub.refuse("spin99");
    let mut all = live.clone();
    all.push("spin99");
    let cfg = config(&dir, &hub, &all, "");
    let mut agent = Agent::start_running(&cfg, "agent.log");
    wait_subscribed(&hub, &live);
    // Truth: user × stream → messages.
    let mut truth: BTreeMap<(String, String), u64> = BTreeMap::new();
    let send_round = |hub: &Hub, round: usize, truth: &mut BTreeMap<(String, String), u64>| {
        for (i, s) in live.iter().enumerate() {
            for k in 0..(5 + i) {
                let user = format!("user-{}", (i * 7 + k + round) % 20);
                assert_eq!(
                    hub.send_text(s, &envelope(&user, s, "analytics", "voltage")),
                    1
                );
                *truth.entry((user, (*s).to_owned())).or_default() += 1;
            }
        }
    };
    send_round(&hub, 0, &mut truth);
    let sent_first: u64 = truth.values().sum();
    assert!(wait_until(Duration::from_secs(10), || {
        status(&cfg)
            .iter()
            .filter(|(s, _)| *s != "spin99")
            .map(|(_, r)| r.1)
            .sum::<u64>()
            == sent_first
    }));
    hub.stop();
    std::thread::sleep(Duration::from_millis(500));
    hub.restart();
    wait_subscribed(&hub, &live);
    send_round(&hub, 1, &mut truth);
    let sent: u64 = truth.values().sum();
    assert!(
        wait_until(Duration::from_secs(10), || {
            status(&cfg)
                .iter()
                .filter(|(s, _)| *s != "spin99")
                .map(|(_, r)| r.1)
                .sum::<u64>()
                == sent
        }),
        "{:?}",
        status(&cfg)
    );
    let table = status(&cfg);
    for s in &live {
        let want: u64 = truth
            .iter()
            .filter(|((_, st), _)| st == s)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(table[*s].1, want, "{s}");
        assert_eq!(table[*s].0, "live");
        assert!(table[*s].3 >= 1, "{s} reconnected after the restart");
    }
    assert_eq!(table["spin99"].0, "backing off", "{:?}", table["spin99"]);
    assert_eq!(table["spin99"].1, 0);
    // Per user × stream, from the dumped matrix.
    let want_usage = {
        let users: std::collections::BTreeSet<&String> = truth.keys().map(|(u, _)| u).collect();
        let mut text = format!("user,{}\n", live.join(","));
        for u in users {
            text += u;
            for s in &live {
                text += &format!(
                    ",{}",
                    truth
                        .get(&(u.clone(), (*s).to_owned()))
                        .copied()
                        .unwrap_or(0)
                );
            }
            text += "\n";
        }
        text
    };
    assert!(
        wait_until(Duration::from_secs(10), || read(&dir, "usage.csv")
            == want_usage),
        "usage.csv\n{}\nexpected\n{want_usage}",
        read(&dir, "usage.csv")
    );
    let (_, out, _) = edgemeter(&["status", "-c", cfg.to_str().unwrap()]);
    assert!(out.contains("404"), "the never-up stream shows why: {out}");
    agent.stop();
    let log = agent.stderr();
    assert!(log.contains("stream spin30 is connected again"), "{log}");
}

/// The session host drops every connection every 3 s for a minute: nothing
/// crashes, every stream comes back each time, and the reconnects are
/// spread out rather than all in one instant.
#[test]
fn reconnects_under_a_flapping_session_host_are_jittered() {
    let dir = TempDir::new("relay-flap");
    let hub = Hub::start();
    let streams: Vec<String> = (30..=41).map(|n| format!("spin{n}")).collect();
    let live: Vec<&str> = streams.iter().map(String::as_str).collect();
    let cfg = config(&dir, &hub, &live, "");
    let mut agent = Agent::start_running(&cfg, "agent.log");
    wait_subscribed(&hub, &live);
    let start = Instant::now();
    let mut drops = 0;
    let mut spreads = Vec::new();
    while start.elapsed() < Duration::from_secs(60) {
        let cut = Instant::now();
        hub.drop_all();
        drops += 1;
        // Every stream must be back within the backoff cap and a margin.
        assert!(
            wait_until(Duration::from_secs(10), || live
                .iter()
                .all(|s| hub.subscribers(s) == 1)),
            "not every stream came back after drop {drops}"
        );
        let back: Vec<Duration> = hub
            .connects()
            .iter()
            .filter(|(_, t)| *t > cut)
            .map(|(_, t)| *t - cut)
            .collect();
        let (lo, hi) = (back.iter().min().unwrap(), back.iter().max().unwrap());
        spreads.push(*hi - *lo);
        std::thread::sleep(Duration::from_secs(3).saturating_sub(cut.elapsed()));
    }
    assert!(drops >= 15, "{drops}");
    assert!(
        agent.wait_exit(Duration::from_millis(10)).is_none(),
        "the agent is still running"
    );
    // Full jitter: the reconnects after one cut are spread over a good part
    // of the first backoff window (0.2 s), not within a few ms. Median, so
    // one loaded moment cannot decide.
    spreads.sort();
    let median = spreads[spreads.len() / 2];
    assert!(
        median > Duration::from_millis(50),
        "reconnect spreads {spreads:?}"
    );
    let table = status(&cfg);
    assert!(table.values().all(|r| r.3 >= drops as u64 - 1), "{table:?}");
    agent.stop();
    assert!(!agent.stderr().contains("panicked"));
}

/// Provisioning: rules from log.access/log.token files, re-posted after the
/// session host restarts, idempotent from the command line, never logging
/// a token.
#[test]
fn session_host_rules_are_provisioned_again_after_a_restart_and_never_leak_tokens() {
    let dir = TempDir::new("relay-provision");
    let mut hub = Hub::start();
    let streams = ["spin30", "spin31"];
    std::fs::create_dir_all(dir.path("practable")).unwrap();
    for s in streams {
        dir.write(
            &format!("practable/log.access.{s}"),
            &format!("https://relay-access.example/session/{s}-log\n"),
        );
        dir.write(
            &format!("practable/log.token.{s}"),
            &format!("eyJSECRET-{s}.sig\n"),
        );
    }
    let cfg = config(
        &dir,
        &hub,
        &streams,
        "provision = { dir = \"practable\", check_interval_secs = 30 }",
    );
    let c = cfg.to_str().unwrap();
    let mut agent = Agent::start_running(&cfg, "agent.log");
    assert!(wait_until(Duration::from_secs(10), || hub.rules().len() == 2));
    let rules = hub.rules();
    assert_eq!(rules["spin30"]["stream"], "spin30");
    assert_eq!(
        rules["spin30"]["destination"],
        "https://relay-access.example/session/spin30-log"
    );
    assert_eq!(rules["spin31"]["token"], "eyJSECRET-spin31.sig");
    // Idempotent: the command line finds nothing to do.
    let (code, out, err) = edgemeter(&["relay", "provision", "-c", c]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("0 rules posted") && out.contains("2 already in place"),
        "{out}"
    );
    let (code, out, _) = edgemeter(&["relay", "rules", "-c", c]);
    assert_eq!(code, 0);
    assert!(
        out.contains(
            "spin30\tspin30\thttps://relay-access.example/session/spin30-log\tmatches log.token"
        ),
        "{out}"
    );
    assert!(!out.contains("SECRET"), "tokens are never shown: {out}");
    // The session host restarts and forgets its rules: they come back
    // without waiting for the 30 s check, because the streams reconnect.
    let posts = hub.posts();
    hub.stop();
    std::thread::sleep(Duration::from_millis(300));
    hub.restart();
    assert!(
        wait_until(Duration::from_secs(15), || hub.rules().len() == 2),
        "rules not re-posted"
    );
    assert!(hub.posts() >= posts + 2);
    // The agent would re-post a rotated token itself at its next check; stop
    // it so that what follows tests the command line alone.
    agent.stop();
    assert!(!agent.stderr().contains("SECRET"), "{}", agent.stderr());
    // A changed token file is noticed by the command line.
    dir.write("practable/log.token.spin31", "eyJSECRET-rotated.sig\n");
    let (_, out, _) = edgemeter(&["relay", "rules", "-c", c]);
    assert!(out.contains("DIFFERS from log.token"), "{out}");
    let (code, out, _) = edgemeter(&["relay", "provision", "-c", c]);
    assert_eq!(code, 0);
    assert!(out.contains("1 rules posted"), "{out}");
    assert_eq!(hub.rules()["spin31"]["token"], "eyJSECRET-rotated.sig");
    // A session host that is not there: a clear error, exit 1.
    hub.stop();
    let (code, _, err) = edgemeter(&["relay", "provision", "-c", c]);
    assert_eq!(code, 1);
    assert!(
        err.contains("posting") || err.contains("listing the rules"),
        "{err}"
    );
    assert!(!err.contains("SECRET"), "{err}");
}

/// The README's first command: the demo runs the relay pipeline against its
/// simulated session host and shows the streams and the analytics files.
#[test]
fn the_demo_shows_the_relay_pipeline() {
    let dir = TempDir::new("relay-demo");
    let out_dir = dir.path("demo");
    let (code, out, err) =
        edgemeter(&["demo", "--seconds", "5", "--dir", out_dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}\n{err}");
    for rig in ["spin30", "spin31", "spin32"] {
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with(rig) && l.contains("live")),
            "{rig} is live in the status:\n{out}"
        );
    }
    let usage = std::fs::read_to_string(out_dir.join("analytics/usage.csv")).expect("usage.csv");
    assert!(usage.starts_with("user,spin30,spin31,spin32\n"), "{usage}");
    assert!(usage.lines().count() >= 4, "several students: {usage}");
    let points = std::fs::read_to_string(out_dir.join("points.csv")).unwrap();
    assert!(
        points.contains("relay_messages"),
        "relay points reach the sink"
    );
}
