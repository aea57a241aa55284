//! Blocks and purges against a real SQLite file: a block cancels what waits for its artifact
//! in its own transaction and the database refuses to let a blocked artifact go on; a purge
//! is recorded only if nothing needs the bytes, checked again in its transaction, and a
//! release is never recorded for purged bytes.

use super::*;
use crate::digest::Digest;
use crate::model::audit::{AuditAction, NewEvent};
use crate::model::release::{Kind, State};
use crate::registry::{ArtifactIndex, NewApproval, NewArtifact, NewRelease, Start};

fn open() -> (tempfile::TempDir, Registry) {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::open(&dir.path().join("registry.db")).unwrap();
    (dir, registry)
}

fn upload(registry: &Registry, content: &[u8]) -> Digest {
    let artifact = new_artifact(content);
    registry.record_artifact(&artifact, &event()).unwrap();
    artifact.digest
}

/// An upload of `content` for `api`, without an index or a shared-path check.
fn new_artifact(content: &[u8]) -> NewArtifact {
    NewArtifact {
        digest: Digest::of(content),
        size: content.len() as u64,
        unpacked_size: 1024,
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
    }
}

fn event() -> NewEvent {
    NewEvent::by_server(AuditAction::ArtifactUpload, "subject", serde_json::json!({}))
}

fn request(digest: Digest, environment: &str, state: State) -> NewRelease {
    NewRelease {
        service: "api".into(),
        environment: environment.into(),
        digest,
        kind: Kind::Deploy,
        state,
        requested_by: "alice".into(),
        requester_owner: "alice".into(),
        source_environment: None,
        replaces: None,
        expires_at: None,
        note: None,
        excluded: vec![],
        adopt: false,
        forced_past: vec![],
    }
}

fn block(reason: &str) -> Block {
    Block {
        reason: reason.into(),
        blocked_by: "root".into(),
        owner: "root-owner".into(),
        blocked_at: crate::utc::Timestamp::now(),
    }
}

fn approval() -> NewApproval {
    NewApproval { approve: true, decided_by: "bob".into(), decider_owner: "bob".into(), reason: None }
}

fn state(registry: &Registry, id: i64) -> State {
    registry.release(id).unwrap().unwrap().state
}

/// Records a block straight into the table, as an older binary or a hand on the database
/// would: nothing is cancelled with it.
fn block_behind_the_registrys_back(registry: &Registry, digest: Digest) {
    let conn = registry.writer.lock().unwrap();
    conn.execute(
        "INSERT INTO artifact_blocks (digest, reason, blocked_by, owner, blocked_at) VALUES (?1, 'by hand', 'x', 'x', 't')",
        [digest.to_string()],
    )
    .unwrap();
}

#[test]
fn a_block_cancels_what_waits_and_what_is_approved_in_its_own_transaction() {
    let (_dir, registry) = open();
    let digest = upload(&registry, b"v1");
    let pending = registry.create_release(&request(digest, "production", State::PendingApproval), &event()).unwrap();
    let approved = registry.create_release(&request(digest, "staging", State::Approved), &event()).unwrap();
    let deploying = registry.create_release(&request(digest, "qa", State::Approved), &event()).unwrap();
    registry.start_deploy(deploying.id, "server", &far_off(), &event()).unwrap().deploying().unwrap();

    let (stored, cancelled) = registry.block_artifact(digest, &block("corrupts orders"), &event()).unwrap();
    assert_eq!(stored.reason, "corrupts orders");
    assert_eq!(cancelled.iter().map(|r| r.id).collect::<Vec<_>>(), [pending.id, approved.id]);
    assert_eq!(state(&registry, pending.id), State::Cancelled);
    assert_eq!(state(&registry, approved.id), State::Cancelled);
    assert_eq!(state(&registry, deploying.id), State::Deploying, "a running deploy is left to its run");
    for id in [pending.id, approved.id] {
        let detail = registry.release_detail(id).unwrap().unwrap();
        let last = detail.transitions.last().unwrap();
        assert_eq!((last.state, last.actor.as_str()), (State::Cancelled, "root"));
        assert!(last.reason.as_deref().unwrap().contains("corrupts orders"), "{last:?}");
    }
    // Each cancel is an event of the release (what webhooks send), by the admin who blocked.
    let events = registry.audit_events(0, None, 1000).unwrap();
    let cancels: Vec<_> = events.iter().filter(|e| e.action == "release.cancel").collect();
    assert_eq!(cancels.len(), 2, "{events:#?}");
    assert!(cancels.iter().all(|e| e.actor == "root" && e.owner == "root-owner"));
    assert_eq!(cancels[0].subject, format!("release/{}", pending.id));
    assert!(cancels[0].details.contains("corrupts orders"), "{}", cancels[0].details);

    // Approving it now is refused, naming the block; a new request too.
    let err = registry.decide(pending.id, &approval(), &event()).unwrap_err();
    assert!(matches!(&err, RegistryError::ArtifactBlocked { reason, .. } if reason == "corrupts orders"), "{err}");
    let err = registry.create_release(&request(digest, "production", State::PendingApproval), &event()).unwrap_err();
    assert!(matches!(err, RegistryError::ArtifactBlocked { .. }), "{err}");
}

