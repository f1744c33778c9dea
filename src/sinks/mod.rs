//! Sinks: where observations go once they are safe in the outbox.
//!
//! # The contract every sink keeps
//! - A sink MUST have a raw config struct mirroring its TOML table with
//!   `deny_unknown_fields`, validated by `Config::parse` into typed values
//!   with every problem reported. `type`, `name` and the delivery keys
//!   (`batch_max_records`, `retry_initial_secs`, `retry_max_secs`) are taken
//!   off by `config.rs` and handled by the shared delivery loop.
//! - A sink MUST be registered in [`TYPES`], [`parse_config`] and [`build`],
//!   and nowhere else.
//! - A sink MUST say which record kinds it takes ([`Sink::accepts`]); the
//!   outbox passes over the others for it.
//! - [`Sink::deliver`] MUST return `Ok` only once the receiver holds the
//!   whole batch durably, less the records it lists in
//!   [`Delivered::rejected`] (those the receiver can never take, with the
//!   reason); the outbox deletes on `Ok` and dead-letters the rejected.
//! - It MUST return [`DeliveryError::Retry`] for anything that may pass by
//!   itself (network, throttling, 5xx, a full disk) and
//!   [`DeliveryError::Reject`] only when sending the same batch again can
//!   never succeed (the receiver refused its content); rejected batches
//!   become dead letters.
//! - It MUST tolerate redelivery: the same `(sink, seq)` may arrive again
//!   after a crash or a lost acknowledgement (`batch.redelivered`). It SHOULD
//!   pass the seq on as an idempotency key, or repair what it wrote.
//! - Blocking calls (HTTP, fsync) MUST run off the event loop, on the
//!   sink's own [`crate::runtime::Worker`]; a sink has at most one batch in
//!   flight.
//! - A sink that talks HTTP SHOULD read its receiver's `Date` header into
//!   [`Sink::peer_clock`]: a wrong clock stamps everything the agent
//!   records, and the receiver's answers are where the agent can see it.
//! - Error texts MUST NOT contain secrets (tokens, keys, signatures): they
//!   are logged and stored in the outbox.

pub mod cloudwatch_logs;
pub mod cloudwatch_metrics;
pub mod csv;
pub mod delivery;
pub mod upstream;

use std::fmt;
use std::path::Path;

use toml::Spanned;
use toml::de::DeTable;

use crate::outbox::Batch;
use crate::problems::Problems;
use crate::record::KindSet;
use crate::runtime::LocalBoxFuture;

/// The `type` values a `[[sink]]` may have.
pub const TYPES: &[&str] = &["csv", "cloudwatch_metrics", "cloudwatch_logs", "upstream"];

#[derive(Debug, Clone, PartialEq)]
pub enum SinkConfig {
    Csv(csv::Config),
    CloudWatchMetrics(cloudwatch_metrics::Config),
    CloudWatchLogs(cloudwatch_logs::Config),
    Upstream(upstream::Config),
}

#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryError {
    /// Try the same batch again later.
    Retry(String),
    /// The receiver asked us to slow down: back off, then the same batch.
    #[cfg_attr(not(test), allow(dead_code))]
    Throttled(String),
    /// The receiver refused our credentials, not the batch: back off and
    /// try again (the credentials are read again each time); never a dead
    /// letter, since new credentials may arrive at any moment.
    Unauthorized(String),
    /// The receiver refused this batch for good: dead-letter it. (The csv
    /// sink never does; network sinks and the delivery tests do.)
    #[cfg_attr(not(test), allow(dead_code))]
    Reject(String),
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliveryError::Retry(m)
            | DeliveryError::Throttled(m)
            | DeliveryError::Unauthorized(m)
            | DeliveryError::Reject(m) => f.write_str(m),
        }
    }
}

/// A batch the receiver took, except the records it can never take (too
/// old, not a finite number, ...): those are dead-lettered with the reason
/// in the transaction that confirms the rest.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Delivered {
    /// (record id, why): kept as dead letters.
    pub rejected: Vec<(i64, String)>,
    /// (record id, why): never sendable and not worth keeping (older than
    /// the receiver accepts): counted as drops, by reason, and let go.
    pub skipped: Vec<(i64, String)>,
    /// Requests this delivery took, and the bytes they carried (for status).
    pub requests: i64,
    pub bytes: i64,
}

impl Delivered {
    pub fn all() -> Delivered {
        Delivered::default()
    }
}

