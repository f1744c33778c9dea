//! The `relay` source in the real binary against a real websocket server
//! that behaves like practable's session host (tests/common/relay.rs).
//! Ground truth is what the test sent; every count must match it exactly.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::relay::{Hub, Student};
use common::{Agent, TempDir, edgemeter, rss_kib, wait_until};
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

/// Events stored in the outbox (with no sink, they stay): the messages
/// and malformed samples, not the points and sketches a window's end adds.
fn events_stored(dir: &TempDir) -> i64 {
    let Ok(db) = rusqlite::Connection::open_with_flags(
        dir.path("state/outbox.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return 0;
    };
    db.query_row(
        "SELECT COALESCE(SUM(n), 0) FROM records WHERE kind = 3",
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

/// One row of the per-stream table of `edgemeter status`.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    state: String,
    frames: u64,
    messages: u64,
    malformed: u64,
    reconnects: u64,
    stalls: u64,
    last_error: String,
}

/// The per-stream table of `edgemeter status`, by stream.
fn status(cfg: &Path) -> BTreeMap<String, Row> {
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
        if f.len() < 9 || t.starts_with("by kind") {
            in_table = false;
            continue;
        }
        // "backing off" is two words.
        let (state, rest) = if f[1] == "backing" {
            ("backing off", &f[3..])
        } else {
            (f[1], &f[2..])
        };
        // rest: since, frames, messages, bytes, malformed, reconnects, stalls, error…
        rows.insert(
            f[0].to_owned(),
            Row {
                state: state.to_owned(),
                frames: num(rest[1], line),
                messages: num(rest[2], line),
                malformed: num(rest[4], line),
                reconnects: num(rest[5], line),
                stalls: num(rest[6], line),
                last_error: rest[7..].join(" "),
            },
        );
    }
    rows
}

/// A stream's row of the `by kind` table in `status` output.
fn by_kind(out: &str, stream: &str) -> Option<Vec<u64>> {
    let table = out.split_once("by kind ")?.1;
    let line = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(stream))?;
    Some(
        line.split_whitespace()
            .skip(1)
            .map(|n| num(n, line))
            .collect(),
    )
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
/// dumped files must equal the hand-computed ones. Each message is sent
/// once the one before is stored, so that they are read in the order sent.
/// That wait counted every record appended, and so took the points of a
/// window that ended during the test for the message (CI failed once on
/// a transition counted in the wrong order): it counts the messages now,
/// and windows of 1 s make sure some end.
#[test]
fn a_scripted_session_through_the_hub_gives_the_expected_files() {
    let dir = TempDir::new("relay-session");
    let hub = Hub::start();
    let streams = ["spin30", "spin31", "pend00"];
    let cfg = config(&dir, &hub, &streams, "raw_files = true\nwindow_secs = 1");
    let mut agent = Agent::start_running(&cfg, "agent.log");
    wait_subscribed(&hub, &streams);
    let mut students: BTreeMap<&str, Student> = streams
        .iter()
        .map(|s| (*s, Student::connect(&hub, s)))
        .collect();
    let session = include_str!("fixtures/relay/session.txt");
    let before = events_stored(&dir);
    let mut sent = 0;
    for line in session.lines().filter(|l| !l.starts_with('#')) {
        let (stream, msg) = line.split_once('\t').unwrap();
        students.get_mut(stream).unwrap().send(msg);
        sent += 1;
        // One at a time, so the order across streams is the order sent
        // (what the hand-computed transitions assume).
        assert!(
            wait_until(Duration::from_secs(10), || events_stored(&dir)
                >= before + sent),
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
    assert_eq!(table["spin30"].messages, 8);
    assert_eq!(table["spin31"].messages, 2);
    assert_eq!(table["pend00"].messages, 4);
    assert!(
        table
            .values()
            .all(|r| r.state == "live" && r.malformed == 0),
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
                .is_some_and(|r| r.messages == messages && r.malformed == 4)
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
                .is_some_and(|r| r.malformed == 5 && r.reconnects == 1 && r.state == "live")
        }),
        "{:?}",
        status(&cfg)
    );
    wait_subscribed(&hub, &["spin30"]);
    hub.send_text("spin30", &e("after"));
    assert!(wait_until(Duration::from_secs(10), || {
        status(&cfg)
            .get("spin30")
            .is_some_and(|r| r.messages == messages + 1)
    }));
    let (_, out, _) = edgemeter(&["status", "-c", cfg.to_str().unwrap()]);
    assert!(out.contains("latest malformed:"), "{out}");
    assert!(
        out.contains("{\\\"info\\\",\\\"pid\\\"}"),
        "the sample is kept: {out}"
    );
    // By kind: binary, oversized, garbage, not envelope, not analysed,
    // zero-width (the U+200B line is in the per-stream figures too).
    assert_eq!(
        by_kind(&out, "spin30"),
        Some(vec![1, 2, 2, 0, 0, 1]),
        "{out}"
    );
    assert_eq!(status(&cfg)["spin30"].frames, 8, "{out}");
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
            .map(|(_, r)| r.messages)
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
                .map(|(_, r)| r.messages)
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
        assert_eq!(table[*s].messages, want, "{s}");
        assert_eq!(table[*s].state, "live");
        assert!(
            table[*s].reconnects >= 1,
            "{s} reconnected after the restart"
        );
    }
    assert_eq!(
        table["spin99"].state, "backing off",
        "{:?}",
        table["spin99"]
    );
    assert_eq!(table["spin99"].messages, 0);
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
    let back: usize = log
        .lines()
        .filter(|l| l.contains(" connected again"))
        .map(streams_named)
        .sum();
    assert_eq!(
        back,
        live.len(),
        "each live stream's return said once:\n{log}"
    );
}

