//! The agent's own health as points, so an upstream's edges page can show
//! how far behind each edge is, what it buffers, drops and fails to deliver
//! (`[agent] health_interval_secs`; every 60 s when a sink is an
//! `upstream`). Taken from the same snapshot as `edgemeter status`, on a
//! worker thread, and emitted like a source's points:
//!
//! | metric | dims | value |
//! |---|---|---|
//! | `agent_buffered_records` | | records in the outbox |
//! | `agent_buffered_bytes` | | their bytes |
//! | `agent_oldest_record_age_seconds` | | age of the oldest, 0 when empty |
//! | `agent_dropped_records` | | dropped since the outbox was made, all reasons |
//! | `agent_sink_pending_records` | `sink` | records the sink has yet to deliver |
//! | `agent_sink_failures` | `sink` | failed delivery attempts so far |

use std::time::Duration;

use crate::clock::now_ms;
use crate::record::{Dims, Record};
use crate::runtime::{LocalBoxFuture, Worker};
use crate::sources::{Context, Source};

use super::{Holder, Scope, Snapshot};

use crate::sources::AGENT_HEALTH_METRICS as METRICS;

pub struct Health {
    pub scope: Scope,
    pub interval: Duration,
}

/// The points of one snapshot, at `ts`.
pub fn points(s: &Snapshot, ts: i64) -> Vec<Record> {
    let none = Dims::default;
    let age = s
        .outbox
        .oldest_ms
        .map_or(0.0, |o| (ts - o).max(0) as f64 / 1000.0);
    let dropped: i64 = s.drops.iter().map(|d| d.records).sum();
    let mut out = vec![
        Record::point(METRICS[0], none(), ts, s.outbox.records as f64, "Count"),
        Record::point(METRICS[1], none(), ts, s.outbox.bytes as f64, "Bytes"),
        Record::point(METRICS[2], none(), ts, age, "Seconds"),
        Record::point(METRICS[3], none(), ts, dropped as f64, "Count"),
    ];
    for k in &s.sinks {
        let d = Dims::new([("sink", k.name.as_str())]);
        out.push(Record::point(
            METRICS[4],
            d.clone(),
            ts,
            k.pending as f64,
            "Count",
        ));
        out.push(Record::point(METRICS[5], d, ts, k.failures as f64, "Count"));
    }
    out
}

impl Source for Health {
    fn run(self: Box<Self>, ctx: Context) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move {
            let worker = Worker::new("health");
            let every = self.interval.as_millis().max(1) as i64;
            loop {
                // On the interval's boundaries, so edges' points line up.
                let now = now_ms();
                let next = (now.div_euclid(every) + 1) * every;
                if ctx
                    .shutdown
                    .sleep(Duration::from_millis((next - now) as u64))
                    .await
                {
                    return;
                }
                let scope = self.scope.clone();
                let snapshot = worker
                    .run(move || super::collect(&scope, Holder::Me, next))
                    .await;
                match snapshot {
                    Ok(s) => {
                        for r in points(&s, next) {
                            if !ctx.emit.emit(r).await {
                                return;
                            }
                        }
                    }
                    Err(e) => log::warn!("agent health: cannot read the outbox: {e}"),
                }
            }
        })
    }
}
