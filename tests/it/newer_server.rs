//! The command line against a newer server, one whose answers name a state, a kind and a
//! phase this build does not know: `show` prints them as written and `--wait` stops with a
//! clear message instead of failing to read the answer or waiting for ever. The "server" is
//! a stub on a port that answers every request with the same release.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;

use serde_json::json;

use crate::support::TestCommand;

/// Answers each request on `listener` with `body` (200, JSON), one connection at a time.
fn serve_forever(listener: TcpListener, body: String) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let mut reader = BufReader::new(stream);
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            let _ = reader.by_ref().take(length).read_to_end(&mut Vec::new());
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let mut stream = reader.into_inner();
            let _ = stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body.as_bytes()));
        }
    });
}

#[test]
fn a_newer_servers_names_are_shown_and_end_a_wait_with_a_clear_message() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let release = json!({
        "id": 7, "service": "api", "environment": "staging", "digest": format!("sha256:{}", "a".repeat(64)),
        "kind": "restart", "state": "paused", "requested_by": "ci", "requester_owner": "ci",
        "requested_at": "2026-12-04T09:00:00Z", "state_changed_at": "2026-12-04T09:01:00Z",
        "version": null, "config_digest": null, "verified": null,
        "transitions": [{"state": "paused", "at": "2026-12-04T09:01:00Z", "actor": "release"}],
        "deployments": [{"node": "web-1", "phase": "warm cache", "started_at": "2026-12-04T09:00:30Z",
                         "finished_at": "2026-12-04T09:00:31Z", "outcome": "ok"}],
    });
    serve_forever(listener, release.to_string());
    let cli = |args: &[&str]| {
        let mut command = TestCommand::new();
        command.args(args).env("RELEASE_SERVER", &url).env("RELEASE_TOKEN", "rel_unused");
        command
    };

    let shown = cli(&["show", "7"]).assert_success();
    for name in ["restart", "paused", "warm cache"] {
        assert!(shown.stdout().contains(name), "{name} not shown\n{shown}");
    }

    let digest = format!("sha256:{}", "a".repeat(64));
    let waited = cli(&["deploy", "api", "--env", "staging", &digest, "--wait"]).assert_exit(1);
    assert!(waited.stdout().contains("web-1") && waited.stdout().contains("warm cache"), "{waited}");
    assert!(waited.stderr().contains("release 7 is paused, a state this release command does not know"), "{waited}");
    assert!(!waited.stderr().contains("does not read"), "{waited}");
}
