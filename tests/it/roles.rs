//! The role matrix: every route of the API table × every role — allowed, or 403. Generated
//! from `server::routes::ROUTES`, the same table the README's API reference is checked
//! against, so no endpoint is forgotten.

use release::server::routes::ROUTES;
use release::token::Role;
use reqwest::StatusCode;
use serde_json::json;

use crate::releases::Fixture;
use crate::support::archives;

/// SPEC 2, written out independently of the code: which roles may do what.
#[test]
fn the_permission_table_is_spec_2() {
    use release::token::Action::*;
    let expected = [
        (Read, "ci deployer approver auditor admin"),
        (UploadArtifact, "ci admin"),
        (ManageTokens, "admin"),
        (Deploy, "ci deployer admin"),
        (Promote, "deployer admin"),
        (Rollback, "deployer admin"),
        (Decide, "approver admin"),
        (ReadAudit, "auditor admin"),
        (Cancel, "ci deployer admin"),
        (ManageArtifacts, "admin"),
    ];
    for (action, roles) in expected {
        let actual: Vec<&str> = action.allowed_roles().iter().map(|r| r.as_str()).collect();
        assert_eq!(actual.join(" "), roles, "{action:?}");
    }
}

#[test]
fn every_route_and_every_role_allowed_or_403() {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    f.live_in("ci", "staging", &v1);
    // One token per role, all of one owner, who also requested the pending release below: so
    // only roles (never four eyes or "not the requester") decide between allowed and 403.
    let tokens: Vec<(Role, String)> = Role::ALL
        .iter()
        .map(|role| (*role, f.server.token_with(&format!("matrix-{role}"), role.as_str(), &["--owner", "matrix"])))
        .collect();
    let deployer = &tokens.iter().find(|(r, _)| *r == Role::Deployer).unwrap().1;
    let pending: serde_json::Value = f
        .server
        .http()
        .post(format!("{}/v1/releases/promote", f.server.url))
        .bearer_auth(deployer)
        .json(&json!({"service": "api", "environment": "production"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = pending["id"].as_i64().unwrap().to_string();

    let mut checked = 0;
    for route in ROUTES {
        let path = route.path.replace("{digest}", &v1).replace("{service}", "api").replace("{id}", &id);
        for (role, token) in &tokens {
            let mut request = f
                .server
                .http()
                .request(route.method.parse().unwrap(), format!("{}{path}", f.server.url))
                .bearer_auth(token);
            request = match (route.method, route.path) {
                ("POST", "/v1/artifacts") => request.query(&[("service", "api")]).body(archives::valid("matrix")),
                ("POST", "/v1/releases") => {
                    request.json(&json!({"service": "api", "environment": "staging", "digest": v1}))
                }
                ("POST", "/v1/releases/promote") => {
                    request.json(&json!({"service": "api", "environment": "production"}))
                }
                ("POST", "/v1/releases/rollback") => request.json(&json!({"service": "api", "environment": "staging"})),
                ("POST", p) if p.ends_with("/reject") || p.ends_with("/block") => {
                    request.json(&json!({"reason": "matrix"}))
                }
                ("POST", "/v1/artifacts/purge") => request.json(&json!({"never_live": true, "older_than_days": 3650})),
                ("POST", _) => request.json(&json!({})),
                _ => request,
            };
            let response = request.send().unwrap();
            let status = response.status();
            let body = response.text().unwrap_or_default();
            let allowed = route.action.allowed_roles().contains(role);
            assert_ne!(status, StatusCode::UNAUTHORIZED, "{} {path} as {role}: {body}", route.method);
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{} {path} is not routed", route.method);
            assert!(!body.contains("no such route"), "{} {path} is not routed", route.method);
            if allowed {
                assert_ne!(
                    status,
                    StatusCode::FORBIDDEN,
                    "{} {path} as {role} should be allowed: {body}",
                    route.method
                );
            } else {
                assert_eq!(status, StatusCode::FORBIDDEN, "{} {path} as {role} should be 403: {body}", route.method);
            }
            checked += 1;
        }
    }
    assert_eq!(checked, ROUTES.len() * Role::ALL.len());
}
