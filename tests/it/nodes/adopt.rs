//! `adopt` on local nodes: an application deployed another way is kept as the way back before
//! the first deploy; nodes that differ and trees that cannot be packaged are refused.

use std::fs;
use std::path::Path;

use serde_json::json;

use super::{Fleet, release_dirs};

/// An application deployed another way: `current` is a plain directory holding it, with its
/// own copy of the shared config.
fn legacy_app(base: &Path, version: &str) {
    let current = base.join("current");
    fs::create_dir_all(current.join("public")).unwrap();
    fs::write(current.join("version.txt"), version).unwrap();
    fs::write(current.join("public/index.html"), "hi").unwrap();
    fs::write(current.join("config.txt"), format!("legacy config of {}", base.display())).unwrap();
}

#[test]
fn adopt_keeps_an_application_deployed_another_way_so_the_first_deploy_rolls_back() {
    let fleet = Fleet::new(2, "");
    for base in &fleet.bases {
        legacy_app(base, "legacy");
    }
    // Node 2 has no shared config yet: adoption takes the one the legacy tree has.
    fs::remove_file(fleet.bases[1].join("shared/config.txt")).unwrap();
    let v1 = fleet.upload("v1", &[]);

    // Without --adopt, the plain directory is refused, and nothing is touched.
    let out = fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1, "--wait"]).assert_exit(7);
    assert!(out.stderr().contains("plain directory") && out.stderr().contains("--adopt"), "{out}");
    for base in &fleet.bases {
        assert!(fs::symlink_metadata(base.join("current")).unwrap().is_dir());
        assert_eq!(fs::read_to_string(base.join("current/version.txt")).unwrap(), "legacy");
        assert!(release_dirs(base).is_empty(), "{:?}", release_dirs(base));
    }
    let status = fleet.f.cli("carol").args(["status", "web", "--nodes", "--json"]).assert_exit(1).json();
    assert!(status.to_string().contains("plain directory"), "{status}");

    let out = fleet
        .f
        .cli("ci")
        .args(["deploy", "web", "--env", "staging", &v1, "--adopt", "--wait", "--json"])
        .assert_success()
        .json();
    assert_eq!(out["state"], "live", "{out}");
    fleet.assert_all_on(&v1);
    let legacy = out["adopted"]["digest"].as_str().unwrap().to_owned();
    assert_eq!(out["adopted"]["nodes"].as_array().unwrap().len(), 2, "{out}");
    for base in &fleet.bases {
        // The old tree is kept aside as it was, and as a release beside the new one.
        let kept: Vec<_> = fs::read_dir(base.join(".release"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("adopted-"))
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(fs::read_to_string(kept[0].join("version.txt")).unwrap(), "legacy");
        let adopted = base.join("releases").join(&legacy[7..]);
        assert_eq!(fs::read_to_string(adopted.join("version.txt")).unwrap(), "legacy");
        assert_eq!(fs::read_link(adopted.join("config.txt")).unwrap(), Path::new("../../shared/config.txt"));
    }
    assert_eq!(
        fs::read_to_string(fleet.bases[1].join("shared/config.txt")).unwrap(),
        format!("legacy config of {}", fleet.bases[1].display()),
        "seeded from the legacy tree"
    );
    assert!(fs::read_to_string(fleet.bases[0].join("shared/config.txt")).unwrap().starts_with("config of"), "kept");
    // The legacy tree is an artifact of the service now, by the same digest a package gives.
    let artifact = fleet.f.get("carol", &format!("/v1/artifacts/{legacy}"));
    assert_eq!(artifact["uploads"][0]["version"], "adopted", "{artifact}");

    // Even this first deploy rolls back: to exactly the adopted tree.
    let back =
        fleet.f.cli("alice").args(["rollback", "web", "--env", "staging", "--wait", "--json"]).assert_success().json();
    assert_eq!(back["digest"], legacy.as_str(), "{back}");
    fleet.assert_all_on(&legacy);
    for base in &fleet.bases {
        assert_eq!(fs::read_to_string(base.join("current/version.txt")).unwrap(), "legacy");
    }
    let events = fleet.f.cli("carol").args(["audit", "export"]).assert_success().stdout();
    assert!(events.lines().any(|l| l.contains("\"release.adopted\"") && l.contains(&legacy)), "{events}");
}

