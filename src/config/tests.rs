use std::path::Path;
use std::time::Duration;

use super::*;
use crate::sinks::SinkConfig;
use crate::sources::SourceConfig;

/// Parse `text`; expect exactly the problems `want` as `LINE:COL: message`.
#[track_caller]
fn check_bad(text: &str, want: &[&str]) {
    let err = parse(Path::new("/etc/edgemeter/e.toml"), text).expect_err("config must be rejected");
    let rendered = err.to_string();
    let got: Vec<&str> = rendered
        .lines()
        .map(|l| l.strip_prefix("/etc/edgemeter/e.toml:").unwrap_or(l))
        .collect();
    assert_eq!(got, want, "\nfull output:\n{rendered}");
    assert_eq!(err.problem_count(), want.len());
}

#[track_caller]
fn check_ok(text: &str) -> Config {
    match parse(Path::new("/etc/edgemeter/e.toml"), text) {
        Ok(c) => c,
        Err(e) => panic!("config must be accepted:\n{e}"),
    }
}

#[test]
fn empty_file_means_all_defaults() {
    let c = check_ok("");
    assert_eq!(c.agent.state_dir, Path::new("/var/lib/edgemeter"));
    assert_eq!(c.agent.buffer_max_bytes, 256 * 1024 * 1024);
    assert_eq!(c.agent.flush_interval, Duration::from_millis(100));
    assert_eq!(c.agent.deliver_interval, Duration::from_secs(1));
    assert_eq!(c.agent.log_level, LevelFilter::Info);
    assert!(!c.agent.id.is_empty());
    assert!(c.sources.is_empty() && c.sinks.is_empty());
}

#[test]
fn full_file_is_typed() {
    let c = check_ok(
        r#"
[agent]
id = "gw-01"
state_dir = "state"
log_level = "DEBUG"
buffer_max_bytes = 1048576
flush_interval_secs = 0.1

[[source]]
type = "synthetic"
name = "load"
rate_per_sec = 1000
series = 3
limit = 50

[[sink]]
type = "csv"
name = "local"
path = "/tmp/out.csv"
kinds = ["point"]
batch_max_records = 10
retry_initial_secs = 0.5
retry_max_secs = 2
"#,
    );
    assert_eq!(c.agent.id, "gw-01");
    // Relative paths are relative to the config file, not the working dir.
    assert_eq!(c.agent.state_dir, Path::new("/etc/edgemeter/state"));
    assert_eq!(c.agent.log_level, LevelFilter::Debug);
    assert_eq!(c.agent.buffer_max_bytes, 1_048_576);
    assert_eq!(c.agent.flush_interval, Duration::from_millis(100));
    // A config that sets only the flush keeps it as its delivery cadence.
    assert_eq!(c.agent.deliver_interval, Duration::from_millis(100));
    assert_eq!(c.sources.len(), 1);
    assert_eq!(c.sources[0].name, "load");
    let SourceConfig::Synthetic(s) = &c.sources[0].config else {
        panic!("a synthetic source")
    };
    assert_eq!((s.rate_per_sec, s.series, s.limit), (1000.0, 3, Some(50)));
    let sink = &c.sinks[0];
    assert_eq!(sink.name, "local");
    assert_eq!(
        sink.delivery,
        Delivery {
            batch_max_records: 10,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(2),
        }
    );
    let SinkConfig::Csv(csv) = &sink.config else {
        panic!("a csv sink")
    };
    assert_eq!(csv.path, Path::new("/tmp/out.csv"));
    assert_eq!(
        csv.kinds,
        crate::record::KindSet::of(&[crate::record::Kind::Point])
    );
}

#[test]
fn component_names_default_to_their_type() {
    let c =
        check_ok("[[source]]\ntype = \"synthetic\"\n[[sink]]\ntype = \"csv\"\npath = \"x.csv\"\n");
    assert_eq!(c.sources[0].name, "synthetic");
    assert_eq!(c.sinks[0].name, "csv");
}

