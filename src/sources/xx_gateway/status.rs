//! What `edgemeter status` shows for an xx_gateway source: kept by the
//! source as it polls, rendered here as text for its status file.

use std::path::PathBuf;

use crate::clock::{human_duration, iso8601};
use crate::sources::{Metric, Published, Sample};

/// The source's figures since the agent started.
#[derive(Debug, Default, Clone)]
pub struct Health {
    /// `user@host:port/db (password: …)`, once connected.
    pub target: Option<String>,
    pub node_id: Option<String>,
    pub period_ms: i64,
    /// How the first start chose its first epoch, when it looked at the script.
    pub start_note: Option<String>,
    pub polls: u64,
    pub last_poll_ms: Option<i64>,
    pub last_emitted: Option<i64>,
    /// The newest epoch that is closed, grace included, by the clock.
    pub newest_final: Option<i64>,
    /// The newest epoch in any row read.
    pub newest_seen: Option<i64>,
    /// Values of the windows emitted at `last_emitted`: (epochs, unique).
    pub last_values: Vec<(u32, u64)>,
    pub rows_new: u64,
    pub late_rows: u64,
    pub expired_rows: u64,
    pub gaps_open: u64,
    pub gaps_given_up: u64,
    /// The last error and since when it has been failing.
    pub error: Option<(String, i64)>,
    pub csv_path: Option<PathBuf>,
    pub csv_error: Option<(String, i64)>,
    pub csv_pending: i64,
    pub csv_failures: u64,
    pub csv_dropped: u64,
}

impl Health {
    /// Record a failure, keeping the time it started if it is the same one.
    pub fn failing(slot: &mut Option<(String, i64)>, message: String, now: i64) {
        match slot {
            Some((m, _)) if *m == message => {}
            _ => *slot = Some((message, now)),
        }
    }
}

fn since(now: i64, t: i64) -> String {
    format!("{} ({} ago)", iso8601(t), human_duration(now - t))
}

pub fn render(h: &Health, now: i64) -> String {
    let mut out = String::new();
    let label = |w: u32| super::epochs::window_label(w, h.period_ms.max(1));
    let state = match (&h.error, &h.target) {
        (Some((e, t)), _) => format!("FAILING since {}: {e}", since(now, *t)),
        (None, Some(target)) => format!(
            "reading {target}, node {}, epochs of {}",
            h.node_id.as_deref().unwrap_or("?"),
            label(1)
        ),
        (None, None) => "starting".to_owned(),
    };
    out += &format!("state      {state}\n");
    if let Some(note) = &h.start_note {
        out += &format!("start      {note}\n");
    }
    out += &match h.last_poll_ms {
        Some(t) => format!("last poll  {}, {} polls\n", since(now, t), h.polls),
        None => "last poll  never\n".to_owned(),
    };
    if let Some(e) = h.last_emitted {
        let values: Vec<String> = h
            .last_values
            .iter()
            .map(|(w, n)| format!("{} {n}", label(*w)))
            .collect();
        let end = super::epochs::window_end_ms(e, h.period_ms);
        out += &format!(
            "emitted    through epoch {e} (ended {}){}{}\n",
            iso8601(end),
            if values.is_empty() { "" } else { ": " },
            values.join(", ")
        );
        if let Some(newest) = h.newest_final {
            out += &format!(
                "lag        {} epochs behind the newest closed epoch ({newest}){}\n",
                (newest - e).max(0),
                h.newest_seen
                    .map(|s| format!("; newest epoch in the gateway's rows: {s}"))
                    .unwrap_or_default()
            );
        }
    }
    out += &format!(
        "rows       {} read; late rows: {} corrected windows, {} too late to count; id gaps: {} open, {} given up\n",
        h.rows_new, h.late_rows, h.expired_rows, h.gaps_open, h.gaps_given_up
    );
    if let Some(path) = &h.csv_path {
        let state = match &h.csv_error {
            Some((e, t)) => format!("FAILING since {}: {e}", since(now, *t)),
            None => "ok".to_owned(),
        };
        out += &format!("csv        {}: {state}", path.display());
        if h.csv_pending > 0 || h.csv_failures > 0 {
            out += &format!(
                "; {} lines waiting, {} failed writes",
                h.csv_pending, h.csv_failures
            );
        }
        if h.csv_dropped > 0 {
            out += &format!(", {} oldest lines dropped", h.csv_dropped);
        }
        out += "\n";
    }
    out
}

