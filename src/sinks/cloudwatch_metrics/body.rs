//! PutMetricData request bodies, built without I/O: folding points into
//! datums, what CloudWatch refuses, form encoding, splitting at the limits.

use std::collections::HashMap;

use crate::clock::iso8601;
use crate::record::Record;

pub const MAX_DATUMS: usize = 1000;
/// PutMetricData's payload limit (1 MB), applied to the uncompressed form
/// data so a request is never too large whatever gzip achieves.
pub const MAX_BODY_BYTES: usize = 1_000_000;
pub const MAX_VALUES: usize = 150;
pub const MAX_DIMENSIONS: usize = 30;
const MAX_AGE_MS: i64 = 14 * 86_400_000;
const MAX_AHEAD_MS: i64 = 2 * 3_600_000;
/// CloudWatch takes values within ±2^360.
const MAX_MAGNITUDE: f64 = 2.348_542_582_773_833_2e108;

#[derive(Debug, Clone, PartialEq)]
pub struct Datum {
    pub name: String,
    pub dims: Vec<(String, String)>,
    pub unit: String,
    pub ts_ms: i64,
    /// Distinct values and how often each occurred.
    pub values: Vec<(f64, u32)>,
    /// The records folded into it.
    pub ids: Vec<i64>,
}

/// (name, dims, unit, minute): points that fold into one datum.
type SeriesMinute = (String, Vec<(String, String)>, String, i64);

/// A point older than CloudWatch takes: skipped and counted, not kept as a
/// dead letter (no retry can ever deliver it).
pub const TOO_OLD: &str = "older than 14 days (CloudWatch takes at most two weeks back)";

/// Why a point is not sent.
enum Refusal {
    /// Older than CloudWatch takes: skipped and counted, never sendable.
    TooOld,
    /// CloudWatch would refuse it: kept as a dead letter with the reason.
    Invalid(String),
}

/// Why CloudWatch would refuse this point, if it would.
fn refusal(r: &Record, dims: &[(String, String)], now: i64) -> Option<Refusal> {
    if r.ts_ms < now - MAX_AGE_MS {
        return Some(Refusal::TooOld);
    }
    invalid(r, dims, now).map(Refusal::Invalid)
}

fn invalid(r: &Record, dims: &[(String, String)], now: i64) -> Option<String> {
    if !r.value.is_finite() {
        return Some(format!("value {} is not a finite number", r.value));
    }
    if r.value.abs() > MAX_MAGNITUDE {
        return Some(format!(
            "value {} is beyond CloudWatch's range of ±2^360",
            r.value
        ));
    }
    if r.ts_ms > now + MAX_AHEAD_MS {
        return Some("more than 2 hours in the future".into());
    }
    if r.name.is_empty() || r.name.len() > 255 {
        return Some(format!(
            "metric name of {} characters (1 to 255)",
            r.name.len()
        ));
    }
    if dims.len() > MAX_DIMENSIONS {
        return Some(format!(
            "{} dimensions (at most {MAX_DIMENSIONS})",
            dims.len()
        ));
    }
    dims.iter().find_map(|(k, v)| dimension_problem(k, v))
}

/// Why CloudWatch refuses a dimension (its API reference, `Dimension`):
/// the name 1 to 255 characters, the value 1 to 1024, both ASCII without
/// control characters and with at least one non-whitespace character, and
/// the name not starting with `:`. Such a datum would make CloudWatch
/// refuse the whole request.
pub fn dimension_problem(name: &str, value: &str) -> Option<String> {
    let bad = |s: &str, max: usize| {
        if s.is_empty() || s.len() > max {
            Some(format!("1 to {max} characters"))
        } else if !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            Some("ASCII without control characters".to_owned())
        } else if s.trim().is_empty() {
            Some("at least one character that is not a space".to_owned())
        } else {
            None
        }
    };
    if let Some(why) = bad(name, 255) {
        return Some(format!(
            "dimension name `{}` must be {why}",
            name.escape_debug()
        ));
    }
    if name.starts_with(':') {
        return Some(format!("dimension name `{name}` must not start with `:`"));
    }
    bad(value, 1024).map(|why| {
        format!(
            "dimension `{name}` value `{}` must be {why}",
            value.escape_debug()
        )
    })
}

/// What [`fold`] made of a batch's points.
#[derive(Debug, Default)]
pub struct Folded {
    pub datums: Vec<Datum>,
    /// (record id, why) CloudWatch would refuse: dead letters.
    pub rejected: Vec<(i64, String)>,
    /// (record id, [`TOO_OLD`]): skipped and counted.
    pub skipped: Vec<(i64, String)>,
}