#[test]
fn the_shipped_example_is_valid_and_documents_every_key() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/edgemeter.toml");
    let text = std::fs::read_to_string(&path).expect("packaging/edgemeter.toml exists");
    let c = parse(&path, &text).unwrap_or_else(|e| panic!("the example config is invalid:\n{e}"));
    assert_eq!(c.agent.state_dir, Path::new("/var/lib/edgemeter"));
    // Every key a user can set appears in the example, at least commented.
    let keys = [
        "id",
        "state_dir",
        "log_level",
        "buffer_max_bytes",
        "flush_interval_secs",
        "shutdown_grace_secs",
        "http_listen",
        "type",
        "name",
        "metric",
        "rate_per_sec",
        "series",
        "limit",
        "path",
        "kinds",
        "batch_max_records",
        "retry_initial_secs",
        "retry_max_secs",
        "gateway_config",
        "host",
        "port",
        "dbname",
        "user",
        "password_file",
        "connect_timeout_secs",
        "node_id_file",
        "windows",
        "backfill_epochs",
        "grace_secs",
        "poll_interval_secs",
        "csv_path",
        "fetch_rows",
        "id_overlap",
        "region",
        "endpoint",
        "timeout_secs",
        "access_key_id",
        "secret_access_key_file",
        "session_token_file",
        "profile",
        "credentials_file",
        "namespace",
        "dimensions",
        "log_group",
        "log_stream",
        "session_host",
        "streams",
        "reconnect_initial_secs",
        "reconnect_max_secs",
        "ping_interval_secs",
        "stall_after_secs",
        "max_frame_bytes",
        "window_secs",
        "events",
        "max_users",
        "files_dir",
        "dump_interval_secs",
        "raw_files",
        "raw_files_max_bytes",
        "provision",
        "token_file",
        "ca_file",
        "listen",
        "store",
        "store_password_file",
        "tokens_dir",
        "admin_token_file",
        "edge_dims",
        "max_connections",
        "max_header_bytes",
        "max_body_bytes",
        "max_batch_bytes",
        "max_buffered_bytes",
        "header_timeout_secs",
        "body_timeout_secs",
        "idle_timeout_secs",
        "forward_interval_secs",
        "settle_secs",
        "retention_days",
        "users",
        "users_window_secs",
        "tls_cert_file",
        "tls_key_file",
    ];
    for key in keys {
        let documented = text.lines().any(|l| {
            let l = l.trim_start_matches(['#', ' ']);
            l.starts_with(&format!("{key} =")) || l.starts_with(&format!("{key}="))
        });
        assert!(
            documented,
            "packaging/edgemeter.toml does not document `{key}`"
        );
    }
}

#[test]
fn syntax_errors_are_all_reported_with_lines() {
    check_bad(
        "[agent]\nid = \"a\"\nstate_dir = \n[[sink]]\ntype = csv\n",
        &[
            "3:13: string values must be quoted, expected literal string",
            "5:8: string values must be quoted, expected literal string",
        ],
    );
}

#[test]
fn unknown_keys_are_rejected_in_every_table_at_once() {
    check_bad(
        r#"
[agent]
id = "a"
buffer_size = 3

[[source]]
type = "synthetic"
rate = 5

[[sink]]
type = "csv"
path = "x.csv"
colour = "red"

[agnet]
"#,
        &[
            "4:1: unknown field `buffer_size`, expected one of `id`, `state_dir`, `log_level`, `buffer_max_bytes`, `flush_interval_secs`, `deliver_interval_secs`, `shutdown_grace_secs`, `http_listen`, `health_interval_secs`",
            "8:1: unknown field `rate`, expected one of `metric`, `rate_per_sec`, `series`, `limit`, `users`, `users_window_secs`",
            "13:1: unknown field `colour`, expected `path` or `kinds`",
            "15:2: unknown top-level key `agnet`; expected `[agent]`, `[[source]]`, `[[sink]]` or `[upstream]`",
        ],
    );
}

#[test]
fn bad_values_are_all_reported() {
    check_bad(
        r#"[agent]
id = "gw 01"
log_level = "loud"
buffer_max_bytes = 10
flush_interval_secs = 0

[[source]]
type = "synthetic"
rate_per_sec = -1
series = 0

[[sink]]
type = "csv"
path = ""
kinds = ["event"]
batch_max_records = 0
retry_initial_secs = 10
retry_max_secs = 5
"#,
        &[
            "2:6: agent id `gw 01` must be 1 to 64 characters of letters, digits, `-`, `_` or `.`",
            "3:13: log_level `loud` is not one of off, error, warn, info, debug, trace",
            "4:20: buffer_max_bytes = 10 is out of range; use 65536 to 1099511627776",
            "5:23: flush_interval_secs = 0 is out of range; use 0.01 to 60 seconds",
            "9:16: rate_per_sec = -1 is out of range; use more than 0 and at most 1000000",
            "10:10: series = 0 is out of range; use 1 to 10000",
            "14:8: path must not be empty",
            "15:10: the csv sink takes kinds `point` and `sketch`, not `event`",
            "16:21: batch_max_records = 0 is out of range; use 1 to 100000",
            "18:18: retry_max_secs must not be smaller than retry_initial_secs",
        ],
    );
}

