//! Retention: raw data older than `retention_days` whole UTC days is
//! deleted, one day per transaction, after that day's rollup is computed
//! from it; the rollups stay.
//!
//! # Why nothing is forwarded twice, or counted twice
//! - **Late records.** Ingest drops a record older than the retention line
//!   ([`Store::keep_from`], counted as expired) instead of storing it. So a
//!   window whose rows and `forwarded` mark were deleted is never queued
//!   again. Pruning draws its line [`CLOCK_MARGIN_MS`] earlier than ingest,
//!   so replicas whose clocks disagree by less than that agree.
//! - **Resent batches.** A batch's key is deleted only once it was received
//!   more than `MAX_FUTURE_MS` before the line. Its records were checked at
//!   receipt to be at most `MAX_FUTURE_MS` ahead of that, so they are all
//!   older than the line: sent again, every record is dropped as expired.
//! - **Replicas.** On PostgreSQL each day's transaction first takes an
//!   advisory lock, so two replicas prune one after the other. The second
//!   finds the day empty and leaves its rollup alone (a rollup is replaced
//!   only by one computed from data).
//!
//! # What it costs
//! Each table is reached by its index: the metrics are listed by skipping
//! through `(metric, ts)`, then each metric's rows before the line are
//! deleted by a range of that index. Rollups read the day as the
//! `edgemeter upstream rollup` timer does. `batches` has no index on its
//! receipt time (ingest would pay for one on every batch): its keys are
//! deleted by one scan of the table when the line moves, once a day.

use super::*;
use crate::clock;

/// PostgreSQL advisory lock key taken by each pruning transaction.
pub const PRUNE_LOCK: i64 = 0x6564_6765_7072_756e; // "edgeprun"

/// What one pruning pass deleted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pruned {
    /// The UTC days (`YYYY-MM-DD`) whose raw data was deleted.
    pub days: Vec<String>,
    pub points: u64,
    pub sketches: u64,
    pub events: u64,
    /// Windows still waiting to be forwarded when deleted (the sinks were
    /// more than the retention behind).
    pub unforwarded: u64,
    pub batch_keys: u64,
    /// Everything older than the line is deleted (else call again).
    pub finished: bool,
}

impl Pruned {
    /// Add what a later call deleted (its `finished` wins).
    pub fn absorb(&mut self, later: Pruned) {
        self.days.extend(later.days);
        self.points += later.points;
        self.sketches += later.sketches;
        self.events += later.events;
        self.unforwarded += later.unforwarded;
        self.batch_keys += later.batch_keys;
        self.finished = later.finished;
    }

    /// Points, sketches and events.
    pub fn records(&self) -> u64 {
        self.points + self.sketches + self.events
    }
}

/// The oldest time of one metric in `points` or `sketches`.
fn oldest_sql(table: &str) -> String {
    format!("SELECT MIN(ts) FROM {table} WHERE metric = ?1")
}
const SQL_OLDEST_EVENT: &str = "SELECT MIN(ts) FROM events";
/// One metric's rows before a time, in a table keyed or indexed by
/// `(metric, ..., ts)`.
fn delete_sql(table: &str) -> String {
    format!("DELETE FROM {table} WHERE metric = ?1 AND ts < ?2")
}
const SQL_DELETE_EVENTS: &str = "DELETE FROM events WHERE ts < ?1";

/// The statements pruning and rollups run for each day or metric, for a
/// test that each reaches its rows by an index. (The rest scan on
/// purpose: `batches`, once a day; `pending` and `edge_days`, small.)
/// Public for the PostgreSQL test in `tests/upstream.rs`.
pub fn indexed_statements() -> Vec<String> {
    let mut out = vec![
        SQL_OLDEST_EVENT.to_owned(),
        SQL_DELETE_EVENTS.to_owned(),
        super::rollup::SQL_DAY_SKETCHES.to_owned(),
        super::rollup::SQL_DAY_SUMS.to_owned(),
    ];
    for table in ["points", "sketches"] {
        out.push(metrics_sql(table));
        out.push(oldest_sql(table));
    }
    for table in ["points", "sketches", "unions", "forwarded"] {
        out.push(delete_sql(table));
    }
    out
}

impl Store {
    /// Keep raw data for `days` whole UTC days (`None`: forever).
    pub fn set_retention(&mut self, days: Option<u32>) {
        self.retention_days = days;
    }

    /// The oldest time stored at `now_ms`: the start of the UTC day
    /// `retention_days` before. Anything earlier is expired.
    pub(super) fn keep_from(&self, now_ms: i64) -> i64 {
        match self.retention_days {
            None => i64::MIN,
            Some(days) => (now_ms - i64::from(days) * DAY_MS).div_euclid(DAY_MS) * DAY_MS,
        }
    }

