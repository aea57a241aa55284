//! SPEC 9, the rows about uploads, tokens and archives: each refusal names what was wrong and
//! leaves nothing behind — no object under an artifact key, no staging object, no row.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::archives::{self, CHAR_DEVICE, FIFO, HARDLINK, RawTar, zstd};
use crate::support::{Backend, TestServer};

/// Posts `body` as service `api` with a ci token, expects `status` and `code`, a message that
/// contains `says`, and nothing stored.
fn refused(server: &TestServer, body: Vec<u8>, status: StatusCode, code: &str, says: &str) {
    let (answered, answer) = server.upload_as_new_ci(body);
    assert_eq!(answered, status, "{answer}");
    assert_eq!(answer["error"]["code"], code, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains(says), "message {message:?} should contain {says:?}");
    server.assert_nothing_stored();
}

fn unsafe_archive(body: Vec<u8>, says: &str) {
    let server = TestServer::start(Backend::Local);
    refused(&server, body, StatusCode::UNPROCESSABLE_ENTITY, "unsafe_archive", says);
}

#[test]
fn digest_mismatch_stores_nothing_local() {
    digest_mismatch(Backend::Local);
}

#[test]
fn digest_mismatch_stores_nothing_s3() {
    digest_mismatch(Backend::S3);
}

fn digest_mismatch(backend: Backend) {
    let server = TestServer::start(backend);
    let ci = server.token("ci", "ci");
    let body = archives::valid("<?php");
    let claimed = release::digest::Digest::of(b"something else");
    let response = server
        .http()
        .post(format!("{}/v1/artifacts?service=api", server.url))
        .bearer_auth(&ci)
        .header("X-Release-Digest", claimed.to_string())
        .body(body)
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let answer: Value = response.json().unwrap();
    assert_eq!(answer["error"]["code"], "digest_mismatch");
    assert!(answer["error"]["message"].as_str().unwrap().contains(&claimed.to_string()));
    server.assert_nothing_stored();
}

#[test]
fn absolute_path() {
    unsafe_archive(zstd(&RawTar::new().file("/etc/cron.d/evil", b"* * * * * root sh").finish()), "absolute");
}

#[test]
fn parent_dir_component() {
    unsafe_archive(zstd(&RawTar::new().file("public/../../../etc/passwd", b"x").finish()), "`..`");
}

#[test]
fn symlink_escaping_then_a_file_written_through_it() {
    let tar = RawTar::new().symlink("evil", "../../../etc").file("evil/cron.d/x", b"boom").finish();
    unsafe_archive(zstd(&tar), "link target \"../../../etc\"");
}

#[test]
fn file_written_through_an_in_tree_symlink() {
    let tar = RawTar::new().dir("real").symlink("alias", "real").file("alias/x", b"x").finish();
    unsafe_archive(zstd(&tar), "under the symbolic link \"alias\"");
}

#[test]
fn absolute_symlink() {
    unsafe_archive(zstd(&RawTar::new().symlink("public/passwd", "/etc/passwd").finish()), "/etc/passwd");
}

#[test]
fn hardlink_out_of_the_tree() {
    let tar = RawTar::new().entry("shadow", HARDLINK, 0o644, "/etc/shadow", b"").finish();
    unsafe_archive(zstd(&tar), "/etc/shadow");
    let tar = RawTar::new().entry("up", HARDLINK, 0o644, "../outside", b"").finish();
    unsafe_archive(zstd(&tar), "../outside");
}

#[test]
fn device_file() {
    let tar = RawTar::new().entry("dev/sda", CHAR_DEVICE, 0o600, "", b"").finish();
    unsafe_archive(zstd(&tar), "device entries are not allowed");
}

#[test]
fn fifo() {
    let tar = RawTar::new().entry("pipe", FIFO, 0o644, "", b"").finish();
    unsafe_archive(zstd(&tar), "fifo entries are not allowed");
}

#[test]
fn setuid_bit() {
    let tar = RawTar::new().entry("bin/su", archives::REGULAR, 0o4755, "", b"\x7fELF").finish();
    unsafe_archive(zstd(&tar), "setuid");
}

