//! One stream's task: connect to `ws://host:port/ws/<stream>`, read its
//! frames into the shared [`State`](super::ingest::State) until the
//! connection ends, answer the dashboards' requests on it, and reconnect
//! with backoff ([`super::link`]). The decisions are `ingest`'s and
//! `link`'s; this is the IO around them.

use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message;
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use smol::Async;
use smol::stream::StreamExt;

use super::ingest::Frame;
use super::link::LinkError;
use super::{Config, Shared, release, rest};
use crate::clock::now_ms;
use crate::record::Record;
use crate::runtime::Worker;

/// Bounds connecting and the websocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read in small chunks: 86 idle streams must not hold 128 KiB each.
const READ_CHUNK_BYTES: usize = 4096;
/// At most this many records of a stream's frames wait to be handed to
/// the outbox writer together (a 4 KiB read brings about 17 messages).
pub(super) const HELD_MAX: usize = 64;

type Ws = WebSocketStream<release::Counted<rest::Resting>>;

pub(super) async fn stream_task(i: usize, shared: Rc<Shared>, ctx: Rc<crate::sources::Context>) {
    let stream = shared.config.streams[i].clone();
    let url = format!(
        "ws://{}/ws/{stream}",
        shared.config.api_base().trim_start_matches("http://")
    );
    let (mut failing, mut connected_before) = (false, false);
    let mut out: Vec<Record> = Vec::new();
    loop {
        shared.state.borrow_mut().streams[i]
            .link
            .connecting(now_ms());
        shared.link_changed.ring();
        let attempt =
            smol::future::or(async { Some(connect(&shared.config, &url).await) }, async {
                ctx.shutdown.wait().await;
                None
            })
            .await;
        let error = match attempt {
            None => return,
            Some(Err(e)) => e,
            Some(Ok(ws)) => {
                shared.state.borrow_mut().streams[i]
                    .link
                    .connected(now_ms());
                shared.link_changed.ring();
                if failing {
                    let first = !connected_before;
                    shared
                        .news
                        .borrow_mut()
                        .back(&stream, first, Instant::now());
                    shared.news_added.ring();
                    let _ = shared.provision_kick.try_send(());
                } else {
                    log::debug!("source `{}`: stream {stream} connected", ctx.name);
                }
                failing = false;
                connected_before = true;
                let ended = read_frames(i, &shared, &ctx, ws, &mut out).await;
                // What the last read's frames gave (a dropped link's last
                // frames, an oversized frame's mark) before anything waits.
                ctx.emit.emit_all(&mut out).await;
                match ended {
                    Ended::Shutdown(mut ws) => {
                        // Shutdown: say goodbye, briefly.
                        let _ = smol::future::or(
                            async { ws.close(None).await.map_err(|_| ()) },
                            async {
                                smol::Timer::after(Duration::from_millis(200)).await;
                                Err(())
                            },
                        )
                        .await;
                        return;
                    }
                    Ended::Dropped(e) => e,
                }
            }
        };
        let wait = shared.state.borrow_mut().streams[i].link.dropped(
            now_ms(),
            error.to_string(),
            fastrand::f64(),
        );
        shared.link_changed.ring();
        if !failing {
            // Said with the other streams' news of the moment (`news`).
            let now = Instant::now();
            let error = error.to_string();
            shared.news.borrow_mut().lost(&stream, &error, wait, now);
            shared.news_added.ring();
            failing = true;
        } else {
            log::debug!(
                "source `{}`: stream {stream}: {error}; next attempt in {:.1} s",
                ctx.name,
                wait.as_secs_f64()
            );
        }
        if ctx.shutdown.sleep(wait).await {
            return;
        }
    }
}

/// Connect and shake hands, within [`CONNECT_TIMEOUT`].
async fn connect(config: &Config, url: &str) -> Result<Ws, LinkError> {
    let work = async {
        // Each address in turn (`localhost` may be ::1 first while the
        // session host listens on 127.0.0.1 only).
        let mut tcp = Err(LinkError::Resolve {
            host: config.host.clone(),
            error: "no address".into(),
        });
        for addr in resolve(&config.host, config.port).await? {
            tcp = Async::<std::net::TcpStream>::connect(addr)
                .await
                .map_err(|e| LinkError::Connect {
                    addr: addr.to_string(),
                    error: e.to_string(),
                });
            if tcp.is_ok() {
                break;
            }
        }
        let tcp = tcp?;
        let limit = config.max_frame_bytes.saturating_mul(2);
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(READ_CHUNK_BYTES)
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let tcp = release::Counted::new(rest::Resting::new(tcp, rest::READ_REST));
        let (ws, _) = async_tungstenite::client_async_with_config(url, tcp, Some(ws_config))
            .await
            .map_err(|e| LinkError::Handshake {
                url: url.to_owned(),
                error: e.to_string(),
            })?;
        let mut ws = ws;
        ws.get_mut().handshake_done();
        Ok(ws)
    };
    smol::future::or(work, async {
        smol::Timer::after(CONNECT_TIMEOUT).await;
        Err(LinkError::Timeout {
            url: url.to_owned(),
            after: CONNECT_TIMEOUT,
        })
    })
    .await
}

