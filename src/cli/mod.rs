//! The command line: parses arguments, loads the config, runs one command
//! and turns every failure into a message and an exit code.
//!
//! Exit codes: 0 success; 1 a failure while working (the outbox could not be
//! read, ...); 2 bad usage or an invalid config; 3 the state directory is
//! locked by another agent or unusable.

pub mod demo;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use lexopt::prelude::*;

use crate::clock::{human_duration, iso8601, now_ms};
use crate::config::{self, Config};
use crate::outbox::{DeadLetter, Outbox, Stats};
use crate::sources::{SourceConfig, xx_gateway};
use crate::{agent, logging, state_dir, upstream};

pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_STATE: u8 = 3;

const VERSION: &str = concat!("edgemeter ", env!("CARGO_PKG_VERSION"));

const HELP: &str = "\
edgemeter: measures who is active, where and how much, buffers every
observation in a local SQLite outbox and forwards it to its sinks.

Usage: edgemeter <COMMAND> [OPTIONS]

Commands:
  run       Run the edge agent until SIGTERM or SIGINT
  check     Validate a config file and list every problem in it
  status    Show the outbox: buffer depth, drops, sinks, dead letters
  outbox    List, retry or purge dead letters (batches a sink refused)
  verify    Check an xx gateway's bloom filter rows decode and claim their rounds
  relay     Set (provision) or show the session host's rules for relay sources
  upstream  Run the aggregator edges post to; `upstream rollup` computes daily totals
  report    Series, events or daily totals from an upstream's store or URL
  demo      Run the pipeline for a few seconds in a temporary directory

Options (every command):
  -c, --config FILE   Config file [default: /etc/edgemeter/edgemeter.toml]
  -h, --help          Show help (also `edgemeter <COMMAND> --help`)
  -V, --version       Show the version

Environment:
  EDGEMETER_LOG       Log level (off, error, warn, info, debug, trace);
                      overrides `[agent] log_level`

Exit codes: 0 ok, 1 failure while working, 2 bad usage or config,
3 state directory locked by another agent or unusable.

The annotated example config documents every key:
/usr/share/doc/edgemeter/edgemeter.toml (packaging/edgemeter.toml in the source).
";

const HELP_RUN: &str = "\
Run the edge agent: sources feed the SQLite outbox, sinks deliver from it.
Stops cleanly on SIGTERM or SIGINT (commits buffered records, exits 0 within 5 s).
Logs go to stderr.

Usage: edgemeter run [-c FILE]
";

const HELP_CHECK: &str = "\
Validate a config file. Prints every problem as FILE:LINE:COL: message and
exits 2 if there is any, or prints a summary and exits 0.

Usage: edgemeter check [-c FILE]
";

const HELP_STATUS: &str = "\
Show the agent's outbox: whether an agent is running on it, buffered records,
the age of the oldest, drops by reason and sink, and per sink: pending records,
deliveries, failures, the last error and dead letters. Safe while `run` runs.

Usage: edgemeter status [-c FILE]
";

const HELP_OUTBOX: &str = "\
Dead letters are batches a sink refused for good (for example a 4xx answer).
They are kept with their records until you retry or purge them.

Usage:
  edgemeter outbox list  [-c FILE] [--sink NAME]
  edgemeter outbox retry [-c FILE] (--all | --sink NAME | --id N)
  edgemeter outbox purge [-c FILE] (--all | --sink NAME | --id N)

`retry` marks them for redelivery by the running agent (or the next one
started), with their original batch ids. `purge` deletes them.
";

const HELP_VERIFY: &str = "\
For each `xx_gateway` source in the config: read the newest N rows of
client_bloom_filters, decode each 99-byte filter and check that it claims its
own first_round and first_round + round_range. Read-only. Exits 1 if any row
is malformed or does not claim its rounds.

Usage: edgemeter verify [-c FILE] [--rows N]   (N: 1 to 1000000, default 1000)
";

const HELP_RELAY: &str = "\
For each `relay` source (or only --source NAME):

  edgemeter relay provision [-c FILE] [--source NAME]
      Read log.access.<stream> and log.token.<stream> from the source's
      `provision.dir` and POST /api/destinations {id, stream, destination,
      token} to its session host for every stream that lacks its rule or has
      a different one. The rule id is the stream name, so running it again
      changes nothing. A running agent does this by itself when the source
      has a `provision` block (and again after the session host restarts).
  edgemeter relay rules [-c FILE] [--source NAME]
      List the session host's rules. Tokens are never shown: only whether
      each one matches the token file.

