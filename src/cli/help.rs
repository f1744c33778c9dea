//! The help texts, one per command: `edgemeter --help`, `edgemeter
//! <COMMAND> --help`, and the usage shown with a usage error.

pub const VERSION: &str = concat!("edgemeter ", env!("CARGO_PKG_VERSION"));

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

Options (every command but demo):
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
Stops cleanly on SIGTERM or SIGINT: commits buffered records and exits 0, at
most [agent] shutdown_grace_secs (5) plus 3 s later, usually within a second.
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
deliveries, failures, the last error and dead letters; then what each source
published (relay streams, an xx source's lag and errors). Safe while `run` runs.

  --json   the same as JSON, schema 1 (documented in the README; the same
           figures as an agent's /metrics with [agent] http_listen)

Usage: edgemeter status [-c FILE] [--json]
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
Usage: edgemeter relay (provision | rules) [-c FILE] [--source NAME]

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
Run the pipeline on this machine with no peers, in a temporary directory
(kept, so you can look at it): a synthetic source and a simulated practable
session host feed the outbox and a CSV sink; three edge agents post to the
demo's upstream. Prints the dashboard's address and a sign-in token, then,
at the end, what happened.

  --seconds N   how long to run (default 10); 0 runs until Ctrl-C
  --dir DIR     where (default: a new directory under the temp dir)

Usage: edgemeter demo [--seconds N] [--dir DIR]
";

/// The help of `command` (`""` for the program's).
pub fn of(command: &str) -> &'static str {
    match command {
        "run" => HELP_RUN,
        "check" => HELP_CHECK,
        "status" => HELP_STATUS,
        "outbox" => HELP_OUTBOX,
        "verify" => HELP_VERIFY,
        "relay" => HELP_RELAY,
        "upstream" => HELP_UPSTREAM,
        "report" => HELP_REPORT,
        "demo" => HELP_DEMO,
        _ => HELP,
    }
}
