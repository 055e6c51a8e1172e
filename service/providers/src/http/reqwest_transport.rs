//! The production HTTP transport: reqwest on the real network, redirects off (the provider follows them).

use std::time::Duration;

use async_trait::async_trait;
use factum_proto::{ErrorCode, ErrorResponse};

use super::{Hop, HopResponse, HttpTransport};

/// Sends hops with one shared reqwest client.
pub struct ReqwestTransport {
    client: reqwest::Client,
}

impl ReqwestTransport {
    /// A client that never follows redirects, connecting within `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Result<Self, ErrorResponse> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout)
            .build()
            .map_err(|e| ErrorResponse::internal(format!("cannot build the HTTP client: {e}")))?;
        Ok(ReqwestTransport { client })
    }
}

#[async_trait]
impl HttpTransport for ReqwestTransport {
    fn name(&self) -> &'static str {
        "http-reqwest"
    }

    async fn send(&self, hop: Hop, max_body: usize, timeout: Duration) -> Result<HopResponse, ErrorResponse> {
        let url = hop.url.clone();
        let mut response = self
            .client
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
