//! Rollbacks on local nodes: finalizing again where the shared files changed, and the Laravel
//! migrations guard (`--force` past migrations; the migrate node left out only by a rollback).

use std::fs;
use std::os::unix::fs::PermissionsExt;

use serde_json::json;

use crate::releases::Fixture;

use super::Fleet;

#[test]
fn rolling_a_laravel_service_back_past_migrations_needs_force() {
    let root = tempfile::Builder::new().prefix("release-migrate-").tempdir().unwrap().keep();
    let base = root.join("node1");
    fs::create_dir_all(base.join("shared/storage")).unwrap();
    fs::write(base.join("shared/.env"), "APP_KEY=x").unwrap();
    let config = format!(
        "[service.web]\nkind = \"laravel\"\nhooks.finalize = []\nhooks.migrate = [\"echo migrated >> $RELEASE_BASE/migrations.log\"]\n\
         hooks.reload = []\n[[service.web.node]]\nenvironment = \"staging\"\nhost = \"local\"\nbase = \"{}\"\nmigrate = true\n",
        base.display()
    );
    let fleet = Fleet { f: Fixture::with_config(&config), bases: vec![base.clone()] };
    let v1 = fleet.upload("v1", &[("database/migrations/2026_01_01_000000_create_orders.php", b"<?php")]);
    let v2 = fleet.upload(
        "v2",
        &[
            ("database/migrations/2026_01_01_000000_create_orders.php", b"<?php"),
            ("database/migrations/2026_02_01_000000_add_discounts.php", b"<?php"),
        ],
    );
    fleet.deploy(&v1);
    fleet.deploy(&v2);
    assert_eq!(
        fs::read_to_string(base.join("migrations.log")).unwrap().lines().count(),
        2,
        "migrate ran on the migrate node"
    );

    let out = fleet.f.cli("alice").args(["rollback", "web", "--env", "staging"]).assert_exit(3);
    assert!(out.stderr().contains("2026_02_01_000000_add_discounts.php") && out.stderr().contains("--force"), "{out}");
    fleet.f.assert_refusal_recorded("alice", 409, "migrations_ahead");
    // A plain deploy of the older build is the same step back (issue 11).
    let out = fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1]).assert_exit(3);
    assert!(out.stderr().contains("deploying") && out.stderr().contains("add_discounts.php"), "{out}");
    fleet.f.assert_refusal_recorded("ci", 409, "migrations_ahead");
    assert_eq!(fleet.f.get("carol", "/v1/releases?service=web")["releases"].as_array().unwrap().len(), 2);

    let out = fleet
        .f
        .cli("alice")
        .args(["rollback", "web", "--env", "staging", "--force", "--wait", "--json"])
        .assert_success()
        .json();
    assert_eq!(out["digest"], v1.as_str());
    let event = fleet.f.events("release.rollback").pop().unwrap();
    assert_eq!(event["details"]["forced"], true);
    assert_eq!(event["details"]["migrations_ahead"], json!(["2026_02_01_000000_add_discounts.php"]));
    assert_eq!(
        fs::read_to_string(base.join("migrations.log")).unwrap().lines().count(),
        2,
        "a rollback runs no migration"
    );
    // Not only in the audit log: show, its --json and the release page say it.
    assert_eq!(out["forced_past_migrations"], json!(["2026_02_01_000000_add_discounts.php"]), "{out}");
    let id = out["id"].to_string();
    let human = fleet.f.cli("carol").args(["show", &id]).assert_success().stdout();
    assert!(human.contains("FORCED past migrations it lacks") && human.contains("add_discounts.php"), "{human}");
    let page =
        fleet.f.server.http().get(format!("{}/releases/{id}", fleet.f.server.url)).bearer_auth(fleet.f.token("carol"));
    let page = page.send().unwrap().text().unwrap();
    assert!(page.contains("forced past migrations") && page.contains("add_discounts.php"), "{page}");
}

