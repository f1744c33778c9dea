//! What the relay source writes besides the outbox, one flush at a time:
//! the analytics state saved to `relay-<name>.db`, the raw per-user lines,
//! the feedback matrices and the status file (small and frequent, on the
//! agent's IO thread), and every `dump_interval_secs` the analytics files
//! in `files_dir` (on the source's own worker). Also the files' state
//! across a restart: whether the last run left them all written
//! ([`mark_files_complete`], [`files_as_saved`]).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::adopt::{self, RawMark};
use super::analytics::{self, Bound, GraphKey};
use super::ingest::{RAW_PENDING_MAX_BYTES, RawOnDisk};
use super::store::{Appended, Store};
use super::{Shared, status, trim};
use crate::clock::now_ms;
use crate::logging::{Losses, Lost, Say, Spell, again, count, human_bytes, settled, since_began};
use crate::runtime::{Wakeup, Worker};
use crate::state_dir::{Sync, replace_file, replace_file_with};

/// How often analytics state, raw lines and the status file are written.
const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Graphs a dump spells out and writes in one job on the worker, before
/// it spells the next ones: about 5 KiB of text and structure each while
/// they wait to be written. Every graph at once took a restart with 20,000
/// users' saved state from 27 to 126 MiB resident; 500 take about 2.5 MiB
/// and about half a second of a dump's writing here (0.7 ms a file).
pub(super) const DUMP_GRAPHS_PER_JOB: usize = 500;
/// A stream's new connection state is in the status file this soon (the
/// changes of many streams at once are written together).
pub(super) const STATUS_WITHIN: Duration = Duration::from_millis(200);
/// How long the flush task sleeps when nothing changes and no dump is due.
pub(super) const IDLE_WAIT: Duration = Duration::from_secs(86_400);