#[test]
fn wrong_types_name_the_key_line() {
    check_bad(
        "[agent]\nbuffer_max_bytes = \"lots\"\n[[sink]]\ntype = \"csv\"\npath = 3\n",
        &[
            "2:20: invalid type: string \"lots\", expected a whole number",
            "5:8: invalid type: integer `3`, expected a string",
        ],
    );
}

#[test]
fn missing_and_unknown_types_and_required_keys() {
    check_bad(
        r#"[[source]]
name = "x"

[[source]]
type = "kafka"

[[sink]]
type = "csv"
"#,
        &[
            "1:1: this [[source]] has no `type`; known types: synthetic, xx_gateway, relay",
            "5:8: unknown source type `kafka`; known types: synthetic, xx_gateway, relay",
            "7:1: missing field `path`",
        ],
    );
}

#[test]
fn duplicate_names_are_reported_at_the_second() {
    check_bad(
        "[[sink]]\ntype = \"csv\"\npath = \"a\"\n[[sink]]\ntype = \"csv\"\npath = \"b\"\n",
        &[
            "5:8: two sinks are named `csv`; give each a distinct `name` (it keys the outbox and `edgemeter status`)",
        ],
    );
}

#[test]
fn structure_mistakes() {
    check_bad(
        "agent = 5\nsource = 3\n[[sink]]\n",
        &[
            "1:1: `agent` must be a table: write `[agent]`",
            "2:1: `source` must be a list of tables: write `[[source]]`",
            "3:1: this [[sink]] has no `type`; known types: csv, cloudwatch_metrics, cloudwatch_logs, upstream",
        ],
    );
}

#[test]
fn line_col_counts_characters_not_bytes() {
    let check =
        |text: &str, offset, want| assert_eq!(line_col(text, offset), want, "{text:?} @ {offset}");
    check("abc", 0, (1, 1));
    check("abc\ndef", 4, (2, 1));
    check("abc\ndef", 6, (2, 3));
    check("é = 1\nx", 3, (1, 3));
    check("abc", 99, (1, 4));
}

