//! The CloudWatch sinks against a peer that throttles, fails, refuses and
//! says our clock is off: the retry, dead-letter and skew paths, through the
//! real binary.

mod common;

use std::time::Duration;

use common::http::{Answer, Peer, http_date};
use common::{Agent, TempDir, edgemeter, wait_until};

const OK: &str = "<PutMetricDataResponse><ResponseMetadata><RequestId>1</RequestId></ResponseMetadata></PutMetricDataResponse>";
const SECRET: &str = "wJalrXUtnFEMI-TEST-SECRET-NEVER-LOGGED";

fn error(code: &str, message: &str) -> String {
    format!(
        "<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>1</RequestId></ErrorResponse>"
    )
}

fn setup(tag: &str, port: u16) -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new(tag);
    dir.write("aws-secret", SECRET);
    let cfg = dir.write(
        "edgemeter.toml",
        &format!(
            r#"[agent]
id = "edge-cw"
state_dir = "state"
flush_interval_secs = 0.05

[[source]]
type = "synthetic"
rate_per_sec = 100
limit = 5

[[sink]]
type = "cloudwatch_metrics"
name = "cw"
region = "us-west-1"
namespace = "Edge/Test"
endpoint = "http://127.0.0.1:{port}"
access_key_id = "AKIDTEST"
secret_access_key_file = "aws-secret"
retry_initial_secs = 0.05
retry_max_secs = 0.2
"#
        ),
    );
    (dir, cfg)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

#[test]
fn throttling_and_5xx_are_retried_until_delivered() {
    let peer = Peer::start(
        vec![
            Answer::error(400, &error("Throttling", "Rate exceeded")),
            Answer::error(500, &error("InternalFailure", "oops")),
        ],
        Answer::ok(OK),
    );
    let (dir, cfg) = setup("cw-retry", peer.port);
    let mut agent = Agent::start_running(&cfg, "info");
    let c = cfg.to_str().expect("utf-8");
    let delivered = wait_until(Duration::from_secs(15), || {
        let (_, out, _) = edgemeter(&["status", "-c", c]);
        out.contains("delivered 5 records")
    });
    agent.stop();
    let (_, status, _) = edgemeter(&["status", "-c", c]);
    assert!(delivered, "{status}\n{}", agent.stderr());
    assert!(
        status.contains("retried 1") && status.contains("throttled 1"),
        "{status}"
    );
    assert!(status.contains("requests 1"), "{status}");
    // Each attempt was a gzip body, signed, and the same batch.
    let reqs = peer.requests.lock().expect("requests").clone();
    assert!(reqs.len() >= 3);
    for r in &reqs {
        assert_eq!(r.header("content-encoding"), Some("gzip"));
        let auth = r.header("authorization").expect("signed");
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDTEST/")
                && auth.contains("/us-west-1/monitoring/aws4_request")
        );
        assert!(!auth.contains(SECRET));
    }
    assert_eq!(reqs[0].body, reqs[2].body, "a retry resends the same batch");
    let log = agent.stderr();
    assert!(log.contains("HTTP 400 Throttling: Rate exceeded"), "{log}");
    assert!(!log.contains(SECRET), "the secret reached the log");
    drop(dir);
}

#[test]
fn a_refusal_becomes_a_dead_letter_with_aws_code_and_message() {
    let peer = Peer::start(
        vec![Answer::error(
            400,
            &error(
                "InvalidParameterValue",
                "The parameter Namespace must not start with AWS/",
            ),
        )],
        Answer::ok(OK),
    );
    let (_dir, cfg) = setup("cw-400", peer.port);
    let c = cfg.to_str().expect("utf-8");
    let mut agent = Agent::start_running(&cfg, "info");
    let listed = wait_until(Duration::from_secs(15), || {
        edgemeter(&["outbox", "list", "-c", c])
            .1
            .contains("InvalidParameterValue")
    });
    agent.stop();
    let (_, out, _) = edgemeter(&["outbox", "list", "-c", c]);
    assert!(listed, "{out}\n{}", agent.stderr());
    assert!(
        out.contains("\tcw\t1\t5\t")
            && out.contains(
                "HTTP 400 InvalidParameterValue: The parameter Namespace must not start with AWS/"
            ),
        "{out}"
    );
    assert_eq!(peer.count(), 1, "a refusal is not retried by itself");
    // The operator fixes the cause and retries: delivered, with the same
    // body. (Without the source this time: a synthetic `limit` counts per
    // run, and new points would add a request of their own.)
    let text = std::fs::read_to_string(&cfg).expect("config");
    let start = text.find("[[source]]").expect("source table");
    let end = text.find("[[sink]]").expect("sink table");
    std::fs::write(&cfg, format!("{}{}", &text[..start], &text[end..])).expect("rewrite config");
    let (code, _, _) = edgemeter(&["outbox", "retry", "-c", c, "--all"]);
    assert_eq!(code, 0);
    let mut agent = Agent::start_running(&cfg, "info");
    let gone = wait_until(Duration::from_secs(15), || {
        edgemeter(&["outbox", "list", "-c", c]).1 == "no dead letters\n"
    });
    agent.stop();
    assert!(gone);
    let reqs = peer.requests.lock().expect("requests").clone();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].body, reqs[1].body);
}

