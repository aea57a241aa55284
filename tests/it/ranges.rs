//! Fewer bytes on the wire (issue 15 part 2): the server's signed node URL answers ranges as
//! the blob route does, and a node reads only the frames it lacks, one ranged GET per run of
//! frames, from that URL and from a real S3 server (Garage) by a presigned URL; and the
//! store's reads of those runs, which the server sends a node that asks on its stdin.

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use release::archive::{Frame, FrameScanner};
use release::digest::Digest;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::inprocess::InProcessServer;
use crate::support::{Backend, TestCommand, TestServer, app_tree, archives, block_on};

fn api() -> String {
    format!("[service.api]\nkind = \"generic\"\n{}", crate::support::local_nodes("api", &["staging"]))
}

fn upload(server: &InProcessServer, ci: &str, bytes: Vec<u8>) -> Digest {
    let response =
        reqwest::blocking::Client::new().post(format!("{}/v1/artifacts?service=api", server.url)).bearer_auth(ci);
    let uploaded: Value = response.body(bytes).send().unwrap().json().unwrap();
    uploaded["digest"].as_str().unwrap_or_else(|| panic!("{uploaded}")).parse().unwrap()
}

fn now() -> i64 {
    release::utc::now().unix_timestamp()
}

#[test]
fn the_signed_node_url_answers_ranges_as_the_blob_route_does() {
    let server = InProcessServer::start(&api(), Arc::new(release::releases::RecordOnly));
    let ci = server.token("ci", "ci", "gitlab");
    let root = server.token("root", "admin", "root");
    let bytes = archives::valid("v1");
    let size = bytes.len();
    let digest = upload(&server, &ci, bytes.clone());
    // Signed in this process, as the deploy that hands it to a node signs it.
    let url = release::deploy::fetch::url(&server.url, digest, now());
    let http = reqwest::blocking::Client::new();
    let get = |url: &str, range: Option<&str>| {
        let request = http.get(url);
        match range {
            Some(range) => request.header("Range", range),
            None => request,
        }
        .send()
        .unwrap()
    };

    let whole = get(&url, None);
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(whole.bytes().unwrap(), bytes);

    let part = get(&url, Some("bytes=10-99"));
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.headers()["content-range"], format!("bytes 10-99/{size}"));
    assert_eq!(part.headers()["content-length"], "90");
    assert_eq!(part.bytes().unwrap(), &bytes[10..100]);
    let tail = get(&url, Some("bytes=-16"));
    assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(tail.headers()["content-range"], format!("bytes {}-{}/{size}", size - 16, size - 1));
    assert_eq!(tail.bytes().unwrap(), &bytes[size - 16..]);

    let beyond = get(&url, Some(&format!("bytes={size}-")));
    assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(beyond.headers()["content-range"], format!("bytes */{size}"));
    assert!(beyond.text().unwrap().contains("range_not_satisfiable"));

    // A range opens nothing without this server's signature.
    let forged = url.split("&sig=").next().unwrap().to_owned() + &format!("&sig={}", "00".repeat(32));
    let refused = get(&forged, Some("bytes=10-99"));
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(refused.text().unwrap().contains("not signed by this server"));

    // Nor, once the artifact is blocked, by a URL handed out before.
    let blocked = http
        .post(format!("{}/v1/artifacts/{digest}/block", server.url))
        .bearer_auth(&root)
        .json(&json!({"reason": "leaks a key"}))
        .send()
        .unwrap();
    assert!(blocked.status().is_success(), "{}", blocked.text().unwrap());
    let refused = get(&url, Some("bytes=10-99"));
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    let text = refused.text().unwrap();
    assert!(text.contains("is blocked: leaks a key"), "{text}");
}

/// A packaged artifact of several frames: its bytes and its frame table (as ingest lays it).
fn multi_frame_artifact(work: &std::path::Path) -> (std::path::PathBuf, Vec<u8>, Vec<Frame>) {
    let src = work.join("app");
    app_tree(&src, "2.0.0");
    // Files of about half `archive::FRAME_TARGET` (lines of ~12 bytes): a frame of two or three.
    let lines = release::archive::FRAME_TARGET / 24;
    for i in 0..24u64 {
        let path = src.join(format!("vendor/pkg{}/C{i}.php", i % 5));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let text: String = (0..lines).map(|n| format!("$v{} = {};\n", (n * 7 + i) % 101, (n * i) % 977)).collect();
        fs::write(path, text).unwrap();
    }
    let archive = work.join("app.tar.zst");
    TestCommand::new().args(["package", src.to_str().unwrap(), "-o", archive.to_str().unwrap()]).assert_success();
    let bytes = fs::read(&archive).unwrap();
    let raw = zstd::decode_all(&bytes[..]).unwrap().len() as u64;
    let mut scanner = FrameScanner::new();
    scanner.feed(&bytes);
    let frames = scanner.finish(bytes.len() as u64, raw, Digest::of(&bytes));
    assert!(frames.len() >= 7, "{} frames for {raw} bytes of tar stream", frames.len());
    (archive, bytes, frames)
}

