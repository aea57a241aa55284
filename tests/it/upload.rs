//! Upload round trips against both backends: CLI and HTTP, metadata, blobs, ranges, repeats.

use std::fs;

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::{Backend, TestCommand, TestServer, app_tree, archives};

fn round_trip(backend: Backend) {
    let server = TestServer::start(backend);
    let ci = server.token("ci-api", "ci");
    let auditor = server.token("auditor", "auditor");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("app");
    app_tree(&src, "1.4.2");

    // Upload a directory: packaged on the fly, digest printed.
    let uploaded = server
        .cli()
        .env("RELEASE_TOKEN", &ci)
        .args(["upload", src.to_str().unwrap(), "--service", "api", "--version", "1.4.2", "--git-sha", "0a1b2c3"])
        .args(["--build-url", "https://ci.example/builds/42", "--json"])
        .assert_success()
        .json();
    let digest = uploaded["digest"].as_str().unwrap().to_owned();
    assert_eq!(uploaded["created"], true);
    assert_eq!(uploaded["service"], "api");

    // The same directory packaged locally has the same digest (determinism end to end).
    let local = work.path().join("local.tar.zst");
    let packaged = TestCommand::new()
        .args(["package", src.to_str().unwrap(), "-o", local.to_str().unwrap(), "--json"])
        .assert_success()
        .json();
    assert_eq!(packaged["digest"].as_str().unwrap(), digest);

    // Stored under its content address, recorded once.
    assert_eq!(server.artifact_keys().iter().map(|d| d.to_string()).collect::<Vec<_>>(), vec![digest.clone()]);
    assert_eq!(server.count("SELECT count(*) FROM artifacts"), 1);
    assert!(server.staging_keys().is_empty(), "staging emptied: {:?}", server.staging_keys());

    // Metadata: labels from the upload, facts measured at ingest.
    let http = server.http();
    let meta: Value =
        http.get(format!("{}/v1/artifacts/{digest}", server.url)).bearer_auth(&auditor).send().unwrap().json().unwrap();
    assert_eq!(meta["size"].as_u64().unwrap(), fs::metadata(&local).unwrap().len());
    assert_eq!(meta["file_count"], 12, "6 files and 6 directories");
    assert_eq!(meta["migrations"], serde_json::json!(["2024_01_01_000000_create_users_table.php"]));
    assert!(meta["unpacked_size"].as_u64().unwrap() > 6 * 512);
    let upload = &meta["uploads"][0];
    assert_eq!(upload["version"], "1.4.2");
    assert_eq!(upload["git_sha"], "0a1b2c3");
    assert_eq!(upload["build_url"], "https://ci.example/builds/42");
    assert_eq!(upload["uploaded_by"], "ci-api");

    // HEAD lets CI skip an upload.
    let head = http.head(format!("{}/v1/artifacts/{digest}", server.url)).bearer_auth(&ci).send().unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    let missing = format!("sha256:{}", "0".repeat(64));
    let head = http.head(format!("{}/v1/artifacts/{missing}", server.url)).bearer_auth(&ci).send().unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND);

    // Download through the CLI: bytes verified, identical to the local package.
    let downloaded = work.path().join("downloaded.tar.zst");
    server
        .cli()
        .env("RELEASE_TOKEN", &auditor)
        .args(["download", &digest, "-o", downloaded.to_str().unwrap()])
        .assert_success();
    assert_eq!(fs::read(&downloaded).unwrap(), fs::read(&local).unwrap());

    // Ranges.
    let bytes = fs::read(&local).unwrap();
    let part = http
        .get(format!("{}/v1/artifacts/{digest}/blob", server.url))
        .bearer_auth(&auditor)
        .header("Range", "bytes=10-99")
        .send()
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.headers()["content-range"], format!("bytes 10-99/{}", bytes.len()));
    assert_eq!(part.bytes().unwrap(), &bytes[10..100]);
    let tail = http
        .get(format!("{}/v1/artifacts/{digest}/blob", server.url))
        .bearer_auth(&auditor)
        .header("Range", "bytes=-16")
        .send()
        .unwrap();
    assert_eq!(tail.bytes().unwrap(), &bytes[bytes.len() - 16..]);
    let beyond = http
        .get(format!("{}/v1/artifacts/{digest}/blob", server.url))
        .bearer_auth(&auditor)
        .header("Range", format!("bytes={}-", bytes.len()))
        .send()
        .unwrap();
    assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);

    // The service's list.
    let list: Value = http
        .get(format!("{}/v1/services/api/artifacts", server.url))
        .bearer_auth(&auditor)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(list["artifacts"][0]["digest"], digest.as_str());
    assert_eq!(list["artifacts"][0]["version"], "1.4.2");

    // Uploading the same directory again sends nothing and succeeds.
    let again = server
        .cli()
        .env("RELEASE_TOKEN", &ci)
        .args(["upload", src.to_str().unwrap(), "--service", "api", "--json"])
        .assert_success()
        .json();
    assert_eq!(again["digest"].as_str().unwrap(), digest);
    assert_eq!(again["created"], false);
}

