//! `release token`: secrets shown once, stored hashed, revocation, names never reused.

use crate::support::{Backend, TestServer};

#[test]
fn a_token_secret_is_shown_once_and_stored_only_hashed() {
    let server = TestServer::start(Backend::Local);
    let created = server
        .cli()
        .args([
            "token",
            "create",
            "ci-api",
            "--role",
            "ci",
            "--owner",
            "gitlab",
            "--services",
            "api",
            "--expires",
            "90",
            "--json",
        ])
        .assert_success()
        .json();
    let secret = created["token"].as_str().unwrap().to_owned();
    assert_eq!(created["name"], "ci-api");
    assert!(secret.starts_with("rls_"));

    let listed = server.cli().args(["token", "list", "--json"]).assert_success();
    assert!(!listed.stdout().contains(&secret[20..]), "list shows no secret\n{listed}");
    let list = listed.json();
    assert_eq!(list[0]["owner"], "gitlab");
    assert_eq!(list[0]["services"], serde_json::json!(["api"]));
    assert!(list[0]["expires_at"].is_string());

    // Nothing on disk holds the secret, only its hash.
    for file in ["registry.db", "registry.db-wal"] {
        if let Ok(bytes) = std::fs::read(server.data_dir().join(file)) {
            let needle = &secret.as_bytes()[21..];
            assert!(!bytes.windows(needle.len()).any(|w| w == needle), "{file} holds the secret");
        }
    }

    let human = server.cli().args(["token", "list"]).assert_success().stdout();
    assert!(human.contains("ci-api") && human.contains("active") && human.contains("services=api"), "{human}");
}

#[test]
fn revoke_then_names_are_never_reused() {
    let server = TestServer::start(Backend::Local);
    let token = server.token_with("alice", "deployer", &["--owner", "alice"]);
    let ok = server.http().get(format!("{}/v1/status", server.url)).bearer_auth(&token).send().unwrap();
    assert_eq!(ok.status(), 200);

    server.cli().args(["token", "revoke", "alice"]).assert_success();
    let refused = server.http().get(format!("{}/v1/status", server.url)).bearer_auth(&token).send().unwrap();
    assert_eq!(refused.status(), 401);
    let again = server.cli().args(["token", "revoke", "alice"]).assert_exit(3);
    assert!(again.stderr().contains("revoked already"), "{again}");
    let reuse = server.cli().args(["token", "create", "alice", "--role", "ci"]).assert_exit(3);
    assert!(reuse.stderr().contains("never reused"), "{reuse}");
    let missing = server.cli().args(["token", "revoke", "bob"]).assert_exit(4);
    assert!(missing.stderr().contains("no token named \"bob\""), "{missing}");
    let listed = server.cli().args(["token", "list"]).assert_success().stdout();
    assert!(listed.contains("revoked"), "{listed}");
}

#[test]
fn bad_token_requests_are_usage_errors() {
    let server = TestServer::start(Backend::Local);
    let out = server.cli().args(["token", "create", "x", "--role", "root"]).assert_exit(2);
    assert!(out.stderr().contains("unknown role \"root\""), "{out}");
    let out = server.cli().args(["token", "create", "Has Spaces", "--role", "ci"]).assert_exit(2);
    assert!(out.stderr().contains("token name"), "{out}");
    let out = server.cli().args(["token", "create", "x", "--role", "ci", "--expires", "0"]).assert_exit(2);
    assert!(out.stderr().contains("--expires"), "{out}");
}

#[test]
fn tokens_that_request_or_decide_releases_name_their_owner() {
    let server = TestServer::start(Backend::Local);
    for roles in ["deployer", "approver", "admin", "ci,approver"] {
        let out = server.cli().args(["token", "create", "alice-approver", "--role", roles]).assert_exit(2);
        assert!(out.stderr().contains("must name its owner with --owner"), "{roles}: {out}");
    }
    let listed = server.cli().args(["token", "list", "--json"]).assert_success().json();
    assert_eq!(listed, serde_json::json!([]), "a refused request makes no token (and spends no name)");

    // Capitals are taken as lowercase: `Alice` is `alice`.
    let made = server
        .cli()
        .args(["token", "create", "alice-approver", "--role", "approver", "--owner", "Alice", "--json"])
        .assert_success()
        .json();
    assert_eq!(made["owner"], "alice");
    // ci and auditor tokens never have a release waiting for approval, nor decide one.
    let ci = server.cli().args(["token", "create", "ci-api", "--role", "ci,auditor", "--json"]).assert_success().json();
    assert_eq!(ci["owner"], "ci-api");

    for bad in ["alice smith", "al/ice", "ålice"] {
        let out =
            server.cli().args(["token", "create", "x", "--role", "deployer", &format!("--owner={bad}")]).assert_exit(2);
        assert!(out.stderr().contains("owner") && out.stderr().contains("must be 1-64 characters"), "{bad:?}: {out}");
    }
}

#[test]
fn a_token_on_the_command_line_wins_over_release_token_and_is_warned_about() {
    let server = TestServer::start(Backend::Local);
    let good = server.token("carol", "auditor");
    let revoked = server.token("old", "auditor");
    server.cli().args(["token", "revoke", "old"]).assert_success();

    // RELEASE_TOKEN, the way to pass it: no warning.
    let out = server.cli().env("RELEASE_TOKEN", &good).args(["status"]).assert_success();
    assert!(!out.stderr().contains("warning"), "{out}");
    // --token works and wins over RELEASE_TOKEN (flags over environment), with a warning that
    // names the way out and never the token.
    let out = server.cli().env("RELEASE_TOKEN", &revoked).args(["status", "--token", &good]).assert_success();
    assert!(out.stderr().contains("warning: --token") && out.stderr().contains("RELEASE_TOKEN"), "{out}");
    assert!(!out.stderr().contains(&good[4..]), "{out}");
    let out = server.cli().env("RELEASE_TOKEN", &good).args(["status", &format!("--token={revoked}")]).assert_exit(5);
    assert!(out.stderr().contains("warning: --token"), "{out}");
}

/// A token made where no registry is yet says it creates one, and where: a token no server
/// will ever see is the usual first-hour mistake.
#[test]
fn a_token_made_where_no_registry_is_says_it_creates_one_and_where() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let create = |name: &str| {
        crate::support::TestCommand::new()
            .args(["token", "create", name, "--role", "ci", "--owner", "gitlab", "--data-dir", data.to_str().unwrap()])
            .assert_success()
    };
    let first = create("ci-1");
    let expected = format!("no registry at {}: creating one there", data.join("registry.db").display());
    assert!(first.stderr().contains(&expected), "{first}");
    let second = create("ci-2");
    assert!(!second.stderr().contains("no registry"), "{second}");
}
