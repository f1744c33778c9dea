//! The upstream batch: what an edge's `upstream` sink POSTs to
//! `/v1/batches` and what `edgemeter upstream` accepts. One format, used by
//! both sides, so they cannot drift apart.
//!
//! Version 1 is a JSON object, sent gzip-compressed:
//! ```text
//! { "v": 1, "agent_id": "gw-17", "outbox_id": "5f0c…", "seq": 42,
//!   "points":   [{"metric", "dims": {k: v}, "ts", "value", "unit"}],
//!   "sketches": [{"metric", "dims", "ts", "unit", "sketch": "<base64 envelope>"}],
//!   "events":   [{"type", "dims", "ts", "payload": <the event's JSON>}] }
//! ```
//! The idempotency key is `(agent_id, outbox_id, seq)`: `seq` is the
//! outbox's stable batch number for this sink, and `outbox_id` is
//! `<id>.<sink name>`, where the id is drawn when the outbox file is
//! created. So an edge whose state was wiped (a reinstall, a corrupt file
//! moved aside) starts a new sequence instead of having its fresh batches
//! 1, 2, 3… dropped as duplicates of the old ones, and two upstream sinks of
//! one edge (which batch independently) never share a key.
//!
//! [`decode`] is the server's gate: everything an edge can get wrong is
//! refused here with a message that says what and where, before anything
//! touches the store.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::record::{Dims, Kind, MAX_EVENT_DEPTH, Record, nests_deeper_than};
use crate::sketch::Sketch;

pub const VERSION: u32 = 1;
pub const PATH: &str = "/v1/batches";
/// Records one batch may carry (the sink's `batch_max_records` is capped to it).
pub const MAX_RECORDS: usize = 50_000;
const MAX_METRIC_LEN: usize = 255;
const MAX_DIMS: usize = 30;
const MAX_DIM_KEY_LEN: usize = 255;
const MAX_DIM_VALUE_LEN: usize = 1024;
const MAX_UNIT_LEN: usize = 32;
const MAX_ID_LEN: usize = 64;
/// The outbox id and the sink's name (`<32 hex>.<sink>`).
const MAX_OUTBOX_ID_LEN: usize = 160;
/// A timestamp more than this far ahead of the upstream's clock is refused.
pub const MAX_FUTURE_MS: i64 = 24 * 3600 * 1000;

/// The batch's JSON, both ways. Read, its strings borrow from the body
/// where they have no escapes, and each record's dims are kept as their raw
/// text until [`decode`] turns each distinct text into [`Dims`] once: a
/// point then costs two allocations (its name and unit), where a map per
/// point cost a dozen, freed on the store's thread.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireBatch<'a> {
    v: u32,
    #[serde(borrow)]
    agent_id: Cow<'a, str>,
    #[serde(borrow)]
    outbox_id: Cow<'a, str>,
    seq: i64,
    #[serde(default, borrow)]
    points: Vec<WirePoint<'a>>,
    #[serde(default, borrow)]
    sketches: Vec<WireSketch<'a>>,
    #[serde(default, borrow)]
    events: Vec<WireEvent<'a>>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WirePoint<'a> {
    #[serde(borrow)]
    metric: Cow<'a, str>,
    #[serde(default, borrow)]
    dims: WireDims<'a>,
    ts: i64,
    value: f64,
    #[serde(borrow)]
    unit: Cow<'a, str>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSketch<'a> {
    #[serde(borrow)]
    metric: Cow<'a, str>,
    #[serde(default, borrow)]
    dims: WireDims<'a>,
    ts: i64,
    #[serde(borrow)]
    unit: Cow<'a, str>,
    #[serde(borrow)]
    sketch: Cow<'a, str>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    dims: WireDims<'a>,
    ts: i64,
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// A record's dims: written from its [`Dims`] as an object, read as the
/// object's raw text (checked and parsed by [`decode`]).
#[derive(Default)]
enum WireDims<'a> {
    #[default]
    Absent,
    Pairs(&'a Dims),
    Raw(&'a RawValue),
}

impl Serialize for WireDims<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            WireDims::Absent => s.collect_map(std::iter::empty::<(&str, &str)>()),
            WireDims::Pairs(d) => s.collect_map(d.pairs().iter().map(|(k, v)| (k, v))),
            WireDims::Raw(r) => r.serialize(s),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for WireDims<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(d).map(WireDims::Raw)
    }
}

/// A batch as the edge knows it.
pub struct Key<'a> {
    pub agent_id: &'a str,
    pub outbox_id: &'a str,
    pub seq: i64,
}

