//! The `cloudwatch_metrics` sink: points to Amazon CloudWatch with
//! `PutMetricData` (Query protocol, form-encoded, gzip), signed for
//! `monitoring`, no SDK.
//!
//! A batch from the outbox becomes as few requests as the limits allow:
//! points of one series within one minute fold into one datum
//! (`Values`/`Counts`, at most 150 distinct values), and a request holds at
//! most 1,000 datums and 1 MB of form data. Points CloudWatch can never
//! take are not sent: those older than 14 days are skipped and counted
//! under the sink's drops (no retry could deliver them); the others (more
//! than 2 h ahead, not finite, dimensions it refuses) go to dead letters
//! with the reason. CloudWatch cannot drop duplicates, so the requests of a batch
//! that already succeeded are remembered and not sent again when a later
//! request of the same batch fails and the batch is retried (in the same
//! run; after a crash between requests a datum may arrive twice).

pub mod body;

use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeTable;

use crate::aws::{self, Client};

/// The service's host prefix (`monitoring.<region>.amazonaws.com`).
pub const HOST: &str = "monitoring";
use crate::clock::now_ms;
use crate::outbox::Batch;
use crate::problems::{Problems, deserialize, split_off};
use crate::record::{Kind, KindSet};
use crate::runtime::{LocalBoxFuture, Worker};
use crate::sinks::{Delivered, DeliveryError, Progress, Sink};

pub use body::{bodies, fold};

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub aws: aws::Settings,
    pub namespace: String,
    /// Added to every datum (a record's own dimension of the same name wins).
    pub dimensions: Vec<(String, String)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    namespace: Spanned<String>,
    dimensions: Option<Spanned<toml::Table>>,
}

impl Config {
    pub fn parse(base: &Path, mut table: Spanned<DeTable<'_>>, p: &mut Problems) -> Option<Config> {
        let aws_table = split_off(&mut table, aws::KEYS);
        let aws = aws::Settings::parse(base, aws_table, p);
        let raw: Raw = deserialize(table, p)?;
        let before = p.list().len();
        let ns = raw.namespace.get_ref();
        if ns.is_empty() || ns.len() > 255 || ns.starts_with("AWS/") || ns.starts_with(':') {
            p.push(
                raw.namespace.span(),
                format!(
                    "namespace `{ns}` must be 1 to 255 characters and not start with `AWS/` or `:`"
                ),
            );
        }
        let mut dimensions = Vec::new();
        if let Some(d) = &raw.dimensions {
            for (k, v) in d.get_ref() {
                match v.as_str() {
                    None => p.push(d.span(), format!("dimension `{k}` must be a string")),
                    Some(s) => match body::dimension_problem(k, s) {
                        Some(why) => p.push(d.span(), why),
                        None => dimensions.push((k.clone(), s.to_owned())),
                    },
                }
            }
            if dimensions.len() > body::MAX_DIMENSIONS {
                p.push(
                    d.span(),
                    format!("at most {} dimensions", body::MAX_DIMENSIONS),
                );
            }
        }
        (p.list().len() == before).then_some(Config {
            aws: aws?,
            namespace: raw.namespace.into_inner(),
            dimensions,
        })
    }
}

pub struct CloudWatchMetrics {
    config: Config,
    client: Arc<Client>,
    worker: Worker,
}

impl CloudWatchMetrics {
    pub fn new(config: Config) -> CloudWatchMetrics {
        let client = Arc::new(Client::new(config.aws.clone(), "monitoring", HOST));
        CloudWatchMetrics {
            config,
            client,
            worker: Worker::new("sink-cw-metrics"),
        }
    }
}

const HEADERS: [(&str, &str); 2] = [
    (
        "content-type",
        "application/x-www-form-urlencoded; charset=utf-8",
    ),
    ("content-encoding", "gzip"),
];

impl Sink for CloudWatchMetrics {
    fn accepts(&self) -> KindSet {
        KindSet::of(&[Kind::Point])
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
            let body::Folded {
                datums,
                rejected,
                skipped,
            } = fold(&batch.records, &self.config.dimensions, now_ms());
            let requests = bodies(&self.config.namespace, &datums);
            let mut sent = Delivered {
                rejected,
                skipped,
                requests: 0,
                bytes: 0,
            };
            let several = requests.len() > 1;
            for (body, ids) in requests {
                let gz = crate::http_client::gzip(body.as_bytes());
                let len = gz.len() as i64;
                let client = self.client.clone();
                self.worker
                    .run(move || client.post(&HEADERS, &gz))
                    .await
                    .map_err(crate::sinks::aws_delivery_error)?;
                if several {
                    progress.accepted(ids).await;
                }
                sent.requests += 1;
                sent.bytes += len;
            }
            Ok(sent)
        })
    }
}

#[cfg(test)]
mod tests;
