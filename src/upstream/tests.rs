//! The upstream's decisions without sockets: the wire format both ways, and
//! the store's answers on a real SQLite file (PostgreSQL gets the same
//! through `tests/upstream.rs`).

use super::*;
use crate::record::{Dims, Kind, Record};
use crate::sketch::{Sketch, hash_i64};
use crate::upstream::store::{DAY_MS, How, SeriesQuery};

const NOW: i64 = 1_795_996_800_000; // 2026-11-30T00:00Z

fn sketch_of(ids: impl IntoIterator<Item = i64>) -> Sketch {
    let mut s = Sketch::default();
    for id in ids {
        s.insert(hash_i64(id));
    }
    s
}

fn users(gateway: &str, ts: i64, ids: impl IntoIterator<Item = i64>) -> [Record; 2] {
    let s = sketch_of(ids);
    let dims = Dims::new([("gateway", gateway), ("window", "30m")]);
    let point = Record::point("active_users", dims.clone(), ts, s.estimate(), "Count");
    let sketch = Record {
        kind: Kind::Sketch,
        payload: s.encode(),
        ..point.clone()
    };
    [point, sketch]
}

fn batch(agent: &str, seq: i64, records: &[Record]) -> wire::Batch {
    let json = wire::encode(
        &wire::Key {
            agent_id: agent,
            outbox_id: "0123abcd",
            seq,
        },
        records,
    );
    wire::decode(json.as_bytes(), NOW).expect("a batch we encoded decodes")
}

/// An edge's relay message counter.
fn counter(agent: &str, ts: i64, v: f64) -> Record {
    Record::point(
        "relay_messages",
        Dims::new([("agent", agent), ("stream", "spin30")]),
        ts,
        v,
        "Count",
    )
}

