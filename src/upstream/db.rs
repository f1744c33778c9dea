//! The two databases the upstream can store in, behind one small interface:
//! SQLite (one aggregator, the default) and PostgreSQL (several replicas
//! sharing one database). The store's logic is written once, in `store.rs`,
//! against [`Db`]; the SQL is written once too, with `?1`-style parameters
//! that the PostgreSQL driver turns into `$1`. Only the schemas differ.
//!
//! Both run on the store's worker thread, never on the event loop.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// A value going into or coming out of either database. Borrowed going
/// in: a batch's 100 points bind their strings without copying them.
#[derive(Debug, Clone, PartialEq)]
pub enum Val<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(Cow<'a, str>),
    Blob(Cow<'a, [u8]>),
}

impl Val<'_> {
    pub fn int(&self) -> i64 {
        match self {
            Val::Int(i) => *i,
            Val::Real(r) => *r as i64,
            _ => 0,
        }
    }

    pub fn real(&self) -> f64 {
        match self {
            Val::Real(r) => *r,
            Val::Int(i) => *i as f64,
            _ => 0.0,
        }
    }

    pub fn text(&self) -> &str {
        match self {
            Val::Text(s) => s,
            _ => "",
        }
    }

    pub fn into_text(self) -> String {
        match self {
            Val::Text(s) => s.into_owned(),
            _ => String::new(),
        }
    }

    pub fn into_blob(self) -> Vec<u8> {
        match self {
            Val::Blob(b) => b.into_owned(),
            Val::Text(s) => s.into_owned().into_bytes(),
            _ => Vec::new(),
        }
    }
}

impl<'a> From<&'a str> for Val<'a> {
    fn from(s: &'a str) -> Val<'a> {
        Val::Text(Cow::Borrowed(s))
    }
}
impl From<String> for Val<'_> {
    fn from(s: String) -> Self {
        Val::Text(Cow::Owned(s))
    }
}
impl From<i64> for Val<'_> {
    fn from(i: i64) -> Self {
        Val::Int(i)
    }
}
impl From<f64> for Val<'_> {
    fn from(r: f64) -> Self {
        Val::Real(r)
    }
}

pub type Rows = Vec<Vec<Val<'static>>>;

/// A row's first `N` columns, named in the order the query selects them:
/// `let [ts, net, value] = columns(row);`. A row with fewer is a reader
/// that does not match its query: a bug, not a database error.
pub fn columns<const N: usize>(row: Vec<Val<'static>>) -> [Val<'static>; N] {
    let mut it = row.into_iter();
    std::array::from_fn(|_| {
        it.next()
            .expect("the query selects every column its reader names")
    })
}

/// Why the aggregator's database failed, with where. Every variant means
/// "not now" to a caller that stores (the edge sends the batch again); they
/// tell an operator what to look at. No variant holds a secret: URLs never
/// carry the password (config refuses it) and the drivers do not print it.
#[derive(Debug, Clone, PartialEq)]
pub enum DbError {
    /// Opening the SQLite file, or parsing the PostgreSQL URL.
    Open { target: String, error: String },
    /// PostgreSQL cannot be reached, or the connection was lost.
    Unreachable { target: String, error: String },
    /// Creating the tables.
    Schema { target: String, error: String },
    /// A statement (or begin, commit) failed on a working connection.
    Statement { target: String, error: String },
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DbError::Open { target, error } => write!(f, "the upstream store {target}: {error}"),
            DbError::Unreachable { target, error } => {
                write!(f, "cannot connect to PostgreSQL {target}: {error}")
            }
            DbError::Schema { target, error } => {
                write!(f, "creating the upstream tables in {target}: {error}")
            }
            DbError::Statement { target, error } => write!(f, "{target}: {error}"),
        }
    }
}

impl std::error::Error for DbError {}

fn sqlite_err(e: rusqlite::Error) -> DbError {
    DbError::Statement {
        target: "the SQLite store".into(),
        error: e.to_string(),
    }
}

