//! What `edgemeter status` shows for an xx_gateway source: kept by the
//! source as it polls, rendered here as text for its status file.

use std::path::PathBuf;

use crate::clock::{human_duration, iso8601};

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
