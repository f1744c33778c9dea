use std::time::{Duration, UNIX_EPOCH};

use super::credentials::Credentials;
use super::*;

/// The signatures botocore 1.44.5 (`SigV4Auth.add_auth`) computed for the
/// same request, credentials and time: an independent implementation.
#[test]
fn sigv4_matches_botocore() {
    let body = b"Action=PutMetricData&Version=2010-08-01&Namespace=Edge%2FTest&MetricData.member.1.MetricName=active_users&MetricData.member.1.Value=42";
    let headers = [
        (
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        ),
        ("content-encoding", "gzip"),
    ];
    // 2026-11-24T02:50:51Z, the X-Amz-Date botocore signed with.
    let time = UNIX_EPOCH + Duration::from_secs(1_795_488_651);
    let check = |token: Option<&str>, want: &str| {
        let creds = Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: token.map(str::to_owned),
        };
        let signed = sign(
            &creds,
            "us-east-1",
            "monitoring",
            time,
            "https://monitoring.us-east-1.amazonaws.com/",
            &headers,
            body,
        )
        .expect("sign");
        let get = |k: &str| {
            signed
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("x-amz-date"), Some("20261124T025051Z"));
        assert_eq!(get("authorization"), Some(want));
        assert_eq!(get("x-amz-security-token"), token);
    };
    check(
        None,
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261124/us-east-1/monitoring/aws4_request, \
         SignedHeaders=content-encoding;content-type;host;x-amz-date, \
         Signature=7717508da4499bd67d5c85e43d4fd720e3b024fd551aa2d0b7f7bd6e7896c500",
    );
    check(
        Some("SESSIONTOKEN/+="),
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261124/us-east-1/monitoring/aws4_request, \
         SignedHeaders=content-encoding;content-type;host;x-amz-date;x-amz-security-token, \
         Signature=ccdac52ff7ed3faaa88ddf5837fe77b37431f7774ef0a6287d1aab7efb6d0bc8",
    );
}

/// A host with a port (an emulator's endpoint), another service and region,
/// and a header whose value SigV4 trims and collapses: botocore 1.44.5 signed
/// it at the X-Amz-Date below.
#[test]
fn sigv4_matches_botocore_with_a_port_and_spaced_values() {
    let creds = Credentials {
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
        session_token: None,
    };
    let headers = [
        ("content-type", "application/x-amz-json-1.1"),
        ("x-amz-target", "Logs_20140328.PutLogEvents"),
        ("X-Edge-Note", "  two   spaces  "),
    ];
    let body = br#"{"logGroupName":"edge","logStreamName":"a1","logEvents":[]}"#;
    // 2026-11-24T10:37:35Z
    let time = UNIX_EPOCH + Duration::from_secs(1_795_516_655);
    let signed = sign(
        &creds,
        "eu-west-1",
        "logs",
        time,
        "http://127.0.0.1:5123/",
        &headers,
        body,
    )
    .expect("sign");
    assert_eq!(
        signed,
        vec![
            ("x-amz-date".to_owned(), "20261124T103735Z".to_owned()),
            (
                "authorization".to_owned(),
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261124/eu-west-1/logs/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-date;x-amz-target;x-edge-note, \
                 Signature=008c9c2a8d7ed93d5711a0a61d70f645134f2314ae1bf1236b1d232c32bbf96c"
                    .to_owned()
            ),
        ]
    );
    // Endpoints no request should go to are refused.
    for url in [
        "ftp://example.com/",
        "https:///",
        "https://user@example.com/",
    ] {
        let err = sign(&creds, "eu-west-1", "logs", time, url, &headers, body).unwrap_err();
        assert!(err.contains("cannot sign"), "{url}: {err}");
    }
    let twice = [("content-type", "a"), ("Content-Type", "b")];
    let err = sign(
        &creds,
        "eu-west-1",
        "logs",
        time,
        "https://example.com/",
        &twice,
        body,
    )
    .unwrap_err();
    assert!(err.contains("given twice"), "{err}");
}

