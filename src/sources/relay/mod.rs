//! The `relay` source: every practable logging stream of a session host on
//! the one event loop, replacing one Python `websocket-client` process per
//! rig, their `<user>-<hardware>-<exp>-<course>.json` files and the
//! `session-rules` script.
//!
//! # What it does
//! - One websocket client per stream (`ws://host:8888/ws/<stream>`), each a
//!   task ([`stream`]) on a small executor of its own inside the source's
//!   task. A dropped or refused connection is retried forever after a
//!   full-jitter wait ([`link`]); the log says the losses and returns of
//!   one moment in a line each, naming the streams ([`news`]), not a line
//!   per stream. A silent stream is pinged, and one that
//!   answers nothing within `stall_after_secs` is reconnected. Each
//!   stream's state is published for `edgemeter status` within 0.2 s
//!   ([`flush::STATUS_WITHIN`]) of every change. After a large frame the connection is rebuilt on the same
//!   socket to free the grown buffer ([`release`]). A busy stream is read
//!   in bursts: drained, it rests until the next 20 ms tick, the same for
//!   every stream, so that one wake-up reads many messages of all of them
//!   ([`rest`]).
//! - Every frame is split into JSON values without ever failing
//!   ([`frame`]). Frames over `max_frame_bytes` are not parsed; frames over
//!   twice that cannot be read at all (the websocket layer refuses them) and
//!   cost a reconnect. Everything that cannot be parsed is counted and
//!   stored as a `relay_malformed` event with a truncated sample.
//! - Logging envelopes (`{user, t, exp, hardware, course, type, payload}`)
//!   are stored as events (one per message, its exact text), feed the
//!   per-window distinct-user sketches, and the analytics ([`analytics`]):
//!   per user×hardware activity and the command-transition graph per
//!   user×exp×course. A stream's records go to the outbox writer together
//!   ([`crate::runtime::Emitter::emit_all`]) once no next frame is ready
//!   without waiting, or [`stream::HELD_MAX`] (64) are held, and before anything
//!   waits (answers to a slow host, a reconnect): never held across a wait.
//! - At each window end (`window_secs`, aligned to the clock) it emits per
//!   stream `relay_frames`, `relay_messages`, `relay_bytes`,
//!   `relay_malformed`, `relay_zero_width`, `relay_reconnects`,
//!   `relay_stalls`, `relay_connected` and `relay_active_users` (point and
//!   sketch), and `relay_active_users` over all streams (`stream=all`).
//!   At shutdown the running window is emitted first, with the end it would
//!   have had; a restart inside a window therefore gives two points with
//!   one timestamp, which sum (and sketches union) to the right answer.
//!
//! # What survives what
//! - The analytics state is saved to `relay-<name>.db` in the state dir
//!   every 2 s (after a change) and at shutdown, and reloaded at start: a `kill -9`
//!   loses at most the last 2 s of analytics (the events themselves are
//!   in the outbox as soon as the writer commits them). A power cut loses
//!   up to [`store::SYNC_EVERY`] (30 s) more, and the 2 s this task
//!   gathers changes for: saves do not wait for the disk, and the file is
//!   fsynced that long after the first unsynced one and at shutdown, so
//!   the disk sees the outbox's fsync a second and hardly any of this
//!   file's.
//! - Files in `files_dir` are rewritten from that state by one flush at a
//!   time ([`flush()`]), each atomically (temp file, rename; no fsync, see
//!   [`Sync::No`](crate::state_dir::Sync::No)), every `dump_interval_secs`,
//!   on this source's worker thread; all of them at the first dump after a
//!   start, unless the last run stopped having written them all and synced
//!   them with one `syncfs` ([`mark_files_complete`]: the state says so,
//!   and none is missing). A dump spells out and writes
//!   [`flush::DUMP_GRAPHS_PER_JOB`] graphs at a time, so its memory does
//!   not grow with the users. At shutdown they get half the grace
//!   (`Dump::Until`), and a dump in progress stops; that first dump writes
//!   any left. Saves, raw per-user appends and the status file, small and
//!   frequent, go on the agent's IO thread between dumps
//!   ([`crate::sources::Context::io`]), so a streaming relay keeps no
//!   thread of its own busy.
//!   At the first start on an old analytics client's directory, its files
//!   are continued ([`adopt`]), never replaced.
//! - Hub semantics mean a message sent while a stream is down is never
//!   seen: the session host does not buffer or replay. The
//!   `relay_connected` and `relay_reconnects` points say when that was.
//!
//! # Provisioning
//! With a `provision` block, the session host's rules are set from
//! `log.access.<stream>`/`log.token.<stream>` ([`provision`]) at start,
//! checked every `check_interval_secs` and whenever a stream comes back
//! after failing (the host forgets its rules when it restarts).

