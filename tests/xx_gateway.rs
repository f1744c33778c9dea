//! The xx_gateway source the way an operator runs it: the real binary, a
//! config pointing at the gateway's `gateway.yaml`, a real PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use common::pg::PgServer;
use common::{Agent, TempDir, edgemeter};

const PERIOD_MS: i64 = 2000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

#[test]
fn the_agent_counts_a_gateway_and_writes_the_script_csv() {
    let pg = PgServer::start("xx-bin");
    let mut gw = pg.gateway_db(PERIOD_MS);
    // The reference's real round-1 filter row for every row.
    let filter: Vec<u8> = (0..99)
        .map(|i| {
            let hex = concat!(
                "010000000000000288000000000000000a",
                "00000000000000000000000000000000004000000000000000400000000000000000000800040000",
                "000000000000000000000000000000000000000000000000100000000000000410000080004000001000"
            );
            u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex")
        })
        .collect();
    let now_e = now_ms() / PERIOD_MS;
    for e in now_e - 8..now_e {
        for r in 0..(10 + e % 7) {
            gw.execute(
                "INSERT INTO client_bloom_filters (recipient_id, epoch, first_round, round_range, filter, uses)
                 VALUES ($1, $2, 1, 0, $3, 1)",
                &[&(r * 3 - 9), &e, &filter],
            )
            .expect("row");
        }
    }

    let dir = TempDir::new("xx-bin");
    dir.write(
        "gateway.yaml",
        &format!(
            "# gateway config\ndbName: \"cmix_gateway\"\ndbAddress: \"127.0.0.1:{}\"\ndbUsername: \"ro\"\ndbPassword: \"pw-ro\"\n",
            pg.port
        ),
    );
    dir.write("gateway-IDF.json", r#"{"id":"gw-node-1"}"#);
    let cfg = dir.write(
        "edgemeter.toml",
        &format!(
            r#"[agent]
id = "edge-1"
state_dir = "state"
flush_interval_secs = 0.1

{xx}
[[sink]]
type = "csv"
name = "points"
path = "points.csv"
kinds = ["point"]
"#,
            xx = common::XX_SOURCE
        ),
    );
    let c = cfg.to_str().expect("utf-8 path");
    let (code, out, err) = edgemeter(&["check", "-c", c]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sources: gateway"), "{out}");

    let mut agent = Agent::start_running(&cfg, "info");
    let deadline = Instant::now() + Duration::from_secs(30);
    let want_lines = 6 + 2; // six 1-epoch windows, two 3-epoch ones
    while Instant::now() < deadline {
        let lines = std::fs::read_to_string(dir.path("active-users.csv"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= want_lines {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    agent.stop();
    let log = agent.stderr();
    assert!(
        log.contains("reading the gateway database ro@127.0.0.1"),
        "{log}"
    );
    assert!(
        !log.contains("pw-ro"),
        "the password appeared in the log:\n{log}"
    );

    // Every CSV line equals the reference SQL, in the script's format.
    let csv = std::fs::read_to_string(dir.path("active-users.csv")).expect("csv");
    let mut lines = 0;
    for line in csv.split_terminator("\r\n") {
        let f: Vec<&str> = line.split(',').collect();
        let (e, w): (i64, i64) = (f[0].parse().expect("epoch"), f[1].parse().expect("window"));
        let want: i64 = gw
            .query_one(
                "SELECT COUNT(DISTINCT recipient_id) FROM client_bloom_filters WHERE epoch BETWEEN $1 AND $2",
                &[&(e - w + 1), &e],
            )
            .expect("reference")
            .get(0);
        assert_eq!(f[3], want.to_string(), "line {line:?}");
        assert!(f[2].ends_with("+00:00"), "{line:?}");
        lines += 1;
    }
    assert!(lines >= want_lines, "{csv}");
    // The points reached the sink, labelled with the gateway's node id.
    let points = std::fs::read_to_string(dir.path("points.csv")).expect("points");
    assert!(
        points.contains("active_users,epochs=1;gateway=gw-node-1;window=2s"),
        "{points}"
    );

    let (code, out, err) = edgemeter(&["verify", "-c", c, "--rows", "50"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        "source `gateway`: 50 rows checked: 0 malformed, 0 do not claim their rounds\n"
    );
}
