//! What the log says of the streams' connections: the losses and returns
//! of one moment in one line each, not one line per stream.
//!
//! A session host that restarts, or a proxy that cuts idle connections,
//! drops every stream in the same instant, and each comes back within the
//! reconnect wait. Said per stream, that was two lines per stream per drop:
//! 24 lines for one blip of 12 streams, 360 in half a minute of a host that
//! drops every 2 s, burying whatever else the log said. Gathered, it is
//! two: "all 12 streams: connection lost: …" and "all 12 streams are
//! connected again".
//!
//! The stream tasks tell [`News`] what happened as it happens; the source's
//! news task says each line when it is due ([`News::due`], [`News::lines`]):
//! once no stream joined it for [`QUIET`], at most [`GATHER_MAX`] after its
//! first; what is left at shutdown. No IO here: the gathering, the timing
//! and the wording are unit-tested.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A line is said once no stream joined it for this long...
pub const QUIET: Duration = Duration::from_millis(500);
/// ... or this long after its first stream, whichever comes first. The
/// streams of a host that drops them all are lost within milliseconds, and
/// come back within the reconnect wait (1 s by default, drawn with full
/// jitter for each), a few hundred milliseconds apart.
pub const GATHER_MAX: Duration = Duration::from_secs(3);
/// A line names at most this many streams, then says how many more.
const NAMES_MAX: usize = 10;

/// One line's worth: streams that met the same thing.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    /// The connection was lost or refused, after working (or at start).
    Lost { error: String },
    /// Connected after failing: again, or (`first`) for the first time
    /// (the host was down when the source started).
    Back { first: bool },
}

#[derive(Debug)]
struct Group {
    event: Event,
    streams: Vec<String>,
    /// The longest wait before reconnecting, of the losses.
    wait: Duration,
    /// When its first and its last stream joined.
    first: Instant,
    last: Instant,
}

impl Group {
    fn due(&self) -> Instant {
        (self.last + QUIET).min(self.first + GATHER_MAX)
    }
}

/// The events not said yet, in groups: each event joins the last group of
/// the same kind and error, unless one of its stream's own later events is
/// in a group after it (a stream's events are said in their order).
#[derive(Debug, Default)]
pub struct News {
    groups: VecDeque<Group>,
}

impl News {
    /// `stream` lost its connection (or could not make one) with `error`
    /// at `now`, and tries again in `wait`.
    pub fn lost(&mut self, stream: &str, error: &str, wait: Duration, now: Instant) {
        let event = Event::Lost {
            error: error.to_owned(),
        };
        self.add(stream, event, wait, now);
    }

