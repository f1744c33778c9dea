use super::*;
use crate::record::{Dims, Kind, KindSet, Record};
use crate::state_dir::TempDir;

fn point(v: f64) -> Record {
    Record::point(
        "m",
        Dims::new([("k", "v")]),
        1_700_000_000_000 + v as i64,
        v,
        "Count",
    )
}

fn of_kind(kind: Kind, v: f64) -> Record {
    Record { kind, ..point(v) }
}

fn open(dir: &TempDir, max: u64, sinks: &[(&str, KindSet)]) -> Outbox {
    let (mut o, _) = Outbox::open(&dir.0, max).expect("open outbox");
    let sinks: Vec<(String, KindSet)> = sinks.iter().map(|(n, k)| (n.to_string(), *k)).collect();
    o.register_sinks(&sinks).expect("register sinks");
    o
}

fn values(b: &Batch) -> Vec<f64> {
    b.records.iter().map(|(_, r)| r.value).collect()
}

fn count(o: &Outbox, table: &str) -> i64 {
    o.conn
        .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
        .expect("count")
}

const ALL: KindSet = KindSet::ALL;

#[test]
fn append_claim_ack_deletes_only_after_every_sink_confirmed() {
    let d = TempDir::new("outbox");
    let mut o = open(&d, 1 << 20, &[("a", ALL), ("b", ALL)]);
    let app = o
        .append(&[point(1.0), point(2.0), point(3.0)])
        .expect("append");
    assert_eq!(app.ids, 1..=3);
    assert_eq!(app.dropped, 0);

    let a1 = o.next_batch("a", 2).expect("claim").expect("batch");
    assert_eq!(
        (a1.seq, a1.redelivered, values(&a1)),
        (1, false, vec![1.0, 2.0])
    );
    o.ack(&a1).expect("ack");
    assert_eq!(count(&o, "records"), 3, "b has not confirmed yet");

    let b1 = o.next_batch("b", 10).expect("claim").expect("batch");
    assert_eq!((b1.seq, values(&b1)), (1, vec![1.0, 2.0, 3.0]));
    o.ack(&b1).expect("ack");
    assert_eq!(
        count(&o, "records"),
        1,
        "records 1 and 2 are confirmed by both"
    );

    let a2 = o.next_batch("a", 10).expect("claim").expect("batch");
    assert_eq!((a2.seq, values(&a2)), (2, vec![3.0]));
    o.ack(&a2).expect("ack");
    assert_eq!(count(&o, "records"), 0);
    assert_eq!(o.bytes(), 0);
    assert!(o.next_batch("a", 10).expect("claim").is_none());

    let s = o.stats().expect("stats");
    assert_eq!(s.records, 0);
    assert_eq!(s.sinks[0].delivered_records, 3);
    assert_eq!(s.sinks[0].delivered_batches, 2);
    assert_eq!(s.sinks[1].delivered_records, 3);
}

#[test]
fn an_unconfirmed_batch_comes_back_with_the_same_seq_even_after_reopen() {
    let d = TempDir::new("outbox");
    {
        let mut o = open(&d, 1 << 20, &[("a", ALL)]);
        o.append(&[point(1.0), point(2.0)]).expect("append");
        let b = o.next_batch("a", 10).expect("claim").expect("batch");
        assert_eq!(b.seq, 1);
        // More records arrive; the open batch must not grow.
        o.append(&[point(3.0)]).expect("append");
        let again = o.next_batch("a", 10).expect("claim").expect("batch");
        assert_eq!(
            (again.seq, again.redelivered, values(&again)),
            (1, true, vec![1.0, 2.0])
        );
        // No ack: the process "dies" here.
    }
    let (mut o, report) = Outbox::open(&d.0, 1 << 20).expect("reopen");
    assert_eq!((report.records, report.open_batches), (3, 1));
    o.register_sinks(&[("a".into(), ALL)]).expect("register");
    let b = o.next_batch("a", 10).expect("claim").expect("batch");
    assert_eq!(
        (b.seq, b.redelivered, values(&b)),
        (1, true, vec![1.0, 2.0])
    );
    o.ack(&b).expect("ack");
    // A duplicate ack (lost acknowledgement, sent twice) changes nothing.
    o.ack(&b).expect("second ack");
    let next = o.next_batch("a", 10).expect("claim").expect("batch");
    assert_eq!(
        (next.seq, next.redelivered, values(&next)),
        (2, false, vec![3.0])
    );
}

