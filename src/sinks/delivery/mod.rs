//! The delivery loop every sink runs in: claim a batch from the outbox, hand
//! it to the sink, then confirm it, retry it with backoff, or dead-letter it.
//! Sinks only implement [`Sink::deliver`]; the policy lives here once.
//! Tries that fail and are retried are said as one spell however often
//! they flap ([`outage`]).

use std::time::{Duration, Instant};

use crate::backoff::{Backoff, jittered};
use crate::clock::{ClockSay, PeerClock, PeerReading, off_by, stamped_off};
use crate::logging::{Say, Spell, again, count, settled};
use crate::outbox::Batch;
use crate::runtime::{SharedOutbox, Shutdown, Wakeup};
use crate::sinks::{DeliveryError, Sink};
use outage::{Ended, Failed, Outage};

pub mod outage; // what the log says of tries that fail, however often

/// How the shared delivery loop treats one sink.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub batch_max_records: usize,
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

/// With nothing to send, a sink waits for the writer's doorbell; it looks
/// anyway this often, to notice dead letters `edgemeter outbox retry`
/// marked from another process.
pub const IDLE_RECHECK: Duration = Duration::from_secs(5);
/// Idle rechecks are spread by ±10 % so many edges do not line up.
const IDLE_JITTER: f64 = 0.1;
/// A reading of the receiver's clock is kept for `status` when it differs
/// from the one kept by more than its own error, or when the one kept is
/// this old: not a write to the outbox at every delivery.
const PEER_CLOCK_KEEP_MS: i64 = 2_000;
const PEER_CLOCK_KEEP_EVERY: Duration = Duration::from_secs(60);

enum Settle {
    /// Delivered, less these (record id, why).
    Delivered(Vec<(i64, String)>),
    /// Refused whole, for this reason.
    Refused(String),
}

pub struct Driver {
    pub name: String,
    pub sink: Box<dyn Sink>,
    pub delivery: Delivery,
    pub outbox: SharedOutbox,
    pub shutdown: Shutdown,
    /// Rung by the outbox writer after each commit.
    pub wakeup: Wakeup,
    /// The longest wait when there is nothing to send.
    pub idle: Duration,
}

