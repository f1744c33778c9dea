//! A scripted HTTP peer on loopback: answers requests in order from a
//! script (then a default answer), records what it received. One request per
//! connection (`Connection: close`), bounded by the test's own deadlines.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub date: Option<String>,
}

impl Answer {
    pub fn ok(body: &str) -> Answer {
        Answer {
            status: 200,
            body: body.into(),
            date: None,
        }
    }
    pub fn error(status: u16, body: &str) -> Answer {
        Answer {
            status,
            body: body.into(),
            date: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Request {
    /// The request line's target (`/`, `/edge/?x=1`).
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Answers a request itself, or leaves it to the script (None).
pub type Decide = Arc<dyn Fn(&Request) -> Option<Answer> + Send + Sync>;

pub struct Peer {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<Request>>>,
    pub script: Arc<Mutex<Vec<Answer>>>,
}

impl Peer {
    /// Serve `script` in order, then `default` for ever (until the test ends).
    pub fn start(script: Vec<Answer>, default: Answer) -> Peer {
        Peer::start_on(0, script, default)
    }

    /// The same on a chosen port (0: any free one).
    pub fn start_on(port: u16, script: Vec<Answer>, default: Answer) -> Peer {
        Peer::start_deciding(port, script, default, Arc::new(|_| None))
    }

    /// Like AWS: a request whose SigV4 signature does not verify with the
    /// secret in `secret` *now* gets 403 SignatureDoesNotMatch; others get
    /// `ok`. The secret can be changed while it runs (a rotated key).
    pub fn start_verifying(secret: Arc<Mutex<String>>, ok: Answer) -> Peer {
        Peer::start_deciding(
            0,
            vec![],
            ok,
            Arc::new(move |r: &Request| {
                let key = secret.lock().expect("secret").clone();
                sigv4_valid(r, &key).err().map(|e| {
                    Answer::error(
                        403,
                        &format!(
                            "<ErrorResponse><Error><Type>Sender</Type><Code>SignatureDoesNotMatch</Code><Message>{}</Message></Error><RequestId>1</RequestId></ErrorResponse>",
                            e.replace('<', "(").replace('>', ")")
                        ),
                    )
                })
            }),
        )
    }

    /// `decide` may answer a request itself (before the script).
    pub fn start_deciding(port: u16, script: Vec<Answer>, default: Answer, decide: Decide) -> Peer {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("cannot listen on 127.0.0.1:{port}: {e}"));
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script));
        let (reqs, scr) = (requests.clone(), script.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let Some(request) = read_request(&stream) else {
                    continue;
                };
                let answer = decide(&request).unwrap_or_else(|| {
                    let mut s = scr.lock().expect("script");
                    if s.is_empty() {
                        default.clone()
                    } else {
                        s.remove(0)
                    }
                });
                reqs.lock().expect("requests").push(request);
                let date = answer
                    .date
                    .map(|d| format!("Date: {d}\r\n"))
                    .unwrap_or_default();
                let reply = format!(
                    "HTTP/1.1 {} X\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n{date}Connection: close\r\n\r\n{}",
                    answer.status,
                    answer.body.len(),
                    answer.body
                );
                let _ = stream.write_all(reply.as_bytes());
            }
        });
        Peer {
            port,
            requests,
            script,
        }
    }

    pub fn count(&self) -> usize {
        self.requests.lock().expect("requests").len()
    }
}

/// One HTTP/1.1 request read whole (headers, then `Content-Length` bytes of
/// body); None if the peer closed or sent less.
pub fn read_request(stream: &std::net::TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut headers = Vec::new();
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let target = line.split(' ').nth(1).unwrap_or("").to_owned();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        target,
        headers,
        body,
    })
}

