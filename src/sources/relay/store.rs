//! The relay source's analytics state in its own SQLite file beside the
//! outbox (`relay-<name>.db`), so counts, activity and the command chains
//! carry on across restarts: per user×hardware activity, and per
//! user×exp×course graph (nodes, edge counts, last command). Written as
//! upserts of what changed, every 2 s and at shutdown.
//!
//! Its commits do not wait for the disk (`synchronous = NORMAL`): a
//! process that dies loses none of them. They are made to survive a power
//! cut by an fsync of the WAL at most [`SYNC_EVERY`] after the first one
//! not yet synced, and at shutdown: a save every 2 s with an fsync each
//! (`synchronous = FULL`, as before) added half an fsync a second to the
//! outbox's one, on an SD card, for analytics that a power cut may now set
//! back by up to 30 s instead of 2 (issue 18: at most one fsync a second).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, params};

use super::adopt::RawMark;
use super::analytics::{Activity, Analytics, Chain, Graph, GraphKey, SavedChain};
use super::answers::Feedback;

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA cache_size = -512;
CREATE TABLE IF NOT EXISTS activity (
    user     TEXT NOT NULL,
    hardware TEXT NOT NULL,
    first_ms INTEGER NOT NULL,
    last_ms  INTEGER NOT NULL,
    messages INTEGER NOT NULL,
    minutes  INTEGER NOT NULL,
    PRIMARY KEY (user, hardware)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS graphs (
    user   TEXT NOT NULL,
    exp    TEXT NOT NULL,
    course TEXT NOT NULL,
    nodes  TEXT NOT NULL,   -- JSON array of node names, in matrix order
    counts TEXT NOT NULL,   -- JSON array: the n×n transition counts, row = previous
    last   INTEGER,         -- index of the last command, which the next one continues
    PRIMARY KEY (user, exp, course)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS raw_files (
    name     TEXT PRIMARY KEY,  -- a raw message file in files_dir
    bytes    INTEGER NOT NULL,  -- its size and modification time when
    mtime_ns INTEGER NOT NULL   -- edgemeter last appended to it or read it
) WITHOUT ROWID;
-- The least recently written first, when the raw files pass their bound.
CREATE INDEX IF NOT EXISTS raw_files_by_time ON raw_files (mtime_ns, name);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS feedback (
    user   TEXT NOT NULL,
    exp    TEXT NOT NULL,
    course TEXT NOT NULL,
    csv    TEXT NOT NULL,   -- the client's <user>-<exp>-<course>-feedback.csv
    PRIMARY KEY (user, exp, course)
) WITHOUT ROWID;
";

const GRAPH_ROWS: &str = "SELECT user, exp, course, nodes, counts, last FROM graphs";

/// Column `i` of a row as text borrowed from SQLite, not copied.
fn text_at<'r>(r: &'r rusqlite::Row, i: usize) -> rusqlite::Result<&'r str> {
    Ok(r.get_ref(i)?.as_str()?)
}

/// Each saved chain of `sql` (over [`GRAPH_ROWS`]) handed to `each` as it
/// is read, borrowed from SQLite's row: user, exp, course and the chain,
/// or `None` for a chain whose columns do not parse. SQLite's errors are
/// told by `err`, `each`'s own as it says them.
fn each_graph(
    conn: &Connection,
    sql: &str,
    err: impl Fn(rusqlite::Error) -> String,
    mut each: impl FnMut([&str; 3], Option<Chain>) -> Result<(), String>,
) -> Result<(), String> {
    let mut st = conn.prepare(sql).map_err(&err)?;
    let mut rows = st.query([]).map_err(&err)?;
    while let Some(r) = rows.next().map_err(&err)? {
        let text = |i| text_at(r, i).map_err(&err);
        let key = [text(0)?, text(1)?, text(2)?];
        let last: Option<i64> = r.get(5).map_err(&err)?;
        let chain = serde_json::from_str(text(3)?)
            .ok()
            .zip(serde_json::from_str(text(4)?).ok())
            .and_then(|(n, c)| Chain::from_parts(n, c, last.and_then(|l| usize::try_from(l).ok())));
        each(key, chain)?;
    }
    Ok(())
}

