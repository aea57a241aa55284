//! The registry against a real SQLite file: append-only history, tokens, releases, leases,
//! scopes in queries, migrations.
//!
//! Long on purpose: one fixture (a real SQLite file) for every table family's rules.

use super::*;
use crate::digest::Digest;
use crate::model::access::Role;
use crate::model::audit::{AuditAction, Event, NewEvent};
use crate::utc;

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
        shared_checked: vec![],
        service: service.into(),
        version: Some("1.2.3".into()),
        git_sha: Some("abc123".into()),
        build_url: None,
        uploaded_by: "ci-api".into(),
        uploader_owner: "gitlab".into(),
        index: None,
        quiet_repeat: false,
    }
}

fn event() -> NewEvent {
    NewEvent::by_server(AuditAction::ArtifactUpload, "subject", serde_json::json!({}))
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
    let first = registry.record_artifact(&new_artifact("api", b"bytes"), &event()).unwrap();
    assert!(first.new_artifact && first.new_upload);
    let mut again = new_artifact("api", b"bytes");
    again.version = Some("other label".into());
    let second = registry.record_artifact(&again, &event()).unwrap();
    assert!(!second.new_artifact && !second.new_upload);
    assert_eq!(second.upload, first.upload, "the first upload's labels stay");
    assert_eq!(second.artifact, first.artifact);

    // The same bytes for another service: a second upload record, one artifact.
    let other = registry.record_artifact(&new_artifact("play", b"bytes"), &event()).unwrap();
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
    registry.record_artifact(&new_artifact("api", b"bytes"), &event()).unwrap();
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
    let created = registry.create_token(&new_token("ci-api"), &event()).unwrap();
    assert_eq!(created.services, Some(vec!["api".to_owned()]));
    assert!(matches!(registry.create_token(&new_token("ci-api"), &event()), Err(RegistryError::TokenNameTaken(_))));
    let revoked = registry.revoke_token("ci-api", &event()).unwrap();
    assert!(revoked.revoked_at.is_some());
    assert!(matches!(registry.revoke_token("ci-api", &event()), Err(RegistryError::TokenAlreadyRevoked(_))));
    assert!(matches!(registry.revoke_token("nobody", &event()), Err(RegistryError::TokenNotFound(_))));
    assert!(matches!(registry.create_token(&new_token("ci-api"), &event()), Err(RegistryError::TokenNameTaken(_))));

    let conn = registry.writer.lock().unwrap();
    for sql in ["DELETE FROM tokens", "UPDATE tokens SET revoked_at = NULL", "UPDATE tokens SET roles = 'admin'"] {
        assert!(conn.execute(sql, []).is_err(), "{sql} was allowed");
    }
}

