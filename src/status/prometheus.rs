//! `/metrics`: a [`Snapshot`] in the Prometheus text exposition format
//! (version 0.0.4), every family with its `HELP` and `TYPE`, names in base
//! units (`_seconds`, `_bytes`), counters ending in `_total`. A time that
//! never happened (no delivery yet) is left out rather than written as 0.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::Snapshot;

/// The content type of the format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One metric family: its samples as (labels, value), in order.
struct Family {
    help: &'static str,
    counter: bool,
    samples: Vec<(Vec<(String, String)>, f64)>,
}

/// Families by name, written in name order.
#[derive(Default)]
struct Families(BTreeMap<String, Family>);

impl Families {
    fn add(
        &mut self,
        name: &str,
        counter: bool,
        help: &'static str,
        labels: &[(&str, &str)],
        v: f64,
    ) {
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.add_owned(name, counter, help, labels, v);
    }

    fn add_owned(
        &mut self,
        name: &str,
        counter: bool,
        help: &'static str,
        labels: Vec<(String, String)>,
        v: f64,
    ) {
        self.0
            .entry(format!("edgemeter_{name}"))
            .or_insert_with(|| Family {
                help,
                counter,
                samples: Vec::new(),
            })
            .samples
            .push((labels, v));
    }
}

fn seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// Label values escape `\`, `"` and newlines; nothing else.
fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

pub fn render(s: &Snapshot) -> String {
    let mut f = Families::default();
    let agent = s.agent.id.as_str();
    f.add(
        "info",
        false,
        "The agent's id and edgemeter's version (always 1)",
        &[("agent", agent), ("version", &s.agent.version)],
        1.0,
    );
    let o = &s.outbox;
    f.add(
        "outbox_records",
        false,
        "Records buffered in the outbox",
        &[],
        o.records as f64,
    );
    f.add(
        "outbox_bytes",
        false,
        "Charged bytes of the buffered records",
        &[],
        o.bytes as f64,
    );
    f.add(
        "outbox_max_bytes",
        false,
        "buffer_max_bytes: past it the oldest records are dropped",
        &[],
        o.max_bytes as f64,
    );
    f.add(
        "outbox_oldest_age_seconds",
        false,
        "Age of the oldest buffered record (0 when none is buffered)",
        &[],
        o.oldest_ms.map_or(0.0, |t| seconds(s.at_ms - t)),
    );
    f.add(
        "outbox_dead_letter_bytes",
        false,
        "Bytes kept in dead letters",
        &[],
        o.dead_letter_bytes as f64,
    );
    if let Some(free) = o.disk_free_bytes {
        f.add(
            "state_dir_free_bytes",
            false,
            "Bytes the agent may still write on the state directory's disk (below 65536 commits fail)",
            &[],
            free as f64,
        );
    }
    for d in &s.drops {
        f.add(
            "dropped_records_total",
            true,
            "Records dropped, by reason and sink",
            &[("reason", &d.reason), ("sink", &d.sink)],
            d.records as f64,
        );
    }
    for k in &s.sinks {
        let sink = [("sink", k.name.as_str())];
        f.add(
            "sink_pending_records",
            false,
            "Records waiting for the sink",
            &sink,
            k.pending as f64,
        );
        f.add(
            "sink_delivered_records_total",
            true,
            "Records the sink confirmed",
            &sink,
            k.delivered_records as f64,
        );
        f.add(
            "sink_delivered_batches_total",
            true,
            "Batches the sink confirmed",
            &sink,
            k.delivered_batches as f64,
        );
        f.add(
            "sink_failures_total",
            true,
            "Failed delivery attempts",
            &sink,
            k.failures as f64,
        );
        f.add(
            "sink_dead_letters",
            false,
            "Dead letters kept for the sink",
            &sink,
            k.dead_letters as f64,
        );
        if let Some(t) = k.last_delivery_ms {
            f.add(
                "sink_last_delivery_seconds",
                false,
                "When the sink last confirmed a batch, Unix seconds",
                &sink,
                seconds(t),
            );
        }
        if let Some(t) = k.last_failure_ms {
            f.add(
                "sink_last_failure_seconds",
                false,
                "When a delivery attempt last failed, Unix seconds",
                &sink,
                seconds(t),
            );
        }
        if let Some(offset) = k.peer_clock_offset_ms {
            f.add(
                "sink_peer_clock_offset_seconds",
                false,
                "The receiver's clock less this machine's, from the Date of its answers (over 10 s: this clock is off)",
                &sink,
                offset as f64 / 1000.0,
            );
        }
        for (key, v) in &k.counters {
            f.add(
                "sink_events_total",
                true,
                "The sink's own counts (e.g. points refused), by event",
                &[("event", key), ("sink", &k.name)],
                *v as f64,
            );
        }
    }
    for src in &s.sources {
        if let Some(t) = src.written_ms {
            f.add(
                "source_status_age_seconds",
                false,
                "How long ago the source last wrote its status",
                &[("source", &src.name)],
                seconds(s.at_ms - t),
            );
        }
        for sample in &src.samples {
            // A sample of a metric this version does not know (a newer
            // agent's file) is left out rather than written without help.
            let Some(m) = crate::sources::metrics().find(|m| m.name == sample.name) else {
                continue;
            };
            let mut labels: Vec<(String, String)> = sample
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            labels.push(("source".to_owned(), src.name.clone()));
            labels.sort();
            f.add_owned(m.name, m.counter, m.help, labels, sample.value);
        }
    }
    let mut out = String::new();
    for (name, family) in &f.0 {
        let kind = if family.counter { "counter" } else { "gauge" };
        let _ = writeln!(out, "# HELP {name} {}", family.help);
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in &family.samples {
            out += name;
            if !labels.is_empty() {
                let list: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                let _ = write!(out, "{{{}}}", list.join(","));
            }
            let _ = writeln!(out, " {}", value(*v));
        }
    }
    out
}
