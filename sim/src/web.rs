//! HTTP in the simulation: web servers on hosts of their own, and the transport that takes the HTTP provider's
//! requests there over the simulated network (hyper on turmoil's TCP). The provider's allowlist, redirects
//! and limits are the production code; only the wire is simulated.
//!
//! Host [`WEB`] is the service instances are granted: `/hello` answers, `/away` redirects to [`INTRANET`].
//! Host [`INTRANET`] stands for what no grant reaches (a metadata service, the agent's own ports): every
//! request a web host serves is traced (`served <method> <path>`), so the always-on monitor can check that
//! nothing reached a host no grant ever named.

use std::convert::Infallible;
use std::time::Duration;

use async_trait::async_trait;
use factum_env::{Env, Listener};
use factum_proto::{ErrorCode, ErrorResponse};
use factum_providers::{Hop, HopResponse, HttpTransport};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// The web host instances may be granted.
pub const WEB: &str = "web";
/// The host no grant names; reaching it breaks the allowlist.
pub const INTRANET: &str = "intranet";
/// Port both web hosts listen on.
pub const HTTP_PORT: u16 = 80;
/// Trace event of a request a web host served.
pub const SERVED: &str = "served";

/// Serves HTTP on `listener` until it fails, tracing every request on `env`.
pub async fn serve(env: Env, listener: Box<dyn Listener>) {
    loop {
        let Ok((stream, _peer)) = listener.accept().await else { return };
        let traced = env.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let (method, path) = (request.method().clone(), request.uri().path().to_string());
            traced.trace(|| format!("{SERVED} {method} {path}"));
            std::future::ready(Ok::<_, Infallible>(answer(&path)))
        });
        env.spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn answer(path: &str) -> hyper::Response<Full<Bytes>> {
    let mut response = hyper::Response::new(Full::new(Bytes::from_static(b"hello")));
    if path == "/away" {
        *response.status_mut() = hyper::StatusCode::FOUND;
        *response.body_mut() = Full::new(Bytes::new());
        let location = hyper::header::HeaderValue::from_static("http://intranet/secret");
        response.headers_mut().insert(hyper::header::LOCATION, location);
    }
    response
}

/// The HTTP provider's transport in the simulation: one connection per hop, over the env's network.
pub struct SimHttp {
    env: Env,
}

impl SimHttp {
    /// A transport dialing from the host of `env`.
    pub fn new(env: Env) -> Self {
        SimHttp { env }
    }

    async fn exchange(&self, hop: Hop, max_body: usize) -> Result<HopResponse, String> {
        let host = hop.url.host_str().ok_or("no host")?.to_string();
        let port = hop.url.port_or_known_default().unwrap_or(HTTP_PORT);
        let stream = self.env.net.connect(&format!("{host}:{port}")).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        self.env.spawn(async move {
            let _ = connection.await;
        });
        let target = match hop.url.query() {
            Some(query) => format!("{}?{query}", hop.url.path()),
            None => hop.url.path().to_string(),
        };
        let mut request = hyper::Request::builder().method(hop.method).uri(target);
        for (name, value) in &hop.headers {
            request = request.header(name, value);
        }
        let request = request
            .header(hyper::header::HOST, host)
            .body(Full::new(Bytes::from(hop.body)))
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let (status, headers) = (response.status().as_u16(), response.headers().clone());
        let mut body = Vec::new();
        let mut incoming = response.into_body();
        while let Some(frame) = incoming.frame().await {
            if let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() {
                body.extend_from_slice(&data);
                if body.len() > max_body {
                    return Err(format!("{TOO_BIG} {max_body} bytes"));
                }
            }
        }
        Ok(HopResponse { status, headers, body })
    }
}

const TOO_BIG: &str = "response larger than";

#[async_trait]
impl HttpTransport for SimHttp {
    fn name(&self) -> &'static str {
        "http-sim"
    }

    async fn send(&self, hop: Hop, max_body: usize, timeout: Duration) -> Result<HopResponse, ErrorResponse> {
        let url = hop.url.clone();
        match self.env.timeout(timeout, self.exchange(hop, max_body)).await {
            Some(Ok(response)) => Ok(response),
            Some(Err(why)) if why.starts_with(TOO_BIG) => {
                Err(ErrorResponse::new(ErrorCode::ResourceExhausted, format!("{url}: {why}")))
            }
            Some(Err(why)) => {
                Err(ErrorResponse::new(ErrorCode::CommunicationFailure, format!("request to {url} failed: {why}")))
            }
            None => Err(ErrorResponse::new(ErrorCode::CommunicationFailure, format!("request to {url} timed out"))),
        }
    }
}
