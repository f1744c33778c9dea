//! What the upstream keeps, and every question asked of it: exactly-once
//! ingest, network-wide series, events, deletion of a user, the forwarding
//! queue and daily rollups. Written once against [`Db`], so SQLite and
//! PostgreSQL give the same answers.
//!
//! # Exactly once
//! A batch is stored in one transaction that first inserts its key
//! `(agent, outbox, seq)` into `batches` with `ON CONFLICT DO NOTHING`. Only
//! if that inserted a row are its records inserted. A key seen before
//! changes nothing and is acknowledged all the same. With PostgreSQL, two
//! replicas that receive the same batch at once serialise on the unique
//! key: the second waits for the first to commit, then finds the key.
//! Batches committed together are inserted in key order, so two replicas'
//! group commits always take their locks in the same order and cannot
//! deadlock.
//!
//! # Network-wide series
//! Every point and sketch is stored under its full dimensions (the
//! per-agent series) and under its *network* dimensions, `net`: the same
//! without the edge-naming ones (`edge_dims`: `gateway`, `agent`, ...). For
//! one metric, `net` and time, the network value is the **union** of the
//! agents' sketches when there are any (distinct users: an id two gateways
//! both saw counts once), else the **sum** of their points (counters).
//!
//! # Forwarding
//! Ingest marks each (metric, net, ts) it touched in `pending`. The
//! forwarder claims a settled group by inserting it into `forwarded` (the
//! unique key again decides which replica wins), emits the aggregate into
//! the upstream's own outbox, waits for that commit and marks it `sent`. A
//! batch for a group already forwarded is counted as late: queries and
//! rollups include it; the forwarded value is not sent twice.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::record::{Dims, Kind, Record};
use crate::sketch::Sketch;
use crate::upstream::db::{Db, DbError, Rows, Val};
use crate::wire;

pub struct Store {
    db: Box<dyn Db>,
    edge_dims: Vec<String>,
    /// A group newer than `now - settle_ms - CLOCK_MARGIN_MS` cannot have
    /// been forwarded yet: ingest skips asking.
    settle_ms: i64,
    /// Whether anything forwards aggregates: without a sink, nothing is
    /// put in `pending` at all (it would only grow).
    forwards: bool,
    /// Groups this process put in `pending` and that are not settled yet,
    /// so that the next batch for the same window skips the insert. Bounded
    /// by design: after every ingest it holds at most [`PENDING_SEEN_MAX`]
    /// groups (settled ones are dropped first, then all), and a group
    /// leaves it when this process claims it.
    pending_seen: HashSet<Group>,
    /// This transaction's new groups: moved to `pending_seen` when it
    /// commits, dropped when it rolls back, so at most one ingest's worth.
    pending_uncommitted: Vec<Group>,
    /// The INSERT for 1, 2, ... rows of points.
    point_sql: Vec<String>,
}

/// Replicas' clocks may disagree by this much.
const CLOCK_MARGIN_MS: i64 = 60_000;
/// About 3 MiB of groups (a metric, its dims and a time each).
pub const PENDING_SEEN_MAX: usize = 16_384;

/// What storing one batch did.
#[derive(Debug, Clone, PartialEq)]
pub struct Ingested {
    /// False: the key was stored before (a resend); nothing changed.
    pub new: bool,
    pub records: usize,
    /// Records for windows whose aggregate was already forwarded.
    pub late: usize,
}

/// A network-wide group: one metric, its network dims, one time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Group {
    pub metric: String,
    pub net: String,
    pub ts: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum How {
    /// The union of this many agents' sketches.
    Union,
    /// The sum of the agents' points.
    Sum,
    /// One agent's own point.
    Agent(String),
}

