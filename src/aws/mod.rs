//! What the CloudWatch sinks share: the AWS settings in the config,
//! credentials, SigV4 signing, a clock corrected by the server's `Date` when
//! AWS says ours is off, one blocking HTTPS call, and the classification of
//! AWS's answers into retry, throttle, skew and refusal.

pub mod credentials;
mod sigv4;

pub use sigv4::sign;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeTable;

use crate::problems::{Problems, deserialize, resolve, secs};

/// The keys every AWS sink takes, split off its table by `config::split_off`.
pub const KEYS: &[&str] = &[
    "region",
    "endpoint",
    "access_key_id",
    "secret_access_key_file",
    "session_token_file",
    "profile",
    "credentials_file",
    "timeout_secs",
    "ca_file",
];

/// Largest error body read from AWS (they are small XML or JSON documents).
const MAX_RESPONSE_BYTES: u64 = 256 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub region: String,
    /// Override of the service endpoint (emulators, VPC endpoints).
    pub endpoint: Option<String>,
    pub credentials: credentials::Source,
    pub timeout: Duration,
    /// PEM roots to trust instead of the system's (a private CA in front of
    /// a VPC endpoint, an emulator with TLS).
    pub ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    region: Spanned<String>,
    endpoint: Option<Spanned<String>>,
    access_key_id: Option<Spanned<String>>,
    secret_access_key_file: Option<Spanned<String>>,
    session_token_file: Option<Spanned<String>>,
    profile: Option<Spanned<String>>,
    credentials_file: Option<Spanned<String>>,
    timeout_secs: Option<Spanned<f64>>,
    ca_file: Option<Spanned<String>>,
}

impl Settings {
    pub fn parse(base: &Path, table: Spanned<DeTable<'_>>, p: &mut Problems) -> Option<Settings> {
        let span = table.span();
        let raw: Raw = deserialize(table, p)?;
        let before = p.list().len();
        let r = raw.region.get_ref();
        if r.is_empty()
            || !r
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            p.push(
                raw.region.span(),
                format!("region `{r}` is not an AWS region name like `us-west-1`"),
            );
        }
        if let Some(e) = &raw.endpoint
            && let Err(why) = sigv4::check_endpoint(&endpoint_url(e.get_ref()))
        {
            p.push(e.span(), format!("endpoint {why}"));
        }
        let credentials = match (
            &raw.access_key_id,
            &raw.secret_access_key_file,
            &raw.profile,
        ) {
            (id, file, Some(profile)) if id.is_some() || file.is_some() => {
                p.push(
                    profile.span(),
                    "give either profile or access_key_id/secret_access_key_file, not both",
                );
                credentials::Source::Default
            }
            (Some(id), Some(file), None) => credentials::Source::Files {
                access_key_id: id.get_ref().clone(),
                secret_access_key_file: resolve(base, file.get_ref()),
                session_token_file: raw
                    .session_token_file
                    .as_ref()
                    .map(|f| resolve(base, f.get_ref())),
            },
            (None, None, Some(profile)) => credentials::Source::Profile {
                profile: profile.get_ref().clone(),
                file: raw
                    .credentials_file
                    .as_ref()
                    .map(|f| resolve(base, f.get_ref())),
            },
            (None, None, None) => credentials::Source::Default,
            _ => {
                p.push(
                    span.clone(),
                    "access_key_id and secret_access_key_file go together",
                );
                credentials::Source::Default
            }
        };
        let timeout = secs(
            raw.timeout_secs.as_ref(),
            "timeout_secs",
            30.0,
            1.0,
            600.0,
            p,
        );
        let ca_file = raw.ca_file.as_ref().map(|f| {
            let path = resolve(base, f.get_ref());
            if let Err(e) = crate::http_client::agent(Some(&path), Duration::from_secs(1)) {
                p.push(f.span(), e);
            }
            path
        });
        (p.list().len() == before).then(|| Settings {
            region: raw.region.into_inner(),
            endpoint: raw.endpoint.map(Spanned::into_inner),
            credentials,
            timeout,
            ca_file,
        })
    }

    pub fn url(&self, service_host: &str) -> String {
        match &self.endpoint {
            Some(e) => endpoint_url(e),
            None => format!("https://{service_host}.{}.amazonaws.com/", self.region),
        }
    }
}

