//! The upstream's dashboard, from outside: the real binary as aggregator,
//! real agents posting real batches, the pages loaded in a real headless
//! Chromium (tests/common/browser.rs), signed in through the form.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::browser::Browser;
use common::pg::free_port;
use common::{Agent, TempDir, wait_until};

const ADMIN: &str = "dash-admin-token-0123456789abcdef";
/// (agent, the user ids it sees); they overlap, so the union is less than the sum.
const EDGES: [(&str, &str); 3] = [("e1", "0..30"), ("e2", "20..50"), ("e3", "40..70")];

fn token_of(agent: &str) -> String {
    format!("token-of-{agent}-0123456789")
}

fn http(port: u16, request: &str) -> (u16, String, String) {
    common::http_exchange(([127, 0, 0, 1], port).into(), request)
}

fn get(port: u16, path: &str, auth: &str) -> (u16, String, String) {
    http(
        port,
        &format!("GET {path} HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n"),
    )
}

fn post_form(port: u16, path: &str, form: &str) -> (u16, String, String) {
    http(
        port,
        &format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{form}",
            form.len()
        ),
    )
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Rows of a CSV body (without its header), by the `agent` column.
fn csv_rows(body: &str) -> BTreeMap<String, usize> {
    let mut lines = body.lines();
    let head: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let col = head
        .iter()
        .position(|c| *c == "agent")
        .expect("an agent column");
    let mut out = BTreeMap::new();
    for l in lines.filter(|l| !l.is_empty()) {
        *out.entry(l.split(',').nth(col).unwrap_or("").to_owned())
            .or_default() += 1;
    }
    out
}

/// A real upstream on `port` with the query token [`ADMIN`] and a token
/// for each of `agents` (as `agents/<id>.token`, and `<id>.token` beside
/// the config for the agent's sink).
fn start_upstream(dir: &TempDir, port: u16, agents: &[&str]) -> Agent {
    let tokens = dir.path("agents");
    std::fs::create_dir_all(&tokens).unwrap();
    for a in agents {
        std::fs::write(tokens.join(format!("{a}.token")), token_of(a)).unwrap();
        dir.write(&format!("{a}.token"), &token_of(a));
    }
    dir.write("admin.token", ADMIN);
    let up = dir.write(
        "upstream.toml",
        &format!(
            "[agent]\nid = \"hub\"\nstate_dir = \"hub-state\"\n\n[upstream]\nlisten = \"127.0.0.1:{port}\"\n\
             tokens_dir = \"agents\"\nadmin_token_file = \"admin.token\"\n"
        ),
    );
    Agent::start_upstream(&up, "info", &[])
}

struct Site {
    _dir: TempDir,
    upstream: Agent,
    port: u16,
}

/// An upstream with four agent tokens (e9 never posts) and three agents
/// that post overlapping users every second until enough windows arrived;
/// then the agents stop, so what the pages show holds still.
fn site() -> Site {
    let dir = TempDir::new("dashboard");
    let port = free_port();
    let upstream = start_upstream(&dir, port, &["e1", "e2", "e3", "e9"]);
    let mut agents = Vec::new();
    for (id, users) in EDGES {
        let cfg = dir.write(
            &format!("{id}.toml"),
            &format!(
                r#"[agent]
id = "{id}"
state_dir = "{id}-state"
flush_interval_secs = 0.05
deliver_interval_secs = 0.2
health_interval_secs = 1

[[source]]
type = "synthetic"
name = "load"
metric = "demo"
rate_per_sec = 2
series = 1
users = "{users}"
users_window_secs = 1

[[sink]]
type = "upstream"
endpoint = "http://127.0.0.1:{port}"
token_file = "{id}.token"
retry_initial_secs = 0.05
retry_max_secs = 0.5
"#
            ),
        );
        agents.push(Agent::start_running(&cfg, "info"));
    }
    let bearer = format!("authorization: Bearer {ADMIN}\r\n");
    let windows = |agent: &str| {
        let (_, _, body) = get(
            port,
            &format!("/v1/series?metric=demo_active_users&agent={agent}&format=csv"),
            &bearer,
        );
        body.lines().count().saturating_sub(1)
    };
    let health = |agent: &str| {
        let (_, _, body) = get(
            port,
            &format!("/v1/series?metric=agent_sink_failures&agent={agent}&format=csv"),
            &bearer,
        );
        body.lines().count().saturating_sub(1)
    };
    assert!(
        wait_until(Duration::from_secs(40), || EDGES
            .iter()
            .all(|(a, _)| windows(a) >= 6 && health(a) >= 2)),
        "the agents' windows did not arrive:\n{}",
        upstream.stderr()
    );
    for mut a in agents {
        a.stop();
    }
    Site {
        _dir: dir,
        upstream,
        port,
    }
}

