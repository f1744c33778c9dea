//! The `cloudwatch_logs` sink: lines (the xx source's CSV lines, and any
//! other `line` records) to CloudWatch Logs with `PutLogEvents`, where
//! `active-users.py` used to send them: log group
//! `xxnetwork-active-users-mainnet`, stream `<nodeId>-active-users.csv`.
//!
//! Each line is one event; its message is the line as the script sent it
//! (it read its CSV in text mode, so `\r\n` arrives as `\n`). Events go in
//! time order, within PutLogEvents' limits (10,000 events, 1 MiB counting 26
//! bytes per event, a 24 h span). An event older than CloudWatch Logs takes
//! (14 days: a first start's backfill) is sent stamped with the time it is
//! sent, as the script stamped every line when it sent it; the line itself
//! carries its window's time. Events more than 2 h ahead are dead-lettered
//! with the reason. A missing stream (or group) is created. Events
//! CloudWatch reports back as rejected are dead-lettered.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeTable;

use crate::aws::{self, Client, Failure};

/// The service's host prefix (`logs.<region>.amazonaws.com`).
pub const HOST: &str = "logs";
use crate::clock::now_ms;
use crate::outbox::Batch;
use crate::problems::{Problems, deserialize, split_off};
use crate::record::{Kind, KindSet, Record};
use crate::runtime::{LocalBoxFuture, Worker};
use crate::sinks::{Delivered, DeliveryError, Progress, Sink};

pub const MAX_EVENTS: usize = 10_000;
pub const MAX_BATCH_BYTES: usize = 1_048_576;
pub const EVENT_OVERHEAD: usize = 26;
/// 256 KiB per event, the overhead included.
pub const MAX_EVENT_BYTES: usize = 262_144 - EVENT_OVERHEAD;
const MAX_SPAN_MS: i64 = 24 * 3_600_000;
const MAX_AGE_MS: i64 = 14 * 86_400_000;
const MAX_AHEAD_MS: i64 = 2 * 3_600_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub aws: aws::Settings,
    pub log_group: String,
    /// With `{node_id}` (the record's `gateway` dimension, else the agent
    /// id), `{name}` (the record's name, e.g. `active-users.csv`) and
    /// `{agent_id}`.
    pub log_stream: String,
    pub agent_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    log_group: Spanned<String>,
    log_stream: Option<Spanned<String>>,
}

impl Config {
    pub fn parse(base: &Path, mut table: Spanned<DeTable<'_>>, p: &mut Problems) -> Option<Config> {
        let aws_table = split_off(&mut table, aws::KEYS);
        let aws = aws::Settings::parse(base, aws_table, p);
        let raw: Raw = deserialize(table, p)?;
        let before = p.list().len();
        let g = raw.log_group.get_ref();
        let group_ok = !g.is_empty()
            && g.len() <= 512
            && g.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-/.#".contains(c));
        if !group_ok {
            p.push(
                raw.log_group.span(),
                format!("log_group `{g}` must be 1 to 512 of letters, digits, `_-/.#`"),
            );
        }
        let stream = raw
            .log_stream
            .as_ref()
            .map_or("{node_id}-{name}".to_owned(), |s| s.get_ref().clone());
        if let Some(s) = &raw.log_stream {
            let rest = ["{node_id}", "{name}", "{agent_id}"]
                .iter()
                .fold(s.get_ref().clone(), |t, v| t.replace(v, ""));
            if rest.contains(['{', '}', ':', '*']) || s.get_ref().is_empty() {
                p.push(
                    s.span(),
                    "log_stream may use {node_id}, {name} and {agent_id}, and no other `{`, `}`, `:` or `*`",
                );
            }
        }
        (p.list().len() == before).then_some(Config {
            aws: aws?,
            log_group: raw.log_group.into_inner(),
            log_stream: stream,
            agent_id: String::new(),
        })
    }
}

/// Events for one stream, within the limits, in time order.
#[derive(Debug, Clone, PartialEq)]
pub struct Put {
    pub stream: String,
    /// (record id, timestamp ms, message)
    pub events: Vec<(i64, i64, String)>,
}

fn stream_name(template: &str, r: &Record, agent_id: &str) -> String {
    let node = r
        .dims
        .pairs()
        .iter()
        .find(|(k, _)| k == "gateway")
        .map_or(agent_id, |(_, v)| v.as_str());
    template
        .replace("{node_id}", node)
        .replace("{name}", &r.name)
        .replace("{agent_id}", agent_id)
}

