use crate::http_client::gzip;
use std::io::Read;

use super::body::{MAX_BODY_BYTES, MAX_DATUMS, encode_datum, form_encode};
use super::*;
use crate::record::{Dims, Record};

const NOW: i64 = 1_795_488_651_000; // 2026-11-24T02:50:51Z

fn point(name: &str, dims: &[(&str, &str)], ts: i64, v: f64) -> Record {
    Record::point(
        name.to_owned(),
        Dims::new(dims.iter().copied()),
        ts,
        v,
        "Count",
    )
}

fn ids(rs: Vec<Record>) -> Vec<(i64, Record)> {
    rs.into_iter()
        .enumerate()
        .map(|(i, r)| (i as i64 + 1, r))
        .collect()
}

#[test]
fn form_encoding_escapes_all_but_unreserved() {
    let check = |s: &str, want: &str| {
        let mut out = String::new();
        form_encode(s, &mut out);
        assert_eq!(out, want);
    };
    check("active_users", "active_users");
    check("a b/c:d=e&f", "a%20b%2Fc%3Ad%3De%26f");
    check("Edge~1.-x", "Edge~1.-x");
    check("é€", "%C3%A9%E2%82%AC");
    check("+%*", "%2B%25%2A");
}

/// The request bodies alone.
fn texts(namespace: &str, datums: &[body::Datum]) -> Vec<String> {
    bodies(namespace, datums)
        .into_iter()
        .map(|(b, _)| b)
        .collect()
}

#[test]
fn each_request_carries_the_ids_of_its_records() {
    // Two records fold into one datum; 1,001 series make two requests.
    let mut recs: Vec<Record> = (0..1001)
        .map(|i| point(&format!("m{i}"), &[], NOW, 1.0))
        .collect();
    recs.push(point("m0", &[], NOW, 2.0));
    let body::Folded { datums, .. } = fold(&ids(recs), &[], NOW);
    let b = bodies("ns", &datums);
    assert_eq!(b.len(), 2);
    let mut all: Vec<i64> = b.iter().flat_map(|(_, ids)| ids.clone()).collect();
    assert_eq!(b[1].1, vec![1001], "the last series alone");
    assert!(
        b[0].1.contains(&1) && b[0].1.contains(&1002),
        "m0's two records"
    );
    all.sort();
    assert_eq!(
        all,
        (1..=1002).collect::<Vec<i64>>(),
        "every record in exactly one request"
    );
}

#[test]
fn one_datum_exact_bytes() {
    let body::Folded {
        datums, rejected, ..
    } = fold(
        &ids(vec![point(
            "active users",
            &[("window", "30m"), ("gateway", "gw/1")],
            NOW - 60_000,
            42.0,
        )]),
        &[("env".into(), "prod & test".into())],
        NOW,
    );
    assert!(rejected.is_empty());
    assert_eq!(
        texts("Edge/Test", &datums),
        vec![
            "Action=PutMetricData&Version=2010-08-01&Namespace=Edge%2FTest\
             &MetricData.member.1.MetricName=active%20users\
             &MetricData.member.1.Dimensions.member.1.Name=env\
             &MetricData.member.1.Dimensions.member.1.Value=prod%20%26%20test\
             &MetricData.member.1.Dimensions.member.2.Name=gateway\
             &MetricData.member.1.Dimensions.member.2.Value=gw%2F1\
             &MetricData.member.1.Dimensions.member.3.Name=window\
             &MetricData.member.1.Dimensions.member.3.Value=30m\
             &MetricData.member.1.Timestamp=2026-11-24T02%3A49%3A51.000Z\
             &MetricData.member.1.Unit=Count\
             &MetricData.member.1.Value=42"
                .to_owned()
        ]
    );
}

