//! `edgemeter run`: the edge agent. Wires the validated config into one
//! `LocalExecutor` on the main thread: the sources, the outbox writer, one
//! delivery loop per sink, and the signal handler that ends it all.
//!
//! Shutdown (SIGTERM or SIGINT), within `[agent] shutdown_grace_secs` plus
//! [`SINK_FINISH`]:
//! 1. the shutdown signal fires; sources get `shutdown_grace_secs` (default
//!    5 s) to emit their last window and save their state, then are
//!    cancelled, and the agent says so;
//! 2. with every source gone the record channel closes, and the writer
//!    commits what it still holds, at once (if commits were failing, a
//!    full disk, it tries once more and gives up: exit 1, saying how many
//!    records were lost);
//! 3. sink loops get what is left of the budget to finish the batch in
//!    flight, then are cancelled (an unconfirmed batch is simply delivered
//!    again next time);
//! 4. exit 0. A second signal during shutdown exits at once (status 130);
//!    committed records are safe either way.

use std::fmt;
use std::time::{Duration, Instant};

use async_signal::{Signal, Signals};
use smol::channel::Sender;
use smol::stream::StreamExt;
use std::rc::Rc;

use smol::{LocalExecutor, Task};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::logging::{Losses, Lost, Say, Spell, again, count, human_bytes, settled, since_began};
use crate::outbox::{Outbox, OutboxError};
use crate::record::{KindSet, Record, payloads};
use crate::runtime::{self, Doorbell, Inbox, Item, SharedOutbox};
use crate::sinks::Sink;
use crate::sinks::delivery::{Driver, IDLE_RECHECK};
use crate::sources::Source;
use crate::state_dir::{self, LockError};
use crate::{sinks, sources};

/// At shutdown, what sinks get after the sources stopped to finish the
/// batch in flight. The unit's `TimeoutStopSec` must exceed this plus
/// `shutdown_grace_secs`.
pub const SINK_FINISH: Duration = Duration::from_secs(3);
/// Most records committed in one transaction; a larger backlog takes several.
const GROUP_MAX: usize = 50_000;
/// How often the writer makes its commits survive a power cut (an fsync of
/// the WAL; a commit itself does not wait for the disk, see the outbox).
const SYNC_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub enum AgentError {
    Lock(LockError),
    Outbox(OutboxError),
    Signals(std::io::Error),
    /// `[agent] http_listen` could not be bound.
    Listen(std::net::SocketAddr, std::io::Error),
    /// Stopped while commits failed (a full disk): these records, received
    /// and held in memory, are lost.
    Uncommitted(Uncommitted),
}

/// What the writer could not commit by the time it had to stop.
#[derive(Debug)]
pub struct Uncommitted {
    pub records: usize,
    /// The last commit's error.
    pub why: String,
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Lock(e) => e.fmt(f),
            AgentError::Outbox(e) => e.fmt(f),
            AgentError::Signals(e) => write!(f, "cannot install signal handlers: {e}"),
            AgentError::Listen(addr, e) => write!(
                f,
                "cannot listen on {addr} ([agent] http_listen): {e}; choose a free port or remove the key"
            ),
            AgentError::Uncommitted(u) => write!(
                f,
                "could not commit {} records before stopping ({}); they are lost",
                u.records, u.why
            ),
        }
    }
}

impl std::error::Error for AgentError {}

/// Open the state, then run until a signal (or `stop_after`, for the demo).
/// `extra` are sources that do not come from `[[source]]` tables (the
/// upstream's server). Errors here are fatal.
pub fn run(
    config: Config,
    extra: Vec<(String, Box<dyn Source>)>,
    stop_after: Option<Duration>,
) -> Result<(), AgentError> {
    let agent = &config.agent;
    let _lock =
        state_dir::lock(&agent.state_dir, Duration::from_secs(2)).map_err(AgentError::Lock)?;
    let built: Vec<Box<dyn Sink>> = config
        .sinks
        .iter()
        .map(|s| sinks::build(&s.config, &config.agent.id))
        .collect();
    for s in &config.sinks {
        let Some(url) = s.config.url() else { continue };
        if let Some(proxy) = crate::http_client::proxy_for(&url) {
            log::info!(
                "sink `{}`: sending to {url} through the {proxy} (from ALL_PROXY, HTTPS_PROXY or HTTP_PROXY; NO_PROXY lists the hosts reached directly)",
                s.name
            );
        }
    }
    let wanted: Vec<(String, KindSet)> = config
        .sinks
        .iter()
        .zip(&built)
        .map(|(s, b)| (s.name.clone(), b.accepts()))
        .collect();
    let outbox = open_outbox(&config, &wanted)?;
    let listener = match agent.http_listen {
        None => None,
        Some(addr) => Some(
            std::net::TcpListener::bind(addr)
                .and_then(smol::Async::new)
                .map_err(|e| AgentError::Listen(addr, e))?,
        ),
    };
    let ex = Rc::new(LocalExecutor::new());
    let main = serve(&ex, config, extra, built, outbox, listener, stop_after);
    smol::block_on(ex.run(main))
}

