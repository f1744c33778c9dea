//! `edgemeter demo`: the pipeline on this machine with nothing to connect
//! to, for a few seconds in a directory of its own: a synthetic source, and
//! a `relay` source reading three rigs from a simulated practable session
//! host (a thread here, on a loopback port) where students send commands
//! (and, now and then, a garbage frame); a CSV sink takes the points. The
//! demo process is also an upstream, and three edge agents (child
//! processes of this binary, with overlapping sets of active users) post to
//! it, so the network-wide union is shown beside the sum it replaces. Then
//! it prints the status, the analytics files and where to look.

use crate::cli::{Exit, Failed, Outcome};
use std::path::PathBuf;
use std::time::Duration;

use crate::clock::now_ms;
use crate::{agent, config};

/// The demo's config: relative paths land in the demo directory.
const DEMO_CONFIG: &str = r#"# Written by `edgemeter demo`.
[agent]
id = "demo"
state_dir = "state"
flush_interval_secs = 0.5
http_listen = "127.0.0.1:0"

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
window_secs = 2
files_dir = "analytics"
dump_interval_secs = 2

[[sink]]
type = "csv"
name = "local"
path = "points.csv"

[upstream]
listen = "127.0.0.1:0"
tokens_dir = "tokens"
admin_token_file = "admin.token"
forward_interval_secs = 1
settle_secs = 2
"#;

/// One edge posting to the demo's upstream.
const EDGE_CONFIG: &str = r#"# Written by `edgemeter demo`: an edge posting to the demo's upstream.
[agent]
id = "{id}"
state_dir = "{id}-state"
flush_interval_secs = 0.2

[[source]]
type = "synthetic"
name = "users"
metric = "demo"
rate_per_sec = 5
users = "{users}"
users_window_secs = 2

[[sink]]
type = "upstream"
endpoint = "http://{listen}"
token_file = "tokens/{id}.token"
retry_initial_secs = 0.2
retry_max_secs = 1
"#;

/// The edges: ids, and the users each sees (they overlap, as gossip makes
/// xx gateways' recipient sets overlap): 3,500 distinct in all, 4,500 summed.
const EDGES: [(&str, &str); 3] = [
    ("edge-1", "0..1500"),
    ("edge-2", "1000..2500"),
    ("edge-3", "2000..3500"),
];

/// A fresh random token (the demo's only: real deployments make their own).
fn demo_token(what: &str) -> String {
    format!(
        "demo-{what}-{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    )
}

/// The edges' tokens and the dashboard's, written before the upstream
/// starts so that it reads them at once; the dashboard's is returned.
fn write_tokens(dir: &std::path::Path) -> Result<String, String> {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens)
        .map_err(|e| format!("cannot create {}: {e}", tokens.display()))?;
    let mut files: Vec<(PathBuf, String)> = EDGES
        .iter()
        .map(|(id, _)| (tokens.join(format!("{id}.token")), demo_token(id)))
        .collect();
    let admin = demo_token("dashboard");
    files.push((dir.join("admin.token"), admin.clone()));
    for (path, token) in files {
        std::fs::write(&path, token)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(admin)
}

/// Start the edge agents; each is stopped (SIGTERM) by the returned guard.
fn start_edges(dir: &std::path::Path, listen: std::net::SocketAddr) -> Result<Edges, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut children = Vec::new();
    for (id, users) in EDGES {
        let config = dir.join(format!("{id}.toml"));
        let text = EDGE_CONFIG
            .replace("{id}", id)
            .replace("{users}", users)
            .replace("{listen}", &listen.to_string());
        std::fs::write(&config, text)
            .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let child = std::process::Command::new(&exe)
            .args(["run", "-c"])
            .arg(&config)
            .env("EDGEMETER_LOG", "error")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start edge {id}: {e}"))?;
        children.push(child);
    }
    Ok(Edges(children))
}

struct Edges(Vec<std::process::Child>);

