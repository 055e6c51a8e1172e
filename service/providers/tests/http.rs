//! The HTTP provider against a local HTTP server (there is no internet here): allowed requests go through;
//! every way of disguising the destination (userinfo, fragments, case, trailing dots, IP spellings, IPv6,
//! redirects, a Host header) is PERMISSION_DENIED or INVALID_REQUEST; responses are capped; slow servers
//! time out.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)] // tests may panic

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use factum_proto::{CapabilityInvocation, CapabilityResponse, ErrorCode, HttpRequest, HttpResponse, Permission};
use factum_providers::{HttpLimits, HttpProvider, Provider};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tiny HTTP/1.1 server on 127.0.0.1: `/hello`, `/big` (with length), `/chunked-big`, `/slow`,
/// `/redirect?to=<url>`, `/slow-redirect?to=<url>` (after 300 ms), `/echo-host`, `/echo-auth`, `/delay` (20 ms).
/// One response per connection.
async fn server() -> u16 {
    counted_server().await.0
}

/// How many `/delay` requests one test server has received, and how many it has answered. The counters are the
/// server's own: counters shared by cases running in parallel let a wait end on another case's request.
#[derive(Default)]
struct Delays {
    received: AtomicUsize,
    answered: AtomicUsize,
}

/// [`server`], with its [`Delays`].
async fn counted_server() -> (u16, Arc<Delays>) {
    let delayed = Arc::new(Delays::default());
    let counter = delayed.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let delayed = counter.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
                let host = text
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("host:"))
                    .map(|l| l[5..].trim().to_string())
                    .unwrap_or_default();
                let reply = |status: &str, extra: &str, body: &[u8]| {
                    let mut r = format!("HTTP/1.1 {status}\r\nconnection: close\r\n{extra}").into_bytes();
                    r.extend_from_slice(body);
                    r
                };
                let response = if path == "/hello" {
                    reply("200 OK", "content-length: 5\r\nx-test: yes\r\n\r\n", b"hello")
                } else if path == "/big" {
                    reply("200 OK", "content-length: 5000\r\n\r\n", &[b'x'; 5000])
                } else if path == "/chunked-big" {
                    let mut r = b"HTTP/1.1 200 OK\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                    for _ in 0..10 {
                        r.extend_from_slice(b"3e8\r\n");
                        r.extend_from_slice(&[b'y'; 1000]);
                        r.extend_from_slice(b"\r\n");
                    }
                    r.extend_from_slice(b"0\r\n\r\n");
                    r
                } else if path == "/delay" {
                    delayed.received.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    // Counted before the answer is written: once written, the client may see it (and its test
                    // go on to read this counter) before this task runs its next line.
                    delayed.answered.fetch_add(1, Ordering::SeqCst);
                    let _ = socket.write_all(&reply("200 OK", "content-length: 2\r\n\r\n", b"ok")).await;
                    return;
                } else if path == "/slow" {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    reply("200 OK", "content-length: 0\r\n\r\n", b"")
                } else if let Some(to) = path.strip_prefix("/redirect?to=") {
                    reply("302 Found", &format!("location: {to}\r\ncontent-length: 0\r\n\r\n"), b"")
                } else if let Some(to) = path.strip_prefix("/slow-redirect?to=") {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    reply("302 Found", &format!("location: {to}\r\ncontent-length: 0\r\n\r\n"), b"")
                } else if path == "/echo-auth" {
                    let auth = text
                        .lines()
                        .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                        .map(|l| l[14..].trim().to_string())
                        .unwrap_or_default();
                    reply("200 OK", &format!("content-length: {}\r\n\r\n", auth.len()), auth.as_bytes())
                } else if path == "/echo-host" {
                    reply("200 OK", &format!("content-length: {}\r\n\r\n", host.len()), host.as_bytes())
                } else {
                    reply("404 Not Found", "content-length: 0\r\n\r\n", b"")
                };
                let _ = socket.write_all(&response).await;
            });
        }
    });
    (port, delayed)
}

fn grant(perms: &[&str]) -> Vec<Permission> {
    perms.iter().map(|p| p.parse().unwrap()).collect()
}

