//! The configuration file: one TOML document with `[agent]`, `[[source]]` and
//! `[[sink]]` tables, read in two phases.
//!
//! 1. **Raw**: serde structs that only mirror the TOML, `deny_unknown_fields`
//!    everywhere, values wrapped in [`Spanned`] so every later complaint can
//!    point at its line and column. Each table is deserialized on its own (from
//!    toml's spanned document tree), so a mistake in one table does not hide
//!    the mistakes in the others, and syntax errors are collected by toml's
//!    recoverable parser.
//! 2. **Validated**: typed values (`Duration`, `PathBuf`, `LevelFilter`, ...)
//!    with cross-field checks (unique names, ranges).
//!
//! Every problem found in either phase is reported, each as
//! `FILE:LINE:COL: what is wrong`, in one [`Problems`] list.
//!
//! `[[source]]` and `[[sink]]` tables carry a `type` tag; the keys every
//! component shares (`name`, and the delivery keys of sinks) are split off
//! here, and the rest goes to the component's own `Config::parse` through
//! the registries in `sources/mod.rs` and `sinks/mod.rs`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::LevelFilter;
use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::logging::parse_level;
use crate::problems::{
    MAX_NAME_LEN, Problem, Problems, check_name, deserialize, int_in_range, line_col, resolve,
    secs, split_off,
};
use crate::sinks::delivery::Delivery;
use crate::sinks::{self, SinkConfig};
use crate::sources::{self, SourceConfig};

pub const DEFAULT_PATH: &str = "/etc/edgemeter/edgemeter.toml";
const DEFAULT_STATE_DIR: &str = "/var/lib/edgemeter";
const DEFAULT_BUFFER_MAX_BYTES: u64 = 256 * 1024 * 1024;
const MIN_BUFFER_MAX_BYTES: u64 = 64 * 1024;
/// Bigger than any edge box's disk we expect; a typo guard, not a policy.
const MAX_BUFFER_MAX_BYTES: u64 = 1 << 40;
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// A fully validated configuration.
#[derive(Debug)]
pub struct Config {
    pub path: PathBuf,
    pub agent: Agent,
    pub sources: Vec<Component<SourceConfig>>,
    pub sinks: Vec<SinkSpec>,
    /// `[upstream]`: present only in an aggregator's config.
    pub upstream: Option<crate::upstream::Config>,
}

#[derive(Debug, Clone)]
pub struct Agent {
    pub id: String,
    pub state_dir: PathBuf,
    pub log_level: LevelFilter,
    pub buffer_max_bytes: u64,
    pub flush_interval: Duration,
    /// Sinks that are caught up are woken for new records at most this
    /// often (a sink with a backlog keeps sending full batches).
    pub deliver_interval: Duration,
    /// At shutdown, how long sources get to emit their last window and save
    /// their state before they are cancelled.
    pub shutdown_grace: Duration,
    /// `http_listen`: where `/metrics`, `/health` and the status page are
    /// served; off unless set (a bare port means 127.0.0.1).
    pub http_listen: Option<std::net::SocketAddr>,
    /// `health_interval_secs`: how often the agent emits its own health as
    /// points (`agent_*`), for an upstream's edges page. Unset, every 60 s
    /// when a sink is an `upstream`, else never; 0 turns it off.
    pub health_interval: Option<Duration>,
}

/// Unless set, agents that forward to an upstream tell it their health
/// this often.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(60);

/// A named, typed component table.
#[derive(Debug)]
pub struct Component<C> {
    pub name: String,
    pub config: C,
}

/// A sink with the delivery settings every sink shares.
#[derive(Debug)]
pub struct SinkSpec {
    pub name: String,
    pub delivery: Delivery,
    pub config: SinkConfig,
}

/// Why a config could not be loaded: rendered for a person, one line each.
#[derive(Debug)]
pub enum ConfigError {
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    TooLarge {
        path: PathBuf,
        bytes: u64,
    },
    Invalid {
        path: PathBuf,
        text: String,
        problems: Problems,
    },
}

