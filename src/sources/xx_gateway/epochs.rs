//! Epoch and window arithmetic, and the script's CSV line: pure, so that
//! "which windows are due, over which epochs, ending when" is tested
//! without a database.
//!
//! Epoch e covers `[e * period, (e + 1) * period)` since the Unix epoch. A
//! window of W epochs is computed at epoch e when `e % W == 0`, over epochs
//! `e - W + 1 ..= e` (exactly as `active-users.py` does), and ends at
//! `(e + 1) * period`.

/// The epoch holding instant `ms`.
pub fn epoch_of(ms: i64, period_ms: i64) -> i64 {
    ms.div_euclid(period_ms)
}

/// The windows (sizes in epochs) due at epoch `e`, in configuration order.
pub fn due(e: i64, windows: &[u32]) -> impl Iterator<Item = u32> + '_ {
    windows
        .iter()
        .copied()
        .filter(move |&w| e.rem_euclid(i64::from(w)) == 0)
}

/// The first epoch of the window of `w` epochs computed at `e`.
pub fn window_start(e: i64, w: u32) -> i64 {
    e - i64::from(w) + 1
}

/// When the window computed at `e` ends (ms since the Unix epoch).
pub fn window_end_ms(e: i64, period_ms: i64) -> i64 {
    (e + 1) * period_ms
}

/// The newest epoch whose rows are final at `now_ms`: closed, plus grace.
pub fn newest_final(now_ms: i64, period_ms: i64, grace_ms: i64) -> i64 {
    epoch_of(now_ms - grace_ms, period_ms) - 1
}

/// Which epochs still matter once the windows through `last_emitted` are
/// out, with late rows accepted `late_epochs` back and windows of up to
/// `max_w` epochs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Horizon {
    /// A new row for an epoch at or after this corrects the emitted
    /// windows it is in; one before it is too late and only counted.
    pub accept_from: i64,
    /// Epochs at or after this are kept: every window a correction
    /// recomputes, and every window still to come, lies within them.
    pub keep_from: i64,
}

pub fn horizon(last_emitted: i64, late_epochs: u32, max_w: u32) -> Horizon {
    let accept_from = last_emitted + 1 - i64::from(late_epochs);
    Horizon {
        accept_from,
        keep_from: accept_from - i64::from(max_w) + 1,
    }
}

/// The emitted windows an id in `epoch` is part of: those computed at
/// `e` in `epoch ..= epoch + w - 1` that are due, and were emitted
/// (`emitted_from ..= last_emitted`).
pub fn windows_containing(
    epoch: i64,
    windows: &[u32],
    emitted_from: i64,
    last_emitted: i64,
) -> Vec<(i64, u32)> {
    let mut out = Vec::new();
    for &w in windows {
        let last = (epoch + i64::from(w) - 1).min(last_emitted);
        for e in epoch.max(emitted_from)..=last {
            if e.rem_euclid(i64::from(w)) == 0 {
                out.push((e, w));
            }
        }
    }
    out
}

