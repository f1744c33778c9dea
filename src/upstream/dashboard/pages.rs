//! The dashboard's pages: each gathers its data in one call on the store's
//! thread, then renders HTML here on the event loop.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::clock::{PEER_CLOCK_OFF_MS, human_duration, iso8601, off_by, shared_offset};
use crate::http_server::{Response, query_pairs};
use crate::record::Dims;
use crate::runtime::OnWorker;
use crate::sources::AGENT_HEALTH_METRICS;
use crate::upstream::query::{self, MAX_ROWS, number};
use crate::upstream::store::{
    AgentHealth, EdgeRow, EdgeSummary, EventQuery, EventRow, Health, SeriesQuery, SeriesRow, Store,
    UsageRow, UserRow,
};

use super::chart::{Chart, Line};
use super::html::{escape, page};

/// The ranges offered as links (the query API's names).
pub const RANGES: &[&str] = &["TODAY", "1D", "7D", "10D", "30D"];
/// Edges drawn as their own line; the others are in the table only.
pub const EDGE_LINES: usize = 8;
/// How far back the page looks for the metrics it offers.
const OFFER_SINCE_MS: i64 = 30 * 86_400_000;
/// User × stream cells read for the heat map (the busiest first).
const USAGE_ROWS: usize = 20_000;
/// Users drawn in the heat map (the busiest).
pub const HEAT_USERS: usize = 40;
/// Users listed on the command graphs page (the latest first).
pub const GRAPH_USERS: usize = 500;
/// An edge with no batch for this long is flagged stale.
pub const STALE_AFTER_MS: i64 = 10 * 60_000;

fn error_page(status: u16, here: &str, why: &str) -> Response {
    super::html(
        status,
        page(
            "Error",
            here,
            true,
            &format!(r#"<p class="error">{}</p>"#, escape(why)),
        ),
    )
}

/// What the active-users page was asked: the API's own parameters.
#[derive(Debug, Clone, Default)]
struct Ask {
    metric: Option<String>,
    dims: Vec<(String, String)>,
    range: Option<String>,
    start: Option<String>,
    end: Option<String>,
    table: bool,
}

impl Ask {
    fn parse(query: &str) -> Result<Ask, String> {
        let mut a = Ask::default();
        for (k, v) in query_pairs(query) {
            let v = Some(v).filter(|v| !v.is_empty());
            match k.as_str() {
                "metric" => a.metric = v,
                "range" => a.range = v,
                "start" => a.start = v,
                "end" => a.end = v,
                "view" => a.table = v.as_deref() == Some("table"),
                _ => match (k.strip_prefix("dim."), v) {
                    (Some(d), Some(v)) if !d.is_empty() => a.dims.push((d.to_owned(), v)),
                    (Some(_), None) => {}
                    _ => return Err(format!("unknown parameter `{k}`")),
                },
            }
        }
        if a.range.is_some() && (a.start.is_some() || a.end.is_some()) {
            a.range = None;
        }
        Ok(a)
    }

    /// The question and its `[start, end)`: the API's ranges, 1D unless
    /// told.
    fn with_range(query_text: &str, now: i64) -> Result<(Ask, i64, i64), String> {
        let ask = Ask::parse(query_text)?;
        let default = (ask.start.is_none() && ask.end.is_none()).then_some("1D");
        let (start, end) = query::time_range(
            ask.range.as_deref().or(default),
            ask.start.as_deref(),
            ask.end.as_deref(),
            now,
        )?;
        Ok((ask, start, end))
    }

    /// The query string of the same series, with `extra` pairs.
    fn link(
        &self,
        metric: &str,
        dims: &[(String, String)],
        range: Option<&str>,
        extra: &[(&str, &str)],
    ) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        q.append_pair("metric", metric);
        for (k, v) in dims {
            q.append_pair(&format!("dim.{k}"), v);
        }
        match range {
            Some(r) => {
                q.append_pair("range", r);
            }
            None => {
                if let Some(s) = &self.start {
                    q.append_pair("start", s);
                }
                if let Some(e) = &self.end {
                    q.append_pair("end", e);
                }
                if let (None, None, Some(r)) = (&self.start, &self.end, &self.range) {
                    q.append_pair("range", r);
                }
            }
        }
        for (k, v) in extra {
            q.append_pair(k, v);
        }
        q.finish()
    }
}

/// Said where a range reaches back past `retention_days`, so that the
/// windows there read as deleted, not as missing.
fn retention_note(deleted_before: Option<i64>, start: i64) -> String {
    match deleted_before {
        Some(line) if start < line => format!(
            r#"<p class="note">Windows before {} are deleted (<code>retention_days</code>); each day's totals stay in <code>/v1/rollups</code>.</p>"#,
            crate::clock::day(line)
        ),
        _ => String::new(),
    }
}

/// What the store gives the active-users page.
struct Active {
    /// The series shown: asked for, or the default one.
    metric: String,
    dims: Vec<(String, String)>,
    offered: Vec<(String, Dims)>,
    network: Vec<SeriesRow>,
    /// (net, ts) → the sum of the edges' own estimates.
    sums: BTreeMap<(String, i64), f64>,
    /// Every edge's figures over the range.
    summaries: Vec<EdgeSummary>,
    /// The drawn edges' values: agent → (ts, net, value).
    drawn: BTreeMap<String, Vec<(i64, Dims, f64)>>,
    /// Raw data before this is deleted (`retention_days`).
    deleted_before: Option<i64>,
}