/// Issue 17, problem 1: what the receiver accepted of a batch (one request
/// of several) is kept with the answer: a claim after a restart leaves it
/// out, a dead letter holds only the rest, and its retry sends only that.
#[test]
fn accepted_records_are_never_handed_out_again() {
    let d = TempDir::new("outbox");
    {
        let mut o = open(&d, 1 << 20, &[("cw", ALL)]);
        o.append(&(1..=6).map(|v| point(v as f64)).collect::<Vec<_>>())
            .expect("append");
        let b = o.next_batch("cw", 10).expect("claim").expect("batch");
        let ids: Vec<i64> = b.records.iter().map(|(id, _)| *id).collect();
        // The first request (records 1, 2) was accepted; then the agent died.
        o.accept("cw", b.seq, &ids[..2]).expect("accept");
    }
    let (mut o, _) = Outbox::open(&d.0, 1 << 20).expect("reopen");
    o.register_sinks(&[("cw".into(), ALL)]).expect("register");
    let b = o.next_batch("cw", 10).expect("claim").expect("batch");
    assert_eq!(
        (b.seq, values(&b), b.accepted_before),
        (1, vec![3.0, 4.0, 5.0, 6.0], 2)
    );
    // The next request (3, 4) is accepted, the one after refused for good.
    let ids: Vec<i64> = b.records.iter().map(|(id, _)| *id).collect();
    o.accept("cw", b.seq, &ids[..2]).expect("accept");
    o.dead_letter(&b, "HTTP 400 InvalidParameterValue")
        .expect("dead letter");
    let dead = o.dead_letters(None).expect("list");
    assert_eq!((dead.len(), dead[0].count), (1, 2), "only 5 and 6 are dead");
    assert_eq!(count(&o, "accepted"), 0, "settled: nothing kept about it");
    let stats = o.stats().expect("stats");
    assert_eq!(stats.sinks[0].delivered_records, 4, "1 to 4 were delivered");
    // The operator retries it: only 5 and 6 go, and once 5 is accepted and
    // the rest refused again, the dead letter keeps 6 alone.
    o.retry_dead(None, None).expect("retry");
    let r = o.next_batch("cw", 10).expect("claim").expect("dead letter");
    assert_eq!(values(&r), vec![5.0, 6.0]);
    o.accept("cw", r.seq, &[r.records[0].0]).expect("accept");
    o.dead_letter(&r, "refused again").expect("dead again");
    let dead = o.dead_letters(None).expect("list");
    assert_eq!(dead[0].count, 1);
    o.retry_dead(None, None).expect("retry");
    let r = o.next_batch("cw", 10).expect("claim").expect("dead letter");
    assert_eq!(values(&r), vec![6.0]);
    o.ack(&r).expect("ack");
    assert_eq!(o.dead_letters(None).expect("list").len(), 0);
}

#[test]
fn sinks_only_see_the_kinds_they_take_and_pass_over_the_rest() {
    let d = TempDir::new("outbox");
    let points = KindSet::of(&[Kind::Point]);
    let events = KindSet::of(&[Kind::Event]);
    let mut o = open(&d, 1 << 20, &[("p", points), ("e", events)]);
    o.append(&[
        of_kind(Kind::Point, 1.0),
        of_kind(Kind::Event, 2.0),
        of_kind(Kind::Point, 3.0),
        of_kind(Kind::Event, 4.0),
    ])
    .expect("append");
    let p = o.next_batch("p", 10).expect("claim").expect("batch");
    assert_eq!(values(&p), vec![1.0, 3.0]);
    let e = o.next_batch("e", 10).expect("claim").expect("batch");
    assert_eq!(values(&e), vec![2.0, 4.0]);
    o.ack(&p).expect("ack");
    o.ack(&e).expect("ack");
    assert_eq!(
        count(&o, "records"),
        1,
        "event 4 waits until `p` has looked past it"
    );
    assert!(o.next_batch("p", 10).expect("claim").is_none());
    assert_eq!(count(&o, "records"), 0);

    // Only events arrive: the point sink passes over them so they can go.
    o.append(&[of_kind(Kind::Event, 5.0)]).expect("append");
    assert!(o.next_batch("p", 10).expect("claim").is_none());
    let e = o.next_batch("e", 10).expect("claim").expect("batch");
    o.ack(&e).expect("ack");
    assert_eq!(count(&o, "records"), 0);
}

#[test]
fn drop_oldest_keeps_the_bound_and_counts_per_sink() {
    let d = TempDir::new("outbox");
    let size = point(0.0).charged_bytes(&point(0.0).dims.encode());
    // Room for exactly 10 records.
    let max = (size * 10) as u64;
    let mut o = open(&d, max, &[("fast", ALL), ("slow", ALL)]);
    o.append(&(0..6).map(|i| point(i as f64)).collect::<Vec<_>>())
        .expect("append");
    // `fast` confirms the first 4; `slow` confirms nothing.
    let b = o.next_batch("fast", 4).expect("claim").expect("batch");
    o.ack(&b).expect("ack");
    let app = o
        .append(&(6..13).map(|i| point(i as f64)).collect::<Vec<_>>())
        .expect("append");
    assert_eq!(app.dropped, 3, "13 records into room for 10");
    assert!(o.bytes() <= max as i64);
    let s = o.stats().expect("stats");
    assert_eq!(s.records, 10);
    assert_eq!(s.bytes, o.bytes());
    // Records 0..=2 were dropped: `slow` missed 3, `fast` had confirmed them.
    assert_eq!(
        s.drops,
        vec![(reason::BUFFER_FULL.to_owned(), "slow".to_owned(), 3)]
    );
    let slow = o.next_batch("slow", 100).expect("claim").expect("batch");
    assert_eq!(values(&slow), (3..13).map(f64::from).collect::<Vec<_>>());
}

