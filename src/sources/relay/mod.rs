//! The `relay` source: every practable logging stream of a session host on
//! the one event loop, replacing one Python `websocket-client` process per
//! rig, their `<user>-<hardware>-<exp>-<course>.json` files and the
//! `session-rules` script.
//!
//! # What it does
//! - One websocket client per stream (`ws://host:8888/ws/<stream>`), each a
//!   task on a small executor of its own inside the source's task. A
//!   dropped or refused connection is retried forever after a full-jitter
//!   wait ([`link`]); a silent stream is pinged, and one that answers
//!   nothing within `stall_after_secs` is reconnected. Each stream's state
//!   is published for `edgemeter status` within 0.2 s (`STATUS_WITHIN`) of every
//!   change. After a large frame the connection is rebuilt on the same
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
//!   without waiting, or `HELD_MAX` (64) are held, and before anything
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
//!   time, each atomically (temp file, rename; no fsync, see [`Sync::No`]),
//!   every `dump_interval_secs`, on this source's worker thread; all of them
//!   at the first dump after a start, unless the last run stopped having
//!   written them all and synced them with one `syncfs`
//!   ([`mark_files_complete`]: the state says so, and none is missing). A
//!   dump spells out and writes
//!   [`DUMP_GRAPHS_PER_JOB`] graphs at a time, so its memory does not grow
//!   with the users. At shutdown they get half the grace
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

pub mod adopt;
pub mod analytics;
pub mod answers;
pub mod config;
pub mod desk;
pub mod draw;
pub mod frame;
pub mod ingest;
pub mod link;
pub mod provision;
pub mod release;
pub mod rest;
pub mod status;
pub mod store;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message;
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use smol::Async;
use smol::stream::StreamExt;

use crate::clock::now_ms;
use crate::logging::{Say, Spell, again};
use crate::record::Record;
use crate::runtime::{Doorbell, LocalBoxFuture, Wakeup, Worker, doorbell};
use crate::sources::{Context, Source};
use crate::state_dir::{Sync, remove_temp_files, replace_file, replace_file_with};

use adopt::RawMark;
use analytics::{Analytics, GraphKey};
pub use config::Config;
use ingest::{Frame, Settings, State};
use link::{Link, LinkError};
use store::{Appended, Store};

/// How often analytics state, raw lines and the status file are written.
const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Graphs a dump spells out and writes in one job on the worker, before
/// it spells the next ones: about 5 KiB of text and structure each while
/// they wait to be written. Every graph at once took a restart with 20,000
/// users' saved state from 27 to 126 MiB resident; 500 take about 2.5 MiB
/// and about half a second of a dump's writing here (0.7 ms a file).
const DUMP_GRAPHS_PER_JOB: usize = 500;
/// A stream's new connection state is in the status file this soon (the
/// changes of many streams at once are written together).
const STATUS_WITHIN: Duration = Duration::from_millis(200);
/// How long the flush task sleeps when nothing changes and no dump is due.
const IDLE_WAIT: Duration = Duration::from_secs(86_400);
/// Bounds connecting and the websocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds each call to the session host's HTTP API.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Read in small chunks: 86 idle streams must not hold 128 KiB each.
const READ_CHUNK_BYTES: usize = 4096;
/// At most this many records of a stream's frames wait to be handed to
/// the outbox writer together (a 4 KiB read brings about 17 messages).
const HELD_MAX: usize = 64;

pub struct Relay {
    config: Config,
    state_dir: PathBuf,
}

impl Relay {
    pub fn new(config: Config, state_dir: PathBuf) -> Relay {
        Relay { config, state_dir }
    }
}

type Ws = WebSocketStream<release::Counted<rest::Resting>>;

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
    /// within [`STATUS_WITHIN`].
    link_changed: Doorbell,
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
    let shared = Rc::new(Shared {
        name: ctx.name.clone(),
        config,
        state: RefCell::new(state),
        dump_usage: RefCell::new(usage_due),
        provision_kick: kick_tx,
        changed,
        link_changed,
    });
    let ctx = Rc::new(ctx);
    let files = Files {
        store,
        raw_read,
        unwritten: false,
        flush_spell: Spell::default(),
        status_spell: Spell::default(),
        sync_due: None,
        status_path: crate::sources::status_path(&state_dir, &ctx.name),
        last_status: String::new(),
    };
    let files = Rc::new(RefCell::new(files));

    let ex = smol::LocalExecutor::new();
    for i in 0..shared.config.streams.len() {
        ex.spawn(stream_task(i, shared.clone(), ctx.clone()))
            .detach();
    }
    ex.spawn(window_task(shared.clone(), ctx.clone())).detach();
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

    // Shutdown, in the order the sinks need: the running window's points
    // and sketches first, then the analytics state and files (on our own
    // worker, off the event loop; no fsync per file, see [`Sync::No`]).
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

