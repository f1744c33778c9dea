//! The query language of `/v1/series`, `/v1/events`, `/v1/rollups` and
//! `edgemeter report`, with no IO: time ranges as the old aggregation jobs
//! named them (`TODAY`, `1D`, `7D`, `10D`, `30D`) or ISO-8601 `start`/`end`,
//! and the three output formats (JSON, CSV, TSV).

use std::collections::BTreeSet;

use crate::clock::{iso8601, parse_iso8601};
use crate::record::Dims;
use crate::upstream::store::{EventQuery, How, RollupRow, SeriesQuery, SeriesRow};

const DAY_MS: i64 = 86_400_000;
/// The longest range one query may span.
pub const MAX_RANGE_DAYS: i64 = 400;
pub const MAX_ROWS: usize = 100_000;
pub const DEFAULT_EVENTS: usize = 1_000;
pub const MAX_EVENTS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Tsv,
}

impl Format {
    pub fn parse(s: &str) -> Result<Format, String> {
        match s.to_ascii_lowercase().as_str() {
            "json" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            "tsv" => Ok(Format::Tsv),
            _ => Err(format!("format `{s}` must be json, csv or tsv")),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Tsv => "text/tab-separated-values; charset=utf-8",
        }
    }
}

/// `[start, end)` in ms from `range` or `start`/`end`, at `now_ms`.
pub fn time_range(
    range: Option<&str>,
    start: Option<&str>,
    end: Option<&str>,
    now_ms: i64,
) -> Result<(i64, i64), String> {
    let (s, e) = match (range, start, end) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err("give either range or start/end, not both".into());
        }
        (Some(r), None, None) => {
            let r = r.to_ascii_uppercase();
            if r == "TODAY" {
                (now_ms - now_ms.rem_euclid(DAY_MS), now_ms + 1)
            } else {
                let days: i64 = r
                    .strip_suffix('D')
                    .and_then(|n| n.parse().ok())
                    .filter(|n| (1..=MAX_RANGE_DAYS).contains(n))
                    .ok_or_else(|| {
                        format!("range `{r}` must be TODAY or 1D to {MAX_RANGE_DAYS}D (e.g. 1D, 7D, 10D, 30D)")
                    })?;
                (now_ms - days * DAY_MS, now_ms + 1)
            }
        }
        (None, None, None) => (now_ms - DAY_MS, now_ms + 1),
        (None, s, e) => {
            let parse = |what: &str, v: &str| {
                parse_iso8601(v).ok_or_else(|| {
                    format!(
                        "{what} `{v}` is not ISO-8601 (e.g. 2026-11-20 or 2026-11-20T06:00:00Z)"
                    )
                })
            };
            let start = s.map(|v| parse("start", v)).transpose()?;
            let end = e
                .map(|v| parse("end", v))
                .transpose()?
                .unwrap_or(now_ms + 1);
            (start.unwrap_or(end - DAY_MS), end)
        }
    };
    if e <= s {
        return Err("end must be after start".into());
    }
    if e - s > MAX_RANGE_DAYS * DAY_MS + 1 {
        return Err(format!("a query spans at most {MAX_RANGE_DAYS} days"));
    }
    Ok((s, e))
}

/// Parameters shared by the HTTP query string and `edgemeter report`.
#[derive(Debug, Default)]
pub struct Params {
    pub metric: Option<String>,
    pub range: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub format: Option<String>,
    pub agent: Option<String>,
    pub user: Option<String>,
    pub etype: Option<String>,
    pub limit: Option<String>,
    pub dims: Vec<(String, String)>,
}

impl Params {
    /// From `key=value` pairs; unknown keys are an error (a typo must not
    /// silently widen or empty a query). `dim.<key>=<value>` filters on a
    /// dimension.
    pub fn from_pairs(pairs: Vec<(String, String)>) -> Result<Params, String> {
        let mut p = Params::default();
        for (k, v) in pairs {
            let slot = match k.as_str() {
                "metric" => &mut p.metric,
                "range" => &mut p.range,
                "start" => &mut p.start,
                "end" => &mut p.end,
                "format" => &mut p.format,
                "agent" => &mut p.agent,
                "user" => &mut p.user,
                "type" => &mut p.etype,
                "limit" => &mut p.limit,
                _ => match k.strip_prefix("dim.") {
                    Some(d) if !d.is_empty() => {
                        p.dims.push((d.to_owned(), v));
                        continue;
                    }
                    _ => {
                        return Err(format!(
                            "unknown parameter `{k}`; known: metric, range, start, end, format, agent, user, type, limit, dim.<name>"
                        ));
                    }
                },
            };
            *slot = Some(v);
        }
        Ok(p)
    }

    pub fn format(&self) -> Result<Format, String> {
        self.format
            .as_deref()
            .map_or(Ok(Format::Json), Format::parse)
    }