/// The command graphs of a relay source's state file, read without
/// writing (for the agent's status page, beside the running source): at
/// most `limit`, by user. Missing file: none.
pub fn read_graphs(path: &Path, limit: usize) -> Result<Vec<(GraphKey, Graph)>, String> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let err = |e: rusqlite::Error| format!("cannot read {}: {e}", path.display());
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(err)?;
    conn.busy_timeout(std::time::Duration::from_secs(2))
        .map_err(err)?;
    let mut out = Vec::new();
    each_graph(
        &conn,
        &format!("{GRAPH_ROWS} ORDER BY user, exp, course LIMIT {limit}"),
        err,
        |[user, exp, course], chain| {
            if let Some(c) = chain {
                let key = GraphKey {
                    user: user.to_owned(),
                    exp: exp.to_owned(),
                    course: course.to_owned(),
                };
                out.push((key, c.to_graph()));
            }
            Ok(())
        },
    )?;
    Ok(out)
}

/// The longest a committed save waits to be made durable against a power
/// cut: the kernel's own writeback of dirty pages comes after 30 s too.
pub const SYNC_EVERY: Duration = Duration::from_secs(30);

pub struct Store {
    conn: Connection,
    path: PathBuf,
    wal: crate::state_dir::WalFile,
    /// When the first commit not yet synced was made.
    unsynced_since: Option<Instant>,
}

/// Record each raw file's mark as it is now (read, made or cut).
fn put_marks<'a>(
    tx: &rusqlite::Transaction,
    marks: impl IntoIterator<Item = &'a RawMark>,
) -> rusqlite::Result<()> {
    let mut put = tx.prepare_cached(
        "INSERT OR REPLACE INTO raw_files (name, bytes, mtime_ns) VALUES (?1, ?2, ?3)",
    )?;
    for m in marks {
        put.execute(params![m.name, m.bytes as i64, m.mtime_ns])?;
    }
    Ok(())
}

/// A raw file edgemeter appended to: as it was just before (None: it did
/// not exist) and just after.
#[derive(Debug)]
pub struct Appended {
    pub before: Option<RawMark>,
    pub after: RawMark,
}

/// Rows [`Store::load`] restored.
#[derive(Debug, Default, PartialEq)]
pub struct Loaded {
    /// User×hardware activity rows.
    pub activity: usize,
    pub graphs: usize,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, String> {
        let conn = super::super::open_own_db(
            path,
            SCHEMA,
            "starting the analytics afresh (the events in the outbox are unaffected)",
        )?;
        Ok(Store {
            conn,
            path: path.to_owned(),
            wal: crate::state_dir::WalFile::of(path),
            unsynced_since: None,
        })
    }

    /// When the commits not yet synced are due to be, if there are any.
    pub fn sync_due(&self) -> Option<Instant> {
        self.unsynced_since.map(|t| t + SYNC_EVERY)
    }

    /// Fsync the WAL if commits are waiting for it and they are due, or
    /// `now_anyway` (at shutdown).
    pub fn sync(&mut self, now_anyway: bool) -> Result<(), String> {
        let due = self
            .sync_due()
            .is_some_and(|at| now_anyway || Instant::now() >= at);
        if !due {
            return Ok(());
        }
        self.wal.sync().map_err(|e| {
            format!(
                "cannot sync the relay analytics state {}: {e}",
                self.path.display()
            )
        })?;
        self.unsynced_since = None;
        Ok(())
    }

    /// A save was committed: it waits for the next [`Store::sync`].
    fn committed(&mut self) {
        self.unsynced_since.get_or_insert_with(Instant::now);
    }

    /// Restore the saved state into `into`, a row at a time: a restart
    /// with many users never holds their rows beside what they become.
    pub fn load(&self, into: &mut Analytics) -> Result<Loaded, String> {
        let err = |e: rusqlite::Error| format!("cannot read the relay analytics state: {e}");
        let mut loaded = Loaded::default();
        let mut st = self
            .conn
            .prepare("SELECT user, hardware, first_ms, last_ms, messages, minutes FROM activity")
            .map_err(err)?;
        let mut rows = st.query([]).map_err(err)?;
        while let Some(r) = rows.next().map_err(err)? {
            let text = |i| text_at(r, i).map_err(err);
            let a = Activity {
                first_ms: r.get(2).map_err(err)?,
                last_ms: r.get(3).map_err(err)?,
                messages: r.get::<_, i64>(4).map_err(err)? as u64,
                minutes: r.get::<_, i64>(5).map_err(err)? as u64,
            };
            into.restore_activity(text(0)?, text(1)?, a);
            loaded.activity += 1;
        }
        each_graph(&self.conn, GRAPH_ROWS, err, |[user, exp, course], chain| {
            let chain = chain.ok_or_else(|| {
                format!("relay analytics state: the chain of {user}-{exp}-{course} does not parse")
            })?;
            into.restore_graph(user, exp, course, &chain);
            loaded.graphs += 1;
            Ok(())
        })?;
        Ok(loaded)
    }