/// Records of one series in one commit share a row, and a full outbox
/// drops whole rows: the room freed may outlast the next commits, which
/// then drop none though the outbox is still full. The log must not take
/// those for the end of the spell (agent.rs: `said_full`, settling).
#[test]
fn a_full_outbox_drops_whole_rows_so_a_commit_between_drops_may_drop_none() {
    let d = TempDir::new("outbox");
    let event = of_kind(Kind::Event, 1.0);
    let size = event.charged_bytes(&event.dims.encode());
    let mut o = open(&d, (size * 10) as u64, &[("slow", ALL)]);
    let mut events = |n: usize| o.append(&vec![event.clone(); n]).expect("append").dropped;
    assert_eq!(events(6), 0);
    assert_eq!(events(4), 0, "full now");
    assert_eq!(events(1), 6, "the first row goes whole");
    assert_eq!(events(1), 0, "still full, but room was left");
    assert_eq!(events(5), 4, "and drops again");
}

#[test]
fn a_group_larger_than_the_buffer_keeps_its_newest_part() {
    let d = TempDir::new("outbox");
    let size = point(0.0).charged_bytes(&point(0.0).dims.encode());
    let mut o = open(&d, (size * 5) as u64, &[]);
    let app = o
        .append(&(0..8).map(|i| point(i as f64)).collect::<Vec<_>>())
        .expect("append");
    assert_eq!(app.dropped, 3);
    assert_eq!(app.ids.clone().count(), 5);
    let s = o.stats().expect("stats");
    assert_eq!(s.records, 5);
    assert_eq!(
        s.drops,
        vec![(reason::BUFFER_FULL.to_owned(), NO_SINK.to_owned(), 3)]
    );
}

#[test]
fn an_open_batch_whose_records_were_all_dropped_is_passed_over() {
    let d = TempDir::new("outbox");
    let size = point(0.0).charged_bytes(&point(0.0).dims.encode());
    let mut o = open(&d, (size * 4) as u64, &[("a", ALL)]);
    o.append(&[point(0.0), point(1.0)]).expect("append");
    let b = o.next_batch("a", 2).expect("claim").expect("batch");
    assert_eq!(b.seq, 1);
    o.append(&(2..6).map(|i| point(i as f64)).collect::<Vec<_>>())
        .expect("append");
    let next = o.next_batch("a", 10).expect("claim").expect("batch");
    assert_eq!((next.seq, values(&next)), (2, vec![2.0, 3.0, 4.0, 5.0]));
}

#[test]
fn with_no_sinks_records_stay_until_the_bound() {
    let d = TempDir::new("outbox");
    let mut o = open(&d, 1 << 20, &[]);
    o.append(&[point(1.0)]).expect("append");
    assert_eq!(count(&o, "records"), 1);
}

#[test]
fn dead_letters_keep_their_records_and_can_be_retried_or_purged() {
    let d = TempDir::new("outbox");
    let mut o = open(&d, 1 << 20, &[("a", ALL)]);
    o.append(&[point(1.0), point(2.0)]).expect("append");
    let b = o.next_batch("a", 10).expect("claim").expect("batch");
    o.dead_letter(&b, "400 InvalidParameterValue: bad metric")
        .expect("dead letter");
    assert_eq!(count(&o, "records"), 0, "the sink moved past it");
    let list = o.dead_letters(None).expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].seq, list[0].count, list[0].state.as_str()),
        (1, 2, "dead")
    );
    assert_eq!(list[0].error, "400 InvalidParameterValue: bad metric");
    assert!(
        o.next_batch("a", 10).expect("claim").is_none(),
        "dead letters wait for an operator"
    );

    assert_eq!(o.retry_dead(Some("a"), None).expect("retry"), 1);
    let again = o.next_batch("a", 10).expect("claim").expect("batch");
    assert_eq!(
        (again.seq, again.origin, values(&again)),
        (1, Origin::DeadLetter(list[0].id), vec![1.0, 2.0])
    );
    // Refused again: back to dead, with the new error.
    o.dead_letter(&again, "still bad").expect("dead again");
    let list = o.dead_letters(Some("a")).expect("list");
    assert_eq!(
        (
            list[0].state.as_str(),
            list[0].error.as_str(),
            list[0].attempts
        ),
        ("dead", "still bad", 2)
    );

    o.retry_dead(None, Some(list[0].id)).expect("retry by id");
    let again = o.next_batch("a", 10).expect("claim").expect("batch");
    o.ack(&again).expect("ack");
    assert!(o.dead_letters(None).expect("list").is_empty());
    let s = o.stats().expect("stats");
    assert_eq!(s.sinks[0].delivered_records, 2);

    o.append(&[point(3.0)]).expect("append");
    let b = o.next_batch("a", 10).expect("claim").expect("batch");
    o.dead_letter(&b, "nope").expect("dead letter");
    assert_eq!(o.purge_dead(Some("other"), None).expect("purge other"), 0);
    assert_eq!(o.purge_dead(None, None).expect("purge all"), 1);
    assert_eq!(count(&o, "dead_records"), 0);
    assert_eq!(o.stats().expect("stats").dead_letter_bytes, 0);
}

#[test]
fn dead_letters_past_their_budget_evict_the_oldest() {
    let d = TempDir::new("outbox");
    let size = point(0.0).charged_bytes(&point(0.0).dims.encode());
    // Dead-letter budget: a quarter of 40 records = 10 records.
    let mut o = open(&d, (size * 40) as u64, &[("a", ALL)]);
    for round in 0..3 {
        o.append(
            &(0..6)
                .map(|i| point((round * 10 + i) as f64))
                .collect::<Vec<_>>(),
        )
        .expect("append");
        let b = o.next_batch("a", 6).expect("claim").expect("batch");
        o.dead_letter(&b, "refused").expect("dead letter");
    }
    let list = o.dead_letters(None).expect("list");
    assert_eq!(
        list.iter().map(|d| d.seq).collect::<Vec<_>>(),
        vec![3],
        "6+6 > 10: the two oldest went"
    );
    let s = o.stats().expect("stats");
    assert_eq!(
        s.drops,
        vec![(reason::DEAD_LETTER_EVICTED.to_owned(), "a".to_owned(), 12)]
    );
}

