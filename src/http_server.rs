//! A bounded HTTP/1.1 server core: one task per connection on the event
//! loop, keep-alive, `Content-Length` bodies only. The upstream's API and an
//! agent's `http_listen` (metrics, health, status) are served by it.
//!
//! Every way a peer can hold resources is bounded, and each bound is a
//! config key ([`Limits`]): connections (past the limit a connection gets
//! one `503` written without waiting and is closed), header bytes (`431`),
//! the time from a request's first byte to its last header byte, and for a
//! new connection's first byte (`408`; this is what ends a slow-loris peer,
//! or one that connects and sends nothing), the time for the body (`408`),
//! idle time between kept-alive requests, and the body bytes held in memory
//! across all connections ([`Budget`], `503` before the body is read).
//!
//! A request is judged from its head alone ([`Handler::admit`]: route,
//! method, token, the route's body size, `413`) before a byte of its body is
//! read or `100 Continue` is promised: an unauthenticated peer costs its
//! header bytes and nothing more. Framing is strict (RFC 9112 §6.3; see
//! `body_length`) so that a proxy in front and this server always agree
//! where a request ends. Chunked request bodies are refused (`411`): every
//! client we serve sends a length.
//!
//! Why not hyper: the upstream needs a handful of routes and exact control
//! of each bound and deadline; this is ~300 lines on `httparse` (already in
//! the tree through ureq and tungstenite) instead of hyper, h1 and a timer
//! adapter, which matters on a 32-bit Pi's binary size budget.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What one peer may cost the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    /// The request body as sent (gzip).
    pub max_body_bytes: usize,
    /// The batch once unpacked.
    pub max_batch_bytes: usize,
    /// Request bodies and the batches unpacked from them, held in memory
    /// at once across all connections (past it: `503`, the body unread).
    pub max_buffered_bytes: usize,
    /// From a request's first byte to the end of its headers.
    pub header_timeout: Duration,
    /// For the whole body.
    pub body_timeout: Duration,
    /// A kept-alive connection with no request this long is closed.
    pub idle_timeout: Duration,
}

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
    /// The body's share of the [`Budget`]; the handler grows it for what it
    /// unpacks, and it is given back when the request is done.
    pub permit: Permit,
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
    /// Not HTTP/1.x, a body without a length, or framing that a proxy
    /// could read differently.
    Malformed,
    /// Refused from its head (route, method, token), its body unread.
    Refused,
    /// The body budget was full: `503` without reading the body.
    Busy,
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
            Closed::Refused => "refused",
            Closed::Busy => "busy",
            Closed::Io => "io",
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        303 => "See Other",
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
    // `date`: an origin server with a clock must send it (RFC 9110
    // §6.6.1), and an agent reads its own clock's error from it.
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ndate: {}\r\ncontent-type: {}\r\ncontent-length: {}\r\n",
        r.status,
        reason(r.status),
        httpdate::fmt_http_date(std::time::SystemTime::now()),
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

/// What the server asks of the application, in two steps, so that nothing
/// of a request's body is read before its head was judged.
pub trait Handler {
    /// What [`Handler::admit`] learned from the head (who is calling),
    /// handed on to [`Handler::handle`].
    type Caller;
    /// Judge a request from its head alone (`req.body` is still empty): the
    /// route, the method, the token. `Ok` carries the caller and the most
    /// body bytes this route takes (0 for routes that take none); `Err` is
    /// the answer, sent before a byte of the body is read, and the
    /// connection is closed.
    fn admit(&self, req: &Request) -> Result<(Self::Caller, usize), Response>;
    /// Answer a request that was admitted and whose body has arrived.
    fn handle(&self, req: Request, caller: Self::Caller) -> impl Future<Output = Response>;
}

/// One budget for the request bodies held in memory across all connections
/// (`max_buffered_bytes`): a body is read only once its length was taken
/// from the budget, and the handler may take more for what it unpacks. A
/// request that does not fit is answered `503` without reading its body, so
/// the worst case of many peers is the budget, not connections × body size.
#[derive(Debug)]
pub struct Budget {
    total: usize,
    used: Cell<usize>,
}

impl Budget {
    pub fn new(total: usize) -> Rc<Budget> {
        Rc::new(Budget {
            total,
            used: Cell::new(0),
        })
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes held by requests now.
    pub fn used(&self) -> usize {
        self.used.get()
    }

    /// Take `n` bytes, or None when they do not fit now.
    pub fn reserve(self: &Rc<Budget>, n: usize) -> Option<Permit> {
        let used = self.used.get();
        if n > self.total - used {
            return None;
        }
        self.used.set(used + n);
        Some(Permit {
            budget: Some(self.clone()),
            held: n,
        })
    }
}

/// Bytes taken from a [`Budget`], given back when dropped.
#[derive(Debug, Default)]
pub struct Permit {
    budget: Option<Rc<Budget>>,
    held: usize,
}

/// Why [`Permit::grow`] failed.
#[derive(Debug, PartialEq, Eq)]
pub enum Full {
    /// Not now: other requests hold the budget (503, try again).
    Busy,
    /// Never: more than the whole budget (413).
    TooLarge,
}

impl Permit {
    /// Take `n` more bytes for this request.
    pub fn grow(&mut self, n: usize) -> Result<(), Full> {
        let Some(b) = &self.budget else {
            return Err(Full::TooLarge);
        };
        if self.held.saturating_add(n) > b.total {
            return Err(Full::TooLarge);
        }
        let used = b.used.get();
        if n > b.total - used {
            return Err(Full::Busy);
        }
        b.used.set(used + n);
        self.held += n;
        Ok(())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            b.used.set(b.used.get() - self.held);
        }
    }
}