/// A sign-in's session and its audit event are one transaction, as are a sign-out's end and
/// its event: a session nobody's audit log shows is never opened.
#[test]
fn a_session_opens_and_ends_with_its_audit_event_or_not_at_all() {
    let (_dir, registry) = open();
    let token = registry.create_token(&new_token("auditor-1"), &event()).unwrap();
    let login = |action: AuditAction| NewEvent::by_server(action, "token/auditor-1", serde_json::json!({}));
    let count =
        |action: &str| registry.audit_events(0, None, 1000).unwrap().iter().filter(|e| e.action == action).count();
    let expires = utc::Timestamp::at(utc::now() + time::Duration::hours(1));

    // The event cannot be appended: no session either.
    registry
        .writer
        .lock()
        .unwrap()
        .execute_batch(
            "CREATE TEMP TRIGGER no_login BEFORE INSERT ON audit_events WHEN NEW.action = 'web.login'
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        )
        .unwrap();
    assert!(registry.open_session(&[1; 32], &token.id, &expires, &login(AuditAction::WebLogin)).is_err());
    assert_eq!(registry.session(&[1; 32]).unwrap(), None, "no session without its event");
    registry.writer.lock().unwrap().execute_batch("DROP TRIGGER temp.no_login").unwrap();

    registry.open_session(&[2; 32], &token.id, &expires, &login(AuditAction::WebLogin)).unwrap();
    assert!(registry.session(&[2; 32]).unwrap().is_some());
    assert_eq!(count("web.login"), 1);
    let logout = |name: &str, owner: &str| NewEvent {
        actor: name.into(),
        owner: owner.into(),
        action: AuditAction::WebLogout,
        subject: format!("token/{name}"),
        details: serde_json::json!({}),
    };
    assert!(registry.end_session(&[2; 32], logout).unwrap());
    assert_eq!(registry.session(&[2; 32]).unwrap(), None);
    let ended: Vec<Event> =
        registry.audit_events(0, None, 1000).unwrap().into_iter().filter(|e| e.action == "web.logout").collect();
    assert_eq!((ended.len(), ended[0].actor.as_str(), ended[0].owner.as_str()), (1, "auditor-1", "alice"));
    // Ending it again ends nothing and says nothing.
    assert!(!registry.end_session(&[2; 32], logout).unwrap());
    assert_eq!(count("web.logout"), 1);
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

mod releases {
    use super::*;
    use crate::model::release::{Kind, State};
    use crate::registry::{Adoption, Ending, NewApproval, NewRelease};

    fn live_on_no_node() -> Ending {
        Ending::Live { nodes: vec![] }
    }

    fn with_artifact() -> (tempfile::TempDir, Registry, Digest) {
        let (dir, registry) = open();
        registry.record_artifact(&new_artifact("api", b"v1"), &event()).unwrap();
        (dir, registry, Digest::of(b"v1"))
    }

    fn request(digest: Digest, state: State) -> NewRelease {
        NewRelease {
            service: "api".into(),
            environment: "production".into(),
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

    #[test]
    fn a_node_stays_stranded_until_a_deploy_goes_live_on_it_or_it_is_found_repaired() {
        let (_dir, registry, digest) = with_artifact();
        let deploying = || {
            let r = registry.create_release(&request(digest, State::Approved), &event()).unwrap();
            registry.transition(r.id, State::Deploying, "release", None, &event()).unwrap().id
        };
        let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let stranded = || {
            registry
                .read(|c| super::super::marks::stranded_in(c, "api", "production"))
                .unwrap()
                .into_iter()
                .map(|s| s.node)
                .collect::<Vec<_>>()
        };
        let first = deploying();
        let failed = Ending::Failed { reason: "reload failed".into(), stranded: names(&["web-1", "web-2"]) };
        registry.finish_deploy(first, &failed, &event()).unwrap();
        assert_eq!(stranded(), ["web-1", "web-2"]);

        // A deploy live on web-1 (web-2 left out) repairs web-1 only.
        let second = deploying();
        registry.finish_deploy(second, &Ending::Live { nodes: names(&["web-1", "web-3"]) }, &event()).unwrap();
        assert_eq!(stranded(), ["web-2"]);
        // Found serving the live release: only a node still stranded gets a mark.
        assert_eq!(registry.repair_nodes("api", "production", &names(&["web-2", "web-3"]), "seen").unwrap(), ["web-2"]);
        assert!(stranded().is_empty());
        // Stranded again later: the newest mark counts. The history stays.
        let third = deploying();
        let failed = Ending::Failed { reason: "again".into(), stranded: names(&["web-1"]) };
        registry.finish_deploy(third, &failed, &event()).unwrap();
        assert_eq!(stranded(), ["web-1"]);
        assert_eq!(registry.release_detail(first).unwrap().unwrap().stranded, ["web-1", "web-2"]);
        assert!(registry.release_detail(second).unwrap().unwrap().stranded.is_empty());
        let conn = registry.writer.lock().unwrap();
        let err = conn.execute("DELETE FROM node_marks", []).unwrap_err();
        assert!(err.to_string().contains("never deleted"), "{err}");
        let err = conn.execute("UPDATE node_marks SET mark = 'repaired'", []).unwrap_err();
        assert!(err.to_string().contains("immutable"), "{err}");
    }

    /// A newer `release` may store a phase (and the schema allows an outcome) this build does
    /// not write: after a downgrade, the release's story still reads, naming them as stored.
    #[test]
    fn a_phase_a_newer_build_stored_reads_back_by_its_name() {
        use crate::model::release::{Phase, PhaseOutcome};
        let (_dir, registry, digest) = with_artifact();
        let release = registry.create_release(&request(digest, State::Approved), &event()).unwrap();
        registry
            .writer
            .lock()
            .unwrap()
            .execute(
                "INSERT INTO deployments (release_id, node, phase, started_at, finished_at, outcome)
                 VALUES (?1, 'web-1', 'warm cache', '2026-12-04T09:00:00Z', '2026-12-04T09:00:01Z', 'skipped')",
                [release.id],
            )
            .unwrap();
        let detail = registry.release_detail(release.id).unwrap().expect("the story reads");
        let d = &detail.deployments[0];
        assert_eq!((d.phase.as_str(), d.outcome.as_str()), ("warm cache", "skipped"));
        assert!(!d.phase.is_known() && !d.outcome.is_known());
        assert!(Phase::ALL.iter().all(|p| *p != d.phase) && d.outcome != PhaseOutcome::Failed);
    }

    #[test]
    fn what_a_release_ran_with_and_what_it_adopted_are_written_once() {
        let (_dir, registry, digest) = with_artifact();
        registry.record_artifact(&new_artifact("api", b"legacy"), &event()).unwrap();
        let legacy = Digest::of(b"legacy");
        let release =
            registry.create_release(&NewRelease { adopt: true, ..request(digest, State::Approved) }, &event()).unwrap();
        assert_eq!(registry.adoption(release.id).unwrap(), Some(Adoption { digest: None, nodes: vec![] }));
        let nodes = vec!["web-1".to_owned(), "web-2".to_owned()];
        registry.record_adoption(release.id, legacy, &nodes, &event()).unwrap();
        // A second capture changes nothing.
        registry.record_adoption(release.id, digest, &["web-3".to_owned()], &event()).unwrap();
        assert_eq!(registry.adoption(release.id).unwrap(), Some(Adoption { digest: Some(legacy), nodes }));

        registry.record_config(release.id, legacy, false).unwrap();
        registry.record_config(release.id, digest, true).unwrap();
        // (Verified or not is said once it went live.)
        registry.transition(release.id, State::Deploying, "release", None, &event()).unwrap();
        registry.finish_deploy(release.id, &live_on_no_node(), &event()).unwrap();
        let detail = registry.release_detail(release.id).unwrap().unwrap();
        assert_eq!((detail.config_digest, detail.verified), (Some(legacy), Some(false)), "the first record stands");

        let conn = registry.writer.lock().unwrap();
        for (sql, why) in [
            ("UPDATE release_adoptions SET nodes = '[]'", "adoption rewritten"),
            ("DELETE FROM release_adoptions", "adoption deleted"),
            ("UPDATE release_configs SET recorded_at = 'x'", "configuration digest rewritten"),
            ("DELETE FROM release_configs", "configuration digest deleted"),
        ] {
            assert!(conn.execute(sql, []).is_err(), "the database allowed: {why}");
        }
    }

    #[test]
    fn the_database_holds_the_state_machine() {
        let (_dir, registry, digest) = with_artifact();
        let pending = registry.create_release(&request(digest, State::PendingApproval), &event()).unwrap();
        let conn = registry.writer.lock().unwrap();
        for (sql, why) in [
            (format!("UPDATE releases SET state = 'live' WHERE id = {}", pending.id), "skips approval and deploy"),
            (
                format!("UPDATE releases SET digest = 'sha256:{}' WHERE id = {}", "0".repeat(64), pending.id),
                "another digest",
            ),
            (format!("UPDATE releases SET requested_by = 'mallory' WHERE id = {}", pending.id), "another requester"),
            (format!("DELETE FROM releases WHERE id = {}", pending.id), "deleted"),
            ("UPDATE release_transitions SET actor = 'mallory'".into(), "rewritten transition"),
            ("DELETE FROM audit_events".into(), "deleted audit"),
            ("UPDATE audit_events SET actor = 'mallory'".into(), "rewritten audit"),
        ] {
            assert!(conn.execute(&sql, []).is_err(), "the database allowed: {why}");
        }
        // An approval must bind the release's own digest.
        let sql = format!(
            "INSERT INTO approvals VALUES ({}, 'sha256:{}', 'approved', 'bob', 'bob', 't', NULL)",
            pending.id,
            "1".repeat(64)
        );
        assert!(conn.execute(&sql, []).unwrap_err().to_string().contains("binds the digest"));
        // Four eyes, held by the database too: the requester's owner cannot approve.
        let sql = format!(
            "INSERT INTO approvals VALUES ({}, '{digest}', 'approved', 'alice-2', 'alice', 't', NULL)",
            pending.id
        );
        assert!(conn.execute(&sql, []).unwrap_err().to_string().contains("four eyes"));
        // Owners are compared lowercased: a row written before owners were normalized is the
        // same person.
        let sql = format!(
            "INSERT INTO approvals VALUES ({}, '{digest}', 'approved', 'alice-2', 'Alice', 't', NULL)",
            pending.id
        );
        assert!(conn.execute(&sql, []).unwrap_err().to_string().contains("four eyes"), "Alice approved alice's");
    }

    #[test]
    fn one_release_in_flight_per_service_and_environment() {
        let (_dir, registry, digest) = with_artifact();
        let first = registry.create_release(&request(digest, State::Approved), &event()).unwrap();
        let err = registry.create_release(&request(digest, State::Approved), &event()).unwrap_err();
        assert!(matches!(&err, RegistryError::InFlight(r) if r.id == first.id), "{err}");
        // A pending one is allowed beside it, but cannot be approved while the first flies.
        let pending = registry.create_release(&request(digest, State::PendingApproval), &event()).unwrap();
        let approval =
            NewApproval { approve: true, decided_by: "bob".into(), decider_owner: "bob".into(), reason: None };
        assert!(matches!(registry.decide(pending.id, &approval, &event()), Err(RegistryError::InFlight(_))));
        // Even a raw insert cannot put a second one in flight.
        let conn = registry.writer.lock().unwrap();
        let err = conn
            .execute(
                &format!(
                    "INSERT INTO releases (service, environment, digest, kind, state, requested_by, requester_owner,
                       requested_at, state_changed_at) VALUES ('api', 'production', '{digest}', 'deploy', 'deploying',
                       'x', 'x', 't', 't')"
                ),
                [],
            )
            .unwrap_err();
        assert!(err.to_string().contains("UNIQUE"), "{err}");
    }

    #[test]
    fn a_lapsed_lease_is_taken_and_a_held_one_refused() {
        let (_dir, registry, digest) = with_artifact();
        let r = registry.create_release(&request(digest, State::Approved), &event()).unwrap();
        let at = |text| utc::Timestamp::parse(text).unwrap();
        let (past, future) = (&at("2000-01-01T00:00:00.000000Z"), &at("2999-01-01T00:00:00.000000Z"));
        let r = registry.start_deploy(r.id, "server-a", future, &event()).unwrap().deploying().unwrap();
        assert!(registry.lapsed_deploys().unwrap().is_empty());
        // Held, unexpired, by another owner: refused, and left as it was.
        assert!(!registry.take_lease(&r, "server-b", future).unwrap());
        assert!(!registry.renew_lease(&r, "server-b", future).unwrap());
        // Its own: taken again.
        assert!(registry.take_lease(&r, "server-a", future).unwrap());
        // Lapsed: anyone may take it to resolve the release, and then it is no longer lapsed.
        assert!(registry.renew_lease(&r, "server-a", past).unwrap());
        assert_eq!(registry.lapsed_deploys().unwrap().len(), 1);
        assert!(registry.take_lease(&r, "server-b", future).unwrap());
        assert!(registry.lapsed_deploys().unwrap().is_empty());
        assert!(!registry.renew_lease(&r, "server-a", future).unwrap(), "server-a's is gone");
        // Gone altogether (cleared at a start): taken.
        registry.clear_leases().unwrap();
        assert_eq!(registry.lapsed_deploys().unwrap().len(), 1);
        assert!(registry.take_lease(&r, "server-c", future).unwrap());
        assert!(registry.lapsed_deploys().unwrap().is_empty());
    }

    #[test]
    fn an_artifact_ever_live_can_never_be_purged() {
        let (_dir, registry, digest) = with_artifact();
        let r = registry.create_release(&request(digest, State::Approved), &event()).unwrap();
        registry.transition(r.id, State::Deploying, "release", None, &event()).unwrap();
        registry.finish_deploy(r.id, &live_on_no_node(), &event()).unwrap();
        assert!(registry.purge_candidates(&all_before()).unwrap().is_empty());
        assert!(!registry.record_purge(digest, &all_before(), "root", "root", &event()).unwrap(), "checked again");
        // And the trigger refuses it too.
        let conn = registry.writer.lock().unwrap();
        let err = conn
            .execute(
                &format!("INSERT INTO artifact_purges (digest, purged_by, owner, purged_at) VALUES ('{digest}', 'r', 'r', 't')"),
                [],
            )
            .unwrap_err();
        assert!(err.to_string().contains("kept for good"), "{err}");
    }

    #[test]
    fn live_spells_are_limited_within_the_callers_scope() {
        let (_dir, registry, digest) = with_artifact();
        registry.record_artifact(&new_artifact("web", b"v1"), &event()).unwrap();
        let live = |service: &str, environment: &str| {
            let new = NewRelease {
                service: service.into(),
                environment: environment.into(),
                ..request(digest, State::Approved)
            };
            let r = registry.create_release(&new, &event()).unwrap();
            registry.transition(r.id, State::Deploying, "release", None, &event()).unwrap();
            registry.finish_deploy(r.id, &live_on_no_node(), &event()).unwrap().release.id
        };
        let api = live("api", "production");
        let web: Vec<i64> = (0..3).map(|_| live("web", "staging")).collect();
        let ids = |spells: Vec<crate::registry::LiveSpell>| spells.iter().map(|s| s.release).collect::<Vec<_>>();
        // Newest first; the limit counts only what the scope lets through.
        assert_eq!(ids(registry.live_spells(digest, None, None, 2).unwrap()), [web[2], web[1]]);
        let only_api = ["api".to_owned()];
        assert_eq!(ids(registry.live_spells(digest, Some(&only_api), None, 2).unwrap()), [api]);
        let only_production = ["production".to_owned()];
        assert_eq!(ids(registry.live_spells(digest, None, Some(&only_production), 2).unwrap()), [api]);
        let staging = ["staging".to_owned()];
        assert!(registry.live_spells(digest, Some(&only_api), Some(&staging), 2).unwrap().is_empty());
    }

    #[test]
    fn going_live_supersedes_and_cancels_stale_requests() {
        let (_dir, registry, digest) = with_artifact();
        let live = |registry: &Registry| {
            let r = registry.create_release(&request(digest, State::Approved), &event()).unwrap();
            registry.transition(r.id, State::Deploying, "release", None, &event()).unwrap();
            registry.finish_deploy(r.id, &live_on_no_node(), &event()).unwrap().release
        };
        let first = live(&registry);
        let stale = registry.create_release(&request(digest, State::PendingApproval), &event()).unwrap();
        let second = live(&registry);
        assert_eq!(registry.release(first.id).unwrap().unwrap().state, State::Superseded);
        assert_eq!(registry.release(stale.id).unwrap().unwrap().state, State::Cancelled);
        assert_eq!(registry.live_release("api", "production").unwrap().unwrap().id, second.id);
        let detail = registry.release_detail(stale.id).unwrap().unwrap();
        assert_eq!(
            detail.transitions.last().unwrap().reason.as_deref(),
            Some(format!("release {} went live first", second.id).as_str())
        );
    }

    #[test]
    fn finishing_a_deploy_tells_when_it_began_and_what_it_cancelled() {
        let (_dir, registry, digest) = with_artifact();
        let r = registry.create_release(&request(digest, State::Approved), &event()).unwrap();
        let deploying = registry.transition(r.id, State::Deploying, "release", None, &event()).unwrap();
        let stale = registry.create_release(&request(digest, State::PendingApproval), &event()).unwrap();
        let finished = registry.finish_deploy(r.id, &live_on_no_node(), &event()).unwrap();
        assert_eq!(finished.release.state, State::Live);
        assert_eq!(finished.deploying_since.as_ref(), Some(&deploying.state_changed_at));
        let cancelled: Vec<(i64, State)> = finished.cancelled.iter().map(|c| (c.id, c.state)).collect();
        assert_eq!(cancelled, [(stale.id, State::Cancelled)]);

        let r = registry.create_release(&request(digest, State::Approved), &event()).unwrap();
        let deploying = registry.transition(r.id, State::Deploying, "release", None, &event()).unwrap();
        let finished =
            registry.finish_deploy(r.id, &Ending::Failed { reason: "no".into(), stranded: vec![] }, &event()).unwrap();
        assert_eq!(finished.release.state, State::Failed);
        assert_eq!(finished.deploying_since, Some(deploying.state_changed_at));
        assert!(finished.cancelled.is_empty());
    }

    #[test]
    fn gauges_count_stored_artifacts_and_what_waits_in_each_cell() {
        use crate::registry::{Cell, ConfiguredEnvironment};
        let (_dir, registry, digest) = with_artifact();
        registry.record_artifact(&new_artifact("api", b"v2 bytes"), &event()).unwrap();
        let environment = |name: &str| ConfiguredEnvironment {
            name: name.into(),
            promote_from: None,
            requires_approval: name == "production",
        };
        registry
            .sync_config(&[("api".into(), "generic".into())], &[environment("staging"), environment("production")])
            .unwrap();
        registry.create_release(&request(digest, State::PendingApproval), &event()).unwrap();
        registry.create_release(&request(digest, State::PendingApproval), &event()).unwrap();
        let approved = registry.create_release(&request(digest, State::Approved), &event()).unwrap();

        let gauges = registry.gauges().unwrap();
        assert_eq!((gauges.artifacts, gauges.artifact_bytes), (2, 2 + 8));
        let cell = |environment: &str, in_flight, pending_approval, stranded_nodes| Cell {
            service: "api".into(),
            environment: environment.into(),
            in_flight,
            pending_approval,
            stranded_nodes,
        };
        assert_eq!(gauges.cells, [cell("staging", 0, 0, 0), cell("production", 1, 2, 0)]);
        // Its deploy fails and strands two nodes.
        registry.transition(approved.id, State::Deploying, "release", None, &event()).unwrap();
        let stranded = vec!["web-1".to_owned(), "web-2".to_owned()];
        registry.finish_deploy(approved.id, &Ending::Failed { reason: "no".into(), stranded }, &event()).unwrap();
        assert_eq!(registry.gauges().unwrap().cells, [cell("staging", 0, 0, 0), cell("production", 0, 2, 2)]);

        // Purged bytes are not stored any more, until they are uploaded again.
        assert!(registry.record_purge(Digest::of(b"v2 bytes"), &all_before(), "root", "root", &event()).unwrap());
        let gauges = registry.gauges().unwrap();
        assert_eq!((gauges.artifacts, gauges.artifact_bytes), (1, 2));
        registry.record_artifact(&new_artifact("api", b"v2 bytes"), &event()).unwrap();
        assert_eq!(registry.gauges().unwrap().artifacts, 2);
    }
}

mod webhooks {
    use super::*;
    use crate::model::release::{Kind, State};
    use crate::model::webhook::{Attempt, Outcome};
    use crate::registry::NewRelease;

    fn release(registry: &Registry) -> i64 {
        registry.record_artifact(&new_artifact("api", b"v1"), &event()).unwrap();
        let new = NewRelease {
            service: "api".into(),
            environment: "staging".into(),
            digest: Digest::of(b"v1"),
            kind: Kind::Deploy,
            state: State::Approved,
            requested_by: "ci".into(),
            requester_owner: "gitlab".into(),
            source_environment: None,
            replaces: None,
            expires_at: None,
            note: None,
            excluded: vec![],
            adopt: false,
            forced_past: vec![],
        };
        let event = NewEvent::by_server(AuditAction::ReleaseDeploy, "", serde_json::json!({}));
        registry.create_release(&new, &event).unwrap().id
    }

    fn attempt(seq: u64, release_id: i64, n: u32, outcome: Outcome) -> Attempt {
        Attempt {
            webhook: "monday".into(),
            event_seq: seq,
            release_id,
            event: "release.requested".into(),
            delivery: "d".into(),
            attempt: n,
            at: crate::utc::Timestamp::now(),
            duration_ms: 3,
            status_code: Some(if outcome == Outcome::Accepted { 200 } else { 500 }),
            error: (outcome != Outcome::Accepted).then(|| "answered 500".into()),
            outcome,
            next_attempt_at: (outcome == Outcome::Retrying).then(crate::utc::Timestamp::now),
        }
    }

    #[test]
    fn a_cursor_starts_at_the_head_and_only_moves_forward() {
        let (_dir, registry) = open();
        registry.append_event(&event()).unwrap();
        registry.start_webhook_cursors(&["monday".into()]).unwrap();
        assert_eq!(registry.webhook_cursor("monday").unwrap(), Some(1), "starts after what came before");
        assert_eq!(registry.webhook_cursor("slack").unwrap(), None);

        // Only release.* events, and how far the scan got: past the others too.
        let id = release(&registry);
        registry.append_event(&event()).unwrap();
        let backlog = registry.webhook_backlog(1, 100).unwrap();
        let actions: Vec<&str> = backlog.events.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["release.deploy"]);
        let head = registry.audit_head().unwrap().unwrap().0;
        assert_eq!(backlog.scanned_to, head);
        let at = registry.release_at_event(id).unwrap().unwrap();
        assert_eq!((at.first_state, at.version.as_deref()), (State::Approved, Some("1.2.3")));

        // A full page stops the scan at its last event.
        let page = registry.webhook_backlog(0, 1).unwrap();
        assert_eq!(page.scanned_to, page.events[0].seq);

        // A retry leaves the cursor; the attempt that ends a delivery moves it.
        let seq = backlog.events[0].seq;
        registry.record_webhook_attempt(&attempt(seq, id, 1, Outcome::Retrying)).unwrap();
        assert_eq!(registry.webhook_cursor("monday").unwrap(), Some(1));
        registry.record_webhook_attempt(&attempt(seq, id, 2, Outcome::Accepted)).unwrap();
        assert_eq!(registry.webhook_cursor("monday").unwrap(), Some(seq));
        assert_eq!(registry.webhook_attempts("monday", seq).unwrap(), 2);
        registry.advance_webhook_cursor("monday", 1).unwrap();
        assert_eq!(registry.webhook_cursor("monday").unwrap(), Some(seq), "never back");
        registry.start_webhook_cursors(&["monday".into()]).unwrap();
        assert_eq!(registry.webhook_cursor("monday").unwrap(), Some(seq), "a known webhook keeps its cursor");

        let shown = registry.release_detail(id).unwrap().unwrap().webhook_deliveries;
        assert_eq!(shown.len(), 1, "one line per (event, webhook): {shown:?}");
        assert_eq!((shown[0].attempts, shown[0].delivered, shown[0].last_status), (2, true, Some(200)));

        let conn = registry.writer.lock().unwrap();
        for (sql, why) in [
            ("UPDATE webhook_cursors SET after_seq = 0".to_owned(), "cursor moved back"),
            ("DELETE FROM webhook_cursors".to_owned(), "cursor deleted"),
            ("UPDATE webhook_deliveries SET outcome = 'gave_up'".to_owned(), "attempt rewritten"),
            ("DELETE FROM webhook_deliveries".to_owned(), "attempt deleted"),
            (
                format!(
                    "INSERT INTO webhook_deliveries (webhook, event_seq, release_id, event, delivery, attempt, at,
                       duration_ms, error, outcome) VALUES ('monday', {seq}, {id}, 'e', 'd', 2, 't', 0, 'x', 'gave_up')"
                ),
                "a second attempt 2",
            ),
        ] {
            assert!(conn.execute(&sql, []).is_err(), "the database allowed: {why}");
        }
    }
}

