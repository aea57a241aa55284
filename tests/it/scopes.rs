//! Scopes (issue 10): a token limited to some services or environments learns nothing of the
//! others, not even that they exist. Every question about something outside its scope gets
//! exactly the answer a question about something absent gets — status, code and message, but
//! for the name or id asked about — through the API and the pages, for reads and for writes;
//! and the audit log still records the attempt.

use reqwest::Method;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::releases::Fixture;
use crate::support::{archives, local_nodes};

fn config() -> String {
    format!(
        "[service.api]\nkind = \"generic\"\n[service.web]\nkind = \"generic\"\n\
         [[environment]]\nname = \"staging\"\n[[environment]]\nname = \"production\"\npromote_from = \"staging\"\n\
         requires_approval = true\n{}{}",
        local_nodes("api", &["staging", "production"]),
        local_nodes("web", &["staging", "production"])
    )
}

/// What a token is answered: status, and the body with `name` (an id, a digest, a service…)
/// replaced by `<ASKED>`, so that two answers about two different things can be compared.
fn answer(
    f: &Fixture,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
    name: &str,
) -> (StatusCode, String) {
    let mut request = f.server.http().request(method, format!("{}{path}", f.server.url)).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().unwrap();
    let status = response.status();
    (status, replace_word(&response.text().unwrap(), name))
}

/// `text` with each occurrence of `word` that is not part of a longer word (`4` in `404` is)
/// replaced by `<ASKED>`.
fn replace_word(text: &str, word: &str) -> String {
    let is_word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(word) {
        let (before, after) = (rest[..at].chars().next_back(), rest[at + word.len()..].chars().next());
        out.push_str(&rest[..at]);
        out.push_str(if is_word(before) || is_word(after) { word } else { "<ASKED>" });
        rest = &rest[at + word.len()..];
    }
    out.push_str(rest);
    out
}

/// Asks `path_of(hidden)` and `path_of(absent)` (with `body_of` for a body) and asserts both
/// answers are one 404; returns it.
fn same_as_absent(
    f: &Fixture,
    token: &str,
    method: Method,
    (hidden, absent): (&str, &str),
    path_of: impl Fn(&str) -> String,
    body_of: impl Fn(&str) -> Option<Value>,
) -> String {
    let outside = answer(f, token, method.clone(), &path_of(hidden), body_of(hidden), hidden);
    let missing = answer(f, token, method.clone(), &path_of(absent), body_of(absent), absent);
    assert_eq!(outside, missing, "{method} {}: outside the scope vs absent", path_of(hidden));
    assert_eq!(outside.0, StatusCode::NOT_FOUND, "{method} {}: {}", path_of(hidden), outside.1);
    if method != Method::HEAD && !path_of(hidden).starts_with("/v1") {
        assert!(outside.1.contains("<html"), "a page: {}", outside.1);
    } else if method != Method::HEAD {
        let document: Value = serde_json::from_str(&outside.1).unwrap();
        assert_eq!(document["error"]["code"], "not_found", "{}", outside.1);
    }
    outside.1
}

struct World {
    f: Fixture,
    /// Uploaded for api and for web.
    both: String,
    /// Uploaded for web only.
    web_only: String,
    /// web: live in staging, and a promotion to production waiting for approval.
    web_live: i64,
    web_pending: i64,
}

fn world() -> World {
    let f = Fixture::with_config(&config());
    let upload = |service: &str, content: &str| -> String {
        let response = f
            .server
            .http()
            .post(format!("{}/v1/artifacts?service={service}&version={content}", f.server.url))
            .bearer_auth(f.token("ci"))
            .body(archives::valid(content))
            .send()
            .unwrap();
        assert!(response.status().is_success());
        response.json::<Value>().unwrap()["digest"].as_str().unwrap().to_owned()
    };
    let both = upload("api", "shared");
    assert_eq!(upload("web", "shared"), both);
    let web_only = upload("web", "web only");
    let (status, live) =
        f.post("root", "/v1/releases", json!({"service": "web", "environment": "staging", "digest": web_only}));
    assert_eq!(status, StatusCode::CREATED, "{live}");
    let web_live = live["id"].as_i64().unwrap();
    assert_eq!(f.settle(web_live)["state"], "live");
    let (status, pending) =
        f.post("alice", "/v1/releases/promote", json!({"service": "web", "environment": "production"}));
    assert_eq!(status, StatusCode::CREATED, "{pending}");
    assert_eq!(pending["state"], "pending_approval");
    World { web_pending: pending["id"].as_i64().unwrap(), f, both, web_only, web_live }
}

