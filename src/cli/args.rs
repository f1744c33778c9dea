//! The command line, parsed: one [`Command`] variant per command, each with
//! only its own options, by one function per command, so an option another
//! command takes is refused with this command's usage instead of ignored.

use std::ffi::OsString;
use std::path::PathBuf;

use lexopt::prelude::*;

use super::help;
use crate::config;

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Run {
        config: PathBuf,
    },
    Check {
        config: PathBuf,
    },
    Status {
        config: PathBuf,
        json: bool,
    },
    Outbox {
        config: PathBuf,
        action: OutboxAction,
        which: Which,
    },
    Verify {
        config: PathBuf,
        rows: u32,
    },
    Relay {
        config: PathBuf,
        action: RelayAction,
        source: Option<String>,
    },
    Upstream {
        config: PathBuf,
    },
    Rollup {
        config: PathBuf,
        date: Option<String>,
        format: Option<String>,
    },
    Report {
        from: ReportFrom,
        route: &'static str,
        query: Vec<(String, String)>,
    },
    Demo {
        seconds: u64,
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayAction {
    Provision,
    Rules,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxAction {
    List,
    Retry,
    Purge,
}

/// Which dead letters an `outbox` action takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Which {
    All,
    Sink(String),
    Id(i64),
}

/// Where `report` reads: the local store of a config, or a running upstream.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportFrom {
    Config(PathBuf),
    Url { url: String, token_file: PathBuf },
}

/// What parsing ends in when it does not give a command: text for stdout
/// (help, version; exit 0) or a usage error for stderr (exit 2).
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    Print(String),
    Usage(String),
}

type Parsed<T> = Result<T, Stop>;

/// A usage error of `command`: what is wrong, then how the command is used.
fn usage(command: &str, msg: impl std::fmt::Display) -> Stop {
    let help = help::of(command);
    let usage = help
        .find("Usage:")
        .map_or(help, |i| &help[i..])
        .split("\n\n")
        .next()
        .unwrap_or("")
        .trim_end();
    let try_help = if command.is_empty() {
        "Try `edgemeter --help`.".to_owned()
    } else {
        format!("Try `edgemeter {command} --help`.")
    };
    Stop::Usage(format!("edgemeter: {msg}\n{usage}\n{try_help}"))
}

/// Parse the arguments (without the program name).
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Parsed<Command> {
    let mut p = lexopt::Parser::from_args(args);
    let first = p.next().map_err(|e| usage("", e))?;
    let name = match first {
        None => return Err(Stop::Usage(help::of("").to_owned())),
        Some(Short('h') | Long("help")) => return Err(Stop::Print(help::of("").to_owned())),
        Some(Short('V') | Long("version")) => return Err(Stop::Print(help::VERSION.to_owned())),
        Some(Value(v)) => v
            .into_string()
            .map_err(|v| usage("", format!("unknown command `{}`", v.to_string_lossy())))?,
        Some(other) => {
            return Err(usage(
                "",
                format!("{}; name a command first", other.unexpected()),
            ));
        }
    };
    let mut c = Cmd {
        name: name.clone(),
        p,
    };
    match name.as_str() {
        "run" => Ok(Command::Run {
            config: c.config_only()?,
        }),
        "check" => Ok(Command::Check {
            config: c.config_only()?,
        }),
        "status" => c.status(),
        "outbox" => c.outbox(),
        "verify" => c.verify(),
        "relay" => c.relay(),
        "upstream" => c.upstream(),
        "report" => c.report(),
        "demo" => c.demo(),
        other => Err(usage("", format!("unknown command `{other}`"))),
    }
}

/// One command's arguments after its name.
struct Cmd {
    name: String,
    p: lexopt::Parser,
}

impl Cmd {
    fn err(&self, msg: impl std::fmt::Display) -> Stop {
        usage(&self.name, msg)
    }

    /// The next argument, owned (lexopt's borrows the parser, which the
    /// option's value is then read from).
    fn next(&mut self) -> Parsed<Option<Opt>> {
        let arg = self.p.next().map_err(|e| usage(&self.name, e))?;
        Ok(arg.map(|a| match a {
            Short(c) => Opt::Short(c),
            Long(l) => Opt::Long(l.to_owned()),
            Value(v) => Opt::Value(v),
        }))
    }

    fn string(&mut self, what: &str) -> Parsed<String> {
        let v = self.p.value().map_err(|e| usage(&self.name, e))?;
        v.into_string()
            .map_err(|v| self.err(format!("{what} `{}` is not UTF-8", v.to_string_lossy())))
    }