fn get(url: &str) -> CapabilityInvocation {
    let request = HttpRequest { method: "GET".into(), url: url.into(), headers: vec![], body: vec![] };
    let (operation, params) = request.encode();
    CapabilityInvocation { instance_id: "i".into(), capability_id: "web".into(), operation, params }
}

fn provider() -> HttpProvider {
    HttpProvider::new(HttpLimits {
        timeout: Duration::from_millis(500),
        max_response_bytes: 4096,
        max_redirects: 3,
        ..HttpLimits::default()
    })
    .unwrap()
}

fn code(response: &CapabilityResponse) -> Option<ErrorCode> {
    response.error_code()
}

#[tokio::test]
async fn an_allowed_request_returns_status_headers_and_body() {
    let port = server().await;
    let http = provider();
    let response = http
        .invoke(&get(&format!("http://127.0.0.1:{port}/hello")), &grant(&["http:request", "http:domain:127.0.0.1"]))
        .await;
    let answer: HttpResponse = response.result_as().unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, b"hello");
    assert!(answer.headers.contains(&("x-test".into(), "yes".into())));
    let not_found = http
        .invoke(&get(&format!("http://127.0.0.1:{port}/nope")), &grant(&["http:request", "http:domain:127.0.0.1"]))
        .await;
    assert_eq!(
        not_found.result_as::<HttpResponse>().unwrap().status,
        404,
        "an HTTP error status is a result, not a failure"
    );
}

#[tokio::test]
async fn disguised_destinations_are_denied() {
    let port = server().await;
    let http = provider();
    let only_loopback = grant(&["http:request", "http:domain:127.0.0.1"]);
    let denied = [
        format!("http://127.0.0.1@localhost:{port}/hello"), // userinfo names the allowed host
        format!("http://localhost:{port}#@127.0.0.1/hello"), // fragment
        format!("http://localhost:{port}/hello?127.0.0.1"), // query
        format!("http://[::1]:{port}/hello"),               // IPv6 loopback
        format!("http://127.0.0.1.evil.example:{port}/hello"), // allowed host as a prefix
    ];
    for url in &denied {
        assert_eq!(code(&http.invoke(&get(url), &only_loopback).await), Some(ErrorCode::PermissionDenied), "{url}");
    }
    // Spellings of the allowed address that parse to it are the same destination and are allowed.
    for url in [format!("http://2130706433:{port}/hello"), format!("http://127.0.0.1.:{port}/hello")] {
        let response = http.invoke(&get(&url), &only_loopback).await;
        assert!(response.success, "{url}: {:?}", response.error);
    }
    // Case does not matter; the allowlist is by host, not by port. `localhost` is loopback, so the address
    // needs its own grant (see `a_name_resolving_to_an_internal_address_is_refused`).
    let localhost = grant(&["http:request", "http:domain:localhost", "http:domain:127.0.0.1"]);
    assert!(http.invoke(&get(&format!("http://LocalHost:{port}/hello")), &localhost).await.success);
    let localhost = grant(&["http:request", "http:domain:localhost"]);
    assert_eq!(
        code(&http.invoke(&get(&format!("http://127.0.0.1:{port}/hello")), &localhost).await),
        Some(ErrorCode::PermissionDenied),
        "an IP is not the name that resolves to it"
    );
    // http:request alone reaches nothing; a domain without http:request neither.
    let url = format!("http://127.0.0.1:{port}/hello");
    assert_eq!(code(&http.invoke(&get(&url), &grant(&["http:request"])).await), Some(ErrorCode::PermissionDenied));
    assert_eq!(
        code(&http.invoke(&get(&url), &grant(&["http:domain:127.0.0.1"])).await),
        Some(ErrorCode::PermissionDenied)
    );
}

#[tokio::test]
async fn redirects_are_checked_hop_by_hop() {
    let port = server().await;
    let http = provider();
    let only_loopback = grant(&["http:request", "http:domain:127.0.0.1"]);
    let inside = format!("http://127.0.0.1:{port}/redirect?to=/hello");
    let followed: HttpResponse = http.invoke(&get(&inside), &only_loopback).await.result_as().unwrap();
    assert_eq!(followed.body, b"hello");
    let outside = format!("http://127.0.0.1:{port}/redirect?to=http://localhost:{port}/hello");
    assert_eq!(code(&http.invoke(&get(&outside), &only_loopback).await), Some(ErrorCode::PermissionDenied));
    let looping =
        format!("http://127.0.0.1:{port}/redirect?to=/redirect?to=/redirect?to=/redirect?to=/redirect?to=/hello");
    assert_eq!(code(&http.invoke(&get(&looping), &only_loopback).await), Some(ErrorCode::CommunicationFailure));
}

