//! Reading a busy stream in bursts: one wake-up for many messages.
//!
//! A session host writes each message as it comes, so a stream carrying
//! 1,700 messages a second would wake the thread, read a few hundred bytes
//! and go back to the reactor 1,700 times a second, and the wake-up, the
//! system calls and the executor's bookkeeping cost more than the messages
//! themselves. [`Resting`] sits under the websocket layer: once a read finds
//! the socket drained while data has been flowing, it rests on a timer
//! until the next tick (every [`READ_REST`], the same ticks for every
//! stream, so one wake-up reads them all) instead of asking the reactor to
//! wake it at the next byte, and then takes whatever the kernel gathered
//! meanwhile in one read. A read that finds nothing after a rest goes back
//! to waiting on the socket, so an idle stream costs nothing and its first
//! message is read at once.
//!
//! What it costs: a message waits at most [`READ_REST`] in the kernel's
//! socket buffer before it is read. Those bytes are not the agent's yet: a
//! `kill -9` loses them as it loses everything in that buffer, so the
//! window in which a crash can lose a message grows by at most this much
//! (the outbox's header says what each failure can lose). Pings, pongs and
//! closes wait the same; every timeout of the relay source is seconds.

use std::cell::RefCell;
use std::future::Future;
use std::io::Read;
use std::net::TcpStream;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use smol::io::{AsyncRead, AsyncWrite};
use smol::{Async, Timer};

/// How long a stream that was just drained rests before it is read again.
/// At 1,700 messages a second that is about 34 messages per read.
pub const READ_REST: Duration = Duration::from_millis(20);

/// When a rest that begins at `now` ends: at the next tick, a multiple of
/// `rest` counted from one moment for the whole process. Every stream
/// resting in the same period then wakes at the same moment, and the
/// thread reads them all in one turn of the reactor instead of waking for
/// each stream on its own: at 20,000 messages a second over 12 streams, 50
/// wake-ups a second instead of 600, and the analytics state stays in the
/// cache from one stream's messages to the next. A rest is never longer
/// than `rest`.
fn rest_until(now: Instant, rest: Duration) -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| now);
    let period = rest.as_nanos().max(1);
    let next = (now.duration_since(epoch).as_nanos() / period + 1) * period;
    epoch + Duration::from_nanos(u64::try_from(next).unwrap_or(u64::MAX))
}

/// A tick that resting streams of this thread wait for: one timer for all
/// of them, not one each. Every timer is an operation the reactor takes
/// from a queue it shares with other threads, and a write to its eventfd.
struct Tick {
    at: Instant,
    timer: Timer,
    waiters: Arc<Waiters>,
}

/// The tasks waiting for a tick; its timer wakes them all.
#[derive(Default)]
struct Waiters(Mutex<Vec<Waker>>);

impl Wake for Waiters {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let waiting = std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner));
        waiting.into_iter().for_each(Waker::wake);
    }
}

thread_local! {
    /// The ticks this thread's streams wait for: one, but for a moment
    /// around each tick (and in tests that rest for different periods).
    static TICKS: RefCell<Vec<Tick>> = const { RefCell::new(Vec::new()) };
}