/// A batch the server accepted the shape of: records ready for the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub agent_id: String,
    pub outbox_id: String,
    pub seq: i64,
    /// Points, sketches (payload = the envelope, value = its estimate) and
    /// events (payload = the event's JSON), in the order sent.
    pub records: Vec<Record>,
}

/// The JSON text of a batch (the sink gzips it). Records of kinds the
/// upstream does not take (lines) are left out; the sink never asks for them.
pub fn encode<'r>(key: &Key<'_>, records: impl IntoIterator<Item = &'r Record>) -> String {
    let records: Vec<&Record> = records.into_iter().collect();
    let payloads: Vec<Box<RawValue>> = records
        .iter()
        .filter(|r| r.kind == Kind::Event)
        .map(|r| event_payload(&r.payload))
        .collect();
    let mut payloads = payloads.iter();
    let mut batch = WireBatch {
        v: VERSION,
        agent_id: key.agent_id.into(),
        outbox_id: key.outbox_id.into(),
        seq: key.seq,
        points: Vec::new(),
        sketches: Vec::new(),
        events: Vec::new(),
    };
    for r in records {
        match r.kind {
            Kind::Point => batch.points.push(WirePoint {
                metric: r.name.as_ref().into(),
                dims: WireDims::Pairs(&r.dims),
                ts: r.ts_ms,
                value: r.value,
                unit: r.unit.as_ref().into(),
            }),
            Kind::Sketch => batch.sketches.push(WireSketch {
                metric: r.name.as_ref().into(),
                dims: WireDims::Pairs(&r.dims),
                ts: r.ts_ms,
                unit: r.unit.as_ref().into(),
                sketch: B64.encode(&r.payload).into(),
            }),
            Kind::Event => batch.events.push(WireEvent {
                kind: r.name.as_ref().into(),
                dims: WireDims::Pairs(&r.dims),
                ts: r.ts_ms,
                payload: payloads.next().expect("one payload per event"),
            }),
            Kind::Line => {}
        }
    }
    serde_json::to_string(&batch).expect("a batch of strings and numbers always serializes")
}

/// An event's payload as JSON: the bytes themselves when they are JSON (the
/// relay stores the exact text it received), otherwise a JSON string of them.
fn event_payload(bytes: &[u8]) -> Box<RawValue> {
    let text = String::from_utf8_lossy(bytes);
    serde_json::from_str::<Box<RawValue>>(&text).unwrap_or_else(|_| {
        let quoted = serde_json::to_string(&text).expect("a string serializes");
        RawValue::from_string(quoted).expect("a JSON string is JSON")
    })
}

/// Why a request body is not a batch: the text goes back to the edge in the
/// 4xx answer, so it says what and where.
#[derive(Debug, Clone, PartialEq)]
pub enum Invalid {
    /// The body is not gzip, or is cut short.
    Gzip(String),
    /// It unpacks to more than the server takes.
    TooLarge(usize),
    /// Not JSON, or not a batch's shape (with serde's line and column).
    Shape(String),
    /// A batch version this server does not read.
    Version(u32),
    /// The batch is well-formed JSON but a value is out of bounds.
    Value(String),
    /// A sketch this server cannot merge (version, hash, seed, precision).
    Sketch(String),
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Gzip(e) => write!(f, "the body is not valid gzip: {e}"),
            Invalid::TooLarge(max) => write!(f, "the body unpacks to more than {max} bytes"),
            Invalid::Shape(e) => write!(f, "the body is not an upstream batch: {e}"),
            Invalid::Version(v) => write!(
                f,
                "batch version {v} is not supported (this upstream reads version {VERSION}); upgrade the upstream"
            ),
            Invalid::Value(e) => write!(f, "{e}"),
            Invalid::Sketch(e) => write!(f, "{e}"),
        }
    }
}

