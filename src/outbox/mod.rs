//! The outbox: every observation, durably, until every sink that wants it
//! has confirmed it.
//!
//! # Constraints
//! - A record is committed to SQLite before anything downstream sees it, and
//!   it leaves the outbox only in the transaction that records the last
//!   wanting sink's confirmation. A `kill -9` at any instant loses nothing
//!   that was committed: WAL mode with `synchronous = FULL`, and every state
//!   change is one transaction.
//! - Delivery is at-least-once per sink with a **stable batch id**
//!   `(sink, seq)`: a batch keeps its seq and its id range across retries and
//!   restarts, so a receiver can drop duplicates and a file sink can repair a
//!   torn write. Seqs of a sink only grow.
//! - Bounded: the records' charged bytes ([`Record::charged_bytes`]) stay
//!   under `buffer_max_bytes`. When an append would cross it, the oldest
//!   records go first; every drop is counted per reason and per sink that had
//!   not yet confirmed it. Dead letters have their own budget (a quarter of
//!   the buffer); the oldest are evicted and counted past it.
//! - One process per database: the caller holds the state directory's lock
//!   ([`crate::state_dir`]); readers (`edgemeter status`) open read-only and
//!   rely on WAL to see a consistent snapshot while the agent writes.
//!
//! # Schema (`PRAGMA application_id` = `EDM1`, `user_version` = 1)
//! - `records(id AUTOINCREMENT, kind, ts, name, dims, value, unit, payload,
//!   size, at)`: appended by the writer. AUTOINCREMENT because sink cursors
//!   compare ids: an id must never be reused after its row is deleted.
//! - `sinks(name, kinds, cursor, next_seq, counters…)`: one row per configured
//!   sink. `cursor` is the highest record id the sink has confirmed (records
//!   of kinds it does not take count as confirmed when it passes them).
//! - `batches(sink, seq, first_id, last_id, attempts, created)`: at most one
//!   open (claimed, unconfirmed) batch per sink.
//! - `dead_letters(id, sink, seq, count, bytes, error, state, …)` and
//!   `dead_records(dead_id, …)`: batches a sink refused for good, with copies
//!   of their records, kept until `edgemeter outbox retry|purge`.
//! - `drops(reason, sink, count)`: every record the outbox gave up on.
//! - `counters(sink, key, value)`: what sinks report of their own work
//!   (requests, bytes sent, retries, throttles), for `edgemeter status`.
//!
//! # Flow
//! 1. **append**: one transaction inserts a group of records (the writer task
//!    groups what arrives within `flush_interval_secs`), first making room by
//!    dropping the oldest when the bound requires it.
//! 2. **claim** ([`Outbox::next_batch`]): a sink gets, in order, a dead letter
//!    marked for retry, else its open batch again (`redelivered = true`), else
//!    a new batch of up to N wanted records after its cursor, recorded in
//!    `batches` with the next seq before it is handed out.
//! 3. **ack**: the sink confirmed; one transaction moves its cursor to the
//!    batch's `last_id`, deletes the batch row and deletes every record that
//!    all sinks have now passed.
//! 4. **dead-letter**: the sink refused for good; one transaction copies the
//!    batch into `dead_letters`/`dead_records` and moves the cursor as ack does.
//!
//! # Recovery
//! - At open, SQLite replays or discards the WAL itself; a torn transaction
//!   never happened. An open batch simply stays open and is redelivered with
//!   its old seq.
//! - A file that is not an SQLite database, fails `PRAGMA quick_check`,
//!   belongs to another program (foreign `application_id` or tables), or was
//!   written by a newer schema is **moved aside** (`outbox.db.corrupt-<ms>`,
//!   with its `-wal`/`-shm`) and a fresh outbox is started, with one error
//!   line saying so: the agent never crash-loops on its own state, and the
//!   old file stays for a human to inspect.
//! - Sinks that are no longer configured are forgotten at start-up (their
//!   open batch too), so they do not pin records forever.

use std::fmt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, params};

use crate::clock::now_ms;
use crate::record::{Dims, Kind, KindSet, Record};