/// IMF-fixdate for `secs` since 1970 (`Tue, 24 Nov 2026 02:50:51 GMT`).
pub fn http_date(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let (y, m, d) = super::civil(days);
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{weekday}, {d:02} {month} {y} {:02}:{:02}:{:02} GMT",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// A forwarding proxy that can cut the route: while cut, a new request is
/// read whole and answered 503 (answering before the sender has written its
/// body would reset the connection, which the sender sees as an I/O error,
/// not a 503); requests already forwarded finish normally. Used to make
/// "what the receiver had" a clean cut in restart tests.
pub struct Proxy {
    pub port: u16,
    cut: Arc<Mutex<bool>>,
    in_flight: Arc<Mutex<usize>>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cut = Arc::new(Mutex::new(false));
        let in_flight = Arc::new(Mutex::new(0usize));
        let (c, f) = (cut.clone(), in_flight.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut client) = stream else { continue };
                let (c, f) = (c.clone(), f.clone());
                std::thread::spawn(move || {
                    {
                        let cut = c.lock().expect("cut");
                        if *cut {
                            drop(cut);
                            let _ =
                                client.set_read_timeout(Some(std::time::Duration::from_secs(10)));
                            let _ = read_request(&client);
                            let _ = client.write_all(
                                b"HTTP/1.1 503 X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                            );
                            return;
                        }
                        *f.lock().expect("in flight") += 1;
                    }
                    if let Ok(mut up) = std::net::TcpStream::connect(("127.0.0.1", upstream)) {
                        let mut up2 = up.try_clone().expect("clone");
                        let mut client2 = client.try_clone().expect("clone");
                        let t = std::thread::spawn(move || {
                            let _ = std::io::copy(&mut client2, &mut up2);
                            let _ = up2.shutdown(std::net::Shutdown::Write);
                        });
                        let _ = std::io::copy(&mut up, &mut client);
                        let _ = client.shutdown(std::net::Shutdown::Both);
                        let _ = t.join();
                    }
                    *f.lock().expect("in flight") -= 1;
                });
            }
        });
        Proxy {
            port,
            cut,
            in_flight,
        }
    }

    /// Cut the route and wait (bounded) for requests in flight to finish.
    pub fn cut(&self) {
        *self.cut.lock().expect("cut") = true;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while *self.in_flight.lock().expect("in flight") > 0 && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    pub fn restore(&self) {
        *self.cut.lock().expect("cut") = false;
    }
}

/// A forwarding proxy that loses the answers to the first `lose` requests:
/// the receiver got and handled them, the sender sees its connection close.
/// This is the "lost acknowledgement" an idempotent receiver must absorb.
pub struct AckDropper {
    pub port: u16,
    pub dropped: Arc<Mutex<usize>>,
}

impl AckDropper {
    pub fn start(upstream: u16, lose: usize) -> AckDropper {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let dropped = Arc::new(Mutex::new(0usize));
        let d = dropped.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut client) = stream else { continue };
                let d = d.clone();
                std::thread::spawn(move || {
                    let Ok(mut up) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                        return;
                    };
                    let mut up2 = up.try_clone().expect("clone");
                    let mut client2 = client.try_clone().expect("clone");
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut client2, &mut up2);
                        let _ = up2.shutdown(std::net::Shutdown::Write);
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    // Our server writes each answer in one piece: one read,
                    // one answer.
                    while let Ok(n) = up.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let mut count = d.lock().expect("dropped");
                        if *count < lose {
                            *count += 1;
                            let _ = client.shutdown(std::net::Shutdown::Both);
                            let _ = up.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        drop(count);
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        AckDropper { port, dropped }
    }
}

/// Whether `r` carries a valid SigV4 signature for `secret`, recomputed (by
/// the aws-sigv4 crate) from the request exactly as it arrived: its `Host`
/// header, target, signed headers and body. What AWS itself checks.
pub fn sigv4_valid(r: &Request, secret: &str) -> Result<(), String> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings};
    let auth = r.header("authorization").ok_or("not signed")?;
    let field = |name: &str| {
        auth.split([' ', ','])
            .find_map(|p| p.strip_prefix(name))
            .ok_or(format!("no {name} in {auth}"))
    };
    let credential: Vec<&str> = field("Credential=")?.split('/').collect();
    let (key_id, region, service) = (credential[0], credential[2], credential[3]);
    let signed: Vec<&str> = field("SignedHeaders=")?.split(';').collect();
    let host = r.header("host").ok_or("no Host header")?;
    let amz_date = r.header("x-amz-date").ok_or("no x-amz-date")?;
    let time = amz_time(amz_date).ok_or(format!("bad x-amz-date {amz_date}"))?;
    let headers: Vec<(&str, &str)> = signed
        .iter()
        .filter(|h| !matches!(**h, "x-amz-date" | "x-amz-security-token"))
        .map(|h| {
            Ok((
                *h,
                r.header(h).ok_or(format!("signed header {h} not sent"))?,
            ))
        })
        .collect::<Result<_, String>>()?;
    let identity = aws_credential_types::Credentials::new(
        key_id,
        secret,
        r.header("x-amz-security-token").map(str::to_owned),
        None,
        "test",
    )
    .into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let url = format!("http://{host}{}", r.target);
    let signable = SignableRequest::new(
        "POST",
        &url,
        headers.into_iter(),
        SignableBody::Bytes(&r.body),
    )
    .map_err(|e| e.to_string())?;
    let (instructions, _) = aws_sigv4::http_request::sign(signable, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    let want = instructions
        .headers()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.to_owned())
        .ok_or("the crate made no signature")?;
    if want == auth {
        Ok(())
    } else {
        Err(format!(
            "SignatureDoesNotMatch: sent `{auth}`, the request as received (Host: {host}) needs `{want}`"
        ))
    }
}

