//! Request bodies (SPEC 9: "a body bigger than the route needs"): every route but the upload
//! takes at most `limits.max_body_bytes` (64 KiB) and answers a larger one with 413
//! `payload_too_large`, naming the limit, without reading the rest: a declared length over the
//! limit is refused before any of the body is read, a chunked body is cut off at the limit.

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use release::server::routes::ROUTES;
use reqwest::StatusCode;

use crate::support::{Backend, TestServer, raw};

const HUGE: u64 = 300 << 20;

/// Every route that takes a body (but the upload), and some that take none.
fn routes() -> Vec<(&'static str, String)> {
    let digest = format!("sha256:{}", "0".repeat(64));
    let mut routes: Vec<(&str, String)> = ROUTES
        .iter()
        .filter(|r| r.method == "POST" && r.path != "/v1/artifacts")
        .map(|r| (r.method, r.path.replace("{digest}", &digest).replace("{id}", "1")))
        .collect();
    assert_eq!(routes.len(), 8, "block, purge, deploy, promote, rollback, approve, reject, cancel");
    for (method, path) in
        [("POST", "/login"), ("POST", "/logout"), ("GET", "/v1/status"), ("GET", "/"), ("GET", "/healthz")]
    {
        routes.push((method, path.to_owned()));
    }
    routes
}

#[test]
fn a_300_mb_body_to_any_route_but_the_upload_gets_413_and_is_never_held() {
    let server = TestServer::start(Backend::Local);
    let admin = server.token_with("root", "admin", &["--owner", "root"]);
    let before = server.peak_rss();
    for (method, path) in routes() {
        for chunked in [false, true] {
            let framing =
                if chunked { "Transfer-Encoding: chunked".to_owned() } else { format!("Content-Length: {HUGE}") };
            let content_type = if path == "/login" { "application/x-www-form-urlencoded" } else { "application/json" };
            let mut stream = raw::connect(&server.url);
            write!(
                stream,
                "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\nContent-Type: {content_type}\r\n\
                 {framing}\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            // The body goes out from another thread while the answer is awaited here.
            let mut writer = stream.try_clone().unwrap();
            let sending = std::thread::spawn(move || raw::stream_body(&mut writer, HUGE, chunked));
            let answer = raw::read_answer(&mut stream, Duration::from_secs(60));
            let _ = stream.shutdown(Shutdown::Both); // the writer stops, whatever the answer
            let sent = sending.join().unwrap();
            let answer = answer.unwrap_or_else(|e| panic!("{method} {path} ({framing}): no answer: {e}"));
            assert_eq!(answer.status, 413, "{method} {path} ({framing}): {answer:?}");
            assert_eq!(answer.header("connection"), Some("close"), "the rest is never read: {answer:?}");
            let error = &answer.json()["error"];
            assert_eq!(error["code"], "payload_too_large", "{method} {path}: {error}");
            let message = error["message"].as_str().unwrap();
            assert!(message.contains("64KiB") && message.contains("limits.max_body_bytes"), "{message}");
            assert!(sent < HUGE, "{method} {path} ({framing}): the server read all {sent} bytes before answering");
        }
    }
    let peak = server.peak_rss();
    eprintln!(
        "26 bodies of 300 MB: server peak RSS {:.1} MiB (before them: {:.1} MiB)",
        peak as f64 / (1 << 20) as f64,
        before as f64 / (1 << 20) as f64
    );
    assert!(peak < before + (32 << 20), "server peak RSS grew from {before} to {peak} bytes");
    // The server still answers.
    assert_eq!(server.http().get(format!("{}/healthz", server.url)).send().unwrap().status(), StatusCode::OK);
}

#[test]
fn a_body_of_the_limit_is_read_and_one_byte_more_is_refused() {
    let server = TestServer::start_with(Backend::Local, "[limits]\nmax_body_bytes = \"1KiB\"\n");
    let admin = server.token_with("root", "admin", &["--owner", "root"]);
    let send = |size: usize| {
        let body = format!("{{}}{}", " ".repeat(size - 2));
        let response = server
            .http()
            .post(format!("{}/v1/releases", server.url))
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .unwrap();
        (response.status(), response.json::<serde_json::Value>().unwrap())
    };
    let (status, answer) = send(1024);
    assert_eq!(status, StatusCode::BAD_REQUEST, "read, and found lacking: {answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("missing field"), "{answer}");
    let (status, answer) = send(1025);
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("1KiB"), "{answer}");
}
