//! The data model every source produces and every sink consumes: points,
//! sketches, events and lines, all carried as one [`Record`] shape so the
//! outbox can store them in one table and deliver them in one order.

use std::borrow::Cow;
use std::fmt;

pub mod payloads;

/// How deep an event's JSON may nest (arrays and objects). Deeper
/// messages are not kept as events: the relay counts them malformed and
/// the upstream refuses a batch holding one (`422`), so that no reader of
/// stored events (serde's recursion limit is 128, browsers', jq's) meets a
/// payload it cannot parse back.
pub const MAX_EVENT_DEPTH: usize = 64;

/// The nesting depth of the JSON text `text` (0 for a scalar), counting
/// brackets outside strings; for valid JSON, which is all it is used on.
pub fn json_depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Whether `text` nests deeper than `max` ([`json_depth`]). Runs for every
/// event, so it first counts the opening brackets (the depth is never more
/// than their number) with `memchr`'s SIMD search. The release build is
/// optimised for size, which leaves a plain counting loop byte-at-a-time:
/// that was 3.7 % of the relay's CPU in `perf`.
pub fn nests_deeper_than(text: &str, max: usize) -> bool {
    let opening = memchr::memchr2_iter(b'{', b'[', text.as_bytes()).count();
    opening > max && json_depth(text) > max
}

/// What a record is. The discriminant is stored in SQLite: never renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A number at a time for a named series (`name` is the metric).
    Point = 1,
    /// A mergeable distinct-count; `payload` is the versioned sketch envelope,
    /// `value` its estimate.
    Sketch = 2,
    /// One raw message from a stream; `payload` is its JSON.
    Event = 3,
    /// One text line for a log-like sink (`name` is the log stream); `payload`
    /// holds the exact bytes.
    Line = 4,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Point, Kind::Sketch, Kind::Event, Kind::Line];

    pub fn from_code(code: i64) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as i64 == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Point => "point",
            Kind::Sketch => "sketch",
            Kind::Event => "event",
            Kind::Line => "line",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of kinds, as a bit mask (bit n = kind code n). Stored in SQLite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KindSet(u8);

impl KindSet {
    pub const ALL: KindSet = KindSet(0b1_1110);

    pub fn of(kinds: &[Kind]) -> KindSet {
        KindSet(kinds.iter().fold(0, |m, k| m | (1 << *k as u8)))
    }

    #[cfg(test)]
    pub fn contains(self, kind: Kind) -> bool {
        self.0 & (1 << kind as u8) != 0
    }

    pub fn bits(self) -> i64 {
        i64::from(self.0)
    }

    pub fn from_bits(bits: i64) -> KindSet {
        KindSet((bits as u8) & KindSet::ALL.0)
    }
}

/// Dimension pairs, kept sorted by key so that equal series compare equal.
/// Shared, not copied: every event of a stream carries the stream's dims,
/// so a clone is a reference count, and the canonical text the outbox
/// stores is built once, when the dims are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dims(std::sync::Arc<DimsInner>);

#[derive(Debug, PartialEq, Eq)]
struct DimsInner {
    pairs: Vec<(String, String)>,
    /// [`Dims::encode`]'s text.
    encoded: String,
}

impl Default for Dims {
    fn default() -> Dims {
        Dims::from_sorted(Vec::new())
    }
}

impl Dims {
    pub fn new<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Dims {
        let mut v: Vec<(String, String)> = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        v.sort();
        v.dedup_by(|a, b| a.0 == b.0);
        Dims::from_sorted(v)
    }

    fn from_sorted(pairs: Vec<(String, String)>) -> Dims {
        let encoded = encode(&pairs);
        Dims(std::sync::Arc::new(DimsInner { pairs, encoded }))
    }

    /// Whether `other` is the same shared dims (not merely equal ones).
    pub fn same(&self, other: &Dims) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.0.pairs
    }

    /// Canonical text form stored in the outbox: a JSON object with sorted
    /// keys, exactly serde_json's bytes.
    pub fn encoded(&self) -> &str {
        &self.0.encoded
    }

    /// [`Dims::encoded`], owned.
    pub fn encode(&self) -> String {
        self.0.encoded.clone()
    }

    /// These dims without the keys in `drop` (still sorted).
    pub fn without(&self, drop: &[String]) -> Dims {
        Dims::from_sorted(
            self.pairs()
                .iter()
                .filter(|(k, _)| !drop.iter().any(|d| d == k))
                .cloned()
                .collect(),
        )
    }

    pub fn decode(text: &str) -> Option<Dims> {
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text).ok()?;
        let mut pairs = Vec::with_capacity(map.len());
        for (k, v) in map {
            pairs.push((k, v.as_str()?.to_owned()));
        }
        Some(Dims::new(pairs))
    }
}

