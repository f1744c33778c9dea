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
//! Batches committed together are inserted in key order, after the series
//! new to them (in their key order), so two replicas' group commits always
//! take their locks in the same order and cannot deadlock.
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
//!
//! Both ingest and the forwarder name many groups at once, up to
//! `GROUPS_PER_STATEMENT` per statement (see `GroupsSql`): with
//! PostgreSQL each statement is a round trip, and at one per group the
//! forwarder fell behind a thousand groups a second.
//!
//! # Retention
//! With `retention_days`, raw data older than that many whole UTC days is
//! deleted, a day at a time, after that day's rollup is computed; rollups
//! stay. Ingest drops records older than the same line (counted as
//! expired), so a deleted window is never queued, or forwarded, again.
//! See `retention.rs`.
//!
//! # Files
//! This file holds the types, the store's handle and its transaction; one
//! file per role holds its `impl`: `ingest.rs`, `reads.rs` (series, events,
//! deletion), `forward.rs` (the forwarding queue), `rollup.rs`,
//! `retention.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::record::{Dims, Kind, Record};
use crate::sketch::Sketch;
use crate::upstream::db::{Db, DbError, Rows, Val, columns};
use crate::wire;

mod forward;
mod ingest;
mod reads;
mod retention;
mod rollup;

pub use retention::indexed_statements;
pub use retention::{PRUNE_LOCK, Pruned};

pub struct Store {
    db: Box<dyn Db>,
    edge_dims: Vec<String>,
    /// A group newer than `now - settle_ms - CLOCK_MARGIN_MS` cannot have
    /// been forwarded yet: ingest skips asking.
    settle_ms: i64,
    /// Whether anything forwards aggregates: without a sink, nothing is
    /// put in `pending` at all (it would only grow).
    forwards: bool,
    /// `retention_days`: raw data older is deleted, and not taken in.
    retention_days: Option<u32>,
    /// Everything before this time is pruned already (by this process).
    pruned_before: i64,
    /// Groups this process put in `pending` and that are not settled yet,
    /// so that the next batch for the same window skips the insert. Bounded
    /// by design: after every ingest it holds at most [`PENDING_SEEN_MAX`]
    /// groups (settled ones are dropped first, then all), and a group
    /// leaves it when this process claims it.
    pending_seen: HashSet<Group>,
    /// This transaction's new groups: moved to `pending_seen` when it
    /// commits, dropped when it rolls back, so at most one ingest's worth.
    pending_uncommitted: Vec<Group>,
    /// Series ids by their key (see [`series_key`]): what this process
    /// committed. Bounded by design: past [`SERIES_IDS_MAX_BYTES`] it is
    /// emptied, and a series then costs one lookup in `series` again. Rows
    /// of `series` are never deleted, so a committed id stays right.
    series_ids: foldhash::HashMap<Box<str>, i64>,
    /// What `series_ids` holds, in bytes (keys and their entries).
    series_bytes: usize,
    /// This transaction's new series (at most one group's points): moved
    /// to `series_ids` when it commits, dropped when it rolls back (their
    /// ids may be given again).
    series_uncommitted: foldhash::HashMap<Box<str>, i64>,
    /// The buffer a point's series key is written into.
    series_key: String,
    /// The INSERT for 1, 2, ... rows of points.
    point_sql: Vec<String>,
}

/// Replicas' clocks may disagree by this much.
const CLOCK_MARGIN_MS: i64 = 60_000;
/// About 3 MiB of groups (a metric, its dims and a time each).
pub const PENDING_SEEN_MAX: usize = 16_384;
/// Series ids kept in memory, in bytes: some 20,000 series of 100-byte
/// keys, more than a network of a thousand edges sends.
pub const SERIES_IDS_MAX_BYTES: usize = 2 << 20;
/// What a `series_ids` entry costs beside its key's bytes: the boxed key
/// and the id, the table's control byte, the allocation's header.
const SERIES_ENTRY_BYTES: usize = 48;

/// What storing one batch did.
#[derive(Debug, Clone, PartialEq)]
pub struct Ingested {
    /// False: the key was stored before (a resend); nothing changed.
    pub new: bool,
    pub records: usize,
    /// Records for windows whose aggregate was already forwarded.
    pub late: usize,
    /// Records older than the retention: dropped, not stored.
    pub expired: usize,
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

/// One edge's figures for a distinct count over a range: the dashboard's
/// per-edge table, without reading every window.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeSummary {
    pub agent: String,
    pub net: Dims,
    pub peak: f64,
    pub windows: i64,
    pub last_ts: i64,
    pub last_value: f64,
}

