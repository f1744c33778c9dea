//! Retry schedules: capped exponential backoff with full jitter, as a pure
//! value so the schedule is tested without sleeping.
//!
//! Full jitter (the delay is uniform in `[0, min(cap, base * 2^n)]`) spreads
//! a fleet that failed together across the whole window; the first retry is
//! jittered too, so agents restarted by the same event do not retry in step.

use std::time::Duration;

#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The ceiling of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay, drawing the jitter from `unit` (a number in [0, 1)).
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let delay = self.ceiling().mul_f64(unit.clamp(0.0, 1.0));
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    pub fn next_wait(&mut self) -> Duration {
        self.next_with(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// `base` with up to ±`spread` (a fraction) of random jitter, so periodic
/// work on many machines does not line up.
pub fn jittered(base: Duration, spread: f64, unit: f64) -> Duration {
    let factor = 1.0 + spread * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
    base.mul_f64(factor.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn ceilings_double_then_cap() {
        let mut b = Backoff::new(S(1), S(30));
        let ceilings: Vec<u64> = (0..8)
            .map(|_| {
                let c = b.ceiling().as_secs();
                b.next_with(0.5);
                c
            })
            .collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 30, 30, 30]);
        b.reset();
        assert_eq!(b.ceiling(), S(1));
        assert_eq!(b.attempts(), 0);
    }

    #[test]
    fn full_jitter_spans_zero_to_ceiling_including_first_retry() {
        let mut b = Backoff::new(S(2), S(60));
        assert_eq!(b.clone().next_with(0.0), Duration::ZERO);
        assert_eq!(b.clone().next_with(0.25), Duration::from_millis(500));
        assert_eq!(b.next_with(0.999_999).as_millis(), 1999);
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(S(1), S(300));
        for _ in 0..1000 {
            b.next_with(1.0);
        }
        assert_eq!(b.ceiling(), S(300));
    }

    #[test]
    fn max_below_initial_is_raised() {
        assert_eq!(Backoff::new(S(10), S(1)).ceiling(), S(10));
    }

    #[test]
    fn jittered_stays_within_spread() {
        assert_eq!(jittered(S(10), 0.1, 0.0), S(9));
        assert_eq!(jittered(S(10), 0.1, 0.5), S(10));
        assert_eq!(jittered(S(10), 0.1, 1.0), S(11));
    }
}