Exits 1 if a session host cannot be reached or a file is missing.
";

const HELP_UPSTREAM: &str = "\
Run the aggregator: an HTTP server (`[upstream] listen`, 127.0.0.1:8650 by
default) that stores every edge's batches exactly once, counts each active
user once across all edges (the union of their sketches), answers queries,
and forwards the network-wide values through its own [[sink]]s.

Usage:
  edgemeter upstream [-c FILE]
  edgemeter upstream rollup [-c FILE] [--date YYYY-MM-DD] [--format csv|tsv|json]
      Compute one UTC day's totals from the stored data (default: yesterday)
      and store them, replacing that day's earlier totals: running it twice,
      or again after a late batch, never counts anything twice.

Routes: POST /v1/batches (agent token), GET /v1/series, /v1/events,
/v1/rollups and DELETE /v1/users/<user> (admin token), GET /health, /metrics.
";

const HELP_REPORT: &str = "\
Print a series (default), stored events (--events) or daily totals
(--rollups), from the local store of the upstream configured in -c FILE, or
from a running upstream at --url (with the admin token in --token-file).

Usage: edgemeter report [-c FILE | --url URL --token-file FILE]
                        [--metric NAME] [--range TODAY|1D|7D|10D|30D | --start ISO --end ISO]
                        [--format csv|tsv|json] [--agent ID|*] [--dim KEY=VALUE]...
                        [--events [--user U] [--type T]] [--rollups] [--limit N]

The network-wide value of a series is the union of the edges' sketches
(distinct users) where there are sketches, else the sum of their points.
--agent ID shows that agent's own points instead; --agent '*' every agent's.
";

const HELP_DEMO: &str = "\
Run the pipeline on this machine with no peers: a synthetic source feeds the
outbox and a CSV sink, for a few seconds, in a temporary directory (kept, so
you can look at it). Prints what happened.

Usage: edgemeter demo [--seconds N] [--dir DIR]
";

enum Command {
    Run,
    Check,
    Status,
    Outbox(OutboxAction),
    Demo { seconds: u64, dir: Option<PathBuf> },
    Verify { rows: u32 },
    Relay(RelayAction),
    Upstream { rollup: bool },
    Report,
}

#[derive(Clone, Copy)]
enum RelayAction {
    Provision,
    Rules,
}

enum OutboxAction {
    List,
    Retry,
    Purge,
}

struct Args {
    command: Command,
    config: PathBuf,
    sink: Option<String>,
    id: Option<i64>,
    source: Option<String>,
    /// `report` and `upstream rollup`: query parameters, as `key=value`.
    query: Vec<(String, String)>,
    /// `report --url`/`--token-file`; `upstream rollup --date`.
    url: Option<String>,
    token_file: Option<PathBuf>,
    date: Option<String>,
    report_route: &'static str,
}

