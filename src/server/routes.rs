//! Every `/v1` route in one table: method, path, the action (and so the roles) it needs, and
//! what it does. The README's API reference and the role-matrix test are checked against it,
//! and a test checks the router answers every entry, so no endpoint is forgotten.

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
        summary: "an artifact's metadata and upload records",
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
        summary: "free the bytes of artifacts never live: {never_live: true, older_than_days}",
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
        summary: "what is live where and what is in flight (?service=S)",
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
        summary: "walk the hash chain and compare it with the bucket's checkpoint",
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
}
