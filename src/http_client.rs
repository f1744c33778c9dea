//! The HTTP client policy every outgoing request shares (the upstream
//! sink, the AWS sinks, `edgemeter report --url`): which roots are trusted
//! (`ca_file`, else the system's bundle, else the bundled web roots), the
//! timeout, the user agent, and gzip for bodies. A leaf.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Debian's bundle of the system's trusted roots.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The HTTP client, with the roots the config asks for. Errors name the
/// CA file and why it cannot be used.
pub fn agent(ca_file: Option<&Path>, timeout: Duration) -> Result<ureq::Agent, String> {
    use ureq::tls::{RootCerts, TlsConfig};
    let pem_roots = |path: &Path| -> Result<RootCerts, String> {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
        let certs: Vec<_> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(format!(
                "the CA file {} holds no PEM certificate",
                path.display()
            ));
        }
        Ok(RootCerts::new_with_certs(&certs))
    };
    let roots = match ca_file {
        Some(path) => pem_roots(path)?,
        None if Path::new(SYSTEM_CA_BUNDLE).exists() => pem_roots(Path::new(SYSTEM_CA_BUNDLE))?,
        None => RootCerts::WebPki,
    };
    Ok(ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .user_agent(concat!("edgemeter/", env!("CARGO_PKG_VERSION")))
        .tls_config(TlsConfig::builder().root_certs(roots).build())
        .build()
        .into())
}

/// The proxy the environment sends requests to `url` through, as ureq
/// reads it (`ALL_PROXY`, `HTTPS_PROXY`, `HTTP_PROXY`, then `NO_PROXY`):
/// `HTTP proxy host:port`, never its credentials. Requests go through it
/// whatever is said; this is for saying so.
pub fn proxy_for(url: &str) -> Option<String> {
    let proxy = ureq::Proxy::try_from_env()?;
    let uri: ureq::http::Uri = url.parse().ok()?;
    (!proxy.is_no_proxy(&uri)).then(|| {
        format!(
            "{} proxy {}:{}",
            proxy.protocol(),
            proxy.host(),
            proxy.port()
        )
    })
}

/// ` through the HTTP proxy host:port`, or nothing: what an error about a
/// request to `url` adds, so that a refused proxy is not read as a refused
/// receiver.
pub fn through(url: &str) -> String {
    proxy_for(url).map_or_else(String::new, |p| format!(" through the {p}"))
}

/// A body gzipped at the default level.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 4),
        flate2::Compression::default(),
    );
    enc.write_all(data).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}
