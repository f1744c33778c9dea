//! The dashboard `edgemeter upstream` serves at `/`: server-rendered HTML
//! with inline SVG ([`chart`]), no script and nothing loaded from
//! elsewhere ([`html::CSP`]), readable on a phone and printable.
//!
//! | path | what |
//! |---|---|
//! | `GET /` | active users: the network-wide distinct count of a metric's window beside each edge's own count and the naive sum of edges; ranges `TODAY` … `30D` or start/end; `view=table` for exact values |
//! | `GET /relay` | relay streams: messages and distinct users per window by stream, and per stream the totals and whether the last window was connected |
//! | `GET /edges` | every agent that ever posted (and every token that never did): last batch, how long ago, batches, records; stale ones flagged |
//! | `GET/POST /sign-in`, `POST /sign-out` | the session |
//!
//! # Access
//! Pages need the query token (`admin_token_file`), given once to the
//! sign-in form (a POST body, never a URL). The answer is a cookie
//! ([`session`]) `HttpOnly; SameSite=Strict; Path=/`, `Secure` under TLS,
//! for [`SESSION_SECS`]: `v1.<expiry>.<HMAC-SHA256 of the expiry keyed by
//! the token>`. Nothing is kept on the server, so replicas behind a load
//! balancer accept each other's cookies, and replacing the token ends every
//! session. The same cookie also opens the query API's GET routes, so each
//! chart's CSV link works in the browser. Sign-out clears the cookie in
//! this browser; a copied cookie stays valid until it expires or the token
//! is replaced.

pub mod chart;
pub mod html;
pub mod pages;

use crate::http_server::{Request, Response};

/// The session cookie's name.
pub const COOKIE: &str = "edgemeter_session";
/// How long a sign-in lasts.
pub const SESSION_SECS: i64 = 12 * 3600;
/// Most bytes of a sign-in form.
pub const SIGN_IN_MAX_BYTES: usize = 4096;

const CONTEXT: &[u8] = b"edgemeter dashboard session v1|";

fn mac(token: &str, expires_ms: i64) -> ring::hmac::Tag {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    let mut msg = CONTEXT.to_vec();
    msg.extend_from_slice(expires_ms.to_string().as_bytes());
    ring::hmac::sign(&key, &msg)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The cookie's value for a session that ends at `expires_ms`.
pub fn session(token: &str, expires_ms: i64) -> String {
    format!("v1.{expires_ms}.{}", hex(mac(token, expires_ms).as_ref()))
}

/// Whether `value` is a session of `token` that has not expired at `now_ms`
/// (the MAC compared in constant time).
pub fn session_valid(token: &str, value: &str, now_ms: i64) -> bool {
    let mut parts = value.split('.');
    let (Some("v1"), Some(exp), Some(tag), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let (Ok(expires), Some(tag)) = (exp.parse::<i64>(), unhex(tag)) else {
        return false;
    };
    if expires <= now_ms || expires > now_ms + SESSION_SECS * 1000 + 60_000 {
        return false;
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.as_bytes());
    let mut msg = CONTEXT.to_vec();
    msg.extend_from_slice(expires.to_string().as_bytes());
    ring::hmac::verify(&key, &msg, &tag).is_ok()
}

/// The session cookie of a request, if it sent one.
pub fn cookie(req: &Request) -> Option<&str> {
    req.headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("cookie"))
        .flat_map(|(_, v)| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// `Set-Cookie` for a new session, or (`None`) one that clears it.
pub fn set_cookie(value: Option<&str>, tls: bool) -> String {
    let secure = if tls { "; Secure" } else { "" };
    match value {
        Some(v) => format!(
            "{COOKIE}={v}; Max-Age={SESSION_SECS}; Path=/; HttpOnly; SameSite=Strict{secure}"
        ),
        None => format!("{COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict{secure}"),
    }
}

/// Where to go after signing in: a local path only (never `//host` or a
/// scheme), else `/`.
pub fn local_path(next: &str) -> &str {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.contains(['\\', '\r', '\n'])
        && next.len() <= 2048;
    if ok { next } else { "/" }
}

/// An HTML answer with the dashboard's headers.
pub fn html(status: u16, body: String) -> Response {
    let mut r = Response::new(status, "text/html; charset=utf-8", body);
    r.headers
        .push(("content-security-policy", html::CSP.to_owned()));
    r.headers
        .push(("x-content-type-options", "nosniff".to_owned()));
    r.headers
        .push(("referrer-policy", "no-referrer".to_owned()));
    r.headers.push(("cache-control", "no-store".to_owned()));
    r
}

/// `303 See Other` to `to`.
pub fn redirect(to: &str) -> Response {
    let mut r = html(303, String::new());
    r.headers.push(("location", to.to_owned()));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_bound_to_the_token_and_expire() {
        let now = 1_800_000_000_000;
        let s = session("tok-A", now + 1000);
        assert!(session_valid("tok-A", &s, now));
        assert!(!session_valid("tok-B", &s, now), "another token");
        assert!(!session_valid("tok-A", &s, now + 1000), "expired");
        let far = session("tok-A", now + SESSION_SECS * 1000 * 2);
        assert!(!session_valid("tok-A", &far, now), "longer than a session");
        // Tampering with the expiry breaks the MAC.
        let forged = s.replace(&(now + 1000).to_string(), &(now + 5000).to_string());
        assert!(!session_valid("tok-A", &forged, now));
        for junk in ["", "v1", "v1.x.y", "v2.1.00", "v1.1.zz", "v1.1.00.extra"] {
            assert!(!session_valid("tok-A", junk, now), "{junk}");
        }
    }

    #[test]
    fn only_local_paths_are_followed() {
        assert_eq!(local_path("/edges?range=7D"), "/edges?range=7D");
        for bad in [
            "//evil.example/",
            "https://evil.example/",
            "edges",
            "/\\evil",
            "/a\r\nb",
        ] {
            assert_eq!(local_path(bad), "/", "{bad}");
        }
    }

    #[test]
    fn cookies_are_found_among_others_and_flagged() {
        let req = Request {
            method: "GET".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![("Cookie".into(), format!("a=1; {COOKIE}=v1.2.ab; b=2"))],
            body: Vec::new(),
            peer: "127.0.0.1:1".parse().unwrap(),
            permit: crate::http_server::Budget::new(0).reserve(0).unwrap(),
        };
        assert_eq!(cookie(&req), Some("v1.2.ab"));
        let set = set_cookie(Some("v"), true);
        for flag in [
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Max-Age=43200",
            "Path=/",
        ] {
            assert!(set.contains(flag), "{set}");
        }
        assert!(!set_cookie(Some("v"), false).contains("Secure"));
        assert!(set_cookie(None, false).contains("Max-Age=0"));
    }
}