/// Issue 14: endpoints with a path (a VPC endpoint behind a proxy), a query
/// or characters to escape were refused by the hand-written signer; the
/// aws-sigv4 crate signs them as botocore 1.44.8 does (these signatures are
/// botocore's, at the X-Amz-Date below).
#[test]
fn sigv4_matches_botocore_for_paths_queries_and_escapes() {
    let creds = Credentials {
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
        session_token: None,
    };
    let headers = [(
        "content-type",
        "application/x-www-form-urlencoded; charset=utf-8",
    )];
    let body = b"Action=PutMetricData&Version=2010-08-01";
    // 2026-11-24T10:37:35Z
    let time = UNIX_EPOCH + Duration::from_secs(1_795_516_655);
    for (url, signature) in [
        (
            "https://vpce-0a1b.monitoring.eu-west-1.vpce.amazonaws.com/edge/",
            "595091257d290a6360899de33d927e30f630c160c39b9d10cf1488d7e72a5811",
        ),
        (
            "http://127.0.0.1:4566/?x-id=PutMetricData&b=a%20b",
            "da554d82d5c59806db12ef853dff6b5bab10010556a528d3b13dde1a46a079ae",
        ),
        (
            "https://proxy.example/path%20with/escapes/",
            "555905d19b619312bf36e4b7aa054817e416d1639226c8b2b42f5e20288f18d8",
        ),
    ] {
        let signed = sign(&creds, "eu-west-1", "monitoring", time, url, &headers, body)
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(
            signed[1].1,
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261124/eu-west-1/monitoring/aws4_request, \
                 SignedHeaders=content-type;host;x-amz-date, Signature={signature}"
            ),
            "{url}"
        );
    }
}

#[test]
fn endpoints_become_urls_as_written() {
    for (endpoint, url) in [
        ("http://127.0.0.1:4566", "http://127.0.0.1:4566/"),
        ("http://127.0.0.1:4566/", "http://127.0.0.1:4566/"),
        ("https://proxy.example/edge/", "https://proxy.example/edge/"),
        (
            "https://proxy.example/edge?x=1",
            "https://proxy.example/edge/?x=1",
        ),
    ] {
        assert_eq!(endpoint_url(endpoint), url);
    }
}

#[test]
fn answers_are_classified() {
    let kind = |status, code: &str, msg: &str| match classify(status, code, msg) {
        Failure::Throttled(_) => "throttled",
        Failure::Transient(_) => "transient",
        Failure::Skewed(_) => "skewed",
        Failure::Unauthorized(_) => "unauthorized",
        Failure::Refused { .. } => "refused",
    };
    assert_eq!(kind(400, "Throttling", "Rate exceeded"), "throttled");
    assert_eq!(
        kind(400, "ThrottlingException", "Rate exceeded"),
        "throttled"
    );
    assert_eq!(kind(429, "", ""), "throttled");
    assert_eq!(kind(500, "InternalFailure", ""), "transient");
    assert_eq!(kind(503, "ServiceUnavailable", ""), "transient");
    assert_eq!(
        kind(400, "RequestExpired", "Request has expired."),
        "skewed"
    );
    assert_eq!(
        kind(
            403,
            "SignatureDoesNotMatch",
            "Signature expired: 20261124T000000Z is now earlier than ..."
        ),
        "skewed"
    );
    assert_eq!(
        kind(400, "InvalidSignatureException", "Signature expired: ..."),
        "skewed"
    );
    assert_eq!(
        kind(
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match"
        ),
        "unauthorized"
    );
    // Credential trouble is never the data's fault: retried, not refused.
    for code in [
        "AccessDenied",
        "AccessDeniedException",
        "ExpiredToken",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "MissingAuthenticationToken",
    ] {
        assert_eq!(kind(403, code, "not authorized"), "unauthorized", "{code}");
    }
    assert_eq!(kind(401, "", ""), "unauthorized");
    assert_eq!(kind(400, "InvalidParameterValue", "bad"), "refused");
    match classify(400, "InvalidParameterValue", "The value NaN is invalid") {
        Failure::Refused {
            status,
            code,
            message,
        } => {
            assert_eq!(
                (status, code.as_str(), message.as_str()),
                (400, "InvalidParameterValue", "The value NaN is invalid")
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn error_bodies_of_both_protocols() {
    let xml = br#"<ErrorResponse xmlns="http://monitoring.amazonaws.com/doc/2010-08-01/">
  <Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error>
  <RequestId>abc</RequestId></ErrorResponse>"#;
    assert_eq!(
        error_code(xml),
        ("Throttling".into(), "Rate exceeded".into())
    );
    let json = br#"{"__type":"com.amazonaws.logs#ResourceNotFoundException","message":"The specified log stream does not exist."}"#;
    assert_eq!(
        error_code(json),
        (
            "ResourceNotFoundException".into(),
            "The specified log stream does not exist.".into()
        )
    );
    assert_eq!(
        error_code(b"<html>oops</html>"),
        (String::new(), "<html>oops</html>".into())
    );
}

#[test]
fn the_skew_clock_signs_with_the_offset_it_learnt() {
    let clock = SkewClock::default();
    let an_hour_ahead = crate::clock::now_ms() + 3_600_000;
    let offset = clock.correct(an_hour_ahead);
    assert!((offset - 3_600_000).abs() < 1000, "{offset}");
    let seen = clock
        .now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64;
    assert!((seen - an_hour_ahead).abs() < 1000);
}