/// Ready once the tick at `at` has come; until then the task is woken by
/// the one timer of that tick.
fn poll_tick(at: Instant, cx: &mut Context<'_>) -> Poll<()> {
    let now = Instant::now();
    TICKS.with(|ticks| {
        let mut ticks = ticks.borrow_mut();
        // Ticks that have come: their waiters are woken now even if the
        // reactor has not fired the timer yet, as it is dropped.
        ticks.retain(|t| {
            let passed = t.at <= now;
            if passed {
                Waker::from(t.waiters.clone()).wake();
            }
            !passed
        });
        if at <= now {
            return Poll::Ready(());
        }
        let i = match ticks.iter().position(|t| t.at == at) {
            Some(i) => i,
            None => {
                ticks.push(Tick {
                    at,
                    timer: Timer::at(at),
                    waiters: Arc::default(),
                });
                ticks.len() - 1
            }
        };
        let tick = &mut ticks[i];
        {
            let mut waiting = tick
                .waiters
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                waiting.push(cx.waker().clone());
            }
        }
        let all = Waker::from(tick.waiters.clone());
        match Pin::new(&mut tick.timer).poll(&mut Context::from_waker(&all)) {
            Poll::Ready(_) => {
                ticks.remove(i).waiters.wake_by_ref();
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    })
}

/// A TCP socket whose reads rest after draining it (see the module).
pub struct Resting {
    inner: Async<TcpStream>,
    rest: Duration,
    /// The last read returned data: if the next finds nothing, rest.
    flowing: bool,
    /// Resting until this tick (only its timer is registered meanwhile).
    resting: Option<Instant>,
}

impl Resting {
    pub fn new(inner: Async<TcpStream>, rest: Duration) -> Resting {
        Resting {
            inner,
            rest,
            flowing: false,
            resting: None,
        }
    }
}

impl AsyncRead for Resting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if let Some(at) = this.resting {
            if poll_tick(at, cx).is_pending() {
                return Poll::Pending;
            }
            this.resting = None;
        }
        if !this.flowing || buf.is_empty() {
            // Idle: wait on the socket itself, woken at its first byte.
            let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
            this.flowing = matches!(polled, Poll::Ready(Ok(n)) if n > 0);
            return polled;
        }
        // Flowing: read without registering with the reactor (the socket
        // is non-blocking); drained means rest, not wait for the next byte.
        match this.inner.get_ref().read(buf) {
            Ok(n) => {
                this.flowing = n > 0;
                Poll::Ready(Ok(n))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                this.flowing = false;
                if this.rest.is_zero() {
                    // No rest: wait on the socket as when idle.
                    return Pin::new(&mut this.inner).poll_read(cx, buf);
                }
                let at = rest_until(Instant::now(), this.rest);
                if poll_tick(at, cx).is_ready() {
                    // The tick came meanwhile: wait on the socket.
                    return Pin::new(&mut this.inner).poll_read(cx, buf);
                }
                this.resting = Some(at);
                Poll::Pending
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Resting {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smol::io::AsyncReadExt;
    use std::io::Write;
    use std::net::TcpListener;

    /// A connected pair: the reading end as a [`Resting`], and the writing end.
    fn pair(rest: Duration) -> (Resting, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (reader, _) = listener.accept().unwrap();
        writer.set_nodelay(true).unwrap();
        (Resting::new(Async::new(reader).unwrap(), rest), writer)
    }

    /// 300 messages written 1 ms apart; returns the bytes read, in order,
    /// and how many reads returned data.
    fn read_a_trickle(rest: Duration) -> (Vec<u8>, usize) {
        let (mut reader, mut writer) = pair(rest);
        let sender = std::thread::spawn(move || {
            for i in 0..300 {
                writer
                    .write_all(format!("message {i}\n").as_bytes())
                    .unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let (mut got, mut reads) = (Vec::new(), 0);
        smol::block_on(async {
            let mut buf = [0u8; 4096];
            loop {
                let n = reader.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                reads += 1;
                got.extend_from_slice(&buf[..n]);
            }
        });
        sender.join().unwrap();
        (got, reads)
    }

    #[test]
    fn a_flowing_stream_is_read_in_bursts_and_nothing_is_lost() {
        let expected: String = (0..300).map(|i| format!("message {i}\n")).collect();
        let (got, reads) = read_a_trickle(READ_REST);
        assert_eq!(String::from_utf8(got).unwrap(), expected);
        // 300 ms or more of writing, 20 ms rests: about 15 reads; one per
        // message if the rest did nothing.
        assert!(reads <= 60, "{reads} reads for 300 messages");
        let (got, reads_unrested) = read_a_trickle(Duration::ZERO);
        assert_eq!(String::from_utf8(got).unwrap(), expected);
        assert!(
            reads_unrested > reads,
            "without a rest: {reads_unrested} reads, with: {reads}"
        );
    }

    #[test]
    fn rests_end_on_shared_ticks_and_never_last_longer_than_the_rest() {
        let rest = Duration::from_millis(10);
        let start = Instant::now();
        let first = rest_until(start, rest);
        assert!(first > start && first <= start + rest);
        for us in [1, 700, 3_000, 9_999, 10_000, 10_001, 25_000, 123_456] {
            let now = start + Duration::from_micros(us);
            let end = rest_until(now, rest);
            assert!(end > now && end <= now + rest, "{us} µs: {end:?}");
            // Streams that begin resting in the same period wake together.
            let later = (now + Duration::from_micros(1)).min(end - Duration::from_nanos(1));
            assert_eq!(rest_until(later, rest), end, "{us} µs");
            // Ticks are whole periods apart.
            let apart = end.duration_since(first).as_nanos() % rest.as_nanos();
            assert_eq!(apart, 0, "{us} µs");
        }
    }

    #[test]
    fn streams_resting_together_share_one_timer_and_all_wake() {
        let rest = Duration::from_millis(50);
        let mut streams: Vec<(Resting, TcpStream)> = (0..3).map(|_| pair(rest)).collect();
        let mut buf = [0u8; 64];
        for (i, (reader, writer)) in streams.iter_mut().enumerate() {
            writer.write_all(format!("{i}").as_bytes()).unwrap();
            // Idle: read as soon as the byte comes; then drained: rests.
            assert_eq!(smol::block_on(reader.read(&mut buf)).unwrap(), 1);
            assert!(smol::block_on(smol::future::poll_once(reader.read(&mut buf))).is_none());
            assert!(reader.resting.is_some());
        }
        let mut ticks: Vec<Instant> = streams.iter().filter_map(|(r, _)| r.resting).collect();
        ticks.dedup();
        // One timer per tick, not per stream (the three began resting
        // within microseconds, so in one period unless a tick fell between).
        assert_eq!(TICKS.with(|t| t.borrow().len()), ticks.len());
        assert!(ticks.len() <= 2);
        for (i, (_, writer)) in streams.iter_mut().enumerate() {
            writer.write_all(format!("again {i}").as_bytes()).unwrap();
        }
        // Every stream wakes at its tick and reads what came meanwhile.
        for (i, (reader, _)) in streams.iter_mut().enumerate() {
            let read = smol::block_on(smol::future::or(
                async { Some(reader.read(&mut buf).await.unwrap()) },
                async {
                    Timer::after(Duration::from_secs(5)).await;
                    None
                },
            ));
            let n = read.unwrap_or_else(|| panic!("stream {i} did not wake within 5 s"));
            assert_eq!(&buf[..n], format!("again {i}").as_bytes());
        }
        assert!(streams.iter().all(|(r, _)| r.resting.is_none()));
    }

    #[test]
    fn a_rest_that_finds_nothing_goes_back_to_waiting_on_the_socket() {
        let (mut reader, mut writer) = pair(Duration::from_millis(20));
        let mut buf = [0u8; 64];
        writer.write_all(b"a").unwrap();
        let n = smol::block_on(reader.read(&mut buf)).unwrap();
        assert_eq!(&buf[..n], b"a");
        assert!(reader.flowing);
        // Drained while flowing: rests on the timer.
        assert!(smol::block_on(smol::future::poll_once(reader.read(&mut buf))).is_none());
        assert!(reader.resting.is_some() && !reader.flowing);
        std::thread::sleep(Duration::from_millis(40));
        // The rest is over and nothing came: waiting on the socket again,
        // so the next byte of an idle stream is read when it comes.
        assert!(smol::block_on(smol::future::poll_once(reader.read(&mut buf))).is_none());
        assert!(reader.resting.is_none() && !reader.flowing);
        writer.write_all(b"b").unwrap();
        let n = smol::block_on(reader.read(&mut buf)).unwrap();
        assert_eq!(&buf[..n], b"b");
        drop(writer);
        let n = smol::block_on(reader.read(&mut buf)).unwrap();
        assert_eq!(n, 0, "the end of the stream");
    }
}