/// An IP address needs no lookup; a name is resolved off the loop (a
/// lookup can block for seconds).
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, LinkError> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let name = host.to_owned();
    // One lookup thread for all streams (86 of them knock at once after a
    // session host restart), gone when idle.
    static RESOLVER: std::sync::OnceLock<Worker> = std::sync::OnceLock::new();
    RESOLVER
        .get_or_init(|| Worker::new("resolve"))
        .run(move || {
            let addrs: Vec<SocketAddr> = (name.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| LinkError::Resolve {
                    host: name.clone(),
                    error: e.to_string(),
                })?
                .collect();
            if addrs.is_empty() {
                return Err(LinkError::Resolve {
                    host: name,
                    error: "no address".into(),
                });
            }
            Ok(addrs)
        })
        .await
}

/// How a connection's read loop ended.
enum Ended {
    /// Shutdown: the connection is still open, to be closed politely.
    Shutdown(Box<Ws>),
    Dropped(LinkError),
}

/// What woke the read loop.
enum Woke {
    Frame(Option<Result<Message, async_tungstenite::tungstenite::Error>>),
    Silence,
    Shutdown,
}

/// Read until the connection ends or shutdown. A stream silent for
/// `ping_interval` is pinged; one from which nothing arrives for
/// `stall_after` is declared hung and closed. After a large frame the
/// connection is rebuilt with fresh buffers ([`release`]).
async fn read_frames(
    i: usize,
    shared: &Shared,
    ctx: &crate::sources::Context,
    mut ws: Ws,
    out: &mut Vec<Record>,
) -> Ended {
    use async_tungstenite::tungstenite::Error;
    use async_tungstenite::tungstenite::protocol::Role;
    let mut ledger = release::Ledger::default();
    let (ping_interval, stall_after) = (shared.config.ping_interval, shared.config.stall_after);
    let mut heard = std::time::Instant::now();
    let mut pinged = false;
    // One timer, re-armed when it fires rather than per frame: a busy
    // stream costs one reactor timer per ping interval, not per message.
    let mut timer = smol::Timer::at(heard + ping_interval);
    // A large frame was read and its grown buffer is not given back yet.
    let mut grown = false;
    loop {
        if grown && ledger.drained(ws.get_ref().read_bytes()) {
            // Nothing of a next frame is buffered: the same socket with
            // fresh buffers, the grown one freed. Checked after every frame,
            // control frames too: the frame after a large one (a ping, say)
            // can arrive in the read that finished it, and then the moment
            // with nothing buffered comes only after that one.
            let config = *ws.get_config();
            let mut tcp = ws.into_inner();
            tcp.reset();
            ws = WebSocketStream::from_raw_socket(tcp, Role::Client, Some(config)).await;
            ledger = release::Ledger::default();
            grown = false;
        }
        let read = ws.get_ref().read_bytes();
        let woke = {
            let mut next = std::pin::pin!(ws.next());
            // The records of a read's frames go to the writer together
            // (see `Emitter::emit_all`), once no next frame is ready without
            // waiting, or [`HELD_MAX`] are held: a stream whose socket never
            // runs dry must not hold them long. With bytes buffered the next
            // frame is usually whole, and taken without a system call; with
            // none, asking would cost one.
            let buffered = !out.is_empty() && out.len() < HELD_MAX && !ledger.drained(read);
            let ready = if buffered {
                smol::future::poll_once(&mut next).await
            } else {
                None
            };
            match ready {
                Some(frame) => Woke::Frame(frame),
                None if !ctx.emit.emit_all(out).await => Woke::Shutdown,
                None => {
                    smol::future::or(
                        async { Woke::Frame(next.await) },
                        smol::future::or(
                            async {
                                ctx.shutdown.wait().await;
                                Woke::Shutdown
                            },
                            async {
                                (&mut timer).await;
                                Woke::Silence
                            },
                        ),
                    )
                    .await
                }
            }
        };
        let next = match woke {
            Woke::Shutdown => return Ended::Shutdown(Box::new(ws)),
            Woke::Silence => {
                let due = if pinged { stall_after } else { ping_interval };
                if heard.elapsed() < due {
                    // Heard from since the timer was set.
                    timer.set_at(heard + due);
                    continue;
                }
                if pinged {
                    shared.state.borrow_mut().streams[i].link.stalled(now_ms());
                    shared.link_changed.ring();
                    return Ended::Dropped(LinkError::Stalled { after: stall_after });
                }
                pinged = true;
                timer.set_at(heard + stall_after);
                // Bounded: a host that does not read must not hold us here.
                let sent = smol::future::or(
                    async { ws.send(Message::Ping(Default::default())).await.is_ok() },
                    async {
                        smol::Timer::at(heard + stall_after).await;
                        true
                    },
                )
                .await;
                if !sent {
                    return Ended::Dropped(LinkError::Lost("cannot send a ping".to_owned()));
                }
                continue;
            }
            Woke::Frame(next) => next,
        };
        // When the read that brought this frame was: one clock read for
        // the frames of a read.
        let now;
        (heard, now) = ws.get_ref().read_at();
        if pinged {
            pinged = false;
            timer.set_at(heard + ping_interval);
        }
        let len = match &next {
            Some(Ok(m)) => m.len(),
            _ => 0,
        };
        ledger.frame(len);
        grown |= len >= release::RELEASE_ABOVE_BYTES;
        match next {
            Some(Ok(Message::Text(t))) => {
                let mut state = shared.state.borrow_mut();
                state.streams[i].link.carried();
                state.frame(i, Frame::Text(t.as_str()), now, out)
            }
            Some(Ok(Message::Binary(b))) => {
                let mut state = shared.state.borrow_mut();
                state.streams[i].link.carried();
                state.frame(i, Frame::Binary(&b), now, out)
            }
            Some(Ok(Message::Close(c))) => {
                return Ended::Dropped(LinkError::Closed {
                    code: c.map(|c| format!("{} {}", c.code, c.reason)),
                });
            }
            Some(Ok(_)) => continue, // ping, pong: answered by the websocket layer
            Some(Err(Error::Capacity(e))) => {
                shared
                    .state
                    .borrow_mut()
                    .unreadable(i, now, &e.to_string(), out);
                return Ended::Dropped(LinkError::Oversized(e.to_string()));
            }
            Some(Err(e)) => return Ended::Dropped(LinkError::Lost(e.to_string())),
            None => return Ended::Dropped(LinkError::Lost("closed".to_owned())),
        }
        let answers = shared
            .state
            .borrow_mut()
            .desk
            .as_mut()
            .filter(|d| d.has_outgoing(i))
            .map(|d| d.take_outgoing(i));
        if let Some(frames) = answers {
            // Records are not held while a slow host takes its answers.
            if !ctx.emit.emit_all(out).await {
                return Ended::Shutdown(Box::new(ws));
            }
            if let Err(e) = send_answers(shared, &mut ws, frames).await {
                return Ended::Dropped(e);
            }
        }
        shared.changed.ring();
    }
}