/// One agent's latest health: (metric, encoded dims) → (ts, value).
pub type Health = BTreeMap<(String, String), (i64, f64)>;
/// Every agent's latest health.
pub type AgentHealth = BTreeMap<String, Health>;

/// One agent's posting history, for the dashboard's edges page.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeRow {
    pub agent: String,
    pub batches: i64,
    pub records: i64,
    pub last_received_ms: i64,
}

/// A user with relay `analytics` events in a range, for the command
/// graphs page.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRow {
    pub user: String,
    pub events: i64,
    pub last_ms: i64,
}

/// Events of one user on one stream (the dims of the edge that sent them),
/// for the user × hardware heat map.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub user: String,
    pub dims: Dims,
    pub events: i64,
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

/// Values bound per point row: its series, metric, time and value.
const POINT_COLUMNS: usize = 4;

/// `INSERT INTO points ... VALUES (?1..?4), (?5..?8), ...` for `rows` rows.
fn insert_points_sql(rows: usize) -> String {
    "INSERT INTO points (series, metric, ts, value) VALUES ".to_owned()
        + &value_rows(rows, &["?"; POINT_COLUMNS])
}
/// A series is named by these; its network dims follow from its dims.
const SQL_INSERT_SERIES: &str = "INSERT INTO series (metric, net, agent, dims, unit) \
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING";
const SQL_SERIES_ID: &str = "SELECT id FROM series \
     WHERE metric = ?1 AND net = ?2 AND agent = ?3 AND dims = ?4 AND unit = ?5";

/// A series' key in memory: its agent, metric, dims and unit, each after
/// its length (so that no two series share a key, whatever their text).
fn series_key(key: &mut String, agent: &str, metric: &str, dims: &str, unit: &str) {
    use std::fmt::Write;
    key.clear();
    for part in [agent, metric, dims, unit] {
        let _ = write!(key, "{}:", part.len());
        key.push_str(part);
    }
}
const SQL_INSERT_SKETCH: &str = "INSERT INTO sketches \
     (metric, net, ts, agent, dims, unit, estimate, sketch) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
/// Each sketch counts itself into its window's union row: how many
/// sketches the window has (so a cached union that merged fewer is known
/// stale) and the sum of their estimates (the naive sum of edges).
const SQL_COUNT_UNION: &str = "INSERT INTO unions \
     (metric, net, ts, sketches, summed, merged, estimate, agents, unit) \
     VALUES (?1, ?2, ?3, 1, ?4, -1, 0, 0, ?5) \
     ON CONFLICT (metric, net, ts) DO UPDATE SET sketches = unions.sketches + 1, \
     summed = unions.summed + excluded.summed";
/// And into its edge's day: peak, windows, latest (for the dashboard's
/// per-edge table without reading every window).
const SQL_COUNT_EDGE_DAY: &str = "INSERT INTO edge_days \
     (metric, net, agent, day, peak, windows, last_ts, last_value) \
     VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?5) \
     ON CONFLICT (metric, net, agent, day) DO UPDATE SET \
     peak = CASE WHEN excluded.peak > edge_days.peak THEN excluded.peak ELSE edge_days.peak END, \
     windows = edge_days.windows + 1, \
     last_value = CASE WHEN excluded.last_ts >= edge_days.last_ts THEN excluded.last_value ELSE edge_days.last_value END, \
     last_ts = CASE WHEN excluded.last_ts > edge_days.last_ts THEN excluded.last_ts ELSE edge_days.last_ts END";
pub const DAY_MS: i64 = 86_400_000;
const SQL_INSERT_EVENT: &str = "INSERT INTO events (ts, etype, user_id, agent, dims, payload) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
/// Groups per statement at most, where a statement names many: with
/// PostgreSQL each statement is a round trip, and one per group made
/// forwarding (a thousand groups a second in the soak) the upstream's
/// bottleneck.
const GROUPS_PER_STATEMENT: usize = 256;

/// A statement naming many groups names one of these many (the last
/// repeated): few distinct statements, so that each stays prepared.
const ROWS_PER_STATEMENT: [usize; 3] = [16, 64, GROUPS_PER_STATEMENT];

/// The rows a statement for `n` groups has (`n` at most
/// [`GROUPS_PER_STATEMENT`]).
fn padded_rows(n: usize) -> usize {
    ROWS_PER_STATEMENT
        .into_iter()
        .find(|&rows| rows >= n)
        .unwrap_or(n)
}

/// A statement about many groups: `head`, then one [`GROUP_VALUES`] row
/// per group (metric, net, time), then `tail`. The rows are padded with the last group to one of
/// [`ROWS_PER_STATEMENT`], so that three statements serve every size:
/// each must give the same answer when a group is named twice.
struct GroupsSql {
    head: &'static str,
    tail: &'static str,
    /// Parameters before the groups' (`?1`, `?2` in `head`).
    leading: usize,
}