#[test]
fn a_skewed_clock_is_corrected_from_the_servers_date() {
    let server_ahead = now_secs() + 3600;
    let peer = Peer::start(
        vec![Answer {
            status: 400,
            body: error("RequestExpired", "Request has expired."),
            date: Some(http_date(server_ahead)),
        }],
        Answer::ok(OK),
    );
    let (_dir, cfg) = setup("cw-skew", peer.port);
    let mut agent = Agent::start_running(&cfg, "info");
    assert!(
        wait_until(Duration::from_secs(15), || peer.count() >= 2),
        "{}",
        agent.stderr()
    );
    agent.stop();
    let reqs = peer.requests.lock().expect("requests").clone();
    let date = |r: &common::http::Request| r.header("x-amz-date").expect("x-amz-date").to_owned();
    // 20261124T025051Z to seconds since 1970 (a real calendar: the hour
    // ahead may fall in the next day, month or year).
    let (first, second) = (date(&reqs[0]), date(&reqs[1]));
    let to_secs = |d: &str| {
        let n = |a: usize, b: usize| d[a..b].parse::<i64>().expect("digits");
        let (y, m, day) = (n(0, 4), n(4, 6), n(6, 8));
        let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + (153 * m + 2) / 5 + day - 1;
        let days = era * 146_097 + doe - 719_468;
        days * 86_400 + n(9, 11) * 3600 + n(11, 13) * 60 + n(13, 15)
    };
    assert_eq!(to_secs("19700101T000000Z"), 0);
    assert_eq!(
        to_secs("20261201T003000Z") - to_secs("20261130T233000Z"),
        3600
    );
    let shift = to_secs(&second) - to_secs(&first);
    assert!(
        (3540..=3660).contains(&shift),
        "signed {first} then {second}"
    );
    assert!(
        agent.stderr().contains("AWS says our clock is off"),
        "{}",
        agent.stderr()
    );
}

/// `EDGEMETER_LOG=trace` shows what the sinks do, never a credential: the
/// HTTP client's wire dumps (16 bytes a row, so a secret would be split
/// across lines) are not logged at any level.
#[test]
fn trace_logging_shows_no_token_signature_or_secret() {
    let peer = Peer::start(vec![], Answer::ok(OK));
    let (dir, cfg) = setup("cw-trace", peer.port);
    let token = "FwoGZXIvYXdzEXAMPLE-SESSION-TOKEN-0123456789abcdef";
    dir.write("aws-token", token);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "secret_access_key_file = \"aws-secret\"",
        "secret_access_key_file = \"aws-secret\"\nsession_token_file = \"aws-token\"",
    );
    std::fs::write(&cfg, text).unwrap();
    let mut agent = Agent::start_running(&cfg, "trace");
    let c = cfg.to_str().expect("utf-8");
    assert!(wait_until(Duration::from_secs(15), || {
        let (_, out, _) = edgemeter(&["status", "-c", c]);
        out.contains("delivered 5 records")
    }));
    agent.stop();
    let reqs = peer.requests.lock().expect("requests").clone();
    let auth = reqs[0].header("authorization").expect("signed").to_owned();
    let signature = auth.rsplit("Signature=").next().expect("a signature");
    assert_eq!(reqs[0].header("x-amz-security-token"), Some(token));
    let log = agent.stderr();
    assert!(log.contains("[TRACE]"), "trace logging is on: {log}");
    for secret in [token, signature, SECRET] {
        // Any 8 characters in a row: a wire dump shows 16 a line.
        let chars: Vec<char> = secret.chars().collect();
        for w in chars.windows(8) {
            let piece: String = w.iter().collect();
            assert!(
                !log.contains(&piece),
                "`{piece}` of a credential is in the trace log:\n{log}"
            );
        }
    }
}

