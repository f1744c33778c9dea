//! The outbox: every observation, durably, until every sink that wants it
//! has confirmed it.
//!
//! # Constraints
//! - A record is committed to SQLite before anything downstream sees it, and
//!   it leaves the outbox only in the transaction that records the last
//!   wanting sink's confirmation. Every state change is one transaction.
//! - What each failure can lose (WAL mode, `synchronous = NORMAL`: a commit
//!   writes the WAL without waiting for the disk; the writer fsyncs the WAL
//!   once a second, [`Outbox::sync`], as part of a checkpoint when one is
//!   due):
//!   - **the process dies** (`kill -9`, a panic, the OOM killer): nothing
//!     committed; the records received but not yet committed, at most
//!     `flush_interval_secs` of them (0.1 s by default), plus a commit in
//!     progress. Bytes still in a socket's kernel buffer were never received:
//!     the relay source leaves a busy stream's bytes there for up to 20 ms
//!     between reads (`sources::relay::rest`).
//!   - **the machine dies** (power cut, kernel panic): also the commits of
//!     the last second at most. The file is never corrupt: SQLite discards
//!     a torn WAL tail at open. A lost confirmation only means a batch is
//!     sent again, with the same `(sink, seq)`.
//!   - **the disk is full**: nothing committed. A commit that does not fit
//!     fails as a whole; the agent's writer holds the records and tries
//!     again (`agent::write_records`). Stopped before space returns, it
//!     loses what it holds, and says how many.
//!   - The disk sees one fsync a second at steady load, and one more at
//!     each checkpoint, which the writer takes at a sync once 16 MiB of WAL
//!     are written: what an SD card can bear.
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
//! # Schema (`PRAGMA application_id` = `EDM1`, `user_version` = 3)
//! - `records(id AUTOINCREMENT, kind, ts, name, dims, value, unit, payload,
//!   size, at, n)`: appended by the writer, a row holding `n` records (see
//!   "Rows"). AUTOINCREMENT because sink cursors compare ids: an id must
//!   never be reused after its row is deleted.
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
//! - `meta(key, value)`: the outbox's id (`outbox_id`), and each sink's
//!   last reading of its receiver's clock (`peer_clock:<sink>`, "offset_ms
//!   read_ms"), for `edgemeter status`.
//!
//! # Rows
//! Every record has its own id; a row holds one record or several.
//! - The events of one series (kind, name, dims, unit, value) in one append
//!   are stored together, in the order they arrived, at the place of the
//!   series' first event; any other record stays where it arrived. So a
//!   relay stream's messages of one commit (0.1 s) are one run, though the
//!   source hands them over a read at a time (about 11 at 20,000 a second)
//!   with the other streams' reads between. A run is stored in rows of at
//!   most [`BUNDLE_MAX`] events and about 3.8 KB of payload, so that a row
//!   fits its 4 KiB page. SQLite's work per row (the statement, the b-tree cell)
//!   is then shared, and the series' columns are stored once. Relay
//!   messages in reads of 11 (`benches/outbox.rs`): 0.50 µs of CPU per
//!   message and 217 bytes on disk; a row per read took 0.81 µs and 374
//!   bytes (two rows of 11 do not fit a page), and one row per message 0.73
//!   µs and 274 bytes.
//! - The row's id is its **last** record's id and `n` its count: it holds
//!   ids `id - n + 1 ..= id`. Its `ts` is the first record's, its `size` the
//!   sum of its records' charged bytes.
//! - With `n > 1` the payload is the records' `(ts, payload)` one after the
//!   other: the time as 8 bytes and the payload's length as 4 (both
//!   little-endian), then the payload.
//! - Reading unpacks rows into records, so sinks, batches, dead letters and
//!   every count see records, never rows. A batch may end inside a row; a
//!   sink's cursor is then inside it too, and the row is deleted once every
//!   sink's cursor has passed its last id. Dropping for space drops whole
//!   rows, counting each record.
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
//!
//! # Files
//! This file holds the schema, the types and `Outbox::write` (one
//! transaction, its errors named); one file per role holds its `impl`:
//! `open.rs` (creating, checking, recovery, moving aside), `append.rs`
//! (appending within the budget, dropping the oldest), `durable.rs`
//! (the WAL's sync and the checkpoints), `deliver.rs`
//! (claiming, confirming and failing batches), `dead.rs` (dead letters and
//! their budget), `stats.rs` (what `status` shows).

use std::fmt;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, params};

use crate::clock::now_ms;
use crate::record::{Dims, Kind, KindSet, Record};

mod append;
mod dead;
mod deliver;
mod durable;
mod open;
mod stats;

// The helpers each role's transactions share (inside a transaction).
use append::{BUNDLE_MAX, PACKED_HEADER, collect_garbage, count_drop};
use dead::{delete_dead, evict_dead, insert_dead_records};
use deliver::{accepted_ids, advance, forget_accepted, open_batch_end};

pub const FILE_NAME: &str = "outbox.db";
const APPLICATION_ID: i64 = 0x4544_4D31; // "EDM1"
/// 2: `accepted`, the records of an unsettled batch a receiver took.
/// 3: `records.n`, a row of several events (see "Rows" above).
const SCHEMA_VERSION: i64 = 3;
const OUR_TABLES: &[&str] = &[
    "records",
    "sinks",
    "batches",
    "dead_letters",
    "dead_records",
    "drops",
    "counters",
    "meta",
    "accepted",
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
    at      INTEGER NOT NULL,
    n       INTEGER NOT NULL DEFAULT 1
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
CREATE TABLE IF NOT EXISTS accepted (
    sink TEXT    NOT NULL,
    seq  INTEGER NOT NULL,
    id   INTEGER NOT NULL,
    PRIMARY KEY (sink, seq, id)
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
    /// (record id, record), in id order: those the receiver has not
    /// accepted yet.
    pub records: Vec<(i64, Record)>,
    /// Records of this batch a receiver accepted in earlier attempts (left
    /// out of `records`, counted as delivered when the batch settles).
    pub accepted_before: i64,
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
    /// The sink's last reading of its receiver's clock: (the receiver's
    /// less ours, when it was read), ms.
    pub peer_clock: Option<(i64, i64)>,
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
    /// SQL for the records a row holds: `n`, or `1` in an outbox of a schema
    /// before 3 opened without upgrading it (`edgemeter status` while an
    /// older agent runs).
    per_row: &'static str,
    /// The WAL's length in pages after the last commit, for the writer,
    /// which checkpoints at its syncs (`durable.rs`); 0 for other handles.
    wal_pages: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// The WAL, held open by the writer to sync it (`durable.rs`); None
    /// for other handles until they sync.
    wal: Option<crate::state_dir::WalFile>,
}

impl Outbox {
    /// Run `f` in one transaction and commit it; any SQLite error, the
    /// commit's included, becomes an [`OutboxError`] naming `op`. Dropping
    /// the transaction on an error rolls it back.
    fn write<T>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, OutboxError> {
        let e = sql_err(&self.path, op);
        let tx = self.conn.transaction().map_err(&e)?;
        let v = f(&tx).map_err(&e)?;
        tx.commit().map_err(&e)?;
        Ok(v)
    }
}

fn sql_err<'a>(path: &'a Path, op: &'static str) -> impl Fn(rusqlite::Error) -> OutboxError + 'a {
    move |error| OutboxError::Sqlite {
        path: path.to_owned(),
        op,
        error,
    }
}

#[cfg(test)]
mod tests;
