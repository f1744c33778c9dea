//! The source's own state, in its own SQLite file beside the outbox
//! (`xx_gateway-<name>.db`): the distinct recipient ids of each epoch still
//! needed, the id watermark, and the last epoch whose windows were emitted.
//! Windows are unions of epoch sets, so a backfill reads the gateway's table
//! once, and a recount never touches the gateway.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

pub struct Store {
    conn: Connection,
    pub path: PathBuf,
}

/// One page of the gateway's rows and what it changes, applied in one
/// transaction so that the ids, the watermark, the open gaps and the
/// windows the page corrects are never out of step after a crash.
#[derive(Debug, Default)]
pub struct Page<'a> {
    /// (epoch, recipient) pairs, already filtered to the kept epochs.
    pub pairs: &'a [(i64, i64)],
    /// The new id watermark, when the page read above it.
    pub watermark: Option<i64>,
    /// Ids below the watermark not seen yet (transactions not committed),
    /// with when they were first missed.
    pub new_gaps: &'a [i64],
    /// Gaps that were found, or given up on.
    pub closed_gaps: &'a [i64],
    pub now_ms: i64,
}

/// What applying a page changed.
#[derive(Debug, Default, PartialEq)]
pub struct Added {
    /// Epochs that gained ids, and how many.
    pub new_ids: BTreeMap<i64, u64>,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS epoch_ids (
    epoch INTEGER NOT NULL,
    rid   INTEGER NOT NULL,
    PRIMARY KEY (epoch, rid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS gaps (id INTEGER PRIMARY KEY, missed_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dirty (
    epoch  INTEGER NOT NULL,
    window INTEGER NOT NULL,
    PRIMARY KEY (epoch, window)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS csv_pending (seq INTEGER PRIMARY KEY AUTOINCREMENT, line TEXT NOT NULL);
";

/// Lines kept for an unwritable `csv_path` (about 100 days of the default
/// windows); older ones are dropped and counted.
pub const CSV_PENDING_MAX: i64 = 5_000;

impl Store {
    /// Open, or start afresh if the file is unusable (it is derived state:
    /// a fresh one is rebuilt by the next backfill).
    pub fn open(path: &Path) -> Result<Store, String> {
        let conn = super::super::open_own_db(path, SCHEMA, "rebuilding it from the gateway")?;
        Ok(Store {
            conn,
            path: path.to_owned(),
        })
    }

    pub fn get(&self, key: &str) -> Result<Option<i64>, String> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.err("reading state", e))
    }

    pub fn set(&self, key: &str, value: i64) -> Result<(), String> {
        set(&self.conn, key, value).map_err(|e| self.err("writing state", e))
    }

    fn err(&self, what: &str, e: rusqlite::Error) -> String {
        format!("{}: {what} failed: {e}", self.path.display())
    }

    /// Apply one page: add its (epoch, recipient) pairs, move the
    /// watermark and the gaps, and mark the windows `late` says a new id
    /// corrects as dirty, all in one transaction.
    pub fn apply(
        &mut self,
        page: &Page<'_>,
        late: impl Fn(i64) -> Vec<(i64, u32)>,
    ) -> Result<Added, String> {
        let mut added = Added::default();
        let path = self.path.clone();
        let err =
            |what: &str, e: rusqlite::Error| format!("{}: {what} failed: {e}", path.display());
        let tx = self.conn.transaction().map_err(|e| err("begin", e))?;
        {
            let mut ins = tx
                .prepare_cached("INSERT OR IGNORE INTO epoch_ids (epoch, rid) VALUES (?1, ?2)")
                .map_err(|e| err("prepare", e))?;
            for &(epoch, rid) in page.pairs {
                if ins
                    .execute(params![epoch, rid])
                    .map_err(|e| err("insert", e))?
                    > 0
                {
                    *added.new_ids.entry(epoch).or_default() += 1;
                }
            }
            let mut dirty = tx
                .prepare_cached("INSERT OR IGNORE INTO dirty (epoch, window) VALUES (?1, ?2)")
                .map_err(|e| err("prepare", e))?;
            for &epoch in added.new_ids.keys() {
                for (e, w) in late(epoch) {
                    dirty.execute(params![e, w]).map_err(|e| err("dirty", e))?;
                }
            }
            let mut gap = tx
                .prepare_cached("INSERT OR IGNORE INTO gaps (id, missed_ms) VALUES (?1, ?2)")
                .map_err(|e| err("prepare", e))?;
            for &id in page.new_gaps {
                gap.execute(params![id, page.now_ms])
                    .map_err(|e| err("gap", e))?;
            }
            let mut closed = tx
                .prepare_cached("DELETE FROM gaps WHERE id = ?1")
                .map_err(|e| err("prepare", e))?;
            for &id in page.closed_gaps {
                closed.execute([id]).map_err(|e| err("gap", e))?;
            }
        }
        if let Some(w) = page.watermark {
            set(&tx, "watermark", w).map_err(|e| err("watermark", e))?;
        }
        tx.commit().map_err(|e| err("committing rows", e))?;
        Ok(added)
    }

    /// The open gaps: ids below the watermark not seen yet, with when each
    /// was first missed, in id order.
    pub fn gaps(&self) -> Result<Vec<(i64, i64)>, String> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id, missed_ms FROM gaps ORDER BY id")
            .map_err(|e| self.err("reading gaps", e))?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err("reading gaps", e))
    }

    /// Stop watching gaps at or below `id` (too far below the newest id
    /// to be a transaction still open). Returns how many.
    pub fn forget_gaps_below(&self, id: i64) -> Result<usize, String> {
        self.conn
            .execute("DELETE FROM gaps WHERE id <= ?1", [id])
            .map_err(|e| self.err("forgetting gaps", e))
    }

    /// How many gaps are watched.
    pub fn gap_count(&self) -> Result<u64, String> {
        self.conn
            .query_row("SELECT COUNT(*) FROM gaps", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|e| self.err("counting gaps", e))
    }

    /// Windows a late row changed, to emit again.
    pub fn dirty(&self) -> Result<Vec<(i64, u32)>, String> {
        let mut st = self
            .conn
            .prepare_cached("SELECT epoch, window FROM dirty ORDER BY epoch, window")
            .map_err(|e| self.err("reading corrections", e))?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err("reading corrections", e))
    }