#[tokio::test]
async fn bad_requests_are_invalid_and_big_or_slow_responses_fail_cleanly() {
    let port = server().await;
    let http = provider();
    let all = grant(&["http:request", "http:domain:127.0.0.1"]);
    let with_host = HttpRequest {
        method: "GET".into(),
        url: format!("http://127.0.0.1:{port}/echo-host"),
        headers: vec![("Host".into(), "internal.example".into())],
        body: vec![],
    };
    let (operation, params) = with_host.encode();
    let invocation = CapabilityInvocation { instance_id: "i".into(), capability_id: "web".into(), operation, params };
    assert_eq!(code(&http.invoke(&invocation, &all).await), Some(ErrorCode::InvalidRequest));
    for url in ["file:///etc/passwd", "not a url", "ftp://127.0.0.1/x"] {
        assert_eq!(code(&http.invoke(&get(url), &all).await), Some(ErrorCode::InvalidRequest), "{url}");
    }
    let garbage = CapabilityInvocation {
        instance_id: "i".into(),
        capability_id: "web".into(),
        operation: "request".into(),
        params: vec![0xc1, 0xff],
    };
    assert_eq!(code(&http.invoke(&garbage, &all).await), Some(ErrorCode::InvalidRequest));
    let mut unknown = get("http://127.0.0.1/");
    unknown.operation = "teleport".into();
    assert_eq!(code(&http.invoke(&unknown, &all).await), Some(ErrorCode::InvalidRequest));
    for path in ["big", "chunked-big"] {
        let response = http.invoke(&get(&format!("http://127.0.0.1:{port}/{path}")), &all).await;
        assert_eq!(code(&response), Some(ErrorCode::ResourceExhausted), "{path}");
    }
    let slow = http.invoke(&get(&format!("http://127.0.0.1:{port}/slow")), &all).await;
    assert_eq!(code(&slow), Some(ErrorCode::CommunicationFailure));
    http.shutdown().await.unwrap();
    let after = http.invoke(&get(&format!("http://127.0.0.1:{port}/hello")), &all).await;
    assert_eq!(code(&after), Some(ErrorCode::ProviderUnavailable));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(100))]

    /// Feature: wasm-orchestrator, Property 20: Graceful Provider Shutdown Handling
    /// Requests already in flight when shutdown begins finish normally, and shutdown returns only after they
    /// have; every request after that is PROVIDER_UNAVAILABLE. Nothing hangs.
    #[test]
    fn in_flight_requests_finish_before_shutdown_returns(in_flight in 1usize..5, after in 1usize..4) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let (port, delayed) = counted_server().await;
            let http = Arc::new(provider());
            let all = grant(&["http:request", "http:domain:127.0.0.1"]);
            let mut tasks = Vec::new();
            for _ in 0..in_flight {
                let (http, all) = (http.clone(), all.clone());
                let url = format!("http://127.0.0.1:{port}/delay");
                tasks.push(tokio::spawn(async move { http.invoke(&get(&url), &all).await }));
            }
            // Shutdown must begin while every one of them is in flight: wait until they have reached the server.
            while delayed.received.load(Ordering::SeqCst) < in_flight {
                tokio::task::yield_now().await;
            }
            tokio::time::timeout(Duration::from_secs(10), http.shutdown()).await.expect("shutdown hung").unwrap();
            // The server answers each 20 ms after receiving it: a shutdown that did not wait returns before that.
            // (Counted at the server, not in the tasks: a task may run its next line after shutdown returned.)
            proptest::prop_assert_eq!(delayed.answered.load(Ordering::SeqCst), in_flight);
            for task in tasks {
                let response = task.await.unwrap();
                proptest::prop_assert!(response.success, "{:?}", response.error);
            }
            for _ in 0..after {
                let refused = http.invoke(&get(&format!("http://127.0.0.1:{port}/delay")), &all).await;
                proptest::prop_assert_eq!(code(&refused), Some(ErrorCode::ProviderUnavailable));
            }
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn a_name_resolving_to_an_internal_address_is_refused() {
    let port = server().await;
    let http = provider();
    // `localhost` is on the allowlist, but it resolves to loopback: a DNS name pointing inside is the classic
    // way past a name allowlist.
    let by_name = grant(&["http:request", "http:domain:localhost"]);
    let response = http.invoke(&get(&format!("http://localhost:{port}/hello")), &by_name).await;
    assert_eq!(code(&response), Some(ErrorCode::PermissionDenied));
    assert!(response.error.as_ref().unwrap().message.contains("loopback"), "{:?}", response.error);
    // The same by redirect: an allowed public-looking hop cannot lead inside either.
    let both = grant(&["http:request", "http:domain:localhost", "http:domain:127.0.0.1"]);
    assert!(http.invoke(&get(&format!("http://localhost:{port}/hello")), &both).await.success);
    // IP literals of internal ranges need their own grant, however they are spelled.
    for url in
        ["http://169.254.169.254/latest/meta-data/", "http://[::1]:9/", "http://0x7f000001:9/", "http://0.0.0.0:9/"]
    {
        let any_name = grant(&["http:request", "http:domain:169.254.169.254", "http:domain:localhost"]);
        let response = http.invoke(&get(url), &any_name).await;
        if url.contains("169.254") {
            // Granted by its own address: allowed to try (nothing listens there: a connection failure).
            assert_ne!(code(&response), Some(ErrorCode::PermissionDenied), "{url}");
        } else {
            assert_eq!(code(&response), Some(ErrorCode::PermissionDenied), "{url}: {:?}", response.error);
        }
    }
}