mod audit_chain {
    use super::*;

    #[test]
    fn every_change_lands_in_the_chain_in_order() {
        let (_dir, registry) = open();
        registry.record_artifact(&new_artifact("api", b"x"), &event()).unwrap();
        registry.create_token(&new_token("t1"), &event()).unwrap();
        registry.append_event(&event()).unwrap();
        let mut seqs = vec![];
        let mut prev = crate::model::audit::GENESIS;
        registry
            .walk_audit_events(|e| {
                assert_eq!(e.prev_hash, prev);
                assert_eq!(e.hash, e.expected_hash(&prev));
                prev = e.hash;
                seqs.push(e.seq);
                true
            })
            .unwrap();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(registry.audit_head().unwrap().unwrap(), (3, prev));
    }
}

#[test]
fn audit_reads_past_sqlite_integers_find_nothing_instead_of_failing() {
    // `GET /v1/audit/events?after=9223372036854775808` broke its answer mid-stream.
    let (_dir, registry) = open();
    registry.append_event(&event()).unwrap();
    assert_eq!(registry.audit_events(0, None, u64::MAX).unwrap().len(), 1);
    assert!(registry.audit_events(u64::MAX, None, u64::MAX).unwrap().is_empty());
    assert!(registry.audit_events(i64::MAX as u64 + 1, None, 10).unwrap().is_empty());
}

