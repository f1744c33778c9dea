//! The `xx_gateway` source: exact, incremental active-user counts from an
//! xx network gateway's `client_bloom_filters` table, replacing
//! `active-users.py`.
//!
//! # How it counts
//! - **Incremental**: each poll reads only rows with `id` above the
//!   watermark, by primary-key range, in pages of `fetch_rows`: one index
//!   probe when nothing is new. Ids are taken at INSERT but become visible
//!   at COMMIT, out of order, so every id a read skipped (within
//!   `id_overlap` of the newest) is a gap ([`gaps`]), probed by primary key
//!   at each poll until its row appears or `gap_timeout_secs` passes (a
//!   rolled-back transaction). Rows merged later (the gateway UPDATEs
//!   `filter`/`uses`) keep their recipient and epoch, so they need no
//!   re-read.
//! - **Exact**: the distinct recipients of every epoch still needed live in
//!   the source's own SQLite ([`store`]). The window of W epochs computed at
//!   epoch e is the union over `e-W+1 ..= e`, the same number as the
//!   script's `COUNT(DISTINCT recipient_id) ... WHERE epoch BETWEEN` on the
//!   same rows. A backfill is one pass over the table.
//! - **When**: epoch e is final `grace_secs` after it closes; then every
//!   window due at e (`e % W == 0`, as the script) is emitted: a point
//!   `active_users` {gateway, window, epochs}, a sketch of the same ids (so
//!   an upstream can union gateways), a line for log sinks, and the CSV line
//!   if `csv_path` is set. Progress is recorded only after the outbox has
//!   committed the records ([`crate::runtime::Emitter::committed`]), in
//!   one transaction with the CSV lines to append; the file is written
//!   from that queue, so a CSV file that cannot be written is retried on
//!   its own with backoff and never makes a window be emitted twice.
//! - **Late rows** (for an epoch whose windows were already emitted, up to
//!   `late_epochs` back): every affected window is marked in the store in
//!   the same transaction as the row's id, recomputed, and emitted again
//!   with the same key (metric, dims, timestamp), so consumers replace the
//!   old value, and a CSV line is appended again (a later line for the same
//!   `epoch,numEpochs` supersedes). The mark is cleared only once the
//!   outbox has the correction, so a crash in between re-emits it. The
//!   store keeps `late_epochs` plus the widest window, so a recomputed
//!   window never lacks an epoch. Counted in `xx_late_rows`; rows for
//!   epochs further back can no longer correct anything and are counted in
//!   `xx_late_rows_expired`.
//! - **Switching from `active-users.py`**: on a first start the source
//!   reads (read-only) the script's last epoch, from its key in `states` or
//!   the last line of its CSV, and starts after it (`after_script`).
//! - **Failures**: a lost database (restart, network, password change) is
//!   logged once, retried with backoff (the gateway files are re-read at
//!   each reconnect), and polling resumes from the stored watermark.
//!
//! Needs only `SELECT` on `client_bloom_filters` and `states`; it never writes
//! to the gateway's database.
//!
//! # Files
//! This file holds the task on the event loop ([`XxGateway`]: poll, emit,
//! wait for the outbox, finish) and `verify`. One file per role: `step.rs`
//! (one poll on the worker thread, and what is recorded after the commit),
//! `store.rs` (the source's SQLite), `db.rs` (the gateway's PostgreSQL),
//! `gaps.rs` and `epochs.rs` (pure arithmetic), `script.rs` (where
//! `active-users.py` got to), `files.rs` (node id, CSV, `check`),
//! `config.rs` with `pgpass.rs`, `status.rs`, `bloom.rs` (the filter
//! format, for `verify`).

pub mod bloom;
pub mod config;
pub mod db;
pub mod epochs;
mod files;
pub mod gaps;
pub mod pgpass;
mod script;
pub mod status;
mod step;
pub mod store;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::runtime::{LocalBoxFuture, Worker};
use crate::sources::{Context, Source};

pub use config::Config;
use db::Gateway;
pub use files::{check, read_node_id};
pub use script::last_csv_epoch;
use step::{Inner, records};

/// Epochs whose windows are computed per step; a backfill takes several
/// steps so memory stays bounded (a 24 h sketch is at most 16 KiB).
const EPOCHS_PER_STEP: i64 = 48;
pub const METRIC: &str = "active_users";
pub const CSV_STREAM: &str = "active-users.csv";

pub struct XxGateway {
    config: Config,
    state_dir: PathBuf,
}

impl XxGateway {
    pub fn new(config: Config, state_dir: PathBuf) -> XxGateway {
        XxGateway { config, state_dir }
    }
}