/// The message of a line record: its text, with `\r\n` read as `\n`.
pub fn message(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(payload);
    match text.strip_suffix("\r\n") {
        Some(t) => format!("{t}\n"),
        None => text.into_owned(),
    }
}

/// Plan PutLogEvents calls for a batch: (calls, refused (record id, why)).
pub fn plan(
    records: &[(i64, Record)],
    template: &str,
    agent_id: &str,
    now: i64,
) -> (Vec<Put>, Vec<(i64, String)>) {
    let mut by_stream: BTreeMap<String, Vec<(i64, i64, String)>> = BTreeMap::new();
    let mut rejected = Vec::new();
    for (id, r) in records {
        let msg = message(&r.payload);
        // Older than CloudWatch Logs takes (a first start's backfill):
        // stamped with the time it is sent, as `active-users.py` stamped
        // every line; the line itself carries its window's time.
        let ts = if r.ts_ms < now - MAX_AGE_MS {
            now
        } else {
            r.ts_ms
        };
        let why = if ts > now + MAX_AHEAD_MS {
            Some("more than 2 hours in the future".to_owned())
        } else if msg.is_empty() {
            Some("an empty message".to_owned())
        } else if msg.len() > MAX_EVENT_BYTES {
            Some(format!(
                "a message of {} bytes (at most {MAX_EVENT_BYTES})",
                msg.len()
            ))
        } else {
            None
        };
        match why {
            Some(w) => rejected.push((*id, w)),
            None => by_stream
                .entry(stream_name(template, r, agent_id))
                .or_default()
                .push((*id, ts, msg)),
        }
    }
    let mut puts = Vec::new();
    for (stream, mut events) in by_stream {
        events.sort_by_key(|(id, ts, _)| (*ts, *id));
        let mut cur: Vec<(i64, i64, String)> = Vec::new();
        let mut bytes = 0;
        for ev in events {
            let size = ev.2.len() + EVENT_OVERHEAD;
            let too_wide = cur.first().is_some_and(|f| ev.1 - f.1 > MAX_SPAN_MS);
            if !cur.is_empty()
                && (cur.len() == MAX_EVENTS || bytes + size > MAX_BATCH_BYTES || too_wide)
            {
                puts.push(Put {
                    stream: stream.clone(),
                    events: std::mem::take(&mut cur),
                });
                bytes = 0;
            }
            bytes += size;
            cur.push(ev);
        }
        if !cur.is_empty() {
            puts.push(Put {
                stream,
                events: cur,
            });
        }
    }
    (puts, rejected)
}

pub fn put_body(group: &str, put: &Put) -> String {
    let events: Vec<serde_json::Value> = put
        .events
        .iter()
        .map(|(_, ts, msg)| serde_json::json!({"timestamp": ts, "message": msg}))
        .collect();
    serde_json::json!({"logGroupName": group, "logStreamName": put.stream, "logEvents": events})
        .to_string()
}

/// Record ids of events CloudWatch says it did not take
/// (`rejectedLogEventsInfo`), with the reason.
pub fn rejected_by_answer(answer: &[u8], put: &Put) -> Vec<(i64, String)> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(answer) else {
        return Vec::new();
    };
    let Some(info) = v.get("rejectedLogEventsInfo") else {
        return Vec::new();
    };
    let idx = |k: &str| info.get(k).and_then(|x| x.as_i64());
    let mut out = Vec::new();
    for (i, (id, _, _)) in put.events.iter().enumerate() {
        let i = i as i64;
        let why = if idx("tooNewLogEventStartIndex").is_some_and(|s| i >= s) {
            Some("CloudWatch Logs: too new")
        } else if idx("tooOldLogEventEndIndex").is_some_and(|e| i < e) {
            Some("CloudWatch Logs: too old")
        } else if idx("expiredLogEventEndIndex").is_some_and(|e| i < e) {
            Some("CloudWatch Logs: older than the group's retention")
        } else {
            None
        };
        if let Some(w) = why {
            out.push((*id, w.to_owned()));
        }
    }
    out
}

pub struct CloudWatchLogs {
    config: Config,
    client: Arc<Client>,
    worker: Worker,
    /// Streams known to exist (created or written to in this run).
    streams: HashSet<String>,
}

