//! What the relay source publishes about itself: the tables `edgemeter
//! status` shows, and the same figures per stream as samples for `status
//! --json` and an agent's `/metrics`.

use crate::clock::iso8601;
use crate::sources::{Metric, Published, Sample};

use super::ingest::{self, State};
use crate::logging::human_bytes;

/// The relay's metrics; a stream's samples have the label `stream`.
pub const METRICS: &[Metric] = &[
    Metric {
        name: "relay_stream_up",
        counter: false,
        help: "1 while the stream's websocket is live, else 0",
    },
    Metric {
        name: "relay_stream_state_since_seconds",
        counter: false,
        help: "When the stream's connection state (label state) began, Unix seconds",
    },
    Metric {
        name: "relay_frames_total",
        counter: true,
        help: "Websocket frames received",
    },
    Metric {
        name: "relay_messages_total",
        counter: true,
        help: "Messages received (frames may carry several lines)",
    },
    Metric {
        name: "relay_bytes_total",
        counter: true,
        help: "Bytes of frames received",
    },
    Metric {
        name: "relay_unused_total",
        counter: true,
        help: "Messages not used, by kind (binary, oversized, garbage, not_envelope, not_analysed, zero_width)",
    },
    Metric {
        name: "relay_transitions_total",
        counter: true,
        help: "Command transitions counted",
    },
    Metric {
        name: "relay_reconnects_total",
        counter: true,
        help: "Connections established after the first",
    },
    Metric {
        name: "relay_stalls_total",
        counter: true,
        help: "Connections closed because the host stopped answering",
    },
    Metric {
        name: "relay_analytics_users",
        counter: false,
        help: "Users the analytics track; new users past relay_analytics_max_users are counted as not_analysed",
    },
    Metric {
        name: "relay_analytics_max_users",
        counter: false,
        help: "max_users: the most users the analytics track",
    },
    Metric {
        name: "relay_raw_lines_dropped_total",
        counter: true,
        help: "Raw lines not written to the raw files (over their memory bound)",
    },
    Metric {
        name: "relay_raw_files_bytes",
        counter: false,
        help: "What the raw files hold (raw_files = true), as the last dump found them",
    },
    Metric {
        name: "relay_raw_files_max_bytes",
        counter: false,
        help: "raw_files_max_bytes: past it the least recently written raw files are cut to their last message",
    },
    Metric {
        name: "relay_raw_files_cut_total",
        counter: true,
        help: "Raw files cut to their last message to keep them within relay_raw_files_max_bytes",
    },
    Metric {
        name: "relay_requests_answered_total",
        counter: true,
        help: "Dashboard requests answered in full, by content (answer_requests = true)",
    },
    Metric {
        name: "relay_requests_refused_total",
        counter: true,
        help: "Dashboard requests not answered, by reason (malformed, user_rate, stream_rate, queue_full, unanswerable)",
    },
    Metric {
        name: "relay_feedback_total",
        counter: true,
        help: "Dashboard feedback messages, by outcome (kept, refused)",
    },
    Metric {
        name: "relay_answer_frames_unsent_total",
        counter: true,
        help: "Answer frames not sent: over the size or queue bound, or not taken by the session host within 2 s",
    },
];

/// The status file's document, as JSON.
pub fn document(state: &State) -> String {
    let published = Published {
        text: render(state),
        samples: samples(state),
    };
    serde_json::to_string(&published).expect("a status document serializes")
}

fn samples(state: &State) -> Vec<Sample> {
    let mut out = Vec::new();
    for s in &state.streams {
        let stream = s.name.as_str();
        let t = &s.totals;
        let link = &s.link;
        let live = matches!(link.state, super::link::State::Live);
        out.push(Sample::new(
            "relay_stream_up",
            &[("stream", stream)],
            f64::from(u8::from(live)),
        ));
        out.push(Sample::new(
            "relay_stream_state_since_seconds",
            &[("state", link.state.as_str()), ("stream", stream)],
            link.since_ms as f64 / 1000.0,
        ));
        for (name, v) in [
            ("relay_frames_total", t.frames),
            ("relay_messages_total", t.messages),
            ("relay_bytes_total", t.bytes),
            ("relay_transitions_total", t.transitions),
            ("relay_reconnects_total", link.reconnects),
            ("relay_stalls_total", link.stalls),
        ] {
            out.push(Sample::new(name, &[("stream", stream)], v as f64));
        }
        for (kind, v) in [
            ("binary", t.binary),
            ("oversized", t.oversized),
            ("garbage", t.malformed - t.binary - t.oversized),
            ("not_envelope", t.other),
            ("not_analysed", t.untracked),
            ("zero_width", t.zero_width),
        ] {
            out.push(Sample::new(
                "relay_unused_total",
                &[("kind", kind), ("stream", stream)],
                v as f64,
            ));
        }
    }
    let (users, max_users) = state.analytics.users();
    out.push(Sample::new("relay_analytics_users", &[], users as f64));
    out.push(Sample::new(
        "relay_analytics_max_users",
        &[],
        max_users as f64,
    ));
    out.push(Sample::new(
        "relay_raw_lines_dropped_total",
        &[],
        state.raw_dropped as f64,
    ));
    if let Some(r) = &state.raw_on_disk {
        for (name, v) in [
            ("relay_raw_files_bytes", r.now()),
            ("relay_raw_files_max_bytes", r.max),
            ("relay_raw_files_cut_total", r.cut_files),
        ] {
            out.push(Sample::new(name, &[], v as f64));
        }
    }
    if let Some(d) = &state.desk {
        let c = &d.counts;
        for content in super::answers::Content::ALL {
            let n = c.answered.get(&content).copied().unwrap_or(0);
            out.push(Sample::new(
                "relay_requests_answered_total",
                &[("content", content.as_str())],
                n as f64,
            ));
        }
        for reason in super::desk::Refused::ALL {
            let n = c.refused.get(&reason).copied().unwrap_or(0);
            out.push(Sample::new(
                "relay_requests_refused_total",
                &[("reason", reason.as_str())],
                n as f64,
            ));
        }
        for (outcome, n) in [("kept", c.feedback_kept), ("refused", c.feedback_refused)] {
            out.push(Sample::new(
                "relay_feedback_total",
                &[("outcome", outcome)],
                n as f64,
            ));
        }
        out.push(Sample::new(
            "relay_answer_frames_unsent_total",
            &[],
            c.frames_unsent as f64,
        ));
    }
    out
}

