//! The decisions of the relay source, without IO: what a frame means
//! (counters, analytics, events to store), and what a closed window emits.
//! The tasks in `mod.rs` feed it frames and clock ticks and carry out what
//! it returns.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};

use super::analytics::{Analytics, Bound, safe_name};
use super::envelope::Envelope;
use super::frame::{self, SAMPLE_BYTES};
use super::link::Link;
use crate::record::{Dims, Kind, MAX_EVENT_DEPTH, Record, nests_deeper_than, payloads};
use crate::sketch::{Sketch, hash_str};

/// Malformed samples kept for `edgemeter status` (all of them also go to
/// the outbox as `relay_malformed` events).
pub const SAMPLES_KEPT: usize = 8;
/// Raw-file lines held between flushes; past this, lines are dropped and
/// counted (the disk is not keeping up).
pub const RAW_PENDING_MAX_BYTES: usize = 16 * 1024 * 1024;

/// One websocket message as it arrived.
pub enum Frame<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

/// Lifetime counters of one stream (shown by `edgemeter status`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Totals {
    pub frames: u64,
    pub messages: u64,
    pub bytes: u64,
    pub malformed: u64,
    pub binary: u64,
    pub oversized: u64,
    /// JSON values that are not logging envelopes (data-stream lines…).
    pub other: u64,
    /// Envelopes not analysed: unusable names or beyond `max_users`.
    pub untracked: u64,
    pub zero_width: u64,
    pub transitions: u64,
}

#[derive(Default)]
struct WindowCounts {
    frames: u64,
    zero_width: u64,
    messages: u64,
    bytes: u64,
    malformed: u64,
    users: Sketch,
}

pub struct Stream {
    pub name: String,
    /// `{source, stream}`, for this stream's events.
    dims: Dims,
    pub link: Link,
    pub totals: Totals,
    window: WindowCounts,
    reconnects_at_window_start: u64,
    stalls_at_window_start: u64,
}

/// Everything the relay source knows, shared by its tasks (one thread).
pub struct State {
    source: String,
    max_frame_bytes: usize,
    events: bool,
    raw_files: bool,
    pub streams: Vec<Stream>,
    all_users: Sketch,
    /// Windows closed so far: with a stream's index, the mark of a user
    /// already in that stream's sketch of the running window.
    windows_closed: u32,
    pub analytics: Analytics,
    /// Raw-file name → lines not yet appended.
    pub raw: BTreeMap<String, Vec<u8>>,
    raw_bytes: usize,
    pub raw_dropped: u64,
    /// With `raw_files = true`: what the raw files hold, as the last dump
    /// found them (None before it).
    pub raw_on_disk: Option<RawOnDisk>,
    pub samples: VecDeque<String>,
    /// With `answer_requests = true`: the dashboards' requests and feedback.
    pub desk: Option<super::desk::Desk>,
    /// The analytics' bounds met this run, in the order met, and how many
    /// of them were said ([`State::newly_full`]).
    full: Vec<Bound>,
    full_said: usize,
}

/// The raw files on disk and their bound ([`super::trim`]).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct RawOnDisk {
    /// What they held at the last look at their bound, by the marks.
    pub bytes: u64,
    /// Appended since that look: the bound is looked at again at the save
    /// that takes the two past it.
    pub appended: u64,
    /// `raw_files_max_bytes`.
    pub max: u64,
    /// Files cut to their last message this run, and what that gave back.
    pub cut_files: u64,
    pub cut_bytes: u64,
    /// That the files left after a cut are too small to cut was said,
    /// and they have not been within the bound since.
    pub short_said: bool,
}

impl RawOnDisk {
    /// What they hold now, as far as edgemeter appended to them.
    pub fn now(&self) -> u64 {
        self.bytes + self.appended
    }

    /// Whether a save that appends `more` bytes takes them past the bound,
    /// so that it looks at the bound at once, not at the next dump. Not
    /// while what is left is in files too small to cut: each dump looks.
    pub fn passed_by(&self, more: u64) -> bool {
        !self.short_said && self.now() + more > self.max
    }
}

pub struct Settings {
    pub source: String,
    pub max_frame_bytes: usize,
    pub events: bool,
    pub raw_files: bool,
    pub max_users: usize,
}