/// The issue's flaky uplink: the session host drops every connection every
/// 10 s for a minute, with the default backoff (1 s initial, 60 s max).
/// Each time every stream is back within the initial wait (plus a margin
/// for a loaded machine), the reconnects of one drop are spread out by
/// full jitter, and every message sent while the streams were up counts.
#[test]
fn a_host_that_drops_every_10_s_gets_every_stream_back_within_the_initial_wait_said_in_few_lines() {
    let dir = TempDir::new("relay-flap");
    let hub = Hub::start();
    let streams: Vec<String> = (30..=41).map(|n| format!("spin{n}")).collect();
    let live: Vec<&str> = streams.iter().map(String::as_str).collect();
    let cfg = config(&dir, &hub, &live, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("reconnect_initial_secs = 0.2\nreconnect_max_secs = 1\n", "");
    std::fs::write(&cfg, text).unwrap();
    let mut agent = Agent::start_running(&cfg, "agent.log");
    wait_subscribed(&hub, &live);
    let (initial, margin) = (Duration::from_secs(1), Duration::from_millis(700));
    let mut sent = 0u64;
    let mut worst = Vec::new();
    let mut spreads = Vec::new();
    for drop in 1..=6 {
        // Traffic while up, counted by the hub's delivery.
        for (i, s) in live.iter().enumerate() {
            for k in 0..3 {
                let user = format!("u{drop}-{i}-{k}");
                sent += hub.send_text(s, &envelope(&user, s, "log", "x")) as u64;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(9);
        assert!(
            wait_until(Duration::from_secs(9), || status(&cfg)
                .values()
                .map(|r| r.messages)
                .sum::<u64>()
                == sent),
            "messages before drop {drop}: {:?}",
            status(&cfg)
        );
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        let cut = Instant::now();
        hub.drop_all();
        assert!(
            wait_until(Duration::from_secs(5), || live
                .iter()
                .all(|s| hub.subscribers(s) == 1)),
            "not every stream came back within 5 s of drop {drop}"
        );
        let back: Vec<Duration> = hub
            .connects()
            .iter()
            .filter(|(_, t)| *t > cut)
            .map(|(_, t)| *t - cut)
            .collect();
        assert_eq!(back.len(), live.len(), "one reconnect per stream");
        let (lo, hi) = (*back.iter().min().unwrap(), *back.iter().max().unwrap());
        worst.push(hi);
        spreads.push(hi - lo);
    }
    assert!(
        worst.iter().all(|w| *w <= initial + margin),
        "the slowest stream after each drop: {worst:?} (the initial wait is {initial:?})"
    );
    // Full jitter spreads one drop's reconnects over the initial window.
    spreads.sort();
    assert!(
        spreads[spreads.len() / 2] > initial / 4,
        "reconnect spreads {spreads:?}"
    );
    // The hub saw the reconnects; status shows them within 0.2 s.
    assert!(
        wait_until(Duration::from_secs(3), || status(&cfg)
            .values()
            .all(|r| r.reconnects == 6 && r.state == "live")),
        "{:?}",
        status(&cfg)
    );
    let table = status(&cfg);
    assert_eq!(table.values().map(|r| r.messages).sum::<u64>(), sent);
    agent.stop();
    let log = agent.stderr();
    assert!(!log.contains("panicked"));
    // Each drop is said in a line for the losses and one or two for the
    // returns, naming every stream: said per stream, it was 24 lines a
    // drop, 360 in half a minute of a host dropping every 2 s.
    let said = |what: &str| -> (usize, usize) {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(what)).collect();
        let streams = lines.iter().map(|l| streams_named(l)).sum();
        (lines.len(), streams)
    };
    let (lost, lost_streams) = said(": connection lost: ");
    let (back, back_streams) = said(" connected again");
    assert_eq!(
        (lost_streams, back_streams),
        (6 * live.len(), 6 * live.len()),
        "every stream's loss and return said, each once:\n{log}"
    );
    assert!(
        lost + back <= 6 * 3,
        "{lost} lines of losses and {back} of returns for 6 drops of {} streams:\n{log}",
        live.len()
    );
}

/// A session host that is down when the agent starts: its streams'
/// failures are one line, not one per stream, and once it is up they are
/// said to be connected, not "connected again" (they never were).
#[test]
fn a_host_down_at_start_is_one_line_and_its_streams_are_then_connected() {
    let dir = TempDir::new("relay-down-at-start");
    let mut hub = Hub::start();
    hub.stop();
    let live = ["spin30", "spin31", "spin32", "spin33"];
    let cfg = config(&dir, &hub, &live, "");
    let mut agent = Agent::start_running(&cfg, "agent.log");
    assert!(
        agent.wait_for_line(": cannot connect", Duration::from_secs(10)),
        "{}",
        agent.stderr()
    );
    hub.restart();
    wait_subscribed(&hub, &live);
    let connected = |log: &str| -> usize {
        log.lines()
            .filter(|l| l.ends_with(" connected"))
            .map(streams_named)
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(10), || connected(&agent.stderr()) == 4),
        "{}",
        agent.stderr()
    );
    agent.stop();
    let log = agent.stderr();
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot connect"))
        .collect();
    assert_eq!(failed.len(), 1, "{log}");
    assert!(failed[0].contains("all 4 streams: "), "{log}");
    assert!(!log.contains("connected again"), "{log}");
}

/// How many streams a line of the relay's connection news names: "stream
/// spin30", "all 12 streams", "3 streams (…)".
fn streams_named(line: &str) -> usize {
    let (_, rest) = line.split_once("source `lab`: ").expect("a source's line");
    let rest = rest.strip_prefix("all ").unwrap_or(rest);
    if rest.starts_with("stream ") {
        return 1;
    }
    let (n, _) = rest.split_once(" streams").expect("N streams");
    n.parse().expect("a count of streams")
}

/// A logging stream is silent most of the day: `status` must show each
/// connection change within a second anyway (connect, the host going away,
/// backing off, connecting again, live again).
#[test]
fn status_follows_every_connection_change_of_silent_streams_within_a_second() {
    let dir = TempDir::new("relay-silent");
    let mut hub = Hub::start();
    let streams: Vec<String> = (30..=41).map(|n| format!("spin{n}")).collect();
    let live: Vec<&str> = streams.iter().map(String::as_str).collect();
    let cfg = config(&dir, &hub, &live, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("reconnect_max_secs = 1", "reconnect_max_secs = 3");
    std::fs::write(&cfg, text).unwrap();
    let mut agent = Agent::start_running(&cfg, "agent.log");
    let states =
        |cfg: &Path| -> Vec<String> { status(cfg).values().map(|r| r.state.clone()).collect() };
    let within = Duration::from_secs(1);
    wait_subscribed(&hub, &live);
    let t = Instant::now();
    assert!(
        wait_until(within, || states(&cfg) == vec!["live"; 12]),
        "connected, no message yet: {:?} after {:?}",
        status(&cfg),
        t.elapsed()
    );
    hub.stop();
    assert!(
        wait_until(within, || states(&cfg)
            .iter()
            .all(|s| s == "backing off" || s == "connecting")),
        "the host is gone: {:?}",
        status(&cfg)
    );
    assert!(
        status(&cfg)
            .values()
            .all(|r| r.last_error.contains("connect")),
        "{:?}",
        status(&cfg)
    );
    std::thread::sleep(Duration::from_secs(2));
    hub.restart();
    wait_subscribed(&hub, &live);
    assert!(
        wait_until(within, || states(&cfg) == vec!["live"; 12]),
        "back, still silent: {:?}",
        status(&cfg)
    );
    agent.stop();
}

/// A session host that hangs without closing its connections: pings go
/// unanswered, and each stream is declared stalled and reconnected within
/// the deadline; when the host recovers, the streams are live again.
#[test]
fn a_host_that_stops_answering_without_closing_is_detected_within_the_deadline() {
    let dir = TempDir::new("relay-hung");
    let hub = Hub::start();
    let streams = ["spin30", "spin31", "spin32"];
    let cfg = config(
        &dir,
        &hub,
        &streams,
        "ping_interval_secs = 0.5\nstall_after_secs = 1.5",
    );
    let mut agent = Agent::start_running(&cfg, "agent.log");
    wait_subscribed(&hub, &streams);
    // Pings answered: silence alone is not a stall.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        status(&cfg)
            .values()
            .all(|r| r.state == "live" && r.stalls == 0),
        "{:?}",
        status(&cfg)
    );
    let hung = Instant::now();
    hub.freeze();
    // Deadline 1.5 s, status within 0.2 s, a margin for a loaded machine.
    assert!(
        wait_until(Duration::from_millis(2500), || status(&cfg)
            .values()
            .all(|r| r.stalls == 1 && r.state != "live")),
        "{:?} after {:?}",
        status(&cfg),
        hung.elapsed()
    );
    assert!(
        status(&cfg)
            .values()
            .all(|r| r.last_error.contains("sent nothing for 1.5 s")),
        "{:?}",
        status(&cfg)
    );
    hub.thaw();
    assert!(
        wait_until(Duration::from_secs(15), || status(&cfg)
            .values()
            .all(|r| r.state == "live")),
        "{:?}",
        status(&cfg)
    );
    agent.stop();
    let log = agent.stderr();
    assert!(log.contains("not even a pong"), "{log}");
}

/// Provisioning: rules from log.access/log.token files, re-posted after the
/// session host restarts, idempotent from the command line, never logging
/// a token.
#[test]
fn session_host_rules_are_provisioned_again_after_a_restart_and_never_leak_tokens() {
    let dir = TempDir::new("relay-provision");
    let mut hub = Hub::start();
    let streams = ["spin30", "spin31", "spin32"];
    std::fs::create_dir_all(dir.path("practable")).unwrap();
    for s in streams {
        dir.write(
            &format!("practable/log.access.{s}"),
            &format!("https://relay-access.example/session/{s}-log\n"),
        );
        if s != "spin32" {
            dir.write(
                &format!("practable/log.token.{s}"),
                &format!("eyJSECRET-{s}.sig\n"),
            );
        }
    }
    let cfg = config(
        &dir,
        &hub,
        &streams,
        "provision = { dir = \"practable\", check_interval_secs = 30 }",
    );
    let c = cfg.to_str().unwrap();
    let mut agent = Agent::start_running(&cfg, "agent.log");
    // spin32's token file is missing: that stream is skipped and named,
    // the others are provisioned all the same.
    assert!(wait_until(Duration::from_secs(10), || hub.rules().len() == 2));
    assert!(
        agent.wait_for_line(
            "no session host rule for stream spin32: ",
            Duration::from_secs(5)
        ),
        "{}",
        agent.stderr()
    );
    agent.expect_line("session host rules: 2 rules set", Duration::from_secs(5));
    let rules = hub.rules();
    assert_eq!(rules["spin30"]["stream"], "spin30");
    assert_eq!(
        rules["spin30"]["destination"],
        "https://relay-access.example/session/spin30-log"
    );
    assert_eq!(rules["spin31"]["token"], "eyJSECRET-spin31.sig");
    // The command line does the same and says so with its exit status.
    let (code, out, err) = edgemeter(&["relay", "provision", "-c", c]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("skipped stream spin32: "), "{err}");
    assert!(
        out.contains("0 rules posted") && out.contains("2 already in place"),
        "{out}"
    );
    // With its file in place, idempotent: nothing to do, exit 0.
    dir.write("practable/log.token.spin32", "eyJSECRET-spin32.sig\n");
    let (code, out, err) = edgemeter(&["relay", "provision", "-c", c]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 rule posted"), "{out}");
    let (code, out, err) = edgemeter(&["relay", "provision", "-c", c]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("0 rules posted") && out.contains("3 already in place"),
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
        wait_until(Duration::from_secs(15), || hub.rules().len() == 3),
        "rules not re-posted"
    );
    assert!(hub.posts() >= posts + 3);
    agent.expect_line("3 rules set again", Duration::from_secs(5));
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
    assert!(out.contains("1 rule posted"), "{out}");
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
    // It starts quietly (the edges' tokens exist before the upstream reads
    // them) and says where its dashboard is and how to sign in.
    let noisy: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("[WARN]") || l.contains("[ERROR]"))
        .collect();
    assert!(noisy.is_empty(), "the demo warned: {noisy:?}");
    let token = std::fs::read_to_string(out_dir.join("admin.token")).expect("admin.token");
    assert!(
        out.contains(&format!("(sign in with the token {token}, also in "))
            && out.contains("dashboard:  http://127.0.0.1:"),
        "{out}"
    );
    for rig in ["spin30", "spin31", "spin32"] {
        assert!(
            out.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // The agent has stopped when the demo prints its status.
                f.first() == Some(&rig) && f[1] == "stopped" && f[4].parse::<u64>().unwrap_or(0) > 0
            }),
            "{rig} has messages and is shown stopped in the status:\n{out}"
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

/// A restart's first dump rewrites every user's files from the saved
/// state. It spelled them all out before writing the first: 20,000 users
/// (one rig and one command graph each) took the agent from 27 to 126 MiB
/// resident in the release build, 141 MiB in the debug build this test
/// runs, and 83 MiB stayed resident after. A dump now spells and writes its
/// graphs a part at a time (`DUMP_GRAPHS_PER_JOB`): 32 and 44 MiB, then 25
/// and 39 once the load no longer held the rows twice (the next test). The
/// files are all written, and say what the state says.
#[test]
fn a_restarts_dump_of_20000_users_never_holds_all_their_files_in_memory() {
    let dir = TempDir::new("relay-dump-memory");
    let hub = Hub::start();
    let users = 20_000;
    save_users_state(&dir, users);
    let cfg = config(&dir, &hub, &["spin30"], "");
    let mut agent = Agent::start_running(&cfg, "agent.log");
    let graphs = || {
        std::fs::read_dir(dir.path("analytics"))
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.file_name().to_string_lossy().ends_with("-graph.json"))
                })
                .count()
            })
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(120), || graphs() == users),
        "{} of {users} graphs dumped:\n{}",
        graphs(),
        agent.stderr()
    );
    let (rss, peak) = rss_kib(agent.pid());
    agent.stop();
    let adjacency = read(
        &dir,
        "5e1f0000-0000-4000-8000-000000019999-spinner-engdes1-adjacency.csv",
    );
    assert_eq!(
        adjacency.lines().nth(1),
        Some("voltage_step,0.0,1.0,2.0,0.0,1.0"),
        "{adjacency}"
    );
    assert!(
        peak < 80 * 1024,
        "peak {peak} KiB (now {rss} KiB) for {users} users' dump: more than 80 MiB"
    );
}

/// The saved state a previous run left for `users` users (one rig, one
/// graph each), written by the relay source's own store.
fn save_users_state(dir: &TempDir, users: usize) {
    use edgemeter::sources::relay::analytics::{Activity, GraphKey, SavedChain};
    std::fs::create_dir_all(dir.path("state")).unwrap();
    let user = |u: usize| format!("5e1f0000-0000-4000-8000-{u:012}");
    let activity: Vec<_> = (0..users)
        .map(|u| {
            let a = Activity {
                first_ms: 1_700_000_000_000,
                last_ms: 1_700_000_600_000,
                messages: 20,
                minutes: 3,
            };
            ((user(u), "spin30".to_owned()), a)
        })
        .collect();
    let counts: Vec<String> = (0..25).map(|i| (i % 3).to_string()).collect();
    let chain = SavedChain {
        nodes: r#"["voltage_step","position_step","speed_step","voltage_ramp","speed_ramp"]"#
            .to_owned(),
        counts: format!("[{}]", counts.join(",")),
        last: Some(1),
    };
    let graphs: Vec<_> = (0..users)
        .map(|u| {
            let key = GraphKey {
                user: user(u),
                exp: "spinner".to_owned(),
                course: "engdes1".to_owned(),
            };
            (key, chain.clone())
        })
        .collect();
    edgemeter::sources::relay::store::Store::open(&dir.path("state/relay-lab.db"))
        .and_then(|mut store| store.save(&activity, &graphs))
        .expect("the saved state");
}

