//! What the benchmarks that run the real binary share (included by path).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};

/// A fresh directory under target/bench-tmp: the project's own disk, not a
/// tmpfs, so the figures are the disk's.
pub fn bench_dir(tag: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/bench-tmp")
        .join(format!("{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).expect("create the bench directory");
    d
}

/// CPU ticks (user + system, including exited threads), from /proc.
pub fn cpu_ticks(pid: u32) -> u64 {
    stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// User + system ticks from the text of a `/proc/.../stat` file (a
/// process's or one of its threads').
pub fn stat_ticks(stat: &str) -> u64 {
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat; after the `)` they are at 11 and 12.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// CPU time of the calling thread (user + system), with nanosecond
/// resolution: for work done in the benchmark's own thread, where /proc's
/// 10 ms ticks are too coarse.
pub fn thread_cpu() -> std::time::Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write; the clock id is a constant
    // every Linux has.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Build the release binary (the one users run) and return its path; or
/// EDGEMETER_BENCH_BIN, another build of it (one with symbols for `perf`, or
/// another profile, to compare two builds on the same benchmark).
pub fn release_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("EDGEMETER_BENCH_BIN") {
        return PathBuf::from(bin);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Not with the variables cargo sets for a running bench (the package's
    // name, version and directory): ring's build script asks to be rerun
    // when they change, so a build with them and one without (the test
    // command's, cargo-deb's) each rebuilt ring and everything above it,
    // the binary's LTO included, about 90 s each time
    // (`CARGO_LOG=cargo::core::compiler::fingerprint=info`:
    // "EnvVarChanged CARGO_MANIFEST_DIR", then "CARGO_PKG_NAME").
    let mut cargo = std::process::Command::new("cargo");
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "OUT_DIR",
            ]
            .contains(&name.as_ref())
        {
            cargo.env_remove(name.as_ref());
        }
    }
    let status = cargo
        .args(["build", "--release", "--quiet", "--bin", "edgemeter"])
        .current_dir(root)
        .status()
        .expect("run cargo");
    assert!(status.success(), "could not build the release edgemeter");
    // Where cargo put it: CARGO_TARGET_DIR (relative to the package) if set.
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), |d| root.join(d));
    target.join("release/edgemeter")
}

/// Write an upstream's config into `dir` (`up.toml`, returned): listening on
/// `port`, state in `dir/state`, a token `t-<agent>` for each of `agents`,
/// an admin token `admin`, and `upstream` and `rest` added to the
/// `[upstream]` table and after it.
pub fn upstream_config(
    dir: &Path,
    port: u16,
    agents: &[String],
    upstream: &str,
    rest: &str,
) -> PathBuf {
    std::fs::create_dir_all(dir.join("agents")).expect("agents");
    for a in agents {
        std::fs::write(
            dir.join("agents").join(format!("{a}.token")),
            format!("t-{a}"),
        )
        .expect("token");
    }
    std::fs::write(dir.join("admin.token"), "admin").expect("admin");
    let path = dir.join("up.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nid = \"bench-up\"\nstate_dir = \"{}\"\n\n[upstream]\nlisten = \"127.0.0.1:{port}\"\n\
             tokens_dir = \"agents\"\nadmin_token_file = \"admin.token\"\n{upstream}\n{rest}",
            dir.join("state").display()
        ),
    )
    .expect("config");
    path
}

/// The `Environment=` settings of one of our systemd units (`unit` is its
/// file name under `systemd/`), so that a benchmark runs the binary as the
/// unit does.
pub fn unit_environment(unit: &str) -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(unit);
    let text = std::fs::read_to_string(&path).expect("read the systemd unit");
    text.lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .expect("Environment=NAME=value in the unit");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// Start `edgemeter upstream -c config` (logging warnings to our stderr)
/// and wait, at most 20 s, until it listens on `port`. It runs with its
/// unit's environment (systemd/edgemeter-upstream.service), as installed.
pub fn start_upstream(bin: &Path, config: &Path, port: u16) -> std::process::Child {
    start_upstream_with(bin, config, port, &unit_environment(UPSTREAM_UNIT))
}

pub const UPSTREAM_UNIT: &str = "edgemeter-upstream.service";

