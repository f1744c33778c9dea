//! Splitting one websocket frame into JSON values, without ever failing.
//!
//! A frame from the session host is usually one JSON object, but the relay
//! joins queued messages into one frame with no delimiter (`{…}{…}`), the
//! spinner firmware starts some lines with U+200B, and anything else can
//! arrive too. [`split`] takes every value it can, skipping whitespace and
//! zero-width characters between them, and reports what it could not parse
//! (kept truncated for inspection, never the whole frame).

use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

/// How much of an unparseable frame is kept for inspection.
pub const SAMPLE_BYTES: usize = 256;

/// Values decoded from one frame, with whatever could not be.
#[derive(Debug)]
pub struct Split<'a, T = IgnoredAny> {
    /// Each value's exact text, borrowed from the frame, and the value read
    /// as a `T` (`None`: JSON, but not a `T`).
    pub values: Vec<(&'a str, Option<T>)>,
    /// Leading zero-width characters that were skipped (U+200B, U+FEFF).
    pub zero_width: u32,
    pub garbage: Option<Garbage>,
}

/// The unparseable rest of a frame.
#[derive(Debug, PartialEq)]
pub struct Garbage {
    /// What the JSON parser said, with the offset into the frame.
    pub reason: String,
    /// Bytes from where parsing failed to the end of the frame.
    pub bytes: usize,
    /// At most [`SAMPLE_BYTES`] of them (cut at a character boundary).
    pub sample: String,
}

fn is_skippable(c: char) -> bool {
    c.is_whitespace() || c == '\u{200B}' || c == '\u{FEFF}'
}

/// Decode every JSON value in `frame`, in order. Parsing stops at the first
/// thing that is not JSON; the rest of the frame is reported as garbage
/// (there is no reliable way to resynchronise inside broken JSON).
pub fn split(frame: &str) -> Split<'_> {
    split_as(frame)
}

/// [`split`], reading each value as a `T` in the same pass: one parse of
/// the text for a value that is a `T`, the common case. A value that is
/// not is parsed again, only to find where it ends.
pub fn split_as<'a, T: Deserialize<'a>>(frame: &'a str) -> Split<'a, T> {
    let mut values = Vec::new();
    let rest = split_each(frame, |text, value| values.push((text, value)));
    Split {
        values,
        zero_width: rest.zero_width,
        garbage: rest.garbage,
    }
}

/// What [`split_each`] reports once it has handed over every value.
#[derive(Debug)]
pub struct Rest {
    /// Leading zero-width characters that were skipped (U+200B, U+FEFF).
    pub zero_width: u32,
    pub garbage: Option<Garbage>,
}

/// [`split_as`], handing each value to `each` as it is read instead of
/// collecting them: what the relay source does for every frame, where a
/// list would be an allocation and a copy of each value per frame.
pub fn split_each<'a, T: Deserialize<'a>>(
    frame: &'a str,
    mut each: impl FnMut(&'a str, Option<T>),
) -> Rest {
    let mut out = Rest {
        zero_width: 0,
        garbage: None,
    };
    let mut pos = 0;
    loop {
        let rest = &frame[pos..];
        let trimmed = rest.trim_start_matches(is_skippable);
        out.zero_width += rest[..rest.len() - trimmed.len()]
            .chars()
            .filter(|c| !c.is_whitespace())
            .count() as u32;
        pos += rest.len() - trimmed.len();
        if trimmed.is_empty() {
            return out;
        }
        let mut typed = serde_json::Deserializer::from_str(trimmed).into_iter::<T>();
        if let Some(Ok(v)) = typed.next() {
            let end = typed.byte_offset();
            each(&trimmed[..end], Some(v));
            pos += end;
            continue;
        }
        let mut stream = serde_json::Deserializer::from_str(trimmed).into_iter::<&RawValue>();
        match stream.next() {
            Some(Ok(v)) => {
                each(v.get(), None);
                pos += stream.byte_offset();
            }
            None => return out,
            Some(Err(e)) => {
                out.garbage = Some(Garbage {
                    reason: format!("{e} (at byte {pos} of the frame)"),
                    bytes: trimmed.len(),
                    sample: truncate(trimmed, SAMPLE_BYTES).to_owned(),
                });
                return out;
            }
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character
/// boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(frame: &str, values: &[&str], zero_width: u32, garbage: Option<&str>) {
        let got = split(frame);
        let texts: Vec<&str> = got.values.iter().map(|v| v.0).collect();
        assert_eq!(texts, values, "values of {frame:?}");
        assert_eq!(got.zero_width, zero_width, "zero-width count of {frame:?}");
        assert_eq!(
            got.garbage.as_ref().map(|g| g.sample.as_str()),
            garbage,
            "garbage of {frame:?}"
        );
    }

    #[test]
    fn frames_split_into_values() {
        check(r#"{"a":1}"#, &[r#"{"a":1}"#], 0, None);
        check(r#"{"a":1}{"b":2}"#, &[r#"{"a":1}"#, r#"{"b":2}"#], 0, None);
        check(
            "{\"a\":1}\n {\"b\": 2}\n",
            &[r#"{"a":1}"#, r#"{"b": 2}"#],
            0,
            None,
        );
        check("", &[], 0, None);
        check("  \r\n", &[], 0, None);
        check(
            "\u{200B}{\"error\":\"limit\"}",
            &[r#"{"error":"limit"}"#],
            1,
            None,
        );
        check("\u{FEFF}\u{200B}{}{}", &["{}", "{}"], 2, None);
        check("[1,2] 3", &["[1,2]", "3"], 0, None);
    }

    #[test]
    fn garbage_is_reported_after_what_parsed() {
        // The firmware's `{"info","pid",…}` has no colon.
        check(r#"{"info","pid"}"#, &[], 0, Some(r#"{"info","pid"}"#));
        check(r#"{"a":1}{"b":"#, &[r#"{"a":1}"#], 0, Some(r#"{"b":"#));
        check("not json", &[], 0, Some("not json"));
        check(r#"{"a":1}}"#, &[r#"{"a":1}"#], 0, Some("}"));
        let g = split(r#"{"a":1} xx"#).garbage.expect("garbage");
        assert_eq!(g.bytes, 2);
        assert!(g.reason.contains("at byte 8"), "{}", g.reason);
    }

    #[test]
    fn samples_are_bounded_and_cut_at_a_character() {
        let long = format!("x{}", "é".repeat(1000));
        let g = split(&long).garbage.expect("garbage");
        assert_eq!(g.bytes, long.len());
        assert!(g.sample.len() <= SAMPLE_BYTES && g.sample.len() >= SAMPLE_BYTES - 1);
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
