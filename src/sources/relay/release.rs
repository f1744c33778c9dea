//! Giving back the memory one large frame made the websocket layer grow.
//!
//! tungstenite reads into one buffer per connection and grows it to hold
//! the largest frame seen; it never shrinks it (about 2 MiB per stream
//! after one frame at the default limit, kept for the life of the
//! connection). Its public API cannot shrink it, but a connection can be
//! rebuilt around the same TCP socket with fresh buffers
//! (`WebSocketStream::from_raw_socket`): no reconnect, so no message is
//! missed. That is only safe when the old buffer holds no byte of a next
//! frame, so [`Counted`] counts the bytes the socket delivered and
//! [`Ledger`] the bytes the frames received so far account for; when the
//! two are equal, nothing is buffered.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use smol::io::{AsyncRead, AsyncWrite};

use crate::clock::now_ms;

/// A frame (message) at least this large is followed by a rebuild.
pub const RELEASE_ABOVE_BYTES: usize = 64 * 1024;

/// The handshake's answer is kept (this far) to find where it ends.
const HEAD_MAX_BYTES: usize = 16 * 1024;

/// A socket that counts what it delivered to the reader, and remembers
/// when it last delivered.
pub struct Counted<S> {
    inner: S,
    read: u64,
    /// When the last read returned data: the clock and the wall clock (ms
    /// since the epoch). The frames of a read arrived by then; they are
    /// stamped with it, the clocks read once a read, not once a frame.
    read_at: Option<(Instant, i64)>,
    /// What the handshake read, until [`Counted::handshake_done`].
    head: Option<Vec<u8>>,
}

impl<S> Counted<S> {
    pub fn new(inner: S) -> Counted<S> {
        Counted {
            inner,
            read: 0,
            read_at: None,
            head: Some(Vec::new()),
        }
    }

    pub fn read_bytes(&self) -> u64 {
        self.read
    }

    /// The handshake is over: count from the end of its answer. A read
    /// during the handshake may already hold the start of the first frame
    /// (the host sends at once); those bytes are frame bytes. If the end of
    /// the answer cannot be found, the counts can never agree and this
    /// connection is simply never rebuilt.
    pub fn handshake_done(&mut self) {
        let head = self.head.take().unwrap_or_default();
        self.read = match head.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) => (head.len() - end - 4) as u64,
            None => u64::MAX,
        };
    }

    /// Count from zero (after a rebuild, with nothing buffered).
    pub fn reset(&mut self) {
        self.read = 0;
    }

    /// When the last read that returned data was (now if none was).
    pub fn read_at(&self) -> (Instant, i64) {
        self.read_at.unwrap_or_else(|| (Instant::now(), now_ms()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            let n = *n;
            self.read = self.read.saturating_add(n as u64);
            if n > 0 {
                self.read_at = Some((Instant::now(), now_ms()));
            }
            if let Some(head) = &mut self.head
                && head.len() + n <= HEAD_MAX_BYTES
            {
                head.extend_from_slice(&buf[..n]);
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
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

/// The bytes the frames received on a connection account for, counting
/// each as one unfragmented server frame with the shortest header (RFC
/// 6455 §5.2: 2 bytes, plus 2 or 8 of extended length). Any other framing
/// (fragments, longer headers, a mask) only makes the real count larger,
/// so `consumed == read` can be trusted and a mismatch means "not now".
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ledger {
    pub consumed: u64,
}

impl Ledger {
    pub fn frame(&mut self, payload: usize) {
        let header = match payload {
            0..=125 => 2,
            126..=65_535 => 4,
            _ => 10,
        };
        self.consumed += (header + payload) as u64;
    }

    /// Whether a connection that delivered `read` bytes holds none unread.
    pub fn drained(&self, read: u64) -> bool {
        self.consumed == read
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_with_the_handshake_answer_count_as_frame_bytes() {
        let mut c = Counted::new(());
        c.head = Some(b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\n\r\n\x81\x05hel".to_vec());
        c.handshake_done();
        assert_eq!(c.read_bytes(), 5, "the first frame's first 5 bytes");
        let mut c = Counted::new(());
        c.head = Some(b"HTTP/1.1 101 Switching\r\n\r\n".to_vec());
        c.handshake_done();
        assert_eq!(c.read_bytes(), 0);
        let mut c = Counted::new(());
        c.head = Some(b"HTTP/1.1 101 cut off".to_vec());
        c.handshake_done();
        assert!(!Ledger::default().drained(c.read_bytes()), "never rebuilt");
    }

    /// Frames are stamped with the time of the read that brought them: a
    /// read that returns data sets it, an empty one (end of stream) not.
    #[test]
    fn reads_are_stamped_when_they_return_data() {
        use smol::io::AsyncReadExt;
        let mut c = Counted::new(smol::io::Cursor::new(b"abc".to_vec()));
        let mut buf = [0u8; 2];
        let before = (Instant::now(), now_ms());
        assert_eq!(smol::block_on(c.read(&mut buf)).unwrap(), 2);
        let first = c.read_at.expect("stamped");
        assert!(first.0 >= before.0 && first.1 >= before.1);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(smol::block_on(c.read(&mut buf)).unwrap(), 1);
        let second = c.read_at.expect("stamped");
        assert!(second.0 >= first.0 + std::time::Duration::from_millis(5));
        assert_eq!(c.read_at(), second);
        assert_eq!(smol::block_on(c.read(&mut buf)).unwrap(), 0);
        assert_eq!(c.read_at, Some(second), "an empty read delivers nothing");
    }

    #[test]
    fn shortest_headers_by_payload_length() {
        let mut l = Ledger::default();
        for (payload, total) in [
            (0, 2),
            (125, 2 + 125),
            (126, 4 + 126),
            (65_535, 4 + 65_535),
            (65_536, 10 + 65_536),
        ] {
            let before = l.consumed;
            l.frame(payload);
            assert_eq!(l.consumed - before, total, "{payload}");
        }
        assert!(l.drained(l.consumed));
        assert!(
            !l.drained(l.consumed + 1),
            "a byte of a next frame is buffered"
        );
    }

    /// Real frames, as tungstenite writes them for a server, account for
    /// exactly the bytes on the wire.
    #[test]
    fn the_ledger_matches_tungstenites_own_framing() {
        use async_tungstenite::tungstenite::Message;
        use async_tungstenite::tungstenite::protocol::{Role, WebSocket};
        let mut ledger = Ledger::default();
        let wire = std::io::Cursor::new(Vec::new());
        let mut ws = WebSocket::from_raw_socket(wire, Role::Server, None);
        for len in [0usize, 10, 125, 126, 1000, 65_535, 65_536, 300_000] {
            ws.send(Message::text("x".repeat(len))).unwrap();
            ledger.frame(len);
        }
        assert!(ledger.drained(ws.get_ref().get_ref().len() as u64));
    }
}
