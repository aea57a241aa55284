//! Releases through the real binary and a real server: the whole story, and every refusal
//! of SPEC 9 about releases, roles and policies, each with the audit event it leaves.

use std::collections::HashMap;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Backend, TestServer, archives};

/// `api` has one local node in each environment (a release needs a node to go live on), under
/// the server's own directory (`@NODES@`, see `TestServer`).
pub const CONFIG: &str = "[audit]\ncheckpoint_interval = \"1s\"\nrefusal_window = \"1s\"\n[service.api]\nkind = \"generic\"\n\
    [[service.api.node]]\nenvironment = \"staging\"\nhost = \"local\"\nbase = \"@NODES@/api-staging\"\n\
    [[service.api.node]]\nenvironment = \"production\"\nhost = \"local\"\nbase = \"@NODES@/api-production\"\n\
    [[environment]]\nname = \"staging\"\n[[environment]]\nname = \"production\"\npromote_from = \"staging\"\n\
    requires_approval = true\napproval_ttl = \"24h\"\n";

/// A server with the usual cast: CI (gitlab), Alice who deploys, Bob who approves, Alice's own
/// approver token, and Carol the auditor.
pub struct Fixture {
    pub server: TestServer,
    tokens: HashMap<&'static str, String>,
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture::with_config(CONFIG)
    }

    pub fn with_config(config: &str) -> Fixture {
        Fixture::adopt(TestServer::start_with(Backend::Local, config))
    }

    /// The usual configuration and `extra` after it, with these variables in the server's
    /// environment.
    pub fn with_env(extra: &str, env: &[(&str, &str)]) -> Fixture {
        Fixture::adopt(TestServer::start_with_env(Backend::Local, &format!("{CONFIG}{extra}"), env))
    }

    /// The usual cast on a server started elsewhere.
    pub fn adopt(server: TestServer) -> Fixture {
        let mut tokens = HashMap::new();
        for (name, roles, owner) in [
            ("ci", "ci", "gitlab"),
            ("alice", "deployer", "alice"),
            ("alice-approver", "approver", "alice"),
            ("bob", "approver", "bob"),
            ("carol", "auditor", "carol"),
            ("root", "admin", "root"),
        ] {
            tokens.insert(name, server.token_with(name, roles, &["--owner", owner]));
        }
        Fixture { server, tokens }
    }

    pub fn token(&self, who: &str) -> &str {
        &self.tokens[who]
    }

    /// Uploads a small archive for `api`; returns its digest.
    pub fn upload(&self, content: &str) -> String {
        let response = self
            .server
            .http()
            .post(format!("{}/v1/artifacts?service=api&version={content}", self.server.url))
            .bearer_auth(self.token("ci"))
            .body(archives::valid(content))
            .send()
            .unwrap();
        assert!(response.status().is_success(), "{}", response.text().unwrap());
        response.json::<Value>().unwrap()["digest"].as_str().unwrap().to_owned()
    }

    /// Packs a tree of `files` (path, bytes) with `release package` (frames and all, as CI
    /// would) and uploads it for `web`; returns its digest.
    pub fn upload_packaged(&self, files: impl IntoIterator<Item = (String, Vec<u8>)>) -> String {
        self.upload_packaged_for("web", files)
    }

    /// [`upload_packaged`](Self::upload_packaged) for `service`.
    pub fn upload_packaged_for(&self, service: &str, files: impl IntoIterator<Item = (String, Vec<u8>)>) -> String {
        let work = tempfile::tempdir().unwrap();
        let tree = work.path().join("tree");
        for (path, bytes) in files {
            let path = tree.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        let archive = work.path().join("a.tar.zst");
        crate::support::TestCommand::new()
            .args(["package", tree.to_str().unwrap(), "-o", archive.to_str().unwrap()])
            .assert_success();
        let response = self
            .server
            .http()
            .post(format!("{}/v1/artifacts?service={service}", self.server.url))
            .bearer_auth(self.token("ci"))
            .body(std::fs::read(&archive).unwrap())
            .send()
            .unwrap();
        assert!(response.status().is_success(), "{}", response.text().unwrap());
        response.json::<Value>().unwrap()["digest"].as_str().unwrap().to_owned()
    }

    pub fn post(&self, who: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .server
            .http()
            .post(format!("{}{path}", self.server.url))
            .bearer_auth(self.token(who))
            .json(&body)
            .send()
            .unwrap();
        let status = response.status();
        (status, response.json().unwrap_or(Value::Null))
    }

    pub fn get(&self, who: &str, path: &str) -> Value {
        let response =
            self.server.http().get(format!("{}{path}", self.server.url)).bearer_auth(self.token(who)).send().unwrap();
        assert!(response.status().is_success(), "GET {path}: {}", response.status());
        response.json().unwrap()
    }

    /// The CLI as `who`.
    pub fn cli(&self, who: &str) -> crate::support::TestCommand {
        let mut cmd = self.server.cli();
        cmd.env("RELEASE_TOKEN", self.token(who));
        cmd
    }

    /// Waits until release `id` is in a final state; returns it.
    pub fn settle(&self, id: i64) -> Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let shown = self.get("carol", &format!("/v1/releases/{id}"));
            if !matches!(shown["state"].as_str(), Some("approved" | "deploying")) {
                return shown;
            }
            assert!(std::time::Instant::now() < deadline, "release {id} did not settle: {shown}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Deploys `digest` to `env` by the API as `who` and waits for it; returns the release.
    pub fn live_in(&self, who: &str, env: &str, digest: &str) -> Value {
        let (status, release) =
            self.post(who, "/v1/releases", json!({"service": "api", "environment": env, "digest": digest}));
        assert_eq!(status, StatusCode::CREATED, "{release}");
        let settled = self.settle(release["id"].as_i64().unwrap());
        assert_eq!(settled["state"], "live", "{settled}");
        settled
    }

    /// The audit events with this action, oldest first.
    pub fn events(&self, action: &str) -> Vec<Value> {
        let response = self
            .server
            .http()
            .get(format!("{}/v1/audit/events", self.server.url))
            .bearer_auth(self.token("carol"))
            .send()
            .unwrap();
        assert!(response.status().is_success());
        response
            .text()
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|e| e["action"] == action)
            .collect()
    }

    /// Asserts the refusal left its audit event: actor, status and error code. A real token's
    /// refusal is an event of its own at once; one without a token is counted into its
    /// source's `request.refused.aggregate` event when the refusal window ends (1 s in these
    /// tests' configurations).
    pub fn assert_refusal_recorded(&self, actor: &str, status: u16, code: &str) {
        if actor != "(unauthenticated)" {
            let found = self.events("request.refused");
            assert!(
                found
                    .iter()
                    .any(|e| e["actor"] == actor && e["details"]["status"] == status && e["details"]["code"] == code),
                "no request.refused event by {actor} with {status} {code} in {found:#?}"
            );
            return;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let found = self.events("request.refused.aggregate");
            let counted = found.iter().any(|e| {
                e["actor"] == actor
                    && e["details"]["statuses"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|s| s["status"] == status && s["code"] == code && s["count"].as_u64() > Some(0))
            });
            if counted {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no request.refused.aggregate event counting {status} {code} in {found:#?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Waits until the `request.refused.aggregate` events of refusals without a token have
    /// counted `count` refusals in all; returns their samples (they are written as each
    /// refusal window ends).
    pub fn anonymous_refusals(&self, count: u64) -> Vec<Value> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let found: Vec<Value> = self
                .events("request.refused.aggregate")
                .into_iter()
                .filter(|e| e["actor"] == "(unauthenticated)")
                .collect();
            let counted: u64 = found.iter().map(|e| e["details"]["count"].as_u64().unwrap()).sum();
            if counted >= count {
                assert_eq!(counted, count, "{found:#?}");
                return found.iter().flat_map(|e| e["details"]["samples"].as_array().unwrap().clone()).collect();
            }
            assert!(std::time::Instant::now() < deadline, "{counted} of {count} refusals counted: {found:#?}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// status, history and show tell the same story.
    pub fn assert_views_agree(&self) {
        let status = self.get("carol", "/v1/status");
        for cell in status.as_array().unwrap() {
            let (service, env) = (cell["service"].as_str().unwrap(), cell["environment"].as_str().unwrap());
            let history = self.get("carol", &format!("/v1/releases?service={service}&environment={env}&limit=500"));
            let rows = history["releases"].as_array().unwrap();
            let live: Vec<&Value> = rows.iter().filter(|r| r["state"] == "live").collect();
            match cell["release"].as_i64() {
                Some(id) => {
                    assert_eq!(live.len(), 1, "{env}: exactly one live release in history: {history}");
                    assert_eq!(live[0]["id"], id, "{env}: status and history name the same live release");
                    assert_eq!(live[0]["digest"], cell["digest"]);
                    let shown = self.get("carol", &format!("/v1/releases/{id}"));
                    assert_eq!(shown["state"], "live");
                    assert_eq!(shown["digest"], cell["digest"]);
                }
                None => assert!(live.is_empty(), "{env}: history has a live release status does not show"),
            }
            for pending in cell["pending"].as_array().unwrap() {
                let shown = self.get("carol", &format!("/v1/releases/{pending}"));
                assert_eq!(shown["state"], "pending_approval");
            }
            for row in rows {
                let shown = self.get("carol", &format!("/v1/releases/{}", row["id"]));
                assert_eq!(shown["state"], row["state"], "show and history agree on release {}", row["id"]);
                assert_eq!(shown["transitions"].as_array().unwrap().last().unwrap()["state"], row["state"]);
            }
        }
    }
}

fn status_cell(f: &Fixture, env: &str) -> Value {
    let status = f.get("carol", "/v1/status?service=api");
    status.as_array().unwrap().iter().find(|c| c["environment"] == env).unwrap().clone()
}

#[test]
fn the_full_story_through_the_binary() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    let v2 = f.upload("v2");

    // CI deploys v1 to staging and waits for it.
    let out = f.cli("ci").args(["deploy", "api", "--env", "staging", &v1, "--wait", "--json"]).assert_success().json();
    assert_eq!(out["state"], "live");
    assert_eq!(status_cell(&f, "staging")["digest"], v1.as_str());
    assert!(status_cell(&f, "production")["digest"].is_null());
    f.assert_views_agree();

    // Alice promotes it to production: it waits for approval.
    let promoted = f.cli("alice").args(["promote", "api", "--to", "production", "--json"]).assert_success().json();
    assert_eq!(promoted["state"], "pending_approval");
    assert_eq!(promoted["digest"], v1.as_str());
    let id = promoted["id"].as_i64().unwrap();
    assert_eq!(status_cell(&f, "production")["pending"], json!([id]));
    let shown = f.get("carol", &format!("/v1/releases/{id}"));
    assert_eq!(shown["approvers"], json!(["bob", "root"]), "Alice's own approver token is not listed");
    f.assert_views_agree();

    // Alice's other token may not approve it: four eyes compares owners.
    let out = f.cli("alice-approver").args(["approve", &id.to_string()]).assert_exit(3);
    assert!(out.stderr().contains("self_approval"), "{out}");
    f.assert_refusal_recorded("alice-approver", 409, "self_approval");
    assert_eq!(f.get("carol", &format!("/v1/releases/{id}"))["state"], "pending_approval");

    // Bob approves and follows it live.
    let out = f.cli("bob").args(["approve", &id.to_string(), "--wait"]).assert_success();
    assert!(out.stdout().contains("is live"), "{out}");
    let shown = f.get("carol", &format!("/v1/releases/{id}"));
    assert_eq!(shown["state"], "live");
    assert_eq!(shown["approval"]["decided_by"], "bob");
    assert_eq!(shown["approval"]["digest"], v1.as_str(), "the approval binds the digest");
    assert_eq!(status_cell(&f, "production")["release"], id);
    f.assert_views_agree();

    // Another artifact through the same path.
    f.live_in("ci", "staging", &v2);
    let second = f.cli("alice").args(["promote", "api", "--to", "production", "--json"]).assert_success().json();
    let second_id = second["id"].as_i64().unwrap();
    f.cli("bob").args(["approve", &second_id.to_string(), "--wait"]).assert_success();
    assert_eq!(status_cell(&f, "production")["digest"], v2.as_str());
    assert_eq!(f.get("carol", &format!("/v1/releases/{id}"))["state"], "superseded");
    f.assert_views_agree();

    // Roll back: v1 was approved in production before, so no second approval is needed.
    let out =
        f.cli("alice").args(["rollback", "api", "--env", "production", "--wait", "--json"]).assert_success().json();
    assert_eq!(out["state"], "live");
    assert_eq!(out["kind"], "rollback");
    assert_eq!(out["digest"], v1.as_str());
    assert!(out["approval"].is_null());
    assert_eq!(status_cell(&f, "production")["digest"], v1.as_str());
    assert_eq!(f.get("carol", &format!("/v1/releases/{second_id}"))["state"], "superseded");
    f.assert_views_agree();

    // The human views tell the same.
    let status = f.cli("carol").args(["status", "api"]).assert_success().stdout();
    assert!(status.contains(&v1[7..19]), "{status}");
    let history = f.cli("carol").args(["history", "api", "--env", "production", "--json"]).assert_success().json();
    let states: Vec<&str> = history.as_array().unwrap().iter().map(|r| r["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["live", "superseded", "superseded"]);

    // And the audit log holds every step, intact.
    for action in [
        "release.deploy",
        "release.promote",
        "release.approve",
        "release.live",
        "release.rollback",
        "release.superseded",
    ] {
        assert!(!f.events(action).is_empty(), "no {action} event");
    }
    let verified = f.cli("carol").args(["audit", "verify", "--json"]).assert_success().json();
    assert_eq!(verified["ok"], true);
}

/// A promotion of `digest` waiting for approval in production; its id.
pub fn pending_promotion(f: &Fixture, digest: &str) -> i64 {
    f.live_in("alice", "staging", digest);
    let promoted = f.cli("alice").args(["promote", "api", "--to", "production", "--json"]).assert_success().json();
    assert_eq!(promoted["state"], "pending_approval");
    promoted["id"].as_i64().unwrap()
}

/// `GET /v1/releases/ID?seen=N&wait=S` in a thread of its own: (status, answer, seconds taken).
pub fn follow(f: &Fixture, id: i64, query: &str) -> std::thread::JoinHandle<(StatusCode, Value, f64)> {
    let (http, url, token) =
        (f.server.http(), format!("{}/v1/releases/{id}?{query}", f.server.url), f.token("carol").to_owned());
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let response = http.get(url).bearer_auth(token).send().unwrap();
        let status = response.status();
        (status, response.json().unwrap_or(Value::Null), started.elapsed().as_secs_f64())
    })
}

pub fn changes(shown: &Value) -> usize {
    shown["transitions"].as_array().unwrap().len() + shown["deployments"].as_array().unwrap().len()
}

#[test]
fn a_follower_hears_of_a_change_when_it_is_committed_and_not_before() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    let id = pending_promotion(&f, &v1);
    let seen = changes(&f.get("carol", &format!("/v1/releases/{id}")));

    // Nothing changes: the answer is held back.
    let waiter = follow(&f, id, &format!("seen={seen}&wait=30"));
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert!(!waiter.is_finished(), "answered though nothing changed");

    // Bob approves: the follower hears of it at once, long before its 30 s are up.
    let (status, _) = f.post("bob", &format!("/v1/releases/{id}/approve"), json!({}));
    assert!(status.is_success());
    let (status, answer, took) = waiter.join().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(changes(&answer) > seen, "{answer}");
    assert!(took < 5.0, "held {took:.1} s after the change");
    f.settle(id);

    // A final release is answered at once, whatever was seen.
    let (status, answer, took) = follow(&f, id, "seen=1000&wait=30").join().unwrap();
    assert_eq!((status, answer["state"].as_str()), (StatusCode::OK, Some("live")));
    assert!(took < 20.0, "{took:.1} s for a final release");

    // Without a change, the wait ends with the release as it is.
    let v2 = f.upload("v2");
    let id = pending_promotion(&f, &v2);
    let seen = changes(&f.get("carol", &format!("/v1/releases/{id}")));
    let (status, answer, took) = follow(&f, id, &format!("seen={seen}&wait=1")).join().unwrap();
    assert_eq!((status, changes(&answer)), (StatusCode::OK, seen));
    assert!(took >= 0.9, "answered after {took:.2} s, before its wait");

    // What it cannot read is refused, naming it.
    for (query, named) in [("wait=soon", "wait"), ("seen=-1&wait=1", "seen"), ("wait=1&hold=3", "hold")] {
        let (status, answer, _) = follow(&f, id, query).join().unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(named), "{query}: {answer}");
    }
}

#[test]
fn a_stopping_server_answers_its_followers_instead_of_keeping_them_waiting() {
    let mut f = Fixture::new();
    let v1 = f.upload("v1");
    let id = pending_promotion(&f, &v1);
    let seen = changes(&f.get("carol", &format!("/v1/releases/{id}")));
    let waiter = follow(&f, id, &format!("seen={seen}&wait=30"));
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!waiter.is_finished());
    let started = std::time::Instant::now();
    // SAFETY: a signal to the server process this test started.
    unsafe { libc::kill(f.server.pid() as i32, libc::SIGTERM) };
    assert!(f.server.terminate_after_signal().success());
    let (status, answer, _) = waiter.join().unwrap();
    assert_eq!((status, answer["state"].as_str()), (StatusCode::OK, Some("pending_approval")));
    assert!(started.elapsed().as_secs_f64() < 15.0, "the stop waited for the follower's 30 s");
}

/// An unknown service or environment is named with what is configured, to a token that may
/// see everything; a token limited to some is told only what it asked about.
#[test]
fn an_unknown_service_or_environment_is_answered_with_the_configured_ones() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    let (status, body) =
        f.post("alice", "/v1/releases", json!({"service": "apii", "environment": "staging", "digest": v1}));
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["message"], "service \"apii\" is not in the configuration (configured: api)");
    let out = f.cli("alice").args(["deploy", "api", "--env", "stagin", &v1]).assert_exit(4);
    assert!(
        out.stderr().contains("environment \"stagin\" is not in the configuration (configured: staging, production)"),
        "{out}"
    );
    let scoped = f.server.token_with("scoped", "deployer", &["--owner", "scoped", "--services", "api"]);
    let response = f
        .server
        .http()
        .post(format!("{}/v1/releases", f.server.url))
        .bearer_auth(&scoped)
        .json(&json!({"service": "web", "environment": "staging", "digest": v1}))
        .send()
        .unwrap();
    let body: Value = response.json().unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(!message.contains("configured:"), "{message}");
}

/// A plain `promote` to an environment that needs approval says who may approve it, and how.
#[test]
fn a_promote_waiting_for_approval_names_who_may_approve_it() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    f.live_in("ci", "staging", &v1);
    let human = f.cli("alice").args(["promote", "api", "--to", "production"]).assert_success().stdout();
    assert!(
        human.contains("release 2 waits for approval by one of: bob, root; approve with `release approve 2`"),
        "{human}"
    );
}