impl How {
    pub fn as_str(&self) -> &str {
        match self {
            How::Union => "union",
            How::Sum => "sum",
            How::Agent(_) => "agent",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SeriesRow {
    pub ts: i64,
    pub dims: Dims,
    pub value: f64,
    pub unit: String,
    /// How many agents contributed.
    pub agents: i64,
    pub how: How,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SeriesQuery {
    pub metric: String,
    pub start_ms: i64,
    pub end_ms: i64,
    /// None: the network-wide series. `Some("*")`: every agent's own.
    pub agent: Option<String>,
    /// Keep only rows whose dimensions include all of these.
    pub dims: Vec<(String, String)>,
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventQuery {
    pub start_ms: i64,
    pub end_ms: i64,
    pub user: Option<String>,
    pub etype: Option<String>,
    pub agent: Option<String>,
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub ts: i64,
    pub etype: String,
    pub user: Option<String>,
    pub agent: String,
    pub dims: String,
    pub payload: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RollupRow {
    pub day: String,
    pub metric: String,
    pub dims: Dims,
    pub how: String,
    pub value: f64,
    pub samples: i64,
    pub agents: i64,
}

/// A forwarded aggregate: the point, and for unions the merged sketch.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub point: Record,
    pub sketch: Option<Record>,
}

const SQL_INSERT_BATCH: &str = "INSERT INTO batches (agent, outbox, seq, received, records) \
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING";
/// Points go in up to this many rows per INSERT: one statement step per
/// row costs more than the row itself.
const POINT_ROWS_PER_INSERT: usize = 16;

/// `INSERT INTO points ... VALUES (?1..?7), (?8..?14), ...` for `rows` rows.
fn insert_points_sql(rows: usize) -> String {
    let mut sql =
        String::from("INSERT INTO points (metric, net, ts, agent, dims, value, unit) VALUES ");
    for r in 0..rows {
        let b = r * 7;
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "(?{}, ?{}, ?{}, ?{}, ?{}, ?{}, ?{})",
            b + 1,
            b + 2,
            b + 3,
            b + 4,
            b + 5,
            b + 6,
            b + 7
        ));
    }
    sql
}
const SQL_INSERT_SKETCH: &str = "INSERT INTO sketches \
     (metric, net, ts, agent, dims, unit, estimate, sketch) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
const SQL_INSERT_EVENT: &str = "INSERT INTO events (ts, etype, user_id, agent, dims, payload) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const SQL_IS_FORWARDED: &str =
    "SELECT COUNT(*) FROM forwarded WHERE metric = ?1 AND net = ?2 AND ts = ?3";
const SQL_INSERT_PENDING: &str =
    "INSERT INTO pending (metric, net, ts) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING";

impl Store {
    /// `settle_ms`: the forwarder's `settle_secs`, in ms.
    pub fn new(db: Box<dyn Db>, edge_dims: Vec<String>, settle_ms: i64) -> Store {
        Store {
            db,
            edge_dims,
            settle_ms,
            forwards: true,
            pending_seen: HashSet::new(),
            pending_uncommitted: Vec::new(),
            point_sql: Vec::new(),
        }
    }

    pub fn kind(&self) -> &'static str {
        self.db.kind()
    }

    /// Say whether this upstream forwards (has `[[sink]]`s). Without, ingest
    /// keeps no forwarding bookkeeping, and a SQLite store (which only this
    /// process uses) drops what an earlier run with sinks left in `pending`;
    /// a shared PostgreSQL store is left alone for replicas that forward.
    pub fn set_forwarding(&mut self, forwards: bool) -> Result<u64, DbError> {
        self.forwards = forwards;
        if forwards || self.db.kind() != "sqlite" {
            return Ok(0);
        }
        self.transaction(|s| s.db.exec("DELETE FROM pending", &[]))
    }

    /// Groups in memory, for tests of the bound.
    #[cfg(test)]
    pub fn pending_seen_len(&self) -> usize {
        self.pending_seen.len() + self.pending_uncommitted.len()
    }

    /// The dims without the edge-naming ones, as stored in `net`.
    pub fn net_dims(&self, dims: &Dims) -> Dims {
        dims.without(&self.edge_dims)
    }

    /// Run `f` in one transaction; roll back on error.
    fn transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Store) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        self.db.begin()?;
        match f(self) {
            Ok(v) => {
                if let Err(e) = self.db.commit() {
                    self.db.rollback();
                    return Err(e);
                }
                Ok(v)
            }
            Err(e) => {
                self.db.rollback();
                Err(e)
            }
        }
    }

