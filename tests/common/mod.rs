//! Helpers for tests that run the real `edgemeter` binary.
#![allow(dead_code)]

pub mod browser;
pub mod http;
pub mod moto;
pub mod pg;
pub mod relay;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_edgemeter");

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!(
            "edgemeter-it-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&d).expect("create temp dir");
        TempDir(d)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// Run `edgemeter ARGS` to completion; (exit code, stdout, stderr).
pub fn edgemeter(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run edgemeter");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `edgemeter run` whose stderr lines are collected.
pub struct Agent {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    pub fn start(config: &Path, log: &str) -> Agent {
        Agent::start_with_env(config, log, &[])
    }

    /// With extra environment variables (e.g. systemd's `NOTIFY_SOCKET`).
    pub fn start_with_env(config: &Path, log: &str, env: &[(&str, &str)]) -> Agent {
        Agent::start_command("run", config, log, env)
    }

    /// `edgemeter upstream -c config`, waiting (bounded) until it listens.
    pub fn start_upstream(config: &Path, log: &str, env: &[(&str, &str)]) -> Agent {
        let agent = Agent::start_command("upstream", config, log, env);
        assert!(
            agent.wait_for_line("upstream listening on", Duration::from_secs(15)),
            "the upstream did not start:\n{}",
            agent.stderr()
        );
        agent
    }

    /// `edgemeter <command> -c config` with its stderr collected.
    pub fn start_command(command: &str, config: &Path, log: &str, env: &[(&str, &str)]) -> Agent {
        let mut c = Command::new(BIN);
        c.args([command, "-c"]).arg(config);
        Agent::spawn(c, log, env)
    }

    /// `edgemeter run -c config` with `dir` on a disk of its own of `mib`
    /// MiB: a tmpfs mounted in a private mount namespace (`unshare`,
    /// util-linux), which goes away with the process. [`SmallDisk`] fills
    /// it and frees it again.
    pub fn start_on_small_disk(config: &Path, log: &str, dir: &Path, mib: u32) -> Agent {
        Agent::on_small_disk(EXEC, "run", config, log, dir, mib)
    }

    /// The shell `script` run on such a disk, in its namespace: it finds
    /// the disk in `$DISK`, and runs `edgemeter $CMD -c $CFG` as
    /// `"$BIN" "$CMD" -c "$CFG"`. The last command it runs should be
    /// `exec`: this process's pid is then the agent's.
    pub fn on_small_disk(
        script: &str,
        command: &str,
        config: &Path,
        log: &str,
        dir: &Path,
        mib: u32,
    ) -> Agent {
        std::fs::create_dir_all(dir).expect("create the mount point");
        let mut c = Command::new("unshare");
        // A user namespace too, so that this needs no root.
        c.args(["--map-root-user", "--mount", "--propagation", "private"])
            .args(["sh", "-c"])
            .arg(format!(
                r#"mount -t tmpfs -o "size=$MIB"m edgemeter-test "$DISK" || {{ echo "cannot mount a tmpfs in a private namespace (unshare --map-root-user needs user namespaces: sysctl kernel.unprivileged_userns_clone=1, or run as root)" >&2; exit 97; }}; {script}"#
            ))
            .env("MIB", mib.to_string())
            .env("DISK", dir)
            .env("BIN", BIN)
            .env("CMD", command)
            .env("CFG", config);
        Agent::spawn(c, log, &[])
    }

    fn spawn(mut command: Command, log: &str, env: &[(&str, &str)]) -> Agent {
        let mut child = command
            .env("EDGEMETER_LOG", log)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn edgemeter");
        let stderr = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("lines lock").push(line);
            }
        });
        Agent {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// Start and wait (bounded) until the agent says it is running.
    pub fn start_running(config: &Path, log: &str) -> Agent {
        let agent = Agent::start(config, log);
        assert!(
            agent.wait_for_line("running as agent", Duration::from_secs(10)),
            "the agent did not start:\n{}",
            agent.stderr()
        );
        agent
    }

    /// SIGTERM, and insist on a clean exit within the 5 s the agent promises.
    pub fn stop(&mut self) {
        self.signal("TERM");
        let Some(status) = self.wait_exit(Duration::from_secs(5)) else {
            panic!(
                "must exit within 5 s of SIGTERM; its log so far:\n{}",
                self.stderr()
            );
        };
        assert!(status.success(), "exit status {status}:\n{}", self.stderr());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait (bounded) until a stderr line contains `needle`.
    pub fn wait_for_line(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self
                .lines
                .lock()
                .expect("lines lock")
                .iter()
                .any(|l| l.contains(needle))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Wait (bounded) until a stderr line contains `needle`, or fail the
    /// test with the log so far.
    pub fn expect_line(&self, needle: &str, within: Duration) {
        assert!(
            self.wait_for_line(needle, within),
            "no line with {needle:?} within {within:?}; the log:\n{}",
            self.stderr()
        );
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill -{sig} failed");
    }

    /// Wait for exit, at most `within`; None if it is still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                if let Some(r) = self.reader.take() {
                    r.join().ok();
                }
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.wait_exit(Duration::from_secs(10))
            .expect("exit after SIGKILL");
    }

    /// The lines the reader thread took from the pipe so far. While the
    /// process runs, a line it wrote a moment ago may not be here yet (CI
    /// once failed so): to assert that a line is written, `wait_for_line`.
    pub fn stderr(&self) -> String {
        self.lines.lock().expect("lines lock").join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Never leave a process behind, whatever the test did.
        if self.child.try_wait().ok().flatten().is_none() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

/// The script of [`Agent::on_small_disk`] that only runs the command.
pub const EXEC: &str = r#"exec "$BIN" "$CMD" -c "$CFG""#;

/// The disk [`Agent::start_on_small_disk`] gave a process, seen from
/// outside its mount namespace (`/proc/PID/root`).
pub struct SmallDisk {
    filler: PathBuf,
}

impl SmallDisk {
    pub fn of(pid: u32, dir: &Path) -> SmallDisk {
        let inside = dir.strip_prefix("/").expect("an absolute path");
        SmallDisk {
            filler: Path::new(&format!("/proc/{pid}/root"))
                .join(inside)
                .join("filler"),
        }
    }

    /// Write a file until the disk is full (bounded by the disk's size);
    /// how many bytes it took.
    pub fn fill(&self) -> u64 {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.filler)
            .expect("open the filler");
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        // A tmpfs of at most 1 GiB: 16,384 chunks.
        for _ in 0..16_384 {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        // Whatever a partial chunk left, 512 bytes at a time.
        for _ in 0..128 {
            match f.write(&chunk[..512]) {
                Ok(n) if n > 0 => written += n as u64,
                _ => break,
            }
        }
        written
    }

    /// A file on that disk, as its process sees it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.filler.with_file_name(name)
    }

    /// A copy of the SQLite database `name` (with its WAL, not its shared
    /// memory index, which SQLite rebuilds) in `to`: SQLite resolves the
    /// symbolic link `/proc/PID/root` to this process's own root, so it
    /// cannot open the file in place. A WAL copied mid-write ends in a
    /// torn frame, which SQLite ignores: the copy is the last commit's.
    pub fn copy_database(&self, name: &str, to: &Path) -> PathBuf {
        let db = to.join(name);
        for suffix in ["-wal", ""] {
            let file = format!("{name}{suffix}");
            let _ = std::fs::remove_file(to.join(&file));
            let _ = std::fs::copy(self.path(&file), to.join(&file));
        }
        let _ = std::fs::remove_file(to.join(format!("{name}-shm")));
        db
    }

    /// Free `bytes` of what [`SmallDisk::fill`] took.
    pub fn free_some(&self, bytes: u64) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.filler)
            .expect("open the filler");
        let len = f.metadata().expect("its size").len();
        f.set_len(len.saturating_sub(bytes))
            .expect("truncate the filler");
    }

    pub fn free(&self) {
        std::fs::remove_file(&self.filler).expect("remove the filler");
    }
}

