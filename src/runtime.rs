//! What every task on the event loop shares: the shutdown signal, the
//! channel records travel on to the outbox writer, the doorbells that wake
//! idle sinks, and [`Worker`], the one way blocking work leaves the loop.

use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use smol::channel::{Receiver, Sender};

use crate::record::Record;

/// A boxed future that stays on the local executor.
pub type LocalBoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Items in flight between the sources and the outbox writer: a record, or
/// the records of one read ([`Item::Records`], bounded on their own by
/// [`RECORDS_IN_GROUPS_MAX`]). Sources wait when it is full, so a stalled
/// disk slows them instead of growing memory.
///
/// The channel's ring of slots (112 bytes each, a [`Record`] and a stamp)
/// is allocated whole and every slot initialised when it is made, so all
/// of it is resident from the start: 8,192 slots were 0.9 MB of the relay
/// benchmark's idle and peak RSS (peak 16.0-16.2 MiB; 14.8-15.0 with
/// 2,048). The writer takes everything waiting whenever it is not
/// committing, so the channel only has to hold what arrives during one
/// commit: 2,048 records are 100 ms at 20,000 a second, and the sustained
/// rate was the same (188,000-189,000 records/s against 198,000-215,000).
pub const RECORD_CHANNEL_CAPACITY: usize = 2_048;

/// Resolves once shutdown has begun; cheap to clone, one per task.
#[derive(Clone)]
pub struct Shutdown(Receiver<()>);

/// Begins shutdown when dropped or when [`Trigger::fire`] is called.
pub struct Trigger(Option<Sender<()>>);

pub fn shutdown_pair() -> (Trigger, Shutdown) {
    let (tx, rx) = smol::channel::bounded(1);
    (Trigger(Some(tx)), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&mut self) {
        // Closing the channel wakes every waiter at once.
        self.0.take();
    }
}

impl Shutdown {
    /// Wait until shutdown begins.
    pub async fn wait(&self) {
        // Nothing is ever sent: recv returns only when the channel closes.
        let _ = self.0.recv().await;
    }

    /// The next connection on `listener`, or None once shutdown begins. A
    /// failed accept (out of file descriptors, mostly: every one fails
    /// until a descriptor is freed) is tried again every 0.1 s, and said
    /// once a spell in `refusing`, as `listening` names the listener
    /// (`http_listen on 127.0.0.1:9464`), and when accepts work again.
    /// `refusing` is made [`Spell::settling`]: out of descriptors, one is
    /// freed now and then, one accept works and the next fails.
    ///
    /// [`Spell::settling`]: crate::logging::Spell::settling
    pub async fn accept(
        &self,
        listener: &smol::Async<std::net::TcpListener>,
        refusing: &mut crate::logging::Spell,
        listening: &str,
    ) -> Option<(smol::Async<std::net::TcpStream>, std::net::SocketAddr)> {
        use crate::logging::{Say, again, count, settled};
        loop {
            let accepted = smol::future::or(async { Some(listener.accept().await) }, async {
                self.wait().await;
                None
            })
            .await?;
            let now = std::time::Instant::now();
            match accepted {
                Ok(a) => {
                    if let Say::Ended { failed, lasted } = refusing.worked(now) {
                        let failed = count(failed, "try", "tries");
                        log::info!(
                            "{listening}: accepting connections again: {failed} failed {}",
                            settled(lasted)
                        );
                    }
                    return Some(a);
                }
                Err(e) => {
                    if let Say::Failure { attempts } = refusing.failed(now) {
                        log::error!(
                            "{}{listening}: accepting a connection failed: {e}; trying again every 0.1 s",
                            again(attempts)
                        );
                    }
                    // Wait rather than spin.
                    if self.sleep(Duration::from_millis(100)).await {
                        return None;
                    }
                }
            }
        }
    }

    pub fn is_started(&self) -> bool {
        self.0.is_closed()
    }

    /// Sleep for `d`, or less if shutdown begins. Returns true on shutdown.
    pub async fn sleep(&self, d: std::time::Duration) -> bool {
        smol::future::or(
            async {
                self.wait().await;
                true
            },
            async {
                smol::Timer::after(d).await;
                false
            },
        )
        .await
    }
}

/// What travels to the outbox writer.
pub enum Item {
    Record(Record),
    /// Records that arrived together, in order ([`Emitter::emit_all`]).
    Records(Vec<Record>),
    /// Commit everything sent before this now, then answer.
    Barrier(Sender<()>),
}