/// As `VALUES` rows (columns `column1..3` in both databases; the time
/// cast, or PostgreSQL would take it for text).
const GROUP_VALUES: &str = "(?, ?, CAST(? AS BIGINT))";
/// Which groups were forwarded already (ingest, for late batches).
///
/// `CROSS JOIN` keeps the groups the outer loop in SQLite: with a plain
/// join of 256 groups, SQLite 3.54 chose to scan the whole table and look
/// each row up in an index it built on the groups (a scan of `forwarded`
/// per ingest: the soak's SQLite run with a sink slowed as the table
/// grew, 24 s for 2 simulated minutes, 381 s for 10).
const FORWARDED_AMONG: GroupsSql = GroupsSql {
    head: "SELECT f.metric, f.net, f.ts FROM (VALUES ",
    tail: ") AS g CROSS JOIN forwarded f \
           WHERE f.metric = g.column1 AND f.net = g.column2 AND f.ts = g.column3",
    leading: 0,
};
const QUEUE_PENDING: GroupsSql = GroupsSql {
    head: "INSERT INTO pending (metric, net, ts) VALUES ",
    tail: " ON CONFLICT DO NOTHING",
    leading: 0,
};
/// Claim for owner `?1` at time `?2`: returns the groups this statement
/// inserted, so those no other replica had claimed. (`WHERE true` tells
/// SQLite that `ON CONFLICT` is not a join's.)
const CLAIM: GroupsSql = GroupsSql {
    head: "INSERT INTO forwarded (metric, net, ts, owner, state, at) \
           SELECT column1, column2, column3, CAST(?1 AS TEXT), 'claimed', CAST(?2 AS BIGINT) \
           FROM (VALUES ",
    tail: ") AS g WHERE true ON CONFLICT DO NOTHING RETURNING metric, net, ts",
    leading: 2,
};
/// Row values `IN` a subquery, not an `OR` per group: PostgreSQL took 6 to
/// 9 ms for 256 groups so, 40 to 47 ms with an `OR` each (120,000 rows in
/// `forwarded`). Both databases look each group up by the whole key (a
/// join in `UPDATE ... FROM` made SQLite scan `forwarded`, as above).
const UNQUEUE: GroupsSql = GroupsSql {
    head: "DELETE FROM pending WHERE (metric, net, ts) IN \
           (SELECT column1, column2, column3 FROM (VALUES ",
    tail: ") AS g)",
    leading: 0,
};
/// [`UNQUEUE`] for PostgreSQL. `pending` is a queue: its rows are deleted
/// as fast as they come, so ANALYZE can find its pages with no live row,
/// and the planner then takes it for one row whatever it holds. With
/// [`UNQUEUE`] it then compared every queued row with every group (a
/// nested-loop semi join: 5,087,104 comparisons and 2.3 s for 256 groups
/// among 20,000 queued; 30 to 380 ms a statement in the PostgreSQL soak).
/// Here each group is one probe of the key's index (`OFFSET 0` keeps the
/// lateral subquery a loop over the groups), and the rows found are
/// deleted by their address: a scan by row address, or where the table is
/// a few pages, one pass comparing addresses.
const UNQUEUE_PG: GroupsSql = GroupsSql {
    head: "DELETE FROM pending WHERE ctid = ANY (ARRAY (SELECT q.ctid FROM (VALUES ",
    tail: ") AS g CROSS JOIN LATERAL (SELECT ctid FROM pending \
           WHERE metric = g.column1 AND net = g.column2 AND ts = g.column3 OFFSET 0) AS q))",
    leading: 0,
};
const MARK_SENT: GroupsSql = GroupsSql {
    head: "UPDATE forwarded SET state = 'sent' WHERE (metric, net, ts) IN \
           (SELECT column1, column2, column3 FROM (VALUES ",
    tail: ") AS g)",
    leading: 0,
};
/// The sketches of the groups (a group named twice is read once).
const SKETCHES_OF: GroupsSql = GroupsSql {
    head: "SELECT k.metric, k.net, k.ts, k.sketch, k.unit FROM \
           (SELECT DISTINCT column1, column2, column3 FROM (VALUES ",
    tail: ") AS v) AS g CROSS JOIN sketches k \
           WHERE k.metric = g.column1 AND k.ts = g.column3 AND k.net = g.column2",
    leading: 0,
};