#[test]
fn round_trip_on_the_local_backend() {
    round_trip(Backend::Local);
}

#[test]
fn round_trip_on_s3() {
    round_trip(Backend::S3);
}

fn post(server: &TestServer, token: &str, query: &str, body: Vec<u8>) -> reqwest::blocking::Response {
    server.http().post(format!("{}/v1/artifacts?{query}", server.url)).bearer_auth(token).body(body).send().unwrap()
}

fn second_upload_changes_nothing(backend: Backend) {
    let server = TestServer::start(backend);
    let ci = server.token("ci", "ci");
    let body = archives::valid("<?php echo 1;");
    // Like plain curl: no digest header.
    let first = post(&server, &ci, "service=api&version=1", body.clone());
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().unwrap();
    let keys = server.artifact_keys();
    let store_bytes = |s: &TestServer| {
        let digest = keys[0];
        crate::support::block_on(async {
            use futures::TryStreamExt as _;
            let stream = s.store().read_artifact(digest, None, release::store::READ_FOR_NODES).await.unwrap();
            let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
            chunks.concat()
        })
    };
    let stored = store_bytes(&server);
    assert_eq!(&stored[..], &body[..]);

    let object_file = server.data_dir().join("objects/artifacts/sha256").join(keys[0].hex());
    let file_identity = |path: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(path).map(|m| (m.ino(), m.mtime(), m.mtime_nsec())).ok()
    };
    let before = file_identity(&object_file);

    let second = post(&server, &ci, "service=api&version=2", body.clone());
    assert_eq!(second.status(), StatusCode::OK);
    let second: Value = second.json().unwrap();
    assert_eq!(second["created"], false);
    assert_eq!(second["version"], "1", "the first upload's label stays");
    assert_eq!(second["stored_at"], first["stored_at"]);
    assert_eq!(server.artifact_keys(), keys);
    assert_eq!(&store_bytes(&server)[..], &body[..]);
    assert_eq!(file_identity(&object_file), before, "the stored object was not rewritten");
    assert_eq!(server.count("SELECT count(*) FROM artifacts"), 1);
    assert_eq!(server.count("SELECT count(*) FROM artifact_uploads"), 1);
    assert!(server.staging_keys().is_empty());

    // The same bytes for another service: already stored (200), a new upload record.
    let other = post(&server, &ci, "service=worker", body.clone());
    assert_eq!(other.status(), StatusCode::OK);
    assert_eq!(server.count("SELECT count(*) FROM artifacts"), 1);
    assert_eq!(server.count("SELECT count(*) FROM artifact_uploads"), 2);

    // On record: the upload, the first repeat and the new upload record; repeats that change
    // nothing, again and again, once per token, artifact and 10 minutes (a CI in a loop once
    // appended an event per request). Another token's first repeat is on record.
    let events = |actor: &str| {
        server.count(&format!(
            "SELECT count(*) FROM audit_events WHERE action = 'artifact.upload' AND actor = '{actor}' \
             AND subject = '{}'",
            keys[0]
        ))
    };
    assert_eq!(events("ci"), 3);
    for _ in 0..20 {
        assert_eq!(post(&server, &ci, "service=api", body.clone()).status(), StatusCode::OK);
    }
    assert_eq!(events("ci"), 3, "repeats within the window are not each on record");
    let ci2 = server.token("ci2", "ci");
    assert_eq!(post(&server, &ci2, "service=api", body.clone()).status(), StatusCode::OK);
    assert_eq!(events("ci2"), 1);
}

