//! SPEC 9 refusals about releases, roles and policies, each its own test, each checking the
//! audit event it leaves.

use std::fs;

use reqwest::StatusCode;
use serde_json::json;

use crate::releases::Fixture;
use crate::support::with_local_nodes;

fn deploy_body(env: &str, digest: &str) -> serde_json::Value {
    json!({"service": "api", "environment": env, "digest": digest})
}

#[test]
fn promote_of_an_artifact_never_live_in_the_source_environment() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    let (status, body) = f.post("alice", "/v1/releases", deploy_body("production", &v1));
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "not_promotable");
    assert!(body["error"]["message"].as_str().unwrap().contains("never live in staging"));
    f.assert_refusal_recorded("alice", 409, "not_promotable");

    // Nothing live in staging at all: nothing to promote.
    let out = f.cli("alice").args(["promote", "api", "--to", "production"]).assert_exit(3);
    assert!(out.stderr().contains("nothing is live for api in staging"), "{out}");
    f.assert_refusal_recorded("alice", 409, "nothing_live");
    assert!(f.get("carol", "/v1/releases")["releases"].as_array().unwrap().is_empty(), "no release was recorded");
}

#[test]
fn self_approval_is_refused() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    f.live_in("ci", "staging", &v1);
    let (_, pending) = f.post("alice", "/v1/releases/promote", json!({"service": "api", "environment": "production"}));
    let id = pending["id"].as_i64().unwrap();
    let (status, body) = f.post("alice-approver", &format!("/v1/releases/{id}/approve"), json!({}));
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "self_approval");
    f.assert_refusal_recorded("alice-approver", 409, "self_approval");
    assert_eq!(f.get("carol", &format!("/v1/releases/{id}"))["state"], "pending_approval");
}

#[test]
fn owners_that_differ_only_in_capitals_are_one_person() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    f.live_in("ci", "staging", &v1);
    // Another approver token of Alice's, her name typed in capitals.
    let shouting = f.server.token_with("alice-tablet", "approver", &["--owner", "ALICE"]);
    let (_, pending) = f.post("alice", "/v1/releases/promote", json!({"service": "api", "environment": "production"}));
    let id = pending["id"].as_i64().unwrap();
    let response = f
        .server
        .http()
        .post(format!("{}/v1/releases/{id}/approve", f.server.url))
        .bearer_auth(&shouting)
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: serde_json::Value = response.json().unwrap();
    assert_eq!(body["error"]["code"], "self_approval", "{body}");
    f.assert_refusal_recorded("alice-tablet", 409, "self_approval");
    let shown = f.get("carol", &format!("/v1/releases/{id}"));
    assert_eq!(shown["state"], "pending_approval");
    assert_eq!(shown["approvers"], json!(["bob", "root"]), "alice is not among who may approve");
}

#[test]
fn a_role_that_does_not_allow_the_action_is_403() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    let (status, body) = f.post("carol", "/v1/releases", deploy_body("staging", &v1));
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(body["error"]["message"].as_str().unwrap().contains("may not deploy"));
    f.assert_refusal_recorded("carol", 403, "forbidden");

    let (status, _) = f.post("ci", "/v1/releases/rollback", json!({"service": "api", "environment": "staging"}));
    assert_eq!(status, StatusCode::FORBIDDEN);
    f.assert_refusal_recorded("ci", 403, "forbidden");
}

#[test]
fn ci_deploys_only_where_no_approval_is_needed() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    f.live_in("ci", "staging", &v1);
    let out = f.cli("ci").args(["deploy", "api", "--env", "production", &v1]).assert_exit(5);
    assert!(out.stderr().contains("deploys only to environments without approval"), "{out}");
    f.assert_refusal_recorded("ci", 403, "forbidden");
}