/// Unpack a gzip body, reading at most `max` bytes of JSON (a small body can
/// unpack to gigabytes: the bound is on what comes out).
pub fn gunzip(body: &[u8], max: usize) -> Result<Vec<u8>, Invalid> {
    let mut out = Vec::with_capacity((body.len() * 4).min(max));
    let mut dec = flate2::read::GzDecoder::new(body).take(max as u64 + 1);
    dec.read_to_end(&mut out)
        .map_err(|e| Invalid::Gzip(e.to_string()))?;
    if out.len() > max {
        return Err(Invalid::TooLarge(max));
    }
    Ok(out)
}

/// Check a batch's JSON and turn it into records. `now_ms` is the server's
/// clock, for refusing timestamps from the far future.
pub fn decode(json: &[u8], now_ms: i64) -> Result<Batch, Invalid> {
    let w: WireBatch = match serde_json::from_slice(json) {
        Ok(w) => w,
        Err(e) => {
            // A future format fails the shape: say it is a version instead.
            #[derive(Deserialize)]
            struct Version {
                v: Option<u32>,
            }
            if let Ok(Version { v: Some(v) }) = serde_json::from_slice::<Version>(json)
                && v != VERSION
            {
                return Err(Invalid::Version(v));
            }
            return Err(Invalid::Shape(e.to_string()));
        }
    };
    if w.v != VERSION {
        return Err(Invalid::Version(w.v));
    }
    let bad = |m: String| Err(Invalid::Value(m));
    if !valid_id(&w.agent_id, MAX_ID_LEN) {
        return bad(format!(
            "agent_id `{}` must be 1 to {MAX_ID_LEN} letters, digits, `-`, `_` or `.`",
            truncate(&w.agent_id)
        ));
    }
    if !valid_id(&w.outbox_id, MAX_OUTBOX_ID_LEN) {
        return bad(format!(
            "outbox_id `{}` must be 1 to {MAX_OUTBOX_ID_LEN} letters, digits, `-`, `_` or `.`",
            truncate(&w.outbox_id)
        ));
    }
    if w.seq < 1 {
        return bad(format!("seq {} must be 1 or more", w.seq));
    }
    let n = w.points.len() + w.sketches.len() + w.events.len();
    if n > MAX_RECORDS {
        return bad(format!("{n} records in one batch; at most {MAX_RECORDS}"));
    }
    let mut dims = DimsSeen::default();
    let mut records = Vec::with_capacity(n);
    for (i, p) in w.points.into_iter().enumerate() {
        let at = || format!("points[{i}]");
        check_series(&at, &p.metric, p.ts, &p.unit, now_ms)?;
        if !p.value.is_finite() {
            return bad(format!("{}: value must be a finite number", at()));
        }
        records.push(Record {
            kind: Kind::Point,
            ts_ms: p.ts,
            name: p.metric.into_owned().into(),
            dims: dims.get(&p.dims, &at)?,
            value: p.value,
            unit: p.unit.into_owned().into(),
            payload: Vec::new(),
        });
    }
    for (i, s) in w.sketches.into_iter().enumerate() {
        let at = || format!("sketches[{i}]");
        check_series(&at, &s.metric, s.ts, &s.unit, now_ms)?;
        let bytes = B64
            .decode(s.sketch.as_bytes())
            .map_err(|e| Invalid::Value(format!("{}: sketch is not base64: {e}", at())))?;
        let sketch = Sketch::decode(&bytes).map_err(|e| {
            Invalid::Sketch(format!("{}: {e}; this upstream cannot merge it", at()))
        })?;
        records.push(Record {
            kind: Kind::Sketch,
            ts_ms: s.ts,
            name: s.metric.into_owned().into(),
            dims: dims.get(&s.dims, &at)?,
            value: sketch.estimate(),
            unit: s.unit.into_owned().into(),
            payload: bytes,
        });
    }
    for (i, e) in w.events.into_iter().enumerate() {
        let at = || format!("events[{i}]");
        check_series(&at, &e.kind, e.ts, "None", now_ms)?;
        if nests_deeper_than(e.payload.get(), MAX_EVENT_DEPTH) {
            return Err(Invalid::Value(format!(
                "{}: payload nests deeper than {MAX_EVENT_DEPTH} levels",
                at()
            )));
        }
        records.push(Record {
            kind: Kind::Event,
            ts_ms: e.ts,
            name: e.kind.into_owned().into(),
            dims: dims.get(&e.dims, &at)?,
            value: 0.0,
            unit: "None".into(),
            payload: e.payload.get().as_bytes().to_vec(),
        });
    }
    Ok(Batch {
        agent_id: w.agent_id.into_owned(),
        outbox_id: w.outbox_id.into_owned(),
        seq: w.seq,
        records,
    })
}