// The tasks, with their IO (this file starts them and shuts them down):
mod flush; // the state saved, raw lines, status and the files in files_dir
mod stream; // one stream: connect, read frames, answer, reconnect
// What they decide and keep, without IO:
pub mod analytics; // activity and command graphs from the envelopes
pub mod answers; // the dashboards' answers, as the old client computed them
pub mod config; // `[[source]] type = "relay"`, validated
pub mod desk; // requests and feedback with `answer_requests = true`
pub mod envelope; // the logging envelope read from a message
pub mod frame; // a frame split into JSON values, never failing
pub mod ingest; // what a frame means: counters, analytics, records
pub mod link; // a stream's connection state machine
pub mod news; // the streams' losses and returns, a line per moment
pub mod status; // the status file `edgemeter status` reads
// Their helpers at the edges:
pub mod adopt; // an old client's files_dir taken over
pub mod draw; // a command graph as SVG
pub mod provision; // the session host's rules, set through its API
pub mod release; // the memory of a large frame given back
pub mod rest; // a busy stream read in bursts
pub mod store; // the analytics state's SQLite file
pub mod trim; // the raw files kept within their bound

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::now_ms;
use crate::runtime::{Doorbell, LocalBoxFuture, Wakeup, Worker, doorbell};
use crate::sources::{Context, Source};
use crate::state_dir::remove_temp_files;

use adopt::RawMark;
use analytics::Analytics;
pub use config::Config;
use flush::{
    Dump, Files, IDLE_WAIT, files_as_saved, flush, flush_task, mark_files_complete,
    rung_or_shutdown, status_task,
};
use ingest::{Settings, State};
use link::Link;
use store::Store;
use stream::stream_task;

/// Bounds each call to the session host's HTTP API.
const API_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Relay {
    config: Config,
    state_dir: PathBuf,
}

impl Relay {
    pub fn new(config: Config, state_dir: PathBuf) -> Relay {
        Relay { config, state_dir }
    }
}

/// What the tasks of one relay source share (all on one thread).
struct Shared {
    name: String,
    config: Config,
    state: RefCell<State>,
    /// Whether the usage files changed since the last dump (the graphs
    /// that did are kept by the analytics).
    dump_usage: RefCell<bool>,
    /// Rung when a stream comes back after failing: re-check the rules.
    provision_kick: smol::channel::Sender<()>,
    /// Rung on every change, so the flush task sleeps while nothing happens
    /// (an idle source has no timer faster than its window and dump).
    changed: Doorbell,
    /// Rung when a stream's connection state changes: `status` shows it
    /// within [`flush::STATUS_WITHIN`].
    link_changed: Doorbell,
    /// The streams' losses and returns not said in the log yet, and the
    /// bell rung when one is added.
    news: RefCell<news::News>,
    news_added: Doorbell,
}

impl Source for Relay {
    fn run(self: Box<Self>, ctx: Context) -> LocalBoxFuture<'static, ()> {
        Box::pin(run(self.config, self.state_dir, ctx))
    }
}