/// Why a step of the source failed. The variant decides what is made again:
/// only a failure of the gateway's database drops its connection; the
/// source's own store and its node id file are retried as they are.
#[derive(Debug, Clone, PartialEq)]
pub enum XxError {
    /// `gateway.yaml` or the explicit settings could not be read or used.
    Settings(String),
    /// Connecting to the gateway's PostgreSQL, or a query on it.
    Gateway(String),
    /// The source's own SQLite store of epochs and ids.
    Store { path: PathBuf, error: String },
    /// `node_id_file`.
    NodeId(String),
    /// The script's CSV, read on a first start.
    Csv(String),
}

impl std::fmt::Display for XxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            XxError::Settings(e) | XxError::Gateway(e) | XxError::NodeId(e) | XxError::Csv(e) => {
                f.write_str(e)
            }
            XxError::Store { path, error } => {
                write!(f, "the source's store {}: {error}", path.display())
            }
        }
    }
}

impl std::error::Error for XxError {}

/// What `edgemeter verify` found in a gateway's newest filter rows.
#[derive(Debug, Default, PartialEq)]
pub struct Verified {
    pub rows: usize,
    pub malformed: Vec<(i64, String)>,
    /// Rows whose filter does not claim their own first or last round.
    pub unclaimed: Vec<i64>,
}

/// Decode the newest `rows` filters and check that each claims its
/// `first_round` and `first_round + round_range` (the gateway ORs every
/// merged round in, so both must test positive).
pub fn verify(config: &Config, rows: u32) -> Result<Verified, XxError> {
    let settings = config.db.read().map_err(XxError::Settings)?;
    let mut gw = Gateway::connect(&settings, config.connect_timeout).map_err(XxError::Gateway)?;
    let mut out = Verified::default();
    for row in gw.newest_filters(rows).map_err(XxError::Gateway)? {
        out.rows += 1;
        match bloom::Filter::decode(&row.filter) {
            Err(e) => out.malformed.push((row.id, e.to_string())),
            Ok(f) => {
                let last = row.first_round.saturating_add(row.round_range);
                if !f.contains(row.first_round as u64) || !f.contains(last as u64) {
                    out.unclaimed.push(row.id);
                }
            }
        }
    }
    Ok(out)
}

impl Source for XxGateway {
    fn run(self: Box<Self>, ctx: Context) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move {
            let poll = self.config.poll_interval;
            let inner = Arc::new(Mutex::new(Inner::new(
                self.config,
                ctx.name.clone(),
                ctx.agent_id.clone(),
                &self.state_dir,
            )));
            let worker = Worker::new(format!("src-{}", ctx.name));
            let mut backoff =
                Backoff::new(Duration::from_secs(1), Duration::from_secs(300).max(poll));
            let mut failing: Option<String> = None;
            while !ctx.shutdown.is_started() {
                let job = inner.clone();
                let step = worker
                    .run(move || {
                        let mut i = job.lock().unwrap_or_else(|p| p.into_inner());
                        i.step(now_ms()).map_err(|e| (e, i.has_progress()))
                    })
                    .await;
                let step = match step {
                    Ok(s) => s,
                    Err((e, resumes)) => {
                        let wait = backoff.next_wait();
                        let e = e.to_string();
                        if failing.as_deref() != Some(e.as_str()) {
                            log::warn!(
                                "source `{}`: {e}. Retrying with backoff (next in {:.1} s){}",
                                ctx.name,
                                wait.as_secs_f64(),
                                if resumes {
                                    ", then resuming from the last row read"
                                } else {
                                    ""
                                }
                            );
                            failing = Some(e);
                        }
                        if ctx.shutdown.sleep(wait).await {
                            return;
                        }
                        continue;
                    }
                };
                if let Some(target) = &step.connected {
                    if failing.take().is_some() {
                        log::info!(
                            "source `{}`: reading the gateway database {target} again after {} failed attempts",
                            ctx.name,
                            backoff.attempts()
                        );
                    } else {
                        log::info!(
                            "source `{}`: reading the gateway database {target}, epochs of {} s",
                            ctx.name,
                            step.period_ms / 1000
                        );
                    }
                }
                backoff.reset();
                for r in records(&step, now_ms()) {
                    if !ctx.emit.emit(r).await {
                        return;
                    }
                }
                if step.emissions.is_empty() && step.through.is_none() {
                    if ctx.shutdown.sleep(poll).await {
                        return;
                    }
                    continue;
                }
                if !ctx.emit.committed().await {
                    return;
                }
                let done = step.done();
                let job = inner.clone();
                if let Err(e) = worker
                    .run(move || {
                        job.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .finish(now_ms(), done)
                    })
                    .await
                {
                    log::error!(
                        "source `{}`: {e}; the windows just delivered will be emitted again",
                        ctx.name
                    );
                }
                if !step.more && ctx.shutdown.sleep(poll).await {
                    return;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
