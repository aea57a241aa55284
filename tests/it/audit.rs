//! Tampering with the audit log, as someone with the server's disk and the sqlite3 CLI would:
//! `release audit verify` exits 6 and names the first bad event; a registry replaced by an
//! older copy is caught against the checkpoint in the bucket.

use std::process::Command;

use crate::releases::Fixture;

/// Runs `sql` with the CLI; it waits for the running server's write lock (without a busy
/// timeout it fails at once with "database is locked" when a write of the server is under way).
fn sqlite(db: &std::path::Path, sql: &str) {
    let out = Command::new("sqlite3")
        .args(["-cmd", ".timeout 5000"])
        .arg(db)
        .arg(sql)
        .output()
        .expect("the sqlite3 CLI (installed by .ci/run)");
    assert!(out.status.success(), "sqlite3 {sql}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A registry with some history: uploads, tokens, a release or two.
fn with_history() -> Fixture {
    let f = Fixture::new();
    let v1 = f.upload("v1");
    f.live_in("ci", "staging", &v1);
    f
}

fn verify(f: &Fixture) -> crate::support::CmdOutput {
    f.cli("carol").args(["audit", "verify"]).run()
}

#[test]
fn an_intact_log_verifies() {
    let f = with_history();
    let out = verify(&f);
    assert_eq!(out.output.status.code(), Some(0), "{out}");
    assert!(out.stdout().contains("audit log intact"), "{out}");
}

#[test]
fn an_altered_event_is_named() {
    let f = with_history();
    let db = f.server.data_dir().join("registry.db");
    sqlite(&db, "DROP TRIGGER audit_events_are_immutable; UPDATE audit_events SET actor = 'mallory' WHERE seq = 3;");
    let out = verify(&f);
    assert_eq!(out.output.status.code(), Some(6), "{out}");
    assert!(out.stderr().contains("broken at event 3") && out.stderr().contains("altered"), "{out}");
}

#[test]
fn a_deleted_event_is_named() {
    let f = with_history();
    let db = f.server.data_dir().join("registry.db");
    sqlite(&db, "DROP TRIGGER audit_events_are_never_deleted; DELETE FROM audit_events WHERE seq = 4;");
    let out = verify(&f);
    assert_eq!(out.output.status.code(), Some(6), "{out}");
    assert!(out.stderr().contains("broken at event 4") && out.stderr().contains("missing"), "{out}");
}

#[test]
fn reordered_events_are_named() {
    let f = with_history();
    let db = f.server.data_dir().join("registry.db");
    // Swap the contents of events 2 and 3 (keeping their numbers and hashes in place).
    sqlite(
        &db,
        "DROP TRIGGER audit_events_are_immutable;
         CREATE TEMP TABLE swap AS SELECT * FROM audit_events WHERE seq IN (2, 3);
         UPDATE audit_events SET at = (SELECT at FROM swap WHERE seq = 5 - audit_events.seq),
           actor = (SELECT actor FROM swap WHERE seq = 5 - audit_events.seq),
           action = (SELECT action FROM swap WHERE seq = 5 - audit_events.seq),
           subject = (SELECT subject FROM swap WHERE seq = 5 - audit_events.seq),
           details = (SELECT details FROM swap WHERE seq = 5 - audit_events.seq)
         WHERE seq IN (2, 3);",
    );
    let out = verify(&f);
    assert_eq!(out.output.status.code(), Some(6), "{out}");
    assert!(out.stderr().contains("broken at event 2"), "{out}");
}

#[test]
fn a_registry_replaced_by_an_older_copy_is_caught_against_the_bucket() {
    let mut f = with_history();
    let db = f.server.data_dir().join("registry.db");
    let old = f.server.dir.path().join("old.db");
    sqlite(&db, &format!(".backup '{}'", old.display()));
    // More history after the copy, checkpointed to the bucket at shutdown.
    let v2 = f.upload("v2");
    f.live_in("ci", "staging", &v2);
    let status = {
        unsafe { libc::kill(f.server.pid() as i32, libc::SIGTERM) };
        f.server.terminate_after_signal()
    };
    assert!(status.success());
    // Put the old copy in place, as an attacker with the server's disk could.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    std::fs::copy(&old, &db).unwrap();
    f.server.restart();
    assert!(f.server.log().contains("does not match the bucket's checkpoint"), "the server says so at start");
    let out = verify(&f);
    assert_eq!(out.output.status.code(), Some(6), "{out}");
    assert!(out.stderr().contains("replaced by an older copy"), "{out}");
}