/// After the shutdown's flush: if this run wrote every analytics file it
/// had to, without an error, sync them (one `syncfs`) and say so in the
/// state, so the next start does not rewrite them all (two files a graph:
/// 200,000 at 100,000 users). Within the files' half of the grace; past
/// it, the next start rewrites them. Whether the state says so now.
async fn mark_files_complete(
    shared: &Shared,
    worker: &Worker,
    files: &RefCell<Files>,
    until: Instant,
) -> bool {
    let (Some(dir), Some(store)) = (
        shared.config.files_dir.clone(),
        files.borrow().store.clone(),
    ) else {
        return false;
    };
    if files.borrow().unwritten
        || shared.state.borrow().analytics.has_undumped()
        || *shared.dump_usage.borrow()
    {
        return false;
    }
    use std::sync::atomic::{AtomicU8, Ordering::SeqCst};
    // Which comes first, the mark or the end of the grace, is decided once:
    // a job that goes on after the grace never marks, so the log is right.
    const WAITING: u8 = 0;
    const MARKING: u8 = 1;
    const LATE: u8 = 2;
    let turn = Arc::new(AtomicU8::new(WAITING));
    let late = || "the grace for files was over before they were synced".to_owned();
    let shown = dir.display().to_string();
    let job_turn = turn.clone();
    let mut job = std::pin::pin!(worker.run(move || {
        crate::state_dir::sync_filesystem(&dir)
            .map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
        if job_turn
            .compare_exchange(WAITING, MARKING, SeqCst, SeqCst)
            .is_err()
        {
            return Err(late());
        }
        store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_files_complete()
    }));
    let in_time = smol::future::or(async { Some(job.as_mut().await) }, async {
        smol::Timer::at(until).await;
        None
    })
    .await;
    let outcome = match in_time {
        Some(r) => r,
        None if turn.compare_exchange(WAITING, LATE, SeqCst, SeqCst).is_ok() => Err(late()),
        // Marking already: one commit, waited for.
        None => job.await,
    };
    match &outcome {
        Ok(()) => log::info!(
            "source `{}`: every analytics file in {shown} is written and synced; the next start does not rewrite them",
            shared.name
        ),
        Err(e) => log::warn!(
            "source `{}`: {e}; the next start rewrites every analytics file in {shown}",
            shared.name
        ),
    }
    outcome.is_ok()
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

/// Whether the analytics files in `dir` are as the saved state holds them,
/// so that the first dump need not rewrite them all: the last run said so
/// (`marked`, [`mark_files_complete`]) and none of the `graphs`' files is
/// missing. Said in the log either way.
fn files_as_saved(
    name: &str,
    dir: &Path,
    marked: bool,
    graphs: usize,
    own: &adopt::OwnFiles,
) -> bool {
    let all_there = own.matrices == graphs && own.graphs == graphs && own.summaries == 2;
    let why = match (marked, all_there) {
        (true, true) => None,
        (false, _) => Some("the last run did not write them all and sync them"),
        (true, false) => Some("some are missing"),
    };
    match why {
        _ if graphs == 0 && own.summaries == 0 => {}
        None => log::info!(
            "source `{name}`: the analytics files of {graphs} graphs in {} are as the last run wrote them; not rewritten",
            dir.display()
        ),
        Some(why) => log::info!(
            "source `{name}`: the first dump rewrites the analytics files of all {graphs} graphs in {} from the saved state: {why}",
            dir.display()
        ),
    }
    why.is_none()
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

// ---------------------------------------------------------------- streams

async fn stream_task(i: usize, shared: Rc<Shared>, ctx: Rc<crate::sources::Context>) {
    let stream = shared.config.streams[i].clone();
    let url = format!(
        "ws://{}/ws/{stream}",
        shared.config.api_base().trim_start_matches("http://")
    );
    let mut failing = false;
    let mut out: Vec<Record> = Vec::new();
    loop {
        shared.state.borrow_mut().streams[i]
            .link
            .connecting(now_ms());
        shared.link_changed.ring();
        let attempt =
            smol::future::or(async { Some(connect(&shared.config, &url).await) }, async {
                ctx.shutdown.wait().await;
                None
            })
            .await;
        let error = match attempt {
            None => return,
            Some(Err(e)) => e,
            Some(Ok(ws)) => {
                shared.state.borrow_mut().streams[i]
                    .link
                    .connected(now_ms());
                shared.link_changed.ring();
                if failing {
                    log::info!("source `{}`: stream {stream} is connected again", ctx.name);
                    let _ = shared.provision_kick.try_send(());
                } else {
                    log::debug!("source `{}`: stream {stream} connected", ctx.name);
                }
                failing = false;
                let ended = read_frames(i, &shared, &ctx, ws, &mut out).await;
                // What the last read's frames gave (a dropped link's last
                // frames, an oversized frame's mark) before anything waits.
                ctx.emit.emit_all(&mut out).await;
                match ended {
                    Ended::Shutdown(mut ws) => {
                        // Shutdown: say goodbye, briefly.
                        let _ = smol::future::or(
                            async { ws.close(None).await.map_err(|_| ()) },
                            async {
                                smol::Timer::after(Duration::from_millis(200)).await;
                                Err(())
                            },
                        )
                        .await;
                        return;
                    }
                    Ended::Dropped(e) => e,
                }
            }
        };
        let wait = shared.state.borrow_mut().streams[i].link.dropped(
            now_ms(),
            error.to_string(),
            fastrand::f64(),
        );
        shared.link_changed.ring();
        if !failing {
            log::warn!(
                "source `{}`: stream {stream}: {error}; reconnecting in {:.1} s, and on with backoff",
                ctx.name,
                wait.as_secs_f64()
            );
            failing = true;
        } else {
            log::debug!(
                "source `{}`: stream {stream}: {error}; next attempt in {:.1} s",
                ctx.name,
                wait.as_secs_f64()
            );
        }
        if ctx.shutdown.sleep(wait).await {
            return;
        }
    }
}

/// Connect and shake hands, within [`CONNECT_TIMEOUT`].
async fn connect(config: &Config, url: &str) -> Result<Ws, LinkError> {
    let work = async {
        // Each address in turn (`localhost` may be ::1 first while the
        // session host listens on 127.0.0.1 only).
        let mut tcp = Err(LinkError::Resolve {
            host: config.host.clone(),
            error: "no address".into(),
        });
        for addr in resolve(&config.host, config.port).await? {
            tcp = Async::<std::net::TcpStream>::connect(addr)
                .await
                .map_err(|e| LinkError::Connect {
                    addr: addr.to_string(),
                    error: e.to_string(),
                });
            if tcp.is_ok() {
                break;
            }
        }
        let tcp = tcp?;
        let limit = config.max_frame_bytes.saturating_mul(2);
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(READ_CHUNK_BYTES)
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let tcp = release::Counted::new(rest::Resting::new(tcp, rest::READ_REST));
        let (ws, _) = async_tungstenite::client_async_with_config(url, tcp, Some(ws_config))
            .await
            .map_err(|e| LinkError::Handshake {
                url: url.to_owned(),
                error: e.to_string(),
            })?;
        let mut ws = ws;
        ws.get_mut().handshake_done();
        Ok(ws)
    };
    smol::future::or(work, async {
        smol::Timer::after(CONNECT_TIMEOUT).await;
        Err(LinkError::Timeout {
            url: url.to_owned(),
            after: CONNECT_TIMEOUT,
        })
    })
    .await
}

/// An IP address needs no lookup; a name is resolved off the loop (a
/// lookup can block for seconds).
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, LinkError> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let name = host.to_owned();
    // One lookup thread for all streams (86 of them knock at once after a
    // session host restart), gone when idle.
    static RESOLVER: std::sync::OnceLock<Worker> = std::sync::OnceLock::new();
    RESOLVER
        .get_or_init(|| Worker::new("resolve"))
        .run(move || {
            let addrs: Vec<SocketAddr> = (name.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| LinkError::Resolve {
                    host: name.clone(),
                    error: e.to_string(),
                })?
                .collect();
            if addrs.is_empty() {
                return Err(LinkError::Resolve {
                    host: name,
                    error: "no address".into(),
                });
            }
            Ok(addrs)
        })
        .await
}

/// How a connection's read loop ended.
enum Ended {
    /// Shutdown: the connection is still open, to be closed politely.
    Shutdown(Box<Ws>),
    Dropped(LinkError),
}

/// What woke the read loop.
enum Woke {
    Frame(Option<Result<Message, async_tungstenite::tungstenite::Error>>),
    Silence,
    Shutdown,
}

/// Read until the connection ends or shutdown. A stream silent for
/// `ping_interval` is pinged; one from which nothing arrives for
/// `stall_after` is declared hung and closed. After a large frame the
/// connection is rebuilt with fresh buffers ([`release`]).
async fn read_frames(
    i: usize,
    shared: &Shared,
    ctx: &crate::sources::Context,
    mut ws: Ws,
    out: &mut Vec<Record>,
) -> Ended {
    use async_tungstenite::tungstenite::Error;
    use async_tungstenite::tungstenite::protocol::Role;
    let mut ledger = release::Ledger::default();
    let (ping_interval, stall_after) = (shared.config.ping_interval, shared.config.stall_after);
    let mut heard = std::time::Instant::now();
    let mut pinged = false;
    // One timer, re-armed when it fires rather than per frame: a busy
    // stream costs one reactor timer per ping interval, not per message.
    let mut timer = smol::Timer::at(heard + ping_interval);
    // A large frame was read and its grown buffer is not given back yet.
    let mut grown = false;
    loop {
        if grown && ledger.drained(ws.get_ref().read_bytes()) {
            // Nothing of a next frame is buffered: the same socket with
            // fresh buffers, the grown one freed. Checked after every frame,
            // control frames too: the frame after a large one (a ping, say)
            // can arrive in the read that finished it, and then the moment
            // with nothing buffered comes only after that one.
            let config = *ws.get_config();
            let mut tcp = ws.into_inner();
            tcp.reset();
            ws = WebSocketStream::from_raw_socket(tcp, Role::Client, Some(config)).await;
            ledger = release::Ledger::default();
            grown = false;
        }
        let read = ws.get_ref().read_bytes();
        let woke = {
            let mut next = std::pin::pin!(ws.next());
            // The records of a read's frames go to the writer together
            // (see `Emitter::emit_all`), once no next frame is ready without
            // waiting, or [`HELD_MAX`] are held: a stream whose socket never
            // runs dry must not hold them long. With bytes buffered the next
            // frame is usually whole, and taken without a system call; with
            // none, asking would cost one.
            let buffered = !out.is_empty() && out.len() < HELD_MAX && !ledger.drained(read);
            let ready = if buffered {
                smol::future::poll_once(&mut next).await
            } else {
                None
            };
            match ready {
                Some(frame) => Woke::Frame(frame),
                None if !ctx.emit.emit_all(out).await => Woke::Shutdown,
                None => {
                    smol::future::or(
                        async { Woke::Frame(next.await) },
                        smol::future::or(
                            async {
                                ctx.shutdown.wait().await;
                                Woke::Shutdown
                            },
                            async {
                                (&mut timer).await;
                                Woke::Silence
                            },
                        ),
                    )
                    .await
                }
            }
        };
        let next = match woke {
            Woke::Shutdown => return Ended::Shutdown(Box::new(ws)),
            Woke::Silence => {
                let due = if pinged { stall_after } else { ping_interval };
                if heard.elapsed() < due {
                    // Heard from since the timer was set.
                    timer.set_at(heard + due);
                    continue;
                }
                if pinged {
                    shared.state.borrow_mut().streams[i].link.stalled(now_ms());
                    shared.link_changed.ring();
                    return Ended::Dropped(LinkError::Stalled { after: stall_after });
                }
                pinged = true;
                timer.set_at(heard + stall_after);
                // Bounded: a host that does not read must not hold us here.
                let sent = smol::future::or(
                    async { ws.send(Message::Ping(Default::default())).await.is_ok() },
                    async {
                        smol::Timer::at(heard + stall_after).await;
                        true
                    },
                )
                .await;
                if !sent {
                    return Ended::Dropped(LinkError::Lost("cannot send a ping".to_owned()));
                }
                continue;
            }
            Woke::Frame(next) => next,
        };
        // When the read that brought this frame was: one clock read for
        // the frames of a read.
        let now;
        (heard, now) = ws.get_ref().read_at();
        if pinged {
            pinged = false;
            timer.set_at(heard + ping_interval);
        }
        let len = match &next {
            Some(Ok(m)) => m.len(),
            _ => 0,
        };
        ledger.frame(len);
        grown |= len >= release::RELEASE_ABOVE_BYTES;
        match next {
            Some(Ok(Message::Text(t))) => {
                let mut state = shared.state.borrow_mut();
                state.streams[i].link.carried();
                state.frame(i, Frame::Text(t.as_str()), now, out)
            }
            Some(Ok(Message::Binary(b))) => {
                let mut state = shared.state.borrow_mut();
                state.streams[i].link.carried();
                state.frame(i, Frame::Binary(&b), now, out)
            }
            Some(Ok(Message::Close(c))) => {
                return Ended::Dropped(LinkError::Closed {
                    code: c.map(|c| format!("{} {}", c.code, c.reason)),
                });
            }
            Some(Ok(_)) => continue, // ping, pong: answered by the websocket layer
            Some(Err(Error::Capacity(e))) => {
                shared
                    .state
                    .borrow_mut()
                    .unreadable(i, now, &e.to_string(), out);
                return Ended::Dropped(LinkError::Oversized(e.to_string()));
            }
            Some(Err(e)) => return Ended::Dropped(LinkError::Lost(e.to_string())),
            None => return Ended::Dropped(LinkError::Lost("closed".to_owned())),
        }
        let answers = shared
            .state
            .borrow_mut()
            .desk
            .as_mut()
            .filter(|d| d.has_outgoing(i))
            .map(|d| d.take_outgoing(i));
        if let Some(frames) = answers {
            // Records are not held while a slow host takes its answers.
            if !ctx.emit.emit_all(out).await {
                return Ended::Shutdown(Box::new(ws));
            }
            if let Err(e) = send_answers(shared, &mut ws, frames).await {
                return Ended::Dropped(e);
            }
        }
        shared.changed.ring();
    }
}

/// How long answers to one frame's requests may take to send: a host that
/// does not read must not hold the stream's reading for long.
const ANSWER_SEND_WITHIN: Duration = Duration::from_secs(2);

/// Send the dashboards' answers on the stream they asked on. A host that
/// does not take them within [`ANSWER_SEND_WITHIN`] is counted, not waited
/// for (what was handed to the websocket goes out with its next write).
async fn send_answers(
    shared: &Shared,
    ws: &mut Ws,
    frames: std::collections::VecDeque<String>,
) -> Result<(), LinkError> {
    let n = frames.len() as u64;
    let mut sending = std::pin::pin!(write_answers(ws, frames));
    // Nearly always the socket takes them at once, and then no timer is
    // set (each one is a registration with the reactor).
    let sent = match smol::future::poll_once(&mut sending).await {
        Some(done) => Some(done),
        None => {
            smol::future::or(async { Some(sending.await) }, async {
                smol::Timer::after(ANSWER_SEND_WITHIN).await;
                None
            })
            .await
        }
    };
    match sent {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(LinkError::Lost(format!("cannot send an answer: {e}"))),
        None => {
            if let Some(d) = shared.state.borrow_mut().desk.as_mut() {
                d.counts.frames_unsent += n;
            }
            Ok(())
        }
    }
}

/// Hand every answer frame to the websocket, then flush once: one write to
/// the socket for all of them when it takes them. `send` flushes each
/// frame, and an answer is five (`all_feedback`); on loopback, each write
/// also costs the receiving side's TCP work on this thread.
async fn write_answers<S: smol::io::AsyncRead + smol::io::AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    frames: std::collections::VecDeque<String>,
) -> Result<(), async_tungstenite::tungstenite::Error> {
    use futures_util::SinkExt;
    for f in frames {
        SinkExt::feed(ws, Message::Text(f.into())).await?;
    }
    SinkExt::flush(ws).await
}