    fn range(&self, now_ms: i64) -> Result<(i64, i64), String> {
        time_range(
            self.range.as_deref(),
            self.start.as_deref(),
            self.end.as_deref(),
            now_ms,
        )
    }

    fn limit(&self, default: usize, max: usize) -> Result<usize, String> {
        match &self.limit {
            None => Ok(default),
            Some(l) => l
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| format!("limit `{l}` must be 1 to {max}")),
        }
    }

    pub fn series(&self, now_ms: i64) -> Result<SeriesQuery, String> {
        let metric = self
            .metric
            .clone()
            .filter(|m| !m.is_empty())
            .ok_or("metric is required (e.g. metric=active_users)")?;
        let (start_ms, end_ms) = self.range(now_ms)?;
        Ok(SeriesQuery {
            metric,
            start_ms,
            end_ms,
            agent: self.agent.clone(),
            dims: self.dims.clone(),
            limit: self.limit(MAX_ROWS, MAX_ROWS)?,
        })
    }

    pub fn events(&self, now_ms: i64) -> Result<EventQuery, String> {
        let (start_ms, end_ms) = self.range(now_ms)?;
        Ok(EventQuery {
            start_ms,
            end_ms,
            user: self.user.clone(),
            etype: self.etype.clone(),
            agent: self.agent.clone(),
            limit: self.limit(DEFAULT_EVENTS, MAX_EVENTS)?,
        })
    }

    /// The first and last UTC day (`YYYY-MM-DD`) the range touches.
    pub fn days(&self, now_ms: i64) -> Result<(String, String), String> {
        let (s, e) = self.range(now_ms)?;
        Ok((crate::clock::day(s), crate::clock::day(e - 1)))
    }
}

/// A table: a header and rows of cells, rendered as CSV or TSV.
fn table(format: Format, header: &[String], rows: &[Vec<String>]) -> String {
    let cell = |s: &str| match format {
        Format::Tsv => s.replace(['\t', '\n', '\r'], " "),
        _ if s.contains([',', '"', '\n', '\r']) => format!("\"{}\"", s.replace('"', "\"\"")),
        _ => s.to_owned(),
    };
    let sep = if format == Format::Tsv { "\t" } else { "," };
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        let cells: Vec<String> = row.iter().map(|c| cell(c)).collect();
        out.push_str(&cells.join(sep));
        out.push('\n');
    }
    out
}

/// A number as people read it: `12`, not `12.0`; `0.333` as is.
pub fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn dims_json(d: &Dims) -> serde_json::Value {
    serde_json::Value::Object(
        d.pairs()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect(),
    )
}

/// Rows as a CSV/TSV table: `lead` columns, one column per dimension name
/// any row has, then `tail` columns.
fn dims_table<R>(
    format: Format,
    rows: &[R],
    lead: &[&str],
    tail: &[&str],
    cells: impl Fn(&R) -> (Vec<String>, &Dims, Vec<String>),
) -> String {
    let keys: BTreeSet<String> = rows
        .iter()
        .flat_map(|r| {
            cells(r)
                .1
                .pairs()
                .iter()
                .map(|(k, _)| k.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut header: Vec<String> = lead.iter().map(|s| s.to_string()).collect();
    header.extend(keys.iter().cloned());
    header.extend(tail.iter().map(|s| s.to_string()));
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let (mut row, dims, after) = cells(r);
            row.extend(keys.iter().map(|k| {
                dims.pairs()
                    .iter()
                    .find(|(dk, _)| dk == k)
                    .map_or(String::new(), |(_, v)| v.clone())
            }));
            row.extend(after);
            row
        })
        .collect();
    table(format, &header, &body)
}

pub fn render_series(q: &SeriesQuery, rows: &[SeriesRow], format: Format) -> String {
    let agent_of = |r: &SeriesRow| match &r.how {
        How::Agent(a) => Some(a.clone()),
        _ => None,
    };
    if format == Format::Json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let mut o = serde_json::json!({
                    "time": iso8601(r.ts), "ts": r.ts, "dims": dims_json(&r.dims), "value": r.value,
                    "unit": r.unit, "agents": r.agents, "how": r.how.as_str(),
                });
                if let Some(a) = agent_of(r) {
                    o["agent"] = a.into();
                }
                o
            })
            .collect();
        let scope = if q.agent.is_some() {
            "agent"
        } else {
            "network"
        };
        let doc = serde_json::json!({
            "metric": q.metric, "scope": scope,
            "start": iso8601(q.start_ms), "end": iso8601(q.end_ms), "rows": rows,
        });
        return doc.to_string() + "\n";
    }
    dims_table(
        format,
        rows,
        &["time", "agent"],
        &["value", "unit", "agents", "how"],
        |r| {
            (
                vec![iso8601(r.ts), agent_of(r).unwrap_or_default()],
                &r.dims,
                vec![
                    number(r.value),
                    r.unit.clone(),
                    r.agents.to_string(),
                    r.how.as_str().to_owned(),
                ],
            )
        },
    )
}

