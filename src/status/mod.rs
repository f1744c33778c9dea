//! What an agent can say about itself, one snapshot in three forms: the
//! text of `edgemeter status` ([`text`]), the JSON of `status --json` and
//! `/status.json` (this module's [`Snapshot`], schema [`SCHEMA`]), and the
//! Prometheus text of `/metrics` ([`prometheus`]). All three render the same
//! [`Snapshot`], so a scrape and `status --json` taken at the same moment
//! agree value for value. [`serve`] answers `[agent] http_listen`.
//!
//! A snapshot is read from what the agent writes anyway: the outbox's
//! bookkeeping (a read-only SQLite connection) and each source's status
//! file ([`crate::sources::Published`]). Reading costs the running agent
//! nothing until somebody asks.
//!
//! # `status --json`, schema 1
//! Fields are only ever added within a schema version; a renamed or removed
//! field, or a changed meaning, raises `schema`. Times are milliseconds
//! since the Unix epoch (`*_ms`), `null` when it never happened.
//!
//! | field | meaning |
//! |---|---|
//! | `schema` | `1` |
//! | `at_ms` | when the snapshot was taken |
//! | `agent.id`, `agent.version` | the agent's id, edgemeter's version |
//! | `agent.running`, `agent.pid` | whether an agent holds the state directory, and its pid (`null` if unknown) |
//! | `agent.state_dir` | the state directory |
//! | `outbox.path` | the outbox file |
//! | `outbox.records`, `outbox.bytes`, `outbox.max_bytes` | buffered records, their charged bytes, `buffer_max_bytes` |
//! | `outbox.oldest_ms` | the oldest buffered record's arrival, `null` when empty |
//! | `outbox.dead_letter_bytes` | bytes kept in dead letters |
//! | `drops[]` | `{reason, sink, records}`: records dropped, by reason and sink |
//! | `sinks[]` | `{name, pending, delivered_records, delivered_batches, failures, last_delivery_ms, last_failure_ms, last_error, dead_letters, counters, peer_clock_offset_ms, peer_clock_read_ms}`: `peer_clock_offset_ms` is the receiver's clock less this machine's, from the `Date` of its answers (`null` before any), read at `peer_clock_read_ms` |
//! | `sources[]` | `{name, type, written_ms, text, samples}`: `written_ms` is when the source last wrote its status (`null`: never, as for `synthetic`), `text` what `status` shows, `samples[]` `{name, labels, value}` its figures (`/metrics` shows them as `edgemeter_<name>{source=…}`) |

pub mod graphs;
pub mod health;
pub mod prometheus;
pub mod serve;
pub mod text;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::outbox::{Outbox, Stats};
use crate::sources::{Published, Sample};
use crate::state_dir;

/// The version of the JSON below; see the module header.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub schema: u32,
    pub at_ms: i64,
    pub agent: AgentInfo,
    pub outbox: OutboxInfo,
    pub drops: Vec<Drop>,
    pub sinks: Vec<SinkInfo>,
    pub sources: Vec<SourceInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub id: String,
    pub version: String,
    pub running: bool,
    pub pid: Option<u32>,
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxInfo {
    pub path: PathBuf,
    pub records: i64,
    pub bytes: i64,
    pub max_bytes: u64,
    pub oldest_ms: Option<i64>,
    pub dead_letter_bytes: i64,
    /// Bytes the agent may still write where the outbox is (statvfs), if
    /// that can be told: below [`state_dir::FULL_BELOW_BYTES`] commits fail.
    #[serde(default)]
    pub disk_free_bytes: Option<u64>,
}

