//! The logging envelope (`{user, t, exp, hardware, course, type,
//! payload}`, reference/practable-relay.md) read from a message's text:
//! the fields the analytics use, borrowed where they have no escapes, in
//! one pass of serde_json and without allocating for what is skipped
//! (this runs for every message). What a field that is not as expected
//! means is decided here too: a message without `user` and `type` strings
//! is not an envelope; a `t` that is not a number is no time.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The envelope fields we use, borrowed from the message text where it
/// has no escapes. A message that is not an object with `user` and `type`
/// strings (data streams, firmware lines) is counted but not analysed.
#[derive(Debug, PartialEq, Deserialize)]
pub struct Envelope<'a> {
    #[serde(borrow)]
    pub user: Cow<'a, str>,
    #[serde(borrow, rename = "type")]
    pub kind: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "text")]
    pub exp: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    pub hardware: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "text")]
    pub course: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "payload_log")]
    pub payload: Option<Cow<'a, str>>,
    /// The sender's clock (`Date.now()` in the browser), if a number.
    #[serde(default, deserialize_with = "number")]
    pub t: Option<f64>,
}

/// What an envelope field is, read without keeping what is not used: the
/// number, the string (borrowed where it has no escapes), null, an object
/// as `M` reads it, or any other value, skipped. A visitor rather than
/// serde's untagged enums, which buffer the value (allocating) before
/// trying each variant: this runs for every message.
enum Shape<'a, M = ()> {
    Number(f64),
    Text(Cow<'a, str>),
    Null,
    Object(M),
    Other,
}

/// How [`Shape`] reads an object.
trait FromMap<'de>: Sized {
    fn from_map<A: MapAccess<'de>>(a: A) -> Result<Self, A::Error>;
}

/// Skipped.
impl<'de> FromMap<'de> for () {
    fn from_map<A: MapAccess<'de>>(mut a: A) -> Result<(), A::Error> {
        while a.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

impl<'de, M: FromMap<'de>> Deserialize<'de> for Shape<'de, M> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Shape<'de, M>, D::Error> {
        struct Any<M>(std::marker::PhantomData<M>);
        impl<'de, M: FromMap<'de>> Visitor<'de> for Any<M> {
            type Value = Shape<'de, M>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Shape::Number(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Shape::Number(v as f64))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Shape::Number(v as f64))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Shape::Text(Cow::Borrowed(v)))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Shape::Text(Cow::Owned(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Shape::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Shape::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Shape::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                while a.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Shape::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, a: A) -> Result<Self::Value, A::Error> {
                Ok(Shape::Object(M::from_map(a)?))
            }
        }
        d.deserialize_any(Any(std::marker::PhantomData))
    }
}

/// A number, or nothing for any other JSON value.
fn number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(match Shape::<()>::deserialize(d)? {
        Shape::Number(n) => Some(n),
        _ => None,
    })
}

/// A string, borrowed where it has no escapes, or nothing for null; any
/// other value is an error. serde's own `Option<Cow<str>>` copies every
/// string, even under `#[serde(borrow)]`: three allocations a message.
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    match Shape::<()>::deserialize(d)? {
        Shape::Text(t) => Ok(Some(t)),
        Shape::Null => Ok(None),
        _ => Err(serde::de::Error::custom("expected a string or null")),
    }
}

/// How far a message's `t` may be from its arrival and still be taken as
/// when it happened (the old client's first/last seen); beyond, the
/// sender's clock is wrong and the arrival time is used.
pub const T_USABLE_WITHIN_MS: i64 = 24 * 3600 * 1000;

/// When a message happened: its `t` if usable, else `arrival_ms`.
pub fn message_time(t: Option<f64>, arrival_ms: i64) -> i64 {
    match t {
        Some(t) if t.is_finite() && (t - arrival_ms as f64).abs() <= T_USABLE_WITHIN_MS as f64 => {
            t as i64
        }
        _ => arrival_ms,
    }
}

/// `payload.log` (the command of an `analytics` message), or nothing when
/// the payload is not an object with one `log` that is a string (or null).
fn payload_log<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    /// A key: whether it is `log`.
    struct IsLog(bool);
    impl<'de> Deserialize<'de> for IsLog {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IsLog, D::Error> {
            struct Key;
            impl Visitor<'_> for Key {
                type Value = IsLog;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a key")
                }
                fn visit_str<E>(self, v: &str) -> Result<IsLog, E> {
                    Ok(IsLog(v == "log"))
                }
            }
            d.deserialize_str(Key)
        }
    }
    /// The object's `log`, as a struct with that one field reads it: a
    /// second `log`, or one that is not a string or null, spoils it.
    struct Log<'a>(Option<Cow<'a, str>>);
    impl<'de> FromMap<'de> for Log<'de> {
        fn from_map<A: MapAccess<'de>>(mut a: A) -> Result<Log<'de>, A::Error> {
            let (mut log, mut usable, mut seen) = (None, true, false);
            while let Some(IsLog(is_log)) = a.next_key()? {
                if !is_log {
                    a.next_value::<IgnoredAny>()?;
                    continue;
                }
                match a.next_value::<Shape>()? {
                    Shape::Text(t) if !seen => log = Some(t),
                    Shape::Null if !seen => {}
                    _ => usable = false,
                }
                seen = true;
            }
            Ok(Log(log.filter(|_| usable)))
        }
    }
    Ok(match Shape::<Log>::deserialize(d)? {
        Shape::Object(Log(log)) => log,
        _ => None,
    })
}

pub fn envelope(text: &str) -> Option<Envelope<'_>> {
    serde_json::from_str(text).ok()
}
