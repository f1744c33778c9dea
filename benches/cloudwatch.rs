//! Requests and bytes CloudWatch costs for one day of one edge, against one
//! request per datum (what a script calling put_metric_data per value does).
//!
//! Run: `cargo bench --bench cloudwatch`.
//!
//! The day: an xx gateway's active-user windows (48 × 30 min, 4 × 6 h,
//! 1 × 24 h), its `xx_rows_read` counter every 30 s poll, and relay stream
//! metrics for 12 streams × 5 counters (messages, bytes, malformed,
//! reconnects, connected) once a minute. Records reach the sink minute by
//! minute (the outbox hands over what arrived since the last delivery),
//! through the sink's real fold / split / gzip code.

use edgemeter::record;
use edgemeter::sinks::cloudwatch_metrics::body;

use std::io::Write;

use record::{Dims, Record};

const DAY_START: i64 = 1_795_392_000_000; // 2026-11-24T00:00:00Z
const MIN: i64 = 60_000;

fn gzip(data: &[u8]) -> usize {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("vec");
    enc.finish().expect("vec").len()
}

fn day() -> Vec<Record> {
    let mut out = Vec::new();
    let gw = |w: &str, e: &str| {
        Dims::new([
            ("gateway", "2Vk5NVrKu4VaXC8SuSfwmUw6Gsye3CnK"),
            ("window", w),
            ("epochs", e),
        ])
    };
    for half_hour in 0..48 {
        let end = DAY_START + (half_hour + 1) * 30 * MIN;
        out.push(Record::point(
            "active_users",
            gw("30m", "1"),
            end,
            9000.0 + half_hour as f64,
            "Count",
        ));
        if (half_hour + 1) % 12 == 0 {
            out.push(Record::point(
                "active_users",
                gw("6h", "12"),
                end,
                41_000.0,
                "Count",
            ));
        }
        if half_hour == 47 {
            out.push(Record::point(
                "active_users",
                gw("24h", "48"),
                end,
                120_000.0,
                "Count",
            ));
        }
    }
    for poll in 0..2880 {
        let dims = Dims::new([("gateway", "2Vk5NVrKu4VaXC8SuSfwmUw6Gsye3CnK")]);
        out.push(Record::point(
            "xx_rows_read",
            dims,
            DAY_START + poll * 30_000,
            (poll % 400) as f64,
            "Count",
        ));
    }
    for minute in 0..1440 {
        for s in 30..42 {
            for (m, unit) in [
                ("messages", "Count"),
                ("bytes", "Bytes"),
                ("malformed", "Count"),
                ("reconnects", "Count"),
                ("connected", "None"),
            ] {
                let dims = Dims::new([
                    ("stream", format!("spin{s}")),
                    ("host", "analytics-1".to_owned()),
                ]);
                let v = match m {
                    "connected" => 1.0,
                    "bytes" => ((minute * 37 + s) % 90_000) as f64,
                    _ => ((minute + s) % 120) as f64,
                };
                out.push(Record::point(
                    format!("relay_{m}"),
                    dims,
                    DAY_START + minute * MIN + 59_000,
                    v,
                    unit,
                ));
            }
        }
    }
    out.sort_by_key(|r| r.ts_ms);
    out
}

fn main() {
    let records = day();
    let now = DAY_START + 1440 * MIN;
    // edgemeter: one delivery per minute of what arrived in it.
    let (mut requests, mut raw_bytes, mut gz_bytes) = (0usize, 0usize, 0usize);
    let mut i = 0;
    while i < records.len() {
        let minute = records[i].ts_ms / MIN;
        let batch: Vec<(i64, Record)> = records[i..]
            .iter()
            .take_while(|r| r.ts_ms / MIN == minute)
            .enumerate()
            .map(|(k, r)| ((i + k) as i64, r.clone()))
            .collect();
        i += batch.len();
        let body::Folded {
            datums, rejected, ..
        } = body::fold(&batch, &[], now);
        assert!(rejected.is_empty());
        for (b, _) in body::bodies("edgemeter", &datums) {
            requests += 1;
            raw_bytes += b.len();
            gz_bytes += gzip(b.as_bytes());
        }
    }
    // Baseline: one request per datum, form-encoded, not compressed.
    let (mut base_requests, mut base_bytes) = (0usize, 0usize);
    for (k, r) in records.iter().enumerate() {
        let datums = body::fold(&[(k as i64, r.clone())], &[], now).datums;
        for (b, _) in body::bodies("edgemeter", &datums) {
            base_requests += 1;
            base_bytes += b.len();
        }
    }
    println!(
        "cloudwatch_metrics, one day of one edge: {} points",
        records.len()
    );
    println!("  one request per datum:      {base_requests:>6} requests, {base_bytes:>9} bytes");
    println!(
        "  edgemeter, minute batches:  {requests:>6} requests, {gz_bytes:>9} bytes gzip ({raw_bytes} before gzip)"
    );
    println!(
        "  => {:.0}x fewer requests, {:.0}x fewer bytes",
        base_requests as f64 / requests as f64,
        base_bytes as f64 / gz_bytes as f64
    );
}