/// Parsed arguments, or the text to print and the code to exit with.
fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Args, (String, u8)> {
    let usage = |msg: String| {
        (
            format!("edgemeter: {msg}\nTry `edgemeter --help`."),
            EXIT_USAGE,
        )
    };
    let mut p = lexopt::Parser::from_args(args);
    let mut command = None;
    let mut action = None;
    let mut config = PathBuf::from(config::DEFAULT_PATH);
    let (mut sink, mut id, mut all) = (None, None, false);
    let mut source = None;
    let mut relay_action = None;
    let (mut seconds, mut dir) = (10u64, None);
    let mut rows = 1000u32;
    let mut query: Vec<(String, String)> = Vec::new();
    let (mut url, mut token_file, mut date) = (None, None, None);
    let mut report_route = "/v1/series";
    let mut rollup = None;
    while let Some(arg) = p.next().map_err(|e| usage(e.to_string()))? {
        match arg {
            Short('h') | Long("help") => {
                let text = match (&command, &action) {
                    (Some(Command::Run), _) => HELP_RUN,
                    (Some(Command::Check), _) => HELP_CHECK,
                    (Some(Command::Status), _) => HELP_STATUS,
                    (Some(Command::Outbox(_)), _) | (_, Some(_)) => HELP_OUTBOX,
                    (Some(Command::Demo { .. }), _) => HELP_DEMO,
                    (Some(Command::Verify { .. }), _) => HELP_VERIFY,
                    (Some(Command::Relay(_)), _) => HELP_RELAY,
                    (Some(Command::Upstream { .. }), _) => HELP_UPSTREAM,
                    (Some(Command::Report), _) => HELP_REPORT,
                    (None, None) => HELP,
                };
                return Err((text.to_owned(), 0));
            }
            Short('V') | Long("version") => return Err((VERSION.to_owned(), 0)),
            Short('c') | Long("config") => {
                config = p.value().map_err(|e| usage(e.to_string()))?.into()
            }
            Long("sink") => {
                sink = Some(
                    p.value()
                        .map_err(|e| usage(e.to_string()))?
                        .string()
                        .map_err(|e| usage(e.to_string()))?,
                )
            }
            Long("id") => {
                id = Some(
                    p.value()
                        .map_err(|e| usage(e.to_string()))?
                        .parse()
                        .map_err(|e| usage(format!("--id: {e}")))?,
                )
            }
            Long("all") => all = true,
            Long("source") => {
                source = Some(
                    p.value()
                        .map_err(|e| usage(e.to_string()))?
                        .string()
                        .map_err(|e| usage(e.to_string()))?,
                )
            }
            Long("seconds") => {
                seconds = p
                    .value()
                    .map_err(|e| usage(e.to_string()))?
                    .parse()
                    .map_err(|e| usage(format!("--seconds: {e}")))?;
                if !(1..=3600).contains(&seconds) {
                    return Err(usage("--seconds takes 1 to 3600".into()));
                }
            }
            Long("rows") => {
                rows = p
                    .value()
                    .map_err(|e| usage(e.to_string()))?
                    .parse()
                    .map_err(|e| usage(format!("--rows: {e}")))?;
                if !(1..=1_000_000).contains(&rows) {
                    return Err(usage("--rows takes 1 to 1000000".into()));
                }
            }
            Long(
                key @ ("metric" | "range" | "start" | "end" | "format" | "agent" | "user" | "type"
                | "limit"),
            ) => {
                let key = key.to_owned();
                let v = p
                    .value()
                    .map_err(|e| usage(e.to_string()))?
                    .string()
                    .map_err(|e| usage(e.to_string()))?;
                query.push((key, v));
            }
            Long("dim") => {
                let v = p
                    .value()
                    .map_err(|e| usage(e.to_string()))?
                    .string()
                    .map_err(|e| usage(e.to_string()))?;
                let (k, val) = v
                    .split_once('=')
                    .ok_or_else(|| usage(format!("--dim takes KEY=VALUE, not `{v}`")))?;
                query.push((format!("dim.{k}"), val.to_owned()));
            }
            Long("events") => report_route = "/v1/events",
            Long("rollups") => report_route = "/v1/rollups",
            Long("url") => {
                url = Some(
                    p.value()
                        .map_err(|e| usage(e.to_string()))?
                        .string()
                        .map_err(|e| usage(e.to_string()))?,
                )
            }
            Long("token-file") => {
                token_file = Some(PathBuf::from(p.value().map_err(|e| usage(e.to_string()))?))
            }
            Long("date") => {
                date = Some(
                    p.value()
                        .map_err(|e| usage(e.to_string()))?
                        .string()
                        .map_err(|e| usage(e.to_string()))?,
                )
            }
            Long("dir") => dir = Some(PathBuf::from(p.value().map_err(|e| usage(e.to_string()))?)),
            Value(v) if command.is_none() => {
                command = Some(match v.to_str() {
                    Some("run") => Command::Run,
                    Some("check") => Command::Check,
                    Some("status") => Command::Status,
                    Some("outbox") => Command::Outbox(OutboxAction::List),
                    Some("demo") => Command::Demo {
                        seconds: 0,
                        dir: None,
                    },
                    Some("verify") => Command::Verify { rows: 0 },
                    Some("relay") => Command::Relay(RelayAction::Rules),
                    Some("upstream") => Command::Upstream { rollup: false },
                    Some("report") => Command::Report,
                    _ => return Err(usage(format!("unknown command `{}`", v.to_string_lossy()))),
                })
            }
            Value(v) if matches!(command, Some(Command::Outbox(_))) && action.is_none() => {
                action = Some(match v.to_str() {
                    Some("list") => OutboxAction::List,
                    Some("retry") => OutboxAction::Retry,
                    Some("purge") => OutboxAction::Purge,
                    _ => {
                        return Err(usage(format!(
                            "unknown outbox action `{}`; use list, retry or purge",
                            v.to_string_lossy()
                        )));
                    }
                })
            }
            Value(v) if matches!(command, Some(Command::Relay(_))) && relay_action.is_none() => {
                relay_action = Some(match v.to_str() {
                    Some("provision") => RelayAction::Provision,
                    Some("rules") => RelayAction::Rules,
                    _ => {
                        return Err(usage(format!(
                            "unknown relay action `{}`; use provision or rules",
                            v.to_string_lossy()
                        )));
                    }
                })
            }
            Value(v) if matches!(command, Some(Command::Upstream { .. })) && rollup.is_none() => {
                match v.to_str() {
                    Some("rollup") => rollup = Some(true),
                    _ => {
                        return Err(usage(format!(
                            "unknown upstream action `{}`; the only one is rollup",
                            v.to_string_lossy()
                        )));
                    }
                }
            }
            other => return Err(usage(other.unexpected().to_string())),
        }
    }
    let command = match command {
        None => return Err((HELP.to_owned(), EXIT_USAGE)),
        Some(Command::Outbox(_)) => match action {
            None => {
                return Err(usage(
                    "`outbox` needs an action: list, retry or purge".into(),
                ));
            }
            Some(a) => {
                if !matches!(a, OutboxAction::List) && !all && sink.is_none() && id.is_none() {
                    return Err(usage(
                        "say which dead letters: --all, --sink NAME or --id N".into(),
                    ));
                }
                Command::Outbox(a)
            }
        },
        Some(Command::Demo { .. }) => Command::Demo { seconds, dir },
        Some(Command::Verify { .. }) => Command::Verify { rows },
        Some(Command::Relay(_)) => match relay_action {
            Some(a) => Command::Relay(a),
            None => return Err(usage("`relay` needs an action: provision or rules".into())),
        },
        Some(Command::Upstream { .. }) => Command::Upstream {
            rollup: rollup.unwrap_or(false),
        },
        Some(Command::Report) if url.is_some() != token_file.is_some() => {
            return Err(usage("--url and --token-file go together".into()));
        }
        Some(c) => c,
    };
    Ok(Args {
        command,
        config,
        sink,
        id,
        source,
        query,
        url,
        token_file,
        date,
        report_route,
    })
}

pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = match parse_args(args) {
        Ok(a) => a,
        Err((text, 0)) => {
            println!("{}", text.trim_end());
            return ExitCode::SUCCESS;
        }
        Err((text, code)) => {
            eprintln!("{}", text.trim_end());
            return ExitCode::from(code);
        }
    };
    if let (Command::Report, Some(url), Some(token)) = (&args.command, &args.url, &args.token_file)
    {
        return report_remote(url, token, args.report_route, &args.query);
    }
    if let Command::Demo { seconds, dir } = args.command {
        logging::init(logging::env_level().unwrap_or(log::LevelFilter::Info));
        return demo::run(seconds, dir);
    }
    let config = match config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            if let Command::Check = args.command {
                eprintln!("{} problem(s) found", e.problem_count());
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    logging::init(logging::env_level().unwrap_or(config.agent.log_level));
    match args.command {
        Command::Run => run(config),
        Command::Check => {
            println!("{}", summary(&config));
            ExitCode::SUCCESS
        }
        Command::Status => status(&config),
        Command::Outbox(action) => outbox(&config, action, args.sink.as_deref(), args.id),
        Command::Verify { rows } => verify(&config, rows),
        Command::Relay(action) => relay(&config, action, args.source.as_deref()),
        Command::Upstream { rollup: false } => upstream(config),
        Command::Upstream { rollup: true } => rollup(&config, args.date.as_deref(), &args.query),
        Command::Report => report_local(&config, args.report_route, args.query),
        Command::Demo { .. } => unreachable!("handled above"),
    }
}