/// The issue's shutdown: thousands of users' graphs changed since the last
/// dump, SIGTERM under load. The running window's points reach the outbox
/// (they are what the sinks need), the agent says it stopped cleanly
/// because it did, and within its grace even though 6,002 files are due
/// (0.7 ms each on this disk, seconds on an SD card): files get half the
/// grace, the log counts the rest, and the first dump after a restart
/// writes them from the saved state. No temp file is left.
#[test]
fn sigterm_under_load_keeps_the_last_window_and_writes_every_file() {
    let dir = TempDir::new("relay-sigterm");
    let hub = Hub::start();
    let streams = ["spin30", "spin31", "spin32", "spin33"];
    let cfg = config(&dir, &hub, &streams, "window_secs = 3600");
    // A grace of 2 s leaves 1 s for files: fewer than the 6,002 due, here.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("dump_interval_secs = 1", "dump_interval_secs = 3600")
        .replace("[agent]\n", "[agent]\nshutdown_grace_secs = 2\n");
    std::fs::write(&cfg, &text).unwrap();
    let mut agent = Agent::start_running(&cfg, "agent.log");
    wait_subscribed(&hub, &streams);
    // 3,000 users, two commands each (one transition), about 1,000 msg/s.
    let users = 3_000;
    let mut sent = 0u64;
    let start = Instant::now();
    for (n, log) in ["voltage", "position"].iter().enumerate() {
        for u in 0..users {
            let s = streams[u % streams.len()];
            let user = format!("user-{u:04}");
            let msg = envelope(&user, s, "analytics", log);
            sent += hub.send_text(s, &msg) as u64;
            let k = (n * users + u + 1) as u32;
            std::thread::sleep(
                (start + Duration::from_millis(u64::from(k)))
                    .saturating_duration_since(Instant::now()),
            );
        }
    }
    assert_eq!(sent, 2 * users as u64);
    assert!(
        wait_until(Duration::from_secs(20), || status(&cfg)
            .values()
            .map(|r| r.messages)
            .sum::<u64>()
            == sent),
        "{:?}",
        status(&cfg)
    );
    agent.stop();
    let log = agent.stderr();
    assert!(log.contains("stopped cleanly"), "{log}");
    assert!(!log.contains("cancelled"), "{log}");
    // The window's points, per stream, add up to what was sent (a window
    // boundary during the run splits them in two, which still sums).
    let db = rusqlite::Connection::open(dir.path("state/outbox.db")).unwrap();
    let counted: f64 = db
        .query_row(
            "SELECT total(value) FROM records WHERE kind = 1 AND name = 'relay_messages'
             AND dims NOT LIKE '%\"all\"%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(counted, sent as f64);
    let files = || -> Vec<String> {
        std::fs::read_dir(dir.path("analytics"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let graphs = || {
        files()
            .iter()
            .filter(|f| f.ends_with("-graph.json"))
            .count()
    };
    // Every file due was written or counted as left.
    let files_left = |log: &str| -> usize {
        log.lines()
            .filter_map(|l| {
                let (head, _) = l.split_once(" analytics files not rewritten before shutdown")?;
                head.rsplit(' ').next()?.parse::<usize>().ok()
            })
            .sum()
    };
    let left = files_left(&log);
    let written = files().iter().filter(|f| !f.ends_with(".tmp")).count();
    assert_eq!(written + left, 2 * users + 2, "{log}");
    let names = files();
    assert!(
        ["usage.csv", "activity.csv"]
            .iter()
            .all(|f| names.iter().any(|g| g == f)),
        "the summaries go first"
    );
    // A restart's first dump rewrites every file, 6,002 here (seconds on
    // this disk): a SIGTERM in the middle of it must not wait for it. (A
    // stop that wrote them all would spare the restart that dump: one
    // missing makes sure it runs.)
    let one = dir.path("analytics/user-0007-spinner-engdes1-graph.json");
    if one.exists() {
        std::fs::remove_file(&one).unwrap();
    }
    std::fs::write(
        &cfg,
        text.replace("dump_interval_secs = 3600", "dump_interval_secs = 1"),
    )
    .unwrap();
    let usage_written = || {
        std::fs::metadata(dir.path("analytics/usage.csv"))
            .and_then(|m| m.modified())
            .unwrap()
    };
    let before = usage_written();
    let restarted = std::time::SystemTime::now();
    let mut again = Agent::start_running(&cfg, "agent2.log");
    // The dump writes the summaries first: once usage.csv is new, it runs.
    assert!(
        wait_until(Duration::from_secs(10), || usage_written() != before),
        "no dump began:\n{}",
        again.stderr()
    );
    std::thread::sleep(Duration::from_millis(100));
    again.stop();
    let log = again.stderr();
    assert!(log.contains("stopped cleanly"), "{log}");
    assert!(!log.contains("cancelled"), "{log}");
    // What that dump did not get to, files older than the restart or not
    // there yet, is what the log counts.
    let stale = std::fs::read_dir(dir.path("analytics"))
        .unwrap()
        .filter(|e| {
            let m = e.as_ref().unwrap().metadata().unwrap();
            m.modified().unwrap() < restarted
        })
        .count();
    let missing = 2 * users + 2 - files().len();
    assert_eq!(stale + missing, files_left(&log), "{log}");
    // The first dump of the next start writes what is left.
    let mut third = Agent::start_running(&cfg, "agent3.log");
    assert!(
        wait_until(Duration::from_secs(30), || graphs() == users),
        "{} of {users} graphs after the restart:\n{}",
        graphs(),
        third.stderr()
    );
    third.stop();
    let files = files();
    assert!(
        !files.iter().any(|f| f.ends_with(".tmp")),
        "temp files left: {:?}",
        files
            .iter()
            .filter(|f| f.ends_with(".tmp"))
            .collect::<Vec<_>>()
    );
    assert_eq!(graphs(), users);
    assert_eq!(
        read(&dir, "user-0042-spinner-engdes1-adjacency.csv")
            .lines()
            .nth(1),
        Some("voltage_step,0.0,0.0,1.0,0.0,0.0,0.0")
    );
}

/// Pointing `files_dir` at the old analytics client's data directory: its
/// matrices are continued (a count of 100 stays 100 and grows), its raw
/// messages are counted as it would have counted them, the chain goes on
/// from its last command, and a restart does not count any of it twice.
#[test]
fn an_old_clients_data_directory_is_continued_not_replaced() {
    let dir = TempDir::new("relay-adopt");
    let hub = Hub::start();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/relay/old-client");
    std::fs::create_dir_all(dir.path("analytics")).unwrap();
    for e in std::fs::read_dir(&fixtures).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "README.md" {
            std::fs::copy(e.path(), dir.path("analytics").join(e.file_name())).unwrap();
        }
    }
    // A second user, as in the issue: 100 transitions so far, no raw file.
    let old = ",voltage_step,voltage_ramp,position_step,position_ramp,speed_step,speed_ramp\n\
        voltage_step,0.0,0.0,100.0,0.0,0.0,0.0\nvoltage_ramp,0.0,0.0,0.0,0.0,0.0,0.0\n\
        position_step,0.0,0.0,0.0,0.0,0.0,0.0\nposition_ramp,0.0,0.0,0.0,0.0,0.0,0.0\n\
        speed_step,0.0,0.0,0.0,0.0,0.0,0.0\nspeed_ramp,0.0,0.0,0.0,0.0,0.0,0.0\n";
    dir.write("analytics/student-2-spinner-engdes1-adjacency.csv", old);
    let cfg = config(&dir, &hub, &["spin30"], "");
    let mut agent = Agent::start_running(&cfg, "agent.log");
    wait_subscribed(&hub, &["spin30"]);
    let u1 = "53a6788c-e689-48d4-9231-c2fbd23df009";
    for (user, log) in [
        (u1, "voltage"),
        ("student-2", "voltage"),
        ("student-2", "position"),
    ] {
        assert_eq!(
            hub.send_text("spin30", &envelope(user, "spin30", "analytics", log)),
            1
        );
    }
    let m1 = format!("{u1}-spinner-engdes1-adjacency.csv");
    let m2 = "student-2-spinner-engdes1-adjacency.csv";
    // u1: the old matrix (9 transitions), the 9 between its 10 raw
    // voltage_ramp commands, and voltage_ramp → voltage_step from ours.
    let want1 = ",voltage_step,voltage_ramp,position_step,position_ramp,speed_step,speed_ramp\n\
        voltage_step,3.0,0.0,1.0,0.0,0.0,0.0\nvoltage_ramp,2.0,9.0,0.0,0.0,0.0,0.0\n\
        position_step,0.0,0.0,0.0,0.0,1.0,0.0\nposition_ramp,0.0,0.0,0.0,0.0,0.0,1.0\n\
        speed_step,0.0,0.0,0.0,1.0,0.0,0.0\nspeed_ramp,0.0,1.0,0.0,0.0,0.0,0.0\n";
    let want2 = old.replace("100.0", "101.0");
    assert!(
        wait_until(Duration::from_secs(15), || read(&dir, &m1) == want1
            && read(&dir, m2) == want2),
        "{}\n{}\n{}",
        read(&dir, &m1),
        read(&dir, m2),
        agent.stderr()
    );
    agent.stop();
    let log = agent.stderr();
    assert!(
        log.contains("continuing the analytics files found in")
            && log.contains("2 user graphs")
            && log.contains("2 adjacency matrices and 1 raw message files"),
        "{log}"
    );
    // A restart: the files are edgemeter's own now; nothing counted twice.
    let mut agent = Agent::start_running(&cfg, "agent2.log");
    wait_subscribed(&hub, &["spin30"]);
    assert_eq!(
        hub.send_text(
            "spin30",
            &envelope("student-2", "spin30", "analytics", "voltage")
        ),
        1
    );
    let want2 = want2.replace(
        "position_step,0.0,0.0,0.0,0.0,0.0,0.0",
        "position_step,1.0,0.0,0.0,0.0,0.0,0.0",
    );
    assert!(
        wait_until(Duration::from_secs(15), || read(&dir, m2) == want2),
        "{}",
        read(&dir, m2)
    );
    assert_eq!(read(&dir, &m1), want1);
    agent.stop();
    assert!(!agent.stderr().contains("continuing the analytics files"));
}

/// A matrix edgemeter cannot read is never replaced: the source stops and
/// says which file and what to do.
#[test]
fn an_unreadable_old_matrix_stops_the_source_and_is_left_as_it_was() {
    let dir = TempDir::new("relay-adopt-bad");
    let hub = Hub::start();
    let bad = ",voltage_step\nvoltage_step,lots\n";
    std::fs::create_dir_all(dir.path("analytics")).unwrap();
    dir.write("analytics/u1-spinner-engdes1-adjacency.csv", bad);
    let cfg = config(&dir, &hub, &["spin30"], "");
    let mut agent = Agent::start_running(&cfg, "agent.log");
    agent.expect_line("is not an adjacency matrix", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(hub.subscribers("spin30"), 0, "the source did not start");
    agent.stop();
    assert_eq!(read(&dir, "u1-spinner-engdes1-adjacency.csv"), bad);
    let log = agent.stderr();
    assert!(log.contains("u1-spinner-engdes1-adjacency.csv"), "{log}");
    assert!(log.contains("move it out of files_dir"), "{log}");
}

/// One large frame on each of many streams: the websocket layer's buffer
/// grown for it is given back afterwards (the connection is rebuilt around
/// the same socket, so nothing is missed), instead of about 2 MiB kept per
/// stream for as long as it stays connected.
#[test]
fn buffers_grown_for_large_frames_are_given_back() {
    let dir = TempDir::new("relay-large");
    let hub = Hub::start();
    let streams: Vec<String> = (30..=53).map(|n| format!("spin{n}")).collect();
    let live: Vec<&str> = streams.iter().map(String::as_str).collect();
    // Events off: the large frames are not stored, only counted.
    let cfg = config(&dir, &hub, &live, "events = false");
    let mut agent = Agent::start_running(&cfg, "agent.log");
    wait_subscribed(&hub, &live);
    let before = rss_kib(agent.pid()).0;
    // Over max_frame_bytes (1 MiB) but under twice it: read, counted as
    // malformed, not parsed.
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(1_900_000));
    for round in 1..=2u64 {
        for s in &live {
            assert_eq!(hub.send_text(s, &big), 1);
            // A ping right behind it, as when the host answers a ping or
            // pings while the large frame is still arriving: it reaches the
            // agent in the same read as the frame's last bytes. (Seen in CI:
            // 1,621 KiB kept per stream when the rebuild waited for a
            // moment with nothing buffered and none came after the frame.)
            assert_eq!(hub.send(s, Message::Ping(Default::default())), 1);
        }
        assert!(
            wait_until(Duration::from_secs(30), || status(&cfg)
                .values()
                .all(|r| r.malformed == round)),
            "{:?}",
            status(&cfg)
        );
    }
    // Small messages still arrive on the rebuilt connections, none missed.
    for s in &live {
        assert_eq!(hub.send_text(s, &envelope("u1", s, "log", "x")), 1);
    }
    assert!(
        wait_until(Duration::from_secs(10), || status(&cfg).values().all(|r| r
            .messages
            == 1
            && r.state == "live"
            && r.reconnects == 0)),
        "{:?}",
        status(&cfg)
    );
    let after = rss_kib(agent.pid()).0;
    let per_stream = (after.saturating_sub(before)) as f64 / live.len() as f64;
    eprintln!("RSS {before} KiB before, {after} KiB after: {per_stream:.0} KiB per stream");
    // Kept with a rebuild after every large frame: 52 to 109 KiB per
    // stream in three runs; 491 to 770 when the rebuild missed the frames
    // a ping followed, 1,621 in that CI run.
    assert!(
        per_stream < 384.0,
        "{per_stream:.0} KiB kept per stream ({before} → {after} KiB)"
    );
    agent.stop();
}

/// `answer_requests = true`: a dashboard on a rig's stream sends the old
/// client's test user's commands, feedback and every kind of request, and
/// gets back what the client itself answers (the fixture written by
/// `scripts/relay-answers-expected`), on its own stream only; garbage
/// requests are counted and answered by nothing; the feedback file is the
/// client's.
#[test]
fn dashboards_are_answered_on_their_own_stream_as_the_old_client_did() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/relay/answers");
    let case: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("test-spinner-engdes1.json")).unwrap(),
    )
    .unwrap();
    let dir = TempDir::new("relay-answers");
    let hub = Hub::start();
    let streams = ["spin30", "spin31"];
    let extra = format!(
        "answer_requests = true\ncomparison_dir = \"{}\"",
        fixtures.join("comparison_graphs").display()
    );
    let cfg = config(&dir, &hub, &streams, &extra);
    let mut agent = Agent::start_running(&cfg, "agent.log");
    wait_subscribed(&hub, &streams);
    let mut dashboard = Student::connect(&hub, "spin30");
    let mut other = Student::connect(&hub, "spin31");
    let quiet = Duration::from_millis(300);

    // Each kind of request once (the per-user burst is 10), and the
    // commands and feedback before them, in the fixture's order.
    let mut asked = std::collections::BTreeSet::new();
    let (mut requests, mut frames) = (0, 0);
    for step in case["steps"].as_array().unwrap() {
        let text = step["send"].as_str().unwrap();
        let m: serde_json::Value = serde_json::from_str(text).unwrap();
        let expect = step["expect"].as_array().unwrap();
        if m["type"] == "request" {
            let content = m["payload"]["content"].as_str().unwrap().to_owned();
            if expect.is_empty() || !asked.insert(content) {
                continue;
            }
            requests += 1;
        }
        dashboard.send(text);
        for want in expect {
            let got = dashboard
                .recv_within(Duration::from_secs(10))
                .unwrap_or_else(|| panic!("no answer to {text}"));
            let got: serde_json::Value = serde_json::from_str(&got).unwrap();
            // As values: the client's `29` and our `29.0` are one number
            // to every JSON reader.
            assert_eq!(as_floats(&got), as_floats(want), "the answer to {text}");
            frames += 1;
        }
        if m["type"] != "request" {
            continue;
        }
        assert_eq!(
            dashboard.recv_within(quiet),
            None,
            "one answer per request: {text}"
        );
    }
    assert_eq!(requests, 7, "every kind of request was asked");
    assert_eq!(frames, 11, "all_feedback is five frames");
    // A request naming a graph that does not exist, or a path: nothing.
    for graph in ["spinner-engdes1-missing", "../data/x"] {
        let req = serde_json::json!({"user": "test", "exp": "spinner", "course": "engdes1",
            "type": "request", "payload": {"content": "comparison_graph", "graph": graph}});
        dashboard.send(&req.to_string());
    }
    // Garbage: no payload, an unknown content, a user that is a path.
    for bad in [
        r#"{"user":"test","type":"request","exp":"spinner","course":"engdes1"}"#,
        r#"{"user":"test","type":"request","exp":"spinner","course":"engdes1","payload":{"content":"everything"}}"#,
        r#"{"user":"../x","type":"request","exp":"spinner","course":"engdes1","payload":{"content":"indicators"}}"#,
    ] {
        dashboard.send(bad);
    }
    assert_eq!(dashboard.recv_within(Duration::from_secs(1)), None);
    assert_eq!(
        other.recv_within(quiet),
        None,
        "another rig's stream hears nothing"
    );

    let want_csv = case["feedback_csv"].as_str().unwrap();
    let name = "test-spinner-engdes1-feedback.csv";
    assert!(
        wait_until(Duration::from_secs(10), || read(&dir, name) == want_csv),
        "analytics/{name} is\n{}\nexpected\n{want_csv}",
        read(&dir, name)
    );
    let line = |out: &str| {
        out.lines()
            .map(str::trim)
            .find(|l| l.starts_with("dashboard requests:"))
            .map(str::to_owned)
    };
    let want = "dashboard requests: answered 7 (student_graph 1, comparison_graph 1, task_identification 1, indicators 1, centroids 1, task_feedback 1, all_feedback 1); not answered 5 (malformed 3, unanswerable 2); feedback kept 5, refused 2; answer frames unsent 0";
    assert!(
        wait_until(Duration::from_secs(5), || {
            line(&edgemeter(&["status", "--config", cfg.to_str().unwrap()]).1).as_deref()
                == Some(want)
        }),
        "{}",
        edgemeter(&["status", "--config", cfg.to_str().unwrap()]).1
    );
    agent.stop();
    assert!(!agent.stderr().contains("ERROR"), "{}", agent.stderr());
}