// ---------------------------------------------------------------- windows

async fn window_task(shared: Rc<Shared>, ctx: Rc<crate::sources::Context>) {
    let mut out = Vec::new();
    loop {
        let now = now_ms();
        let end = window_end(now, shared.config.window);
        // The source's final steps emit the running window at shutdown.
        if ctx
            .shutdown
            .sleep(Duration::from_millis((end - now) as u64))
            .await
        {
            return;
        }
        shared
            .state
            .borrow_mut()
            .close_window(end, shared.config.window.as_secs(), &mut out);
        if !ctx.emit.emit_all(&mut out).await {
            return;
        }
    }
}

// ---------------------------------------------------------------- files

struct Files {
    store: Option<Arc<Mutex<Store>>>,
    /// The raw files the start's scan read, marked by the first save (which
    /// holds what they gave): never before, or a crash between would
    /// leave them unread and their users lost.
    raw_read: Vec<RawMark>,
    /// Some flush of this run failed or left files: they are not all as
    /// the state holds them ([`mark_files_complete`]).
    unwritten: bool,
    /// Failing flushes and status writes (a full disk fails one every
    /// 2 s) are said once a spell, not once each.
    flush_spell: Spell,
    status_spell: Spell,
    /// When the store's saves not yet synced are due to be
    /// ([`Store::sync_due`]): the flush task wakes for it.
    sync_due: Option<Instant>,
    status_path: PathBuf,
    last_status: String,
}