/// At most this many records travel in [`Item::Records`] at a time, on top
/// of the channel's [`RECORD_CHANNEL_CAPACITY`] items: the channel counts
/// items, not records, so this is what keeps the records in flight bounded
/// (at most twice the capacity) when the writer falls behind.
pub const RECORDS_IN_GROUPS_MAX: usize = RECORD_CHANNEL_CAPACITY;

/// Spawns tasks on the agent's one executor: what a source that serves many
/// connections or streams uses, instead of an executor of its own.
#[derive(Clone)]
pub struct Spawner(Weak<smol::LocalExecutor<'static>>);

impl Spawner {
    pub fn new(ex: &Rc<smol::LocalExecutor<'static>>) -> Spawner {
        Spawner(Rc::downgrade(ex))
    }

    pub fn spawn<T: 'static>(&self, f: impl Future<Output = T> + 'static) -> smol::Task<T> {
        self.0
            .upgrade()
            .expect("the agent's executor outlives every task it runs")
            .spawn(f)
    }
}

/// Where sources put records. Cloned per source.
#[derive(Clone)]
pub struct Emitter {
    tx: Sender<Item>,
    /// Records in [`Item::Records`] sent and not yet received.
    grouped: Arc<AtomicUsize>,
}

/// The outbox writer's end of the record channel.
pub struct Inbox {
    rx: Receiver<Item>,
    grouped: Arc<AtomicUsize>,
}

pub fn record_channel() -> (Emitter, Inbox) {
    let (tx, rx) = smol::channel::bounded(RECORD_CHANNEL_CAPACITY);
    let grouped = Arc::new(AtomicUsize::new(0));
    (
        Emitter {
            tx,
            grouped: grouped.clone(),
        },
        Inbox { rx, grouped },
    )
}

impl Emitter {
    /// Hand a record to the outbox writer, waiting while the channel is full.
    /// Returns false once the writer has stopped (shutdown): drop the record
    /// and return.
    pub async fn emit(&self, record: Record) -> bool {
        self.tx.send(Item::Record(record)).await.is_ok()
    }

    /// Hand over all of `records` (left empty), as one item when the bound
    /// on grouped records allows, else one by one (which waits while the
    /// channel is full). One item is one wake-up of the writer and one lock
    /// of the channel's waiters on each side, instead of one per record: at
    /// a relay's 17 messages a read, 7.5 % of the reading thread in `perf`
    /// before, 1.9 % after.
    /// False once the writer has stopped, as for [`Emitter::emit`].
    pub async fn emit_all(&self, records: &mut Vec<Record>) -> bool {
        let n = records.len();
        if n > 1 {
            if self.grouped.fetch_add(n, Ordering::Relaxed) + n <= RECORDS_IN_GROUPS_MAX {
                // An exact-size copy: `records` keeps its buffer for the
                // next read; the writer frees this one once it has taken
                // the records out.
                let mut group = Vec::with_capacity(n);
                group.append(records);
                return self.tx.send(Item::Records(group)).await.is_ok();
            }
            self.grouped.fetch_sub(n, Ordering::Relaxed);
        }
        for r in records.drain(..) {
            if !self.emit(r).await {
                return false;
            }
        }
        true
    }

    /// Wait until everything emitted before is committed to the outbox (the
    /// writer commits at once rather than at its next flush). For sources
    /// whose own progress marker must never run ahead of the outbox. False
    /// if the writer stopped first (shutdown, or commits failing at exit).
    pub async fn committed(&self) -> bool {
        let (tx, rx) = smol::channel::bounded(1);
        self.tx.send(Item::Barrier(tx)).await.is_ok() && rx.recv().await.is_ok()
    }
}

impl Inbox {
    /// The next item, waiting for one; an error once every emitter is gone.
    pub async fn recv(&self) -> Result<Item, smol::channel::RecvError> {
        self.rx.recv().await.map(|item| self.taken(item))
    }

    /// The next item if one is waiting.
    pub fn try_recv(&self) -> Result<Item, smol::channel::TryRecvError> {
        self.rx.try_recv().map(|item| self.taken(item))
    }

    fn taken(&self, item: Item) -> Item {
        if let Item::Records(group) = &item {
            self.grouped.fetch_sub(group.len(), Ordering::Relaxed);
        }
        item
    }
}

/// Wakes a sink's delivery loop when the writer has committed something
/// new, so an idle sink waits instead of polling SQLite.
#[derive(Clone)]
pub struct Doorbell(Sender<()>);

/// The sink's side of a [`Doorbell`].
pub struct Wakeup(Receiver<()>);

