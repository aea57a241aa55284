//! Many concurrent deploys of one service to one environment: exactly one is accepted, the
//! rest are refused naming it, and nothing is corrupted.

use std::sync::{Arc, Barrier};

use futures::future::BoxFuture;
use release::releases::{Deployer, Deployment, Failure, Plan};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::archives;
use crate::support::inprocess::InProcessServer;

/// Holds every deploy until the test lets it go.
struct Gate(Arc<tokio::sync::Semaphore>);

impl Deployer for Gate {
    fn deploy<'a>(&'a self, _plan: &'a Plan) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let _pass = self.0.acquire().await.expect("the gate stays open");
            Ok(())
        })
    }
}

#[test]
fn exactly_one_of_many_concurrent_deploys_is_accepted() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let server = InProcessServer::start(&api(), Arc::new(Gate(Arc::clone(&gate))));
    let ci = server.token("ci", "ci", "gitlab");
    let auditor = server.token("carol", "auditor", "carol");
    let http = reqwest::blocking::Client::new();
    let uploaded: Value = http
        .post(format!("{}/v1/artifacts?service=api", server.url))
        .bearer_auth(&ci)
        .body(archives::valid("v1"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let digest = uploaded["digest"].as_str().unwrap().to_owned();

    const N: usize = 16;
    let barrier = Arc::new(Barrier::new(N));
    let answers: Vec<(StatusCode, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..N)
            .map(|_| {
                let (barrier, http, url, ci, digest) = (Arc::clone(&barrier), http.clone(), &server.url, &ci, &digest);
                scope.spawn(move || {
                    barrier.wait();
                    let response = http
                        .post(format!("{url}/v1/releases"))
                        .bearer_auth(ci)
                        .json(&json!({"service": "api", "environment": "staging", "digest": digest}))
                        .send()
                        .unwrap();
                    (response.status(), response.json().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let accepted: Vec<&Value> = answers.iter().filter(|(s, _)| *s == StatusCode::CREATED).map(|(_, v)| v).collect();
    assert_eq!(accepted.len(), 1, "{answers:#?}");
    let id = accepted[0]["id"].as_i64().unwrap();
    for (status, body) in answers.iter().filter(|(s, _)| *s != StatusCode::CREATED) {
        assert_eq!(*status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["error"]["code"], "conflict");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("release {id} of api in staging is in flight")), "{message}");
    }

    // Let the one deploy finish: it goes live, and the registry tells one consistent story.
    gate.add_permits(1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let shown: Value =
            http.get(format!("{}/v1/releases/{id}", server.url)).bearer_auth(&auditor).send().unwrap().json().unwrap();
        if shown["state"] == "live" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{shown}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let history: Value =
        http.get(format!("{}/v1/releases", server.url)).bearer_auth(&auditor).send().unwrap().json().unwrap();
    assert_eq!(history["releases"].as_array().unwrap().len(), 1);
    let events =
        http.get(format!("{}/v1/audit/events", server.url)).bearer_auth(&auditor).send().unwrap().text().unwrap();
    let refusals = events.lines().filter(|l| l.contains("\"request.refused\"") && l.contains("\"conflict\"")).count();
    assert_eq!(refusals, N - 1, "every refused deploy is on record");
    let verified: Value =
        http.get(format!("{}/v1/audit/verify", server.url)).bearer_auth(&auditor).send().unwrap().json().unwrap();
    assert_eq!(verified["ok"], true, "{verified}");
}

#[test]
fn a_deploy_cut_short_by_a_stop_is_resolved_at_the_next_start() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let config = &api();
    let server = InProcessServer::start(config, Arc::new(Gate(Arc::clone(&gate))));
    let ci = server.token("ci", "ci", "gitlab");
    let http = reqwest::blocking::Client::new();
    let uploaded: Value = http
        .post(format!("{}/v1/artifacts?service=api", server.url))
        .bearer_auth(&ci)
        .body(archives::valid("v1"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let body = json!({"service": "api", "environment": "staging", "digest": uploaded["digest"]});
    let first: Value =
        http.post(format!("{}/v1/releases", server.url)).bearer_auth(&ci).json(&body).send().unwrap().json().unwrap();
    let id = first["id"].as_i64().unwrap();
    // Wait until it is deploying (held by the gate), then stop the server under it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let shown: Value =
            http.get(format!("{}/v1/releases/{id}", server.url)).bearer_auth(&ci).send().unwrap().json().unwrap();
        if shown["state"] == "deploying" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{shown}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let dir = server.crash();

    // The next start resolves it (in the background, once it listens): failed with the
    // reason, no lease left, a new deploy accepted.
    let server = InProcessServer::start_in(dir, config, Arc::new(release::releases::RecordOnly));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let shown = loop {
        let shown: Value =
            http.get(format!("{}/v1/releases/{id}", server.url)).bearer_auth(&ci).send().unwrap().json().unwrap();
        if shown["state"] != "deploying" || std::time::Instant::now() > deadline {
            break shown;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(shown["state"], "failed", "{shown}");
    assert_eq!(
        shown["transitions"].as_array().unwrap().last().unwrap()["reason"],
        "the server stopped during the deploy; this deployer cannot ask the nodes, so it cannot finish the deploy"
    );
    let again = http.post(format!("{}/v1/releases", server.url)).bearer_auth(&ci).json(&body).send().unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    let conn = rusqlite::Connection::open(server.data_dir().join("registry.db")).unwrap();
    let leases: i64 =
        conn.query_row("SELECT count(*) FROM deploy_leases WHERE release_id = ?1", [id], |r| r.get(0)).unwrap();
    assert_eq!(leases, 0);
}

/// Fails every deploy, as a node that cannot take the release would.
struct Refuses;

impl Deployer for Refuses {
    fn deploy<'a>(&'a self, plan: &'a Plan) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            plan.report.report(Deployment {
                node: "web-1".into(),
                phase: release::releases::Phase::Prepare,
                started_at: release::utc::Timestamp::parse("2026-11-27T00:00:00.000000Z").unwrap(),
                finished_at: release::utc::Timestamp::parse("2026-11-27T00:00:01.000000Z").unwrap(),
                outcome: release::releases::PhaseOutcome::Failed,
                output_tail: Some("php artisan optimize: exit 2".into()),
                shared_files: vec![],
            });
            Err(Failure::new("node web-1: finalize hook exited with 2"))
        })
    }
}

/// Panics in the middle of a deploy (a bug in a deployer).
struct Panics;

impl Deployer for Panics {
    fn deploy<'a>(&'a self, _plan: &'a Plan) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async { panic!("a bug in the deployer") })
    }
}

fn upload_v1(server: &InProcessServer, ci: &str) -> String {
    let uploaded: Value = reqwest::blocking::Client::new()
        .post(format!("{}/v1/artifacts?service=api", server.url))
        .bearer_auth(ci)
        .body(archives::valid("v1"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    uploaded["digest"].as_str().unwrap().to_owned()
}

#[test]
fn a_failed_deploy_ends_the_wait_with_exit_7_and_the_reason() {
    let server = InProcessServer::start(&api(), Arc::new(Refuses));
    let ci = server.token("ci", "ci", "gitlab");
    let digest = upload_v1(&server, &ci);
    let out = crate::support::TestCommand::new()
        .env("RELEASE_SERVER", &server.url)
        .env("RELEASE_TOKEN", &ci)
        .args(["deploy", "api", "--env", "staging", &digest, "--wait"])
        .assert_exit(7);
    assert!(out.stderr().contains("finalize hook exited with 2"), "{out}");
    let shown = crate::support::TestCommand::new()
        .env("RELEASE_SERVER", &server.url)
        .env("RELEASE_TOKEN", &ci)
        .args(["show", "1", "--json"])
        .assert_success()
        .json();
    assert_eq!(shown["state"], "failed");
    assert_eq!(shown["deployments"][0]["node"], "web-1");
    assert_eq!(shown["deployments"][0]["output_tail"], "php artisan optimize: exit 2");
}

#[test]
fn a_panicking_deployer_fails_the_release_instead_of_leaving_it_deploying() {
    let server = InProcessServer::start(&api(), Arc::new(Panics));
    let ci = server.token("ci", "ci", "gitlab");
    let digest = upload_v1(&server, &ci);
    let http = reqwest::blocking::Client::new();
    let body = json!({"service": "api", "environment": "staging", "digest": digest});
    let created: Value =
        http.post(format!("{}/v1/releases", server.url)).bearer_auth(&ci).json(&body).send().unwrap().json().unwrap();
    let id = created["id"].as_i64().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let shown: Value =
            http.get(format!("{}/v1/releases/{id}", server.url)).bearer_auth(&ci).send().unwrap().json().unwrap();
        if shown["state"] == "failed" {
            assert!(
                shown["transitions"].as_array().unwrap().last().unwrap()["reason"]
                    .as_str()
                    .unwrap()
                    .contains("crashed")
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{shown}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Nothing stays in flight: the next deploy is accepted.
    let again = http.post(format!("{}/v1/releases", server.url)).bearer_auth(&ci).json(&body).send().unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
}

/// `api` with a local node in the default environments (the fake deployers never reach it).
fn api() -> String {
    format!("[service.api]\nkind = \"generic\"\n{}", crate::support::local_nodes("api", &["staging", "production"]))
}

/// `--queue`: a deploy refused because another release of the cell is in flight waits for
/// it and is accepted once it ended; without `--queue`, or past its time, it is refused.
#[test]
fn a_queued_deploy_waits_for_the_release_in_flight_and_then_goes_live() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let server = InProcessServer::start(&api(), Arc::new(Gate(Arc::clone(&gate))));
    let ci = server.token("ci", "ci", "gitlab");
    let digest = upload_v1(&server, &ci);
    let cli = |args: &[&str]| {
        let mut command = crate::support::TestCommand::new();
        command.env("RELEASE_SERVER", &server.url).env("RELEASE_TOKEN", &ci).args(args);
        command
    };
    cli(&["deploy", "api", "--env", "staging", &digest]).assert_success();
    // Held at the gate: a plain second deploy is refused, a short queue gives up.
    let refused = cli(&["deploy", "api", "--env", "staging", &digest]).assert_exit(3);
    assert!(refused.stderr().contains("release 1 of api in staging is in flight"), "{refused}");
    let gave_up = cli(&["deploy", "api", "--env", "staging", &digest, "--queue", "1s"]).assert_exit(3);
    assert!(gave_up.stderr().contains("waiting for its turn"), "{gave_up}");
    let out = std::thread::scope(|scope| {
        let queued = scope.spawn(|| {
            cli(&["deploy", "api", "--env", "staging", &digest, "--queue", "60s", "--wait"]).assert_success()
        });
        std::thread::sleep(std::time::Duration::from_secs(2));
        gate.add_permits(2);
        queued.join().unwrap()
    });
    assert!(out.stderr().contains("waiting for its turn (--queue)"), "{out}");
    assert!(out.stdout().contains("is live"), "{out}");
    let shown = cli(&["show", "2", "--json"]).assert_success().json();
    assert_eq!(shown["state"], "live", "{shown}");
}