impl State {
    pub fn new(s: Settings, streams: Vec<(String, Link)>) -> State {
        State {
            source: s.source.clone(),
            max_frame_bytes: s.max_frame_bytes,
            events: s.events,
            raw_files: s.raw_files,
            streams: streams
                .into_iter()
                .map(|(name, link)| Stream {
                    dims: Dims::new([("source", s.source.as_str()), ("stream", name.as_str())]),
                    name,
                    link,
                    totals: Totals::default(),
                    window: WindowCounts::default(),
                    reconnects_at_window_start: 0,
                    stalls_at_window_start: 0,
                })
                .collect(),
            all_users: Sketch::default(),
            windows_closed: 0,
            analytics: Analytics::new(s.max_users),
            raw: BTreeMap::new(),
            raw_bytes: 0,
            raw_dropped: 0,
            raw_on_disk: None,
            samples: VecDeque::new(),
            desk: None,
            full: Vec::new(),
            full_said: 0,
        }
    }

    fn malformed(
        &mut self,
        i: usize,
        now_ms: i64,
        reason: &str,
        bytes: usize,
        sample: &str,
        out: &mut Vec<Record>,
    ) {
        let s = &mut self.streams[i];
        s.totals.malformed += 1;
        s.window.malformed += 1;
        let stream = s.name.clone();
        let dims = s.dims.clone();
        let text = serde_json::json!({
            "stream": stream,
            "reason": reason,
            "bytes": bytes,
            "sample": sample,
        })
        .to_string();
        if self.samples.len() == SAMPLES_KEPT {
            self.samples.pop_front();
        }
        self.samples
            .push_back(format!("{stream}: {reason}; {bytes} bytes: {sample:?}"));
        out.push(Record {
            kind: Kind::Event,
            ts_ms: now_ms,
            name: "relay_malformed".into(),
            dims,
            value: bytes as f64,
            unit: "Bytes".into(),
            payload: text.into_bytes(),
        });
    }

    /// One websocket message on stream `i`; records to store go to `out`.
    pub fn frame(&mut self, i: usize, frame: Frame, now_ms: i64, out: &mut Vec<Record>) {
        let len = match frame {
            Frame::Text(t) => t.len(),
            Frame::Binary(b) => b.len(),
        };
        {
            let s = &mut self.streams[i];
            s.totals.frames += 1;
            s.window.frames += 1;
            s.totals.bytes += len as u64;
            s.window.bytes += len as u64;
        }
        let text = match frame {
            Frame::Binary(b) => {
                self.streams[i].totals.binary += 1;
                let hex: String = b.iter().take(32).map(|x| format!("{x:02x}")).collect();
                self.malformed(i, now_ms, "binary frame", len, &hex, out);
                return;
            }
            Frame::Text(t) if t.len() > self.max_frame_bytes => {
                self.streams[i].totals.oversized += 1;
                let reason = format!(
                    "frame larger than max_frame_bytes = {}",
                    self.max_frame_bytes
                );
                self.malformed(
                    i,
                    now_ms,
                    &reason,
                    len,
                    frame::truncate(t, SAMPLE_BYTES),
                    out,
                );
                return;
            }
            Frame::Text(t) => t,
        };
        let rest =
            frame::split_each::<Envelope>(text, |raw, env| self.message(i, raw, env, now_ms, out));
        let s = &mut self.streams[i];
        s.totals.zero_width += u64::from(rest.zero_width);
        s.window.zero_width += u64::from(rest.zero_width);
        if let Some(g) = rest.garbage {
            self.malformed(i, now_ms, &g.reason, g.bytes, &g.sample, out);
        }
    }

