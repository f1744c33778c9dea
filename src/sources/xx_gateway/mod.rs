//! The `xx_gateway` source: exact, incremental active-user counts from an
//! xx network gateway's `client_bloom_filters` table, replacing
//! `active-users.py`.
//!
//! # How it counts
//! - **Incremental**: each poll reads only rows with `id` above the
//!   watermark (less `id_overlap`, because ids are taken at INSERT but
//!   become visible at COMMIT, out of order), by primary-key range, in pages
//!   of `fetch_rows`. Re-read rows change nothing: epoch sets are sets.
//!   Rows merged later (the gateway UPDATEs `filter`/`uses`) keep their
//!   recipient and epoch, so they need no re-read.
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
//!   committed the records ([`crate::runtime::Emitter::committed`]).
//! - **Late rows** (for an epoch whose windows were already emitted): every
//!   affected window is recomputed and emitted again with the same key
//!   (metric, dims, timestamp), so consumers replace the old value, and a
//!   CSV line is appended again (a later line for the same `epoch,numEpochs`
//!   supersedes). They are counted in the point `xx_late_rows`. Rows older
//!   than the kept horizon (two of the largest windows behind) can no longer
//!   correct anything; they are counted in `xx_late_rows_expired`.
//! - **Failures**: a lost database (restart, network, password change) is
//!   logged once, retried with backoff (the gateway files are re-read at
//!   each reconnect), and polling resumes from the stored watermark.
//!
//! Needs only `SELECT` on `client_bloom_filters` and `states`; it never writes
//! to the gateway's database.

pub mod bloom;
pub mod config;
pub mod db;
pub mod epochs;
pub mod store;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::record::{Dims, Kind, Record};
use crate::runtime::{LocalBoxFuture, Worker};
use crate::sketch::{Sketch, hash_i64};
use crate::sources::{Context, Source};

pub use config::Config;
use db::Gateway;
use store::Store;

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

/// One window's result.
#[derive(Debug, Clone)]
struct Emission {
    epoch: i64,
    window: u32,
    end_ms: i64,
    unique: u64,
    sketch: Sketch,
}

/// What one step produced, for the event loop to emit.
struct Step {
    node_id: String,
    period_ms: i64,
    emissions: Vec<Emission>,
    /// Epoch to record as emitted once the outbox has the records.
    through: Option<i64>,
    late_rows: u64,
    expired_rows: u64,
    rows_read: u64,
    more: bool,
    connected: Option<String>,
}

/// The blocking side: the database connection and the store, used only on
/// the source's worker thread.
struct Inner {
    config: Config,
    name: String,
    agent_id: String,
    store_path: PathBuf,
    store: Option<Store>,
    gateway: Option<Gateway>,
    node_id: Option<String>,
    period_ms: i64,
}

/// Why a step of the source failed. The variant decides what is made again:
/// only a failure of the gateway's database drops its connection; the
/// source's own store, its node id file and its CSV file are retried as
/// they are.
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
    /// `csv_path`.
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

fn read_node_id(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read node_id_file {}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("node_id_file {} is not JSON: {e}", path.display()))?;
    v.get("id")
        .and_then(|id| id.as_str())
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| format!("node_id_file {} has no string field `id`", path.display()))
}

impl Inner {
    fn step(&mut self, now: i64) -> Result<Step, XxError> {
        if self.store.is_none() {
            self.store = Some(Store::open(&self.store_path).map_err(|e| self.store_err(e))?);
        }
        if self.node_id.is_none() {
            self.node_id = Some(match &self.config.node_id_file {
                Some(p) => read_node_id(p).map_err(XxError::NodeId)?,
                None => self.agent_id.clone(),
            });
        }
        let mut connected = None;
        if self.gateway.is_none() {
            let settings = self.config.db.read().map_err(XxError::Settings)?;
            let mut gw = Gateway::connect(&settings, self.config.connect_timeout)
                .map_err(XxError::Gateway)?;
            self.period_ms = gw.period_ms().map_err(XxError::Gateway)?;
            connected = Some(format!("{settings:?}"));
            self.gateway = Some(gw);
        }
        let result = self.poll(now);
        if let Err(XxError::Gateway(_)) = result {
            // The connection may be broken: make a fresh one next time.
            self.gateway = None;
        }
        let mut step = result?;
        step.connected = connected;
        Ok(step)
    }

