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

pub mod bloom;
pub mod config;
pub mod db;
pub mod epochs;
pub mod gaps;
pub mod pgpass;
pub mod status;
pub mod store;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::record::{Dims, Kind, Record};
use crate::runtime::{LocalBoxFuture, Worker};
use crate::sketch::{Sketch, hash_i64};
use crate::sources::{Context, Source};
use crate::state_dir::Sync;

pub use config::Config;
use db::Gateway;
use status::Health;
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
    /// Corrected windows among `emissions`, to clear once committed.
    corrected: Vec<(i64, u32)>,
    /// Epoch to record as emitted once the outbox has the records.
    through: Option<i64>,
    tally: Tally,
    /// Epochs between the newest closed epoch and the last emitted.
    lag_epochs: i64,
    more: bool,
    connected: Option<String>,
}

/// Rows and gaps counted in one step.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    /// Rows seen for the first time (above the watermark, or a gap found).
    rows_new: u64,
    late_rows: u64,
    expired_rows: u64,
    gaps_given_up: u64,
    /// Failed writes of `csv_path` since the last step.
    csv_failures: u64,
}

/// The blocking side: the database connection and the store, used only on
/// the source's worker thread.
struct Inner {
    config: Config,
    name: String,
    agent_id: String,
    store_path: PathBuf,
    status_path: PathBuf,
    store: Option<Store>,
    gateway: Option<Gateway>,
    node_id: Option<String>,
    period_ms: i64,
    health: Health,
    last_status: String,
    csv_backoff: Backoff,
    csv_retry_at: i64,
    csv_failures_unreported: u64,
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

pub fn read_node_id(path: &std::path::Path) -> Result<String, String> {
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

/// The epoch of the last complete line of the script's CSV
/// (`epoch,numEpochs,endTimestamp,numUnique`); a torn last line is skipped.
pub fn last_csv_epoch(text: &str) -> Option<i64> {
    text.lines().rev().find_map(|line| {
        let f: Vec<&str> = line.trim_end_matches('\r').split(',').collect();
        match f.as_slice() {
            [e, w, _, n] if w.parse::<u32>().is_ok() && n.parse::<u64>().is_ok() => e.parse().ok(),
            _ => None,
        }
    })
}

/// The last 64 KiB of a file: enough for its last lines.
fn read_tail(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Where `active-users.py` got to: its key in `states`, or its CSV's last
/// line, whichever is further (the script appends the lines, then writes
/// the key, so a crash between leaves the CSV one epoch ahead).
fn script_trace(c: &Config, gw: &mut Gateway) -> Result<Option<(i64, String)>, XxError> {
    let mut found = gw
        .script_epoch()
        .map_err(XxError::Gateway)?
        .map(|(e, key)| (e, format!("states.{key}")));
    if let Some(path) = c.script_csv.as_ref().or(c.csv_path.as_ref()) {
        match read_tail(path) {
            Ok(text) => {
                if let Some(e) = last_csv_epoch(&text)
                    && found.as_ref().is_none_or(|(f, _)| e > *f)
                {
                    found = Some((e, format!("the last line of {}", path.display())));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(XxError::Csv(format!(
                    "cannot read {} for the script's last epoch: {e}",
                    path.display()
                )));
            }
        }
    }
    Ok(found)
}

/// The first start: the epoch before the first to emit, and a note saying
/// why (for the log and `status`).
fn first_start(
    c: &Config,
    gw: &mut Gateway,
    newest: i64,
    name: &str,
) -> Result<(i64, Option<String>), XxError> {
    let backfill_start = newest - i64::from(c.backfill_epochs);
    let trace = match c.after_script {
        Some(false) => None,
        _ => script_trace(c, gw)?,
    };
    match (c.after_script, trace) {
        (Some(true), None) => Err(XxError::Settings(format!(
            "after_script = true, but active-users.py left no trace: no ActiveUsersMonitoringScript in states{}. \
             Remove after_script to backfill {} epochs instead",
            c.script_csv
                .as_ref()
                .or(c.csv_path.as_ref())
                .map(|p| format!(" and no complete line in {}", p.display()))
                .unwrap_or_default(),
            c.backfill_epochs
        ))),
        (_, Some((e, from))) => {
            let start = e.max(backfill_start);
            let mut note = format!(
                "after active-users.py: it completed epoch {e} ({from}); starting at epoch {}, so nothing it wrote or sent is repeated",
                start + 1
            );
            if start > e {
                note += &format!(
                    " (epochs {}..={start} are older than backfill_epochs and are not counted)",
                    e + 1
                );
            }
            log::info!("source `{name}`: {note}");
            if e >= newest - 1 {
                log::warn!(
                    "source `{name}`: active-users.py completed epoch {e} within the last epoch; if it still runs, \
                     stop it now (systemctl disable --now active-users), or both will append to the CSV and send to CloudWatch"
                );
            }
            Ok((start, Some(note)))
        }
        (_, None) => {
            if c.after_script == Some(false)
                && let Some(path) = &c.csv_path
                && let Some(e) = read_tail(path).ok().as_deref().and_then(last_csv_epoch)
            {
                log::warn!(
                    "source `{name}`: {} already has lines up to epoch {e}; after_script = false, so the backfill of {} epochs is appended after them (windows may appear twice)",
                    path.display(),
                    c.backfill_epochs
                );
            }
            Ok((backfill_start, None))
        }
    }
}

/// The rows whose epochs are kept, as (epoch, recipient) pairs; `fresh`
/// rows for epochs before `accept_from` are counted as too late.
fn kept(
    rows: &[db::Row],
    h: epochs::Horizon,
    fresh: impl Fn(&db::Row) -> bool,
    tally: &mut Tally,
) -> Vec<(i64, i64)> {
    let mut pairs = Vec::with_capacity(rows.len());
    for r in rows {
        if fresh(r) && r.epoch < h.accept_from {
            tally.expired_rows += 1;
        }
        if r.epoch >= h.keep_from {
            pairs.push((r.epoch, r.recipient_id));
        }
    }
    pairs
}

impl Inner {
    fn new(config: Config, name: String, agent_id: String, state_dir: &std::path::Path) -> Inner {
        Inner {
            store_path: state_dir.join(format!("xx_gateway-{name}.db")),
            status_path: crate::sources::status_path(state_dir, &name),
            health: Health {
                csv_path: config.csv_path.clone(),
                period_ms: db::DEFAULT_PERIOD_MS,
                ..Health::default()
            },
            config,
            name,
            agent_id,
            store: None,
            gateway: None,
            node_id: None,
            period_ms: db::DEFAULT_PERIOD_MS,
            last_status: String::new(),
            csv_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(300)),
            csv_retry_at: 0,
            csv_failures_unreported: 0,
        }
    }

    /// One poll, with the status file brought up to date after it.
    fn step(&mut self, now: i64) -> Result<Step, XxError> {
        let result = self.try_step(now);
        match &result {
            Ok(_) => self.health.error = None,
            Err(e) => Health::failing(&mut self.health.error, e.to_string(), now),
        }
        self.flush_csv(now);
        self.publish(now);
        let mut step = result?;
        step.tally.csv_failures = std::mem::take(&mut self.csv_failures_unreported);
        Ok(step)
    }

    fn try_step(&mut self, now: i64) -> Result<Step, XxError> {
        if self.store.is_none() {
            self.store = Some(Store::open(&self.store_path).map_err(|e| self.store_err(e))?);
        }
        if self.node_id.is_none() {
            let id = match &self.config.node_id_file {
                Some(p) => read_node_id(p).map_err(XxError::NodeId)?,
                None => self.agent_id.clone(),
            };
            self.health.node_id = Some(id.clone());
            self.node_id = Some(id);
        }
        let mut connected = None;
        if self.gateway.is_none() {
            let settings = self.config.db.read().map_err(XxError::Settings)?;
            let mut gw = Gateway::connect(&settings, self.config.connect_timeout)
                .map_err(XxError::Gateway)?;
            self.period_ms = gw.period_ms().map_err(XxError::Gateway)?;
            self.health.period_ms = self.period_ms;
            let target = format!("{settings:?}");
            self.health.target = Some(target.clone());
            connected = Some(target);
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

    /// Whether the source has emitted before (so a failure resumes).
    fn has_progress(&self) -> bool {
        self.health.last_emitted.is_some()
            || self
                .store
                .as_ref()
                .is_some_and(|s| s.get("last_emitted").ok().flatten().is_some())
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
                let (start, note) = first_start(c, gw, newest, &self.name)?;
                self.health.start_note = note;
                store.set("last_emitted", start).map_err(&se)?;
                // Windows before this were never emitted: rows for their
                // epochs are context for the first windows, not late.
                store.set("emitted_from", start + 1).map_err(&se)?;
                start
            }
        };
        let emitted_from = store.get("emitted_from").map_err(&se)?.unwrap_or(i64::MIN);
        let h = epochs::horizon(last_emitted, c.late_epochs, c.max_window());
        let late = |epoch: i64| {
            if epoch >= h.accept_from && epoch <= last_emitted {
                epochs::windows_containing(epoch, &c.windows, emitted_from, last_emitted)
            } else {
                Vec::new()
            }
        };
        let count_late = |added: &store::Added, tally: &mut Tally| {
            for (&epoch, &n) in &added.new_ids {
                if !late(epoch).is_empty() {
                    tally.late_rows += n;
                }
            }
        };
        let watermark = store.get("watermark").map_err(&se)?;
        let first_read = watermark.is_none();
        let watermark = watermark.unwrap_or(0);
        let overlap = i64::from(c.id_overlap);
        let mut tally = Tally::default();

        // The gaps: ids skipped by earlier reads, probed by primary key.
        let gaps = store.gaps().map_err(&se)?;
        if !gaps.is_empty() {
            let oldest = now - c.gap_timeout.as_millis() as i64;
            let stale: Vec<i64> = gaps
                .iter()
                .filter(|&&(_, missed)| missed < oldest)
                .map(|&(id, _)| id)
                .collect();
            let live: Vec<i64> = gaps
                .iter()
                .filter(|&&(_, missed)| missed >= oldest)
                .map(|&(id, _)| id)
                .collect();
            let rows = if live.is_empty() {
                Vec::new()
            } else {
                gw.rows_with_ids(&live).map_err(XxError::Gateway)?
            };
            tally.gaps_given_up += stale.len() as u64;
            tally.rows_new += rows.len() as u64;
            let closed: Vec<i64> = stale
                .iter()
                .copied()
                .chain(rows.iter().map(|r| r.id))
                .collect();
            let pairs = kept(&rows, h, |_| true, &mut tally);
            let page = store::Page {
                pairs: &pairs,
                closed_gaps: &closed,
                now_ms: now,
                ..store::Page::default()
            };
            let added = store.apply(&page, late).map_err(&se)?;
            count_late(&added, &mut tally);
        }

        // New rows above the watermark. A store from before gaps were kept
        // re-reads `id_overlap` below its watermark once, to find them.
        let tracked = store.get("gaps_tracked").map_err(&se)?.is_some();
        let mut after = if tracked || first_read {
            watermark
        } else {
            (watermark - overlap).max(0)
        };
        let mut high = watermark;
        loop {
            let rows = gw
                .rows_after(after, c.fetch_rows)
                .map_err(XxError::Gateway)?;
            let Some(last) = rows.last() else { break };
            let holes = gaps::holes(after, rows.iter().map(|r| r.id), last.id - overlap);
            after = last.id;
            high = high.max(last.id);
            tally.rows_new += rows.iter().filter(|r| r.id > watermark).count() as u64;
            let pairs = kept(&rows, h, |r| !first_read && r.id > watermark, &mut tally);
            let page = store::Page {
                pairs: &pairs,
                watermark: Some(high),
                new_gaps: &holes,
                closed_gaps: &[],
                now_ms: now,
            };
            let added = store.apply(&page, late).map_err(&se)?;
            count_late(&added, &mut tally);
            if rows.len() < c.fetch_rows as usize {
                break;
            }
        }
        if !tracked {
            store.set("gaps_tracked", 1).map_err(&se)?;
        }
        tally.gaps_given_up += store.forget_gaps_below(high - overlap).map_err(&se)? as u64;

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
        let corrected = store.dirty().map_err(&se)?;
        for &(e, w) in &corrected {
            // Marked only within the horizon; one outside it cannot be
            // recomputed from complete data and is dropped.
            if epochs::window_start(e, w) >= h.keep_from && e <= last_emitted {
                emissions.push(window(e, w)?);
            }
        }
        let through = newest.min(last_emitted + EPOCHS_PER_STEP);
        for e in last_emitted + 1..=through {
            for w in epochs::due(e, &c.windows) {
                emissions.push(window(e, w)?);
            }
        }
        store.prune(h.keep_from).map_err(&se)?;

        let hl = &mut self.health;
        hl.polls += 1;
        hl.last_poll_ms = Some(now);
        hl.last_emitted.get_or_insert(last_emitted);
        hl.newest_final = Some(newest);
        hl.newest_seen = store.newest_epoch().map_err(&se)?;
        hl.rows_new += tally.rows_new;
        hl.late_rows += tally.late_rows;
        hl.expired_rows += tally.expired_rows;
        hl.gaps_given_up += tally.gaps_given_up;
        hl.gaps_open = store.gaps().map_err(&se)?.len() as u64;
        Ok(Step {
            node_id: self.node_id.clone().expect("read in step"),
            period_ms: period,
            emissions,
            corrected,
            through: (through > last_emitted).then_some(through),
            tally,
            lag_epochs: newest - through.max(last_emitted),
            more: through < newest,
            connected: None,
        })
    }

    /// The records are committed: record the progress and queue the CSV
    /// lines in one transaction, then try to write the file.
    fn finish(&mut self, now: i64, done: Done) -> Result<(), XxError> {
        let store = self.store.as_mut().expect("opened");
        let lines: &[String] = match self.config.csv_path {
            Some(_) => &done.lines,
            None => &[],
        };
        let dropped = store
            .emitted(done.through, &done.corrected, lines)
            .map_err(|e| XxError::Store {
                path: self.store_path.clone(),
                error: e,
            })?;
        self.health.csv_dropped += dropped;
        if let Some(e) = done.through {
            self.health.last_emitted = Some(e);
            self.health.last_values = done.last_values;
        }
        self.flush_csv(now);
        self.publish(now);
        Ok(())
    }

    /// Append the queued CSV lines, unless a failed write is backing off.
    /// A failure is logged when it starts or changes, counted, and shown.
    fn flush_csv(&mut self, now: i64) {
        let (Some(path), Some(store)) = (&self.config.csv_path, &self.store) else {
            return;
        };
        if now < self.csv_retry_at {
            return;
        }
        let pending = match store.csv_pending() {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => {
                log::warn!("source `{}`: {e}", self.name);
                return;
            }
        };
        let (seq, text) = pending;
        let written = append_synced(path, text.as_bytes()).and_then(|()| {
            store
                .csv_written(seq)
                .map_err(|e| format!("{e} (the lines are in the file and may be appended again)"))
        });
        match written {
            Ok(()) => {
                if let Some((_, since)) = self.health.csv_error.take() {
                    log::info!(
                        "source `{}`: {} is written again after {} of failures; {} waiting lines appended",
                        self.name,
                        path.display(),
                        crate::clock::human_duration(now - since),
                        text.matches('\n').count()
                    );
                }
                self.csv_backoff.reset();
                self.csv_retry_at = 0;
                self.health.csv_pending = 0;
            }
            Err(e) => {
                let wait = self.csv_backoff.next_wait();
                self.csv_retry_at = now + wait.as_millis() as i64;
                self.csv_failures_unreported += 1;
                self.health.csv_failures += 1;
                self.health.csv_pending = store.csv_pending_count().unwrap_or(0);
                if self.health.csv_error.as_ref().is_none_or(|(m, _)| *m != e) {
                    log::error!(
                        "source `{}`: {e}; the windows are delivered to the sinks as usual, and the {} CSV lines \
                         waiting are kept and retried with backoff (next in {:.0} s)",
                        self.name,
                        self.health.csv_pending,
                        wait.as_secs_f64()
                    );
                }
                Health::failing(&mut self.health.csv_error, e, now);
            }
        }
    }

    /// Write the status file if it changed (no fsync: it is rewritten at
    /// every poll).
    fn publish(&mut self, now: i64) {
        let text = status::render(&self.health, now);
        if text == self.last_status {
            return;
        }
        match crate::state_dir::replace_file(&self.status_path, text.as_bytes(), Sync::No) {
            Ok(()) => self.last_status = text,
            Err(e) => log::warn!("source `{}`: {e}", self.name),
        }
    }
}

impl Step {
    /// What is left to record once the step's records are committed.
    fn done(&self) -> Done {
        Done {
            through: self.through,
            corrected: self.corrected.clone(),
            lines: self
                .emissions
                .iter()
                .map(|em| epochs::csv_line(em.epoch, em.window, self.period_ms, em.unique))
                .collect(),
            last_values: self
                .emissions
                .iter()
                .filter(|em| Some(em.epoch) == self.through)
                .map(|em| (em.window, em.unique))
                .collect(),
        }
    }
}

/// What a committed step leaves to record.
struct Done {
    through: Option<i64>,
    corrected: Vec<(i64, u32)>,
    lines: Vec<String>,
    last_values: Vec<(u32, u64)>,
}

fn append_synced(path: &std::path::Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open csv_path {}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_data())
        .map_err(|e| format!("cannot write csv_path {}: {e}", path.display()))
}

/// What `edgemeter check` can find out before the service starts: the
/// settings file parses and has the keys, the node id file parses, the
/// CSV file can be appended to by this user (under the service's own
/// sandbox when `check` runs as `ExecStartPre`), the script's CSV can be
/// read. Connecting is left to `run`: a database that is down at boot is
/// not a configuration error.
pub fn check(c: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = c.db.read() {
        problems.push(e);
    }
    if let Some(p) = &c.node_id_file
        && let Err(e) = read_node_id(p)
    {
        problems.push(e);
    }
    if let Some(p) = &c.csv_path
        && let Err(e) = check_appendable(p)
    {
        problems.push(format!("csv_path {e}"));
    }
    if let Some(p) = &c.script_csv
        && let Err(e) = std::fs::File::open(p)
    {
        problems.push(format!("script_csv {}: {e}", p.display()));
    }
    problems
}

/// Whether this user can append to `path`: opened for append if it exists
/// (nothing written), else a probe file created and removed beside it.
fn check_appendable(path: &std::path::Path) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let hint = |e: std::io::Error| {
        let advice = match e.raw_os_error() {
            Some(30) => format!(
                " (read-only here; under the packaged unit add ReadWritePaths={} with `systemctl edit edgemeter`)",
                dir.display()
            ),
            Some(13) => " (permission denied for the service's user)".to_owned(),
            _ => String::new(),
        };
        format!("{}: {e}{advice}", path.display())
    };
    if !dir.is_dir() {
        return Err(format!(
            "{}: the directory {} does not exist",
            path.display(),
            dir.display()
        ));
    }
    if path.exists() {
        return std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop)
            .map_err(hint);
    }
    let probe = dir.join(format!(".edgemeter-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(hint)?;
    std::fs::remove_file(&probe).ok();
    Ok(())
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
    let t = step.tally;
    for (name, v) in [
        ("xx_rows_read", t.rows_new),
        ("xx_late_rows", t.late_rows),
        ("xx_late_rows_expired", t.expired_rows),
        ("xx_gaps_given_up", t.gaps_given_up),
        ("xx_csv_failures", t.csv_failures),
    ] {
        if v > 0 {
            out.push(counter(name, v));
        }
    }
    if step.through.is_some() || !step.emissions.is_empty() {
        out.push(counter("xx_lag_epochs", step.lag_epochs.max(0) as u64));
    }
    out
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
