//! Talking to systemd when it runs us as a `Type=notify` service: READY
//! once the sources and sinks are running, WATCHDOG pings from the event
//! loop itself (so a stalled loop stops pinging and systemd restarts the
//! service), STOPPING at shutdown. The protocol is one datagram per message
//! to `$NOTIFY_SOCKET` (sd_notify(3)); without that variable every call does
//! nothing, so the same binary runs by hand and under systemd.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

enum SocketAddr {
    Path(PathBuf),
    /// Linux abstract namespace (`@name` in `$NOTIFY_SOCKET`).
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` (honouring
    /// `$WATCHDOG_PID`: the watchdog is ours only if it names us).
    pub fn from_env() -> Notifier {
        let path = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok());
        let ours = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        Notifier::new(
            path.map(PathBuf::from),
            usec.filter(|u| *u > 0 && ours).map(Duration::from_micros),
        )
    }

    pub fn new(path: Option<PathBuf>, watchdog: Option<Duration>) -> Notifier {
        let socket = path.and_then(|p| {
            let addr = match p.to_str().and_then(|s| s.strip_prefix('@')) {
                Some(name) => SocketAddr::Abstract(name.as_bytes().to_vec()),
                None => SocketAddr::Path(p),
            };
            UnixDatagram::unbound().ok().map(|s| (s, addr))
        });
        Notifier { socket, watchdog }
    }

    /// How often to ping: half the watchdog period, as sd_watchdog_enabled(3) advises.
    pub fn ping_every(&self) -> Option<Duration> {
        self.socket.as_ref().and(self.watchdog).map(|w| w / 2)
    }

    fn send(&self, text: &str) {
        let Some((socket, addr)) = &self.socket else {
            return;
        };
        let sent = match addr {
            SocketAddr::Path(p) => socket.send_to(text.as_bytes(), p),
            SocketAddr::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|a| socket.send_to_addr(text.as_bytes(), &a))
            }
        };
        if let Err(e) = sent {
            log::debug!("cannot notify systemd ({text:?}): {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_socket_and_nothing_happens_without_one() {
        let dir = std::env::temp_dir().join(format!("edgemeter-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::new(Some(path.clone()), Some(Duration::from_secs(30)));
        assert_eq!(n.ping_every(), Some(Duration::from_secs(15)));
        n.ready("2 sources, 1 sink");
        n.watchdog();
        n.stopping();
        let mut buf = [0u8; 256];
        let mut got = Vec::new();
        for _ in 0..3 {
            let len = listener.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        assert_eq!(
            got,
            [
                "READY=1\nSTATUS=2 sources, 1 sink",
                "WATCHDOG=1",
                "STOPPING=1"
            ]
        );
        // No socket: no pings and no error.
        let none = Notifier::new(None, Some(Duration::from_secs(30)));
        assert_eq!(none.ping_every(), None);
        none.ready("x");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
