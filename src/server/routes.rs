//! Every route that needs a token (`/v1` and `/metrics`) in one table: method, path, the action
//! (and so the roles) it needs, and what it does. The README's API reference, the OpenAPI
//! document and the role-matrix test are checked against it, and a test checks the router
//! answers every entry, so no endpoint is forgotten.

use crate::token::Action;

pub struct Route {
    pub method: &'static str,
    /// As the router spells it, parameters in braces.
    pub path: &'static str,
    pub action: Action,
    pub summary: &'static str,
}

pub const ROUTES: &[Route] = &[
    Route {
        method: "POST",
        path: "/v1/artifacts",
        action: Action::UploadArtifact,
        summary: "upload an artifact (body: the archive; ?service=S[&version=V&git_sha=SHA&build_url=URL]; X-Release-Digest header or trailer)",
    },
    Route {
        method: "HEAD",
        path: "/v1/artifacts/{digest}",
        action: Action::Read,
        summary: "200 if stored, 404 if not",
    },
    Route {
        method: "GET",
        path: "/v1/artifacts/{digest}",
        action: Action::Read,
        summary: "an artifact's metadata and its upload records (a token limited to services: theirs only)",
    },
    Route {
        method: "GET",
        path: "/v1/artifacts/{digest}/blob",
        action: Action::Read,
        summary: "the artifact's bytes (Range supported)",
    },
    Route {
        method: "POST",
        path: "/v1/artifacts/{digest}/block",
        action: Action::ManageArtifacts,
        summary: "never deployable again: {reason}",
    },
    Route {
        method: "POST",
        path: "/v1/artifacts/purge",
        action: Action::ManageArtifacts,
        summary: "free the bytes of artifacts never live: {never_live: true, older_than_days ≥ 1}",
    },
    Route {
        method: "GET",
        path: "/v1/services/{service}/artifacts",
        action: Action::Read,
        summary: "a service's artifacts, newest first (?limit=N&before=CURSOR)",
    },
    Route {
        method: "POST",
        path: "/v1/releases",
        action: Action::Deploy,
        summary: "deploy: {service, environment, digest}",
    },
    Route {
        method: "POST",
        path: "/v1/releases/promote",
        action: Action::Promote,
        summary: "promote what is live in the source environment: {service, environment, from?}",
    },
    Route {
        method: "POST",
        path: "/v1/releases/rollback",
        action: Action::Rollback,
        summary: "roll back to the last good release or to a digest live before: {service, environment, to?}",
    },
    Route {
        method: "GET",
        path: "/v1/releases",
        action: Action::Read,
        summary: "history, newest first (?service=S&environment=E&limit=N&before=ID)",
    },
    Route {
        method: "GET",
        path: "/v1/releases/{id}",
        action: Action::Read,
        summary: "one release: transitions, approval, per-node deployments, who may approve",
    },
    Route {
        method: "POST",
        path: "/v1/releases/{id}/approve",
        action: Action::Decide,
        summary: "approve a pending release (not by its requester)",
    },
    Route {
        method: "POST",
        path: "/v1/releases/{id}/reject",
        action: Action::Decide,
        summary: "reject a pending release: {reason}",
    },
    Route {
        method: "POST",
        path: "/v1/releases/{id}/cancel",
        action: Action::Cancel,
        summary: "withdraw a pending release (its requester, or an admin)",
    },
    Route {
        method: "GET",
        path: "/v1/status",
        action: Action::Read,
        summary: "what is live where and what is in flight (?service=S; ?nodes=true: what each node serves, asked at most once per `limits.node_status_max_age`)",
    },
    Route {
        method: "GET",
        path: "/v1/services/{service}/check",
        action: Action::Deploy,
        summary: "release check: each node of the service in ?environment=E looked at for what a deploy needs, nothing changed (ok: no check failed)",
    },
    Route {
        method: "GET",
        path: "/v1/audit/events",
        action: Action::ReadAudit,
        summary: "the audit log as JSON lines (?after=SEQ&since=TIME&limit=N)",
    },
    Route {
        method: "GET",
        path: "/v1/audit/verify",
        action: Action::ReadAudit,
        summary: "walk the hash chain and compare it with the bucket's checkpoint (one fresh walk per token per `limits.verify_interval`, else 429)",
    },
    Route {
        method: "GET",
        path: "/metrics",
        action: Action::Read,
        summary: "Prometheus text (see Metrics below); a token limited to services or environments gets 403",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's API reference lists exactly these routes, with these roles.
    #[test]
    fn the_readme_api_reference_is_this_table() {
        let readme = include_str!("../../README.md");
        let table = readme
            .split("<!-- api:begin -->")
            .nth(1)
            .and_then(|rest| rest.split("<!-- api:end -->").next())
            .expect("README.md has an api:begin/api:end section");
        let documented: Vec<(String, String, String)> = table
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                (cells[1].trim_matches('`').to_owned(), cells[2].trim_matches('`').to_owned(), cells[3].to_owned())
            })
            .collect();
        let expected: Vec<(String, String, String)> = ROUTES
            .iter()
            .map(|r| {
                let roles = r.action.allowed_roles();
                let roles = if roles.len() == crate::token::Role::ALL.len() {
                    "any".to_owned()
                } else {
                    roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
                };
                (r.method.to_owned(), r.path.to_owned(), roles)
            })
            .collect();
        assert_eq!(documented, expected);
    }

    /// The OpenAPI document has exactly these operations, with these roles and path
    /// parameters (and nothing else but itself).
    #[test]
    fn the_openapi_document_is_this_table() {
        let doc: serde_json::Value = serde_json::from_str(super::super::OPENAPI).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, operation) in item.as_object().expect("path item") {
                if path == "/v1/openapi.json" {
                    continue;
                }
                documented.push((method.to_uppercase(), path.clone()));
                let route = ROUTES
                    .iter()
                    .find(|r| r.method.eq_ignore_ascii_case(method) && r.path == path)
                    .unwrap_or_else(|| panic!("{method} {path} is documented but not served"));
                let roles: Vec<&str> = route.action.allowed_roles().iter().map(|r| r.as_str()).collect();
                assert_eq!(operation["x-roles"], serde_json::json!(roles), "{method} {path}: roles");
                let mut declared: Vec<String> = operation["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "path")
                    .map(|p| p["name"].as_str().unwrap().to_owned())
                    .collect();
                let mut in_path: Vec<String> = path
                    .split('/')
                    .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                    .map(str::to_owned)
                    .collect();
                declared.sort();
                in_path.sort();
                assert_eq!(declared, in_path, "{method} {path}: path parameters");
                assert!(operation["summary"].as_str().is_some_and(|s| !s.is_empty()), "{method} {path}: summary");
            }
        }
        let mut served: Vec<(String, String)> =
            ROUTES.iter().map(|r| (r.method.to_owned(), r.path.to_owned())).collect();
        served.sort();
        documented.sort();
        assert_eq!(documented, served, "every served route is documented");
    }
}