pub fn run(config: Config) -> ExitCode {
    if config.upstream.is_some() {
        log::error!(
            "{} has an [upstream] table: start the aggregator with `edgemeter upstream`, not `run`",
            config.path.display()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    agent_exit(agent::run(config, Vec::new(), None))
}

fn agent_exit(result: Result<(), agent::AgentError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(match e {
                agent::AgentError::Lock(_) | agent::AgentError::Outbox(_) => EXIT_STATE,
                agent::AgentError::Signals(_) => EXIT_FAILURE,
            })
        }
    }
}

fn upstream(config: Config) -> ExitCode {
    let Some(up) = config.upstream.clone() else {
        log::error!(
            "{} has no [upstream] table; see `edgemeter upstream --help`",
            config.path.display()
        );
        return ExitCode::from(EXIT_USAGE);
    };
    let forwards = !config.sinks.is_empty();
    let server = match upstream::Server::prepare(up, &config.agent.state_dir, forwards) {
        Ok(s) => s,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    agent_exit(agent::run(
        config,
        vec![("upstream".to_owned(), Box::new(server))],
        None,
    ))
}

fn rollup(config: &Config, date: Option<&str>, query: &[(String, String)]) -> ExitCode {
    let Some(up) = &config.upstream else {
        eprintln!("{} has no [upstream] table", config.path.display());
        return ExitCode::from(EXIT_USAGE);
    };
    let format = match query.iter().find(|(k, _)| k == "format") {
        Some((_, f)) => match upstream::query::Format::parse(f) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("edgemeter: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        None => upstream::query::Format::Csv,
    };
    let now = now_ms();
    let day = date.map_or_else(|| crate::clock::day(now - 86_400_000), str::to_owned);
    let Some(start) = crate::clock::parse_iso8601(&day).filter(|_| day.len() == 10) else {
        eprintln!("edgemeter: --date `{day}` must be a day as YYYY-MM-DD");
        return ExitCode::from(EXIT_USAGE);
    };
    let mut store = match upstream::open_store(up, &config.agent.state_dir, false) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("edgemeter: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match store.rollup(&day, start, now) {
        Ok(rows) => {
            print!("{}", upstream::query::render_rollups(&rows, format));
            eprintln!(
                "{day}: {} totals stored (replacing any computed before)",
                rows.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edgemeter: rolling up {day}: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn report_local(config: &Config, route: &'static str, query: Vec<(String, String)>) -> ExitCode {
    let Some(up) = &config.upstream else {
        eprintln!(
            "edgemeter: {} has no [upstream] table; give one that does, or --url and --token-file",
            config.path.display()
        );
        return ExitCode::from(EXIT_USAGE);
    };
    let params = match upstream::query::Params::from_pairs(query) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("edgemeter: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let store = match upstream::open_store(up, &config.agent.state_dir, true) {
        Ok(s) => crate::runtime::OnWorker::new("report", s),
        Err(e) => {
            eprintln!("edgemeter: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match smol::block_on(upstream::api::answer(&store, route, params)) {
        Ok((_, body)) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Err(upstream::api::Answer::Bad(e)) => {
            eprintln!("edgemeter: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(upstream::api::Answer::Store(e)) => {
            eprintln!("edgemeter: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn report_remote(
    url: &str,
    token_file: &std::path::Path,
    route: &str,
    query: &[(String, String)],
) -> ExitCode {
    let token = match crate::problems::read_token(token_file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("edgemeter: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let agent = match crate::http_client::agent(None, std::time::Duration::from_secs(60)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("edgemeter: {e}");
            return ExitCode::from(EXIT_FAILURE);
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
            eprintln!("edgemeter: GET {target}: {e}");
            return ExitCode::from(EXIT_FAILURE);
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
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "edgemeter: GET {target}: HTTP {status}: {}",
            body.trim_end()
        );
        ExitCode::from(if status == 400 {
            EXIT_USAGE
        } else {
            EXIT_FAILURE
        })
    }
}

fn relay(config: &Config, action: RelayAction, only: Option<&str>) -> ExitCode {
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
        eprintln!(
            "edgemeter relay: {} has no relay source{}",
            config.path.display(),
            only.map(|o| format!(" named `{o}`")).unwrap_or_default()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let mut ok = true;
    for (name, c) in sources {
        let api = Api::new(&c.api_base(), std::time::Duration::from_secs(10));
        let rules = match &c.provision {
            Some(p) => provision::read_rules(&p.dir, &c.streams),
            None if matches!(action, RelayAction::Rules) => Ok(Vec::new()),
            None => Err(
                "it has no `provision` block; add one naming the directory of log.access.<stream> and log.token.<stream> files"
                    .to_owned(),
            ),
        };
        let result = rules.and_then(|rules| match action {
            RelayAction::Provision => api.reconcile(&rules).map(|r| {
                println!(
                    "source `{name}`: {} rules posted to {}, {} already in place",
                    r.posted.len(),
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
                println!("source `{name}`: {} rules at {}", list.len(), c.api_base());
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
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    }
}

fn verify(config: &Config, rows: u32) -> ExitCode {
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
        eprintln!(
            "edgemeter verify: {} has no xx_gateway source",
            config.path.display()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
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
        names(c.sinks.iter().map(|s| &s.name).collect()),
    )
}

fn status(config: &Config) -> ExitCode {
    let dir = &config.agent.state_dir;
    let running = state_dir::holder(dir);
    let outbox = match Outbox::open_read_only(dir) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("edgemeter: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match outbox.stats() {
        Ok(stats) => {
            print!(
                "{}",
                render_status(
                    config,
                    running,
                    &outbox.path().display().to_string(),
                    &stats,
                    now_ms()
                )
            );
            print!("{}", source_status(config, now_ms()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edgemeter: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// What sources publish about themselves (the relay's streams), with its age.
pub fn source_status(config: &Config, now: i64) -> String {
    let mut out = String::new();
    for s in &config.sources {
        let path = crate::sources::status_path(&config.agent.state_dir, &s.name);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let written = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as i64);
        out += &format!("source {} (written {})\n", s.name, ago(now, written));
        for line in text.lines() {
            out += &format!("  {line}\n");
        }
    }
    out
}

fn ago(now: i64, t: Option<i64>) -> String {
    t.map_or_else(
        || "never".to_owned(),
        |t| format!("{} ago", human_duration(now - t)),
    )
}

pub fn render_status(
    config: &Config,
    running: Option<u32>,
    path: &str,
    s: &Stats,
    now: i64,
) -> String {
    let mut out = String::new();
    let state = match running {
        Some(0) => "running".to_owned(),
        Some(pid) => format!("running, pid {pid}"),
        None => "not running".to_owned(),
    };
    let pct = 100.0 * s.bytes as f64 / config.agent.buffer_max_bytes as f64;
    out += &format!("agent        {} ({state})\n", config.agent.id);
    out += &format!("outbox       {path}\n");
    out += &format!(
        "buffered     {} records, {} of {} bytes ({pct:.1}%)\n",
        s.records, s.bytes, config.agent.buffer_max_bytes
    );
    out += &format!(
        "oldest       {}\n",
        s.oldest_at_ms.map_or_else(
            || "nothing pending".to_owned(),
            |t| format!("{} old", human_duration(now - t))
        )
    );
    if s.drops.is_empty() {
        out += "drops        none\n";
    } else {
        for (i, (reason, sink, n)) in s.drops.iter().enumerate() {
            let label = if i == 0 { "drops" } else { "" };
            out += &format!("{label:<12} {n} {reason} (sink {sink})\n");
        }
    }
    out += &format!("dead letters {} bytes kept\n", s.dead_letter_bytes);
    if s.sinks.is_empty() {
        out += "sinks        none configured\n";
    }
    for k in &s.sinks {
        out += &format!(
            "sink {}\n  pending {} records; delivered {} records in {} batches; last delivery {}\n  \
             failures {}; last failure {}; dead letters {}\n",
            k.name,
            k.pending,
            k.delivered_records,
            k.delivered_batches,
            ago(now, k.last_delivery_ms),
            k.failures,
            ago(now, k.last_failure_ms),
            k.dead_letters
        );
        if !k.counters.is_empty() {
            let list: Vec<String> = k
                .counters
                .iter()
                .map(|(key, v)| format!("{key} {v}"))
                .collect();
            out += &format!("  {}\n", list.join("; "));
        }
        if let Some(e) = &k.last_error {
            out += &format!("  last error: {e}\n");
        }
    }
    out
}

fn outbox(config: &Config, action: OutboxAction, sink: Option<&str>, id: Option<i64>) -> ExitCode {
    let dir = &config.agent.state_dir;
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgemeter: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
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

#[cfg(test)]
mod tests;