/// The body length a head declares, read strictly (RFC 9112 §6.3), so that
/// a proxy in front of us and we cannot disagree on where a request ends:
/// `Content-Length` is digits only; several are refused unless identical;
/// `Transfer-Encoding` (we take no chunked bodies) is refused, and with a
/// `Content-Length` it is a 400, the request-smuggling pattern.
fn body_length(headers: &[(String, String)]) -> Result<usize, (u16, String)> {
    let mut te = false;
    let mut length: Option<&str> = None;
    for (k, v) in headers {
        match k.as_str() {
            "transfer-encoding" => te = true,
            "content-length" => match length {
                Some(first) if first != v.as_str() => {
                    return Err((400, "several content-length headers that differ".into()));
                }
                _ => length = Some(v.as_str()),
            },
            _ => {}
        }
    }
    match (te, length) {
        (true, Some(_)) => Err((
            400,
            "transfer-encoding and content-length together are refused".into(),
        )),
        (true, None) => Err((
            411,
            "send the body with a content-length, not chunked".into(),
        )),
        (false, None) => Ok(0),
        (false, Some(v)) => {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err((
                    400,
                    format!("content-length `{v}` is not a number of bytes"),
                ));
            }
            // All digits: only an overflow is left, and that is too large.
            Ok(v.parse::<usize>().unwrap_or(usize::MAX))
        }
    }
}

/// The head parser and the framing rules on raw bytes, as the server
/// applies them before anything else: `Ok(None)` for a head not yet
/// complete, `Ok(Some((head bytes, body bytes)))`, or the refusal's status
/// and reason. The entry point of the `http_head` fuzz target.
pub fn read_head(buf: &[u8]) -> Result<Option<(usize, usize)>, (u16, String)> {
    match parse_head(buf) {
        Parsed::Partial => Ok(None),
        Parsed::Bad(why) => Err((400, why)),
        Parsed::Complete(h) => body_length(&h.headers).map(|n| Some((h.len, n))),
    }
}