fn open_outbox(config: &Config, wanted: &[(String, KindSet)]) -> Result<SharedOutbox, AgentError> {
    let agent = &config.agent;
    let (mut outbox, report) =
        Outbox::open(&agent.state_dir, agent.buffer_max_bytes).map_err(AgentError::Outbox)?;
    if let Some((aside, why)) = &report.moved_aside {
        log::error!(
            "the outbox {} was unusable ({why}); moved it aside to {} and started a fresh one",
            outbox.path().display(),
            aside.display()
        );
    }
    for gone in outbox.register_sinks(wanted).map_err(AgentError::Outbox)? {
        log::warn!("sink `{gone}` is no longer configured; its place in the outbox was released");
    }
    log::info!(
        "outbox {}: {} buffered ({} of {}), {} to deliver again",
        outbox.path().display(),
        count(report.records, "record", "records"),
        human_bytes(outbox.bytes().max(0) as u64),
        human_bytes(agent.buffer_max_bytes),
        count(report.open_batches, "batch", "batches")
    );
    Ok(runtime::shared_outbox(outbox))
}

async fn serve(
    ex: &Rc<LocalExecutor<'static>>,
    config: Config,
    extra: Vec<(String, Box<dyn Source>)>,
    built: Vec<Box<dyn Sink>>,
    outbox: SharedOutbox,
    listener: Option<smol::Async<std::net::TcpListener>>,
    stop_after: Option<Duration>,
) -> Result<(), AgentError> {
    let mut signals = Signals::new([Signal::Term, Signal::Int]).map_err(AgentError::Signals)?;
    let (mut trigger, shutdown) = runtime::shutdown_pair();
    let (emitter, records) = runtime::record_channel();
    let agent = config.agent.clone();
    let scope = crate::status::Scope::of(&config);

    let (bells, wakeups): (Vec<_>, Vec<_>) =
        config.sinks.iter().map(|_| runtime::doorbell()).unzip();
    let writer = ex.spawn(write_records(
        records,
        outbox.clone(),
        Cadence {
            flush: agent.flush_interval,
            deliver: agent.deliver_interval,
        },
        bells,
        shutdown.clone(),
    ));
    // The agent's own health, as points from a source named `agent`.
    let health = agent.health_interval.map(|interval| {
        let h: Box<dyn Source> = Box::new(crate::status::health::Health {
            scope: scope.clone(),
            interval,
        });
        ("agent".to_owned(), h)
    });
    let source_tasks: Vec<Task<()>> = config
        .sources
        .iter()
        .map(|s| (s.name.clone(), sources::build(&s.config, &agent.state_dir)))
        .chain(extra)
        .chain(health)
        .map(|(name, source)| {
            let ctx = sources::Context {
                name,
                agent_id: agent.id.clone(),
                emit: emitter.clone(),
                shutdown: shutdown.clone(),
                spawner: runtime::Spawner::new(ex),
                io: outbox.worker(),
                grace: agent.shutdown_grace,
            };
            ex.spawn(source.run(ctx))
        })
        .collect();
    // Only sources hold emitters now: the channel closes when they are gone.
    drop(emitter);
    let sink_tasks: Vec<Task<()>> = config
        .sinks
        .into_iter()
        .zip(built)
        .zip(wakeups)
        .map(|((s, sink), wakeup)| {
            let driver = Driver {
                sink,
                name: s.name,
                delivery: s.delivery,
                outbox: outbox.clone(),
                shutdown: shutdown.clone(),
                wakeup,
                idle: IDLE_RECHECK.max(agent.flush_interval),
            };
            ex.spawn(driver.run())
        })
        .collect();
    let n_sources = source_tasks.len() - usize::from(agent.health_interval.is_some());
    log::info!(
        "edgemeter {} running as agent `{}`: {}, {}, state in {}{}",
        env!("CARGO_PKG_VERSION"),
        agent.id,
        crate::logging::counted(n_sources, "source", "sources"),
        crate::logging::counted(sink_tasks.len(), "sink", "sinks"),
        agent.state_dir.display(),
        match agent.health_interval {
            Some(d) => format!("; its health as points every {} s", d.as_secs()),
            None => String::new(),
        }
    );

    if let Some(listener) = listener {
        if let Ok(addr) = listener.get_ref().local_addr() {
            log::info!(
                "serving /metrics, /health, /status.json and a status page on http://{addr}/"
            );
        }
        ex.spawn(crate::status::serve::serve(
            listener,
            scope,
            runtime::Spawner::new(ex),
            shutdown.clone(),
        ))
        .detach();
    }

    // systemd: ready now, and watchdog pings from this loop, so a stalled
    // loop is noticed and restarted.
    let notifier = std::rc::Rc::new(crate::systemd::Notifier::from_env());
    notifier.ready(&format!(
        "agent {}: {}, {}",
        agent.id,
        crate::logging::counted(n_sources, "source", "sources"),
        crate::logging::counted(sink_tasks.len(), "sink", "sinks")
    ));
    // Long-lived: hand freed memory back to the system now and then.
    ex.spawn(async {
        loop {
            smol::Timer::after(runtime::HEAP_TRIM_EVERY).await;
            runtime::trim_heap();
        }
    })
    .detach();
    if let Some(every) = notifier.ping_every() {
        let n = notifier.clone();
        ex.spawn(async move {
            loop {
                n.watchdog();
                smol::Timer::after(every).await;
            }
        })
        .detach();
    }

    let why = smol::future::or(async { signal_name(signals.next().await) }, async {
        match stop_after {
            Some(d) => smol::Timer::after(d).await,
            None => smol::future::pending().await,
        };
        "the end of the demo"
    })
    .await;
    let started = Instant::now();
    log::info!("received {why}; shutting down: stopping sources, committing buffered records");
    notifier.stopping();
    trigger.fire();
    // A second signal means "now": committed records are safe regardless.
    ex.spawn(async move {
        if let Some(s) = signals.next().await {
            log::warn!(
                "received {} during shutdown; exiting at once",
                signal_name(Some(s))
            );
            std::process::exit(130);
        }
    })
    .detach();

    let grace = agent.shutdown_grace;
    let cancelled = join_within(source_tasks, grace).await;
    if cancelled > 0 {
        log::warn!(
            "{} not finish within shutdown_grace_secs = {}; cancelled, losing the last window's points and the unsaved state (raise [agent] shutdown_grace_secs)",
            crate::logging::counted(cancelled, "source did", "sources did"),
            grace.as_secs_f64()
        );
    }
    let uncommitted = writer.await;
    let stragglers = join_within(sink_tasks, SINK_FINISH).await;
    if stragglers > 0 {
        log::info!(
            "{} still delivering; their batches will be sent again next start",
            crate::logging::counted(stragglers, "sink was", "sinks were")
        );
    }
    let ms = started.elapsed().as_millis();
    if cancelled > 0 {
        log::warn!(
            "stopped in {ms} ms, with {} cut off (see above)",
            crate::logging::counted(cancelled, "source", "sources")
        );
    } else if uncommitted.is_none() {
        log::info!("stopped cleanly in {ms} ms");
    }
    match uncommitted {
        None => Ok(()),
        Some(u) => Err(AgentError::Uncommitted(u)),
    }
}