#[test]
fn removed_sinks_release_their_records() {
    let d = TempDir::new("outbox");
    {
        let mut o = open(&d, 1 << 20, &[("a", ALL), ("old", ALL)]);
        o.append(&[point(1.0)]).expect("append");
        let b = o.next_batch("a", 10).expect("claim").expect("batch");
        o.ack(&b).expect("ack");
        assert_eq!(count(&o, "records"), 1, "`old` still holds it");
    }
    let (mut o, _) = Outbox::open(&d.0, 1 << 20).expect("reopen");
    let gone = o.register_sinks(&[("a".into(), ALL)]).expect("register");
    assert_eq!(gone, vec!["old".to_owned()]);
    assert_eq!(count(&o, "records"), 0);
    assert_eq!(o.bytes(), 0);
}

#[test]
fn unknown_sink_is_an_error_not_a_panic() {
    let d = TempDir::new("outbox");
    let mut o = open(&d, 1 << 20, &[]);
    let err = o.next_batch("nope", 1).expect_err("unknown sink");
    assert_eq!(err.to_string(), "no sink named `nope` in the outbox");
}

/// A file that is not ours is moved aside, never deleted and never a crash loop.
#[track_caller]
fn check_moved_aside(prepare: impl FnOnce(&Path), why_contains: &str) {
    let d = TempDir::new("outbox");
    let path = d.0.join(FILE_NAME);
    prepare(&path);
    let before = std::fs::read(&path).expect("read prepared file");
    let (mut o, report) = Outbox::open(&d.0, 1 << 20).expect("open must recover");
    let (aside, why) = report.moved_aside.expect("the file must be moved aside");
    assert!(
        why.contains(why_contains),
        "reason {why:?} should mention {why_contains:?}"
    );
    assert_eq!(
        std::fs::read(&aside).expect("aside file kept"),
        before,
        "the old bytes are kept untouched"
    );
    o.register_sinks(&[("a".into(), ALL)]).expect("register");
    o.append(&[point(1.0)]).expect("the fresh outbox works");
    drop(o);
    let (_, report) = Outbox::open(&d.0, 1 << 20).expect("reopen");
    assert!(report.moved_aside.is_none(), "the fresh file is ours");
    assert_eq!(report.records, 1);
}

#[test]
fn recovery_moves_aside_garbage() {
    check_moved_aside(
        |p| {
            std::fs::write(
                p,
                b"this is not a database, just some bytes that are long enough".repeat(100),
            )
            .expect("write")
        },
        "not a readable SQLite database",
    );
}

#[test]
fn recovery_moves_aside_a_foreign_database() {
    check_moved_aside(
        |p| {
            let c = Connection::open(p).expect("create");
            c.execute_batch("CREATE TABLE accounts(id INTEGER); INSERT INTO accounts VALUES (1);")
                .expect("fill");
        },
        "another program",
    );
}

#[test]
fn recovery_moves_aside_a_newer_schema() {
    check_moved_aside(
        |p| {
            drop(Outbox::open(p.parent().expect("dir"), 1 << 20).expect("create ours"));
            let c = Connection::open(p).expect("open");
            c.execute_batch("PRAGMA user_version = 99;").expect("bump");
        },
        "newer edgemeter",
    );
}

#[test]
fn recovery_moves_aside_a_corrupted_page() {
    check_moved_aside(
        |p| {
            let (mut o, _) = Outbox::open(p.parent().expect("dir"), 1 << 30).expect("create ours");
            o.register_sinks(&[("a".into(), ALL)]).expect("register");
            for _ in 0..20 {
                o.append(&(0..500).map(|i| point(i as f64)).collect::<Vec<_>>())
                    .expect("fill");
            }
            o.conn
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .expect("checkpoint");
            drop(o);
            // Scribble over the middle of the file, below the header.
            let mut bytes = std::fs::read(p).expect("read");
            let mid = bytes.len() / 2;
            for b in &mut bytes[mid..mid + 4096] {
                *b = 0xA5;
            }
            std::fs::write(p, bytes).expect("write");
        },
        "",
    );
}

#[test]
fn an_empty_file_is_a_fresh_outbox() {
    let d = TempDir::new("outbox");
    std::fs::write(d.0.join(FILE_NAME), b"").expect("touch");
    let (_, report) = Outbox::open(&d.0, 1 << 20).expect("open");
    assert!(report.moved_aside.is_none());
}

