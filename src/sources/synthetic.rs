//! The `synthetic` source: a steady stream of numbered points, for the
//! demo, for load tests and benchmarks, and to check a pipeline end to end
//! on a machine with nothing to measure yet.
//!
//! It emits `rate_per_sec` points spread over `series` series of the metric
//! `metric`, each with dims `{agent, series}` and as value the number of the
//! point in this run (0, 1, 2, ...), which makes loss and duplication easy to
//! see downstream. With `limit` it stops after that many points.
//!
//! With `users = "A..B"` it also reports ids A to B-1 as the active users of
//! every `users_window_secs` window: a `<metric>_active_users` point and
//! sketch at each window's end, aligned to the wall clock so that agents on
//! different machines report the same windows. Agents given overlapping
//! ranges are how the upstream's network-wide union is tested and shown.

use std::time::{Duration, Instant};

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeTable;

use crate::clock::now_ms;
use crate::problems::{Problems, deserialize, int_in_range};
use crate::record::{Dims, Kind, Record};
use crate::runtime::LocalBoxFuture;
use crate::sketch::{Sketch, hash_i64};
use crate::sources::{Context, Source};

/// Points are emitted in ticks this far apart at most (fewer wake-ups than
/// one timer per point at high rates).
const TICK: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub metric: String,
    pub rate_per_sec: f64,
    pub series: u32,
    pub limit: Option<u64>,
    /// Ids reported active in every window, and the window.
    pub users: Option<(std::ops::Range<i64>, Duration)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    metric: Option<Spanned<String>>,
    rate_per_sec: Option<Spanned<f64>>,
    series: Option<Spanned<i64>>,
    limit: Option<Spanned<i64>>,
    users: Option<Spanned<String>>,
    users_window_secs: Option<Spanned<f64>>,
}

impl Config {
    pub fn parse(table: Spanned<DeTable<'_>>, p: &mut Problems) -> Option<Config> {
        let raw: Raw = deserialize(table, p)?;
        let before = p.list().len();
        let metric = raw.metric.map_or_else(
            || "synthetic".to_owned(),
            |m| {
                if m.get_ref().is_empty() || m.get_ref().len() > 255 {
                    p.push(m.span(), "metric must be 1 to 255 characters");
                }
                m.into_inner()
            },
        );
        let rate_per_sec = raw.rate_per_sec.map_or(10.0, |r| {
            let x = *r.get_ref();
            if !(x > 0.0 && x <= 1_000_000.0) {
                p.push(
                    r.span(),
                    format!(
                        "rate_per_sec = {x} is out of range; use more than 0 and at most 1000000"
                    ),
                );
            }
            x
        });
        let series = raw
            .series
            .map_or(1, |s| int_in_range(&s, "series", 1, 10_000, p) as u32);
        let limit = raw
            .limit
            .map(|l| int_in_range(&l, "limit", 1, u64::MAX >> 1, p));
        let window = crate::problems::secs(
            raw.users_window_secs.as_ref(),
            "users_window_secs",
            10.0,
            1.0,
            86_400.0,
            p,
        );
        let users = raw.users.as_ref().and_then(|u| {
            let range = u
                .get_ref()
                .split_once("..")
                .and_then(|(a, b)| Some(a.trim().parse::<i64>().ok()?..b.trim().parse::<i64>().ok()?))
                .filter(|r| r.start < r.end && r.end - r.start <= 10_000_000);
            if range.is_none() {
                p.push(
                    u.span(),
                    format!(
                        "users `{}` must be a range of ids such as \"0..1000\" (at most 10000000 ids)",
                        u.get_ref()
                    ),
                );
            }
            range.map(|r| (r, window))
        });
        (p.list().len() == before).then_some(Config {
            metric,
            rate_per_sec,
            series,
            limit,
            users,
        })
    }
}

pub struct Synthetic {
    config: Config,
}

impl Synthetic {
    pub fn new(config: Config) -> Synthetic {
        Synthetic { config }
    }
}

