//! The answering desk of a relay source with `answer_requests = true`:
//! which dashboard `request` is answered, which is refused and why, where
//! the answer goes, and the `feedback` counts kept per user×exp×course.
//! No IO: the stream tasks send what [`Desk::take_outgoing`] returns on the
//! stream the request came from, and the flush saves the changed feedback.
//!
//! # Bounds
//! - Per stream at most [`STREAM_RATE`] requests a second (burst
//!   [`STREAM_BURST`]); per user [`USER_RATE`] (burst [`USER_BURST`]).
//! - At most [`MAX_QUEUED_FRAMES`] answer frames wait per stream; an answer
//!   frame is at most [`MAX_ANSWER_BYTES`] (matrices are at most
//!   [`answers::MAX_NODES`] nodes, so answers stay far below it).
//! - Feedback matrices: at most `max_users` of them.
//!
//! Answering costs a few microseconds of arithmetic on 6×6 matrices per
//! request, on the stream's own task; nothing waits for the disk.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde_json::Value;

use super::analytics::{Analytics, GraphKey, safe_name};
use super::answers::{self, Comparisons, Content, Feedback, Inputs, Request};
use crate::sketch::hash_str;

pub const STREAM_RATE: f64 = 20.0;
pub const STREAM_BURST: f64 = 40.0;
pub const USER_RATE: f64 = 1.0;
pub const USER_BURST: f64 = 10.0;
pub const MAX_QUEUED_FRAMES: usize = 64;
pub const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// Users whose rate is tracked; past this, idle ones are forgotten.
const MAX_TRACKED_USERS: usize = 10_000;

/// Why a request got no answer, as counted and shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refused {
    /// Not a request the client would read: no user, exp, course or
    /// payload, names that are not plain, an unknown content.
    Malformed,
    UserRate,
    StreamRate,
    /// The stream's answers are not being taken by the session host.
    QueueFull,
    /// The client would have failed: a missing comparison graph, an
    /// experiment without one, a graph of the wrong shape.
    Unanswerable,
}

impl Refused {
    pub const ALL: [Refused; 5] = [
        Refused::Malformed,
        Refused::UserRate,
        Refused::StreamRate,
        Refused::QueueFull,
        Refused::Unanswerable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::UserRate => "user_rate",
            Refused::StreamRate => "stream_rate",
            Refused::QueueFull => "queue_full",
            Refused::Unanswerable => "unanswerable",
        }
    }
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

impl Bucket {
    fn full(burst: f64, now_ms: i64) -> Bucket {
        Bucket {
            tokens: burst,
            at_ms: now_ms,
        }
    }

    fn take(&mut self, rate: f64, burst: f64, now_ms: i64) -> bool {
        let elapsed = (now_ms - self.at_ms).max(0) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at_ms = now_ms;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Lifetime counters, for `status` and the window's points.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    /// Requests answered in full, by content.
    pub answered: BTreeMap<Content, u64>,
    pub refused: BTreeMap<Refused, u64>,
    pub feedback_kept: u64,
    pub feedback_refused: u64,
    /// Answer frames not sent: over the size or queue bound, or not taken
    /// by the host in time.
    pub frames_unsent: u64,
}

/// Per content answered, per reason refused, in one window.
pub type WindowCounts = (Vec<(Content, u64)>, Vec<(Refused, u64)>);

pub struct Desk {
    comparisons: Comparisons,
    feedback: HashMap<GraphKey, Feedback>,
    dirty: HashSet<GraphKey>,
    max_feedback: usize,
    streams: Vec<Bucket>,
    users: HashMap<u64, Bucket>,
    outgoing: Vec<VecDeque<String>>,
    pub counts: Counts,
    /// `counts` when the running window began.
    at_window_start: Counts,
}

impl Desk {
    pub fn new(
        comparisons: Comparisons,
        feedback: HashMap<GraphKey, Feedback>,
        streams: usize,
        max_users: usize,
    ) -> Desk {
        Desk {
            comparisons,
            feedback,
            dirty: HashSet::new(),
            max_feedback: max_users,
            streams: vec![Bucket::full(STREAM_BURST, 0); streams],
            users: HashMap::new(),
            outgoing: vec![VecDeque::new(); streams],
            counts: Counts::default(),
            at_window_start: Counts::default(),
        }
    }

    pub fn feedback_keys(&self) -> HashSet<GraphKey> {
        self.feedback.keys().cloned().collect()
    }

    /// Take feedback the old client left, for keys not known.
    pub fn adopt_feedback(&mut self, key: GraphKey, f: Feedback) -> bool {
        if self.feedback.contains_key(&key) || self.feedback.len() >= self.max_feedback {
            return false;
        }
        self.dirty.insert(key.clone());
        self.feedback.insert(key, f);
        true
    }

