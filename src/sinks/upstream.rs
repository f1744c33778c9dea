//! The `upstream` sink: batches to an upstream edgemeter (`edgemeter
//! upstream`), gzip JSON over HTTP or HTTPS with a bearer token.
//!
//! Each outbox batch is one POST to `<endpoint>/v1/batches` carrying the
//! idempotency key `(agent_id, outbox_id, seq)` (see `upstream/wire.rs`):
//! the upstream stores a key once and acknowledges it every time, so a
//! batch resent after a lost answer, a crash or a restart is never counted
//! twice. The upstream answers only after it committed the batch, so an
//! `Ok` here means the records are durable there.
//!
//! The token is read from `token_file` for every request, so a rotated
//! token is used at once; it never appears in a log line or an error. TLS is
//! rustls with ring; the roots are `ca_file` when given, else the system's
//! bundle (`/etc/ssl/certs/ca-certificates.crt`), else Mozilla's.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeTable;

use crate::http_client::gzip;
use crate::outbox::Batch;
use crate::problems::{Problems, deserialize, resolve, secs};
use crate::record::{Kind, KindSet};
use crate::runtime::{LocalBoxFuture, Worker};
use crate::sinks::{Delivered, DeliveryError, Sink};
use crate::wire;

/// Where Debian and its derivatives keep the system's trusted roots.
/// The longest answer we read (the upstream's are a few hundred bytes).
const MAX_ANSWER_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `http://host:port` or `https://host:port`, without the path.
    pub endpoint: String,
    pub token_file: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub events: bool,
    pub timeout: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    endpoint: Spanned<String>,
    token_file: Spanned<String>,
    ca_file: Option<Spanned<String>>,
    events: Option<bool>,
    timeout_secs: Option<Spanned<f64>>,
}

impl Config {
    pub fn parse(base: &Path, table: Spanned<DeTable<'_>>, p: &mut Problems) -> Option<Config> {
        let raw: Raw = deserialize(table, p)?;
        let before = p.list().len();
        let endpoint = raw.endpoint.get_ref().trim_end_matches('/').to_owned();
        let rest = endpoint
            .strip_prefix("http://")
            .or_else(|| endpoint.strip_prefix("https://"));
        match rest {
            Some(host) if !host.is_empty() && !host.contains('/') && !host.contains('@') => {}
            _ => p.push(
                raw.endpoint.span(),
                format!(
                    "endpoint `{endpoint}` must be `http://host:port` or `https://host:port`, without a path or credentials"
                ),
            ),
        }
        if raw.token_file.get_ref().is_empty() {
            p.push(raw.token_file.span(), "token_file must not be empty");
        }
        let timeout = secs(
            raw.timeout_secs.as_ref(),
            "timeout_secs",
            30.0,
            1.0,
            600.0,
            p,
        );
        (p.list().len() == before).then(|| Config {
            endpoint,
            token_file: resolve(base, raw.token_file.get_ref()),
            ca_file: raw.ca_file.map(|c| resolve(base, c.get_ref())),
            events: raw.events.unwrap_or(false),
            timeout,
        })
    }
}

impl Config {
    /// Where batches are posted.
    pub fn url(&self) -> String {
        format!("{}{}", self.endpoint, wire::PATH)
    }
}

pub struct Upstream {
    config: Config,
    agent_id: String,
    url: String,
    /// Built on first use (reading `ca_file` is IO), then kept.
    agent: Option<Arc<ureq::Agent>>,
    worker: Worker,
    clock: crate::clock::PeerReading,
    /// ` through the … proxy …` when the environment names one.
    through: String,
}

impl Upstream {
    pub fn new(config: Config, agent_id: &str) -> Upstream {
        let url = config.url();
        Upstream {
            through: crate::http_client::through(&url),
            url,
            config,
            agent_id: agent_id.to_owned(),
            agent: None,
            worker: Worker::new("sink-upstream"),
            clock: crate::clock::PeerReading::default(),
        }
    }
}

/// What an upstream's answer means for the batch.
pub fn classify(status: u16, body: &[u8]) -> Result<(), DeliveryError> {
    // The upstream's error bodies are `{"error": "..."}`, written by us and
    // free of secrets; show at most 300 characters of anything else.
    let why = || {
        let text = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect());
        format!("HTTP {status}: {text}")
    };
    match status {
        200..=299 => Ok(()),
        // A token problem is fixed by an operator, not by dropping data:
        // keep the batch and retry.
        401 | 403 => Err(DeliveryError::Retry(format!(
            "the upstream refused our token ({}); check token_file and the upstream's tokens_dir",
            why()
        ))),
        408 | 429 | 503 => Err(DeliveryError::Throttled(why())),
        400..=499 => Err(DeliveryError::Reject(why())),
        _ => Err(DeliveryError::Retry(why())),
    }
}

