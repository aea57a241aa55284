//! What a client can no longer hold forever (SPEC 9: "a request that never finishes its
//! headers, an upload that stalls"): half-sent heads and idle connections are closed after
//! `limits.header_timeout`; a body that never ends gets 408 after `limits.request_timeout`
//! (the long-poll answers before it); a stalled or trickling upload is aborted and frees its
//! turn; a client that stops reading its answer is disconnected after `limits.send_timeout`;
//! and no more than `limits.max_connections` are open at once. Short limits through the
//! configuration; every wait below is bounded.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::releases::{CONFIG, Fixture, changes, follow, pending_promotion};
use crate::support::archives::{RawTar, zstd};
use crate::support::{Backend, TestServer, raw};

/// `size` incompressible bytes (xorshift64*), so the archive is as large as its content.
fn noise(size: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut bytes = Vec::with_capacity(size + 8);
    while bytes.len() < size {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        bytes.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    bytes.truncate(size);
    bytes
}

pub(crate) fn archive_of(size: usize) -> Vec<u8> {
    zstd(&RawTar::new().file("blob.bin", &noise(size)).finish())
}

#[test]
fn half_sent_heads_and_idle_connections_are_closed_after_the_header_timeout() {
    let server = TestServer::start_with(Backend::Local, "[limits]\nheader_timeout = \"1s\"\n");
    let started = Instant::now();
    let mut streams: Vec<TcpStream> = (0..50)
        .map(|i| {
            let mut stream = raw::connect(&server.url);
            // Half send a head; the other half send nothing at all.
            if i % 2 == 0 {
                stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
            }
            stream
        })
        .collect();
    // A connection kept alive after a whole request, then left idle.
    let mut idle = raw::connect(&server.url);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(raw::read_answer(&mut idle, Duration::from_secs(10)).unwrap().status, 200);
    streams.push(idle);

    let mut slowest = Duration::ZERO;
    for (i, stream) in streams.iter_mut().enumerate() {
        let left = Duration::from_secs(10).saturating_sub(started.elapsed());
        let closed = raw::closed_within(stream, left);
        assert!(closed.is_some(), "connection {i} still open {:?} after it was opened", started.elapsed());
        slowest = slowest.max(started.elapsed());
    }
    eprintln!("51 connections (25 half-sent heads, 25 silent, 1 idle keep-alive) all closed {slowest:?} after opening");
    assert!(slowest >= Duration::from_millis(900), "closed before the timeout: {slowest:?}");
    // The server still answers.
    assert_eq!(server.http().get(format!("{}/healthz", server.url)).send().unwrap().status(), StatusCode::OK);
}

#[test]
fn a_body_that_never_ends_gets_408_and_the_long_poll_answers_before_the_deadline() {
    let f = Fixture::with_config(&format!("{CONFIG}[limits]\nrequest_timeout = \"3s\"\n"));
    let mut stream = raw::connect(&f.server.url);
    let started = Instant::now();
    write!(
        stream,
        "POST /v1/releases HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"service\":",
        f.token("alice")
    )
    .unwrap();
    let answer = raw::read_answer(&mut stream, Duration::from_secs(15)).expect("an answer before 15 s");
    let took = started.elapsed();
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(answer.json()["error"]["code"], "request_timeout");
    assert!(answer.json()["error"]["message"].as_str().unwrap().contains("limits.request_timeout"));
    assert!(took >= Duration::from_millis(2900) && took < Duration::from_secs(10), "408 after {took:?}");
    assert!(raw::closed_within(&mut stream, Duration::from_secs(5)).is_some(), "the connection stays open");

    // A long-poll asked to wait 30 s answers (200, the release as it is) before the 3 s are up.
    let v1 = f.upload("v1");
    let id = pending_promotion(&f, &v1);
    let seen = changes(&f.get("carol", &format!("/v1/releases/{id}")));
    let (status, answer, took) = follow(&f, id, &format!("seen={seen}&wait=30")).join().unwrap();
    assert_eq!((status, changes(&answer)), (StatusCode::OK, seen), "{answer}");
    assert!((1.5..3.0).contains(&took), "the long-poll answered after {took:.2} s");
}

/// Sends the head of an upload of `body` and its first `first` bytes; leaves it there.
pub(crate) fn stalled_upload(url: &str, token: &str, body: &[u8], first: usize) -> TcpStream {
    let mut stream = raw::connect(url);
    write!(
        stream,
        "POST /v1/artifacts?service=api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(&body[..first]).unwrap();
    stream
}

#[test]
fn stalled_uploads_are_aborted_and_free_their_turns() {
    let server =
        TestServer::start_with(Backend::Local, "[limits]\nmax_concurrent_uploads = 2\nupload_stall_timeout = \"2s\"\n");
    let ci = server.token_with("ci", "ci", &["--owner", "gitlab"]);
    let body = archive_of(200_000);
    // Every turn taken by an upload that sends a little, then nothing: two tokens, since one
    // holds half the turns at most.
    let others = ["ci-a", "ci-b"].map(|name| server.token_with(name, "ci", &["--owner", "gitlab"]));
    let mut stalled: Vec<TcpStream> = others.iter().map(|t| stalled_upload(&server.url, t, &body, 1000)).collect();
    // The upload below waits for a turn as long as a stalled one is given (2 s): it comes
    // a second after them, so that their turns come free a second before its wait ends.
    std::thread::sleep(Duration::from_millis(1000));

    let started = Instant::now();
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let response = client
        .post(format!("{}/v1/artifacts?service=api", server.url))
        .bearer_auth(&ci)
        .body(archive_of(100_000))
        .send()
        .expect("the upload got a turn within 30 s");
    let took = started.elapsed();
    assert_eq!(response.status(), StatusCode::CREATED, "{}", response.text().unwrap());
    eprintln!("with every turn held by a stalled upload, a normal upload got one and was stored after {took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");

    for stream in &mut stalled {
        let answer = raw::read_answer(stream, Duration::from_secs(10)).unwrap();
        assert_eq!(answer.status, 408, "{answer:?}");
        assert_eq!(answer.json()["error"]["code"], "upload_too_slow");
        assert!(answer.json()["error"]["message"].as_str().unwrap().contains("limits.upload_stall_timeout"));
    }
    server.assert_no_staging_left();
    assert_eq!(server.count("SELECT count(*) FROM artifacts"), 1, "only the normal upload is stored");
    let recorded = server.count(
        "SELECT count(*) FROM audit_events WHERE action LIKE 'request.refused%' AND details LIKE '%upload_too_slow%'",
    );
    assert!(recorded >= 1, "the stalled uploads' refusals are not in the audit log");
}

#[test]
fn a_trickling_upload_is_aborted_below_the_minimum_rate() {
    let server = TestServer::start_with(
        Backend::Local,
        "[limits]\nupload_stall_timeout = \"5s\"\nmin_upload_rate = \"64KiB\"\nupload_rate_window = \"2s\"\n",
    );
    let ci = server.token_with("ci", "ci", &["--owner", "gitlab"]);
    let body = archive_of(1 << 20);
    let mut stream = stalled_upload(&server.url, &ci, &body, 200);
    let started = Instant::now();
    // 200 bytes every 100 ms: never a stall, about 2 KB/s.
    let mut writer = stream.try_clone().unwrap();
    let tail = body[200..].to_vec();
    let trickle = std::thread::spawn(move || {
        for chunk in tail.chunks(200) {
            if writer.write_all(chunk).is_err() || started.elapsed() > Duration::from_secs(20) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let answer = raw::read_answer(&mut stream, Duration::from_secs(15)).expect("an answer before 15 s");
    let _ = stream.shutdown(Shutdown::Both);
    trickle.join().unwrap();
    assert_eq!(answer.status, 408, "{answer:?}");
    let message = answer.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("limits.min_upload_rate"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(10), "refused after {:?}", started.elapsed());
    server.assert_nothing_stored();
}

#[test]
fn a_client_that_stops_reading_its_answer_is_disconnected() {
    let server = TestServer::start_with(Backend::Local, "[limits]\nsend_timeout = \"2s\"\n");
    let ci = server.token_with("ci", "ci", &["--owner", "gitlab"]);
    let body = archive_of(32 << 20);
    let size = body.len();
    let uploaded: Value = server
        .http()
        .post(format!("{}/v1/artifacts?service=api", server.url))
        .bearer_auth(&ci)
        .body(body)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let digest = uploaded["digest"].as_str().unwrap();

    let mut stream = raw::connect(&server.url);
    write!(stream, "GET /v1/artifacts/{digest}/blob HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ci}\r\n\r\n")
        .unwrap();
    // Read nothing for longer than the send timeout, then all there is.
    std::thread::sleep(Duration::from_secs(5));
    let mut received = 0usize;
    let mut buffer = vec![0u8; 1 << 20];
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    loop {
        match std::io::Read::read(&mut stream, &mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => received += n,
        }
        if received > size {
            break;
        }
    }
    eprintln!("a client that read nothing for 5 s got {received} bytes of a {size}-byte answer before it was closed");
    assert!(received < size, "the whole answer came: the server waited for the client");
    // The server still answers.
    assert_eq!(server.http().get(format!("{}/healthz", server.url)).send().unwrap().status(), StatusCode::OK);
}

#[test]
fn no_more_connections_than_the_cap_are_served_at_once() {
    let server = TestServer::start_with(Backend::Local, "[limits]\nmax_connections = 3\nheader_timeout = \"30s\"\n");
    // Three connections, each served once and kept alive.
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut stream = raw::connect(&server.url);
            stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            assert_eq!(raw::read_answer(&mut stream, Duration::from_secs(10)).unwrap().status, 200);
            stream
        })
        .collect();
    // A fourth waits: the kernel takes it, the server does not serve it.
    let mut fourth = raw::connect(&server.url);
    fourth.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let early = raw::read_answer(&mut fourth, Duration::from_millis(1500));
    assert!(early.is_err(), "served beyond the cap: {early:?}");
    // One of the three goes: the fourth is served.
    held.pop().unwrap().shutdown(Shutdown::Both).unwrap();
    let answer = raw::read_answer(&mut fourth, Duration::from_secs(10)).expect("served once a connection closed");
    assert_eq!(answer.status, 200);
}

#[test]
fn an_answer_not_begun_by_the_deadline_is_503_and_the_server_goes_on() {
    // A "node" that takes the connection and never says a word: asking it outlasts the deadline.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, "").unwrap();
    let server = TestServer::start_with(
        Backend::Local,
        &format!(
            "[limits]\nrequest_timeout = \"2s\"\n[ssh]\nknown_hosts = \"{}\"\nconnect_timeout = \"20s\"\n\
             [service.web]\nkind = \"generic\"\n[[service.web.node]]\nenvironment = \"staging\"\n\
             host = \"127.0.0.1\"\nport = {port}\nuser = \"root\"\nbase = \"/srv/web\"\n",
            known_hosts.display()
        ),
    );
    let carol = server.token_with("carol", "auditor", &["--owner", "carol"]);
    let started = Instant::now();
    let response =
        server.http().get(format!("{}/v1/status?nodes=true", server.url)).bearer_auth(&carol).send().unwrap();
    let took = started.elapsed();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let answer: Value = response.json().unwrap();
    assert_eq!(answer["error"]["code"], "timeout", "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("limits.request_timeout"), "{answer}");
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(10), "503 after {took:?}");
    // Other requests are answered meanwhile.
    let response = server.http().get(format!("{}/v1/status", server.url)).bearer_auth(&carol).send().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drop(silent);
}

/// A connection to the server at `url` from `source`, another loopback address.
fn connect_from(url: &str, source: &str) -> TcpStream {
    let server: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let source: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
    // Once, under a full run's load, a connect failed here (the error was not kept): it is
    // tried again, saying why, before the test fails.
    let stream = crate::support::block_on(async {
        let mut tries = 0;
        loop {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(source).unwrap();
            match socket.connect(server).await {
                Ok(stream) => break stream.into_std().unwrap(),
                Err(e) if tries < 3 => eprintln!("connecting from {source} to {server}: {e}; again"),
                Err(e) => panic!("connecting from {source} to {server}: {e}"),
            }
            tries += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    stream.set_nonblocking(false).unwrap();
    stream
}

/// Whether the server closed `stream` without an answer within 5 s.
fn closed_unanswered(stream: &mut TcpStream) -> bool {
    use std::io::Read;
    let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buffer = [0u8; 64];
    match stream.read(&mut buffer) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

fn healthz(stream: &mut TcpStream) -> u16 {
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    raw::read_answer(stream, Duration::from_secs(10)).unwrap().status
}

/// A stranger sending slow bodies to `/login` from one host once held every connection
/// (`/healthz` took 26 s); so could one CI machine's queued uploads. One source now holds
/// `max_connections_per_source` at most; the next is closed at once, and other sources are
/// served. A trusted proxy carries everyone: it is not counted.
#[test]
fn one_source_holds_so_many_connections_and_the_others_are_served() {
    let server = TestServer::start_with(Backend::Local, "[limits]\nmax_connections_per_source = 3\n");
    let slow_login = |stream: &mut TcpStream| {
        let head = "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
                    Content-Length: 60000\r\n\r\nname=";
        stream.write_all(head.as_bytes()).unwrap();
    };
    let mut held: Vec<TcpStream> = (0..3).map(|_| raw::connect(&server.url)).collect();
    held.iter_mut().for_each(slow_login);
    std::thread::sleep(Duration::from_millis(300));
    assert!(closed_unanswered(&mut raw::connect(&server.url)), "a fourth from 127.0.0.1 is closed");
    assert_eq!(healthz(&mut connect_from(&server.url, "127.0.0.2")), 200, "another source is served");
    held.pop().unwrap().shutdown(Shutdown::Both).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(healthz(&mut raw::connect(&server.url)), 200, "one gone: 127.0.0.1 is served again");

    let server = TestServer::start_with_server(
        Backend::Local,
        "trusted_proxies = [\"127.0.0.1\"]\n",
        "[limits]\nmax_connections_per_source = 1\n",
    );
    let mut held = raw::connect(&server.url);
    slow_login(&mut held);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(healthz(&mut raw::connect(&server.url)), 200, "a trusted proxy is not counted");
    let mut other = connect_from(&server.url, "127.0.0.2");
    slow_login(&mut other);
    std::thread::sleep(Duration::from_millis(300));
    assert!(closed_unanswered(&mut connect_from(&server.url, "127.0.0.2")), "an untrusted source still is");
}