    /// A `feedback` message: count its state × subject for the user.
    pub fn feedback(&mut self, text: &str) {
        let kept = (|| {
            let m: Value = serde_json::from_str(text).ok()?;
            let key = key_of(&m)?;
            let state = m["payload"]["state"].as_str()?;
            let subject = m["payload"]["subject"].as_str()?;
            if !self.feedback.contains_key(&key) && self.feedback.len() >= self.max_feedback {
                return None;
            }
            let f = self
                .feedback
                .entry(key.clone())
                .or_insert_with(|| Feedback::new(&key.exp, &key.course));
            f.add(state, subject).ok()?;
            self.dirty.insert(key);
            Some(())
        })();
        match kept {
            Some(()) => self.counts.feedback_kept += 1,
            None => self.counts.feedback_refused += 1,
        }
    }

    /// A `request` message on stream `i`: queue its answer there, or count
    /// why not.
    pub fn request(&mut self, i: usize, text: &str, analytics: &Analytics, now_ms: i64) {
        let Some(req) = parse(text) else {
            return self.refuse(Refused::Malformed);
        };
        if !self.streams[i].take(STREAM_RATE, STREAM_BURST, now_ms) {
            return self.refuse(Refused::StreamRate);
        }
        if self.users.len() >= MAX_TRACKED_USERS {
            // Forget the users whose bucket has refilled: they lose nothing.
            let full_after = (USER_BURST / USER_RATE * 1000.0) as i64;
            self.users.retain(|_, b| now_ms - b.at_ms < full_after);
        }
        let user = self
            .users
            .entry(hash_str(&req.user))
            .or_insert(Bucket::full(USER_BURST, now_ms));
        if !user.take(USER_RATE, USER_BURST, now_ms) {
            return self.refuse(Refused::UserRate);
        }
        if self.outgoing[i].len() >= MAX_QUEUED_FRAMES {
            return self.refuse(Refused::QueueFull);
        }
        let key = GraphKey {
            user: req.user.clone(),
            exp: req.exp.clone(),
            course: req.course.clone(),
        };
        let graph = analytics.graph(&key);
        let inputs = Inputs {
            graph: graph.as_ref(),
            feedback: self.feedback.get(&key),
            comparisons: &self.comparisons,
        };
        let (frames, failed) = answers::answer(&req, &inputs);
        let room = MAX_QUEUED_FRAMES - self.outgoing[i].len();
        let n = frames.len() as u64;
        let frames: Vec<String> = frames
            .into_iter()
            .filter(|f| f.len() <= MAX_ANSWER_BYTES)
            .take(room)
            .collect();
        // Too large, or past the queue's room: counted, never sent.
        self.counts.frames_unsent += n - frames.len() as u64;
        self.outgoing[i].extend(frames);
        match failed {
            None => *self.counts.answered.entry(req.content).or_default() += 1,
            Some(_) => self.refuse(Refused::Unanswerable),
        }
    }

    fn refuse(&mut self, why: Refused) {
        *self.counts.refused.entry(why).or_default() += 1;
    }

    /// Requests answered (by content) and refused (by reason) since the
    /// last call: every content and reason, zeros included.
    pub fn close_window(&mut self) -> WindowCounts {
        let (now, then) = (&self.counts, &self.at_window_start);
        let get = |m: &BTreeMap<Content, u64>, c| m.get(&c).copied().unwrap_or(0);
        let answered = Content::ALL
            .into_iter()
            .map(|c| (c, get(&now.answered, c) - get(&then.answered, c)))
            .collect();
        let getr = |m: &BTreeMap<Refused, u64>, r| m.get(&r).copied().unwrap_or(0);
        let refused = Refused::ALL
            .into_iter()
            .map(|r| (r, getr(&now.refused, r) - getr(&then.refused, r)))
            .collect();
        self.at_window_start = self.counts.clone();
        (answered, refused)
    }

    /// Answer frames waiting for stream `i`.
    pub fn take_outgoing(&mut self, i: usize) -> VecDeque<String> {
        std::mem::take(&mut self.outgoing[i])
    }

    pub fn has_outgoing(&self, i: usize) -> bool {
        !self.outgoing[i].is_empty()
    }

    /// Feedback changed since the last call, as the file's text.
    pub fn take_changed_feedback(&mut self) -> Vec<(GraphKey, String)> {
        self.dirty
            .drain()
            .filter_map(|k| self.feedback.get(&k).map(|f| (k.clone(), f.to_csv())))
            .collect()
    }