#[test]
fn not_zstd() {
    let plain_tar = RawTar::new().file("a", b"x").finish();
    unsafe_archive(plain_tar, "not a zstd stream");
}

#[test]
fn zstd_of_garbage() {
    let garbage: Vec<u8> = (0..10_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    unsafe_archive(zstd(&garbage), "not a valid tar stream");
}

#[test]
fn truncated_tar() {
    let tar = RawTar::new().file("big", &vec![b'x'; 10_000]).finish();
    unsafe_archive(zstd(&tar[..4096]), "truncated");
    let unfinished = RawTar::new().file("a", b"x").unfinished();
    unsafe_archive(zstd(&unfinished), "no end-of-archive marker");
}

#[test]
fn a_long_name_bomb() {
    // A GNU long-name entry would be read into memory whole: it is capped, far below the limits.
    let tar = RawTar::new().entry("././@LongLink", b'L', 0o644, "", &vec![b'a'; 8 << 20]).file("x", b"").finish();
    unsafe_archive(zstd(&tar), "long-name or PAX header of 8388608 bytes");
}

#[test]
fn zstd_bomb_past_the_limit() {
    let server = TestServer::start_with(Backend::Local, "[limits]\nmax_unpacked_bytes = \"16MiB\"\n");
    let bomb = zstd(&RawTar::new().file("zeros", &vec![0u8; 64 << 20]).finish());
    assert!(bomb.len() < 64 << 10, "a real bomb: {} bytes", bomb.len());
    refused(&server, bomb, StatusCode::UNPROCESSABLE_ENTITY, "archive_too_large", "max_unpacked_bytes");
}

#[test]
fn too_many_files() {
    let server = TestServer::start_with(Backend::Local, "[limits]\nmax_files = 100\n");
    let mut tar = RawTar::new();
    for i in 0..101 {
        tar = tar.file(&format!("f{i}"), b"");
    }
    refused(&server, zstd(&tar.finish()), StatusCode::UNPROCESSABLE_ENTITY, "archive_too_large", "max_files");
}

#[test]
fn upload_larger_than_the_limit() {
    let server = TestServer::start_with(Backend::Local, "[limits]\nmax_upload_bytes = \"64KiB\"\n");
    let big: Vec<u8> = {
        use rand::RngExt;
        let mut rng = rand::rng();
        (0..200_000).map(|_| rng.random::<u8>()).collect()
    };
    let body = zstd(&RawTar::new().file("noise", &big).finish());
    refused(&server, body, StatusCode::PAYLOAD_TOO_LARGE, "upload_too_large", "max_upload_bytes");
}

#[test]
fn a_shared_path_of_a_configured_service() {
    let server = TestServer::start_with(Backend::Local, "[service.api]\nkind = \"laravel\"\n");
    let tar = RawTar::new().file("public/index.php", b"<?php").file(".env", b"APP_KEY=secret").finish();
    refused(
        &server,
        zstd(&tar),
        StatusCode::UNPROCESSABLE_ENTITY,
        "unsafe_archive",
        "\".env\" is kept in the service's shared/",
    );
    let tar = RawTar::new().file("storage/logs/laravel.log", b"").finish();
    refused(&server, zstd(&tar), StatusCode::UNPROCESSABLE_ENTITY, "unsafe_archive", "\"storage\"");
}

fn raw_request_head(server: &TestServer, token: &str, framing: &str) -> (TcpStream, String) {
    let addr = server.url.trim_start_matches("http://").to_owned();
    let stream = TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST /v1/artifacts?service=api HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n{framing}\r\n\r\n"
    );
    (stream, head)
}

fn cut_off(backend: Backend) {
    let server = TestServer::start(backend);
    let ci = server.token("ci", "ci");
    let body = archives::valid(&"x".repeat(100_000));
    let (mut stream, head) = raw_request_head(&server, &ci, &format!("Content-Length: {}", body.len()));
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body[..body.len() / 2]).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(!answer.contains("201") && !answer.contains("200 OK"), "a cut-off upload was accepted: {answer}");
    server.assert_nothing_stored();
    assert!(server.log().contains("status=400"), "the refusal is logged\n{}", server.log());
}