fn dims_label(d: &Dims) -> String {
    d.pairs()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One edge's line: its rows in time order.
struct EdgeLine {
    name: String,
    /// Drawn edges only.
    points: Vec<(i64, f64)>,
    peak: f64,
    windows: i64,
    last: (i64, f64),
}

pub async fn active_users(store: &OnWorker<Store>, query_text: &str, now: i64) -> Response {
    let (ask, start, end) = match Ask::with_range(query_text, now) {
        Ok(a) => a,
        Err(e) => return error_page(400, "/", &e),
    };
    let wanted = ask.clone();
    let data = store
        .call(move |s| -> Result<Active, crate::upstream::db::DbError> {
            let offered = s.sketch_nets(now - OFFER_SINCE_MS)?;
            // Unless asked, the first distinct count: xx's `active_users`
            // if there is one.
            let (metric, dims) = match &wanted.metric {
                Some(m) => (m.clone(), wanted.dims.clone()),
                None => match offered
                    .iter()
                    .find(|(m, _)| m == crate::sources::xx_gateway::METRIC)
                    .or(offered.first())
                {
                    Some((m, net)) => (m.clone(), net.pairs().to_vec()),
                    None => {
                        return Ok(Active {
                            metric: String::new(),
                            dims: Vec::new(),
                            offered,
                            network: Vec::new(),
                            sums: BTreeMap::new(),
                            summaries: Vec::new(),
                            drawn: BTreeMap::new(),
                            deleted_before: s.deleted_before(now),
                        });
                    }
                },
            };
            let q = SeriesQuery {
                metric: metric.clone(),
                start_ms: start,
                end_ms: end,
                agent: None,
                dims: dims.clone(),
                limit: MAX_ROWS,
            };
            let keep = |d: &Dims| {
                dims.iter()
                    .all(|(k, v)| d.pairs().iter().any(|(dk, dv)| dk == k && dv == v))
            };
            let network = s.series(&q)?;
            let sums = s
                .naive_sums(&metric, start, end)?
                .into_iter()
                .filter(|((net, _), _)| keep(&Dims::decode(net).unwrap_or_default()))
                .collect();
            let mut summaries = s.edge_summaries(&metric, start, end)?;
            summaries.retain(|e| keep(&e.net));
            // The edges drawn as lines: the highest peaks (ties by name).
            let mut peaks: BTreeMap<&str, f64> = BTreeMap::new();
            for e in &summaries {
                let p = peaks.entry(e.agent.as_str()).or_insert(e.peak);
                *p = p.max(e.peak);
            }
            let mut ranked: Vec<(&str, f64)> = peaks.into_iter().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
            let mut drawn = BTreeMap::new();
            for (agent, _) in ranked.into_iter().take(EDGE_LINES) {
                let mut v = s.edge_estimates(&metric, agent, start, end)?;
                v.retain(|(_, net, _)| keep(net));
                drawn.insert(agent.to_owned(), v);
            }
            Ok(Active {
                metric,
                dims,
                offered,
                network,
                sums,
                summaries,
                drawn,
                deleted_before: s.deleted_before(now),
            })
        })
        .await;
    let data = match data {
        Ok(d) => d,
        Err(e) => {
            log::error!("the dashboard's query failed: {e}");
            return error_page(503, "/", "the store is unavailable; try again shortly");
        }
    };
    super::html(200, render_active(&ask, start, end, &data))
}

fn render_active(ask: &Ask, start: i64, end: i64, d: &Active) -> String {
    let (metric, dims) = (d.metric.clone(), d.dims.clone());
    let mut body = String::from("<h1>Active users</h1>");
    if d.offered.is_empty() && ask.metric.is_none() {
        body += r#"<p class="note">No distinct counts in the last 30 days yet: once edges post
`active_users` (xx_gateway) or `relay_active_users` (relay), they appear here.</p>"#;
        return page("Active users", "/", true, &body);
    }
    // What to show: each offered metric and window, as links.
    body += r#"<div class="controls"><div class="ranges">"#;
    for (m, net) in &d.offered {
        let here = *m == metric && net.pairs() == dims.as_slice();
        let _ = write!(
            body,
            r#"<a href="/?{}"{}>{} {}</a> "#,
            escape(&ask.link(m, net.pairs(), None, &[])),
            if here { r#" class="here""# } else { "" },
            escape(m),
            escape(&dims_label(net))
        );
    }
    body += "</div></div>";
    // Ranges, and a custom one.
    body += r#"<div class="controls"><div class="ranges">"#;
    let custom = ask.start.is_some() || ask.end.is_some();
    for r in RANGES {
        let here = !custom && ask.range.as_deref().unwrap_or("1D").eq_ignore_ascii_case(r);
        let _ = write!(
            body,
            r#"<a href="/?{}"{}>{r}</a> "#,
            escape(&ask.link(&metric, &dims, Some(r), &[])),
            if here { r#" class="here""# } else { "" }
        );
    }
    body += r#"</div><form method="get" action="/">"#;
    let _ = write!(
        body,
        r#"<input type="hidden" name="metric" value="{}">"#,
        escape(&metric)
    );
    for (k, v) in &dims {
        let _ = write!(
            body,
            r#"<input type="hidden" name="dim.{}" value="{}">"#,
            escape(k),
            escape(v)
        );
    }
    let _ = write!(
        body,
        r#"<label>from <input type="date" name="start" value="{}"></label> <label>to <input type="date" name="end" value="{}"></label> <button>Show</button></form></div>"#,
        &iso8601(start)[..10],
        &iso8601(end - 1)[..10]
    );
    body += &retention_note(d.deleted_before, start);

    // The lines: network-wide per net, the naive sum of edges, each edge.
    let multi_net = d
        .network
        .iter()
        .map(|r| r.dims.encode())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        > 1;
    let edge_name = |agent: &str, net: &Dims| {
        if multi_net {
            format!("{agent} {}", dims_label(net))
        } else {
            agent.to_owned()
        }
    };
    let mut by_edge: BTreeMap<String, EdgeLine> = BTreeMap::new();
    for e in &d.summaries {
        let name = edge_name(&e.agent, &e.net);
        let line = by_edge.entry(name.clone()).or_insert(EdgeLine {
            name,
            points: Vec::new(),
            peak: e.peak,
            windows: 0,
            last: (e.last_ts, e.last_value),
        });
        line.peak = line.peak.max(e.peak);
        line.windows += e.windows;
        if e.last_ts >= line.last.0 {
            line.last = (e.last_ts, e.last_value);
        }
    }
    for (agent, values) in &d.drawn {
        for (ts, net, v) in values {
            if let Some(line) = by_edge.get_mut(&edge_name(agent, net)) {
                line.points.push((*ts, *v));
            }
        }
    }
    let sums = &d.sums;
    let mut lines = Vec::new();
    let mut nets: BTreeMap<String, (Vec<(i64, f64)>, String)> = BTreeMap::new();
    for r in &d.network {
        let key = r.dims.encode();
        let label = dims_label(&r.dims);
        nets.entry(key)
            .or_insert_with(|| (Vec::new(), label))
            .0
            .push((r.ts, r.value));
    }
    for (key, (points, label)) in &nets {
        let suffix = if multi_net {
            format!(" {label}")
        } else {
            String::new()
        };
        let sum: Vec<(i64, f64)> = sums
            .range((key.clone(), i64::MIN)..=(key.clone(), i64::MAX))
            .map(|((_, ts), v)| (*ts, *v))
            .collect();
        lines.push(Line {
            name: format!("sum of edges{suffix}"),
            class: "sum",
            points: sum,
        });
        lines.push(Line {
            name: format!("network{suffix}"),
            class: "net",
            points: points.clone(),
        });
    }
    let mut ranked: Vec<&EdgeLine> = by_edge.values().collect();
    ranked.sort_by(|a, b| b.peak.total_cmp(&a.peak).then(a.name.cmp(&b.name)));
    const CLASSES: [&str; EDGE_LINES] = ["e0", "e1", "e2", "e3", "e4", "e5", "e6", "e7"];
    for (e, class) in ranked.iter().filter(|e| !e.points.is_empty()).zip(CLASSES) {
        lines.insert(
            0,
            Line {
                name: format!("edge {}", e.name),
                class,
                points: e.points.clone(),
            },
        );
    }
    let title = format!("{metric} {}", dims_label(&Dims::new(dims.clone())));
    let _ = write!(
        body,
        "<h2>{}, {} to {} UTC</h2>",
        escape(&title),
        minute(start),
        minute(end)
    );
    if d.network.is_empty() {
        body += r#"<p class="note">No values in this range.</p>"#;
    }
    body += r#"<div class="legend">"#;
    for l in lines.iter().rev() {
        let _ = write!(
            body,
            r#"<span class="{}">{}</span>"#,
            l.class,
            escape(&l.name)
        );
    }
    body += "</div>";
    let csv = ask.link(&metric, &dims, None, &[("format", "csv")]);
    let csv_edges = ask.link(&metric, &dims, None, &[("format", "csv"), ("agent", "*")]);
    if ask.table {
        body += &values_table(&nets, sums, multi_net);
    } else {
        body += &Chart {
            title: &title,
            start_ms: start,
            end_ms: end,
            lines,
        }
        .svg();
    }
    let _ = write!(
        body,
        r#"<p class="note noprint">The network line is the union of the edges' sketches: a user two edges saw counts once, so it is at most the dashed sum.
{} · CSV: <a href="/v1/series?{}">network</a>, <a href="/v1/series?{}">each edge</a></p>"#,
        if ask.table {
            format!(
                r#"<a href="/?{}">chart</a>"#,
                escape(&ask.link(&metric, &dims, None, &[]))
            )
        } else {
            format!(
                r#"<a href="/?{}">exact values</a>"#,
                escape(&ask.link(&metric, &dims, None, &[("view", "table")]))
            )
        },
        escape(&csv),
        escape(&csv_edges)
    );
    // Every edge, drawn or not.
    let _ = write!(
        body,
        r#"<h2>Edges ({})</h2><table><tr><th>edge</th><th class="n">peak</th><th class="n">latest</th><th>latest at</th><th class="n">values</th></tr>"#,
        ranked.len()
    );
    for e in &ranked {
        let (t, v) = e.last;
        let _ = write!(
            body,
            r#"<tr><td>{}</td><td class="n">{}</td><td class="n">{}</td><td>{}</td><td class="n">{}</td></tr>"#,
            escape(&e.name),
            number(e.peak),
            number(v),
            iso8601(t),
            e.windows
        );
    }
    body += "</table>";
    page("Active users", "/", true, &body)
}

/// `2026-12-02 23:24`: a range's ends as people read them.
fn minute(ms: i64) -> String {
    iso8601(ms)[..16].replace('T', " ")
}

type Nets = BTreeMap<String, (Vec<(i64, f64)>, String)>;

fn values_table(nets: &Nets, sums: &BTreeMap<(String, i64), f64>, multi_net: bool) -> String {
    let mut out = String::from(
        r#"<table class="values"><tr><th>window end</th><th class="n">network</th><th class="n">sum of edges</th></tr>"#,
    );
    for (key, (points, label)) in nets {
        if multi_net {
            let _ = write!(out, r#"<tr><th colspan="3">{}</th></tr>"#, escape(label));
        }
        for (ts, v) in points {
            let sum = sums.get(&(key.clone(), *ts)).copied();
            let _ = write!(
                out,
                r#"<tr><td>{}</td><td class="n">{}</td><td class="n">{}</td></tr>"#,
                iso8601(*ts),
                number(*v),
                sum.map_or_else(|| "–".to_owned(), number)
            );
        }
    }
    out + "</table>"
}

/// What the store gives the relay page: per metric, the network rows.
struct Relay {
    messages: Vec<SeriesRow>,
    users: Vec<SeriesRow>,
    connected: Vec<SeriesRow>,
    usage: Vec<UsageRow>,
    /// Raw data before this is deleted (`retention_days`).
    deleted_before: Option<i64>,
}

/// The relay's streams: messages and distinct users per window, by stream
/// (the network value: summed, or the union of the edges' sketches).
pub async fn relay(store: &OnWorker<Store>, query_text: &str, now: i64) -> Response {
    let (ask, start, end) = match Ask::with_range(query_text, now) {
        Ok(a) => a,
        Err(e) => return error_page(400, "/relay", &e),
    };
    let data = store
        .call(move |s| -> Result<Relay, crate::upstream::db::DbError> {
            let q = |metric: &str| SeriesQuery {
                metric: metric.to_owned(),
                start_ms: start,
                end_ms: end,
                agent: None,
                dims: Vec::new(),
                limit: MAX_ROWS,
            };
            Ok(Relay {
                messages: s.series(&q("relay_messages"))?,
                users: s.series(&q("relay_active_users"))?,
                connected: s.series(&q("relay_connected"))?,
                usage: s.usage(start, end, USAGE_ROWS)?,
                deleted_before: s.deleted_before(now),
            })
        })
        .await;
    match data {
        Ok(d) => super::html(200, render_relay(&ask, start, end, &d)),
        Err(e) => {
            log::error!("the dashboard's relay query failed: {e}");
            error_page(503, "/relay", "the store is unavailable; try again shortly")
        }
    }
}

/// A relay row's stream: `stream`, or `source/stream` when the upstream
/// keeps sources apart (`source` not among its `edge_dims`).
fn stream_of(d: &Dims) -> String {
    let get = |k: &str| {
        d.pairs()
            .iter()
            .find(|(dk, _)| dk == k)
            .map(|(_, v)| v.as_str())
    };
    match (get("source"), get("stream")) {
        (Some(source), Some(stream)) => format!("{source}/{stream}"),
        (None, Some(stream)) => stream.to_owned(),
        _ => "?".to_owned(),
    }
}

/// Values by stream, in time order.
type ByStream = BTreeMap<String, Vec<(i64, f64)>>;

/// One line per stream (the busiest [`EDGE_LINES`]), in time order.
fn stream_lines(rows: &[SeriesRow]) -> (Vec<Line>, ByStream) {
    let mut by = ByStream::new();
    for r in rows {
        by.entry(stream_of(&r.dims))
            .or_default()
            .push((r.ts, r.value));
    }
    let mut ranked: Vec<(&String, f64)> = by
        .iter()
        .map(|(k, v)| (k, v.iter().map(|p| p.1).sum::<f64>()))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    const CLASSES: [&str; EDGE_LINES] = ["e0", "e1", "e2", "e3", "e4", "e5", "e6", "e7"];
    let lines = ranked
        .iter()
        .zip(CLASSES)
        .map(|((name, _), class)| Line {
            name: (*name).clone(),
            class,
            points: by[*name].clone(),
        })
        .collect();
    (lines, by)
}

fn render_relay(ask: &Ask, start: i64, end: i64, d: &Relay) -> String {
    let mut body = String::from("<h1>Relay streams</h1>");
    body += r#"<div class="controls"><div class="ranges">"#;
    let custom = ask.start.is_some() || ask.end.is_some();
    for r in RANGES {
        let here = !custom && ask.range.as_deref().unwrap_or("1D").eq_ignore_ascii_case(r);
        let _ = write!(
            body,
            r#"<a href="/relay?range={r}"{}>{r}</a> "#,
            if here { r#" class="here""# } else { "" }
        );
    }
    body += "</div></div>";
    body += &retention_note(d.deleted_before, start);
    if d.messages.is_empty() && d.users.is_empty() {
        body += r#"<p class="note">No relay figures in this range: edges with a <code>relay</code> source send
`relay_messages` and `relay_active_users` per stream and window.</p>"#;
        return page("Relay", "/relay", true, &body);
    }
    let range = match (&ask.start, &ask.end) {
        (None, None) => format!("range={}", ask.range.as_deref().unwrap_or("1D")),
        _ => form_urlencoded::Serializer::new(String::new())
            .append_pair("start", ask.start.as_deref().unwrap_or(""))
            .append_pair("end", ask.end.as_deref().unwrap_or(""))
            .finish(),
    };
    for (title, metric, rows) in [
        ("Messages per window", "relay_messages", &d.messages),
        ("Distinct users per window", "relay_active_users", &d.users),
    ] {
        let (lines, _) = stream_lines(rows);
        let _ = write!(
            body,
            "<h2>{title}, {} to {} UTC</h2>",
            minute(start),
            minute(end)
        );
        body += r#"<div class="legend">"#;
        for l in &lines {
            let _ = write!(
                body,
                r#"<span class="{}">{}</span>"#,
                l.class,
                escape(&l.name)
            );
        }
        body += "</div>";
        body += &Chart {
            title,
            start_ms: start,
            end_ms: end,
            lines,
        }
        .svg();
        let _ = write!(
            body,
            r#"<p class="note noprint">CSV: <a href="/v1/series?metric={metric}&amp;{}&amp;format=csv">{metric}</a></p>"#,
            escape(&range)
        );
    }
    // Per stream: totals in the range and the last window's connection.
    let (_, messages) = stream_lines(&d.messages);
    let (_, users) = stream_lines(&d.users);
    let (_, connected) = stream_lines(&d.connected);
    let mut streams: Vec<&String> = messages.keys().chain(users.keys()).collect();
    streams.sort();
    streams.dedup();
    body += r#"<h2>Streams</h2><table><tr><th>stream</th><th class="n">messages</th><th class="n">peak users</th><th>last window</th><th>connected then</th></tr>"#;
    for s in streams {
        let total: f64 = messages.get(s).map_or(0.0, |v| v.iter().map(|p| p.1).sum());
        let peak = users
            .get(s)
            .map_or(0.0, |v| v.iter().map(|p| p.1).fold(0.0, f64::max));
        let last = connected.get(s).and_then(|v| v.last().copied());
        let _ = write!(
            body,
            r#"<tr{}><td>{}</td><td class="n">{}</td><td class="n">{}</td><td>{}</td><td>{}</td></tr>"#,
            if last.is_some_and(|(_, c)| c == 0.0) {
                r#" class="stale""#
            } else {
                ""
            },
            escape(s),
            number(total),
            number(peak),
            last.map_or_else(|| "–".to_owned(), |(t, _)| iso8601(t)),
            match last {
                Some((_, c)) if c > 0.0 => "yes",
                Some(_) => "NO",
                None => "–",
            }
        );
    }
    body += "</table>";
    body += r#"<p class="note">The stream <code>all</code> counts each user once across a source's streams.</p>"#;
    body += &heat_map(&d.usage, &range);
    page("Relay", "/relay", true, &body)
}

/// Who used which rig: messages per user (rows, the busiest
/// [`HEAT_USERS`]) and stream (columns), shaded by count, with the exact
/// count in each cell; from the relay events the edges forwarded.
fn heat_map(rows: &[UsageRow], range: &str) -> String {
    let mut out = String::from("<h2>Who used which rig: messages per user and stream</h2>");
    if rows.is_empty() {
        out += r#"<p class="note">No relay events in this range: edges keep them with <code>events = true</code> (the default) and forward them to a sink that takes events.</p>"#;
        return out;
    }
    let mut cells: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut per_user: BTreeMap<String, i64> = BTreeMap::new();
    for r in rows {
        *cells
            .entry((r.user.clone(), stream_of(&r.dims)))
            .or_default() += r.events;
        *per_user.entry(r.user.clone()).or_default() += r.events;
    }
    let mut users: Vec<(&String, &i64)> = per_user.iter().collect();
    users.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    users.truncate(HEAT_USERS);
    let mut streams: Vec<&String> = cells.keys().map(|(_, s)| s).collect();
    streams.sort();
    streams.dedup();
    let max = cells.values().copied().max().unwrap_or(1).max(1) as f64;
    out += r#"<div class="scroll"><table class="heat"><tr><th>user</th>"#;
    for st in &streams {
        let _ = write!(out, "<th>{}</th>", escape(st));
    }
    out += r#"<th class="n">total</th></tr>"#;
    for (user, total) in &users {
        let short: String = user.chars().take(13).collect();
        let _ = write!(
            out,
            r#"<tr><td title="{}"><a href="/graphs?user={}&amp;{}">{}</a></td>"#,
            escape(user),
            form_urlencoded::byte_serialize(user.as_bytes()).collect::<String>(),
            escape(range),
            escape(&short)
        );
        for st in &streams {
            match cells.get(&((*user).clone(), (*st).clone())) {
                Some(n) => {
                    // Shade by the square root, so a few heavy users do not
                    // wash out everyone else.
                    let alpha = (*n as f64 / max).sqrt() * 0.85 + 0.1;
                    let _ = write!(
                        out,
                        r#"<td class="n" style="background: rgba(43, 124, 233, {alpha:.2})" title="{} on {}: {n}">{n}</td>"#,
                        escape(user),
                        escape(st)
                    );
                }
                None => out += "<td></td>",
            }
        }
        let _ = write!(out, r#"<td class="n">{total}</td></tr>"#);
    }
    out += "</table></div>";
    let _ = write!(
        out,
        r#"<p class="note">{} of {} users, the busiest. A user's name opens their command graphs. Events: <a href="/v1/events?{}&amp;format=json">JSON</a> (at most 10,000 per request).</p>"#,
        users.len(),
        per_user.len(),
        escape(range)
    );
    out
}

/// The command graphs page: without `user`, the users with commands in
/// the range; with it, one graph per exp × course built from their
/// `analytics` events in time order, as the edge's own analytics does.
pub async fn command_graphs(store: &OnWorker<Store>, query_text: &str, now: i64) -> Response {
    let mut user = None;
    let mut rest = Vec::new();
    for (k, v) in query_pairs(query_text) {
        match k.as_str() {
            "user" if !v.is_empty() => user = Some(v),
            "user" => {}
            "range" | "start" | "end" => rest.push((k, v)),
            _ => return error_page(400, "/graphs", &format!("unknown parameter `{k}`")),
        }
    }
    let range_query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(rest.iter().filter(|(_, v)| !v.is_empty()))
        .finish();
    let (_, start, end) = match Ask::with_range(&range_query, now) {
        Ok(a) => a,
        Err(e) => return error_page(400, "/graphs", &e),
    };
    let range = if range_query.is_empty() {
        "range=30D".to_owned()
    } else {
        range_query.clone()
    };
    // The list looks back 30 days unless told.
    let (start, end) = if range_query.is_empty() {
        (end - OFFER_SINCE_MS, end)
    } else {
        (start, end)
    };
    let who = user.clone();
    let data = store
        .call(
            move |s| -> Result<(Vec<UserRow>, Vec<EventRow>), crate::upstream::db::DbError> {
                match &who {
                    None => Ok((s.command_users(start, end, GRAPH_USERS)?, Vec::new())),
                    Some(u) => Ok((
                        Vec::new(),
                        s.events(&EventQuery {
                            start_ms: start,
                            end_ms: end,
                            user: Some(u.clone()),
                            etype: Some("analytics".to_owned()),
                            agent: None,
                            limit: query::MAX_EVENTS,
                        })?,
                    )),
                }
            },
        )
        .await;
    match data {
        Ok((users, events)) => super::html(
            200,
            render_graphs(user.as_deref(), &range, start, end, &users, &events),
        ),
        Err(e) => {
            log::error!("the dashboard's command graphs query failed: {e}");
            error_page(
                503,
                "/graphs",
                "the store is unavailable; try again shortly",
            )
        }
    }
}

fn render_graphs(
    user: Option<&str>,
    range: &str,
    start: i64,
    end: i64,
    users: &[UserRow],
    events: &[EventRow],
) -> String {
    use crate::sources::relay::analytics::{Analytics, safe_name};
    use crate::sources::relay::envelope::envelope;
    let mut body = String::new();
    let Some(user) = user else {
        let _ = write!(
            body,
            "<h1>Command graphs</h1><p>Students with commands from {} to {} UTC, the latest first. Each opens their command-transition graphs.</p>",
            minute(start),
            minute(end)
        );
        if users.is_empty() {
            body += r#"<p class="note">No relay <code>analytics</code> events in this range: the edges' relay sources store them with <code>events = true</code> (the default) and forward them to a sink that takes events.</p>"#;
            return page("Command graphs", "/graphs", true, &body);
        }
        body += r#"<table><tr><th>user</th><th class="n">commands</th><th>last</th></tr>"#;
        for u in users {
            let _ = write!(
                body,
                r#"<tr><td><a href="/graphs?user={}&amp;{}">{}</a></td><td class="n">{}</td><td>{}</td></tr>"#,
                form_urlencoded::byte_serialize(u.user.as_bytes()).collect::<String>(),
                escape(range),
                escape(&u.user),
                u.events,
                iso8601(u.last_ms)
            );
        }
        body += "</table>";
        return page("Command graphs", "/graphs", true, &body);
    };
    let _ = write!(
        body,
        r#"<h1>Command graphs of <code>{}</code></h1><p>From {} to {} UTC: {} commands. <a href="/graphs?{}">All students</a></p>"#,
        escape(user),
        minute(start),
        minute(end),
        events.len(),
        escape(range)
    );
    let mut a = Analytics::new(1);
    for e in events {
        if let Some(env) = envelope(&e.payload) {
            let hw = env
                .hardware
                .as_deref()
                .filter(|h| safe_name(h))
                .unwrap_or("upstream")
                .to_owned();
            a.observe(e.ts, &hw, &env);
        }
    }
    let mut keys = a.graph_keys();
    keys.sort();
    if keys.is_empty() {
        body += r#"<p class="note">No commands of this user in this range.</p>"#;
    }
    for (n, k) in keys.iter().enumerate() {
        let Some(g) = a.graph(k) else { continue };
        let transitions: u64 = g.edges.values().sum();
        let title = format!(
            "{} in {} ({}): {transitions} transitions",
            k.user, k.exp, k.course
        );
        let _ = write!(
            body,
            "<h2>{} · {}</h2><p>{transitions} transitions between {} commands; arrows widen with the count, a loop is a command repeated.</p>",
            escape(&k.exp),
            escape(&k.course),
            g.nodes.len()
        );
        body += &crate::sources::relay::draw::command_graph_svg(&g, &k.exp, &title, n);
        body +=
            r#"<table class="compact"><tr><th>from</th><th>to</th><th class="n">count</th></tr>"#;
        for ((f, t), n) in &g.edges {
            let _ = write!(
                body,
                r#"<tr><td>{}</td><td>{}</td><td class="n">{n}</td></tr>"#,
                escape(f),
                escape(t)
            );
        }
        body += "</table>";
    }
    let _ = write!(
        body,
        r#"<p class="note noprint">Events: <a href="/v1/events?user={}&amp;type=analytics&amp;{}&amp;limit={}&amp;format=json">JSON</a>{}</p>"#,
        form_urlencoded::byte_serialize(user.as_bytes()).collect::<String>(),
        escape(range),
        query::MAX_EVENTS,
        if events.len() >= query::MAX_EVENTS {
            format!(
                " · only the first {} commands of the range are drawn; narrow the range for the rest",
                query::MAX_EVENTS
            )
        } else {
            String::new()
        }
    );
    page("Command graphs", "/graphs", true, &body)
}

/// agent → this upstream's clock less the agent's, from the `Date` of its
/// latest batch since this upstream started (ms).
pub type Clocks = BTreeMap<String, i64>;

pub async fn edges(
    store: &OnWorker<Store>,
    with_tokens: Vec<String>,
    clocks: Clocks,
    now: i64,
) -> Response {
    let since = now - HEALTH_WITHIN_MS;
    match store
        .call(move |s| -> Result<_, crate::upstream::db::DbError> {
            Ok((s.edges()?, s.agent_health(since)?))
        })
        .await
    {
        Ok((rows, health)) => super::html(
            200,
            render_edges(&rows, &health, &with_tokens, &clocks, now),
        ),
        Err(e) => {
            log::error!("the dashboard's edges query failed: {e}");
            error_page(503, "/edges", "the store is unavailable; try again shortly")
        }
    }
}

/// An edge's health points older than this are not shown (it sends them
/// every minute by default).
const HEALTH_WITHIN_MS: i64 = 15 * 60_000;

/// The health columns of one edge: buffered, oldest, dropped, pending,
/// failures; "–" for what it did not send.
fn health_cells(h: Option<&Health>) -> [String; 5] {
    let dash = || "–".to_owned();
    let Some(h) = h else {
        return [dash(), dash(), dash(), dash(), dash()];
    };
    let one = |m: &str| {
        h.iter()
            .filter(|((metric, _), _)| metric == m)
            .map(|(_, (_, v))| *v)
            .reduce(f64::max)
    };
    let summed = |m: &str| {
        let v: Vec<f64> = h
            .iter()
            .filter(|((metric, _), _)| metric == m)
            .map(|(_, (_, v))| *v)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>())
    };
    let [buffered, bytes, oldest, dropped, pending, failures] = AGENT_HEALTH_METRICS;
    [
        match (one(buffered), one(bytes)) {
            (Some(n), Some(b)) => format!("{} ({:.1} MB)", number(n), b / 1e6),
            (Some(n), None) => number(n),
            _ => dash(),
        },
        one(oldest).map_or_else(dash, |s| human_duration((s * 1000.0) as i64)),
        one(dropped).map_or_else(dash, number),
        summed(pending).map_or_else(dash, number),
        summed(failures).map_or_else(dash, number),
    ]
}

/// The clock cell of an edge: what its latest batch's `Date` said.
fn clock_cell(offset: Option<i64>) -> String {
    match offset {
        None => "–".to_owned(),
        Some(o) if o.abs() <= PEER_CLOCK_OFF_MS => "ok".to_owned(),
        Some(o) => format!("<b>{}</b>", off_by(o)),
    }
}

fn render_edges(
    rows: &[EdgeRow],
    health: &AgentHealth,
    with_tokens: &[String],
    clocks: &Clocks,
    now: i64,
) -> String {
    let never: Vec<&String> = with_tokens
        .iter()
        .filter(|a| !rows.iter().any(|r| &r.agent == *a))
        .collect();
    let stale: Vec<&EdgeRow> = rows
        .iter()
        .filter(|r| now - r.last_received_ms > STALE_AFTER_MS)
        .collect();
    let wrong_clock = |r: &EdgeRow| {
        clocks
            .get(&r.agent)
            .is_some_and(|o| o.abs() > PEER_CLOCK_OFF_MS)
    };
    let clock_off = rows.iter().filter(|r| wrong_clock(r)).count();
    let read: Vec<i64> = rows
        .iter()
        .filter_map(|r| clocks.get(&r.agent).copied())
        .collect();
    let clocks_said = match (shared_offset(&read), clock_off) {
        (Some(o), n) => format!(
            " <b>All {n} edges read this upstream's clock as {} theirs: this upstream's clock is more likely the wrong one.</b>",
            off_by(-o)
        ),
        (None, 0) => String::new(),
        (None, n) => format!(" <b>{n} with a wrong clock</b>: what they send is stamped wrong."),
    };
    let mut body = format!(
        "<h1>Edges</h1><p>{} edges have posted: {} current, <b>{} stale</b> (no batch for {}); {} with a token never posted.{}</p>",
        rows.len(),
        rows.len() - stale.len(),
        stale.len(),
        human_duration(STALE_AFTER_MS),
        never.len(),
        clocks_said
    );
    body += r#"<div class="scroll"><table class="edges"><tr><th>edge</th><th>state</th><th>last batch (UTC)</th><th class="n">ago</th><th class="n">batches</th><th class="n">records</th><th class="n">buffered</th><th class="n">oldest buffered</th><th class="n">dropped</th><th class="n">to deliver</th><th class="n">delivery failures</th><th>clock</th></tr>"#;
    // Trouble first: stale, then a wrong clock, then the rest; tokens that
    // never posted after them.
    let mut sorted: Vec<&EdgeRow> = rows.iter().collect();
    sorted.sort_by_key(|r| {
        (
            now - r.last_received_ms <= STALE_AFTER_MS,
            !wrong_clock(r),
            r.agent.clone(),
        )
    });
    for r in sorted {
        let is_stale = now - r.last_received_ms > STALE_AFTER_MS;
        let h = health_cells(health.get(&r.agent));
        let _ = write!(
            body,
            r#"<tr{}><td>{}</td><td>{}</td><td>{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td>{}</td></tr>"#,
            if is_stale || wrong_clock(r) {
                r#" class="stale""#
            } else {
                ""
            },
            escape(&r.agent),
            if is_stale { "STALE" } else { "current" },
            minute(r.last_received_ms),
            human_duration(now - r.last_received_ms),
            r.batches,
            r.records,
            h[0],
            h[1],
            h[2],
            h[3],
            h[4],
            clock_cell(clocks.get(&r.agent).copied())
        );
    }
    for a in never {
        let _ = write!(
            body,
            r#"<tr class="stale"><td>{}</td><td>never posted</td><td>–</td><td class="n">–</td><td class="n">0</td><td class="n">0</td><td class="n">–</td><td class="n">–</td><td class="n">–</td><td class="n">–</td><td class="n">–</td><td>–</td></tr>"#,
            escape(a)
        );
    }
    body += "</table></div>";
    body += r#"<p class="note">Last batch, batches and records: from the batches this upstream stored. Buffered, oldest buffered, dropped, to deliver (summed over the edge's sinks) and delivery failures (attempts so far): the edge's own health points (<code>health_interval_secs</code>, every minute by default when it forwards here), the latest of the last 15 minutes; "–" when it sent none. Clock: the edge's clock against this upstream's, from the <code>Date</code> of its latest batch since this upstream started ("ok" within 10 s); an edge whose clock is off stamps all it sends with it, its windows land off by as much on every page, and its health points fall outside the last 15 minutes.</p>"#;
    page("Edges", "/edges", true, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(agent: &str, last_received_ms: i64) -> EdgeRow {
        EdgeRow {
            agent: agent.into(),
            batches: 3,
            records: 30,
            last_received_ms,
        }
    }

    /// An edge whose clock is off is trouble: counted at the top, shown
    /// by how much in its row, marked and listed after the stale ones. A
    /// clock within the reading's error is "ok"; one never read, "–".
    #[test]
    fn edges_with_a_wrong_clock_are_counted_marked_and_listed_first() {
        let now = 1_800_000_000_000;
        let rows = [
            edge("a-ok", now - 1_000),
            edge("b-unread", now - 1_000),
            edge("c-stale", now - STALE_AFTER_MS - 1),
            edge("d-off", now - 1_000),
        ];
        let clocks: Clocks = [
            ("a-ok".to_owned(), -PEER_CLOCK_OFF_MS),
            ("d-off".to_owned(), 3 * 86_400_000 + 400),
        ]
        .into_iter()
        .collect();
        let html = render_edges(&rows, &AgentHealth::new(), &[], &clocks, now);
        assert!(
            html.contains("<b>1 with a wrong clock</b>: what they send is stamped wrong."),
            "{html}"
        );
        let order: Vec<usize> = ["c-stale", "d-off", "a-ok", "b-unread"]
            .iter()
            .map(|a| html.find(&format!("<td>{a}</td>")).expect(a))
            .collect();
        assert!(
            order.is_sorted(),
            "stale, wrong clock, then the rest: {order:?}"
        );
        for (agent, cell, marked) in [
            ("c-stale", "–", true),
            ("d-off", "<b>3d 0h behind</b>", true),
            ("a-ok", "ok", false),
            ("b-unread", "–", false),
        ] {
            let at = html.find(&format!("<td>{agent}</td>")).expect(agent);
            let row_start = html[..at].rfind("<tr").expect("row");
            let row_end = at + html[at..].find("</tr>").expect("row end");
            let row = &html[row_start..row_end];
            assert!(row.ends_with(&format!("<td>{cell}</td>")), "{agent}: {row}");
            assert_eq!(
                row.starts_with(r#"<tr class="stale">"#),
                marked,
                "{agent}: {row}"
            );
        }
        let none = render_edges(&rows[..1], &AgentHealth::new(), &[], &clocks, now);
        assert!(!none.contains("wrong clock"), "{none}");
        // Every edge off alike: this upstream's clock is the suspect.
        let alike: Clocks = ["a-ok", "b-unread"]
            .map(|a| (a.to_owned(), 3 * 86_400_000))
            .into_iter()
            .collect();
        let html = render_edges(&rows[..2], &AgentHealth::new(), &[], &alike, now);
        assert!(
            html.contains("<b>All 2 edges read this upstream's clock as 3d 0h ahead of theirs: this upstream's clock is more likely the wrong one.</b>"),
            "{html}"
        );
    }
}
