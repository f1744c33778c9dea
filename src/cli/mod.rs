//! The command line: parses arguments, loads the config, runs one command
//! and turns every failure into a message and an exit code.
//!
//! Exit codes: 0 success; 1 a failure while working (the outbox could not be
//! read, ...); 2 bad usage or an invalid config; 3 the state directory is
//! locked by another agent or unusable.

mod args;
pub mod demo;
mod help;

use args::{Command, OutboxAction, RelayAction, ReportFrom, Stop, Which};

use std::ffi::OsString;
use std::process::ExitCode;

use crate::clock::{iso8601, now_ms};
use crate::config::{self, Config};
use crate::outbox::{DeadLetter, Outbox};
use crate::sources::{SourceConfig, xx_gateway};
use crate::{agent, logging, upstream};

/// The exit codes, one per kind of ending (the README and `--help` list them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A failure while working (the outbox could not be read, ...).
    Failure = 1,
    /// Bad usage or an invalid config.
    Usage = 2,
    /// The state directory is locked by another agent or unusable.
    State = 3,
}

/// How a command ended badly: its exit code, and what to tell the user on
/// stderr (`None` when it was logged or printed already).
#[derive(Debug)]
pub struct Failed {
    pub exit: Exit,
    pub message: Option<String>,
}

impl Failed {
    pub fn new(exit: Exit, message: String) -> Failed {
        Failed {
            exit,
            message: Some(message),
        }
    }

    pub fn logged(exit: Exit) -> Failed {
        Failed {
            exit,
            message: None,
        }
    }
}

/// What a command returns; [`main`] turns it into the exit code.
pub type Outcome = Result<(), Failed>;

/// The one exit point: parse, run, and turn the outcome into an exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    match command(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if let Some(m) = f.message {
                eprintln!("{}", m.trim_end());
            }
            ExitCode::from(f.exit as u8)
        }
    }
}

fn command(args: impl IntoIterator<Item = OsString>) -> Outcome {
    let command = match args::parse(args) {
        Ok(c) => c,
        Err(Stop::Print(text)) => {
            println!("{}", text.trim_end());
            return Ok(());
        }
        Err(Stop::Usage(text)) => return Err(Failed::new(Exit::Usage, text)),
    };
    let path = match &command {
        Command::Demo { seconds, dir } => {
            logging::init(logging::env_level().unwrap_or(log::LevelFilter::Info));
            return demo::run(*seconds, dir.clone());
        }
        Command::Report {
            from: ReportFrom::Url { url, token_file },
            route,
            query,
        } => return report_remote(url, token_file, route, query),
        Command::Report {
            from: ReportFrom::Config(config),
            ..
        }
        | Command::Run { config }
        | Command::Check { config }
        | Command::Status { config, .. }
        | Command::Outbox { config, .. }
        | Command::Verify { config, .. }
        | Command::Relay { config, .. }
        | Command::Upstream { config }
        | Command::Rollup { config, .. } => config.clone(),
    };
    let config = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            let mut message = e.to_string();
            if let Command::Check { .. } = command {
                let found = logging::counted(e.problem_count(), "problem", "problems");
                message.push_str(&format!("\n{found} found"));
            }
            return Err(Failed::new(Exit::Usage, message));
        }
    };
    logging::init(logging::env_level().unwrap_or(config.agent.log_level));
    match command {
        Command::Run { .. } => run(config),
        Command::Check { .. } => {
            println!("{}", summary(&config));
            check_files(&config)
        }
        Command::Status { json, .. } => status(&config, json),
        Command::Outbox { action, which, .. } => outbox(&config, action, &which),
        Command::Verify { rows, .. } => verify(&config, rows),
        Command::Relay { action, source, .. } => relay(&config, action, source.as_deref()),
        Command::Upstream { .. } => upstream(config),
        Command::Rollup { date, format, .. } => rollup(&config, date.as_deref(), format.as_deref()),
        Command::Report { route, query, .. } => report_local(&config, route, query),
        Command::Demo { .. } => unreachable!("handled above"),
    }
}