    /// Store batches in one transaction (a group commit): one answer per
    /// batch, in the order given. An error means none was stored.
    pub fn ingest(
        &mut self,
        batches: &[&wire::Batch],
        now_ms: i64,
    ) -> Result<Vec<Ingested>, DbError> {
        let mut order: Vec<usize> = (0..batches.len()).collect();
        order.sort_by(|&a, &b| {
            let key = |b: &wire::Batch| (b.agent_id.clone(), b.outbox_id.clone(), b.seq);
            key(batches[a]).cmp(&key(batches[b]))
        });
        let result = self.transaction(|s| {
            let mut out = vec![None; batches.len()];
            for i in order {
                out[i] = Some(s.ingest_one(batches[i], now_ms)?);
            }
            Ok(out
                .into_iter()
                .map(|o| o.expect("every batch answered"))
                .collect())
        });
        let fresh = std::mem::take(&mut self.pending_uncommitted);
        if result.is_ok() {
            self.pending_seen.extend(fresh);
            if self.pending_seen.len() > PENDING_SEEN_MAX {
                let unsettled_after = now_ms - self.settle_ms - CLOCK_MARGIN_MS;
                self.pending_seen.retain(|g| g.ts > unsettled_after);
            }
            if self.pending_seen.len() > PENDING_SEEN_MAX {
                // Only costs a redundant (no-op) insert per group later.
                self.pending_seen.clear();
            }
        }
        result
    }

    fn ingest_one(&mut self, b: &wire::Batch, now_ms: i64) -> Result<Ingested, DbError> {
        let inserted = self.db.exec(
            SQL_INSERT_BATCH,
            &[
                b.agent_id.as_str().into(),
                b.outbox_id.as_str().into(),
                b.seq.into(),
                now_ms.into(),
                (b.records.len() as i64).into(),
            ],
        )?;
        if inserted == 0 {
            return Ok(Ingested {
                new: false,
                records: b.records.len(),
                late: 0,
            });
        }
        let agent = Val::from(b.agent_id.as_str());
        // Groups this batch touches, and how many of its records each has.
        let mut groups: BTreeMap<Group, usize> = BTreeMap::new();
        let mut point_rows: Vec<Val<'_>> = Vec::with_capacity(7 * POINT_ROWS_PER_INSERT);
        for r in &b.records {
            match r.kind {
                Kind::Point | Kind::Sketch => {
                    let net = self.net_dims(&r.dims).encode();
                    let dims = r.dims.encode();
                    if r.kind == Kind::Point {
                        point_rows.extend([
                            r.name.as_str().into(),
                            net.clone().into(),
                            r.ts_ms.into(),
                            agent.clone(),
                            dims.into(),
                            r.value.into(),
                            r.unit.as_str().into(),
                        ]);
                        if point_rows.len() == 7 * POINT_ROWS_PER_INSERT {
                            self.insert_points(&point_rows)?;
                            point_rows.clear();
                        }
                    } else {
                        self.db.exec(
                            SQL_INSERT_SKETCH,
                            &[
                                r.name.as_str().into(),
                                net.as_str().into(),
                                r.ts_ms.into(),
                                agent.clone(),
                                dims.into(),
                                r.unit.as_str().into(),
                                r.value.into(),
                                Val::Blob(std::borrow::Cow::Borrowed(&r.payload)),
                            ],
                        )?;
                    }
                    *groups
                        .entry(Group {
                            metric: r.name.clone(),
                            net,
                            ts: r.ts_ms,
                        })
                        .or_default() += 1;
                }
                Kind::Event => {
                    let payload = String::from_utf8_lossy(&r.payload);
                    let user = event_user(&payload).map_or(Val::Null, Val::from);
                    self.db.exec(
                        SQL_INSERT_EVENT,
                        &[
                            r.ts_ms.into(),
                            r.name.as_str().into(),
                            user,
                            agent.clone(),
                            r.dims.encode().into(),
                            Val::Text(payload),
                        ],
                    )?;
                }
                Kind::Line => {}
            }
        }
        if !point_rows.is_empty() {
            self.insert_points(&point_rows)?;
        }
        let mut late = 0;
        let unsettled_after = now_ms - self.settle_ms - CLOCK_MARGIN_MS;
        if !self.forwards {
            groups.clear();
        }
        for (g, n) in groups {
            let recent = g.ts > unsettled_after;
            if recent && self.pending_seen.contains(&g) {
                continue;
            }
            let key = [g.metric.as_str().into(), g.net.as_str().into(), g.ts.into()];
            if !recent {
                let forwarded = self.db.query(SQL_IS_FORWARDED, &key)?;
                if forwarded.first().is_some_and(|r| r[0].int() > 0) {
                    late += n;
                    continue;
                }
            }
            self.db.exec(SQL_INSERT_PENDING, &key)?;
            if recent {
                self.pending_uncommitted.push(g);
            }
        }
        Ok(Ingested {
            new: true,
            records: b.records.len(),
            late,
        })
    }