/// Wait for a ring on `wakeup`, at most `timeout`; true if the source is
/// shutting down instead.
async fn rung_or_shutdown(
    ctx: &crate::sources::Context,
    wakeup: &Wakeup,
    timeout: Duration,
) -> bool {
    smol::future::or(
        async {
            ctx.shutdown.wait().await;
            true
        },
        async {
            wakeup.wait(timeout).await;
            false
        },
    )
    .await
}

/// Publish connection changes promptly: an idle logging stream may see no
/// frame for hours, and `status` must not show it "backing off" meanwhile.
async fn status_task(
    shared: Rc<Shared>,
    ctx: Rc<crate::sources::Context>,
    worker: Rc<Worker>,
    files: Rc<RefCell<Files>>,
    wakeup: Wakeup,
) {
    // On the agent's IO thread, not a thread of its own: a commit in
    // progress delays a status change by that much.
    loop {
        let stop = rung_or_shutdown(&ctx, &wakeup, IDLE_WAIT).await;
        if stop || ctx.shutdown.sleep(STATUS_WITHIN / 2).await {
            return;
        }
        let status = status::document(&shared.state.borrow());
        publish_status(&worker, &files, status).await;
    }
}

/// Write the status file if it changed (no fsync: it is rewritten from
/// memory while the agent runs, and `status` says when it was written).
async fn publish_status(worker: &Worker, files: &RefCell<Files>, status: String) {
    let path = {
        let mut f = files.borrow_mut();
        if f.last_status == status {
            return;
        }
        f.last_status = status.clone();
        f.status_path.clone()
    };
    let result = worker
        .run(move || replace_file(&path, status.as_bytes(), Sync::No))
        .await;
    let mut f = files.borrow_mut();
    match result {
        Ok(()) => {
            if let Say::Ended { failed, lasted } = f.status_spell.worked(Instant::now()) {
                log::info!(
                    "{} written again, after {failed} failed writes in a row ({:.0} s)",
                    f.status_path.display(),
                    lasted.as_secs_f64()
                );
            }
        }
        Err(e) => {
            if let Say::Failure { attempts } = f.status_spell.failed(Instant::now()) {
                log::warn!("{}{e}; trying again at the next change", again(attempts));
            }
            f.last_status.clear();
        }
    }
}