/// How many points are due `elapsed` into the run (pure, for tests).
fn due(rate_per_sec: f64, elapsed: Duration, limit: Option<u64>) -> u64 {
    let n = (rate_per_sec * elapsed.as_secs_f64()).floor() as u64;
    limit.map_or(n, |l| n.min(l))
}

impl Source for Synthetic {
    fn run(self: Box<Self>, ctx: Context) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move {
            let users = self.config.users.clone();
            let metric = format!("{}_active_users", self.config.metric);
            smol::future::zip(points(self.config, &ctx), async {
                if let Some((ids, window)) = users {
                    active_users(ids, window, metric, &ctx).await;
                }
            })
            .await;
        })
    }
}

/// Every window, the same ids as that window's active users.
async fn active_users(ids: std::ops::Range<i64>, window: Duration, metric: String, ctx: &Context) {
    let mut sketch = Sketch::default();
    for id in ids.clone() {
        sketch.insert(hash_i64(id));
    }
    let (payload, estimate) = (sketch.encode(), sketch.estimate());
    let dims = Dims::new([
        ("agent", ctx.agent_id.clone()),
        ("window", format!("{}s", window.as_secs())),
    ]);
    let w = window.as_millis() as i64;
    log::info!(
        "source `{}`: reporting ids {}..{} as active every {} s (`{metric}`)",
        ctx.name,
        ids.start,
        ids.end,
        window.as_secs()
    );
    loop {
        let now = now_ms();
        let end = (now.div_euclid(w) + 1) * w;
        if ctx
            .shutdown
            .sleep(Duration::from_millis((end - now) as u64))
            .await
        {
            return;
        }
        let point = Record::point(metric.clone(), dims.clone(), end, estimate, "Count");
        let sketch = Record {
            kind: Kind::Sketch,
            payload: payload.clone(),
            ..point.clone()
        };
        if !ctx.emit.emit(point).await || !ctx.emit.emit(sketch).await {
            return;
        }
    }
}

async fn points(c: Config, ctx: &Context) {
    {
        let dims: Vec<Dims> = (0..c.series)
            .map(|i| Dims::new([("agent", ctx.agent_id.clone()), ("series", i.to_string())]))
            .collect();
        let tick =
            TICK.max(Duration::from_secs_f64(1.0 / c.rate_per_sec).min(Duration::from_secs(1)));
        let start = Instant::now();
        let mut sent: u64 = 0;
        log::info!(
            "source `{}`: emitting {} points/s over {} series of `{}`",
            ctx.name,
            c.rate_per_sec,
            c.series,
            c.metric
        );
        loop {
            let target = due(c.rate_per_sec, start.elapsed(), c.limit);
            while sent < target {
                let rec = Record::point(
                    c.metric.clone(),
                    dims[(sent % u64::from(c.series)) as usize].clone(),
                    now_ms(),
                    sent as f64,
                    "Count",
                );
                if ctx.shutdown.is_started() || !ctx.emit.emit(rec).await {
                    return;
                }
                sent += 1;
            }
            // The crash test reads this: how many points the source had
            // handed over, and when.
            log::debug!("source `{}`: {sent} points emitted", ctx.name);
            if c.limit.is_some_and(|l| sent >= l) {
                log::info!(
                    "source `{}`: emitted its limit of {sent} points; idle until shutdown",
                    ctx.name
                );
                ctx.shutdown.wait().await;
                return;
            }
            if ctx.shutdown.sleep(tick).await {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_follows_rate_and_limit() {
        let check =
            |rate, ms, limit, want| assert_eq!(due(rate, Duration::from_millis(ms), limit), want);
        check(10.0, 0, None, 0);
        check(10.0, 99, None, 0);
        check(10.0, 100, None, 1);
        check(100_000.0, 1_000, None, 100_000);
        check(100_000.0, 1_000, Some(5), 5);
        check(0.5, 4_000, None, 2);
    }
}