    fn path(&mut self) -> Parsed<PathBuf> {
        Ok(self.p.value().map_err(|e| usage(&self.name, e))?.into())
    }

    fn number<T: std::str::FromStr>(
        &mut self,
        what: &str,
        ok: impl Fn(&T) -> bool,
        range: &str,
    ) -> Parsed<T> {
        let v = self.string(what)?;
        match v.parse::<T>() {
            Ok(n) if ok(&n) => Ok(n),
            _ => Err(self.err(format!("{what} takes {range}, not `{v}`"))),
        }
    }

    /// `-c`, `-h` and `-V`, which every command but `demo` takes; `Ok(false)`
    /// for anything else.
    fn common(&mut self, arg: &Opt, config: &mut PathBuf) -> Parsed<bool> {
        if arg.is('c', "config") {
            *config = self.path()?;
            return Ok(true);
        }
        self.help_or_version(arg)
    }

    fn help_or_version(&self, arg: &Opt) -> Parsed<bool> {
        if arg.is('h', "help") {
            return Err(Stop::Print(help::of(&self.name).to_owned()));
        }
        if arg.is('V', "version") {
            return Err(Stop::Print(help::VERSION.to_owned()));
        }
        Ok(false)
    }

    fn foreign(&self, arg: Opt) -> Stop {
        match arg {
            Opt::Value(v) => self.err(format!("unexpected argument `{}`", v.to_string_lossy())),
            other => self.err(format!(
                "`{}` does not take {}",
                self.name,
                describe(&other)
            )),
        }
    }

    fn config_only(&mut self) -> Parsed<PathBuf> {
        let mut config = PathBuf::from(config::DEFAULT_PATH);
        while let Some(arg) = self.next()? {
            if !self.common(&arg, &mut config)? {
                return Err(self.foreign(arg));
            }
        }
        Ok(config)
    }

    /// The action word that follows the command name.
    fn action(&mut self, choices: &str) -> Parsed<String> {
        match self.next()? {
            Some(Opt::Value(v)) => Ok(v.to_string_lossy().into_owned()),
            Some(arg) if self.help_or_version(&arg)? => unreachable!("help returns Err"),
            _ => Err(self.err(format!("`{}` needs an action: {choices}", self.name))),
        }
    }

    fn outbox(&mut self) -> Parsed<Command> {
        let action = match self.action("list, retry or purge")?.as_str() {
            "list" => OutboxAction::List,
            "retry" => OutboxAction::Retry,
            "purge" => OutboxAction::Purge,
            other => {
                return Err(self.err(format!(
                    "unknown outbox action `{other}`; use list, retry or purge"
                )));
            }
        };
        let mut config = PathBuf::from(config::DEFAULT_PATH);
        let mut which = Vec::new();
        while let Some(arg) = self.next()? {
            match arg.long() {
                Some("sink") => which.push(Which::Sink(self.string("--sink")?)),
                Some("all") if action != OutboxAction::List => which.push(Which::All),
                Some("id") if action != OutboxAction::List => which.push(Which::Id(self.number(
                    "--id",
                    |n: &i64| *n > 0,
                    "a dead letter's id",
                )?)),
                _ if self.common(&arg, &mut config)? => {}
                _ => return Err(self.foreign(arg)),
            }
        }
        let which = match (action, which.len()) {
            (_, 0) if action == OutboxAction::List => Which::All,
            (_, 0) => return Err(self.err("say which dead letters: --all, --sink NAME or --id N")),
            (_, 1) => which.remove(0),
            _ => return Err(self.err("give one of --all, --sink NAME or --id N")),
        };
        Ok(Command::Outbox {
            config,
            action,
            which,
        })
    }

    fn status(&mut self) -> Parsed<Command> {
        let mut config = PathBuf::from(config::DEFAULT_PATH);
        let mut json = false;
        while let Some(arg) = self.next()? {
            match arg.long() {
                Some("json") => json = true,
                _ if self.common(&arg, &mut config)? => {}
                _ => return Err(self.foreign(arg)),
            }
        }
        Ok(Command::Status { config, json })
    }