async fn flush_task(
    shared: Rc<Shared>,
    ctx: Rc<crate::sources::Context>,
    worker: Rc<Worker>,
    files: Rc<RefCell<Files>>,
    wakeup: Wakeup,
) {
    let interval = shared.config.dump_interval.as_millis() as i64;
    let mut next_dump = now_ms() + interval;
    loop {
        // Sleep until something changed, or a dump of earlier changes is
        // due, or the sync of earlier saves.
        let pending = shared.config.files_dir.is_some()
            && (*shared.dump_usage.borrow() || shared.state.borrow().analytics.has_undumped());
        let dump_in = Duration::from_millis((next_dump - now_ms()).max(0) as u64);
        let sync_in = files
            .borrow()
            .sync_due
            .map(|at| at.saturating_duration_since(Instant::now()));
        let timeout = if pending { dump_in } else { IDLE_WAIT };
        let timeout = sync_in.map_or(timeout, |s| s.min(timeout));
        let stop = rung_or_shutdown(&ctx, &wakeup, timeout).await;
        // Coalesce: changes come in bursts.
        if stop || ctx.shutdown.sleep(FLUSH_EVERY).await {
            return;
        }
        let dump = if now_ms() >= next_dump {
            next_dump = now_ms() + shared.config.dump_interval.as_millis() as i64;
            Dump::All
        } else {
            Dump::No
        };
        flush(&shared, &worker, &ctx, &files, dump).await;
    }
}