    /// One JSON value of a frame, `env` if it is a logging envelope.
    fn message(
        &mut self,
        i: usize,
        text: &str,
        env: Option<Envelope>,
        now_ms: i64,
        out: &mut Vec<Record>,
    ) {
        let s = &mut self.streams[i];
        s.totals.messages += 1;
        s.window.messages += 1;
        let Some(env) = env else {
            s.totals.other += 1;
            return;
        };
        // The stream is the rig: the message's own `hardware` is cut out
        // of a URL by the browser, so it is used only when it is a usable
        // name (the raw files have always been named after it).
        let hardware = match env.hardware.as_deref() {
            Some(hw) if safe_name(hw) => std::borrow::Cow::Borrowed(hw),
            _ => std::borrow::Cow::Owned(s.name.clone()),
        };
        if let Some(desk) = &mut self.desk {
            match &*env.kind {
                "request" => desk.request(i, text, &self.analytics, now_ms),
                "feedback" => desk.feedback(text),
                _ => {}
            }
        }
        let seen = self.analytics.observe(now_ms, &hardware, &env);
        // A tracked user already in this window's sketch of this stream
        // (and so in all streams') is not inserted again.
        let mark = self.windows_closed.wrapping_mul(self.streams.len() as u32) + i as u32;
        if seen.user.is_none_or(|u| self.analytics.mark(u, mark)) {
            let h = hash_str(&env.user);
            self.streams[i].window.users.insert(h);
            self.all_users.insert(h);
        }
        if let Some(bound) = seen.full
            && !self.full.contains(&bound)
        {
            self.full.push(bound);
        }
        let s = &mut self.streams[i];
        s.totals.untracked += u64::from(seen.untracked);
        s.totals.transitions += u64::from(seen.transition);
        if self.raw_files
            && !seen.untracked
            && let (Some(exp), Some(course)) = (env.exp.as_deref(), env.course.as_deref())
            && safe_name(exp)
            && safe_name(course)
        {
            let file = format!("{}-{hardware}-{exp}-{course}.json", env.user);
            if self.raw_bytes + text.len() + 1 > RAW_PENDING_MAX_BYTES {
                self.raw_dropped += 1;
            } else {
                let buf = self.raw.entry(file).or_default();
                buf.extend_from_slice(text.as_bytes());
                buf.push(b'\n');
                self.raw_bytes += text.len() + 1;
            }
        }
        if self.events && nests_deeper_than(text, MAX_EVENT_DEPTH) {
            // Kept as a malformed sample instead: no reader of stored
            // events could parse it back.
            let why = format!("a message nested deeper than {MAX_EVENT_DEPTH} levels");
            self.malformed(
                i,
                now_ms,
                &why,
                text.len(),
                frame::truncate(text, SAMPLE_BYTES),
                out,
            );
        } else if self.events {
            out.push(Record {
                kind: Kind::Event,
                ts_ms: now_ms,
                name: event_name(&env.kind),
                dims: self.streams[i].dims.clone(),
                value: 0.0,
                unit: "None".into(),
                payload: payloads::copy_of(text.as_bytes()),
            });
        }
    }

    /// A frame too big for the websocket layer to read at all.
    pub fn unreadable(&mut self, i: usize, now_ms: i64, reason: &str, out: &mut Vec<Record>) {
        let s = &mut self.streams[i];
        s.totals.frames += 1;
        s.window.frames += 1;
        s.totals.oversized += 1;
        self.malformed(i, now_ms, reason, 0, "", out);
    }

    /// The analytics' bounds met since this was last asked, each once a
    /// run: from then on, messages of new users (or with new names) are
    /// counted, not analysed, which the caller says in the log.
    pub fn newly_full(&mut self) -> &[Bound] {
        let from = std::mem::replace(&mut self.full_said, self.full.len());
        &self.full[from..]
    }

    /// Whether the analytics refused a message for a bound this run.
    pub fn is_full(&self) -> bool {
        !self.full.is_empty()
    }

    /// Raw-file lines to append now (the caller writes them).
    /// The bytes of the raw lines waiting for the next flush.
    pub fn raw_pending_bytes(&self) -> u64 {
        self.raw_bytes as u64
    }

    pub fn take_raw(&mut self) -> BTreeMap<String, Vec<u8>> {
        self.raw_bytes = 0;
        std::mem::take(&mut self.raw)
    }