impl Config {
    /// Every secret file the configured components will read: what the
    /// config calls it, and where it is.
    pub fn secret_files(&self) -> Vec<(String, PathBuf)> {
        use crate::aws::credentials::Source as Aws;
        use crate::sinks::SinkConfig;
        use crate::sources::SourceConfig;
        let mut out = Vec::new();
        for s in &self.sinks {
            let aws = match &s.config {
                SinkConfig::CloudWatchMetrics(c) => Some(&c.aws),
                SinkConfig::CloudWatchLogs(c) => Some(&c.aws),
                SinkConfig::Upstream(c) => {
                    out.push((
                        format!("sink `{}` token_file", s.name),
                        c.token_file.clone(),
                    ));
                    None
                }
                SinkConfig::Csv(_) => None,
            };
            match aws.map(|a| &a.credentials) {
                Some(Aws::Files {
                    secret_access_key_file,
                    session_token_file,
                    ..
                }) => {
                    out.push((
                        format!("sink `{}` secret_access_key_file", s.name),
                        secret_access_key_file.clone(),
                    ));
                    if let Some(f) = session_token_file {
                        out.push((format!("sink `{}` session_token_file", s.name), f.clone()));
                    }
                }
                Some(Aws::Profile { file: Some(f), .. }) => {
                    out.push((format!("sink `{}` credentials_file", s.name), f.clone()));
                }
                _ => {}
            }
        }
        for s in &self.sources {
            if let SourceConfig::Relay(c) = &s.config
                && let Some(p) = &c.provision
            {
                for stream in &c.streams {
                    out.push((
                        format!("source `{}` token file", s.name),
                        p.dir.join(format!("log.token.{stream}")),
                    ));
                }
            }
        }
        if let Some(u) = &self.upstream {
            if let crate::upstream::config::StoreKind::Postgres {
                password_file: Some(f),
                ..
            } = &u.store
            {
                out.push(("[upstream] store_password_file".to_owned(), f.clone()));
            }
            if let Some(f) = &u.admin_token_file {
                out.push(("[upstream] admin_token_file".to_owned(), f.clone()));
            }
        }
        out
    }
}

impl ConfigError {
    pub fn problem_count(&self) -> usize {
        match self {
            ConfigError::Invalid { problems, .. } => problems.list().len(),
            _ => 1,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, error } => {
                write!(
                    f,
                    "{}: cannot read the config file: {error}",
                    path.display()
                )
            }
            ConfigError::TooLarge { path, bytes } => write!(
                f,
                "{}: the config file is {bytes} bytes; the limit is {MAX_CONFIG_BYTES}",
                path.display()
            ),
            ConfigError::Invalid {
                path,
                text,
                problems,
            } => {
                let mut sorted: Vec<&Problem> = problems.list().iter().collect();
                sorted.sort_by_key(|p| p.span.as_ref().map_or(0, |s| s.start));
                for (i, p) in sorted.iter().enumerate() {
                    if i > 0 {
                        writeln!(f)?;
                    }
                    match &p.span {
                        Some(span) => {
                            let (line, col) = line_col(text, span.start);
                            write!(f, "{}:{line}:{col}: {}", path.display(), p.message)?
                        }
                        None => write!(f, "{}: {}", path.display(), p.message)?,
                    }
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------- loading

pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let read_err = |error| ConfigError::Read {
        path: path.to_owned(),
        error,
    };
    let bytes = std::fs::metadata(path).map_err(read_err)?.len();
    if bytes > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
            bytes,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    parse(path, &text)
}

/// Parse and validate a config document. `path` is used for messages and to
/// resolve relative paths (relative to the file's directory, so a config
/// behaves the same whatever the working directory).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let mut problems = Problems::default();
    let base = path.parent().unwrap_or(Path::new("."));
    let cfg = parse_into(base, text, &mut problems);
    match cfg {
        Some(cfg) if problems.is_empty() => Ok(Config {
            path: path.to_owned(),
            ..cfg
        }),
        _ => {
            if problems.is_empty() {
                problems.push(None, "the configuration is invalid");
            }
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                text: text.to_owned(),
                problems,
            })
        }
    }
}

