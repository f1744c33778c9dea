//! `[[source]] type = "relay"`: which session host, which streams, how hard
//! to retry, what to keep, and where the analytics files go.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeTable;

use crate::problems::{Problems, deserialize, int_in_range, resolve, secs};

/// More streams than any site has (86 today); a bound, so a typo such as
/// `spin0..99999` is an error rather than 100,000 connections.
pub const MAX_STREAMS: usize = 1_000;

/// The session host accepts messages up to 10 MB.
pub const MAX_FRAME_BYTES_LIMIT: u64 = 16 * 1024 * 1024;

/// The raw files' default bound, 1 GiB: about 5 million messages of 200
/// bytes, and a small part of an SD card.
pub const DEFAULT_RAW_FILES_MAX_BYTES: u64 = 1 << 30;
/// 16 TiB: no disk holds more.
const RAW_FILES_MAX_BYTES_LIMIT: u64 = 16 << 40;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `host:port` of the session host (plain `ws://` on the same machine).
    pub host: String,
    pub port: u16,
    pub streams: Vec<String>,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// Ping a stream that was silent this long.
    pub ping_interval: Duration,
    /// Reconnect a stream from which nothing (not even a pong) arrived for
    /// this long: the host hung without closing the connection.
    pub stall_after: Duration,
    pub max_frame_bytes: usize,
    pub window: Duration,
    /// Store every logging-envelope message as an event in the outbox.
    pub events: bool,
    pub files_dir: Option<PathBuf>,
    pub dump_interval: Duration,
    /// Also append each message to `<user>-<hardware>-<exp>-<course>.json`.
    pub raw_files: bool,
    /// The raw files' bound (`raw_files_max_bytes`): past it, the least
    /// recently written are cut to their last message.
    pub raw_files_max_bytes: u64,
    pub max_users: usize,
    pub provision: Option<Provision>,
    /// Answer the students' dashboards as the old analytics client did,
    /// from the comparison graphs in this directory
    /// (`answer_requests = true`, `comparison_dir = ...`).
    pub answer_from: Option<PathBuf>,
}