#[test]
fn cut_off_upload_stores_nothing_local() {
    cut_off(Backend::Local);
}

#[test]
fn cut_off_upload_stores_nothing_s3() {
    cut_off(Backend::S3);
}

#[test]
fn server_killed_mid_upload_leaves_no_artifact() {
    let mut server = TestServer::start(Backend::Local);
    let ci = server.token("ci", "ci");
    let body = archives::valid(&"z".repeat(3_000_000));
    let (mut stream, head) = raw_request_head(&server, &ci, &format!("Content-Length: {}", body.len() + 1000));
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body).unwrap();
    stream.flush().unwrap();
    // Wait until the staging object exists, then kill the server mid-body.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.staging_keys().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the upload never reached the store\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill();
    assert!(!server.staging_keys().is_empty(), "a crash leaves the staging file");
    assert!(server.artifact_keys().is_empty(), "but nothing under an artifact key");
    server.restart();
    server.assert_nothing_stored();
    assert!(server.log().contains("removed staging uploads"), "{}", server.log());
}

fn status_and_code(response: reqwest::blocking::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().unwrap();
    (status, body["error"]["code"].as_str().unwrap_or_default().to_owned())
}

fn upload_as(server: &TestServer, token: Option<&str>, service: &str) -> reqwest::blocking::Response {
    let request =
        server.http().post(format!("{}/v1/artifacts?service={service}", server.url)).body(archives::valid("x"));
    match token {
        Some(t) => request.bearer_auth(t),
        None => request,
    }
    .send()
    .unwrap()
}

#[test]
fn missing_token_is_401() {
    let server = TestServer::start(Backend::Local);
    let response = upload_as(&server, None, "api");
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_eq!(status_and_code(response), (StatusCode::UNAUTHORIZED, "unauthenticated".into()));
    server.assert_nothing_stored();
    assert!(server.log().contains("refused: missing token"), "{}", server.log());
}

#[test]
fn unknown_token_is_401() {
    let server = TestServer::start(Backend::Local);
    let real = server.token("ci", "ci");
    let forged = format!("{}{}", &real[..real.len() - 4], "0000");
    assert_eq!(
        status_and_code(upload_as(&server, Some(&forged), "api")),
        (StatusCode::UNAUTHORIZED, "unauthenticated".into())
    );
    assert_eq!(
        status_and_code(upload_as(&server, Some("hunter2"), "api")),
        (StatusCode::UNAUTHORIZED, "unauthenticated".into())
    );
    server.assert_nothing_stored();
    assert!(!server.log().contains(&real[20..]), "the log never holds a secret");
}

#[test]
fn revoked_token_is_401() {
    let server = TestServer::start(Backend::Local);
    let ci = server.token("ci", "ci");
    server.cli().args(["token", "revoke", "ci"]).assert_success();
    let response = upload_as(&server, Some(&ci), "api");
    let status = response.status();
    let body: Value = response.json().unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"]["message"].as_str().unwrap().contains("revoked"), "{body}");
    server.assert_nothing_stored();
}

#[test]
fn wrong_role_is_403() {
    let server = TestServer::start(Backend::Local);
    for role in ["auditor", "deployer", "approver"] {
        let token = server.token(role, role);
        let response = upload_as(&server, Some(&token), "api");
        let status = response.status();
        let body: Value = response.json().unwrap();
        assert_eq!(status, StatusCode::FORBIDDEN, "{role}");
        assert_eq!(body["error"]["code"], "forbidden");
        assert!(body["error"]["message"].as_str().unwrap().contains("may not upload artifacts"), "{body}");
    }
    server.assert_nothing_stored();
}

#[test]
fn a_token_limited_to_other_services_is_403() {
    let server = TestServer::start(Backend::Local);
    let ci_api = server.token_with("ci-api", "ci", &["--services", "api"]);
    let response = upload_as(&server, Some(&ci_api), "play");
    let status = response.status();
    let body: Value = response.json().unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["error"]["message"].as_str().unwrap().contains("\"play\" is not one of them"), "{body}");
    server.assert_nothing_stored();
    assert_eq!(upload_as(&server, Some(&ci_api), "api").status(), StatusCode::CREATED);
}