/// Serve one connection until it closes or breaks a bound.
pub async fn serve_connection<S, H>(
    mut stream: S,
    peer: SocketAddr,
    limits: &Limits,
    budget: &Rc<Budget>,
    handler: &H,
) -> (usize, Closed)
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut served = 0;
    loop {
        // Wait for the first byte of the next request: a fresh connection
        // gets the header timeout (a peer that connects and sends nothing
        // must not hold a slot for the idle timeout), a kept-alive one the
        // idle timeout.
        if buf.is_empty() {
            let (wait, late) = if served == 0 {
                (limits.header_timeout, Closed::HeaderTimeout)
            } else {
                (limits.idle_timeout, Closed::Idle)
            };
            match before(Instant::now() + wait, fill(&mut stream, &mut buf)).await {
                None => return (served, late),
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
        let length = match body_length(&head.headers) {
            Ok(n) => n,
            Err((status, why)) => {
                return refuse(&mut stream, served, Closed::Malformed, status, &why).await;
            }
        };
        let (path, query) = match head.target.split_once('?') {
            Some((p, q)) => (p.to_owned(), q.to_owned()),
            None => (head.target.clone(), String::new()),
        };
        let keep_alive = head.keep_alive;
        let mut req = Request {
            method: head.method,
            path,
            query,
            headers: head.headers,
            body: Vec::new(),
            peer,
            permit: Permit::default(),
        };
        // Judged from the head alone: nothing of the body is read (and no
        // `100 Continue` promised) before the route and the token are.
        let (caller, route_max) = match handler.admit(&req) {
            Ok(a) => a,
            Err(r) => {
                served += 1;
                return answer_and_close(&mut stream, served, Closed::Refused, &r).await;
            }
        };
        let max = route_max.min(limits.max_body_bytes);
        if length > max {
            let why = if route_max < limits.max_body_bytes {
                format!("{} {} takes at most {max} body bytes", req.method, req.path)
            } else {
                format!(
                    "the body is {length} bytes; this upstream takes at most {max} (max_body_bytes)"
                )
            };
            return refuse(&mut stream, served, Closed::BodyTooLarge, 413, &why).await;
        }
        if length > budget.total() {
            let why = format!(
                "the body is {length} bytes; this upstream holds at most {} at once (max_buffered_bytes)",
                budget.total()
            );
            return refuse(&mut stream, served, Closed::BodyTooLarge, 413, &why).await;
        }
        match budget.reserve(length) {
            Some(p) => req.permit = p,
            None => {
                let mut r = Response::error(
                    503,
                    "the upstream holds as many request bodies as it may (max_buffered_bytes); try again shortly",
                );
                r.headers.push(("retry-after", "1".into()));
                return answer_and_close(&mut stream, served, Closed::Busy, &r).await;
            }
        }
        if length > buf.len()
            && req
                .header("expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
            && stream
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .is_err()
        {
            return (served, Closed::Io);
        }
        // The body, within body_timeout, into a buffer of its exact size.
        let body_deadline = Instant::now() + limits.body_timeout;
        let mut body = Vec::with_capacity(length);
        let have = buf.len().min(length);
        body.extend(buf.drain(..have));
        while body.len() < length {
            match read_before(&mut stream, &mut body, body_deadline).await {
                Got::More => {}
                Got::Closed => return (served, Closed::Io),
                Got::Late => {
                    let why = "the request body took too long";
                    return refuse(&mut stream, served, Closed::BodyTimeout, 408, why).await;
                }
            }
        }
        // A read may have brought the start of a pipelined next request.
        if body.len() > length {
            buf.extend_from_slice(&body[length..]);
            body.truncate(length);
        }
        req.body = body;
        let response = handler.handle(req, caller).await;
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

/// Send `r` and close: used where the rest of the stream (an unread body)
/// cannot be trusted to be where a next request starts.
async fn answer_and_close<S: AsyncWrite + Unpin>(
    stream: &mut S,
    served: usize,
    why: Closed,
    r: &Response,
) -> (usize, Closed) {
    let bytes = encode_response(r, true);
    let _ = before(
        Instant::now() + Duration::from_secs(1),
        stream.write_all(&bytes),
    )
    .await;
    let _ = stream.close().await;
    (served, why)
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
    answer_and_close(stream, served, why, &Response::error(status, text)).await
}

/// The query string's `key=value` pairs, decoded as an HTML form does
/// (`+` is a space), by the `form_urlencoded` crate; a broken escape is
/// kept as written.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// A path segment, percent-decoded (`+` stays `+` in a path), by the
/// `percent-encoding` crate; bytes that are not UTF-8 become U+FFFD.
pub fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Text made safe inside HTML (and SVG) text and quoted attributes: every
/// page these servers answer with escapes with this one function.
pub fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
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

    /// Regression (issue 13): two different lengths were taken (the first
    /// won) and `+5` read as 5, so a proxy and this server could disagree on
    /// where a request ends (request smuggling).
    #[test]
    fn body_lengths_are_read_strictly() {
        let check = |headers: &[(&str, &str)], want: Result<usize, u16>| {
            let h: Vec<(String, String)> = headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(body_length(&h).map_err(|e| e.0), want, "{headers:?}");
        };
        check(&[], Ok(0));
        check(&[("content-length", "0")], Ok(0));
        check(&[("content-length", "512")], Ok(512));
        check(&[("content-length", "5"), ("content-length", "5")], Ok(5));
        check(
            &[("content-length", "5"), ("content-length", "6")],
            Err(400),
        );
        check(&[("content-length", "+5")], Err(400));
        check(&[("content-length", "-1")], Err(400));
        check(&[("content-length", "5, 5")], Err(400));
        check(&[("content-length", "0x10")], Err(400));
        check(&[("content-length", "")], Err(400));
        check(&[("content-length", "5 ")], Err(400));
        check(
            &[("content-length", "99999999999999999999999")],
            Ok(usize::MAX),
        );
        check(&[("transfer-encoding", "chunked")], Err(411));
        check(
            &[("transfer-encoding", "chunked"), ("content-length", "5")],
            Err(400),
        );
        check(
            &[("content-length", "5"), ("transfer-encoding", "identity")],
            Err(400),
        );
    }

    #[test]
    fn the_body_budget_is_shared_and_given_back() {
        let b = Budget::new(100);
        let mut p1 = b.reserve(60).expect("fits");
        assert!(b.reserve(41).is_none(), "over the budget");
        let p2 = b.reserve(40).expect("fits exactly");
        assert_eq!(b.used(), 100);
        drop(p2);
        let p3 = b.reserve(30).expect("fits");
        assert_eq!(p1.grow(20), Err(Full::Busy), "10 left while p3 holds 30");
        assert_eq!(
            p1.grow(41),
            Err(Full::TooLarge),
            "more than the whole budget"
        );
        assert_eq!(p1.grow(10), Ok(()));
        drop(p3);
        assert_eq!(p1.grow(30), Ok(()), "p3 gave its share back");
        assert_eq!(b.used(), 100);
        drop(p1);
        assert_eq!(b.used(), 0, "everything given back");
        assert_eq!(Permit::default().grow(1), Err(Full::TooLarge));
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
