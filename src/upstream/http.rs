//! A bounded HTTP/1.1 server core for the upstream: one task per
//! connection on the event loop, keep-alive, `Content-Length` bodies only.
//!
//! Every way a peer can hold resources is bounded, and each bound is a
//! config key ([`Limits`]): connections (past the limit a connection gets
//! one `503` written without waiting and is closed), header bytes (`431`),
//! body bytes (`413`, refused from the header, before reading the body),
//! the time from a request's first byte to its last header byte (`408`;
//! this is what ends a slow-loris peer dribbling a header), the time for
//! the body (`408`), and idle time between requests. Chunked request
//! bodies are refused (`411`): every client we serve sends a length.
//!
//! Why not hyper: the upstream needs a handful of routes and exact control
//! of each bound and deadline; this is ~300 lines on `httparse` (already in
//! the tree through ureq and tungstenite) instead of hyper, h1 and a timer
//! adapter, which matters on a 32-bit Pi's binary size budget.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::upstream::config::Limits;

const MAX_HEADERS: usize = 64;
const READ_CHUNK: usize = 16 * 1024;

#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path without the query, percent-decoding left to the router.
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = value.to_string().into_bytes();
        body.push(b'\n');
        Response::new(status, "application/json", body)
    }

    /// `{"error": why}`: the shape every 4xx and 5xx of ours has.
    pub fn error(status: u16, why: impl Into<String>) -> Response {
        Response::json(status, &serde_json::json!({ "error": why.into() }))
    }
}

/// How a connection ended, for the server's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The peer closed, or asked to close, between requests.
    Done,
    Idle,
    HeaderTimeout,
    BodyTimeout,
    HeaderTooLarge,
    BodyTooLarge,
    /// Not HTTP/1.x, or a body without a length.
    Malformed,
    /// A read or write failed (reset, broken pipe).
    Io,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::Done => "done",
            Closed::Idle => "idle",
            Closed::HeaderTimeout => "header_timeout",
            Closed::BodyTimeout => "body_timeout",
            Closed::HeaderTooLarge => "header_too_large",
            Closed::BodyTooLarge => "body_too_large",
            Closed::Malformed => "malformed",
            Closed::Io => "io",
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

pub fn encode_response(r: &Response, close: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    for (k, v) in &r.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        out.push_str("connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&r.body);
    bytes
}

/// Run `f` until `deadline`; None if the deadline came first.
async fn before<T>(deadline: Instant, f: impl Future<Output = T>) -> Option<T> {
    smol::future::or(async { Some(f.await) }, async {
        smol::Timer::at(deadline).await;
        None
    })
    .await
}

/// Read more bytes into `buf`; 0 means the peer closed.
async fn fill<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut chunk = [0u8; READ_CHUNK];
    let n = s.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

enum Got {
    More,
    /// The peer closed, or the read failed.
    Closed,
    /// The deadline passed first.
    Late,
}

/// Read more bytes into `buf` before `deadline`.
async fn read_before<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>, deadline: Instant) -> Got {
    match before(deadline, fill(s, buf)).await {
        None => Got::Late,
        Some(Ok(0)) | Some(Err(_)) => Got::Closed,
        Some(Ok(_)) => Got::More,
    }
}

struct Head {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    keep_alive: bool,
    len: usize,
}

enum Parsed {
    Complete(Head),
    Partial,
    Bad(String),
}

fn parse_head(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Ok(httparse::Status::Complete(len)) => {
            let headers: Vec<(String, String)> = req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let conn = headers
                .iter()
                .find(|(k, _)| k == "connection")
                .map(|(_, v)| v.to_ascii_lowercase());
            let keep_alive = match req.version {
                Some(1) => conn.as_deref() != Some("close"),
                _ => conn.as_deref() == Some("keep-alive"),
            };
            Parsed::Complete(Head {
                method: req.method.unwrap_or("").to_owned(),
                target: req.path.unwrap_or("/").to_owned(),
                headers,
                keep_alive,
                len,
            })
        }
        Err(httparse::Error::TooManyHeaders) => {
            Parsed::Bad(format!("more than {MAX_HEADERS} header fields"))
        }
        Err(e) => Parsed::Bad(format!("not an HTTP/1.x request ({e})")),
    }
}

