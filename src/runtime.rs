//! What every task on the event loop shares: the shutdown signal, the
//! channel records travel on to the outbox writer, and the one way blocking
//! outbox work leaves the loop.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use smol::channel::{Receiver, Sender};

use crate::outbox::Outbox;
use crate::record::Record;

/// A boxed future that stays on the local executor.
pub type LocalBoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Records in flight between the sources and the outbox writer. Sources wait
/// when it is full, so a stalled disk slows them instead of growing memory.
pub const RECORD_CHANNEL_CAPACITY: usize = 16_384;

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

/// Where sources put records. Cloned per source.
#[derive(Clone)]
pub struct Emitter(Sender<Record>);

pub fn record_channel() -> (Emitter, Receiver<Record>) {
    let (tx, rx) = smol::channel::bounded(RECORD_CHANNEL_CAPACITY);
    (Emitter(tx), rx)
}

impl Emitter {
    /// Hand a record to the outbox writer, waiting while the channel is full.
    /// Returns false once the writer has stopped (shutdown): drop the record
    /// and return.
    pub async fn emit(&self, record: Record) -> bool {
        self.0.send(record).await.is_ok()
    }
}

/// The outbox, shared by the writer and the sink tasks. Every call runs on
/// the `blocking` pool (`smol::unblock`) so SQLite's fsyncs never stall the
/// event loop; the mutex serialises them, so at most one pool thread per
/// waiting task exists, and none at idle (the pool's threads exit when idle).
#[derive(Clone)]
pub struct SharedOutbox(Arc<Mutex<Outbox>>);

impl SharedOutbox {
    pub fn new(outbox: Outbox) -> SharedOutbox {
        SharedOutbox(Arc::new(Mutex::new(outbox)))
    }

    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Outbox) -> T + Send + 'static,
    ) -> T {
        let inner = self.0.clone();
        smol::unblock(move || {
            // A panic while holding the lock would leave a half-done Rust
            // value, but the SQLite state is transactional: carry on.
            let mut guard = inner.lock().unwrap_or_else(|poison| poison.into_inner());
            f(&mut guard)
        })
        .await
    }
}