#[test]
fn purge_keeps_the_adopted_tree_the_only_way_back_to_before_the_first_deploy() {
    let fleet = Fleet::with_env(1, "", &[crate::curation::SHORT_DAY]);
    legacy_app(&fleet.bases[0], "legacy");
    let v1 = fleet.upload("v1", &[]);
    let out = fleet
        .f
        .cli("ci")
        .args(["deploy", "web", "--env", "staging", &v1, "--adopt", "--wait", "--json"])
        .assert_success()
        .json();
    let legacy = out["adopted"]["digest"].as_str().unwrap().to_owned();
    let never = fleet.upload("never deployed", &[]);
    std::thread::sleep(std::time::Duration::from_millis(5));
    // The adopted tree was never live as a release: only its adoption keeps it.
    let purged = fleet
        .f
        .cli("root")
        .args(["artifact", "purge", "--never-live", "--older-than", "1", "--json"])
        .assert_success()
        .json();
    assert_eq!(purged["purged"], json!([never]), "{purged}");
    assert_eq!(fleet.f.get("carol", &format!("/v1/artifacts/{legacy}"))["stored"], true);
    let back =
        fleet.f.cli("alice").args(["rollback", "web", "--env", "staging", "--wait", "--json"]).assert_success().json();
    assert_eq!((back["digest"].as_str(), back["state"].as_str()), (Some(legacy.as_str()), Some("live")), "{back}");
    fleet.assert_all_on(&legacy);
}

#[test]
fn adopt_refuses_nodes_holding_different_applications_and_touches_nothing() {
    let fleet = Fleet::new(2, "");
    legacy_app(&fleet.bases[0], "legacy a");
    legacy_app(&fleet.bases[1], "legacy b");
    let v1 = fleet.upload("v1", &[]);
    let out = fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1, "--adopt", "--wait"]).assert_exit(7);
    assert!(out.stderr().contains("different applications"), "{out}");
    for (base, version) in fleet.bases.iter().zip(["legacy a", "legacy b"]) {
        assert!(fs::symlink_metadata(base.join("current")).unwrap().is_dir());
        assert_eq!(fs::read_to_string(base.join("current/version.txt")).unwrap(), version);
        assert!(release_dirs(base).is_empty());
    }
}

#[test]
fn a_failed_adopting_deploy_puts_every_node_back_on_the_adopted_tree() {
    // Node 2 cannot reload v1 (only v1): the deploy fails after the switch.
    let fleet =
        Fleet::new(2, "hooks.reload = [\"test ! -e $RELEASE_BASE/shared/reload-broken || ! grep -q v1 version.txt\"]");
    for base in &fleet.bases {
        legacy_app(base, "legacy");
    }
    fs::write(fleet.bases[1].join("shared/reload-broken"), "").unwrap();
    let v1 = fleet.upload("v1", &[]);
    let out = fleet
        .f
        .cli("ci")
        .args(["deploy", "web", "--env", "staging", &v1, "--adopt", "--wait", "--json"])
        .assert_exit(7)
        .json();
    let legacy = out["adopted"]["digest"].as_str().unwrap().to_owned();
    for base in &fleet.bases {
        assert_eq!(fs::read_link(base.join("current")).unwrap(), Path::new("releases").join(&legacy[7..]));
        assert_eq!(fs::read_to_string(base.join("current/version.txt")).unwrap(), "legacy");
    }
}

#[test]
fn adopt_refuses_a_tree_that_cannot_be_packaged_and_touches_nothing() {
    let fleet = Fleet::new(1, "");
    legacy_app(&fleet.bases[0], "legacy");
    // A link out of the tree: `release package` refuses it, so adoption does too.
    std::os::unix::fs::symlink("/etc/passwd", fleet.bases[0].join("current/public/leak")).unwrap();
    let v1 = fleet.upload("v1", &[]);
    let out = fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1, "--adopt", "--wait"]).assert_exit(7);
    assert!(out.stderr().contains("unadoptable") && out.stderr().contains("leaves the tree"), "{out}");
    assert!(fs::symlink_metadata(fleet.bases[0].join("current")).unwrap().is_dir());
    assert_eq!(fs::read_to_string(fleet.bases[0].join("current/version.txt")).unwrap(), "legacy");
    assert!(release_dirs(&fleet.bases[0]).is_empty());
}
