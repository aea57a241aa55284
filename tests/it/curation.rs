//! Taking artifacts out of use: block (never deployable again, whatever was waiting for it)
//! and purge (the bytes of ones never live, never those a release or an adoption needs), both
//! recorded, the rows kept.

use reqwest::StatusCode;
use serde_json::json;

use crate::releases::Fixture;
use crate::webhooks::{Receiver, webhook};

/// A purge's "day" in these tests: `older_than_days = 1` takes what is older than a moment.
pub const SHORT_DAY: (&str, &str) = ("RELEASE_TEST_PURGE_DAY_MS", "1");

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
fn a_release_waiting_for_approval_when_its_artifact_is_blocked_is_cancelled_and_never_goes_live() {
    let receiver = Receiver::ok();
    let f = Fixture::with_env(&webhook("ops", &receiver.url, ""), &[]);
    let v1 = f.upload("v1");
    f.live_in("ci", "staging", &v1);
    let (status, pending) =
        f.post("alice", "/v1/releases/promote", json!({"service": "api", "environment": "production"}));
    assert_eq!((status, pending["state"].as_str()), (StatusCode::CREATED, Some("pending_approval")), "{pending}");
    let id = pending["id"].as_i64().unwrap();

    // The admin blocks it while it waits: the block cancels it, in the same transaction.
    let out =
        f.cli("root").args(["artifact", "block", &v1, "--reason", "corrupts orders", "--json"]).assert_success().json();
    assert_eq!(out["cancelled"], json!([id]), "{out}");

    // The approval that comes next is refused, naming the block.
    let (status, body) = f.post("bob", &format!("/v1/releases/{id}/approve"), json!({}));
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("blocked")), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&v1) && message.contains("corrupts orders"), "{message}");
    f.assert_refusal_recorded("bob", 409, "blocked");
    let cli = f.cli("bob").args(["approve", &id.to_string()]).assert_exit(3);
    assert!(cli.stderr().contains("blocked"), "{cli}");

    let shown = f.get("carol", &format!("/v1/releases/{id}"));
    assert_eq!(shown["state"], "cancelled", "{shown}");
    let last = shown["transitions"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["actor"], "root");
    assert!(last["reason"].as_str().unwrap().contains("blocked by root: corrupts orders"), "{last}");
    assert!(shown["approval"].is_null(), "no approval recorded: {shown}");
    let status = f.get("carol", "/v1/status?service=api");
    let production = status.as_array().unwrap().iter().find(|c| c["environment"] == "production").unwrap().clone();
    assert!(production["digest"].is_null() && production["in_flight"].is_null(), "{production}");
    assert_eq!(production["pending"], json!([]), "{production}");

    // The cancellation went out to the webhook, with its reason, by the admin.
    let seen = receiver.wait_for("release.cancelled", |seen| {
        seen.iter().any(|r| r.event() == "release.cancelled" && r.json()["release"]["id"] == id)
    });
    let cancelled = seen.iter().find(|r| r.event() == "release.cancelled").unwrap().json();
    assert_eq!(cancelled["release"]["state"], "cancelled");
    assert_eq!(cancelled["actor"]["name"], "root");
    assert!(cancelled["reason"].as_str().unwrap().contains("corrupts orders"), "{cancelled}");
    assert!(
        !seen.iter().any(|r| r.json()["release"]["id"] == id
            && r.event() != "release.requested"
            && r.event() != "release.cancelled"),
        "nothing but its request and its cancellation"
    );
}

#[test]
fn purge_frees_only_the_bytes_of_artifacts_never_live() {
    let f = Fixture::with_env("", &[SHORT_DAY]);
    let never = f.upload("never-deployed");
    let live = f.upload("live");
    f.live_in("ci", "staging", &live);
    std::thread::sleep(std::time::Duration::from_millis(5));

    let out = f
        .cli("root")
        .args(["artifact", "purge", "--never-live", "--older-than", "1", "--json"])
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
    assert!(matches!(f.server.stored_index(&never), Some(None)), "its file index went with its bytes");
    assert!(matches!(f.server.stored_index(&live), Some(Some(_))), "the live one's stays");

    // Uploading the same bytes again brings them back, with their index.
    f.upload("never-deployed");
    assert_eq!(f.get("carol", &format!("/v1/artifacts/{never}"))["stored"], true);
    assert!(matches!(f.server.stored_index(&never), Some(Some(_))));
    f.live_in("ci", "staging", &never);

    // A purge needs an admin, and says what it purges.
    let (status, _) = f.post("alice", "/v1/artifacts/purge", json!({"never_live": true, "older_than_days": 1}));
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = f.post("root", "/v1/artifacts/purge", json!({"never_live": false, "older_than_days": 1}));
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[test]
fn a_purge_of_everything_up_to_now_is_refused_naming_the_field() {
    let f = Fixture::with_env("", &[SHORT_DAY]);
    let fresh = f.upload("fresh");
    let (status, body) = f.post("root", "/v1/artifacts/purge", json!({"never_live": true, "older_than_days": 0}));
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("older_than_days must be at least 1"), "{body}");
    let out = f.cli("root").args(["artifact", "purge", "--never-live", "--older-than", "0"]).assert_exit(2);
    assert!(out.stderr().contains("older_than_days must be at least 1"), "{out}");
    assert_eq!(f.get("carol", &format!("/v1/artifacts/{fresh}"))["stored"], true, "nothing purged");
    assert!(f.events("artifact.purge").is_empty());
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
    // More days than the calendar holds: nothing is that old (and the server does not panic).
    let (status, body) =
        f.post("root", "/v1/artifacts/purge", json!({"never_live": true, "older_than_days": u32::MAX}));
    assert_eq!((status, &body["purged"]), (StatusCode::OK, &json!([])), "{body}");
}