impl GroupsSql {
    /// The statement for `groups` (at most [`GROUPS_PER_STATEMENT`]) and
    /// its parameters, `leading` first.
    fn bind<'g>(&self, leading: Vec<Val<'g>>, groups: &[&'g Group]) -> (String, Vec<Val<'g>>) {
        debug_assert_eq!(leading.len(), self.leading);
        let rows = padded_rows(groups.len());
        let mut sql = String::from(self.head);
        sql.push_str(&numbered(rows, GROUP_VALUES, ", ", self.leading + 1));
        sql.push_str(self.tail);
        let last = groups.last().copied();
        let mut params = leading;
        params.extend(
            groups
                .iter()
                .copied()
                .chain(std::iter::repeat_n(last, rows - groups.len()).flatten())
                .flat_map(|g| [g.metric.as_str().into(), g.net.as_str().into(), g.ts.into()]),
        );
        (sql, params)
    }
}

/// `(?1, ?2), (?3, ?4), ...`: `rows` rows of `columns`, each `?` numbered.
fn value_rows(rows: usize, columns: &[&str]) -> String {
    numbered(rows, &format!("({})", columns.join(", ")), ", ", 1)
}

/// `rows` copies of `row` joined by `sep`, each `?` in them numbered in
/// turn from `?{first}`: `numbered(2, "(?, ?)", ", ", 1)` is
/// `(?1, ?2), (?3, ?4)`.
fn numbered(rows: usize, row: &str, sep: &str, first: usize) -> String {
    use std::fmt::Write;
    let mut sql = String::with_capacity(rows * (row.len() + sep.len() + 8));
    let mut n = first;
    for r in 0..rows {
        if r > 0 {
            sql.push_str(sep);
        }
        let mut parts = row.split('?');
        sql.push_str(parts.next().unwrap_or_default());
        for part in parts {
            let _ = write!(sql, "?{n}{part}");
            n += 1;
        }
    }
    sql
}

impl Store {
    /// `settle_ms`: the forwarder's `settle_secs`, in ms.
    pub fn new(db: Box<dyn Db>, edge_dims: Vec<String>, settle_ms: i64) -> Store {
        Store {
            db,
            edge_dims,
            settle_ms,
            forwards: true,
            retention_days: None,
            pruned_before: i64::MIN,
            pending_seen: HashSet::new(),
            pending_uncommitted: Vec::new(),
            series_ids: Default::default(),
            series_bytes: 0,
            series_uncommitted: Default::default(),
            series_key: String::new(),
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

    /// Series ids in memory, in bytes, for tests of the bound.
    #[cfg(test)]
    pub fn series_ids_bytes(&self) -> usize {
        self.series_bytes
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

    /// The distinct metrics of `points` or `sketches`.
    pub(super) fn metrics(&mut self, table: &str) -> Result<Vec<String>, DbError> {
        let rows = self.db.query(&metrics_sql(table), &[])?;
        Ok(rows
            .into_iter()
            .filter_map(|r| r.into_iter().next().map(Val::into_text))
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

/// The distinct metrics of a table with a `(metric, ts)` index, one index
/// step each (a loose index scan; `SELECT DISTINCT` would read every row).
fn metrics_sql(table: &str) -> String {
    format!(
        "WITH RECURSIVE m(metric) AS (SELECT MIN(metric) FROM {table} UNION ALL \
         SELECT (SELECT MIN(metric) FROM {table} WHERE metric > m.metric) FROM m \
         WHERE m.metric IS NOT NULL) SELECT metric FROM m WHERE metric IS NOT NULL"
    )
}

/// A group from a row of its three columns: metric, net, ts.
fn group_of(r: Vec<Val<'static>>) -> Group {
    let [metric, net, ts] = columns(r);
    group(metric, net, ts)
}

fn group(metric: Val<'static>, net: Val<'static>, ts: Val<'static>) -> Group {
    Group {
        metric: metric.into_text(),
        net: net.into_text(),
        ts: ts.int(),
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

/// Each statement that names many groups, for `groups`: for tests of
/// their plans.
#[cfg(test)]
pub fn many_group_statements(groups: &[&Group]) -> Vec<String> {
    let mut out: Vec<String> = [
        &FORWARDED_AMONG,
        &QUEUE_PENDING,
        &UNQUEUE,
        &MARK_SENT,
        &SKETCHES_OF,
    ]
    .iter()
    .map(|s| s.bind(Vec::new(), groups).0)
    .collect();
    out.push(CLAIM.bind(vec!["owner".into(), 0.into()], groups).0);
    let times: BTreeSet<(&str, i64)> = groups.iter().map(|g| (g.metric.as_str(), g.ts)).collect();
    out.push(forward::sums_sql(&times).0);
    out
}