async fn run(config: Config, state_dir: PathBuf, ctx: Context) {
    let worker = Rc::new(Worker::new(format!("src-{}", ctx.name)));
    let store_path = state_dir.join(format!("relay-{}.db", ctx.name));
    let max_users = config.max_users;
    let opened = worker
        .run(move || {
            let mut store = Store::open(&store_path)?;
            let mut analytics = Analytics::new(max_users);
            let loaded = store.load(&mut analytics)?;
            // Taken at every start: a run without files_dir changes what
            // the files should hold too.
            let complete = store.take_files_complete().unwrap_or_else(|e| {
                log::warn!("{e}; every analytics file is rewritten");
                false
            });
            Ok::<_, String>((store, analytics, loaded, complete))
        })
        .await;
    let now = now_ms();
    let links = config
        .streams
        .iter()
        .map(|s| {
            (
                s.clone(),
                Link::new(config.reconnect_initial, config.reconnect_max, now),
            )
        })
        .collect();
    let mut state = State::new(
        Settings {
            source: ctx.name.clone(),
            max_frame_bytes: config.max_frame_bytes,
            events: config.events,
            raw_files: config.raw_files,
            max_users: config.max_users,
        },
        links,
    );
    let mut files_complete = false;
    let mut graphs_loaded = 0;
    let store = match opened {
        Ok((store, analytics, loaded, complete)) => {
            (files_complete, graphs_loaded) = (complete, loaded.graphs);
            log::info!(
                "source `{}`: {} streams on {}; analytics state: {} user×hardware rows, {} graphs",
                ctx.name,
                config.streams.len(),
                config.api_base(),
                loaded.activity,
                loaded.graphs
            );
            state.analytics = analytics;
            Some(Arc::new(Mutex::new(store)))
        }
        Err(e) => {
            log::error!(
                "source `{}`: {e}; the analytics will be kept in memory only until restart",
                ctx.name
            );
            None
        }
    };
    let mut raw_read = Vec::new();
    // usage.csv and activity.csv: written by the first dump unless the last
    // run left every file as the state holds it.
    let mut usage_due = true;
    if let Some(files_dir) = &config.files_dir {
        let dir = files_dir.clone();
        let known = state.analytics.known_graphs();
        let marks = store.clone();
        let (removed, found) = worker
            .run(move || {
                let removed = remove_temp_files(&dir);
                let Some(marks) = marks else {
                    return (removed, adopt::scan(&dir, |k| known.contains(k), |_| false));
                };
                let mut marks = marks.lock().unwrap_or_else(|p| p.into_inner());
                let found = adopt::scan(&dir, |k| known.contains(k), |m| marks.raw_unchanged(m));
                if let Ok(f) = &found {
                    let present = f.unchanged + f.read.len();
                    if let Err(e) = marks.forget_gone_raw(present, |n| dir.join(n).exists()) {
                        log::warn!("{e}");
                    }
                }
                (removed, found)
            })
            .await;
        if removed > 0 {
            log::info!(
                "source `{}`: removed {removed} temp files an earlier run left unfinished",
                ctx.name
            );
        }
        match found {
            Ok(found) => {
                let name = &ctx.name;
                if files_as_saved(name, files_dir, files_complete, graphs_loaded, &found.own) {
                    state.analytics.all_dumped();
                    usage_due = false;
                }
                raw_read = adopt_files(&ctx.name, &config, &mut state, found)
            }
            Err(e) => {
                log::error!(
                    "source `{}`: {e}. The source does not start, so nothing in files_dir is overwritten",
                    ctx.name
                );
                return;
            }
        }
    }
    if let Some(dir) = config.answer_from.clone() {
        state.desk = Some(open_desk(&ctx.name, &config, dir, &worker, store.clone()).await);
    }
    let (kick_tx, kick_rx) = smol::channel::bounded(1);
    let (changed, wakeup) = doorbell();
    let (link_changed, link_wakeup) = doorbell();
    let (news_added, news_wakeup) = doorbell();
    let shared = Rc::new(Shared {
        name: ctx.name.clone(),
        config,
        state: RefCell::new(state),
        dump_usage: RefCell::new(usage_due),
        provision_kick: kick_tx,
        changed,
        link_changed,
        news: RefCell::default(),
        news_added,
    });
    let ctx = Rc::new(ctx);
    let status_path = crate::sources::status_path(&state_dir, &ctx.name);
    let files = Files::new(store, raw_read, status_path);
    let files = Rc::new(RefCell::new(files));

    let ex = smol::LocalExecutor::new();
    for i in 0..shared.config.streams.len() {
        ex.spawn(stream_task(i, shared.clone(), ctx.clone()))
            .detach();
    }
    ex.spawn(window_task(shared.clone(), ctx.clone())).detach();
    ex.spawn(news_task(shared.clone(), ctx.clone(), news_wakeup))
        .detach();
    ex.spawn(flush_task(
        shared.clone(),
        ctx.clone(),
        worker.clone(),
        files.clone(),
        wakeup,
    ))
    .detach();
    ex.spawn(status_task(
        shared.clone(),
        ctx.clone(),
        ctx.io.clone(),
        files.clone(),
        link_wakeup,
    ))
    .detach();
    if let Some(p) = shared.config.provision.clone() {
        ex.spawn(provision_task(shared.clone(), ctx.clone(), p, kick_rx))
            .detach();
    }
    ex.run(ctx.shutdown.wait()).await;
    drop(ex);
    say_news(&shared, None);

    // Shutdown, in the order the sinks need: the running window's points
    // and sketches first, then the analytics state and files (on our own
    // worker, off the event loop; no fsync per file: `state_dir::Sync::No`).
    let mut out = Vec::new();
    let end = window_end(now_ms(), shared.config.window);
    shared
        .state
        .borrow_mut()
        .close_window(end, shared.config.window.as_secs(), &mut out);
    if !ctx.emit.emit_all(&mut out).await {
        log::warn!(
            "source `{}`: the outbox writer had stopped; the last window's points are lost",
            ctx.name
        );
    }
    {
        let mut state = shared.state.borrow_mut();
        let now = now_ms();
        for s in &mut state.streams {
            s.link.stopped(now);
        }
    }
    // Files only within half the grace: a directory of thousands of users
    // takes seconds on a slow disk (0.7 ms a file here), and they can wait
    // for the next start, which rewrites them all from the state saved
    // first (the old client's files are a view of it, not the record).
    let until = Instant::now() + ctx.grace / 2;
    flush(&shared, &worker, &ctx, &files, Dump::Until(until)).await;
    mark_files_complete(&shared, &worker, &files, until).await;
}