/// Serve one connection until it closes or breaks a bound. `handle` answers
/// each complete request.
pub async fn serve_connection<S, H, F>(
    mut stream: S,
    peer: SocketAddr,
    limits: &Limits,
    handle: H,
) -> (usize, Closed)
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut served = 0;
    loop {
        // Wait for the first byte of the next request.
        if buf.is_empty() {
            match before(
                Instant::now() + limits.idle_timeout,
                fill(&mut stream, &mut buf),
            )
            .await
            {
                None => return (served, Closed::Idle),
                Some(Ok(0)) => return (served, Closed::Done),
                Some(Ok(_)) => {}
                Some(Err(_)) => return (served, Closed::Io),
            }
        }
        // The head, within header_timeout of its first byte.
        let header_deadline = Instant::now() + limits.header_timeout;
        let head = loop {
            let parsed = parse_head(&buf);
            let too_large = match &parsed {
                Parsed::Complete(h) => h.len > limits.max_header_bytes,
                Parsed::Partial => buf.len() > limits.max_header_bytes,
                Parsed::Bad(_) => false,
            };
            if too_large {
                let why = "the request header is too large";
                return refuse(&mut stream, served, Closed::HeaderTooLarge, 431, why).await;
            }
            match parsed {
                Parsed::Complete(h) => break h,
                Parsed::Bad(why) => {
                    return refuse(&mut stream, served, Closed::Malformed, 400, &why).await;
                }
                Parsed::Partial => {
                    match read_before(&mut stream, &mut buf, header_deadline).await {
                        Got::More => {}
                        Got::Closed => return (served, Closed::Io),
                        Got::Late => {
                            let why = "the request header took too long";
                            return refuse(&mut stream, served, Closed::HeaderTimeout, 408, why)
                                .await;
                        }
                    }
                }
            }
        };
        buf.drain(..head.len);
        let header = |name: &str| {
            head.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if header("transfer-encoding").is_some() {
            return refuse(
                &mut stream,
                served,
                Closed::Malformed,
                411,
                "send the body with a content-length, not chunked",
            )
            .await;
        }
        let length = match header("content-length").map(|v| v.trim().parse::<usize>()) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(_)) => {
                return refuse(
                    &mut stream,
                    served,
                    Closed::Malformed,
                    400,
                    "content-length is not a number",
                )
                .await;
            }
        };
        if length > limits.max_body_bytes {
            let why = format!(
                "the body is {length} bytes; this upstream takes at most {} (max_body_bytes)",
                limits.max_body_bytes
            );
            return refuse(&mut stream, served, Closed::BodyTooLarge, 413, &why).await;
        }
        if length > buf.len()
            && header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
            && stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return (served, Closed::Io);
        }
        // The body, within body_timeout.
        let body_deadline = Instant::now() + limits.body_timeout;
        while buf.len() < length {
            match read_before(&mut stream, &mut buf, body_deadline).await {
                Got::More => {}
                Got::Closed => return (served, Closed::Io),
                Got::Late => {
                    let why = "the request body took too long";
                    return refuse(&mut stream, served, Closed::BodyTimeout, 408, why).await;
                }
            }
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        let (path, query) = match head.target.split_once('?') {
            Some((p, q)) => (p.to_owned(), q.to_owned()),
            None => (head.target.clone(), String::new()),
        };
        let keep_alive = head.keep_alive;
        let response = handle(Request {
            method: head.method,
            path,
            query,
            headers: head.headers,
            body,
            peer,
        })
        .await;
        served += 1;
        let bytes = encode_response(&response, !keep_alive);
        let wrote = before(
            Instant::now() + limits.body_timeout,
            stream.write_all(&bytes),
        )
        .await;
        if !matches!(wrote, Some(Ok(()))) {
            return (served, Closed::Io);
        }
        if !keep_alive {
            let _ = stream.close().await;
            return (served, Closed::Done);
        }
    }
}

/// Answer with an error and close: after a broken bound the rest of the
/// stream cannot be trusted to be where a next request starts.
async fn refuse<S: AsyncWrite + Unpin>(
    stream: &mut S,
    served: usize,
    why: Closed,
    status: u16,
    text: &str,
) -> (usize, Closed) {
    let bytes = encode_response(&Response::error(status, text), true);
    let _ = before(
        Instant::now() + Duration::from_secs(1),
        stream.write_all(&bytes),
    )
    .await;
    let _ = stream.close().await;
    (served, why)
}

/// The query string's `key=value` pairs, percent-decoded.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode() {
        assert_eq!(
            query_pairs("metric=active_users&range=7D&dim.window=30m&x=a%20b+c&bad=%zz&end=%2"),
            vec![
                ("metric".into(), "active_users".into()),
                ("range".into(), "7D".into()),
                ("dim.window".into(), "30m".into()),
                ("x".into(), "a b c".into()),
                ("bad".into(), "%zz".into()),
                ("end".into(), "%2".into()),
            ]
        );
        assert_eq!(percent_decode("alice%40lab"), "alice@lab");
        assert_eq!(percent_decode("%é%"), "%é%", "never splits a character");
    }

    #[test]
    fn heads_parse_with_keep_alive_rules() {
        let check = |raw: &str, keep: Option<bool>| match parse_head(raw.as_bytes()) {
            Parsed::Complete(h) => assert_eq!(Some(h.keep_alive), keep, "{raw:?}"),
            Parsed::Partial => assert_eq!(keep, None, "{raw:?} is partial"),
            Parsed::Bad(why) => panic!("{raw:?}: {why}"),
        };
        check("GET / HTTP/1.1\r\nhost: x\r\n\r\n", Some(true));
        check("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", Some(false));
        check("GET / HTTP/1.0\r\n\r\n", Some(false));
        check(
            "GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
            Some(true),
        );
        check("GET / HTTP/1.1\r\nhost: x\r\n", None);
        assert!(matches!(
            parse_head(b"\x16\x03\x01garbage\r\n\r\n"),
            Parsed::Bad(_)
        ));
    }

    #[test]
    fn responses_carry_length_and_close() {
        let r = Response::error(413, "too big");
        let text = String::from_utf8(encode_response(&r, true)).expect("utf8");
        assert!(
            text.starts_with("HTTP/1.1 413 Content Too Large\r\n"),
            "{text}"
        );
        assert!(text.contains("content-length: 20\r\n"), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\n{\"error\":\"too big\"}\n"),
            "{text}"
        );
    }
}