/// `20261202T171400Z` as a time.
fn amz_time(s: &str) -> Option<std::time::SystemTime> {
    let n = |a: usize, b: usize| s.get(a..b)?.parse::<i64>().ok();
    let (y, m, d) = (n(0, 4)?, n(4, 6)?, n(6, 8)?);
    let (hh, mm, ss) = (n(9, 11)?, n(11, 13)?, n(13, 15)?);
    // Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64))
}

/// Send `r` to 127.0.0.1:`port` as it came (a POST), and return the
/// answer: for a [`Peer`] that passes requests on to a real server
/// (moto) except the ones it decides to refuse.
pub fn forward(port: u16, r: &Request) -> Answer {
    let mut up = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect upstream");
    let mut head = format!("POST {} HTTP/1.1\r\n", r.target);
    for (k, v) in &r.headers {
        if !k.eq_ignore_ascii_case("connection") {
            head += &format!("{k}: {v}\r\n");
        }
    }
    head += "Connection: close\r\n\r\n";
    up.write_all(head.as_bytes()).expect("forward head");
    up.write_all(&r.body).expect("forward body");
    let mut raw = Vec::new();
    up.read_to_end(&mut raw).expect("read answer");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    Answer::error(status, body)
}

/// One HTTP request on its own connection; (status, body).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &str,
    body: &[u8],
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}{headers}content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_response(&out)
}

pub fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// An HTTP CONNECT proxy (what ureq speaks to any HTTP proxy) that asks
/// for `user:password` (Basic) and records each tunnel's target. Stopped,
/// it closes its tunnels and refuses connections.
pub struct ConnectProxy {
    pub port: u16,
    /// `host:port` of each tunnel opened.
    pub tunnels: Arc<Mutex<Vec<String>>>,
    /// Requests refused for their credentials.
    pub refused: Arc<Mutex<usize>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// The clients' connections, closed at stop.
    open: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl ConnectProxy {
    pub fn start(credentials: &str) -> ConnectProxy {
        use base64::Engine;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let want = base64::engine::general_purpose::STANDARD.encode(credentials);
        let (tunnels, refused) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(0)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (t, r, s, o) = (tunnels.clone(), refused.clone(), stop.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(std::sync::atomic::Ordering::SeqCst) {
                    return; // the listener closes: connections are refused
                }
                let Ok(client) = client else { continue };
                if let Ok(c) = client.try_clone() {
                    o.lock().expect("open").push(c);
                }
                let (t, r, want) = (t.clone(), r.clone(), want.clone());
                std::thread::spawn(move || tunnel(client, &want, &t, &r));
            }
        });
        ConnectProxy {
            port,
            tunnels,
            refused,
            stop,
            open,
        }
    }

    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.open.lock().expect("open").drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        // Wake the accept loop so that it sees the flag.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One CONNECT: its head (at most 8 KiB), the credentials, then bytes both
/// ways until either side closes.
fn tunnel(
    mut client: std::net::TcpStream,
    want: &str,
    tunnels: &Mutex<Vec<String>>,
    refused: &Mutex<usize>,
) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        match client.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let target = head
        .strip_prefix("CONNECT ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_default()
        .to_owned();
    let authorized = head.lines().any(|l| {
        let Some((name, value)) = l.split_once(':') else {
            return false;
        };
        let basic = value.trim().split_once(' ');
        name.eq_ignore_ascii_case("proxy-authorization")
            && basic.is_some_and(|(scheme, creds)| {
                scheme.eq_ignore_ascii_case("basic") && creds.trim() == want
            })
    });
    if !authorized {
        *refused.lock().expect("refused") += 1;
        let _ = client.write_all(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm=\"test\"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
        return;
    }
    let Ok(mut upstream) = std::net::TcpStream::connect(&target) else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n");
        return;
    };
    tunnels.lock().expect("tunnels").push(target);
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .is_err()
    {
        return;
    }
    let (mut up2, mut client2) = (
        upstream.try_clone().expect("clone"),
        client.try_clone().expect("clone"),
    );
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut client2, &mut up2);
        let _ = up2.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut upstream, &mut client);
    let _ = client.shutdown(std::net::Shutdown::Both);
}