    /// Saving failed: mark them changed again.
    pub fn unsave(&mut self, keys: impl IntoIterator<Item = GraphKey>) {
        self.dirty.extend(keys);
    }
}

/// The user×exp×course of a message, if all three are plain names.
fn key_of(m: &Value) -> Option<GraphKey> {
    let get = |k: &str| m[k].as_str().filter(|s| safe_name(s)).map(str::to_owned);
    Some(GraphKey {
        user: get("user")?,
        exp: get("exp")?,
        course: get("course")?,
    })
}

/// A request as the client reads it (`mes['user']`, `mes['exp']`,
/// `mes['course']`, `mes['payload']['content']`, `graph`, `task`).
pub fn parse(text: &str) -> Option<Request> {
    let m: Value = serde_json::from_str(text).ok()?;
    let key = key_of(&m)?;
    let p = &m["payload"];
    let content = Content::parse(p["content"].as_str()?)?;
    let name = |k: &str| p[k].as_str().map(str::to_owned);
    Some(Request {
        user: key.user,
        exp: key.exp,
        course: key.course,
        content,
        graph: name("graph"),
        task: name("task"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desk() -> Desk {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/relay/answers/comparison_graphs");
        let (c, _) = Comparisons::load(&dir).unwrap();
        Desk::new(c, HashMap::new(), 2, 100)
    }

    fn request(user: &str, content: &str) -> String {
        serde_json::json!({"user": user, "exp": "spinner", "course": "engdes1",
            "type": "request", "payload": {"content": content, "graph": "spinner-engdes1-2"}})
        .to_string()
    }

    #[test]
    fn answers_go_to_the_stream_asked_and_all_feedback_is_five_frames() {
        let mut d = desk();
        let a = Analytics::new(10);
        d.request(1, &request("u1", "all_feedback"), &a, 0);
        assert!(!d.has_outgoing(0));
        let frames = d.take_outgoing(1);
        let contents: Vec<String> = frames
            .iter()
            .map(|f| {
                serde_json::from_str::<Value>(f).unwrap()["content"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            contents,
            [
                "student_graph",
                "comparison_graph",
                "task_identification",
                "indicators",
                "centroids"
            ]
        );
        assert_eq!(d.counts.answered[&Content::AllFeedback], 1);
        assert!(!d.has_outgoing(1));
    }

    #[test]
    fn users_and_streams_are_rate_limited_and_garbage_is_counted() {
        let mut d = desk();
        let a = Analytics::new(10);
        for _ in 0..15 {
            d.request(0, &request("u1", "indicators"), &a, 1_000);
        }
        assert_eq!(d.counts.answered[&Content::Indicators], 10);
        assert_eq!(d.counts.refused[&Refused::UserRate], 5);
        // One more a second later.
        d.request(0, &request("u1", "indicators"), &a, 2_000);
        assert_eq!(d.counts.answered[&Content::Indicators], 11);
        // Many users on one stream meet the stream's bound.
        d.take_outgoing(0);
        for u in 0..100 {
            d.request(0, &request(&format!("v{u}"), "centroids"), &a, 2_000);
            d.take_outgoing(0);
        }
        let stream_refused = d.counts.refused[&Refused::StreamRate];
        assert!((55..=70).contains(&stream_refused), "{stream_refused}");
        for bad in [
            "not json",
            r#"{"user":"u","exp":"spinner","course":"c","payload":{"content":"everything"}}"#,
            r#"{"user":"../u","exp":"spinner","course":"c","payload":{"content":"indicators"}}"#,
            r#"{"user":"u","exp":"spinner","payload":{"content":"indicators"}}"#,
        ] {
            d.request(1, bad, &a, 3_000);
        }
        assert_eq!(d.counts.refused[&Refused::Malformed], 4);
        assert!(!d.has_outgoing(1), "garbage is answered by nothing");
    }

    #[test]
    fn a_stream_whose_answers_are_not_taken_stops_queueing() {
        let mut d = desk();
        let a = Analytics::new(10);
        for u in 0..40 {
            d.request(0, &request(&format!("u{u}"), "all_feedback"), &a, 0);
        }
        assert_eq!(d.take_outgoing(0).len(), MAX_QUEUED_FRAMES);
        // 12 requests fit whole, the 13th has room for 4 of its 5 frames.
        assert_eq!(d.counts.frames_unsent, 1);
        assert_eq!(d.counts.refused[&Refused::QueueFull], 27);
    }

    #[test]
    fn feedback_is_kept_per_user_exp_course_and_bounded() {
        let mut d = desk();
        let fb = |user: &str, state: &str| {
            serde_json::json!({"user": user, "exp": "spinner", "course": "engdes1",
                "type": "feedback", "payload": {"state": state, "subject": "UI"}})
            .to_string()
        };
        d.feedback(&fb("u1", "Engaged"));
        d.feedback(&fb("u1", "Engaged"));
        d.feedback(&fb("u1", "Sleepy"));
        assert_eq!((d.counts.feedback_kept, d.counts.feedback_refused), (2, 1));
        let changed = d.take_changed_feedback();
        assert_eq!(changed.len(), 1);
        assert!(
            changed[0].1.contains("\nEngaged,0.0,0.0,0.0,2.0,"),
            "{}",
            changed[0].1
        );
        assert!(d.take_changed_feedback().is_empty());
        for u in 0..200 {
            d.feedback(&fb(&format!("w{u}"), "Curious"));
        }
        assert_eq!(d.feedback.len(), 100, "max_users bounds the matrices");
    }
}
