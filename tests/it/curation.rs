//! Taking artifacts out of use: block (never deployable again) and purge (the bytes of ones
//! never live), both recorded, the rows kept.

use reqwest::StatusCode;
use serde_json::json;

use crate::releases::Fixture;

#[test]
fn a_blocked_artifact_never_goes_live_again() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    f.live_in("ci", "staging", &v1);
    let (status, _) = f.post("alice", &format!("/v1/artifacts/{v1}/block"), json!({"reason": "corrupts orders"}));
    assert_eq!(status, StatusCode::FORBIDDEN, "only admins block");
    let out = f.cli("root").args(["artifact", "block", &v1, "--reason", "corrupts orders"]).assert_success();
    assert!(out.stdout().contains("blocked"), "{out}");

    let (status, body) =
        f.post("alice", "/v1/releases/promote", json!({"service": "api", "environment": "production"}));
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("blocked")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("corrupts orders"));
    f.assert_refusal_recorded("alice", 409, "blocked");
    let (status, _) = f.post("ci", "/v1/releases", json!({"service": "api", "environment": "staging", "digest": v1}));
    assert_eq!(status, StatusCode::CONFLICT);

    let meta = f.get("carol", &format!("/v1/artifacts/{v1}"));
    assert_eq!(meta["blocked"]["reason"], "corrupts orders");
    assert_eq!(meta["blocked"]["blocked_by"], "root");
    assert_eq!(f.events("artifact.block").len(), 1);
    let again = f.cli("root").args(["artifact", "block", &v1, "--reason", "twice"]).assert_exit(3);
    assert!(again.stderr().contains("blocked already"), "{again}");
}

#[test]
fn purge_frees_only_the_bytes_of_artifacts_never_live() {
    let f = Fixture::new();
    let never = f.upload("never-deployed");
    let live = f.upload("live");
    f.live_in("ci", "staging", &live);

    let out = f
        .cli("root")
        .args(["artifact", "purge", "--never-live", "--older-than", "0", "--json"])
        .assert_success()
        .json();
    assert_eq!(out["purged"], json!([never]));

    let meta = f.get("carol", &format!("/v1/artifacts/{never}"));
    assert_eq!(meta["stored"], false);
    assert!(meta["purged_at"].is_string());
    assert_eq!(meta["digest"], never.as_str(), "the row stays");
    assert_eq!(f.get("carol", &format!("/v1/artifacts/{live}"))["stored"], true, "what was live is kept for good");
    let blob = f
        .server
        .http()
        .get(format!("{}/v1/artifacts/{never}/blob", f.server.url))
        .bearer_auth(f.token("carol"))
        .send()
        .unwrap();
    assert_eq!(blob.status(), StatusCode::GONE);
    let (status, body) =
        f.post("ci", "/v1/releases", json!({"service": "api", "environment": "staging", "digest": never}));
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("purged")));
    assert_eq!(f.events("artifact.purge").len(), 1);
    assert_eq!(f.server.artifact_keys().len(), 1);

    // Uploading the same bytes again brings them back.
    f.upload("never-deployed");
    assert_eq!(f.get("carol", &format!("/v1/artifacts/{never}"))["stored"], true);
    f.live_in("ci", "staging", &never);

    // A purge needs an admin, and says what it purges.
    let (status, _) = f.post("alice", "/v1/artifacts/purge", json!({"never_live": true, "older_than_days": 0}));
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = f.post("root", "/v1/artifacts/purge", json!({"never_live": false, "older_than_days": 0}));
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[test]
fn purge_leaves_young_artifacts() {
    let f = Fixture::new();
    f.upload("fresh");
    let out = f
        .cli("root")
        .args(["artifact", "purge", "--never-live", "--older-than", "30", "--json"])
        .assert_success()
        .json();
    assert_eq!(out["purged"], json!([]));
}