/// `check` reads every secret file the service will need, and the files
/// each source reads or writes, so that
/// `ExecStartPre=edgemeter check` stops a start that would fail later.
fn check_files(config: &Config) -> Outcome {
    let mut problems: Vec<String> = config
        .secret_files()
        .into_iter()
        .filter_map(|(what, path)| crate::problems::check_secret_file(&path, &what).err())
        .collect();
    for s in &config.sources {
        for p in crate::sources::check(&s.config) {
            problems.push(format!("source `{}`: {p}", s.name));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let mut message = format!("{}:", config.path.display());
    for p in &problems {
        message += &format!("\n  {p}");
    }
    message += &format!(
        "\n{} found",
        logging::counted(problems.len(), "problem", "problems")
    );
    Err(Failed::new(Exit::Usage, message))
}

pub fn run(config: Config) -> Outcome {
    if config.upstream.is_some() {
        log::error!(
            "{} has an [upstream] table: start the aggregator with `edgemeter upstream`, not `run`",
            config.path.display()
        );
        return Err(Failed::logged(Exit::Usage));
    }
    agent_exit(agent::run(config, Vec::new(), None))
}

fn agent_exit(result: Result<(), agent::AgentError>) -> Outcome {
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            log::error!("{e}");
            Err(Failed::logged(match e {
                agent::AgentError::Lock(_) | agent::AgentError::Outbox(_) => Exit::State,
                agent::AgentError::Signals(_)
                | agent::AgentError::Listen(..)
                | agent::AgentError::Uncommitted(_) => Exit::Failure,
            }))
        }
    }
}

fn upstream(config: Config) -> Outcome {
    let Some(up) = config.upstream.clone() else {
        log::error!(
            "{} has no [upstream] table; see `edgemeter upstream --help`",
            config.path.display()
        );
        return Err(Failed::logged(Exit::Usage));
    };
    let forwards = !config.sinks.is_empty();
    let server = match upstream::Server::prepare(up, &config.agent.state_dir, forwards) {
        Ok(s) => s,
        Err(e) => {
            log::error!("{e}");
            return Err(Failed::logged(Exit::Failure));
        }
    };
    agent_exit(agent::run(
        config,
        vec![("upstream".to_owned(), Box::new(server))],
        None,
    ))
}

fn rollup(config: &Config, date: Option<&str>, format: Option<&str>) -> Outcome {
    let Some(up) = &config.upstream else {
        return Err(Failed::new(
            Exit::Usage,
            format!("{} has no [upstream] table", config.path.display()),
        ));
    };
    let format = match format {
        Some(f) => match upstream::query::Format::parse(f) {
            Ok(f) => f,
            Err(e) => {
                return Err(Failed::new(Exit::Usage, format!("edgemeter: {e}")));
            }
        },
        None => upstream::query::Format::Csv,
    };
    let now = now_ms();
    let day = date.map_or_else(|| crate::clock::day(now - 86_400_000), str::to_owned);
    let Some(start) = crate::clock::parse_iso8601(&day).filter(|_| day.len() == 10) else {
        return Err(Failed::new(
            Exit::Usage,
            format!("edgemeter: --date `{day}` must be a day as YYYY-MM-DD"),
        ));
    };
    let mut store = match upstream::open_store(up, &config.agent.state_dir, false) {
        Ok(s) => s,
        Err(e) => {
            return Err(Failed::new(Exit::Failure, format!("edgemeter: {e}")));
        }
    };
    let expired = store.deleted_before(now).is_some_and(|line| start < line);
    match store.rollup(&day, start, now) {
        Ok(rows) => {
            print!("{}", upstream::query::render_rollups(&rows, format));
            if expired {
                eprintln!(
                    "{day} is older than retention_days: its raw data was deleted, so these {} \
                     totals are the ones kept then, not recomputed",
                    rows.len()
                );
            } else {
                eprintln!(
                    "{day}: {} totals stored (replacing any computed before)",
                    rows.len()
                );
            }
            Ok(())
        }
        Err(e) => Err(Failed::new(
            Exit::Failure,
            format!("edgemeter: rolling up {day}: {e}"),
        )),
    }
}

fn report_local(config: &Config, route: &'static str, query: Vec<(String, String)>) -> Outcome {
    let Some(up) = &config.upstream else {
        return Err(Failed::new(
            Exit::Usage,
            format!(
                "edgemeter: {} has no [upstream] table; give one that does, or --url and --token-file",
                config.path.display()
            ),
        ));
    };
    let params = match upstream::query::Params::from_pairs(query) {
        Ok(p) => p,
        Err(e) => {
            return Err(Failed::new(Exit::Usage, format!("edgemeter: {e}")));
        }
    };
    let store = match upstream::open_store(up, &config.agent.state_dir, true) {
        Ok(s) => crate::runtime::OnWorker::new("report", s),
        Err(e) => {
            return Err(Failed::new(Exit::Failure, format!("edgemeter: {e}")));
        }
    };
    match smol::block_on(upstream::api::answer(&store, route, params)) {
        Ok((_, body)) => {
            print!("{body}");
            Ok(())
        }
        Err(upstream::api::QueryError::Invalid(e)) => {
            Err(Failed::new(Exit::Usage, format!("edgemeter: {e}")))
        }
        Err(upstream::api::QueryError::Store(e)) => {
            Err(Failed::new(Exit::Failure, format!("edgemeter: {e}")))
        }
    }
}