pub fn render_rollups(rows: &[RollupRow], format: Format) -> String {
    if format == Format::Json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "day": r.day, "metric": r.metric, "dims": dims_json(&r.dims), "how": r.how,
                    "value": r.value, "samples": r.samples, "agents": r.agents,
                })
            })
            .collect();
        return serde_json::json!({ "rollups": rows }).to_string() + "\n";
    }
    dims_table(
        format,
        rows,
        &["day", "metric"],
        &["how", "value", "samples", "agents"],
        |r| {
            (
                vec![r.day.clone(), r.metric.clone()],
                &r.dims,
                vec![
                    r.how.clone(),
                    number(r.value),
                    r.samples.to_string(),
                    r.agents.to_string(),
                ],
            )
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_996_800_000 + 6 * 3_600_000; // 2026-11-30T06:00Z

    #[test]
    fn ranges() {
        let check =
            |r: Option<&str>, s: Option<&str>, e: Option<&str>, want: Result<(i64, i64), &str>| {
                let got = time_range(r, s, e, NOW);
                match want {
                    Ok(w) => assert_eq!(got, Ok(w), "{r:?} {s:?} {e:?}"),
                    Err(m) => assert!(
                        got.as_ref().is_err_and(|g| g.contains(m)),
                        "{got:?} lacks {m}"
                    ),
                }
            };
        let day = 86_400_000;
        check(
            Some("TODAY"),
            None,
            None,
            Ok((NOW - 6 * 3_600_000, NOW + 1)),
        );
        check(
            Some("today"),
            None,
            None,
            Ok((NOW - 6 * 3_600_000, NOW + 1)),
        );
        check(Some("7D"), None, None, Ok((NOW - 7 * day, NOW + 1)));
        check(Some("30D"), None, None, Ok((NOW - 30 * day, NOW + 1)));
        check(None, None, None, Ok((NOW - day, NOW + 1)));
        check(
            None,
            Some("2026-11-20"),
            Some("2026-11-21"),
            Ok((1_795_132_800_000, 1_795_219_200_000)),
        );
        check(Some("0D"), None, None, Err("range `0D`"));
        check(Some("1W"), None, None, Err("must be TODAY"));
        check(Some("7D"), Some("2026-11-20"), None, Err("not both"));
        check(
            None,
            Some("2026-11-21"),
            Some("2026-11-20"),
            Err("after start"),
        );
        check(None, Some("last week"), None, Err("not ISO-8601"));
        check(
            None,
            Some("2020-01-01"),
            Some("2026-01-01"),
            Err("at most 400 days"),
        );
    }

    #[test]
    fn unknown_parameters_are_refused_and_dims_filter() {
        let pairs = |s: &[(&str, &str)]| {
            s.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let p = Params::from_pairs(pairs(&[("metric", "m"), ("dim.window", "30m")])).expect("ok");
        assert_eq!(p.dims, vec![("window".to_owned(), "30m".to_owned())]);
        let e = Params::from_pairs(pairs(&[("metrc", "m")])).expect_err("typo");
        assert!(e.contains("unknown parameter `metrc`"), "{e}");
        let p = Params::from_pairs(pairs(&[("limit", "0")])).expect("parsed");
        assert!(p.events(NOW).is_err());
        assert!(
            Params::default()
                .series(NOW)
                .expect_err("no metric")
                .contains("metric is required")
        );
    }

    #[test]
    fn series_render_as_csv_tsv_and_json() {
        let q = SeriesQuery {
            metric: "active_users".into(),
            start_ms: 0,
            end_ms: 1000,
            agent: None,
            dims: vec![],
            limit: 10,
        };
        let rows = vec![
            SeriesRow {
                ts: 0,
                dims: Dims::new([("window", "30m"), ("note", "a,\"b\"")]),
                value: 42.0,
                unit: "Count".into(),
                agents: 3,
                how: How::Union,
            },
            SeriesRow {
                ts: 0,
                dims: Dims::new([("window", "6h")]),
                value: 1.5,
                unit: "Count".into(),
                agents: 1,
                how: How::Sum,
            },
        ];
        assert_eq!(
            render_series(&q, &rows, Format::Csv),
            "time,agent,note,window,value,unit,agents,how\n\
             1970-01-01T00:00:00.000Z,,\"a,\"\"b\"\"\",30m,42,Count,3,union\n\
             1970-01-01T00:00:00.000Z,,,6h,1.5,Count,1,sum\n"
        );
        assert!(
            render_series(&q, &rows, Format::Tsv).starts_with("time\tagent\tnote\twindow\tvalue")
        );
        let json: serde_json::Value =
            serde_json::from_str(&render_series(&q, &rows, Format::Json)).expect("json");
        assert_eq!(json["rows"][0]["value"], 42.0);
        assert_eq!(json["rows"][0]["how"], "union");
        assert_eq!(json["scope"], "network");
    }
}