/// Which analytics files a flush rewrites.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Dump {
    /// None: a save, raw appends and feedback files only.
    No,
    /// Every changed one, or until shutdown begins: the shutdown's own
    /// flush waits for this one, on the same worker.
    All,
    /// Every changed one until the instant (at shutdown). The rest wait for
    /// the next start's first dump, which rewrites all from the saved state.
    Until(Instant),
}

/// Save what changed, append raw lines, and with `dump` rewrite the
/// changed analytics files: all in one job on the source's worker, the
/// only writer of these files; then publish the status.
struct Collected {
    activity: Vec<((String, String), analytics::Activity)>,
    graphs: Vec<(GraphKey, analytics::SavedChain)>,
    raw: BTreeMap<String, Vec<u8>>,
    /// `usage.csv` and `activity.csv`, written on the worker.
    summaries: Option<analytics::Summaries>,
    dumps: Vec<(String, String)>,
    /// Changed feedback matrices (saved, and written to files_dir at once:
    /// they change a few times per user, and the dashboards' old readers
    /// look at the files).
    feedback: Vec<(GraphKey, String)>,
    /// Graphs of this dump left for its next jobs.
    remaining: usize,
}

/// What a dump has yet to write.
struct Due {
    /// `usage.csv` and `activity.csv`, in its first job only: while
    /// messages come, each job's save would make them due again.
    summaries: bool,
    /// Graphs due when the dump began, not yet taken.
    graphs: usize,
}

impl Due {
    /// What a flush writes, as it begins: of a dump, the graphs waiting
    /// then. Without `files_dir` there are none, for graphs are never
    /// written: counting them ran an empty job per 500 of them.
    fn at_start(shared: &Shared, dump: Dump) -> Due {
        let graphs = match dump {
            Dump::No => 0,
            _ if shared.config.files_dir.is_none() => 0,
            _ => shared.state.borrow().analytics.undumped(),
        };
        Due {
            summaries: true,
            graphs,
        }
    }
}

/// Take what is to be written out of the shared state (no waiting here):
/// of a dump, at most [`DUMP_GRAPHS_PER_JOB`] of the graphs still `due`,
/// which it counts down.
fn collect(shared: &Shared, dump: Dump, due: &mut Due) -> Collected {
    let mut state = shared.state.borrow_mut();
    let (activity, graphs) = state.analytics.take_changes();
    if !activity.is_empty() {
        *shared.dump_usage.borrow_mut() = true;
    }
    let raw = state.take_raw();
    let feedback = state
        .desk
        .as_mut()
        .map(|d| d.take_changed_feedback())
        .unwrap_or_default();
    let mut dumps: Vec<(String, String)> = Vec::new();
    let mut summaries = None;
    if dump != Dump::No && shared.config.files_dir.is_some() {
        // The summaries first: at shutdown they are the ones worth the time.
        if std::mem::take(&mut due.summaries)
            && std::mem::take(&mut *shared.dump_usage.borrow_mut())
        {
            summaries = Some(state.analytics.summaries());
        }
        let part = due.graphs.min(DUMP_GRAPHS_PER_JOB);
        due.graphs -= part;
        for (k, g) in state.analytics.take_undumped(part) {
            dumps.push((
                format!("{}-adjacency.csv", k.file_stem()),
                g.adjacency_csv(),
            ));
            dumps.push((format!("{}-graph.json", k.file_stem()), g.to_json(&k.exp)));
        }
    }
    Collected {
        activity,
        graphs,
        raw,
        summaries,
        dumps,
        feedback,
        remaining: due.graphs,
    }
}