/// The URL to POST to for an `endpoint` as a user wrote it: its path ends
/// in one `/` (`http://host:4566` and `http://host:4566/` are the same), a
/// query is kept.
fn endpoint_url(endpoint: &str) -> String {
    match endpoint.split_once('?') {
        Some((path, query)) => format!("{}/?{query}", path.trim_end_matches('/')),
        None => format!("{}/", endpoint.trim_end_matches('/')),
    }
}

/// How an AWS call ended, when it did not succeed.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Throttled: back off and retry.
    Throttled(String),
    /// 5xx, network, timeout: retry.
    Transient(String),
    /// Our clock is off; the server's time when it told us, if it did.
    Skewed(String),
    /// The credentials were refused (wrong, expired or rotated key, no
    /// permission): not the data's fault. Retry with backoff; the
    /// credentials are read again before each try.
    Unauthorized(String),
    /// Refused for good: AWS's code and message.
    Refused {
        status: u16,
        code: String,
        message: String,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Throttled(m)
            | Failure::Transient(m)
            | Failure::Skewed(m)
            | Failure::Unauthorized(m) => f.write_str(m),
            Failure::Refused {
                status,
                code,
                message,
            } => write!(f, "HTTP {status} {code}: {message}"),
        }
    }
}

/// A successful response's body.
pub struct Answer {
    pub body: Vec<u8>,
}

/// Classify an error answer from its status, AWS error code and message.
pub fn classify(status: u16, code: &str, message: &str) -> Failure {
    const THROTTLE: &[&str] = &[
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "SlowDown",
    ];
    let what = if code.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status} {code}")
    };
    let text = format!("{what}: {message}");
    // Codes that say the caller's credentials, not the request's data, are
    // at fault (AWS's common errors, and the services' own spellings).
    const UNAUTHORIZED: &[&str] = &[
        "AccessDenied",
        "AccessDeniedException",
        "ExpiredToken",
        "ExpiredTokenException",
        "IncompleteSignature",
        "IncompleteSignatureException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "MissingAuthenticationToken",
        "NotAuthorized",
        "SignatureDoesNotMatch",
        "UnauthorizedOperation",
        "UnrecognizedClientException",
    ];
    let expired = message.contains("Signature expired") || message.contains("signature expired");
    if THROTTLE.contains(&code) || status == 429 {
        Failure::Throttled(text)
    } else if matches!(
        code,
        "RequestExpired" | "RequestTimeTooSkewed" | "RequestInTheFuture"
    ) || (expired
        && matches!(code, "InvalidSignatureException" | "SignatureDoesNotMatch"))
    {
        Failure::Skewed(text)
    } else if UNAUTHORIZED.contains(&code) || status == 401 {
        Failure::Unauthorized(text)
    } else if status >= 500 || status == 408 {
        Failure::Transient(text)
    } else {
        Failure::Refused {
            status,
            code: if code.is_empty() {
                format!("HTTP{status}")
            } else {
                code.to_owned()
            },
            message: message.to_owned(),
        }
    }
}

/// AWS's error code and message from a Query-protocol XML or a JSON body.
pub fn error_code(body: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(body);
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find(&format!("</{name}>"))? + start;
        Some(text[start..end].trim().to_owned())
    };
    if let Some(code) = tag("Code") {
        return (code, tag("Message").unwrap_or_default());
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
        let code = v.get("__type").and_then(|t| t.as_str()).unwrap_or("");
        let code = code.rsplit('#').next().unwrap_or(code).to_owned();
        let message = ["message", "Message"]
            .iter()
            .find_map(|k| v.get(*k).and_then(|m| m.as_str()))
            .unwrap_or("")
            .to_owned();
        return (code, message);
    }
    (String::new(), text.chars().take(200).collect())
}

/// Our idea of AWS's time: the local clock plus an offset learnt from a
/// response `Date` when AWS rejected a signature as expired or skewed (a
/// Raspberry Pi has no battery-backed clock).
#[derive(Clone, Default)]
pub struct SkewClock(Arc<AtomicI64>);

