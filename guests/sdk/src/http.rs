//! Outbound HTTP (`http:request` plus an `http:domain:<host>` for the URL's host, checked on every redirect).

use serde::{Deserialize, Serialize};

use crate::{call, Result};

/// A request.
#[derive(Debug, Clone, Serialize)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// Absolute `http://` or `https://` URL.
    pub url: String,
    /// Headers, in order (`Host` is refused).
    pub headers: Vec<(String, String)>,
    /// Body.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// A response.
#[derive(Debug, Clone, Deserialize)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// Body (the host caps its size).
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// Sends `request` through `capability`.
pub fn request(capability: &str, request: &Request) -> Result<Response> {
    call(capability, "request", request)
}

/// `GET url` through `capability`.
pub fn get(capability: &str, url: &str) -> Result<Response> {
    request(capability, &Request { method: "GET".into(), url: url.into(), headers: Vec::new(), body: Vec::new() })
}
