//! Opening: creating or checking the file, recovery of a torn or foreign one (moved aside), the read-only and admin handles, the sinks registered at start-up.

use super::*;

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
            Err(Verdict::Fatal(detail)) => {
                // SQLite says "disk I/O error" for a disk with no room
                // for its index: say which it is.
                let detail = match crate::state_dir::free_bytes(dir) {
                    Some(free) if free < crate::state_dir::FULL_BELOW_BYTES => format!(
                        "{detail}; its disk is full ({free} bytes free in {}): free space there. The outbox is kept as it is, and opens once there is room",
                        dir.display()
                    ),
                    _ => detail,
                };
                return Err(OutboxError::Unusable { path, detail });
            }
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
            per_row: "n",
            wal_pages: Default::default(),
            wal: None,
        };
        let path = outbox.path.clone();
        outbox.wal_pages = durable::own_checkpoints(&mut outbox.conn)
            .map_err(sql_err(&path, "taking over its checkpoints"))?;
        // Open now, while descriptors are there to be had.
        outbox.wal = Some(crate::state_dir::WalFile::of(&path));
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
            .query_row("SELECT COALESCE(SUM(n), 0) FROM records", [], |r| r.get(0))
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
        let has_n = rows_hold_many(&conn).map_err(sql_err(&path, "reading the schema"))?;
        Ok(Outbox {
            conn,
            path,
            max_bytes: i64::MAX,
            bytes: 0,
            dead_bytes: 0,
            id: String::new(),
            per_row: if has_n { "n" } else { "1" },
            wal_pages: Default::default(),
            wal: None,
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

    /// Cap the database at its size and fill the room its pages have left
    /// with records (points of `filler`, -1): then not one more record
    /// fits, as on a full disk. How many it took.
    #[cfg(test)]
    pub fn fill_to_the_cap(&mut self) -> usize {
        self.cap_pages(Some(0));
        let filler = Record::point("filler", Dims::default(), 0, -1.0, "Count");
        let mut n = 0;
        while self.append(std::slice::from_ref(&filler)).is_ok() {
            n += 1;
        }
        n
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
                tx.execute(
                    "DELETE FROM meta WHERE key = ?1",
                    [deliver::peer_clock_key(&name)],
                )
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
}

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
        "PRAGMA synchronous = NORMAL;
         PRAGMA foreign_keys = OFF;
         PRAGMA cache_size = -{CACHE_KIB};
         BEGIN;
         {SCHEMA}"
    ))
    .map_err(classify)?;
    // Schema 3: a row may hold several records (`n`). An older outbox's
    // rows each hold one, the column's default.
    if !rows_hold_many(&conn).map_err(classify)? {
        conn.execute_batch("ALTER TABLE records ADD COLUMN n INTEGER NOT NULL DEFAULT 1;")
            .map_err(classify)?;
    }
    conn.execute_batch(&format!(
        "PRAGMA application_id = {APPLICATION_ID};
         PRAGMA user_version = {SCHEMA_VERSION};
         COMMIT;"
    ))
    .map_err(classify)?;
    Ok(conn)
}

/// Whether `records` has schema 3's `n` (a row of several records).
fn rows_hold_many(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('records') WHERE name = 'n'",
        [],
        |r| r.get(0),
    )
}

/// SQLite's page cache for the outbox, in KiB (its default is 2,000). The
/// outbox appends at the end and reads what it appended moments ago, both
/// hot in the system's page cache; a larger cache of ours only adds to the
/// agent's resident memory (relay benchmark at 20,000 msg/s: peak RSS 16.7
/// to 17.3 MiB in three runs with the default, 15.8 MiB with 512; CPU per
/// message within the runs' noise).
const CACHE_KIB: u32 = 512;

fn move_aside(path: &Path) -> Result<PathBuf, OutboxError> {
    crate::state_dir::move_aside(path).map_err(|(to, e)| OutboxError::Unusable {
        path: path.to_owned(),
        detail: format!(
            "it is unusable and could not be moved aside to {}: {e}",
            to.display()
        ),
    })
}
