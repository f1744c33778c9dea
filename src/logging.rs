//! Logging to stderr (journald keeps it), one sentence per event. The level
//! comes from `EDGEMETER_LOG` if set, else from the config.

use std::time::{Duration, Instant};

use log::LevelFilter;
use simplelog::{ConfigBuilder, WriteLogger};

pub const ENV: &str = "EDGEMETER_LOG";

/// Log targets dropped at every level: raw wire dumps with credentials.
pub const NEVER_LOGGED: [&str; 1] = ["ureq_proto"];

/// The level `EDGEMETER_LOG` asks for, if it is set and valid.
pub fn env_level() -> Option<LevelFilter> {
    std::env::var(ENV).ok().and_then(|v| parse_level(v.trim()))
}

pub fn init(level: LevelFilter) {
    let mut b = ConfigBuilder::new();
    b.set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off);
    // journald stamps every line itself; a second timestamp is noise there.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        b.set_time_level(LevelFilter::Off);
    } else {
        b.set_time_format_rfc3339();
    }
    // The HTTP client's wire dumps (ureq_proto, at trace) carry every
    // header: signatures, session tokens, the relay's rule tokens. They are
    // never logged; what each request did is logged by our own code.
    for target in NEVER_LOGGED {
        b.add_filter_ignore_str(target);
    }
    // Only fails if a logger is already set (tests): keep the first.
    let _ = WriteLogger::init(level, b.build(), std::io::stderr());
}

/// A log level as written in the config or `EDGEMETER_LOG`.
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    match s.to_ascii_lowercase().as_str() {
        "off" => Some(LevelFilter::Off),
        "error" => Some(LevelFilter::Error),
        "warn" | "warning" => Some(LevelFilter::Warn),
        "info" => Some(LevelFilter::Info),
        "debug" => Some(LevelFilter::Debug),
        "trace" => Some(LevelFilter::Trace),
        _ => None,
    }
}

