//! Turns for uploads (SPEC 9: one client cannot keep the others' uploads waiting): one token
//! holds half the turns, a token holding one leaves the last free one to a token holding
//! none, so many uploads wait per token and in all, none longer than an upload may stall, and
//! `release upload` sends again when told to. Short limits through the configuration; every
//! wait below is bounded.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::support::{Backend, TestServer, raw};
use crate::timeouts::{archive_of, stalled_upload};

/// Sends `body` one byte every 300 ms, never stalling, until `stop` (or 20 s).
pub(crate) fn trickle(stream: &TcpStream, body: Vec<u8>, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let mut writer = stream.try_clone().unwrap();
    let started = Instant::now();
    std::thread::spawn(move || {
        for byte in body {
            let done = stop.load(std::sync::atomic::Ordering::Relaxed) || started.elapsed() > Duration::from_secs(20);
            if done || writer.write_all(&[byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
}

/// A token trickling uploads at just above the minimum rate once held every turn for hours,
/// and any number of its uploads could wait for one, outside every timeout, until they held
/// every connection. Now it holds half the turns, waits with an eighth of the connections at
/// most, and waits no longer than an upload may stall.
#[test]
fn one_token_holds_half_the_upload_turns_and_waits_for_more_only_so_long() {
    let server = TestServer::start_with(
        Backend::Local,
        "[limits]\nmax_concurrent_uploads = 2\nmax_connections = 16\nupload_stall_timeout = \"3s\"\n",
    );
    let ci = server.token_with("ci", "ci", &["--owner", "gitlab"]);
    let body = archive_of(200_000);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // ci's first upload takes its one turn (half of two) and keeps it, never stalling.
    let mut held = stalled_upload(&server.url, &ci, &body, 1000);
    trickle(&held, body[1000..].to_vec(), std::sync::Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(300));
    // Two more wait for ci's turn (an eighth of the 16 connections); a fourth is refused at once.
    let waiting_since = Instant::now();
    let mut waiting: Vec<TcpStream> = (0..2).map(|_| stalled_upload(&server.url, &ci, &body, 0)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut fourth = stalled_upload(&server.url, &ci, &body, 0);
    let answer = raw::read_answer(&mut fourth, Duration::from_secs(2)).expect("refused at once");
    assert_eq!(answer.status, 429, "{answer:?}");
    assert_eq!(answer.json()["error"]["code"], "rate_limited");
    assert!(answer.json()["error"]["message"].as_str().unwrap().contains("limits.max_concurrent_uploads"));
    assert!(answer.head.to_ascii_lowercase().contains("retry-after: "), "{}", answer.head);

    // Another service's CI is not kept waiting by ci: of the two turns, ci may hold only one.
    let web = server.token_with("ci-web", "ci", &["--owner", "gitlab"]);
    stored_at_once(&server, &web);

    // ci's waiting uploads get 503 once they waited as long as an upload may stall.
    for stream in &mut waiting {
        let answer = raw::read_answer(stream, Duration::from_secs(10)).unwrap();
        assert_eq!(answer.status, 503, "{answer:?}");
        assert_eq!(answer.json()["error"]["code"], "busy");
        assert!(answer.json()["error"]["message"].as_str().unwrap().contains("limits.upload_stall_timeout"));
        assert!(answer.head.to_ascii_lowercase().contains("retry-after: "), "{}", answer.head);
    }
    let waited = waiting_since.elapsed();
    assert!(waited >= Duration::from_secs(3) && waited < Duration::from_secs(8), "answered after {waited:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = held.shutdown(Shutdown::Both);
    let _ = raw::read_answer(&mut held, Duration::from_secs(5));
    server.assert_no_staging_left();
    assert_eq!(server.count("SELECT count(*) FROM artifacts"), 1, "only ci-web's upload is stored");
}

/// Two tokens trickling two uploads each once held all four turns, so that a third service's
/// CI got 503 for as long as the trickles lasted (N1). A token holding a turn now leaves the
/// last free one to a token holding none. And two tokens' uploads kept the waiting room full,
/// so that every other token's got 503 at once: a token with fewer waiting now takes a place.
#[test]
fn two_tokens_leave_a_turn_to_a_third() {
    let server = TestServer::start_with(
        Backend::Local,
        "[limits]\nmax_concurrent_uploads = 4\nmax_connections = 16\nupload_stall_timeout = \"6s\"\n",
    );
    let body = archive_of(200_000);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let [a, b, web, c] =
        ["ci-a", "ci-b", "ci-web", "ci-c"].map(|name| server.token_with(name, "ci", &["--owner", "gitlab"]));
    let mut trickling = trickling_uploads(&server, [&a, &a, &b, &b], &body, &stop);
    stored_at_once(&server, &web);
    // ci-web takes the last turn again; ci-b's second and three more of ci-a's wait: a quarter
    // of the 16 connections, as many as may wait in all.
    let last = stalled_upload(&server.url, &web, &body, 1000);
    trickle(&last, body[1000..].to_vec(), std::sync::Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(200));
    let mut more = Vec::new();
    for _ in 0..3 {
        more.push(stalled_upload(&server.url, &a, &body, 0));
        std::thread::sleep(Duration::from_millis(200));
    }
    // ci-c, with none waiting, takes the place of ci-a's newest, which is told at once to come
    // back; so is a fourth of ci-a's, which has no fewer waiting than anyone else now.
    let _c = stalled_upload(&server.url, &c, &body, 0);
    let evicted = raw::read_answer(&mut more[2], Duration::from_secs(2)).unwrap();
    let fourth = raw::read_answer(&mut stalled_upload(&server.url, &a, &body, 0), Duration::from_secs(2)).unwrap();
    for answer in [evicted, fourth] {
        assert_eq!((answer.status, answer.json()["error"]["code"].as_str()), (503, Some("busy")), "{answer:?}");
        assert!(answer.json()["error"]["message"].as_str().unwrap().contains("a quarter of limits.max_connections"));
    }
    // ci-b's second upload waited for the turn it may not take, and was told to come back.
    let answer = raw::read_answer(&mut trickling[3], Duration::from_secs(15)).unwrap();
    assert_eq!((answer.status, answer.json()["error"]["code"].as_str()), (503, Some("busy")), "{answer:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop((trickling, last));
    assert_eq!(server.count("SELECT count(*) FROM artifacts"), 1, "only ci-web's upload is stored");
}

/// Three tokens trickling uploads once held all four turns (one of them two), so that a
/// fourth service's CI got 503 for as long as the trickles lasted (F1 of the stop-35 attack).
/// A token holding none that waited half its wait now takes a turn of the token holding the
/// most, whose newest upload is told to send it again.
#[test]
fn a_token_holding_two_turns_gives_one_up_to_a_token_waiting_with_none() {
    let (server, [a, b, c, web]) = four_turns();
    let body = archive_of(200_000);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut trickling = trickling_uploads(&server, [&a, &a, &b, &c], &body, &stop);
    let started = Instant::now();
    let response = server
        .http()
        .post(format!("{}/v1/artifacts?service=api", server.url))
        .bearer_auth(&web)
        .body(archive_of(100_000))
        .send()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(response.status(), StatusCode::CREATED, "{}", response.text().unwrap());
    assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(4), "stored after {took:?}");
    // ci-a's newest upload gave its turn up, and was told to send it again.
    let answer = raw::read_answer(&mut trickling[1], Duration::from_secs(2)).unwrap();
    assert_eq!((answer.status, answer.json()["error"]["code"].as_str()), (503, Some("busy")), "{answer:?}");
    assert!(answer.json()["error"]["message"].as_str().unwrap().contains("to give its turn"), "{answer:?}");
    assert!(answer.head.to_ascii_lowercase().contains("retry-after: "), "{}", answer.head);
    // The others go on: each of the three tokens holds one turn, as any token may.
    for at in [0, 2, 3] {
        let still = raw::read_answer(&mut trickling[at], Duration::from_millis(300)).map(|a| a.status);
        let kind = still.expect_err("still sending").kind();
        assert!(matches!(kind, std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{kind:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(trickling);
    server.assert_no_staging_left();
    assert_eq!(server.count("SELECT count(*) FROM artifacts"), 1, "only ci-web's upload is stored");
}

/// A client still sending its body hears why it was stopped: the answer comes before the
/// connection goes (reqwest's async client with a streamed body, as `release upload` sends).
#[test]
fn a_client_still_sending_hears_that_its_turn_was_given_up() {
    let (server, [a, b, c, web]) = four_turns();
    let body = archive_of(200_000);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // ci-a's first has sent more than the second will have: the second is the one cut.
    let first = stalled_upload(&server.url, &a, &body, 150_000);
    trickle(&first, body[150_000..].to_vec(), std::sync::Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(200));
    let sending = std::thread::spawn({
        let (url, body, stop) = (server.url.clone(), body.clone(), std::sync::Arc::clone(&stop));
        move || slow_upload(&url, &a, body, stop)
    });
    std::thread::sleep(Duration::from_millis(300));
    let _others = trickling_uploads(&server, [&b, &c], &body, &stop);
    let _web = std::thread::spawn({
        let (url, http) = (server.url.clone(), server.http());
        move || http.post(format!("{url}/v1/artifacts?service=api")).bearer_auth(&web).body(archive_of(100_000)).send()
    });
    let answer = sending.join().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (status, text) = answer.expect("an answer, not a broken connection");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("to give its turn"), "{text}");
}

/// Uploads `body` 1 KiB every 100 ms (until `stop`), streamed by reqwest's async client.
fn slow_upload(
    url: &str,
    token: &str,
    body: Vec<u8>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> reqwest::Result<(StatusCode, String)> {
    let (size, body) = (body.len(), bytes::Bytes::from(body));
    let chunks = futures::stream::unfold(0, move |at| {
        let (body, stop) = (body.clone(), std::sync::Arc::clone(&stop));
        async move {
            if stop.load(std::sync::atomic::Ordering::Relaxed) || at >= body.len() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let end = (at + 1024).min(body.len());
            Some((Ok::<_, std::io::Error>(body.slice(at..end)), end))
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let response = reqwest::Client::new()
            .post(format!("{url}/v1/artifacts?service=api"))
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await?;
        Ok((response.status(), response.text().await?))
    })
}

/// `release upload` sends an upload again, after the time the server names, when the server
/// had no turn for it: CI goes on once the turns come free.
#[test]
fn release_upload_sends_again_when_the_server_has_no_turn() {
    let server =
        TestServer::start_with(Backend::Local, "[limits]\nmax_concurrent_uploads = 2\nupload_stall_timeout = \"2s\"\n");
    let ci = server.token_with("ci", "ci", &["--owner", "gitlab"]);
    let body = archive_of(200_000);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // ci's one turn held for 3 s, then stalled (and so aborted 2 s later).
    let held = stalled_upload(&server.url, &ci, &body, 1000);
    trickle(&held, body[1000..].to_vec(), std::sync::Arc::clone(&stop));
    let stopper = std::sync::Arc::clone(&stop);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        stopper.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    std::thread::sleep(Duration::from_millis(300));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("build.tar.zst");
    std::fs::write(&file, archive_of(100_000)).unwrap();
    let started = Instant::now();
    let out = server
        .cli()
        .env("RELEASE_TOKEN", &ci)
        .args(["upload", file.to_str().unwrap(), "--service", "api", "--json"])
        .assert_success();
    eprintln!("stored after {:?}", started.elapsed());
    assert_eq!(out.json()["created"], true, "{out}");
    assert!(out.stderr().contains("limits.upload_stall_timeout"), "{out}");
    assert!(out.stderr().contains("sending it again in 5 s"), "{out}");
    drop(held);
    assert_eq!(server.count("SELECT count(*) FROM artifacts"), 1);
}

/// A server with four upload turns, waited for 4 s at most, and four CI tokens.
fn four_turns() -> (TestServer, [String; 4]) {
    let server =
        TestServer::start_with(Backend::Local, "[limits]\nmax_concurrent_uploads = 4\nupload_stall_timeout = \"4s\"\n");
    let tokens = ["ci-a", "ci-b", "ci-c", "ci-web"].map(|name| server.token_with(name, "ci", &["--owner", "gitlab"]));
    (server, tokens)
}

/// Uploads of `tokens` taking their turns in this order, each trickling (see [`trickle`]).
fn trickling_uploads<const N: usize>(
    server: &TestServer,
    tokens: [&String; N],
    body: &[u8],
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> [TcpStream; N] {
    tokens.map(|token| {
        let stream = stalled_upload(&server.url, token, body, 1000);
        trickle(&stream, body[1000..].to_vec(), std::sync::Arc::clone(stop));
        std::thread::sleep(Duration::from_millis(200));
        stream
    })
}

/// Uploads with `token`, stored within 2 s.
fn stored_at_once(server: &TestServer, token: &str) {
    let started = Instant::now();
    let response = server
        .http()
        .post(format!("{}/v1/artifacts?service=api", server.url))
        .bearer_auth(token)
        .body(archive_of(100_000));
    let response = response.send().unwrap();
    assert_eq!(response.status(), StatusCode::CREATED, "{}", response.text().unwrap());
    assert!(started.elapsed() < Duration::from_secs(2), "stored after {:?}", started.elapsed());
}
