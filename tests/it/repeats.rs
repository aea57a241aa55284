//! A repeat that would change nothing is not checked again (N4 of the stop-33 attack: an
//! upload of ~500,000 empty files cost ~2 CPU-seconds to check, at every send of it). When
//! the upload names its digest before its bytes (`X-Release-Digest`, as `release upload`
//! does), the token's repeat of it is on record within the last 10 minutes, the store holds
//! the bytes and nothing would be recorded, the body is hashed without a turn and not checked
//! as an archive, and the answer is what is on record. Every other upload is checked as before.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::{Backend, TestServer, archives, raw};
use crate::timeouts::{archive_of, stalled_upload};
use crate::turns::trickle;

fn post(server: &TestServer, token: &str, service: &str, digest: Option<&str>, body: &[u8]) -> (StatusCode, Value) {
    let mut request = server.http().post(format!("{}/v1/artifacts?service={service}", server.url)).bearer_auth(token);
    if let Some(digest) = digest {
        request = request.header("X-Release-Digest", digest);
    }
    let response = request.body(body.to_vec()).send().unwrap();
    (response.status(), response.json().unwrap())
}

fn a_quiet_repeat_needs_no_turn_and_is_not_checked_again(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        "[limits]\nmax_concurrent_uploads = 1\nupload_stall_timeout = \"2s\"\nmin_upload_rate = \"1B\"\n",
    );
    let ci = server.token("ci", "ci");
    let body = archives::valid("<?php echo 'repeated';");
    let digest = release::digest::Digest::of(&body).to_string();
    let named = digest.clone();
    let digest = Some(digest.as_str());
    assert_eq!(post(&server, &ci, "api", digest, &body).0, StatusCode::CREATED);
    // The first repeat is checked, and on record.
    assert_eq!(post(&server, &ci, "api", digest, &body).0, StatusCode::OK);
    let events = || server.count("SELECT count(*) FROM audit_events WHERE action = 'artifact.upload'");
    let on_record = events();
    assert_eq!(on_record, 2, "the upload and its first repeat");

    // Another token's upload holds the only turn, trickling.
    let other = server.token("ci-other", "ci");
    let stop = Arc::new(AtomicBool::new(false));
    let held_body = archive_of(200_000);
    let held = stalled_upload(&server.url, &other, &held_body, 1000);
    trickle(&held, held_body[1000..].to_vec(), Arc::clone(&stop));
    std::thread::sleep(Duration::from_millis(300));

    // The next repeats need no turn: answered at once, from the record.
    let started = Instant::now();
    let (status, answer) = post(&server, &ci, "api", digest, &body);
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!((answer["digest"].as_str(), answer["created"].as_bool()), (digest, Some(false)), "{answer}");
    // (A checked upload would wait for the turn, and get 503 after the 2 s stall.)
    assert!(started.elapsed() < Duration::from_millis(1900), "answered after {:?}", started.elapsed());
    // Still hashed: other bytes of its size under the digest, or a trailer naming other bytes,
    // are refused. (Bytes of another size go the checked way, below.)
    let mut other_bytes = body.clone();
    *other_bytes.last_mut().unwrap() ^= 1;
    let (status, answer) = post(&server, &ci, "api", digest, &other_bytes);
    assert_eq!((status, answer["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("digest_mismatch")));
    let mut chunked = raw::connect(&server.url);
    let zeros = format!("sha256:{}", "0".repeat(64));
    write!(
        chunked,
        "POST /v1/artifacts?service=api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ci}\r\nX-Release-Digest: {}\r\n\
         Transfer-Encoding: chunked\r\nTrailer: X-Release-Digest\r\n\r\n{:x}\r\n",
        named,
        body.len()
    )
    .unwrap();
    chunked.write_all(&body).unwrap();
    write!(chunked, "\r\n0\r\nX-Release-Digest: {zeros}\r\n\r\n").unwrap();
    let answer = raw::read_answer(&mut chunked, Duration::from_secs(5)).unwrap();
    assert_eq!(answer.status, 422, "{answer:?}");
    assert!(answer.json()["error"]["message"].as_str().unwrap().contains(&zeros), "{answer:?}");
    assert_eq!(events(), on_record, "nothing recorded");

    // Every other upload goes the checked way, which needs the turn: it waits, and is told
    // to come back. Without the digest header; another token's first repeat; for another
    // service (a new upload record).
    let third = server.token("ci-third", "ci");
    for (token, service, digest) in [(&ci, "api", None), (&third, "api", digest), (&ci, "worker", digest)] {
        let (status, answer) = post(&server, token, service, digest, &body);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{service} {digest:?}: {answer}");
        assert_eq!(answer["error"]["code"], "busy");
    }
    stop.store(true, Ordering::Relaxed);
    drop(held);
    assert_eq!(server.count("SELECT count(*) FROM artifacts"), 1);
    assert_eq!(server.count("SELECT count(*) FROM artifact_uploads"), 1);
    assert_eq!(events(), on_record);
    server.assert_no_staging_left();
}

#[test]
fn a_quiet_repeat_needs_no_turn_and_is_not_checked_again_local() {
    a_quiet_repeat_needs_no_turn_and_is_not_checked_again(Backend::Local);
}

#[test]
fn a_quiet_repeat_needs_no_turn_and_is_not_checked_again_s3() {
    a_quiet_repeat_needs_no_turn_and_is_not_checked_again(Backend::S3);
}

/// A quiet repeat is hashed while nothing holds its record: a purge of its bytes meanwhile
/// makes it `503 busy` after the body (nothing recorded), and the upload sent again takes the
/// checked way and brings the bytes back.
#[test]
fn a_repeat_whose_bytes_are_purged_while_it_is_read_is_told_to_come_back() {
    let server = TestServer::start_with_env(
        Backend::Local,
        "[limits]\nupload_stall_timeout = \"5s\"\nmin_upload_rate = \"1B\"\n",
        &[crate::curation::SHORT_DAY],
    );
    let (ci, root) = (server.token("ci", "ci"), server.token("root", "admin"));
    let body = archive_of(300_000);
    let digest = release::digest::Digest::of(&body).to_string();
    assert_eq!(post(&server, &ci, "api", Some(&digest), &body).0, StatusCode::CREATED);
    assert_eq!(post(&server, &ci, "api", Some(&digest), &body).0, StatusCode::OK, "the repeat on record");

    let events = || server.count("SELECT count(*) FROM audit_events WHERE action = 'artifact.upload'");
    let on_record = events();
    // The next one is quiet: half its body sent, then its bytes purged.
    let mut quiet = raw::connect(&server.url);
    write!(
        quiet,
        "POST /v1/artifacts?service=api HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ci}\r\nX-Release-Digest: {digest}\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    quiet.write_all(&body[..body.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let purge = server
        .http()
        .post(format!("{}/v1/artifacts/purge", server.url))
        .bearer_auth(&root)
        .json(&serde_json::json!({"never_live": true, "older_than_days": 1}))
        .send()
        .unwrap();
    assert_eq!(purge.status(), StatusCode::OK);
    assert_eq!(purge.json::<Value>().unwrap()["purged"], serde_json::json!([digest]));
    quiet.write_all(&body[body.len() / 2..]).unwrap();
    let answer = raw::read_answer(&mut quiet, Duration::from_secs(5)).unwrap();
    assert_eq!((answer.status, answer.json()["error"]["code"].as_str()), (503, Some("busy")), "{answer:?}");
    assert!(answer.json()["error"]["message"].as_str().unwrap().contains("record changed"), "{answer:?}");
    assert!(answer.head.to_ascii_lowercase().contains("retry-after: "), "{}", answer.head);
    assert_eq!(events(), on_record, "nothing recorded");

    // Sent again: checked, and the bytes are back.
    let (status, answer) = post(&server, &ci, "api", Some(&digest), &body);
    assert_eq!(status, StatusCode::OK, "{answer}");
    let meta: Value = server
        .http()
        .get(format!("{}/v1/artifacts/{digest}", server.url))
        .bearer_auth(&ci)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(meta["stored"], true, "{meta}");
    server.assert_no_staging_left();
}
