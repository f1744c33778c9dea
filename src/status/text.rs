//! `edgemeter status` as text: what a person reads at 3 a.m.

use crate::clock::{human_duration, off_by};
use crate::logging::{count, human_bytes};

use super::Snapshot;

fn ago(now: i64, t: Option<i64>) -> String {
    t.map_or_else(
        || "never".to_owned(),
        |t| format!("{} ago", human_duration(now - t)),
    )
}

/// The agent, its outbox and sinks, then what each source published.
pub fn render(s: &Snapshot) -> String {
    let mut out = render_agent(s);
    out += &render_sources(s);
    out
}

pub fn render_agent(s: &Snapshot) -> String {
    let now = s.at_ms;
    let mut out = String::new();
    let state = match (s.agent.running, s.agent.pid) {
        (true, None) => "running".to_owned(),
        (true, Some(pid)) => format!("running, pid {pid}"),
        (false, _) => "not running".to_owned(),
    };
    let o = &s.outbox;
    let pct = 100.0 * o.bytes as f64 / o.max_bytes as f64;
    out += &format!("agent        {} ({state})\n", s.agent.id);
    out += &format!("outbox       {}\n", o.path.display());
    out += &format!(
        "buffered     {}, {} of {} ({pct:.1}%)\n",
        count(o.records, "record", "records"),
        human_bytes(o.bytes.max(0) as u64),
        human_bytes(o.max_bytes)
    );
    if let Some(free) = o.disk_full() {
        out += &format!(
            "disk         FULL: {} free in {}: commits fail, and records wait in memory (see the log)\n",
            human_bytes(free),
            s.agent.state_dir.display()
        );
    }
    out += &format!(
        "oldest       {}\n",
        o.oldest_ms.map_or_else(
            || "nothing pending".to_owned(),
            |t| format!("{} old", human_duration(now - t))
        )
    );
    if s.drops.is_empty() {
        out += "drops        none\n";
    } else {
        for (i, d) in s.drops.iter().enumerate() {
            let label = if i == 0 { "drops" } else { "" };
            out += &format!("{label:<12} {} {} (sink {})\n", d.records, d.reason, d.sink);
        }
    }
    out += &format!(
        "dead letters {} kept\n",
        human_bytes(o.dead_letter_bytes.max(0) as u64)
    );
    if s.sinks.is_empty() {
        out += "sinks        none configured\n";
    }
    for k in &s.sinks {
        out += &format!(
            "sink {}\n  pending {}; delivered {} in {}; last delivery {}\n  \
             failures {}; last failure {}; dead letters {}\n",
            k.name,
            count(k.pending, "record", "records"),
            count(k.delivered_records, "record", "records"),
            count(k.delivered_batches, "batch", "batches"),
            ago(now, k.last_delivery_ms),
            k.failures,
            ago(now, k.last_failure_ms),
            k.dead_letters
        );
        if !k.counters.is_empty() {
            let list: Vec<String> = k
                .counters
                .iter()
                .map(|(key, v)| format!("{key} {v}"))
                .collect();
            out += &format!("  {}\n", list.join("; "));
        }
        if let Some(e) = &k.last_error {
            out += &format!("  last error: {e}\n");
        }
        if let Some(offset) = k.clock_off() {
            out += &format!(
                "  CLOCK OFF: this machine's clock is {} the receiver's (read {}): what is sent is stamped wrong; enable network time\n",
                off_by(offset),
                ago(now, k.peer_clock_read_ms)
            );
        }
    }
    out
}

/// What sources published about themselves (the relay's streams, an xx
/// source's state), with its age; sources that publish nothing are left out.
pub fn render_sources(s: &Snapshot) -> String {
    let mut out = String::new();
    for src in s.sources.iter().filter(|x| x.written_ms.is_some()) {
        out += &format!(
            "source {} (written {})\n",
            src.name,
            ago(s.at_ms, src.written_ms)
        );
        for line in src.text.lines() {
            out += &format!("  {line}\n");
        }
    }
    out
}