/// A disk with a little room back takes the longest prefix of a group
/// that fits (halving), in order; the rest waits for more room.
#[test]
fn a_nearly_full_database_takes_the_first_records_that_fit() {
    let d = TempDir::new("outbox");
    let mut o = open(&d, 1 << 30, &[("a", ALL)]);
    o.append(&[point(-1.0)]).expect("append");
    o.cap_pages(Some(40));
    let group: Vec<Record> = (0..20_000).map(|i| point(i as f64)).collect();
    let (n, appended) = o.append_what_fits(&group).expect("some fit");
    assert!(0 < n && n < group.len(), "{n} of {}", group.len());
    assert_eq!(appended.ids.clone().count(), n);
    assert_eq!(count(&o, "records"), 1 + n as i64);
    let rest = &group[n..];
    let err = o.append_what_fits(rest).map(|(n, _)| n);
    assert!(
        err.is_err() || err.as_ref().is_ok_and(|m| *m < rest.len()),
        "the rest does not fit whole: {err:?}"
    );
    let taken = err.unwrap_or(0);
    o.cap_pages(None);
    let (m, _) = o.append_what_fits(&rest[taken..]).expect("room again");
    assert_eq!(n + taken + m, group.len());
    let b = o.next_batch("a", 30_000).expect("claim").expect("batch");
    let values: Vec<f64> = b.records.iter().map(|(_, r)| r.value).collect();
    let want: Vec<f64> = std::iter::once(-1.0)
        .chain((0..20_000).map(f64::from))
        .collect();
    assert_eq!(values, want, "each record once, in the order given");
}

#[test]
fn a_full_database_is_a_retryable_error_that_loses_nothing_committed() {
    let d = TempDir::new("outbox");
    let mut o = open(&d, 1 << 30, &[("a", ALL)]);
    o.append(&[point(1.0)]).expect("append");
    // SQLite's own "disk full": cap the file at its current size.
    let pages: i64 = o
        .conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .expect("pages");
    o.conn
        .execute_batch(&format!("PRAGMA max_page_count = {pages};"))
        .expect("cap");
    let big: Vec<Record> = (0..5000).map(|i| point(i as f64)).collect();
    let err = o.append(&big).expect_err("must not fit");
    assert!(err.is_disk_full(), "{err}");
    assert_eq!(count(&o, "records"), 1, "the failed group left no trace");
    assert_eq!(
        o.bytes(),
        o.stats().expect("stats").bytes,
        "the byte count stayed true"
    );
    o.conn
        .execute_batch("PRAGMA max_page_count = 1073741823;")
        .expect("uncap");
    o.append(&big).expect("append after space came back");
    let b = o.next_batch("a", 10_000).expect("claim").expect("batch");
    assert_eq!(b.records.len(), 5001);
}

#[test]
fn a_partly_refused_batch_is_confirmed_and_the_rest_dead_lettered_together() {
    let d = TempDir::new("outbox");
    let mut o = open(&d, 1 << 20, &[("cw", ALL)]);
    o.append(&[point(1.0), point(2.0), point(3.0), point(4.0)])
        .expect("append");
    let b = o.next_batch("cw", 10).expect("claim").expect("batch");
    let (id2, id4) = (b.records[1].0, b.records[3].0);
    o.ack_with_rejects(
        &b,
        &[
            (id2, "older than 14 days".into()),
            (id4, "older than 14 days".into()),
        ],
    )
    .expect("ack");
    assert_eq!(count(&o, "records"), 0);
    let s = o.stats().expect("stats");
    assert_eq!(s.sinks[0].delivered_records, 2);
    let dead = o.dead_letters(None).expect("list");
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].seq, dead[0].count), (1, 2));
    assert_eq!(dead[0].error, "2 record(s): older than 14 days");
    o.retry_dead(None, None).expect("retry");
    let again = o.next_batch("cw", 10).expect("claim").expect("batch");
    assert_eq!(values(&again), vec![2.0, 4.0]);
    // Everything refused: nothing counts as delivered.
    o.ack(&again).expect("ack");
    o.append(&[point(5.0)]).expect("append");
    let b = o.next_batch("cw", 10).expect("claim").expect("batch");
    o.ack_with_rejects(&b, &[(b.records[0].0, "not a finite number".into())])
        .expect("ack");
    assert_eq!(o.stats().expect("stats").sinks[0].delivered_records, 4);
}

#[test]
fn a_group_inserted_many_rows_to_a_statement_keeps_every_field_order_and_id() {
    // Two full statements and the rest one row each, after ids a deleted
    // group used (AUTOINCREMENT must not hand them out again).
    let d = TempDir::new("outbox");
    let mut o = open(&d, 1 << 30, &[("a", ALL)]);
    let first = o.append(&[point(0.0), point(0.5)]).expect("append");
    let b = o.next_batch("a", 10).expect("claim").expect("batch");
    o.ack(&b).expect("ack");
    assert_eq!(count(&o, "records"), 0, "confirmed records are deleted");

    let n = 2 * super::append::ROWS_PER_INSERT + 5;
    let group: Vec<Record> = (0..n)
        .map(|i| Record {
            kind: if i % 2 == 0 { Kind::Event } else { Kind::Point },
            name: format!("name-{i}").into(),
            dims: Dims::new([("i", i.to_string().as_str())]),
            unit: if i % 3 == 0 { "None" } else { "Count" }.into(),
            payload: format!("payload {i}").into_bytes(),
            ..point(i as f64)
        })
        .collect();
    let app = o.append(&group).expect("append");
    let after = *first.ids.end();
    assert_eq!(app.ids, after + 1..=after + n as i64);

    let b = o.next_batch("a", 1000).expect("claim").expect("batch");
    let ids: Vec<i64> = b.records.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, app.ids.clone().collect::<Vec<_>>());
    let back: Vec<&Record> = b.records.iter().map(|(_, r)| r).collect();
    assert_eq!(back, group.iter().collect::<Vec<_>>());
}

