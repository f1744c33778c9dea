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

/// What adding a page of rows changed.
#[derive(Debug, Default, PartialEq)]
pub struct Added {
    /// Epochs that gained ids, and how many.
    pub new_ids: BTreeMap<i64, u64>,
    /// Rows for epochs older than the horizon, not kept.
    pub expired: u64,
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
";

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
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map(|_| ())
            .map_err(|e| self.err("writing state", e))
    }

    fn err(&self, what: &str, e: rusqlite::Error) -> String {
        format!("{}: {what} failed: {e}", self.path.display())
    }

    /// Add (epoch, recipient) pairs, keeping those at or after `horizon`,
    /// and set the watermark, all in one transaction.
    pub fn add(
        &mut self,
        rows: &[(i64, i64)],
        horizon: i64,
        watermark: i64,
    ) -> Result<Added, String> {
        let mut added = Added::default();
        let tx = self
            .conn
            .transaction()
            .map_err(|e| format!("{}: {e}", "begin"))?;
        {
            let mut st = tx
                .prepare_cached("INSERT OR IGNORE INTO epoch_ids (epoch, rid) VALUES (?1, ?2)")
                .map_err(|e| format!("prepare: {e}"))?;
            for &(epoch, rid) in rows {
                if epoch < horizon {
                    added.expired += 1;
                    continue;
                }
                if st
                    .execute(params![epoch, rid])
                    .map_err(|e| format!("insert: {e}"))?
                    > 0
                {
                    *added.new_ids.entry(epoch).or_default() += 1;
                }
            }
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('watermark', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [watermark],
        )
        .map_err(|e| format!("watermark: {e}"))?;
        tx.commit().map_err(|e| self.err("committing rows", e))?;
        Ok(added)
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

    /// Forget epochs before `horizon`.
    pub fn prune(&self, horizon: i64) -> Result<usize, String> {
        self.conn
            .execute("DELETE FROM epoch_ids WHERE epoch < ?1", [horizon])
            .map_err(|e| self.err("pruning", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_union_and_late_ids_are_reported() {
        let path = std::env::temp_dir().join(format!("edgemeter-xxstore-{}.db", fastrand::u64(..)));
        let mut s = Store::open(&path).expect("open");
        let a = s
            .add(
                &[(10, 1), (10, 2), (10, 2), (11, 2), (11, 3), (5, 9)],
                8,
                100,
            )
            .expect("add");
        assert_eq!(a.new_ids, BTreeMap::from([(10, 2), (11, 2)]));
        assert_eq!(a.expired, 1);
        assert_eq!(s.get("watermark").expect("get"), Some(100));
        let mut ids = s.ids(10, 11).expect("ids");
        ids.sort();
        assert_eq!(ids, vec![1, 2, 3]);
        // Re-reading the same rows (the overlap margin) changes nothing.
        let again = s.add(&[(10, 1), (11, 3)], 8, 100).expect("add");
        assert!(again.new_ids.is_empty());
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