/// Every request's signature verifies against the request as it arrived,
/// with the endpoint written the usual way and with its default port
/// spelled out (`http://127.0.0.1:80`): the client leaves a default port
/// out of `Host`, so the signer must too.
#[test]
fn signatures_verify_for_endpoints_with_and_without_a_default_port() {
    for explicit_port in [false, true] {
        let peer = if explicit_port {
            Peer::start_on(80, vec![], Answer::ok(OK))
        } else {
            Peer::start(vec![], Answer::ok(OK))
        };
        let (dir, cfg) = setup("cw-port", peer.port);
        let endpoint = if explicit_port {
            "http://127.0.0.1:80".to_owned()
        } else {
            format!("http://127.0.0.1:{}/", peer.port)
        };
        let text = std::fs::read_to_string(&cfg).unwrap().replace(
            &format!("endpoint = \"http://127.0.0.1:{}\"", peer.port),
            &format!("endpoint = \"{endpoint}\""),
        );
        std::fs::write(&cfg, text).unwrap();
        let mut agent = Agent::start_running(&cfg, "info");
        let c = cfg.to_str().expect("utf-8");
        assert!(
            wait_until(Duration::from_secs(15), || peer.count() >= 1),
            "{}",
            agent.stderr()
        );
        agent.stop();
        for r in peer.requests.lock().expect("requests").iter() {
            if let Err(e) = common::http::sigv4_valid(r, SECRET) {
                panic!("endpoint {endpoint}: {e}");
            }
            // The check can fail: the same request with the port in its
            // Host (what the signer would have had to match) does not verify.
            let mut other = r.clone();
            for (k, v) in &mut other.headers {
                if k.eq_ignore_ascii_case("host") {
                    *v = if explicit_port {
                        "127.0.0.1:80".to_owned()
                    } else {
                        "127.0.0.1".to_owned()
                    };
                }
            }
            let e = common::http::sigv4_valid(&other, SECRET).unwrap_err();
            assert!(e.starts_with("SignatureDoesNotMatch"), "{e}");
        }
        let (_, status, _) = edgemeter(&["status", "-c", c]);
        assert!(status.contains("delivered 5 records"), "{status}");
        drop(dir);
    }
}

/// The issue's rotation: the key is replaced at AWS while the agent runs
/// with the old one. Every request is refused (403 SignatureDoesNotMatch,
/// checked by a verifying peer); the sink backs off and says so in
/// `status`, nothing becomes a dead letter, and once the new key is written
/// to the file, delivery resumes by itself, without `outbox retry`.
#[test]
fn refused_credentials_pause_the_sink_until_a_rotated_key_arrives() {
    let secret = std::sync::Arc::new(std::sync::Mutex::new("the-new-key".to_owned()));
    let peer = Peer::start_verifying(secret.clone(), Answer::ok(OK));
    let (dir, cfg) = setup("cw-rotate", peer.port);
    let mut agent = Agent::start_running(&cfg, "info");
    let c = cfg.to_str().expect("utf-8");
    let status = || edgemeter(&["status", "-c", c]).1;
    assert!(
        wait_until(Duration::from_secs(15), || peer.count() >= 3),
        "retried with backoff: {} requests\n{}",
        peer.count(),
        agent.stderr()
    );
    let s = status();
    assert!(
        s.contains("last error: credentials refused since ") && s.contains("SignatureDoesNotMatch"),
        "{s}"
    );
    assert!(s.contains("dead letters 0"), "{s}");
    // The operator writes the new key into the file.
    dir.write("aws-secret", "the-new-key");
    assert!(
        wait_until(Duration::from_secs(15), || status()
            .contains("delivered 5 records")),
        "{}\n{}",
        status(),
        agent.stderr()
    );
    agent.stop();
    let s = status();
    assert!(s.contains("dead letters 0"), "{s}");
    let log = agent.stderr();
    assert_eq!(
        log.matches("credentials refused").count(),
        1,
        "said once, not per try:\n{log}"
    );
    assert!(log.contains("the credentials are accepted again"), "{log}");
    assert!(
        !log.contains("the-new-key") && !log.contains(SECRET),
        "{log}"
    );
}

