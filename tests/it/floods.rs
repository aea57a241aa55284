//! SPEC 9: refused requests are on record, bounded. A flood of refusals without a valid token
//! is counted per source and window, not written one by one; a real token's refusals are
//! events of their own up to a budget per window; what any refusal records of the request is
//! cut; a clean stop records what the open window counted.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::{Backend, TestServer};

/// Bytes the data directory takes on disk (as `du` counts them), the registry's WAL included.
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += meta.blocks() * 512;
        if meta.is_dir() {
            total += disk_usage(&entry.path());
        }
    }
    total
}

/// The audit log as JSON values, read with a token that may.
fn events(server: &TestServer, token: &str, action: &str) -> Vec<Value> {
    let response = server.http().get(format!("{}/v1/audit/events", server.url)).bearer_auth(token).send().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response
        .text()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["action"] == action)
        .collect()
}

/// The refusals counted for `subject` by the aggregate events so far.
fn counted(events: &[Value], subject: &str) -> u64 {
    events.iter().filter(|e| e["subject"] == subject).map(|e| e["details"]["count"].as_u64().unwrap()).sum()
}

const FLOOD: usize = 5_000;
const THREADS: usize = 4;
const LONG_PATH: usize = 8 << 10;

#[test]
fn a_flood_of_refusals_without_a_token_grows_the_data_directory_by_almost_nothing() {
    let server = TestServer::start_with(Backend::Local, "[audit]\nrefusal_window = \"2s\"\n");
    let auditor = server.token("auditor", "auditor");
    // Let the start-up's writes settle before measuring.
    std::thread::sleep(Duration::from_millis(500));
    let before = disk_usage(&server.data_dir());

    let started = Instant::now();
    let url = server.url.clone();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let url = url.clone();
            scope.spawn(move || {
                let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
                for i in (t..FLOOD).step_by(THREADS) {
                    let path = format!("{url}/v1/artifacts/{}{i}", "a".repeat(LONG_PATH));
                    let request = match i % 4 {
                        0 => http.get(&path),
                        1 => http.get(&path).bearer_auth("hunter2"),
                        2 => http.get(&path).bearer_auth(format!("rls_{}_{}", "0".repeat(16), "1".repeat(64))),
                        // Nobody's X-Forwarded-For is believed unless its peer is a trusted proxy.
                        _ => http.get(&path).header("x-forwarded-for", "198.51.100.77"),
                    };
                    assert_eq!(request.send().unwrap().status(), StatusCode::UNAUTHORIZED);
                }
            });
        }
    });
    let flood_took = started.elapsed();
    assert!(flood_took < Duration::from_secs(300), "the flood took {flood_took:?}");

    // The server keeps answering, at once.
    let asked = Instant::now();
    let response = server.http().get(format!("{}/v1/status", server.url)).bearer_auth(&auditor).send().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answered_in = asked.elapsed();
    assert!(answered_in < Duration::from_secs(5), "a valid request after the flood took {answered_in:?}");

    // Every refusal is on record, counted under the one source they came from.
    let deadline = Instant::now() + Duration::from_secs(30);
    let aggregates = loop {
        let found = events(&server, &auditor, "request.refused.aggregate");
        if counted(&found, "source/127.0.0.1") >= FLOOD as u64 || Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let after = disk_usage(&server.data_dir());
    let grown = after.saturating_sub(before);
    eprintln!(
        "{FLOOD} refusals with {LONG_PATH}-byte paths in {flood_took:?}: data directory {before} -> {after} bytes \
         (+{grown}); a valid request after it answered in {answered_in:?}"
    );
    assert!(grown < 1 << 20, "the data directory grew by {grown} bytes");
    assert_eq!(counted(&aggregates, "source/127.0.0.1"), FLOOD as u64, "{aggregates:#?}");
    assert!(aggregates.iter().all(|e| e["subject"] == "source/127.0.0.1"), "one source: {aggregates:#?}");
    assert!(aggregates.len() < 200, "one event per window: {} of them", aggregates.len());
    let statuses: u64 = aggregates
        .iter()
        .flat_map(|e| e["details"]["statuses"].as_array().unwrap().clone())
        .filter(|s| s["status"] == 401 && s["code"] == "unauthenticated")
        .map(|s| s["count"].as_u64().unwrap())
        .sum();
    assert_eq!(statuses, FLOOD as u64);
    for e in &aggregates {
        assert_eq!(e["actor"], "(unauthenticated)");
        let samples = e["details"]["samples"].as_array().unwrap();
        assert!(!samples.is_empty() && samples.len() <= 5, "{e}");
        for sample in samples {
            let request = sample["request"].as_str().unwrap();
            assert!(request.len() < 300 && request.contains("…[truncated, "), "{request}");
        }
    }
    assert!(events(&server, &auditor, "request.refused").is_empty(), "no event of its own without a token");

    // The metrics still count every one.
    let metrics = server.http().get(format!("{}/metrics", server.url)).bearer_auth(&auditor).send().unwrap().text();
    let line = format!("release_refused_requests_total{{status=\"401\",code=\"unauthenticated\"}} {FLOOD}");
    assert!(metrics.unwrap().lines().any(|l| l == line), "{line}");
}

