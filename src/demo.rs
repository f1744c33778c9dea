//! `edgemeter demo`: the pipeline on this machine with nothing to connect
//! to. A synthetic source feeds the outbox and a CSV sink for a few seconds
//! in a directory of its own; then it prints the status and where to look.

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

[[sink]]
type = "csv"
name = "local"
path = "points.csv"
"#;

pub fn run(seconds: u64, dir: Option<PathBuf>) -> ExitCode {
    let dir =
        dir.unwrap_or_else(|| std::env::temp_dir().join(format!("edgemeter-demo-{}", now_ms())));
    let text = DEMO_CONFIG;
    let path = dir.join("edgemeter.toml");
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, text)) {
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
    if let Err(e) = agent::run(config, Some(Duration::from_secs(seconds))) {
        eprintln!("edgemeter demo: {e}");
        return ExitCode::from(cli::EXIT_STATE);
    }
    let Ok(config) = config::load(&path) else {
        return ExitCode::from(cli::EXIT_FAILURE);
    };
    let outbox = crate::outbox::Outbox::open_read_only(&state);
    match outbox.and_then(|o| Ok((o.stats()?, o.path().display().to_string()))) {
        Ok((stats, p)) => print!(
            "\n{}",
            cli::render_status(&config, state_dir::holder(&state), &p, &stats, now_ms())
        ),
        Err(e) => eprintln!("edgemeter demo: {e}"),
    }
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