/// `1 source`, `2 sources`: a count in a sentence of the log.
pub fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A failure that may repeat at every attempt (a full disk fails a flush
/// every 2 s, a sync every second): the log says it when it begins, again
/// at most every [`Spell::SAY_EVERY`] while it lasts, and when an attempt
/// works again, instead of a line per attempt. A spell made
/// [`Spell::settling`] ends only once no attempt has failed for
/// [`Spell::SETTLE`]: where a failure flaps (a starved process frees a
/// descriptor now and then, one accept works and the next fails), the
/// spell goes on instead of two lines a flap.
#[derive(Debug, Default)]
pub struct Spell {
    failing: Option<Failing>,
    /// How long without a failure ends the spell.
    settle: Duration,
    /// Whether the last attempt failed: a caller whose attempts stop once
    /// they work can end the spell only after one that worked.
    last_failed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Failing {
    since: Instant,
    /// When the log last said so.
    said: Instant,
    attempts: u64,
    last: Instant,
}

/// What the log is to say of one attempt.
#[derive(Debug, PartialEq)]
pub enum Say {
    Nothing,
    /// The failure: the first of its spell, or a reminder.
    Failure {
        /// The attempts of the spell so far, this one included.
        attempts: u64,
    },
    /// An attempt worked after a spell of failures (and, if settling,
    /// none failed in the settling time before it).
    Ended {
        failed: u64,
        lasted: Duration,
    },
}

impl Spell {
    pub const SAY_EVERY: Duration = Duration::from_secs(600);

    /// How long a [`Spell::settling`] goes without a failure before it
    /// ends: five of the relay's flushes, a hundred of the outbox's
    /// commits or of a starved listener's accepts.
    pub const SETTLE: Duration = Duration::from_secs(10);

    /// A spell that ends only once no attempt failed for [`Spell::SETTLE`].
    pub fn settling() -> Spell {
        Spell {
            failing: None,
            settle: Spell::SETTLE,
            last_failed: false,
        }
    }

    /// An attempt failed at `now`.
    pub fn failed(&mut self, now: Instant) -> Say {
        self.last_failed = true;
        let f = self.failing.get_or_insert(Failing {
            since: now,
            said: now,
            attempts: 0,
            last: now,
        });
        f.attempts += 1;
        f.last = now;
        if f.attempts == 1 || now.duration_since(f.said) >= Spell::SAY_EVERY {
            f.said = now;
            return Say::Failure {
                attempts: f.attempts,
            };
        }
        Say::Nothing
    }

    /// When the spell would end if no attempt fails before: the last
    /// failure plus the settling time (None when none is on). A caller
    /// whose attempts stop once they work (the outbox writer, when records
    /// stop) wakes then to say it ended.
    pub fn settles_at(&self) -> Option<Instant> {
        self.failing.map(|f| f.last + self.settle)
    }

    /// How long the spell has lasted at `now` (zero when none is on).
    pub fn since(&self, now: Instant) -> Duration {
        self.failing
            .map_or(Duration::ZERO, |f| now.duration_since(f.since))
    }

    /// At a stop (the caller's attempts end): the spell's end, settled or
    /// not, if its last attempt worked, so the log's last word is not a
    /// failure that is over.
    pub fn stopped(&mut self, now: Instant) -> Say {
        if self.last_failed {
            return Say::Nothing;
        }
        match self.failing.take() {
            Some(f) => Say::Ended {
                failed: f.attempts,
                lasted: now.duration_since(f.since),
            },
            None => Say::Nothing,
        }
    }

    /// When a caller whose attempts have stopped (an idle writer, sink or
    /// source) should look again to say the spell ended ([`Spell::quiet`]):
    /// its settling time, if a spell is on and its last attempt worked.
    pub fn ends_at(&self) -> Option<Instant> {
        self.settles_at().filter(|_| !self.last_failed)
    }

    /// Such a look at `now`, no attempt since the last: the spell's end if
    /// the last attempt worked and it has settled.
    pub fn quiet(&mut self, now: Instant) -> Say {
        if self.last_failed {
            return Say::Nothing;
        }
        self.worked(now)
    }

    /// An attempt worked at `now`.
    pub fn worked(&mut self, now: Instant) -> Say {
        self.last_failed = false;
        match self.failing {
            Some(f) if now.duration_since(f.last) >= self.settle => {
                self.failing = None;
                Say::Ended {
                    failed: f.attempts,
                    lasted: now.duration_since(f.since),
                }
            }
            _ => Say::Nothing,
        }
    }
}

/// Things lost again and again, a few at each attempt (records dropped at
/// every commit while the outbox is full, raw lines while the disk lags):
/// said as a [`Spell`] is, with how many were lost; made
/// [`Losses::settling`], the spell ends only once none were lost for
/// [`Spell::SETTLE`].
#[derive(Debug, Default)]
pub struct Losses {
    spell: Spell,
    /// Lost in the spell so far.
    lost: u64,
}

/// What the log is to say of one attempt's losses.
#[derive(Debug, PartialEq)]
pub enum Lost {
    Nothing,
    /// The first losses of a spell: how many.
    Began(u64),
    /// A reminder while it lasts: how many in all, since when.
    Still {
        lost: u64,
        since: Duration,
    },
    /// An attempt lost none after a spell: how many it lost, how long.
    Ended {
        lost: u64,
        lasted: Duration,
    },
}

impl Losses {
    /// Losses whose spell ends only once none were lost for
    /// [`Spell::SETTLE`].
    pub fn settling() -> Losses {
        Losses {
            spell: Spell::settling(),
            lost: 0,
        }
    }

    /// `n` lost at an attempt at `now` (0: none).
    pub fn lost(&mut self, n: u64, now: Instant) -> Lost {
        if n == 0 {
            let say = self.spell.worked(now);
            return self.ended(say);
        }
        self.lost += n;
        match self.spell.failed(now) {
            Say::Failure { attempts: 1 } => Lost::Began(n),
            Say::Failure { .. } => Lost::Still {
                lost: self.lost,
                since: self.spell.since(now),
            },
            _ => Lost::Nothing,
        }
    }

    /// When a caller whose attempts have stopped should look again
    /// ([`Losses::quiet`]), as [`Spell::ends_at`].
    pub fn ends_at(&self) -> Option<Instant> {
        self.spell.ends_at()
    }

    /// A look at `now`, no attempt since the last: the spell's end if the
    /// last attempt lost none and it has settled.
    pub fn quiet(&mut self, now: Instant) -> Lost {
        let say = self.spell.quiet(now);
        self.ended(say)
    }

    /// At a stop after an attempt that lost none: the spell's end, settled
    /// or not, so the log's last word is not a loss that is over.
    pub fn stopped(&mut self, now: Instant) -> Lost {
        let say = self.spell.stopped(now);
        self.ended(say)
    }

    fn ended(&mut self, say: Say) -> Lost {
        match say {
            Say::Ended { lasted, .. } => Lost::Ended {
                lost: std::mem::take(&mut self.lost),
                lasted,
            },
            _ => Lost::Nothing,
        }
    }
}

/// `n` things, in the singular when there is one: `1 batch`, `3 batches`
/// (a count below zero, which none is, reads as 0).
pub fn count(n: impl TryInto<u64>, one: &str, many: &str) -> String {
    match n.try_into().unwrap_or(0) {
        1 => format!("1 {one}"),
        n => format!("{n} {many}"),
    }
}

/// A size an operator reads at a glance: `512 B`, `17.4 KiB`,
/// `256.0 MiB`: two decimals below 10 of a unit (a bound of 1 MiB and
/// 1.03 MiB held read apart), one above.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v < 10.0 {
        format!("{v:.2} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// How a reminder of [`Lost::Still`] counts: `12 since it began, 10
/// minutes ago (said every 10 minutes)`.
pub fn since_began(lost: u64, since: Duration) -> String {
    format!(
        "{lost} since it began, {:.0} minutes ago (said every {} minutes)",
        since.as_secs_f64() / 60.0,
        Spell::SAY_EVERY.as_secs() / 60
    )
}

/// How the end of a settling spell says how long it lasted: `over 12 s,
/// none in the last 10 s`.
pub fn settled(lasted: Duration) -> String {
    format!(
        "over {:.0} s, none in the last {} s",
        lasted.as_secs_f64(),
        Spell::SETTLE.as_secs()
    )
}

/// How a failure said again by a [`Spell`] begins: `""` for the first of
/// its spell, `"still failing (N attempts in a row): "` after.
pub fn again(attempts: u64) -> String {
    match attempts {
        1 => String::new(),
        n => format!(
            "still failing ({n} failed attempts since it began, said every {} minutes): ",
            Spell::SAY_EVERY.as_secs() / 60
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_are_said_with_their_count_at_the_start_every_ten_minutes_and_at_the_end() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut l = Losses::default();
        assert_eq!(l.lost(0, at(0)), Lost::Nothing);
        assert_eq!(l.lost(5, at(1)), Lost::Began(5));
        assert_eq!(l.lost(4, at(2)), Lost::Nothing, "not at every attempt");
        let later = Spell::SAY_EVERY.as_secs() + 1;
        assert_eq!(
            l.lost(3, at(later)),
            Lost::Still {
                lost: 12,
                since: Duration::from_secs(later - 1)
            }
        );
        assert_eq!(
            l.lost(0, at(later + 1)),
            Lost::Ended {
                lost: 12,
                lasted: Duration::from_secs(later)
            }
        );
        assert_eq!(l.lost(0, at(later + 2)), Lost::Nothing);
        assert_eq!(l.lost(1, at(later + 3)), Lost::Began(1), "a new spell");
    }

    #[test]
    fn a_spell_of_failures_is_said_at_its_start_every_ten_minutes_and_at_its_end() {
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let mut spell = Spell::default();
        assert_eq!(
            spell.worked(at(0)),
            Say::Nothing,
            "no spell, nothing to end"
        );
        assert_eq!(spell.failed(at(0)), Say::Failure { attempts: 1 });
        // Every 2 s for ten minutes: said again only once the ten are up.
        for k in 1..300 {
            assert_eq!(spell.failed(at(2 * k)), Say::Nothing, "attempt {}", k + 1);
        }
        assert_eq!(spell.failed(at(600)), Say::Failure { attempts: 301 });
        assert_eq!(spell.failed(at(602)), Say::Nothing);
        assert_eq!(
            spell.worked(at(604)),
            Say::Ended {
                failed: 302,
                lasted: Duration::from_secs(604)
            }
        );
        assert_eq!(spell.worked(at(606)), Say::Nothing, "said once");
        // A new spell is said at once.
        assert_eq!(spell.failed(at(700)), Say::Failure { attempts: 1 });
        assert_eq!(again(1), "");
        assert!(again(301).starts_with("still failing (301 failed attempts since it began"));
    }

    #[test]
    fn settling_losses_between_attempts_that_lose_none_are_one_spell() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut l = Losses::settling();
        assert_eq!(l.lost(5, at(0)), Lost::Began(5));
        // A commit every 0.1 s, one in three dropping 2.
        for k in 1..300 {
            let n = if k % 3 == 0 { 2 } else { 0 };
            assert_eq!(l.lost(n, at(k * 100)), Lost::Nothing, "commit {k}");
        }
        // The last loss at 29.7 s.
        assert_eq!(l.lost(0, at(39_600)), Lost::Nothing);
        assert_eq!(
            l.lost(0, at(39_700)),
            Lost::Ended {
                lost: 5 + 2 * 99,
                lasted: Duration::from_millis(39_700)
            }
        );
        assert_eq!(l.lost(0, at(39_800)), Lost::Nothing, "said once");
    }

    #[test]
    fn a_settling_spell_that_flaps_is_said_once_and_ends_after_its_settling_time() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut spell = Spell::settling();
        assert_eq!(spell.failed(at(0)), Say::Failure { attempts: 1 });
        // Works and fails by turns, as accepts do while descriptors flap.
        for k in 1..50 {
            assert_eq!(spell.worked(at(k * 1000)), Say::Nothing, "works at {k} s");
            assert_eq!(
                spell.failed(at(k * 1000 + 100)),
                Say::Nothing,
                "fails at {k} s"
            );
        }
        // The last failure was at 49.1 s: a caller idle after it wakes at
        // 59.1 s to say the end.
        assert_eq!(spell.settles_at(), Some(at(59_100)));
        assert_eq!(
            spell.worked(at(59_000)),
            Say::Nothing,
            "9.9 s since a failure"
        );
        assert_eq!(
            spell.worked(at(59_100)),
            Say::Ended {
                failed: 50,
                lasted: Duration::from_millis(59_100)
            }
        );
        assert_eq!(spell.settles_at(), None, "none on");
        assert_eq!(spell.worked(at(60_000)), Say::Nothing, "said once");
        assert_eq!(spell.failed(at(61_000)), Say::Failure { attempts: 1 });
    }

    #[test]
    fn an_idle_caller_ends_a_settling_spell_only_after_an_attempt_that_worked() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut spell = Spell::settling();
        assert_eq!(spell.ends_at(), None, "no spell");
        spell.failed(at(0));
        assert_eq!(spell.ends_at(), None, "the last attempt failed");
        assert_eq!(spell.quiet(at(60_000)), Say::Nothing);
        assert_eq!(spell.worked(at(1_000)), Say::Nothing, "not settled yet");
        assert_eq!(spell.ends_at(), Some(at(0) + Spell::SETTLE));
        assert_eq!(spell.quiet(at(9_999)), Say::Nothing);
        assert_eq!(
            spell.quiet(at(10_000)),
            Say::Ended {
                failed: 1,
                lasted: Spell::SETTLE
            }
        );
        assert_eq!(spell.ends_at(), None, "said once");
    }

    #[test]
    fn counts_read_as_sentences() {
        assert_eq!(count(0, "batch", "batches"), "0 batches");
        assert_eq!(count(1, "batch", "batches"), "1 batch");
        assert_eq!(count(18, "record", "records"), "18 records");
    }

    #[test]
    fn sizes_read_at_a_glance() {
        for (n, said) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1.00 KiB"),
            (17_837, "17.4 KiB"),
            (1 << 20, "1.00 MiB"),
            (1_080_000, "1.03 MiB"),
            (268_435_456, "256.0 MiB"),
            (1 << 30, "1.00 GiB"),
            (u64::MAX, "16777216.0 TiB"),
        ] {
            assert_eq!(human_bytes(n), said, "{n}");
        }
    }

    #[test]
    fn idle_or_stopped_losses_end_only_after_an_attempt_that_lost_none() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut l = Losses::settling();
        assert_eq!(l.lost(3, at(0)), Lost::Began(3));
        assert_eq!(l.ends_at(), None, "the last attempt lost some");
        assert_eq!(l.quiet(at(60_000)), Lost::Nothing);
        assert_eq!(l.stopped(at(60_000)), Lost::Nothing);
        assert_eq!(l.lost(0, at(1_000)), Lost::Nothing, "not settled yet");
        assert_eq!(l.ends_at(), Some(at(0) + Spell::SETTLE));
        assert_eq!(l.quiet(at(9_999)), Lost::Nothing);
        let ended = Lost::Ended {
            lost: 3,
            lasted: Spell::SETTLE,
        };
        assert_eq!(l.quiet(at(10_000)), ended);
        assert_eq!(l.quiet(at(20_000)), Lost::Nothing, "said once");
        // Stopped before it settled, after an attempt that lost none.
        assert_eq!(l.lost(2, at(30_000)), Lost::Began(2));
        assert_eq!(l.lost(0, at(31_000)), Lost::Nothing);
        let ended = Lost::Ended {
            lost: 2,
            lasted: Duration::from_secs(2),
        };
        assert_eq!(l.stopped(at(32_000)), ended);
        assert_eq!(l.stopped(at(33_000)), Lost::Nothing, "said once");
    }
}