    fn store_err(&self, error: String) -> XxError {
        XxError::Store {
            path: self.store_path.clone(),
            error,
        }
    }

    fn poll(&mut self, now: i64) -> Result<Step, XxError> {
        let store_path = self.store_path.clone();
        let se = move |error: String| XxError::Store {
            path: store_path.clone(),
            error,
        };
        let c = &self.config;
        let period = self.period_ms;
        let store = self.store.as_mut().expect("opened in step");
        let gw = self.gateway.as_mut().expect("connected in step");
        let newest = epochs::newest_final(now, period, c.grace.as_millis() as i64);
        let last_emitted = match store.get("last_emitted").map_err(&se)? {
            Some(e) => e,
            None => {
                let start = newest - i64::from(c.backfill_epochs);
                store.set("last_emitted", start).map_err(&se)?;
                // Windows before this were never emitted: rows for their
                // epochs are context for the first windows, not late.
                store.set("emitted_from", start + 1).map_err(&se)?;
                start
            }
        };
        let emitted_from = store.get("emitted_from").map_err(&se)?.unwrap_or(i64::MIN);
        let max_w = i64::from(*c.windows.iter().max().expect("windows is never empty"));
        // Keep what the next windows need, plus one more largest window so
        // late rows can still correct what was emitted.
        let horizon = last_emitted + 1 - 2 * max_w;

        let watermark = store.get("watermark").map_err(&se)?.unwrap_or(0);
        let mut after = (watermark - i64::from(c.id_overlap)).max(0);
        let mut high = watermark;
        let (mut rows_read, mut late_rows, mut expired_rows) = (0u64, 0u64, 0u64);
        let mut late: BTreeSet<(i64, u32)> = BTreeSet::new();
        loop {
            let rows = gw
                .rows_after(after, horizon, c.fetch_rows)
                .map_err(XxError::Gateway)?;
            let Some(last) = rows.last() else { break };
            after = last.id;
            high = high.max(last.id);
            rows_read += rows.len() as u64;
            let pairs: Vec<(i64, i64)> = rows.iter().map(|r| (r.epoch, r.recipient_id)).collect();
            let added = store.add(&pairs, horizon, high).map_err(&se)?;
            expired_rows += added.expired;
            for (&epoch, &n) in added.new_ids.range(..=last_emitted) {
                // Only windows that were emitted can be corrected.
                let mut corrects = false;
                for &w in &c.windows {
                    for e in epoch.max(emitted_from)..=(epoch + i64::from(w) - 1).min(last_emitted)
                    {
                        if e.rem_euclid(i64::from(w)) == 0 {
                            late.insert((e, w));
                            corrects = true;
                        }
                    }
                }
                if corrects {
                    late_rows += n;
                }
            }
            if rows.len() < c.fetch_rows as usize {
                break;
            }
        }

        let window = |e: i64, w: u32| -> Result<Emission, XxError> {
            let ids = store.ids(epochs::window_start(e, w), e).map_err(&se)?;
            let mut sketch = Sketch::default();
            for id in &ids {
                sketch.insert(hash_i64(*id));
            }
            Ok(Emission {
                epoch: e,
                window: w,
                end_ms: epochs::window_end_ms(e, period),
                unique: ids.len() as u64,
                sketch,
            })
        };
        let mut emissions = Vec::new();
        for &(e, w) in &late {
            emissions.push(window(e, w)?);
        }
        let through = newest.min(last_emitted + EPOCHS_PER_STEP);
        for e in last_emitted + 1..=through {
            for w in epochs::due(e, &c.windows) {
                emissions.push(window(e, w)?);
            }
        }
        store.prune(horizon).map_err(&se)?;
        Ok(Step {
            node_id: self.node_id.clone().expect("read in step"),
            period_ms: period,
            emissions,
            through: (through > last_emitted).then_some(through),
            late_rows,
            expired_rows,
            rows_read,
            more: through < newest,
            connected: None,
        })
    }