/// The job runs on the source's own worker when it dumps (every
/// `dump_interval_secs`, possibly many files), else on the agent's IO
/// thread: a save and raw appends every few seconds then cost no thread of
/// their own while streaming (issue 18: at most 3 threads).
async fn flush(
    shared: &Shared,
    worker: &Worker,
    ctx: &crate::sources::Context,
    files: &RefCell<Files>,
    dump: Dump,
) {
    // A dump writes the graphs due when it begins, a part at a time; those
    // that change meanwhile wait for the next one, so a dump ends however
    // busy the streams are.
    let mut due = Due::at_start(shared, dump);
    for _ in 0..=due.graphs.div_ceil(DUMP_GRAPHS_PER_JOB) {
        if !flush_part(shared, worker, ctx, files, dump, &mut due).await {
            break;
        }
        // Left for the shutdown's own flush, which writes what it can.
        if dump == Dump::All && ctx.shutdown.is_started() {
            break;
        }
    }
    let status = status::document(&shared.state.borrow());
    publish_status(&ctx.io, files, status).await;
}

/// One job of a flush: the save of what changed, and of a dump the next
/// part of its graphs. Whether the dump has more to write.
async fn flush_part(
    shared: &Shared,
    worker: &Worker,
    ctx: &crate::sources::Context,
    files: &RefCell<Files>,
    dump: Dump,
    due: &mut Due,
) -> bool {
    let io = &ctx.io;
    let Collected {
        activity,
        graphs,
        raw,
        summaries,
        dumps,
        feedback,
        remaining,
    } = collect(shared, dump, due);
    let feedback_keys: Vec<GraphKey> = feedback.iter().map(|(k, _)| k.clone()).collect();
    let (store, raw_read) = {
        let mut f = files.borrow_mut();
        (f.store.clone(), std::mem::take(&mut f.raw_read))
    };
    let dir = shared.config.files_dir.clone();
    let changes = (activity, graphs);
    let shutdown = ctx.shutdown.clone();
    let stop = move || match dump {
        Dump::Until(t) => Instant::now() >= t,
        _ => shutdown.is_started(),
    };
    let name = shared.name.clone();
    let last = matches!(dump, Dump::Until(_));
    let (errors, changes, sync_due, left) = if dump == Dump::No { io } else { worker }
        .run(move || {
            let (activity, graphs) = &changes;
            let mut errors = Vec::new();
            if let Some(store) = &store
                && (!activity.is_empty() || !graphs.is_empty())
            {
                let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = s.save(activity, graphs) {
                    errors.push((true, e));
                }
            }
            // Unmarked after a failed save: read again at the next start.
            let saved = errors.is_empty();
            if let Some(store) = &store
                && !feedback.is_empty()
            {
                let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = s.save_feedback(&feedback) {
                    errors.push((true, e));
                }
            }
            // What was saved survives a power cut within SYNC_EVERY, and
            // at shutdown at once.
            let sync_due = store.as_ref().and_then(|store| {
                let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = s.sync(last) {
                    errors.push((false, e));
                }
                s.sync_due()
            });
            if let Some(dir) = &dir {
                for (k, csv) in &feedback {
                    let path = dir.join(format!("{}{}", k.file_stem(), adopt::FEEDBACK_SUFFIX));
                    if let Err(e) = replace_file(&path, csv.as_bytes(), Sync::No) {
                        errors.push((false, e));
                    }
                }
            }
            let mut left = 0;
            if let Some(dir) = &dir {
                let read = if saved { &raw_read[..] } else { &[] };
                errors.extend(append_raw_marked(dir, store.as_deref(), &raw, read));
                if let Some(summaries) = summaries {
                    if stop() {
                        left += 2;
                    } else if let Some(e) = write_summaries(dir, summaries) {
                        errors.push((false, e));
                    }
                }
                let (e, files_left) = write_files(dir, &dumps, &stop);
                left += files_left;
                errors.extend(e.into_iter().map(|e| (false, e)));
                // Said here: a dump that shutdown cut short has nobody
                // waiting for its answer (its task is gone by then). The
                // shutdown's flush counts its later parts' files too (two
                // a graph); a dump's are left for it to write.
                let all_left = match left {
                    0 => 0,
                    n if last => n + 2 * remaining,
                    n => n,
                };
                if all_left > 0 {
                    log::warn!(
                        "source `{name}`: {all_left} analytics files not rewritten before shutdown (files get at most half of shutdown_grace_secs); the first dump after the next start (dump_interval_secs after it) rewrites them from the saved state"
                    );
                }
            }
            (errors, changes, sync_due, left)
        })
        .await;
    let say = {
        let mut f = files.borrow_mut();
        f.sync_due = sync_due;
        f.unwritten |= !errors.is_empty() || left > 0;
        let now = Instant::now();
        if errors.is_empty() {
            f.flush_spell.worked(now)
        } else {
            f.flush_spell.failed(now)
        }
    };
    if let Say::Ended { failed, lasted } = say {
        log::info!(
            "source `{}`: the analytics flush works again, after {failed} failed flushes in a row ({:.0} s)",
            shared.name,
            lasted.as_secs_f64()
        );
    }
    for (save_failed, e) in errors {
        if save_failed {
            // Mark them changed again so the next flush retries.
            let mut state = shared.state.borrow_mut();
            state.analytics.unsave(&changes);
            if let Some(d) = state.desk.as_mut() {
                d.unsave(feedback_keys.iter().cloned());
            }
        }
        if let Say::Failure { attempts } = say {
            log::warn!(
                "source `{}`: {}{e}; trying again at the next flush",
                shared.name,
                again(attempts)
            );
        }
    }
    dump != Dump::No && left == 0 && remaining > 0
}

