//! The relay source's work per message, in process: what the main thread
//! does between reading a frame and handing its records on, without the
//! network, the executor or the outbox, so that a change to it shows
//! above this machine's noise (the whole-process relay bench moves by
//! ±15 % between runs; this one by a few percent).
//!
//! Run: `cargo bench --bench relay_ingest` (add `-- --quick` for a short run).
//!
//! `--instructions`: one round of the `ingest` subject alone, for a counter
//! of instructions and cache misses that this machine's noise does not
//! move, such as `valgrind --tool=cachegrind --cache-sim=yes
//! target/release/deps/relay_ingest-<hash> --instructions` (divide its
//! totals by the messages it prints; `--LL=524288,8,64` for a cache as
//! small as what the whole agent leaves the ingest).
//!
//! Subjects, each fed the relay bench's messages (12 streams, 200 users
//! each, 186-byte `analytics` envelopes) round-robin, on this thread, timed
//! by the thread's own CPU clock; alternated, the median of the rounds:
//! - `parse floor`: what the relay bench's floor does with a message: read
//!   its user and type (borrowed), then keep the arrival time, user, type
//!   and a copy of the message as a row. No counters, no sketches, no
//!   analytics;
//! - `ingest, events = false`: edgemeter's `ingest::State::frame`, the
//!   counters, sketches and analytics, storing no events;
//! - `ingest`: the same with events, the default: each message becomes a
//!   `Record`.
//!
//! `--users N`: the memory the analytics keep per tracked user, for
//! sizing `max_users`: N users (36-character ids, as practable's) each send
//! 20 `analytics` commands on one rig, the streams' windows are closed (a
//! window's sketches are not kept per user), and glibc's count of the bytes
//! allocated, before and after, is divided by N. The full run measures
//! 100,000 users (the default `max_users`), `--quick` 20,000.
//!
//! Both keep what they made in groups of 2,000 (100 ms at 20,000 msg/s, the
//! outbox's flush interval) and drop a group when it is full, here on this
//! thread, as edgemeter's writer does once the group is committed: the
//! records' payload buffers are kept for the next ones
//! (`record::payloads`), the floor's rows freed.

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use edgemeter::record::{Record, payloads};
use edgemeter::sources::relay::ingest::{Frame, Settings, State};
use edgemeter::sources::relay::link::Link;

/// As the relay bench.
const STREAMS: usize = 12;
/// Records held before a group is dropped.
const GROUP: usize = 2_000;

fn state(events: bool) -> State {
    let streams = (0..STREAMS)
        .map(|n| {
            let link = Link::new(Duration::from_secs(1), Duration::from_secs(60), 0);
            (format!("spin{}", 30 + n), link)
        })
        .collect();
    State::new(
        Settings {
            source: "lab".to_owned(),
            max_frame_bytes: 1 << 20,
            events,
            raw_files: false,
            max_users: 100_000,
        },
        streams,
    )
}

/// Milliseconds at message `k`: 20 messages a millisecond, 20,000 a second.
fn arrival(k: usize) -> i64 {
    1_700_000_000_000 + (k / 20) as i64
}

/// Message `k` of the round-robin: its stream and its text.
fn nth(msgs: &[Vec<String>], k: usize) -> (usize, &str) {
    let i = k % STREAMS;
    (i, &msgs[i][(k / STREAMS) % msgs[i].len()])
}

/// CPU µs per message of `edgemeter`'s ingest over `n` messages.
fn ingest(msgs: &[Vec<String>], n: usize, events: bool) -> f64 {
    let mut state = state(events);
    let mut out: Vec<Record> = Vec::with_capacity(GROUP);
    let mut held: Vec<Record> = Vec::with_capacity(GROUP);
    let mut made = 0usize;
    let cpu = support::thread_cpu();
    for k in 0..n {
        let (i, text) = nth(msgs, k);
        state.frame(i, Frame::Text(text), arrival(k), &mut out);
        made += out.len();
        held.append(&mut out);
        if held.len() >= GROUP {
            // As edgemeter's writer does once a group is committed.
            payloads::recycle(&mut held);
        }
    }
    let us = (support::thread_cpu() - cpu).as_secs_f64() * 1e6 / n as f64;
    assert_eq!(
        state.streams.iter().map(|s| s.totals.messages).sum::<u64>(),
        n as u64,
        "every message was read"
    );
    assert_eq!(made, if events { n } else { 0 }, "one event a message");
    us
}

/// CPU µs per message of the relay bench floor's per-message work.
fn parse_floor(msgs: &[Vec<String>], n: usize) -> f64 {
    let mut rows: Vec<support::FloorRow> = Vec::with_capacity(GROUP);
    let mut kept = 0usize;
    let cpu = support::thread_cpu();
    for k in 0..n {
        if let Some(row) = support::floor_row(nth(msgs, k).1, arrival(k)) {
            rows.push(row);
            kept += 1;
        }
        if rows.len() >= GROUP {
            rows.clear();
        }
    }
    let us = (support::thread_cpu() - cpu).as_secs_f64() * 1e6 / n as f64;
    assert_eq!(kept, n, "every message parsed");
    us
}