/// How long answers to one frame's requests may take to send: a host that
/// does not read must not hold the stream's reading for long.
const ANSWER_SEND_WITHIN: Duration = Duration::from_secs(2);

/// Send the dashboards' answers on the stream they asked on. A host that
/// does not take them within [`ANSWER_SEND_WITHIN`] is counted, not waited
/// for (what was handed to the websocket goes out with its next write).
async fn send_answers(
    shared: &Shared,
    ws: &mut Ws,
    frames: std::collections::VecDeque<String>,
) -> Result<(), LinkError> {
    let n = frames.len() as u64;
    let mut sending = std::pin::pin!(write_answers(ws, frames));
    // Nearly always the socket takes them at once, and then no timer is
    // set (each one is a registration with the reactor).
    let sent = match smol::future::poll_once(&mut sending).await {
        Some(done) => Some(done),
        None => {
            smol::future::or(async { Some(sending.await) }, async {
                smol::Timer::after(ANSWER_SEND_WITHIN).await;
                None
            })
            .await
        }
    };
    match sent {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(LinkError::Lost(format!("cannot send an answer: {e}"))),
        None => {
            if let Some(d) = shared.state.borrow_mut().desk.as_mut() {
                d.counts.frames_unsent += n;
            }
            Ok(())
        }
    }
}

/// Hand every answer frame to the websocket, then flush once: one write to
/// the socket for all of them when it takes them. `send` flushes each
/// frame, and an answer is five (`all_feedback`); on loopback, each write
/// also costs the receiving side's TCP work on this thread.
pub(super) async fn write_answers<S: smol::io::AsyncRead + smol::io::AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    frames: std::collections::VecDeque<String>,
) -> Result<(), async_tungstenite::tungstenite::Error> {
    use futures_util::SinkExt;
    for f in frames {
        SinkExt::feed(ws, Message::Text(f.into())).await?;
    }
    SinkExt::flush(ws).await
}