/// Where a sink records, request by request, what the receiver accepted
/// of a batch it sends in several requests (for receivers that cannot drop
/// duplicates: CloudWatch). The outbox keeps it, so no later attempt, after
/// a restart or from a dead letter, sends those records again.
pub struct Progress {
    outbox: Option<crate::runtime::SharedOutbox>,
    sink: String,
    seq: i64,
}

impl Progress {
    pub fn new(outbox: crate::runtime::SharedOutbox, batch: &Batch) -> Progress {
        Progress {
            outbox: Some(outbox),
            sink: batch.sink.clone(),
            seq: batch.seq,
        }
    }

    /// For callers without an outbox (tests of a sink alone).
    pub fn none() -> Progress {
        Progress {
            outbox: None,
            sink: String::new(),
            seq: 0,
        }
    }

    /// The receiver accepted the request that carried these records.
    /// Failing to record it is logged: the records would be sent again.
    pub async fn accepted(&self, ids: Vec<i64>) {
        let Some(outbox) = &self.outbox else { return };
        let (sink, seq) = (self.sink.clone(), self.seq);
        if let Err(e) = outbox.call(move |o| o.accept(&sink, seq, &ids)).await {
            log::warn!(
                "sink `{}`: {e}; the records of an accepted request of batch {} may be sent again",
                self.sink,
                self.seq
            );
        }
    }
}

pub trait Sink {
    fn accepts(&self) -> KindSet;
    /// Send `batch`. A sink that sends it in several requests reports each
    /// accepted request to `progress` before sending the next.
    fn deliver<'a>(
        &'a mut self,
        batch: &'a Batch,
        progress: &'a Progress,
    ) -> LocalBoxFuture<'a, Result<Delivered, DeliveryError>>;
    /// Where a sink whose receiver answers with a `Date` header (HTTP)
    /// leaves what it says of this machine's clock; the delivery loop
    /// takes each reading after a delivery, and says when the clock is off.
    fn peer_clock(&self) -> Option<&crate::clock::PeerReading> {
        None
    }
}

pub fn parse_config(
    kind: &str,
    base: &Path,
    table: Spanned<DeTable<'_>>,
    p: &mut Problems,
) -> Option<SinkConfig> {
    match kind {
        "csv" => csv::Config::parse(base, table, p).map(SinkConfig::Csv),
        "cloudwatch_metrics" => {
            cloudwatch_metrics::Config::parse(base, table, p).map(SinkConfig::CloudWatchMetrics)
        }
        "cloudwatch_logs" => {
            cloudwatch_logs::Config::parse(base, table, p).map(SinkConfig::CloudWatchLogs)
        }
        "upstream" => upstream::Config::parse(base, table, p).map(SinkConfig::Upstream),
        other => unreachable!("config.rs checks the type against TYPES; got `{other}`"),
    }
}

impl SinkConfig {
    /// Where a network sink sends its requests.
    pub fn url(&self) -> Option<String> {
        match self {
            SinkConfig::Csv(_) => None,
            SinkConfig::CloudWatchMetrics(c) => Some(c.aws.url(cloudwatch_metrics::HOST)),
            SinkConfig::CloudWatchLogs(c) => Some(c.aws.url(cloudwatch_logs::HOST)),
            SinkConfig::Upstream(c) => Some(c.url()),
        }
    }
}

/// `agent_id` labels what a sink sends when a record does not say.
pub fn build(config: &SinkConfig, agent_id: &str) -> Box<dyn Sink> {
    match config {
        SinkConfig::Csv(c) => Box::new(csv::CsvSink::new(c.clone())),
        SinkConfig::CloudWatchMetrics(c) => {
            Box::new(cloudwatch_metrics::CloudWatchMetrics::new(c.clone()))
        }
        SinkConfig::CloudWatchLogs(c) => {
            Box::new(cloudwatch_logs::CloudWatchLogs::new(c.clone(), agent_id))
        }
        SinkConfig::Upstream(c) => Box::new(upstream::Upstream::new(c.clone(), agent_id)),
    }
}

/// An AWS failure as the delivery loop understands it.
pub fn aws_delivery_error(f: crate::aws::Failure) -> DeliveryError {
    match f {
        crate::aws::Failure::Throttled(m) => DeliveryError::Throttled(m),
        crate::aws::Failure::Transient(m) | crate::aws::Failure::Skewed(m) => {
            DeliveryError::Retry(m)
        }
        crate::aws::Failure::Unauthorized(m) => DeliveryError::Unauthorized(m),
        crate::aws::Failure::Refused {
            status,
            code,
            message,
        } => match status {
            0 => DeliveryError::Retry(format!("{code}: {message}")),
            _ => DeliveryError::Reject(format!("HTTP {status} {code}: {message}")),
        },
    }
}
