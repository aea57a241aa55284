//! A repeat that would change nothing is not checked again (N4 of the stop-33 attack: an
//! upload of ~500,000 empty files cost ~2 CPU-seconds to check, at every send of it). When
//! the upload names its digest before its bytes (`X-Release-Digest`, as `release upload`
//! does), the token's repeat of it is on record within the last 10 minutes, the store holds
//! the bytes and nothing would be recorded, the body is read to its end without being looked
//! at, and the answer is what is on record. Every other upload is checked as before.

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::{Backend, TestServer, archives};

fn post(server: &TestServer, token: &str, service: &str, digest: Option<&str>, body: &[u8]) -> (StatusCode, Value) {
    let mut request = server.http().post(format!("{}/v1/artifacts?service={service}", server.url)).bearer_auth(token);
    if let Some(digest) = digest {
        request = request.header("X-Release-Digest", digest);
    }
    let response = request.body(body.to_vec()).send().unwrap();
    (response.status(), response.json().unwrap())
}

fn a_quiet_repeat_is_not_checked_again(backend: Backend) {
    let server = TestServer::start(backend);
    let ci = server.token("ci", "ci");
    let body = archives::valid("<?php echo 'repeated';");
    let digest = release::digest::Digest::of(&body).to_string();
    let digest = Some(digest.as_str());
    assert_eq!(post(&server, &ci, "api", digest, &body).0, StatusCode::CREATED);
    // The first repeat is checked, and on record.
    assert_eq!(post(&server, &ci, "api", digest, &body).0, StatusCode::OK);
    let events = || server.count("SELECT count(*) FROM audit_events WHERE action = 'artifact.upload'");
    let on_record = events();
    assert_eq!(on_record, 2, "the upload and its first repeat");

    // The next ones are not checked: bytes that are not even an archive get the answer on record.
    let not_an_archive = b"these bytes are not looked at".repeat(1000);
    let (status, answer) = post(&server, &ci, "api", digest, &not_an_archive);
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!((answer["digest"].as_str(), answer["created"].as_bool()), (digest, Some(false)), "{answer}");
    assert_eq!(events(), on_record, "nothing recorded");
    assert_eq!(server.count("SELECT count(*) FROM artifacts"), 1);
    server.assert_no_staging_left();

    // Every other upload is checked: without the digest header; another token's first repeat;
    // for another service (a new upload record); with a trailer naming other bytes.
    let refused = |token: &str, service: &str, digest: Option<&str>| {
        let (status, answer) = post(&server, token, service, digest, &not_an_archive);
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{token} {service} {digest:?}: {answer}");
    };
    refused(&ci, "api", None);
    let other = server.token("ci-other", "ci");
    refused(&other, "api", digest);
    refused(&ci, "worker", digest);
    assert_eq!(server.count("SELECT count(*) FROM artifacts"), 1);
    assert_eq!(server.count("SELECT count(*) FROM artifact_uploads"), 1);
    server.assert_no_staging_left();
    // And the real bytes, repeated quietly, are answered as before.
    let (status, answer) = post(&server, &ci, "api", digest, &body);
    assert_eq!((status, answer["digest"].as_str()), (StatusCode::OK, digest));
}

#[test]
fn a_quiet_repeat_is_not_checked_again_local() {
    a_quiet_repeat_is_not_checked_again(Backend::Local);
}

#[test]
fn a_quiet_repeat_is_not_checked_again_s3() {
    a_quiet_repeat_is_not_checked_again(Backend::S3);
}
