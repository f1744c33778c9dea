//! The session host's outgoing rules ("destinations"), set from the files
//! `configure` writes: for each stream, `log.access.<stream>` (the relay
//! access URL) and `log.token.<stream>` (its JWT). Replaces the
//! `session-rules` script of copy-pasted `curl` lines.
//!
//! A rule's id is the stream name, so posting again replaces it
//! (idempotent). The session host keeps rules only in memory; the source
//! re-checks them every `check_interval_secs` and after its streams come
//! back, and re-posts what is missing or different. Tokens are read when
//! needed, compared in memory and sent in the body; they never appear in a
//! log line, an error or `Debug` output (the host's own listing returns
//! them, so [`Installed`] drops them after comparing).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Bounds what we read back from the session host.
const MAX_ANSWER_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Clone, PartialEq)]
pub struct Rule {
    pub id: String,
    pub stream: String,
    pub destination: String,
    token: String,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule")
            .field("id", &self.id)
            .field("stream", &self.stream)
            .field("destination", &self.destination)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl Rule {
    fn body(&self) -> String {
        serde_json::json!({
            "id": self.id,
            "stream": self.stream,
            "destination": self.destination,
            "token": self.token,
        })
        .to_string()
    }
}

/// The rules that could be read, and why the others could not.
#[derive(Debug, Default)]
pub struct Rules {
    pub rules: Vec<Rule>,
    /// One line per stream skipped: a missing, unreadable or bad file.
    pub skipped: Vec<String>,
}

/// The rules for `streams` from the files in `dir`. A stream whose pair of
/// files is missing or bad is skipped and named; the others go ahead.
pub fn read_rules(dir: &Path, streams: &[String]) -> Rules {
    let mut out = Rules::default();
    for s in streams {
        let access = crate::problems::read_secret_file(
            &dir.join(format!("log.access.{s}")),
            "the access file",
        );
        let token = crate::problems::read_secret_file(
            &dir.join(format!("log.token.{s}")),
            "the token file",
        );
        match (access, token) {
            (Ok(destination), Ok(token)) => {
                if !(destination.starts_with("https://")
                    || destination.starts_with("http://")
                    || destination.starts_with("wss://")
                    || destination.starts_with("ws://"))
                {
                    out.skipped.push(format!(
                        "{s}: log.access.{s} holds `{destination}`, which is not a URL"
                    ));
                    continue;
                }
                out.rules.push(Rule {
                    id: s.clone(),
                    stream: s.clone(),
                    destination,
                    token,
                });
            }
            (a, t) => {
                let why: Vec<String> = a.err().into_iter().chain(t.err()).collect();
                out.skipped.push(format!("{s}: {}", why.join("; ")));
            }
        }
    }
    out
}

/// `1 rule`, `2 rules`.
pub fn rules(n: usize) -> String {
    crate::logging::counted(n, "rule", "rules")
}

/// A rule as the session host lists it, token compared and dropped.
#[derive(Debug, Clone, PartialEq)]
pub struct Installed {
    pub id: String,
    pub stream: String,
    pub destination: String,
    /// Whether the host's token equals the one we would post (None: no
    /// rule of ours to compare with).
    pub token_matches: Option<bool>,
}

/// What reconciling did.
#[derive(Debug, Default, PartialEq)]
pub struct Reconciled {
    /// Ids posted because they were missing or different.
    pub posted: Vec<String>,
    /// Ids that were already right.
    pub unchanged: usize,
    /// Rules with other ids that forward one of our streams too (its
    /// messages would arrive twice): `(id, stream)`.
    pub others: Vec<(String, String)>,
}

pub struct Api {
    base: String,
    agent: ureq::Agent,
}

impl Api {
    pub fn new(base: &str, timeout: Duration) -> Api {
        Api {
            base: base.trim_end_matches('/').to_owned(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(timeout))
                .user_agent(concat!("edgemeter/", env!("CARGO_PKG_VERSION")))
                .build()
                .into(),
        }
    }

    fn answer(
        &self,
        what: &str,
        resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Vec<u8>, String> {
        let mut resp = resp.map_err(|e| format!("{what} at {}: {e}", self.base))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_vec()
            .map_err(|e| format!("{what} at {}: reading the answer: {e}", self.base))?;
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            // The answer may echo what we sent: show only its status.
            Err(format!("{what} at {}: HTTP {status}", self.base))
        }
    }

    pub fn post(&self, rule: &Rule) -> Result<(), String> {
        let resp = self
            .agent
            .post(&format!("{}/api/destinations", self.base))
            .header("content-type", "application/json")
            .send(rule.body().as_bytes());
        self.answer(
            &format!("posting the rule for stream {}", rule.stream),
            resp,
        )
        .map(|_| ())
    }

    /// The host's rules, with tokens compared against `ours` and dropped.
    pub fn installed(&self, ours: &[Rule]) -> Result<Vec<Installed>, String> {
        let resp = self
            .agent
            .get(&format!("{}/api/destinations/all", self.base))
            .call();
        let body = self.answer("listing the rules", resp)?;
        parse_installed(&body, ours).map_err(|e| format!("listing the rules at {}: {e}", self.base))
    }