#[test]
fn unreadable_and_oversized_files_say_so() {
    let err = load(Path::new("/nonexistent/edgemeter.toml")).expect_err("missing file");
    assert!(
        err.to_string()
            .starts_with("/nonexistent/edgemeter.toml: cannot read the config file:"),
        "{err}"
    );
    let dir = std::env::temp_dir().join(format!("edgemeter-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let big = dir.join("big.toml");
    std::fs::write(&big, vec![b'#'; 2 * 1024 * 1024]).expect("write big file");
    let err = load(&big).expect_err("oversized file");
    assert!(err.to_string().contains("the limit is 1048576"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn xx_gateway_settings_are_checked() {
    check_bad(
        r#"[[source]]
type = "xx_gateway"
name = "a"
gateway_config = "/nonexistent/gateway.yaml"

[[source]]
type = "xx_gateway"
name = "b"
gateway_config = "/etc/hostname"
host = "127.0.0.1"

[[source]]
type = "xx_gateway"
name = "c"
windows = [1, 12, 1]

[[source]]
type = "xx_gateway"
name = "d"
host = "h"
dbname = "d"
user = "u"
windows = []
grace_secs = -1
"#,
        &[
            "4:18: gateway_config `/nonexistent/gateway.yaml` is not a readable file",
            "9:18: give either gateway_config or host/port/dbname/user/password_file, not both",
            "12:1: say where the gateway's database is: gateway_config = \"/opt/xxnetwork/config/gateway.yaml\", or host/dbname/user (or PGHOST/PGDATABASE/PGUSER in the service's environment)",
            "15:19: window 1 is listed twice",
            "23:11: windows must list at least one window (in epochs)",
            "24:14: grace_secs = -1 is out of range; use 0 to 86400 seconds",
        ],
    );
}

#[test]
fn relay_settings_are_checked() {
    check_bad(
        r#"[[source]]
type = "relay"
name = "a"
session_host = "https://relay.example"
streams = ["spin41..30", "pend/0", "spin0..99999", ""]

[[source]]
type = "relay"
name = "b"
streams = ["spin30..31", "spin31"]
reconnect_initial_secs = 5
reconnect_max_secs = 1
window_secs = 7
raw_files = true
max_frame_bytes = 10

[[source]]
type = "relay"
name = "c"
streams = []
provision = { dir = "/nonexistent/practable" }

[[source]]
type = "relay"
name = "d"
streams = ["spin30"]
answer_requests = true

[[source]]
type = "relay"
name = "e"
streams = ["spin30"]
answer_requests = true
comparison_dir = "/nonexistent/comparison_graphs"

[[source]]
type = "relay"
name = "f"
streams = ["spin30"]
comparison_dir = "/tmp"
raw_files_max_bytes = 10

[[source]]
type = "relay"
name = "g"
streams = ["spin30"]
files_dir = "analytics"
raw_files = true
raw_files_max_bytes = 1000
"#,
        &[
            "4:16: session_host `https://relay.example`: TLS is not supported; the session host serves plain http on its own machine (e.g. http://127.0.0.1:8888)",
            "5:12: stream range `spin41..30` runs backwards (41 > 30)",
            "5:26: stream `pend/0` must be letters, digits and `-` (at most 64), or a range like spin30..41",
            "5:36: stream range `spin0..99999` has 100000 names; at most 1000 are allowed",
            "5:52: stream `` must be letters, digits and `-` (at most 64), or a range like spin30..41",
            "10:11: stream `spin31` is listed twice",
            "12:22: reconnect_max_secs must be at least reconnect_initial_secs",
            "13:15: window_secs = 7 must divide a day (60, 300, 900, 3600, ...)",
            "14:13: raw_files = true needs files_dir",
            "15:19: max_frame_bytes = 10 is out of range; use 1024 to 16777216",
            "20:11: streams must name at least one stream",
            "21:21: provision.dir `/nonexistent/practable` is not a directory (it should hold log.access.<stream> and log.token.<stream>)",
            "27:19: answer_requests = true needs comparison_dir (the old client's COMP_PATH, e.g. /opt/analytics/comparison_graphs)",
            "34:18: comparison_dir `/nonexistent/comparison_graphs` is not a directory (it should hold the comparison graphs, <exp>-<course>-<task>.csv)",
            "40:18: comparison_dir is used only with answer_requests = true",
            "41:23: raw_files_max_bytes is used only with raw_files = true",
            "49:23: raw_files_max_bytes = 1000 is out of range; use 65536 to 17592186044416",
        ],
    );
    let c = check_ok(
        r#"[[source]]
type = "relay"
name = "lab"
streams = ["spin08..11", "pend00..01", "extra-1"]
files_dir = "analytics"
"#,
    );
    let SourceConfig::Relay(r) = &c.sources[0].config else {
        panic!("a relay source")
    };
    assert_eq!(
        r.streams,
        [
            "spin08", "spin09", "spin10", "spin11", "pend00", "pend01", "extra-1"
        ]
    );
    assert_eq!((r.host.as_str(), r.port), ("127.0.0.1", 8888));
    assert_eq!(
        r.files_dir.as_deref(),
        Some(Path::new("/etc/edgemeter/analytics"))
    );
    assert_eq!(r.window, Duration::from_secs(300));
    assert!(r.events && !r.raw_files && r.provision.is_none());
    assert_eq!(r.raw_files_max_bytes, 1 << 30, "1 GiB unless set");
}

#[test]
fn cloudwatch_settings_are_checked() {
    check_bad(
        r#"[[sink]]
type = "cloudwatch_metrics"
name = "a"
region = "US West"
namespace = "AWS/EC2"
endpoint = "ftp://x"
access_key_id = "AKIA"

[[sink]]
type = "cloudwatch_logs"
name = "b"
region = "us-west-1"
log_group = "bad group!"
log_stream = "{node}-x"
profile = "p"
secret_access_key_file = "s"
"#,
        &[
            "1:1: access_key_id and secret_access_key_file go together",
            "4:10: region `US West` is not an AWS region name like `us-west-1`",
            "5:13: namespace `AWS/EC2` must be 1 to 255 characters and not start with `AWS/` or `:`",
            "6:12: endpoint must be an http:// or https:// URL",
            "13:13: log_group `bad group!` must be 1 to 512 of letters, digits, `_-/.#`",
            "14:14: log_stream may use {node_id}, {name} and {agent_id}, and no other `{`, `}`, `:` or `*`",
            "15:11: give either profile or access_key_id/secret_access_key_file, not both",
        ],
    );
    let c = check_ok(
        "[[sink]]\ntype = \"cloudwatch_logs\"\nregion = \"eu-central-1\"\nlog_group = \"g\"\nprofile = \"edge\"\n",
    );
    let SinkConfig::CloudWatchLogs(l) = &c.sinks[0].config else {
        panic!("a logs sink")
    };
    assert_eq!(l.log_stream, "{node_id}-{name}");
    assert_eq!(
        l.aws.url("logs"),
        "https://logs.eu-central-1.amazonaws.com/"
    );
}

/// Issue 13: one budget for request bodies across connections; a budget
/// smaller than one allowed body would answer 503 to that body forever.
#[test]
fn the_body_budget_must_hold_one_body() {
    let c = check_ok("[upstream]\ntokens_dir = \"t\"\nmax_buffered_bytes = 33554432\n");
    assert_eq!(
        c.upstream.expect("upstream").limits.max_buffered_bytes,
        32 << 20
    );
    check_bad(
        "[upstream]\ntokens_dir = \"t\"\nmax_body_bytes = 2097152\nmax_buffered_bytes = 1048576\n",
        &[
            "4:22: max_buffered_bytes (1048576, the default is a quarter of the memory limit) is smaller than max_body_bytes (2097152): a body of the allowed size could never be taken",
        ],
    );
    // The default: 256 MiB, or a quarter of a smaller memory limit, never
    // under 16 MiB.
    use crate::upstream::config::default_buffered_bytes;
    assert_eq!(default_buffered_bytes(None), 256 << 20);
    assert_eq!(default_buffered_bytes(Some(1 << 30)), 256 << 20);
    assert_eq!(default_buffered_bytes(Some(256 << 20)), 64 << 20);
    assert_eq!(default_buffered_bytes(Some(8 << 20)), 16 << 20);
}

/// Retention is whole days, and must outlast the settle delay and a
/// forwarding round: a window deleted before then would never be forwarded.
#[test]
fn retention_is_days_and_outlasts_the_settle_delay() {
    let up = |extra: &str| {
        check_ok(&format!("[upstream]\ntokens_dir = \"t\"\n{extra}"))
            .upstream
            .expect("upstream")
            .retention_days
    };
    assert_eq!(up(""), None, "kept forever unless configured");
    assert_eq!(up("retention_days = 400\n"), Some(400));
    check_bad(
        "[upstream]\ntokens_dir = \"t\"\nretention_days = 0\n",
        &["3:18: retention_days = 0 is out of range; use 1 to 36500"],
    );
    assert_eq!(
        up("retention_days = 1\n"),
        Some(1),
        "with the default settle"
    );
    check_bad(
        "[upstream]\ntokens_dir = \"t\"\nsettle_secs = 86400\nretention_days = 1\n",
        &[
            "4:18: retention_days (1) must be longer than settle_secs + forward_interval_secs + an hour (90060 s): windows would be deleted before their aggregates are forwarded",
        ],
    );
    assert_eq!(up("settle_secs = 86400\nretention_days = 2\n"), Some(2));
}

#[test]
fn http_listen_is_loopback_unless_an_address_is_given() {
    let at = |text: &str| {
        check_ok(&format!("[agent]\nhttp_listen = \"{text}\"\n"))
            .agent
            .http_listen
    };
    assert_eq!(check_ok("").agent.http_listen, None);
    assert_eq!(at("9464"), Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(at("0.0.0.0:9100"), Some("0.0.0.0:9100".parse().unwrap()));
    assert_eq!(at("[::1]:9464"), Some("[::1]:9464".parse().unwrap()));
    check_bad(
        "[agent]\nhttp_listen = \"localhost:9464\"\n",
        &[
            "2:15: http_listen `localhost:9464` must be a port (served on 127.0.0.1) or an address and port such as `127.0.0.1:9464` or `[::1]:9464`",
        ],
    );
}

#[test]
fn agents_that_forward_upstream_send_their_health_unless_told() {
    let upstream = "[[sink]]\ntype = \"upstream\"\nname = \"up\"\nendpoint = \"http://127.0.0.1:8650\"\ntoken_file = \"/etc/edgemeter/up.token\"\n";
    let csv = "[[sink]]\ntype = \"csv\"\nname = \"c\"\npath = \"out.csv\"\n";
    for (agent, sinks, want) in [
        ("", upstream, Some(60)),
        ("", csv, None),
        ("health_interval_secs = 0\n", upstream, None),
        ("health_interval_secs = 5\n", csv, Some(5)),
    ] {
        let c = check_ok(&format!("[agent]\n{agent}\n{sinks}"));
        assert_eq!(
            c.agent.health_interval,
            want.map(Duration::from_secs),
            "{agent} {sinks}"
        );
    }
    check_bad(
        "[agent]\nhealth_interval_secs = 0.5\n",
        &["2:24: health_interval_secs = 0.5 is out of range; use 1 to 3600 seconds"],
    );
}
