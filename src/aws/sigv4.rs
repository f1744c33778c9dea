//! AWS Signature Version 4 for the one kind of request we sign: a POST of a
//! body to an endpoint's root. Written on ring's SHA-256 and HMAC, which the
//! TLS stack carries anyway, instead of the aws-sigv4 crate and its ~50
//! crates (half a megabyte of the Pi binaries). The unit tests check it
//! against signatures botocore computed.

use std::time::{SystemTime, UNIX_EPOCH};

use ring::{digest, hmac};

use super::credentials::Credentials;
use crate::clock;

/// The headers to add to the request (`x-amz-date`, `authorization`, and
/// `x-amz-security-token` with temporary credentials). `headers` are the
/// request's own, all signed; `host` comes from `url`, as the HTTP client
/// sends it.
pub fn sign(
    creds: &Credentials,
    region: &str,
    service: &str,
    time: SystemTime,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Vec<(String, String)>, String> {
    let (host, path) = host_and_path(url)
        .map_err(|why| format!("cannot sign a request to `{url}`: the endpoint {why}"))?;
    let ms = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "the clock is before 1970".to_owned())?
        .as_millis() as i64;
    let amz_date = clock::iso8601_basic(ms);
    let date = &amz_date[..8];

    let mut signed: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), canonical_value(v)))
        .collect();
    signed.push(("host".into(), host.to_owned()));
    signed.push(("x-amz-date".into(), amz_date.clone()));
    if let Some(token) = &creds.session_token {
        signed.push(("x-amz-security-token".into(), canonical_value(token)));
    }
    signed.sort();
    if let Some(w) = signed.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(format!("header `{}` given twice", w[0].0));
    }
    let names = signed
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");

    let mut canonical = format!("POST\n{path}\n\n");
    for (k, v) in &signed {
        canonical.push_str(k);
        canonical.push(':');
        canonical.push_str(v);
        canonical.push('\n');
    }
    canonical.push('\n');
    canonical.push_str(&names);
    canonical.push('\n');
    canonical.push_str(&hex(digest::digest(&digest::SHA256, body).as_ref()));

    let scope = format!("{date}/{region}/{service}/aws4_request");
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(digest::digest(&digest::SHA256, canonical.as_bytes()).as_ref())
    );
    let mut key = hmac_sha256(
        format!("AWS4{}", creds.secret_access_key).as_bytes(),
        date.as_bytes(),
    );
    for part in [region, service, "aws4_request"] {
        key = hmac_sha256(&key, part.as_bytes());
    }
    let signature = hex(&hmac_sha256(&key, to_sign.as_bytes()));

    let mut out = vec![
        ("x-amz-date".to_owned(), amz_date),
        (
            "authorization".to_owned(),
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={names}, Signature={signature}",
                creds.access_key_id
            ),
        ),
    ];
    if let Some(token) = &creds.session_token {
        out.push(("x-amz-security-token".to_owned(), token.clone()));
    }
    Ok(out)
}

/// `host[:port]` as written in the URL (what the HTTP client sends as
/// `Host`), and the path, which must need no percent-encoding (ours are `/`).
/// The error completes "endpoint …".
pub(super) fn host_and_path(url: &str) -> Result<(&str, &str), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("must be an http:// or https:// URL")?;
    let (host, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    let plain = |c: char| c.is_ascii_alphanumeric() || "-._~/".contains(c);
    if host.is_empty() || host.contains('@') || !path.chars().all(plain) {
        return Err(
            "must be http(s)://host[:port], with no user, query or characters to escape".into(),
        );
    }
    Ok((host, path))
}

/// SigV4's header value: trimmed, runs of spaces made one.
fn canonical_value(v: &str) -> String {
    v.split_ascii_whitespace().collect::<Vec<_>>().join(" ")
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
        .as_ref()
        .to_vec()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}