#[test]
fn sign_in_is_required_and_the_cookie_is_right() {
    let s = site();
    let port = s.port;

    // No session: to the form, which comes back here; the API refuses too.
    let (code, head, _) = get(port, "/edges?x=1", "");
    assert_eq!(code, 303, "{head}");
    assert_eq!(
        header(&head, "location"),
        Some("/sign-in?next=%2Fedges%3Fx%3D1")
    );
    let (code, head, body) = get(port, "/sign-in?next=%2Fedges%3Fx%3D1", "");
    assert_eq!(code, 200);
    assert!(body.contains(r#"name="next" value="/edges?x=1""#), "{body}");
    assert!(
        header(&head, "content-security-policy").is_some_and(|c| c.contains("default-src 'none'"))
    );
    assert_eq!(get(port, "/v1/series?metric=demo_active_users", "").0, 401);

    // A wrong token: the form again, and no cookie.
    let (code, head, body) = post_form(port, "/sign-in", "token=nope&next=%2Fedges");
    assert_eq!(code, 401);
    assert!(body.contains("That is not the query token."), "{body}");
    assert!(header(&head, "set-cookie").is_none(), "{head}");

    // The right one: a cookie with every flag, and back where the form came from.
    let (code, head, _) = post_form(port, "/sign-in", &format!("token={ADMIN}&next=%2Fedges"));
    assert_eq!(code, 303, "{head}");
    assert_eq!(header(&head, "location"), Some("/edges"));
    let set = header(&head, "set-cookie").expect("a cookie").to_owned();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set.contains(flag), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: not Secure ({set})");
    assert!(
        !set.contains(ADMIN) && !head.contains(ADMIN),
        "the token itself is never sent back"
    );
    let cookie = set.split(';').next().unwrap().to_owned();
    let with = format!("cookie: {cookie}\r\n");

    // The cookie opens the pages and the query API's GETs.
    let (code, _, body) = get(port, "/edges", &with);
    assert_eq!(code, 200);
    for a in ["e1", "e2", "e3"] {
        assert!(
            body.contains(&format!("<td>{a}</td><td>current</td>")),
            "{a}:\n{body}"
        );
    }
    assert!(body.contains("<td>e9</td><td>never posted</td>"), "{body}");
    assert_eq!(
        get(
            port,
            "/v1/series?metric=demo_active_users&format=csv",
            &with
        )
        .0,
        200
    );
    // A forged or altered cookie is nothing.
    let forged = format!("cookie: {}0\r\n", cookie);
    assert_eq!(get(port, "/edges", &forged).0, 303);
    assert_eq!(
        get(
            port,
            "/edges",
            "cookie: edgemeter_session=v1.99999999999999.00\r\n"
        )
        .0,
        303
    );
    // Only local places after sign-in.
    let (_, head, _) = post_form(
        port,
        "/sign-in",
        &format!("token={ADMIN}&next=%2F%2Fevil.example%2F"),
    );
    assert_eq!(header(&head, "location"), Some("/"));
    // Sign-out clears it.
    let (code, head, _) = post_form(port, "/sign-out", "");
    assert_eq!(code, 303);
    assert!(
        header(&head, "set-cookie").is_some_and(|c| c.contains("Max-Age=0")),
        "{head}"
    );

    // The log says who signed in and that one try failed, never the token.
    // The line is written before the answer, but the test's reader thread
    // may take it from the pipe after the answer came: wait for it.
    assert!(
        s.upstream.wait_for_line(
            "dashboard: signed in from 127.0.0.1",
            Duration::from_secs(5)
        ),
        "{}",
        s.upstream.stderr()
    );
    let log = s.upstream.stderr();
    assert!(
        log.contains("refused 1 request(s) with a missing or wrong token"),
        "{log}"
    );
    assert!(!log.contains(ADMIN), "the token is in the log:\n{log}");
}

#[test]
fn pages_render_in_chromium_and_plot_what_the_csv_holds() {
    let s = site();
    let port = s.port;
    let base = format!("http://127.0.0.1:{port}");
    let mut b = Browser::start();

    // The harness sees a page's errors (else "no problems" would mean nothing).
    let bad = b.open(
        "data:text/html,<script>console.error('planted')</script>",
        800,
        600,
    );
    assert!(
        bad.problems.iter().any(|p| p.contains("planted")),
        "{:?}",
        bad.problems
    );

    // Not signed in: the form, which leads back to the page asked for.
    let form = b.open(&format!("{base}/"), 1200, 900);
    assert_eq!(form.url, format!("{base}/sign-in?next=%2F"));
    assert!(form.dom.contains("Query token"), "{}", form.dom);
    assert!(form.problems.is_empty(), "{:?}", form.problems);
    b.screenshot("dashboard-sign-in");
    let page = b.submit("form[action='/sign-in']", &[("token", ADMIN)]);
    assert_eq!(
        page.url,
        format!("{base}/"),
        "back on the page asked for, no token in the URL"
    );
    assert!(
        page.problems.is_empty(),
        "the page logged: {:?}",
        page.problems
    );
    let cookies = b.cookies(&base);
    let c = cookies
        .iter()
        .find(|c| c["name"] == "edgemeter_session")
        .expect("the session cookie");
    assert_eq!(
        (
            c["httpOnly"].as_bool(),
            c["sameSite"].as_str(),
            c["secure"].as_bool()
        ),
        (Some(true), Some("Strict"), Some(false))
    );
    let left = c["expires"].as_f64().unwrap() - common::now_ms() as f64 / 1000.0;
    assert!((43_000.0..=43_300.0).contains(&left), "expires in {left} s");
    b.screenshot("dashboard-active-users");

    // Every plotted point is a row of the page's own CSV links.
    let plotted: BTreeMap<String, usize> = serde_json::from_value(b.eval(
        "Object.fromEntries([...document.querySelectorAll('polyline')].map(p => [p.dataset.series, p.points.numberOfItems]))",
    ))
    .unwrap();
    let links: Vec<String> = serde_json::from_value(b.eval(
        "[...document.querySelectorAll('a')].map(a => a.getAttribute('href')).filter(h => h.startsWith('/v1/series'))",
    ))
    .unwrap();
    assert_eq!(links.len(), 2, "{links:?}");
    let bearer = format!("authorization: Bearer {ADMIN}\r\n");
    let (code, _, network_csv) = get(port, &links[0], &bearer);
    assert_eq!(code, 200);
    let network = network_csv.lines().count() - 1;
    assert!(network >= 6, "{network_csv}");
    assert_eq!(plotted.get("network"), Some(&network), "{plotted:?}");
    let (_, _, edges_csv) = get(port, &links[1], &bearer);
    let per_edge = csv_rows(&edges_csv);
    for (a, _) in EDGES {
        assert_eq!(
            plotted.get(&format!("edge {a}")),
            per_edge.get(a),
            "{a}: {plotted:?} {per_edge:?}"
        );
    }
    // The naive sum is drawn at every window an edge reported, and the
    // union is below it where users overlap.
    let times = |csv: &str| {
        csv.lines()
            .skip(1)
            .map(|l| l.split(',').next().unwrap().to_owned())
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(plotted.get("sum of edges"), Some(&times(&edges_csv).len()));

    // Exact values: the table view has a row per network value.
    let table = b.eval("document.querySelector('a[href*=\"view=table\"]').getAttribute('href')");
    let t = b.open(&format!("{base}{}", table.as_str().unwrap()), 1200, 900);
    assert!(t.problems.is_empty(), "{:?}", t.problems);
    let rows = b.eval("document.querySelectorAll('table.values td:first-child').length");
    assert_eq!(rows.as_u64(), Some(network as u64));

    // Another range, by its link.
    let week =
        b.eval("document.querySelector('.ranges a[href*=\"range=7D\"]').getAttribute('href')");
    let w = b.open(&format!("{base}{}", week.as_str().unwrap()), 1200, 900);
    assert!(w.problems.is_empty(), "{:?}", w.problems);
    assert!(
        w.dom.contains(r#"class="here">7D"#),
        "the 7D link is marked"
    );

    // Edges, on a laptop; active users on a phone.
    let e = b.open(&format!("{base}/edges"), 1200, 700);
    assert!(e.problems.is_empty(), "{:?}", e.problems);
    assert!(e.dom.contains("e9") && e.dom.contains("never posted"));
    // Each edge's own health, as it sent it: buffered, oldest, dropped, to
    // deliver and failures are figures for the agents, "–" for e9.
    let cells: BTreeMap<String, Vec<String>> = serde_json::from_value(b.eval(
        "Object.fromEntries([...document.querySelectorAll('main table tr')].slice(1).map(tr => [tr.cells[0].textContent, [...tr.cells].slice(6).map(c => c.textContent)]))",
    ))
    .unwrap();
    for (agent, _) in EDGES {
        let c = &cells[agent];
        assert!(c.iter().all(|v| v != "–"), "{agent}: {c:?}");
        assert_eq!(c[2], "0", "{agent} dropped nothing: {c:?}");
        assert_eq!(c[5], "ok", "{agent}'s clock is this machine's: {c:?}");
    }
    assert!(cells["e9"].iter().all(|v| v == "–"), "{:?}", cells["e9"]);
    b.screenshot("dashboard-edges");
    let phone = b.open(&format!("{base}/"), 390, 844);
    assert!(phone.problems.is_empty(), "{:?}", phone.problems);
    b.screenshot("dashboard-active-users-phone");

    // Sign out: the form again, everywhere.
    let out = b.submit("form[action='/sign-out']", &[]);
    assert_eq!(out.url, format!("{base}/sign-in"));
    let again = b.open(&format!("{base}/edges"), 1200, 700);
    assert!(again.dom.contains("Query token"), "signed out");
}

#[test]
fn the_relay_page_draws_each_stream_from_a_real_relay_agent() {
    let dir = TempDir::new("dashboard-relay");
    let hub = common::relay::Hub::start();
    let port = free_port();
    let _upstream = start_upstream(&dir, port, &["lab"]);
    let cfg = dir.write(
        "lab.toml",
        &format!(
            r#"[agent]
id = "lab"
state_dir = "lab-state"
flush_interval_secs = 0.05
deliver_interval_secs = 0.2

[[source]]
type = "relay"
name = "practable"
session_host = "{}"
streams = ["rig-a", "rig-b"]
window_secs = 1

[[sink]]
type = "upstream"
endpoint = "http://127.0.0.1:{port}"
token_file = "lab.token"
retry_initial_secs = 0.05
retry_max_secs = 0.5
events = true
"#,
            hub.url()
        ),
    );
    let mut lab = Agent::start_running(&cfg, "info");
    assert!(wait_until(Duration::from_secs(15), || hub
        .subscribers("rig-a")
        == 1
        && hub.subscribers("rig-b") == 1));
    let bearer = format!("authorization: Bearer {ADMIN}\r\n");
    let csv = |metric: &str, stream: &str| {
        get(
            port,
            &format!("/v1/series?metric={metric}&dim.stream={stream}&format=csv"),
            &bearer,
        )
        .2
    };
    // Students on both rigs for a few windows; rig-b busier.
    for round in 0..6 {
        for (stream, n) in [("rig-a", 2), ("rig-b", 5)] {
            for i in 0..n {
                let m = serde_json::json!({"user": format!("s{i}"), "t": round, "exp": "spinner",
                    "hardware": stream, "course": "c1", "type": "log",
                    "payload": {"log": "start", "data": {}}});
                hub.send_text(stream, &m.to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    // Student s0's commands on rig-a: voltage_step twice, then position,
    // speed_ramp, position: four distinct transitions.
    for (i, log) in ["voltage", "voltage", "position", "speed_ramp", "position"]
        .iter()
        .enumerate()
    {
        let m = serde_json::json!({"user": "s0", "t": 1_700_000_000_000u64 + i as u64, "exp": "spinner",
            "hardware": "rig-a", "course": "c1", "type": "analytics",
            "payload": {"log": log, "data": {"set": 1}}});
        hub.send_text("rig-a", &m.to_string());
        std::thread::sleep(Duration::from_millis(20));
    }
    let analytics_events = || {
        let body = get(
            port,
            "/v1/events?user=s0&type=analytics&format=json",
            &bearer,
        )
        .2;
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["events"].as_array().map(Vec::len))
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(20), || analytics_events() == 5),
        "the commands did not reach the upstream: {}",
        analytics_events()
    );
    assert!(
        wait_until(Duration::from_secs(20), || csv("relay_messages", "rig-b")
            .lines()
            .count()
            > 3),
        "no relay points upstream"
    );
    lab.stop();

    let base = format!("http://127.0.0.1:{port}");
    let mut b = Browser::start();
    b.open(&format!("{base}/relay"), 1200, 900);
    let page = b.submit("form[action='/sign-in']", &[("token", ADMIN)]);
    assert_eq!(page.url, format!("{base}/relay"));
    assert!(
        page.problems.is_empty(),
        "the page logged: {:?}",
        page.problems
    );
    b.screenshot("dashboard-relay");
    // Two charts (messages, users), a line per stream in each; every vertex
    // is a row of the same series' CSV.
    let charts: Vec<Vec<(String, usize)>> = serde_json::from_value(b.eval(
        "[...document.querySelectorAll('svg.chart')].map(svg => [...svg.querySelectorAll('polyline')].map(p => [p.dataset.series, p.points.numberOfItems]))",
    ))
    .unwrap();
    assert_eq!(charts.len(), 2, "{charts:?}");
    let (messages, users) = (&charts[0], &charts[1]);
    for stream in ["rig-a", "rig-b"] {
        let rows = csv("relay_messages", stream).lines().count() - 1;
        assert!(
            messages.contains(&(stream.to_owned(), rows)),
            "{stream}: {rows} rows, plotted {messages:?}"
        );
        let rows = csv("relay_active_users", stream).lines().count() - 1;
        assert!(
            users.contains(&(stream.to_owned(), rows)),
            "{stream}: {rows} user rows, plotted {users:?}"
        );
    }
    let all = csv("relay_active_users", "all").lines().count() - 1;
    assert!(users.contains(&("all".to_owned(), all)), "{users:?}");
    // The busier rig is drawn first (its colour and legend lead).
    assert_eq!(messages[0].0, "rig-b", "{messages:?}");
    assert!(page.dom.contains("<td>rig-a</td>"), "{}", page.dom);
    // The heat map: every message of each user on each rig, in its cell.
    let cells: BTreeMap<String, String> = serde_json::from_value(b.eval(
        "Object.fromEntries([...document.querySelectorAll('table.heat td.n[title]')].map(td => [td.title, td.textContent]))",
    ))
    .unwrap();
    let mut want = BTreeMap::new();
    for (stream, n) in [("rig-a", 2), ("rig-b", 5)] {
        for i in 0..n {
            let extra = if (i, stream) == (0, "rig-a") { 5 } else { 0 };
            // Events keep the edge's whole dims: the source names the rig too.
            want.insert(
                format!("s{i} on practable/{stream}: {}", 6 + extra),
                (6 + extra).to_string(),
            );
        }
    }
    assert_eq!(cells, want.into_iter().collect::<BTreeMap<_, _>>());

    // The command graphs: s0 is listed, and their graph has one arrow or
    // loop per transition counted.
    let list = b.open(&format!("{base}/graphs"), 1200, 900);
    assert!(list.problems.is_empty(), "{:?}", list.problems);
    assert!(
        list.dom.contains("/graphs?user=s0&amp;range=30D"),
        "{}",
        list.dom
    );
    let graphs = b.open(&format!("{base}/graphs?user=s0&range=1D"), 1200, 1000);
    assert!(graphs.problems.is_empty(), "{:?}", graphs.problems);
    b.screenshot("dashboard-graphs");
    let edges: Vec<String> = serde_json::from_value(
        b.eval("[...document.querySelectorAll('svg.graph g.edge title')].map(t => t.textContent)"),
    )
    .unwrap();
    assert_eq!(
        edges,
        [
            "position_step → speed_ramp: 1",
            "speed_ramp → position_step: 1",
            "voltage_step → position_step: 1",
            "voltage_step → voltage_step: 1",
        ]
    );
}
