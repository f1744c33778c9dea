//! One stream's connection as a small state machine with no IO: what state
//! it is in, and how long to wait after it drops. The task in `mod.rs`
//! does the IO and asks this what to do next; tests drive it with fake time.
//!
//! Every wait is drawn with full jitter from [`Backoff`], the first one
//! too: when the session host restarts, all streams drop in the same
//! instant and must not all knock again in the same instant.
//!
//! A connection that was *healthy* starts the schedule over, so a host
//! that drops every few seconds (a flaky uplink, a proxy's idle timeout)
//! gets each stream back within the initial wait every time. Healthy means
//! it carried at least one frame, or it lived longer than the wait that
//! preceded it and at least [`HEALTHY_AFTER`]. A host that accepts and
//! drops at once, saying nothing, is not healthy: the waits still grow to
//! the maximum.

use std::time::Duration;

use crate::backoff::Backoff;

/// The least a silent connection must live to count as healthy (it must
/// also outlive the wait before it).
pub const HEALTHY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Connecting,
    Live,
    /// Connected, but nothing (not even a pong) arrived within the
    /// liveness deadline: being closed, to reconnect.
    Stalled,
    BackingOff,
    /// The agent shut down.
    Stopped,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Live => "live",
            State::Stalled => "stalled",
            State::BackingOff => "backing off",
            State::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Link {
    pub state: State,
    /// When the state began, ms since the Unix epoch.
    pub since_ms: i64,
    /// Until when a backing-off link waits.
    pub until_ms: i64,
    pub last_error: Option<String>,
    /// Connections established after the first.
    pub reconnects: u64,
    /// Connections closed because the host stopped answering.
    pub stalls: u64,
    connected_before: bool,
    /// The current connection delivered a frame.
    carried: bool,
    /// The wait before the current attempt.
    last_wait: Duration,
    backoff: Backoff,
}

impl Link {
    pub fn new(initial: Duration, max: Duration, now_ms: i64) -> Link {
        Link {
            state: State::Connecting,
            since_ms: now_ms,
            until_ms: now_ms,
            last_error: None,
            reconnects: 0,
            stalls: 0,
            connected_before: false,
            carried: false,
            last_wait: Duration::ZERO,
            backoff: Backoff::new(initial, max),
        }
    }

    pub fn connecting(&mut self, now_ms: i64) {
        self.state = State::Connecting;
        self.since_ms = now_ms;
    }

    /// The websocket handshake succeeded.
    pub fn connected(&mut self, now_ms: i64) {
        if self.connected_before {
            self.reconnects += 1;
        }
        self.connected_before = true;
        self.carried = false;
        self.state = State::Live;
        self.since_ms = now_ms;
    }

    /// A frame arrived on the current connection.
    pub fn carried(&mut self) {
        self.carried = true;
    }

    /// Nothing arrived within the liveness deadline.
    pub fn stalled(&mut self, now_ms: i64) {
        self.stalls += 1;
        self.state = State::Stalled;
        self.since_ms = now_ms;
    }

    /// The agent is shutting down.
    pub fn stopped(&mut self, now_ms: i64) {
        self.state = State::Stopped;
        self.since_ms = now_ms;
    }

    /// A connection attempt failed, or a connection ended. Returns how long
    /// to wait before the next attempt, drawing jitter from `unit` in [0, 1).
    pub fn dropped(&mut self, now_ms: i64, error: String, unit: f64) -> Duration {
        if matches!(self.state, State::Live | State::Stalled) {
            let lived = Duration::from_millis((now_ms - self.since_ms).max(0) as u64);
            if self.carried || lived >= self.last_wait.max(HEALTHY_AFTER) {
                self.backoff.reset();
            }
        }
        let wait = self.backoff.next_with(unit);
        self.last_wait = wait;
        self.state = State::BackingOff;
        self.since_ms = now_ms;
        self.until_ms = now_ms + wait.as_millis() as i64;
        self.last_error = Some(error);
        wait
    }

    pub fn is_live(&self) -> bool {
        self.state == State::Live
    }
}

/// Why a stream's connection could not be made, or ended. The text is for
/// `status` and the log; the variant for the code that decides.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkError {
    /// The session host's name has no address.
    Resolve { host: String, error: String },
    /// No TCP connection to any of its addresses.
    Connect { addr: String, error: String },
    /// TCP connected, the websocket handshake failed.
    Handshake { url: String, error: String },
    /// No answer within the connect timeout.
    Timeout { url: String, after: Duration },
    /// The session host closed the connection (with its close code, if any).
    Closed { code: Option<String> },
    /// The connection broke (reset, EOF without a close frame).
    Lost(String),
    /// A frame larger than the bound: the rest of it cannot be skipped.
    Oversized(String),
    /// Nothing, not even a pong, within the liveness deadline.
    Stalled { after: Duration },
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Resolve { host, error } => write!(f, "cannot resolve {host}: {error}"),
            LinkError::Connect { addr, error } => write!(f, "cannot connect to {addr}: {error}"),
            LinkError::Handshake { url, error } => {
                write!(f, "websocket handshake with {url} failed: {error}")
            }
            LinkError::Timeout { url, after } => write!(f, "no answer from {url} within {after:?}"),
            LinkError::Closed { code: Some(c) } => {
                write!(f, "the session host closed the connection ({c})")
            }
            LinkError::Closed { code: None } => {
                f.write_str("the session host closed the connection")
            }
            LinkError::Lost(e) => write!(f, "connection lost: {e}"),
            LinkError::Stalled { after } => write!(
                f,
                "the session host sent nothing for {} s, not even a pong (hung?); reconnecting",
                after.as_secs_f64()
            ),
            LinkError::Oversized(e) => write!(
                f,
                "{e}; the rest of that frame cannot be skipped, so reconnecting"
            ),
        }
    }
}