#[test]
fn missing_unknown_and_revoked_tokens_are_401_and_recorded() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    let url = format!("{}/v1/releases", f.server.url);
    let send = |token: Option<&str>| {
        let request = f.server.http().post(&url).json(&deploy_body("staging", &v1));
        match token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
        .send()
        .unwrap()
        .status()
    };
    assert_eq!(send(None), StatusCode::UNAUTHORIZED);
    let forged = format!("{}0000", &f.token("alice")[..f.token("alice").len() - 4]);
    assert_eq!(send(Some(&forged)), StatusCode::UNAUTHORIZED);
    f.server.cli().args(["token", "revoke", "alice"]).assert_success();
    assert_eq!(send(Some(f.token("alice"))), StatusCode::UNAUTHORIZED);

    // Missing and unknown tokens name nobody: they are counted per source and window.
    let refused = f.events("request.refused");
    assert!(refused.iter().all(|e| e["actor"] != "(unauthenticated)"), "{refused:#?}");
    let samples = f.anonymous_refusals(2);
    assert!(samples.iter().all(|s| s["request"] == "POST /v1/releases" && s["status"] == 401), "{samples:#?}");
    assert!(samples[0]["message"].as_str().unwrap().contains("missing token"), "{samples:#?}");
    assert!(samples[1]["message"].as_str().unwrap().contains("unknown token"), "{samples:#?}");
    assert!(samples.iter().all(|s| s["source"] == "127.0.0.1"), "{samples:#?}");
    // A revoked token is a real one: its refusal names it and its owner, at once.
    let revoked: Vec<_> = refused.iter().filter(|e| e["actor"] == "alice").collect();
    assert_eq!(revoked.len(), 1, "{refused:#?}");
    assert_eq!(revoked[0]["owner"], "alice");
    assert!(revoked[0]["details"]["message"].as_str().unwrap().contains("revoked"));
    assert_eq!(f.events("token.revoke").len(), 1, "the revocation itself is recorded too");
}

#[test]
fn a_pending_release_expires_and_cannot_be_approved_then() {
    let f = Fixture::with_config(&with_local_nodes(
        "[service.api]\nkind = \"generic\"\n[[environment]]\nname = \"staging\"\n[[environment]]\nname = \"production\"\n\
         promote_from = \"staging\"\nrequires_approval = true\napproval_ttl = \"1s\"\n",
    ));
    let v1 = f.upload("v1");
    f.live_in("ci", "staging", &v1);
    let (_, pending) = f.post("alice", "/v1/releases/promote", json!({"service": "api", "environment": "production"}));
    let id = pending["id"].as_i64().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (status, body) = f.post("bob", &format!("/v1/releases/{id}/approve"), json!({}));
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "expired");
    assert_eq!(f.get("carol", &format!("/v1/releases/{id}"))["state"], "expired");
    assert_eq!(f.events("release.expire").len(), 1);
    f.assert_refusal_recorded("bob", 409, "expired");
}

#[test]
fn deciding_a_release_that_is_not_pending_is_refused() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    let live = f.live_in("ci", "staging", &v1);
    let id = live["id"].as_i64().unwrap();
    let (status, body) = f.post("bob", &format!("/v1/releases/{id}/approve"), json!({}));
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "invalid_state");
    f.assert_refusal_recorded("bob", 409, "invalid_state");
}

#[test]
fn rollback_targets_must_have_been_live_before() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    let v2 = f.upload("v2");
    // Nothing live: nothing to roll back.
    let (status, body) = f.post("alice", "/v1/releases/rollback", json!({"service": "api", "environment": "staging"}));
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("nothing_live")));
    f.assert_refusal_recorded("alice", 409, "nothing_live");
    // One release only: no earlier one to go back to.
    f.live_in("ci", "staging", &v1);
    let (status, body) = f.post("alice", "/v1/releases/rollback", json!({"service": "api", "environment": "staging"}));
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("no_rollback_target")));
    f.assert_refusal_recorded("alice", 409, "no_rollback_target");
    // --to an artifact never live there.
    let (status, body) =
        f.post("alice", "/v1/releases/rollback", json!({"service": "api", "environment": "staging", "to": v2}));
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("not_live_before")));
    f.assert_refusal_recorded("alice", 409, "not_live_before");
    // After v2 went live, --to v1 is fine.
    f.live_in("ci", "staging", &v2);
    let (status, body) =
        f.post("alice", "/v1/releases/rollback", json!({"service": "api", "environment": "staging", "to": v1}));
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(f.settle(body["id"].as_i64().unwrap())["digest"], v1.as_str());
}