#[tokio::test]
async fn credentials_do_not_follow_a_redirect_to_another_origin() {
    let port = server().await;
    let http = provider();
    let both = grant(&["http:request", "http:domain:localhost", "http:domain:127.0.0.1"]);
    let with_auth = |url: String| {
        let request = HttpRequest {
            method: "GET".into(),
            url,
            headers: vec![("Authorization".into(), "Bearer secret".into())],
            body: vec![],
        };
        let (operation, params) = request.encode();
        CapabilityInvocation { instance_id: "i".into(), capability_id: "web".into(), operation, params }
    };
    let body = |response: CapabilityResponse| response.result_as::<HttpResponse>().unwrap().body;
    let same = with_auth(format!("http://127.0.0.1:{port}/redirect?to=/echo-auth"));
    assert_eq!(body(http.invoke(&same, &both).await), b"Bearer secret");
    let other = with_auth(format!("http://127.0.0.1:{port}/redirect?to=http://localhost:{port}/echo-auth"));
    assert_eq!(body(http.invoke(&other, &both).await), b"");
}

#[tokio::test]
async fn one_deadline_covers_every_redirect_and_requests_in_flight_are_capped() {
    let port = server().await;
    let http = provider();
    let only_loopback = grant(&["http:request", "http:domain:127.0.0.1"]);
    // Two hops of 300 ms each: within a per-hop timeout of 500 ms, not within one overall deadline.
    let url = format!("http://127.0.0.1:{port}/slow-redirect?to=/slow-redirect?to=/hello");
    let response = http.invoke(&get(&url), &only_loopback).await;
    assert_eq!(code(&response), Some(ErrorCode::CommunicationFailure), "{:?}", response.error);
    let one_hop = format!("http://127.0.0.1:{port}/slow-redirect?to=/hello");
    assert!(http.invoke(&get(&one_hop), &only_loopback).await.success);

    let http = HttpProvider::new(HttpLimits { max_in_flight: 1, ..HttpLimits::default() }).unwrap();
    let slow = get(&format!("http://127.0.0.1:{port}/delay"));
    let (first, second) = futures::join!(http.invoke(&slow, &only_loopback), http.invoke(&slow, &only_loopback));
    assert!(first.success, "{:?}", first.error);
    assert_eq!(code(&second), Some(ErrorCode::ResourceExhausted));
    // The slot is given back when a request ends.
    assert!(http.invoke(&slow, &only_loopback).await.success);
}