/// Where `log.access.<stream>` / `log.token.<stream>` live, and how often the
/// session host's rules are checked (it forgets them when it restarts).
#[derive(Debug, Clone, PartialEq)]
pub struct Provision {
    pub dir: PathBuf,
    pub check_interval: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    session_host: Option<Spanned<String>>,
    streams: Spanned<Vec<Spanned<String>>>,
    reconnect_initial_secs: Option<Spanned<f64>>,
    reconnect_max_secs: Option<Spanned<f64>>,
    ping_interval_secs: Option<Spanned<f64>>,
    stall_after_secs: Option<Spanned<f64>>,
    max_frame_bytes: Option<Spanned<i64>>,
    window_secs: Option<Spanned<i64>>,
    events: Option<bool>,
    files_dir: Option<Spanned<String>>,
    dump_interval_secs: Option<Spanned<f64>>,
    raw_files: Option<Spanned<bool>>,
    raw_files_max_bytes: Option<Spanned<i64>>,
    max_users: Option<Spanned<i64>>,
    provision: Option<RawProvision>,
    answer_requests: Option<Spanned<bool>>,
    comparison_dir: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvision {
    dir: Spanned<String>,
    check_interval_secs: Option<Spanned<f64>>,
}

impl Config {
    pub fn parse(base: &Path, table: Spanned<DeTable<'_>>, p: &mut Problems) -> Option<Config> {
        let raw: Raw = deserialize(table, p)?;
        let before = p.list().len();
        let (host, port) = match &raw.session_host {
            None => ("127.0.0.1".to_owned(), 8888),
            Some(h) => match parse_session_host(h.get_ref()) {
                Ok(hp) => hp,
                Err(e) => {
                    p.push(h.span(), e);
                    (String::new(), 0)
                }
            },
        };
        let mut streams = Vec::new();
        for s in raw.streams.get_ref() {
            match expand_stream(s.get_ref()) {
                Ok(names) => streams.extend(names),
                Err(e) => p.push(s.span(), e),
            }
        }
        if streams.is_empty() && p.list().len() == before {
            p.push(raw.streams.span(), "streams must name at least one stream");
        }
        if streams.len() > MAX_STREAMS {
            p.push(
                raw.streams.span(),
                format!(
                    "streams expand to {} names; at most {MAX_STREAMS} are allowed",
                    streams.len()
                ),
            );
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = streams.iter().find(|s| !seen.insert(s.as_str())) {
            p.push(
                raw.streams.span(),
                format!("stream `{dup}` is listed twice"),
            );
        }
        let reconnect_initial = secs(
            raw.reconnect_initial_secs.as_ref(),
            "reconnect_initial_secs",
            1.0,
            0.01,
            3600.0,
            p,
        );
        let reconnect_max = secs(
            raw.reconnect_max_secs.as_ref(),
            "reconnect_max_secs",
            60.0,
            0.01,
            86_400.0,
            p,
        );
        if reconnect_max < reconnect_initial
            && let Some(m) = &raw.reconnect_max_secs
        {
            p.push(
                m.span(),
                "reconnect_max_secs must be at least reconnect_initial_secs",
            );
        }
        let ping_interval = secs(
            raw.ping_interval_secs.as_ref(),
            "ping_interval_secs",
            15.0,
            0.1,
            3600.0,
            p,
        );
        let stall_after = secs(
            raw.stall_after_secs.as_ref(),
            "stall_after_secs",
            45.0,
            0.2,
            86_400.0,
            p,
        );
        if stall_after <= ping_interval
            && let Some(s) = raw
                .stall_after_secs
                .as_ref()
                .or(raw.ping_interval_secs.as_ref())
        {
            p.push(
                s.span(),
                format!(
                    "stall_after_secs ({} s) must be longer than ping_interval_secs ({} s): a stream is pinged after that much silence and declared hung only if the pong does not come",
                    stall_after.as_secs_f64(),
                    ping_interval.as_secs_f64()
                ),
            );
        }
        let max_frame_bytes = raw.max_frame_bytes.as_ref().map_or(1024 * 1024, |v| {
            int_in_range(v, "max_frame_bytes", 1024, MAX_FRAME_BYTES_LIMIT, p) as usize
        });
        let window = raw.window_secs.as_ref().map_or(300, |v| {
            let w = int_in_range(v, "window_secs", 1, 86_400, p);
            if 86_400 % w != 0 {
                p.push(
                    v.span(),
                    format!("window_secs = {w} must divide a day (60, 300, 900, 3600, ...)"),
                );
            }
            w
        });
        let files_dir = raw.files_dir.as_ref().map(|d| {
            if d.get_ref().is_empty() {
                p.push(d.span(), "files_dir must not be empty");
            }
            resolve(base, d.get_ref())
        });
        let dump_interval = secs(
            raw.dump_interval_secs.as_ref(),
            "dump_interval_secs",
            60.0,
            1.0,
            86_400.0,
            p,
        );
        let raw_files = match &raw.raw_files {
            Some(r) if *r.get_ref() && files_dir.is_none() => {
                p.push(r.span(), "raw_files = true needs files_dir");
                false
            }
            r => r.as_ref().is_some_and(|r| *r.get_ref()),
        };
        let raw_files_max_bytes = match &raw.raw_files_max_bytes {
            Some(m) if !raw_files => {
                p.push(
                    m.span(),
                    "raw_files_max_bytes is used only with raw_files = true",
                );
                0
            }
            Some(m) => int_in_range(
                m,
                "raw_files_max_bytes",
                1 << 16,
                RAW_FILES_MAX_BYTES_LIMIT,
                p,
            ),
            None => DEFAULT_RAW_FILES_MAX_BYTES,
        };
        let max_users = raw.max_users.as_ref().map_or(100_000, |v| {
            int_in_range(v, "max_users", 1, 10_000_000, p) as usize
        });
        let provision = raw.provision.map(|pr| {
            let dir = resolve(base, pr.dir.get_ref());
            if !dir.is_dir() {
                p.push(
                    pr.dir.span(),
                    format!(
                        "provision.dir `{}` is not a directory (it should hold log.access.<stream> and log.token.<stream>)",
                        dir.display()
                    ),
                );
            }
            Provision {
                dir,
                check_interval: secs(
                    pr.check_interval_secs.as_ref(),
                    "check_interval_secs",
                    30.0,
                    1.0,
                    86_400.0,
                    p,
                ),
            }
        });
        let answer_from = match (&raw.answer_requests, &raw.comparison_dir) {
            (Some(on), None) if *on.get_ref() => {
                p.push(
                    on.span(),
                    "answer_requests = true needs comparison_dir (the old client's COMP_PATH, e.g. /opt/analytics/comparison_graphs)",
                );
                None
            }
            (Some(on), Some(d)) if *on.get_ref() => {
                let dir = resolve(base, d.get_ref());
                if !dir.is_dir() {
                    p.push(
                        d.span(),
                        format!(
                            "comparison_dir `{}` is not a directory (it should hold the comparison graphs, <exp>-<course>-<task>.csv)",
                            dir.display()
                        ),
                    );
                }
                Some(dir)
            }
            (_, Some(d)) => {
                p.push(
                    d.span(),
                    "comparison_dir is used only with answer_requests = true",
                );
                None
            }
            _ => None,
        };
        (p.list().len() == before).then_some(Config {
            host,
            port,
            streams,
            reconnect_initial,
            reconnect_max,
            ping_interval,
            stall_after,
            max_frame_bytes,
            window: Duration::from_secs(window),
            events: raw.events.unwrap_or(true),
            files_dir,
            dump_interval,
            raw_files,
            raw_files_max_bytes,
            max_users,
            provision,
            answer_from,
        })
    }

    /// `http://host:port`, for the session host's HTTP API.
    pub fn api_base(&self) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}", self.host, self.port)
        } else {
            format!("http://{}:{}", self.host, self.port)
        }
    }
}