#[test]
fn an_approval_that_lands_after_the_block_is_refused() {
    let (_dir, registry) = open();
    let digest = upload(&registry, b"v1");
    let pending = registry.create_release(&request(digest, "production", State::PendingApproval), &event()).unwrap();
    block_behind_the_registrys_back(&registry, digest);
    let err = registry.decide(pending.id, &approval(), &event()).unwrap_err();
    assert!(matches!(&err, RegistryError::ArtifactBlocked { reason, .. } if reason == "by hand"), "{err}");
    assert_eq!(state(&registry, pending.id), State::PendingApproval);
}

#[test]
fn an_approved_release_whose_artifact_was_blocked_is_cancelled_instead_of_started() {
    let (_dir, registry) = open();
    let digest = upload(&registry, b"v1");
    let approved = registry.create_release(&request(digest, "staging", State::Approved), &event()).unwrap();
    let pending = registry.create_release(&request(digest, "production", State::PendingApproval), &event()).unwrap();
    block_behind_the_registrys_back(&registry, digest);
    match registry.start_deploy(approved.id, "server", &far_off(), &event()).unwrap() {
        Start::Blocked { block, cancelled } => {
            assert_eq!(block.reason, "by hand");
            assert_eq!(cancelled.iter().map(|r| r.id).collect::<Vec<_>>(), [approved.id, pending.id]);
        }
        other => panic!("started: {other:?}"),
    }
    assert_eq!(state(&registry, approved.id), State::Cancelled);
    assert_eq!(state(&registry, pending.id), State::Cancelled);
    assert!(registry.lapsed_deploys().unwrap().is_empty(), "no lease taken");
}

#[test]
fn the_database_itself_never_lets_a_blocked_artifact_go_on() {
    let (_dir, registry) = open();
    let digest = upload(&registry, b"v1");
    let other = upload(&registry, b"v2");
    let pending = registry.create_release(&request(digest, "production", State::PendingApproval), &event()).unwrap();
    let approved = registry.create_release(&request(digest, "staging", State::Approved), &event()).unwrap();
    let fine = registry.create_release(&request(other, "qa", State::Approved), &event()).unwrap();
    block_behind_the_registrys_back(&registry, digest);
    let conn = registry.writer.lock().unwrap();
    for (sql, why) in [
        (format!("UPDATE releases SET state = 'approved' WHERE id = {}", pending.id), "approved"),
        (format!("UPDATE releases SET state = 'deploying' WHERE id = {}", approved.id), "started"),
        (
            format!(
                "INSERT INTO releases (service, environment, digest, kind, state, requested_by, requester_owner,
                   requested_at, state_changed_at) VALUES ('api', 'prod-2', '{digest}', 'deploy', 'pending_approval',
                   'x', 'x', 't', 't')"
            ),
            "requested",
        ),
        (format!("UPDATE releases SET state = 'cancelled' WHERE id = {}", fine.id), "an unblocked approved cancelled"),
    ] {
        let err = conn.execute(&sql, []).expect_err(why);
        assert!(err.to_string().contains("blocked") || err.to_string().contains("state machine"), "{why}: {err}");
    }
    // What a block may do: cancel what was approved and has not started.
    conn.execute(&format!("UPDATE releases SET state = 'cancelled' WHERE id = {}", approved.id), []).unwrap();
}