/// An event of stream `s` at `ts` with payload `text`.
fn event(s: &str, ts: i64, text: &str) -> Record {
    Record {
        kind: Kind::Event,
        ts_ms: ts,
        name: "relay_message".into(),
        dims: Dims::new([("stream", s)]),
        value: 0.0,
        unit: "None".into(),
        payload: text.as_bytes().to_vec(),
    }
}

/// Rows as stored: (id, n).
fn rows(o: &Outbox) -> Vec<(i64, i64)> {
    o.conn
        .prepare("SELECT id, n FROM records ORDER BY id")
        .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .expect("rows")
}

/// A group the way the relay sends one: runs of events per stream, a point
/// between them, a run longer than a row holds, an event too large to
/// share a row, and a run split by another series.
fn relay_group() -> Vec<Record> {
    let mut g: Vec<Record> = (0..3)
        .map(|i| event("a", 100 + i, &format!("{{\"a\":{i}}}")))
        .collect();
    g.push(point(7.0));
    g.extend((0..70).map(|i| event("a", 200 + i, &format!("{{\"m\":{i}}}"))));
    g.extend((0..2).map(|i| event("b", 300 + i, &format!("{{\"b\":{i}}}"))));
    g.push(event("b", 302, &"x".repeat(5000)));
    g.push(event("b", 303, "{}"));
    g.push(Record {
        name: "other".into(),
        ..event("b", 304, "{}")
    });
    g
}

/// `relay_group()` appended as three groups (its first run, the point, the
/// rest), so that its rows are the runs as they arrived: one append gathers
/// a series' events wherever they are in the group.
fn append_relay_group_in_three(o: &mut Outbox) {
    let group = relay_group();
    for part in [&group[..3], &group[3..4], &group[4..]] {
        o.append(part).expect("append");
    }
    // 3 events, the point, 64 + 6 events, 2 events of `b`, the large one
    // alone, the next one (its run starts anew), one of another name.
    assert_eq!(
        rows(o),
        vec![
            (3, 3),
            (4, 1),
            (68, 64),
            (74, 6),
            (76, 2),
            (77, 1),
            (78, 1),
            (79, 1)
        ]
    );
}

#[test]
fn events_arriving_together_share_a_row_and_come_back_as_records() {
    let d = TempDir::new("outbox");
    let mut o = open(&d, 1 << 30, &[("a", ALL)]);
    let group = relay_group();
    let app = o.append(&group).expect("append");
    assert_eq!(app.ids, 1..=group.len() as i64);
    // The 3 + 70 events of `a` gathered (64 and 9), the point, 2 events of
    // `b`, the large one alone, the next one (its run starts anew), one of
    // another name.
    assert_eq!(
        rows(&o),
        vec![
            (64, 64),
            (73, 9),
            (74, 1),
            (76, 2),
            (77, 1),
            (78, 1),
            (79, 1)
        ]
    );
    let stored: Vec<&Record> = group[..3]
        .iter()
        .chain(&group[4..74])
        .chain(&group[3..4])
        .chain(&group[74..])
        .collect();
    let s = o.stats().expect("stats");
    assert_eq!((s.records, s.sinks[0].pending), (79, 79));
    let charged: i64 = group
        .iter()
        .map(|r| r.charged_bytes(r.dims.encoded()))
        .sum();
    assert_eq!((s.bytes, o.bytes()), (charged, charged));

    // Batches of 10 end inside rows; every record comes back once, in
    // order, with its own id, time and payload.
    let mut back: Vec<(i64, Record)> = Vec::new();
    for _ in 0..20 {
        let Some(b) = o.next_batch("a", 10).expect("claim") else {
            break;
        };
        assert!(b.records.len() <= 10);
        back.extend(b.records.iter().cloned());
        o.ack(&b).expect("ack");
        let pending = o.stats().expect("stats").sinks[0].pending;
        assert_eq!(
            pending,
            79 - back.len() as i64,
            "pending counts records, not rows"
        );
    }
    let ids: Vec<i64> = back.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (1..=79).collect::<Vec<_>>());
    let records: Vec<&Record> = back.iter().map(|(_, r)| r).collect();
    assert_eq!(records, stored);
    assert_eq!((count(&o, "records"), o.bytes()), (0, 0));
    assert_eq!(o.stats().expect("stats").sinks[0].delivered_records, 79);
}