#[test]
fn a_rollback_to_an_artifact_never_approved_there_waits_for_approval() {
    // Production needed no approval when v1 and v2 went live there; now it does.
    let mut f = Fixture::with_config(&with_local_nodes(
        "[service.api]\nkind = \"generic\"\n[[environment]]\nname = \"production\"\n",
    ));
    let v1 = f.upload("v1");
    let v2 = f.upload("v2");
    f.live_in("alice", "production", &v1);
    f.live_in("alice", "production", &v2);
    f.server.reconfigure(&with_local_nodes(
        "[service.api]\nkind = \"generic\"\n[[environment]]\nname = \"production\"\nrequires_approval = true\n",
    ));
    let (status, rollback) =
        f.post("alice", "/v1/releases/rollback", json!({"service": "api", "environment": "production"}));
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(rollback["state"], "pending_approval", "v1 was never approved in production: {rollback}");
    assert_eq!(rollback["digest"], v1.as_str());
    let id = rollback["id"].as_i64().unwrap();
    f.post("bob", &format!("/v1/releases/{id}/approve"), json!({}));
    assert_eq!(f.settle(id)["state"], "live");
    assert_eq!(f.events("config.environment").len(), 2, "the configuration change is on record");
}

const CONFIG_APPROVAL_ONLY: &str = "[service.api]\nkind = \"generic\"\n[[environment]]\nname = \"staging\"\n\
    [[environment]]\nname = \"production\"\nrequires_approval = true\n";

#[test]
fn only_the_requester_or_an_admin_may_cancel() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    f.live_in("ci", "staging", &v1);
    let (_, pending) = f.post("alice", "/v1/releases/promote", json!({"service": "api", "environment": "production"}));
    let id = pending["id"].as_i64().unwrap();
    let (status, _) = f.post("ci", &format!("/v1/releases/{id}/cancel"), json!({}));
    assert_eq!(status, StatusCode::FORBIDDEN);
    f.assert_refusal_recorded("ci", 403, "forbidden");
    let out = f.cli("alice").args(["cancel", &id.to_string(), "--json"]).assert_success().json();
    assert_eq!(out["state"], "cancelled");
    assert_eq!(f.events("release.cancel").len(), 1);
}

#[test]
fn a_rejected_release_ends_the_wait_with_exit_3() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    f.live_in("ci", "staging", &v1);
    // Alice promotes and waits; Bob rejects meanwhile.
    let waiting = std::thread::scope(|scope| {
        let waiter = scope.spawn(|| f.cli("alice").args(["promote", "api", "--to", "production", "--wait"]).run());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let id = loop {
            let status = f.get("carol", "/v1/status?service=api");
            let production =
                status.as_array().unwrap().iter().find(|c| c["environment"] == "production").unwrap().clone();
            if let Some(id) = production["pending"].as_array().and_then(|p| p.first()).and_then(|v| v.as_i64()) {
                break id;
            }
            assert!(std::time::Instant::now() < deadline, "the promotion never showed up as pending");
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        f.cli("bob").args(["reject", &id.to_string(), "--reason", "changelog missing"]).assert_success();
        let shown = f.get("carol", &format!("/v1/releases/{id}"));
        assert_eq!(shown["approval"]["decision"], "rejected");
        assert_eq!(shown["approval"]["reason"], "changelog missing");
        waiter.join().unwrap()
    });
    assert_eq!(waiting.output.status.code(), Some(3), "{waiting}");
    assert!(waiting.stdout().contains("waits for approval by one of: bob, root"), "{waiting}");
    assert!(waiting.stderr().contains("ended rejected"), "{waiting}");
}