/// The per-stream tables `edgemeter status` shows: the connection and its
/// traffic, then what could not be used, by kind, for the streams that had
/// any.
pub fn render(state: &State) -> String {
    let mut out = format!(
        "{:<12} {:<12} {:<21} {:>9} {:>10} {:>12} {:>9} {:>10} {:>6}  last error\n",
        "stream",
        "state",
        "since",
        "frames",
        "messages",
        "bytes",
        "malformed",
        "reconnects",
        "stalls"
    );
    for s in &state.streams {
        out += &format!(
            "{:<12} {:<12} {:<21} {:>9} {:>10} {:>12} {:>9} {:>10} {:>6}  {}\n",
            s.name,
            s.link.state.as_str(),
            iso8601(s.link.since_ms),
            s.totals.frames,
            s.totals.messages,
            s.totals.bytes,
            s.totals.malformed,
            s.link.reconnects,
            s.link.stalls,
            s.link.last_error.as_deref().unwrap_or("-")
        );
    }
    let odd: Vec<&ingest::Stream> = state
        .streams
        .iter()
        .filter(|s| {
            let t = &s.totals;
            t.malformed + t.other + t.untracked + t.zero_width > 0
        })
        .collect();
    if odd.is_empty() {
        out += "nothing malformed or skipped on any stream\n";
    } else {
        out += &format!(
            "{:<12} {:>9} {:>9} {:>9} {:>13} {:>12} {:>10}\n",
            "by kind",
            "binary",
            "oversized",
            "garbage",
            "not envelope",
            "not analysed",
            "zero-width"
        );
        for s in odd {
            let t = &s.totals;
            out += &format!(
                "{:<12} {:>9} {:>9} {:>9} {:>13} {:>12} {:>10}\n",
                s.name,
                t.binary,
                t.oversized,
                t.malformed - t.binary - t.oversized,
                t.other,
                t.untracked,
                t.zero_width
            );
        }
        out += "  garbage: text that is not JSON, or nested too deep\n";
        out += "  not envelope: JSON without user and type (a data stream's lines)\n";
        out += "  not analysed: unusable names, or past max_users\n";
        out += "  zero-width: U+200B lines the firmware sends, skipped\n";
    }
    let transitions: u64 = state.streams.iter().map(|s| s.totals.transitions).sum();
    let (users, max_users) = state.analytics.users();
    out += &format!(
        "users analysed {users} of max_users = {max_users}; command transitions {transitions}; raw lines dropped {}\n",
        state.raw_dropped
    );
    if let Some(r) = &state.raw_on_disk {
        out += &format!(
            "raw files {} of {} (raw_files_max_bytes)",
            human_bytes(r.now()),
            human_bytes(r.max)
        );
        if r.cut_files > 0 {
            out += &format!(
                "; cut to their last message since the start: {} files, {}",
                r.cut_files,
                human_bytes(r.cut_bytes)
            );
        }
        out += "\n";
    }
    if state.is_full() {
        out += "  the analytics are full: messages of new users (or with new names) are counted as not analysed; raise max_users and restart\n";
    }
    if let Some(d) = &state.desk {
        let c = &d.counts;
        let answered: u64 = c.answered.values().sum();
        let list = |v: Vec<(&str, u64)>| {
            let v: Vec<String> = v
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            if v.is_empty() {
                String::new()
            } else {
                format!(" ({})", v.join(", "))
            }
        };
        let refused: u64 = c.refused.values().sum();
        out += &format!(
            "dashboard requests: answered {answered}{}; not answered {refused}{}; feedback kept {}, refused {}; answer frames unsent {}\n",
            list(c.answered.iter().map(|(k, n)| (k.as_str(), *n)).collect()),
            list(c.refused.iter().map(|(k, n)| (k.as_str(), *n)).collect()),
            c.feedback_kept,
            c.feedback_refused,
            c.frames_unsent
        );
    }
    if !state.samples.is_empty() {
        out += "latest malformed:\n";
        for s in &state.samples {
            out += &format!("  {s}\n");
        }
    }
    out
}
