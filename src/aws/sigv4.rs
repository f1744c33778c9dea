//! AWS Signature Version 4 by the `aws-sigv4` crate (the owner's choice of
//! package): this module only adapts our credentials and headers to it, and
//! refuses endpoints no request should go to (not http(s), no host, or a
//! user in the URL, where a secret would sit). Paths, queries and
//! characters to escape are the crate's to canonicalise. The unit tests
//! check it against signatures botocore computed.

use std::time::SystemTime;

use aws_credential_types::Credentials as AwsCredentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;

use super::credentials::Credentials;

/// The headers to add to the request (`x-amz-date`, `authorization`, and
/// `x-amz-security-token` with temporary credentials), in that order.
/// `headers` are the request's own, all signed; `host` comes from `url`, as
/// the HTTP client sends it.
pub fn sign(
    creds: &Credentials,
    region: &str,
    service: &str,
    time: SystemTime,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Vec<(String, String)>, String> {
    check_endpoint(url)
        .map_err(|why| format!("cannot sign a request to `{url}`: the endpoint {why}"))?;
    let mut names: Vec<String> = headers
        .iter()
        .map(|(k, _)| k.to_ascii_lowercase())
        .collect();
    names.sort();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("header `{}` given twice", w[0]));
    }
    let identity: Identity = AwsCredentials::new(
        &creds.access_key_id,
        &creds.secret_access_key,
        creds.session_token.clone(),
        None,
        "edgemeter",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("signing parameters: {e}"))?
        .into();
    let signable = SignableRequest::new(
        "POST",
        url,
        headers.iter().copied(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| format!("cannot sign a request to `{url}`: {e}"))?;
    let (instructions, _) = aws_sigv4::http_request::sign(signable, &params)
        .map_err(|e| format!("cannot sign a request to `{url}`: {e}"))?
        .into_parts();
    let got: Vec<(&str, &str)> = instructions.headers().collect();
    let mut out = Vec::with_capacity(3);
    for name in ["x-amz-date", "authorization", "x-amz-security-token"] {
        if let Some((_, v)) = got.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)) {
            out.push((name.to_owned(), (*v).to_owned()));
        }
    }
    Ok(out)
}

/// Whether `url` is an endpoint we send to: http(s), a host, no user.
/// The error completes "endpoint …".
pub(super) fn check_endpoint(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("must be an http:// or https:// URL")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() {
        return Err("names no host".into());
    }
    if authority.contains('@') {
        return Err("must not hold a user (credentials come from files, never URLs)".into());
    }
    Ok(())
}