    fn verify(&mut self) -> Parsed<Command> {
        let mut config = PathBuf::from(config::DEFAULT_PATH);
        let mut rows = 1000;
        while let Some(arg) = self.next()? {
            match arg.long() {
                Some("rows") => {
                    rows = self.number(
                        "--rows",
                        |n: &u32| (1..=1_000_000).contains(n),
                        "1 to 1000000",
                    )?
                }
                _ if self.common(&arg, &mut config)? => {}
                _ => return Err(self.foreign(arg)),
            }
        }
        Ok(Command::Verify { config, rows })
    }

    fn relay(&mut self) -> Parsed<Command> {
        let action = match self.action("provision or rules")?.as_str() {
            "provision" => RelayAction::Provision,
            "rules" => RelayAction::Rules,
            other => {
                return Err(self.err(format!(
                    "unknown relay action `{other}`; use provision or rules"
                )));
            }
        };
        let mut config = PathBuf::from(config::DEFAULT_PATH);
        let mut source = None;
        while let Some(arg) = self.next()? {
            match arg.long() {
                Some("source") => source = Some(self.string("--source")?),
                _ if self.common(&arg, &mut config)? => {}
                _ => return Err(self.foreign(arg)),
            }
        }
        Ok(Command::Relay {
            config,
            action,
            source,
        })
    }

    fn upstream(&mut self) -> Parsed<Command> {
        let mut config = PathBuf::from(config::DEFAULT_PATH);
        let mut rollup = None;
        while let Some(arg) = self.next()? {
            if let (Opt::Value(v), None) = (&arg, &rollup) {
                if v != "rollup" {
                    return Err(self.err(format!(
                        "unknown upstream action `{}`; the only one is rollup",
                        v.to_string_lossy()
                    )));
                }
                rollup = Some((None, None));
                continue;
            }
            match (arg.long(), rollup.as_mut()) {
                (Some("date"), Some(r)) => r.0 = Some(self.string("--date")?),
                (Some("format"), Some(r)) => r.1 = Some(self.string("--format")?),
                _ if self.common(&arg, &mut config)? => {}
                _ => return Err(self.foreign(arg)),
            }
        }
        Ok(match rollup {
            None => Command::Upstream { config },
            Some((date, format)) => Command::Rollup {
                config,
                date,
                format,
            },
        })
    }

    fn report(&mut self) -> Parsed<Command> {
        let mut config = None;
        let (mut url, mut token_file) = (None, None);
        let mut route = "/v1/series";
        let mut query = Vec::new();
        while let Some(arg) = self.next()? {
            match arg.long() {
                Some(
                    key @ ("metric" | "range" | "start" | "end" | "format" | "agent" | "user"
                    | "type" | "limit"),
                ) => {
                    let v = self.string(&format!("--{key}"))?;
                    query.push((key.to_owned(), v));
                }
                Some("dim") => {
                    let v = self.string("--dim")?;
                    let (k, val) = v
                        .split_once('=')
                        .ok_or_else(|| self.err(format!("--dim takes KEY=VALUE, not `{v}`")))?;
                    query.push((format!("dim.{k}"), val.to_owned()));
                }
                Some("events") => route = "/v1/events",
                Some("rollups") => route = "/v1/rollups",
                Some("url") => url = Some(self.string("--url")?),
                Some("token-file") => token_file = Some(self.path()?),
                _ if arg.is('c', "config") => config = Some(self.path()?),
                _ if self.help_or_version(&arg)? => {}
                _ => return Err(self.foreign(arg)),
            }
        }
        let from = match (config, url, token_file) {
            (None, Some(url), Some(token_file)) => ReportFrom::Url { url, token_file },
            (_, Some(_), None) | (_, None, Some(_)) => {
                return Err(self.err("--url and --token-file go together"));
            }
            (Some(_), Some(_), Some(_)) => return Err(self.err("give -c FILE or --url, not both")),
            (config, None, None) => {
                ReportFrom::Config(config.unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH)))
            }
        };
        Ok(Command::Report { from, route, query })
    }

    fn demo(&mut self) -> Parsed<Command> {
        let (mut seconds, mut dir) = (10, None);
        while let Some(arg) = self.next()? {
            match arg.long() {
                Some("seconds") => {
                    seconds = self.number(
                        "--seconds",
                        |n: &u64| *n <= 3600,
                        "0 (until Ctrl-C) to 3600",
                    )?
                }
                Some("dir") => dir = Some(self.path()?),
                _ if self.help_or_version(&arg)? => {}
                _ => return Err(self.foreign(arg)),
            }
        }
        Ok(Command::Demo { seconds, dir })
    }
}

/// One argument, owned.
#[derive(Debug)]
enum Opt {
    Short(char),
    Long(String),
    Value(OsString),
}