#[test]
fn a_rejection_needs_a_reason() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    f.live_in("ci", "staging", &v1);
    let (_, pending) = f.post("alice", "/v1/releases/promote", json!({"service": "api", "environment": "production"}));
    let id = pending["id"].as_i64().unwrap();
    let (status, body) = f.post("bob", &format!("/v1/releases/{id}/reject"), json!({"reason": " "}));
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")));
    assert_eq!(f.get("carol", &format!("/v1/releases/{id}"))["state"], "pending_approval");
}

#[test]
fn a_service_dropped_from_the_configuration_leaves_the_status_matrix() {
    let mut f = Fixture::new();
    f.server.reconfigure(
        "[service.web]\nkind = \"generic\"\n[[environment]]\nname = \"staging\"\n[[environment]]\nname = \"production\"\n",
    );
    let status = f.get("carol", "/v1/status");
    let services: std::collections::BTreeSet<&str> =
        status.as_array().unwrap().iter().map(|c| c["service"].as_str().unwrap()).collect();
    assert_eq!(services.into_iter().collect::<Vec<_>>(), ["web"]);
    assert_eq!(f.events("config.service_retired").len(), 1);
}

#[test]
fn a_scoped_token_pages_through_the_whole_history() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    for _ in 0..3 {
        f.live_in("ci", "staging", &v1);
    }
    let prod_only = f.server.token_with("prod-auditor", "auditor", &["--envs", "production"]);
    let url = format!("{}/v1/releases?limit=2", f.server.url);
    let page: serde_json::Value = f.server.http().get(&url).bearer_auth(&prod_only).send().unwrap().json().unwrap();
    assert!(page["releases"].as_array().unwrap().is_empty(), "staging is out of scope: {page}");
    assert!(page["next"].is_i64(), "but the cursor still moves on: {page}");
    let status: serde_json::Value = f
        .server
        .http()
        .get(format!("{}/v1/status", f.server.url))
        .bearer_auth(&prod_only)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(status.as_array().unwrap().iter().all(|c| c["environment"] == "production"), "{status}");
}

#[test]
fn a_pending_release_is_cancelled_when_another_goes_live_first() {
    let f = Fixture::with_config(&with_local_nodes(CONFIG_APPROVAL_ONLY));
    let v1 = f.upload("v1");
    let v2 = f.upload("v2");
    let (_, pending) = f.post("alice", "/v1/releases", deploy_body("production", &v1));
    let stale = pending["id"].as_i64().unwrap();
    let (_, other) = f.post("alice", "/v1/releases", deploy_body("production", &v2));
    let other = other["id"].as_i64().unwrap();
    f.post("bob", &format!("/v1/releases/{other}/approve"), json!({}));
    assert_eq!(f.settle(other)["state"], "live");
    let shown = f.get("carol", &format!("/v1/releases/{stale}"));
    assert_eq!(shown["state"], "cancelled");
    let (status, body) = f.post("bob", &format!("/v1/releases/{stale}/approve"), json!({}));
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("invalid_state")));
}

#[test]
fn a_release_to_an_environment_without_nodes_for_the_service_is_refused_and_nothing_recorded() {
    // `api` has a node in staging only: production would go live with nothing deployed.
    let config = "[service.api]\nkind = \"generic\"\n[[environment]]\nname = \"staging\"\n[[environment]]\nname = \"production\"\n";
    let f = Fixture::with_config(&format!("{config}{}", crate::support::local_nodes("api", &["staging"])));
    let v1 = f.upload("v1");
    f.live_in("alice", "staging", &v1);
    let (status, body) = f.post("alice", "/v1/releases", deploy_body("production", &v1));
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "no_nodes");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("api has no node in production") && message.contains("[[service.api.node]]"), "{message}");
    let out = f.cli("alice").args(["promote", "api", "--to", "production", "--from", "staging"]).assert_exit(3);
    assert!(out.stderr().contains("no node in production"), "{out}");
    // Nothing recorded: staging's release is the only one.
    let history = f.get("carol", "/v1/releases");
    assert_eq!(history["releases"].as_array().unwrap().len(), 1, "{history}");
    let deploys = f.events("release.deploy");
    assert_eq!(deploys.len(), 1, "{deploys:?}");
    assert_eq!(deploys[0]["details"]["environment"], "staging");
    assert!(f.events("release.promote").is_empty());
}