    /// `stream` is connected after failing, at `now`; `first`: it never
    /// was before.
    pub fn back(&mut self, stream: &str, first: bool, now: Instant) {
        self.add(stream, Event::Back { first }, Duration::ZERO, now);
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// When the next line is due (lines are said in order). None: there
    /// is nothing to say.
    pub fn due(&self) -> Option<Instant> {
        self.groups.front().map(Group::due)
    }

    fn add(&mut self, stream: &str, event: Event, wait: Duration, now: Instant) {
        // The last group of this event that no later group of this stream
        // follows.
        let mut join = None;
        for (k, g) in self.groups.iter().enumerate().rev() {
            if g.event == event {
                join = Some(k);
                break;
            }
            if g.streams.iter().any(|s| s == stream) {
                break;
            }
        }
        match join {
            Some(k) => {
                let g = &mut self.groups[k];
                if !g.streams.iter().any(|s| s == stream) {
                    g.streams.push(stream.to_owned());
                }
                g.wait = g.wait.max(wait);
                g.last = now;
            }
            None => self.groups.push_back(Group {
                event,
                streams: vec![stream.to_owned()],
                wait,
                first: now,
                last: now,
            }),
        }
    }

    /// The lines due at `now` (all of them with None) for source `source`
    /// of `streams` streams, in order, each with its level: losses warn,
    /// returns inform.
    pub fn lines(
        &mut self,
        source: &str,
        streams: usize,
        now: Option<Instant>,
    ) -> Vec<(log::Level, String)> {
        let due = self
            .groups
            .iter()
            .take_while(|g| now.is_none_or(|now| g.due() <= now))
            .count();
        self.groups
            .drain(..due)
            .map(|g| {
                let single = g.streams.len() == 1;
                let who = who(&g.streams, streams);
                match g.event {
                    Event::Lost { error } if single => (
                        log::Level::Warn,
                        format!(
                            "source `{source}`: {who}: {error}; reconnecting in {:.1} s, and on with backoff",
                            g.wait.as_secs_f64()
                        ),
                    ),
                    Event::Lost { error } => (
                        log::Level::Warn,
                        format!(
                            "source `{source}`: {who}: {error}; reconnecting each within {:.1} s, and on with backoff",
                            g.wait.as_secs_f64()
                        ),
                    ),
                    Event::Back { first } => (
                        log::Level::Info,
                        format!(
                            "source `{source}`: {who} {} connected{}",
                            if single { "is" } else { "are" },
                            if first { "" } else { " again" }
                        ),
                    ),
                }
            })
            .collect()
    }
}

/// "stream spin30", "all 12 streams", or "3 streams (spin30, spin31,
/// spin32)", naming at most [`NAMES_MAX`].
fn who(names: &[String], streams: usize) -> String {
    match names {
        [one] => format!("stream {one}"),
        _ if names.len() == streams => format!("all {streams} streams"),
        _ => {
            let shown = names[..names.len().min(NAMES_MAX)].join(", ");
            let more = names.len().saturating_sub(NAMES_MAX);
            if more > 0 {
                format!("{} streams ({shown} and {more} more)", names.len())
            } else {
                format!("{} streams ({shown})", names.len())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESET: &str = "connection lost: Connection reset";
    const REFUSED: &str = "cannot connect to 127.0.0.1:8888: Connection refused";

    /// One event, all at one moment: a loss (stream, error, wait in ms) or
    /// a return (stream, for the first time).
    enum Ev {
        Lost(String, &'static str, u64),
        Back(String, bool),
    }
    use Ev::{Back, Lost};

    fn lost(s: &str, error: &'static str, wait_ms: u64) -> Ev {
        Lost(s.to_owned(), error, wait_ms)
    }

    fn back(s: &str) -> Ev {
        Back(s.to_owned(), false)
    }

    /// What is said of `events` for a source of `streams` streams.
    fn check(events: Vec<Ev>, streams: usize, want: &[&str]) {
        let mut n = News::default();
        for e in events {
            match e {
                Lost(s, error, wait) => n.lost(&s, error, ms(wait), at(0)),
                Back(s, first) => n.back(&s, first, at(0)),
            }
        }
        let said: Vec<String> = n
            .lines("lab", streams, None)
            .into_iter()
            .map(|(level, line)| format!("{level} {line}"))
            .collect();
        assert_eq!(said, want);
        assert!(n.is_empty());
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// `n` ms after a fixed start.
    fn at(n: u64) -> Instant {
        static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
        *START + ms(n)
    }

    #[test]
    fn a_host_that_drops_every_stream_is_two_lines() {
        let names: Vec<String> = (30..42).map(|k| format!("spin{k}")).collect();
        let losses = names
            .iter()
            .enumerate()
            .map(|(k, s)| lost(s, RESET, 100 * k as u64));
        let returns = names.iter().rev().map(|s| back(s));
        check(
            losses.chain(returns).collect(),
            12,
            &[
                "WARN source `lab`: all 12 streams: connection lost: Connection reset; reconnecting each within 1.1 s, and on with backoff",
                "INFO source `lab`: all 12 streams are connected again",
            ],
        );
    }

    #[test]
    fn one_stream_reads_as_it_did_alone() {
        check(
            vec![lost("spin30", RESET, 600)],
            12,
            &[
                "WARN source `lab`: stream spin30: connection lost: Connection reset; reconnecting in 0.6 s, and on with backoff",
            ],
        );
        check(
            vec![back("spin30")],
            12,
            &["INFO source `lab`: stream spin30 is connected again"],
        );
    }

    #[test]
    fn streams_are_named_up_to_ten_and_other_errors_get_their_own_line() {
        let mut events: Vec<Ev> = (0..13)
            .map(|k| lost(&format!("s{k}"), RESET, 200))
            .collect();
        events.extend([lost("s20", REFUSED, 300), lost("s21", REFUSED, 100)]);
        events.extend([back("s0"), back("s1")]);
        check(
            events,
            40,
            &[
                "WARN source `lab`: 13 streams (s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 and 3 more): connection lost: Connection reset; reconnecting each within 0.2 s, and on with backoff",
                "WARN source `lab`: 2 streams (s20, s21): cannot connect to 127.0.0.1:8888: Connection refused; reconnecting each within 0.3 s, and on with backoff",
                "INFO source `lab`: 2 streams (s0, s1) are connected again",
            ],
        );
    }

    #[test]
    fn each_streams_own_events_keep_their_order() {
        // a and b drop; a comes back and drops again; b comes back; c drops.
        check(
            vec![
                lost("a", RESET, 100),
                lost("b", RESET, 100),
                back("a"),
                lost("a", RESET, 200),
                back("b"),
                lost("c", RESET, 300),
            ],
            3,
            &[
                "WARN source `lab`: 2 streams (a, b): connection lost: Connection reset; reconnecting each within 0.1 s, and on with backoff",
                "INFO source `lab`: 2 streams (a, b) are connected again",
                "WARN source `lab`: 2 streams (a, c): connection lost: Connection reset; reconnecting each within 0.3 s, and on with backoff",
            ],
        );
    }

    #[test]
    fn streams_that_never_were_connected_are_connected_not_connected_again() {
        check(
            vec![
                lost("a", REFUSED, 1000),
                lost("b", REFUSED, 1000),
                Back("a".to_owned(), true),
                Back("b".to_owned(), true),
                back("c"),
            ],
            3,
            &[
                "WARN source `lab`: 2 streams (a, b): cannot connect to 127.0.0.1:8888: Connection refused; reconnecting each within 1.0 s, and on with backoff",
                "INFO source `lab`: 2 streams (a, b) are connected",
                "INFO source `lab`: stream c is connected again",
            ],
        );
    }

    #[test]
    fn nothing_to_say_is_no_line() {
        check(vec![], 12, &[]);
    }

    #[test]
    fn each_line_is_due_once_quiet_or_at_most_gather_max_after_its_first_stream() {
        let mut n = News::default();
        assert_eq!(n.due(), None);
        // A host drops two streams: the loss is due QUIET after the last.
        n.lost("a", RESET, ms(500), at(0));
        n.lost("b", RESET, ms(500), at(5));
        assert_eq!(n.due(), Some(at(5) + QUIET));
        // Returns 400 ms apart keep theirs gathering, up to GATHER_MAX.
        for k in 1..=20 {
            n.back(["a", "b"][k as usize % 2], false, at(400 * k));
        }
        assert!(n.lines("lab", 2, Some(at(4) + QUIET)).is_empty());
        assert_eq!(
            n.lines("lab", 2, Some(at(5) + QUIET)),
            [(
                log::Level::Warn,
                "source `lab`: all 2 streams: connection lost: Connection reset; reconnecting each within 0.5 s, and on with backoff".to_owned()
            )]
        );
        assert_eq!(n.due(), Some(at(400) + GATHER_MAX));
        assert_eq!(n.lines("lab", 2, Some(at(400) + GATHER_MAX)).len(), 1);
        assert_eq!(n.due(), None);
        // Said, the next event starts anew.
        n.back("b", false, at(10_000));
        assert_eq!(n.due(), Some(at(10_000) + QUIET));
    }
}
