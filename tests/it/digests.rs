//! Digests as people see them (issue 12 item 8): the 12-hex short digest a table prints is
//! taken back by every command that reads a digest; a prefix naming several artifacts is
//! refused naming them; tables align whatever the widths.

use std::path::Path;

use release::audit::NewEvent;
use release::digest::Digest;
use release::registry::{NewArtifact, Registry};

use crate::support::{Backend, TestServer, local_nodes};

fn upload(server: &TestServer, token: &str, dir: &Path, version: &str) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("index.html"), version).unwrap();
    let out = server
        .cli()
        .env("RELEASE_TOKEN", token)
        .args(["upload", dir.to_str().unwrap(), "--service", "api", "--version", version])
        .assert_success();
    out.stdout().trim().to_owned()
}

#[test]
fn the_short_digest_a_table_prints_is_taken_back_everywhere() {
    let config = format!("[service.api]\nkind = \"generic\"\n{}", local_nodes("api", &["staging"]));
    let server = TestServer::start_with(Backend::Local, &config);
    let ci = server.token_with("ci", "ci", &["--owner", "gitlab"]);
    let alice = server.token("alice", "deployer");
    let work = tempfile::tempdir().unwrap();
    let v1 = upload(&server, &ci, &work.path().join("v1"), "1.0.0");
    let v2 = upload(&server, &ci, &work.path().join("v2"), "1.1.0");

    // The table's DIGEST column: 12 hex digits each.
    let listed = server.cli().env("RELEASE_TOKEN", &ci).args(["artifact", "list", "api"]).assert_success().stdout();
    let shorts: Vec<String> = listed.lines().skip(1).map(|l| l.split_whitespace().next().unwrap().to_owned()).collect();
    assert_eq!(shorts, [v2[7..19].to_owned(), v1[7..19].to_owned()], "{listed}");
    let (short1, short2) = (&shorts[1], &shorts[0]);

    let shown = server.cli().env("RELEASE_TOKEN", &ci).args(["artifact", "show", short1, "--json"]).assert_success();
    assert_eq!(shown.json()["digest"], v1.as_str());
    let file = work.path().join("v1.tar.zst");
    let got = server
        .cli()
        .env("RELEASE_TOKEN", &ci)
        .args(["download", short1, "-o", file.to_str().unwrap(), "--json"])
        .assert_success();
    assert_eq!(got.json()["digest"], v1.as_str());
    assert_eq!(Digest::of(&std::fs::read(&file).unwrap()).to_string(), v1, "checked against the whole digest");

    let deploy = |token: &str, args: &[&str]| {
        server.cli().env("RELEASE_TOKEN", token).args(args).args(["--wait", "--json"]).assert_success().json()
    };
    assert_eq!(deploy(&ci, &["deploy", "api", "--env", "staging", short1])["digest"], v1.as_str());
    assert_eq!(deploy(&ci, &["deploy", "api", "--env", "staging", &format!("sha256:{short2}")])["digest"], v2.as_str());
    let back = deploy(&alice, &["rollback", "api", "--env", "staging", "--to", short1]);
    assert_eq!((back["digest"].as_str(), back["state"].as_str()), (Some(v1.as_str()), Some("live")));

    // Refusals: too short (before anything is asked), no such prefix.
    let short = server.cli().env("RELEASE_TOKEN", &ci).args(["artifact", "show", &short1[..11]]).assert_exit(2);
    assert!(short.stderr().contains("its first 12 or more"), "{short}");
    let none = server
        .cli()
        .env("RELEASE_TOKEN", &ci)
        .args(["deploy", "api", "--env", "staging", "000000000000"])
        .assert_exit(4);
    assert!(none.stderr().contains("no artifact's digest starts with sha256:000000000000"), "{none}");
    let http = server.http();
    let answer = http.get(format!("{}/v1/artifacts/{}", server.url, &short1[..11])).bearer_auth(&ci).send().unwrap();
    assert_eq!(answer.status(), 400);
}

#[test]
fn a_prefix_naming_several_artifacts_is_refused_naming_them() {
    let server = TestServer::start(Backend::Local);
    let ci = server.token_with("ci", "ci", &["--owner", "gitlab"]);
    // Two artifacts whose digests share 20 hex digits cannot be made by hashing here; the
    // registry records them as an upload would (the bytes are not needed to name them).
    let registry = Registry::open(&server.data_dir().join("registry.db")).unwrap();
    let twins: Vec<Digest> = ['1', '2']
        .iter()
        .map(|last| format!("sha256:{}{}{last}", "cd".repeat(10), "0".repeat(43)).parse().unwrap())
        .collect();
    for &digest in &twins {
        let new = NewArtifact {
            digest,
            size: 1,
            unpacked_size: 1,
            file_count: 1,
            migrations: vec![],
            shared_checked: vec![],
            service: "api".into(),
            version: None,
            git_sha: None,
            build_url: None,
            uploaded_by: "ci".into(),
            uploader_owner: "gitlab".into(),
            index: None,
            quiet_repeat: false,
        };
        registry
            .record_artifact(
                &new,
                &NewEvent::by_server(release::audit::AuditAction::ArtifactUpload, "", serde_json::json!({})),
            )
            .unwrap();
    }
    let out = server.cli().env("RELEASE_TOKEN", &ci).args(["artifact", "show", "cdcdcdcdcdcd"]).assert_exit(3);
    for twin in &twins {
        assert!(out.stderr().contains(&twin.to_string()), "{out}");
    }
    let answer: serde_json::Value = server
        .http()
        .get(format!("{}/v1/artifacts/sha256:cdcdcdcdcdcdcdcd", server.url))
        .bearer_auth(&ci)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(answer["error"]["code"], "ambiguous_digest", "{answer}");
    // One more digit than they share: the one.
    let one = server
        .cli()
        .env("RELEASE_TOKEN", &ci)
        .args(["artifact", "show", &twins[1].to_string()[..71], "--json"])
        .assert_success();
    assert_eq!(one.json()["digest"], twins[1].to_string());
}

#[test]
fn tables_align_whatever_the_widths() {
    let server = TestServer::start(Backend::Local);
    server.token_with("ci", "ci", &["--owner", "gitlab"]);
    server.token_with("a-rather-long-token-name-for-the-nightly-pipeline", "ci", &["--owner", "platform-team"]);
    let listed = server.cli().args(["token", "list"]).assert_success().stdout();
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "{listed}");
    // Every column starts where its header does.
    for column in ["OWNER", "ROLES", "STATE", "SCOPE"] {
        let at = lines[0].find(column).unwrap();
        for line in &lines[1..] {
            assert!(at > 0 && line.as_bytes()[at - 1] == b' ' && line.as_bytes()[at] != b' ', "{column}:\n{listed}");
        }
    }
}