fn signal_name(s: Option<std::io::Result<Signal>>) -> &'static str {
    match s {
        Some(Ok(Signal::Term)) => "SIGTERM",
        Some(Ok(Signal::Int)) => "SIGINT",
        _ => "a signal",
    }
}

/// Await all tasks for at most `budget`; cancel the rest. Returns how many
/// were cancelled.
async fn join_within(tasks: Vec<Task<()>>, budget: Duration) -> usize {
    let deadline = Instant::now() + budget;
    let mut cancelled = 0;
    for task in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        let done = smol::future::or(
            async {
                task.await;
                true
            },
            async {
                smol::Timer::after(left).await;
                false
            },
        )
        .await;
        cancelled += usize::from(!done);
    }
    cancelled
}

/// Fsync the outbox's WAL (see [`SYNC_EVERY`]); a failure is logged.
async fn sync(outbox: &SharedOutbox, spell: &mut Spell) {
    said_sync(outbox.call(|o| o.sync()).await, spell);
}

/// Log what a sync came to, a spell at a time ([`Spell::settling`]): a
/// failing disk fails one a second, a failing SD card one and not the
/// next. Said when it begins, every ten minutes while it lasts, and once
/// no sync failed for [`Spell::SETTLE`] ([`said_synced`]).
fn said_sync(result: Result<(), String>, spell: &mut Spell) {
    let now = Instant::now();
    match result {
        Ok(()) => said_synced(spell.worked(now)),
        Err(e) => {
            if let Say::Failure { attempts } = spell.failed(now) {
                log::warn!(
                    "{}{e}; the last second's records would not survive a power cut",
                    again(attempts)
                );
            }
        }
    }
}