/// The answering desk: the comparison graphs, the feedback saved, and the
/// old client's feedback files in `files_dir` for users not saved.
async fn open_desk(
    name: &str,
    config: &Config,
    comparison_dir: PathBuf,
    worker: &Worker,
    store: Option<Arc<Mutex<Store>>>,
) -> desk::Desk {
    let files_dir = config.files_dir.clone();
    let (comparisons, saved, adopted, problems) = worker
        .run(move || {
            let mut problems = Vec::new();
            let comparisons = match answers::Comparisons::load(&comparison_dir) {
                Ok((c, p)) => {
                    problems.extend(p);
                    c
                }
                Err(e) => {
                    problems.push(e);
                    answers::Comparisons::default()
                }
            };
            let saved = match &store {
                Some(s) => s
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .load_feedback()
                    .unwrap_or_else(|e| {
                        problems.push(e);
                        Default::default()
                    }),
                None => Default::default(),
            };
            let known = saved.keys().cloned().collect();
            let adopted = match &files_dir {
                Some(d) => {
                    let (found, p) = adopt::scan_feedback(d, &known);
                    problems.extend(p);
                    found
                }
                None => Vec::new(),
            };
            (comparisons, saved, adopted, problems)
        })
        .await;
    for p in &problems {
        log::warn!("source `{name}`: {p}; requests that need it are not answered");
    }
    log::info!(
        "source `{name}`: answering the dashboards' requests from {} comparison graphs; feedback of {} users kept",
        comparisons.graphs.len(),
        saved.len()
    );
    let mut desk = desk::Desk::new(comparisons, saved, config.streams.len(), config.max_users);
    let n = adopted.len();
    let taken = adopted
        .into_iter()
        .filter(|(k, f)| desk.adopt_feedback(k.clone(), f.clone()))
        .count();
    if n > 0 {
        log::info!(
            "source `{name}`: continuing {taken} of {n} feedback files found in files_dir; new feedback is added to them"
        );
    }
    desk
}