    /// The records are committed: write the CSV lines, then move on.
    fn finish(&mut self, lines: &str, through: Option<i64>) -> Result<(), XxError> {
        if let (Some(path), false) = (&self.config.csv_path, lines.is_empty()) {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    XxError::Csv(format!("cannot open csv_path {}: {e}", path.display()))
                })?;
            f.write_all(lines.as_bytes())
                .and_then(|()| f.sync_data())
                .map_err(|e| {
                    XxError::Csv(format!("cannot write csv_path {}: {e}", path.display()))
                })?;
        }
        if let Some(e) = through {
            self.store
                .as_ref()
                .expect("opened")
                .set("last_emitted", e)
                .map_err(|e| self.store_err(e))?;
        }
        Ok(())
    }
}

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

fn records(step: &Step, now: i64) -> Vec<Record> {
    let mut out = Vec::with_capacity(step.emissions.len() * 3 + 3);
    let gateway = step.node_id.as_str();
    for em in &step.emissions {
        let dims = Dims::new([
            ("gateway", gateway.to_owned()),
            ("window", epochs::window_label(em.window, step.period_ms)),
            ("epochs", em.window.to_string()),
        ]);
        out.push(Record::point(
            METRIC,
            dims.clone(),
            em.end_ms,
            em.unique as f64,
            "Count",
        ));
        out.push(Record {
            kind: Kind::Sketch,
            ts_ms: em.end_ms,
            name: METRIC.to_owned(),
            dims,
            value: em.sketch.estimate(),
            unit: "Count".to_owned(),
            payload: em.sketch.encode(),
        });
        out.push(Record {
            kind: Kind::Line,
            ts_ms: em.end_ms,
            name: CSV_STREAM.to_owned(),
            dims: Dims::new([("gateway", gateway)]),
            value: 0.0,
            unit: "None".to_owned(),
            payload: epochs::csv_line(em.epoch, em.window, step.period_ms, em.unique).into_bytes(),
        });
    }
    let counter = |name: &str, v: u64| {
        Record::point(
            name,
            Dims::new([("gateway", gateway)]),
            now,
            v as f64,
            "Count",
        )
    };
    if step.rows_read > 0 {
        out.push(counter("xx_rows_read", step.rows_read));
    }
    if step.late_rows > 0 {
        out.push(counter("xx_late_rows", step.late_rows));
    }
    if step.expired_rows > 0 {
        out.push(counter("xx_late_rows_expired", step.expired_rows));
    }
    out
}

impl Source for XxGateway {
    fn run(self: Box<Self>, ctx: Context) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move {
            let poll = self.config.poll_interval;
            let inner = Arc::new(Mutex::new(Inner {
                store_path: self.state_dir.join(format!("xx_gateway-{}.db", ctx.name)),
                config: self.config,
                name: ctx.name.clone(),
                agent_id: ctx.agent_id.clone(),
                store: None,
                gateway: None,
                node_id: None,
                period_ms: db::DEFAULT_PERIOD_MS,
            }));
            let worker = Worker::new(format!("src-{}", ctx.name));
            let mut backoff =
                Backoff::new(Duration::from_secs(1), Duration::from_secs(300).max(poll));
            let mut failing: Option<String> = None;
            while !ctx.shutdown.is_started() {
                let job = inner.clone();
                let step = worker
                    .run(move || job.lock().unwrap_or_else(|p| p.into_inner()).step(now_ms()))
                    .await;
                let step = match step {
                    Ok(s) => s,
                    Err(e) => {
                        let wait = backoff.next_wait();
                        let e = e.to_string();
                        if failing.as_deref() != Some(e.as_str()) {
                            log::warn!(
                                "source `{}`: {e}; retrying with backoff (next in {:.1} s), resuming from the last row read",
                                ctx.name,
                                wait.as_secs_f64()
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
                    let name = inner.lock().map(|i| i.name.clone()).unwrap_or_default();
                    if failing.take().is_some() {
                        log::info!(
                            "source `{name}`: reading the gateway database {target} again after {} failed attempts",
                            backoff.attempts()
                        );
                    } else {
                        log::info!(
                            "source `{name}`: reading the gateway database {target}, epochs of {} s",
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
                let lines: String = step
                    .emissions
                    .iter()
                    .map(|em| epochs::csv_line(em.epoch, em.window, step.period_ms, em.unique))
                    .collect();
                let (job, through) = (inner.clone(), step.through);
                if let Err(e) = worker
                    .run(move || {
                        job.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .finish(&lines, through)
                    })
                    .await
                {
                    log::error!(
                        "source `{}`: {e}; these windows will be emitted again",
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