/// Sorted pairs as a JSON object. Written by hand: this ran for every
/// point the outbox and the upstream stored, and building a
/// `serde_json::Map` for it cost more than the insert.
fn encode(pairs: &[(String, String)]) -> String {
    let len: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 6).sum();
    let mut out = String::with_capacity(len + 2);
    out.push('{');
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_string(&mut out, k);
        out.push(':');
        json_string(&mut out, v);
    }
    out.push('}');
    out
}

/// `s` as a JSON string, escaped as serde_json escapes it.
fn json_string(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// One observation on its way from a source to the sinks.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub kind: Kind,
    /// Observation time, ms since the Unix epoch (UTC).
    pub ts_ms: i64,
    /// Metric name, event type or log stream, depending on `kind`.
    /// Borrowed where it is a constant (most are), so a record made per
    /// message allocates only its payload.
    pub name: Cow<'static, str>,
    pub dims: Dims,
    pub value: f64,
    /// CloudWatch-style unit name (`Count`, `Bytes`, `None`, ...).
    pub unit: Cow<'static, str>,
    pub payload: Vec<u8>,
}

impl Record {
    pub fn point(
        name: impl Into<Cow<'static, str>>,
        dims: Dims,
        ts_ms: i64,
        value: f64,
        unit: impl Into<Cow<'static, str>>,
    ) -> Record {
        Record {
            kind: Kind::Point,
            ts_ms,
            name: name.into(),
            dims,
            value,
            unit: unit.into(),
            payload: Vec::new(),
        }
    }

    /// The bytes this record is charged against `buffer_max_bytes`: its
    /// variable-length fields plus a fixed allowance for the row's integers
    /// and SQLite's per-row overhead.
    pub fn charged_bytes(&self, encoded_dims: &str) -> i64 {
        const ROW_OVERHEAD: usize = 48;
        (ROW_OVERHEAD + self.name.len() + encoded_dims.len() + self.unit.len() + self.payload.len())
            as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_depth_counts_brackets_outside_strings() {
        let check = |text: &str, want: usize| {
            assert_eq!(json_depth(text), want, "{text}");
            assert!(!nests_deeper_than(text, want), "{text}");
            assert_eq!(
                nests_deeper_than(text, want.saturating_sub(1)),
                want > 0,
                "{text}"
            );
        };
        check("1", 0);
        check(r#""[[[""#, 0);
        check("[]", 1);
        check(r#"{"a":[1,{"b":[]}]}"#, 4);
        check(r#"{"a":"\"[{"}"#, 1);
        check(r#"[{"x":"\\"},[[]]]"#, 3);
        check(&("[".repeat(100_000) + &"]".repeat(100_000)), 100_000);
        // Brackets far apart; brackets only in a string.
        check(&format!("[{}[[]]]", "1,".repeat(100)), 3);
        check(&format!("[\"{}\"]", "{[".repeat(100)), 1);
    }

    #[test]
    fn kind_codes_round_trip_and_are_stable() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_code(k as i64), Some(k));
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        // Stored in SQLite: these numbers are part of the on-disk format.
        assert_eq!(Kind::Point as i64, 1);
        assert_eq!(Kind::Line as i64, 4);
        assert_eq!(Kind::from_code(0), None);
        assert_eq!(Kind::from_code(5), None);
    }

    #[test]
    fn kind_set_membership() {
        let s = KindSet::of(&[Kind::Point, Kind::Sketch]);
        assert!(s.contains(Kind::Point));
        assert!(s.contains(Kind::Sketch));
        assert!(!s.contains(Kind::Event));
        assert_eq!(KindSet::from_bits(s.bits()), s);
        assert!(Kind::ALL.iter().all(|k| KindSet::ALL.contains(*k)));
        assert_eq!(KindSet::of(&Kind::ALL), KindSet::ALL);
    }

    #[test]
    fn dims_are_canonical_and_round_trip() {
        let a = Dims::new([("window", "30m"), ("gateway", "a,b=\"c\"")]);
        let b = Dims::new([("gateway", "a,b=\"c\""), ("window", "30m")]);
        assert_eq!(a, b);
        assert_eq!(a.encode(), r#"{"gateway":"a,b=\"c\"","window":"30m"}"#);
        assert_eq!(Dims::decode(&a.encode()), Some(a.clone()));
        assert_eq!(Dims::decode("not json"), None);
        // Byte for byte what serde_json writes, for every kind of character.
        let odd = Dims::new([("k\"\\", "a\nb\tc\r\u{8}\u{c}\u{1}\u{1f}é ✓")]);
        let map: serde_json::Map<String, serde_json::Value> = odd
            .pairs()
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        assert_eq!(odd.encode(), serde_json::Value::Object(map).to_string());
        assert_eq!(Dims::decode(&odd.encode()), Some(odd.clone()));
        assert_eq!(Dims::default().encode(), "{}");
        assert_eq!(
            a.without(&["gateway".to_owned()]),
            Dims::new([("window", "30m")])
        );
        assert_eq!(Dims::decode(r#"{"k":1}"#), None);
    }
}