/// Continue the old analytics client's history found in `files_dir`; the
/// raw files read, to be marked once what they gave is saved. None if a
/// graph was not taken (past `max_users`): its files are read again at the
/// next start, which may have room.
fn adopt_files(
    name: &str,
    config: &Config,
    state: &mut State,
    found: adopt::Found,
) -> Vec<RawMark> {
    let dir = config.files_dir.as_deref().unwrap_or(Path::new("."));
    if found.unchanged > 0 || !found.read.is_empty() {
        log::info!(
            "source `{name}`: raw message files in {}: {} read, {} not read again (unchanged since edgemeter last wrote or read them)",
            dir.display(),
            found.read.len(),
            found.unchanged
        );
    }
    if found.graphs.is_empty() {
        return found.read;
    }
    let (mut graphs, mut transitions) = (0, 0u64);
    for (key, (matrix, commands)) in &found.graphs {
        if state.analytics.adopt(key, matrix.as_ref(), commands) {
            graphs += 1;
            transitions += state
                .analytics
                .graph(key)
                .map_or(0, |g| g.edges.values().sum());
        }
    }
    log::info!(
        "source `{name}`: continuing the analytics files found in {}: {graphs} user graphs ({transitions} transitions) from {} adjacency matrices and {} raw message files; new commands are added to them, nothing is replaced",
        dir.display(),
        found.matrices,
        found.raw_files
    );
    if graphs < found.graphs.len() {
        log::warn!(
            "source `{name}`: {} graphs in {} were not taken: past max_users = {}",
            found.graphs.len() - graphs,
            dir.display(),
            config.max_users
        );
        return Vec::new();
    }
    found.read
}

/// The end of the window that contains `now`, ms.
fn window_end(now: i64, window: Duration) -> i64 {
    let w = window.as_millis() as i64;
    (now.div_euclid(w) + 1) * w
}

/// A window's timer that fires this far from the window's end on the wall
/// clock saw the clock set while it ran (NTP setting a Raspberry Pi's
/// clock after boot, an operator, a suspend), not a late timer.
const CLOCK_STEP_MS: i64 = 2_000;

/// What to do when the timer of the window ending at `end` fires at `now`
/// (the wall clock, ms).
#[derive(Debug, PartialEq)]
enum Wake {
    /// Close the window, stamped `end`.
    Close,
    /// The clock was set by `by` ms while the window ran: it runs on to
    /// the end of the window `now` is in, `until`, and is stamped with
    /// that. Nothing it counted is then stamped with the clock from
    /// before (the wrong one, when NTP set it), and no window closes
    /// hours long or twice at one time.
    Stepped { by: i64, until: i64 },
}

fn on_wake(end: i64, now: i64, window: Duration) -> Wake {
    let by = now - end;
    if by.abs() <= CLOCK_STEP_MS {
        Wake::Close
    } else {
        Wake::Stepped {
            by,
            until: window_end(now, window),
        }
    }
}

// ---------------------------------------------------------------- windows

/// Say the streams' losses and returns ([`news`]) when they are due.
async fn news_task(shared: Rc<Shared>, ctx: Rc<crate::sources::Context>, wakeup: Wakeup) {
    loop {
        let due = shared.news.borrow().due();
        let now = Instant::now();
        let stop = match due {
            Some(due) if due <= now => {
                say_news(&shared, Some(now));
                false
            }
            Some(due) => ctx.shutdown.sleep(due - now).await,
            None => rung_or_shutdown(&ctx, &wakeup, IDLE_WAIT).await,
        };
        if stop {
            // The source says what is left as it stops.
            return;
        }
    }
}

/// Say the lines of news due at `now` (None: all of them).
fn say_news(shared: &Shared, now: Option<Instant>) {
    let lines = shared
        .news
        .borrow_mut()
        .lines(&shared.name, shared.config.streams.len(), now);
    for (level, line) in lines {
        log::log!(level, "{line}");
    }
}