/// A window's length for labels: `30m`, `6h`, `24h`, `90s`.
pub fn window_label(w: u32, period_ms: i64) -> String {
    let secs = i64::from(w) * period_ms / 1000;
    match secs {
        s if s % 86_400 == 0 && s >= 86_400 * 2 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// One line of `active-users.csv`, byte for byte as the script writes it:
/// `epoch,numEpochs,endTimestamp,numUnique` with `endTimestamp` as Python's
/// `str(datetime.fromtimestamp(t, timezone.utc))`.
pub fn csv_line(e: i64, w: u32, period_ms: i64, unique: u64) -> String {
    format!(
        "{e},{w},{},{unique}\r\n",
        python_utc(window_end_ms(e, period_ms))
    )
}

/// `2022-07-25 20:00:00+00:00`, or with `.ffffff` when there are microseconds.
fn python_utc(ms: i64) -> String {
    let iso = crate::clock::iso8601(ms); // 2022-07-25T20:00:00.000Z
    let (date, time) = (&iso[..10], &iso[11..19]);
    let millis = ms.rem_euclid(1000);
    if millis == 0 {
        format!("{date} {time}+00:00")
    } else {
        format!("{date} {time}.{:06}+00:00", millis * 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: i64 = 1_800_000;

    #[test]
    fn epochs_and_windows_follow_the_script() {
        assert_eq!(epoch_of(0, P), 0);
        assert_eq!(epoch_of(P - 1, P), 0);
        assert_eq!(epoch_of(P, P), 1);
        assert_eq!(epoch_of(-1, P), -1);
        let due_at = |e| due(e, &[1, 12, 48]).collect::<Vec<_>>();
        assert_eq!(due_at(7), vec![1]);
        assert_eq!(due_at(12), vec![1, 12]);
        assert_eq!(due_at(48), vec![1, 12, 48]);
        assert_eq!(due_at(0), vec![1, 12, 48]);
        assert_eq!(window_start(48, 48), 1);
        assert_eq!(window_start(48, 1), 48);
        assert_eq!(window_end_ms(48, P), 49 * P);
    }

    #[test]
    fn newest_final_waits_for_close_and_grace() {
        let grace = 60_000;
        // 10 s after epoch 5 closed: with 60 s grace epoch 5 is not final.
        assert_eq!(newest_final(6 * P + 10_000, P, grace), 4);
        assert_eq!(newest_final(6 * P + 60_000, P, grace), 5);
    }

    #[test]
    fn horizons_keep_every_epoch_a_correction_needs() {
        // The case: caught up at L, windows up to 48, late rows
        // accepted 96 epochs back; a row at L - 92 corrects the 48-epoch
        // window at the next multiple of 48, which starts 47 epochs before.
        let l = 48 * 1000 + 40;
        let h = horizon(l, 96, 48);
        assert_eq!(h.accept_from, l - 95);
        assert_eq!(h.keep_from, l - 95 - 47);
        for epoch in h.accept_from..=l {
            for (e, w) in windows_containing(epoch, &[1, 12, 48], l - 500, l) {
                assert!(window_start(e, w) >= h.keep_from, "({e}, {w}) for {epoch}");
                assert!(e <= l && e >= epoch);
            }
        }
        assert_eq!(
            windows_containing(l - 92, &[1, 12, 48], 0, l).len(),
            1 + 1 + 1
        );
        // Nothing before the first emitted epoch is corrected.
        assert_eq!(windows_containing(96, &[1, 12, 48], 100, 200), vec![]);
        assert_eq!(
            windows_containing(99, &[1, 12, 48], 100, 200),
            vec![(108, 12), (144, 48)]
        );
        assert_eq!(windows_containing(5, &[1, 3], 0, 4), vec![]);
        assert_eq!(windows_containing(4, &[1, 3], 0, 10), vec![(4, 1), (6, 3)]);
    }

    #[test]
    fn labels() {
        assert_eq!(window_label(1, P), "30m");
        assert_eq!(window_label(12, P), "6h");
        assert_eq!(window_label(48, P), "24h");
        assert_eq!(window_label(336, P), "7d");
        assert_eq!(window_label(1, 90_000), "90s");
    }

    #[test]
    fn csv_lines_are_byte_identical_to_the_script() {
        // Epoch 921543 ends at 2022-07-25 20:00:00 UTC (the reference's
        // example). Python's csv.writer ends rows with "\r\n" by default, and
        // the script opens the file in text mode, which keeps them on Linux.
        assert_eq!(
            csv_line(921_543, 1, P, 1234),
            "921543,1,2022-07-25 20:00:00+00:00,1234\r\n"
        );
        assert_eq!(
            csv_line(0, 48, P, 0),
            "0,48,1970-01-01 00:30:00+00:00,0\r\n"
        );
        assert_eq!(python_utc(1_500), "1970-01-01 00:00:01.500000+00:00");
    }
}