/// Every number as a float, so JSON values compare as numbers.
fn as_floats(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Number(n) => {
            serde_json::Number::from_f64(n.as_f64().unwrap()).map_or(Value::Null, Value::Number)
        }
        Value::Array(a) => Value::Array(a.iter().map(as_floats).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), as_floats(v))).collect())
        }
        other => other.clone(),
    }
}

/// The old client's `-feedback.csv` files are continued, not replaced, and
/// feedback counts survive a restart (from the saved state, without
/// reading the file again).
#[test]
fn old_feedback_files_are_continued_and_counts_survive_a_restart() {
    let dir = TempDir::new("relay-feedback");
    let hub = Hub::start();
    let comparisons = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/relay/answers/comparison_graphs");
    let header = ",Workbook,Remote work,Hardware,UI,LA,Other,spinner-engdes1-1-core,spinner-engdes1-1-ext,spinner-engdes1-2\n";
    let rows = |engaged: &str, bored: &str| {
        let zero = ",0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0";
        format!(
            "{header}Engaged{engaged}\nCurious{zero}\nDelighted{zero}\nBored{bored}\nConfused{zero}\nFrustrated{zero}\nSurprised{zero}\nAnxious{zero}\n"
        )
    };
    // What the old client left: 3 × Engaged/Workbook, 1 × Bored/UI.
    let old = rows(
        ",3.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0",
        ",0.0,0.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0",
    );
    std::fs::create_dir_all(dir.path("analytics")).unwrap();
    dir.write("analytics/student-7-spinner-engdes1-feedback.csv", &old);
    let extra = format!(
        "answer_requests = true\ncomparison_dir = \"{}\"",
        comparisons.display()
    );
    let cfg = config(&dir, &hub, &["spin30"], &extra);
    let name = "student-7-spinner-engdes1-feedback.csv";
    let feedback = serde_json::json!({"user": "student-7", "exp": "spinner",
        "hardware": "spin30", "course": "engdes1", "type": "feedback",
        "payload": {"state": "Engaged", "subject": "Workbook"}})
    .to_string();
    for (round, engaged) in [(1, "4.0"), (2, "5.0")] {
        let mut agent = Agent::start_running(&cfg, "agent.log");
        wait_subscribed(&hub, &["spin30"]);
        assert_eq!(hub.send_text("spin30", &feedback), 1);
        let want = rows(
            &format!(",{engaged},0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0"),
            ",0.0,0.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0",
        );
        assert!(
            wait_until(Duration::from_secs(10), || read(&dir, name) == want),
            "round {round}: analytics/{name} is\n{}\nexpected\n{want}",
            read(&dir, name)
        );
        agent.stop();
        let log = agent.stderr();
        assert!(!log.contains("ERROR"), "{log}");
        assert_eq!(
            log.contains("continuing 1 of 1 feedback files"),
            round == 1,
            "round {round}: {log}"
        );
    }
}