/// What a receiver that refuses every other request did, and the switch
/// that stops it.
struct Flapping {
    /// The requests it refused.
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// While true, every other request is refused; then none.
    flapping: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A receiver that answers every other request with `refusal`, the others
/// OK, until its [`Flapping::flapping`] is set false.
fn every_other_refused(refusal: fn() -> Answer) -> (Peer, Flapping) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let (seen, refused, flapping) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(true)),
    );
    let (r, f) = (refused.clone(), flapping.clone());
    let peer = Peer::start_deciding(
        0,
        vec![],
        Answer::ok(OK),
        Arc::new(move |_: &common::http::Request| {
            let odd = seen.fetch_add(1, Ordering::SeqCst) % 2 == 0;
            (odd && f.load(Ordering::SeqCst)).then(|| {
                r.fetch_add(1, Ordering::SeqCst);
                refusal()
            })
        }),
    );
    (peer, Flapping { refused, flapping })
}

/// The synthetic source without its `limit`: points for as long as the
/// test runs.
fn without_limit(cfg: &std::path::Path) {
    let text = std::fs::read_to_string(cfg)
        .expect("config")
        .replace("limit = 5\n", "");
    std::fs::write(cfg, text).expect("rewrite config");
}

/// A receiver that refuses every other request (CloudWatch throttling at
/// its rate, a load balancer with one bad backend) is one spell in the
/// log, not two lines a request: said when it begins and, once the
/// requests work again, when it ended, with every failed try counted.
/// Before, 20 s of it wrote 774 lines.
#[test]
fn a_receiver_that_refuses_every_other_request_is_said_once_not_per_request() {
    use std::sync::atomic::Ordering;
    let (
        peer,
        Flapping {
            refused: throttled,
            flapping,
        },
    ) = every_other_refused(|| Answer::error(400, &error("Throttling", "Rate exceeded")));
    let (_dir, cfg) = setup("cw-flap", peer.port);
    without_limit(&cfg);
    let mut agent = Agent::start_running(&cfg, "info");
    assert!(
        wait_until(Duration::from_secs(20), || throttled.load(Ordering::SeqCst)
            >= 30),
        "{} requests\n{}",
        peer.count(),
        agent.stderr()
    );
    flapping.store(false, Ordering::SeqCst);
    let after = peer.count();
    assert!(
        wait_until(Duration::from_secs(20), || peer.count() >= after + 10),
        "{}",
        agent.stderr()
    );
    agent.stop();
    let log = agent.stderr();
    let failed = throttled.load(Ordering::SeqCst);
    assert_eq!(
        log.matches("could not deliver").count(),
        1,
        "said once for {failed} throttled requests:\n{log}"
    );
    assert_eq!(
        log.matches("delivering again").count(),
        1,
        "the end said once:\n{log}"
    );
    assert!(
        log.contains(&format!(
            "delivering again after {failed} failed attempts over "
        )),
        "every failed try counted ({failed}):\n{log}"
    );
    let (_, status, _) = edgemeter(&["status", "-c", cfg.to_str().expect("utf-8")]);
    assert!(status.contains(&format!("throttled {failed}")), "{status}");
}

/// Credentials refused by one receiver of two (a load balancer in front of
/// two backends, one not yet given the rotated key; or an expired session
/// token that one region already refuses): every other request is refused.
/// One spell in the log: said when it begins and, once no try was refused
/// for 10 s, when it ended, every refused try counted; not a pair of lines
/// each time a refused try follows one that worked.
#[test]
fn credentials_refused_by_every_other_request_are_said_once_not_per_flap() {
    use std::sync::atomic::Ordering;
    let (peer, Flapping { refused, flapping }) = every_other_refused(|| {
        Answer::error(
            403,
            &error(
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            ),
        )
    });
    let (_dir, cfg) = setup("cw-auth-flap", peer.port);
    without_limit(&cfg);
    let mut agent = Agent::start_running(&cfg, "info");
    assert!(
        wait_until(Duration::from_secs(30), || refused.load(Ordering::SeqCst)
            >= 6),
        "{} requests\n{}",
        peer.count(),
        agent.stderr()
    );
    flapping.store(false, Ordering::SeqCst);
    let failed = refused.load(Ordering::SeqCst);
    // The end is said once no try was refused for 10 s, though the agent
    // stays up (not only at its stop).
    assert!(
        wait_until(Duration::from_secs(25), || agent
            .stderr()
            .contains("the credentials are accepted again")),
        "{}",
        agent.stderr()
    );
    agent.stop();
    let log = agent.stderr();
    assert_eq!(
        log.matches("credentials refused").count(),
        1,
        "said once for {failed} refused requests:\n{log}"
    );
    assert_eq!(
        log.matches("accepted again").count(),
        1,
        "the end said once:\n{log}"
    );
    assert!(
        log.contains(&format!("accepted again, after {failed} refused tries")),
        "every refused try counted ({failed}):\n{log}"
    );
}