impl std::error::Error for LinkError {}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn waits_grow_with_failures_and_are_jittered_from_the_first() {
        let mut l = Link::new(S, 8 * S, 0);
        // The first wait is already drawn from [0, initial].
        assert_eq!(l.dropped(0, "refused".into(), 0.5), S / 2);
        assert_eq!(l.state, State::BackingOff);
        assert_eq!(l.until_ms, 500);
        l.connecting(500);
        assert_eq!(l.dropped(500, "refused".into(), 0.5), S);
        l.connecting(1500);
        assert_eq!(l.dropped(1500, "refused".into(), 0.5), 2 * S);
        for _ in 0..10 {
            l.dropped(0, "refused".into(), 0.999);
        }
        assert!(l.dropped(0, "refused".into(), 0.999) <= 8 * S, "capped");
        assert_eq!(l.last_error.as_deref(), Some("refused"));
        assert_eq!(l.dropped(0, "x".into(), 0.0), Duration::ZERO);
    }

    #[test]
    fn a_connection_that_carried_a_frame_starts_the_schedule_over() {
        let mut l = Link::new(S, 64 * S, 0);
        for _ in 0..5 {
            l.dropped(0, "refused".into(), 0.999);
        }
        // Up for 2 s after a long wait, said nothing, dropped: still backing
        // off hard (a host that accepts and drops at once is not hammered).
        l.connected(1_000);
        assert!(l.dropped(3_000, "closed".into(), 0.999) > 30 * S);
        // Up for 200 ms but it delivered a frame: back to [0, initial].
        l.connected(40_000);
        l.carried();
        assert!(l.dropped(40_200, "closed".into(), 0.999) < S);
        assert_eq!(l.reconnects, 1);
        l.connected(41_000);
        assert_eq!(l.reconnects, 2);
        assert!(l.is_live());
    }

    #[test]
    fn a_silent_connection_that_outlived_its_wait_starts_the_schedule_over() {
        // The case: a host that drops every 10 s, a silent stream.
        let mut l = Link::new(S, 60 * S, 0);
        let mut now = 0;
        for _ in 0..6 {
            l.connected(now);
            now += 10_000;
            let wait = l.dropped(now, "closed".into(), 0.999);
            assert!(
                wait < S,
                "every drop is followed by the initial wait: {wait:?}"
            );
            now += wait.as_millis() as i64;
        }
        // Lived 0.5 s after a 0.999 s wait: too short, the schedule grows.
        l.connected(now);
        let wait = l.dropped(now + 500, "closed".into(), 0.999);
        assert!(wait > S, "{wait:?}");
        // Under HEALTHY_AFTER even after a zero wait: grows too.
        let mut l = Link::new(S, 60 * S, 0);
        l.dropped(0, "refused".into(), 0.0);
        l.connected(0);
        let first = l.dropped(HEALTHY_AFTER.as_millis() as i64 - 1, "closed".into(), 0.999);
        assert!(first > S, "{first:?}");
    }

    #[test]
    fn a_refusing_host_still_meets_growing_jittered_waits_up_to_the_cap() {
        let mut l = Link::new(S, 8 * S, 0);
        let ceilings: Vec<Duration> = (0..6)
            .map(|_| l.dropped(0, "refused".into(), 0.999_999))
            .collect();
        assert!(ceilings.windows(2).all(|w| w[0] <= w[1]), "{ceilings:?}");
        assert!(ceilings[5] > 7 * S && ceilings[5] <= 8 * S, "{ceilings:?}");
    }

    #[test]
    fn a_stall_is_counted_and_shown_until_the_drop() {
        let mut l = Link::new(S, 8 * S, 0);
        l.connected(0);
        l.carried();
        l.stalled(30_000);
        assert_eq!((l.state, l.stalls, l.since_ms), (State::Stalled, 1, 30_000));
        assert_eq!(l.state.as_str(), "stalled");
        // It carried frames before it hung: the next try comes soon.
        assert!(l.dropped(30_100, "stalled".into(), 0.999) < S);
        assert_eq!(l.state, State::BackingOff);
    }

    #[test]
    fn link_errors_read_as_sentences() {
        let check = |e: LinkError, want: &str| assert_eq!(e.to_string(), want);
        check(
            LinkError::Closed {
                code: Some("1001 going away".into()),
            },
            "the session host closed the connection (1001 going away)",
        );
        check(
            LinkError::Closed { code: None },
            "the session host closed the connection",
        );
        check(
            LinkError::Connect {
                addr: "127.0.0.1:8888".into(),
                error: "Connection refused".into(),
            },
            "cannot connect to 127.0.0.1:8888: Connection refused",
        );
        check(
            LinkError::Timeout {
                url: "ws://h/ws/spin30".into(),
                after: std::time::Duration::from_secs(10),
            },
            "no answer from ws://h/ws/spin30 within 10s",
        );
        check(
            LinkError::Oversized("Message too long".into()),
            "Message too long; the rest of that frame cannot be skipped, so reconnecting",
        );
        check(
            LinkError::Stalled {
                after: Duration::from_secs(45),
            },
            "the session host sent nothing for 45 s, not even a pong (hung?); reconnecting",
        );
    }
}
