//! The HTTP provider: outbound requests through an [`HttpTransport`] (reqwest by default), allowed only to the
//! hosts the capability names.
//!
//! Every request needs `http:request` plus an `http:domain:<host>` (or `*.<parent>`) matching the host of the
//! parsed URL, so userinfo (`http://allowed@evil`), ports, case, a trailing dot or an IP literal cannot
//! disguise where it goes. Redirects are followed here, not by reqwest, and each hop is checked the same way.
//! A `Host` header is refused: it would let a guest pick a virtual host behind an allowed address. Responses
//! are capped in size, every request (redirects included) in time, and requests in flight in number.
//!
//! Names are not enough against server-side request forgery: an allowed name may resolve to loopback, a
//! private network or the cloud metadata service. An IP literal is checked here, and a transport on a real
//! network checks every address a name resolves to and connects only to a checked one ([`address`]); internal
//! addresses need a grant naming the address itself. Credentials (`Authorization`, `Cookie`) are not carried
//! across a redirect to another origin.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use factum_env::Clock;
use factum_proto::permissions::http_host_allowed;
use factum_proto::{
    CapabilityInvocation, CapabilityResponse, ErrorCode, ErrorResponse, HttpRequest, HttpResponse, Permission,
    ProviderType,
};

use crate::{Lifecycle, Provider, ProviderMetadata};

pub mod address;
mod reqwest_transport;

pub use reqwest_transport::ReqwestTransport;

/// Limits of the HTTP provider.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Deadline of one request, redirects included.
    pub timeout: Duration,
    /// Largest response body; a larger one is RESOURCE_EXHAUSTED.
    pub max_response_bytes: usize,
    /// Most redirects followed.
    pub max_redirects: usize,
    /// Most requests in flight at once on this provider (every instance of the node together); more is
    /// RESOURCE_EXHAUSTED at once rather than a queue that grows.
    pub max_in_flight: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            timeout: Duration::from_secs(10),
            max_response_bytes: 1024 * 1024,
            max_redirects: 5,
            max_in_flight: 64,
        }
    }
}

/// One request on one hop. Redirects are the provider's business: a transport never follows them, so every
/// hop's destination is checked against the grant before it is sent.
#[derive(Debug, Clone)]
pub struct Hop {
    /// Method.
    pub method: reqwest::Method,
    /// Absolute URL, already checked against the grant.
    pub url: reqwest::Url,
    /// Request headers (never `Host`: the transport sets it from the URL).
    pub headers: reqwest::header::HeaderMap,
    /// Request body.
    pub body: Vec<u8>,
    /// What the capability grants: a transport that resolves names checks each address against it
    /// ([`address::check_address`]).
    pub granted: Arc<[Permission]>,
}

/// The answer to one hop, its body read in full (within the provider's cap).
#[derive(Debug, Clone)]
pub struct HopResponse {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    /// Body.
    pub body: Vec<u8>,
}

/// Where HTTP requests go out: reqwest on the real network ([`ReqwestTransport`]), or the simulated network in
/// the simulator. The allowlist, redirects and limits stay in [`HttpProvider`], whatever the transport.
#[async_trait]
pub trait HttpTransport: Send + Sync + 'static {
    /// Implementation name, reported as the provider's name.
    fn name(&self) -> &'static str;
    /// Sends `hop` and reads its answer within `timeout`. A body longer than `max_body` bytes is
    /// RESOURCE_EXHAUSTED; a failed or late exchange COMMUNICATION_FAILURE. A transport on a real network
    /// resolves the host itself, refuses (PERMISSION_DENIED) every address [`address::check_address`]
    /// refuses, and connects only to an address it checked.
    async fn send(&self, hop: Hop, max_body: usize, timeout: Duration) -> Result<HopResponse, ErrorResponse>;
}

/// A deliberate bug, for proving that the simulator catches it. Only the `injected-bugs` feature, which the
/// simulator turns on and the `factum` binary does not, can put one into a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpBug {
    /// Only the first hop's host is checked: a redirect may lead anywhere (breaks P4's allowlist).
    UncheckedRedirects,
    /// After one failed exchange every later request fails at once, as a circuit breaker that never closes
    /// (breaks HTTP liveness).
    LatchedFailure,
}

/// Outbound HTTP for instances.
pub struct HttpProvider {
    transport: Arc<dyn HttpTransport>,
    clock: Arc<dyn Clock>,
    limits: HttpLimits,
    in_flight: AtomicUsize,
    lifecycle: Lifecycle,
    #[cfg(feature = "injected-bugs")]
    bug: Option<HttpBug>,
    /// Set by [`HttpBug::LatchedFailure`] only.
    failed: std::sync::atomic::AtomicBool,
}