/// `http://host:port` (or `ws://`) to `(host, port)`. The session host
/// speaks plain HTTP and websockets on the machine it runs on; TLS would
/// mean it is remote, which is not how it is deployed.
pub fn parse_session_host(s: &str) -> Result<(String, u16), String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("ws://"))
        .ok_or_else(|| {
            if s.starts_with("https://") || s.starts_with("wss://") {
                format!("session_host `{s}`: TLS is not supported; the session host serves plain http on its own machine (e.g. http://127.0.0.1:8888)")
            } else {
                format!("session_host `{s}` must look like http://127.0.0.1:8888")
            }
        })?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('@') || rest.contains('?') {
        return Err(format!(
            "session_host `{s}` must be only scheme, host and port, e.g. http://127.0.0.1:8888"
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, tail) = v6
            .split_once(']')
            .ok_or_else(|| format!("session_host `{s}`: unclosed `[`"))?;
        (h, tail.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(format!("session_host `{s}` has no host"));
    }
    let port = match port {
        None => 8888,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("session_host `{s}`: `{p}` is not a port"))?,
    };
    Ok((host.to_owned(), port))
}

/// Stream names as the session host takes them: `[a-zA-Z0-9-/]+` (we also
/// refuse `/`, because the name is part of our file and metric names).
fn valid_stream(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `"spin30..41"` to spin30 … spin41, zero-padded as the first number is
/// written (`"pend00..37"` gives pend00 … pend37); a plain name to itself.
pub fn expand_stream(spec: &str) -> Result<Vec<String>, String> {
    let Some((left, end)) = spec.split_once("..") else {
        return if valid_stream(spec) {
            Ok(vec![spec.to_owned()])
        } else {
            Err(format!(
                "stream `{spec}` must be letters, digits and `-` (at most 64), or a range like spin30..41"
            ))
        };
    };
    let digits = left.len() - left.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (prefix, start) = left.split_at(left.len() - digits);
    let bad = || {
        format!(
            "stream range `{spec}` must look like spin30..41 (a name ending in a number, `..`, the last number)"
        )
    };
    if digits == 0
        || end.is_empty()
        || !end.bytes().all(|b| b.is_ascii_digit())
        || digits > 9
        || end.len() > 9
    {
        return Err(bad());
    }
    let (a, b): (u64, u64) = (
        start.parse().map_err(|_| bad())?,
        end.parse().map_err(|_| bad())?,
    );
    if a > b {
        return Err(format!("stream range `{spec}` runs backwards ({a} > {b})"));
    }
    if b - a >= MAX_STREAMS as u64 {
        return Err(format!(
            "stream range `{spec}` has {} names; at most {MAX_STREAMS} are allowed",
            b - a + 1
        ));
    }
    let names: Vec<String> = (a..=b).map(|n| format!("{prefix}{n:0digits$}")).collect();
    if let Some(n) = names.iter().find(|n| !valid_stream(n)) {
        return Err(format!(
            "stream `{n}` (from `{spec}`) must be letters, digits and `-`"
        ));
    }
    Ok(names)
}