/// Rewrite `usage.csv` and `activity.csv` in `dir`, each atomically, as
/// they are spelled. The errors, the first for both.
fn write_summaries(dir: &Path, mut summaries: analytics::Summaries) -> Option<String> {
    summaries.sort();
    let usage = replace_file_with(&dir.join("usage.csv"), Sync::No, |out| {
        summaries.write_usage(out)
    });
    let activity = replace_file_with(&dir.join("activity.csv"), Sync::No, |out| {
        summaries.write_activity(out)
    });
    match (usage, activity) {
        (Ok(()), Ok(())) => None,
        (Err(e), Ok(())) | (Ok(()), Err(e)) => Some(e),
        (Err(e), Err(_)) => Some(format!("{e} (and activity.csv)")),
    }
}

/// Rewrite `files` in `dir` in order, each atomically, until `stop` says
/// so. Returns the errors (the first, and how many more: a full disk fails
/// them all) and how many were left.
fn write_files(
    dir: &Path,
    files: &[(String, String)],
    stop: impl Fn() -> bool,
) -> (Option<String>, usize) {
    let mut first_error = None;
    let mut failed = 0;
    for (n, (name, text)) in files.iter().enumerate() {
        if stop() {
            return (summed(first_error, failed), files.len() - n);
        }
        if let Err(e) = replace_file(&dir.join(name), text.as_bytes(), Sync::No) {
            first_error.get_or_insert(e);
            failed += 1;
        }
    }
    (summed(first_error, failed), 0)
}

fn summed(first_error: Option<String>, failed: usize) -> Option<String> {
    first_error.map(|e| match failed {
        1 => e,
        n => format!("{e} (and {} more analytics files)", n - 1),
    })
}

/// Append the raw lines, then mark the raw files as edgemeter leaves them:
/// those appended to, and those the start's scan `read`. Errors, as the
/// flush counts them (none about the saved state).
fn append_raw_marked(
    dir: &Path,
    store: Option<&Mutex<Store>>,
    raw: &BTreeMap<String, Vec<u8>>,
    read: &[RawMark],
) -> Vec<(bool, String)> {
    let mut errors = Vec::new();
    let mut appended = Vec::new();
    if let Err(e) = append_raw(dir, raw, &mut appended) {
        errors.push((false, e));
    }
    if let Some(store) = store
        && (!read.is_empty() || !appended.is_empty())
    {
        let mut s = store.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = s.mark_raw(read, &appended) {
            errors.push((false, e));
        }
    }
    errors
}

/// Append each file's lines, noting in `appended` how each file was just
/// before and after (for its [`RawMark`]).
fn append_raw(
    dir: &Path,
    raw: &BTreeMap<String, Vec<u8>>,
    appended: &mut Vec<Appended>,
) -> Result<(), String> {
    if raw.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for (name, lines) in raw {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot append to {}: {e}", path.display()))?;
        let cannot = |e: std::io::Error| format!("cannot append to {}: {e}", path.display());
        let before = f.metadata().map_err(cannot)?;
        f.write_all(lines).map_err(cannot)?;
        let after = f.metadata().map_err(cannot)?;
        if after.len() != before.len() + lines.len() as u64 {
            // Someone else wrote too: left unmarked, so read at the next start.
            continue;
        }
        appended.push(Appended {
            // Empty: made now (or emptied by someone; a mark of an empty
            // file hides nothing).
            before: (before.len() > 0).then(|| RawMark::of(name, &before)),
            after: RawMark::of(name, &after),
        });
    }
    Ok(())
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