fn parse_into(base: &Path, text: &str, p: &mut Problems) -> Option<Config> {
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    let whole = root.span();
    for e in &syntax_errors {
        p.push_toml(e, &whole);
    }
    if !syntax_errors.is_empty() {
        // A document with syntax errors has holes; checking its meaning would
        // mostly report echoes of the same mistakes.
        return None;
    }
    let root = root.into_inner();

    let mut agent = None;
    let mut sources = Vec::new();
    let mut sinks = Vec::new();
    let mut upstream = None;
    for (key, value) in root {
        let value_span = value.span();
        match key.get_ref().as_ref() {
            "agent" => match value.into_inner() {
                DeValue::Table(t) => agent = parse_agent(base, Spanned::new(value_span, t), p),
                _ => p.push(key.span(), "`agent` must be a table: write `[agent]`"),
            },
            "upstream" => match value.into_inner() {
                DeValue::Table(t) => {
                    upstream = crate::upstream::Config::parse(base, Spanned::new(value_span, t), p)
                }
                _ => p.push(key.span(), "`upstream` must be a table: write `[upstream]`"),
            },
            k @ ("source" | "sink") => {
                for t in array_of_tables(k, key.span(), value, p) {
                    if k == "source" {
                        sources.extend(parse_source(base, t, p));
                    } else {
                        sinks.extend(parse_sink(base, t, p));
                    }
                }
            }
            other => p.push(
                key.span(),
                format!(
                    "unknown top-level key `{other}`; expected `[agent]`, `[[source]]`, `[[sink]]` or `[upstream]`"
                ),
            ),
        }
    }
    let mut agent = match agent {
        Some(a) => a,
        // A missing [agent] table means every agent default.
        None => parse_agent(base, Spanned::new(0..0, DeTable::new()), p)?,
    };
    agent.health_interval = match agent.health_interval {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => sinks
            .iter()
            .any(|(c, _)| matches!(c.config, SinkConfig::Upstream(_)))
            .then_some(DEFAULT_HEALTH_INTERVAL),
    };
    check_unique_names(
        "source",
        sources.iter().map(|(n, s)| (&n.name, s.clone())),
        p,
    );
    check_unique_names("sink", sinks.iter().map(|(n, s)| (&n.name, s.clone())), p);
    Some(Config {
        path: PathBuf::new(),
        agent,
        sources: sources.into_iter().map(|(c, _)| c).collect(),
        sinks: sinks.into_iter().map(|(c, _)| c).collect(),
        upstream,
    })
}

fn array_of_tables<'i>(
    key: &str,
    key_span: Range<usize>,
    value: Spanned<DeValue<'i>>,
    p: &mut Problems,
) -> Vec<Spanned<DeTable<'i>>> {
    let mut out = Vec::new();
    match value.into_inner() {
        DeValue::Array(items) => {
            for item in items {
                let span = item.span();
                match item.into_inner() {
                    DeValue::Table(t) => out.push(Spanned::new(span, t)),
                    _ => p.push(
                        span,
                        format!("each `{key}` must be a table: write `[[{key}]]`"),
                    ),
                }
            }
        }
        _ => p.push(
            key_span,
            format!("`{key}` must be a list of tables: write `[[{key}]]`"),
        ),
    }
    out
}

// ---------------------------------------------------------------- [agent]

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    id: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    buffer_max_bytes: Option<Spanned<i64>>,
    flush_interval_secs: Option<Spanned<f64>>,
    deliver_interval_secs: Option<Spanned<f64>>,
    shutdown_grace_secs: Option<Spanned<f64>>,
    http_listen: Option<Spanned<String>>,
    health_interval_secs: Option<Spanned<f64>>,
}