/// The one line of `log` that says a settling spell ended (it contains
/// `needle`): a failure that came and went is one spell, so there is one
/// such line, and it says it settled.
pub fn the_settled_end<'a>(log: &'a str, needle: &str) -> &'a str {
    let ends: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(ends.len(), 1, "one end of one spell:\n{log}");
    assert!(ends[0].contains(", none in the last 10 s"), "{}", ends[0]);
    ends[0]
}

/// Poll `f` every 50 ms until it holds, at most `limit`; whether it held.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// An `xx_gateway` source for 2-second epochs, reading `gateway.yaml` and
/// `gateway-IDF.json` beside the config, writing `active-users.csv`.
pub const XX_SOURCE: &str = r#"[[source]]
type = "xx_gateway"
name = "gateway"
gateway_config = "gateway.yaml"
node_id_file = "gateway-IDF.json"
windows = [1, 3]
backfill_epochs = 6
grace_secs = 0.2
poll_interval_secs = 0.2
csv_path = "active-users.csv"
"#;

/// A gateway's `gateway.yaml` (the read-only role of `gateway_db`) and
/// its node id file, beside the config (as [`XX_SOURCE`] reads them).
pub fn gateway_files(dir: &TempDir, port: u16, node: &str) {
    dir.write(
        "gateway.yaml",
        &format!("dbName: cmix_gateway\ndbAddress: \"127.0.0.1:{port}\"\ndbUsername: ro\ndbPassword: pw-ro\n"),
    );
    dir.write("gateway-IDF.json", &format!(r#"{{"id":"{node}"}}"#));
}

/// One raw HTTP/1.1 exchange on its own connection (the request should say
/// `connection: close`): (status, head, body).
pub fn http_exchange(addr: std::net::SocketAddr, request: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).expect("send");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

/// Record ids in a csv sink's file (complete lines only, header skipped).
pub fn csv_ids(path: &Path) -> Vec<i64> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .nth(1)
                .and_then(|id| id.parse().ok())
                .expect("csv line has an id")
        })
        .collect()
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64
}