pub fn doorbell() -> (Doorbell, Wakeup) {
    // One pending ring is enough: it means "look again".
    let (tx, rx) = smol::channel::bounded(1);
    (Doorbell(tx), Wakeup(rx))
}

impl Doorbell {
    pub fn ring(&self) {
        let _ = self.0.try_send(());
    }
}

impl Wakeup {
    /// Wait for a ring, at most `timeout`.
    pub async fn wait(&self, timeout: std::time::Duration) {
        smol::future::or(
            async {
                if self.0.recv().await.is_err() {
                    // The writer is gone (no sources, or shutting down): a
                    // closed channel answers at once, which would make every
                    // idle sink spin. Only the timeout may end the wait.
                    smol::future::pending::<()>().await;
                }
            },
            async {
                smol::Timer::after(timeout).await;
            },
        )
        .await
    }
}

/// A thread of our own for blocking work, started when a job comes and
/// gone after [`WORKER_IDLE`] without one: the bounded, named alternative
/// to a blocking pool (`blocking` 1.7, behind `smol::unblock`, never shrinks
/// its pool below its limit of 500, so its threads stay once started).
/// Jobs run one at a time, in order.
pub struct Worker {
    name: String,
    state: Arc<Mutex<Option<mpsc::Sender<Job>>>>,
}

type Job = Box<dyn FnOnce() + Send>;

pub const WORKER_IDLE: Duration = Duration::from_secs(1);

impl Worker {
    pub fn new(name: impl Into<String>) -> Worker {
        Worker {
            name: name.into(),
            state: Arc::new(Mutex::new(None)),
        }
    }

    /// Run `f` on the worker thread and wait for its result without blocking
    /// the event loop.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = smol::channel::bounded(1);
        let job: Job = Box::new(move || {
            let _ = tx.try_send(f());
        });
        self.submit(job);
        // The job always answers unless it panicked, and a panic in our own
        // blocking code is a bug that must not be swallowed.
        rx.recv().await.expect("a worker job panicked")
    }

    fn submit(&self, job: Job) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let job = match state.as_ref() {
            None => job,
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                // The thread died (a panicking job): start another.
                Err(mpsc::SendError(job)) => job,
            },
        };
        let (tx, rx) = mpsc::channel::<Job>();
        let shared = self.state.clone();
        let spawned = std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || {
                loop {
                    match rx.recv_timeout(WORKER_IDLE) {
                        Ok(job) => job(),
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            // Decide to exit under the lock, so that no job can be
                            // sent to a receiver that is about to go away.
                            let mut state = shared.lock().unwrap_or_else(|p| p.into_inner());
                            match rx.try_recv() {
                                Ok(job) => {
                                    drop(state);
                                    job();
                                }
                                Err(_) => {
                                    *state = None;
                                    return;
                                }
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            });
        match spawned {
            Ok(_) => {
                tx.send(job).expect("the new worker holds the receiver");
                *state = Some(tx);
            }
            Err(e) => {
                // Out of threads: run the job here rather than lose it. The
                // loop stalls for its duration, which beats dropping data.
                log::error!(
                    "cannot start the `{}` worker thread: {e}; running its job on the event loop",
                    self.name
                );
                drop(state);
                job();
            }
        }
    }
}

/// A value that lives on its own worker thread: every call runs there, in
/// arrival order, so blocking IO on it (SQLite's fsyncs, a PostgreSQL round
/// trip) never stalls the event loop.
pub struct OnWorker<T>(Rc<Worker>, Arc<Mutex<T>>);

impl<T> Clone for OnWorker<T> {
    fn clone(&self) -> Self {
        OnWorker(self.0.clone(), self.1.clone())
    }
}

impl<T: Send + 'static> OnWorker<T> {
    pub fn new(thread_name: &str, value: T) -> OnWorker<T> {
        OnWorker(
            Rc::new(Worker::new(thread_name)),
            Arc::new(Mutex::new(value)),
        )
    }

    /// The thread the value lives on, for other small jobs that may share
    /// it (they run in turn with this value's calls).
    pub fn worker(&self) -> Rc<Worker> {
        self.0.clone()
    }

    pub async fn call<R: Send + 'static>(&self, f: impl FnOnce(&mut T) -> R + Send + 'static) -> R {
        let inner = self.1.clone();
        self.0
            .run(move || {
                // A panic while holding the lock would leave a half-done Rust
                // value, but the database state is transactional: carry on.
                let mut guard = inner.lock().unwrap_or_else(|poison| poison.into_inner());
                f(&mut guard)
            })
            .await
    }
}

