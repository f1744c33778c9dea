//! What the log says of a sink's tries that fail and are retried (the
//! receiver down, throttling, timeouts, a full disk): the first failure,
//! each other error once, a reminder every 10 minutes, and the end, said
//! once no try has failed for [`Spell::SETTLE`].
//!
//! A receiver that fails now and then rather than all the time (CloudWatch
//! throttling at its rate, a load balancer with one bad backend, a disk
//! that is nearly full) made two lines a flap, "could not deliver" and
//! "delivering again": 774 lines in 20 s of a peer that refused every
//! other request. An outage that flaps is one spell: said when it begins
//! and when it has ended for good. No IO here; unit-tested with fake time.

use std::time::{Duration, Instant};

use crate::logging::{Say, Spell};

/// At most this many different errors are said in one spell (each once);
/// a spell that meets more says the rest in its reminders.
const ERRORS_SAID_MAX: usize = 4;

#[derive(Debug)]
pub struct Outage {
    spell: Spell,
    /// The errors said in this spell.
    said: Vec<String>,
}

/// What to say of a failed try.
#[derive(Debug, PartialEq)]
pub enum Failed {
    Nothing,
    /// The first failure of a spell, or an error not said in it yet.
    Said,
    /// The spell goes on: tries failed in it, over how long.
    Reminder {
        failed: u64,
        lasted: Duration,
    },
}

/// A spell that ended: how many tries failed in it, over how long.
#[derive(Debug, PartialEq)]
pub struct Ended {
    pub failed: u64,
    pub lasted: Duration,
}

impl Default for Outage {
    fn default() -> Outage {
        Outage {
            spell: Spell::settling(),
            said: Vec::new(),
        }
    }
}

impl Outage {
    /// A try failed with `why` at `now`.
    pub fn failed(&mut self, why: &str, now: Instant) -> Failed {
        let say = self.spell.failed(now);
        let new = !self.said.iter().any(|s| s == why);
        match say {
            Say::Failure { attempts: 1 } => {
                self.said = vec![why.to_owned()];
                Failed::Said
            }
            Say::Failure { attempts } => Failed::Reminder {
                failed: attempts,
                lasted: self.spell.since(now),
            },
            _ if new && self.said.len() < ERRORS_SAID_MAX => {
                self.said.push(why.to_owned());
                Failed::Said
            }
            _ => Failed::Nothing,
        }
    }

    /// A try worked at `now`: the spell's end, if it has settled.
    pub fn worked(&mut self, now: Instant) -> Option<Ended> {
        ended(self.spell.worked(now))
    }

    /// When an idle sink should look again to end the spell: after its
    /// last try worked, once no failure came for [`Spell::SETTLE`].
    pub fn settles_at(&self) -> Option<Instant> {
        self.spell.ends_at()
    }

    /// The spell's end at `now`, if the last try worked and it has settled
    /// (an idle sink's look).
    pub fn settled(&mut self, now: Instant) -> Option<Ended> {
        ended(self.spell.quiet(now))
    }

    /// At shutdown: the spell's end if the last try worked, settled or
    /// not, so the log's last word on the sink is not a failure it got over.
    pub fn stopping(&mut self, now: Instant) -> Option<Ended> {
        ended(self.spell.stopped(now))
    }
}

fn ended(say: Say) -> Option<Ended> {
    match say {
        Say::Ended { failed, lasted } => Some(Ended { failed, lasted }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` ms after a fixed start.
    fn at(n: u64) -> Instant {
        static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
        *START + Duration::from_millis(n)
    }

    #[test]
    fn a_receiver_that_fails_every_other_try_is_one_spell() {
        let mut o = Outage::default();
        let mut said = Vec::new();
        // 20 s of a try every 50 ms, every other one throttled.
        for k in 0..400 {
            if k % 2 == 0 {
                if o.failed("HTTP 400 Throttling", at(50 * k)) != Failed::Nothing {
                    said.push(k);
                }
            } else if o.worked(at(50 * k)).is_some() {
                said.push(k);
            }
        }
        assert_eq!(said, [0], "said when it began, and nothing else");
        // Then every try works: the end is said SETTLE after the last failure.
        let last_failure = at(50 * 398);
        assert_eq!(
            o.worked(last_failure + Spell::SETTLE - Duration::from_millis(1)),
            None
        );
        assert_eq!(
            o.worked(last_failure + Spell::SETTLE),
            Some(Ended {
                failed: 200,
                lasted: Duration::from_millis(50 * 398) + Spell::SETTLE
            })
        );
        assert_eq!(o.worked(at(60_000)), None, "said once");
    }

    #[test]
    fn another_error_is_said_once_and_at_most_four() {
        let mut o = Outage::default();
        let errors = ["a", "b", "a", "b", "c", "d", "e", "a"];
        let said: Vec<Failed> = errors
            .iter()
            .enumerate()
            .map(|(k, e)| o.failed(e, at(100 * k as u64)))
            .collect();
        use Failed::{Nothing, Said};
        assert_eq!(
            said,
            [Said, Said, Nothing, Nothing, Said, Said, Nothing, Nothing]
        );
    }

    #[test]
    fn a_long_spell_is_recalled_every_ten_minutes_with_its_count() {
        let mut o = Outage::default();
        assert_eq!(o.failed("x", at(0)), Failed::Said);
        let mut reminders = Vec::new();
        // A failure a second and a success between, for 25 minutes.
        for s in 1..1500u64 {
            o.worked(at(1000 * s - 500));
            if let Failed::Reminder { failed, lasted } = o.failed("x", at(1000 * s)) {
                reminders.push((failed, lasted.as_secs()));
            }
        }
        assert_eq!(reminders, [(601, 600), (1201, 1200)]);
    }

    #[test]
    fn an_idle_sink_ends_the_spell_once_settled_and_not_while_failing() {
        let mut o = Outage::default();
        assert_eq!(o.settles_at(), None, "no spell");
        o.failed("x", at(0));
        assert_eq!(o.settles_at(), None, "the last try failed: nothing to end");
        assert_eq!(o.settled(at(60_000)), None);
        assert_eq!(o.worked(at(1_000)), None, "not settled yet");
        assert_eq!(o.settles_at(), Some(at(0) + Spell::SETTLE));
        assert_eq!(
            o.settled(at(0) + Spell::SETTLE),
            Some(Ended {
                failed: 1,
                lasted: Spell::SETTLE
            })
        );
        assert_eq!(o.settles_at(), None);
    }

    #[test]
    fn stopping_says_the_end_only_if_the_last_try_worked() {
        let mut o = Outage::default();
        o.failed("x", at(0));
        assert_eq!(o.stopping(at(100)), None);
        o.worked(at(200));
        assert_eq!(
            o.stopping(at(300)),
            Some(Ended {
                failed: 1,
                lasted: Duration::from_millis(300)
            })
        );
        assert_eq!(o.stopping(at(400)), None, "once");
        assert_eq!(Outage::default().stopping(at(0)), None, "no spell");
    }
}