#[test]
fn a_second_upload_of_the_same_bytes_changes_nothing_local() {
    second_upload_changes_nothing(Backend::Local);
}

#[test]
fn a_second_upload_of_the_same_bytes_changes_nothing_s3() {
    second_upload_changes_nothing(Backend::S3);
}

#[test]
fn a_matching_digest_header_is_accepted() {
    let server = TestServer::start(Backend::Local);
    let ci = server.token("ci", "ci");
    let body = archives::valid("<?php");
    let digest = release::digest::Digest::of(&body);
    let response = server
        .http()
        .post(format!("{}/v1/artifacts?service=api", server.url))
        .bearer_auth(&ci)
        .header("X-Release-Digest", digest.to_string())
        .body(body)
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let text = response.text().unwrap();
    assert_eq!(text.matches("\"digest\"").count(), 1, "each key once: {text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["digest"], digest.to_string());
    assert_eq!(answer["service"], "api");
    assert_eq!(answer["created"], true);
}

/// Many uploads at once, some of one artifact again and again, the rest each new (issue 11:
/// a repeated upload's clean-up once removed the staging directory under another upload's
/// publish, and 49 of 751 new uploads answered 404). Every upload is acknowledged; every
/// acknowledged digest is listed, readable and recorded; nothing is left in staging.
fn concurrent_uploads_all_land(backend: Backend) {
    const UPLOADERS: usize = 16;
    const EACH: usize = 12;
    let server = TestServer::start(backend);
    let ci = server.token("ci-api", "ci");
    let auditor = server.token("auditor", "auditor");
    let repeated = archives::valid("the same again");
    let acknowledged: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..UPLOADERS)
            .map(|uploader| {
                let (server, ci, repeated) = (&server, &ci, &repeated);
                scope.spawn(move || {
                    (0..EACH)
                        .map(|n| {
                            let body = match uploader % 4 {
                                0 => repeated.clone(),
                                _ => archives::valid(&format!("uploader {uploader}, upload {n}")),
                            };
                            let response = post(server, ci, "service=api", body);
                            let status = response.status();
                            let text = response.text().unwrap();
                            assert!(status.is_success(), "uploader {uploader}, upload {n}: {status} {text}");
                            let answer: Value = serde_json::from_str(&text).unwrap();
                            answer["digest"].as_str().unwrap().to_owned()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let mut distinct = acknowledged.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 1 + (UPLOADERS - UPLOADERS / 4) * EACH);

    let mut stored: Vec<String> = server.artifact_keys().iter().map(|d| d.to_string()).collect();
    stored.sort();
    assert_eq!(stored, distinct, "the store holds exactly what was acknowledged");
    assert_eq!(server.count("SELECT count(*) FROM artifacts") as usize, distinct.len(), "one row per object");
    assert_eq!(server.staging_keys(), Vec::<String>::new(), "nothing left in staging");
    for digest in &distinct {
        let blob = server
            .http()
            .get(format!("{}/v1/artifacts/{digest}/blob", server.url))
            .bearer_auth(&auditor)
            .send()
            .unwrap();
        assert_eq!(blob.status(), StatusCode::OK, "{digest}");
        let bytes = blob.bytes().unwrap();
        assert_eq!(release::digest::Digest::of(&bytes).to_string(), *digest);
    }
}

#[test]
fn concurrent_distinct_and_repeated_uploads_all_land_local() {
    concurrent_uploads_all_land(Backend::Local);
}

#[test]
fn concurrent_distinct_and_repeated_uploads_all_land_s3() {
    concurrent_uploads_all_land(Backend::S3);
}

/// Every upload stores the index of its regular files (path, mode, size, SHA-256) beside the
/// artifact, named in the registry: what a node compares with the releases it holds.
fn the_index_of_every_file_is_stored_and_named(backend: Backend) {
    let server = TestServer::start(backend);
    let ci = server.token("ci", "ci");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("app");
    app_tree(&src, "2.0.0");
    fs::write(src.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::os::unix::fs::symlink("run.sh", src.join("start")).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    let (packed, body) = release::archive::pack_to_writer(&src, &[], Vec::new(), &mut |_| {}).unwrap();

    assert_eq!(post(&server, &ci, "service=api&version=2", body.clone()).status(), StatusCode::CREATED);
    let conn = rusqlite::Connection::open_with_flags(
        server.data_dir().join("registry.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let (named, files, size): (String, u64, u64) = conn
        .query_row(
            "SELECT index_sha256, files, size FROM artifact_indexes WHERE digest = ?1",
            [packed.digest.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let named: release::digest::Digest = named.parse().unwrap();
    let stored = crate::support::block_on(server.store().get_index(named)).unwrap();
    assert_eq!(stored.len() as u64, size);
    let index = release::archive::FileIndex::decode(&stored, packed.digest).unwrap();
    assert_eq!(index.files.len() as u64, files);

    // Exactly the tree's regular files, each with its content's hash and its mode.
    let mut expected = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                dirs.push(path);
            } else if meta.is_file() {
                let relative = path.strip_prefix(&src).unwrap().to_str().unwrap().to_owned();
                let executable = meta.permissions().mode() & 0o111 != 0;
                expected.push((relative, executable, release::digest::Digest::of(&fs::read(&path).unwrap())));
            }
        }
    }
    expected.sort();
    let mut listed: Vec<_> = index.files.iter().map(|f| (f.path.clone(), f.executable, f.sha256)).collect();
    listed.sort();
    assert_eq!(listed, expected);
    assert!(listed.iter().any(|(p, x, _)| p == "run.sh" && *x), "the executable file is listed as such");

    // The same bytes again: the same index, the same name, nothing added.
    assert_eq!(post(&server, &ci, "service=web&version=2", body).status(), StatusCode::OK, "stored already");
    assert_eq!(server.count("SELECT count(*) FROM artifact_indexes"), 1);
    if backend == Backend::Local {
        let objects = fs::read_dir(server.data_dir().join("objects/indexes/sha256")).unwrap().count();
        assert_eq!(objects, 1, "one index object");
    }
}

#[test]
fn the_index_of_every_file_is_stored_and_named_local() {
    the_index_of_every_file_is_stored_and_named(Backend::Local);
}

#[test]
fn the_index_of_every_file_is_stored_and_named_s3() {
    the_index_of_every_file_is_stored_and_named(Backend::S3);
}

/// Text that compresses like source code, the same for the same seed.
fn source_text(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 24);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(
            ["public ", "function ", "return ", "$this->", "array("][(state % 5) as usize].as_bytes(),
        );
        out.extend_from_slice(format!("{};\n", state % 977).as_bytes());
    }
    out.truncate(len);
    out
}

/// An archive `release package` wrote is laid out in frames at ingest: the stored index's
/// frame table covers the artifact end to end, each frame's bytes hash to its SHA-256 and
/// decompress alone, and every file's data is in the frames the index gives it (what a node
/// fetching ranges relies on). A plain `tar --zstd` archive is one frame: the whole artifact.
fn the_index_lays_out_the_artifact_in_frames(backend: Backend) {
    let server = TestServer::start(backend);
    let ci = server.token("ci", "ci");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("app");
    app_tree(&src, "3.0.0");
    for i in 0..300u64 {
        let path = src.join(format!("vendor/pkg{}/C{i}.php", i % 13));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, source_text(i, 1_000 + (i as usize * 53) % 20_000)).unwrap();
    }
    fs::write(src.join("public/app.js"), source_text(99, 2 * (1 << 20) + 12_345)).unwrap();
    let archive = work.path().join("app.tar.zst");
    TestCommand::new().args(["package", src.to_str().unwrap(), "-o", archive.to_str().unwrap()]).assert_success();
    let uploaded = server
        .cli()
        .env("RELEASE_TOKEN", &ci)
        .args(["upload", archive.to_str().unwrap(), "--service", "api", "--json"])
        .assert_success()
        .json();
    let digest = uploaded["digest"].as_str().unwrap();
    let index = server.stored_index(digest).expect("a row").expect("an object");
    let bytes = fs::read(&archive).unwrap();
    let tar = zstd::decode_all(&bytes[..]).unwrap();

    let frames = &index.frames;
    assert!(frames.len() >= 4, "{} frames for {} bytes of tar stream", frames.len(), tar.len());
    let (mut offset, mut raw) = (0u64, 0u64);
    for frame in frames {
        assert_eq!((frame.offset, frame.raw_offset), (offset, raw), "{frame:?}");
        let compressed = &bytes[frame.offset as usize..(frame.offset + frame.length) as usize];
        assert_eq!(release::digest::Digest::of(compressed), frame.sha256, "{frame:?}");
        (offset, raw) = (offset + frame.length, raw + frame.raw_length);
    }
    assert_eq!((offset, raw), (bytes.len() as u64, tar.len() as u64), "the frames cover the artifact");
    assert!(frames.iter().all(|f| f.raw_length <= 2 * release::archive::FRAME_TARGET + 4096), "{frames:?}");

    for file in &index.files {
        let held = index.frames_of(file);
        let (first, last) = (&frames[held.start], &frames[held.end - 1]);
        // Those frames alone, decompressed, hold the file's data.
        let compressed = &bytes[first.offset as usize..(last.offset + last.length) as usize];
        let alone = zstd::decode_all(compressed).unwrap();
        let at = (file.offset - first.raw_offset) as usize;
        let data = &alone[at..at + file.size as usize];
        assert_eq!(release::digest::Digest::of(data), file.sha256, "{}", file.path);
        if file.size <= release::archive::FRAME_TARGET {
            assert_eq!(held.len(), 1, "{} lies in one frame", file.path);
        }
    }
    let large = index.files.iter().find(|f| f.path == "public/app.js").unwrap();
    let target = release::archive::FRAME_TARGET;
    assert_eq!(index.frames_of(large).len() as u64, large.size.div_ceil(target), "cut at each target inside its data");

    // `tar --zstd` (streamed: no content size in its frame) is one frame, the artifact itself.
    let plain = work.path().join("plain.tar.zst");
    let status = std::process::Command::new("tar")
        .args(["--zstd", "-C", src.to_str().unwrap(), "-cf", plain.to_str().unwrap(), "."])
        .status()
        .unwrap();
    assert!(status.success());
    let uploaded = server
        .cli()
        .env("RELEASE_TOKEN", &ci)
        .args(["upload", plain.to_str().unwrap(), "--service", "api", "--json"])
        .assert_success()
        .json();
    let digest = uploaded["digest"].as_str().unwrap();
    let index = server.stored_index(digest).expect("a row").expect("an object");
    let size = fs::metadata(&plain).unwrap().len();
    assert_eq!(index.frames.len(), 1, "{:?}", index.frames);
    let whole = &index.frames[0];
    assert_eq!((whole.offset, whole.length, whole.raw_offset), (0, size, 0));
    assert_eq!(whole.sha256.to_string(), digest);
    assert_eq!(whole.raw_length, zstd::decode_all(&fs::read(&plain).unwrap()[..]).unwrap().len() as u64);
    assert!(index.files.iter().all(|f| index.frames_of(f) == (0..1)));
}

#[test]
fn the_index_lays_out_the_artifact_in_frames_local() {
    the_index_lays_out_the_artifact_in_frames(Backend::Local);
}

#[test]
fn the_index_lays_out_the_artifact_in_frames_s3() {
    the_index_lays_out_the_artifact_in_frames(Backend::S3);
}