impl Sink for Upstream {
    fn accepts(&self) -> KindSet {
        if self.config.events {
            KindSet::of(&[Kind::Point, Kind::Sketch, Kind::Event])
        } else {
            KindSet::of(&[Kind::Point, Kind::Sketch])
        }
    }

    fn peer_clock(&self) -> Option<&crate::clock::PeerReading> {
        Some(&self.clock)
    }

    fn deliver<'a>(
        &'a mut self,
        batch: &'a Batch,
        _progress: &'a crate::sinks::Progress,
    ) -> LocalBoxFuture<'a, Result<Delivered, DeliveryError>> {
        Box::pin(async move {
            let stream = format!("{}.{}", batch.outbox_id, batch.sink);
            let key = wire::Key {
                agent_id: &self.agent_id,
                outbox_id: &stream,
                seq: batch.seq,
            };
            let json = wire::encode(&key, batch.records.iter().map(|(_, r)| r));
            let body = gzip(json.as_bytes());
            let bytes = body.len() as i64;
            let (config, url, through, agent, clock) = (
                self.config.clone(),
                self.url.clone(),
                self.through.clone(),
                self.agent.clone(),
                self.clock.clone(),
            );
            let (agent, result) = self
                .worker
                .run(move || {
                    let agent = match agent {
                        Some(a) => a,
                        None => match crate::http_client::agent(
                            config.ca_file.as_deref(),
                            config.timeout,
                        ) {
                            Ok(a) => Arc::new(a),
                            Err(e) => return (None, Err(DeliveryError::Retry(e))),
                        },
                    };
                    let to = Target {
                        url: &url,
                        through: &through,
                        token_file: &config.token_file,
                    };
                    let result = post(&agent, &to, &body, &clock);
                    (Some(agent), result)
                })
                .await;
            self.agent = agent;
            result?;
            Ok(Delivered {
                rejected: Vec::new(),
                skipped: Vec::new(),
                requests: 1,
                bytes,
            })
        })
    }
}

/// Where a batch goes: the URL, the proxy in the way (` through the …`, or
/// nothing), and the token's file.
struct Target<'a> {
    url: &'a str,
    through: &'a str,
    token_file: &'a Path,
}

fn post(
    agent: &ureq::Agent,
    to: &Target,
    body: &[u8],
    clock: &crate::clock::PeerReading,
) -> Result<(), DeliveryError> {
    let (url, through) = (to.url, to.through);
    let token = crate::problems::read_token(to.token_file).map_err(DeliveryError::Retry)?;
    let sent = crate::clock::now_ms();
    let resp = agent
        .post(url)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header("authorization", format!("Bearer {token}"))
        // The upstream reads this agent's clock from it (RFC 9110 §6.6.1
        // lets a client with a clock send one).
        .header(
            "date",
            httpdate::fmt_http_date(std::time::SystemTime::now()),
        )
        .send(body);
    let mut resp = resp.map_err(|e| DeliveryError::Retry(format!("POST {url}{through}: {e}")))?;
    let date = resp.headers().get("date").and_then(|d| d.to_str().ok());
    clock.answer(date, sent, crate::clock::now_ms());
    let status = resp.status().as_u16();
    let answer = resp
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER_BYTES)
        .read_to_vec()
        .unwrap_or_default();
    classify(status, &answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_what_the_delivery_loop_does() {
        let check = |status: u16, body: &str, want: &str| {
            let got = match classify(status, body.as_bytes()) {
                Ok(()) => "ok".to_owned(),
                Err(DeliveryError::Retry(m)) => format!("retry {m}"),
                Err(DeliveryError::Throttled(m)) => format!("throttled {m}"),
                Err(DeliveryError::Reject(m)) => format!("reject {m}"),
                Err(DeliveryError::Unauthorized(m)) => format!("unauthorized {m}"),
            };
            assert!(got.starts_with(want), "{status}: {got}");
        };
        check(200, r#"{"stored":3}"#, "ok");
        check(
            400,
            r#"{"error":"the body is not valid gzip"}"#,
            "reject HTTP 400: the body is not valid gzip",
        );
        check(413, "", "reject HTTP 413");
        check(401, "", "retry the upstream refused our token");
        check(403, "", "retry the upstream refused our token");
        check(429, "", "throttled");
        check(
            503,
            r#"{"error":"store unavailable"}"#,
            "throttled HTTP 503: store unavailable",
        );
        check(500, "boom", "retry HTTP 500: boom");
    }

    #[test]
    fn a_token_is_its_file_trimmed() {
        let dir = std::env::temp_dir().join(format!("edgemeter-token-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("t");
        std::fs::write(&f, "  s3cret \n").expect("write");
        assert_eq!(crate::problems::read_token(&f).as_deref(), Ok("s3cret"));
        std::fs::write(&f, "\n").expect("write");
        let e = crate::problems::read_token(&f).expect_err("empty");
        assert!(e.contains("is empty"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