    /// Whether the last run wrote every analytics file in `files_dir` and
    /// synced them before it stopped ([`Store::set_files_complete`]). Taken:
    /// cleared, and the clear synced, before this run writes any file, so
    /// that a crash in it never leaves the mark standing over files a
    /// power cut may have torn.
    pub fn take_files_complete(&mut self) -> Result<bool, String> {
        let err = |e: rusqlite::Error| format!("cannot read the relay analytics state: {e}");
        let removed = self
            .conn
            .execute("DELETE FROM meta WHERE key = 'files_complete'", [])
            .map_err(err)?;
        if removed > 0 {
            self.committed();
            self.sync(true)?;
        }
        Ok(removed > 0)
    }

    /// Every analytics file is written and synced as this state holds it:
    /// the next start need not rewrite them. Synced at once.
    pub fn set_files_complete(&mut self) -> Result<(), String> {
        let err = |e: rusqlite::Error| format!("cannot save the relay analytics state: {e}");
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('files_complete', 1)",
                [],
            )
            .map_err(err)?;
        self.committed();
        self.sync(true)
    }

    /// The dashboards' feedback counts, per user×exp×course.
    pub fn load_feedback(&self) -> Result<HashMap<GraphKey, Feedback>, String> {
        let err = |e: rusqlite::Error| format!("cannot read the relay feedback state: {e}");
        let mut st = self
            .conn
            .prepare("SELECT user, exp, course, csv FROM feedback")
            .map_err(err)?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    GraphKey {
                        user: r.get(0)?,
                        exp: r.get(1)?,
                        course: r.get(2)?,
                    },
                    r.get::<_, String>(3)?,
                ))
            })
            .map_err(err)?;
        let mut out = HashMap::new();
        for row in rows {
            let (key, csv) = row.map_err(err)?;
            let f = Feedback::from_csv(&csv)
                .map_err(|e| format!("relay feedback state of {}: {e}", key.file_stem()))?;
            out.insert(key, f);
        }
        Ok(out)
    }

    pub fn save_feedback(&mut self, changed: &[(GraphKey, String)]) -> Result<(), String> {
        let err = |e: rusqlite::Error| format!("cannot save the relay feedback state: {e}");
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO feedback (user, exp, course, csv) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(err)?;
            for (k, csv) in changed {
                st.execute(params![k.user, k.exp, k.course, csv])
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        self.committed();
        Ok(())
    }

    /// Whether the raw file is as edgemeter last appended to it or read it
    /// (no: when the state cannot tell).
    pub fn raw_unchanged(&self, now: &RawMark) -> bool {
        self.conn
            .prepare_cached(
                "SELECT 1 FROM raw_files WHERE name = ?1 AND bytes = ?2 AND mtime_ns = ?3",
            )
            .and_then(|mut st| st.exists(params![now.name, now.bytes as i64, now.mtime_ns]))
            .unwrap_or(false)
    }

    /// Record the raw files `read` as they were read, and those `appended`
    /// as they are now, where they were as recorded before (or new): a file
    /// something else also wrote keeps its old mark, so the next start
    /// reads it. Not synced: a mark lost makes a start read a file again.
    pub fn mark_raw(&mut self, read: &[RawMark], appended: &[Appended]) -> Result<(), String> {
        let err = |e: rusqlite::Error| format!("cannot save the relay's raw file marks: {e}");
        let tx = self.conn.transaction().map_err(err)?;
        let made = appended.iter().filter(|a| a.before.is_none());
        put_marks(&tx, read.iter().chain(made.map(|a| &a.after))).map_err(err)?;
        {
            let mut update = tx
                .prepare_cached(
                    "UPDATE raw_files SET bytes = ?2, mtime_ns = ?3
                     WHERE name = ?1 AND bytes = ?4 AND mtime_ns = ?5",
                )
                .map_err(err)?;
            for Appended { before, after } in appended {
                if let Some(was) = before {
                    let (n, b, t) = (&after.name, after.bytes as i64, after.mtime_ns);
                    update
                        .execute(params![n, b, t, was.bytes as i64, was.mtime_ns])
                        .map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)
    }

    /// What the raw files hold, by their marks.
    pub fn raw_bytes(&self) -> Result<u64, String> {
        self.conn
            .query_row("SELECT coalesce(sum(bytes), 0) FROM raw_files", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n.max(0) as u64)
            .map_err(|e| format!("cannot read the relay's raw file marks: {e}"))
    }

    /// The marks of up to `n` raw files larger than `over` bytes, the least
    /// recently written first, after the one of `(mtime_ns, name)`.
    pub fn raw_oldest(
        &self,
        over: u64,
        after: Option<&(i64, String)>,
        n: usize,
    ) -> Result<Vec<RawMark>, String> {
        let err = |e: rusqlite::Error| format!("cannot read the relay's raw file marks: {e}");
        let (t, name) = after.map_or((i64::MIN, ""), |(t, n)| (*t, n.as_str()));
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT name, bytes, mtime_ns FROM raw_files
                 WHERE bytes > ?1 AND (mtime_ns, name) > (?2, ?3)
                 ORDER BY mtime_ns, name LIMIT ?4",
            )
            .map_err(err)?;
        let rows = st
            .query_map(params![over as i64, t, name, n as i64], |r| {
                Ok(RawMark {
                    name: r.get(0)?,
                    bytes: r.get::<_, i64>(1)?.max(0) as u64,
                    mtime_ns: r.get(2)?,
                })
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    /// Record the raw files `cut` as they are now, and forget those `gone`.
    pub fn mark_cut(&mut self, cut: &[RawMark], gone: &[String]) -> Result<(), String> {
        let err = |e: rusqlite::Error| format!("cannot save the relay's raw file marks: {e}");
        let tx = self.conn.transaction().map_err(err)?;
        put_marks(&tx, cut).map_err(err)?;
        {
            let mut forget = tx
                .prepare_cached("DELETE FROM raw_files WHERE name = ?1")
                .map_err(err)?;
            for name in gone {
                forget.execute([name]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }

    /// Forget the marks of raw files that are gone, if there are more
    /// marks than the `present` raw files.
    pub fn forget_gone_raw(
        &mut self,
        present: usize,
        exists: impl Fn(&str) -> bool,
    ) -> Result<usize, String> {
        let err = |e: rusqlite::Error| format!("cannot prune the relay's raw file marks: {e}");
        let marks: usize = self
            .conn
            .query_row("SELECT count(*) FROM raw_files", [], |r| r.get::<_, i64>(0))
            .map_err(err)? as usize;
        if marks <= present {
            return Ok(0);
        }
        let mut gone = Vec::new();
        {
            let mut st = self
                .conn
                .prepare("SELECT name FROM raw_files")
                .map_err(err)?;
            let mut rows = st.query([]).map_err(err)?;
            while let Some(r) = rows.next().map_err(err)? {
                let name = text_at(r, 0).map_err(err)?;
                if !exists(name) {
                    gone.push(name.to_owned());
                }
            }
        }
        let tx = self.conn.transaction().map_err(err)?;
        for name in &gone {
            tx.execute("DELETE FROM raw_files WHERE name = ?1", [name])
                .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(gone.len())
    }

    /// Write these rows as they are now, in one transaction.
    pub fn save(
        &mut self,
        activity: &[((String, String), Activity)],
        graphs: &[(GraphKey, SavedChain)],
    ) -> Result<(), String> {
        let err = |e: rusqlite::Error| format!("cannot save the relay analytics state: {e}");
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO activity (user, hardware, first_ms, last_ms, messages, minutes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(err)?;
            for ((u, h), a) in activity {
                st.execute(params![
                    u,
                    h,
                    a.first_ms,
                    a.last_ms,
                    a.messages as i64,
                    a.minutes as i64
                ])
                .map_err(err)?;
            }
            let mut st = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO graphs (user, exp, course, nodes, counts, last)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(err)?;
            for (k, g) in graphs {
                st.execute(params![
                    k.user,
                    k.exp,
                    k.course,
                    g.nodes,
                    g.counts,
                    g.last.map(|l| l as i64)
                ])
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        self.committed();
        Ok(())
    }
}
