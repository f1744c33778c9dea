//! Sources: where observations come from.
//!
//! # The contract every source keeps
//! - A source MUST have a raw config struct that mirrors its TOML table with
//!   `deny_unknown_fields`, and a `Config::parse` that validates it into typed
//!   values, pushing every problem (with its span) to [`Problems`] instead of
//!   stopping at the first. `type` and `name` are taken off by `config.rs`.
//! - A source MUST be registered in [`TYPES`], [`parse_config`] and [`build`]
//!   below, and nowhere else: the agent knows sources only through
//!   [`Source`].
//! - `build` MUST NOT do I/O that can wait (connecting, reading a database);
//!   that belongs in `run`, so a source that cannot reach its peer yet does
//!   not stop the agent from starting.
//! - `run` MUST hand every observation to [`Emitter::emit`] and MUST NOT
//!   touch the outbox or any sink: the outbox writer owns durability. A
//!   source MAY keep state of its own in a file under `state_dir` (the
//!   `xx_gateway` source keeps its epoch sets there).
//! - `run` MUST return promptly once [`Shutdown`] resolves (finish or drop
//!   the record at hand, close connections), and MUST NOT return before then
//!   except when `emit` reports the writer gone.
//! - `run` MUST survive its peer going away: log the change of state once,
//!   retry with [`crate::backoff::Backoff`], never busy-loop, never panic on
//!   input.
//! - Blocking calls MUST run off the event loop, on the source's own
//!   [`crate::runtime::Worker`] (one in flight per source); never
//!   `smol::unblock`, whose pool never shrinks.
//! - A source SHOULD label what it emits with the agent id or its peer's
//!   identity so that an upstream can tell edges apart.

pub mod relay;
pub mod synthetic;
pub mod xx_gateway;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use toml::Spanned;
use toml::de::DeTable;

use crate::problems::Problems;
use crate::runtime::{Emitter, LocalBoxFuture, Shutdown, Spawner, Worker};
use std::rc::Rc;

/// The `type` values a `[[source]]` may have.
pub const TYPES: &[&str] = &["synthetic", "xx_gateway", "relay"];

#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    Synthetic(synthetic::Config),
    XxGateway(xx_gateway::Config),
    Relay(relay::Config),
}

impl SourceConfig {
    /// Its `type` in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Synthetic(_) => "synthetic",
            SourceConfig::XxGateway(_) => "xx_gateway",
            SourceConfig::Relay(_) => "relay",
        }
    }
}

/// What a running source gets from the agent.
/// The points an agent emits about itself (`status::health`), which an
/// upstream's edges page reads: in this order, the last two per `sink`.
pub const AGENT_HEALTH_METRICS: [&str; 6] = [
    "agent_buffered_records",
    "agent_buffered_bytes",
    "agent_oldest_record_age_seconds",
    "agent_dropped_records",
    "agent_sink_pending_records",
    "agent_sink_failures",
];

pub struct Context {
    /// The source's `name` from the config (for logs and labels).
    pub name: String,
    /// The agent's `id`.
    pub agent_id: String,
    pub emit: Emitter,
    pub shutdown: Shutdown,
    /// Tasks of the source's own (connections, streams) go on the agent's
    /// executor through this: there is one executor in the process.
    pub spawner: Spawner,
    /// The agent's IO thread (the outbox's): for small, frequent file jobs
    /// (a status file, a save of what changed) that must leave the event
    /// loop but do not warrant a thread of their own that never idles.
    /// They run in turn with the outbox's commits, so nothing long goes
    /// here (a source's large dumps keep a worker of its own).
    pub io: Rc<Worker>,
    /// How long the source has, once shutdown begins, before it is
    /// cancelled (`[agent] shutdown_grace_secs`): what it writes at the end
    /// must fit in it.
    pub grace: std::time::Duration,
}

pub trait Source {
    /// The task that runs until shutdown.
    fn run(self: Box<Self>, ctx: Context) -> LocalBoxFuture<'static, ()>;
}