impl SkewClock {
    pub fn now(&self) -> SystemTime {
        let offset = self.0.load(Ordering::Relaxed);
        let base = SystemTime::now();
        if offset >= 0 {
            base + Duration::from_millis(offset as u64)
        } else {
            base - Duration::from_millis(offset.unsigned_abs())
        }
    }

    /// Learn the offset from the server's `Date`; returns the new offset.
    pub fn correct(&self, server_ms: i64) -> i64 {
        let local = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let offset = server_ms - local;
        self.0.store(offset, Ordering::Relaxed);
        offset
    }
}

/// One signed POST, blocking (call it on a worker thread). The secret never
/// leaves this function; errors carry AWS's code and message only.
pub struct Client {
    pub settings: Settings,
    service: &'static str,
    url: String,
    agent: Result<ureq::Agent, String>,
    pub clock: SkewClock,
    /// What AWS's answers say of the local clock, for the delivery loop.
    pub peer: crate::clock::PeerReading,
    /// ` through the … proxy …` when the environment names one.
    through: String,
}

impl Client {
    pub fn new(settings: Settings, service: &'static str, host_prefix: &str) -> Client {
        // A CA file that went bad after `check` makes every request fail
        // (and retry) with the reason, rather than trust other roots.
        let agent = crate::http_client::agent(settings.ca_file.as_deref(), settings.timeout);
        let url = settings.url(host_prefix);
        Client {
            through: crate::http_client::through(&url),
            url,
            settings,
            service,
            agent,
            clock: SkewClock::default(),
            peer: crate::clock::PeerReading::default(),
        }
    }

    /// POST `body` with `headers`; on a skew error, correct the clock from
    /// the response's `Date` and try once more at once.
    pub fn post(&self, headers: &[(&str, &str)], body: &[u8]) -> Result<Answer, Failure> {
        let creds = self
            .settings
            .credentials
            .load()
            .map_err(|e| Failure::Refused {
                status: 0,
                code: "Credentials".into(),
                message: e,
            })?;
        let mut tried_skew = false;
        loop {
            match self.post_once(&creds, headers, body) {
                Err((Failure::Skewed(msg), Some(date))) if !tried_skew => {
                    let offset = self.clock.correct(date);
                    log::warn!(
                        "{}: AWS says our clock is off ({msg}); signing {:+.1} s from the local clock from now on",
                        self.url,
                        offset as f64 / 1000.0
                    );
                    tried_skew = true;
                }
                other => return other.map_err(|(f, _)| f),
            }
        }
    }

    fn post_once(
        &self,
        creds: &credentials::Credentials,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Answer, (Failure, Option<i64>)> {
        let signed = sign(
            creds,
            &self.settings.region,
            self.service,
            self.clock.now(),
            &self.url,
            headers,
            body,
        )
        .map_err(|e| {
            (
                Failure::Refused {
                    status: 0,
                    code: "Signing".into(),
                    message: e,
                },
                None,
            )
        })?;
        let agent = self
            .agent
            .as_ref()
            .map_err(|e| (Failure::Transient(e.clone()), None))?;
        let mut req = agent.post(&self.url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        for (k, v) in &signed {
            req = req.header(k.as_str(), v.as_str());
        }
        let sent = crate::clock::now_ms();
        let mut resp = req.send(body).map_err(|e| {
            let why = format!("{}{}: {e}", self.url, self.through);
            (Failure::Transient(why), None)
        })?;
        let status = resp.status().as_u16();
        let date_header = resp.headers().get("date").and_then(|d| d.to_str().ok());
        self.peer.answer(date_header, sent, crate::clock::now_ms());
        let date = date_header.and_then(crate::clock::parse_http_date);
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_vec()
            .map_err(|e| {
                (
                    Failure::Transient(format!("{}: reading the answer: {e}", self.url)),
                    None,
                )
            })?;
        if (200..300).contains(&status) {
            return Ok(Answer { body: bytes });
        }
        let (code, message) = error_code(&bytes);
        Err((classify(status, &code, &message), date))
    }
}

#[cfg(test)]
mod tests;
