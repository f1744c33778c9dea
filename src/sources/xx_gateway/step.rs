//! One poll of the gateway, on the source's worker thread: new rows and
//! gaps into the store, the windows due and corrected, then, once the
//! outbox holds them, the progress and the CSV lines (see the module
//! header of `xx_gateway` for the rules).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::logging::{Say, Spell, again, count, settled};
use crate::record::{Dims, Kind, Record};
use crate::sketch::{Sketch, hash_i64};
use crate::state_dir::Sync;

use super::config::Config;
use super::db::{self, Gateway};
use super::files::{append_synced, read_node_id};
use super::script::first_start;
use super::status::{self, Health};
use super::store::{self, Store};
use super::{CSV_STREAM, EPOCHS_PER_STEP, METRIC, XxError, epochs, gaps};

/// One window's result.
#[derive(Debug, Clone)]
pub(super) struct Emission {
    pub(super) epoch: i64,
    pub(super) window: u32,
    pub(super) end_ms: i64,
    pub(super) unique: u64,
    pub(super) sketch: Sketch,
}

/// What one step produced, for the event loop to emit.
pub(super) struct Step {
    pub(super) node_id: String,
    pub(super) period_ms: i64,
    pub(super) emissions: Vec<Emission>,
    /// Corrected windows among `emissions`, to clear once committed.
    pub(super) corrected: Vec<(i64, u32)>,
    /// Epoch to record as emitted once the outbox has the records.
    pub(super) through: Option<i64>,
    pub(super) tally: Tally,
    /// Epochs between the newest closed epoch and the last emitted.
    pub(super) lag_epochs: i64,
    pub(super) more: bool,
    pub(super) connected: Option<String>,
}

/// Rows and gaps counted in one step.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Tally {
    /// Rows seen for the first time (above the watermark, or a gap found).
    pub(super) rows_new: u64,
    pub(super) late_rows: u64,
    pub(super) expired_rows: u64,
    pub(super) gaps_given_up: u64,
    /// Failed writes of `csv_path` since the last step.
    pub(super) csv_failures: u64,
}

/// The blocking side: the database connection and the store, used only on
/// the source's worker thread.
pub(super) struct Inner {
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
    /// Failing status writes (a full disk fails one at every poll), said
    /// once a spell; it ends once none failed for [`Spell::SETTLE`] (a
    /// disk that is nearly full fails one write and not the next).
    status_spell: Spell,
    csv_backoff: Backoff,
    csv_retry_at: i64,
    /// The queue's lines through this seq are in the file (this process
    /// appended them), and whether clearing them from the queue is owed.
    csv_appended: i64,
    csv_uncleared: bool,
    csv_failures_unreported: u64,
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
    pub(super) fn new(
        config: Config,
        name: String,
        agent_id: String,
        state_dir: &std::path::Path,
    ) -> Inner {
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
            status_spell: Spell::settling(),
            csv_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(300)),
            csv_retry_at: 0,
            csv_appended: 0,
            csv_uncleared: false,
            csv_failures_unreported: 0,
        }
    }

    /// One poll, with the status file brought up to date after it.
    pub(super) fn step(&mut self, now: i64) -> Result<Step, XxError> {
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
    pub(super) fn has_progress(&self) -> bool {
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
        hl.gaps_open = store.gap_count().map_err(&se)?;
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
    pub(super) fn finish(&mut self, now: i64, done: Done) -> Result<(), XxError> {
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
        // Lines this process appended stay out of what is appended next,
        // even while clearing them from the queue fails (a full disk): it
        // appended them again, and a window was in the file twice.
        let pending = match store.csv_pending(self.csv_appended) {
            Ok(Some(p)) => Some(p),
            Ok(None) if self.csv_uncleared => None,
            Ok(None) => return,
            Err(e) => {
                log::warn!("source `{}`: {e}", self.name);
                return;
            }
        };
        let text = pending.as_ref().map_or("", |(_, t)| t.as_str()).to_owned();
        let appended = match &pending {
            Some((seq, text)) => append_synced(path, text.as_bytes()).map(|()| {
                self.csv_appended = *seq;
                self.csv_uncleared = true;
            }),
            None => Ok(()),
        };
        let written = appended.and_then(|()| {
            store.csv_written(self.csv_appended).map_err(|e| {
                format!(
                    "{e} (the lines are in the file; they are cleared later, not appended again)"
                )
            })
        });
        if written.is_ok() {
            self.csv_uncleared = false;
        }
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
                self.health.csv_pending = store.csv_pending_count(self.csv_appended).unwrap_or(0);
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
        let text = status::document(&self.health, now);
        let now = Instant::now();
        let say = if text == self.last_status {
            // Written as it is: a spell that settled since ends here.
            self.status_spell.quiet(now)
        } else {
            match crate::state_dir::replace_file(&self.status_path, text.as_bytes(), Sync::No) {
                Ok(()) => {
                    self.last_status = text;
                    self.status_spell.worked(now)
                }
                Err(e) => {
                    if let Say::Failure { attempts } = self.status_spell.failed(now) {
                        log::warn!(
                            "source `{}`: {}{e}; trying again at the next poll",
                            self.name,
                            again(attempts)
                        );
                    }
                    return;
                }
            }
        };
        if let Say::Ended { failed, lasted } = say {
            let failed = count(failed, "failed write", "failed writes");
            log::info!(
                "source `{}`: {} written again, after {failed} {}",
                self.name,
                self.status_path.display(),
                settled(lasted)
            );
        }
    }
}

impl Step {
    /// What is left to record once the step's records are committed.
    pub(super) fn done(&self) -> Done {
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
pub(super) struct Done {
    pub(super) through: Option<i64>,
    pub(super) corrected: Vec<(i64, u32)>,
    pub(super) lines: Vec<String>,
    pub(super) last_values: Vec<(u32, u64)>,
}

pub(super) fn records(step: &Step, now: i64) -> Vec<Record> {
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
            name: METRIC.into(),
            dims,
            value: em.sketch.estimate(),
            unit: "Count".into(),
            payload: em.sketch.encode(),
        });
        out.push(Record {
            kind: Kind::Line,
            ts_ms: em.end_ms,
            name: CSV_STREAM.into(),
            dims: Dims::new([("gateway", gateway)]),
            value: 0.0,
            unit: "None".into(),
            payload: epochs::csv_line(em.epoch, em.window, step.period_ms, em.unique).into_bytes(),
        });
    }
    let counter = |name: &'static str, v: u64| {
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