impl Opt {
    fn long(&self) -> Option<&str> {
        match self {
            Opt::Long(l) => Some(l),
            _ => None,
        }
    }

    fn is(&self, short: char, long: &str) -> bool {
        matches!(self, Opt::Short(c) if *c == short) || self.long() == Some(long)
    }
}

fn describe(arg: &Opt) -> String {
    match arg {
        Opt::Short(c) => format!("-{c}"),
        Opt::Long(l) => format!("--{l}"),
        Opt::Value(v) => format!("`{}`", v.to_string_lossy()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Parsed<Command> {
        parse(args.iter().map(OsString::from))
    }

    /// `args` parse to `want`.
    fn ok(args: &[&str], want: Command) {
        assert_eq!(parse_strs(args), Ok(want), "{args:?}");
    }

    /// `args` are refused with a usage error that contains `why` and the
    /// command's own usage line.
    fn refused(args: &[&str], why: &str, usage_of: &str) {
        match parse_strs(args) {
            Err(Stop::Usage(text)) => {
                assert!(text.contains(why), "{args:?}: {text}");
                assert!(
                    text.contains(&format!("Usage: edgemeter {usage_of}"))
                        || text.contains(&format!("edgemeter {usage_of}")),
                    "{args:?} shows the usage of `{usage_of}`: {text}"
                );
            }
            other => panic!("{args:?}: expected a usage error, got {other:?}"),
        }
    }

    fn c(p: &str) -> PathBuf {
        PathBuf::from(p)
    }

    fn default() -> PathBuf {
        PathBuf::from(config::DEFAULT_PATH)
    }

    #[test]
    fn every_command_parses_with_its_own_options() {
        ok(&["run"], Command::Run { config: default() });
        ok(
            &["run", "-c", "a.toml"],
            Command::Run {
                config: c("a.toml"),
            },
        );
        ok(
            &["check", "--config", "a.toml"],
            Command::Check {
                config: c("a.toml"),
            },
        );
        ok(
            &["status", "-c", "a.toml"],
            Command::Status {
                config: c("a.toml"),
                json: false,
            },
        );
        ok(
            &["status", "--json", "-c", "a.toml"],
            Command::Status {
                config: c("a.toml"),
                json: true,
            },
        );
        ok(
            &["outbox", "list", "-c", "a.toml"],
            Command::Outbox {
                config: c("a.toml"),
                action: OutboxAction::List,
                which: Which::All,
            },
        );
        ok(
            &["outbox", "list", "--sink", "s"],
            Command::Outbox {
                config: default(),
                action: OutboxAction::List,
                which: Which::Sink("s".into()),
            },
        );
        ok(
            &["outbox", "retry", "--id", "3"],
            Command::Outbox {
                config: default(),
                action: OutboxAction::Retry,
                which: Which::Id(3),
            },
        );
        ok(
            &["outbox", "purge", "--all", "-c", "x"],
            Command::Outbox {
                config: c("x"),
                action: OutboxAction::Purge,
                which: Which::All,
            },
        );
        ok(
            &["verify", "--rows", "50"],
            Command::Verify {
                config: default(),
                rows: 50,
            },
        );
        ok(
            &["verify"],
            Command::Verify {
                config: default(),
                rows: 1000,
            },
        );
        ok(
            &["relay", "provision", "--source", "lab"],
            Command::Relay {
                config: default(),
                action: RelayAction::Provision,
                source: Some("lab".into()),
            },
        );
        ok(
            &["relay", "rules", "-c", "x"],
            Command::Relay {
                config: c("x"),
                action: RelayAction::Rules,
                source: None,
            },
        );
        ok(
            &["upstream", "-c", "u.toml"],
            Command::Upstream {
                config: c("u.toml"),
            },
        );
        ok(
            &[
                "upstream",
                "rollup",
                "-c",
                "u.toml",
                "--date",
                "2026-11-30",
                "--format",
                "json",
            ],
            Command::Rollup {
                config: c("u.toml"),
                date: Some("2026-11-30".into()),
                format: Some("json".into()),
            },
        );
        ok(
            &[
                "report",
                "--metric",
                "m",
                "--range",
                "7D",
                "--dim",
                "window=30m",
                "--events",
            ],
            Command::Report {
                from: ReportFrom::Config(default()),
                route: "/v1/events",
                query: vec![
                    ("metric".into(), "m".into()),
                    ("range".into(), "7D".into()),
                    ("dim.window".into(), "30m".into()),
                ],
            },
        );
        ok(
            &[
                "report",
                "--url",
                "http://u",
                "--token-file",
                "t",
                "--rollups",
            ],
            Command::Report {
                from: ReportFrom::Url {
                    url: "http://u".into(),
                    token_file: c("t"),
                },
                route: "/v1/rollups",
                query: vec![],
            },
        );
        ok(
            &["demo", "--seconds", "5", "--dir", "d"],
            Command::Demo {
                seconds: 5,
                dir: Some(c("d")),
            },
        );
        ok(
            &["demo"],
            Command::Demo {
                seconds: 10,
                dir: None,
            },
        );
    }

    /// Issue 14: `check -c x.toml --rows 5 --sink x --dim a=b --events --url
    /// http://x --date 2020-01-01` exited 0 with six options ignored, and
    /// `outbox list --id 3` listed everything.
    #[test]
    fn an_option_of_another_command_is_refused_with_this_ones_usage() {
        refused(
            &["check", "-c", "x.toml", "--rows", "5"],
            "`check` does not take --rows",
            "check",
        );
        refused(&["run", "--sink", "x"], "`run` does not take --sink", "run");
        refused(
            &["status", "--dim", "a=b"],
            "`status` does not take --dim",
            "status",
        );
        refused(
            &["outbox", "list", "--id", "3"],
            "`outbox` does not take --id",
            "outbox",
        );
        refused(
            &["outbox", "list", "--all"],
            "`outbox` does not take --all",
            "outbox",
        );
        refused(
            &["verify", "--source", "x"],
            "`verify` does not take --source",
            "verify",
        );
        refused(
            &["relay", "rules", "--rows", "3"],
            "`relay` does not take --rows",
            "relay",
        );
        refused(
            &["upstream", "--date", "2020-01-01"],
            "`upstream` does not take --date",
            "upstream",
        );
        refused(
            &["upstream", "rollup", "--events"],
            "`upstream` does not take --events",
            "upstream",
        );
        refused(
            &["report", "--sink", "x"],
            "`report` does not take --sink",
            "report",
        );
        refused(&["demo", "-c", "x.toml"], "`demo` does not take -c", "demo");
        refused(&["check", "extra"], "unexpected argument `extra`", "check");
    }

    #[test]
    fn missing_or_wrong_values_are_refused() {
        refused(&["frobnicate"], "unknown command `frobnicate`", "<COMMAND>");
        refused(&["outbox"], "needs an action", "outbox");
        refused(
            &["outbox", "drop"],
            "unknown outbox action `drop`",
            "outbox",
        );
        refused(&["outbox", "purge"], "say which dead letters", "outbox");
        refused(
            &["outbox", "purge", "--all", "--id", "2"],
            "give one of",
            "outbox",
        );
        refused(
            &["outbox", "retry", "--id", "x"],
            "--id takes a dead letter's id",
            "outbox",
        );
        refused(&["relay"], "needs an action", "relay");
        refused(&["relay", "dance"], "unknown relay action", "relay");
        refused(
            &["upstream", "dance"],
            "unknown upstream action",
            "upstream",
        );
        refused(
            &["verify", "--rows", "0"],
            "--rows takes 1 to 1000000",
            "verify",
        );
        refused(
            &["demo", "--seconds", "9999"],
            "--seconds takes 0 (until Ctrl-C) to 3600",
            "demo",
        );
        refused(&["report", "--url", "http://u"], "go together", "report");
        refused(&["report", "--dim", "novalue"], "KEY=VALUE", "report");
        refused(&["run", "-c"], "missing argument", "run");
    }

    #[test]
    fn help_and_version_print_and_exit_zero() {
        let print = |args: &[&str], want: &str| match parse_strs(args) {
            Err(Stop::Print(text)) => assert!(text.contains(want), "{args:?}: {text}"),
            other => panic!("{args:?}: {other:?}"),
        };
        print(&["--help"], "Usage: edgemeter <COMMAND>");
        print(&["-V"], "edgemeter ");
        for cmd in [
            "run", "check", "status", "verify", "upstream", "report", "demo",
        ] {
            print(&[cmd, "--help"], &format!("edgemeter {cmd}"));
        }
        print(&["outbox", "--help"], "edgemeter outbox list");
        print(&["relay", "-h"], "edgemeter relay provision");
        assert_eq!(parse_strs(&[]), Err(Stop::Usage(help::of("").to_owned())));
    }
}