    /// The window ending at `end_ms` is over: its points and sketches.
    pub fn close_window(&mut self, end_ms: i64, window_secs: u64, out: &mut Vec<Record>) {
        let label = format!("{window_secs}s");
        let dims = |stream: &str| {
            Dims::new([
                ("source", self.source.as_str()),
                ("stream", stream),
                ("window", label.as_str()),
            ])
        };
        let mut points = Vec::new();
        for s in &mut self.streams {
            let w = std::mem::take(&mut s.window);
            let reconnects = s.link.reconnects - s.reconnects_at_window_start;
            s.reconnects_at_window_start = s.link.reconnects;
            let stalls = s.link.stalls - s.stalls_at_window_start;
            s.stalls_at_window_start = s.link.stalls;
            let d = dims(&s.name);
            for (metric, v, unit) in [
                ("relay_frames", w.frames as f64, "Count"),
                ("relay_messages", w.messages as f64, "Count"),
                ("relay_zero_width", w.zero_width as f64, "Count"),
                ("relay_stalls", stalls as f64, "Count"),
                ("relay_bytes", w.bytes as f64, "Bytes"),
                ("relay_malformed", w.malformed as f64, "Count"),
                ("relay_reconnects", reconnects as f64, "Count"),
                (
                    "relay_connected",
                    if s.link.is_live() { 1.0 } else { 0.0 },
                    "None",
                ),
            ] {
                points.push(Record::point(metric, d.clone(), end_ms, v, unit));
            }
            points.extend(users(d, end_ms, &w.users));
        }
        let all = std::mem::take(&mut self.all_users);
        self.windows_closed = self.windows_closed.wrapping_add(1);
        points.extend(users(dims("all"), end_ms, &all));
        if let Some(desk) = &mut self.desk {
            let (answered, refused) = desk.close_window();
            let d = |k: &str, v: &str| {
                Dims::new([
                    ("source", self.source.as_str()),
                    (k, v),
                    ("window", label.as_str()),
                ])
            };
            let answered = answered
                .into_iter()
                .map(|(c, n)| ("relay_requests_answered", d("content", c.as_str()), n));
            let refused = refused
                .into_iter()
                .map(|(r, n)| ("relay_requests_refused", d("reason", r.as_str()), n));
            for (metric, dims, n) in answered.chain(refused) {
                points.push(Record::point(metric, dims, end_ms, n as f64, "Count"));
            }
        }
        out.extend(points);
    }
}

/// The `type` values of practable's logging envelopes: the UI's `log` and
/// `analytics`, the dashboards' `request` and `feedback`, the analytics
/// server's `response`.
const KNOWN_TYPES: [&str; 5] = ["analytics", "log", "request", "feedback", "response"];

/// An event's name: its envelope's type. A known type is named by a
/// constant, not a copy (an allocation less per message); another usable
/// name is copied; anything else is `invalid_type`.
fn event_name(kind: &str) -> Cow<'static, str> {
    match KNOWN_TYPES.iter().find(|k| **k == kind) {
        Some(k) => Cow::Borrowed(k),
        None if safe_name(kind) => Cow::Owned(kind.to_owned()),
        None => Cow::Borrowed("invalid_type"),
    }
}

/// Distinct active users of a window: the count as a point, and the sketch
/// so an upstream can union edges.
fn users(dims: Dims, end_ms: i64, sketch: &Sketch) -> [Record; 2] {
    [
        Record::point(
            "relay_active_users",
            dims.clone(),
            end_ms,
            sketch.estimate(),
            "Count",
        ),
        Record {
            kind: Kind::Sketch,
            ts_ms: end_ms,
            name: "relay_active_users".into(),
            dims,
            value: sketch.estimate(),
            unit: "Count".into(),
            payload: sketch.encode(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_named_by_their_type_or_invalid_type() {
        let borrowed = |c: &Cow<'static, str>| matches!(c, Cow::Borrowed(_));
        for t in KNOWN_TYPES {
            let name = event_name(t);
            assert_eq!(name, t);
            assert!(borrowed(&name), "{t} is a constant");
        }
        assert_eq!(event_name("heartbeat"), "heartbeat");
        assert_eq!(event_name("x y"), "invalid_type");
        assert_eq!(event_name(""), "invalid_type");
        assert_eq!(event_name("Analytics"), "Analytics");
    }

    /// A save looks at the bound when its appends pass it, counting what
    /// earlier saves appended; not while the last look found only files
    /// too small to cut (each dump looks then, not every save).
    #[test]
    fn a_save_looks_at_the_raw_bound_when_it_passes_it() {
        let mut r = RawOnDisk {
            bytes: 900,
            max: 1000,
            ..RawOnDisk::default()
        };
        assert!(!r.passed_by(100), "at the bound is within it");
        assert!(r.passed_by(101));
        r.appended = 60;
        assert_eq!(r.now(), 960);
        assert!(!r.passed_by(40));
        assert!(r.passed_by(41));
        r.short_said = true;
        assert!(!r.passed_by(1_000_000));
    }
}
