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

pub struct Peer {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<Request>>>,
    pub script: Arc<Mutex<Vec<Answer>>>,
}

impl Peer {
    /// Serve `script` in order, then `default` for ever (until the test ends).
    pub fn start(script: Vec<Answer>, default: Answer) -> Peer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script));
        let (reqs, scr) = (requests.clone(), script.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut headers = Vec::new();
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    continue;
                }
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
                if reader.read_exact(&mut body).is_err() {
                    continue;
                }
                let answer = {
                    let mut s = scr.lock().expect("script");
                    if s.is_empty() {
                        default.clone()
                    } else {
                        s.remove(0)
                    }
                };
                reqs.lock()
                    .expect("requests")
                    .push(Request { headers, body });
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

/// A forwarding proxy that can cut the route: while cut, new requests get
/// 503 at once and requests already forwarded finish normally. Used to make
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
