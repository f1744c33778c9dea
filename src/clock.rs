//! Wall-clock helpers: milliseconds since the Unix epoch, the few date
//! formats edgemeter prints (without a calendar dependency; HTTP dates by
//! the `httpdate` crate), and what a receiver's `Date` header says of this
//! machine's clock ([`PeerClock`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
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

/// (year, month, day) to days since 1970-01-01: Hinnant's `days_from_civil`.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-24`, the UTC day of `ms`.
pub fn day(ms: i64) -> String {
    let (y, m, d) = civil_from_days(ms.div_euclid(86_400_000));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Parse `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM[:SS[.fff]]` with `Z`, `+HH:MM` or
/// `-HH:MM` (none means UTC) into ms since the epoch. None if it is not one
/// of those or names a day that does not exist.
pub fn parse_iso8601(s: &str) -> Option<i64> {
    let num = |t: &str| -> Option<i64> {
        (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())).then(|| t.parse().ok())?
    };
    let (date, time) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut dp = date.split('-');
    let (y, m, d) = (num(dp.next()?)?, num(dp.next()?)?, num(dp.next()?)?);
    if dp.next().is_some() || !(1..=12).contains(&m) || d < 1 {
        return None;
    }
    let days = days_from_civil(y, m as u32, d as u32);
    if civil_from_days(days) != (y, m as u32, d as u32) {
        return None; // 2026-02-30
    }
    let mut ms = days * 86_400_000;
    if let Some(t) = time {
        let (clock, offset_ms) = if let Some(c) = t.strip_suffix('Z') {
            (c, 0)
        } else if let Some(i) = t.rfind(['+', '-']) {
            let (c, off) = t.split_at(i);
            let sign = if off.starts_with('-') { -1 } else { 1 };
            let (oh, om) = off[1..].split_once(':')?;
            (c, sign * (num(oh)? * 3600 + num(om)? * 60) * 1000)
        } else {
            (t, 0)
        };
        let (hms, frac) = match clock.split_once('.') {
            Some((a, f)) => (a, Some(f)),
            None => (clock, None),
        };
        let mut tp = hms.split(':');
        let h = num(tp.next()?)?;
        let mi = num(tp.next()?)?;
        let sec = match tp.next() {
            Some(x) => num(x)?,
            None => 0,
        };
        if tp.next().is_some() || h > 23 || mi > 59 || sec > 59 {
            return None;
        }
        let milli = match frac {
            None => 0,
            Some(f) if !f.is_empty() && f.len() <= 9 => num(&format!("{f:0<3}")[..3])?,
            Some(_) => return None,
        };
        ms += ((h * 60 + mi) * 60 + sec) * 1000 + milli - offset_ms;
    }
    Some(ms)
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

/// `2022-07-25T20:00:00.000Z`. Its digits are put in place: the csv sink
/// writes one a record, and `format!` took 207 ns of it.
pub fn iso8601(ms: i64) -> String {
    let (y, mo, d, h, mi, s, milli) = split(ms);
    if !(0..=9999).contains(&y) {
        return format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z");
    }
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut n: u32| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, y as u32);
    put(5, 2, mo);
    put(8, 2, d);
    put(11, 2, h as u32);
    put(14, 2, mi as u32);
    put(17, 2, s as u32);
    put(20, 3, milli as u32);
    String::from_utf8(out.to_vec()).expect("ASCII digits")
}