fn report_remote(
    url: &str,
    token_file: &std::path::Path,
    route: &str,
    query: &[(String, String)],
) -> Outcome {
    let token = match crate::problems::read_token(token_file) {
        Ok(t) => t,
        Err(e) => {
            return Err(Failed::new(Exit::Usage, format!("edgemeter: {e}")));
        }
    };
    let agent = match crate::http_client::agent(None, std::time::Duration::from_secs(60)) {
        Ok(a) => a,
        Err(e) => {
            return Err(Failed::new(Exit::Failure, format!("edgemeter: {e}")));
        }
    };
    let target = format!("{}{route}", url.trim_end_matches('/'));
    let mut req = agent
        .get(&target)
        .header("authorization", format!("Bearer {token}"));
    for (k, v) in query {
        req = req.query(k, v);
    }
    let mut resp = match req.call() {
        Ok(r) => r,
        Err(e) => {
            return Err(Failed::new(
                Exit::Failure,
                format!("edgemeter: GET {target}: {e}"),
            ));
        }
    };
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_string()
        .unwrap_or_default();
    if (200..300).contains(&status) {
        print!("{body}");
        Ok(())
    } else {
        let exit = if status == 400 {
            Exit::Usage
        } else {
            Exit::Failure
        };
        Err(Failed::new(
            exit,
            format!(
                "edgemeter: GET {target}: HTTP {status}: {}",
                body.trim_end()
            ),
        ))
    }
}

fn relay(config: &Config, action: RelayAction, only: Option<&str>) -> Outcome {
    use crate::sources::relay::provision::{self, Api};
    let sources: Vec<_> = config
        .sources
        .iter()
        .filter_map(|s| match &s.config {
            SourceConfig::Relay(c) if only.is_none_or(|o| o == s.name) => Some((&s.name, c)),
            _ => None,
        })
        .collect();
    if sources.is_empty() {
        return Err(Failed::new(
            Exit::Usage,
            format!(
                "edgemeter relay: {} has no relay source{}",
                config.path.display(),
                only.map(|o| format!(" named `{o}`")).unwrap_or_default()
            ),
        ));
    }
    let mut ok = true;
    for (name, c) in sources {
        let api = Api::new(&c.api_base(), std::time::Duration::from_secs(10));
        let rules = match &c.provision {
            Some(p) => {
                let read = provision::read_rules(&p.dir, &c.streams);
                for why in &read.skipped {
                    ok = false;
                    eprintln!("edgemeter relay: source `{name}`: skipped stream {why}");
                }
                Ok(read.rules)
            }
            None if matches!(action, RelayAction::Rules) => Ok(Vec::new()),
            None => Err(
                "it has no `provision` block; add one naming the directory of log.access.<stream> and log.token.<stream> files"
                    .to_owned(),
            ),
        };
        let result = rules.and_then(|rules| match action {
            RelayAction::Provision => api.reconcile(&rules).map(|r| {
                println!(
                    "source `{name}`: {} posted to {}, {} already in place",
                    provision::rules(r.posted.len()),
                    c.api_base(),
                    r.unchanged
                );
                for (id, stream) in &r.others {
                    println!(
                        "  warning: rule `{id}` also forwards {stream}; its messages arrive twice (DELETE {}/api/destinations/{id})",
                        c.api_base()
                    );
                }
            }),
            RelayAction::Rules => api.installed(&rules).map(|list| {
                println!(
                    "source `{name}`: {} at {}",
                    provision::rules(list.len()),
                    c.api_base()
                );
                println!("id\tstream\tdestination\ttoken");
                for i in list {
                    let token = match i.token_matches {
                        Some(true) => "matches log.token",
                        Some(false) => "DIFFERS from log.token",
                        None => "(redacted)",
                    };
                    println!("{}\t{}\t{}\t{token}", i.id, i.stream, i.destination);
                }
            }),
        });
        if let Err(e) = result {
            ok = false;
            eprintln!("edgemeter relay: source `{name}`: {e}");
        }
    }
    if ok {
        Ok(())
    } else {
        Err(Failed::logged(Exit::Failure))
    }
}

