//! Fewer bytes on the wire (issue 15 part 2): the server's signed node URL answers ranges as
//! the blob route does.

use std::sync::Arc;

use release::digest::Digest;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::archives;
use crate::support::inprocess::InProcessServer;

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