async fn window_task(shared: Rc<Shared>, ctx: Rc<crate::sources::Context>) {
    let mut out = Vec::new();
    let window = shared.config.window;
    let mut end = window_end(now_ms(), window);
    loop {
        // The source's final steps emit the running window at shutdown.
        let wait = (end - now_ms()).max(0) as u64;
        if ctx.shutdown.sleep(Duration::from_millis(wait)).await {
            return;
        }
        let now = now_ms();
        if let Wake::Stepped { by, until } = on_wake(end, now, window) {
            log::warn!(
                "source `{}`: the clock was set {} by {} while a window ran; that window runs on to {} on the clock as it is now, and is stamped with that",
                ctx.name,
                if by > 0 { "forward" } else { "back" },
                crate::clock::rounded_duration(by.abs()),
                crate::clock::iso8601(until)
            );
            end = until;
            continue;
        }
        shared
            .state
            .borrow_mut()
            .close_window(end, window.as_secs(), &mut out);
        if !ctx.emit.emit_all(&mut out).await {
            return;
        }
        end = window_end(now.max(end), window);
    }
}

// ---------------------------------------------------------------- provisioning

async fn provision_task(
    shared: Rc<Shared>,
    ctx: Rc<crate::sources::Context>,
    p: config::Provision,
    kick: smol::channel::Receiver<()>,
) {
    let worker = Worker::new(format!("prov-{}", ctx.name));
    let api = Arc::new(provision::Api::new(&shared.config.api_base(), API_TIMEOUT));
    let streams = shared.config.streams.clone();
    let mut first = true;
    let mut failing: Option<String> = None;
    let mut warned_others = false;
    let mut skipped_before: Vec<String> = Vec::new();
    loop {
        let (dir, api2, streams2) = (p.dir.clone(), api.clone(), streams.clone());
        let (skipped, result) = worker
            .run(move || {
                let read = provision::read_rules(&dir, &streams2);
                (read.skipped, api2.reconcile(&read.rules))
            })
            .await;
        if skipped != skipped_before {
            for why in &skipped {
                log::warn!(
                    "source `{}`: no session host rule for stream {why}; the other streams go ahead, and this one is tried again in {} s",
                    ctx.name,
                    p.check_interval.as_secs()
                );
            }
            skipped_before = skipped;
        }
        match result {
            Ok(r) => {
                if failing.take().is_some() || first || !r.posted.is_empty() {
                    let posted = provision::rules(r.posted.len());
                    if first {
                        log::info!(
                            "source `{}`: session host rules: {posted} set, {} already in place",
                            ctx.name,
                            r.unchanged
                        );
                    } else {
                        log::info!(
                            "source `{}`: session host rules: {posted} set again (the host had lost or changed them; restarted?), {} already in place",
                            ctx.name,
                            r.unchanged
                        );
                    }
                }
                if !r.others.is_empty() && !warned_others {
                    let list: Vec<String> = r
                        .others
                        .iter()
                        .map(|(id, s)| format!("`{id}` ({s})"))
                        .collect();
                    log::warn!(
                        "source `{}`: the session host also has rules {} for our streams; their messages arrive twice. Delete them with DELETE /api/destinations/<id>",
                        ctx.name,
                        list.join(", ")
                    );
                    warned_others = true;
                }
                first = false;
            }
            Err(e) => {
                if failing.as_deref() != Some(e.as_str()) {
                    log::warn!(
                        "source `{}`: cannot set the session host's rules: {e}; trying again in {} s",
                        ctx.name,
                        p.check_interval.as_secs()
                    );
                    failing = Some(e);
                }
            }
        }
        let woken = smol::future::or(
            async {
                let _ = kick.recv().await;
                true
            },
            async {
                smol::Timer::after(p.check_interval).await;
                false
            },
        );
        let stop = smol::future::or(
            async {
                ctx.shutdown.wait().await;
                true
            },
            async {
                woken.await;
                false
            },
        )
        .await;
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
