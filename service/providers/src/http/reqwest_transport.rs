//! The production HTTP transport: reqwest on the real network, redirects off (the provider follows them), no
//! proxy from the environment (a proxy would dial addresses no one checked). A name is resolved here, every
//! address checked ([`super::address`]), and the connection pinned to the checked addresses, so DNS cannot
//! answer differently between the check and the connect.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use factum_proto::{ErrorCode, ErrorResponse};

use super::address::check_address;
use super::{Hop, HopResponse, HttpTransport};

/// Sends hops to IP literals with one shared reqwest client, and hops to names with a client pinned to the
/// addresses checked for that hop.
pub struct ReqwestTransport {
    client: reqwest::Client,
    connect_timeout: Duration,
}

fn builder(connect_timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).no_proxy().connect_timeout(connect_timeout)
}

fn build(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, ErrorResponse> {
    builder.build().map_err(|e| ErrorResponse::internal(format!("cannot build the HTTP client: {e}")))
}

impl ReqwestTransport {
    /// A client that never follows redirects, connecting within `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Result<Self, ErrorResponse> {
        Ok(ReqwestTransport { client: build(builder(connect_timeout))?, connect_timeout })
    }

    /// The client for `hop`: the shared one for an IP literal (the provider checked it), else one that
    /// connects only to the addresses `host` resolved to now, each checked against the grant.
    async fn client_for(&self, hop: &Hop, timeout: Duration) -> Result<reqwest::Client, ErrorResponse> {
        let host = hop.url.host_str().unwrap_or_default();
        if host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok() {
            return Ok(self.client.clone());
        }
        let port = hop.url.port_or_known_default().unwrap_or(80);
        let lookup = tokio::net::lookup_host((host, port));
        let resolved = match tokio::time::timeout(timeout, lookup).await {
            Ok(Ok(addrs)) => addrs.collect::<Vec<SocketAddr>>(),
            Ok(Err(e)) => return Err(unreachable_host(host, &e.to_string())),
            Err(_) => return Err(unreachable_host(host, "name lookup timed out")),
        };
        let mut allowed = Vec::new();
        let mut refusal = None;
        for addr in resolved {
            match check_address(&hop.granted, host, addr.ip()) {
                Ok(()) => allowed.push(addr),
                Err(e) => refusal = refusal.or(Some(e)),
            }
        }
        if allowed.is_empty() {
            return Err(refusal.unwrap_or_else(|| unreachable_host(host, "no addresses")));
        }
        build(builder(self.connect_timeout.min(timeout)).resolve_to_addrs(host, &allowed))
    }
}

fn unreachable_host(host: &str, why: &str) -> ErrorResponse {
    ErrorResponse::new(ErrorCode::CommunicationFailure, format!("cannot resolve {host}: {why}"))
}

#[async_trait]
impl HttpTransport for ReqwestTransport {
    fn name(&self) -> &'static str {
        "http-reqwest"
    }

    async fn send(&self, hop: Hop, max_body: usize, timeout: Duration) -> Result<HopResponse, ErrorResponse> {
        let url = hop.url.clone();
        let client = self.client_for(&hop, timeout).await?;
        let mut response = client
            .request(hop.method, hop.url)
            .headers(hop.headers)
            .body(hop.body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| upstream(&url, &e))?;
        let too_big = || {
            ErrorResponse::new(
                ErrorCode::ResourceExhausted,
                format!("response from {url} is larger than {max_body} bytes"),
            )
        };
        if response.content_length().is_some_and(|n| n > max_body as u64) {
            return Err(too_big());
        }
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| upstream(&url, &e))? {
            if body.len() + chunk.len() > max_body {
                return Err(too_big());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HopResponse { status, headers, body })
    }
}

fn upstream(url: &reqwest::Url, e: &reqwest::Error) -> ErrorResponse {
    let what = if e.is_timeout() { "timed out" } else { "failed" };
    ErrorResponse::new(ErrorCode::CommunicationFailure, format!("request to {url} {what}: {e}"))
}
