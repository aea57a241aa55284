//! Backups and restore, as `docs/operations.md` tells an operator to do them: a story, a backup
//! while the server runs, more story (lost with the disk), the data directory deleted, a restore
//! from the bucket, and the story goes on: the server starts, `audit verify` passes with the
//! one recorded gap, the tokens work, the history is whole, the next deploy works. And every
//! refusal of `release restore`.

use std::path::Path;

use serde_json::Value;

use crate::releases::{CONFIG, Fixture};
use crate::support::{Backend, TestServer, block_on};

fn story(backend: Backend, extra: &str) -> Fixture {
    Fixture::adopt(TestServer::start_with(backend, &format!("{CONFIG}{extra}")))
}

fn config(f: &Fixture) -> String {
    f.server.dir.path().join("release.toml").display().to_string()
}

/// `release backup|restore …` with the server's configuration file.
fn cli(f: &Fixture, args: &[&str]) -> crate::support::TestCommand {
    let mut cmd = crate::support::TestCommand::new();
    cmd.args(args).args(["--config", &config(f)]);
    cmd
}

fn stop(f: &mut Fixture) {
    unsafe { libc::kill(f.server.pid() as i32, libc::SIGTERM) };
    assert!(f.server.terminate_after_signal().success());
}

/// Deletes the data directory: all of it on S3; on the local backend all but `objects/`,
/// which is the "bucket" there.
fn lose_the_disk(data: &Path, backend: Backend) {
    for entry in std::fs::read_dir(data).unwrap() {
        let entry = entry.unwrap();
        if backend == Backend::Local && entry.file_name() == "objects" {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            std::fs::remove_dir_all(entry.path()).unwrap();
        } else {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
}

fn live_digest(f: &Fixture, env: &str) -> Value {
    let status = f.get("carol", "/v1/status");
    status.as_array().unwrap().iter().find(|c| c["service"] == "api" && c["environment"] == env).cloned().unwrap()
}

fn the_story_survives_the_loss_of_the_disk(backend: Backend) {
    // audit verify answers each token afresh this often (30 s by default).
    let mut f = story(backend, "[limits]\nverify_interval = \"100ms\"\n");
    let v1 = f.upload("v1");
    let first = f.live_in("alice", "staging", &v1);
    let backup = cli(&f, &["backup", "--json"]).assert_success().json();
    let key = backup["key"].as_str().unwrap().to_owned();
    assert!(key.contains("backups/registry-") && key.ends_with(".db.zst"), "{backup}");
    assert_eq!(backup["sha256"].as_str().unwrap().len(), 64, "{backup}");

    // After the backup: history the disk takes with it (the bucket's checkpoint counts it).
    let v2 = f.upload("v2");
    f.live_in("alice", "staging", &v2);
    stop(&mut f);
    let checkpoint: Value = {
        let store = f.server.store();
        let (_, bytes) = block_on(store.latest_checkpoint()).unwrap().expect("a checkpoint at shutdown");
        serde_json::from_slice(&bytes).unwrap()
    };
    let snapshot_events = backup["events"].as_u64().unwrap();
    assert!(checkpoint["events"].as_u64().unwrap() > snapshot_events, "{checkpoint} vs {backup}");

    lose_the_disk(&f.server.data_dir(), backend);
    let out = cli(&f, &["restore", "latest"]).assert_success();
    let text = out.stdout();
    let (from, to) = (snapshot_events + 1, checkpoint["events"].as_u64().unwrap());
    assert!(text.contains(&format!("LOST: audit events {from} to {to}")), "{out}");
    assert!(text.contains(checkpoint["head"].as_str().unwrap()), "names the checkpoint's head\n{out}");
    assert!(text.contains(backup["head"].as_str().unwrap()), "names the snapshot's head\n{out}");

    f.server.restart();
    assert!(!f.server.log().contains("does not match the bucket's checkpoint"), "{}", f.server.log());
    // Tokens made before the backup work; the audit chain verifies with its one recorded gap.
    let verified = f.cli("carol").args(["audit", "verify", "--json"]).assert_success().json();
    assert_eq!(verified["gaps"][0]["from"], from, "{verified}");
    assert_eq!(verified["gaps"][0]["to"], to, "{verified}");
    let restored = f.events("registry.restored");
    assert_eq!(restored.len(), 1);
    assert_eq!(restored[0]["seq"], to + 1);
    assert_eq!(restored[0]["details"]["lost"]["count"], to - from + 1);
    // History as of the backup is whole.
    assert_eq!(live_digest(&f, "staging")["digest"], v1, "{}", live_digest(&f, "staging"));
    let shown = f.get("carol", &format!("/v1/releases/{}", first["id"]));
    assert_eq!(shown["state"], "live");
    // The story goes on: an upload, a deploy, a promotion waiting for approval.
    let v3 = f.upload("v3");
    f.live_in("alice", "staging", &v3);
    assert_eq!(live_digest(&f, "staging")["digest"], v3);
    // A new checkpoint past the gap, and verify still passes.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let verified = f.cli("carol").args(["audit", "verify", "--json"]).assert_success().json();
    assert!(verified["checkpoint"]["events"].as_u64().unwrap() > to + 1, "{verified}");
    f.server.restart();
    f.cli("carol").args(["audit", "verify"]).assert_success();
    assert!(!f.server.log().contains("does not match the bucket's checkpoint"), "{}", f.server.log());
}

#[test]
fn the_story_survives_the_loss_of_the_disk_on_s3() {
    the_story_survives_the_loss_of_the_disk(Backend::S3);
}

#[test]
fn the_story_survives_the_loss_of_the_disk_on_the_local_backend() {
    the_story_survives_the_loss_of_the_disk(Backend::Local);
}

#[test]
fn only_the_recorded_gap_is_accepted() {
    // A restore records the gap; the same old copy put in place by hand (no restore) is still
    // caught, as it was before backups existed.
    let mut f = story(Backend::Local, "");
    let v1 = f.upload("v1");
    f.live_in("alice", "staging", &v1);
    cli(&f, &["backup"]).assert_success();
    let v2 = f.upload("v2");
    f.live_in("alice", "staging", &v2);
    stop(&mut f);
    let db = f.server.data_dir().join("registry.db");
    let saved = f.server.dir.path().join("saved.db");
    lose_the_disk(&f.server.data_dir(), Backend::Local);
    cli(&f, &["restore", "latest"]).assert_success();
    // Take the restored file without its registry.restored event: a plain older copy.
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(format!(
            "DROP TRIGGER audit_events_are_never_deleted; DELETE FROM audit_events WHERE action = 'registry.restored'; \
             VACUUM INTO '{}';",
            saved.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    std::fs::copy(&saved, &db).unwrap();
    f.server.restart();
    assert!(f.server.log().contains("does not match the bucket's checkpoint"), "{}", f.server.log());
    let out = f.cli("carol").args(["audit", "verify"]).assert_exit(6);
    assert!(out.stderr().contains("replaced by an older copy"), "{out}");
}

#[test]
fn restore_refuses_what_it_must() {
    let mut f = story(Backend::Local, "");
    f.upload("v1");
    let backup = cli(&f, &["backup", "--json"]).assert_success().json();
    let key = backup["key"].as_str().unwrap().to_owned();

    // While the server holds the data directory.
    let out = cli(&f, &["restore", "latest", "--force"]).assert_exit(3);
    assert!(out.stderr().contains("stop it first"), "{out}");
    stop(&mut f);
    // Over an existing registry, without --force.
    let out = cli(&f, &["restore", &key]).assert_exit(3);
    assert!(out.stderr().contains("--force"), "{out}");
    // An unknown key, and something that is not a key.
    let out = cli(&f, &["restore", "backups/registry-20200101T000000.000Z.db.zst", "--force"]).assert_exit(4);
    assert!(out.stderr().contains("no backup"), "{out}");
    cli(&f, &["restore", "yesterday", "--force"]).assert_exit(2);

    // A tampered snapshot: one byte changed.
    let db = f.server.data_dir().join("registry.db");
    let before = std::fs::read(&db).unwrap();
    let object = f.server.data_dir().join("objects").join(&key);
    let mut bytes = std::fs::read(&object).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&object, &bytes).unwrap();
    let out = cli(&f, &["restore", &key, "--force"]).assert_exit(6);
    assert!(out.stderr().contains("does not match its manifest"), "{out}");
    assert_eq!(std::fs::read(&db).unwrap(), before, "the registry is untouched");
    assert!(!f.server.data_dir().join("registry.db.restoring").exists());

    // With --force, over the registry that is there: the restore happens and is recorded.
    bytes[middle] ^= 0x55;
    std::fs::write(&object, &bytes).unwrap();
    let out = cli(&f, &["restore", &key, "--force", "--json"]).assert_success().json();
    assert!(out["lost"].is_null(), "{out}");
    f.server.restart();
    assert_eq!(f.events("registry.restored").len(), 1);
    f.cli("carol").args(["audit", "verify"]).assert_success();
}

#[test]
fn the_server_backs_up_on_schedule_keeps_the_newest_and_says_so() {
    let f = story(Backend::S3, "[backup]\ninterval = \"1s\"\nkeep = 2\n");
    let store = f.server.store();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let backups = f.events("registry.backup");
        if backups.len() >= 4 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{} backups in 30 s\n{}", backups.len(), f.server.log());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let kept = block_on(store.list_backups()).unwrap();
    assert!(kept.len() <= 3 && !kept.is_empty(), "{kept:?}");
    let newest = f.events("registry.backup").last().unwrap()["details"]["key"].as_str().unwrap().to_owned();
    assert!(kept.iter().any(|s| store.backup_key(*s) == newest), "the newest is kept: {newest} in {kept:?}");
    let metrics =
        f.server.http().get(format!("{}/metrics", f.server.url)).bearer_auth(f.token("carol")).send().unwrap();
    let text = metrics.text().unwrap();
    let line = text.lines().find(|l| l.starts_with("release_backup_last_success_timestamp_seconds ")).unwrap();
    let value: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(value > 1.7e9, "{line}");
    assert!(text.contains("release_backup_failures_total 0"), "{text}");
}

#[test]
fn a_failed_backup_is_counted_logged_and_recorded() {
    // A file where the backups' directory would be: every write under backups/ fails.
    let mut f = story(Backend::Local, "[backup]\ninterval = \"1s\"\n");
    stop(&mut f);
    let backups = f.server.data_dir().join("objects").join("backups");
    let _ = std::fs::remove_dir_all(&backups);
    std::fs::write(&backups, b"in the way").unwrap();
    f.server.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while f.events("registry.backup_failed").is_empty() {
        assert!(std::time::Instant::now() < deadline, "no failure recorded\n{}", f.server.log());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(f.server.log().contains("the registry backup failed"), "{}", f.server.log());
    let text = f
        .server
        .http()
        .get(format!("{}/metrics", f.server.url))
        .bearer_auth(f.token("carol"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let failures = text.lines().find(|l| l.starts_with("release_backup_failures_total ")).unwrap();
    assert!(failures.split_whitespace().nth(1).unwrap().parse::<f64>().unwrap() >= 1.0, "{failures}");
    assert!(text.contains("release_backup_last_success_timestamp_seconds 0"), "{text}");
}

#[test]
fn a_backup_of_another_chain_than_the_buckets_is_refused() {
    let mut f = story(Backend::Local, "");
    f.upload("v1");
    let backup = cli(&f, &["backup", "--json"]).assert_success().json();
    stop(&mut f);
    // The bucket's checkpoint names another event 2 than the snapshot has.
    let head = serde_json::json!({"events": 2, "head": "00".repeat(32), "at": "2026-01-01T00:00:00Z"});
    std::fs::write(f.server.data_dir().join("objects/audit/head.json"), head.to_string()).unwrap();
    let db = f.server.data_dir().join("registry.db");
    let before = std::fs::read(&db).unwrap();
    let out = cli(&f, &["restore", backup["key"].as_str().unwrap(), "--force"]).assert_exit(6);
    assert!(out.stderr().contains("not of this bucket's audit chain"), "{out}");
    assert_eq!(std::fs::read(&db).unwrap(), before, "the registry is untouched");
}