pub const FILE_NAME: &str = "outbox.db";
const APPLICATION_ID: i64 = 0x4544_4D31; // "EDM1"
const SCHEMA_VERSION: i64 = 1;
const OUR_TABLES: &[&str] = &[
    "records",
    "sinks",
    "batches",
    "dead_letters",
    "dead_records",
    "drops",
    "counters",
    "meta",
    "sqlite_sequence",
];

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    INTEGER NOT NULL,
    ts      INTEGER NOT NULL,
    name    TEXT    NOT NULL,
    dims    TEXT    NOT NULL,
    value   REAL    NOT NULL,
    unit    TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    size    INTEGER NOT NULL,
    at      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sinks (
    name              TEXT PRIMARY KEY,
    kinds             INTEGER NOT NULL,
    cursor            INTEGER NOT NULL DEFAULT 0,
    next_seq          INTEGER NOT NULL DEFAULT 1,
    delivered_records INTEGER NOT NULL DEFAULT 0,
    delivered_batches INTEGER NOT NULL DEFAULT 0,
    failures          INTEGER NOT NULL DEFAULT 0,
    last_delivery     INTEGER,
    last_failure      INTEGER,
    last_error        TEXT
);
CREATE TABLE IF NOT EXISTS batches (
    sink     TEXT    NOT NULL,
    seq      INTEGER NOT NULL,
    first_id INTEGER NOT NULL,
    last_id  INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    created  INTEGER NOT NULL,
    PRIMARY KEY (sink, seq)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    sink     TEXT    NOT NULL,
    seq      INTEGER NOT NULL,
    count    INTEGER NOT NULL,
    bytes    INTEGER NOT NULL,
    error    TEXT    NOT NULL,
    state    TEXT    NOT NULL CHECK (state IN ('dead', 'retry')),
    attempts INTEGER NOT NULL,
    created  INTEGER NOT NULL,
    updated  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_records (
    dead_id INTEGER NOT NULL,
    id      INTEGER NOT NULL,
    kind    INTEGER NOT NULL,
    ts      INTEGER NOT NULL,
    name    TEXT    NOT NULL,
    dims    TEXT    NOT NULL,
    value   REAL    NOT NULL,
    unit    TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    PRIMARY KEY (dead_id, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    sink  TEXT    NOT NULL,
    key   TEXT    NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (sink, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS drops (
    reason TEXT    NOT NULL,
    sink   TEXT    NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (reason, sink)
) WITHOUT ROWID;
";

/// Why records were dropped (the `reason` column of `drops`).
pub mod reason {
    /// The buffer reached `buffer_max_bytes`; the oldest went.
    pub const BUFFER_FULL: &str = "buffer_full";
    /// Records could not be committed (disk full, I/O error) and the
    /// in-memory queue that holds them meanwhile overflowed.
    pub const COMMIT_FAILED: &str = "commit_failed";
    /// Dead letters past their budget; the oldest went.
    pub const DEAD_LETTER_EVICTED: &str = "dead_letter_evicted";
}

/// The sink column of `drops` for records no configured sink wanted yet.
pub const NO_SINK: &str = "-";

#[derive(Debug)]
pub enum OutboxError {
    /// The state directory or database cannot be used at all (permissions,
    /// a directory where the file should be, ...): fatal.
    Unusable { path: PathBuf, detail: String },
    /// An operation failed (disk full, I/O error); the caller retries.
    Sqlite {
        path: PathBuf,
        op: &'static str,
        error: rusqlite::Error,
    },
    /// The caller named a sink that is not registered (a programming error
    /// or a typo on the command line).
    UnknownSink { name: String },
}

impl OutboxError {
    pub fn is_disk_full(&self) -> bool {
        matches!(self, OutboxError::Sqlite { error, .. }
            if error.sqlite_error_code() == Some(ErrorCode::DiskFull))
    }
}

impl fmt::Display for OutboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutboxError::Unusable { path, detail } => {
                write!(f, "cannot use the outbox {}: {detail}", path.display())
            }
            OutboxError::Sqlite { path, op, error } => {
                write!(f, "outbox {}: {op} failed: {error}", path.display())
            }
            OutboxError::UnknownSink { name } => write!(f, "no sink named `{name}` in the outbox"),
        }
    }
}

impl std::error::Error for OutboxError {}

/// What opening found and did, for the caller to log.
#[derive(Debug, Default)]
pub struct OpenReport {
    /// Set when the old file was unusable and moved aside.
    pub moved_aside: Option<(PathBuf, String)>,
    pub records: i64,
    pub open_batches: i64,
}

/// A batch handed to a sink.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub sink: String,
    /// Stable across retries and restarts; grows per sink.
    pub seq: i64,
    pub origin: Origin,
    /// Drawn when the outbox file was created: with `seq` it names the batch
    /// for good, even after the state was wiped and `seq` began again.
    pub outbox_id: String,
    /// This batch was handed out before (a retry, or a restart after a
    /// crash): the sink may already hold part or all of it.
    pub redelivered: bool,
    /// (record id, record), in id order.
    pub records: Vec<(i64, Record)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Origin {
    Pending,
    DeadLetter(i64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: i64,
    pub sink: String,
    pub seq: i64,
    pub count: i64,
    pub bytes: i64,
    pub error: String,
    pub state: String,
    pub attempts: i64,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SinkStats {
    pub name: String,
    /// The sink's own counters, by key.
    pub counters: Vec<(String, i64)>,
    pub pending: i64,
    pub delivered_records: i64,
    pub delivered_batches: i64,
    pub failures: i64,
    pub last_delivery_ms: Option<i64>,
    pub last_failure_ms: Option<i64>,
    pub last_error: Option<String>,
    pub dead_letters: i64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stats {
    pub records: i64,
    pub bytes: i64,
    pub oldest_at_ms: Option<i64>,
    pub sinks: Vec<SinkStats>,
    /// (reason, sink, count)
    pub drops: Vec<(String, String, i64)>,
    pub dead_letter_bytes: i64,
}

/// What an append did.
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    /// Ids given to the records that were stored (empty when none fit).
    pub ids: std::ops::RangeInclusive<i64>,
    /// Records dropped to stay within the bound (old ones, or incoming ones
    /// when a single group is larger than the whole buffer).
    pub dropped: i64,
}

pub struct Outbox {
    conn: Connection,
    path: PathBuf,
    max_bytes: i64,
    /// Charged bytes of `records`, kept in step with every transaction.
    bytes: i64,
    dead_bytes: i64,
    /// See [`Batch::outbox_id`].
    id: String,
}

fn sql_err<'a>(path: &'a Path, op: &'static str) -> impl Fn(rusqlite::Error) -> OutboxError + 'a {
    move |error| OutboxError::Sqlite {
        path: path.to_owned(),
        op,
        error,
    }
}

impl Outbox {
    /// Open (or create) the outbox in `dir`, moving an unusable file aside.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Outbox, OpenReport), OutboxError> {
        let path = dir.join(FILE_NAME);
        std::fs::create_dir_all(dir).map_err(|e| OutboxError::Unusable {
            path: path.clone(),
            detail: format!("cannot create its directory: {e}"),
        })?;
        let mut report = OpenReport::default();
        let conn = match open_checked(&path) {
            Ok(conn) => conn,
            Err(Verdict::Fatal(detail)) => return Err(OutboxError::Unusable { path, detail }),
            Err(Verdict::MoveAside(why)) => {
                let aside = move_aside(&path)?;
                report.moved_aside = Some((aside, why));
                open_checked(&path).map_err(|v| OutboxError::Unusable {
                    path: path.clone(),
                    detail: match v {
                        Verdict::Fatal(d) | Verdict::MoveAside(d) => d,
                    },
                })?
            }
        };
        let mut outbox = Outbox {
            conn,
            path,
            max_bytes: i64::try_from(max_bytes).unwrap_or(i64::MAX),
            bytes: 0,
            dead_bytes: 0,
            id: String::new(),
        };
        let path = outbox.path.clone();
        let e = sql_err(&path, "reading totals at start-up");
        let fresh_id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        outbox
            .conn
            .execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('outbox_id', ?1)",
                [&fresh_id],
            )
            .map_err(&e)?;
        outbox.id = outbox
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'outbox_id'", [], |r| {
                r.get(0)
            })
            .map_err(&e)?;
        outbox.bytes = outbox
            .conn
            .query_row("SELECT COALESCE(SUM(size), 0) FROM records", [], |r| {
                r.get(0)
            })
            .map_err(&e)?;
        outbox.dead_bytes = outbox
            .conn
            .query_row(
                "SELECT COALESCE(SUM(bytes), 0) FROM dead_letters",
                [],
                |r| r.get(0),
            )
            .map_err(&e)?;
        report.records = outbox
            .conn
            .query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0))
            .map_err(&e)?;
        report.open_batches = outbox
            .conn
            .query_row("SELECT COUNT(*) FROM batches", [], |r| r.get(0))
            .map_err(&e)?;
        Ok((outbox, report))
    }

    /// Open an existing outbox for reading while an agent may be writing it.
    pub fn open_read_only(dir: &Path) -> Result<Outbox, OutboxError> {
        Outbox::open_existing(dir, OpenFlags::SQLITE_OPEN_READ_ONLY)
    }

    /// Open an existing outbox to change dead letters beside a running agent:
    /// no schema work and no recovery, so it can never move a live file aside.
    pub fn open_admin(dir: &Path) -> Result<Outbox, OutboxError> {
        let mut o = Outbox::open_existing(dir, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        o.dead_bytes = o
            .conn
            .query_row(
                "SELECT COALESCE(SUM(bytes), 0) FROM dead_letters",
                [],
                |r| r.get(0),
            )
            .map_err(sql_err(&o.path, "reading totals"))?;
        Ok(o)
    }

    fn open_existing(dir: &Path, flags: OpenFlags) -> Result<Outbox, OutboxError> {
        let path = dir.join(FILE_NAME);
        if !path.exists() {
            return Err(OutboxError::Unusable {
                path,
                detail:
                    "it does not exist yet (has `edgemeter run` been started with this state_dir?)"
                        .into(),
            });
        }
        let conn = Connection::open_with_flags(&path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| OutboxError::Unusable {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql_err(&path, "setting busy timeout"))?;
        Ok(Outbox {
            conn,
            path,
            max_bytes: i64::MAX,
            bytes: 0,
            dead_bytes: 0,
            id: String::new(),
        })
    }

    /// Cap the database at its current size plus `extra_pages` (None: lift
    /// the cap), so tests meet SQLite's real "database or disk is full".
    #[cfg(test)]
    pub fn cap_pages(&self, extra_pages: Option<i64>) {
        let pages: i64 = self
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .expect("page_count");
        let cap = extra_pages.map_or(1_073_741_823, |extra| pages + extra);
        self.conn
            .execute_batch(&format!("PRAGMA max_page_count = {cap};"))
            .expect("max_page_count");
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes(&self) -> i64 {
        self.bytes
    }

    /// Make the set of sinks match the configuration: add new ones (they
    /// start with everything buffered), update what they take, and forget
    /// sinks that are gone. Returns the names forgotten.
    pub fn register_sinks(
        &mut self,
        sinks: &[(String, KindSet)],
    ) -> Result<Vec<String>, OutboxError> {
        let e = sql_err(&self.path, "registering sinks");
        let tx = self.conn.transaction().map_err(&e)?;
        let existing: Vec<String> = {
            let mut st = tx.prepare("SELECT name FROM sinks").map_err(&e)?;
            st.query_map([], |r| r.get(0))
                .map_err(&e)?
                .collect::<Result<_, _>>()
                .map_err(&e)?
        };
        let mut forgotten = Vec::new();
        for name in existing {
            if !sinks.iter().any(|(n, _)| *n == name) {
                tx.execute("DELETE FROM sinks WHERE name = ?1", [&name])
                    .map_err(&e)?;
                tx.execute("DELETE FROM batches WHERE sink = ?1", [&name])
                    .map_err(&e)?;
                forgotten.push(name);
            }
        }
        for (name, kinds) in sinks {
            tx.execute(
                "INSERT INTO sinks (name, kinds) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET kinds = excluded.kinds",
                params![name, kinds.bits()],
            )
            .map_err(&e)?;
        }
        let freed = collect_garbage(&tx).map_err(&e)?;
        tx.commit().map_err(&e)?;
        self.bytes -= freed;
        Ok(forgotten)
    }

    /// Append records in one transaction, dropping the oldest first if the
    /// bound requires it.
    pub fn append(&mut self, records: &[Record]) -> Result<Appended, OutboxError> {
        let e = sql_err(&self.path, "appending records");
        let now = now_ms();
        let encoded: Vec<String> = records.iter().map(|r| r.dims.encode()).collect();
        let sizes: Vec<i64> = records
            .iter()
            .zip(&encoded)
            .map(|(r, d)| r.charged_bytes(d))
            .collect();
        // A group larger than the whole buffer keeps its newest part.
        let mut skip = 0;
        let mut incoming: i64 = sizes.iter().sum();
        while incoming > self.max_bytes && skip < records.len() {
            incoming -= sizes[skip];
            skip += 1;
        }
        let tx = self.conn.transaction().map_err(&e)?;
        let mut dropped = skip as i64;
        if skip > 0 {
            count_drop(&tx, reason::BUFFER_FULL, NO_SINK, skip as i64).map_err(&e)?;
        }
        let mut freed = 0;
        let over = self.bytes + incoming - self.max_bytes;
        if over > 0 {
            let (n, f) = drop_oldest(&tx, over).map_err(&e)?;
            dropped += n;
            freed = f;
        }
        let mut first = None;
        let mut last = 0;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO records (kind, ts, name, dims, value, unit, payload, size, at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(&e)?;
            for ((r, dims), size) in records.iter().zip(&encoded).zip(&sizes).skip(skip) {
                st.execute(params![
                    r.kind as i64,
                    r.ts_ms,
                    r.name,
                    dims,
                    r.value,
                    r.unit,
                    r.payload,
                    size,
                    now
                ])
                .map_err(&e)?;
                last = tx.last_insert_rowid();
                first.get_or_insert(last);
            }
        }
        tx.commit().map_err(&e)?;
        self.bytes += incoming - freed;
        Ok(Appended {
            ids: first.unwrap_or(1)..=if first.is_some() { last } else { 0 },
            dropped,
        })
    }

    /// Hand the next batch to `sink` (see the module header for the order).
    pub fn next_batch(
        &mut self,
        sink: &str,
        max_records: usize,
    ) -> Result<Option<Batch>, OutboxError> {
        let e = sql_err(&self.path, "claiming a batch");
        let tx = self.conn.transaction().map_err(&e)?;
        let (kinds, cursor, next_seq) = sink_row(&tx, sink)
            .map_err(&e)?
            .ok_or_else(|| OutboxError::UnknownSink { name: sink.into() })?;

        // 1. A dead letter an operator asked to retry.
        let retry: Option<(i64, i64)> = tx
            .query_row(
                "SELECT id, seq FROM dead_letters WHERE sink = ?1 AND state = 'retry' ORDER BY id LIMIT 1",
                [sink],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(&e)?;
        if let Some((dead_id, seq)) = retry {
            let records = load_records(
                &tx,
                "SELECT id, kind, ts, name, dims, value, unit, payload FROM dead_records
                 WHERE dead_id = ?1 ORDER BY id",
                params![dead_id],
            )
            .map_err(&e)?;
            tx.execute(
                "UPDATE dead_letters SET attempts = attempts + 1, updated = ?2 WHERE id = ?1",
                params![dead_id, now_ms()],
            )
            .map_err(&e)?;
            tx.commit().map_err(&e)?;
            return Ok(Some(Batch {
                sink: sink.into(),
                seq,
                outbox_id: self.id.clone(),
                origin: Origin::DeadLetter(dead_id),
                redelivered: true,
                records,
            }));
        }

        // 2. The open batch, again.
        let open: Option<(i64, i64, i64, i64)> = tx
            .query_row(
                "SELECT seq, first_id, last_id, attempts FROM batches WHERE sink = ?1",
                [sink],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(&e)?;
        let mut freed = 0;
        if let Some((seq, first, last, attempts)) = open {
            let records = load_records(
                &tx,
                "SELECT id, kind, ts, name, dims, value, unit, payload FROM records
                 WHERE id BETWEEN ?1 AND ?2 AND ((1 << kind) & ?3) != 0 ORDER BY id",
                params![first, last, kinds.bits()],
            )
            .map_err(&e)?;
            if !records.is_empty() {
                tx.execute(
                    "UPDATE batches SET attempts = attempts + 1 WHERE sink = ?1 AND seq = ?2",
                    params![sink, seq],
                )
                .map_err(&e)?;
                tx.commit().map_err(&e)?;
                return Ok(Some(Batch {
                    sink: sink.into(),
                    seq,
                    outbox_id: self.id.clone(),
                    origin: Origin::Pending,
                    redelivered: attempts > 0,
                    records,
                }));
            }
            // Everything in it was dropped for space: nothing to deliver.
            freed += advance(&tx, sink, seq, last, 0).map_err(&e)?;
        }

        // 3. A new batch after the cursor.
        let cursor = cursor.max(open.map_or(0, |o| o.2));
        let records = load_records(
            &tx,
            &format!(
                "SELECT id, kind, ts, name, dims, value, unit, payload FROM records
                 WHERE id > ?1 AND ((1 << kind) & ?2) != 0 ORDER BY id LIMIT {max_records}"
            ),
            params![cursor, kinds.bits()],
        )
        .map_err(&e)?;
        let Some(&(last_id, _)) = records.last() else {
            // Nothing wanted: pass over what is there so it can be deleted.
            let top: i64 = tx
                .query_row("SELECT COALESCE(MAX(id), 0) FROM records", [], |r| r.get(0))
                .map_err(&e)?;
            if top > cursor {
                tx.execute(
                    "UPDATE sinks SET cursor = ?2 WHERE name = ?1",
                    params![sink, top],
                )
                .map_err(&e)?;
                freed += collect_garbage(&tx).map_err(&e)?;
            }
            tx.commit().map_err(&e)?;
            self.bytes -= freed;
            return Ok(None);
        };
        // The batch covers everything between the cursor and its last record,
        // including records of kinds this sink skips.
        tx.execute(
            "INSERT INTO batches (sink, seq, first_id, last_id, attempts, created)
             VALUES (?1, ?2, ?3, ?4, 1, ?5)",
            params![sink, next_seq, cursor + 1, last_id, now_ms()],
        )
        .map_err(&e)?;
        tx.execute(
            "UPDATE sinks SET next_seq = ?2 WHERE name = ?1",
            params![sink, next_seq + 1],
        )
        .map_err(&e)?;
        tx.commit().map_err(&e)?;
        self.bytes -= freed;
        Ok(Some(Batch {
            sink: sink.into(),
            seq: next_seq,
            outbox_id: self.id.clone(),
            origin: Origin::Pending,
            redelivered: false,
            records,
        }))
    }

    /// The sink confirmed `batch`.
    pub fn ack(&mut self, batch: &Batch) -> Result<(), OutboxError> {
        let e = sql_err(&self.path, "confirming a batch");
        let tx = self.conn.transaction().map_err(&e)?;
        let n = batch.records.len() as i64;
        let mut freed = 0;
        let mut dead_freed = 0;
        match batch.origin {
            Origin::Pending => {
                let last = open_batch_end(&tx, batch).map_err(&e)?;
                // No row: already confirmed (a duplicate ack), nothing to do.
                if let Some(last) = last {
                    freed = advance(&tx, &batch.sink, batch.seq, last, n).map_err(&e)?;
                }
            }
            Origin::DeadLetter(id) => {
                dead_freed = delete_dead(&tx, id).map_err(&e)?;
                tx.execute(
                    "UPDATE sinks SET delivered_records = delivered_records + ?2,
                     delivered_batches = delivered_batches + 1, last_delivery = ?3, last_error = NULL
                     WHERE name = ?1",
                    params![batch.sink, n, now_ms()],
                )
                .map_err(&e)?;
            }
        }
        tx.commit().map_err(&e)?;
        self.bytes -= freed;
        self.dead_bytes -= dead_freed;
        Ok(())
    }

    /// The sink took `batch` except `rejected` (record id, why): confirm the
    /// batch and keep those records as one dead letter, in one transaction.
    pub fn ack_with_rejects(
        &mut self,
        batch: &Batch,
        rejected: &[(i64, String)],
    ) -> Result<(), OutboxError> {
        if rejected.is_empty() || batch.origin != Origin::Pending {
            return self.ack(batch);
        }
        let e = sql_err(&self.path, "confirming a batch with rejected records");
        let now = now_ms();
        let tx = self.conn.transaction().map_err(&e)?;
        let Some(last) = open_batch_end(&tx, batch).map_err(&e)? else {
            // Already settled (a duplicate answer): nothing to do.
            return Ok(());
        };
        let ids: std::collections::HashSet<i64> = rejected.iter().map(|(id, _)| *id).collect();
        let kept: Vec<&(i64, Record)> = batch
            .records
            .iter()
            .filter(|(id, _)| ids.contains(id))
            .collect();
        let bytes: i64 = kept
            .iter()
            .map(|(_, r)| r.charged_bytes(&r.dims.encode()))
            .sum();
        // One entry per distinct reason, with how many records it covers.
        let mut reasons: Vec<(String, usize)> = Vec::new();
        for (_, why) in rejected {
            match reasons.iter_mut().find(|(w, _)| w == why) {
                Some((_, n)) => *n += 1,
                None => reasons.push((why.clone(), 1)),
            }
        }
        let error = reasons
            .iter()
            .map(|(w, n)| format!("{n} record(s): {w}"))
            .collect::<Vec<_>>()
            .join("; ");
        tx.execute(
            "INSERT INTO dead_letters (sink, seq, count, bytes, error, state, attempts, created, updated)
             VALUES (?1, ?2, ?3, ?4, ?5, 'dead', 1, ?6, ?6)",
            params![batch.sink, batch.seq, kept.len() as i64, bytes, error, now],
        )
        .map_err(&e)?;
        let dead_id = tx.last_insert_rowid();
        insert_dead_records(&tx, dead_id, kept.iter().map(|(id, r)| (*id, r))).map_err(&e)?;
        let delivered = (batch.records.len() - kept.len()) as i64;
        let freed = advance(&tx, &batch.sink, batch.seq, last, delivered).map_err(&e)?;
        self.dead_bytes += bytes;
        let evicted = evict_dead(&tx, self.dead_bytes - self.max_bytes / 4).map_err(&e)?;
        tx.commit().map_err(&e)?;
        self.bytes -= freed;
        self.dead_bytes -= evicted;
        Ok(())
    }

    /// The sink refused `batch` for good: keep it as a dead letter with `error`.
    pub fn dead_letter(&mut self, batch: &Batch, error: &str) -> Result<(), OutboxError> {
        let e = sql_err(&self.path, "dead-lettering a batch");
        let now = now_ms();
        let tx = self.conn.transaction().map_err(&e)?;
        let mut freed = 0;
        match batch.origin {
            Origin::DeadLetter(id) => {
                tx.execute(
                    "UPDATE dead_letters SET state = 'dead', error = ?2, updated = ?3 WHERE id = ?1",
                    params![id, error, now],
                )
                .map_err(&e)?;
            }
            Origin::Pending => {
                let Some(last) = open_batch_end(&tx, batch).map_err(&e)? else {
                    // Already settled (a duplicate answer): nothing to do.
                    return Ok(());
                };
                let bytes: i64 = batch
                    .records
                    .iter()
                    .map(|(_, r)| r.charged_bytes(&r.dims.encode()))
                    .sum();
                tx.execute(
                    "INSERT INTO dead_letters (sink, seq, count, bytes, error, state, attempts, created, updated)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'dead', 1, ?6, ?6)",
                    params![batch.sink, batch.seq, batch.records.len() as i64, bytes, error, now],
                )
                .map_err(&e)?;
                let dead_id = tx.last_insert_rowid();
                insert_dead_records(&tx, dead_id, batch.records.iter().map(|(id, r)| (*id, r)))
                    .map_err(&e)?;
                freed = advance(&tx, &batch.sink, batch.seq, last, 0).map_err(&e)?;
                self.dead_bytes += bytes;
            }
        }
        tx.execute(
            "UPDATE sinks SET failures = failures + 1, last_failure = ?2, last_error = ?3 WHERE name = ?1",
            params![batch.sink, now, error],
        )
        .map_err(&e)?;
        let budget = self.max_bytes / 4;
        let evicted = evict_dead(&tx, self.dead_bytes - budget).map_err(&e)?;
        tx.commit().map_err(&e)?;
        self.bytes -= freed;
        self.dead_bytes -= evicted;
        Ok(())
    }

    /// A delivery attempt failed and will be retried: remember it for status.
    pub fn note_failure(&mut self, sink: &str, error: &str) -> Result<(), OutboxError> {
        self.conn
            .execute(
                "UPDATE sinks SET failures = failures + 1, last_failure = ?2, last_error = ?3 WHERE name = ?1",
                params![sink, now_ms(), error],
            )
            .map_err(sql_err(&self.path, "noting a failed delivery"))?;
        Ok(())
    }

    /// Add to a sink's own counters (`requests`, `bytes_sent`, ...).
    pub fn bump(&mut self, sink: &str, deltas: &[(&str, i64)]) -> Result<(), OutboxError> {
        let e = sql_err(&self.path, "counting");
        let tx = self.conn.transaction().map_err(&e)?;
        for (key, n) in deltas.iter().filter(|(_, n)| *n != 0) {
            tx.execute(
                "INSERT INTO counters (sink, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (sink, key) DO UPDATE SET value = value + excluded.value",
                params![sink, key, n],
            )
            .map_err(&e)?;
        }
        tx.commit().map_err(&e)
    }

    /// Count records given up on before they reached the outbox.
    pub fn count_drops(&mut self, why: &str, n: i64) -> Result<(), OutboxError> {
        count_drop(&self.conn, why, NO_SINK, n).map_err(sql_err(&self.path, "counting drops"))
    }

    pub fn dead_letters(&self, sink: Option<&str>) -> Result<Vec<DeadLetter>, OutboxError> {
        let e = sql_err(&self.path, "listing dead letters");
        let mut st = self
            .conn
            .prepare(
                "SELECT id, sink, seq, count, bytes, error, state, attempts, created FROM dead_letters
                 WHERE ?1 IS NULL OR sink = ?1 ORDER BY id",
            )
            .map_err(&e)?;
        st.query_map([sink], |r| {
            Ok(DeadLetter {
                id: r.get(0)?,
                sink: r.get(1)?,
                seq: r.get(2)?,
                count: r.get(3)?,
                bytes: r.get(4)?,
                error: r.get(5)?,
                state: r.get(6)?,
                attempts: r.get(7)?,
                created_ms: r.get(8)?,
            })
        })
        .map_err(&e)?
        .collect::<Result<_, _>>()
        .map_err(&e)
    }

    /// Mark dead letters (all, one sink's, or one by id) for redelivery.
    pub fn retry_dead(
        &mut self,
        sink: Option<&str>,
        id: Option<i64>,
    ) -> Result<usize, OutboxError> {
        self.conn
            .execute(
                "UPDATE dead_letters SET state = 'retry', updated = ?3
                 WHERE state = 'dead' AND (?1 IS NULL OR sink = ?1) AND (?2 IS NULL OR id = ?2)",
                params![sink, id, now_ms()],
            )
            .map_err(sql_err(&self.path, "marking dead letters for retry"))
    }

    /// Delete dead letters (all, one sink's, or one by id).
    pub fn purge_dead(
        &mut self,
        sink: Option<&str>,
        id: Option<i64>,
    ) -> Result<usize, OutboxError> {
        let e = sql_err(&self.path, "purging dead letters");
        let tx = self.conn.transaction().map_err(&e)?;
        let ids: Vec<i64> = {
            let mut st = tx
                .prepare("SELECT id FROM dead_letters WHERE (?1 IS NULL OR sink = ?1) AND (?2 IS NULL OR id = ?2)")
                .map_err(&e)?;
            st.query_map(params![sink, id], |r| r.get(0))
                .map_err(&e)?
                .collect::<Result<_, _>>()
                .map_err(&e)?
        };
        let mut freed = 0;
        for id in &ids {
            freed += delete_dead(&tx, *id).map_err(&e)?;
        }
        tx.commit().map_err(&e)?;
        self.dead_bytes -= freed;
        Ok(ids.len())
    }

    pub fn stats(&self) -> Result<Stats, OutboxError> {
        let e = sql_err(&self.path, "reading status");
        let c = &self.conn;
        let (records, bytes, oldest) = c
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(at) FROM records",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(&e)?;
        let mut st = c
            .prepare(
                "SELECT s.name,
                   (SELECT COUNT(*) FROM records r WHERE r.id > s.cursor AND ((1 << r.kind) & s.kinds) != 0),
                   s.delivered_records, s.delivered_batches, s.failures, s.last_delivery, s.last_failure,
                   s.last_error, (SELECT COUNT(*) FROM dead_letters d WHERE d.sink = s.name)
                 FROM sinks s ORDER BY s.name",
            )
            .map_err(&e)?;
        let mut sinks: Vec<SinkStats> = st
            .query_map([], |r| {
                Ok(SinkStats {
                    name: r.get(0)?,
                    pending: r.get(1)?,
                    delivered_records: r.get(2)?,
                    delivered_batches: r.get(3)?,
                    failures: r.get(4)?,
                    last_delivery_ms: r.get(5)?,
                    last_failure_ms: r.get(6)?,
                    last_error: r.get(7)?,
                    dead_letters: r.get(8)?,
                    counters: Vec::new(),
                })
            })
            .map_err(&e)?
            .collect::<Result<_, _>>()
            .map_err(&e)?;
        for s in &mut sinks {
            let mut st = c
                .prepare_cached("SELECT key, value FROM counters WHERE sink = ?1 ORDER BY key")
                .map_err(&e)?;
            s.counters = st
                .query_map([&s.name], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(&e)?
                .collect::<Result<_, _>>()
                .map_err(&e)?;
        }
        let mut st = c
            .prepare("SELECT reason, sink, count FROM drops ORDER BY reason, sink")
            .map_err(&e)?;
        let drops = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(&e)?
            .collect::<Result<_, _>>()
            .map_err(&e)?;
        let dead_letter_bytes = c
            .query_row(
                "SELECT COALESCE(SUM(bytes), 0) FROM dead_letters",
                [],
                |r| r.get(0),
            )
            .map_err(&e)?;
        Ok(Stats {
            records,
            bytes,
            oldest_at_ms: oldest,
            sinks,
            drops,
            dead_letter_bytes,
        })
    }
}

// ---------------------------------------------------------------- opening

enum Verdict {
    /// Not ours or broken: move it aside and start fresh.
    MoveAside(String),
    /// Cannot be used, and moving it would not help (permissions, ...).
    Fatal(String),
}

fn open_checked(path: &Path) -> Result<Connection, Verdict> {
    let classify = |e: rusqlite::Error| match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
            Verdict::MoveAside(format!("it is not a readable SQLite database ({e})"))
        }
        _ => Verdict::Fatal(e.to_string()),
    };
    if path.is_dir() {
        return Err(Verdict::Fatal("it is a directory".into()));
    }
    let conn = Connection::open(path).map_err(classify)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(classify)?;
    // The first statement that reads the file is where SQLite notices it is
    // not a database, so everything up to the integrity check goes through
    // `classify`.
    let app_id: i64 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(classify)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(classify)?;
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
        .map_err(classify)?;
    if app_id != APPLICATION_ID && (app_id != 0 || !tables.is_empty()) {
        return Err(Verdict::MoveAside(format!(
            "it belongs to another program (application_id {app_id:#x}, tables: {})",
            tables.join(", ")
        )));
    }
    if let Some(t) = tables.iter().find(|t| !OUR_TABLES.contains(&t.as_str())) {
        return Err(Verdict::MoveAside(format!(
            "it holds a table edgemeter does not know (`{t}`)"
        )));
    }
    if version > SCHEMA_VERSION {
        return Err(Verdict::MoveAside(format!(
            "it was written by a newer edgemeter (schema {version}, this one knows {SCHEMA_VERSION})"
        )));
    }
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(classify)?;
    if check != "ok" {
        return Err(Verdict::MoveAside(format!(
            "its integrity check failed: {check}"
        )));
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(classify)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Verdict::Fatal(format!(
            "SQLite refused WAL mode (got `{mode}`)"
        )));
    }
    conn.execute_batch(&format!(
        "PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = OFF;
         BEGIN;
         {SCHEMA}
         PRAGMA application_id = {APPLICATION_ID};
         PRAGMA user_version = {SCHEMA_VERSION};
         COMMIT;"
    ))
    .map_err(classify)?;
    Ok(conn)
}

fn move_aside(path: &Path) -> Result<PathBuf, OutboxError> {
    crate::state_dir::move_aside(path).map_err(|(to, e)| OutboxError::Unusable {
        path: path.to_owned(),
        detail: format!(
            "it is unusable and could not be moved aside to {}: {e}",
            to.display()
        ),
    })
}

// ---------------------------------------------------------------- helpers (inside a transaction)

/// The last record id of `batch` if it is still open (not yet settled).
fn open_batch_end(tx: &Transaction, batch: &Batch) -> rusqlite::Result<Option<i64>> {
    tx.query_row(
        "SELECT last_id FROM batches WHERE sink = ?1 AND seq = ?2",
        params![batch.sink, batch.seq],
        |r| r.get(0),
    )
    .optional()
}

fn sink_row(tx: &Transaction, sink: &str) -> rusqlite::Result<Option<(KindSet, i64, i64)>> {
    tx.query_row(
        "SELECT kinds, cursor, next_seq FROM sinks WHERE name = ?1",
        [sink],
        |r| Ok((KindSet::from_bits(r.get(0)?), r.get(1)?, r.get(2)?)),
    )
    .optional()
}

fn load_records(
    tx: &Transaction,
    sql: &str,
    args: impl rusqlite::Params,
) -> rusqlite::Result<Vec<(i64, Record)>> {
    let mut st = tx.prepare_cached(sql)?;
    let rows = st.query_map(args, |r| {
        let kind_code: i64 = r.get(1)?;
        let dims: String = r.get(4)?;
        Ok((
            r.get::<_, i64>(0)?,
            Record {
                // Written only by `append`; an unknown code means the row was
                // tampered with, and it is still better delivered as a point.
                kind: Kind::from_code(kind_code).unwrap_or(Kind::Point),
                ts_ms: r.get(2)?,
                name: r.get(3)?,
                dims: Dims::decode(&dims).unwrap_or_default(),
                value: r.get(5)?,
                unit: r.get(6)?,
                payload: r.get(7)?,
            },
        ))
    })?;
    rows.collect()
}

/// Move `sink`'s cursor past batch `seq` (ending at `last`), count `n`
/// records as delivered (0 for a dead letter or an empty batch), and delete
/// what every sink has passed. Returns the bytes freed.
fn advance(tx: &Transaction, sink: &str, seq: i64, last: i64, n: i64) -> rusqlite::Result<i64> {
    tx.execute(
        "DELETE FROM batches WHERE sink = ?1 AND seq = ?2",
        params![sink, seq],
    )?;
    if n > 0 {
        tx.execute(
            "UPDATE sinks SET cursor = MAX(cursor, ?2), delivered_records = delivered_records + ?3,
             delivered_batches = delivered_batches + 1, last_delivery = ?4, last_error = NULL
             WHERE name = ?1",
            params![sink, last, n, now_ms()],
        )?;
    } else {
        tx.execute(
            "UPDATE sinks SET cursor = MAX(cursor, ?2) WHERE name = ?1",
            params![sink, last],
        )?;
    }
    collect_garbage(tx)
}

/// Delete records every sink has passed. With no sinks, nothing is passed:
/// the records stay, bounded by the buffer size.
fn collect_garbage(tx: &Transaction) -> rusqlite::Result<i64> {
    let min: Option<i64> = tx.query_row("SELECT MIN(cursor) FROM sinks", [], |r| r.get(0))?;
    let Some(min) = min else { return Ok(0) };
    let freed: i64 = tx.query_row(
        "SELECT COALESCE(SUM(size), 0) FROM records WHERE id <= ?1",
        [min],
        |r| r.get(0),
    )?;
    if freed > 0 {
        tx.execute("DELETE FROM records WHERE id <= ?1", [min])?;
    }
    Ok(freed)
}

/// Drop the oldest records until at least `need` bytes are freed; count the
/// drops against every sink that had not passed them. Returns (records, bytes).
fn drop_oldest(tx: &Transaction, need: i64) -> rusqlite::Result<(i64, i64)> {
    let (mut cutoff, mut freed, mut n) = (0i64, 0i64, 0i64);
    {
        let mut st = tx.prepare_cached("SELECT id, size FROM records ORDER BY id")?;
        let mut rows = st.query([])?;
        while freed < need {
            let Some(row) = rows.next()? else { break };
            cutoff = row.get(0)?;
            freed += row.get::<_, i64>(1)?;
            n += 1;
        }
    }
    if n == 0 {
        return Ok((0, 0));
    }
    let sinks: Vec<(String, i64, i64)> = {
        let mut st = tx.prepare_cached("SELECT name, cursor, kinds FROM sinks")?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?
    };
    if sinks.is_empty() {
        count_drop(tx, reason::BUFFER_FULL, NO_SINK, n)?;
    }
    for (name, cursor, kinds) in sinks {
        let missed: i64 = tx.query_row(
            "SELECT COUNT(*) FROM records WHERE id > ?1 AND id <= ?2 AND ((1 << kind) & ?3) != 0",
            params![cursor, cutoff, kinds],
            |r| r.get(0),
        )?;
        if missed > 0 {
            count_drop(tx, reason::BUFFER_FULL, &name, missed)?;
        }
    }
    tx.execute("DELETE FROM records WHERE id <= ?1", [cutoff])?;
    Ok((n, freed))
}

fn count_drop(c: &Connection, why: &str, sink: &str, n: i64) -> rusqlite::Result<()> {
    c.execute(
        "INSERT INTO drops (reason, sink, count) VALUES (?1, ?2, ?3)
         ON CONFLICT (reason, sink) DO UPDATE SET count = count + excluded.count",
        params![why, sink, n],
    )?;
    Ok(())
}

fn insert_dead_records<'r>(
    tx: &Transaction,
    dead_id: i64,
    records: impl Iterator<Item = (i64, &'r Record)>,
) -> rusqlite::Result<()> {
    let mut st = tx.prepare_cached(
        "INSERT INTO dead_records (dead_id, id, kind, ts, name, dims, value, unit, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for (id, r) in records {
        st.execute(params![
            dead_id,
            id,
            r.kind as i64,
            r.ts_ms,
            r.name,
            r.dims.encode(),
            r.value,
            r.unit,
            r.payload
        ])?;
    }
    Ok(())
}

fn delete_dead(tx: &Transaction, id: i64) -> rusqlite::Result<i64> {
    let bytes: i64 = tx
        .query_row("SELECT bytes FROM dead_letters WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(0);
    tx.execute("DELETE FROM dead_records WHERE dead_id = ?1", [id])?;
    tx.execute("DELETE FROM dead_letters WHERE id = ?1", [id])?;
    Ok(bytes)
}

/// Evict the oldest dead letters until `over` bytes are freed, counting
/// their records as dropped. Returns the bytes freed.
fn evict_dead(tx: &Transaction, over: i64) -> rusqlite::Result<i64> {
    let mut freed = 0;
    while freed < over {
        let Some((id, sink, count)) = tx
            .query_row(
                "SELECT id, sink, count FROM dead_letters ORDER BY id LIMIT 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )
            .optional()?
        else {
            break;
        };
        count_drop(tx, reason::DEAD_LETTER_EVICTED, &sink, count)?;
        freed += delete_dead(tx, id)?;
    }
    Ok(freed)
}

#[cfg(test)]
mod tests;
