//! The delivery loop every sink runs in: claim a batch from the outbox, hand
//! it to the sink, then confirm it, retry it with backoff, or dead-letter it.
//! Sinks only implement [`Sink::deliver`]; the policy lives here once.

use std::time::Duration;

use crate::backoff::{Backoff, jittered};
use crate::config::Delivery;
use crate::outbox::Batch;
use crate::runtime::{SharedOutbox, Shutdown};
use crate::sinks::{DeliveryError, Sink};

/// Idle polls are spread by ±10 % so many edges do not line up.
const IDLE_JITTER: f64 = 0.1;

pub struct Driver {
    pub name: String,
    pub sink: Box<dyn Sink>,
    pub delivery: Delivery,
    pub outbox: SharedOutbox,
    pub shutdown: Shutdown,
    /// How long to wait when there is nothing to send.
    pub idle: Duration,
}

impl Driver {
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(self.delivery.retry_initial, self.delivery.retry_max);
        let mut last_error: Option<String> = None;
        while !self.shutdown.is_started() {
            let (name, max) = (self.name.clone(), self.delivery.batch_max_records);
            let claimed = self.outbox.call(move |o| o.next_batch(&name, max)).await;
            let batch = match claimed {
                Ok(Some(b)) => b,
                Ok(None) => {
                    if self.shutdown.sleep(jittered(self.idle, IDLE_JITTER, fastrand::f64())).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    let wait = backoff.next();
                    log::error!("sink `{}`: {e}; trying again in {:.1} s", self.name, wait.as_secs_f64());
                    if self.shutdown.sleep(wait).await {
                        return;
                    }
                    continue;
                }
            };
            match self.sink.deliver(&batch).await {
                Ok(()) => {
                    if last_error.take().is_some() {
                        log::info!(
                            "sink `{}`: delivering again after {} failed attempts",
                            self.name,
                            backoff.attempts()
                        );
                    }
                    backoff.reset();
                    self.settle(batch, None).await;
                }
                Err(DeliveryError::Reject(why)) => {
                    log::error!(
                        "sink `{}` refused batch {} ({} records) for good: {why}; kept as a dead letter \
                         (see `edgemeter outbox list`)",
                        self.name,
                        batch.seq,
                        batch.records.len()
                    );
                    self.settle(batch, Some(why)).await;
                }
                Err(DeliveryError::Retry(why)) => {
                    let wait = backoff.next();
                    if last_error.as_deref() != Some(why.as_str()) {
                        log::warn!(
                            "sink `{}`: could not deliver batch {} ({} records): {why}; retrying with backoff \
                             (next in {:.1} s); the records stay in the outbox",
                            self.name,
                            batch.seq,
                            batch.records.len(),
                            wait.as_secs_f64()
                        );
                    }
                    let (name, note) = (self.name.clone(), why.clone());
                    if let Err(e) = self.outbox.call(move |o| o.note_failure(&name, &note)).await {
                        log::error!("sink `{}`: {e}", self.name);
                    }
                    last_error = Some(why);
                    if self.shutdown.sleep(wait).await {
                        return;
                    }
                }
            }
        }
    }

    /// Confirm (`reject` = None) or dead-letter the batch in the outbox. If
    /// that fails the batch stays open and is delivered again later, which
    /// the sink contract allows.
    async fn settle(&self, batch: Batch, reject: Option<String>) {
        let result = self
            .outbox
            .call(move |o| match reject {
                None => o.ack(&batch),
                Some(why) => o.dead_letter(&batch, &why),
            })
            .await;
        if let Err(e) = result {
            log::error!(
                "sink `{}`: {e}; the batch will be delivered again (the receiver may see it twice)",
                self.name
            );
        }
    }
}