/// Relay messages arriving in bursts are stored several to an outbox row
/// (src/outbox: "Rows"); an upstream sink with `events = true` must still
/// get every message once, as it was sent, in batches that end inside rows.
/// The upstream starts only after everything is committed, so the test
/// sees the rows before they are delivered and deleted.
#[test]
fn messages_stored_several_to_a_row_reach_the_upstream_each_once() {
    const STREAMS: [&str; 3] = ["r1", "r2", "r3"];
    const BURSTS: usize = 10;
    const PER_BURST: usize = 20;
    let dir = TempDir::new("relay-rows");
    let hub = Hub::start();
    let port = common::pg::free_port();
    dir.write("edge.token", "token-of-edge-0123456789");
    dir.write("admin.token", "admin-token-0123456789");
    std::fs::create_dir_all(dir.path("agents")).expect("tokens dir");
    dir.write("agents/lab-host.token", "token-of-edge-0123456789");
    let cfg = config(
        &dir,
        &hub,
        &STREAMS,
        &format!(
            r#"
[[sink]]
type = "upstream"
endpoint = "http://127.0.0.1:{port}"
token_file = "edge.token"
events = true
batch_max_records = 25
retry_initial_secs = 0.05
retry_max_secs = 0.2
"#
        ),
    );
    let mut agent = Agent::start(&cfg, "info");
    wait_subscribed(&hub, &STREAMS);
    let mut sent: Vec<serde_json::Value> = Vec::new();
    for burst in 0..BURSTS {
        for s in STREAMS {
            for k in 0..PER_BURST {
                let text = envelope(
                    &format!("u{k}"),
                    s,
                    "analytics",
                    &format!("{s}-{burst}-{k}"),
                );
                sent.push(serde_json::from_str(&text).expect("json"));
                hub.send_text(s, &text);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let events = STREAMS.len() * BURSTS * PER_BURST;
    let rows = || -> Option<(i64, i64, i64)> {
        let db = rusqlite::Connection::open_with_flags(
            dir.path("state/outbox.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .ok()?;
        db.query_row(
            "SELECT COUNT(*), COALESCE(SUM(n), 0), COALESCE(MAX(n), 0) FROM records
             WHERE kind = 3 AND name != 'relay_malformed'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .ok()
    };
    assert!(
        wait_until(Duration::from_secs(20), || rows()
            .is_some_and(|(_, n, _)| n == events as i64)),
        "not every message was committed: {:?}\n{}",
        rows(),
        agent.stderr()
    );
    let (stored_rows, _, most) = rows().expect("rows");
    eprintln!("{events} messages in {stored_rows} rows, at most {most} to a row");
    assert!(
        most > 1 && stored_rows < events as i64 / 2,
        "bursts were not stored several to a row: {stored_rows} rows, at most {most}"
    );

    let up_cfg = dir.write(
        "up.toml",
        &format!(
            r#"[agent]
id = "up"
state_dir = "up-state"
flush_interval_secs = 0.05

[upstream]
listen = "127.0.0.1:{port}"
store = "sqlite"
tokens_dir = "agents"
admin_token_file = "admin.token"
"#
        ),
    );
    let mut up = Agent::start_upstream(&up_cfg, "info", &[]);
    let fetch = || -> Vec<serde_json::Value> {
        let (status, body) = common::http::http(
            port,
            "GET",
            "/v1/events?range=1D&limit=10000",
            Some("admin-token-0123456789"),
            "",
            b"",
        );
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("JSON")["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(30), || fetch().len() >= events),
        "the upstream has {} of {events} events\n{}",
        fetch().len(),
        agent.stderr()
    );
    let mut got: Vec<String> = fetch().iter().map(|e| e["payload"].to_string()).collect();
    let mut want: Vec<String> = sent.iter().map(|v| v.to_string()).collect();
    got.sort();
    want.sort();
    assert_eq!(got.len(), want.len(), "an event arrived twice");
    assert_eq!(got, want);
    agent.stop();
    up.stop();
}

/// An agent on one stream of a fresh hub, subscribed, whose one sink takes
/// events but never delivers them (nothing listens on port 9): every
/// message stays in the outbox to be counted.
/// A sink that takes events and never delivers them (nothing listens on
/// port 9): they stay in the outbox. Needs `edge.token` in the test's dir.
const SINK_KEEPING_EVENTS: &str = r#"
[[sink]]
type = "upstream"
endpoint = "http://127.0.0.1:9"
token_file = "edge.token"
events = true
"#;

fn agent_keeping_events(tag: &str, stream: &str) -> (TempDir, Hub, Agent) {
    let dir = TempDir::new(tag);
    let hub = Hub::start();
    dir.write("edge.token", "token-of-edge-0123456789");
    let cfg = config(&dir, &hub, &[stream], SINK_KEEPING_EVENTS);
    let agent = Agent::start(&cfg, "info");
    wait_subscribed(&hub, &[stream]);
    (dir, hub, agent)
}

/// Relay messages committed to the outbox (a row may hold several).
fn committed_messages(dir: &TempDir) -> i64 {
    committed_messages_in(&dir.path("state/outbox.db"))
}

/// The same, of the outbox at `db`.
fn committed_messages_in(db: &Path) -> i64 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|db| {
            db.query_row(
            "SELECT COALESCE(SUM(n), 0) FROM records WHERE kind = 3 AND name != 'relay_malformed'",
            [],
            |r| r.get(0),
        )
        })
        .unwrap_or(0)
}

/// A read's records go to the outbox writer together, once its frames are
/// used up (`Emitter::emit_all`). A host that sends a burst and closes in
/// one write ends the connection with that read's records still held: they
/// must be handed over when the link ends, not when it is read again. Here
/// it never is: the host refuses every reconnect.
#[test]
fn a_burst_that_ends_with_the_hosts_close_is_committed_though_the_stream_never_returns() {
    const BURST: usize = 40;
    let (dir, hub, agent) = agent_keeping_events("relay-close", "c1");
    // Frozen, the hub queues; thawed, it writes the queue in one go.
    hub.freeze();
    for k in 0..BURST {
        let text = envelope(&format!("u{k}"), "c1", "log", &format!("m{k}"));
        assert_eq!(hub.send_text("c1", &text), 1);
    }
    assert_eq!(hub.send("c1", Message::Close(None)), 1);
    hub.refuse("c1");
    let closed = Instant::now();
    hub.thaw();
    let events = || committed_messages(&dir);
    assert!(
        wait_until(Duration::from_secs(5), || events() == BURST as i64),
        "{} of {BURST} messages committed {:.1} s after the close\n{}",
        events(),
        closed.elapsed().as_secs_f64(),
        agent.stderr()
    );
    assert_eq!(
        hub.connects().len(),
        1,
        "every reconnect was refused: the messages came from the first connection"
    );
}

/// A stream whose socket never runs dry: a host writing faster than we
/// read. A read's records wait to be handed over together only while the
/// next frame is ready; at first they also waited without bound, and the
/// relay bench's sustained phase stored nothing while it lasted. Now at
/// most 64 wait, so records are committed while the host is still writing.
#[test]
fn a_stream_that_never_runs_dry_is_committed_while_it_flows() {
    const MESSAGES: usize = 100_000;
    let (dir, hub, agent) = agent_keeping_events("relay-flood", "f1");
    // Unmasked server text frames (RFC 6455 §5.2), written in one go. The
    // first frame is 243 bytes and every other 244: the frames then never
    // end where a read of 4 KiB does, so the only moment with no frame
    // ready is the end.
    let mut bytes = Vec::new();
    for k in 0..MESSAGES {
        let user = format!("u{}", k % 200);
        let len = if k == 0 { 239 } else { 240 };
        let short = envelope(&user, "f1", "log", &format!("m{k}-"));
        let pad = "x".repeat(len - short.len());
        let text = envelope(&user, "f1", "log", &format!("m{k}-{pad}"));
        assert_eq!(text.len(), len);
        bytes.push(0x81);
        if text.len() < 126 {
            bytes.push(text.len() as u8);
        } else {
            bytes.push(126);
            bytes.extend_from_slice(&(text.len() as u16).to_be_bytes());
        }
        bytes.extend_from_slice(text.as_bytes());
    }
    let total = bytes.len();
    let mut sockets = hub.raw_sockets("f1");
    assert_eq!(sockets.len(), 1);
    let mut socket = sockets.remove(0);
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        socket.write_all(&bytes).map(|()| Instant::now())
    });
    let events = || committed_messages(&dir);
    // While the host still writes, the socket is never empty.
    let started = Instant::now();
    let mut while_writing = 0;
    while !writer.is_finished() && started.elapsed() < Duration::from_secs(120) {
        while_writing = events();
        if while_writing > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let done = writer
        .join()
        .expect("writer")
        .expect("the agent read it all");
    assert!(
        while_writing > 0,
        "nothing was committed while the host wrote {total} bytes ({:.1} s)\n{}",
        (done - started).as_secs_f64(),
        agent.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(120), || events() == MESSAGES as i64),
        "{} of {MESSAGES} messages committed\n{}",
        events(),
        agent.stderr()
    );
}

/// The fsyncs in an `strace -f -ttt -y` trace: (time, file) each.
fn fsyncs(trace: &str) -> Vec<(f64, String)> {
    trace
        .lines()
        .filter_map(|line| {
            // `PID SECS.MICROS CALL(FD</path>…`
            let mut words = line.split_whitespace();
            let at: f64 = words.nth(1)?.parse().ok()?;
            let call = words.next()?;
            let name = call.split('(').next()?;
            if !matches!(name, "fsync" | "fdatasync" | "syncfs" | "sync_file_range") {
                return None;
            }
            let file = call.split_once('<')?.1.split('>').next()?;
            Some((at, file.to_owned()))
        })
        .collect()
}

/// The wall clock as `strace -ttt` prints it.
fn epoch_secs() -> f64 {
    common::now_ms() as f64 / 1000.0
}

/// Issue 18: an SD card sees about one fsync a second from the whole agent
/// at steady load, not one from the outbox plus one per save of the relay
/// analytics (every 2 s, with `synchronous = FULL` until then). The agent
/// is traced (`strace`, every fsync with its file) through 10 s of 2,000
/// messages a second kept as events, then a quiet spell in which the
/// analytics saved must be synced once, 30 s after the first save (no
/// later change wakes the source for it), then its shutdown.
#[test]
fn the_whole_agent_fsyncs_once_a_second_and_the_analytics_30_s_after_a_save() {
    const STEADY_SECS: u64 = 10;
    // `store::SYNC_EVERY`, and what may come before and after it: the
    // first change waits up to 2 s for its save, and the sync, once due,
    // waits the 2 s in which the flush gathers changes (plus a margin).
    const SYNC_AFTER: f64 = 30.0;
    const SYNC_LATE: f64 = 2.0 + 2.0 + 3.0;
    const PER_TICK: usize = 20; // every 10 ms: 2,000 messages a second
    let strace = std::process::Command::new("strace").arg("-V").output();
    assert!(
        strace.is_ok_and(|o| o.status.success()),
        "this test needs strace; install with: sudo apt-get install strace (scripts/test does)"
    );
    let (dir, hub, mut agent) = agent_keeping_events("relay-fsync", "s1");
    let send_for = |d: Duration, k: &mut usize| {
        let start = Instant::now();
        let mut tick = 0u32;
        while start.elapsed() < d && tick < 100_000 {
            for _ in 0..PER_TICK {
                let text = envelope(
                    &format!("u{}", *k % 50),
                    "s1",
                    "log",
                    &format!("c{}", *k % 7),
                );
                hub.send_text("s1", &text);
                *k += 1;
            }
            tick += 1;
            let next = start + Duration::from_millis(10) * tick;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    };
    let mut sent = 0;
    // Warm up: the first saves and dumps come before the trace begins.
    let first_message = epoch_secs();
    send_for(Duration::from_secs(3), &mut sent);
    let trace = dir.path("fsyncs.trace");
    let mut tracer = std::process::Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-ttt",
            "-y",
            "-e",
            "trace=fsync,fdatasync,syncfs,sync_file_range",
            "-o",
        ])
        .arg(&trace)
        .args(["-p", &agent.pid().to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path("strace.err")).expect("strace's stderr"))
        .spawn()
        .expect("start strace");
    // strace says nothing when it has attached: the steady window begins
    // once its file exists, plus a margin.
    assert!(
        wait_until(Duration::from_secs(10), || trace.exists()),
        "strace did not start"
    );
    std::thread::sleep(Duration::from_millis(300));
    let from = epoch_secs();
    send_for(Duration::from_secs(STEADY_SECS), &mut sent);
    let to = epoch_secs();
    // Quiet: no message, so only the flush task's timer can bring the sync.
    let quiet_until = first_message + SYNC_AFTER + SYNC_LATE + 1.0;
    std::thread::sleep(Duration::from_secs_f64(
        (quiet_until - epoch_secs()).clamp(0.0, 40.0),
    ));
    let stopping = epoch_secs();
    agent.stop();
    let traced = wait_until(Duration::from_secs(10), || {
        tracer.try_wait().is_ok_and(|s| s.is_some())
    });
    if !traced {
        let _ = tracer.kill();
        let _ = tracer.wait();
    }
    assert!(traced, "strace did not end with the agent");
    let all = fsyncs(&std::fs::read_to_string(&trace).expect("the trace"));
    let steady: Vec<&(f64, String)> = all.iter().filter(|(t, _)| (from..to).contains(t)).collect();
    let of =
        |set: &[&(f64, String)], file: &str| set.iter().filter(|(_, f)| f.ends_with(file)).count();
    let listing = || {
        let said = std::fs::read_to_string(dir.path("strace.err")).unwrap_or_default();
        all.iter()
            .map(|(t, f)| format!("{:.3} s after the first message: {f}", t - first_message))
            .chain((!said.is_empty()).then(|| format!("strace said: {said}")))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let secs = to - from;
    eprintln!(
        "fsyncs in {secs:.1} s of steady load ({sent} messages): {} ({} of the outbox's WAL); after SIGTERM: {}",
        steady.len(),
        of(&steady, "state/outbox.db-wal"),
        all.iter().filter(|(t, _)| *t >= stopping).count()
    );
    // The outbox's once a second (half of them, on a loaded machine):
    // proof that the trace sees the agent's fsyncs at all, so that the
    // bound below cannot pass by seeing none.
    assert!(
        of(&steady, "state/outbox.db-wal") as f64 >= secs / 2.0,
        "the outbox's WAL was synced {} times in {secs:.1} s; every fsync:\n{}",
        of(&steady, "state/outbox.db-wal"),
        listing()
    );
    assert_eq!(
        of(&steady, "relay-lab.db-wal") + of(&steady, "relay-lab.db"),
        0,
        "the analytics saves (every 2 s) are not synced each; every fsync:\n{}",
        listing()
    );
    assert!(
        steady.len() as f64 <= secs + 1.0,
        "{} fsyncs in {secs:.1} s of steady load ({sent} messages sent); every fsync:\n{}",
        steady.len(),
        listing()
    );
    // The saves began with the first messages and were never synced: one
    // sync, once due, and none while nothing is saved.
    let quiet: Vec<f64> = all
        .iter()
        .filter(|(t, f)| (to..stopping).contains(t) && f.ends_with("relay-lab.db-wal"))
        .map(|(t, _)| t - first_message)
        .collect();
    eprintln!(
        "the analytics' WAL synced in the quiet spell at {quiet:.1?} s after the first message"
    );
    assert!(
        quiet.len() == 1 && (SYNC_AFTER..SYNC_AFTER + SYNC_LATE).contains(&quiet[0]),
        "the analytics' WAL must be synced once, {SYNC_AFTER} to {} s after the first message; it was at {quiet:.1?} s; every fsync:\n{}",
        SYNC_AFTER + SYNC_LATE,
        listing()
    );
    // At shutdown the file is synced, by the source's last sync (when
    // saves wait for one) or by SQLite's checkpoint as the connection
    // closes: this checks that it is, not which.
    let at_stop: Vec<&(f64, String)> = all.iter().filter(|(t, _)| *t >= stopping).collect();
    assert!(
        of(&at_stop, "relay-lab.db-wal") >= 1,
        "the analytics' file was not synced at shutdown; every fsync:\n{}",
        listing()
    );
    assert!(committed_messages(&dir) > 0, "no message was committed");
}

/// The N of the log line with `needle` that ends a spell of failures:
/// "… again, after N failed …".
fn failures_before(log: &str, needle: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line says `{needle}`:\n{log}"));
    eprintln!("{line}");
    line.split("after ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in `{line}`"))
}

/// The analytics' file cannot be written for a while (here another process
/// holds its write lock; a full disk fails a flush the same way, every
/// 2 s): the log says so once, not once per flush, and says when a flush
/// works again; the changes of the failed flushes are saved then.
#[test]
fn a_failing_analytics_flush_is_said_once_a_spell_and_nothing_is_lost() {
    let (dir, hub, mut agent) = agent_keeping_events("relay-spell", "s1");
    let db = dir.path("state/relay-lab.db");
    let mut sent = 0u64;
    let mut send = |n: usize| {
        for _ in 0..n {
            let text = envelope(&format!("u{}", sent % 5), "s1", "log", "x");
            assert_eq!(hub.send_text("s1", &text), 1);
            sent += 1;
        }
    };
    let saved = |db: &Path| -> i64 {
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| {
                c.query_row("SELECT COALESCE(SUM(messages), 0) FROM activity", [], |r| {
                    r.get(0)
                })
            })
            .unwrap_or(0)
    };
    send(10);
    assert!(
        wait_until(Duration::from_secs(15), || saved(&db) == 10),
        "the first save did not come: {} saved\n{}",
        saved(&db),
        agent.stderr()
    );
    let lock = rusqlite::Connection::open(&db).expect("open the analytics' file");
    lock.execute_batch("BEGIN EXCLUSIVE")
        .expect("take its write lock");
    // Each flush now waits the store's 5 s busy timeout and fails: at
    // least two fail in 25 s.
    let locked = Instant::now();
    let mut rounds = 0;
    while locked.elapsed() < Duration::from_secs(25) && rounds < 100 {
        send(5);
        rounds += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    lock.execute_batch("ROLLBACK").expect("release the lock");
    drop(lock);
    send(5);
    let sent_all = sent as i64;
    assert!(
        wait_until(Duration::from_secs(20), || agent
            .stderr()
            .contains("the analytics flush works again")),
        "no line said the flush works again\n{}",
        agent.stderr()
    );
    assert!(
        wait_until(Duration::from_secs(10), || saved(&db) == sent_all),
        "{} of {sent_all} messages in the saved analytics\n{}",
        saved(&db),
        agent.stderr()
    );
    agent.stop();
    let log = agent.stderr();
    let said = log
        .lines()
        .filter(|l| l.contains("database is locked"))
        .count();
    let failed = failures_before(&log, "the analytics flush works again");
    eprintln!(
        "{}",
        log.lines()
            .filter(|l| l.contains("database is locked") || l.contains("works again"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        failed >= 2 && said == 1,
        "{failed} flushes failed and the log said so {said} times (once is right)\n{log}"
    );
}

/// The status file cannot be replaced (here a directory stands in its
/// place; a full disk fails it the same way, at every change): the log
/// says so once, and says when it is written again. A disk that is nearly
/// full fails one write and not the next: each such flap was two lines
/// (a failure, "written again"); the spell now ends only once no write
/// failed for 10 s, so the flaps are one spell, said in two lines.
#[test]
fn a_status_file_that_cannot_be_written_is_said_once_a_spell_though_it_comes_and_goes() {
    let dir = TempDir::new("relay-status-spell");
    let hub = Hub::start();
    let status = dir.path("state/source-lab.status");
    let blocker = dir.path("state/source-lab.status/in-the-way");
    std::fs::create_dir_all(&blocker).expect("a directory where the status file goes");
    let cfg = config(&dir, &hub, &["s1"], "");
    let mut agent = Agent::start(&cfg, "info");
    wait_subscribed(&hub, &["s1"]);
    let failures = |agent: &Agent| {
        agent
            .stderr()
            .lines()
            .filter(|l| l.contains("source-lab.status") && l.contains("[WARN]"))
            .count()
    };
    // Every flush (2 s) changes the counts, so the status is written again.
    // Blocked for 8 s, then 3 s free and 3 s blocked, twice.
    let started = Instant::now();
    let mut k = 0;
    let mut flaps = 0;
    while started.elapsed() < Duration::from_secs(20) && k < 1000 {
        let blocked = match started.elapsed().as_secs() {
            0..8 => true,
            s => (s - 8) % 6 >= 3,
        };
        if blocked != blocker.exists() {
            if blocked {
                // The agent may write the file between the two steps.
                let block = || {
                    std::fs::remove_file(&status).ok();
                    std::fs::create_dir_all(&blocker).is_ok()
                };
                assert!((0..10).any(|_| block()), "cannot block the status file");
                flaps += 1;
            } else {
                std::fs::remove_dir_all(&status).expect("clear the way");
            }
        }
        assert_eq!(
            hub.send_text("s1", &envelope(&format!("u{k}"), "s1", "log", "x")),
            1
        );
        k += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(flaps, 2, "blocked again twice");
    if blocker.exists() {
        std::fs::remove_dir_all(&status).expect("clear the way");
    }
    assert_eq!(hub.send_text("s1", &envelope("again", "s1", "log", "x")), 1);
    assert!(
        agent.wait_for_line(
            "source-lab.status written again, after",
            Duration::from_secs(25)
        ),
        "no line said the status is written again\n{}",
        agent.stderr()
    );
    agent.stop();
    assert!(status.is_file());
    let log = agent.stderr();
    let failed = failures_before(&log, "written again, after");
    assert!(
        failed >= 4 && failures(&agent) == 1,
        "{failed} writes failed and the log said so {} times (once is right)\n{log}",
        failures(&agent)
    );
    common::the_settled_end(&log, "written again");
}

/// A restart with the saved state of `max_users` users (100,000, the
/// default), up to its first dump's summaries. The agent peaked at 123 MiB
/// resident in the release build (134 in the debug build this test runs)
/// and kept 103 just loading the state, for analytics that need about 52:
/// - it read every row into maps of strings, then made them its own;
/// - the scan of `files_dir` for the old client's files was given every
///   graph's key as three strings (25 MiB), to know which to skip;
/// - `usage.csv` and `activity.csv` were built from spelled copies of all
///   rows and a tree of cells per user.
///
/// Rows now go into the analytics as SQLite hands them over, the scan asks
/// a copy of the names and the keys' ids, and the summaries are written on
/// the worker as they are spelled, from a copy of the names and the cells:
/// 62 MiB at the summaries (release), 75 here.
#[test]
fn a_restart_of_100000_users_holds_little_beyond_their_analytics() {
    let users = 100_000;
    let dir = TempDir::new("relay-restart-memory");
    let hub = Hub::start();
    save_users_state(&dir, users);
    let cfg = config(&dir, &hub, &["spin30"], "");
    let mut agent = Agent::start_running(&cfg, "agent.log");
    let loaded = format!("analytics state: {users} user×hardware rows, {users} graphs");
    assert!(
        agent.wait_for_line(&loaded, Duration::from_secs(60)),
        "no line saying {loaded:?}:\n{}",
        agent.stderr()
    );
    // The first dump's first part: the summaries, then 500 graphs.
    let lines = |name: &str| read(&dir, name).lines().count();
    assert!(
        wait_until(Duration::from_secs(60), || lines("usage.csv") == users + 1
            && lines("activity.csv") == users + 1),
        "usage.csv {} and activity.csv {} lines for {users} users:\n{}",
        lines("usage.csv"),
        lines("activity.csv"),
        agent.stderr()
    );
    let (rss, peak) = rss_kib(agent.pid());
    agent.stop();
    let usage = read(&dir, "usage.csv");
    assert_eq!(
        usage.lines().take(2).collect::<Vec<_>>(),
        ["user,spin30", "5e1f0000-0000-4000-8000-000000000000,20"]
    );
    assert!(
        peak < 96 * 1024,
        "peak {peak} KiB (now {rss} KiB) restarting with {users} users' state: more than 96 MiB"
    );
}

/// Bytes the process has read through read(2) and the like (`rchar`).
fn bytes_read(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("/proc/PID/io");
    let line = io.lines().find(|l| l.starts_with("rchar:")).expect("rchar");
    line["rchar:".len()..].trim().parse().expect("a number")
}

/// Raw files grow with every message (`raw_files = true`), and the old
/// client's are left where it wrote them: a host up for months would read
/// them all at each start, before its streams connect. A restart reads
/// only those something else changed since edgemeter last wrote or read
/// them, and what such a file adds is still continued.
#[test]
fn a_restart_reads_again_only_the_raw_files_something_else_changed() {
    let dir = TempDir::new("relay-raw-marks");
    let hub = Hub::start();
    // The old client's raw lines of one user, 20 MB of them.
    let line = |user: &str, log: &str| {
        format!(
            "{{\"user\": \"{user}\", \"t\": 1673351988407, \"exp\": \"spinner\", \"hardware\":\"spin31\", \"course\": \"engdes1\", \"type\": \"analytics\", \"payload\": {{\"log\": \"{log}\", \"data\": {{\"set\": 1}}}}}}\n"
        )
    };
    let old = line("old-user", "voltage_ramp").repeat(100_000);
    std::fs::create_dir_all(dir.path("analytics")).unwrap();
    dir.write("analytics/old-user-spin31-spinner-engdes1.json", &old);
    let cfg = config(&dir, &hub, &["spin30"], "raw_files = true");

    // The first start adopts them; edgemeter's own raw files are written.
    let mut agent = Agent::start_running(&cfg, "agent.log");
    wait_subscribed(&hub, &["spin30"]);
    let users = ["u-1", "u-2", "u-3"];
    for u in users {
        for log in ["voltage", "position"] {
            assert_eq!(
                hub.send_text("spin30", &envelope(u, "spin30", "analytics", log)),
                1
            );
        }
    }
    let own = |u: &str| read(&dir, &format!("{u}-spin30-spinner-engdes1.json"));
    assert!(
        wait_until(Duration::from_secs(15), || users
            .iter()
            .all(|u| own(u).lines().count() == 2)),
        "{}",
        agent.stderr()
    );
    agent.stop();
    let log = agent.stderr();
    assert!(
        log.contains(
            "1 user graphs (99999 transitions) from 0 adjacency matrices and 1 raw message files"
        ) && log.contains(": 1 read, 0 not read again (unchanged since edgemeter"),
        "{log}"
    );

    // The second reads none of them: not the 20 MB, nor its own.
    let mut agent = Agent::start_running(&cfg, "agent2.log");
    agent.expect_line("not read again", Duration::from_secs(15));
    wait_subscribed(&hub, &["spin30"]);
    let read_at_start = bytes_read(agent.pid());
    assert!(
        read_at_start < old.len() as u64 / 4,
        "{read_at_start} bytes read at start, with {} in raw files:\n{}",
        old.len(),
        agent.stderr()
    );
    agent.stop();
    let log = agent.stderr();
    assert!(log.contains(": 0 read, 4 not read again"), "{log}");
    assert!(!log.contains("continuing the analytics files"), "{log}");

    // Something else adds a user's line to one of edgemeter's files: that
    // file is read again, and only that user is new.
    let path = dir.path("analytics/u-2-spin30-spinner-engdes1.json");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut f, line("late-user", "speed").as_bytes()).unwrap();
    drop(f);
    let mut agent = Agent::start_running(&cfg, "agent3.log");
    wait_subscribed(&hub, &["spin30"]);
    assert_eq!(
        hub.send_text(
            "spin30",
            &envelope("late-user", "spin30", "analytics", "voltage")
        ),
        1
    );
    let late = "late-user-spinner-engdes1-adjacency.csv";
    assert!(
        wait_until(Duration::from_secs(15), || read(&dir, late)
            .lines()
            .any(|l| l.starts_with("speed_step,1.0,"))),
        "{}\n{}",
        read(&dir, late),
        agent.stderr()
    );
    agent.stop();
    let log = agent.stderr();
    assert!(
        log.contains(": 1 read, 3 not read again")
            && log.contains(
                "1 user graphs (0 transitions) from 0 adjacency matrices and 1 raw message files"
            ),
        "{log}"
    );
}

/// The raw-bound tests' agent: spin30 with raw files and a bound of 1 MiB.
fn raw_bound_agent(tag: &str) -> (TempDir, Hub, std::path::PathBuf) {
    let dir = TempDir::new(tag);
    let hub = Hub::start();
    let extra = "raw_files = true\nraw_files_max_bytes = 1048576";
    let cfg = config(&dir, &hub, &["spin30"], extra);
    (dir, hub, cfg)
}

/// The raw-bound tests' message `n` of `user` on spin30: about 176 bytes,
/// each line its own (`t` counts).
fn raw_bound_message(user: &str, n: usize) -> String {
    let log = ["voltage", "position", "speed"][n % 3];
    serde_json::json!({"user": user, "t": n, "exp": "spinner", "hardware": "spin30",
        "course": "engdes1", "type": "analytics",
        "payload": {"log": log, "data": {"set": n, "note": "raw-bound-test-padding"}}})
    .to_string()
}

/// Raw lines are appended every 2 s, the analytics files rewritten every
/// `dump_interval_secs`: a host with a long dump interval (an hour) passed
/// the bound by an hour of messages before anything was cut. The bound is
/// now kept at the save that passes it.
#[test]
fn raw_files_are_kept_within_their_bound_between_dumps() {
    let (dir, hub, cfg) = raw_bound_agent("relay-raw-between-dumps");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("dump_interval_secs = 1", "dump_interval_secs = 3600");
    std::fs::write(&cfg, &text).unwrap();
    let message = raw_bound_message;
    let users: Vec<String> = (0..40).map(|i| format!("u-{i:02}")).collect();
    let held = || -> u64 {
        users
            .iter()
            .map(|u| {
                std::fs::metadata(dir.path(&format!("analytics/{u}-spin30-spinner-engdes1.json")))
                    .map_or(0, |m| m.len())
            })
            .sum()
    };
    let mut agent = Agent::start_running(&cfg, "agent.log");
    wait_subscribed(&hub, &["spin30"]);
    // 40 users of 160 messages, about 1.1 MB: past the bound of 1 MiB an
    // hour before the first dump.
    for k in 0..160 {
        for u in &users {
            assert_eq!(hub.send_text("spin30", &message(u, k)), 1);
        }
    }
    agent.expect_line("were cut to their last message", Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(10), || held() <= 1 << 20),
        "{} bytes held:\n{}",
        held(),
        agent.stderr()
    );
    let (code, out, err) = edgemeter(&["status", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            " of 1.00 MiB (raw_files_max_bytes); cut to their last message since the start: "
        ),
        "{out}"
    );
    agent.stop();
}

/// Raw files grow with every message and nothing else empties them: a
/// host up for months would fill its disk. Past `raw_files_max_bytes`, the
/// least recently written are cut to their last message (as the old client
/// emptied a user's file once counted) until they hold three quarters of
/// it; the counts stay whole, and a restart neither reads the cut files
/// again nor counts anything twice.
#[test]
fn raw_files_past_their_bound_are_cut_least_recently_written_first() {
    let (dir, hub, cfg) = raw_bound_agent("relay-raw-bound");
    let message = raw_bound_message;
    let raw_file = |u: &str| read(&dir, &format!("{u}-spin30-spinner-engdes1.json"));
    let old: Vec<String> = (0..20).map(|i| format!("old-{i:02}")).collect();
    let new: Vec<String> = (0..20).map(|i| format!("new-{i:02}")).collect();
    let send = |users: &[String], n: usize| {
        for k in 0..n {
            for u in users {
                assert_eq!(hub.send_text("spin30", &message(u, k)), 1);
            }
        }
    };
    let mut agent = Agent::start_running(&cfg, "agent.log");
    wait_subscribed(&hub, &["spin30"]);

    // 20 users of 200 messages (0.7 MB), written first; then 20 of 100:
    // 1.06 MB in all, past the bound of 1 MiB.
    send(&old, 200);
    assert!(
        wait_until(Duration::from_secs(20), || old
            .iter()
            .all(|u| raw_file(u).lines().count() == 200)),
        "{}",
        agent.stderr()
    );
    let size = raw_file(&old[0]).len() as u64;
    send(&new, 100);
    agent.expect_line("were cut to their last message", Duration::from_secs(20));
    let held = |users: &[String]| -> u64 { users.iter().map(|u| raw_file(u).len() as u64).sum() };
    assert!(
        wait_until(Duration::from_secs(20), || new
            .iter()
            .all(|u| raw_file(u).lines().count() == 100)
            && held(&old) + held(&new) <= 3 << 18),
        "{} + {} bytes held:\n{}",
        held(&old),
        held(&new),
        agent.stderr()
    );

    // The old users' files were cut, each to its last message, and only as
    // many as it took; the new users' are whole.
    let cut: Vec<&String> = old
        .iter()
        .filter(|u| raw_file(u).lines().count() == 1)
        .collect();
    for u in &cut {
        assert_eq!(raw_file(u), format!("{}\n", message(u, 199)), "{u}");
    }
    for u in old.iter().filter(|u| !cut.contains(u)) {
        assert_eq!(raw_file(u).lines().count(), 200, "{u} is cut or torn");
    }
    let total = 20 * size + held(&new);
    let needed = (total - (3 << 18)).div_ceil(size - size / 200) as usize;
    assert!(
        cut.len() >= needed && cut.len() <= needed + 1,
        "{} cut, {needed} needed to free {} of {total} bytes",
        cut.len(),
        total - (3 << 18)
    );
    let log = agent.stderr();
    let said = log
        .lines()
        .find(|l| l.contains("were cut to their last message"))
        .unwrap();
    assert!(
        said.contains("more than raw_files_max_bytes (1.00 MiB): the ")
            && said.contains(&format!(
                ": the {} files written least recently were cut",
                cut.len()
            ))
            && said.contains("(their counts are in the analytics)"),
        "{said}"
    );
    let (code, out, err) = edgemeter(&["status", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            " of 1.00 MiB (raw_files_max_bytes); cut to their last message since the start: "
        ) && out.contains(&format!("start: {} files, ", cut.len())),
        "{out}"
    );
    agent.stop();

    // The counts are whole, and stay so across a restart that reads no raw
    // file again.
    let usage = |users: &[String], n: u64| {
        let text = read(&dir, "usage.csv");
        users
            .iter()
            .all(|u| text.lines().any(|l| l == format!("{u},{n}")))
    };
    assert!(
        usage(&old, 200) && usage(&new, 100),
        "{}",
        read(&dir, "usage.csv")
    );
    let mut agent = Agent::start_running(&cfg, "agent2.log");
    agent.expect_line("not read again", Duration::from_secs(15));
    wait_subscribed(&hub, &["spin30"]);
    send(&new[..1], 1);
    assert!(
        wait_until(Duration::from_secs(20), || usage(&new[..1], 101)),
        "{}",
        read(&dir, "usage.csv")
    );
    agent.stop();
    let log = agent.stderr();
    assert!(log.contains(": 0 read, 40 not read again"), "{log}");
    assert!(
        usage(&old, 200) && usage(&new[1..], 100),
        "{}",
        read(&dir, "usage.csv")
    );
}

/// Each analytics file in `files_dir` with its modification time.
fn file_times(dir: &TempDir) -> BTreeMap<String, std::time::SystemTime> {
    let Ok(entries) = std::fs::read_dir(dir.path("analytics")) else {
        return BTreeMap::new();
    };
    // Not the writer's temp files (hidden), which come and go.
    entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let time = e.metadata().and_then(|m| m.modified()).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), time))
        })
        .collect()
}

