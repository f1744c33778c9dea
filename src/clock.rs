//! Wall-clock helpers: milliseconds since the Unix epoch and the few date
//! formats edgemeter prints, without a calendar dependency.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        // A clock before 1970 is a broken RTC (a Pi without network time);
        // 0 keeps ordering sane instead of panicking.
        .unwrap_or(0)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
/// Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn split(ms: i64) -> (i64, u32, u32, i64, i64, i64, i64) {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    (
        y,
        m,
        d,
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        ms.rem_euclid(1000),
    )
}

/// `2022-07-25T20:00:00.000Z`
pub fn iso8601(ms: i64) -> String {
    let (y, mo, d, h, mi, s, milli) = split(ms);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}

/// A duration in words an operator reads at a glance: `45s`, `12m 3s`, `3h 2m`, `4d 1h`.
pub fn human_duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_cases() {
        let check = |ms: i64, want: &str| assert_eq!(iso8601(ms), want, "ms={ms}");
        check(0, "1970-01-01T00:00:00.000Z");
        check(1_658_779_200_000, "2022-07-25T20:00:00.000Z");
        check(951_782_400_000, "2000-02-29T00:00:00.000Z");
        check(4_107_542_399_999, "2100-02-28T23:59:59.999Z");
        check(-1, "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn human_duration_cases() {
        let check = |ms: i64, want: &str| assert_eq!(human_duration(ms), want);
        check(-5, "0s");
        check(59_999, "59s");
        check(60_000, "1m 0s");
        check(3_723_000, "1h 2m");
        check(90_000_000, "1d 1h");
    }
}