impl Drop for Edges {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let term = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if !term {
                let _ = c.kill();
            }
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// What the upstream holds: per window, the union of the edges' users
/// beside the sum of their counts.
fn network_summary(config: &config::Config) -> String {
    let Some(up) = &config.upstream else {
        return String::new();
    };
    let mut store = match crate::upstream::open_store(up, &config.agent.state_dir, true) {
        Ok(s) => s,
        Err(e) => return format!("cannot read the upstream store: {e}\n"),
    };
    let q = crate::upstream::store::SeriesQuery {
        metric: "demo_active_users".into(),
        start_ms: now_ms() - 3_600_000,
        end_ms: now_ms() + 1,
        agent: None,
        dims: Vec::new(),
        limit: 1000,
    };
    let (Ok(union), Ok(each)) = (
        store.series(&q),
        store.series(&crate::upstream::store::SeriesQuery {
            agent: Some("*".into()),
            ..q.clone()
        }),
    ) else {
        return "cannot query the upstream store\n".into();
    };
    let mut out = format!(
        "\nupstream: {} edges posting users {}; per 2 s window, network-wide:\n  {:<24} {:>6} {:>8} {:>14}\n",
        EDGES.len(),
        EDGES.map(|e| e.1).join(", "),
        "window",
        "edges",
        "union",
        "sum of edges"
    );
    for r in union.iter().rev().take(5).rev() {
        let sum: f64 = each.iter().filter(|e| e.ts == r.ts).map(|e| e.value).sum();
        out.push_str(&format!(
            "  {:<24} {:>6} {:>8.0} {:>14.0}\n",
            crate::clock::iso8601(r.ts),
            r.agents,
            r.value,
            sum
        ));
    }
    out.push_str("  (each id counted once: 3,500 when all three edges reported the window; summing says 4,500)\n");
    out
}

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

pub fn run(seconds: u64, dir: Option<PathBuf>) -> Outcome {
    let dir =
        dir.unwrap_or_else(|| std::env::temp_dir().join(format!("edgemeter-demo-{}", now_ms())));
    let port = match simulated_session_host() {
        Ok(p) => p,
        Err(e) => {
            return Err(Failed::new(
                Exit::Failure,
                format!("edgemeter demo: cannot start the simulated session host on loopback: {e}"),
            ));
        }
    };
    let text = DEMO_CONFIG.replace("{port}", &port.to_string());
    let path = dir.join("edgemeter.toml");
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &text)) {
        return Err(Failed::new(
            Exit::Failure,
            format!("edgemeter demo: cannot write {}: {e}", path.display()),
        ));
    }
    let config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            return Err(Failed::new(
                Exit::Failure,
                format!("edgemeter demo: the built-in config is invalid (a bug):\n{e}"),
            ));
        }
    };
    let state = config.agent.state_dir.clone();
    let admin = match write_tokens(&dir) {
        Ok(t) => t,
        Err(e) => return Err(Failed::new(Exit::Failure, format!("edgemeter demo: {e}"))),
    };
    let server = match Ok::<(), String>(()).and_then(|()| {
        crate::upstream::Server::prepare(
            config
                .upstream
                .clone()
                .expect("the demo config has [upstream]"),
            &state,
            true,
        )
    }) {
        Ok(s) => s,
        Err(e) => {
            return Err(Failed::new(
                Exit::Failure,
                format!("edgemeter demo: cannot start the upstream: {e}"),
            ));
        }
    };
    let listen = match server.local_addr() {
        Ok(a) => a,
        Err(e) => return Err(Failed::new(Exit::Failure, format!("edgemeter demo: {e}"))),
    };
    let edges = match start_edges(&dir, listen) {
        Ok(e) => e,
        Err(e) => {
            return Err(Failed::new(Exit::Failure, format!("edgemeter demo: {e}")));
        }
    };
    let how_long = if seconds == 0 {
        "until Ctrl-C".to_owned()
    } else {
        format!("for {seconds} s (Ctrl-C stops early; --seconds 0 runs until Ctrl-C)")
    };
    println!(
        "edgemeter demo: running {how_long} in {}\n\
         dashboard:  http://{listen}/  (sign in with the token {admin}, also in {})",
        dir.display(),
        dir.join("admin.token").display()
    );
    let upstream: Box<dyn crate::sources::Source> = Box::new(server);
    let result = agent::run(
        config,
        vec![("upstream".to_owned(), upstream)],
        (seconds > 0).then(|| Duration::from_secs(seconds)),
    );
    drop(edges);
    if let Err(e) = result {
        return Err(Failed::new(Exit::State, format!("edgemeter demo: {e}")));
    }
    let Ok(config) = config::load(&path) else {
        return Err(Failed::logged(Exit::Failure));
    };
    let scope = crate::status::Scope::of(&config);
    match crate::status::collect(&scope, crate::status::Holder::Ask, now_ms()) {
        Ok(s) => print!("\n{}", crate::status::text::render(&s)),
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
    print!("{}", network_summary(&config));
    let csv = dir.join("points.csv");
    let lines = std::fs::read_to_string(&csv).map_or(0, |t| t.lines().count().saturating_sub(1));
    println!(
        "\n{lines} points delivered to {}\nconfig: {}\nTry: edgemeter status -c {}",
        csv.display(),
        path.display(),
        path.display()
    );
    Ok(())
}
