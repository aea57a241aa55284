//! The requests that make the server work hard are served fresh at a bounded rate:
//! `GET /v1/audit/verify` walks the whole chain, so an answer is reused while the chain's head
//! has not moved, and each token gets one fresh walk per `limits.verify_interval` (429 with
//! `Retry-After` otherwise). (`status --nodes`: see `nodes::status::status_nodes_reports_drift`.)

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::releases::{CONFIG, Fixture};

fn verify(f: &Fixture, who: &str) -> (StatusCode, Option<String>, Value) {
    let response =
        f.server.http().get(format!("{}/v1/audit/verify", f.server.url)).bearer_auth(f.token(who)).send().unwrap();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (response.status(), retry_after, response.json().unwrap())
}

#[test]
fn audit_verify_walks_the_chain_at_most_once_per_interval_per_token() {
    let f = Fixture::with_config(&format!("{CONFIG}[limits]\nverify_interval = \"60s\"\n"));
    let (status, _, first) = verify(&f, "carol");
    assert_eq!((status, &first["ok"]), (StatusCode::OK, &json!(true)), "{first}");

    // The chain has not moved: the same walk's answer, for anyone.
    let (status, _, again) = verify(&f, "carol");
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again, first, "a second walk, though nothing changed");
    let (_, _, root) = verify(&f, "root");
    assert_eq!(root["checked_at"], first["checked_at"]);

    // The chain moves (a refusal is an event): carol's fresh walk is spent, so 429, saying when.
    let digest = format!("sha256:{}", "0".repeat(64));
    let (status, _) =
        f.post("carol", "/v1/releases", json!({"service": "api", "environment": "staging", "digest": digest}));
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, retry_after, refused) = verify(&f, "carol");
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{refused}");
    assert_eq!(refused["error"]["code"], "rate_limited");
    assert!(refused["error"]["message"].as_str().unwrap().contains("limits.verify_interval"), "{refused}");
    let seconds: u64 = retry_after.expect("a Retry-After header").parse().unwrap();
    assert!((1..=60).contains(&seconds), "Retry-After: {seconds}");
    // A token past its own limit is a refused attempt, on record with its name (SPEC 2).
    let refused = f.events("request.refused");
    let limited: Vec<_> = refused.iter().filter(|e| e["details"]["code"] == "rate_limited").collect();
    assert_eq!(limited.len(), 1, "{refused:#?}");
    assert_eq!((&limited[0]["actor"], &limited[0]["details"]["status"]), (&json!("carol"), &json!(429)));

    // Another token has its own: a fresh walk, which sees the new event.
    let (status, _, fresh) = verify(&f, "root");
    assert_eq!(status, StatusCode::OK, "{fresh}");
    assert_eq!(fresh["ok"], true);
    assert!(fresh["events"].as_u64() > first["events"].as_u64(), "{fresh} after {first}");
    assert_ne!(fresh["checked_at"], first["checked_at"]);
    // And what root walked is carol's too, while the chain stays where it is.
    let (status, _, shared) = verify(&f, "carol");
    assert_eq!((status, shared), (StatusCode::OK, fresh));

    // The API reference says so.
    let doc: Value = f.server.http().get(format!("{}/v1/openapi.json", f.server.url)).send().unwrap().json().unwrap();
    let documented = &doc["paths"]["/v1/audit/verify"]["get"]["responses"]["429"];
    assert!(documented["headers"]["Retry-After"].is_object(), "{documented}");
}
