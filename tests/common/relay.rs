//! A session host for tests, behaving like practable's `session-relay host`:
//! websockets on `/ws/<stream>` with hub semantics (a message goes to every
//! other client on the stream, never back to its sender), the
//! `/api/destinations` rules kept in memory only, and `/healthcheck`. It can
//! refuse chosen streams (404), drop every connection, and stop and start
//! again on the same port, the way the real one restarts.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tungstenite::Message;

type Outgoing = mpsc::Sender<Message>;

#[derive(Default)]
struct Inner {
    /// stream → (client id, its queue)
    topics: Mutex<HashMap<String, Vec<(u64, Outgoing)>>>,
    sockets: Mutex<HashMap<u64, TcpStream>>,
    refused: Mutex<HashSet<String>>,
    rules: Mutex<BTreeMap<String, serde_json::Value>>,
    /// Every websocket connection made: (stream, when).
    connects: Mutex<Vec<(String, Instant)>>,
    posts: AtomicU64,
    next_id: AtomicU64,
    stop: AtomicBool,
    /// Hung: connections stay open, nothing is read, written or answered
    /// (not even pings), and handshakes wait.
    frozen: AtomicBool,
}

pub struct Hub {
    pub port: u16,
    inner: Arc<Inner>,
    accept: Option<JoinHandle<()>>,
}

impl Hub {
    pub fn start() -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        let inner: Arc<Inner> = Arc::default();
        Hub {
            port,
            accept: Some(listen(listener, inner.clone())),
            inner,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stop listening and cut every connection, forgetting the rules, as a
    /// restarted session host does. [`Hub::restart`] starts it again.
    pub fn stop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.accept.take() {
            a.join().unwrap();
        }
        self.drop_all();
        self.inner.rules.lock().unwrap().clear();
    }

    /// Listen again on the same port (after [`Hub::stop`]).
    pub fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.port),
            }
        };
        self.accept = Some(listen(listener, self.inner.clone()));
    }

    /// Close every websocket connection at once (TCP shutdown).
    pub fn drop_all(&self) {
        for (_, s) in self.inner.sockets.lock().unwrap().drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.inner.topics.lock().unwrap().clear();
    }

    /// Hang like a stuck process: every connection stays open but nothing
    /// is read or sent, pings included; new handshakes wait.
    pub fn freeze(&self) {
        self.inner.frozen.store(true, Ordering::SeqCst);
    }

    pub fn thaw(&self) {
        self.inner.frozen.store(false, Ordering::SeqCst);
    }

    /// Answer 404 to websocket requests for `stream`.
    pub fn refuse(&self, stream: &str) {
        self.inner.refused.lock().unwrap().insert(stream.to_owned());
    }

    pub fn subscribers(&self, stream: &str) -> usize {
        self.inner
            .topics
            .lock()
            .unwrap()
            .get(stream)
            .map_or(0, Vec::len)
    }

    /// Send `msg` to every client of `stream`, as a client that is not
    /// one of them would (the browser of a student). Returns how many got it.
    pub fn send(&self, stream: &str, msg: Message) -> usize {
        publish(&self.inner, stream, u64::MAX, msg)
    }

    /// The raw sockets of `stream`'s clients, to write frames encoded by
    /// the test itself as fast as the kernel takes them (the hub's own
    /// writer is slower than any reader).
    pub fn raw_sockets(&self, stream: &str) -> Vec<TcpStream> {
        let ids: Vec<u64> = self
            .inner
            .topics
            .lock()
            .unwrap()
            .get(stream)
            .map(|l| l.iter().map(|(id, _)| *id).collect())
            .unwrap_or_default();
        let sockets = self.inner.sockets.lock().unwrap();
        ids.iter()
            .filter_map(|id| sockets.get(id)?.try_clone().ok())
            .collect()
    }

    pub fn send_text(&self, stream: &str, text: &str) -> usize {
        self.send(stream, Message::text(text))
    }

    pub fn connects(&self) -> Vec<(String, Instant)> {
        self.inner.connects.lock().unwrap().clone()
    }

    pub fn rules(&self) -> BTreeMap<String, serde_json::Value> {
        self.inner.rules.lock().unwrap().clone()
    }

    pub fn posts(&self) -> u64 {
        self.inner.posts.load(Ordering::SeqCst)
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
    }
}

fn listen(listener: TcpListener, inner: Arc<Inner>) -> JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    inner.stop.store(false, Ordering::SeqCst);
    let shared = inner.clone();
    std::thread::spawn(move || {
        while !shared.stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((s, _)) => {
                    let inner = shared.clone();
                    std::thread::spawn(move || serve(s, inner));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    })
}