/// [`start_upstream`] with the given environment instead of the unit's.
pub fn start_upstream_with(
    bin: &Path,
    config: &Path,
    port: u16,
    env: &[(String, String)],
) -> std::process::Child {
    use std::process::{Command, Stdio};
    let child = Command::new(bin)
        .args(["upstream", "-c"])
        .arg(config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("EDGEMETER_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the upstream");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the upstream did not start listening"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child
}

/// The middle one of `v` by `key`; of an even count, the higher of the two
/// in the middle (a cost's median is then never the kinder figure).
pub fn median_by<T>(mut v: Vec<T>, key: impl Fn(&T) -> f64) -> T {
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    v.swap_remove(v.len() / 2)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// Read one HTTP response from a keep-alive connection; its status.
pub fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<u16> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head.get(9..12)?.parse().ok();
                buf.drain(..end + 4 + len);
                return status;
            }
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Users a relay stream's messages come from.
pub const USERS_PER_STREAM: usize = 200;

/// The relay benchmarks' 1,000 messages of one stream, sent round and
/// round: logging envelopes of `analytics` type, 186 bytes, from
/// [`USERS_PER_STREAM`] users, as the session host relays them.
/// With `requests`, every 100th message is a dashboard's `all_feedback`
/// request (ten users a stream), answered with five frames.
pub fn relay_messages(stream: &str, requests: bool) -> Vec<String> {
    (0..1000)
        .map(|i| {
            if requests && i % 100 == 99 {
                return format!(
                    r#"{{"user":"5e1f0000-0000-4000-8000-{stream}{:06}","t":{},"exp":"spinner","hardware":"{stream}","course":"engdes1","type":"request","payload":{{"content":"all_feedback","graph":"spinner-engdes1-2"}}}}"#,
                    i / 100,
                    1_700_000_000_000u64 + i as u64 * 250
                );
            }
            let user = format!("5e1f0000-0000-4000-8000-{stream}{:06}", i % USERS_PER_STREAM);
            let log = ["voltage", "speed", "position", "voltage_ramp", "speed_ramp"][i % 5];
            format!(
                r#"{{"user":"{user}","t":{},"exp":"spinner","hardware":"{stream}","course":"engdes1","type":"analytics","payload":{{"log":"{log}","data":{{"set":{}.5}}}}}}"#,
                1_700_000_000_000u64 + i as u64 * 250,
                i % 7
            )
        })
        .collect()
}

/// A relay floor's row: arrival (ms), user, type, the message.
pub type FloorRow = (i64, String, String, Vec<u8>);

/// The relay floors' work on one message (`benches/relay.rs --floor` and
/// `relay_ingest`'s parse floor): its `user` and `type` read, borrowed,
/// then kept as a row with a copy of the message. None if it is not a
/// logging envelope.
pub fn floor_row(message: &str, arrival_ms: i64) -> Option<FloorRow> {
    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow)]
        user: std::borrow::Cow<'a, str>,
        #[serde(borrow, rename = "type")]
        kind: std::borrow::Cow<'a, str>,
    }
    let e = serde_json::from_str::<Envelope>(message).ok()?;
    Some((
        arrival_ms,
        e.user.into_owned(),
        e.kind.into_owned(),
        message.as_bytes().to_vec(),
    ))
}

/// The least-squares line through (minute, KiB): its slope in KiB per
/// minute, and the line itself.
pub fn least_squares(points: &[(f64, u64)]) -> (f64, impl Fn(f64) -> f64) {
    let n = points.len() as f64;
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1 as f64).sum::<f64>() / n,
    );
    let slope = points
        .iter()
        .map(|p| (p.0 - mx) * (p.1 as f64 - my))
        .sum::<f64>()
        / points
            .iter()
            .map(|p| (p.0 - mx).powi(2))
            .sum::<f64>()
            .max(1e-9);
    (slope, move |x: f64| my + slope * (x - mx))
}

/// How a resident set sampled over a run moved after its first minute:
/// what both soaks (`upstream_soak`, `relay --soak`) report and judge.
pub struct Drift {
    /// The least-squares line through the samples after the first minute,
    /// at the first minute and the last, KiB; its slope in KiB a minute,
    /// and the slope over the second half alone (a cache filling towards
    /// its bound flattens; a leak does not).
    pub from: f64,
    pub to: f64,
    pub slope: f64,
    pub late_slope: f64,
    /// The same line through each half minute's lowest sample: a transient
    /// only ever adds to a sample, a leak raises the lowest ones too.
    pub floor_from: f64,
    pub floor_to: f64,
    pub floor_slope: f64,
    /// The lowest and highest sample after the first minute, and the first.
    pub band: (u64, u64),
    pub first: u64,
}

impl Drift {
    /// (minute, KiB) samples of a run of `minutes`.
    pub fn of(samples: &[(f64, u64)], minutes: f64) -> Drift {
        let warm: Vec<(f64, u64)> = samples.iter().copied().filter(|(m, _)| *m >= 1.0).collect();
        let late: Vec<(f64, u64)> = warm
            .iter()
            .copied()
            .filter(|(m, _)| *m >= minutes / 2.0)
            .collect();
        // Half-minute windows, so that a 2-minute run has two.
        let floors: Vec<(f64, u64)> = (2..(minutes * 2.0) as u64)
            .filter_map(|k| {
                let (from, to) = (k as f64 / 2.0, (k + 1) as f64 / 2.0);
                let lowest = warm.iter().filter(|(m, _)| *m > from && *m <= to);
                lowest.map(|p| p.1).min().map(|kib| (from + 0.25, kib))
            })
            .collect();
        assert!(
            floors.len() >= 2,
            "too short a run for a line through the floor"
        );
        let (slope, line) = least_squares(&warm);
        let (late_slope, _) = least_squares(&late);
        let (floor_slope, floor) = least_squares(&floors);
        Drift {
            from: line(1.0),
            to: line(minutes),
            slope,
            late_slope,
            floor_from: floor(1.0),
            floor_to: floor(minutes),
            floor_slope,
            band: (
                warm.iter().map(|p| p.1).min().unwrap_or(0),
                warm.iter().map(|p| p.1).max().unwrap_or(0),
            ),
            first: warm.first().map_or(0, |p| p.1),
        }
    }

    /// Growth after the first minute on the line, in %.
    pub fn growth(&self) -> f64 {
        (self.to - self.from) / self.from.max(1.0) * 100.0
    }

    /// The same on the floor's line.
    pub fn floor_growth(&self) -> f64 {
        (self.floor_to - self.floor_from) / self.floor_from.max(1.0) * 100.0
    }
}