fn verify(config: &Config, rows: u32) -> Outcome {
    let mut ok = true;
    let mut any = false;
    for s in &config.sources {
        let SourceConfig::XxGateway(c) = &s.config else {
            continue;
        };
        any = true;
        match xx_gateway::verify(c, rows) {
            Err(e) => {
                ok = false;
                println!("source `{}`: {e}", s.name);
            }
            Ok(v) => {
                ok &= v.malformed.is_empty() && v.unclaimed.is_empty();
                println!(
                    "source `{}`: {} rows checked: {} malformed, {} do not claim their rounds",
                    s.name,
                    v.rows,
                    v.malformed.len(),
                    v.unclaimed.len()
                );
                for (id, why) in v.malformed.iter().take(10) {
                    println!("  row id {id}: {why}");
                }
                if let Some(ids) = (!v.unclaimed.is_empty())
                    .then(|| v.unclaimed.iter().take(10).map(i64::to_string))
                {
                    println!("  e.g. row ids {}", ids.collect::<Vec<_>>().join(", "));
                }
            }
        }
    }
    if !any {
        return Err(Failed::new(
            Exit::Usage,
            format!(
                "edgemeter verify: {} has no xx_gateway source",
                config.path.display()
            ),
        ));
    }
    if ok {
        Ok(())
    } else {
        Err(Failed::logged(Exit::Failure))
    }
}

fn summary(c: &Config) -> String {
    let names = |v: Vec<&String>| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        }
    };
    format!(
        "{}: ok: agent `{}`, state in {}, sources: {}; sinks: {}",
        c.path.display(),
        c.agent.id,
        c.agent.state_dir.display(),
        names(c.sources.iter().map(|s| &s.name).collect()),
        sinks(c),
    )
}

/// The sinks' names, each with the proxy it goes through, if the
/// environment names one (`check` runs before the unit starts the agent,
/// with the unit's environment).
fn sinks(c: &Config) -> String {
    if c.sinks.is_empty() {
        return "none".to_owned();
    }
    let named: Vec<String> = c
        .sinks
        .iter()
        .map(|s| {
            match s
                .config
                .url()
                .and_then(|u| crate::http_client::proxy_for(&u))
            {
                Some(proxy) => format!("{} (through the {proxy})", s.name),
                None => s.name.clone(),
            }
        })
        .collect();
    named.join(", ")
}

fn status(config: &Config, json: bool) -> Outcome {
    let scope = crate::status::Scope::of(config);
    let text = match crate::status::collect(&scope, crate::status::Holder::Ask, now_ms()) {
        Ok(s) if json => serde_json::to_string_pretty(&s).expect("a snapshot serializes") + "\n",
        Ok(s) => crate::status::text::render(&s),
        Err(e) => return Err(Failed::new(Exit::Failure, format!("edgemeter: {e}"))),
    };
    // A reader that stops early (`| head`) is not an error of ours.
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(())
}

fn outbox(config: &Config, action: OutboxAction, which: &Which) -> Outcome {
    let dir = &config.agent.state_dir;
    let (sink, id) = match which {
        Which::All => (None, None),
        Which::Sink(s) => (Some(s.as_str()), None),
        Which::Id(i) => (None, Some(*i)),
    };
    let result = match action {
        OutboxAction::List => Outbox::open_read_only(dir)
            .and_then(|o| o.dead_letters(sink))
            .map(|list| {
                print!("{}", render_dead_letters(&list));
            }),
        // Writes go through a short transaction; the running agent's WAL
        // connection and this one take turns via SQLite's busy timeout.
        OutboxAction::Retry | OutboxAction::Purge => Outbox::open_admin(dir).and_then(|mut o| {
            let (n, verb) = match action {
                OutboxAction::Retry => (o.retry_dead(sink, id)?, "marked for retry"),
                _ => (o.purge_dead(sink, id)?, "purged"),
            };
            println!("{n} dead letter(s) {verb}");
            Ok(())
        }),
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) => Err(Failed::new(Exit::Failure, format!("edgemeter: {e}"))),
    }
}

fn render_dead_letters(list: &[DeadLetter]) -> String {
    if list.is_empty() {
        return "no dead letters\n".to_owned();
    }
    let mut out = String::from("id\tsink\tbatch\trecords\tbytes\tstate\tattempts\tsince\terror\n");
    for d in list {
        out += &format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            d.id,
            d.sink,
            d.seq,
            d.count,
            d.bytes,
            d.state,
            d.attempts,
            iso8601(d.created_ms),
            d.error.replace(['\n', '\t'], " ")
        );
    }
    out
}
