//! Kills at chosen moments rather than random ones: an upload between its publish and its row
//! or mid-body, a purge before its delete, an upload during a purge of the same bytes.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::releases::Fixture;
use crate::support::{Backend, TestServer};

use super::digest_of;

// Each violation the harness found, reproduced at its exact moment: the server dies there
// (`RELEASE_TEST_CRASH_AT`, an abort: nothing cleaned up, as after a SIGKILL), and the next
// start on the same data directory must leave the store as the invariants say.

/// A server that dies when it reaches `point`, with the usual tokens.
fn dying_at(backend: Backend, point: &str, env: &[(&str, &str)]) -> Fixture {
    let mut env = env.to_vec();
    env.push(("RELEASE_TEST_CRASH_AT", point));
    Fixture::adopt(TestServer::start_with_env(backend, "", &env))
}

/// Posts an upload the server dies in: no answer.
fn upload_dies(f: &Fixture, body: Vec<u8>) {
    let answer = f
        .server
        .http()
        .post(format!("{}/v1/artifacts?service=api", f.server.url))
        .bearer_auth(f.token("ci"))
        .body(body)
        .send();
    assert!(answer.is_err(), "the server answered instead of dying: {:?}", answer.map(|r| r.status()));
}

fn staged_rows(server: &TestServer) -> i64 {
    server.count("SELECT count(*) FROM staged_uploads")
}

fn killed_after_publish(backend: Backend) {
    let mut f = dying_at(backend, "upload-published", &[]);
    let body = crate::support::archives::valid("v1");
    let digest = digest_of(&body);
    upload_dies(&f, body);
    // The crash: verified bytes under their artifact key, no row names them.
    let keys: Vec<String> = f.server.artifact_keys().iter().map(ToString::to_string).collect();
    assert_eq!(keys, vec![digest.clone()]);
    assert_eq!(f.server.count("SELECT count(*) FROM artifacts"), 0);
    assert_eq!(staged_rows(&f.server), 1, "the upload is in the journal");
    f.server.restart();
    assert_eq!(f.server.artifact_keys(), vec![], "an object without its row after the restart\n{}", f.server.log());
    assert_eq!(f.server.staging_keys(), Vec::<String>::new());
    assert_eq!(staged_rows(&f.server), 0);
    assert!(f.server.log().contains("removed what an upload cut short by a stop left in the store"));
}

#[test]
fn an_upload_killed_between_its_publish_and_its_row_leaves_no_object_on_the_local_store() {
    killed_after_publish(Backend::Local);
}

#[test]
fn an_upload_killed_between_its_publish_and_its_row_leaves_no_object_on_s3() {
    killed_after_publish(Backend::S3);
}

fn killed_mid_body(backend: Backend) {
    let mut f = dying_at(backend, "upload-begun", &[]);
    upload_dies(&f, crate::support::archives::valid("v1"));
    // The crash: a staging upload begun (S3: a multipart upload, never listed as an object).
    assert!(!f.server.staging_keys().is_empty(), "the crash left a staging upload");
    f.server.restart();
    assert_eq!(f.server.staging_keys(), Vec::<String>::new(), "staging left after the restart\n{}", f.server.log());
    assert_eq!(staged_rows(&f.server), 0);
    assert_eq!(f.server.artifact_keys(), vec![]);
}

#[test]
fn an_upload_killed_mid_body_leaves_no_staging_on_the_local_store() {
    killed_mid_body(Backend::Local);
}

#[test]
fn an_upload_killed_mid_body_leaves_no_multipart_upload_on_s3() {
    killed_mid_body(Backend::S3);
}

fn killed_mid_purge(backend: Backend) {
    let mut f = dying_at(backend, "purge-recorded", &[("RELEASE_TEST_PURGE_DAY_MS", "200")]);
    let digest = f.upload("v1");
    std::thread::sleep(Duration::from_millis(400));
    let answer = f
        .server
        .http()
        .post(format!("{}/v1/artifacts/purge", f.server.url))
        .bearer_auth(f.token("root"))
        .json(&json!({"never_live": true, "older_than_days": 1}))
        .send();
    assert!(answer.is_err(), "the server answered instead of dying");
    // The crash: the purge is recorded, the bytes are still there.
    assert_eq!(f.server.count("SELECT count(*) FROM artifact_purges"), 1);
    let keys: Vec<String> = f.server.artifact_keys().iter().map(ToString::to_string).collect();
    assert_eq!(keys, vec![digest.clone()]);
    f.server.restart();
    assert_eq!(
        f.server.artifact_keys(),
        vec![],
        "bytes of a recorded purge left after the restart\n{}",
        f.server.log()
    );
    let blob = f
        .server
        .http()
        .get(format!("{}/v1/artifacts/{digest}/blob", f.server.url))
        .bearer_auth(f.token("carol"))
        .send()
        .unwrap();
    assert_eq!(blob.status(), reqwest::StatusCode::GONE);
}

#[test]
fn a_purge_killed_before_its_delete_leaves_no_bytes_on_the_local_store() {
    killed_mid_purge(Backend::Local);
}

#[test]
fn a_purge_killed_before_its_delete_leaves_no_bytes_on_s3() {
    killed_mid_purge(Backend::S3);
}

fn upload_during_purge(backend: Backend) {
    let env = [("RELEASE_TEST_PURGE_DAY_MS", "200"), ("RELEASE_TEST_STALL_AT", "purge-recorded:1500")];
    let f = Fixture::adopt(TestServer::start_with_env(backend, "", &env));
    let digest = f.upload("v1");
    std::thread::sleep(Duration::from_millis(400));
    std::thread::scope(|scope| {
        let purge = scope.spawn(|| {
            let body = json!({"never_live": true, "older_than_days": 1});
            let (status, answer) = f.post("root", "/v1/artifacts/purge", body);
            assert!(status.is_success(), "{answer}");
            answer
        });
        // The purge is recorded and waits before its delete: the same bytes come again.
        let deadline = Instant::now() + Duration::from_secs(10);
        while f.server.count("SELECT count(*) FROM artifact_purges") == 0 {
            assert!(Instant::now() < deadline, "the purge was never recorded");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(f.upload("v1"), digest, "the upload is acknowledged");
        assert_eq!(purge.join().unwrap()["purged"], json!([digest]));
    });
    // Acknowledged after the purge was recorded: its bytes are there, and recorded restored.
    assert_eq!(f.server.count("SELECT count(*) FROM artifact_restores"), 1);
    let blob = f
        .server
        .http()
        .get(format!("{}/v1/artifacts/{digest}/blob", f.server.url))
        .bearer_auth(f.token("carol"))
        .send()
        .unwrap();
    assert_eq!(blob.status(), reqwest::StatusCode::OK, "an acknowledged upload lost its bytes to a purge");
    assert_eq!(digest_of(&blob.bytes().unwrap()), digest);
}

#[test]
fn an_upload_during_a_purge_of_the_same_bytes_keeps_them_on_the_local_store() {
    upload_during_purge(Backend::Local);
}

#[test]
fn an_upload_during_a_purge_of_the_same_bytes_keeps_them_on_s3() {
    upload_during_purge(Backend::S3);
}