fn parse_agent(base: &Path, table: Spanned<DeTable<'_>>, p: &mut Problems) -> Option<Agent> {
    let raw: RawAgent = deserialize(table, p)?;
    let before = p.list().len();
    let id = match &raw.id {
        Some(id) => {
            check_name("agent id", id, p);
            id.get_ref().clone()
        }
        None => default_agent_id(),
    };
    let state_dir = raw.state_dir.as_ref().map_or_else(
        || PathBuf::from(DEFAULT_STATE_DIR),
        |d| resolve(base, d.get_ref()),
    );
    let log_level = match &raw.log_level {
        None => LevelFilter::Info,
        Some(l) => parse_level(l.get_ref()).unwrap_or_else(|| {
            p.push(
                l.span(),
                format!(
                    "log_level `{}` is not one of off, error, warn, info, debug, trace",
                    l.get_ref()
                ),
            );
            LevelFilter::Info
        }),
    };
    let buffer_max_bytes = match &raw.buffer_max_bytes {
        None => DEFAULT_BUFFER_MAX_BYTES,
        Some(b) => int_in_range(
            b,
            "buffer_max_bytes",
            MIN_BUFFER_MAX_BYTES,
            MAX_BUFFER_MAX_BYTES,
            p,
        ),
    };
    let flush_interval = secs(
        raw.flush_interval_secs.as_ref(),
        "flush_interval_secs",
        0.1,
        0.01,
        60.0,
        p,
    );
    // Unset, it is 1 s; or, in a config that sets flush_interval_secs, that
    // interval, the delivery cadence such configs had before the two were
    // separate.
    let deliver_interval = match (&raw.deliver_interval_secs, &raw.flush_interval_secs) {
        (None, Some(_)) => flush_interval,
        (given, _) => secs(given.as_ref(), "deliver_interval_secs", 1.0, 0.01, 600.0, p),
    };
    let shutdown_grace = secs(
        raw.shutdown_grace_secs.as_ref(),
        "shutdown_grace_secs",
        5.0,
        0.1,
        60.0,
        p,
    );
    let http_listen = raw.http_listen.as_ref().and_then(|l| {
        let text = l.get_ref().trim();
        let parsed = match text.parse::<u16>() {
            Ok(port) => Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
            Err(_) => text.parse(),
        };
        parsed
            .map_err(|_| {
                p.push(
                    l.span(),
                    format!(
                        "http_listen `{text}` must be a port (served on 127.0.0.1) or an address and port such as `127.0.0.1:9464` or `[::1]:9464`"
                    ),
                )
            })
            .ok()
    });
    // Decided with the sinks known (see `parse`), unless given here.
    let health_interval = raw.health_interval_secs.as_ref().map(|v| {
        if *v.get_ref() == 0.0 {
            Duration::ZERO
        } else {
            secs(Some(v), "health_interval_secs", 60.0, 1.0, 3600.0, p)
        }
    });
    (p.list().len() == before).then_some(Agent {
        id,
        state_dir,
        log_level,
        buffer_max_bytes,
        flush_interval,
        deliver_interval,
        shutdown_grace,
        http_listen,
        health_interval,
    })
}

fn default_agent_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let id: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(MAX_NAME_LEN)
        .collect();
    if id.is_empty() {
        "edgemeter".to_owned()
    } else {
        id
    }
}

// ---------------------------------------------------------------- components