impl CloudWatchLogs {
    pub fn new(config: Config, agent_id: &str) -> CloudWatchLogs {
        let client = Arc::new(Client::new(config.aws.clone(), "logs", HOST));
        CloudWatchLogs {
            config: Config {
                agent_id: agent_id.to_owned(),
                ..config
            },
            client,
            worker: Worker::new("sink-cw-logs"),
            streams: HashSet::new(),
        }
    }

    async fn call(&self, target: &'static str, body: String) -> Result<Vec<u8>, Failure> {
        let client = self.client.clone();
        self.worker
            .run(move || {
                let headers = [
                    ("content-type", "application/x-amz-json-1.1"),
                    ("x-amz-target", target),
                ];
                client.post(&headers, body.as_bytes()).map(|a| a.body)
            })
            .await
    }

    /// Create the stream (and, if needed, the group); "already exists" is fine.
    async fn ensure_stream(&mut self, stream: &str) -> Result<(), Failure> {
        let group = &self.config.log_group;
        let body = serde_json::json!({"logGroupName": group, "logStreamName": stream}).to_string();
        match self
            .call("Logs_20140328.CreateLogStream", body.clone())
            .await
        {
            Ok(_) => {}
            Err(Failure::Refused { code, .. }) if code == "ResourceAlreadyExistsException" => {}
            Err(Failure::Refused { code, .. }) if code == "ResourceNotFoundException" => {
                let g = serde_json::json!({"logGroupName": group}).to_string();
                match self.call("Logs_20140328.CreateLogGroup", g).await {
                    Ok(_) => log::info!("created the CloudWatch log group {group}"),
                    Err(Failure::Refused { code, .. })
                        if code == "ResourceAlreadyExistsException" => {}
                    Err(e) => return Err(e),
                }
                match self.call("Logs_20140328.CreateLogStream", body).await {
                    Ok(_) => {}
                    Err(Failure::Refused { code, .. })
                        if code == "ResourceAlreadyExistsException" => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
        self.streams.insert(stream.to_owned());
        Ok(())
    }
}

impl Sink for CloudWatchLogs {
    fn accepts(&self) -> KindSet {
        KindSet::of(&[Kind::Line])
    }

    fn peer_clock(&self) -> Option<&crate::clock::PeerReading> {
        Some(&self.client.peer)
    }

    fn deliver<'a>(
        &'a mut self,
        batch: &'a Batch,
        progress: &'a Progress,
    ) -> LocalBoxFuture<'a, Result<Delivered, DeliveryError>> {
        Box::pin(async move {
            let (puts, rejected) = plan(
                &batch.records,
                &self.config.log_stream,
                &self.config.agent_id,
                now_ms(),
            );
            let mut done = Delivered {
                rejected,
                skipped: Vec::new(),
                requests: 0,
                bytes: 0,
            };
            let several = puts.len() > 1;
            for put in &puts {
                if !self.streams.contains(&put.stream) {
                    self.ensure_stream(&put.stream)
                        .await
                        .map_err(crate::sinks::aws_delivery_error)?;
                    done.requests += 1;
                }
                let body = put_body(&self.config.log_group, put);
                let len = body.len() as i64;
                let answer = match self.call("Logs_20140328.PutLogEvents", body.clone()).await {
                    // The stream was deleted behind our back: create it again, once.
                    Err(Failure::Refused { code, .. }) if code == "ResourceNotFoundException" => {
                        self.streams.remove(&put.stream);
                        self.ensure_stream(&put.stream)
                            .await
                            .map_err(crate::sinks::aws_delivery_error)?;
                        self.call("Logs_20140328.PutLogEvents", body).await
                    }
                    other => other,
                }
                .map_err(crate::sinks::aws_delivery_error)?;
                let refused = rejected_by_answer(&answer, put);
                if several {
                    // What it refused stays unaccepted: a dead letter keeps it.
                    let ids = put
                        .events
                        .iter()
                        .map(|e| e.0)
                        .filter(|id| !refused.iter().any(|(r, _)| r == id))
                        .collect();
                    progress.accepted(ids).await;
                }
                done.rejected.extend(refused);
                done.requests += 1;
                done.bytes += len;
            }
            Ok(done)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Dims;

    const NOW: i64 = 1_795_488_651_000;

    fn line(ts: i64, text: &str) -> Record {
        Record {
            kind: Kind::Line,
            ts_ms: ts,
            name: "active-users.csv".into(),
            dims: Dims::new([("gateway", "NODEID")]),
            value: 0.0,
            unit: "None".into(),
            payload: text.as_bytes().to_vec(),
        }
    }

    fn ids(rs: Vec<Record>) -> Vec<(i64, Record)> {
        rs.into_iter()
            .enumerate()
            .map(|(i, r)| (i as i64 + 1, r))
            .collect()
    }

    #[test]
    fn streams_are_named_as_the_script_named_them_and_messages_are_its_lines() {
        let (puts, rejected) = plan(
            &ids(vec![line(
                NOW,
                "921543,1,2022-07-25 20:00:00+00:00,1234\r\n",
            )]),
            "{node_id}-{name}",
            "agent",
            NOW,
        );
        assert!(rejected.is_empty());
        assert_eq!(puts[0].stream, "NODEID-active-users.csv");
        assert_eq!(
            put_body("xxnetwork-active-users-mainnet", &puts[0]),
            r#"{"logEvents":[{"message":"921543,1,2022-07-25 20:00:00+00:00,1234\n","timestamp":1795488651000}],"logGroupName":"xxnetwork-active-users-mainnet","logStreamName":"NODEID-active-users.csv"}"#
        );
    }

    #[test]
    fn events_are_ordered_split_at_limits_and_refused_when_out_of_range() {
        let mut recs = vec![line(NOW - 1000, "b\n"), line(NOW - 2000, "a\n")];
        recs.push(line(NOW - 15 * 86_400_000, "old\n"));
        recs.push(line(NOW + 3 * 3_600_000, "future\n"));
        recs.push(line(NOW, ""));
        let (puts, rejected) = plan(&ids(recs), "{node_id}-{name}", "agent", NOW);
        assert_eq!(puts.len(), 1);
        let msgs: Vec<&str> = puts[0].events.iter().map(|e| e.2.as_str()).collect();
        // Older than CloudWatch Logs takes: sent stamped now, as the
        // script stamped its lines, never a dead letter.
        assert_eq!(msgs, vec!["a\n", "b\n", "old\n"], "time order");
        assert_eq!(puts[0].events[2].1, NOW);
        assert_eq!(rejected.iter().map(|r| r.0).collect::<Vec<_>>(), vec![4, 5]);

        // 10,001 events: two calls of 10,000 and 1.
        let many: Vec<Record> = (0..10_001).map(|i| line(NOW - 10_001 + i, "x\n")).collect();
        let (puts, _) = plan(&ids(many), "s", "a", NOW);
        assert_eq!(
            puts.iter().map(|p| p.events.len()).collect::<Vec<_>>(),
            vec![10_000, 1]
        );

        // Bytes: 5 events of 256 KiB - 26 fill 1 MiB at 4 per call.
        let big = "y".repeat(MAX_EVENT_BYTES);
        let five: Vec<Record> = (0..5).map(|i| line(NOW - 10 + i, &big)).collect();
        let (puts, rejected) = plan(&ids(five), "s", "a", NOW);
        assert!(rejected.is_empty());
        assert_eq!(
            puts.iter().map(|p| p.events.len()).collect::<Vec<_>>(),
            vec![4, 1]
        );
        let (_, rejected) = plan(&ids(vec![line(NOW, &format!("{big}z"))]), "s", "a", NOW);
        assert_eq!(rejected.len(), 1);

        // A span over 24 h splits.
        let (puts, _) = plan(
            &ids(vec![line(NOW - 25 * 3_600_000, "p\n"), line(NOW, "q\n")]),
            "s",
            "a",
            NOW,
        );
        assert_eq!(puts.len(), 2);
    }

    #[test]
    fn rejected_events_in_the_answer_map_back_to_records() {
        let put = Put {
            stream: "s".into(),
            events: (1..=5).map(|i| (i, NOW, "m".to_owned())).collect(),
        };
        let answer = br#"{"nextSequenceToken":"x","rejectedLogEventsInfo":{"tooOldLogEventEndIndex":1,"tooNewLogEventStartIndex":4}}"#;
        let r = rejected_by_answer(answer, &put);
        assert_eq!(
            r,
            vec![
                (1, "CloudWatch Logs: too old".to_owned()),
                (5, "CloudWatch Logs: too new".to_owned())
            ]
        );
        assert!(rejected_by_answer(br#"{"nextSequenceToken":"x"}"#, &put).is_empty());
    }
}