/// The outbox, shared by the writer and the sink tasks, on the `outbox` thread.
pub type SharedOutbox = OnWorker<crate::outbox::Outbox>;

pub fn shared_outbox(outbox: crate::outbox::Outbox) -> SharedOutbox {
    OnWorker::new("outbox", outbox)
}

/// How often [`trim_heap`] runs in a long-lived process.
pub const HEAP_TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Give the allocator's free pages back to the system. glibc keeps memory
/// freed inside its arenas: in the upstream soak with a sink the live heap
/// stays flat at about 6 MB (heaptrack) while the resident set creeps.
/// `malloc_trim` returns whole free pages, in milliseconds; in one
/// 40-minute soak it lowered the final resident set from 16,200 to 15,392
/// KiB, but it does not stop the creep (fragmented pages stay). Other C
/// libraries: nothing to do.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only releases free memory of the allocator;
        // it is thread-safe and touches no live allocation.
        unsafe {
            malloc_trim(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// Regression: an idle agent with no sources busy-looped its sinks,
    /// because the writer's doorbells closed and `recv` on a closed channel
    /// returns at once. The blocking pool grew a thread per spin.
    #[test]
    fn a_wakeup_whose_doorbell_is_gone_waits_for_its_timeout() {
        let (bell, wakeup) = doorbell();
        drop(bell);
        let t = Instant::now();
        smol::block_on(wakeup.wait(Duration::from_millis(150)));
        assert!(
            t.elapsed() >= Duration::from_millis(150),
            "returned after {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn a_ring_wakes_at_once_and_rings_do_not_pile_up() {
        let (bell, wakeup) = doorbell();
        bell.ring();
        bell.ring(); // the second ring is absorbed: one pending ring means "look again"
        let t = Instant::now();
        smol::block_on(wakeup.wait(Duration::from_secs(10)));
        assert!(t.elapsed() < Duration::from_secs(5));
        let t = Instant::now();
        smol::block_on(wakeup.wait(Duration::from_millis(100)));
        assert!(
            t.elapsed() >= Duration::from_millis(100),
            "no ring was left over"
        );
    }

    fn numbered(from: usize, n: usize) -> Vec<Record> {
        (from..from + n)
            .map(|i| {
                let dims = crate::record::Dims::default();
                Record::point("m", dims, i as i64, i as f64, "Count")
            })
            .collect()
    }

    /// Records handed over together travel as one item while the records
    /// in such items stay within `RECORDS_IN_GROUPS_MAX`; past it they go
    /// one by one, which waits on the channel's bound, so a writer that
    /// falls behind never lets memory grow past twice the channel's size.
    /// Order is kept either way.
    #[test]
    fn records_handed_over_together_are_one_item_within_a_bound() {
        let (emitter, inbox) = record_channel();
        let half = RECORDS_IN_GROUPS_MAX / 2;
        let mut sent = 0;
        smol::block_on(async {
            for n in [half, half, 3] {
                let mut rs = numbered(sent, n);
                assert!(emitter.emit_all(&mut rs).await);
                assert!(rs.is_empty(), "handed over whole");
                sent += n;
            }
            let mut one = numbered(sent, 1);
            assert!(emitter.emit_all(&mut one).await);
            sent += 1;
        });
        let mut shapes = Vec::new();
        let mut got = Vec::new();
        while let Ok(item) = inbox.try_recv() {
            match item {
                Item::Records(rs) => {
                    shapes.push(rs.len());
                    got.extend(rs);
                }
                Item::Record(r) => {
                    shapes.push(1);
                    got.push(r);
                }
                Item::Barrier(_) => panic!("no barrier was sent"),
            }
        }
        assert_eq!(
            shapes,
            [half, half, 1, 1, 1, 1],
            "two groups fill the bound; what follows goes one by one"
        );
        let order: Vec<i64> = got.iter().map(|r| r.ts_ms).collect();
        assert_eq!(order, (0..sent as i64).collect::<Vec<_>>());
        assert_eq!(
            emitter.grouped.load(Ordering::Relaxed),
            0,
            "received groups are off the count"
        );
        // With the count back to zero, groups travel as one item again.
        let mut rs = numbered(0, 5);
        assert!(smol::block_on(emitter.emit_all(&mut rs)));
        assert!(matches!(inbox.try_recv(), Ok(Item::Records(g)) if g.len() == 5));
        // A writer that has stopped: false, as for `emit`.
        drop(inbox);
        let mut rs = numbered(0, 5);
        assert!(!smol::block_on(emitter.emit_all(&mut rs)));
    }
}