#[test]
fn a_release_requested_after_the_candidates_were_listed_keeps_its_bytes() {
    let (_dir, registry) = open();
    let digest = upload(&registry, b"v1");
    assert_eq!(registry.purge_candidates(&far_off()).unwrap(), [digest]);
    // Between the listing and the record, someone asks for it.
    let pending = registry.create_release(&request(digest, "production", State::PendingApproval), &event()).unwrap();
    assert!(!registry.record_purge(digest, &far_off(), "root", "root", &event()).unwrap(), "checked again");
    assert_eq!(registry.last_purge(digest).unwrap(), None);
    // A release that ended without going live no longer keeps it.
    registry.transition(pending.id, State::Cancelled, "alice", None, &event()).unwrap();
    assert!(registry.record_purge(digest, &far_off(), "root", "root", &event()).unwrap());
}

#[test]
fn a_purge_recorded_first_refuses_the_release_until_the_bytes_come_back() {
    let (_dir, registry) = open();
    let digest = upload(&registry, b"v1");
    assert!(registry.record_purge(digest, &far_off(), "root", "root", &event()).unwrap());
    assert!(registry.purge_candidates(&far_off()).unwrap().is_empty(), "purged already");
    assert!(!registry.record_purge(digest, &far_off(), "root", "root", &event()).unwrap(), "not twice");
    let err = registry.create_release(&request(digest, "staging", State::Approved), &event()).unwrap_err();
    assert!(matches!(err, RegistryError::ArtifactPurged(d) if d == digest), "{err}");
    {
        let conn = registry.writer.lock().unwrap();
        let err = conn
            .execute(
                &format!(
                    "INSERT INTO releases (service, environment, digest, kind, state, requested_by, requester_owner,
                       requested_at, state_changed_at) VALUES ('api', 'staging', '{digest}', 'deploy', 'approved',
                       'x', 'x', 't', 't')"
                ),
                [],
            )
            .unwrap_err();
        assert!(err.to_string().contains("purged"), "{err}");
    }
    // Uploaded again: the purge is undone (recorded), the bytes may be released, and purged
    // again later, counting their age from the new upload.
    upload(&registry, b"v1");
    assert!(
        registry
            .purge_candidates(&crate::utc::Timestamp::at(crate::utc::now() - time::Duration::DAY))
            .unwrap()
            .is_empty()
    );
    assert_eq!(registry.purge_candidates(&far_off()).unwrap(), [digest]);
    registry.create_release(&request(digest, "staging", State::Approved), &event()).unwrap();
}

#[test]
fn an_adopted_legacy_tree_is_never_purged() {
    let (_dir, registry) = open();
    let v1 = upload(&registry, b"v1");
    let legacy = upload(&registry, b"legacy tree");
    let adopting = registry
        .create_release(&NewRelease { adopt: true, ..request(v1, "staging", State::Approved) }, &event())
        .unwrap();
    registry.record_adoption(adopting.id, legacy, &["web-1".to_owned()], &event()).unwrap();
    // The adopting release failed: nothing names the legacy tree but the adoption.
    registry.transition(adopting.id, State::Failed, "release", Some("hook failed"), &event()).unwrap();
    assert_eq!(registry.purge_candidates(&far_off()).unwrap(), [v1], "only v1");
    assert!(!registry.record_purge(legacy, &far_off(), "root", "root", &event()).unwrap());
    let conn = registry.writer.lock().unwrap();
    let err = conn
        .execute(
            &format!(
                "INSERT INTO artifact_purges (digest, purged_by, owner, purged_at) VALUES ('{legacy}', 'r', 'r', 't')"
            ),
            [],
        )
        .unwrap_err();
    assert!(err.to_string().contains("adopted"), "{err}");
}