/// `20220725T200000Z`: the basic ISO-8601 form AWS signs (`X-Amz-Date`).
pub fn iso8601_basic(ms: i64) -> String {
    let (y, mo, d, h, mi, s, _) = split(ms);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// `Tue, 24 Nov 2026 02:50:00 GMT` (an HTTP date, RFC 9110 §5.6.7) to ms
/// since 1970, by the `httpdate` crate.
pub fn parse_http_date(s: &str) -> Option<i64> {
    let t = httpdate::parse_http_date(s).ok()?;
    let ms = t.duration_since(UNIX_EPOCH).ok()?.as_millis();
    i64::try_from(ms).ok()
}

/// How far this machine's clock may be from a receiver's before the agent
/// says so. Far above what the reading's error can be (the `Date` header's
/// second, plus half an exchange of at most [`PEER_EXCHANGE_MAX_MS`]), far
/// below what misplaces a window.
pub const PEER_CLOCK_OFF_MS: i64 = 10_000;
/// An exchange that took longer tells too little of when its `Date` was
/// written: no reading is taken from it.
pub const PEER_EXCHANGE_MAX_MS: i64 = 2_000;

/// A receiver's clock less ours, in ms, from the `Date` of its answer to a
/// request sent at `sent` and answered at `received` (our clock): its
/// second's middle against the exchange's. None when the exchange took too
/// long to tell, or our clock went back during it.
pub fn peer_offset(date: i64, sent: i64, received: i64) -> Option<i64> {
    let took = received.checked_sub(sent)?;
    (0..=PEER_EXCHANGE_MAX_MS)
        .contains(&took)
        .then(|| date + 500 - (sent + took / 2))
}

/// The last reading of a receiver's clock ([`peer_offset`]): written
/// where its answer is read (a sink's worker thread), taken by the
/// delivery loop.
#[derive(Clone, Debug)]
pub struct PeerReading(Arc<AtomicI64>);

impl Default for PeerReading {
    fn default() -> PeerReading {
        PeerReading(Arc::new(AtomicI64::new(i64::MIN)))
    }
}

impl PeerReading {
    /// An answer to a request sent at `sent` came at `received` (our clock,
    /// ms) with this `Date` header, if it had one that parses.
    pub fn answer(&self, date: Option<&str>, sent: i64, received: i64) {
        if let Some(offset) = date
            .and_then(parse_http_date)
            .and_then(|d| peer_offset(d, sent, received))
        {
            self.0.store(offset, Ordering::Relaxed);
        }
    }

    /// The reading since the last take, if any.
    pub fn take(&self) -> Option<i64> {
        Some(self.0.swap(i64::MIN, Ordering::Relaxed)).filter(|&o| o != i64::MIN)
    }
}

/// What the readings of one receiver's clock say, one at a time: whether
/// ours is off, moved again, or agrees again. Said once each, not at every
/// delivery: `status` and `/metrics` carry the figure the whole time.
#[derive(Debug, Default)]
pub struct PeerClock {
    /// The offset last said to be off, while ours is off.
    said: Option<i64>,
}

#[derive(Debug, PartialEq)]
pub enum ClockSay {
    Nothing,
    /// Ours is off by this (the receiver's less ours, ms): newly, or by
    /// another amount than last said (the clock was set again).
    Off(i64),
    /// Within [`PEER_CLOCK_OFF_MS`] again, after being off by this.
    Agrees {
        was: i64,
    },
}

impl PeerClock {
    pub fn reading(&mut self, offset: i64) -> ClockSay {
        let off = offset.abs() > PEER_CLOCK_OFF_MS;
        match self.said {
            Some(was) if !off => {
                self.said = None;
                ClockSay::Agrees { was }
            }
            Some(was) if (offset - was).abs() <= PEER_CLOCK_OFF_MS => ClockSay::Nothing,
            _ if off => {
                self.said = Some(offset);
                ClockSay::Off(offset)
            }
            _ => ClockSay::Nothing,
        }
    }
}

/// When two or more peers' clocks all read off from ours by the same
/// (within [`PEER_CLOCK_OFF_MS`] of each other), that offset: then ours,
/// the one they all disagree with, is more likely the wrong one.
pub fn shared_offset(offsets: &[i64]) -> Option<i64> {
    let (min, max) = (offsets.iter().min()?, offsets.iter().max()?);
    (offsets.len() >= 2 && max - min <= PEER_CLOCK_OFF_MS)
        .then_some(offsets[0])
        .filter(|o| o.abs() > PEER_CLOCK_OFF_MS)
}

/// `3d 2h behind` or `12m 5s ahead of`: this machine's clock against a
/// receiver's `offset` (the receiver's less ours).
pub fn off_by(offset: i64) -> String {
    let way = if offset > 0 { "behind" } else { "ahead of" };
    format!("{} {way}", rounded_duration(offset.abs()))
}

/// `3d 0h earlier`: how far off what this machine stamps is, when its
/// clock is `offset` off a receiver's (the receiver's less ours).
pub fn stamped_off(offset: i64) -> String {
    let way = if offset > 0 { "earlier" } else { "later" };
    format!("{} {way}", rounded_duration(offset.abs()))
}

/// [`human_duration`] of a measured `ms`, rounded to the last unit shown.
pub fn rounded_duration(ms: i64) -> String {
    human_duration(rounded(ms))
}

/// `ms` rounded to the last unit [`human_duration`] shows: a reading is
/// good to a second or so, and 3 days less 0.4 s is "3d 0h", not "2d 23h".
fn rounded(ms: i64) -> i64 {
    let unit = if ms < 3_570_000 {
        1_000
    } else if ms < 86_370_000 {
        60_000
    } else {
        3_600_000
    };
    (ms + unit / 2) / unit * unit
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
    fn http_dates() {
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Tue, 24 Nov 2026 02:50:51 GMT"),
            Some(1_795_488_651_000)
        );
        assert_eq!(parse_http_date("Tue, 24 Nov 2026 02:50:51 CET"), None);
        assert_eq!(parse_http_date("garbage"), None);
    }

    #[test]
    fn a_peer_offset_is_its_dates_second_against_the_exchange() {
        let check = |date, sent, received, want| {
            assert_eq!(
                peer_offset(date, sent, received),
                want,
                "{date} {sent} {received}"
            )
        };
        // Same clocks: the Date's second holds the exchange's middle.
        check(10_000, 10_300, 10_700, Some(0));
        check(10_000, 10_200, 10_400, Some(200));
        check(10_000, 10_000, 11_000, Some(0));
        // The receiver three days ahead, a 50 ms exchange.
        check(259_200_000 + 5_000, 5_000, 5_050, Some(259_200_475));
        // Ours an hour ahead.
        check(0, 3_600_000, 3_600_100, Some(-3_599_550));
        // Too slow an exchange, or our clock went back in it: no reading.
        check(0, 0, PEER_EXCHANGE_MAX_MS + 1, None);
        check(0, 100, 50, None);
    }

    /// A clock off is said once, again only when it moves by more than
    /// the bound, and its end once.
    #[test]
    fn a_clock_off_is_said_when_it_begins_moves_and_ends() {
        let mut c = PeerClock::default();
        let day = 86_400_000;
        let said: Vec<ClockSay> = [
            0,
            900,
            3 * day,
            3 * day + 1_000,
            3 * day - 9_000,
            day,
            day,
            400,
            -20,
        ]
        .into_iter()
        .map(|o| c.reading(o))
        .collect();
        assert_eq!(
            said,
            [
                ClockSay::Nothing,
                ClockSay::Nothing,
                ClockSay::Off(3 * day),
                ClockSay::Nothing,
                ClockSay::Nothing,
                ClockSay::Off(day),
                ClockSay::Nothing,
                ClockSay::Agrees { was: day },
                ClockSay::Nothing,
            ]
        );
        assert_eq!(
            c.reading(-PEER_CLOCK_OFF_MS - 1),
            ClockSay::Off(-PEER_CLOCK_OFF_MS - 1)
        );
        assert_eq!(off_by(3 * day + 2 * 3_600_000), "3d 2h behind");
        assert_eq!(off_by(-725_000), "12m 5s ahead of");
        assert_eq!(off_by(3 * day - 400), "3d 0h behind");
        assert_eq!(off_by(3 * day - 1_700_000), "3d 0h behind");
        assert_eq!(off_by(3 * day - 1_800_001), "2d 23h behind");
        assert_eq!(off_by(3_600_000 - 31_000), "59m 29s behind");
        assert_eq!(off_by(3_600_000 - 1_000), "1h 0m behind");
        assert_eq!(off_by(-59_600), "1m 0s ahead of");
        assert_eq!(stamped_off(3 * day - 400), "3d 0h earlier");
        assert_eq!(stamped_off(-725_000), "12m 5s later");
    }

    /// Ours is the suspect only when every peer, two at least, reads the
    /// same offset, and it is off.
    #[test]
    fn a_clock_every_peer_disagrees_with_alike_is_the_suspect() {
        let day = 86_400_000;
        let check = |offsets: &[i64], want| assert_eq!(shared_offset(offsets), want, "{offsets:?}");
        check(&[], None);
        check(&[3 * day], None);
        check(&[3 * day, 3 * day + 900, 3 * day - 4_000], Some(3 * day));
        check(&[-day, -day + 2_000], Some(-day));
        check(&[3 * day, 3 * day, 0], None);
        check(&[3 * day, day], None);
        check(&[500, -300], None);
    }

    #[test]
    fn a_peer_reading_is_taken_once() {
        let r = PeerReading::default();
        assert_eq!(r.take(), None);
        r.answer(Some("Thu, 01 Jan 1970 00:01:00 GMT"), 0, 100);
        assert_eq!(r.take(), Some(60_450));
        assert_eq!(r.take(), None);
        r.answer(Some("garbage"), 0, 100);
        r.answer(None, 0, 100);
        assert_eq!(r.take(), None);
    }

    #[test]
    fn iso8601_cases() {
        let check = |ms: i64, want: &str| assert_eq!(iso8601(ms), want, "ms={ms}");
        check(0, "1970-01-01T00:00:00.000Z");
        check(1_658_779_200_000, "2022-07-25T20:00:00.000Z");
        check(951_782_400_000, "2000-02-29T00:00:00.000Z");
        check(4_107_542_399_999, "2100-02-28T23:59:59.999Z");
        check(-1, "1969-12-31T23:59:59.999Z");
        // Outside the four-digit years, as `format!` pads them.
        check(253_402_300_800_000, "10000-01-01T00:00:00.000Z");
        check(-62_167_219_200_001, "-001-12-31T23:59:59.999Z");
    }

    /// The digits put in place read as `format!` wrote them, across
    /// centuries, leap days and every field's carry.
    #[test]
    fn iso8601_is_what_format_wrote() {
        let formatted = |ms: i64| {
            let (y, mo, d, h, mi, s, milli) = split(ms);
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
        };
        let mut ms = -62_135_596_800_000; // 0001-01-01
        while ms < 253_402_300_799_999 {
            for at in [ms, ms + 999, ms - 1] {
                assert_eq!(iso8601(at), formatted(at), "ms={at}");
            }
            ms += 86_400_000 * 37 + 3_723_456;
        }
    }

    #[test]
    fn iso8601_parses_what_it_prints_and_what_people_type() {
        let check = |s: &str, want: Option<i64>| assert_eq!(parse_iso8601(s), want, "{s}");
        for ms in [0, 1_658_779_200_000, 951_782_400_000, 4_107_542_399_999, -1] {
            check(&iso8601(ms), Some(ms));
        }
        check("2022-07-25", Some(1_658_707_200_000));
        check("2022-07-25T20:00Z", Some(1_658_779_200_000));
        check("2022-07-25T20:00:00", Some(1_658_779_200_000));
        check("2022-07-25T22:00:00+02:00", Some(1_658_779_200_000));
        check("2022-07-25T19:30:00-00:30", Some(1_658_779_200_000));
        check("2022-07-25T20:00:00.5Z", Some(1_658_779_200_500));
        check("2026-02-30", None);
        check("2026-13-01", None);
        check("2026-11-24T24:00Z", None);
        check("yesterday", None);
        check("2026-11", None);
        check("", None);
        assert_eq!(day(1_658_779_200_000), "2022-07-25");
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
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