    /// Post every rule that is missing or differs from ours.
    pub fn reconcile(&self, ours: &[Rule]) -> Result<Reconciled, String> {
        let installed = self.installed(ours)?;
        let mut out = Reconciled::default();
        for rule in ours {
            let same = installed.iter().any(|i| {
                i.id == rule.id
                    && i.stream == rule.stream
                    && i.destination == rule.destination
                    && i.token_matches == Some(true)
            });
            if same {
                out.unchanged += 1;
            } else {
                self.post(rule)?;
                out.posted.push(rule.id.clone());
            }
        }
        for i in &installed {
            if ours.iter().any(|r| r.stream == i.stream && r.id != i.id) {
                out.others.push((i.id.clone(), i.stream.clone()));
            }
        }
        Ok(out)
    }
}

/// `GET /api/destinations/all` answers `{id: {id, stream, destination,
/// token, file}}`.
pub fn parse_installed(body: &[u8], ours: &[Rule]) -> Result<Vec<Installed>, String> {
    #[derive(Deserialize)]
    struct Wire {
        #[serde(default)]
        stream: String,
        #[serde(default)]
        destination: String,
        #[serde(default)]
        token: String,
    }
    let map: BTreeMap<String, Wire> = serde_json::from_slice(body)
        .map_err(|e| format!("the answer is not the expected JSON map of rules ({e})"))?;
    Ok(map
        .into_iter()
        .map(|(id, w)| {
            let stream = w.stream.trim_start_matches('/').to_owned();
            let token_matches = ours.iter().find(|r| r.id == id).map(|r| r.token == w.token);
            Installed {
                id,
                stream,
                destination: w.destination,
                token_matches,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str, token: &str) -> Rule {
        Rule {
            id: s.into(),
            stream: s.into(),
            destination: format!("https://relay-access.example/session/{s}-log"),
            token: token.into(),
        }
    }

    #[test]
    fn rules_come_from_the_files_and_every_missing_one_is_named() {
        let dir = std::env::temp_dir().join(format!("edgemeter-prov-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("log.access.spin30"),
            "https://ra.example/session/spin30-log\n",
        )
        .unwrap();
        std::fs::write(dir.join("log.token.spin30"), "eyJ.secret.sig\n").unwrap();
        std::fs::write(
            dir.join("log.access.spin31"),
            "https://ra.example/session/spin31-log\n",
        )
        .unwrap();
        let ok = read_rules(&dir, &["spin30".into()]);
        assert!(ok.skipped.is_empty());
        assert_eq!(
            ok.rules[0].destination,
            "https://ra.example/session/spin30-log"
        );
        assert_eq!(ok.rules[0].token, "eyJ.secret.sig");
        assert!(
            !format!("{ok:?}").contains("secret"),
            "Debug shows no token"
        );
        // Missing files skip their stream only; the others go ahead.
        let some = read_rules(&dir, &["spin30".into(), "spin31".into(), "spin32".into()]);
        assert_eq!(some.rules.len(), 1);
        assert_eq!(some.rules[0].id, "spin30");
        assert_eq!(some.skipped.len(), 2, "{:?}", some.skipped);
        assert!(
            some.skipped[0].starts_with("spin31: ") && some.skipped[0].contains("log.token.spin31"),
            "{:?}",
            some.skipped
        );
        assert!(
            some.skipped[1].contains("log.access.spin32")
                && some.skipped[1].contains("log.token.spin32"),
            "{:?}",
            some.skipped
        );
        assert!(!format!("{some:?}").contains("secret"));
        assert_eq!(
            (rules(1), rules(2)),
            ("1 rule".to_owned(), "2 rules".to_owned())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_listing_is_compared_without_keeping_tokens() {
        let ours = [rule("spin30", "t30"), rule("spin31", "t31")];
        let body = br#"{
            "spin30": {"id":"spin30","stream":"spin30","destination":"https://relay-access.example/session/spin30-log","token":"t30","file":""},
            "spin31": {"id":"spin31","stream":"/spin31","destination":"https://relay-access.example/session/spin31-log","token":"OLD","file":""},
            "7": {"id":"7","stream":"spin30","destination":"x","token":"other"}
        }"#;
        let got = parse_installed(body, &ours).unwrap();
        let find = |id: &str| got.iter().find(|i| i.id == id).unwrap();
        assert_eq!(find("spin30").token_matches, Some(true));
        assert_eq!(find("spin31").token_matches, Some(false));
        assert_eq!(
            find("spin31").stream,
            "spin31",
            "a leading / is trimmed as the host does"
        );
        assert_eq!(find("7").token_matches, None);
        assert!(!format!("{got:?}").contains("other") && !format!("{got:?}").contains("t30"));
        assert!(parse_installed(b"[]", &ours).is_err());
    }
}