    /// The records of a step are in the outbox: record the last epoch
    /// emitted, clear the corrections emitted, and queue the CSV lines, in
    /// one transaction. Returns how many queued lines were dropped to keep
    /// the queue within [`CSV_PENDING_MAX`].
    pub fn emitted(
        &mut self,
        through: Option<i64>,
        corrected: &[(i64, u32)],
        csv_lines: &[String],
    ) -> Result<u64, String> {
        let path = self.path.clone();
        let err =
            |what: &str, e: rusqlite::Error| format!("{}: {what} failed: {e}", path.display());
        let tx = self.conn.transaction().map_err(|e| err("begin", e))?;
        if let Some(e) = through {
            set(&tx, "last_emitted", e).map_err(|e| err("progress", e))?;
        }
        let mut dropped = 0;
        {
            let mut del = tx
                .prepare_cached("DELETE FROM dirty WHERE epoch = ?1 AND window = ?2")
                .map_err(|e| err("prepare", e))?;
            for &(e, w) in corrected {
                del.execute(params![e, w])
                    .map_err(|e| err("corrections", e))?;
            }
            let mut ins = tx
                .prepare_cached("INSERT INTO csv_pending (line) VALUES (?1)")
                .map_err(|e| err("prepare", e))?;
            for line in csv_lines {
                ins.execute([line]).map_err(|e| err("csv queue", e))?;
            }
        }
        if !csv_lines.is_empty() {
            let n: i64 = tx
                .query_row("SELECT COUNT(*) FROM csv_pending", [], |r| r.get(0))
                .map_err(|e| err("csv queue", e))?;
            if n > CSV_PENDING_MAX {
                dropped = tx
                    .execute(
                        "DELETE FROM csv_pending WHERE seq IN (SELECT seq FROM csv_pending ORDER BY seq LIMIT ?1)",
                        [n - CSV_PENDING_MAX],
                    )
                    .map_err(|e| err("csv queue", e))? as u64;
            }
        }
        tx.commit().map_err(|e| err("committing progress", e))?;
        Ok(dropped)
    }

    /// CSV lines waiting to be appended after `seq` (the lines through it
    /// are in the file), oldest first: (last seq, text).
    pub fn csv_pending(&self, after: i64) -> Result<Option<(i64, String)>, String> {
        let mut st = self
            .conn
            .prepare_cached("SELECT seq, line FROM csv_pending WHERE seq > ?1 ORDER BY seq")
            .map_err(|e| self.err("reading the csv queue", e))?;
        let rows: Vec<(i64, String)> = st
            .query_map([after], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err("reading the csv queue", e))?;
        Ok(rows.last().map(|&(seq, _)| {
            (
                seq,
                rows.iter().map(|(_, l)| l.as_str()).collect::<String>(),
            )
        }))
    }