#[test]
fn values_of_a_series_within_a_minute_fold_into_values_and_counts() {
    let m = NOW - NOW % 60_000;
    let body::Folded { datums, .. } = fold(
        &ids(vec![
            point("m", &[("s", "a")], m + 1_000, 1.0),
            point("m", &[("s", "a")], m + 2_000, 2.0),
            point("m", &[("s", "a")], m + 3_000, 1.0),
            point("m", &[("s", "b")], m + 3_000, 1.0), // another series
            point("m", &[("s", "a")], m + 61_000, 9.0), // the next minute
        ]),
        &[],
        NOW,
    );
    assert_eq!(datums.len(), 3);
    assert_eq!(datums[0].values, vec![(1.0, 2), (2.0, 1)]);
    assert_eq!(datums[0].ts_ms, m + 1_000);
    assert!(encode_datum(1, &datums[0]).ends_with(
        "&MetricData.member.1.Values.member.1=1&MetricData.member.1.Counts.member.1=2\
         &MetricData.member.1.Values.member.2=2&MetricData.member.1.Counts.member.2=1"
    ));
    // 151 distinct values of one series and minute need two datums.
    let many: Vec<Record> = (0..151).map(|i| point("m", &[], m, f64::from(i))).collect();
    let body::Folded { datums, .. } = fold(&ids(many), &[], NOW);
    assert_eq!(
        datums.iter().map(|d| d.values.len()).collect::<Vec<_>>(),
        vec![150, 1]
    );
}

#[test]
fn what_cloudwatch_refuses_is_not_sent_and_says_why() {
    let dims31: Vec<(String, String)> =
        (0..31).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let mut wide = point("m", &[], NOW, 1.0);
    wide.dims = Dims::new(dims31);
    let body::Folded {
        datums,
        rejected,
        skipped,
    } = fold(
        &ids(vec![
            point("m", &[], NOW - 15 * 86_400_000, 1.0),
            point("m", &[], NOW + 3 * 3_600_000, 1.0),
            point("m", &[], NOW, f64::NAN),
            point("m", &[], NOW, f64::INFINITY),
            wide,
            point("m", &[], NOW - 13 * 86_400_000, 7.0), // still fine
        ]),
        &[],
        NOW,
    );
    assert_eq!(datums.len(), 1);
    let reasons: Vec<&str> = rejected.iter().map(|(_, w)| w.as_str()).collect();
    assert_eq!(
        skipped,
        vec![(
            1,
            "older than 14 days (CloudWatch takes at most two weeks back)".to_owned()
        )],
        "too old: skipped, not a dead letter"
    );
    assert_eq!(
        reasons,
        vec![
            "more than 2 hours in the future",
            "value NaN is not a finite number",
            "value inf is not a finite number",
            "31 dimensions (at most 30)",
        ]
    );
    assert_eq!(
        rejected.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![2, 3, 4, 5]
    );
}

#[test]
fn requests_split_exactly_at_1000_datums() {
    let check = |n: usize, want: Vec<usize>| {
        let recs: Vec<Record> = (0..n)
            .map(|i| point(&format!("m{i}"), &[], NOW, 1.0))
            .collect();
        let body::Folded { datums, .. } = fold(&ids(recs), &[], NOW);
        let counts: Vec<usize> = texts("ns", &datums)
            .iter()
            .map(|b| b.matches(".MetricName=").count())
            .collect();
        assert_eq!(counts, want, "{n} datums");
    };
    check(0, vec![]);
    check(1, vec![1]);
    check(MAX_DATUMS, vec![1000]);
    check(MAX_DATUMS + 1, vec![1000, 1]);
    check(2 * MAX_DATUMS + 5, vec![1000, 1000, 5]);
    // Every body restarts member numbering at 1.
    let recs: Vec<Record> = (0..1001)
        .map(|i| point(&format!("m{i}"), &[], NOW, 1.0))
        .collect();
    let body::Folded { datums, .. } = fold(&ids(recs), &[], NOW);
    let b = texts("ns", &datums);
    assert!(b[1].contains("&MetricData.member.1.MetricName=m1000") && !b[1].contains("member.2."));
}