/// The distinct dims of one batch, by their raw text: an edge sends the
/// same few dims on many records, so each text is parsed and checked once
/// and its records share one [`Dims`].
#[derive(Default)]
struct DimsSeen<'a>(foldhash::HashMap<&'a str, Dims>);

impl<'a> DimsSeen<'a> {
    fn get(&mut self, wire: &WireDims<'a>, at: &dyn Fn() -> String) -> Result<Dims, Invalid> {
        let raw = match wire {
            WireDims::Raw(raw) => raw.get(),
            WireDims::Absent | WireDims::Pairs(_) => return Ok(Dims::default()),
        };
        if let Some(d) = self.0.get(raw) {
            return Ok(d.clone());
        }
        let map: BTreeMap<String, String> =
            serde_json::from_str(raw).map_err(|e| Invalid::Shape(format!("{}.dims: {e}", at())))?;
        check_dims(&map).map_err(|m| Invalid::Value(format!("{}: {m}", at())))?;
        let d = Dims::new(map);
        self.0.insert(raw, d.clone());
        Ok(d)
    }
}

fn valid_id(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// At most 64 characters of something an edge sent, for an error message.
fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

fn check_series(
    at: &dyn Fn() -> String,
    name: &str,
    ts: i64,
    unit: &str,
    now_ms: i64,
) -> Result<(), Invalid> {
    let fail = |m: String| Err(Invalid::Value(format!("{}: {m}", at())));
    if name.is_empty() || name.len() > MAX_METRIC_LEN {
        return fail(format!("the name must be 1 to {MAX_METRIC_LEN} bytes"));
    }
    if !(0..=now_ms + MAX_FUTURE_MS).contains(&ts) {
        return fail(format!(
            "ts {ts} is before 1970 or more than a day ahead of this upstream's clock"
        ));
    }
    if unit.len() > MAX_UNIT_LEN {
        return fail(format!("unit must be at most {MAX_UNIT_LEN} bytes"));
    }
    Ok(())
}

fn check_dims(dims: &BTreeMap<String, String>) -> Result<(), String> {
    if dims.len() > MAX_DIMS {
        return Err(format!("{} dimensions; at most {MAX_DIMS}", dims.len()));
    }
    for (k, v) in dims {
        if k.is_empty() || k.len() > MAX_DIM_KEY_LEN || v.len() > MAX_DIM_VALUE_LEN {
            return Err(format!(
                "dimension `{}` must have a 1 to {MAX_DIM_KEY_LEN} byte name and a value of at most {MAX_DIM_VALUE_LEN} bytes",
                truncate(k)
            ));
        }
    }
    Ok(())
}