    pub fn csv_pending_count(&self, after: i64) -> Result<i64, String> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM csv_pending WHERE seq > ?1",
                [after],
                |r| r.get(0),
            )
            .map_err(|e| self.err("reading the csv queue", e))
    }

    /// The lines through `seq` are in the file.
    pub fn csv_written(&self, seq: i64) -> Result<(), String> {
        self.conn
            .execute("DELETE FROM csv_pending WHERE seq <= ?1", [seq])
            .map(|_| ())
            .map_err(|e| self.err("clearing the csv queue", e))
    }

    /// The distinct ids over epochs `first..=last`.
    pub fn ids(&self, first: i64, last: i64) -> Result<Vec<i64>, String> {
        let mut st = self
            .conn
            .prepare_cached("SELECT DISTINCT rid FROM epoch_ids WHERE epoch BETWEEN ?1 AND ?2")
            .map_err(|e| self.err("preparing a window", e))?;
        st.query_map([first, last], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(|e| self.err("reading a window", e))
    }

    /// The newest epoch holding any id.
    pub fn newest_epoch(&self) -> Result<Option<i64>, String> {
        self.conn
            .query_row("SELECT MAX(epoch) FROM epoch_ids", [], |r| r.get(0))
            .map_err(|e| self.err("reading epochs", e))
    }

    /// Forget epochs before `horizon`.
    pub fn prune(&self, horizon: i64) -> Result<usize, String> {
        self.conn
            .execute("DELETE FROM epoch_ids WHERE epoch < ?1", [horizon])
            .map_err(|e| self.err("pruning", e))
    }
}

fn set(conn: &Connection, key: &str, value: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_union_and_late_ids_are_reported() {
        let path = std::env::temp_dir().join(format!("edgemeter-xxstore-{}.db", fastrand::u64(..)));
        let mut s = Store::open(&path).expect("open");
        let page = |pairs, watermark| Page {
            pairs,
            watermark,
            ..Page::default()
        };
        let late = |e: i64| {
            if e == 10 {
                vec![(10, 1), (12, 3)]
            } else {
                vec![]
            }
        };
        let a = s
            .apply(
                &page(&[(10, 1), (10, 2), (10, 2), (11, 2), (11, 3)], Some(100)),
                late,
            )
            .expect("add");
        assert_eq!(a.new_ids, BTreeMap::from([(10, 2), (11, 2)]));
        assert_eq!(s.get("watermark").expect("get"), Some(100));
        assert_eq!(s.dirty().expect("dirty"), vec![(10, 1), (12, 3)]);
        let mut ids = s.ids(10, 11).expect("ids");
        ids.sort();
        assert_eq!(ids, vec![1, 2, 3]);
        // Re-reading the same rows changes nothing.
        let again = s
            .apply(&page(&[(10, 1), (11, 3)], None), late)
            .expect("add");
        assert!(again.new_ids.is_empty());
        // Committed: the marks go, the CSV lines queue, in one step.
        s.emitted(
            Some(12),
            &[(10, 1), (12, 3)],
            &["a\r\n".into(), "b\r\n".into()],
        )
        .expect("emitted");
        assert_eq!(s.dirty().expect("dirty"), vec![]);
        assert_eq!(s.get("last_emitted").expect("get"), Some(12));
        let (seq, text) = s.csv_pending(0).expect("queue").expect("lines");
        assert_eq!(text, "a\r\nb\r\n");
        // Lines through a seq already in the file are not given again,
        // whether or not the queue could be cleared of them.
        assert_eq!(
            s.csv_pending(seq - 1).expect("queue"),
            Some((seq, "b\r\n".to_owned()))
        );
        assert_eq!(s.csv_pending(seq).expect("queue"), None);
        assert_eq!(s.csv_pending_count(seq - 1).expect("count"), 1);
        s.csv_written(seq).expect("written");
        assert_eq!(s.csv_pending(0).expect("queue"), None);
        // Gaps come and go with pages.
        s.apply(
            &Page {
                new_gaps: &[97, 98],
                now_ms: 5,
                ..Page::default()
            },
            late,
        )
        .expect("gaps");
        s.apply(
            &Page {
                closed_gaps: &[97],
                ..Page::default()
            },
            late,
        )
        .expect("found");
        assert_eq!(s.gaps().expect("gaps"), vec![(98, 5)]);
        assert_eq!(s.forget_gaps_below(98).expect("forget"), 1);
        assert_eq!(s.prune(11).expect("prune"), 2);
        assert_eq!(s.ids(0, 100).expect("ids").len(), 2);
        drop(s);
        std::fs::write(
            &path,
            b"garbage that is not sqlite at all, long enough to be read".repeat(50),
        )
        .expect("corrupt");
        let s = Store::open(&path).expect("recovers");
        assert_eq!(
            s.get("watermark").expect("get"),
            None,
            "rebuilt from scratch"
        );
        for f in std::fs::read_dir(std::env::temp_dir())
            .expect("tmp")
            .flatten()
        {
            if f.file_name()
                .to_string_lossy()
                .starts_with(&*path.file_name().expect("name").to_string_lossy())
            {
                std::fs::remove_file(f.path()).ok();
            }
        }
    }
}