/// A relay `analytics` event of `user`.
fn ev(user: &str, ts: i64) -> Record {
    Record {
        kind: Kind::Event,
        ts_ms: ts,
        name: "analytics".into(),
        dims: Dims::new([("stream", "spin30")]),
        value: 0.0,
        unit: "None".into(),
        payload: format!(r#"{{"user":"{user}","t":1,"type":"analytics"}}"#).into_bytes(),
    }
}

fn sqlite_store() -> (Store, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("edgemeter-upstore-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).expect("dir");
    let db = db::Sqlite::open(&dir.join(STORE_FILE), false).expect("open");
    let edge = config::DEFAULT_EDGE_DIMS
        .iter()
        .map(|s| s.to_string())
        .collect();
    (Store::new(Box::new(db), edge, 0), dir)
}

#[test]
fn a_batch_survives_the_wire_exactly() {
    let mut recs = users("gw-a", NOW - 60_000, 0..5).to_vec();
    recs.push(Record {
        kind: Kind::Event,
        ts_ms: NOW - 1,
        name: "analytics".into(),
        dims: Dims::new([("stream", "spin30")]),
        value: 0.0,
        unit: "None".into(),
        payload: br#"{"user":"u1","type":"analytics","payload":{"cmd":"set_speed"}}"#.to_vec(),
    });
    recs.push(Record {
        kind: Kind::Event,
        payload: b"not json \xff".to_vec(),
        ..recs[2].clone()
    });
    let b = batch("gw-a", 7, &recs);
    assert_eq!(
        (b.agent_id.as_str(), b.outbox_id.as_str(), b.seq),
        ("gw-a", "0123abcd", 7)
    );
    // Points first, then sketches, then events: the order the format groups them.
    assert_eq!(b.records[0], recs[0]);
    assert_eq!(b.records[1], recs[1]);
    assert_eq!(b.records[2], recs[2]);
    assert_eq!(
        b.records[3].payload,
        "\"not json \u{fffd}\"".as_bytes().to_vec(),
        "a payload that is not JSON travels as a JSON string"
    );
}

#[test]
fn records_with_the_same_dims_share_them_and_escapes_survive() {
    let json = r#"{"v":1,"agent_id":"a","outbox_id":"o","seq":1,"points":[
        {"metric":"m\u00e9","dims":{"window":"30m","gateway":"gw-\"1\""},"ts":1,"value":1,"unit":"Count"},
        {"metric":"m","dims":{"window":"30m","gateway":"gw-\"1\""},"ts":2,"value":2,"unit":"Count"},
        {"metric":"m","dims":{"gateway":"gw-\"1\"","window":"30m"},"ts":3,"value":3,"unit":"Count"},
        {"metric":"m","ts":4,"value":4,"unit":"Count"}]}"#;
    let b = wire::decode(json.as_bytes(), NOW).expect("decodes");
    let want = Dims::new([("gateway", "gw-\"1\""), ("window", "30m")]);
    assert_eq!(b.records[0].name, "m\u{e9}", "an escaped name is unescaped");
    for r in &b.records[..3] {
        assert_eq!(r.dims, want, "{r:?}: the same dims, whatever the key order");
    }
    assert!(
        b.records[0].dims.same(&b.records[1].dims),
        "records whose dims have the same text share one Dims"
    );
    assert_eq!(b.records[3].dims, Dims::default(), "no dims are no dims");
    // A bad dims object is refused with the record it is on, even when an
    // earlier record had good ones.
    let bad = json.replace(r#""ts":4,"#, r#""dims":{"x":5},"ts":4,"#);
    let e = wire::decode(bad.as_bytes(), NOW).expect_err("dims of a number");
    assert!(matches!(e, wire::Invalid::Shape(_)), "{e:?}");
    assert!(
        e.to_string().contains("points[3].dims: invalid type"),
        "{e}"
    );
}

#[test]
fn bad_batches_are_refused_with_what_is_wrong() {
    let check = |json: &str, want: &str| {
        let e = wire::decode(json.as_bytes(), NOW)
            .expect_err(json)
            .to_string();
        assert!(e.contains(want), "{json}\n gave: {e}\n wanted: {want}");
    };
    let ok = |rest: &str| format!(r#"{{"v":1,"agent_id":"a","outbox_id":"o","seq":1{rest}}}"#);
    check(
        r#"{"v":2,"whatever":true}"#,
        "batch version 2 is not supported",
    );
    check(r#"{"v":1}"#, "missing field `agent_id`");
    check("[1,2,3]", "not an upstream batch");
    check(&ok(r#","points":{"x":1}"#), "not an upstream batch");
    check(&ok(r#","extra":1"#), "unknown field `extra`");
    check(
        r#"{"v":1,"agent_id":"a b","outbox_id":"o","seq":1}"#,
        "agent_id `a b`",
    );
    check(r#"{"v":1,"agent_id":"a","outbox_id":"o","seq":0}"#, "seq 0");
    check(
        &ok(r#","points":[{"metric":"m","ts":1,"value":1,"unit":"Count","dims":{"":"x"}}]"#),
        "points[0]: dimension",
    );
    check(
        &ok(&format!(
            r#","points":[{{"metric":"m","ts":{},"value":1,"unit":"Count"}}]"#,
            NOW + 2 * 86_400_000
        )),
        "more than a day ahead",
    );
    check(
        &ok(r#","sketches":[{"metric":"m","ts":1,"unit":"Count","sketch":"!!"}]"#),
        "sketches[0]: sketch is not base64",
    );
    // A sketch envelope of a version this build cannot merge.
    let mut env = sketch_of(0..3).encode();
    env[4] = 9;
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&env);
    check(
        &ok(&format!(
            r#","sketches":[{{"metric":"m","ts":1,"unit":"Count","sketch":"{b64}"}}]"#
        )),
        "sketches[0]: unsupported sketch: version 9",
    );
    // gzip: cut short, not gzip at all, and a bomb.
    let gz = crate::http_client::gzip(ok("").as_bytes());
    assert!(matches!(
        wire::gunzip(&gz[..gz.len() / 2], 1 << 20),
        Err(wire::Invalid::Gzip(_))
    ));
    assert!(matches!(
        wire::gunzip(b"plain text", 1 << 20),
        Err(wire::Invalid::Gzip(_))
    ));
    let bomb = crate::http_client::gzip(&vec![b' '; 4 << 20]);
    assert!(bomb.len() < 16 * 1024, "4 MiB of spaces pack small");
    assert_eq!(
        wire::gunzip(&bomb, 1 << 20),
        Err(wire::Invalid::TooLarge(1 << 20))
    );
    assert_eq!(
        wire::gunzip(&gz, 1 << 20).expect("whole"),
        ok("").into_bytes()
    );
}

#[test]
fn the_store_keeps_each_batch_once_and_unions_users_across_gateways() {
    let (mut store, dir) = sqlite_store();
    let t = NOW - 3_600_000;
    // Three gateways with overlapping ids (gossip): 0..100, 50..150, 100..200.
    let a = batch("gw-a", 1, &users("gw-a", t, 0..100));
    let b = batch("gw-b", 1, &users("gw-b", t, 50..150));
    let c = batch("gw-c", 1, &users("gw-c", t, 100..200));
    let done = store.ingest(&[&a, &b, &a], NOW).expect("ingest");
    assert_eq!(
        done.iter().map(|d| d.new).collect::<Vec<_>>(),
        vec![true, true, false],
        "the same key twice in one group commit is stored once"
    );
    let again = store.ingest(&[&c, &b], NOW).expect("ingest");
    assert_eq!(
        again.iter().map(|d| d.new).collect::<Vec<_>>(),
        vec![true, false]
    );

    let q = SeriesQuery {
        metric: "active_users".into(),
        start_ms: t - 1,
        end_ms: t + 1,
        agent: None,
        dims: vec![],
        limit: 100,
    };
    let rows = store.series(&q).expect("series");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].how, How::Union);
    assert_eq!(rows[0].value, 200.0, "the union of 0..200, each id once");
    assert_eq!(rows[0].agents, 3);
    assert_eq!(
        rows[0].dims,
        Dims::new([("window", "30m")]),
        "the gateway dim is dropped"
    );
    // Per agent: each gateway's own count; their sum (300) is what summing got wrong.
    let per_agent = store
        .series(&SeriesQuery {
            agent: Some("*".into()),
            ..q.clone()
        })
        .expect("per agent");
    let values: Vec<f64> = per_agent.iter().map(|r| r.value).collect();
    assert_eq!(values, vec![100.0, 100.0, 100.0]);

    // Forwarding: the settled group is claimed once, even by two replicas.
    let groups = store.settled(NOW, 10).expect("settled");
    assert_eq!(groups.len(), 1);
    assert_eq!(
        store.claim(groups.clone(), "up-1", NOW).expect("claim"),
        groups
    );
    assert!(
        store
            .claim(groups.clone(), "up-2", NOW)
            .expect("claim")
            .is_empty(),
        "a second claim loses"
    );
    assert!(store.settled(NOW, 10).expect("settled").is_empty());
    let (_, agg) = store
        .aggregates(&groups)
        .expect("aggregate")
        .pop()
        .expect("some");
    assert_eq!(agg.point.value, 200.0);
    let merged =
        Sketch::decode(&agg.sketch.expect("a union forwards its sketch").payload).expect("decode");
    assert_eq!(merged.estimate(), 200.0);
    assert_eq!(
        store.unsent("up-1").expect("unsent"),
        groups,
        "claimed, not yet confirmed"
    );
    store.mark_sent(&groups).expect("sent");
    assert!(store.unsent("up-1").expect("unsent").is_empty());

    // A late gateway: stored and counted in queries, reported as late.
    let d = batch("gw-d", 1, &users("gw-d", t, 190..260));
    let late = store.ingest(&[&d], NOW).expect("ingest");
    assert_eq!(
        late[0].late, 2,
        "its point and sketch came after forwarding"
    );
    assert_eq!(store.series(&q).expect("series")[0].value, 260.0);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn rollups_recompute_a_day_and_never_add_twice() {
    let (mut store, dir) = sqlite_store();
    let day_start = NOW - 86_400_000;
    let b1 = batch(
        "gw-a",
        1,
        &[
            users("gw-a", day_start + 1_800_000, 0..10).to_vec(),
            vec![counter("gw-a", day_start + 5, 7.0)],
        ]
        .concat(),
    );
    let b2 = batch(
        "gw-b",
        1,
        &[
            users("gw-b", day_start + 3_600_000, 5..20).to_vec(),
            vec![counter("gw-b", day_start + 6, 5.0)],
        ]
        .concat(),
    );
    store.ingest(&[&b1, &b2], NOW).expect("ingest");
    // Outside the day: must not count.
    let b3 = batch("gw-a", 2, &[counter("gw-a", NOW + 5, 100.0)]);
    store.ingest(&[&b3], NOW).expect("ingest");

    let day = crate::clock::day(day_start);
    let first = store.rollup(&day, day_start, NOW).expect("rollup");
    let again = store.rollup(&day, day_start, NOW).expect("rollup again");
    assert_eq!(first, again, "running it twice gives the same totals");
    let find =
        |rows: &[store::RollupRow], m: &str| rows.iter().find(|r| r.metric == m).cloned().expect(m);
    assert_eq!(find(&first, "active_users").value, 20.0, "ids 0..20 once");
    assert_eq!(find(&first, "active_users").how, "union");
    assert_eq!(find(&first, "relay_messages").value, 12.0);
    assert_eq!(find(&first, "relay_messages").how, "sum");
    assert_eq!(
        store.rollups(&day, &day).expect("stored").len(),
        first.len()
    );

    // A late batch for that day: the next rollup includes it, once.
    let late = batch("gw-c", 1, &[counter("gw-c", day_start + 7, 3.0)]);
    store.ingest(&[&late, &late], NOW).expect("ingest");
    let after = store.rollup(&day, day_start, NOW).expect("rollup");
    assert_eq!(find(&after, "relay_messages").value, 15.0);
    assert_eq!(store.rollups(&day, &day).expect("stored"), after);
    std::fs::remove_dir_all(&dir).ok();
}

/// Retention: old days are rolled up, then deleted whole; what arrives for
/// them afterwards (a late record, a batch sent again after its key was
/// deleted) is dropped as expired, so it is neither counted nor forwarded a
/// second time.
#[test]
fn retention_deletes_old_days_after_their_rollup_and_takes_nothing_for_them_again() {
    let (mut store, dir) = sqlite_store();
    let old_day = NOW - 10 * DAY_MS;
    let recent_day = NOW - DAY_MS;
    let day_of = |t: i64| {
        [
            users("gw-a", t + 1_800_000, 0..10).to_vec(),
            vec![counter("gw-a", t + 5, 7.0), ev("u1", t + 6)],
        ]
        .concat()
    };
    // Received when they happened; forwarded.
    let old = batch("gw-a", 1, &day_of(old_day));
    store.ingest(&[&old], old_day + DAY_MS).expect("ingest");
    let recent = batch("gw-a", 2, &day_of(recent_day));
    store.ingest(&[&recent], NOW).expect("ingest");
    let groups = store.settled(NOW, 100).expect("settled");
    assert_eq!(groups.len(), 4, "two windows of each metric: {groups:?}");
    let won = store.claim(groups, "up-1", NOW).expect("claim");
    store.mark_sent(&won).expect("sent");
    let before = store.sizes().expect("sizes");

    store.set_retention(Some(3));
    // A day per call, as the server prunes (batches are stored between).
    let pruned = store.prune(NOW, 1).expect("prune");
    assert_eq!(pruned.days, vec![crate::clock::day(old_day)]);
    let counts = (pruned.points, pruned.sketches, pruned.events);
    assert_eq!(
        counts,
        (2, 1, 1),
        "the old day's two points (users, counter), sketch and event"
    );
    assert_eq!(pruned.unforwarded, 0, "both its windows were forwarded");
    assert!(
        !pruned.finished,
        "one day per call: it has not looked further"
    );
    let rest = store.prune(NOW, 1).expect("prune");
    assert!(rest.finished && rest.days.is_empty(), "{rest:?}");
    assert_eq!(
        rest.batch_keys, 1,
        "the old batch's key, once the days are done"
    );
    let after = store.sizes().expect("sizes");
    assert_eq!(after["points"], before["points"] - 2);
    assert_eq!(after["events"], before["events"] - 1);
    assert_eq!(after["batches"], 1);
    // The old day's totals were kept; the recent day's data is untouched.
    let old_name = crate::clock::day(old_day);
    let totals = store.rollups(&old_name, &old_name).expect("rollups");
    let value = |m: &str| totals.iter().find(|r| r.metric == m).map(|r| r.value);
    assert_eq!(value("active_users"), Some(10.0));
    assert_eq!(value("relay_messages"), Some(7.0));
    let q = |start: i64| SeriesQuery {
        metric: "relay_messages".into(),
        start_ms: start,
        end_ms: start + DAY_MS,
        agent: None,
        dims: vec![],
        limit: 100,
    };
    assert!(store.series(&q(old_day)).expect("series").is_empty());
    assert_eq!(store.series(&q(recent_day)).expect("series")[0].value, 7.0);

    // The old batch again (its key is gone) and a late record for the old
    // day: dropped, not stored, not queued.
    let late = batch("gw-b", 1, &[counter("gw-b", old_day + 9, 1.0)]);
    let done = store.ingest(&[&old, &late], NOW).expect("ingest");
    assert_eq!(
        done.iter()
            .map(|d| (d.new, d.records, d.expired))
            .collect::<Vec<_>>(),
        vec![(true, 0, 4), (true, 0, 1)]
    );
    assert!(store.series(&q(old_day)).expect("series").is_empty());
    assert!(store.settled(i64::MAX, 100).expect("settled").is_empty());
    // The line is the start of the day `retention_days` before now.
    let keep_from = NOW - 3 * DAY_MS;
    let edge = batch(
        "gw-b",
        2,
        &[
            counter("gw-b", keep_from - 1, 1.0),
            counter("gw-b", keep_from, 1.0),
        ],
    );
    let done = store.ingest(&[&edge], NOW).expect("ingest");
    assert_eq!((done[0].records, done[0].expired), (1, 1));

    // Pruning again, here or in another process (a replica), changes
    // nothing: the kept totals are not replaced by the now empty day's.
    let again = store.prune(NOW, usize::MAX).expect("prune");
    assert!(again.finished && again.days.is_empty() && again.batch_keys == 0);
    let db = db::Sqlite::open(&dir.join(STORE_FILE), false).expect("open");
    let mut other = Store::new(Box::new(db), Vec::new(), 0);
    other.set_retention(Some(3));
    let other_pass = other.prune(NOW + 3_600_000, usize::MAX).expect("prune");
    assert!(other_pass.days.is_empty(), "{other_pass:?}");
    assert_eq!(
        store.rollups(&old_name, &old_name).expect("rollups"),
        totals
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn events_are_found_by_user_and_deleted_everywhere_they_are() {
    let (mut store, dir) = sqlite_store();
    let b = batch(
        "host-1",
        1,
        &[
            ev("alice", NOW - 10),
            ev("bob", NOW - 9),
            ev("alice", NOW - 8),
        ],
    );
    let c = batch("host-2", 1, &[ev("alice", NOW - 7)]);
    store.ingest(&[&b, &c], NOW).expect("ingest");
    let q = store::EventQuery {
        start_ms: NOW - 100,
        end_ms: NOW,
        user: Some("alice".into()),
        etype: None,
        agent: None,
        limit: 100,
    };
    let found = store.events(&q).expect("events");
    assert_eq!(found.len(), 3);
    assert!(found.iter().all(|e| e.user.as_deref() == Some("alice")));
    assert_eq!(store.delete_user("alice").expect("delete"), 3);
    assert!(store.events(&q).expect("events").is_empty());
    assert_eq!(store.delete_user("alice").expect("delete"), 0);
    let bob = store::EventQuery {
        user: Some("bob".into()),
        ..q
    };
    assert_eq!(
        store.events(&bob).expect("events").len(),
        1,
        "others are kept"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Regression (issue 13): every recent group was pushed into a list that was
/// never drained, so an upstream grew by ~100 MiB in 90 s of one agent's
/// traffic and never gave it back. The in-memory bookkeeping now stays under
/// its bound whatever arrives, and the `pending` table holds every group.
#[test]
fn forwarding_bookkeeping_stays_bounded_under_many_distinct_windows() {
    let (mut s, dir) = sqlite_store();
    let per_batch = 5_000;
    for seq in 0..8 {
        let recs: Vec<Record> = (0..per_batch)
            .map(|i| {
                Record::point(
                    "m",
                    Dims::new([("gateway", "gw-a")]),
                    NOW + seq * per_batch + i,
                    1.0,
                    "Count",
                )
            })
            .collect();
        s.ingest(&[&batch("gw-a", seq + 1, &recs)], NOW)
            .expect("ingest");
        assert!(
            s.pending_seen_len() <= store::PENDING_SEEN_MAX,
            "after batch {seq}: {} groups in memory",
            s.pending_seen_len()
        );
    }
    let sizes = s.sizes().expect("sizes");
    assert_eq!(sizes["pending"], 8 * per_batch, "every window queued");
    std::fs::remove_dir_all(dir).ok();
}

/// Forwarding works a round's groups a few statements at a time (with
/// PostgreSQL one per group was the bottleneck): more groups than one
/// statement takes, some already claimed by another replica, sums and
/// unions side by side, each group's value as if asked alone.
#[test]
fn a_round_of_many_groups_is_claimed_aggregated_and_marked_sent_exactly() {
    let (mut s, dir) = sqlite_store();
    let t0 = NOW - 3_600_000;
    let (nets, times) = (7, 50);
    let mut want: std::collections::BTreeMap<(String, i64), f64> = Default::default();
    for (a, gw) in ["gw-a", "gw-b", "gw-c"].into_iter().enumerate() {
        let mut recs = Vec::new();
        for n in 0..nets {
            for k in 0..times {
                let net = format!("s{n}");
                let v = (a * 1000 + n * 100 + k) as f64;
                let ts = t0 + k as i64 * 1000;
                recs.push(Record::point(
                    "m",
                    Dims::new([("gateway", gw), ("series", net.as_str())]),
                    ts,
                    v,
                    "Count",
                ));
                *want.entry((net, ts)).or_default() += v;
            }
        }
        // Users at two times: the union across gateways is forwarded.
        recs.extend(users(gw, t0, a as i64 * 50..a as i64 * 50 + 100));
        recs.extend(users(gw, t0 + 1000, 0..10));
        s.ingest(&[&batch(gw, 1, &recs)], NOW).expect("ingest");
    }
    let groups = s.settled(NOW, 10_000).expect("settled");
    assert_eq!(groups.len(), nets * times + 2);
    // Another replica took every ninth group first.
    let theirs: Vec<Group> = groups.iter().step_by(9).cloned().collect();
    assert_eq!(s.claim(theirs.clone(), "up-2", NOW).expect("claim"), theirs);
    let won = s.claim(groups.clone(), "up-1", NOW).expect("claim");
    let mine: Vec<Group> = groups
        .iter()
        .filter(|g| !theirs.contains(g))
        .cloned()
        .collect();
    assert_eq!(won, mine, "the rest, in order");
    assert!(s.settled(NOW, 10_000).expect("settled").is_empty());

    let aggs = s.aggregates(&won).expect("aggregates");
    assert_eq!(
        aggs.iter().map(|(g, _)| g).collect::<Vec<_>>(),
        won.iter().collect::<Vec<_>>(),
        "one aggregate per group won, in order"
    );
    for (g, a) in &aggs {
        if g.metric == "active_users" {
            let ids = if g.ts == t0 { 200.0 } else { 10.0 };
            assert_eq!(a.point.value, ids, "{g:?}: the union");
            assert!(a.sketch.is_some(), "{g:?}");
            continue;
        }
        let net = Dims::decode(&g.net).expect("net dims");
        let series = net
            .pairs()
            .iter()
            .find(|(k, _)| k == "series")
            .map(|(_, v)| v.clone())
            .expect("a series dim");
        assert_eq!(a.point.value, want[&(series, g.ts)], "{g:?}: the sum");
        assert_eq!((a.point.unit.as_ref(), a.sketch.is_none()), ("Count", true));
    }
    assert!(
        s.aggregates(&[Group {
            metric: "m".into(),
            net: "{}".into(),
            ts: t0,
        }])
        .expect("aggregates")
        .is_empty(),
        "a group without points or sketches is left out"
    );
    s.mark_sent(&won).expect("mark sent");
    assert!(s.unsent("up-1").expect("unsent").is_empty());
    assert_eq!(
        s.unsent("up-2").expect("unsent"),
        theirs,
        "not ours to mark"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// Regression (issue 13): an upstream without `[[sink]]` filled `pending`
/// forever (2,000,000 rows after 2 M points): nothing ever drained it.
#[test]
fn an_upstream_without_sinks_keeps_no_forwarding_queue() {
    let (mut s, dir) = sqlite_store();
    let recs = users("gw-a", NOW - 60_000, 0..5);
    s.ingest(&[&batch("gw-a", 1, &recs)], NOW).expect("ingest");
    assert_eq!(
        s.sizes().expect("sizes")["pending"],
        1,
        "queued while forwarding"
    );
    // Restarted without sinks: what an earlier run queued is dropped, and
    // nothing new is queued; the data itself is all there.
    assert_eq!(s.set_forwarding(false), Ok(1));
    let recs = users("gw-b", NOW - 30_000, 3..9);
    s.ingest(&[&batch("gw-b", 1, &recs)], NOW).expect("ingest");
    let sizes = s.sizes().expect("sizes");
    assert_eq!(
        (sizes["pending"], sizes["points"], sizes["sketches"]),
        (0, 2, 2)
    );
    assert_eq!(s.pending_seen_len(), 0);
    std::fs::remove_dir_all(dir).ok();
}

/// Issue 14: the store's errors were strings; callers now decide by variant
/// (an unreachable PostgreSQL is not a bad statement), and the text still
/// says where.
#[test]
fn store_errors_say_what_failed_and_where() {
    use crate::upstream::db::Db;
    let dir = std::env::temp_dir().join(format!("edgemeter-dberr-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).expect("dir");
    // A directory where the SQLite file should be.
    match db::Sqlite::open(&dir, false) {
        Err(e @ db::DbError::Open { .. }) => {
            assert!(e.to_string().starts_with("the upstream store "), "{e}")
        }
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("a directory opened as a database"),
    }
    assert!(matches!(
        db::Postgres::new("not a url", None),
        Err(db::DbError::Open { .. })
    ));
    // Nothing listens on port 1 of loopback: refused at once.
    let mut pg = db::Postgres::new("postgres://edgemeter@127.0.0.1:1/up", None).expect("a URL");
    match pg.exec("SELECT 1", &[]) {
        Err(e @ db::DbError::Unreachable { .. }) => {
            assert!(e.to_string().contains("127.0.0.1:1/up"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    // A statement SQLite cannot run is a statement error, not an outage.
    let mut ok = db::Sqlite::open(&dir.join("up.db"), false).expect("open");
    assert!(matches!(
        ok.exec("SELECT * FROM no_such_table", &[]),
        Err(db::DbError::Statement { .. })
    ));
    std::fs::remove_dir_all(dir).ok();
}

/// The union of a window is cached once computed; a late sketch for that
/// window makes the cached union stale and the next read merges it in.
/// The naive sum and each edge's summary follow every sketch at ingest.
#[test]
fn cached_unions_take_late_sketches_and_edge_summaries_match_the_windows() {
    let (mut s, dir) = sqlite_store();
    let t = NOW - 3 * 86_400_000 + 1_800_000;
    s.ingest(&[&batch("gw-a", 1, &users("gw-a", t, 0..10))], NOW)
        .unwrap();
    s.ingest(&[&batch("gw-b", 1, &users("gw-b", t, 5..15))], NOW)
        .unwrap();
    let q = SeriesQuery {
        metric: "active_users".into(),
        start_ms: t - 86_400_000 * 2,
        end_ms: NOW,
        agent: None,
        dims: Vec::new(),
        limit: 100,
    };
    let first = s.series(&q).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].value.round(), first[0].agents), (15.0, 2));
    // Cached now: the same answer again.
    assert_eq!(s.series(&q).unwrap(), first);
    // A late edge for the same window: 10 more users.
    s.ingest(&[&batch("gw-c", 1, &users("gw-c", t, 100..110))], NOW)
        .unwrap();
    let late = s.series(&q).unwrap();
    assert_eq!((late[0].value.round(), late[0].agents), (25.0, 3));
    let sums = s.naive_sums("active_users", q.start_ms, q.end_ms).unwrap();
    assert_eq!(sums.values().map(|v| v.round()).collect::<Vec<_>>(), [30.0]);
    // Two more windows for gw-a, on later days; a range that cuts days.
    for (seq, (ts, n)) in [(2, (t + 86_400_000, 20)), (3, (t + 2 * 86_400_000, 5))] {
        s.ingest(&[&batch("gw-a", seq, &users("gw-a", ts, 0..n))], NOW)
            .unwrap();
    }
    for (start, end, windows, peak, last) in [
        (q.start_ms, NOW, 3, 20.0, 5.0),
        (t + 1, NOW, 2, 20.0, 5.0),
        (t, t + 86_400_000 + 1, 2, 20.0, 20.0),
    ] {
        let e = s.edge_summaries("active_users", start, end).unwrap();
        let a = e.iter().find(|e| e.agent == "gw-a").unwrap();
        assert_eq!(
            (a.windows, a.peak.round(), a.last_value.round()),
            (windows, peak, last),
            "[{start}, {end})"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

/// A store written before the caches existed gets them counted once at
/// start, and answers as before.
#[test]
fn a_store_from_before_the_union_cache_is_counted_once() {
    let (mut s, dir) = sqlite_store();
    let t = NOW - 86_400_000;
    s.ingest(&[&batch("gw-a", 1, &users("gw-a", t, 0..10))], NOW)
        .unwrap();
    s.ingest(&[&batch("gw-b", 1, &users("gw-b", t, 5..15))], NOW)
        .unwrap();
    drop(s);
    let conn = rusqlite::Connection::open(dir.join(STORE_FILE)).unwrap();
    conn.execute_batch("DELETE FROM unions; DELETE FROM edge_days;")
        .unwrap();
    drop(conn);
    let db = db::Sqlite::open(&dir.join(STORE_FILE), false).expect("open");
    let mut s = Store::new(Box::new(db), vec!["gateway".into()], 0);
    assert_eq!(s.prepare_caches().unwrap(), 1);
    assert_eq!(s.prepare_caches().unwrap(), 0, "only once");
    let rows = s
        .series(&SeriesQuery {
            metric: "active_users".into(),
            start_ms: t - 1,
            end_ms: NOW,
            agent: None,
            dims: Vec::new(),
            limit: 100,
        })
        .unwrap();
    assert_eq!((rows[0].value.round(), rows[0].agents), (15.0, 2));
    let e = s.edge_summaries("active_users", t - 1, NOW).unwrap();
    assert_eq!(e.len(), 2);
    assert!(
        e.iter()
            .all(|e| e.windows == 1 && e.last_value.round() == 10.0)
    );
    std::fs::remove_dir_all(dir).ok();
}

/// Every agent's own points of `metric` in the day before NOW, as
/// (agent, dims, ts, value).
fn own_points(s: &mut Store, metric: &str) -> Vec<(String, String, i64, f64)> {
    s.series(&SeriesQuery {
        metric: metric.into(),
        start_ms: NOW - 86_400_000,
        end_ms: NOW + 86_400_000,
        agent: Some("*".into()),
        dims: Vec::new(),
        limit: usize::MAX,
    })
    .expect("series")
    .into_iter()
    .map(|r| {
        let agent = match r.how {
            How::Agent(a) => a,
            other => panic!("an agent's own point, got {other:?}"),
        };
        (agent, r.dims.encoded().to_owned(), r.ts, r.value)
    })
    .collect()
}

/// Points are stored per series (issue 18). A store written before that
/// (every point carrying its series' columns) is moved when opened for
/// writing, once, and answers as before; opened read-only first, it says
/// what to do.
#[test]
fn a_store_from_before_series_is_moved_once_and_answers_the_same() {
    let dir = std::env::temp_dir().join(format!("edgemeter-upstore-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join(STORE_FILE);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE points (metric TEXT NOT NULL, net TEXT NOT NULL, ts BIGINT NOT NULL,
             agent TEXT NOT NULL, dims TEXT NOT NULL, value DOUBLE PRECISION NOT NULL,
             unit TEXT NOT NULL);
         CREATE INDEX points_by_time ON points (metric, ts);",
    )
    .unwrap();
    let (t1, t2) = (NOW - 120_000, NOW - 60_000);
    let a = r#"{"gateway":"gw-a","window":"30m"}"#;
    let b = r#"{"gateway":"gw-b","window":"30m"}"#;
    let old = [
        ("gw-a", a, t1, 3.0),
        ("gw-b", b, t1, 4.0),
        ("gw-a", a, t2, 5.0),
        ("gw-a", a, t2, 6.0), // the same series twice at one time: both kept
    ];
    for (agent, dims, ts, v) in old {
        conn.execute(
            "INSERT INTO points VALUES ('m', '{\"window\":\"30m\"}', ?1, ?2, ?3, ?4, 'Count')",
            rusqlite::params![ts, agent, dims, v],
        )
        .unwrap();
    }
    drop(conn);

    let refused = db::Sqlite::open(&path, true)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        refused.contains("layout before series") && refused.contains("edgemeter upstream"),
        "{refused}"
    );
    let db = db::Sqlite::open(&path, false).expect("open and move");
    let mut s = Store::new(Box::new(db), vec!["gateway".into()], 0);
    let mut expected: Vec<(String, String, i64, f64)> = old
        .iter()
        .map(|&(agent, dims, ts, v)| (agent.to_owned(), dims.to_owned(), ts, v))
        .collect();
    expected.sort_by(|x, y| (x.2, &x.0, x.3).partial_cmp(&(y.2, &y.0, y.3)).unwrap());
    let mut got = own_points(&mut s, "m");
    got.sort_by(|x, y| (x.2, &x.0, x.3).partial_cmp(&(y.2, &y.0, y.3)).unwrap());
    assert_eq!(got, expected);
    let network = s
        .series(&SeriesQuery {
            metric: "m".into(),
            start_ms: t1,
            end_ms: NOW,
            agent: None,
            dims: Vec::new(),
            limit: 100,
        })
        .unwrap();
    let sums: Vec<(i64, f64, i64)> = network.iter().map(|r| (r.ts, r.value, r.agents)).collect();
    assert_eq!(sums, [(t1, 7.0, 2), (t2, 11.0, 1)]);

    // New points of an old series join it; reopening moves nothing again.
    let recs = [Record::point(
        "m",
        Dims::new([("gateway", "gw-b"), ("window", "30m")]),
        t2,
        1.0,
        "Count",
    )];
    s.ingest(&[&batch("gw-b", 1, &recs)], NOW).unwrap();
    drop(s);
    let db = db::Sqlite::open(&path, false).expect("reopen");
    let mut s = Store::new(Box::new(db), vec!["gateway".into()], 0);
    assert_eq!(own_points(&mut s, "m").len(), 5);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let series: i64 = conn
        .query_row("SELECT COUNT(*) FROM series", [], |r| r.get(0))
        .unwrap();
    assert_eq!(series, 2, "gw-a's and gw-b's series, each once");
    std::fs::remove_dir_all(dir).ok();
}

/// The series ids kept in memory stay within their bound however many
/// series arrive; past it they are looked up again, never duplicated, and
/// every point keeps its own series.
#[test]
fn series_ids_in_memory_stay_bounded_and_points_keep_their_series() {
    let (mut s, dir) = sqlite_store();
    let series = 30_000; // about 3 MiB of keys: past the bound once
    let per_batch = 5_000;
    for seq in 0..(series / per_batch) as i64 {
        let recs: Vec<Record> = (0..per_batch)
            .map(|i| {
                let n = (seq as usize * per_batch + i).to_string();
                Record::point("m", Dims::new([("n", n.as_str())]), NOW, i as f64, "Count")
            })
            .collect();
        s.ingest(&[&batch("gw-a", seq + 1, &recs)], NOW).unwrap();
        assert!(
            s.series_ids_bytes() <= store::SERIES_IDS_MAX_BYTES,
            "after batch {seq}: {} bytes",
            s.series_ids_bytes()
        );
    }
    // The first series again, after the memory was emptied.
    let again: Vec<Record> = (0..100)
        .map(|i| {
            let n = i.to_string();
            Record::point("m", Dims::new([("n", n.as_str())]), NOW + 1, 7.0, "Count")
        })
        .collect();
    s.ingest(&[&batch("gw-a", 99, &again)], NOW).unwrap();
    let points = own_points(&mut s, "m");
    assert_eq!(points.len(), series + 100);
    let dims_of_n = |n: usize| {
        Dims::new([("n", n.to_string().as_str())])
            .encoded()
            .to_owned()
    };
    for (_, dims, ts, v) in &points {
        let n: usize = dims
            .trim_start_matches(r#"{"n":""#)
            .trim_end_matches(r#""}"#)
            .parse()
            .expect("dims n");
        assert_eq!(dims, &dims_of_n(n));
        if *ts == NOW {
            assert_eq!(*v, (n % per_batch) as f64, "point of series {n}");
        } else {
            assert!(n < 100 && *v == 7.0, "series {n} at {ts}: {v}");
        }
    }
    let conn = rusqlite::Connection::open(dir.join(STORE_FILE)).unwrap();
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM series", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows as usize, series, "no series stored twice");
    std::fs::remove_dir_all(dir).ok();
}

/// A transaction that inserted a new series and then failed leaves no id
/// behind: SQLite gives the same id to the next series, and the points of
/// the first must not land in it.
#[test]
fn a_series_from_a_rolled_back_batch_is_not_remembered() {
    let (mut s, dir) = sqlite_store();
    let conn = rusqlite::Connection::open(dir.join(STORE_FILE)).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER refuse BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'refused'); END;",
    )
    .unwrap();
    let point =
        |gw: &str, v: f64| Record::point("m", Dims::new([("gateway", gw)]), NOW, v, "Count");
    let event = Record {
        kind: Kind::Event,
        name: "analytics".into(),
        payload: b"{}".to_vec(),
        ..point("gw-a", 0.0)
    };
    let failed = s.ingest(&[&batch("gw-a", 1, &[point("gw-a", 1.0), event])], NOW);
    assert!(failed.is_err(), "the trigger refused the event");
    conn.execute_batch("DROP TRIGGER refuse").unwrap();
    s.ingest(&[&batch("gw-b", 1, &[point("gw-b", 2.0)])], NOW)
        .unwrap();
    s.ingest(&[&batch("gw-a", 1, &[point("gw-a", 1.0)])], NOW)
        .unwrap();
    let mut got: Vec<(String, String, f64)> = own_points(&mut s, "m")
        .into_iter()
        .map(|(a, d, _, v)| (a, d, v))
        .collect();
    got.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        got,
        [
            ("gw-a".into(), r#"{"gateway":"gw-a"}"#.into(), 1.0),
            ("gw-b".into(), r#"{"gateway":"gw-b"}"#.into(), 2.0)
        ]
    );
    std::fs::remove_dir_all(dir).ok();
}

/// Every statement that names many groups looks each up by key, at every
/// size it is padded to: SQLite 3.54 chose, for a plain join of 256
/// groups, to scan the whole table against an index built on the groups
/// (`forwarded` per ingest: the soak's SQLite run with a sink went from
/// 24 s for 2 simulated minutes to 381 s for 10).
#[test]
fn statements_about_many_groups_look_them_up_and_scan_no_table() {
    let (_store, dir) = sqlite_store();
    let c = rusqlite::Connection::open(dir.join(STORE_FILE)).expect("open");
    for n in [1, 16, 17, 64, 65, 256] {
        let groups: Vec<Group> = (0..n)
            .map(|i| Group {
                metric: format!("m{}", i % 3),
                net: format!("n{i}"),
                ts: i as i64,
            })
            .collect();
        let refs: Vec<&Group> = groups.iter().collect();
        for sql in store::many_group_statements(&refs) {
            let plan = plan_of(&c, &sql);
            assert!(!scans_a_table(&plan), "{n} groups: {plan:?}\n{sql:.200}");
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

/// SQLite's plan for `sql`, one line per step, with made-up parameters.
fn plan_of(c: &rusqlite::Connection, sql: &str) -> Vec<String> {
    let mut st = c
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .expect("prepare");
    let params = (0..st.parameter_count()).map(|i| match i % 3 {
        2 => rusqlite::types::Value::Integer(i as i64),
        _ => rusqlite::types::Value::Text(format!("x{i}")),
    });
    st.query_map(rusqlite::params_from_iter(params), |r| r.get(3))
        .expect("plan")
        .map(|r| r.expect("row"))
        .collect()
}

/// Whether a plan reads a whole table (a scan of a `VALUES` list or of a
/// recursive query's own rows is not one).
fn scans_a_table(plan: &[String]) -> bool {
    plan.iter().any(|step| {
        step.contains("AUTOMATIC")
            || step.strip_prefix("SCAN ").is_some_and(|what| {
                !(what == "g" || what == "v" || what == "m" || what.ends_with("CONSTANT ROWS"))
            })
    })
}

/// Pruning and rollups run these per day or per metric: on a store of a
/// year, a scan in any of them would read the year each time. (Found
/// writing retention: a day's rollup read every sketch and every point.)
#[test]
fn pruning_and_rollup_statements_reach_their_rows_by_an_index() {
    let (_store, dir) = sqlite_store();
    let c = rusqlite::Connection::open(dir.join(STORE_FILE)).expect("open");
    for sql in store::indexed_statements() {
        let plan = plan_of(&c, &sql);
        assert!(!scans_a_table(&plan), "{plan:?}\n{sql}");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// An agent's id is the name of its token's file, any text: its clock's
/// label is escaped as Prometheus wants, one line a sample.
#[test]
fn agent_clock_labels_are_escaped() {
    let counters = api::Counters::default();
    counters.agent_clocks.borrow_mut().extend([
        ("gw-1".to_owned(), api::AgentClock::default()),
        ("we\"ird\\\nname".to_owned(), api::AgentClock::default()),
    ]);
    counters
        .agent_clocks
        .borrow_mut()
        .get_mut("gw-1")
        .expect("gw-1")
        .offset_ms = -259_200_500;
    let text = counters.prometheus("sqlite");
    assert!(
        text.contains(
            "\nedgemeter_upstream_agent_clock_offset_seconds{agent=\"gw-1\"} -259200.5\n"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "\nedgemeter_upstream_agent_clock_offset_seconds{agent=\"we\\\"ird\\\\\\nname\"} 0\n"
        ),
        "{text}"
    );
}