#[test]
fn an_append_gathers_each_series_events_into_rows_in_arrival_order() {
    let d = TempDir::new("outbox");
    let mut o = open(&d, 1 << 30, &[("a", ALL)]);
    // Reads of two streams interleaved, a point between them, and an event
    // of stream `a` in another unit (another series).
    let ev = |s: &str, i: i64| event(s, 100 + i, &format!("{{\"{s}\":{i}}}"));
    let other_unit = Record {
        unit: "Count".into(),
        ..ev("a", 9)
    };
    let group = vec![
        ev("a", 0),
        ev("a", 1),
        ev("b", 0),
        ev("b", 1),
        point(5.0),
        ev("a", 2),
        ev("a", 3),
        ev("b", 2),
        other_unit,
        ev("a", 4),
    ];
    let app = o.append(&group).expect("append");
    assert_eq!(app.ids, 1..=10);
    // `a`'s five events, `b`'s three, the point, the other series.
    assert_eq!(rows(&o), vec![(5, 5), (8, 3), (9, 1), (10, 1)]);
    let b = o.next_batch("a", 100).expect("claim").expect("batch");
    let back: Vec<&Record> = b.records.iter().map(|(_, r)| r).collect();
    let order = [0, 1, 5, 6, 9, 2, 3, 7, 4, 8];
    assert_eq!(back, order.map(|i| &group[i]).to_vec());
    o.ack(&b).expect("ack");

    // Twelve streams, two reads of five each, interleaved as the relay
    // hands them over: a row per stream, not one per read.
    let streams: Vec<String> = (0..12).map(|s| format!("spin{s}")).collect();
    let reads: Vec<Record> = (0..2)
        .flat_map(|read| {
            streams.iter().flat_map(move |s| {
                (0..5).map(move |i| event(s, 1000 + read * 5 + i, &format!("[{read},{i}]")))
            })
        })
        .collect();
    o.append(&reads).expect("append");
    let runs: Vec<i64> = rows(&o).iter().map(|(_, n)| *n).collect();
    assert_eq!(runs, vec![10; 12], "a row per stream");
    let b = o.next_batch("a", 200).expect("claim").expect("batch");
    for s in &streams {
        let dims = Dims::new([("stream", s.as_str())]);
        let of_s = |rs: Vec<&Record>| -> Vec<Record> {
            rs.into_iter().filter(|r| r.dims == dims).cloned().collect()
        };
        assert_eq!(
            of_s(b.records.iter().map(|(_, r)| r).collect()),
            of_s(reads.iter().collect()),
            "stream {s} in arrival order"
        );
    }
}

#[test]
fn a_batch_ending_inside_a_row_is_redelivered_without_what_was_accepted() {
    let d = TempDir::new("outbox");
    {
        let mut o = open(&d, 1 << 30, &[("a", ALL), ("b", ALL)]);
        append_relay_group_in_three(&mut o);
        let b = o.next_batch("a", 6).expect("claim").expect("batch");
        let ids: Vec<i64> = b.records.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, (1..=6).collect::<Vec<_>>());
        // Records 5 and 6 (inside the row of 64) were accepted; then the
        // agent died.
        o.accept("a", b.seq, &[5, 6]).expect("accept");
    }
    let (mut o, _) = Outbox::open(&d.0, 1 << 30).expect("reopen");
    o.register_sinks(&[("a".into(), ALL), ("b".into(), ALL)])
        .expect("register");
    let b = o.next_batch("a", 6).expect("claim").expect("batch");
    let ids: Vec<i64> = b.records.iter().map(|(id, _)| *id).collect();
    assert_eq!((b.seq, ids, b.accepted_before), (1, vec![1, 2, 3, 4], 2));
    o.ack(&b).expect("ack");
    let next = o.next_batch("a", 3).expect("claim").expect("batch");
    let ids: Vec<i64> = next.records.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, vec![7, 8, 9], "after the cursor, inside the row");
    // `b` has confirmed nothing: every row stays.
    assert_eq!(count(&o, "records"), 8);
}

#[test]
fn dropping_a_row_counts_each_record_a_sink_had_not_passed() {
    let d = TempDir::new("outbox");
    let group = relay_group();
    let charged = |r: &Record| r.charged_bytes(r.dims.encoded());
    let total: i64 = group.iter().map(charged).sum();
    let mut o = open(&d, total as u64, &[("fast", ALL), ("slow", ALL)]);
    append_relay_group_in_three(&mut o);
    // `fast` passes 10 records: the first two rows and 6 of the row of 64.
    let b = o.next_batch("fast", 10).expect("claim").expect("batch");
    o.ack(&b).expect("ack");
    // One more record makes room by dropping the oldest rows: the first
    // (3 records) is not enough, the point (1) neither, the 64 are.
    let large = event("c", 400, &"y".repeat(1000));
    assert!(charged(&large) > charged(&group[0]) * 3 + charged(&group[3]));
    let app = o.append(&[large]).expect("append");
    assert_eq!(app.dropped, 68);
    let s = o.stats().expect("stats");
    assert_eq!(s.records, 79 + 1 - 68);
    assert_eq!(
        s.drops,
        vec![
            (reason::BUFFER_FULL.to_owned(), "fast".to_owned(), 58),
            (reason::BUFFER_FULL.to_owned(), "slow".to_owned(), 68),
        ]
    );
    let rest = o.next_batch("fast", 100).expect("claim").expect("batch");
    assert_eq!(rest.records.first().map(|(id, _)| *id), Some(69));
    assert_eq!(rest.records.len(), 12);
}

#[test]
fn a_dead_letter_of_packed_rows_keeps_each_record() {
    let d = TempDir::new("outbox");
    let mut o = open(&d, 1 << 30, &[("a", ALL)]);
    let group: Vec<Record> = (0..5)
        .map(|i| event("a", 10 + i, &format!("[{i}]")))
        .collect();
    o.append(&group).expect("append");
    assert_eq!(rows(&o), vec![(5, 5)]);
    let b = o.next_batch("a", 10).expect("claim").expect("batch");
    o.ack_with_rejects(&b, &[(2, "too old".into()), (4, "too old".into())])
        .expect("ack with rejects");
    assert_eq!(count(&o, "records"), 0);
    o.retry_dead(None, None).expect("retry");
    let again = o.next_batch("a", 10).expect("claim").expect("dead letter");
    let back: Vec<(i64, &Record)> = again.records.iter().map(|(id, r)| (*id, r)).collect();
    assert_eq!(back, vec![(2, &group[1]), (4, &group[3])]);
}