/// Say the end of a spell of failed syncs, when `say` is it (a sync that
/// worked, or an idle writer's look: [`Spell::quiet`]).
fn said_synced(say: Say) {
    if let Say::Ended { failed, lasted } = say {
        let failed = count(failed, "failed sync", "failed syncs");
        log::info!(
            "the outbox's WAL is synced again, after {failed} {}",
            settled(lasted)
        );
    }
}

/// Say that commits work again, once they have for [`Spell::SETTLE`] (a
/// commit worked, or the writer is idle, which it is only once what it
/// held is committed).
fn said_writable(failing: &mut Spell) {
    if let Say::Ended { failed, lasted } = failing.worked(Instant::now()) {
        log::info!(
            "outbox writable again: {failed} commits failed {}; what they held is committed",
            settled(lasted)
        );
    }
}

/// What the log says of the records a commit dropped because the outbox
/// was full: said when it begins, every ten minutes while it lasts (a
/// full outbox drops at every commit, ten times a second), and when
/// commits have dropped none for [`Spell::SETTLE`] ([`Losses::settling`]):
/// it drops whole rows (a relay stream's messages share rows of up to 64
/// KiB), and the room one drop frees may last a few commits while the
/// outbox is still full.
fn said_full(lost: Lost) -> Option<(log::Level, String)> {
    match lost {
        Lost::Nothing => None,
        Lost::Began(n) => Some((
            log::Level::Warn,
            format!(
                "outbox full (buffer_max_bytes): dropped the {n} oldest records to make room, and drops the oldest at every commit until the sinks take more (see `edgemeter status`)"
            ),
        )),
        Lost::Still { lost, since } => Some((
            log::Level::Warn,
            format!(
                "outbox still full (buffer_max_bytes): oldest records dropped: {}",
                since_began(lost, since)
            ),
        )),
        Lost::Ended { lost, lasted } => Some((
            log::Level::Info,
            format!(
                "outbox has room again: {lost} oldest records were dropped {}",
                settled(lasted)
            ),
        )),
    }
}

/// How often the writer commits, and wakes the sinks.
struct Cadence {
    /// Records are committed at most this long after they arrive.
    flush: Duration,
    /// Caught-up sinks are woken at most this often, or at once for a
    /// large commit: committing every 0.1 s must not mean a request to
    /// CloudWatch or the upstream every 0.1 s.
    deliver: Duration,
}

/// A commit this large wakes the sinks at once (about a batch's worth).
const RING_AT_ONCE: usize = 1000;

/// Records of `item` onto the writer's `group`, in order; a barrier is
/// returned for the caller to keep or answer.
fn gather(item: Item, group: &mut Vec<Record>) -> Option<Sender<()>> {
    match item {
        Item::Record(r) => group.push(r),
        Item::Records(mut rs) => group.append(&mut rs),
        Item::Barrier(done) => return Some(done),
    }
    None
}

