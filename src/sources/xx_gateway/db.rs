//! The gateway's PostgreSQL, read-only: the epoch period and new rows of
//! `client_bloom_filters`, by primary key. Errors say what to do about them.

use std::time::Duration;

use postgres::error::SqlState;

use super::config::DbSettings;

/// The gateway's constant, used when `states.Period` is absent.
pub const DEFAULT_PERIOD_MS: i64 = 1_800_000;

pub struct Gateway {
    client: postgres::Client,
    user: String,
    dbname: String,
}

/// One row of `client_bloom_filters`, as much of it as counting needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row {
    pub id: i64,
    pub recipient_id: i64,
    pub epoch: i64,
}

impl Gateway {
    pub fn connect(s: &DbSettings, timeout: Duration) -> Result<Gateway, String> {
        let mut cfg = postgres::Config::new();
        cfg.host(&s.host)
            .port(s.port)
            .user(&s.user)
            .dbname(&s.dbname)
            .connect_timeout(timeout)
            .application_name("edgemeter");
        if let Some(p) = &s.password {
            cfg.password(p);
        }
        let client = cfg.connect(postgres::NoTls).map_err(|e| describe(&e, s))?;
        Ok(Gateway {
            client,
            user: s.user.clone(),
            dbname: s.dbname.clone(),
        })
    }

    fn explain(&self, e: &postgres::Error, table: &str) -> String {
        match e.code() {
            Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => format!(
                "role `{}` may not read `{table}` (permission denied). edgemeter needs only SELECT \
                 (as the tables' owner: GRANT SELECT ON client_bloom_filters, states TO \"{}\")",
                self.user, self.user
            ),
            Some(c) if *c == SqlState::UNDEFINED_TABLE => format!(
                "database `{}` has no table `{table}`: is it an xx gateway's database (dbName in gateway.yaml)?",
                self.dbname
            ),
            _ => format!("reading `{table}` failed: {e}"),
        }
    }

    /// `states.Period` (nanoseconds) in ms; the gateway's default if absent.
    pub fn period_ms(&mut self) -> Result<i64, String> {
        let row = self
            .client
            .query_opt("SELECT value FROM states WHERE key = 'Period'", &[])
            .map_err(|e| self.explain(&e, "states"))?;
        let Some(row) = row else {
            return Ok(DEFAULT_PERIOD_MS);
        };
        let text: String = row.get(0);
        let ns: i64 = text
            .trim()
            .parse()
            .map_err(|_| format!("states.Period is `{text}`, not a number of nanoseconds"))?;
        if ns < 1_000_000 {
            return Err(format!(
                "states.Period is {ns} ns, shorter than a millisecond"
            ));
        }
        Ok(ns / 1_000_000)
    }

    /// Up to `limit` rows with `id > after`, in id order: a range scan of
    /// the primary key, one index probe when there is nothing new.
    pub fn rows_after(&mut self, after: i64, limit: u32) -> Result<Vec<Row>, String> {
        let rows = self
            .client
            .query(
                "SELECT id, recipient_id, epoch FROM client_bloom_filters \
                 WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after, &i64::from(limit)],
            )
            .map_err(|e| self.explain(&e, "client_bloom_filters"))?;
        Ok(rows.iter().map(row).collect())
    }

    /// The rows with these ids that are visible now (gaps whose
    /// transaction committed): one primary-key probe per id.
    pub fn rows_with_ids(&mut self, ids: &[i64]) -> Result<Vec<Row>, String> {
        let rows = self
            .client
            .query(
                "SELECT id, recipient_id, epoch FROM client_bloom_filters \
                 WHERE id = ANY($1) ORDER BY id",
                &[&ids],
            )
            .map_err(|e| self.explain(&e, "client_bloom_filters"))?;
        Ok(rows.iter().map(row).collect())
    }

    /// The last epoch `active-users.py` completed, from its key in
    /// `states` (`ActiveUsersMonitoringScript`, `ActiveUsersEpoch` before
    /// its commit 65b03d7). Read only.
    pub fn script_epoch(&mut self) -> Result<Option<(i64, &'static str)>, String> {
        for key in ["ActiveUsersMonitoringScript", "ActiveUsersEpoch"] {
            let row = self
                .client
                .query_opt("SELECT value FROM states WHERE key = $1", &[&key])
                .map_err(|e| self.explain(&e, "states"))?;
            if let Some(row) = row {
                let text: String = row.get(0);
                let epoch = text.trim().parse().map_err(|_| {
                    format!(
                        "states.{key} is `{text}`, not an epoch number (left by active-users.py?)"
                    )
                })?;
                return Ok(Some((epoch, key)));
            }
        }
        Ok(None)
    }

    /// The newest `limit` rows with their filters, for `edgemeter verify`.
    pub fn newest_filters(&mut self, limit: u32) -> Result<Vec<FilterRow>, String> {
        let rows = self
            .client
            .query(
                "SELECT id, first_round, round_range, filter FROM client_bloom_filters ORDER BY id DESC LIMIT $1",
                &[&i64::from(limit)],
            )
            .map_err(|e| self.explain(&e, "client_bloom_filters"))?;
        Ok(rows
            .iter()
            .map(|r| FilterRow {
                id: r.get(0),
                first_round: r.get(1),
                round_range: r.get(2),
                filter: r.get(3),
            })
            .collect())
    }
}

fn row(r: &postgres::Row) -> Row {
    Row {
        id: r.get(0),
        recipient_id: r.get(1),
        epoch: r.get(2),
    }
}

/// One filter row as `edgemeter verify` checks it.
pub struct FilterRow {
    pub id: i64,
    pub first_round: i64,
    pub round_range: i64,
    pub filter: Vec<u8>,
}

/// A connection failure in words, never including the password.
fn describe(e: &postgres::Error, s: &DbSettings) -> String {
    let target = format!("{}@{}:{}/{}", s.user, s.host, s.port, s.dbname);
    match e.code() {
        Some(c)
            if *c == SqlState::INVALID_PASSWORD
                || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            format!(
                "PostgreSQL refused the login {target}: wrong user or password (check dbPassword / password_file)"
            )
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => format!(
            "database `{}` does not exist on {}:{}",
            s.dbname, s.host, s.port
        ),
        _ => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                msg = format!("{msg}: {inner}");
                source = inner.source();
            }
            format!("cannot connect to PostgreSQL {target}: {msg}")
        }
    }
}