pub fn parse_config(
    kind: &str,
    base: &Path,
    table: Spanned<DeTable<'_>>,
    p: &mut Problems,
) -> Option<SourceConfig> {
    match kind {
        "synthetic" => synthetic::Config::parse(table, p).map(SourceConfig::Synthetic),
        "xx_gateway" => xx_gateway::Config::parse(base, table, p).map(SourceConfig::XxGateway),
        "relay" => relay::Config::parse(base, table, p).map(SourceConfig::Relay),
        other => unreachable!("config.rs checks the type against TYPES; got `{other}`"),
    }
}

/// What `edgemeter check` finds wrong in the files a source will read or
/// write (beyond what parsing the config found), in words.
pub fn check(config: &SourceConfig) -> Vec<String> {
    match config {
        SourceConfig::XxGateway(c) => xx_gateway::check(c),
        SourceConfig::Synthetic(_) | SourceConfig::Relay(_) => Vec::new(),
    }
}

/// `state_dir` is where a source may keep state files of its own (never
/// the outbox).
pub fn build(config: &SourceConfig, state_dir: &Path) -> Box<dyn Source> {
    match config {
        SourceConfig::Synthetic(c) => Box::new(synthetic::Synthetic::new(c.clone())),
        SourceConfig::XxGateway(c) => {
            Box::new(xx_gateway::XxGateway::new(c.clone(), state_dir.to_owned()))
        }
        SourceConfig::Relay(c) => Box::new(relay::Relay::new(c.clone(), state_dir.to_owned())),
    }
}

/// Open a source's own SQLite file (WAL) with `schema`, or, if the file is
/// unusable, move it aside (kept as `<file>.corrupt-<ms>`), log what the
/// source does about it (`next`, e.g. "rebuilding it from the gateway") and
/// start a fresh one. Only for derived or recoverable state.
pub fn open_own_db(path: &Path, schema: &str, next: &str) -> Result<rusqlite::Connection, String> {
    let attempt = |path: &Path| -> rusqlite::Result<rusqlite::Connection> {
        let conn = rusqlite::Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(schema)?;
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(rusqlite::Error::InvalidQuery);
        }
        Ok(conn)
    };
    match attempt(path) {
        Ok(c) => Ok(c),
        Err(e0) => {
            let aside = crate::state_dir::move_aside(path).map_err(|(to, e)| {
                format!(
                    "{} is unusable ({e0}) and cannot be moved aside to {}: {e}",
                    path.display(),
                    to.display()
                )
            })?;
            log::error!(
                "{} was unusable ({e0}); moved it aside to {} and {next}",
                path.display(),
                aside.display()
            );
            attempt(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
        }
    }
}

/// Where a source publishes its state (a [`Published`] document as JSON,
/// replaced atomically) for `edgemeter status`, `status --json` and an
/// agent's `/metrics`.
pub fn status_path(state_dir: &Path, name: &str) -> std::path::PathBuf {
    state_dir.join(format!("source-{name}.status"))
}

/// What a source says about itself: the lines `edgemeter status` shows, and
/// the same figures as samples for `status --json` and `/metrics`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Published {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Published {
    /// Read a status file; a plain-text one (written before samples
    /// existed) is all text.
    pub fn parse(bytes: &[u8]) -> Published {
        serde_json::from_slice(bytes).unwrap_or_else(|_| Published {
            text: String::from_utf8_lossy(bytes).into_owned(),
            samples: Vec::new(),
        })
    }
}

/// One value of a [`Metric`], with its labels (the reader adds `source`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn new(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            value,
        }
    }
}

/// A figure a source publishes: its name (`/metrics` prefixes
/// `edgemeter_`), whether it only grows, and what it means.
#[derive(Debug)]
pub struct Metric {
    pub name: &'static str,
    pub counter: bool,
    pub help: &'static str,
}

/// Every metric any source publishes.
pub fn metrics() -> impl Iterator<Item = &'static Metric> {
    relay::status::METRICS
        .iter()
        .chain(xx_gateway::status::METRICS)
}