/// What the store needs from a database. Errors are sentences without
/// secrets; every one means "try again later" to the caller.
pub trait Db: Send {
    /// `sqlite` or `postgresql`, for logs and `/health`.
    fn kind(&self) -> &'static str;
    fn begin(&mut self) -> Result<(), DbError>;
    fn commit(&mut self) -> Result<(), DbError>;
    fn rollback(&mut self);
    /// Rows changed.
    fn exec(&mut self, sql: &str, params: &[Val<'_>]) -> Result<u64, DbError>;
    fn query(&mut self, sql: &str, params: &[Val<'_>]) -> Result<Rows, DbError>;
}

// ---------------------------------------------------------------- SQLite

/// The tables, once for both databases: `{blob}` is BLOB or BYTEA, `{id}`
/// a generated integer key, and `{key}` makes SQLite store keyed tables by
/// their key (WITHOUT ROWID). BIGINT and DOUBLE PRECISION have the INTEGER
/// and REAL affinity in SQLite.
///
/// Points are stored per series: what names a series (metric, network
/// dims, agent, dims, unit) is written once in `series`, and a point is its
/// series' id, time and value. The metric is kept on the point too, for
/// `points_by_time`: every read asks for one metric over a time range, and
/// new points land at the index's end instead of one place per series
/// (which would dirty a page per series on every commit).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS batches (
    agent    TEXT   NOT NULL,
    outbox   TEXT   NOT NULL,
    seq      BIGINT NOT NULL,
    received BIGINT NOT NULL,
    records  BIGINT NOT NULL,
    PRIMARY KEY (agent, outbox, seq)
){key};
CREATE TABLE IF NOT EXISTS series (
    id     {id},
    metric TEXT NOT NULL,
    net    TEXT NOT NULL,
    agent  TEXT NOT NULL,
    dims   TEXT NOT NULL,
    unit   TEXT NOT NULL,
    UNIQUE (metric, net, agent, dims, unit)
);
CREATE TABLE IF NOT EXISTS points (
    series BIGINT           NOT NULL,
    metric TEXT             NOT NULL,
    ts     BIGINT           NOT NULL,
    value  DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS points_by_time ON points (metric, ts);
CREATE TABLE IF NOT EXISTS sketches (
    metric   TEXT             NOT NULL,
    net      TEXT             NOT NULL,
    ts       BIGINT           NOT NULL,
    agent    TEXT             NOT NULL,
    dims     TEXT             NOT NULL,
    unit     TEXT             NOT NULL,
    estimate DOUBLE PRECISION NOT NULL,
    sketch   {blob}           NOT NULL
);
CREATE INDEX IF NOT EXISTS sketches_by_time ON sketches (metric, ts);
CREATE INDEX IF NOT EXISTS sketches_by_agent ON sketches (metric, agent, ts);
CREATE TABLE IF NOT EXISTS unions (
    metric   TEXT             NOT NULL,
    net      TEXT             NOT NULL,
    ts       BIGINT           NOT NULL,
    sketches BIGINT           NOT NULL,
    summed   DOUBLE PRECISION NOT NULL,
    merged   BIGINT           NOT NULL,
    estimate DOUBLE PRECISION NOT NULL,
    agents   BIGINT           NOT NULL,
    unit     TEXT             NOT NULL,
    PRIMARY KEY (metric, net, ts)
){key};
CREATE INDEX IF NOT EXISTS unions_by_time ON unions (metric, ts);
CREATE TABLE IF NOT EXISTS edge_days (
    metric     TEXT             NOT NULL,
    net        TEXT             NOT NULL,
    agent      TEXT             NOT NULL,
    day        BIGINT           NOT NULL,
    peak       DOUBLE PRECISION NOT NULL,
    windows    BIGINT           NOT NULL,
    last_ts    BIGINT           NOT NULL,
    last_value DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (metric, net, agent, day)
){key};
CREATE TABLE IF NOT EXISTS events (
    ts      BIGINT NOT NULL,
    etype   TEXT   NOT NULL,
    user_id TEXT,
    agent   TEXT   NOT NULL,
    dims    TEXT   NOT NULL,
    payload TEXT   NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_time ON events (ts);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id);
CREATE TABLE IF NOT EXISTS pending (
    metric TEXT   NOT NULL,
    net    TEXT   NOT NULL,
    ts     BIGINT NOT NULL,
    PRIMARY KEY (metric, net, ts)
){key};
CREATE TABLE IF NOT EXISTS forwarded (
    metric TEXT   NOT NULL,
    net    TEXT   NOT NULL,
    ts     BIGINT NOT NULL,
    owner  TEXT   NOT NULL,
    state  TEXT   NOT NULL,
    at     BIGINT NOT NULL,
    PRIMARY KEY (metric, net, ts)
){key};
CREATE TABLE IF NOT EXISTS rollups (
    day      TEXT             NOT NULL,
    metric   TEXT             NOT NULL,
    net      TEXT             NOT NULL,
    how      TEXT             NOT NULL,
    value    DOUBLE PRECISION NOT NULL,
    samples  BIGINT           NOT NULL,
    agents   BIGINT           NOT NULL,
    computed BIGINT           NOT NULL,
    PRIMARY KEY (day, metric, net)
){key};
";

fn sqlite_tables() -> String {
    SCHEMA
        .replace("{blob}", "BLOB")
        .replace("{id}", "INTEGER PRIMARY KEY")
        .replace("{key}", " WITHOUT ROWID")
}

fn sqlite_schema() -> String {
    "PRAGMA journal_mode = WAL;\nPRAGMA synchronous = FULL;\n".to_owned() + &sqlite_tables()
}

fn pg_schema() -> String {
    SCHEMA
        .replace("{blob}", "BYTEA")
        .replace(
            "{id}",
            "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        )
        .replace("{key}", "")
}

/// A store written before points were kept per series has every series'
/// columns on each row of `points`. Opened for writing, it is moved to the
/// new layout in one transaction (`{tables}` is the schema); the old rows
/// are dropped only in the transaction that copied them.
const MOVE_TO_SERIES: &str = "
DROP INDEX points_by_time;
ALTER TABLE points RENAME TO points_before_series;
{tables}
INSERT INTO series (metric, net, agent, dims, unit)
    SELECT DISTINCT metric, net, agent, dims, unit FROM points_before_series;
INSERT INTO points (series, metric, ts, value)
    SELECT s.id, o.metric, o.ts, o.value FROM points_before_series o JOIN series s
    ON s.metric = o.metric AND s.net = o.net AND s.agent = o.agent
    AND s.dims = o.dims AND s.unit = o.unit;
DROP TABLE points_before_series;
";
const SQLITE_BEFORE_SERIES: &str =
    "SELECT COUNT(*) FROM pragma_table_info('points') WHERE name = 'dims'";
const PG_BEFORE_SERIES: &str = "SELECT COUNT(*) FROM information_schema.columns \
     WHERE table_schema = current_schema() AND table_name = 'points' AND column_name = 'dims'";
const BEFORE_SERIES: &str = "has points in the layout before series (edgemeter before 2026-12-03); \
     start `edgemeter upstream` on it once, which moves them";

pub struct Sqlite {
    conn: rusqlite::Connection,
}

impl Sqlite {
    /// `read_only` is for `edgemeter report` beside a running upstream.
    pub fn open(path: &Path, read_only: bool) -> Result<Sqlite, DbError> {
        let what = |e: rusqlite::Error| DbError::Open {
            target: path.display().to_string(),
            error: e.to_string(),
        };
        let conn = if read_only {
            rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        } else {
            rusqlite::Connection::open(path)
        }
        .map_err(what)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(what)?;
        // Every statement the store runs stays prepared: at rusqlite's 16,
        // ingest and forwarding together (with their sizes of many-row
        // statements) pushed each other out, and a 256-group statement was
        // parsed and planned again each round.
        conn.set_prepared_statement_cache_capacity(STATEMENTS_CACHED);
        let before_series = |conn: &rusqlite::Connection| {
            conn.query_row(SQLITE_BEFORE_SERIES, [], |r| r.get::<_, i64>(0))
                .map(|n| n > 0)
        };
        if read_only {
            if before_series(&conn).map_err(what)? {
                return Err(DbError::Open {
                    target: path.display().to_string(),
                    error: BEFORE_SERIES.into(),
                });
            }
        } else {
            conn.execute_batch(&sqlite_schema()).map_err(what)?;
            if before_series(&conn).map_err(what)? {
                let started = std::time::Instant::now();
                log::info!(
                    "{}: moving points to per-series rows (once)",
                    path.display()
                );
                let tables = sqlite_tables();
                conn.execute_batch(&format!(
                    "BEGIN IMMEDIATE;{}COMMIT;",
                    MOVE_TO_SERIES.replace("{tables}", &tables)
                ))
                .map_err(|e| {
                    let _ = conn.execute_batch("ROLLBACK");
                    what(e)
                })?;
                log::info!(
                    "{}: points moved to per-series rows in {:.1} s",
                    path.display(),
                    started.elapsed().as_secs_f64()
                );
            }
        }
        Ok(Sqlite { conn })
    }
}

impl rusqlite::ToSql for Val<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Val::Null => ValueRef::Null,
            Val::Int(i) => ValueRef::Integer(*i),
            Val::Real(r) => ValueRef::Real(*r),
            Val::Text(s) => ValueRef::Text(s.as_bytes()),
            Val::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl Db for Sqlite {
    fn kind(&self) -> &'static str {
        "sqlite"
    }
    fn begin(&mut self) -> Result<(), DbError> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(sqlite_err)
    }
    fn commit(&mut self) -> Result<(), DbError> {
        self.conn.execute_batch("COMMIT").map_err(sqlite_err)
    }
    fn rollback(&mut self) {
        let _ = self.conn.execute_batch("ROLLBACK");
    }
    fn exec(&mut self, sql: &str, params: &[Val<'_>]) -> Result<u64, DbError> {
        let mut st = self.conn.prepare_cached(sql).map_err(sqlite_err)?;
        st.execute(rusqlite::params_from_iter(params))
            .map(|n| n as u64)
            .map_err(sqlite_err)
    }
    fn query(&mut self, sql: &str, params: &[Val<'_>]) -> Result<Rows, DbError> {
        use rusqlite::types::ValueRef;
        let mut st = self.conn.prepare_cached(sql).map_err(sqlite_err)?;
        let n = st.column_count();
        let mut rows = st
            .query(rusqlite::params_from_iter(params))
            .map_err(sqlite_err)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sqlite_err)? {
            let mut vals = Vec::with_capacity(n);
            for i in 0..n {
                vals.push(match row.get_ref(i).map_err(sqlite_err)? {
                    ValueRef::Null => Val::Null,
                    ValueRef::Integer(i) => Val::Int(i),
                    ValueRef::Real(r) => Val::Real(r),
                    ValueRef::Text(t) => {
                        Val::Text(Cow::Owned(String::from_utf8_lossy(t).into_owned()))
                    }
                    ValueRef::Blob(b) => Val::Blob(Cow::Owned(b.to_vec())),
                });
            }
            out.push(vals);
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------- PostgreSQL

/// Prepared statements a SQLite store keeps (see `Sqlite::open`).
const STATEMENTS_CACHED: usize = 64;

/// Replicas starting together must not race each other's `CREATE TABLE`.
const SCHEMA_LOCK: i64 = 0x6564_6765_6d75_7073; // "edgemups"

pub struct Postgres {
    config: postgres::Config,
    target: String,
    client: Option<postgres::Client>,
    statements: HashMap<String, postgres::Statement>,
}

impl Postgres {
    /// Parse the URL now (a typo is a config error); connect on first use,
    /// and again whenever the connection was lost.
    pub fn new(url: &str, password: Option<String>) -> Result<Postgres, DbError> {
        let mut config: postgres::Config = url.parse().map_err(|e| DbError::Open {
            target: "URL".into(),
            error: format!("not a PostgreSQL URL: {e}"),
        })?;
        if let Some(p) = password {
            config.password(p);
        }
        config.connect_timeout(Duration::from_secs(10));
        config.application_name("edgemeter-upstream");
        // Every (re)connection runs the schema's `CREATE ... IF NOT EXISTS`,
        // which PostgreSQL answers with a NOTICE per table that exists: 16
        // lines at info on every start. They say nothing is wrong.
        config.notice_callback(|n| log::debug!("PostgreSQL: {}: {}", n.severity(), n.message()));
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|h| match h {
                postgres::config::Host::Tcp(s) => s.clone(),
                postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .collect();
        let target = format!(
            "{}:{}/{}",
            hosts.join(","),
            config.get_ports().first().copied().unwrap_or(5432),
            config.get_dbname().unwrap_or("")
        );
        Ok(Postgres {
            config,
            target,
            client: None,
            statements: HashMap::new(),
        })
    }

    fn client(&mut self) -> Result<&mut postgres::Client, DbError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.statements.clear();
            let mut client =
                self.config
                    .connect(postgres::NoTls)
                    .map_err(|e| DbError::Unreachable {
                        target: self.target.clone(),
                        error: pg_msg(&e),
                    })?;
            let schema = |e: postgres::Error| DbError::Schema {
                target: self.target.clone(),
                error: pg_msg(&e),
            };
            let mut tx = client.transaction().map_err(schema)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
                .and_then(|_| tx.batch_execute(&pg_schema()))
                .and_then(|_| tx.query_one(PG_BEFORE_SERIES, &[]))
                .and_then(|before| {
                    if before.get::<_, i64>(0) == 0 {
                        return Ok(());
                    }
                    log::info!(
                        "PostgreSQL {}: moving points to per-series rows (once)",
                        self.target
                    );
                    tx.batch_execute(&MOVE_TO_SERIES.replace("{tables}", &pg_schema()))
                })
                .and_then(|_| tx.commit())
                .map_err(schema)?;
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    fn statement(&mut self, sql: &str) -> Result<postgres::Statement, DbError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let text = dollar_params(sql);
        let target = self.target.clone();
        let st = self
            .client()?
            .prepare(&text)
            .map_err(|e| DbError::Statement {
                target: format!("PostgreSQL {target}"),
                error: pg_msg(&e),
            })?;
        self.statements.insert(sql.to_owned(), st.clone());
        Ok(st)
    }

    fn fail(&mut self, e: postgres::Error) -> DbError {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) || e.is_closed() {
            self.client = None;
            return DbError::Unreachable {
                target: self.target.clone(),
                error: pg_msg(&e),
            };
        }
        DbError::Statement {
            target: format!("PostgreSQL {}", self.target),
            error: pg_msg(&e),
        }
    }
}

/// The server's message without the client's framing (never the password:
/// the driver does not put it in errors).
fn pg_msg(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => e.to_string(),
    }
}

/// `?1` → `$1`, outside string literals.
pub fn dollar_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            quoted = !quoted;
        }
        if c == '?' && !quoted && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

mod pg_types {
    use postgres::types::{IsNull, ToSql, Type, to_sql_checked};

    use super::Val;

    type BoxError = Box<dyn std::error::Error + Sync + Send>;

    impl ToSql for Val<'_> {
        fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, BoxError> {
            match (self, ty) {
                (Val::Null, _) => Ok(IsNull::Yes),
                (Val::Int(i), &Type::INT8) => i.to_sql(ty, out),
                (Val::Int(i), &Type::INT4) => i32::try_from(*i)?.to_sql(ty, out),
                (Val::Int(i), &Type::FLOAT8) => (*i as f64).to_sql(ty, out),
                (Val::Real(r), &Type::FLOAT8) => r.to_sql(ty, out),
                (Val::Text(s), _) => s.as_ref().to_sql(ty, out),
                (Val::Blob(b), _) => b.as_ref().to_sql(ty, out),
                (v, ty) => Err(format!("cannot send {v:?} as {ty}").into()),
            }
        }
        fn accepts(_: &Type) -> bool {
            true
        }
        to_sql_checked!();
    }

    pub fn column(row: &postgres::Row, i: usize) -> Result<Val<'static>, postgres::Error> {
        let ty = row.columns()[i].type_().clone();
        Ok(match ty {
            Type::INT8 => row
                .try_get::<_, Option<i64>>(i)?
                .map_or(Val::Null, Val::Int),
            Type::INT4 => row
                .try_get::<_, Option<i32>>(i)?
                .map_or(Val::Null, |v| Val::Int(v.into())),
            Type::FLOAT8 => row
                .try_get::<_, Option<f64>>(i)?
                .map_or(Val::Null, Val::Real),
            Type::BYTEA => row
                .try_get::<_, Option<Vec<u8>>>(i)?
                .map_or(Val::Null, |b| Val::Blob(b.into())),
            _ => row
                .try_get::<_, Option<String>>(i)?
                .map_or(Val::Null, Val::from),
        })
    }
}

impl Db for Postgres {
    fn kind(&self) -> &'static str {
        "postgresql"
    }
    fn begin(&mut self) -> Result<(), DbError> {
        let r = self.client()?.batch_execute("BEGIN");
        r.map_err(|e| self.fail(e))
    }
    fn commit(&mut self) -> Result<(), DbError> {
        let r = self.client()?.batch_execute("COMMIT");
        r.map_err(|e| self.fail(e))
    }
    fn rollback(&mut self) {
        if let Some(c) = self.client.as_mut().filter(|c| !c.is_closed()) {
            let _ = c.batch_execute("ROLLBACK");
        }
    }
    fn exec(&mut self, sql: &str, params: &[Val<'_>]) -> Result<u64, DbError> {
        let st = self.statement(sql)?;
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            params.iter().map(|v| v as _).collect();
        let r = self.client()?.execute(&st, &refs);
        r.map_err(|e| self.fail(e))
    }
    fn query(&mut self, sql: &str, params: &[Val<'_>]) -> Result<Rows, DbError> {
        let st = self.statement(sql)?;
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            params.iter().map(|v| v as _).collect();
        let r = self.client()?.query(&st, &refs);
        let rows = r.map_err(|e| self.fail(e))?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut vals = Vec::with_capacity(row.len());
            for i in 0..row.len() {
                vals.push(pg_types::column(row, i).map_err(|e| self.fail(e))?);
            }
            out.push(vals);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::dollar_params;

    #[test]
    fn parameters_become_dollars_outside_literals() {
        assert_eq!(
            dollar_params("SELECT a FROM t WHERE b = ?1 AND c = '?2' AND d = ?12"),
            "SELECT a FROM t WHERE b = $1 AND c = '?2' AND d = $12"
        );
    }
}
