//! The `[upstream]` table: where the aggregator listens, where it stores,
//! whom it lets in, and every bound on what a peer may send.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeTable;

use crate::problems::{Problems, deserialize, int_in_range, resolve, secs};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8650";
/// Dimensions that name an edge rather than what it measured: left out of
/// the network-wide series, so gateway A's and gateway B's `active_users`
/// for the same window become one series whose value is their union.
pub const DEFAULT_EDGE_DIMS: &[&str] = &["agent", "gateway", "host", "source"];

#[derive(Debug, Clone, PartialEq)]
pub enum StoreKind {
    /// `<state_dir>/upstream.db`
    Sqlite,
    /// A `postgres://` URL (without a password; see `store_password_file`).
    Postgres {
        url: String,
        password_file: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub store: StoreKind,
    /// One `<agent_id>.token` file per edge.
    pub tokens_dir: PathBuf,
    /// The token for queries and deletions (`/v1/series`, `/v1/events`,
    /// `DELETE /v1/users/…`); without it those answer 403.
    pub admin_token_file: Option<PathBuf>,
    /// PEM certificate chain and private key: serve HTTPS instead of HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub edge_dims: Vec<String>,
    pub limits: Limits,
    /// How often finished windows are aggregated and forwarded.
    pub forward_interval: Duration,
    /// How long after a window's time its aggregate waits for late edges.
    pub settle: Duration,
    /// How long raw data (points, sketches, events) is kept, in whole UTC
    /// days; `None`: forever. Daily totals (`rollups`) are kept forever.
    pub retention_days: Option<u32>,
}

pub use crate::http_server::Limits;

/// `max_buffered_bytes` unless configured: 256 MiB, or a quarter of the
/// memory limit this process runs under (the unit's `MemoryMax`, read from
/// its cgroup) when that is smaller, so that buffered bodies leave the
/// store, SQLite's cache and the connections room below the limit.
pub fn default_buffered_bytes(memory_max: Option<u64>) -> usize {
    const CAP: u64 = 256 << 20;
    const FLOOR: u64 = 16 << 20;
    memory_max.map_or(CAP, |m| (m / 4).clamp(FLOOR, CAP)) as usize
}

/// The cgroup v2 `memory.max` of this process, if it has one.
fn memory_max() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let text =
        std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.max", path.trim_end())).ok()?;
    text.trim().parse().ok()
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 256,
            max_header_bytes: 16 * 1024,
            max_body_bytes: 8 << 20,
            max_batch_bytes: 64 << 20,
            max_buffered_bytes: default_buffered_bytes(memory_max()),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<Spanned<String>>,
    store: Option<Spanned<String>>,
    store_password_file: Option<Spanned<String>>,
    tokens_dir: Spanned<String>,
    admin_token_file: Option<Spanned<String>>,
    tls_cert_file: Option<Spanned<String>>,
    tls_key_file: Option<Spanned<String>>,
    edge_dims: Option<Vec<String>>,
    max_connections: Option<Spanned<i64>>,
    max_header_bytes: Option<Spanned<i64>>,
    max_body_bytes: Option<Spanned<i64>>,
    max_batch_bytes: Option<Spanned<i64>>,
    max_buffered_bytes: Option<Spanned<i64>>,
    header_timeout_secs: Option<Spanned<f64>>,
    body_timeout_secs: Option<Spanned<f64>>,
    idle_timeout_secs: Option<Spanned<f64>>,
    forward_interval_secs: Option<Spanned<f64>>,
    settle_secs: Option<Spanned<f64>>,
    retention_days: Option<Spanned<i64>>,
}