/// Files whose time differs from `before`'s, or that are new.
fn rewritten(before: &BTreeMap<String, std::time::SystemTime>, dir: &TempDir) -> Vec<String> {
    file_times(dir)
        .into_iter()
        .filter(|(n, t)| before.get(n) != Some(t))
        .map(|(n, _)| n)
        .collect()
}

/// Every start rewrote every user's two files from the saved state (in
/// case the last run left some unwritten, or a power cut tore them): at
/// 100,000 users 200,000 files, minutes of writing on an SD card at each
/// restart. After a stop that wrote and synced them all, the next start
/// rewrites only what changes; after a crash, or with a file missing, all.
#[test]
fn a_restart_after_a_clean_stop_rewrites_only_the_files_that_change() {
    let dir = TempDir::new("relay-files-complete");
    let hub = Hub::start();
    let users = 2_000;
    save_users_state(&dir, users);
    let cfg = config(&dir, &hub, &["spin30"], "");
    let files = 2 * users + 2;
    let count = || file_times(&dir).len();
    let mut agent = Agent::start_running(&cfg, "agent.log");
    assert!(
        wait_until(Duration::from_secs(60), || count() == files),
        "{} of {files} files:\n{}",
        count(),
        agent.stderr()
    );
    agent.stop();
    assert!(
        agent
            .stderr()
            .contains("is written and synced; the next start does not rewrite them"),
        "{}",
        agent.stderr()
    );

    // A restart after a clean stop: nothing rewritten, over several dumps;
    // a user who sends rewrites that user's two files and the summaries.
    let before = file_times(&dir);
    let mut agent = Agent::start_running(&cfg, "agent2.log");
    wait_subscribed(&hub, &["spin30"]);
    std::thread::sleep(Duration::from_millis(2500)); // two dumps and more
    assert_eq!(
        rewritten(&before, &dir),
        Vec::<String>::new(),
        "{}",
        agent.stderr()
    );
    let user = "5e1f0000-0000-4000-8000-000000000007";
    assert_eq!(
        hub.send_text("spin30", &envelope(user, "spin30", "analytics", "speed")),
        1
    );
    let want = [
        format!("{user}-spinner-engdes1-adjacency.csv"),
        format!("{user}-spinner-engdes1-graph.json"),
        "activity.csv".to_owned(),
        "usage.csv".to_owned(),
    ];
    assert!(
        wait_until(Duration::from_secs(10), || rewritten(&before, &dir) == want),
        "{:?}\n{}",
        rewritten(&before, &dir),
        agent.stderr()
    );
    agent.stop();
    let log = agent.stderr();
    assert!(
        log.contains(&format!(
            "the analytics files of {users} graphs in {} are as the last run wrote them; not rewritten",
            dir.path("analytics").display()
        )),
        "{log}"
    );

    // Starts, waits until every file is rewritten, stops: the log says why.
    let rewrites_all = |log_file: &str, why: &str| {
        let before = file_times(&dir);
        let mut agent = Agent::start_running(&cfg, log_file);
        assert!(
            wait_until(Duration::from_secs(60), || rewritten(&before, &dir).len()
                == files),
            "{} of {files} rewritten:\n{}",
            rewritten(&before, &dir).len(),
            agent.stderr()
        );
        agent.stop();
        assert!(agent.stderr().contains(why), "{}", agent.stderr());
    };

    // A crash: the next start rewrites them all.
    let mut agent = Agent::start_running(&cfg, "agent3.log");
    wait_subscribed(&hub, &["spin30"]);
    agent.kill9();
    rewrites_all(
        "agent4.log",
        "the last run did not write them all and sync them",
    );

    // A file removed after a clean stop: all are rewritten, it among them.
    let gone = format!("{user}-spinner-engdes1-graph.json");
    std::fs::remove_file(dir.path(&format!("analytics/{gone}"))).unwrap();
    rewrites_all("agent5.log", "some are missing");
    assert!(
        read(&dir, &gone).contains("\"nodes\""),
        "{}",
        read(&dir, &gone)
    );
}