impl OutboxInfo {
    /// The disk's free bytes, when it is too full for a commit.
    pub fn disk_full(&self) -> Option<u64> {
        self.disk_free_bytes
            .filter(|&free| free < state_dir::FULL_BELOW_BYTES)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drop {
    pub reason: String,
    pub sink: String,
    pub records: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SinkInfo {
    pub name: String,
    pub pending: i64,
    pub delivered_records: i64,
    pub delivered_batches: i64,
    pub failures: i64,
    pub last_delivery_ms: Option<i64>,
    pub last_failure_ms: Option<i64>,
    pub last_error: Option<String>,
    pub dead_letters: i64,
    /// The sink's own counters (e.g. points CloudWatch rejected), by key.
    pub counters: BTreeMap<String, i64>,
    /// The receiver's clock less this machine's, from the `Date` of its
    /// last answers, and when that was read; `null` before any answer.
    #[serde(default)]
    pub peer_clock_offset_ms: Option<i64>,
    #[serde(default)]
    pub peer_clock_read_ms: Option<i64>,
}

impl SinkInfo {
    /// The receiver's clock less ours, when ours is off by more than
    /// [`crate::clock::PEER_CLOCK_OFF_MS`].
    pub fn clock_off(&self) -> Option<i64> {
        self.peer_clock_offset_ms
            .filter(|o| o.abs() > crate::clock::PEER_CLOCK_OFF_MS)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub written_ms: Option<i64>,
    pub text: String,
    pub samples: Vec<Sample>,
}

/// What a snapshot needs of the config (the agent keeps this, not the
/// whole config, for `http_listen`).
#[derive(Debug, Clone)]
pub struct Scope {
    pub agent_id: String,
    pub state_dir: PathBuf,
    pub buffer_max_bytes: u64,
    /// (name, type) of each `[[source]]`.
    pub sources: Vec<(String, String)>,
}

impl Scope {
    pub fn of(config: &Config) -> Scope {
        Scope {
            agent_id: config.agent.id.clone(),
            state_dir: config.agent.state_dir.clone(),
            buffer_max_bytes: config.agent.buffer_max_bytes,
            sources: config
                .sources
                .iter()
                .map(|s| (s.name.clone(), s.config.kind().to_owned()))
                .collect(),
        }
    }
}

/// Who holds the state directory, as `status` asks it from outside, or as
/// the running agent knows it of itself.
#[derive(Debug, Clone, Copy)]
pub enum Holder {
    Ask,
    Me,
}

/// Take a snapshot: blocking (SQLite, files), so the agent calls it on a
/// worker thread.
pub fn collect(scope: &Scope, holder: Holder, now: i64) -> Result<Snapshot, String> {
    let dir = &scope.state_dir;
    let (running, pid) = match holder {
        Holder::Me => (true, Some(std::process::id())),
        Holder::Ask => match state_dir::holder(dir) {
            None => (false, None),
            Some(0) => (true, None),
            Some(pid) => (true, Some(pid)),
        },
    };
    let outbox = Outbox::open_read_only(dir).map_err(|e| e.to_string())?;
    let stats = outbox.stats().map_err(|e| e.to_string())?;
    Ok(Snapshot {
        schema: SCHEMA,
        at_ms: now,
        agent: AgentInfo {
            id: scope.agent_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            running,
            pid,
            state_dir: dir.clone(),
        },
        outbox: OutboxInfo {
            disk_free_bytes: state_dir::free_bytes(dir),
            ..outbox_info(outbox.path(), scope.buffer_max_bytes, &stats)
        },
        drops: stats
            .drops
            .iter()
            .map(|(reason, sink, n)| Drop {
                reason: reason.clone(),
                sink: sink.clone(),
                records: *n,
            })
            .collect(),
        sinks: stats
            .sinks
            .iter()
            .map(|k| SinkInfo {
                name: k.name.clone(),
                pending: k.pending,
                delivered_records: k.delivered_records,
                delivered_batches: k.delivered_batches,
                failures: k.failures,
                last_delivery_ms: k.last_delivery_ms,
                last_failure_ms: k.last_failure_ms,
                last_error: k.last_error.clone(),
                dead_letters: k.dead_letters,
                counters: k.counters.iter().cloned().collect(),
                peer_clock_offset_ms: k.peer_clock.map(|(o, _)| o),
                peer_clock_read_ms: k.peer_clock.map(|(_, at)| at),
            })
            .collect(),
        sources: scope
            .sources
            .iter()
            .map(|(name, kind)| source_info(dir, name, kind))
            .collect(),
    })
}

fn outbox_info(path: &Path, max_bytes: u64, s: &Stats) -> OutboxInfo {
    OutboxInfo {
        path: path.to_owned(),
        records: s.records,
        bytes: s.bytes,
        max_bytes,
        oldest_ms: s.oldest_at_ms,
        dead_letter_bytes: s.dead_letter_bytes,
        disk_free_bytes: None,
    }
}

fn source_info(dir: &Path, name: &str, kind: &str) -> SourceInfo {
    let path = crate::sources::status_path(dir, name);
    let (written_ms, published) = match std::fs::read(&path) {
        Err(_) => (None, Published::default()),
        Ok(bytes) => {
            let written = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64);
            (written, Published::parse(&bytes))
        }
    };
    SourceInfo {
        name: name.to_owned(),
        kind: kind.to_owned(),
        written_ms,
        text: published.text,
        samples: published.samples,
    }
}

#[cfg(test)]
mod tests;