    /// With a retention, the time before which raw data is deleted (or
    /// about to be): for rollups and pages that reach past it.
    pub fn deleted_before(&self, now_ms: i64) -> Option<i64> {
        self.retention_days.map(|_| self.keep_from(now_ms))
    }

    /// Delete the raw data older than the retention, a day per transaction
    /// and at most `max_days` days per call (so that batches are stored in
    /// between), each day's rollup computed first. `finished` says whether
    /// it got to the line. Cheap when there is nothing to do: this process
    /// remembers how far it pruned, and looks again once the line has moved
    /// (once a day).
    pub fn prune(&mut self, now_ms: i64, max_days: usize) -> Result<Pruned, DbError> {
        let mut out = Pruned {
            finished: true,
            ..Pruned::default()
        };
        let before = self.keep_from(now_ms - CLOCK_MARGIN_MS);
        if self.retention_days.is_none() || before <= self.pruned_before {
            return Ok(out);
        }
        let mut last_day = i64::MIN;
        for _ in 0..max_days {
            let Some(oldest) = self.oldest()?.filter(|&t| t < before) else {
                let keys = self.transaction(|s| {
                    s.db.exec(
                        "DELETE FROM batches WHERE received < ?1",
                        &[(before - crate::wire::MAX_FUTURE_MS).into()],
                    )
                })?;
                out.batch_keys += keys;
                self.pruned_before = before;
                return Ok(out);
            };
            let day = oldest.div_euclid(DAY_MS) * DAY_MS;
            if day <= last_day {
                // Every row before the end of `day` was deleted; one that
                // is still there was written since, which ingest refuses.
                return Err(DbError::Statement {
                    target: "pruning".into(),
                    error: format!(
                        "rows of {} are still there after it was pruned",
                        clock::day(day)
                    ),
                });
            }
            last_day = day;
            self.transaction(|s| s.prune_day(day, now_ms, &mut out))?;
        }
        out.finished = false;
        Ok(out)
    }

    /// The time of the oldest point, sketch or event, if any.
    fn oldest(&mut self) -> Result<Option<i64>, DbError> {
        let mut oldest: Option<i64> = None;
        let mut consider = |rows: Rows| {
            for r in rows {
                if let Some(Val::Int(t)) = r.into_iter().next() {
                    oldest = Some(oldest.map_or(t, |o| o.min(t)));
                }
            }
        };
        for table in ["points", "sketches"] {
            for m in self.metrics(table)? {
                consider(self.db.query(&oldest_sql(table), &[m.into()])?);
            }
        }
        consider(self.db.query(SQL_OLDEST_EVENT, &[])?);
        Ok(oldest)
    }

    /// Roll up the UTC day starting at `day`, then delete everything up to
    /// its end (in the caller's transaction).
    fn prune_day(&mut self, day: i64, now_ms: i64, out: &mut Pruned) -> Result<(), DbError> {
        if self.db.kind() == "postgresql" {
            self.db
                .exec("SELECT pg_advisory_xact_lock(?1)", &[PRUNE_LOCK.into()])?;
        }
        let name = clock::day(day);
        let rows = self.rollup_rows(&name, day)?;
        if !rows.is_empty() {
            self.replace_rollups(&name, &rows, now_ms)?;
        }
        let end = Val::from(day + DAY_MS);
        let point_metrics = self.metrics("points")?;
        let sketch_metrics = self.metrics("sketches")?;
        let mut points = 0;
        let mut sketches = 0;
        for m in &point_metrics {
            let params = [Val::from(m.as_str()), end.clone()];
            points += self.db.exec(&delete_sql("points"), &params)?;
        }
        for m in &sketch_metrics {
            let params = [Val::from(m.as_str()), end.clone()];
            sketches += self.db.exec(&delete_sql("sketches"), &params)?;
            self.db.exec(&delete_sql("unions"), &params)?;
        }
        // Forwarded windows are of either kind.
        let forwarded: BTreeSet<&String> = point_metrics.iter().chain(&sketch_metrics).collect();
        for m in forwarded {
            let params = [Val::from(m.as_str()), end.clone()];
            self.db.exec(&delete_sql("forwarded"), &params)?;
        }
        let unforwarded = self.db.exec(
            "DELETE FROM pending WHERE ts < ?1",
            std::slice::from_ref(&end),
        )?;
        self.db.exec(
            "DELETE FROM edge_days WHERE day < ?1",
            std::slice::from_ref(&end),
        )?;
        let events = self.db.exec(SQL_DELETE_EVENTS, &[end])?;
        if points + sketches + events > 0 {
            // (A replica may have deleted the day while this one waited.)
            out.days.push(name);
        }
        out.points += points;
        out.sketches += sketches;
        out.events += events;
        out.unforwarded += unforwarded;
        Ok(())
    }
}