/// After the shutdown's flush: if this run wrote every analytics file it
/// had to, without an error, sync them (one `syncfs`) and say so in the
/// state, so the next start does not rewrite them all (two files a graph:
/// 200,000 at 100,000 users). Within the files' half of the grace; past
/// it, the next start rewrites them. Whether the state says so now.
pub(super) async fn mark_files_complete(
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

/// Whether the analytics files in `dir` are as the saved state holds them,
/// so that the first dump need not rewrite them all: the last run said so
/// (`marked`, [`mark_files_complete`]) and none of the `graphs`' files is
/// missing. Said in the log either way.
pub(super) fn files_as_saved(
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

pub(super) struct Files {
    pub(super) store: Option<Arc<Mutex<Store>>>,
    /// The raw files the start's scan read, marked by the first save (which
    /// holds what they gave): never before, or a crash between would
    /// leave them unread and their users lost.
    pub(super) raw_read: Vec<RawMark>,
    /// Some flush of this run failed or left files: they are not all as
    /// the state holds them ([`mark_files_complete`]).
    pub(super) unwritten: bool,
    /// Failing flushes and status writes (a full disk fails one every
    /// 2 s) are said once a spell, not once each. A spell ends once none
    /// failed for [`Spell::SETTLE`] (a disk that is nearly full fails one
    /// write and not the next); an idle source wakes to say so.
    pub(super) flush_spell: Spell,
    pub(super) status_spell: Spell,
    /// When the store's saves not yet synced are due to be
    /// ([`Store::sync_due`]): the flush task wakes for it.
    pub(super) sync_due: Option<Instant>,
    pub(super) status_path: PathBuf,
    pub(super) last_status: String,
    /// Raw lines dropped over their memory bound, said a spell at a time.
    pub(super) raw_drops: RawDrops,
}

impl Files {
    pub(super) fn new(
        store: Option<Arc<Mutex<Store>>>,
        raw_read: Vec<RawMark>,
        status_path: PathBuf,
    ) -> Files {
        Files {
            store,
            raw_read,
            unwritten: false,
            flush_spell: Spell::settling(),
            status_spell: Spell::settling(),
            sync_due: None,
            status_path,
            last_status: String::new(),
            raw_drops: RawDrops::default(),
        }
    }
}

/// Wait for a ring on `wakeup`, at most `timeout`; true if the source is
/// shutting down instead.
pub(super) async fn rung_or_shutdown(
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
pub(super) async fn status_task(
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
            // Written as it is: a spell that settled since ends here.
            let say = f.status_spell.quiet(Instant::now());
            say_status_written(&f.status_path, say);
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
            let say = f.status_spell.worked(Instant::now());
            say_status_written(&f.status_path, say);
        }
        Err(e) => {
            if let Say::Failure { attempts } = f.status_spell.failed(Instant::now()) {
                log::warn!("{}{e}; trying again at the next change", again(attempts));
            }
            f.last_status.clear();
        }
    }
}

fn say_status_written(path: &Path, say: Say) {
    if let Say::Ended { failed, lasted } = say {
        let failed = count(failed, "failed write", "failed writes");
        log::info!(
            "{} written again, after {failed} {}",
            path.display(),
            settled(lasted)
        );
    }
}

pub(super) async fn flush_task(
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
        // A failing spell that has settled since the last flush (or status
        // write) worked: a flush then says it ended, though nothing changed.
        let settle_in = |spell: &Spell| {
            spell
                .ends_at()
                .map(|at| at.saturating_duration_since(Instant::now()))
        };
        let (flush_settles_in, status_settles_in) = {
            let f = files.borrow();
            (settle_in(&f.flush_spell), settle_in(&f.status_spell))
        };
        let timeout = if pending { dump_in } else { IDLE_WAIT };
        let timeout = [sync_in, flush_settles_in, status_settles_in]
            .into_iter()
            .flatten()
            .fold(timeout, Duration::min);
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
pub(super) enum Dump {
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
pub(super) struct Collected {
    pub(super) activity: Vec<((String, String), analytics::Activity)>,
    pub(super) graphs: Vec<(GraphKey, analytics::SavedChain)>,
    pub(super) raw: BTreeMap<String, Vec<u8>>,
    /// Their bytes, as the state counted them while they came.
    pub(super) raw_bytes: u64,
    /// `usage.csv` and `activity.csv`, written on the worker.
    pub(super) summaries: Option<analytics::Summaries>,
    pub(super) dumps: Vec<(String, String)>,
    /// Changed feedback matrices (saved, and written to files_dir at once:
    /// they change a few times per user, and the dashboards' old readers
    /// look at the files).
    pub(super) feedback: Vec<(GraphKey, String)>,
    /// Graphs of this dump left for its next jobs.
    pub(super) remaining: usize,
}

/// What a dump has yet to write.
pub(super) struct Due {
    /// `usage.csv` and `activity.csv`, in its first job only: while
    /// messages come, each job's save would make them due again.
    pub(super) summaries: bool,
    /// Graphs due when the dump began, not yet taken.
    pub(super) graphs: usize,
    /// Whether the raw files' bound is still to be kept, in the dump's
    /// first job only ([`trim`]).
    pub(super) raw_bound: bool,
}

impl Due {
    /// What a flush writes, as it begins: of a dump, the graphs waiting
    /// then. Without `files_dir` there are none, for graphs are never
    /// written: counting them ran an empty job per 500 of them.
    pub(super) fn at_start(shared: &Shared, dump: Dump) -> Due {
        let graphs = match dump {
            Dump::No => 0,
            _ if shared.config.files_dir.is_none() => 0,
            _ => shared.state.borrow().analytics.undumped(),
        };
        Due {
            summaries: true,
            graphs,
            raw_bound: dump == Dump::All && shared.config.raw_files,
        }
    }
}

/// Take what is to be written out of the shared state (no waiting here):
/// of a dump, at most [`DUMP_GRAPHS_PER_JOB`] of the graphs still `due`,
/// which it counts down.
pub(super) fn collect(shared: &Shared, dump: Dump, due: &mut Due) -> Collected {
    let mut state = shared.state.borrow_mut();
    let (activity, graphs) = state.analytics.take_changes();
    if !activity.is_empty() {
        *shared.dump_usage.borrow_mut() = true;
    }
    let raw_bytes = state.raw_pending_bytes();
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
        raw_bytes,
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
pub(super) async fn flush(
    shared: &Shared,
    worker: &Worker,
    ctx: &crate::sources::Context,
    files: &RefCell<Files>,
    dump: Dump,
) {
    say_full(shared);
    let dropped = shared.state.borrow().raw_dropped;
    let dir = shared.config.files_dir.as_deref().unwrap_or(Path::new("."));
    let said = files
        .borrow_mut()
        .raw_drops
        .said(dir, dropped, Instant::now());
    if let Some((level, what)) = said {
        log::log!(level, "source `{}`: {what}", shared.name);
    }
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

/// Raw lines dropped because [`RAW_PENDING_MAX_BYTES`] of them were
/// waiting for the disk: the raw files miss them (the outbox and the
/// analytics do not). Said when it begins, as a reminder while it lasts,
/// and when flushes have dropped none for [`Spell::SETTLE`]
/// ([`Losses::settling`]): a disk that keeps up at one flush and not the
/// next is one spell.
#[derive(Debug)]
pub(super) struct RawDrops {
    /// Lines dropped in all when the last flush looked.
    seen: u64,
    losses: Losses,
}

impl Default for RawDrops {
    fn default() -> RawDrops {
        RawDrops {
            seen: 0,
            losses: Losses::settling(),
        }
    }
}

impl RawDrops {
    /// At a flush, with `dropped` lines dropped in all so far: what the
    /// log says, and at which level.
    pub(super) fn said(
        &mut self,
        dir: &Path,
        dropped: u64,
        now: Instant,
    ) -> Option<(log::Level, String)> {
        let new = dropped - std::mem::replace(&mut self.seen, dropped);
        let dir = dir.display();
        match self.losses.lost(new, now) {
            Lost::Nothing => None,
            Lost::Began(n) => Some((
                log::Level::Warn,
                format!(
                    "{n} raw lines were not appended to the raw files in {dir}: {} MiB of them were waiting for the disk already (it is not keeping up, or the flushes fail). The messages are in the outbox and the analytics; the raw files miss them (relay_raw_lines_dropped_total counts them)",
                    RAW_PENDING_MAX_BYTES >> 20
                ),
            )),
            Lost::Still { lost, since } => Some((
                log::Level::Warn,
                format!(
                    "raw lines for {dir} are still dropped: {}",
                    since_began(lost, since)
                ),
            )),
            Lost::Ended { lost, lasted } => Some((
                log::Level::Info,
                format!(
                    "raw lines are appended to the raw files in {dir} again: {lost} were dropped {}",
                    settled(lasted)
                ),
            )),
        }
    }
}

/// Keep what a dump found of the raw files for the status, and say a cut.
fn say_trimmed(shared: &Shared, t: trim::Raw) {
    let max = shared.config.raw_files_max_bytes;
    let mut state = shared.state.borrow_mut();
    let on_disk = state.raw_on_disk.get_or_insert(RawOnDisk {
        max,
        ..RawOnDisk::default()
    });
    on_disk.bytes = t.bytes;
    on_disk.appended = 0;
    let Some(cut) = t.cut else {
        on_disk.short_said = false;
        return;
    };
    on_disk.cut_files += cut.files as u64;
    on_disk.cut_bytes += cut.from.saturating_sub(t.bytes);
    // Small files are not cut: while they alone hold more than the bound,
    // that is said once, and not the cuts of each dump (status counts them).
    let was_short = std::mem::replace(&mut on_disk.short_said, cut.short);
    if was_short && cut.short {
        return;
    }
    let short = cut.short;
    let name = &shared.name;
    let dir = shared.config.files_dir.as_deref().unwrap_or(Path::new("."));
    let (dir, max) = (dir.display(), human_bytes(max));
    let small = format!(
        "files of one message or at most {} KiB, which are not cut: raise raw_files_max_bytes",
        trim::SMALL >> 10
    );
    match (cut.files, short) {
        (0, false) => {}
        (0, true) => log::warn!(
            "source `{name}`: the raw files in {dir} hold {}, more than raw_files_max_bytes ({max}), in {small}",
            human_bytes(t.bytes)
        ),
        (files, _) => log::log!(
            if short {
                log::Level::Warn
            } else {
                log::Level::Info
            },
            "source `{name}`: the raw files in {dir} held {}, more than raw_files_max_bytes ({max}): the {files} files written least recently were cut to their last message (their counts are in the analytics), leaving {}{}",
            human_bytes(cut.from),
            human_bytes(t.bytes),
            if short {
                format!("; the rest is in {small}")
            } else {
                String::new()
            }
        ),
    }
}

/// Say, once a run each, that the analytics met a bound: from then on new
/// users (or new names) are counted, not analysed, and nothing else would
/// tell an operator why their files stopped growing.
fn say_full(shared: &Shared) {
    let mut state = shared.state.borrow_mut();
    let (users, max_users) = state.analytics.users();
    let (names, max_names) = state.analytics.names();
    for bound in state.newly_full() {
        match bound {
            Bound::Users => log::warn!(
                "source `{}`: the analytics track {users} users, as many as max_users = {max_users} allows: from now on the messages of users not seen before are counted (\"not analysed\" in `edgemeter status`) but not analysed. Raise max_users (about 0.6 KiB of memory a user) and restart to analyse more users",
                shared.name
            ),
            Bound::Names => log::warn!(
                "source `{}`: the analytics know {names} distinct names (users, rigs, experiments, courses, commands), as many as they may (4 × max_users + 1000 = {max_names}): from now on messages with a name not seen before are counted (\"not analysed\" in `edgemeter status`) but not analysed. Raise max_users and restart to analyse more",
                shared.name
            ),
        }
    }
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
        raw_bytes: appending,
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
    // The raw files' bound is kept by each dump's first job (every minute
    // by default), and by the save whose appends take them past it, or
    // the first, which finds what they hold: on the worker, as a cut may
    // take many files.
    let passed = shared.config.raw_files && dir.is_some() && store.is_some() && {
        let state = shared.state.borrow();
        state
            .raw_on_disk
            .as_ref()
            .is_none_or(|r| r.passed_by(appending))
    };
    let raw_max =
        (std::mem::take(&mut due.raw_bound) || passed).then_some(shared.config.raw_files_max_bytes);
    let on_io = dump == Dump::No && raw_max.is_none();
    let (errors, changes, sync_due, left, trimmed) = if on_io { io } else { worker }
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
            let mut trimmed = None;
            if let Some(dir) = &dir {
                let read = if saved { &raw_read[..] } else { &[] };
                errors.extend(append_raw_marked(dir, store.as_deref(), &raw, read));
                if let (Some(store), Some(max)) = (&store, raw_max) {
                    match trim::trim(dir, store, max, &stop) {
                        Ok(t) => trimmed = Some(t),
                        Err(e) => errors.push((false, e)),
                    }
                }
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
            (errors, changes, sync_due, left, trimmed)
        })
        .await;
    match trimmed {
        Some(t) => say_trimmed(shared, t),
        None => {
            if let Some(r) = shared.state.borrow_mut().raw_on_disk.as_mut() {
                r.appended += appending;
            }
        }
    }
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
        let failed = count(failed, "failed flush", "failed flushes");
        log::info!(
            "source `{}`: the analytics flush works again, after {failed} {}",
            shared.name,
            settled(lasted)
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
pub(super) fn write_files(
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
pub(super) fn append_raw_marked(
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