/// The outbox writer: groups what arrives within `flush` into one
/// transaction, and makes the commits durable against a power cut once a
/// second ([`SYNC_EVERY`]). Ends when the channel closes (every source
/// gone), after committing and syncing what it holds.
///
/// While commits fail (a full disk), it holds what it received and tries
/// again with backoff; once it holds [`GROUP_MAX`] records it takes no
/// more, and the sources wait (an xx source reads the rows again later;
/// a relay stream's messages wait in its socket). At shutdown it takes
/// what the sources still send, tries once more, and returns what it
/// could not commit.
async fn write_records(
    rx: Inbox,
    outbox: SharedOutbox,
    cadence: Cadence,
    bells: Vec<Doorbell>,
    shutdown: runtime::Shutdown,
) -> Option<Uncommitted> {
    let flush = cadence.flush;
    let mut group: Vec<Record> = Vec::new();
    // Barriers wait for the commit of everything received before them.
    let mut barriers: Vec<Sender<()>> = Vec::new();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    // A nearly full disk lets one commit in and fails the next: a spell
    // that settles, or each flap would be two lines.
    let mut failing = Spell::settling();
    // Failing syncs settle too: the writer wakes to say the end.
    let mut sync_spell = Spell::settling();
    let mut full = Losses::settling();
    // Whether a commit of part of what is held (a disk with a little room)
    // was said in this spell of failures.
    let mut said_part = false;
    let mut closed = false;
    // Commits not yet synced, and when the last sync was; commits the
    // sinks were not woken for, and when they last were.
    let (mut unsynced, mut synced_at) = (false, Instant::now());
    let (mut unrung, mut rung_at) = (false, Instant::now());
    let ring = |bells: &[Doorbell]| bells.iter().for_each(Doorbell::ring);
    while !closed || !group.is_empty() {
        if group.is_empty() {
            let wake = [
                unsynced.then(|| synced_at + SYNC_EVERY),
                unrung.then(|| rung_at + cadence.deliver),
                // Payload buffers are kept while records flow, freed
                // below at the first wake-up without one (within a second).
                (payloads::kept().0 > 0).then(|| Instant::now() + SYNC_EVERY),
                // Commits that failed, then worked: said once they have
                // worked for the settling time, records arriving or not.
                failing.settles_at(),
                // The same for syncs.
                sync_spell.ends_at(),
            ]
            .into_iter()
            .flatten()
            .min();
            if wake.is_none() {
                // Nothing due until a record comes: give back the group's
                // buffer, kept from commit to commit while records flow.
                group = Vec::new();
            }
            let next = if let Some(at) = wake {
                let due = smol::Timer::at(at);
                smol::future::or(async { Some(rx.recv().await) }, async {
                    due.await;
                    None
                })
                .await
            } else {
                Some(rx.recv().await)
            };
            match next {
                Some(Ok(item)) => {
                    if let Some(done) = gather(item, &mut group) {
                        // Nothing is pending: everything before it is committed.
                        let _ = done.try_send(());
                        continue;
                    }
                }
                Some(Err(_)) => break,
                None => {
                    // Idle since the last commit: wake the sinks, make it
                    // durable, whichever is due; free the kept payloads.
                    payloads::release();
                    said_writable(&mut failing);
                    said_synced(sync_spell.quiet(Instant::now()));
                    if unrung && rung_at.elapsed() >= cadence.deliver {
                        ring(&bells);
                        (unrung, rung_at) = (false, Instant::now());
                    }
                    if unsynced && synced_at.elapsed() >= SYNC_EVERY {
                        sync(&outbox, &mut sync_spell).await;
                        (unsynced, synced_at) = (false, Instant::now());
                    }
                    continue;
                }
            }
        }
        // Gather until the flush deadline; a closed channel or a barrier
        // commits at once.
        // One timer per group, not per record: every timer registered with
        // async-io wakes its reactor (an eventfd write), which at thousands
        // of records a second cost more than the records themselves.
        let mut deadline = smol::Timer::at(Instant::now() + flush);
        while !closed && barriers.is_empty() && group.len() < GROUP_MAX {
            let next = smol::future::or(async { Some(rx.recv().await) }, async {
                (&mut deadline).await;
                None
            })
            .await;
            match next {
                Some(Ok(item)) => barriers.extend(gather(item, &mut group)),
                Some(Err(_)) => closed = true,
                None => break,
            }
            // Take what else is waiting without a future and a wake-up per
            // record: a source that reads a burst sends it before it yields.
            while barriers.is_empty() && group.len() < GROUP_MAX {
                match rx.try_recv() {
                    Ok(item) => barriers.extend(gather(item, &mut group)),
                    Err(_) => break,
                }
            }
        }
        let batch = std::mem::take(&mut group);
        let sync_now = closed || synced_at.elapsed() >= SYNC_EVERY;
        let (batch, result, synced) = outbox
            .call(move |o| {
                let r = o.append_what_fits(&batch);
                let synced = (r.is_ok() && sync_now).then(|| o.sync());
                (batch, r, synced)
            })
            .await;
        match synced {
            Some(r) => {
                // A failed sync is tried again a second later, with the
                // next commit's.
                unsynced &= r.is_err();
                synced_at = Instant::now();
                said_sync(r, &mut sync_spell);
            }
            None => unsynced |= result.is_ok(),
        }
        let held_back = match result {
            Ok((n, appended)) => {
                if closed || n >= RING_AT_ONCE || rung_at.elapsed() >= cadence.deliver {
                    ring(&bells);
                    (unrung, rung_at) = (false, Instant::now());
                } else {
                    unrung = true;
                }
                let lost = full.lost(appended.dropped.max(0) as u64, Instant::now());
                if let Some((level, what)) = said_full(lost) {
                    log::log!(level, "{what}");
                }
                // The crash test reads this line: these ids are durable now.
                log::debug!(
                    "outbox: committed ids {}..={}",
                    appended.ids.start(),
                    appended.ids.end()
                );
                // The next group fills the same buffer: a new one grew by
                // doubling for every group, each step past malloc's mmap
                // threshold a fresh mapping and its page faults.
                group = batch;
                if n == group.len() {
                    for done in barriers.drain(..) {
                        let _ = done.try_send(());
                    }
                    backoff.reset();
                    said_writable(&mut failing);
                    said_part = false;
                    // Their payload buffers hold the next messages' copies.
                    payloads::recycle(&mut group);
                    false
                } else {
                    // A full disk with a little room: what fitted is safe,
                    // the rest is held and tried again as on a failure.
                    group.drain(..n);
                    if !std::mem::replace(&mut said_part, true) {
                        log::warn!(
                            "outbox: the disk had room for {n} of the records held: those are committed; holding the other {} and trying again",
                            group.len()
                        );
                    }
                    true
                }
            }
            Err(e) => {
                let why = if e.is_disk_full() {
                    format!("{e} (the disk is full)")
                } else {
                    e.to_string()
                };
                group = batch;
                if closed {
                    return Some(Uncommitted {
                        records: group.len(),
                        why,
                    });
                }
                if let Say::Failure { attempts } = failing.failed(Instant::now()) {
                    log::error!(
                        "{}{why}; holding {} records in memory and trying again; once {GROUP_MAX} are held, the sources wait",
                        again(attempts),
                        group.len()
                    );
                }
                true
            }
        };
        if held_back && !closed {
            // Try again after the wait; at shutdown at once, with what the
            // sources still send in their grace (they wait on a full
            // writer, and would be cut off).
            let wait = backoff.next_wait();
            let stopping = smol::future::or(
                async {
                    smol::Timer::after(wait).await;
                    false
                },
                async {
                    shutdown.wait().await;
                    true
                },
            )
            .await;
            if stopping {
                while let Ok(item) = rx.recv().await {
                    barriers.extend(gather(item, &mut group));
                }
                closed = true;
            }
        }
    }
    if unrung {
        ring(&bells);
    }
    if unsynced {
        sync(&outbox, &mut sync_spell).await;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Dims, KindSet};

    /// The writer with no sinks, committing and waking every 10 ms, never
    /// told to shut down (it ends when the channel closes).
    async fn fast_writer(rx: Inbox, outbox: SharedOutbox) -> Option<Uncommitted> {
        let (_never, shutdown) = runtime::shutdown_pair();
        let cadence = Cadence {
            flush: Duration::from_millis(10),
            deliver: Duration::from_millis(10),
        };
        write_records(rx, outbox, cadence, Vec::new(), shutdown).await
    }

    /// A full disk: commits fail, the writer keeps what it holds, says so
    /// once, and commits everything when space returns. Nothing is lost.
    #[test]
    fn the_writer_holds_records_while_the_disk_is_full_and_loses_none() {
        let dir = std::env::temp_dir().join(format!("edgemeter-full-{}", fastrand::u64(..)));
        let (mut outbox, _) = Outbox::open(&dir, 1 << 30).expect("open");
        outbox
            .register_sinks(&[("s".into(), KindSet::ALL)])
            .expect("register");
        outbox
            .append(&[Record::point("m", Dims::default(), 0, -1.0, "Count")])
            .expect("seed");
        let held = 1 + outbox.fill_to_the_cap() as i64;
        let outbox = runtime::shared_outbox(outbox);
        let (emitter, rx) = runtime::record_channel();
        let ex = LocalExecutor::new();
        let n = 3000;
        smol::block_on(ex.run(async {
            let writer = ex.spawn(fast_writer(rx, outbox.clone()));
            for i in 0..n {
                let r = Record::point(
                    "m",
                    Dims::new([("k", "a long enough value")]),
                    0,
                    f64::from(i),
                    "Count",
                );
                assert!(emitter.emit(r).await, "the writer must keep accepting");
            }
            // Let several commits fail (bounded: 20 tries of 50 ms).
            for _ in 0..20 {
                smol::Timer::after(Duration::from_millis(50)).await;
            }
            let stored = outbox.call(|o| o.stats().expect("stats").records).await;
            assert_eq!(stored, held, "nothing fits while the disk is full");
            outbox.call(|o| o.cap_pages(None)).await;
            drop(emitter);
            writer.await;
        }));
        let stats = smol::block_on(outbox.call(|o| o.stats())).expect("stats");
        assert_eq!(
            stats.records,
            held + i64::from(n),
            "every record held in memory was committed"
        );
        assert!(stats.drops.is_empty(), "{:?}", stats.drops);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Shut down while the disk is full, holding more than one commit
    /// takes: the writer takes what the sources still send, tries once
    /// more, and returns what it could not commit. It looked at its
    /// channel only while it held less than [`GROUP_MAX`], so it never saw
    /// the channel close, and retried until killed.
    #[test]
    fn shut_down_while_the_disk_is_full_the_writer_returns_what_it_could_not_commit() {
        let dir = std::env::temp_dir().join(format!("edgemeter-full-{}", fastrand::u64(..)));
        let (mut outbox, _) = Outbox::open(&dir, 1 << 30).expect("open");
        outbox.fill_to_the_cap();
        let outbox = runtime::shared_outbox(outbox);
        let (emitter, rx) = runtime::record_channel();
        let (mut trigger, shutdown) = runtime::shutdown_pair();
        let cadence = Cadence {
            flush: Duration::from_millis(10),
            deliver: Duration::from_millis(10),
        };
        let n = GROUP_MAX + 10_000;
        let ex = LocalExecutor::new();
        let uncommitted = smol::block_on(ex.run(async {
            let writer = ex.spawn(write_records(rx, outbox, cadence, Vec::new(), shutdown));
            let sent = Rc::new(std::cell::Cell::new(0));
            let counted = sent.clone();
            let source = ex.spawn(async move {
                for i in 0..n {
                    let r = Record::point("m", Dims::default(), 0, i as f64, "Count");
                    assert!(emitter.emit(r).await, "the writer stopped taking records");
                    counted.set(i + 1);
                }
            });
            // Until the writer holds a full group and the channel is full
            // too (bounded: 200 tries of 50 ms).
            let held = GROUP_MAX + runtime::RECORD_CHANNEL_CAPACITY;
            for _ in 0..200 {
                if sent.get() >= held {
                    break;
                }
                smol::Timer::after(Duration::from_millis(50)).await;
            }
            assert_eq!(sent.get(), held, "the source waits on a full writer");
            trigger.fire();
            smol::future::or(
                async {
                    source.await;
                    writer.await
                },
                async {
                    smol::Timer::after(Duration::from_secs(10)).await;
                    panic!("the source and the writer did not end within 10 s of shutdown");
                },
            )
            .await
        }));
        let u = uncommitted.expect("records were lost");
        assert_eq!(u.records, n, "every record held, none committed");
        assert!(u.why.contains("(the disk is full)"), "{}", u.why);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A full disk that gets a little room back (logs rotated) takes what
    /// fits of what the writer holds: the writer committed its whole group
    /// or nothing, so with room for part of it, it held everything until
    /// there was room for all. The rest follows once there is room, each
    /// record once and in order.
    #[test]
    fn a_disk_with_a_little_room_back_takes_what_fits_of_what_is_held() {
        let dir = std::env::temp_dir().join(format!("edgemeter-full-{}", fastrand::u64(..)));
        let (mut outbox, _) = Outbox::open(&dir, 1 << 30).expect("open");
        outbox
            .register_sinks(&[("s".to_owned(), KindSet::of(&[crate::record::Kind::Point]))])
            .expect("register");
        outbox.cap_pages(Some(0));
        let outbox = runtime::shared_outbox(outbox);
        let (emitter, rx) = runtime::record_channel();
        let n: i32 = 20_000;
        let stored = |o: &SharedOutbox| {
            let o = o.clone();
            async move { o.call(|o| o.stats().map(|s| s.records).unwrap_or(-1)).await }
        };
        let ex = LocalExecutor::new();
        smol::block_on(ex.run(async {
            let writer = ex.spawn(fast_writer(rx, outbox.clone()));
            for i in 0..n {
                let r = Record::point("m", Dims::default(), 0, i as f64, "Count");
                assert!(emitter.emit(r).await);
            }
            // Held but what the last page had room for; then room for
            // part of the rest.
            smol::Timer::after(Duration::from_millis(300)).await;
            let before = stored(&outbox).await;
            assert!(before < i64::from(n), "the disk is full: {before}");
            outbox.call(|o| o.cap_pages(Some(60))).await;
            let mut part = before;
            for _ in 0..150 {
                part = stored(&outbox).await;
                if part > before {
                    break;
                }
                smol::Timer::after(Duration::from_millis(100)).await;
            }
            assert!(
                before < part && part < i64::from(n),
                "what fits is committed: {before}, then {part} of {n}"
            );
            outbox.call(|o| o.cap_pages(None)).await;
            assert!(emitter.committed().await, "the rest once there is room");
            drop(emitter);
            assert!(writer.await.is_none(), "nothing left uncommitted");
        }));
        let outbox = runtime::shared_outbox(Outbox::open(&dir, 1 << 30).expect("open").0);
        let values = smol::block_on(outbox.call(|o| {
            let b = o.next_batch("s", 30_000).expect("claim").expect("a batch");
            b.records.iter().map(|(_, r)| r.value).collect::<Vec<f64>>()
        }));
        let want: Vec<f64> = (0..n).map(f64::from).collect();
        assert_eq!(values, want, "each record once, in order");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The writer keeps the payload buffers of what it committed, for the
    /// relay's next copies (`record::payloads`), and frees them at its first
    /// wake-up with no record since its last commit (a sync or a ring come
    /// due, or a second): an agent whose traffic stopped holds none.
    #[test]
    fn kept_payload_buffers_are_freed_once_records_stop() {
        let dir = std::env::temp_dir().join(format!("edgemeter-pool-{}", fastrand::u64(..)));
        let (outbox, _) = Outbox::open(&dir, 1 << 30).expect("open");
        let outbox = runtime::shared_outbox(outbox);
        let (emitter, rx) = runtime::record_channel();
        let ex = LocalExecutor::new();
        // The test thread runs the writer, so its pool is this thread's.
        smol::block_on(ex.run(async {
            let writer = ex.spawn(fast_writer(rx, outbox.clone()));
            for i in 0..100 {
                let r = Record {
                    kind: crate::record::Kind::Event,
                    ts_ms: i,
                    name: "log".into(),
                    dims: Dims::default(),
                    value: 0.0,
                    unit: "None".into(),
                    payload: payloads::copy_of(&[b'x'; 200]),
                };
                assert!(emitter.emit(r).await);
            }
            assert!(emitter.committed().await);
            assert_eq!(payloads::kept().0, 100, "kept once committed");
            // Bounded: 100 waits of 50 ms.
            for _ in 0..100 {
                if payloads::kept().0 == 0 {
                    break;
                }
                smol::Timer::after(Duration::from_millis(50)).await;
            }
            assert_eq!(payloads::kept(), (0, 0), "freed after the traffic stopped");
            drop(emitter);
            writer.await;
        }));
        std::fs::remove_dir_all(&dir).ok();
    }
}