#[test]
fn a_bad_service_name_is_400() {
    let server = TestServer::start(Backend::Local);
    let ci = server.token("ci", "ci");
    let (status, code) = status_and_code(upload_as(&server, Some(&ci), "Bad_Name"));
    assert_eq!((status, code.as_str()), (StatusCode::BAD_REQUEST, "bad_request"));
    server.assert_nothing_stored();
}

/// A chunked upload whose digest follows the body as a trailer, as `release upload FILE` sends it.
fn upload_with_trailer(server: &TestServer, token: &str, body: &[u8], trailer: &str) -> String {
    let (mut stream, head) =
        raw_request_head(server, token, "Transfer-Encoding: chunked\r\nTrailer: X-Release-Digest\r\nConnection: close");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(format!("{:x}\r\n", body.len()).as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    stream.write_all(format!("\r\n0\r\nX-Release-Digest: {trailer}\r\n\r\n").as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn digest_mismatch_in_a_trailer_stores_nothing() {
    let server = TestServer::start(Backend::Local);
    let ci = server.token("ci", "ci");
    let body = archives::valid("<?php");
    let wrong = release::digest::Digest::of(b"other bytes");
    let answer = upload_with_trailer(&server, &ci, &body, &wrong.to_string());
    assert!(answer.starts_with("HTTP/1.1 422"), "{answer}");
    assert!(answer.contains("digest_mismatch") && answer.contains(&wrong.to_string()), "{answer}");
    server.assert_nothing_stored();

    let bad = upload_with_trailer(&server, &ci, &body, "md5:abc");
    assert!(bad.starts_with("HTTP/1.1 400") && bad.contains("X-Release-Digest trailer"), "{bad}");
    server.assert_nothing_stored();

    let right = release::digest::Digest::of(&body);
    let ok = upload_with_trailer(&server, &ci, &body, &right.to_string());
    assert!(ok.starts_with("HTTP/1.1 201"), "{ok}");
}

#[test]
fn the_s3_staging_check_sees_unfinished_multipart_uploads() {
    // The "nothing left behind" assertions on S3 are only worth something if an upload that
    // was begun and never finished shows up; this proves the harness can see one.
    let server = TestServer::start(Backend::S3);
    assert!(server.staging_keys().is_empty());
    let upload = crate::support::block_on(async {
        let mut upload = server.store().begin_upload(uuid::Uuid::new_v4()).await.unwrap();
        upload.write(bytes::Bytes::from(vec![1u8; 1000])).await.unwrap();
        upload
    });
    let seen = server.staging_keys();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].starts_with("multipart:") && seen[0].contains("/uploads/"), "{seen:?}");
    crate::support::block_on(upload.abort());
    assert!(server.staging_keys().is_empty());
}

#[test]
fn client_gone_mid_body_stores_nothing_local() {
    client_gone_mid_body(Backend::Local);
}

#[test]
fn client_gone_mid_body_stores_nothing_s3() {
    client_gone_mid_body(Backend::S3);
}

fn client_gone_mid_body(backend: Backend) {
    let server = TestServer::start(backend);
    let ci = server.token("ci", "ci");
    let body = archives::valid(&"y".repeat(200_000));
    let (mut stream, head) = raw_request_head(&server, &ci, "Transfer-Encoding: chunked");
    stream.write_all(head.as_bytes()).unwrap();
    let part = &body[..body.len() / 3];
    stream.write_all(format!("{:x}\r\n", part.len()).as_bytes()).unwrap();
    stream.write_all(part).unwrap();
    stream.write_all(b"\r\n").unwrap();
    stream.flush().unwrap();
    // The staging file exists while the body streams in...
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.staging_keys().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the upload never reached the store\n{}", server.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stream);
    // ...and is gone once the client is.
    server.assert_nothing_stored();
}