impl HttpProvider {
    /// A running provider with `limits`, on reqwest and tokio's clock.
    pub fn new(limits: HttpLimits) -> Result<Self, ErrorResponse> {
        let transport = Arc::new(ReqwestTransport::new(limits.timeout)?);
        Ok(Self::with_transport(limits, transport, Arc::new(factum_env::TokioClock::new())))
    }

    /// A running provider with `limits`, sending through `transport`, timing requests on `clock`.
    pub fn with_transport(limits: HttpLimits, transport: Arc<dyn HttpTransport>, clock: Arc<dyn Clock>) -> Self {
        HttpProvider {
            transport,
            clock,
            limits,
            in_flight: AtomicUsize::new(0),
            lifecycle: Lifecycle::new(),
            #[cfg(feature = "injected-bugs")]
            bug: None,
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// This provider with `bug` in it.
    #[cfg(feature = "injected-bugs")]
    pub fn with_injected_bug(mut self, bug: HttpBug) -> Self {
        self.bug = Some(bug);
        self
    }

    #[cfg(feature = "injected-bugs")]
    fn has_bug(&self, bug: HttpBug) -> bool {
        self.bug == Some(bug)
    }

    #[cfg(not(feature = "injected-bugs"))]
    fn has_bug(&self, _bug: HttpBug) -> bool {
        false
    }

    async fn execute(
        &self,
        invocation: &CapabilityInvocation,
        granted: &[Permission],
        request: HttpRequest,
    ) -> Result<HttpResponse, ErrorResponse> {
        if self.has_bug(HttpBug::LatchedFailure) && self.failed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ErrorResponse::new(ErrorCode::CommunicationFailure, "an earlier request failed"));
        }
        let in_flight = self.in_flight.fetch_add(1, Ordering::SeqCst);
        let _slot = InFlight(&self.in_flight);
        if in_flight >= self.limits.max_in_flight {
            return Err(ErrorResponse::new(
                ErrorCode::ResourceExhausted,
                format!("{} HTTP requests are in flight on this node already", self.limits.max_in_flight),
            ));
        }
        let result = self.follow(invocation, granted, request).await;
        if self.has_bug(HttpBug::LatchedFailure)
            && result.as_ref().is_err_and(|e| e.error_code == ErrorCode::CommunicationFailure)
        {
            self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        result
    }

    async fn follow(
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
        let granted: Arc<[Permission]> = granted.into();
        let deadline = self.clock.now() + self.limits.timeout;
        for hop in 0..=self.limits.max_redirects {
            if hop == 0 || !self.has_bug(HttpBug::UncheckedRedirects) {
                check_url(invocation, &granted, &url)?;
            }
            // One deadline for the whole request: each hop gets what is left of it.
            let left = deadline.saturating_sub(self.clock.now());
            if left.is_zero() {
                return Err(ErrorResponse::new(
                    ErrorCode::CommunicationFailure,
                    format!("request timed out after {hop} redirects ({:?} in all)", self.limits.timeout),
                ));
            }
            let next = Hop {
                method: method.clone(),
                url: url.clone(),
                headers: headers.clone(),
                body: body.clone(),
                granted: granted.clone(),
            };
            let response = self.transport.send(next, self.limits.max_response_bytes, left).await?;
            let status = reqwest::StatusCode::from_u16(response.status).unwrap_or(reqwest::StatusCode::OK);
            let location = response.headers.get(reqwest::header::LOCATION).and_then(|l| l.to_str().ok());
            if let (true, Some(location)) = (status.is_redirection(), location) {
                let next = url.join(location).map_err(|e| {
                    ErrorResponse::new(ErrorCode::CommunicationFailure, format!("bad redirect to {location:?}: {e}"))
                })?;
                if next.origin() != url.origin() {
                    // What the guest meant for one origin is not sent to another (as browsers and curl do).
                    for name in
                        [reqwest::header::AUTHORIZATION, reqwest::header::COOKIE, reqwest::header::PROXY_AUTHORIZATION]
                    {
                        headers.remove(name);
                    }
                }
                url = next;
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
            let headers = response
                .headers
                .iter()
                .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.to_string(), v.to_string())))
                .collect();
            return Ok(HttpResponse { status: response.status, headers, body: response.body });
        }
        Err(ErrorResponse::new(
            ErrorCode::CommunicationFailure,
            format!("more than {} redirects", self.limits.max_redirects),
        ))
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
    // The URL parser has normalised IP literals (`2130706433` is `127.0.0.1`; IPv6 is in brackets).
    match host.trim_start_matches('[').trim_end_matches(']').parse::<core::net::IpAddr>() {
        Ok(ip) => address::check_address(granted, host, ip),
        Err(_) => Ok(()),
    }
}

/// Gives back a slot of [`HttpProvider::in_flight`] when its request ends, however it ends.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Provider for HttpProvider {
    fn metadata(&self) -> ProviderMetadata {
        ProviderMetadata {
            provider_type: ProviderType::Http,
            name: self.transport.name().into(),
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