#[test]
fn an_outbox_of_schema_2_is_read_and_upgraded_in_place() {
    let d = TempDir::new("outbox");
    let path = d.0.join(FILE_NAME);
    {
        // What an edgemeter of schema 2 left: two records, a sink part
        // of the way through them.
        let (mut o, _) = Outbox::open(&d.0, 1 << 20).expect("open");
        o.register_sinks(&[("a".into(), ALL)]).expect("register");
        o.append(&[point(1.0), point(2.0), point(3.0)])
            .expect("append");
        let b = o.next_batch("a", 1).expect("claim").expect("batch");
        o.ack(&b).expect("ack");
        o.conn
            .execute_batch(
                "BEGIN;
                 CREATE TABLE old AS SELECT id, kind, ts, name, dims, value, unit, payload, size, at FROM records;
                 DROP TABLE records;
                 CREATE TABLE records (
                     id INTEGER PRIMARY KEY AUTOINCREMENT, kind INTEGER NOT NULL, ts INTEGER NOT NULL,
                     name TEXT NOT NULL, dims TEXT NOT NULL, value REAL NOT NULL, unit TEXT NOT NULL,
                     payload BLOB NOT NULL, size INTEGER NOT NULL, at INTEGER NOT NULL);
                 INSERT INTO records SELECT * FROM old;
                 DROP TABLE old;
                 PRAGMA user_version = 2;
                 COMMIT;",
            )
            .expect("make it schema 2");
    }
    // `edgemeter status` while the old agent still runs: read as it is.
    let o = Outbox::open_read_only(&d.0).expect("read only");
    let s = o.stats().expect("stats of schema 2");
    assert_eq!((s.records, s.sinks[0].pending), (2, 2));
    drop(o);
    // The new agent starts: the file is upgraded, nothing is lost.
    let mut o = open(&d, 1 << 20, &[("a", ALL)]);
    let version: i64 = o
        .conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("version");
    assert_eq!(version, SCHEMA_VERSION);
    assert!(path.exists());
    o.append(&[event("x", 1, "{}"), event("x", 2, "{}")])
        .expect("append");
    let b = o.next_batch("a", 10).expect("claim").expect("batch");
    let ids: Vec<i64> = b.records.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        (values(&b)[..2].to_vec(), ids),
        (vec![2.0, 3.0], vec![2, 3, 4, 5])
    );
}

/// SQLite's own checkpoints came every 4 MB of WAL, at whichever commit
/// crossed it, two fsyncs on top of the writer's one a second
/// (`durable.rs`). The outbox's come at a sync once 16 MiB are written,
/// or at a commit once 64 MiB are, if no sync comes.
#[test]
fn checkpoints_wait_for_a_sync_unless_the_wal_passes_its_bound() {
    use std::sync::atomic::Ordering;
    let d = TempDir::new("outbox");
    let mut o = open(&d, 1 << 30, &[]);
    let len = |name: &str| std::fs::metadata(d.0.join(name)).map_or(0, |m| m.len());
    const MIB: u64 = 1 << 20;
    // Events of 3,000 bytes: a row, about a page, each.
    let mut ts = 0;
    let mut append_mib = |o: &mut Outbox, mib: u64| {
        let text = "x".repeat(3_000);
        for _ in 0..mib * MIB / 3_000 / 256 {
            let group: Vec<Record> = (0..256)
                .map(|_| {
                    ts += 1;
                    event("a", ts, &text)
                })
                .collect();
            o.append(&group).expect("append");
        }
    };
    let db_at_start = len(FILE_NAME);
    append_mib(&mut o, 24);
    assert!(len("outbox.db-wal") > 16 * MIB, "the WAL holds the 24 MiB");
    assert!(
        len(FILE_NAME) < db_at_start + MIB,
        "no checkpoint before a sync: the database grew from {db_at_start} to {} bytes",
        len(FILE_NAME)
    );

    o.sync().expect("sync");
    assert!(
        len(FILE_NAME) > 20 * MIB,
        "the sync checkpointed: the database is {} bytes",
        len(FILE_NAME)
    );
    assert_eq!(o.wal_pages.load(Ordering::Relaxed), 0);

    // No sync: a commit checkpoints once the WAL passes 64 MiB, and the
    // WAL starts again from its beginning after it.
    append_mib(&mut o, 80);
    assert!(
        len(FILE_NAME) > (24 + 60) * MIB,
        "a commit past 64 MiB checkpointed: the database is {} bytes",
        len(FILE_NAME)
    );
    assert!(
        len("outbox.db-wal") < 66 * MIB,
        "the WAL stays within its bound: {} bytes",
        len("outbox.db-wal")
    );
    let total: i64 = o
        .conn
        .query_row("SELECT SUM(n) FROM records", [], |r| r.get(0))
        .expect("count");
    assert_eq!(total, ts, "every record is there");
}
