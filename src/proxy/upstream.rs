//! The upstream: its base URL and the pooled client (rustls for https, HTTP/2 by ALPN).

use super::body::RequestBody;
use anyhow::Context as _;
use http::uri::{Authority, Scheme};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::path::Path;
use std::time::Duration;

/// The parsed `--upstream` base URL.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port.
    pub authority: Authority,
    /// Path prefix without a trailing `/` (usually empty).
    pub base_path: String,
    /// As given, for messages.
    pub display: String,
}

impl Upstream {
    /// Parse a base URL such as `https://generativelanguage.googleapis.com`.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("--upstream {url:?} is not a URL"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .with_context(|| format!("--upstream {url:?} needs a scheme (http:// or https://)"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            anyhow::bail!("--upstream {url:?}: scheme must be http or https");
        }
        let authority = uri
            .authority()
            .cloned()
            .with_context(|| format!("--upstream {url:?} needs a host"))?;
        Ok(Self {
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_string(),
            display: url.trim_end_matches('/').to_string(),
        })
    }

    /// The upstream URI for a forwarded path and query.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<http::Uri, http::Error> {
        let mut pq = String::with_capacity(
            self.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        pq.push_str(&self.base_path);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        http::Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

/// The pooled upstream client.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

/// Build the client: webpki roots plus `extra_ca` (PEM), TCP_NODELAY, keep-alive pool.
pub fn client(
    extra_ca: Option<&Path>,
    connect_timeout: Duration,
) -> anyhow::Result<UpstreamClient> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .with_context(|| format!("--upstream-ca {}: cannot read the file", path.display()))?;
        let mut n = 0;
        for cert in certs {
            let cert = cert.with_context(|| {
                format!("--upstream-ca {}: not a PEM certificate", path.display())
            })?;
            roots.add(cert).with_context(|| {
                format!("--upstream-ca {}: certificate rejected", path.display())
            })?;
            n += 1;
        }
        if n == 0 {
            anyhow::bail!(
                "--upstream-ca {}: no certificate found in the file",
                path.display()
            );
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(https))
}