fn publish(inner: &Inner, stream: &str, from: u64, msg: Message) -> usize {
    let topics = inner.topics.lock().unwrap();
    let mut n = 0;
    for (id, tx) in topics.get(stream).into_iter().flatten() {
        if *id != from && tx.send(msg.clone()).is_ok() {
            n += 1;
        }
    }
    n
}

/// Read the request head without consuming it (the websocket handshake
/// reads it again).
fn peek_head(s: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let n = s.peek(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        let text = String::from_utf8_lossy(&buf[..n]);
        if let Some(end) = text.find("\r\n\r\n") {
            return Some(text[..end].to_owned());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn serve(mut s: TcpStream, inner: Arc<Inner>) {
    while inner.frozen.load(Ordering::SeqCst) {
        if inner.stop.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let Some(head) = peek_head(&s) else { return };
    let line = head.lines().next().unwrap_or("").to_owned();
    let mut parts = line.split(' ');
    let (method, path) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or("").to_owned(),
    );
    if let Some(stream) = path.strip_prefix("/ws/") {
        if inner.refused.lock().unwrap().contains(stream) {
            let _ = s.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
            return;
        }
        websocket(s, stream.to_owned(), inner);
        return;
    }
    // Plain HTTP: consume the head and any body.
    let mut head_buf = vec![0u8; head.len() + 4];
    if s.read_exact(&mut head_buf).is_err() {
        return;
    }
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    if s.read_exact(&mut body).is_err() {
        return;
    }
    let (status, answer) = match (method, path.as_str()) {
        ("POST" | "PUT", "/api/destinations") => {
            match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(rule) if rule["id"].is_string() => {
                    inner.posts.fetch_add(1, Ordering::SeqCst);
                    let id = rule["id"].as_str().unwrap().to_owned();
                    inner.rules.lock().unwrap().insert(id, rule.clone());
                    ("200 OK", rule.to_string())
                }
                _ => ("400 Bad Request", "\"bad rule\"".to_owned()),
            }
        }
        ("GET", "/api/destinations/all") => (
            "200 OK",
            serde_json::to_string(&*inner.rules.lock().unwrap()).unwrap(),
        ),
        ("GET", "/healthcheck") => ("200 OK", "\"ok\"".to_owned()),
        _ => ("404 Not Found", "\"not found\"".to_owned()),
    };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
        answer.len()
    );
}

fn websocket(s: TcpStream, stream: String, inner: Arc<Inner>) {
    let Ok(raw) = s.try_clone() else { return };
    let Ok(mut ws) = tungstenite::accept(s) else {
        return;
    };
    if inner.stop.load(Ordering::SeqCst) {
        return;
    }
    let id = inner.next_id.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = mpsc::channel::<Message>();
    inner
        .sockets
        .lock()
        .unwrap()
        .insert(id, raw.try_clone().unwrap());
    inner
        .topics
        .lock()
        .unwrap()
        .entry(stream.clone())
        .or_default()
        .push((id, tx));
    inner
        .connects
        .lock()
        .unwrap()
        .push((stream.clone(), Instant::now()));
    // Short reads, so one thread can both write what the hub sends and
    // notice what the client sends (or that it left).
    raw.set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    'conn: loop {
        if inner.stop.load(Ordering::SeqCst) && !inner.sockets.lock().unwrap().contains_key(&id) {
            break;
        }
        if inner.frozen.load(Ordering::SeqCst) {
            if !inner.sockets.lock().unwrap().contains_key(&id) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(m) => {
                if ws.write(m).is_err() {
                    break;
                }
                while let Ok(m) = rx.try_recv() {
                    if ws.write(m).is_err() {
                        break 'conn;
                    }
                }
                if ws.flush().is_err() {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        match ws.read() {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                publish(&inner, &stream, id, m);
            }
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    if let Some(list) = inner.topics.lock().unwrap().get_mut(&stream) {
        list.retain(|(i, _)| *i != id);
    }
    inner.sockets.lock().unwrap().remove(&id);
    let _ = raw.shutdown(Shutdown::Both);
}

/// A student's browser: a websocket client on `/ws/<stream>` of the hub.
pub struct Student(tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>);

impl Student {
    pub fn connect(hub: &Hub, stream: &str) -> Student {
        let (ws, _) = tungstenite::connect(format!("ws://127.0.0.1:{}/ws/{stream}", hub.port))
            .expect("student connects");
        Student(ws)
    }

    pub fn send(&mut self, text: &str) {
        self.0.send(Message::text(text)).expect("student sends");
    }

    /// The next text frame within `wait`, if one comes.
    pub fn recv_within(&mut self, wait: Duration) -> Option<String> {
        if let tungstenite::stream::MaybeTlsStream::Plain(tcp) = self.0.get_mut() {
            tcp.set_read_timeout(Some(wait)).expect("a read timeout");
        }
        loop {
            match self.0.read() {
                Ok(Message::Text(t)) => return Some(t.to_string()),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }
}