/// Days since 1970-01-01 to (year, month, day): Hinnant's civil_from_days.
pub fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Today's UTC date as YYYY-MM-DD.
pub fn today() -> String {
    let (y, m, d) = civil(now_ms().div_euclid(86_400_000));
    format!("{y:04}-{m:02}-{d:02}")
}

/// A process's resident set now and at its peak (VmRSS, VmHWM), KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The ids of the records buffered in an outbox, read from its rows: a row
/// holds the records `id - n + 1 ..= id` (src/outbox: "Rows").
pub fn outbox_ids(db: &rusqlite::Connection) -> Vec<i64> {
    db.prepare("SELECT id, n FROM records ORDER BY id")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<Result<Vec<_>, _>>()
        })
        .expect("read the outbox's ids")
        .into_iter()
        .flat_map(|(id, n)| id - n + 1..=id)
        .collect()
}

/// A process kept out of file descriptors: its soft `RLIMIT_NOFILE` set
/// (with `prlimit`, util-linux) to two more than it has open, and twenty
/// peers connected to `port` that say nothing, so that every accept fails
/// with EMFILE once those two are taken. Dropped, the peers close and the
/// limit is what it was.
pub struct OutOfDescriptors {
    pid: String,
    soft: String,
    /// The lowered soft limit.
    low: usize,
    peers: Vec<std::net::TcpStream>,
}

impl OutOfDescriptors {
    pub fn start(pid: u32, port: u16) -> OutOfDescriptors {
        let pid = pid.to_string();
        let out = Command::new("prlimit")
            .args([
                "--pid",
                &pid,
                "--nofile",
                "--noheadings",
                "--raw",
                "--output=SOFT",
            ])
            .output()
            .expect("prlimit (util-linux)");
        assert!(out.status.success(), "{out:?}");
        let soft = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("the process's descriptors")
            .count();
        let low = open + 2;
        set_soft_nofile(&pid, &low.to_string());
        let peers: Vec<std::net::TcpStream> = (0..20)
            .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
            .collect();
        assert_eq!(peers.len(), 20, "the kernel's backlog takes them");
        OutOfDescriptors {
            pid,
            soft,
            low,
            peers,
        }
    }