/// Commands each user sends in `--users`.
const MESSAGES_PER_USER: usize = 20;

/// Bytes the heap has handed out and not had back: glibc's own count, over
/// every arena and the chunks it mapped, so that measuring costs the code
/// measured nothing (a counting allocator would add to every allocation).
fn heap_in_use() -> usize {
    /// glibc's `struct mallinfo2` (malloc.h): ten `size_t`.
    #[repr(C)]
    struct Mallinfo2 {
        arena: usize,
        ordblks: usize,
        smblks: usize,
        hblks: usize,
        hblkhd: usize,
        usmblks: usize,
        fsmblks: usize,
        uordblks: usize,
        fordblks: usize,
        keepcost: usize,
    }
    unsafe extern "C" {
        fn mallinfo2() -> Mallinfo2;
    }
    // SAFETY: a glibc function with no arguments that returns a struct by
    // value (glibc 2.33 and later; Debian 12 has 2.36).
    let m = unsafe { mallinfo2() };
    m.uordblks + m.hblkhd
}

/// `--users N`: bytes of heap the analytics keep per tracked user.
fn memory_per_user(users: usize) -> f64 {
    let before = heap_in_use();
    let mut state = state(false);
    let mut out: Vec<Record> = Vec::new();
    let mut text = String::new();
    let logs = ["voltage", "speed", "position", "voltage_ramp", "speed_ramp"];
    // Every user's first command, then every user's second, and so on: as
    // a term's students come and go, not one user's session at a time.
    for k in 0..users * MESSAGES_PER_USER {
        let (u, m) = (k % users, k / users);
        let i = u % STREAMS;
        text.clear();
        use std::fmt::Write;
        write!(
            text,
            r#"{{"user":"5e1f0000-0000-4000-8000-{u:012}","t":{},"exp":"spinner","hardware":"spin{}","course":"engdes1","type":"analytics","payload":{{"log":"{}","data":{{"set":1.5}}}}}}"#,
            1_700_000_000_000u64 + k as u64,
            30 + i,
            logs[m % logs.len()],
        )
        .expect("a String takes any write");
        state.frame(i, Frame::Text(&text), arrival(k), &mut out);
        out.clear();
    }
    state.close_window(arrival(users * MESSAGES_PER_USER), 300, &mut out);
    drop(out);
    drop(text);
    let untracked = state
        .streams
        .iter()
        .map(|s| s.totals.untracked)
        .sum::<u64>();
    assert_eq!(untracked, 0, "every user is tracked (max_users is 100,000)");
    let kept = heap_in_use().saturating_sub(before);
    drop(state);
    kept as f64 / users as f64
}

fn median(v: Vec<f64>) -> f64 {
    support::median_by(v, |&us| us)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (n, rounds) = if quick { (240_000, 3) } else { (1_200_000, 5) };
    let msgs: Vec<Vec<String>> = (0..STREAMS)
        .map(|s| support::relay_messages(&format!("spin{}", 30 + s), false))
        .collect();
    if let Some(users) = std::env::args()
        .skip_while(|a| a != "--users")
        .nth(1)
        .map(|n| n.parse::<usize>().expect("--users N"))
    {
        let per_user = memory_per_user(users);
        println!("relay analytics: {users} users, {per_user:.0} bytes of heap kept per user");
        return;
    }
    if std::env::args().any(|a| a == "--instructions") {
        let us = ingest(&msgs, 240_000, true);
        println!("relay ingest: 240000 messages, {us:.3} µs CPU/msg (one round, events stored)");
        return;
    }
    println!(
        "relay ingest: {STREAMS} streams, {} users each, messages of {} bytes; {n} messages a round, median of {rounds} alternating rounds, this thread's CPU",
        support::USERS_PER_STREAM,
        msgs[0][0].len()
    );
    let (mut floor, mut quiet, mut full) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        floor.push(parse_floor(&msgs, n));
        quiet.push(ingest(&msgs, n, false));
        full.push(ingest(&msgs, n, true));
    }
    let (floor, quiet, full) = (median(floor), median(quiet), median(full));
    println!("  parse floor             {floor:6.3} µs CPU/msg");
    println!(
        "  ingest, events = false  {quiet:6.3} µs CPU/msg ({:.2}x the floor)",
        quiet / floor
    );
    println!(
        "  ingest                  {full:6.3} µs CPU/msg ({:.2}x the floor)",
        full / floor
    );
    let users = if quick { 20_000 } else { 100_000 };
    let per_user = memory_per_user(users);
    println!(
        "  analytics' memory: {per_user:.0} bytes of heap per tracked user ({users} users of {MESSAGES_PER_USER} commands each); at max_users = 100,000: {:.0} MiB",
        per_user * 100_000.0 / (1024.0 * 1024.0)
    );
}