/// Keys every `[[source]]` has besides its own.
const SOURCE_COMMON: &[&str] = &["type", "name"];
/// Keys every `[[sink]]` has besides its own.
const SINK_COMMON: &[&str] = &[
    "type",
    "name",
    "batch_max_records",
    "retry_initial_secs",
    "retry_max_secs",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSourceCommon {
    #[serde(rename = "type")]
    kind: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSinkCommon {
    #[serde(rename = "type")]
    kind: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    batch_max_records: Option<Spanned<i64>>,
    retry_initial_secs: Option<Spanned<f64>>,
    retry_max_secs: Option<Spanned<f64>>,
}

fn component_kind(
    what: &str,
    kind: Option<Spanned<String>>,
    name: &Option<Spanned<String>>,
    table_span: Range<usize>,
    known: &[&str],
    p: &mut Problems,
) -> Option<Spanned<String>> {
    if let Some(n) = name {
        check_name(&format!("{what} name"), n, p);
    }
    match kind {
        None => {
            p.push(
                table_span,
                format!(
                    "this [[{what}]] has no `type`; known types: {}",
                    known.join(", ")
                ),
            );
            None
        }
        Some(k) if !known.contains(&k.get_ref().as_str()) => {
            p.push(
                k.span(),
                format!(
                    "unknown {what} type `{}`; known types: {}",
                    k.get_ref(),
                    known.join(", ")
                ),
            );
            None
        }
        Some(k) => Some(k),
    }
}

type Named<T> = (T, Range<usize>);

fn parse_source(
    base: &Path,
    mut table: Spanned<DeTable<'_>>,
    p: &mut Problems,
) -> Option<Named<Component<SourceConfig>>> {
    let span = table.span();
    let common: RawSourceCommon = deserialize(split_off(&mut table, SOURCE_COMMON), p)?;
    let kind = component_kind(
        "source",
        common.kind,
        &common.name,
        span.clone(),
        sources::TYPES,
        p,
    )?;
    let config = sources::parse_config(kind.get_ref(), base, table, p)?;
    let (name, name_span) = match common.name {
        Some(n) => (n.get_ref().clone(), n.span()),
        None => (kind.get_ref().clone(), kind.span()),
    };
    Some((Component { name, config }, name_span))
}

fn parse_sink(
    base: &Path,
    mut table: Spanned<DeTable<'_>>,
    p: &mut Problems,
) -> Option<Named<SinkSpec>> {
    let span = table.span();
    let common: RawSinkCommon = deserialize(split_off(&mut table, SINK_COMMON), p)?;
    let kind = component_kind(
        "sink",
        common.kind,
        &common.name,
        span.clone(),
        sinks::TYPES,
        p,
    )?;
    let batch_max_records = common.batch_max_records.as_ref().map_or(1000, |b| {
        int_in_range(b, "batch_max_records", 1, 100_000, p) as usize
    });
    let retry_initial = secs(
        common.retry_initial_secs.as_ref(),
        "retry_initial_secs",
        1.0,
        0.01,
        3600.0,
        p,
    );
    let retry_max = secs(
        common.retry_max_secs.as_ref(),
        "retry_max_secs",
        300.0,
        0.01,
        86_400.0,
        p,
    );
    if retry_max < retry_initial
        && let Some(m) = &common.retry_max_secs
    {
        p.push(
            m.span(),
            "retry_max_secs must not be smaller than retry_initial_secs",
        );
    }
    let config = sinks::parse_config(kind.get_ref(), base, table, p)?;
    let (name, name_span) = match common.name {
        Some(n) => (n.get_ref().clone(), n.span()),
        None => (kind.get_ref().clone(), kind.span()),
    };
    let delivery = Delivery {
        batch_max_records,
        retry_initial,
        retry_max,
    };
    Some((
        SinkSpec {
            name,
            delivery,
            config,
        },
        name_span,
    ))
}

fn check_unique_names<'a>(
    what: &str,
    names: impl Iterator<Item = (&'a String, Range<usize>)>,
    p: &mut Problems,
) {
    let mut seen: Vec<&String> = Vec::new();
    for (name, span) in names {
        if seen.contains(&name) {
            p.push(
                span,
                format!(
                    "two {what}s are named `{name}`; give each a distinct `name` (it keys the outbox and `edgemeter status`)"
                ),
            );
        }
        seen.push(name);
    }
}

// ---------------------------------------------------------------- value helpers

#[cfg(test)]
mod tests;