    /// One descriptor more: one silent peer is accepted and holds it, and
    /// accepts fail again, as they flap when a starved process frees a
    /// descriptor now and then.
    pub fn one_more(&mut self) {
        self.low += 1;
        set_soft_nofile(&self.pid, &self.low.to_string());
    }
}

impl Drop for OutOfDescriptors {
    fn drop(&mut self) {
        self.peers.clear();
        set_soft_nofile(&self.pid, &self.soft);
    }
}

/// Starve `process` of descriptors under silent peers on `port`, free one
/// mid-spell (one accept works between failures, as they flap), then give
/// them back. On return the failure has been said (`listening` names the
/// listener as the log does), the process serves again (`healthy`, asked
/// every 0.5 s from then on), and it has said so: once no accept failed
/// for ten seconds, at the first connection after that.
pub fn starve_and_recover(process: &Agent, port: u16, listening: &str, healthy: impl Fn() -> bool) {
    let mut starved = OutOfDescriptors::start(process.pid(), port);
    assert!(
        process.wait_for_line(
            &format!("{listening}: accepting a connection failed"),
            Duration::from_secs(5)
        ),
        "{}",
        process.stderr()
    );
    std::thread::sleep(Duration::from_millis(500)); // five more tries
    starved.one_more();
    std::thread::sleep(Duration::from_millis(1000));
    drop(starved);
    assert!(
        wait_until(Duration::from_secs(10), &healthy),
        "{}",
        process.stderr()
    );
    let again = format!("{listening}: accepting connections again");
    assert!(
        wait_until(Duration::from_secs(30), || {
            assert!(healthy(), "serves again: {}", process.stderr());
            std::thread::sleep(Duration::from_millis(500));
            process.stderr().contains(&again)
        }),
        "{}",
        process.stderr()
    );
}

fn set_soft_nofile(pid: &str, soft: &str) {
    let out = Command::new("prlimit")
        .args(["--pid", pid, &format!("--nofile={soft}:")])
        .output()
        .expect("prlimit (util-linux)");
    assert!(out.status.success(), "{out:?}");
}

/// A clock off from the machine's for the processes run with its
/// [`FakeClock::env`]: libfaketime (Debian's `faketime`) reads the offset
/// from a file, again at least once a second, so [`FakeClock::set`] steps
/// their clock while they run. Their timers (the monotonic clock) run true,
/// as a real wrong clock's do.
pub struct FakeClock {
    file: PathBuf,
    lib: PathBuf,
}

impl FakeClock {
    /// Off by `offset` in libfaketime's words (`-3d`, `+0`, `+2h`).
    pub fn new(dir: &TempDir, offset: &str) -> FakeClock {
        let lib = ["/usr/lib", "/usr/lib64"]
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .flatten()
            .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
            .chain([PathBuf::from("/usr/lib/faketime/libfaketimeMT.so.1")])
            .find(|p| p.exists())
            .expect("libfaketime is missing; install it with: sudo apt-get install faketime");
        let clock = FakeClock {
            file: dir.path("faketime"),
            lib,
        };
        clock.set(offset);
        clock
    }

    pub fn set(&self, offset: &str) {
        std::fs::write(&self.file, format!("{offset}\n")).expect("write the faketime file");
    }

    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LD_PRELOAD", self.lib.display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE", self.file.display().to_string()),
            ("FAKETIME_CACHE_DURATION", "1".to_owned()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
        ]
    }
}

/// `command`, or a failed test saying which Debian package has it.
pub fn tool(command: &'static str, package: &str) -> &'static str {
    let found = Command::new(command).arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "{command} is missing: install it with `apt-get install {package}` (scripts/test does)"
    );
    command
}

/// `promtool`, or a failed test saying how to get it.
pub fn promtool() -> &'static str {
    tool("promtool", "prometheus")
}

/// Prometheus's own parser and lint (`promtool check metrics`) accept
/// `body` without a word.
pub fn promtool_check(body: &str) {
    use std::io::Write;
    let mut check = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write to promtool");
    let out = check.wait_with_output().expect("promtool's answer");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