/// Frames 1, 2 and 4 and the last two, through `url`: each frame's bytes hash as the index
/// says, and only those frames' bytes were fetched.
fn fetch_some_frames(url: &str, bytes: &[u8], frames: &[Frame]) {
    let last = frames.len() - 1;
    let needed = [1, 2, 4, last - 1, last];
    let (got, fetched) = release::node::fetch_frames(url, frames, &needed, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{}", e.message));
    assert_eq!(got.len(), needed.len());
    for (data, &n) in got.iter().zip(&needed) {
        let frame = &frames[n];
        assert_eq!(Digest::of(data), frame.sha256, "frame {n}: {frame:?}");
        assert_eq!(data.as_slice(), &bytes[frame.offset as usize..(frame.offset + frame.length) as usize]);
    }
    let asked: u64 = needed.iter().map(|&n| frames[n].length).sum();
    assert_eq!(fetched, asked);
    assert!(fetched < bytes.len() as u64, "{fetched} of {} bytes", bytes.len());
}

#[test]
fn a_node_fetches_only_the_frames_it_lacks_by_the_signed_node_url() {
    let server = InProcessServer::start(&api(), Arc::new(release::releases::RecordOnly));
    let ci = server.token("ci", "ci", "gitlab");
    let work = tempfile::tempdir().unwrap();
    let (_, bytes, frames) = multi_frame_artifact(work.path());
    let digest = upload(&server, &ci, bytes.clone());
    fetch_some_frames(&release::deploy::fetch::url(&server.url, digest, now()), &bytes, &frames);

    // Refused: the fetch says so, and never shows the signature.
    let url = release::deploy::fetch::url(&server.url, digest, now());
    let sig = url.split("&sig=").nth(1).unwrap().to_owned();
    let forged = url.replace(&sig, &"00".repeat(32));
    let e = release::node::fetch_frames(&forged, &frames, &[1], Duration::from_secs(60)).unwrap_err();
    assert_eq!(e.code, release::node::ErrorCode::Fetch);
    assert!(e.message.contains("HTTP 403"), "{}", e.message);
    assert!(!e.message.contains(&sig) && !e.message.contains("sig="), "{}", e.message);
}

#[test]
fn a_node_fetches_only_the_frames_it_lacks_from_s3_by_a_presigned_url() {
    let server = TestServer::start(Backend::S3);
    let ci = server.token("ci", "ci");
    let work = tempfile::tempdir().unwrap();
    let (archive, bytes, frames) = multi_frame_artifact(work.path());
    let uploaded = server
        .cli()
        .env("RELEASE_TOKEN", &ci)
        .args(["upload", archive.to_str().unwrap(), "--service", "api", "--json"])
        .assert_success()
        .json();
    let digest: Digest = uploaded["digest"].as_str().unwrap().parse().unwrap();
    // The URL a deploy hands the node.
    let url = block_on(server.store().presigned_get(digest)).unwrap().expect("an S3 store presigns");
    fetch_some_frames(&url, &bytes, &frames);

    let forged = url.replace("X-Amz-Signature=", "X-Amz-Signature=0");
    let e = release::node::fetch_frames(&forged, &frames, &[1], Duration::from_secs(60)).unwrap_err();
    assert!(e.message.contains("HTTP 403"), "{}", e.message);
    assert!(!e.message.contains("X-Amz"), "{}", e.message);
}

/// What a node that lacks some frames is sent: the artifact's bytes in those ranges, in order,
/// across the local backend's read pieces (1 MiB) and from one open file; a range that is empty
/// or not within the object is refused, naming it, on both backends (S3 would answer a range
/// past the end with the bytes there are).
fn ranged_reads(backend: Backend) {
    let server = TestServer::start(backend);
    let ci = server.token("ci", "ci");
    let body = archives::zstd(&archives::RawTar::new().file("big", &archives::letters(7, 4 << 20)).finish());
    assert!(body.len() > 2 << 20, "spans more than two read pieces: {} bytes", body.len());
    let response = server.http().post(format!("{}/v1/artifacts?service=api", server.url)).bearer_auth(&ci);
    assert_eq!(response.body(body.clone()).send().unwrap().status(), StatusCode::CREATED);
    let digest = server.artifact_keys()[0];
    let size = body.len() as u64;
    let read = |ranges: Vec<std::ops::Range<u64>>| {
        block_on(async {
            use futures::TryStreamExt as _;
            let stream = server.store().read_artifact_ranges(digest, ranges).await?;
            stream.try_collect::<Vec<bytes::Bytes>>().await.map(|chunks| chunks.concat())
        })
    };
    let ranges = vec![0..10, 10..20, 100..100 + (2 << 20) + 1000, size - 5..size];
    let expected: Vec<u8> = ranges.iter().flat_map(|r| body[r.start as usize..r.end as usize].to_vec()).collect();
    assert_eq!(read(ranges).unwrap(), expected);
    assert!(read(vec![]).unwrap().is_empty());
    for bad in [size - 5..size + 5, size..size + 1, 20..20] {
        let refused = read(vec![0..10, bad.clone()]).expect_err("a range not within the object is refused");
        let text = refused.to_string();
        let says = format!("bytes {}..{} of it: not a range within its {size} bytes", bad.start, bad.end);
        assert!(text.contains(&says), "{text}");
        assert!(text.contains(&digest.hex()), "{text}");
    }
}

#[test]
fn ranged_reads_on_the_local_backend() {
    ranged_reads(Backend::Local);
}

#[test]
fn ranged_reads_on_s3() {
    ranged_reads(Backend::S3);
}