impl Driver {
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(self.delivery.retry_initial, self.delivery.retry_max);
        // Tries that fail and are retried: said as one spell, however
        // often it flaps.
        let mut outage = Outage::default();
        // Credentials refused: since when (for `status`), said once a
        // spell. It settles: where one receiver of two refuses (a load
        // balancer with one backend not yet given a rotated key), every
        // other try is refused, and that is one spell, not two lines a try.
        let mut refused_since: Option<i64> = None;
        let mut refused = Spell::settling();
        // Claims failing (a claim writes: a full disk fails every one; a
        // nearly full one, one and not the next). It ends once no claim
        // failed for Spell::SETTLE: an idle sink still claims every
        // IDLE_RECHECK, so the end is said.
        let mut claiming = Spell::settling();
        // What the receiver's answers say of our clock, and the reading
        // last kept for `status`.
        let mut clock = PeerClock::default();
        let mut kept: Option<(i64, Instant)> = None;
        while !self.shutdown.is_started() {
            let (name, max) = (self.name.clone(), self.delivery.batch_max_records);
            let claimed = self.outbox.call(move |o| o.next_batch(&name, max)).await;
            if claimed.is_ok()
                && let Say::Ended { failed, lasted } = claiming.worked(Instant::now())
            {
                let failed = count(failed, "failed claim", "failed claims");
                log::info!(
                    "sink `{}`: the outbox gives batches again, after {failed} {}",
                    self.name,
                    settled(lasted)
                );
            }
            let batch = match claimed {
                Ok(Some(b)) => b,
                Ok(None) => {
                    let mut wait = jittered(self.idle, IDLE_JITTER, fastrand::f64());
                    // Nothing more to send: end the spells all the same.
                    for at in [outage.settles_at(), refused.ends_at()]
                        .into_iter()
                        .flatten()
                    {
                        wait = wait.min(at.saturating_duration_since(Instant::now()));
                    }
                    smol::future::or(self.shutdown.wait(), self.wakeup.wait(wait)).await;
                    if let Some(ended) = outage.settled(Instant::now()) {
                        self.say_delivering_again(&ended);
                    }
                    if let Say::Ended { failed, lasted } = refused.quiet(Instant::now()) {
                        refused_since = None;
                        self.say_credentials_accepted(failed, &settled(lasted));
                    }
                    continue;
                }
                Err(e) => {
                    let wait = backoff.next_wait();
                    if let Say::Failure { attempts } = claiming.failed(Instant::now()) {
                        log::error!(
                            "sink `{}`: {}{e}; trying again with backoff (next in {:.1} s)",
                            self.name,
                            again(attempts),
                            wait.as_secs_f64()
                        );
                    }
                    if self.shutdown.sleep(wait).await {
                        return;
                    }
                    continue;
                }
            };
            let progress = crate::sinks::Progress::new(self.outbox.clone(), &batch);
            let result = self.sink.deliver(&batch, &progress).await;
            if let Some(offset) = self.sink.peer_clock().and_then(PeerReading::take) {
                self.clock_read(offset, &mut clock, &mut kept).await;
            }
            match result {
                Ok(delivered) => {
                    if let Say::Ended { failed, lasted } = refused.worked(Instant::now()) {
                        refused_since = None;
                        self.say_credentials_accepted(failed, &settled(lasted));
                    }
                    if let Some(ended) = outage.worked(Instant::now()) {
                        self.say_delivering_again(&ended);
                    }
                    backoff.reset();
                    if !delivered.rejected.is_empty() {
                        log::warn!(
                            "sink `{}` cannot take {} of the {} records of batch {} (e.g. {}); kept as a dead letter",
                            self.name,
                            delivered.rejected.len(),
                            batch.records.len(),
                            batch.seq,
                            delivered.rejected[0].1
                        );
                    }
                    if !delivered.skipped.is_empty() {
                        self.count_skipped(&batch, &delivered.skipped).await;
                    }
                    let counts = [
                        ("requests", delivered.requests),
                        ("bytes_sent", delivered.bytes),
                    ];
                    self.count(&counts).await;
                    self.settle(batch, Settle::Delivered(delivered.rejected))
                        .await;
                }
                Err(DeliveryError::Reject(why)) => {
                    log::error!(
                        "sink `{}` refused batch {} ({} records) for good: {why}; kept as a dead letter \
                         (see `edgemeter outbox list`)",
                        self.name,
                        batch.seq,
                        batch.records.len()
                    );
                    self.settle(batch, Settle::Refused(why)).await;
                }
                Err(DeliveryError::Unauthorized(m)) => {
                    self.count(&[("credentials_refused", 1)]).await;
                    let since = *refused_since.get_or_insert_with(crate::clock::now_ms);
                    let why = format!(
                        "credentials refused since {} ({m}); read again before each try, nothing is dead-lettered",
                        crate::clock::iso8601(since)
                    );
                    let wait = backoff.next_wait();
                    if let Say::Failure { .. } = refused.failed(Instant::now()) {
                        log::error!(
                            "sink `{}`: {why}; next try in {:.1} s (fix the credentials; delivery resumes by itself)",
                            self.name,
                            wait.as_secs_f64()
                        );
                    }
                    self.note_failure(&why).await;
                    if self.shutdown.sleep(wait).await {
                        return;
                    }
                }
                Err(e @ (DeliveryError::Retry(_) | DeliveryError::Throttled(_))) => {
                    let key = if matches!(e, DeliveryError::Throttled(_)) {
                        "throttled"
                    } else {
                        "retried"
                    };
                    self.count(&[(key, 1)]).await;
                    let why = e.to_string();
                    let wait = backoff.next_wait();
                    match outage.failed(&why, Instant::now()) {
                        Failed::Said => log::warn!(
                            "sink `{}`: could not deliver batch {} ({} records): {why}; retrying with backoff \
                             (next in {:.1} s); the records stay in the outbox. Said again for another error, \
                             every 10 minutes while tries fail, and once they work again",
                            self.name,
                            batch.seq,
                            batch.records.len(),
                            wait.as_secs_f64()
                        ),
                        Failed::Reminder { failed, lasted } => log::warn!(
                            "sink `{}`: still failing: {failed} tries have failed since this began, {} ago \
                             (latest: batch {}: {why}); the records stay in the outbox",
                            self.name,
                            crate::clock::rounded_duration(lasted.as_millis() as i64),
                            batch.seq
                        ),
                        Failed::Nothing => {}
                    }
                    self.note_failure(&why).await;
                    if self.shutdown.sleep(wait).await {
                        return;
                    }
                }
            }
        }
        if let Some(ended) = outage.stopping(Instant::now()) {
            self.say_delivering_again(&ended);
        }
        if let Say::Ended { failed, lasted } = refused.stopped(Instant::now()) {
            // At a stop, maybe before it settled.
            let over = crate::clock::rounded_duration(lasted.as_millis() as i64);
            self.say_credentials_accepted(failed, &format!("over {over}"));
        }
    }

    fn say_credentials_accepted(&self, failed: u64, over: &str) {
        log::info!(
            "sink `{}`: the credentials are accepted again, after {} {over}",
            self.name,
            count(failed, "refused try", "refused tries"),
        );
    }

    fn say_delivering_again(&self, ended: &Ended) {
        log::info!(
            "sink `{}`: delivering again after {} failed attempts over {}; each batch stayed in the outbox until a try delivered it",
            self.name,
            ended.failed,
            crate::clock::rounded_duration(ended.lasted.as_millis() as i64)
        );
    }

    /// Say what a reading of the receiver's clock tells, when that changes,
    /// and keep it for `status`. A wrong clock stamps everything the agent
    /// records (a Raspberry Pi has no battery-backed clock), and nothing
    /// else on the machine may say so.
    async fn clock_read(
        &self,
        offset: i64,
        clock: &mut PeerClock,
        kept: &mut Option<(i64, Instant)>,
    ) {
        match clock.reading(offset) {
            ClockSay::Off(o) => log::warn!(
                "sink `{}`: this machine's clock is {} the receiver's (the Date of its answer): what the agent records is stamped with this clock, so it is sent stamped {} than it happened. Set the clock right: enable network time (`timedatectl set-ntp true`); a Raspberry Pi has no battery-backed clock and needs it after every boot. Said again only if it changes; `edgemeter status` shows it",
                self.name,
                off_by(o),
                stamped_off(o)
            ),
            ClockSay::Agrees { was } => log::info!(
                "sink `{}`: this machine's clock agrees with the receiver's again (it was {} it); what was stamped while it was off keeps that time",
                self.name,
                off_by(was)
            ),
            ClockSay::Nothing => {}
        }
        let now = Instant::now();
        let keep = kept.is_none_or(|(k, at)| {
            (offset - k).abs() > PEER_CLOCK_KEEP_MS
                || now.duration_since(at) >= PEER_CLOCK_KEEP_EVERY
        });
        if !keep {
            return;
        }
        *kept = Some((offset, now));
        let name = self.name.clone();
        if let Err(e) = self
            .outbox
            .call(move |o| o.note_peer_clock(&name, offset))
            .await
        {
            log::warn!("sink `{}`: {e}", self.name);
        }
    }

    /// Keep the failure for `status` (last error, when, how many).
    async fn note_failure(&self, why: &str) {
        let (name, note) = (self.name.clone(), why.to_owned());
        if let Err(e) = self
            .outbox
            .call(move |o| o.note_failure(&name, &note))
            .await
        {
            log::error!("sink `{}`: {e}", self.name);
        }
    }

    /// Records the receiver can never take and that are not worth keeping:
    /// counted under drops by reason (`status` shows them), and said once
    /// per batch.
    async fn count_skipped(&self, batch: &Batch, skipped: &[(i64, String)]) {
        let mut reasons: Vec<(String, i64)> = Vec::new();
        for (_, why) in skipped {
            match reasons.iter_mut().find(|(w, _)| w == why) {
                Some((_, n)) => *n += 1,
                None => reasons.push((why.clone(), 1)),
            }
        }
        for (why, n) in &reasons {
            log::info!(
                "sink `{}`: skipped {n} of the {} records of batch {}: {why}; counted under drops",
                self.name,
                batch.records.len(),
                batch.seq
            );
        }
        let name = self.name.clone();
        let result = self
            .outbox
            .call(move |o| {
                reasons
                    .iter()
                    .try_for_each(|(why, n)| o.count_skipped(&name, why, *n))
            })
            .await;
        if let Err(e) = result {
            log::warn!("sink `{}`: {e}", self.name);
        }
    }

    async fn count(&self, deltas: &[(&'static str, i64)]) {
        let (name, deltas) = (self.name.clone(), deltas.to_vec());
        if let Err(e) = self.outbox.call(move |o| o.bump(&name, &deltas)).await {
            log::warn!("sink `{}`: {e}", self.name);
        }
    }

    /// Confirm or dead-letter the batch in the outbox. If that fails the
    /// batch stays open and is delivered again later, which the sink
    /// contract allows.
    async fn settle(&self, batch: Batch, how: Settle) {
        let result = self
            .outbox
            .call(move |o| match how {
                Settle::Delivered(rejected) => o.ack_with_rejects(&batch, &rejected),
                Settle::Refused(why) => o.dead_letter(&batch, &why),
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

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;

    use super::*;
    use crate::outbox::Outbox;
    use crate::record::{Dims, KindSet, Record};
    use crate::runtime::{LocalBoxFuture, doorbell, shutdown_pair};
    use crate::sinks::Delivered;

    /// A sink that answers from a script, then accepts everything; it keeps
    /// what it accepted and every seq it was offered.
    struct Scripted {
        script: VecDeque<Result<Delivered, DeliveryError>>,
        log: Rc<RefCell<Vec<(i64, bool)>>>,
        kept: Rc<RefCell<Vec<f64>>>,
    }

    impl Sink for Scripted {
        fn accepts(&self) -> KindSet {
            KindSet::ALL
        }
        fn deliver<'a>(
            &'a mut self,
            batch: &'a Batch,
            _progress: &'a crate::sinks::Progress,
        ) -> LocalBoxFuture<'a, Result<Delivered, DeliveryError>> {
            self.log.borrow_mut().push((batch.seq, batch.redelivered));
            let answer = self.script.pop_front().unwrap_or(Ok(Delivered::all()));
            if answer.is_ok() {
                self.kept
                    .borrow_mut()
                    .extend(batch.records.iter().map(|(_, r)| r.value));
            }
            Box::pin(async move { answer })
        }
    }

    /// Run a driver over `n` points with a scripted sink until it was
    /// offered `offers` batches (bounded: 200 polls of 10 ms), then stop it.
    /// Returns the outbox, the offers (seq, retry) and the values kept.
    fn drive(
        tag: &str,
        n: i32,
        batch_max_records: usize,
        script: Vec<Result<Delivered, DeliveryError>>,
        offers: usize,
    ) -> (
        crate::runtime::SharedOutbox,
        Vec<(i64, bool)>,
        Vec<f64>,
        std::path::PathBuf,
    ) {
        let dir = std::env::temp_dir().join(format!("edgemeter-{tag}-{}", fastrand::u64(..)));
        let (mut outbox, _) = Outbox::open(&dir, 1 << 20).expect("open");
        outbox
            .register_sinks(&[("s".into(), KindSet::ALL)])
            .expect("register");
        let recs: Vec<Record> = (0..n)
            .map(|i| Record::point("m", Dims::default(), 0, f64::from(i), "Count"))
            .collect();
        outbox.append(&recs).expect("append");
        let outbox = crate::runtime::shared_outbox(outbox);
        let log = Rc::new(RefCell::new(Vec::new()));
        let kept = Rc::new(RefCell::new(Vec::new()));
        let sink = Scripted {
            script: VecDeque::from(script),
            log: log.clone(),
            kept: kept.clone(),
        };
        let (mut trigger, shutdown) = shutdown_pair();
        let driver = Driver {
            name: "s".into(),
            sink: Box::new(sink),
            delivery: Delivery {
                batch_max_records,
                retry_initial: Duration::from_millis(5),
                retry_max: Duration::from_millis(20),
            },
            outbox: outbox.clone(),
            shutdown,
            wakeup: doorbell().1,
            idle: Duration::from_millis(10),
        };
        let ex = smol::LocalExecutor::new();
        smol::block_on(ex.run(async {
            let task = ex.spawn(driver.run());
            for _ in 0..200 {
                if log.borrow().len() >= offers {
                    break;
                }
                smol::Timer::after(Duration::from_millis(10)).await;
            }
            // Let the last answer settle in the outbox.
            smol::Timer::after(Duration::from_millis(50)).await;
            trigger.fire();
            task.await;
        }));
        let (log, kept) = (log.borrow().clone(), kept.borrow().clone());
        (outbox, log, kept, dir)
    }

    #[test]
    fn retries_then_dead_letters_then_delivers_everything_once() {
        let (outbox, log, kept, dir) = drive(
            "delivery",
            6,
            2,
            vec![
                Err(DeliveryError::Retry("503".into())),
                Err(DeliveryError::Retry("throttled".into())),
                Ok(Delivered::all()),
                Err(DeliveryError::Reject("400 bad datum".into())),
            ],
            5,
        );
        // seq 1 offered three times (two retries), seq 2 refused, seq 3 delivered.
        assert_eq!(
            log,
            vec![(1, false), (1, true), (1, true), (2, false), (3, false)]
        );
        assert_eq!(kept, vec![0.0, 1.0, 4.0, 5.0]);
        let (stats, dead) = smol::block_on(outbox.call(|o| (o.stats(), o.dead_letters(None))));
        let (stats, dead) = (stats.expect("stats"), dead.expect("dead letters"));
        assert_eq!(stats.records, 0);
        assert_eq!(stats.sinks[0].delivered_records, 4);
        assert_eq!(stats.sinks[0].failures, 3, "two retries and one refusal");
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].seq, dead[0].count, dead[0].error.as_str()),
            (2, 2, "400 bad datum")
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Records the receiver can never take and that are not worth keeping
    /// (too old for CloudWatch) are let go and counted under the sink's
    /// drops; the rest of the batch is delivered; nothing is dead-lettered.
    #[test]
    fn skipped_records_are_counted_as_drops_not_dead_letters() {
        let too_old = "older than 14 days (CloudWatch takes at most two weeks back)";
        let (outbox, log, _, dir) = drive(
            "skipped",
            3,
            10,
            vec![Ok(Delivered {
                skipped: vec![(1, too_old.into()), (2, too_old.into())],
                ..Delivered::all()
            })],
            1,
        );
        assert_eq!(log, vec![(1, false)]);
        let (stats, dead) = smol::block_on(outbox.call(|o| (o.stats(), o.dead_letters(None))));
        let (stats, dead) = (stats.expect("stats"), dead.expect("dead letters"));
        assert_eq!(stats.records, 0, "the batch is settled");
        assert!(dead.is_empty(), "{dead:?}");
        assert_eq!(
            stats.drops,
            vec![(too_old.to_owned(), "s".to_owned(), 2)],
            "counted under the sink's drops"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
