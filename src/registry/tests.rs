use super::*;
use crate::digest::Digest;
use crate::token::Role;

fn open() -> (tempfile::TempDir, Registry) {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(&dir.path().join("registry.db")).unwrap();
    (dir, registry)
}

fn new_artifact(service: &str, content: &[u8]) -> NewArtifact {
    NewArtifact {
        digest: Digest::of(content),
        size: content.len() as u64,
        unpacked_size: 10_240,
        file_count: 3,
        migrations: vec!["2024_01_01_000000_create_users.php".into()],
        service: service.into(),
        version: Some("1.2.3".into()),
        git_sha: Some("abc123".into()),
        build_url: None,
        uploaded_by: "ci-api".into(),
        uploader_owner: "gitlab".into(),
    }
}

fn new_token(name: &str) -> NewToken {
    NewToken {
        id: format!("{:016x}", name.len()),
        name: name.into(),
        owner: "alice".into(),
        roles: vec![Role::Ci],
        services: Some(vec!["api".into()]),
        environments: None,
        secret_sha256: [7; 32],
        expires_at: None,
    }
}

#[test]
fn recording_the_same_upload_twice_changes_nothing() {
    let (_dir, registry) = open();
    let first = registry.record_artifact(&new_artifact("api", b"bytes")).unwrap();
    assert!(first.new_artifact && first.new_upload);
    let mut again = new_artifact("api", b"bytes");
    again.version = Some("other label".into());
    let second = registry.record_artifact(&again).unwrap();
    assert!(!second.new_artifact && !second.new_upload);
    assert_eq!(second.upload, first.upload, "the first upload's labels stay");
    assert_eq!(second.artifact, first.artifact);

    // The same bytes for another service: a second upload record, one artifact.
    let other = registry.record_artifact(&new_artifact("play", b"bytes")).unwrap();
    assert!(!other.new_artifact && other.new_upload);
    assert_eq!(registry.artifact_uploads(Digest::of(b"bytes")).unwrap().len(), 2);
    let page = registry.service_artifacts("api", 10, None).unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].upload.version.as_deref(), Some("1.2.3"));
    assert_eq!(page[0].size, 5);
}

#[test]
fn the_database_refuses_to_rewrite_artifacts() {
    let (_dir, registry) = open();
    registry.record_artifact(&new_artifact("api", b"bytes")).unwrap();
    let conn = registry.writer.lock().unwrap();
    for sql in [
        "UPDATE artifacts SET size = 1",
        "DELETE FROM artifacts",
        "UPDATE artifact_uploads SET version = 'x'",
        "DELETE FROM artifact_uploads",
    ] {
        let err = conn.execute(sql, []).unwrap_err().to_string();
        assert!(err.contains("immutable") || err.contains("never deleted"), "{sql}: {err}");
    }
}

#[test]
fn tokens_are_revoked_once_and_names_never_reused() {
    let (_dir, registry) = open();
    let created = registry.create_token(&new_token("ci-api")).unwrap();
    assert_eq!(created.services, Some(vec!["api".to_owned()]));
    assert!(matches!(registry.create_token(&new_token("ci-api")), Err(RegistryError::TokenNameTaken(_))));
    let revoked = registry.revoke_token("ci-api").unwrap();
    assert!(revoked.revoked_at.is_some());
    assert!(matches!(registry.revoke_token("ci-api"), Err(RegistryError::TokenAlreadyRevoked(_))));
    assert!(matches!(registry.revoke_token("nobody"), Err(RegistryError::TokenNotFound(_))));
    assert!(matches!(registry.create_token(&new_token("ci-api")), Err(RegistryError::TokenNameTaken(_))));

    let conn = registry.writer.lock().unwrap();
    for sql in ["DELETE FROM tokens", "UPDATE tokens SET revoked_at = NULL", "UPDATE tokens SET roles = 'admin'"] {
        assert!(conn.execute(sql, []).is_err(), "{sql} was allowed");
    }
}

#[test]
fn a_registry_from_a_newer_release_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    drop(Registry::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = Registry::open(&path).err().unwrap();
    assert!(matches!(err, RegistryError::TooNew { found: 99, .. }), "{err}");
}