#[test]
fn leaving_out_the_migrate_node_of_a_laravel_service_is_refused_except_from_a_rollback() {
    let root = tempfile::Builder::new().prefix("release-migrate-").tempdir().unwrap().keep();
    let mut config = "[service.web]\nkind = \"laravel\"\nhooks.finalize = []\nhooks.reload = []\n\
                      hooks.migrate = [\"true\"]\n"
        .to_owned();
    for (name, migrate) in [("node1", true), ("node2", false)] {
        let base = root.join(name);
        fs::create_dir_all(base.join("shared/storage")).unwrap();
        fs::write(base.join("shared/.env"), "APP_KEY=x").unwrap();
        config.push_str(&format!(
            "[[service.web.node]]\nname = \"{name}\"\nenvironment = \"staging\"\nhost = \"local\"\nbase = \"{}\"\nmigrate = {migrate}\n",
            base.display()
        ));
    }
    let fleet = Fleet { f: Fixture::with_config(&config), bases: vec![] };
    let v1 = fleet.upload("v1", &[]);
    let out =
        fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", &v1, "--exclude-node", "node1"]).assert_exit(2);
    assert!(out.stderr().contains("migrate node") && out.stderr().contains("node1"), "{out}");
    assert!(fleet.f.get("carol", "/v1/releases?service=web")["releases"].as_array().unwrap().is_empty());

    // A rollback runs no migration: with the migrate node down, it may be left out (issue 11).
    let v2 = fleet.upload("v2", &[]);
    for digest in [&v1, &v2] {
        fleet.f.cli("ci").args(["deploy", "web", "--env", "staging", digest, "--wait"]).assert_success();
    }
    let out = fleet
        .f
        .cli("alice")
        .args(["rollback", "web", "--env", "staging", "--exclude-node", "node1", "--wait", "--json"])
        .assert_success()
        .json();
    assert_eq!((out["digest"].as_str(), &out["excluded_nodes"]), (Some(v1.as_str()), &json!(["node1"])));
    let current = |name: &str| fs::read_link(root.join(name).join("current")).unwrap();
    assert!(current("node2").ends_with(v1.trim_start_matches("sha256:")), "{:?}", current("node2"));
    assert!(current("node1").ends_with(v2.trim_start_matches("sha256:")), "{:?}", current("node1"));
    let event = fleet.f.events("release.rollback").pop().unwrap();
    assert_eq!(event["details"]["excluded_nodes"], json!(["node1"]));
}

/// A rollback to a release already on the node finalizes it again where the shared files
/// changed since its finalize hooks ran (a rotated `.env` a cached configuration would keep
/// out), and only there; the phase says which files it was finalized with.
#[test]
fn a_rollback_finalizes_again_where_the_shared_files_changed() {
    let finalize = "hooks.finalize = [\"cp config.txt FINALIZED_WITH\"]";
    let fleet = Fleet::new(2, finalize);
    let v1 = fleet.upload("v1", &[]);
    let v2 = fleet.upload("v2", &[]);
    fleet.deploy(&v1);
    fleet.deploy(&v2);
    // Node 1's configuration is rotated while v2 runs.
    fs::write(fleet.bases[0].join("shared/config.txt"), "rotated secret").unwrap();
    let out =
        fleet.f.cli("alice").args(["rollback", "web", "--env", "staging", "--wait", "--json"]).assert_success().json();
    assert_eq!(out["state"], "live", "{out}");
    let v1_dir = |i: usize| fleet.bases[i].join("releases").join(&v1[7..]);
    assert_eq!(fs::read_to_string(v1_dir(0).join("FINALIZED_WITH")).unwrap(), "rotated secret", "finalized again");
    assert!(fs::read_to_string(v1_dir(1).join("FINALIZED_WITH")).unwrap().starts_with("config of"), "untouched");
    let prepares: Vec<(String, String)> = out["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["phase"] == "prepare")
        .map(|d| (d["node"].as_str().unwrap().to_owned(), d["output_tail"].as_str().unwrap().to_owned()))
        .collect();
    let node1 = prepares.iter().find(|(n, _)| n.ends_with("node1")).unwrap();
    assert!(
        node1.1.contains("shared files changed since it was finalized")
            && node1.1.contains("finalized again with config.txt sha256:"),
        "{prepares:?}"
    );
    let node2 = prepares.iter().find(|(n, _)| n.ends_with("node2")).unwrap();
    assert!(node2.1.starts_with("artifact: already here, ready; finalized with"), "{prepares:?}");
    // The release stays read-only outside its writable paths, and a second rollback to it
    // with nothing changed finalizes nothing.
    assert_eq!(fs::metadata(v1_dir(0).join("version.txt")).unwrap().permissions().mode() & 0o222, 0);
    fleet.f.cli("alice").args(["rollback", "web", "--env", "staging", "--wait"]).assert_success();
    let again = fleet
        .f
        .cli("alice")
        .args(["rollback", "web", "--env", "staging", "--to", &v1, "--wait", "--json"])
        .assert_success()
        .json();
    for d in again["deployments"].as_array().unwrap().iter().filter(|d| d["phase"] == "prepare") {
        let output = d["output_tail"].as_str().unwrap();
        assert!(output.starts_with("artifact: already here, ready; finalized with"), "{again}");
    }
}