/// The xx source's metrics.
pub const METRICS: &[Metric] = &[
    Metric {
        name: "xx_failing",
        counter: false,
        help: "1 while reading the gateway's database fails, else 0",
    },
    Metric {
        name: "xx_failing_since_seconds",
        counter: false,
        help: "When the current failure began, Unix seconds (present while failing)",
    },
    Metric {
        name: "xx_error_info",
        counter: false,
        help: "The current failure's message, as the label error (present while failing)",
    },
    Metric {
        name: "xx_polls_total",
        counter: true,
        help: "Polls of the gateway's database since the agent started",
    },
    Metric {
        name: "xx_last_poll_seconds",
        counter: false,
        help: "When the last poll finished, Unix seconds",
    },
    Metric {
        name: "xx_emitted_epoch",
        counter: false,
        help: "The newest epoch whose windows were emitted",
    },
    Metric {
        name: "xx_lag_epochs",
        counter: false,
        help: "Epochs between the newest closed epoch and the newest emitted",
    },
    Metric {
        name: "xx_active_users",
        counter: false,
        help: "Distinct users in the last emitted window ending at xx_emitted_epoch, by window",
    },
    Metric {
        name: "xx_rows_read_total",
        counter: true,
        help: "Gateway rows read since the agent started",
    },
    Metric {
        name: "xx_late_rows_total",
        counter: true,
        help: "Rows that arrived after their window was emitted and corrected it",
    },
    Metric {
        name: "xx_expired_rows_total",
        counter: true,
        help: "Rows too late to correct any window kept",
    },
    Metric {
        name: "xx_gaps_open",
        counter: false,
        help: "Id gaps (rows not yet committed by the gateway) watched now",
    },
    Metric {
        name: "xx_gaps_given_up_total",
        counter: true,
        help: "Id gaps given up after gap_timeout_secs",
    },
    Metric {
        name: "xx_csv_failing",
        counter: false,
        help: "1 while appending to csv_path fails, else 0 (present with csv_path)",
    },
    Metric {
        name: "xx_csv_pending_lines",
        counter: false,
        help: "CSV lines waiting to be appended",
    },
    Metric {
        name: "xx_csv_failures_total",
        counter: true,
        help: "Failed appends to csv_path",
    },
];

/// Longest error message a sample's label carries.
const ERROR_LABEL_MAX: usize = 200;

/// The status file's document, as JSON.
pub fn document(h: &Health, now: i64) -> String {
    let published = Published {
        text: render(h, now),
        samples: samples(h),
    };
    serde_json::to_string(&published).expect("a status document serializes")
}

fn samples(h: &Health) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut push = |name: &str, labels: &[(&str, &str)], v: f64| {
        out.push(Sample::new(name, labels, v));
    };
    push("xx_failing", &[], f64::from(u8::from(h.error.is_some())));
    if let Some((e, since)) = &h.error {
        push("xx_failing_since_seconds", &[], *since as f64 / 1000.0);
        let short: String = e.chars().take(ERROR_LABEL_MAX).collect();
        push("xx_error_info", &[("error", &short)], 1.0);
    }
    push("xx_polls_total", &[], h.polls as f64);
    if let Some(t) = h.last_poll_ms {
        push("xx_last_poll_seconds", &[], t as f64 / 1000.0);
    }
    if let Some(e) = h.last_emitted {
        push("xx_emitted_epoch", &[], e as f64);
        if let Some(newest) = h.newest_final {
            push("xx_lag_epochs", &[], (newest - e).max(0) as f64);
        }
        for (w, n) in &h.last_values {
            let label = super::epochs::window_label(*w, h.period_ms.max(1));
            push("xx_active_users", &[("window", &label)], *n as f64);
        }
    }
    push("xx_rows_read_total", &[], h.rows_new as f64);
    push("xx_late_rows_total", &[], h.late_rows as f64);
    push("xx_expired_rows_total", &[], h.expired_rows as f64);
    push("xx_gaps_open", &[], h.gaps_open as f64);
    push("xx_gaps_given_up_total", &[], h.gaps_given_up as f64);
    if h.csv_path.is_some() {
        push(
            "xx_csv_failing",
            &[],
            f64::from(u8::from(h.csv_error.is_some())),
        );
        push("xx_csv_pending_lines", &[], h.csv_pending as f64);
        push("xx_csv_failures_total", &[], h.csv_failures as f64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_source_says_so_first() {
        let now = 1_800_000 * 1000;
        let mut h = Health {
            period_ms: 1_800_000,
            target: Some("ro@127.0.0.1:5432/cmix_gateway (password: dbPassword)".into()),
            node_id: Some("gw-1".into()),
            ..Health::default()
        };
        Health::failing(
            &mut h.error,
            "PostgreSQL refused the login".into(),
            now - 60_000,
        );
        Health::failing(&mut h.error, "PostgreSQL refused the login".into(), now);
        let text = render(&h, now);
        assert!(
            text.starts_with("state      FAILING since 1970-01-21T19:59:00.000Z (1m 0s ago): PostgreSQL refused the login\n"),
            "{text}"
        );
        h.error = None;
        h.last_emitted = Some(999);
        h.newest_final = Some(1001);
        h.last_values = vec![(1, 10), (12, 40)];
        h.csv_path = Some("au.csv".into());
        Health::failing(&mut h.csv_error, "cannot open".into(), now);
        h.csv_pending = 3;
        let text = render(&h, now);
        assert!(text.contains("state      reading ro@127.0.0.1:5432/cmix_gateway (password: dbPassword), node gw-1, epochs of 30m\n"), "{text}");
        assert!(
            text.contains(
                "emitted    through epoch 999 (ended 1970-01-21T20:00:00.000Z): 30m 10, 6h 40\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("lag        2 epochs behind the newest closed epoch (1001)\n"),
            "{text}"
        );
        assert!(text.contains("csv        au.csv: FAILING since"), "{text}");
        assert!(
            text.contains("; 3 lines waiting, 0 failed writes\n"),
            "{text}"
        );
    }
}