/// Uploads `files` as an artifact of `service`; returns its digest.
fn upload_for(f: &Fixture, service: &str, files: &[(&str, &[u8])]) -> String {
    let mut tar = crate::support::archives::RawTar::new();
    for (path, data) in files {
        tar = tar.file(path, data);
    }
    let response = f
        .server
        .http()
        .post(format!("{}/v1/artifacts?service={service}", f.server.url))
        .bearer_auth(f.token("ci"))
        .body(crate::support::archives::zstd(&tar.finish()))
        .send()
        .unwrap();
    assert!(response.status().is_success(), "{}", response.text().unwrap());
    response.json::<serde_json::Value>().unwrap()["digest"].as_str().unwrap().to_owned()
}

#[test]
fn an_artifact_holding_a_shared_path_configured_after_its_upload_is_refused_at_request_time() {
    // `web` is not configured yet: its uploads are checked against no shared path.
    let mut f = Fixture::new();
    let holds_env = upload_for(&f, "web", &[("index.php", b"<?php"), (".env", b"DB_PASSWORD=in-the-build")]);
    let clean = upload_for(&f, "web", &[("index.php", b"<?php")]);
    f.server.reconfigure(&with_local_nodes(
        "[service.web]\nkind = \"generic\"\nshared = [\".env\"]\n[[environment]]\nname = \"staging\"\n",
    ));
    fs::create_dir_all(f.server.dir.path().join("nodes/web-staging/shared")).unwrap();
    fs::write(f.server.dir.path().join("nodes/web-staging/shared/.env"), "DB_PASSWORD=on-the-node").unwrap();

    // Refused before anything is recorded, naming the path (not at prepare on the nodes, exit 7).
    let body = json!({"service": "web", "environment": "staging", "digest": holds_env});
    let (status, refusal) = f.post("alice", "/v1/releases", body);
    assert_eq!(status, StatusCode::CONFLICT, "{refusal}");
    assert_eq!(refusal["error"]["code"], "shared_path_in_artifact");
    assert!(refusal["error"]["message"].as_str().unwrap().contains("\".env\""), "{refusal}");
    let out = f.cli("alice").args(["deploy", "web", "--env", "staging", &holds_env]).assert_exit(3);
    assert!(out.stderr().contains("shared paths"), "{out}");
    assert!(f.get("carol", "/v1/releases?service=web")["releases"].as_array().unwrap().is_empty());

    // The clean one is read and checked once, then deploys; the verdict is kept.
    let checks = |f: &Fixture| f.server.log().matches("checked an artifact for shared paths").count();
    let live_in_staging = |f: &Fixture, digest: &str| {
        let (status, release) =
            f.post("alice", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": digest}));
        assert_eq!(status, StatusCode::CREATED, "{release}");
        assert_eq!(f.settle(release["id"].as_i64().unwrap())["state"], "live");
    };
    let before = checks(&f);
    live_in_staging(&f, &clean);
    assert_eq!(checks(&f), before + 1);
    let env = fs::read_to_string(f.server.dir.path().join("nodes/web-staging/current/.env")).unwrap();
    assert_eq!(env, "DB_PASSWORD=on-the-node");
    live_in_staging(&f, &clean);
    assert_eq!(checks(&f), before + 1, "the clean verdict is recorded: not read again");

    // An upload for the configured service is checked as it arrives: no read at request time.
    let fresh = upload_for(&f, "web", &[("index.php", b"<?php echo 2;")]);
    live_in_staging(&f, &fresh);
    assert_eq!(checks(&f), before + 1);
}