impl Config {
    pub fn parse(base: &Path, table: Spanned<DeTable<'_>>, p: &mut Problems) -> Option<Config> {
        let raw: Raw = deserialize(table, p)?;
        let before = p.list().len();
        let listen = match &raw.listen {
            None => DEFAULT_LISTEN.parse().expect("the default parses"),
            Some(l) => l.get_ref().parse().unwrap_or_else(|_| {
                p.push(
                    l.span(),
                    format!(
                        "listen `{}` must be an address and port such as `{DEFAULT_LISTEN}` or `[::1]:8650`",
                        l.get_ref()
                    ),
                );
                DEFAULT_LISTEN.parse().expect("the default parses")
            }),
        };
        let store = match raw.store.as_ref().map(|s| s.get_ref().as_str()) {
            None | Some("sqlite") => StoreKind::Sqlite,
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                if has_password(url) {
                    p.push(
                        raw.store.as_ref().expect("matched Some").span(),
                        "store must not hold a password: put it in store_password_file (or PGPASSWORD)",
                    );
                }
                StoreKind::Postgres {
                    url: url.to_owned(),
                    password_file: raw
                        .store_password_file
                        .as_ref()
                        .map(|f| resolve(base, f.get_ref())),
                }
            }
            Some(other) => {
                p.push(
                    raw.store.as_ref().expect("matched Some").span(),
                    format!("store `{other}` must be `sqlite` or a `postgres://` URL"),
                );
                StoreKind::Sqlite
            }
        };
        if let (StoreKind::Sqlite, Some(f)) = (&store, &raw.store_password_file) {
            p.push(
                f.span(),
                "store_password_file is only for a `postgres://` store",
            );
        }
        let tls = match (&raw.tls_cert_file, &raw.tls_key_file) {
            (Some(c), Some(k)) => Some((resolve(base, c.get_ref()), resolve(base, k.get_ref()))),
            (None, None) => None,
            (Some(one), None) | (None, Some(one)) => {
                p.push(
                    one.span(),
                    "give both tls_cert_file and tls_key_file, or neither",
                );
                None
            }
        };
        let d = Limits::default();
        let int = |v: &Option<Spanned<i64>>,
                   key: &str,
                   def: usize,
                   min: u64,
                   max: u64,
                   p: &mut Problems| {
            v.as_ref()
                .map_or(def, |v| int_in_range(v, key, min, max, p) as usize)
        };
        let limits = Limits {
            max_connections: int(
                &raw.max_connections,
                "max_connections",
                d.max_connections,
                1,
                65_536,
                p,
            ),
            max_header_bytes: int(
                &raw.max_header_bytes,
                "max_header_bytes",
                d.max_header_bytes,
                1024,
                1 << 20,
                p,
            ),
            max_body_bytes: int(
                &raw.max_body_bytes,
                "max_body_bytes",
                d.max_body_bytes,
                1024,
                1 << 30,
                p,
            ),
            max_batch_bytes: int(
                &raw.max_batch_bytes,
                "max_batch_bytes",
                d.max_batch_bytes,
                1024,
                1 << 32,
                p,
            ),
            max_buffered_bytes: int(
                &raw.max_buffered_bytes,
                "max_buffered_bytes",
                d.max_buffered_bytes,
                1 << 20,
                1 << 40,
                p,
            ),
            header_timeout: secs(
                raw.header_timeout_secs.as_ref(),
                "header_timeout_secs",
                10.0,
                0.1,
                300.0,
                p,
            ),
            body_timeout: secs(
                raw.body_timeout_secs.as_ref(),
                "body_timeout_secs",
                30.0,
                0.1,
                3600.0,
                p,
            ),
            idle_timeout: secs(
                raw.idle_timeout_secs.as_ref(),
                "idle_timeout_secs",
                60.0,
                0.1,
                3600.0,
                p,
            ),
        };
        if limits.max_buffered_bytes < limits.max_body_bytes {
            let span = raw
                .max_buffered_bytes
                .as_ref()
                .or(raw.max_body_bytes.as_ref())
                .map(|v| v.span());
            p.push(
                span,
                format!(
                    "max_buffered_bytes ({}, the default is a quarter of the memory limit) is smaller than max_body_bytes ({}): a body of the allowed size could never be taken",
                    limits.max_buffered_bytes, limits.max_body_bytes
                ),
            );
        }
        let forward_interval = secs(
            raw.forward_interval_secs.as_ref(),
            "forward_interval_secs",
            60.0,
            0.1,
            86_400.0,
            p,
        );
        let settle = secs(
            raw.settle_secs.as_ref(),
            "settle_secs",
            120.0,
            0.0,
            7.0 * 86_400.0,
            p,
        );
        let problems_before_retention = p.list().len();
        let retention_days = raw
            .retention_days
            .as_ref()
            .map(|v| int_in_range(v, "retention_days", 1, 36_500, p) as u32);
        // A window is deleted once it is `retention_days` old at the least,
        // and forwarded `settle_secs` after its time, in the next round; an
        // hour more for the pruning pass and clocks.
        let forwarded_within = settle.as_secs() + forward_interval.as_secs() + 3600;
        if let Some(days) = retention_days
            && p.list().len() == problems_before_retention
            && u64::from(days) * 86_400 <= forwarded_within
        {
            p.push(
                raw.retention_days.as_ref().map(|v| v.span()),
                format!(
                    "retention_days ({days}) must be longer than settle_secs + forward_interval_secs \
                     + an hour ({forwarded_within} s): windows would be deleted before their \
                     aggregates are forwarded"
                ),
            );
        }
        (p.list().len() == before).then(|| Config {
            listen,
            store,
            tokens_dir: resolve(base, raw.tokens_dir.get_ref()),
            admin_token_file: raw.admin_token_file.map(|f| resolve(base, f.get_ref())),
            tls,
            edge_dims: raw
                .edge_dims
                .unwrap_or_else(|| DEFAULT_EDGE_DIMS.iter().map(|s| s.to_string()).collect()),
            limits,
            forward_interval,
            settle,
            retention_days,
        })
    }
}

/// `postgres://user:secret@host/db`: a password in the URL would sit in a
/// world-readable place and in `ps` of anything that prints it.
fn has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
        || url.contains("password=")
}

#[cfg(test)]
mod tests {
    use super::has_password;

    #[test]
    fn a_password_in_the_store_url_is_noticed() {
        assert!(has_password("postgres://u:p@h/db"));
        assert!(has_password("postgres://h/db?password=x"));
        assert!(!has_password("postgres://u@h/db"));
        assert!(!has_password("postgres://u@h:5432/db"));
        assert!(!has_password("postgresql://h:5432/db?sslmode=disable"));
    }
}