#[test]
fn an_adoption_never_records_purged_bytes() {
    let (_dir, registry) = open();
    let v1 = upload(&registry, b"v1");
    let legacy = upload(&registry, b"legacy tree");
    assert!(registry.record_purge(legacy, &far_off(), "root", "root", &event()).unwrap());
    let adopting = registry
        .create_release(&NewRelease { adopt: true, ..request(v1, "staging", State::Approved) }, &event())
        .unwrap();
    let err = registry.record_adoption(adopting.id, legacy, &["web-1".to_owned()], &event()).unwrap_err();
    assert!(err.to_string().contains("purged"), "{err}");
}

#[test]
fn a_blocked_artifact_is_never_the_rollback_target() {
    let (_dir, registry) = open();
    let live = |digest: Digest| {
        let r = registry.create_release(&request(digest, "staging", State::Approved), &event()).unwrap();
        registry.start_deploy(r.id, "server", &far_off(), &event()).unwrap().deploying().unwrap();
        registry.finish_deploy(r.id, &crate::registry::Ending::Live { nodes: vec![] }, &event()).unwrap().release
    };
    let (v1, v2, v3) = (upload(&registry, b"v1"), upload(&registry, b"v2"), upload(&registry, b"v3"));
    live(v1);
    live(v2);
    let now = live(v3);
    assert_eq!(registry.rollback_target(&now).unwrap(), Some(v2));
    registry.block_artifact(v2, &block("corrupts orders"), &event()).unwrap();
    assert_eq!(registry.rollback_target(&now).unwrap(), Some(v1), "the last good one before it");
}

/// A lease that never lapses within a test.
fn far_off() -> crate::utc::Timestamp {
    crate::utc::Timestamp::parse("2999-01-01T00:00:00.000000Z").unwrap()
}

/// What lets a repeat go unread (`ingest::repeats`): only an upload that would record nothing
/// new — its artifact and that service's upload of it, an index, a check against the
/// service's shared paths, and bytes not purged.
#[test]
fn an_upload_changes_nothing_only_when_everything_it_would_record_is_on_record() {
    let (_dir, registry) = open();
    let shared = vec!["storage".to_owned()];
    let indexed = |content: &[u8]| NewArtifact {
        index: Some(ArtifactIndex { sha256: Digest::of(b"its index"), files: 1, size: 100 }),
        shared_checked: shared.clone(),
        ..new_artifact(content)
    };
    let digest = Digest::of(b"v1");
    assert!(registry.unchanged_by_upload(digest, "api", &shared).unwrap().is_none(), "not stored");
    registry.record_artifact(&indexed(b"v1"), &event()).unwrap();
    let unchanged = registry.unchanged_by_upload(digest, "api", &shared).unwrap().expect("all on record");
    assert_eq!((unchanged.artifact.digest, unchanged.upload.service.as_str()), (digest, "api"));
    assert!(!unchanged.new_artifact && !unchanged.new_upload);
    assert!(registry.unchanged_by_upload(digest, "worker", &shared).unwrap().is_none(), "another service's");
    let more = ["storage".to_owned(), "bootstrap/cache".to_owned()];
    assert!(registry.unchanged_by_upload(digest, "api", &more).unwrap().is_none(), "not checked against all");
    assert!(registry.unchanged_by_upload(digest, "api", &[]).unwrap().is_some(), "no shared paths to check");
    // Without an index (stored before indexes, or too large for one), an upload may add one.
    let unindexed = upload(&registry, b"v2");
    assert!(registry.unchanged_by_upload(unindexed, "api", &[]).unwrap().is_none());
    // Purged, an upload restores the bytes; once restored, it changes nothing again.
    assert!(registry.record_purge(digest, &far_off(), "root", "root", &event()).unwrap());
    assert!(registry.unchanged_by_upload(digest, "api", &shared).unwrap().is_none(), "purged");
    registry.record_artifact(&indexed(b"v1"), &event()).unwrap();
    assert!(registry.unchanged_by_upload(digest, "api", &shared).unwrap().is_some(), "restored");
}
