//! The OpenAPI document (`/v1/openapi.json`) is served without a token, and its request
//! bodies are exactly what the handlers accept: every documented property is understood,
//! anything else is refused by name.

use reqwest::StatusCode;
use serde_json::{Map, Value, json};

use crate::releases::Fixture;

/// A value of the documented schema.
fn example(schema: &Value) -> Value {
    if let Some(value) = schema.get("const") {
        return value.clone();
    }
    if schema.get("pattern").is_some() {
        return json!(format!("sha256:{}", "0".repeat(64)));
    }
    match schema["type"].as_str() {
        Some("boolean") => json!(false),
        Some("integer") => json!(1),
        Some("array") => json!([]),
        _ => json!("x"),
    }
}

#[test]
fn the_document_is_served_and_its_request_bodies_are_what_the_handlers_accept() {
    let f = Fixture::new();
    let url = &f.server.url;
    let served: Value = reqwest::blocking::get(format!("{url}/v1/openapi.json")).unwrap().json().unwrap();
    assert_eq!(served["openapi"], "3.1.0");

    let mut checked = 0;
    for (path, item) in served["paths"].as_object().unwrap() {
        let Some(post) = item.get("post") else { continue };
        let Some(schema) = post["requestBody"]["content"]["application/json"]["schema"].as_object() else { continue };
        let path = path.replace("{id}", "999999").replace("{digest}", &format!("sha256:{}", "0".repeat(64)));
        let mut body: Map<String, Value> =
            schema["properties"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), example(v))).collect();
        let send = |body: &Value| {
            let response =
                f.server.http().post(format!("{url}{path}")).bearer_auth(f.token("root")).json(body).send().unwrap();
            (response.status(), response.text().unwrap())
        };
        // Every documented property is understood (whatever the request then meets).
        let (status, text) = send(&Value::Object(body.clone()));
        assert!(!text.contains("unknown field"), "POST {path}: {status} {text}");
        // Anything else is refused, by name.
        body.insert("bogus".into(), json!(1));
        let (status, text) = send(&Value::Object(body));
        assert_eq!(status, StatusCode::BAD_REQUEST, "POST {path}: {text}");
        assert!(text.contains("unknown field `bogus`"), "POST {path}: {text}");
        checked += 1;
    }
    assert_eq!(checked, 6, "deploy, promote, rollback, reject, block, purge");
}