#[test]
fn requests_split_before_one_megabyte() {
    // Wide datums (30 dimensions of 1000 characters): about 60 KB each.
    let dims: Vec<(String, String)> = (0..30)
        .map(|i| (format!("k{i:02}"), "x".repeat(1000)))
        .collect();
    let recs: Vec<Record> = (0..40)
        .map(|i| {
            let mut r = point(&format!("m{i}"), &[], NOW, 1.0);
            r.dims = Dims::new(dims.clone());
            r
        })
        .collect();
    let body::Folded {
        datums, rejected, ..
    } = fold(&ids(recs), &[], NOW);
    assert!(rejected.is_empty());
    let b = texts("ns", &datums);
    assert!(b.len() >= 2, "{} bodies", b.len());
    assert!(
        b.iter().all(|x| x.len() <= MAX_BODY_BYTES),
        "{:?}",
        b.iter().map(String::len).collect::<Vec<_>>()
    );
    let total: usize = b.iter().map(|x| x.matches(".MetricName=").count()).sum();
    assert_eq!(total, 40, "no datum lost in the split");
    // Each body but the last was full: the next datum would not have fit.
    let one = encode_datum(99, &datums[0]).len();
    assert!(b[0].len() + one > MAX_BODY_BYTES);
}

#[test]
fn gzip_round_trips() {
    let body = "Action=PutMetricData&".repeat(500);
    let gz = gzip(body.as_bytes());
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
    assert!(gz.len() < body.len() / 10);
    let mut back = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut back)
        .expect("gunzip");
    assert_eq!(back, body);
}

#[test]
fn points_too_old_for_cloudwatch_are_the_one_kind_the_sink_skips() {
    // The sink splits fold's refusals on this reason: skipped and counted
    // under drops, where the others become dead letters.
    let body::Folded {
        rejected, skipped, ..
    } = fold(
        &ids(vec![
            point("m", &[], NOW - 15 * 86_400_000, 1.0),
            point("m", &[], NOW, f64::NAN),
        ]),
        &[],
        NOW,
    );
    assert_eq!(skipped.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1]);
    assert_eq!(rejected.iter().map(|r| r.0).collect::<Vec<_>>(), vec![2]);
}

#[test]
fn dimensions_cloudwatch_refuses_are_named_and_not_sent() {
    use super::body::dimension_problem;
    assert_eq!(dimension_problem("gateway", "gw-01"), None);
    assert_eq!(
        dimension_problem("a b", "x y"),
        None,
        "inner spaces are fine"
    );
    for (name, value, want) in [
        ("", "v", "dimension name `` must be 1 to 255 characters"),
        (
            "   ",
            "v",
            "dimension name `   ` must be at least one character that is not a space",
        ),
        (
            "gw",
            " ",
            "dimension `gw` value ` ` must be at least one character that is not a space",
        ),
        (
            "gw",
            "Zürich",
            "dimension `gw` value `Zürich` must be ASCII without control characters",
        ),
        (
            "g\tw",
            "v",
            "dimension name `g\\tw` must be ASCII without control characters",
        ),
        (":gw", "v", "dimension name `:gw` must not start with `:`"),
    ] {
        assert_eq!(
            dimension_problem(name, value).as_deref(),
            Some(want),
            "{name:?}={value:?}"
        );
    }
    let long = "x".repeat(1025);
    assert!(
        dimension_problem("gw", &long)
            .unwrap()
            .ends_with("must be 1 to 1024 characters")
    );
    // In a batch: the point with such a dimension is refused alone, with
    // the reason; the others are sent.
    let body::Folded {
        datums, rejected, ..
    } = fold(
        &ids(vec![
            point("m", &[("site", "Zürich")], NOW, 1.0),
            point("m", &[("site", "zurich")], NOW, 2.0),
        ]),
        &[],
        NOW,
    );
    assert_eq!(datums.len(), 1);
    assert_eq!(rejected.len(), 1);
    assert!(rejected[0].1.contains("ASCII"), "{rejected:?}");
}
