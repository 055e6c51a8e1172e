//! The daemons' Prometheus endpoint: `GET /metrics` answers the registry in the OpenMetrics text format, on
//! its own plaintext listener (`--metrics-listen`), apart from the API. It serves counts and latencies only:
//! no instance ids, no data.

use std::convert::Infallible;
use std::sync::Arc;

use factum_env::{Env, Listener};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;

/// What `GET /metrics` answers with (the content type Prometheus asks for first).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `registry` over HTTP on `listener` until the listener fails.
pub async fn serve(env: Env, listener: Box<dyn Listener>, registry: Arc<Registry>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "the metrics listener failed; metrics are no longer served");
                return;
            }
        };
        let registry = registry.clone();
        let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            std::future::ready(Ok::<_, Infallible>(answer(&registry, request.method(), request.uri().path())))
        });
        env.spawn(async move {
            if let Err(e) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                tracing::debug!(%peer, error = %e, "metrics connection ended");
            }
        });
    }
}

fn answer(registry: &Registry, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
        response
    };
    let text = "text/plain; charset=utf-8";
    if path != "/metrics" {
        return reply(StatusCode::NOT_FOUND, text, "not found: metrics are at /metrics\n".into());
    }
    if method != Method::GET && method != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, text, "only GET /metrics\n".into());
    }
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => reply(StatusCode::OK, CONTENT_TYPE, body),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, text, format!("cannot encode the metrics: {e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(env: &Env, addr: &str, request: &str) -> String {
        let mut stream = env.net.connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn metrics_are_served_at_slash_metrics_and_nothing_else_is() {
        let env = Env::tokio();
        let mut registry = Registry::with_prefix("factum");
        let starts = Counter::<u64>::default();
        registry.register("starts", "Starts", starts.clone());
        starts.inc_by(3);
        let listener = env.net.bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        env.spawn(serve(env.clone(), listener, Arc::new(registry)));

        let ok = get(&env, &addr, "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("application/openmetrics-text"), "{ok}");
        assert!(ok.contains("# TYPE factum_starts counter") && ok.contains("factum_starts_total 3"), "{ok}");
        assert!(ok.trim_end().ends_with("# EOF"), "{ok}");

        let elsewhere = get(&env, &addr, "GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        assert!(elsewhere.starts_with("HTTP/1.1 404"), "{elsewhere}");
        let post =
            get(&env, &addr, "POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let garbage = get(&env, &addr, "NOT HTTP AT ALL\r\n\r\n").await;
        assert!(garbage.is_empty() || garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        // The server outlives a bad peer.
        let again = get(&env, &addr, "GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    }
}
