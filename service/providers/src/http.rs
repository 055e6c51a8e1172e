//! The HTTP provider: outbound requests through reqwest, allowed only to the hosts the capability names.
//!
//! Every request needs `http:request` plus an `http:domain:<host>` (or `*.<parent>`) matching the host of the
//! parsed URL, so userinfo (`http://allowed@evil`), ports, case, a trailing dot or an IP literal cannot
//! disguise where it goes. Redirects are followed here, not by reqwest, and each hop is checked the same way.
//! A `Host` header is refused: it would let a guest pick a virtual host behind an allowed address. Responses
//! are capped in size and every request in time.

use std::time::Duration;

use async_trait::async_trait;
use factum_proto::permissions::http_host_allowed;
use factum_proto::{
    CapabilityInvocation, CapabilityResponse, ErrorCode, ErrorResponse, HttpRequest, HttpResponse, Permission,
    ProviderType,
};

use crate::{Lifecycle, Provider, ProviderMetadata};

/// Limits of the HTTP provider.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Deadline of one request, redirects included.
    pub timeout: Duration,
    /// Largest response body; a larger one is RESOURCE_EXHAUSTED.
    pub max_response_bytes: usize,
    /// Most redirects followed.
    pub max_redirects: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits { timeout: Duration::from_secs(10), max_response_bytes: 1024 * 1024, max_redirects: 5 }
    }
}

/// Outbound HTTP for instances.
pub struct HttpProvider {
    client: reqwest::Client,
    limits: HttpLimits,
    lifecycle: Lifecycle,
}

impl HttpProvider {
    /// A running provider with `limits`.
    pub fn new(limits: HttpLimits) -> Result<Self, ErrorResponse> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(limits.timeout)
            .build()
            .map_err(|e| ErrorResponse::internal(format!("cannot build the HTTP client: {e}")))?;
        Ok(HttpProvider { client, limits, lifecycle: Lifecycle::new() })
    }

    async fn execute(
        &self,
        invocation: &CapabilityInvocation,
        granted: &[Permission],
        request: HttpRequest,
    ) -> Result<HttpResponse, ErrorResponse> {
        let mut method = reqwest::Method::from_bytes(request.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| ErrorResponse::invalid(format!("bad HTTP method {:?}", request.method)))?;
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in &request.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ErrorResponse::invalid(format!("bad header name {name:?}")))?;
            if name == reqwest::header::HOST {
                return Err(ErrorResponse::invalid("the Host header is set from the URL and cannot be given"));
            }
            let value = reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| ErrorResponse::invalid(format!("bad value for header {name}")))?;
            headers.append(name, value);
        }
        let mut url = reqwest::Url::parse(&request.url)
            .map_err(|e| ErrorResponse::invalid(format!("bad URL {:?}: {e}", request.url)))?;
        let mut body = request.body;
        for _hop in 0..=self.limits.max_redirects {
            check_url(invocation, granted, &url)?;
            let response = self
                .client
                .request(method.clone(), url.clone())
                .headers(headers.clone())
                .body(body.clone())
                .timeout(self.limits.timeout)
                .send()
                .await
                .map_err(|e| upstream(&url, &e))?;
            let status = response.status();
            let location = response.headers().get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok());
            if let (true, Some(location)) = (status.is_redirection(), location) {
                url = url.join(location).map_err(|e| {
                    ErrorResponse::new(ErrorCode::CommunicationFailure, format!("bad redirect to {location:?}: {e}"))
                })?;
                // 303, and 301/302 after anything but GET/HEAD, continue as a GET without a body.
                let keep_method = matches!(status.as_u16(), 307 | 308)
                    || (matches!(status.as_u16(), 301 | 302)
                        && matches!(method, reqwest::Method::GET | reqwest::Method::HEAD));
                if !keep_method {
                    method = reqwest::Method::GET;
                    body = Vec::new();
                }
                continue;
            }
            return self.read(url, response).await;
        }
        Err(ErrorResponse::new(
            ErrorCode::CommunicationFailure,
            format!("more than {} redirects", self.limits.max_redirects),
        ))
    }

    async fn read(&self, url: reqwest::Url, mut response: reqwest::Response) -> Result<HttpResponse, ErrorResponse> {
        let max = self.limits.max_response_bytes;
        let too_big = || {
            ErrorResponse::new(ErrorCode::ResourceExhausted, format!("response from {url} is larger than {max} bytes"))
        };
        if response.content_length().is_some_and(|n| n > max as u64) {
            return Err(too_big());
        }
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.to_string(), v.to_string())))
            .collect();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| upstream(&url, &e))? {
            if body.len() + chunk.len() > max {
                return Err(too_big());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HttpResponse { status, headers, body })
    }
}

fn check_url(
    invocation: &CapabilityInvocation,
    granted: &[Permission],
    url: &reqwest::Url,
) -> Result<(), ErrorResponse> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ErrorResponse::invalid(format!("only http and https URLs are allowed, not {}", url.scheme())));
    }
    if !granted.contains(&Permission::HttpRequest) {
        return Err(ErrorResponse::permission_denied(format!(
            "instance {} lacks http:request on capability {}",
            invocation.instance_id, invocation.capability_id
        ))
        .with_detail("permission", "http:request"));
    }
    let host = url.host_str().unwrap_or_default();
    if !http_host_allowed(granted, host) {
        return Err(ErrorResponse::permission_denied(format!(
            "instance {} may not reach host {host:?} through capability {}",
            invocation.instance_id, invocation.capability_id
        ))
        .with_detail("permission", format!("http:domain:{host}")));
    }
    Ok(())
}

fn upstream(url: &reqwest::Url, e: &reqwest::Error) -> ErrorResponse {
    let what = if e.is_timeout() { "timed out" } else { "failed" };
    ErrorResponse::new(ErrorCode::CommunicationFailure, format!("request to {url} {what}: {e}"))
}

#[async_trait]
impl Provider for HttpProvider {
    fn metadata(&self) -> ProviderMetadata {
        ProviderMetadata {
            provider_type: ProviderType::Http,
            name: "http-reqwest".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            operations: vec!["request".into()],
        }
    }

    fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    async fn handle(&self, invocation: &CapabilityInvocation, granted: &[Permission]) -> CapabilityResponse {
        let request = match HttpRequest::decode(&invocation.operation, &invocation.params) {
            Ok(request) => request,
            Err(e) => return CapabilityResponse::err(&e),
        };
        match self.execute(invocation, granted, request).await {
            Ok(response) => CapabilityResponse::ok(&response),
            Err(e) => CapabilityResponse::err(&e),
        }
    }
}