#[test]
fn reads_at_once_share_a_bounded_pool_of_connections() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (_dir, registry) = open();
    let (now, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        for _ in 0..(MAX_READERS * 4) {
            s.spawn(|| {
                registry
                    .read(|conn| {
                        let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(at_once, Ordering::SeqCst);
                        conn.query_row("SELECT count(*) FROM audit_events", [], |r| r.get::<_, i64>(0))?;
                        std::thread::sleep(Duration::from_millis(50));
                        now.fetch_sub(1, Ordering::SeqCst);
                        Ok(())
                    })
                    .unwrap();
            });
        }
    });
    assert_eq!(most.load(Ordering::SeqCst), MAX_READERS, "connections reading at once");
    let pool = registry.readers.lock().unwrap();
    assert_eq!((pool.open, pool.idle.len()), (MAX_READERS, MAX_READERS));
}

#[test]
fn a_snapshot_leaves_out_the_uploads_under_way() {
    let (dir, registry) = open();
    let id = uuid::Uuid::new_v4();
    registry.stage_upload(id).unwrap();
    registry.publishing_upload(id, Digest::of(b"bytes")).unwrap();
    assert_eq!(registry.left_uploads().unwrap().len(), 1);
    let copy = dir.path().join("copy.db");
    registry.snapshot(&copy).unwrap();
    let restored = Registry::open(&copy).unwrap();
    assert_eq!(restored.left_uploads().unwrap(), vec![], "a restore would delete bytes committed after the copy");
    assert!(registry.is_staged(id).unwrap(), "the running registry keeps its note");
}