/// Fold points into datums: one per series (name, dims, unit) and minute,
/// values counted; the points that cannot be sent, set aside with why.
pub fn fold(records: &[(i64, Record)], extra: &[(String, String)], now: i64) -> Folded {
    let mut datums: Vec<Datum> = Vec::new();
    let mut open: HashMap<SeriesMinute, usize> = HashMap::new();
    let (mut rejected, mut skipped) = (Vec::new(), Vec::new());
    for (id, r) in records {
        let mut dims: Vec<(String, String)> = r.dims.pairs().to_vec();
        for (k, v) in extra {
            if !dims.iter().any(|(dk, _)| dk == k) {
                dims.push((k.clone(), v.clone()));
            }
        }
        dims.sort();
        match refusal(r, &dims, now) {
            Some(Refusal::TooOld) => {
                skipped.push((*id, TOO_OLD.to_owned()));
                continue;
            }
            Some(Refusal::Invalid(why)) => {
                rejected.push((*id, why));
                continue;
            }
            None => {}
        }
        let key = (
            r.name.to_string(),
            dims,
            r.unit.to_string(),
            r.ts_ms.div_euclid(60_000),
        );
        let slot = open.get(&key).copied().filter(|&i| {
            let d = &datums[i];
            d.values.len() < MAX_VALUES || d.values.iter().any(|(v, _)| *v == r.value)
        });
        match slot {
            Some(i) => {
                let d = &mut datums[i];
                d.ts_ms = d.ts_ms.min(r.ts_ms);
                match d.values.iter_mut().find(|(v, _)| *v == r.value) {
                    Some((_, n)) => *n += 1,
                    None => d.values.push((r.value, 1)),
                }
                d.ids.push(*id);
            }
            None => {
                open.insert(key.clone(), datums.len());
                datums.push(Datum {
                    name: key.0,
                    dims: key.1,
                    unit: key.2,
                    ts_ms: r.ts_ms,
                    values: vec![(r.value, 1)],
                    ids: vec![*id],
                });
            }
        }
    }
    Folded {
        datums,
        rejected,
        skipped,
    }
}

/// Everything but RFC 3986's unreserved `A-Z a-z 0-9 - _ . ~`.
const AWS_FORM: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `application/x-www-form-urlencoded` the way AWS signs it: everything but
/// `A-Z a-z 0-9 - _ . ~` percent-encoded, in UTF-8 (by the
/// `percent-encoding` crate; not `form_urlencoded`, which writes a space as
/// `+` and leaves `*` as is).
pub fn form_encode(s: &str, out: &mut String) {
    out.extend(percent_encoding::utf8_percent_encode(s, AWS_FORM));
}

fn param(out: &mut String, key: &str, value: &str) {
    out.push('&');
    out.push_str(key);
    out.push('=');
    form_encode(value, out);
}

/// One datum's parameters, as member `n`.
pub fn encode_datum(n: usize, d: &Datum) -> String {
    let p = format!("MetricData.member.{n}");
    let mut out = String::with_capacity(160);
    param(&mut out, &format!("{p}.MetricName"), &d.name);
    for (i, (k, v)) in d.dims.iter().enumerate() {
        param(
            &mut out,
            &format!("{p}.Dimensions.member.{}.Name", i + 1),
            k,
        );
        param(
            &mut out,
            &format!("{p}.Dimensions.member.{}.Value", i + 1),
            v,
        );
    }
    param(&mut out, &format!("{p}.Timestamp"), &iso8601(d.ts_ms));
    param(&mut out, &format!("{p}.Unit"), &d.unit);
    match d.values.as_slice() {
        [(v, 1)] => param(&mut out, &format!("{p}.Value"), &v.to_string()),
        values => {
            for (i, (v, n)) in values.iter().enumerate() {
                param(
                    &mut out,
                    &format!("{p}.Values.member.{}", i + 1),
                    &v.to_string(),
                );
                param(
                    &mut out,
                    &format!("{p}.Counts.member.{}", i + 1),
                    &n.to_string(),
                );
            }
        }
    }
    out
}

/// Request bodies for `datums`, each within [`MAX_DATUMS`] and
/// [`MAX_BODY_BYTES`], with the ids of the records each carries.
pub fn bodies(namespace: &str, datums: &[Datum]) -> Vec<(String, Vec<i64>)> {
    let mut head = String::from("Action=PutMetricData&Version=2010-08-01");
    param(&mut head, "Namespace", namespace);
    let mut out = Vec::new();
    let (mut body, mut ids) = (head.clone(), Vec::new());
    let mut n = 0;
    for d in datums {
        let mut part = encode_datum(n + 1, d);
        if n == MAX_DATUMS || (n > 0 && body.len() + part.len() > MAX_BODY_BYTES) {
            out.push((
                std::mem::replace(&mut body, head.clone()),
                std::mem::take(&mut ids),
            ));
            n = 0;
            part = encode_datum(1, d);
        }
        body.push_str(&part);
        ids.extend_from_slice(&d.ids);
        n += 1;
    }
    if n > 0 {
        out.push((body, ids));
    }
    out
}