    /// Insert whole rows of 7 values with one statement.
    fn insert_points(&mut self, values: &[Val<'_>]) -> Result<(), DbError> {
        let rows = values.len() / 7;
        if self.point_sql.len() < rows {
            self.point_sql = (1..=POINT_ROWS_PER_INSERT).map(insert_points_sql).collect();
        }
        let sql = std::mem::take(&mut self.point_sql[rows - 1]);
        let result = self.db.exec(&sql, values);
        self.point_sql[rows - 1] = sql;
        result.map(drop)
    }

    // ------------------------------------------------------------ queries

    pub fn series(&mut self, q: &SeriesQuery) -> Result<Vec<SeriesRow>, DbError> {
        let range = [q.metric.as_str().into(), q.start_ms.into(), q.end_ms.into()];
        let keep = |d: &Dims| {
            q.dims
                .iter()
                .all(|(k, v)| d.pairs().iter().any(|(dk, dv)| dk == k && dv == v))
        };
        let mut rows = Vec::new();
        if let Some(agent) = &q.agent {
            let (sql, params): (&str, Vec<Val>) = if agent == "*" {
                (
                    "SELECT ts, dims, value, unit, agent FROM points \
                     WHERE metric = ?1 AND ts >= ?2 AND ts < ?3 ORDER BY ts, agent, dims",
                    range.to_vec(),
                )
            } else {
                let mut p = range.to_vec();
                p.push(agent.as_str().into());
                (
                    "SELECT ts, dims, value, unit, agent FROM points \
                     WHERE metric = ?1 AND ts >= ?2 AND ts < ?3 AND agent = ?4 ORDER BY ts, dims",
                    p,
                )
            };
            for r in self.db.query(sql, &params)? {
                let dims = Dims::decode(r[1].text()).unwrap_or_default();
                if !keep(&dims) {
                    continue;
                }
                let mut it = r.into_iter();
                let ts = it.next().expect("5 columns").int();
                let _ = it.next();
                let value = it.next().expect("5 columns").real();
                let unit = it.next().expect("5 columns").into_text();
                let agent = it.next().expect("5 columns").into_text();
                rows.push(SeriesRow {
                    ts,
                    dims,
                    value,
                    unit,
                    agents: 1,
                    how: How::Agent(agent),
                });
                if rows.len() >= q.limit {
                    break;
                }
            }
            return Ok(rows);
        }
        // Unions first: a group with sketches is a distinct count.
        let mut unions: BTreeMap<(i64, String), (Sketch, BTreeSet<String>, String)> =
            BTreeMap::new();
        let sketches = self.db.query(
            "SELECT ts, net, agent, unit, sketch FROM sketches \
             WHERE metric = ?1 AND ts >= ?2 AND ts < ?3",
            &range,
        )?;
        for r in sketches {
            let mut it = r.into_iter();
            let ts = it.next().expect("5 columns").int();
            let net = it.next().expect("5 columns").into_text();
            let agent = it.next().expect("5 columns").into_text();
            let unit = it.next().expect("5 columns").into_text();
            let blob = it.next().expect("5 columns").into_blob();
            let e = unions
                .entry((ts, net))
                .or_insert_with(|| (Sketch::default(), BTreeSet::new(), unit));
            // Stored sketches were checked at ingest; one that no longer
            // decodes (a newer edgemeter's, read by an older) is skipped.
            if e.0.merge_encoded(&blob).is_ok() {
                e.1.insert(agent);
            }
        }
        let sums = self.db.query(
            "SELECT ts, net, SUM(value), COUNT(DISTINCT agent), MIN(unit) FROM points \
             WHERE metric = ?1 AND ts >= ?2 AND ts < ?3 GROUP BY ts, net",
            &range,
        )?;
        let mut all: BTreeMap<(i64, String), SeriesRow> = BTreeMap::new();
        for ((ts, net), (sketch, agents, unit)) in unions {
            let dims = Dims::decode(&net).unwrap_or_default();
            all.insert(
                (ts, net),
                SeriesRow {
                    ts,
                    dims,
                    value: sketch.estimate(),
                    unit,
                    agents: agents.len() as i64,
                    how: How::Union,
                },
            );
        }
        for r in sums {
            let mut it = r.into_iter();
            let ts = it.next().expect("5 columns").int();
            let net = it.next().expect("5 columns").into_text();
            let value = it.next().expect("5 columns").real();
            let agents = it.next().expect("5 columns").int();
            let unit = it.next().expect("5 columns").into_text();
            all.entry((ts, net.clone())).or_insert_with(|| SeriesRow {
                ts,
                dims: Dims::decode(&net).unwrap_or_default(),
                value,
                unit,
                agents,
                how: How::Sum,
            });
        }
        Ok(all
            .into_values()
            .filter(|r| keep(&r.dims))
            .take(q.limit)
            .collect())
    }

    pub fn events(&mut self, q: &EventQuery) -> Result<Vec<EventRow>, DbError> {
        let mut sql = String::from(
            "SELECT ts, etype, user_id, agent, dims, payload FROM events WHERE ts >= ?1 AND ts < ?2",
        );
        let mut params: Vec<Val> = vec![q.start_ms.into(), q.end_ms.into()];
        for (col, v) in [
            ("user_id", &q.user),
            ("etype", &q.etype),
            ("agent", &q.agent),
        ] {
            if let Some(v) = v {
                params.push(v.as_str().into());
                sql.push_str(&format!(" AND {col} = ?{}", params.len()));
            }
        }
        sql.push_str(&format!(" ORDER BY ts LIMIT {}", q.limit));
        Ok(self
            .db
            .query(&sql, &params)?
            .into_iter()
            .map(|r| {
                let mut it = r.into_iter();
                let mut next = || it.next().expect("6 columns");
                EventRow {
                    ts: next().int(),
                    etype: next().into_text(),
                    user: match next() {
                        Val::Text(s) => Some(s.into_owned()),
                        _ => None,
                    },
                    agent: next().into_text(),
                    dims: next().into_text(),
                    payload: next().into_text(),
                }
            })
            .collect())
    }

    /// Delete every stored event of `user`; how many there were.
    pub fn delete_user(&mut self, user: &str) -> Result<u64, DbError> {
        self.transaction(|s| {
            s.db.exec("DELETE FROM events WHERE user_id = ?1", &[user.into()])
        })
    }

    // ------------------------------------------------------------ forwarding

    /// Groups waiting to be forwarded whose time is at or before `until_ms`.
    pub fn settled(&mut self, until_ms: i64, limit: usize) -> Result<Vec<Group>, DbError> {
        let rows = self.db.query(
            &format!(
                "SELECT metric, net, ts FROM pending WHERE ts <= ?1 ORDER BY ts, metric, net LIMIT {limit}"
            ),
            &[until_ms.into()],
        )?;
        Ok(rows.into_iter().map(group_of).collect())
    }

    /// Take `g` for forwarding: true if this caller won it (another replica
    /// may have). Either way it leaves `pending`.
    pub fn claim(&mut self, g: &Group, owner: &str, now_ms: i64) -> Result<bool, DbError> {
        self.transaction(|s| {
            let key: [Val; 3] = [g.metric.as_str().into(), g.net.as_str().into(), g.ts.into()];
            let won = s.db.exec(
                "INSERT INTO forwarded (metric, net, ts, owner, state, at) \
                 VALUES (?1, ?2, ?3, ?4, 'claimed', ?5) ON CONFLICT DO NOTHING",
                &[
                    key[0].clone(),
                    key[1].clone(),
                    key[2].clone(),
                    owner.into(),
                    now_ms.into(),
                ],
            )? == 1;
            s.db.exec(
                "DELETE FROM pending WHERE metric = ?1 AND net = ?2 AND ts = ?3",
                &key,
            )?;
            s.pending_seen.remove(g);
            Ok(won)
        })
    }

    /// Claimed by `owner` but not confirmed sent (a crash in between): to be
    /// emitted again.
    pub fn unsent(&mut self, owner: &str) -> Result<Vec<Group>, DbError> {
        let rows = self.db.query(
            "SELECT metric, net, ts FROM forwarded WHERE owner = ?1 AND state = 'claimed' ORDER BY ts",
            &[owner.into()],
        )?;
        Ok(rows.into_iter().map(group_of).collect())
    }

    pub fn mark_sent(&mut self, groups: &[Group]) -> Result<(), DbError> {
        self.transaction(|s| {
            for g in groups {
                s.db.exec(
                    "UPDATE forwarded SET state = 'sent' WHERE metric = ?1 AND net = ?2 AND ts = ?3",
                    &[g.metric.as_str().into(), g.net.as_str().into(), g.ts.into()],
                )?;
            }
            Ok(())
        })
    }

    /// The network value of one group, as records for the upstream's sinks.
    pub fn aggregate(&mut self, g: &Group) -> Result<Option<Aggregate>, DbError> {
        let key = [g.metric.as_str().into(), g.net.as_str().into(), g.ts.into()];
        let dims = Dims::decode(&g.net).unwrap_or_default();
        let sketches = self.db.query(
            "SELECT sketch, unit FROM sketches WHERE metric = ?1 AND net = ?2 AND ts = ?3",
            &key,
        )?;
        if !sketches.is_empty() {
            let mut merged = Sketch::default();
            let mut unit = String::new();
            for r in sketches {
                let mut it = r.into_iter();
                // Checked at ingest; one that fails now is left out.
                let _ = merged.merge_encoded(&it.next().expect("2 columns").into_blob());
                unit = it.next().expect("2 columns").into_text();
            }
            let value = merged.estimate();
            let point = Record::point(g.metric.clone(), dims.clone(), g.ts, value, &unit);
            let sketch = Record {
                kind: Kind::Sketch,
                payload: merged.encode(),
                ..point.clone()
            };
            return Ok(Some(Aggregate {
                point,
                sketch: Some(sketch),
            }));
        }
        let sums = self.db.query(
            "SELECT SUM(value), COUNT(*), MIN(unit) FROM points WHERE metric = ?1 AND net = ?2 AND ts = ?3",
            &key,
        )?;
        Ok(sums
            .into_iter()
            .next()
            .filter(|r| r[1].int() > 0)
            .map(|r| Aggregate {
                point: Record::point(g.metric.clone(), dims, g.ts, r[0].real(), r[2].text()),
                sketch: None,
            }))
    }

    // ------------------------------------------------------------ rollups

    /// Compute the totals of one UTC day (`YYYY-MM-DD`, starting at
    /// `start_ms`) from the stored data and replace that day's rollups.
    /// Recomputed from scratch every time: running it twice, or again after
    /// a late batch, gives the right totals and never adds twice.
    pub fn rollup(
        &mut self,
        day: &str,
        start_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<RollupRow>, DbError> {
        let end_ms = start_ms + 86_400_000;
        let range = [start_ms.into(), end_ms.into()];
        let mut unions: BTreeMap<(String, String), (Sketch, BTreeSet<String>, i64)> =
            BTreeMap::new();
        for r in self.db.query(
            "SELECT metric, net, agent, sketch FROM sketches WHERE ts >= ?1 AND ts < ?2",
            &range,
        )? {
            let mut it = r.into_iter();
            let metric = it.next().expect("4 columns").into_text();
            let net = it.next().expect("4 columns").into_text();
            let agent = it.next().expect("4 columns").into_text();
            let e = unions
                .entry((metric, net))
                .or_insert_with(|| (Sketch::default(), BTreeSet::new(), 0));
            if e.0
                .merge_encoded(&it.next().expect("4 columns").into_blob())
                .is_ok()
            {
                e.1.insert(agent);
                e.2 += 1;
            }
        }
        let mut rows: BTreeMap<(String, String), RollupRow> = BTreeMap::new();
        for ((metric, net), (sketch, agents, samples)) in unions {
            rows.insert(
                (metric.clone(), net.clone()),
                RollupRow {
                    day: day.to_owned(),
                    metric,
                    dims: Dims::decode(&net).unwrap_or_default(),
                    how: "union".into(),
                    value: sketch.estimate(),
                    samples,
                    agents: agents.len() as i64,
                },
            );
        }
        for r in self.db.query(
            "SELECT metric, net, SUM(value), COUNT(*), COUNT(DISTINCT agent) FROM points \
             WHERE ts >= ?1 AND ts < ?2 GROUP BY metric, net",
            &range,
        )? {
            let mut it = r.into_iter();
            let metric = it.next().expect("5 columns").into_text();
            let net = it.next().expect("5 columns").into_text();
            let (value, samples, agents) = (
                it.next().expect("5 columns").real(),
                it.next().expect("5 columns").int(),
                it.next().expect("5 columns").int(),
            );
            rows.entry((metric.clone(), net.clone()))
                .or_insert_with(|| RollupRow {
                    day: day.to_owned(),
                    metric,
                    dims: Dims::decode(&net).unwrap_or_default(),
                    how: "sum".into(),
                    value,
                    samples,
                    agents,
                });
        }
        let rows: Vec<RollupRow> = rows.into_values().collect();
        self.transaction(|s| {
            s.db.exec("DELETE FROM rollups WHERE day = ?1", &[day.into()])?;
            for r in &rows {
                s.db.exec(
                    "INSERT INTO rollups (day, metric, net, how, value, samples, agents, computed) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                     ON CONFLICT (day, metric, net) DO UPDATE SET how = excluded.how, \
                     value = excluded.value, samples = excluded.samples, agents = excluded.agents, \
                     computed = excluded.computed",
                    &[
                        day.into(),
                        r.metric.as_str().into(),
                        r.dims.encode().into(),
                        r.how.as_str().into(),
                        r.value.into(),
                        r.samples.into(),
                        r.agents.into(),
                        now_ms.into(),
                    ],
                )?;
            }
            Ok(())
        })?;
        Ok(rows)
    }

    /// Stored rollups between two days (inclusive, `YYYY-MM-DD`).
    pub fn rollups(&mut self, first: &str, last: &str) -> Result<Vec<RollupRow>, DbError> {
        let rows: Rows = self.db.query(
            "SELECT day, metric, net, how, value, samples, agents FROM rollups \
             WHERE day >= ?1 AND day <= ?2 ORDER BY day, metric, net",
            &[first.into(), last.into()],
        )?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let mut it = r.into_iter();
                let mut next = || it.next().expect("7 columns");
                RollupRow {
                    day: next().into_text(),
                    metric: next().into_text(),
                    dims: Dims::decode(next().text()).unwrap_or_default(),
                    how: next().into_text(),
                    value: next().real(),
                    samples: next().int(),
                    agents: next().int(),
                }
            })
            .collect())
    }

    /// Rows per table, for `/health`.
    pub fn sizes(&mut self) -> Result<HashMap<&'static str, i64>, DbError> {
        let mut out = HashMap::new();
        for t in ["batches", "points", "sketches", "events", "pending"] {
            let n = self.db.query(&format!("SELECT COUNT(*) FROM {t}"), &[])?;
            out.insert(t, n.first().map_or(0, |r| r[0].int()));
        }
        Ok(out)
    }
}

fn group_of(r: Vec<Val<'static>>) -> Group {
    let mut it = r.into_iter();
    Group {
        metric: it.next().expect("3 columns").into_text(),
        net: it.next().expect("3 columns").into_text(),
        ts: it.next().expect("3 columns").int(),
    }
}

/// The `user` of a relay logging envelope, if the payload is one.
pub fn event_user(payload: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Envelope {
        user: Option<serde_json::Value>,
    }
    let e: Envelope = serde_json::from_str(payload).ok()?;
    match e.user? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s),
        _ => None,
    }
}
