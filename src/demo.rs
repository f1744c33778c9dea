//! `edgemeter demo`: the pipeline on this machine with nothing to connect
//! to, for a few seconds in a directory of its own: a synthetic source, and
//! a `relay` source reading three rigs from a simulated practable session
//! host (a thread here, on a loopback port) where students send commands
//! (and, now and then, a garbage frame); a CSV sink takes the points. Then
//! it prints the status, the analytics files and where to look.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::clock::now_ms;
use crate::{agent, cli, config, state_dir};

/// The demo's config: relative paths land in the demo directory.
const DEMO_CONFIG: &str = r#"# Written by `edgemeter demo`.
[agent]
id = "demo"
state_dir = "state"
flush_interval_secs = 0.5

[[source]]
type = "synthetic"
name = "load"
rate_per_sec = 200
series = 4

[[source]]
type = "relay"
name = "practable"
session_host = "http://127.0.0.1:{port}"
streams = ["spin30..32"]
window_secs = 5
files_dir = "analytics"
dump_interval_secs = 2

[[sink]]
type = "csv"
name = "local"
path = "points.csv"
"#;

/// A stand-in for practable's session host: `/ws/<rig>` websockets on which
/// a few students send logging envelopes, as their browsers do.
// The handshake callback's error type is tungstenite's, not ours to shrink.
#[allow(clippy::result_large_err)]
fn simulated_session_host() -> std::io::Result<u16> {
    use async_tungstenite::tungstenite::{self, Message};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::Builder::new()
        .name("demo-host".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut rig = String::new();
                    let Ok(mut ws) = tungstenite::accept_hdr(
                        conn,
                        |req: &tungstenite::handshake::server::Request, resp| {
                            rig = req.uri().path().trim_start_matches("/ws/").to_owned();
                            Ok(resp)
                        },
                    ) else {
                        return;
                    };
                    let commands = ["voltage", "voltage_ramp", "speed", "speed_ramp", "position"];
                    for i in 0.. {
                        let student = fastrand::usize(0..3);
                        let text = if i % 97 == 96 {
                            // What the spinner firmware sometimes sends.
                            "{\"info\",\"pid\"}".to_owned()
                        } else {
                            format!(
                                r#"{{"user":"student-{rig}-{student}","t":{},"exp":"spinner","hardware":"{rig}","course":"demo","type":"analytics","payload":{{"log":"{}","data":{{"set":1}}}}}}"#,
                                now_ms(),
                                commands[fastrand::usize(0..commands.len())]
                            )
                        };
                        if ws.send(Message::text(text)).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(fastrand::u64(20..120)));
                    }
                });
            }
        })?;
    Ok(port)
}

pub fn run(seconds: u64, dir: Option<PathBuf>) -> ExitCode {
    let dir =
        dir.unwrap_or_else(|| std::env::temp_dir().join(format!("edgemeter-demo-{}", now_ms())));
    let port = match simulated_session_host() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("edgemeter demo: cannot start the simulated session host on loopback: {e}");
            return ExitCode::from(cli::EXIT_FAILURE);
        }
    };
    let text = DEMO_CONFIG.replace("{port}", &port.to_string());
    let path = dir.join("edgemeter.toml");
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &text)) {
        eprintln!("edgemeter demo: cannot write {}: {e}", path.display());
        return ExitCode::from(cli::EXIT_FAILURE);
    }
    let config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgemeter demo: the built-in config is invalid (a bug):\n{e}");
            return ExitCode::from(cli::EXIT_FAILURE);
        }
    };
    let state = config.agent.state_dir.clone();
    println!(
        "edgemeter demo: running for {seconds} s in {} (Ctrl-C stops early)",
        dir.display()
    );
    if let Err(e) = agent::run(config, Vec::new(), Some(Duration::from_secs(seconds))) {
        eprintln!("edgemeter demo: {e}");
        return ExitCode::from(cli::EXIT_STATE);
    }
    let Ok(config) = config::load(&path) else {
        return ExitCode::from(cli::EXIT_FAILURE);
    };
    let outbox = crate::outbox::Outbox::open_read_only(&state);
    match outbox.and_then(|o| Ok((o.stats()?, o.path().display().to_string()))) {
        Ok((stats, p)) => print!(
            "\n{}{}",
            cli::render_status(&config, state_dir::holder(&state), &p, &stats, now_ms()),
            cli::source_status(&config, now_ms())
        ),
        Err(e) => eprintln!("edgemeter demo: {e}"),
    }
    let analytics = dir.join("analytics");
    let mut files: Vec<String> = std::fs::read_dir(&analytics)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    println!(
        "\nrelay analytics in {}: {} files, e.g. usage.csv:\n{}",
        analytics.display(),
        files.len(),
        std::fs::read_to_string(analytics.join("usage.csv")).unwrap_or_default()
    );
    let csv = dir.join("points.csv");
    let lines = std::fs::read_to_string(&csv).map_or(0, |t| t.lines().count().saturating_sub(1));
    println!(
        "\n{lines} points delivered to {}\nconfig: {}\nTry: edgemeter status -c {}",
        csv.display(),
        path.display(),
        path.display()
    );
    ExitCode::SUCCESS
}