#[test]
fn a_real_tokens_refusals_are_events_of_their_own_up_to_a_budget_and_a_stop_loses_no_count() {
    // A window longer than the test: what it counts is recorded by the stop.
    let mut server = TestServer::start_with(Backend::Local, "[audit]\nrefusal_window = \"1h\"\n");
    let deployer = server.token("dave", "deployer");
    let auditor = server.token("carol", "auditor");
    let long = "p".repeat(LONG_PATH);
    // 30 refusals of a real token (the pages want an auditor), with long paths.
    for _ in 0..30 {
        let response =
            server.http().get(format!("{}/services/{long}", server.url)).bearer_auth(&deployer).send().unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }
    // And a few without one.
    for _ in 0..3 {
        let response = server.http().get(format!("{}/v1/status", server.url)).send().unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }

    let own = events(&server, &auditor, "request.refused");
    assert_eq!(own.len(), 20, "the token's first 20 refusals of the window are events at once: {own:#?}");
    for e in &own {
        assert_eq!((e["actor"].as_str(), e["details"]["status"].as_u64()), (Some("dave"), Some(403)));
        assert_eq!(e["details"]["source"], "127.0.0.1");
        let subject = e["subject"].as_str().unwrap();
        assert!(subject.starts_with("GET /services/ppp") && subject.len() < 300, "cut: {subject}");
        assert!(subject.ends_with(&format!("…[truncated, {} bytes]", LONG_PATH + 14)), "{subject}");
    }
    assert!(events(&server, &auditor, "request.refused.aggregate").is_empty(), "the window is still open");

    // A clean stop records the open window's counts.
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
    assert!(server.terminate_after_signal().success(), "{}", server.log());
    let count = |subject: &str| {
        server.count(&format!(
            "SELECT coalesce(sum(json_extract(details, '$.count')), 0) FROM audit_events \
             WHERE action = 'request.refused.aggregate' AND subject = '{subject}'"
        ))
    };
    assert_eq!(count("token/dave"), 10, "the 10 past the budget, counted for the token");
    assert_eq!(count("source/127.0.0.1"), 3);
    server.restart();
    let verified: Value = server
        .http()
        .get(format!("{}/v1/audit/verify", server.url))
        .bearer_auth(&auditor)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(verified["ok"], true, "{verified}");
    let dave = events(&server, &auditor, "request.refused.aggregate");
    let dave = dave.iter().find(|e| e["subject"] == "token/dave").unwrap();
    assert_eq!((dave["actor"].as_str(), dave["owner"].as_str()), (Some("dave"), Some("dave")));
    assert_eq!(dave["details"]["recorded_apart"], 20);
}

#[test]
fn behind_a_trusted_proxy_the_client_it_names_is_the_source() {
    let server = TestServer::start_with_server(
        Backend::Local,
        "trusted_proxies = [\"127.0.0.1\"]\n",
        "[audit]\nrefusal_window = \"1s\"\n",
    );
    let auditor = server.token("carol", "auditor");
    for (client, times) in [("203.0.113.5", 3), ("6.6.6.6, 203.0.113.6", 2)] {
        for _ in 0..times {
            let response = server
                .http()
                .get(format!("{}/v1/status", server.url))
                .header("x-forwarded-for", client)
                .send()
                .unwrap();
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = events(&server, &auditor, "request.refused.aggregate");
        let (five, six) = (counted(&found, "source/203.0.113.5"), counted(&found, "source/203.0.113.6"));
        if (five, six) == (3, 2) {
            assert!(found.iter().all(|e| e["subject"] != "source/6.6.6.6"), "only the proxy's hop is believed");
            break;
        }
        assert!(Instant::now() < deadline, "{found:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