/// Analytics that reached `max_users` kept counting new users as "not
/// analysed" and said nothing else: an operator whose Pi was set to a small
/// bound saw files stop growing with no line in the log and no figure to
/// alert on. Now the first new user refused in a run is said once (not
/// once per user), `status` shows the users against the bound, and the
/// users analysed stay the first ones.
#[test]
fn analytics_at_max_users_say_so_once_a_run() {
    let dir = TempDir::new("relay-full");
    let hub = Hub::start();
    let cfg = config(&dir, &hub, &["spin30"], "max_users = 3");
    let said = "the analytics track 3 users, as many as max_users = 3 allows";
    let send_users = |from: usize, to: usize| {
        for u in from..to {
            let msg = envelope(&format!("user-{u}"), "spin30", "analytics", "voltage");
            assert_eq!(hub.send_text("spin30", &msg), 1);
        }
    };
    let messages = |cfg: &Path| status(cfg).values().map(|r| r.messages).sum::<u64>();
    for (run, log) in ["agent.log", "agent2.log"].into_iter().enumerate() {
        let mut agent = Agent::start_running(&cfg, log);
        wait_subscribed(&hub, &["spin30"]);
        // Three users fit; then new ones, in two bursts a flush apart.
        let first = if run == 0 { 0 } else { 5 };
        send_users(first, first + 5);
        assert!(
            agent.wait_for_line(said, Duration::from_secs(10)),
            "not said:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_secs(3));
        send_users(first + 5, first + 8);
        let sent = (first + 8) as u64 - if run == 0 { 0 } else { 5 };
        assert!(
            wait_until(Duration::from_secs(10), || messages(&cfg) == sent),
            "{:?}",
            status(&cfg)
        );
        let (code, text, err) = edgemeter(&["status", "-c", cfg.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        assert!(
            text.contains("users analysed 3 of max_users = 3;")
                && text.contains("the analytics are full"),
            "{text}"
        );
        std::thread::sleep(Duration::from_secs(3));
        agent.stop();
        let log = agent.stderr();
        assert_eq!(log.matches(said).count(), 1, "said once a run:\n{log}");
    }
    // The three users analysed are the first three, across the restart.
    let usage = read(&dir, "usage.csv");
    let users: Vec<&str> = usage
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next())
        .collect();
    assert_eq!(users, ["user-0", "user-1", "user-2"], "{usage}");
}

/// A full outbox drops whole rows, and a relay stream's messages share
/// rows (up to 64 KiB): the room one drop frees may outlast the next
/// commits, which drop none though the outbox is still full. Each such
/// commit ended the spell in the log ("outbox has room again") and the
/// next drop began another. Now the spell ends only after ten seconds of
/// commits that drop none: said once while the sink never takes any.
#[test]
fn a_full_outbox_of_relay_messages_says_so_once() {
    const MESSAGES: usize = 20_000;
    let dir = TempDir::new("relay-full");
    let hub = Hub::start();
    dir.write("edge.token", "token-of-edge-0123456789");
    let cfg = config(&dir, &hub, &["f1"], SINK_KEEPING_EVENTS);
    let text = std::fs::read_to_string(&cfg).expect("config");
    let small = text.replace(
        "state_dir = \"state\"\n",
        "state_dir = \"state\"\nbuffer_max_bytes = 1048576\n",
    );
    assert_ne!(small, text);
    std::fs::write(&cfg, small).expect("config");
    let agent = Agent::start(&cfg, "info");
    wait_subscribed(&hub, &["f1"]);
    // Bursts (a commit of large rows) between trickles (commits of a few
    // messages): a trickle's commit that drops a burst's row frees room
    // for the next few.
    let started = Instant::now();
    let mut k = 0;
    while k < MESSAGES {
        hub.freeze();
        for _ in 0..2000 {
            let text = envelope("u1", "f1", "log", &format!("m{k}"));
            assert_eq!(hub.send_text("f1", &text), 1);
            k += 1;
        }
        hub.thaw();
        for _ in 0..200 {
            let text = envelope("u1", "f1", "log", &format!("m{k}"));
            assert_eq!(hub.send_text("f1", &text), 1);
            k += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(started.elapsed() < Duration::from_secs(120), "sending");
    }
    let dropped = || {
        rusqlite::Connection::open_with_flags(
            dir.path("state/outbox.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .and_then(|db| {
            db.query_row("SELECT COALESCE(SUM(count), 0) FROM drops", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(30), || committed_messages(&dir)
            + dropped()
            >= MESSAGES as i64),
        "{} committed, {} dropped\n{}",
        committed_messages(&dir),
        dropped(),
        agent.stderr()
    );
    let log = agent.stderr();
    assert!(dropped() > 0, "the outbox filled:\n{log}");
    assert_eq!(
        log.matches("outbox full (buffer_max_bytes)").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("outbox has room again").count(), 0, "{log}");
}

/// Relay messages cannot be fetched again: on a full disk (the state and
/// the analytics files on a tmpfs the test fills), the agent holds them,
/// says each failure once (the outbox's commits, the analytics state and
/// files, the status file, the sink's claims), and when space returns
/// commits every message and counts each once in the files.
#[test]
fn a_relay_agent_on_a_full_disk_loses_no_message_and_says_each_failure_once() {
    let dir = TempDir::new("relay-full-disk");
    let hub = Hub::start();
    dir.write("edge.token", "token-of-edge-0123456789");
    let cfg = config(&dir, &hub, &["d1"], SINK_KEEPING_EVENTS);
    let on_disk = std::fs::read_to_string(&cfg).expect("config").replace(
        "files_dir = \"analytics\"",
        "files_dir = \"state/analytics\"",
    );
    std::fs::write(&cfg, on_disk).expect("config");
    let mut agent = Agent::start_on_small_disk(&cfg, "info", &dir.path("state"), 32);
    wait_subscribed(&hub, &["d1"]);
    let disk = common::SmallDisk::of(agent.pid(), &dir.path("state"));
    let copies = TempDir::new("relay-full-disk-copies");
    let committed = || committed_messages_in(&disk.copy_database("outbox.db", &copies.0));
    let send = |from: usize, n: usize| {
        for k in from..from + n {
            let text = envelope(
                &format!("u{}", k % 20),
                "d1",
                "analytics",
                &format!("c{}", k % 5),
            );
            assert_eq!(hub.send_text("d1", &text), 1);
            if k % 100 == 99 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    send(0, 200);
    assert!(
        wait_until(Duration::from_secs(10), || committed() == 200),
        "{}",
        agent.stderr()
    );
    assert!(disk.fill() > 0, "the disk took nothing");
    send(200, 2000);
    agent.expect_line("(the disk is full)", Duration::from_secs(10));
    // A few flushes of the analytics (every 2 s) fail too.
    std::thread::sleep(Duration::from_secs(5));
    disk.free();
    send(2200, 200);
    agent.expect_line("outbox writable again", Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(10), || committed() == 2400),
        "committed {} of 2400:\n{}",
        committed(),
        agent.stderr()
    );
    // usage.csv: a row per user, a column per rig; every message once.
    let counted = || -> u64 {
        std::fs::read_to_string(disk.path("analytics/usage.csv"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .flat_map(|l| l.split(',').skip(1).map(|n| n.parse::<u64>().unwrap_or(0)))
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(10), || counted() == 2400),
        "usage.csv counts {} of 2400:\n{}",
        counted(),
        agent.stderr()
    );
    agent.stop();
    let log = agent.stderr();
    assert_eq!(log.matches("appending records failed").count(), 1, "{log}");
    // Each of these fails at the next write that needs a new page, which
    // a file's slack (a WAL reused from its start) may put off: said at
    // most once, and the analytics' failures said at all.
    let said = [
        "cannot save the relay analytics state",
        "usage.csv: No space left on device",
        "source-lab.status: No space left on device",
        "claiming a batch failed",
    ]
    .map(|failure| log.matches(failure).count());
    assert!(said.iter().all(|&n| n <= 1), "{said:?}:\n{log}");
    assert!(said[..3].iter().sum::<usize>() > 0, "{log}");
}

/// The `relay_messages` points of `stream` in the outbox: (stamp, count).
fn message_windows(dir: &TempDir, stream: &str) -> Vec<(i64, i64)> {
    let Ok(db) = rusqlite::Connection::open_with_flags(
        dir.path("state/outbox.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return Vec::new();
    };
    let Ok(mut st) = db.prepare(
        "SELECT ts, CAST(value AS INTEGER) FROM records \
         WHERE kind = 1 AND name = 'relay_messages' AND dims LIKE ?1 ORDER BY ts",
    ) else {
        return Vec::new();
    };
    st.query_map([format!("%\"stream\":\"{stream}\"%")], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .map(|rows| rows.flatten().collect())
    .unwrap_or_default()
}

/// A Raspberry Pi's clock set by NTP while a window runs (it boots with
/// the time it saved at shutdown) stamped that whole window with the
/// clock from before: messages that came after the clock was set were
/// stamped an hour (or days) before they came. Now a window whose timer
/// fires far from its end on the wall clock runs on to the end of the
/// window the clock is in now, and is stamped with that.
#[test]
fn a_clock_set_while_a_window_runs_stamps_it_with_the_new_time() {
    let dir = TempDir::new("relay-clock-step");
    let hub = Hub::start();
    let cfg = config(&dir, &hub, &["spin30"], "window_secs = 5");
    let clock = common::FakeClock::new(&dir, "+0");
    let env = clock.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut agent = Agent::start_with_env(&cfg, "agent.log", &env);
    agent.expect_line("running as agent", Duration::from_secs(10));
    wait_subscribed(&hub, &["spin30"]);
    let send = |n: usize, user: &str| {
        for _ in 0..n {
            hub.send_text("spin30", &envelope(user, "spin30", "log", "x"));
        }
    };
    let counted = || {
        message_windows(&dir, "spin30")
            .iter()
            .map(|(_, n)| n)
            .sum::<i64>()
    };
    // Before: 5 messages, in a window that closes on the clock as it was.
    send(5, "before");
    assert!(
        wait_until(Duration::from_secs(10), || counted() == 5),
        "{:?}",
        message_windows(&dir, "spin30")
    );
    // Just after that window closed, the clock is set an hour forward
    // (the agent reads it again within a second), and 7 messages come in
    // the window that began before.
    let set_at = common::now_ms();
    clock.set("+1h");
    std::thread::sleep(Duration::from_millis(1_500));
    send(7, "after");
    agent.expect_line(
        "source `lab`: the clock was set forward by 1h 0m while a window ran",
        Duration::from_secs(10),
    );
    assert!(
        wait_until(Duration::from_secs(15), || counted() == 12),
        "{:?}",
        message_windows(&dir, "spin30")
    );
    agent.stop();
    let windows = message_windows(&dir, "spin30");
    let hour = 3_600_000;
    let stamped = |keep: &dyn Fn(i64) -> bool| -> i64 {
        windows
            .iter()
            .filter(|(ts, _)| keep(*ts))
            .map(|(_, n)| n)
            .sum()
    };
    assert_eq!(
        stamped(&|ts| ts < set_at + 1_000),
        5,
        "before, on the clock before: {windows:?}"
    );
    assert_eq!(
        stamped(&|ts| ts > set_at + hour),
        7,
        "after, on the clock set: {windows:?}"
    );
    assert!(
        windows.iter().all(|(ts, _)| ts % 5_000 == 0),
        "windows end on the clock: {windows:?}"
    );
    let mut stamps: Vec<i64> = windows.iter().map(|(ts, _)| *ts).collect();
    stamps.dedup();
    assert_eq!(
        stamps.len(),
        windows.len(),
        "no window closed twice: {windows:?}"
    );
}