#[test]
fn a_token_scoped_to_api_gets_the_answer_for_something_absent_about_web() {
    let w = world();
    let f = &w.f;
    let auditor = f.server.token_with("api-auditor", "auditor", &["--services", "api"]);
    let deployer = f.server.token_with("api-deployer", "deployer", &["--owner", "dan", "--services", "api"]);
    let approver = f.server.token_with("api-approver", "approver", &["--owner", "erin", "--services", "api"]);
    let no_digest = format!("sha256:{}", "e".repeat(64));
    let none = || None;

    // Releases, by id: read, follow, decide, withdraw.
    let ids = (&*w.web_pending.to_string(), "999999");
    let message = same_as_absent(f, &auditor, Method::GET, ids, |id| format!("/v1/releases/{id}"), |_| none());
    assert!(message.contains("no release <ASKED>, or not within the scope of token \\\"api-auditor\\\""), "{message}");
    same_as_absent(f, &auditor, Method::GET, ids, |id| format!("/v1/releases/{id}?seen=0&wait=1"), |_| none());
    same_as_absent(
        f,
        &auditor,
        Method::GET,
        (&*w.web_live.to_string(), "999999"),
        |id| format!("/v1/releases/{id}"),
        |_| none(),
    );
    same_as_absent(f, &approver, Method::POST, ids, |id| format!("/v1/releases/{id}/approve"), |_| Some(json!({})));
    let reason = |_: &str| Some(json!({"reason": "no"}));
    same_as_absent(f, &approver, Method::POST, ids, |id| format!("/v1/releases/{id}/reject"), reason);
    same_as_absent(f, &deployer, Method::POST, ids, |id| format!("/v1/releases/{id}/cancel"), |_| Some(json!({})));
    assert_eq!(f.get("carol", &format!("/v1/releases/{}", w.web_pending))["state"], "pending_approval");

    // Artifacts, by digest: metadata, existence, bytes.
    let digests = (&*w.web_only, &*no_digest);
    for (method, suffix) in [(Method::GET, ""), (Method::HEAD, ""), (Method::GET, "/blob")] {
        same_as_absent(f, &auditor, method, digests, |d| format!("/v1/artifacts/{d}{suffix}"), |_| none());
    }
    // One uploaded for both shows only the upload record of the token's service.
    let shown = f.server.http().get(format!("{}/v1/artifacts/{}", f.server.url, w.both)).bearer_auth(&auditor).send();
    let shown: Value = shown.unwrap().json().unwrap();
    let services: Vec<&Value> = shown["uploads"].as_array().unwrap().iter().map(|u| &u["service"]).collect();
    assert_eq!(services, [&json!("api")], "{shown}");
    let all = f.get("carol", &format!("/v1/artifacts/{}", w.both));
    assert_eq!(all["uploads"].as_array().unwrap().len(), 2, "an unscoped token sees both: {all}");

    // Services, by name: artifact lists, history, status.
    let services = ("web", "nope");
    same_as_absent(f, &auditor, Method::GET, services, |s| format!("/v1/services/{s}/artifacts"), |_| none());
    same_as_absent(f, &auditor, Method::GET, services, |s| format!("/v1/releases?service={s}"), |_| none());
    same_as_absent(f, &auditor, Method::GET, services, |s| format!("/v1/status?service={s}"), |_| none());
    let unfiltered = f.server.http().get(format!("{}/v1/releases", f.server.url)).bearer_auth(&auditor).send();
    assert_eq!(unfiltered.unwrap().json::<Value>().unwrap()["releases"], json!([]), "no web release in history");

    // Writes name a service too: deploy, promote, roll back.
    let deploy = |s: &str| Some(json!({"service": s, "environment": "staging", "digest": w.web_only}));
    same_as_absent(f, &deployer, Method::POST, services, |_| "/v1/releases".into(), deploy);
    let cell = |s: &str| Some(json!({"service": s, "environment": "production"}));
    same_as_absent(f, &deployer, Method::POST, services, |_| "/v1/releases/promote".into(), cell);
    same_as_absent(f, &deployer, Method::POST, services, |_| "/v1/releases/rollback".into(), cell);

    // The pages say the same.
    same_as_absent(f, &auditor, Method::GET, ids, |id| format!("/releases/{id}"), |_| none());
    same_as_absent(f, &auditor, Method::GET, digests, |d| format!("/artifacts/{d}"), |_| none());
    same_as_absent(f, &auditor, Method::GET, services, |s| format!("/services/{s}"), |_| none());

    // Nothing was answered 403, and yet each attempt on something outside the scope is on
    // record with its real reason (written after the answer, so looked for until it is).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let recorded = loop {
        let recorded: Vec<Value> = f
            .events("request.refused")
            .into_iter()
            .filter(|e| e["details"]["code"] == "out_of_scope" && e["details"]["status"] == 404)
            .collect();
        // 6 about releases by id, 3 by digest, 3 service reads, 3 writes, 3 pages.
        if recorded.len() >= 18 || std::time::Instant::now() > deadline {
            break recorded;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(recorded.len(), 18, "{recorded:#?}");
    assert!(
        recorded.iter().any(|e| e["actor"] == "api-approver"
            && e["subject"] == format!("POST /v1/releases/{}/approve", w.web_pending)
            && e["details"]["message"].as_str().unwrap().contains("\"web\" is not one of them")),
        "{recorded:#?}"
    );
    assert!(
        !f.events("request.refused").iter().any(|e| e["subject"].as_str().unwrap().contains("999999")),
        "something absent is no refusal"
    );
}

#[test]
fn a_token_scoped_to_staging_gets_the_answer_for_an_unknown_environment_about_production() {
    let w = world();
    let f = &w.f;
    let staging = f.server.token_with("staging-deployer", "deployer", &["--owner", "dan", "--envs", "staging"]);
    let envs = ("production", "nowhere");
    let promote = |e: &str| Some(json!({"service": "web", "environment": e}));
    let message = same_as_absent(f, &staging, Method::POST, envs, |_| "/v1/releases/promote".into(), promote);
    assert!(message.contains("not within the scope of token"), "{message}");
    same_as_absent(f, &staging, Method::GET, envs, |e| format!("/v1/releases?environment={e}"), |_| None);
    let ids = (&*w.web_pending.to_string(), "999999");
    same_as_absent(f, &staging, Method::GET, ids, |id| format!("/v1/releases/{id}"), |_| None);
    // It still works where it may.
    let (status, _) = (
        f.server
            .http()
            .post(format!("{}/v1/releases", f.server.url))
            .bearer_auth(&staging)
            .json(&json!({"service": "web", "environment": "staging", "digest": w.both}))
            .send()
            .unwrap()
            .status(),
        (),
    );
    assert_eq!(status, StatusCode::CREATED);
}

#[test]
fn promoting_from_an_environment_outside_the_scope_is_answered_as_if_it_did_not_exist() {
    let w = world();
    let f = &w.f;
    let production = f.server.token_with("prod-deployer", "deployer", &["--owner", "pat", "--envs", "production"]);
    let releases = || f.get("root", "/v1/releases?environment=production")["releases"].as_array().unwrap().len();
    let before = releases();
    let envs = ("staging", "nowhere");
    let promote = |e: &str| Some(json!({"service": "web", "environment": "production", "from": e}));
    let message = same_as_absent(f, &production, Method::POST, envs, |_| "/v1/releases/promote".into(), promote);
    assert!(message.contains("not within the scope of token"), "{message}");
    assert_eq!(releases(), before, "no release was requested");
}

#[test]
fn a_token_without_limits_is_told_of_absent_things_in_the_usual_words() {
    let w = world();
    let f = &w.f;
    let (status, body) = answer(f, f.token("carol"), Method::GET, "/v1/releases/999999", None, "999999");
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::NOT_FOUND, r#"{"error":{"code":"not_found","message":"no release <ASKED>"}}"#)
    );
    let (status, body) = answer(f, f.token("carol"), Method::GET, "/v1/services/nope/artifacts", None, "nope");
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains(r#""message":"no service \"<ASKED>\"""#), "{body}");
    // A service only uploaded for, never configured, is known: its list is there.
    let response = f
        .server
        .http()
        .post(format!("{}/v1/artifacts?service=later", f.server.url))
        .bearer_auth(f.token("ci"))
        .body(archives::valid("later"))
        .send()
        .unwrap();
    assert!(response.status().is_success());
    let listed = f.get("carol", "/v1/services/later/artifacts");
    assert_eq!(listed["artifacts"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(f.get("carol", "/v1/releases?service=later")["releases"], json!([]));
}
