//! The relay source's decisions with no sockets: a scripted session through
//! [`State`] against hand-computed files, frames of every shape, windows,
//! and the analytics state surviving a save and reload.

use std::time::Duration;

use std::collections::HashMap;

use super::analytics::{Bound, Graph, GraphKey};
use super::ingest::{Frame, Settings, State};
use super::link::Link;
use super::store::{self, Loaded, Store};
use crate::record::{Kind, MAX_EVENT_DEPTH, Record, json_depth};
use crate::sketch::Sketch;

const SESSION: &str = include_str!("../../../tests/fixtures/relay/session.txt");

fn expected(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/relay/expected/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn state(streams: &[&str], max_frame_bytes: usize) -> State {
    State::new(
        Settings {
            source: "lab".into(),
            max_frame_bytes,
            events: true,
            raw_files: true,
            max_users: 1000,
        },
        streams
            .iter()
            .map(|s| {
                (
                    (*s).to_owned(),
                    Link::new(Duration::from_secs(1), Duration::from_secs(10), 0),
                )
            })
            .collect(),
    )
}

const STREAMS: [&str; 3] = ["spin30", "spin31", "pend00"];

/// Feed the scripted session, one message per frame, a minute apart.
/// When [`play`] delivers its first message: two days after the
/// fixture's `t` values (1, 2, … ms), so these are not usable as message
/// times and arrival times count (see `message_time`).
const PLAY_START: i64 = 2 * 86_400_000;

fn play(st: &mut State, out: &mut Vec<Record>) -> usize {
    let mut n = 0;
    for line in SESSION.lines().filter(|l| !l.starts_with('#')) {
        let (stream, msg) = line.split_once('\t').expect("stream TAB message");
        let i = STREAMS
            .iter()
            .position(|s| *s == stream)
            .expect("a known stream");
        st.frame(i, Frame::Text(msg), PLAY_START + 60_000 * n as i64, out);
        n += 1;
    }
    n
}

const U1: &str = "53a6788c-0000-4000-8000-000000000001";
const U2: &str = "53a6788c-0000-4000-8000-000000000002";
const U3: &str = "53a6788c-0000-4000-8000-000000000003";

#[test]
fn a_scripted_session_gives_the_hand_computed_files() {
    let mut st = state(&STREAMS, 1 << 20);
    let mut out = Vec::new();
    let n = play(&mut st, &mut out);
    assert_eq!(n, 14);
    let a = &st.analytics;
    let graph = |u: &str, exp: &str| {
        a.graph(&GraphKey {
            user: u.into(),
            exp: exp.into(),
            course: "engdes1".into(),
        })
        .expect("a graph")
    };
    for (u, exp) in [(U1, "spinner"), (U2, "spinner"), (U3, "pendulum")] {
        assert_eq!(
            graph(u, exp).adjacency_csv(),
            expected(&format!("{u}-{exp}-engdes1-adjacency.csv")),
            "{u}"
        );
    }
    assert_eq!(
        graph(U1, "spinner").to_json("spinner"),
        expected(&format!("{U1}-spinner-engdes1-graph.json"))
    );
    let mut summaries = a.summaries();
    summaries.sort();
    let written = |write: &dyn Fn(&mut Vec<u8>) -> std::io::Result<()>| {
        let mut out = Vec::new();
        write(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    };
    let usage = written(&|out| summaries.write_usage(out));
    let activity = written(&|out| summaries.write_activity(out));
    assert_eq!(usage, expected("usage.csv"));
    // One message a minute: every message starts a new active minute.
    assert_eq!(
        activity.lines().nth(1),
        Some(format!("{U1},spin30,1970-01-03T00:00:00.000Z,1970-01-03T00:06:00.000Z,5,5").as_str())
    );
    // A line per user×hardware, sorted by user, then hardware.
    let keys: Vec<String> = activity
        .lines()
        .skip(1)
        .map(|l| l.split(',').take(2).collect::<Vec<_>>().join(","))
        .collect();
    assert_eq!(
        keys,
        [
            format!("{U1},spin30"),
            format!("{U1},spin31"),
            format!("{U2},spin30"),
            format!("{U3},pend00")
        ]
    );
    // Every message is an event, with its exact text.
    let events: Vec<&Record> = out.iter().filter(|r| r.kind == Kind::Event).collect();
    assert_eq!(events.len(), 14);
    assert_eq!(events[0].name, "log");
    assert_eq!(events[13].name, "request");
    let first = SESSION.lines().find(|l| !l.starts_with('#')).unwrap();
    assert_eq!(
        events[0].payload,
        first.split_once('\t').unwrap().1.as_bytes()
    );
    // Raw files named as the Python client named them, one line each.
    let raw = st.take_raw();
    assert_eq!(raw.len(), 4, "{:?}", raw.keys().collect::<Vec<_>>());
    let spin30 = &raw[&format!("{U1}-spin30-spinner-engdes1.json")];
    assert_eq!(spin30.iter().filter(|b| **b == b'\n').count(), 5);
    let t: u64 = st.streams.iter().map(|s| s.totals.transitions).sum();
    assert_eq!(t, 4 + 1 + 3);
}

#[test]
fn frames_of_every_shape_are_counted_and_never_lost_silently() {
    let mut st = state(&["spin30"], 1024);
    let mut out = Vec::new();
    let env = |u: &str| {
        format!(r#"{{"user":"{u}","type":"log","exp":"spinner","course":"c","payload":{{}}}}"#)
    };
    // Two envelopes in one frame, as the relay joins them.
    st.frame(
        0,
        Frame::Text(&format!("{}{}", env("a"), env("b"))),
        0,
        &mut out,
    );
    // The firmware's zero-width space, then a valid line.
    st.frame(0, Frame::Text("\u{200B}{\"error\":\"limit\"}"), 0, &mut out);
    // The firmware's line with no colon.
    st.frame(0, Frame::Text(r#"{"info","pid"}"#), 0, &mut out);
    // Valid, then garbage in the same frame.
    st.frame(
        0,
        Frame::Text(&format!("{} trailing", env("c"))),
        0,
        &mut out,
    );
    st.frame(0, Frame::Binary(&[0x47, 0x40, 0x11]), 0, &mut out);
    let big = format!("{{\"user\":\"{}\"}}", "x".repeat(2000));
    st.frame(0, Frame::Text(&big), 0, &mut out);
    let t = &st.streams[0].totals;
    assert_eq!(t.frames, 6);
    assert_eq!(t.messages, 2 + 1 + 1);
    assert_eq!(t.other, 1, "the firmware line is JSON but not an envelope");
    assert_eq!(t.zero_width, 1);
    assert_eq!((t.malformed, t.binary, t.oversized), (4, 1, 1));
    let malformed: Vec<serde_json::Value> = out
        .iter()
        .filter(|r| r.name == "relay_malformed")
        .map(|r| serde_json::from_slice(&r.payload).unwrap())
        .collect();
    assert_eq!(malformed.len(), 4);
    assert_eq!(malformed[0]["sample"], r#"{"info","pid"}"#);
    assert_eq!(malformed[1]["sample"], "trailing");
    assert_eq!(malformed[2]["sample"], "474011");
    assert!(malformed[3]["sample"].as_str().unwrap().len() <= 256);
    assert_eq!(malformed[3]["bytes"], big.len());
    assert_eq!(st.samples.len(), 4);
    let users: Vec<String> = out
        .iter()
        .filter(|r| r.kind == Kind::Event && r.name == "log")
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()["user"].to_string()
        })
        .collect();
    assert_eq!(users, ["\"a\"", "\"b\"", "\"c\""]);
}

#[test]
fn names_that_could_be_paths_are_counted_not_analysed() {
    let mut st = state(&["spin30"], 1 << 20);
    let mut out = Vec::new();
    for user in ["../../etc/passwd", ".hidden", "a/b", ""] {
        let msg = serde_json::json!({"user": user, "type": "analytics", "exp": "spinner",
            "course": "c", "payload": {"log": "voltage"}})
        .to_string();
        st.frame(0, Frame::Text(&msg), 0, &mut out);
    }
    assert_eq!(st.streams[0].totals.untracked, 4);
    assert!(st.analytics.all_activity().is_empty() && st.take_raw().is_empty());
    assert_eq!(out.len(), 4, "still stored as events");
}

fn find<'a>(out: &'a [Record], metric: &str, stream: &str, kind: Kind) -> &'a Record {
    out.iter()
        .find(|r| {
            r.kind == kind
                && r.name == metric
                && r.dims
                    .pairs()
                    .iter()
                    .any(|(k, v)| k == "stream" && v == stream)
        })
        .unwrap_or_else(|| panic!("{metric} {stream}"))
}

#[test]
fn a_window_emits_every_stream_and_the_union_of_users() {
    let mut st = state(&STREAMS, 1 << 20);
    let mut out = Vec::new();
    play(&mut st, &mut out);
    out.clear();
    st.streams[0].link.connected(0);
    st.close_window(300_000, 300, &mut out);
    let check = |out: &[Record], want: &[(&str, &str, f64)]| {
        for (metric, stream, value) in want {
            assert_eq!(
                find(out, metric, stream, Kind::Point).value,
                *value,
                "{metric} {stream}"
            );
        }
    };
    check(
        &out,
        &[
            ("relay_messages", "spin30", 8.0),
            ("relay_messages", "pend00", 4.0),
            ("relay_zero_width", "spin30", 0.0),
            ("relay_frames", "spin30", 8.0),
            ("relay_stalls", "spin30", 0.0),
            ("relay_connected", "spin30", 1.0),
            ("relay_connected", "spin31", 0.0),
            ("relay_active_users", "spin30", 2.0),
            ("relay_active_users", "all", 3.0),
        ],
    );
    let sketch =
        Sketch::decode(&find(&out, "relay_active_users", "all", Kind::Sketch).payload).unwrap();
    assert_eq!(sketch.estimate(), 3.0);
    assert!(out.iter().all(|r| r.ts_ms == 300_000));
    // 3 streams × (8 points + users point + sketch) + the union's 2.
    assert_eq!(out.len(), 3 * 10 + 2);
    // The next window starts from zero.
    out.clear();
    st.close_window(600_000, 300, &mut out);
    check(
        &out,
        &[
            ("relay_messages", "spin30", 0.0),
            ("relay_active_users", "all", 0.0),
        ],
    );
}

/// A user already in a window's sketch of a stream skips the sketch for
/// its next messages there. It must still be counted on another stream in
/// the same window, and again in the next window on the stream it was
/// last counted on.
#[test]
fn active_users_are_counted_per_stream_and_window_when_they_repeat() {
    let mut st = state(&["spin30", "spin31"], 1 << 20);
    let mut out = Vec::new();
    let send = |st: &mut State, stream: usize, user: &str| {
        let m = format!(r#"{{"user":"{user}","type":"log"}}"#);
        st.frame(stream, Frame::Text(&m), 0, &mut Vec::new());
    };
    let users =
        |out: &[Record], stream: &str| find(out, "relay_active_users", stream, Kind::Point).value;
    for _ in 0..3 {
        send(&mut st, 0, "a");
        send(&mut st, 1, "a");
        send(&mut st, 0, "b");
    }
    st.close_window(300_000, 300, &mut out);
    assert_eq!(users(&out, "spin30"), 2.0);
    assert_eq!(users(&out, "spin31"), 1.0);
    assert_eq!(users(&out, "all"), 2.0);
    out.clear();
    for _ in 0..3 {
        send(&mut st, 0, "b");
    }
    st.close_window(600_000, 300, &mut out);
    assert_eq!(users(&out, "spin30"), 1.0, "b again, in a new window");
    assert_eq!(users(&out, "spin31"), 0.0);
    assert_eq!(users(&out, "all"), 1.0);
}

#[test]
fn the_analytics_state_survives_a_save_and_reload() {
    let dir = std::env::temp_dir().join(format!("edgemeter-relay-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("relay-lab.db");
    let mut st = state(&STREAMS, 1 << 20);
    let mut out = Vec::new();
    play(&mut st, &mut out);
    let (activity, graphs) = st.analytics.take_changes();
    Store::open(&path)
        .unwrap()
        .save(&activity, &graphs)
        .unwrap();
    assert!(
        st.analytics.take_changes().0.is_empty(),
        "the marks are cleared"
    );
    // A restarted source has every row as it was, and continues the
    // chain: U1's last command was speed_step, so `position` adds
    // speed_step → position_step.
    let mut again = state(&STREAMS, 1 << 20);
    let loaded = Store::open(&path)
        .unwrap()
        .load(&mut again.analytics)
        .unwrap();
    assert_eq!(
        loaded,
        Loaded {
            activity: st.analytics.all_activity().len(),
            graphs: st.analytics.all_graphs().len(),
        }
    );
    assert_eq!(again.analytics.all_activity(), st.analytics.all_activity());
    assert_eq!(again.analytics.all_graphs(), st.analytics.all_graphs());
    let msg = format!(
        r#"{{"user":"{U1}","type":"analytics","exp":"spinner","course":"engdes1","hardware":"spin30","payload":{{"log":"position"}}}}"#
    );
    again.frame(0, Frame::Text(&msg), 0, &mut out);
    let g: Graph = again
        .analytics
        .graph(&GraphKey {
            user: U1.into(),
            exp: "spinner".into(),
            course: "engdes1".into(),
        })
        .expect("U1's graph");
    assert_eq!(g.edges[&("speed_step".into(), "position_step".into())], 1);
    assert_eq!(again.analytics.activity(U1, "spin30").unwrap().messages, 6);
    // A garbage file is moved aside, not fatal.
    std::fs::write(&path, b"not a database at all").unwrap();
    let _ = std::fs::remove_file(dir.join("relay-lab.db-wal"));
    let mut fresh = state(&STREAMS, 1 << 20);
    let loaded = Store::open(&path)
        .unwrap()
        .load(&mut fresh.analytics)
        .unwrap();
    assert_eq!(loaded, Loaded::default());
    assert!(fresh.analytics.all_activity().is_empty());
    // The file itself is kept aside, byte for byte, for inspection.
    let kept: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.strip_prefix("relay-lab.db.corrupt-")
                .is_some_and(|ms| ms.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(std::fs::read(&kept[0]).unwrap(), b"not a database at all");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Saves do not wait for the disk; the first one not yet synced sets when
/// the sync is due (saves every 2 s must not put it off for ever), and
/// shutdown syncs at once.
#[test]
fn a_save_is_synced_within_the_bound_counted_from_the_first_unsynced_one() {
    let dir = std::env::temp_dir().join(format!("edgemeter-relay-sync-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut st = state(&STREAMS, 1 << 20);
    play(&mut st, &mut Vec::new());
    let (activity, graphs) = st.analytics.take_changes();
    let mut store = Store::open(&dir.join("relay-lab.db")).unwrap();
    assert_eq!(store.sync_due(), None, "nothing saved, nothing to sync");
    let before = std::time::Instant::now();
    store.save(&activity, &graphs).unwrap();
    let due = store.sync_due().expect("a save waits for a sync");
    assert!(
        due >= before + store::SYNC_EVERY && due <= std::time::Instant::now() + store::SYNC_EVERY,
        "due {:?} after the save",
        due - before
    );
    store.sync(false).unwrap();
    assert_eq!(store.sync_due(), Some(due), "not due yet: not synced");
    std::thread::sleep(Duration::from_millis(20));
    store.save(&activity, &graphs).unwrap();
    store
        .save_feedback(&[(
            GraphKey {
                user: U1.into(),
                exp: "spinner".into(),
                course: "engdes1".into(),
            },
            "a,b\n".into(),
        )])
        .unwrap();
    assert_eq!(
        store.sync_due(),
        Some(due),
        "later saves keep the first one's due time"
    );
    store.sync(true).unwrap();
    assert_eq!(store.sync_due(), None, "at shutdown: synced at once");
    store.sync(true).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

fn sorted<'a>(keys: impl Iterator<Item = &'a GraphKey>) -> Vec<GraphKey> {
    let mut v: Vec<GraphKey> = keys.cloned().collect();
    v.sort_by_key(GraphKey::file_stem);
    v
}

/// Which graphs a dump rewrites: each graph whose change was saved since
/// the last dump, once, spelled as `graph` gives it; every graph of the
/// saved state after a restart; none twice.
#[test]
fn a_dump_rewrites_each_graph_saved_since_the_last_one_once() {
    let mut st = state(&STREAMS, 1 << 20);
    let mut out = Vec::new();
    play(&mut st, &mut out);
    assert!(
        !st.analytics.has_undumped(),
        "nothing is due before its change is taken for saving"
    );
    let (activity, graphs) = st.analytics.take_changes();
    assert!(graphs.len() >= 2, "the session makes graphs: {graphs:?}");
    let keys = |v: &[(GraphKey, Graph)]| sorted(v.iter().map(|(k, _)| k));
    let saved = sorted(graphs.iter().map(|(k, _)| k));
    // A second save before the dump adds nothing twice.
    st.analytics.unsave(&(activity.clone(), graphs.clone()));
    st.analytics.take_changes();
    assert!(st.analytics.has_undumped());
    let dumped = st.analytics.take_undumped(usize::MAX);
    assert_eq!(keys(&dumped), saved, "each saved graph, once");
    for (k, g) in &dumped {
        assert_eq!(
            Some(g),
            st.analytics.graph(k).as_ref(),
            "{k:?} as it is now"
        );
    }
    assert!(!st.analytics.has_undumped());
    assert!(
        st.analytics.take_undumped(usize::MAX).is_empty(),
        "none twice"
    );
    // One more message changes U1's graph: only it is due next time.
    let msg = format!(
        r#"{{"user":"{U1}","type":"analytics","exp":"spinner","course":"engdes1","hardware":"spin30","payload":{{"log":"position"}}}}"#
    );
    st.frame(0, Frame::Text(&msg), PLAY_START, &mut out);
    st.analytics.take_changes();
    let u1 = GraphKey {
        user: U1.into(),
        exp: "spinner".into(),
        course: "engdes1".into(),
    };
    assert_eq!(keys(&st.analytics.take_undumped(usize::MAX)), vec![u1]);
    // After a restart, every restored graph is due (the files may be older
    // than the state), although none is to be saved.
    let mut again = state(&STREAMS, 1 << 20);
    for (k, chain) in st.analytics.all_graphs() {
        again
            .analytics
            .restore_graph(&k.user, &k.exp, &k.course, &chain);
    }
    assert!(again.analytics.take_changes().1.is_empty());
    assert_eq!(keys(&again.analytics.take_undumped(usize::MAX)), saved);
}

/// A dump takes its graphs a part at a time, so that a restart with
/// thousands of users does not spell out every user's files at once
/// (20,000 users took the agent from 27 to 126 MiB): the longest waiting
/// first, each once, until none is left.
#[test]
fn a_dump_takes_its_graphs_a_part_at_a_time_the_longest_waiting_first() {
    let mut st = state(&STREAMS, 1 << 20);
    let mut out = Vec::new();
    play(&mut st, &mut out);
    let (_, graphs) = st.analytics.take_changes();
    let saved: Vec<GraphKey> = graphs.iter().map(|(k, _)| k.clone()).collect();
    assert!(saved.len() >= 2, "the session makes graphs: {saved:?}");
    assert_eq!(st.analytics.undumped(), saved.len());
    let mut taken = Vec::new();
    for _ in 0..=saved.len() {
        let part = st.analytics.take_undumped(1);
        if part.is_empty() {
            break;
        }
        assert_eq!(part.len(), 1, "at most what is asked");
        taken.extend(part.into_iter().map(|(k, _)| k));
        assert_eq!(st.analytics.undumped(), saved.len() - taken.len());
    }
    assert_eq!(taken, saved, "in the order they were saved, each once");
    assert!(!st.analytics.has_undumped());
}

/// The relay source's shared state around `st`, as its tasks see it.
fn shared(st: State, files_dir: Option<&str>) -> super::Shared {
    super::Shared {
        name: "lab".to_owned(),
        config: super::config::Config {
            host: "127.0.0.1".to_owned(),
            port: 8888,
            streams: STREAMS.iter().map(|s| s.to_string()).collect(),
            reconnect_initial: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            ping_interval: Duration::from_secs(15),
            stall_after: Duration::from_secs(45),
            max_frame_bytes: 1 << 20,
            window: Duration::from_secs(300),
            events: true,
            files_dir: files_dir.map(Into::into),
            dump_interval: Duration::from_secs(60),
            raw_files: false,
            raw_files_max_bytes: super::config::DEFAULT_RAW_FILES_MAX_BYTES,
            max_users: 1000,
            provision: None,
            answer_from: None,
        },
        state: std::cell::RefCell::new(st),
        dump_usage: std::cell::RefCell::new(false),
        provision_kick: smol::channel::unbounded().0,
        changed: crate::runtime::doorbell().0,
        link_changed: crate::runtime::doorbell().0,
        news: std::cell::RefCell::default(),
        news_added: crate::runtime::doorbell().0,
    }
}

/// Without `files_dir` a dump has no graph to write, however many wait:
/// it counted them all, and ran an empty job for every 500.
#[test]
fn a_dump_without_files_dir_has_no_graphs_to_write() {
    use super::flush::{Due, Dump};
    let mut st = state(&STREAMS, 1 << 20);
    let mut out = Vec::new();
    play(&mut st, &mut out);
    // Saved: what changed is then due for the next dump.
    st.analytics.take_changes();
    let waiting = st.analytics.undumped();
    assert!(waiting >= 2, "the session makes graphs: {waiting}");
    let with_files = shared(st, Some("analytics"));
    assert_eq!(Due::at_start(&with_files, Dump::All).graphs, waiting);
    assert_eq!(Due::at_start(&with_files, Dump::No).graphs, 0);
    let st = with_files.state.into_inner();
    let without = shared(st, None);
    for dump in [Dump::All, Dump::Until(std::time::Instant::now()), Dump::No] {
        assert_eq!(Due::at_start(&without, dump).graphs, 0);
    }
}

/// Only a dump's first part writes `usage.csv` and `activity.csv`. Each
/// part saves what changed meanwhile, which makes them due again: a long
/// dump under load rewrote them (every user's row) in every part. They
/// wait for the next dump instead.
#[test]
fn only_a_dumps_first_part_writes_the_summaries() {
    use super::flush::{Collected, Due, Dump, collect};
    let mut st = state(&STREAMS, 1 << 20);
    let mut out = Vec::new();
    play(&mut st, &mut out);
    let shared = shared(st, Some("analytics"));
    let names = |c: &Collected| -> Vec<String> { c.dumps.iter().map(|(n, _)| n.clone()).collect() };
    // A save between dumps: the graphs are due, and so are the summaries.
    let mut none = Due {
        summaries: true,
        graphs: 0,
        raw_bound: false,
    };
    let saved = collect(&shared, Dump::No, &mut none);
    assert!(saved.dumps.is_empty() && saved.summaries.is_none() && !saved.graphs.is_empty());
    assert!(*shared.dump_usage.borrow());
    let due = shared.state.borrow().analytics.undumped();
    assert!(due >= 2, "the session makes graphs: {due}");
    // A dump's first part: the summaries, then graphs.
    let mut dump = Due {
        summaries: true,
        graphs: 1,
        raw_bound: false,
    };
    let first = collect(&shared, Dump::All, &mut dump);
    assert!(first.summaries.is_some(), "the summaries");
    let first = names(&first);
    assert_eq!(first.len(), 2, "and one graph's two files: {first:?}");
    // A later part, after a save that made the summaries due again.
    *shared.dump_usage.borrow_mut() = true;
    dump.graphs = due - 1;
    let later = collect(&shared, Dump::All, &mut dump);
    assert_eq!(later.dumps.len(), 2 * (due - 1), "{:?}", names(&later));
    assert!(later.summaries.is_none(), "no summaries in a later part");
    assert_eq!(later.remaining, 0);
    assert!(*shared.dump_usage.borrow(), "left for the next dump");
}

/// One stream whose messages are analysed only: no events, no raw files.
fn analysing_only(stream: &str, max_users: usize) -> State {
    State::new(
        Settings {
            source: "lab".into(),
            max_frame_bytes: 1 << 20,
            events: false,
            raw_files: false,
            max_users,
        },
        vec![(
            stream.to_owned(),
            Link::new(Duration::from_secs(1), Duration::from_secs(1), 0),
        )],
    )
}

#[test]
fn users_beyond_the_bound_are_counted_not_tracked() {
    let mut st = analysing_only("spin30", 2);
    let mut out = Vec::new();
    for u in ["a", "b", "c", "a"] {
        st.frame(
            0,
            Frame::Text(&format!(r#"{{"user":"{u}","type":"log"}}"#)),
            0,
            &mut out,
        );
    }
    assert!(out.is_empty(), "events = false stores none");
    assert_eq!(st.streams[0].totals.untracked, 1);
    assert_eq!(st.analytics.all_activity().len(), 2);
    // Said once a run: the log must not repeat it for every new user.
    assert_eq!(st.newly_full(), [Bound::Users]);
    assert!(st.is_full());
    st.frame(0, Frame::Text(r#"{"user":"d","type":"log"}"#), 0, &mut out);
    assert_eq!(st.streams[0].totals.untracked, 2);
    assert_eq!(st.newly_full(), []);
}

/// The bound on distinct names (users, rigs, experiments, courses and
/// commands: 4 × max_users + 1000) is said apart from the users': one user
/// on ever new rigs meets it with room for users left.
#[test]
fn the_names_bound_is_said_once_and_apart_from_the_users() {
    let mut st = analysing_only("spin30", 2);
    let mut out = Vec::new();
    let (_, max_names) = st.analytics.names();
    for rig in 0..max_names + 10 {
        let m = format!(r#"{{"user":"a","type":"log","hardware":"rig{rig}"}}"#);
        st.frame(0, Frame::Text(&m), 0, &mut out);
    }
    assert_eq!(st.analytics.names(), (max_names, max_names));
    assert_eq!(st.analytics.users(), (1, 2));
    assert_eq!(st.streams[0].totals.untracked, 11);
    assert_eq!(st.newly_full(), [Bound::Names]);
    assert_eq!(st.newly_full(), []);
    let text = super::status::render(&st);
    assert!(
        text.contains("users analysed 1 of max_users = 2;")
            && text.contains("the analytics are full"),
        "{text}"
    );
}

/// A sender inventing a new command with every message of an experiment
/// other than the client's two grew that chain's matrix (n² counts) without
/// bound. A chain now takes at most `MAX_CHAIN_NODES` nodes from messages;
/// commands past it are counted as untracked, and the known ones still
/// count.
#[test]
fn a_chain_takes_a_bounded_number_of_commands() {
    use super::analytics::MAX_CHAIN_NODES;
    let mut st = analysing_only("rig1", 10);
    let send = |st: &mut State, log: &str| {
        let m = format!(
            r#"{{"user":"u1","type":"analytics","exp":"turbine","course":"c1","payload":{{"log":"{log}"}}}}"#
        );
        st.frame(0, Frame::Text(&m), 0, &mut Vec::new());
    };
    for i in 0..MAX_CHAIN_NODES + 36 {
        send(&mut st, &format!("cmd{i}"));
    }
    assert_eq!(st.streams[0].totals.untracked, 36);
    // Back to a command it knows: the chain goes on from the last one kept.
    send(&mut st, "cmd0");
    let key = GraphKey {
        user: "u1".into(),
        exp: "turbine".into(),
        course: "c1".into(),
    };
    let g = st.analytics.graph(&key).expect("the chain");
    assert_eq!(g.nodes.len(), MAX_CHAIN_NODES);
    let last = format!("cmd{}", MAX_CHAIN_NODES - 1);
    assert_eq!(g.edges.get(&(last, "cmd0".to_owned())), Some(&1));
    assert_eq!(g.edges.values().sum::<u64>(), MAX_CHAIN_NODES as u64);
    assert_eq!(st.streams[0].totals.untracked, 36);
}

/// A user's next message usually comes from the same rig and course as
/// its last, and is found where the last one went without a lookup. One
/// that comes from another rig or course must still be counted there: two
/// users here move between two rigs and two courses at different paces,
/// and every count is checked against one made by hand from the same
/// messages.
#[test]
fn a_user_moving_between_rigs_and_courses_is_counted_at_each() {
    let mut st = analysing_only("spin30", 10);
    let mut messages: HashMap<(String, String), u64> = HashMap::new();
    let mut chains: HashMap<(String, String), Vec<String>> = HashMap::new();
    let logs = ["voltage", "speed", "position"];
    for i in 0..60 {
        let user = ["u1", "u2"][i % 2];
        let hardware = ["rigA", "rigB"][(i / 3) % 2];
        let course = ["c1", "c2"][(i / 5) % 2];
        let log = logs[(i / 2) % 3];
        let m = format!(
            r#"{{"user":"{user}","type":"analytics","exp":"spinner","hardware":"{hardware}","course":"{course}","payload":{{"log":"{log}"}}}}"#
        );
        st.frame(0, Frame::Text(&m), 0, &mut Vec::new());
        *messages.entry((user.into(), hardware.into())).or_default() += 1;
        chains
            .entry((user.into(), course.into()))
            .or_default()
            .push(format!("{log}_step"));
    }
    assert_eq!(st.streams[0].totals.untracked, 0);
    assert_eq!(st.analytics.all_activity().len(), 4);
    for ((user, hardware), n) in &messages {
        let a = st.analytics.activity(user, hardware).expect("counted");
        assert_eq!(a.messages, *n, "{user} on {hardware}");
    }
    assert_eq!(st.analytics.graph_keys().len(), 4);
    for ((user, course), steps) in &chains {
        let key = GraphKey {
            user: user.clone(),
            exp: "spinner".into(),
            course: course.clone(),
        };
        let mut want: HashMap<(String, String), u64> = HashMap::new();
        for w in steps.windows(2) {
            *want.entry((w[0].clone(), w[1].clone())).or_default() += 1;
        }
        let got: HashMap<(String, String), u64> = st
            .analytics
            .graph(&key)
            .expect("a chain")
            .edges
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect();
        assert_eq!(got, want, "{user} in {course}");
    }
}

/// A window's timer that fires off the window's end by more than a late
/// timer could is a clock set while the window ran: the window runs on to
/// the end of the window the clock is in now, forward or back.
#[test]
fn a_clock_set_while_a_window_runs_moves_its_end_to_the_new_clock() {
    use super::{Wake, on_wake};
    let w = Duration::from_secs(60);
    let check =
        |end: i64, now: i64, want: Wake| assert_eq!(on_wake(end, now, w), want, "{end} {now}");
    let end = 1_800_000_000_000; // a whole minute
    // On time, late or early within a late timer's reach: closed as it is.
    check(end, end, Wake::Close);
    check(end, end + 1_900, Wake::Close);
    check(end, end - 2_000, Wake::Close);
    // NTP set the clock 3 days forward: on to the next minute of the new clock.
    let day = 86_400_000;
    check(
        end,
        end + 3 * day + 25_000,
        Wake::Stepped {
            by: 3 * day + 25_000,
            until: end + 3 * day + 60_000,
        },
    );
    // Set back an hour: on to the end of the minute the clock is in now.
    check(
        end,
        end - 3_600_000 + 10,
        Wake::Stepped {
            by: -3_600_000 + 10,
            until: end - 3_600_000 + 60_000,
        },
    );
}

#[test]
fn windows_end_on_the_clock() {
    assert_eq!(super::window_end(0, Duration::from_secs(300)), 300_000);
    assert_eq!(
        super::window_end(299_999, Duration::from_secs(300)),
        300_000
    );
    assert_eq!(
        super::window_end(300_000, Duration::from_secs(300)),
        600_000
    );
}

/// Issue 13: a message nested 100,000 levels deep was stored as an event
/// and forwarded; no reader of events could parse it back. It is now a
/// malformed sample, and the message at the bound is still an event.
#[test]
fn messages_nested_too_deep_are_malformed_not_events() {
    let mut st = state(&["spin30"], 1 << 20);
    let mut out = Vec::new();
    let nested = |depth: usize| {
        format!(
            r#"{{"user":"u","type":"log","exp":"e","course":"c","payload":{}1{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        )
    };
    // The envelope is one level, the payload the rest.
    st.frame(0, Frame::Text(&nested(MAX_EVENT_DEPTH - 1)), 0, &mut out);
    st.frame(0, Frame::Text(&nested(100)), 0, &mut out);
    // Past serde's own recursion limit too: the envelope's fields are read
    // and the payload skipped without recursion, so it is the same case.
    st.frame(0, Frame::Text(&nested(100_000)), 0, &mut out);
    let events: Vec<&Record> = out.iter().filter(|r| r.kind == Kind::Event).collect();
    let names: Vec<&str> = events.iter().map(|r| r.name.as_ref()).collect();
    assert_eq!(names, ["log", "relay_malformed", "relay_malformed"]);
    assert_eq!(
        json_depth(std::str::from_utf8(&events[0].payload).unwrap()),
        MAX_EVENT_DEPTH
    );
    for e in &events[1..] {
        let sample: serde_json::Value = serde_json::from_slice(&e.payload).expect("json");
        assert!(
            sample["reason"]
                .as_str()
                .unwrap()
                .contains("deeper than 64"),
            "{sample}"
        );
        assert!(e.payload.len() < 1024, "only a sample is kept");
    }
    assert_eq!(st.streams[0].totals.malformed, 2);
    assert_eq!(st.streams[0].totals.other, 0);
}

#[test]
fn first_and_last_seen_follow_the_messages_own_time_when_it_is_usable() {
    use super::envelope::{T_USABLE_WITHIN_MS, message_time};
    let arrival = 1_700_000_000_000;
    assert_eq!(
        message_time(Some(1_699_999_990_000.0), arrival),
        1_699_999_990_000
    );
    assert_eq!(message_time(None, arrival), arrival);
    assert_eq!(message_time(Some(f64::NAN), arrival), arrival);
    // Device uptime or a wrong clock: arrival time.
    assert_eq!(message_time(Some(12_345.0), arrival), arrival);
    let far = (arrival + T_USABLE_WITHIN_MS + 1) as f64;
    assert_eq!(message_time(Some(far), arrival), arrival);
    // Out of order by `t` (a slow browser's message arrives last): first
    // and last seen are the earliest and latest `t`, whatever the order.
    let mut st = state(&STREAMS, 1 << 20);
    let mut out = Vec::new();
    for (t, arrive) in [(arrival + 5_000, arrival), (arrival - 90_000, arrival + 10)] {
        let msg = format!(
            r#"{{"user":"u1","t":{t},"exp":"spinner","hardware":"spin30","course":"c","type":"log","payload":{{}}}}"#
        );
        st.frame(0, Frame::Text(&msg), arrive, &mut out);
    }
    let a = st.analytics.activity("u1", "spin30").unwrap();
    assert_eq!(
        (a.first_ms, a.last_ms, a.messages),
        (arrival - 90_000, arrival + 5_000, 2)
    );
    // A `t` that is a string is no time at all, and no error.
    st.frame(
        0,
        Frame::Text(r#"{"user":"u2","t":"soon","exp":"spinner","hardware":"spin30","course":"c","type":"log"}"#),
        arrival,
        &mut out,
    );
    assert_eq!(
        st.analytics.activity("u2", "spin30").unwrap().first_ms,
        arrival
    );
}

#[test]
fn envelope_fields_are_read_from_payloads_of_any_shape() {
    use super::envelope::envelope;
    let head = r#"{"user":"u1","type":"analytics","exp":"spinner","course":"c","#;
    // (rest of the object, payload.log, t)
    let cases: &[(&str, Option<&str>, Option<f64>)] = &[
        (
            r#""payload":{"log":"voltage","data":{"set":1}},"t":5}"#,
            Some("voltage"),
            Some(5.0),
        ),
        (
            r#""payload":{"data":[1,{"log":"x"}],"log":"speed"},"t":-2}"#,
            Some("speed"),
            Some(-2.0),
        ),
        (
            r#""payload":{"log":"a\"b"},"t":1.5}"#,
            Some("a\"b"),
            Some(1.5),
        ),
        (r#""payload":{"log":7},"t":"5"}"#, None, None),
        (r#""payload":{"log":null},"t":null}"#, None, None),
        (
            r#""payload":{"log":"a","log":"b"},"t":{"x":[1]}}"#,
            None,
            None,
        ),
        (r#""payload":{"log":["a"]},"t":[1,2]}"#, None, None),
        (r#""payload":"voltage","t":true}"#, None, None),
        (r#""payload":["log","voltage"]}"#, None, None),
        (r#""payload":null}"#, None, None),
        (r#""payload":{}}"#, None, None),
    ];
    for (rest, log, t) in cases {
        let text = format!("{head}{rest}");
        let env = envelope(&text).unwrap_or_else(|| panic!("an envelope: {text}"));
        assert_eq!(env.payload.as_deref(), *log, "payload.log of {text}");
        assert_eq!(env.t, *t, "t of {text}");
        assert_eq!((&*env.user, &*env.kind), ("u1", "analytics"));
    }
    // Broken JSON inside the payload spoils the whole message.
    assert!(envelope(&format!(r#"{head}"payload":{{"log":}}}}"#)).is_none());
    assert!(envelope(r#"{"type":"analytics","payload":{"log":"x"}}"#).is_none());
}

/// Every string of an envelope is borrowed from the message where it has
/// no escapes: reading one allocates nothing. serde's own `Option<Cow<str>>`
/// copies each string even under `#[serde(borrow)]`, which cost three
/// allocations a message (exp, hardware, course; callgrind of the ingest).
#[test]
fn an_envelopes_strings_are_borrowed_from_the_message_unless_escaped() {
    use super::envelope::envelope;
    use std::borrow::Cow;
    let borrowed = |c: &Cow<str>| matches!(c, Cow::Borrowed(_));
    let text = r#"{"user":"u1","type":"analytics","exp":"spinner","hardware":"spin30","course":"c","payload":{"log":"voltage"},"t":5}"#;
    let env = envelope(text).expect("an envelope");
    let fields = [
        ("user", Some(&env.user)),
        ("type", Some(&env.kind)),
        ("exp", env.exp.as_ref()),
        ("hardware", env.hardware.as_ref()),
        ("course", env.course.as_ref()),
        ("payload.log", env.payload.as_ref()),
    ];
    for (name, value) in fields {
        let value = value.unwrap_or_else(|| panic!("{name} is read"));
        assert!(borrowed(value), "{name} ({value:?}) is borrowed");
    }
    // Escaped: read as the text it stands for.
    let text = r#"{"user":"u1","type":"analytics","exp":"spin\u006eer","hardware":"a\"b","course":"c\/d"}"#;
    let env = envelope(text).expect("an envelope");
    assert_eq!(env.exp.as_deref(), Some("spinner"));
    assert_eq!(env.hardware.as_deref(), Some("a\"b"));
    assert_eq!(env.course.as_deref(), Some("c/d"));
    // Null or absent is none; any other value spoils the envelope, as a
    // field that is not a string did before.
    let env = envelope(r#"{"user":"u1","type":"x","exp":null}"#).expect("an envelope");
    assert_eq!((env.exp, env.hardware, env.course), (None, None, None));
    for value in ["5", "true", "[\"spinner\"]", "{\"a\":\"b\"}"] {
        for field in ["exp", "hardware", "course"] {
            let text = format!(r#"{{"user":"u1","type":"x","{field}":{value}}}"#);
            assert_eq!(envelope(&text), None, "{text}");
        }
    }
}

/// At shutdown files are written until the deadline and the rest counted
/// (the next start rewrites them); a failing directory gives one error that
/// says how many more failed, not one line per file.
#[test]
fn files_written_at_shutdown_stop_at_the_deadline_and_failures_are_summed() {
    use std::time::Instant;
    let dir = std::env::temp_dir().join(format!("edgemeter-relay-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files: Vec<(String, String)> = (0..5)
        .map(|n| (format!("f{n}.csv"), format!("{n}\n")))
        .collect();
    let written = |dir: &std::path::Path| {
        (0..5)
            .filter(|n| dir.join(format!("f{n}.csv")).exists())
            .count()
    };

    // Past the deadline before the first: none written, all five left.
    let now = Instant::now();
    let (error, left) = super::flush::write_files(&dir, &files, || Instant::now() >= now);
    assert_eq!((error, left, written(&dir)), (None, 5, 0));

    // Time enough: all written, none left.
    let later = Instant::now() + Duration::from_secs(60);
    let (error, left) = super::flush::write_files(&dir, &files, || Instant::now() >= later);
    assert_eq!((error, left, written(&dir)), (None, 0, 5));
    assert_eq!(std::fs::read_to_string(dir.join("f3.csv")).unwrap(), "3\n");

    // The directory is a file: five failures, one message.
    let blocked = dir.join("f0.csv");
    let (error, left) = super::flush::write_files(&blocked, &files, || false);
    let error = error.expect("writing under a file fails");
    assert!(error.contains("and 4 more analytics files"), "{error}");
    assert_eq!(left, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A socket for the websocket layer that has nothing to read, keeps what
/// is written to it and counts the writes.
#[derive(Default)]
struct Wire {
    bytes: Vec<u8>,
    writes: usize,
}

impl smol::io::AsyncRead for Wire {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Pending
    }
}

impl smol::io::AsyncWrite for Wire {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.writes += 1;
        self.bytes.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[test]
fn an_answers_frames_go_to_the_socket_in_one_write_and_in_order() {
    use async_tungstenite::tungstenite::protocol::{Role, WebSocket};
    use async_tungstenite::tungstenite::{Message, Utf8Bytes};
    let frames: std::collections::VecDeque<String> = (0..5)
        .map(|i| format!(r#"{{"content":"answer {i}"}}"#))
        .collect();
    let wire = smol::block_on(async {
        let mut ws = async_tungstenite::WebSocketStream::from_raw_socket(
            Wire::default(),
            Role::Client,
            None,
        )
        .await;
        super::stream::write_answers(&mut ws, frames.clone())
            .await
            .unwrap();
        ws.into_inner()
    });
    // Sent with a flush each (`send`), five frames took five writes.
    assert_eq!(wire.writes, 1);
    // The session host reads them as five frames, in order.
    let mut host = WebSocket::from_raw_socket(std::io::Cursor::new(wire.bytes), Role::Server, None);
    for f in frames {
        assert_eq!(host.read().unwrap(), Message::Text(Utf8Bytes::from(f)));
    }
}

/// A new directory of its own for a test, in the temp dir (the relay
/// source's unit tests, its submodules' among them).
pub(super) fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "edgemeter-relay-{tag}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A raw file's mark follows edgemeter's own appends, and only them: a
/// file something else wrote keeps its old mark (so the next start reads
/// it), and so does one written by both at once.
#[test]
fn a_raw_files_mark_follows_only_edgemeters_own_appends() {
    use super::adopt::{self, RawMark};
    let dir = scratch_dir("marks");
    let store = std::sync::Mutex::new(Store::open(&dir.join("relay-lab.db")).unwrap());
    let files = dir.join("files");
    let now = |name: &str| RawMark::of(name, &std::fs::metadata(files.join(name)).unwrap());
    let append = |name: &str, lines: &str| {
        let raw = std::collections::BTreeMap::from([(name.to_owned(), lines.as_bytes().to_vec())]);
        let errors = super::flush::append_raw_marked(&files, Some(&store), &raw, &[]);
        assert!(errors.is_empty(), "{errors:?}");
    };
    let unchanged = |m: &RawMark| store.lock().unwrap().raw_unchanged(m);
    // Made by edgemeter, appended to by it: unchanged each time.
    append("a.json", "1\n");
    assert!(unchanged(&now("a.json")));
    std::thread::sleep(Duration::from_millis(20));
    append("a.json", "2\n");
    assert!(unchanged(&now("a.json")));
    // Something else appends: changed, and edgemeter's next append does
    // not hide it.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(files.join("a.json"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"theirs\n").unwrap();
    drop(f);
    assert!(!unchanged(&now("a.json")));
    append("a.json", "3\n");
    assert!(!unchanged(&now("a.json")));
    // A file the scan read is marked as it was read; the scan then skips it.
    std::fs::write(files.join("old-u-spin30-spinner-c.json"), "x\n").unwrap();
    let found = adopt::scan(&files, |_| false, unchanged).unwrap();
    assert_eq!((found.unchanged, found.read.len()), (0, 2));
    let errors =
        super::flush::append_raw_marked(&files, Some(&store), &Default::default(), &found.read);
    assert!(errors.is_empty(), "{errors:?}");
    let found = adopt::scan(&files, |_| false, unchanged).unwrap();
    assert_eq!((found.unchanged, found.read.len()), (2, 0));
    assert!(found.graphs.is_empty());
    // A file that is gone loses its mark; one still there keeps it.
    std::fs::remove_file(files.join("a.json")).unwrap();
    let exists = |n: &str| files.join(n).exists();
    let mut s = store.lock().unwrap();
    assert_eq!(s.forget_gone_raw(1, exists), Ok(1));
    assert_eq!(s.forget_gone_raw(1, exists), Ok(0));
    drop(s);
    assert!(unchanged(&now("old-u-spin30-spinner-c.json")));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Raw files whose users were not all taken (past `max_users`) are not
/// marked: the next start, which may have room, reads them again.
#[test]
fn raw_files_of_users_not_taken_are_read_again_at_the_next_start() {
    use super::adopt::{Found, RawMark};
    let found = |users: &[&str]| Found {
        graphs: users
            .iter()
            .map(|u| {
                let key = GraphKey {
                    user: u.to_string(),
                    exp: "spinner".into(),
                    course: "engdes1".into(),
                };
                (key, (None, vec!["voltage".to_owned()]))
            })
            .collect(),
        raw_files: 1,
        read: vec![RawMark {
            name: "a-spin30-spinner-engdes1.json".into(),
            bytes: 10,
            mtime_ns: 1,
        }],
        ..Found::default()
    };
    let config = shared(state(&STREAMS, 1 << 20), Some("files")).config;
    let mut roomy = analysing_only("spin30", 10);
    let marks = super::adopt_files("lab", &config, &mut roomy, found(&["a", "b"]));
    assert_eq!(marks.len(), 1, "all taken: marked");
    let mut full = analysing_only("spin30", 1);
    let marks = super::adopt_files("lab", &config, &mut full, found(&["a", "b"]));
    assert!(marks.is_empty(), "b not taken: {marks:?}");
}

/// The mark that the files are complete is taken once: a start clears it
/// (for good, as reopening shows) before it writes any file.
#[test]
fn the_files_complete_mark_is_taken_once() {
    let dir = scratch_dir("complete");
    let path = dir.join("relay-lab.db");
    let mut store = Store::open(&path).unwrap();
    assert_eq!(store.take_files_complete(), Ok(false), "a new state");
    store.set_files_complete().unwrap();
    assert_eq!(store.sync_due(), None, "synced at once");
    drop(store);
    let mut store = Store::open(&path).unwrap();
    assert_eq!(store.take_files_complete(), Ok(true));
    assert_eq!(store.sync_due(), None, "the clear is synced at once");
    drop(store);
    let mut store = Store::open(&path).unwrap();
    assert_eq!(store.take_files_complete(), Ok(false), "taken");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The shutdown's mark that every file is written is made only when none
/// is left, and what it answers is what the state holds, however the race
/// with the end of the grace goes.
#[test]
fn the_files_are_marked_complete_only_in_time_and_as_said() {
    let dir = scratch_dir("mark");
    std::fs::create_dir_all(dir.join("files")).unwrap();
    let path = dir.join("relay-lab.db");
    let files_dir = dir.join("files");
    let shared = shared(state(&STREAMS, 1 << 20), files_dir.to_str());
    let worker = crate::runtime::Worker::new("test");
    let files = |unwritten| {
        let mut f = super::flush::Files::new(
            Some(std::sync::Arc::new(std::sync::Mutex::new(
                Store::open(&path).unwrap(),
            ))),
            Vec::new(),
            dir.join("status"),
        );
        f.unwritten = unwritten;
        std::cell::RefCell::new(f)
    };
    let taken = || Store::open(&path).unwrap().take_files_complete().unwrap();
    let mark = |f: &std::cell::RefCell<super::flush::Files>, until| {
        smol::block_on(super::flush::mark_files_complete(
            &shared, &worker, f, until,
        ))
    };
    let later = std::time::Instant::now() + Duration::from_secs(60);
    assert!(!mark(&files(true), later), "a flush left files");
    assert!(!taken());
    assert!(mark(&files(false), later));
    assert!(taken());
    // The grace already over: either answer, but the state agrees with it.
    for _ in 0..20 {
        let said = mark(&files(false), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(50)); // a late job's turn
        assert_eq!(said, taken());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Raw lines wait in memory between flushes up to `RAW_PENDING_MAX_BYTES`;
/// past it they are dropped and counted (the disk is not keeping up), never
/// held without bound, and taken again once a flush took what waited.
#[test]
fn raw_lines_past_their_memory_bound_are_dropped_and_counted() {
    use super::ingest::RAW_PENDING_MAX_BYTES;
    let mut st = state(&["spin30"], 1 << 20);
    let payload = "x".repeat(256 * 1024);
    let message = |u: usize| {
        format!(
            r#"{{"user":"u{u:03}","type":"log","exp":"spinner","course":"c1","payload":"{payload}"}}"#
        )
    };
    let line = message(0).len() + 1;
    let fit = RAW_PENDING_MAX_BYTES / line;
    let mut out = Vec::new();
    for u in 0..fit + 5 {
        st.frame(0, Frame::Text(&message(u)), 0, &mut out);
    }
    assert_eq!(st.raw_dropped, 5);
    let taken = st.take_raw();
    let pending: usize = taken.values().map(Vec::len).sum();
    assert_eq!(pending, fit * line);
    assert_eq!(out.len(), fit + 5, "every message is an event all the same");
    // A flush took them: there is room again.
    st.frame(0, Frame::Text(&message(0)), 0, &mut out);
    assert_eq!(st.raw_dropped, 5);
    assert_eq!(st.take_raw().values().map(Vec::len).sum::<usize>(), line);
}

/// Raw lines dropped are said when it begins, reminded every ten minutes
/// while flushes go on dropping, and said when a flush drops none.
#[test]
fn dropped_raw_lines_are_said_a_spell_at_a_time() {
    use super::flush::RawDrops;
    use crate::logging::Spell;
    let t0 = std::time::Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut drops = RawDrops::default();
    let said = |d: &mut RawDrops, dropped, s| {
        d.said(
            std::path::Path::new("/var/lib/edgemeter/analytics"),
            dropped,
            at(s),
        )
        .map(|(level, what)| format!("{level}: {what}"))
    };
    assert_eq!(said(&mut drops, 0, 0), None, "nothing dropped");
    let first = said(&mut drops, 5, 2).expect("said when it begins");
    assert!(
        first.starts_with(
            "WARN: 5 raw lines were not appended to the raw files in /var/lib/edgemeter/analytics: 16 MiB"
        ),
        "{first}"
    );
    assert_eq!(said(&mut drops, 9, 4), None, "not at every flush");
    let reminder = Spell::SAY_EVERY.as_secs() + 10;
    let again = said(&mut drops, 12, reminder).expect("a reminder");
    assert!(
        again.contains("are still dropped: 12 since it began"),
        "{again}"
    );
    // A flush that drops none between two that do is the same spell.
    assert_eq!(said(&mut drops, 12, reminder + 2), None, "one flush");
    assert_eq!(said(&mut drops, 14, reminder + 4), None, "not a new spell");
    let settled = reminder + 4 + Spell::SETTLE.as_secs();
    assert_eq!(said(&mut drops, 14, settled - 2), None, "not yet settled");
    let ended = said(&mut drops, 14, settled).expect("said when it ends");
    assert!(
        ended.starts_with(
            &format!("INFO: raw lines are appended to the raw files in /var/lib/edgemeter/analytics again: 14 were dropped over {} s, none in the last 10 s", settled - 2)
        ),
        "{ended}"
    );
    assert_eq!(said(&mut drops, 14, settled + 2), None);
    let next = said(&mut drops, 15, settled + 4).expect("a new spell");
    assert!(next.starts_with("WARN: 1 raw lines"), "{next}");
}