#[test]
fn a_digest_prefix_resolves_to_its_one_artifact_or_is_refused_naming_the_matches() {
    use crate::digest::DigestRef;
    let (_dir, registry) = open();
    // Three artifacts, two of them sharing their first 20 hex digits.
    let twin = |last: char, service: &str| {
        let digest: Digest = format!("sha256:{}{}{last}", "ab".repeat(10), "0".repeat(43)).parse().unwrap();
        registry.record_artifact(&NewArtifact { digest, ..new_artifact(service, b"x") }, &event()).unwrap();
        digest
    };
    let (one, two) = (twin('1', "api"), twin('2', "web"));
    let other = Digest::of(b"other");
    registry.record_artifact(&NewArtifact { digest: other, ..new_artifact("api", b"x") }, &event()).unwrap();
    let prefix = |hex: &str| hex.parse::<DigestRef>().unwrap();

    assert_eq!(registry.resolve_digest(&prefix(&other.short()), None).unwrap(), other);
    assert_eq!(registry.resolve_digest(&prefix(&one.hex()[..64]), None).unwrap(), one);
    assert_eq!(registry.resolve_digest(&prefix(&two.to_string()), None).unwrap(), two);
    assert!(registry.resolve_digest(&prefix(&two.hex()[..63]), None).is_err(), "63 digits name both twins");
    match registry.resolve_digest(&prefix(&one.short()), None) {
        Err(RegistryError::AmbiguousDigest { matches, .. }) => assert_eq!(matches, [one, two]),
        other => panic!("not refused as ambiguous: {other:?}"),
    }
    let err = registry.resolve_digest(&prefix(&one.short()), None).unwrap_err().to_string();
    assert!(err.contains(&one.to_string()) && err.contains(&two.to_string()) && err.contains("give more"), "{err}");
    // A token limited to services resolves among its own artifacts, and hears of no other.
    assert_eq!(registry.resolve_digest(&prefix(&one.short()), Some(&["web".to_owned()])).unwrap(), two);
    let unseen = registry.resolve_digest(&prefix(&other.short()), Some(&["web".to_owned()])).unwrap_err();
    assert!(matches!(unseen, RegistryError::NoDigest(_)), "{unseen}");
    let none = registry.resolve_digest(&prefix("0123456789ab"), None).unwrap_err().to_string();
    assert_eq!(none, "no artifact's digest starts with sha256:0123456789ab");
}

/// A purge cutoff after every time stamp a test writes.
fn all_before() -> utc::Timestamp {
    utc::Timestamp::parse("9999-01-01T00:00:00.000000Z").unwrap()
}

#[test]
fn the_audit_export_since_a_time_starts_at_the_first_event_at_or_after_it() {
    let (_dir, registry) = open();
    let first = registry.append_event(&event()).unwrap();
    let second = registry.append_event(&event()).unwrap();
    let seqs = |since: &utc::Timestamp| -> Vec<u64> {
        registry.audit_events(0, Some(since), 10).unwrap().iter().map(|e| e.seq).collect()
    };
    assert_eq!(seqs(&first.at), [first.seq, second.seq]);
    assert_eq!(seqs(&second.at).last(), Some(&second.seq));
    assert!(seqs(&all_before()).is_empty(), "nothing after the end of time");
}
