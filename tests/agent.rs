//! The real binary, run the way a user runs it.

mod common;

use std::time::{Duration, Instant};

use common::{Agent, TempDir, csv_ids, edgemeter};

fn config(dir: &TempDir, extra_source: &str) -> std::path::PathBuf {
    config_sinking_to(dir, extra_source, "out.csv")
}

/// As [`config`], the csv sink writing `sink_path`.
fn config_sinking_to(dir: &TempDir, extra_source: &str, sink_path: &str) -> std::path::PathBuf {
    dir.write(
        "edgemeter.toml",
        &format!(
            r#"[agent]
id = "test-agent"
state_dir = "state"
flush_interval_secs = 0.05

{extra_source}

[[sink]]
type = "csv"
name = "local"
path = "{sink_path}"
batch_max_records = 500
retry_initial_secs = 0.05
retry_max_secs = 0.5
"#
        ),
    )
}

const LOAD: &str =
    "[[source]]\ntype = \"synthetic\"\nname = \"load\"\nrate_per_sec = 2000\nseries = 3\n";

#[test]
fn version_and_help_work_everywhere() {
    let (code, out, _) = edgemeter(&["--version"]);
    assert_eq!(
        (code, out.trim()),
        (0, concat!("edgemeter ", env!("CARGO_PKG_VERSION")))
    );
    for (args, needle) in [
        (&["--help"][..], "Commands:"),
        (&["run", "--help"], "Usage: edgemeter run"),
        (&["check", "-h"], "Usage: edgemeter check"),
        (&["status", "--help"], "Usage: edgemeter status"),
        (&["outbox", "--help"], "edgemeter outbox list"),
        (&["outbox", "retry", "--help"], "edgemeter outbox retry"),
        (&["demo", "--help"], "Usage: edgemeter demo"),
    ] {
        let (code, out, err) = edgemeter(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.contains(needle), "{args:?} printed:\n{out}");
    }
    let (code, _, err) = edgemeter(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown command `frobnicate`"), "{err}");
    let (code, _, err) = edgemeter(&["outbox", "purge"]);
    assert_eq!(
        code, 2,
        "purge without a selection must not purge everything"
    );
    assert!(err.contains("--all, --sink NAME or --id N"), "{err}");
}

#[test]
fn check_lists_every_problem_with_its_line_and_exits_2() {
    let dir = TempDir::new("check");
    let good = config(&dir, LOAD);
    let (code, out, err) = edgemeter(&["check", "-c", good.to_str().expect("utf-8 path")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok: agent `test-agent`"), "{out}");
    assert!(out.contains("sources: load; sinks: local"), "{out}");

    let bad = dir.write(
        "bad.toml",
        "[agent]\nflush_interval_secs = 100\nbogus = 1\n\n[[sink]]\ntype = \"s3\"\n",
    );
    let (code, out, err) = edgemeter(&["check", "-c", bad.to_str().expect("utf-8 path")]);
    assert_eq!(code, 2);
    assert!(out.is_empty());
    let b = bad.display();
    assert_eq!(
        err,
        format!(
            "{b}:3:1: unknown field `bogus`, expected one of `id`, `state_dir`, `log_level`, `buffer_max_bytes`, `flush_interval_secs`, `deliver_interval_secs`, `shutdown_grace_secs`, `http_listen`, `health_interval_secs`\n\
             {b}:6:8: unknown sink type `s3`; known types: csv, cloudwatch_metrics, cloudwatch_logs, upstream\n\
             2 problems found\n"
        )
    );
    // `run` refuses the same file before touching any state.
    let (code, _, err) = edgemeter(&["run", "-c", bad.to_str().expect("utf-8 path")]);
    assert_eq!(code, 2, "{err}");
    assert!(!dir.path("state").exists());
}

#[test]
fn sigterm_stops_cleanly_within_five_seconds_with_everything_committed() {
    let dir = TempDir::new("sigterm");
    let cfg = config(&dir, LOAD);
    let mut agent = Agent::start(&cfg, "debug");
    agent.expect_line("outbox: committed ids", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    agent.signal("TERM");
    let status = agent
        .wait_exit(Duration::from_secs(5))
        .expect("must exit within 5 s of SIGTERM");
    let took = asked.elapsed();
    assert!(status.success(), "exit status {status}: {}", agent.stderr());
    let log = agent.stderr();
    assert!(log.contains("received SIGTERM; shutting down"), "{log}");
    assert!(log.contains("stopped cleanly"), "{log}");
    eprintln!("shutdown took {took:?}");

    // Every id the agent said it committed is in the outbox or the csv file.
    let last_committed: i64 = log
        .lines()
        .filter_map(|l| l.split("committed ids ").nth(1))
        .filter_map(|r| r.split("..=").nth(1)?.trim().parse().ok())
        .max()
        .expect("at least one commit");
    let db = rusqlite::Connection::open(dir.path("state/outbox.db")).expect("open outbox");
    let mut ids = common::outbox_ids(&db);
    ids.extend(csv_ids(&dir.path("out.csv")));
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids, (1..=last_committed).collect::<Vec<_>>());

    // SIGINT works the same way.
    let mut agent = Agent::start_running(&cfg, "info");
    agent.signal("INT");
    let status = agent
        .wait_exit(Duration::from_secs(5))
        .expect("must exit within 5 s of SIGINT");
    assert!(status.success());
    assert!(agent.stderr().contains("received SIGINT"));
}

#[test]
fn a_second_agent_on_the_same_state_dir_is_refused_naming_the_first() {
    let dir = TempDir::new("second");
    let cfg = config(&dir, LOAD);
    let mut first = Agent::start_running(&cfg, "info");
    let (code, _, err) = edgemeter(&["run", "-c", cfg.to_str().expect("utf-8 path")]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&format!(
            "another edgemeter (pid {}) is already using the state directory",
            first.pid()
        )),
        "{err}"
    );
    // status works beside the running agent and sees it.
    let (code, out, err) = edgemeter(&["status", "-c", cfg.to_str().expect("utf-8 path")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("test-agent (running, pid {})", first.pid())),
        "{out}"
    );
    assert!(out.contains("sink local"), "{out}");
    assert!(out.contains("drops        none"), "{out}");
    first.stop();
    let (_, out, _) = edgemeter(&["status", "-c", cfg.to_str().expect("utf-8 path")]);
    assert!(out.contains("test-agent (not running)"), "{out}");
}

#[test]
fn a_garbage_outbox_is_moved_aside_and_the_agent_runs() {
    let dir = TempDir::new("garbage");
    let cfg = config(&dir, LOAD);
    std::fs::create_dir_all(dir.path("state")).expect("mkdir");
    std::fs::write(
        dir.path("state/outbox.db"),
        b"definitely not sqlite ".repeat(200),
    )
    .expect("write garbage");
    let mut agent = Agent::start(&cfg, "debug");
    agent.expect_line("outbox: committed ids", Duration::from_secs(10));
    agent.stop();
    let log = agent.stderr();
    assert!(
        log.contains("was unusable (it is not a readable SQLite database"),
        "{log}"
    );
    assert!(log.contains("moved it aside to"), "{log}");
    let aside: Vec<_> = std::fs::read_dir(dir.path("state"))
        .expect("read state dir")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("outbox.db.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1);
}

#[test]
fn dead_letters_are_listed_retried_by_the_agent_and_purged() {
    let dir = TempDir::new("dead");
    let cfg = config(&dir, "");
    let c = cfg.to_str().expect("utf-8 path");
    // Create the outbox with the agent, then plant two dead letters as a
    // refusing sink would have left them.
    let mut agent = Agent::start_running(&cfg, "info");
    agent.stop();
    let db = rusqlite::Connection::open(dir.path("state/outbox.db")).expect("open");
    db.execute_batch(
        "INSERT INTO dead_letters (id, sink, seq, count, bytes, error, state, attempts, created, updated)
           VALUES (1, 'local', 7, 2, 100, '400 InvalidParameterValue', 'dead', 1, 0, 0),
                  (2, 'local', 8, 1, 50, '400 bad', 'dead', 1, 0, 0);
         INSERT INTO dead_records (dead_id, id, kind, ts, name, dims, value, unit, payload)
           VALUES (1, 11, 1, 0, 'm', '{}', 1.5, 'Count', x''),
                  (1, 12, 1, 0, 'm', '{}', 2.5, 'Count', x''),
                  (2, 13, 1, 0, 'm', '{}', 3.5, 'Count', x'');",
    )
    .expect("plant dead letters");
    drop(db);

    let (code, out, _) = edgemeter(&["outbox", "list", "-c", c]);
    assert_eq!(code, 0);
    assert!(out.contains("1\tlocal\t7\t2\t100\tdead\t1\t"), "{out}");
    assert!(out.contains("400 InvalidParameterValue"), "{out}");
    let (code, out, _) = edgemeter(&["outbox", "retry", "-c", c, "--id", "1"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "1 dead letter(s) marked for retry\n")
    );

    let mut agent = Agent::start(&cfg, "info");
    let deadline = Instant::now() + Duration::from_secs(10);
    while csv_ids(&dir.path("out.csv")) != vec![11, 12] && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.stop();
    assert_eq!(
        csv_ids(&dir.path("out.csv")),
        vec![11, 12],
        "the retried letter was delivered by the agent"
    );
    let text = std::fs::read_to_string(dir.path("out.csv")).expect("read csv");
    assert!(
        text.contains("\n7,11,"),
        "delivered under its original batch id:\n{text}"
    );

    let (_, out, _) = edgemeter(&["outbox", "list", "-c", c, "--sink", "local"]);
    assert!(
        !out.contains("\t7\t") && out.contains("2\tlocal\t8\t"),
        "{out}"
    );
    let (code, out, _) = edgemeter(&["outbox", "purge", "-c", c, "--all"]);
    assert_eq!((code, out.as_str()), (0, "1 dead letter(s) purged\n"));
    let (_, out, _) = edgemeter(&["outbox", "list", "-c", c]);
    assert_eq!(out, "no dead letters\n");
}

/// Threads of a process, by name.
fn threads(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .collect()
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let after_name = &stat[stat.rfind(')').expect("stat has a name") + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Regression: with no sources the outbox writer ends at once, and its
/// doorbells closed; every idle sink then spun on the outbox, and the
/// `blocking` pool behind `smol::unblock` grew a thread per spin and never
/// shrank. An idle agent must sleep: two threads, no CPU to speak of.
#[test]
fn an_idle_agent_sleeps_with_two_threads() {
    let dir = TempDir::new("idle");
    let cfg = config(&dir, "");
    let mut agent = Agent::start_running(&cfg, "info");
    std::thread::sleep(Duration::from_millis(1500));
    let ticks_before = cpu_ticks(agent.pid());
    let mut samples = Vec::new();
    for _ in 0..24 {
        samples.push(threads(agent.pid()));
        std::thread::sleep(Duration::from_millis(250));
    }
    let ticks = cpu_ticks(agent.pid()) - ticks_before;
    agent.stop();
    let most = samples.iter().map(Vec::len).max().expect("samples");
    let at_two = samples.iter().filter(|t| t.len() == 2).count();
    assert!(most <= 3, "an idle agent had {most} threads: {samples:?}");
    assert!(
        at_two >= samples.len() / 2,
        "mostly main + async-io only: {samples:?}"
    );
    for names in &samples {
        for n in names {
            assert!(
                ["edgemeter", "async-io", "outbox"].contains(&n.as_str()),
                "unexpected thread {n}"
            );
        }
    }
    // 6 s of idling; a spinning loop burns ~600 ticks (100 per second).
    assert!(ticks < 60, "an idle agent used {ticks} ticks of CPU in 6 s");
}

#[test]
fn under_load_threads_stay_within_their_bound() {
    let dir = TempDir::new("load-threads");
    let cfg = config(&dir, LOAD);
    let mut agent = Agent::start_running(&cfg, "info");
    let mut most = 0;
    for _ in 0..20 {
        most = most.max(threads(agent.pid()).len());
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.stop();
    // main + async-io + outbox worker + one worker per sink (one sink here).
    assert!(most <= 4, "{most} threads under load");
    assert!(
        csv_ids(&dir.path("out.csv")).len() > 100,
        "the load was real"
    );
}

/// Under systemd (`Type=notify`, `WatchdogSec=`): READY once running,
/// WATCHDOG pings at half the period from the event loop, STOPPING at
/// shutdown; all to `$NOTIFY_SOCKET`, here a socket of the test's own.
#[test]
fn systemd_hears_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = TempDir::new("notify");
    let cfg = config(&dir, LOAD);
    let path = dir.path("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut agent = Agent::start_with_env(
        &cfg,
        "info",
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut buf = [0u8; 512];
    let mut recv = || {
        let n = socket.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(
        first.starts_with("READY=1\nSTATUS=agent test-agent: 1 source, 1 sink"),
        "{first}"
    );
    let t = Instant::now();
    for _ in 0..5 {
        assert_eq!(recv(), "WATCHDOG=1");
    }
    // Five pings at 0.2 s intervals: about a second, not a burst.
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    agent.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut stopping = false;
    while Instant::now() < deadline && !stopping {
        stopping = recv() == "STOPPING=1";
    }
    assert!(stopping, "STOPPING=1 was sent");
    assert!(
        agent
            .wait_exit(Duration::from_secs(5))
            .is_some_and(|s| s.success())
    );
}

/// `check` reads every secret file the service will need, as
/// `ExecStartPre=edgemeter check` runs it: a missing, empty or
/// world-readable one is named with what to do, and exits 2.
#[test]
fn check_reads_every_secret_file_the_service_will_need() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("check-secrets");
    let cfg = dir.write(
        "edgemeter.toml",
        r#"[agent]
state_dir = "state"

[[sink]]
type = "cloudwatch_metrics"
name = "cw"
region = "us-west-1"
namespace = "Edge"
access_key_id = "AKIDTEST"
secret_access_key_file = "aws-secret"
session_token_file = "aws-token"

[[sink]]
type = "upstream"
name = "up"
endpoint = "http://127.0.0.1:8700"
token_file = "up.token"
"#,
    );
    let c = cfg.to_str().expect("utf-8 path");
    let secret = |name: &str, text: &str, mode: u32| {
        let p = dir.write(name, text);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    secret("aws-secret", "s3cr3t", 0o644);
    secret("aws-token", "", 0o600);
    let (code, _, err) = edgemeter(&["check", "-c", c]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("sink `cw` secret_access_key_file")
            && err.contains("aws-secret is readable by every user (mode 644)")
            && err.contains("chmod"),
        "{err}"
    );
    assert!(
        err.contains("sink `cw` session_token_file") && err.contains("aws-token is empty"),
        "{err}"
    );
    assert!(
        err.contains("up.token") && err.contains("No such file"),
        "{err}"
    );
    assert!(err.contains("3 problems found"), "{err}");
    assert!(
        !err.contains("s3cr3t"),
        "a secret reached the output: {err}"
    );
    secret("aws-secret", "s3cr3t", 0o600);
    secret("aws-token", "FwoG", 0o640);
    secret("up.token", "t0ken", 0o600);
    let (code, out, err) = edgemeter(&["check", "-c", c]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok: "), "{out}");
}

/// A full outbox drops its oldest records at every commit, ten times a
/// second, and said so in a warning each time: 23 lines in 2.3 s here,
/// 864,000 a day in the journal of an edge whose sink was down. Now it is
/// said when it begins (every ten minutes while it lasts), and when the
/// sink takes records again and commits stop dropping.
#[test]
fn a_full_outbox_says_so_once_and_when_it_has_room_again() {
    let dir = TempDir::new("full-outbox");
    let cfg = dir.write(
        "edgemeter.toml",
        r#"[agent]
id = "test-agent"
state_dir = "state"
buffer_max_bytes = 1048576

[[source]]
type = "synthetic"
rate_per_sec = 10000

[[sink]]
type = "csv"
name = "local"
path = "blocked/out.csv"
retry_initial_secs = 0.2
retry_max_secs = 0.5
"#,
    );
    // A file where the sink's directory goes: it cannot deliver.
    dir.write("blocked", "");
    let mut agent = Agent::start_running(&cfg, "info");
    let full = "outbox full (buffer_max_bytes): dropped the";
    assert!(
        agent.wait_for_line(full, Duration::from_secs(20)),
        "the outbox did not fill:\n{}",
        agent.stderr()
    );
    // Full for 3 s: thirty commits that drop.
    std::thread::sleep(Duration::from_secs(3));
    std::fs::remove_file(dir.path("blocked")).expect("out of the sink's way");
    // Said once commits have dropped none for ten seconds.
    agent.expect_line("outbox has room again:", Duration::from_secs(40));
    agent.stop();
    let log = agent.stderr();
    assert_eq!(log.matches("outbox full").count(), 1, "said once:\n{log}");
    assert_eq!(log.matches("outbox still full").count(), 0, "{log}");
    // What the log says was dropped is what the outbox counted (against
    // the sink, which had taken none of them).
    let said: u64 = log
        .lines()
        .find_map(|l| l.split("outbox has room again: ").nth(1))
        .and_then(|r| r.split(' ').next()?.parse().ok())
        .expect("a count");
    let db = rusqlite::Connection::open(dir.path("state/outbox.db")).expect("open outbox");
    let counted: i64 = db
        .query_row(
            "SELECT total(count) FROM drops WHERE reason = 'buffer_full' AND sink = 'local'",
            [],
            |r| r.get::<_, f64>(0),
        )
        .map(|n| n as i64)
        .expect("the drops table");
    assert!(said > 0);
    assert_eq!(said as i64, counted, "{log}");
}

/// An agent whose state directory is on a disk of `mib` MiB, with a
/// synthetic source (`source` keys) and a csv sink on another disk.
fn on_small_disk(dir: &TempDir, source: &str, mib: u32) -> Agent {
    on_small_disk_sinking_to(dir, source, mib, ".")
}

/// As [`on_small_disk`], the sink's file in `sink_dir`.
fn on_small_disk_sinking_to(dir: &TempDir, source: &str, mib: u32, sink_dir: &str) -> Agent {
    on_small_disk_with(dir, source, mib, sink_dir, "")
}

/// As [`on_small_disk_sinking_to`], with more `[agent]` keys.
fn on_small_disk_with(dir: &TempDir, source: &str, mib: u32, sink_dir: &str, agent: &str) -> Agent {
    let cfg = small_disk_config(dir, source, sink_dir, agent);
    let agent = Agent::start_on_small_disk(&cfg, "info", &dir.path("state"), mib);
    agent.expect_line("running as agent", Duration::from_secs(10));
    agent
}

/// The config of those agents: `agent` keys, a synthetic source (`source`
/// keys), and the file's csv sink in `sink_dir`.
fn small_disk_config(
    dir: &TempDir,
    source: &str,
    sink_dir: &str,
    agent: &str,
) -> std::path::PathBuf {
    let tables = format!("{agent}\n\n[[source]]\ntype = \"synthetic\"\nname = \"load\"\n{source}");
    config_sinking_to(dir, &tables, &format!("{sink_dir}/out.csv"))
}

/// A real full disk (a tmpfs the agent's state directory is on): commits
/// fail, the agent says so once and holds what arrives, and when space
/// returns it commits everything it held; the sink gets every record
/// once.
#[test]
fn a_full_disk_holds_records_and_commits_them_when_space_returns() {
    let dir = TempDir::new("full-disk");
    let n = 30_000;
    let port = common::pg::free_port();
    let mut agent = on_small_disk_with(
        &dir,
        &format!("rate_per_sec = 10000\nseries = 3\nlimit = {n}"),
        32,
        ".",
        &format!("http_listen = \"127.0.0.1:{port}\""),
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let get = |path: &str| {
        common::http_exchange(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
    };
    assert_eq!(get("/health").0, 200);
    let disk = common::SmallDisk::of(agent.pid(), &dir.path("state"));
    assert!(disk.fill() > 0, "the disk took nothing");
    agent.expect_line("(the disk is full)", Duration::from_secs(10));
    // What monitoring sees meanwhile.
    let (status, _, body) = get("/health");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("is full (") && body.contains("commits fail"),
        "{body}"
    );
    let metrics = get("/metrics").2;
    let free: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("edgemeter_state_dir_free_bytes "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no free bytes in\n{metrics}"));
    assert!(free < 65536.0, "{free}");
    std::thread::sleep(Duration::from_secs(2));
    disk.free();
    agent.expect_line("outbox writable again", Duration::from_secs(30));
    let csv = dir.path("out.csv");
    assert!(
        common::wait_until(Duration::from_secs(30), || csv_ids(&csv).len() >= n),
        "the sink got {} of {n}:\n{}",
        csv_ids(&csv).len(),
        agent.stderr()
    );
    assert_eq!(get("/health").0, 200);
    agent.stop();
    let mut ids = csv_ids(&csv);
    assert_eq!(ids.len(), n, "each record once");
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "each record once");
    let log = agent.stderr();
    assert_eq!(
        log.matches("(the disk is full)").count(),
        1,
        "said once:\n{log}"
    );
}

/// A sink whose records wait in the outbox when the disk fills: a claim
/// of a batch writes, so each one fails. It said so at every try (18
/// lines in 4 s here, with retries of at most 0.5 s; with the defaults,
/// one every 5 minutes for as long as the disk stays full); now once, and
/// once when claims work again.
#[test]
fn a_sink_says_once_that_it_cannot_claim_batches_from_a_full_disk() {
    let dir = TempDir::new("full-disk-claims");
    // A file where the sink's directory goes: records wait in the outbox.
    dir.write("blocked", "");
    let mut agent =
        on_small_disk_sinking_to(&dir, "rate_per_sec = 2000\nseries = 3", 32, "blocked");
    agent.expect_line("could not deliver batch", Duration::from_secs(10));
    let disk = common::SmallDisk::of(agent.pid(), &dir.path("state"));
    assert!(disk.fill() > 0, "the disk took nothing");
    std::fs::remove_file(dir.path("blocked")).expect("out of the sink's way");
    agent.expect_line("claiming a batch failed", Duration::from_secs(10));
    // Several tries (retries up to 0.5 s).
    std::thread::sleep(Duration::from_secs(4));
    disk.free();
    // Said once no claim failed for 10 s.
    agent.expect_line("the outbox gives batches again", Duration::from_secs(25));
    agent.expect_line("outbox writable again", Duration::from_secs(30));
    agent.stop();
    let log = agent.stderr();
    assert_eq!(
        log.matches("claiming a batch failed").count(),
        1,
        "said once:\n{log}"
    );
    assert!(!csv_ids(&dir.path("blocked/out.csv")).is_empty(), "{log}");
}

/// Started on a full disk (a Pi that rebooted so), the agent cannot open
/// its outbox: SQLite says "disk I/O error", which reads like a failing
/// card. It now says the disk is full and that the outbox is kept; it
/// exits 3 (systemd starts it again), and once there is room it starts
/// with every record it had.
#[test]
fn an_agent_started_on_a_full_disk_says_so_and_starts_once_there_is_room() {
    let dir = TempDir::new("full-disk-start");
    dir.write("blocked", "");
    let cfg = dir.write(
        "edgemeter.toml",
        r#"[agent]
id = "test-agent"
state_dir = "state"

[[source]]
type = "synthetic"
rate_per_sec = 1000
limit = 500

[[sink]]
type = "csv"
name = "local"
path = "blocked/out.csv"
"#,
    );
    // An outbox holding 500 records its sink has not taken.
    let mut seed = Agent::start_running(&cfg, "info");
    seed.expect_line("emitted its limit", Duration::from_secs(10));
    seed.stop();
    let buffered = |db: &std::path::Path| -> i64 {
        rusqlite::Connection::open(db)
            .and_then(|c| c.query_row("SELECT SUM(n) FROM records", [], |r| r.get(0)))
            .expect("records")
    };
    assert_eq!(buffered(&dir.path("state/outbox.db")), 500);
    std::fs::rename(dir.path("state"), dir.path("seed")).expect("keep it");
    let script = format!(
        r#"cp {seed}/* "$DISK"/ && dd if=/dev/zero of="$DISK/filler" bs=65536 2>/dev/null; "$BIN" "$CMD" -c "$CFG"; echo "the first start exited with $?" >&2; rm "$DISK/filler"; exec "$BIN" "$CMD" -c "$CFG""#,
        seed = dir.path("seed").display()
    );
    let mut agent = Agent::on_small_disk(&script, "run", &cfg, "info", &dir.path("state"), 32);
    agent.expect_line("the first start exited with 3", Duration::from_secs(10));
    agent.expect_line("running as agent", Duration::from_secs(10));
    agent.stop();
    let log = agent.stderr();
    assert!(
        log.contains("its disk is full (") && log.contains("The outbox is kept as it is"),
        "{log}"
    );
    assert!(!log.contains("moved it aside"), "{log}");
    assert!(log.contains(": 500 records buffered"), "{log}");
}

/// A disk that keeps filling and freeing a little (logs rotated on a card
/// that is nearly full): one commit works, the next fails. Each flap was
/// two lines, "… (the disk is full) …" and "outbox writable again"; now
/// the failure is one spell that ends once commits have worked for 10 s.
#[test]
fn a_disk_that_fills_and_frees_a_little_again_and_again_is_one_spell() {
    let dir = TempDir::new("full-disk-flaps");
    let mut agent = on_small_disk(&dir, "rate_per_sec = 2000\nseries = 3", 32);
    let disk = common::SmallDisk::of(agent.pid(), &dir.path("state"));
    assert!(disk.fill() > 0, "the disk took nothing");
    agent.expect_line("(the disk is full)", Duration::from_secs(10));
    // Eight flaps: room for a commit or two, taken back.
    for _ in 0..8 {
        disk.free_some(128 * 1024);
        std::thread::sleep(Duration::from_millis(600));
        disk.fill();
        std::thread::sleep(Duration::from_millis(600));
    }
    disk.free();
    agent.expect_line("outbox writable again", Duration::from_secs(30));
    agent.stop();
    let log = agent.stderr();
    assert_eq!(log.matches("(the disk is full)").count(), 1, "{log}");
    assert_eq!(log.matches("outbox writable again").count(), 1, "{log}");
}

/// A failing SD card fails one fsync of the outbox's WAL and not the
/// next. Each flap was two lines ("syncing the WAL failed", "synced
/// again"); now it is one spell, said again once no sync failed for 10 s.
/// The failures are real: strace makes every other `fdatasync` of the
/// running agent fail with EIO for 6 s.
#[test]
fn a_wal_sync_that_fails_every_other_time_is_one_spell() {
    let strace = std::process::Command::new("strace").arg("-V").output();
    assert!(
        strace.is_ok_and(|o| o.status.success()),
        "this test needs strace; install with: sudo apt-get install strace (scripts/test does)"
    );
    let dir = TempDir::new("sync-flaps");
    let cfg = dir.write(
        "edgemeter.toml",
        "[agent]\nid = \"test-agent\"\nstate_dir = \"state\"\nflush_interval_secs = 0.05\n\n\
         [[source]]\ntype = \"synthetic\"\nname = \"load\"\nrate_per_sec = 500\nseries = 3\n",
    );
    let mut agent = Agent::start_running(&cfg, "info");
    let mut tracer = std::process::Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=fdatasync"])
        .args(["-e", "inject=fdatasync:error=EIO:when=2+2", "-p"])
        .arg(agent.pid().to_string())
        .spawn()
        .expect("strace");
    agent.expect_line("syncing the WAL failed", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(6));
    // SIGTERM: strace detaches and the agent goes on, its syncs working.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &tracer.id().to_string()])
        .status();
    let _ = tracer.wait();
    agent.expect_line("the outbox's WAL is synced again", Duration::from_secs(20));
    agent.stop();
    let log = agent.stderr();
    assert_eq!(log.matches("syncing the WAL failed").count(), 1, "{log}");
    let again: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("the outbox's WAL is synced again, after "))
        .collect();
    assert_eq!(again.len(), 1, "{log}");
    let failed: u64 = again[0]
        .split("after ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a count of failed syncs");
    assert!(
        failed >= 3,
        "{failed} failed syncs in 6 s of every other one failing:\n{log}"
    );
}

/// Stopped while the disk is full: the agent exits at once with status 1
/// and says how many records it could not commit. It took longer than it
/// promises (`shutdown_grace_secs` + 3 s): the source, waiting on the
/// writer, was cut off after its grace (5 s), and the writer noticed only
/// after its backoff (up to 10 s); holding a full group it never noticed
/// (`agent::tests`, `shut_down_while_the_disk_is_full_…`).
#[test]
fn stopped_while_the_disk_is_full_the_agent_exits_in_time_and_says_what_it_lost() {
    let dir = TempDir::new("full-disk-stop");
    let mut agent = on_small_disk(&dir, "rate_per_sec = 20000\nseries = 3", 32);
    let disk = common::SmallDisk::of(agent.pid(), &dir.path("state"));
    assert!(disk.fill() > 0, "the disk took nothing");
    agent.expect_line("(the disk is full)", Duration::from_secs(10));
    // Several failed commits: the backoff grows past a second.
    std::thread::sleep(Duration::from_secs(4));
    agent.signal("TERM");
    let status = agent.wait_exit(Duration::from_secs(5 + 3));
    let log = agent.stderr();
    let Some(status) = status else {
        panic!("still running 8 s after SIGTERM:\n{log}");
    };
    assert_eq!(status.code(), Some(1), "records were lost: {status}\n{log}");
    let lost: u64 = log
        .lines()
        .find_map(|l| l.split("could not commit ").nth(1))
        .and_then(|r| r.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no count of the records lost:\n{log}"));
    assert!(lost > 0, "{log}");
    assert!(!log.contains("stopped cleanly"), "{log}");
    assert!(
        !log.contains("did not finish"),
        "the source was cut off:\n{log}"
    );
}

/// The csv sink's file on a full disk: the write fails, the batch stays in
/// the outbox and is written again once there is room (a line the full
/// disk cut off is repaired, as after a crash), and the file holds each
/// record once. Said once.
#[test]
fn a_csv_sink_on_a_full_disk_writes_each_record_once_when_space_returns() {
    let dir = TempDir::new("csv-full-disk");
    let n = 30_000;
    let source = format!("rate_per_sec = 5000\nseries = 3\nlimit = {n}");
    let cfg = small_disk_config(&dir, &source, "disk", "");
    let mut agent = Agent::start_on_small_disk(&cfg, "info", &dir.path("disk"), 8);
    agent.expect_line("running as agent", Duration::from_secs(10));
    let disk = common::SmallDisk::of(agent.pid(), &dir.path("disk"));
    let csv = disk.path("out.csv");
    assert!(
        common::wait_until(Duration::from_secs(10), || !csv_ids(&csv).is_empty()),
        "{}",
        agent.stderr()
    );
    assert!(disk.fill() > 0, "the disk took nothing");
    agent.expect_line("No space left on device", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    disk.free();
    assert!(
        common::wait_until(Duration::from_secs(30), || csv_ids(&csv).len() >= n),
        "the sink wrote {} of {n}:\n{}",
        csv_ids(&csv).len(),
        agent.stderr()
    );
    let mut ids = csv_ids(&csv);
    agent.stop();
    assert_eq!(ids.len(), n, "each record once");
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "each record once");
    let log = agent.stderr();
    assert_eq!(log.matches("No space left on device").count(), 1, "{log}");
    assert!(log.contains("delivering again after"), "{log}");
}
